"""Alert packets in the Rubin alert schema: Avro files per data ID and, optionally, Kafka.

Modules
-------
``config``    ``AlertConfig`` (section ``alerts``) and ``KafkaConfig`` (``alerts.kafka``)
``records``   the ``lsst-alert-packet`` schema, its mapping onto the APDB tables, and
              ``to_records``, the one conversion of APDB rows into alert records
``cutouts``   difference / science / template cutouts as small FITS files in bytes
``avro``      writing and reading the Avro container files
``kafka``     the Confluent wire format and the producer
``package``   ``package_data_id``: one data ID's alerts (Rubin's PackageAlertsTask)

docs/formats.md (alert packets) describes the product and the column mapping.
"""

from apsnake.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "AlertFileError": "avro", "alert_path": "avro", "read_alert_file": "avro", "write_alert_file": "avro",
    "AlertConfig": "config", "KafkaConfig": "config",
    "CutoutError": "cutouts", "CutoutMaker": "cutouts", "cutout_origin": "cutouts", "cutout_size": "cutouts",
    "AlertDeliveryError": "kafka", "decode_message": "kafka", "encode_message": "kafka",
    "produce_alert_file": "kafka", "produce_alerts": "kafka",
    "AlertInputError": "package", "build_alerts": "package", "package_data_id": "package",
    "select_alert_sources": "package",
    "DROPPED_COLUMNS": "records", "REQUIRED_FILLS": "records", "UNFILLED_FIELDS": "records",
    "AlertSchema": "records", "AlertSchemaError": "records", "check_mapping": "records",
    "load_alert_schema": "records", "to_records": "records",
})

__all__ = [
    "DROPPED_COLUMNS", "REQUIRED_FILLS", "UNFILLED_FIELDS", "AlertConfig", "AlertDeliveryError", "AlertFileError",
    "AlertInputError", "AlertSchema", "AlertSchemaError", "CutoutError", "CutoutMaker", "KafkaConfig", "alert_path",
    "build_alerts", "check_mapping", "cutout_origin", "cutout_size", "decode_message", "encode_message",
    "load_alert_schema", "package_data_id", "produce_alert_file", "produce_alerts", "read_alert_file",
    "select_alert_sources", "to_records", "write_alert_file",
]
