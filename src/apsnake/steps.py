"""What each per-data-ID workflow step reads, computes and writes.

The scripts of the per-step rules (``scripts/isr.py``, ``calibrate.py``, ``template.py``,
``diffim.py``, ``detect_dia_sources.py``) and of the merged rules (``scripts/process_ccd.py``:
isr + calibrate; ``scripts/image_difference.py``: template + diffim + detectDiaSources), chosen by
the ``step_jobs`` option, call these functions, so a step computes and writes the same products in
either arrangement. A merged job hands its intermediate Exposures to the next step in memory
instead of reading back what it has just written (docs/architecture.md, "Jobs").

Each ``run_*`` function takes the step's inputs (paths, or Exposures already in memory) and its
options section as a dict, and returns what the matching ``write_*`` function writes (a DiaSource
table: ``atomic.write_parquet``). Bad input
raises an ``ApsnakeError`` subclass naming the data ID and the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from apsnake.atomic import write_parquet, write_text
from apsnake.exposure import Exposure, read_exposure, write_background, write_exposure
from apsnake.options import dataclass_from_options


@contextlib.contextmanager
def timed(log: logging.Logger, label: str):
    """Log ``<label> took <s> s`` after the block (a merged job's steps, one by one)."""
    start = time.perf_counter()
    yield
    log.info("%s took %.2f s", label, time.perf_counter() - start)


# ---------------------------------------------------------------- isr
def run_isr_step(detector: int, paths: dict, calibs: dict, options: dict):
    """ISR of one CCD. ``paths`` (a mapping with ``get``, e.g. Snakemake's input): ``raw`` and,
    where chosen, ``bias``, ``flat``, ``bpm``;
    ``calibs``: the rule's calibration choice (``error``, ``{kind}_hdu``). Returns
    ``isr.IsrResult`` (postISR Exposure in ADU, metadata)."""
    from apsnake import isr
    from apsnake.instruments import decam, decam_files

    config = dataclass_from_options(isr.IsrConfig, options, "isr")
    if calibs.get("error"):
        raise isr.IsrInputError(calibs["error"])
    # The CCD and its crosstalk sources present in the same file, read in one open.
    sources = decam.crosstalk_source_ccds(detector) if config.crosstalk else []
    ccds = decam_files.read_raw_ccds(paths.get("raw"), [detector, *sources], optional=sources)
    raw = ccds.pop(detector)
    bias, _, _ = decam_files.read_master_calibration(paths.get("bias"), detector, calibs["bias_hdu"])
    flat, flat_primary, _ = decam_files.read_master_calibration(paths.get("flat"), detector, calibs["flat_hdu"])
    bpm = None
    if paths.get("bpm"):
        bpm, _, _ = decam_files.read_master_calibration(paths.get("bpm"), detector, calibs["bpm_hdu"])
    linearity = decam_files.read_linearity_table(config.linearity, detector) if config.linearity else None
    return isr.run_isr(
        raw, bias, flat, bpm, crosstalk_source_ccds=list(ccds.values()), linearity=linearity, config=config,
        calib_paths={k: paths.get(k) for k in ("bias", "flat", "bpm") if paths.get(k)},
        flat_band=decam.band_from_filter(str(flat_primary.get("FILTER", "")))[0],
    )


def write_isr_products(result, exposure_path=None, metadata_path=None) -> None:
    """Write the postISR Exposure and its JSON metadata, each where a path is given."""
    if exposure_path:
        write_exposure(result.exposure, exposure_path)
    if metadata_path:
        write_text(json.dumps(result.metadata, indent=1), metadata_path)


# ---------------------------------------------------------------- calibrate
def run_calibrate_step(post_isr: Exposure, refcat_path, refcat_columns: dict, options: dict):
    """Single-frame calibration of a postISR Exposure against the reference catalogue at
    ``refcat_path``. Returns ``calibrate.CalibrateResult`` (calexp in nJy, src, background)."""
    from apsnake import refcat as refcat_io
    from apsnake.calibrate import CalibrateConfig, calibrate_exposure
    from apsnake.times import mjd_to_year

    config = dataclass_from_options(CalibrateConfig, options, "calibrate")
    stars = refcat_io.read_refcat(refcat_path, refcat_columns)
    stars = refcat_io.select_band(stars, post_isr.visit_info.band, refcat_path)
    stars = refcat_io.apply_proper_motion(stars, mjd_to_year(post_isr.visit_info.mjd_mid_tai))
    stars = refcat_io.in_footprint(stars, post_isr.wcs, post_isr.shape, config.refcat_margin_pixels)
    return calibrate_exposure(post_isr, stars, config)


def write_calibrate_products(result, calexp_path, src_path, background_path, metadata_path) -> None:
    write_exposure(result.calexp, calexp_path)
    write_background(result.background.image, background_path, noise=result.background.rms)
    write_parquet(result.sources, src_path)
    write_text(json.dumps(result.metadata, indent=1), metadata_path)


# ---------------------------------------------------------------- template
def run_template_step(calexp: Exposure, input_paths, mode: str) -> Exposure:
    """The template on ``calexp``'s pixel grid (its WCS, shape, visit info and PSF; its pixels
    are not used): the best-covering template visit of the calexps at ``input_paths``
    (``mode`` single) or the coadd patches at ``input_paths`` warped and merged (coadd)."""
    from apsnake.templates import best_single_visit_template, template_for_exposure

    if mode == "single":
        # Memory maps: only the chosen visit's calexps are read whole.
        return best_single_visit_template(calexp, [read_exposure(p, memmap=True) for p in input_paths])
    return template_for_exposure(calexp, [read_exposure(p) for p in input_paths])


# ---------------------------------------------------------------- diffim
def run_diffim_step(science: Exposure, template: Exposure, sources, options: dict, log: logging.Logger,
                    data_id: str):
    """Subtract ``template`` from ``science`` (``sources``: the calexp's src table). Returns
    (difference, PSF-matched template, metadata). Too little template coverage or too few kernel
    stars is a documented outcome, not a crash: both images come back all NO_DATA and the
    metadata says ``skipped`` and why; the DIA step then gives an empty diaSrc."""
    from apsnake.diffim import DiffimConfig, DiffimSkip, skipped_difference, subtract

    config = dataclass_from_options(DiffimConfig, options, "diffim")
    try:
        result = subtract(science, template, sources, config)
    except DiffimSkip as reason:
        log.warning("%s skipped: %s", data_id, reason)
        return (skipped_difference(science, str(reason)), skipped_difference(template, str(reason)),
                {"skipped": True, "reason": str(reason)})
    return result.difference, result.matched_template, {"skipped": False, **result.metadata}


def write_diffim_products(difference: Exposure, matched: Exposure, metadata: dict, diffexp_path,
                          matched_path, metadata_path) -> None:
    write_exposure(difference, diffexp_path)
    write_exposure(matched, matched_path)
    write_text(json.dumps(metadata, indent=1, default=float), metadata_path)


# ---------------------------------------------------------------- detectDiaSources
def run_dia_step(difference, science, matched, diffim_metadata: dict, options: dict, log: logging.Logger,
                 data_id: str):
    """DIA sources of a difference image (schema table DiaSource, a pyarrow Table). ``difference``,
    ``science`` and ``matched`` are Exposures or zero-argument callables that read them (not
    called when the difference was skipped). Science and matched template are measured at the
    sources only, so memory maps serve."""
    from apsnake import schema
    from apsnake.dia import DiaConfig, detect_dia_sources

    config = dataclass_from_options(DiaConfig, options, "dia")
    if diffim_metadata.get("skipped"):
        log.warning("%s: no difference image (%s); empty diaSrc", data_id, diffim_metadata["reason"])
        table = schema.empty_table("DiaSource")
    else:
        images = [image() if callable(image) else image for image in (difference, science, matched)]
        table = detect_dia_sources(*images, config)
    log.info("%s: %d DIA sources", data_id, table.num_rows)
    return table

