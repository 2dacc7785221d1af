"""The night summary (one row per science data ID) and the completeness table of the night.

``night_summary`` reads each data ID's products (``apsnake.qa.metrics``) and the registry's
rejected table; ``completeness_table`` bins the fakes' outcomes per visit and for the night,
against injected magnitude and against expected S/N, with Clopper-Pearson errors and the fitted
m50. Both are written as Parquet with each column's unit in its name and in the field metadata
(``unit``, ``description``), docs/formats.md §13.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from apsnake import atomic
from apsnake.completeness import binned_completeness, fit_completeness
from apsnake.qa import metrics
from apsnake.qa.products import DataIdProducts

log = logging.getLogger(__name__)

#: (name, arrow type, unit, description) of the night summary's columns, in order.
SUMMARY_COLUMNS = (
    ("visit", pa.int64(), "", "DECam EXPNUM (null for a raw file rejected at ingest)"),
    ("detector", pa.int64(), "", "DECam CCDNUM (null for a raw file rejected at ingest)"),
    ("band", pa.string(), "", "band of the exposure"),
    ("midpointMjdTai", pa.float64(), "d", "mid-exposure time, MJD (TAI)"),
    ("fwhm_pix", pa.float64(), "pix", "PSF FWHM at the CCD centre (calexp FWHM card)"),
    ("seeing_arcsec", pa.float64(), "arcsec", "PSF FWHM at the CCD centre times the WCS pixel scale"),
    ("zero_point_mag", pa.float64(), "mag", "photometric zero point: AB magnitude of 1 ADU (calexp ZP)"),
    ("sky_level_adu", pa.float64(), "adu", "median sky level subtracted by calibration (calexp SKYLEV)"),
    ("astrometry_rms_mas", pa.float64(), "mas", "rms of the astrometric fit's residuals (calexp ASTRMS)"),
    ("limiting_mag", pa.float64(), "mag", "5-sigma PSF point-source depth at the CCD centre, AB: "
                                          "-2.5 log10(5 / sqrt(sum P^2 / V) / nJy) + 31.4"),
    ("m50_mag", pa.float64(), "mag", "magnitude of 50% fake recovery (logistic fit); null without fakes"),
    ("m50_err_mag", pa.float64(), "mag", "one-sigma error of m50_mag (bootstrap)"),
    ("n_fakes", pa.int64(), "", "fakes injected; null without fakes"),
    ("n_fakes_recovered", pa.int64(), "", "fakes recovered as DiaSources; null without fakes"),
    ("fake_pull_median", pa.float64(), "", "median of (psfFlux - injectedFlux) / psfFluxErr of the recovered fakes"),
    ("fake_pull_scatter", pa.float64(), "", "1.4826 MAD of the same pulls (1 when psfFluxErr is right)"),
    ("n_dia_sources", pa.int64(), "", "DiaSources of the data ID (diaSrc rows)"),
    ("n_dia_positive", pa.int64(), "", "DiaSources with isNegative false"),
    ("n_dia_negative", pa.int64(), "", "DiaSources with isNegative true"),
    ("template_coverage", pa.float64(), "", "fraction of the CCD covered by the template"),
    ("kernel_residual_std", pa.float64(), "", "std of the kernel stars' normalised fit residuals (1 = noise)"),
    ("n_kernel_stars", pa.int64(), "", "kernel stars used by the final fit"),
    ("kernel_sum", pa.float64(), "", "PSF-matching kernel sum at the CCD centre (flux ratio)"),
    ("skipped", pa.bool_(), "", "difference imaging skipped, or the raw file rejected at ingest"),
    ("skip_reason", pa.string(), "", "why (diffexp JSON reason, or 'rejected at ingest: ...'); null if not skipped"),
)

#: Columns of the completeness table.
COMPLETENESS_COLUMNS = (
    ("scope", pa.string(), "", "'visit' (one visit's fakes) or 'night' (all fakes)"),
    ("visit", pa.int64(), "", "the visit (null for the night)"),
    ("variable", pa.string(), "", "'injectedMag' (mag) or 'expectedSnr'"),
    ("lo", pa.float64(), "mag or 1", "bin lower edge (mag for injectedMag, S/N for expectedSnr)"),
    ("hi", pa.float64(), "mag or 1", "bin upper edge"),
    ("n", pa.int64(), "", "fakes in the bin"),
    ("k", pa.int64(), "", "fakes recovered in the bin"),
    ("fraction", pa.float64(), "", "k / n (null for an empty bin)"),
    ("err_lo", pa.float64(), "", "Clopper-Pearson one-sigma interval, lower bound of the fraction"),
    ("err_hi", pa.float64(), "", "Clopper-Pearson one-sigma interval, upper bound of the fraction"),
    ("m50_mag", pa.float64(), "mag", "m50 of the scope (same on each of its rows)"),
    ("m50_err_mag", pa.float64(), "mag", "one-sigma error of m50_mag"),
)

#: Bin width of the completeness in magnitude.
MAG_BIN = 0.25
#: Bin edges of the completeness in expected S/N.
SNR_EDGES = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30, 50, 100, 1000], float)


def _schema(columns) -> pa.Schema:
    return pa.schema([
        pa.field(name, type_, nullable=True, metadata={"unit": unit, "description": description})
        for name, type_, unit, description in columns
    ])


def _table(rows: list[dict], columns) -> pa.Table:
    schema = _schema(columns)
    frame = pd.DataFrame(rows, columns=[c[0] for c in columns])
    arrays = []
    for field in schema:
        values = frame[field.name].tolist()
        values = [None if (v is None or (isinstance(v, float) and not np.isfinite(v))) else v for v in values]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def read_fakes(path: str | Path | None) -> pd.DataFrame | None:
    """A data ID's fake table (None for no path or a missing file)."""
    if path is None or not Path(path).exists():
        return None
    return pd.read_parquet(path)


def data_id_row(products: DataIdProducts) -> dict:
    """The night-summary row of one data ID."""
    row = {"visit": products.visit, "detector": products.detector}
    row.update(metrics.calexp_metrics(products.calexp))
    row.update(metrics.diffim_metrics(products.diffexp_json))
    if Path(products.dia_src).exists():
        row.update(metrics.dia_counts(products.dia_src))
    row.update(metrics.fake_metrics(read_fakes(products.fakes)))
    return row


def night_summary(data_ids: list[DataIdProducts], rejected: pd.DataFrame | None = None) -> pa.Table:
    """The night summary: one row per science data ID (sorted by time, visit, detector), then
    one row per raw file rejected at ingest (``rejected``: the registry's rejected table;
    calibration files are not data IDs and are left out)."""
    rows = sorted((data_id_row(p) for p in data_ids),
                  key=lambda r: (r["midpointMjdTai"], r["visit"], r["detector"]))
    if rejected is not None and len(rejected):
        for item in rejected.itertuples():
            if str(item.kind) != "raw":
                continue
            rows.append({"visit": None, "detector": None, "skipped": True,
                         "skip_reason": f"rejected at ingest: {Path(str(item.path)).name}: {item.reason}"})
    return _table(rows, SUMMARY_COLUMNS)


def _edges(values: np.ndarray, width: float) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return np.array([0.0, width])
    lo, hi = np.floor(finite.min() / width) * width, np.floor(finite.max() / width) * width + width
    return np.arange(lo, hi + width / 2, width)


def completeness_table(fakes: pd.DataFrame | None) -> pa.Table:
    """Binned completeness and m50 per visit and for the night (no rows without fakes).

    ``fakes``: the night's fake tables concatenated (columns visit, injectedMag, expectedSnr,
    recovered). Magnitude bins are ``MAG_BIN`` wide and shared by all scopes; S/N bins are
    ``SNR_EDGES``.
    """
    rows: list[dict] = []
    if fakes is None or fakes.empty:
        return _table(rows, COMPLETENESS_COLUMNS)
    mags = np.asarray(fakes["injectedMag"], float)
    mag_edges = _edges(mags, MAG_BIN)
    scopes = [("night", None, fakes)]
    scopes += [("visit", int(v), group) for v, group in fakes.groupby("visit", sort=True)]
    for scope, visit, group in scopes:
        recovered = np.asarray(group["recovered"].fillna(False), bool)
        fit = fit_completeness(np.asarray(group["injectedMag"], float), recovered, decreasing=True)
        for variable, edges in (("injectedMag", mag_edges), ("expectedSnr", SNR_EDGES)):
            binned = binned_completeness(np.asarray(group[variable], float), recovered, edges)
            for i in range(len(edges) - 1):
                rows.append({"scope": scope, "visit": visit, "variable": variable,
                             **{key: binned[key][i].item() for key in ("lo", "hi", "n", "k", "fraction",
                                                                       "err_lo", "err_hi")},
                             "m50_mag": fit.x50, "m50_err_mag": fit.x50_err})
    return _table(rows, COMPLETENESS_COLUMNS)


def night_fakes(data_ids: list[DataIdProducts]) -> pd.DataFrame | None:
    """All fake tables of the night concatenated (None when no data ID has one)."""
    tables = [t for t in (read_fakes(p.fakes) for p in data_ids) if t is not None]
    return pd.concat(tables, ignore_index=True) if tables else None


def write_night_summary(table: pa.Table, path: str | Path) -> None:
    atomic.write_parquet(table, path)


def write_completeness(table: pa.Table, path: str | Path) -> None:
    atomic.write_parquet(table, path)
