"""Atomic file writes: write to a temporary name in the same folder, then rename.

A killed job therefore never leaves a file that looks complete: the product is either
absent or whole (docs/architecture.md §3.3).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    The temporary name keeps the final suffix(es) so writers that dispatch on the
    extension (``.fits``, ``.parquet``) still do the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_parquet(table, path: str | Path) -> None:
    """Write a pandas DataFrame or pyarrow Table to Parquet atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


def write_text(text: str, path: str | Path) -> None:
    """Write a text file (JSON metadata, markers) atomically."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)
