"""Foundation benchmark: simulate a night (per full CCD) and read one full raw CCD.

    python benchmarks/bench_simulate_read.py

Each measurement runs in a fresh interpreter so that its peak memory is its own.
"""

from _measure import ensure_night, in_fresh_process, report

SIMULATE = """
import json, resource, tempfile, time
from apsnake.sim import simulate_night
t = time.perf_counter()
s = simulate_night(tempfile.mkdtemp(), preset="test", seed=7)
dt = time.perf_counter() - t
print(json.dumps({"t": dt, "per_ccd": dt / (s["n_visits"] * len(s["ccds"])),
                  "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

READ = """
import json, resource, time, glob
from apsnake.instruments import decam_files
path = sorted(glob.glob("{night}/raw/*.fits.fz"))[-1]
t = time.perf_counter()
raw = decam_files.read_raw_ccd(path, 32)
dt = time.perf_counter() - t
assert raw.data.shape == (4146, 2160)
print(json.dumps({{"t": dt, "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    night = ensure_night()
    sim = in_fresh_process(SIMULATE)
    read = in_fresh_process(READ.format(night=night))
    report("Simulator and raw reader (full 2160x4146 DECam CCD)", [
        ("simulate test night (4 visits x 2 CCDs)", sim["t"], sim["mb"]),
        ("  per CCD (render + compress + write)", sim["per_ccd"], float("nan")),
        ("read one raw CCD (.fits.fz, by CCDNUM)", read["t"], read["mb"]),
    ])


if __name__ == "__main__":
    main()
