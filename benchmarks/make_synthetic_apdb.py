"""A synthetic APDB with a realistic layout, for timing the APDB readers.

    python benchmarks/make_synthetic_apdb.py OUT [--visits 25] [--time N]

``make_synthetic_apdb`` writes, through ``apsnake.apdb.commit_data_id`` (the real writer, in
chain order), what association would write for ``n_visits`` visits of ``n_ra x n_dec``
rectangular pointings that tile one ``region_deg`` x ``region_deg`` field, each visit dithered
by up to ``dither_deg``: ``n_objects`` objects at fixed positions, each pointing detecting
``sources_per_data_id`` of the objects under it on average, forced photometry of every known
object under it, and one DiaObject version per detected object. Every schema column is filled
(random values where the content does not matter), so file sizes and decode costs are those of
real fragments. The defaults (25 visits x 40 pointings, 1e5 objects, 1000 sources per data ID)
give ~1e6 DiaSources, ~1e5 DiaObjects and ~2.5e6 DiaForcedSources in 1000 data IDs, and each
data ID's cells are touched by ~50-100 data IDs.

``time_load_history`` times ``apsnake.apdb.load_history`` for data IDs of the last visits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from apsnake import apdb
from apsnake.schema import BANDS, columns
from apsnake.association.plan import DEFAULT_ORDER, DEFAULT_PAD_ARCSEC, footprint_cells

MJD0 = 60000.1
VISIT0 = 500000
FLOAT_FORCED_OFFSET = 2**25  # forced-source ids: upper half of the data ID's 26-bit counter


def _packed(visit: int, detector: int) -> int:
    return (visit * 100 + detector) << 26


def _filled(table: str, n: int, rng: np.random.Generator) -> dict:
    """Random values for every column of ``table`` (callers overwrite the meaningful ones)."""
    out = {}
    for col in columns(table):
        kind = str(col.type)
        if kind in ("float", "double"):
            out[col.name] = rng.normal(size=n).astype(np.float32 if kind == "float" else np.float64)
        elif kind in ("int32", "int64"):
            out[col.name] = rng.integers(0, 100, size=n)
        elif kind == "bool":
            out[col.name] = rng.random(n) < 0.05
        else:
            out[col.name] = np.full(n, "v1")
    return out


def make_synthetic_apdb(root, n_visits: int = 25, n_ra: int = 8, n_dec: int = 5, n_objects: int = 100_000,
                        sources_per_data_id: int = 1000, region_deg: float = 3.0, ra0: float = 150.0,
                        dec0: float = 2.0, dither_deg: float = 0.1, cadence_days: float = 1.0,
                        order: int = DEFAULT_ORDER, pad_arcsec: float = DEFAULT_PAD_ARCSEC,
                        forced: bool = True, seed: int = 1, progress: bool = False) -> dict:
    """Write a synthetic APDB under ``root``; return counts and the data IDs' keys and cells.

    Parameters
    ----------
    n_visits, n_ra, n_dec : int
        Visits, and pointings per visit on an n_ra x n_dec grid (detectors 1..n_ra*n_dec).
    n_objects : int
        Objects, uniform over the field grown by ``dither_deg``.
    sources_per_data_id : int
        Mean DiaSources per data ID (each object under a pointing is detected with probability
        sources_per_data_id / objects under a pointing).
    region_deg, ra0, dec0, dither_deg : float
        Field side, centre (ICRS) and largest dither offset, degrees.
    cadence_days : float
        Time between visits (the bands cycle g, r, i).
    order, pad_arcsec
        Cells of each data ID: ``apsnake.association.plan.footprint_cells`` of its corners.
    forced : bool
        Write forced photometry of every known object under each pointing.

    Returns
    -------
    dict
        n_data_ids, rows per table, objects, and ``data_ids``: list of
        ((midpointMjdTai, visit, detector), cells) in chain order.
    """
    rng = np.random.default_rng(seed)
    cos_dec = np.cos(np.radians(dec0))
    half = region_deg / 2 + dither_deg
    # Object positions in a local flat frame (x along RA * cos(dec0), y along dec), degrees.
    ox = rng.uniform(-half, half, n_objects)
    oy = rng.uniform(-half, half, n_objects)
    o_ra, o_dec = ra0 + ox / cos_dec, dec0 + oy
    o_flux = rng.lognormal(np.log(2000.0), 1.0, n_objects)
    o_id = np.full(n_objects, -1, dtype=np.int64)
    o_n = np.zeros(n_objects, dtype=np.int32)
    o_first = np.full(n_objects, np.nan)
    o_sum_ra = np.zeros(n_objects)
    o_sum_dec = np.zeros(n_objects)
    o_band_n = {b: np.zeros(n_objects, dtype=np.int32) for b in BANDS}
    o_band_sum = {b: np.zeros(n_objects) for b in BANDS}

    width, height = region_deg / n_ra, region_deg / n_dec
    per_tile = n_objects * width * height / (2 * half) ** 2
    p_detect = min(1.0, sources_per_data_id / per_tile)
    rows = dict.fromkeys(apdb.TABLES, 0)
    data_ids = []
    t0 = time.perf_counter()
    for i in range(n_visits):
        visit, mjd, band = VISIT0 + i, MJD0 + i * cadence_days, "gri"[i % 3]
        dx, dy = rng.uniform(-dither_deg, dither_deg, 2)
        tile_x = np.floor((ox - dx + region_deg / 2) / width).astype(int)
        tile_y = np.floor((oy - dy + region_deg / 2) / height).astype(int)
        for ix in range(n_ra):
            for iy in range(n_dec):
                detector = 1 + ix * n_dec + iy
                x_lo, y_lo = -region_deg / 2 + ix * width + dx, -region_deg / 2 + iy * height + dy
                corners = [(ra0 + x / cos_dec, dec0 + y) for x, y in
                           ((x_lo, y_lo), (x_lo + width, y_lo), (x_lo + width, y_lo + height), (x_lo, y_lo + height))]
                cells = footprint_cells(corners, order, pad_arcsec)
                under = np.flatnonzero((tile_x == ix) & (tile_y == iy))
                detected = under[rng.random(under.size) < p_detect]
                tables = _data_id_tables(rng, visit, detector, mjd, band, detected, under if forced else under[:0],
                                         o_ra, o_dec, o_flux, o_id, o_n, o_first, o_sum_ra, o_sum_dec,
                                         o_band_n, o_band_sum)
                apdb.commit_data_id(root, visit, detector, mjd, cells, order, tables, {"synthetic": True})
                for name, table in tables.items():
                    rows[name] += len(table["diaObjectId"]) if "diaObjectId" in table else 0
                data_ids.append(((mjd, visit, detector), [int(c) for c in cells]))
        if progress:
            print(f"visit {i + 1}/{n_visits}: {rows} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"n_data_ids": len(data_ids), "rows": rows, "objects": int((o_id >= 0).sum()), "order": order,
            "data_ids": data_ids}


def _data_id_tables(rng, visit, detector, mjd, band, detected, under, o_ra, o_dec, o_flux, o_id, o_n, o_first,
                    o_sum_ra, o_sum_dec, o_band_n, o_band_sum) -> dict:
    n = detected.size
    packed = _packed(visit, detector)
    source_ids = packed + np.arange(n, dtype=np.int64)
    new = o_id[detected] < 0
    o_id[detected[new]] = source_ids[new]
    o_first[detected[new]] = mjd
    err_deg = 0.1 / 3600
    ra = o_ra[detected] + rng.normal(0, err_deg, n) / np.cos(np.radians(o_dec[detected]))
    dec = o_dec[detected] + rng.normal(0, err_deg, n)
    flux = o_flux[detected] * rng.lognormal(0, 0.3, n)
    src = _filled("DiaSource", n, rng)
    src.update(diaSourceId=source_ids, visit=np.full(n, visit), detector=np.full(n, detector),
               diaObjectId=o_id[detected], ssObjectId=np.full(n, np.nan), parentDiaSourceId=np.full(n, np.nan),
               midpointMjdTai=np.full(n, mjd), ra=ra, dec=dec, raErr=np.full(n, err_deg),
               decErr=np.full(n, err_deg), psfFlux=flux, psfFluxErr=np.full(n, 100.0), band=np.full(n, band),
               timeProcessedMjdTai=np.full(n, mjd + 0.01), timeWithdrawnMjdTai=np.full(n, np.nan),
               trailNdata=np.full(n, np.nan))

    o_n[detected] += 1
    o_sum_ra[detected] += ra
    o_sum_dec[detected] += dec
    o_band_n[band][detected] += 1
    o_band_sum[band][detected] += flux
    obj = _filled("DiaObject", n, rng)
    obj.update(diaObjectId=o_id[detected], validityStartMjdTai=np.full(n, mjd),
               ra=o_sum_ra[detected] / o_n[detected], dec=o_sum_dec[detected] / o_n[detected],
               nDiaSources=o_n[detected], firstDiaSourceMjdTai=o_first[detected],
               lastDiaSourceMjdTai=np.full(n, mjd))
    for b in BANDS:
        count = o_band_n[b][detected]
        obj[f"{b}_psfFluxNdata"] = count
        with np.errstate(invalid="ignore", divide="ignore"):
            obj[f"{b}_psfFluxMean"] = np.where(count > 0, o_band_sum[b][detected] / count, np.nan)

    known = under[o_id[under] >= 0]
    m = known.size
    fsrc = _filled("DiaForcedSource", m, rng)
    fsrc.update(diaForcedSourceId=packed + FLOAT_FORCED_OFFSET + np.arange(m, dtype=np.int64),
                diaObjectId=o_id[known], ra=o_ra[known], dec=o_dec[known], visit=np.full(m, visit),
                detector=np.full(m, detector), midpointMjdTai=np.full(m, mjd), band=np.full(m, band),
                psfFlux=o_flux[known] * rng.lognormal(0, 0.3, m), timeProcessedMjdTai=np.full(m, mjd + 0.01),
                timeWithdrawnMjdTai=np.full(m, np.nan))
    return {"DiaSource": src, "DiaObject": obj, "DiaForcedSource": fsrc}


def time_load_history(root, data_ids, order: int = DEFAULT_ORDER, window_days: float = apdb.SOURCE_HISTORY_DAYS,
                      repeat: int = 3) -> list[dict]:
    """Time ``load_history`` for each (key, cells) in ``data_ids``; best of ``repeat`` runs."""
    results = []
    for key, cells in data_ids:
        best = np.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            history = apdb.load_history(root, cells, order, key, window_days)
            best = min(best, time.perf_counter() - t0)
        results.append({"key": key, "n_cells": len(cells), "data_ids_read": len(history.data_ids),
                        "objects": len(history.objects), "sources": len(history.sources),
                        "forced_sources": len(history.forced_sources), "seconds": best})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--visits", type=int, default=25)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--sources-per-data-id", type=int, default=1000)
    parser.add_argument("--time", type=int, default=5, help="time load_history for this many late data IDs")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    made = make_synthetic_apdb(args.root, n_visits=args.visits, n_objects=args.objects,
                               sources_per_data_id=args.sources_per_data_id, progress=True)
    print(f"wrote {made['n_data_ids']} data IDs, rows {made['rows']}, {made['objects']} objects "
          f"in {time.perf_counter() - t0:.0f} s")
    late = made["data_ids"][-args.time:] if args.time else []
    for r in time_load_history(args.root, late, made["order"]):
        print(f"load_history {r['key'][1]}_{r['key'][2]:02d}: {r['n_cells']} cells, {r['data_ids_read']} data IDs, "
              f"{r['objects']} objects, {r['sources']} sources, {r['forced_sources']} forced: "
              f"{r['seconds'] * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
