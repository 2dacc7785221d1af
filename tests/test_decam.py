"""The DECam instrument module against real DECam headers and the camera facts."""

import math

import numpy as np
import pytest
from real_headers import HEADERS, load_header_pair, load_merged

from apsnake.instruments import decam

pytestmark = pytest.mark.skipif(not HEADERS.exists(), reason="../shared/data/real is not present")


def test_ccd_table_has_the_62_science_ccds():
    assert sorted(decam.CCDS) == list(range(1, 63))
    assert decam.ccd_info("S1").ccdnum == 25 and decam.ccd_info(32).name == "N1"
    assert decam.ccd_info(29).amps["A"].gain == pytest.approx(4.088)
    assert decam.ccd_info("S29").amps["B"].saturation == 37531
    assert decam.ccd_info("N7").amps["A"].read_noise == pytest.approx(12.689)
    groups = {c.group for c in decam.CCDS.values()}
    assert groups == {"S", "N"}
    assert all((c.x_mm < 0) == (c.group == "S") for c in decam.CCDS.values())
    with pytest.raises(KeyError):
        decam.ccd_info(63)


def test_working_ccds_follow_the_outages():
    assert decam.DEAD_CCDS == {61}
    assert len(decam.working_ccdnums("2012-10-01")) == 62  # before N30 was damaged
    assert set(decam.SCIENCE_CCDNUMS) - set(decam.working_ccdnums("2015-03-17T02:12:43.681522")) == {2, 61}
    assert set(decam.SCIENCE_CCDNUMS) - set(decam.working_ccdnums("2016-12-07")) == {61}  # S30 back
    assert 31 in decam.working_ccdnums("2015-03-17")  # S7: one dead amplifier, the other half good


@pytest.mark.parametrize(
    "value, band",
    [("g DECam SDSS c0001 4720.0 1520.0", "g"), ("Y DECam c0005 10095.0 1130.0", "y"),
     ("VR DECam c0007 6300.0 2600.0", "VR"), ("g", "g"), ("N964 DECam c0008 9645.0 94.0", "N964")],
)
def test_filter_to_band(value, band):
    got, physical = decam.band_from_filter(value)
    assert got == band
    assert physical.split()[0] == value.split()[0] and "DECam" in physical


def test_unknown_filter_is_a_clear_error():
    with pytest.raises(decam.UnknownFilterError, match="unknown DECam filter 'q DECam"):
        decam.band_from_filter("q DECam c0099 1.0 1.0")


def test_translate_real_raw_header_z_band():
    primary, ext = load_header_pair("fitsheader-decam.yaml")
    info = decam.translate_header(primary)
    assert info.visit == 229388 and info.observation_type == "science"
    assert info.band == "z" and info.physical_filter == "z DECam SDSS c0004 9260.0 1520.0"
    assert info.exposure_time == 200.0
    # DATE-OBS 2013-09-01T06:02:55.753848 UTC; TAI-UTC = 35 s in 2013; mid = start + 100 s.
    assert info.mjd_mid_tai == pytest.approx(56536.25203419 + 135.0 / 86400.0, abs=2e-8)
    # TELRA 02:51:16.790, TELDEC -00:00:05.699 (the sign sits on a zero degree field).
    assert info.boresight_ra == pytest.approx(15 * (2 + 51 / 60 + 16.790 / 3600), abs=1e-7)
    assert info.boresight_dec == pytest.approx(-(5.699 / 3600), abs=1e-9)
    assert info.airmass == 1.57
    assert info.observatory_longitude == pytest.approx(-70.81489)  # OBS-LONG is west-positive
    assert info.observatory_latitude == pytest.approx(-30.16606)
    assert info.observatory_elevation == 2215.0


def test_translate_real_raw_header_g_band():
    primary, _ = load_header_pair("fitsheader-decam-raw_dec050441_25.yaml")
    info = decam.translate_header(primary)
    assert (info.visit, info.band, info.exposure_time, info.airmass) == (177764, "g", 30.0, 1.77)
    assert info.boresight_dec == pytest.approx(-(23 + 46 / 60 + 59.898 / 3600), abs=1e-9)
    assert info.boresight_ra == pytest.approx(15 * (18 + 2 / 60 + 42.907 / 3600), abs=1e-7)
    assert info.mjd_mid_tai == pytest.approx(56336.3761686 + (35 + 15) / 86400.0, abs=2e-8)


def test_translate_real_bias_ignores_stale_filter():
    primary, _ = load_header_pair("fitsheader-decam-0160496.yaml")
    info = decam.translate_header(primary)
    assert info.visit == 160496 and info.observation_type == "bias"
    assert info.band == "opaque"  # FILTER still says Y in this real zero frame


def test_translate_processed_headers():
    # Rubin's calexp keeps the time keywords in the extension: translate the merged header.
    info = decam.translate_header(load_merged("fitsheader-decam-calexp-0412037_10.yaml"))
    assert (info.visit, info.band) == (412037, "g")
    assert info.physical_filter == decam.BAND_TO_PHYSICAL_FILTER["g"]
    primary, _ = load_header_pair("fitsheader-decam-instcal-c4d_190402_050618_ooi_VR_v1.yaml")
    info = decam.translate_header(primary)
    assert (info.visit, info.band, info.exposure_time) == (845291, "VR", 120.0)


def test_amp_sections_of_a_real_s_chip():
    _, ext = load_header_pair("fitsheader-decam.yaml")
    assert ext["CCDNUM"] == 25
    amps = decam.amp_geometry(ext)
    a, b = amps["A"], amps["B"]
    assert a.data.slices == (slice(50, 4146), slice(1080, 2104))
    assert a.serial_overscan.slices == (slice(50, 4146), slice(2104, 2154))
    assert b.data.slices == (slice(50, 4146), slice(56, 1080))
    assert b.serial_overscan.slices == (slice(50, 4146), slice(6, 56))
    assert a.parallel_overscan.slices == (slice(0, 50), slice(1080, 2104))
    assert a.ccd.slices == (slice(0, 4096), slice(1024, 2048))
    # AMPSEC encodes the read-out corner: it must agree with the camera table's corners.
    for amp in (a, b):
        corner = ("U" if amp.readout_flip_y else "L") + ("R" if amp.readout_flip_x else "L")
        assert corner == decam.readout_corner(25, amp.name)
    # Our own section keywords for S chips reproduce the real ones.
    ours = decam.raw_section_keywords(25)
    for key in ("DATASEC", "DATASECA", "DATASECB", "BIASSECA", "BIASSECB", "PRESECA", "POSTSECA",
                "CCDSECA", "CCDSECB", "AMPSECA", "AMPSECB", "DETSEC", "DETSECA", "DETSECB"):
        assert ours[key] == ext[key], key


def test_n_chip_layout_differs():
    kw = decam.raw_section_keywords(32)
    amps = decam.amp_geometry(kw)
    assert amps["A"].data.slices == (slice(0, 4096), slice(56, 1080))
    assert amps["A"].parallel_overscan.slices == (slice(4096, 4146), slice(56, 1080))
    assert amps["B"].serial_overscan.slices == (slice(0, 4096), slice(2104, 2154))
    assert kw["DETSEC"] == "[14337:16384,1:4096]"  # real N1 value (docs/formats.md §3.3)
    assert decam.readout_corner(32, "A") == "LL"


def test_parse_section_round_trip():
    sec = decam.parse_section("[2048:1025,4096:1]")
    assert (sec.x0, sec.x1, sec.y0, sec.y1, sec.flip_x, sec.flip_y) == (1024, 2048, 0, 4096, True, True)
    assert sec.to_fits() == "[2048:1025,4096:1]"
    with pytest.raises(ValueError):
        decam.parse_section("57:2104,51:4146")


def test_crosstalk_table():
    terms = decam.crosstalk_table()
    assert len(terms) == 249
    intra = [t for t in terms if t.victim_ccd == t.source_ccd]
    assert len(intra) == 123
    s1 = {(t.victim_amp, t.source_amp): t.coefficient for t in decam.crosstalk_sources(25) if t.source_ccd == 25}
    assert s1 == {("B", "A"): 1.34e-04, ("A", "B"): 3.16e-04}
    # S chips: A (UR) and B (UL) differ left/right only, so the source is mirrored in x.
    assert decam.crosstalk_flips((25, "A"), (25, "B")) == (True, False)
    assert decam.crosstalk_flips((32, "B"), (32, "A")) == (True, False)


def test_real_header_wcs_footprint():
    _, ext = load_header_pair("fitsheader-decam.yaml")
    corners = decam.footprint_corners(ext, 25)
    bore_ra, bore_dec = ext["CRVAL1"], ext["CRVAL2"]
    centre = corners.mean(axis=0)
    # S1 sits at (-16.8, -191.2) mm in the focal plane: 0.937 deg from the boresight at 17.575"/mm.
    expected = math.hypot(16.798, 191.216) * decam.PLATE_SCALE_ARCSEC_PER_MM / 3600
    dra = (centre[0] - bore_ra) * math.cos(math.radians(bore_dec))
    assert math.hypot(dra, centre[1] - bore_dec) == pytest.approx(expected, rel=0.05)
    # The CCD spans 2048 x 4096 pixels of ~0.263": 0.15 x 0.30 deg.
    side_x = np.hypot(*(corners[1] - corners[0]))
    side_y = np.hypot(*(corners[3] - corners[0]))
    assert side_x == pytest.approx(2048 * 0.263 / 3600, rel=0.06)
    assert side_y == pytest.approx(4096 * 0.263 / 3600, rel=0.06)


def test_detector_exposure_id():
    assert decam.detector_exposure_id(229388, 25) == 22938825
