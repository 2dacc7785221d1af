"""Snakemake adapter: coadd the template visits' calexps on one patch of the sky grid."""

from apsnake.exposure import read_exposure, write_exposure
from apsnake.logs import finish_job, workflow_step
from apsnake.options import dataclass_from_options
from apsnake.templates import CoaddConfig, make_coadd, warp_exposure

band, patch = snakemake.wildcards.band, snakemake.wildcards.patch

with workflow_step("coadd", snakemake.log[0], f"band={band} patch={patch}"):
    config = dataclass_from_options(CoaddConfig, snakemake.params.options, "templates.coadd")
    wcs, shape = snakemake.params.sky_grid.patch_wcs(patch)
    warped = [warp_exposure(read_exposure(path), wcs, shape) for path in snakemake.input.calexps]
    write_exposure(make_coadd(warped, config, patch_id=patch, wcs=wcs, shape=shape, band=band), snakemake.output.coadd)

finish_job()
