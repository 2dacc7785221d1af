"""DIA sources of one difference image: detect, measure, drop, filter and standardise.

What ``detect_dia_sources`` does (Rubin ``ip_diffim`` detectAndMeasure, ``ap_association``
filterDiaSourceCatalog and ``DiaSource.yaml``; docs/algorithms.md, DIA sources):

1. **Detection** (``detect``): matched filter, both signs, grown and merged footprints,
   peaks on the matched-filtered image, deblending of footprints with several significant
   peaks of one sign into one source per peak (a close positive/negative pair stays one
   dipole candidate), sub-pixel peaks; ``isNegative`` = only a negative lobe.
2. **Dipoles** (``dipole``): sources with both lobes are fitted as dipoles.
3. **Measurement** (``measure``): PSF flux on the difference image (Rubin PsfFlux; less the
   ``sigma_F^2 / F`` its own centroid adds, ``centroid_flux_debiased``, not in Rubin), 12-px
   aperture flux (sep), forced PSF fluxes on the science image (``scienceFlux``) and on the
   PSF-matched template (``templateFlux``), adaptive moments of the source and of the PSF
   (arcsec^2, local pixel scale), pixel flags. PSF fluxes are multiplied by the science
   image's aperture correction at the source, as Rubin's detectAndMeasure does with
   doApCorr (the calexp's nJy scale is set on aperture-corrected fluxes).
4. **Drop and filter** (configurable): Rubin detectAndMeasure drops sources off the image,
   with all 3x3 centre pixels INTRP, or with BAD/EDGE/NO_DATA/SAT/SAT_TEMPLATE/SPIKE pixels in
   the centre; filterDiaSourceCatalog drops centroid failures, CR centres, sources with all
   centre pixels HIGH_VARIANCE, and science-image S/N below -2; and (not in Rubin) sources
   whose centre pixel is sharper than the PSF (``measure.peak_excess_sigma`` above
   ``filter_max_peak_excess``): cosmic rays that the calibration did not mask; and sources
   whose detection S/N falls below the threshold once ``template_flux_error`` of the template's
   PSF flux is added to its noise (``filter_matching_snr``): core residuals of bright stars.
5. **Standardise**: positions from the difference WCS, errors through the local WCS
   Jacobian; fluxes in nJy; IDs from ``ids.dia_source_ids`` in (y, x) order; the table is
   ``schema.conform(..., 'DiaSource')``.

Not computed (null): ``extendedness``, ``psfLnL``, trail columns, ``reliability``,
``glint_trail``. ``diaObjectId``/``ssObjectId`` are filled by association. Deblended children
are DiaSources in their own right and their parent footprint is not written, so
``parentDiaSourceId`` stays null (as in Rubin, whose detectAndMeasure keeps only the children
and clears their ``parent``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from apsnake.dia.config import DiaConfig, DiaError
from apsnake.dia.detect import centroid_errors, detect_footprints
from apsnake.dia.dipole import dipole_columns, fit_dipoles
from apsnake.dia.measure import (aperture_photometry, center_planes, local_jacobian, peak_excess_sigma, pixel_flags,
                                 psf_photometry, shapes)
from apsnake.exposure import Exposure
from apsnake.ids import dia_source_ids
from apsnake.numerics import polynomial_frame
from apsnake.photometry import aperture_correction_at
from apsnake.psf import psf_sigma
from apsnake.schema import conform
from apsnake.times import now_mjd_tai

log = logging.getLogger(__name__)


def detect_dia_sources(difference: Exposure, science: Exposure | None, matched_template: Exposure | None,
                       config: DiaConfig | None = None, time_processed_mjd: float | None = None):
    """Detect and measure DIA sources on a difference image.

    Parameters
    ----------
    difference : Exposure
        The difference image (science minus PSF-matched template), background-free, in nJy
        (or with a PhotoCalib), with variance, mask (science planes and ``*_TEMPLATE``
        planes), PSF model and WCS; ``visit_info`` and ``detector`` give the data ID.
    science : Exposure or None
        The science calexp on the same pixel grid (for ``scienceFlux`` and the dipole fit);
        None leaves scienceFlux null.
    matched_template : Exposure or None
        The PSF-matched template on the same grid (for ``templateFlux`` and the dipole fit);
        its PSF, or the science PSF if it has none; None leaves templateFlux null.
    config : DiaConfig, optional
    time_processed_mjd : float, optional
        ``timeProcessedMjdTai`` (MJD, TAI); default now.

    Returns
    -------
    pyarrow.Table
        One row per DIA source, ``schema.conform(..., 'DiaSource')``: positions in degrees,
        fluxes in nJy, pixel coordinates 0-based, moments in arcsec^2; ``diaObjectId`` and
        ``ssObjectId`` null; rows ordered by ``diaSourceId``, which numbers the sources in
        (y, x) order.

    Raises
    ------
    DiaError
        Missing PSF or WCS on the difference image, unknown mid-exposure time, images of
        different shapes, or a unit that cannot be converted to nJy.
    """
    cfg = config or DiaConfig()
    t_start = time.perf_counter()
    _check_inputs(difference, science, matched_template)
    image = np.asarray(difference.image)
    variance = np.asarray(difference.variance)
    ny, nx = image.shape
    calib_d = difference.njy_per_unit("difference image")
    psf_d = difference.psf
    sigma = psf_sigma(psf_d, *polynomial_frame(difference.shape)[:2])

    # 1. Detection: footprints of both signs, their peaks and centroids.
    bad_det = difference.bad_pixels(cfg.detection_bad_planes)
    found = detect_footprints(image, variance, bad_det, sigma, cfg,
                              difference.mask_of(*cfg.deblend_skip_planes) if cfg.deblend_skip_planes else None)
    n, labels, slices = found.count, found.labels, found.slices
    fp_idx, fp_lab = found.pixels, found.pixel_labels
    log.info("data ID %s: %d footprints at +/-%.1f sigma (PSF sigma %.2f px), %d sources after deblending",
             difference.data_id, found.n_footprints, cfg.threshold, sigma, n)
    x, y, centroid_flag, snr, sign = found.x, found.y, found.centroid_flag, found.snr, found.sign
    x_err, y_err = centroid_errors(psf_d, x, y, snr)

    # 2. Dipole fits.
    same = tuple(cfg.measure_bad_planes) == tuple(cfg.detection_bad_planes)
    bad_meas_d = bad_det if same else difference.bad_pixels(cfg.measure_bad_planes)
    bad_s = science.bad_pixels(cfg.measure_bad_planes) if science is not None else None
    bad_t = matched_template.bad_pixels(cfg.measure_bad_planes) if matched_template is not None else None
    dip = fit_dipoles(difference, science, matched_template, cfg, labels, slices, found.area,
                      found.has_pos & found.has_neg, found.pos_xy, found.neg_xy, sigma, bad_meas_d, bad_s, bad_t,
                      footprint_labels=found.footprint_labels, parent=found.parent)
    use_mid = dip["isDipole"]
    x = np.where(use_mid, dip["x"], x)
    y = np.where(use_mid, dip["y"], y)
    x_err = np.where(use_mid, dip["x_err"], x_err)
    y_err = np.where(use_mid, dip["y_err"], y_err)

    # 3. Measurements.
    cols: dict[str, np.ndarray] = {}
    cols.update(psf_photometry(difference, bad_meas_d, x, y, calib_d, ""))
    sharpness = peak_excess_sigma(difference, x, y, cols["psfFlux"] / calib_d, cols["psfFluxErr"] / abs(calib_d))
    if science is not None:
        forced = psf_photometry(science, bad_s, x, y, science.njy_per_unit("science image"), "forced_")
        cols["scienceFlux"], cols["scienceFluxErr"] = forced.pop("forced_psfFlux"), forced.pop("forced_psfFluxErr")
        cols["forced_PsfFlux_flag"] = forced["forced_psfFlux_flag"]
        cols["forced_PsfFlux_flag_edge"] = forced["forced_psfFlux_flag_edge"]
        cols["forced_PsfFlux_flag_noGoodPixels"] = forced["forced_psfFlux_flag_noGoodPixels"]
    if matched_template is not None:
        tmpl = matched_template
        if tmpl.psf is None:  # PSF-matched to the science image: it has the science PSF
            tmpl = replace(tmpl, psf=science.psf if science is not None else psf_d)
        forced = psf_photometry(tmpl, bad_t, x, y, tmpl.njy_per_unit("matched template"), "t_")
        cols["templateFlux"], cols["templateFluxErr"] = forced["t_psfFlux"], forced["t_psfFluxErr"]
    apcorr = aperture_correction_at(science, x, y)
    for name in ("psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr", "templateFlux", "templateFluxErr"):
        if name in cols:
            cols[name] = cols[name] * apcorr
    # The centroid chases the pixel noise, so its excess is set by that noise alone.
    pixel_noise = cols["psfFluxErr"]
    if cfg.debias_centroid_flux:
        cols["psfFlux"] = np.where(dip["isDipole"], cols["psfFlux"],
                                   centroid_flux_debiased(cols["psfFlux"], pixel_noise))
    # The detection S/N with the template's PSF-matching error in its noise: a 1 % residual of a
    # bright star's core is coherent over the PSF and far above its pixel noise.
    snr_with_matching = np.abs(snr)
    if cfg.template_flux_error > 0 and "templateFlux" in cols:
        matching = cfg.template_flux_error * np.nan_to_num(np.abs(cols["templateFlux"]))
        cols["psfFluxErr"] = np.hypot(pixel_noise, matching)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr_with_matching = np.abs(snr) * np.where(cols["psfFluxErr"] > 0, pixel_noise / cols["psfFluxErr"], 1.0)
    cols.update(aperture_photometry(image, variance, bad_meas_d, x, y, cfg.aperture_radius, calib_d))
    flags, drop_any, drop_all = pixel_flags(difference, labels, fp_idx, fp_lab, n, x, y, cfg)
    cols.update(flags)

    ra, dec, jac = local_jacobian(difference.wcs, x, y)
    scale_arcsec = np.sqrt(np.abs(jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0])) * 3600.0
    cov_xi = jac[:, 0, 0] ** 2 * x_err ** 2 + jac[:, 0, 1] ** 2 * y_err ** 2
    cov_eta = jac[:, 1, 0] ** 2 * x_err ** 2 + jac[:, 1, 1] ** 2 * y_err ** 2
    cov_xe = jac[:, 0, 0] * jac[:, 1, 0] * x_err ** 2 + jac[:, 0, 1] * jac[:, 1, 1] * y_err ** 2
    cols.update(shapes(difference, bad_meas_d, x, y, sign, sigma, scale_arcsec, slices, cfg))
    cols.update(dipole_columns(dip, jac, calib_d))

    bbox_size = np.array([max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in slices], np.int32) \
        if n else np.empty(0, np.int32)

    cols.update({
        "x": x, "y": y, "xErr": x_err, "yErr": y_err, "centroid_flag": centroid_flag,
        "ra": ra, "dec": dec, "raErr": np.sqrt(cov_xi), "decErr": np.sqrt(cov_eta), "ra_dec_Cov": cov_xe,
        "snr": snr, "isNegative": found.is_negative, "bboxSize": bbox_size,
    })

    # 4. Drop and filter.
    keep = np.ones(n, bool)
    if cfg.drop_flagged:
        if cfg.drop_offimage:
            keep &= ~cols["pixelFlags_offimage"]
        keep &= ~drop_any & ~drop_all
    n_drop = int((~keep).sum())
    if cfg.apply_filter:
        f_any, f_all = center_planes(difference, x, y, cfg.filter_center_any, cfg.filter_center_all)
        keep_f = ~f_any & ~f_all
        if cfg.filter_centroid_flag:
            keep_f &= ~centroid_flag
        if cfg.filter_min_science_snr is not None and "scienceFlux" in cols:
            with np.errstate(divide="ignore", invalid="ignore"):
                direct = cols["scienceFlux"] / cols["scienceFluxErr"]
            keep_f &= ~(direct < cfg.filter_min_science_snr)
        if cfg.filter_max_peak_excess is not None:
            keep_f &= ~(~cols["isDipole"] & (sharpness > cfg.filter_max_peak_excess))
        if cfg.filter_matching_snr:
            keep_f &= ~(~cols["isDipole"] & (snr_with_matching < cfg.threshold))
        keep &= keep_f
    log.info("data ID %s: %d sources, %d dropped by the detectAndMeasure flags, %d more by the filter",
             difference.data_id, n, n_drop, n - n_drop - int(keep.sum()))

    # 5. Standardise: order, IDs, data-ID columns.
    order = np.flatnonzero(keep)
    order = order[np.lexsort((cols["x"][order], cols["y"][order]))]
    out = {k: np.asarray(v)[order] for k, v in cols.items()}
    m = len(order)
    vi = difference.visit_info
    if time_processed_mjd is None:
        time_processed_mjd = now_mjd_tai()
    out.update({
        "diaSourceId": dia_source_ids(vi.visit, difference.detector, m),
        "visit": np.full(m, vi.visit, np.int64),
        "detector": np.full(m, difference.detector, np.int32),
        "midpointMjdTai": np.full(m, vi.mjd_mid_tai),
        "exposureTime": np.full(m, vi.exposure_time if np.isfinite(vi.exposure_time) else np.nan),
        "band": np.array([vi.band or None] * m, dtype=object),
        "timeProcessedMjdTai": np.full(m, float(time_processed_mjd)),
        "pixelFlags": np.zeros(m, bool),
        "shape_flag_parent_source": np.zeros(m, bool),
    })
    table = conform(out, "DiaSource")
    log.info("data ID %s: %d DIA sources (%d dipoles, %d negative) in %.2f s", difference.data_id, m,
             int(out["isDipole"].sum()), int(out["isNegative"].sum()), time.perf_counter() - t_start)
    return table


def centroid_flux_debiased(flux, flux_noise):
    """PSF flux measured at the source's own centroid, less its expected excess over the flux
    at the true position.

    Maximising ``F(x, y)`` over two coordinates gains ``sigma_F^2 / F`` on average, to second
    order and for any PSF (the matched filter's noise gradient and its curvature both scale with
    the PSF's Fisher matrix): returns ``F (1 - min(sigma_F^2 / F^2, 1/4))``, the cap keeping the
    sign and a continuous value below S/N 2. Same units as ``flux``; NaN stays NaN.
    """
    flux = np.asarray(flux, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.minimum((np.asarray(flux_noise, float) / flux) ** 2, 0.25)
    return np.where(np.isfinite(fraction), flux * (1.0 - fraction), flux)


def _check_inputs(difference, science, template):
    if difference.psf is None:
        raise DiaError(f"difference image of data ID {difference.data_id} has no PSF model")
    if difference.wcs is None:
        raise DiaError(f"difference image of data ID {difference.data_id} has no WCS")
    if not np.isfinite(difference.visit_info.mjd_mid_tai):
        raise DiaError(f"difference image of data ID {difference.data_id} has no mid-exposure time (MJD-MID)")
    for what, ex in (("science image", science), ("matched template", template)):
        if ex is not None and ex.image.shape != difference.image.shape:
            raise DiaError(f"data ID {difference.data_id}: {what} shape {ex.image.shape} differs from the "
                           f"difference image's {difference.image.shape}")
    if science is not None and science.psf is None:
        raise DiaError(f"science image of data ID {difference.data_id} has no PSF model")
    if template is not None and template.psf is None and science is None:
        raise DiaError(f"matched template of data ID {difference.data_id} has no PSF model")
