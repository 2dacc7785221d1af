"""Snakemake adapter: ingest raw and calibration headers into the registry."""

from apsnake.logs import finish_job, workflow_step
from apsnake.registry import run_ingest

with workflow_step("ingest", snakemake.log[0]):
    run_ingest(
        snakemake.params.raw,
        snakemake.params.calibs,
        registry_paths=dict(snakemake.output.items()),
    )

finish_job()
