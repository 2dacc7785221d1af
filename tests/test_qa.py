"""Night QA (apsnake.qa): the night summary, the completeness table and the HTML night report,
on a small synthetic night written to tmp_path (2 visits x 2 CCDs of 96 x 48 pixels)."""

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apsnake.apdb import commit_data_id
from apsnake.exposure import Exposure, PsfModel, VisitInfo, write_exposure
from apsnake.qa import completeness_table, data_id_products, night_summary
from apsnake.qa.metrics import limiting_flux
from apsnake.qa.report import FIGURES, build_report
from apsnake.qa.summary import night_fakes

SHAPE = (96, 48)  # rows, columns
PIXEL_ARCSEC = 0.263
SIGMA = 1.5  # PSF sigma, px
FWHM = 2.3548 * SIGMA
VARIANCE = 400.0  # nJy^2
VISITS = {1001: 60000.10, 1002: 60000.15}
DETECTORS = (25, 32)
SKIPPED = (1002, 32)
SKIP_REASON = "template covers 2% of the CCD (< min_template_coverage 10%)"
TRUE_M50 = 23.5
DIA = {(1001, 25): (3, 1), (1001, 32): (2, 0), (1002, 25): (4, 2), (1002, 32): (0, 0)}  # (positive, negative)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _gaussian_stamp(size=15, sigma=SIGMA):
    y, x = np.mgrid[:size, :size] - (size - 1) / 2.0
    stamp = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return stamp / stamp.sum()


def _wcs(ra=150.0, dec=2.0):
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [SHAPE[1] / 2.0, SHAPE[0] / 2.0]
    wcs.wcs.cdelt = [-PIXEL_ARCSEC / 3600.0, PIXEL_ARCSEC / 3600.0]
    return wcs


def _exposure(visit, detector, mjd, rng, image=None, zp=28.0):
    info = VisitInfo(visit=visit, mjd_mid_tai=mjd, band="g", exposure_time=90.0)
    exp = Exposure.empty(SHAPE, info, detector, unit="nJy")
    exp.image[:] = rng.normal(0, np.sqrt(VARIANCE), SHAPE) if image is None else image
    exp.variance[:] = VARIANCE
    exp.wcs = _wcs()
    exp.psf = PsfModel(components=_gaussian_stamp()[None].astype(np.float32), spatial_order=0,
                       x0=SHAPE[1] / 2, y0=SHAPE[0] / 2, scale=SHAPE[0], fwhm_pixels=FWHM)
    exp.metadata.update({"ZP": zp, "FWHM": FWHM, "ASTRMS": 25.0 + detector / 10, "SKYLEV": 100.0 + visit % 10})
    return exp


def _fakes(visit, detector, mjd, rng, n=300):
    mag = rng.uniform(20.0, 26.0, n)
    recovered = rng.random(n) < 1.0 / (1.0 + np.exp((mag - TRUE_M50) / 0.2))
    flux = 10 ** (-0.4 * (mag - 31.4))
    return pd.DataFrame({
        "fakeId": np.arange(n, dtype=np.int64), "visit": visit, "detector": detector, "band": "g",
        "midpointMjdTai": mjd, "x": rng.uniform(0, SHAPE[1], n), "y": rng.uniform(0, SHAPE[0], n),
        "ra": 150.0, "dec": 2.0, "injectedFlux": flux, "injectedMag": mag,
        "expectedSnr": 5.0 * 10 ** (-0.4 * (mag - TRUE_M50)), "onHost": False, "recovered": recovered,
        "diaSourceId": pd.Series(np.arange(n), dtype="Int64").where(recovered),
        # measured fluxes: 0.5 sigma high, scattered by 1 sigma
        "psfFlux": np.where(recovered, flux + 50.0 * (0.5 + rng.normal(size=n)), np.nan),
        "psfFluxErr": np.where(recovered, 50.0, np.nan),
        "separation": np.where(recovered, 0.3, np.nan),
    })


def _apdb_rows(visit, detector, mjd, n_objects):
    """DiaSources and forced sources of objects 1..n_objects (object k: flux 1000 k nJy)."""
    ids = np.arange(1, n_objects + 1, dtype=np.int64)
    flux = 1000.0 * ids * (1.0 + 0.1 * (visit - 1001))
    common = {"visit": visit, "detector": detector, "midpointMjdTai": mjd, "ra": 150.0 + ids * 1e-4,
              "dec": 2.0, "band": "g", "timeProcessedMjdTai": mjd + 0.01, "psfFlux": flux, "psfFluxErr": 30.0,
              "diaObjectId": ids}
    sources = pd.DataFrame({**common, "diaSourceId": visit * 1000 + detector * 10 + ids, "x": 10.0 + 8 * ids,
                            "y": 40.0, "psfNdata": 100, "dipoleNdata": 0, "bboxSize": 30, "isNegative": False})
    forced = pd.DataFrame({**common, "diaForcedSourceId": visit * 1000 + detector * 10 + ids})
    objects = pd.DataFrame({"diaObjectId": ids, "validityStartMjdTai": mjd, "ra": 150.0 + ids * 1e-4, "dec": 2.0,
                            **{f"{b}_psfFluxNdata": 0 for b in "ugrizy"}, "nDiaSources": 1})
    return {"DiaSource": sources, "DiaForcedSource": forced, "DiaObject": objects}


def make_night(root: Path, fakes=True, dia=True, seed=3):
    """A synthetic outdir: calexp, diffexp (+ JSON), matchedTemplate, diaSrc, fakes, registry
    rejected table and APDB. Returns (data-ID products, rejected table)."""
    rng = np.random.default_rng(seed)
    products = []
    for visit, mjd in VISITS.items():
        for detector in DETECTORS:
            p = data_id_products(root, visit, detector, fakes=fakes and (visit, detector) != (1002, 25))
            write_exposure(_exposure(visit, detector, mjd, rng, zp=28.0 + 0.1 * (visit - 1001)), p.calexp)
            write_exposure(_exposure(visit, detector, mjd, rng), p.diffexp)
            write_exposure(_exposure(visit, detector, mjd, rng), p.matched_template)
            if (visit, detector) == SKIPPED:
                meta = {"skipped": True, "reason": SKIP_REASON}
            else:
                meta = {"skipped": False, "template_coverage": 0.9, "kernel_residual_std": 1.02,
                        "n_kernel_stars": 40 + detector, "kernel_sum": 1.01}
            p.diffexp_json.write_text(json.dumps(meta))
            positive, negative = DIA[(visit, detector)] if dia else (0, 0)
            p.dia_src.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"diaSourceId": np.arange(positive + negative, dtype=np.int64),
                          "isNegative": [False] * positive + [True] * negative}).to_parquet(p.dia_src)
            if p.fakes is not None:
                p.fakes.parent.mkdir(parents=True, exist_ok=True)
                _fakes(visit, detector, mjd, rng).to_parquet(p.fakes)
            tables = _apdb_rows(visit, detector, mjd, 3 if detector == 25 else 0) if dia else {}
            commit_data_id(root, visit, detector, mjd, [1], 9, tables)
            products.append(p)
    rejected = pd.DataFrame({"path": ["/raw/c4d_bad.fits.fz", "/calib/bias.fits"], "kind": ["raw", "calib"],
                             "reason": ["truncated FITS file", "unknown OBSTYPE"]})
    return products, rejected


def _images(text):
    """{data-figure name: decoded PNG bytes} of a report."""
    found = {}
    for name, data in re.findall(r'<img data-figure="([a-z_]+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"',
                                 text):
        found[name] = base64.b64decode(data, validate=True)
    return found


def _decoded(png):
    import matplotlib.image as mpimg

    assert png.startswith(PNG_SIGNATURE)
    pixels = mpimg.imread(io.BytesIO(png), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    return pixels


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """The synthetic night with fakes and DIA sources: (outdir, products, rejected table)."""
    root = tmp_path_factory.mktemp("qa_night")
    products, rejected = make_night(root)
    return root, products, rejected


@pytest.fixture(scope="module")
def report_text(night):
    """The report of the synthetic night with fakes."""
    root, products, rejected = night
    return build_report(products, night_summary(products, rejected), completeness_table(night_fakes(products)),
                        apdb_root=root, fakes_enabled=True)


# ---------------------------------------------------------------------------
def test_limiting_flux_is_the_psf_weighted_5_sigma_flux():
    stamp = _gaussian_stamp(41, 2.0)
    flux = limiting_flux(stamp, 100.0)
    # sum P^2 of a unit Gaussian is 1 / (4 pi sigma^2): f5 = 5 sqrt(4 pi sigma^2 V).
    assert flux == pytest.approx(5 * np.sqrt(4 * np.pi * 4.0 * 100.0), rel=1e-3)
    assert limiting_flux(stamp, np.full(stamp.shape, 100.0)) == pytest.approx(flux)
    assert limiting_flux(3 * stamp, 100.0, nsigma=10) == pytest.approx(2 * flux)  # PSF normalised first
    assert np.isnan(limiting_flux(stamp, 0.0 * stamp + np.inf))


def test_night_summary_values(night):
    _, products, rejected = night
    table = night_summary(products, rejected)
    summary = table.to_pandas()
    assert len(summary) == 5  # 4 data IDs + the rejected raw file (not the calibration)
    science = summary[summary["visit"].notna()].set_index(["visit", "detector"])
    assert list(science.index) == [(1001, 25), (1001, 32), (1002, 25), (1002, 32)]
    row = science.loc[(1001, 25)]
    assert row["band"] == "g" and row["midpointMjdTai"] == pytest.approx(60000.10)
    assert row["seeing_arcsec"] == pytest.approx(FWHM * PIXEL_ARCSEC, rel=1e-6)
    assert row["zero_point_mag"] == pytest.approx(28.0) and science.loc[(1002, 25), "zero_point_mag"] == pytest.approx(28.1)
    assert row["sky_level_adu"] == pytest.approx(101.0) and row["astrometry_rms_mas"] == pytest.approx(27.5)
    stamp = _gaussian_stamp()
    expected = -2.5 * np.log10(5.0 / np.sqrt(np.sum(stamp**2) / VARIANCE)) + 31.4
    assert science["limiting_mag"].to_numpy() == pytest.approx(np.full(4, expected), abs=1e-4)
    # m50 from the synthetic fakes (true 23.5); the data ID without fakes has none.
    with_fakes = science.drop(index=(1002, 25))
    assert with_fakes["m50_mag"].to_numpy() == pytest.approx(np.full(3, TRUE_M50), abs=0.2)
    assert (with_fakes["m50_err_mag"] > 0).all() and (with_fakes["m50_err_mag"] < 0.2).all()
    assert (with_fakes["n_fakes"] == 300).all() and (with_fakes["n_fakes_recovered"] > 100).all()
    assert pd.isna(science.loc[(1002, 25), "m50_mag"]) and pd.isna(science.loc[(1002, 25), "n_fakes"])
    assert with_fakes["fake_pull_median"].to_numpy() == pytest.approx(np.full(3, 0.5), abs=0.25)
    assert with_fakes["fake_pull_scatter"].to_numpy() == pytest.approx(np.full(3, 1.0), abs=0.25)
    assert pd.isna(science.loc[(1002, 25), "fake_pull_median"])
    for key, (positive, negative) in DIA.items():
        assert science.loc[key, ["n_dia_sources", "n_dia_positive", "n_dia_negative"]].tolist() == \
            [positive + negative, positive, negative]
    assert science.loc[(1001, 32), "n_kernel_stars"] == 72 and row["kernel_residual_std"] == pytest.approx(1.02)
    assert science["skipped"].tolist() == [False, False, False, True]
    assert science.loc[SKIPPED, "skip_reason"] == SKIP_REASON and pd.isna(row["skip_reason"])
    assert pd.isna(science.loc[SKIPPED, "kernel_sum"])
    bad = summary[summary["visit"].isna()].iloc[0]
    assert bad["skipped"] and bad["skip_reason"] == "rejected at ingest: c4d_bad.fits.fz: truncated FITS file"
    units = {f.name: f.metadata[b"unit"].decode() for f in table.schema}
    assert units["seeing_arcsec"] == "arcsec" and units["midpointMjdTai"] == "d" and units["limiting_mag"] == "mag"


def test_completeness_per_visit_and_night(night):
    _, products, _ = night
    fakes = night_fakes(products)
    table = completeness_table(fakes).to_pandas()
    assert set(table["scope"]) == {"visit", "night"} and set(table["variable"]) == {"injectedMag", "expectedSnr"}
    assert set(table["visit"].dropna()) == {1001, 1002}
    for (scope, visit, variable), group in table.groupby(["scope", "visit", "variable"], dropna=False):
        chosen = fakes if scope == "night" else fakes[fakes["visit"] == visit]
        assert group["n"].sum() == len(chosen) and group["k"].sum() == chosen["recovered"].sum()
        full = group[group["n"] > 0]
        assert ((full["err_lo"] <= full["fraction"]) & (full["fraction"] <= full["err_hi"])).all()
    bright = table[(table["scope"] == "night") & (table["variable"] == "injectedMag") & (table["hi"] <= 22.5)]
    assert (bright["fraction"] > 0.9).all()
    night = table[table["scope"] == "night"]
    assert night["m50_mag"].iloc[0] == pytest.approx(TRUE_M50, abs=0.1) and night["m50_err_mag"].iloc[0] < 0.1
    assert completeness_table(None).num_rows == 0


def test_report_holds_every_figure_as_a_decodable_png(report_text):
    text = report_text
    images = _images(text)
    assert list(images) == list(FIGURES)
    for png in images.values():
        _decoded(png)
    # Self-contained: no external scripts, styles or images.
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)
    assert "<script" not in text and "<link" not in text
    assert html.escape(SKIP_REASON) in text and "truncated FITS file" in text
    assert "Night m50 = 23." in text


def test_report_without_fakes_and_without_dia_sources(tmp_path):
    products, rejected = make_night(tmp_path, fakes=False, dia=False)
    summary = night_summary(products, rejected).to_pandas()
    assert summary["m50_mag"].isna().all() and summary["n_fakes"].isna().all()
    assert (summary["n_dia_sources"].dropna() == 0).all()
    text = build_report(products, summary, completeness_table(night_fakes(products)), apdb_root=tmp_path)
    images = _images(text)
    assert list(images) == ["qa_vs_time", "focal_plane", "thumbnails"]
    for png in images.values():
        _decoded(png)
    assert "No fakes in this night" in text and "No new DiaObjects" in text and "no light curves" in text
    # No APDB at all (association never ran): still a report.
    shutil.rmtree(tmp_path / "apdb")
    shutil.rmtree(tmp_path / "apdb_marker")
    text = build_report(products, summary, None, apdb_root=tmp_path)
    assert list(_images(text)) == ["qa_vs_time", "focal_plane", "thumbnails"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium(report_text, tmp_path):
    """Headless Chromium loads the page: its screenshot is not blank and its DOM holds every
    figure as an image with a PNG data URI."""
    import matplotlib.image as mpimg

    page = tmp_path / "report.html"
    page.write_text(report_text)
    shot = tmp_path / "shot.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.05 and (pixels.mean(axis=2) < 0.5).mean() > 0.01  # drawn, not a blank page
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    images = _images(dom)
    assert list(images) == list(FIGURES)
    for png in images.values():
        _decoded(png)


def test_report_cutouts_open_each_image_once_per_version(tmp_path, monkeypatch):
    """The gallery takes several cutouts from each image: one open (headers, WCS) per file,
    again only when the file has been rewritten."""
    import os

    from apsnake.qa import images

    path = tmp_path / "diffexp.fits"
    exp = Exposure.empty((60, 50), VisitInfo(visit=1, band="g"), detector=1)
    exp.image[:] = np.arange(50, dtype=np.float32)
    write_exposure(exp, path)
    opened = []
    real = images.read_exposure
    monkeypatch.setattr(images, "read_exposure", lambda p, **kw: opened.append(p) or real(p, **kw))
    first = images.cutout(path, 10, 20, half=3)
    images.cutout(path, 30, 40, half=3)
    assert len(opened) == 1 and np.array_equal(first[3], np.arange(7, 14, dtype=float))
    exp.image[:] = 1.0
    write_exposure(exp, path)
    os.utime(path, ns=(1, 1))  # a new version even within the file system's time resolution
    assert np.all(images.cutout(path, 10, 20, half=3) == 1.0) and len(opened) == 2
