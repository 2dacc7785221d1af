"""Snakemake adapter: subtract the template from one calexp (Alard-Lupton or ZOGY).

Writes the difference image, its metadata and the PSF-matched template. Too little template
coverage or too few kernel stars is a documented outcome, not a crash: the difference and
the matched template are written all NO_DATA with the reason in the metadata, and the DIA
step then writes an empty (valid) diaSrc.
"""

import json

import pandas as pd

from apsnake.atomic import write_text
from apsnake.diffim import DiffimConfig, DiffimSkip, skipped_difference, subtract
from apsnake.exposure import read_exposure, write_exposure
from apsnake.logs import finish_job, workflow_step
from apsnake.options import dataclass_from_options

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("diffim", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    config = dataclass_from_options(DiffimConfig, snakemake.params.options, "diffim")
    science = read_exposure(snakemake.input.calexp)
    template = read_exposure(snakemake.input.template)
    sources = pd.read_parquet(snakemake.input.src)
    try:
        result = subtract(science, template, sources, config)
        difference, matched, metadata = result.difference, result.matched_template, {"skipped": False,
                                                                                     **result.metadata}
    except DiffimSkip as reason:
        log.warning("visit=%d detector=%d skipped: %s", visit, detector, reason)
        difference, matched = skipped_difference(science, str(reason)), skipped_difference(template, str(reason))
        metadata = {"skipped": True, "reason": str(reason)}
    write_exposure(difference, snakemake.output.diffexp)
    write_exposure(matched, snakemake.output.matched_template)
    write_text(json.dumps(metadata, indent=1, default=float), snakemake.output.metadata)

finish_job()
