"""HEALPix sky cells and the per-cell association chains computed from the registry."""

import numpy as np
import pandas as pd
import pytest

from apsnake.association.plan import association_plan, cell_size_arcsec, cells_of, footprint_cells

CCD_W, CCD_H = 2048 * 0.263 / 3600, 4096 * 0.263 / 3600  # deg


def _offsets(ra0, dec0, dx_deg, dy_deg):
    """Positions at tangent-plane offsets (deg, east and north) from (ra0, dec0)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    moved = SkyCoord(ra0 * u.deg, dec0 * u.deg).spherical_offsets_by(np.asarray(dx_deg) * u.deg,
                                                                     np.asarray(dy_deg) * u.deg)
    return moved.ra.deg, moved.dec.deg


def _corners(ra0, dec0, w=CCD_W, h=CCD_H):
    ra, dec = _offsets(ra0, dec0, [-w / 2, w / 2, w / 2, -w / 2], [-h / 2, -h / 2, h / 2, h / 2])
    return np.column_stack([ra, dec])


def test_cells_are_smaller_than_a_ccd_and_deterministic():
    assert cell_size_arcsec(9) < CCD_W * 3600 < CCD_H * 3600
    ra, dec = np.array([0.0, 359.99999, 150.1, 10.0]), np.array([0.0, 0.0, 2.2, -89.9999])
    cells = cells_of(ra, dec, 9)
    assert cells.dtype == np.int64 and np.array_equal(cells, cells_of(ra + 360.0, dec, 9))
    assert cells_of([], [], 9).size == 0
    assert cells_of(150.1, 2.2, 9)[0] == cells[2]


@pytest.mark.parametrize("ra0,dec0", [(150.1, 2.2), (0.02, -30.0), (200.0, 85.0)])
def test_footprint_cells_cover_every_point_of_the_padded_footprint(ra0, dec0):
    pad = 60.0
    cells = set(footprint_cells(_corners(ra0, dec0), 9, pad).tolist())
    rng = np.random.default_rng(1)
    w, h = CCD_W / 2 + (pad - 8) / 3600, CCD_H / 2 + (pad - 8) / 3600
    ra, dec = _offsets(ra0, dec0, rng.uniform(-w, w, 20000), rng.uniform(-h, h, 20000))
    inside = set(cells_of(ra, dec, 9).tolist())
    assert inside <= cells
    assert len(cells) < 40  # tight: a CCD of ~9 x 18 arcmin plus 1 arcmin on each side
    with pytest.raises(ValueError, match="finite"):
        footprint_cells(np.full((4, 2), np.nan))


def _registry(rows):
    records = []
    for visit, detector, mjd, ra0, dec0 in rows:
        corners = _corners(ra0, dec0)
        rec = {"visit": visit, "detector": detector, "mjd_mid_tai": mjd}
        for (ra, dec), name in zip(corners, ("ll", "lr", "ur", "ul")):
            rec[f"ra_{name}"], rec[f"dec_{name}"] = ra, dec
        records.append(rec)
    return pd.DataFrame(records)


def test_chains_order_overlapping_data_ids_in_time_and_leave_others_parallel():
    gap = CCD_W * 1.05  # neighbouring CCDs of one visit: padded footprints overlap
    rows = [(3, 1, 10.02, 150.0, 2.0), (3, 2, 10.02, 150.0 + gap, 2.0),
            (1, 1, 10.00, 150.0, 2.0), (1, 2, 10.00, 150.0 + gap, 2.0),
            (2, 1, 10.01, 150.001, 2.001),
            (4, 1, 10.03, 170.0, -5.0)]  # another field
    table = _registry(rows)
    plan = association_plan(table, [(v, d) for v, d, *_ in rows], order=9, pad_arcsec=60)
    assert plan.predecessors[(1, 1)] == [] and plan.predecessors[(4, 1)] == []
    # Detectors of one visit never wait for each other, even where their padded edges share cells.
    assert plan.predecessors[(1, 2)] == [] and plan.predecessors[(1, 1)] == []
    assert set(plan.cells[(1, 1)]) & set(plan.cells[(1, 2)])
    assert (1, 1) in plan.predecessors[(2, 1)]
    assert (2, 1) in plan.predecessors[(3, 1)] and (1, 1) not in plan.predecessors[(3, 1)]  # only the previous visit
    assert all(len({v for v, _ in preds}) <= 2 for preds in plan.predecessors.values())
    assert plan.key[(2, 1)] == (10.01, 2, 1)
    assert all(plan.key[p] < plan.key[d] for d, preds in plan.predecessors.items() for p in preds)
    # A data ID without a usable footprint takes part in no chain instead of stopping the DAG.
    broken = table.copy()
    broken.loc[broken["visit"] == 2, ["ra_ll", "dec_ll"]] = np.nan
    plan_broken = association_plan(broken, [(v, d) for v, d, *_ in rows], order=9, pad_arcsec=60)
    assert plan_broken.cells[(2, 1)] == [] and (2, 1) not in plan_broken.predecessors[(3, 1)]
    # Only selected data IDs take part.
    partial = association_plan(table, [(1, 1), (3, 1)], order=9, pad_arcsec=60)
    assert set(partial.cells) == {(1, 1), (3, 1)} and partial.predecessors[(3, 1)] == [(1, 1)]
