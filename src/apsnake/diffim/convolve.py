"""Whole-image convolution with a spatially varying kernel, and the decorrelation filter.

With the spatial polynomial ``P_s(x, y)`` the convolved image is ``sum_s P_s(x, y) (K_s *
ref)(x, y)`` with ``K_s = sum_j a_js B_j``: one forward FFT of the image and one inverse FFT
per spatial term (3 for order 1), ``scipy.fft`` on ``FFT_WORKERS`` threads. Decorrelation is
Rubin's ``DecorrelateALKernelTask`` (DMTN-021), see ``decorrelation``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from apsnake.exposure import PsfModel
from apsnake.numerics import crop_centered, pad_centered, polynomial_frame, term_powers

FFT_WORKERS = 1  # scipy.fft workers (the pipeline parallelises over detectors)


def fft_shape(shape, pad: int):
    from scipy.fft import next_fast_len

    return (next_fast_len(shape[0] + pad, real=True), next_fast_len(shape[1] + pad, real=True))


def _kernel_spectra(kernels: np.ndarray, shape_fft) -> np.ndarray:
    """rfft2 of small centred kernels zero-padded to ``shape_fft``: (n, Py, Px//2+1) complex64.

    Small kernels as DFT matrix products (``E_y K E_x``: cheaper than FFTs of mostly-zero
    full-size arrays); from ~31 px on (halo-sized kernels) the matrix products cost more than
    FFTs: a real FFT along x of the kernel's ``ks`` rows only, then an FFT along y.
    """
    from scipy.fft import fft, rfft

    n, ks, _ = kernels.shape
    h = ks // 2
    py, px = shape_fft
    if ks >= 31:
        out = np.zeros((n, py, px // 2 + 1), np.complex64)
        rows = (np.arange(ks) - h) % py
        cols = (np.arange(ks) - h) % px
        for i, k in enumerate(kernels):
            line = np.zeros((ks, px), np.float32)
            line[:, cols] = k
            out[i, rows] = rfft(line, axis=1, workers=FFT_WORKERS)
            out[i] = fft(out[i], axis=0, workers=FFT_WORKERS)
        return out
    lag = np.arange(-h, h + 1)
    ey = np.exp(-2j * np.pi * np.outer(np.arange(py), lag) / py).astype(np.complex64)
    ex = np.exp(-2j * np.pi * np.outer(lag, np.arange(px // 2 + 1)) / px).astype(np.complex64)
    out = np.empty((n, py, px // 2 + 1), np.complex64)
    for i, k in enumerate(kernels):
        np.matmul(ey @ k.astype(np.complex64), ex, out=out[i])
    return out


def convolve_spatial(image, kernels, order, shape_fft, extra=None):
    """``sum_s P_s(x, y) (K_s * image)`` for the spatial polynomial terms ``P_s``, plus
    ``W * other`` for an optional ``extra = (W, other)``: a spatially constant kernel of any odd
    size (the halo terms; ``shape_fft`` must pad the image by its half-width) and the image it
    applies to; also returns ``|K_0^|^2``, the squared modulus of the FFT of the central kernel
    (without ``W``) on the padded grid."""
    from scipy.fft import irfft2, rfft2

    ny, nx = image.shape
    x0, y0, scale = polynomial_frame(image.shape)
    urow = ((np.arange(nx) - x0) / scale).astype(np.float32)[None, :]
    vcol = ((np.arange(ny) - y0) / scale).astype(np.float32)[:, None]
    img_hat = rfft2(image, s=shape_fft, workers=FFT_WORKERS)
    spectra = _kernel_spectra(kernels, shape_fft)
    k0_abs2 = spectra[0].real ** 2
    k0_abs2 += spectra[0].imag ** 2
    extra_hat = None
    if extra is not None:
        extra_hat = _kernel_spectra(np.asarray(extra[0], np.float32)[None], shape_fft)[0]
        extra_hat *= rfft2(extra[1], s=shape_fft, workers=FFT_WORKERS)
    out = None
    for s, (pu, pv) in enumerate(term_powers(order)):
        spectra[s] *= img_hat
        if s == 0 and extra_hat is not None:
            spectra[s] += extra_hat
        conv = irfft2(spectra[s], s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
        if s == 0:
            out = np.array(conv, copy=True)
            continue
        if pu:
            conv *= urow ** pu
        if pv:
            conv *= vcol ** pv
        out += conv
    return out, k0_abs2


def kernel_sq_sum_map(kernels, order, shape) -> np.ndarray:
    """``sum(K(x, y)^2)`` over the kernel pixels at every image pixel (a polynomial)."""
    ny, nx = shape
    x0, y0, scale = polynomial_frame(shape)
    u = (np.arange(nx) - x0) / scale
    v = (np.arange(ny) - y0) / scale
    powers = term_powers(order)
    gram = np.einsum("sij,tij->st", kernels, kernels)
    max_v = 2 * order
    rows = np.zeros((max_v + 1, nx))
    for s, (us, vs) in enumerate(powers):
        for t, (ut, vt) in enumerate(powers):
            rows[vs + vt] += gram[s, t] * u ** (us + ut)
    out = np.broadcast_to(rows[0].astype(np.float32), shape).copy()
    for pv in range(1, max_v + 1):
        if np.any(rows[pv]):
            out += (v ** pv).astype(np.float32)[:, None] * rows[pv].astype(np.float32)[None, :]
    return out


def decorrelation(k_center, var_unconv, var_conv, psf: PsfModel, shape_fft=None):
    """Decorrelation filter phi on a small grid (for the PSF and the variance weights).

    Returns the convolved PSF model, the weights ``<phi^2>`` and ``<|K phi|^2>`` and the kernel
    sum.
    """
    from scipy.fft import irfft2, next_fast_len, rfft2

    ks = k_center.shape[0]
    ps = psf.components.shape[-1]
    G = next_fast_len(2 * (ks + ps), real=True)
    k_hat = np.fft.fft2(pad_centered(k_center, (G, G)))
    ksum = float(k_center.sum())
    k2 = np.abs(k_hat) ** 2
    phi = np.sqrt((var_unconv + var_conv * ksum ** 2) / (var_unconv + var_conv * k2))
    w_unconv = float(np.mean(phi ** 2))
    w_conv = float(np.mean(k2 * phi ** 2))
    comps = pad_centered(np.asarray(psf.components, float), (G, G))
    half = phi[:, : G // 2 + 1]
    new = irfft2(rfft2(comps, axes=(-2, -1)) * half, s=(G, G), axes=(-2, -1))
    new_psf = replace(psf, components=crop_centered(new, ps).astype(np.float32))
    return new_psf, w_unconv, w_conv, ksum
