"""Forced photometry of DiaObjects on one data ID (docs/algorithms.md §7, our decision).

Rubin measures only objects with two or more good DiaSources; we measure every DiaObject
whose position lies on the difference image with template coverage, so that a light curve has
a point (detection or not) at every visit that saw the position. Each measurement is a linear
PSF fit at the fixed object position (``apsnake.psf.psf_flux``): on the difference image
(``psfFlux``, the "fp" flux of DiaObject summaries) and on the calexp (``scienceFlux``), both in
nJy, times the calexp's aperture correction at the position (as for DiaSources, so the
forced and detected fluxes of one visit agree). Positions whose centre pixel has no template coverage (NO_DATA) or lies off the image are
not measured (there is nothing to measure, so no row is written).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from apsnake import schema
from apsnake.errors import ApsnakeError
from apsnake.exposure import Exposure, VisitInfo, read_exposure
from apsnake.ids import dia_source_ids
from apsnake.photometry import aperture_correction_at
from apsnake.psf import psf_flux
from apsnake.times import now_mjd_tai


class ForcedPhotometryError(ApsnakeError, ValueError):
    """A difference image and calexp that do not belong together."""


#: Mask planes whose pixels are left out of the fits (as for DiaSource measurement).
MEASURE_BAD_PLANES = ("BAD", "NO_DATA")


def measurable_objects(difference: Exposure, object_ids, ra_deg, dec_deg):
    """The objects on the difference image with template coverage at their centre pixel.

    Returns (ids, ra, dec, x, y), sorted by id; x, y are 0-based pixel positions.
    """
    ids = np.asarray(object_ids, dtype=np.int64)
    ra = np.asarray(ra_deg, dtype=float)
    dec = np.asarray(dec_deg, dtype=float)
    order = np.argsort(ids, kind="stable")
    ids, ra, dec = ids[order], ra[order], dec[order]
    if len(ids):
        x, y = difference.wcs.all_world2pix(ra, dec, 0)
    else:
        x = y = np.zeros(0)
    ny, nx = difference.shape
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    on_image = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    covered = np.zeros(len(ids), bool)
    covered[on_image] = ~difference.mask_of("NO_DATA")[iy[on_image], ix[on_image]]
    return ids[covered], ra[covered], dec[covered], x[covered], y[covered]


def psf_fluxes(exposure: Exposure, x, y, what: str):
    """PSF flux and error (nJy, before aperture correction) at pixel positions; NaN where no
    good pixel is left."""
    if len(x) == 0:
        return np.zeros(0), np.zeros(0)
    flux, err, _, ndata = psf_flux(exposure.image, exposure.variance, exposure.psf, x, y,
                                   exposure.bad_pixels(MEASURE_BAD_PLANES))
    calib = exposure.njy_per_unit(what)
    return np.where(ndata > 0, flux * calib, np.nan), np.where(ndata > 0, err * abs(calib), np.nan)


def forced_source_table(visit_info: VisitInfo, detector: int, ids, ra, dec, diff_flux, diff_err, sci_flux, sci_err,
                        time_processed_mjd: float | None = None) -> pa.Table:
    """DiaForcedSource rows (schema-conformed) of one data ID from measured fluxes (nJy)."""
    visit = visit_info.visit
    n = len(ids)
    columns = {
        "diaForcedSourceId": dia_source_ids(visit, detector, n),
        "diaObjectId": ids, "ra": ra, "dec": dec,
        "visit": np.full(n, visit, np.int64), "detector": np.full(n, detector, np.int32),
        "midpointMjdTai": np.full(n, visit_info.mjd_mid_tai),
        "band": np.full(n, visit_info.band, object),
        "timeProcessedMjdTai": np.full(n, now_mjd_tai() if time_processed_mjd is None else float(time_processed_mjd)),
        "psfFlux": diff_flux, "psfFluxErr": diff_err, "scienceFlux": sci_flux, "scienceFluxErr": sci_err,
    }
    return schema.conform(columns, "DiaForcedSource")


def forced_photometry(difference: Exposure | str | Path, science: Exposure | str | Path, object_ids, ra_deg,
                      dec_deg, time_processed_mjd: float | None = None) -> pa.Table:
    """DiaForcedSource rows of one data ID, one per measurable object, sorted by diaObjectId.

    Parameters
    ----------
    difference, science : Exposure or path
        The difference image and the calexp of the data ID, on the same pixel grid (nJy).
        Given as paths they are read one after the other, the difference image measured and
        let go before the calexp is read, so one CCD's pixels (~100 MB) are in memory at a time.
    object_ids : array_like of int
        diaObjectId of each object to measure.
    ra_deg, dec_deg : array_like of float
        Their current positions, degrees (ICRS).
    time_processed_mjd : float, optional
        ``timeProcessedMjdTai`` (MJD, TAI); default now.

    Returns
    -------
    pyarrow.Table
        Conforming to the DiaForcedSource schema; ``diaForcedSourceId`` packs (visit,
        detector, running index in diaObjectId order) like a diaSourceId.
    """
    difference = _exposure(difference)
    ids, ra, dec, x, y = measurable_objects(difference, object_ids, ra_deg, dec_deg)
    diff_flux, diff_err = psf_fluxes(difference, x, y, "difference image")
    info, detector, shape = difference.visit_info, difference.detector, difference.shape
    del difference
    science = _exposure(science)
    if (science.visit_info.visit, science.detector) != (info.visit, detector) or science.shape != shape:
        raise ForcedPhotometryError(f"data ID ({info.visit}, {detector}): the calexp is of data ID {science.data_id} "
                         f"with shape {science.shape}, the difference image has {shape}")
    sci_flux, sci_err = psf_fluxes(science, x, y, "calexp")
    apcorr = aperture_correction_at(science, x, y)
    return forced_source_table(info, detector, ids, ra, dec, diff_flux * apcorr, diff_err * apcorr,
                               sci_flux * apcorr, sci_err * apcorr, time_processed_mjd)


def _exposure(value: Exposure | str | Path) -> Exposure:
    return value if isinstance(value, Exposure) else read_exposure(value)
