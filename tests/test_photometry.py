"""Photometric calibration: zero point, colour terms and the aperture correction.

Synthetic stars with a known zero point / aperture-correction plane, Gaussian noise and
outliers; the fits must recover the truth within their stated errors.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from apsnake.photometry import (AB_NJY_ZERO_POINT, ApertureCorrection, PhotometryConfig, PhotometryError, ZeroPoint,
                                apply_colorterm, fit_aperture_correction, fit_zero_point)

ZP = 28.37  # mag of 1 image unit


def synthetic_stars(rng, n, zp=ZP, ref_err=0.01, outlier_fraction=0.0):
    """Reference mags, instrumental fluxes and errors; the outliers are 0.3-1.5 mag off."""
    ref_true = rng.uniform(15.0, 20.0, n)
    flux_true = 10 ** (-0.4 * (ref_true - zp))
    snr = 2000.0 * 10 ** (-0.2 * (ref_true - 15.0))  # 2000 at mag 15, 200 at mag 20
    flux_err = flux_true / snr
    flux = flux_true + rng.normal(0.0, 1.0, n) * flux_err
    ref_mag = ref_true + rng.normal(0.0, ref_err, n)
    outlier = rng.random(n) < outlier_fraction
    ref_mag[outlier] += rng.choice([-1.0, 1.0], outlier.sum()) * rng.uniform(0.3, 1.5, outlier.sum())
    return flux, flux_err, ref_mag, np.full(n, ref_err), outlier


def test_zero_point_exact_without_noise():
    ref = np.linspace(16.0, 19.0, 12)
    flux = 10 ** (-0.4 * (ref - ZP))
    zp = fit_zero_point(flux, flux / 500.0, ref, np.full(12, 0.01))
    assert isinstance(zp, ZeroPoint)
    assert_allclose(zp.zp, ZP, atol=1e-10)
    assert zp.n_stars == 12 and zp.used.all()
    assert zp.scatter < 1e-10


def test_zero_point_recovered_with_noise_and_outliers(rng):
    flux, flux_err, ref, ref_err, outlier = synthetic_stars(rng, 300, outlier_fraction=0.1)
    assert outlier.sum() > 15
    zp = fit_zero_point(flux, flux_err, ref, ref_err)
    # Per-star scatter ~0.011 mag over ~270 good stars: the error of the mean is ~0.0007 mag.
    assert abs(zp.zp - ZP) < max(4 * zp.err, 0.002)
    assert 0.0004 < zp.err < 0.002
    assert_allclose(zp.scatter, np.hypot(0.01, 1.0857 / 1000), rtol=0.25)  # ref noise and typical flux noise
    assert not zp.used[outlier].any()       # every 0.3+ mag outlier is clipped
    assert zp.used[~outlier].mean() > 0.97  # ... and almost no good star
    assert zp.n_stars == zp.used.sum()


def test_zero_point_is_inverse_variance_weighted():
    """20 stars with 0.005-mag errors at the zero point and 20 with 0.05-mag errors 0.04 mag
    off (within their errors, so none is clipped): the weighted mean is 1% of the way."""
    ref = np.tile(np.linspace(16.0, 18.0, 20), 2)
    flux = 10 ** (-0.4 * (ref - ZP))
    ref_err = np.repeat([0.005, 0.05], 20)
    ref = ref + np.repeat([0.0, 0.04], 20)
    zp = fit_zero_point(flux, flux / 1e6, ref, ref_err)
    w = 1.0 / np.hypot(ref_err, 1.0857e-6) ** 2
    assert zp.n_stars == 40
    assert_allclose(zp.zp, ZP + np.sum(w * np.repeat([0.0, 0.04], 20)) / np.sum(w), atol=1e-9)
    assert abs(zp.zp - ZP) < 0.001  # an unweighted mean would be 0.02 off


def test_zero_point_ignores_unusable_stars(rng):
    flux, flux_err, ref, ref_err, _ = synthetic_stars(rng, 40)
    ref[:6] += 3.0  # would pull the zero point by ~0.5 mag if they were used
    flux[0] = -5.0                 # negative flux
    ref[1] = np.nan                # no reference magnitude
    flux_err[2] = flux[2] / 5.0    # S/N 5 < min_snr 10
    flux_err[3] = 0.0              # no flux error: unusable
    ref_err[4] = 0.2               # poor reference magnitude (> max_ref_mag_err)
    flux_err[5] = np.nan
    config = PhotometryConfig(n_sigma=1e6)  # no clipping: only the cuts can remove them
    zp = fit_zero_point(flux, flux_err, ref, ref_err, config)
    assert not zp.used[:6].any()
    assert zp.used[6:].all() and zp.n_stars == 34
    assert abs(zp.zp - ZP) < 0.01


def test_a_star_without_reference_error_is_weighted_with_the_largest_error_allowed(rng):
    flux, flux_err, ref, ref_err, _ = synthetic_stars(rng, 40)
    ref_err[:] = 0.01
    ref[0] += 0.3          # an offset star ...
    ref_err[0] = np.nan    # ... whose catalogue error is unknown: it must not get a high weight
    zp = fit_zero_point(flux, flux / 1e4, ref, ref_err, PhotometryConfig(n_sigma=1e6))
    assert zp.used[0] and zp.n_stars == 40
    # The offset star weighs 1 / 0.1^2 (max_ref_mag_err), the others 1 / 0.01^2 (their error
    # and a negligible flux error), not 1 / 0.005^2 as an error of 0 would make it.
    dm = ref + 2.5 * np.log10(flux)
    weight = 1 / np.hypot(np.where(np.isfinite(ref_err), ref_err, 0.1), 1.0857e-4) ** 2
    assert zp.zp == pytest.approx(np.sum(weight * dm) / np.sum(weight), abs=1e-9)
    assert abs(zp.zp - np.mean(dm[1:])) < 0.3 / 100 + 1e-3


def test_zero_point_too_few_stars(rng):
    flux, flux_err, ref, ref_err, _ = synthetic_stars(rng, 6)
    ref_err[:2] = 0.5  # leaves 4 < min_stars 5
    with pytest.raises(PhotometryError, match="only 4 stars"):
        fit_zero_point(flux, flux_err, ref, ref_err)
    with pytest.raises(ValueError):  # PhotometryError is a ValueError
        fit_zero_point(flux[:3], flux_err[:3], ref[:3], ref_err[:3])
    # With a lower minimum the same stars give a zero point.
    zp = fit_zero_point(flux, flux_err, ref, ref_err, PhotometryConfig(min_stars=4))
    assert abs(zp.zp - ZP) < 0.03


def test_njy_per_unit_is_consistent_with_ab_magnitudes():
    for zp_value in (AB_NJY_ZERO_POINT, AB_NJY_ZERO_POINT - 2.5, 27.9):
        zp = ZeroPoint(zp=zp_value, err=0.0, scatter=0.0, n_stars=0, used=np.zeros(0, bool))
        flux_adu = 1234.5
        mag = zp_value - 2.5 * np.log10(flux_adu)            # calibrated magnitude
        mag_from_njy = -2.5 * np.log10(flux_adu * zp.njy_per_unit) + AB_NJY_ZERO_POINT
        assert_allclose(mag_from_njy, mag, atol=1e-12)
    assert_allclose(ZeroPoint(AB_NJY_ZERO_POINT, 0, 0, 0, np.zeros(0)).njy_per_unit, 1.0)
    assert_allclose(ZeroPoint(AB_NJY_ZERO_POINT - 2.5, 0, 0, 0, np.zeros(0)).njy_per_unit, 10.0)


def test_apply_colorterm():
    assert_allclose(apply_colorterm(20.0, 19.0, (0.1, 0.2, 0.05)), 20.35)
    rng = np.random.default_rng(11)
    p = rng.uniform(15, 21, 50)
    s = p - rng.uniform(-0.5, 2.0, 50)
    coeffs = (-0.03, 0.12, -0.015)
    color = p - s
    assert_allclose(apply_colorterm(p, s, coeffs), p + np.polyval(coeffs[::-1], color), atol=1e-12)
    assert_allclose(apply_colorterm(p, s, (0.0, 0.0, 0.0)), p)
    assert_allclose(apply_colorterm(list(p), list(s), [0.02, 0.0, 0.0]), p + 0.02)  # lists work too


def test_apcorr_constant_with_outliers(rng):
    shape = (4096, 2048)
    n = 150
    x, y = rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n)
    psf = rng.uniform(1e4, 1e6, n)
    ratio = 1.04 + rng.normal(0, 0.005, n)
    out = np.arange(n) < 12
    ratio[out] += rng.uniform(0.05, 0.3, out.sum())  # blended / contaminated apertures
    ratio[12], ratio[13], ratio[14] = np.nan, 0.1, 3.0  # unusable ratios
    ap = psf * ratio
    apcorr = fit_aperture_correction(x, y, psf, ap, shape)
    assert isinstance(apcorr, ApertureCorrection)
    grid_x, grid_y = np.meshgrid(np.linspace(0, shape[1], 9), np.linspace(0, shape[0], 9))
    # 135 stars with 0.005 scatter: the plane is good to ~0.001 everywhere.
    assert_allclose(apcorr(grid_x, grid_y), 1.04, atol=0.003)
    assert_allclose(apcorr.scatter, 0.005, rtol=0.3)
    assert 125 <= apcorr.n_stars <= 135


def test_apcorr_recovers_linear_plane(rng):
    shape = (4096, 2048)
    n = 200
    x, y = rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n)

    def truth(xx, yy):
        return 1.02 + 2e-5 * xx - 1e-5 * yy

    psf = rng.uniform(1e4, 1e6, n)
    ap = psf * (truth(x, y) + rng.normal(0, 0.003, n))
    apcorr = fit_aperture_correction(x, y, psf, ap, shape)
    grid_x, grid_y = np.meshgrid(np.linspace(0, shape[1], 9), np.linspace(0, shape[0], 9))
    assert_allclose(apcorr(grid_x, grid_y), truth(grid_x, grid_y), atol=0.0015)
    assert apcorr.n_stars >= 195


def test_apcorr_few_stars_is_a_constant(rng):
    shape = (1000, 1000)
    x, y = rng.uniform(0, 1000, 10), rng.uniform(0, 1000, 10)
    ratio = 1.0 + 1e-4 * x  # a gradient the fit must not chase with 10 stars
    apcorr = fit_aperture_correction(x, y, np.ones(10), ratio, shape)
    values = apcorr([0.0, 500.0, 1000.0], [0.0, 1000.0, 500.0])
    assert_allclose(values, np.median(ratio), atol=1e-12)


def test_apcorr_no_usable_stars_is_identity():
    apcorr = fit_aperture_correction([10.0, 20.0, 30.0], [10.0, 20.0, 30.0], [1.0, -2.0, np.nan], [5.0, 1.0, 1.0],
                                     (100, 100))
    assert apcorr.n_stars == 0
    assert_allclose(apcorr([0.0, 50.0, 99.0], [0.0, 50.0, 99.0]), 1.0)


def test_apcorr_metadata_round_trip(rng):
    from astropy.io import fits

    shape = (4096, 2048)
    x, y = rng.uniform(0, shape[1], 100), rng.uniform(0, shape[0], 100)
    ap = 1.03 + 1e-5 * x + 2e-6 * y + rng.normal(0, 0.002, 100)
    apcorr = fit_aperture_correction(x, y, np.ones(100), ap, shape)
    meta = apcorr.to_metadata()
    assert all(len(k) <= 8 for k in meta) and all(isinstance(v, float) for v in meta.values())
    px, py = rng.uniform(0, shape[1], 50), rng.uniform(0, shape[0], 50)
    for stored in (meta, dict(fits.Header(meta))):  # as a dict and through a FITS header
        back = ApertureCorrection.from_metadata(stored)
        assert_allclose(back(px, py), apcorr(px, py), rtol=1e-12)
    # A header written to disk and read back.
    header = fits.Header({"VISIT": 12})
    header.update(meta)
    header = fits.Header.fromstring(header.tostring())
    assert_allclose(ApertureCorrection.from_metadata(header)(px, py), apcorr(px, py), rtol=1e-12)


def test_apcorr_from_metadata_without_the_cards():
    meta = ApertureCorrection(np.array([1.1, 0.0, 0.0]), 1.0, 1.0, 1.0, 0.0, 5).to_metadata()
    assert ApertureCorrection.from_metadata({}) is None
    del meta["APCORSCL"]
    assert ApertureCorrection.from_metadata(meta) is None
