"""Ingest: headers -> registry, bad files reported, calibration selection."""

import shutil

import numpy as np
import pandas as pd
import pytest

from apsnake import registry
from apsnake.instruments import decam


@pytest.fixture
def raw_folder(sim_test_dir, tmp_path):
    """The test night's raw files plus one truncated, one non-FITS and one duplicate file."""
    folder = tmp_path / "raw"
    shutil.copytree(sim_test_dir / "raw", folder)
    raws = sorted(folder.glob("*.fits.fz"))
    good = raws[0]
    data = good.read_bytes()
    (folder / "c4d_999999_000000_ori.fits.fz").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "notes.fits").write_text("this is not FITS\n")
    shutil.copy(good, folder / "zz_copy_of_first.fits.fz")  # same EXPNUM twice
    return folder, raws


def test_ingest_reports_bad_files_and_registers_the_rest(raw_folder, sim_test_dir, tmp_path):
    folder, raws = raw_folder
    reg = registry.run_ingest(folder, sim_test_dir / "calib", registry.registry_paths(tmp_path / "registry"))
    rejected = reg.rejected.set_index("path")["reason"].to_dict()
    assert len(rejected) == 3, rejected
    assert "truncated" in rejected[str(folder / "c4d_999999_000000_ori.fits.fz")]
    assert "not a readable FITS file" in rejected[str(folder / "notes.fits")]
    assert "duplicate EXPNUM" in rejected[str(folder / "zz_copy_of_first.fits.fz")]
    exposures = reg.exposures
    assert exposures["visit"].nunique() == len(raws)  # every good file registered, once
    assert set(exposures["detector"]) == {25, 32}
    assert len(exposures) == 2 * len(raws)
    # Read back from Parquet: the same table, with the documented columns.
    back = pd.read_parquet(tmp_path / "registry" / "exposures.parquet")
    assert list(back.columns) == registry.EXPOSURE_COLUMNS
    pd.testing.assert_frame_equal(back, exposures)
    row = back.iloc[0]
    assert row["band"] == "g" and row["observation_type"] == "science" and row["exposure_time"] > 0
    assert np.isfinite([row["ra_center"], row["dec_center"], row["ra_ll"], row["dec_ul"]]).all()
    assert pd.read_parquet(tmp_path / "registry" / "rejected.parquet").shape[0] == 3


def test_registry_values_match_the_headers(sim_test_dir):
    reg = registry.build_registry(registry.find_input_files(sim_test_dir / "raw"),
                                  registry.find_input_files(sim_test_dir / "calib"))
    truth = pd.read_parquet(sim_test_dir / "truth" / "visits.parquet").set_index("visit")
    for row in reg.exposures.itertuples():
        assert row.mjd_mid_tai == pytest.approx(truth.loc[row.visit, "mjd_mid_tai"], abs=1e-6)
        raw = decam.read_raw_ccd(row.raw_path, row.detector)
        assert raw.hdu == row.hdu
    assert set(reg.calibs["calib_type"]) == {"bias", "flat", "bpm"}
    assert reg.rejected.empty


def test_conflicting_duplicates_are_both_rejected(sim_test_dir, tmp_path):
    from astropy.io import fits

    raws = sorted((sim_test_dir / "raw").glob("*.fits.fz"))
    a = tmp_path / "a.fits.fz"
    b = tmp_path / "b.fits.fz"
    shutil.copy(raws[0], a)
    with fits.open(raws[1]) as hdul:  # another exposure relabelled with a's EXPNUM
        hdul[0].header["EXPNUM"] = fits.getheader(a)["EXPNUM"]
        hdul.writeto(b)
    reg = registry.build_registry([a, b], [])
    assert reg.exposures.empty
    assert sorted(reg.rejected["path"]) == [str(a), str(b)]
    assert all("different headers" in r for r in reg.rejected["reason"])


def test_unknown_filter_and_missing_ccds_are_reported(sim_test_dir, tmp_path):
    from astropy.io import fits

    raw = sorted((sim_test_dir / "raw").glob("*.fits.fz"))[0]
    odd = tmp_path / "odd_filter.fits.fz"
    with fits.open(raw) as hdul:
        hdul[0].header["FILTER"] = "q DECam c0099 1.0 1.0"
        hdul.writeto(odd)
    empty = tmp_path / "no_ccds.fits"
    with fits.open(raw) as hdul:
        fits.HDUList([fits.PrimaryHDU(header=hdul[0].header)]).writeto(empty)
    reg = registry.build_registry([odd, empty], [])
    reasons = reg.rejected.set_index("path")["reason"]
    assert "unknown DECam filter" in reasons[str(odd)]
    assert "without usable CCD extensions" in reasons[str(empty)]


def test_calibration_selection():
    calibs = pd.DataFrame([
        {"calib_type": "bias", "band": "", "mjd": 57000.0, "detector": 25, "path": "b1", "hdu": 1},
        {"calib_type": "bias", "band": "", "mjd": 57098.0, "detector": 25, "path": "b2", "hdu": 1},
        {"calib_type": "flat", "band": "g", "mjd": 57090.0, "detector": 25, "path": "fg", "hdu": 2},
        {"calib_type": "flat", "band": "r", "mjd": 57098.0, "detector": 25, "path": "fr", "hdu": 2},
        {"calib_type": "bpm", "band": "", "mjd": 56000.0, "detector": 25, "path": "m1", "hdu": 1},
        {"calib_type": "bpm", "band": "", "mjd": 57050.0, "detector": 25, "path": "m2", "hdu": 1},
        {"calib_type": "bpm", "band": "", "mjd": 57200.0, "detector": 25, "path": "m3", "hdu": 1},
    ])
    row = {"visit": 1, "detector": 25, "band": "g", "mjd_mid_tai": 57097.0}
    chosen = registry.select_calibrations(calibs, row)
    assert chosen == {"bias": ("b2", 1), "flat": ("fg", 2), "bpm": ("m2", 1)}
    with pytest.raises(registry.CalibrationNotFound, match=r"visit=1, detector=25.*flat for band z"):
        registry.select_calibrations(calibs, {**row, "band": "z"})
    with pytest.raises(registry.CalibrationNotFound, match="no bias"):
        registry.select_calibrations(calibs, {**row, "detector": 32})


def test_find_input_files_folder_and_glob(tmp_path):
    (tmp_path / "night").mkdir()
    for name in ("a.fits.fz", "b.fits", "c.txt", ".hidden.fits"):
        (tmp_path / "night" / name).write_text("x")
    assert [p.name for p in registry.find_input_files(tmp_path / "night")] == ["a.fits.fz", "b.fits"]
    assert [p.name for p in registry.find_input_files(f"{tmp_path}/night/*.fz")] == ["a.fits.fz"]
