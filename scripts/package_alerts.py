"""Snakemake adapter: write the alert packets (Avro, Rubin alert schema) of one committed data ID."""

from apsnake.alerts import AlertConfig, package_data_id
from apsnake.logs import finish_job, workflow_step
from apsnake.options import dataclass_from_options

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("package_alerts", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    written = package_data_id(
        snakemake.params.root, visit, detector,
        snakemake.input.diffexp, snakemake.input.calexp, snakemake.input.template,  # read as memory maps inside
        output=snakemake.output.alerts,
        config=dataclass_from_options(AlertConfig, snakemake.params.options, "alerts"),
    )
    log.info(
        "visit=%d detector=%d: %d alerts of %d DiaSources (%d unassociated, %d below min_reliability), "
        "%d previous sources, %d forced sources, schema %s, %d bytes (%.2f s)",
        visit, detector, written["n_alerts"], written["n_dia_sources"], written["n_unassociated"],
        written["n_below_reliability"], written["n_prv_dia_sources"], written["n_prv_dia_forced_sources"],
        written["schema_version"], written["bytes"], written["seconds"],
    )

finish_job()
