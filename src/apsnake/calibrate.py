"""Single-frame calibration: postISR Exposure (ADU) -> calexp (nJy) + source catalogue.

Rubin's calibrateImage chain (docs/algorithms.md §2) with our decisions: background
(128-px bins), cosmic rays, detection and measurement, PSF model (pixel basis, order 2),
aperture correction, astrometry from the raw header's TPV WCS to a TAN-SIP fit, zero point
against the reference catalogue, pixels converted to nJy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from apsnake import astrometry, photometry, psf
from apsnake.background import BackgroundConfig, BackgroundModel, estimate_background
from apsnake.detection import CosmicRayConfig, DetectionConfig, detect_and_measure, find_cosmic_rays
from apsnake.errors import ApsnakeError
from apsnake.exposure import Exposure, PhotoCalib
from apsnake.isr import interpolate_rows
from apsnake.numerics import SIGMA_TO_FWHM
from apsnake.sphere import pixel_scale_arcsec

log = logging.getLogger(__name__)


class CalibrationError(ApsnakeError, ValueError):
    """A data ID that cannot be calibrated (too few stars, no astrometric match, ...)."""


@dataclass
class CalibrateConfig:
    """Options of the calibration stage (Rubin defaults where Rubin has one); the ``calibrate``
    section of config.yaml, with one nested section per step (``psf``, ``astrometry``, ...).

    initial_fwhm_pixels: starting PSF guess (Rubin: Gaussian, FWHM 4 px).
    refcat_margin_pixels: reference stars are loaded this far beyond the CCD, pixels (pointing
        errors).
    colorterm: None, or (secondary band, (c0, c1, c2)) for m = m_band + c0 + c1 (m_band - m_sec) + ...
    """

    initial_fwhm_pixels: float = 4.0
    refcat_margin_pixels: float = 400.0
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    cosmic_rays: CosmicRayConfig = field(default_factory=CosmicRayConfig)
    psf: psf.PsfConfig = field(default_factory=psf.PsfConfig)
    astrometry: astrometry.AstrometryConfig = field(default_factory=astrometry.AstrometryConfig)
    photometry: photometry.PhotometryConfig = field(default_factory=photometry.PhotometryConfig)
    colorterm: tuple | None = None


@dataclass
class CalibrateResult:
    calexp: Exposure
    sources: object  # pandas DataFrame
    background: BackgroundModel
    metadata: dict


def _stellar_sigma(table, default_sigma: float) -> float:
    """PSF sigma (pixels) from the second moments of bright, clean, compact sources."""
    if len(table) == 0:
        return default_sigma
    clean = ~(table["pixelFlags_saturated"] | table["pixelFlags_cr"] | table["pixelFlags_bad"]
              | table["pixelFlags_interpolated"])
    bright = clean & (table["snr"] > 30) & (table["ixx"] > 0.25) & (table["iyy"] > 0.25)
    if bright.sum() < 5:
        return default_sigma
    size = np.sqrt(0.5 * (table.loc[bright, "ixx"] + table.loc[bright, "iyy"])).to_numpy()
    # Stars form the lower envelope of the size distribution; galaxies are larger.
    lo = np.percentile(size, 10)
    stellar = size[(size >= lo) & (size <= 1.3 * np.percentile(size, 30))]
    return float(np.median(stellar)) if stellar.size else default_sigma


def calibrate_exposure(post_isr: Exposure, refcat, config: CalibrateConfig | None = None) -> CalibrateResult:
    """Calibrate one postISR exposure.

    Parameters
    ----------
    post_isr : Exposure in ADU with the raw header's WCS.
    refcat : pandas DataFrame of reference stars with ``ra``, ``dec`` (deg), ``mag``,
        ``magErr`` in the exposure's band (see ``apsnake.refcat``), and ``secondary_mag``
        when a colour term is configured.
    config : CalibrateConfig.

    Returns
    -------
    CalibrateResult: calexp (image and variance in nJy, background subtracted, CR masked,
    TAN-SIP WCS, PSF model, identity PhotoCalib), the source table (positions, fluxes in nJy,
    shapes, flags, calibration-star flags), the background model (ADU) and QA metadata.
    Raises ``CalibrationError`` naming the data ID when a step cannot succeed.
    """
    config = config or CalibrateConfig()
    t0 = time.perf_counter()
    exp = post_isr.copy()
    visit, detector = exp.data_id
    data_id = f"data ID (visit={visit}, detector={detector})"
    if exp.wcs is None:
        raise CalibrationError(f"{data_id}: postISR exposure has no initial WCS")
    ignore = exp.mask_of("BAD", "SAT", "NO_DATA", "EDGE")

    # Background, pass 1 (bright sources inflate it a little; pass 2 masks detections).
    bkg = estimate_background(exp.image, ignore, config.background)
    sub = exp.image - bkg.image
    sigma = config.initial_fwhm_pixels / SIGMA_TO_FWHM
    # The PSF width for the CR test, from bright stars in the middle half of the CCD (enough
    # stars, half the cost).
    rows = slice(exp.shape[0] // 4, 3 * exp.shape[0] // 4)
    first, _ = detect_and_measure(sub[rows], exp.variance[rows], exp.mask[rows], exp.mask_planes, sigma,
                                  DetectionConfig(threshold=20.0, min_area=config.detection.min_area))
    sigma = _stellar_sigma(first, sigma)

    # Cosmic rays: masked CR and interpolated along rows (Rubin keepCRs=True keeps the mask).
    crs = find_cosmic_rays(sub, exp.variance, sigma, bad=exp.mask_of("BAD", "SAT", "INTRP"), config=config.cosmic_rays)
    exp.set_mask("CR", crs)
    if crs.any():
        exp.image = interpolate_rows(exp.image, crs, float(np.median(bkg.image)))
        sub = exp.image - bkg.image

    # Detection footprints, then background pass 2 with them masked, then the final
    # detection on the re-subtracted image. The smoothed image is reused: the background
    # change is smooth, so smoothing it changes nothing.
    from scipy import ndimage

    from apsnake.detection import smooth_for_detection

    det_bad = exp.mask_of("BAD", "NO_DATA")
    smooth, noise = smooth_for_detection(sub, exp.variance, det_bad, sigma)
    _, detected = detect_and_measure(sub, exp.variance, exp.mask, exp.mask_planes, sigma, config.detection,
                                     smoothed=(smooth, noise))
    grown = ndimage.maximum_filter(detected, size=7)  # footprints + 3 px (separable: fast)
    bkg2 = estimate_background(exp.image, ignore | grown, config.background)
    delta = bkg2.image - bkg.image
    smooth -= np.where(det_bad, np.float32(0), delta)
    bkg = bkg2
    exp.image = (exp.image - bkg.image).astype(np.float32)
    sources, detected = detect_and_measure(exp.image, exp.variance, exp.mask, exp.mask_planes, sigma,
                                           config.detection, smoothed=(smooth, noise))
    del smooth, noise
    exp.set_mask("DETECTED", detected)
    if len(sources) < config.psf.min_stars:
        raise CalibrationError(f"{data_id}: only {len(sources)} sources detected; cannot calibrate")

    # PSF model from clean, isolated, unsaturated stars.
    flags = (sources["pixelFlags_saturated"] | sources["pixelFlags_crCenter"] | sources["pixelFlags_badCenter"]
             | sources["pixelFlags_interpolatedCenter"] | sources["pixelFlags_edge"] | sources["pixelFlags_suspectCenter"]
             | (sources["sepFlag"] & 0x4 != 0)).to_numpy()
    size = np.sqrt(0.5 * (sources["ixx"] + sources["iyy"])).to_numpy() * SIGMA_TO_FWHM
    try:
        chosen = psf.select_psf_stars(sources["x"].to_numpy(), sources["y"].to_numpy(), sources["isoFlux"].to_numpy(),
                                      sources["snr"].to_numpy(), size, flags, config.psf)
        bad_pixels = exp.mask_of("BAD", "SAT", "CR", "NO_DATA")
        fit = psf.fit_psf(exp.image, exp.variance, bad_pixels, sources["x"].to_numpy()[chosen],
                          sources["y"].to_numpy()[chosen], config.psf)
    except psf.PsfError as err:
        raise CalibrationError(f"{data_id}: PSF model failed: {err}") from None
    model = exp.psf = fit.model
    sources["calib_psf_candidate"] = chosen
    used = np.zeros(len(sources), bool)
    used[np.flatnonzero(chosen)[fit.used]] = True
    sources["calib_psf_used"] = used
    chosen = used

    # PSF fluxes and the aperture correction to the 12-px aperture.
    flux, flux_err, chi2, ndata = psf.psf_flux(exp.image, exp.variance, model, sources["x"].to_numpy(),
                                               sources["y"].to_numpy(), bad=bad_pixels)
    apcorr = photometry.fit_aperture_correction(sources["x"][chosen], sources["y"][chosen], flux[chosen],
                                                sources["apFlux"].to_numpy()[chosen], exp.shape)
    corr = apcorr(sources["x"].to_numpy(), sources["y"].to_numpy())
    sources["psfFlux"], sources["psfFluxErr"] = flux * corr, flux_err * corr
    sources["psfChi2"], sources["psfNdata"] = chi2, ndata
    sources["psfFlux_flag"] = ~np.isfinite(flux)

    # Astrometry: the raw TPV WCS is the starting point; TAN-SIP fit against the refcat.
    usable = ~(sources["pixelFlags_saturatedCenter"] | sources["pixelFlags_crCenter"] | sources["pixelFlags_badCenter"]).to_numpy()
    usable &= np.isfinite(sources["psfFlux"].to_numpy()) & (sources["snr"].to_numpy() > 10)
    idx = np.flatnonzero(usable)
    if len(refcat) < config.astrometry.min_matches:
        raise CalibrationError(f"{data_id}: only {len(refcat)} reference stars over the CCD; cannot fit a WCS")
    try:
        astro = astrometry.fit_wcs(sources["x"].to_numpy()[idx], sources["y"].to_numpy()[idx],
                                   sources["psfFlux"].to_numpy()[idx], refcat["ra"].to_numpy(float),
                                   refcat["dec"].to_numpy(float), refcat["mag"].to_numpy(float), exp.wcs,
                                   shape=exp.shape, config=config.astrometry)
    except astrometry.AstrometryError as err:
        raise CalibrationError(f"{data_id}: astrometry failed: {err}") from None
    exp.wcs = astro.wcs
    ra, dec = astro.wcs.all_pix2world(sources["x"].to_numpy(), sources["y"].to_numpy(), 0)
    sources["ra"], sources["dec"] = ra, dec
    matched_src = idx[astro.matches["src_index"].to_numpy()]
    matched_ref = astro.matches["ref_index"].to_numpy()
    sources["calib_astrometry_used"] = False
    sources.loc[matched_src, "calib_astrometry_used"] = True

    # Photometric zero point with the matched stars (PSF stars preferred: unresolved).
    ref_mag = refcat["mag"].to_numpy(float)[matched_ref]
    if config.colorterm is not None and "secondary_mag" in refcat.columns:
        ref_mag = photometry.apply_colorterm(ref_mag, refcat["secondary_mag"].to_numpy(float)[matched_ref], config.colorterm[1])
    try:
        zp = photometry.fit_zero_point(sources["psfFlux"].to_numpy()[matched_src], sources["psfFluxErr"].to_numpy()[matched_src],
                                       ref_mag, refcat["magErr"].to_numpy(float)[matched_ref], config.photometry)
    except photometry.PhotometryError as err:
        raise CalibrationError(f"{data_id}: photometric calibration failed: {err}") from None
    sources["calib_photometry_used"] = False
    sources.loc[matched_src[zp.used], "calib_photometry_used"] = True

    # Pixels to nJy; PhotoCalib becomes the identity, the factor is kept in the metadata.
    scale = np.float32(zp.njy_per_unit)
    exp.image = exp.image * scale
    exp.variance = exp.variance * scale * scale
    exp.unit = "nJy"
    exp.photo_calib = PhotoCalib(1.0, 0.921 * zp.err)  # fractional error of the scale: 0.4 ln(10) dm
    for col in ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr", "isoFlux"):
        sources[col] = sources[col] * float(scale)
    sources.insert(0, "id", np.arange(len(sources), dtype=np.int64))
    sources["visit"], sources["detector"] = visit, detector

    fwhm_centre = psf.measure_fwhm(model.evaluate(exp.shape[1] / 2, exp.shape[0] / 2))
    sky_level = float(np.median(bkg.image))
    good_sky = ~(exp.mask_of("DETECTED", "BAD", "SAT", "CR", "EDGE", "SUSPECT"))
    sky_noise_njy = float(np.std(exp.image[good_sky][:: max(1, int(good_sky.sum() // 500_000))]))
    meta = {
        "visit": visit, "detector": detector,
        "fwhm_pixels": fwhm_centre, "fwhm_arcsec": fwhm_centre * pixel_scale_arcsec(astro.wcs, exp.shape),
        "n_sources": int(len(sources)), "n_psf_stars": int(chosen.sum()), "n_cosmic_ray_pixels": int(crs.sum()),
        "n_astrometry_matches": int(astro.n_matches), "astrometry_rms_mas": float(astro.rms_mas),
        "pointing_offset_arcsec": [float(v) for v in astro.offset_arcsec], "rotation_deg": float(astro.rotation_deg),
        "n_photometry_stars": int(zp.n_stars), "zero_point": zp.zp, "zero_point_err": zp.err,
        "zero_point_scatter": zp.scatter, "njy_per_adu": float(scale),
        "aperture_correction": float(apcorr.coeffs[0]), "aperture_correction_scatter": apcorr.scatter,
        "sky_level_adu": sky_level, "sky_noise_adu": float(bkg.rms), "sky_noise_njy": sky_noise_njy,
        "calibrate_seconds": round(time.perf_counter() - t0, 3),
    }
    exp.metadata.update({
        "ZP": zp.zp, "ZPERR": zp.err, "NJYPADU": float(scale), "FWHM": fwhm_centre, "ASTRMS": float(astro.rms_mas),
        "NASTRO": int(astro.n_matches), "NPHOTO": int(zp.n_stars), "SKYLEV": sky_level, "CALTIME": meta["calibrate_seconds"],
        **apcorr.to_metadata(),
    })
    log.info("%s: calibrated in %.1f s: FWHM %.2f px, %d astrometric matches rms %.0f mas, zp %.3f +/- %.3f (%d stars)",
             data_id, meta["calibrate_seconds"], fwhm_centre, astro.n_matches, astro.rms_mas, zp.zp, zp.err, zp.n_stars)
    return CalibrateResult(calexp=exp, sources=sources, background=bkg, metadata=meta)
