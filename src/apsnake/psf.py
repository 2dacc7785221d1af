"""PSF stars, the spatially varying pixel-basis PSF model, and PSF photometry.

Our decision (ALGORITHMS.md, "Our decisions" and section 2 items 5-6): a PSFEx-like model,
``spatial_order`` 2 across the CCD, measured on clean, unsaturated, isolated stars. The model
is the ``PsfModel`` of ``apsnake.exposure`` (pixel-basis components combined by a 2-D
polynomial in scaled pixel coordinates); this module builds it and uses it.

Conventions
-----------
* Pixel coordinates are 0-based numpy indices of the trimmed image: ``x`` is the column,
  ``y`` the row, and pixel ``(i, j)`` has its centre at ``x = j``, ``y = i``.
* Images may be in any linear unit (ADU, electrons, nJy); variances are in that unit
  squared; fluxes come out in the image unit (summed over pixels).
* Images are background-subtracted.
* A PSF stamp is centred on its central pixel: the model evaluated at ``(x, y)`` has the
  windowed centroid of the stars it was built from on the stamp centre, so a source at
  ``(x, y)`` is fitted with that stamp shifted by ``(x - round(x), y - round(y))``.
* Sub-pixel shifts use separable sinc interpolation of the zero-padded stamp (a Fourier
  shift, written as small matrices): exact for a band-limited PSF, unlike Lanczos-3, which
  biases PSF fluxes by up to 0.4 % at half-pixel offsets for a 3-px FWHM.

Functions
---------
``select_psf_stars``
    Rubin objectSize-like selection: clean, isolated, S/N >= 50, on the stellar size locus.
``fit_psf`` / ``fit_psf_model``
    PSFEx-like fit of the pixel-basis model (``fit_psf`` also returns diagnostics and which
    stars were used, i.e. Rubin ``calib_psf_used``).
``psf_flux``
    Linear PSF-fit flux at fixed positions, vectorised (Rubin PsfFlux: PSF-weighted,
    unweighted by the variance, error propagated from the variance plane).
``measure_fwhm``
    FWHM of a PSF stamp from the area inside its half-maximum contour.
``windowed_moments``
    Gaussian-windowed centroids and sizes (a flux-independent size for the star selector).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from apsnake.errors import ApsnakeError
from apsnake.exposure import PsfModel

log = logging.getLogger(__name__)

GAUSSIAN_SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
_LANCZOS_A = 3  # Lanczos order of the kernel that spreads bad-pixel masks
_SHIFT_PAD = 4  # zero padding (pixels) of stamps for the sinc (Fourier) shifts
_MASK_SPREAD = 0.05  # a pixel taking this much (|Lanczos-3| weight) of a masked one is masked
_STAMP_MARGIN = 3  # extra pixels around the stamps cut for recentring


class PsfError(ApsnakeError, ValueError):
    """The PSF cannot be measured (too few good stars, bad input)."""


@dataclass
class PsfConfig:
    """PSF star selection and model options (Rubin defaults where Rubin has one).

    Attributes
    ----------
    stamp_size : int
        Side of the PSF stamp, pixels, odd. Rubin PSFEx ``kernelSize=41`` at 0.168"/px (HSC);
        25 px (6.6") covers DECam seeing of 0.8-2".
    spatial_order : int
        Order of the 2-D polynomial in position (Rubin PSFEx ``spatialOrder=2``). Lowered
        automatically when there are fewer than ``min_stars_per_term * n_terms`` usable
        stars: with ~70 stars an order-2 fit (6 terms) chases noise at the CCD corners
        (FWHM off by 3% on the simulator's truth) where order 1 is within 1%.
    min_stars_per_term : float
        Usable PSF stars needed per polynomial term to keep an order.
    min_snr : float
        Minimum S/N of a PSF star (Rubin objectSize ``signalToNoiseMin=50``).
    max_stars : int
        At most this many stars (the highest-S/N ones) are selected.
    min_stars : int
        ``PsfError`` when fewer usable stars remain.
    isolation_radius : float
        Pixels. A star is isolated when no other detection within this radius is brighter
        than ``isolation_flux_ratio`` times its flux.
    isolation_flux_ratio : float
        See ``isolation_radius``.
    width_std_allowed : float
        Fractional half-width of the stellar size locus around its mode (Rubin objectSize
        ``widthStdAllowed=0.15``).
    clip_sigma : float
        Sigma-clipping threshold for the size locus and the star chi2 rejection.
    n_iter : int
        Clipping iterations of the size locus; fit/reject iterations of the model.
    accuracy : float
        Fractional model uncertainty added in quadrature to the pixel noise when weighting
        and rejecting stars (PSFEx ``PSF_ACCURACY=0.01``): bright stars do not dominate.
    pixel_clip : float
        Pixels deviating by more than this many sigma from the model are ignored (cosmic
        rays, faint neighbours).
    """

    stamp_size: int = 25
    spatial_order: int = 2
    min_stars_per_term: float = 20.0
    min_snr: float = 50.0
    max_stars: int = 300
    min_stars: int = 10
    isolation_radius: float = 12.0
    isolation_flux_ratio: float = 0.1
    width_std_allowed: float = 0.15
    clip_sigma: float = 3.0
    n_iter: int = 3
    accuracy: float = 0.01
    pixel_clip: float = 5.0

    def __post_init__(self):
        if self.stamp_size < 7 or self.stamp_size % 2 != 1:
            raise PsfError(f"stamp_size must be odd and >= 7, got {self.stamp_size}")
        if self.spatial_order < 0:
            raise PsfError(f"spatial_order must be >= 0, got {self.spatial_order}")
        if self.min_stars < 1 or self.max_stars < self.min_stars:
            raise PsfError(f"need 1 <= min_stars <= max_stars, got {self.min_stars}, {self.max_stars}")


@dataclass
class PsfFit:
    """The result of ``fit_psf``.

    Attributes
    ----------
    model : PsfModel
        The fitted model.
    used : numpy.ndarray of bool
        Per input star: kept in the final fit (Rubin ``calib_psf_used``).
    x, y : numpy.ndarray
        Refined (Gaussian-windowed) centroids of the input stars, pixels; NaN where unusable.
    flux : numpy.ndarray
        PSF-fit flux of each input star inside the stamp, image unit; NaN where unusable.
    chi2_dof : numpy.ndarray
        Reduced chi2 of each star against the final model within ``2 * FWHM`` of its centre
        (pixel noise only); NaN where unusable.
    spatial_order : int
        The spatial order actually fitted.
    """

    model: PsfModel
    used: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    chi2_dof: np.ndarray
    spatial_order: int


# ---------------------------------------------------------------------------
# Small numerical helpers.
def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def _poly_terms(order: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N, n_terms) polynomial terms 1, u, v, u^2, uv, v^2, ... (the PsfModel order)."""
    return np.stack([u ** (n - j) * v ** j for n in range(order + 1) for j in range(n + 1)], axis=-1)


def _lanczos(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, float)
    return np.where(np.abs(t) < _LANCZOS_A, np.sinc(t) * np.sinc(t / _LANCZOS_A), 0.0)


def _dirichlet(t: np.ndarray, period: int) -> np.ndarray:
    """Periodic sinc (Dirichlet kernel) of odd ``period``: exact band-limited interpolation of a
    zero-padded signal of that period, i.e. a Fourier shift written as a matrix."""
    t = np.asarray(t, float)
    den = period * np.sin(np.pi * t / period)
    small = np.abs(den) < 1e-9
    return np.where(small, 1.0, np.sin(np.pi * t) / np.where(small, 1.0, den))


def _padded_period(n: int) -> int:
    period = n + 2 * _SHIFT_PAD
    return period if period % 2 == 1 else period + 1


def _toeplitz_index(n: int) -> np.ndarray:
    """(n, n) index of the lag i - j into a kernel sampled at lags 1 - n .. n - 1."""
    return np.arange(n)[:, None] - np.arange(n)[None, :] + n - 1


def _shift_matrices(n: int, shift: np.ndarray) -> np.ndarray:
    """Sinc (Fourier) resampling matrices for 1-D signals of length ``n``, zero-padded.

    ``(M[k] @ s)[i]`` is ``s`` interpolated at ``i + shift[k]``. Returns (N, n, n).
    """
    shift = np.asarray(shift, float)
    kernel = _dirichlet(np.arange(1 - n, n)[None, :] + shift[:, None], _padded_period(n))
    return kernel[:, _toeplitz_index(n)]


def _spread_matrices(n: int, shift: np.ndarray) -> np.ndarray:
    """|Lanczos-3| resampling matrices (compact support): to spread a bad-pixel mask."""
    shift = np.asarray(shift, float)
    kernel = np.abs(_lanczos(np.arange(1 - n, n)[None, :] + shift[:, None]))
    return kernel[:, _toeplitz_index(n)]


def _shift_stack(stamps: np.ndarray, sx, sy) -> np.ndarray:
    """Resample each stamp of an (N, n, n) stack at ``(row + sy, col + sx)`` (sinc interpolation).

    A source at ``(sx, sy)`` from the stamp centre comes to the centre; a centred source
    moves to ``(-sx, -sy)``.
    """
    n = stamps.shape[-1]
    return _shift_matrices(n, sy) @ stamps @ np.swapaxes(_shift_matrices(n, sx), 1, 2)


def _spread_mask(mask: np.ndarray, sx, sy, threshold: float = _MASK_SPREAD) -> np.ndarray:
    """Pixels of the shifted stack that take at least ``threshold`` of a masked pixel."""
    n = mask.shape[-1]
    spread = _spread_matrices(n, sy) @ mask.astype(float) @ np.swapaxes(_spread_matrices(n, sx), 1, 2)
    return spread >= threshold


def _upsample_matrix(n: int, factor: int, first: int, last: int) -> np.ndarray:
    """Sinc matrix sampling a zero-padded length-``n`` signal on sub-pixel centres of the
    pixels ``first..last - 1``: shape ((last - first) * factor, n)."""
    t = first + (np.arange((last - first) * factor) + 0.5) / factor - 0.5
    return _dirichlet(t[:, None] - np.arange(n)[None, :], _padded_period(n))


def _cutouts(array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int):
    """(N, 2h+1, 2h+1) cutouts centred on integer pixels and the in-bounds mask."""
    ny, nx = array.shape
    offsets = np.arange(-half, half + 1)
    rows = iy[:, None] + offsets
    cols = ix[:, None] + offsets
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    cut = array[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
    return cut, inside


def _robust_sigma(values: np.ndarray) -> float:
    """Standard deviation from the median absolute deviation (1.4826 MAD)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _windowed_centroid(stamps, valid, sigma, n_iter=10, max_shift=2.0):
    """Gaussian-windowed centroid offsets from the stamp centres and windowed moments.

    Iterates ``x <- x + 2 * <w I (X - x)> / <w I>`` (the SExtractor XWIN step). Returns
    ``dx, dy, mxx, myy, mxy, ok`` (pixels, pixels^2); ``ok`` is False for stars whose
    window sum is not positive or whose centroid ran away by more than ``max_shift``.
    """
    n = stamps.shape[-1]
    grid = np.arange(n) - n // 2
    data = np.where(valid, stamps, 0.0)
    dx = np.zeros(len(stamps))
    dy = np.zeros(len(stamps))
    inv = 0.5 / sigma**2
    for _ in range(n_iter):
        ex = grid[None, :] - dx[:, None]
        ey = grid[None, :] - dy[:, None]
        wi = data * np.exp(-inv * ey**2)[:, :, None] * np.exp(-inv * ex**2)[:, None, :]
        total = wi.sum(axis=(1, 2))
        safe = np.where(total > 0, total, 1.0)
        step_x = (wi * ex[:, None, :]).sum(axis=(1, 2)) / safe
        step_y = (wi * ey[:, :, None]).sum(axis=(1, 2)) / safe
        dx = np.clip(dx + 2.0 * np.where(total > 0, step_x, 0.0), -max_shift - 1, max_shift + 1)
        dy = np.clip(dy + 2.0 * np.where(total > 0, step_y, 0.0), -max_shift - 1, max_shift + 1)
    ex = grid[None, :] - dx[:, None]
    ey = grid[None, :] - dy[:, None]
    wi = data * np.exp(-inv * ey**2)[:, :, None] * np.exp(-inv * ex**2)[:, None, :]
    total = wi.sum(axis=(1, 2))
    safe = np.where(total > 0, total, 1.0)
    mxx = (wi * ex[:, None, :] ** 2).sum(axis=(1, 2)) / safe
    myy = (wi * ey[:, :, None] ** 2).sum(axis=(1, 2)) / safe
    mxy = (wi * ex[:, None, :] * ey[:, :, None]).sum(axis=(1, 2)) / safe
    ok = (total > 0) & (np.hypot(dx, dy) <= max_shift)
    return dx, dy, mxx, myy, mxy, ok


def _linear_flux(data, variance, valid, model, accuracy=0.0):
    """PSF-weighted linear flux of (N, n, n) stacks.

    flux = sum(P d) / sum(P^2); err = sqrt(sum(P^2 var)) / sum(P^2) (Rubin PsfFlux);
    chi2 = sum((d - flux P)^2 / (var + (accuracy flux P)^2)); ndata = number of valid pixels.
    """
    p = np.where(valid, model, 0.0)
    d = np.where(valid, data, 0.0)
    v = np.where(valid, variance, 0.0)
    alpha = (p * p).sum(axis=(1, 2))
    ndata = valid.sum(axis=(1, 2))
    ok = (alpha > 0) & (ndata > 0)
    safe = np.where(ok, alpha, 1.0)
    flux = (p * d).sum(axis=(1, 2)) / safe
    err = np.sqrt((p * p * v).sum(axis=(1, 2))) / safe
    resid = d - flux[:, None, None] * p
    total_var = v + (accuracy * flux[:, None, None] * p) ** 2
    chi2 = np.where(valid, resid**2 / np.where(valid, total_var, 1.0), 0.0).sum(axis=(1, 2))
    nan = np.full(len(flux), np.nan)
    return (np.where(ok, flux, nan), np.where(ok, err, nan), np.where(ok, chi2, nan), ndata)


# ---------------------------------------------------------------------------
def measure_fwhm(psf_image: np.ndarray, oversample: int = 8):
    """FWHM of a PSF stamp from the area inside its half-maximum contour.

    The stamp is resampled ``oversample`` times finer with sinc interpolation, the maximum
    is found on that fine grid (refined by a parabola), and the area ``A`` inside the
    half-maximum contour (fine pixels counted by the fraction of them inside it, from their
    distance to the contour) gives ``FWHM = 2 sqrt(A / pi)``: the diameter of the circle of
    the same area, i.e. the geometric mean of the major- and minor-axis FWHMs of an
    elliptical PSF. Unlike a second-moment width it holds for any profile (Moffat wings
    included); accurate to about 0.2 % for FWHM >= 2.5 px.

    Parameters
    ----------
    psf_image : numpy.ndarray
        A 2-D stamp, or an (N, ny, nx) stack of stamps, any normalisation, the PSF near the
        centre; the value is what the pixels hold (pixel-integrated PSFs give the usual
        "observed" FWHM including the pixel).
    oversample : int
        Resampling factor.

    Returns
    -------
    float or numpy.ndarray
        FWHM in pixels (one per stamp for a stack); NaN for a stamp without a positive peak.
    """
    image = np.asarray(psf_image, float)
    single = image.ndim == 2
    stack = image[None] if single else image
    if stack.ndim != 3 or stack.shape[1] < 3 or stack.shape[2] < 3:
        raise PsfError(f"measure_fwhm needs a 2-D stamp or a stack of them, got shape {image.shape}")
    stack = np.where(np.isfinite(stack), stack, 0.0)
    peak0 = stack.max(axis=(1, 2))
    positive = peak0 > 0
    norm = stack / np.where(positive, peak0, 1.0)[:, None, None]
    core = (norm[positive] >= 0.3).any(axis=0) if positive.any() else np.ones(stack.shape[1:], bool)
    rows, cols = np.nonzero(core.any(axis=1))[0], np.nonzero(core.any(axis=0))[0]
    margin = 4
    r0, r1 = max(rows.min() - margin, 0), min(rows.max() + margin + 1, stack.shape[1])
    c0, c1 = max(cols.min() - margin, 0), min(cols.max() + margin + 1, stack.shape[2])
    fine = (_upsample_matrix(stack.shape[1], oversample, r0, r1) @ norm
            @ _upsample_matrix(stack.shape[2], oversample, c0, c1).T)
    # Peak: the brightest fine pixel, refined by a parabola through its neighbours on each axis.
    n_fine, h_fine, w_fine = fine.shape
    flat = fine.reshape(n_fine, -1).argmax(axis=1)
    pi = np.clip(flat // w_fine, 1, h_fine - 2)
    pj = np.clip(flat % w_fine, 1, w_fine - 2)
    k = np.arange(n_fine)
    centre = fine[k, pi, pj]
    peak = centre.copy()
    for lo, hi in ((fine[k, pi - 1, pj], fine[k, pi + 1, pj]), (fine[k, pi, pj - 1], fine[k, pi, pj + 1])):
        curvature = hi - 2 * centre + lo
        peak -= np.where(curvature < 0, (hi - lo) ** 2 / (8 * np.where(curvature < 0, curvature, -1.0)), 0.0)
    half_max = 0.5 * np.maximum(peak, fine.max(axis=(1, 2)))[:, None, None]
    # Fraction of each fine pixel inside the contour from its signed distance to it
    # (value minus half maximum over the gradient, in fine pixels): sub-pixel area.
    grad_y, grad_x = np.gradient(fine, axis=(1, 2))
    slope = np.hypot(grad_x, grad_y)
    distance = (fine - half_max) / np.where(slope > 0, slope, np.inf)
    inside = np.where(slope > 0, np.clip(0.5 + distance, 0.0, 1.0), (fine >= half_max).astype(float))
    area = inside.sum(axis=(1, 2)) / oversample**2
    fwhm = np.where(positive, 2.0 * np.sqrt(area / np.pi), np.nan)
    return float(fwhm[0]) if single else fwhm


def windowed_moments(image, x, y, bad=None, sigma: float = 2.0, n_iter: int = 10):
    """Gaussian-windowed centroids and a flux-independent size of sources.

    Parameters
    ----------
    image : numpy.ndarray
        Background-subtracted image, any linear unit.
    x, y : array_like
        Initial positions, pixels (0-based column, row); within ~1 px of the source.
    bad : numpy.ndarray of bool, optional
        Pixels to ignore.
    sigma : float
        Gaussian window sigma, pixels (about the PSF sigma works best).
    n_iter : int
        Centroid iterations.

    Returns
    -------
    xc, yc : numpy.ndarray
        Windowed centroids, pixels (NaN where the iteration failed or near the edge).
    size : numpy.ndarray
        ``sqrt(M s^2 / (s^2 - M))`` with ``M = (Mxx + Myy) / 2`` the windowed second moment
        and ``s`` the window sigma: the sigma of the Gaussian with those windowed moments,
        pixels (multiply by 2.3548 for a Gaussian-equivalent FWHM); inf for sources far
        more extended than the window, NaN where the iteration failed.
    """
    image = np.asarray(image)
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    finite = np.isfinite(x) & np.isfinite(y)
    ix = np.floor(np.where(finite, x, 0) + 0.5).astype(int)
    iy = np.floor(np.where(finite, y, 0) + 0.5).astype(int)
    half = max(int(math.ceil(4 * sigma)), 3)
    cut, inside = _cutouts(image, ix, iy, half)
    valid = inside & np.isfinite(cut)
    if bad is not None:
        bcut, _ = _cutouts(np.asarray(bad, bool), ix, iy, half)
        valid &= ~bcut
    cut = cut.astype(float)
    # Start from the input sub-pixel offset.
    dx0, dy0 = x - ix, y - iy
    cut0 = _shift_stack(np.where(valid, cut, 0.0), dx0, dy0)
    valid0 = ~_spread_mask(~valid, dx0, dy0)
    dx, dy, mxx, myy, _, ok = _windowed_centroid(cut0, valid0, sigma, n_iter=n_iter)
    m = 0.5 * (mxx + myy)
    s2 = sigma**2
    with np.errstate(divide="ignore", invalid="ignore"):
        size = np.where(m < s2, np.sqrt(np.clip(m * s2 / (s2 - m), 0, None)), np.inf)
    ok &= finite & (m > 0)
    nan = np.nan
    return (np.where(ok, x + dx, nan), np.where(ok, y + dy, nan), np.where(ok, size, nan))


# ---------------------------------------------------------------------------
def select_psf_stars(x, y, flux, snr, fwhm_or_size, flags, config: PsfConfig | None = None) -> np.ndarray:
    """Choose PSF stars: clean, isolated, S/N >= ``min_snr`` and on the stellar size locus.

    Rubin objectSize-like: the stellar locus is the mode of the size distribution of the
    clean, isolated, bright candidates (a Gaussian kernel density in log size with a
    bandwidth of ``width_std_allowed / 3``); candidates within ``width_std_allowed``
    (fractional) of the mode are kept and then clipped at ``clip_sigma`` robust sigmas
    (the smaller of the standard deviation and 0.741 IQR) around their median, ``n_iter``
    times. At most ``max_stars`` stars, the highest-S/N ones, are returned.

    Parameters
    ----------
    x, y : array_like
        Positions of all detections, pixels (every detection counts as a neighbour).
    flux : array_like
        Fluxes in any linear unit (for the isolation test only); non-finite fluxes count as
        bright neighbours.
    snr : array_like
        Signal-to-noise ratio of each detection.
    fwhm_or_size : array_like
        Any flux-independent size, pixels (FWHM, Gaussian sigma, ``sqrt((Ixx+Iyy)/2)``).
    flags : array_like of bool
        True for a detection that must not be used (saturated, interpolated, cosmic ray,
        edge, bad centroid, ...).
    config : PsfConfig, optional

    Returns
    -------
    numpy.ndarray of bool
        True for the selected stars (may be empty; ``fit_psf_model`` raises when too few).
    """
    cfg = config or PsfConfig()
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    flux = np.asarray(flux, float).ravel()
    snr = np.asarray(snr, float).ravel()
    size = np.asarray(fwhm_or_size, float).ravel()
    flags = np.asarray(flags, bool).ravel()
    n = len(x)
    if not (len(y) == len(flux) == len(snr) == len(size) == len(flags) == n):
        raise PsfError("select_psf_stars: x, y, flux, snr, size and flags differ in length")
    selected = np.zeros(n, bool)
    if n == 0:
        return selected
    located = np.isfinite(x) & np.isfinite(y)
    good = (~flags & located & np.isfinite(flux) & (flux > 0) & np.isfinite(snr) & (snr >= cfg.min_snr)
            & np.isfinite(size) & (size > 0))

    # Isolation: any neighbour brighter than ratio * flux within the radius disqualifies.
    from scipy.spatial import cKDTree

    idx = np.flatnonzero(located)
    tree = cKDTree(np.column_stack([x[idx], y[idx]]))
    pairs = tree.query_pairs(cfg.isolation_radius, output_type="ndarray")
    if len(pairs):
        i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
        bright = np.where(np.isfinite(flux), flux, np.inf)
        crowded = np.zeros(n, bool)
        crowded[i[bright[j] > cfg.isolation_flux_ratio * flux[i]]] = True
        crowded[j[bright[i] > cfg.isolation_flux_ratio * flux[j]]] = True
        good &= ~crowded
    cand = np.flatnonzero(good)
    if len(cand) == 0:
        return selected

    # Stellar locus: mode of the log-size density, then a clipped band around it.
    logs = np.log(size[cand])
    bw = max(cfg.width_std_allowed / 3.0, 1e-3)
    grid = np.arange(logs.min() - 3 * bw, logs.max() + 3 * bw, bw / 4)
    density = np.zeros(len(grid))
    for start in range(0, len(logs), 4096):
        chunk = logs[start:start + 4096]
        density += np.exp(-0.5 * ((grid[:, None] - chunk[None, :]) / bw) ** 2).sum(axis=1)
    mode = math.exp(grid[np.argmax(density)])
    on_locus = np.abs(size[cand] / mode - 1.0) <= cfg.width_std_allowed
    for _ in range(cfg.n_iter):
        s = size[cand][on_locus]
        if len(s) < 5:
            break
        centre = float(np.median(s))
        q25, q75 = np.percentile(s, [25, 75])
        sd = min(float(np.std(s)), 0.741 * float(q75 - q25))
        if sd <= 0:
            break
        new = on_locus & (np.abs(size[cand] - centre) <= cfg.clip_sigma * sd)
        if np.array_equal(new, on_locus):
            break
        on_locus = new
    chosen = cand[on_locus]
    if len(chosen) > cfg.max_stars:
        chosen = chosen[np.argsort(-snr[chosen], kind="stable")[: cfg.max_stars]]
    selected[chosen] = True
    log.debug("PSF star selection: %d candidates clean and isolated, size mode %.3f, %d selected",
              len(cand), mode, selected.sum())
    return selected


# ---------------------------------------------------------------------------
def _fit_components(recentred, weights, terms):
    """Per-pixel weighted least squares of the normalised stamps on the polynomial terms.

    recentred: (N, n, n) stamps / flux; weights: (N, n, n); terms: (N, K).
    Returns (K, n, n) components.
    """
    n_stars, n_terms = terms.shape
    side = recentred.shape[-1]
    w = weights.reshape(n_stars, -1)
    yv = recentred.reshape(n_stars, -1)
    outer = (terms[:, :, None] * terms[:, None, :]).reshape(n_stars, n_terms * n_terms)
    a = (w.T @ outer).reshape(-1, n_terms, n_terms)
    b = (w * yv).T @ terms
    scale = np.trace(a, axis1=1, axis2=2) / n_terms
    ridge = 1e-10 * np.where(scale > 0, scale, 1.0)
    a = a + ridge[:, None, None] * np.eye(n_terms)[None]
    coeffs = np.linalg.solve(a, b[:, :, None])[:, :, 0]
    coeffs[scale <= 0] = 0.0
    return coeffs.T.reshape(n_terms, side, side)


def fit_psf(image, variance, bad, x, y, config: PsfConfig | None = None) -> PsfFit:
    """Fit a PSFEx-like spatially varying pixel-basis PSF to stars.

    Method
    ------
    1. ``stamp_size`` (+ 3 px margin) cutouts around each star; stars whose stamp leaves the
       image or that have a bad pixel within one FWHM of the centre are dropped.
    2. Centroids refined to sub-pixel accuracy with a Gaussian window of the stars' median
       FWHM (measured on the median of the peak-normalised stamps).
    3. Each stamp is recentred by a sinc (Fourier) shift to put the centroid on the central
       pixel; bad pixels (and, from the second pass, pixels deviating by more than
       ``pixel_clip`` sigma) are replaced by the current model, and a pixel next to one
       (|Lanczos-3| weight >= 5 %) gets no weight.
    4. The stamps are normalised to unit flux (first pass: the sum within 3 FWHM; then the
       PSF-fit flux of the current model) and, pixel by pixel, a polynomial of order
       ``spatial_order`` in ``u = (x - x0) / scale``, ``v = (y - y0) / scale`` (image
       centre, half the longer side) is fitted by least squares with weights
       ``flux^2 / (var + (accuracy * flux * model)^2)`` (S/N-squared weighting).
    5. The model, shifted back to each star's sub-pixel position, is fitted to the star
       (``psf_flux``); stars whose reduced chi2 within 2 FWHM (including the ``accuracy``
       term) is above the median by more than ``clip_sigma`` robust sigmas are rejected;
       steps 3-5 repeat ``n_iter`` times and a final fit uses the survivors.

    Parameters
    ----------
    image : numpy.ndarray
        Background-subtracted image (rows, columns), any linear unit.
    variance : numpy.ndarray
        Variance of ``image``, image unit squared.
    bad : numpy.ndarray of bool or None
        Pixels not to use (BAD, SAT, CR, NO_DATA, ...).
    x, y : array_like
        Positions of the PSF stars (``select_psf_stars``), pixels, 0-based column and row.
    config : PsfConfig, optional

    Returns
    -------
    PsfFit
        The model (``fwhm_pixels``: median over the used stars of ``measure_fwhm`` of the
        model at their positions) and per-star diagnostics.

    Raises
    ------
    PsfError
        When fewer than ``min_stars`` stars are usable.
    """
    cfg = config or PsfConfig()
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or variance.shape != image.shape:
        raise PsfError(f"image and variance must be 2-D of one shape, got {image.shape} and {variance.shape}")
    ny, nx = image.shape
    bad = np.zeros(image.shape, bool) if bad is None else np.asarray(bad, bool)
    x_in = np.atleast_1d(np.asarray(x, float)).ravel()
    y_in = np.atleast_1d(np.asarray(y, float)).ravel()
    n_in = len(x_in)
    side = cfg.stamp_size
    half = side // 2
    margin = _STAMP_MARGIN
    big = half + margin
    inner = slice(margin, margin + side)

    def need(n_ok, why):
        if n_ok < cfg.min_stars:
            raise PsfError(f"only {n_ok} usable PSF stars ({why}); at least min_stars={cfg.min_stars} needed")

    keep = np.isfinite(x_in) & np.isfinite(y_in)
    ix = np.floor(np.where(keep, x_in, 0) + 0.5).astype(int)
    iy = np.floor(np.where(keep, y_in, 0) + 0.5).astype(int)
    keep &= (ix - big - 1 >= 0) & (ix + big + 1 < nx) & (iy - big - 1 >= 0) & (iy + big + 1 < ny)
    need(int(keep.sum()), f"of {n_in} given, others too close to the edge")
    src = np.flatnonzero(keep)

    def extract(ixs, iys):
        d, _ = _cutouts(image, ixs, iys, big)
        v, _ = _cutouts(variance, ixs, iys, big)
        b, _ = _cutouts(bad, ixs, iys, big)
        d = d.astype(float)
        v = v.astype(float)
        b = b | ~np.isfinite(d) | ~np.isfinite(v) | ~(v > 0)
        return np.where(b, 0.0, d), np.where(b, 0.0, v), b

    # Initial width from the median peak-normalised stamp; windowed centroids.
    data, var, badpix = extract(ix[src], iy[src])
    peaks = data[:, big, big]
    usable = peaks > 0
    need(int(usable.sum()), "no positive central pixel")
    stack = np.median(data[usable] / peaks[usable, None, None], axis=0)
    fwhm0 = measure_fwhm(stack)
    if not np.isfinite(fwhm0) or fwhm0 <= 0:
        raise PsfError("cannot measure the width of the PSF stars")
    sigma_w = max(fwhm0 / GAUSSIAN_SIGMA_TO_FWHM, 0.5)
    start_dx, start_dy = x_in[src] - ix[src], y_in[src] - iy[src]
    shifted = _shift_stack(data, start_dx, start_dy)
    shifted_ok = ~_spread_mask(badpix, start_dx, start_dy)
    dx, dy, _, _, _, ok = _windowed_centroid(shifted, shifted_ok, sigma_w)
    xs = x_in[src] + dx
    ys = y_in[src] + dy
    ix_s = np.floor(xs + 0.5).astype(int)
    iy_s = np.floor(ys + 0.5).astype(int)
    ok &= (ix_s - big >= 0) & (ix_s + big < nx) & (iy_s - big >= 0) & (iy_s + big < ny)
    src, xs, ys, ix_s, iy_s = src[ok], xs[ok], ys[ok], ix_s[ok], iy_s[ok]
    need(len(src), "centroids failed")

    data, var, badpix = extract(ix_s, iy_s)
    grid = np.arange(-big, big + 1)
    r2 = grid[None, :] ** 2 + grid[:, None] ** 2
    clean_core = ~(badpix & (r2 <= fwhm0**2)[None]).any(axis=(1, 2))
    src, xs, ys = src[clean_core], xs[clean_core], ys[clean_core]
    data, var, badpix = data[clean_core], var[clean_core], badpix[clean_core]
    need(len(src), "bad pixels in their cores")
    n = len(src)
    dx, dy = xs - np.floor(xs + 0.5), ys - np.floor(ys + 0.5)

    # Fixed per-star resampling matrices: recentring (big stamps) and back to the star (stamp).
    rec_y, rec_x = _shift_matrices(2 * big + 1, dy), np.swapaxes(_shift_matrices(2 * big + 1, dx), 1, 2)
    back_y, back_x = _shift_matrices(side, -dy), np.swapaxes(_shift_matrices(side, -dx), 1, 2)
    spread_y = _spread_matrices(2 * big + 1, dy)
    spread_x = np.swapaxes(_spread_matrices(2 * big + 1, dx), 1, 2)

    x0, y0, scale = (nx - 1) / 2.0, (ny - 1) / 2.0, max(nx, ny) / 2.0
    u, v = (xs - x0) / scale, (ys - y0) / scale
    r2_stamp = r2[inner, inner]
    ap_mask = (r2_stamp <= (3 * fwhm0) ** 2)[None]
    core_mask = (r2_stamp <= (2 * fwhm0) ** 2)[None]
    data_n, var_n = data[:, inner, inner], var[:, inner, inner]
    bad_n = badpix[:, inner, inner]

    use = np.ones(n, bool)
    clipped = badpix.copy()       # pixels replaced by the model (bad or outliers), big stamps
    fill = np.zeros_like(data)    # current model prediction in each big stamp
    flux = None
    model_centred = None
    order = cfg.spatial_order
    chi2_dof = np.full(n, np.nan)
    psf = None
    for iteration in range(cfg.n_iter + 1):
        order = cfg.spatial_order
        while order > 0 and use.sum() < cfg.min_stars_per_term * _n_terms(order):
            order -= 1
        recentred = (rec_y @ np.where(clipped, fill, data) @ rec_x)[:, inner, inner]
        weight_ok = (spread_y @ clipped.astype(float) @ spread_x)[:, inner, inner] < _MASK_SPREAD
        if iteration == 0:
            recentred_bad = (spread_y @ badpix.astype(float) @ spread_x)[:, inner, inner] > 0
            flux = np.where(ap_mask & ~recentred_bad, recentred, 0.0).sum(axis=(1, 2))
            use &= flux > 0
            need(int(use.sum()), "no positive flux")
            model_term = 0.0
        else:
            model_term = (cfg.accuracy * flux[:, None, None] * model_centred) ** 2
        safe_flux = np.where(use, flux, 1.0)
        normed = recentred / safe_flux[:, None, None]
        weights = np.where(weight_ok & use[:, None, None],
                           safe_flux[:, None, None] ** 2 / (var_n + model_term + 1e-300), 0.0)
        weights = np.where(var_n > 0, weights, 0.0)
        terms = _poly_terms(order, u, v)
        components = _fit_components(normed, weights, terms)
        psf = PsfModel(components=components.astype(np.float32), spatial_order=order, x0=x0, y0=y0, scale=scale)
        model_centred = psf.evaluate_many(xs, ys)
        model_native = back_y @ model_centred @ back_x

        # Star fluxes and chi2 on the pixels not flagged bad from the start.
        f_all, _, _, _ = _linear_flux(data_n, var_n, ~bad_n, model_native)
        _, _, chi2, ndata = _linear_flux(data_n, var_n, ~bad_n & core_mask, model_native, cfg.accuracy)
        chi2_dof = chi2 / np.maximum(ndata - 1, 1)
        if iteration == cfg.n_iter:
            break
        flux = np.where(np.isfinite(f_all), f_all, 0.0)
        use &= flux > 0
        ref = chi2_dof[use]
        if len(ref) > cfg.min_stars:
            limit = np.median(ref) + cfg.clip_sigma * max(_robust_sigma(ref), 1e-3)
            worst = np.flatnonzero(use & (chi2_dof > limit))
            spare = int(use.sum()) - cfg.min_stars
            if len(worst) > spare:  # never go below min_stars: drop the worst ones first
                worst = worst[np.argsort(-chi2_dof[worst])[:max(spare, 0)]]
            use[worst] = False
        need(int(use.sum()), "rejected as outliers")
        # Pixel outliers (cosmic rays, neighbours) and the model to fill masked pixels with.
        prediction = flux[:, None, None] * model_native
        z = (data_n - prediction) / np.sqrt(var_n + (cfg.accuracy * prediction) ** 2 + 1e-300)
        clipped[:, inner, inner] |= (np.abs(z) > cfg.pixel_clip) & (var_n > 0)
        fill[:, inner, inner] = prediction

    fwhm_stars = measure_fwhm(model_centred[use])
    psf.fwhm_pixels = float(np.nanmedian(fwhm_stars))
    log.info("PSF model: %d of %d stars used, spatial order %d, median FWHM %.3f px, median chi2/dof %.2f",
             int(use.sum()), n_in, order, psf.fwhm_pixels, float(np.nanmedian(chi2_dof[use])))

    used_all = np.zeros(n_in, bool)
    used_all[src[use]] = True
    out = {name: np.full(n_in, np.nan) for name in ("x", "y", "flux", "chi2")}
    out["x"][src], out["y"][src] = xs, ys
    out["flux"][src] = f_all
    out["chi2"][src] = chi2_dof
    return PsfFit(model=psf, used=used_all, x=out["x"], y=out["y"], flux=out["flux"], chi2_dof=out["chi2"],
                  spatial_order=order)


def fit_psf_model(image, variance, bad, x, y, config: PsfConfig | None = None) -> PsfModel:
    """Fit the PSF model to the given stars; ``fit_psf(...).model`` (see ``fit_psf``).

    Parameters
    ----------
    image : numpy.ndarray
        Background-subtracted image, any linear unit.
    variance : numpy.ndarray
        Its variance, image unit squared.
    bad : numpy.ndarray of bool or None
        Pixels not to use.
    x, y : array_like
        PSF star positions, pixels (0-based column, row).
    config : PsfConfig, optional

    Returns
    -------
    PsfModel
        ``evaluate(x, y)`` gives the unit-sum PSF centred on the stamp centre at (x, y).

    Raises
    ------
    PsfError
        When fewer than ``min_stars`` stars are usable.
    """
    return fit_psf(image, variance, bad, x, y, config).model


# ---------------------------------------------------------------------------
def psf_flux(image, variance, psf: PsfModel, x, y, bad=None, *, radius: float | None = None,
             chunk: int = 2048):
    """Linear PSF-fit flux at fixed positions (forced PSF photometry), vectorised.

    For each position the model is evaluated there (unit sum over its stamp), shifted by the
    sub-pixel offset ``(x - round(x), y - round(y))`` with sinc interpolation and fitted
    to the pixels of the stamp around ``(round(x), round(y))`` as Rubin's PsfFlux does:
    ``flux = sum(P d) / sum(P^2)``, ``flux_err = sqrt(sum(P^2 var)) / sum(P^2)`` (unbiased
    for bright sources, whose variance includes their own Poisson noise). Pixels off the
    image, flagged ``bad``, or with a non-finite value or non-positive variance are left out.

    Parameters
    ----------
    image : numpy.ndarray
        Background-subtracted image (rows, columns), any linear unit.
    variance : numpy.ndarray
        Its variance, image unit squared.
    psf : PsfModel
        The PSF model.
    x, y : array_like
        Positions, pixels (0-based column, row); scalars or arrays of one shape.
    bad : numpy.ndarray of bool, optional
        Pixels not to use.
    radius : float, optional
        Only pixels within this distance of (x, y), pixels, are fitted (default: the stamp).
    chunk : int
        Positions processed together (memory: about 100 * chunk * stamp_size^2 bytes).

    Returns
    -------
    flux : numpy.ndarray
        PSF flux, image unit (the flux of the PSF model within its stamp); NaN without data.
    flux_err : numpy.ndarray
        1-sigma error of ``flux``, image unit.
    chi2 : numpy.ndarray
        ``sum((d - flux P)^2 / var)`` over the fitted pixels.
    ndata : numpy.ndarray of int
        Number of fitted pixels (reduced chi2 = chi2 / (ndata - 1)).
    """
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or variance.shape != image.shape:
        raise PsfError(f"image and variance must be 2-D of one shape, got {image.shape} and {variance.shape}")
    x_arr, y_arr = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
    shape = x_arr.shape
    xf, yf = x_arr.ravel(), y_arr.ravel()
    n = len(xf)
    flux = np.full(n, np.nan)
    err = np.full(n, np.nan)
    chi2 = np.full(n, np.nan)
    ndata = np.zeros(n, int)
    side = psf.components.shape[-1]
    half = side // 2
    bad_arr = None if bad is None else np.asarray(bad, bool)
    grid = np.arange(-half, half + 1)
    finite = np.flatnonzero(np.isfinite(xf) & np.isfinite(yf))
    for start in range(0, len(finite), chunk):
        idx = finite[start:start + chunk]
        px, py = xf[idx], yf[idx]
        ix, iy = np.floor(px + 0.5).astype(int), np.floor(py + 0.5).astype(int)
        data, inside = _cutouts(image, ix, iy, half)
        var, _ = _cutouts(variance, ix, iy, half)
        data, var = data.astype(float), var.astype(float)
        valid = inside & np.isfinite(data) & np.isfinite(var) & (var > 0)
        if bad_arr is not None:
            b, _ = _cutouts(bad_arr, ix, iy, half)
            valid &= ~b
        dx, dy = px - ix, py - iy
        if radius is not None:
            rr = ((grid[None, None, :] - dx[:, None, None]) ** 2 + (grid[None, :, None] - dy[:, None, None]) ** 2)
            valid &= rr <= radius**2
        model = _shift_stack(psf.evaluate_many(px, py), -dx, -dy)
        f, e, c, nd = _linear_flux(data, var, valid, model)
        flux[idx], err[idx], chi2[idx], ndata[idx] = f, e, c, nd
    return flux.reshape(shape), err.reshape(shape), chi2.reshape(shape), ndata.reshape(shape)
