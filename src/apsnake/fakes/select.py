"""Which data IDs get fakes: a deterministic per-data-ID draw (no state, no order dependence)."""

from __future__ import annotations

import numpy as np

_SELECT_STREAM = 0x5E1EC7  # keeps the selection draw apart from the placement draws


def fake_data_id_selected(visit: int, detector: int, fraction: float, seed: int = 0) -> bool:
    """Whether data ID (visit, detector) gets fakes.

    A uniform number drawn from a generator seeded by (seed, visit, detector) is compared with
    ``fraction``: 1 selects every data ID, 0 none, and the choice of one data ID does not
    depend on which others are processed.
    """
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    u = np.random.default_rng([int(seed), int(visit), int(detector), _SELECT_STREAM]).random()
    return bool(u < fraction)


def select_fake_data_ids(data_ids, fraction: float, seed: int = 0) -> list[tuple[int, int]]:
    """The (visit, detector) pairs of ``data_ids`` that get fakes, in their given order."""
    return [(int(v), int(d)) for v, d in data_ids if fake_data_id_selected(v, d, fraction, seed)]
