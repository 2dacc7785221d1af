"""The fixed sky grid of template patches (docs/architecture.md, templates).

The sky is cut into Dec strips of equal height, each strip into equal RA steps, so that every
patch is roughly square; each patch has its own TAN pixel grid (north up, east left) with a
margin that overlaps its neighbours. The template coadds are built per patch
(``coadd/{band}/{patch}.fits``). Everything here is arithmetic: no I/O, no pixels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from apsnake.exposure import Exposure
from apsnake.sphere import gnomonic, inverse_gnomonic, radec_of_vectors, unit_vectors
from apsnake.templates.errors import TemplateError

_PATCH_ID = re.compile(r"^d(\d{4,})r(\d{4,})$")


def _point_in_polygon(px, py, vx, vy) -> bool:
    inside = False
    n = len(vx)
    for k in range(n):
        x1, y1, x2, y2 = vx[k], vy[k], vx[(k + 1) % n], vy[(k + 1) % n]
        if (y1 > py) != (y2 > py) and px < x1 + (py - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


@dataclass(frozen=True)
class SkyGrid:
    """A fixed grid of patches, each a TAN projection (north up, east left) with square pixels.

    Dec strips of height ``patch_size_deg`` start at the south pole; strip ``j`` (Dec from
    ``-90 + j * patch_size_deg``) is split into ``n_j = ceil(360 cos(dec_j) / patch_size_deg)``
    equal RA steps starting at RA 0 (``dec_j`` is the strip centre), so patches stay roughly
    square. Patch ``"d{j:04d}r{i:04d}"`` covers RA ``[i, i + 1) * 360 / n_j`` in strip ``j``;
    its pixel grid is tangent at the patch centre and covers the patch plus
    ``margin_pixels`` on each side. Everything is pure arithmetic (no I/O, no WCS library
    for the look-ups), deterministic and fast.

    Parameters
    ----------
    patch_size_deg : float
        Patch side without the margin, degrees.
    pixel_scale_arcsec : float
        Pixel side, arcsec.
    margin_pixels : int
        Overlap margin on each side, pixels, so that a CCD near a patch edge is still
        entirely inside the neighbouring patch's pixel grid.
    """

    patch_size_deg: float = 0.25
    pixel_scale_arcsec: float = 0.263
    margin_pixels: int = 100

    def __post_init__(self):
        if not (0 < self.patch_size_deg <= 90):
            raise TemplateError(f"SkyGrid: patch_size_deg must be in (0, 90], got {self.patch_size_deg}")
        if not self.pixel_scale_arcsec > 0:
            raise TemplateError(f"SkyGrid: pixel_scale_arcsec must be > 0, got {self.pixel_scale_arcsec}")
        if self.margin_pixels < 0:
            raise TemplateError(f"SkyGrid: margin_pixels must be >= 0, got {self.margin_pixels}")

    # -- strips and patches ---------------------------------------------------
    @property
    def n_strips(self) -> int:
        """Number of Dec strips."""
        return int(math.ceil(180.0 / self.patch_size_deg - 1e-9))

    def strip_limits(self, strip: int) -> tuple[float, float]:
        """(Dec low, Dec high) of a strip, degrees."""
        lo = -90.0 + strip * self.patch_size_deg
        return lo, min(lo + self.patch_size_deg, 90.0)

    def n_ra(self, strip: int) -> int:
        """Number of RA steps (patches) in a strip."""
        lo, hi = self.strip_limits(strip)
        centre = 0.5 * (lo + hi)
        return max(1, int(math.ceil(360.0 * math.cos(math.radians(centre)) / self.patch_size_deg - 1e-9)))

    def _strip_of(self, dec):
        strip = np.floor((np.asarray(dec, float) + 90.0) / self.patch_size_deg).astype(int)
        return np.clip(strip, 0, self.n_strips - 1)

    def _digits(self) -> int:
        return max(4, len(str(self.n_strips - 1)), len(str(self.n_ra(self.n_strips // 2) - 1)))

    def patch_id(self, strip: int, step: int) -> str:
        """The id of the patch of strip ``strip`` and RA step ``step``."""
        n = self._digits()
        return f"d{strip:0{n}d}r{step:0{n}d}"

    def parse_patch_id(self, patch_id: str) -> tuple[int, int]:
        """(strip, RA step) of a patch id; raises ``TemplateError`` for a malformed or foreign id."""
        m = _PATCH_ID.match(str(patch_id))
        if m is None:
            raise TemplateError(f"not a patch id: {patch_id!r}")
        strip, step = int(m.group(1)), int(m.group(2))
        if not (0 <= strip < self.n_strips and 0 <= step < self.n_ra(strip)):
            raise TemplateError(f"patch id {patch_id!r} is outside this grid")
        return strip, step

    def patch_center(self, patch_id: str) -> tuple[float, float]:
        """(RA, Dec) of the patch centre (its tangent point), degrees."""
        strip, step = self.parse_patch_id(patch_id)
        lo, hi = self.strip_limits(strip)
        width = 360.0 / self.n_ra(strip)
        return (step + 0.5) * width, 0.5 * (lo + hi)

    def patch_bounds(self, patch_id: str) -> tuple[float, float, float, float]:
        """(RA min, RA max, Dec min, Dec max) of the patch without margin, degrees (RA max <= 360)."""
        strip, step = self.parse_patch_id(patch_id)
        lo, hi = self.strip_limits(strip)
        width = 360.0 / self.n_ra(strip)
        return step * width, (step + 1) * width, lo, hi

    def patch_ids_for_points(self, ra, dec) -> np.ndarray:
        """The id of the patch containing each point (RA, Dec in degrees)."""
        ra = np.asarray(ra, float) % 360.0
        strips = self._strip_of(dec)
        out = []
        for r, b in zip(np.atleast_1d(ra).ravel(), np.atleast_1d(strips).ravel()):
            n = self.n_ra(int(b))
            out.append(self.patch_id(int(b), min(int(r / (360.0 / n)), n - 1)))
        return np.array(out, dtype=object).reshape(np.shape(ra))

    def patch_contains(self, patch_id: str, ra, dec) -> np.ndarray:
        """True where (RA, Dec) (degrees) lies in the patch without margin."""
        ra0, ra1, dec0, dec1 = self.patch_bounds(patch_id)
        ra = np.asarray(ra, float) % 360.0
        dec = np.asarray(dec, float)
        in_dec = (dec >= dec0) & ((dec < dec1) | ((dec1 >= 90.0) & (dec <= 90.0)))
        return in_dec & (ra >= ra0) & (ra < ra1)

    # -- geometry ------------------------------------------------------------
    def _patch_half_size_pixels(self, patch_id: str) -> tuple[int, int]:
        """Half width and height (pixels, without margin) of the tangent-plane box of a patch."""
        ra0, ra1, dec0, dec1 = self.patch_bounds(patch_id)
        rac, decc = self.patch_center(patch_id)
        t = np.linspace(0.0, 1.0, 17)
        ras = np.concatenate([ra0 + (ra1 - ra0) * t, ra0 + (ra1 - ra0) * t, np.full(17, ra0), np.full(17, ra1)])
        decs = np.concatenate([np.full(17, dec0), np.full(17, dec1), dec0 + (dec1 - dec0) * t,
                               dec0 + (dec1 - dec0) * t])
        xi, eta, cosc = gnomonic(ras, decs, rac, decc)
        if np.any(cosc <= 0.05):
            raise TemplateError(f"patch {patch_id} is too large for a TAN projection")
        scale = self.pixel_scale_arcsec / 3600.0
        hx = int(math.ceil(np.max(np.abs(xi)) / scale - 1e-6))
        hy = int(math.ceil(np.max(np.abs(eta)) / scale - 1e-6))
        return hx, hy

    def patch_shape(self, patch_id: str) -> tuple[int, int]:
        """(ny, nx) of the patch's pixel grid, margin included."""
        hx, hy = self._patch_half_size_pixels(patch_id)
        m = self.margin_pixels
        return 2 * (hy + m) + 1, 2 * (hx + m) + 1

    def patch_wcs(self, patch_id: str):
        """WCS and (ny, nx) of the patch, margin included.

        Returns
        -------
        wcs : astropy.wcs.WCS
            TAN, tangent at the patch centre, which is the centre of pixel
            ``((nx - 1) / 2, (ny - 1) / 2)`` (0-based); ``CD = diag(-s, s)`` with ``s`` the
            pixel scale in degrees (north up, east left).
        shape : tuple of int
            (ny, nx), pixels.
        """
        from astropy.wcs import WCS

        rac, decc = self.patch_center(patch_id)
        ny, nx = self.patch_shape(patch_id)
        scale = self.pixel_scale_arcsec / 3600.0
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [rac, decc]
        w.wcs.crpix = [(nx - 1) / 2 + 1.0, (ny - 1) / 2 + 1.0]
        w.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]])
        w.wcs.cunit = ["deg", "deg"]
        w.wcs.radesys = "ICRS"
        w.wcs.set()
        w.pixel_shape = (nx, ny)
        return w, (ny, nx)

    # -- look-ups ------------------------------------------------------------
    def patch_ids_for_corners(self, ra_corners, dec_corners, pad_arcsec: float = 60.0) -> list[str]:
        """Patches touching a sky polygon, padded.

        Parameters
        ----------
        ra_corners, dec_corners : array_like
            Polygon vertices in order (e.g. the 4 corners of a CCD), degrees. The edges are
            great circles.
        pad_arcsec : float
            Padding added around the polygon, arcsec (covers astrometric errors and the
            warping kernel). Keep it at least ``margin_pixels * pixel_scale_arcsec``
            (26 arcsec by default), so that every CCD reaching into a patch's margin is
            among the inputs of that patch's coadd.

        Returns
        -------
        list of str
            Sorted patch ids: every patch whose area (without margin) intersects the padded
            polygon's RA/Dec bounding region (a few extra patches near the corners of a tilted
            polygon are possible; none is missed).
        """
        ra = np.asarray(ra_corners, float).ravel()
        dec = np.asarray(dec_corners, float).ravel()
        if ra.size == 0 or ra.size != dec.size or not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            raise TemplateError(f"patch_ids_for_corners: need matching finite corners, got {ra_corners!r}, "
                                f"{dec_corners!r}")
        # Pure function of its arguments: cached, as the workflow asks again for every patch.
        return list(self._patches_for_polygon(tuple(ra.tolist()), tuple(dec.tolist()), float(pad_arcsec)))

    @lru_cache(maxsize=65536)  # noqa: B019 - SkyGrid is frozen (hashable) and holds no large state
    def _patches_for_polygon(self, ra: tuple, dec: tuple, pad_arcsec: float) -> tuple[str, ...]:
        ra, dec = np.array(ra), np.array(dec)
        pad = max(float(pad_arcsec), 0.0) / 3600.0
        centre = unit_vectors(ra, dec).mean(axis=0)
        if np.linalg.norm(centre) < 1e-6:
            raise TemplateError("patch_ids_for_corners: degenerate polygon")
        ra_c, dec_c = (float(v) for v in radec_of_vectors(centre))
        xi, eta, cosc = gnomonic(ra, dec, ra_c, dec_c)
        if np.any(cosc <= 0.1):
            raise TemplateError("patch_ids_for_corners: polygon too large (> ~80 degrees)")
        # Densify the edges (straight in the tangent plane = great circles on the sky).
        t = np.linspace(0.0, 1.0, 9)[:-1]
        xs = np.concatenate([xi[k] + (xi[(k + 1) % len(xi)] - xi[k]) * t for k in range(len(xi))])
        ys = np.concatenate([eta[k] + (eta[(k + 1) % len(eta)] - eta[k]) * t for k in range(len(eta))])
        ras, decs = inverse_gnomonic(xs, ys, ra_c, dec_c)
        dec_lo, dec_hi = float(decs.min()) - pad, float(decs.max()) + pad
        # Does the polygon enclose a pole? Then every RA is covered near it.
        pole = None
        for sign in (1.0, -1.0):
            if sign * dec_c > 0:
                pxi, peta, pcos = gnomonic(0.0, 90.0 * sign, ra_c, dec_c)
                if pcos > 0.1 and _point_in_polygon(float(pxi), float(peta), xs, ys):
                    pole = sign
        if pole == 1.0:
            dec_hi = 90.0
        elif pole == -1.0:
            dec_lo = -90.0
        dec_lo, dec_hi = max(dec_lo, -90.0), min(dec_hi, 90.0)
        dra = (ras - ra_c + 180.0) % 360.0 - 180.0
        ids = []
        for strip in range(int(self._strip_of(dec_lo)), int(self._strip_of(dec_hi)) + 1):
            n = self.n_ra(strip)
            width = 360.0 / n
            lo, hi = self.strip_limits(strip)
            extreme = max(abs(max(lo, dec_lo)), abs(min(hi, dec_hi)))
            cos_ext = math.cos(math.radians(min(extreme, 90.0)))
            span = dra.max() - dra.min()
            if pole is not None or cos_ext < 1e-6 or span + 2 * pad / cos_ext >= 360.0 - width:
                steps = range(n)
            else:
                pad_ra = pad / cos_ext
                ra_lo = ra_c + dra.min() - pad_ra
                ra_hi = ra_c + dra.max() + pad_ra
                steps = sorted({k % n for k in range(int(math.floor(ra_lo / width)),
                                                         int(math.floor(ra_hi / width)) + 1)})
            ids.extend(self.patch_id(strip, s) for s in steps)
        return tuple(sorted(set(ids)))

    def patch_ids_for_exposure(self, exposure: Exposure, pad_arcsec: float = 60.0) -> list[str]:
        """Patches touching an exposure's footprint (its 4 corner pixels through its WCS), padded."""
        if exposure.wcs is None:
            raise TemplateError(f"exposure {exposure.data_id} has no WCS")
        ny, nx = exposure.shape
        x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
        y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        ra, dec = exposure.wcs.all_pix2world(x, y, 0)
        return self.patch_ids_for_corners(ra, dec, pad_arcsec)
