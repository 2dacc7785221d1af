"""Instrument signature removal: one raw DECam CCD -> a postISR Exposure (ADU).

Rubin's DECam ISR order and defaults (docs/algorithms.md §1; obs_decam config/isr.py):
saturation mask on raw counts -> serial overscan per row -> crosstalk (before assembly) ->
assemble and trim -> bias -> variance -> linearity -> defects, edge, widened saturation
trails -> flat -> interpolation over BAD and SAT. The image stays in ADU and the variance
in ADU^2 (``doApplyGains=False``).

Every step is a function on numpy arrays; ``run_isr`` chains them. DECam facts (gains,
saturation, sections, crosstalk coefficients) come from ``apsnake.instruments.decam``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from apsnake.errors import ApsnakeError
from apsnake.instruments import decam
from apsnake.numerics import clipped_mean, dilate

log = logging.getLogger(__name__)


class IsrInputError(ApsnakeError, ValueError):
    """Bad ISR input (raw or calibration); the message names the data ID, file and problem."""


@dataclass
class IsrConfig:
    """ISR options with Rubin's DECam defaults (the ``isr`` section of config.yaml).

    overscan_clip_sigma: clipping of each overscan row around its median, in units of
        0.74 * IQR (Rubin ``numSigmaClip=3``).
    num_edge_suspect: CCD border flagged SUSPECT, pixels (``numEdgeSuspect=35``).
    crosstalk_min_pixel_to_mask: source level (ADU, overscan-subtracted) above which the
        victim pixel gets CROSSTALK (``minPixelToMask=45000``).
    grow_saturation: SAT footprints grown by this many pixels before interpolation.
    saturation_source: 'camera' (camera-table values, our choice) or 'header' (SATURATA/B).
    crosstalk: correct crosstalk (intra-CCD always, inter-CCD when the source CCD is in the raw).
    linearity: path of the CP linearity table (lookup-table form), or None for no correction.
    """

    overscan_clip_sigma: float = 3.0
    num_edge_suspect: int = decam.NUM_EDGE_SUSPECT
    crosstalk: bool = True
    linearity: str | None = None
    crosstalk_min_pixel_to_mask: float = decam.CROSSTALK_MIN_PIXEL_TO_MASK
    do_widen_saturation_trails: bool = True
    grow_saturation: int = 1
    do_interpolate: bool = True
    saturation_source: str = "camera"


# ---------------------------------------------------------------------------
# Overscan.
def _row_quantiles(data: np.ndarray, quantiles) -> list[np.ndarray]:
    """Quantiles of the finite values of each row (linear interpolation, as np.percentile);
    NaN for rows without a finite value. One sort instead of a per-row loop."""
    ordered = np.sort(data, axis=1)  # NaNs go last
    count = np.isfinite(ordered).sum(axis=1)
    rows = np.arange(data.shape[0])
    out = []
    for q in quantiles:
        pos = q * np.maximum(count - 1, 0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
        frac = pos - lo
        value = ordered[rows, lo] * (1 - frac) + ordered[rows, hi] * frac
        out.append(np.where(count > 0, value, np.nan))
    return out


def fit_overscan_rows(overscan: np.ndarray, bad: np.ndarray | None = None, clip_sigma: float = 3.0,
                      fill_window: int = 5) -> tuple[np.ndarray, float]:
    """Per-row clipped median of a serial-overscan strip (Rubin MEDIAN_PER_ROW).

    Parameters
    ----------
    overscan : (rows, cols) array, ADU.
    bad : same shape, True for pixels to ignore (SAT/BAD).
    clip_sigma : rejection threshold in units of the row's robust sigma (0.74 * IQR).
    fill_window : rows with no usable pixel take the median level of the rows within
        +/- this many rows.

    Returns
    -------
    level : (rows,) overscan level per row, ADU.
    noise : robust standard deviation of the overscan residual, ADU (the empirical read
        noise in ADU).
    """
    data = np.asarray(overscan, dtype=np.float64).copy()
    if bad is not None:
        data[bad] = np.nan
    q25, med, q75 = _row_quantiles(data, (0.25, 0.5, 0.75))
    sigma = 0.7413 * (q75 - q25)
    finite_sigma = sigma[np.isfinite(sigma)]
    typical = float(np.median(finite_sigma)) if finite_sigma.size else 1.0
    # A row whose scatter is more than twice the typical one is not trusted for clipping.
    sigma = np.where(~(sigma <= 2 * typical), typical, sigma)
    sigma = np.where(sigma > 0, sigma, typical if typical > 0 else 1.0)
    with np.errstate(invalid="ignore"):
        keep = np.abs(data - med[:, None]) <= clip_sigma * sigma[:, None]
    (level,) = _row_quantiles(np.where(keep, data, np.nan), (0.5,))
    missing = ~np.isfinite(level)
    if missing.all():
        raise ValueError("overscan has no usable pixel")
    if missing.any():
        idx = np.flatnonzero(missing)
        good = np.flatnonzero(~missing)
        for i in idx:
            near = good[np.abs(good - i) <= fill_window]
            level[i] = np.median(level[near]) if near.size else level[good[np.argmin(np.abs(good - i))]]
    residual = (data - level[:, None])[keep]
    # Clipped standard deviation rather than the IQR: raw counts are integers, and with a
    # read noise of ~1.5 ADU the IQR is quantised (always 2 ADU); the standard deviation
    # includes the quantisation noise, which is real pixel noise too.
    noise = float(np.std(residual))
    for _ in range(3):
        residual = residual[np.abs(residual) <= clip_sigma * noise]
        noise = float(np.std(residual))
    return level.astype(np.float32), noise


# ---------------------------------------------------------------------------
# Crosstalk.
def crosstalk_correct(amp_images: dict[tuple[int, str], np.ndarray],
                      sources: dict[tuple[int, str], np.ndarray],
                      terms, min_pixel_to_mask: float) -> dict[tuple[int, str], np.ndarray]:
    """Subtract crosstalk from victim amps in place: ``V -= x * flip(S)``.

    Parameters
    ----------
    amp_images : victim amp data sections (overscan-subtracted ADU, raw orientation),
        keyed by (CCDNUM, amp). Modified in place.
    sources : source amp data sections keyed the same way (may include the victims
        themselves; values must be the *uncorrected* overscan-subtracted images).
    terms : iterable of ``decam.CrosstalkTerm``.
    min_pixel_to_mask : source level (ADU) above which the victim pixel is flagged.

    Returns
    -------
    dict (CCDNUM, amp) -> boolean CROSSTALK mask for each victim amp.
    """
    masks = {key: np.zeros(img.shape, bool) for key, img in amp_images.items()}
    for term in terms:
        victim, source = (term.victim_ccd, term.victim_amp), (term.source_ccd, term.source_amp)
        if victim not in amp_images or source not in sources:
            continue
        src = sources[source]
        flip_x, flip_y = decam.crosstalk_flips(victim, source)
        if flip_x:
            src = src[:, ::-1]
        if flip_y:
            src = src[::-1, :]
        amp_images[victim] -= np.float32(term.coefficient) * src
        masks[victim] |= src > min_pixel_to_mask
    return masks


# ---------------------------------------------------------------------------
# Saturation trails, interpolation.
def _row_runs(mask: np.ndarray):
    """Start (inclusive) and end (exclusive) column of every horizontal run of True, per row."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    rows, starts = np.nonzero(diff == 1)
    _, ends = np.nonzero(diff == -1)
    return rows, starts, ends  # np.nonzero is row-major, so starts and ends pair up


def widen_saturation_trails(sat: np.ndarray) -> np.ndarray:
    """Grow each horizontal run of SAT pixels on both sides by 0/1/3/4 px for runs of
    width 1-5/6-7/8-9/>=10 (Rubin ``widenSaturationTrails``): wide bleed columns spill
    charge sideways."""
    rows, starts, ends = _row_runs(sat)
    width = ends - starts
    grow = np.select([width >= 10, width >= 8, width >= 6], [4, 3, 1], default=0)
    sel = grow > 0
    out = sat.copy()
    if not sel.any():
        return out
    # Only the rows holding a widened run (a few hundred of 4096) are touched.
    ncol = sat.shape[1]
    touched, row_index = np.unique(rows[sel], return_inverse=True)
    diff = np.zeros((touched.size, ncol + 1), np.int32)
    np.add.at(diff, (row_index, np.clip(starts[sel] - grow[sel], 0, ncol)), 1)
    np.add.at(diff, (row_index, np.clip(ends[sel] + grow[sel], 0, ncol)), -1)
    out[touched] |= np.cumsum(diff, axis=1, dtype=np.int32)[:, :ncol] > 0
    return out


def interpolate_rows(image: np.ndarray, bad: np.ndarray, fallback: float) -> np.ndarray:
    """Replace bad pixels by linear interpolation along the row between the nearest good
    pixels on either side (a run touching the edge takes its one good neighbour); rows
    with no good pixel take ``fallback``. Returns a new array."""
    out = np.array(image, dtype=np.float32, copy=True)
    rows, starts, ends = _row_runs(bad)
    if rows.size == 0:
        return out
    ncol = image.shape[1]
    # Every bad pixel lies in a maximal run [start, end) of its row: its nearest good
    # neighbours are columns start - 1 and end (-1 and ncol when the run touches an edge).
    length = ends - starts
    r = np.repeat(rows, length)
    first = np.repeat(np.cumsum(length) - length, length)
    c = np.repeat(starts, length) + (np.arange(r.size) - first)
    lc, rc = np.repeat(starts - 1, length), np.repeat(ends, length)
    has_l, has_r = lc >= 0, rc < ncol
    lv = out[r, np.clip(lc, 0, ncol - 1)]
    rv = out[r, np.clip(rc, 0, ncol - 1)]
    both = has_l & has_r
    frac = np.where(both, (c - lc) / np.maximum(rc - lc, 1), 0.0)
    value = np.where(both, lv + frac * (rv - lv), np.where(has_l, lv, np.where(has_r, rv, fallback)))
    out[r, c] = value
    return out


# ---------------------------------------------------------------------------
# Linearity (DECam lookup-table form).
def linearize(image: np.ndarray, table: np.ndarray, amp_columns: dict[str, slice]) -> np.ndarray:
    """Apply a DECam lookup-table linearizer in place: ``pix += table[amp, int(pix)]``.

    table : (2, N) offsets in ADU, row 0 = amp A, row 1 = amp B (obs_decam convention,
        ``ADU_LINEAR_<amp> - ADU``); indices are clipped to [0, N-1].
    amp_columns : amp name -> column slice of the trimmed image.
    """
    for row, amp in enumerate(decam.AMP_NAMES):
        sub = image[:, amp_columns[amp]]
        index = np.clip(np.nan_to_num(sub, nan=0.0), 0, table.shape[1] - 1).astype(np.int64)
        sub += table[row][index].astype(np.float32)
    return image


# ---------------------------------------------------------------------------
@dataclass
class IsrResult:
    """The postISR Exposure and the numbers worth recording next to it."""

    exposure: object  # apsnake.exposure.Exposure
    metadata: dict = field(default_factory=dict)


def _check_calibration(name: str, array, data_id: str, path: str) -> np.ndarray:
    if array is None:
        raise IsrInputError(f"{data_id}: missing {name} calibration")
    array = np.asarray(array, dtype=np.float32)
    if array.shape != decam.TRIMMED_SHAPE:
        raise IsrInputError(f"{data_id}: {name} {path} has shape {array.shape}, expected {decam.TRIMMED_SHAPE}")
    if not np.all(np.isfinite(array)):
        raise IsrInputError(f"{data_id}: {name} {path} contains non-finite values")
    return array


def run_isr(raw, bias, flat, bpm=None, crosstalk_source_ccds=None, linearity=None,
            config: IsrConfig | None = None, calib_paths: dict | None = None, flat_band: str | None = None):
    """Instrument signature removal of one raw DECam CCD.

    Parameters
    ----------
    raw : ``instruments.decam_files.RawCcd`` (uint16 ADU in the raw frame, headers).
    bias : (4096, 2048) master bias, ADU (after overscan subtraction, as CP makes it).
    flat : (4096, 2048) master dome flat, normalised (dimensionless).
    bpm : (4096, 2048) bad-pixel mask, nonzero = bad; None for no defects.
    crosstalk_source_ccds : other CCDs of the same raw file (``RawCcd``) that are
        crosstalk sources for this one (inter-CCD terms); intra-CCD terms always apply.
    linearity : (2, N) DECam lookup table (ADU offsets) or None for no linearity correction.
    config : ``IsrConfig``.
    calib_paths : names of the calibration files, for messages and metadata.
    flat_band : band of the flat; must match the exposure's band.

    Returns
    -------
    IsrResult with the Exposure (image ADU, variance ADU^2, mask, trimmed-frame WCS,
    visit info) and metadata (overscan level/noise per amp, counts, time).
    """
    from apsnake.exposure import Exposure

    config = config or IsrConfig()
    calib_paths = calib_paths or {}
    t0 = time.perf_counter()
    ccdnum = raw.ccdnum
    header = raw.primary_header.copy()
    header.update(raw.header)
    info = decam.translate_header(header)
    data_id = f"data ID (visit={info.visit}, detector={ccdnum})"
    ccd = decam.ccd_info(ccdnum)
    bias = _check_calibration("bias", bias, data_id, calib_paths.get("bias", ""))
    flat = _check_calibration("flat", flat, data_id, calib_paths.get("flat", ""))
    if flat_band is not None and flat_band != info.band:
        raise IsrInputError(f"{data_id}: flat {calib_paths.get('flat', '')} is for band {flat_band}, "
                            f"the exposure is {info.band}")
    if np.any(flat <= 0):
        raise IsrInputError(f"{data_id}: flat {calib_paths.get('flat', '')} has non-positive pixels")
    if not np.issubdtype(raw.data.dtype, np.integer) and not np.all(np.isfinite(raw.data)):
        raise IsrInputError(f"{data_id}: raw {raw.path} CCD {ccdnum} contains NaN pixels")

    try:
        geoms = decam.amp_geometry(raw.header)
    except (KeyError, ValueError) as err:
        raise IsrInputError(f"{data_id}: raw {raw.path}: {err}") from None
    bad_amps = set(decam.BAD_AMPS.get(ccdnum, ()))

    raw_f = raw.data.astype(np.float32)
    meta: dict = {"visit": info.visit, "detector": ccdnum, "raw": str(raw.path), "amps": {}}

    # 1. Saturation on raw counts, per amp.
    sat_raw = np.zeros(raw_f.shape, bool)
    for amp, geom in geoms.items():
        level = ccd.amps[amp].saturation
        if config.saturation_source == "header":
            level = float(raw.header.get(f"SATURAT{amp}", level))
        region = geom.data.slices
        sat_raw[region] = raw_f[region] >= level
        # the overscan pixels of saturated rows can carry charge too; mask them for the fit
        sat_raw[geom.serial_overscan.slices] = raw_f[geom.serial_overscan.slices] >= level

    # 2. Overscan, per amp and row; 3. crosstalk on the overscan-subtracted amp images.
    amp_images: dict[tuple[int, str], np.ndarray] = {}
    for amp, geom in geoms.items():
        os_rows = geom.serial_overscan
        try:
            level, noise = fit_overscan_rows(raw_f[os_rows.slices], sat_raw[os_rows.slices],
                                             config.overscan_clip_sigma)
        except ValueError as err:
            if amp in bad_amps:
                level, noise = np.zeros(os_rows.shape[0], np.float32), float("nan")
            else:
                raise IsrInputError(f"{data_id}: raw {raw.path} amp {amp}: {err}") from None
        if os_rows.y0 != geom.data.y0 or os_rows.shape[0] != geom.data.shape[0]:
            raise IsrInputError(f"{data_id}: raw {raw.path} amp {amp}: overscan rows do not match data rows")
        amp_images[(ccdnum, amp)] = raw_f[geom.data.slices] - level[:, None]
        gain = ccd.amps[amp].gain
        meta["amps"][amp] = {
            "overscan_level_adu": float(np.median(level)),
            "overscan_noise_adu": noise,
            "read_noise_e": noise * gain,
            "gain_e_per_adu": gain,
        }
    xtalk_masks = {}
    if config.crosstalk:
        sources = {k: v.copy() for k, v in amp_images.items()}
        for other in crosstalk_source_ccds or []:
            ogeoms = decam.amp_geometry(other.header)
            odata = other.data.astype(np.float32)
            for amp, geom in ogeoms.items():
                lvl, _ = fit_overscan_rows(odata[geom.serial_overscan.slices], None, config.overscan_clip_sigma)
                sources[(other.ccdnum, amp)] = odata[geom.data.slices] - lvl[:, None]
        terms = decam.crosstalk_sources(ccdnum)
        xtalk_masks = crosstalk_correct(amp_images, sources, terms, config.crosstalk_min_pixel_to_mask)
        meta["crosstalk_terms"] = sum(
            1 for t in terms if (t.source_ccd, t.source_amp) in sources
        )

    # 4. Assemble and trim.
    shape = decam.TRIMMED_SHAPE
    image = np.empty(shape, np.float32)
    sat = np.zeros(shape, bool)
    crosstalk = np.zeros(shape, bool)
    gain_map = np.empty(shape[1], np.float32)  # per column: amps split the CCD in x
    rn_map = np.empty(shape[1], np.float32)
    amp_columns = {}
    for amp, geom in geoms.items():
        dest = geom.ccd.slices
        image[dest] = amp_images[(ccdnum, amp)]
        sat[dest] = sat_raw[geom.data.slices]
        if (ccdnum, amp) in xtalk_masks:
            crosstalk[dest] = xtalk_masks[(ccdnum, amp)]
        gain = ccd.amps[amp].gain
        rn = meta["amps"][amp]["read_noise_e"]
        if not np.isfinite(rn) or rn <= 0:
            rn = ccd.amps[amp].read_noise  # camera table as fallback
        gain_map[dest[1]] = gain
        rn_map[dest[1]] = rn
        amp_columns[amp] = dest[1]
    del raw_f, amp_images

    # 5. Bias.
    image -= bias
    # 6. Variance (ADU^2), before linearity and flat, as Rubin does.
    variance = image / gain_map + (rn_map / gain_map) ** 2
    # 7. Linearity.
    if linearity is not None:
        linearize(image, np.asarray(linearity, np.float32), amp_columns)

    exposure = Exposure.empty(shape, info, ccdnum, detector_name=ccd.name, unit="adu")
    exposure.image, exposure.variance = image, variance
    # 8. Defects, bad amps, edge, saturation (grown, trails widened), crosstalk.
    bad = np.zeros(shape, bool) if bpm is None else (np.asarray(bpm) != 0)
    if bpm is not None and np.asarray(bpm).shape != shape:
        raise IsrInputError(f"{data_id}: BPM {calib_paths.get('bpm', '')} has shape {np.asarray(bpm).shape}")
    for amp in geoms:
        cols = amp_columns[amp]
        if amp in bad_amps or bad[:, cols].all() or sat[:, cols].all():
            bad[:, cols] = True
            meta["amps"][amp]["bad_amp"] = True
    exposure.set_mask("BAD", bad)
    edge = np.zeros(shape, bool)
    n = config.num_edge_suspect
    if n > 0:
        edge[:n, :] = edge[-n:, :] = True
        edge[:, :n] = edge[:, -n:] = True
    exposure.set_mask("SUSPECT", edge)
    if config.do_widen_saturation_trails:
        sat = widen_saturation_trails(sat)
    exposure.set_mask("SAT", sat)
    exposure.set_mask("CROSSTALK", crosstalk)

    # 11. Flat field (variance / flat^2).
    image /= flat
    variance /= flat * flat
    nonpositive = ~(variance > 0)
    exposure.set_mask("BAD", nonpositive)

    # 14. Interpolate over BAD and SAT (SAT grown first); whole bad rows take MEANCLIP.
    n_interp = 0
    if config.do_interpolate:
        to_fix = exposure.mask_of("BAD") | dilate(sat, config.grow_saturation, "square")
        good_pixels = image[~to_fix]
        fallback = clipped_mean(good_pixels[:: max(1, good_pixels.size // 200_000)])
        fallback = fallback if np.isfinite(fallback) else 0.0
        amp_dead = np.zeros(shape, bool)
        for amp in geoms:
            if meta["amps"][amp].get("bad_amp"):
                amp_dead[:, amp_columns[amp]] = True
        # A dead amplifier is filled with the clipped mean (Rubin setBadRegions), not interpolated.
        image[amp_dead] = fallback
        interp = to_fix & ~amp_dead
        exposure.image = interpolate_rows(image, interp, fallback)
        exposure.set_mask("INTRP", interp)
        n_interp = int(interp.sum())
    exposure.variance = np.where(np.isfinite(exposure.variance), exposure.variance, 0.0).astype(np.float32)

    # WCS: the header TPV shifted from raw to trimmed pixel coordinates.
    try:
        wcs = decam.raw_wcs(raw.header)
        ox, oy = decam.trimmed_offset(ccdnum)
        wcs.wcs.crpix = wcs.wcs.crpix - np.array([ox, oy])
        exposure.wcs = wcs
    except Exception as err:  # no usable header WCS: calibration will have to find one
        log.warning("%s: raw header WCS unusable (%s)", data_id, err)

    meta.update({
        "n_saturated": int(exposure.mask_of("SAT").sum()),
        "n_bad": int(exposure.mask_of("BAD").sum()),
        "n_crosstalk_masked": int(crosstalk.sum()),
        "n_interpolated": n_interp,
        "calibrations": {k: str(v) for k, v in calib_paths.items()},
        "linearity": linearity is not None,
        "isr_seconds": round(time.perf_counter() - t0, 3),
    })
    exposure.metadata.update({
        "ISR_TIME": meta["isr_seconds"], "ISR_NSAT": meta["n_saturated"], "ISR_NINT": n_interp,
        **{f"OSLEV_{a}": m["overscan_level_adu"] for a, m in meta["amps"].items()},
        **{f"OSRMS_{a}": m["overscan_noise_adu"] for a, m in meta["amps"].items()},
    })
    log.info("%s: ISR done in %.2f s (overscan noise %s ADU, %d SAT, %d interpolated)", data_id,
             meta["isr_seconds"], {a: round(m["overscan_noise_adu"], 2) for a, m in meta["amps"].items()},
             meta["n_saturated"], n_interp)
    return IsrResult(exposure, meta)
