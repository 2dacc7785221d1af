"""Where fakes go: hosts from the calexp's source table, then random good pixels.

Positions are sub-pixel, 0-based (x column, y row). A position is allowed when it is more than
``edge_margin`` px from the image edges, none of the 3x3 pixels around it carries one of
``bad_planes`` (or a non-finite value or non-positive variance) on the difference image, and it
is at least ``min_separation`` px from every other fake and from every bright star.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apsnake.fakes.config import FakesConfig
from apsnake.numerics import dilate

_TRIES_PER_FAKE = 50  # random candidates drawn per wanted fake before giving up


@dataclass
class Placement:
    """Positions of the fakes of one data ID: ``x``, ``y`` (px) and ``on_host`` (bool)."""

    x: np.ndarray
    y: np.ndarray
    on_host: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def allowed_pixels(difference, config: FakesConfig) -> np.ndarray:
    """Boolean image: pixels a fake's centre may be rounded to (see the module docstring)."""
    # 3x3: the centre pixels that decide the DIA drop rules
    ok = ~dilate(difference.bad_pixels(config.bad_planes), 1, footprint="square")
    m = int(config.edge_margin)
    ny, nx = ok.shape
    ok[:min(m + 1, ny), :] = False
    ok[max(ny - m - 1, 0):, :] = False
    ok[:, :min(m + 1, nx)] = False
    ok[:, max(nx - m - 1, 0):] = False
    return ok


def _column(src, name, default):
    if src is None or name not in src:
        return np.full(0 if src is None else len(src), default)
    values = np.asarray(src[name])
    if values.dtype == object:
        values = np.array([default if v is None else v for v in values])
    return values


def classify_sources(src, config: FakesConfig):
    """(hosts, bright): indices of the src rows that are galaxies fit to host a fake, and
    positions (N, 2) of the bright stars to keep away from.

    A source is extended when its 12-px aperture flux exceeds its (aperture-corrected) PSF flux
    by the factor ``host_min_flux_ratio`` and by 3 sigma of the aperture flux (for a star the
    ratio is 1 to a few per cent, src ``psfFlux`` being aperture corrected); the PSF-to-extended
    flux ratio is what Rubin's extendedness uses too, and unlike isophotal sizes it does not
    shrink with the source's brightness.
    """
    if src is None or len(src) == 0:
        return np.empty(0, int), np.empty((0, 2))
    x, y = _column(src, "x", np.nan).astype(float), _column(src, "y", np.nan).astype(float)
    snr = _column(src, "snr", np.nan).astype(float)
    ap, ap_err = _column(src, "apFlux", np.nan).astype(float), _column(src, "apFluxErr", np.nan).astype(float)
    psf = _column(src, "psfFlux", np.nan).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        extended = (psf > 0) & (ap >= config.host_min_flux_ratio * psf) & (ap - psf >= 3.0 * ap_err)
    finite = np.isfinite(x) & np.isfinite(y)
    flagged = np.zeros(len(x), bool)
    for name in ("pixelFlags_saturated", "pixelFlags_edge", "pixelFlags_bad", "pixelFlags_offimage"):
        flagged |= _column(src, name, False).astype(bool)
    hosts = np.flatnonzero(finite & extended & ~flagged & (snr >= config.host_min_snr))
    if config.avoid_star_snr is None:
        bright = np.zeros(len(x), bool)
    else:
        bright = ~extended & (snr >= config.avoid_star_snr)
    bright |= _column(src, "pixelFlags_saturated", False).astype(bool)
    bright &= finite
    return hosts, np.c_[x[bright], y[bright]]


class _Spacing:
    """Accepted positions and the minimum distance to keep from them and from fixed points."""

    def __init__(self, fixed: np.ndarray, min_sep: float):
        self.min_sep2 = float(min_sep) ** 2
        self.fixed = np.asarray(fixed, float).reshape(-1, 2)
        self.points: list[tuple[float, float]] = []

    def free(self, x: float, y: float) -> bool:
        if self.min_sep2 <= 0:
            return True
        for pts in (self.fixed, np.asarray(self.points).reshape(-1, 2)):
            if len(pts) and (((pts[:, 0] - x) ** 2 + (pts[:, 1] - y) ** 2) < self.min_sep2).any():
                return False
        return True

    def add(self, x: float, y: float) -> None:
        self.points.append((x, y))


def place_fakes(difference, src, config: FakesConfig, rng: np.random.Generator) -> Placement:
    """Positions of up to ``n_per_ccd`` fakes: ``round(host_fraction * n)`` near galaxy
    centroids (offset uniform within a disc of radius sqrt((ixx + iyy) / 2)), the rest uniform
    over the allowed pixels."""
    n_want = int(config.n_per_ccd)
    ok = allowed_pixels(difference, config)
    ny, nx = ok.shape
    hosts, bright = classify_sources(src, config)
    spacing = _Spacing(bright, config.min_separation)
    xs, ys, on_host = [], [], []

    def accept(x, y, host):
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        if not (0 <= ix < nx and 0 <= iy < ny and ok[iy, ix] and spacing.free(x, y)):
            return False
        spacing.add(x, y)
        xs.append(x)
        ys.append(y)
        on_host.append(host)
        return True

    n_host = int(round(config.host_fraction * n_want))
    if n_host and len(hosts):
        hx = np.asarray(src["x"], float)[hosts]
        hy = np.asarray(src["y"], float)[hosts]
        size = np.sqrt(np.clip(0.5 * (np.asarray(src["ixx"], float)[hosts] + np.asarray(src["iyy"], float)[hosts]),
                               0.0, None))
        order = rng.permutation(len(hosts))
        radius = np.sqrt(rng.random(len(hosts))) * size[order]
        angle = rng.uniform(0.0, 2 * np.pi, len(hosts))
        placed = 0
        for k, i in enumerate(order):
            if placed >= n_host:
                break
            placed += accept(hx[i] + radius[k] * np.cos(angle[k]), hy[i] + radius[k] * np.sin(angle[k]), True)
    m = int(config.edge_margin)
    if nx - 2 * m > 1 and ny - 2 * m > 1 and ok.any():
        tries = _TRIES_PER_FAKE * max(n_want, 1)
        cand_x = rng.uniform(m, nx - 1 - m, tries)
        cand_y = rng.uniform(m, ny - 1 - m, tries)
        for x, y in zip(cand_x, cand_y):
            if len(xs) >= n_want:
                break
            accept(float(x), float(y), False)
    return Placement(np.asarray(xs, float), np.asarray(ys, float), np.asarray(on_host, bool))
