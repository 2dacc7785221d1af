"""DECam instrument signature: bias, flat response, defects, cosmic rays, saturation, crosstalk.

Every number about the camera (gains, read noise, saturation, raw layout, crosstalk
coefficients and amp mirroring) comes from :mod:`apsnake.instruments.decam`; this module only
decides the *simulated* realisation (bias levels and structure, flat structure, defects).

Units: electrons (e-) before the gain, ADU after it; images are trimmed CCD frames
(4096 rows x 2048 columns) unless they are called raw (4146 x 2160).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from apsnake.instruments import decam

log = logging.getLogger(__name__)

#: Master-calibration noise: per-pixel RMS of the master bias (ADU) and flat (fraction).
MASTER_BIAS_NOISE_ADU = 0.15
MASTER_FLAT_NOISE = 0.0015
#: Ionisation by a minimum-ionising particle in silicon, e- per micron.
MIP_E_PER_UM = 80.0
#: Charge-diffusion sigma of a thick, fully depleted CCD, pixels.
DIFFUSION_SIGMA_PX = 0.4


@dataclass(frozen=True)
class AmpSignature:
    """One amplifier: camera-table electronics and the simulated header (SISPI default) values."""

    name: str
    gain: float  # e-/ADU used to make the pixels (camera table)
    read_noise_e: float  # e- (camera table)
    saturation_adu: float  # ADU above bias at full well (camera table)
    bias_base_adu: float  # bias level around which each exposure scatters
    header_gain: float
    header_read_noise: float
    header_saturation: float

    @property
    def full_well_e(self) -> float:
        return self.saturation_adu * self.gain

    @property
    def read_noise_adu(self) -> float:
        return self.read_noise_e / self.gain


@dataclass
class CcdSignature:
    """The fixed (visit-independent) signature of one CCD.

    Attributes
    ----------
    ccdnum : int
    amps : dict of AmpSignature
    geometry : dict of decam.AmpGeometry
        Raw sections of the amps (from ``decam.raw_section_keywords``).
    bias_pattern : ndarray (4096, 2048) float32
        2-D bias structure left after overscan subtraction, ADU; the master bias holds it.
    response : ndarray (4096, 2048) float32
        Relative pixel response (QE x illumination), median 1: multiplies sky and sources.
    hot_e_per_s : ndarray (4096, 2048) float32
        Dark signal of hot pixels and hot columns, e-/s (0 elsewhere).
    bpm : ndarray (4096, 2048) int16
        Bad-pixel mask: 1 hot column, 2 dead column, 4 hot pixel (0 = good).
    """

    ccdnum: int
    amps: dict
    geometry: dict
    bias_pattern: np.ndarray
    response: np.ndarray
    hot_e_per_s: np.ndarray
    bpm: np.ndarray

    def amp_of_column(self) -> np.ndarray:
        """Amp name ('A'/'B') of every trimmed column."""
        out = np.empty(decam.TRIMMED_SHAPE[1], dtype="<U1")
        for name, geo in self.geometry.items():
            out[geo.ccd.x0:geo.ccd.x1] = name
        return out

    def column_values(self, attr: str) -> np.ndarray:
        """Per-trimmed-column value of an AmpSignature attribute (float64)."""
        out = np.empty(decam.TRIMMED_SHAPE[1])
        for name, geo in self.geometry.items():
            out[geo.ccd.x0:geo.ccd.x1] = getattr(self.amps[name], attr)
        return out

    def master_flat(self) -> np.ndarray:
        """Noise-free flat in ADU units: response / gain, normalised to median 1.

        A dome flat in ADU carries the amp gain ratio, so dividing a bias-subtracted ADU image
        by it removes both the response and the amp-to-amp gain step.
        """
        f = self.response / self.column_values("gain")[None, :].astype(np.float32)
        return (f / np.median(f)).astype(np.float32)

    def flat_gain(self) -> float:
        """Effective gain (e-/ADU) of a flat-fielded image: electrons = ADU_flattened * this."""
        f = self.response / self.column_values("gain")[None, :].astype(np.float32)
        return float(1.0 / np.median(f))


def make_ccd_signature(ccdnum: int, seed: int) -> CcdSignature:
    """Draw the fixed signature of a CCD (the same for every visit and both nights)."""
    rng = np.random.default_rng([seed, 3, ccdnum])
    info = decam.ccd_info(ccdnum)
    geometry = decam.amp_geometry(decam.raw_section_keywords(ccdnum))
    amps = {}
    for name, amp in info.amps.items():
        amps[name] = AmpSignature(
            name=name, gain=amp.gain, read_noise_e=amp.read_noise, saturation_adu=amp.saturation,
            bias_base_adu=float(rng.uniform(1000.0, 3000.0)),
            header_gain=round(amp.gain * rng.uniform(1.04, 1.14), 8),
            header_read_noise=round(amp.read_noise * rng.uniform(1.05, 1.2), 8),
            header_saturation=float(round(amp.saturation * rng.uniform(0.96, 0.995))),
        )
    ny, nx = decam.TRIMMED_SHAPE
    yy = np.arange(ny, dtype=np.float32)[:, None]  # broadcast against xx: no full grids
    xx = np.arange(nx, dtype=np.float32)[None, :]

    # 2-D bias pattern: a ramp at the start of each amp's read-out (rows and columns near the
    # read-out corner), a column pattern and a faint gradient; a few ADU in all.
    pattern = np.zeros((ny, nx), dtype=np.float32)
    for name, geo in geometry.items():
        sl = geo.ccd.slices
        corner = decam.readout_corner(ccdnum, name)
        rows, cols = yy[sl[0], :], xx[:, sl[1]]
        d_row = (ny - 1 - rows) if corner[0] == "U" else rows
        d_col = (nx - 1 - cols) if corner[1] == "R" else cols
        pattern[sl] = (rng.uniform(1.5, 3.0) * np.exp(-d_row / rng.uniform(150.0, 400.0))
                       + rng.uniform(1.0, 2.5) * np.exp(-d_col / rng.uniform(15.0, 40.0))
                       + rng.uniform(-0.5, 0.5) * d_row / ny)
    pattern += rng.normal(0.0, 0.3, nx).astype(np.float32)[None, :]

    # Response: vignetting-like radial fall-off, a per-CCD tilt, tree rings, 1% pixel noise.
    fx, fy = decam.trimmed_to_focal_plane(ccdnum, xx, yy)
    large = (1.0 - 0.05 * ((fx * fx + fy * fy) / 225.0**2)).astype(np.float32)
    del fx, fy
    tilt_x, tilt_y = (np.float32(t) for t in rng.uniform(-0.01, 0.01, 2))
    large += tilt_x * (xx / nx - 0.5) + tilt_y * (yy / ny - 0.5)
    ang = rng.uniform(0, 2 * np.pi)
    ring_r = np.hypot(xx - np.float32(nx / 2 + 3000.0 * np.cos(ang)), yy - np.float32(ny / 2 + 3000.0 * np.sin(ang)))
    # tree rings: 0.2% amplitude, ~60 px period, slowly chirped
    large += np.float32(0.002) * np.sin(np.float32(2 * np.pi / 60.0) * ring_r
                                        + np.float32(0.5) * np.sin(ring_r / np.float32(300.0)))
    del ring_r
    response = rng.standard_normal((ny, nx), dtype=np.float32)
    response *= np.float32(0.01)
    response += np.float32(1.0)
    response *= large
    del large

    bpm = np.zeros((ny, nx), dtype=np.int16)
    hot = np.zeros((ny, nx), dtype=np.float32)
    for _ in range(int(rng.integers(2, 4))):  # hot columns, from a trap to the read-out edge
        c, r0 = int(rng.integers(40, nx - 40)), int(rng.integers(0, ny - 200))
        top = decam.readout_corner(ccdnum, "A")[0] == "U"
        rows = slice(r0, ny) if top else slice(0, r0 + 200)
        hot[rows, c] += rng.uniform(1.5, 5.0)
        bpm[rows, c] |= 1
    for _ in range(int(rng.integers(1, 3))):  # dead columns
        c = int(rng.integers(40, nx - 40))
        response[:, c] *= 0.15
        bpm[:, c] |= 2
    n_hot = int(rng.integers(40, 80))
    hx, hy = rng.integers(0, nx, n_hot), rng.integers(0, ny, n_hot)
    hot[hy, hx] += (10.0 ** rng.uniform(0.7, 2.5, n_hot)).astype(np.float32)
    bpm[hy, hx] |= 4
    response /= np.median(response)
    return CcdSignature(ccdnum, amps, geometry, pattern, response, hot, bpm)


def master_bias(sig: CcdSignature, rng: np.random.Generator) -> np.ndarray:
    """CP-style master bias of one night (ADU, float32): the 2-D pattern plus tiny noise."""
    return sig.bias_pattern + rng.normal(0.0, MASTER_BIAS_NOISE_ADU, sig.bias_pattern.shape).astype(np.float32)


def master_flat(sig: CcdSignature, rng: np.random.Generator) -> np.ndarray:
    """CP-style master dome flat of one night (float32, median 1) with small noise."""
    f = sig.master_flat() * (1.0 + rng.normal(0.0, MASTER_FLAT_NOISE, sig.response.shape)).astype(np.float32)
    return (f / np.median(f)).astype(np.float32)


# ---------------------------------------------------------------------------
# Per-exposure effects.
def add_cosmic_rays(image_e: np.ndarray, rng: np.random.Generator, duration_s: float) -> int:
    """Add cosmic-ray tracks (electrons) in place; returns how many.

    Rate ``decam.COSMIC_RAY_RATE_PER_CM2_MIN`` over the CCD area and ``duration_s``
    (exposure + read-out). Muons arrive with a cos^2 zenith distribution; a track of
    ``thickness * tan(theta)`` pixels carries ``MIP_E_PER_UM`` e- per micron of path (with a
    Landau-like spread), diffused by ``DIFFUSION_SIGMA_PX``. One in five events is a short,
    low-energy electron track ("worm", 1-4 px, 300-3000 e-).
    """
    ny, nx = image_e.shape
    pix_um = decam.PIXEL_SIZE_UM
    area_cm2 = nx * ny * (pix_um * 1e-4) ** 2
    n = int(rng.poisson(decam.COSMIC_RAY_RATE_PER_CM2_MIN * area_cm2 * duration_s / 60.0))
    if n == 0:
        return 0
    cos_t = rng.uniform(0.0, 1.0, n) ** 0.25
    tan_t = np.sqrt(1.0 - cos_t**2) / cos_t
    length = np.minimum(decam.CCD_THICKNESS_UM / pix_um * tan_t, 40.0)
    charge = MIP_E_PER_UM * decam.CCD_THICKNESS_UM / cos_t * rng.lognormal(0.0, 0.35, n)
    worm = rng.uniform(0, 1, n) < 0.2
    length = np.where(worm, rng.uniform(1.0, 4.0, n), length)
    charge = np.where(worm, 10.0 ** rng.uniform(2.5, 3.5, n), charge)
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    x0, y0 = rng.uniform(0, nx, n), rng.uniform(0, ny, n)
    m = np.maximum(8, (6 * length).astype(int))
    idx = np.repeat(np.arange(n), m)
    frac = rng.uniform(0.0, 1.0, idx.size)
    px = x0[idx] + frac * length[idx] * np.cos(phi[idx]) + rng.normal(0, DIFFUSION_SIGMA_PX, idx.size)
    py = y0[idx] + frac * length[idx] * np.sin(phi[idx]) + rng.normal(0, DIFFUSION_SIGMA_PX, idx.size)
    w = (charge / m)[idx] * rng.exponential(1.0, idx.size)
    ix, iy = np.rint(px).astype(np.int64), np.rint(py).astype(np.int64)
    ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    np.add.at(image_e.reshape(-1), iy[ok] * nx + ix[ok], w[ok].astype(image_e.dtype))
    return n


def saturate_and_bleed(image_e: np.ndarray, full_well_e: np.ndarray) -> int:
    """Clip pixels at the full well and bleed the excess along their column, in place.

    The excess charge of each run of over-full pixels is shared equally up and down the
    column, filling neighbouring pixels to the full well (charge leaving the CCD is lost).

    Parameters
    ----------
    image_e : ndarray (ny, nx)
        Electron image.
    full_well_e : ndarray (nx,)
        Full well of each column, e- (saturation ADU x gain of its amp).

    Returns
    -------
    int
        Number of pixels at full well afterwards.
    """
    fw_row = np.asarray(full_well_e, dtype=image_e.dtype)
    over_cols = np.nonzero((image_e > fw_row[None, :]).any(axis=0))[0]
    for c in over_cols:
        col = image_e[:, c].astype(np.float64)
        fw = float(fw_row[c])
        over = col > fw
        edges = np.diff(np.concatenate([[0], over.view(np.int8), [0]]))
        starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
        for a, b in zip(starts, ends):
            excess = float(np.sum(col[a:b] - fw))
            col[a:b] = fw
            downward = slice(a - 1, None, -1) if a > 0 else slice(0, 0)
            for part, seg in ((0.5 * excess, slice(b, None)), (0.5 * excess, downward)):
                view = col[seg]
                if view.size == 0:
                    continue
                room = np.cumsum(np.maximum(fw - view, 0.0))
                k = int(np.searchsorted(room, part))
                filled = view.copy()
                filled[:k] = np.maximum(filled[:k], fw)
                if k < view.size:
                    filled[k] += part - (room[k - 1] if k > 0 else 0.0)
                col[seg] = filled
        image_e[:, c] = col
    return int(np.count_nonzero(image_e >= fw_row[None, :]))


def apply_crosstalk(signal_adu: np.ndarray, sig: CcdSignature) -> np.ndarray:
    """Intra-CCD crosstalk: victim += coeff * mirrored(source signal), both amps (ADU).

    Uses ``decam.crosstalk_sources`` (terms whose source is this CCD) and
    ``decam.crosstalk_flips`` to mirror the source amp onto the victim's read order.
    Returns a new array; the input (signal above bias) is the source.
    """
    out = signal_adu.copy()
    for term in decam.crosstalk_sources(sig.ccdnum):
        if term.source_ccd != sig.ccdnum:
            continue
        flip_x, flip_y = decam.crosstalk_flips((sig.ccdnum, term.victim_amp), (sig.ccdnum, term.source_amp))
        src = signal_adu[sig.geometry[term.source_amp].ccd.slices]
        if flip_x:
            src = src[:, ::-1]
        if flip_y:
            src = src[::-1, :]
        out[sig.geometry[term.victim_amp].ccd.slices] += np.float32(term.coefficient) * src
    return out


def crosstalk_coefficient(ccdnum: int, victim_amp: str) -> float:
    """Intra-CCD coefficient with ``victim_amp`` as victim (0 when the table has none)."""
    for term in decam.crosstalk_sources(ccdnum):
        if term.source_ccd == ccdnum and term.victim_amp == victim_amp:
            return float(term.coefficient)
    return 0.0


@dataclass
class BiasRealisation:
    """Bias of one exposure: per-amp level and per-raw-row structure (ADU)."""

    level: dict  # amp -> mean level, ADU
    rows: dict  # amp -> (4146,) bias of each raw row (level + drift + jitter), ADU


def draw_bias(sig: CcdSignature, rng: np.random.Generator) -> BiasRealisation:
    """Per-exposure bias: level = base + N(0, 3) ADU; rows = a decaying start-of-read-out
    transient and a slow linear drift in read-out order plus N(0, 2 ADU) row jitter."""
    nrow = decam.RAW_SHAPE[0]
    level, rows = {}, {}
    order = np.arange(nrow, dtype=float)
    for name, amp in sig.amps.items():
        lev = amp.bias_base_adu + rng.normal(0.0, 3.0)
        t = order[::-1] if sig.geometry[name].readout_flip_y else order  # rows in read-out order
        drift = (rng.uniform(3.0, 8.0) * np.exp(-t / rng.uniform(100.0, 400.0))
                 + rng.uniform(-2.0, 2.0) * t / nrow)
        r = lev + drift + rng.normal(0.0, 2.0, nrow)
        level[name] = float(lev)
        rows[name] = r
    return BiasRealisation(level, rows)


def assemble_raw(sig: CcdSignature, signal_adu: np.ndarray, bias: BiasRealisation,
                 rng: np.random.Generator) -> np.ndarray:
    """Raw uint16 frame (4146 x 2160): per-amp bias rows everywhere in the amp (prescan,
    serial and parallel overscan, data), the 2-D bias pattern and the signal in the data
    section, Gaussian read noise, rounded and clipped to 0..65535."""
    raw = rng.standard_normal(decam.RAW_SHAPE, dtype=np.float32)
    for name, geo in sig.geometry.items():
        sections = [s for s in (geo.data, geo.serial_overscan, geo.prescan) if s is not None]
        x0, x1 = min(s.x0 for s in sections), max(s.x1 for s in sections)
        raw[:, x0:x1] *= np.float32(sig.amps[name].read_noise_adu)
        raw[:, x0:x1] += bias.rows[name].astype(np.float32)[:, None]
        raw[geo.data.slices] += signal_adu[geo.ccd.slices] + sig.bias_pattern[geo.ccd.slices]
    np.rint(raw, out=raw)
    np.clip(raw, 0, 65535, out=raw)
    return raw.astype(np.uint16)


def full_well_columns(sig: CcdSignature) -> np.ndarray:
    """Full well (e-) of every trimmed column."""
    return sig.column_values("full_well_e")


def gain_columns(sig: CcdSignature) -> np.ndarray:
    """Gain (e-/ADU) of every trimmed column."""
    return sig.column_values("gain")
