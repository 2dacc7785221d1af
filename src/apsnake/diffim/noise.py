"""Noise of the subtraction inputs: usable pixels, variance-plane rescaling, mean variances.

Both methods first rescale the variance planes to the measured noise (Rubin ``scaleVariance``):
the factor is the squared robust sigma (1.4826 MAD) of the image over its predicted noise,
on source-free, unmasked pixels of evenly spread row strips (sources found on 4x4-binned data,
since the inputs need not carry DETECTED), applied only within [1/limit, limit]. The factors
are kept as scalars and folded into every later use of the variance planes (inputs are never
modified). docs/algorithms.md (difference imaging) has the reasoning.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from apsnake.detection import smooth_for_detection
from apsnake.exposure import Exposure
from apsnake.numerics import clipped_mean, dilate, mad_sigma

log = logging.getLogger(__name__)

_STAT_SAMPLES = 200_000  # pixels sampled for image statistics

_STRIP_ROWS = 64  # noise estimates use strips of this many rows ...

_STRIP_PIXELS = 1_000_000  # ... totalling about this many pixels

STAT_PLANES = ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT", "DETECTED",
                "DETECTED_NEGATIVE", "HIGH_VARIANCE", "STREAK")


def _sample(shape, good=None, max_n=_STAT_SAMPLES):
    """A regular subsampling slice pair and the matching good-pixel selector."""
    step = max(1, int(math.sqrt(shape[0] * shape[1] / max_n)))
    sl = (slice(step // 2, None, step), slice(step // 2, None, step))
    return sl, (None if good is None else good[sl])


def _row_strips(ny: int, nx: int):
    """Row indices of evenly spread strips of ``_STRIP_ROWS`` rows covering ~``_STRIP_PIXELS``."""
    n_strips = max(1, min(ny // _STRIP_ROWS, int(math.ceil(_STRIP_PIXELS / (_STRIP_ROWS * nx)))))
    if n_strips * _STRIP_ROWS >= ny:
        return np.arange(ny)
    starts = np.linspace(0, ny - _STRIP_ROWS, n_strips).astype(int)
    return (starts[:, None] + np.arange(_STRIP_ROWS)[None, :]).ravel()


def _source_free(image, variance, ignore, binning: int = 4):
    """Normalised image ``z = image / sqrt(variance)`` and a selector of pixels away from sources.

    Sources are found on the ``binning`` x ``binning`` binned ``z`` (bins above 2 robust sigmas of
    the bins, grown by one bin); masked pixels are excluded too. Without a DETECTED plane this
    keeps star wings out of noise estimates (they would inflate a MAD by ~10-20 % in a field of
    5-px-FWHM stars).
    """
    from scipy.ndimage import maximum_filter

    z = image / np.sqrt(variance)
    z[ignore] = 0
    ny, nx = z.shape
    by, bx = ny // binning, nx // binning
    keep = ~ignore
    if by >= 4 and bx >= 4:
        zb = z[:by * binning, :bx * binning].reshape(by, binning, bx, binning).mean(axis=(1, 3))
        badb = ignore[:by * binning, :bx * binning].reshape(by, binning, bx, binning).any(axis=(1, 3))
        sb = mad_sigma(zb[~badb]) if (~badb).sum() > 16 else float("nan")
        if np.isfinite(sb) and sb > 0:
            src = maximum_filter((zb > 2 * sb) | badb, size=3)
            full = np.ones((ny, nx), bool)
            full[:by * binning, :bx * binning] = np.repeat(np.repeat(src, binning, axis=0), binning, axis=1)
            keep &= ~full
    return z, keep


def variance_scale(image, variance, ignore, limit: float, psf_sigma: float | None = None):
    """Factor bringing the variance plane to the measured noise.

    The noise is measured on the PSF scale when ``psf_sigma`` (pixels) is given: the image
    smoothed with a Gaussian of that width, divided by the noise its variance plane predicts
    (``detection.smooth_for_detection``). A template warped twice (calexp -> patch ->
    calexp) has noise correlated over a few pixels: its per-pixel scatter is ~0.4 of its
    PSF-scale noise squared, and a per-pixel factor would leave PSF fluxes and detection
    thresholds on the difference with errors ~1.5x too small. For white noise both agree.
    Source-free unmasked pixels of evenly spread row strips are used; the factor is 1 when
    outside [1/limit, limit].
    """
    rows = _row_strips(*image.shape)
    z, keep = _source_free(image[rows], variance[rows], ignore[rows])
    if psf_sigma is not None and psf_sigma > 0:
        smooth, noise = smooth_for_detection(image[rows], variance[rows], ignore[rows], psf_sigma)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = smooth / noise
        near_mask = dilate(ignore[rows] | ~keep, max(1, int(round(3 * psf_sigma))))
        keep = keep & ~near_mask & np.isfinite(z)
    values = z[keep]
    if values.size > _STAT_SAMPLES:
        values = values[:: values.size // _STAT_SAMPLES]
    if values.size < 100:
        return 1.0
    factor = mad_sigma(values) ** 2
    if not np.isfinite(factor) or not (1.0 / limit <= factor <= limit):
        log.warning("variance scale factor %.3g outside [1/%g, %g]: not applied", factor, limit, limit)
        return 1.0
    return factor


def mean_variance(variance, ignore) -> float:
    sl, good = _sample(variance.shape, ~ignore)
    return clipped_mean(variance[sl][good])


def prepare(exposure: Exposure, usable: np.ndarray | None = None):
    """float32 image (0 where unusable or non-finite), float32 variance (non-finite or
    non-positive replaced by the median), the usable-pixel selector and the statistics mask
    (True = ignore: unusable or in one of the ``STAT_PLANES``)."""
    image = np.asarray(exposure.image, np.float32)
    variance = np.asarray(exposure.variance, np.float32)
    var_ok = np.isfinite(variance)
    var_ok &= variance > 0
    ok = np.isfinite(image)
    ok &= var_ok
    if usable is not None:
        ok &= usable
    if not ok.all():
        image = np.where(ok, image, np.float32(0))
        fill = np.median(variance[var_ok]) if var_ok.any() else 1.0
        variance = np.where(var_ok, variance, np.float32(fill))
    ignore = exposure.mask_of(*STAT_PLANES)
    ignore |= ~ok
    return image, variance, ok, ignore
