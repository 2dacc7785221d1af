"""How far the PSF halos reach: the encircled energy of both images' PSFs.

A DECam PSF is a Moffat core plus a halo (a much wider, beta ~ 2 profile holding a few per
cent of the flux, its share changing from visit to visit). The PSF models of the calexps are
cut at their stamp (25 px), so the halo is measured here from the pixels: the growth curves
(flux inside radius r over the total flux) of the summed stamps of bright, isolated, clean
stars in both images, and the radius where each reaches the wanted fraction of the flux
(beyond the measured curve, where its fitted beta = 2 wing puts it). The wide kernel terms
that match the halos (``halo``) reach the larger of the two radii (docs/algorithms.md §4.4).

Radii are in pixels; images background-subtracted, in any one flux unit.
"""

from __future__ import annotations

import math

import numpy as np

from apsnake.numerics import cutouts


def stacked_growth_curve(image: np.ndarray, bad: np.ndarray, x, y, r_max: int) -> tuple[np.ndarray, int, float]:
    """Encircled-energy curve of the sum of the sources' stamps, for r = 0 .. r_max pixels.

    Summing the stamps weights each star by its flux, so the brightest ones, the only ones
    whose wings are measured to a fraction of a per cent, set the curve. The summed flux
    inside radius r (pixel centres) is fitted beyond ``r_max / 3`` with
    ``C(r) = F - F k / r^2 + b A(r)``: the total flux ``F``, an outer wing falling as a
    beta = 2 Moffat's (enclosed flux missing ~ 1 / r^2) and a residual background ``b`` per
    pixel (``A(r)`` = pixels inside r). A local background estimated from an annulus would
    carry its own noise times the whole area (~2 % of a star's flux at S/N 1000) and the
    halo's light in the annulus; the fit takes both into account. The curve is
    ``(C(r) - b A(r)) / F``: the fraction of the total flux, wing beyond ``r_max`` included.

    Returns the curve (NaN without usable sources), the number of sources used (those
    fully on the image without a pixel in ``bad`` within ``r_max``) and the wing ``k``
    (px^2; the fraction of the flux beyond r is about ``k / r^2`` far out).
    """
    half = int(r_max)
    curve = np.full(half + 1, np.nan)
    ix = np.floor(np.asarray(x, float) + 0.5).astype(np.int64)
    iy = np.floor(np.asarray(y, float) + 0.5).astype(np.int64)
    if ix.size == 0:
        return curve, 0, float("nan")
    stamps, inside = cutouts(image, ix, iy, half)
    masked, _ = cutouts(bad, ix, iy, half, fill=True)
    usable = inside.all(axis=(1, 2)) & ~masked.any(axis=(1, 2))
    if not usable.any():
        return curve, 0, float("nan")
    g = np.arange(-half, half + 1)
    radius = np.hypot(g[:, None], g[None, :]).ravel()
    order = np.argsort(radius, kind="stable")
    stack = stamps[usable].astype(float).sum(axis=0).ravel()
    ends = np.searchsorted(radius[order], np.arange(half + 1), side="right") - 1
    enclosed = np.cumsum(stack[order])[ends]
    area = (ends + 1).astype(float)
    r = np.arange(half + 1, dtype=float)
    fit = r >= max(half / 3.0, 3.0)
    design = np.column_stack([np.ones(fit.sum()), -1.0 / r[fit] ** 2, area[fit]])
    (total, wing, background), *_ = np.linalg.lstsq(design, enclosed[fit], rcond=None)
    if not total > 0:
        return curve, int(usable.sum()), float("nan")
    return (enclosed - background * area) / total, int(usable.sum()), float(wing / total)


def encircled_energy_radius(curve: np.ndarray, fraction: float, wing: float = float("nan")) -> float:
    """Smallest radius (px) where a growth curve reaches ``fraction``; beyond the curve, where
    its fitted wing (``1 - fraction = wing / r^2``) puts it; NaN for a NaN curve."""
    if not np.isfinite(curve).all():
        return float("nan")
    reached = np.flatnonzero(curve >= fraction)
    if reached.size:
        return float(reached[0])
    if np.isfinite(wing) and wing > 0:
        return max(float(len(curve) - 1), math.sqrt(wing / (1.0 - fraction)))
    return float(len(curve) - 1)


def halo_reach(sci_img, tpl_img, bad, x, y, snr, fraction: float, r_max: int, n_stars: int = 30
                      ) -> tuple[float, float, int]:
    """Radii (px) enclosing ``fraction`` of the flux within ``r_max`` in the science and the template
    image, from the stacked growth curves of the ``n_stars`` highest-S/N sources given (callers pass
    bright, clean, isolated ones), and the number of stars used."""
    order = np.argsort(-np.asarray(snr, float), kind="stable")
    x, y = np.asarray(x, float)[order], np.asarray(y, float)[order]
    half = int(r_max)
    ix, iy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    clean = ~cutouts(bad, ix, iy, half, fill=True)[0].any(axis=(1, 2)) if len(ix) else np.zeros(0, bool)
    chosen = np.flatnonzero(clean)[:n_stars]
    sci, n, sci_wing = stacked_growth_curve(sci_img, bad, x[chosen], y[chosen], r_max)
    tpl, _, tpl_wing = stacked_growth_curve(tpl_img, bad, x[chosen], y[chosen], r_max)
    return encircled_energy_radius(sci, fraction, sci_wing), encircled_energy_radius(tpl, fraction, tpl_wing), n
