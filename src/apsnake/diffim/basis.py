"""The Alard-Lupton kernel basis (docs/algorithms.md, difference imaging).

For each Gaussian ``sigma_g`` and degree ``d_g``: ``G_g(x) G_g(y) (x/h)^i (y/h)^j`` with
``i + j <= d_g`` on a ``(2h + 1)``-px square (27 functions for degrees 4/2/2). The first is
normalised to unit sum, every other one made zero-sum (minus its sum times the first) and of
unit L2 norm (Rubin ``renormalizeKernelList``), so the kernel sum is the first coefficient.
Widths scale with the seeing (Rubin ``scaleByFwhm``). The PSF halos, beyond this core basis,
are matched afterwards (``halo``).
"""

from __future__ import annotations

import math

import numpy as np

from apsnake.diffim.config import DiffimConfig
from apsnake.numerics import SIGMA_TO_FWHM


def basis_sigmas(fwhm_ref: float, fwhm_tgt: float, config: DiffimConfig | None = None):
    """Gaussian widths and kernel size of the Alard-Lupton basis.

    Parameters
    ----------
    fwhm_ref : float
        FWHM of the image to be convolved, pixels.
    fwhm_tgt : float
        FWHM of the image to be matched, pixels.
    config : DiffimConfig, optional

    Returns
    -------
    sigmas : list of float
        Gaussian sigmas, pixels.
    size : int
        Kernel side, pixels (odd).
    """
    cfg = config or DiffimConfig()
    if not cfg.scale_by_fwhm or not (np.isfinite(fwhm_ref) and np.isfinite(fwhm_tgt)):
        sigmas = [float(s) for s in cfg.sigmas]
    else:
        s_ref, s_tgt = fwhm_ref / SIGMA_TO_FWHM, fwhm_tgt / SIGMA_TO_FWHM
        deconvolve = s_tgt < s_ref
        floor = cfg.min_sigma_deconvolve if deconvolve else cfg.min_sigma
        sigma_k = max(math.sqrt(abs(s_tgt ** 2 - s_ref ** 2)), floor)
        sigmas = [max(floor, sigma_k / cfg.gauss_beta)]
        while len(sigmas) < cfg.n_gaussians:
            sigmas.append(sigmas[-1] * cfg.gauss_beta)
    size = int(cfg.kernel_size_fwhm_scaling * sigmas[-1])
    size += 0 if size % 2 else 1
    size = min(cfg.kernel_size_max, max(size, cfg.kernel_size_min))
    return sigmas, size


def raw_basis_factors(sigmas, degrees, size: int):
    """1-D factors of the raw (separable) Alard-Lupton basis.

    Returns ``fx`` and ``fy`` ((n_basis, size) arrays: ``raw_j(y, x) = fy[j](y) fx[j](x)``) and
    the (n_basis, n_basis) matrix ``T`` with ``basis = T @ raw`` (renormalisation).
    """
    h = size // 2
    g = np.arange(-h, h + 1, dtype=float)
    t = g / h
    fx, fy = [], []
    for sigma, degree in zip(sigmas, degrees):
        gauss = np.exp(-0.5 * (g / sigma) ** 2)
        for i in range(degree + 1):          # power of x
            for j in range(degree + 1 - i):  # power of y
                fx.append(gauss * t ** i)
                fy.append(gauss * t ** j)
    fx, fy = np.array(fx), np.array(fy)
    raw = fy[:, :, None] * fx[:, None, :]
    n = len(raw)
    sums = raw.sum(axis=(1, 2))
    T = np.zeros((n, n))
    T[0, 0] = 1.0 / sums[0]
    basis0 = raw[0] / sums[0]
    for k in range(1, n):
        # basis_k = (raw_k - sum_k * basis_0) / norm_k
        row = np.zeros(n)
        row[k] = 1.0
        row -= sums[k] * T[0]
        vec = raw[k] - sums[k] * basis0
        row /= math.sqrt((vec ** 2).sum())
        T[k] = row
    return fx, fy, T


def alard_lupton_basis(sigmas, degrees, size: int) -> np.ndarray:
    """The renormalised Alard-Lupton basis: (n_basis, size, size) float64.

    ``G(x) G(y) (x/h)^i (y/h)^j`` for each Gaussian and ``i + j <= degree`` (h = size // 2); the
    first has unit sum, the others zero sum and unit L2 norm.
    """
    fx, fy, T = raw_basis_factors(sigmas, degrees, size)
    raw = fy[:, :, None] * fx[:, None, :]
    return np.tensordot(T, raw, axes=1)
