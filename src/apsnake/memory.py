"""Memory allocation settings of a workflow job's process.

A job allocates and frees dozens of CCD-sized arrays (32 MiB for a float32 plane of a DECam
CCD). glibc serves every allocation above its mmap threshold (at most 32 MiB, adjusted at run
time) with a fresh ``mmap`` and returns it to the kernel on ``free``: the next array of that
size faults in and zeroes its pages again, ~2 ms per MiB on the project's machines, more with
transparent huge pages (benchmarks/README.md, "Freed memory kept for reuse"). Keeping freed
memory in the process for the next allocation avoids that; a job's peak memory is reached
once either way, and the process ends with the job.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Allocations up to this size come from the heap and are reused after ``free``; the heap top
# is returned to the kernel only above the trim threshold.
MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory (large arrays included) for reuse in this process.

    Idempotent; returns whether the settings are in effect (False where the C library is not
    glibc or refuses them: nothing changes there). Call it once at the start of a job.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library (no library search)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not _applied:
        log.debug("mallopt refused the allocation settings; using the C library's defaults")
    return _applied
