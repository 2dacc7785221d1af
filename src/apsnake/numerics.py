"""Small numerical helpers shared by the stages: one implementation of each.

* Robust statistics: ``mad_sigma`` (the Gaussian sigma from the median absolute deviation,
  what ``astropy.stats.mad_std`` computes), ``weighted_median`` and ``clipped_mean``.
* Gaussian widths: ``SIGMA_TO_FWHM`` (``astropy.stats.gaussian_sigma_to_fwhm``).
* Pixel access: ``cutouts`` (stamps around integer pixels).
* 2-D polynomials in scaled pixel coordinates (the ``PsfModel`` convention): ``n_terms``,
  ``term_powers``, ``polynomial_terms``, ``polynomial_frame``.
* ``lanczos`` (the windowed-sinc kernel); ``CubicSpline1d`` / ``cubic_spline_weights`` (the
  weights of not-a-knot cubic-spline interpolation, what ``scipy.interpolate.CubicSpline``
  and, per axis, ``RectBivariateSpline`` with ``s=0`` compute).
* Mask dilation: ``window_or`` / ``grow_bits`` for integer bit-plane masks (box), ``dilate``
  for boolean masks (disc or square).
* Centred stamps on FFT grids: ``pad_centered`` / ``crop_centered``.

astropy.stats is not imported here: it costs ~0.6 s per process (measured on the CI machine),
which every workflow job would pay; nor is scipy.interpolate (0.35-0.5 s, the template and
DIA jobs' only use of it was spline weights); the tests check these helpers against both.
Pixel conventions are apsnake's: 0-based numpy indices, ``x`` the column, ``y`` the row.
"""

from __future__ import annotations

import math

import numpy as np

#: FWHM of a Gaussian in units of its sigma, 2 sqrt(2 ln 2).
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: 1 / Phi^-1(3/4): the Gaussian sigma is this times the median absolute deviation.
_MAD_TO_SIGMA = 1.482602218505602


# ---------------------------------------------------------------------------
# Robust statistics
def mad_sigma(values) -> float:
    """Gaussian-equivalent standard deviation from the median absolute deviation.

    ``1.4826 * median(|v - median(v)|)`` over the finite values (``astropy.stats.mad_std``
    with ``ignore_nan``); NaN when there are none.
    """
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return _MAD_TO_SIGMA * float(np.median(np.abs(v - np.median(v))))


def weighted_median(values, weights) -> float:
    """The value at which the cumulative weight of the sorted finite values reaches half the
    total (the lower one on an exact tie); NaN without positive weight."""
    v = np.asarray(values, float).ravel()
    w = np.asarray(weights, float).ravel()
    ok = np.isfinite(v) & np.isfinite(w) & (w > 0)
    if not ok.any():
        return float("nan")
    order = np.argsort(v[ok], kind="stable")
    cumulative = np.cumsum(w[ok][order])
    return float(v[ok][order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def clipped_mean(values, nsigma: float = 3.0, n_iter: int = 3, min_kept: int = 10) -> float:
    """Mean of the finite values after ``n_iter`` rounds of clipping at ``nsigma`` standard
    deviations around the median (Rubin's MEANCLIP statistic).

    Clipping stops early when nothing is clipped or fewer than ``min_kept`` values would
    remain. NaN when there are no finite values.
    """
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    for _ in range(n_iter):
        keep = np.abs(v - np.median(v)) <= nsigma * v.std()
        if keep.all() or keep.sum() < min_kept:
            break
        v = v[keep]
    return float(v.mean())


# ---------------------------------------------------------------------------
# Pixel access
def cutouts(array: np.ndarray, ix, iy, half: int, fill=0):
    """Square stamps of side ``2 half + 1`` centred on integer pixels ``(ix, iy)``.

    Returns ``(stamps, inside)``: (N, 2h+1, 2h+1) arrays of the values (``fill`` off the
    image) and of which stamp pixels lie on the image.
    """
    ix = np.asarray(ix, np.int64).ravel()
    iy = np.asarray(iy, np.int64).ravel()
    ny, nx = array.shape
    offsets = np.arange(-half, half + 1)
    rows = iy[:, None] + offsets
    cols = ix[:, None] + offsets
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    stamps = array[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
    if not inside.all():
        stamps = np.where(inside, stamps, np.asarray(fill).astype(stamps.dtype))
    return stamps, inside


# ---------------------------------------------------------------------------
# 2-D polynomials: terms 1, u, v, u^2, uv, v^2, ... (the PsfModel order)
def n_terms(order: int) -> int:
    """Number of terms of a full 2-D polynomial of ``order``."""
    return (order + 1) * (order + 2) // 2


def term_powers(order: int) -> list[tuple[int, int]]:
    """(power of u, power of v) of each term, in the order 1, u, v, u^2, uv, v^2, ..."""
    return [(n - j, j) for n in range(order + 1) for j in range(n + 1)]


def polynomial_terms(order: int, u, v) -> np.ndarray:
    """The terms evaluated at (u, v): shape ``u.shape + (n_terms(order),)``."""
    u = np.asarray(u, float)
    v = np.asarray(v, float)
    return np.stack([u ** a * v ** b for a, b in term_powers(order)], axis=-1)


def polynomial_frame(shape) -> tuple[float, float, float]:
    """(x0, y0, scale) of the scaled coordinates ``u = (x - x0) / scale``, ``v = (y - y0) /
    scale`` on an image of ``shape`` = (ny, nx): the image centre and half the longer side,
    pixels (the ``PsfModel`` convention)."""
    ny, nx = shape
    return (nx - 1) / 2.0, (ny - 1) / 2.0, max(nx, ny) / 2.0


# ---------------------------------------------------------------------------
# Kernels
def lanczos(t, a: int = 3) -> np.ndarray:
    """The Lanczos kernel ``sinc(t) sinc(t / a)`` for ``|t| < a``, 0 beyond (``t`` in pixels)."""
    t = np.asarray(t, float)
    return np.where(np.abs(t) < a, np.sinc(t) * np.sinc(t / a), 0.0)


# ---------------------------------------------------------------------------
# Interpolation
class CubicSpline1d:
    """Not-a-knot cubic-spline interpolation from fixed ``nodes`` (strictly increasing, any
    unit, e.g. pixels), as a linear map: ``weights(positions) @ values``. What
    ``scipy.interpolate.CubicSpline(bc_type="not-a-knot")`` and, per axis,
    ``RectBivariateSpline`` with ``s=0`` compute; two nodes interpolate linearly, three
    quadratically; positions outside the nodes follow the end pieces. The node-dependent
    part is solved once, so evaluating many position sets is cheap.
    """

    def __init__(self, nodes):
        x = np.asarray(nodes, float)
        if x.ndim != 1 or len(x) < 2 or np.any(np.diff(x) <= 0):
            raise ValueError(f"CubicSpline1d: need >= 2 strictly increasing nodes, got {x}")
        self.nodes = x
        k = len(x)
        self._second = None
        if k > 3:
            h = np.diff(x)
            # Second derivatives = A^-1 B values: a continuous first derivative at interior
            # nodes, a continuous third derivative at the second and second-to-last (not-a-knot).
            a, b = np.zeros((k, k)), np.zeros((k, k))
            i = np.arange(1, k - 1)
            a[i, i - 1], a[i, i], a[i, i + 1] = h[:-1], 2.0 * (h[:-1] + h[1:]), h[1:]
            b[i, i - 1], b[i, i], b[i, i + 1] = 6.0 / h[:-1], -6.0 / h[:-1] - 6.0 / h[1:], 6.0 / h[1:]
            a[0, :3] = h[1], -(h[0] + h[1]), h[0]
            a[-1, -3:] = h[-1], -(h[-2] + h[-1]), h[-2]
            self._second = np.linalg.solve(a, b)

    def weights(self, positions) -> np.ndarray:
        """(len(positions), len(nodes)) interpolation weights at ``positions``."""
        x = self.nodes
        t = np.atleast_1d(np.asarray(positions, float))
        k = len(x)
        if self._second is None:  # Lagrange polynomial through the two or three nodes
            w = np.ones((t.size, k))
            for j in range(k):
                for m in range(k):
                    if m != j:
                        w[:, j] *= (t - x[m]) / (x[j] - x[m])
            return w
        i = np.clip(np.searchsorted(x, t, side="right") - 1, 0, k - 2)
        h = x[i + 1] - x[i]
        below, above = t - x[i], x[i + 1] - t
        w = ((above ** 3 / h - h * above) / 6.0)[:, None] * self._second[i] \
            + ((below ** 3 / h - h * below) / 6.0)[:, None] * self._second[i + 1]
        rows = np.arange(t.size)
        w[rows, i] += above / h
        w[rows, i + 1] += below / h
        return w


def cubic_spline_weights(nodes, positions) -> np.ndarray:
    """``CubicSpline1d(nodes).weights(positions)``: the spline through values ``y`` at
    ``nodes`` is ``W @ y`` at ``positions``; on a grid, a tensor-product interpolating
    spline is ``W_rows @ values @ W_cols.T``."""
    return CubicSpline1d(nodes).weights(positions)


# ---------------------------------------------------------------------------
# Mask dilation
def window_or(mask: np.ndarray, before: int, after: int) -> np.ndarray:
    """``out[r, c] = OR of mask[r - before : r + after + 1, c - before : c + after + 1]``.

    Works for boolean masks and integer bit-plane masks alike (every plane is dilated by
    the same box). The sliding OR along each axis doubles its window in O(log width) passes,
    on the bounding box of the set pixels only, so it costs little for sparse masks.
    """
    width = before + after + 1
    if width <= 1 or not mask.any():
        return mask.copy()
    ny, nx = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(rows[0] - after, 0), min(rows[-1] + before + 1, ny)
    c0, c1 = max(cols[0] - after, 0), min(cols[-1] + before + 1, nx)
    sub = mask[r0:r1, c0:c1]
    for axis in (0, 1):
        n = sub.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (before, after)
        g = np.pad(sub, pad)  # g[i] holds sub[i - before]
        p = 1
        while 2 * p <= width:
            # g[i] = OR over p-wide (then 2p-wide) windows starting at i; numpy buffers the
            # overlapping operands of an in-place operation, so this reads the old values.
            if axis == 0:
                g[:-p] |= g[p:]
            else:
                g[:, :-p] |= g[:, p:]
            p *= 2
        take_a = [slice(None), slice(None)]
        take_b = [slice(None), slice(None)]
        take_a[axis] = slice(0, n)
        take_b[axis] = slice(width - p, width - p + n)
        sub = g[tuple(take_a)] | g[tuple(take_b)]  # overlapping windows are harmless for OR
    out = np.zeros_like(mask)
    out[r0:r1, c0:c1] = sub
    return out


def grow_bits(mask: np.ndarray, radius: int) -> np.ndarray:
    """Every bit plane of an integer mask dilated by a (2r+1) x (2r+1) box."""
    return window_or(mask, radius, radius) if radius > 0 else mask.copy()


def disc(radius: int) -> np.ndarray:
    """Boolean disc footprint of ``radius`` pixels, shape (2r+1, 2r+1)."""
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def dilate(mask: np.ndarray, radius: int, footprint: str = "disc") -> np.ndarray:
    """A boolean mask dilated by ``radius`` pixels with a ``"disc"`` or ``"square"`` footprint.

    The disc dilation works in boxes around the connected components when there are few of
    them (a full-CCD ``binary_dilation`` costs ~1 s, a hundred small boxes ~10 ms); with many
    components, one dilation of their bounding box.
    """
    mask = np.asarray(mask, bool)
    if radius <= 0 or not mask.any():
        return mask.copy()
    if footprint == "square":
        return window_or(mask, radius, radius)
    if footprint != "disc":
        raise ValueError(f"unknown dilation footprint {footprint!r} (disc, square)")
    from scipy import ndimage

    struct = disc(radius)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    ny, nx = mask.shape
    if n > 200:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        y0, y1 = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, ny)
        x0, x1 = max(cols[0] - radius, 0), min(cols[-1] + radius + 1, nx)
        out = np.zeros_like(mask)
        out[y0:y1, x0:x1] = ndimage.binary_dilation(mask[y0:y1, x0:x1], structure=struct)
        return out
    out = mask.copy()
    for k, (sy, sx) in enumerate(ndimage.find_objects(labels), start=1):
        y0, y1 = max(sy.start - radius, 0), min(sy.stop + radius, ny)
        x0, x1 = max(sx.start - radius, 0), min(sx.stop + radius, nx)
        out[y0:y1, x0:x1] |= ndimage.binary_dilation(labels[y0:y1, x0:x1] == k, structure=struct)
    return out


# ---------------------------------------------------------------------------
# Centred stamps on FFT grids
def pad_centered(stamp: np.ndarray, shape) -> np.ndarray:
    """Zeros of ``shape`` (the last two axes) holding the stamp with its central pixel at
    [0, 0], wrapped around: the layout in which an FFT convolution does not shift."""
    ny, nx = stamp.shape[-2:]
    out = np.zeros(stamp.shape[:-2] + tuple(shape), dtype=stamp.dtype)
    rows = (np.arange(ny) - ny // 2) % shape[0]
    cols = (np.arange(nx) - nx // 2) % shape[1]
    out[..., rows[:, None], cols[None, :]] = stamp
    return out


def crop_centered(array: np.ndarray, size: int) -> np.ndarray:
    """Inverse of ``pad_centered``: the ``size`` x ``size`` stamp centred on [0, 0]."""
    rows = (np.arange(size) - size // 2) % array.shape[-2]
    cols = (np.arange(size) - size // 2) % array.shape[-1]
    return array[..., rows[:, None], cols[None, :]]
