"""Where a DIA source sits on a simulated CCD-visit, for scoring against the truth.

False detections (issue 11)
---------------------------
A DIA source with no time-domain truth object (this visit's, or any at a template epoch)
within ``MATCH_RADIUS_ARCSEC`` is false. Each is given the *first* of these classes that
applies (``FALSE_CLASSES`` order):

1. ``star_g_lt_16``, 2. ``star_g_16_18``, 3. ``star_g_18_20``, 4. ``star_g_ge_20``: within
   ``star_radius_arcsec(g)`` of a truth star of that g magnitude (any star, variable or not):
   10" at g = 16, scaling as the square root of the flux (x 10^(-0.2 (g - 16))), between 2"
   and 60" (25" at g = 14, 60" from g = 12.1; 4" at g = 18, 2" from g = 19.5). PSF-matching
   residuals and dipoles sit within ~2 FWHM of a star and the rings of a mismatched PSF halo
   at 2-6"; only saturated stars (g < ~14 in 90 s) reach farther, with their bleed trails
   (~10" at g = 12, ~60" at g = 10). A source near stars of several bins goes to the
   brightest bin.
5. ``galaxy``: inside a truth galaxy's extent, the ellipse of semi-axes 2 r_half + 1" and
   2 q r_half + 1" (q = axis ratio, at the galaxy's position angle; the 1" is about the
   seeing FWHM).
6. ``cosmic_ray``: within ``CR_RADIUS_PX`` (4 px) of a pixel a simulated cosmic ray put
   charge in, in the science exposure or in a template exposure used for this data ID. The
   simulator keeps only their number (``truth/signature.parquet``), but its cosmic rays come
   from a random stream of their own, so they are replayed exactly (``cosmic_ray_pixels``;
   checked against that number). Where the replay fails, a source touching the ``CR`` mask
   plane (``pixelFlags_cr``) or sharper than the PSF (smaller second moment along its minor
   axis < half the PSF's) is counted instead.
7. ``bad_pixel_or_edge``: within ``BAD_PIXEL_RADIUS_PX`` (5 px) of a pixel of the
   simulator's bad-pixel mask (hot and dead columns, hot pixels; ``calib/DECam_bpm.fits``) in
   the science CCD or a template CCD, or within ``EDGE_PX`` (20 px) of the science CCD's
   border, of a template CCD's border, or of a pixel the template does not cover (NO_DATA).
8. ``none``: none of these.

So a cosmic ray or a bad column next to a star counts for the star: ``summarise`` also gives
the non-exclusive counts (a source in every class that applies) and the fraction of the
template-covered CCD area in each class (random positions), the share expected by chance.

The pre-existing ``false_per_ccd_visit_{away_from,near}_bright_stars`` (30" around g < 16)
are kept unchanged so that figures stay comparable.

Completeness on good pixels
---------------------------
A truth transient or variable is on good pixels when the 5 x 5 pixels around it carry no mask
plane except DETECTED, DETECTED_NEGATIVE and SUSPECT (ISR's 35-px CCD border flag; the edge
is the separate criterion), which also means the template covers them (no NO_DATA), and it is
more than ``EDGE_PX`` (20 px) from the CCD border. It is *near* other sources when another
time-domain truth object (this visit or a template epoch) is within ``NEAR_OTHER_ARCSEC``
(3"), or a star brighter than g = ``NEAR_STAR_MAG`` (20; not the object's own star) within
the larger of 3" and ``star_radius_arcsec(g)``. Positive and negative sources are those with
a truth difference flux > 0 and < 0.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

#: False-detection classes, in the order in which a source takes the first that applies.
FALSE_CLASSES = ("star_g_lt_16", "star_g_16_18", "star_g_18_20", "star_g_ge_20", "galaxy", "cosmic_ray",
                 "bad_pixel_or_edge", "none")
#: Star classes: (name, g_min, g_max).
#: Radius around a star of g = 16 (arcsec); it scales as sqrt(flux), within the limits below.
STAR_RADIUS_G16_ARCSEC = 10.0
STAR_BINS = (("star_g_lt_16", -np.inf, 16.0), ("star_g_16_18", 16.0, 18.0), ("star_g_18_20", 18.0, 20.0),
             ("star_g_ge_20", 20.0, np.inf))
STAR_RADIUS_MIN_ARCSEC = 2.0
STAR_RADIUS_MAX_ARCSEC = 60.0
#: A galaxy's extent: semi-axes GALAXY_EXTENT_R_HALF * r_half (x q for the minor) + the pad.
GALAXY_EXTENT_R_HALF = 2.0
GALAXY_EXTENT_PAD_ARCSEC = 1.0
CR_RADIUS_PX = 4.0
BAD_PIXEL_RADIUS_PX = 5.0
EDGE_PX = 20
#: Half side of the box checked for mask planes around a truth position (5 x 5 pixels).
GOOD_BOX_HALF_PX = 2
#: Mask planes that do not make a pixel bad (SUSPECT: ISR's 35-px CCD border flag).
GOOD_PLANES = ("DETECTED", "DETECTED_NEGATIVE", "SUSPECT", "SUSPECT_TEMPLATE")
NEAR_OTHER_ARCSEC = 3.0
NEAR_STAR_MAG = 20.0
def tangent_plane(ra, dec, ra0, dec0):
    """Local flat coordinates (arcsec) around (ra0, dec0)."""
    x = (np.asarray(ra) - ra0) * np.cos(np.radians(dec0)) * 3600.0
    y = (np.asarray(dec) - dec0) * 3600.0
    return np.column_stack([x, y])


def star_radius_arcsec(g_mag) -> np.ndarray:
    """Radius (arcsec) within which a source counts as near a star of magnitude ``g_mag``:
    10" at g = 16, x 10^(-0.2 (g - 16)) (the square root of the flux), clipped to 2"-60"."""
    r = STAR_RADIUS_G16_ARCSEC * 10.0 ** (-0.2 * (np.asarray(g_mag, float) - 16.0))
    return np.clip(r, STAR_RADIUS_MIN_ARCSEC, STAR_RADIUS_MAX_ARCSEC)


def _pairs(points_xy, centres_xy, radii):
    """(centre index, point index) of every point within its centre's radius (same units)."""
    from scipy.spatial import cKDTree

    points_xy, centres_xy = np.asarray(points_xy, float).reshape(-1, 2), np.asarray(centres_xy, float).reshape(-1, 2)
    if not len(points_xy) or not len(centres_xy):
        return np.zeros(0, int), np.zeros(0, int)
    lists = cKDTree(points_xy).query_ball_point(centres_xy, r=np.broadcast_to(np.asarray(radii, float),
                                                                               len(centres_xy)))
    counts = np.fromiter((len(v) for v in lists), int, len(lists))
    if not counts.sum():
        return np.zeros(0, int), np.zeros(0, int)
    return np.repeat(np.arange(len(lists)), counts), np.concatenate([np.asarray(v, int) for v in lists if v])


def near_stars(points_xy, stars_xy, star_g, exclude_star=None, star_ids=None, min_radius=0.0) -> np.ndarray:
    """Per point and star bin (``STAR_BINS`` order), whether a star of that bin has the point
    within ``max(star_radius_arcsec(g), min_radius)``; (n_points, 4) bool. Coordinates in
    arcsec.

    ``exclude_star`` (per point) and ``star_ids`` (per star) leave out a point's own star.
    """
    star_g = np.asarray(star_g, float)
    out = np.zeros((len(points_xy), len(STAR_BINS)), bool)
    ic, ip = _pairs(points_xy, stars_xy, np.maximum(star_radius_arcsec(star_g), min_radius))
    if exclude_star is not None and len(ip):
        keep = np.asarray(star_ids)[ic] != np.asarray(exclude_star)[ip]
        ic, ip = ic[keep], ip[keep]
    for b, (_, lo, hi) in enumerate(STAR_BINS):
        sel = (star_g[ic] >= lo) & (star_g[ic] < hi)
        out[ip[sel], b] = True
    return out


def on_galaxies(points_xy, gal_xy, r_half, axis_ratio, pa_deg) -> np.ndarray:
    """Whether each point is inside a galaxy's extent: the ellipse of semi-axes
    ``2 r_half + 1"`` and ``2 q r_half + 1"`` at position angle ``pa_deg`` (east of north).
    Coordinates in arcsec (x east, y north)."""
    r_half, q, pa = (np.asarray(v, float) for v in (r_half, axis_ratio, pa_deg))
    a = GALAXY_EXTENT_R_HALF * r_half + GALAXY_EXTENT_PAD_ARCSEC
    b = GALAXY_EXTENT_R_HALF * q * r_half + GALAXY_EXTENT_PAD_ARCSEC
    out = np.zeros(len(points_xy), bool)
    ic, ip = _pairs(points_xy, gal_xy, a)
    if len(ip):
        d = np.asarray(points_xy, float)[ip] - np.asarray(gal_xy, float)[ic]
        s, c = np.sin(np.radians(pa[ic])), np.cos(np.radians(pa[ic]))
        u = d[:, 0] * s + d[:, 1] * c  # along the major axis
        v = d[:, 0] * c - d[:, 1] * s
        inside = (u / a[ic]) ** 2 + (v / b[ic]) ** 2 <= 1.0
        out[ip[inside]] = True
    return out


def near_pixels(pixels_xy, x, y, radius) -> np.ndarray:
    """Whether each (x, y) is within ``radius`` of one of ``pixels_xy`` ((N, 2) x, y)."""
    from scipy.spatial import cKDTree

    x, y = np.asarray(x, float), np.asarray(y, float)
    if pixels_xy is None or not len(pixels_xy) or not len(x):
        return np.zeros(len(x), bool)
    d, _ = cKDTree(np.asarray(pixels_xy, float)).query(np.column_stack([x, y]), distance_upper_bound=radius)
    return d <= radius


def box_any(flag: np.ndarray, x, y, half: int) -> np.ndarray:
    """Whether any pixel of ``flag`` (2-D bool) is set in the (2 half + 1)^2 box centred on the
    nearest pixel to each (x, y) (the box is cut at the image border)."""
    ny, nx = flag.shape
    sat = np.zeros((ny + 1, nx + 1), np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(flag, axis=0, dtype=np.int64), axis=1)
    xi, yi = np.rint(np.asarray(x, float)).astype(int), np.rint(np.asarray(y, float)).astype(int)
    x0, x1 = np.clip(xi - half, 0, nx), np.clip(xi + half + 1, 0, nx)
    y0, y1 = np.clip(yi - half, 0, ny), np.clip(yi + half + 1, 0, ny)
    return (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) > 0


def near_border(x, y, shape, width) -> np.ndarray:
    """Whether each (x, y) is within ``width`` pixels of the border of a ``shape`` image."""
    ny, nx = shape
    x, y = np.asarray(x, float), np.asarray(y, float)
    return (x < width) | (y < width) | (x > nx - 1 - width) | (y > ny - 1 - width)


def sharper_than_psf(src: pd.DataFrame) -> np.ndarray:
    """Sources whose adaptive second moment along the minor axis is below half the PSF's (a
    cosmic ray or a hot pixel is narrower than the PSF at least across its track)."""
    if not len(src) or not {"ixx", "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF"} <= set(src.columns):
        return np.zeros(len(src), bool)

    def minor(xx, yy, xy):
        xx, yy, xy = (np.asarray(v, float) for v in (xx, yy, xy))
        return 0.5 * (xx + yy) - np.sqrt(0.25 * (xx - yy) ** 2 + xy ** 2)

    with np.errstate(invalid="ignore"):
        return minor(src["ixx"], src["iyy"], src["ixy"]) < 0.5 * minor(src["ixxPSF"], src["iyyPSF"], src["ixyPSF"])


def assign_false_class(attributes: pd.DataFrame) -> np.ndarray:
    """The first class of ``FALSE_CLASSES`` whose boolean column is set ("none" otherwise)."""
    out = np.full(len(attributes), "none", dtype=object)
    done = np.zeros(len(attributes), bool)
    for name in FALSE_CLASSES[:-1]:
        hit = attributes[name].to_numpy(bool) & ~done
        out[hit] = name
        done |= hit
    return out


def site_attributes(points_xy, stars: pd.DataFrame, stars_xy, galaxies: pd.DataFrame, gal_xy,
                    cosmic_ray, bad_pixel_or_edge) -> pd.DataFrame:
    """Boolean class attributes of positions (arcsec, same tangent plane as ``stars_xy`` and
    ``gal_xy``): one column per ``FALSE_CLASSES`` entry except "none", plus ``false_class``,
    the first that applies."""
    stars_near = near_stars(points_xy, stars_xy, stars["g_mag"].to_numpy())
    attrs = pd.DataFrame({name: stars_near[:, b] for b, (name, _, _) in enumerate(STAR_BINS)})
    attrs["galaxy"] = on_galaxies(points_xy, gal_xy, galaxies["r_half_arcsec"], galaxies["axis_ratio"],
                                  galaxies["pa_deg"]) if len(galaxies) else np.zeros(len(points_xy), bool)
    attrs["cosmic_ray"] = np.asarray(cosmic_ray, bool)
    attrs["bad_pixel_or_edge"] = np.asarray(bad_pixel_or_edge, bool)
    attrs["false_class"] = assign_false_class(attrs)
    return attrs


@lru_cache(maxsize=8)
def _sim_summary(sim_dir: str) -> dict:
    path = Path(sim_dir) / "sim_summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


@lru_cache(maxsize=64)
def cosmic_ray_pixels(sim_dir: str | Path, visit: int, detector: int) -> np.ndarray | None:
    """(N, 2) x, y (trimmed CCD frame, as the calexp) of every pixel that a simulated cosmic
    ray put charge in, for one visit and CCD; None when they cannot be reproduced.

    The simulator writes only the number of its cosmic rays (``truth/signature.parquet``),
    but draws them from a random stream of their own (``[seed, _RNG_NOISE, expnum, ccdnum,
    2]``, ``sim.night.simulate_ccd``), so ``signature.add_cosmic_rays`` replayed with that
    stream on an empty frame gives every track exactly. The replay's count must equal the
    truth's (else the simulator changed since the night was made, and None is returned).
    """
    try:
        from apsnake.instruments import decam
        from apsnake.sim import signature
        from apsnake.sim.night import _RNG_NOISE
    except ImportError:
        return None
    sim_dir = Path(sim_dir)
    summary = _sim_summary(str(sim_dir))
    try:
        sig = pd.read_parquet(sim_dir / "truth" / "signature.parquet")
        visits = pd.read_parquet(sim_dir / "truth" / "visits.parquet").set_index("visit")
        expected = sig.loc[(sig["visit"] == visit) & (sig["detector"] == detector), "n_cosmic_rays"]
        duration = float(visits.loc[visit, "exposure_time"]) + decam.READOUT_TIME_S
        seed = int(summary["seed"])
    except (OSError, KeyError, ValueError):
        return None
    if expected.empty:
        return None
    image = np.zeros(decam.TRIMMED_SHAPE, np.float32)
    rng = np.random.default_rng([seed, int(_RNG_NOISE), int(visit), int(detector), 2])
    n = signature.add_cosmic_rays(image, rng, duration)
    if n != int(expected.iloc[0]):
        return None
    y, x = np.nonzero(image > 0)
    return np.column_stack([x, y])


@lru_cache(maxsize=16)
def bad_pixel_coords(sim_dir: str | Path, detector: int) -> np.ndarray | None:
    """(N, 2) x, y of the nonzero pixels of the simulated BPM of one CCD (hot and dead
    columns, hot pixels); None when the night has no BPM."""
    from apsnake.instruments import decam_files

    sim_dir = Path(sim_dir)
    paths = _sim_summary(str(sim_dir)).get("calib", {}).get("bpm") or ["calib/DECam_bpm.fits"]
    path = sim_dir / paths[0]
    if not path.exists():
        return None
    try:
        bpm, _, _ = decam_files.read_master_calibration(path, int(detector))
    except decam_files.RawFormatError:
        return None
    y, x = np.nonzero(np.asarray(bpm) != 0)
    return np.column_stack([x, y])


def template_frames(sim_dir: str | Path, out_dir: str | Path, visit: int, detector: int) -> list:
    """The template exposures that a data ID's template was made of: (visit, detector, WCS,
    shape) of each of their calexps. The visits are the template's ``INVISITS`` (single
    template: one visit; coadd: every input), else every template visit of the night."""
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    sim_dir, out_dir = Path(sim_dir), Path(out_dir)
    summary = _sim_summary(str(sim_dir))
    visits = [int(v) for v in summary.get("template_visits", [])]
    tpath = out_dir / "template" / str(visit) / f"template_{visit}_{detector:02d}.fits"
    if tpath.exists():
        used = str(fits.getheader(tpath, 0).get("INVISITS", "")).strip()
        if used:
            visits = [int(v) for v in used.split(",") if v.strip()]
    frames = []
    for tv in visits:
        for det in summary.get("ccds", []):
            path = out_dir / "calexp" / str(tv) / f"calexp_{tv}_{int(det):02d}.fits"
            if not path.exists():
                continue
            header = fits.getheader(path, "IMAGE")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                frames.append((tv, int(det), WCS(header), (int(header["NAXIS2"]), int(header["NAXIS1"]))))
    return frames


def pixel_attributes(sim_dir, visit, detector, ra, dec, x, y, shape, no_data, frames, src=None):
    """``cosmic_ray`` and ``bad_pixel_or_edge`` of positions on a data ID (module docstring),
    and whether the cosmic rays were replayed from the truth (else ``src``'s pixel flags and
    sharpness stand in; all False without ``src``)."""
    ra, dec, x, y = (np.asarray(v, float) for v in (ra, dec, x, y))
    cr_sci = cosmic_ray_pixels(str(sim_dir), int(visit), int(detector))
    replayed = cr_sci is not None
    cosmic = near_pixels(cr_sci, x, y, CR_RADIUS_PX)
    bad = near_pixels(bad_pixel_coords(str(sim_dir), int(detector)), x, y, BAD_PIXEL_RADIUS_PX)
    bad |= near_border(x, y, shape, EDGE_PX)
    if no_data is not None and len(x):
        bad |= box_any(no_data, x, y, EDGE_PX)
    for tv, det, wcs, tshape in frames:
        if not len(x):
            break
        tx, ty = wcs.all_world2pix(ra, dec, 0)
        on = (tx > -0.5) & (tx < tshape[1] - 0.5) & (ty > -0.5) & (ty < tshape[0] - 0.5)
        if not on.any():
            continue
        bad[on] |= near_border(tx[on], ty[on], tshape, EDGE_PX)
        bad[on] |= near_pixels(bad_pixel_coords(str(sim_dir), det), tx[on], ty[on], BAD_PIXEL_RADIUS_PX)
        cr_t = cosmic_ray_pixels(str(sim_dir), tv, det)
        replayed &= cr_t is not None
        cosmic[on] |= near_pixels(cr_t, tx[on], ty[on], CR_RADIUS_PX)
    if not replayed:
        cosmic = np.zeros(len(x), bool)
        if src is not None and len(src):
            flags = src["pixelFlags_cr"].fillna(False).to_numpy(bool) if "pixelFlags_cr" in src else False
            cosmic = flags | sharper_than_psf(src)
    return cosmic, bad, replayed


def near_other_sources(obj_xy, obj_ids, others_xy, other_ids, stars: pd.DataFrame, stars_xy) -> np.ndarray:
    """Whether each truth object has another time-domain object (a different id) within
    ``NEAR_OTHER_ARCSEC``, or a star brighter than ``NEAR_STAR_MAG`` other than its own
    (``variable_object_id``) within the larger of ``NEAR_OTHER_ARCSEC`` and
    ``star_radius_arcsec(g)``. Coordinates in arcsec."""
    obj_ids = np.asarray(obj_ids)
    near = np.zeros(len(obj_ids), bool)
    ic, ip = _pairs(obj_xy, others_xy, NEAR_OTHER_ARCSEC)
    if len(ip):
        other = np.asarray(other_ids)[ic] != obj_ids[ip]
        near[ip[other]] = True
    bright = (stars["g_mag"] < NEAR_STAR_MAG).to_numpy()
    if bright.any():
        near |= near_stars(obj_xy, np.asarray(stars_xy)[bright], stars["g_mag"].to_numpy()[bright],
                           exclude_star=obj_ids, star_ids=stars["variable_object_id"].to_numpy()[bright],
                           min_radius=NEAR_OTHER_ARCSEC).any(axis=1)
    return near
