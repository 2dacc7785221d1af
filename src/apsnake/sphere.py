"""Spherical geometry on ICRS positions: the one home of unit vectors, angular distances and
the gnomonic (TAN) projection used by astrometry, the sky grids and association.

Angles are in degrees unless a name says otherwise; standard coordinates (xi towards East,
eta towards North) are in degrees on the tangent plane.
"""

from __future__ import annotations

import math

import numpy as np


def unit_vectors(ra_deg, dec_deg) -> np.ndarray:
    """Unit vectors (..., 3) of positions (ra, dec) in degrees."""
    ra, dec = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    cos_dec = np.cos(dec)
    return np.stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)], axis=-1)


def radec_of_vectors(vectors) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of vectors (..., 3); they need not be normalised."""
    v = np.asarray(vectors, float)
    ra = np.degrees(np.arctan2(v[..., 1], v[..., 0])) % 360.0
    dec = np.degrees(np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1])))
    return ra, dec


def mean_direction(ra_deg, dec_deg) -> tuple[float, float]:
    """(ra0, dec0) in degrees of the mean unit vector of the positions."""
    ra, dec = radec_of_vectors(unit_vectors(ra_deg, dec_deg).reshape(-1, 3).mean(axis=0))
    return float(ra), float(dec)


def angle_between_vectors(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle (radians) between rows of unit vectors; accurate at small and large angles."""
    return np.arctan2(np.linalg.norm(np.cross(u, v), axis=-1), np.einsum("...i,...i->...", u, v))


def angular_separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance (degrees) between positions in degrees (Vincenty formula)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(x, dtype=float)) for x in (ra1, dec1, ra2, dec2))
    dra = ra2 - ra1
    num = np.hypot(np.cos(dec2) * np.sin(dra),
                   np.cos(dec1) * np.sin(dec2) - np.sin(dec1) * np.cos(dec2) * np.cos(dra))
    den = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(dra)
    return np.degrees(np.arctan2(num, den))


def gnomonic(ra, dec, ra0, dec0, min_cos: float | None = None):
    """Gnomonic (TAN) projection about the tangent point (ra0, dec0), all in degrees.

    Returns
    -------
    xi, eta : ndarray
        Standard coordinates, degrees; NaN where ``cos_c <= min_cos`` if ``min_cos`` is given
        (points near or beyond 90 degrees from the tangent point).
    cos_c : ndarray
        Cosine of the angular distance from the tangent point.
    """
    a = np.radians(np.asarray(ra, dtype=float) - ra0)
    d = np.radians(np.asarray(dec, dtype=float))
    d0 = math.radians(dec0)
    cos_c = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        den = cos_c if min_cos is None else np.where(cos_c > min_cos, cos_c, np.nan)
        xi = np.cos(d) * np.sin(a) / den
        eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a)) / den
    return np.degrees(xi), np.degrees(eta), cos_c


def inverse_gnomonic(xi, eta, ra0, dec0) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`gnomonic`: standard coordinates (deg) -> (ra, dec) in degrees."""
    x = np.radians(np.asarray(xi, dtype=float))
    y = np.radians(np.asarray(eta, dtype=float))
    d0 = math.radians(dec0)
    den = math.cos(d0) - y * math.sin(d0)
    ra = ra0 + np.degrees(np.arctan2(x, den))
    dec = np.degrees(np.arctan2(math.sin(d0) + y * math.cos(d0), np.hypot(x, den)))
    return np.mod(ra, 360.0), dec


def pixel_scale_arcsec(wcs, shape) -> float:
    """Mean pixel scale (arcsec) at the centre of an image of ``shape`` (rows, columns), from
    its WCS (``all_pix2world``: SIP distortion included): the square root of the area of the
    sky parallelogram spanned by one-pixel steps along x and y."""
    ny, nx = shape
    ra, dec = wcs.all_pix2world([nx / 2, nx / 2 + 1, nx / 2], [ny / 2, ny / 2, ny / 2 + 1], 0)
    cosd = np.cos(np.radians(dec[0]))
    dx = np.hypot((ra[1] - ra[0]) * cosd, dec[1] - dec[0])
    dy = np.hypot((ra[2] - ra[0]) * cosd, dec[2] - dec[0])
    return float(np.sqrt(dx * dy) * 3600.0)
