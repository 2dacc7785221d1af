"""The APDB: append-only Parquet fragments, one per table per data ID (docs/architecture.md §4).

Layout, all under one ``root`` folder (the workflow's outdir)::

    apdb/{table}/{visit}/{table}_{visit}_{detector:02d}.parquet     fragments, table in TABLES
    apdb/_cells/o{order}/{cell}/{visit}_{detector:02d}@{mjd:.8f}     cell index (empty files)
    apdb_marker/{visit}/apdb_marker_{visit}_{detector:02d}.json      commit marker

* Fragments: the association job of data ID (visit, detector) writes exactly one fragment of
  each table (possibly with zero rows, always with the full schema of ``apsnake.schema``):
  its DiaSources, its DiaForcedSources and one DiaObject *version* row for every object it
  created or updated.
* Cell index: one empty file per (HEALPix cell, data ID) whose padded footprint touches the
  cell, named with the data ID and its mid-exposure MJD so that the history of a region is
  found, and cut in time, by listing a few folders without opening any file. The index lives
  under ``_cells`` (skipped by pyarrow.dataset discovery) and its entries do not end in
  ``.parquet`` (so DuckDB's ``read_parquet('apdb/DiaObject/**/*.parquet')`` never sees them).
* Marker: JSON (visit, detector, midpointMjdTai, healpix_order, cells, counts per table and the
  caller's metrics). A data ID is *committed* iff its marker exists; readers here see only
  committed data IDs, and fragments without a marker are invisible.

Commit protocol (``commit_data_id``, the only writer): check the tables against the schema, drop
an old marker of the data ID, write the three fragments under hidden temporary names (not ending
in ``.parquet``) in their final folders, rename them into place, write the cell index entries,
and write the marker last (atomically). A crash at any point
therefore leaves either no marker (the data ID is not committed; its fragments, if any, are
ignored) or a marker over complete fragments. Re-running a data ID rewrites the same file names:
there is never a second copy of its rows.

Versioning: a DiaObject row's ``validityStartMjdTai`` is the ``midpointMjdTai`` of the visit that
wrote it. An object's current state is its row with the largest (validityStartMjdTai, visit,
detector), the last two being those of the fragment it came from. The same key (midpointMjdTai,
visit, detector) orders data IDs in the association chains (``apsnake.association.plan``).

Units follow the schema (``apsnake.schema``): positions in degrees (ICRS), fluxes in nJy, times
as MJD (TAI) in days.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from apsnake import atomic
from apsnake.errors import ApsnakeError
from apsnake.schema import arrow_schema, conform, empty_table
from apsnake.sphere import angular_separation_deg

log = logging.getLogger(__name__)

TABLES = ("DiaSource", "DiaObject", "DiaForcedSource")
#: Default history window for DiaSources and DiaForcedSources (12 x 30 days, as Rubin's APDB reads).
SOURCE_HISTORY_DAYS = 360.0
#: Decimals of the MJD in cell-index names (1e-8 d ~ 1 ms).
_MJD_DECIMALS = 8
#: Tolerance when checking that DiaObject versions start at the visit's midpoint (days).
_VALIDITY_TOLERANCE_DAYS = 1e-9
_ID_COLUMN = {"DiaSource": "diaSourceId", "DiaObject": "diaObjectId", "DiaForcedSource": "diaForcedSourceId"}


class ApdbError(ApsnakeError):
    """A missing, incomplete or inconsistent APDB (the message names the file or data ID)."""


# ---------------------------------------------------------------------------
# Paths

def _data_id_parts(visit, detector) -> tuple[str, str]:
    """(visit, detector) as path parts: integers formatted (detector zero-padded to 2 digits);
    two strings, e.g. the wildcards ``"{visit}"`` and ``"{detector}"`` of a rule, kept as given."""
    if isinstance(visit, str) and isinstance(detector, str) and not (visit.isdigit() and detector.isdigit()):
        return visit, detector
    return str(int(visit)), f"{int(detector):02d}"


def fragment_path(root: str | Path, table: str, visit, detector) -> Path:
    """``root/apdb/{table}/{visit}/{table}_{visit}_{detector:02d}.parquet``, the one place
    that spells a fragment's path (the workflow's rules call it with wildcard strings)."""
    if table not in TABLES:
        raise ValueError(f"unknown APDB table {table!r}; known: {', '.join(TABLES)}")
    visit, detector = _data_id_parts(visit, detector)
    return Path(root) / "apdb" / table / visit / f"{table}_{visit}_{detector}.parquet"


def marker_path(root: str | Path, visit, detector) -> Path:
    """``root/apdb_marker/{visit}/apdb_marker_{visit}_{detector:02d}.json`` (as ``fragment_path``)."""
    visit, detector = _data_id_parts(visit, detector)
    return Path(root) / "apdb_marker" / visit / f"apdb_marker_{visit}_{detector}.json"


def cell_index_dir(root: str | Path, order: int, cell: int) -> Path:
    """``root/apdb/_cells/o{order}/{cell}``: one empty file per data ID touching the cell."""
    return Path(root) / "apdb" / "_cells" / f"o{int(order)}" / str(int(cell))


def cell_index_name(visit: int, detector: int, midpoint_mjd_tai: float) -> str:
    """Name of a cell-index entry: ``{visit}_{detector:02d}@{midpointMjdTai:.8f}``."""
    return f"{int(visit)}_{int(detector):02d}@{float(midpoint_mjd_tai):.{_MJD_DECIMALS}f}"


def parse_cell_index_name(name: str) -> tuple[float, int, int]:
    """(midpointMjdTai, visit, detector) of a cell-index entry name."""
    data_id, mjd = name.split("@")
    visit, detector = data_id.split("_")
    return float(mjd), int(visit), int(detector)


def chain_key(midpoint_mjd_tai: float, visit: int, detector: int) -> tuple[float, int, int]:
    """The data-ID sort key (MJD TAI, visit, detector) at the MJD precision of the cell index.

    Comparing a key read from an index name with an exact MJD could put two detectors of one
    visit in the wrong order after rounding; both sides are therefore rounded the same way.
    """
    return float(f"{float(midpoint_mjd_tai):.{_MJD_DECIMALS}f}"), int(visit), int(detector)


# ---------------------------------------------------------------------------
# Writing

def _tmp_path(path: Path) -> Path:
    # Hidden, and not ending in .parquet: DuckDB's read_parquet('.../**/*.parquet') does match
    # hidden names, so a temporary left by a killed job must not look like a fragment.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_marker(marker: dict, path: Path) -> None:
    atomic.write_text(json.dumps(marker, indent=1, default=_json_default) + "\n", path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _check_data_id(table: pa.Table, name: str, visit: int, detector: int, midpoint_mjd_tai: float) -> None:
    where = f"data ID (visit={visit}, detector={detector}), {name}"
    if table.num_rows == 0:
        return
    if name in ("DiaSource", "DiaForcedSource"):
        bad_visit = pc.sum(pc.not_equal(table["visit"], visit)).as_py()
        bad_detector = pc.sum(pc.not_equal(table["detector"], detector)).as_py()
        if bad_visit or bad_detector:
            raise ApdbError(f"{where}: {bad_visit} rows of another visit and {bad_detector} of another detector")
    else:
        offset = pc.max(pc.abs(pc.subtract(table["validityStartMjdTai"], midpoint_mjd_tai))).as_py()
        if offset > _VALIDITY_TOLERANCE_DAYS:
            raise ApdbError(f"{where}: validityStartMjdTai differs from the visit midpoint "
                            f"{midpoint_mjd_tai} by up to {offset} d")


#: Columns that readers filter on: the only ones with Parquet min/max statistics. Statistics and
#: dictionaries on every column of these small, wide files cost more to read than they save.
_STATISTICS_COLUMNS = ("diaSourceId", "diaObjectId", "diaForcedSourceId", "visit", "detector",
                       "midpointMjdTai", "validityStartMjdTai", "ra", "dec", "band")


def _write_options(schema: pa.Schema) -> dict:
    return {"use_dictionary": [f.name for f in schema if pa.types.is_string(f.type)],
            "write_statistics": [c for c in _STATISTICS_COLUMNS if c in schema.names]}


def commit_data_id(root: str | Path, visit: int, detector: int, midpoint_mjd_tai: float, cells, order: int,
                   tables: dict, marker: dict | None = None) -> dict:
    """Write one data ID's fragments, cell index entries and (last) its marker.

    Parameters
    ----------
    root : path
        The APDB root (the workflow's outdir).
    visit, detector : int
        The data ID.
    midpoint_mjd_tai : float
        Mid-exposure time of the visit, MJD (TAI), days; every DiaObject row must carry it as
        ``validityStartMjdTai``.
    cells : iterable of int
        HEALPix cells (nested, ``order``) touched by the data ID's padded footprint.
    order : int
        HEALPix order of ``cells``.
    tables : dict
        'DiaSource', 'DiaObject', 'DiaForcedSource' -> pyarrow Table or pandas DataFrame; a
        missing table is written empty. Unknown columns raise (``apsnake.schema.conform``).
    marker : dict, optional
        Extra marker content (association metrics); JSON-serialisable.

    Returns
    -------
    dict
        The marker as written: the caller's keys plus visit, detector, midpointMjdTai,
        healpix_order, cells (sorted ints) and counts (rows per table).
    """
    root = Path(root)
    visit, detector, midpoint_mjd_tai = int(visit), int(detector), float(midpoint_mjd_tai)
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise ApdbError(f"data ID (visit={visit}, detector={detector}): unknown APDB tables {sorted(unknown)}")
    cells = sorted({int(c) for c in cells})
    if not cells:
        raise ApdbError(f"data ID (visit={visit}, detector={detector}): no sky cells; later data IDs "
                        "could never find its objects")
    conformed = {}
    for name in TABLES:
        data = tables.get(name)
        table = empty_table(name) if data is None else conform(data, name, extra="raise")
        _check_data_id(table, name, visit, detector, midpoint_mjd_tai)
        conformed[name] = table
    # A re-run is not committed until its own marker is written.
    old_cells = _uncommit(root, visit, detector)

    temporaries: dict[str, Path] = {}
    try:
        for name, table in conformed.items():
            path = fragment_path(root, name, visit, detector)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporaries[name] = _tmp_path(path)
            pq.write_table(table, temporaries[name], **_write_options(table.schema))
        for name in TABLES:
            os.replace(temporaries[name], fragment_path(root, name, visit, detector))
        _write_cell_index(root, visit, detector, midpoint_mjd_tai, cells, order, old_cells)
    except BaseException:
        for tmp in temporaries.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise

    written = dict(marker or {})
    written.update(visit=visit, detector=detector, midpointMjdTai=midpoint_mjd_tai, healpix_order=int(order),
                   cells=cells, counts={name: int(conformed[name].num_rows) for name in TABLES})
    _write_marker(written, marker_path(root, visit, detector))
    return written


def _uncommit(root: Path, visit: int, detector: int) -> dict[int, list[int]]:
    """Remove the data ID's marker (if any) and return its former cells, {order: cells}."""
    path = marker_path(root, visit, detector)
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        old = {}
    path.unlink(missing_ok=True)
    if "healpix_order" in old and "cells" in old:
        return {int(old["healpix_order"]): [int(c) for c in old["cells"]]}
    return {}


def _write_cell_index(root: Path, visit: int, detector: int, midpoint_mjd_tai: float, cells: list[int],
                      order: int, old_cells: dict[int, list[int]]) -> None:
    name = cell_index_name(visit, detector, midpoint_mjd_tai)
    prefix = f"{visit}_{detector:02d}@"
    for cell in cells:
        folder = cell_index_dir(root, order, cell)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    # Entries of an earlier run of this data ID that no longer apply (other cells, other MJD).
    stale_cells = {(int(o), int(c)) for o, cs in old_cells.items() for c in cs} | {(int(order), c) for c in cells}
    for o, cell in stale_cells:
        _remove_index_entries(cell_index_dir(root, o, cell), prefix,
                              keep=name if (o == int(order) and cell in cells) else None)


def _remove_index_entries(folder: Path, prefix: str, keep: str | None) -> None:
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.startswith(prefix) and entry != keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / entry)


def remove_data_id(root: str | Path, visit: int, detector: int) -> None:
    """Un-commit a data ID: delete its marker first (readers stop seeing it), then its fragments
    and the cell index entries its marker listed (entries left without a marker are ignored by
    readers and replaced by the next commit of the data ID)."""
    root = Path(root)
    visit, detector = int(visit), int(detector)
    old_cells = _uncommit(root, visit, detector)
    for name in TABLES:
        fragment_path(root, name, visit, detector).unlink(missing_ok=True)
    prefix = f"{visit}_{detector:02d}@"
    for order, cells in old_cells.items():
        for cell in cells:
            _remove_index_entries(cell_index_dir(root, order, cell), prefix, keep=None)


# ---------------------------------------------------------------------------
# Arrow -> pandas

def to_pandas(table: pa.Table) -> pd.DataFrame:
    """A schema table as a DataFrame with a fresh RangeIndex.

    Non-null integers stay numpy int64/int32; nullable integer and boolean columns become
    pandas ``Int64``/``Int32``/``boolean`` (so 64-bit ids stay exact next to nulls); floats
    keep NaN for null.
    """
    df = table.to_pandas()
    for schema_field in table.schema:
        if not schema_field.nullable:
            continue
        kind = schema_field.type
        if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
            column = table.column(schema_field.name)
            mask = pc.is_null(column).to_numpy(zero_copy_only=False)
            fill = False if pa.types.is_boolean(kind) else 0
            values = pc.fill_null(column, fill).to_numpy(zero_copy_only=False)
            if pa.types.is_boolean(kind):
                df[schema_field.name] = pd.arrays.BooleanArray(values.astype(bool), mask)
            else:
                df[schema_field.name] = pd.arrays.IntegerArray(values, mask)
    return df


def _empty_frame(name: str) -> pd.DataFrame:
    return to_pandas(empty_table(name))


# ---------------------------------------------------------------------------
# History for association

@dataclass
class History:
    """What the association of one data ID needs from the APDB.

    Attributes
    ----------
    objects : pandas.DataFrame
        Current DiaObjects (full schema) whose position falls in the requested cells, sorted by
        diaObjectId.
    sources, forced_sources : pandas.DataFrame
        DiaSources / DiaForcedSources of those objects within the time window, sorted by id.
    data_ids : list of (float, int, int)
        The committed data IDs whose fragments were read, (midpointMjdTai, visit, detector),
        in chain order; the MJD as the cell index holds it (8 decimals).
    """

    objects: pd.DataFrame
    sources: pd.DataFrame
    forced_sources: pd.DataFrame
    data_ids: list[tuple[float, int, int]] = field(default_factory=list)


def _indexed_data_ids(root: Path, cells, order: int) -> dict[tuple[int, int], float]:
    """{(visit, detector): midpointMjdTai} of the cell-index entries of ``cells``."""
    found: dict[tuple[int, int], float] = {}
    for cell in cells:
        try:
            entries = os.listdir(cell_index_dir(root, order, cell))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.startswith((".", "_")):
                continue
            try:
                mjd, visit, detector = parse_cell_index_name(entry)
            except ValueError:
                log.warning("ignoring malformed cell index entry %s", cell_index_dir(root, order, cell) / entry)
                continue
            found[(visit, detector)] = mjd
    return found


def _open(path: Path) -> tuple[Path, pq.ParquetFile]:
    """(path, open Parquet file): the footer is parsed once for all later reads of the file."""
    try:
        return path, pq.ParquetFile(path)
    except FileNotFoundError:
        raise ApdbError(f"committed data ID without its fragment: {path} is missing") from None
    except (OSError, pa.ArrowInvalid) as err:
        raise ApdbError(f"cannot read APDB fragment {path}: {err}") from None


def _read(fragment: tuple[Path, pq.ParquetFile], columns=None) -> pa.Table:
    path, parquet_file = fragment
    try:
        return parquet_file.read(columns=columns, use_threads=False)
    except (OSError, pa.ArrowInvalid) as err:
        raise ApdbError(f"cannot read APDB fragment {path}: {err}") from None


def _pool() -> ThreadPoolExecutor:
    """Threads for reading fragments (Parquet decoding releases the GIL)."""
    return ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8))


def _concat(parts: list[pa.Table], name: str) -> pa.Table:
    schema = arrow_schema(name)
    if not parts:
        return schema.empty_table()
    return pa.concat_tables([p if p.schema.equals(schema) else p.cast(schema) for p in parts])


def _latest_versions(object_ids: np.ndarray, validity: np.ndarray, visits: np.ndarray,
                     detectors: np.ndarray) -> np.ndarray:
    """Row indices of each object's latest version by (validityStart, visit, detector), sorted by id."""
    if object_ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((detectors, visits, validity, object_ids))
    ids_sorted = object_ids[order]
    last = np.ones(ids_sorted.size, dtype=bool)
    last[:-1] = ids_sorted[1:] != ids_sorted[:-1]
    return order[last]


def _rows_of_objects(path: Path, object_ids: pa.Array) -> pa.Table | None:
    """The rows of ``object_ids`` in one DiaSource / DiaForcedSource fragment (None if none).

    The diaObjectId column is decoded first, the whole fragment only if it holds some of them.
    """
    fragment = _open(path)
    with fragment[1]:
        keep = pc.is_in(_read(fragment, ["diaObjectId"])["diaObjectId"], value_set=object_ids)
        keep = pc.fill_null(keep, False)
        return _read(fragment).filter(keep) if pc.any(keep).as_py() else None


_OBJECT_KEYS = ["diaObjectId", "validityStartMjdTai", "ra", "dec"]


def _object_keys(path: Path):
    fragment = _open(path)
    return fragment, _read(fragment, _OBJECT_KEYS)


def load_history(root: str | Path, cells, order: int, before: tuple[float, int, int],
                 window_days: float = SOURCE_HISTORY_DAYS) -> History:
    """The APDB history that the association of the data ID ``before`` sees in ``cells``.

    Reads only the fragments of committed data IDs listed in the cell index of ``cells``
    that belong to an earlier visit: (midpointMjdTai, visit) sorts strictly before that of
    ``before``. Other detectors of the same visit are never read: detectors of one exposure
    do not overlap on the sky, so they cannot share a DiaObject, and reading them would make
    the result depend on which one ran first.

    Parameters
    ----------
    root : path
        The APDB root.
    cells : iterable of int
        HEALPix cells (nested, ``order``) of the data ID being associated.
    order : int
        HEALPix order of ``cells`` (and of the cell index read).
    before : (float, int, int)
        (midpointMjdTai, visit, detector) of the data ID being associated; only data IDs of
        visits that precede it are read (its own visit, itself included, is excluded).
    window_days : float
        DiaSources and DiaForcedSources are read from data IDs with
        midpointMjdTai > before[0] - window_days (days). DiaObjects have no time cut.

    Returns
    -------
    History
        Objects whose current position is in ``cells``, their sources and forced sources in
        the window; full-schema DataFrames sorted by id.

    Raises
    ------
    ApdbError
        A committed data ID whose fragment is missing or unreadable.
    """
    from apsnake.association.plan import cells_of

    root = Path(root)
    cells = sorted({int(c) for c in cells})
    limit = chain_key(*before)
    candidates = _indexed_data_ids(root, cells, order)
    data_ids = sorted((mjd, visit, detector) for (visit, detector), mjd in candidates.items()
                      if (mjd, visit) < limit[:2] and marker_path(root, visit, detector).exists())

    with _pool() as pool:
        # DiaObject: the keys of every version the earlier data IDs wrote, the latest version per
        # object, then the full rows of those in cells, from the fragments that hold them.
        opened = list(pool.map(_object_keys, [fragment_path(root, "DiaObject", v, d) for _, v, d in data_ids]))
        rows_per_file = np.array([keys.num_rows for _, keys in opened], dtype=np.int64)
        keys = pa.concat_tables([k for _, k in opened]) if opened else empty_table("DiaObject").select(_OBJECT_KEYS)
        file_of_row = np.repeat(np.arange(len(data_ids)), rows_per_file)
        latest = _latest_versions(keys["diaObjectId"].to_numpy(), keys["validityStartMjdTai"].to_numpy(),
                                  np.array([v for _, v, _ in data_ids], dtype=np.int64)[file_of_row],
                                  np.array([d for _, _, d in data_ids], dtype=np.int64)[file_of_row])
        if latest.size:
            latest = latest[np.isin(cells_of(keys["ra"].to_numpy()[latest], keys["dec"].to_numpy()[latest], order),
                                    cells)]
        row_in_file = latest - (np.cumsum(rows_per_file) - rows_per_file)[file_of_row[latest]]
        winners = [(opened[i][0], row_in_file[file_of_row[latest] == i]) for i in np.unique(file_of_row[latest])]
        objects = _concat(list(pool.map(lambda fw: _read(fw[0]).take(fw[1]), winners)), "DiaObject")
        for fragment, _ in opened:
            fragment[1].close()
        objects = objects.take(pc.sort_indices(objects["diaObjectId"]))
        object_ids = objects["diaObjectId"].combine_chunks()

        # DiaSource, DiaForcedSource: rows of those objects in the data IDs inside the window.
        recent = [(v, d) for mjd, v, d in data_ids if mjd > limit[0] - float(window_days)]
        if len(object_ids) == 0:
            recent = []
        tasks = {name: [pool.submit(_rows_of_objects, fragment_path(root, name, v, d), object_ids)
                        for v, d in recent] for name in ("DiaSource", "DiaForcedSource")}
        history = {}
        for name, futures in tasks.items():
            table = _concat([t for t in (f.result() for f in futures) if t is not None], name)
            history[name] = table.take(pc.sort_indices(table[_ID_COLUMN[name]]))
    return History(objects=to_pandas(objects), sources=to_pandas(history["DiaSource"]),
                   forced_sources=to_pandas(history["DiaForcedSource"]), data_ids=data_ids)


# ---------------------------------------------------------------------------
# Read API

class Apdb:
    """Read-only view of the committed data IDs of an APDB.

    Only data IDs with a marker (``root/apdb_marker/*/*.json``) are visible; the marker list is
    read once, when the object is made (make a new ``Apdb`` to see later commits).

    Parameters
    ----------
    root : path
        The APDB root (the workflow's outdir, holding ``apdb/`` and ``apdb_marker/``).

    Raises
    ------
    ApdbError
        ``root`` holds no APDB (neither ``apdb/`` nor ``apdb_marker/``), or a marker is unreadable.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "apdb").is_dir() and not (self.root / "apdb_marker").is_dir():
            raise ApdbError(f"no APDB under {self.root} (no apdb/ or apdb_marker/ folder)")
        markers = []
        for path in sorted((self.root / "apdb_marker").glob("*/apdb_marker_*.json")):
            if path.name.startswith("."):
                continue
            try:
                markers.append(json.loads(path.read_text()))
            except (OSError, ValueError) as err:
                raise ApdbError(f"unreadable APDB marker {path}: {err}") from None
        markers.sort(key=lambda m: (float(m["midpointMjdTai"]), int(m["visit"]), int(m["detector"])))
        self._markers = markers

    # -- committed data IDs -------------------------------------------------
    def committed(self) -> pd.DataFrame:
        """One row per committed data ID in chain order: visit, detector, midpointMjdTai,
        healpix_order, n_cells, counts_{table} (rows) and the marker's other scalar entries."""
        rows = []
        for marker in self._markers:
            row = {"visit": int(marker["visit"]), "detector": int(marker["detector"]),
                   "midpointMjdTai": float(marker["midpointMjdTai"]),
                   "healpix_order": marker.get("healpix_order"), "n_cells": len(marker.get("cells", []))}
            row.update({f"counts_{name}": marker.get("counts", {}).get(name) for name in TABLES})
            for key, value in marker.items():
                if key not in row and key not in ("cells", "counts") and not isinstance(value, (list, dict)):
                    row[key] = value
            rows.append(row)
        columns = ["visit", "detector", "midpointMjdTai", "healpix_order", "n_cells",
                   *(f"counts_{name}" for name in TABLES)]
        return pd.DataFrame(rows, columns=columns if not rows else None)

    def fragments(self, table: str) -> list[Path]:
        """Fragment files of ``table`` of the committed data IDs, in chain order."""
        return [fragment_path(self.root, table, m["visit"], m["detector"]) for m in self._markers]

    def dataset(self, table: str) -> ds.Dataset:
        """A pyarrow dataset over the committed fragments of ``table``."""
        paths = self.fragments(table)
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ApdbError(f"committed data IDs without their {table} fragment: {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        return ds.dataset([str(p) for p in paths], schema=arrow_schema(table), format="parquet")

    # -- tables ---------------------------------------------------------------
    def objects(self, ra: float | None = None, dec: float | None = None, radius_deg: float | None = None,
                at_mjd: float | None = None) -> pd.DataFrame:
        """Current DiaObjects, sorted by diaObjectId.

        Parameters
        ----------
        ra, dec, radius_deg : float, optional
            A cone (degrees): keep objects whose current position lies within ``radius_deg``
            of (ra, dec). All three or none.
        at_mjd : float, optional
            The state as of this MJD (TAI): each object's latest version with
            validityStartMjdTai <= at_mjd (objects created later are absent).
        """
        cone = (ra, dec, radius_deg)
        if any(v is not None for v in cone) and any(v is None for v in cone):
            raise ValueError("a cone needs ra, dec and radius_deg (degrees)")
        dataset = self.dataset("DiaObject")
        time_filter = None if at_mjd is None else ds.field("validityStartMjdTai") <= float(at_mjd)
        # Pass 1: the version keys only; pass 2: the full rows of the winning versions.
        keys = dataset.to_table(columns=["diaObjectId", "validityStartMjdTai", "ra", "dec", "__filename"],
                                filter=time_filter)
        file_names = pa.array([str(p) for p in self.fragments("DiaObject")])
        frag = pc.index_in(keys["__filename"], value_set=file_names).to_numpy().astype(np.int64)
        visits = np.array([m["visit"] for m in self._markers], dtype=np.int64)
        detectors = np.array([m["detector"] for m in self._markers], dtype=np.int64)
        latest = _latest_versions(keys["diaObjectId"].to_numpy(), keys["validityStartMjdTai"].to_numpy(),
                                  visits[frag] if frag.size else frag, detectors[frag] if frag.size else frag)
        if ra is not None and latest.size:
            sep = angular_separation_deg(ra, dec, keys["ra"].to_numpy()[latest], keys["dec"].to_numpy()[latest])
            latest = latest[sep <= float(radius_deg)]
        if latest.size == 0:
            return _empty_frame("DiaObject")
        winners = pd.DataFrame({"diaObjectId": keys["diaObjectId"].to_numpy()[latest], "frag": frag[latest]})
        wanted_files = sorted(set(winners["frag"]))
        paths = self.fragments("DiaObject")
        sub = ds.dataset([str(paths[i]) for i in wanted_files], schema=arrow_schema("DiaObject"), format="parquet")
        id_filter = pc.field("diaObjectId").isin(pa.array(winners["diaObjectId"].to_numpy()))
        if time_filter is not None:
            id_filter = id_filter & time_filter
        full = sub.to_table(columns=[*arrow_schema("DiaObject").names, "__filename"], filter=id_filter)
        full_frag = pc.index_in(full["__filename"], value_set=file_names).to_numpy().astype(np.int64)
        chosen = pd.MultiIndex.from_frame(winners)
        keep = pd.MultiIndex.from_arrays([full["diaObjectId"].to_numpy(), full_frag]).isin(chosen)
        full = full.drop_columns(["__filename"]).filter(pa.array(keep))
        full = full.take(pc.sort_indices(full["diaObjectId"]))
        return to_pandas(full)

    def _table_of_objects(self, name: str, object_ids) -> pd.DataFrame:
        dataset = self.dataset(name)
        flt = None
        if object_ids is not None:
            ids = pa.array(np.atleast_1d(np.asarray(object_ids, dtype=np.int64)))
            flt = pc.field("diaObjectId").isin(ids)
        table = dataset.to_table(filter=flt)
        return to_pandas(table.take(pc.sort_indices(table[_ID_COLUMN[name]])))

    def sources(self, object_ids=None) -> pd.DataFrame:
        """DiaSources (of ``object_ids`` when given), sorted by diaSourceId."""
        return self._table_of_objects("DiaSource", object_ids)

    def forced_sources(self, object_ids=None) -> pd.DataFrame:
        """DiaForcedSources (of ``object_ids`` when given), sorted by diaForcedSourceId."""
        return self._table_of_objects("DiaForcedSource", object_ids)

    def lightcurve(self, object_id: int) -> pd.DataFrame:
        """The light curve of one DiaObject: one row per (visit, detector) measured, in time order.

        Columns: midpointMjdTai (MJD TAI), visit, detector, band, diaSourceId (null where not
        detected), psfFlux/psfFluxErr (the detection's difference-image flux, nJy; null where
        not detected), fpFlux/fpFluxErr (the forced difference-image flux at the object's
        position, nJy), scienceFlux/scienceFluxErr (forced flux on the science image, nJy; the
        detection's when there is no forced measurement).

        Raises
        ------
        ApdbError
            No committed DiaObject, DiaSource or DiaForcedSource has this id.
        """
        object_id = int(object_id)
        sources = self.sources([object_id])
        forced = self.forced_sources([object_id])
        if sources.empty and forced.empty:
            known = self.dataset("DiaObject").count_rows(filter=ds.field("diaObjectId") == object_id)
            if not known:
                raise ApdbError(f"unknown diaObjectId {object_id} in the APDB at {self.root}")
        key = ["visit", "detector"]
        det = sources[[*key, "midpointMjdTai", "band", "diaSourceId", "psfFlux", "psfFluxErr",
                       "scienceFlux", "scienceFluxErr"]]
        fp = forced[[*key, "midpointMjdTai", "band", "psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr"]]
        fp = fp.rename(columns={"psfFlux": "fpFlux", "psfFluxErr": "fpFluxErr"})
        # An object detected twice in one data ID (split detections) keeps its brightest |flux|.
        det = det.assign(_abs=det["psfFlux"].abs()).sort_values("_abs", ascending=False, kind="stable")
        det = det.drop_duplicates(key).drop(columns="_abs")
        curve = det.merge(fp, on=key, how="outer", suffixes=("", "_fp"))
        for column in ("midpointMjdTai", "band"):
            curve[column] = curve[column].where(curve[column].notna(), curve[f"{column}_fp"])
        has_forced = curve["fpFlux"].notna() | curve["scienceFlux_fp"].notna()
        for column in ("scienceFlux", "scienceFluxErr"):
            curve[column] = curve[f"{column}_fp"].where(has_forced, curve[column])
        curve = curve.sort_values(["midpointMjdTai", "visit", "detector"], kind="stable")
        columns = ["midpointMjdTai", "visit", "detector", "band", "diaSourceId", "psfFlux", "psfFluxErr",
                   "fpFlux", "fpFluxErr", "scienceFlux", "scienceFluxErr"]
        curve = curve[columns].reset_index(drop=True)
        curve["diaSourceId"] = curve["diaSourceId"].astype("Int64")
        return curve

    def summary(self) -> dict:
        """Counts of the committed APDB.

        Keys: data_ids, visits, rows (per table), objects (distinct current DiaObjects),
        objects_2plus_sources (objects with >= 2 DiaSources), unassociated_sources (DiaSources
        with null diaObjectId), mjd_first / mjd_last (MJD TAI of the first / last committed visit,
        None when empty).
        """
        rows = {name: int(self.dataset(name).count_rows()) for name in TABLES}
        object_ids = self.dataset("DiaObject").to_table(columns=["diaObjectId"])["diaObjectId"]
        source_objects = self.dataset("DiaSource").to_table(columns=["diaObjectId"])["diaObjectId"]
        associated = source_objects.drop_null()
        two_plus = 0
        if len(associated):
            per_object = pc.value_counts(associated).field("counts")
            two_plus = int(pc.sum(pc.greater_equal(per_object, 2)).as_py())
        mjds = [float(m["midpointMjdTai"]) for m in self._markers]
        return {
            "root": str(self.root),
            "data_ids": len(self._markers),
            "visits": len({int(m["visit"]) for m in self._markers}),
            "rows": rows,
            "objects": int(pc.count_distinct(object_ids).as_py()) if len(object_ids) else 0,
            "objects_2plus_sources": two_plus,
            "unassociated_sources": int(source_objects.null_count),
            "mjd_first": min(mjds) if mjds else None,
            "mjd_last": max(mjds) if mjds else None,
        }
