"""Spherical geometry: unit vectors, separations, the gnomonic (TAN) projection.

Truth comes from closed forms and from astropy (SkyCoord separations, the FITS WCS TAN
projection).
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from apsnake.sphere import (angle_between_vectors, angular_separation_deg, gnomonic, inverse_gnomonic,
                            mean_direction, radec_of_vectors, unit_vectors)


def random_sky(rng, n):
    """Points uniform on the sphere: RA in [0, 360), Dec in [-90, 90] degrees."""
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    return ra, dec


def ra_diff(a, b):
    """a - b wrapped into [-180, 180) degrees."""
    return (np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0


def test_unit_vectors_known_directions():
    ra = np.array([0.0, 90.0, 180.0, 270.0, 123.0, 45.0])
    dec = np.array([0.0, 0.0, 0.0, 0.0, 90.0, -90.0])
    expected = np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
    assert_allclose(unit_vectors(ra, dec), expected, atol=1e-15)
    # (ra, dec) = (45, 30): cos30 (cos45, sin45), sin30
    assert_allclose(unit_vectors(45.0, 30.0), [np.sqrt(3) / 2 * np.sqrt(0.5), np.sqrt(3) / 2 * np.sqrt(0.5), 0.5],
                    atol=1e-15)


def test_unit_vectors_are_unit_and_keep_shape(rng):
    ra, dec = random_sky(rng, 60)
    v = unit_vectors(ra.reshape(3, 20), dec.reshape(3, 20))
    assert v.shape == (3, 20, 3)
    assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-14)


def test_radec_round_trip(rng):
    ra, dec = random_sky(rng, 1000)
    ra2, dec2 = radec_of_vectors(unit_vectors(ra, dec))
    assert np.all((ra2 >= 0.0) & (ra2 < 360.0))
    assert_allclose(ra_diff(ra2, ra), 0.0, atol=1e-9)
    assert_allclose(dec2, dec, atol=1e-9)


def test_radec_of_vectors_wraps_ra_and_ignores_norm():
    ra_in = np.array([-30.0, 370.0, 720.0 + 10.0, -0.5, 359.999])
    dec_in = np.array([10.0, -20.0, 0.0, 5.0, -1.0])
    vectors = unit_vectors(ra_in, dec_in) * np.array([1.0, 3.7, 0.01, 1e6, 2.0])[:, None]
    ra, dec = radec_of_vectors(vectors)
    assert_allclose(ra, [330.0, 10.0, 10.0, 359.5, 359.999], atol=1e-9)
    assert_allclose(dec, dec_in, atol=1e-9)


def test_radec_of_vectors_at_the_poles():
    ra, dec = radec_of_vectors(np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -2.0]]))
    assert_allclose(dec, [90.0, -90.0], atol=1e-12)
    assert np.all(np.isfinite(ra)) and np.all((ra >= 0) & (ra < 360))
    # Near the pole the RA is still well defined and comes back.
    ra2, dec2 = radec_of_vectors(unit_vectors([10.0, 250.0], [89.9999999, -89.9999999]))
    assert_allclose(ra2, [10.0, 250.0], atol=1e-5)
    assert_allclose(dec2, [89.9999999, -89.9999999], atol=1e-12)


def test_angular_separation_matches_astropy(rng):
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    ra1, dec1 = random_sky(rng, 500)
    ra2, dec2 = random_sky(rng, 500)
    expected = SkyCoord(ra1 * u.deg, dec1 * u.deg).separation(SkyCoord(ra2 * u.deg, dec2 * u.deg)).deg
    assert_allclose(angular_separation_deg(ra1, dec1, ra2, dec2), expected, atol=1e-10)


def test_angular_separation_small_large_and_wrap():
    # 1 milliarcsecond along the meridian, across RA = 0 at the equator, antipodes, the pole.
    mas = 1.0 / 3.6e6
    sep = angular_separation_deg([10.0, 359.9995, 0.0, 0.0, 17.0], [20.0, 0.0, 30.0, 89.0, 90.0],
                                 [10.0, 0.0005, 180.0, 180.0, 200.0], [20.0 + mas, 0.0, -30.0, 89.0, 90.0])
    assert_allclose(sep, [mas, 0.001, 180.0, 2.0, 0.0], rtol=1e-9, atol=1e-12)
    # Broadcasting: one position against many.
    assert_allclose(angular_separation_deg(0.0, 0.0, [0.0, 90.0, 0.0], [0.0, 0.0, -45.0]), [0.0, 90.0, 45.0],
                    atol=1e-12)


def test_angle_between_vectors_matches_separation(rng):
    ra1, dec1 = random_sky(rng, 300)
    ra2, dec2 = random_sky(rng, 300)
    angle = angle_between_vectors(unit_vectors(ra1, dec1), unit_vectors(ra2, dec2))
    assert_allclose(np.degrees(angle), angular_separation_deg(ra1, dec1, ra2, dec2), atol=1e-10)
    # Accurate at tiny angles (an arccos formula would return 0 here) and at 180 degrees.
    tiny = 1e-9  # degrees
    angle = angle_between_vectors(unit_vectors([50.0, 10.0], [-20.0, 40.0]),
                                  unit_vectors([50.0, 190.0], [-20.0 + tiny, -40.0]))
    assert_allclose(np.degrees(angle), [tiny, 180.0], rtol=1e-6)


def test_gnomonic_directions_and_tangent_point():
    xi, eta, cos_c = gnomonic([150.0, 150.01, 150.0], [-30.0, -30.0, -29.99], 150.0, -30.0)
    assert_allclose([xi[0], eta[0], cos_c[0]], [0.0, 0.0, 1.0], atol=1e-15)
    assert xi[1] > 0 and abs(eta[1]) < 1e-4 * xi[1]      # towards East (larger RA): +xi
    assert eta[2] > 0 and abs(xi[2]) < 1e-12             # towards North: +eta
    # Small offsets: xi ~ dRA cos(dec), eta ~ dDec.
    assert_allclose(xi[1], 0.01 * np.cos(np.radians(30.0)), rtol=1e-4)
    assert_allclose(eta[2], 0.01, rtol=1e-4)


def test_gnomonic_matches_astropy_tan_wcs(rng):
    from astropy.wcs import WCS

    for ra0, dec0 in [(10.0, -25.0), (359.8, 3.0), (200.0, 88.5), (0.0, -89.9)]:
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra0, dec0]
        w.wcs.crpix = [1.0, 1.0]
        w.wcs.cdelt = [1.0, 1.0]  # pixel offsets from crpix are then the standard coordinates in degrees
        # Points within ~1.5 degrees of the tangent point (random offsets on the tangent plane).
        xi_true = rng.uniform(-1.0, 1.0, 200)
        eta_true = rng.uniform(-1.0, 1.0, 200)
        ra, dec = w.wcs_pix2world(xi_true + 1.0, eta_true + 1.0, 1)
        xi, eta, cos_c = gnomonic(ra, dec, ra0, dec0)
        assert_allclose(xi, xi_true, atol=1e-9)
        assert_allclose(eta, eta_true, atol=1e-9)
        assert_allclose(cos_c, np.cos(np.radians(angular_separation_deg(ra, dec, ra0, dec0))), atol=1e-12)
        # The inverse against astropy too.
        ra_back, dec_back = inverse_gnomonic(xi_true, eta_true, ra0, dec0)
        assert_allclose(ra_diff(ra_back, ra), 0.0, atol=1e-8)
        assert_allclose(dec_back, dec, atol=1e-9)


def test_gnomonic_round_trip_wide_field_and_ra_wrap(rng):
    ra0, dec0 = 0.3, -60.0
    # Points up to ~20 degrees from the tangent point, straddling RA = 0.
    ra = (ra0 + rng.uniform(-30.0, 30.0, 500)) % 360.0
    dec = dec0 + rng.uniform(-20.0, 20.0, 500)
    xi, eta, _ = gnomonic(ra, dec, ra0, dec0)
    ra2, dec2 = inverse_gnomonic(xi, eta, ra0, dec0)
    assert np.all((ra2 >= 0.0) & (ra2 < 360.0))
    assert_allclose(ra_diff(ra2, ra), 0.0, atol=1e-9)
    assert_allclose(dec2, dec, atol=1e-9)
    # The distance from the tangent point: tan(c) = sqrt(xi^2 + eta^2) in radians.
    c = np.degrees(np.arctan(np.radians(np.hypot(xi, eta))))
    assert_allclose(c, angular_separation_deg(ra, dec, ra0, dec0), atol=1e-9)


def test_gnomonic_min_cos_masks_far_points():
    ra = np.array([40.0, 100.0, 129.0, 131.0, 220.0])
    dec = np.zeros(5)
    xi, eta, cos_c = gnomonic(ra, dec, 40.0, 0.0, min_cos=0.0)  # 0, 60, 89, 91, 180 degrees away
    assert_allclose(cos_c, np.cos(np.radians([0.0, 60.0, 89.0, 91.0, 180.0])), atol=1e-12)
    assert_array_equal(np.isnan(xi), [False, False, False, True, True])
    assert_array_equal(np.isnan(eta), np.isnan(xi))
    assert_allclose(xi[:3], np.degrees(np.tan(np.radians([0.0, 60.0, 89.0]))), rtol=1e-9)
    # Without min_cos the far side projects through the tangent point (finite values).
    xi_all, _, _ = gnomonic(ra[:4], dec[:4], 40.0, 0.0)
    assert np.all(np.isfinite(xi_all))


def test_mean_direction_across_ra_zero():
    ra0, dec0 = mean_direction([359.0, 1.0], [10.0, 10.0])
    assert abs(ra_diff(ra0, 0.0)) < 1e-9
    # The chord midpoint of two points at Dec 10, 2 degrees apart in RA.
    d = np.radians(10.0)
    assert_allclose(dec0, np.degrees(np.arctan2(np.sin(d), np.cos(d) * np.cos(np.radians(1.0)))), atol=1e-12)
    # A naive mean of RA would give 180; a cluster around (0, -45) comes back at its centre.
    rng = np.random.default_rng(7)
    dra = rng.normal(0.0, 0.5, 400)
    ra = np.concatenate([dra, -dra]) % 360.0
    dec = np.concatenate([np.full(400, -45.0), np.full(400, -45.0)])
    ra0, dec0 = mean_direction(ra, dec)
    assert isinstance(ra0, float) and isinstance(dec0, float)
    assert abs(ra_diff(ra0, 0.0)) < 1e-9
    # The mean vector is shorter in the equatorial plane only: it lies poleward of Dec -45.
    d = np.radians(-45.0)
    assert_allclose(dec0, np.degrees(np.arctan2(np.sin(d), np.cos(d) * np.mean(np.cos(np.radians(dra))))),
                    atol=1e-9)
    assert dec0 < -45.0


def test_mean_direction_of_one_point_and_2d_input():
    assert_allclose(mean_direction(123.4, -56.7), (123.4, -56.7), atol=1e-10)
    ra = np.array([[10.0, 20.0], [10.0, 20.0]])
    dec = np.array([[0.0, 0.0], [0.0, 0.0]])
    assert_allclose(mean_direction(ra, dec), (15.0, 0.0), atol=1e-10)


def test_pixel_scale_of_a_tan_wcs():
    from astropy.wcs import WCS

    from apsnake.sphere import pixel_scale_arcsec

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, -30.0]
    wcs.wcs.crpix = [1024.5, 2048.5]
    wcs.wcs.cd = [[-0.263 / 3600, 0.0], [0.0, 0.263 / 3600]]
    assert pixel_scale_arcsec(wcs, (4096, 2048)) == pytest.approx(0.263, rel=1e-6)
    wcs.wcs.cd = [[-0.263 / 3600, 0.0], [0.0, 0.5 * 0.263 / 3600]]  # non-square pixels: the mean
    assert pixel_scale_arcsec(wcs, (4096, 2048)) == pytest.approx(0.263 * np.sqrt(0.5), rel=1e-6)
