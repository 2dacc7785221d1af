"""The PSFEx-like spatially varying pixel-basis PSF model, fitted to PSF stars.

The model is ``apsnake.exposure.PsfModel``: pixel-basis components combined by a 2-D
polynomial in scaled pixel coordinates (docs/algorithms.md, PSF model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from apsnake.exposure import PsfModel
from apsnake.numerics import SIGMA_TO_FWHM, cutouts, mad_sigma, n_terms, polynomial_terms
from apsnake.psf.config import PsfConfig, PsfError
from apsnake.psf.measure import measure_fwhm, windowed_centroid
from apsnake.psf.photometry import linear_flux
from apsnake.psf.shift import MASK_SPREAD, shift_matrices, shift_stack, spread_mask, spread_matrices

log = logging.getLogger(__name__)

_STAMP_MARGIN = 3  # extra pixels around the stamps cut for recentring


@dataclass
class PsfFit:
    """The result of ``fit_psf``.

    Attributes
    ----------
    model : PsfModel
        The fitted model.
    used : numpy.ndarray of bool
        Per input star: kept in the final fit (Rubin ``calib_psf_used``).
    x, y : numpy.ndarray
        Refined (Gaussian-windowed) centroids of the input stars, pixels; NaN where unusable.
    flux : numpy.ndarray
        PSF-fit flux of each input star inside the stamp, image unit; NaN where unusable.
    chi2_dof : numpy.ndarray
        Reduced chi2 of each star against the final model within ``2 * FWHM`` of its centre
        (pixel noise only); NaN where unusable.
    spatial_order : int
        The spatial order actually fitted.
    """

    model: PsfModel
    used: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    chi2_dof: np.ndarray
    spatial_order: int


def _fit_components(recentred, weights, terms):
    """Per-pixel weighted least squares of the normalised stamps on the polynomial terms.

    recentred: (N, n, n) stamps / flux; weights: (N, n, n); terms: (N, K).
    Returns (K, n, n) components.
    """
    n_stars, n_terms = terms.shape
    side = recentred.shape[-1]
    w = weights.reshape(n_stars, -1)
    yv = recentred.reshape(n_stars, -1)
    outer = (terms[:, :, None] * terms[:, None, :]).reshape(n_stars, n_terms * n_terms)
    a = (w.T @ outer).reshape(-1, n_terms, n_terms)
    b = (w * yv).T @ terms
    scale = np.trace(a, axis1=1, axis2=2) / n_terms
    ridge = 1e-10 * np.where(scale > 0, scale, 1.0)
    a = a + ridge[:, None, None] * np.eye(n_terms)[None]
    coeffs = np.linalg.solve(a, b[:, :, None])[:, :, 0]
    coeffs[scale <= 0] = 0.0
    return coeffs.T.reshape(n_terms, side, side)


def fit_psf(image, variance, bad, x, y, config: PsfConfig | None = None) -> PsfFit:
    """Fit a PSFEx-like spatially varying pixel-basis PSF to stars.

    Method
    ------
    1. ``stamp_size`` (+ 3 px margin) cutouts around each star; stars whose stamp leaves the
       image or that have a bad pixel within one FWHM of the centre are dropped.
    2. Centroids refined to sub-pixel accuracy with a Gaussian window of the stars' median
       FWHM (measured on the median of the peak-normalised stamps).
    3. Each stamp is recentred by a sinc (Fourier) shift to put the centroid on the central
       pixel; bad pixels (and, from the second pass, pixels deviating by more than
       ``pixel_clip`` sigma) are replaced by the current model, and a pixel next to one
       (|Lanczos-3| weight >= 5 %) gets no weight.
    4. The stamps are normalised to unit flux (first pass: the sum within 3 FWHM; then the
       PSF-fit flux of the current model) and, pixel by pixel, a polynomial of order
       ``spatial_order`` in ``u = (x - x0) / scale``, ``v = (y - y0) / scale`` (image
       centre, half the longer side) is fitted by least squares with weights
       ``flux^2 / (var + (accuracy * flux * model)^2)`` (S/N-squared weighting).
    5. The model, shifted back to each star's sub-pixel position, is fitted to the star
       (``psf_flux``); stars whose reduced chi2 within 2 FWHM (including the ``accuracy``
       term) is above the median by more than ``clip_sigma`` robust sigmas are rejected;
       steps 3-5 repeat ``n_iter`` times and a final fit uses the survivors.

    Parameters
    ----------
    image : numpy.ndarray
        Background-subtracted image (rows, columns), any linear unit.
    variance : numpy.ndarray
        Variance of ``image``, image unit squared.
    bad : numpy.ndarray of bool or None
        Pixels not to use (BAD, SAT, CR, NO_DATA, ...).
    x, y : array_like
        Positions of the PSF stars (``select_psf_stars``), pixels, 0-based column and row.
    config : PsfConfig, optional

    Returns
    -------
    PsfFit
        The model (``fwhm_pixels``: median over the used stars of ``measure_fwhm`` of the
        model at their positions) and per-star diagnostics.

    Raises
    ------
    PsfError
        When fewer than ``min_stars`` stars are usable.
    """
    cfg = config or PsfConfig()
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or variance.shape != image.shape:
        raise PsfError(f"image and variance must be 2-D of one shape, got {image.shape} and {variance.shape}")
    ny, nx = image.shape
    bad = np.zeros(image.shape, bool) if bad is None else np.asarray(bad, bool)
    x_in = np.atleast_1d(np.asarray(x, float)).ravel()
    y_in = np.atleast_1d(np.asarray(y, float)).ravel()
    n_in = len(x_in)
    side = cfg.stamp_size
    half = side // 2
    margin = _STAMP_MARGIN
    big = half + margin
    inner = slice(margin, margin + side)

    def need(n_ok, why):
        if n_ok < cfg.min_stars:
            raise PsfError(f"only {n_ok} usable PSF stars ({why}); at least min_stars={cfg.min_stars} needed")

    keep = np.isfinite(x_in) & np.isfinite(y_in)
    ix = np.floor(np.where(keep, x_in, 0) + 0.5).astype(int)
    iy = np.floor(np.where(keep, y_in, 0) + 0.5).astype(int)
    keep &= (ix - big - 1 >= 0) & (ix + big + 1 < nx) & (iy - big - 1 >= 0) & (iy + big + 1 < ny)
    need(int(keep.sum()), f"of {n_in} given, others too close to the edge")
    src = np.flatnonzero(keep)

    def extract(ixs, iys):
        d, _ = cutouts(image, ixs, iys, big)
        v, _ = cutouts(variance, ixs, iys, big)
        b, _ = cutouts(bad, ixs, iys, big)
        d = d.astype(float)
        v = v.astype(float)
        b = b | ~np.isfinite(d) | ~np.isfinite(v) | ~(v > 0)
        return np.where(b, 0.0, d), np.where(b, 0.0, v), b

    # Initial width from the median peak-normalised stamp; windowed centroids.
    data, var, badpix = extract(ix[src], iy[src])
    peaks = data[:, big, big]
    usable = peaks > 0
    need(int(usable.sum()), "no positive central pixel")
    stack = np.median(data[usable] / peaks[usable, None, None], axis=0)
    fwhm0 = measure_fwhm(stack)
    if not np.isfinite(fwhm0) or fwhm0 <= 0:
        raise PsfError("cannot measure the width of the PSF stars")
    sigma_w = max(fwhm0 / SIGMA_TO_FWHM, 0.5)
    start_dx, start_dy = x_in[src] - ix[src], y_in[src] - iy[src]
    shifted = shift_stack(data, start_dx, start_dy)
    shifted_ok = ~spread_mask(badpix, start_dx, start_dy)
    dx, dy, _, _, _, ok = windowed_centroid(shifted, shifted_ok, sigma_w)
    xs = x_in[src] + dx
    ys = y_in[src] + dy
    ix_s = np.floor(xs + 0.5).astype(int)
    iy_s = np.floor(ys + 0.5).astype(int)
    ok &= (ix_s - big >= 0) & (ix_s + big < nx) & (iy_s - big >= 0) & (iy_s + big < ny)
    src, xs, ys, ix_s, iy_s = src[ok], xs[ok], ys[ok], ix_s[ok], iy_s[ok]
    need(len(src), "centroids failed")

    data, var, badpix = extract(ix_s, iy_s)
    grid = np.arange(-big, big + 1)
    r2 = grid[None, :] ** 2 + grid[:, None] ** 2
    clean_core = ~(badpix & (r2 <= fwhm0**2)[None]).any(axis=(1, 2))
    src, xs, ys = src[clean_core], xs[clean_core], ys[clean_core]
    data, var, badpix = data[clean_core], var[clean_core], badpix[clean_core]
    need(len(src), "bad pixels in their cores")
    n = len(src)
    dx, dy = xs - np.floor(xs + 0.5), ys - np.floor(ys + 0.5)

    # Fixed per-star resampling matrices: recentring (big stamps) and back to the star (stamp).
    rec_y, rec_x = shift_matrices(2 * big + 1, dy), np.swapaxes(shift_matrices(2 * big + 1, dx), 1, 2)
    back_y, back_x = shift_matrices(side, -dy), np.swapaxes(shift_matrices(side, -dx), 1, 2)
    spread_y = spread_matrices(2 * big + 1, dy)
    spread_x = np.swapaxes(spread_matrices(2 * big + 1, dx), 1, 2)

    x0, y0, scale = (nx - 1) / 2.0, (ny - 1) / 2.0, max(nx, ny) / 2.0
    u, v = (xs - x0) / scale, (ys - y0) / scale
    r2_stamp = r2[inner, inner]
    ap_mask = (r2_stamp <= (3 * fwhm0) ** 2)[None]
    core_mask = (r2_stamp <= (2 * fwhm0) ** 2)[None]
    data_n, var_n = data[:, inner, inner], var[:, inner, inner]
    bad_n = badpix[:, inner, inner]

    use = np.ones(n, bool)
    clipped = badpix.copy()       # pixels replaced by the model (bad or outliers), big stamps
    fill = np.zeros_like(data)    # current model prediction in each big stamp
    flux = None
    model_centred = None
    order = cfg.spatial_order
    chi2_dof = np.full(n, np.nan)
    psf = None
    for iteration in range(cfg.n_iter + 1):
        order = cfg.spatial_order
        while order > 0 and use.sum() < cfg.min_stars_per_term * n_terms(order):
            order -= 1
        recentred = (rec_y @ np.where(clipped, fill, data) @ rec_x)[:, inner, inner]
        weight_ok = (spread_y @ clipped.astype(float) @ spread_x)[:, inner, inner] < MASK_SPREAD
        if iteration == 0:
            recentred_bad = (spread_y @ badpix.astype(float) @ spread_x)[:, inner, inner] > 0
            flux = np.where(ap_mask & ~recentred_bad, recentred, 0.0).sum(axis=(1, 2))
            use &= flux > 0
            need(int(use.sum()), "no positive flux")
            model_term = 0.0
        else:
            model_term = (cfg.accuracy * flux[:, None, None] * model_centred) ** 2
        safe_flux = np.where(use, flux, 1.0)
        normed = recentred / safe_flux[:, None, None]
        weights = np.where(weight_ok & use[:, None, None],
                           safe_flux[:, None, None] ** 2 / (var_n + model_term + 1e-300), 0.0)
        weights = np.where(var_n > 0, weights, 0.0)
        terms = polynomial_terms(order, u, v)
        components = _fit_components(normed, weights, terms)
        psf = PsfModel(components=components.astype(np.float32), spatial_order=order, x0=x0, y0=y0, scale=scale)
        model_centred = psf.evaluate_many(xs, ys)
        model_native = back_y @ model_centred @ back_x

        # Star fluxes and chi2 on the pixels not flagged bad from the start.
        f_all, _, _, _ = linear_flux(data_n, var_n, ~bad_n, model_native)
        _, _, chi2, ndata = linear_flux(data_n, var_n, ~bad_n & core_mask, model_native, cfg.accuracy)
        chi2_dof = chi2 / np.maximum(ndata - 1, 1)
        if iteration == cfg.n_iter:
            break
        flux = np.where(np.isfinite(f_all), f_all, 0.0)
        use &= flux > 0
        ref = chi2_dof[use]
        if len(ref) > cfg.min_stars:
            limit = np.median(ref) + cfg.clip_sigma * max(mad_sigma(ref), 1e-3)
            worst = np.flatnonzero(use & (chi2_dof > limit))
            spare = int(use.sum()) - cfg.min_stars
            if len(worst) > spare:  # never go below min_stars: drop the worst ones first
                worst = worst[np.argsort(-chi2_dof[worst])[:max(spare, 0)]]
            use[worst] = False
        need(int(use.sum()), "rejected as outliers")
        # Pixel outliers (cosmic rays, neighbours) and the model to fill masked pixels with.
        prediction = flux[:, None, None] * model_native
        z = (data_n - prediction) / np.sqrt(var_n + (cfg.accuracy * prediction) ** 2 + 1e-300)
        clipped[:, inner, inner] |= (np.abs(z) > cfg.pixel_clip) & (var_n > 0)
        fill[:, inner, inner] = prediction

    fwhm_stars = measure_fwhm(model_centred[use])
    psf.fwhm_pixels = float(np.nanmedian(fwhm_stars))
    log.info("PSF model: %d of %d stars used, spatial order %d, median FWHM %.3f px, median chi2/dof %.2f",
             int(use.sum()), n_in, order, psf.fwhm_pixels, float(np.nanmedian(chi2_dof[use])))

    used_all = np.zeros(n_in, bool)
    used_all[src[use]] = True
    out = {name: np.full(n_in, np.nan) for name in ("x", "y", "flux", "chi2")}
    out["x"][src], out["y"][src] = xs, ys
    out["flux"][src] = f_all
    out["chi2"][src] = chi2_dof
    return PsfFit(model=psf, used=used_all, x=out["x"], y=out["y"], flux=out["flux"], chi2_dof=out["chi2"],
                  spatial_order=order)


def fit_psf_model(image, variance, bad, x, y, config: PsfConfig | None = None) -> PsfModel:
    """Fit the PSF model to the given stars; ``fit_psf(...).model`` (see ``fit_psf``).

    Parameters
    ----------
    image : numpy.ndarray
        Background-subtracted image, any linear unit.
    variance : numpy.ndarray
        Its variance, image unit squared.
    bad : numpy.ndarray of bool or None
        Pixels not to use.
    x, y : array_like
        PSF star positions, pixels (0-based column, row).
    config : PsfConfig, optional

    Returns
    -------
    PsfModel
        ``evaluate(x, y)`` gives the unit-sum PSF centred on the stamp centre at (x, y).

    Raises
    ------
    PsfError
        When fewer than ``min_stars`` stars are usable.
    """
    return fit_psf(image, variance, bad, x, y, config).model
