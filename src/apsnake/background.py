"""Sky background: a binned, clipped estimate with smooth interpolation (sep).

Rubin's calibrateImage uses 128-px bins with a clipped mean and a smooth interpolant
(docs/algorithms.md §2.2); sep's Background does the same job with 128-px boxes, a
clipped mode estimate per box, a 3x3 median filter of the box grid and bicubic-spline
interpolation. Masked pixels (BAD, SAT, detections, ...) are excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BackgroundConfig:
    """bin_size: box size in pixels (Rubin binSize=128); filter_size: median filter of the
    box grid, in boxes."""

    bin_size: int = 128
    filter_size: int = 3


@dataclass
class BackgroundModel:
    """The background image (image unit) and its global level and noise."""

    image: np.ndarray
    level: float  # global background, image unit
    rms: float  # global background noise per pixel, image unit


def estimate_background(image: np.ndarray, mask: np.ndarray | None = None,
                        config: BackgroundConfig | None = None) -> BackgroundModel:
    """Smooth background of ``image`` ignoring ``mask`` (True = do not use)."""
    import sep

    config = config or BackgroundConfig()
    data = np.ascontiguousarray(image, dtype=np.float32)
    m = None if mask is None else np.ascontiguousarray(mask, dtype=bool)
    bkg = sep.Background(data, mask=m, bw=config.bin_size, bh=config.bin_size,
                         fw=config.filter_size, fh=config.filter_size)
    return BackgroundModel(image=bkg.back(dtype=np.float32), level=float(bkg.globalback), rms=float(bkg.globalrms))
