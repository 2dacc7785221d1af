"""Where one data ID's products are, for the QA (docs/architecture.md §3.1 layout)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataIdProducts:
    """Paths of the products of one science data ID that the QA reads.

    ``fakes`` is None when fakes were not injected into this data ID; ``matched_template``
    may name a file that does not exist (the gallery then leaves the template panel blank).
    """

    visit: int
    detector: int
    calexp: Path
    diffexp: Path
    diffexp_json: Path
    dia_src: Path
    matched_template: Path
    fakes: Path | None = None


def _path(root: Path, product: str, visit: int, detector: int, ext: str) -> Path:
    return root / product / str(visit) / f"{product}_{visit}_{detector:02d}.{ext}"


def data_id_products(root: str | Path, visit: int, detector: int, fakes: bool | None = None) -> DataIdProducts:
    """The products of data ID (visit, detector) under the outdir ``root``.

    ``fakes``: True to expect the fake table, False to ignore it, None to use it if it exists.
    """
    root = Path(root)
    visit, detector = int(visit), int(detector)
    fake_path = _path(root, "fakes", visit, detector, "parquet")
    if fakes is None:
        fakes = fake_path.exists()
    return DataIdProducts(
        visit=visit, detector=detector,
        calexp=_path(root, "calexp", visit, detector, "fits"),
        diffexp=_path(root, "diffexp", visit, detector, "fits"),
        diffexp_json=_path(root, "diffexp", visit, detector, "json"),
        dia_src=_path(root, "diaSrc", visit, detector, "parquet"),
        matched_template=_path(root, "matchedTemplate", visit, detector, "fits"),
        fakes=fake_path if fakes else None,
    )


_DIFFEXP_JSON = re.compile(r"^diffexp_(\d+)_(\d+)\.json$")


def find_science_data_ids(root: str | Path) -> list[tuple[int, int]]:
    """The differenced (science) data IDs of an outdir: those with a diffexp JSON, sorted.

    For running the QA on a finished run by hand; the workflow passes its data IDs explicitly.
    """
    found = set()
    for path in Path(root).glob("diffexp/*/diffexp_*.json"):
        match = _DIFFEXP_JSON.match(path.name)
        if match:
            found.add((int(match.group(1)), int(match.group(2))))
    return sorted(found)


_PRODUCT_NAME = re.compile(r"^[A-Za-z]+_(\d+)_(\d+)\.[a-z.]+$")


def data_id_of(path: str | Path) -> tuple[int, int]:
    """(visit, detector) of a per-data-ID product path ``{product}_{visit}_{detector:02d}.{ext}``."""
    match = _PRODUCT_NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path}: not a per-data-ID product name")
    return int(match.group(1)), int(match.group(2))
