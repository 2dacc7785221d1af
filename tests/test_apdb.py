"""The APDB: commit protocol, history for association, read API, CLI and the README's DuckDB SQL."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from apsnake import apdb
from apsnake.apdb import (Apdb, ApdbError, cell_index_dir, commit_data_id, fragment_path, load_history,
                          marker_path, remove_data_id)
from apsnake.errors import ApsnakeError
from apsnake.ids import dia_source_ids
from apsnake.schema import arrow_schema, column_names, columns
from apsnake.association.plan import DEFAULT_ORDER, cells_of

ORDER = DEFAULT_ORDER
P1 = (150.0, 2.0)
P2 = (150.001, 2.0)
FAR = (151.0, 2.0)
C1 = int(cells_of(*P1, ORDER)[0])
CFAR = int(cells_of(*FAR, ORDER)[0])
#: Rounds up at the 8 decimals of the cell index names: the two detectors of visit 10 must
#: still keep their order when one is compared with the other's exact MJD.
MJD10 = 100.123456789


# ---------------------------------------------------------------------------
# helpers: schema-conforming rows

def _table(name: str, n: int, **values) -> pd.DataFrame:
    """``n`` rows of table ``name``: the given columns, zeros (or 'g') in the other required ones."""
    data = {}
    for col in columns(name):
        if col.name in values:
            data[col.name] = values[col.name]
        elif not col.nullable:
            data[col.name] = np.full(n, "g") if str(col.type) == "string" else np.zeros(n)
    return pd.DataFrame(data, index=range(n))


def sources(visit, detector, mjd, rows, band="g"):
    """DiaSources; rows = [(diaObjectId or None, ra, dec, psfFlux)]."""
    n = len(rows)
    return _table("DiaSource", n, diaSourceId=dia_source_ids(visit, detector, n), visit=np.full(n, visit),
                  detector=np.full(n, detector), diaObjectId=pd.array([r[0] for r in rows], dtype="Int64"),
                  midpointMjdTai=np.full(n, mjd), ra=[r[1] for r in rows], dec=[r[2] for r in rows],
                  psfFlux=[r[3] for r in rows], psfFluxErr=np.full(n, 10.0),
                  scienceFlux=[r[3] + 1000.0 for r in rows], scienceFluxErr=np.full(n, 12.0),
                  band=np.full(n, band), timeProcessedMjdTai=np.full(n, mjd + 0.01), psfNdata=np.full(n, 25),
                  bboxSize=np.full(n, 15))


def objects(mjd, rows):
    """DiaObject versions; rows = [(diaObjectId, ra, dec, nDiaSources, g_psfFluxMean)]."""
    n = len(rows)
    return _table("DiaObject", n, diaObjectId=[r[0] for r in rows], validityStartMjdTai=np.full(n, mjd),
                  ra=[r[1] for r in rows], dec=[r[2] for r in rows], nDiaSources=[r[3] for r in rows],
                  g_psfFluxMean=[r[4] for r in rows], firstDiaSourceMjdTai=np.full(n, mjd),
                  lastDiaSourceMjdTai=np.full(n, mjd))


def forced(visit, detector, mjd, rows, band="g"):
    """DiaForcedSources; rows = [(diaObjectId, ra, dec, psfFlux)]."""
    n = len(rows)
    return _table("DiaForcedSource", n, diaForcedSourceId=dia_source_ids(visit, detector, n) + 2**25,
                  diaObjectId=[r[0] for r in rows], ra=[r[1] for r in rows], dec=[r[2] for r in rows],
                  visit=np.full(n, visit), detector=np.full(n, detector), psfFlux=[r[3] for r in rows],
                  psfFluxErr=np.full(n, 11.0), midpointMjdTai=np.full(n, mjd),
                  scienceFlux=[r[3] + 2000.0 for r in rows], scienceFluxErr=np.full(n, 13.0),
                  band=np.full(n, band), timeProcessedMjdTai=np.full(n, mjd + 0.01))


def commit(root, visit, detector, mjd, cells, src=(), obj=(), fsrc=(), **marker):
    return commit_data_id(root, visit, detector, mjd, cells, ORDER,
                          {"DiaSource": sources(visit, detector, mjd, list(src)),
                           "DiaObject": objects(mjd, list(obj)),
                           "DiaForcedSource": forced(visit, detector, mjd, list(fsrc))}, marker)


def build_chain(root, with_uncommitted=True):
    """Data IDs in chain order (all touch cell C1 unless said otherwise):

    F (99, 9, 5)      cells [CFAR]: creates object 4 at FAR.
    A (MJD10, 10, 1)  cells [C1, CFAR]: creates object 1 at P1 and object 3 at FAR; an
                      unassociated source; forced photometry of object 1.
    B (MJD10, 10, 2)  updates object 1 (same visit: the detector breaks the tie).
    C (101, 11, 1)    creates object 2 at P2; forced photometry of objects 1 and 2.
    D (102, 12, 1)    updates object 1; forced photometry of objects 1 and 2.
    E (103, 13, 1)    updates object 1 but never commits (fragments and index, no marker).
    """
    commit(root, 9, 5, 99.0, [CFAR], src=[(4, *FAR, 500.0)], obj=[(4, *FAR, 1, 500.0)])
    commit(root, 10, 1, MJD10, [C1, CFAR], src=[(1, *P1, 100.0), (3, *FAR, 300.0), (None, *P1, 50.0)],
           obj=[(1, 150.0, 2.0, 1, 100.0), (3, *FAR, 1, 300.0)], fsrc=[(1, *P1, 90.0)], nNewDiaObjects=2)
    commit(root, 10, 2, MJD10, [C1], src=[(1, *P1, 110.0)], obj=[(1, 150.0002, 2.0, 2, 105.0)])
    commit(root, 11, 1, 101.0, [C1], src=[(2, *P2, 200.0)], obj=[(2, *P2, 1, 200.0)],
           fsrc=[(1, *P1, 95.0), (2, *P2, 190.0)])
    commit(root, 12, 1, 102.0, [C1], src=[(1, *P1, 120.0)], obj=[(1, 150.0003, 2.0, 3, 110.0)],
           fsrc=[(1, *P1, 115.0), (2, *P2, 185.0)])
    if with_uncommitted:
        commit(root, 13, 1, 103.0, [C1], src=[(1, *P1, 130.0)], obj=[(1, 150.0009, 2.0, 4, 115.0)])
        marker_path(root, 13, 1).unlink()
    return root


@pytest.fixture
def chain(tmp_path):
    return build_chain(tmp_path / "out")


def hidden_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".")]


# ---------------------------------------------------------------------------
# commit protocol

def test_layout_and_marker(tmp_path):
    root = tmp_path / "out"
    written = commit(root, 10, 1, MJD10, [CFAR, C1, C1], src=[(1, *P1, 100.0)], obj=[(1, *P1, 1, 100.0)],
                     nNewDiaObjects=1)
    assert fragment_path(root, "DiaSource", 10, 1) == root / "apdb/DiaSource/10/DiaSource_10_01.parquet"
    assert marker_path(root, 10, 1) == root / "apdb_marker/10/apdb_marker_10_01.json"
    # The same functions spell the workflow rules' patterns.
    assert str(fragment_path("out", "DiaObject", "{visit}", "{detector}")) == \
        "out/apdb/DiaObject/{visit}/DiaObject_{visit}_{detector}.parquet"
    assert str(marker_path("out", "{visit}", "{detector}")) == "out/apdb_marker/{visit}/apdb_marker_{visit}_{detector}.json"
    assert marker_path("out", "10", "1") == marker_path("out", 10, 1)
    for name in apdb.TABLES:
        table = pq.read_table(fragment_path(root, name, 10, 1))
        assert table.schema.equals(arrow_schema(name))
        assert table.num_rows == (0 if name == "DiaForcedSource" else 1)
    on_disk = json.loads(marker_path(root, 10, 1).read_text())
    assert on_disk == written
    assert written["cells"] == sorted([C1, CFAR]) and written["healpix_order"] == ORDER
    assert written["counts"] == {"DiaSource": 1, "DiaObject": 1, "DiaForcedSource": 0}
    assert (written["visit"], written["detector"], written["midpointMjdTai"], written["nNewDiaObjects"]) == \
        (10, 1, MJD10, 1)
    for cell in (C1, CFAR):
        entries = [p.name for p in cell_index_dir(root, ORDER, cell).iterdir()]
        assert entries == [f"10_01@{MJD10:.8f}"] and apdb.parse_cell_index_name(entries[0])[1:] == (10, 1)
        assert (cell_index_dir(root, ORDER, cell) / entries[0]).stat().st_size == 0
    assert hidden_files(root) == []


def test_marker_failure_leaves_nothing_committed(tmp_path, monkeypatch):
    root = tmp_path / "out"
    commit(root, 9, 5, 99.0, [C1], src=[(4, *P1, 5.0)], obj=[(4, *P1, 1, 5.0)])

    def broken(marker, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(apdb, "_write_marker", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        commit(root, 10, 1, MJD10, [C1], src=[(1, *P1, 100.0)], obj=[(1, *P1, 1, 100.0)])
    assert not marker_path(root, 10, 1).exists()
    assert fragment_path(root, "DiaObject", 10, 1).exists()  # written, but invisible
    assert hidden_files(root) == []
    db = Apdb(root)
    assert db.committed()[["visit", "detector"]].values.tolist() == [[9, 5]]
    assert db.objects()["diaObjectId"].tolist() == [4]
    assert db.sources()["diaObjectId"].tolist() == [4]
    history = load_history(root, [C1], ORDER, (200.0, 20, 1))
    assert history.data_ids == [(99.0, 9, 5)] and history.objects["diaObjectId"].tolist() == [4]


def test_fragment_failure_removes_temporaries(tmp_path, monkeypatch):
    root = tmp_path / "out"
    real_write = pq.write_table
    calls = []

    def fail_third(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 3:
            raise OSError("no space left")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(apdb.pq, "write_table", fail_third)
    with pytest.raises(OSError, match="no space"):
        commit(root, 10, 1, MJD10, [C1], src=[(1, *P1, 100.0)], obj=[(1, *P1, 1, 100.0)])
    assert all(Path(c).name.startswith(".") and not str(c).endswith(".parquet") for c in calls)
    assert hidden_files(root) == []
    assert not any(fragment_path(root, name, 10, 1).exists() for name in apdb.TABLES)
    assert not marker_path(root, 10, 1).exists()


def test_recommit_replaces(tmp_path, monkeypatch):
    root = tmp_path / "out"
    commit(root, 10, 1, MJD10, [C1, CFAR], src=[(1, *P1, 100.0), (3, *FAR, 300.0)],
           obj=[(1, *P1, 1, 100.0), (3, *FAR, 1, 300.0)])
    written = commit(root, 10, 1, MJD10, [C1], src=[(1, *P1, 101.0)], obj=[(1, *P1, 1, 101.0)])
    assert written["counts"]["DiaSource"] == 1
    db = Apdb(root)
    assert len(db.committed()) == 1
    assert db.sources()["psfFlux"].tolist() == [101.0]
    assert db.objects()["diaObjectId"].tolist() == [1]
    for name in apdb.TABLES:
        assert [p.name for p in fragment_path(root, name, 10, 1).parent.iterdir()] == [f"{name}_10_01.parquet"]
    assert list(cell_index_dir(root, ORDER, CFAR).iterdir()) == []  # the cell it no longer touches
    assert len(list(cell_index_dir(root, ORDER, C1).iterdir())) == 1

    # A re-run that fails before its marker leaves the data ID uncommitted, not half-old.
    monkeypatch.setattr(apdb, "_write_marker", lambda marker, path: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        commit(root, 10, 1, MJD10, [C1], src=[(1, *P1, 102.0)], obj=[(1, *P1, 1, 102.0)])
    assert len(Apdb(root).committed()) == 0


def test_remove_data_id(chain):
    remove_data_id(chain, 10, 1)
    assert not marker_path(chain, 10, 1).exists()
    assert not any(fragment_path(chain, name, 10, 1).exists() for name in apdb.TABLES)
    assert not any(p.name.startswith("10_01@") for cell in (C1, CFAR)
                   for p in cell_index_dir(chain, ORDER, cell).iterdir())
    assert 3 not in Apdb(chain).objects()["diaObjectId"].tolist()


def test_commit_rejects_bad_tables(tmp_path):
    root = tmp_path / "out"
    extra = sources(10, 1, MJD10, [(1, *P1, 100.0)]).assign(psfFlux_typo=1.0)
    with pytest.raises(ApsnakeError, match="psfFlux_typo"):
        commit_data_id(root, 10, 1, MJD10, [C1], ORDER, {"DiaSource": extra})
    other_visit = sources(11, 1, MJD10, [(1, *P1, 100.0)])
    with pytest.raises(ApdbError, match=r"visit=10, detector=1.*another visit"):
        commit_data_id(root, 10, 1, MJD10, [C1], ORDER, {"DiaSource": other_visit})
    stale = objects(MJD10 - 1, [(1, *P1, 1, 100.0)])
    with pytest.raises(ApdbError, match="validityStartMjdTai"):
        commit_data_id(root, 10, 1, MJD10, [C1], ORDER, {"DiaObject": stale})
    with pytest.raises(ApdbError, match="no sky cells"):
        commit_data_id(root, 10, 1, MJD10, [], ORDER, {})
    assert not (root / "apdb_marker").exists() and not any(root.rglob("*.parquet"))
    # Missing tables are written empty, with the schema.
    commit_data_id(root, 10, 1, MJD10, [C1], ORDER, {})
    assert pq.read_table(fragment_path(root, "DiaForcedSource", 10, 1)).schema.equals(arrow_schema("DiaForcedSource"))


# ---------------------------------------------------------------------------
# load_history

def test_history_respects_chain_order(chain):
    # B does not see A: same visit (detectors of one exposure never share objects, and what
    # B reads must not depend on whether A ran first).
    assert load_history(chain, [C1], ORDER, (MJD10, 10, 2)).data_ids == []

    # C (next visit) sees A and B (MJD10 rounds up in the index names).
    history = load_history(chain, [C1], ORDER, (101.0, 11, 1))
    assert history.data_ids == [(float(f"{MJD10:.8f}"), 10, 1), (float(f"{MJD10:.8f}"), 10, 2)]
    assert history.objects["diaObjectId"].tolist() == [1]  # object 3 is outside C1
    assert history.objects["ra"].tolist() == [150.0002]  # B's version, the later detector

    # A itself: an equal key is excluded, so nothing (but full-schema, typed frames).
    empty = load_history(chain, [C1], ORDER, (MJD10, 10, 1))
    assert empty.data_ids == [] and empty.objects.empty and empty.sources.empty and empty.forced_sources.empty
    for frame, name in ((empty.objects, "DiaObject"), (empty.sources, "DiaSource"),
                        (empty.forced_sources, "DiaForcedSource")):
        assert list(frame.columns) == column_names(name)

    # D: A, B, C; object 1's latest version is B's (same MJD as A, later detector).
    history = load_history(chain, [C1], ORDER, (102.0, 12, 1))
    assert [k[1:] for k in history.data_ids] == [(10, 1), (10, 2), (11, 1)]
    assert history.objects["diaObjectId"].tolist() == [1, 2]
    assert history.objects["ra"].tolist() == [150.0002, P2[0]]
    assert history.objects["nDiaSources"].tolist() == [2, 1]
    assert history.sources["psfFlux"].tolist() == [100.0, 110.0, 200.0]  # sorted by diaSourceId
    assert history.sources["diaSourceId"].is_monotonic_increasing
    assert sorted(history.forced_sources["psfFlux"].tolist()) == [90.0, 95.0, 190.0]
    assert isinstance(history.objects.index, pd.RangeIndex)
    assert list(history.sources.columns) == column_names("DiaSource")
    assert str(history.sources["diaObjectId"].dtype) == "Int64"

    # After everything: D's version; E never committed, so it is invisible.
    history = load_history(chain, [C1], ORDER, (200.0, 20, 1))
    assert [k[1:] for k in history.data_ids] == [(10, 1), (10, 2), (11, 1), (12, 1)]
    assert history.objects.set_index("diaObjectId")["ra"].to_dict() == {1: 150.0003, 2: P2[0]}
    assert 130.0 not in history.sources["psfFlux"].tolist()


def test_history_window_and_cells(chain):
    # Sources only from data IDs after 103 - 2.5 = 100.5 (C, D); objects have no time cut.
    history = load_history(chain, [C1], ORDER, (103.0, 13, 1), window_days=2.5)
    assert history.objects["diaObjectId"].tolist() == [1, 2]
    assert history.sources["psfFlux"].tolist() == [200.0, 120.0]
    assert sorted(history.forced_sources["visit"].unique().tolist()) == [11, 12]

    # The FAR cell: only the data IDs indexed there (F and A), only objects inside it.
    history = load_history(chain, [CFAR], ORDER, (200.0, 20, 1))
    assert [k[1:] for k in history.data_ids] == [(9, 5), (10, 1)]
    assert history.objects["diaObjectId"].tolist() == [3, 4]
    assert history.sources["psfFlux"].tolist() == [500.0, 300.0]
    assert history.forced_sources.empty

    # A cell nobody touched, and a cell list with both.
    assert load_history(chain, [C1 + 12345], ORDER, (200.0, 20, 1)).data_ids == []
    both = load_history(chain, [C1, CFAR], ORDER, (200.0, 20, 1))
    assert both.objects["diaObjectId"].tolist() == [1, 2, 3, 4]
    assert len(both.data_ids) == len(set(both.data_ids)) == 5


def test_history_missing_fragment_is_an_error(chain):
    path = fragment_path(chain, "DiaSource", 11, 1)
    path.unlink()
    with pytest.raises(ApdbError, match=re.escape(str(path))):
        load_history(chain, [C1], ORDER, (200.0, 20, 1))


# ---------------------------------------------------------------------------
# Apdb read API

def test_apdb_committed_and_objects(chain):
    db = Apdb(chain)
    committed = db.committed()
    assert committed[["visit", "detector"]].values.tolist() == [[9, 5], [10, 1], [10, 2], [11, 1], [12, 1]]
    assert committed["counts_DiaSource"].tolist() == [1, 3, 1, 1, 1]
    assert committed["nNewDiaObjects"].iloc[1] == 2

    current = db.objects()
    assert current["diaObjectId"].tolist() == [1, 2, 3, 4]
    assert current.set_index("diaObjectId")["ra"].to_dict() == {1: 150.0003, 2: P2[0], 3: FAR[0], 4: FAR[0]}
    assert list(current.columns) == column_names("DiaObject")

    early = db.objects(at_mjd=100.5)
    assert early.set_index("diaObjectId")["ra"].to_dict() == {1: 150.0002, 3: FAR[0], 4: FAR[0]}
    assert db.objects(at_mjd=99.5)["diaObjectId"].tolist() == [4]
    assert db.objects(at_mjd=50.0).empty

    assert db.objects(ra=150.0, dec=2.0, radius_deg=0.01)["diaObjectId"].tolist() == [1, 2]
    assert db.objects(ra=150.0, dec=2.0, radius_deg=0.0005)["diaObjectId"].tolist() == [1]
    assert db.objects(ra=150.0, dec=2.0, radius_deg=0.0005, at_mjd=101.5)["ra"].tolist() == [150.0002]
    with pytest.raises(ValueError):
        db.objects(ra=150.0, dec=2.0)


def test_apdb_cone_is_spherical(tmp_path):
    root = tmp_path / "out"
    near_pole = (10.0, 89.999)
    commit(root, 10, 1, MJD10, [int(cells_of(359.9999, 0.0, ORDER)[0])],
           obj=[(1, 359.9999, 0.0, 1, 1.0), (2, 0.01, 0.0, 1, 1.0), (3, *near_pole, 1, 1.0)])
    db = Apdb(root)
    assert db.objects(ra=0.0001, dec=0.0, radius_deg=0.001)["diaObjectId"].tolist() == [1]  # across RA 0
    # 0.001 deg from the pole in dec, 180 deg away in RA: 0.002 deg apart on the sky.
    assert db.objects(ra=190.0, dec=89.999, radius_deg=0.0025)["diaObjectId"].tolist() == [3]
    assert db.objects(ra=190.0, dec=89.999, radius_deg=0.0015).empty


def test_apdb_sources_and_lightcurve(chain):
    db = Apdb(chain)
    assert len(db.sources()) == 7  # E's source is not committed
    assert db.sources()["diaObjectId"].isna().sum() == 1
    assert db.sources([1])["psfFlux"].tolist() == [100.0, 110.0, 120.0]
    assert db.forced_sources(np.array([2]))["visit"].tolist() == [11, 12]

    curve = db.lightcurve(1)
    assert curve[["visit", "detector"]].values.tolist() == [[10, 1], [10, 2], [11, 1], [12, 1]]
    assert curve["midpointMjdTai"].tolist() == [MJD10, MJD10, 101.0, 102.0]
    np.testing.assert_array_equal(curve["psfFlux"], [100.0, 110.0, np.nan, 120.0])
    np.testing.assert_array_equal(curve["fpFlux"], [90.0, np.nan, 95.0, 115.0])
    # Forced science flux where there is a forced measurement, else the detection's.
    np.testing.assert_array_equal(curve["scienceFlux"], [2090.0, 1110.0, 2095.0, 2115.0])
    assert curve["diaSourceId"].isna().tolist() == [False, False, True, False]
    assert curve["band"].tolist() == ["g"] * 4
    assert list(curve.columns) == ["midpointMjdTai", "visit", "detector", "band", "diaSourceId", "psfFlux",
                                   "psfFluxErr", "fpFlux", "fpFluxErr", "scienceFlux", "scienceFluxErr"]
    assert db.lightcurve(4)["psfFlux"].tolist() == [500.0]
    with pytest.raises(ApdbError, match="unknown diaObjectId 99"):
        db.lightcurve(99)


def test_apdb_summary(chain, tmp_path):
    summary = Apdb(chain).summary()
    assert summary["data_ids"] == 5 and summary["visits"] == 4
    assert summary["rows"] == {"DiaSource": 7, "DiaObject": 6, "DiaForcedSource": 5}
    assert summary["objects"] == 4
    assert summary["objects_2plus_sources"] == 1
    assert summary["unassociated_sources"] == 1
    assert (summary["mjd_first"], summary["mjd_last"]) == (99.0, 102.0)
    (tmp_path / "empty" / "apdb").mkdir(parents=True)
    assert Apdb(tmp_path / "empty").summary()["data_ids"] == 0
    with pytest.raises(ApdbError, match="no APDB"):
        Apdb(tmp_path / "nowhere")


# ---------------------------------------------------------------------------
# CLI

def test_cli(chain, tmp_path, capsys):
    from apsnake.cli import main

    assert main(["apdb", "summary", "--root", str(chain)]) == 0
    out = capsys.readouterr().out
    assert "committed data IDs: 5 in 4 visits" in out and "4 objects (1 with >= 2 DiaSources)" in out
    assert "DiaSource: 7 rows (1 without a DiaObject)" in out

    assert main(["apdb", "lightcurve", "1", "--root", str(chain), "--csv"]) == 0
    curve = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert curve["visit"].tolist() == [10, 10, 11, 12] and curve["fpFlux"].isna().tolist() == [False, True, False, False]

    assert main(["apdb", "lightcurve", "1", "--root", str(chain)]) == 0
    table = capsys.readouterr().out
    assert "DiaObject 1: 4 visits" in table and f"{MJD10:.5f}" in table

    assert main(["apdb", "lightcurve", "99", "--root", str(chain)]) == 1
    assert "unknown diaObjectId 99" in capsys.readouterr().err
    assert main(["apdb", "summary", "--root", str(tmp_path / "nowhere")]) == 1
    assert "no APDB" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The README's DuckDB queries

def readme_sql() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Querying the APDB", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def test_readme_duckdb_queries(tmp_path, monkeypatch):
    duckdb = pytest.importorskip("duckdb")
    queries = readme_sql()
    assert len(queries) == 2
    root = build_chain(tmp_path / "out", with_uncommitted=False)
    # A temporary left by a killed writer must not be read as a fragment.
    leftover = apdb._tmp_path(fragment_path(root, "DiaSource", 12, 1))
    leftover.write_bytes(fragment_path(root, "DiaSource", 12, 1).read_bytes())
    monkeypatch.chdir(tmp_path)
    db = Apdb("out")

    current = duckdb.sql(queries[0]).df()
    expected = db.objects().sort_values(["g_psfFluxMean", "diaObjectId"], ascending=[False, True])
    assert current["diaObjectId"].tolist() == expected["diaObjectId"].tolist()
    assert current["ra"].tolist() == expected["ra"].tolist()

    per_visit = duckdb.sql(queries[1]).df()
    src = db.sources()
    assert per_visit["visit"].tolist() == [9, 10, 11, 12]
    assert per_visit["n_sources"].tolist() == src.groupby("visit").size().tolist()
    assert per_visit["n_associated"].tolist() == src.groupby("visit")["diaObjectId"].count().tolist()
