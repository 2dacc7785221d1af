"""ISR benchmark: one full DECam CCD, raw + calibrations in, postISR FITS out.

    python benchmarks/bench_isr.py

Runs in a fresh interpreter (peak memory includes Python, numpy and astropy) with one
BLAS/OpenMP thread, i.e. on one core. Target (issue): < 1.5 s and < 1 GB.
"""

from _measure import ensure_night, in_fresh_process, report

CODE = """
import os
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
import json, resource, tempfile, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
from apsnake import isr, registry
from apsnake.exposure import write_exposure
from apsnake.instruments import decam_files
t_import = time.perf_counter() - t0
reg = registry.build_registry(registry.find_input_files("{night}/raw"), registry.find_input_files("{night}/calib"))
row = reg.exposures[(reg.exposures.visit == 419803) & (reg.exposures.detector == 32)].iloc[0]
cal = registry.select_calibrations(reg.calibs, row)
t = time.perf_counter()
raw = decam_files.read_raw_ccd(row.raw_path, 32)
bias = decam_files.read_master_calibration(cal["bias"][0], 32, cal["bias"][1])[0]
flat = decam_files.read_master_calibration(cal["flat"][0], 32, cal["flat"][1])[0]
bpm = decam_files.read_master_calibration(cal["bpm"][0], 32, cal["bpm"][1])[0]
t_read = time.perf_counter() - t
t = time.perf_counter()
result = isr.run_isr(raw, bias, flat, bpm, flat_band="g")
t_isr = time.perf_counter() - t
t = time.perf_counter()
write_exposure(result.exposure, tempfile.mktemp(suffix=".fits"))
t_write = time.perf_counter() - t
print(json.dumps({{"import": t_import, "read": t_read, "isr": t_isr, "write": t_write,
                  "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    night = ensure_night()
    r = min((in_fresh_process(CODE.format(night=night)) for _ in range(3)), key=lambda d: d["isr"])
    total = r["read"] + r["isr"] + r["write"]
    report("ISR of one full DECam CCD (best of 3, one thread)", [
        ("imports (apsnake.isr, exposure, decam)", r["import"], float("nan")),
        ("read raw + bias + flat + BPM", r["read"], float("nan")),
        ("run_isr", r["isr"], float("nan")),
        ("write postISR FITS", r["write"], float("nan")),
        ("total (read + ISR + write)", total, r["mb"]),
    ])


if __name__ == "__main__":
    main()
