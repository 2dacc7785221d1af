"""Image subtraction of one data ID: ``subtract`` (science minus PSF-matched template).

Inputs are ``Exposure`` objects on the same pixel grid, in the same flux unit (nJy for
calexps and templates), background-subtracted, each with a ``PsfModel``; template pixels
without coverage carry ``NO_DATA``. The difference is always science minus template (a
brightening is positive), in the science flux unit. Conventions: 0-based pixels (x column,
y row); spatial polynomials in ``u = (x - x0) / scale``, ``v = (y - y0) / scale`` (the
``PsfModel`` frame); convolution ``(K * I)(x) = sum_k K(k) I(x - k)``.

``DiffimSkip`` is the documented "skip this data ID" outcome (template coverage below
``min_template_coverage``, fewer than ``min_kernel_stars`` kernel stars); ``DiffimError``
is unusable input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from apsnake.diffim.alard_lupton import subtract_alard_lupton
from apsnake.diffim.config import DiffimConfig, DiffimError, DiffimResult, DiffimSkip
from apsnake.diffim.noise import prepare, variance_scale
from apsnake.diffim.star_profiles import profile_stars, subtract_star_profiles
from apsnake.diffim.zogy import subtract_zogy
from apsnake.exposure import Exposure
from apsnake.numerics import polynomial_frame
from apsnake.psf import psf_sigma

log = logging.getLogger(__name__)


def skipped_difference(exposure: Exposure, reason: str) -> Exposure:
    """What a skipped data ID (``DiffimSkip``) writes in place of its difference image and its
    matched template: ``exposure`` (the calexp or the template) with image 0 and NO_DATA
    everywhere, keeping its variance, mask planes, PSF, WCS and visit info, and the reason in
    the metadata (``DIFFSKIP = True``, ``DIFFWHY``)."""
    out = replace(exposure, image=np.zeros(exposure.image.shape, np.float32),
                  mask=np.array(exposure.mask, np.int32, copy=True),
                  variance=np.array(exposure.variance, np.float32, copy=True),
                  mask_planes=dict(exposure.mask_planes), metadata=dict(exposure.metadata))
    out.mask |= np.int32(out.mask_bit("NO_DATA"))
    out.metadata.update({"DIFFSKIP": True, "DIFFWHY": str(reason)})
    return out


def _plain(value):
    """Metadata as plain Python types (lists, floats, ints, bools): JSON-serialisable."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_inputs(science: Exposure, template: Exposure):
    if science.image.shape != template.image.shape:
        raise DiffimError(f"science {science.image.shape} and template {template.image.shape} "
                          "are not on the same pixel grid")
    for name, exp in (("science", science), ("template", template)):
        if exp.image.ndim != 2 or exp.variance.shape != exp.image.shape or exp.mask.shape != exp.image.shape:
            raise DiffimError(f"{name}: image, mask and variance must be 2-D of one shape")
        if exp.psf is None:
            raise DiffimError(f"{name} exposure {exp.data_id} has no PSF model")
    if min(science.image.shape) < 16:
        raise DiffimError(f"image too small for subtraction: {science.image.shape}")


def _subtract_star_profiles(difference: Exposure, sources, cfg: DiffimConfig, meta: dict) -> None:
    """Take the round residuals of bright and saturated stars out of ``difference`` (in place;
    ``star_profiles``), with counts and time in ``meta``."""
    t0 = time.perf_counter()
    x, y, outer = profile_stars(sources, difference.mask_of("SAT", "SAT_TEMPLATE"), cfg.star_profile_min_snr,
                                cfg.star_profile_radius, cfg.star_profile_radius_saturated, cfg.star_profile_max_stars)
    fwhm = max(float(meta.get("science_fwhm") or 0.0), float(meta.get("template_fwhm") or 0.0))
    bad = difference.bad_pixels(tuple(cfg.bad_mask_planes) + ("CR",))
    info = subtract_star_profiles(difference.image, difference.variance, bad, x, y, outer,
                                  r_in=max(cfg.star_profile_inner_fwhm * fwhm, 3.0),
                                  min_significance=cfg.star_profile_significance)
    meta.update({f"star_profiles_{k}": v for k, v in info.items()})
    meta["time_star_profiles_s"] = time.perf_counter() - t0


def subtract(science: Exposure, template: Exposure, sources=None,
             config: DiffimConfig | None = None) -> DiffimResult:
    """Subtract the PSF-matched template from the science exposure.

    Parameters
    ----------
    science : Exposure
        The calexp: background-subtracted, in nJy, with a PsfModel.
    template : Exposure
        The template on the same pixel grid and in the same unit, with a PsfModel; pixels
        without coverage masked NO_DATA.
    sources : pandas.DataFrame or mapping, optional
        The science source table (columns ``x``, ``y``, ``snr`` or ``psfFlux``/``psfFluxErr``,
        optional ``psfFlux`` and ``pixelFlags_*`` booleans) for the kernel stars. When None, the
        science image is searched with ``sep`` at 5 sigma. Not used by ZOGY.
    config : DiffimConfig, optional

    Returns
    -------
    DiffimResult
        ``metadata`` holds: ``method``, ``convolved`` (``"template"``/``"science"``/``"none"``),
        ``template_coverage`` (fraction), ``science_fwhm``/``template_fwhm`` (px),
        ``variance_scale_science``/``_template``, ``science_variance_mean``/``_template``
        (image unit^2), ``kernel_size`` (px), ``kernel_sigmas`` (px), ``kernel_degrees``,
        ``kernel_spatial_order``, ``background_order``, ``kernel_candidates`` (counts per
        selection stage), ``n_kernel_stars``, ``kernel_stars`` (x, y, residual mean and std per
        star, used flag), ``kernel_residual_mean``/``kernel_residual_std`` (mean over used stars
        of the per-star mean/std of normalised residuals), ``kernel_sum`` (at the centre) and
        ``kernel_sum_range``, ``background_coeffs`` and ``background_center`` (image unit),
        ``condition_number``, ``decorrelated``, ``differenceFootprintRatioMean``/``Stdev``,
        ``time_s`` and per-step times (s).

    Raises
    ------
    DiffimSkip
        Template coverage below ``min_template_coverage``, or fewer than ``min_kernel_stars``
        usable kernel stars.
    DiffimError
        Unusable input.
    """
    cfg = config or DiffimConfig()
    t_start = time.perf_counter()
    _check_inputs(science, template)
    meta: dict = {"method": cfg.method}

    covered = np.isfinite(template.image)
    covered &= ~template.mask_of("NO_DATA")
    coverage = float(np.count_nonzero(covered)) / covered.size
    meta["template_coverage"] = coverage
    if coverage < cfg.min_template_coverage:
        raise DiffimSkip(f"template covers {coverage:.1%} of detector {science.data_id}, "
                         f"below min_template_coverage={cfg.min_template_coverage:.0%}")

    sci_img, sci_var, sci_ok, sci_ignore = prepare(science)
    tpl_img, tpl_var, tpl_ok, tpl_ignore = prepare(template, covered)
    # Variance scale factors are kept as scalars and folded into every use of the variance planes
    # (the planes may be the caller's arrays; no full-size copies).
    for name, img, var, ign in (("science", sci_img, sci_var, sci_ignore),
                                ("template", tpl_img, tpl_var, tpl_ignore)):
        exposure = science if name == "science" else template
        sigma = psf_sigma(exposure.psf, *polynomial_frame(exposure.shape)[:2])
        factor = variance_scale(img, var, ign, cfg.variance_scale_limit, sigma) if cfg.scale_variance else 1.0
        meta[f"variance_scale_{name}"] = factor
    meta["time_prepare_s"] = time.perf_counter() - t_start

    if cfg.method == "zogy":
        result = subtract_zogy(science, template, sci_img, sci_var, sci_ignore, tpl_img, tpl_var, tpl_ignore,
                       covered, cfg, meta)
    else:
        result = subtract_alard_lupton(science, template, sources, sci_img, sci_var, sci_ok, sci_ignore, tpl_img,
                               tpl_var, tpl_ok, tpl_ignore, covered, cfg, meta)
    if cfg.star_profile_min_snr is not None and sources is not None:
        _subtract_star_profiles(result.difference, sources, cfg, meta)
    if cfg.model_error > 0:
        # A floor for what PSF matching cannot do exactly: bright stars and galaxy cores leave
        # residuals of ~1% of their flux (core-and-ring), far above their photon noise. Adding
        # (model_error * matched template)^2 to the variance keeps PSF fluxes, S/N and the
        # detection threshold honest there, and changes nothing on faint hosts.
        matched = np.nan_to_num(result.matched_template.image, nan=0.0)
        result.difference.variance = (result.difference.variance
                                      + (np.float32(cfg.model_error) * matched) ** 2).astype(np.float32)
    meta["model_error"] = cfg.model_error
    meta["time_s"] = time.perf_counter() - t_start
    result.metadata = _plain(meta)
    diff = result.difference
    diff.metadata.update({
        "DIFFMETH": cfg.method, "DIFFCONV": meta.get("convolved", "none"),
        "TMPLCOV": round(coverage, 5), "KERNSTAR": int(meta.get("n_kernel_stars", 0)),
        "KERNSIZE": int(meta.get("kernel_size", 0)), "KERNSUM": float(meta.get("kernel_sum", float("nan"))),
        "DIFFDCOR": bool(meta.get("decorrelated", False)),
    })
    log.info("subtraction %s of %s: %s, %.2f s", cfg.method, science.data_id,
             meta.get("convolved", ""), meta["time_s"])
    return result
