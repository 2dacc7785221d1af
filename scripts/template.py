"""Snakemake adapter: the template of one data ID on its calexp's pixel grid, from the
overlapping coadd patches (templates.mode: coadd) or the best-covering template visit
(templates.mode: single)."""

from apsnake import steps
from apsnake.exposure import read_exposure, write_exposure
from apsnake.logs import finish_job, workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("template", snakemake.log[0], f"visit={visit} detector={detector}"):
    # The calexp gives the grid (WCS, shape), visit info and PSF; its pixels are not used.
    calexp = read_exposure(snakemake.input.calexp, memmap=True)
    write_exposure(steps.run_template_step(calexp, snakemake.input.inputs, snakemake.params.mode),
                   snakemake.output.template)

finish_job()
