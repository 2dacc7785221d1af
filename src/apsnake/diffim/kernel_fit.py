"""The spatially varying PSF-matching kernel, fitted to kernel-star stamps.

On a stamp of half-width ``max(h, ceil(2.5 FWHM))`` around each star,
``target = sum_j k_j(x_i) (B_j * ref) + b(x_i)`` by weighted linear least squares (weights
``1 / (var_tgt + var_ref)``): ``k_j`` are polynomials of order ``spatial_order`` in position,
``b`` the differential background (order ``background_order``, constant over a stamp). The
basis convolutions of the stamps use the separability of the raw basis. The orders drop while
there are fewer than ``min_stars_per_term`` stars per term; stars whose normalised residuals
have a mean above ``max_residual_mean`` or a standard deviation above ``max_residual_std``
(Rubin 0.25, 1.5) are rejected and the fit repeated, up to ``n_iter`` times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from apsnake.diffim.basis import raw_basis_factors
from apsnake.diffim.config import DiffimConfig
from apsnake.diffim.convolve import FFT_WORKERS
from apsnake.numerics import (
    cutouts,
    n_terms,
    pad_centered,
    polynomial_frame,
    polynomial_terms,
)


@dataclass
class KernelStamps:
    ref_hat: np.ndarray   # (N, L, L//2+1) complex64: FFT of the reference cutouts
    var_hat: np.ndarray   # (N, L, L//2+1) complex64: FFT of the reference variance cutouts
    tgt: np.ndarray       # (N, S, S) float64 target stamps
    tgt_var: np.ndarray   # (N, S, S) float64 target variance
    M: np.ndarray         # (N, nb+1, nb+1) local normal matrices (basis + constant)
    b: np.ndarray         # (N, nb+1) local right-hand sides
    p_xy: np.ndarray      # (N, 2) positions (x, y)
    fft_size: int


def build_stamps(ref_img, ref_var, tgt_img, tgt_var, ix, iy, sigmas, degrees, ks, hs, ref_scale=1.0,
                 tgt_scale=1.0, chunk=64) -> KernelStamps:
    """Cutouts, their FFTs and the per-star normal equations of the basis fit.

    The raw basis is separable, ``raw_j = fy_j(y) fx_j(x)``, so ``raw_j * ref`` is an inverse FFT
    along y of ``ref^ fy_j^`` (one per distinct y factor, keeping only the rows of the stamp)
    followed by an inverse real FFT along x of that times ``fx_j^``; the normal equations of the
    raw basis are then transformed to the renormalised one (``basis = T raw``).
    """
    from scipy.fft import fft, ifft, irfft, next_fast_len, rfft, rfft2

    fx, fy, T = raw_basis_factors(sigmas, degrees, ks)
    nb = len(fx)
    kh = ks // 2
    big = hs + kh
    side = 2 * big + 1
    L = next_fast_len(side, real=True)
    S = 2 * hs + 1
    P = S * S
    # distinct 1-D factors and their transforms (factor centre at index 0)
    def unique_rows(f):
        keys, inverse = np.unique(np.round(f, 12), axis=0, return_inverse=True)
        first = np.array([np.flatnonzero(inverse.ravel() == k)[0] for k in range(len(keys))])
        return f[first], inverse.ravel()

    uy, which_y = unique_rows(fy)
    fy_hat = fft(pad_centered(uy[:, None, :], (1, L))[:, 0, :], axis=-1).astype(np.complex64)   # (ny, L)
    fx_hat = rfft(pad_centered(fx[:, None, :], (1, L))[:, 0, :], axis=-1).astype(np.complex64)  # (nb, L//2+1)
    n = len(ix)
    ref_hat = np.empty((n, L, L // 2 + 1), np.complex64)
    var_hat = np.empty_like(ref_hat)
    tgt = cutouts(tgt_img, ix, iy, hs)[0].astype(float)
    tvar = cutouts(tgt_var, ix, iy, hs)[0].astype(float) * tgt_scale
    M = np.empty((n, nb + 1, nb + 1))
    b = np.empty((n, nb + 1))
    Taug = np.eye(nb + 1)
    Taug[:nb, :nb] = T
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        rc = cutouts(ref_img, ix[sl], iy[sl], big)[0].astype(np.float32)
        vc = cutouts(ref_var, ix[sl], iy[sl], big)[0].astype(np.float32) * np.float32(ref_scale)
        m = len(rc)
        ref_hat[sl] = rfft2(rc, s=(L, L), workers=FFT_WORKERS)
        var_hat[sl] = rfft2(vc, s=(L, L), workers=FFT_WORKERS)
        # y pass: circular convolution along y; rows kh..kh+S-1 are exact
        ycols = ifft(ref_hat[sl][:, None] * fy_hat[None, :, :, None], axis=-2,
                     workers=FFT_WORKERS)[:, :, kh:kh + S, :]               # (m, ny, S, L//2+1)
        conv = irfft(ycols[:, which_y] * fx_hat[None, :, None, :], n=L, axis=-1,
                     workers=FFT_WORKERS)[..., kh:kh + S]                    # (m, nb, S, S)
        X = np.empty((m, nb + 1, P))
        X[:, :nb] = conv.reshape(m, nb, P)
        X[:, nb] = 1.0
        ref_stamp_var = vc[:, kh:kh + S, kh:kh + S].astype(float)
        w = 1.0 / (tvar[sl] + ref_stamp_var).reshape(m, P)
        w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
        Xw = X * w[:, None, :]
        M[sl] = Taug @ (Xw @ X.transpose(0, 2, 1)) @ Taug.T
        b[sl] = (Xw @ tgt[sl].reshape(m, P, 1))[:, :, 0] @ Taug.T
    return KernelStamps(ref_hat=ref_hat, var_hat=var_hat, tgt=tgt, tgt_var=tvar, M=M, b=b,
                        p_xy=np.column_stack([ix, iy]).astype(float), fft_size=L)


def _solve(M, b, p, q, nb, max_condition):
    """Least-squares spatial solution from the per-star normal equations.

    Unknowns: ``a[j, s]`` (basis j, spatial term s) and ``c[t]`` (background term t); the local
    coefficients of star i are ``k_ij = sum_s a_js p_is`` and ``bg_i = sum_t c_t q_it``.
    """
    nk, nbg = p.shape[1], q.shape[1]
    KK = np.einsum("ijl,is,it->jslt", M[:, :nb, :nb], p, p, optimize=True).reshape(nb * nk, nb * nk)
    KB = np.einsum("ij,is,it->jst", M[:, :nb, nb], p, q, optimize=True).reshape(nb * nk, nbg)
    BB = np.einsum("i,is,it->st", M[:, nb, nb], q, q)
    A = np.block([[KK, KB], [KB.T, BB]])
    r = np.concatenate([np.einsum("ij,is->js", b[:, :nb], p).ravel(), np.einsum("i,it->t", b[:, nb], q)])
    d = np.sqrt(np.clip(np.diag(A), 0, None))
    d[d == 0] = 1.0
    As = A / d[:, None] / d[None, :]
    w, V = np.linalg.eigh(As)
    wmax = w.max()
    keep = w > wmax / max_condition
    sol = V[:, keep] @ ((V[:, keep].T @ (r / d)) / w[keep])
    theta = sol / d
    condition = float(wmax / max(w.min(), np.finfo(float).tiny))
    return theta[: nb * nk].reshape(nb, nk), theta[nb * nk:], condition, int((~keep).sum())


def _star_residuals(st: KernelStamps, basis, k_loc, bg_loc, hs, accuracy: float = 0.0):
    """Residuals of the local kernels on the stamps: (normalised residuals, matched star model
    without background, residuals, noise sigma), each (N, S, S); ``accuracy`` times the model is
    added in quadrature to the noise."""
    from scipy.fft import irfft2, rfft2

    kh = basis.shape[-1] // 2
    L = st.fft_size
    S = 2 * hs + 1
    kern = np.tensordot(k_loc, basis, axes=1)  # (N, ks, ks)
    kern_hat = rfft2(pad_centered(kern.astype(np.float32), (L, L)), workers=FFT_WORKERS)
    sq_hat = rfft2(pad_centered((kern ** 2).astype(np.float32), (L, L)), workers=FFT_WORKERS)
    model = irfft2(st.ref_hat * kern_hat, s=(L, L), workers=FFT_WORKERS)[:, kh:kh + S, kh:kh + S]
    vconv = irfft2(st.var_hat * sq_hat, s=(L, L), workers=FFT_WORKERS)[:, kh:kh + S, kh:kh + S]
    sigma = np.sqrt(np.clip(st.tgt_var + vconv + (accuracy * model) ** 2, 1e-30, None))
    resid = st.tgt - model - bg_loc[:, None, None]
    return resid / sigma, model, resid, sigma


def _flux_and_shift(model, resid, sigma, core):
    """Per star, within ``core``: the residual as a fraction of the star's flux and as a shift
    (pixels along x and y), with their 1-sigma errors: the linear fits ``resid = f * model``
    and ``resid = -d * grad(model)``, i.e. what a brightening or a move would leave."""
    gy, gx = np.gradient(model, axis=(1, 2))
    var = sigma ** 2
    out = []
    for profile, scale in ((model, 1.0), (gx, -1.0), (gy, -1.0)):
        p = np.where(core, profile, 0.0)
        pp = np.maximum((p * p).sum(axis=(1, 2)), 1e-30)
        out.append((scale * (p * resid).sum(axis=(1, 2)) / pp, np.sqrt((p * p * var).sum(axis=(1, 2))) / pp))
    return out


def fit_kernel(st: KernelStamps, basis, shape, hs, cfg: DiffimConfig, core_radius: float | None = None):
    """Spatial kernel fit with iterative rejection of stars with outlying residuals.

    The residual statistics that reject a star are taken within ``core_radius`` px of it (the
    whole stamp if None): a halo-sized stamp would otherwise dilute the residual of a star that
    moved or varied over thousands of sky pixels.
    """
    nb = basis.shape[0]
    n = len(st.M)
    x0, y0, scale = polynomial_frame(shape)
    u = (st.p_xy[:, 0] - x0) / scale
    v = (st.p_xy[:, 1] - y0) / scale
    k_order, b_order = cfg.spatial_order, cfg.background_order
    use = np.ones(n, bool)
    history = []
    g = np.arange(-hs, hs + 1)
    core = np.ones((2 * hs + 1, 2 * hs + 1), bool) if core_radius is None else \
        (g[:, None] ** 2 + g[None, :] ** 2) <= core_radius ** 2
    for iteration in range(cfg.n_iter + 1):
        n_use = int(use.sum())
        k_order = cfg.spatial_order
        while k_order > 0 and n_use < cfg.min_stars_per_term * n_terms(k_order):
            k_order -= 1
        b_order = cfg.background_order
        while b_order > 0 and n_use < cfg.min_stars_per_term * n_terms(b_order):
            b_order -= 1
        p = polynomial_terms(k_order, u, v)
        q = polynomial_terms(b_order, u, v)
        a, c, condition, dropped = _solve(st.M[use], st.b[use], p[use], q[use], nb, cfg.max_condition)
        k_loc = p @ a.T
        bg_loc = q @ c
        z, model, resid, sigma = _star_residuals(st, basis, k_loc, bg_loc, hs, cfg.rejection_accuracy)
        r_mean = z[:, core].mean(axis=1)
        r_std = z[:, core].std(axis=1)
        (flux, flux_err), (dx, dx_err), (dy, dy_err) = _flux_and_shift(model, resid, sigma, core)
        history.append(n_use)
        if iteration == cfg.n_iter:
            break
        # Rubin's tests on the normalised residuals, and ours on what a star that varied or moved
        # leaves: a flux or a position residual significant beyond its noise and a floor.
        flux_excess = np.abs(flux) / np.maximum(cfg.residual_sigma * flux_err, cfg.residual_flux_floor)
        shift_excess = np.hypot(dx, dy) / np.maximum(cfg.residual_sigma * np.hypot(dx_err, dy_err),
                                                     cfg.residual_shift_floor)
        badness = np.maximum.reduce([np.abs(r_mean) / cfg.max_residual_mean, r_std / cfg.max_residual_std,
                                     flux_excess, shift_excess])
        bad = use & (badness > 1)
        # Keep min_kernel_stars, and reject at most a tenth of the stars (at least one) per
        # iteration, the worst ones: in a fit of few stars one that varied or moved distorts the
        # kernel so that the others look bad too (on the real DECam stamps, 3 of 6 went with it).
        limit = min(n_use - cfg.min_kernel_stars, max(1, math.ceil(0.1 * n_use)))
        if bad.sum() > limit:
            worst = np.flatnonzero(bad)
            bad[:] = False
            bad[worst[np.argsort(-badness[worst])[:max(limit, 0)]]] = True
        if not bad.any():
            break
        use &= ~bad
    return dict(a=a, c=c, k_order=k_order, b_order=b_order, use=use, r_mean=r_mean, r_std=r_std,
                flux_residual=flux, shift_residual=np.hypot(dx, dy), condition=condition, dropped=dropped,
                history=history)
