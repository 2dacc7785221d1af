"""Snakemake adapter: subtract the template from one calexp (Alard-Lupton or ZOGY).

Too little template coverage or too few kernel stars is a documented outcome, not a
crash: the difference is written all NO_DATA with the reason in its metadata, and the DIA
step then writes an empty (valid) diaSrc.
"""

import json

import pandas as pd

from apsnake import diffim
from apsnake.atomic import write_text
from apsnake.exposure import read_exposure, write_exposure
from apsnake.logs import workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("diffim", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    science = read_exposure(snakemake.input.calexp)
    template = read_exposure(snakemake.input.template)
    sources = pd.read_parquet(snakemake.input.src)
    try:
        result = diffim.subtract(science, template, sources, diffim.config_from_options(snakemake.params.options))
        difference, metadata = result.difference, {"skipped": False, **result.metadata}
    except diffim.DiffimSkip as reason:
        log.warning("visit=%d detector=%d skipped: %s", visit, detector, reason)
        difference, metadata = diffim.skipped_difference(science, str(reason)), {"skipped": True, "reason": str(reason)}
    write_exposure(difference, snakemake.output.diffexp)
    write_text(json.dumps(metadata, indent=1, default=float), snakemake.output.metadata)
