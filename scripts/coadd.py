"""Snakemake adapter: coadd the template visits' calexps on one sky cell."""

from apsnake.exposure import read_exposure, write_exposure
from apsnake.logs import workflow_step
from apsnake.template import CoaddConfig, SkyGrid, make_coadd, warp_exposure

band, cell = snakemake.wildcards.band, snakemake.wildcards.cell

with workflow_step("coadd", snakemake.log[0], f"band={band} cell={cell}"):
    wcs, shape = SkyGrid(cell_size_deg=snakemake.params.cell_size_deg).cell_wcs(cell)
    warped = []
    for path in snakemake.input.calexps:
        warped.append(warp_exposure(read_exposure(path), wcs, shape))
    config = CoaddConfig(homogenize_psf=bool(snakemake.params.homogenize_psf))
    write_exposure(make_coadd(warped, config, cell_id=cell, wcs=wcs, shape=shape, band=band), snakemake.output.coadd)
