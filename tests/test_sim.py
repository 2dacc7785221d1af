"""The simulator writes real-format DECam raws whose pixels carry the documented truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from apsnake.instruments import decam, decam_files
from apsnake.sim import PRESETS
from apsnake.sim.night import build_night, simulate_ccd
from apsnake.sim.signature import make_ccd_signature


# ---------------------------------------------------------------------------
# helpers
def _out(night) -> Path:
    return Path(night["outdir"])


def _truth(night, name) -> pd.DataFrame:
    return pd.read_parquet(_out(night) / night["truth"][name])


def _visit_rows(night) -> pd.DataFrame:
    return _truth(night, "visits").set_index("visit")


def _overscan_subtracted(raw: decam_files.RawCcd) -> np.ndarray:
    """Raw frame (float) with each amp's per-row serial-overscan median removed from its columns."""
    img = raw.data.astype(np.float64)
    for geo in decam.amp_geometry(raw.header).values():
        med = np.median(img[geo.serial_overscan.slices], axis=1)
        rows = geo.serial_overscan.slices[0]
        img[rows, geo.data.x0:geo.data.x1] -= med[:, None]
    return img


def _corrected_wcs(header, visit_row):
    """Header WCS with CRVAL moved by the truth pointing error (true minus header)."""
    h = header.copy()
    dec0 = h["CRVAL2"]
    h["CRVAL2"] = dec0 + visit_row["pointing_ddec_arcsec"] / 3600.0
    h["CRVAL1"] = h["CRVAL1"] + visit_row["pointing_dra_arcsec"] / 3600.0 / math.cos(math.radians(dec0))
    return decam.raw_wcs(h)


def _centroid(img, x, y, sigma, half=10, iterations=8):
    """Gaussian-windowed centroid (0-based pixels) with an annulus background."""
    iy, ix = int(round(y)), int(round(x))
    big = img[iy - 3 * half:iy + 3 * half + 1, ix - 3 * half:ix + 3 * half + 1]
    yy, xx = np.mgrid[-3 * half:3 * half + 1, -3 * half:3 * half + 1]
    ring = (np.hypot(xx, yy) > 2 * half) & (np.hypot(xx, yy) < 3 * half)
    bg = np.median(big[ring])
    for _ in range(iterations):
        iy, ix = int(round(y)), int(round(x))
        cut = img[iy - half:iy + half + 1, ix - half:ix + half + 1] - bg
        gy, gx = np.mgrid[iy - half:iy + half + 1, ix - half:ix + half + 1]
        w = np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * sigma**2)) * cut
        x, y = float((w * gx).sum() / w.sum()), float((w * gy).sum() / w.sum())
    return x, y


def _sources_near(ra, dec, all_ra, all_dec, radius_arcsec):
    """Number of catalogue positions within ``radius_arcsec`` of each (ra, dec) (itself included)."""
    from scipy.spatial import cKDTree

    c = math.cos(math.radians(np.mean(dec)))
    tree = cKDTree(np.column_stack([np.asarray(all_ra) * c, all_dec]))
    hits = tree.query_ball_point(np.column_stack([np.asarray(ra) * c, dec]), radius_arcsec / 3600.0)
    return np.array([len(v) for v in hits])


def _brightest_star_on_ccd(night, raw, visit_row):
    """(x, y) raw-frame position and truth row of the brightest star on this CCD and visit."""
    stars = _truth(night, "stars")
    wcs = _corrected_wcs(raw.header, visit_row)
    ox, oy = decam.trimmed_offset(raw.ccdnum)
    ny, nx = decam.TRIMMED_SHAPE
    bright = stars[stars["g_mag"] < 13.0]
    x, y = wcs.all_world2pix(bright["ra"].to_numpy(), bright["dec"].to_numpy(), 0)
    on = (x > ox + 60) & (x < ox + nx - 60) & (y > oy + 120) & (y < oy + ny - 120)
    if not on.any():
        return None
    k = np.argmin(np.where(on, bright["g_mag"].to_numpy(), np.inf))
    return float(x[k]), float(y[k]), bright.iloc[k]


# ---------------------------------------------------------------------------
# files and headers
def test_summary_and_products_exist(sim_test_night):
    out = _out(sim_test_night)
    summary = json.loads((out / "sim_summary.json").read_text())
    assert summary["preset"] == "test" and summary["ccds"] == [25, 32]
    assert summary["template_visits"] == [411371, 411372] and summary["science_visits"] == [419802, 419803]
    for rel in summary["raw"] + [p for paths in summary["calib"].values() for p in paths] + [summary["refcat"]]:
        assert (out / rel).is_file(), rel
    for rel in summary["truth"].values():
        assert (out / rel).is_file(), rel
    assert not list(out.rglob(".tmp-*")), "temporary files left behind"
    assert sorted(p.name for p in (out / "raw").iterdir()) == [
        "c4d_150217_043107_ori.fits.fz", "c4d_150217_043308_ori.fits.fz",
        "c4d_150317_021243_ori.fits.fz", "c4d_150317_023245_ori.fits.fz"]


def test_raw_file_has_the_real_layout(sim_test_night):
    out = _out(sim_test_night)
    path = out / sim_test_night["raw"][0]
    with fits.open(path, disable_image_compression=True) as hdul:
        prim = hdul[0].header
        assert prim["NEXTEND"] == len(hdul) - 1 == 2
        assert prim["PROCTYPE"] == "RAW" and prim["PRODTYPE"] == "image" and prim["OBSTYPE"] == "object"
        assert prim["INSTRUME"] == "DECam" and prim["OBS-LONG"] == pytest.approx(70.81489)
        assert prim["FILTER"] == "g DECam SDSS c0001 4720.0 1520.0"
        assert prim["FILENAME"] == "DECam_00411371.fits" and prim["EXPNUM"] == 411371
        assert prim["TIMESYS"] == "UTC" and prim["DATE-OBS"].startswith("2015-02-17T04:31:07")
        for key in ("TELESCOP", "OBSERVAT", "OBS-LAT", "OBS-ELEV", "EXPTIME", "EXPREQ", "DARKTIME", "TIME-OBS",
                    "MJD-OBS", "OBSID", "TELRA", "TELDEC", "RA", "DEC", "HA", "ZD", "AZ", "AIRMASS", "TELEQUIN",
                    "RADESYS", "OBJECT", "PROPID", "EXCLUDED", "DTUTC"):
            assert key in prim, key
        assert ":" in prim["TELRA"] and ":" in prim["TELDEC"]
        ccdnums = []
        for hdu in hdul[1:]:
            h = hdu.header
            assert h["XTENSION"] == "BINTABLE" and h["ZIMAGE"] is True
            assert h["ZCMPTYPE"] == "RICE_1" and h["ZTILE1"] == 2160 and h["ZTILE2"] == 1
            assert h["ZBITPIX"] == 16 and h["BZERO"] == 32768
            assert (h["ZNAXIS1"], h["ZNAXIS2"]) == (2160, 4146)
            assert h["EXTNAME"] == h["DETPOS"] == decam.ccd_info(h["CCDNUM"]).name
            assert h["CTYPE1"] == "RA---TPV" and h["PV1_1"] == 1.0 and h["PV2_1"] == 1.0
            assert h["CD1_2"] == pytest.approx(7.285e-5, rel=1e-3) and h["CD2_1"] == pytest.approx(-7.285e-5, rel=1e-3)
            for key, value in decam.raw_section_keywords(h["CCDNUM"]).items():
                assert h[key] == value, key
            for key in ("GAINA", "GAINB", "RDNOISEA", "RDNOISEB", "SATURATA", "SATURATB"):
                assert key in h
            # SISPI defaults, deliberately not the camera table
            assert h["GAINA"] != decam.ccd_info(h["CCDNUM"]).amps["A"].gain
            ccdnums.append(h["CCDNUM"])
    # usual SISPI order: S1 (HDU 1) before N1 (HDU 4)
    assert ccdnums == [25, 32]

    s1 = decam_files.read_raw_ccd(path, 25)
    n1 = decam_files.read_raw_ccd(path, 32)
    for raw in (s1, n1):
        assert raw.data.dtype == np.uint16 and raw.data.shape == (4146, 2160)
    s_geo, n_geo = decam.amp_geometry(s1.header), decam.amp_geometry(n1.header)
    assert s_geo["A"].data.x0 == 1080 and s_geo["A"].data.y0 == 50  # S: amp A on the right, overscan rows at bottom
    assert n_geo["A"].data.x0 == 56 and n_geo["A"].data.y0 == 0  # N: amp A on the left


def test_primary_header_translates_to_the_truth(sim_test_night):
    out = _out(sim_test_night)
    visits = _visit_rows(sim_test_night)
    for rel in sim_test_night["raw"]:
        prim = fits.getheader(out / rel, 0)
        info = decam.translate_header(prim)
        row = visits.loc[info.visit]
        assert info.observation_type == "science" and info.band == "g"
        assert info.mjd_mid_tai == pytest.approx(row["mjd_mid_tai"], abs=1e-7)
        assert info.boresight_ra == pytest.approx(row["tel_ra"], abs=0.2 / 3600)
        assert info.boresight_dec == pytest.approx(row["tel_dec"], abs=0.2 / 3600)
        assert info.airmass == pytest.approx(row["airmass"], abs=0.01)
        assert info.observatory_longitude == pytest.approx(-70.81489)


def test_calibrations(sim_test_night):
    out = _out(sim_test_night)
    calib = sim_test_night["calib"]
    assert len(calib["bias"]) == len(calib["flat"]) == 2 and len(calib["bpm"]) == 1
    for kind, obstype in (("bias", "zero"), ("flat", "dome flat"), ("bpm", "bpm")):
        for rel in calib[kind]:
            with fits.open(out / rel) as hdul:
                assert hdul[0].header["OBSTYPE"] == obstype
                assert hdul[0].header["PROCTYPE"] == "MasterCal" and hdul[0].header["INSTRUME"] == "DECam"
                assert "DATE-OBS" in hdul[0].header and "MJD-OBS" in hdul[0].header
                assert [h.header["CCDNUM"] for h in hdul[1:]] == [25, 32]
                for h in hdul[1:]:
                    assert h.data.shape == (4096, 2048)
                    assert h.header["EXTNAME"] == decam.ccd_info(h.header["CCDNUM"]).name
                    if kind == "flat":
                        assert hdul[0].header["FILTER"].startswith("g DECam")
                        assert np.median(h.data) == pytest.approx(1.0, abs=1e-4)
                        assert 0.003 < np.std(h.data[100:400, 100:400]) < 0.05
                    elif kind == "bias":
                        assert h.data.dtype.kind == "f" and np.abs(np.median(h.data)) < 5 and np.ptp(h.data) < 20
                    else:
                        assert h.data.dtype.kind == "i" and 0 < np.count_nonzero(h.data) < 0.01 * h.data.size


def test_hot_pixels_of_the_bpm_are_visible(sim_test_night):
    out = _out(sim_test_night)
    bpm = fits.getdata(out / sim_test_night["calib"]["bpm"][0], extname="N1")
    raw = decam_files.read_raw_ccd(out / sim_test_night["raw"][2], 32)
    img = _overscan_subtracted(raw)
    ox, oy = decam.trimmed_offset(32)
    hot = np.argwhere(bpm == 4)
    values = img[hot[:, 0] + oy, hot[:, 1] + ox]
    sky = np.median(img[1000:1200, 300:500])
    assert np.median(values) > sky + 20


# ---------------------------------------------------------------------------
# astrometry
def test_stars_sit_where_the_corrected_header_wcs_puts_them(sim_test_night):
    out = _out(sim_test_night)
    stars, galaxies = _truth(sim_test_night, "stars"), _truth(sim_test_night, "galaxies")
    visits = _visit_rows(sim_test_night)
    all_ra = np.concatenate([stars["ra"], galaxies["ra"]])
    all_dec = np.concatenate([stars["dec"], galaxies["dec"]])
    all_mag = np.concatenate([stars["g_mag"], galaxies["g_mag"]])
    for rel, ccd in ((sim_test_night["raw"][0], 25), (sim_test_night["raw"][3], 32)):
        raw = decam_files.read_raw_ccd(out / rel, ccd)
        row = visits.loc[raw.primary_header["EXPNUM"]]
        img = _overscan_subtracted(raw)
        good = _corrected_wcs(raw.header, row)
        nominal = decam.raw_wcs(raw.header)
        sel = stars[(stars["g_mag"] > 17.0) & (stars["g_mag"] < 19.0) & (stars["variable_object_id"] < 0)]
        # isolated: nothing within 2 mag within 8", no star brighter than 15 within 60"
        crowd = _sources_near(sel["ra"], sel["dec"], all_ra[all_mag < 24], all_dec[all_mag < 24], 8.0)
        very_bright = stars[stars["g_mag"] < 15]
        near_bright = _sources_near(sel["ra"], sel["dec"], very_bright["ra"], very_bright["dec"], 60.0)
        sel = sel[(crowd == 1) & (near_bright == 0)]
        x, y = good.all_world2pix(sel["ra"].to_numpy(), sel["dec"].to_numpy(), 0)
        ox, oy = decam.trimmed_offset(ccd)
        inside = (x > ox + 40) & (x < ox + 2048 - 40) & (y > oy + 40) & (y < oy + 4096 - 40)
        x, y = x[inside], y[inside]
        assert len(x) >= 10
        sigma = row["fwhm_arcsec"] / 0.2623 / 2.355
        measured = np.array([_centroid(img, xi, yi, sigma) for xi, yi in zip(x, y)])
        err = np.hypot(measured[:, 0] - x, measured[:, 1] - y)
        assert np.median(err) < 0.15 and np.percentile(err, 80) < 0.3, err
        # the uncorrected header WCS is off by the pointing error (always > 1 arcsec here)
        xn, yn = nominal.all_world2pix(sel["ra"].to_numpy()[inside], sel["dec"].to_numpy()[inside], 0)
        offset_px = math.hypot(row["pointing_dra_arcsec"], row["pointing_ddec_arcsec"]) / 0.2623
        assert offset_px > 1.0
        err_nominal = np.hypot(measured[:, 0] - xn, measured[:, 1] - yn)
        assert np.median(err_nominal) == pytest.approx(offset_px, rel=0.1)


# ---------------------------------------------------------------------------
# instrument signature
def test_overscan_carries_the_per_row_bias(sim_test_night):
    out = _out(sim_test_night)
    bias_rows = _truth(sim_test_night, "bias_rows")
    sig = _truth(sim_test_night, "signature")
    for rel in sim_test_night["raw"][:2]:
        for ccd in (25, 32):
            raw = decam_files.read_raw_ccd(out / rel, ccd)
            visit = raw.primary_header["EXPNUM"]
            levels = []
            for name, geo in decam.amp_geometry(raw.header).items():
                mine = (bias_rows["visit"] == visit) & (bias_rows["detector"] == ccd) & (bias_rows["amp"] == name)
                truth = bias_rows[mine].set_index("raw_row")["bias_adu"].to_numpy()
                rows = geo.serial_overscan.slices[0]
                med = np.median(raw.data[geo.serial_overscan.slices].astype(float), axis=1)
                resid = med - truth[rows]
                assert abs(np.mean(resid)) < 0.3 and np.std(resid) < 0.6
                assert np.corrcoef(med, truth[rows])[0, 1] > 0.9
                assert np.std(np.diff(truth[rows])) > 2.0  # there is row jitter to remove
                # the same rows in the data: overscan subtraction removes the jitter
                data = raw.data[rows, geo.data.x0 + 200:geo.data.x0 + 600].astype(float)
                before = np.std(np.diff(np.median(data, axis=1)))
                after = np.std(np.diff(np.median(data - med[:, None], axis=1)))
                assert after < 0.5 * before
                levels.append(np.mean(truth))
            assert abs(levels[0] - levels[1]) > 1.0
    s = sig[(sig["visit"] == 411371) & (sig["detector"] == 25)].set_index("amp")
    assert s.loc["A", "gain_e_per_adu"] == decam.ccd_info(25).amps["A"].gain
    assert s.loc["A", "gain_e_per_adu"] != s.loc["B", "gain_e_per_adu"]
    assert s.loc["A", "read_noise_e"] == decam.ccd_info(25).amps["A"].read_noise
    assert 1000 <= s.loc["A", "bias_level_adu"] <= 3000 + 20


def test_saturated_stars_bleed_along_columns(sim_test_night):
    out = _out(sim_test_night)
    visits = _visit_rows(sim_test_night)
    found = 0
    for rel in sim_test_night["raw"]:
        for ccd in (25, 32):
            raw = decam_files.read_raw_ccd(out / rel, ccd)
            row = visits.loc[raw.primary_header["EXPNUM"]]
            hit = _brightest_star_on_ccd(sim_test_night, raw, row)
            if hit is None or hit[2]["g_mag"] > 11.8:
                continue
            x, y, star = hit
            geo = decam.amp_geometry(raw.header)
            amp = next(n for n, g in geo.items() if g.data.x0 <= round(x) < g.data.x1)
            sat = raw.header[f"SATURAT{amp}"]
            col = raw.data[:, int(round(x))].astype(float)
            at_sat = col >= sat
            iy = int(round(y))
            assert at_sat[iy]
            up = np.argmin(at_sat[iy:])  # run length above and below the star
            down = np.argmin(at_sat[iy::-1])
            fwhm_px = row["fwhm_arcsec"] / 0.2623
            assert up > 2 * fwhm_px and down > 2 * fwhm_px, (up, down, star["g_mag"])
            # the trail stays in its column: 15 columns away the same rows are not saturated
            side = raw.data[iy - up + 1:iy + down, int(round(x)) + (15 if amp == "B" else -15)]
            assert not np.any(side >= sat)
            found += 1
    assert found >= 2


def test_crosstalk_ghost_at_the_mirrored_position(sim_test_night):
    out = _out(sim_test_night)
    visits = _visit_rows(sim_test_night)
    ratios = []
    for rel in sim_test_night["raw"]:
        for ccd in (25, 32):
            raw = decam_files.read_raw_ccd(out / rel, ccd)
            hit = _brightest_star_on_ccd(sim_test_night, raw, visits.loc[raw.primary_header["EXPNUM"]])
            if hit is None or hit[2]["g_mag"] > 12.0:
                continue
            x, y, _ = hit
            if abs(x - 1079.5) < 120:  # star and ghost would overlap
                continue
            geo = decam.amp_geometry(raw.header)
            src_amp = next(n for n, g in geo.items() if g.data.x0 <= round(x) < g.data.x1)
            vic_amp = "A" if src_amp == "B" else "B"
            coeff = next(t.coefficient for t in decam.crosstalk_sources(ccd)
                         if t.source_ccd == ccd and t.source_amp == src_amp and t.victim_amp == vic_amp)
            img = _overscan_subtracted(raw)
            ix, iy = int(round(x)), int(round(y))
            rows = slice(iy - 60, iy + 61)
            src = img[rows, ix - 30:ix + 31]
            # raw x' = 2159 - x mirrors the data section about the CCD centre line
            vic = img[rows, 2159 - ix - 30:2159 - ix + 31][:, ::-1]
            strong = src > 3000
            bg = np.median(vic[src < 300])  # ghost < 0.3 ADU there
            ratios.append((np.sum(vic[strong] - bg) / np.sum(src[strong])) / coeff)
    assert len(ratios) >= 2
    assert np.median(ratios) == pytest.approx(1.0, abs=0.2), ratios


# ---------------------------------------------------------------------------
# catalogues and truth tables
def test_refcat_columns_and_coverage(sim_test_night):
    out = _out(sim_test_night)
    ref = pd.read_parquet(out / "refcat.parquet")
    for col in ("ra", "dec", "g_mag", "g_magErr", "r_mag", "r_magErr", "i_mag", "i_magErr", "pmra", "pmdec", "epoch"):
        assert col in ref.columns, col
    assert ref["r_mag"].max() < 21.3 and ref["epoch"].eq(2015.5).all()
    stars = _truth(sim_test_night, "stars").set_index("star_id").loc[ref["source_id"]]
    dra = (ref["ra"].to_numpy() - stars["ra"].to_numpy()) * math.cos(math.radians(2.2)) * 3.6e6
    ddec = (ref["dec"].to_numpy() - stars["dec"].to_numpy()) * 3.6e6
    assert 5 < np.std(ddec) < 30 and 5 < np.std(dra) < 30  # ~10 mas scatter
    g_r = stars["g_mag"] - stars["r_mag"]
    assert g_r.between(0.0, 1.6).all()
    # colours follow temperature
    assert np.corrcoef(stars["teff"], g_r)[0, 1] < -0.8
    for rel in sim_test_night["raw"]:
        for ccd in (25, 32):
            header = decam_files.read_raw_ccd(out / rel, ccd).header
            corners = decam.footprint_corners(header, ccd)
            inside = ((ref["ra"] > corners[:, 0].min() + 0.01) & (ref["ra"] < corners[:, 0].max() - 0.01)
                      & (ref["dec"] > corners[:, 1].min() + 0.01) & (ref["dec"] < corners[:, 1].max() - 0.01))
            assert inside.sum() > 100


def test_truth_table_columns(sim_test_night):
    expected = {
        "visits": ["visit", "mjd_mid_tai", "date_obs", "exposure_time", "band", "airmass", "fwhm_arcsec",
                   "sky_e_per_pixel", "zeropoint", "pointing_dra_arcsec", "pointing_ddec_arcsec", "is_template",
                   "psf_beta", "psf_e1", "psf_e2", "psf_halo_fraction", "psf_halo_fwhm_arcsec", "psf_halo_beta"],
        "stars": ["star_id", "ra", "dec", "g_mag", "r_mag", "i_mag", "g_flux_nJy", "r_flux_nJy", "i_flux_nJy"],
        "galaxies": ["galaxy_id", "ra", "dec", "g_mag", "g_flux_nJy", "sersic_n", "r_half_arcsec", "axis_ratio",
                     "pa_deg"],
        "timedomain": ["object_id", "kind", "visit", "ra", "dec", "flux_nJy", "template_flux_nJy", "diff_flux_nJy",
                       "detector", "x", "y"],
        "signature": ["visit", "detector", "amp", "bias_level_adu", "gain_e_per_adu", "read_noise_e", "saturation_adu",
                      "fwhm_arcsec_ccd_centre", "psf_e1_ccd_centre", "psf_e2_ccd_centre",
                      "psf_halo_fraction_ccd_centre"],
        "bias_rows": ["visit", "detector", "amp", "raw_row", "bias_adu"],
    }
    for name, cols in expected.items():
        table = _truth(sim_test_night, name)
        assert set(cols) <= set(table.columns), (name, set(cols) - set(table.columns))
        assert len(table) > 0
    visits = _truth(sim_test_night, "visits")
    tmpl, sci = visits[visits["is_template"]], visits[~visits["is_template"]]
    assert tmpl["fwhm_arcsec"].between(0.8, 1.0).all() and sci["fwhm_arcsec"].between(1.0, 1.6).all()
    assert visits["zeropoint"].between(24.7, 25.0).all() and visits["sky_e_per_pixel"].between(50, 250).all()
    stars = _truth(sim_test_night, "stars")
    np.testing.assert_allclose(31.4 - 2.5 * np.log10(stars["g_flux_nJy"]), stars["g_mag"], atol=1e-9)


def test_time_domain_truth_is_consistent(sim_test_night):
    td = _truth(sim_test_night, "timedomain")
    preset = PRESETS["test"]
    np.testing.assert_allclose(td["diff_flux_nJy"], td["flux_nJy"] - td["template_flux_nJy"])
    tr = td[td["kind"] == "transient"]
    assert (tr["template_flux_nJy"] == 0).all()
    assert (tr.loc[tr["is_template"], "flux_nJy"] == 0).all()
    assert (tr.loc[~tr["is_template"], "flux_nJy"] > 0).all()
    var = td[(td["kind"] == "variable") & ~td["is_template"]]
    assert (var["diff_flux_nJy"] < 0).any() and (var["diff_flux_nJy"] > 0).any()
    assert (var["template_flux_nJy"] > 0).all()
    ast = td[td["kind"] == "asteroid"]
    assert (ast["template_flux_nJy"] == 0).all()
    assert (ast.loc[ast["is_template"], "detector"] == -1).all()
    for _, track in ast[~ast["is_template"]].groupby("object_id"):
        step = np.hypot(np.diff(track["ra"]) * math.cos(math.radians(2.2)), np.diff(track["dec"])) * 3600
        assert (step > 5.0).all()  # 20 min at 0.5-1 arcsec/min
    sci = td[~td["is_template"]]
    on = sci[sci["detector"] >= 0]
    counts = on.groupby(["visit", "kind"]).size().unstack()
    assert (counts["transient"] >= preset.n_transients).all()
    assert (counts["variable"] >= preset.n_variables).all()
    assert (counts["asteroid"] >= preset.n_asteroids).all()
    assert on["x"].between(-0.5, 2047.5).all() and on["y"].between(-0.5, 4095.5).all()
    # difference-image S/N mostly 10-200: |diff| between ~g 19 and 23
    mags = 31.4 - 2.5 * np.log10(np.abs(on.loc[on["kind"] != "asteroid", "diff_flux_nJy"]))
    assert mags.between(18.5, 23.5).mean() > 0.8


def test_transients_are_in_the_science_pixels(sim_test_night):
    out = _out(sim_test_night)
    td = _truth(sim_test_night, "timedomain")
    visits = _visit_rows(sim_test_night)
    rel = sim_test_night["raw"][2]
    visit = int(fits.getheader(out / rel, 0)["EXPNUM"])
    row = visits.loc[visit]
    mine = (td["visit"] == visit) & (td["kind"] == "transient") & (td["detector"] >= 0)
    bright = td[mine & (td["flux_nJy"] > 10 ** (-0.4 * (21.0 - 31.4)))]
    assert len(bright) >= 1
    for det, group in bright.groupby("detector"):
        img = _overscan_subtracted(decam_files.read_raw_ccd(out / rel, int(det)))
        ox, oy = decam.trimmed_offset(int(det))
        sigma = row["fwhm_arcsec"] / 0.2623 / 2.355
        for obj in group.itertuples():
            mx, my = _centroid(img, obj.x + ox, obj.y + oy, sigma, half=6)
            # on a host galaxy the light centroid can be pulled a little
            assert math.hypot(mx - obj.x - ox, my - obj.y - oy) < 1.5


# ---------------------------------------------------------------------------
# reproducibility
def test_same_seed_gives_identical_pixels_in_any_order(sim_test_night):
    """Re-render the last CCD of the last visit alone: bit-identical to the file."""
    out = _out(sim_test_night)
    night = build_night(PRESETS["test"], 1)
    pd.testing.assert_frame_equal(night.stars, _truth(sim_test_night, "stars"))
    visit = night.visits[-1]
    raw_file = decam_files.read_raw_ccd(out / "raw" / visit.filename, 32)
    raw, _, _ = simulate_ccd(night, visit, 32, make_ccd_signature(32, 1))
    assert np.array_equal(raw, raw_file.data)
    other = build_night(PRESETS["test"], 2)
    raw2, _, _ = simulate_ccd(other, other.visits[-1], 32, make_ccd_signature(32, 2))
    assert not np.array_equal(raw2, raw_file.data)


def test_unknown_preset_is_refused(tmp_path):
    from apsnake.sim import simulate_night

    with pytest.raises(ValueError, match="unknown simulation preset"):
        simulate_night(tmp_path, preset="nope")


# ---------------------------------------------------------------------------
# the PSF: measured on rendered stars, not read from its parameters
def _render_star(psf, x=1023.0, y=2047.0, flux=1e7, half=150):
    """Noise-free star of ``flux`` e- rendered at trimmed (x, y) of a full CCD, cut out around
    it (``2 half + 1`` square, star at the centre) and divided by the flux; also the full sum."""
    from apsnake.sim import render

    image = np.zeros(decam.TRIMMED_SHAPE, np.float32)
    render.render_points(image, [x], [y], [flux], psf)
    ix, iy = round(x), round(y)
    return image[iy - half:iy + half + 1, ix - half:ix + half + 1] / flux, float(image.sum(dtype=np.float64)) / flux


def _measured_fwhm(stamp):
    from apsnake.psf import measure_fwhm

    c = stamp.shape[0] // 2
    return float(measure_fwhm(stamp[c - 15:c + 16, c - 15:c + 16]))


def _fraction_beyond(stamp, radius):
    c = stamp.shape[0] // 2
    g = np.arange(stamp.shape[0]) - c
    return float(stamp[np.hypot(g[None, :], g[:, None]) > radius].sum(dtype=np.float64))


def _fit_core_beta(stamp, fwhm):
    """Moffat index of the core from a 2-D fit of core + beta = 2 halo (both pixel-averaged)."""
    from scipy.optimize import least_squares

    c = stamp.shape[0] // 2
    h = int(np.ceil(6 * fwhm))
    cut = stamp[c - h:c + h + 1, c - h:c + h + 1].astype(float)
    g = np.arange(-h, h + 1, dtype=float)

    def model(p):
        amp, alpha, beta, halo_amp, halo_alpha = p
        total = 0.0
        for sx in (-0.25, 0.25):
            for sy in (-0.25, 0.25):
                r2 = (g[None, :] + sx) ** 2 + (g[:, None] + sy) ** 2
                total = total + amp * (1 + r2 / alpha**2) ** -beta + halo_amp * (1 + r2 / halo_alpha**2) ** -2
        return total / 4

    p0 = [cut.max(), fwhm / 1.1, 3.0, cut.max() * 1e-3, 3.0 * fwhm]
    fit = least_squares(lambda p: (model(p) - cut).ravel(), p0,
                        bounds=([0, 0.3, 1.2, 0, 1.5 * fwhm], [np.inf, 50, 10, np.inf, 200]))
    return float(fit.x[2])


def _windowed_ellipticity(stamp, fwhm):
    """(chi1, chi2) of Gaussian-windowed second moments (window sigma = FWHM / 2.355)."""
    from apsnake.psf.measure import windowed_centroid

    c = stamp.shape[0] // 2
    cut = stamp[None, c - 20:c + 21, c - 20:c + 21].astype(float)
    _, _, mxx, myy, mxy, ok = windowed_centroid(cut, np.ones_like(cut, bool), fwhm / 2.355)
    assert ok[0]
    return np.array([mxx[0] - myy[0], 2 * mxy[0]]) / (mxx[0] + myy[0])


def _test_visits():
    from apsnake.sim.observing import make_visit_conditions

    return make_visit_conditions(PRESETS["test"], 1)


def test_halo_puts_its_share_of_the_light_beyond_3_fwhm():
    """A bright isolated star's light beyond 3 FWHM is the core's Moffat wing plus the halo's
    share of it; a visit with a larger halo puts more there."""
    from apsnake.sim import render

    measured, expected = [], []
    for h in (0.02, 0.05):
        psf = render.PsfField(28, 1.0, 3.0, 0.0, 0.0, halo_fraction=h, halo_fwhm_arcsec=4.0)
        stamp, _ = _render_star(psf)
        fwhm_px = psf.fwhm_at(np.array([1023.0]), np.array([2047.0]))[0] / 0.2623
        share = psf.halo_fraction_at(np.array([1023.0]), np.array([2047.0]))[0]
        measured.append(_fraction_beyond(stamp, 3 * fwhm_px))
        core_alpha = render.moffat_alpha(fwhm_px, 3.0)
        expected.append((1 - share) * render.moffat_fraction_outside(3 * fwhm_px, core_alpha, 3.0)
                        + share * render.moffat_fraction_outside(3 * fwhm_px, psf.halo_alpha_px, 2.0))
        # beyond what a beta = 3 core alone puts there (0.93 %), 30-80 % of the local halo share
        assert 0.3 * share < measured[-1] - 0.0093 * (1 - share) < 0.8 * share
    np.testing.assert_allclose(measured, expected, rtol=0.03)
    assert measured[1] - measured[0] > 0.01


def test_every_visit_has_a_halo_that_differs_between_visits():
    """In a simulated night, 1-6 % of a star's light lies beyond 3 (measured) FWHM; the share
    differs between visits, and follows each visit's halo."""
    out = {}
    for v in _test_visits():
        stamp, _ = _render_star(v.psf_field(28))
        out[v.expnum] = _fraction_beyond(stamp, 3 * _measured_fwhm(stamp))
    values = np.array(list(out.values()))
    assert ((values > 0.01) & (values < 0.06)).all(), out
    assert values.max() - values.min() > 0.005, out


def test_core_beta_differs_between_visits():
    visits = sorted(_test_visits(), key=lambda v: v.psf_beta)
    fitted = []
    for v in (visits[0], visits[-1]):
        stamp, _ = _render_star(v.psf_field(28))
        fitted.append(_fit_core_beta(stamp, _measured_fwhm(stamp)))
        assert fitted[-1] == pytest.approx(v.psf_beta, rel=0.05)
    assert 2.4 < fitted[0] and fitted[1] < 4.2 and fitted[1] - fitted[0] > 0.6  # stratified over 2.5-4


def test_rendered_flux_is_conserved_halo_included():
    """A bright star (and a bright galaxy) holds its flux to 0.1 %; a faint star loses under
    2 % (the core's wing below 0.3 e-/pixel) but keeps its whole halo: the light it puts beyond
    40 px is the halo's share of it whatever the star's brightness (cutting halos at a surface
    brightness took most of a faint star's halo away and biased every halo fit)."""
    from apsnake.sim import render

    v = _test_visits()[-1]
    psf = v.psf_field(25)
    bright, total = _render_star(psf, flux=1e7)
    assert total == pytest.approx(1.0, abs=0.001)
    faint, faint_total = _render_star(psf, flux=1e4)
    assert 0.98 < faint_total < 1.0
    share = psf.halo_fraction_at(np.array([1023.0]), np.array([2047.0]))[0]
    # (the stamps of _render_star end 150 px out)
    expected = share * (render.moffat_fraction_outside(40.0, psf.halo_alpha_px, 2.0)
                        - render.moffat_fraction_outside(150.0, psf.halo_alpha_px, 2.0))
    assert _fraction_beyond(faint, 40) == pytest.approx(expected, rel=0.05)
    assert expected < _fraction_beyond(bright, 40) < 1.15 * expected  # plus the core's far wing
    image = np.zeros(decam.TRIMMED_SHAPE, np.float32)
    render.render_galaxies(image, [1023.0], [2047.0], [1e7], [3.0], [1.0], [0.6], [0.4], psf)
    assert image.sum(dtype=np.float64) / 1e7 == pytest.approx(1.0, abs=0.002)


def test_galaxies_get_the_halo_too():
    """The light a galaxy puts beyond 20 px grows with the halo share as a star's does."""
    from apsnake.sim import render

    g = np.arange(decam.TRIMMED_SHAPE[1]) - 1023.0
    r = np.hypot(g[None, :], (np.arange(decam.TRIMMED_SHAPE[0]) - 2047.0)[:, None])
    excess = {}
    for kind in ("star", "galaxy"):
        outer = []
        for h in (0.02, 0.05):
            psf = render.PsfField(28, 1.0, 3.0, 0.0, 0.0, halo_fraction=h, halo_fwhm_arcsec=4.0)
            image = np.zeros(decam.TRIMMED_SHAPE, np.float32)
            if kind == "star":
                render.render_points(image, [1023.0], [2047.0], [1e7], psf)
            else:
                render.render_galaxies(image, [1023.0], [2047.0], [1e7], [2.0], [1.0], [0.7], [0.3], psf)
            outer.append(image[r > 20].sum(dtype=np.float64) / 1e7)
        excess[kind] = outer[1] - outer[0]
    assert excess["star"] > 0.005
    assert excess["galaxy"] == pytest.approx(excess["star"], rel=0.1)


def test_fwhm_and_ellipticity_vary_over_the_focal_plane_as_modelled():
    """Stars at the centre of S4 (r ~ 17 mm) and of N31 (r ~ 196 mm) in the same visit: the
    measured FWHMs differ as the model's do, and the windowed-moment ellipticity follows the
    model's ellipticity (same direction, same response at both places)."""
    v = _test_visits()[1]
    xy = (np.array([1023.0]), np.array([2047.0]))
    fwhm, model_fwhm, chi, e = [], [], [], []
    for ccd in (28, 62):
        psf = v.psf_field(ccd)
        stamp, _ = _render_star(psf)
        fwhm.append(_measured_fwhm(stamp))
        model_fwhm.append(psf.fwhm_at(*xy)[0] / 0.2623)
        chi.append(_windowed_ellipticity(stamp, fwhm[-1]))
        e.append(np.array(psf.ellipticity_at(*xy)).ravel())
    assert model_fwhm[1] / model_fwhm[0] > 1.04  # the model's own difference: a few per cent
    assert fwhm[1] / fwhm[0] == pytest.approx(model_fwhm[1] / model_fwhm[0], rel=0.005)
    response = [np.hypot(*c) / np.hypot(*m) for c, m in zip(chi, e)]
    assert response[0] == pytest.approx(response[1], rel=0.05) and 0.6 < response[0] < 1.0
    for c, m in zip(chi, e):
        angle = 0.5 * np.degrees(np.arctan2(c[1], c[0]) - np.arctan2(m[1], m[0]))
        assert abs((angle + 90) % 180 - 90) < 3
    assert np.hypot(*(e[1] - e[0])) > 0.01  # the two places differ in ellipticity


def test_visit_truth_rebuilds_the_rendered_psf(sim_test_night):
    from apsnake.sim import render

    visits = _truth(sim_test_night, "visits")
    assert visits["psf_beta"].nunique() == len(visits) and visits["psf_beta"].between(2.5, 4.0).all()
    share = visits["psf_halo_fraction"]
    assert share.between(0.02, 0.05).all() and share.nunique() == len(visits)
    assert (visits["psf_halo_fwhm_arcsec"] / visits["fwhm_arcsec"]).between(3.0, 5.0).all()
    conditions = {v.expnum: v for v in _test_visits()}
    for row in visits.itertuples():
        assert render.PsfField.from_truth(32, row._asdict()) == conditions[row.visit].psf_field(32)
    sig = _truth(sim_test_night, "signature")
    assert sig["psf_halo_fraction_ccd_centre"].between(0.015, 0.06).all()


def test_focalplane_preset_is_every_working_ccd():
    preset = PRESETS["focalplane"]
    assert len(preset.ccds) == 60 and set(decam.SCIENCE_CCDNUMS) - set(preset.ccds) == {2, 61}  # S30, N30
    assert all(decam.working_ccdnums(v.start_utc) == preset.ccds for v in preset.visits)
    assert len(preset.templates) == 1 and len(preset.science) == 2
    # the demo's plan: the same exposures, so association links the two science visits
    demo = {v.expnum: v for v in PRESETS["demo"].visits}
    assert all(demo[v.expnum] == v for v in preset.visits)


def test_mef_writer_writes_the_same_bytes_one_extension_at_a_time(tmp_path):
    from apsnake.sim import writer

    rng = np.random.default_rng(5)
    images = {c: rng.normal(0.0, 1.0, decam.TRIMMED_SHAPE).astype(np.float32) for c in (32, 25)}
    header = writer.calib_primary_header("zero", "2015-03-16T20:00:00.000", None, "150316", 2)
    reference = fits.HDUList([fits.PrimaryHDU(header=header.copy())]
                             + [writer.calib_hdu(c, images[c], "adu") for c in sorted(images)])
    reference[0].header["NEXTEND"] = 2
    reference.writeto(tmp_path / "all.fits")
    with writer.MefWriter(tmp_path / "one.fits", header.copy(), 2) as mef:
        for c in sorted(images):
            mef.append(writer.calib_hdu(c, images[c], "adu"))
    assert (tmp_path / "one.fits").read_bytes() == (tmp_path / "all.fits").read_bytes()
    raw = {c: rng.integers(1000, 3000, decam.RAW_SHAPE).astype(np.uint16) for c in (32, 25)}
    headers = {c: fits.Header([("CCDNUM", c), ("DETPOS", decam.ccd_info(c).name)]) for c in raw}
    primary = fits.Header([("EXPNUM", 1)])
    reference = fits.HDUList([fits.PrimaryHDU(header=primary.copy())]
                             + [writer.raw_hdu(headers[c], raw[c]) for c in writer.raw_extension_order(raw)])
    reference[0].header["NEXTEND"] = 2
    reference.writeto(tmp_path / "all.fits.fz")
    with writer.MefWriter(tmp_path / "one.fits.fz", primary.copy(), 2) as mef:
        for c in writer.raw_extension_order(raw):
            mef.append(writer.raw_hdu(headers[c], raw[c]))
    assert (tmp_path / "one.fits.fz").read_bytes() == (tmp_path / "all.fits.fz").read_bytes()
    # an extension short: an error, and no file
    with pytest.raises(ValueError, match="1 extensions written, 2 announced"):
        with writer.MefWriter(tmp_path / "short.fits", header.copy(), 2) as mef:
            mef.append(writer.calib_hdu(25, images[25], "adu"))
    assert not any(p.name.endswith("short.fits") for p in tmp_path.iterdir())


def test_crowded_preset_has_several_times_the_stars():
    from apsnake.sim import sky

    crowded, demo = PRESETS["crowded"], PRESETS["demo"]
    assert crowded.star_density_deg2 >= 5 * demo.star_density_deg2
    region = sky.SkyRegion(150.0, 150.2, -40.1, -39.9)
    n = {p.name: len(sky.make_stars(np.random.default_rng(3), region, p)) for p in (crowded, demo)}
    assert n["crowded"] > 5 * n["demo"]
    # every preset is known to the workflow's config schema and gets the realistic PSF
    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "config.schema.yaml").read_text())
    assert set(schema["properties"]["simulate"]["properties"]["preset"]["enum"]) == set(PRESETS)
    for p in PRESETS.values():
        assert p.psf_beta_range[1] - p.psf_beta_range[0] > 1.0 and p.psf_halo_fraction_range[0] >= 0.02
