"""Round residuals of bright stars in the difference image: measured and taken out.

PSF matching leaves, around the brightest stars, residuals that a spatially smooth kernel
cannot follow: rings where the science and template halos differ beyond the reach of the halo
terms (tens of pixels around saturated stars, whose template cores hold no usable flux to
convolve), and rings where the Moffat cores' indices differ beyond the core kernel (10-25 px
around g ~ 13-15 stars). Both are round. Around each such star the difference image's
azimuthal profile is measured (a median per one-pixel ring: a transient or a neighbour in the
ring does not move it) between ``r_in`` (a few FWHM: the star's own core, and a variable
star's own difference, stay as they are) and an outer radius, fitted with a smooth profile
(piecewise linear in log r), and the significant part of that profile is subtracted.
docs/algorithms.md §4.13.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from apsnake.diffim.kernel_stars import source_columns


def profile_stars(sources, saturated_mask: np.ndarray, min_snr: float, radius: float, radius_saturated: float,
                  max_stars: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stars whose round residuals are measured: x, y (pixels) and outer radius (pixels).

    Sources with S/N >= ``min_snr`` get ``radius``; sources with saturated pixels at their
    centre (``pixelFlags_saturatedCenter``, or SAT in ``saturated_mask`` within 2 px, either
    image) get ``radius_saturated``: their halos reach much further. Brightest first (by PSF
    flux; saturated stars before the others), at most ``max_stars``.
    """
    empty = np.zeros(0)
    if sources is None or len(sources) == 0:
        return empty, empty, empty
    x, y, flux, snr, _ = source_columns(sources)
    keys = list(sources.columns) if hasattr(sources, "columns") else list(sources.keys())
    ny, nx = saturated_mask.shape
    inside = np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
    saturated = np.zeros(len(x), bool)
    if "pixelFlags_saturatedCenter" in keys:
        saturated |= np.asarray(sources["pixelFlags_saturatedCenter"], bool)
    if saturated_mask.any():
        near = ndimage.maximum_filter(saturated_mask, size=5)
        ix = np.clip(np.rint(np.where(inside, x, 0)).astype(int), 0, nx - 1)
        iy = np.clip(np.rint(np.where(inside, y, 0)).astype(int), 0, ny - 1)
        saturated |= near[iy, ix]
    chosen = inside & (saturated | (np.nan_to_num(snr, nan=0.0) >= min_snr))
    order = np.lexsort((-np.nan_to_num(flux[chosen], nan=0.0), ~saturated[chosen]))
    idx = np.flatnonzero(chosen)[order][:max_stars]
    outer = np.where(saturated[idx], float(radius_saturated), float(radius))
    return x[idx], y[idx], outer


def _hat_design(r: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation weights in log r onto ``knots`` (the last knot is the
    outer radius, where the profile is 0): (len(r), len(knots) - 1)."""
    lr, lk = np.log(r), np.log(knots)
    j = np.clip(np.searchsorted(lk, lr, side="right") - 1, 0, len(knots) - 2)
    t = np.clip((lr - lk[j]) / (lk[j + 1] - lk[j]), 0.0, 1.0)
    design = np.zeros((len(r), len(knots)))
    rows = np.arange(len(r))
    design[rows, j] = 1 - t
    design[rows, j + 1] = t
    return design[:, :-1]


def subtract_star_profiles(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, x, y, outer, r_in: float,
                           knot_ratio: float = 1.25, min_significance: float = 3.0,
                           min_pixels_per_ring: int = 20) -> dict:
    """Subtract, in place, the round residual profile of ``image`` around each star.

    Parameters
    ----------
    image, variance : 2-D float arrays
        The difference image (any flux unit) and its variance (unit^2); ``image`` is modified.
    bad : 2-D bool array
        Pixels that do not enter the profiles (masked, no data); they are corrected all the same.
    x, y, outer : 1-D arrays
        Star centres (pixels) and the outer radius of each profile (pixels), in the order the
        profiles are measured (brightest first: a fainter star's rings are measured after the
        brighter neighbour's profile is out).
    r_in : float
        Inner radius (pixels): nothing closer to the star is touched.
    knot_ratio : float
        Ratio of successive knots of the profile (log-spaced from ``r_in`` to the outer radius).
    min_significance : float
        A knot's fitted value enters the subtracted profile only when it is at least this many
        times its error (a profile of noise would add noise in rings).
    min_pixels_per_ring : int
        Rings with fewer good pixels are left out of the fit.

    Returns
    -------
    dict
        ``n_stars`` (profiles measured), ``n_corrected`` (with a significant part subtracted),
        ``max_abs_profile`` (largest |profile value| subtracted, image unit per pixel).
    """
    ny, nx = image.shape
    n_corrected, largest = 0, 0.0
    for xc, yc, r_out in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(outer, float)):
        if not r_out > r_in * knot_ratio:
            continue
        half = int(math.ceil(r_out))
        x0, x1 = max(int(round(xc)) - half, 0), min(int(round(xc)) + half + 1, nx)
        y0, y1 = max(int(round(yc)) - half, 0), min(int(round(yc)) + half + 1, ny)
        if x1 <= x0 or y1 <= y0:
            continue
        gy, gx = np.mgrid[y0:y1, x0:x1]
        r = np.hypot(gx - xc, gy - yc)
        box = image[y0:y1, x0:x1]
        annulus = (r >= r_in) & (r < r_out)
        good = annulus & ~bad[y0:y1, x0:x1] & np.isfinite(box) & np.isfinite(variance[y0:y1, x0:x1])
        if not good.any():
            continue
        ring = np.floor(r[good] - r_in).astype(np.int64) + 1  # ring 1 = [r_in, r_in + 1)
        labels = np.arange(1, int(ring.max()) + 1)
        counts = np.bincount(ring, minlength=len(labels) + 1)[1:]
        use = counts >= min_pixels_per_ring
        with np.errstate(invalid="ignore", divide="ignore"):  # empty rings: NaN, left out by ``use``
            medians = np.asarray(ndimage.median(box[good], ring, labels), float)
            mean_var = np.asarray(ndimage.mean(variance[y0:y1, x0:x1][good], ring, labels), float)
        if use.sum() < 3:
            continue
        # The median of n Gaussian values scatters by sqrt(pi / 2) sigma / sqrt(n).
        sigma = np.sqrt(np.pi / 2 * mean_var[use] / counts[use])
        radius = r_in + labels[use] - 0.5
        n_knots = max(int(math.ceil(math.log(r_out / r_in) / math.log(knot_ratio))), 1)
        knots = r_in * (r_out / r_in) ** (np.arange(n_knots + 1) / n_knots)
        design = _hat_design(radius, knots)
        weighted = design / sigma[:, None]
        normal = weighted.T @ weighted
        constrained = np.diag(normal) > 0
        if not constrained.any():
            continue
        normal = normal[np.ix_(constrained, constrained)]
        cov = np.linalg.pinv(normal)
        values = np.zeros(design.shape[1])
        values[constrained] = cov @ (weighted[:, constrained].T @ (medians[use] / sigma))
        errors = np.full(design.shape[1], np.inf)
        errors[constrained] = np.sqrt(np.clip(np.diag(cov), 0, None))
        values[np.abs(values) < min_significance * errors] = 0.0
        if not values.any():
            continue
        model = _hat_design(np.clip(r[annulus], r_in, None), knots) @ values
        box[annulus] -= model.astype(box.dtype)
        n_corrected += 1
        largest = max(largest, float(np.abs(values).max()))
    return {"n_stars": int(len(np.asarray(x))), "n_corrected": n_corrected, "max_abs_profile": largest}
