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

from apsnake.alerts.avro import AlertFileError, alert_path, read_alert_file, write_alert_file
from apsnake.alerts.config import AlertConfig, KafkaConfig
from apsnake.alerts.cutouts import CutoutError, CutoutMaker, cutout_origin, cutout_size
from apsnake.alerts.kafka import (AlertDeliveryError, decode_message, encode_message, produce_alert_file,
                                  produce_alerts)
from apsnake.alerts.package import AlertInputError, build_alerts, package_data_id, select_alert_sources
from apsnake.alerts.records import (DROPPED_COLUMNS, REQUIRED_FILLS, UNFILLED_FIELDS, AlertSchema, AlertSchemaError,
                                    check_mapping, load_alert_schema, to_records)

__all__ = [
    "DROPPED_COLUMNS", "REQUIRED_FILLS", "UNFILLED_FIELDS", "AlertConfig", "AlertDeliveryError", "AlertFileError",
    "AlertInputError", "AlertSchema", "AlertSchemaError", "CutoutError", "CutoutMaker", "KafkaConfig", "alert_path",
    "build_alerts", "check_mapping", "cutout_origin", "cutout_size", "decode_message", "encode_message",
    "load_alert_schema", "package_data_id", "produce_alert_file", "produce_alerts", "read_alert_file",
    "select_alert_sources", "to_records", "write_alert_file",
]
