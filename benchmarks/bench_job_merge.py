"""What merging the template, diffim and detectDiaSources jobs of one data ID would save (issue 14).

    python benchmarks/bench_job_merge.py RUN_OUT [--visit 419803 --detector 32] [--rounds 4]

RUN_OUT: the ``out`` folder of a finished run of the ``test`` night (``bench_night.py --keep DIR``
leaves one under ``DIR/bench_night_*/out``). Runs the three steps of one science data ID the way
the workflow's scripts do (same library calls, same products written), alternately as three
fresh interpreters in a row (each reading what the previous one wrote, as the jobs do now) and as
one interpreter that keeps the template and the difference in memory. Both include the
interpreter's start and the imports; neither includes Snakemake's own per-job cost (~0.15 s of
script preamble per job, benchmarks/README.md). The two diaSrc tables are checked to be equal.
Wall times by ``time.perf_counter`` around ``subprocess.run``; the machine may be shared, so
rounds alternate and the medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = r'''
import os, sys
os.environ["OMP_NUM_THREADS"] = "1"
from apsnake.memory import keep_freed_memory
keep_freed_memory()
out, dest, visit, detector = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
steps, inputs = sys.argv[5].split(","), sys.argv[6:]
calexp_path = f"{out}/calexp/{visit}/calexp_{visit}_{detector:02d}.fits"
template = difference = matched = science = None
if "template" in steps:
    from apsnake.exposure import read_exposure, write_exposure
    from apsnake.templates import best_single_visit_template
    template = best_single_visit_template(read_exposure(calexp_path, memmap=True),
                                          [read_exposure(p, memmap=True) for p in inputs])
    write_exposure(template, f"{dest}/template.fits")
if "diffim" in steps:
    import pandas as pd
    from apsnake.diffim import DiffimConfig, subtract
    from apsnake.exposure import read_exposure, write_exposure
    science = read_exposure(calexp_path)
    template = template if template is not None else read_exposure(f"{dest}/template.fits")
    result = subtract(science, template, pd.read_parquet(f"{out}/src/{visit}/src_{visit}_{detector:02d}.parquet"),
                      DiffimConfig())
    difference, matched = result.difference, result.matched_template
    write_exposure(difference, f"{dest}/diffexp.fits")
    write_exposure(matched, f"{dest}/matched.fits")
if "detect" in steps:
    import pyarrow.parquet as pq
    from apsnake.dia import DiaConfig, detect_dia_sources
    from apsnake.exposure import read_exposure
    if difference is None:
        difference = read_exposure(f"{dest}/diffexp.fits")
        science = read_exposure(calexp_path, memmap=True)
        matched = read_exposure(f"{dest}/matched.fits", memmap=True)
    table = detect_dia_sources(difference, science, matched, DiaConfig(), time_processed_mjd=1.0)
    pq.write_table(table, f"{dest}/diaSrc.parquet")
os._exit(0)
'''


def run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", STEP, *args], check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--visit", type=int, default=419803)
    parser.add_argument("--detector", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    import pyarrow.parquet as pq

    # The template visits' calexps (the template job's inputs): visits with no diaSrc folder.
    science_visits = {p.name for p in (args.out / "diaSrc").iterdir()}
    inputs = sorted(str(p) for p in (args.out / "calexp").glob("*/*.fits") if p.parent.name not in science_visits)
    data_id = [str(args.out), "", str(args.visit), str(args.detector)]
    separate, merged = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            a, b = Path(tmp, f"a{i}"), Path(tmp, f"b{i}")
            a.mkdir(), b.mkdir()
            data_id[1] = str(a)
            separate.append(sum(run(data_id + [step] + inputs) for step in ("template", "diffim", "detect")))
            data_id[1] = str(b)
            merged.append(run(data_id + ["template,diffim,detect"] + inputs))
            if not pq.read_table(a / "diaSrc.parquet").equals(pq.read_table(b / "diaSrc.parquet")):
                sys.exit("the merged run's diaSrc differs from the separate runs'")
            print(f"round {i + 1}: three processes {separate[-1]:.2f} s, one process {merged[-1]:.2f} s", flush=True)
    print(f"median: three processes {statistics.median(separate):.2f} s, one process {statistics.median(merged):.2f} s, "
          f"saved {statistics.median(separate) - statistics.median(merged):.2f} s per data ID (diaSrc identical)")


if __name__ == "__main__":
    main()
