"""Difference-imaging and DIA-source quality against the simulator's truth.

    python benchmarks/measure_dia_truth.py [--template-mode single] [--score-only DIR] [PRESET ...]
        (default presets: dense demo)

For each preset: simulate the night (once, under benchmarks/out/), run the workflow on it
with 2 cores, then match every science data ID's diaSrc to the truth and print:
completeness per true difference-image S/N, false detections per CCD-visit (away from and
near stars brighter than g = 16), psfFlux pulls, positions of S/N > 20 sources, and the
normalised residual rms at isolated constant stars below S/N 200. Targets (issue 5):
completeness >= 50% at S/N 5.5 and >= 90% at S/N 8; < 5 false per CCD-visit away from
bright stars; median pull within 0.1 and scatter 0.9-1.2; positions < 50 mas rms;
residual rms < 1.3. Then the association into the APDB (issue 6): the fraction of truth
objects detected in two or more visits with all detections on one DiaObject (>= 99%), the
fraction of DiaObjects mixing two truth objects (< 1%) and DiaObjects linking asteroid
detections of different visits (0).

Issue 11 (definitions in ``apsnake.sim.evaluate``'s docstring): false detections per
CCD-visit by class (near stars of g < 16, 16-18, 18-20, fainter; on galaxies; cosmic rays;
bad pixels/columns and edges; none of these), each source in the first class that applies,
with the share of negative sources, the non-exclusive counts and the fraction of the CCD area
each class covers; completeness of positive and negative sources on good pixels (not masked,
template covered, > 20 px from the edge) at true S/N >= 10 and per S/N bin, near other
sources and away from them (target: >= 97% at S/N >= 10, positive and negative within 3
points); the true S/N at 50% completeness (maximum-likelihood fit and isotonic regression).

``--score-only DIR`` skips simulating and running: it scores the finished run in
``DIR/workflow_<preset>[_<mode>]/out`` against the night ``DIR/<preset>_1`` (for instance a
run made by another checkout).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from _measure import ensure_night

REPO = Path(__file__).resolve().parents[1]


def run_workflow(preset: str, template_mode: str = "coadd") -> tuple[Path, Path, dict]:
    night = ensure_night(preset)
    summary = json.loads((night / "sim_summary.json").read_text())
    work = REPO / "benchmarks" / "out" / (f"workflow_{preset}" + ("" if template_mode == "coadd" else f"_{template_mode}"))
    work.mkdir(parents=True, exist_ok=True)
    config = {"simulate": None, "raw": str(night / "raw"), "calibs": str(night / "calib"),
              "refcat": str(night / "refcat.parquet"),
              "templates": {"visits": summary["template_visits"], "mode": template_mode},
              "outdir": str(work / "out")}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                    str(work), "--configfile", str(work / "config.yaml"), "--cores", "2", "--quiet", "all"],
                   check=True)
    return night, work / "out", summary


def finished_run(root: Path, preset: str, template_mode: str = "coadd") -> tuple[Path, Path, dict]:
    """Night, output folder and summary of a run already made under ``root``."""
    night = root / f"{preset}_1"
    summary = json.loads((night / "sim_summary.json").read_text())
    out = root / (f"workflow_{preset}" + ("" if template_mode == "coadd" else f"_{template_mode}")) / "out"
    return night, out, summary


def _fmt(value) -> str:
    """A metric for printing: (fraction, n) pairs as "0.973 (36)", dicts one entry after another."""
    if isinstance(value, dict):
        return " | ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]:.3f} ({value[1]})"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(presets: list[str], template_mode: str = "coadd", score_only: Path | None = None) -> None:
    from apsnake.sim.evaluate import evaluate_association, evaluate_data_id, static_star_residuals, summarise

    for preset in presets:
        if score_only is None:
            night, out, summary = run_workflow(preset, template_mode)
        else:
            night, out, summary = finished_run(score_only, preset, template_mode)
        results, residuals = [], []
        for visit in summary["science_visits"]:
            for detector in summary["ccds"]:
                results.append(evaluate_data_id(night, out, visit, detector))
                residuals.append(static_star_residuals(night, out, visit, detector))
        metrics = summarise(results)
        rms = np.concatenate([r["normalised_rms"].to_numpy() for r in residuals])
        metrics["static_star_normalised_rms_median"] = float(np.median(rms)) if rms.size else float("nan")
        metrics["static_star_normalised_rms_mean"] = float(np.mean(rms)) if rms.size else float("nan")
        metrics["n_static_stars"] = int(rms.size)
        metrics.update({f"association_{k}": v for k, v in evaluate_association(night, out).items()})
        metrics.update({f"fakes_{k}": v for k, v in fakes_versus_truth(out, results).items()})
        print(f"\n== preset {preset}, templates {template_mode}: {len(results)} CCD-visits ==")
        for key, value in metrics.items():
            print(f"{key:52s} {_fmt(value)}")


def fakes_versus_truth(out: Path, results: list[dict]) -> dict:
    """Issue 13: completeness of the injected fakes against the truth's, on the data IDs that
    have fakes (none when the run had fakes off)."""
    import pandas as pd

    from apsnake.sim.evaluate import completeness_fakes_versus_truth

    tables, with_fakes = [], []
    for result in results:
        visit, detector = result["visit"], result["detector"]
        path = out / "fakes" / str(visit) / f"fakes_{visit}_{detector:02d}.parquet"
        if path.exists():
            tables.append(pd.read_parquet(path))
            with_fakes.append(result)
    if not tables:
        return {"n_data_ids": 0}
    return {"n_data_ids": len(tables), **completeness_fakes_versus_truth(with_fakes, pd.concat(tables, ignore_index=True))}


if __name__ == "__main__":
    args = sys.argv[1:]
    mode, root = "coadd", None
    while args[:1] and args[0].startswith("--"):
        if args[0] == "--template-mode":
            mode, args = args[1], args[2:]
        elif args[0] == "--score-only":
            root, args = Path(args[1]), args[2:]
        else:
            sys.exit(f"unknown option {args[0]}")
    main(args or ["dense", "demo"], mode, root)
