"""Render point sources and galaxies into an electron image with a spatially varying DECam-like PSF.

The PSF (:class:`PsfField`) is the sum of an elliptical Moffat core and a wide, round Moffat
halo (β = 2) holding a few per cent of the flux; the core's Moffat index, the halo's share and
width, and the FWHM and ellipticity patterns across the focal plane change from visit to
visit. Everything (stars, galaxies, transients, asteroid trails) goes through the same PSF.

The cores are drawn into square stamps whose size grows with brightness and seeing: a stamp
reaches out to where the core falls below ``STAMP_THRESHOLD_E``. Stamps are batched by size and
evaluated with numpy (no per-pixel Python loop), then added to the image with ``np.add.at``. The
halo is not cut at a surface brightness: its share of each source's flux is deposited at the
source's position (bilinear weights over the four nearest pixels) in one image per exposure
(``HaloLight``), which is convolved once, by FFT, with the halo profile out to ``HALO_HALF``
pixels, so every source, however faint, carries its whole halo, as on the sky. (Cutting each
halo where it fell below a threshold removed a third to a half of the halo light of S/N 50-200
stars inside 40 px, so their halos looked smaller than brighter stars' and any fit of the halo
to them was biased.) The core is integrated over the pixel (2x2 sub-samples); the halo, many
pixels wide, is sampled at pixel centres. Galaxies (Sersic profiles) are convolved with the
local PSF core by FFT on a 3x oversampled grid and integrated over pixels, in batches; their
halo is drawn as a point source's (a galaxy of a few arcsec is small next to the halo).

Pixel coordinates are 0-based trimmed CCD coordinates (x = column, y = row); fluxes are
electrons in the exposure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from apsnake.instruments import decam

#: Stamp half-sizes (pixels) of the cores; a stamp is 2*half x 2*half with the source near its
#: centre. The largest ones are for the cores of the brightest, saturated stars.
STAMP_HALVES = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
#: Sub-pixels per pixel axis on which galaxies are drawn and convolved before being summed
#: into pixels: a Sersic core sampled only at pixel centres changes shape with the sub-pixel
#: position (3-4 % of the flux of an n = 4 galaxy moves between visits), which no real sky does
#: and which a difference image would show as residuals at every galaxy.
GALAXY_OVERSAMPLING = 3
#: Surface brightness (e-/pixel) at which a core's stamp may be cut (well below the sky noise).
STAMP_THRESHOLD_E = 0.3
#: Half-size (pixels) of the halo profile convolved with the deposited halo light: a beta = 2
#: halo of 6" FWHM (the widest drawn) keeps 0.6 % of its light beyond it, 0.03 % of the flux.
HALO_HALF = 256
#: Focal-plane radius (mm) normalising the PSF variation (the edge of the DECam science array).
_FP_RADIUS_MM = 225.0

# ---------------------------------------------------------------------------------------------
# Focal-plane pattern of the PSF (the same for every visit; the per-visit parts are PsfField
# attributes). rho = r / 225 mm; the visit FWHM is the value at rho^2 = 0.5 (r ~ 160 mm).
#
#: Radial term of the optical FWHM^2 (arcsec^2): FWHM^2 = FWHM_visit^2 + k (rho^2 - 0.5), i.e.
#: an optics + focal-plane contribution adding in quadrature to the seeing, growing from
#: ~0.3" at the centre to ~0.5" at the edge (DECam budget: optics, alignment and CCD
#: flatness <= 0.36" FWHM, DES science-verification image-quality requirement IQ-R2; the
#: commissioning team reported the FWHM varying by ~0.1" over the field in 0.8" seeing,
#: DECam commissioning blog, 2012-09-17). It gives +-0.04" about the median in 1" seeing,
#: +-0.05" in 0.8" seeing: relatively more in good seeing, as the optics add in quadrature.
FWHM2_RADIAL_ARCSEC2 = 0.16
#: Radial ellipticity ((a-b)/(a+b), major axis along the radius) at the field edge, growing as
#: rho^2: the design astigmatism of a wide-field prime-focus corrector. Its size, and that of
#: the per-visit terms drawn in observing.py, are of the few-per-cent order of the PSF
#: ellipticity patterns shown by the DES PSF papers (Jarvis et al. 2016, MNRAS 460, 2245;
#: Jarvis et al. 2021, MNRAS 501, 1282); they are not fits to those figures.
ELLIPTICITY_RADIAL = 0.02
#: Relative change of the halo's share across the focal plane: share = share_visit (1 +
#: k (rho^2 - 0.5) + per-visit gradient), i.e. +-15 % from the median radius to the centre
#: and the edge (an assumption: no published DECam number for the aureole's field dependence).
HALO_RADIAL = 0.3
#: Moffat index of the halo. A beta = 2 Moffat falls as r^-4 beyond its core: steeper than the
#: r^-2 power law the Legacy Surveys fit to DECam g/r stellar wings beyond ~5" (DR9/DR10 "PSF"
#: page, R. Zhou: 4.5e-4 r^-2 of the flux per arcsec^2 in g), so it carries the few-per-cent
#: aureole at 2-10" that DIA sees (a much wider z-band outer Moffat there: alpha = 17.65",
#: beta = 1.7, 1.45 % of the flux) without the arcminute-scale scattered light, which no stamp
#: here could hold.
HALO_BETA = 2.0

#: PsfField attribute -> column of the visit truth table (truth/visits.parquet).
TRUTH_COLUMNS = {
    "fwhm_arcsec": "fwhm_arcsec", "beta": "psf_beta", "e1": "psf_e1", "e2": "psf_e2",
    "halo_fraction": "psf_halo_fraction", "halo_fwhm_arcsec": "psf_halo_fwhm_arcsec", "halo_beta": "psf_halo_beta",
    "fwhm2_tilt_arcsec2": "psf_fwhm2_tilt_arcsec2", "fwhm2_tilt_angle_deg": "psf_fwhm2_tilt_angle_deg",
    "astig_e1": "psf_astig_e1", "astig_e2": "psf_astig_e2",
    "halo_tilt": "psf_halo_tilt", "halo_tilt_angle_deg": "psf_halo_tilt_angle_deg",
}


def moffat_alpha(fwhm, beta):
    """Moffat core radius alpha (same unit as ``fwhm``) of a profile of FWHM ``fwhm``."""
    return np.asarray(fwhm) / (2.0 * np.sqrt(2.0 ** (1.0 / np.asarray(beta)) - 1.0))


def moffat_fraction_outside(r, alpha, beta):
    """Flux fraction of a round, normalised Moffat beyond radius ``r``: (1 + r^2/alpha^2)^(1-beta)."""
    return (1.0 + (np.asarray(r, float) / alpha) ** 2) ** (1.0 - beta)


@dataclass(frozen=True)
class PsfField:
    """DECam-like PSF of one visit on one CCD: elliptical Moffat core + round Moffat halo.

    ``PSF(r) = (1 - h) Moffat(a, b, theta, beta) + h Moffat(alpha_h, halo_beta)``, each
    normalised to unit flux, with the core's FWHM and ellipticity and the halo's share ``h``
    varying smoothly over the focal plane (u, v = focal-plane position / 225 mm, rho^2 =
    u^2 + v^2, phi its position angle):

    * core FWHM: ``FWHM^2 = fwhm_arcsec^2 + FWHM2_RADIAL_ARCSEC2 (rho^2 - 0.5) +
      fwhm2_tilt_arcsec2 (u cos t + v sin t)`` with ``t = fwhm2_tilt_angle_deg`` (a per-visit
      focus/tilt gradient of the camera), floored at half the visit FWHM;
    * core ellipticity ((a-b)/(a+b), pixel axes): ``e = (e1, e2) + ELLIPTICITY_RADIAL rho^2
      (cos 2phi, sin 2phi) + (astig_e1 u + astig_e2 v, astig_e2 u - astig_e1 v)``: the visit
      part (tracking, wind shake), the fixed radial astigmatism and a per-visit astigmatism
      linear in the field (residual misalignment), clipped at 0.5;
    * halo share: ``h = halo_fraction (1 + HALO_RADIAL (rho^2 - 0.5) + halo_tilt (u cos s +
      v sin s))``, ``s = halo_tilt_angle_deg``, clipped to [0, 0.2]; the halo's FWHM
      (``halo_fwhm_arcsec``) is the same over the focal plane.

    ``fwhm_arcsec`` is the visit seeing at rho^2 = 0.5 (r ~ 160 mm, about the median over the
    focal plane). The halo widens the total PSF's FWHM by well under 1 %: its peak is ~1e-3 of
    the core's. With ``halo_fraction = 0`` and the pattern terms 0 this is a plain Moffat.

    Attributes
    ----------
    ccdnum : int
    fwhm_arcsec : float
        Visit seeing (core FWHM at rho^2 = 0.5), arcsec.
    beta : float
        Moffat index of the core.
    e1, e2 : float
        Visit-wide core ellipticity components.
    halo_fraction : float
        Share of the flux in the halo at rho^2 = 0.5.
    halo_fwhm_arcsec : float
        FWHM of the halo Moffat, arcsec (no halo when 0).
    halo_beta : float
        Moffat index of the halo.
    fwhm2_tilt_arcsec2, fwhm2_tilt_angle_deg : float
        Amplitude (arcsec^2 at rho = 1) and direction (deg from focal-plane +x) of the linear
        FWHM^2 gradient.
    astig_e1, astig_e2 : float
        Linear-in-field astigmatism (ellipticity at rho = 1).
    halo_tilt, halo_tilt_angle_deg : float
        Relative gradient (at rho = 1) and direction of the halo share.
    """

    ccdnum: int
    fwhm_arcsec: float
    beta: float
    e1: float
    e2: float
    halo_fraction: float = 0.0
    halo_fwhm_arcsec: float = 0.0
    halo_beta: float = HALO_BETA
    fwhm2_tilt_arcsec2: float = 0.0
    fwhm2_tilt_angle_deg: float = 0.0
    astig_e1: float = 0.0
    astig_e2: float = 0.0
    halo_tilt: float = 0.0
    halo_tilt_angle_deg: float = 0.0

    @classmethod
    def from_truth(cls, ccdnum: int, row) -> PsfField:
        """The PSF of a visit on CCD ``ccdnum`` from its row of truth/visits.parquet (a mapping)."""
        return cls(int(ccdnum), **{f: float(row[c]) for f, c in TRUTH_COLUMNS.items()})

    def truth_row(self) -> dict:
        """The visit-table columns of this PSF (:data:`TRUTH_COLUMNS`)."""
        return {c: float(getattr(self, f)) for f, c in TRUTH_COLUMNS.items()}

    def _focal_plane(self, x, y):
        fx, fy = decam.trimmed_to_focal_plane(self.ccdnum, x, y)
        return fx / _FP_RADIUS_MM, fy / _FP_RADIUS_MM

    def fwhm_at(self, x, y) -> np.ndarray:
        """Core FWHM (geometric mean of the major and minor axes, arcsec) at trimmed pixel positions."""
        u, v = self._focal_plane(x, y)
        t = math.radians(self.fwhm2_tilt_angle_deg)
        d2 = (FWHM2_RADIAL_ARCSEC2 * (u * u + v * v - 0.5)
              + self.fwhm2_tilt_arcsec2 * (u * math.cos(t) + v * math.sin(t)))
        return np.sqrt(np.maximum(self.fwhm_arcsec**2 + d2, 0.25 * self.fwhm_arcsec**2))

    def ellipticity_at(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Core ellipticity (e1, e2), (a-b)/(a+b) convention in the pixel axes, before the 0.5 clip."""
        u, v = self._focal_plane(x, y)
        rho2 = u * u + v * v
        phi = np.arctan2(v, u)
        e1 = self.e1 + ELLIPTICITY_RADIAL * rho2 * np.cos(2 * phi) + self.astig_e1 * u + self.astig_e2 * v
        e2 = self.e2 + ELLIPTICITY_RADIAL * rho2 * np.sin(2 * phi) + self.astig_e2 * u - self.astig_e1 * v
        return e1, e2

    def shape_at(self, x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, theta): Moffat major/minor core radii (pixels) and major-axis angle (rad, from +x)."""
        fwhm_px = self.fwhm_at(x, y) / (decam.RAW_WCS_CD_DEG * 3600.0)
        e1, e2 = self.ellipticity_at(x, y)
        e = np.clip(np.hypot(e1, e2), 0.0, 0.5)
        theta = 0.5 * np.arctan2(e2, e1)
        alpha = moffat_alpha(fwhm_px, self.beta)
        q = (1.0 - e) / (1.0 + e)
        return alpha / np.sqrt(q), alpha * np.sqrt(q), theta

    @property
    def halo_alpha_px(self) -> float:
        """Core radius alpha of the halo Moffat, pixels."""
        return float(moffat_alpha(self.halo_fwhm_arcsec / (decam.RAW_WCS_CD_DEG * 3600.0), self.halo_beta))

    def halo_fraction_at(self, x, y) -> np.ndarray:
        """Share of the flux in the halo at trimmed pixel positions (0 when there is no halo)."""
        u, v = self._focal_plane(x, y)
        if self.halo_fraction <= 0 or self.halo_fwhm_arcsec <= 0:
            return np.zeros(np.shape(u))
        s = math.radians(self.halo_tilt_angle_deg)
        rel = 1.0 + HALO_RADIAL * (u * u + v * v - 0.5) + self.halo_tilt * (u * math.cos(s) + v * math.sin(s))
        return np.clip(self.halo_fraction * rel, 0.0, 0.2)


def _stamp_half(alpha, peak, beta, extra=0.0, floor=3.5):
    """Smallest stamp half-size where a Moffat of core radius ``alpha``, index ``beta`` and
    central surface brightness ``peak`` (e-/pixel) has fallen to ``STAMP_THRESHOLD_E``, the
    source's own extent ``extra`` added in quadrature (and at least ``floor`` alpha)."""
    x = np.sqrt(np.maximum((np.maximum(peak, 1e-9) / STAMP_THRESHOLD_E) ** (1.0 / beta) - 1.0, 0.0))
    need = np.hypot(np.maximum(x, floor) * alpha, extra)
    halves = np.asarray(STAMP_HALVES)
    idx = np.minimum(np.searchsorted(halves, need), len(halves) - 1)
    return halves[idx]


def _halves(psf: PsfField, alpha, core_peak, extra=0.0):
    """Stamp half-sizes covering the core down to the threshold."""
    return _stamp_half(alpha, core_peak, psf.beta, extra)


def halo_profile(psf: PsfField, half: int = HALO_HALF) -> np.ndarray:
    """The unit-flux halo Moffat sampled at the centres of a ``2 half + 1`` square (float32),
    with its analytic normalisation: it sums to one less the light beyond the square."""
    g = np.arange(-half, half + 1, dtype=np.float32)
    prof = _moffat_round(g[None, :], g[:, None], psf.halo_alpha_px, psf.halo_beta)
    return prof * np.float32((psf.halo_beta - 1.0) / (np.pi * psf.halo_alpha_px**2))


class HaloLight:
    """The halos of one exposure: each source's halo flux deposited at its position, then
    convolved once with the halo profile (``render_into``).

    Deposits use bilinear weights over the four pixels around the position (the halo's centroid
    stays the source's); positions farther than ``HALO_HALF`` outside the image are ignored.
    """

    def __init__(self, shape, psf: PsfField):
        self.shape = tuple(shape)
        self.psf = psf
        ny, nx = self.shape
        self.impulses = np.zeros((ny + 2 * HALO_HALF, nx + 2 * HALO_HALF), np.float32)

    def add(self, x, y, halo_e) -> None:
        """Deposit halo fluxes ``halo_e`` (electrons) at trimmed positions (x, y)."""
        x, y, halo_e = (np.asarray(v, dtype=float).ravel() for v in (x, y, halo_e))
        keep = (halo_e > 0) & np.isfinite(x) & np.isfinite(y)
        px, py = x[keep] + HALO_HALF, y[keep] + HALO_HALF
        x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
        fx, fy = px - x0, py - y0
        h, w = self.impulses.shape
        for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy),
                               (1, 1, fx * fy)):
            cols, rows = x0 + dx, y0 + dy
            ok = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
            np.add.at(self.impulses, (rows[ok], cols[ok]), (halo_e[keep] * weight)[ok].astype(np.float32))

    def render_into(self, image: np.ndarray) -> None:
        """Add the deposited halos, convolved with the halo profile, to ``image`` in place (only
        the bounding box of the deposits is transformed)."""
        from scipy.signal import fftconvolve

        rows = np.flatnonzero(self.impulses.any(axis=1))
        if rows.size == 0:
            return
        cols = np.flatnonzero(self.impulses.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        conv = fftconvolve(self.impulses[r0:r1, c0:c1], halo_profile(self.psf), mode="full")
        # conv[i, j] lies on image pixel (r0 - 2 HALO_HALF + i, c0 - 2 HALO_HALF + j).
        ny, nx = image.shape
        top, left = r0 - 2 * HALO_HALF, c0 - 2 * HALO_HALF
        ys = slice(max(top, 0), min(top + conv.shape[0], ny))
        xs = slice(max(left, 0), min(left + conv.shape[1], nx))
        if ys.stop > ys.start and xs.stop > xs.start:
            image[ys, xs] += conv[ys.start - top:ys.stop - top, xs.start - left:xs.stop - left].astype(image.dtype)


def _grid(n, half, cx, cy):
    """Pixel-centre offsets (n, S, S) of a stamp around integer centres, minus sub-pixel positions."""
    g = np.arange(-half, half, dtype=np.float32)
    dx = g[None, None, :] - cx[:, None, None].astype(np.float32)
    dy = g[None, :, None] - cy[:, None, None].astype(np.float32)
    return dx, dy


def _moffat(dx, dy, a, b, theta, beta):
    """Unnormalised elliptical Moffat (1 + (u/a)^2 + (v/b)^2)^-beta, one (a, b, theta) per stamp."""
    c = np.cos(theta).astype(np.float32)[:, None, None]
    s = np.sin(theta).astype(np.float32)[:, None, None]
    u = dx * c + dy * s
    v = -dx * s + dy * c
    q = (u / a.astype(np.float32)[:, None, None]) ** 2 + (v / b.astype(np.float32)[:, None, None]) ** 2
    return (1.0 + q) ** np.float32(-beta)


def _moffat_round(dx, dy, alpha, beta):
    """Unnormalised round Moffat (1 + r^2/alpha^2)^-beta (one alpha for all; fast for beta = 2)."""
    w = 1.0 / (1.0 + (dx * dx + dy * dy) * np.float32(1.0 / alpha**2))
    return w * w if beta == 2.0 else w ** np.float32(beta)


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


def render_points(image: np.ndarray, x, y, flux_e, psf: PsfField, halo: HaloLight | None = None) -> None:
    """Add point sources (electrons ``flux_e``) at trimmed positions (x, y) to ``image`` in place.

    The core (its share ``1 - h`` of the flux, analytic normalisation) is drawn into stamps
    reaching where it falls below ``STAMP_THRESHOLD_E``; the halo's share ``h`` is deposited
    into ``halo`` (drawn later, with the exposure's other halos) or, when None, drawn here.
    """
    x, y, flux_e = (np.asarray(v, dtype=float) for v in (x, y, flux_e))
    if x.size == 0:
        return
    a, b, theta = psf.shape_at(x, y)
    alpha = np.sqrt(a * b)
    h = psf.halo_fraction_at(x, y)
    core_amp = flux_e * (1.0 - h) * (psf.beta - 1.0) / (np.pi * a * b)  # central e-/pixel
    halves = _halves(psf, alpha, core_amp)
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    for half in np.unique(halves):
        sel = np.nonzero(halves == half)[0]
        dx, dy = _grid(len(sel), half, x[sel] - ix[sel], y[sel] - iy[sel])
        st = _moffat_pixel(dx, dy, a[sel], b[sel], theta[sel], psf.beta)
        st *= core_amp[sel].astype(np.float32)[:, None, None]
        _add_stamps(image, ix[sel], iy[sel], half, st)
    _add_halos(image, x, y, flux_e * h, psf, halo)


def _add_halos(image, x, y, halo_e, psf: PsfField, halo: HaloLight | None) -> None:
    if not np.any(halo_e > 0):
        return
    own = halo is None
    if own:
        halo = HaloLight(image.shape, psf)
    halo.add(x, y, halo_e)
    if own:
        halo.render_into(image)


def _sersic_b(n):
    return 2.0 * n - 1.0 / 3.0 + 0.009876 / n


def render_galaxies(image: np.ndarray, x, y, flux_e, r_half_px, sersic_n, axis_ratio, theta, psf: PsfField,
                    halo: HaloLight | None = None) -> None:
    """Add Sersic galaxies convolved with the local PSF to ``image`` in place.

    The galaxy is normalised over its stamp and convolved with the PSF core sampled on the same
    grid with its analytic normalisation, so, as for stars, only the core light falling outside
    the stamp (below ``STAMP_THRESHOLD_E``) is missing. The halo's share of the flux is drawn
    as a point source's halo at the galaxy's centre (into ``halo``, or here when None).

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
    h = psf.halo_fraction_at(x, y)
    # Peak of the convolved profile is at most the PSF peak; the galaxy extent adds in quadrature.
    core_peak = flux_e * (1.0 - h) * (psf.beta - 1.0) / (np.pi * (alpha**2 + r_half_px**2))
    halves = _halves(psf, alpha, core_peak, extra=np.where(sersic_n > 2, 5.0, 3.5) * r_half_px)
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
            core_norm = (1.0 - h[chunk]) * (psf.beta - 1.0) / (np.pi * a[chunk] * b[chunk] * sub * sub)
            p *= core_norm.astype(np.float32)[:, None, None]
            kernel_ft = fft.rfft2(np.fft.ifftshift(p, axes=(1, 2)), axes=(1, 2))
            conv = fft.irfft2(fft.rfft2(gal, axes=(1, 2)) * kernel_ft, s=gal.shape[1:], axes=(1, 2))
            # Integrate over each pixel: sum its sub x sub samples.
            conv = conv.reshape(n, 2 * half, sub, 2 * half, sub).sum(axis=(2, 4))
            conv *= flux_e[chunk].astype(np.float32)[:, None, None]
            _add_stamps(image, ix[chunk], iy[chunk], half, conv.astype(np.float32))
    _add_halos(image, x, y, flux_e * h, psf, halo)


def sky_angle_to_pixel(pa_deg, cd) -> np.ndarray:
    """Direction on the pixel grid (rad from +x) of a sky position angle (deg, east of north),
    for a WCS with CD matrix ``cd`` (2x2, deg/pixel)."""
    pa = np.radians(np.asarray(pa_deg, dtype=float))
    inv = np.linalg.inv(np.asarray(cd, dtype=float))
    d_east, d_north = np.sin(pa), np.cos(pa)
    px = inv[0, 0] * d_east + inv[0, 1] * d_north
    py = inv[1, 0] * d_east + inv[1, 1] * d_north
    return np.arctan2(py, px)
