"""One data ID's QA numbers, read from its products.

Only what is needed is read: the calexp through ``read_exposure(memmap=True)`` (headers, WCS,
PSF model, and of its pixels only a small box of the VARIANCE plane at the CCD centre); the
diffexp JSON; one column of the diaSrc table; the fake table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from apsnake.completeness import fit_completeness
from apsnake.exposure import read_exposure
from apsnake.numerics import mad_sigma
from apsnake.photometry import AB_NJY_ZERO_POINT
from apsnake.sphere import pixel_scale_arcsec

#: Half side of the central box whose median variance is used for the limiting magnitude, px.
DEPTH_BOX_HALF = 32


def limiting_flux(psf, variance, nsigma: float = 5.0) -> float:
    """The flux (image units) of a point source detected at ``nsigma`` by PSF photometry.

    ``f = nsigma / sqrt(sum(P^2 / V))`` with ``P`` the PSF normalised to unit sum and ``V`` the
    per-pixel variance (an array of the PSF's shape, or one number for a flat background):
    the optimal (PSF-weighted) flux error is ``1 / sqrt(sum(P^2 / V))``.
    """
    p = np.asarray(psf, float)
    p = p / p.sum()
    v = np.broadcast_to(np.asarray(variance, float), p.shape)
    weight = np.sum(p * p / v)
    if not (np.isfinite(weight) and weight > 0):
        return float("nan")
    return float(nsigma / math.sqrt(weight))


def magnitude(flux_njy) -> float:
    """AB magnitude of a flux in nJy (NaN for a flux that is not positive)."""
    flux = float(flux_njy)
    return -2.5 * math.log10(flux) + AB_NJY_ZERO_POINT if flux > 0 and math.isfinite(flux) else float("nan")


def _number(header, key) -> float:
    value = header.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def calexp_metrics(path: str | Path, nsigma: float = 5.0) -> dict:
    """Band, time, seeing, zero point, sky, astrometric rms and PSF depth of one calexp.

    Keys: band, midpointMjdTai (MJD TAI), fwhm_pix, seeing_arcsec (FWHM at the CCD centre
    times the WCS pixel scale), zero_point_mag (ZP: AB magnitude of 1 ADU), sky_level_adu,
    astrometry_rms_mas, limiting_mag (``nsigma`` PSF detection at the CCD centre, AB).
    The pixels read are the PSF HDU and a 64 x 64 box of the VARIANCE plane.
    """
    calexp = read_exposure(path, memmap=True)
    meta, info = calexp.metadata, calexp.visit_info
    ny, nx = calexp.shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    limiting = float("nan")
    if calexp.psf is not None:
        half = DEPTH_BOX_HALF
        iy, ix = int(round(yc)), int(round(xc))
        box = np.asarray(calexp.variance[max(iy - half, 0):iy + half, max(ix - half, 0):ix + half], float)
        good = box[np.isfinite(box) & (box > 0)]
        if good.size:
            # The median: a star or cosmic ray in the box must not change the depth.
            flux = limiting_flux(calexp.psf.evaluate(xc, yc), float(np.median(good)), nsigma)
            calibration = calexp.photo_calib.calibration if calexp.photo_calib is not None else 1.0
            limiting = magnitude(flux * calibration)
    fwhm = _number(meta, "FWHM")
    scale = pixel_scale_arcsec(calexp.wcs, calexp.shape) if calexp.wcs is not None else float("nan")
    return {
        "band": str(info.band or "").strip(),
        "midpointMjdTai": float(info.mjd_mid_tai) if info.mjd_mid_tai is not None else float("nan"),
        "fwhm_pix": fwhm,
        "seeing_arcsec": fwhm * scale,
        "zero_point_mag": _number(meta, "ZP"),
        "sky_level_adu": _number(meta, "SKYLEV"),
        "astrometry_rms_mas": _number(meta, "ASTRMS"),
        "limiting_mag": limiting,
    }


def diffim_metrics(path: str | Path) -> dict:
    """Kernel-fit quality and skip state from a diffexp JSON (docs/formats.md §7.3).

    Keys: skipped (bool), skip_reason (None unless skipped), template_coverage,
    kernel_residual_std, n_kernel_stars, kernel_sum (NaN / None when absent, e.g. skipped).
    """
    meta = json.loads(Path(path).read_text())
    skipped = bool(meta.get("skipped", False))

    def num(key):
        value = meta.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")

    n_stars = meta.get("n_kernel_stars")
    return {
        "skipped": skipped,
        "skip_reason": (str(meta.get("reason") or "skipped") if skipped else None),
        "template_coverage": num("template_coverage"),
        "kernel_residual_std": num("kernel_residual_std"),
        "n_kernel_stars": int(n_stars) if isinstance(n_stars, int) and not isinstance(n_stars, bool) else None,
        "kernel_sum": num("kernel_sum"),
    }


def dia_counts(path: str | Path) -> dict:
    """DiaSource counts of a diaSrc table: n_dia_sources, n_dia_positive, n_dia_negative."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["isNegative"])
    negative = np.asarray(table["isNegative"].fill_null(False).to_numpy(zero_copy_only=False), bool)
    n = int(len(negative))
    return {"n_dia_sources": n, "n_dia_positive": n - int(negative.sum()), "n_dia_negative": int(negative.sum())}


def fake_metrics(fakes) -> dict:
    """Counts and m50 of one data ID's fake table (a DataFrame with injectedMag, recovered).

    Keys: n_fakes, n_fakes_recovered, m50_mag, m50_err_mag (NaN when the completeness fit
    fails: too few fakes, or all or none recovered), fake_pull_median and fake_pull_scatter
    (median and 1.4826 MAD of (psfFlux - injectedFlux) / psfFluxErr over the recovered fakes;
    0 and 1 for unbiased fluxes with right errors; NaN under 5 recovered), all None-like when
    ``fakes`` is None.
    """
    nan = float("nan")
    if fakes is None:
        return {"n_fakes": None, "n_fakes_recovered": None, "m50_mag": nan, "m50_err_mag": nan,
                "fake_pull_median": nan, "fake_pull_scatter": nan}
    recovered = np.asarray(fakes["recovered"].fillna(False), bool)
    fit = fit_completeness(np.asarray(fakes["injectedMag"], float), recovered, decreasing=True)
    pull = ((np.asarray(fakes["psfFlux"], float) - np.asarray(fakes["injectedFlux"], float))
            / np.asarray(fakes["psfFluxErr"], float))[recovered]
    pull = pull[np.isfinite(pull)]
    enough = pull.size >= 5
    return {"n_fakes": int(len(fakes)), "n_fakes_recovered": int(recovered.sum()),
            "m50_mag": float(fit.x50), "m50_err_mag": float(fit.x50_err),
            "fake_pull_median": float(np.median(pull)) if enough else nan,
            "fake_pull_scatter": mad_sigma(pull) if enough else nan}
