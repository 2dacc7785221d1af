"""Dipole fits of footprints with both a positive and a negative lobe (Rubin DipoleFit).

A positive and a negative PSF at free positions (each within ``dipole_max_separation`` PSF
sigmas of its detection peak) and free (or, optionally, equal) non-negative amplitudes are
fitted by non-linear least squares to the difference pixels of the footprint's box; as in
Rubin, the science image (positive lobe) and the PSF-matched template (negative lobe), each
with a linear background pre-fitted outside the footprint, enter with relative weight
``dipole_rel_weight`` to break the flux-separation degeneracy of close lobes. ``isDipole``:
the fit succeeded, the lobes' quadrature S/N exceeds ``dipole_min_sn``, neither lobe carries
more than ``dipole_max_flux_ratio`` of the total absolute flux, and the separation is at most
``dipole_max_separation`` PSF sigmas. A dipole's position is the midpoint of its lobes.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np

from apsnake.dia.config import DiaConfig
from apsnake.numerics import CubicSpline1d

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _stamp_spline(limit: int) -> CubicSpline1d:
    return CubicSpline1d(np.arange(-limit, limit + 1, dtype=float))


@functools.lru_cache(maxsize=64)
def _axis_weights(limit: int, first: int, count: int, centre: float) -> np.ndarray:
    """Spline weights of the pixels ``first .. first + count - 1`` of one axis for a stamp
    centred at ``centre``. Cached: a dipole fit evaluates the difference, science and
    template PSFs at the same lobe positions, every least-squares step."""
    offsets = np.clip(np.arange(first, first + count) - centre, -limit, limit)
    weights = _stamp_spline(limit).weights(offsets)
    weights.flags.writeable = False
    return weights


class ShiftedPsf:
    """A PSF stamp that can be placed at any sub-pixel position on a pixel grid (bicubic
    spline of the stamp, zero outside it)."""

    def __init__(self, stamp: np.ndarray):
        stamp = np.asarray(stamp, float)
        n = stamp.shape[0]
        self.half = n // 2
        pad = 3
        self.padded = np.pad(stamp / stamp.sum(), pad)
        self.limit = self.half + pad

    def image(self, cols: np.ndarray, rows: np.ndarray, x0: float, y0: float) -> np.ndarray:
        """The PSF centred at (x0, y0) on the grid ``rows x cols`` (consecutive integer pixel
        centres)."""
        w_rows = _axis_weights(self.limit, int(rows[0]), len(rows), float(y0))
        w_cols = _axis_weights(self.limit, int(cols[0]), len(cols), float(x0))
        img = w_rows @ self.padded @ w_cols.T
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


def _fit_dipole(box, fp_box, diff, sci, tmpl, psfs, pos0, neg0, sigma, cfg: DiaConfig, exclude=None):
    """Fit a positive and a negative PSF to one footprint.

    ``box`` = (y0, y1, x0, x1); ``diff``/``sci``/``tmpl`` = (image, variance, ok) full arrays
    or None; ``psfs`` = (difference, science, template) ``ShiftedPsf``; ``pos0``/``neg0``
    = initial (x, y) of the lobes; ``exclude``: pixels of the box left out of the fit and of
    the background estimate (the other children of a deblended footprint). Returns a dict or
    None when the fit fails.
    """
    from scipy.optimize import least_squares

    y0, y1, x0, x1 = box
    rows = np.arange(y0, y1, dtype=float)
    cols = np.arange(x0, x1, dtype=float)
    outside = ~fp_box
    keep = np.ones(fp_box.shape, bool) if exclude is None else ~exclude
    blocks = []  # (data, 1/sigma, ok, kind)
    d_img, d_var, d_ok = (a[y0:y1, x0:x1] for a in diff)
    d_ok = d_ok & keep
    blocks.append((np.where(d_ok, d_img, 0.0), np.where(d_ok, 1 / np.sqrt(np.where(d_ok, d_var, 1)), 0.0), d_ok, "d"))
    w = math.sqrt(cfg.dipole_rel_weight) if cfg.dipole_rel_weight > 0 else 0.0
    for kind, ex in (("s", sci), ("t", tmpl)):
        if ex is None or w == 0:
            continue
        img, var, ok = (a[y0:y1, x0:x1] for a in ex)
        ok = ok & keep
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


def fit_dipoles(difference, science, template, cfg, labels, slices, area, candidates, pos_xy, neg_xy, sigma, bad_d,
                bad_s, bad_t, footprint_labels=None, parent=None):
    """Dipole fits of the two-signed sources; per-source arrays (NaN / False elsewhere).

    ``labels``/``slices``/``area``: each source's pixels (source k is label k + 1). With
    ``footprint_labels`` and ``parent`` (the merged footprint of each source), the pixels of
    the other sources of a deblended footprint are left out of a source's fit.
    """
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
    calib_d = difference.njy_per_unit("difference image")
    if science is not None and not np.isclose(science.njy_per_unit("science image"), calib_d):
        log.warning("science image and difference image units differ: dipole fits use the difference only")
        science = None
    if template is not None and not np.isclose(template.njy_per_unit("matched template"), calib_d):
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
        exclude = None
        if footprint_labels is not None and parent is not None:
            exclude = (footprint_labels[box[0]:box[1], box[2]:box[3]] == parent[k] + 1) & ~fp_box
            exclude = exclude if exclude.any() else None
        xc, yc = 0.5 * (pos_xy[0][k] + neg_xy[0][k]), 0.5 * (pos_xy[1][k] + neg_xy[1][k])
        psfs = (ShiftedPsf(difference.psf.evaluate(xc, yc)),
                ShiftedPsf((science.psf if science is not None else difference.psf).evaluate(xc, yc)),
                ShiftedPsf((template.psf if template is not None and template.psf is not None
                             else science.psf if science is not None else difference.psf).evaluate(xc, yc)))
        fit = _fit_dipole(box, fp_box, diff, sci, tmpl, psfs, (pos_xy[0][k], pos_xy[1][k]),
                          (neg_xy[0][k], neg_xy[1][k]), sigma, cfg, exclude)
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


def dipole_columns(dip, jac, calib):
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
