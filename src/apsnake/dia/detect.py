"""Detection on a difference image: footprints of both signs, their peaks and centroids.

The difference image is smoothed with a Gaussian of the difference PSF's width (a PSF-matched
filter, ``detection.smooth_for_detection``) and divided by the noise of the smoothed image
from the variance plane (Rubin ``thresholdType='pixel_stdev'``). Pixels at or above
``+threshold`` form positive footprints, at or below ``-threshold`` negative ones (Rubin
``thresholdPolarity='both'``); every footprint is grown by ``grow_footprint`` pixels (a disc)
and footprints that then touch are merged, as Rubin merges its positive and negative
FootprintSets. Each lobe's peak is refined to sub-pixel precision with a parabola through the
logarithm of its 3x3 neighbourhood (exact for a Gaussian profile): for a point source in white
noise the matched-filter maximum is the maximum-likelihood position, with the Cramer-Rao
error ``sqrt(sum P^2) / (snr sqrt(sum (dP/dx)^2))`` per axis.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from apsnake.detection import smooth_for_detection
from apsnake.dia.config import DiaConfig
from apsnake.exposure import PsfModel
from apsnake.numerics import dilate

log = logging.getLogger(__name__)


def group_argmax(groups: np.ndarray, values: np.ndarray, n_groups: int, valid: np.ndarray) -> np.ndarray:
    """Per group 1..n_groups, the index (into ``values``) of the largest valid value; -1 if none."""
    sel = np.flatnonzero(valid)
    out = np.full(n_groups + 1, -1, np.int64)
    if sel.size:
        order = sel[np.lexsort((values[sel], groups[sel]))]
        g = groups[order]
        last = np.r_[g[1:] != g[:-1], True]
        out[g[last]] = order[last]
    return out[1:]


def subpixel_peak(image: np.ndarray, ix: np.ndarray, iy: np.ndarray):
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


def centroid_errors(psf: PsfModel, x, y, snr):
    """Cramer-Rao position errors (pixels) of a PSF-fit centroid at significance ``snr``."""
    if len(x) == 0:
        return np.empty(0), np.empty(0)
    stamps = psf.evaluate_many(x, y)
    gy, gx = np.gradient(stamps, axis=(1, 2))
    p2 = (stamps ** 2).sum(axis=(1, 2))
    s = np.maximum(np.abs(snr), 1e-3)
    return (np.sqrt(p2 / np.maximum((gx ** 2).sum(axis=(1, 2)), 1e-30)) / s,
            np.sqrt(p2 / np.maximum((gy ** 2).sum(axis=(1, 2)), 1e-30)) / s)


def remove_small(mask, min_area):
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return (sizes >= min_area)[labels]


def dominant_peak(smooth, pix, sign, nx):
    """Sub-pixel peak of ``sign * smooth`` at the dominant lobe's peak pixel."""
    if len(pix) == 0:
        return np.empty(0), np.empty(0), np.empty(0, bool)
    ix, iy = pix % nx, pix // nx
    xa, ya, fa = subpixel_peak(smooth, ix, iy)
    xb, yb, fb = subpixel_peak(-smooth, ix, iy)
    positive = sign > 0
    return np.where(positive, xa, xb), np.where(positive, ya, yb), np.where(positive, fa, fb)


@dataclass
class Footprints:
    """Merged detection footprints of a difference image, one entry per footprint.

    Positions are 0-based pixels (x column, y row); ``snr`` is the peak significance of the
    dominant lobe (the sign with the larger peak), in sigma.
    """

    labels: np.ndarray          # (ny, nx) footprint number 1..count, 0 outside
    count: int
    slices: list                # bounding-box slices of each footprint (scipy.ndimage.find_objects)
    area: np.ndarray            # pixels per footprint
    pixels: np.ndarray          # flat indices of all footprint pixels
    pixel_labels: np.ndarray    # their footprint numbers
    smooth: np.ndarray          # the matched-filtered image
    significance: np.ndarray    # smooth / its noise, sigma
    has_pos: np.ndarray         # footprint has a positive lobe above threshold
    has_neg: np.ndarray         # ... a negative one
    pos_xy: tuple               # (x, y) sub-pixel peak of the positive lobe (where there is one)
    neg_xy: tuple               # ... of the negative lobe
    x: np.ndarray               # centroid of the dominant lobe
    y: np.ndarray
    centroid_flag: np.ndarray   # sub-pixel refinement failed (peak on the border, offset > 1 px)
    snr: np.ndarray
    sign: np.ndarray            # +1 where the positive lobe dominates, -1 elsewhere
    is_negative: np.ndarray     # only a negative lobe


def detect_footprints(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, psf_sigma: float,
                      cfg: DiaConfig) -> Footprints:
    """Footprints of both signs above ``cfg.threshold`` on the matched-filtered image.

    Parameters
    ----------
    image, variance : numpy.ndarray
        The difference image and its variance (image unit, unit squared).
    bad : numpy.ndarray of bool
        Pixels that carry no signal (treated as 0 by the filter).
    psf_sigma : float
        Gaussian-equivalent sigma of the difference PSF, pixels (the filter width).
    cfg : DiaConfig
        ``threshold`` (sigma), ``min_area``, ``grow_footprint`` (pixels).
    """
    from scipy import ndimage

    ny, nx = image.shape
    smooth, noise = smooth_for_detection(image, variance, bad, psf_sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        signif = np.where((noise > 0) & np.isfinite(noise), smooth / noise, 0.0).astype(np.float32)
    pos = signif >= cfg.threshold
    neg = signif <= -cfg.threshold
    if cfg.min_area > 1:
        pos, neg = remove_small(pos, cfg.min_area), remove_small(neg, cfg.min_area)
    labels, n = ndimage.label(dilate(pos | neg, cfg.grow_footprint), structure=np.ones((3, 3), bool))
    fp_idx = np.flatnonzero(labels)
    fp_lab = labels.ravel()[fp_idx]
    fp_sig = signif.ravel()[fp_idx]
    i_pos = group_argmax(fp_lab, fp_sig, n, pos.ravel()[fp_idx])
    i_neg = group_argmax(fp_lab, -fp_sig, n, neg.ravel()[fp_idx])
    has_pos, has_neg = i_pos >= 0, i_neg >= 0
    pos_pix = fp_idx[np.maximum(i_pos, 0)]
    neg_pix = fp_idx[np.maximum(i_neg, 0)]
    pos_peak = np.where(has_pos, signif.ravel()[pos_pix], 0.0)
    neg_peak = np.where(has_neg, -signif.ravel()[neg_pix], 0.0)
    dominant_pos = has_pos & (~has_neg | (pos_peak >= neg_peak))
    sign = np.where(dominant_pos, 1.0, -1.0)
    xp, yp, _ = subpixel_peak(smooth, pos_pix % nx, pos_pix // nx)
    xn, yn, _ = subpixel_peak(-smooth, neg_pix % nx, neg_pix // nx)
    x, y, centroid_flag = dominant_peak(smooth, np.where(dominant_pos, pos_pix, neg_pix), sign, nx)
    return Footprints(
        labels=labels, count=n, slices=ndimage.find_objects(labels) if n else [],
        area=np.bincount(fp_lab, minlength=n + 1)[1:], pixels=fp_idx, pixel_labels=fp_lab, smooth=smooth,
        significance=signif, has_pos=has_pos, has_neg=has_neg, pos_xy=(xp, yp), neg_xy=(xn, yn), x=x, y=y,
        centroid_flag=centroid_flag, snr=np.where(dominant_pos, pos_peak, neg_peak).astype(float), sign=sign,
        is_negative=has_neg & ~has_pos,
    )
