"""Difference-imaging benchmark: template + subtraction + DIA detection and measurement of one
full DECam CCD, as the workflow's default (single-visit template) does it.

    python benchmarks/bench_diffim.py [OUT]

OUT is a finished workflow output folder of the `dense` night with single-visit templates
(default: benchmarks/out/workflow_dense_single/out, which `measure_dia_truth.py --template-mode
single dense` makes). Fresh interpreter, one thread. Target (issue 11): < 4 s and < 2 GB.
"""

import sys
from pathlib import Path

from _measure import in_fresh_process, report

OUT = Path(__file__).resolve().parent / "out" / "workflow_dense_single" / "out"

CODE = """
import os
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
import glob, json, resource, time, warnings
warnings.simplefilter("ignore")
import pandas as pd
from apsnake.dia import detect_dia_sources
from apsnake.diffim import DiffimConfig, subtract
from apsnake.exposure import read_exposure
from apsnake.templates import best_single_visit_template
out = "{out}"
t = time.perf_counter()
calexp = read_exposure(f"{{out}}/calexp/419803/calexp_419803_32.fits")
src = pd.read_parquet(f"{{out}}/src/419803/src_419803_32.parquet")
reg = pd.read_parquet(f"{{out}}/registry/exposures.parquet")
template_visits = sorted(set(reg.visit) - set(int(p.split("/")[-1]) for p in glob.glob(f"{{out}}/diaSrc/*")))
candidates = [read_exposure(p, memmap=True) for v in template_visits for p in sorted(glob.glob(f"{{out}}/calexp/{{v}}/*.fits"))]
t_read = time.perf_counter() - t
t = time.perf_counter()
template = best_single_visit_template(calexp, candidates)
t_template = time.perf_counter() - t
t = time.perf_counter()
result = subtract(calexp, template, src, DiffimConfig(kernel_star_snr=(30.0, None), model_error=0.01))
t_diff = time.perf_counter() - t
t = time.perf_counter()
table = detect_dia_sources(result.difference, calexp, result.matched_template)
t_dia = time.perf_counter() - t
m = result.metadata
print(json.dumps({{"read": t_read, "template": t_template, "diffim": t_diff, "dia": t_dia, "n": table.num_rows,
                  "ncand": len(candidates), "kernel": m["kernel_size"], "stars": m["n_kernel_stars"],
                  "steps": {{k: round(v, 3) for k, v in m.items() if k.startswith("time_")}},
                  "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    if not (out / "calexp" / "419803" / "calexp_419803_32.fits").exists():
        sys.exit(f"no inputs under {out}: run measure_dia_truth.py --template-mode single dense first")
    r = min((in_fresh_process(CODE.format(out=out)) for _ in range(2)), key=lambda d: d["template"] + d["diffim"] + d["dia"])
    total = r["template"] + r["diffim"] + r["dia"]
    print(f"kernel {r['kernel']} px, {r['stars']} kernel stars; subtraction steps {r['steps']}")
    report(f"Difference imaging of one full DECam CCD (best of 2, one thread, {r['n']} DIA sources)", [
        (f"read calexp, src; open {r['ncand']} template calexps as memory maps", r["read"], float("nan")),
        ("template: best single visit, warped onto the calexp", r["template"], float("nan")),
        ("Alard-Lupton subtraction + decorrelation", r["diffim"], float("nan")),
        ("DIA detection + measurement", r["dia"], float("nan")),
        ("total (template + subtraction + DIA)", total, r["mb"]),
    ])


if __name__ == "__main__":
    main()
