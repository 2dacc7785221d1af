"""One data ID's association (apsnake.association.pipeline) on synthetic difference images."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from apsnake import apdb
from apsnake.association import pipeline
from apsnake.dia import DiaConfig, detect_dia_sources
from apsnake.exposure import write_exposure
from apsnake.association.plan import footprint_cells
from apsnake.options import OptionsError, dataclass_from_options
from test_dia import DETECTOR, FLUX_PER_SNR, make_images

SHAPE = (512, 1024)
RNG = np.random.default_rng(11)
_GX, _GY = np.meshgrid(np.linspace(80, 940, 5), np.linspace(60, 450, 5))
XS, YS = _GX.ravel() + RNG.uniform(-5, 5, 25), _GY.ravel() + RNG.uniform(-5, 5, 25)  # no blends


def _visit(visit, mjd, seed, extra=()):
    """Difference, calexp and diaSrc of one visit: the 25 fixed transients (+ extra)."""
    sources = [(x, y, 25 * FLUX_PER_SNR) for x, y in zip(XS, YS)] + list(extra)
    diff, sci, tmpl = make_images(shape=SHAPE, transients=sources, seed=seed)
    diff, sci, tmpl = (replace(e, visit_info=replace(e.visit_info, visit=visit, mjd_mid_tai=mjd))
                       for e in (diff, sci, tmpl))
    table = detect_dia_sources(diff, sci, tmpl, DiaConfig(apply_filter=False), time_processed_mjd=1.0)
    # Keep the injected sources only (a noise peak would make the counts below seed-dependent).
    truth = np.array([(x, y) for x, y, _ in sources])
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    near = np.min(np.hypot(x[:, None] - truth[None, :, 0], y[:, None] - truth[None, :, 1]), axis=1) < 2
    assert near.sum() == len(sources)
    return diff, sci, table.filter(near)


def _cells(exposure):
    ny, nx = exposure.shape
    corners = exposure.wcs.all_pix2world([[0, 0], [nx, 0], [nx, ny], [0, ny]], 0)
    return footprint_cells(corners)


def _fragments(root, visit):
    return {t: pd.read_parquet(apdb.fragment_path(root, t, visit, DETECTOR)) for t in apdb.TABLES}


@pytest.fixture(scope="module")
def two_visits(tmp_path_factory):
    root = tmp_path_factory.mktemp("apdb")
    first = _visit(1001, 57000.25, 1)
    second = _visit(1002, 57001.25, 2, extra=[(400.0, 205.0, 40 * FLUX_PER_SNR)])
    cells = _cells(first[0])
    m1 = pipeline.associate_data_id(root, first[2], first[0], first[1], cells, time_processed_mjd=2.0)
    m2 = pipeline.associate_data_id(root, second[2], second[0], second[1], cells, time_processed_mjd=2.0)
    return root, first, second, cells, m1, m2


def test_second_visit_updates_the_first_visits_objects(two_visits):
    root, first, second, _, m1, m2 = two_visits
    assert m1["numNewDiaObjects"] == first[2].num_rows == 25 and m1["numUpdatedDiaObjects"] == 0
    assert m2["numUpdatedDiaObjects"] == 25 and m2["numNewDiaObjects"] == 1
    assert m2["numUnassociatedDiaObjects"] == 0 and m2["fracUpdatedDiaObjects"] == 1.0
    f1, f2 = _fragments(root, 1001), _fragments(root, 1002)
    assert set(f2["DiaSource"]["diaObjectId"]) - set(f1["DiaObject"]["diaObjectId"]) == {
        int(f2["DiaSource"]["diaSourceId"][f2["DiaSource"]["diaObjectId"] == f2["DiaSource"]["diaSourceId"]].iloc[0])}
    objects = apdb.Apdb(root).objects()
    assert len(objects) == 26 and (objects["nDiaSources"].sort_values().to_numpy() == [1] + [2] * 25).all()
    two = objects[objects["nDiaSources"] == 2]
    assert (two["firstDiaSourceMjdTai"] == 57000.25).all() and (two["lastDiaSourceMjdTai"] == 57001.25).all()
    assert (two["validityStartMjdTai"] == 57001.25).all() and (two["g_psfFluxNdata"] == 2).all()
    assert np.allclose(two["g_psfFluxMean"], 25 * FLUX_PER_SNR, rtol=0.15)
    # Every object is measured in both visits (the new one only in the second): fpFlux uses both.
    assert len(f1["DiaForcedSource"]) == 25 and len(f2["DiaForcedSource"]) == 26
    assert np.allclose(two["g_fpFluxMean"], 25 * FLUX_PER_SNR, rtol=0.15)
    assert m2["counts"] == {"DiaSource": 26, "DiaObject": 26, "DiaForcedSource": 26}


def test_rerunning_a_data_id_rewrites_the_same_rows(two_visits):
    root, first, second, cells, _, m2 = two_visits
    before = {v: _fragments(root, v) for v in (1001, 1002)}
    again = pipeline.associate_data_id(root, second[2], second[0], second[1], cells, time_processed_mjd=2.0)
    # An earlier visit re-run after a later one ignores the later one (chain order).
    pipeline.associate_data_id(root, first[2], first[0], first[1], cells, time_processed_mjd=2.0)
    for v in (1001, 1002):
        after = _fragments(root, v)
        for table in apdb.TABLES:
            pd.testing.assert_frame_equal(after[table], before[v][table], obj=f"{table} {v}")
    assert again["counts"] == m2["counts"]


def test_flagged_unmatched_sources_stay_unassociated(tmp_path):
    diff, sci, table = _visit(2001, 57000.25, 3)
    frame = table.to_pandas()
    frame.loc[0, "pixelFlags_crCenter"] = True
    marker = pipeline.associate_data_id(tmp_path, frame, diff, sci, _cells(diff))
    sources = _fragments(tmp_path, 2001)["DiaSource"]
    assert len(sources) == 25 and sources["diaObjectId"].isna().sum() == 1
    assert marker["numUnassociatedDiaSources"] == 1 and marker["numNewDiaObjects"] == 24


def test_images_given_as_paths_and_mismatched_inputs(tmp_path):
    diff, sci, table = _visit(3001, 57000.25, 4)
    write_exposure(diff, tmp_path / "diff.fits")
    write_exposure(sci, tmp_path / "calexp.fits")
    marker = pipeline.associate_data_id(tmp_path, table, tmp_path / "diff.fits", tmp_path / "calexp.fits", _cells(diff))
    assert marker["counts"]["DiaForcedSource"] == 25
    other = replace(sci, visit_info=replace(sci.visit_info, visit=3002))
    with pytest.raises(pipeline.AssociationStepError, match="calexp"):
        pipeline.associate_data_id(tmp_path, table, diff, other, _cells(diff))
    _, _, foreign = _visit(3003, 57000.25, 5)
    with pytest.raises(pipeline.AssociationStepError, match="another data ID"):
        pipeline.associate_data_id(tmp_path, foreign, diff, sci, _cells(diff))
    with pytest.raises(pipeline.AssociationStepError, match="no sky cells"):
        pipeline.associate_data_id(tmp_path, table, diff, sci, [])
    with pytest.raises(OptionsError, match="association"):
        dataclass_from_options(pipeline.AssociationConfig, {"radius_arcsec": 1.0, "no_such_option": 1}, "association")
