"""DIA source detection and measurement on a difference image (Rubin detectAndMeasure).

What ``detect_dia_sources`` does (ALGORITHMS.md section 3, "Detection and measurement",
"Filter", "Standardize"; Rubin ``ip_diffim`` ``detectAndMeasure.py``,
``ap_association`` ``filterDiaSourceCatalog.py`` and ``DiaSource.yaml``):

1. **Detection.** The difference image is smoothed with a Gaussian of the difference PSF's
   FWHM (``detection.smooth_for_detection``: a PSF-matched filter, BAD/NO_DATA pixels count
   as zero) and divided by the noise of the smoothed image computed from the variance plane
   (Rubin ``thresholdType='pixel_stdev'``). Pixels at or above ``+threshold`` form positive
   footprints, pixels at or below ``-threshold`` negative ones (Rubin ``thresholdPolarity=
   'both'``, 5 sigma). Every footprint is grown by ``grow_footprint`` pixels (a disc) and
   footprints that then touch are merged into one source (no deblending), as Rubin merges
   its positive and negative FootprintSets.
2. **Centroid.** The peak of the matched-filtered image of the dominant lobe (the sign
   with the larger peak significance), refined to sub-pixel precision with a parabola
   through the logarithm of the 3x3 neighbourhood (exact for a Gaussian profile). For a
   point source in white noise the matched-filter maximum is the maximum-likelihood
   position; its error is ``sqrt(sum P^2) / (snr * sqrt(sum (dP/dx)^2))`` per axis, the
   Cramer-Rao bound for the PSF ``P`` (= ``sqrt(2) sigma / snr`` for a Gaussian).
   ``isNegative`` = only a negative lobe.
3. **Dipoles.** A source with both lobes is fitted with a positive and a negative PSF at
   free positions (each within ``dipole_max_separation`` PSF sigmas of its detection peak)
   and free (or, optionally, equal) non-negative amplitudes, by non-linear least squares on
   the difference pixels of the footprint's bounding box; as in Rubin's DipoleFit the
   science image (positive lobe) and the PSF-matched template (negative lobe), each with a
   linear background pre-fitted outside the footprint, enter with relative weight
   ``dipole_rel_weight`` (0.5) to break the flux-separation degeneracy of close lobes.
   ``isDipole`` (Rubin's classification): the fit succeeded, the lobes' quadrature S/N
   exceeds ``dipole_min_sn`` (5 sqrt(2)), neither lobe carries more than
   ``dipole_max_flux_ratio`` (0.65) of the total absolute flux, and the separation is at
   most ``dipole_max_separation`` PSF sigmas. The position of a dipole is the midpoint of
   its lobes.
4. **Measurement** (vectorised): PSF flux on the difference image (``psf.psf_flux``,
   Rubin PsfFlux), 12-px aperture flux (sep), forced PSF fluxes on the science image
   (``scienceFlux``) and on the PSF-matched template (``templateFlux``), adaptive
   (Gaussian-weighted, SdssShape-like) second moments of the source and of the PSF model,
   converted to arcsec^2 with the local pixel scale; pixel flags from the difference mask
   (footprint: any footprint pixel; ``Center``: the 3x3 pixels around the centroid).
   PSF fluxes (difference, science, template) are multiplied by the science image's
   aperture correction at the source (calexp header ``APCORR*``, 12-px aperture over PSF
   flux of its stars), as Rubin's detectAndMeasure does with doApCorr: the calexp's nJy
   scale is set on aperture-corrected fluxes, so without it a PSF flux is off by the
   correction (0.98-1.00 on the simulated nights, which biased the flux pulls by +0.2).
5. **Drop and filter** (configurable): Rubin detectAndMeasure drops sources off the image,
   with all 3x3 centre pixels INTRP, or with BAD/EDGE/NO_DATA/SAT/SAT_TEMPLATE/SPIKE pixels
   in the centre; filterDiaSourceCatalog drops centroid failures, CR centres, sources with
   all centre pixels HIGH_VARIANCE, and science-image S/N below -2.
6. **Standardize**: positions from the difference WCS, errors through the local WCS
   Jacobian; fluxes in nJy; IDs from ``ids.dia_source_ids`` in (y, x) order; the table is
   ``schema.conform(..., 'DiaSource')``.

Not computed (null): ``extendedness`` (the moment-based size test is not reliable on
difference images at low S/N and on dipoles; Rubin derives it from a model-flux ratio we do
not have), ``psfLnL``, trail columns (no trailed-source fit yet), ``reliability``,
``glint_trail``. ``diaObjectId``/``ssObjectId`` are filled by association.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from apsnake.detection import smooth_for_detection
from apsnake.errors import ApsnakeError
from apsnake.exposure import Exposure, PsfModel
from apsnake.ids import dia_source_ids
from apsnake.psf import GAUSSIAN_SIGMA_TO_FWHM, measure_fwhm, psf_flux
from apsnake.schema import conform

log = logging.getLogger(__name__)


class DiaError(ApsnakeError, ValueError):
    """Inputs that do not allow DIA source detection (missing PSF or WCS, shape mismatch...)."""


@dataclass
class DiaConfig:
    """Options of ``detect_dia_sources`` (Rubin default in brackets where Rubin has one).

    Attributes
    ----------
    threshold : float
        Detection threshold in sigma of the PSF-filtered difference image, applied to both
        signs [5].
    grow_footprint : int
        Footprints are grown by this many pixels before positive and negative ones are
        merged [2].
    min_area : int
        Smallest raw footprint kept, pixels [minPixels=1].
    aperture_radius : float
        Radius of the aperture flux, pixels [12].
    detection_bad_planes : tuple of str
        Mask planes treated as no signal in detection [NO_DATA pixels are set to 0].
    measure_bad_planes : tuple of str
        Mask planes left out of the PSF, aperture and dipole fits.
    dipole_max_separation : float
        Largest lobe distance from its detection peak in the fit, and largest lobe
        separation of a dipole, in units of the PSF Gaussian sigma [maxSeparation=5].
    dipole_rel_weight : float
        Weight of the science and template pixels relative to the difference pixels in
        the dipole fit; 0 fits the difference image alone [relWeight=0.5].
    dipole_separate_fluxes : bool
        Fit the two lobes with independent amplitudes (Rubin's default is equal amplitudes,
        fitSeparateNegParams=False, with which the flux-ratio test never fails; we fit them
        separately so that it means something).
    dipole_min_sn : float
        Minimum quadrature S/N of the two lobes for ``isDipole`` [minSn=5 sqrt(2)].
    dipole_max_flux_ratio : float
        Maximum fraction of the total absolute flux in either lobe for ``isDipole``
        [maxFluxRatio=0.65].
    dipole_max_footprint_area : int
        Footprints larger than this (pixels) are not fitted as dipoles.
    moments_half_size : int
        Half side of the stamp for the adaptive moments, pixels.
    drop_flagged : bool
        Apply Rubin detectAndMeasure's drop rules (``drop_offimage``, ``drop_center_any``,
        ``drop_center_all``).
    drop_offimage : bool
        Drop sources whose centroid is off the image.
    drop_center_any : tuple of str
        Drop sources with any of these planes in the 3x3 centre pixels.
    drop_center_all : tuple of str
        Drop sources with all 3x3 centre pixels in one of these planes.
    template_flux_error : float
        Fraction of the template's PSF flux at the source (``templateFlux``) added in
        quadrature to ``psfFluxErr`` (not in Rubin): PSF matching leaves about 1% of a star's
        template flux in the difference, coherently over the PSF, which the per-pixel
        ``diffim.model_error`` variance term covers only at about a fifth of that; without
        it the flux pulls of variable stars brighter than g ~ 18 have a scatter of ~1.8.
        0 disables.
    apply_filter : bool
        Apply Rubin filterDiaSourceCatalog's rules (``filter_*``).
    filter_centroid_flag : bool
        Drop sources whose centroid failed.
    filter_center_any : tuple of str
        Drop sources with these planes in the centre [crCenter].
    filter_center_all : tuple of str
        Drop sources with all centre pixels in these planes [high_varianceCenterAll].
    filter_min_science_snr : float or None
        Drop sources with scienceFlux / scienceFluxErr below this [minAllowedDirectSnr=-2];
        None disables.
    """

    threshold: float = 5.0
    grow_footprint: int = 2
    min_area: int = 1
    aperture_radius: float = 12.0
    detection_bad_planes: tuple = ("BAD", "NO_DATA")
    measure_bad_planes: tuple = ("BAD", "NO_DATA")
    dipole_max_separation: float = 5.0
    dipole_rel_weight: float = 0.5
    dipole_separate_fluxes: bool = True
    dipole_min_sn: float = 5.0 * math.sqrt(2.0)
    dipole_max_flux_ratio: float = 0.65
    dipole_max_footprint_area: int = 10_000
    moments_half_size: int = 12
    drop_flagged: bool = True
    drop_offimage: bool = True
    drop_center_any: tuple = ("BAD", "EDGE", "NO_DATA", "SAT", "SAT_TEMPLATE", "SPIKE")
    drop_center_all: tuple = ("INTRP",)
    template_flux_error: float = 0.01
    apply_filter: bool = True
    filter_centroid_flag: bool = True
    filter_center_any: tuple = ("CR",)
    filter_center_all: tuple = ("HIGH_VARIANCE",)
    filter_min_science_snr: float | None = -2.0

    def __post_init__(self):
        if not self.threshold > 0:
            raise DiaError(f"threshold must be > 0, got {self.threshold}")
        if self.grow_footprint < 0 or self.min_area < 1:
            raise DiaError(f"need grow_footprint >= 0 and min_area >= 1, got {self.grow_footprint}, {self.min_area}")
        if not 0 <= self.template_flux_error < 1:
            raise DiaError(f"template_flux_error must be in [0, 1), got {self.template_flux_error}")
        if not self.aperture_radius > 0:
            raise DiaError(f"aperture_radius must be > 0, got {self.aperture_radius}")


def config_from_options(options: dict | None) -> DiaConfig:
    """A ``DiaConfig`` from the workflow configuration's ``dia`` section.

    Keys are ``DiaConfig`` field names; missing keys keep their defaults, lists become tuples.

    Raises
    ------
    DiaError
        For a key that is not a ``DiaConfig`` field.
    """
    from apsnake.options import dataclass_from_options

    return dataclass_from_options(DiaConfig, options, "dia", DiaError)


# Pixel flags of the DiaSource schema: column suffix -> mask plane (footprint and Center).
_FLAG_PLANES = {
    "bad": "BAD", "cr": "CR", "edge": "EDGE", "nodata": "NO_DATA", "interpolated": "INTRP",
    "saturated": "SAT", "suspect": "SUSPECT", "streak": "STREAK", "injected": "INJECTED",
    "injected_template": "INJECTED_TEMPLATE",
}
_CENTER_FLAGS = ("cr", "nodata", "interpolated", "saturated", "suspect", "streak", "injected", "injected_template")
_OPTIONAL_PLANES = ("STREAK", "INJECTED", "INJECTED_TEMPLATE")  # null flags when the plane does not exist
_OFFSETS_3X3 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


# ---------------------------------------------------------------------------
# Small helpers.
def njy_per_unit(exposure: Exposure, what: str) -> float:
    """Factor from the exposure's image unit to nJy."""
    if exposure.photo_calib is not None and np.isfinite(exposure.photo_calib.calibration):
        return float(exposure.photo_calib.calibration)
    if exposure.unit.lower() == "njy":
        return 1.0
    raise DiaError(f"{what} of data ID {exposure.data_id}: image unit {exposure.unit!r} and no PhotoCalib, "
                   "cannot express fluxes in nJy")


def aperture_correction_at(science: Exposure | None, x, y) -> np.ndarray:
    """The science image's aperture correction (large-aperture / PSF flux of its stars) at
    pixel positions (x, y); 1 where the calexp has none (older files, or no science image)."""
    from apsnake.photometry import ApertureCorrection

    correction = ApertureCorrection.from_metadata(science.metadata) if science is not None else None
    if correction is None:
        return np.ones(np.shape(x))
    return np.asarray(correction(x, y), float)


def bad_pixels(exposure: Exposure, planes) -> np.ndarray:
    """Masked planes, non-finite values or non-positive variance."""
    return (exposure.mask_of(*planes) | ~np.isfinite(exposure.image) | ~(exposure.variance > 0))


def _psf_sigma(psf: PsfModel, x: float, y: float) -> float:
    """Gaussian-equivalent sigma (pixels) of the PSF at (x, y), from its FWHM."""
    fwhm = measure_fwhm(psf.evaluate(x, y))
    if not np.isfinite(fwhm) or fwhm <= 0:
        fwhm = psf.fwhm_pixels
    if not np.isfinite(fwhm) or fwhm <= 0:
        raise DiaError("cannot measure the FWHM of the difference-image PSF")
    return float(fwhm) / GAUSSIAN_SIGMA_TO_FWHM


def _disc(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate ``mask`` by a disc of ``radius`` pixels, working in small boxes around its components."""
    from scipy import ndimage

    if radius <= 0 or not mask.any():
        return mask.copy()
    struct = _disc(radius)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n > 5000:
        return ndimage.binary_dilation(mask, structure=struct)
    ny, nx = mask.shape
    out = mask.copy()
    for k, (sy, sx) in enumerate(ndimage.find_objects(labels), start=1):
        y0, y1 = max(sy.start - radius, 0), min(sy.stop + radius, ny)
        x0, x1 = max(sx.start - radius, 0), min(sx.stop + radius, nx)
        out[y0:y1, x0:x1] |= ndimage.binary_dilation(labels[y0:y1, x0:x1] == k, structure=struct)
    return out


def _group_argmax(groups: np.ndarray, values: np.ndarray, n_groups: int, valid: np.ndarray) -> np.ndarray:
    """Per group 1..n_groups, the index (into ``values``) of the largest valid value; -1 if none."""
    sel = np.flatnonzero(valid)
    out = np.full(n_groups + 1, -1, np.int64)
    if sel.size:
        order = sel[np.lexsort((values[sel], groups[sel]))]
        g = groups[order]
        last = np.r_[g[1:] != g[:-1], True]
        out[g[last]] = order[last]
    return out[1:]


def _cutouts(array: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int, fill=0):
    """(N, 2h+1, 2h+1) cutouts centred on integer pixels, and which pixels are on the image."""
    ny, nx = array.shape
    off = np.arange(-half, half + 1)
    rows, cols = iy[:, None] + off, ix[:, None] + off
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    cut = array[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
    return np.where(inside, cut, fill), inside


def _subpixel_peak(image: np.ndarray, ix: np.ndarray, iy: np.ndarray):
    """Sub-pixel maximum of ``image`` near integer peaks: a parabola through the log of the
    peak and its two neighbours along each axis (linear values if any is not positive).

    Returns x, y and a failure flag (peak on the border, or an offset beyond 1 pixel).
    """
    ny, nx = image.shape
    ok = (ix > 0) & (ix < nx - 1) & (iy > 0) & (iy < ny - 1)
    cx, cy = np.clip(ix, 1, nx - 2), np.clip(iy, 1, ny - 2)

    def offset(m, c, p):
        with np.errstate(divide="ignore", invalid="ignore"):
            positive = (m > 0) & (c > 0) & (p > 0)
            a_m, a_c, a_p = (np.where(positive, np.log(np.where(positive, v, 1.0)), v) for v in (m, c, p))
            den = a_m - 2 * a_c + a_p
            return np.where(den < 0, 0.5 * (a_m - a_p) / np.where(den < 0, den, -1.0), np.nan)

    c = image[cy, cx].astype(float)
    dx = offset(image[cy, cx - 1].astype(float), c, image[cy, cx + 1].astype(float))
    dy = offset(image[cy - 1, cx].astype(float), c, image[cy + 1, cx].astype(float))
    good = ok & np.isfinite(dx) & np.isfinite(dy) & (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
    x = np.where(good, ix + np.where(good, dx, 0), ix).astype(float)
    y = np.where(good, iy + np.where(good, dy, 0), iy).astype(float)
    return x, y, ~good


def _centroid_errors(psf: PsfModel, x, y, snr):
    """Cramer-Rao position errors (pixels) of a PSF-fit centroid at significance ``snr``."""
    if len(x) == 0:
        return np.empty(0), np.empty(0)
    stamps = psf.evaluate_many(x, y)
    gy, gx = np.gradient(stamps, axis=(1, 2))
    p2 = (stamps ** 2).sum(axis=(1, 2))
    s = np.maximum(np.abs(snr), 1e-3)
    return (np.sqrt(p2 / np.maximum((gx ** 2).sum(axis=(1, 2)), 1e-30)) / s,
            np.sqrt(p2 / np.maximum((gy ** 2).sum(axis=(1, 2)), 1e-30)) / s)


def _adaptive_moments(stamps, valid, fx, fy, sigma0, n_iter=40, tol=1e-5):
    """Adaptive (Gaussian-weighted, elliptical) second moments of (N, n, n) stamps.

    The weight is a Gaussian centred on (fx, fy) (offsets from the central pixel) whose
    covariance is iterated to twice the weighted moments, so that it converges on the
    covariance of a Gaussian source (SdssShape's fixed point). Returns mxx, myy, mxy
    (pixels^2) and ``ok`` (converged, positive definite, not larger than the stamp).
    """
    n_src, n, _ = stamps.shape
    if n_src == 0:
        e = np.empty(0)
        return e, e, e, np.empty(0, bool)
    grid = np.arange(n) - n // 2
    ex = grid[None, None, :] - fx[:, None, None]
    ey = grid[None, :, None] - fy[:, None, None]
    data = np.where(valid, stamps, 0.0)
    mxx = np.full(n_src, sigma0 ** 2)
    myy = mxx.copy()
    mxy = np.zeros(n_src)
    ok = np.ones(n_src, bool)
    converged = np.zeros(n_src, bool)
    limit = (n / 2.0) ** 2
    for _ in range(n_iter):
        det = mxx * myy - mxy ** 2
        good_det = det > 0
        ok &= good_det
        safe = np.where(good_det, det, 1.0)
        ixx, iyy, ixy = myy / safe, mxx / safe, -mxy / safe
        w = np.exp(-0.5 * np.clip(ixx[:, None, None] * ex ** 2 + 2 * ixy[:, None, None] * ex * ey
                                  + iyy[:, None, None] * ey ** 2, 0, 200))
        wi = w * data
        s0 = wi.sum(axis=(1, 2))
        ok &= s0 > 0
        s0 = np.where(s0 > 0, s0, 1.0)
        qxx = (wi * ex ** 2).sum(axis=(1, 2)) / s0
        qyy = (wi * ey ** 2).sum(axis=(1, 2)) / s0
        qxy = (wi * ex * ey).sum(axis=(1, 2)) / s0
        nxx, nyy, nxy = 2 * qxx, 2 * qyy, 2 * qxy
        pd = (nxx > 0) & (nyy > 0) & (nxx * nyy - nxy ** 2 > 0) & (nxx < limit) & (nyy < limit)
        ok &= pd
        change = np.abs(nxx - mxx) + np.abs(nyy - myy) + 2 * np.abs(nxy - mxy)
        upd = ok & ~converged
        mxx, myy, mxy = np.where(upd, nxx, mxx), np.where(upd, nyy, myy), np.where(upd, nxy, mxy)
        converged |= ok & (change < tol * (nxx + nyy))
        if (converged | ~ok).all():
            break
    ok &= converged
    return mxx, myy, mxy, ok


def _local_jacobian(wcs, x, y):
    """Sky coordinates and the local Jacobian d(xi, eta)/d(x, y) in deg/pixel, where
    xi = RA cos(Dec) (east) and eta = Dec (north)."""
    h = 0.5
    xs = np.concatenate([x, x + h, x - h, x, x])
    ys = np.concatenate([y, y, y, y + h, y - h])
    ra_all, dec_all = wcs.all_pix2world(xs, ys, 0)
    n = len(x)
    ra, dec = ra_all[:n], dec_all[:n]
    ra_all = ra_all.reshape(5, n)
    dec_all = dec_all.reshape(5, n)
    cosd = np.cos(np.radians(dec))

    def dra(a, b):
        return ((a - b + 180.0) % 360.0) - 180.0

    j = np.empty((n, 2, 2))
    j[:, 0, 0] = dra(ra_all[1], ra_all[2]) * cosd / (2 * h)
    j[:, 1, 0] = (dec_all[1] - dec_all[2]) / (2 * h)
    j[:, 0, 1] = dra(ra_all[3], ra_all[4]) * cosd / (2 * h)
    j[:, 1, 1] = (dec_all[3] - dec_all[4]) / (2 * h)
    return np.mod(ra, 360.0), dec, j


# ---------------------------------------------------------------------------
# Dipole fit.
class _ShiftedPsf:
    """A PSF stamp that can be placed at any sub-pixel position on a pixel grid (bicubic
    spline of the stamp, zero outside it)."""

    def __init__(self, stamp: np.ndarray):
        from scipy.interpolate import RectBivariateSpline

        stamp = np.asarray(stamp, float)
        n = stamp.shape[0]
        self.half = n // 2
        pad = 3
        padded = np.pad(stamp / stamp.sum(), pad)
        r = np.arange(-self.half - pad, self.half + pad + 1, dtype=float)
        self.spline = RectBivariateSpline(r, r, padded, kx=3, ky=3)
        self.limit = self.half + pad

    def image(self, cols: np.ndarray, rows: np.ndarray, x0: float, y0: float) -> np.ndarray:
        """The PSF centred at (x0, y0) on the grid ``rows x cols`` (pixel centres)."""
        u = np.clip(cols - x0, -self.limit, self.limit)
        v = np.clip(rows - y0, -self.limit, self.limit)
        img = self.spline(v, u, grid=True)
        img[np.abs(rows - y0) > self.half + 0.5, :] = 0.0
        img[:, np.abs(cols - x0) > self.half + 0.5] = 0.0
        return img


def _plane_background(image, ok, outside, cols, rows):
    """Linear background fitted (least squares) to ``image`` where ``ok & outside``; zeros if
    too few pixels."""
    use = ok & outside
    if use.sum() < 6:
        return np.zeros(image.shape)
    yy, xx = np.meshgrid(rows - rows.mean(), cols - cols.mean(), indexing="ij")
    a = np.stack([np.ones(use.sum()), xx[use], yy[use]], axis=1)
    coef, *_ = np.linalg.lstsq(a, image[use], rcond=None)
    return coef[0] + coef[1] * xx + coef[2] * yy


def _fit_dipole(box, fp_box, diff, sci, tmpl, psfs, pos0, neg0, sigma, cfg: DiaConfig):
    """Fit a positive and a negative PSF to one footprint.

    ``box`` = (y0, y1, x0, x1); ``diff``/``sci``/``tmpl`` = (image, variance, ok) full arrays
    or None; ``psfs`` = (difference, science, template) ``_ShiftedPsf``; ``pos0``/``neg0``
    = initial (x, y) of the lobes. Returns a dict or None when the fit fails.
    """
    from scipy.optimize import least_squares

    y0, y1, x0, x1 = box
    rows = np.arange(y0, y1, dtype=float)
    cols = np.arange(x0, x1, dtype=float)
    outside = ~fp_box
    blocks = []  # (data, 1/sigma, ok, kind)
    d_img, d_var, d_ok = (a[y0:y1, x0:x1] for a in diff)
    blocks.append((np.where(d_ok, d_img, 0.0), np.where(d_ok, 1 / np.sqrt(np.where(d_ok, d_var, 1)), 0.0), d_ok, "d"))
    w = math.sqrt(cfg.dipole_rel_weight) if cfg.dipole_rel_weight > 0 else 0.0
    for kind, ex in (("s", sci), ("t", tmpl)):
        if ex is None or w == 0:
            continue
        img, var, ok = (a[y0:y1, x0:x1] for a in ex)
        img = np.where(ok, img, 0.0).astype(float)
        img = img - _plane_background(img, ok, outside, cols, rows)
        blocks.append((img, w * np.where(ok, 1 / np.sqrt(np.where(ok, var, 1)), 0.0), ok, kind))
    n_data = int(sum(b[2].sum() for b in blocks))
    if blocks[0][2].sum() < 6:
        return None
    psf_d, psf_s, psf_t = psfs
    sep_max = cfg.dipole_max_separation * sigma

    def unpack(p):
        if cfg.dipole_separate_fluxes:
            return p[0], p[1], p[2], p[3], p[4], p[5]
        return p[0], p[0], p[1], p[2], p[3], p[4]

    def model_blocks(p):
        fp, fn, xp, yp, xn, yn = unpack(p)
        out = []
        for _, _, _, kind in blocks:
            if kind == "d":
                out.append(fp * psf_d.image(cols, rows, xp, yp) - fn * psf_d.image(cols, rows, xn, yn))
            elif kind == "s":
                out.append(fp * psf_s.image(cols, rows, xp, yp))
            else:
                out.append(fn * psf_t.image(cols, rows, xn, yn))
        return out

    def residuals(p):
        res = []
        for (data, inv_sigma, ok, _), model in zip(blocks, model_blocks(p)):
            res.append(((data - model) * inv_sigma)[ok])
        return np.concatenate(res)

    # Initial amplitudes: PSF-weighted sums of the pre-subtraction (or difference) images.
    def lobe_amplitude(kind, sign, x, y):
        for data, inv_sigma, ok, k in blocks:
            if k == kind:
                p = (psf_d if kind == "d" else psf_s if kind == "s" else psf_t).image(cols, rows, x, y)
                p = np.where(ok, p, 0.0)
                den = (p * p).sum()
                return sign * (p * data).sum() / den if den > 0 else 0.0
        return 0.0

    fp0 = max(lobe_amplitude("s", 1, *pos0), lobe_amplitude("d", 1, *pos0), 1e-3)
    fn0 = max(lobe_amplitude("t", 1, *neg0), lobe_amplitude("d", -1, *neg0), 1e-3)
    lo_pos = [pos0[0] - sep_max, pos0[1] - sep_max, neg0[0] - sep_max, neg0[1] - sep_max]
    hi_pos = [pos0[0] + sep_max, pos0[1] + sep_max, neg0[0] + sep_max, neg0[1] + sep_max]
    lo_pos = [max(v, lim) for v, lim in zip(lo_pos, (x0 - 0.5, y0 - 0.5, x0 - 0.5, y0 - 0.5))]
    hi_pos = [min(v, lim) for v, lim in zip(hi_pos, (x1 - 0.5, y1 - 0.5, x1 - 0.5, y1 - 0.5))]
    start_pos = [pos0[0], pos0[1], neg0[0], neg0[1]]
    if cfg.dipole_separate_fluxes:
        p0 = [fp0, fn0] + start_pos
        lo, hi = [0.0, 0.0] + lo_pos, [np.inf, np.inf] + hi_pos
    else:
        p0 = [0.5 * (fp0 + fn0)] + start_pos
        lo, hi = [0.0] + lo_pos, [np.inf] + hi_pos
    p0 = np.clip(p0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
    scale = np.array([max(abs(v), 1.0) for v in p0[:len(p0) - 4]] + [1.0] * 4)
    try:
        fit = least_squares(residuals, p0, bounds=(lo, hi), x_scale=scale, method="trf", xtol=1e-8,
                            ftol=1e-8, max_nfev=400)
    except (ValueError, np.linalg.LinAlgError) as err:
        log.debug("dipole fit failed: %s", err)
        return None
    if not fit.success or not np.all(np.isfinite(fit.x)):
        return None
    jac = fit.jac
    try:
        cov = np.linalg.pinv(jac.T @ jac)
    except np.linalg.LinAlgError:
        return None
    fp, fn, xp, yp, xn, yn = unpack(fit.x)
    if cfg.dipole_separate_fluxes:
        vfp, vfn, cpn = cov[0, 0], cov[1, 1], cov[0, 1]
        ipos = 2
    else:
        vfp = vfn = cpn = cov[0, 0]
        ipos = 1
    c = cov[ipos:ipos + 4, ipos:ipos + 4]  # xp, yp, xn, yn
    # Midpoint and its variance.
    vx_mid = 0.25 * (c[0, 0] + c[2, 2] + 2 * c[0, 2])
    vy_mid = 0.25 * (c[1, 1] + c[3, 3] + 2 * c[1, 3])
    chi2 = float((fit.fun ** 2).sum())
    return {
        "fp": fp, "fn": fn, "xp": xp, "yp": yp, "xn": xn, "yn": yn,
        "fp_err": math.sqrt(max(vfp, 0.0)), "fn_err": math.sqrt(max(vfn, 0.0)),
        "mean_err": 0.5 * math.sqrt(max(vfp + vfn + 2 * cpn, 0.0)),
        "diff_err": math.sqrt(max(vfp + vfn - 2 * cpn, 0.0)),
        "x_err": math.sqrt(max(vx_mid, 0.0)), "y_err": math.sqrt(max(vy_mid, 0.0)),
        "chi2": chi2, "ndata": n_data,
    }


# ---------------------------------------------------------------------------
def detect_dia_sources(difference: Exposure, science: Exposure | None, matched_template: Exposure | None,
                       config: DiaConfig | None = None, time_processed_mjd: float | None = None):
    """Detect and measure DIA sources on a difference image.

    Parameters
    ----------
    difference : Exposure
        The difference image (science minus PSF-matched template), background-free, in nJy
        (or with a PhotoCalib), with variance, mask (science planes and ``*_TEMPLATE``
        planes), PSF model and WCS; ``visit_info`` and ``detector`` give the data ID.
    science : Exposure or None
        The science calexp on the same pixel grid (for ``scienceFlux`` and the dipole fit);
        None leaves scienceFlux null.
    matched_template : Exposure or None
        The PSF-matched template on the same grid (for ``templateFlux`` and the dipole fit);
        its PSF, or the science PSF if it has none; None leaves templateFlux null.
    config : DiaConfig, optional
    time_processed_mjd : float, optional
        ``timeProcessedMjdTai`` (MJD, TAI); default now.

    Returns
    -------
    pyarrow.Table
        One row per DIA source, ``schema.conform(..., 'DiaSource')``: positions in degrees,
        fluxes in nJy, pixel coordinates 0-based, moments in arcsec^2; ``diaObjectId`` and
        ``ssObjectId`` null; rows ordered by ``diaSourceId``, which numbers the sources in
        (y, x) order.

    Raises
    ------
    DiaError
        Missing PSF or WCS on the difference image, unknown mid-exposure time, images of
        different shapes, or a unit that cannot be converted to nJy.
    """
    import time as _time

    cfg = config or DiaConfig()
    t_start = _time.perf_counter()
    _check_inputs(difference, science, matched_template)
    image = np.asarray(difference.image)
    variance = np.asarray(difference.variance)
    ny, nx = image.shape
    calib_d = njy_per_unit(difference, "difference image")
    psf_d = difference.psf
    sigma = _psf_sigma(psf_d, (nx - 1) / 2.0, (ny - 1) / 2.0)

    # 1. Detection: matched filter, both signs, grow and merge.
    bad_det = bad_pixels(difference, cfg.detection_bad_planes)
    smooth, noise = smooth_for_detection(image, variance, bad_det, sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        signif = np.where((noise > 0) & np.isfinite(noise), smooth / noise, 0.0).astype(np.float32)
    pos = signif >= cfg.threshold
    neg = signif <= -cfg.threshold
    if cfg.min_area > 1:
        pos, neg = _remove_small(pos, cfg.min_area), _remove_small(neg, cfg.min_area)
    from scipy import ndimage

    grown = _grow(pos | neg, cfg.grow_footprint)
    labels, n = ndimage.label(grown, structure=np.ones((3, 3), bool))
    log.info("data ID %s: %d footprints at +/-%.1f sigma (PSF sigma %.2f px)", difference.data_id, n,
             cfg.threshold, sigma)
    fp_idx = np.flatnonzero(labels)
    fp_lab = labels.ravel()[fp_idx]
    fp_sig = signif.ravel()[fp_idx]
    i_pos = _group_argmax(fp_lab, fp_sig, n, pos.ravel()[fp_idx])
    i_neg = _group_argmax(fp_lab, -fp_sig, n, neg.ravel()[fp_idx])
    has_pos, has_neg = i_pos >= 0, i_neg >= 0
    pos_pix = fp_idx[np.maximum(i_pos, 0)]
    neg_pix = fp_idx[np.maximum(i_neg, 0)]
    pos_peak = np.where(has_pos, signif.ravel()[pos_pix], 0.0)
    neg_peak = np.where(has_neg, -signif.ravel()[neg_pix], 0.0)
    dominant_pos = has_pos & (~has_neg | (pos_peak >= neg_peak))
    snr = np.where(dominant_pos, pos_peak, neg_peak).astype(float)
    is_negative = has_neg & ~has_pos
    sign = np.where(dominant_pos, 1.0, -1.0)

    # 2. Centroids: sub-pixel matched-filter peaks of each lobe.
    xp, yp, _ = _subpixel_peak(smooth, pos_pix % nx, pos_pix // nx)
    xn, yn, _ = _subpixel_peak(-smooth, neg_pix % nx, neg_pix // nx)
    dom_pix = np.where(dominant_pos, pos_pix, neg_pix)
    x, y, centroid_flag = _dominant_peak(smooth, dom_pix, sign, nx)
    x_err, y_err = _centroid_errors(psf_d, x, y, snr)
    slices = ndimage.find_objects(labels) if n else []
    area = np.bincount(fp_lab, minlength=n + 1)[1:]

    # 3. Dipole fits.
    same = tuple(cfg.measure_bad_planes) == tuple(cfg.detection_bad_planes)
    bad_meas_d = bad_det if same else bad_pixels(difference, cfg.measure_bad_planes)
    bad_s = bad_pixels(science, cfg.measure_bad_planes) if science is not None else None
    bad_t = bad_pixels(matched_template, cfg.measure_bad_planes) if matched_template is not None else None
    dip = _dipoles(difference, science, matched_template, cfg, labels, slices, area, has_pos & has_neg,
                   (xp, yp), (xn, yn), sigma, bad_meas_d, bad_s, bad_t)
    use_mid = dip["isDipole"]
    x = np.where(use_mid, dip["x"], x)
    y = np.where(use_mid, dip["y"], y)
    x_err = np.where(use_mid, dip["x_err"], x_err)
    y_err = np.where(use_mid, dip["y_err"], y_err)

    # 4. Measurements.
    cols: dict[str, np.ndarray] = {}
    cols.update(_psf_photometry(difference, bad_meas_d, x, y, calib_d, ""))
    if science is not None:
        forced = _psf_photometry(science, bad_s, x, y, njy_per_unit(science, "science image"), "forced_")
        cols["scienceFlux"], cols["scienceFluxErr"] = forced.pop("forced_psfFlux"), forced.pop("forced_psfFluxErr")
        cols["forced_PsfFlux_flag"] = forced["forced_psfFlux_flag"]
        cols["forced_PsfFlux_flag_edge"] = forced["forced_psfFlux_flag_edge"]
        cols["forced_PsfFlux_flag_noGoodPixels"] = forced["forced_psfFlux_flag_noGoodPixels"]
    if matched_template is not None:
        tmpl = matched_template
        if tmpl.psf is None:  # PSF-matched to the science image: it has the science PSF
            tmpl = replace(tmpl, psf=science.psf if science is not None else psf_d)
        forced = _psf_photometry(tmpl, bad_t, x, y, njy_per_unit(tmpl, "matched template"), "t_")
        cols["templateFlux"], cols["templateFluxErr"] = forced["t_psfFlux"], forced["t_psfFluxErr"]
    apcorr = aperture_correction_at(science, x, y)
    for name in ("psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr", "templateFlux", "templateFluxErr"):
        if name in cols:
            cols[name] = cols[name] * apcorr
    if cfg.template_flux_error > 0 and "templateFlux" in cols:
        matching = cfg.template_flux_error * np.nan_to_num(np.abs(cols["templateFlux"]))
        cols["psfFluxErr"] = np.hypot(cols["psfFluxErr"], matching)
    cols.update(_aperture_photometry(image, variance, bad_meas_d, x, y, cfg.aperture_radius, calib_d))
    flags, drop_any, drop_all = _pixel_flags(difference, labels, fp_idx, fp_lab, n, x, y, cfg)
    cols.update(flags)

    ra, dec, jac = _local_jacobian(difference.wcs, x, y)
    scale_arcsec = np.sqrt(np.abs(jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0])) * 3600.0
    cov_xi = jac[:, 0, 0] ** 2 * x_err ** 2 + jac[:, 0, 1] ** 2 * y_err ** 2
    cov_eta = jac[:, 1, 0] ** 2 * x_err ** 2 + jac[:, 1, 1] ** 2 * y_err ** 2
    cov_xe = jac[:, 0, 0] * jac[:, 1, 0] * x_err ** 2 + jac[:, 0, 1] * jac[:, 1, 1] * y_err ** 2
    cols.update(_shapes(difference, bad_meas_d, x, y, sign, sigma, scale_arcsec, slices, cfg))
    cols.update(_dipole_columns(dip, jac, calib_d))

    bbox_size = np.array([max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in slices], np.int32) \
        if n else np.empty(0, np.int32)

    cols.update({
        "x": x, "y": y, "xErr": x_err, "yErr": y_err, "centroid_flag": centroid_flag,
        "ra": ra, "dec": dec, "raErr": np.sqrt(cov_xi), "decErr": np.sqrt(cov_eta), "ra_dec_Cov": cov_xe,
        "snr": snr, "isNegative": is_negative, "bboxSize": bbox_size,
    })

    # 5. Drop and filter.
    keep = np.ones(n, bool)
    if cfg.drop_flagged:
        if cfg.drop_offimage:
            keep &= ~cols["pixelFlags_offimage"]
        keep &= ~drop_any & ~drop_all
    n_drop = int((~keep).sum())
    if cfg.apply_filter:
        f_any, f_all = _center_planes(difference, x, y, cfg.filter_center_any, cfg.filter_center_all)
        keep_f = ~f_any & ~f_all
        if cfg.filter_centroid_flag:
            keep_f &= ~centroid_flag
        if cfg.filter_min_science_snr is not None and "scienceFlux" in cols:
            with np.errstate(divide="ignore", invalid="ignore"):
                direct = cols["scienceFlux"] / cols["scienceFluxErr"]
            keep_f &= ~(direct < cfg.filter_min_science_snr)
        keep &= keep_f
    log.info("data ID %s: %d sources, %d dropped by the detectAndMeasure flags, %d more by the filter",
             difference.data_id, n, n_drop, n - n_drop - int(keep.sum()))

    # 6. Standardize: order, IDs, data-ID columns.
    order = np.flatnonzero(keep)
    order = order[np.lexsort((cols["x"][order], cols["y"][order]))]
    out = {k: np.asarray(v)[order] for k, v in cols.items()}
    m = len(order)
    vi = difference.visit_info
    if time_processed_mjd is None:
        from astropy.time import Time

        time_processed_mjd = float(Time.now().tai.mjd)
    out.update({
        "diaSourceId": dia_source_ids(vi.visit, difference.detector, m),
        "visit": np.full(m, vi.visit, np.int64),
        "detector": np.full(m, difference.detector, np.int32),
        "midpointMjdTai": np.full(m, vi.mjd_mid_tai),
        "exposureTime": np.full(m, vi.exposure_time if np.isfinite(vi.exposure_time) else np.nan),
        "band": np.array([vi.band or None] * m, dtype=object),
        "timeProcessedMjdTai": np.full(m, float(time_processed_mjd)),
        "pixelFlags": np.zeros(m, bool),
        "shape_flag_parent_source": np.zeros(m, bool),
    })
    table = conform(out, "DiaSource")
    log.info("data ID %s: %d DIA sources (%d dipoles, %d negative) in %.2f s", difference.data_id, m,
             int(out["isDipole"].sum()), int(out["isNegative"].sum()), _time.perf_counter() - t_start)
    return table


# ---------------------------------------------------------------------------
def _check_inputs(difference, science, template):
    if difference.psf is None:
        raise DiaError(f"difference image of data ID {difference.data_id} has no PSF model")
    if difference.wcs is None:
        raise DiaError(f"difference image of data ID {difference.data_id} has no WCS")
    if not np.isfinite(difference.visit_info.mjd_mid_tai):
        raise DiaError(f"difference image of data ID {difference.data_id} has no mid-exposure time (MJD-MID)")
    for what, ex in (("science image", science), ("matched template", template)):
        if ex is not None and ex.image.shape != difference.image.shape:
            raise DiaError(f"data ID {difference.data_id}: {what} shape {ex.image.shape} differs from the "
                           f"difference image's {difference.image.shape}")
    if science is not None and science.psf is None:
        raise DiaError(f"science image of data ID {difference.data_id} has no PSF model")
    if template is not None and template.psf is None and science is None:
        raise DiaError(f"matched template of data ID {difference.data_id} has no PSF model")


def _remove_small(mask, min_area):
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return (sizes >= min_area)[labels]


def _dominant_peak(smooth, pix, sign, nx):
    """Sub-pixel peak of ``sign * smooth`` at the dominant lobe's peak pixel."""
    if len(pix) == 0:
        return np.empty(0), np.empty(0), np.empty(0, bool)
    ix, iy = pix % nx, pix // nx
    xa, ya, fa = _subpixel_peak(smooth, ix, iy)
    xb, yb, fb = _subpixel_peak(-smooth, ix, iy)
    positive = sign > 0
    return np.where(positive, xa, xb), np.where(positive, ya, yb), np.where(positive, fa, fb)


def _psf_photometry(exposure, bad, x, y, calib, prefix):
    """PSF flux (nJy), error, chi2, ndata and flags at (x, y) on one exposure."""
    n = len(x)
    if n == 0:
        e = np.empty(0)
        return {f"{prefix}psfFlux": e, f"{prefix}psfFluxErr": e, f"{prefix}psfChi2": e,
                f"{prefix}psfNdata": np.empty(0, np.int32), f"{prefix}psfFlux_flag": np.empty(0, bool),
                f"{prefix}psfFlux_flag_edge": np.empty(0, bool),
                f"{prefix}psfFlux_flag_noGoodPixels": np.empty(0, bool)}
    flux, err, chi2, ndata = psf_flux(exposure.image, exposure.variance, exposure.psf, x, y, bad)
    ny, nx = exposure.image.shape
    half = exposure.psf.components.shape[-1] // 2
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    edge = (ix - half < 0) | (ix + half > nx - 1) | (iy - half < 0) | (iy + half > ny - 1)
    no_good = ndata == 0
    failed = edge | no_good | ~np.isfinite(flux) | ~np.isfinite(err)
    return {f"{prefix}psfFlux": flux * calib, f"{prefix}psfFluxErr": err * abs(calib), f"{prefix}psfChi2": chi2,
            f"{prefix}psfNdata": ndata.astype(np.int32), f"{prefix}psfFlux_flag": failed,
            f"{prefix}psfFlux_flag_edge": edge, f"{prefix}psfFlux_flag_noGoodPixels": no_good}


def _aperture_photometry(image, variance, bad, x, y, radius, calib):
    """Circular-aperture flux (nJy) with sep; masked pixels excluded and flagged."""
    import sep

    n = len(x)
    if n == 0:
        e = np.empty(0)
        return {"apFlux": e, "apFluxErr": e, "apFlux_flag": np.empty(0, bool),
                "apFlux_flag_apertureTruncated": np.empty(0, bool)}
    ny, nx = image.shape
    # Work in a box around the sources only (sep needs clean arrays; this avoids full-image copies).
    r = int(math.ceil(radius)) + 2
    x0, x1 = max(int(np.floor(x.min())) - r, 0), min(int(np.ceil(x.max())) + r + 1, nx)
    y0, y1 = max(int(np.floor(y.min())) - r, 0), min(int(np.ceil(y.max())) + r + 1, ny)
    if x1 <= x0 or y1 <= y0:
        nan = np.full(n, np.nan)
        return {"apFlux": nan, "apFluxErr": nan, "apFlux_flag": np.ones(n, bool),
                "apFlux_flag_apertureTruncated": np.ones(n, bool)}
    sub_bad = np.ascontiguousarray(bad[y0:y1, x0:x1])
    data = np.ascontiguousarray(np.where(sub_bad, 0.0, image[y0:y1, x0:x1]), np.float64)
    err = np.ascontiguousarray(np.sqrt(np.where(sub_bad, 0.0, variance[y0:y1, x0:x1])), np.float64)
    flux, ferr, flag = sep.sum_circle(data, x - x0, y - y0, radius, err=err, mask=sub_bad, subpix=5)
    truncated = (x - radius < -0.5) | (x + radius > nx - 0.5) | (y - radius < -0.5) | (y + radius > ny - 0.5)
    failed = truncated | ((flag & sep.APER_HASMASKED) != 0) | ~np.isfinite(flux)
    return {"apFlux": flux * calib, "apFluxErr": ferr * abs(calib), "apFlux_flag": failed,
            "apFlux_flag_apertureTruncated": truncated}


def _plane_bits(exposure, planes) -> int:
    bits = 0
    for p in planes:
        if p in exposure.mask_planes:
            bits |= 1 << exposure.mask_planes[p]
    return bits


def _center_values(mask, x, y):
    ny, nx = mask.shape
    xi = np.clip(np.floor(x + 0.5).astype(int), 0, nx - 1)
    yi = np.clip(np.floor(y + 0.5).astype(int), 0, ny - 1)
    return np.stack([mask[np.clip(yi + dy, 0, ny - 1), np.clip(xi + dx, 0, nx - 1)] for dy, dx in _OFFSETS_3X3])


def _center_planes(exposure, x, y, any_planes, all_planes):
    """Per source: any of ``any_planes`` in the 3x3 centre; all 3x3 pixels in one of ``all_planes``."""
    if len(x) == 0:
        return np.empty(0, bool), np.empty(0, bool)
    values = _center_values(exposure.mask, x, y)
    bits_any = _plane_bits(exposure, any_planes)
    hit_any = ((values & bits_any) != 0).any(axis=0) if bits_any else np.zeros(len(x), bool)
    hit_all = np.zeros(len(x), bool)
    for plane in all_planes:
        bit = _plane_bits(exposure, (plane,))
        if bit:
            hit_all |= ((values & bit) != 0).all(axis=0)
    return hit_any, hit_all


def _pixel_flags(exposure, labels, fp_idx, fp_lab, n, x, y, cfg):
    """pixelFlags_* (footprint and 3x3 centre) and the detectAndMeasure drop masks."""
    ny, nx = exposure.shape
    out = {}
    mask_fp = exposure.mask.ravel()[fp_idx]
    values = _center_values(exposure.mask, x, y) if n else np.empty((9, 0), np.int32)
    for name, plane in _FLAG_PLANES.items():
        if plane in _OPTIONAL_PLANES and plane not in exposure.mask_planes:
            out[f"pixelFlags_{name}"] = np.full(n, None, dtype=object)
            if name in _CENTER_FLAGS:
                out[f"pixelFlags_{name}Center"] = np.full(n, None, dtype=object)
            continue
        bit = _plane_bits(exposure, (plane,))
        counts = np.bincount(fp_lab, weights=(mask_fp & bit) != 0, minlength=n + 1)[1:] if bit else np.zeros(n)
        out[f"pixelFlags_{name}"] = counts > 0
        if name in _CENTER_FLAGS:
            out[f"pixelFlags_{name}Center"] = ((values & bit) != 0).any(axis=0) if bit else np.zeros(n, bool)
    off = (x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)
    out["pixelFlags_offimage"] = off
    out["pixelFlags_edge"] = out["pixelFlags_edge"] | off
    drop_any, drop_all = _center_planes(exposure, x, y, cfg.drop_center_any, cfg.drop_center_all)
    return out, drop_any, drop_all


def _shapes(exposure, bad, x, y, sign, sigma, scale_arcsec, slices, cfg):
    """Adaptive moments of the source (difference image, sign of the dominant lobe) and of the
    PSF model at the same position, in arcsec^2."""
    n = len(x)
    keys = ("ixx", "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF")
    if n == 0:
        out = {k: np.empty(0) for k in keys}
        out.update({"shape_flag": np.empty(0, bool), "shape_flag_no_pixels": np.empty(0, bool),
                    "shape_flag_not_contained": np.empty(0, bool)})
        return out
    half = cfg.moments_half_size
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    fx, fy = x - ix, y - iy
    data, inside = _cutouts(exposure.image, ix, iy, half)
    badc, _ = _cutouts(bad, ix, iy, half, fill=True)
    valid = inside & ~badc
    stamps = sign[:, None, None] * np.where(valid, data, 0.0).astype(float)
    mxx, myy, mxy, ok = _adaptive_moments(stamps, valid, fx, fy, sigma)
    no_pixels = ~valid.any(axis=(1, 2))
    # PSF: the model at the position, shifted like the source (stamp centre + fractional offset).
    psf_stamps = exposure.psf.evaluate_many(x, y)
    size = psf_stamps.shape[-1]
    if size < 2 * half + 1:
        pad = half - size // 2
        psf_stamps = np.pad(psf_stamps, ((0, 0), (pad, pad), (pad, pad)))
    elif size > 2 * half + 1:
        cut = size // 2 - half
        psf_stamps = psf_stamps[:, cut:cut + 2 * half + 1, cut:cut + 2 * half + 1]
    zero = np.zeros(n)
    pxx, pyy, pxy, pok = _adaptive_moments(psf_stamps, np.ones(psf_stamps.shape, bool), zero, zero, sigma)
    s2 = scale_arcsec ** 2
    nan = np.nan
    contained = np.array([(s[1].start - 0.5 <= xx <= s[1].stop - 0.5) and (s[0].start - 0.5 <= yy <= s[0].stop - 0.5)
                          for s, xx, yy in zip(slices, x, y)], bool)
    return {
        "ixx": np.where(ok, mxx * s2, nan), "iyy": np.where(ok, myy * s2, nan), "ixy": np.where(ok, mxy * s2, nan),
        "ixxPSF": np.where(pok, pxx * s2, nan), "iyyPSF": np.where(pok, pyy * s2, nan),
        "ixyPSF": np.where(pok, pxy * s2, nan),
        "shape_flag": ~ok | no_pixels, "shape_flag_no_pixels": no_pixels, "shape_flag_not_contained": ~contained,
    }


def _dipoles(difference, science, template, cfg, labels, slices, area, candidates, pos_xy, neg_xy, sigma, bad_d,
             bad_s, bad_t):
    """Dipole fits of the two-signed footprints; per-source arrays (NaN / False elsewhere)."""
    n = len(candidates)
    res = {k: np.full(n, np.nan) for k in ("fp", "fn", "xp", "yp", "xn", "yn", "fp_err", "fn_err", "mean_err",
                                           "diff_err", "x_err", "y_err", "chi2", "x", "y", "sn")}
    res["ndata"] = np.zeros(n, np.int32)
    res["attempted"] = np.zeros(n, bool)
    res["isDipole"] = np.zeros(n, bool)
    todo = np.flatnonzero(candidates & (area <= cfg.dipole_max_footprint_area))
    res["attempted"][todo] = True
    if todo.size == 0:
        return res
    diff = (difference.image, difference.variance, ~bad_d)
    sci = tmpl = None
    calib_d = njy_per_unit(difference, "difference image")
    if science is not None and not np.isclose(njy_per_unit(science, "science image"), calib_d):
        log.warning("science image and difference image units differ: dipole fits use the difference only")
        science = None
    if template is not None and not np.isclose(njy_per_unit(template, "matched template"), calib_d):
        log.warning("template and difference image units differ: dipole fits use the difference only")
        template = None
    if science is not None:
        sci = (science.image, science.variance, ~bad_s)
    if template is not None:
        tmpl = (template.image, template.variance, ~bad_t)
    ny, nx = difference.shape
    margin = int(math.ceil(2 * sigma))
    for k in todo:
        sy, sx = slices[k]
        box = (max(sy.start - margin, 0), min(sy.stop + margin, ny),
               max(sx.start - margin, 0), min(sx.stop + margin, nx))
        fp_box = labels[box[0]:box[1], box[2]:box[3]] == k + 1
        xc, yc = 0.5 * (pos_xy[0][k] + neg_xy[0][k]), 0.5 * (pos_xy[1][k] + neg_xy[1][k])
        psfs = (_ShiftedPsf(difference.psf.evaluate(xc, yc)),
                _ShiftedPsf((science.psf if science is not None else difference.psf).evaluate(xc, yc)),
                _ShiftedPsf((template.psf if template is not None and template.psf is not None
                             else science.psf if science is not None else difference.psf).evaluate(xc, yc)))
        fit = _fit_dipole(box, fp_box, diff, sci, tmpl, psfs, (pos_xy[0][k], pos_xy[1][k]),
                          (neg_xy[0][k], neg_xy[1][k]), sigma, cfg)
        if fit is None:
            continue
        for key in ("fp", "fn", "xp", "yp", "xn", "yn", "fp_err", "fn_err", "mean_err", "diff_err", "x_err",
                    "y_err", "chi2"):
            res[key][k] = fit[key]
        res["ndata"][k] = fit["ndata"]
        res["x"][k] = 0.5 * (fit["xp"] + fit["xn"])
        res["y"][k] = 0.5 * (fit["yp"] + fit["yn"])
        with np.errstate(divide="ignore", invalid="ignore"):
            sn = math.hypot(fit["fp"] / fit["fp_err"] if fit["fp_err"] > 0 else np.inf,
                            fit["fn"] / fit["fn_err"] if fit["fn_err"] > 0 else np.inf)
        res["sn"][k] = sn
        total = abs(fit["fp"]) + abs(fit["fn"])
        separation = math.hypot(fit["xp"] - fit["xn"], fit["yp"] - fit["yn"])
        res["isDipole"][k] = bool(
            np.isfinite(sn) and sn > cfg.dipole_min_sn and total > 0
            and abs(fit["fp"]) / total < cfg.dipole_max_flux_ratio
            and abs(fit["fn"]) / total < cfg.dipole_max_flux_ratio
            and separation <= cfg.dipole_max_separation * sigma)
    log.debug("%d dipole fits, %d dipoles", todo.size, int(res["isDipole"].sum()))
    return res


def _dipole_columns(dip, jac, calib):
    """DiaSource dipole columns from the fit results (lengths in arcsec, angle east of north)."""
    fitted = np.isfinite(dip["fp"])
    dx, dy = dip["xp"] - dip["xn"], dip["yp"] - dip["yn"]
    d_xi = jac[:, 0, 0] * dx + jac[:, 0, 1] * dy
    d_eta = jac[:, 1, 0] * dx + jac[:, 1, 1] * dy
    length = np.hypot(d_xi, d_eta) * 3600.0
    angle = np.mod(np.degrees(np.arctan2(d_xi, d_eta)), 360.0)
    mean = 0.5 * (np.abs(dip["fp"]) + np.abs(dip["fn"])) * calib
    return {
        "dipoleMeanFlux": np.where(fitted, mean, np.nan),
        "dipoleMeanFluxErr": np.where(fitted, dip["mean_err"] * abs(calib), np.nan),
        "dipoleFluxDiff": np.where(fitted, (np.abs(dip["fp"]) - np.abs(dip["fn"])) * calib, np.nan),
        "dipoleFluxDiffErr": np.where(fitted, dip["diff_err"] * abs(calib), np.nan),
        "dipoleLength": np.where(fitted, length, np.nan),
        "dipoleAngle": np.where(fitted, angle, np.nan),
        "dipoleChi2": np.where(fitted, dip["chi2"], np.nan),
        "dipoleNdata": dip["ndata"],
        "isDipole": dip["isDipole"],
        "dipoleFitAttempted": dip["attempted"],
    }
