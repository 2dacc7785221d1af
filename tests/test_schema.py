"""The APDB / alert column definitions (apsnake.schema) and ``conform``."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apsnake import schema
from apsnake.schema import (ALERT_SCHEMA_VERSION, BANDS, DIA_FORCED_SOURCE_SCHEMA, DIA_OBJECT_SCHEMA,
                            DIA_SOURCE_SCHEMA, SCHEMA_DEVIATIONS, SchemaError, conform, empty_table)

# docs/formats.md §9: the columns we must fill.
MUST_FILL = {
    "DiaSource": """diaSourceId visit detector diaObjectId ssObjectId midpointMjdTai exposureTime ra raErr dec
        decErr x xErr y yErr centroid_flag apFlux apFluxErr apFlux_flag isNegative snr psfFlux psfFluxErr psfChi2
        psfNdata psfFlux_flag psfFlux_flag_edge psfFlux_flag_noGoodPixels dipoleMeanFlux dipoleFluxDiff
        dipoleLength dipoleAngle dipoleChi2 isDipole dipoleFitAttempted scienceFlux scienceFluxErr templateFlux
        templateFluxErr ixx iyy ixy ixxPSF iyyPSF ixyPSF shape_flag extendedness reliability band
        timeProcessedMjdTai bboxSize pixelFlags_bad pixelFlags_cr pixelFlags_crCenter pixelFlags_edge
        pixelFlags_nodata pixelFlags_nodataCenter pixelFlags_interpolated pixelFlags_interpolatedCenter
        pixelFlags_offimage pixelFlags_saturated pixelFlags_saturatedCenter pixelFlags_suspect
        pixelFlags_suspectCenter trailFlux trailLength trailAngle""".split(),
    "DiaObject": ["diaObjectId", "validityStartMjdTai", "ra", "raErr", "dec", "decErr", "nDiaSources",
                  "firstDiaSourceMjdTai", "lastDiaSourceMjdTai"]
                 + [f"{b}_{c}" for b in BANDS for c in (
                     "psfFluxMean", "psfFluxMeanErr", "psfFluxSigma", "psfFluxNdata", "psfFluxMin", "psfFluxMax",
                     "psfFluxMaxSlope", "psfFluxErrMean", "scienceFluxMean", "scienceFluxMeanErr", "fpFluxMean",
                     "fpFluxMeanErr")],
    "DiaForcedSource": """diaForcedSourceId diaObjectId ra dec visit detector psfFlux psfFluxErr midpointMjdTai
        scienceFlux scienceFluxErr band timeProcessedMjdTai""".split(),
}


def _minimal_dia_source(n=3):
    return pd.DataFrame({
        "diaSourceId": np.arange(n, dtype=np.int64) + 10, "visit": 411371, "detector": 56,
        "midpointMjdTai": 57000.25, "ra": np.linspace(150, 150.01, n), "dec": np.linspace(2, 2.01, n),
        "x": np.arange(n, dtype=float), "y": np.arange(n, dtype=float), "psfNdata": 625, "dipoleNdata": 0,
        "timeProcessedMjdTai": 60000.0, "bboxSize": 12,
    })


def test_tables_define_what_schemas_md_requires():
    for table, names in MUST_FILL.items():
        ours = set(schema.column_names(table))
        assert not set(names) - ours, table
    assert len(DIA_SOURCE_SCHEMA) == len(set(DIA_SOURCE_SCHEMA.names))
    for s in (DIA_SOURCE_SCHEMA, DIA_OBJECT_SCHEMA, DIA_FORCED_SOURCE_SCHEMA):
        for f in s:
            assert f.metadata[b"description"], f.name
    units = {c.name: c.unit for c in schema.columns("DiaSource")}
    assert units["ra"] == "deg" and units["psfFlux"] == "nJy" and units["midpointMjdTai"] == "d"
    assert units["x"] == "pixel" and units["ixx"] == "arcsec**2" and units["dipoleLength"] == "arcsec"
    assert DIA_SOURCE_SCHEMA.metadata[b"alert_schema_version"] == ALERT_SCHEMA_VERSION.encode()


def test_conform_orders_casts_and_fills_nulls():
    df = _minimal_dia_source()
    df = df[df.columns[::-1]]  # any order in
    df["psfFlux"] = [1.5, np.nan, -3.0]  # NaN = not measured -> null
    df["band"] = ["g", None, "VR"]
    table = conform(df, "DiaSource")
    assert table.schema.equals(DIA_SOURCE_SCHEMA)
    assert table.schema.field("detector").type == pa.int32()
    assert table.column("psfFlux").to_pylist() == [1.5, None, -3.0]
    assert table.column("band").to_pylist() == ["g", None, "VR"]
    for name in ("diaObjectId", "ssObjectId", "reliability", "trailFlux", "trailNdata", "isDipole", "snr"):
        assert table.column(name).null_count == 3, name
    assert table.column("visit").to_pylist() == [411371] * 3


def test_conform_accepts_arrow_tables_and_mappings():
    df = _minimal_dia_source(2)
    a = conform(pa.Table.from_pandas(df, preserve_index=False), "DiaSource")
    b = conform({k: df[k].to_numpy() for k in df.columns}, "diasource")
    assert a.equals(b)
    assert conform(pd.DataFrame({c: [] for c in df.columns}), "DiaSource").num_rows == 0


def test_conform_rejects_unknown_columns_unless_asked_to_drop():
    df = _minimal_dia_source()
    df["psfflux"] = 1.0  # a typo must not vanish silently
    with pytest.raises(SchemaError, match="psfflux"):
        conform(df, "DiaSource")
    table = conform(df, "DiaSource", extra="drop")
    assert "psfflux" not in table.column_names


def test_conform_rejects_missing_or_null_required_values():
    df = _minimal_dia_source()
    with pytest.raises(SchemaError, match="bboxSize"):
        conform(df.drop(columns="bboxSize"), "DiaSource")
    bad = df.copy()
    bad["ra"] = [150.0, np.nan, 150.1]
    with pytest.raises(SchemaError, match="ra"):
        conform(bad, "DiaSource")
    bad = df.copy()
    bad["visit"] = [1.0, 2.5, 3.0]  # not an integer
    with pytest.raises(SchemaError, match="visit"):
        conform(bad, "DiaSource")
    with pytest.raises(SchemaError, match="unknown table"):
        conform(df, "Object")


def test_empty_tables_and_parquet_round_trip(tmp_path):
    for name, s in (("DiaSource", DIA_SOURCE_SCHEMA), ("DiaObject", DIA_OBJECT_SCHEMA),
                    ("DiaForcedSource", DIA_FORCED_SOURCE_SCHEMA)):
        t = empty_table(name)
        assert t.num_rows == 0 and t.schema.equals(s)
    table = conform(_minimal_dia_source(), "DiaSource")
    pq.write_table(table, tmp_path / "s.parquet")
    back = pq.read_table(tmp_path / "s.parquet")
    assert back.equals(table)
    assert back.schema.field("psfFlux").metadata[b"unit"] == b"nJy"


def test_dia_object_band_columns():
    names = schema.column_names("DiaObject")
    for b in BANDS:
        assert f"{b}_psfFluxNdata" in names and f"{b}_fpFluxMeanErr" in names
    ndata = {c.name: c for c in schema.columns("DiaObject")}["g_psfFluxNdata"]
    assert not ndata.nullable and ndata.type == pa.int32()


# ---------------------------------------------------------------------------
# Against the Rubin alert schema shipped by lsst-alert-packet (not a dependency: skipped without it).
_AVRO_TO_ARROW = {"long": pa.int64(), "int": pa.int32(), "float": pa.float32(), "double": pa.float64(),
                  "boolean": pa.bool_(), "string": pa.string()}
_AVSC = {"DiaSource": "diaSource", "DiaObject": "diaObject", "DiaForcedSource": "diaForcedSource"}


def _avsc_fields(table):
    packet = pytest.importorskip("lsst.alert.packet", reason="lsst-alert-packet not installed")
    major, minor = (int(v) for v in ALERT_SCHEMA_VERSION.split("."))
    path = Path(packet.get_schema_path(major, minor)) / f"lsst.v{major}_{minor}.{_AVSC[table]}.avsc"
    if not path.exists():
        pytest.skip(f"lsst-alert-packet has no schema {ALERT_SCHEMA_VERSION}")
    return json.loads(path.read_text())["fields"]


@pytest.mark.parametrize("table", list(_AVSC))
def test_columns_match_the_rubin_alert_schema(table):
    fields = _avsc_fields(table)
    ours = schema.columns(table)
    assert [f["name"] for f in fields] == [c.name for c in ours]  # same names, same order
    for f, c in zip(fields, ours):
        avro = f["type"]
        nullable = isinstance(avro, list) and "null" in avro
        base = [t for t in avro if t != "null"][0] if isinstance(avro, list) else avro
        assert _AVRO_TO_ARROW[base] == c.type, (table, c.name, base, c.type)
        if (table, c.name) in SCHEMA_DEVIATIONS:
            assert c.nullable and not nullable
        else:
            assert nullable == c.nullable, (table, c.name)
        unit = re.search(r"\[([^\]]*)\]\s*\.?\s*$", f.get("doc", ""))
        if unit:  # the alert schema states units at the end of the doc string
            assert unit.group(1) == c.unit, (table, c.name, unit.group(1), c.unit)
