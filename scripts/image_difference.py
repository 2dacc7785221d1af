"""Snakemake adapter, merged job (``step_jobs: merged``): the template, the subtraction and the
DIA sources of one science data ID in one process; the template, the difference and the matched
template are handed on in memory (calexp + src + template inputs -> template, diffexp,
matchedTemplate, diaSrc)."""

import pandas as pd

from apsnake import steps
from apsnake.atomic import write_parquet
from apsnake.exposure import as_stored, read_exposure, write_exposure
from apsnake.logs import finish_job, workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)
data_id = f"visit={visit} detector={detector}"
inputs, out, params = snakemake.input, snakemake.output, snakemake.params

with workflow_step("imageDifference", snakemake.log[0], data_id) as log:
    calexp = read_exposure(inputs.calexp)
    with steps.timed(log, "template"):
        template = steps.run_template_step(calexp, inputs.inputs, params.mode)
        write_exposure(template, out.template)
    with steps.timed(log, "diffim"):
        # Each image is handed on as the next job would read it back (same products as
        # step_jobs: separate).
        difference, matched, metadata = steps.run_diffim_step(
            calexp, as_stored(template), pd.read_parquet(inputs.src), params.diffim, log, data_id)
        steps.write_diffim_products(difference, matched, metadata, out.diffexp, out.matched_template, out.metadata)
    with steps.timed(log, "detectDiaSources"):
        table = steps.run_dia_step(as_stored(difference), calexp, as_stored(matched), metadata, params.dia, log,
                                   data_id)
        write_parquet(table, out.diaSrc)

finish_job()
