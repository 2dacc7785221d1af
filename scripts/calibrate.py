"""Snakemake adapter: calibrate one data ID (postISR -> calexp, src, background)."""

import json

from apsnake import refcat as refcat_io
from apsnake.atomic import write_parquet, write_text
from apsnake.calibrate import CalibrateConfig, calibrate_exposure
from apsnake.exposure import read_exposure, write_background, write_exposure
from apsnake.logs import finish_job, workflow_step
from apsnake.options import dataclass_from_options
from apsnake.times import mjd_to_year

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("calibrate", snakemake.log[0], f"visit={visit} detector={detector}"):
    config = dataclass_from_options(CalibrateConfig, snakemake.params.options, "calibrate")
    post_isr = read_exposure(snakemake.input.exposure)
    stars = refcat_io.read_refcat(snakemake.input.refcat, snakemake.params.refcat_columns)
    stars = refcat_io.select_band(stars, post_isr.visit_info.band, snakemake.input.refcat)
    stars = refcat_io.apply_proper_motion(stars, mjd_to_year(post_isr.visit_info.mjd_mid_tai))
    stars = refcat_io.in_footprint(stars, post_isr.wcs, post_isr.shape, config.refcat_margin_pixels)
    result = calibrate_exposure(post_isr, stars, config)
    write_exposure(result.calexp, snakemake.output.calexp)
    write_background(result.background.image, snakemake.output.background, noise=result.background.rms)
    write_parquet(result.sources, snakemake.output.src)
    write_text(json.dumps(result.metadata, indent=1), snakemake.output.metadata)

finish_job()
