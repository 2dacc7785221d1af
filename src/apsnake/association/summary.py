"""DiaObject summaries: one new version per object from its source and forced-source history.

Rubin's default DiaCalculation plugins (``meas_base`` ``diaCalculationPlugins.py``), plus the
columns Rubin leaves empty: ``raErr``, ``decErr``, ``first/lastDiaSourceMjdTai``,
``{band}_fpFlux*``. Fluxes in nJy, positions in degrees, times MJD (TAI).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from apsnake.association.tables import AssociationError, float_column, id_column, require_columns
from apsnake.schema import BANDS, conform, empty_table
from apsnake.sphere import radec_of_vectors, unit_vectors


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
    ids, valid = id_column(df, "diaObjectId")
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
    require_columns(sources, ("diaObjectId", "ra", "dec", "midpointMjdTai"), "DiaSources to summarise")
    src, pos = _rows_of(sources, ids, "DiaSources to summarise")

    n_src = np.bincount(pos, minlength=n)
    if (n_src == 0).any():
        missing = ids[n_src == 0]
        raise ValueError(f"{missing.size} DiaObject(s) without any DiaSource, e.g. {missing[:5].tolist()}")

    out: dict[str, np.ndarray] = {"diaObjectId": ids,
                                  "validityStartMjdTai": np.full(n, float(validity_start_mjd_tai))}

    # Position: mean unit vector, renormalised.
    xyz = unit_vectors(float_column(src, "ra"), float_column(src, "dec"))
    mean_xyz = np.column_stack([np.bincount(pos, xyz[:, k], minlength=n) for k in range(3)])
    ra, out["dec"] = radec_of_vectors(mean_xyz)
    out["ra"] = np.where(ra >= 360.0, 0.0, ra)
    for name in ("raErr", "decErr"):
        err = float_column(src, name)
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
    flux, flux_err = float_column(src, "psfFlux"), float_column(src, "psfFluxErr")
    time = float_column(src, "midpointMjdTai")
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
        group_all[in_band], n_groups, float_column(src, "scienceFlux")[in_band],
        float_column(src, "scienceFluxErr")[in_band])

    forced, fpos = _rows_of(forced_sources, ids, "DiaForcedSources to summarise")
    fband = _band_codes(forced)
    f_in = fband >= 0
    per_band["fpFluxMean"], per_band["fpFluxMeanErr"] = _weighted_mean(
        (fpos * nb + fband)[f_in], n_groups, float_column(forced, "psfFlux")[f_in],
        float_column(forced, "psfFluxErr")[f_in])

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
