"""Calibration benchmark: one full DECam CCD, postISR in, calexp + src + background out.

    python benchmarks/bench_calibrate.py

The postISR input is made once (ISR in a separate process); the measured process only
reads it, calibrates and writes, on one thread. Target (issue): < 3 s and < 1.5 GB.
"""

import subprocess
import sys

from _measure import ensure_night, in_fresh_process, report

MAKE_POST_ISR = """
import warnings; warnings.simplefilter("ignore")
from apsnake import isr, registry
from apsnake.exposure import write_exposure
from apsnake.instruments import decam_files
reg = registry.build_registry(registry.find_input_files("{night}/raw"), registry.find_input_files("{night}/calib"))
row = reg.exposures[(reg.exposures.visit == 419803) & (reg.exposures.detector == 32)].iloc[0]
cal = registry.select_calibrations(reg.calibs, row)
c = {{k: decam_files.read_master_calibration(cal[k][0], 32, cal[k][1])[0] for k in ("bias", "flat", "bpm")}}
res = isr.run_isr(decam_files.read_raw_ccd(row.raw_path, 32), c["bias"], c["flat"], c["bpm"], flat_band="g")
write_exposure(res.exposure, "{night}/postISR_419803_32.fits")
"""

CODE = """
import os
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
import json, resource, tempfile, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
from apsnake import refcat as refcat_io
from apsnake.atomic import write_parquet
from apsnake.calibrate import calibrate_exposure
from apsnake.exposure import read_exposure, write_background, write_exposure
t_import = time.perf_counter() - t0
t = time.perf_counter()
exp = read_exposure("{night}/postISR_419803_32.fits")
stars = refcat_io.select_band(refcat_io.read_refcat("{night}/refcat.parquet"), "g")
stars = refcat_io.in_footprint(stars, exp.wcs, exp.shape, 400)
t_read = time.perf_counter() - t
t = time.perf_counter()
res = calibrate_exposure(exp, stars)
t_cal = time.perf_counter() - t
t = time.perf_counter()
tmp = tempfile.mkdtemp()
write_exposure(res.calexp, tmp + "/calexp.fits")
write_background(res.background.image, tmp + "/bkg.fits", noise=res.background.rms)
write_parquet(res.sources, tmp + "/src.parquet")
t_write = time.perf_counter() - t
print(json.dumps({{"import": t_import, "read": t_read, "cal": t_cal, "write": t_write,
                  "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "meta": res.metadata}}))
"""


def main() -> None:
    night = ensure_night()
    if not (night / "postISR_419803_32.fits").exists():
        subprocess.run([sys.executable, "-c", MAKE_POST_ISR.format(night=night)], check=True)
    r = min((in_fresh_process(CODE.format(night=night)) for _ in range(3)), key=lambda d: d["cal"])
    report("Calibration of one full DECam CCD (best of 3, one thread)", [
        ("imports", r["import"], float("nan")),
        ("read postISR + refcat", r["read"], float("nan")),
        ("calibrate_exposure", r["cal"], float("nan")),
        ("write calexp + background + src", r["write"], float("nan")),
        ("total (read + calibrate + write)", r["read"] + r["cal"] + r["write"], r["mb"]),
    ])
    m = r["meta"]
    print(f"\nQA: FWHM {m['fwhm_arcsec']:.2f}\", {m['n_sources']} sources, {m['n_psf_stars']} PSF stars, "
          f"{m['n_astrometry_matches']} astrometric matches (rms {m['astrometry_rms_mas']:.0f} mas), "
          f"zp {m['zero_point']:.3f} +/- {m['zero_point_err']:.3f} from {m['n_photometry_stars']} stars")


if __name__ == "__main__":
    main()
