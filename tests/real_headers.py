"""Load the real DECam headers of ../shared/data/real/astro_metadata_translator/ (YAML dumps).

Two dump formats occur: Rubin's PropertyList (a tagged list of [KEY, type, value, comment])
and a plain mapping. Both hold the primary header followed by one extension header; the
loader returns them as astropy Headers, split at XTENSION.
"""

from pathlib import Path

import yaml
from astropy.io import fits

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
HEADERS = REAL / "astro_metadata_translator"


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("lsst.daf.base.PropertyList", lambda loader, node: loader.construct_sequence(node, deep=True))


def _cards(path: Path):
    data = yaml.load(path.read_text(), Loader=_Loader)
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("COMMENT", "HISTORY"):
                continue
            yield key, value
    else:
        for key, _type, value, *_ in data:
            if key in ("COMMENT", "HISTORY"):
                continue
            yield key, value


def load_header_pair(name: str) -> tuple[fits.Header, fits.Header]:
    """(primary, extension) headers of one YAML dump."""
    primary, ext = fits.Header(), fits.Header()
    current = primary
    for key, value in _cards(HEADERS / name):
        if key == "XTENSION":
            current = ext
        if value is None or isinstance(value, (list, dict)):
            continue
        current[key] = value
    return primary, ext


def load_merged(name: str) -> fits.Header:
    """Primary and extension keywords in one header (the extension wins), as INHERIT=T means."""
    primary, ext = load_header_pair(name)
    merged = primary.copy()
    merged.update(ext)
    return merged
