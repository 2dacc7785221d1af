"""DIA source detection and measurement (apsnake.dia) on synthetic difference images.

The images are built as Rubin's are: science S and PSF-matched template T share one pixel
grid, PSF (Gaussian, sigma 1.7 px, pixel-integrated) and TAN WCS, and the difference is
D = S - T with variance var(S) + var(T). Transients are injected into S only, vanished
sources into T only, misregistered stars into both at slightly different positions.
"""


from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS
from scipy.spatial import cKDTree
from scipy.special import erf

from apsnake.dia import DiaConfig, DiaError, detect_dia_sources
from apsnake.exposure import Exposure, ExposureUnitError, PhotoCalib, PsfModel, VisitInfo
from apsnake.ids import unpack
from apsnake.schema import DIA_SOURCE_SCHEMA

SIGMA = 1.7           # PSF sigma, pixels (FWHM 4.0 px, DECam-like at 0.263"/px)
SCALE = 0.263         # arcsec / pixel
SIG_S, SIG_T = 20.0, 7.0   # per-pixel noise of science and template, nJy
SIG_D = np.hypot(SIG_S, SIG_T)
FLUX_PER_SNR = SIG_D * np.sqrt(4 * np.pi) * SIGMA  # PSF-flux S/N = flux / this (Gaussian PSF)
VISIT, DETECTOR = 411371, 56
NO_FILTER = DiaConfig(apply_filter=False)
KEEP_ALL = DiaConfig(drop_flagged=False, apply_filter=False)


def _gauss1d(n, centre, sigma):
    edges = np.arange(n + 1) - 0.5
    return 0.5 * np.diff(erf((edges - centre) / (np.sqrt(2) * sigma)))


def _render(shape, sources, sigma=SIGMA):
    """Pixel-integrated Gaussian point sources (x, y, flux) on an image."""
    ny, nx = shape
    img = np.zeros(shape)
    for x, y, f in sources:
        x0, x1 = max(int(x) - 15, 0), min(int(x) + 16, nx)
        y0, y1 = max(int(y) - 15, 0), min(int(y) + 16, ny)
        if x1 > x0 and y1 > y0:
            img[y0:y1, x0:x1] += f * np.outer(_gauss1d(y1 - y0, y - y0, sigma), _gauss1d(x1 - x0, x - x0, sigma))
    return img


def _psf_model(sigma=SIGMA, size=25):
    g = _gauss1d(size, size // 2, sigma)
    stamp = np.outer(g, g)
    return PsfModel(components=(stamp / stamp.sum())[None].astype(np.float32), spatial_order=0,
                    fwhm_pixels=2.3548 * sigma)


def _tan_wcs(shape, rot_deg=10.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    c, s = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    w.wcs.cd = np.array([[-c, s], [s, c]]) * SCALE / 3600.0
    return w


def make_images(shape=(512, 1024), transients=(), vanished=(), static=(), dipoles=(), seed=0):
    """Difference, science and matched template.

    transients: (x, y, flux) in the science image only; vanished: in the template only;
    static: in both; dipoles: (x, y, flux, dx, dy) star at (x, y) in the template and at
    (x + dx, y + dy) in the science image.
    """
    rng = np.random.default_rng(seed)
    sci = rng.normal(0.0, SIG_S, shape)
    tmpl = rng.normal(0.0, SIG_T, shape)
    sci += _render(shape, list(transients) + list(static) + [(x + dx, y + dy, f) for x, y, f, dx, dy in dipoles])
    tmpl += _render(shape, list(vanished) + list(static) + [(x, y, f) for x, y, f, _, _ in dipoles])
    vi = VisitInfo(visit=VISIT, band="g", mjd_mid_tai=57000.25, exposure_time=90.0)
    wcs, psf = _tan_wcs(shape), _psf_model()

    def exposure(img, var):
        ex = Exposure.empty(shape, vi, detector=DETECTOR, unit="nJy", wcs=wcs, psf=psf)
        ex.image[:] = img
        ex.variance[:] = var
        return ex

    return exposure(sci - tmpl, SIG_D ** 2), exposure(sci, SIG_S ** 2), exposure(tmpl, SIG_T ** 2)


def _grid(rng, step, shape=(512, 1024), margin=50):
    xs, ys = np.meshgrid(np.arange(margin, shape[1] - margin + 1, step), np.arange(margin, shape[0] - margin + 1, step))
    x = xs.ravel() + rng.uniform(-0.5, 0.5, xs.size)
    y = ys.ravel() + rng.uniform(-0.5, 0.5, xs.size)
    return x, y


def _match(df, x, y, radius=2.0):
    d, i = cKDTree(np.c_[df["x"], df["y"]]).query(np.c_[x, y])
    return d < radius, i


# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def injected_runs():
    """Six 1024x512 images with positive and negative point sources at S/N 8-40."""
    runs = []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        x, y = _grid(rng, 60)
        flux = rng.uniform(8, 40, x.size) * FLUX_PER_SNR
        negative = rng.integers(0, 2, x.size).astype(bool)
        diff, sci, tmpl = make_images(
            transients=[(a, b, f) for a, b, f, n in zip(x, y, flux, negative) if not n],
            vanished=[(a, b, f) for a, b, f, n in zip(x, y, flux, negative) if n], seed=seed)
        table = detect_dia_sources(diff, sci, tmpl, NO_FILTER, time_processed_mjd=60000.0)
        default = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=60000.0)
        runs.append((x, y, flux, negative, table.to_pandas(), default.to_pandas()))
    return runs


def test_completeness_at_snr_8_and_no_spurious_sources(injected_runs):
    for x, y, flux, negative, df, _ in injected_runs:
        found, _ = _match(df, x, y)
        assert found.all(), f"missed {np.count_nonzero(~found)} of {x.size} sources at S/N >= 8"
        assert len(df) <= x.size + 2  # at most a noise peak or two (~0.3 per image expected)


def test_default_filter_drops_only_a_few_vanished_sources(injected_runs):
    """Rubin's filter drops sources with science S/N < -2: for a vanished star (scienceFlux ~ 0)
    that is ~2 % of them; transients are all kept."""
    lost = total = 0
    for x, y, flux, negative, _, df in injected_runs:
        found, _ = _match(df, x, y)
        assert found[~negative].all()
        lost += np.count_nonzero(~found[negative])
        total += np.count_nonzero(negative)
        assert (df["scienceFlux"] / df["scienceFluxErr"] >= -2).all()
    assert lost / total < 0.06


def test_psf_flux_pulls_and_signs(injected_runs):
    pulls, xp, yp = [], [], []
    for x, y, flux, negative, df, _ in injected_runs:
        _, i = _match(df, x, y)
        r = df.iloc[i]
        truth = np.where(negative, -flux, flux)
        pulls.append((r["psfFlux"].to_numpy() - truth) / r["psfFluxErr"].to_numpy())
        xp.append((r["x"].to_numpy() - x) / r["xErr"].to_numpy())
        yp.append((r["y"].to_numpy() - y) / r["yErr"].to_numpy())
        assert (r["isNegative"].to_numpy() == negative).all()
        assert (np.sign(r["psfFlux"].to_numpy()) == np.where(negative, -1, 1)).all()
        assert not r["isDipole"].any() and not r["dipoleFitAttempted"].any()
        assert (r["psfNdata"] == 25 * 25).all() and not r["psfFlux_flag"].any()
        # detection significance ~ PSF-flux S/N
        assert np.median(r["snr"].to_numpy() / (flux / FLUX_PER_SNR)) == pytest.approx(1.0, abs=0.05)
    pulls, xp, yp = np.concatenate(pulls), np.concatenate(xp), np.concatenate(yp)
    assert abs(pulls.mean()) < 0.1 and 0.9 < pulls.std() < 1.2
    for p in (xp, yp):  # positions agree with their errors
        assert abs(p.mean()) < 0.15 and 0.75 < p.std() < 1.25


def test_psf_flux_at_the_centroid_is_debiased():
    """Measured at its own fitted centroid, a PSF flux at S/N 10 exceeds the flux at the true
    position by ~sigma_F^2 / F (a pull of +0.1); ``debias_centroid_flux`` removes that, for both
    signs, and the pulls against the truth follow."""
    from apsnake.dia.measure import psf_photometry

    gains = {True: [], False: []}
    pulls = {True: [], False: [], "forced": []}
    for seed in range(3):
        rng = np.random.default_rng(300 + seed)
        x, y = _grid(rng, 40)
        flux = np.full(x.size, 10.0 * FLUX_PER_SNR)
        negative = rng.integers(0, 2, x.size).astype(bool)
        diff, sci, tmpl = make_images(
            transients=[(a, b, f) for a, b, f, n in zip(x, y, flux, negative) if not n],
            vanished=[(a, b, f) for a, b, f, n in zip(x, y, flux, negative) if n], seed=50 + seed)
        truth = np.where(negative, -flux, flux)
        forced = psf_photometry(diff, diff.bad_pixels(("BAD", "NO_DATA")), x, y, 1.0, "")
        at_truth = forced["psfFlux"]
        pulls["forced"].append(np.sign(truth) * (at_truth - truth) / forced["psfFluxErr"])
        for debias in (True, False):
            df = detect_dia_sources(diff, sci, tmpl, replace(NO_FILTER, debias_centroid_flux=debias),
                                    time_processed_mjd=60000.0).to_pandas()
            found, i = _match(df, x, y)
            assert found.mean() > 0.99
            r = df.iloc[i[found]]
            err = r["psfFluxErr"].to_numpy()
            sign = np.sign(truth[found])
            gains[debias].append(sign * (r["psfFlux"].to_numpy() - at_truth[found]) / err)
            pulls[debias].append(sign * (r["psfFlux"].to_numpy() - truth[found]) / err)
    raw, debiased = np.concatenate(gains[False]), np.concatenate(gains[True])
    assert raw.size > 600
    assert 0.06 < raw.mean() < 0.14          # 1 / (S/N) = 0.1
    assert abs(debiased.mean()) < 0.03
    median = {k: np.median(np.concatenate(v)) for k, v in pulls.items()}
    assert median[False] > median[True] + 0.06
    assert abs(median[True] - median["forced"]) < 0.04   # as unbiased as the flux at the truth


def test_forced_science_and_template_fluxes(injected_runs):
    sp, tp = [], []
    for x, y, flux, negative, df, _ in injected_runs:
        _, i = _match(df, x, y)
        r = df.iloc[i]
        sp.append((r["scienceFlux"].to_numpy() - np.where(negative, 0, flux)) / r["scienceFluxErr"].to_numpy())
        tp.append((r["templateFlux"].to_numpy() - np.where(negative, flux, 0)) / r["templateFluxErr"].to_numpy())
    for p in (np.concatenate(sp), np.concatenate(tp)):
        assert abs(p.mean()) < 0.15 and 0.85 < p.std() < 1.2


def test_variable_star_forced_fluxes():
    """A static star that brightened: psfFlux = the change, scienceFlux and templateFlux = the
    star's flux in each image."""
    rng = np.random.default_rng(7)
    x, y = _grid(rng, 100)
    base = rng.uniform(5e3, 2e4, x.size)
    delta = rng.uniform(15, 30, x.size) * FLUX_PER_SNR
    diff, sci, tmpl = make_images(static=list(zip(x, y, base)), transients=list(zip(x, y, delta)), seed=3)
    df = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    found, i = _match(df, x, y)
    assert found.all()
    r = df.iloc[i]
    for col, truth in (("psfFlux", delta), ("scienceFlux", base + delta), ("templateFlux", base)):
        # The centroid error (~0.1 px) costs a bright star up to ~1 % of its forced flux.
        assert np.all(np.abs(r[col].to_numpy() - truth) < 4 * r[f"{col}Err"].to_numpy() + 0.01 * truth), col
    assert np.all(np.abs(r["apFlux"].to_numpy() - delta) < 5 * r["apFluxErr"].to_numpy())  # 12-px aperture
    # The PSF-matching floor: 1 % of the template flux in quadrature (template_flux_error).
    plain = detect_dia_sources(diff, sci, tmpl, DiaConfig(template_flux_error=0.0), time_processed_mjd=1.0)
    plain = plain.to_pandas().iloc[i]
    expected = np.hypot(plain["psfFluxErr"].to_numpy(), 0.01 * r["templateFlux"].to_numpy())
    assert np.allclose(r["psfFluxErr"].to_numpy(), expected, rtol=1e-5)
    assert np.array_equal(r["psfFlux"].to_numpy(), plain["psfFlux"].to_numpy())


def test_aperture_correction_of_the_calexp_scales_psf_fluxes():
    """Rubin's doApCorr: PSF fluxes are multiplied by the calexp's aperture correction (its
    APCORR* header plane) at the source; aperture fluxes are not."""
    from apsnake.photometry import ApertureCorrection

    rng = np.random.default_rng(8)
    x, y = _grid(rng, 150)
    diff, sci, tmpl = make_images(transients=list(zip(x, y, np.full(x.size, 30 * FLUX_PER_SNR))), seed=9)
    plain = detect_dia_sources(diff, sci, tmpl, KEEP_ALL, time_processed_mjd=1.0).to_pandas()
    plane = ApertureCorrection(np.array([0.97, 0.02, -0.01]), 512.0, 256.0, 512.0, 0.0, 0)
    sci.metadata.update(plane.to_metadata())
    corrected = detect_dia_sources(diff, sci, tmpl, KEEP_ALL, time_processed_mjd=1.0).to_pandas()
    factor = plane(plain["x"].to_numpy(), plain["y"].to_numpy())
    for col in ("psfFlux", "scienceFlux", "templateFlux"):
        assert np.allclose(corrected[col], plain[col] * factor, rtol=1e-5), col
    assert np.allclose(corrected["apFlux"], plain["apFlux"])
    assert ApertureCorrection.from_metadata({}) is None


def test_false_positives_on_pure_noise():
    counts = []
    for seed in range(5):
        diff, sci, tmpl = make_images(seed=1000 + seed)
        counts.append(detect_dia_sources(diff, sci, tmpl, KEEP_ALL, time_processed_mjd=1.0).num_rows)
    assert max(counts) <= 2, counts


def test_dipoles_are_one_source_with_isdipole():
    rng = np.random.default_rng(3)
    x, y = _grid(rng, 120)
    flux = 10 ** rng.uniform(4.0, 4.8, x.size)
    sep = rng.uniform(0.8, 2.5, x.size)
    ang = rng.uniform(0, 2 * np.pi, x.size)
    dx, dy = sep * np.cos(ang), sep * np.sin(ang)
    lone = (511.3, 300.6, 30 * FLUX_PER_SNR)  # a transient far from the dipoles
    diff, sci, tmpl = make_images(dipoles=list(zip(x, y, flux, dx, dy)), transients=[lone], seed=11)
    df = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    assert x.size + 1 <= len(df) <= x.size + 3  # the lone transient; perhaps a noise peak
    mid_x, mid_y = x + dx / 2, y + dy / 2
    found, i = _match(df, mid_x, mid_y, radius=0.3)
    assert found.all()
    r = df.iloc[i]
    assert r["isDipole"].all() and r["dipoleFitAttempted"].all()
    assert not r["isNegative"].any()
    assert np.allclose(r["dipoleMeanFlux"], flux, rtol=0.05)
    assert np.all(np.abs(r["dipoleFluxDiff"]) < 5 * r["dipoleFluxDiffErr"] + 0.02 * flux)
    assert np.allclose(r["dipoleLength"], sep * SCALE, atol=0.06)
    # Position angle (east of north) from the negative (template) to the positive (science) lobe.
    wcs = diff.wcs
    ra0, dec0 = wcs.all_pix2world(x, y, 0)
    ra1, dec1 = wcs.all_pix2world(x + dx, y + dy, 0)
    pa = np.degrees(np.arctan2((ra1 - ra0) * np.cos(np.radians(dec0)), dec1 - dec0)) % 360
    dpa = (r["dipoleAngle"].to_numpy() - pa + 180) % 360 - 180
    assert np.all(np.abs(dpa) < 6)
    assert np.all(r["dipoleNdata"] > 0) and np.all(np.isfinite(r["dipoleChi2"]))
    # The lone transient: no dipole fit, dipole columns null.
    found, j = _match(df, [lone[0]], [lone[1]], radius=0.5)
    assert found.all()
    t = df.iloc[j[0]]
    assert not t["isDipole"] and not t["dipoleFitAttempted"] and t["dipoleNdata"] == 0
    assert np.isnan(t["dipoleMeanFlux"]) and np.isnan(t["dipoleLength"])


def test_mask_flags_and_drop_rules():
    shape = (256, 512)
    positions = {"sat": (60.2, 60.3), "nodata_centre": (160.4, 60.1), "nodata_footprint": (260.3, 60.4),
                 "intrp_all": (360.1, 60.2), "intrp_one": (60.3, 160.2), "cr": (160.2, 160.3),
                 "suspect": (260.4, 160.1), "clean": (360.3, 160.4), "edge": (3.4, 200.2)}
    flux = 40 * FLUX_PER_SNR
    diff, sci, tmpl = make_images(shape=shape, transients=[(x, y, flux) for x, y in positions.values()], seed=5)
    for ex in (diff, sci):
        def box(name, dx0, dx1, dy0, dy1, plane):
            x, y = (int(round(v)) for v in positions[name])
            region = np.zeros(shape, bool)
            region[y + dy0:y + dy1 + 1, x + dx0:x + dx1 + 1] = True
            ex.set_mask(plane, region)
        box("sat", -1, 1, -1, 1, "SAT")
        box("nodata_centre", 1, 1, -1, 1, "NO_DATA")
        box("nodata_footprint", 6, 12, -12, 12, "NO_DATA")
        box("intrp_all", -1, 1, -1, 1, "INTRP")
        box("intrp_one", 1, 1, 0, 0, "INTRP")
        box("cr", 0, 0, 0, 0, "CR")
        box("suspect", -2, 2, -2, 2, "SUSPECT")
        edge = np.zeros(shape, bool)
        edge[:, :3] = True
        ex.set_mask("EDGE", edge)
    diff.image[diff.mask_of("NO_DATA")] = 0.0  # as Rubin sets the difference where the template has no data
    df = detect_dia_sources(diff, sci, tmpl, KEEP_ALL, time_processed_mjd=1.0).to_pandas()
    found, i = _match(df, *np.array(list(positions.values())).T, radius=1.5)
    assert found.all()
    r = {name: df.iloc[k] for name, k in zip(positions, i)}
    assert r["sat"]["pixelFlags_saturated"] and r["sat"]["pixelFlags_saturatedCenter"]
    assert r["nodata_centre"]["pixelFlags_nodataCenter"] and r["nodata_centre"]["pixelFlags_nodata"]
    assert r["nodata_footprint"]["pixelFlags_nodata"] and not r["nodata_footprint"]["pixelFlags_nodataCenter"]
    assert r["intrp_all"]["pixelFlags_interpolatedCenter"] and r["intrp_one"]["pixelFlags_interpolatedCenter"]
    assert r["cr"]["pixelFlags_cr"] and r["cr"]["pixelFlags_crCenter"]
    assert r["suspect"]["pixelFlags_suspect"] and r["suspect"]["pixelFlags_suspectCenter"]
    assert r["edge"]["pixelFlags_edge"] and r["edge"]["psfFlux_flag_edge"] and r["edge"]["psfFlux_flag"]
    assert r["edge"]["apFlux_flag"] and r["edge"]["apFlux_flag_apertureTruncated"]
    flag_cols = [c for c in df.columns if c.startswith("pixelFlags_") and "injected" not in c]
    assert not any(r["clean"][c] for c in flag_cols)
    assert not r["clean"]["psfFlux_flag"] and not r["clean"]["apFlux_flag"]
    assert df["pixelFlags_injected"].isna().all()  # no INJECTED plane: unknown, not False
    # Default: Rubin's drop rules (SAT/NO_DATA/EDGE centre, all-INTRP centre) and filter (CR centre).
    kept = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    found, _ = _match(kept, *np.array(list(positions.values())).T, radius=1.5)
    survivors = {name for name, f in zip(positions, found) if f}
    assert survivors == {"nodata_footprint", "intrp_one", "suspect", "clean"}


def test_table_schema_ids_and_metadata():
    rng = np.random.default_rng(21)
    x, y = _grid(rng, 90)
    flux = rng.uniform(10, 50, x.size) * FLUX_PER_SNR
    diff, sci, tmpl = make_images(transients=list(zip(x, y, flux)), seed=2)
    t1 = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=60123.5)
    t2 = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=60123.5)
    assert t1.schema.equals(DIA_SOURCE_SCHEMA)
    assert t1.equals(t2)  # deterministic
    df = t1.to_pandas()
    assert len(df) == x.size
    for col in ("diaObjectId", "ssObjectId", "reliability", "extendedness", "trailFlux", "trailNdata"):
        assert t1.column(col).null_count == len(df), col
    ids = df["diaSourceId"].to_numpy()
    assert len(np.unique(ids)) == len(ids) and np.all(np.diff(ids) == 1)
    assert all(unpack(i)[:2] == (VISIT, DETECTOR) for i in ids)
    order = np.lexsort((df["x"], df["y"]))
    assert np.array_equal(order, np.arange(len(df)))  # numbered in (y, x) order
    assert (df["visit"] == VISIT).all() and (df["detector"] == DETECTOR).all() and (df["band"] == "g").all()
    assert (df["midpointMjdTai"] == 57000.25).all() and (df["exposureTime"] == 90.0).all()
    assert (df["timeProcessedMjdTai"] == 60123.5).all()
    ra, dec = diff.wcs.all_pix2world(df["x"].to_numpy(np.float64), df["y"].to_numpy(np.float64), 0)
    assert np.allclose(df["ra"], ra, atol=1e-6 / 3600) and np.allclose(df["dec"], dec, atol=1e-6 / 3600)
    # Equal x and y errors map to equal RA*cos(Dec) and Dec errors: err * scale.
    assert np.allclose(df["raErr"] * 3600, df["xErr"] * SCALE, rtol=1e-3)
    assert np.allclose(df["decErr"] * 3600, df["yErr"] * SCALE, rtol=1e-3)
    # Shapes in arcsec^2: the PSF's adaptive moments are sigma^2 (+ pixel 1/12), point sources alike.
    psf_m = (SIGMA ** 2 + 1 / 12) * SCALE ** 2
    assert np.allclose(df["ixxPSF"], psf_m, rtol=0.02) and np.allclose(df["iyyPSF"], psf_m, rtol=0.02)
    assert np.allclose(df["ixyPSF"], 0, atol=1e-3)
    good = ~df["shape_flag"]
    assert good.mean() > 0.9
    assert np.median(df["ixx"][good] / df["ixxPSF"][good]) == pytest.approx(1.0, abs=0.05)
    assert (df["bboxSize"] >= 5).all()


def test_empty_and_single_image_inputs():
    diff, sci, tmpl = make_images(shape=(128, 128), seed=4)
    table = detect_dia_sources(diff, sci, tmpl, KEEP_ALL, time_processed_mjd=1.0)
    assert table.num_rows == 0 and table.schema.equals(DIA_SOURCE_SCHEMA)
    diff, sci, tmpl = make_images(shape=(128, 128), transients=[(64.2, 63.7, 30 * FLUX_PER_SNR)], seed=4)
    df = detect_dia_sources(diff, None, None, time_processed_mjd=1.0).to_pandas()
    assert len(df) == 1 and np.isnan(df["scienceFlux"][0]) and np.isnan(df["templateFlux"][0])


def test_image_units_go_through_photocalib():
    diff, sci, tmpl = make_images(shape=(128, 128), transients=[(64.2, 63.7, 30 * FLUX_PER_SNR)], seed=4)
    ref = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    for ex in (diff, sci, tmpl):
        ex.image /= 4.0
        ex.variance /= 16.0
        ex.unit = "adu"
        ex.photo_calib = PhotoCalib(4.0)
    df = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    for col in ("psfFlux", "psfFluxErr", "apFlux", "scienceFlux", "templateFluxErr"):
        assert df[col][0] == pytest.approx(ref[col][0], rel=1e-4), col
    diff.photo_calib = None
    with pytest.raises(ExposureUnitError, match="nJy"):
        detect_dia_sources(diff, sci, tmpl)


def test_bad_inputs_raise():
    diff, sci, tmpl = make_images(shape=(64, 64))
    diff.psf = None
    with pytest.raises(DiaError, match="PSF"):
        detect_dia_sources(diff, sci, tmpl)
    diff, sci, tmpl = make_images(shape=(64, 64))
    small = Exposure.empty((32, 32), sci.visit_info, DETECTOR, unit="nJy", psf=sci.psf)
    with pytest.raises(DiaError, match="shape"):
        detect_dia_sources(diff, small, tmpl)


def test_full_detector():
    """2048x4096 with ~100 sources (its time is measured in benchmarks/bench_diffim.py)."""
    rng = np.random.default_rng(9)
    shape = (4096, 2048)
    n = 100
    x, y = rng.uniform(40, 2008, n), rng.uniform(40, 4056, n)
    flux = rng.uniform(8, 40, n) * FLUX_PER_SNR
    diff, sci, tmpl = make_images(shape=shape, transients=list(zip(x[:70], y[:70], flux[:70])),
                                  vanished=list(zip(x[70:], y[70:], flux[70:])),
                                  dipoles=[(1000.3, 2000.7, 3e4, 1.2, -0.7)], seed=8)
    table = detect_dia_sources(diff, sci, tmpl, NO_FILTER, time_processed_mjd=1.0).to_pandas()
    assert len(table) >= n  # the dipole is one more
    # Every injected source without a neighbour within 15 px (closer ones share a footprint) is
    # found within 1 px, with the right sign.
    separation = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) + np.eye(n) * 1e9
    alone = separation.min(axis=1) > 15
    dist = np.hypot(table["x"].to_numpy()[:, None] - x[None, :], table["y"].to_numpy()[:, None] - y[None, :])
    nearest = dist.argmin(axis=0)
    assert alone.sum() > 90 and (dist.min(axis=0)[alone] < 1.0).all()
    negative = table["isNegative"].to_numpy()[nearest]
    assert negative[70:][alone[70:]].all() and not negative[:70][alone[:70]].any()


def test_config_from_options():
    from apsnake.options import OptionsError, dataclass_from_options

    cfg = dataclass_from_options(DiaConfig, {"threshold": 6.0, "drop_center_any": ["BAD", "SAT"], "apply_filter": False},
                                 "dia")
    assert cfg.threshold == 6.0 and cfg.drop_center_any == ("BAD", "SAT") and not cfg.apply_filter
    assert dataclass_from_options(DiaConfig, None, "dia") == DiaConfig()
    with pytest.raises(OptionsError, match="thresold"):
        dataclass_from_options(DiaConfig, {"thresold": 5}, "dia")
    with pytest.raises(DiaError, match="threshold"):
        dataclass_from_options(DiaConfig, {"threshold": -1}, "dia")


# ---------------------------------------------------------------------------
# Bright negative sources and deblending (issue 11).

def _moffat_stamp(fx, fy, size=25, fwhm=4.0, beta=3.0, sub=4):
    """Pixel-integrated Moffat (DECam-like: beta 3, FWHM 4 px) on a size x size stamp centred
    at (size // 2 + fx, size // 2 + fy), normalised to unit sum over the stamp."""
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    o = (np.arange(sub) + 0.5) / sub - 0.5
    grid = np.arange(size) - size // 2
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    img = sum((1 + ((xx + a - fx) ** 2 + (yy + b - fy) ** 2) / alpha ** 2) ** -beta for a in o for b in o)
    return img / img.sum()


def _add_moffat(img, x, y, flux, size=25):
    ix, iy = round(x), round(y)
    h = size // 2
    img[iy - h:iy + h + 1, ix - h:ix + h + 1] += flux * _moffat_stamp(x - ix, y - iy, size)


def _faded_stars(n=8, remaining=2e5, fade=4e4, nje_per_e=0.5, model_error=0.02, seed=0):
    """Variable stars that faded by ``fade`` nJy, ``remaining`` nJy left in the science image.

    Moffat PSF; the science variance holds the stars' Poisson noise (``nje_per_e`` nJy per
    electron), the difference variance adds the PSF-matching floor (``model_error`` x matched
    template)^2 as diffim's ``model_error`` does. The significance image is then flat over
    ~5x5 px at each star (the noise rises towards the centre as fast as the signal).
    """
    rng = np.random.default_rng(seed)
    shape = (128, 64 * n)
    xs = 32 + 64 * np.arange(n) + rng.uniform(-0.5, 0.5, n)
    ys = 64 + rng.uniform(-0.5, 0.5, n)
    star_s, star_t = np.zeros(shape), np.zeros(shape)
    for x, y in zip(xs, ys):
        _add_moffat(star_s, x, y, remaining)
        _add_moffat(star_t, x, y, remaining + fade)
    var_s = SIG_S ** 2 + nje_per_e * star_s
    var_t = SIG_T ** 2 + 0.05 * nje_per_e * star_t          # a deep template
    sci = star_s + rng.normal(0.0, 1.0, shape) * np.sqrt(var_s)
    tmpl = star_t + rng.normal(0.0, 1.0, shape) * np.sqrt(var_t)
    vi = VisitInfo(visit=VISIT, band="g", mjd_mid_tai=57000.25, exposure_time=90.0)
    psf = PsfModel(components=_moffat_stamp(0.0, 0.0)[None].astype(np.float32), spatial_order=0, fwhm_pixels=4.0)

    def exposure(img, var):
        ex = Exposure.empty(shape, vi, detector=DETECTOR, unit="nJy", wcs=_tan_wcs(shape), psf=psf)
        ex.image[:] = img
        ex.variance[:] = var
        return ex

    diff = exposure(sci - tmpl, var_s + var_t + (model_error * tmpl) ** 2)
    return diff, exposure(sci, var_s), exposure(tmpl, var_t), xs, ys


def test_bright_negative_source_on_a_bright_star_is_found_and_centroided():
    """A star 40,000 nJy fainter than in the template (S/N ~ 35) with 200,000 nJy left: the
    significance is flat at the centre, so a peak taken there lands up to 3 px from the source
    and its refinement on the matched-filtered image failed (centroid_flag, then dropped by
    the filter). Peaks are now maxima of the (negated) matched-filtered image."""
    from apsnake.dia.detect import detect_footprints

    diff, sci, tmpl, xs, ys = _faded_stars()
    df = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()  # default drop and filter
    assert len(df) == len(xs)
    found, i = _match(df, xs, ys, radius=0.5)
    assert found.all()
    r = df.iloc[i]
    assert not r["centroid_flag"].any() and r["isNegative"].all() and not r["isDipole"].any()
    assert np.all(np.hypot(r["x"] - xs, r["y"] - ys) < 0.1)
    assert np.all((r["snr"] > 25) & (r["snr"] < 50))
    assert np.all(np.abs(r["psfFlux"] + 4e4) < 4 * r["psfFluxErr"])
    # The same code on the negated image: the flipped difference gives the same positions.
    sigma = 4.0 / 2.3548
    neg = detect_footprints(diff.image, diff.variance, np.zeros(diff.shape, bool), sigma, DiaConfig())
    pos = detect_footprints(-diff.image, diff.variance, np.zeros(diff.shape, bool), sigma, DiaConfig())
    assert np.array_equal(neg.x, pos.x) and np.array_equal(neg.y, pos.y) and np.array_equal(neg.snr, pos.snr)
    assert np.array_equal(neg.sign, -pos.sign) and neg.is_negative.all() and not pos.is_negative.any()


@pytest.mark.parametrize("sign", [1, -1])
def test_two_sources_in_one_footprint_are_deblended(sign):
    """Two sources 15 px apart whose grown footprints merge: one DiaSource each, at its own
    position and with its own flux; without deblending one of them is lost."""
    truth = [(100.3, 60.6, 150 * FLUX_PER_SNR), (112.4, 69.5, 80 * FLUX_PER_SNR)]
    assert np.hypot(truth[1][0] - truth[0][0], truth[1][1] - truth[0][1]) == pytest.approx(15.0, abs=0.1)
    key = "transients" if sign > 0 else "vanished"
    diff, sci, tmpl = make_images(shape=(128, 256), seed=12, **{key: truth})
    merged = detect_dia_sources(diff, sci, tmpl, DiaConfig(deblend=False), time_processed_mjd=1.0).to_pandas()
    assert len(merged) == 1  # one grown footprint
    df = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    assert len(df) == 2
    tx, ty, tf = (np.array(c) for c in zip(*truth))
    found, i = _match(df, tx, ty, radius=0.5)
    assert found.all() and len(set(i)) == 2
    r = df.iloc[i]
    assert np.all(np.abs(r["x"] - tx) < 4 * r["xErr"]) and np.all(np.abs(r["y"] - ty) < 4 * r["yErr"])
    assert np.all(np.abs(r["psfFlux"] - sign * tf) < 4 * r["psfFluxErr"])
    assert np.allclose(r["snr"], tf / FLUX_PER_SNR, rtol=0.1)
    assert not r["centroid_flag"].any() and not r["dipoleFitAttempted"].any()
    assert (r["isNegative"] == (sign < 0)).all()
    assert r["parentDiaSourceId"].isna().all()  # as Rubin: children only, parent not written
    assert np.array_equal(np.lexsort((df["x"], df["y"])), np.arange(2))  # IDs in (y, x) order
    assert np.all(np.diff(df["diaSourceId"]) == 1)


def test_dipole_stays_one_source_next_to_a_deblended_transient():
    """A dipole (lobes 2 px apart) is one source with isDipole; a transient 14 px away in the
    same grown footprint is a second source, not paired with the dipole."""
    from apsnake.dia.detect import detect_footprints

    dipole = (80.2, 64.3, 3e4, 1.6, -1.2)
    lone = (92.5, 71.4, 60 * FLUX_PER_SNR)
    diff, sci, tmpl = make_images(shape=(128, 192), dipoles=[dipole], transients=[lone], seed=13)
    found = detect_footprints(diff.image, diff.variance, np.zeros(diff.shape, bool), SIGMA, DiaConfig())
    assert found.n_footprints == 1 and found.count == 2
    df = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    assert len(df) == 2
    x, y, flux, dx, dy = dipole
    hit, i = _match(df, [x + dx / 2, lone[0]], [y + dy / 2, lone[1]], radius=0.5)
    assert hit.all()
    d, t = df.iloc[i[0]], df.iloc[i[1]]
    assert d["isDipole"] and d["dipoleMeanFlux"] == pytest.approx(flux, rel=0.05)
    assert d["dipoleLength"] == pytest.approx(np.hypot(dx, dy) * SCALE, abs=0.06)
    assert not t["isDipole"] and not t["dipoleFitAttempted"] and not t["isNegative"]
    assert abs(t["psfFlux"] - lone[2]) < 4 * t["psfFluxErr"]
    # A lone dipole: one source whatever the deblending.
    diff, sci, tmpl = make_images(shape=(128, 128), dipoles=[(64.3, 63.8, 2e4, 2.0, 0.0)], seed=14)
    df = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    assert len(df) == 1 and df["isDipole"][0]


def test_bright_and_trailed_sources_are_not_split():
    """No child from noise: isolated point sources of S/N 20-3000 (both signs) and trails of
    S/N ~110 and 4-10 px are one DiaSource each (a secondary peak must rise 4 noise sigmas
    above its saddle)."""
    rng = np.random.default_rng(31)
    x, y = _grid(rng, 64)
    snr = 10 ** rng.uniform(1.3, 3.5, x.size)
    negative = rng.integers(0, 2, x.size).astype(bool)
    trailed = rng.uniform(0, 1, x.size) < 0.25
    trans, vanished = [], []
    for a, b, s, n, t in zip(x, y, snr, negative, trailed):
        if t:  # a trail: 30 points along 4-10 px at S/N ~110
            length, angle = rng.uniform(4, 10), rng.uniform(0, np.pi)
            u = np.linspace(-0.5, 0.5, 30)
            trans += [(a + v * length * np.cos(angle), b + v * length * np.sin(angle), 110 * FLUX_PER_SNR / 30 * 1.3)
                      for v in u]
        else:
            (vanished if n else trans).append((a, b, s * FLUX_PER_SNR))
    diff, sci, tmpl = make_images(transients=trans, vanished=vanished, seed=32)
    df = detect_dia_sources(diff, sci, tmpl, KEEP_ALL, time_processed_mjd=1.0).to_pandas()
    found, i = _match(df, x, y, radius=2.0)
    assert found.all()
    assert len(df) <= x.size + 1 and len(np.unique(i)) == x.size


def test_deblend_options_are_checked():
    with pytest.raises(DiaError, match="deblend"):
        DiaConfig(deblend_min_separation=-1.0)
    with pytest.raises(DiaError, match="deblend"):
        DiaConfig(deblend_min_prominence=float("nan"))


def test_residual_touching_saturated_pixels_is_not_split():
    """The residual around a saturated star (a footprint touching SAT pixels) stays one source,
    which the centre rule drops; the same two peaks away from saturated pixels are two sources."""
    truth = [(100.3, 60.6, 150 * FLUX_PER_SNR), (112.4, 69.5, -80 * FLUX_PER_SNR)]
    diff, sci, tmpl = make_images(shape=(128, 256), seed=12, transients=[truth[0][:3]],
                                  vanished=[(truth[1][0], truth[1][1], -truth[1][2])])
    free = detect_dia_sources(diff, sci, tmpl, KEEP_ALL, time_processed_mjd=1.0).to_pandas()
    assert len(free) == 2
    sat = diff.bits("SAT")
    diff.mask[58:64, 98:103] |= sat  # the saturated core under the brighter peak
    df = detect_dia_sources(diff, sci, tmpl, KEEP_ALL, time_processed_mjd=1.0).to_pandas()
    assert len(df) == 1
    assert len(detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0)) == 0  # SAT centre: dropped
    split = detect_dia_sources(diff, sci, tmpl, replace(KEEP_ALL, deblend_skip_planes=()), time_processed_mjd=1.0)
    assert len(split) == 2


def test_cosmic_rays_the_calibration_missed_are_filtered_not_point_sources():
    """Single-pixel and two-pixel spikes (cosmic rays left unmasked in the science image) at a
    detection S/N of 5-12 are dropped (``filter_max_peak_excess``); PSF-shaped sources of the
    same S/N are all kept, and without the rule the spikes are detected."""
    rng = np.random.default_rng(21)
    x, y = _grid(rng, 64)
    x, y = np.round(x), np.round(y)  # spikes sit on pixels
    is_cr = np.arange(x.size) % 2 == 0
    snr = rng.uniform(5.5, 12, x.size)
    diff, sci, tmpl = make_images(transients=[(a, b, s * FLUX_PER_SNR) for a, b, s, c in zip(x, y, snr, is_cr) if not c],
                                  seed=5)
    for k in np.flatnonzero(is_cr):
        # A delta's PSF flux is ~2x its flux: this spike is detected at about the drawn S/N.
        flux = 0.5 * snr[k] * FLUX_PER_SNR
        ix, iy = int(x[k]), int(y[k])
        if k % 4 == 0:
            diff.image[iy, ix] += flux
            sci.image[iy, ix] += flux
        else:  # two pixels, diagonal
            for dx in (0, 1):
                diff.image[iy + dx, ix + dx] += flux / 1.6
                sci.image[iy + dx, ix + dx] += flux / 1.6
    default = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    without = detect_dia_sources(diff, sci, tmpl, DiaConfig(filter_max_peak_excess=None),
                                 time_processed_mjd=1.0).to_pandas()
    found_default, _ = _match(default, x, y)
    found_without, _ = _match(without, x, y)
    assert np.array_equal(found_default[~is_cr], found_without[~is_cr]) and found_without[~is_cr].mean() > 0.9
    assert found_without[is_cr].mean() > 0.9
    assert found_default[is_cr].mean() < 0.1, found_default[is_cr].sum()


def test_core_residuals_of_bright_stars_are_filtered_transients_on_them_kept():
    """Bright template stars (200,000 nJy) whose difference holds 2 % of their flux, a PSF-
    matching error (detection S/N ~ 20 in the pixel noise, ~1.4 once 1 % of the template flux
    is in the noise): dropped by ``filter_matching_snr``, found without it. Stars that really
    changed by 15 % (S/N ~ 9 with the matching error) are kept, and so are faint transients on
    empty sky (the rule changes nothing where the template is empty)."""
    rng = np.random.default_rng(22)
    x, y = _grid(rng, 80)
    kind = np.arange(x.size) % 3  # 0: residual of a static star, 1: a star that changed, 2: a transient
    star = 2e5
    base = [(a, b, star) for a, b, k in zip(x, y, kind) if k < 2]
    change = [(a, b, (0.02 if k == 0 else 0.15) * star) for a, b, k in zip(x, y, kind) if k < 2]
    transients = [(a, b, 7 * FLUX_PER_SNR) for a, b, k in zip(x, y, kind) if k == 2]
    diff, sci, tmpl = make_images(static=base, transients=change + transients, seed=6)
    default = detect_dia_sources(diff, sci, tmpl, time_processed_mjd=1.0).to_pandas()
    without = detect_dia_sources(diff, sci, tmpl, DiaConfig(filter_matching_snr=False),
                                 time_processed_mjd=1.0).to_pandas()
    found_default, _ = _match(default, x, y)
    found_without, _ = _match(without, x, y)
    assert found_without[kind == 0].all() and not found_default[kind == 0].any()
    assert found_default[kind == 1].all() and found_default[kind == 2].mean() > 0.9
    assert np.array_equal(found_default[kind == 2], found_without[kind == 2])


def test_science_and_template_as_memory_maps_give_the_same_table(tmp_path):
    """The detectDiaSources job opens the calexp and the matched template as memory maps (only
    the pixels at the sources are read, in the file's byte order): the table is the one from
    planes read whole."""
    from apsnake.exposure import read_exposure, write_exposure

    rng = np.random.default_rng(4)
    x, y = _grid(rng, 150)
    flux = 10 ** rng.uniform(4.0, 4.8, x.size)
    diff, sci, tmpl = make_images(dipoles=[(x[0], y[0], flux[0], 1.5, 0.5)], static=list(zip(x[1:4], y[1:4], flux[1:4])),
                                  transients=list(zip(x[4:], y[4:], flux[4:])), seed=12)
    sci.mask[int(y[5]), int(x[5])] |= sci.mask_bit("SAT")
    paths = {}
    for name, exp in (("science", sci), ("template", tmpl)):
        paths[name] = tmp_path / f"{name}.fits"
        write_exposure(exp, paths[name])
    whole = detect_dia_sources(diff, read_exposure(paths["science"]), read_exposure(paths["template"]),
                               time_processed_mjd=1.0).to_pandas()
    mapped_sci = read_exposure(paths["science"], memmap=True)
    assert not mapped_sci.image.dtype.isnative
    mapped = detect_dia_sources(diff, mapped_sci, read_exposure(paths["template"], memmap=True),
                                time_processed_mjd=1.0).to_pandas()
    assert len(whole) >= x.size - 4 and whole["isDipole"].any()  # the static stars cancel
    pd.testing.assert_frame_equal(whole, mapped)
