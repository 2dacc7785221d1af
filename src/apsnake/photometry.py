"""Photometric calibration: zero point against the reference catalogue, aperture correction.

Rubin photoCal: zp = clipped mean of (refMag - instMag) (nSigma=3, nIter=20, sigmaMax=0.25),
with colour terms when the catalogue has colours; calexp pixels in nJy, so
mag_AB = -2.5 log10(f / nJy) + 31.4 (docs/algorithms.md §2.10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apsnake.errors import ApsnakeError
from apsnake.numerics import mad_sigma

AB_NJY_ZERO_POINT = 31.4  # mag of 1 nJy


class PhotometryError(ApsnakeError, ValueError):
    """Too few usable stars for a zero point."""


@dataclass
class PhotometryConfig:
    n_sigma: float = 3.0
    n_iter: int = 20
    min_stars: int = 5
    max_ref_mag_err: float = 0.1
    min_snr: float = 10.0


@dataclass
class ZeroPoint:
    """zp: magnitude of 1 image unit (ADU); err: standard error of the mean, mag;
    scatter: clipped rms of the star residuals, mag; n_stars used."""

    zp: float
    err: float
    scatter: float
    n_stars: int
    used: np.ndarray

    @property
    def njy_per_unit(self) -> float:
        """Calibration factor: flux in nJy per image unit."""
        return float(10 ** (0.4 * (AB_NJY_ZERO_POINT - self.zp)))


def apply_colorterm(mag_primary, mag_secondary, coeffs) -> np.ndarray:
    """m_instrument = m_primary + c0 + c1 (p - s) + c2 (p - s)^2."""
    c0, c1, c2 = coeffs
    color = np.asarray(mag_primary) - np.asarray(mag_secondary)
    return np.asarray(mag_primary) + c0 + c1 * color + c2 * color**2


def fit_zero_point(inst_flux, inst_flux_err, ref_mag, ref_mag_err, config: PhotometryConfig | None = None) -> ZeroPoint:
    """Clipped weighted mean of ref_mag - inst_mag over stars (inst_flux in image units).

    Raises ``PhotometryError`` when fewer than ``min_stars`` stars survive.
    """
    config = config or PhotometryConfig()
    flux = np.asarray(inst_flux, float)
    ferr = np.asarray(inst_flux_err, float)
    ref = np.asarray(ref_mag, float)
    rerr = np.asarray(ref_mag_err, float)
    ok = (flux > 0) & np.isfinite(ref) & (flux / np.where(ferr > 0, ferr, np.inf) >= config.min_snr)
    ok &= ~(rerr > config.max_ref_mag_err)  # a star without an error (NaN) is kept ...
    rerr = np.where(np.isfinite(rerr), rerr, config.max_ref_mag_err)  # ... with the largest error allowed
    if ok.sum() < config.min_stars:
        raise PhotometryError(f"only {int(ok.sum())} stars usable for the zero point (need {config.min_stars})")
    with np.errstate(divide="ignore", invalid="ignore"):
        dm = ref - (-2.5 * np.log10(flux))
        sig = np.hypot(1.0857 * ferr / flux, rerr)
    sig = np.maximum(sig, 0.005)
    used = ok.copy()
    for _ in range(config.n_iter):
        w = 1.0 / sig[used] ** 2
        zp = float(np.sum(w * dm[used]) / np.sum(w))
        resid = dm - zp
        scatter = mad_sigma(resid[used])
        scatter = max(scatter, 1e-4)
        new = ok & (np.abs(resid) <= config.n_sigma * np.hypot(scatter, sig))
        if new.sum() < config.min_stars or np.array_equal(new, used):
            break
        used = new
    w = 1.0 / sig[used] ** 2
    zp = float(np.sum(w * dm[used]) / np.sum(w))
    rms = float(np.std(dm[used] - zp, ddof=1)) if used.sum() > 1 else 0.0
    err = float(max(rms / np.sqrt(used.sum()), np.sqrt(1.0 / np.sum(w))))
    return ZeroPoint(zp=zp, err=err, scatter=rms, n_stars=int(used.sum()), used=used)


@dataclass
class ApertureCorrection:
    """Ratio of the large-aperture flux to the PSF flux of stars, a plane across the CCD:
    c(x, y) = c0 + c1 u + c2 v with u, v the pixel position scaled by ``scale``."""

    coeffs: np.ndarray
    x0: float
    y0: float
    scale: float
    scatter: float
    n_stars: int

    def __call__(self, x, y) -> np.ndarray:
        u = (np.asarray(x, float) - self.x0) / self.scale
        v = (np.asarray(y, float) - self.y0) / self.scale
        return self.coeffs[0] + self.coeffs[1] * u + self.coeffs[2] * v

    #: Header keywords of the plane in an Exposure's metadata (8 characters, FITS-safe).
    KEYS = ("APCORR0", "APCORR1", "APCORR2", "APCORX0", "APCORY0", "APCORSCL")

    def to_metadata(self) -> dict:
        """The plane as Exposure metadata cards (written to the calexp header)."""
        values = (*map(float, self.coeffs), self.x0, self.y0, self.scale)
        return dict(zip(self.KEYS, values))

    @classmethod
    def from_metadata(cls, metadata: dict) -> ApertureCorrection | None:
        """The plane stored by ``to_metadata``, or None when the exposure has none."""
        if not all(k in metadata for k in cls.KEYS):
            return None
        c0, c1, c2, x0, y0, scale = (float(metadata[k]) for k in cls.KEYS)
        return cls(np.array([c0, c1, c2]), x0, y0, scale, float("nan"), 0)


def fit_aperture_correction(x, y, psf_flux, ap_flux, shape, n_sigma: float = 4.0, n_iter: int = 4) -> ApertureCorrection:
    """Fit ap_flux / psf_flux of PSF stars with a clipped plane (Rubin: 4 iterations, 4 sigma;
    a constant when fewer than 20 stars)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(ap_flux, float) / np.asarray(psf_flux, float)
    ok = np.isfinite(ratio) & (ratio > 0.5) & (ratio < 2.0)
    ny, nx = shape
    x0, y0, scale = nx / 2.0, ny / 2.0, max(nx, ny) / 2.0
    if ok.sum() == 0:
        return ApertureCorrection(np.array([1.0, 0.0, 0.0]), x0, y0, scale, float("nan"), 0)

    def fit(used):
        if used.sum() >= 20:
            design = np.column_stack([np.ones(used.sum()), (x[used] - x0) / scale, (y[used] - y0) / scale])
            return np.linalg.lstsq(design, ratio[used], rcond=None)[0]
        return np.array([np.median(ratio[used]), 0.0, 0.0])

    def scatter_about(coeffs, used):
        # The residuals of a fitted plane are centred on 0 by construction: their MAD about 0.
        resid = ratio - ApertureCorrection(coeffs, x0, y0, scale, 0.0, 0)(x, y)
        return resid, 1.4826 * float(np.median(np.abs(resid[used])))

    coeffs = fit(ok)
    for _ in range(n_iter):
        resid, scatter = scatter_about(coeffs, ok)
        new = ok & (np.abs(resid) <= n_sigma * max(scatter, 1e-4))
        if np.array_equal(new, ok) or new.sum() < 3:
            break
        ok = new
        coeffs = fit(ok)  # the plane always comes from the stars it reports
    scatter = scatter_about(coeffs, ok)[1]
    return ApertureCorrection(np.asarray(coeffs, float), x0, y0, scale, float(scatter), int(ok.sum()))


def aperture_correction_at(exposure, x, y) -> np.ndarray:
    """An exposure's aperture correction (large-aperture / PSF flux of its stars, stored in
    its metadata by calibration) at pixel positions (x, y); 1 where it has none (no
    exposure, or a file from before aperture corrections)."""
    correction = ApertureCorrection.from_metadata(exposure.metadata) if exposure is not None else None
    if correction is None:
        return np.ones(np.shape(x))
    return np.asarray(correction(x, y), float)
