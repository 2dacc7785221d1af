"""Observing conditions of each visit and the visit/CCD sky geometry (nominal and true WCS).

Per visit the seed draws the dither, the pointing error, the seeing and the rest of the PSF
(:class:`apsnake.sim.render.PsfField`: core Moffat index, halo share and width, focal-plane
patterns), the sky brightness and the transparency; the telescope geometry (hour angle,
zenith distance, azimuth, airmass) follows from the UT time and the pointing. The header
WCS is DECam's nominal one
(:func:`apsnake.instruments.decam.nominal_raw_wcs`) at the *nominal* pointing; pixels are
rendered with the *true* WCS, the same with CRVAL moved by the pointing error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from apsnake.instruments import decam
from apsnake.sim import render
from apsnake.sim.presets import Preset

log = logging.getLogger(__name__)

#: Small fixed non-radial distortion (deg) added to the camera's radial TPV term; the same for
#: every CCD and visit (a stand-in for the real astrometric distortion, not a DECam fact).
SIM_EXTRA_PV = {"PV1_4": 1.5e-4, "PV1_6": -0.8e-4, "PV2_4": 1.0e-4, "PV2_5": -0.6e-4}
#: Per-visit focal-plane PSF terms (see :class:`apsnake.sim.render.PsfField`): the largest
#: linear FWHM^2 gradient (arcsec^2 at the field edge; ~0.04" across the field in 1" seeing, a
#: camera focus/tilt residual of the size of the radial term), the RMS of each component of
#: the visit-wide ellipticity (tracking, wind shake) and of the linear-in-field astigmatism
#: (ellipticity at the field edge), and the largest relative gradient of the halo share.
#: Orders of magnitude only (few-per-cent ellipticities as in the DES PSF papers).
PSF_FWHM2_TILT_MAX_ARCSEC2 = 0.06
PSF_E_VISIT_RMS = 0.015
PSF_ASTIG_RMS = 0.01
PSF_HALO_TILT_MAX = 0.2

_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


@dataclass(frozen=True)
class VisitConditions:
    """Everything about one simulated visit that the truth tables and headers need.

    Angles in degrees, times as MJD (UTC start, TAI mid-exposure), fluxes via ``zeropoint``
    (AB magnitude giving 1 e-/s including this visit's extinction and transparency).
    """

    index: int
    expnum: int
    is_template: bool
    band: str
    exptime: float
    date_obs: str  # UTC start, isot
    mjd_obs: float  # UTC start
    mjd_mid_tai: float
    night: str  # YYMMDD
    tel_ra: float  # nominal pointing (header TELRA/TELDEC, CRVAL)
    tel_dec: float
    true_ra: float  # true pointing (CRVAL of the rendering WCS)
    true_dec: float
    dra_arcsec: float  # true minus header, on the sky (includes cos dec)
    ddec_arcsec: float
    ha_deg: float
    zd_deg: float
    az_deg: float
    airmass: float
    fwhm_arcsec: float  # core FWHM at the median focal-plane radius
    psf_e1: float  # visit-wide core ellipticity
    psf_e2: float
    sky_mag: float  # mag/arcsec^2
    zeropoint: float  # mag giving 1 e-/s
    psf_beta: float  # Moffat index of the core
    psf_halo_fraction: float  # share of the flux in the halo (median focal-plane radius)
    psf_halo_fwhm_arcsec: float
    psf_halo_beta: float
    psf_fwhm2_tilt_arcsec2: float  # linear FWHM^2 gradient over the focal plane
    psf_fwhm2_tilt_angle_deg: float
    psf_astig_e1: float  # ellipticity linear in the field position
    psf_astig_e2: float
    psf_halo_tilt: float  # relative gradient of the halo share
    psf_halo_tilt_angle_deg: float

    @property
    def sky_e_per_pixel(self) -> float:
        """Sky counts per pixel in the whole exposure, electrons (before the flat response)."""
        pixel_area = (decam.RAW_WCS_CD_DEG * 3600.0) ** 2
        return float(self.exptime * pixel_area * 10.0 ** (-0.4 * (self.sky_mag - self.zeropoint)))

    @property
    def dark_time(self) -> float:
        """Dark time (header DARKTIME), s: the exposure plus the shutter overheads."""
        return round(self.exptime + 1.13, 7)

    @property
    def electrons_per_njy(self) -> float:
        """Electrons collected in this exposure per nJy of source flux."""
        return float(self.exptime * 10.0 ** (-0.4 * (31.4 - self.zeropoint)))

    def psf_field(self, ccdnum: int) -> render.PsfField:
        """The PSF this visit renders CCD ``ccdnum`` with."""
        return render.PsfField(
            int(ccdnum), self.fwhm_arcsec, self.psf_beta, self.psf_e1, self.psf_e2,
            halo_fraction=self.psf_halo_fraction, halo_fwhm_arcsec=self.psf_halo_fwhm_arcsec,
            halo_beta=self.psf_halo_beta, fwhm2_tilt_arcsec2=self.psf_fwhm2_tilt_arcsec2,
            fwhm2_tilt_angle_deg=self.psf_fwhm2_tilt_angle_deg, astig_e1=self.psf_astig_e1,
            astig_e2=self.psf_astig_e2, halo_tilt=self.psf_halo_tilt,
            halo_tilt_angle_deg=self.psf_halo_tilt_angle_deg)

    @property
    def filename(self) -> str:
        """Archive file name ``c4d_YYMMDD_HHMMSS_ori.fits.fz`` from the UT start."""
        return decam.archive_filename(self.date_obs, "ori")


def _gmst_deg(mjd_ut: float) -> float:
    """Greenwich mean sidereal time (deg) from an MJD in UT (IAU 1982, ample for headers)."""
    d = mjd_ut - 51544.5
    return (280.46061837 + 360.98564736629 * d) % 360.0


def telescope_geometry(mjd_ut: float, ra: float, dec: float) -> tuple[float, float, float, float]:
    """(hour angle, zenith distance, azimuth, airmass) at CTIO for a pointing; angles in deg.

    Hour angle in [-180, 180); azimuth from north through east; airmass from Young (1994).
    """
    lst = _gmst_deg(mjd_ut) + decam.OBSERVATORY_LONGITUDE_DEG
    ha = (lst - ra + 180.0) % 360.0 - 180.0
    h, d, phi = np.radians(ha), np.radians(dec), np.radians(decam.OBSERVATORY_LATITUDE_DEG)
    cos_z = np.sin(phi) * np.sin(d) + np.cos(phi) * np.cos(d) * np.cos(h)
    zd = float(np.degrees(np.arccos(np.clip(cos_z, -1.0, 1.0))))
    az = float(np.degrees(np.arctan2(-np.cos(d) * np.sin(h),
                                     np.sin(d) * np.cos(phi) - np.cos(d) * np.sin(phi) * np.cos(h))) % 360.0)
    c = float(cos_z)
    airmass = (1.002432 * c**2 + 0.148386 * c + 0.0096467) / (c**3 + 0.149864 * c**2 + 0.0102963 * c + 0.000303978)
    return float(ha), zd, az, float(airmass)


def _stratified(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """n values covering [lo, hi] (one per equal slice, shuffled)."""
    return lo + (hi - lo) * (rng.permutation(n) + rng.uniform(0.1, 0.9, n)) / n


def make_visit_conditions(preset: Preset, seed: int) -> list[VisitConditions]:
    """Draw the conditions of every visit of a preset (deterministic for a seed).

    Seeing is stratified over the preset ranges (templates 0.8-1.0", science 1.0-1.6"), and
    so are the PSF core's Moffat index and the halo's share over all visits (each night spans
    the preset ranges); the halo's width (in seeing units) and the focal-plane PSF terms are
    drawn per visit. Dithers follow a golden-angle pattern so consecutive pointings differ by
    ~0.05-0.15 deg, the pointing error is a few arcsec (never under 1 arcsec in total).
    """
    from astropy.time import Time

    zp1, k_ext, dark_sky = decam.NOMINAL_PHOTOMETRY[preset.band]
    rng_plan = np.random.default_rng([seed, 1, 0])
    fwhm = {}
    for group, lo_hi in ((preset.templates, preset.template_fwhm_arcsec), (preset.science, preset.science_fwhm_arcsec)):
        values = _stratified(rng_plan, len(group), *lo_hi)
        fwhm.update({v.expnum: float(x) for v, x in zip(group, values)})
    phase = rng_plan.uniform(0.0, 2.0 * math.pi)
    psf_beta = _stratified(rng_plan, len(preset.visits), *preset.psf_beta_range)
    halo_fraction = _stratified(rng_plan, len(preset.visits), *preset.psf_halo_fraction_range)

    out = []
    for i, spec in enumerate(preset.visits):
        rng = np.random.default_rng([seed, 1, spec.expnum])
        # Dither about the field centre.
        radius = rng.uniform(*preset.dither_radius_deg)
        angle = phase + i * _GOLDEN_ANGLE
        cos_dec = math.cos(math.radians(preset.field_dec))
        tel_dec = preset.field_dec + radius * math.sin(angle)
        tel_ra = (preset.field_ra + radius * math.cos(angle) / cos_dec) % 360.0
        # Pointing error: true minus header.
        while True:
            dra, ddec = rng.normal(0.0, preset.pointing_error_arcsec, 2)
            if math.hypot(dra, ddec) > 1.0:
                break
        true_dec = tel_dec + ddec / 3600.0
        true_ra = (tel_ra + dra / 3600.0 / math.cos(math.radians(tel_dec))) % 360.0

        start = Time(spec.start_utc, format="isot", scale="utc")
        mjd_obs = float(start.mjd)
        mjd_mid_tai = float(start.tai.mjd + preset.exptime / 2.0 / 86400.0)
        ha, zd, az, airmass = telescope_geometry(mjd_obs, tel_ra, tel_dec)
        if spec.is_template:
            sky_mag = dark_sky + rng.normal(0.05, 0.05)
            clouds = rng.uniform(0.0, 0.02)
        else:
            sky_mag = dark_sky - rng.uniform(0.0, 0.4)
            clouds = rng.uniform(0.0, 0.08)
        zeropoint = zp1 - k_ext * (airmass - 1.0) - clouds
        e1, e2 = rng.normal(0.0, PSF_E_VISIT_RMS, 2)
        # The rest of the PSF from its own stream (the draws above keep their values).
        rng_psf = np.random.default_rng([seed, 1, spec.expnum, 1])
        halo_fwhm = fwhm[spec.expnum] * rng_psf.uniform(*preset.psf_halo_width_range)
        tilt, tilt_angle = rng_psf.uniform(0.0, PSF_FWHM2_TILT_MAX_ARCSEC2), rng_psf.uniform(0.0, 360.0)
        astig = rng_psf.normal(0.0, PSF_ASTIG_RMS, 2)
        halo_tilt, halo_angle = rng_psf.uniform(0.0, PSF_HALO_TILT_MAX), rng_psf.uniform(0.0, 360.0)
        out.append(VisitConditions(
            index=i, expnum=spec.expnum, is_template=spec.is_template, band=preset.band,
            exptime=preset.exptime, date_obs=start.isot, mjd_obs=mjd_obs, mjd_mid_tai=mjd_mid_tai,
            night=spec.night, tel_ra=tel_ra, tel_dec=tel_dec, true_ra=true_ra, true_dec=true_dec,
            dra_arcsec=float(dra), ddec_arcsec=float(ddec), ha_deg=ha, zd_deg=zd, az_deg=az,
            airmass=airmass, fwhm_arcsec=fwhm[spec.expnum], psf_e1=float(e1), psf_e2=float(e2),
            sky_mag=float(sky_mag), zeropoint=float(zeropoint),
            psf_beta=float(psf_beta[i]), psf_halo_fraction=float(halo_fraction[i]),
            psf_halo_fwhm_arcsec=float(halo_fwhm), psf_halo_beta=render.HALO_BETA,
            psf_fwhm2_tilt_arcsec2=float(tilt), psf_fwhm2_tilt_angle_deg=float(tilt_angle),
            psf_astig_e1=float(astig[0]), psf_astig_e2=float(astig[1]),
            psf_halo_tilt=float(halo_tilt), psf_halo_tilt_angle_deg=float(halo_angle),
        ))
    return out


def header_wcs_cards(ccdnum: int, visit: VisitConditions) -> dict:
    """The nominal TPV WCS cards written in the raw extension header (nominal pointing)."""
    return decam.nominal_raw_wcs(ccdnum, visit.tel_ra, visit.tel_dec, extra_pv=SIM_EXTRA_PV)


def true_wcs_cards(ccdnum: int, visit: VisitConditions) -> dict:
    """The WCS the pixels are rendered with: the nominal one at the true pointing."""
    return decam.nominal_raw_wcs(ccdnum, visit.true_ra, visit.true_dec, extra_pv=SIM_EXTRA_PV)


def _wcs(cards: dict):
    from astropy.io import fits

    return decam.raw_wcs(fits.Header(cards))


class Geometry:
    """True (rendering) WCS of every visit x simulated CCD, and sky <-> trimmed-pixel helpers.

    Parameters
    ----------
    visits : list of VisitConditions
    ccds : sequence of int
        Simulated CCDNUMs.
    """

    def __init__(self, visits: list[VisitConditions], ccds):
        self.visits = visits
        self.ccds = tuple(int(c) for c in ccds)
        self._true = {(v.index, c): _wcs(true_wcs_cards(c, v)) for v in visits for c in self.ccds}
        self._nominal = {(v.index, c): _wcs(header_wcs_cards(c, v)) for v in visits for c in self.ccds}

    def true_wcs(self, visit_index: int, ccdnum: int):
        return self._true[(visit_index, ccdnum)]

    def nominal_wcs(self, visit_index: int, ccdnum: int):
        return self._nominal[(visit_index, ccdnum)]

    def sky_to_trimmed(self, visit_index: int, ccdnum: int, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """True trimmed pixel coordinates (0-based x, y) of sky positions (deg) on one CCD.

        Positions farther than ~0.5 deg from the CCD come back as NaN (they never matter and
        the TPV inversion is not asked to converge there).
        """
        ra = np.atleast_1d(np.asarray(ra, dtype=float))
        dec = np.atleast_1d(np.asarray(dec, dtype=float))
        x = np.full(ra.shape, np.nan)
        y = np.full(ra.shape, np.nan)
        wcs = self._true[(visit_index, ccdnum)]
        ox, oy = decam.trimmed_offset(ccdnum)
        cra, cdec = wcs.all_pix2world([[ox + 1023.5, oy + 2047.5]], 0)[0]
        near = _angular_sep_deg(ra, dec, cra, cdec) < 0.5
        if near.any():
            px, py = wcs.all_world2pix(ra[near], dec[near], 0, tolerance=1e-6, maxiter=50, quiet=True)
            x[near], y[near] = px - ox, py - oy
        return x, y

    def locate(self, visit_index: int, ra, dec, margin: float = 0.0):
        """(detector, x, y) of sky positions in one visit: detector -1 and NaN when on no
        simulated CCD (``margin`` pixels from the trimmed edges)."""
        ra = np.atleast_1d(np.asarray(ra, dtype=float))
        det = np.full(ra.shape, -1, dtype=np.int64)
        xs = np.full(ra.shape, np.nan)
        ys = np.full(ra.shape, np.nan)
        ny, nx = decam.TRIMMED_SHAPE
        for ccd in self.ccds:
            x, y = self.sky_to_trimmed(visit_index, ccd, ra, dec)
            inside = (x >= margin - 0.5) & (x < nx - 0.5 - margin) & (y >= margin - 0.5) & (y < ny - 0.5 - margin)
            inside &= det < 0
            det[inside], xs[inside], ys[inside] = ccd, x[inside], y[inside]
        return det, xs, ys

    def region(self, margin_deg: float) -> tuple[float, float, float, float]:
        """(ra_min, ra_max, dec_min, dec_max) covering every simulated CCD of every visit
        (nominal and true WCS) plus ``margin_deg``."""
        ras, decs = [], []
        for (_, ccd), wcs in list(self._true.items()) + list(self._nominal.items()):
            corners = _corners(wcs, ccd)
            ras.append(corners[:, 0])
            decs.append(corners[:, 1])
        ras, decs = np.concatenate(ras), np.concatenate(decs)
        dec_mid = 0.5 * (decs.min() + decs.max())
        dra = margin_deg / math.cos(math.radians(dec_mid))
        return (float(ras.min() - dra), float(ras.max() + dra),
                float(decs.min() - margin_deg), float(decs.max() + margin_deg))


def _corners(wcs, ccdnum: int) -> np.ndarray:
    ox, oy = decam.trimmed_offset(ccdnum)
    ny, nx = decam.TRIMMED_SHAPE
    xs = np.array([0, nx - 1, nx - 1, 0, nx / 2, nx / 2, 0, nx - 1], dtype=float) + ox
    ys = np.array([0, 0, ny - 1, ny - 1, 0, ny - 1, ny / 2, ny / 2], dtype=float) + oy
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    return np.column_stack([ra, dec])


def _angular_sep_deg(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1))))
