"""Measurements of DIA sources at their centroids: PSF and aperture fluxes, pixel flags,
adaptive moments, and the local WCS Jacobian.

Fluxes in nJy; moments in pixels^2 (converted to arcsec^2 by the caller); pixel flags from the
difference mask: footprint (any footprint pixel) and ``Center`` (the 3x3 pixels around the
centroid).
"""

from __future__ import annotations

import math

import numpy as np

from apsnake.numerics import cutouts
from apsnake.psf import psf_flux
from apsnake.psf.shift import shift_stack

_FLAG_PLANES = {
    "bad": "BAD", "cr": "CR", "edge": "EDGE", "nodata": "NO_DATA", "interpolated": "INTRP",
    "saturated": "SAT", "suspect": "SUSPECT", "streak": "STREAK", "injected": "INJECTED",
    "injected_template": "INJECTED_TEMPLATE",
}

_CENTER_FLAGS = ("cr", "nodata", "interpolated", "saturated", "suspect", "streak", "injected", "injected_template")

_OPTIONAL_PLANES = ("STREAK", "INJECTED", "INJECTED_TEMPLATE")  # null flags when the plane does not exist

_OFFSETS_3X3 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def psf_photometry(exposure, bad, x, y, calib, prefix):
    """PSF flux (nJy), error, chi2, ndata and flags at (x, y) on one exposure."""
    n = len(x)
    if n == 0:
        e = np.empty(0)
        return {f"{prefix}psfFlux": e, f"{prefix}psfFluxErr": e, f"{prefix}psfChi2": e,
                f"{prefix}psfNdata": np.empty(0, np.int32), f"{prefix}psfFlux_flag": np.empty(0, bool),
                f"{prefix}psfFlux_flag_edge": np.empty(0, bool),
                f"{prefix}psfFlux_flag_noGoodPixels": np.empty(0, bool)}
    flux, err, chi2, ndata = psf_flux(exposure.image, exposure.variance, exposure.psf, x, y, bad)
    ny, nx = exposure.image.shape
    half = exposure.psf.components.shape[-1] // 2
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    edge = (ix - half < 0) | (ix + half > nx - 1) | (iy - half < 0) | (iy + half > ny - 1)
    no_good = ndata == 0
    failed = edge | no_good | ~np.isfinite(flux) | ~np.isfinite(err)
    return {f"{prefix}psfFlux": flux * calib, f"{prefix}psfFluxErr": err * abs(calib), f"{prefix}psfChi2": chi2,
            f"{prefix}psfNdata": ndata.astype(np.int32), f"{prefix}psfFlux_flag": failed,
            f"{prefix}psfFlux_flag_edge": edge, f"{prefix}psfFlux_flag_noGoodPixels": no_good}


def peak_excess_sigma(exposure, x, y, flux, flux_err, model_tolerance: float = 0.2) -> np.ndarray:
    """How much brighter than its PSF flux predicts the brightest of the 3x3 pixels around a
    source's centroid is, in sigma.

    Per pixel ``(d - f P) / sqrt(var + (P f_err)^2 + (model_tolerance P f)^2)``, with ``f`` the
    PSF flux and ``f_err`` its error (image unit) and ``P`` the PSF model's value there
    (unit-sum stamp, shifted to the centroid), signed so that positive means sharper than the
    PSF for either sign of ``f``; the largest of the 3x3 (a two-pixel cosmic ray's centroid
    falls between its pixels). A point source gives the maximum of nine ~N(0, 1) values (the
    tolerance covers PSF-model errors at bright cores); a cosmic ray one or two pixels wide,
    whose PSF flux is about twice its flux, puts 15-50 % of that PSF flux in one pixel where a
    PSF puts 3-15 % (FWHM 4-2.5 px): several sigma even at S/N 5. NaN where undefined.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    out = np.full(len(x), np.nan)
    ny, nx = exposure.image.shape
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    ok = (np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (np.asarray(flux) != 0)
          & (ix >= 1) & (ix < nx - 1) & (iy >= 1) & (iy < ny - 1))
    if not ok.any():
        return out
    idx = np.flatnonzero(ok)
    half = exposure.psf.components.shape[-1] // 2
    model = shift_stack(exposure.psf.evaluate_many(x[idx], y[idx]), -(x[idx] - ix[idx]), -(y[idx] - iy[idx]))
    centre = model[:, half - 1:half + 2, half - 1:half + 2]
    f = np.asarray(flux, float)[idx][:, None, None]
    fe = np.asarray(flux_err, float)[idx][:, None, None]
    rows = iy[idx][:, None, None] + np.arange(-1, 2)[None, :, None]
    cols = ix[idx][:, None, None] + np.arange(-1, 2)[None, None, :]
    observed = exposure.image[rows, cols].astype(float)
    expected = f * centre
    noise = np.sqrt(exposure.variance[rows, cols].astype(float) + (centre * fe) ** 2 + (model_tolerance * expected) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = np.sign(f) * (observed - expected) / noise
    out[idx] = np.where(np.isfinite(excess), excess, -np.inf).max(axis=(1, 2))
    return out


def aperture_photometry(image, variance, bad, x, y, radius, calib):
    """Circular-aperture flux (nJy) with sep; masked pixels excluded and flagged."""
    import sep

    n = len(x)
    if n == 0:
        e = np.empty(0)
        return {"apFlux": e, "apFluxErr": e, "apFlux_flag": np.empty(0, bool),
                "apFlux_flag_apertureTruncated": np.empty(0, bool)}
    ny, nx = image.shape
    # Work in a box around the sources only (sep needs clean arrays; this avoids full-image copies).
    r = int(math.ceil(radius)) + 2
    x0, x1 = max(int(np.floor(x.min())) - r, 0), min(int(np.ceil(x.max())) + r + 1, nx)
    y0, y1 = max(int(np.floor(y.min())) - r, 0), min(int(np.ceil(y.max())) + r + 1, ny)
    if x1 <= x0 or y1 <= y0:
        nan = np.full(n, np.nan)
        return {"apFlux": nan, "apFluxErr": nan, "apFlux_flag": np.ones(n, bool),
                "apFlux_flag_apertureTruncated": np.ones(n, bool)}
    sub_bad = np.ascontiguousarray(bad[y0:y1, x0:x1])
    # float32: sep sums pixels in single precision whatever it is given, so float64 copies of
    # a CCD-sized box (the sources spread over the whole image) would only cost time.
    data = np.ascontiguousarray(np.where(sub_bad, np.float32(0), image[y0:y1, x0:x1]), np.float32)
    err = np.ascontiguousarray(np.sqrt(np.where(sub_bad, np.float32(0), variance[y0:y1, x0:x1])), np.float32)
    flux, ferr, flag = sep.sum_circle(data, x - x0, y - y0, radius, err=err, mask=sub_bad, subpix=5)
    truncated = (x - radius < -0.5) | (x + radius > nx - 0.5) | (y - radius < -0.5) | (y + radius > ny - 0.5)
    failed = truncated | ((flag & sep.APER_HASMASKED) != 0) | ~np.isfinite(flux)
    return {"apFlux": flux * calib, "apFluxErr": ferr * abs(calib), "apFlux_flag": failed,
            "apFlux_flag_apertureTruncated": truncated}


def _center_values(mask, x, y):
    ny, nx = mask.shape
    xi = np.clip(np.floor(x + 0.5).astype(int), 0, nx - 1)
    yi = np.clip(np.floor(y + 0.5).astype(int), 0, ny - 1)
    return np.stack([mask[np.clip(yi + dy, 0, ny - 1), np.clip(xi + dx, 0, nx - 1)] for dy, dx in _OFFSETS_3X3])


def center_planes(exposure, x, y, any_planes, all_planes):
    """Per source: any of ``any_planes`` in the 3x3 centre; all 3x3 pixels in one of ``all_planes``."""
    if len(x) == 0:
        return np.empty(0, bool), np.empty(0, bool)
    values = _center_values(exposure.mask, x, y)
    bits_any = exposure.bits(*any_planes)
    hit_any = ((values & bits_any) != 0).any(axis=0) if bits_any else np.zeros(len(x), bool)
    hit_all = np.zeros(len(x), bool)
    for plane in all_planes:
        bit = exposure.bits(plane)
        if bit:
            hit_all |= ((values & bit) != 0).all(axis=0)
    return hit_any, hit_all


def pixel_flags(exposure, labels, fp_idx, fp_lab, n, x, y, cfg):
    """pixelFlags_* (footprint and 3x3 centre) and the detectAndMeasure drop masks."""
    ny, nx = exposure.shape
    out = {}
    mask_fp = exposure.mask.ravel()[fp_idx]
    values = _center_values(exposure.mask, x, y) if n else np.empty((9, 0), np.int32)
    for name, plane in _FLAG_PLANES.items():
        if plane in _OPTIONAL_PLANES and plane not in exposure.mask_planes:
            out[f"pixelFlags_{name}"] = np.full(n, None, dtype=object)
            if name in _CENTER_FLAGS:
                out[f"pixelFlags_{name}Center"] = np.full(n, None, dtype=object)
            continue
        bit = exposure.bits(plane)
        counts = np.bincount(fp_lab, weights=(mask_fp & bit) != 0, minlength=n + 1)[1:] if bit else np.zeros(n)
        out[f"pixelFlags_{name}"] = counts > 0
        if name in _CENTER_FLAGS:
            out[f"pixelFlags_{name}Center"] = ((values & bit) != 0).any(axis=0) if bit else np.zeros(n, bool)
    off = (x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)
    out["pixelFlags_offimage"] = off
    out["pixelFlags_edge"] = out["pixelFlags_edge"] | off
    drop_any, drop_all = center_planes(exposure, x, y, cfg.drop_center_any, cfg.drop_center_all)
    return out, drop_any, drop_all


def _adaptive_moments(stamps, valid, fx, fy, sigma0, n_iter=40, tol=1e-5):
    """Adaptive (Gaussian-weighted, elliptical) second moments of (N, n, n) stamps.

    The weight is a Gaussian centred on (fx, fy) (offsets from the central pixel) whose
    covariance is iterated to twice the weighted moments, so that it converges on the
    covariance of a Gaussian source (SdssShape's fixed point). Returns mxx, myy, mxy
    (pixels^2) and ``ok`` (converged, positive definite, not larger than the stamp).
    """
    n_src, n, _ = stamps.shape
    if n_src == 0:
        e = np.empty(0)
        return e, e, e, np.empty(0, bool)
    grid = np.arange(n) - n // 2
    ex = grid[None, None, :] - fx[:, None, None]
    ey = grid[None, :, None] - fy[:, None, None]
    data = np.where(valid, stamps, 0.0)
    mxx = np.full(n_src, sigma0 ** 2)
    myy = mxx.copy()
    mxy = np.zeros(n_src)
    ok = np.ones(n_src, bool)
    converged = np.zeros(n_src, bool)
    limit = (n / 2.0) ** 2
    for _ in range(n_iter):
        det = mxx * myy - mxy ** 2
        good_det = det > 0
        ok &= good_det
        safe = np.where(good_det, det, 1.0)
        ixx, iyy, ixy = myy / safe, mxx / safe, -mxy / safe
        w = np.exp(-0.5 * np.clip(ixx[:, None, None] * ex ** 2 + 2 * ixy[:, None, None] * ex * ey
                                  + iyy[:, None, None] * ey ** 2, 0, 200))
        wi = w * data
        s0 = wi.sum(axis=(1, 2))
        ok &= s0 > 0
        s0 = np.where(s0 > 0, s0, 1.0)
        qxx = (wi * ex ** 2).sum(axis=(1, 2)) / s0
        qyy = (wi * ey ** 2).sum(axis=(1, 2)) / s0
        qxy = (wi * ex * ey).sum(axis=(1, 2)) / s0
        nxx, nyy, nxy = 2 * qxx, 2 * qyy, 2 * qxy
        pd = (nxx > 0) & (nyy > 0) & (nxx * nyy - nxy ** 2 > 0) & (nxx < limit) & (nyy < limit)
        ok &= pd
        change = np.abs(nxx - mxx) + np.abs(nyy - myy) + 2 * np.abs(nxy - mxy)
        upd = ok & ~converged
        mxx, myy, mxy = np.where(upd, nxx, mxx), np.where(upd, nyy, myy), np.where(upd, nxy, mxy)
        converged |= ok & (change < tol * (nxx + nyy))
        if (converged | ~ok).all():
            break
    ok &= converged
    return mxx, myy, mxy, ok


def shapes(exposure, bad, x, y, sign, sigma, scale_arcsec, slices, cfg):
    """Adaptive moments of the source (difference image, sign of the dominant lobe) and of the
    PSF model at the same position, in arcsec^2."""
    n = len(x)
    keys = ("ixx", "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF")
    if n == 0:
        out = {k: np.empty(0) for k in keys}
        out.update({"shape_flag": np.empty(0, bool), "shape_flag_no_pixels": np.empty(0, bool),
                    "shape_flag_not_contained": np.empty(0, bool)})
        return out
    half = cfg.moments_half_size
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    fx, fy = x - ix, y - iy
    data, inside = cutouts(exposure.image, ix, iy, half)
    badc, _ = cutouts(bad, ix, iy, half, fill=True)
    valid = inside & ~badc
    stamps = sign[:, None, None] * np.where(valid, data, 0.0).astype(float)
    mxx, myy, mxy, ok = _adaptive_moments(stamps, valid, fx, fy, sigma)
    no_pixels = ~valid.any(axis=(1, 2))
    # PSF: the model at the position, shifted like the source (stamp centre + fractional offset).
    psf_stamps = exposure.psf.evaluate_many(x, y)
    size = psf_stamps.shape[-1]
    if size < 2 * half + 1:
        pad = half - size // 2
        psf_stamps = np.pad(psf_stamps, ((0, 0), (pad, pad), (pad, pad)))
    elif size > 2 * half + 1:
        cut = size // 2 - half
        psf_stamps = psf_stamps[:, cut:cut + 2 * half + 1, cut:cut + 2 * half + 1]
    zero = np.zeros(n)
    pxx, pyy, pxy, pok = _adaptive_moments(psf_stamps, np.ones(psf_stamps.shape, bool), zero, zero, sigma)
    s2 = scale_arcsec ** 2
    nan = np.nan
    contained = np.array([(s[1].start - 0.5 <= xx <= s[1].stop - 0.5) and (s[0].start - 0.5 <= yy <= s[0].stop - 0.5)
                          for s, xx, yy in zip(slices, x, y)], bool)
    return {
        "ixx": np.where(ok, mxx * s2, nan), "iyy": np.where(ok, myy * s2, nan), "ixy": np.where(ok, mxy * s2, nan),
        "ixxPSF": np.where(pok, pxx * s2, nan), "iyyPSF": np.where(pok, pyy * s2, nan),
        "ixyPSF": np.where(pok, pxy * s2, nan),
        "shape_flag": ~ok | no_pixels, "shape_flag_no_pixels": no_pixels, "shape_flag_not_contained": ~contained,
    }


def local_jacobian(wcs, x, y):
    """Sky coordinates and the local Jacobian d(xi, eta)/d(x, y) in deg/pixel, where
    xi = RA cos(Dec) (east) and eta = Dec (north)."""
    h = 0.5
    xs = np.concatenate([x, x + h, x - h, x, x])
    ys = np.concatenate([y, y, y, y + h, y - h])
    ra_all, dec_all = wcs.all_pix2world(xs, ys, 0)
    n = len(x)
    ra, dec = ra_all[:n], dec_all[:n]
    ra_all = ra_all.reshape(5, n)
    dec_all = dec_all.reshape(5, n)
    cosd = np.cos(np.radians(dec))

    def dra(a, b):
        return ((a - b + 180.0) % 360.0) - 180.0

    j = np.empty((n, 2, 2))
    j[:, 0, 0] = dra(ra_all[1], ra_all[2]) * cosd / (2 * h)
    j[:, 1, 0] = (dec_all[1] - dec_all[2]) / (2 * h)
    j[:, 0, 1] = dra(ra_all[3], ra_all[4]) * cosd / (2 * h)
    j[:, 1, 1] = (dec_all[3] - dec_all[4]) / (2 * h)
    return np.mod(ra, 360.0), dec, j
