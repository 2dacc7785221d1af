"""Coaddition of exposures warped onto one patch of the sky grid (docs/algorithms.md, templates).

Weighted mean with one weight per input, ``1 / median(variance)`` over its covered pixels
(Rubin's scalar weights: per-pixel inverse variances would include each star's own Poisson
noise and bias bright-star fluxes low). NO_DATA input pixels are left out, and BAD/SAT ones
(``CoaddConfig.bad_mask_planes``) are used only where no other input covers. With at least
``min_inputs_for_clipping`` inputs at a pixel, the input deviating most from the weighted
mean of the others by more than ``clip_sigma`` times the expected scatter (its variance,
that of the mean of the others, and ``relative_tolerance`` times that mean, so star cores
that differ with the seeing are kept) is rejected, ``n_iter`` times. Coadd variance =
``sum(w^2 var) / sum(w)^2``; the coadd PSF is the weighted mean of the input PSFs at one
position (order 0). Optionally the inputs are first convolved to the widest input PSF
(``homogenize_psfs``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from apsnake.exposure import Exposure, PhotoCalib, PsfModel, VisitInfo
from apsnake.numerics import dilate, polynomial_frame
from apsnake.psf import measure_fwhm, psf_sigma
from apsnake.templates.errors import TemplateError

log = logging.getLogger(__name__)


@dataclass
class CoaddConfig:
    """How warped exposures are combined into a coadd (see the module docstring).

    Attributes
    ----------
    clip_sigma : float
        Reject an input deviating from the mean of the others by more than this many
        sigma (noise of both plus the ``relative_tolerance`` term).
    n_iter : int
        Rejection iterations (at most one input rejected per pixel per iteration).
    min_inputs_for_clipping : int
        Clip only where at least this many inputs remain.
    relative_tolerance : float
        Fraction of the mean tolerated in addition to the noise, so that star cores that
        differ between inputs with the seeing are not clipped.
    bad_mask_planes : tuple of str
        Input pixels with these planes are used only where no other input covers.
    drop_mask_planes : tuple of str
        Planes of single inputs not carried to the coadd.
    mask_propagation_threshold : float
        A plane of ``bad_mask_planes`` is set in the coadd where the inputs left out for it
        carry at least this fraction of the weight (Rubin: SAT 0.1).
    chunk_rows : int
        Rows processed together (memory: about 40 bytes x inputs x rows x columns).
    homogenize_psf : bool
        Convolve every input to the widest input PSF (Gaussian kernels of width
        sqrt(sigma_widest^2 - sigma_i^2)) before combining. A coadd of different seeing
        has a PSF that jumps wherever the set of covering inputs changes (CCD edges and
        gaps of the dithered inputs); no smooth PSF-matching kernel can follow that, and
        bright stars then leave ~1% residuals in differences. On the simulated demo night a
        single-visit template cut the false detections from 18 to 2.5 per CCD-visit.
    """

    clip_sigma: float = 3.0
    n_iter: int = 2
    min_inputs_for_clipping: int = 3
    relative_tolerance: float = 0.3
    bad_mask_planes: tuple[str, ...] = ("BAD", "SAT")
    drop_mask_planes: tuple[str, ...] = ("DETECTED", "DETECTED_NEGATIVE", "CR", "NO_DATA")
    mask_propagation_threshold: float = 0.1
    chunk_rows: int = 256
    homogenize_psf: bool = True


def _input_weight(exposure: Exposure) -> float:
    """1 / median variance over the covered pixels (subsampled)."""
    nodata = exposure.bits("NO_DATA")
    var = exposure.variance[::4, ::4]
    ok = ((exposure.mask[::4, ::4] & nodata) == 0) & np.isfinite(var) & (var > 0)
    if not ok.any():
        ok = ((exposure.mask & nodata) == 0) & np.isfinite(exposure.variance) & (exposure.variance > 0)
        var = exposure.variance
    if not ok.any():
        return 0.0
    return 1.0 / float(np.median(var[ok]))


def psf_position(valid: np.ndarray) -> tuple[float, float] | None:
    """The grid centre if valid, else the valid pixel nearest to the centroid of the valid area."""
    ny, nx = valid.shape
    cy, cx = ny // 2, nx // 2
    if valid[cy, cx]:
        return float(cx), float(cy)
    step = max(1, int(math.sqrt(valid.size / 40000)))
    yy, xx = np.nonzero(valid[::step, ::step])
    if yy.size == 0:
        yy, xx = np.nonzero(valid)
        step = 1
        if yy.size == 0:
            return None
    yy, xx = yy * step, xx * step
    my, mx = yy.mean(), xx.mean()
    k = int(np.argmin((xx - mx) ** 2 + (yy - my) ** 2))
    return float(xx[k]), float(yy[k])


def mean_psf(psfs, weights, x: float, y: float) -> PsfModel | None:
    """Order-0 PsfModel: the weighted mean of unit-sum PSF stamps evaluated at (x, y)."""
    stamps, ws = [], []
    for psf, w in zip(psfs, weights):
        if psf is None or not w > 0:
            continue
        stamps.append(psf.evaluate(x, y))
        ws.append(w)
    if not stamps:
        return None
    size = max(s.shape[0] for s in stamps)
    total = np.zeros((size, size))
    for s, w in zip(stamps, ws):
        pad = (size - s.shape[0]) // 2
        total[pad:pad + s.shape[0], pad:pad + s.shape[1]] += w * s / s.sum()
    total /= sum(ws)
    return PsfModel(components=total[None].astype(np.float32), spatial_order=0, x0=x, y0=y, scale=1.0,
                    fwhm_pixels=measure_fwhm(total))


def wcs_offset_arcsec(w0, w1, shape) -> float:
    """Largest sky offset (arcsec) between two WCSs at the corners of a (ny, nx) grid."""
    x = np.array([0.0, shape[1] - 1.0, 0.0, shape[1] - 1.0])
    y = np.array([0.0, 0.0, shape[0] - 1.0, shape[0] - 1.0])
    ra0, dec0 = w0.all_pix2world(x, y, 0)
    ra1, dec1 = w1.all_pix2world(x, y, 0)
    dra = ((ra1 - ra0 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec0))
    return float(np.nanmax(np.hypot(dra, dec1 - dec0)) * 3600.0)


def _check_same_grid(exposures: list[Exposure], what: str) -> None:
    shape = exposures[0].shape
    for e in exposures[1:]:
        if e.shape != shape:
            raise TemplateError(f"{what}: inputs have different shapes ({shape} vs {e.shape}, visit "
                                f"{e.visit_info.visit} detector {e.detector})")
    w0 = exposures[0].wcs
    if w0 is None:
        return
    for e in exposures[1:]:
        if e.wcs is not None and wcs_offset_arcsec(w0, e.wcs, shape) > 1e-3:
            raise TemplateError(f"{what}: inputs are on different WCS grids (visit {e.visit_info.visit}, "
                                f"detector {e.detector})")


def _all_nodata(exposure: Exposure) -> bool:
    nodata = exposure.bits("NO_DATA")
    return bool(nodata) and bool(np.all(exposure.mask & nodata))


def _empty_coadd(wcs, shape, band: str, patch_id: str | None) -> Exposure:
    """An all-NO_DATA coadd (no input covers the grid)."""
    out = Exposure.empty(tuple(int(v) for v in shape), VisitInfo(visit=0, observation_type="coadd", band=band,
                                                                 object_name=patch_id or ""),
                         detector=0, detector_name=patch_id or "", unit="nJy", photo_calib=PhotoCalib(1.0))
    out.set_mask("NO_DATA", np.ones(out.shape, bool))
    out.wcs = wcs.deepcopy()
    out.metadata = {"NINPUTS": 0, "INVISITS": "", "INDETS": "", "COADDCOV": 0.0, "NCLIPPED": 0}
    if patch_id:
        out.metadata["PATCH"] = patch_id
    log.warning("coadd %s: no input covers the grid; all NO_DATA", patch_id or "")
    return out


def _sigma_at_centre(exposure: Exposure) -> float:
    """Gaussian-equivalent PSF sigma at the image centre, pixels."""
    x0, y0, _ = polynomial_frame(exposure.shape)
    return psf_sigma(exposure.psf, x0, y0)


def homogenize_psfs(warped: list[Exposure]) -> list[Exposure]:
    """Convolve exposures on one grid to the widest PSF among them (Gaussian kernels).

    The image is convolved with a Gaussian of width sqrt(s_max^2 - s_i^2) (pixels), the
    variance with the per-pixel variance of such a convolution of white noise
    (``sum k^2 var``), the PSF model's components with the same kernel; NO_DATA grows by
    3 kernel widths so no convolved pixel mixes in missing data. Exposures without a PSF
    are returned unchanged.
    """
    from scipy import ndimage

    with_psf = [e for e in warped if e.psf is not None]
    if len(with_psf) < 2:
        return warped
    sigmas = [_sigma_at_centre(e) for e in with_psf]
    target = max(sigmas)
    out = []
    for exposure in warped:
        if exposure.psf is None:
            out.append(exposure)
            continue
        sigma_k = math.sqrt(max(target**2 - _sigma_at_centre(exposure) ** 2, 0.0))
        if sigma_k < 0.2:
            out.append(exposure)
            continue
        nodata = exposure.mask_of("NO_DATA")
        image = np.where(nodata, 0.0, exposure.image).astype(np.float32)
        variance = np.where(nodata, 0.0, exposure.variance).astype(np.float32)
        image = ndimage.gaussian_filter(image, sigma_k, mode="constant", truncate=4.0)
        variance = ndimage.gaussian_filter(variance, sigma_k / math.sqrt(2.0), mode="constant", truncate=4.0)
        variance /= np.float32(4.0 * math.pi * sigma_k**2)
        grown = dilate(nodata, int(math.ceil(3 * sigma_k)))
        mask = exposure.mask.copy()
        mask[grown] |= np.int32(1 << exposure.mask_planes["NO_DATA"]) if "NO_DATA" in exposure.mask_planes else 0
        image[grown] = 0.0
        variance[grown] = 0.0
        components = np.stack([ndimage.gaussian_filter(c, sigma_k, mode="constant", truncate=4.0)
                               for c in np.asarray(exposure.psf.components, np.float32)])
        psf = replace(exposure.psf, components=components.astype(np.float32))
        new = replace(exposure, image=image, variance=variance, mask=mask, psf=psf, metadata=dict(exposure.metadata))
        new.metadata["HOMOGSIG"] = round(sigma_k, 4)
        out.append(new)
    log.info("coadd inputs homogenized to PSF sigma %.2f px (input sigmas %s)", target,
             [round(v, 2) for v in sigmas])
    return out


def make_coadd(warped: list[Exposure], config: CoaddConfig | None = None, *, patch_id: str | None = None,
               wcs=None, shape: tuple[int, int] | None = None, band: str | None = None) -> Exposure:
    """Inverse-variance weighted, outlier-clipped mean of exposures warped onto one grid.

    Parameters
    ----------
    warped : list of Exposure
        Inputs on the same pixel grid and WCS (``warp_exposure`` outputs), one band, images
        in the same unit (nJy). Inputs without any covered pixel are ignored.
    config : CoaddConfig, optional
        Clipping and mask propagation.
    patch_id : str, optional
        Patch id, recorded as ``detector_name``, ``visit_info.object_name`` and metadata
        ``PATCH``.
    wcs : astropy.wcs.WCS, optional
        The grid's WCS; with ``shape``, lets an input list without coverage give an
        all-NO_DATA coadd (so a workflow rule always has its output); checked against the
        inputs' otherwise.
    shape : tuple of int, optional
        (ny, nx) of the grid; checked against the inputs'.
    band : str, optional
        Expected band; checked against the inputs'.

    Returns
    -------
    Exposure
        The coadd: image = weighted mean (flux per pixel), variance =
        ``sum(w^2 var) / sum(w)^2`` (``= 1 / sum(1 / var)`` for inverse-variance weights),
        mask = OR of the contributing inputs' planes (not DETECTED, DETECTED_NEGATIVE, CR)
        plus BAD/SAT where inputs left out for them carry >= 10 % of the weight, NO_DATA
        (image 0, variance 0) where no input covers. PSF: order-0 weighted mean of the input
        PSFs at the grid centre (or the covered pixel nearest the centroid of the covered
        area). Visit info: ``visit`` 0, the inputs' band and filter, ``observation_type``
        "coadd", mean MJD, total exposure time. Metadata: ``NINPUTS``, ``INVISITS`` (comma
        list of input visits), ``INDETS`` (comma list of visit.detector), ``COADDCOV``
        (covered fraction), ``NCLIPPED`` (rejected input pixels).

    Raises
    ------
    TemplateError
        Without covering inputs (unless ``wcs`` and ``shape`` are given), with mixed bands,
        a band other than ``band``, or inputs on different grids.
    """
    cfg = config or CoaddConfig()
    warped = [e for e in warped if not _all_nodata(e)]
    if cfg.homogenize_psf and len(warped) > 1:
        warped = homogenize_psfs(warped)
    if not warped:
        if wcs is None or shape is None:
            raise TemplateError(f"make_coadd{f' {patch_id}' if patch_id else ''}: no input covers the grid")
        return _empty_coadd(wcs, shape, band or "", patch_id)
    _check_same_grid(warped, "make_coadd")
    if shape is not None and tuple(int(v) for v in shape) != warped[0].shape:
        raise TemplateError(f"make_coadd: inputs have shape {warped[0].shape}, expected {tuple(shape)}")
    if wcs is not None and warped[0].wcs is not None and wcs_offset_arcsec(wcs, warped[0].wcs,
                                                                            warped[0].shape) > 1e-3:
        raise TemplateError("make_coadd: the inputs are not on the given WCS grid")
    bands = sorted({e.visit_info.band for e in warped if e.visit_info.band})
    if len(bands) > 1:
        raise TemplateError(f"make_coadd: inputs from several bands {bands}")
    units = sorted({e.unit for e in warped})
    if len(units) > 1:
        raise TemplateError(f"make_coadd: inputs in several units {units}")
    if band and bands and bands[0] != band:
        raise TemplateError(f"make_coadd: inputs are in band {bands[0]!r}, expected {band!r}")
    if band and not bands:
        bands = [band]
    ny, nx = warped[0].shape
    n = len(warped)

    out = Exposure.empty((ny, nx), VisitInfo(visit=0), detector=0, unit=warped[0].unit,
                         mask_planes=dict(warped[0].mask_planes))
    nodata_out = out.mask_bit("NO_DATA")
    masks = [out.translate_mask(e.mask, e.mask_planes) for e in warped]
    nodata = nodata_out
    bad_bits = out.bits(*cfg.bad_mask_planes)
    drop_bits = out.bits(*cfg.drop_mask_planes)
    weights = np.array([_input_weight(e) for e in warped])
    n_clipped = 0
    for r0 in range(0, ny, max(1, int(cfg.chunk_rows))):
        r1 = min(r0 + max(1, int(cfg.chunk_rows)), ny)
        X = np.stack([e.image[r0:r1] for e in warped]).astype(np.float32)
        V = np.stack([e.variance[r0:r1] for e in warped]).astype(np.float32)
        M = np.stack([m[r0:r1] for m in masks])
        with np.errstate(invalid="ignore"):
            usable = (((M & nodata) == 0) & np.isfinite(X) & np.isfinite(V) & (V > 0)
                      & (weights > 0)[:, None, None])
        good = usable & ((M & bad_bits) == 0)
        active = np.where(good.any(axis=0), good, usable)
        X[~usable] = 0.0
        V[~usable] = 0.0
        wk = weights.astype(np.float32)[:, None, None]
        for _ in range(max(0, int(cfg.n_iter))):
            can = active.sum(axis=0) >= max(int(cfg.min_inputs_for_clipping), 2)
            if not can.any():
                break
            W = wk * active
            WX, WWV = W * X, W * W * V
            S, SX, SV = W.sum(axis=0), WX.sum(axis=0), WWV.sum(axis=0)
            # Leave-one-out: each input against the weighted mean of the others; the most
            # deviant one beyond clip_sigma is rejected.
            zmax = np.zeros(S.shape, np.float32)
            kmax = np.full(S.shape, -1, np.int16)
            for i in range(n):
                s_o = S - W[i]
                ok = active[i] & can & (s_o > 0)
                safe = np.where(ok, s_o, 1.0)
                m_o = (SX - WX[i]) / safe
                v_o = (SV - WWV[i]) / (safe * safe)
                scatter2 = V[i] + v_o + (cfg.relative_tolerance * m_o) ** 2
                z = np.where(ok & (scatter2 > 0), np.abs(X[i] - m_o) / np.sqrt(np.where(scatter2 > 0, scatter2, 1.0)),
                             0.0)
                better = z > zmax
                zmax = np.where(better, z, zmax)
                kmax[better] = i
            reject = zmax > cfg.clip_sigma
            if not reject.any():
                break
            for i in range(n):
                active[i] &= ~(reject & (kmax == i))
            n_clipped += int(reject.sum())
        W = wk * active
        S = W.sum(axis=0)
        covered = S > 0
        safe = np.where(covered, S, 1.0)
        out.image[r0:r1] = np.where(covered, (W * X).sum(axis=0) / safe, 0.0)
        out.variance[r0:r1] = np.where(covered, (W * W * V).sum(axis=0) / (safe * safe), 0.0)
        mask = np.bitwise_or.reduce(np.where(active, M, 0), axis=0) & ~drop_bits
        # Bad planes where the inputs left out for them carry enough of the weight.
        S_usable = (wk * usable).sum(axis=0)
        for name in cfg.bad_mask_planes:
            bit = out.bits(name)
            if not bit:
                continue
            left_out = usable & ~active & ((M & bit) != 0)
            if left_out.any():
                frac = (wk * left_out).sum(axis=0) / np.where(S_usable > 0, S_usable, 1.0)
                mask |= np.where(frac >= cfg.mask_propagation_threshold, bit, 0).astype(mask.dtype)
        mask = np.where(covered, mask, nodata_out)
        out.mask[r0:r1] = mask.astype(np.int32)

    valid = (out.mask & nodata_out) == 0
    pos = psf_position(valid)
    if pos is not None:
        x, y = pos
        iy, ix = int(round(y)), int(round(x))
        psf_w = [w if ((m[iy, ix] & nodata) == 0 and e.variance[iy, ix] > 0) else 0.0
                 for e, m, w in zip(warped, masks, weights)]
        out.psf = mean_psf([e.psf for e in warped], psf_w, x, y)
    visits = [int(e.visit_info.visit) for e in warped]
    first = warped[0].visit_info
    mjds = [e.visit_info.mjd_mid_tai for e in warped if math.isfinite(e.visit_info.mjd_mid_tai)]
    exptimes = [e.visit_info.exposure_time for e in warped if math.isfinite(e.visit_info.exposure_time)]
    filters = {e.visit_info.physical_filter for e in warped}
    out.visit_info = VisitInfo(
        visit=0, instrument=first.instrument, observation_type="coadd",
        mjd_mid_tai=float(np.mean(mjds)) if mjds else float("nan"),
        exposure_time=float(np.sum(exptimes)) if exptimes else float("nan"),
        band=bands[0] if bands else "", physical_filter=filters.pop() if len(filters) == 1 else "",
        object_name=patch_id or "",
    )
    out.wcs = warped[0].wcs.deepcopy() if warped[0].wcs is not None else None
    out.photo_calib = PhotoCalib(1.0) if warped[0].photo_calib is not None else None
    out.detector_name = patch_id or ""
    out.metadata = {
        "NINPUTS": n,
        "INVISITS": ",".join(str(v) for v in sorted(set(visits))),
        "INDETS": ",".join(f"{e.visit_info.visit}.{e.detector}" for e in warped),
        "COADDCOV": float(valid.mean()),
        "NCLIPPED": n_clipped,
    }
    if patch_id:
        out.metadata["PATCH"] = patch_id
    log.info("coadd %s: %d inputs, covered %.3f, %d pixels clipped", patch_id or "", n, valid.mean(), n_clipped)
    return out
