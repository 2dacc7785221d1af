"""Snakemake adapter: ISR of one data ID (raw CCD + calibrations -> postISR Exposure)."""

from apsnake import steps
from apsnake.logs import finish_job, workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("isr", snakemake.log[0], f"visit={visit} detector={detector}"):
    result = steps.run_isr_step(detector, snakemake.input, snakemake.params.calibs,
                                snakemake.params.options)
    # No metadata output when processCcd writes it (step_jobs merged, keep_postisr false).
    steps.write_isr_products(result, snakemake.output.exposure, snakemake.output.get("metadata"))

finish_job()
