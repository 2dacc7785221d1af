"""Snakemake adapter: detect and measure DIA sources on one difference image."""

import json

import pyarrow.parquet as pq

from apsnake import schema
from apsnake.atomic import atomic_output
from apsnake.dia import DiaConfig, detect_dia_sources
from apsnake.exposure import read_exposure
from apsnake.logs import finish_job, workflow_step
from apsnake.options import dataclass_from_options

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("detectDiaSources", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    config = dataclass_from_options(DiaConfig, snakemake.params.options, "dia")
    metadata = json.loads(open(snakemake.input.metadata).read())
    if metadata.get("skipped"):
        log.warning("visit=%d detector=%d: no difference image (%s); empty diaSrc", visit, detector, metadata["reason"])
        table = schema.empty_table("DiaSource")
    else:
        # Science and matched template are measured at the sources only (forced PSF fluxes,
        # dipole fits, pixel flags): memory maps, so the rest of their pixels is never read.
        table = detect_dia_sources(
            read_exposure(snakemake.input.diffexp), read_exposure(snakemake.input.calexp, memmap=True),
            read_exposure(snakemake.input.matched_template, memmap=True), config,
        )
    log.info("visit=%d detector=%d: %d DIA sources", visit, detector, table.num_rows)
    with atomic_output(snakemake.output.diaSrc) as tmp:
        pq.write_table(table, tmp)

finish_job()
