"""Score pipeline products against the simulator's truth.

Used by the tests and by ``benchmarks/measure_dia_truth.py``; nothing here is needed to run
the pipeline. Positions are matched on the sky (deg), fluxes compared in nJy.

Where false detections sit and which pixels are good: ``apsnake.sim.sites``.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from apsnake.numerics import mad_sigma
from apsnake.sim.sites import (
    EDGE_PX,
    FALSE_CLASSES,
    GOOD_BOX_HALF_PX,
    GOOD_PLANES,
    box_any,
    near_other_sources,
    pixel_attributes,
    site_attributes,
    tangent_plane,
    template_frames,
)

MATCH_RADIUS_ARCSEC = 1.0
BRIGHT_STAR_MAG = 16.0
BRIGHT_STAR_RADIUS_ARCSEC = 30.0

#: Bin edges of true S/N for the completeness curves.
SNR_BINS = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 15.0, 30.0, np.inf)
#: Random positions per CCD-visit used to measure the fraction of the area of each class.
N_RANDOM = 2000


def truth_difference_snr(diffexp, truth_xy) -> np.ndarray:
    """PSF-flux noise (nJy) on the difference image at truth pixel positions."""
    from apsnake.psf import psf_flux

    zeros = np.zeros_like(diffexp.image)
    bad = diffexp.mask_of("NO_DATA", "BAD")
    _, err, _, _ = psf_flux(zeros, diffexp.variance, diffexp.psf, truth_xy[:, 0], truth_xy[:, 1], bad=bad)
    return np.asarray(err, float)


def evaluate_data_id(sim_dir: str | Path, out_dir: str | Path, visit: int, detector: int,
                     n_random: int = N_RANDOM) -> dict:
    """Match one data ID's diaSrc to the truth; return per-object and per-source tables.

    Returns a dict with ``truth`` (time-domain objects on this CCD with their true
    difference flux, its PSF-flux noise on our difference image, true S/N, matched flag,
    measured flux, pixel position, ``good_pixels`` and ``near_other``; module docstring),
    ``sources`` (every DIA source with its match, nearest bright star distance, whether it is
    a false detection, the class attributes and ``false_class``, "matched" for the sources
    that are not false), ``random`` (the class attributes of ``n_random`` random positions on
    the template-covered CCD, for the area of each class) and ``cosmic_rays_replayed``.
    """
    from scipy.spatial import cKDTree

    from apsnake.exposure import read_exposure

    sim_dir, out_dir = Path(sim_dir), Path(out_dir)
    name = f"{visit}/diaSrc_{visit}_{detector:02d}.parquet"
    src = pd.read_parquet(out_dir / "diaSrc" / name)
    diffexp = read_exposure(out_dir / "diffexp" / str(visit) / f"diffexp_{visit}_{detector:02d}.fits")
    td = pd.read_parquet(sim_dir / "truth" / "timedomain.parquet")
    on = td[(td["visit"] == visit) & (td["detector"] == detector)].copy()
    ra0, dec0 = diffexp.wcs.all_pix2world(diffexp.shape[1] / 2, diffexp.shape[0] / 2, 0)
    ra0, dec0 = float(ra0), float(dec0)
    tx, ty = diffexp.wcs.all_world2pix(on["ra"].to_numpy(), on["dec"].to_numpy(), 0)
    inside = (tx > 5) & (tx < diffexp.shape[1] - 5) & (ty > 5) & (ty < diffexp.shape[0] - 5)
    on, tx, ty = on[inside].reset_index(drop=True), tx[inside], ty[inside]
    covered = ~diffexp.mask_of("NO_DATA")[np.round(ty).astype(int), np.round(tx).astype(int)] if len(on) else np.zeros(0, bool)
    on = on[covered].reset_index(drop=True)
    tx, ty = tx[covered], ty[covered]
    noise = truth_difference_snr(diffexp, np.column_stack([tx, ty])) if len(on) else np.zeros(0)
    on["diff_flux_err"] = noise
    on["true_snr"] = np.abs(on["diff_flux_nJy"]) / np.where(noise > 0, noise, np.inf)
    # Everything that can legitimately appear in a difference: every time-domain object at
    # this visit and at the template epochs (asteroids left in a template coadd), anywhere.
    known = td[(td["visit"] == visit) | td["is_template"]]
    known_xy = tangent_plane(known["ra"], known["dec"], ra0, dec0)
    src_xy = tangent_plane(src["ra"], src["dec"], ra0, dec0)
    matched = np.zeros(len(on), bool)
    flux = np.full(len(on), np.nan)
    flux_err = np.full(len(on), np.nan)
    dra = np.full(len(on), np.nan)
    ddec = np.full(len(on), np.nan)
    if len(src) and len(on):
        tree = cKDTree(src_xy)
        d, i = tree.query(tangent_plane(on["ra"], on["dec"], ra0, dec0))
        matched = d < MATCH_RADIUS_ARCSEC
        flux[matched] = src["psfFlux"].to_numpy()[i[matched]]
        flux_err[matched] = src["psfFluxErr"].to_numpy()[i[matched]]
        dra[matched] = (src["ra"].to_numpy()[i[matched]] - on["ra"].to_numpy()[matched]) * np.cos(np.radians(dec0)) * 3.6e6
        ddec[matched] = (src["dec"].to_numpy()[i[matched]] - on["dec"].to_numpy()[matched]) * 3.6e6
    on["matched"], on["psfFlux"], on["psfFluxErr"], on["dra_mas"], on["ddec_mas"] = matched, flux, flux_err, dra, ddec

    # Good pixels and neighbours of the truth objects (issue 11).
    stars = pd.read_parquet(sim_dir / "truth" / "stars.parquet")
    galaxies = pd.read_parquet(sim_dir / "truth" / "galaxies.parquet")
    stars_xy = tangent_plane(stars["ra"], stars["dec"], ra0, dec0)
    gal_xy = tangent_plane(galaxies["ra"], galaxies["dec"], ra0, dec0)
    bad_bits = diffexp.bits(*[p for p in diffexp.mask_planes if p not in GOOD_PLANES])
    masked_img = (diffexp.mask & np.int32(bad_bits)) != 0
    on["x"], on["y"] = tx, ty
    on["masked"] = box_any(masked_img, tx, ty, GOOD_BOX_HALF_PX) if len(on) else np.zeros(0, bool)
    on["edge_dist_px"] = np.minimum(np.minimum(tx, diffexp.shape[1] - 1 - tx), np.minimum(ty, diffexp.shape[0] - 1 - ty))
    on["good_pixels"] = ~on["masked"] & (on["edge_dist_px"] > EDGE_PX)
    on["near_other"] = near_other_sources(tangent_plane(on["ra"], on["dec"], ra0, dec0), on["object_id"], known_xy,
                                          known["object_id"], stars, stars_xy)
    del masked_img

    # False detections: DIA sources with no known time-domain object within the radius.
    bright = stars[stars["g_mag"] < BRIGHT_STAR_MAG]
    sources = src[["ra", "dec", "psfFlux", "snr"]].copy()
    if len(src):
        d_known, _ = cKDTree(known_xy).query(src_xy) if len(known) else (np.full(len(src), np.inf), None)
        sources["false"] = d_known > MATCH_RADIUS_ARCSEC
        if len(bright):
            d_bright, _ = cKDTree(tangent_plane(bright["ra"], bright["dec"], ra0, dec0)).query(src_xy)
        else:
            d_bright = np.full(len(src), np.inf)
        sources["near_bright_star"] = d_bright < BRIGHT_STAR_RADIUS_ARCSEC
    else:
        sources["false"] = np.zeros(0, bool)
        sources["near_bright_star"] = np.zeros(0, bool)

    # Classes of the sources and of random positions (their area).
    no_data = diffexp.mask_of("NO_DATA")
    no_data = no_data if no_data.any() else None
    frames = template_frames(sim_dir, out_dir, visit, detector)
    sx, sy = diffexp.wcs.all_world2pix(src["ra"].to_numpy(), src["dec"].to_numpy(), 0)
    cosmic, bad, replayed = pixel_attributes(sim_dir, visit, detector, src["ra"], src["dec"], sx, sy,
                                             diffexp.shape, no_data, frames, src)
    attrs = site_attributes(src_xy, stars, stars_xy, galaxies, gal_xy, cosmic, bad)
    attrs.loc[~sources["false"].to_numpy(bool), "false_class"] = "matched"
    sources["x"], sources["y"] = sx, sy
    sources["isNegative"] = src["isNegative"].to_numpy(bool) if "isNegative" in src else src["psfFlux"].to_numpy() < 0
    sources = pd.concat([sources.reset_index(drop=True), attrs], axis=1)

    rng = np.random.default_rng([int(visit), int(detector)])
    rx, ry = rng.uniform(-0.5, diffexp.shape[1] - 0.5, n_random), rng.uniform(-0.5, diffexp.shape[0] - 0.5, n_random)
    if no_data is not None:
        keep = ~no_data[np.clip(np.rint(ry).astype(int), 0, diffexp.shape[0] - 1),
                        np.clip(np.rint(rx).astype(int), 0, diffexp.shape[1] - 1)]
        rx, ry = rx[keep], ry[keep]
    rra, rdec = diffexp.wcs.all_pix2world(rx, ry, 0)
    r_cosmic, r_bad, _ = pixel_attributes(sim_dir, visit, detector, rra, rdec, rx, ry, diffexp.shape, no_data, frames)
    random = site_attributes(tangent_plane(rra, rdec, ra0, dec0), stars, stars_xy, galaxies, gal_xy, r_cosmic, r_bad)
    return {"truth": on, "sources": sources, "random": random, "cosmic_rays_replayed": bool(replayed),
            "visit": int(visit), "detector": int(detector)}


def _isotonic(y, w=None) -> np.ndarray:
    """Non-decreasing least-squares fit to ``y`` (pool-adjacent-violators), weights ``w``."""
    y = np.asarray(y, float)
    w = np.ones_like(y) if w is None else np.asarray(w, float)
    values, weights, sizes = [], [], []
    for yi, wi in zip(y, w):
        values.append(yi)
        weights.append(wi)
        sizes.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            wt = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / wt
            weights[-2] = wt
            sizes[-2] += sizes[-1]
            del values[-1], weights[-1], sizes[-1]
    return np.repeat(values, sizes)


def snr_at_completeness(snr, detected, level: float = 0.5) -> dict:
    """True S/N at which the completeness reaches ``level``, two ways.

    ``fit``: maximum-likelihood fit of C(s) = A Phi((s - mu) / sigma) (Phi the normal CDF,
    A <= 1 the plateau) to the detected / not detected outcome of every object with
    0 < true S/N <= 100 (unbinned, Bernoulli likelihood); S/N_50 solves C = level, i.e.
    mu + sigma Phi^-1(level / A) (NaN when A <= level or under 10 objects).
    ``isotonic``: the non-decreasing fit of the outcomes ordered by S/N (pool adjacent
    violators, unbinned), linearly interpolated where it first reaches ``level``.
    """
    from scipy.optimize import minimize
    from scipy.special import expit, ndtr, ndtri

    snr, det = np.asarray(snr, float), np.asarray(detected, bool)
    use = np.isfinite(snr) & (snr > 0) & (snr <= 100.0)
    snr, det = snr[use], det[use]
    out = {"fit": float("nan"), "isotonic": float("nan")}
    if len(snr) < 10 or det.all() or not det.any():
        return out
    order = np.argsort(snr, kind="stable")
    s, d = snr[order], det[order].astype(float)
    iso = _isotonic(d)
    k = int(np.argmax(iso >= level)) if (iso >= level).any() else -1
    if k == 0:
        out["isotonic"] = float(s[0])
    elif k > 0:
        # Interpolate between the last value below the level and the first at or above it.
        s0, s1, c0, c1 = s[k - 1], s[k], iso[k - 1], iso[k]
        out["isotonic"] = float(s0 + (level - c0) / (c1 - c0) * (s1 - s0)) if c1 > c0 else float(s1)

    def nll(p):
        mu, log_sigma, logit_a = p
        c = np.clip(expit(logit_a) * ndtr((s - mu) / np.exp(log_sigma)), 1e-9, 1 - 1e-9)
        return -np.sum(d * np.log(c) + (1 - d) * np.log1p(-c))

    best = min((minimize(nll, (mu0, np.log(sg), 4.0), method="Nelder-Mead",
                         options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 4000})
                for mu0 in (3.0, 5.0, 7.0, 10.0) for sg in (0.5, 1.5)), key=lambda r: r.fun)
    mu, sigma, a = best.x[0], float(np.exp(best.x[1])), float(expit(best.x[2]))
    if a > level and 0 < sigma < 50:
        out["fit"] = float(mu + sigma * ndtri(level / a))
    return out


def _fraction(frame: pd.DataFrame, sel) -> tuple:
    """(matched fraction, count) of the rows of ``frame`` selected by ``sel``."""
    sel = np.asarray(sel, bool)
    return (float(frame.loc[sel, "matched"].mean()) if sel.any() else float("nan")), int(sel.sum())


def _by_snr(frame: pd.DataFrame, sel) -> dict:
    """Completeness per ``SNR_BINS`` bin of the rows of ``frame`` selected by ``sel``."""
    sel = np.asarray(sel, bool)
    out = {}
    for lo, hi in pairwise(SNR_BINS):
        label = f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">={lo:g}"
        out[label] = _fraction(frame, sel & (frame["true_snr"] >= lo).to_numpy() & (frame["true_snr"] < hi).to_numpy())
    return out


def summarise(results: list[dict]) -> dict:
    """Completeness, false detections, flux pulls and astrometry over many data IDs.

    Everything of the issue-5 figures is as before; the issue-11 figures (module docstring)
    follow: false detections per CCD-visit by class, the area fraction of each class (random
    positions on template-covered pixels), completeness of positive and negative sources on
    good pixels (true S/N >= 10 and per S/N bin, near other sources and away from them), and
    the true S/N at 50% completeness (``snr_at_completeness``).
    """
    truth = pd.concat([r["truth"] for r in results], ignore_index=True)
    sources = pd.concat([r["sources"] for r in results], ignore_index=True)
    n_ccd_visits = len(results)
    fakes = truth[truth["kind"].isin(["transient", "variable"])]

    def completeness(lo, hi):
        sel = (fakes["true_snr"] >= lo) & (fakes["true_snr"] < hi)
        return (float(fakes.loc[sel, "matched"].mean()) if sel.any() else float("nan")), int(sel.sum())

    # Flux and position quality over point sources; asteroids are trailed over the
    # exposure, so a PSF fit neither gets their flux nor their centre (Rubin measures
    # trails separately) and they are reported on their own.
    m = truth[truth["matched"] & truth["kind"].isin(["transient", "variable"])]
    pull = (m["psfFlux"] - m["diff_flux_nJy"]) / m["psfFluxErr"]
    pull = pull[np.isfinite(pull)]
    bright = m[m["true_snr"] > 20]
    pos_rms = float(np.sqrt(np.nanmean(bright["dra_mas"] ** 2 + bright["ddec_mas"] ** 2) / 2)) if len(bright) else float("nan")
    false = sources[sources["false"]]
    out = {
        "n_ccd_visits": n_ccd_visits,
        "completeness_snr_4.5_6.5": completeness(4.5, 6.5),
        "completeness_snr_5_6": completeness(5.0, 6.0),
        "completeness_snr_7_9": completeness(7.0, 9.0),
        "completeness_snr_8_inf": completeness(8.0, np.inf),
        "completeness_snr_3_5": completeness(3.0, 5.0),
        "false_per_ccd_visit_away_from_bright_stars": float((~false["near_bright_star"]).sum()) / n_ccd_visits,
        "false_per_ccd_visit_near_bright_stars": float(false["near_bright_star"].sum()) / n_ccd_visits,
        "pull_median": float(np.median(pull)) if len(pull) else float("nan"),
        "pull_scatter": mad_sigma(pull),
        "pull_std": float(np.std(pull)) if len(pull) else float("nan"),
        # Near the threshold only upward noise is detected (Eddington/selection bias, +0.8 at
        # true S/N 5); above S/N 8 selection no longer shapes the pulls.
        "pull_median_true_snr_ge_8": float(np.median(pull[m.loc[pull.index, "true_snr"] >= 8]))
        if (m.loc[pull.index, "true_snr"] >= 8).any() else float("nan"),
        "pull_scatter_true_snr_ge_8": mad_sigma(pull[m.loc[pull.index, "true_snr"] >= 8]),
        "n_matched": int(len(m)),
        "position_rms_mas_per_axis_snr_gt_20": pos_rms,
        "n_snr_gt_20": int(len(bright)),
        "asteroids_recovered": float(truth.loc[truth["kind"] == "asteroid", "matched"].mean())
        if (truth["kind"] == "asteroid").any() else float("nan"),
    }
    out["n_pull_true_snr_ge_8"] = int((m.loc[pull.index, "true_snr"] >= 8).sum())
    # The median's own noise (sqrt(pi / 2) sigma / sqrt(n) for a normal sample): a night of ~100
    # sources measures the median pull to ~0.1 only.
    out["pull_median_true_snr_ge_8_err"] = (float(np.sqrt(np.pi / 2) * out["pull_scatter_true_snr_ge_8"]
                                                  / np.sqrt(out["n_pull_true_snr_ge_8"]))
                                            if out["n_pull_true_snr_ge_8"] else float("nan"))

    # False detections by class (issue 11): exclusive, first class that applies.
    if "false_class" in sources:
        out["false_per_ccd_visit_total"] = float(len(false)) / n_ccd_visits
        neg = false["isNegative"].to_numpy(bool)
        for name in FALSE_CLASSES:
            out[f"false_per_ccd_visit_class_{name}"] = float((false["false_class"] == name).sum()) / n_ccd_visits
        out["false_per_ccd_visit_class_negative_part"] = {
            name: float(((false["false_class"] == name).to_numpy() & neg).sum()) / n_ccd_visits for name in FALSE_CLASSES}
        any_attr = {name: float(false[name].sum()) / n_ccd_visits for name in FALSE_CLASSES[:-1]}
        out["false_per_ccd_visit_any_attribute"] = any_attr
        randoms = [r["random"] for r in results if r.get("random") is not None]
        if randoms:
            rnd = pd.concat(randoms, ignore_index=True)
            out["class_area_fraction"] = {name: float((rnd["false_class"] == name).mean()) if len(rnd) else float("nan")
                                          for name in FALSE_CLASSES}
        replayed = [r.get("cosmic_rays_replayed", False) for r in results]
        out["cosmic_ray_class_from"] = ("truth (replayed)" if all(replayed) else
                                        "pixel flags / sharpness" if not any(replayed) else
                                        f"truth on {sum(replayed)} of {len(replayed)} CCD-visits, flags elsewhere")

    # Completeness on good pixels, positive and negative (issue 11).
    if "good_pixels" in fakes:
        good = fakes[fakes["good_pixels"].to_numpy(bool)]
        pos = (good["diff_flux_nJy"] > 0).to_numpy()
        neg = (good["diff_flux_nJy"] < 0).to_numpy()
        near = good["near_other"].to_numpy(bool)
        ge10 = (good["true_snr"] >= 10).to_numpy()
        out["n_good_pixels"] = int(len(good))
        out["completeness_good_snr_ge_10"] = _fraction(good, ge10 & (pos | neg))
        for sign, s_sel in (("pos", pos), ("neg", neg)):
            out[f"completeness_good_snr_ge_10_{sign}"] = _fraction(good, ge10 & s_sel)
            out[f"completeness_good_snr_ge_10_{sign}_near"] = _fraction(good, ge10 & s_sel & near)
            out[f"completeness_good_snr_ge_10_{sign}_away"] = _fraction(good, ge10 & s_sel & ~near)
        out["completeness_good_snr_ge_10_pos_minus_neg_points"] = 100.0 * (
            out["completeness_good_snr_ge_10_pos"][0] - out["completeness_good_snr_ge_10_neg"][0])
        for sign, s_sel in (("pos", pos), ("neg", neg)):
            out[f"completeness_good_by_snr_{sign}"] = _by_snr(good, s_sel)
            out[f"completeness_good_by_snr_{sign}_near"] = _by_snr(good, s_sel & near)
            out[f"completeness_good_by_snr_{sign}_away"] = _by_snr(good, s_sel & ~near)
        for label, frame in (("all", fakes), ("good", good), ("good_pos", good[pos]), ("good_neg", good[neg])):
            s50 = snr_at_completeness(frame["true_snr"], frame["matched"])
            out[f"snr_50pct_completeness_fit_{label}"] = s50["fit"]
            out[f"snr_50pct_completeness_isotonic_{label}"] = s50["isotonic"]
    return out


def static_star_residuals(sim_dir: str | Path, out_dir: str | Path, visit: int, detector: int,
                          max_snr: float = 200.0, isolation_arcsec: float = 5.0) -> pd.DataFrame:
    """Normalised residual rms of the difference image at isolated, constant truth stars.

    For each star (not variable, unsaturated, no other truth star or galaxy within
    ``isolation_arcsec``), the rms of D / sqrt(var) over the pixels within 2 FWHM of it;
    ~1 when the subtraction leaves only noise. ``snr`` is the star's PSF S/N in the
    science calexp (truth flux over the calexp's PSF-flux noise); stars above ``max_snr``
    are left out.
    """
    from scipy.spatial import cKDTree

    from apsnake.exposure import read_exposure
    from apsnake.psf import measure_fwhm, psf_flux

    sim_dir, out_dir = Path(sim_dir), Path(out_dir)
    diff = read_exposure(out_dir / "diffexp" / str(visit) / f"diffexp_{visit}_{detector:02d}.fits")
    calexp = read_exposure(out_dir / "calexp" / str(visit) / f"calexp_{visit}_{detector:02d}.fits")
    stars = pd.read_parquet(sim_dir / "truth" / "stars.parquet")
    galaxies = pd.read_parquet(sim_dir / "truth" / "galaxies.parquet")
    ra0, dec0 = float(stars["ra"].median()), float(stars["dec"].median())
    everything = np.vstack([tangent_plane(stars["ra"], stars["dec"], ra0, dec0),
                            tangent_plane(galaxies["ra"], galaxies["dec"], ra0, dec0)])
    d, _ = cKDTree(everything).query(tangent_plane(stars["ra"], stars["dec"], ra0, dec0), k=2)
    stars = stars[(d[:, 1] > isolation_arcsec) & (stars["variable_object_id"] < 0)]
    x, y = diff.wcs.all_world2pix(stars["ra"].to_numpy(), stars["dec"].to_numpy(), 0)
    ny, nx = diff.shape
    fwhm = float(measure_fwhm(diff.psf.evaluate(nx / 2, ny / 2)))
    r = int(np.ceil(2 * fwhm))
    inside = (x > r + 2) & (x < nx - r - 3) & (y > r + 2) & (y < ny - r - 3)
    stars, x, y = stars[inside], x[inside], y[inside]
    _, noise, _, _ = psf_flux(np.zeros_like(calexp.image), calexp.variance, calexp.psf, x, y)
    snr = stars[f"{calexp.visit_info.band}_flux_nJy"].to_numpy() / noise
    bad = diff.mask_of("SAT", "SAT_TEMPLATE", "BAD", "NO_DATA", "EDGE", "CR", "INTRP")
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (xx**2 + yy**2) <= r * r
    rows = []
    for xi, yi, s in zip(x, y, snr):
        if not (0 < s <= max_snr):
            continue
        ix, iy = int(round(xi)), int(round(yi))
        cut = (slice(iy - r, iy + r + 1), slice(ix - r, ix + r + 1))
        if bad[cut][disc].any():
            continue
        z = diff.image[cut][disc] / np.sqrt(diff.variance[cut][disc])
        rows.append((xi, yi, s, float(np.sqrt(np.mean(z**2)))))
    return pd.DataFrame(rows, columns=["x", "y", "snr", "normalised_rms"])


def blended_mixes(mixes, positions: pd.DataFrame, blend_arcsec: float) -> int:
    """How many of ``mixes`` (the truth IDs on each DiaObject that holds several) are blends:
    truth objects that do not move (IDs in ``positions``, columns ra, dec in degrees) all
    within ``blend_arcsec`` of one another."""
    blended = 0
    for ids in mixes:
        if not np.isin(ids, positions.index).all():
            continue
        pos = positions.loc[list(ids)]
        xy = tangent_plane(pos["ra"], pos["dec"], float(pos["ra"].mean()), float(pos["dec"].mean()))
        separation = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
        blended += bool(separation.max() < blend_arcsec)
    return blended


def evaluate_association(sim_dir: str | Path, out_dir: str | Path, blend_arcsec: float = 1.5) -> dict:
    """Score the APDB's DiaObjects against the truth (issue 6 targets).

    Each DiaSource is matched to the time-domain truth of its own visit within
    ``MATCH_RADIUS_ARCSEC``. Returns the number of truth objects detected in two or more
    visits and the fraction of those with all their detections on one DiaObject
    (transients and variables; asteroids move), the fraction of DiaObjects whose sources
    belong to two or more truth objects, and the number of DiaObjects that join asteroid
    detections of different visits (should be 0). Mixing objects whose truth objects all lie
    within ``blend_arcsec`` of one another are also counted apart
    (``n_objects_mixing_blended_truth``): two transients about one seeing FWHM apart are one
    source in each visit (below the deblender's separation, and the Sparrow limit of the
    matched-filtered image), and that source is nearest to one or the other truth object by
    chance; ``frac_objects_mixing_truth_resolved`` leaves them out.
    """
    from scipy.spatial import cKDTree

    from apsnake.apdb import Apdb

    sources = Apdb(out_dir).sources()
    td = pd.read_parquet(Path(sim_dir) / "truth" / "timedomain.parquet")
    td = td[~td["is_template"]]
    truth_id = np.full(len(sources), -1, dtype=np.int64)
    for visit, rows in sources.groupby("visit"):
        truth = td[td["visit"] == visit]
        if truth.empty:
            continue
        ra0, dec0 = float(rows["ra"].mean()), float(rows["dec"].mean())
        d, i = cKDTree(tangent_plane(truth["ra"], truth["dec"], ra0, dec0)).query(
            tangent_plane(rows["ra"], rows["dec"], ra0, dec0))
        hit = d < MATCH_RADIUS_ARCSEC
        truth_id[sources.index.get_indexer(rows.index)[hit]] = truth["object_id"].to_numpy()[i[hit]]
    sources = sources.assign(truth_id=truth_id)
    kinds = td.drop_duplicates("object_id").set_index("object_id")["kind"]
    matched = sources[sources["truth_id"] >= 0].copy()
    matched["kind"] = kinds.reindex(matched["truth_id"]).to_numpy()

    fixed = matched[matched["kind"] != "asteroid"]
    per_truth = fixed.groupby("truth_id").agg(n_visits=("visit", "nunique"),
                                             n_objects=("diaObjectId", lambda s: s.nunique(dropna=False)),
                                             any_null=("diaObjectId", lambda s: s.isna().any()))
    multi = per_truth[per_truth["n_visits"] >= 2]
    one_object = (multi["n_objects"] == 1) & ~multi["any_null"]

    on_objects = matched[matched["diaObjectId"].notna()]
    per_object = on_objects.groupby("diaObjectId")["truth_id"].nunique()
    positions = td[td["kind"] != "asteroid"].groupby("object_id")[["ra", "dec"]].mean()
    mixes = [on_objects.loc[on_objects["diaObjectId"] == o, "truth_id"].unique() for o in per_object.index[per_object > 1]]
    blended = blended_mixes(mixes, positions, blend_arcsec)
    asteroid = on_objects[on_objects["kind"] == "asteroid"]
    # An object holding an asteroid detection and anything from another visit links it.
    asteroid_links = int(on_objects[on_objects["diaObjectId"].isin(asteroid["diaObjectId"])]
                         .groupby("diaObjectId")["visit"].nunique().gt(1).sum())
    return {
        "n_sources": int(len(sources)),
        "n_matched_sources": int(len(matched)),
        "n_truth_multi_visit": int(len(multi)),
        "frac_truth_on_one_object": float(one_object.mean()) if len(multi) else float("nan"),
        "split_truth_ids": multi.index[~one_object].tolist(),
        "n_objects_with_truth": int(len(per_object)),
        "frac_objects_mixing_truth": float((per_object > 1).mean()) if len(per_object) else float("nan"),
        "n_objects_mixing_blended_truth": blended,
        "frac_objects_mixing_truth_resolved": (float(((per_object > 1).sum() - blended) / len(per_object))
                                               if len(per_object) else float("nan")),
        "n_asteroid_detections": int(len(matched[matched["kind"] == "asteroid"])),
        "n_objects_linking_asteroid_visits": asteroid_links,
    }


def completeness_fakes_versus_truth(results: list[dict], fakes: pd.DataFrame) -> dict:
    """Completeness measured by the injected fakes against that of the simulator's truth
    (issue 13), on the same difference images.

    ``results``: ``evaluate_data_id`` outputs of the data IDs that have fakes; ``fakes``: their
    fake tables (``Fake`` schema). Truth: transients and variables brightening since the
    template (positive difference flux, as the fakes are) on good pixels, magnitude
    ``-2.5 log10(diff_flux_nJy) + 31.4``, S/N the true difference S/N; fakes: ``injectedMag``,
    ``expectedSnr``. Both through the same fit (``apsnake.completeness.fit_completeness``, a
    logistic with a plateau): ``m50_*`` (AB mag) and ``snr50_*``, each with its bootstrap error,
    their differences (fakes - truth), and the counts.
    """
    from apsnake.completeness import fit_completeness

    truth = pd.concat([r["truth"] for r in results], ignore_index=True) if results else pd.DataFrame()
    if len(truth):
        truth = truth[(truth["kind"] != "asteroid") & (truth["diff_flux_nJy"] > 0) & truth["good_pixels"]]
    t_mag = -2.5 * np.log10(truth["diff_flux_nJy"].to_numpy(float)) + 31.4 if len(truth) else np.zeros(0)
    t_det = truth["matched"].to_numpy(bool) if len(truth) else np.zeros(0, bool)
    t_snr = truth["true_snr"].to_numpy(float) if len(truth) else np.zeros(0)
    f_det = fakes["recovered"].to_numpy(bool)
    out = {"n_truth": int(len(t_mag)), "n_fakes": int(len(fakes))}
    for name, tx, fx, decreasing in (("m50", t_mag, fakes["injectedMag"].to_numpy(float), True),
                                     ("snr50", t_snr, fakes["expectedSnr"].to_numpy(float), False)):
        t_fit = fit_completeness(tx, t_det, decreasing=decreasing)
        f_fit = fit_completeness(fx, f_det, decreasing=decreasing)
        out[f"{name}_truth"], out[f"{name}_truth_err"] = t_fit.x50, t_fit.x50_err
        out[f"{name}_fakes"], out[f"{name}_fakes_err"] = f_fit.x50, f_fit.x50_err
        out[f"{name}_fakes_minus_truth"] = f_fit.x50 - t_fit.x50
    return out
