"""Snakemake adapter: detect and measure DIA sources on one difference image."""

import json

import pyarrow.parquet as pq

from apsnake import dia, schema
from apsnake.atomic import atomic_output
from apsnake.exposure import read_exposure
from apsnake.logs import workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("detectDiaSources", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    metadata = json.loads(open(snakemake.input.metadata).read())
    if metadata.get("skipped"):
        log.warning("visit=%d detector=%d: no difference image (%s); empty diaSrc", visit, detector, metadata["reason"])
        table = schema.empty_table("DiaSource")
    else:
        table = dia.detect_dia_sources(
            read_exposure(snakemake.input.diffexp), read_exposure(snakemake.input.calexp),
            read_exposure(snakemake.input.template), dia.config_from_options(snakemake.params.options),
        )
    log.info("visit=%d detector=%d: %d DIA sources", visit, detector, table.num_rows)
    with atomic_output(snakemake.output.diaSrc) as tmp:
        pq.write_table(table, tmp)
