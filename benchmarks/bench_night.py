"""Cost of a whole simulated night through the workflow, per data ID: library time vs the rest.

    python benchmarks/bench_night.py [--preset test] [--cores 1] [--keep DIR]

Simulates the night once (``_measure.ensure_night``, under ``benchmarks/out/``), runs the whole
workflow on it with ``--cores N`` in a scratch folder, then reads, for every job, Snakemake's
benchmark file (``out/benchmarks/**.tsv``, column ``s``: the job's wall time, interpreter start,
imports and I/O included) and the ``done in X s`` line that ``apsnake.logs.workflow_step`` writes
to the job's log (the time inside the step: reading inputs, the library call, writing outputs).
Prints, per science data ID, the sum over its jobs (isr, calibrate, template, diffim,
detectDiaSources, fakes, associate, package_alerts) split into step time and the rest (Snakemake's
job start, the Python interpreter, imports, the script adapter), the same per rule, the jobs that
belong to no data ID (ingest, coadd, night_summary, report) and the night's wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

from _measure import ensure_night

REPO = Path(__file__).resolve().parents[1]
DONE = re.compile(r": done in ([0-9.]+) s")
# {rule}/{visit}/{rule}_{visit}_{detector}.tsv; per-night jobs: {name}.tsv, {group}/{name}.tsv
DATA_ID = re.compile(r"_(\d+)_(\d+)$")


def step_seconds(log: Path) -> float | None:
    """The ``done in X s`` of a job's log (None when absent: a job that failed or logs nothing)."""
    if not log.exists():
        return None
    found = DONE.findall(log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def collect(out: Path) -> list[dict]:
    """One row per job: rule, data ID (or None), wall s (benchmark), step s (log)."""
    jobs = []
    for tsv in sorted((out / "benchmarks").rglob("*.tsv")):
        rel = tsv.relative_to(out / "benchmarks")
        with open(tsv) as f:
            wall = float(next(csv.DictReader(f, delimiter="\t"))["s"])
        log = out / "logs" / rel.with_suffix(".log")
        m = DATA_ID.search(tsv.stem)
        data_id = (int(m.group(1)), int(m.group(2))) if m and len(rel.parts) == 3 and rel.parts[1].isdigit() else None
        jobs.append({"rule": rel.parts[0] if len(rel.parts) > 1 else tsv.stem, "data_id": data_id,
                     "wall": wall, "step": step_seconds(log)})
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="test")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="run under DIR and keep the products")
    args = parser.parse_args()
    night = ensure_night(args.preset, args.seed)
    templates = json.loads((night / "sim_summary.json").read_text())["template_visits"]
    folder = Path(tempfile.mkdtemp(prefix="bench_night_", dir=args.keep or (REPO / "benchmarks" / "out")))
    try:
        config = {"simulate": None, "raw": str(night / "raw"), "calibs": str(night / "calib"),
                  "refcat": str(night / "refcat.parquet"), "templates": {"visits": templates},
                  "outdir": str(folder / "out")}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(folder),
               "--configfile", str(folder / "config.yaml"), "--cores", str(args.cores), "--quiet", "all"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        night_wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        jobs = collect(folder / "out")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    per_id: dict[tuple, list[dict]] = defaultdict(list)
    per_rule: dict[str, list[dict]] = defaultdict(list)
    for job in jobs:
        per_rule[job["rule"]].append(job)
        if job["data_id"] is not None:
            per_id[job["data_id"]].append(job)
    template_visits = set(templates)
    print(f"\nnight: preset {args.preset} (seed {args.seed}), {len(jobs)} jobs, --cores {args.cores}: "
          f"wall time {night_wall:.1f} s (Snakemake start and DAG included)")
    print(f"\n{'data ID':>16s} {'jobs':>5s} {'jobs wall (s)':>14s} {'in steps (s)':>13s} {'rest (s)':>9s} {'rest %':>7s}")
    totals = [0.0, 0.0]
    for data_id in sorted(per_id):
        rows = per_id[data_id]
        wall = sum(j["wall"] for j in rows)
        step = sum(j["step"] or 0.0 for j in rows)
        kind = " (template)" if data_id[0] in template_visits else ""
        if not kind:
            totals[0] += wall
            totals[1] += step
        print(f"{data_id[0]:>10d} {data_id[1]:02d}{'':3s} {len(rows):5d} {wall:14.2f} {step:13.2f} {wall - step:9.2f} "
              f"{100 * (wall - step) / wall:6.0f}%{kind}")
    n_sci = sum(1 for d in per_id if d[0] not in template_visits)
    if n_sci:
        print(f"{'science mean':>16s} {'':5s} {totals[0] / n_sci:14.2f} {totals[1] / n_sci:13.2f} "
              f"{(totals[0] - totals[1]) / n_sci:9.2f} {100 * (totals[0] - totals[1]) / totals[0]:6.0f}%")
    print(f"\n{'rule':>18s} {'jobs':>5s} {'mean wall (s)':>14s} {'mean step (s)':>14s} {'mean rest (s)':>14s}")
    for rule, rows in sorted(per_rule.items(), key=lambda kv: -sum(j["wall"] for j in kv[1])):
        wall = sum(j["wall"] for j in rows) / len(rows)
        steps = [j["step"] for j in rows if j["step"] is not None]
        step = sum(steps) / len(steps) if steps else float("nan")
        print(f"{rule:>18s} {len(rows):5d} {wall:14.2f} {step:14.2f} {wall - step:14.2f}")
    all_wall = sum(j["wall"] for j in jobs)
    print(f"\nsum of the jobs' wall times {all_wall:.1f} s; night wall time {night_wall:.1f} s "
          f"(the difference: Snakemake's start, DAG and scheduling between jobs)")


if __name__ == "__main__":
    main()
