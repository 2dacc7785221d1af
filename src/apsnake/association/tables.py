"""Column access on pandas tables of DiaSources and DiaObjects, and the association error type.

Null-safe conversions used by matching and by the DiaObject summaries: a missing column or a
null value reads as False (flags), NaN (floats) or an invalid id.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from apsnake.errors import ApsnakeError


class AssociationError(ApsnakeError, ValueError):
    """Association inputs or results that cannot be accepted (bad tables, too many new objects)."""


def flag_column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A boolean column as a numpy bool array; null (or a missing column) counts as False."""
    if name not in df.columns:
        return np.zeros(len(df), bool)
    return df[name].astype("boolean").fillna(False).to_numpy(dtype=bool)


def float_column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A column as float64 (null -> NaN); a missing column is all NaN."""
    if name not in df.columns:
        return np.full(len(df), np.nan)
    return df[name].to_numpy(dtype=np.float64, na_value=np.nan)


def id_column(df: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """An id column as (int64 values, non-null mask); null ids read as 0 in the values."""
    col = df[name]
    valid = col.notna().to_numpy()
    return col.to_numpy(dtype=np.int64, na_value=0), valid


def data_id_label(sources: pd.DataFrame) -> str:
    """'visit V detector D' for the error messages, from the sources' own columns."""
    parts = []
    for name in ("visit", "detector"):
        if name in sources.columns and len(sources):
            values = pd.unique(sources[name].dropna())
            parts.append(f"{name} {values[0]}" if len(values) == 1 else f"{len(values)} {name}s")
    return ", ".join(parts) if parts else "unknown data ID"


def require_columns(df: pd.DataFrame, names, what: str) -> None:
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise AssociationError(f"{what}: missing column(s) {', '.join(missing)}")
