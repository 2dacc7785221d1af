"""Simulate a DECam night: raw exposures, master calibrations, reference catalogue, truth.

Random streams are derived from the seed per purpose, visit and CCD
(``numpy.random.default_rng([seed, purpose, expnum, ccdnum, ...])``), so products do not
depend on the order in which CCDs are simulated.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from apsnake.atomic import write_parquet, write_text
from apsnake.instruments import decam
from apsnake.sim import observing, render, signature, sky, writer
from apsnake.sim.presets import PRESETS, Preset

log = logging.getLogger(__name__)

#: Sources farther than this outside the trimmed CCD are not rendered, pixels.
RENDER_MARGIN_PX = 70.0
#: Sub-exposures used to draw an asteroid's trail.
TRAIL_STEPS = 9
#: Nights of up to this many CCDs keep every CCD signature in memory (~110 MB each); larger
#: ones (the ``focalplane`` preset) draw each again when it is needed.
SIGNATURES_KEPT = 8

# Purposes of the random streams (second entry of the seed sequence).
_RNG_NOISE, _RNG_CALIB = 2, 4
_RNG_STARS, _RNG_GALAXIES, _RNG_BRIGHT, _RNG_TIMEDOMAIN, _RNG_REFCAT = 10, 11, 12, 13, 14


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _sources_on_ccd(geometry, visit, ccdnum, ra, dec, margin=RENDER_MARGIN_PX):
    """Indices and true trimmed positions of sky positions within ``margin`` of the CCD."""
    x, y = geometry.sky_to_trimmed(visit.index, ccdnum, ra, dec)
    ny, nx = decam.TRIMMED_SHAPE
    sel = np.nonzero((x > -margin) & (x < nx + margin) & (y > -margin) & (y < ny + margin))[0]
    return sel, x[sel], y[sel]


@dataclass
class NightModel:
    """Everything drawn before pixels are rendered: visits, geometry, sky content."""

    preset: Preset
    seed: int
    visits: list
    geometry: observing.Geometry
    region: sky.SkyRegion
    stars: pd.DataFrame
    galaxies: pd.DataFrame
    timedomain: sky.TimeDomain


def build_night(p: Preset, seed: int) -> NightModel:
    """Draw the visits (conditions, WCS) and the sky (stars, galaxies, time-domain objects)."""
    visits = observing.make_visit_conditions(p, seed)
    geometry = observing.Geometry(visits, p.ccds)
    region = sky.SkyRegion(*geometry.region(margin_deg=2.0 / 60.0))
    stars = sky.make_stars(_rng(seed, _RNG_STARS), region, p)
    galaxies = sky.make_galaxies(_rng(seed, _RNG_GALAXIES), region, p)
    stars = sky.add_bright_stars(_rng(seed, _RNG_BRIGHT), stars, region, geometry, visits, p.n_bright_stars)
    stars["variable_object_id"] = np.int64(-1)
    td, var_stars = sky.make_time_domain(_rng(seed, _RNG_TIMEDOMAIN), region, geometry, visits, galaxies, p,
                                         int(stars["star_id"].max()) + 1)
    stars = pd.concat([stars, var_stars], ignore_index=True)
    return NightModel(p, seed, visits, geometry, region, stars, galaxies, td)


def simulate_ccd(night: NightModel, visit: observing.VisitConditions, ccdnum: int, sig: signature.CcdSignature):
    """Render one CCD of one visit (depends only on the seed, the visit and the CCD).

    Order of effects: sources (true WCS, local PSF) + sky, times the pixel response, plus the
    dark signal of hot pixels and columns (all in electrons); Poisson noise; cosmic rays;
    full well and bleeding; division by the amp gains (ADU); intra-CCD crosstalk; bias
    (level, row structure, 2-D pattern) and read noise in the raw frame; rounding to uint16.

    Parameters
    ----------
    night : NightModel
        Visits, geometry and sky from :func:`build_night`.
    visit : observing.VisitConditions
    ccdnum : int
    sig : signature.CcdSignature
        The CCD's fixed signature (:func:`signature.make_ccd_signature` with the same seed).

    Returns
    -------
    raw : ndarray (4146, 2160) uint16
        The raw extension pixels.
    info : dict
        Per-CCD facts for the signature truth (cosmic rays, saturated pixels, PSF core FWHM,
        ellipticity and halo share at the CCD centre).
    bias : signature.BiasRealisation
        The bias levels and rows used.
    """
    geometry, stars, galaxies, td, seed = night.geometry, night.stars, night.galaxies, night.timedomain, night.seed
    ny, nx = decam.TRIMMED_SHAPE
    scale_arcsec = decam.RAW_WCS_CD_DEG * 3600.0
    e_per_njy = visit.electrons_per_njy
    psf = visit.psf_field(ccdnum)
    image = np.zeros((ny, nx), dtype=np.float32)
    flux_col = f"{visit.band}_flux_nJy" if f"{visit.band}_flux_nJy" in stars else "g_flux_nJy"

    static = stars[stars["variable_object_id"] < 0]
    sel, x, y = _sources_on_ccd(geometry, visit, ccdnum, static["ra"].to_numpy(), static["dec"].to_numpy())
    halo = render.HaloLight(image.shape, psf)
    render.render_points(image, x, y, static[flux_col].to_numpy()[sel] * e_per_njy, psf, halo)
    n_stars = len(sel)

    sel, x, y = _sources_on_ccd(geometry, visit, ccdnum, galaxies["ra"].to_numpy(), galaxies["dec"].to_numpy())
    g = galaxies.iloc[sel]
    cd = geometry.true_wcs(visit.index, ccdnum).wcs.cd
    render.render_galaxies(
        image, x, y, g[flux_col].to_numpy() * e_per_njy, g["r_half_arcsec"].to_numpy() / scale_arcsec,
        g["sersic_n"].to_numpy(), g["axis_ratio"].to_numpy(),
        render.sky_angle_to_pixel(g["pa_deg"].to_numpy(), cd), psf, halo)
    n_galaxies = len(sel)

    # Time-domain objects at this visit (asteroids trailed over the exposure).
    half_d = visit.exptime / 2.0 / 86400.0
    ras, decs, fluxes = [], [], []
    for kind, obj in td.iter_objects():
        flux = float(td.flux(kind, obj, visit.mjd_mid_tai))
        if flux <= 0:
            continue
        if kind == "asteroid":
            t = visit.mjd_mid_tai + np.linspace(-half_d, half_d, TRAIL_STEPS)
            ra, dec = td.position(kind, obj, t)
            ras.extend(ra)
            decs.extend(dec)
            fluxes.extend([flux / TRAIL_STEPS] * TRAIL_STEPS)
        else:
            ras.append(obj.ra)
            decs.append(obj.dec)
            fluxes.append(flux)
    if ras:
        sel, x, y = _sources_on_ccd(geometry, visit, ccdnum, np.array(ras), np.array(decs))
        render.render_points(image, x, y, np.array(fluxes)[sel] * e_per_njy, psf, halo)
    halo.render_into(image)

    # Sky, response, dark signal of hot pixels, photon noise, cosmic rays, full well.
    image += np.float32(visit.sky_e_per_pixel)
    image *= sig.response
    image += sig.hot_e_per_s * np.float32(visit.dark_time)
    np.maximum(image, 0.0, out=image)
    image = _rng(seed, _RNG_NOISE, visit.expnum, ccdnum, 1).poisson(image).astype(np.float32)
    n_cr = signature.add_cosmic_rays(image, _rng(seed, _RNG_NOISE, visit.expnum, ccdnum, 2),
                                     visit.exptime + decam.READOUT_TIME_S)
    n_sat = signature.saturate_and_bleed(image, signature.full_well_columns(sig))

    # Electrons -> ADU per amp, crosstalk, bias and read noise in the raw frame.
    image /= signature.gain_columns(sig).astype(np.float32)[None, :]
    image = signature.apply_crosstalk(image, sig)
    bias = signature.draw_bias(sig, _rng(seed, _RNG_NOISE, visit.expnum, ccdnum, 3))
    raw = signature.assemble_raw(sig, image, bias, _rng(seed, _RNG_NOISE, visit.expnum, ccdnum, 4))
    centre = np.array([(nx - 1) / 2]), np.array([(ny - 1) / 2])
    e1_centre, e2_centre = psf.ellipticity_at(*centre)
    info = {
        "n_stars_rendered": n_stars, "n_galaxies_rendered": n_galaxies, "n_cosmic_rays": n_cr,
        "n_saturated_pixels": n_sat,
        "fwhm_arcsec_ccd_centre": float(psf.fwhm_at(*centre)[0]),
        "psf_e1_ccd_centre": float(e1_centre[0]), "psf_e2_ccd_centre": float(e2_centre[0]),
        "psf_halo_fraction_ccd_centre": float(psf.halo_fraction_at(*centre)[0]),
    }
    return raw, info, bias


def _signature_source(ccds, seed: int):
    """``get(ccdnum)`` -> the CCD's :class:`signature.CcdSignature`. A signature holds ~110 MB of
    pixel maps and takes ~1 s to draw: kept for up to :data:`SIGNATURES_KEPT` CCDs, drawn again
    (identically: it depends only on the seed and the CCD) when a night has more."""
    if len(ccds) <= SIGNATURES_KEPT:
        return functools.lru_cache(maxsize=None)(lambda c: signature.make_ccd_signature(c, seed))
    return lambda c: signature.make_ccd_signature(c, seed)


def _write_calibs(outdir: Path, preset: Preset, visits, signatures, seed: int) -> dict:
    """Master bias and flat per night and one BPM; returns their paths (relative to outdir).

    ``signatures(ccdnum)`` gives a CCD's signature. The files are written one CCD at a time
    (all of them together, CCDNUM order), so one CCD's images are in memory at once.
    """
    from astropy.time import Time

    calib_dir = outdir / "calib"
    paths = {"bias": [], "flat": [], "bpm": []}
    nights: dict[str, float] = {}
    for v in visits:
        nights[v.night] = min(nights.get(v.night, np.inf), v.mjd_obs)
    ccds = sorted(int(c) for c in preset.ccds)
    with contextlib.ExitStack() as stack:
        files = []  # (writer, kind, night as int, BUNIT)
        for night, first_mjd in sorted(nights.items()):
            # Calibrations taken in the afternoon before the night's first exposure.
            date = Time(first_mjd - 6.0 / 24.0, format="mjd", scale="utc").isot
            name = f"c4d_{night}_zci.fits"
            header = writer.calib_primary_header("zero", date, None, night, len(ccds))
            files.append((stack.enter_context(writer.MefWriter(calib_dir / name, header, len(ccds))),
                          "bias", int(night), "adu"))
            paths["bias"].append(f"calib/{name}")
            name = f"c4d_{night}_fci_{preset.band}.fits"
            header = writer.calib_primary_header("dome flat", date, preset.band, night, len(ccds))
            files.append((stack.enter_context(writer.MefWriter(calib_dir / name, header, len(ccds))),
                          "flat", int(night), ""))
            paths["flat"].append(f"calib/{name}")
        # Valid from the start of the last DES BPM epoch (docs/formats.md §4).
        header = writer.calib_primary_header("bpm", "2015-01-05T01:15:00.000", None, "150105", len(ccds))
        files.append((stack.enter_context(writer.MefWriter(calib_dir / "DECam_bpm.fits", header, len(ccds))),
                      "bpm", 0, ""))
        paths["bpm"].append("calib/DECam_bpm.fits")
        for c in ccds:
            sig = signatures(c)
            for mef, kind, nn, bunit in files:
                if kind == "bias":
                    image = signature.master_bias(sig, _rng(seed, _RNG_CALIB, nn, c, 1))
                elif kind == "flat":
                    image = signature.master_flat(sig, _rng(seed, _RNG_CALIB, nn, c, 2))
                else:
                    image = sig.bpm
                mef.append(writer.calib_hdu(c, image, bunit))
    for night in sorted(nights):
        log.info("wrote master bias and %s flat of night %s", preset.band, night)
    return paths


def _visits_table(visits) -> pd.DataFrame:
    """One row per visit; the PSF columns (``fwhm_arcsec``, ``psf_*``) are those of
    :data:`apsnake.sim.render.TRUTH_COLUMNS`, so ``render.PsfField.from_truth(ccd, row)``
    rebuilds the PSF any CCD of the visit was rendered with."""
    rows = []
    for v in visits:
        rows.append({
            "visit": v.expnum, "mjd_mid_tai": v.mjd_mid_tai, "date_obs": v.date_obs, "mjd_obs_utc": v.mjd_obs,
            "night": v.night, "exposure_time": v.exptime, "band": v.band, "airmass": v.airmass,
            **v.psf_field(0).truth_row(),  # the same for every CCD
            "sky_mag_arcsec2": v.sky_mag, "sky_e_per_pixel": v.sky_e_per_pixel, "zeropoint": v.zeropoint,
            "pointing_dra_arcsec": v.dra_arcsec, "pointing_ddec_arcsec": v.ddec_arcsec,
            "tel_ra": v.tel_ra, "tel_dec": v.tel_dec, "true_ra": v.true_ra, "true_dec": v.true_dec,
            "ha_deg": v.ha_deg, "zd_deg": v.zd_deg, "az_deg": v.az_deg,
            "is_template": v.is_template, "filename": f"raw/{v.filename}",
        })
    return pd.DataFrame(rows)


def simulate_night(outdir: str | Path, preset: str = "demo", seed: int = 1) -> dict:
    """Simulate a DECam night in the real raw format, with calibrations, refcat and truth.

    Parameters
    ----------
    outdir : str or Path
        Output folder; gets ``raw/`` (``c4d_YYMMDD_HHMMSS_ori.fits.fz``), ``calib/``
        (master bias, flat, BPM), ``refcat.parquet``, ``truth/`` and ``sim_summary.json``.
    preset : str
        A key of :data:`apsnake.sim.PRESETS` (``demo``, ``test``, ``dense``, ``crowded`` or ``focalplane``).
    seed : int
        Seed of every random draw; the same seed gives bit-identical products.

    Returns
    -------
    dict
        JSON-able summary (paths relative to ``outdir``, visits, CCDs, counts), also written
        to ``outdir/sim_summary.json`` (last, so its presence means the night is complete).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown simulation preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    seed = int(seed)
    outdir = Path(outdir)
    t_start = time.perf_counter()
    log.info("simulating preset %r (seed %d): CCDs %s, %d template + %d science visits -> %s",
             p.name, seed, list(p.ccds), len(p.templates), len(p.science), outdir)

    night = build_night(p, seed)
    visits, geometry, region = night.visits, night.geometry, night.region
    stars, galaxies, td = night.stars, night.galaxies, night.timedomain
    td_truth = sky.time_domain_truth(td, geometry, visits)
    refcat = sky.make_refcat(_rng(seed, _RNG_REFCAT), stars, p)
    log.info("sky: %d stars, %d galaxies, %d transients, %d variables, %d asteroids over %.3f deg^2; refcat %d",
             len(stars), len(galaxies), len(td.transients), len(td.variables), len(td.asteroids),
             region.area_deg2, len(refcat))

    signatures = _signature_source(p.ccds, seed)
    calib_paths = _write_calibs(outdir, p, visits, signatures, seed)

    # CCD by CCD (in the raw files' extension order), every visit of a CCD in turn, each raw
    # file written one extension at a time: one CCD signature and one raw image in memory.
    sig_rows, bias_rows = {}, {}
    raw_paths = [f"raw/{v.filename}" for v in visits]
    t_visit = {v.expnum: 0.0 for v in visits}
    with contextlib.ExitStack() as stack:
        raws = [stack.enter_context(writer.MefWriter(outdir / "raw" / v.filename,
                                                     writer.raw_primary_header(v, p, len(p.ccds)), len(p.ccds)))
                for v in visits]
        for ccd in writer.raw_extension_order(p.ccds):
            sig = signatures(ccd)
            for v, raw_file in zip(visits, raws):
                tc = time.perf_counter()
                raw, info, bias = simulate_ccd(night, v, ccd, sig)
                header = writer.raw_extension_header(sig, observing.header_wcs_cards(ccd, v))
                raw_file.append(writer.raw_hdu(header, raw))
                del raw
                rows = []
                for amp in decam.AMP_NAMES:
                    a = sig.amps[amp]
                    rows.append({
                        "visit": v.expnum, "detector": ccd, "detpos": decam.ccd_info(ccd).name, "amp": amp,
                        "gain_e_per_adu": a.gain, "read_noise_e": a.read_noise_e, "read_noise_adu": a.read_noise_adu,
                        "saturation_adu": a.saturation_adu, "full_well_e": a.full_well_e,
                        "bias_level_adu": bias.level[amp], "bias_row_mean_adu": float(np.mean(bias.rows[amp])),
                        "header_gain": a.header_gain, "header_read_noise": a.header_read_noise,
                        "header_saturation": a.header_saturation,
                        "crosstalk_coeff_from_other_amp": signature.crosstalk_coefficient(ccd, amp),
                        "flat_gain_e_per_adu": sig.flat_gain(), **info,
                    })
                sig_rows[(v.index, ccd)] = rows
                bias_rows[(v.index, ccd)] = [pd.DataFrame({
                    "visit": v.expnum, "detector": ccd, "amp": amp,
                    "raw_row": np.arange(decam.RAW_SHAPE[0], dtype=np.int32), "bias_adu": bias.rows[amp],
                }) for amp in decam.AMP_NAMES]
                t_visit[v.expnum] += time.perf_counter() - tc
                log.info("visit %d CCD %d (%s): %d stars, %d galaxies, %d cosmic rays, %d saturated px, %.1f s",
                         v.expnum, ccd, decam.ccd_info(ccd).name, info["n_stars_rendered"],
                         info["n_galaxies_rendered"], info["n_cosmic_rays"], info["n_saturated_pixels"],
                         time.perf_counter() - tc)
            del sig
    for v in visits:
        log.info("wrote %s (visit %d, %s, FWHM %.2f\", %.1f s)", v.filename, v.expnum,
                 "template" if v.is_template else "science", v.fwhm_arcsec, t_visit[v.expnum])
    # Truth rows in visit order, then the preset's CCD order (as when visits were simulated in turn).
    order = [(v.index, c) for v in visits for c in p.ccds]
    sig_rows = [row for key in order for row in sig_rows[key]]
    bias_rows = [frame for key in order for frame in bias_rows[key]]

    truth_dir = outdir / "truth"
    write_parquet(refcat, outdir / "refcat.parquet")
    write_parquet(_visits_table(visits), truth_dir / "visits.parquet")
    write_parquet(stars, truth_dir / "stars.parquet")
    write_parquet(galaxies, truth_dir / "galaxies.parquet")
    write_parquet(td_truth, truth_dir / "timedomain.parquet")
    write_parquet(td.transients, truth_dir / "transients.parquet")
    write_parquet(td.variables, truth_dir / "variables.parquet")
    write_parquet(td.asteroids, truth_dir / "asteroids.parquet")
    write_parquet(pd.DataFrame(sig_rows), truth_dir / "signature.parquet")
    write_parquet(pd.concat(bias_rows, ignore_index=True), truth_dir / "bias_rows.parquet")

    on_ccd = td_truth[(td_truth["detector"] >= 0) & ~td_truth["is_template"]]
    per_visit = on_ccd.groupby(["visit", "kind"]).size().unstack(fill_value=0)
    summary = {
        "preset": p.name, "seed": seed, "band": p.band, "exptime": p.exptime,
        "ccds": list(p.ccds), "n_visits": len(visits), "n_ccds": len(p.ccds),
        "field": {"ra": p.field_ra, "dec": p.field_dec},
        "visits": [int(v.expnum) for v in visits],
        "template_visits": [int(v.expnum) for v in visits if v.is_template],
        "science_visits": [int(v.expnum) for v in visits if not v.is_template],
        "raw": raw_paths, "calib": calib_paths, "refcat": "refcat.parquet",
        "truth": {name: f"truth/{name}.parquet" for name in (
            "visits", "stars", "galaxies", "timedomain", "transients", "variables", "asteroids",
            "signature", "bias_rows")},
        "counts": {
            "stars": int(len(stars)), "galaxies": int(len(galaxies)), "refcat": int(len(refcat)),
            "transients": int(len(td.transients)), "variables": int(len(td.variables)),
            "asteroids": int(len(td.asteroids)),
            "timedomain_on_ccd_per_science_visit": {
                str(k): {kind: int(n) for kind, n in row.items()} for k, row in per_visit.iterrows()},
        },
        "sky_region": asdict(region),
    }
    write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", outdir / "sim_summary.json")
    log.info("simulated %d visits x %d CCDs in %.1f s", len(visits), len(p.ccds), time.perf_counter() - t_start)
    return {**summary, "outdir": str(outdir.resolve())}
