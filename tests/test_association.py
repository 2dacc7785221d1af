"""Association (apsnake.association): one-to-one matching, new objects, metrics, DiaObject summaries.

Expectations are computed by hand (or with an independent reference: astropy separations,
a sequential greedy loop, plain numpy statistics per object).
"""


import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from apsnake.association import match
from apsnake.association import (NEW_OBJECT_BAD_FLAGS, AssociationError, associate_sources,
                                 can_found_object, match_one_to_one, summarise_objects)
from apsnake.errors import ApsnakeError
from apsnake.ids import dia_source_ids
from apsnake.schema import BANDS, DIA_OBJECT_SCHEMA, conform

ARCSEC = 1.0 / 3600.0
VISIT, DETECTOR = 411371, 56


def _sources(ra, dec, ids=None, **columns):
    """A DiaSource-like DataFrame of one data ID (diaObjectId null)."""
    n = len(ra)
    df = pd.DataFrame({
        "diaSourceId": dia_source_ids(VISIT, DETECTOR, n) if ids is None else np.asarray(ids, np.int64),
        "visit": np.full(n, VISIT, np.int64),
        "detector": np.full(n, DETECTOR, np.int32),
        "diaObjectId": pd.array([None] * n, dtype="Int64"),
        "ra": np.asarray(ra, float),
        "dec": np.asarray(dec, float),
    })
    for name in NEW_OBJECT_BAD_FLAGS:
        df[name] = False
    for name, values in columns.items():
        df[name] = values
    return df


def _objects(ids, ra, dec):
    return pd.DataFrame({"diaObjectId": np.asarray(ids, np.int64), "ra": np.asarray(ra, float),
                         "dec": np.asarray(dec, float)})


def _sequential_greedy(src_ra, src_dec, obj_ra, obj_dec, radius_arcsec):
    """Reference: all pairs by brute force (astropy), sorted, accepted one by one."""
    src = SkyCoord(src_ra * u.deg, src_dec * u.deg)
    obj = SkyCoord(obj_ra * u.deg, obj_dec * u.deg)
    sep = src[:, None].separation(obj[None, :]).arcsec
    s, o = np.nonzero(sep <= radius_arcsec)
    d = sep[s, o]
    order = np.lexsort((o, s, d))
    index = np.full(len(src_ra), -1)
    used = set()
    for k in order:
        if index[s[k]] < 0 and o[k] not in used:
            index[s[k]] = o[k]
            used.add(o[k])
    return index


# ---------------------------------------------------------------------------
# match_one_to_one

def test_greedy_one_to_one_beats_naive_nearest():
    # Objects A (dec 0) and B (dec +1.1"); source 0 is 0.5" from A and 0.6" from B, source 1 is
    # 0.3" from A. Both are nearest to A: the closer (source 1) takes A, source 0 its second choice B.
    obj_dec = np.array([0.0, 1.1]) * ARCSEC
    src_dec = np.array([0.5, -0.3]) * ARCSEC
    index, dist = match_one_to_one([10.0, 10.0], src_dec, [10.0, 10.0], obj_dec)
    assert index.tolist() == [1, 0]
    np.testing.assert_allclose(dist, [0.6, 0.3], atol=1e-9)
    # Without B, source 0 stays unmatched.
    index, dist = match_one_to_one([10.0, 10.0], src_dec, [10.0], obj_dec[:1])
    assert index.tolist() == [-1, 0]
    assert np.isnan(dist[0]) and dist[1] == pytest.approx(0.3, abs=1e-9)


def test_unmatched_neighbour_founds_new_object():
    objects = _objects([7], [10.0], [0.0])
    sources = _sources([10.0, 10.0], np.array([0.5, -0.3]) * ARCSEC)
    result = associate_sources(sources, objects)
    ids = sources["diaSourceId"].to_numpy()
    assert result.sources["diaObjectId"].tolist() == [ids[0], 7]
    assert result.new_ids.tolist() == [ids[0]]
    assert result.updated_ids.tolist() == [7]
    assert np.isnan(result.match_distance_arcsec[0])
    assert result.match_distance_arcsec[1] == pytest.approx(0.3, abs=1e-9)


def test_radius_boundary_is_inclusive_and_exact():
    # Separations 0.9999" and 1.0001" from two far-apart objects (along RA at dec 30: RA offset
    # of d / cos(dec) is not exactly d on the sphere, so build them along Dec).
    obj_ra, obj_dec = [20.0, 40.0], [30.0, 30.0]
    src_ra, src_dec = [20.0, 40.0], [30.0 + 0.9999 * ARCSEC, 30.0 + 1.0001 * ARCSEC]
    index, dist = match_one_to_one(src_ra, src_dec, obj_ra, obj_dec, radius_arcsec=1.0)
    assert index.tolist() == [0, -1]
    assert dist[0] == pytest.approx(0.9999, abs=1e-7)
    index, _ = match_one_to_one(src_ra, src_dec, obj_ra, obj_dec, radius_arcsec=1.0002)
    assert index.tolist() == [0, 1]
    index, _ = match_one_to_one(src_ra, src_dec, obj_ra, obj_dec, radius_arcsec=0.9998)
    assert index.tolist() == [-1, -1]


def test_ra_wrap():
    index, dist = match_one_to_one([0.0001], [0.0], [359.9999], [0.0])
    assert index.tolist() == [0]
    assert dist[0] == pytest.approx(0.72, abs=1e-6)


def test_pole():
    # Same small distance from the pole on opposite meridians: 2 * 0.00005 deg = 0.36".
    index, dist = match_one_to_one([190.0, 0.0], [89.99995, -89.9999], [10.0, 123.0], [89.99995, -90.0])
    assert index.tolist() == [0, 1]
    np.testing.assert_allclose(dist, [0.36, 0.36], atol=1e-6)


def test_empty_inputs():
    for args in (([], [], [], []), ([], [], [1.0], [2.0]), ([1.0], [2.0], [], [])):
        index, dist = match_one_to_one(*args)
        assert index.dtype == np.int64 and dist.dtype == np.float64
        assert len(index) == len(args[0]) and (index == -1).all() and np.isnan(dist).all()


def test_matches_sequential_greedy_on_crowded_field(rng, monkeypatch):
    # Dense field (many sources with several candidates): vectorised rounds = the pair-by-pair rule,
    # also when the rounds stop early and the loop finishes.
    n_obj, n_src = 300, 400
    obj_ra = 150.0 + rng.uniform(0, 20, n_obj) * ARCSEC
    obj_dec = 2.0 + rng.uniform(0, 20, n_obj) * ARCSEC
    src_ra = 150.0 + rng.uniform(0, 20, n_src) * ARCSEC
    src_dec = 2.0 + rng.uniform(0, 20, n_src) * ARCSEC
    expected = _sequential_greedy(src_ra, src_dec, obj_ra, obj_dec, 1.0)
    index, dist = match_one_to_one(src_ra, src_dec, obj_ra, obj_dec)
    np.testing.assert_array_equal(index, expected)
    assert len(set(index[index >= 0])) == np.count_nonzero(index >= 0)  # one-to-one
    sep = SkyCoord(src_ra[index >= 0] * u.deg, src_dec[index >= 0] * u.deg).separation(
        SkyCoord(obj_ra[index[index >= 0]] * u.deg, obj_dec[index[index >= 0]] * u.deg)).arcsec
    np.testing.assert_allclose(dist[index >= 0], sep, atol=1e-8)
    monkeypatch.setattr(match, "_MAX_VECTOR_ROUNDS", 1)
    np.testing.assert_array_equal(match_one_to_one(src_ra, src_dec, obj_ra, obj_dec)[0], expected)


def test_non_finite_positions_never_match():
    index, _ = match_one_to_one([10.0, np.nan], [0.0, 0.0], [np.nan, 10.0], [0.0, 0.0])
    assert index.tolist() == [1, -1]


# ---------------------------------------------------------------------------
# associate_sources

def test_determinism_under_shuffled_input(rng):
    # A crowded field, plus an exact distance tie (two sources +/-0.5" from one object):
    # the lower diaSourceId wins whatever the row order.
    n_obj, n_src = 200, 300
    objects = _objects(np.arange(n_obj) * 10 + 5, 150.0 + rng.uniform(0, 15, n_obj) * ARCSEC,
                       2.0 + rng.uniform(0, 15, n_obj) * ARCSEC)
    ra = np.r_[150.0 + rng.uniform(0, 15, n_src) * ARCSEC, 160.0, 160.0]
    dec = np.r_[2.0 + rng.uniform(0, 15, n_src) * ARCSEC, 0.5 * ARCSEC, -0.5 * ARCSEC]
    sources = _sources(ra, dec)
    objects = pd.concat([objects, _objects([3], [160.0], [0.0])], ignore_index=True)
    tie_ids = sources["diaSourceId"].to_numpy()[-2:]
    first = associate_sources(sources, objects)
    by_id = dict(zip(first.sources["diaSourceId"], first.sources["diaObjectId"]))
    assert by_id[tie_ids[0]] == 3 and by_id[tie_ids[1]] == tie_ids[1]
    for seed in range(3):
        perm_s = np.random.default_rng(seed).permutation(len(sources))
        perm_o = np.random.default_rng(seed + 10).permutation(len(objects))
        again = associate_sources(sources.iloc[perm_s], objects.iloc[perm_o])
        assert dict(zip(again.sources["diaSourceId"], again.sources["diaObjectId"])) == by_id
        np.testing.assert_array_equal(again.new_ids, first.new_ids)
        np.testing.assert_array_equal(again.updated_ids, first.updated_ids)
        np.testing.assert_array_equal(again.match_distance_arcsec, first.match_distance_arcsec[perm_s])
        assert again.sources.index.tolist() == sources.index[perm_s].tolist()


def test_bad_flags_and_metrics():
    objects = _objects([101, 102, 103, 104], [10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 0.0, 0.0])
    ra = [10.0, 20.0, 50.0, 60.0, 70.0, 80.0]
    dec = [0.2 * ARCSEC, 0.0, 0.0, 0.0, 0.0, 0.0]
    sources = _sources(ra, dec)
    # source 1: matched despite a bad flag; 2: unmatched, bad -> unassociated; 3: unmatched, bad
    # (centroid); 4: null flags (count as False) -> new object; 5: clean -> new object.
    sources["pixelFlags_saturatedCenter"] = pd.array([False, True, True, False, None, False], dtype="boolean")
    sources["centroid_flag"] = pd.array([False, False, False, True, None, False], dtype="boolean")
    ids = sources["diaSourceId"].to_numpy()
    assert can_found_object(sources).tolist() == [True, False, False, False, True, True]

    result = associate_sources(sources, objects)
    assert str(result.sources["diaObjectId"].dtype) == "Int64"
    assert result.sources["diaObjectId"].tolist() == [101, 102, pd.NA, pd.NA, ids[4], ids[5]]
    assert result.updated_ids.dtype == np.int64 and result.updated_ids.tolist() == [101, 102]
    assert result.new_ids.tolist() == [ids[4], ids[5]]
    assert result.unassociated_source_ids.tolist() == [ids[2], ids[3]]
    assert result.match_distance_arcsec[0] == pytest.approx(0.2, abs=1e-9)
    assert np.isnan(result.match_distance_arcsec[2:]).all()
    assert result.metrics == {
        "numNewDiaObjects": 2, "numUpdatedDiaObjects": 2, "numUnassociatedDiaObjects": 2,
        "fracUpdatedDiaObjects": 0.5, "numUnassociatedDiaSources": 2,
        "numLoadedDiaObjects": 4, "numDiaSources": 6,
    }
    assert sources["diaObjectId"].isna().all()  # input untouched
    arrow_ids = pa.array(result.sources["diaObjectId"], from_pandas=True)
    assert arrow_ids.type == pa.int64() and arrow_ids.null_count == 2


def test_flag_columns_that_follow_rubin():
    assert set(NEW_OBJECT_BAD_FLAGS) >= {
        "centroid_flag", "pixelFlags_crCenter", "pixelFlags_nodataCenter", "pixelFlags_interpolatedCenter",
        "pixelFlags_saturatedCenter", "pixelFlags_suspectCenter", "pixelFlags_offimage"}
    for name in NEW_OBJECT_BAD_FLAGS:
        sources = _sources([1.0, 2.0], [0.0, 0.0])
        sources[name] = [True, None]
        assert can_found_object(sources).tolist() == [False, True], name


def test_empty_objects_and_sources():
    sources = _sources([10.0, 11.0], [0.0, 0.0])
    for objects in (pd.DataFrame(), _objects([], [], [])):
        result = associate_sources(sources, objects)
        assert result.new_ids.tolist() == sorted(sources["diaSourceId"])
        assert result.updated_ids.tolist() == []
        assert result.metrics["fracUpdatedDiaObjects"] == 0.0
        assert result.metrics["numLoadedDiaObjects"] == 0
    result = associate_sources(_sources([], []), _objects([1], [10.0], [0.0]))
    assert len(result.sources) == 0 and result.new_ids.size == 0
    assert result.metrics["numUnassociatedDiaObjects"] == 1
    assert result.metrics["fracUpdatedDiaObjects"] == 0.0


def test_max_new_objects():
    sources = _sources([10.0, 11.0, 12.0], [0.0, 0.0, 0.0])
    assert associate_sources(sources, pd.DataFrame(), max_new_objects=3).metrics["numNewDiaObjects"] == 3
    with pytest.raises(AssociationError, match=r"3 new DiaObjects exceed max_new_objects=2") as err:
        associate_sources(sources, pd.DataFrame(), max_new_objects=2)
    assert isinstance(err.value, ApsnakeError)
    assert f"visit {VISIT}" in str(err.value)


def test_bad_association_inputs():
    sources = _sources([10.0], [0.0])
    already = sources.copy()
    already["diaObjectId"] = pd.array([5], dtype="Int64")
    with pytest.raises(AssociationError, match="already have a diaObjectId"):
        associate_sources(already, pd.DataFrame())
    with pytest.raises(AssociationError, match="duplicate diaObjectId"):
        associate_sources(sources, _objects([1, 1], [0.0, 1.0], [0.0, 0.0]))
    with pytest.raises(AssociationError, match="missing column"):
        associate_sources(sources, pd.DataFrame({"diaObjectId": [1]}))


# ---------------------------------------------------------------------------
# summarise_objects

def _history(rows):
    """DiaSource history rows: (diaObjectId, band, mjd, psfFlux, psfFluxErr, ra, dec) + defaults."""
    df = pd.DataFrame(rows, columns=["diaObjectId", "band", "midpointMjdTai", "psfFlux", "psfFluxErr",
                                     "ra", "dec"])
    df["diaObjectId"] = df["diaObjectId"].astype("Int64")
    df["raErr"] = np.float32(0.1 * ARCSEC)
    df["decErr"] = np.float32(0.1 * ARCSEC)
    df["scienceFlux"] = df["psfFlux"] + 1000.0
    df["scienceFluxErr"] = df["psfFluxErr"]
    return df


NO_FORCED = pd.DataFrame()


def _row(table, object_id):
    return table.to_pandas().set_index("diaObjectId").loc[object_id]


def test_weighted_mean_sigma_and_slope():
    # Object 1, g band, times deliberately unsorted; fluxes 100, 130, 110 with errors 10, 20, 10.
    src = _history([
        (1, "g", 60002.0, 130.0, 20.0, 10.0, 0.0),
        (1, "g", 60000.0, 100.0, 10.0, 10.0, 0.0),
        (1, "g", 60001.0, 110.0, 10.0, 10.0, 0.0),
        (2, "g", 60000.0, 50.0, 5.0, 20.0, 0.0),
    ])
    table = summarise_objects([2, 1], src, NO_FORCED, 60003.5)
    assert table.column("diaObjectId").to_pylist() == [1, 2]
    one = _row(table, 1)
    w = np.array([1 / 400, 1 / 100, 1 / 100])
    f = np.array([130.0, 100.0, 110.0])
    assert one["g_psfFluxMean"] == pytest.approx((w * f).sum() / w.sum(), rel=1e-6)   # 108.888...
    assert one["g_psfFluxMeanErr"] == pytest.approx(np.sqrt(1 / w.sum()), rel=1e-6)   # 6.666...
    assert one["g_psfFluxSigma"] == pytest.approx(np.std(f, ddof=1), rel=1e-6)        # 15.275...
    assert one["g_psfFluxNdata"] == 3
    assert one["g_psfFluxMin"] == 100.0 and one["g_psfFluxMax"] == 130.0
    assert one["g_psfFluxMaxSlope"] == pytest.approx(20.0)  # (110-100)/1 d, (130-110)/1 d
    assert one["g_psfFluxErrMean"] == pytest.approx(40.0 / 3, rel=1e-6)
    assert one["g_scienceFluxMean"] == pytest.approx((w * (f + 1000)).sum() / w.sum(), rel=1e-6)
    assert one["g_scienceFluxMeanErr"] == pytest.approx(np.sqrt(1 / w.sum()), rel=1e-6)
    assert one["nDiaSources"] == 3
    assert one["firstDiaSourceMjdTai"] == 60000.0 and one["lastDiaSourceMjdTai"] == 60002.0
    assert one["validityStartMjdTai"] == 60003.5
    two = _row(table, 2)
    assert two["g_psfFluxNdata"] == 1 and two["g_psfFluxMean"] == pytest.approx(50.0)
    assert pd.isna(two["g_psfFluxSigma"]) and pd.isna(two["g_psfFluxMaxSlope"])  # fewer than 2


def test_max_slope_skips_equal_times_and_keeps_sign():
    # Falling light curve: slopes -30 and -10 per day -> max -10; the pair at equal time is skipped.
    src = _history([
        (1, "r", 60001.0, 70.0, 5.0, 10.0, 0.0),
        (1, "r", 60000.0, 100.0, 5.0, 10.0, 0.0),
        (1, "r", 60003.0, 50.0, 5.0, 10.0, 0.0),
        (2, "r", 60000.0, 10.0, 5.0, 11.0, 0.0),
        (2, "r", 60000.0, 90.0, 5.0, 11.0, 0.0),
    ])
    table = summarise_objects([1, 2], src, NO_FORCED, 60004.0)
    assert _row(table, 1)["r_psfFluxMaxSlope"] == pytest.approx(-10.0)
    assert pd.isna(_row(table, 2)["r_psfFluxMaxSlope"])


def test_bands_are_separate_and_others_count_only_for_position_and_time():
    src = _history([
        (1, "g", 60000.0, 100.0, 10.0, 10.0, 0.0),
        (1, "r", 60001.0, 300.0, 10.0, 10.0, 0.0),
        (1, "r", 60002.0, 500.0, 10.0, 10.0, 0.0),
        (1, "VR", 60005.0, 9999.0, 1.0, 10.0, 2.0 * ARCSEC),   # not a ugrizy band
        (1, None, 59990.0, 9999.0, 1.0, 10.0, 0.0),            # no band
        (1, "i", 60003.0, np.nan, 10.0, 10.0, 0.0),            # no flux: not in i_psfFluxNdata
        (1, "z", 60003.0, 20.0, 0.0, 10.0, 0.0),               # zero error: not used
    ])
    one = _row(summarise_objects([1], src, NO_FORCED, 60006.0), 1)
    assert one["g_psfFluxMean"] == pytest.approx(100.0) and one["g_psfFluxNdata"] == 1
    assert one["r_psfFluxMean"] == pytest.approx(400.0) and one["r_psfFluxNdata"] == 2
    assert one["r_psfFluxMaxSlope"] == pytest.approx(200.0)
    for b in ("u", "i", "z", "y"):
        assert one[f"{b}_psfFluxNdata"] == 0
        for suffix in ("psfFluxMean", "psfFluxMeanErr", "psfFluxSigma", "psfFluxMin", "psfFluxMax",
                       "psfFluxMaxSlope", "psfFluxErrMean", "scienceFluxMean", "scienceFluxMeanErr",
                       "fpFluxMean", "fpFluxMeanErr"):
            assert pd.isna(one[f"{b}_{suffix}"]), (b, suffix)
    assert one["nDiaSources"] == 7
    assert one["firstDiaSourceMjdTai"] == 59990.0 and one["lastDiaSourceMjdTai"] == 60005.0
    assert one["dec"] == pytest.approx(2.0 * ARCSEC / 7, abs=1e-12)  # the VR source moves the position


def test_spherical_mean_across_ra_zero_and_position_errors():
    src = _history([
        (1, "g", 60000.0, 1.0, 1.0, 359.9999, 10.0),
        (1, "g", 60001.0, 1.0, 1.0, 0.0003, 10.0),
        (2, "g", 60000.0, 1.0, 1.0, 0.00005, -0.00001),
        (2, "g", 60001.0, 1.0, 1.0, 359.99993, -0.00001),
    ])
    src["raErr"] = np.array([0.3, 0.4, np.nan, np.nan]) * ARCSEC
    src["decErr"] = np.array([0.5, np.nan, np.nan, np.nan]) * ARCSEC
    table = summarise_objects([1, 2], src, NO_FORCED, 60002.0)
    one, two = _row(table, 1), _row(table, 2)
    assert one["ra"] == pytest.approx(0.0001, abs=1e-9) and one["dec"] == pytest.approx(10.0, abs=1e-9)
    assert two["ra"] == pytest.approx(359.99999, abs=1e-9) and two["dec"] == pytest.approx(-0.00001, abs=1e-12)
    assert 0.0 <= two["ra"] < 360.0
    assert one["raErr"] == pytest.approx(0.5 / 2 * ARCSEC, rel=1e-6)    # sqrt(0.3^2 + 0.4^2) / 2
    assert one["decErr"] == pytest.approx(0.5 * ARCSEC, rel=1e-6)        # only the known error
    assert pd.isna(two["raErr"]) and pd.isna(two["decErr"]) and pd.isna(one["ra_dec_Cov"])


def test_spherical_mean_at_the_pole():
    src = _history([(1, "g", 60000.0, 1.0, 1.0, 0.0, 89.9999), (1, "g", 60001.0, 1.0, 1.0, 180.0, 89.9999)])
    one = _row(summarise_objects([1], src, NO_FORCED, 60002.0), 1)
    assert one["dec"] == pytest.approx(90.0, abs=1e-9)


def test_fp_flux_from_forced_sources():
    src = _history([(1, "g", 60000.0, 100.0, 10.0, 10.0, 0.0), (2, "g", 60000.0, 1.0, 1.0, 11.0, 0.0)])
    forced = pd.DataFrame({
        "diaObjectId": [1, 1, 1, 1, 3, 2],
        "band": ["g", "g", "r", "VR", "g", "g"],
        "psfFlux": [10.0, 40.0, 7.0, 1e6, 1e6, np.nan],
        "psfFluxErr": [1.0, 2.0, 1.0, 1.0, 1.0, 1.0],
    })
    table = summarise_objects([1, 2], src, forced, 60001.0)
    one, two = _row(table, 1), _row(table, 2)
    # weights 1 and 1/4: (10 + 40/4) / 1.25 = 16, error sqrt(1/1.25)
    assert one["g_fpFluxMean"] == pytest.approx(16.0) and one["g_fpFluxMeanErr"] == pytest.approx(np.sqrt(0.8))
    assert one["r_fpFluxMean"] == pytest.approx(7.0) and one["r_psfFluxNdata"] == 0
    assert pd.isna(two["g_fpFluxMean"]) and pd.isna(two["g_fpFluxMeanErr"])


def test_schema_conformance():
    src = _history([(1, "g", 60000.0, 100.0, 10.0, 10.0, 0.0), (1, "u", 60001.0, 10.0, 1.0, 10.0, 0.0)])
    table = summarise_objects(np.array([1, 1]), src, NO_FORCED, 60002.0)
    assert table.schema.equals(DIA_OBJECT_SCHEMA, check_metadata=True)
    assert table.num_rows == 1
    assert conform(table, "DiaObject").equals(table)
    assert table.schema.field("g_psfFluxMean").type == pa.float32()
    assert table.schema.field("y_psfFluxNdata").type == pa.int32()
    assert table.column("y_psfFluxNdata").null_count == 0
    assert table.column("y_psfFluxMean").null_count == 1  # NaN became null
    assert summarise_objects([], src, NO_FORCED, 60002.0).schema.equals(DIA_OBJECT_SCHEMA)


def test_object_without_sources_is_a_caller_bug():
    src = _history([(1, "g", 60000.0, 100.0, 10.0, 10.0, 0.0)])
    with pytest.raises(ValueError, match="without any DiaSource"):
        summarise_objects([1, 42], src, NO_FORCED, 60001.0)


def test_summary_matches_per_object_reference_and_is_fast(rng):
    n_obj, n_src = 2000, 20000
    obj_id = rng.integers(0, n_obj, n_src)
    obj_id[:n_obj] = np.arange(n_obj)  # every object has a source
    ids = obj_id.astype(np.int64) * 1000 + 7
    src = pd.DataFrame({
        "diaObjectId": pd.array(ids, dtype="Int64"),
        "band": rng.choice(list(BANDS) + ["VR"], n_src),
        "midpointMjdTai": 60000.0 + rng.uniform(0, 100, n_src),
        "psfFlux": rng.normal(500, 100, n_src).astype(np.float32),
        "psfFluxErr": rng.uniform(5, 20, n_src).astype(np.float32),
        "ra": 150.0 + obj_id * 1e-3 + rng.normal(0, 1e-5, n_src),
        "dec": 2.0 + rng.normal(0, 1e-5, n_src),
        "raErr": np.full(n_src, 1e-5, np.float32),
        "decErr": np.full(n_src, 1e-5, np.float32),
        "scienceFlux": rng.normal(1500, 100, n_src).astype(np.float32),
        "scienceFluxErr": rng.uniform(5, 20, n_src).astype(np.float32),
    })
    forced = pd.DataFrame({"diaObjectId": ids, "band": src["band"], "psfFlux": src["psfFlux"] * 0.9,
                           "psfFluxErr": src["psfFluxErr"]})
    object_ids = np.unique(ids)
    table = summarise_objects(object_ids, src, forced, 60101.0)  # its time: benchmarks/bench_associate.py

    out = table.to_pandas().set_index("diaObjectId")
    for oid in object_ids[:: n_obj // 20]:
        rows = src[(src["diaObjectId"] == oid).to_numpy()]
        assert out.loc[oid, "nDiaSources"] == len(rows)
        for b in ("g", "y"):
            band = rows[rows["band"] == b].sort_values("midpointMjdTai")
            f, e = band["psfFlux"].to_numpy(float), band["psfFluxErr"].to_numpy(float)
            assert out.loc[oid, f"{b}_psfFluxNdata"] == len(band)
            if len(band) == 0:
                assert pd.isna(out.loc[oid, f"{b}_psfFluxMean"])
                continue
            w = 1 / e**2
            assert out.loc[oid, f"{b}_psfFluxMean"] == pytest.approx((w * f).sum() / w.sum(), rel=1e-6)
            assert out.loc[oid, f"{b}_fpFluxMean"] == pytest.approx(
                (w * f * np.float32(0.9)).sum() / w.sum(), rel=1e-5)
            if len(band) >= 2:
                assert out.loc[oid, f"{b}_psfFluxSigma"] == pytest.approx(np.std(f, ddof=1), rel=1e-5)
                slope = np.diff(f) / np.diff(band["midpointMjdTai"].to_numpy())
                assert out.loc[oid, f"{b}_psfFluxMaxSlope"] == pytest.approx(slope.max(), rel=1e-5)
