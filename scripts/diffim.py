"""Snakemake adapter: subtract the template from one calexp (Alard-Lupton or ZOGY).

Writes the difference image, its metadata and the PSF-matched template; a subtraction skipped for
too little template coverage or too few kernel stars writes both images all NO_DATA, with the
reason in the metadata (``steps.run_diffim_step``).
"""

import pandas as pd

from apsnake import steps
from apsnake.exposure import read_exposure
from apsnake.logs import finish_job, workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)
data_id = f"visit={visit} detector={detector}"

with workflow_step("diffim", snakemake.log[0], data_id) as log:
    difference, matched, metadata = steps.run_diffim_step(
        read_exposure(snakemake.input.calexp), read_exposure(snakemake.input.template),
        pd.read_parquet(snakemake.input.src), snakemake.params.options, log, data_id,
    )
    out = snakemake.output
    steps.write_diffim_products(difference, matched, metadata, out.diffexp, out.matched_template, out.metadata)

finish_job()
