"""Difference-imaging benchmark: template warp + subtraction + DIA detection and
measurement of one full DECam CCD.

    python benchmarks/bench_diffim.py      (run measure_dia_truth.py dense first: it makes the inputs)

Fresh interpreter, one thread. Target (issue): < 4 s and < 2 GB.
"""

import sys
from pathlib import Path

from _measure import in_fresh_process, report

OUT = Path(__file__).resolve().parent / "out" / "workflow_dense" / "out"

CODE = """
import os
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
import glob, json, resource, time, warnings
warnings.simplefilter("ignore")
import pandas as pd
from apsnake import dia, diffim
from apsnake.exposure import read_exposure
from apsnake.templates import SkyGrid, template_for_exposure
out = "{out}"
t = time.perf_counter()
calexp = read_exposure(f"{{out}}/calexp/419803/calexp_419803_32.fits")
src = pd.read_parquet(f"{{out}}/src/419803/src_419803_32.parquet")
reg = pd.read_parquet(f"{{out}}/registry/exposures.parquet")
row = reg[(reg.visit == 419803) & (reg.detector == 32)].iloc[0]
patches = SkyGrid().patch_ids_for_corners([row[f"ra_{{c}}"] for c in ("ll", "lr", "ur", "ul")],
                                         [row[f"dec_{{c}}"] for c in ("ll", "lr", "ur", "ul")], pad_arcsec=60)
coadds = [read_exposure(f"{{out}}/coadd/g/{{patch}}.fits") for patch in patches]
t_read = time.perf_counter() - t
t = time.perf_counter()
template = template_for_exposure(calexp, coadds)
t_template = time.perf_counter() - t
t = time.perf_counter()
result = diffim.subtract(calexp, template, src, diffim.DiffimConfig(kernel_star_snr=(30.0, 2000.0)))
t_diff = time.perf_counter() - t
t = time.perf_counter()
table = dia.detect_dia_sources(result.difference, calexp, result.matched_template)
t_dia = time.perf_counter() - t
print(json.dumps({{"read": t_read, "template": t_template, "diffim": t_diff, "dia": t_dia, "n": table.num_rows,
                  "npatches": len(coadds), "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    if not (OUT / "calexp" / "419803" / "calexp_419803_32.fits").exists():
        sys.exit(f"no inputs under {OUT}: run measure_dia_truth.py dense first")
    r = min((in_fresh_process(CODE.format(out=OUT)) for _ in range(2)), key=lambda d: d["template"] + d["diffim"] + d["dia"])
    total = r["template"] + r["diffim"] + r["dia"]
    report(f"Difference imaging of one full DECam CCD (best of 2, one thread, {r['n']} DIA sources)", [
        (f"read calexp, src, {r['npatches']} coadd patches", r["read"], float("nan")),
        ("template: warp coadd patches onto the calexp", r["template"], float("nan")),
        ("Alard-Lupton subtraction + decorrelation", r["diffim"], float("nan")),
        ("DIA detection + measurement", r["dia"], float("nan")),
        ("total (template + subtraction + DIA)", total, r["mb"]),
    ])


if __name__ == "__main__":
    main()
