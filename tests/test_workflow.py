"""The Snakemake workflow end to end on the simulated test night."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from apsnake.exposure import read_exposure

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def _config(sim, tmp_path, **extra):
    config = {
        "simulate": None, "raw": str(sim / "raw"), "calibs": str(sim / "calib"),
        "refcat": str(sim / "refcat.parquet"), "templates": {"visits": [411371, 411372]},
        "outdir": str(tmp_path / "out"), **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(tmp_path, config, *args, check=True):
    cmd = SNAKEMAKE + ["--directory", str(tmp_path), "--configfile", str(config), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def workflow_run(sim_test_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("workflow")
    config = _config(sim_test_dir, tmp_path)
    dry = _run(tmp_path, config, "-n")
    run = _run(tmp_path, config)
    return tmp_path, config, dry, run


def test_dry_run_lists_the_jobs(workflow_run):
    _, _, dry, _ = workflow_run
    text = dry.stdout + dry.stderr
    assert "ingest" in text and "checkpoint" in text.lower()


def test_full_run_builds_registry_and_postisr(workflow_run, sim_test_dir):
    tmp_path, _, _, _ = workflow_run
    out = tmp_path / "out"
    exposures = pd.read_parquet(out / "registry" / "exposures.parquet")
    visits = sorted(exposures["visit"].unique())
    assert len(visits) == len(list((sim_test_dir / "raw").glob("*.fits.fz")))
    for visit, detector in zip(exposures["visit"], exposures["detector"]):
        path = out / "postISR" / str(visit) / f"postISR_{visit}_{detector:02d}.fits"
        assert path.exists(), path
        assert (path.with_suffix(".json")).exists()
        assert (out / "logs" / "isr" / str(visit) / f"isr_{visit}_{detector:02d}.log").exists()
        for name, ext in (("calexp", "fits"), ("src", "parquet"), ("calexpBackground", "fits"), ("calexp", "json")):
            assert (out / name / str(visit) / f"{name}_{visit}_{detector:02d}.{ext}").exists(), (name, visit, detector)
    template_visits = {411371, 411372}
    science = exposures[~exposures["visit"].isin(template_visits)]
    assert len(science) > 0
    for visit_, detector_ in zip(science["visit"], science["detector"]):
        for name, ext in (("template", "fits"), ("diffexp", "fits"), ("diffexp", "json"), ("diaSrc", "parquet")):
            assert (out / name / str(visit_) / f"{name}_{visit_}_{detector_:02d}.{ext}").exists(), (name, visit_)
    assert not (out / "diaSrc" / "411371").exists()  # template visits are not differenced
    dia_sources = pd.read_parquet(out / "diaSrc" / str(visit_) / f"diaSrc_{visit_}_{detector_:02d}.parquet")
    assert len(dia_sources) > 0 and dia_sources["diaObjectId"].isna().all()
    assert dia_sources["diaSourceId"].is_unique and (dia_sources["visit"] == visit_).all()
    exp = read_exposure(path)
    assert exp.image.shape == (4096, 2048) and exp.visit_info.visit == visit and exp.detector == detector
    calexp = read_exposure(out / "calexp" / str(visit) / f"calexp_{visit}_{detector:02d}.fits")
    assert calexp.unit == "nJy" and calexp.psf is not None and calexp.wcs.sip is not None
    src = pd.read_parquet(out / "src" / str(visit) / f"src_{visit}_{detector:02d}.parquet")
    assert {"ra", "dec", "psfFlux", "psfFluxErr", "calib_psf_used", "calib_astrometry_used"} <= set(src.columns)
    assert (out / "logs" / "ingest.log").exists() and (out / "benchmarks" / "ingest.tsv").exists()
    leftovers = [p for p in out.rglob(".tmp-*")]
    assert not leftovers


def test_missing_flat_fails_only_that_step_with_a_clear_message(sim_test_dir, tmp_path):
    """A calibration folder without flats: every ISR job fails naming the data ID and the
    missing flat, ingest still succeeds, and nothing partial is left behind."""
    import shutil

    calib = tmp_path / "calib"
    calib.mkdir()
    for path in (sim_test_dir / "calib").iterdir():
        if "fci" not in path.name:
            shutil.copy(path, calib / path.name)
    config = _config(sim_test_dir, tmp_path, calibs=str(calib), visits=[419802], detectors=[25])
    proc = _run(tmp_path, config, "--keep-going", check=False)
    assert proc.returncode != 0
    log = (tmp_path / "out" / "logs" / "isr" / "419802" / "isr_419802_25.log").read_text()
    assert "visit=419802, detector=25" in log and "no flat for band g" in log
    assert "Traceback" not in log
    assert (tmp_path / "out" / "registry" / "exposures.parquet").exists()
    assert not list((tmp_path / "out").rglob("postISR_*.fits"))


def test_rerun_is_a_no_op_and_one_target_can_be_rebuilt(workflow_run):
    tmp_path, config, _, _ = workflow_run
    again = _run(tmp_path, config, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    exposures = pd.read_parquet(tmp_path / "out" / "registry" / "exposures.parquet")
    visit, detector = int(exposures["visit"].iloc[-1]), int(exposures["detector"].iloc[-1])
    target = tmp_path / "out" / "postISR" / str(visit) / f"postISR_{visit}_{detector:02d}.fits"
    before = target.stat().st_mtime_ns
    one = _run(tmp_path, config, str(target), "--forcerun", "isr")
    assert "isr" in one.stdout + one.stderr
    assert target.stat().st_mtime_ns > before


def test_default_template_is_the_best_single_visit(workflow_run):
    from astropy.io import fits

    tmp_path = workflow_run[0]
    header = fits.getheader(tmp_path / "out" / "template" / "419802" / "template_419802_25.fits")
    assert header["TMPLKIND"] == "visit" and int(header["INVISITS"]) in (411371, 411372)
    assert float(header["TMPLCOV"]) > 0.5
    assert not (tmp_path / "out" / "coadd").exists()


def test_coadd_template_mode(sim_test_dir, tmp_path):
    """templates.mode: coadd builds sky-cell coadds of the template visits and warps them."""
    from astropy.io import fits

    config = _config(sim_test_dir, tmp_path)
    text = config.read_text().replace("templates:\n  visits:", "templates:\n  mode: coadd\n  visits:")
    config.write_text(text)
    target = tmp_path / "out" / "diaSrc" / "419802" / "diaSrc_419802_25.parquet"
    _run(tmp_path, config, str(target))
    cells = list((tmp_path / "out" / "coadd" / "g").glob("*.fits"))
    assert cells
    assert fits.getheader(cells[0])["NINPUTS"] >= 1
    header = fits.getheader(tmp_path / "out" / "template" / "419802" / "template_419802_25.fits")
    assert header["TMPLKIND"] == "coadd" and float(header["TMPLCOV"]) > 0.5
    assert len(pd.read_parquet(target)) > 0
