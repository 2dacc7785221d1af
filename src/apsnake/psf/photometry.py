"""PSF photometry at fixed positions (Rubin PsfFlux), vectorised over sources."""

from __future__ import annotations

import numpy as np

from apsnake.exposure import PsfModel
from apsnake.numerics import cutouts
from apsnake.psf.config import PsfError
from apsnake.psf.shift import shift_stack


def linear_flux(data, variance, valid, model, accuracy=0.0):
    """PSF-weighted linear flux of (N, n, n) stacks.

    flux = sum(P d) / sum(P^2); err = sqrt(sum(P^2 var)) / sum(P^2) (Rubin PsfFlux);
    chi2 = sum((d - flux P)^2 / (var + (accuracy flux P)^2)); ndata = number of valid pixels.
    """
    p = np.where(valid, model, 0.0)
    d = np.where(valid, data, 0.0)
    v = np.where(valid, variance, 0.0)
    alpha = (p * p).sum(axis=(1, 2))
    ndata = valid.sum(axis=(1, 2))
    ok = (alpha > 0) & (ndata > 0)
    safe = np.where(ok, alpha, 1.0)
    flux = (p * d).sum(axis=(1, 2)) / safe
    err = np.sqrt((p * p * v).sum(axis=(1, 2))) / safe
    resid = d - flux[:, None, None] * p
    total_var = v + (accuracy * flux[:, None, None] * p) ** 2
    chi2 = np.where(valid, resid**2 / np.where(valid, total_var, 1.0), 0.0).sum(axis=(1, 2))
    nan = np.full(len(flux), np.nan)
    return (np.where(ok, flux, nan), np.where(ok, err, nan), np.where(ok, chi2, nan), ndata)


def psf_flux(image, variance, psf: PsfModel, x, y, bad=None, *, radius: float | None = None,
             chunk: int = 2048):
    """Linear PSF-fit flux at fixed positions (forced PSF photometry), vectorised.

    For each position the model is evaluated there (unit sum over its stamp), shifted by the
    sub-pixel offset ``(x - round(x), y - round(y))`` with sinc interpolation and fitted
    to the pixels of the stamp around ``(round(x), round(y))`` as Rubin's PsfFlux does:
    ``flux = sum(P d) / sum(P^2)``, ``flux_err = sqrt(sum(P^2 var)) / sum(P^2)`` (unbiased
    for bright sources, whose variance includes their own Poisson noise). Pixels off the
    image, flagged ``bad``, or with a non-finite value or non-positive variance are left out.

    Parameters
    ----------
    image : numpy.ndarray
        Background-subtracted image (rows, columns), any linear unit.
    variance : numpy.ndarray
        Its variance, image unit squared.
    psf : PsfModel
        The PSF model.
    x, y : array_like
        Positions, pixels (0-based column, row); scalars or arrays of one shape.
    bad : numpy.ndarray of bool, optional
        Pixels not to use.
    radius : float, optional
        Only pixels within this distance of (x, y), pixels, are fitted (default: the stamp).
    chunk : int
        Positions processed together (memory: about 100 * chunk * stamp_size^2 bytes).

    Returns
    -------
    flux : numpy.ndarray
        PSF flux, image unit (the flux of the PSF model within its stamp); NaN without data.
    flux_err : numpy.ndarray
        1-sigma error of ``flux``, image unit.
    chi2 : numpy.ndarray
        ``sum((d - flux P)^2 / var)`` over the fitted pixels.
    ndata : numpy.ndarray of int
        Number of fitted pixels (reduced chi2 = chi2 / (ndata - 1)).
    """
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or variance.shape != image.shape:
        raise PsfError(f"image and variance must be 2-D of one shape, got {image.shape} and {variance.shape}")
    x_arr, y_arr = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    shape = x_arr.shape
    xf, yf = x_arr.ravel(), y_arr.ravel()
    n = len(xf)
    flux = np.full(n, np.nan)
    err = np.full(n, np.nan)
    chi2 = np.full(n, np.nan)
    ndata = np.zeros(n, int)
    side = psf.components.shape[-1]
    half = side // 2
    bad_arr = None if bad is None else np.asarray(bad, bool)
    grid = np.arange(-half, half + 1)
    finite = np.flatnonzero(np.isfinite(xf) & np.isfinite(yf))
    for start in range(0, len(finite), chunk):
        idx = finite[start:start + chunk]
        px, py = xf[idx], yf[idx]
        ix, iy = np.floor(px + 0.5).astype(int), np.floor(py + 0.5).astype(int)
        data, inside = cutouts(image, ix, iy, half)
        var, _ = cutouts(variance, ix, iy, half)
        data, var = data.astype(float), var.astype(float)
        valid = inside & np.isfinite(data) & np.isfinite(var) & (var > 0)
        if bad_arr is not None:
            b, _ = cutouts(bad_arr, ix, iy, half)
            valid &= ~b
        dx, dy = px - ix, py - iy
        if radius is not None:
            rr = ((grid[None, None, :] - dx[:, None, None]) ** 2 + (grid[None, :, None] - dy[:, None, None]) ** 2)
            valid &= rr <= radius**2
        model = shift_stack(psf.evaluate_many(px, py), -dx, -dy)
        f, e, c, nd = linear_flux(data, var, valid, model)
        flux[idx], err[idx], chi2[idx], ndata[idx] = f, e, c, nd
    return flux.reshape(shape), err.reshape(shape), chi2.reshape(shape), ndata.reshape(shape)
