"""Matching the PSF halos: wide kernel terms fitted to bright stars' ring profiles.

A DECam PSF is a Moffat core plus a halo: a beta ~ 2 profile several core widths wide holding
2-5 % of the flux, its share changing from visit to visit. Where science and template halos
differ, a kernel fitted to the cores leaves rings of residual flux around every bright star.
The core kernel is fitted on stamps of a few FWHM (Rubin's); widening those stamps to the
halo's reach was measured to loosen the match of the cores (the many wing pixels outweigh
them), so the halo is matched in a second step (``HaloTerms``):

* wide terms ``W_j``: unit-sum Gaussians of width ``sigma_j`` set to zero on the core kernel's
  square, so that core and wide terms share no kernel pixel and the two fits do not trade
  flux; ``sigma_j`` double from twice the widest core Gaussian while ``2 sigma_j`` stays within
  the halo's reach (``extent``);
* around bright stars, the sums of the core-matched residual ``G - K_core * R`` (less the
  differential background) and of each ``W_j * R`` in logarithmic rings from the core kernel's
  half-width to the reach, masked pixels and other sources' cores left out, all computed on the
  stars' cutouts;
* the coefficients ``c_j`` fitted by weighted least squares to those ring profiles in units of
  each star's flux (``fit_profiles``), alternating with the core fit;
* the matched image becomes ``K_core * R + sum_j c_j (W_j * R)``.

The wide terms are spatially constant (a halo's share changes by ~15 % across the whole focal
plane, little within one CCD). They are not part of the decorrelation filter, which is
computed from the core kernel (they change the noise spectrum by a few per cent at the
lowest frequencies only). docs/algorithms.md §4.4.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy.special import chdtri

from apsnake.diffim.config import DiffimConfig
from apsnake.diffim.convolve import FFT_WORKERS
from apsnake.diffim.extent import halo_reach
from apsnake.diffim.kernel_stars import halo_stars, source_columns
from apsnake.numerics import cutouts, disc, polynomial_frame, polynomial_terms


def halo_sigmas(widest_core_sigma: float, reach: float, max_terms: int = 4) -> list[float]:
    """Widths (px) of the wide terms: doubling from twice ``widest_core_sigma`` while twice the
    width stays within ``reach`` (px), at most ``max_terms``."""
    sigmas = []
    sigma = 2.0 * widest_core_sigma
    while 2.0 * sigma <= reach and len(sigmas) < max_terms:
        sigmas.append(sigma)
        sigma *= 2.0
    return sigmas


def wide_kernels(sigmas, core_half: int, reach: float) -> list[np.ndarray]:
    """The wide terms as kernels on a ``2 ceil(reach) + 1`` square: unit-sum Gaussians of
    ``sigmas`` px with the core kernel's square (``|u|, |v| <= core_half``) set to zero, so that
    core and wide terms share no pixel of the kernel; their sums are the flux they carry."""
    half = int(math.ceil(reach))
    g = np.arange(-half, half + 1, dtype=float)
    r2 = g[:, None] ** 2 + g[None, :] ** 2
    core = (np.abs(g)[:, None] <= core_half) & (np.abs(g)[None, :] <= core_half)
    kernels = []
    for sigma in sigmas:
        k = np.exp(-r2 / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
        k[core] = 0.0
        kernels.append(k)
    return kernels


def local_convolution(image: np.ndarray, ix, iy, half: int, kernels, chunk: int = 64) -> list[np.ndarray]:
    """``kernel * image`` on the squares of half-width ``half`` around the integer pixels
    (ix, iy), for each kernel of ``kernels``: a list of (n, 2 half + 1, 2 half + 1) arrays, the
    image zero beyond its edges. Each kernel is one odd square (k, k), or one per position
    (n, k, k); all of one size. The stamps' FFTs are shared by the kernels."""
    from scipy.fft import irfft2, next_fast_len, rfft2

    ix, iy = np.asarray(ix, np.int64), np.asarray(iy, np.int64)
    kernels = [np.asarray(k, np.float32) for k in kernels]
    kh = kernels[0].shape[-1] // 2
    side = 2 * (half + kh) + 1
    grid = (next_fast_len(side, real=True),) * 2
    fixed = [None if k.ndim == 3 else rfft2(k, s=grid, workers=FFT_WORKERS) for k in kernels]
    out = [np.empty((ix.size, 2 * half + 1, 2 * half + 1), np.float32) for _ in kernels]
    valid = slice(2 * kh, 2 * kh + 2 * half + 1)  # where the circular convolution is the linear one
    for start in range(0, ix.size, chunk):
        sl = slice(start, start + chunk)
        stamps, _ = cutouts(image, ix[sl], iy[sl], half + kh)
        stamps_hat = rfft2(stamps.astype(np.float32), s=grid, axes=(1, 2), workers=FFT_WORKERS)
        for k, k_hat, o in zip(kernels, fixed, out):
            if k_hat is None:
                k_hat = rfft2(k[sl], s=grid, axes=(1, 2), workers=FFT_WORKERS)
            o[sl] = irfft2(stamps_hat * k_hat, s=grid, axes=(1, 2), workers=FFT_WORKERS)[:, valid, valid]
    return out


def source_core_mask(shape, x, y, radius: int) -> np.ndarray:
    """Boolean image, True within ``radius`` px of any of the positions (x, y)."""
    ny, nx = shape
    r = int(radius)
    footprint = disc(r)
    mask = np.zeros(shape, bool)
    for xi, yi in zip(np.round(x).astype(int), np.round(y).astype(int)):
        y0, y1, x0, x1 = yi - r, yi + r + 1, xi - r, xi + r + 1
        if y1 <= 0 or x1 <= 0 or y0 >= ny or x0 >= nx:
            continue
        sub = footprint[max(0, -y0):2 * r + 1 - max(0, y1 - ny), max(0, -x0):2 * r + 1 - max(0, x1 - nx)]
        mask[max(y0, 0):min(y1, ny), max(x0, 0):min(x1, nx)] |= sub
    return mask


def ring_layout(edges) -> tuple[np.ndarray, int]:
    """Ring index (-1 outside) of each pixel of a ``2 ceil(edges[-1]) + 1`` square, and its half."""
    edges = np.asarray(edges, float)
    half = int(math.ceil(edges[-1]))
    g = np.arange(-half, half + 1)
    ring = np.digitize(np.hypot(g[:, None], g[None, :]), edges) - 1
    ring[ring >= len(edges) - 1] = -1
    return ring, half


def ring_sums(stamps: np.ndarray, good: np.ndarray, edges) -> np.ndarray:
    """Sums of each stamp (n, S, S; S = 2 ceil(edges[-1]) + 1, centred on its source) in the
    rings ``edges[k] <= r < edges[k + 1]`` px, pixels not ``good`` replaced by the mean of the
    ring's others: (n, n_rings); NaN for a ring with fewer than a quarter of its pixels good."""
    ring, _ = ring_layout(edges)
    inring = ring >= 0
    labels = ring[inring]
    n_rings = len(edges) - 1
    area = np.bincount(labels, minlength=n_rings).astype(float)
    values = stamps[:, inring].astype(float)
    ok = good[:, inring]
    offsets = (np.arange(len(stamps)) * n_rings)[:, None] + labels[None, :]
    count = np.bincount(offsets[ok], minlength=len(stamps) * n_rings).reshape(len(stamps), n_rings)
    total = np.bincount(offsets[ok], weights=values[ok], minlength=len(stamps) * n_rings).reshape(count.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = total / count * area
    out[count < 0.25 * area] = np.nan
    return out


def fit_profiles(residual_rings: np.ndarray, term_rings: list[np.ndarray], noise_rings: np.ndarray, flux: np.ndarray,
                 clip: float = 9.0, n_iter: int = 3, p_false: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients ``c`` (and errors) of ``residual ~ sum_j c_j term_j`` fitted to the stars'
    ring profiles in units of each star's flux, by weighted least squares over all (star, ring)
    pairs.

    Weights are ``(flux / noise)^2``, capped per ring at their 75th percentile over the stars
    (the brightest stars count alike: one of them, saturated or with a neighbour, must not set
    the fit alone); stars whose mean chi^2 exceeds ``clip`` times the median star's (a variable
    star, a galaxy, a neighbour's halo in its rings) are dropped and the fit repeated.

    The terms are kept only when together they are significant: ``c^T C^-1 c`` (``C`` the
    coefficients' covariance, scaled by the fit's chi^2) above the chi^2 quantile of
    ``n_terms`` degrees of freedom that noise alone exceeds with probability ``p_false``.
    With a handful of bright stars (a small image) the fitted terms are otherwise noise that
    moves the kernel sum by a per cent or more.

    ``residual_rings``, ``term_rings[j]``, ``noise_rings``: (n_stars, n_rings) ring sums (the
    noise as the standard deviation of the sum); ``flux``: (n_stars,) in the same unit.
    """
    n = len(term_rings)
    f = np.asarray(flux, float)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = (f / noise_rings) ** 2
        target = residual_rings / f
        design = np.stack([t / f for t in term_rings], axis=-1)
    ok = np.isfinite(target) & np.isfinite(weight) & (weight > 0) & np.isfinite(design).all(axis=-1)
    weight = np.where(ok, weight, 0.0)
    for k in range(weight.shape[1]):
        if ok[:, k].any():
            weight[:, k] = np.minimum(weight[:, k], np.quantile(weight[ok[:, k], k], 0.75))
    target, design = np.where(ok, target, 0.0), np.where(ok[..., None], design, 0.0)
    use = ok.any(axis=1)
    coeffs, errors = np.zeros(n), np.full(n, np.inf)
    for _ in range(n_iter + 1):
        if use.sum() < 5:
            return np.zeros(n), np.full(n, np.inf)
        w = weight[use]
        a = design[use].reshape(-1, n) * np.sqrt(w).reshape(-1, 1)
        b = target[use].ravel() * np.sqrt(w).ravel()
        cov = np.linalg.pinv(a.T @ a)
        coeffs = cov @ (a.T @ b)
        chi2 = (weight * (target - design @ coeffs) ** 2).sum(axis=1) / np.maximum(ok.sum(axis=1), 1)
        scale = float(np.median(chi2[use]))
        errors = np.sqrt(np.clip(np.diag(cov), 0, None) * max(scale, 1.0))
        keep = use & (chi2 <= clip * max(scale, 1e-300))
        if keep.sum() == use.sum():
            break
        use = keep
    significance = float(coeffs @ np.linalg.pinv(cov * max(scale, 1.0)) @ coeffs)
    if not significance > chdtri(n, p_false):
        return np.zeros(n), errors
    return coeffs, errors


class HaloTerms:
    """The wide terms that match the PSF halos: their kernels, the bright stars whose ring
    profiles fit them (cutouts around each), and the fitted coefficients. Everything is computed
    on the stars' cutouts; the caller convolves the whole image once, at the end, with the core
    kernel and the combined wide terms (``kernel``)."""

    def __init__(self, ref=None, kernels=(), stars=None):
        self.ref = ref
        self.kernels = list(kernels)
        self.stars = stars
        self.coeffs = np.zeros(len(self.kernels))
        self.errors = np.full(len(self.kernels), np.inf)

    def __bool__(self) -> bool:
        return bool(self.kernels)

    @classmethod
    def prepare(cls, ref, tgt, variance, sources, bad, sci_img, tpl_img, sigmas, core_half: int, fwhm: float,
                cfg: DiffimConfig, meta: dict) -> HaloTerms:
        """Reach of the halos (``extent``), the wide kernels, and the rings (from the core
        kernel's half-width to the reach) around bright stars on which they are fitted, with the
        terms' ring sums there. No terms when ``halo_encircled_energy`` is None or none fits the
        reach. ``variance``: ``(plane, factor)`` pairs whose weighted sum is the variance of
        ``tgt - K * ref`` (only read around the fit stars)."""
        if cfg.halo_encircled_energy is None:
            return cls()
        t0 = time.perf_counter()
        r_max = int(cfg.halo_growth_radius)
        hx, hy, hsnr = halo_stars(sources, ref.shape, r_max)
        r_sci, r_tpl, n_halo = halo_reach(sci_img, tpl_img, bad, hx, hy, hsnr, cfg.halo_encircled_energy, r_max)
        # At least as far as DECam halos typically reach (several core widths): with few bright
        # stars the wing is poorly measured, and a term the halos do not need is fitted to ~0.
        reach = cfg.halo_min_reach_fwhm * fwhm
        if n_halo >= cfg.halo_min_stars and np.isfinite(max(r_sci, r_tpl)):
            reach = max(reach, r_sci, r_tpl)
        reach = min(reach, float(cfg.halo_radius_max))
        wide = halo_sigmas(sigmas[-1], reach, cfg.halo_max_terms)
        meta.update(halo_stars=n_halo, encircled_energy_radius_science=r_sci, time_halo_s=0.0,
                    encircled_energy_radius_template=r_tpl, halo_reach=reach, halo_sigmas=[round(s, 3) for s in wide])
        if not wide:
            return cls()
        x, y, flux, snr, flagged = source_columns(sources)
        located = np.isfinite(x) & np.isfinite(y)
        bright = np.flatnonzero(located & np.isfinite(snr) & (snr >= cfg.halo_fit_min_snr) & ~flagged
                                & np.isfinite(flux) & (flux > 0))
        bright = bright[np.argsort(-snr[bright])][:cfg.halo_fit_max_stars]
        # Rings from just beyond the core kernel to the reach; masked pixels and the cores of
        # other sources (which the wide terms must not try to fit) are left out.
        edges = np.geomspace(core_half + 0.5, reach, cfg.halo_rings + 1)
        _, half = ring_layout(edges)
        ix, iy = np.round(x[bright]).astype(np.int64), np.round(y[bright]).astype(np.int64)
        exclude = bad | source_core_mask(ref.shape, x[located], y[located], core_half)
        excluded, inside = cutouts(exclude, ix, iy, half, fill=True)
        good = inside & ~excluded
        kernels = wide_kernels(wide, core_half, reach)
        stars = dict(ix=ix, iy=iy, x=x[bright], y=y[bright], flux=flux[bright], edges=edges, half=half, good=good,
                     target=cutouts(tgt, ix, iy, half)[0].astype(float),
                     terms=[ring_sums(t, good, edges) for t in local_convolution(ref, ix, iy, half, kernels)],
                     noise=np.sqrt(np.clip(ring_sums(sum(np.float32(f) * cutouts(v, ix, iy, half)[0] for v, f in variance),
                                                     good, edges), 0, None)))
        meta["halo_fit_stars"] = int(bright.size)
        meta["time_halo_s"] = time.perf_counter() - t0
        return cls(ref, kernels, stars)

    def fit(self, core_kernels: np.ndarray, core_fit: dict) -> None:
        """Fit the coefficients to the stars' ring profiles of the target less the reference
        matched with the core kernel (``core_kernels``, the spatial components of
        ``core_fit``) and less the core fit's differential background."""
        st = self.stars
        x0, y0, scale = polynomial_frame(self.ref.shape)
        u, v = (st["ix"] - x0) / scale, (st["iy"] - y0) / scale
        local = np.tensordot(polynomial_terms(core_fit["k_order"], u, v), core_kernels, axes=1)
        background = polynomial_terms(core_fit["b_order"], u, v) @ core_fit["c"]
        residual = st["target"] - local_convolution(self.ref, st["ix"], st["iy"], st["half"], [local])[0]
        residual -= background[:, None, None]
        rings = ring_sums(residual, st["good"], st["edges"])
        self.coeffs, self.errors = fit_profiles(rings, st["terms"], st["noise"], st["flux"])

    def kernel(self) -> np.ndarray:
        """``sum_j c_j W_j``: the combined wide kernel."""
        return sum(np.float32(c) * k.astype(np.float32) for c, k in zip(self.coeffs, self.kernels))

    def subtract_from(self, image: np.ndarray, ix, iy, half: int) -> np.ndarray:
        """A copy of ``image`` less the wide terms' contribution on the squares of half-width
        ``half`` around (ix, iy) (the kernel stars' stamps: all the core fit reads)."""
        out = image.copy()
        contribution = local_convolution(self.ref, ix, iy, half, [self.kernel()])[0]
        ny, nx = image.shape
        for i, (xc, yc) in enumerate(zip(np.asarray(ix, int), np.asarray(iy, int))):
            y0, x0 = yc - half, xc - half
            ys, xs = slice(max(y0, 0), min(yc + half + 1, ny)), slice(max(x0, 0), min(xc + half + 1, nx))
            out[ys, xs] = image[ys, xs] - contribution[i, ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        return out
