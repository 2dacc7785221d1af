"""Alert options (config section ``alerts``; the field names are the YAML keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from apsnake.options import OptionsError

#: Compression codecs of the Avro container file (fastavro's built-in ones).
AVRO_CODECS = ("null", "deflate")
#: Compression of Kafka messages (librdkafka ``compression.type``).
KAFKA_COMPRESSIONS = ("none", "gzip", "snappy", "lz4", "zstd")


@dataclass
class KafkaConfig:
    """Producing alerts to Kafka (``alerts.kafka``); off while ``bootstrap_servers`` is null.

    bootstrap_servers : str or None
        ``host:port[,host:port...]`` of the Kafka cluster; None (the default): no producing.
    topic : str
        Topic the alerts of every data ID go to.
    compression : str
        Message compression (librdkafka ``compression.type``): none, gzip, snappy, lz4, zstd.
    delivery_timeout_s : float
        How long a message may take to be acknowledged before its delivery counts as failed, s.
    properties : dict
        Further librdkafka settings passed unchanged (``security.protocol``, ``sasl.*``, ...).
    """

    bootstrap_servers: str | None = None
    topic: str = "alerts"
    compression: str = "lz4"
    delivery_timeout_s: float = 30.0
    properties: dict = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.bootstrap_servers)


@dataclass
class AlertConfig:
    """Alert packaging options (config section ``alerts``).

    min_reliability : float
        Sources whose ``reliability`` is below this get no alert [Rubin 0.5]; applies only once
        a reliability score exists (a null score: the source gets its alert).
    cutout_min_size, cutout_max_size : int
        The cutouts' side is the source's ``bboxSize`` clamped to this range, px [Rubin 30, 102].
    history_window_days : float
        ``prvDiaSources`` and ``prvDiaForcedSources`` reach back this far, days [Rubin 12 x 30].
    codec : str
        Compression of the Avro file's blocks: ``deflate`` or ``null`` (none).
    kafka : KafkaConfig
        Producing to Kafka, off by default.
    """

    min_reliability: float = 0.5
    cutout_min_size: int = 30
    cutout_max_size: int = 102
    history_window_days: float = 360.0
    codec: str = "deflate"
    kafka: KafkaConfig = field(default_factory=KafkaConfig)

    def __post_init__(self):
        if not 1 <= int(self.cutout_min_size) <= int(self.cutout_max_size):
            raise OptionsError(f"alerts: need 1 <= cutout_min_size <= cutout_max_size, got "
                             f"{self.cutout_min_size}, {self.cutout_max_size}")
        if self.codec not in AVRO_CODECS:
            raise OptionsError(f"alerts.codec must be one of {', '.join(AVRO_CODECS)}, got {self.codec!r}")
        if self.kafka.compression not in KAFKA_COMPRESSIONS:
            raise OptionsError(f"alerts.kafka.compression must be one of {', '.join(KAFKA_COMPRESSIONS)}, "
                             f"got {self.kafka.compression!r}")
