"""Reference catalogue input (docs/formats.md §6): a table of stars read from Parquet, FITS or CSV.

Columns: ``ra``, ``dec`` (deg, ICRS, at the catalogue epoch), per band ``{band}_mag`` and
``{band}_magErr`` (AB); optional ``pmra``, ``pmdec`` (mas/yr) and ``epoch`` (decimal year).
``column_map`` maps our names to the catalogue's (e.g. ``{"g_mag": "phot_g_mean_mag"}``) so
a Gaia or Pan-STARRS export works without editing the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apsnake.errors import ApsnakeError


class RefcatError(ApsnakeError, ValueError):
    """A reference catalogue that cannot be read or lacks the needed columns."""


def read_refcat(path: str | Path, column_map: dict[str, str] | None = None):
    """The whole catalogue as a pandas DataFrame with our column names."""
    import pandas as pd

    path = Path(path)
    column_map = column_map or {}
    try:
        name = path.name.lower()
        if name.endswith(".parquet") or name.endswith(".pq"):
            table = pd.read_parquet(path)
        elif name.endswith((".csv", ".csv.gz", ".txt")):
            table = pd.read_csv(path)
        elif name.endswith((".fits", ".fit", ".fits.gz")):
            from astropy.table import Table

            table = Table.read(path).to_pandas()
        else:
            raise RefcatError(f"{path}: unknown reference catalogue format (Parquet, FITS or CSV)")
    except RefcatError:
        raise
    except Exception as err:
        raise RefcatError(f"{path}: cannot read reference catalogue: {err}") from err
    table = table.rename(columns={theirs: ours for ours, theirs in column_map.items()})
    missing = [c for c in ("ra", "dec") if c not in table.columns]
    if missing:
        raise RefcatError(f"{path}: reference catalogue lacks columns {missing} (use refcat_columns to map them)")
    return table


def select_band(table, band: str, path: str = "refcat"):
    """Stars with a finite ``{band}_mag``; ``mag`` and ``magErr`` columns added."""
    col = f"{band}_mag"
    if col not in table.columns:
        raise RefcatError(f"{path}: reference catalogue has no {col} column (bands: "
                          f"{sorted(c[:-4] for c in table.columns if c.endswith('_mag'))})")
    out = table[np.isfinite(table[col].to_numpy(dtype=float))].copy()
    out["mag"] = out[col].astype(float)
    err_col = f"{band}_magErr"
    out["magErr"] = out[err_col].astype(float) if err_col in out.columns else 0.02
    return out.reset_index(drop=True)


def apply_proper_motion(table, epoch_year: float):
    """Positions moved from the catalogue ``epoch`` to ``epoch_year`` with pmra (mas/yr,
    = dRA/dt cos dec) and pmdec; a table without proper motions is returned unchanged."""
    if not {"pmra", "pmdec", "epoch"} <= set(table.columns):
        return table
    dt = epoch_year - table["epoch"].to_numpy(float)
    pmra = np.nan_to_num(table["pmra"].to_numpy(float))
    pmdec = np.nan_to_num(table["pmdec"].to_numpy(float))
    out = table.copy()
    cosd = np.cos(np.radians(out["dec"].to_numpy(float)))
    out["ra"] = out["ra"] + pmra * dt / 3.6e6 / np.maximum(cosd, 1e-6)
    out["dec"] = out["dec"] + pmdec * dt / 3.6e6
    return out


def in_footprint(table, wcs, shape: tuple[int, int], margin_pixels: float = 300.0):
    """Stars that fall on the (rows, cols) pixel grid of ``wcs`` within ``margin_pixels``."""
    if len(table) == 0:
        return table
    x, y = wcs.all_world2pix(table["ra"].to_numpy(float), table["dec"].to_numpy(float), 0, quiet=True)
    ny, nx = shape
    keep = (x > -margin_pixels) & (x < nx + margin_pixels) & (y > -margin_pixels) & (y < ny + margin_pixels)
    return table[keep].reset_index(drop=True)
