"""Helpers for the hand-run benchmarks: wall time and peak memory of a step."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux ru_maxrss is in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(func, *args, repeat: int = 1, **kwargs):
    """Run ``func`` ``repeat`` times; return (best wall seconds, last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = func(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, result


# What every workflow job does first (``logs.workflow_step``): freed memory kept for reuse.
JOB_PREAMBLE = "from apsnake.memory import keep_freed_memory as _keep; _keep()\n"


def in_fresh_process(code: str, as_job: bool = True) -> dict:
    """Run Python ``code`` (which must print one JSON line) in a new interpreter, so that its
    peak memory is its own; returns the parsed JSON. ``as_job``: with the allocator settings
    of a workflow job."""
    out = subprocess.run([sys.executable, "-c", (JOB_PREAMBLE if as_job else "") + code], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(title: str, rows: list[tuple[str, float, float]]) -> None:
    print(f"\n{title}")
    print(f"{'step':40s} {'time (s)':>10s} {'peak RSS (MB)':>14s}")
    for name, seconds, mb in rows:
        print(f"{name:40s} {seconds:10.3f} {mb:14.0f}")


def ensure_night(preset: str = "test", seed: int = 1):
    """The simulated night used by the benchmarks, made once under benchmarks/out/."""
    from pathlib import Path

    outdir = Path(__file__).resolve().parent / "out" / f"{preset}_{seed}"
    if not (outdir / "sim_summary.json").exists():
        # In a child process: Linux counts a forked parent's memory in the child's peak RSS,
        # so the parent must stay small for the other measurements to be honest.
        subprocess.run([sys.executable, "-m", "apsnake.cli", "simulate", str(outdir), "--preset", preset,
                        "--seed", str(seed)], check=True)
    return outdir
