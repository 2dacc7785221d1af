"""Association of one data ID into the Parquet APDB (Rubin's DiaPipelineTask; docs/algorithms.md §6).

``associate_data_id`` runs the whole step for one (visit, detector):

1. **Load** (``apdb.load_history``): the current DiaObjects in the data ID's sky cells and
   their DiaSources and DiaForcedSources of the last ``history_window_days``, from data IDs
   of earlier visits only (so re-running an early visit never sees later
   ones). Nothing outside the cells is read.
2. **Match** (``match.associate_sources``): one-to-one nearest neighbour within
   ``radius_arcsec``; unmatched clean sources found new DiaObjects (id = their diaSourceId),
   unmatched flagged sources stay unassociated (kept, with a null diaObjectId).
3. **Summarise** the new and updated objects over their loaded history plus this visit
   (``summary.summarise_objects``): the new positions are what forced photometry uses.
4. **Forced photometry** (``forced.forced_photometry``) at every object on the image with
   template coverage, on the difference image and the calexp; then the summaries again so that
   ``fpFluxMean`` includes this visit.
5. **Commit** (``apdb.commit_data_id``): the three fragments, the cell index, and the
   ``apdb_marker`` last, with counts and Rubin's metrics (numNewDiaObjects,
   numUnassociatedDiaObjects, fracUpdatedDiaObjects). numUnassociatedDiaObjects counts the
   loaded objects *on this image* that got no source (the cells reach beyond the CCD);
   fracUpdatedDiaObjects = updated / (updated + unassociated), 0 when both are 0.

Updated objects are those that received a DiaSource; an object measured only by forced
photometry gets a DiaForcedSource row but no new version (as in Rubin).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from apsnake import apdb, schema
from apsnake.association.forced import forced_photometry
from apsnake.association.match import associate_sources
from apsnake.association.plan import DEFAULT_ORDER, DEFAULT_PAD_ARCSEC, cells_of
from apsnake.association.summary import summarise_objects
from apsnake.errors import ApsnakeError
from apsnake.exposure import Exposure, VisitInfo, read_visit_info

log = logging.getLogger(__name__)


class AssociationStepError(ApsnakeError, ValueError):
    """Inputs of one data ID's association that do not fit together."""


@dataclass
class AssociationConfig:
    """Association options (config section ``association``).

    radius_arcsec : float
        One-to-one match radius, arcsec [Rubin 1.0].
    healpix_order : int
        Order of the HEALPix sky cells that order the associations.
    footprint_pad_arcsec : float
        Padding of the raw footprint when its cells are chosen, arcsec.
    history_window_days : float
        DiaSource/DiaForcedSource history loaded, days [Rubin 12 x 30].
    max_new_objects : int or None
        More new DiaObjects than this fails the data ID [Rubin ApPipe 1000]; None: no limit.
    """

    radius_arcsec: float = 1.0
    healpix_order: int = DEFAULT_ORDER
    footprint_pad_arcsec: float = DEFAULT_PAD_ARCSEC
    history_window_days: float = 360.0
    max_new_objects: int | None = None


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _data_id_info(value: Exposure | str | Path) -> tuple[VisitInfo, int]:
    """Visit info and detector of an Exposure, or of an Exposure FITS without its pixels."""
    if isinstance(value, Exposure):
        return value.visit_info, value.detector
    return read_visit_info(value)


def associate_data_id(root: str | Path, dia_sources: pa.Table, difference: Exposure | str | Path,
                      science: Exposure | str | Path, cells, config: AssociationConfig | None = None,
                      time_processed_mjd: float | None = None) -> dict:
    """Associate one data ID's DIA sources and write its APDB fragments; return the marker.

    Parameters
    ----------
    root : path
        The workflow's output folder (holds ``apdb/`` and ``apdb_marker/``).
    dia_sources : pyarrow.Table
        The data ID's diaSrc (DiaSource schema, diaObjectId null).
    difference, science : Exposure or path
        Its difference image and calexp (nJy), for forced photometry. Given as paths they are
        read one after the other and let go once measured, so that only one CCD's pixels are
        in memory at a time (a full DECam CCD is ~100 MB).
    cells : sequence of int
        The data ID's sky cells (``plan.association_plan``), at ``config.healpix_order``.
    config : AssociationConfig
    time_processed_mjd : float, optional
        ``timeProcessedMjdTai`` of the forced sources (MJD, TAI); default now.

    Returns
    -------
    dict
        The marker written last: counts per table, Rubin's metrics, cells, timings.
    """
    cfg = config or AssociationConfig()
    started = time.perf_counter()
    info, detector = _data_id_info(difference)
    visit = info.visit
    data_id = f"(visit={visit}, detector={detector})"
    science_info, science_detector = _data_id_info(science)
    if (science_info.visit, science_detector) != (visit, detector):
        raise AssociationStepError(f"data ID {data_id}: the calexp is of data ID "
                                   f"({science_info.visit}, {science_detector})")
    mjd = float(info.mjd_mid_tai)
    if not np.isfinite(mjd):
        raise AssociationStepError(f"data ID {data_id}: the difference image has no mid-exposure MJD")
    cells = sorted(int(c) for c in cells)
    if not cells:
        raise AssociationStepError(f"data ID {data_id}: no sky cells (the registry has no usable footprint "
                                   "for it: no WCS in the raw header?)")
    sources = schema.conform(dia_sources, "DiaSource").to_pandas()
    if len(sources) and not ((sources["visit"] == visit) & (sources["detector"] == detector)).all():
        raise AssociationStepError(f"data ID {data_id}: diaSrc holds sources of another data ID")

    history = apdb.load_history(root, cells, cfg.healpix_order, (mjd, visit, detector), cfg.history_window_days)
    loaded = time.perf_counter()
    result = associate_sources(sources, history.objects, cfg.radius_arcsec,
                                           max_new_objects=cfg.max_new_objects)
    touched = np.union1d(result.updated_ids, result.new_ids).astype(np.int64)
    associated = result.sources[result.sources["diaObjectId"].notna()]
    all_sources = _concat([history.sources, associated])

    # Positions for forced photometry: the new summaries for touched objects, the loaded
    # versions for the others.
    positions = history.objects[["diaObjectId", "ra", "dec"]] if len(history.objects) else \
        pd.DataFrame({"diaObjectId": np.zeros(0, np.int64), "ra": [], "dec": []})
    if len(touched):
        first = summarise_objects(touched, all_sources, history.forced_sources, mjd).to_pandas()
        positions = _concat([positions[~positions["diaObjectId"].isin(touched)],
                             first[["diaObjectId", "ra", "dec"]]])
    forced = forced_photometry(difference, science, positions["diaObjectId"].to_numpy(np.int64),
                               positions["ra"].to_numpy(float), positions["dec"].to_numpy(float),
                               time_processed_mjd)
    all_forced = _concat([history.forced_sources, forced.to_pandas()])
    objects = summarise_objects(touched, all_sources, all_forced, mjd) if len(touched) \
        else schema.empty_table("DiaObject")

    outside = 0
    if objects.num_rows:
        outside = int((~np.isin(cells_of(objects["ra"].to_numpy(), objects["dec"].to_numpy(),
                                         cfg.healpix_order), cells)).sum())
        if outside:
            log.warning("data ID %s: %d DiaObjects lie outside the data ID's %d sky cells (pointing error "
                        "beyond footprint_pad_arcsec?); later visits may not find them", data_id, outside,
                        len(cells))
    # Rubin counts the loaded objects that got no source; our cells reach beyond the CCD, so
    # count only the loaded objects on this image with template coverage (those measured by
    # forced photometry), which is what Rubin's bbox-trimmed preload holds.
    measured = np.asarray(forced["diaObjectId"].to_numpy(), np.int64)
    on_image = np.intersect1d(measured, history.objects["diaObjectId"].to_numpy(np.int64)) \
        if len(history.objects) else np.zeros(0, np.int64)
    unassociated_objects = int(np.setdiff1d(on_image, result.updated_ids).size)
    n_updated = int(len(result.updated_ids))
    metrics = dict(result.metrics)
    metrics["numUnassociatedDiaObjects"] = unassociated_objects
    metrics["fracUpdatedDiaObjects"] = (n_updated / (n_updated + unassociated_objects)
                                        if n_updated + unassociated_objects else 0.0)
    marker = {
        **metrics,
        "numDiaObjectsOutsideCells": outside,
        "numForcedSources": forced.num_rows,
        "history": {"dataIds": len(history.data_ids), "DiaObject": len(history.objects),
                    "DiaSource": len(history.sources), "DiaForcedSource": len(history.forced_sources)},
        "config": asdict(cfg),
        "seconds_load": round(loaded - started, 4),
    }
    marker["seconds"] = round(time.perf_counter() - started, 4)
    return apdb.commit_data_id(root, visit, detector, mjd, cells, cfg.healpix_order,
                               {"DiaSource": result.sources, "DiaObject": objects, "DiaForcedSource": forced},
                               marker)
