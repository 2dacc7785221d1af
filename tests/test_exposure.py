"""Exposure FITS round trip: every plane, the WCS, mask plane names, PSF and visit info."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apsnake.exposure import (DEFAULT_MASK_PLANES, Exposure, ExposureFormatError, ExposureUnitError, PhotoCalib, PsfModel,
                              VisitInfo, as_stored, read_exposure, write_exposure)


def _sip_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [1024.5, 2048.5]
    w.wcs.cd = [[0.0, 7.3e-5], [-7.3e-5, 0.0]]
    from astropy.wcs import Sip

    a = np.zeros((4, 4)); b = np.zeros((4, 4))
    a[2, 0] = 2e-7; b[0, 2] = -1.5e-7; a[1, 1] = 5e-8
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w


def _exposure(rng):
    shape = (64, 48)
    info = VisitInfo(
        visit=419802, band="g", physical_filter="g DECam SDSS c0001 4720.0 1520.0", mjd_mid_tai=57098.123456789,
        date_obs_utc="2015-03-17T02:57:00.000", exposure_time=90.0, airmass=1.23, boresight_ra=150.1,
        boresight_dec=2.2, observatory_longitude=-70.81489, observatory_latitude=-30.16606,
        observatory_elevation=2215.0, object_name="field 1", dark_time=91.2, zenith_distance=35.5,
        azimuth=12.25,
    )
    exp = Exposure(
        image=rng.normal(100, 5, shape).astype(np.float32), mask=np.zeros(shape, np.int32),
        variance=rng.uniform(20, 30, shape).astype(np.float32), visit_info=info, detector=25,
        detector_name="S1", unit="nJy", wcs=_sip_wcs(), photo_calib=PhotoCalib(1.0, 0.01),
        psf=PsfModel(components=rng.normal(size=(6, 21, 21)).astype(np.float32), spatial_order=2,
                     x0=24.0, y0=32.0, scale=32.0, fwhm_pixels=3.9),
        metadata={"ISRTIME": 1.25},
    )
    exp.set_mask("SAT", exp.image > 108)
    exp.set_mask("SAT_TEMPLATE", exp.image < 92)  # a dynamic plane takes the next free bit
    exp.image[0, 0] = np.nan
    return exp


def test_round_trip(tmp_path, rng):
    exp = _exposure(rng)
    path = tmp_path / "calexp_419802_25.fits"
    write_exposure(exp, path)
    got = read_exposure(path)
    np.testing.assert_array_equal(got.image, exp.image)
    np.testing.assert_array_equal(got.mask, exp.mask)
    np.testing.assert_array_equal(got.variance, exp.variance)
    assert got.mask_planes == exp.mask_planes
    assert got.mask_planes["SAT_TEMPLATE"] == max(DEFAULT_MASK_PLANES.values()) + 1
    assert got.visit_info == exp.visit_info
    assert got.visit_info.mjd_mid_tai == 57098.123456789  # full double precision survives
    assert (got.detector, got.detector_name, got.unit) == (25, "S1", "nJy")
    assert got.photo_calib == exp.photo_calib
    assert got.metadata["ISRTIME"] == 1.25
    np.testing.assert_allclose(got.psf.components, exp.psf.components)
    assert (got.psf.spatial_order, got.psf.scale, got.psf.fwhm_pixels) == (2, 32.0, 3.9)
    xs, ys = np.meshgrid(np.arange(0, 48, 7.0), np.arange(0, 64, 9.0))
    ra0, dec0 = exp.wcs.all_pix2world(xs, ys, 0)
    ra1, dec1 = got.wcs.all_pix2world(xs, ys, 0)
    np.testing.assert_allclose(ra1, ra0, atol=1e-10)
    np.testing.assert_allclose(dec1, dec0, atol=1e-10)
    assert got.wcs.sip is not None


def test_as_stored_is_what_reading_the_file_back_gives(tmp_path, rng):
    """A merged workflow job hands images on with ``as_stored`` instead of writing and reading
    them: the same planes, WCS (through its header cards), visit info, metadata and PSF, and a
    PSF built from a transposed view evaluates to the last bit like the one read back."""
    exp = _exposure(rng)
    exp.psf = PsfModel(components=rng.normal(size=(21, 21, 6)).astype(np.float32).transpose(2, 0, 1),
                       spatial_order=2, x0=24.0, y0=32.0, scale=32.0, fwhm_pixels=3.9)
    write_exposure(exp, tmp_path / "e.fits")
    read, stored = read_exposure(tmp_path / "e.fits"), as_stored(exp)
    for plane in ("image", "mask", "variance"):
        np.testing.assert_array_equal(getattr(stored, plane), getattr(read, plane))
    assert stored.wcs.to_header_string() == read.wcs.to_header_string()
    assert (stored.visit_info, stored.metadata, stored.mask_planes, stored.photo_calib) == (
        read.visit_info, read.metadata, read.mask_planes, read.photo_calib)
    assert stored.psf.components.flags.c_contiguous and exp.psf.components.flags.c_contiguous
    for x, y in ((3.0, 5.0), (40.5, 60.25)):
        assert np.array_equal(stored.psf.evaluate(x, y), read.psf.evaluate(x, y))
        assert np.array_equal(exp.psf.evaluate(x, y), read.psf.evaluate(x, y))


def test_file_is_plain_fits_with_rubin_mask_keywords(tmp_path, rng):
    exp = _exposure(rng)
    path = tmp_path / "e.fits"
    write_exposure(exp, path)
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        assert hdul["IMAGE"].data.dtype == np.dtype(">f4")
        assert hdul["MASK"].data.dtype == np.dtype(">i4")
        assert hdul["MASK"].header["MP_BAD"] == 0 and hdul["MASK"].header["MP_SAT"] == 1
        assert hdul["MASK"].header["MP_DETECTED_NEGATIVE"] == 6
        assert hdul[0].header["VISIT"] == 419802 and hdul[0].header["BAND"] == "g"
        assert hdul["IMAGE"].header["CTYPE1"].startswith("RA---TAN")


def test_unknown_values_stay_nan(tmp_path, rng):
    exp = _exposure(rng)
    exp.visit_info.airmass = float("nan")
    write_exposure(exp, tmp_path / "e.fits")
    assert np.isnan(read_exposure(tmp_path / "e.fits").visit_info.airmass)


def test_mask_helpers(rng):
    exp = _exposure(rng)
    sat = exp.mask_of("SAT")
    np.testing.assert_array_equal(sat, exp.image > 108)
    assert not exp.mask_of("NO_SUCH_PLANE").any()
    assert exp.bits("SAT", "BAD", "NO_SUCH_PLANE") == (1 << DEFAULT_MASK_PLANES["SAT"]) | 1 and exp.bits() == 0
    # Bad pixels: a named plane, a non-finite value or a non-positive variance.
    exp.image[0, 0], exp.variance[0, 1] = np.nan, 0.0
    bad = exp.bad_pixels(["SAT"])
    assert bad[0, 0] and bad[0, 1] and (bad[sat]).all() and bad.sum() <= sat.sum() + 2


def test_translate_mask_into_another_plane_numbering():
    exp = Exposure.empty((2, 3), VisitInfo(visit=1), detector=1)
    foreign_planes = {"SAT": 4, "FOO": 12}  # SAT where this exposure has EDGE; FOO unknown here
    foreign = np.array([[1 << 4, 1 << 12, 0], [(1 << 4) | (1 << 12), 0, 0]], np.int32)
    out = exp.translate_mask(foreign, foreign_planes)
    assert "FOO" in exp.mask_planes and exp.mask_planes["SAT"] == 1
    expected = np.array([[exp.bits("SAT"), exp.bits("FOO"), 0], [exp.bits("SAT", "FOO"), 0, 0]], np.int32)
    np.testing.assert_array_equal(out, expected)
    same = np.array([[2, 0, 0], [0, 0, 0]], np.int32)
    assert exp.translate_mask(same, dict(exp.mask_planes)) is same  # one numbering: nothing to do


def test_njy_per_unit():
    exp = Exposure.empty((2, 2), VisitInfo(visit=5), detector=7, unit="adu", photo_calib=PhotoCalib(3.5))
    assert exp.njy_per_unit() == 3.5
    assert Exposure.empty((2, 2), VisitInfo(visit=5), detector=7, unit="nJy").njy_per_unit() == 1.0
    with pytest.raises(ExposureUnitError, match=r"calexp of data ID \(5, 7\).*'adu'"):
        Exposure.empty((2, 2), VisitInfo(visit=5), detector=7, unit="adu").njy_per_unit("calexp")


def test_psf_model_evaluates_normalised():
    comps = np.zeros((3, 5, 5), np.float32)
    comps[0, 2, 2] = 1.0
    comps[1, 2, 3] = 1.0  # grows with u
    psf = PsfModel(comps, spatial_order=1, x0=0.0, y0=0.0, scale=10.0)
    image = psf.evaluate(10.0, 0.0)
    assert image.sum() == pytest.approx(1.0)
    assert image[2, 2] == pytest.approx(0.5) and image[2, 3] == pytest.approx(0.5)


def test_write_is_atomic(tmp_path, rng, monkeypatch):
    exp = _exposure(rng)
    path = tmp_path / "e.fits"
    write_exposure(exp, path)
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", boom)
    with pytest.raises(OSError, match="disk full"):
        write_exposure(exp, path)
    assert path.read_bytes() == before  # the old complete file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["e.fits"]  # no temporary left behind


def test_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "notfits.fits"
    bad.write_text("hello")
    with pytest.raises(ExposureFormatError, match="notfits.fits"):
        read_exposure(bad)
    fits.PrimaryHDU().writeto(tmp_path / "empty.fits")
    with pytest.raises(ExposureFormatError, match="no IMAGE extension"):
        read_exposure(tmp_path / "empty.fits")


def test_background_model_is_quantised_below_the_noise(tmp_path):
    """A smooth model written with the image's noise: at most noise / 2000 off, ~10x smaller
    than the float32 pixels; without a noise it is written nearly losslessly."""
    from astropy.io import fits

    from apsnake.exposure import write_background

    y, x = np.mgrid[0:512, 0:256]
    model = (30.0 + 0.002 * x + 0.001 * y + 0.3 * np.sin(x / 80.0) * np.cos(y / 120.0)).astype(np.float32)
    write_background(model, tmp_path / "bkg.fits", noise=4.0)
    with fits.open(tmp_path / "bkg.fits") as hdus:
        back = hdus["BACKGROUND"].data
        assert hdus["BACKGROUND"].header["BUNIT"] == "adu"
    assert np.abs(back - model).max() <= 4.0 / 2000 * 1.01
    assert (tmp_path / "bkg.fits").stat().st_size < model.nbytes / 5
    write_background(model, tmp_path / "bkg_default.fits")
    assert np.abs(fits.getdata(tmp_path / "bkg_default.fits", "BACKGROUND") - model).max() < 1e-4
