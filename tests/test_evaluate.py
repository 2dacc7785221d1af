"""Scoring against the truth (apsnake.sim.evaluate): false-detection classes, completeness of
positive and negative sources on good pixels, S/N at 50% completeness, on small synthetic
tables (issue 11)."""

import json

import numpy as np
import pandas as pd
import pytest

from apsnake.sim import evaluate as ev
from apsnake.sim import sites


def _stars(rows):
    """Truth stars from (x_arcsec, y_arcsec, g_mag[, variable_object_id]) in the tangent plane."""
    rows = [tuple(r) + (-1,) * (4 - len(r)) for r in rows]
    return pd.DataFrame(rows, columns=["x", "y", "g_mag", "variable_object_id"])


def _galaxies(rows):
    """Truth galaxies from (x, y, r_half_arcsec, axis_ratio, pa_deg)."""
    return pd.DataFrame(rows, columns=["x", "y", "r_half_arcsec", "axis_ratio", "pa_deg"])


def _xy(frame):
    return frame[["x", "y"]].to_numpy(float).reshape(-1, 2)


# --------------------------------------------------------------------------------------
# False-detection classes


def test_star_radius_grows_with_brightness_and_is_clipped():
    r = sites.star_radius_arcsec([10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 25.0])
    assert r[3] == pytest.approx(10.0)
    assert r[2] == pytest.approx(10.0 * 10 ** 0.4)  # two magnitudes brighter: x sqrt(6.3)
    assert r[4] == pytest.approx(10.0 * 10 ** -0.4)
    assert r[0] == r[1] == sites.STAR_RADIUS_MAX_ARCSEC
    assert r[5] == r[6] == sites.STAR_RADIUS_MIN_ARCSEC
    assert np.all(np.diff(r) <= 0)


def test_near_stars_uses_each_stars_own_radius():
    # One star per bin, far apart; points inside and just outside each one's radius.
    stars = _stars([(0, 0, 15.0), (500, 0, 17.0), (1000, 0, 19.0), (1500, 0, 22.0)])
    radii = sites.star_radius_arcsec(stars["g_mag"])
    inside = np.column_stack([stars["x"] + 0.9 * radii, stars["y"]])
    outside = np.column_stack([stars["x"], stars["y"] + 1.1 * radii])
    hit_in = sites.near_stars(inside, _xy(stars), stars["g_mag"])
    hit_out = sites.near_stars(outside, _xy(stars), stars["g_mag"])
    assert np.array_equal(hit_in, np.eye(4, dtype=bool))
    assert not hit_out.any()


def test_on_galaxies_follows_the_position_angle():
    # PA 0 deg: major axis to the north (+y). r_half 2", q 0.25: semi-axes 5" and 2".
    gal = _galaxies([(0.0, 0.0, 2.0, 0.25, 0.0)])
    points = np.array([[0.0, 4.5], [4.5, 0.0], [0.0, 5.5], [1.8, 0.0]])
    got = sites.on_galaxies(points, _xy(gal), gal["r_half_arcsec"], gal["axis_ratio"], gal["pa_deg"])
    assert got.tolist() == [True, False, False, True]
    # Turned to PA 90 deg (major axis east), the same points swap.
    got = sites.on_galaxies(points, _xy(gal), gal["r_half_arcsec"], gal["axis_ratio"], [90.0])
    assert got.tolist() == [False, True, False, True]
    # PA 30 deg east of north: 4.5" along (sin 30, cos 30) is inside, its mirror image
    # about north (PA -30 deg) is not.
    pa = np.radians(30.0)
    major, minor = np.array([np.sin(pa), np.cos(pa)]), np.array([np.cos(pa), -np.sin(pa)])
    points = np.array([4.5 * major, 4.5 * major * [-1, 1], 5.5 * major, 1.8 * minor, 2.2 * minor])
    got = sites.on_galaxies(points, _xy(gal), gal["r_half_arcsec"], gal["axis_ratio"], [30.0])
    assert got.tolist() == [True, False, False, True, False]


def test_false_class_is_the_first_that_applies():
    stars = _stars([(0, 0, 15.0), (0, 2, 17.0), (300, 0, 17.0), (600, 0, 19.0), (900, 0, 21.0)])
    galaxies = _galaxies([(1200.0, 0.0, 1.0, 1.0, 0.0), (1500.0, 0.0, 1.0, 1.0, 0.0)])
    points = np.array([
        [0.0, 3.0],      # near a g = 15 and a g = 17 star: the brighter bin
        [300.0, 3.0],    # g = 17 only (r = 6.3")
        [600.0, 1.5],    # g = 19 (r = 2.5")
        [900.0, 1.5],    # g = 21 (r = 2")
        [1200.0, 0.5],   # on a galaxy, also flagged cosmic ray and bad: galaxy first
        [1500.0, 10.0],  # cosmic ray and bad pixel: cosmic ray first
        [1800.0, 0.0],   # bad pixel / edge only
        [2100.0, 0.0],   # nothing
        [600.0, 3.0],    # just outside the g = 19 star's 2.5": nothing
    ])
    cosmic = np.array([False, False, False, False, True, True, False, False, False])
    bad = np.array([False, False, False, False, True, True, True, False, False])
    attrs = sites.site_attributes(points, stars, _xy(stars), galaxies, _xy(galaxies), cosmic, bad)
    assert attrs["false_class"].tolist() == [
        "star_g_lt_16", "star_g_16_18", "star_g_18_20", "star_g_ge_20", "galaxy", "cosmic_ray",
        "bad_pixel_or_edge", "none", "none"]
    # The attributes themselves are not exclusive.
    assert attrs.loc[0, "star_g_16_18"] and attrs.loc[4, "cosmic_ray"] and attrs.loc[5, "bad_pixel_or_edge"]


def test_assign_false_class_order_matches_the_class_list():
    names = list(sites.FALSE_CLASSES[:-1])
    # Row k has classes k..end set: it must get class k.
    attrs = pd.DataFrame({n: [j >= k for k in range(len(names))] for j, n in enumerate(names)})
    assert sites.assign_false_class(attrs).tolist() == names


def test_pixel_helpers():
    flag = np.zeros((50, 60), bool)
    flag[10, 20] = True
    assert sites.box_any(flag, [22.0, 23.0, 20.4, 59.0], [12.0, 10.0, 7.6, 49.0], 2).tolist() == [True, False, True, False]
    assert sites.near_border([5.0, 30.0, 30.0, 54.5], [25.0, 25.0, 44.5, 25.0], (50, 60), 5).tolist() == [
        False, False, True, True]
    pixels = np.array([[10, 10], [40, 40]])
    assert sites.near_pixels(pixels, [13.0, 14.0, 40.0], [10.0, 13.0, 43.9], 4.0).tolist() == [True, False, True]
    assert sites.near_pixels(None, [1.0], [1.0], 4.0).tolist() == [False]


def test_sharper_than_psf():
    src = pd.DataFrame({"ixx": [0.25, 0.4, 0.02, np.nan], "iyy": [0.25, 0.05, 0.02, np.nan],
                        "ixy": [0.0, 0.0, 0.0, np.nan], "ixxPSF": [0.24] * 4, "iyyPSF": [0.26] * 4,
                        "ixyPSF": [0.0] * 4})
    assert sites.sharper_than_psf(src).tolist() == [False, True, True, False]


def _sources(classes, false, negative=None):
    n = len(classes)
    frame = pd.DataFrame({"ra": np.zeros(n), "dec": np.zeros(n), "psfFlux": np.ones(n), "snr": np.full(n, 6.0),
                          "false": np.asarray(false, bool), "near_bright_star": [c == "star_g_lt_16" for c in classes],
                          "isNegative": negative if negative is not None else np.zeros(n, bool)})
    for name in sites.FALSE_CLASSES[:-1]:
        frame[name] = [c == name for c in classes]
    frame["false_class"] = [c if f else "matched" for c, f in zip(classes, false)]
    return frame


def _truth(rows):
    """Truth from (diff_flux_nJy, true_snr, matched, good_pixels, near_other)."""
    frame = pd.DataFrame(rows, columns=["diff_flux_nJy", "true_snr", "matched", "good_pixels", "near_other"])
    frame["kind"] = "transient"
    frame["psfFlux"] = np.where(frame["matched"], frame["diff_flux_nJy"], np.nan)
    frame["psfFluxErr"] = np.abs(frame["diff_flux_nJy"]) / frame["true_snr"]
    frame["dra_mas"] = frame["ddec_mas"] = 0.0
    return frame


def test_summarise_counts_false_detections_per_class_and_ccd_visit():
    one = {"truth": _truth([(100.0, 20.0, True, True, False)]),
           "sources": _sources(["star_g_lt_16", "galaxy", "none", "galaxy", "cosmic_ray"],
                               [True, True, True, False, True], [False, True, False, False, True])}
    two = {"truth": _truth([(100.0, 20.0, True, True, False)]),
           "sources": _sources(["none", "bad_pixel_or_edge"], [True, True])}
    m = ev.summarise([one, two])
    assert m["false_per_ccd_visit_total"] == 3.0
    assert m["false_per_ccd_visit_class_star_g_lt_16"] == 0.5
    assert m["false_per_ccd_visit_class_galaxy"] == 0.5  # the matched one does not count
    assert m["false_per_ccd_visit_class_none"] == 1.0
    assert m["false_per_ccd_visit_class_cosmic_ray"] == 0.5
    assert m["false_per_ccd_visit_class_bad_pixel_or_edge"] == 0.5
    assert m["false_per_ccd_visit_class_star_g_16_18"] == 0.0
    assert sum(m[f"false_per_ccd_visit_class_{c}"] for c in sites.FALSE_CLASSES) == m["false_per_ccd_visit_total"]
    assert m["false_per_ccd_visit_class_negative_part"]["galaxy"] == 0.5
    assert m["false_per_ccd_visit_class_negative_part"]["none"] == 0.0
    # The issue-5 figures are unchanged: near = within 30" of g < 16.
    assert m["false_per_ccd_visit_near_bright_stars"] == 0.5
    assert m["false_per_ccd_visit_away_from_bright_stars"] == 2.5


def test_summarise_splits_completeness_by_sign_pixels_and_neighbours():
    rows = (
        # positive, good pixels, S/N >= 10: away 3 of 4 found, near 1 of 2
        [(500.0, 12.0, True, True, False)] * 3 + [(500.0, 15.0, False, True, False)]
        + [(500.0, 11.0, True, True, True), (500.0, 40.0, False, True, True)]
        # negative, good pixels, S/N >= 10: away 2 of 2, near 1 of 1
        + [(-500.0, 12.0, True, True, False)] * 2 + [(-500.0, 20.0, True, True, True)]
        # left out: bad pixels (missed), S/N < 10 (missed)
        + [(500.0, 30.0, False, False, False), (-500.0, 30.0, False, False, True)]
        + [(500.0, 5.5, False, True, False), (-500.0, 5.5, False, True, False)]
    )
    m = ev.summarise([{"truth": _truth(rows), "sources": _sources([], [])}])
    assert m["completeness_good_snr_ge_10_pos"] == (pytest.approx(4 / 6), 6)
    assert m["completeness_good_snr_ge_10_pos_away"] == (pytest.approx(3 / 4), 4)
    assert m["completeness_good_snr_ge_10_pos_near"] == (pytest.approx(1 / 2), 2)
    assert m["completeness_good_snr_ge_10_neg"] == (1.0, 3)
    assert m["completeness_good_snr_ge_10_neg_near"] == (1.0, 1)
    assert m["completeness_good_snr_ge_10_neg_away"] == (1.0, 2)
    assert m["completeness_good_snr_ge_10"] == (pytest.approx(7 / 9), 9)
    assert m["completeness_good_snr_ge_10_pos_minus_neg_points"] == pytest.approx(100 * (4 / 6 - 1))
    by = m["completeness_good_by_snr_pos"]
    assert by["10-15"] == (1.0, 4)  # bins include their lower edge: S/N 15 is in 15-30
    assert by["15-30"] == (0.0, 1)
    assert by[">=30"] == (0.0, 1)
    assert by["5-6"] == (0.0, 1)
    assert m["completeness_good_by_snr_neg"]["15-30"] == (1.0, 1)
    assert m["completeness_good_by_snr_neg_away"]["10-15"] == (1.0, 2)
    assert m["n_good_pixels"] == 11
    # The issue-5 completeness still counts every object, good pixels or not.
    assert m["completeness_snr_8_inf"] == (pytest.approx(7 / 11), 11)


def test_snr_at_completeness_recovers_the_curve():
    rng = np.random.default_rng(11)
    snr = rng.uniform(1.0, 15.0, 4000)
    p = 0.98 * 0.5 * (1 + np.vectorize(__import__("math").erf)((snr - 5.5) / (0.8 * np.sqrt(2))))
    det = rng.uniform(size=snr.size) < p
    got = ev.snr_at_completeness(snr, det)
    # C(s) = 0.5 at s = 5.5 + 0.8 Phi^-1(0.5 / 0.98) = 5.52
    assert got["fit"] == pytest.approx(5.52, abs=0.1)
    assert got["isotonic"] == pytest.approx(5.52, abs=0.25)
    # A step: everything above 7 found, nothing below.
    step = ev.snr_at_completeness(np.linspace(1, 20, 200), np.linspace(1, 20, 200) > 7)
    assert 6.8 < step["isotonic"] < 7.2 and 6.5 < step["fit"] < 7.5
    # Nothing to fit.
    assert np.isnan(ev.snr_at_completeness([5.0, 6.0], [True, False])["fit"])
    assert np.isnan(ev.snr_at_completeness(np.linspace(1, 20, 50), np.ones(50, bool))["isotonic"])


def test_near_other_sources():
    stars = _stars([(0, 0, 17.0, 101), (100, 2.5, 19.5), (200, 1.0, 21.0), (300, 15.0, 14.0)])
    objects = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0], [300.0, 0.0], [400.0, 0.0], [500.0, 0.0]])
    ids = np.array([101, 102, 103, 104, 105, 106])
    # Other time-domain objects: 105 has 107 at 2.9"; 106 only itself (another epoch).
    others = np.array([[400.0, 2.9], [500.0, 0.0], [0.0, 0.0]])
    other_ids = np.array([107, 106, 101])
    near = sites.near_other_sources(objects, ids, others, other_ids, stars, _xy(stars))
    # 101: only its own star; 102: g = 19.5 at 2.5" (< 3"); 103: g = 21 is too faint;
    # 104: g = 14 star at 15" (its radius 25"); 105: another object at 2.9"; 106: itself only.
    assert near.tolist() == [False, True, False, True, True, False]


# --------------------------------------------------------------------------------------
# Cosmic rays replayed from the simulator's seed


def test_cosmic_ray_replay_checks_the_count(tmp_path):
    from apsnake.instruments import decam
    from apsnake.sim import signature

    image = np.zeros(decam.TRIMMED_SHAPE, np.float32)
    n = signature.add_cosmic_rays(image, np.random.default_rng([7, 2, 1001, 25, 2]), 90.0 + decam.READOUT_TIME_S)
    (tmp_path / "truth").mkdir()
    (tmp_path / "sim_summary.json").write_text(json.dumps({"seed": 7}))
    pd.DataFrame({"visit": [1001, 1001], "detector": [25, 32], "n_cosmic_rays": [n, n + 1]}).to_parquet(
        tmp_path / "truth" / "signature.parquet")
    pd.DataFrame({"visit": [1001], "exposure_time": [90.0]}).to_parquet(tmp_path / "truth" / "visits.parquet")
    pixels = sites.cosmic_ray_pixels(str(tmp_path), 1001, 25)
    y, x = np.nonzero(image > 0)
    assert pixels is not None and np.array_equal(pixels, np.column_stack([x, y]))
    # A count that the replay does not reproduce: no truth.
    assert sites.cosmic_ray_pixels(str(tmp_path), 1001, 32) is None
    assert sites.cosmic_ray_pixels(str(tmp_path), 9999, 25) is None


def test_cosmic_ray_replay_matches_the_simulated_night(sim_test_dir):
    sig = pd.read_parquet(sim_test_dir / "truth" / "signature.parquet").drop_duplicates(["visit", "detector"])
    for visit, detector in zip(sig["visit"], sig["detector"]):
        pixels = sites.cosmic_ray_pixels(str(sim_test_dir), int(visit), int(detector))
        assert pixels is not None, (visit, detector)
        assert len(pixels) > 0


def test_blended_mixes_counts_only_pairs_closer_than_the_blend_distance():
    from apsnake.sim.evaluate import blended_mixes

    dec = 2.0
    positions = pd.DataFrame({"ra": [150.0, 150.0 + 1.3 / 3600 / np.cos(np.radians(dec)), 150.0, 150.01],
                              "dec": [dec, dec, dec + 3.0 / 3600, dec]}, index=[1, 2, 3, 4])
    # 1-2: 1.3 arcsec apart (a blend); 1-3: 3 arcsec (resolved); 4 with 5: 5 is an asteroid (absent)
    assert blended_mixes([np.array([1, 2]), np.array([1, 3]), np.array([4, 5])], positions, 1.5) == 1
    assert blended_mixes([np.array([1, 2, 3])], positions, 1.5) == 0
