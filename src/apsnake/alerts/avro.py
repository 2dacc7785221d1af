"""Alert files: Avro object container files, the schema embedded (what AMPEL and Fink read).

One file per data ID, ``alerts/{visit}/alerts_{visit}_{detector:02d}.avro``, written atomically.
Its metadata (``apsnake.*`` keys, strings) hold the schema id and version, the data ID and the
alert count; no time of writing, and the file's 16-byte sync marker is derived from the data ID
instead of drawn at random, so the same alerts give the same bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import fastavro

from apsnake.atomic import atomic_output
from apsnake.errors import ApsnakeError

#: Metadata keys of an alert file (values are strings).
META_SCHEMA_ID = "apsnake.schema_id"
META_SCHEMA_VERSION = "apsnake.schema_version"
META_VISIT, META_DETECTOR, META_COUNT = "apsnake.visit", "apsnake.detector", "apsnake.n_alerts"


class AlertFileError(ApsnakeError, ValueError):
    """An alert file that cannot be written or read (the message names the file)."""


def alert_path(root: str | Path, visit, detector) -> Path:
    """``root/alerts/{visit}/alerts_{visit}_{detector:02d}.avro``."""
    visit, detector = int(visit), int(detector)
    return Path(root) / "alerts" / str(visit) / f"alerts_{visit}_{detector:02d}.avro"


def sync_marker(visit: int, detector: int) -> bytes:
    """The file's 16-byte Avro sync marker: fixed per data ID, so that rewrites are reproducible."""
    return hashlib.md5(f"apsnake alerts {int(visit)} {int(detector)}".encode()).digest()


def write_alert_file(path: str | Path, alerts: list[dict], alert_schema, visit: int, detector: int,
                     codec: str = "deflate") -> int:
    """Write ``alerts`` (records of ``alert_schema``) to an Avro container file, atomically.

    fastavro checks every record against the schema as it writes (``strict``: a key the schema
    does not know is an error too, so nothing is dropped on the way). Returns the file size in
    bytes.

    Raises
    ------
    AlertFileError
        A record that does not fit the schema (naming the file, the diaSourceId and fastavro's
        message); nothing is written then.
    """
    path = Path(path)
    metadata = {META_SCHEMA_ID: str(alert_schema.schema_id), META_SCHEMA_VERSION: alert_schema.version_string,
                META_VISIT: str(int(visit)), META_DETECTOR: str(int(detector)), META_COUNT: str(len(alerts))}
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as out:
            try:
                fastavro.writer(out, alert_schema.definition, alerts, codec=codec, metadata=metadata,
                                sync_marker=sync_marker(visit, detector), strict=True)
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                bad = _first_invalid(alerts, alert_schema)
                raise AlertFileError(f"{path}: alert {bad} does not fit alert schema "
                                     f"{alert_schema.version_string}: {err}") from err
    return path.stat().st_size


def _first_invalid(alerts, alert_schema) -> str:
    """'diaSourceId N' of the first alert fastavro rejects (for the error message)."""
    import io

    for alert in alerts:
        try:
            fastavro.schemaless_writer(io.BytesIO(), alert_schema.parsed, alert, strict=True)
        except Exception:  # noqa: BLE001 - any rejection names the alert
            return f"diaSourceId {alert.get('diaSourceId') if isinstance(alert, dict) else alert!r}"
    return "?"


def read_alert_file(path: str | Path) -> tuple[dict, list[dict]]:
    """(metadata, alerts) of an alert file, decoded with the schema embedded in it.

    Raises ``AlertFileError`` naming the file if it is missing or not an Avro container file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            reader = fastavro.reader(stream)
            alerts = list(reader)
            metadata = {key: value.decode() if isinstance(value, bytes) else value
                        for key, value in reader.metadata.items()}
    except FileNotFoundError:
        raise AlertFileError(f"{path}: no such alert file") from None
    except (OSError, ValueError, EOFError, StopIteration, KeyError) as err:
        raise AlertFileError(f"{path}: not a readable Avro alert file: {err}") from None
    return metadata, alerts


def alert_summary(alerts: list[dict]):
    """One row per alert: diaSourceId, diaObjectId, ra, dec (deg), psfFlux, psfFluxErr (nJy), S/N
    (psfFlux / psfFluxErr), snr (detection significance), nPrv (previous DiaSources), nForced
    (forced sources), cutout sizes (``WxH`` of difference / science / template)."""
    import pandas as pd

    from apsnake.alerts.cutouts import cutout_shape

    rows = []
    for alert in alerts:
        source = alert["diaSource"]
        flux, err = source.get("psfFlux"), source.get("psfFluxErr")
        rows.append({
            "diaSourceId": alert["diaSourceId"], "diaObjectId": source.get("diaObjectId"),
            "ra": source["ra"], "dec": source["dec"], "psfFlux": flux, "psfFluxErr": err,
            "S/N": flux / err if flux is not None and err else None, "snr": source.get("snr"),
            "nPrv": len(alert.get("prvDiaSources") or ()), "nForced": len(alert.get("prvDiaForcedSources") or ()),
            **{name: cutout_shape(alert.get(f"cutout{name.capitalize()}"))
               for name in ("difference", "science", "template")},
        })
    columns = ["diaSourceId", "diaObjectId", "ra", "dec", "psfFlux", "psfFluxErr", "S/N", "snr", "nPrv", "nForced",
               "difference", "science", "template"]
    return pd.DataFrame(rows, columns=columns)


#: Alert field of each cutout, by the name used in cutout file names.
CUTOUT_FILE_FIELDS = {"difference": "cutoutDifference", "science": "cutoutScience", "template": "cutoutTemplate"}


def write_cutouts(alerts: list[dict], dia_source_id: int, folder: str | Path) -> list[Path]:
    """Write the cutouts of the alert of ``dia_source_id`` as ``{folder}/{id}_{difference,science,
    template}.fits`` (atomically); return the paths. Raises ``AlertFileError`` if there is no such
    alert."""
    matches = [a for a in alerts if int(a["diaSourceId"]) == int(dia_source_id)]
    if not matches:
        known = ", ".join(str(a["diaSourceId"]) for a in alerts[:5])
        raise AlertFileError(f"no alert with diaSourceId {dia_source_id} (the file has {len(alerts)}: {known}"
                             f"{' ...' if len(alerts) > 5 else ''})")
    paths = []
    for name, field_name in CUTOUT_FILE_FIELDS.items():
        data = matches[0].get(field_name)
        if data is None:
            continue
        path = Path(folder) / f"{int(dia_source_id)}_{name}.fits"
        with atomic_output(path) as tmp:
            Path(tmp).write_bytes(data)
        paths.append(path)
    return paths
