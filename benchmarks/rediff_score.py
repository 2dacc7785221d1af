"""Difference and detect again, on a finished run's calexps and templates, with other settings;
then score against the truth as ``measure_dia_truth.py`` does.

    python benchmarks/rediff_score.py RUN_OUT NIGHT NEW_OUT [--diffim KEY=VALUE ...] [--dia KEY=VALUE ...]
        [--jobs 2]

``RUN_OUT`` is the ``out`` folder of a workflow run (e.g.
``benchmarks/out/workflow_demo_single/out``), ``NIGHT`` the simulated night it ran on
(``benchmarks/out/demo_1``). For every science data ID, the calexp, template and source table
of ``RUN_OUT`` are differenced with ``DiffimConfig`` (the ``diffim`` section of the repository's
``config.yaml``, as the workflow runs it, with the ``--diffim`` overrides; values parsed as
YAML) and detected with ``DiaConfig`` (``dia`` section, ``--dia``); the difference
images and diaSrc tables go to ``NEW_OUT`` (every other product is linked from ``RUN_OUT``), and
the issue-11 figures are printed. For comparing versions of difference imaging and detection on
the same inputs without running the whole workflow (a few minutes for the demo night instead
of ~10).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml


def _overrides(pairs):
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def _one(args):
    run_out, new_out, visit, detector, diffim_kw, dia_kw = args
    import pandas as pd
    import pyarrow.parquet as pq

    from apsnake.dia import DiaConfig, detect_dia_sources
    from apsnake.diffim import DiffimConfig, subtract
    from apsnake.exposure import read_exposure, write_exposure
    from apsnake.options import dataclass_from_options

    name = f"{visit}/{{}}_{visit}_{detector:02d}"
    t0 = time.perf_counter()
    science = read_exposure(run_out / "calexp" / f"{name.format('calexp')}.fits")
    template = read_exposure(run_out / "template" / f"{name.format('template')}.fits")
    sources = pd.read_parquet(run_out / "src" / f"{name.format('src')}.parquet")
    result = subtract(science, template, sources, dataclass_from_options(DiffimConfig, diffim_kw, "diffim"))
    diff_path = new_out / "diffexp" / f"{name.format('diffexp')}.fits"
    diff_path.parent.mkdir(parents=True, exist_ok=True)
    write_exposure(result.difference, diff_path)
    table = detect_dia_sources(result.difference, science, result.matched_template,
                               dataclass_from_options(DiaConfig, dia_kw, "dia"))
    src_path = new_out / "diaSrc" / f"{name.format('diaSrc')}.parquet"
    src_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, src_path)
    meta = result.metadata
    return (visit, detector, time.perf_counter() - t0, meta.get("kernel_sum"), meta.get("halo_coeffs"),
            meta.get("n_kernel_stars"), table.num_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_out", type=Path)
    parser.add_argument("night", type=Path)
    parser.add_argument("new_out", type=Path)
    parser.add_argument("--diffim", nargs="*", default=[])
    parser.add_argument("--dia", nargs="*", default=[])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    run_out, new_out = args.run_out.resolve(), args.new_out.resolve()
    new_out.mkdir(parents=True, exist_ok=True)
    for item in run_out.iterdir():
        link = new_out / item.name
        if item.name not in ("diffexp", "diaSrc") and not link.exists():
            link.symlink_to(item)
    summary = json.loads((args.night / "sim_summary.json").read_text())
    workflow = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    diffim_kw = {**(workflow.get("diffim") or {}), **_overrides(args.diffim)}
    dia_kw = {**(workflow.get("dia") or {}), **_overrides(args.dia)}
    work = [(run_out, new_out, v, d, diffim_kw, dia_kw) for v in summary["science_visits"] for d in summary["ccds"]]
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(_one, work):
            print("visit %d detector %d: %.1f s, kernel sum %s, halo %s, %s kernel stars, %d DIA sources" % row,
                  flush=True)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from measure_dia_truth import _fmt

    from apsnake.sim.evaluate import evaluate_data_id, summarise

    results = [evaluate_data_id(args.night, new_out, v, d) for v in summary["science_visits"] for d in summary["ccds"]]
    print(f"\n== {new_out} (diffim {diffim_kw}, dia {dia_kw}): {len(results)} CCD-visits ==")
    for key, value in summarise(results).items():
        print(f"{key:52s} {_fmt(value)}")


if __name__ == "__main__":
    main()
