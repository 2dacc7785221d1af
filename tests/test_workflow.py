"""The Snakemake workflow end to end on the simulated test night."""

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from apsnake.exposure import read_exposure

from workflow_helpers import (
    SNAKEMAKE, _config, _copy_run, _job_stats, _run, assert_same_alert_files, assert_same_data_id_products,
)

# The finished run of the test night, ``workflow_run``, is a session fixture (conftest.py): the
# alert tests (test_alerts_workflow.py) read the same run.


def test_dry_run_lists_the_jobs(workflow_run):
    tmp_path, config, dry, _ = workflow_run
    # Before the registry exists, a dry run can only plan up to the ingest checkpoint.
    assert _job_stats(dry) == {"ingest": 1, "all": 1}
    assert "checkpoint" in (dry.stdout + dry.stderr).lower()
    # After the run the registry exists and every rule's jobs can be planned. (--forceall
    # would plan ingest again and stop at the checkpoint once more; forcing isr re-plans
    # everything after the checkpoint.)
    exposures = pd.read_parquet(tmp_path / "out" / "registry" / "exposures.parquet")
    data_ids = set(zip(exposures["visit"], exposures["detector"]))
    science = {(v, d) for v, d in data_ids if v not in (411371, 411372)}
    assert 0 < len(science) < len(data_ids)
    after = _run(tmp_path, config, "-n", "--forcerun", "processCcd")
    later = {"associate": len(science), "package_alerts": len(science), "fakes": len(science), "night_summary": 1,
             "report": 1, "all": 1}
    assert _job_stats(after) == {"processCcd": len(data_ids), "imageDifference": len(science), **later}
    # step_jobs: separate plans one job per step for the same products.
    separate = tmp_path / "config_separate.yaml"
    separate.write_text(config.read_text() + "step_jobs: separate\n")
    assert _job_stats(_run(tmp_path, separate, "-n", "--forcerun", "isr")) == {
        "isr": len(data_ids), "calibrate": len(data_ids), "template": len(science), "diffim": len(science),
        "detectDiaSources": len(science), **later,
    }
    assert _job_stats(_run(tmp_path, config, "-n", "--forceall")) == {"ingest": 1, "all": 1}


def test_separate_step_jobs_make_the_same_products(workflow_run, sim_test_dir, tmp_path):
    """step_jobs: separate (one job per step, each reading what the previous one wrote) and the
    default merged jobs (processCcd, imageDifference: the shared run) make the same products: a
    merged job hands each image on as the next job would read it back (exposure.as_stored), to
    the last bit (a PSF handed on as a transposed view once moved a dipole fit's errors by 2e-5)."""
    visit = 419802
    config = _config(sim_test_dir, tmp_path, visits=[411371, 411372, visit], step_jobs="separate")
    targets = [str(tmp_path / "out" / "diaSrc" / str(visit) / f"diaSrc_{visit}_{d}.parquet") for d in (25, 32)]
    proc = _run(tmp_path, config, *targets)
    assert "detectDiaSources" in proc.stdout + proc.stderr and "imageDifference" not in proc.stdout + proc.stderr
    calexp_products = [("postISR", "fits"), ("postISR", "json"), ("calexp", "fits"), ("calexp", "json"),
                       ("src", "parquet"), ("calexpBackground", "fits")]
    difference_products = [("template", "fits"), ("diffexp", "fits"), ("diffexp", "json"),
                           ("matchedTemplate", "fits"), ("diaSrc", "parquet")]
    for detector in (25, 32):
        for data_visit in (411371, 411372, visit):
            assert_same_data_id_products(tmp_path / "out", workflow_run[0] / "out", data_visit, detector,
                                         calexp_products)
        assert_same_data_id_products(tmp_path / "out", workflow_run[0] / "out", visit, detector,
                                     difference_products)


@pytest.mark.parametrize("key", ["raw", "calibs", "refcat"])
def test_mistyped_input_location_stops_the_workflow(sim_test_dir, tmp_path, key):
    """A raw/calibs/refcat path that matches nothing: the workflow does not load, and the
    message names the config key and the path (before, a mistyped raw folder registered
    no exposure and the run "succeeded" with nothing done)."""
    wrong = str(tmp_path / f"{key}_typo")
    config = _config(sim_test_dir, tmp_path, **{key: wrong})
    proc = _run(tmp_path, config, "-n", check=False)
    text = proc.stdout + proc.stderr  # Snakemake 9 logs the error on stdout
    assert proc.returncode != 0
    assert f"config key {key!r}: {wrong} matches no file (" in text, text[-3000:]
    assert "Job stats" not in text
    assert not (tmp_path / "out").exists()


def test_simulated_inputs_need_not_exist_when_the_workflow_loads(tmp_path):
    """With `simulate`, raw/calibs/refcat under simulate.outdir are written by the simulate
    job, so their absence is no error."""
    night = tmp_path / "night"
    config = _config(night, tmp_path, simulate={"preset": "test", "seed": 1, "outdir": str(night)})
    proc = _run(tmp_path, config, "-n")
    assert _job_stats(proc) == {"simulate": 1, "ingest": 1, "all": 1}


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
        assert (out / "logs" / "processCcd" / str(visit) / f"processCcd_{visit}_{detector:02d}.log").exists()
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
    log = (tmp_path / "out" / "logs" / "processCcd" / "419802" / "processCcd_419802_25.log").read_text()
    assert "visit=419802, detector=25" in log and "no flat for band g" in log
    assert "Traceback" not in log
    assert (tmp_path / "out" / "registry" / "exposures.parquet").exists()
    assert not list((tmp_path / "out").rglob("postISR_*.fits"))


@pytest.mark.parametrize("step_jobs", ["merged", "separate"])
def test_postisr_is_deleted_once_its_calexp_exists_when_not_kept(sim_test_dir, tmp_path, step_jobs):
    """keep_postisr: false (a whole focal plane's postISR images are ~18 GB): the postISR image of
    a data ID is gone once its calexp is made (merged jobs never write it, separate ones delete
    it), its JSON stays, a later run has nothing to do, and a postISR asked for as a target is
    made and kept."""
    config = _config(sim_test_dir, tmp_path, visits=[419802], detectors=[25], keep_postisr=False,
                     step_jobs=step_jobs)
    out = tmp_path / "out"
    calexp = out / "calexp" / "419802" / "calexp_419802_25.fits"
    post_isr = out / "postISR" / "419802" / "postISR_419802_25.fits"
    _run(tmp_path, config, str(calexp))
    assert calexp.exists() and not post_isr.exists()
    assert post_isr.with_suffix(".json").exists()
    again = _run(tmp_path, config, str(calexp), "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    _run(tmp_path, config, str(post_isr))
    assert post_isr.exists()


def test_rerun_is_a_no_op_and_one_target_can_be_rebuilt(workflow_run, tmp_path):
    again = _run(workflow_run[0], workflow_run[1], "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    # The rebuild on a copy: the shared run stays as it was for the tests after this one.
    _copy_run(workflow_run, tmp_path, keep_apdb=True)
    config = tmp_path / "config.yaml"
    exposures = pd.read_parquet(tmp_path / "out" / "registry" / "exposures.parquet")
    visit, detector = int(exposures["visit"].iloc[-1]), int(exposures["detector"].iloc[-1])
    target = tmp_path / "out" / "postISR" / str(visit) / f"postISR_{visit}_{detector:02d}.fits"
    before = target.stat().st_mtime_ns
    one = _run(tmp_path, config, str(target), "--forcerun", "processCcd")
    assert "processCcd" in one.stdout + one.stderr
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


# ---------------------------------------------------------------------------
# Association into the APDB (issue 6).
TABLES = ("DiaSource", "DiaObject", "DiaForcedSource")
SORT_KEYS = {"DiaSource": ["diaSourceId"], "DiaObject": ["diaObjectId", "validityStartMjdTai"],
             "DiaForcedSource": ["diaForcedSourceId"]}


def _apdb_tables(out):
    """Every APDB row, sorted, without the processing timestamps (the only column that
    legitimately differs between two runs)."""
    from apsnake.apdb import Apdb

    db = Apdb(out)
    frames = {"DiaSource": db.sources(), "DiaObject": _all_versions(out), "DiaForcedSource": db.forced_sources()}
    return {name: frame.drop(columns=["timeProcessedMjdTai"], errors="ignore")
            .sort_values(SORT_KEYS[name]).reset_index(drop=True) for name, frame in frames.items()}


def _all_versions(out):
    paths = sorted((out / "apdb" / "DiaObject").rglob("DiaObject_*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def _assert_same_apdb(a, b):
    for name in TABLES:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def _markers(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "apdb_marker").rglob("apdb_marker_*.json")}


def test_fakes_of_every_science_data_id_and_the_fraction(workflow_run, tmp_path):
    """Rule fakes: one Fake table per science data ID (fakes.fraction 1), most bright fakes
    recovered, none in the APDB; fakes.fraction picks the data IDs (0: none)."""
    import shutil

    import pyarrow.parquet as pq
    import yaml

    from apsnake import schema
    from apsnake.fakes import select_fake_data_ids

    out = workflow_run[0] / "out"
    exposures = pd.read_parquet(out / "registry" / "exposures.parquet")
    science = sorted((int(v), int(d)) for v, d in zip(exposures["visit"], exposures["detector"])
                     if v not in (411371, 411372))
    tables = [pq.read_table(out / "fakes" / str(v) / f"fakes_{v}_{d:02d}.parquet") for v, d in science]
    assert all(t.schema == schema.arrow_schema("Fake") for t in tables)
    fakes = pd.concat([t.to_pandas() for t in tables])
    assert len(fakes) > 40 * len(science)
    assert fakes.loc[fakes["expectedSnr"] > 15, "recovered"].mean() > 0.9
    apdb = pd.concat([pd.read_parquet(p, columns=["pixelFlags_injected", "pixelFlags_injectedCenter"])
                      for p in (out / "apdb" / "DiaSource").rglob("*.parquet")])
    assert not apdb.fillna(False).to_numpy().any()  # no injected pixels reach the APDB
    copy, config = _copy_run(workflow_run, tmp_path, keep_apdb=True)
    shutil.rmtree(copy / "fakes")
    settings = yaml.safe_load(config.read_text())
    for fraction in (0.5, 0.0):
        settings["fakes"] = {"fraction": fraction}
        config.write_text(yaml.safe_dump(settings))
        expected = len(select_fake_data_ids(science, fraction))
        dry = _run(tmp_path, config, "-n")
        # (an earlier test may have re-made one postISR of the shared run: its chain is planned too)
        planned = 0 if "Nothing to be done" in dry.stdout + dry.stderr else _job_stats(dry).get("fakes", 0)
        assert planned == expected


def test_association_writes_fragments_and_markers(workflow_run):
    import json

    from apsnake.apdb import Apdb

    out = workflow_run[0] / "out"
    exposures = pd.read_parquet(out / "registry" / "exposures.parquet")
    science = exposures[~exposures["visit"].isin([411371, 411372])]
    db = Apdb(out)
    summary = db.summary()
    assert summary["data_ids"] == len(science)
    for visit, detector in zip(science["visit"], science["detector"]):
        marker = json.loads((out / "apdb_marker" / str(visit) / f"apdb_marker_{visit}_{detector:02d}.json").read_text())
        for table in TABLES:
            rows = pd.read_parquet(out / "apdb" / table / str(visit) / f"{table}_{visit}_{detector:02d}.parquet")
            assert marker["counts"][table] == len(rows)
        for key in ("numNewDiaObjects", "numUnassociatedDiaObjects", "fracUpdatedDiaObjects"):
            assert key in marker
        log = (out / "logs" / "associate" / str(visit) / f"associate_{visit}_{detector:02d}.log").read_text()
        assert f"visit={visit} detector={detector}" in log
    sources = db.sources()
    dia_src = pd.concat([pd.read_parquet(p) for p in (out / "diaSrc").rglob("*.parquet")])
    assert len(sources) == len(dia_src) and sources["diaSourceId"].is_unique
    objects = db.objects()
    assert objects["diaObjectId"].is_unique and set(objects["diaObjectId"]) <= set(sources["diaSourceId"])
    assert (objects["nDiaSources"] >= 1).all()
    assert set(sources["diaObjectId"].dropna()) == set(objects["diaObjectId"])
    forced = db.forced_sources()
    assert len(forced) >= len(objects) and set(forced["diaObjectId"]) <= set(objects["diaObjectId"])
    assert not list(out.rglob(".tmp-*"))


def test_association_links_the_truth(workflow_run, sim_test_dir):
    from apsnake.sim.evaluate import evaluate_association

    score = evaluate_association(sim_test_dir, workflow_run[0] / "out")
    assert score["n_truth_multi_visit"] >= 8
    assert score["frac_truth_on_one_object"] >= 0.99, score["split_truth_ids"]
    assert score["frac_objects_mixing_truth"] < 0.01
    assert score["n_asteroid_detections"] >= 2 and score["n_objects_linking_asteroid_visits"] == 0


def test_association_is_the_same_with_one_core(workflow_run, tmp_path):
    """--cores 1 after --cores 2: the same APDB, and the same alert files apart from the
    processing timestamps (issue 12)."""
    out, config = _copy_run(workflow_run, tmp_path)
    proc = _run(tmp_path, config, "--cores", "1")
    assert "associate" in proc.stdout + proc.stderr and "package_alerts" in proc.stdout + proc.stderr
    assert "processCcd" not in proc.stdout + proc.stderr  # only association re-ran
    assert "imageDifference" not in proc.stdout + proc.stderr
    _assert_same_apdb(_apdb_tables(out), _apdb_tables(workflow_run[0] / "out"))
    assert_same_alert_files(out, workflow_run[0] / "out")


def test_rerunning_one_data_id_reruns_its_chain_and_gives_the_same_apdb(workflow_run, tmp_path):
    """--force one association, then the workflow: exactly the later associations that
    depend on it re-run, and the APDB equals the first run's (no duplicates)."""
    from apsnake.association.plan import association_plan

    out, config = _copy_run(workflow_run, tmp_path, keep_apdb=True)
    exposures = pd.read_parquet(out / "registry" / "exposures.parquet")
    ids = [(v, d) for v, d in zip(exposures["visit"], exposures["detector"]) if v not in (411371, 411372)]
    plan = association_plan(exposures, ids)
    first = min(ids, key=lambda d: plan.key[d])
    before = _markers(out)
    target = out / "apdb_marker" / str(first[0]) / f"apdb_marker_{first[0]}_{first[1]:02d}.json"
    _run(tmp_path, config, str(target), "--force")
    _run(tmp_path, config)
    after = _markers(out)
    rerun = {name for name in before if after[name] != before[name]}
    downstream, todo = set(), [first]
    while todo:
        current = todo.pop()
        for d, preds in plan.predecessors.items():
            if current in preds and d not in downstream:
                downstream.add(d)
                todo.append(d)
    expected = {f"apdb_marker_{v}_{d:02d}.json" for v, d in downstream | {first}}
    assert rerun == expected
    _assert_same_apdb(_apdb_tables(out), _apdb_tables(workflow_run[0] / "out"))


def test_killed_association_leaves_nothing_that_looks_complete(workflow_run, tmp_path):
    import signal
    import time

    from apsnake.apdb import Apdb

    out, config = _copy_run(workflow_run, tmp_path)
    cmd = SNAKEMAKE + ["--directory", str(tmp_path), "--configfile", str(config), "--cores", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    while proc.poll() is None and not list((out / "apdb_marker").rglob("*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    markers = list((out / "apdb_marker").rglob("apdb_marker_*.json"))
    assert 1 <= len(markers) < 4
    db = Apdb(out)
    committed = db.committed()
    assert len(committed) == len(markers)
    for visit, detector in zip(committed["visit"].astype(int), committed["detector"].astype(int)):
        for table in TABLES:
            assert (out / "apdb" / table / str(visit) / f"{table}_{visit}_{detector:02d}.parquet").exists()
    assert set(db.sources()["visit"]) <= set(committed["visit"])
    _run(tmp_path, config, "--unlock")
    _run(tmp_path, config)
    _assert_same_apdb(_apdb_tables(out), _apdb_tables(workflow_run[0] / "out"))


def test_touching_one_raw_reprocesses_its_visit_and_the_apdb_is_unchanged(workflow_run, tmp_path, sim_test_dir):
    """The issue's idempotency check: touch one science raw, run again. Its data IDs go
    through ISR to association again, the later associations follow, and the APDB equals the
    first run's. (A private copy of the raws, so the shared night keeps its mtimes; mtime
    triggers, because the registry's raw paths now point at the copy.)"""
    import shutil

    out, config = _copy_run(workflow_run, tmp_path, keep_apdb=True)
    raw = tmp_path / "raw"
    shutil.copytree(sim_test_dir / "raw", raw)  # copy2: mtimes kept
    config.write_text(config.read_text().replace(str(sim_test_dir / "raw"), str(raw)))
    exposures = pd.read_parquet(out / "registry" / "exposures.parquet")
    science = exposures[~exposures["visit"].isin([411371, 411372])]
    first_visit = int(science.sort_values("mjd_mid_tai")["visit"].iloc[0])
    path = Path(science[science["visit"] == first_visit]["raw_path"].iloc[0])
    (raw / path.name).touch()
    proc = _run(tmp_path, config, "--rerun-triggers", "mtime")
    text = proc.stdout + proc.stderr
    assert f"visit={first_visit}" in text and "rule processCcd" in text.replace("localrule", "rule")
    _assert_same_apdb(_apdb_tables(out), _apdb_tables(workflow_run[0] / "out"))
