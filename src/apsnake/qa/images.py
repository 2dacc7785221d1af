"""Pixels for the night report: downsampled thumbnails and small cutouts of product images.

Images are read with ``read_exposure(memmap=True)``, so a cutout reads only its own pixels.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from apsnake.exposure import read_exposure


def thumbnail(path: str | Path, factor: int = 16) -> np.ndarray:
    """The IMAGE plane of an Exposure FITS averaged over ``factor`` x ``factor`` blocks
    (a full DECam CCD, 4096 x 2048, becomes 256 x 128 at the default)."""
    image = np.asarray(read_exposure(path, memmap=True).image, np.float32)
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    if ny == 0 or nx == 0:
        return image.astype(float)
    blocks = image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    with np.errstate(invalid="ignore"):
        return np.nanmean(blocks, axis=(1, 3))


def cutout(path: str | Path, x: float, y: float, half: int = 20) -> np.ndarray | None:
    """The (2 half + 1)^2 pixels of an Exposure FITS's IMAGE centred on pixel (x, y) (0-based),
    NaN beyond the CCD; None if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    size = 2 * half + 1
    out = np.full((size, size), np.nan)
    ix, iy = int(round(float(x))), int(round(float(y)))
    stat = path.stat()
    image = _image_plane(path, stat.st_mtime_ns, stat.st_size)
    ny, nx = image.shape
    x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
    y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
    if x0 < x1 and y0 < y1:
        out[y0 - (iy - half):y1 - (iy - half), x0 - (ix - half):x1 - (ix - half)] = image[y0:y1, x0:x1]
    return out


@lru_cache(maxsize=64)
def _image_plane(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    """The memory-mapped IMAGE plane of an Exposure FITS, opened once per version of the file
    (the report's gallery takes several cutouts from each image; opening one parses its
    headers and WCS)."""
    return read_exposure(path, memmap=True).image
