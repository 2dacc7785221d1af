"""Association of one data ID's DiaSources with the current DiaObjects (docs/algorithms.md).

* ``match_one_to_one``: every source-object pair within the radius (default 1.0 arcsec),
  accepted greedily by ascending angular distance so that each source and each object is
  used at most once (the "handshake" rule of Rubin's earlier association; Rubin now solves a
  min-cost bipartite matching instead).
* ``associate_sources``: matched sources take the object's id; unmatched sources found new
  DiaObjects (``diaObjectId = diaSourceId``) unless they carry one of
  ``NEW_OBJECT_BAD_FLAGS``, in which case they are kept with a null ``diaObjectId``. Metrics
  use Rubin's names (``ap_association`` ``metrics.py``).

Pure functions on tables (no file I/O). Positions in degrees, distances in arcsec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from apsnake.association.tables import (AssociationError, data_id_label, flag_column, float_column, id_column,
                                        require_columns)
from apsnake.sphere import angle_between_vectors, unit_vectors

ARCSEC_PER_RAD = 180.0 / np.pi * 3600.0

#: DiaSource flags that stop an unmatched source from founding a new DiaObject: Rubin's
#: ``newObjectBadFlags`` (centroid failure; cosmic ray, no-data, interpolated, saturated,
#: suspect or streak pixels at the centre) plus a centroid off the image.
NEW_OBJECT_BAD_FLAGS: tuple[str, ...] = (
    "centroid_flag",
    "pixelFlags_crCenter",
    "pixelFlags_nodataCenter",
    "pixelFlags_interpolatedCenter",
    "pixelFlags_saturatedCenter",
    "pixelFlags_suspectCenter",
    "pixelFlags_streakCenter",
    "pixelFlags_offimage",
)

#: After this many vectorised rounds of the greedy matching, the rest is done pair by pair
#: (only long chains of ever-closer neighbours need more rounds).
_MAX_VECTOR_ROUNDS = 16


def _greedy_pairs(src: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Indices of the accepted pairs among candidate pairs already sorted best first.

    A pair is accepted when neither its source nor its object was taken by an earlier
    accepted pair. Vectorised by rounds: a pair that comes first among the remaining pairs
    of both its source and its object is accepted by the sequential rule too (every earlier
    pair touching it is already gone), so each round accepts all such pairs at once and
    drops the pairs they block; the best remaining pair qualifies, so every round makes
    progress. The result equals the sequential greedy matching.
    """
    n = len(src)
    accepted = np.zeros(n, bool)
    alive = np.ones(n, bool)
    src_taken = np.zeros(src.max() + 1 if n else 0, bool)
    obj_taken = np.zeros(obj.max() + 1 if n else 0, bool)
    for _ in range(_MAX_VECTOR_ROUNDS):
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            return np.flatnonzero(accepted)
        first_of_src = np.zeros(idx.size, bool)
        first_of_src[np.unique(src[idx], return_index=True)[1]] = True
        first_of_obj = np.zeros(idx.size, bool)
        first_of_obj[np.unique(obj[idx], return_index=True)[1]] = True
        take = idx[first_of_src & first_of_obj]
        accepted[take] = True
        src_taken[src[take]] = True
        obj_taken[obj[take]] = True
        alive &= ~(src_taken[src] | obj_taken[obj])
    for k in np.flatnonzero(alive):  # rare: finish long chains sequentially
        if not (src_taken[src[k]] or obj_taken[obj[k]]):
            accepted[k] = True
            src_taken[src[k]] = obj_taken[obj[k]] = True
    return np.flatnonzero(accepted)


def match_one_to_one(src_ra, src_dec, obj_ra, obj_dec, radius_arcsec: float = 1.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Match sources to objects one-to-one, greedily by ascending angular distance.

    All source-object pairs with separation <= ``radius_arcsec`` are candidates. They are
    ordered by (distance, source index, object index) and each pair is accepted when its
    source and its object are both still free. Works across RA = 0/360 and at the poles
    (unit vectors on the sphere). Rows with non-finite coordinates never match.

    Parameters
    ----------
    src_ra, src_dec : array-like of float
        Source positions, degrees.
    obj_ra, obj_dec : array-like of float
        Object positions, degrees.
    radius_arcsec : float
        Match radius, arcsec (inclusive).

    Returns
    -------
    obj_index : numpy.ndarray of int64
        Per source, the index of its object in the object arrays, or -1.
    distance_arcsec : numpy.ndarray of float64
        Per source, the separation from its object in arcsec, or NaN.
    """
    src_ra, src_dec = np.asarray(src_ra, float).ravel(), np.asarray(src_dec, float).ravel()
    obj_ra, obj_dec = np.asarray(obj_ra, float).ravel(), np.asarray(obj_dec, float).ravel()
    if src_ra.size != src_dec.size or obj_ra.size != obj_dec.size:
        raise ValueError(f"ra and dec differ in length: sources {src_ra.size}/{src_dec.size}, "
                         f"objects {obj_ra.size}/{obj_dec.size}")
    if not (np.isfinite(radius_arcsec) and radius_arcsec > 0):
        raise ValueError(f"radius_arcsec must be positive, got {radius_arcsec!r}")
    obj_index = np.full(src_ra.size, -1, np.int64)
    distance = np.full(src_ra.size, np.nan)
    src_ok = np.flatnonzero(np.isfinite(src_ra) & np.isfinite(src_dec))
    obj_ok = np.flatnonzero(np.isfinite(obj_ra) & np.isfinite(obj_dec))
    if src_ok.size == 0 or obj_ok.size == 0:
        return obj_index, distance

    src_xyz = unit_vectors(src_ra[src_ok], src_dec[src_ok])
    obj_xyz = unit_vectors(obj_ra[obj_ok], obj_dec[obj_ok])
    radius_rad = radius_arcsec / ARCSEC_PER_RAD
    # Chord of the radius, padded a little: the exact angle decides at the boundary.
    chord = 2.0 * np.sin(min(radius_rad, np.pi) / 2.0) * (1.0 + 1e-9) + 1e-15
    pairs = cKDTree(src_xyz).sparse_distance_matrix(cKDTree(obj_xyz), chord, output_type="ndarray")
    s, o = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    angle_arcsec = angle_between_vectors(src_xyz[s], obj_xyz[o]) * ARCSEC_PER_RAD
    keep = angle_arcsec <= radius_arcsec
    s, o, angle_arcsec = s[keep], o[keep], angle_arcsec[keep]
    if s.size == 0:
        return obj_index, distance
    # Indices in the caller's arrays, so that the tie-break follows the caller's order.
    s, o = src_ok[s], obj_ok[o]
    order = np.lexsort((o, s, angle_arcsec))
    s, o, angle_arcsec = s[order], o[order], angle_arcsec[order]
    take = _greedy_pairs(s, o)
    obj_index[s[take]] = o[take]
    distance[s[take]] = angle_arcsec[take]
    return obj_index, distance


def can_found_object(sources_df: pd.DataFrame) -> np.ndarray:
    """Per source, whether it may found a new DiaObject: none of ``NEW_OBJECT_BAD_FLAGS`` is set.

    A null flag, or a flag column absent from the table, counts as not set.
    """
    bad = np.zeros(len(sources_df), bool)
    for name in NEW_OBJECT_BAD_FLAGS:
        bad |= flag_column(sources_df, name)
    return ~bad


@dataclass
class AssociationResult:
    """What ``associate_sources`` decided for one data ID.

    Attributes
    ----------
    sources : pandas.DataFrame
        Copy of the input sources (same order and index) with ``diaObjectId`` filled
        (pandas ``Int64``; null for unassociated sources).
    updated_ids : numpy.ndarray of int64
        Existing DiaObjects that received a source (sorted).
    new_ids : numpy.ndarray of int64
        New DiaObjects (= the founding sources' diaSourceId; sorted).
    unassociated_source_ids : numpy.ndarray of int64
        Unmatched sources with a bad flag, kept with a null diaObjectId (sorted).
    match_distance_arcsec : numpy.ndarray of float64
        Per source (input order), the distance to its matched existing object in arcsec;
        NaN for new-object founders and unassociated sources.
    metrics : dict
        ``numNewDiaObjects``, ``numUpdatedDiaObjects``, ``numUnassociatedDiaObjects``
        (loaded objects that got no source), ``fracUpdatedDiaObjects``,
        ``numUnassociatedDiaSources``, ``numLoadedDiaObjects``, ``numDiaSources``.
    """

    sources: pd.DataFrame
    updated_ids: np.ndarray
    new_ids: np.ndarray
    unassociated_source_ids: np.ndarray
    match_distance_arcsec: np.ndarray
    metrics: dict = field(default_factory=dict)


def associate_sources(sources: pd.DataFrame, objects: pd.DataFrame, radius_arcsec: float = 1.0,
                      max_new_objects: int | None = None) -> AssociationResult:
    """Associate one data ID's DiaSources with the current DiaObjects.

    Sources are matched to objects one-to-one (``match_one_to_one``). A matched source
    takes the object's ``diaObjectId`` whatever its flags. An unmatched source founds a new
    DiaObject with ``diaObjectId = diaSourceId`` if ``can_found_object``; otherwise it keeps
    a null ``diaObjectId`` (kept in the table and counted, not dropped).

    The matching runs on sources sorted by ``diaSourceId`` and objects sorted by
    ``diaObjectId``, so exact distance ties are broken by id and the result does not depend
    on the row order of the inputs.

    Parameters
    ----------
    sources : pandas.DataFrame
        The data ID's DiaSources (at least ``diaSourceId``, ``ra``, ``dec`` in degrees;
        ``diaObjectId`` null or absent; flag columns as in the DiaSource schema).
    objects : pandas.DataFrame
        Current DiaObjects in the region (``diaObjectId``, ``ra``, ``dec`` in degrees); may
        be empty, with or without columns.
    radius_arcsec : float
        Match radius, arcsec (Rubin: 1.0).
    max_new_objects : int or None
        Raise ``AssociationError`` when more new DiaObjects would be made (Rubin ApPipe:
        1000); None = no limit.

    Returns
    -------
    AssociationResult
        ``metrics['fracUpdatedDiaObjects']`` = updated / (updated + unassociated objects),
        and 0.0 when both are 0 (no objects loaded; Rubin's metric is undefined then).

    Raises
    ------
    AssociationError
        Missing columns, duplicate ids, sources already associated, a new id equal to a
        loaded object id, or more than ``max_new_objects`` new objects.
    """
    require_columns(sources, ("diaSourceId", "ra", "dec"), "DiaSources to associate")
    label = data_id_label(sources)
    n_src = len(sources)
    source_ids, source_id_ok = id_column(sources, "diaSourceId")
    if not source_id_ok.all():
        raise AssociationError(f"{label}: {np.count_nonzero(~source_id_ok)} DiaSources without diaSourceId")
    if np.unique(source_ids).size != n_src:
        raise AssociationError(f"{label}: duplicate diaSourceId among the DiaSources")
    if "diaObjectId" in sources.columns and sources["diaObjectId"].notna().any():
        raise AssociationError(f"{label}: {int(sources['diaObjectId'].notna().sum())} DiaSources "
                               "already have a diaObjectId; association expects unassociated sources")

    if len(objects):
        require_columns(objects, ("diaObjectId", "ra", "dec"), f"{label}: loaded DiaObjects")
        object_ids, object_id_ok = id_column(objects, "diaObjectId")
        if not object_id_ok.all():
            raise AssociationError(f"{label}: loaded DiaObjects with null diaObjectId")
        if np.unique(object_ids).size != len(objects):
            raise AssociationError(f"{label}: duplicate diaObjectId among the loaded DiaObjects "
                                   "(pass one current version per object)")
        obj_ra, obj_dec = float_column(objects, "ra"), float_column(objects, "dec")
    else:
        object_ids = np.zeros(0, np.int64)
        obj_ra = obj_dec = np.zeros(0)

    # Match in id order: the tie-break of match_one_to_one then follows the ids.
    src_order = np.argsort(source_ids, kind="stable")
    obj_order = np.argsort(object_ids, kind="stable")
    src_ra, src_dec = float_column(sources, "ra"), float_column(sources, "dec")
    idx_sorted, dist_sorted = match_one_to_one(src_ra[src_order], src_dec[src_order],
                                               obj_ra[obj_order], obj_dec[obj_order], radius_arcsec)
    matched_obj = np.full(n_src, -1, np.int64)
    hit = idx_sorted >= 0
    matched_obj[src_order[hit]] = obj_order[idx_sorted[hit]]
    distance = np.full(n_src, np.nan)
    distance[src_order] = dist_sorted

    matched = matched_obj >= 0
    founders = ~matched & can_found_object(sources)
    unassociated = ~matched & ~founders

    new_ids = np.sort(source_ids[founders])
    if max_new_objects is not None and new_ids.size > max_new_objects:
        raise AssociationError(f"{label}: {new_ids.size} new DiaObjects exceed max_new_objects="
                               f"{max_new_objects}")
    clash = np.intersect1d(new_ids, object_ids)
    if clash.size:
        raise AssociationError(f"{label}: new DiaObject id(s) {clash[:5].tolist()} already exist among "
                               "the loaded DiaObjects (sources associated twice?)")

    assigned = source_ids.copy()
    assigned[matched] = object_ids[matched_obj[matched]]
    dia_object_id = pd.array(assigned, dtype="Int64")
    dia_object_id[unassociated] = pd.NA
    out = sources.copy()
    out["diaObjectId"] = dia_object_id

    updated_ids = np.sort(object_ids[matched_obj[matched]])
    n_loaded = len(object_ids)
    n_updated, n_unassoc_obj = int(updated_ids.size), int(n_loaded - updated_ids.size)
    metrics = {
        "numNewDiaObjects": int(new_ids.size),
        "numUpdatedDiaObjects": n_updated,
        "numUnassociatedDiaObjects": n_unassoc_obj,
        "fracUpdatedDiaObjects": (n_updated / (n_updated + n_unassoc_obj)
                                  if n_updated + n_unassoc_obj else 0.0),
        "numUnassociatedDiaSources": int(np.count_nonzero(unassociated)),
        "numLoadedDiaObjects": int(n_loaded),
        "numDiaSources": int(n_src),
    }
    return AssociationResult(
        sources=out,
        updated_ids=updated_ids.astype(np.int64),
        new_ids=new_ids.astype(np.int64),
        unassociated_source_ids=np.sort(source_ids[unassociated]).astype(np.int64),
        match_distance_arcsec=distance,
        metrics=metrics,
    )
