"""Render point sources and galaxies into an electron image with a spatially varying Moffat PSF.

Sources are drawn into small stamps whose size grows with brightness and seeing, batched by
stamp size and evaluated with numpy (no per-pixel Python loop), then added to the image with
``np.add.at``. The PSF is a Moffat integrated over the pixel (2x2 sub-samples); galaxies
(Sersic profiles) are convolved with the local PSF by FFT on a 3x oversampled grid and
integrated over pixels, in batches.

Pixel coordinates are 0-based trimmed CCD coordinates (x = column, y = row); fluxes are
electrons in the exposure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from apsnake.instruments import decam

#: Stamp half-sizes (pixels); a stamp is 2*half x 2*half with the source near its centre.
STAMP_HALVES = (8, 12, 16, 24, 32, 48, 64)
#: Sub-pixels per pixel axis on which galaxies are drawn and convolved before being summed
#: into pixels: a Sersic core sampled only at pixel centres changes shape with the sub-pixel
#: position (3-4 % of the flux of an n = 4 galaxy moves between visits), which no real sky does
#: and which a difference image would show as residuals at every galaxy.
GALAXY_OVERSAMPLING = 3
#: Surface brightness (e-/pixel) at which a stamp may be cut (well below the sky noise).
STAMP_THRESHOLD_E = 0.3
#: Focal-plane radius (mm) normalising the PSF variation.
_FP_RADIUS_MM = 225.0


@dataclass(frozen=True)
class PsfField:
    """Moffat PSF of one visit on one CCD, varying smoothly over the focal plane.

    FWHM(r) = fwhm_arcsec * (1 + 0.08 ((r / 225 mm)^2 - 0.5)), i.e. a few per cent across a
    CCD, and a radial ellipticity 0.03 (r / 225 mm)^2 on top of the visit ellipticity (e1, e2).

    Attributes
    ----------
    ccdnum : int
    fwhm_arcsec : float
        Visit seeing (the value at r ~ 160 mm, i.e. about the median over the focal plane).
    beta : float
        Moffat index.
    e1, e2 : float
        Visit-wide ellipticity components ((a-b)/(a+b) convention, pixel axes).
    """

    ccdnum: int
    fwhm_arcsec: float
    beta: float
    e1: float
    e2: float

    def shape_at(self, x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, theta): Moffat major/minor core radii (pixels) and major-axis angle (rad, from +x)."""
        fx, fy = decam.trimmed_to_focal_plane(self.ccdnum, x, y)
        r2 = (fx * fx + fy * fy) / _FP_RADIUS_MM**2
        fwhm_px = self.fwhm_arcsec / (decam.RAW_WCS_CD_DEG * 3600.0) * (1.0 + 0.08 * (r2 - 0.5))
        phi = np.arctan2(fy, fx)
        e1 = self.e1 + 0.03 * r2 * np.cos(2 * phi)
        e2 = self.e2 + 0.03 * r2 * np.sin(2 * phi)
        e = np.clip(np.hypot(e1, e2), 0.0, 0.5)
        theta = 0.5 * np.arctan2(e2, e1)
        alpha = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))
        q = (1.0 - e) / (1.0 + e)
        return alpha / np.sqrt(q), alpha * np.sqrt(q), theta

    def fwhm_at(self, x, y) -> np.ndarray:
        """Geometric-mean FWHM (arcsec) at trimmed pixel positions."""
        a, b, _ = self.shape_at(x, y)
        return np.sqrt(a * b) * 2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0) * decam.RAW_WCS_CD_DEG * 3600.0


def _stamp_half(alpha, peak, beta, extra=0.0):
    """Smallest stamp half-size reaching ``STAMP_THRESHOLD_E`` (and at least 3.5 alpha)."""
    x = np.sqrt(np.maximum((np.maximum(peak, 1e-9) / STAMP_THRESHOLD_E) ** (1.0 / beta) - 1.0, 0.0))
    need = np.hypot(np.maximum(x, 3.5) * alpha, extra)
    halves = np.asarray(STAMP_HALVES)
    idx = np.minimum(np.searchsorted(halves, need), len(halves) - 1)
    return halves[idx]


def _grid(n, half, cx, cy):
    """Pixel-centre offsets (n, S, S) of a stamp around integer centres, minus sub-pixel positions."""
    g = np.arange(-half, half, dtype=np.float32)
    dx = g[None, None, :] - cx[:, None, None].astype(np.float32)
    dy = g[None, :, None] - cy[:, None, None].astype(np.float32)
    return dx, dy


def _moffat(dx, dy, a, b, theta, beta):
    c = np.cos(theta).astype(np.float32)[:, None, None]
    s = np.sin(theta).astype(np.float32)[:, None, None]
    u = dx * c + dy * s
    v = -dx * s + dy * c
    q = (u / a.astype(np.float32)[:, None, None]) ** 2 + (v / b.astype(np.float32)[:, None, None]) ** 2
    return (1.0 + q) ** np.float32(-beta)


def _moffat_pixel(dx, dy, a, b, theta, beta):
    """Moffat integrated over each pixel (mean of a 2x2 sub-pixel grid)."""
    q = np.float32(0.25)
    total = _moffat(dx - q, dy - q, a, b, theta, beta)
    for sx, sy in ((q, -q), (-q, q), (q, q)):
        total += _moffat(dx + sx, dy + sy, a, b, theta, beta)
    return np.float32(0.25) * total


def _add_stamps(image, ix, iy, half, stamps):
    """Add (n, S, S) stamps whose pixel (half, half) lands on image pixel (iy, ix)."""
    ny, nx = image.shape
    g = np.arange(-half, half)
    cols = ix[:, None] + g[None, :]  # (n, S)
    rows = iy[:, None] + g[None, :]
    ok = (rows[:, :, None] >= 0) & (rows[:, :, None] < ny) & (cols[:, None, :] >= 0) & (cols[:, None, :] < nx)
    flat = rows[:, :, None] * nx + cols[:, None, :]
    np.add.at(image.reshape(-1), flat[ok], stamps[ok].astype(image.dtype))


def render_points(image: np.ndarray, x, y, flux_e, psf: PsfField) -> None:
    """Add point sources (electrons ``flux_e``) at trimmed positions (x, y) to ``image`` in place.

    Each stamp is normalised to the flux inside it, ``flux_e * (1 - wing)``, where ``wing`` is
    the Moffat flux beyond the stamp's half-size (negligible by construction).
    """
    x, y, flux_e = (np.asarray(v, dtype=float) for v in (x, y, flux_e))
    if x.size == 0:
        return
    a, b, theta = psf.shape_at(x, y)
    alpha = np.sqrt(a * b)
    peak = flux_e * (psf.beta - 1.0) / (np.pi * alpha**2)
    halves = _stamp_half(alpha, peak, psf.beta)
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    for half in np.unique(halves):
        sel = np.nonzero(halves == half)[0]
        dx, dy = _grid(len(sel), half, x[sel] - ix[sel], y[sel] - iy[sel])
        st = _moffat_pixel(dx, dy, a[sel], b[sel], theta[sel], psf.beta)
        wing = (1.0 + (half / alpha[sel]) ** 2) ** (1.0 - psf.beta)
        st *= ((flux_e[sel] * (1.0 - wing)) / st.sum(axis=(1, 2), dtype=np.float64)).astype(np.float32)[:, None, None]
        _add_stamps(image, ix[sel], iy[sel], half, st)


def _sersic_b(n):
    return 2.0 * n - 1.0 / 3.0 + 0.009876 / n


def render_galaxies(image: np.ndarray, x, y, flux_e, r_half_px, sersic_n, axis_ratio, theta, psf: PsfField) -> None:
    """Add Sersic galaxies convolved with the local PSF to ``image`` in place.

    Parameters
    ----------
    x, y : array
        Trimmed pixel positions of the centres.
    flux_e : array
        Total fluxes, electrons.
    r_half_px : array
        Half-light radius along the major axis, pixels.
    sersic_n, axis_ratio : array
        Sersic index and minor/major axis ratio.
    theta : array
        Major-axis angle in the pixel frame, radians from +x.
    """
    x, y, flux_e, r_half_px, sersic_n, axis_ratio, theta = (
        np.asarray(v, dtype=float) for v in (x, y, flux_e, r_half_px, sersic_n, axis_ratio, theta))
    if x.size == 0:
        return
    from scipy import fft

    a, b, pth = psf.shape_at(x, y)
    alpha = np.sqrt(a * b)
    # Peak of the convolved profile is at most the PSF peak; the galaxy extent adds in quadrature.
    peak = flux_e * (psf.beta - 1.0) / (np.pi * (alpha**2 + r_half_px**2))
    halves = _stamp_half(alpha, peak, psf.beta, extra=np.where(sersic_n > 2, 5.0, 3.5) * r_half_px)
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    sub = GALAXY_OVERSAMPLING
    for half in np.unique(halves):
        n_fine = 2 * int(half) * sub
        # Sub-pixel centres of every pixel of the stamp (pixel -half .. half-1), and a grid
        # centred on 0 for the PSF (moved to index 0 by ifftshift).
        k = np.arange(n_fine)
        t_gal = ((k // sub - half) + (k % sub - (sub - 1) / 2.0) / sub).astype(np.float32)
        t_psf = ((k - n_fine // 2) / sub).astype(np.float32)
        per_chunk = max(1, int(4_000_000 // n_fine**2))
        members = np.nonzero(halves == half)[0]
        for chunk in np.array_split(members, max(1, -(-members.size // per_chunk))):
            if chunk.size == 0:
                continue
            n = len(chunk)
            dx = t_gal[None, None, :] - (x[chunk] - ix[chunk]).astype(np.float32)[:, None, None]
            dy = t_gal[None, :, None] - (y[chunk] - iy[chunk]).astype(np.float32)[:, None, None]
            # Galaxy at its sub-pixel position (core softened by a quarter of a sub-pixel).
            c = np.cos(theta[chunk]).astype(np.float32)[:, None, None]
            s = np.sin(theta[chunk]).astype(np.float32)[:, None, None]
            u = dx * c + dy * s
            v = (-dx * s + dy * c) / axis_ratio[chunk].astype(np.float32)[:, None, None]
            soft = np.float32((0.25 / sub) ** 2)
            r = np.sqrt(u * u + v * v + soft) / r_half_px[chunk].astype(np.float32)[:, None, None]
            nn = sersic_n[chunk].astype(np.float32)[:, None, None]
            gal = np.exp(-_sersic_b(nn) * (r ** (1.0 / nn) - 1.0))
            gal /= gal.sum(axis=(1, 2), keepdims=True)
            zero = np.zeros((n, 1, 1), dtype=np.float32)
            p = _moffat(t_psf[None, None, :] + zero, t_psf[None, :, None] + zero, a[chunk], b[chunk], pth[chunk],
                        psf.beta)
            p /= p.sum(axis=(1, 2), keepdims=True)
            p = np.fft.ifftshift(p, axes=(1, 2))
            conv = fft.irfft2(fft.rfft2(gal, axes=(1, 2)) * fft.rfft2(p, axes=(1, 2)), s=gal.shape[1:], axes=(1, 2))
            # Integrate over each pixel: sum its sub x sub samples.
            conv = conv.reshape(n, 2 * half, sub, 2 * half, sub).sum(axis=(2, 4))
            conv *= (flux_e[chunk] / conv.sum(axis=(1, 2), dtype=np.float64)).astype(np.float32)[:, None, None]
            _add_stamps(image, ix[chunk], iy[chunk], half, conv.astype(np.float32))


def sky_angle_to_pixel(pa_deg, cd) -> np.ndarray:
    """Direction on the pixel grid (rad from +x) of a sky position angle (deg, east of north),
    for a WCS with CD matrix ``cd`` (2x2, deg/pixel)."""
    pa = np.radians(np.asarray(pa_deg, dtype=float))
    inv = np.linalg.inv(np.asarray(cd, dtype=float))
    d_east, d_north = np.sin(pa), np.cos(pa)
    px = inv[0, 0] * d_east + inv[0, 1] * d_north
    py = inv[1, 0] * d_east + inv[1, 1] * d_north
    return np.arctan2(py, px)
