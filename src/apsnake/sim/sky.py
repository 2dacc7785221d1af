"""The simulated sky: stars, galaxies, time-domain objects, the reference catalogue.

Conventions: positions ICRS degrees; magnitudes AB; fluxes in nJy with
``mag = 31.4 - 2.5 log10(flux_nJy)``; times MJD (TAI).

* Stars follow a high-latitude luminosity function (cumulative counts rising by 0.3 dex/mag
  brighter than g = 17 and 0.2 dex/mag fainter), with effective temperatures from a
  turn-off + M-dwarf mixture and black-body colours at the DECam filter wavelengths.
* Galaxies are Sersic (n = 1 disks and n = 4 spheroids) with counts rising by 0.38 dex/mag
  and half-light radii shrinking with magnitude.
* Transients sit on galaxies (< 1 arcsec from the centre) and rise and fall
  (``f = A (1 - exp(-t'/tau_rise)) exp(-t'/tau_fall)``, ``t' = t - t0 > 0``), absent from the
  templates; variable stars are sinusoidal, some brighter and some fainter than in the
  templates; asteroids move linearly at 0.5-1 arcsec/min.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from apsnake.instruments import decam
from apsnake.sim.observing import Geometry, VisitConditions
from apsnake.sim.presets import Preset

log = logging.getLogger(__name__)

AB_ZERO_NJY = 31.4
BANDS = ("g", "r", "i")
TRANSIENT_ID0 = 1_000_000
VARIABLE_ID0 = 2_000_000
ASTEROID_ID0 = 3_000_000
REFCAT_EPOCH = 2015.5


def mag_to_njy(mag):
    """AB magnitude -> flux in nJy."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - AB_ZERO_NJY))


def njy_to_mag(flux):
    """Flux in nJy -> AB magnitude (NaN for non-positive flux)."""
    flux = np.asarray(flux, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, AB_ZERO_NJY - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)


@dataclass(frozen=True)
class SkyRegion:
    """A small RA/Dec box (no RA wrap), degrees."""

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float

    @property
    def area_deg2(self) -> float:
        return (self.ra_max - self.ra_min) * math.degrees(
            math.sin(math.radians(self.dec_max)) - math.sin(math.radians(self.dec_min)))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n positions uniform on the sphere inside the box."""
        ra = rng.uniform(self.ra_min, self.ra_max, n)
        s = rng.uniform(math.sin(math.radians(self.dec_min)), math.sin(math.radians(self.dec_max)), n)
        return ra, np.degrees(np.arcsin(s))


# ---------------------------------------------------------------------------
# Luminosity functions and colours.
def _sample_cumulative(rng, n, mags, log_cum):
    """Draw n magnitudes from a cumulative count curve given as log10 N(<m) on a grid."""
    cum = 10.0 ** (log_cum - log_cum[-1])
    cum = (cum - cum[0]) / (1.0 - cum[0])
    return np.interp(rng.uniform(0.0, 1.0, n), cum, mags)


def star_log_counts(mags, density_24: float):
    """log10 of the cumulative star counts N(<g) per deg^2 (high galactic latitude)."""
    mags = np.asarray(mags, dtype=float)
    faint = np.log10(density_24) + 0.2 * (mags - 24.0)
    at17 = np.log10(density_24) + 0.2 * (17.0 - 24.0)
    return np.where(mags >= 17.0, faint, at17 + 0.3 * (mags - 17.0))


def galaxy_log_counts(mags, density_24: float):
    """log10 of the cumulative galaxy counts N(<g) per deg^2."""
    return np.log10(density_24) + 0.38 * (np.asarray(mags, dtype=float) - 24.0)


def blackbody_colours(teff) -> dict[str, np.ndarray]:
    """AB colours (g-r, r-i) of stars of effective temperature ``teff`` (K).

    Black body at the DECam filter central wavelengths, offset so that a 5778 K star has the
    solar g-r = 0.44 and r-i = 0.11, with a TiO-like reddening of r-i below 4000 K.
    """
    teff = np.asarray(teff, dtype=float)

    def bb_mag(lam_a, t):
        x = 1.438777e8 / (lam_a * t)  # h c / (lambda k T), lambda in Angstrom
        return 2.5 * np.log10(np.expm1(x)) + 7.5 * np.log10(lam_a)  # -2.5 log10(B_nu) + const

    lam = {b: decam.filter_wavelength(b)[0] for b in BANDS}
    sun = 5778.0
    gr = bb_mag(lam["g"], teff) - bb_mag(lam["r"], teff)
    ri = bb_mag(lam["r"], teff) - bb_mag(lam["i"], teff)
    gr += 0.44 - (bb_mag(lam["g"], sun) - bb_mag(lam["r"], sun))
    ri += 0.11 - (bb_mag(lam["r"], sun) - bb_mag(lam["i"], sun))
    gr = np.minimum(gr, 1.45 + 0.05 * np.tanh(gr - 1.45))
    ri = ri + 0.9 * np.clip((4000.0 - teff) / 1000.0, 0.0, 1.0)
    return {"g-r": gr, "r-i": ri}


def _mags_from_colours(band_mag: np.ndarray, band: str, gr, ri) -> dict[str, np.ndarray]:
    """g, r, i magnitudes given one band's magnitude and the g-r, r-i colours."""
    if band == "g":
        g = band_mag
    elif band == "r":
        g = band_mag + gr
    elif band == "i":
        g = band_mag + ri + gr
    else:  # other bands: treat the simulated band as g
        g = band_mag
    r = g - gr
    return {"g": g, "r": r, "i": r - ri}


def _teff_for_mag(rng, g_mag):
    """Effective temperatures (K): turn-off stars, plus M dwarfs more common when fainter."""
    n = len(g_mag)
    p_red = 0.15 + 0.35 * np.clip((g_mag - 16.0) / 8.0, 0.0, 1.0)
    red = rng.uniform(0.0, 1.0, n) < p_red
    teff = np.clip(rng.normal(6000.0, 450.0, n), 4600.0, 7600.0)
    teff[red] = rng.uniform(3100.0, 4600.0, red.sum())
    return teff


def _star_table(ids, ra, dec, teff, g_mag) -> pd.DataFrame:
    col = blackbody_colours(teff)
    mags = _mags_from_colours(g_mag, "g", col["g-r"], col["r-i"])
    table = {"star_id": ids, "ra": ra, "dec": dec, "teff": teff}
    for b in BANDS:
        table[f"{b}_mag"] = mags[b]
    for b in BANDS:
        table[f"{b}_flux_nJy"] = mag_to_njy(mags[b])
    return pd.DataFrame(table)


def make_stars(rng: np.random.Generator, region: SkyRegion, preset: Preset) -> pd.DataFrame:
    """Field stars of the region from the luminosity function (g from 9 mag to the preset limit)."""
    mags = np.linspace(9.0, preset.star_mag_limit, 400)
    logc = star_log_counts(mags, preset.star_density_deg2)
    n = int(rng.poisson((10.0 ** logc[-1]) * region.area_deg2))
    g = _sample_cumulative(rng, n, mags, logc)
    ra, dec = region.sample(rng, n)
    teff = _teff_for_mag(rng, g)
    return _star_table(np.arange(1, n + 1, dtype=np.int64), ra, dec, teff, g)


def make_galaxies(rng: np.random.Generator, region: SkyRegion, preset: Preset) -> pd.DataFrame:
    """Sersic galaxies of the region: 75% n=1 disks, 25% n=4 spheroids, g from 17 mag."""
    mags = np.linspace(17.0, preset.galaxy_mag_limit, 300)
    logc = galaxy_log_counts(mags, preset.galaxy_density_deg2)
    n = int(rng.poisson((10.0 ** logc[-1]) * region.area_deg2))
    g = _sample_cumulative(rng, n, mags, logc)
    ra, dec = region.sample(rng, n)
    spheroid = rng.uniform(0, 1, n) < 0.25
    sersic_n = np.where(spheroid, 4.0, 1.0)
    r_med = 0.9 * 10.0 ** (-0.12 * (g - 21.0))
    r_half = np.clip(r_med * 10.0 ** rng.normal(0.0, 0.18, n) * np.where(spheroid, 0.7, 1.0), 0.15, 6.0)
    q = np.where(spheroid, rng.uniform(0.55, 1.0, n), rng.uniform(0.25, 1.0, n))
    gr = np.clip(rng.normal(0.65, 0.25, n) + 0.25 * spheroid, 0.0, 1.6)
    ri = np.clip(0.45 * gr + rng.normal(0.05, 0.08, n), -0.1, 1.0)
    m = _mags_from_colours(g, "g", gr, ri)
    table = {"galaxy_id": np.arange(1, n + 1, dtype=np.int64), "ra": ra, "dec": dec}
    for b in BANDS:
        table[f"{b}_mag"] = m[b]
    for b in BANDS:
        table[f"{b}_flux_nJy"] = mag_to_njy(m[b])
    table.update({"sersic_n": sersic_n, "r_half_arcsec": r_half, "axis_ratio": q,
                  "pa_deg": rng.uniform(0.0, 180.0, n)})
    return pd.DataFrame(table)


# ---------------------------------------------------------------------------
# Placement of objects that must be seen in every science visit.
def _visible_everywhere(geometry: Geometry, visits, ra, dec, margin: float, need_template: bool):
    """Boolean mask: on a simulated CCD (``margin`` px from the edges) in every science visit
    and, with ``need_template``, in at least one template visit."""
    ok = np.ones(np.shape(ra), dtype=bool)
    seen_in_template = np.zeros(np.shape(ra), dtype=bool)
    for v in visits:
        det, _, _ = geometry.locate(v.index, ra, dec, margin=margin)
        if v.is_template:
            seen_in_template |= det >= 0
        else:
            ok &= det >= 0
    return ok & seen_in_template if need_template else ok


def _sample_visible(rng, region, geometry, visits, n, margin, need_template=True, max_tries=40):
    """n sky positions visible in every science visit (rejection sampling in the region)."""
    ras, decs = [], []
    for _ in range(max_tries):
        ra, dec = region.sample(rng, max(4 * n, 200))
        keep = _visible_everywhere(geometry, visits, ra, dec, margin, need_template)
        ras.append(ra[keep])
        decs.append(dec[keep])
        if sum(len(r) for r in ras) >= n:
            break
    ra, dec = np.concatenate(ras)[:n], np.concatenate(decs)[:n]
    if len(ra) < n:
        raise RuntimeError(f"only {len(ra)} of {n} positions are seen by every science visit; "
                           "dithers too large for the simulated CCDs")
    return ra, dec


def add_bright_stars(rng, stars: pd.DataFrame, region, geometry, visits, n: int) -> pd.DataFrame:
    """Append ``n`` bright (g 10-12, saturating) stars seen by every science visit."""
    if n <= 0:
        return stars
    ra, dec = _sample_visible(rng, region, geometry, visits, n, margin=150, need_template=False)
    g = rng.uniform(10.0, 12.0, n)
    teff = np.clip(rng.normal(5600.0, 600.0, n), 4200.0, 7500.0)
    start = int(stars["star_id"].max()) + 1 if len(stars) else 1
    extra = _star_table(np.arange(start, start + n, dtype=np.int64), ra, dec, teff, g)
    return pd.concat([stars, extra], ignore_index=True)


# ---------------------------------------------------------------------------
# Light curves.
def transient_flux(t, t0, amplitude, tau_rise, tau_fall):
    """Transient flux (nJy) at MJD ``t``: zero before ``t0``, then rise and exponential fall."""
    dt = np.asarray(t, dtype=float) - t0
    with np.errstate(over="ignore", invalid="ignore"):
        f = amplitude * (-np.expm1(-np.maximum(dt, 0.0) / tau_rise)) * np.exp(-np.maximum(dt, 0.0) / tau_fall)
    return np.where(dt > 0, f, 0.0)


def variable_flux(t, mean_flux, amplitude, period, phase, sign):
    """Variable-star flux (nJy): ``mean_flux (1 + sign amplitude sin(2 pi t / period + phase))``."""
    return mean_flux * (1.0 + sign * amplitude * np.sin(2.0 * np.pi * np.asarray(t, dtype=float) / period + phase))


def asteroid_position(t, ra0, dec0, t_ref, v_ra, v_dec):
    """Asteroid (ra, dec) in deg at MJD ``t``; rates in deg/day on the sky (v_ra includes cos dec)."""
    dt = np.asarray(t, dtype=float) - t_ref
    dec = dec0 + v_dec * dt
    ra = ra0 + v_ra * dt / np.cos(np.radians(dec0))
    return ra % 360.0, dec


@dataclass
class TimeDomain:
    """The time-domain objects (one row each) with their light-curve / orbit parameters."""

    transients: pd.DataFrame
    variables: pd.DataFrame
    asteroids: pd.DataFrame

    def position(self, kind: str, row, t):
        if kind == "asteroid":
            return asteroid_position(t, row.ra0, row.dec0, row.t_ref, row.v_ra_deg_day, row.v_dec_deg_day)
        return row.ra, row.dec

    def flux(self, kind: str, row, t):
        if kind == "transient":
            return transient_flux(t, row.t0, row.amplitude_nJy, row.tau_rise_d, row.tau_fall_d)
        if kind == "variable":
            return variable_flux(t, row.mean_flux_nJy, row.amplitude, row.period_d, row.phase, row.sign)
        return np.full(np.shape(t), row.flux_nJy, dtype=float)

    def template_flux(self, kind: str, row, template_times) -> float:
        """Mean flux over the template visits (0 for transients and asteroids)."""
        if kind != "variable" or len(template_times) == 0:
            return 0.0
        return float(np.mean(self.flux(kind, row, np.asarray(template_times))))

    def iter_objects(self):
        for kind, table in (("transient", self.transients), ("variable", self.variables), ("asteroid", self.asteroids)):
            for row in table.itertuples(index=False):
                yield kind, row


def make_time_domain(rng, region: SkyRegion, geometry: Geometry, visits: list[VisitConditions],
                     galaxies: pd.DataFrame, preset: Preset, next_star_id: int) -> tuple[TimeDomain, pd.DataFrame]:
    """Draw transients, variable stars and asteroids that every science visit sees.

    Returns the objects and the variable stars as extra rows of the star table (their mean
    magnitudes). Target fluxes put the difference-image signal mostly at S/N ~ 10-200
    (g ~ 19.5-22.5 for 90 s).
    """
    sci = [v for v in visits if not v.is_template]
    tmpl = [v for v in visits if v.is_template]
    t_sci = np.array([v.mjd_mid_tai for v in sci])
    t_tmpl = np.array([v.mjd_mid_tai for v in tmpl])
    last_template = t_tmpl.max() if len(t_tmpl) else t_sci.min() - 30.0
    margin = 60.0

    # Transients on galaxies of g 18.5-23.
    cand = galaxies[(galaxies["g_mag"] > 18.5) & (galaxies["g_mag"] < 23.0)]
    vis = _visible_everywhere(geometry, visits, cand["ra"].to_numpy(), cand["dec"].to_numpy(), margin, True)
    cand = cand[vis]
    n_tr = min(preset.n_transients, len(cand))
    if n_tr < preset.n_transients:
        log.warning("only %d host galaxies are seen by every science visit (%d transients asked)",
                    n_tr, preset.n_transients)
    hosts = cand.iloc[np.sort(rng.choice(len(cand), n_tr, replace=False))]
    sep = rng.uniform(0.1, 0.9, n_tr) * np.minimum(hosts["r_half_arcsec"].to_numpy(), 1.0)
    ang = rng.uniform(0.0, 2.0 * np.pi, n_tr)
    tr_dec = hosts["dec"].to_numpy() + sep * np.cos(ang) / 3600.0
    tr_ra = hosts["ra"].to_numpy() + sep * np.sin(ang) / 3600.0 / np.cos(np.radians(tr_dec))
    fast = rng.uniform(0, 1, n_tr) < 0.25
    tau_r = np.where(fast, rng.uniform(0.01, 0.04, n_tr), rng.uniform(2.0, 6.0, n_tr))
    tau_f = np.where(fast, rng.uniform(0.05, 0.2, n_tr), rng.uniform(15.0, 40.0, n_tr))
    t_peak = tau_r * np.log1p(tau_f / tau_r)
    rising = np.arange(n_tr) % 2 == 0
    age = np.where(rising, rng.uniform(0.3, 0.9, n_tr), rng.uniform(1.3, 4.0, n_tr)) * t_peak
    age = np.where(fast, rng.uniform(0.005, 0.03, n_tr), age)  # fast ones start just before the first visit
    t_ref = np.where(fast, t_sci.min(), t_sci.mean())
    # Never before the templates: an old one starts at a random time after the template night.
    t0 = np.maximum(t_ref - age, last_template + rng.uniform(0.5, 3.0, n_tr))
    target = mag_to_njy(rng.uniform(*preset.signal_mag_range, n_tr))
    unit = np.array([transient_flux(t_sci, t0[k], 1.0, tau_r[k], tau_f[k]).max() for k in range(n_tr)])
    transients = pd.DataFrame({
        "object_id": TRANSIENT_ID0 + np.arange(1, n_tr + 1), "ra": tr_ra, "dec": tr_dec,
        "host_galaxy_id": hosts["galaxy_id"].to_numpy(), "host_offset_arcsec": sep,
        "t0": t0, "tau_rise_d": tau_r, "tau_fall_d": tau_f, "amplitude_nJy": target / unit,
        "fast": fast, "peak_mag_in_science": njy_to_mag(target),
    })

    # Variable stars: sinusoids whose science-minus-template signal is drawn like the transients.
    n_var = preset.n_variables
    var_ra, var_dec = _sample_visible(rng, region, geometry, visits, n_var, margin)
    rows = []
    for k in range(n_var):
        while True:
            amp = rng.uniform(0.15, 0.5)
            period = rng.uniform(0.25, 0.9)
            phase = rng.uniform(0.0, 2.0 * np.pi)
            s_sci = variable_flux(t_sci, 1.0, amp, period, phase, 1.0).mean()
            s_tmpl = variable_flux(t_tmpl, 1.0, amp, period, phase, 1.0).mean() if len(t_tmpl) else 1.0
            if abs(s_sci - s_tmpl) > 0.1:
                break
        want_negative = k % 2 == 1
        sign = 1.0 if (s_sci > s_tmpl) != want_negative else -1.0
        target = mag_to_njy(rng.uniform(*preset.signal_mag_range))
        mean_flux = min(target / abs(s_sci - s_tmpl), mag_to_njy(15.5))
        rows.append((amp, period, phase, sign, mean_flux))
    amp, period, phase, sign, mean_flux = (np.array(c) for c in zip(*rows)) if rows else (np.zeros(0),) * 5
    var_ids = VARIABLE_ID0 + np.arange(1, n_var + 1)
    star_ids = next_star_id + np.arange(n_var, dtype=np.int64)
    variables = pd.DataFrame({
        "object_id": var_ids, "star_id": star_ids, "ra": var_ra, "dec": var_dec,
        "mean_flux_nJy": mean_flux, "amplitude": amp, "period_d": period, "phase": phase, "sign": sign,
    })
    teff = np.clip(rng.normal(6500.0, 300.0, n_var), 5800.0, 7500.0)
    var_stars = _star_table(star_ids, var_ra, var_dec, teff, njy_to_mag(mean_flux))
    var_stars["variable_object_id"] = var_ids

    # Asteroids: linear motion at 0.5-1 arcsec/min, on the CCDs through the science night.
    n_ast = preset.n_asteroids
    t_mid = float(t_sci.mean())
    ast = []
    for _ in range(200 * max(n_ast, 1)):
        if len(ast) >= n_ast:
            break
        ra0, dec0 = region.sample(rng, 1)
        speed = rng.uniform(0.5, 1.0) * 1440.0 / 3600.0  # arcsec/min -> deg/day
        theta = rng.uniform(0.0, 2.0 * np.pi)
        v_ra, v_dec = speed * np.sin(theta), speed * np.cos(theta)
        ok = True
        for v in sci:
            ra, dec = asteroid_position(v.mjd_mid_tai, ra0[0], dec0[0], t_mid, v_ra, v_dec)
            det, _, _ = geometry.locate(v.index, [ra], [dec], margin=margin)
            ok &= bool(det[0] >= 0)
        if ok:
            ast.append((ra0[0], dec0[0], v_ra, v_dec, mag_to_njy(rng.uniform(19.5, 21.5))))
    if len(ast) < n_ast:
        raise RuntimeError(f"could only place {len(ast)} of {n_ast} asteroids on the simulated CCDs")
    a = np.array(ast).reshape(-1, 5)
    asteroids = pd.DataFrame({
        "object_id": ASTEROID_ID0 + np.arange(1, n_ast + 1), "ra0": a[:, 0], "dec0": a[:, 1],
        "t_ref": np.full(n_ast, t_mid), "v_ra_deg_day": a[:, 2], "v_dec_deg_day": a[:, 3], "flux_nJy": a[:, 4],
        "rate_arcsec_min": np.hypot(a[:, 2], a[:, 3]) * 3600.0 / 1440.0,
    })
    return TimeDomain(transients, variables, asteroids), var_stars


def time_domain_truth(td: TimeDomain, geometry: Geometry, visits: list[VisitConditions]) -> pd.DataFrame:
    """One row per time-domain object per visit: true position, flux, template and difference
    flux (nJy), and where it falls (CCDNUM, 0-based trimmed x, y; -1/NaN when on no CCD)."""
    t_tmpl = [v.mjd_mid_tai for v in visits if v.is_template]
    rows = []
    for kind, obj in td.iter_objects():
        tmpl_flux = td.template_flux(kind, obj, t_tmpl)
        for v in visits:
            ra, dec = td.position(kind, obj, v.mjd_mid_tai)
            flux = float(td.flux(kind, obj, v.mjd_mid_tai))
            rows.append((int(obj.object_id), kind, v.expnum, v.mjd_mid_tai, bool(v.is_template),
                         float(ra), float(dec), flux, tmpl_flux, flux - tmpl_flux))
    df = pd.DataFrame(rows, columns=["object_id", "kind", "visit", "mjd_mid_tai", "is_template", "ra", "dec",
                                     "flux_nJy", "template_flux_nJy", "diff_flux_nJy"])
    det = np.full(len(df), -1, dtype=np.int64)
    x = np.full(len(df), np.nan)
    y = np.full(len(df), np.nan)
    for v in visits:
        sel = (df["visit"] == v.expnum).to_numpy()
        d, xx, yy = geometry.locate(v.index, df.loc[sel, "ra"].to_numpy(), df.loc[sel, "dec"].to_numpy())
        det[sel], x[sel], y[sel] = d, xx, yy
    df["detector"], df["x"], df["y"] = det, x, y
    df["mag"] = njy_to_mag(df["flux_nJy"].to_numpy())
    df["diff_mag"] = njy_to_mag(np.abs(df["diff_flux_nJy"].to_numpy()))
    return df


def make_refcat(rng, stars: pd.DataFrame, preset: Preset) -> pd.DataFrame:
    """Gaia/PS1-like reference catalogue (docs/formats.md §6): stars with r < ``refcat_mag_limit``,
    positions scattered by ~10 mas, AB magnitudes with PS1-like errors, epoch 2015.5."""
    ref = stars[stars["r_mag"] < preset.refcat_mag_limit].reset_index(drop=True)
    n = len(ref)
    pos_err_mas = 10.0 * np.sqrt(1.0 + 10.0 ** (0.4 * (ref["r_mag"].to_numpy() - 20.0)))
    ddec = rng.normal(0.0, 1.0, n) * pos_err_mas / 3.6e6
    dra = rng.normal(0.0, 1.0, n) * pos_err_mas / 3.6e6 / np.cos(np.radians(ref["dec"].to_numpy()))
    out = {"source_id": ref["star_id"].to_numpy(),
           "ra": ref["ra"].to_numpy() + dra, "dec": ref["dec"].to_numpy() + ddec}
    for b in BANDS:
        true = ref[f"{b}_mag"].to_numpy()
        err = 0.003 + 0.01 * 10.0 ** (0.4 * (true - 20.0))
        out[f"{b}_mag"] = true + rng.normal(0.0, 1.0, n) * err
        out[f"{b}_magErr"] = err
    out.update({"pmra": np.zeros(n), "pmdec": np.zeros(n), "epoch": np.full(n, REFCAT_EPOCH)})
    return pd.DataFrame(out)
