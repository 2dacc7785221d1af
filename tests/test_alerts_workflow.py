"""Alert packets of the workflow run on the simulated `test` night (issue 12): every alert against
the installed schema and the APDB, the history, the cutouts against the products, the Kafka round
trip through the workflow on librdkafka's in-process broker, re-runs, the CLI and the README.

``--cores 1`` against ``--cores 2`` is checked in test_workflow.py
(test_association_is_the_same_with_one_core)."""

import io
import json
import math
import re
import socket
import time
import warnings
from pathlib import Path

import fastavro
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from apsnake import apdb, schema
from apsnake.alerts import decode_message, load_alert_schema, package_data_id, read_alert_file
from apsnake.alerts.records import REQUIRED_FILLS
from apsnake.apdb import Apdb
from apsnake.exposure import read_exposure

from workflow_helpers import _copy_run, _job_stats, _run

TEMPLATE_VISITS = (411371, 411372)
CUTOUTS = {"cutoutDifference": ("diffexp", "difference"), "cutoutScience": ("calexp", "science"),
           "cutoutTemplate": ("template", "template")}


@pytest.fixture(scope="module")
def run(workflow_run):
    """(out folder, science data IDs, {data ID: (metadata, alerts)})."""
    out = workflow_run[0] / "out"
    exposures = pd.read_parquet(out / "registry" / "exposures.parquet")
    science = sorted((int(v), int(d)) for v, d in zip(exposures["visit"], exposures["detector"])
                     if v not in TEMPLATE_VISITS)
    files = {data_id: read_alert_file(_alert_file(out, *data_id)) for data_id in science}
    return out, science, files


def _alert_file(out, visit, detector):
    return out / "alerts" / str(visit) / f"alerts_{visit}_{detector:02d}.avro"


def _fragment(out, table, visit, detector):
    return apdb.to_pandas(pq.read_table(apdb.fragment_path(out, table, visit, detector)))


def _rows(out, table, visit, detector):
    """The fragment's rows as {id: {column: value}}, read straight from the Parquet file."""
    rows = pq.read_table(apdb.fragment_path(out, table, visit, detector)).to_pylist()
    return {row[schema.column_names(table)[0]]: row for row in rows}


def _assert_record_is_the_row(record, row, table, where):
    """Every APDB column is in the record with its value and type (null -> None; the
    deliberate fills of REQUIRED_FILLS aside)."""
    assert list(record) == schema.column_names(table) == list(row), where
    for column, value in row.items():
        fill = REQUIRED_FILLS.get((table[0].lower() + table[1:], column))
        if value is None and fill is not None:
            assert record[column] == fill[0], (where, column)
        else:
            assert record[column] == value and type(record[column]) is type(value), (where, column, value,
                                                                                     record[column])
            assert not (isinstance(value, float) and math.isnan(value)), (where, column)  # NaN is stored as null


def test_every_alert_is_valid_and_carries_every_apdb_column(run):
    out, science, files = run
    alert_schema = load_alert_schema()
    total = 0
    for (visit, detector), (metadata, alerts) in files.items():
        path = _alert_file(out, visit, detector)
        assert metadata["apsnake.schema_id"] == "1101" and metadata["apsnake.schema_version"] == "11.1"
        assert metadata["avro.codec"] == "deflate"
        # Round trip through fastavro with the installed schema as the reader's schema.
        with open(path, "rb") as stream:
            again = list(fastavro.reader(stream, reader_schema=alert_schema.definition))
        assert again == alerts
        sources, objects = _rows(out, "DiaSource", visit, detector), _rows(out, "DiaObject", visit, detector)
        for alert in alerts:
            assert fastavro.validate(alert, alert_schema.definition, strict=True)
            where = f"{path.name} {alert['diaSourceId']}"
            _assert_record_is_the_row(alert["diaSource"], sources[alert["diaSourceId"]], "DiaSource", where)
            _assert_record_is_the_row(alert["diaObject"], objects[alert["diaSource"]["diaObjectId"]], "DiaObject",
                                      where)
            assert alert["ssSource"] is None and alert["mpc_orbits"] is None
        total += len(alerts)
    assert total >= 20


def test_one_alert_per_associated_dia_source(run):
    out, science, files = run
    for visit, detector in science:
        sources = _fragment(out, "DiaSource", visit, detector)
        associated = sources[sources["diaObjectId"].notna()]
        assert associated["reliability"].isna().all()  # no score yet: every associated source gets its alert
        alerts = files[(visit, detector)][1]
        ids = [a["diaSourceId"] for a in alerts]
        assert ids == sorted(associated["diaSourceId"].tolist()), (visit, detector)
        assert len(alerts) == len(associated) > 0


def test_previous_sources_are_the_earlier_detections(run):
    """prvDiaSources: null on a first detection; on a second detection exactly the first
    (the diaSource of the first detection's own alert)."""
    out, science, files = run
    by_source = {a["diaSourceId"]: a for _, alerts in files.values() for a in alerts}
    seconds = 0
    db = Apdb(out)
    forced = db.forced_sources()
    for (visit, detector), (_, alerts) in files.items():
        for alert in alerts:
            source, obj = alert["diaSource"], alert["diaObject"]
            earlier = [a for a in by_source.values() if a["diaSource"]["diaObjectId"] == obj["diaObjectId"]
                       and a["diaSource"]["midpointMjdTai"] < source["midpointMjdTai"]]
            if not earlier:
                assert alert["prvDiaSources"] is None, alert["diaSourceId"]
            else:
                assert alert["prvDiaSources"] == [a["diaSource"] for a in earlier]
                seconds += len(earlier) == 1
            # Forced photometry of the object up to and including this visit, in time order.
            mine = forced[(forced["diaObjectId"] == obj["diaObjectId"])
                          & (forced["midpointMjdTai"] <= source["midpointMjdTai"])]
            got = [f["diaForcedSourceId"] for f in alert["prvDiaForcedSources"] or ()]
            assert sorted(got) == sorted(mine["diaForcedSourceId"].tolist()), alert["diaSourceId"]
            assert [f["midpointMjdTai"] for f in alert["prvDiaForcedSources"] or ()] == sorted(
                f["midpointMjdTai"] for f in alert["prvDiaForcedSources"] or ())
            assert all(f["visit"] == visit for f in alert["prvDiaForcedSources"] or () if
                       f["midpointMjdTai"] == source["midpointMjdTai"])
    assert seconds >= 5


def test_cutouts_are_centred_and_hold_the_product_pixels(run):
    out, science, files = run
    visit, detector = science[-1]
    alerts = files[(visit, detector)][1]
    products = {name: read_exposure(out / name / str(visit) / f"{name}_{visit}_{detector:02d}.fits")
                for name, _ in CUTOUTS.values()}
    for alert in alerts:
        source = alert["diaSource"]
        for field, (name, kind) in CUTOUTS.items():
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                hdul = fits.open(io.BytesIO(alert[field]))
                hdul.verify("exception")
                wcs = WCS(hdul[0].header)
            header, image = hdul[0].header, hdul[0].data
            size = image.shape[0]
            assert image.shape == (size, size) and 30 <= size <= 102 and header["BUNIT"] == "nJy"
            assert header["DIASRCID"] == alert["diaSourceId"] and header["CUTOUT"] == kind
            # The WCS puts the source's (ra, dec) within 0.1 px of the cutout's centre
            # ((size - 1) / 2 moved by the centroid's fraction of a pixel: within half a pixel).
            px, py = wcs.world_to_pixel_values(source["ra"], source["dec"])
            assert abs(px - header["SRCX"]) < 0.1 and abs(py - header["SRCY"]) < 0.1
            assert abs(px - (size - 1) / 2) < 0.5 + 0.1 and abs(py - (size - 1) / 2) < 0.5 + 0.1
            x0, y0 = header["CUTX0"], header["CUTY0"]
            assert abs(source["x"] - x0 - header["SRCX"]) < 1e-6
            product = products[name]
            if 0 <= x0 and 0 <= y0 and x0 + size <= product.shape[1] and y0 + size <= product.shape[0]:
                box = (slice(y0, y0 + size), slice(x0, x0 + size))
                np.testing.assert_array_equal(image, product.image[box])
                np.testing.assert_array_equal(hdul["UNCERT"].data, product.variance[box])
                np.testing.assert_array_equal(hdul["MASK"].data, product.mask[box])
            assert hdul["PSFIMAGE"].data.sum() == pytest.approx(1.0, abs=1e-4)


def test_packaging_again_gives_the_same_file(run, tmp_path):
    """Re-running a data ID rewrites its alert file with the same bytes (same alerts, same
    order, fixed sync marker, no time in the metadata)."""
    out, science, _ = run
    visit, detector = science[-1]
    images = [out / name / str(visit) / f"{name}_{visit}_{detector:02d}.fits"
              for name in ("diffexp", "calexp", "template")]
    written = package_data_id(out, visit, detector, *images, output=tmp_path / "again.avro")
    assert (tmp_path / "again.avro").read_bytes() == _alert_file(out, visit, detector).read_bytes()
    assert written["n_alerts"] == len(run[2][(visit, detector)][1])
    log = (out / "logs" / "package_alerts" / str(visit) / f"package_alerts_{visit}_{detector:02d}.log").read_text()
    assert f"visit={visit} detector={detector}: {written['n_alerts']} alerts" in log


# ---------------------------------------------------------------------------
# Kafka through the workflow, on librdkafka's in-process mock broker

def _consume(bootstrap, topic, count, timeout_s=30.0):
    """Every message of ``topic`` (all partitions, from the start) until ``count`` are read."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "apsnake-test", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages, deadline = [], time.monotonic() + timeout_s
        while len(messages) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and not message.error():
                messages.append(message)
        return messages
    finally:
        consumer.close()


def test_kafka_round_trip_through_the_workflow(workflow_run, run, tmp_path):
    """alerts.kafka set: rule all plans one produce_alerts job per data ID; a delivery that
    fails fails the job and leaves the Avro file; against the in-process broker a separate
    consumer reads back every alert of the data ID in the Confluent wire format."""
    import yaml
    from confluent_kafka import Producer

    out, science, files = run
    visit, detector = science[0]
    copy, config = _copy_run(workflow_run, tmp_path, keep_apdb=True)
    alert_file = _alert_file(copy, visit, detector)
    report = alert_file.with_name(alert_file.name.replace(".avro", ".kafka.json"))
    settings = yaml.safe_load(config.read_text())

    with socket.socket() as sock:  # a port where nobody listens
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    settings["alerts"] = {"kafka": {"bootstrap_servers": dead, "topic": "decam-alerts", "delivery_timeout_s": 1}}
    config.write_text(yaml.safe_dump(settings))
    assert _job_stats(_run(tmp_path, config, "-n")) == {"produce_alerts": len(science), "all": 1}
    failed = _run(tmp_path, config, str(report), check=False)
    assert failed.returncode != 0 and not report.exists() and alert_file.exists()
    log = (copy / "logs" / "produce_alerts" / str(visit) / f"produce_alerts_{visit}_{detector:02d}.log").read_text()
    assert f"visit={visit} detector={detector} failed: data ID (visit={visit}, detector={detector})" in log
    assert re.search(r"\d+ of \d+ alerts were not delivered to topic 'decam-alerts'", log)

    cluster = Producer({"test.mock.num.brokers": 1})  # the in-process broker lives as long as this client
    brokers = cluster.list_topics(timeout=10).brokers.values()
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in brokers)
    settings["alerts"]["kafka"].update(bootstrap_servers=bootstrap, delivery_timeout_s=10)
    config.write_text(yaml.safe_dump(settings))
    proc = _run(tmp_path, config, str(report))
    assert "produce_alerts" in proc.stdout + proc.stderr and "package_alerts" not in proc.stdout + proc.stderr
    delivered = json.loads(report.read_text())
    alerts = files[(visit, detector)][1]
    assert delivered["n_alerts"] == len(alerts) and delivered["topic"] == "decam-alerts"
    assert delivered["schema_id"] == 1101 and sum(delivered["partitions"].values()) == len(alerts)

    messages = _consume(bootstrap, "decam-alerts", len(alerts))
    alert_schema = load_alert_schema()
    decoded = [decode_message(m.value(), alert_schema) for m in messages]
    assert all(m.value()[:5] == b"\x00\x00\x00\x04\x4d" for m in messages)  # 0, then 1101 big-endian
    assert sorted(decoded, key=lambda a: a["diaSourceId"]) == alerts
    assert all(m.key() == str(a["diaObject"]["diaObjectId"]).encode() for m, a in zip(messages, decoded))
    del cluster


# ---------------------------------------------------------------------------
# The command line and the README

def test_cli_show_and_cutouts(run, tmp_path, capsys):
    from apsnake.cli import main

    out, science, files = run
    visit, detector = science[-1]
    path = _alert_file(out, visit, detector)
    alerts = files[(visit, detector)][1]
    assert main(["alerts", "show", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{len(alerts)} alerts, schema 11.1 (id 1101), visit {visit} detector {detector}" in text
    assert "diaSourceId" in text and "nPrv" in text and str(alerts[0]["diaSourceId"]) in text
    first = alerts[0]
    assert main(["alerts", "cutouts", str(path), str(first["diaSourceId"]), "--out", str(tmp_path / "c")]) == 0
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == [f"{first['diaSourceId']}_{k}.fits" for k in ("difference", "science", "template")]
    assert (tmp_path / "c" / names[0]).read_bytes() == first["cutoutDifference"]
    assert main(["alerts", "cutouts", str(path), "7", "--out", str(tmp_path / "c")]) == 1
    assert "no alert with diaSourceId 7" in capsys.readouterr().err


def test_readme_alert_example(run, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Alert packets", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(examples) == 1
    out = run[0]
    monkeypatch.chdir(out.parent)
    alerts = run[2][(419802, 25)][1]
    assert "out/alerts/419802/alerts_419802_25.avro" in examples[0]
    exec(compile(examples[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert str(alerts[0]["diaSourceId"]) in printed
