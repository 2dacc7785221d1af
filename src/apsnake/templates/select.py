"""The template of one science calexp, on its pixel grid (docs/architecture.md, templates).

* ``template_for_exposure`` (mode ``coadd``): the overlapping coadd patches warped onto the
  calexp's grid and merged with per-pixel inverse-variance weights where patches overlap
  (their margins hold the same input data, so the mean is seamless).
* ``best_single_visit_template`` (mode ``single``): the template visit whose CCDs cover the
  calexp best (the narrowest PSF among near-equal coverages), warped and merged.

Uncovered pixels are NO_DATA. The template carries the calexp's WCS, visit info and
detector, so it is written under the science data ID. After two resamplings (calexp ->
patch -> calexp) the per-pixel variance underestimates the pixel scatter by about 10 %
(correlated noise); the subtraction rescales variances anyway.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from apsnake.exposure import Exposure, PhotoCalib
from apsnake.numerics import polynomial_frame
from apsnake.psf import psf_sigma
from apsnake.templates.coadd import mean_psf, psf_position
from apsnake.templates.errors import TemplateError
from apsnake.templates.warp import warp_exposure

log = logging.getLogger(__name__)


def merge_warps(warps, like: Exposure) -> Exposure:
    """Merge exposures warped onto ``like``'s grid into one, for a template.

    Where several cover a pixel, the per-pixel inverse-variance weighted mean is taken
    (overlapping patches hold the same input data, so the mean is seamless); the
    variance is ``1 / sum(1 / var)``; the mask is the OR of the covering inputs; pixels
    no input covers are NO_DATA (image 0, variance 0). The PSF is the order-0 mean of the
    inputs' PSFs at the centroid of the covered area, each weighted by its share of the
    total weight over the grid. Visit info, detector and WCS are ``like``'s; metadata
    ``TMPLCOV`` is the covered fraction.

    Parameters
    ----------
    warps : iterable of Exposure
        Exposures on ``like``'s grid; consumed one at a time (a generator keeps only one
        in memory).
    like : Exposure
        The science exposure (calexp) defining the grid.

    Returns
    -------
    Exposure
    """
    ny, nx = like.shape
    out = Exposure.empty((ny, nx), replace(like.visit_info), detector=like.detector,
                         detector_name=like.detector_name, unit=like.unit, mask_planes=dict(like.mask_planes))
    out.wcs = like.wcs.deepcopy() if like.wcs is not None else None
    out.photo_calib = PhotoCalib(1.0)
    covered = np.zeros((ny, nx), bool)
    psfs, shares = [], []
    first = True
    for e in warps:
        if e.shape != (ny, nx):
            raise TemplateError(f"merge_warps: warp of shape {e.shape} for a {(ny, nx)} grid")
        if first:
            out.unit, out.mask_planes, first = e.unit, dict(e.mask_planes), False
        with np.errstate(invalid="ignore"):
            ok = ((e.mask & e.bits("NO_DATA")) == 0) & (e.variance > 0) & np.isfinite(e.variance) & np.isfinite(e.image)
        psfs.append(e.psf)
        rows, cols = np.flatnonzero(ok.any(axis=1)), np.flatnonzero(ok.any(axis=0))
        if rows.size == 0:
            shares.append(0.0)
            continue
        # A CCD of another visit covers part of the grid: work on its bounding box only. Where
        # nothing covers a pixel yet the warp's values are copied; where an earlier warp does,
        # the inverse-variance mean of the two (with the variance 1 / sum(1 / var), merging one
        # warp at a time gives the mean over all of them).
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        ok, image, variance = ok[box], e.image[box], e.variance[box]
        out_image, out_variance, done = out.image[box], out.variance[box], covered[box]
        overlap = np.nonzero(ok & done)
        if overlap[0].size:
            w_old = 1.0 / out_variance[overlap].astype(float)
            w_new = 1.0 / variance[overlap].astype(float)
            out_image[overlap] = (w_old * out_image[overlap] + w_new * image[overlap]) / (w_old + w_new)
            out_variance[overlap] = 1.0 / (w_old + w_new)
        new = ok & ~done
        np.copyto(out_image, image, where=new)
        np.copyto(out_variance, variance, where=new)
        out.mask[box] |= np.where(ok, out.translate_mask(e.mask[box], e.mask_planes), 0).astype(np.int32)
        done |= ok
        with np.errstate(divide="ignore"):
            shares.append(float(np.sum(np.reciprocal(variance, where=ok, out=np.zeros(ok.shape, np.float32)),
                                       dtype=float)))
    nodata = out.mask_bit("NO_DATA")
    np.copyto(out.mask, np.int32(nodata), where=~covered)
    pos = psf_position(covered)
    if pos is not None:
        out.psf = mean_psf(psfs, shares, *pos)
    out.metadata = {"TMPLCOV": float(covered.mean())}
    return out


def template_for_exposure(calexp: Exposure, coadds: list[Exposure], grid_spacing: int = 64,
                          kernel: str = "lanczos3") -> Exposure:
    """The template for a calexp: the overlapping coadd patches warped onto its pixel grid.

    Parameters
    ----------
    calexp : Exposure
        Science exposure with a WCS; defines the grid, visit info and detector.
    coadds : list of Exposure
        Coadd patches (``make_coadd`` outputs) of the calexp's band; patches that do not overlap
        are skipped.
    grid_spacing, kernel
        As in ``warp_exposure``.

    Returns
    -------
    Exposure
        On the calexp's grid (its WCS, visit info and detector, so it is written under the
        science data ID): where patches overlap, the per-pixel inverse-variance weighted mean
        (see ``merge_warps``); NO_DATA (image 0, variance 0) where no patch covers; PSF = the
        warped coadd PSFs' weighted mean (order 0). Metadata: ``TMPLCOV`` (covered
        fraction), ``TMPLNPAT`` (patches used), ``TMPLPAT`` (their ids, when the coadds
        carry them), ``INVISITS`` (union of the patches' input visits), ``TMPLKIND`` =
        "coadd".

    Raises
    ------
    TemplateError
        If the calexp has no WCS or a coadd's band differs from the calexp's.
    """
    if calexp.wcs is None:
        raise TemplateError(f"template_for_exposure: calexp {calexp.data_id} has no WCS")
    band = calexp.visit_info.band
    for coadd in coadds:
        if band and coadd.visit_info.band and coadd.visit_info.band != band:
            raise TemplateError(f"template_for_exposure: coadd band {coadd.visit_info.band!r} differs from "
                                f"calexp {calexp.data_id} band {band!r}")
    used, visits = [], set()

    def warps():  # one warp in memory at a time
        for coadd in coadds:
            w = warp_exposure(coadd, calexp.wcs, calexp.shape, grid_spacing=grid_spacing, kernel=kernel)
            if w.metadata.get("WARPCOV", 0.0) <= 0:
                continue
            used.append(coadd.detector_name or coadd.metadata.get("PATCH", ""))
            visits.update(v for v in str(coadd.metadata.get("INVISITS", "")).split(",") if v)
            yield w

    out = merge_warps(warps(), calexp)
    out.metadata.update({"TMPLNPAT": len(used), "TMPLKIND": "coadd",
                         "INVISITS": ",".join(sorted(visits, key=lambda v: (len(v), v)))})
    if used and all(used):
        out.metadata["TMPLPAT"] = ",".join(used)
    log.info("template for %s: %d patches, coverage %.3f", calexp.data_id, len(used), out.metadata["TMPLCOV"])
    return out


def single_visit_template(calexp: Exposure, template_calexp: Exposure, grid_spacing: int = 64,
                          kernel: str = "lanczos3") -> Exposure:
    """The simpler template: one calexp of another visit warped onto the science calexp's grid.

    Parameters
    ----------
    calexp : Exposure
        Science exposure with a WCS.
    template_calexp : Exposure
        Template exposure (same band) with a WCS and PSF.
    grid_spacing, kernel
        As in ``warp_exposure``.

    Returns
    -------
    Exposure
        On the calexp's grid with its visit info and detector; the warped (spatially
        varying where the input's is) PSF; metadata ``TMPLCOV``, ``TMPLKIND`` = "visit",
        ``INVISITS`` (the template visit).
    """
    if calexp.wcs is None:
        raise TemplateError(f"single_visit_template: calexp {calexp.data_id} has no WCS")
    band = calexp.visit_info.band
    if band and template_calexp.visit_info.band and template_calexp.visit_info.band != band:
        raise TemplateError(f"single_visit_template: template band {template_calexp.visit_info.band!r} differs "
                            f"from calexp {calexp.data_id} band {band!r}")
    w = warp_exposure(template_calexp, calexp.wcs, calexp.shape, grid_spacing=grid_spacing, kernel=kernel)
    out = replace(w, visit_info=replace(calexp.visit_info), detector=calexp.detector,
                  detector_name=calexp.detector_name)
    nodata = out.mask_of("NO_DATA")
    out.metadata = {"TMPLCOV": float((~nodata).mean()), "TMPLKIND": "visit",
                    "INVISITS": str(template_calexp.visit_info.visit)}
    return out


def best_single_visit_template(calexp: Exposure, candidates: list[Exposure], min_gain: float = 0.05) -> Exposure:
    """The single-visit template option: of the template visits' calexps (``candidates``,
    any number of CCDs per visit), the visit whose CCDs, warped onto ``calexp``'s grid
    and merged, cover it best; among visits within ``min_gain`` of the best coverage, the
    one with the narrowest PSF. Metadata as ``single_visit_template`` (``TMPLKIND`` =
    "visit"); a visit's CCDs never overlap, so merging them only fills the grid.

    A template from one visit has one PSF everywhere (a coadd of several seeings does not),
    at the price of more noise.
    """
    if not candidates:
        raise TemplateError(f"best_single_visit_template: no template calexp for {calexp.data_id}")
    # Candidates may be memory maps (``read_exposure(memmap=True)``): the choice reads their
    # headers, PSFs and a sparse sample of their masks only, and of the chosen visit's CCDs
    # only the part under the calexp is read (a template job of a full focal plane has up to
    # ~18 candidates).
    by_visit: dict[int, list[Exposure]] = {}
    for exp in candidates:
        by_visit.setdefault(int(exp.visit_info.visit), []).append(exp)
    # Coverage of each visit from a coarse grid of the calexp's pixels mapped into its CCDs
    # (cheap), so that only the chosen visit is warped.
    ny, nx = calexp.shape
    gy, gx = np.mgrid[0:ny:32, 0:nx:32]
    ra, dec = calexp.wcs.all_pix2world(gx.ravel().astype(float), gy.ravel().astype(float), 0)
    options = []
    for visit, exposures in sorted(by_visit.items()):
        covered = np.zeros(ra.size, bool)
        for exp in exposures:
            x, y = exp.wcs.all_world2pix(ra, dec, 0, quiet=True)
            inside = (x >= 3) & (x < exp.shape[1] - 3) & (y >= 3) & (y < exp.shape[0] - 3)
            ix, iy = np.round(x[inside]).astype(int), np.round(y[inside]).astype(int)
            ok = np.zeros(ra.size, bool)
            ok[np.flatnonzero(inside)] = (np.asarray(exp.mask[iy, ix]) & exp.bits("NO_DATA")) == 0
            covered |= ok
        sigma = min((psf_sigma(e.psf, *polynomial_frame(e.shape)[:2]) for e in exposures if e.psf is not None),
                    default=float("inf"))
        options.append((float(covered.mean()), sigma, visit))
    best_cov = max(o[0] for o in options)
    _, _, visit = min((o for o in options if o[0] >= best_cov - min_gain), key=lambda o: o[1])
    merged = merge_warps((single_visit_template(calexp, e) for e in by_visit[visit]), calexp)
    coverage = float(merged.metadata.get("TMPLCOV", 0.0))
    log.info("single-visit template for %s: visit %d, coverage %.3f (estimated per visit %s)", calexp.data_id, visit,
             coverage, {o[2]: round(o[0], 3) for o in options})
    merged.metadata.update({"TMPLKIND": "visit", "INVISITS": str(visit), "TMPLCOV": round(coverage, 5)})
    return merged
