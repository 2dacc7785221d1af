"""Snakemake adapter: warp the overlapping coadd cells onto one calexp's pixel grid."""

from apsnake.exposure import read_exposure, write_exposure
from apsnake.logs import workflow_step
from apsnake.template import template_for_exposure

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("template", snakemake.log[0], f"visit={visit} detector={detector}"):
    calexp = read_exposure(snakemake.input.calexp)
    coadds = [read_exposure(path) for path in snakemake.input.coadds]
    write_exposure(template_for_exposure(calexp, coadds), snakemake.output.template)
