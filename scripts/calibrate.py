"""Snakemake adapter: calibrate one data ID (postISR -> calexp, src, background)."""

from apsnake import steps
from apsnake.exposure import read_exposure
from apsnake.logs import finish_job, workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("calibrate", snakemake.log[0], f"visit={visit} detector={detector}"):
    result = steps.run_calibrate_step(read_exposure(snakemake.input.exposure), snakemake.input.refcat,
                                      snakemake.params.refcat_columns, snakemake.params.options)
    out = snakemake.output
    steps.write_calibrate_products(result, out.calexp, out.src, out.background, out.metadata)

finish_job()
