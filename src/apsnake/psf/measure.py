"""Measurements of PSF stamps and of sources' sizes: FWHM, windowed centroids and moments,
Gaussian-equivalent widths.

Stamps are centred on their central pixel; positions are 0-based (x column, y row), sizes in
pixels.
"""

from __future__ import annotations

import math

import numpy as np

from apsnake.exposure import PsfModel
from apsnake.numerics import SIGMA_TO_FWHM, cutouts
from apsnake.psf.config import PsfError
from apsnake.psf.shift import shift_stack, spread_mask, upsample_matrix


def windowed_centroid(stamps, valid, sigma, n_iter=10, max_shift=2.0):
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
    fine = (upsample_matrix(stack.shape[1], oversample, r0, r1) @ norm
            @ upsample_matrix(stack.shape[2], oversample, c0, c1).T)
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
    cut, inside = cutouts(image, ix, iy, half)
    valid = inside & np.isfinite(cut)
    if bad is not None:
        bcut, _ = cutouts(np.asarray(bad, bool), ix, iy, half)
        valid &= ~bcut
    cut = cut.astype(float)
    # Start from the input sub-pixel offset.
    dx0, dy0 = x - ix, y - iy
    cut0 = shift_stack(np.where(valid, cut, 0.0), dx0, dy0)
    valid0 = ~spread_mask(~valid, dx0, dy0)
    dx, dy, mxx, myy, _, ok = windowed_centroid(cut0, valid0, sigma, n_iter=n_iter)
    m = 0.5 * (mxx + myy)
    s2 = sigma**2
    with np.errstate(divide="ignore", invalid="ignore"):
        size = np.where(m < s2, np.sqrt(np.clip(m * s2 / (s2 - m), 0, None)), np.inf)
    ok &= finite & (m > 0)
    nan = np.nan
    return (np.where(ok, x + dx, nan), np.where(ok, y + dy, nan), np.where(ok, size, nan))


def psf_widths(stamp: np.ndarray):
    """FWHM (``apsnake.psf.measure_fwhm``) and Gaussian-equivalent sigmas along x and y.

    The sigmas come from Gaussian-windowed second moments (window of the FWHM's sigma) about the
    windowed centroid, deconvolved from the window: ``s^2 = M w^2 / (w^2 - M)``.
    """
    img = np.asarray(stamp, float)
    img = img / img.sum()
    fwhm = float(measure_fwhm(img))
    w2 = (fwhm / SIGMA_TO_FWHM) ** 2
    n = img.shape[0]
    g = np.arange(n) - n // 2
    cx = cy = 0.0
    for _ in range(10):
        wt = img * np.exp(-0.5 * ((g[None, :] - cx) ** 2 + (g[:, None] - cy) ** 2) / w2)
        tot = wt.sum()
        cx, cy = (wt * g[None, :]).sum() / tot, (wt * g[:, None]).sum() / tot
    mxx = (wt * (g[None, :] - cx) ** 2).sum() / tot
    myy = (wt * (g[:, None] - cy) ** 2).sum() / tot

    def deconv(m):
        return math.sqrt(m * w2 / (w2 - m)) if m < w2 else float("inf")

    return fwhm, deconv(mxx), deconv(myy)


def psf_sigma(psf: PsfModel, x: float, y: float) -> float:
    """Gaussian-equivalent sigma (pixels) of the PSF model at (x, y): its FWHM / 2.3548.

    Falls back on the model's median FWHM when the stamp cannot be measured; raises
    ``PsfError`` when neither is usable.
    """
    fwhm = measure_fwhm(psf.evaluate(x, y))
    if not np.isfinite(fwhm) or fwhm <= 0:
        fwhm = psf.fwhm_pixels
    if not np.isfinite(fwhm) or fwhm <= 0:
        raise PsfError(f"cannot measure the FWHM of the PSF at ({x:.1f}, {y:.1f})")
    return float(fwhm) / SIGMA_TO_FWHM
