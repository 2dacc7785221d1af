"""Kernel stars: the sources whose stamps the PSF-matching kernel is fitted to.

From the calexp's source table: S/N within ``kernel_star_snr``, no bad pixel flags, isolated
(no source within 2 FWHM, none brighter than ``isolation_flux_ratio`` of its flux within the
stamp), far enough from the edge for the stamp, no SAT/BAD/NO_DATA/EDGE/HIGH_VARIANCE pixel of
either image in the stamp; the highest-S/N ``stars_per_box`` in each square box of
``star_box_size`` pixels, at most ``max_kernel_stars`` (Rubin ``sizeCellX/Y``, ``nStarPerCell``).
"""

from __future__ import annotations

import math

import numpy as np

from apsnake.diffim.config import DiffimConfig, DiffimError
from apsnake.exposure import Exposure
from apsnake.numerics import cutouts, mad_sigma, weighted_median
from apsnake.psf import psf_flux

_BAD_FLAG_PREFIXES = ("bad", "edge", "saturated", "nodata", "offimage", "interpolatedcenter",
                      "crcenter", "suspectcenter", "streakcenter", "sat")


def source_columns(sources):
    """x, y, flux, snr and a bad-flag vector from a source table (DataFrame or mapping)."""
    keys = list(sources.columns) if hasattr(sources, "columns") else list(sources.keys())
    for needed in ("x", "y"):
        if needed not in keys:
            raise DiffimError(f"source table has no {needed!r} column (columns: {keys[:12]}...)")
    x = np.asarray(sources["x"], float)
    y = np.asarray(sources["y"], float)
    flux = np.asarray(sources["psfFlux"], float) if "psfFlux" in keys else np.full(len(x), np.nan)
    if "snr" in keys:
        snr = np.asarray(sources["snr"], float)
    elif "psfFluxErr" in keys:
        snr = flux / np.asarray(sources["psfFluxErr"], float)
    else:
        raise DiffimError("source table needs 'snr' or 'psfFlux' and 'psfFluxErr'")
    flagged = np.zeros(len(x), bool)
    for key in keys:
        if isinstance(key, str) and key.startswith("pixelFlags_"):
            suffix = key[len("pixelFlags_"):].lower()
            if suffix.startswith(_BAD_FLAG_PREFIXES):
                flagged |= np.asarray(sources[key], bool)
    return x, y, flux, snr, flagged


def detect_kernel_sources(science: Exposure, image, variance, ignore):
    """Fallback source list when none is given: sep detection at 5 sigma, PSF fluxes."""
    import sep

    data = np.ascontiguousarray(image, dtype=np.float64)
    err = np.ascontiguousarray(np.sqrt(variance), dtype=np.float64)
    bad = np.ascontiguousarray(science.mask_of("BAD", "SAT", "NO_DATA", "EDGE", "CR"))
    pixstack = sep.get_extract_pixstack()
    sep.set_extract_pixstack(max(pixstack, image.size // 4))
    try:
        objects = sep.extract(data, 5.0, err=err, mask=bad, minarea=5)
    except Exception as err_:  # sep raises plain Exceptions on pathological images
        raise DiffimError(f"source detection for kernel stars failed: {err_}") from err_
    finally:
        sep.set_extract_pixstack(pixstack)
    x, y = objects["x"], objects["y"]
    flux, flux_err, _, _ = psf_flux(image, variance, science.psf, x, y, bad=bad)
    return {"x": x, "y": y, "psfFlux": flux, "psfFluxErr": flux_err, "snr": flux / flux_err}


def flux_ratio_outliers(science: tuple, template: tuple, x, y, n_sigma: float, floor: float) -> np.ndarray:
    """Stars whose science / template flux ratio is an outlier among the candidates: variables.

    ``science`` and ``template`` are (image, variance, PsfModel); fluxes are PSF fits with each
    image's own model (their normalisations differ alike for every star). Each star's
    deviation from the inverse-variance weighted median ratio is divided by its noise and a ``floor`` (fraction of the
    ratio: colour terms, PSF variation); the deviations' own robust scatter (at least 1) sets
    the scale, so an outlier is judged against the candidates themselves. Returns True for
    outliers (none with fewer than 3 stars).
    """
    n = len(x)
    if n < 3:
        return np.zeros(n, bool)
    s, es, _, _ = psf_flux(*science, x, y)
    t, et, _, _ = psf_flux(*template, x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = s / t
        error = np.abs(ratio) * np.hypot(es / s, et / t)
    usable = np.isfinite(ratio) & np.isfinite(error) & (t > 0)
    if usable.sum() < 3:
        return ~usable
    # The most precise stars set the centre: with a handful of candidates a plain median can
    # land on a noisy one, or on the variable itself.
    noise = np.hypot(error, floor * np.abs(ratio))
    centre = weighted_median(ratio[usable], 1.0 / noise[usable] ** 2)
    z = (ratio - centre) / np.hypot(error, floor * abs(centre))
    scale = max(1.0, mad_sigma(z[usable]))
    return ~usable | (np.abs(z) > n_sigma * scale)


def select_kernel_stars(sources, shape, bad_cut, big: int, hs: int, fwhm: float, cfg: DiffimConfig,
                        images=None):
    """Indices (into the source table) and integer positions of kernel stars; counts per stage.

    ``images`` = ((science, variance, PsfModel), (template, variance, PsfModel)): candidates
    whose flux ratio is an outlier (``flux_ratio_outliers``) are rejected before the best per
    box are chosen, so a variable is replaced by the next star of its box.
    """
    from scipy.spatial import cKDTree

    x, y, flux, snr, flagged = source_columns(sources)
    if not np.isfinite(flux).any():
        flux = snr  # no fluxes: rank neighbours by S/N
    ny, nx = shape
    counts = {"sources": len(x)}
    lo, hi = cfg.kernel_star_snr
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(snr) & (snr >= lo) & (snr <= (np.inf if hi is None else hi))
    counts["snr"] = int(ok.sum())
    ok &= ~flagged
    counts["unflagged"] = int(ok.sum())
    ix = np.floor(np.where(np.isfinite(x), x, -1e9) + 0.5).astype(np.int64)
    iy = np.floor(np.where(np.isfinite(y), y, -1e9) + 0.5).astype(np.int64)
    ok &= (ix >= big) & (ix < nx - big) & (iy >= big) & (iy < ny - big)
    counts["inside"] = int(ok.sum())
    # isolation: no source within 2 FWHM, none brighter than ratio * flux within the stamp
    located = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if ok.any() and len(located) > 1:
        tree = cKDTree(np.column_stack([x[located], y[located]]))
        pairs = tree.query_pairs(math.sqrt(2) * hs, output_type="ndarray")
        if len(pairs):
            i, j = located[pairs[:, 0]], located[pairs[:, 1]]
            dist = np.hypot(x[i] - x[j], y[i] - y[j])
            fl = np.where(np.isfinite(flux), np.abs(flux), np.inf)
            crowded = np.zeros(len(x), bool)
            close = dist < 2 * fwhm
            in_box = (np.abs(x[i] - x[j]) <= hs) & (np.abs(y[i] - y[j]) <= hs)
            crowded[i[close | (in_box & (fl[j] > cfg.isolation_flux_ratio * fl[i]))]] = True
            crowded[j[close | (in_box & (fl[i] > cfg.isolation_flux_ratio * fl[j]))]] = True
            ok &= ~crowded
    counts["isolated"] = int(ok.sum())
    cand = np.flatnonzero(ok)
    if len(cand):
        dirty = cutouts(bad_cut, ix[cand], iy[cand], big)[0].any(axis=(1, 2))
        cand = cand[~dirty]
    counts["clean"] = len(cand)
    if images is not None and len(cand):
        varying = flux_ratio_outliers(*images, x[cand], y[cand], cfg.ratio_clip_sigma, cfg.ratio_floor)
        cand = cand[~varying]
    counts["constant"] = len(cand)
    # at most stars_per_box per box, the highest S/N first
    if len(cand):
        box = (iy[cand] // cfg.star_box_size) * (nx // cfg.star_box_size + 1) + ix[cand] // cfg.star_box_size
        order = np.lexsort((-snr[cand], box))
        cand, box = cand[order], box[order]
        first = np.r_[0, np.flatnonzero(np.diff(box)) + 1]
        rank = np.arange(len(cand)) - np.repeat(first, np.diff(np.r_[first, len(cand)]))
        cand = cand[rank < cfg.stars_per_box]
        if len(cand) > cfg.max_kernel_stars:
            cand = cand[np.argsort(-snr[cand], kind="stable")[: cfg.max_kernel_stars]]
    counts["selected"] = len(cand)
    return cand, ix[cand], iy[cand], snr[cand], counts


def halo_stars(sources, shape, radius: int, min_snr: float = 50.0, neighbour_ratio: float = 0.05):
    """Bright, unflagged sources without a neighbour brighter than ``neighbour_ratio`` of their
    flux within ``radius`` px (their growth curves out to that radius measure the PSF halo):
    (x, y, snr) arrays, at least ``radius + 6`` px from the edge. A fainter neighbour can only
    make the wings look wider, which errs on the safe side (a larger kernel)."""
    from scipy.spatial import cKDTree

    x, y, flux, snr, flagged = source_columns(sources)
    if not np.isfinite(flux).any():
        flux = snr
    ny, nx = shape
    edge = radius + 7
    ok = (np.isfinite(x) & np.isfinite(y) & np.isfinite(snr) & (snr >= min_snr) & ~flagged
          & (x >= edge) & (x < nx - edge) & (y >= edge) & (y < ny - edge))
    located = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if ok.any() and len(located) > 1:
        tree = cKDTree(np.column_stack([x[located], y[located]]))
        pairs = tree.query_pairs(radius, output_type="ndarray")
        if len(pairs):
            i, j = located[pairs[:, 0]], located[pairs[:, 1]]
            fl = np.where(np.isfinite(flux), np.abs(flux), np.inf)
            crowded = np.zeros(len(x), bool)
            crowded[i[fl[j] > neighbour_ratio * fl[i]]] = True
            crowded[j[fl[i] > neighbour_ratio * fl[j]]] = True
            ok &= ~crowded
    return x[ok], y[ok], snr[ok]
