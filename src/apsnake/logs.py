"""Logging for workflow steps: one log file per job, progress per data ID."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from apsnake.errors import ApsnakeError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(log_path: str | Path | None = None, level: int = logging.INFO) -> None:
    """Send apsnake's log records to stderr and, if given, to ``log_path`` (overwritten)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("matplotlib", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def workflow_step(name: str, log_path: str | Path | None = None, data_id: str = ""):
    """Run a step with logging configured; bad input ends the job with one clear line.

    ``ApsnakeError`` (bad input) is logged as ``<name> <data_id> failed: <message>`` and the
    process exits with status 1 and no traceback; other exceptions propagate unchanged. The
    process keeps freed memory for reuse (``memory.keep_freed_memory``).
    """
    from apsnake.memory import keep_freed_memory

    keep_freed_memory()
    configure(log_path)
    logger = logging.getLogger(f"apsnake.{name}")
    label = f"{name} {data_id}".strip()
    start = time.perf_counter()
    logger.info("%s: start", label)
    try:
        yield logger
    except ApsnakeError as err:
        logger.error("%s failed: %s", label, err)
        raise SystemExit(1) from None
    logger.info("%s: done in %.2f s", label, time.perf_counter() - start)


def finish_job() -> None:
    """End a workflow job's process at once, once its step has succeeded (the last statement
    of every ``scripts/*.py``).

    Every product is written and renamed into place inside the step, so the interpreter's
    orderly teardown (a last garbage collection, clearing ~1,300 modules, freeing every object
    one by one) only costs time: 0.2-0.7 s per job of the test night (benchmarks/README.md). Logging is shut down
    (its files flushed and closed) and stdout and stderr flushed first; other ``atexit``
    callbacks do not run. Never call it from a process that has more to do (tests, the CLI).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
