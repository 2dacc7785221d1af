"""Image differencing: Alard-Lupton PSF matching with decorrelation, and ZOGY.

Our decision (ALGORITHMS.md, "Our decisions", PSF matching; section 3): Alard-Lupton with Rubin's
defaults (3 Gaussians of degrees 4/2/2, widths scaled by the seeing difference, spatial order 1,
kernel stars from the calexp source table distributed over 128-px cells), convolving the template
unless the template has the wider PSF in both axes ("auto"), then Rubin's decorrelation
afterburner. ZOGY (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27) is the alternative ``method="zogy"``
with its score image.

Inputs
------
``science`` and ``template`` are ``apsnake.exposure.Exposure`` objects on the same pixel grid, in
the same flux unit (nJy for calexps and templates), background-subtracted, each with a
``PsfModel``. Template pixels without coverage carry ``NO_DATA``.

Conventions
-----------
* Pixel ``(i, j)`` of an image is ``y = i`` (row), ``x = j`` (column), 0-based, as in
  ``apsnake.psf``; spatial polynomials use ``u = (x - x0) / scale``, ``v = (y - y0) / scale`` with
  ``(x0, y0)`` the image centre and ``scale`` half the longer side (the ``PsfModel`` convention),
  terms ordered ``1, u, v, u^2, uv, v^2, ...``.
* Convolution is ``(K * I)(x) = sum_k K(k) I(x - k)`` with kernel images centred on their central
  pixel.
* The difference is always science minus template (a brightening is positive) and comes in the
  science flux unit.

Both methods first rescale the variance planes to the measured pixel noise (Rubin
``scaleVariance``): the factor is (1.4826 MAD of ``image / sqrt(variance)``)^2 over source-free,
unmasked pixels of evenly spread row bands (sources found on 4x4-binned data, since the inputs
need not carry DETECTED), applied only within [1/10, 10]. The factors are kept as scalars and
folded into every later use of the variance planes (inputs are never modified).

Alard-Lupton (``method="alard-lupton"``)
----------------------------------------
1. Basis: for each Gaussian ``sigma_g`` and degree ``d_g``, ``G_g(x) G_g(y) (x/h)^i (y/h)^j`` with
   ``i + j <= d_g`` on a ``(2h + 1)``-px square (27 functions for degrees 4/2/2). The first is
   normalised to unit sum, every other one made zero-sum (minus its sum times the first) and of
   unit L2 norm (Rubin ``renormalizeKernelList``): the kernel sum is the first coefficient.
   Widths scale with the seeing (Rubin ``scaleByFwhm``): ``sigma_k = sqrt(|s_tgt^2 - s_ref^2|)``
   (at least 0.7 px, 0.4 when deconvolving), ``sigma_1 = max(min, sigma_k / 2)``, each next one
   twice the previous; size = odd ``int(6 sigma_last)`` clamped to [21, 35].
2. Kernel stars: sources with ``10 <= S/N <= 500``, without bad pixel flags, without a brighter
   neighbour in their stamp, with no SAT/BAD/NO_DATA/EDGE/HIGH_VARIANCE pixel of either image in
   their cutout, far enough from the edge for the cutout (``>= kernel size``); the best (highest
   S/N) ``stars_per_cell`` per ``cell_size`` cell, at most ``max_kernel_stars``.
3. Fit: on a stamp of half-width ``max(h, ceil(2.5 FWHM))`` around each star,
   ``target = sum_j k_j(x_i) (B_j * ref) + b(x_i)`` by weighted linear least squares (weights
   ``1 / (var_tgt + var_ref)``), where ``k_j`` are polynomials of order ``spatial_order`` in
   position and ``b`` the differential background, a polynomial of order ``background_order``
   (constant over each stamp). The basis convolutions of the stamps use the separability of the
   raw basis (one inverse FFT along y per distinct y factor, keeping only the stamp rows, then
   along x per function). The kernel sum is fitted (it absorbs any photometric scale; ~1 for two
   nJy images). The orders drop by one while there are fewer than ``min_stars_per_term`` stars
   per polynomial term. Stars whose normalised residuals
   ``(target - model) / sqrt(var_tgt + K^2 * var_ref)`` have a mean above ``max_residual_mean``
   or a standard deviation above ``max_residual_std`` (Rubin 0.25 and 1.5) are rejected and the
   fit repeated, up to ``n_iter`` times (never below ``min_kernel_stars``).
4. Convolution of the whole image: with the spatial polynomial ``P_s(x, y)`` the convolved image
   is ``sum_s P_s(x, y) (K_s * ref)(x, y)`` with ``K_s = sum_j a_js B_j``: one forward FFT of the
   image and one inverse FFT per spatial term (3 for order 1), ``scipy.fft`` on one worker.
5. The fitted differential background is NOT subtracted (as Rubin: it is fitted so that it does
   not bias the kernel; both inputs are background-subtracted). Its coefficients and value at
   the centre are in the metadata.
6. Decorrelation (Rubin ``DecorrelateALKernelTask``, DMTN-021): with ``K`` the kernel at the image
   centre, ``s2`` the mean variance of the unconvolved image and ``c2`` that of the convolved one
   (clipped means over unmasked pixels), ``phi(k) = sqrt((s2 + c2 ksum^2) / (s2 + c2 |K(k)|^2))``
   is applied to the difference and to its PSF by FFT. The numerator uses ``ksum^2 = (sum K)^2``
   as Rubin's code does (``phi(0) = 1``: fluxes are preserved); ALGORITHMS.md writes
   ``sum K^2``, which would rescale fluxes. The decorrelated variance plane is Rubin's estimate
   ``var_unconv <phi^2> + var_conv <|K phi|^2>`` (means over frequencies): on a uniform image the
   noise becomes white with variance ``s2 + c2 ksum^2``.
7. Without decorrelation the variance is ``var_unconv + var_conv sum(K(x, y)^2)``.

When the science image is convolved (template PSF wider in both axes in "auto" mode), the
difference is ``(K * science - template) / ksum`` with ``ksum`` the kernel sum at the centre, so
that it stays in science flux units, its PSF is the template's, and ``matched_template`` is
``template / ksum``.

ZOGY (``method="zogy"``)
------------------------
With ``P_n``, ``P_r`` the science and template PSFs at the image centre, ``s_n^2``, ``s_r^2``
their mean variances and ``F_n = F_r = 1`` (both in nJy)::

    D^ = c (P_r^ N^ - P_n^ R^) / sqrt(s_n^2 |P_r^|^2 + s_r^2 |P_n^|^2),  c = sqrt(s_n^2 + s_r^2)

i.e. ZOGY's proper difference (eq. 13) divided by ``F_D = 1 / c``: a point source whose flux
changed by ``f`` (nJy) appears on ``D`` as ``f P_D`` with ``P_D^ = c P_r^ P_n^ / sqrt(...)``
(unit sum), so PSF photometry on ``D`` with its PSF gives the flux change. The variance plane is
``var_N * k_n^2 + var_R * k_r^2`` with ``k_n``, ``k_r`` the kernels applied to N and R (``c^2`` on
a uniform image). The score is ``S = D`` correlated with ``P_D``, and ``S_corr = S / sqrt(V_S)``
with ``V_S = var_N * k_Sn^2 + var_R * k_Sr^2`` from the variance planes (ZOGY eqs. 25-28: the
source-noise correction; astrometric-noise terms are not included), in units of sigma.
``matched_template`` is ``R * k_r`` (so that ``D = N * k_n - matched_template``), with ``P_D``.

Masks
-----
The difference mask is the science mask OR the template planes: ``NO_DATA``, ``BAD`` and
``HIGH_VARIANCE`` keep their names (as in Rubin: HIGH_VARIANCE only comes from templates),
``DETECTED`` and ``DETECTED_NEGATIVE`` are dropped, every other plane ``P`` becomes ``P_TEMPLATE``
(``SAT`` -> ``SAT_TEMPLATE``). Planes of the convolved image are grown by the kernel
half-width (a convolved pixel takes the OR of the masks under the kernel, as afw does); for ZOGY
both images' planes are grown by 2 FWHM. Pixels within that distance of the border get ``EDGE``.
The image is 0 where ``NO_DATA``.

Errors
------
``DiffimSkip`` (a documented "skip this data ID" outcome) when the template covers less than
``min_template_coverage`` of the image or fewer than ``min_kernel_stars`` kernel stars are usable;
``DiffimError`` for unusable input (shapes differ, no PSF, bad configuration).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from apsnake.errors import ApsnakeError
from apsnake.exposure import Exposure, PsfModel

log = logging.getLogger(__name__)

SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
FFT_WORKERS = 1  # scipy.fft workers (the pipeline parallelises over detectors)
_STAT_SAMPLES = 200_000  # pixels sampled for image statistics
_BAND_ROWS = 64  # noise estimates use bands of this many rows ...
_BAND_PIXELS = 1_000_000  # ... totalling about this many pixels
_STAT_PLANES = ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT", "DETECTED",
                "DETECTED_NEGATIVE", "HIGH_VARIANCE", "STREAK")
_TEMPLATE_PLANES_KEPT = ("NO_DATA", "BAD", "HIGH_VARIANCE")  # template planes keeping their name
_BAD_FLAG_PREFIXES = ("bad", "edge", "saturated", "nodata", "offimage", "interpolatedcenter",
                      "crcenter", "suspectcenter", "streakcenter", "sat")


class DiffimSkip(ApsnakeError, ValueError):
    """Documented outcome "skip this data ID": too little template coverage or too few kernel
    stars. The message gives the numbers."""


class DiffimError(ApsnakeError, ValueError):
    """Unusable input to the subtraction (shapes differ, a PSF is missing, bad configuration)."""


@dataclass
class DiffimConfig:
    """Image subtraction options (Rubin ``AlardLuptonSubtractTask`` defaults where it has them).

    Attributes
    ----------
    method : str
        ``"alard-lupton"`` or ``"zogy"``.
    convolve : str
        ``"template"``, ``"science"`` or ``"auto"`` (convolve the science image only when the
        template PSF is wider in both axes, Rubin ``mode="auto"``). Alard-Lupton only.
    n_gaussians, degrees, sigmas :
        Number, polynomial degrees and base widths (pixels) of the Gaussians of the basis.
    scale_by_fwhm : bool
        Scale the widths with the seeing difference (Rubin ``scaleByFwhm``).
    min_sigma, min_sigma_deconvolve : float
        Smallest kernel width, pixels (Rubin ``alardMinSig`` 0.7 and ``alardMinSigDeconv`` 0.4).
    gauss_beta : float
        Ratio of successive widths (Rubin ``alardGaussBeta``).
    kernel_size_fwhm_scaling, kernel_size_min, kernel_size_max :
        Kernel side = odd ``int(scaling * sigma_last)`` clamped to [min, max] pixels.
    spatial_order : int
        Polynomial order of the kernel's spatial variation (Rubin ``spatialKernelOrder=1``).
    background_order : int
        Polynomial order of the fitted differential background (Rubin ``spatialBgOrder=2``;
        fitted, not subtracted).
    min_stars_per_term : float
        The orders are lowered while there are fewer kernel stars than this per polynomial term.
    cell_size, stars_per_cell : int
        Kernel stars are spread over square cells of ``cell_size`` pixels, at most
        ``stars_per_cell`` (the highest-S/N ones) per cell (Rubin ``sizeCellX/Y=128``,
        ``nStarPerCell=5``).
    min_kernel_stars, max_kernel_stars : int
        ``DiffimSkip`` with fewer usable kernel stars; at most this many are used.
    kernel_star_snr : tuple of float
        Range of S/N of kernel stars (Rubin 10-500).
    stamp_fwhm_scaling : float
        Fit stamp half-width = max(kernel half-width, ceil(this * FWHM of the target image)).
    n_iter : int
        Fit-and-reject iterations (Rubin ``maxSpatialIterations=3``).
    max_residual_mean, max_residual_std : float
        Reject kernel stars whose normalised residual mean / std exceed these (Rubin
        ``candidateResidualMeanMax=0.25``, ``candidateResidualStdMax=1.5``).
    max_condition : float
        Eigenvalues of the (Jacobi-scaled) normal matrix below ``max / max_condition`` are
        dropped from the solution (Rubin ``maxConditionNumber=5e7``).
    bad_mask_planes : tuple of str
        Mask planes that exclude a kernel star when present in its cutout of either image.
    min_template_coverage : float
        ``DiffimSkip`` when less than this fraction of the pixels has template coverage.
    scale_variance : bool
        Rescale both variance planes to the measured pixel noise first (Rubin
        ``doScaleVariance``); factors outside ``[1/limit, limit]`` are not applied.
    variance_scale_limit : float
        See ``scale_variance``.
    decorrelate : bool
        Apply the decorrelation afterburner (Alard-Lupton only).
    model_error : float
        Fraction of the matched template added in quadrature to the difference variance,
        a systematic floor for imperfect PSF matching at bright sources (0 = none, Rubin).
    isolation_flux_ratio : float
        A kernel star is rejected when a source within its stamp is brighter than this fraction
        of its flux, or any source lies within 2 FWHM.
    """

    method: str = "alard-lupton"
    convolve: str = "auto"
    n_gaussians: int = 3
    degrees: tuple = (4, 2, 2)
    sigmas: tuple = (0.7, 1.5, 3.0)
    scale_by_fwhm: bool = True
    min_sigma: float = 0.7
    min_sigma_deconvolve: float = 0.4
    gauss_beta: float = 2.0
    kernel_size_fwhm_scaling: float = 6.0
    kernel_size_min: int = 21
    kernel_size_max: int = 35
    spatial_order: int = 1
    background_order: int = 2
    min_stars_per_term: float = 3.0
    cell_size: int = 128
    stars_per_cell: int = 5
    min_kernel_stars: int = 3
    max_kernel_stars: int = 1000
    kernel_star_snr: tuple = (10.0, 500.0)
    stamp_fwhm_scaling: float = 2.5
    n_iter: int = 3
    max_residual_mean: float = 0.25
    max_residual_std: float = 1.5
    max_condition: float = 5e7
    bad_mask_planes: tuple = ("SAT", "BAD", "NO_DATA", "EDGE", "HIGH_VARIANCE")
    min_template_coverage: float = 0.1
    scale_variance: bool = True
    variance_scale_limit: float = 10.0
    decorrelate: bool = True
    model_error: float = 0.0
    isolation_flux_ratio: float = 0.5

    def __post_init__(self):
        if self.method not in ("alard-lupton", "zogy"):
            raise DiffimError(f"method must be 'alard-lupton' or 'zogy', got {self.method!r}")
        if self.convolve not in ("auto", "template", "science"):
            raise DiffimError(f"convolve must be 'auto', 'template' or 'science', got {self.convolve!r}")
        if not (len(self.degrees) == len(self.sigmas) == self.n_gaussians >= 1):
            raise DiffimError(f"n_gaussians={self.n_gaussians} needs as many degrees and sigmas, "
                              f"got {self.degrees} and {self.sigmas}")
        if self.kernel_size_min % 2 != 1 or self.kernel_size_max < self.kernel_size_min:
            raise DiffimError(f"kernel size range must be odd and ordered, got "
                              f"[{self.kernel_size_min}, {self.kernel_size_max}]")
        if self.spatial_order < 0 or self.background_order < 0:
            raise DiffimError("spatial_order and background_order must be >= 0")
        if self.min_kernel_stars < 1 or self.max_kernel_stars < self.min_kernel_stars:
            raise DiffimError(f"need 1 <= min_kernel_stars <= max_kernel_stars, got "
                              f"{self.min_kernel_stars}, {self.max_kernel_stars}")


@dataclass
class DiffimResult:
    """The result of ``subtract``.

    Attributes
    ----------
    difference : Exposure
        Science minus PSF-matched template in the science flux unit (nJy), with its variance,
        mask (see the module notes) and PSF (science PSF, template PSF when the science image
        was convolved, decorrelated; ``P_D`` for ZOGY). WCS, visit info and calibration are the
        science image's.
    matched_template : Exposure
        The template convolved to the science PSF (Alard-Lupton, template convolved), the
        template scaled by ``1 / ksum`` (science convolved), or ``R * k_r`` (ZOGY); in science
        flux units with the PSF to use for its forced photometry (``templateFlux``).
    score : numpy.ndarray or None
        ZOGY ``S_corr`` in units of sigma (``method == "zogy"``), else None.
    metadata : dict
        Kernel and fit diagnostics, QA metrics and timings (see ``subtract``).
    """

    difference: Exposure
    matched_template: Exposure
    score: np.ndarray | None
    metadata: dict


def config_from_options(options: dict | None) -> DiffimConfig:
    """A ``DiffimConfig`` from the workflow configuration's ``diffim`` section.

    Keys are ``DiffimConfig`` field names; missing keys keep their defaults, lists become tuples.

    Raises
    ------
    DiffimError
        For a key that is not a ``DiffimConfig`` field, or invalid values.
    """
    from apsnake.options import dataclass_from_options

    return dataclass_from_options(DiffimConfig, options, "diffim", DiffimError)


def skipped_difference(science: Exposure, reason: str) -> Exposure:
    """The difference written for a skipped data ID (``DiffimSkip``): image 0 and NO_DATA
    everywhere, the science variance, mask planes, PSF, WCS and visit info, and the reason in
    the metadata (``DIFFSKIP = True``, ``DIFFWHY``)."""
    planes = dict(science.mask_planes)
    out = replace(science, image=np.zeros(science.image.shape, np.float32),
                  mask=np.array(science.mask, np.int32, copy=True),
                  variance=np.array(science.variance, np.float32, copy=True),
                  mask_planes=planes, metadata=dict(science.metadata))
    out.mask |= np.int32(out.mask_bit("NO_DATA"))
    out.metadata.update({"DIFFSKIP": True, "DIFFWHY": str(reason)})
    return out


# ---------------------------------------------------------------------------
# Small helpers.
def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def _term_powers(order: int):
    """(power of u, power of v) of each polynomial term, PsfModel order 1, u, v, u^2, uv, ..."""
    return [(n - j, j) for n in range(order + 1) for j in range(n + 1)]


def _poly_terms(order: int, u, v) -> np.ndarray:
    u = np.asarray(u, float)
    v = np.asarray(v, float)
    return np.stack([u ** a * v ** b for a, b in _term_powers(order)], axis=-1)


def _frame(shape):
    """Centre and scale of the spatial polynomials (the PsfModel convention)."""
    ny, nx = shape
    return (nx - 1) / 2.0, (ny - 1) / 2.0, max(nx, ny) / 2.0


def _sample(shape, good=None, max_n=_STAT_SAMPLES):
    """A regular subsampling slice pair and the matching good-pixel selector."""
    step = max(1, int(math.sqrt(shape[0] * shape[1] / max_n)))
    sl = (slice(step // 2, None, step), slice(step // 2, None, step))
    return sl, (None if good is None else good[sl])


def _robust_std(values) -> float:
    values = np.asarray(values, float)
    if values.size == 0:
        return float("nan")
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _clipped_mean(values, nsigma: float = 3.0, n_iter: int = 3) -> float:
    """Mean after ``n_iter`` rounds of clipping at ``nsigma`` standard deviations around the median."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    for _ in range(n_iter):
        centre, sd = np.median(v), v.std()
        keep = np.abs(v - centre) <= nsigma * sd
        if keep.all() or keep.sum() < 10:
            break
        v = v[keep]
    return float(v.mean())


def _pad_centered(stamp: np.ndarray, shape) -> np.ndarray:
    """Zero array of ``shape`` (last two axes) with the stamp's central pixel at [0, 0] (wrapped)."""
    ny, nx = stamp.shape[-2:]
    out = np.zeros(stamp.shape[:-2] + tuple(shape), dtype=stamp.dtype)
    rows = (np.arange(ny) - ny // 2) % shape[0]
    cols = (np.arange(nx) - nx // 2) % shape[1]
    out[..., rows[:, None], cols[None, :]] = stamp
    return out


def _crop_centered(array: np.ndarray, size: int) -> np.ndarray:
    """Inverse of ``_pad_centered``: the ``size`` x ``size`` stamp centred on [0, 0]."""
    rows = (np.arange(size) - size // 2) % array.shape[-2]
    cols = (np.arange(size) - size // 2) % array.shape[-1]
    return array[..., rows[:, None], cols[None, :]]


def _cutouts(array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    """(N, 2h+1, 2h+1) cutouts centred on integer pixels (callers keep them inside the image)."""
    offsets = np.arange(-half, half + 1)
    return array[(iy[:, None] + offsets)[:, :, None], (ix[:, None] + offsets)[:, None, :]]


def _grow_bits(mask: np.ndarray, radius: int) -> np.ndarray:
    """OR of ``mask`` over a (2r+1)^2 box around each pixel (box dilation of every bit plane).

    Sliding OR along each axis by doubling: ``g_2p(i) = g_p(i) | g_p(i + p)`` up to the largest
    power of two ``P <= w``, then ``W(i) = g_P(i - r) | g_P(i - r + w - P)`` (overlapping windows
    are harmless for OR). Works on the bounding box of the set pixels only.
    """
    if radius <= 0 or not mask.any():
        return mask.copy()
    ny, nx = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, ny)
    c0, c1 = max(cols[0] - radius, 0), min(cols[-1] + radius + 1, nx)
    out = np.zeros_like(mask)
    sub = mask[r0:r1, c0:c1]
    w = 2 * radius + 1
    for axis in (0, 1):
        n = sub.shape[axis]
        # pad by radius on both sides along this axis
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        g = np.pad(sub, pad)
        p = 1
        while 2 * p <= w:
            head = [slice(None), slice(None)]
            tail = [slice(None), slice(None)]
            head[axis] = slice(0, g.shape[axis] - p)
            tail[axis] = slice(p, None)
            g2 = g.copy()
            g2[tuple(head)] |= g[tuple(tail)]
            g = g2
            p *= 2
        a = [slice(None), slice(None)]
        b = [slice(None), slice(None)]
        a[axis] = slice(0, n)
        b[axis] = slice(w - p, w - p + n)
        sub = g[tuple(a)] | g[tuple(b)]
    out[r0:r1, c0:c1] = sub
    return out


def _psf_widths(stamp: np.ndarray):
    """FWHM (``apsnake.psf.measure_fwhm``) and Gaussian-equivalent sigmas along x and y.

    The sigmas come from Gaussian-windowed second moments (window of the FWHM's sigma) about the
    windowed centroid, deconvolved from the window: ``s^2 = M w^2 / (w^2 - M)``.
    """
    from apsnake.psf import measure_fwhm

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


def _fft_shape(shape, pad: int):
    from scipy.fft import next_fast_len

    return (next_fast_len(shape[0] + pad, real=True), next_fast_len(shape[1] + pad, real=True))


# ---------------------------------------------------------------------------
# Alard-Lupton basis.
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


def _raw_basis_factors(sigmas, degrees, size: int):
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
    fx, fy, T = _raw_basis_factors(sigmas, degrees, size)
    raw = fy[:, :, None] * fx[:, None, :]
    return np.tensordot(T, raw, axes=1)


# ---------------------------------------------------------------------------
# Inputs.
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


def _prepare(exposure: Exposure, usable: np.ndarray | None = None):
    """float32 image (0 where unusable or non-finite), float32 variance (non-finite or
    non-positive replaced by the median), the usable-pixel selector and the statistics mask
    (True = ignore: unusable or in one of the ``_STAT_PLANES``)."""
    image = np.asarray(exposure.image, np.float32)
    variance = np.asarray(exposure.variance, np.float32)
    var_ok = np.isfinite(variance)
    var_ok &= variance > 0
    ok = np.isfinite(image)
    ok &= var_ok
    if usable is not None:
        ok &= usable
    if not ok.all():
        image = np.where(ok, image, np.float32(0))
        fill = np.median(variance[var_ok]) if var_ok.any() else 1.0
        variance = np.where(var_ok, variance, np.float32(fill))
    ignore = exposure.mask_of(*_STAT_PLANES)
    ignore |= ~ok
    return image, variance, ok, ignore


def _bands(ny: int, nx: int):
    """Row indices of evenly spread bands of ``_BAND_ROWS`` rows covering ~``_BAND_PIXELS``."""
    n_bands = max(1, min(ny // _BAND_ROWS, int(math.ceil(_BAND_PIXELS / (_BAND_ROWS * nx)))))
    if n_bands * _BAND_ROWS >= ny:
        return np.arange(ny)
    starts = np.linspace(0, ny - _BAND_ROWS, n_bands).astype(int)
    return (starts[:, None] + np.arange(_BAND_ROWS)[None, :]).ravel()


def _source_free(image, variance, ignore, binning: int = 4):
    """Normalised image ``z = image / sqrt(variance)`` and a selector of pixels away from sources.

    Sources are found on the ``binning`` x ``binning`` binned ``z`` (bins above 2 robust sigmas of
    the bins, grown by one bin); masked pixels are excluded too. Without a DETECTED plane this
    keeps star wings out of noise estimates (they would inflate a MAD by ~10-20 % in a field of
    5-px-FWHM stars).
    """
    from scipy.ndimage import maximum_filter

    z = image / np.sqrt(variance)
    z[ignore] = 0
    ny, nx = z.shape
    by, bx = ny // binning, nx // binning
    keep = ~ignore
    if by >= 4 and bx >= 4:
        zb = z[:by * binning, :bx * binning].reshape(by, binning, bx, binning).mean(axis=(1, 3))
        badb = ignore[:by * binning, :bx * binning].reshape(by, binning, bx, binning).any(axis=(1, 3))
        sb = _robust_std(zb[~badb]) if (~badb).sum() > 16 else float("nan")
        if np.isfinite(sb) and sb > 0:
            src = maximum_filter((zb > 2 * sb) | badb, size=3)
            full = np.ones((ny, nx), bool)
            full[:by * binning, :bx * binning] = np.repeat(np.repeat(src, binning, axis=0), binning, axis=1)
            keep &= ~full
    return z, keep


def _variance_scale(image, variance, ignore, limit: float, psf_sigma: float | None = None):
    """Factor bringing the variance plane to the measured noise.

    The noise is measured on the PSF scale when ``psf_sigma`` (pixels) is given: the image
    smoothed with a Gaussian of that width, divided by the noise its variance plane predicts
    (``detection.smooth_for_detection``). A template warped twice (calexp -> sky cell ->
    calexp) has noise correlated over a few pixels: its per-pixel scatter is ~0.4 of its
    PSF-scale noise squared, and a per-pixel factor would leave PSF fluxes and detection
    thresholds on the difference with errors ~1.5x too small. For white noise both agree.
    Source-free unmasked pixels of evenly spread row bands are used; the factor is 1 when
    outside [1/limit, limit].
    """
    rows = _bands(*image.shape)
    z, keep = _source_free(image[rows], variance[rows], ignore[rows])
    if psf_sigma is not None and psf_sigma > 0:
        from scipy.ndimage import binary_dilation

        from apsnake.detection import smooth_for_detection

        smooth, noise = smooth_for_detection(image[rows], variance[rows], ignore[rows], psf_sigma)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = smooth / noise
        near_mask = binary_dilation(ignore[rows] | ~keep, iterations=max(1, int(round(3 * psf_sigma))))
        keep = keep & ~near_mask & np.isfinite(z)
    values = z[keep]
    if values.size > _STAT_SAMPLES:
        values = values[:: values.size // _STAT_SAMPLES]
    if values.size < 100:
        return 1.0
    factor = _robust_std(values) ** 2
    if not np.isfinite(factor) or not (1.0 / limit <= factor <= limit):
        log.warning("variance scale factor %.3g outside [1/%g, %g]: not applied", factor, limit, limit)
        return 1.0
    return factor


def _exposure_psf_sigma(exposure) -> float | None:
    """Gaussian-equivalent PSF width (pixels) at the image centre, None without a PSF."""
    if exposure.psf is None:
        return None
    from apsnake.psf import measure_fwhm

    ny, nx = exposure.shape
    return float(measure_fwhm(exposure.psf.evaluate(nx / 2.0, ny / 2.0))) / 2.3548


def _mean_variance(variance, ignore) -> float:
    sl, good = _sample(variance.shape, ~ignore)
    return _clipped_mean(variance[sl][good])


def _map_template_mask(template: Exposure, diff_planes: dict) -> tuple[np.ndarray, dict]:
    """Template mask bits mapped to difference planes (NO_DATA, BAD, HIGH_VARIANCE kept; DETECTED*
    dropped; others renamed ``<PLANE>_TEMPLATE``). Returns the mapped int32 mask (None when no bit maps)
    and the updated planes."""
    tmask = np.asarray(template.mask, np.int32)
    present = int(np.bitwise_or.reduce(tmask.ravel())) if tmask.size else 0
    holder = Exposure(image=np.zeros((1, 1), np.float32), mask=np.zeros((1, 1), np.int32),
                      variance=np.zeros((1, 1), np.float32), visit_info=template.visit_info,
                      detector=template.detector, mask_planes=dict(diff_planes))
    lut = np.zeros(1 << 16, np.int32)
    lut_hi = np.zeros(1 << 16, np.int32)
    any_hi = False
    for name, bit in template.mask_planes.items():
        if not present & (1 << bit) or name in ("DETECTED", "DETECTED_NEGATIVE"):
            continue
        target = name if name in _TEMPLATE_PLANES_KEPT else f"{name}_TEMPLATE"
        value = holder.mask_bit(target)
        table = lut if bit < 16 else lut_hi
        any_hi |= bit >= 16
        idx = np.arange(1 << 16)
        table[(idx >> (bit % 16)) & 1 == 1] |= np.int32(value)
    if not (lut.any() or lut_hi.any()):
        return None, holder.mask_planes
    mapped = lut[tmask & 0xFFFF]
    if any_hi:
        mapped |= lut_hi[(tmask >> 16) & 0xFFFF]
    return mapped, holder.mask_planes


# ---------------------------------------------------------------------------
# Kernel stars.
def _source_columns(sources):
    """x, y, flux, snr and a bad-flag vector from a source table (DataFrame or mapping)."""
    keys = list(sources.columns) if hasattr(sources, "columns") else list(sources.keys())
    for needed in ("x", "y"):
        if needed not in keys:
            raise DiffimError(f"source table has no {needed!r} column (columns: {keys[:12]}...)")
    x = np.asarray(sources["x"], float)
    y = np.asarray(sources["y"], float)
    flux = np.asarray(sources["psfFlux"], float) if "psfFlux" in keys else np.full(len(x), np.nan)
    if "snr" in keys:
        snr = np.asarray(sources["snr"], float)
    elif "psfFluxErr" in keys:
        snr = flux / np.asarray(sources["psfFluxErr"], float)
    else:
        raise DiffimError("source table needs 'snr' or 'psfFlux' and 'psfFluxErr'")
    flagged = np.zeros(len(x), bool)
    for key in keys:
        if isinstance(key, str) and key.startswith("pixelFlags_"):
            suffix = key[len("pixelFlags_"):].lower()
            if suffix.startswith(_BAD_FLAG_PREFIXES):
                flagged |= np.asarray(sources[key], bool)
    return x, y, flux, snr, flagged


def _detect_sources(science: Exposure, image, variance, ignore):
    """Fallback source list when none is given: sep detection at 5 sigma, PSF fluxes."""
    import sep

    from apsnake.psf import psf_flux

    data = np.ascontiguousarray(image, dtype=np.float64)
    err = np.ascontiguousarray(np.sqrt(variance), dtype=np.float64)
    bad = np.ascontiguousarray(science.mask_of("BAD", "SAT", "NO_DATA", "EDGE", "CR"))
    pixstack = sep.get_extract_pixstack()
    sep.set_extract_pixstack(max(pixstack, image.size // 4))
    try:
        objects = sep.extract(data, 5.0, err=err, mask=bad, minarea=5)
    except Exception as err_:  # sep raises plain Exceptions on pathological images
        raise DiffimError(f"source detection for kernel stars failed: {err_}") from err_
    finally:
        sep.set_extract_pixstack(pixstack)
    x, y = objects["x"], objects["y"]
    flux, flux_err, _, _ = psf_flux(image, variance, science.psf, x, y, bad=bad)
    return {"x": x, "y": y, "psfFlux": flux, "psfFluxErr": flux_err, "snr": flux / flux_err}


def _select_kernel_stars(sources, shape, bad_cut, big: int, hs: int, fwhm: float, cfg: DiffimConfig):
    """Indices (into the source table) and integer positions of kernel stars; counts per stage."""
    from scipy.spatial import cKDTree

    x, y, flux, snr, flagged = _source_columns(sources)
    if not np.isfinite(flux).any():
        flux = snr  # no fluxes: rank neighbours by S/N
    ny, nx = shape
    counts = {"sources": len(x)}
    lo, hi = cfg.kernel_star_snr
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(snr) & (snr >= lo) & (snr <= hi)
    counts["snr"] = int(ok.sum())
    ok &= ~flagged
    counts["unflagged"] = int(ok.sum())
    ix = np.floor(np.where(np.isfinite(x), x, -1e9) + 0.5).astype(np.int64)
    iy = np.floor(np.where(np.isfinite(y), y, -1e9) + 0.5).astype(np.int64)
    ok &= (ix >= big) & (ix < nx - big) & (iy >= big) & (iy < ny - big)
    counts["inside"] = int(ok.sum())
    # isolation: no source within 2 FWHM, none brighter than ratio * flux within the stamp
    located = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if ok.any() and len(located) > 1:
        tree = cKDTree(np.column_stack([x[located], y[located]]))
        pairs = tree.query_pairs(math.sqrt(2) * hs, output_type="ndarray")
        if len(pairs):
            i, j = located[pairs[:, 0]], located[pairs[:, 1]]
            dist = np.hypot(x[i] - x[j], y[i] - y[j])
            fl = np.where(np.isfinite(flux), np.abs(flux), np.inf)
            crowded = np.zeros(len(x), bool)
            close = dist < 2 * fwhm
            in_box = (np.abs(x[i] - x[j]) <= hs) & (np.abs(y[i] - y[j]) <= hs)
            crowded[i[close | (in_box & (fl[j] > cfg.isolation_flux_ratio * fl[i]))]] = True
            crowded[j[close | (in_box & (fl[i] > cfg.isolation_flux_ratio * fl[j]))]] = True
            ok &= ~crowded
    counts["isolated"] = int(ok.sum())
    cand = np.flatnonzero(ok)
    if len(cand):
        dirty = _cutouts(bad_cut, ix[cand], iy[cand], big).any(axis=(1, 2))
        cand = cand[~dirty]
    counts["clean"] = len(cand)
    # at most stars_per_cell per cell, the highest S/N first
    if len(cand):
        cell = (iy[cand] // cfg.cell_size) * (nx // cfg.cell_size + 1) + ix[cand] // cfg.cell_size
        order = np.lexsort((-snr[cand], cell))
        cand, cell = cand[order], cell[order]
        first = np.r_[0, np.flatnonzero(np.diff(cell)) + 1]
        rank = np.arange(len(cand)) - np.repeat(first, np.diff(np.r_[first, len(cand)]))
        cand = cand[rank < cfg.stars_per_cell]
        if len(cand) > cfg.max_kernel_stars:
            cand = cand[np.argsort(-snr[cand], kind="stable")[: cfg.max_kernel_stars]]
    counts["selected"] = len(cand)
    return cand, ix[cand], iy[cand], snr[cand], counts


# ---------------------------------------------------------------------------
# Kernel fit.
@dataclass
class _Stamps:
    ref_hat: np.ndarray   # (N, L, L//2+1) complex64: FFT of the reference cutouts
    var_hat: np.ndarray   # (N, L, L//2+1) complex64: FFT of the reference variance cutouts
    tgt: np.ndarray       # (N, S, S) float64 target stamps
    tgt_var: np.ndarray   # (N, S, S) float64 target variance
    M: np.ndarray         # (N, nb+1, nb+1) local normal matrices (basis + constant)
    b: np.ndarray         # (N, nb+1) local right-hand sides
    p_xy: np.ndarray      # (N, 2) positions (x, y)
    fft_size: int


def _build_stamps(ref_img, ref_var, tgt_img, tgt_var, ix, iy, sigmas, degrees, ks, hs, ref_scale=1.0,
                  tgt_scale=1.0, chunk=64) -> _Stamps:
    """Cutouts, their FFTs and the per-star normal equations of the basis fit.

    The raw basis is separable, ``raw_j = fy_j(y) fx_j(x)``, so ``raw_j * ref`` is an inverse FFT
    along y of ``ref^ fy_j^`` (one per distinct y factor, keeping only the rows of the stamp)
    followed by an inverse real FFT along x of that times ``fx_j^``; the normal equations of the
    raw basis are then transformed to the renormalised one (``basis = T raw``).
    """
    from scipy.fft import fft, ifft, irfft, next_fast_len, rfft, rfft2

    fx, fy, T = _raw_basis_factors(sigmas, degrees, ks)
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
    fy_hat = fft(_pad_centered(uy[:, None, :], (1, L))[:, 0, :], axis=-1).astype(np.complex64)   # (ny, L)
    fx_hat = rfft(_pad_centered(fx[:, None, :], (1, L))[:, 0, :], axis=-1).astype(np.complex64)  # (nb, L//2+1)
    n = len(ix)
    ref_hat = np.empty((n, L, L // 2 + 1), np.complex64)
    var_hat = np.empty_like(ref_hat)
    tgt = _cutouts(tgt_img, ix, iy, hs).astype(float)
    tvar = _cutouts(tgt_var, ix, iy, hs).astype(float) * tgt_scale
    M = np.empty((n, nb + 1, nb + 1))
    b = np.empty((n, nb + 1))
    Taug = np.eye(nb + 1)
    Taug[:nb, :nb] = T
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        rc = _cutouts(ref_img, ix[sl], iy[sl], big).astype(np.float32)
        vc = _cutouts(ref_var, ix[sl], iy[sl], big).astype(np.float32) * np.float32(ref_scale)
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
    return _Stamps(ref_hat=ref_hat, var_hat=var_hat, tgt=tgt, tgt_var=tvar, M=M, b=b,
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


def _star_residuals(st: _Stamps, basis, k_loc, bg_loc, hs):
    """Normalised residuals (N, S, S) of the local kernels on the stamps."""
    from scipy.fft import irfft2, rfft2

    kh = basis.shape[-1] // 2
    L = st.fft_size
    S = 2 * hs + 1
    kern = np.tensordot(k_loc, basis, axes=1)  # (N, ks, ks)
    kern_hat = rfft2(_pad_centered(kern.astype(np.float32), (L, L)), workers=FFT_WORKERS)
    sq_hat = rfft2(_pad_centered((kern ** 2).astype(np.float32), (L, L)), workers=FFT_WORKERS)
    model = irfft2(st.ref_hat * kern_hat, s=(L, L), workers=FFT_WORKERS)[:, kh:kh + S, kh:kh + S]
    vconv = irfft2(st.var_hat * sq_hat, s=(L, L), workers=FFT_WORKERS)[:, kh:kh + S, kh:kh + S]
    model = model + bg_loc[:, None, None]
    sigma = np.sqrt(np.clip(st.tgt_var + vconv, 1e-30, None))
    return (st.tgt - model) / sigma


def _fit_kernel(st: _Stamps, basis, shape, hs, cfg: DiffimConfig):
    """Spatial kernel fit with iterative rejection of stars with outlying residuals."""
    nb = basis.shape[0]
    n = len(st.M)
    x0, y0, scale = _frame(shape)
    u = (st.p_xy[:, 0] - x0) / scale
    v = (st.p_xy[:, 1] - y0) / scale
    k_order, b_order = cfg.spatial_order, cfg.background_order
    use = np.ones(n, bool)
    history = []
    for iteration in range(cfg.n_iter + 1):
        n_use = int(use.sum())
        k_order = cfg.spatial_order
        while k_order > 0 and n_use < cfg.min_stars_per_term * _n_terms(k_order):
            k_order -= 1
        b_order = cfg.background_order
        while b_order > 0 and n_use < cfg.min_stars_per_term * _n_terms(b_order):
            b_order -= 1
        p = _poly_terms(k_order, u, v)
        q = _poly_terms(b_order, u, v)
        a, c, condition, dropped = _solve(st.M[use], st.b[use], p[use], q[use], nb, cfg.max_condition)
        k_loc = p @ a.T
        bg_loc = q @ c
        z = _star_residuals(st, basis, k_loc, bg_loc, hs)
        r_mean = z.mean(axis=(1, 2))
        r_std = z.std(axis=(1, 2))
        history.append(n_use)
        if iteration == cfg.n_iter:
            break
        bad = use & ((np.abs(r_mean) > cfg.max_residual_mean) | (r_std > cfg.max_residual_std))
        spare = n_use - cfg.min_kernel_stars
        if bad.sum() > spare:  # keep min_kernel_stars: reject only the worst ones
            worst = np.flatnonzero(bad)
            badness = np.maximum(np.abs(r_mean[worst]) / cfg.max_residual_mean, r_std[worst] / cfg.max_residual_std)
            bad[:] = False
            bad[worst[np.argsort(-badness)[:max(spare, 0)]]] = True
        if not bad.any():
            break
        use &= ~bad
    return dict(a=a, c=c, k_order=k_order, b_order=b_order, use=use, r_mean=r_mean, r_std=r_std,
                condition=condition, dropped=dropped, history=history)


# ---------------------------------------------------------------------------
# Full-image operations.
def _kernel_spectra(kernels: np.ndarray, shape_fft) -> np.ndarray:
    """rfft2 of small centred kernels zero-padded to ``shape_fft``, as DFT matrix products
    (``E_y K E_x``: cheaper than FFTs of mostly-zero full-size arrays). (n, Py, Px//2+1) complex64."""
    n, ks, _ = kernels.shape
    h = ks // 2
    py, px = shape_fft
    lag = np.arange(-h, h + 1)
    ey = np.exp(-2j * np.pi * np.outer(np.arange(py), lag) / py).astype(np.complex64)
    ex = np.exp(-2j * np.pi * np.outer(lag, np.arange(px // 2 + 1)) / px).astype(np.complex64)
    out = np.empty((n, py, px // 2 + 1), np.complex64)
    for i, k in enumerate(kernels):
        np.matmul(ey @ k.astype(np.complex64), ex, out=out[i])
    return out


def _convolve_spatial(image, kernels, order, shape_fft):
    """``sum_s P_s(x, y) (K_s * image)`` for the spatial polynomial terms ``P_s``; also returns
    ``|K_0^|^2``, the squared modulus of the FFT of the central kernel on the padded grid."""
    from scipy.fft import irfft2, rfft2

    ny, nx = image.shape
    x0, y0, scale = _frame(image.shape)
    urow = ((np.arange(nx) - x0) / scale).astype(np.float32)[None, :]
    vcol = ((np.arange(ny) - y0) / scale).astype(np.float32)[:, None]
    img_hat = rfft2(image, s=shape_fft, workers=FFT_WORKERS)
    spectra = _kernel_spectra(kernels, shape_fft)
    k0_abs2 = spectra[0].real ** 2
    k0_abs2 += spectra[0].imag ** 2
    out = None
    for s, (pu, pv) in enumerate(_term_powers(order)):
        spectra[s] *= img_hat
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


def _kernel_sq_sum_map(kernels, order, shape) -> np.ndarray:
    """``sum(K(x, y)^2)`` over the kernel pixels at every image pixel (a polynomial)."""
    ny, nx = shape
    x0, y0, scale = _frame(shape)
    u = (np.arange(nx) - x0) / scale
    v = (np.arange(ny) - y0) / scale
    powers = _term_powers(order)
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


def _decorrelation(k_center, var_unconv, var_conv, psf: PsfModel, shape_fft=None):
    """Decorrelation filter phi on a small grid (for the PSF and the variance weights).

    Returns the convolved PSF model, the weights ``<phi^2>`` and ``<|K phi|^2>`` and the kernel
    sum.
    """
    from scipy.fft import irfft2, next_fast_len, rfft2

    ks = k_center.shape[0]
    ps = psf.components.shape[-1]
    G = next_fast_len(2 * (ks + ps), real=True)
    k_hat = np.fft.fft2(_pad_centered(k_center, (G, G)))
    ksum = float(k_center.sum())
    k2 = np.abs(k_hat) ** 2
    phi = np.sqrt((var_unconv + var_conv * ksum ** 2) / (var_unconv + var_conv * k2))
    w_unconv = float(np.mean(phi ** 2))
    w_conv = float(np.mean(k2 * phi ** 2))
    comps = _pad_centered(np.asarray(psf.components, float), (G, G))
    half = phi[:, : G // 2 + 1]
    new = irfft2(rfft2(comps, axes=(-2, -1)) * half, s=(G, G), axes=(-2, -1))
    new_psf = replace(psf, components=_crop_centered(new, ps).astype(np.float32))
    return new_psf, w_unconv, w_conv, ksum


def _footprint_ratio(diff, sci_img, diff_var, xs, ys, fwhm):
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
    d = _cutouts(diff, ix, iy, r).astype(float)
    s = _cutouts(sci_img, ix, iy, r).astype(float)
    v = _cutouts(diff_var, ix, iy, r).astype(float)
    noise = math.sqrt(2 / math.pi) * np.sqrt(np.clip(v, 0, None))
    num = (np.where(disk, np.abs(d) - noise, 0)).sum(axis=(1, 2))
    den = np.where(disk, s, 0).sum(axis=(1, 2))
    ratio = num[den > 0] / den[den > 0]
    if ratio.size == 0:
        return float("nan"), float("nan")
    return float(ratio.mean()), float(ratio.std())


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


# ---------------------------------------------------------------------------
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

    sci_img, sci_var, sci_ok, sci_ignore = _prepare(science)
    tpl_img, tpl_var, tpl_ok, tpl_ignore = _prepare(template, covered)
    # Variance scale factors are kept as scalars and folded into every use of the variance planes
    # (the planes may be the caller's arrays; no full-size copies).
    for name, img, var, ign in (("science", sci_img, sci_var, sci_ignore),
                                ("template", tpl_img, tpl_var, tpl_ignore)):
        exposure = science if name == "science" else template
        sigma = _exposure_psf_sigma(exposure)
        factor = _variance_scale(img, var, ign, cfg.variance_scale_limit, sigma) if cfg.scale_variance else 1.0
        meta[f"variance_scale_{name}"] = factor
    meta["time_prepare_s"] = time.perf_counter() - t_start

    if cfg.method == "zogy":
        result = _zogy(science, template, sci_img, sci_var, sci_ignore, tpl_img, tpl_var, tpl_ignore,
                       covered, cfg, meta)
    else:
        result = _alard_lupton(science, template, sources, sci_img, sci_var, sci_ok, sci_ignore, tpl_img,
                               tpl_var, tpl_ok, tpl_ignore, covered, cfg, meta)
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


def _assemble_mask(science: Exposure, template: Exposure, grow_template: int, grow_science: int,
                   covered: np.ndarray, fully_covered: bool, edge: int):
    """Difference mask and plane dictionary; also the NO_DATA selector of the difference (None
    when no pixel is NO_DATA)."""
    planes = dict(science.mask_planes)
    mapped, planes = _map_template_mask(template, planes)
    holder = Exposure(image=np.zeros((1, 1), np.float32), mask=np.zeros((1, 1), np.int32),
                      variance=np.zeros((1, 1), np.float32), visit_info=science.visit_info,
                      detector=science.detector, mask_planes=planes)
    no_data_bit = np.int32(holder.mask_bit("NO_DATA"))
    edge_bit = np.int32(holder.mask_bit("EDGE"))
    if not fully_covered:
        uncovered = np.where(covered, np.int32(0), no_data_bit)
        mapped = uncovered if mapped is None else mapped | uncovered
    if mapped is not None and grow_template:
        mapped = _grow_bits(mapped, grow_template)
    mask = np.array(science.mask, dtype=np.int32, copy=True)
    if grow_science:
        keep = 0
        for name in ("DETECTED", "DETECTED_NEGATIVE"):
            if name in science.mask_planes:
                keep |= 1 << science.mask_planes[name]
        grown = _grow_bits(mask & np.int32(~keep), grow_science)
        mask &= np.int32(keep)
        mask |= grown
    if mapped is not None:
        mask |= mapped
    if edge > 0:
        for sl in ((slice(None, edge),), (slice(-edge, None),), (slice(None), slice(None, edge)),
                   (slice(None), slice(-edge, None))):
            mask[sl] |= edge_bit
    if mapped is None and not (science.mask_planes.get("NO_DATA") is not None
                               and np.bitwise_or.reduce(science.mask.ravel()) & no_data_bit):
        no_data = None
    else:
        no_data = (mask & no_data_bit) != 0
    return mask, holder.mask_planes, no_data


def _alard_lupton(science, template, sources, sci_img, sci_var, sci_ok, sci_ignore, tpl_img, tpl_var,
                  tpl_ok, tpl_ignore, covered, cfg: DiffimConfig, meta: dict) -> DiffimResult:
    t0 = time.perf_counter()
    shape = sci_img.shape
    ny, nx = shape
    x0, y0, _ = _frame(shape)
    fwhm_s, sx_s, sy_s = _psf_widths(science.psf.evaluate(x0, y0))
    fwhm_t, sx_t, sy_t = _psf_widths(template.psf.evaluate(x0, y0))
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
    sigmas, ks = basis_sigmas(fwhm_ref, fwhm_tgt, cfg)
    kh = ks // 2
    basis = alard_lupton_basis(sigmas, cfg.degrees, ks)
    meta.update(kernel_size=ks, kernel_sigmas=[round(s, 4) for s in sigmas], kernel_degrees=list(cfg.degrees),
                n_basis=len(basis))

    # Kernel stars.
    hs = max(kh, int(math.ceil(cfg.stamp_fwhm_scaling * max(fwhm_tgt, 1.0))))
    big = hs + kh + 1
    bad_cut = science.mask_of(*cfg.bad_mask_planes)
    bad_cut |= template.mask_of(*cfg.bad_mask_planes)
    bad_cut |= ~sci_ok
    bad_cut |= ~tpl_ok
    if sources is None:
        sources = _detect_sources(science, sci_img, sci_var * np.float32(meta["variance_scale_science"]), sci_ignore)
        meta["kernel_sources"] = "sep"
    idx, ix, iy, snr, counts = _select_kernel_stars(sources, shape, bad_cut, big, hs, fwhm_s, cfg)
    meta["kernel_candidates"] = counts
    if len(idx) < cfg.min_kernel_stars:
        raise DiffimSkip(
            f"only {len(idx)} usable kernel stars for detector {science.data_id} (of {counts['sources']} "
            f"sources: {counts['snr']} with {cfg.kernel_star_snr[0]:g} <= S/N <= {cfg.kernel_star_snr[1]:g}, "
            f"{counts['unflagged']} unflagged, {counts['inside']} >= {big} px from the edge, "
            f"{counts['isolated']} isolated, {counts['clean']} without masked pixels); "
            f"min_kernel_stars={cfg.min_kernel_stars}")
    meta["time_select_s"] = time.perf_counter() - t0

    # Fit.
    t1 = time.perf_counter()
    st = _build_stamps(ref, ref_v, tgt, tgt_v, ix, iy, sigmas, cfg.degrees, ks, hs, f_ref, f_tgt)
    fit = _fit_kernel(st, basis, shape, hs, cfg)
    use = fit["use"]
    kernels = np.tensordot(fit["a"].T, basis, axes=1)  # (n_k, ks, ks) spatial components
    ksum = float(kernels[0].sum())
    corners = _poly_terms(fit["k_order"], np.array([-1.0, 1, -1, 1]) * (nx / 2) / _frame(shape)[2],
                          np.array([-1.0, -1, 1, 1]) * (ny / 2) / _frame(shape)[2])
    ksum_corners = corners @ kernels.sum(axis=(1, 2))
    meta.update(
        n_kernel_stars=int(use.sum()), kernel_spatial_order=fit["k_order"], background_order=fit["b_order"],
        kernel_residual_mean=float(fit["r_mean"][use].mean()), kernel_residual_std=float(fit["r_std"][use].mean()),
        kernel_residual_std_max=float(fit["r_std"][use].max()),
        kernel_sum=ksum, kernel_sum_range=[float(ksum_corners.min()), float(ksum_corners.max())],
        background_coeffs=[float(v) for v in fit["c"]], background_center=float(fit["c"][0]),
        condition_number=fit["condition"], eigenvalues_dropped=fit["dropped"], fit_iterations=fit["history"],
        kernel_stars={"x": ix.astype(float), "y": iy.astype(float), "snr": snr, "used": use,
                      "residual_mean": fit["r_mean"], "residual_std": fit["r_std"]},
    )
    meta["time_fit_s"] = time.perf_counter() - t1

    # Convolution and difference.
    t2 = time.perf_counter()
    shape_fft = _fft_shape(shape, kh)
    matched, k0_abs2 = _convolve_spatial(ref, kernels, fit["k_order"], shape_fft)
    ksq_map = _kernel_sq_sum_map(kernels, fit["k_order"], shape)
    if conv_science:
        inv = np.float32(1.0 / ksum)
        diff = (matched - tgt) * inv
        matched_img = tgt * inv
        matched_var = tgt_v * np.float32(f_tgt * inv ** 2)
    else:
        diff = tgt - matched
        matched_img = matched
        matched_var = ref_v * ksq_map
        matched_var *= np.float32(f_ref)
    mask, planes, no_data = _assemble_mask(science, template, 0 if conv_science else kh,
                                           kh if conv_science else 0, covered, meta["template_coverage"] == 1.0, kh)
    meta["time_convolve_s"] = time.perf_counter() - t2

    # Variance and decorrelation.
    t3 = time.perf_counter()
    s2 = _mean_variance(tgt_v, tpl_ignore if conv_science else sci_ignore) * f_tgt
    c2 = _mean_variance(ref_v, sci_ignore if conv_science else tpl_ignore) * f_ref
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
        diff_psf, w_unconv, w_conv, _ = _decorrelation(kernels[0], s2, c2, unconv_psf)
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
        variance *= np.float32(1.0 / ksum ** 2)
    diff = np.ascontiguousarray(diff, dtype=np.float32)
    if no_data is not None:
        diff[no_data] = 0
    diff_psf = replace(diff_psf, fwhm_pixels=float(_psf_widths(diff_psf.evaluate(x0, y0))[0]))
    meta["time_decorrelate_s"] = time.perf_counter() - t3

    used = np.flatnonzero(use)
    meta["differenceFootprintRatioMean"], meta["differenceFootprintRatioStdev"] = _footprint_ratio(
        diff, sci_img, variance, ix[used].astype(float), iy[used].astype(float), fwhm_s)

    difference = replace(science, image=diff, mask=mask, variance=np.asarray(variance, np.float32),
                         psf=diff_psf, mask_planes=planes, metadata=dict(science.metadata))
    tmask = np.asarray(template.mask, np.int32)
    if not conv_science:
        tmask = _grow_bits(tmask, kh)
    matched_exp = replace(template, image=np.asarray(matched_img, np.float32), mask=tmask,
                          variance=np.asarray(matched_var, np.float32),
                          psf=template.psf if conv_science else science.psf,
                          mask_planes=dict(template.mask_planes), metadata=dict(template.metadata))
    if meta["template_coverage"] < 1.0:
        matched_exp.image[~covered] = 0
    if not conv_science:  # tmask is our grown copy: mark the band where the convolution is partial
        edge_bit = np.int32(matched_exp.mask_bit("EDGE"))
        for sl in ((slice(None, kh),), (slice(-kh, None),), (slice(None), slice(None, kh)),
                   (slice(None), slice(-kh, None))):
            matched_exp.mask[sl] |= edge_bit
    return DiffimResult(difference=difference, matched_template=matched_exp, score=None, metadata=meta)


def _zogy(science, template, sci_img, sci_var, sci_ignore, tpl_img, tpl_var, tpl_ignore, covered,
          cfg: DiffimConfig, meta: dict) -> DiffimResult:
    from scipy.fft import irfft2, next_fast_len, rfft2

    t0 = time.perf_counter()
    shape = sci_img.shape
    ny, nx = shape
    x0, y0, _ = _frame(shape)
    pn = np.asarray(science.psf.evaluate(x0, y0), float)
    pr = np.asarray(template.psf.evaluate(x0, y0), float)
    fwhm_n = _psf_widths(pn)[0]
    fwhm_r = _psf_widths(pr)[0]
    meta.update(science_fwhm=fwhm_n, template_fwhm=fwhm_r, convolved="none", decorrelated=False)
    f_n, f_r = meta["variance_scale_science"], meta["variance_scale_template"]
    sn2 = _mean_variance(sci_var, sci_ignore) * f_n
    sr2 = _mean_variance(tpl_var, tpl_ignore) * f_r
    meta.update(science_variance_mean=sn2, template_variance_mean=sr2)
    c = math.sqrt(sn2 + sr2)
    half = max(pn.shape[0], pr.shape[0]) // 2

    # Kernels on a small grid (real-space, for the variance planes and the PSF of D).
    G = next_fast_len(4 * (2 * half + 1), real=True)

    def spectra(shape2, real=True):
        f = rfft2 if real else np.fft.fft2
        pn_hat = f(_pad_centered(pn, shape2))
        pr_hat = f(_pad_centered(pr, shape2))
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
    ksn = np.real(np.fft.ifft2(kn_hat_g * np.conj(pd_hat_g)))
    ksr = np.real(np.fft.ifft2(kr_hat_g * np.conj(pd_hat_g)))

    # Full-image products.
    pad = G // 2 + 1
    shape_fft = (next_fast_len(ny + pad, real=True), next_fast_len(nx + pad, real=True))
    pn_hat, pr_hat, den = spectra(shape_fft)
    kn_hat = c * pr_hat / den
    kr_hat = c * pn_hat / den
    pd_hat = c * pr_hat * pn_hat / den
    n_hat = rfft2(sci_img.astype(float), s=shape_fft, workers=FFT_WORKERS)
    r_hat = rfft2(tpl_img.astype(float), s=shape_fft, workers=FFT_WORKERS)
    rk_hat = kr_hat * r_hat
    d_hat = kn_hat * n_hat - rk_hat
    diff = irfft2(d_hat, s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
    matched = irfft2(rk_hat, s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
    score = irfft2(d_hat * np.conj(pd_hat), s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]

    odd = G if G % 2 else G - 1

    def sq_hat(k):
        return rfft2(_pad_centered(_crop_centered(k, odd) ** 2, shape_fft), workers=FFT_WORKERS)

    vn_hat = rfft2(sci_var.astype(float), s=shape_fft, workers=FFT_WORKERS)
    vn_hat *= f_n
    vr_hat = rfft2(np.where(covered, tpl_var, 0).astype(float), s=shape_fft, workers=FFT_WORKERS)
    vr_hat *= f_r
    var_d = irfft2(vn_hat * sq_hat(kn) + vr_hat * sq_hat(kr), s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
    var_s = irfft2(vn_hat * sq_hat(ksn) + vr_hat * sq_hat(ksr), s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
    var_m = irfft2(vr_hat * sq_hat(kr), s=shape_fft, workers=FFT_WORKERS)[:ny, :nx]
    floor = 1e-6 * c * c
    s_corr = score / np.sqrt(np.maximum(var_s, floor * float((pd ** 2).sum())))

    grow = int(math.ceil(2 * max(fwhm_n, fwhm_r)))
    mask, planes, no_data = _assemble_mask(science, template, grow, grow, covered,
                                           meta["template_coverage"] == 1.0, grow)
    diff = diff.astype(np.float32)
    s_corr = s_corr.astype(np.float32)
    if no_data is not None:
        diff[no_data] = 0
        s_corr[no_data] = 0
    ps = max(pn.shape[0], pr.shape[0])
    pd_stamp = _crop_centered(pd, ps)
    psf_d = PsfModel(components=(pd_stamp / pd_stamp.sum())[None].astype(np.float32), spatial_order=0,
                     x0=x0, y0=y0, scale=_frame(shape)[2])
    psf_d.fwhm_pixels = float(_psf_widths(pd_stamp)[0])
    difference = replace(science, image=diff, mask=mask, variance=np.maximum(var_d, floor).astype(np.float32),
                         psf=psf_d, mask_planes=planes, metadata=dict(science.metadata))
    tmask = _grow_bits(np.asarray(template.mask, np.int32), grow)
    matched_exp = replace(template, image=matched.astype(np.float32), mask=tmask,
                          variance=np.maximum(var_m, 0).astype(np.float32), psf=psf_d,
                          mask_planes=dict(template.mask_planes), metadata=dict(template.metadata))
    matched_exp.image[~covered] = 0
    meta.update(zogy_flux_scale=c, zogy_psf_fwhm=psf_d.fwhm_pixels, time_zogy_s=time.perf_counter() - t0)
    return DiffimResult(difference=difference, matched_template=matched_exp, score=s_corr, metadata=meta)
