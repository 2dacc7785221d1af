"""Snakemake adapter, merged job (``step_jobs: merged``): ISR and calibration of one data ID in
one process, the postISR Exposure handed on in memory (raw -> postISR, calexp, src, background)."""

from apsnake import steps
from apsnake.exposure import as_stored
from apsnake.logs import finish_job, workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)
inputs, out, params = snakemake.input, snakemake.output, snakemake.params

with workflow_step("processCcd", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    with steps.timed(log, "isr"):
        isr_result = steps.run_isr_step(detector, inputs, params.calibs, params.isr)
        # No postISR image when it is not kept (keep_postisr false): only its JSON.
        steps.write_isr_products(isr_result, out.get("exposure"), out.isr_metadata)
    with steps.timed(log, "calibrate"):
        # As the calibrate job would read it back (header cards round the WCS): same products.
        result = steps.run_calibrate_step(as_stored(isr_result.exposure), inputs.refcat, params.refcat_columns,
                                          params.calibrate)
        steps.write_calibrate_products(result, out.calexp, out.src, out.background, out.metadata)

finish_job()
