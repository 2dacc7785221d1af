"""Snakemake adapter: the template of one data ID on its calexp's pixel grid, from the
overlapping coadd patches (templates.mode: coadd) or the best-covering template visit
(templates.mode: single)."""

from apsnake.exposure import read_exposure, write_exposure
from apsnake.logs import finish_job, workflow_step
from apsnake.templates import best_single_visit_template, template_for_exposure

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("template", snakemake.log[0], f"visit={visit} detector={detector}"):
    # The calexp gives the grid (WCS, shape), visit info and PSF; its pixels are not used.
    calexp = read_exposure(snakemake.input.calexp, memmap=True)
    if snakemake.params.mode == "single":
        # Memory maps: only the chosen visit's calexps are read whole.
        template = best_single_visit_template(calexp, [read_exposure(p, memmap=True) for p in snakemake.input.inputs])
    else:
        template = template_for_exposure(calexp, [read_exposure(path) for path in snakemake.input.inputs])
    write_exposure(template, snakemake.output.template)

finish_job()
