"""Cost of a whole simulated night through the workflow, per data ID: library time vs the rest.

    python benchmarks/bench_night.py [--preset test] [--cores 1] [--visits EXPNUM ...] [--keep DIR] [--json FILE]
                                     [--step-jobs merged|separate] [--no-postisr]
    python benchmarks/bench_night.py --resume DIR/bench_night_XXXX [--cores 1] [--json FILE]

Simulates the night once (``_measure.ensure_night``, under ``benchmarks/out/``), runs the whole
workflow on it with ``--cores N`` in a scratch folder, then reads, for every job, Snakemake's
benchmark file (``out/benchmarks/**.tsv``, column ``s``: the job's wall time, interpreter start,
imports and I/O included) and the ``done in X s`` line that ``apsnake.logs.workflow_step`` writes
to the job's log (the time inside the step: reading inputs, the library call, writing outputs).
Prints, per science data ID, the sum over its jobs (processCcd, imageDifference, fakes, associate,
package_alerts; with ``--step-jobs separate`` isr, calibrate, template, diffim and detectDiaSources
instead of the first two) split into step time and the rest (Snakemake's job start, the Python
interpreter, imports, the script adapter), the same sum for raw -> apdb_marker (every job of the
data ID but fakes and alert packaging), the same per rule, the jobs that
belong to no data ID (ingest, coadd, night_summary, report) and the night's wall time.

Memory: the peak of any job (the ``max_rss`` column of the benchmark files: Snakemake samples the
job's process tree with psutil every 0.5 s for its first 30 s, every 30 s after) and, from the
kernel, the peak RSS of the largest single process of the run (``RUSAGE_CHILDREN`` of a wrapper
around Snakemake: the scheduler and every job script). Also the simulation's wall time and peak
RSS when this run made the night, the 1-minute load average sampled during the run (the machine
may be shared) and the APDB's counts. ``--preset focalplane`` (60 CCDs x 3 visits) takes of the
order of an hour on 2 cores; with more than 30 data IDs the per-data-ID table is summarised.
``--visits`` processes only those EXPNUMs of the night (the template visits are always kept).
``--resume`` finishes a ``--keep`` run that stopped (a full disk, a kill): the same config, the jobs
already done are not run again, every job's figures are reported, but the wall time and load are
this run's only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import yaml

from _measure import ensure_night

REPO = Path(__file__).resolve().parents[1]
DONE = re.compile(r": done in ([0-9.]+) s")
# {rule}/{visit}/{rule}_{visit}_{detector}.tsv; per-night jobs: {name}.tsv, {group}/{name}.tsv
NOT_IN_CHAIN = {"fakes", "package_alerts", "produce_alerts"}
DATA_ID = re.compile(r"_(\d+)_(\d+)$")
# Runs a command and writes the kernel's peak RSS of its largest descendant (kB) to argv[1].
PEAK_WRAPPER = ("import json, resource, subprocess, sys\n"
                "rc = subprocess.run(sys.argv[2:]).returncode\n"
                "json.dump({'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, open(sys.argv[1], 'w'))\n"
                "sys.exit(rc)\n")


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every ``interval`` s until :meth:`stop`."""

    def __init__(self, interval: float = 10.0):
        super().__init__(daemon=True)
        self.interval, self.samples, self._stop_event = interval, [], threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join()
        return self.samples


def step_seconds(log: Path) -> float | None:
    """The ``done in X s`` of a job's log (None when absent: a job that failed or logs nothing)."""
    if not log.exists():
        return None
    found = DONE.findall(log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def collect(out: Path) -> list[dict]:
    """One row per job: rule, data ID (or None), wall s (benchmark), step s (log), max RSS MB
    (benchmark; None where Snakemake recorded none)."""
    jobs = []
    for tsv in sorted((out / "benchmarks").rglob("*.tsv")):
        rel = tsv.relative_to(out / "benchmarks")
        with open(tsv) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        wall, max_rss = float(row["s"]), _float(row.get("max_rss"))
        log = out / "logs" / rel.with_suffix(".log")
        m = DATA_ID.search(tsv.stem)
        data_id = (int(m.group(1)), int(m.group(2))) if m and len(rel.parts) == 3 and rel.parts[1].isdigit() else None
        jobs.append({"rule": rel.parts[0] if len(rel.parts) > 1 else tsv.stem, "data_id": data_id,
                     "wall": wall, "step": step_seconds(log), "max_rss": max_rss})
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="test")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="run under DIR and keep the products")
    parser.add_argument("--visits", type=int, nargs="+", help="process only these EXPNUMs (and the template visits)")
    parser.add_argument("--json", type=Path, help="also write the figures to FILE")
    parser.add_argument("--no-postisr", action="store_true",
                        help="keep_postisr: false (a whole focal plane's postISR images are ~12 GB)")
    parser.add_argument("--step-jobs", choices=["merged", "separate"],
                        help="the workflow's step_jobs option (default: the workflow's own, merged)")
    parser.add_argument("--resume", type=Path, help="finish the stopped --keep run in this folder")
    args = parser.parse_args()
    previous_peak_mb = 0.0
    if args.resume:
        folder = args.resume.resolve()
        config = yaml.safe_load((folder / "config.yaml").read_text())
        night, simulated, sim_wall, sim_rss_mb = Path(config["raw"]).parent, False, 0.0, 0.0
        if (folder / "peak_rss.json").exists():
            previous_peak_mb = json.loads((folder / "peak_rss.json").read_text())["maxrss_kb"] / 1024.0
        args.keep = folder
    else:
        simulated = not (REPO / "benchmarks" / "out" / f"{args.preset}_{args.seed}" / "sim_summary.json").exists()
        t0 = time.perf_counter()
        night = ensure_night(args.preset, args.seed)
        sim_wall = time.perf_counter() - t0
        # The simulation (if it ran) is this process's only child so far.
        sim_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    sim_summary = json.loads((night / "sim_summary.json").read_text())
    templates = sim_summary["template_visits"]
    if args.resume:
        visits = sim_summary["visits"] if config.get("visits", "all") == "all" else config["visits"]
    else:
        visits = sorted(set(args.visits) | set(templates)) if args.visits else sim_summary["visits"]
        # Absolute: Snakemake runs in --directory and would read a relative outdir from there.
        parent = args.keep or (REPO / "benchmarks" / "out")
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="bench_night_", dir=parent)).resolve()
    try:
        if not args.resume:
            config = {"simulate": None, "raw": str(night / "raw"), "calibs": str(night / "calib"),
                      "refcat": str(night / "refcat.parquet"), "templates": {"visits": templates},
                      "outdir": str(folder / "out"), "visits": visits if args.visits else "all"}
            if args.step_jobs:
                config["step_jobs"] = args.step_jobs
            if args.no_postisr:
                config["keep_postisr"] = False
            (folder / "config.yaml").write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(folder),
               "--configfile", str(folder / "config.yaml"), "--cores", str(args.cores), "--quiet", "all"]
        if args.resume:
            cmd.insert(-1, "--rerun-incomplete")
        peak_file = folder / "peak_rss.json"
        sampler = LoadSampler()
        sampler.start()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, str(peak_file)] + cmd, capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        night_wall = time.perf_counter() - t0
        loads = sampler.stop()
        if proc.returncode != 0:
            sys.exit(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        jobs = collect(folder / "out")
        process_peak_mb = max(previous_peak_mb, json.loads(peak_file.read_text())["maxrss_kb"] / 1024.0)
        from apsnake.apdb import Apdb

        apdb = Apdb(folder / "out").summary()
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
    n_ccds, n_images = sim_summary["n_ccds"], sim_summary["n_ccds"] * len(visits)
    print(f"\nnight: preset {sim_summary['preset']} (seed {sim_summary['seed']}): {n_ccds} CCDs x {len(visits)} visits "
          f"({len(templates)} template; {sim_summary['n_visits']} simulated), {len(jobs)} jobs, --cores {args.cores}")
    if simulated:
        n_sim = sim_summary["n_ccds"] * sim_summary["n_visits"]
        print(f"simulation: {sim_wall:.1f} s wall for {n_sim} CCD images ({sim_wall / n_sim:.2f} s per CCD image), "
              f"peak RSS {sim_rss_mb:.0f} MB")
    if args.resume:
        print(f"resumed {folder}: the wall time and load below are this run's only; the jobs are every run's")
    print(f"workflow: wall time {night_wall:.1f} s (Snakemake start and DAG included), "
          f"{night_wall / n_ccds:.1f} s per CCD ({n_ccds}), {night_wall / n_images:.1f} s per processed CCD image")
    if loads:
        print(f"load average (1 min) during the run: mean {statistics.mean(loads):.1f}, "
              f"max {max(loads):.1f} ({len(loads)} samples, {os.cpu_count()} CPUs)")

    def id_row(label: str, n_jobs, wall: float, step: float, kind: str = "") -> None:
        print(f"{label:>16s} {n_jobs!s:>5s} {wall:14.2f} {step:13.2f} {wall - step:9.2f} "
              f"{100 * (wall - step) / wall:6.0f}%{kind}")

    print(f"\n{'data ID':>16s} {'jobs':>5s} {'jobs wall (s)':>14s} {'in steps (s)':>13s} {'rest (s)':>9s} {'rest %':>7s}")
    sums = {True: [], False: []}  # is_template -> [(wall, step, n_jobs)]
    for data_id in sorted(per_id):
        rows = per_id[data_id]
        wall = sum(j["wall"] for j in rows)
        step = sum(j["step"] or 0.0 for j in rows)
        is_template = data_id[0] in template_visits
        sums[is_template].append((wall, step, len(rows)))
        if len(per_id) <= 30:
            id_row(f"{data_id[0]:>10d} {data_id[1]:02d}{'':3s}", len(rows), wall, step, " (template)" * is_template)
    figures: dict = {}
    for is_template, label in ((False, "science"), (True, "template")):
        rows = sums[is_template]
        if not rows:
            continue
        walls = [r[0] for r in rows]
        id_row(f"{label} mean", "", statistics.mean(walls), statistics.mean(r[1] for r in rows))
        if len(per_id) > 30:
            print(f"{'':16s} {'':5s} {len(rows)} data IDs; jobs wall min {min(walls):.2f}, "
                  f"median {statistics.median(walls):.2f}, max {max(walls):.2f} s")
        figures[f"{label}_data_ids"] = len(rows)
        figures[f"{label}_jobs_wall_mean_s"] = statistics.mean(walls)
        figures[f"{label}_steps_mean_s"] = statistics.mean(r[1] for r in rows)
    # Raw -> apdb_marker: what a science data ID costs until its DiaSources are in the APDB.
    chain = [(sum(j["wall"] for j in rows), sum(j["step"] or 0.0 for j in rows))
             for data_id, rows in ((k, [j for j in v if j["rule"] not in NOT_IN_CHAIN]) for k, v in per_id.items())
             if data_id[0] not in template_visits]
    if chain:
        wall, step = statistics.mean(c[0] for c in chain), statistics.mean(c[1] for c in chain)
        print(f"raw -> apdb_marker per science data ID (its jobs but {', '.join(sorted(NOT_IN_CHAIN))}): "
              f"{wall:.2f} s wall, {step:.2f} s in the steps, {wall - step:.2f} s rest (mean of {len(chain)})")
        figures["raw_to_apdb_marker_wall_mean_s"] = wall
        figures["raw_to_apdb_marker_steps_mean_s"] = step
    print(f"\n{'rule':>18s} {'jobs':>5s} {'mean wall (s)':>14s} {'mean step (s)':>14s} {'mean rest (s)':>14s} "
          f"{'max RSS (MB)':>13s}")
    for rule, rows in sorted(per_rule.items(), key=lambda kv: -sum(j["wall"] for j in kv[1])):
        wall = sum(j["wall"] for j in rows) / len(rows)
        steps = [j["step"] for j in rows if j["step"] is not None]
        step = sum(steps) / len(steps) if steps else float("nan")
        rss = [j["max_rss"] for j in rows if j["max_rss"] is not None]
        print(f"{rule:>18s} {len(rows):5d} {wall:14.2f} {step:14.2f} {wall - step:14.2f} "
              f"{max(rss) if rss else float('nan'):13.0f}")
    all_wall = sum(j["wall"] for j in jobs)
    print(f"\nsum of the jobs' wall times {all_wall:.1f} s; night wall time {night_wall:.1f} s "
          f"(the difference: Snakemake's start, DAG and scheduling between jobs, less what ran in parallel)")
    measured = [j for j in jobs if j["max_rss"] is not None]
    if measured:
        top = max(measured, key=lambda j: j["max_rss"])
        where = f" {top['data_id'][0]}/{top['data_id'][1]:02d}" if top["data_id"] else ""
        print(f"peak memory of any job (benchmark max_rss): {top['max_rss']:.0f} MB ({top['rule']}{where}); "
              f"{len(jobs) - len(measured)} jobs without a max_rss")
    print(f"peak RSS of the largest single process (kernel, scheduler included): {process_peak_mb:.0f} MB")
    rows = apdb["rows"]
    print(f"APDB: {apdb['data_ids']} data IDs committed, {rows['DiaSource']} DiaSources "
          f"({apdb['unassociated_sources']} without a DiaObject), {apdb['objects']} DiaObjects "
          f"({apdb['objects_2plus_sources']} with >= 2 DiaSources), {rows['DiaForcedSource']} DiaForcedSources")
    if args.json:
        figures.update({
            "preset": sim_summary["preset"], "seed": sim_summary["seed"], "cores": args.cores,
            "resumed": bool(args.resume), "ccds": n_ccds,
            "visits": visits, "jobs": len(jobs), "night_wall_s": night_wall,
            "jobs_wall_sum_s": all_wall, "simulation_wall_s": sim_wall if simulated else None,
            "simulation_peak_rss_mb": sim_rss_mb if simulated else None,
            "job_peak_rss_mb": top["max_rss"] if measured else None,
            "job_peak_rss_rule": top["rule"] if measured else None,
            "process_peak_rss_mb": process_peak_mb, "load_mean": statistics.mean(loads) if loads else None,
            "load_max": max(loads) if loads else None, "apdb": apdb,
            "per_rule": {rule: {"jobs": len(rows_), "wall_sum_s": sum(j["wall"] for j in rows_),
                                "max_rss_mb": max((j["max_rss"] for j in rows_ if j["max_rss"] is not None),
                                                  default=None)}
                         for rule, rows_ in per_rule.items()},
        })
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")

if __name__ == "__main__":
    main()
