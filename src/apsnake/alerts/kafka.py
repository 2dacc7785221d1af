"""Producing alerts to Kafka, in the Confluent wire format (as Rubin's alert producer does).

Each message is one alert: a zero byte, the schema id as a 4-byte big-endian integer
(``AlertSchema.schema_id``, 1101 for schema 11.1), then the alert as schemaless Avro
(``fastavro.schemaless_writer``). Brokers (ALeRCE, Lasair, ANTARES) read this format with a
schema registry lookup of the id, or with the schema of ``lsst-alert-packet``. The message key is
the alert's ``diaObjectId``, so one object's alerts keep their order in one partition.

``produce_alerts`` waits until Kafka has acknowledged every message; a message that is not
delivered within ``delivery_timeout_s`` (or that Kafka refuses) raises ``AlertDeliveryError``
naming how many failed and why, so the job fails and nothing is lost silently. The Avro file
on disk, written before, stays the record of what the data ID's alerts are.
"""

from __future__ import annotations

import io
import logging
import struct
import time

import fastavro

from apsnake.alerts.config import KafkaConfig
from apsnake.errors import ApsnakeError

log = logging.getLogger(__name__)

#: First byte of a Confluent wire-format message.
MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")


class AlertDeliveryError(ApsnakeError, RuntimeError):
    """Alerts that Kafka did not acknowledge (the message names the data ID, topic and error)."""


def encode_message(alert: dict, alert_schema) -> bytes:
    """One alert in the Confluent wire format: 0, schema id (>I), schemaless Avro."""
    body = io.BytesIO()
    body.write(_HEADER.pack(MAGIC_BYTE, alert_schema.schema_id))
    fastavro.schemaless_writer(body, alert_schema.parsed, alert)
    return body.getvalue()


def decode_message(message: bytes, alert_schema) -> dict:
    """The alert in a Confluent wire-format message (the inverse of ``encode_message``).

    Raises ``ValueError`` if the message does not start with the magic byte or carries another
    schema id than ``alert_schema``'s.
    """
    if len(message) < _HEADER.size:
        raise ValueError(f"message of {len(message)} bytes is too short for the wire-format header")
    magic, schema_id = _HEADER.unpack_from(message)
    if magic != MAGIC_BYTE:
        raise ValueError(f"message starts with byte {magic}, not the wire format's {MAGIC_BYTE}")
    if schema_id != alert_schema.schema_id:
        raise ValueError(f"message has schema id {schema_id}, the schema given has {alert_schema.schema_id}")
    return fastavro.schemaless_reader(io.BytesIO(message[_HEADER.size:]), alert_schema.parsed)


def producer_settings(config: KafkaConfig) -> dict:
    """librdkafka settings of the producer: servers, compression, delivery timeout, and
    ``config.properties`` on top (security settings, ``message.max.bytes`` ...). An alert with
    three 102-px cutouts is ~400 kB, under librdkafka's default 1 MB message limit."""
    settings = {
        "bootstrap.servers": config.bootstrap_servers,
        "compression.type": config.compression,
        "delivery.timeout.ms": int(round(float(config.delivery_timeout_s) * 1000)),
        "linger.ms": 5,
    }
    settings.update(config.properties or {})
    return settings


def produce_alerts(alerts: list[dict], alert_schema, config: KafkaConfig, where: str) -> dict:
    """Send ``alerts`` to ``config.topic`` and wait until every one is acknowledged.

    Parameters
    ----------
    alerts : list of dict
        Records of ``alert_schema``.
    config : KafkaConfig
        Servers, topic, compression, delivery timeout, extra librdkafka settings.
    where : str
        What the alerts are (data ID, file), for messages.

    Returns
    -------
    dict
        topic, bootstrap_servers, n_alerts, n_bytes, partitions ({partition: messages}), seconds.

    Raises
    ------
    AlertDeliveryError
        Kafka did not acknowledge every message within the delivery timeout.
    """
    from confluent_kafka import KafkaException, Producer

    if not config.enabled:
        raise AlertDeliveryError(f"{where}: alerts.kafka.bootstrap_servers is not set, nothing to produce to")
    started = time.perf_counter()
    try:
        producer = Producer(producer_settings(config), logger=log)  # librdkafka's messages: the job log
    except KafkaException as err:
        raise AlertDeliveryError(f"{where}: cannot configure the Kafka producer: {err}") from None
    errors, partitions = [], {}

    def delivered(err, msg):
        if err is not None:
            errors.append(str(err))
        else:
            partitions[msg.partition()] = partitions.get(msg.partition(), 0) + 1

    n_bytes = 0
    for alert in alerts:
        value = encode_message(alert, alert_schema)
        n_bytes += len(value)
        key = str(alert["diaObject"]["diaObjectId"] if alert.get("diaObject") else alert["diaSourceId"]).encode()
        while True:
            try:
                producer.produce(config.topic, value=value, key=key, on_delivery=delivered)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                producer.poll(0.1)
            except KafkaException as err:
                raise AlertDeliveryError(f"{where}: Kafka refused an alert for topic {config.topic!r}: {err}") from None
        producer.poll(0)
    left = producer.flush(float(config.delivery_timeout_s) + 5.0)
    failed = len(errors) + left
    if failed:
        reason = errors[0] if errors else f"{left} still queued after {config.delivery_timeout_s + 5:.0f} s"
        raise AlertDeliveryError(
            f"{where}: {failed} of {len(alerts)} alerts were not delivered to topic {config.topic!r} at "
            f"{config.bootstrap_servers}: {reason}")
    return {"topic": config.topic, "bootstrap_servers": config.bootstrap_servers, "n_alerts": len(alerts),
            "n_bytes": n_bytes, "schema_id": alert_schema.schema_id,
            "partitions": {str(p): n for p, n in sorted(partitions.items())},
            "seconds": round(time.perf_counter() - started, 3)}


def produce_alert_file(path, config: KafkaConfig) -> dict:
    """Produce every alert of an alert file (``avro.write_alert_file``) to Kafka.

    The alerts are decoded with the schema embedded in the file and sent with the installed
    ``lsst-alert-packet`` schema of the same version (its id goes into the wire-format header).
    Returns ``produce_alerts``'s report plus the file, visit and detector.
    """
    from apsnake.alerts.avro import META_DETECTOR, META_SCHEMA_VERSION, META_VISIT, read_alert_file
    from apsnake.alerts.records import load_alert_schema

    metadata, alerts = read_alert_file(path)
    where = f"data ID (visit={metadata.get(META_VISIT)}, detector={metadata.get(META_DETECTOR)}), {path}"
    version = metadata.get(META_SCHEMA_VERSION, "")
    try:
        major, minor = (int(v) for v in version.split("."))
    except ValueError:
        raise AlertDeliveryError(f"{where}: no schema version in the file's metadata ({version!r})") from None
    report = produce_alerts(alerts, load_alert_schema((major, minor)), config, where)
    return {"path": str(path), "visit": int(metadata[META_VISIT]), "detector": int(metadata[META_DETECTOR]),
            **report}
