"""Fixed cost of one Snakemake job here: `script:` vs `shell:` jobs, and our imports.

    python benchmarks/bench_workflow_overhead.py [N_JOBS]

Builds a scratch workflow of N trivial jobs of each kind and times `snakemake --cores 1`
(greedy scheduler); the difference over a one-job run, divided by N-1, is the per-job cost.
Also times the imports each of our scripts pays (numpy, astropy, the apsnake modules).
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import in_fresh_process, report

SNAKEFILE = """
N = int(config["njobs"])
rule all:
    input: expand("{kind}/{i}.txt", kind=config["kind"], i=range(N))
rule script_job:
    output: "script/{i}.txt"
    script: "job.py"
rule shell_job:
    output: "shell/{i}.txt"
    shell: "echo {wildcards.i} > {output}"
"""
SCRIPT = "from pathlib import Path\nPath(snakemake.output[0]).write_text('x')\n"


def run(workdir: Path, kind: str, n: int) -> float:
    for sub in ("script", "shell", ".snakemake"):
        subprocess.run(["rm", "-rf", str(workdir / sub)], check=True)
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", "--scheduler", "greedy", "all", "--quiet", "all",
           "--config", f"njobs={n}", f"kind={kind}", "--directory", str(workdir), "--snakefile", str(workdir / "Snakefile")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(n: int = 20) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "Snakefile").write_text(SNAKEFILE)
        (workdir / "job.py").write_text(SCRIPT)
        rows = []
        for kind in ("script", "shell"):
            one, many = run(workdir, kind, 1), run(workdir, kind, n)
            rows.append((f"{kind}: job cost (s/job, N={n})", (many - one) / (n - 1), float("nan")))
            rows.append((f"{kind}: snakemake start + 1 job", one, float("nan")))
    report("Snakemake per-job cost", rows)
    imports = []
    for label, module in (("numpy", "numpy"), ("astropy.io.fits + wcs", "astropy.io.fits, astropy.wcs"),
                          ("apsnake.registry", "apsnake.registry"), ("apsnake.isr + exposure", "apsnake.isr, apsnake.exposure")):
        res = in_fresh_process(
            "import time, json, resource; t=time.perf_counter(); import " + module +
            "; print(json.dumps({'t': time.perf_counter()-t, 'mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))",
            as_job=False)
        imports.append((f"import {label}", res["t"], res["mb"]))
    report("Import cost in a fresh interpreter", imports)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
