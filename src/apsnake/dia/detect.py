"""Detection on a difference image: footprints of both signs, their peaks, children and centroids.

The difference image is smoothed with a Gaussian of the difference PSF's width (a PSF-matched
filter, ``detection.smooth_for_detection``) and divided by the noise of the smoothed image
from the variance plane (Rubin ``thresholdType='pixel_stdev'``). Pixels at or above
``+threshold`` form positive footprints, at or below ``-threshold`` negative ones (Rubin
``thresholdPolarity='both'``); every footprint is grown by ``grow_footprint`` pixels (a disc)
and footprints that then touch are merged, as Rubin merges its positive and negative
FootprintSets.

Peaks are local maxima of ``sign * smooth`` (the matched-filtered image, negated for the
negative sign), never of the significance image: near a bright star the variance plane holds
the star's Poisson noise and PSF-matching floor, which flattens ``smooth / noise`` (or dents
it at the centre) so that its maximum wanders pixels away from the source. Each peak is
refined to sub-pixel precision with a parabola through the logarithm of its 3x3 neighbourhood
of ``sign * smooth`` (exact for a Gaussian profile; the same code for both signs): for a point
source in white noise the matched-filter maximum is the maximum-likelihood position, with the
Cramer-Rao error ``sqrt(sum P^2) / (snr sqrt(sum (dP/dx)^2))`` per axis.

With ``cfg.deblend`` a merged footprint with several significant peaks of one sign gives one
source (child) per peak (``deblend_peaks``); a positive and a negative peak within the dipole's
lobe-separation limit stay together as one dipole candidate. The footprint's pixels are shared
out among its children (``share_pixels``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from apsnake.detection import smooth_for_detection
from apsnake.dia.config import DiaConfig
from apsnake.exposure import PsfModel
from apsnake.numerics import SIGMA_TO_FWHM, dilate

log = logging.getLogger(__name__)

_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


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


def subpixel_peak(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, sign=1.0):
    """Sub-pixel maximum of ``sign * image`` near integer peaks: a parabola through the log of
    the peak and its two neighbours along each axis (linear values if any is not positive).

    ``sign`` (+1 or -1, scalar or one per peak) selects the lobe: a negative lobe is refined
    exactly as a positive one, on the negated image. At a local maximum of ``sign * image`` the
    offsets are within half a pixel. Returns x, y and a failure flag (peak on the border, not
    a maximum along an axis, or an offset beyond 1 pixel).
    """
    ny, nx = image.shape
    ix, iy = np.asarray(ix, np.int64), np.asarray(iy, np.int64)
    sign = np.broadcast_to(np.asarray(sign, float), ix.shape)
    ok = (ix > 0) & (ix < nx - 1) & (iy > 0) & (iy < ny - 1)
    cx, cy = np.clip(ix, 1, nx - 2), np.clip(iy, 1, ny - 2)

    def offset(m, c, p):
        with np.errstate(divide="ignore", invalid="ignore"):
            positive = (m > 0) & (c > 0) & (p > 0)
            a_m, a_c, a_p = (np.where(positive, np.log(np.where(positive, v, 1.0)), v) for v in (m, c, p))
            den = a_m - 2 * a_c + a_p
            flat = (a_m == a_c) & (a_c == a_p)
            return np.where(den < 0, 0.5 * (a_m - a_p) / np.where(den < 0, den, -1.0), np.where(flat, 0.0, np.nan))

    def at(dy, dx):
        return sign * image[cy + dy, cx + dx].astype(float)

    c = at(0, 0)
    dx = offset(at(0, -1), c, at(0, 1))
    dy = offset(at(-1, 0), c, at(1, 0))
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


def group_max(groups: np.ndarray, values: np.ndarray, n_groups: int, valid: np.ndarray) -> np.ndarray:
    """Per group 1..n_groups, the largest valid value; -inf if none."""
    out = np.full(n_groups + 1, -np.inf)
    np.maximum.at(out, groups[valid], values[valid])
    return out[1:]


def neighbour_extrema(image: np.ndarray, pix: np.ndarray):
    """Largest and smallest of the 8 neighbours of flat pixels ``pix`` (the pixel itself
    stands in for neighbours off the image)."""
    ny, nx = image.shape
    iy, ix = pix // nx, pix % nx
    hi = np.full(pix.shape, -np.inf, np.float32)
    lo = np.full(pix.shape, np.inf, np.float32)
    for dy, dx in _NEIGHBOURS:
        v = image[np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1)]
        np.maximum(hi, v, out=hi)
        np.minimum(lo, v, out=lo)
    return hi, lo


def is_prominent(values_box: np.ndarray, inside_box: np.ndarray, row: int, col: int, drop: float) -> bool:
    """Whether the peak at (row, col) of ``values_box`` stays the highest point of its
    connected region (8-connected, within ``inside_box``) down to ``value - drop``: every path
    to higher ground descends more than ``drop`` (the peak's prominence exceeds ``drop``)."""
    from scipy import ndimage

    level = values_box[row, col] - drop
    region = inside_box & (values_box >= level)
    lab, _ = ndimage.label(region, structure=np.ones((3, 3), bool))
    return not (values_box[lab == lab[row, col]] > values_box[row, col]).any()


def deblend_peaks(sign: float, smooth: np.ndarray, noise: np.ndarray, labels: np.ndarray, slices: list,
                  cand_pix: np.ndarray, cand_fp: np.ndarray, primary_pix: np.ndarray, min_sep: float,
                  min_prominence: float):
    """Secondary peaks of one sign that become children.

    ``cand_pix``/``cand_fp``: flat indices and footprint numbers (0-based) of the candidate
    peaks (local maxima of ``sign * smooth`` at or above the threshold, primaries excluded);
    ``primary_pix``: the primary peak of each footprint (-1 where the footprint has no lobe of
    this sign). Candidates are taken from the highest down; one is kept when it lies at least
    ``min_sep`` pixels from every kept peak of its footprint and is more than ``min_prominence``
    times the matched filter's noise at it above the saddle towards any higher point of the
    footprint. Returns the kept candidates' flat indices and footprint numbers.
    """
    nx = smooth.shape[1]
    keep_pix, keep_fp = [], []
    if cand_pix.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    value = sign * smooth.ravel()[cand_pix].astype(float)
    order = np.lexsort((-value, cand_fp))
    cand_pix, cand_fp, value = cand_pix[order], cand_fp[order], value[order]
    starts = np.flatnonzero(np.r_[True, cand_fp[1:] != cand_fp[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], cand_pix.size]):
        f = int(cand_fp[a])
        if primary_pix[f] < 0:
            continue
        sy, sx = slices[f]
        box_vals = sign * smooth[sy, sx].astype(float)
        inside = labels[sy, sx] == f + 1
        kept_y = [primary_pix[f] // nx]
        kept_x = [primary_pix[f] % nx]
        for pix in cand_pix[a:b]:
            py, px = int(pix // nx), int(pix % nx)
            if min(math.hypot(px - kx, py - ky) for kx, ky in zip(kept_x, kept_y)) < min_sep:
                continue
            drop = min_prominence * float(noise[py, px])
            if not is_prominent(box_vals, inside, py - sy.start, px - sx.start, drop):
                continue
            kept_y.append(py)
            kept_x.append(px)
            keep_pix.append(int(pix))
            keep_fp.append(f)
    return np.asarray(keep_pix, np.int64), np.asarray(keep_fp, np.int64)


def pair_dipoles(pos: list, neg: list, max_dist: float):
    """Group one footprint's peaks into sources: positive and negative peaks within
    ``max_dist`` pixels are paired, closest pairs first (each peak used once); the rest stay
    single. ``pos``/``neg``: lists of (peak index, x, y). Returns a list of
    (positive peak or -1, negative peak or -1)."""
    pairs = []
    for i, (pi, px, py) in enumerate(pos):
        for j, (ni, nxx, nyy) in enumerate(neg):
            d = math.hypot(px - nxx, py - nyy)
            if d <= max_dist:
                pairs.append((d, i, j))
    pairs.sort()
    used_p, used_n, out = set(), set(), []
    for _, i, j in pairs:
        if i in used_p or j in used_n:
            continue
        used_p.add(i)
        used_n.add(j)
        out.append((pos[i][0], neg[j][0]))
    out += [(p[0], -1) for i, p in enumerate(pos) if i not in used_p]
    out += [(-1, q[0]) for j, q in enumerate(neg) if j not in used_n]
    return out


@dataclass
class Footprints:
    """Detections of a difference image: merged footprints and the sources (children) they
    were split into, one entry per source in the per-source arrays.

    Without deblending every footprint is one source. Positions are 0-based pixels (x column,
    y row); ``snr`` is the peak significance of the source's dominant lobe (the sign with the
    larger peak) over its own pixels, in sigma.
    """

    labels: np.ndarray          # (ny, nx) source number 1..count over its share of the footprint, 0 outside
    count: int                  # number of sources
    slices: list                # bounding-box slices of each source's pixels (scipy.ndimage.find_objects)
    area: np.ndarray            # pixels per source
    pixels: np.ndarray          # flat indices of all footprint pixels
    pixel_labels: np.ndarray    # their source numbers
    footprint_labels: np.ndarray  # (ny, nx) merged footprint number 1..n_footprints, 0 outside
    n_footprints: int
    parent: np.ndarray          # merged footprint (0-based) of each source
    n_children: np.ndarray      # sources made from that footprint (1: not deblended)
    smooth: np.ndarray          # the matched-filtered image
    significance: np.ndarray    # smooth / its noise, sigma
    has_pos: np.ndarray         # source has a positive lobe
    has_neg: np.ndarray         # ... a negative one
    pos_xy: tuple               # (x, y) sub-pixel peak of the positive lobe (NaN where there is none)
    neg_xy: tuple               # ... of the negative lobe
    x: np.ndarray               # centroid of the dominant lobe
    y: np.ndarray
    centroid_flag: np.ndarray   # sub-pixel refinement failed (peak on the border, not a maximum)
    snr: np.ndarray
    sign: np.ndarray            # +1 where the positive lobe dominates, -1 elsewhere
    is_negative: np.ndarray     # only a negative lobe


def share_pixels(pixels, fp_of_pixel, src_first, src_fp, n_src_of_fp, peak_pix, peak_amp, src_of_peak, nx, width):
    """Source number (1-based) of each footprint pixel: in a footprint with several sources,
    the source whose peaks have the largest Gaussian influence ``|A| exp(-r^2 / 2 width^2)``
    there (each peak pixel keeps its own source); elsewhere the footprint's one source."""
    out = src_first[fp_of_pixel] + 1
    multi = n_src_of_fp[fp_of_pixel] > 1
    if not multi.any():
        return out
    pix = pixels[multi]
    fps = fp_of_pixel[multi]
    py, px = pix // nx, pix % nx
    best = np.full(pix.size, -np.inf)
    who = out[multi].copy()
    fp_of_peak_src = src_fp[src_of_peak]
    for k in range(peak_pix.size):
        sel = fps == fp_of_peak_src[k]
        if not sel.any():
            continue
        ky, kx = peak_pix[k] // nx, peak_pix[k] % nx
        r2 = (py[sel] - ky) ** 2 + (px[sel] - kx) ** 2
        infl = np.log(max(abs(peak_amp[k]), 1e-30)) - 0.5 * r2 / width ** 2
        idx = np.flatnonzero(sel)
        better = infl > best[idx]
        best[idx[better]] = infl[better]
        who[idx[better]] = src_of_peak[k] + 1
    for k in range(peak_pix.size):
        at = np.flatnonzero(pix == peak_pix[k])
        who[at] = src_of_peak[k] + 1
    out[multi] = who
    return out


def detect_footprints(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, psf_sigma: float,
                      cfg: DiaConfig, no_deblend: np.ndarray | None = None) -> Footprints:
    """Footprints of both signs above ``cfg.threshold`` on the matched-filtered image, their
    peaks and, with ``cfg.deblend``, their children.

    Parameters
    ----------
    image, variance : numpy.ndarray
        The difference image and its variance (image unit, unit squared).
    bad : numpy.ndarray of bool
        Pixels that carry no signal (treated as 0 by the filter).
    psf_sigma : float
        Gaussian-equivalent sigma of the difference PSF, pixels (the filter width).
    cfg : DiaConfig
        ``threshold`` (sigma), ``min_area``, ``grow_footprint`` (pixels), ``deblend*``,
        ``dipole_max_separation`` (the pairing distance of opposite-sign peaks).
    no_deblend : numpy.ndarray of bool, optional
        A footprint touching (within 1 px) any of these pixels is not deblended.
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
    fp_labels, n = ndimage.label(dilate(pos | neg, cfg.grow_footprint), structure=np.ones((3, 3), bool))
    fp_slices = ndimage.find_objects(fp_labels) if n else []
    fp_idx = np.flatnonzero(fp_labels)
    fp_lab = fp_labels.ravel()[fp_idx]
    s_fp = smooth.ravel()[fp_idx].astype(float)
    sig_fp = signif.ravel()[fp_idx].astype(float)
    nb_hi, nb_lo = neighbour_extrema(smooth, fp_idx)
    keep_whole = np.zeros(n + 1, bool)
    if cfg.deblend and n and no_deblend is not None and no_deblend.any():
        touching = dilate(no_deblend, 1, "square").ravel()[fp_idx]
        keep_whole[1:] = np.bincount(fp_lab, weights=touching, minlength=n + 1)[1:] > 0

    # Peaks of each sign: the primary (highest local maximum of sign * smooth at or above the
    # threshold; failing that the highest local maximum, or the highest pixel above the
    # threshold) and, with deblending, the significant secondary peaks.
    peaks = {}
    for sign, above_img in ((1.0, pos), (-1.0, neg)):
        v = sign * s_fp
        above = above_img.ravel()[fp_idx]
        has = np.bincount(fp_lab, weights=above, minlength=n + 1)[1:] > 0
        local = (v >= (nb_hi if sign > 0 else -nb_lo)) & (v > 0)
        prim = group_argmax(fp_lab, v, n, local & above)
        for fallback in (local, above):
            missing = has & (prim < 0)
            if missing.any():
                prim = np.where(missing, group_argmax(fp_lab, v, n, fallback), prim)
        prim_pix = np.where(has & (prim >= 0), fp_idx[np.maximum(prim, 0)], -1)
        pk_pix, pk_fp = prim_pix[prim_pix >= 0], np.flatnonzero(prim_pix >= 0)
        if cfg.deblend and n:
            cand = local & above & has[fp_lab - 1] & ~keep_whole[fp_lab]
            cand &= fp_idx != prim_pix[fp_lab - 1]
            min_sep = cfg.deblend_min_separation * SIGMA_TO_FWHM * psf_sigma
            sec_pix, sec_fp = deblend_peaks(sign, smooth, noise, fp_labels, fp_slices, fp_idx[cand], fp_lab[cand] - 1,
                                            prim_pix, min_sep, cfg.deblend_min_prominence)
            pk_pix, pk_fp = np.r_[pk_pix, sec_pix], np.r_[pk_fp, sec_fp]
        px, py, pflag = subpixel_peak(smooth, pk_pix % nx, pk_pix // nx, sign)
        peaks[sign] = {"pix": pk_pix, "fp": pk_fp, "x": px, "y": py, "flag": pflag}

    # Sources: one per footprint without deblending (its primaries); with deblending one per
    # peak, positive and negative peaks within the dipole separation limit paired.
    pp, nn = peaks[1.0], peaks[-1.0]
    src_pos, src_neg, src_fp = [], [], []
    if not cfg.deblend:
        first_pos = np.full(n, -1, np.int64)
        first_neg = np.full(n, -1, np.int64)
        first_pos[pp["fp"]] = np.arange(pp["fp"].size)
        first_neg[nn["fp"]] = np.arange(nn["fp"].size)
        src_pos, src_neg, src_fp = first_pos, first_neg, np.arange(n)
    elif n:
        pair_dist = (cfg.dipole_max_separation + 1.0) * psf_sigma
        by_fp_pos = np.split(np.argsort(pp["fp"], kind="stable"), np.cumsum(np.bincount(pp["fp"], minlength=n))[:-1])
        by_fp_neg = np.split(np.argsort(nn["fp"], kind="stable"), np.cumsum(np.bincount(nn["fp"], minlength=n))[:-1])
        for f in range(n):
            ip, jn = by_fp_pos[f], by_fp_neg[f]
            if ip.size + jn.size == 1 or keep_whole[f + 1]:
                groups = [(ip[0] if ip.size else -1, jn[0] if jn.size else -1)]
            else:
                groups = pair_dipoles([(i, pp["x"][i], pp["y"][i]) for i in ip],
                                      [(j, nn["x"][j], nn["y"][j]) for j in jn], pair_dist)
            for a, b in groups:
                src_pos.append(a)
                src_neg.append(b)
                src_fp.append(f)
        src_pos, src_neg, src_fp = (np.asarray(a, np.int64) for a in (src_pos, src_neg, src_fp))
    else:
        src_pos = src_neg = src_fp = np.empty(0, np.int64)
    m = src_fp.size
    n_children = np.bincount(src_fp, minlength=n)
    src_first = np.r_[0, np.cumsum(n_children)[:-1]] if n else np.empty(0, np.int64)

    # Each source's share of its footprint's pixels.
    if cfg.deblend and m > n:
        src_ids = np.arange(m)
        peak_pix = np.r_[pp["pix"][src_pos[src_pos >= 0]], nn["pix"][src_neg[src_neg >= 0]]]
        peak_src = np.r_[src_ids[src_pos >= 0], src_ids[src_neg >= 0]]
        peak_amp = np.abs(smooth.ravel()[peak_pix].astype(float))
        src_lab = share_pixels(fp_idx, fp_lab - 1, src_first, src_fp, n_children, peak_pix, peak_amp, peak_src, nx,
                               math.sqrt(2.0) * psf_sigma)
        labels = np.zeros((ny, nx), np.int32)
        labels.ravel()[fp_idx] = src_lab
    else:
        src_lab = fp_lab
        labels = fp_labels

    has_pos, has_neg = src_pos >= 0, src_neg >= 0
    ip, jn = np.maximum(src_pos, 0), np.maximum(src_neg, 0)

    def pick(arr_p, arr_n, which_pos):
        a = arr_p[ip] if arr_p.size else np.zeros(m)
        b = arr_n[jn] if arr_n.size else np.zeros(m)
        return np.where(which_pos, a, b)

    nan = np.full(m, np.nan)
    pos_xy = (np.where(has_pos, pp["x"][ip] if pp["x"].size else nan, np.nan),
              np.where(has_pos, pp["y"][ip] if pp["y"].size else nan, np.nan))
    neg_xy = (np.where(has_neg, nn["x"][jn] if nn["x"].size else nan, np.nan),
              np.where(has_neg, nn["y"][jn] if nn["y"].size else nan, np.nan))
    pos_snr = np.where(has_pos, group_max(src_lab, sig_fp, m, np.ones(src_lab.size, bool)), 0.0)
    neg_snr = np.where(has_neg, group_max(src_lab, -sig_fp, m, np.ones(src_lab.size, bool)), 0.0)
    dominant_pos = has_pos & (~has_neg | (pos_snr >= neg_snr))
    x = pick(pp["x"], nn["x"], dominant_pos)
    y = pick(pp["y"], nn["y"], dominant_pos)
    flag = pick(pp["flag"], nn["flag"], dominant_pos).astype(bool)
    if m > n:
        log.debug("deblending: %d footprints gave %d sources", n, m)
    return Footprints(
        labels=labels, count=m, slices=ndimage.find_objects(labels, max_label=m) if m else [],
        area=np.bincount(src_lab, minlength=m + 1)[1:], pixels=fp_idx, pixel_labels=src_lab,
        footprint_labels=fp_labels, n_footprints=n, parent=src_fp, n_children=n_children[src_fp] if m else
        np.empty(0, np.int64), smooth=smooth, significance=signif, has_pos=has_pos, has_neg=has_neg,
        pos_xy=pos_xy, neg_xy=neg_xy, x=x, y=y, centroid_flag=flag,
        snr=np.where(dominant_pos, pos_snr, neg_snr).astype(float), sign=np.where(dominant_pos, 1.0, -1.0),
        is_negative=has_neg & ~has_pos,
    )
