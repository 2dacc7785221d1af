"""ZOGY subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27), docs/algorithms.md.

With ``P_n``, ``P_r`` the science and template PSFs at the image centre, ``s_n^2``, ``s_r^2``
their mean variances and ``F_n = F_r = 1`` (both in nJy)::

    D^ = c (P_r^ N^ - P_n^ R^) / sqrt(s_n^2 |P_r^|^2 + s_r^2 |P_n^|^2),  c = sqrt(s_n^2 + s_r^2)

i.e. ZOGY's proper difference (eq. 13) divided by ``F_D = 1 / c``: a point source whose flux
changed by ``f`` (nJy) appears on ``D`` as ``f P_D`` with ``P_D^ = c P_r^ P_n^ / sqrt(...)``
(unit sum), so PSF photometry on ``D`` with its PSF gives the flux change. The variance plane
is ``var_N * k_n^2 + var_R * k_r^2`` with ``k_n``, ``k_r`` the kernels applied to N and R. The
matched template is ``R * k_r`` (so that ``D = N * k_n - matched template``), with ``P_D``.
Both images' mask planes are grown by 2 FWHM. ZOGY's score image is not computed: DIA
detection runs its matched filter on ``D`` with ``P_D`` for both methods.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from apsnake.diffim.config import DiffimConfig, DiffimResult
from apsnake.diffim.convolve import FFT_WORKERS
from apsnake.diffim.masks import assemble_mask
from apsnake.diffim.noise import mean_variance
from apsnake.exposure import PsfModel
from apsnake.numerics import crop_centered, grow_bits, pad_centered, polynomial_frame
from apsnake.psf import psf_widths


def subtract_zogy(science, template, sci_img, sci_var, sci_ignore, tpl_img, tpl_var, tpl_ignore, covered,
                  cfg: DiffimConfig, meta: dict) -> DiffimResult:
    """ZOGY difference and matched template of prepared inputs (``subtract`` does the checks)."""
    from scipy.fft import irfft2, next_fast_len, rfft2

    t0 = time.perf_counter()
    shape = sci_img.shape
    ny, nx = shape
    x0, y0, _ = polynomial_frame(shape)
    pn = np.asarray(science.psf.evaluate(x0, y0), float)
    pr = np.asarray(template.psf.evaluate(x0, y0), float)
    fwhm_n = psf_widths(pn)[0]
    fwhm_r = psf_widths(pr)[0]
    meta.update(science_fwhm=fwhm_n, template_fwhm=fwhm_r, convolved="none", decorrelated=False)
    f_n, f_r = meta["variance_scale_science"], meta["variance_scale_template"]
    sn2 = mean_variance(sci_var, sci_ignore) * f_n
    sr2 = mean_variance(tpl_var, tpl_ignore) * f_r
    meta.update(science_variance_mean=sn2, template_variance_mean=sr2)
    c = math.sqrt(sn2 + sr2)
    half = max(pn.shape[0], pr.shape[0]) // 2

    # Kernels on a small grid (real-space, for the variance planes and the PSF of D).
    G = next_fast_len(4 * (2 * half + 1), real=True)

    def spectra(shape2, real=True):
        f = rfft2 if real else np.fft.fft2
        pn_hat = f(pad_centered(pn, shape2))
        pr_hat = f(pad_centered(pr, shape2))
        den = np.sqrt(sn2 * np.abs(pr_hat) ** 2 + sr2 * np.abs(pn_hat) ** 2)
        den = np.maximum(den, 1e-12 * den.max())
        return pn_hat, pr_hat, den

    pn_g, pr_g, den_g = spectra((G, G), real=False)
    kn_hat_g = c * pr_g / den_g
    kr_hat_g = c * pn_g / den_g
    pd_hat_g = c * pr_g * pn_g / den_g
    pd = np.real(np.fft.ifft2(pd_hat_g))
    kn = np.real(np.fft.ifft2(kn_hat_g))
    kr = np.real(np.fft.ifft2(kr_hat_g))

    # Full-image products.
    pad = G // 2 + 1
    shape_fft = (next_fast_len(ny + pad, real=True), next_fast_len(nx + pad, real=True))
    pn_hat, pr_hat, den = spectra(shape_fft)
    kn_hat = c * pr_hat / den
    kr_hat = c * pn_hat / den
    n_hat = rfft2(sci_img.astype(float), s=shape_fft, workers=FFT_WORKERS)
    r_hat = rfft2(tpl_img.astype(float), s=shape_fft, workers=FFT_WORKERS)
    rk_hat = kr_hat * r_hat
    d_hat = kn_hat * n_hat - rk_hat
    diff = irfft2(d_hat, s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
    matched = irfft2(rk_hat, s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]

    odd = G if G % 2 else G - 1

    def sq_hat(k):
        return rfft2(pad_centered(crop_centered(k, odd) ** 2, shape_fft), workers=FFT_WORKERS)

    vn_hat = rfft2(sci_var.astype(float), s=shape_fft, workers=FFT_WORKERS)
    vn_hat *= f_n
    vr_hat = rfft2(np.where(covered, tpl_var, 0).astype(float), s=shape_fft, workers=FFT_WORKERS)
    vr_hat *= f_r
    var_d = irfft2(vn_hat * sq_hat(kn) + vr_hat * sq_hat(kr), s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
    var_m = irfft2(vr_hat * sq_hat(kr), s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
    floor = 1e-6 * c * c

    grow = int(math.ceil(2 * max(fwhm_n, fwhm_r)))
    mask, planes, no_data = assemble_mask(science, template, grow, grow, covered,
                                           meta["template_coverage"] == 1.0, grow)
    diff = diff.astype(np.float32)
    if no_data is not None:
        diff[no_data] = 0
    ps = max(pn.shape[0], pr.shape[0])
    pd_stamp = crop_centered(pd, ps)
    psf_d = PsfModel(components=(pd_stamp / pd_stamp.sum())[None].astype(np.float32), spatial_order=0,
                     x0=x0, y0=y0, scale=polynomial_frame(shape)[2])
    psf_d.fwhm_pixels = float(psf_widths(pd_stamp)[0])
    difference = replace(science, image=diff, mask=mask, variance=np.maximum(var_d, floor).astype(np.float32),
                         psf=psf_d, mask_planes=planes, metadata=dict(science.metadata))
    tmask = grow_bits(np.asarray(template.mask, np.int32), grow)
    matched_exp = replace(template, image=matched.astype(np.float32), mask=tmask,
                          variance=np.maximum(var_m, 0).astype(np.float32), psf=psf_d,
                          mask_planes=dict(template.mask_planes), metadata=dict(template.metadata))
    matched_exp.image[~covered] = 0
    meta.update(zogy_flux_scale=c, zogy_psf_fwhm=psf_d.fwhm_pixels, time_zogy_s=time.perf_counter() - t0)
    return DiffimResult(difference=difference, matched_template=matched_exp, metadata=meta)
