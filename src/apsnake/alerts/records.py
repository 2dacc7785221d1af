"""The Rubin alert schema and the one conversion of APDB rows into alert records.

The schema is the one the PyPI package ``lsst-alert-packet`` ships (``Schema.from_file()``; the
latest installed version, ``get_latest_schema_version()``, 11.1 today). Its ``diaSource``,
``diaObject`` and ``diaForcedSource`` records have exactly the columns of our APDB tables
(``apsnake.schema``, which follows the same schema), so a record is a projection of an APDB row:

* ``check_mapping`` (run when a schema is loaded) compares the two column lists and their types
  and raises unless every difference is declared here: APDB columns left out of the alerts
  (``DROPPED_COLUMNS``, none with 11.1) and alert fields the APDB does not have
  (``UNFILLED_FIELDS``, sent as null; none with 11.1). Nothing is dropped silently, and a new
  schema version that renames or retypes a column stops the packaging with the column named.
* ``to_records`` is the only place where rows become Avro records: the rows pass
  ``apsnake.schema.conform`` (types cast, NaN -> null), values become Python types (through
  Arrow), and a null in a field the alert schema requires is an error naming the data ID, the
  field and the rows, except for the deliberate fills of ``REQUIRED_FILLS``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import fastavro
import pyarrow as pa
import pyarrow.compute as pc

from apsnake import schema as apdb_schema
from apsnake.errors import ApsnakeError

#: Alert record name -> the APDB table its rows come from.
RECORD_TABLES = {"diaSource": "DiaSource", "diaObject": "DiaObject", "diaForcedSource": "DiaForcedSource"}
_ID_COLUMNS = {"diaSource": "diaSourceId", "diaObject": "diaObjectId", "diaForcedSource": "diaForcedSourceId"}

#: APDB columns deliberately not sent in alerts, as (table, column, reason). With alert schema
#: 11.1 every APDB column has its field (the APDB follows that schema), so nothing is dropped.
DROPPED_COLUMNS: tuple[tuple[str, str, str], ...] = ()

#: Alert fields without an APDB column, sent as null, as (record, field, reason). None with 11.1.
UNFILLED_FIELDS: tuple[tuple[str, str, str], ...] = ()

#: Fields the alert schema requires but the APDB may hold as null: (record, field) -> (value
#: sent instead, why). ``trailNdata`` is nullable in the APDB (``apsnake.schema.SCHEMA_DEVIATIONS``:
#: no trailed-source fit yet); an alert says 0 pixels were used, the convention of
#: ``dipoleNdata`` for a dipole that was not fitted.
REQUIRED_FILLS: dict[tuple[str, str], tuple[object, str]] = {
    ("diaSource", "trailNdata"): (0, "no trailed-source fit yet: 0 pixels used (as dipoleNdata = 0 without a fit)"),
}

_AVRO_TO_ARROW = {"long": pa.int64(), "int": pa.int32(), "float": pa.float32(), "double": pa.float64(),
                  "boolean": pa.bool_(), "string": pa.string()}


class AlertSchemaError(ApsnakeError, ValueError):
    """The installed alert schema and the APDB tables do not fit together, or rows that cannot
    become alert records (the message names the data ID, the file and the field)."""


@dataclass(frozen=True)
class AvroField:
    """One field of an Avro record: name, type (a primitive name, or the definition) and whether
    null is allowed."""

    name: str
    type: object
    nullable: bool


def _base_type(avro_type):
    """(type without null, nullable) of an Avro field type."""
    if isinstance(avro_type, list):
        others = [t for t in avro_type if t != "null"]
        return (others[0] if len(others) == 1 else others), len(others) < len(avro_type)
    return avro_type, False


def _named_records(definition) -> dict[str, dict]:
    """Every record definition inside a (fastavro-loaded) schema, by short name."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "record" and "fields" in node:
                found.setdefault(str(node["name"]).split(".")[-1], node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(definition)
    return found


class AlertSchema:
    """An alert schema of ``lsst-alert-packet`` and what we need of it.

    Attributes
    ----------
    packet_schema : lsst.alert.packet.Schema
        The package's schema object.
    version : tuple of int
        (major, minor), e.g. (11, 1).
    definition : dict
        The Avro schema as plain JSON data, keys sorted (the same text in every process): what
        alert files embed.
    parsed : dict
        The same, parsed by fastavro once, for the per-record writers and readers.
    schema_id : int
        The id Rubin registers the schema under (``Schema.get_schema_id()``: 1101 for 11.1),
        written in the Confluent wire-format header of each Kafka message and in the Avro files'
        metadata.
    """

    def __init__(self, packet_schema, version: tuple[int, int]):
        self.packet_schema = packet_schema
        self.version = (int(version[0]), int(version[1]))
        # fastavro's schema parsing orders the keys of some dicts by the interpreter's hash
        # seed. The plain definition, keys sorted, is what goes into alert files (the same text
        # in every process, so re-packaging gives the same bytes); the parsed one is for speed.
        plain = {key: value for key, value in packet_schema.definition.items() if not key.startswith("__")}
        self.definition = json.loads(json.dumps(plain, sort_keys=True))
        self.parsed = fastavro.parse_schema(self.definition)
        self.schema_id = int(packet_schema.get_schema_id())
        self._records = {name: [AvroField(f["name"], *_base_type(f["type"])) for f in record["fields"]]
                         for name, record in _named_records(self.definition).items()}

    @property
    def version_string(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def name(self) -> str:
        return str(self.definition["name"])

    def fields(self, record: str) -> list[AvroField]:
        """The fields of a record of the schema ('alert', 'diaSource', 'diaObject', ...)."""
        try:
            return self._records[record]
        except KeyError:
            raise AlertSchemaError(f"alert schema {self.version_string} has no record {record!r}; "
                                   f"it has {', '.join(sorted(self._records))}") from None


@functools.lru_cache(maxsize=4)
def load_alert_schema(version: tuple[int, int] | None = None) -> AlertSchema:
    """The alert schema of the installed ``lsst-alert-packet``, checked against the APDB columns.

    Parameters
    ----------
    version : (major, minor), optional
        A schema version the package ships; default the latest (``get_latest_schema_version()``).

    Raises
    ------
    AlertSchemaError
        The package lacks the version, or its records do not map onto the APDB tables
        (``check_mapping``).
    """
    import lsst.alert.packet as packet

    major, minor = version if version is not None else packet.get_latest_schema_version()
    path = Path(packet.get_schema_path(major, minor)) / f"lsst.v{major}_{minor}.alert.avsc"
    if not path.exists():
        raise AlertSchemaError(f"lsst-alert-packet has no alert schema {major}.{minor} (no {path})")
    alert_schema = AlertSchema(packet.Schema.from_file(str(path)), (major, minor))
    check_mapping(alert_schema)
    return alert_schema


def check_mapping(alert_schema: AlertSchema) -> None:
    """Check that the APDB columns map onto the alert records, every difference declared.

    Raises ``AlertSchemaError`` listing: APDB columns without a field that ``DROPPED_COLUMNS``
    does not list, fields without a column that are required or not listed in
    ``UNFILLED_FIELDS``, listed names that no longer differ, and columns whose types differ.
    """
    problems = []
    for record, table in RECORD_TABLES.items():
        fields = {f.name: f for f in alert_schema.fields(record)}
        columns = {c.name: c for c in apdb_schema.columns(table)}
        dropped = {c for t, c, _ in DROPPED_COLUMNS if t == table}
        unfilled = {f for r, f, _ in UNFILLED_FIELDS if r == record}
        if lost := sorted(set(columns) - set(fields) - dropped):
            problems.append(f"{table} columns not in {record} and not in DROPPED_COLUMNS: {', '.join(lost)}")
        if stale := sorted(dropped & set(fields)):
            problems.append(f"{table} columns listed in DROPPED_COLUMNS but in {record}: {', '.join(stale)}")
        for name in sorted(set(fields) - set(columns)):
            if not fields[name].nullable:
                problems.append(f"{record}.{name} is required but the {table} table has no such column")
            elif name not in unfilled:
                problems.append(f"{record}.{name} has no {table} column and is not in UNFILLED_FIELDS")
        if stale := sorted(unfilled & set(columns)):
            problems.append(f"{record} fields listed in UNFILLED_FIELDS but in {table}: {', '.join(stale)}")
        for name in sorted(set(fields) & set(columns)):
            wanted = _AVRO_TO_ARROW.get(fields[name].type) if isinstance(fields[name].type, str) else None
            if wanted != columns[name].type:
                problems.append(f"{record}.{name} is Avro {fields[name].type!r}, the {table} column "
                                f"{columns[name].type}")
    if problems:
        raise AlertSchemaError(f"alert schema {alert_schema.version_string} ({alert_schema.name}) does not fit "
                               f"the APDB tables of apsnake.schema: " + "; ".join(problems))


def to_records(rows, record: str, alert_schema: AlertSchema, where: str) -> list[dict]:
    """APDB rows as Avro records of ``record`` ('diaSource', 'diaObject', 'diaForcedSource').

    The one conversion from Parquet rows to alert records: the rows pass
    ``apsnake.schema.conform`` (columns ordered and cast, NaN -> null, unknown columns refused),
    ``DROPPED_COLUMNS`` are left out, ``UNFILLED_FIELDS`` are null, required fields that are null
    get their ``REQUIRED_FILLS`` value or raise, and the values become Python types.

    Parameters
    ----------
    rows : pyarrow.Table, pandas.DataFrame or mapping of columns
        Rows of the record's APDB table.
    where : str
        What the rows are (data ID and file), for error messages.

    Raises
    ------
    AlertSchemaError
        The rows do not fit the APDB schema, or a required field is null (naming ``where``,
        the field and the rows' ids).
    """
    table_name = RECORD_TABLES[record]
    try:
        table = apdb_schema.conform(rows, table_name, extra="raise")
    except apdb_schema.SchemaError as err:
        raise AlertSchemaError(f"{where}: {err}") from None
    columns = {}
    for f in alert_schema.fields(record):
        if f.name not in table.column_names:  # UNFILLED_FIELDS (check_mapping allows no others)
            columns[f.name] = pa.nulls(table.num_rows)
            continue
        column = table.column(f.name)
        if not f.nullable and column.null_count:
            fill = REQUIRED_FILLS.get((record, f.name))
            if fill is None:
                ids = table.column(_ID_COLUMNS[record]).filter(pc.is_null(column)).to_pylist()
                raise AlertSchemaError(
                    f"{where}: {record}.{f.name} is required by alert schema {alert_schema.version_string} but null "
                    f"in {column.null_count} {table_name} rows ({_ID_COLUMNS[record]} "
                    f"{', '.join(map(str, ids[:5]))}{' ...' if len(ids) > 5 else ''})")
            column = pc.fill_null(column, pa.scalar(fill[0], column.type))
        columns[f.name] = column
    return pa.table(columns).to_pylist()
