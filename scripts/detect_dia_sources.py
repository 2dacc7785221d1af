"""Snakemake adapter: detect and measure DIA sources on one difference image."""

import json

from apsnake import steps
from apsnake.atomic import write_parquet
from apsnake.exposure import read_exposure
from apsnake.logs import finish_job, workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)
data_id = f"visit={visit} detector={detector}"
inputs = snakemake.input

with workflow_step("detectDiaSources", snakemake.log[0], data_id) as log:
    # Science and matched template are measured at the sources only (forced PSF fluxes, dipole
    # fits, pixel flags): memory maps, so the rest of their pixels is never read.
    table = steps.run_dia_step(
        lambda: read_exposure(inputs.diffexp), lambda: read_exposure(inputs.calexp, memmap=True),
        lambda: read_exposure(inputs.matched_template, memmap=True),
        json.loads(open(inputs.metadata).read()), snakemake.params.options, log, data_id,
    )
    write_parquet(table, snakemake.output.diaSrc)

finish_job()
