"""PSF star selection (Rubin objectSize-like): clean, isolated, bright, on the stellar locus."""

from __future__ import annotations

import logging
import math

import numpy as np

from apsnake.psf.config import PsfConfig, PsfError

log = logging.getLogger(__name__)


def select_psf_stars(x, y, flux, snr, fwhm_or_size, flags, config: PsfConfig | None = None) -> np.ndarray:
    """Choose PSF stars: clean, isolated, S/N >= ``min_snr`` and on the stellar size locus.

    Rubin objectSize-like: the stellar locus is the mode of the size distribution of the
    clean, isolated, bright candidates (a Gaussian kernel density in log size with a
    bandwidth of ``width_std_allowed / 3``); candidates within ``width_std_allowed``
    (fractional) of the mode are kept and then clipped at ``clip_sigma`` robust sigmas
    (the smaller of the standard deviation and 0.741 IQR) around their median, ``n_iter``
    times. At most ``max_stars`` stars, the highest-S/N ones, are returned.

    Parameters
    ----------
    x, y : array_like
        Positions of all detections, pixels (every detection counts as a neighbour).
    flux : array_like
        Fluxes in any linear unit (for the isolation test only); non-finite fluxes count as
        bright neighbours.
    snr : array_like
        Signal-to-noise ratio of each detection.
    fwhm_or_size : array_like
        Any flux-independent size, pixels (FWHM, Gaussian sigma, ``sqrt((Ixx+Iyy)/2)``).
    flags : array_like of bool
        True for a detection that must not be used (saturated, interpolated, cosmic ray,
        edge, bad centroid, ...).
    config : PsfConfig, optional

    Returns
    -------
    numpy.ndarray of bool
        True for the selected stars (may be empty; ``fit_psf_model`` raises when too few).
    """
    cfg = config or PsfConfig()
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    flux = np.asarray(flux, float).ravel()
    snr = np.asarray(snr, float).ravel()
    size = np.asarray(fwhm_or_size, float).ravel()
    flags = np.asarray(flags, bool).ravel()
    n = len(x)
    if not (len(y) == len(flux) == len(snr) == len(size) == len(flags) == n):
        raise PsfError("select_psf_stars: x, y, flux, snr, size and flags differ in length")
    selected = np.zeros(n, bool)
    if n == 0:
        return selected
    located = np.isfinite(x) & np.isfinite(y)
    good = (~flags & located & np.isfinite(flux) & (flux > 0) & np.isfinite(snr) & (snr >= cfg.min_snr)
            & np.isfinite(size) & (size > 0))

    # Isolation: any neighbour brighter than ratio * flux within the radius disqualifies.
    from scipy.spatial import cKDTree

    idx = np.flatnonzero(located)
    tree = cKDTree(np.column_stack([x[idx], y[idx]]))
    pairs = tree.query_pairs(cfg.isolation_radius, output_type="ndarray")
    if len(pairs):
        i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
        bright = np.where(np.isfinite(flux), flux, np.inf)
        crowded = np.zeros(n, bool)
        crowded[i[bright[j] > cfg.isolation_flux_ratio * flux[i]]] = True
        crowded[j[bright[i] > cfg.isolation_flux_ratio * flux[j]]] = True
        good &= ~crowded
    cand = np.flatnonzero(good)
    if len(cand) == 0:
        return selected

    # Stellar locus: mode of the log-size density, then a clipped band around it.
    logs = np.log(size[cand])
    bw = max(cfg.width_std_allowed / 3.0, 1e-3)
    grid = np.arange(logs.min() - 3 * bw, logs.max() + 3 * bw, bw / 4)
    density = np.zeros(len(grid))
    for start in range(0, len(logs), 4096):
        chunk = logs[start:start + 4096]
        density += np.exp(-0.5 * ((grid[:, None] - chunk[None, :]) / bw) ** 2).sum(axis=1)
    mode = math.exp(grid[np.argmax(density)])
    on_locus = np.abs(size[cand] / mode - 1.0) <= cfg.width_std_allowed
    for _ in range(cfg.n_iter):
        s = size[cand][on_locus]
        if len(s) < 5:
            break
        centre = float(np.median(s))
        q25, q75 = np.percentile(s, [25, 75])
        sd = min(float(np.std(s)), 0.741 * float(q75 - q25))
        if sd <= 0:
            break
        new = on_locus & (np.abs(size[cand] - centre) <= cfg.clip_sigma * sd)
        if np.array_equal(new, on_locus):
            break
        on_locus = new
    chosen = cand[on_locus]
    if len(chosen) > cfg.max_stars:
        chosen = chosen[np.argsort(-snr[chosen], kind="stable")[: cfg.max_stars]]
    selected[chosen] = True
    log.debug("PSF star selection: %d candidates clean and isolated, size mode %.3f, %d selected",
              len(cand), mode, selected.sum())
    return selected
