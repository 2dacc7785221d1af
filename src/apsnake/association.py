"""Association of one data ID's DiaSources with the current DiaObjects, and DiaObject summaries.

Pure functions on tables (no file I/O); ALGORITHMS.md section 4 (Rubin ``ap_association``
``diaPipe.py``/``association.py``, ``meas_base`` ``diaCalculationPlugins.py``).

* ``match_one_to_one``: every source-object pair within the radius (default 1.0 arcsec),
  accepted greedily by ascending angular distance so that each source and each object is
  used at most once (the "handshake" rule of Rubin's earlier association; Rubin now solves
  a min-cost bipartite matching instead).
* ``associate_sources``: matched sources take the object's id; unmatched sources found new
  DiaObjects (``diaObjectId = diaSourceId``) unless they carry one of
  ``NEW_OBJECT_BAD_FLAGS``, in which case they are kept with a null ``diaObjectId``.
  Metrics use Rubin's names (``ap_association`` ``metrics.py``).
* ``summarise_objects``: one new DiaObject version per object from its full source and
  forced-source history (Rubin's default DiaCalculation plugins, plus the columns Rubin
  leaves empty: ``raErr``, ``decErr``, ``first/lastDiaSourceMjdTai``, ``{b}_fpFlux*``).

Units: positions in degrees, distances in arcsec, fluxes in nJy, times MJD (TAI) in days.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.spatial import cKDTree

from apsnake.errors import ApsnakeError
from apsnake.schema import BANDS, conform, empty_table
from apsnake.sphere import angle_between_vectors, radec_of_vectors, unit_vectors

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


class AssociationError(ApsnakeError, ValueError):
    """Association inputs or results that cannot be accepted (bad tables, too many new objects)."""


# ---------------------------------------------------------------------------
# Matching

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


# ---------------------------------------------------------------------------
# Association

def _flag_array(df: pd.DataFrame, name: str) -> np.ndarray:
    """A boolean column as a numpy bool array; null (or a missing column) counts as False."""
    if name not in df.columns:
        return np.zeros(len(df), bool)
    return df[name].astype("boolean").fillna(False).to_numpy(dtype=bool)


def can_found_object(sources_df: pd.DataFrame) -> np.ndarray:
    """Per source, whether it may found a new DiaObject: none of ``NEW_OBJECT_BAD_FLAGS`` is set.

    A null flag, or a flag column absent from the table, counts as not set.
    """
    bad = np.zeros(len(sources_df), bool)
    for name in NEW_OBJECT_BAD_FLAGS:
        bad |= _flag_array(sources_df, name)
    return ~bad


def _float_array(df: pd.DataFrame, name: str) -> np.ndarray:
    """A column as float64 (null -> NaN); a missing column is all NaN."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    return df[name].to_numpy(dtype=np.float64, na_value=np.nan)


def _id_array(df: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """An id column as (int64 values, non-null mask); null ids read as 0 in the values."""
    col = df[name]
    valid = col.notna().to_numpy()
    return col.to_numpy(dtype=np.int64, na_value=0), valid


def _data_id_label(sources: pd.DataFrame) -> str:
    """'visit V detector D' for the error messages, from the sources' own columns."""
    parts = []
    for name in ("visit", "detector"):
        if name in sources.columns and len(sources):
            values = pd.unique(sources[name].dropna())
            parts.append(f"{name} {values[0]}" if len(values) == 1 else f"{len(values)} {name}s")
    return ", ".join(parts) if parts else "unknown data ID"


def _require(df: pd.DataFrame, names, what: str) -> None:
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise AssociationError(f"{what}: missing column(s) {', '.join(missing)}")


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
    _require(sources, ("diaSourceId", "ra", "dec"), "DiaSources to associate")
    label = _data_id_label(sources)
    n_src = len(sources)
    source_ids, source_id_ok = _id_array(sources, "diaSourceId")
    if not source_id_ok.all():
        raise AssociationError(f"{label}: {np.count_nonzero(~source_id_ok)} DiaSources without diaSourceId")
    if np.unique(source_ids).size != n_src:
        raise AssociationError(f"{label}: duplicate diaSourceId among the DiaSources")
    if "diaObjectId" in sources.columns and sources["diaObjectId"].notna().any():
        raise AssociationError(f"{label}: {int(sources['diaObjectId'].notna().sum())} DiaSources "
                               "already have a diaObjectId; association expects unassociated sources")

    if len(objects):
        _require(objects, ("diaObjectId", "ra", "dec"), f"{label}: loaded DiaObjects")
        object_ids, object_id_ok = _id_array(objects, "diaObjectId")
        if not object_id_ok.all():
            raise AssociationError(f"{label}: loaded DiaObjects with null diaObjectId")
        if np.unique(object_ids).size != len(objects):
            raise AssociationError(f"{label}: duplicate diaObjectId among the loaded DiaObjects "
                                   "(pass one current version per object)")
        obj_ra, obj_dec = _float_array(objects, "ra"), _float_array(objects, "dec")
    else:
        object_ids = np.zeros(0, np.int64)
        obj_ra = obj_dec = np.zeros(0)

    # Match in id order: the tie-break of match_one_to_one then follows the ids.
    src_order = np.argsort(source_ids, kind="stable")
    obj_order = np.argsort(object_ids, kind="stable")
    src_ra, src_dec = _float_array(sources, "ra"), _float_array(sources, "dec")
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


# ---------------------------------------------------------------------------
# DiaObject summaries

def _weighted_mean(groups: np.ndarray, n_groups: int, value: np.ndarray, err: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean and its error (sqrt(1 / sum w)) per group.

    Rows with non-finite value or error, or error <= 0, are ignored; groups without
    usable rows get NaN.
    """
    ok = np.isfinite(value) & np.isfinite(err) & (err > 0)
    w = 1.0 / err[ok] ** 2
    sum_w = np.bincount(groups[ok], w, minlength=n_groups)
    sum_wv = np.bincount(groups[ok], w * value[ok], minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(sum_w > 0, sum_wv / sum_w, np.nan)
        mean_err = np.where(sum_w > 0, np.sqrt(1.0 / sum_w), np.nan)
    return mean, mean_err


def _max_slope(groups: np.ndarray, n_groups: int, time: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Per group, the largest (signed) dflux/dt between time-consecutive rows; NaN if none.

    Rows are ordered by time (ties by flux); pairs with dt <= 0 are skipped.
    """
    slope = np.full(n_groups, np.nan)
    if groups.size < 2:
        return slope
    order = np.lexsort((flux, time, groups))
    g, t, f = groups[order], time[order], flux[order]
    dt = np.diff(t)
    pair_ok = (g[1:] == g[:-1]) & (dt > 0)
    if not pair_ok.any():
        return slope
    best = np.full(n_groups, -np.inf)
    np.maximum.at(best, g[1:][pair_ok], np.diff(f)[pair_ok] / dt[pair_ok])
    has = np.isfinite(best)
    slope[has] = best[has]
    return slope


def _band_codes(df: pd.DataFrame) -> np.ndarray:
    """Index of each row's band in ``BANDS``, -1 for other bands or null."""
    if "band" not in df.columns:
        return np.full(len(df), -1, np.int64)
    return pd.Index(BANDS).get_indexer(df["band"].astype(object)).astype(np.int64)


def _rows_of(df: pd.DataFrame, ids_sorted: np.ndarray, what: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows of ``df`` whose diaObjectId is in ``ids_sorted`` and their position in it."""
    if len(df) == 0 or "diaObjectId" not in df.columns:
        if len(df):
            raise AssociationError(f"{what}: no diaObjectId column")
        return df.iloc[0:0], np.zeros(0, np.int64)
    ids, valid = _id_array(df, "diaObjectId")
    pos = np.searchsorted(ids_sorted, ids)
    pos_c = np.minimum(pos, ids_sorted.size - 1)
    keep = valid & (ids_sorted[pos_c] == ids)
    return df[keep], pos_c[keep].astype(np.int64)


def summarise_objects(object_ids, sources: pd.DataFrame, forced_sources: pd.DataFrame,
                      validity_start_mjd_tai: float) -> pa.Table:
    """New DiaObject versions computed from each object's full source history.

    Parameters
    ----------
    object_ids : array-like of int
        The DiaObjects to summarise (duplicates are ignored); one row each, sorted by id.
    sources : pandas.DataFrame
        DiaSources (history plus the new data ID's rows); rows of other objects and rows
        with null diaObjectId are ignored. Uses diaObjectId, ra, dec (deg), raErr, decErr
        (deg), midpointMjdTai, band, psfFlux, psfFluxErr, scienceFlux, scienceFluxErr (nJy).
    forced_sources : pandas.DataFrame
        DiaForcedSources (may be empty, with or without columns); uses diaObjectId, band,
        psfFlux, psfFluxErr (nJy).
    validity_start_mjd_tai : float
        ``validityStartMjdTai`` of the new versions (the visit's midpoint, MJD TAI).

    Returns
    -------
    pyarrow.Table
        ``schema.conform(..., 'DiaObject')``. Per object:

        * ``ra``, ``dec``: spherical mean of the source positions (mean unit vector);
          ``raErr``, ``decErr``: error of that unweighted mean, sqrt(sum err_i^2) / N over
          the N sources whose error is known (null if none); ``ra_dec_Cov`` null.
        * ``nDiaSources``, ``firstDiaSourceMjdTai``, ``lastDiaSourceMjdTai`` over all sources.
        * per band b in ``BANDS``, over the sources of band b with finite psfFlux and
          psfFluxErr > 0: ``psfFluxMean`` (inverse-variance weighted), ``psfFluxMeanErr``
          (sqrt(1 / sum w)), ``psfFluxSigma`` (std, ddof=1; null below 2 sources),
          ``psfFluxNdata`` (0 when none), ``psfFluxMin/Max``, ``psfFluxMaxSlope`` (largest
          dflux/dt between time-consecutive sources, nJy/day, pairs with dt <= 0 skipped),
          ``psfFluxErrMean``. ``scienceFluxMean/MeanErr``: weighted mean of the band's
          sources with finite scienceFlux and scienceFluxErr > 0; ``fpFluxMean/MeanErr``:
          the same of the band's forced sources' psfFlux/psfFluxErr. Empty means are null.
        * Sources in other bands count only for position, nDiaSources and first/last MJD.

    Raises
    ------
    ValueError
        An object without any source (a caller bug: every object has its founding source).
    AssociationError
        A required column is missing.
    """
    ids = np.unique(np.asarray(object_ids, dtype=np.int64).ravel())
    n = ids.size
    if n == 0:
        return empty_table("DiaObject")
    _require(sources, ("diaObjectId", "ra", "dec", "midpointMjdTai"), "DiaSources to summarise")
    src, pos = _rows_of(sources, ids, "DiaSources to summarise")

    n_src = np.bincount(pos, minlength=n)
    if (n_src == 0).any():
        missing = ids[n_src == 0]
        raise ValueError(f"{missing.size} DiaObject(s) without any DiaSource, e.g. {missing[:5].tolist()}")

    out: dict[str, np.ndarray] = {"diaObjectId": ids,
                                  "validityStartMjdTai": np.full(n, float(validity_start_mjd_tai))}

    # Position: mean unit vector, renormalised.
    xyz = unit_vectors(_float_array(src, "ra"), _float_array(src, "dec"))
    mean_xyz = np.column_stack([np.bincount(pos, xyz[:, k], minlength=n) for k in range(3)])
    ra, out["dec"] = radec_of_vectors(mean_xyz)
    out["ra"] = np.where(ra >= 360.0, 0.0, ra)
    for name in ("raErr", "decErr"):
        err = _float_array(src, name)
        ok = np.isfinite(err)
        count = np.bincount(pos[ok], minlength=n)
        sum_sq = np.bincount(pos[ok], err[ok] ** 2, minlength=n)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[name] = np.where(count > 0, np.sqrt(sum_sq) / count, np.nan)
    out["ra_dec_Cov"] = np.full(n, np.nan)

    # Per band: group = object position * len(BANDS) + band index.
    nb = len(BANDS)
    n_groups = n * nb
    band = _band_codes(src)
    in_band = band >= 0
    group_all = pos * nb + band
    flux, flux_err = _float_array(src, "psfFlux"), _float_array(src, "psfFluxErr")
    time = _float_array(src, "midpointMjdTai")
    good = in_band & np.isfinite(flux) & np.isfinite(flux_err) & (flux_err > 0)
    g, f, fe, t = group_all[good], flux[good], flux_err[good], time[good]

    ndata = np.bincount(g, minlength=n_groups)
    has = ndata > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        plain_mean = np.bincount(g, f, minlength=n_groups) / ndata
        resid_sq = np.bincount(g, (f - plain_mean[g]) ** 2, minlength=n_groups)
        sigma = np.where(ndata >= 2, np.sqrt(resid_sq / (ndata - 1)), np.nan)
        err_mean = np.where(has, np.bincount(g, fe, minlength=n_groups) / ndata, np.nan)
    fmin = np.full(n_groups, np.inf)
    fmax = np.full(n_groups, -np.inf)
    np.minimum.at(fmin, g, f)
    np.maximum.at(fmax, g, f)
    mean, mean_err = _weighted_mean(g, n_groups, f, fe)
    per_band = {
        "psfFluxMean": mean,
        "psfFluxMeanErr": mean_err,
        "psfFluxSigma": sigma,
        "psfFluxNdata": ndata.astype(np.int32),
        "psfFluxMin": np.where(has, fmin, np.nan),
        "psfFluxMax": np.where(has, fmax, np.nan),
        "psfFluxMaxSlope": _max_slope(g, n_groups, t, f),
        "psfFluxErrMean": err_mean,
    }
    per_band["scienceFluxMean"], per_band["scienceFluxMeanErr"] = _weighted_mean(
        group_all[in_band], n_groups, _float_array(src, "scienceFlux")[in_band],
        _float_array(src, "scienceFluxErr")[in_band])

    forced, fpos = _rows_of(forced_sources, ids, "DiaForcedSources to summarise")
    fband = _band_codes(forced)
    f_in = fband >= 0
    per_band["fpFluxMean"], per_band["fpFluxMeanErr"] = _weighted_mean(
        (fpos * nb + fband)[f_in], n_groups, _float_array(forced, "psfFlux")[f_in],
        _float_array(forced, "psfFluxErr")[f_in])

    for suffix, values in per_band.items():
        table = values.reshape(n, nb)
        for k, b in enumerate(BANDS):
            out[f"{b}_{suffix}"] = table[:, k]

    out["firstDiaSourceMjdTai"] = np.full(n, np.inf)
    out["lastDiaSourceMjdTai"] = np.full(n, -np.inf)
    np.minimum.at(out["firstDiaSourceMjdTai"], pos, time)
    np.maximum.at(out["lastDiaSourceMjdTai"], pos, time)
    out["nDiaSources"] = n_src.astype(np.int32)
    return conform(out, "DiaObject")
