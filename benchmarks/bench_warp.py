"""Warping benchmark: our ``warp_exposure`` against the reproject package on one full CCD.

    python benchmarks/bench_warp.py

A 2048 x 4096 calexp-like exposure (TAN-SIP WCS in DECam orientation, stars on noise, a
saturated block) is warped onto a north-up TAN grid that holds it (as a template patch or a
calexp grid does). ``warp_exposure`` resamples the image, the variance and the mask and warps
the PSF in one call (Lanczos-3, flux-conserving); reproject needs one call per plane
(image and variance; the mask with nearest-neighbour) and knows nothing of PSFs or flux per
pixel. Each variant runs in a fresh interpreter with one thread; the accuracy column is the
rms of the warped star fluxes (PSF-weighted aperture sums) against the input's, in %.
"""

from _measure import in_fresh_process, report

SETUP = """
import os
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"
import json, resource, time, warnings
warnings.simplefilter("ignore")
import numpy as np
from astropy.wcs import WCS, Sip
from apsnake.exposure import Exposure, PsfModel, VisitInfo

shape = (4096, 2048)
rng = np.random.default_rng(1)
scale = 0.263 / 3600
w = WCS(naxis=2)
w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
w.wcs.crval = [150.0, 2.0]
w.wcs.crpix = [1024.5, 2048.5]
w.wcs.cd = np.array([[0.0, scale], [-scale, 0.0]]) @ np.array([[np.cos(0.003), -np.sin(0.003)], [np.sin(0.003), np.cos(0.003)]])
a = np.zeros((4, 4)); b = np.zeros((4, 4)); a[2, 0] = 2e-6; b[0, 2] = -1.5e-6; a[3, 0] = 1e-10
w.sip = Sip(a, b, None, None, w.wcs.crpix)
w.wcs.set()
yy, xx = np.mgrid[-12:13, -12:13]
stamp = np.exp(-0.5 * (xx ** 2 + yy ** 2) / 1.7 ** 2); stamp /= stamp.sum()
image = rng.normal(0, 30, shape).astype(np.float32)
xs, ys = rng.uniform(40, 2008, 400), rng.uniform(40, 4056, 400)
fluxes = rng.uniform(2e4, 2e5, 400)
for x, y, f in zip(xs, ys, fluxes):
    ix, iy = int(round(x)), int(round(y))
    image[iy - 12:iy + 13, ix - 12:ix + 13] += f * stamp
exp = Exposure(image=image, mask=np.zeros(shape, np.int32), variance=np.full(shape, 900.0, np.float32),
               visit_info=VisitInfo(visit=1, band="g"), detector=1, unit="nJy", wcs=w,
               psf=PsfModel(components=stamp[None].astype(np.float32)))
exp.mask[1000:1010, 500:505] = exp.mask_bit("SAT")
target = WCS(naxis=2)
target.wcs.ctype = ["RA---TAN", "DEC--TAN"]
target.wcs.crval = [150.0, 2.0]
tshape = (2200, 4300)
target.wcs.crpix = [(tshape[1] + 1) / 2, (tshape[0] + 1) / 2]
target.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]])
target.wcs.set()
ra, dec = w.all_pix2world(xs, ys, 0)
tx, ty = target.all_world2pix(ra, dec, 0)

def star_fluxes(img):
    out = []
    for x, y in zip(tx, ty):
        ix, iy = int(round(x)), int(round(y))
        out.append(img[iy - 10:iy + 11, ix - 10:ix + 11].sum())
    return np.array(out)
"""

VARIANTS = {
    "apsnake warp_exposure (image, variance, mask, PSF)": """
from apsnake.templates import warp_exposure
t = time.perf_counter()
out = warp_exposure(exp, target, tshape)
seconds = time.perf_counter() - t
img = out.image
""",
    **{f"reproject_interp {order} (image, variance, mask)": f"""
from reproject import reproject_interp
t = time.perf_counter()
img, _ = reproject_interp((exp.image, w), target, shape_out=tshape, order="{order}")
var, _ = reproject_interp((exp.variance, w), target, shape_out=tshape, order="bilinear")
msk, _ = reproject_interp((exp.mask.astype(float), w), target, shape_out=tshape, order="nearest-neighbor")
seconds = time.perf_counter() - t
""" for order in ("bilinear", "bicubic")},
    "reproject_adaptive (image only, flux-conserving)": """
from reproject import reproject_adaptive
t = time.perf_counter()
img, _ = reproject_adaptive((exp.image, w), target, shape_out=tshape, conserve_flux=True, kernel="gaussian")
seconds = time.perf_counter() - t
""",
}

REPORT = """
rel = star_fluxes(np.nan_to_num(img)) / (fluxes * 1.0) - 1
print(json.dumps({"seconds": seconds, "mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "flux_bias_pct": 100 * float(np.median(rel)), "flux_rms_pct": 100 * float(np.std(rel))}))
"""


def main() -> None:
    rows = []
    for name, code in VARIANTS.items():
        r = min((in_fresh_process(SETUP + code + REPORT) for _ in range(2)), key=lambda d: d["seconds"])
        rows.append((f"{name}", r["seconds"], r["mb"]))
        print(f"{name}: {r['seconds']:.2f} s, {r['mb']:.0f} MB, star flux bias {r['flux_bias_pct']:+.2f} %, "
              f"rms {r['flux_rms_pct']:.2f} %")
    report("Warp of one full DECam CCD onto a north-up TAN grid (best of 2, one thread)", rows)


if __name__ == "__main__":
    main()
