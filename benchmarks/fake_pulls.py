"""Flux pulls of many fakes: the psfFlux pull median to a few hundredths of a sigma (issue 11).

    python benchmarks/fake_pulls.py OUT [OUT ...] [--seeds 10] [--jobs 2] [--json FILE]

OUT: finished workflow output folders (calexp, diffexp, matchedTemplate, src of every science
data ID). For each science data ID with a difference image and each seed, ``run_fakes``
injects 80 noise-free PSF fakes into the difference image (positions, hosts and S/N drawn from
the seed) and detects and measures them as the pipeline does. Pull = (psfFlux - injectedFlux)
/ psfFluxErr of the recovered fakes at expected S/N >= 8 off galaxies, and the same with the
PSF flux forced at the true position (``association.forced.psf_fluxes`` on the difference
image holding the fakes): the forced pull shows the difference image's own noise and flux
scale, the gap between the two the measurement at the fitted centroid. The fakes sit on the
real noise of the difference images, so with ~10 seeds a night gives ~1,000-3,000 pulls: a
median error of ~0.03.

The expected effect of measuring at the fitted centroid: to second order, the PSF flux at the
position that maximises it exceeds the flux at the true position by sigma_F^2 / F (two
dimensions, any PSF, white noise), i.e. a pull bias of 1 / (S/N) per source; a centroid that
does not maximise the PSF flux gives less. Reported next to the measured gap. Since
``dia.debias_centroid_flux`` (default on) the DiaSource ``psfFlux`` has that expected excess
taken out, so the gap measures what is left of it (about -0.01 on the mean).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from apsnake.numerics import mad_sigma


def _one(args):
    out, visit, detector, seed = args
    import pandas as pd

    from apsnake.association.forced import psf_fluxes
    from apsnake.exposure import read_exposure
    from apsnake.fakes import FakesConfig, run_fakes
    from apsnake.photometry import aperture_correction_at

    meta = json.loads((out / "diffexp" / str(visit) / f"diffexp_{visit}_{detector}.json").read_text())
    if meta.get("skipped"):
        return None
    calexp = read_exposure(out / "calexp" / str(visit) / f"calexp_{visit}_{detector}.fits")
    diffexp = read_exposure(out / "diffexp" / str(visit) / f"diffexp_{visit}_{detector}.fits")
    matched = read_exposure(out / "matchedTemplate" / str(visit) / f"matchedTemplate_{visit}_{detector}.fits")
    src = pd.read_parquet(out / "src" / str(visit) / f"src_{visit}_{detector}.parquet")
    result = run_fakes(calexp, diffexp, matched, src, replace(FakesConfig(), seed=seed), diffim_metadata=meta)
    t = result.table.to_pandas()
    if not len(t):
        return None
    forced, forced_err = psf_fluxes(result.difference, t.x.to_numpy(), t.y.to_numpy(), "difference image")
    apcorr = aperture_correction_at(calexp, t.x.to_numpy(), t.y.to_numpy())
    t["forcedFlux"], t["forcedFluxErr"] = forced * apcorr, forced_err * apcorr
    t["seed"] = seed
    return t[["visit", "detector", "seed", "x", "y", "injectedFlux", "expectedSnr", "onHost", "recovered",
              "psfFlux", "psfFluxErr", "forcedFlux", "forcedFluxErr"]]


def _median_with_error(values):
    """Median and its noise, sqrt(pi / 2) sigma / sqrt(n) for a normal sample (as
    ``sim.evaluate`` reports the truth's pull median)."""
    values = np.asarray(values, float)
    return float(np.median(values)), float(np.sqrt(np.pi / 2) * mad_sigma(values) / np.sqrt(values.size))


def summarise(table, label: str) -> dict:
    good = (table.expectedSnr >= 8) & ~table.onHost
    found = good & table.recovered & np.isfinite(table.psfFlux) & (table.psfFluxErr > 0)
    pull = ((table.psfFlux - table.injectedFlux) / table.psfFluxErr)[found]
    forced_ok = good & np.isfinite(table.forcedFlux) & (table.forcedFluxErr > 0)
    forced = ((table.forcedFlux - table.injectedFlux) / table.forcedFluxErr)[forced_ok]
    both = found & forced_ok
    gap = ((table.psfFlux - table.forcedFlux) / table.psfFluxErr)[both]
    snr = (table.injectedFlux / table.psfFluxErr)[both]
    med, med_err = _median_with_error(pull)
    fmed, fmed_err = _median_with_error(forced)
    gmed, gmed_err = _median_with_error(gap)
    out = {
        "label": label, "n_fakes_snr8_off_hosts": int(good.sum()), "n_recovered": int(found.sum()),
        "pull_median": med, "pull_median_err": med_err, "pull_scatter": mad_sigma(pull),
        "forced_pull_median": fmed, "forced_pull_median_err": fmed_err, "forced_pull_scatter": mad_sigma(forced),
        "centroid_gap_median": gmed, "centroid_gap_median_err": gmed_err,
        "centroid_gap_mean": float(gap.mean()), "expected_gap_mean_1_over_snr": float((1.0 / snr).mean()),
    }
    for lo, hi in ((8, 15), (15, 30)):
        sel = found & (table.expectedSnr >= lo) & (table.expectedSnr < hi)
        p = ((table.psfFlux - table.injectedFlux) / table.psfFluxErr)[sel]
        out[f"pull_median_snr{lo}_{hi}"], out[f"pull_median_snr{lo}_{hi}_err"] = _median_with_error(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outs", nargs="+", type=Path)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import pandas as pd

    results = []
    for out in args.outs:
        tasks = []
        for path in sorted((out / "diffexp").glob("*/diffexp_*.fits")):
            visit, detector = (int(v) for v in path.stem.split("_")[1:3])
            tasks += [(out, visit, detector, seed) for seed in range(1, args.seeds + 1)]
        with ProcessPoolExecutor(args.jobs) as pool:
            tables = [t for t in pool.map(_one, tasks) if t is not None]
        table = pd.concat(tables, ignore_index=True)
        summary = summarise(table, str(out))
        results.append(summary)
        print(json.dumps(summary, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
