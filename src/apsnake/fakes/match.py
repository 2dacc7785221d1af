"""Matching fakes to the DiaSources of the run they were injected into."""

from __future__ import annotations

import numpy as np


def _bool_column(table, name, n):
    if name not in table.column_names:
        return np.zeros(n, bool)
    return np.asarray(table.column(name).fill_null(False).to_numpy(zero_copy_only=False), bool)


def match_fakes(fake_x, fake_y, dia_sources, radius: float):
    """One-to-one nearest matches of fakes to DiaSources.

    A DiaSource can recover a fake when it is not ``isNegative``, has
    ``pixelFlags_injectedCenter`` and lies within ``radius`` px; pairs are taken in order of
    increasing separation, each fake and each source at most once.

    Returns
    -------
    index : numpy.ndarray of int
        Row of ``dia_sources`` (a pyarrow Table) matched to each fake, -1 if none.
    separation : numpy.ndarray
        Distance in px, NaN if none.
    """
    from scipy.spatial import cKDTree

    fx, fy = np.asarray(fake_x, float), np.asarray(fake_y, float)
    index = np.full(len(fx), -1, np.int64)
    separation = np.full(len(fx), np.nan)
    n = dia_sources.num_rows
    if len(fx) == 0 or n == 0:
        return index, separation
    sx = np.asarray(dia_sources.column("x").to_numpy(zero_copy_only=False), float)
    sy = np.asarray(dia_sources.column("y").to_numpy(zero_copy_only=False), float)
    usable = ~_bool_column(dia_sources, "isNegative", n) & _bool_column(dia_sources, "pixelFlags_injectedCenter", n)
    usable &= np.isfinite(sx) & np.isfinite(sy)
    rows = np.flatnonzero(usable)
    if len(rows) == 0:
        return index, separation
    pairs = cKDTree(np.c_[fx, fy]).sparse_distance_matrix(cKDTree(np.c_[sx[rows], sy[rows]]), radius,
                                                           output_type="ndarray")
    if len(pairs) == 0:
        return index, separation
    order = np.lexsort((pairs["j"], pairs["i"], pairs["v"]))
    taken = np.zeros(len(rows), bool)
    for p in order:
        i, j, d = int(pairs["i"][p]), int(pairs["j"][p]), float(pairs["v"][p])
        if index[i] >= 0 or taken[j]:
            continue
        index[i], separation[i] = rows[j], d
        taken[j] = True
    return index, separation
