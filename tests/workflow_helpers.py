"""Helpers of the workflow tests: run Snakemake on the simulated test night, copy a finished run.

The finished run itself is the session fixture ``workflow_run`` (conftest.py), shared by
test_workflow.py and test_alerts_workflow.py so that the night is processed once per session.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def _job_stats(proc):
    """The "Job stats" table of a dry run as {rule: count}. Snakemake prints it at the start
    and again at the end; both must agree, and their "total" must be the sum."""
    tables = []
    lines = (proc.stdout + proc.stderr).splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "Job stats:":
            continue
        assert lines[i + 1].split() == ["job", "count"] and set(lines[i + 2].replace(" ", "")) == {"-"}, lines[i:i + 3]
        table = {}
        for row in lines[i + 3:]:
            name, count = row.split()
            if name == "total":
                assert int(count) == sum(table.values()), (row, table)
                break
            table[name] = int(count)
        tables.append(table)
    assert tables, "no Job stats table in the dry run's output"
    assert all(t == tables[0] for t in tables), tables
    return tables[0]


def _copy_run(workflow_run, tmp_path, keep_apdb=False):
    """A copy of the finished test-night run (hard links) whose config points at the copy;
    without the APDB unless ``keep_apdb``."""
    import shutil

    src_dir, config, _, _ = workflow_run
    out = tmp_path / "out"
    ignore = None if keep_apdb else shutil.ignore_patterns("apdb", "apdb_marker")
    # Hard links: no disk for the ~GB of images, mtimes kept; every writer replaces files
    # by renaming, so a re-run never changes the original run's files.
    shutil.copytree(src_dir / "out", out, ignore=ignore, copy_function=os.link)
    new_config = tmp_path / "config.yaml"
    new_config.write_text(config.read_text().replace(str(src_dir / "out"), str(out)))
    return out, new_config


def _without_keys(value, drop):
    """``value`` (dicts and lists, nested) without the dict entries whose key ``drop(key)`` is
    true: the fields that differ between two runs on the same inputs."""
    if isinstance(value, dict):
        return {k: _without_keys(v, drop) for k, v in value.items() if not drop(k)}
    if isinstance(value, list):
        return [_without_keys(v, drop) for v in value]
    return value


def _is_processing_time(key):
    """An alert's ``timeProcessedMjdTai``."""
    return key == "timeProcessedMjdTai"


def assert_same_alert_files(out_a, out_b):
    """The two runs wrote the same alert files: same names, metadata and alerts (in the same
    order), apart from the processing timestamps."""
    from apsnake.alerts import read_alert_file

    files_a = sorted(p.relative_to(out_a) for p in (Path(out_a) / "alerts").rglob("alerts_*.avro"))
    files_b = sorted(p.relative_to(out_b) for p in (Path(out_b) / "alerts").rglob("alerts_*.avro"))
    assert files_a and files_a == files_b
    for name in files_a:
        meta_a, alerts_a = read_alert_file(Path(out_a) / name)
        meta_b, alerts_b = read_alert_file(Path(out_b) / name)
        assert meta_a == meta_b, name
        assert [a["diaSourceId"] for a in alerts_a] == [b["diaSourceId"] for b in alerts_b], name
        assert _without_keys(alerts_a, _is_processing_time) == _without_keys(alerts_b, _is_processing_time), name


# Header cards and JSON keys that hold a step's run time (they differ between any two runs).
_RUN_TIME_CARDS = ("CALTIME", "ISR_TIME", "DIFFTIME", "DATE")


def _is_run_time(key):
    """A step's run time in its JSON metadata (``*seconds``, ``time_*``)."""
    return key.endswith("seconds") or key.startswith("time_")


def assert_same_data_id_products(out_a, out_b, visit, detector, names):
    """Two runs wrote the same per-data-ID products ``names`` ((product, extension) pairs):
    FITS pixels and header cards, Parquet tables and JSON metadata equal apart from run times
    and ``timeProcessedMjdTai``."""
    import json

    import numpy as np
    import pyarrow.parquet as pq
    from astropy.io import fits

    for name, ext in names:
        rel = Path(name) / str(visit) / f"{name}_{visit}_{detector:02d}.{ext}"
        a, b = Path(out_a) / rel, Path(out_b) / rel
        if ext == "fits":
            with fits.open(a) as ha, fits.open(b) as hb:
                assert [h.name for h in ha] == [h.name for h in hb], rel
                for x, y in zip(ha, hb):
                    cards_a = {k: v for k, v in x.header.items() if k not in _RUN_TIME_CARDS}
                    cards_b = {k: v for k, v in y.header.items() if k not in _RUN_TIME_CARDS}
                    assert cards_a == cards_b, (rel, x.name)
                    if x.data is not None:
                        assert np.array_equal(x.data, y.data, equal_nan=True), (rel, x.name)
        elif ext == "parquet":
            ta, tb = pq.read_table(a).to_pandas(), pq.read_table(b).to_pandas()
            assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb), rel
            for column in ta.columns:
                if column == "timeProcessedMjdTai":
                    continue
                assert ta[column].equals(tb[column]), (rel, column)
        else:
            json_a, json_b = json.loads(a.read_text()), json.loads(b.read_text())
            assert _without_keys(json_a, _is_run_time) == _without_keys(json_b, _is_run_time), rel
