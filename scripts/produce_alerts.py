"""Snakemake adapter: produce one data ID's alert file to Kafka; a failed delivery fails the job."""

import json

from apsnake.alerts import KafkaConfig, produce_alert_file
from apsnake.atomic import write_text
from apsnake.logs import finish_job, workflow_step
from apsnake.options import dataclass_from_options

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("produce_alerts", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    report = produce_alert_file(snakemake.input.alerts,
                                dataclass_from_options(KafkaConfig, snakemake.params.kafka, "alerts.kafka"))
    write_text(json.dumps(report, indent=1) + "\n", snakemake.output.report)
    log.info("visit=%d detector=%d: %d alerts delivered to topic %s (partitions %s, %.2f s)", visit, detector,
             report["n_alerts"], report["topic"], report["partitions"], report["seconds"])

finish_job()
