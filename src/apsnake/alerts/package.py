"""One data ID's alert packets (Rubin's ``PackageAlertsTask``; docs/formats.md, alerts).

``package_data_id`` reads what association committed for the data ID and writes its alert file:

1. the data ID's ``apdb_marker`` (it must be committed) and its three APDB fragments;
2. the DiaSources that get an alert: every one associated with a DiaObject (new or existing)
   whose ``reliability`` is null (no score yet) or at least ``min_reliability``; sorted by
   ``diaSourceId``, so a re-run writes the same file;
3. for each: ``diaSource``; ``diaObject``, the version this data ID wrote (its current state);
   ``prvDiaSources``, the object's DiaSources of earlier visits within ``history_window_days``
   (null on a first detection); ``prvDiaForcedSources``, its forced measurements within the
   window including this visit's (null if none); ``ssSource`` and ``mpc_orbits`` null (no
   solar-system association yet); ``target_name`` the exposure's ``OBJECT``;
4. the history comes from ``apdb.load_history`` with the marker's sky cells and the same
   "earlier visits only" rule as association, so it is what association saw, whatever later
   visits have committed since;
5. three cutouts per alert (``cutouts.CutoutMaker``) from the difference image, the calexp and
   the template, read as memory maps (only the cutouts' pixels are read);
6. the Avro file (``avro.write_alert_file``), atomically.

Producing to Kafka is a separate step on the written file (``kafka.produce_alert_file``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from apsnake import apdb
from apsnake.alerts.avro import alert_path, write_alert_file
from apsnake.alerts.config import AlertConfig
from apsnake.alerts.cutouts import CutoutMaker, cutout_size
from apsnake.alerts.records import AlertSchemaError, load_alert_schema, to_records
from apsnake.errors import ApsnakeError
from apsnake.exposure import Exposure, read_exposure

log = logging.getLogger(__name__)

#: Alert fields holding cutouts, and the image each is cut from.
CUTOUT_FIELDS = {"cutoutDifference": "difference", "cutoutScience": "science", "cutoutTemplate": "template"}


class AlertInputError(ApsnakeError, ValueError):
    """Inputs of one data ID's alerts that are missing or do not fit together."""


def _read_marker(root: Path, visit: int, detector: int, where: str) -> dict:
    path = apdb.marker_path(root, visit, detector)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AlertInputError(f"{where}: not committed to the APDB (no marker {path}); run its association "
                              "first") from None
    except (OSError, ValueError) as err:
        raise AlertInputError(f"{where}: unreadable APDB marker {path}: {err}") from None


def _read_fragment(root: Path, table: str, visit: int, detector: int, where: str) -> pa.Table:
    path = apdb.fragment_path(root, table, visit, detector)
    try:
        fragment = pq.read_table(path)
    except FileNotFoundError:
        raise AlertInputError(f"{where}: committed but its {table} fragment {path} is missing") from None
    except (OSError, pa.ArrowException) as err:
        raise AlertInputError(f"{where}: unreadable {table} fragment {path}: {err}") from None
    if table != "DiaObject" and fragment.num_rows:
        other = pc.sum(pc.or_(pc.not_equal(fragment["visit"], visit), pc.not_equal(fragment["detector"], detector)))
        if other.as_py():
            raise AlertInputError(f"{where}: {path} holds {other.as_py()} rows of another data ID")
    return fragment


def _open_image(value: Exposure | str | Path, kind: str, visit: int, detector: int, where: str) -> tuple[Exposure, str]:
    if isinstance(value, Exposure):
        exposure, name = value, f"{kind} exposure"
    else:
        exposure, name = read_exposure(value, memmap=True), str(value)
    if exposure.data_id != (visit, detector):
        raise AlertInputError(f"{where}: the {kind} image {name} is of data ID {exposure.data_id}")
    return exposure, name


def select_alert_sources(sources: pa.Table, min_reliability: float) -> tuple[pa.Table, dict]:
    """The DiaSources that get an alert, sorted by diaSourceId, and the counts of the others.

    An alert goes to every source associated with a DiaObject whose ``reliability`` is null
    (not scored yet: every associated source gets its alert) or >= ``min_reliability``.
    """
    associated = sources.filter(pc.is_valid(sources["diaObjectId"]))
    reliability = associated["reliability"]
    keep = pc.or_kleene(pc.is_null(reliability), pc.greater_equal(reliability, float(min_reliability)))
    selected = associated.filter(keep)
    selected = selected.take(pc.sort_indices(selected["diaSourceId"]))
    return selected, {"n_dia_sources": sources.num_rows,
                      "n_unassociated": sources.num_rows - associated.num_rows,
                      "n_below_reliability": associated.num_rows - selected.num_rows}


def _grouped(records: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for record in records:
        groups.setdefault(record["diaObjectId"], []).append(record)
    return groups


def _history_records(frame: pd.DataFrame, object_ids: np.ndarray, record: str, id_column: str, alert_schema,
                     where: str) -> dict[int, list[dict]]:
    """Records of the rows of ``object_ids`` in time order (midpointMjdTai, then id), by object."""
    if frame is None or len(frame) == 0:
        return {}
    rows = frame[frame["diaObjectId"].isin(object_ids)]
    rows = rows.sort_values(["midpointMjdTai", id_column], kind="stable")
    return _grouped(to_records(rows, record, alert_schema, where))


def build_alerts(sources: pa.Table, objects: pa.Table, forced: pa.Table, history: apdb.History | None,
                 images: dict[str, tuple[Exposure, str]], alert_schema, config: AlertConfig, where: str,
                 target_name: str | None = None) -> tuple[list[dict], dict]:
    """The alert records of one data ID (see the module docstring), and counts.

    Parameters
    ----------
    sources, objects, forced : pyarrow.Table
        The data ID's DiaSource, DiaObject and DiaForcedSource fragments.
    history : apsnake.apdb.History
        What ``apdb.load_history`` gives for the data ID (earlier visits only).
    images : dict
        'difference', 'science', 'template' -> (Exposure, file name).
    where : str
        The data ID and its files, for error messages.
    """
    selected, counts = select_alert_sources(sources, config.min_reliability)
    counts.update(n_alerts=selected.num_rows, n_prv_dia_sources=0, n_prv_dia_forced_sources=0)
    if selected.num_rows == 0:
        return [], counts
    source_records = to_records(selected, "diaSource", alert_schema, f"{where}, DiaSource fragment")
    object_records = {r["diaObjectId"]: r for r in to_records(objects, "diaObject", alert_schema,
                                                               f"{where}, DiaObject fragment")}
    object_ids = np.unique(selected["diaObjectId"].to_numpy())
    missing = [int(i) for i in object_ids if int(i) not in object_records]
    if missing:
        raise AlertInputError(f"{where}: DiaSources associated with DiaObjects that the data ID's DiaObject "
                              f"fragment has no version of: {', '.join(map(str, missing[:5]))}")
    previous = _history_records(history.sources if history else None, object_ids, "diaSource", "diaSourceId",
                                alert_schema, f"{where}, DiaSource history")
    own_forced = apdb.to_pandas(forced) if forced.num_rows else None
    forced_frames = [f for f in ((history.forced_sources if history else None), own_forced)
                     if f is not None and len(f)]
    forced_all = pd.concat(forced_frames, ignore_index=True) if forced_frames else None
    forced_records = _history_records(forced_all, object_ids, "diaForcedSource", "diaForcedSourceId", alert_schema,
                                      f"{where}, DiaForcedSource history")

    makers = {kind: CutoutMaker(exposure, kind, name) for kind, (exposure, name) in images.items()}
    alert_fields = alert_schema.fields("alert")
    alerts, sizes = [], []
    for source in source_records:
        object_id = source["diaObjectId"]
        size = cutout_size(source["bboxSize"], config.cutout_min_size, config.cutout_max_size)
        sizes.append(size)
        prv = previous.get(object_id)
        prv_forced = forced_records.get(object_id)
        counts["n_prv_dia_sources"] += len(prv or ())
        counts["n_prv_dia_forced_sources"] += len(prv_forced or ())
        values = {
            "diaSourceId": source["diaSourceId"], "observation_reason": None, "target_name": target_name or None,
            "diaSource": source, "prvDiaSources": prv or None, "prvDiaForcedSources": prv_forced or None,
            "diaObject": object_records[object_id], "ssSource": None, "mpc_orbits": None,
        }
        for field_name, kind in CUTOUT_FIELDS.items():
            values[field_name] = makers[kind].cutout(source["x"], source["y"], size, source["diaSourceId"])
        alert = {}
        for f in alert_fields:
            if f.name in values:
                alert[f.name] = values[f.name]
            elif f.nullable:
                alert[f.name] = None
            else:
                raise AlertSchemaError(f"{where}: alert schema {alert_schema.version_string} requires a field "
                                       f"{f.name!r} that apsnake does not fill")
        alerts.append(alert)
    counts["cutout_size_min"], counts["cutout_size_max"] = int(min(sizes)), int(max(sizes))
    return alerts, counts


def package_data_id(root: str | Path, visit: int, detector: int, difference: Exposure | str | Path,
                    science: Exposure | str | Path, template: Exposure | str | Path, output: str | Path | None = None,
                    config: AlertConfig | None = None) -> dict:
    """Write the alert file of one committed data ID; return what was written.

    Parameters
    ----------
    root : path
        The APDB root (the workflow's outdir).
    visit, detector : int
        The data ID; it must be committed (its ``apdb_marker`` exists).
    difference, science, template : Exposure or path
        The data ID's diffexp, calexp and template (paths are read as memory maps).
    output : path, optional
        The alert file; default ``root/alerts/{visit}/alerts_{visit}_{detector:02d}.avro``.
    config : AlertConfig, optional
        Options (section ``alerts``).

    Returns
    -------
    dict
        visit, detector, path, schema_version, schema_id, counts (DiaSources, alerts, sources left
        out and why, previous sources and forced sources sent), cutout sizes, bytes, bytes per
        alert, history data IDs read, and timings (s: history, opening the images, cutouts and
        records, writing, total).

    Raises
    ------
    AlertInputError, AlertSchemaError, AlertFileError, ExposureFormatError
        Bad input, each naming the data ID, the file and the problem.
    """
    started = time.perf_counter()
    cfg = config or AlertConfig()
    root, visit, detector = Path(root), int(visit), int(detector)
    output = Path(output) if output is not None else alert_path(root, visit, detector)
    where = f"data ID (visit={visit}, detector={detector})"
    alert_schema = load_alert_schema()
    marker = _read_marker(root, visit, detector, where)
    tables = {name: _read_fragment(root, name, visit, detector, where) for name in apdb.TABLES}
    t_history = time.perf_counter()
    history = None
    associated = pc.sum(pc.is_valid(tables["DiaSource"]["diaObjectId"])).as_py() if tables["DiaSource"].num_rows else 0
    if associated:
        try:
            history = apdb.load_history(root, marker["cells"], marker["healpix_order"],
                                        (float(marker["midpointMjdTai"]), visit, detector), cfg.history_window_days)
        except KeyError as err:
            raise AlertInputError(f"{where}: marker {apdb.marker_path(root, visit, detector)} lacks {err}") from None
    t_images = time.perf_counter()
    images = {}
    if associated:
        images = {kind: _open_image(value, kind, visit, detector, where)
                  for kind, value in (("difference", difference), ("science", science), ("template", template))}
        shapes = {kind: exposure.shape for kind, (exposure, _) in images.items()}
        if len(set(shapes.values())) > 1:
            raise AlertInputError(f"{where}: difference, science and template images differ in shape: {shapes}")
    target = images["science"][0].visit_info.object_name if images else None
    t_build = time.perf_counter()
    alerts, counts = build_alerts(tables["DiaSource"], tables["DiaObject"], tables["DiaForcedSource"], history,
                                  images, alert_schema, cfg, where, target_name=target)
    t_write = time.perf_counter()
    size = write_alert_file(output, alerts, alert_schema, visit, detector, codec=cfg.codec)
    done = time.perf_counter()
    return {
        "visit": visit, "detector": detector, "path": str(output), "schema_version": alert_schema.version_string,
        "schema_id": alert_schema.schema_id, **counts, "bytes": size,
        "bytes_per_alert": round(size / len(alerts)) if alerts else None,
        "history_data_ids": len(history.data_ids) if history else 0,
        "seconds_history": round(t_images - t_history, 4), "seconds_images": round(t_build - t_images, 4),
        "seconds_build": round(t_write - t_build, 4),
        "seconds_write": round(done - t_write, 4), "seconds": round(done - started, 4),
    }
