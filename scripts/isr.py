"""Snakemake adapter: ISR of one data ID (raw CCD + calibrations -> postISR Exposure)."""

import json

from apsnake import isr
from apsnake.atomic import write_text
from apsnake.exposure import write_exposure
from apsnake.instruments import decam, decam_files
from apsnake.logs import finish_job, workflow_step
from apsnake.options import dataclass_from_options

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)
calibs = snakemake.params.calibs

with workflow_step("isr", snakemake.log[0], f"visit={visit} detector={detector}"):
    config = dataclass_from_options(isr.IsrConfig, snakemake.params.options, "isr")
    if calibs.get("error"):
        raise isr.IsrInputError(calibs["error"])
    # The CCD and its crosstalk sources present in the same file, read in one open.
    sources = decam.crosstalk_source_ccds(detector) if config.crosstalk else []
    ccds = decam_files.read_raw_ccds(snakemake.input.raw, [detector, *sources], optional=sources)
    raw = ccds.pop(detector)
    bias, _, _ = decam_files.read_master_calibration(snakemake.input.bias, detector, calibs["bias_hdu"])
    flat, flat_primary, _ = decam_files.read_master_calibration(snakemake.input.flat, detector, calibs["flat_hdu"])
    bpm = None
    if snakemake.input.get("bpm"):
        bpm, _, _ = decam_files.read_master_calibration(snakemake.input.bpm, detector, calibs["bpm_hdu"])
    linearity = decam_files.read_linearity_table(config.linearity, detector) if config.linearity else None
    result = isr.run_isr(
        raw, bias, flat, bpm, crosstalk_source_ccds=list(ccds.values()), linearity=linearity, config=config,
        calib_paths={k: snakemake.input.get(k) for k in ("bias", "flat", "bpm") if snakemake.input.get(k)},
        flat_band=decam.band_from_filter(str(flat_primary.get("FILTER", "")))[0],
    )
    write_exposure(result.exposure, snakemake.output.exposure)
    write_text(json.dumps(result.metadata, indent=1), snakemake.output.metadata)

finish_job()
