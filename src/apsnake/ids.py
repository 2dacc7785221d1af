"""Deterministic 64-bit IDs (docs/algorithms.md §8).

Rubin's IdGenerator packs (visit, detector) into one integer and leaves the low bits for
a running counter: ``id = counter + 2**COUNTER_BITS * (visit * DETECTOR_MAX + detector)``
with DECam's packing ``detector_max = 100`` and ``visit_max = 2**25``
(obs_decam ``_instrument.py``). The same inputs therefore always give the same IDs,
whatever the scheduling.
"""

from __future__ import annotations

import numpy as np

DETECTOR_MAX = 100
VISIT_MAX = 2**25
COUNTER_BITS = 26  # 67 million sources per data ID; packed part < 2**32, so ids < 2**58


def packed_data_id(visit: int, detector: int) -> int:
    """visit * 100 + detector (Rubin's DECam detector-exposure packing)."""
    if not (0 <= int(visit) < VISIT_MAX and 0 <= int(detector) < DETECTOR_MAX):
        raise ValueError(f"data ID (visit={visit}, detector={detector}) outside the packable range")
    return int(visit) * DETECTOR_MAX + int(detector)


def dia_source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """IDs of the n DiaSources of one data ID, in their running order (int64)."""
    if n >= 2**COUNTER_BITS:
        raise ValueError(f"{n} sources exceed the {COUNTER_BITS}-bit counter")
    return np.int64(packed_data_id(visit, detector) << COUNTER_BITS) + np.arange(n, dtype=np.int64)


def unpack(source_id: int) -> tuple[int, int, int]:
    """(visit, detector, counter) of an ID made by ``dia_source_ids``."""
    source_id = int(source_id)
    packed, counter = divmod(source_id, 2**COUNTER_BITS)
    visit, detector = divmod(packed, DETECTOR_MAX)
    return visit, detector, counter
