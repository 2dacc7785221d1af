"""Fake injection (apsnake.fakes) on synthetic calexp / template / difference images.

The images are built as in test_dia.py: science S and PSF-matched template T share one pixel
grid, Gaussian PSF (sigma 1.7 px) and TAN WCS; the difference is D = S - T with variance
var(S) + var(T) and the same PSF (a matched difference of identical PSFs).
"""

import numpy as np
import pandas as pd
import pytest

from apsnake import schema
from apsnake.diffim import skipped_difference
from apsnake.fakes import FakesConfig, FakesError, fake_data_id_selected, run_fakes, select_fake_data_ids
from apsnake.fakes.inject import expected_snr_sigma
from apsnake.options import dataclass_from_options
from apsnake.photometry import ApertureCorrection

from test_dia import SIG_D, make_images

SHAPE = (512, 1024)
APCORR = 1.04
COLUMNS = ("fakeId visit detector band midpointMjdTai x y ra dec injectedFlux injectedMag expectedSnr onHost "
           "recovered diaSourceId psfFlux psfFluxErr separation").split()


def _with_apcorr(exposure, value=APCORR):
    exposure.metadata.update(ApertureCorrection(np.array([value, 0.0, 0.0]), 0.0, 0.0, 1.0, 0.0, 0).to_metadata())
    return exposure


def _images(seed=0, transients=(), noiseless=False):
    diff, sci, tmpl = make_images(shape=SHAPE, transients=transients, seed=seed)
    if noiseless:
        for ex in (diff, sci, tmpl):
            ex.image[:] = 0
    return diff, _with_apcorr(sci), tmpl


def _run(config, seed=0, src=None, **kwargs):
    diff, sci, tmpl = _images(seed, **kwargs)
    return run_fakes(sci, diff, tmpl, src, config, time_processed_mjd=60000.0)


@pytest.fixture(scope="module")
def bright_runs():
    """Four images with 40 fakes each at expected S/N 10-30."""
    cfg = FakesConfig(n_per_ccd=40, snr_min=10, snr_max=30)
    return [_run(FakesConfig(**{**cfg.__dict__, "seed": s}), seed=s).table.to_pandas() for s in range(4)]


def test_table_has_the_fake_schema():
    result = _run(FakesConfig(n_per_ccd=10))
    assert result.table.schema == schema.arrow_schema("Fake")
    assert result.table.column_names == COLUMNS
    df = result.table.to_pandas()
    assert len(df) == 10 and (df["visit"] == 411371).all() and (df["detector"] == 56).all()
    assert (df["band"] == "g").all() and (df["midpointMjdTai"] == 57000.25).all()
    assert df["fakeId"].is_unique
    assert np.allclose(df["injectedMag"], -2.5 * np.log10(df["injectedFlux"]) + 31.4)
    # ra/dec from the WCS at the injected pixel position
    ra, dec = result.difference.wcs.all_pix2world(df["x"], df["y"], 0)
    assert np.allclose(df["ra"], ra) and np.allclose(df["dec"], dec)
    missed = ~df["recovered"]
    assert df.loc[missed, ["diaSourceId", "psfFlux", "psfFluxErr", "separation"]].isna().all().all()


def test_noiseless_injection_is_measured_back_exactly():
    """Without noise the PSF fit returns the injected flux (aperture correction included), on the
    difference image and, as scienceFlux, on the calexp. (Without noise a centroid gains no flux,
    so the correction for that gain, ``debias_centroid_flux``, is off here.)"""
    from apsnake.dia import DiaConfig

    diff, sci, tmpl = _images(noiseless=True)
    result = run_fakes(sci, diff, tmpl, None, FakesConfig(n_per_ccd=30, snr_min=10, snr_max=30),
                       DiaConfig(debias_centroid_flux=False), time_processed_mjd=1.0)
    df = result.table.to_pandas()
    assert df["recovered"].all()
    assert np.allclose(df["psfFlux"], df["injectedFlux"], rtol=1e-4)
    assert (df["separation"] < 0.05).all()
    src = result.dia_sources.to_pandas().set_index("diaSourceId").loc[df["diaSourceId"]]
    assert np.allclose(src["scienceFlux"], df["injectedFlux"].to_numpy(), rtol=1e-4)
    # the inputs are untouched
    assert not diff.image.any() and not sci.image.any() and "INJECTED" not in diff.mask_planes


def test_injected_flux_is_measured_back_within_errors(bright_runs):
    df = pd.concat(bright_runs)
    assert df["recovered"].all()
    pull = (df["psfFlux"] - df["injectedFlux"]) / df["psfFluxErr"]
    assert abs(pull.mean()) < 0.2 and 0.8 < pull.std() < 1.25


def test_expected_snr_agrees_with_the_measured_snr(bright_runs):
    df = pd.concat(bright_runs)
    measured = df["psfFlux"] / df["psfFluxErr"]
    assert np.median(measured / df["expectedSnr"]) == pytest.approx(1.0, abs=0.05)
    assert ((df["expectedSnr"] >= 10) & (df["expectedSnr"] <= 30)).all()
    # on flat noise the expected S/N is flux / (sigma_D sqrt(4 pi) sigma_PSF) (Gaussian PSF)
    ratio = df["injectedFlux"] / APCORR / df["expectedSnr"] / (SIG_D * np.sqrt(4 * np.pi) * 1.7)
    assert np.allclose(ratio, 1.0, rtol=0.02)


def test_expected_snr_follows_the_variance():
    diff, _, _ = _images()
    diff.variance[:, 512:] *= 4.0
    sigma = expected_snr_sigma(diff, np.array([200.0, 800.0]), np.array([256.0, 256.0]))
    assert sigma[1] / sigma[0] == pytest.approx(2.0, rel=1e-3)


def test_injected_plane_and_flags():
    # A real transient, far from the fakes (a bright src star there keeps them away).
    star = (700.3, 300.6, 30 * SIG_D * np.sqrt(4 * np.pi) * 1.7)
    src = pd.DataFrame({"x": [star[0]], "y": [star[1]], "ixx": [2.9], "iyy": [2.9], "snr": [200.0],
                        "psfFlux": [star[2]], "apFlux": [star[2]], "apFluxErr": [30.0]})
    result = _run(FakesConfig(n_per_ccd=40, snr_min=8, snr_max=30), src=src, transients=[star])
    df = result.table.to_pandas()
    for ex in (result.difference, result.science):
        injected = ex.mask_of("INJECTED")
        assert injected[np.floor(df["y"] + 0.5).astype(int), np.floor(df["x"] + 0.5).astype(int)].all()
        # footprints are compact: 3x3 at least, a few FWHM across at most
        assert 9 * len(df) <= injected.sum() <= 200 * len(df)
    sources = result.dia_sources.to_pandas()
    ids = set(df.loc[df["recovered"], "diaSourceId"])
    assert len(ids) == df["recovered"].sum() > 30
    assert sources.loc[sources["diaSourceId"].isin(ids), "pixelFlags_injectedCenter"].all()
    real = sources[np.hypot(sources["x"] - star[0], sources["y"] - star[1]) < 2]
    assert len(real) == 1 and not real["pixelFlags_injectedCenter"].iloc[0] and not real["pixelFlags_injected"].iloc[0]
    assert real["diaSourceId"].iloc[0] not in ids
    assert (np.hypot(df["x"] - star[0], df["y"] - star[1]) >= 25).all()


def test_positions_avoid_edges_and_masked_pixels_and_keep_apart():
    diff, sci, tmpl = _images()
    diff.set_mask("BAD", np.s_[:, 300:310])
    diff.set_mask("NO_DATA", np.s_[:200, 600:])
    diff.set_mask("SAT", np.s_[400:420, 100:140])
    cfg = FakesConfig(n_per_ccd=80, edge_margin=30, min_separation=25)
    df = run_fakes(sci, diff, tmpl, None, cfg, time_processed_mjd=1.0).table.to_pandas()
    assert len(df) == 80
    ny, nx = SHAPE
    assert ((df["x"] > 30) & (df["x"] < nx - 1 - 30) & (df["y"] > 30) & (df["y"] < ny - 1 - 30)).all()
    bad = diff.mask_of("BAD", "NO_DATA", "SAT", "EDGE")
    ix, iy = np.floor(df["x"] + 0.5).astype(int), np.floor(df["y"] + 0.5).astype(int)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            assert not bad[iy + dy, ix + dx].any()
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    assert d[np.triu_indices(len(df), 1)].min() >= 25
    # sub-pixel positions, spread over the good area
    assert np.ptp(df["x"] % 1) > 0.5 and df["x"].min() < 200 and df["x"].max() > 800


def test_hosts_are_extended_src_sources():
    rng = np.random.default_rng(5)
    n_gal, n_star = 30, 40
    gx, gy = rng.uniform(60, 960, n_gal), rng.uniform(60, 450, n_gal)
    sx, sy = rng.uniform(60, 960, n_star), rng.uniform(60, 450, n_star)
    src = pd.DataFrame({
        "x": np.r_[gx, sx], "y": np.r_[gy, sy],
        "ixx": np.r_[np.full(n_gal, 16.0), np.full(n_star, 2.9)],
        "iyy": np.r_[np.full(n_gal, 9.0), np.full(n_star, 2.9)],
        "snr": np.r_[np.full(n_gal, 40.0), np.full(n_star, 60.0)],
        "psfFlux": np.full(n_gal + n_star, 1000.0), "apFlux": np.r_[np.full(n_gal, 1400.0), np.full(n_star, 1010.0)],
        "apFluxErr": np.full(n_gal + n_star, 30.0),
    })
    df = _run(FakesConfig(n_per_ccd=40, host_fraction=0.25, min_separation=10), src=src).table.to_pandas()
    hosts = df[df["onHost"]]
    assert len(hosts) == 10
    dist = np.hypot(hosts["x"].to_numpy()[:, None] - gx[None], hosts["y"].to_numpy()[:, None] - gy[None]).min(axis=1)
    assert (dist <= np.sqrt(12.5) + 1e-9).all()  # within the galaxy's size sqrt((ixx + iyy) / 2)
    others = df[~df["onHost"]]
    far = np.hypot(others["x"].to_numpy()[:, None] - gx[None], others["y"].to_numpy()[:, None] - gy[None]).min(axis=1)
    assert np.median(far) > 5


def test_deterministic_for_a_seed():
    a = _run(FakesConfig(n_per_ccd=20, seed=3)).table
    b = _run(FakesConfig(n_per_ccd=20, seed=3)).table
    c = _run(FakesConfig(n_per_ccd=20, seed=4)).table
    assert a.equals(b)
    assert not np.allclose(a.column("x").to_numpy(), c.column("x").to_numpy())


def test_bright_fakes_are_all_recovered_and_faint_ones_mostly_not():
    bright = pd.concat([_run(FakesConfig(n_per_ccd=40, snr_min=30, snr_max=30, seed=s), seed=s).table.to_pandas()
                        for s in range(2)])
    assert bright["recovered"].all() and (bright["separation"] < 1.0).all()
    faint = pd.concat([_run(FakesConfig(n_per_ccd=40, snr_min=3, snr_max=3, seed=s), seed=s).table.to_pandas()
                       for s in range(2)])
    assert faint["recovered"].mean() < 0.15


def test_fraction_selects_data_ids_deterministically():
    ids = [(v, d) for v in range(400000, 400050) for d in range(1, 63)]
    chosen = select_fake_data_ids(ids, 0.3, seed=1)
    assert 0.26 < len(chosen) / len(ids) < 0.34
    assert chosen == select_fake_data_ids(ids, 0.3, seed=1)
    assert chosen != select_fake_data_ids(ids, 0.3, seed=2)
    # a data ID's choice does not depend on the others
    assert select_fake_data_ids(ids[::-1][:100], 0.3, seed=1) == [i for i in ids[::-1][:100] if i in set(chosen)]
    assert select_fake_data_ids(ids, 0.0) == [] and select_fake_data_ids(ids, 1.0) == ids
    assert set(select_fake_data_ids(ids, 0.1, seed=1)) <= set(chosen)  # nested: a larger fraction adds IDs
    assert fake_data_id_selected(411371, 56, 1.0) and not fake_data_id_selected(411371, 56, 0.0)


def test_skipped_data_id_gives_an_empty_table():
    diff, sci, tmpl = _images()
    for kwargs, difference in (({"diffim_metadata": {"skipped": True, "reason": "few stars"}}, diff),
                               ({}, skipped_difference(sci, "few stars"))):
        result = run_fakes(sci, difference, tmpl, None, FakesConfig(), **kwargs)
        assert result.table.num_rows == 0 and result.table.schema == schema.arrow_schema("Fake")


def test_options():
    cfg = dataclass_from_options(FakesConfig, {"fraction": 0.5, "n_per_ccd": 10, "bad_planes": ["BAD"],
                                               "avoid_star_snr": None}, "fakes")
    assert cfg.fraction == 0.5 and cfg.bad_planes == ("BAD",) and cfg.avoid_star_snr is None
    assert FakesConfig().match_radius == 2.0 and FakesConfig().n_per_ccd == 80
    for bad in ({"fraction": 1.5}, {"snr_min": 5, "snr_max": 3}, {"match_radius": 0}):
        with pytest.raises(FakesError):
            FakesConfig(**bad)


def test_config_yaml_and_schema_match_the_dataclass():
    from dataclasses import asdict
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    section = yaml.safe_load((root / "config.yaml").read_text())["fakes"]
    cfg = dataclass_from_options(FakesConfig, section, "fakes")
    assert cfg == FakesConfig()  # config.yaml states the defaults
    props = yaml.safe_load((root / "config.schema.yaml").read_text())["properties"]["fakes"]["properties"]
    defaults = {k: tuple(v["default"]) if isinstance(v["default"], list) else v["default"] for k, v in props.items()}
    assert defaults == asdict(FakesConfig())
