"""DAG scale: time and peak memory of `snakemake -n` on large synthetic registries (issue 14).

    python benchmarks/bench_dryrun.py [wide|chain|floor|whatif|all] [--visits N] [--detectors N] [--steps N]
                                      [--keep DIR]

``wide``: the whole focal plane (62 CCDs) x 100 visits: 10 fields of 10 dithered visits each,
the first visit of each field a template visit (6,200 data IDs, 5,580 of them differenced and
associated; 28,523 jobs with the merged jobs, 45,883 with one job per step). ``chain``: 300 visits of one pointing on 2 CCDs, the first a template
visit: every association waits for the previous visit's, a chain 299 deep (docs/architecture.md,
association order). ``floor`` (not in ``all``): Snakemake alone, a chain of ``--steps`` (7) trivial rules
per data ID (one input, one output, ``touch``) for as many data IDs as ``wide``: what any
workflow with that many jobs per data ID costs Snakemake to plan (7: the ~43,000 jobs of one job
per step; 5: about the merged workflow's count).
``whatif`` (not in ``all``): the ``wide`` registry planned by the workflow as it is and by
altered copies of it, to show where Snakemake's time goes: ``bare``, the per-data-ID rules
without log, benchmark, conda and resources and with ``shell: "true"`` instead of a script;
``two_jobs``, two jobs per science data ID (isr .. detectDiaSources and fakes in one rule, the
association and the alert packets in another), every product still its own output;
``two_jobs_bare``, both. None of the copies is a design we run: they only bound what such
changes could gain.

No pixels and no headers: the script writes the three Parquet tables of the `ingest` checkpoint
(``apsnake.registry`` columns) with footprints from the DECam focal-plane layout, empty
placeholder raw, calibration and refcat files (the DAG only checks that they exist) and a config
(``simulate: null``) pointing at them, touches the registry after its inputs so that the
checkpoint counts as done, then runs ``snakemake -n`` under ``/usr/bin/time -v`` (wall time, peak
RSS of the Snakemake process) and reads the job counts from its "Job stats" table. Target:
<= 30 s and < 2 GB for ``wide``; ``chain`` must not fail on recursion depth.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from apsnake.instruments import decam  # noqa: E402
from apsnake.registry import CALIB_COLUMNS, EXPOSURE_COLUMNS, REJECTED_COLUMNS  # noqa: E402

ARCSEC_PER_MM = 0.263 / 0.015  # DECam plate scale: 0.263 arcsec per 15 um pixel
CCD_W_MM, CCD_H_MM = 2048 * 0.015, 4096 * 0.015  # trimmed CCD; the long side along focal-plane y
VISIT0, MJD0 = 900000, 61000.05


def _ccd_corners(ra0: float, dec0: float, ccd: decam.CcdInfo) -> list[tuple[float, float]]:
    """(ra, dec) of the ll, lr, ur, ul corners of a CCD for a boresight (flat-sky approximation)."""
    corners = []
    for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
        x = (ccd.x_mm + sx * CCD_W_MM / 2) * ARCSEC_PER_MM / 3600
        y = (ccd.y_mm + sy * CCD_H_MM / 2) * ARCSEC_PER_MM / 3600
        corners.append((ra0 + x / np.cos(np.radians(dec0 + y)), dec0 + y))
    return corners


def make_registry(folder: Path, pointings: list[tuple[float, float]], detectors: list[int]) -> dict:
    """Registry tables + placeholder inputs for one visit per pointing; returns the paths."""
    raw_dir, calib_dir, reg_dir = folder / "raw", folder / "calib", folder / "out" / "registry"
    for d in (raw_dir, calib_dir, reg_dir):
        d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (ra0, dec0) in enumerate(pointings):
        visit, mjd = VISIT0 + i, MJD0 + i * 90 / 86400  # one exposure every 90 s
        raw = raw_dir / f"c4d_{visit}_ori.fits.fz"
        raw.touch()
        for hdu, det in enumerate(detectors, start=1):
            ccd = decam.ccd_info(det)
            corners = _ccd_corners(ra0, dec0, ccd)
            row = {
                "visit": visit, "detector": det, "detector_name": ccd.name, "observation_type": "science",
                "band": "g", "physical_filter": "g DECam SDSS c0001 4720.0 1520.0", "mjd_mid_tai": mjd,
                "date_obs_utc": "2026-01-01T00:00:00", "exposure_time": 60.0, "airmass": 1.2,
                "boresight_ra": ra0, "boresight_dec": dec0,
                "ra_center": float(np.mean([c[0] for c in corners])),
                "dec_center": float(np.mean([c[1] for c in corners])),
                "object_name": "synthetic", "raw_path": str(raw), "hdu": hdu,
            }
            for (ra, dec), name in zip(corners, ("ll", "lr", "ur", "ul")):
                row[f"ra_{name}"], row[f"dec_{name}"] = ra, dec
            rows.append(row)
    exposures = pd.DataFrame(rows, columns=EXPOSURE_COLUMNS).astype({"visit": "int64", "detector": "int64", "hdu": "int64"})
    calib_rows = []
    for kind, band in (("bias", None), ("flat", "g")):
        path = calib_dir / f"{kind}.fits"
        path.touch()
        for hdu, det in enumerate(detectors, start=1):
            calib_rows.append({"calib_type": kind, "band": band, "physical_filter": None, "mjd": MJD0 - 0.5,
                               "date_obs_utc": "2026-01-01T00:00:00", "detector": det, "path": str(path), "hdu": hdu})
    calibs = pd.DataFrame(calib_rows, columns=CALIB_COLUMNS).astype({"detector": "int64", "hdu": "int64"})
    refcat = folder / "refcat.parquet"
    refcat.touch()
    time.sleep(0.05)  # the registry must be newer than every input of the checkpoint
    exposures.to_parquet(reg_dir / "exposures.parquet")
    calibs.to_parquet(reg_dir / "calibs.parquet")
    pd.DataFrame([], columns=REJECTED_COLUMNS).to_parquet(reg_dir / "rejected.parquet")
    return {"raw": raw_dir, "calibs": calib_dir, "refcat": refcat, "outdir": folder / "out"}


def wide_pointings(n_visits: int, n_fields: int = 10) -> tuple[list, list]:
    """n_visits visits over n_fields fields 2.5 deg apart, dithered by up to 0.05 deg; the first
    visit of each field is a template visit."""
    rng = np.random.default_rng(14)
    pointings, templates = [], []
    per_field = max(n_visits // n_fields, 1)
    for i in range(n_visits):
        field = min(i // per_field, n_fields - 1)
        ra0, dec0 = 30.0 + 2.5 * (field % 5), -20.0 + 2.5 * (field // 5)
        pointings.append((ra0 + rng.uniform(-0.05, 0.05), dec0 + rng.uniform(-0.05, 0.05)))
        if i % per_field == 0 and i // per_field < n_fields:
            templates.append(VISIT0 + i)
    return pointings, templates


def job_stats(text: str) -> dict[str, int]:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            table = {}
            for row in lines[i + 3:]:
                parts = row.split()
                if len(parts) != 2:
                    break
                table[parts[0]] = int(parts[1])
            return table
    return {}


def dry_run(folder: Path, paths: dict, templates: list[int], targets: list[str] = (),
            snakefile: Path = REPO / "Snakefile") -> dict:
    config = {"simulate": None, "raw": str(paths["raw"]), "calibs": str(paths["calibs"]),
              "refcat": str(paths["refcat"]), "outdir": str(paths["outdir"]), "templates": {"visits": templates}}
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    shutil.rmtree(folder / ".snakemake", ignore_errors=True)
    return timed_dry_run(["--snakefile", str(snakefile), "--directory", str(folder), "--configfile",
                          str(config_path)], targets)


def timed_dry_run(args: list[str], targets=()) -> dict:
    """``snakemake ARGS --cores 1 -n TARGETS --quiet rules`` under ``/usr/bin/time -v``: wall and CPU
    time, peak RSS and the job counts (the targets follow ``-n``: ``--configfile`` and ``--quiet``
    take several values)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "snakemake", *args, "--cores", "1", "-n", *targets,
           "--quiet", "rules"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([0-9.]+)", text))
    stats = job_stats(text)
    return {"ok": proc.returncode == 0 and "total" in stats, "wall_s": wall, "cpu_s": cpu,
            "peak_rss_mb": int(rss.group(1)) / 1024 if rss else float("nan"),
            "jobs": stats, "tail": "" if proc.returncode == 0 else text[-3000:]}


FLOOR_SNAKEFILE = """
IDS = [f"{{v}}_{{d:02d}}" for v in range({visit0}, {visit0} + {n_visits}) for d in range({n_detectors})]
STEPS = [f"step{{i}}" for i in range({n_steps})]
rule all:
    input: expand(f"out/{{STEPS[-1]}}/{{{{id}}}}.txt", id=IDS)
    localrule: True
rule step0:
    output: "out/step0/{{id}}.txt"
    shell: "touch {{output}}"
for prev, cur in zip(STEPS, STEPS[1:]):
    rule:
        name: cur
        input: f"out/{{prev}}/{{{{id}}}}.txt"
        output: f"out/{{cur}}/{{{{id}}}}.txt"
        shell: "touch {{output}}"
"""


def floor_dry_run(folder: Path, n_visits: int, n_detectors: int, n_steps: int = 7) -> dict:
    """Snakemake's own cost per job: a chain of ``n_steps`` trivial rules per data ID (one input,
    one output, a shell command), nothing of ours."""
    snakefile = folder / "Snakefile"
    snakefile.write_text(FLOOR_SNAKEFILE.format(visit0=VISIT0, n_visits=n_visits, n_detectors=n_detectors,
                                                n_steps=n_steps))
    return timed_dry_run(["--snakefile", str(snakefile), "--directory", str(folder)])


PER_DATA_ID_RULE_FILES = ("isr", "calibrate", "template", "diffim", "fakes", "associate", "alerts")


def _edit(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced; fails loudly when the rules no longer read as expected."""
    if old not in text:
        raise SystemExit(f"whatif: the rules changed, cannot find {old!r}; update bench_dryrun.py")
    return text.replace(old, new)


def _sub(text: str, pattern: str, new: str, name: str) -> str:
    out, n = re.subn(pattern, new, text)
    if n == 0:
        raise SystemExit(f"whatif: the rules changed, no {name} found; update bench_dryrun.py")
    return out


def bare_rules(root: Path) -> None:
    """The per-data-ID rules without log, benchmark, conda and resources, running ``true``."""
    for name in PER_DATA_ID_RULE_FILES:
        path = root / "rules" / f"{name}.smk"
        text = path.read_text()
        text = _sub(text, r"\n\s+log:\n\s+f\"\{OUT\}/logs/.*\n", "\n", "log")
        text = _sub(text, r"\n\s+benchmark:\n\s+f\"\{OUT\}/benchmarks/.*\n", "\n", "benchmark")
        text = _sub(text, r"\n\s+conda:\n.*\n", "\n", "conda")
        text = _sub(text, r"\n\s+resources:\n\s+mem_mb=.*\n\s+runtime=.*\n", "\n", "resources")
        text = _sub(text, r"script:\n(\s+)\"\.\./scripts/.*\.py\"", r'shell:\n\1"true"', "script")
        path.write_text(text)


TWO_JOBS_RULE = """
    rule ccdPipe:
        wildcard_constraints:
            visit=f"(?!(?:{TEMPLATE_VISIT_RE})(?!\\\\d))\\\\d+",
        input:
            unpack(isr_inputs),
            refcat=config["refcat"],
            inputs=template_inputs,
        output:
            **(dict(exposure=product("postISR")) if KEEP_POSTISR else {}),
            isr_metadata=product("postISR", "json"),
            **CALIBRATE_OUTPUTS,
            template=product("template"),
            diffexp=product("diffexp"),
            diffim_metadata=product("diffexp", "json"),
            matched_template=product("matchedTemplate"),
            diaSrc=product("diaSrc", "parquet"),
            fakes=product("fakes", "parquet"),
        log:
            f"{OUT}/logs/ccdPipe/{{visit}}/ccdPipe_{{visit}}_{{detector}}.log",
        benchmark:
            f"{OUT}/benchmarks/ccdPipe/{{visit}}/ccdPipe_{{visit}}_{{detector}}.tsv"
        params:
            calibs=isr_calibrations,
            isr=config["isr"],
            calibrate=config["calibrate"],
            refcat_columns=config["refcat_columns"],
            mode=config["templates"]["mode"],
            diffim=config["diffim"],
            dia=config["dia"],
            fakes=FAKES,
        threads: 1
        resources:
            mem_mb=3000,
            runtime=40,
        conda:
            "../envs/apsnake.yaml"
        script:
            "../scripts/process_ccd.py"
"""
NEVER = """wildcard_constraints:
{indent}        visit="never","""


def two_jobs(root: Path) -> None:
    """Two jobs per science data ID: ``ccdPipe`` (isr .. detectDiaSources + fakes; processCcd
    stays for the template visits) and ``associate`` writing the alert packets too."""
    rules = root / "rules"
    text = (rules / "calibrate.smk").read_text()
    text = _edit(text, "    rule processCcd:\n        input:",
                 '    TEMPLATE_VISIT_RE = "|".join(str(v) for v in config["templates"]["visits"])\n'
                 '    rule processCcd:\n        wildcard_constraints:\n            visit=f"(?:{TEMPLATE_VISIT_RE})",'
                 "\n        input:")
    (rules / "calibrate.smk").write_text(text + TWO_JOBS_RULE)
    for name, rule, indent in (("diffim", "imageDifference", "    "), ("fakes", "fakes", ""),
                               ("alerts", "package_alerts", "")):
        text = (rules / f"{name}.smk").read_text()
        text = _edit(text, f"{indent}rule {rule}:\n",
                     f"{indent}rule {rule}:\n{indent}    " + NEVER.format(indent=indent) + "\n")
        (rules / f"{name}.smk").write_text(text)
    text = (rules / "associate.smk").read_text()
    text = _edit(text, '        marker=str(marker_path(OUT, "{visit}", "{detector}")),\n    log:',
                 '        marker=str(marker_path(OUT, "{visit}", "{detector}")),\n'
                 '        alerts=product("alerts", "avro"),\n    log:')
    text = _edit(text, "        previous=previous_markers,",
                 '        previous=previous_markers,\n        template=product("template"),')
    (rules / "associate.smk").write_text(text)
    # calibrate.smk now uses names from template, diffim and fakes: include it after them.
    text = (root / "Snakefile").read_text()
    text = _edit(text, 'include: "rules/calibrate.smk"\n', "")
    text = _edit(text, 'include: "rules/report.smk"\n', 'include: "rules/calibrate.smk"\ninclude: "rules/report.smk"\n')
    (root / "Snakefile").write_text(text)


def workflow_copy(folder: Path, variant: str) -> Path:
    """A copy of the workflow (file times kept: the registry must stay newer than its code)."""
    root = folder / f"workflow_{variant}"
    root.mkdir()
    for name in ("Snakefile", "config.yaml", "config.schema.yaml"):
        shutil.copy2(REPO / name, root / name)
    for name in ("rules", "scripts", "envs"):
        shutil.copytree(REPO / name, root / name)
    if "two_jobs" in variant:
        two_jobs(root)
    if "bare" in variant:
        bare_rules(root)
    return root / "Snakefile"


def run_case(name: str, n_visits: int, detectors: list[int], keep: Path | None, n_steps: int = 7) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"bench_dryrun_{name}_", dir=keep))
    try:
        if name == "floor":
            result = floor_dry_run(folder, n_visits, len(detectors), n_steps)
            result.update(case=name, visits=n_visits, detectors=len(detectors), data_ids=n_visits * len(detectors),
                          setup_s=0.0, folder=str(folder), target=f"{n_steps} trivial rules per data ID")
            return [result]
        if name in ("wide", "whatif"):
            pointings, templates = wide_pointings(n_visits)
        else:
            pointings, templates = [(150.0, 2.2)] * n_visits, [VISIT0]
        t0 = time.perf_counter()
        paths = make_registry(folder, pointings, detectors)
        setup = time.perf_counter() - t0
        results = [dry_run(folder, paths, templates)]
        if name == "whatif":
            results[0]["target"] = "the workflow as it is"
            for variant in ("bare", "two_jobs", "two_jobs_bare"):
                results.append(dry_run(folder, paths, templates, snakefile=workflow_copy(folder, variant)))
                results[-1]["target"] = variant
        if name == "chain":
            # The DAG entered at the end of the chain: Snakemake then resolves the whole chain
            # recursively (the full night's targets are in time order, which keeps it shallow).
            last = f"{paths['outdir']}/alerts/{VISIT0 + n_visits - 1}/alerts_{VISIT0 + n_visits - 1}_{detectors[0]:02d}.avro"
            results.append(dry_run(folder, paths, templates, [last]))
            results[-1]["target"] = "the last visit's alerts"
        for result in results:
            result.update(case=name, visits=n_visits, detectors=len(detectors), data_ids=n_visits * len(detectors),
                          setup_s=setup, folder=str(folder))
        return results
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", default="all", choices=("wide", "chain", "floor", "whatif", "all"))
    parser.add_argument("--visits", type=int, help="visits (default: wide 100, chain 300)")
    parser.add_argument("--detectors", type=int, help="CCDs per visit (default: wide 62, chain 2)")
    parser.add_argument("--steps", type=int, default=7, help="floor: trivial rules per data ID (default 7)")
    parser.add_argument("--keep", type=Path, help="make the scratch folders under DIR and keep them")
    args = parser.parse_args()
    cases = ("wide", "chain") if args.case == "all" else (args.case,)
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    for case in cases:
        n_visits = args.visits or (300 if case == "chain" else 100)
        n_det = args.detectors or (2 if case == "chain" else 62)
        detectors = list(decam.SCIENCE_CCDNUMS[:n_det]) if case != "chain" else [28, 35][:n_det] + list(
            d for d in decam.SCIENCE_CCDNUMS if d not in (28, 35))[: max(n_det - 2, 0)]
        results = run_case(case, n_visits, detectors, args.keep, args.steps)
        r = results[0]
        print(f"\n{case}: {r['visits']} visits x {r['detectors']} CCDs = {r['data_ids']} data IDs "
              f"(registry written in {r['setup_s']:.1f} s)")
        for r in results:
            total = r["jobs"].get("total", 0)
            print(f"  snakemake -n ({r.get('target', 'the whole night')}): {'ok' if r['ok'] else 'FAILED'}, "
                  f"{total} jobs, {r['wall_s']:.1f} s ({r['cpu_s']:.1f} s CPU), peak RSS {r['peak_rss_mb']:.0f} MB")
            print("    jobs: " + ", ".join(f"{k} {v}" for k, v in r["jobs"].items() if k != "total"))
            if not r["ok"]:
                print(r["tail"])
        if args.keep:
            print(f"  kept: {r['folder']}")


if __name__ == "__main__":
    main()
