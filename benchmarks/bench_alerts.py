"""Alert packaging benchmark: one full-size data ID with 100 alerts, three cutouts each.

    python benchmarks/bench_alerts.py

A synthetic APDB (made once under benchmarks/out/alerts_bench through the real writer,
``make_synthetic_apdb``) holds 9 earlier visits of one 0.12 x 0.12 deg field with ~110 objects,
each detected at ~90 % of the visits and measured by forced photometry at every visit. A tenth
visit on a full-size 2048 x 4096 DECam CCD centred on the field then commits 100 DiaSources (one
per object, every column filled, ``bboxSize`` 8-70 px so that the cutouts are 30-70 px) with their
DiaObject versions and forced sources, and full-size difference, science and template images
(noise, TAN WCS, a 3-component PSF model) are written as the workflow writes them.

``package_data_id`` then runs as the workflow job runs it (image paths: memory-mapped, only the
cutouts read), in a fresh interpreter with one thread, twice (the first warms the file cache)
and the second is reported: the imports (the alert modules, the schema, and the APDB and HEALPix
modules that history loading needs), the call itself (history loading, 100 x 3 cutouts, records,
the Avro file) and its parts, the peak RSS of the process (Python and libraries included) and the
size of the file per alert.

Target (issue 12): <= 0.5 s and < 500 MB. Rubin's alerts are ~70 kB with 30 x 30 cutouts.
"""

import json
import sys
from pathlib import Path

from _measure import in_fresh_process, report

HERE = Path(__file__).resolve().parent
ROOT = HERE / "out" / "alerts_bench"
N_ALERTS = 100

MAKE = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
from astropy.wcs import WCS
sys.path.insert(0, "{here}")
from make_synthetic_apdb import MJD0, VISIT0, _filled, make_synthetic_apdb
from apsnake import apdb
from apsnake.apdb import Apdb
from apsnake.association.plan import footprint_cells
from apsnake.exposure import Exposure, PsfModel, VisitInfo, write_exposure
from apsnake.ids import dia_source_ids

root, n_alerts = "{root}", {n_alerts}
t = time.perf_counter()
made = make_synthetic_apdb(root, n_visits=9, n_ra=1, n_dec=1, n_objects=110, sources_per_data_id=100,
                           region_deg=0.12, ra0=150.0, dec0=2.0, dither_deg=0.0, forced=True, seed=3)
rng = np.random.default_rng(4)
visit, detector, mjd = VISIT0 + 9, 1, MJD0 + 9.0
shape = (4096, 2048)
wcs = WCS(naxis=2)
wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
wcs.wcs.crval = [150.0, 2.0]
wcs.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
wcs.wcs.cd = np.array([[-0.263, 0.0], [0.0, 0.263]]) / 3600.0
objects = Apdb(root).objects()
objects = objects.iloc[:n_alerts]
n = len(objects)
ra = objects["ra"].to_numpy() + rng.normal(0, 0.1, n) / 3.6e3
dec = objects["dec"].to_numpy() + rng.normal(0, 0.1, n) / 3.6e3
x, y = wcs.all_world2pix(ra, dec, 0)
src = _filled("DiaSource", n, rng)
src.update(diaSourceId=dia_source_ids(visit, detector, n), visit=np.full(n, visit), detector=np.full(n, detector),
           diaObjectId=objects["diaObjectId"].to_numpy(), ssObjectId=np.full(n, np.nan),
           parentDiaSourceId=np.full(n, np.nan), midpointMjdTai=np.full(n, mjd), ra=ra, dec=dec, x=x, y=y,
           bboxSize=rng.integers(8, 71, n), band=np.full(n, "g"), timeProcessedMjdTai=np.full(n, mjd + 0.01),
           timeWithdrawnMjdTai=np.full(n, np.nan), trailNdata=np.full(n, np.nan), reliability=rng.uniform(0.5, 1, n))
obj = _filled("DiaObject", n, rng)
obj.update(diaObjectId=objects["diaObjectId"].to_numpy(), validityStartMjdTai=np.full(n, mjd),
           ra=objects["ra"].to_numpy(), dec=objects["dec"].to_numpy(), nDiaSources=objects["nDiaSources"] + 1,
           firstDiaSourceMjdTai=objects["firstDiaSourceMjdTai"].to_numpy(), lastDiaSourceMjdTai=np.full(n, mjd))
all_objects = Apdb(root).objects()
m = len(all_objects)
fsrc = _filled("DiaForcedSource", m, rng)
fsrc.update(diaForcedSourceId=dia_source_ids(visit, detector, m) + 2**25, diaObjectId=all_objects["diaObjectId"],
            ra=all_objects["ra"], dec=all_objects["dec"], visit=np.full(m, visit), detector=np.full(m, detector),
            midpointMjdTai=np.full(m, mjd), band=np.full(m, "g"), timeProcessedMjdTai=np.full(m, mjd + 0.01),
            timeWithdrawnMjdTai=np.full(m, np.nan))
corners = wcs.all_pix2world([[0, 0], [shape[1], 0], [shape[1], shape[0]], [0, shape[0]]], 0)
cells = footprint_cells(corners, 9, 60.0)
apdb.commit_data_id(root, visit, detector, mjd, cells, 9,
                    {{"DiaSource": src, "DiaObject": obj, "DiaForcedSource": fsrc}})
g = np.exp(-0.5 * ((np.arange(25) - 12) / 1.7) ** 2)
core = (np.outer(g, g) / np.outer(g, g).sum()).astype(np.float32)
psf = PsfModel(components=np.stack([core, 0.01 * core, 0.01 * core.T]), spatial_order=1, x0=1024.0, y0=2048.0,
               scale=2048.0, fwhm_pixels=4.0)
info = VisitInfo(visit=visit, band="g", mjd_mid_tai=mjd, exposure_time=90.0, object_name="bench")
for seed, name in enumerate(("diffexp", "calexp", "template")):
    ex = Exposure.empty(shape, info, detector=detector, unit="nJy", wcs=wcs, psf=psf)
    ex.image[:] = np.random.default_rng(seed).normal(0, 20.0, shape)
    ex.variance[:] = 400.0
    write_exposure(ex, f"{{root}}/bench_{{name}}.fits")
print(json.dumps(dict(visit=visit, detector=detector, n_objects=m, seconds=time.perf_counter() - t)))
"""

JOB = """
import os
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
import json, resource, time, warnings
warnings.simplefilter("ignore")
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
t0 = time.perf_counter()
from apsnake.alerts import package_data_id
from apsnake.alerts.records import load_alert_schema
from apsnake.association.plan import cells_of
load_alert_schema()
cells_of([150.0], [2.0], 9)  # HEALPix (astropy-healpix, ~0.6 s of imports), which load_history uses
t_import, rss_import = time.perf_counter() - t0, rss()
root, visit, detector = "{root}", {visit}, {detector}
t0 = time.perf_counter()
written = package_data_id(root, visit, detector, root + "/bench_diffexp.fits", root + "/bench_calexp.fits",
                          root + "/bench_template.fits", output=root + "/bench_alerts.avro")
t_package = time.perf_counter() - t0
print(json.dumps(dict(t_import=t_import, rss_import=rss_import, t_package=t_package, rss=rss(), written=written)))
"""


def main() -> None:
    if not (ROOT / "bench_template.fits").exists():
        made = in_fresh_process(MAKE.format(here=HERE, root=ROOT, n_alerts=N_ALERTS))
        (ROOT / "bench_setup.json").write_text(json.dumps(made))
        print(f"synthetic APDB and images written in {made['seconds']:.0f} s")
    setup = json.loads((ROOT / "bench_setup.json").read_text())
    in_fresh_process(JOB.format(root=ROOT, **{k: setup[k] for k in ("visit", "detector")}))  # warm the file cache
    r = in_fresh_process(JOB.format(root=ROOT, **{k: setup[k] for k in ("visit", "detector")}))
    w = r["written"]
    print(f"{w['n_alerts']} alerts of {w['n_dia_sources']} DiaSources, {w['n_prv_dia_sources']} previous DiaSources "
          f"and {w['n_prv_dia_forced_sources']} forced sources sent ({w['history_data_ids']} data IDs of history), "
          f"cutouts {w['cutout_size_min']}-{w['cutout_size_max']} px, schema {w['schema_version']}; file "
          f"{w['bytes'] / 1e6:.2f} MB = {w['bytes_per_alert'] / 1e3:.1f} kB per alert (deflate)")
    report("Alerts of one data ID (fresh interpreter, one thread; peak RSS so far)", [
        ("imports (alerts, schema, APDB, HEALPix)", r["t_import"], r["rss_import"]),
        ("  history (load_history)", w["seconds_history"], float("nan")),
        ("  open the 3 images (memory maps, WCS, PSF)", w["seconds_images"], float("nan")),
        ("  cutouts and records", w["seconds_build"], float("nan")),
        ("  write the Avro file", w["seconds_write"], float("nan")),
        (f"package_data_id ({w['n_alerts']} alerts)", r["t_package"], r["rss"]),
        ("whole job in a fresh interpreter", r["t_import"] + r["t_package"], r["rss"]),
    ])


if __name__ == "__main__":
    sys.exit(main())
