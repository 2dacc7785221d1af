"""Alert packets on small tables and images: schema mapping, the row -> record conversion,
selection, cutouts, the Avro file, the Kafka wire format and a failed delivery (issue 12).

The alerts of a whole workflow run are tested in test_alerts_workflow.py."""

import io
import re
import socket
import struct
import warnings
from types import SimpleNamespace

import fastavro
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apsnake import schema
from apsnake.alerts import (AlertConfig, AlertDeliveryError, AlertFileError, AlertSchema, AlertSchemaError, CutoutMaker,
                            KafkaConfig, build_alerts, check_mapping, cutout_origin, cutout_size, decode_message,
                            encode_message, load_alert_schema, produce_alerts, read_alert_file, select_alert_sources,
                            to_records, write_alert_file)
from apsnake.alerts.records import DROPPED_COLUMNS, RECORD_TABLES, REQUIRED_FILLS, UNFILLED_FIELDS
from apsnake.exposure import Exposure, PsfModel, VisitInfo
from apsnake.options import OptionsError, dataclass_from_options

VISIT, DETECTOR, MJD = 419802, 25, 57098.1
WHERE = f"data ID (visit={VISIT}, detector={DETECTOR})"


@pytest.fixture(scope="module")
def alert_schema():
    return load_alert_schema()


def _record_definition(alert_schema, name):
    """The self-contained definition of a record of the alert schema (primitive types only)."""
    from apsnake.alerts.records import _named_records

    return _named_records(alert_schema.definition)[name]


# ---------------------------------------------------------------------------
# Small tables

def _sources(n=3, object_ids=(101, 102, None), reliability=(None, None, None)):
    rng = np.random.default_rng(3)
    return {
        "diaSourceId": np.arange(1000, 1000 + n, dtype=np.int64), "visit": np.full(n, VISIT),
        "detector": np.full(n, DETECTOR), "diaObjectId": pd.array(list(object_ids[:n]), dtype="Int64"),
        "midpointMjdTai": np.full(n, MJD), "ra": 150.0 + rng.uniform(0, 0.01, n), "dec": 2.0 + rng.uniform(0, 0.01, n),
        "x": np.array([40.3, 70.7, 150.2][:n], np.float32), "y": np.array([60.6, 20.5, 300.9][:n], np.float32),
        "psfFlux": np.array([1234.5, -87.25, np.nan][:n], np.float32), "psfFluxErr": np.full(n, 50.0, np.float32),
        "psfNdata": np.full(n, 441), "dipoleNdata": np.zeros(n, np.int32), "timeProcessedMjdTai": np.full(n, MJD + 0.1),
        "bboxSize": np.array([12, 64, 240][:n]), "band": np.full(n, "g"),
        "isNegative": np.array([False, True, False][:n]),
        "reliability": pd.array(list(reliability[:n]), dtype="Float32"),
    }


def _objects(ids=(101, 102)):
    n = len(ids)
    table = {"diaObjectId": np.array(ids, np.int64), "validityStartMjdTai": np.full(n, MJD),
             "ra": np.full(n, 150.0), "dec": np.full(n, 2.0), "nDiaSources": np.ones(n, np.int32),
             "g_psfFluxMean": np.full(n, 1000.0, np.float32)}
    for band in schema.BANDS:
        table[f"{band}_psfFluxNdata"] = np.ones(n, np.int32) if band == "g" else np.zeros(n, np.int32)
    return table


def _forced(ids=(101, 102, 999)):
    n = len(ids)
    return {"diaForcedSourceId": np.arange(5000, 5000 + n, dtype=np.int64), "diaObjectId": np.array(ids, np.int64),
            "ra": np.full(n, 150.0), "dec": np.full(n, 2.0), "visit": np.full(n, VISIT),
            "detector": np.full(n, DETECTOR),
            "psfFlux": np.array([10.0, np.nan, 3.0][:n]), "midpointMjdTai": np.full(n, MJD),
            "timeProcessedMjdTai": np.full(n, MJD + 0.1), "band": np.full(n, "g")}


def _exposure(seed=1, shape=(400, 300), scale=1.0):
    rng = np.random.default_rng(seed)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [150.5, 200.5]
    wcs.wcs.cd = np.array([[-0.263, 0.01], [0.01, 0.263]]) / 3600.0
    g = np.exp(-0.5 * ((np.arange(15) - 7) / 1.5) ** 2)
    comp = np.outer(g, g).astype(np.float32)
    psf = PsfModel(components=np.stack([comp, comp * 0.1, comp * 0.05]), spatial_order=1, x0=150.0, y0=200.0,
                   scale=200.0, fwhm_pixels=3.5)
    exp = Exposure(image=rng.normal(0, 10, shape).astype(np.float32), mask=np.zeros(shape, np.int32),
                   variance=rng.uniform(90, 110, shape).astype(np.float32),
                   visit_info=VisitInfo(visit=VISIT, band="g", mjd_mid_tai=MJD, object_name="field A"),
                   detector=DETECTOR, unit="nJy", wcs=wcs, psf=psf)
    exp.set_mask("SAT", exp.image > 25)
    if scale != 1.0:
        from apsnake.exposure import PhotoCalib

        exp.unit, exp.photo_calib = "adu", PhotoCalib(scale)
    return exp


# ---------------------------------------------------------------------------
# The schema and its mapping onto the APDB

def test_installed_schema_is_the_latest_and_every_apdb_column_has_its_field(alert_schema):
    import lsst.alert.packet as packet

    assert alert_schema.version == tuple(packet.get_latest_schema_version())
    assert alert_schema.version_string == schema.ALERT_SCHEMA_VERSION == "11.1"
    assert alert_schema.schema_id == 1101 and alert_schema.name == "lsst.v11_1.alert"
    check_mapping(alert_schema)
    assert DROPPED_COLUMNS == () and UNFILLED_FIELDS == ()  # nothing left out with 11.1
    for record, table in RECORD_TABLES.items():
        assert [f.name for f in alert_schema.fields(record)] == schema.column_names(table)
    # The deliberate fills are exactly the APDB's nullable columns that the schema requires.
    required_nullable = {(record, f.name) for record, table in RECORD_TABLES.items()
                         for f in alert_schema.fields(record) if not f.nullable
                         and next(c for c in schema.columns(table) if c.name == f.name).nullable}
    assert required_nullable == set(REQUIRED_FILLS) == {("diaSource", "trailNdata")}


def test_mapping_check_names_every_undeclared_difference(alert_schema):
    import copy

    definition = copy.deepcopy(alert_schema.definition)
    source = next(f for f in definition["fields"] if f["name"] == "diaSource")["type"]
    source["fields"] = [f for f in source["fields"] if f["name"] != "snr"]
    source["fields"].append({"name": "shinyNewColumn", "type": "float"})
    next(f for f in source["fields"] if f["name"] == "psfNdata")["type"] = "long"
    fake = AlertSchema(SimpleNamespace(definition=definition, get_schema_id=lambda: 1101), (11, 1))
    with pytest.raises(AlertSchemaError) as err:
        check_mapping(fake)
    message = str(err.value)
    assert "DiaSource columns not in diaSource and not in DROPPED_COLUMNS: snr" in message
    assert "diaSource.shinyNewColumn is required but the DiaSource table has no such column" in message
    assert "diaSource.psfNdata is Avro 'long', the DiaSource column int32" in message


# ---------------------------------------------------------------------------
# The conversion: rows -> records

def test_records_have_python_values_nulls_for_nan_and_the_deliberate_fill(alert_schema):
    records = to_records(pd.DataFrame(_sources()), "diaSource", alert_schema, WHERE)
    assert len(records) == 3 and list(records[0]) == schema.column_names("DiaSource")
    first, _, third = records
    assert type(first["diaSourceId"]) is int and type(first["x"]) is float and type(first["isNegative"]) is bool
    assert first["x"] == float(np.float32(40.3))  # float32 values kept exactly
    assert third["psfFlux"] is None and third["diaObjectId"] is None  # NaN / NA -> null
    assert first["exposureTime"] is None  # a column the rows lack: null (nullable)
    assert all(r["trailNdata"] == 0 for r in records)  # required by the schema, null in the APDB
    definition = _record_definition(alert_schema, "diaSource")
    for record in records:
        assert fastavro.validate(record, definition, strict=True)
    forced = to_records(_forced(), "diaForcedSource", alert_schema, WHERE)
    assert forced[1]["psfFlux"] is None and forced[0]["psfFlux"] == 10.0


def test_a_null_required_field_names_the_data_id_and_the_field(alert_schema):
    rows = pd.DataFrame(_sources())
    rows["x"] = rows["x"].astype("float64")
    rows.loc[1, "x"] = np.nan
    with pytest.raises(AlertSchemaError, match=r"data ID \(visit=419802, detector=25\).*DiaSource\.x: 1 null"):
        to_records(rows, "diaSource", alert_schema, WHERE)
    with pytest.raises(AlertSchemaError, match=r"data ID \(visit=419802, detector=25\).*'psfNdata' is missing"):
        to_records(rows.drop(columns=["psfNdata"]).fillna({"x": 1.0}), "diaSource", alert_schema, WHERE)


def test_a_column_the_schema_does_not_know_is_refused_not_dropped(alert_schema):
    rows = pd.DataFrame(_sources()).assign(myScore=1.0)
    with pytest.raises(AlertSchemaError, match="columns not in the schema: myScore"):
        to_records(rows, "diaSource", alert_schema, WHERE)


def test_selection_keeps_associated_sources_and_applies_reliability_once_scored():
    table = schema.conform(_sources(3, (101, 102, 103), (None, 0.2, 0.7)), "DiaSource")
    selected, counts = select_alert_sources(table, 0.5)
    assert selected["diaSourceId"].to_pylist() == [1000, 1002]
    assert counts == {"n_dia_sources": 3, "n_unassociated": 0, "n_below_reliability": 1}
    table = schema.conform(_sources(3, (None, 102, 101)), "DiaSource")
    selected, counts = select_alert_sources(table.take([2, 1, 0]), 0.5)
    assert selected["diaSourceId"].to_pylist() == [1001, 1002]  # sorted
    assert counts["n_unassociated"] == 1


def test_alert_config_from_the_yaml_section():
    cfg = dataclass_from_options(AlertConfig, {"cutout_min_size": 20, "kafka": {
        "bootstrap_servers": "k:9092", "properties": {"security.protocol": "SASL_SSL"}}}, "alerts")
    assert isinstance(cfg.kafka, KafkaConfig) and cfg.kafka.enabled and cfg.kafka.topic == "alerts"
    assert cfg.kafka.properties == {"security.protocol": "SASL_SSL"} and cfg.cutout_min_size == 20
    assert not AlertConfig().kafka.enabled
    with pytest.raises(OptionsError, match="alerts.codec"):
        dataclass_from_options(AlertConfig, {"codec": "snappy"}, "alerts")
    with pytest.raises(OptionsError, match="unknown alerts option"):
        dataclass_from_options(AlertConfig, {"min_reliabilty": 0.4}, "alerts")


# ---------------------------------------------------------------------------
# Cutouts

def test_cutout_size_and_origin():
    assert [cutout_size(b) for b in (5, 30, 57, 102, 500)] == [30, 30, 57, 102, 102]
    assert cutout_size(10, 16, 64) == 16
    for x in (10.0, 10.49, 10.51, 99.99):
        for size in (30, 31):
            x0, _ = cutout_origin(x, 0.0, size)
            assert abs(x - x0 - (size - 1) / 2) <= 0.5


@pytest.mark.parametrize("x, y, size", [(40.3, 60.6, 30), (150.0, 200.0, 31), (3.2, 395.1, 40), (297.8, 1.4, 30)])
def test_cutouts_are_the_product_pixels_with_a_celestial_wcs(x, y, size):
    from astropy.nddata import CCDData

    exposure = _exposure()
    data = CutoutMaker(exposure, "difference", "diffexp/419802/diffexp_419802_25.fits").cutout(x, y, size, 1234)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing astropy must fix or truncate
        hdul = fits.open(io.BytesIO(data))
        hdul.verify("exception")
        header = hdul[0].header
        wcs = WCS(header)
    assert [h.name for h in hdul] == ["PRIMARY", "MASK", "UNCERT", "PSFIMAGE"]
    assert hdul[0].data.shape == (size, size) and header["BUNIT"] == "nJy" and header["DIASRCID"] == 1234
    assert wcs.wcs.ctype[0] == "RA---TAN" and header["CUTOUT"] == "difference"
    x0, y0 = header["CUTX0"], header["CUTY0"]
    assert (header["SRCX"], header["SRCY"]) == (pytest.approx(x - x0), pytest.approx(y - y0))
    # The WCS puts the source where it is: ra, dec of (x, y) on the CCD -> (x - x0, y - y0) here.
    ra, dec = exposure.wcs.pixel_to_world_values(x, y)
    px, py = wcs.world_to_pixel_values(ra, dec)
    assert abs(px - (x - x0)) < 0.01 and abs(py - (y - y0)) < 0.01
    assert abs(px - (size - 1) / 2) <= 0.5 + 0.01 and abs(py - (size - 1) / 2) <= 0.5 + 0.01
    # Pixels: the product's where the box is on the CCD; 0 and NO_DATA beyond.
    ny, nx = exposure.shape
    rows, cols = np.arange(y0, y0 + size), np.arange(x0, x0 + size)
    on = ((rows >= 0) & (rows < ny))[:, None] & ((cols >= 0) & (cols < nx))[None, :]
    r, c = np.clip(rows, 0, ny - 1)[:, None], np.clip(cols, 0, nx - 1)[None, :]
    np.testing.assert_array_equal(hdul[0].data[on], exposure.image[r, c][on])
    np.testing.assert_array_equal(hdul["UNCERT"].data[on], exposure.variance[r, c][on])
    np.testing.assert_array_equal(hdul["MASK"].data[on], exposure.mask[r, c][on])
    no_data = exposure.bits("NO_DATA")
    assert (hdul["MASK"].data[~on] == no_data).all() and (hdul[0].data[~on] == 0).all()
    assert hdul["MASK"].header["MP_NO_DATA"] == 8 and hdul["MASK"].header["MP_SAT"] == 1
    np.testing.assert_allclose(hdul["PSFIMAGE"].data, exposure.psf.evaluate(x, y), rtol=1e-6, atol=1e-9)
    assert hdul["PSFIMAGE"].data.sum() == pytest.approx(1.0, abs=1e-5)
    # astropy's CCDData reads it as Rubin's cutouts are read: image, variance, mask, PSF, WCS.
    ccd = CCDData.read(io.BytesIO(data))
    assert str(ccd.unit) == "nJy" and type(ccd.uncertainty).__name__ == "VarianceUncertainty"
    assert ccd.psf.shape == (15, 15) and ccd.wcs.wcs.ctype[1] == "DEC--TAN"


def test_cutouts_of_an_image_in_instrumental_units_are_in_njy():
    exposure = _exposure(scale=2.5)
    hdul = fits.open(io.BytesIO(CutoutMaker(exposure, "science").cutout(100.0, 100.0, 30)))
    x0, y0 = hdul[0].header["CUTX0"], hdul[0].header["CUTY0"]
    np.testing.assert_allclose(hdul[0].data, exposure.image[y0:y0 + 30, x0:x0 + 30] * 2.5, rtol=1e-6)
    np.testing.assert_allclose(hdul["UNCERT"].data, exposure.variance[y0:y0 + 30, x0:x0 + 30] * 6.25, rtol=1e-6)


# ---------------------------------------------------------------------------
# Alerts of a small data ID, the Avro file and the wire format

@pytest.fixture(scope="module")
def small_alerts(alert_schema):
    sources = schema.conform(_sources(), "DiaSource")
    kinds = ("difference", "science", "template")
    images = {kind: (_exposure(seed), f"{kind}.fits") for seed, kind in enumerate(kinds)}
    return build_alerts(sources, schema.conform(_objects(), "DiaObject"), schema.conform(_forced(), "DiaForcedSource"),
                        None, images, alert_schema, AlertConfig(), WHERE, target_name="field A")


def test_alerts_of_a_small_data_id(small_alerts, alert_schema):
    alerts, counts = small_alerts
    assert [a["diaSourceId"] for a in alerts] == [1000, 1001]  # the unassociated source has none
    assert counts["n_alerts"] == 2 and counts["n_unassociated"] == 1
    assert counts["cutout_size_min"] == 30 and counts["cutout_size_max"] == 64  # bboxSize 12 -> 30, 64
    first = alerts[0]
    assert first["diaObject"]["diaObjectId"] == 101 and first["prvDiaSources"] is None  # first detection
    assert [f["diaForcedSourceId"] for f in first["prvDiaForcedSources"]] == [5000]  # this visit's, of its object
    assert first["ssSource"] is None and first["target_name"] == "field A"
    assert fits.open(io.BytesIO(alerts[1]["cutoutTemplate"]))[0].data.shape == (64, 64)
    assert fastavro.validate(first, alert_schema.definition, strict=True)


def test_alert_file_round_trip_and_the_same_bytes_twice(small_alerts, alert_schema, tmp_path):
    alerts, _ = small_alerts
    size = write_alert_file(tmp_path / "a.avro", alerts, alert_schema, VISIT, DETECTOR)
    write_alert_file(tmp_path / "b.avro", alerts, alert_schema, VISIT, DETECTOR)
    assert size == (tmp_path / "a.avro").stat().st_size
    assert (tmp_path / "a.avro").read_bytes() == (tmp_path / "b.avro").read_bytes()
    metadata, back = read_alert_file(tmp_path / "a.avro")
    assert metadata["apsnake.schema_id"] == "1101" and metadata["apsnake.schema_version"] == "11.1"
    assert metadata["apsnake.visit"] == str(VISIT) and metadata["apsnake.n_alerts"] == "2"
    assert back == alerts
    # The installed schema reads the file too (reader schema = writer schema).
    with open(tmp_path / "a.avro", "rb") as stream:
        assert list(fastavro.reader(stream, reader_schema=alert_schema.definition)) == alerts
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_embedded_schema_is_the_same_text_in_every_process():
    """fastavro's load_schema orders some keys by the hash seed; the schema we embed must not
    depend on it, or a re-run in another process writes different bytes."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, json; from apsnake.alerts import load_alert_schema; "
            "print(hashlib.md5(json.dumps(load_alert_schema().definition).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
               for seed in (1, 2, 3, 4)}
    assert len(digests) == 1, digests


def test_an_alert_that_does_not_fit_the_schema_is_not_written(small_alerts, alert_schema, tmp_path):
    alerts, _ = small_alerts
    extra = [dict(alerts[0]), {**alerts[1], "myField": 1}]
    with pytest.raises(AlertFileError, match=r"b\.avro: alert diaSourceId 1001 does not fit alert schema 11\.1"):
        write_alert_file(tmp_path / "b.avro", extra, alert_schema, VISIT, DETECTOR)
    assert not list(tmp_path.iterdir())
    with pytest.raises(AlertFileError, match="no such alert file"):
        read_alert_file(tmp_path / "none.avro")
    (tmp_path / "junk.avro").write_bytes(b"not avro at all")
    with pytest.raises(AlertFileError, match="junk.avro: not a readable Avro alert file"):
        read_alert_file(tmp_path / "junk.avro")


def test_wire_format(small_alerts, alert_schema):
    alert = small_alerts[0][0]
    message = encode_message(alert, alert_schema)
    assert message[0] == 0 and struct.unpack(">I", message[1:5])[0] == 1101
    assert message[5:] == alert_schema.packet_schema.serialize(alert)  # schemaless Avro, as lsst-alert-packet writes
    assert decode_message(message, alert_schema) == alert
    with pytest.raises(ValueError, match="not the wire format"):
        decode_message(b"\x01" + message[1:], alert_schema)
    with pytest.raises(ValueError, match="schema id 1100"):
        decode_message(message[:1] + struct.pack(">I", 1100) + message[5:], alert_schema)


def test_a_failed_delivery_raises(small_alerts, alert_schema):
    """Nothing listens on the port: the delivery times out and the error says so."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}", delivery_timeout_s=1.0)
    expected = re.escape(f"{WHERE}: 2 of 2 alerts were not delivered to topic 'alerts'")
    with pytest.raises(AlertDeliveryError, match=expected):
        produce_alerts(small_alerts[0], alert_schema, config, WHERE)
    with pytest.raises(AlertDeliveryError, match="not set"):
        produce_alerts(small_alerts[0], alert_schema, KafkaConfig(), WHERE)


def test_exposures_read_as_memory_maps_give_the_same_pixels(tmp_path):
    """``read_exposure(path, memmap=True)``, which the cutouts use: the same pixels, WCS and PSF,
    read on access; changing them never changes the file."""
    from apsnake.exposure import read_exposure, write_exposure

    exposure = _exposure()
    write_exposure(exposure, tmp_path / "e.fits")
    mapped = read_exposure(tmp_path / "e.fits", memmap=True)
    for plane in ("image", "mask", "variance"):
        np.testing.assert_array_equal(getattr(mapped, plane), getattr(exposure, plane))
    np.testing.assert_allclose(mapped.wcs.pixel_to_world_values([0, 299], [0, 399]),
                               exposure.wcs.pixel_to_world_values([0, 299], [0, 399]), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(mapped.psf.components, exposure.psf.components)
    before = (tmp_path / "e.fits").read_bytes()
    mapped.image[:10, :10] = 1e6
    assert (tmp_path / "e.fits").read_bytes() == before
