"""Ingest: headers -> registry, bad files reported, calibration selection."""

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from apsnake import registry
from apsnake.instruments import decam_files


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
        raw = decam_files.read_raw_ccd(row.raw_path, row.detector)
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


# ---------------------------------------------------------------------------
# Input locations that match nothing stop the run, naming the config key and the location.
@pytest.mark.parametrize("make, pattern", [
    (lambda tmp: tmp / "no_such_folder", "no such file or folder"),
    (lambda tmp: tmp / "empty", "the folder exists but holds no .fits/.fits.fz file"),
    (lambda tmp: f"{tmp}/empty/*.fits.fz", "a folder searched recursively for .fits/.fits.fz, or a glob"),
    (lambda tmp: tmp / "empty" / "notes.txt", "not a .fits/.fits.fz file"),
])
@pytest.mark.parametrize("key", ["raw", "calibs"])
def test_check_input_files_names_the_key_and_the_location(tmp_path, key, make, pattern):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    location = make(tmp_path)
    with pytest.raises(registry.InputNotFound) as info:
        registry.check_input_files(key, location)
    message = str(info.value)
    assert message.startswith(f"config key {key!r}: {location} matches no file (")
    assert pattern in message
    assert isinstance(info.value, registry.IngestError)
    (tmp_path / "empty" / "sub" / "a.fits.fz").write_text("x")  # found recursively
    assert registry.check_input_files(key, tmp_path / "empty") == [tmp_path / "empty" / "sub" / "a.fits.fz"]


def test_check_input_files_shows_a_relative_location_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(registry.InputNotFound, match=re.escape(f"config key 'raw': data/raw (= {tmp_path}/data/raw) matches")):
        registry.check_input_files("raw", "data/raw")


def test_check_input_file_refcat(tmp_path):
    missing = tmp_path / "refcat.parquet"
    with pytest.raises(registry.InputNotFound) as info:
        registry.check_input_file("refcat", missing)
    assert str(info.value) == (f"config key 'refcat': {missing} matches no file "
                               "(a reference catalogue file: Parquet, FITS or CSV)")
    missing.mkdir()
    with pytest.raises(registry.InputNotFound, match=re.escape(f"config key 'refcat': {missing} is a folder")):
        registry.check_input_file("refcat", missing)
    present = tmp_path / "refcat.csv"
    present.write_text("ra,dec\n")
    assert registry.check_input_file("refcat", present) == present


@pytest.fixture
def junk_calibs(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "junk.fits").write_text("not FITS\n")
    return folder


def test_run_ingest_stops_on_a_raw_location_that_matches_nothing(tmp_path, junk_calibs):
    paths = registry.registry_paths(tmp_path / "registry")
    with pytest.raises(registry.IngestError, match=re.escape(f"config key 'raw': {tmp_path}/rwa matches no file")):
        registry.run_ingest(tmp_path / "rwa", junk_calibs, paths)
    with pytest.raises(registry.IngestError, match=re.escape(f"config key 'calibs': {tmp_path}/calbs matches no file")):
        registry.run_ingest(junk_calibs, tmp_path / "calbs", paths)
    assert not (tmp_path / "registry").exists()


def test_run_ingest_stops_when_every_raw_file_is_rejected(tmp_path, junk_calibs):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(4):
        (raw / f"c4d_{i}.fits.fz").write_text("not FITS\n")
    with pytest.raises(registry.IngestError) as info:
        registry.run_ingest(raw, junk_calibs, registry.registry_paths(tmp_path / "registry"))
    message = str(info.value)
    assert message.startswith(f"config key 'raw': none of the 4 raw files under {raw} could be registered: "
                              "4 rejected, each listed with its reason in the log above")
    assert f"{raw}/c4d_0.fits.fz: not a readable FITS file" in message and "and 1 more" in message
    assert not (tmp_path / "registry").exists()


def test_cli_ingest_names_the_option(tmp_path, junk_calibs, capsys):
    from apsnake.cli import main

    with pytest.raises(SystemExit) as info:
        main(["ingest", "--raw", str(tmp_path / "rwa"), "--calibs", str(junk_calibs),
              "--registry", str(tmp_path / "registry")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert f"option --raw: {tmp_path}/rwa matches no file" in err and "Traceback" not in err
