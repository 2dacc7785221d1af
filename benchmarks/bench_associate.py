"""Association benchmark: one data ID against an APDB of ~1e6 DiaSources and ~1e5 DiaObjects.

    python benchmarks/bench_associate.py

The APDB (made once under benchmarks/out/apdb_bench by ``make_synthetic_apdb``, through the
real writer) holds 10 visits x 100 pointings of 0.3 x 0.3 deg tiling a 3 x 3 deg field, every
object detected at every visit that covers it, forced photometry of every object under each
pointing. A new data ID (a full 2048 x 4096 DECam CCD at the field centre, after the last visit,
~450 DIA sources at known objects plus 50 new ones) is then associated in a fresh interpreter
with one thread, and timed in steps:

- ``load_history``: reading its cells' objects and history (the part that must not grow
  with the APDB);
- reading the diaSrc;
- ``associate_data_id`` as the workflow job calls it (image paths): load + match + summaries +
  forced photometry on the difference image, then on the calexp (read one after the other) +
  writing the fragments and the marker.

The inputs are written by a first interpreter, the job runs twice in fresh ones (the first
warms the file cache) and the second is reported, so peak memory is the job's own.

Target (issue 6): association under 1 s and 500 MB.
"""

import sys
from pathlib import Path

from _measure import in_fresh_process, report

HERE = Path(__file__).resolve().parent
ROOT = HERE / "out" / "apdb_bench"
LAYOUT = dict(n_visits=10, n_ra=10, n_dec=10, n_objects=115_000, sources_per_data_id=1000, region_deg=3.0,
              ra0=150.0, dec0=2.0)

MAKE = """
import json, sys, time
sys.path.insert(0, "{here}")
from make_synthetic_apdb import make_synthetic_apdb
t = time.perf_counter()
made = make_synthetic_apdb("{root}", **{layout})
made.pop("data_ids")
made["seconds"] = time.perf_counter() - t
print(json.dumps(made))
"""

CODE = """
import os
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
from astropy.wcs import WCS
sys.path.insert(0, "{here}")
from make_synthetic_apdb import MJD0, VISIT0, _filled
from apsnake import apdb, schema
from apsnake.association import pipeline
from apsnake.exposure import Exposure, PsfModel, VisitInfo, read_exposure, write_exposure
from apsnake.ids import dia_source_ids
from apsnake.association.plan import footprint_cells

root = "{root}"
rng = np.random.default_rng(5)
visit, detector, mjd = VISIT0 + 1000, 1, MJD0 + 30.0
shape = (4096, 2048)
wcs = WCS(naxis=2)
wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
wcs.wcs.crval = [150.0, 2.0]
wcs.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
wcs.wcs.cd = np.array([[-0.263, 0.0], [0.0, 0.263]]) / 3600.0
g = np.exp(-0.5 * ((np.arange(25) - 12) / 1.7) ** 2)
psf = PsfModel(components=(np.outer(g, g) / np.outer(g, g).sum())[None].astype(np.float32), spatial_order=0,
               fwhm_pixels=4.0)
info = VisitInfo(visit=visit, band="g", mjd_mid_tai=mjd, exposure_time=90.0)

def exposure(seed):
    ex = Exposure.empty(shape, info, detector=detector, unit="nJy", wcs=wcs, psf=psf)
    ex.image[:] = np.random.default_rng(seed).normal(0, 20.0, shape)
    ex.variance[:] = 400.0
    return ex

difference, science = exposure(1), exposure(2)
corners = wcs.all_pix2world([[0, 0], [shape[1], 0], [shape[1], shape[0]], [0, shape[0]]], 0)
cells = footprint_cells(corners, 9, 60.0)
history = apdb.load_history(root, cells, 9, (mjd, visit, detector), 360.0)
x, y = wcs.all_world2pix(history.objects["ra"], history.objects["dec"], 0)
on = np.flatnonzero((x > 0) & (x < shape[1]) & (y > 0) & (y < shape[0]))
known = rng.choice(on, size=min(450, on.size), replace=False)
ra = np.concatenate([history.objects["ra"].to_numpy()[known] + rng.normal(0, 0.1, known.size) / 3.6e3,
                     150.0 + rng.uniform(-0.07, 0.07, 50)])
dec = np.concatenate([history.objects["dec"].to_numpy()[known] + rng.normal(0, 0.1, known.size) / 3.6e3,
                      2.0 + rng.uniform(-0.14, 0.14, 50)])
n = ra.size
cols = _filled("DiaSource", n, rng)
cols.update(diaSourceId=dia_source_ids(visit, detector, n), visit=np.full(n, visit), detector=np.full(n, detector),
            diaObjectId=np.full(n, None), ssObjectId=np.full(n, None), ra=ra, dec=dec, band=np.full(n, "g"),
            midpointMjdTai=np.full(n, mjd), psfFluxErr=np.full(n, 100.0), raErr=np.full(n, 2e-5),
            decErr=np.full(n, 2e-5), scienceFluxErr=np.full(n, 100.0))
for name in schema.column_names("DiaSource"):
    if name.startswith("pixelFlags_") or name.endswith("_flag") or name in ("centroid_flag", "shape_flag"):
        cols[name] = np.zeros(n, bool)
dia_sources = schema.conform(cols, "DiaSource", extra="drop")
write_exposure(difference, root + "/bench_diffexp.fits")
write_exposure(science, root + "/bench_calexp.fits")
import pyarrow.parquet as pq
pq.write_table(dia_sources, root + "/bench_diaSrc.parquet")
print(json.dumps(dict(cells=[int(c) for c in cells], visit=visit, detector=detector, mjd=mjd)))
"""


JOB = """
import os
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
import json, resource, time, warnings
warnings.simplefilter("ignore")
import pyarrow.parquet as pq
from apsnake import apdb
from apsnake.association import pipeline

root = "{root}"
setup = json.loads('{setup}')
cells, visit, detector, mjd = setup["cells"], setup["visit"], setup["detector"], setup["mjd"]
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
t0 = time.perf_counter()
history = apdb.load_history(root, cells, 9, (mjd, visit, detector), 360.0)
t_load, rss_load = time.perf_counter() - t0, rss()
t0 = time.perf_counter()
dia_sources = pq.read_table(root + "/bench_diaSrc.parquet")
t_read, rss_read = time.perf_counter() - t0, rss()
t0 = time.perf_counter()
marker = pipeline.associate_data_id(root, dia_sources, root + "/bench_diffexp.fits", root + "/bench_calexp.fits",
                                   cells)
t_assoc = time.perf_counter() - t0
apdb.remove_data_id(root, visit, detector)
print(json.dumps(dict(t_load=t_load, rss_load=rss_load, t_read=t_read, rss_read=rss_read, t_assoc=t_assoc,
                      rss=rss(), data_ids=len(history.data_ids), objects=len(history.objects),
                      sources=len(history.sources), forced=len(history.forced_sources), n_dia=dia_sources.num_rows,
                      marker=marker)))
"""


def main() -> None:
    if not (ROOT / "apdb_marker").exists():
        made = in_fresh_process(MAKE.format(here=HERE, root=ROOT, layout=LAYOUT))
        print(f"synthetic APDB: {made['n_data_ids']} data IDs, rows {made['rows']}, "
              f"{made['objects']} objects, written in {made['seconds']:.0f} s")
    import json

    setup = in_fresh_process(CODE.format(here=HERE, root=ROOT))
    in_fresh_process(JOB.format(root=ROOT, setup=json.dumps(setup)))  # warm the file cache
    r = in_fresh_process(JOB.format(root=ROOT, setup=json.dumps(setup)))
    m = r["marker"]
    print(f"history of the data ID's {len(m['cells'])} cells: {r['data_ids']} data IDs, {r['objects']} DiaObjects, "
          f"{r['sources']} DiaSources, {r['forced']} DiaForcedSources; {r['n_dia']} new DIA sources -> "
          f"{m['numNewDiaObjects']} new, {m['numUpdatedDiaObjects']} updated objects, "
          f"{m['counts']['DiaForcedSource']} forced sources")
    report("Association of one data ID (fresh interpreter, one thread; peak RSS so far)", [
               ("load_history alone (its cells only)", r["t_load"], r["rss_load"]),
               ("read diaSrc", r["t_read"], r["rss_read"]),
               ("associate_data_id (load again, match, summarise,", r["t_assoc"], r["rss"]),
               ("  read diffexp then calexp for forced photometry,", float("nan"), float("nan")),
               ("  write fragments + marker)", float("nan"), float("nan")),
               ("whole job (read + associate)", r["t_read"] + r["t_assoc"], r["rss"]),
           ])


if __name__ == "__main__":
    sys.exit(main())
