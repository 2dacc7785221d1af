"""Alard-Lupton subtraction with Rubin's decorrelation afterburner (docs/algorithms.md).

The template is convolved to the science PSF unless, in ``convolve="auto"`` mode, the
template PSF is wider in both axes; then the science image is convolved and the difference
is ``(K * science - template) / ksum`` (``ksum`` = kernel sum at the centre), so that it
stays in science flux units with the template's PSF. Steps: basis (``basis``), kernel stars
(``kernel_stars``), fit (``kernel_fit``) alternating with the halo terms (``halo``),
convolution and decorrelation (``convolve``), mask (``masks``). The fitted differential background is NOT subtracted (as Rubin).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from apsnake.diffim.basis import alard_lupton_basis, basis_sigmas
from apsnake.diffim.config import DiffimConfig, DiffimError, DiffimResult, DiffimSkip
from apsnake.diffim.convolve import (
    FFT_WORKERS,
    convolve_spatial,
    decorrelation,
    fft_shape,
    kernel_sq_sum_map,
)
from apsnake.diffim.halo import HaloTerms
from apsnake.diffim.kernel_fit import build_stamps, fit_kernel
from apsnake.diffim.kernel_stars import detect_kernel_sources, select_kernel_stars
from apsnake.diffim.masks import assemble_mask, kernel_footprint_radius, mark_edge
from apsnake.diffim.noise import mean_variance
from apsnake.numerics import cutouts, grow_bits, polynomial_frame, polynomial_terms
from apsnake.psf import psf_widths


def subtract_alard_lupton(science, template, sources, sci_img, sci_var, sci_ok, sci_ignore, tpl_img, tpl_var,
                          tpl_ok, tpl_ignore, covered, cfg: DiffimConfig, meta: dict) -> DiffimResult:
    """Alard-Lupton difference and matched template of prepared inputs (``subtract`` does the checks)."""
    t0 = time.perf_counter()
    shape = sci_img.shape
    ny, nx = shape
    x0, y0, _ = polynomial_frame(shape)
    fwhm_s, sx_s, sy_s = psf_widths(science.psf.evaluate(x0, y0))
    fwhm_t, sx_t, sy_t = psf_widths(template.psf.evaluate(x0, y0))
    meta.update(science_fwhm=fwhm_s, template_fwhm=fwhm_t)
    if not (np.isfinite(fwhm_s) and np.isfinite(fwhm_t) and fwhm_s > 0 and fwhm_t > 0):
        raise DiffimError(f"cannot measure the PSF widths at the centre of {science.data_id}: science "
                          f"{fwhm_s}, template {fwhm_t} px")
    if cfg.convolve == "auto":
        conv_science = sx_t > sx_s and sy_t > sy_s
    else:
        conv_science = cfg.convolve == "science"
    meta["convolved"] = "science" if conv_science else "template"
    if conv_science:
        ref, ref_v, tgt, tgt_v = sci_img, sci_var, tpl_img, tpl_var
        f_ref, f_tgt = meta["variance_scale_science"], meta["variance_scale_template"]
        fwhm_ref, fwhm_tgt, unconv_psf = fwhm_s, fwhm_t, template.psf
    else:
        ref, ref_v, tgt, tgt_v = tpl_img, tpl_var, sci_img, sci_var
        f_ref, f_tgt = meta["variance_scale_template"], meta["variance_scale_science"]
        fwhm_ref, fwhm_tgt, unconv_psf = fwhm_t, fwhm_s, science.psf
    bad_cut = science.mask_of(*cfg.bad_mask_planes)
    bad_cut |= template.mask_of(*cfg.bad_mask_planes)
    bad_cut |= ~sci_ok
    bad_cut |= ~tpl_ok
    if sources is None:
        sources = detect_kernel_sources(science, sci_img, sci_var * np.float32(meta["variance_scale_science"]), sci_ignore)
        meta["kernel_sources"] = "sep"

    # Basis: Rubin's Gaussians from the seeing difference; the halos are matched afterwards.
    sigmas, ks = basis_sigmas(fwhm_ref, fwhm_tgt, cfg)
    degrees = list(cfg.degrees)
    kh = ks // 2
    basis = alard_lupton_basis(sigmas, degrees, ks)
    meta.update(kernel_size=ks, kernel_sigmas=[round(s, 4) for s in sigmas], kernel_degrees=degrees,
                n_basis=len(basis))

    # Kernel stars.
    hs = max(kh, int(math.ceil(cfg.stamp_fwhm_scaling * max(fwhm_tgt, 1.0))))
    big = hs + kh + 1
    images = ((sci_img, sci_var * np.float32(meta["variance_scale_science"]), science.psf),
              (tpl_img, tpl_var * np.float32(meta["variance_scale_template"]), template.psf))
    idx, ix, iy, snr, counts = select_kernel_stars(sources, shape, bad_cut, big, hs, max(fwhm_s, fwhm_t), cfg,
                                                   images)
    meta["kernel_candidates"] = counts
    if len(idx) < cfg.min_kernel_stars:
        raise DiffimSkip(
            f"only {len(idx)} usable kernel stars for detector {science.data_id} (of {counts['sources']} "
            f"sources: {counts['snr']} with S/N in {list(cfg.kernel_star_snr)}, "
            f"{counts['unflagged']} unflagged, {counts['inside']} >= {big} px from the edge, "
            f"{counts['isolated']} isolated, {counts['clean']} without masked pixels, {counts['constant']} "
            f"with a flux ratio like the others'); "
            f"min_kernel_stars={cfg.min_kernel_stars}")
    meta["time_select_s"] = time.perf_counter() - t0

    # Fit the core kernel on the stamps; then, alternately, the halo terms to bright stars' ring
    # profiles (``halo``) and the core kernel again on the target less the halo terms.
    # The halo terms spread every reference pixel over tens of pixels: the reference's own bad
    # pixels (a saturated core holds a wrong flux) are left out of them, as they are masked out
    # of the core convolution's footprint.
    ref_bad = (science.mask_of(*cfg.bad_mask_planes) | ~sci_ok) if conv_science else \
        (template.mask_of(*cfg.bad_mask_planes) | ~tpl_ok)
    halo = HaloTerms.prepare(np.where(ref_bad, np.float32(0), ref), tgt,
                              ((ref_v, f_ref), (tgt_v, f_tgt)), sources, bad_cut,
                              sci_img, tpl_img, sigmas, kh, max(fwhm_s, fwhm_t), cfg, meta)
    target = tgt
    core_radius = max(cfg.stamp_fwhm_scaling * max(fwhm_tgt, 1.0), 3.0)
    meta["time_fit_s"] = 0.0
    for round_ in range(1 + (cfg.halo_rounds if halo else 0)):
        t1 = time.perf_counter()
        st = build_stamps(ref, ref_v, target, tgt_v, ix, iy, sigmas, degrees, ks, hs, f_ref, f_tgt)
        fit = fit_kernel(st, basis, shape, hs, cfg, core_radius=core_radius)
        kernels = np.tensordot(fit["a"].T, basis, axes=1)  # (n_k, ks, ks) spatial components
        meta["time_fit_s"] += time.perf_counter() - t1
        if halo and round_ < cfg.halo_rounds:
            t_halo = time.perf_counter()
            halo.fit(kernels, fit)
            target = halo.subtract_from(tgt, ix, iy, hs)
            meta["time_halo_s"] += time.perf_counter() - t_halo
    wide = halo.kernel() if halo else None
    if halo:
        meta.update(halo_coeffs=[float(c) for c in halo.coeffs], halo_coeff_errors=[float(e) for e in halo.errors])
    use = fit["use"]
    ksum = float(kernels[0].sum())
    # The photometric scale: the core kernel's sum plus the halo terms'.
    scale = ksum + (float(wide.sum()) if wide is not None else 0.0)
    corners = polynomial_terms(fit["k_order"], np.array([-1.0, 1, -1, 1]) * (nx / 2) / polynomial_frame(shape)[2],
                          np.array([-1.0, -1, 1, 1]) * (ny / 2) / polynomial_frame(shape)[2])
    ksum_corners = corners @ kernels.sum(axis=(1, 2)) + (scale - ksum)
    meta.update(
        n_kernel_stars=int(use.sum()), kernel_spatial_order=fit["k_order"], background_order=fit["b_order"],
        kernel_residual_mean=float(fit["r_mean"][use].mean()), kernel_residual_std=float(fit["r_std"][use].mean()),
        kernel_residual_std_max=float(fit["r_std"][use].max()),
        kernel_sum=scale, core_kernel_sum=ksum,
        kernel_sum_range=[float(ksum_corners.min()), float(ksum_corners.max())],
        background_coeffs=[float(v) for v in fit["c"]], background_center=float(fit["c"][0]),
        condition_number=fit["condition"], eigenvalues_dropped=fit["dropped"], fit_iterations=fit["history"],
        kernel_stars={"x": ix.astype(float), "y": iy.astype(float), "snr": snr, "used": use,
                      "residual_mean": fit["r_mean"], "residual_std": fit["r_std"]},
    )

    # Convolution (core kernel and halo terms) and difference.
    t2 = time.perf_counter()
    shape_fft = fft_shape(shape, kh if wide is None else max(kh, wide.shape[0] // 2))
    matched, k0_abs2 = convolve_spatial(ref, kernels, fit["k_order"], shape_fft,
                                        extra=None if wide is None else (wide, halo.ref))
    ksq_map = kernel_sq_sum_map(kernels, fit["k_order"], shape)
    if conv_science:
        inv = np.float32(1.0 / scale)
        diff = (matched - tgt) * inv
        matched_img = tgt * inv
        matched_var = tgt_v * np.float32(f_tgt * inv ** 2)
    else:
        diff = tgt - matched
        matched_img = matched
        matched_var = ref_v * ksq_map
        matched_var *= np.float32(f_ref)
    # Masks grow, and the border is EDGE, by the radius holding nearly all of the kernel's
    # weight (about its half-width for a core kernel).
    grow = kernel_footprint_radius(kernels[0], cfg.mask_kernel_fraction)
    meta["mask_growth_radius"] = grow
    tmask = np.asarray(template.mask, np.int32)
    if not conv_science:
        tmask = grow_bits(tmask, grow)
    mask, planes, no_data = assemble_mask(science, template, 0 if conv_science else grow,
                                          grow if conv_science else 0, covered, meta["template_coverage"] == 1.0,
                                          grow, grown_template_mask=None if conv_science else tmask)
    meta["time_convolve_s"] = time.perf_counter() - t2

    # Variance and decorrelation.
    t3 = time.perf_counter()
    s2 = mean_variance(tgt_v, tpl_ignore if conv_science else sci_ignore) * f_tgt
    c2 = mean_variance(ref_v, sci_ignore if conv_science else tpl_ignore) * f_ref
    meta.update(science_variance_mean=c2 if conv_science else s2, template_variance_mean=s2 if conv_science else c2)
    if no_data is not None:
        diff[no_data] = 0
    if cfg.decorrelate:
        from scipy.fft import irfft2, rfft2

        k0_abs2 *= np.float32(c2)
        k0_abs2 += np.float32(s2)
        np.divide(np.float32(s2 + c2 * ksum ** 2), k0_abs2, out=k0_abs2)
        phi_hat = np.sqrt(k0_abs2, out=k0_abs2)
        diff_hat = rfft2(diff, s=shape_fft, workers=FFT_WORKERS)
        diff_hat *= phi_hat
        diff = irfft2(diff_hat, s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
        diff_psf, w_unconv, w_conv, _ = decorrelation(kernels[0], s2, c2, unconv_psf)
        variance = tgt_v * np.float32(w_unconv * f_tgt)
        variance += ref_v * np.float32(w_conv * f_ref)
        meta.update(decorrelated=True, decorrelation_weights=[w_unconv, w_conv])
    else:
        diff_psf = unconv_psf
        variance = ref_v * ksq_map
        variance *= np.float32(f_ref)
        variance += tgt_v * np.float32(f_tgt)
        meta["decorrelated"] = False
    if conv_science:
        variance *= np.float32(1.0 / scale ** 2)
    diff = np.ascontiguousarray(diff, dtype=np.float32)
    if no_data is not None:
        diff[no_data] = 0
    diff_psf = replace(diff_psf, fwhm_pixels=float(psf_widths(diff_psf.evaluate(x0, y0))[0]))
    meta["time_decorrelate_s"] = time.perf_counter() - t3

    used = np.flatnonzero(use)
    meta["differenceFootprintRatioMean"], meta["differenceFootprintRatioStdev"] = footprint_ratio(
        diff, sci_img, variance, ix[used].astype(float), iy[used].astype(float), fwhm_s)

    difference = replace(science, image=diff, mask=mask, variance=np.asarray(variance, np.float32),
                         psf=diff_psf, mask_planes=planes, metadata=dict(science.metadata))
    matched_exp = replace(template, image=np.asarray(matched_img, np.float32), mask=tmask,
                          variance=np.asarray(matched_var, np.float32),
                          psf=template.psf if conv_science else science.psf,
                          mask_planes=dict(template.mask_planes), metadata=dict(template.metadata))
    if meta["template_coverage"] < 1.0:
        matched_exp.image[~covered] = 0
    if not conv_science:  # tmask is our grown copy: mark the border where the convolution is partial
        mark_edge(matched_exp.mask, grow, np.int32(matched_exp.mask_bit("EDGE")))
    return DiffimResult(difference=difference, matched_template=matched_exp, metadata=meta)


def footprint_ratio(diff, sci_img, diff_var, xs, ys, fwhm):
    """Rubin-like QA: per star (sum|D| - expected |noise| sum) / sum(science) within 2 FWHM."""
    ny, nx = diff.shape
    r = max(2, int(math.ceil(2 * fwhm)))
    ix = np.round(xs).astype(int)
    iy = np.round(ys).astype(int)
    inside = (ix >= r) & (ix < nx - r) & (iy >= r) & (iy < ny - r)
    if not inside.any():
        return float("nan"), float("nan")
    ix, iy = ix[inside], iy[inside]
    g = np.arange(-r, r + 1)
    disk = (g[None, :] ** 2 + g[:, None] ** 2) <= r * r
    d = cutouts(diff, ix, iy, r)[0].astype(float)
    s = cutouts(sci_img, ix, iy, r)[0].astype(float)
    v = cutouts(diff_var, ix, iy, r)[0].astype(float)
    noise = math.sqrt(2 / math.pi) * np.sqrt(np.clip(v, 0, None))
    num = (np.where(disk, np.abs(d) - noise, 0)).sum(axis=(1, 2))
    den = np.where(disk, s, 0).sum(axis=(1, 2))
    ratio = num[den > 0] / den[den > 0]
    if ratio.size == 0:
        return float("nan"), float("nan")
    return float(ratio.mean()), float(ratio.std())
