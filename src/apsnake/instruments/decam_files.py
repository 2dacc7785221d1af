"""Reading DECam files: raw exposures (one or several CCDs, ``.fits`` or ``.fits.fz``), CP
master calibrations (bias, flat, BPM) and CP linearity tables.

Extensions are found by ``CCDNUM``, never by position alone; every problem (not FITS, the
CCD absent, a wrong shape, truncated data) raises ``RawFormatError`` naming the file. The
facts these readers rely on (shapes, the usual HDU of each CCD) are in ``decam``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apsnake.errors import ApsnakeError
from apsnake.instruments.decam import RAW_SHAPE, TRIMMED_SHAPE, ccd_info

log = logging.getLogger(__name__)


class RawFormatError(ApsnakeError, ValueError):
    """A raw file that is not a readable DECam raw (or lacks the requested CCD)."""


@dataclass
class RawCcd:
    """One CCD of a raw DECam exposure, untouched: uint16 ADU in the raw frame."""

    path: Path
    hdu: int
    primary_header: object  # astropy.io.fits.Header
    header: object  # the extension header (image keywords, sections, WCS)
    data: np.ndarray  # (4146, 2160) uint16

    @property
    def ccdnum(self) -> int:
        return int(self.header["CCDNUM"])


def _image_hdus(hdul):
    from astropy.io import fits

    return [
        (i, h) for i, h in enumerate(hdul)
        if i > 0 and isinstance(h, (fits.ImageHDU, fits.CompImageHDU)) and "CCDNUM" in h.header
    ]


def find_ccd_hdu(hdul, ccdnum: int) -> int:
    """Index of the HDU holding CCDNUM: the usual SISPI position first, then a scan."""
    guess = ccd_info(ccdnum).usual_hdu
    if guess < len(hdul) and hdul[guess].header.get("CCDNUM") == ccdnum:
        return guess
    for i, hdu in _image_hdus(hdul):
        if hdu.header.get("CCDNUM") == ccdnum:
            return i
    raise RawFormatError(f"no extension with CCDNUM = {ccdnum}")


def read_raw_ccds(path: str | Path, ccdnums, optional=()) -> dict[int, RawCcd]:
    """Read several science CCDs of one raw DECam file in a single open.

    Extensions are found by CCDNUM, never by position. CCDs in ``optional`` (e.g.
    crosstalk sources) are skipped when absent from the file; any other problem (not
    FITS, CCD absent, wrong size, truncated data) raises ``RawFormatError`` naming the
    file and the problem.
    """
    from astropy.io import fits

    path = Path(path)
    optional = set(optional)
    out: dict[int, RawCcd] = {}
    current = None
    try:
        with fits.open(path, memmap=False) as hdul:
            primary = hdul[0].header.copy()
            for ccdnum in ccdnums:
                current = ccdnum
                try:
                    idx = find_ccd_hdu(hdul, ccdnum)
                except RawFormatError:
                    if ccdnum in optional:
                        log.debug("%s: optional CCD %d not in the file", path, ccdnum)
                        continue
                    raise
                data = hdul[idx].data
                if data is None or data.shape != RAW_SHAPE:
                    shape = None if data is None else data.shape
                    raise RawFormatError(f"CCD {ccdnum} has shape {shape}, expected {RAW_SHAPE}")
                out[ccdnum] = RawCcd(path=path, hdu=idx, primary_header=primary,
                                     header=hdul[idx].header.copy(), data=data)
    except RawFormatError as err:
        raise RawFormatError(f"{path}: {err}") from None
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise RawFormatError(f"{path}: cannot read CCD {current}: {err}") from err
    return out


def read_raw_ccd(path: str | Path, ccdnum: int) -> RawCcd:
    """Read one science CCD of a raw DECam file (``.fits`` or tile-compressed ``.fits.fz``);
    see ``read_raw_ccds``."""
    return read_raw_ccds(path, [ccdnum])[ccdnum]


def read_master_calibration(path: str | Path, ccdnum: int, hdu: int | None = None):
    """Read one CCD of a CP-style master calibration MEF (bias, flat or BPM).

    Returns ``(data, primary_header, header)`` with data as a (4096, 2048) array. The HDU
    is found by CCDNUM (``hdu`` is only a hint; CP MasterCals put CCDNUM at HDU CCDNUM).
    Raises ``RawFormatError`` naming the file and the problem.
    """
    from astropy.io import fits

    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            index = hdu if hdu is not None and hdu < len(hdul) and hdul[hdu].header.get("CCDNUM") == ccdnum else None
            if index is None:
                matches = [i for i, h in _image_hdus(hdul) if h.header.get("CCDNUM") == ccdnum]
                if not matches:
                    raise RawFormatError(f"{path}: no extension with CCDNUM = {ccdnum}")
                index = matches[0]
            data = hdul[index].data
            primary, header = hdul[0].header.copy(), hdul[index].header.copy()
    except RawFormatError:
        raise
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise RawFormatError(f"{path}: cannot read CCD {ccdnum}: {err}") from err
    if data is None or data.shape != TRIMMED_SHAPE:
        shape = None if data is None else data.shape
        raise RawFormatError(f"{path}: CCD {ccdnum} has shape {shape}, expected {TRIMMED_SHAPE}")
    return data, primary, header


def read_linearity_table(path: str | Path, ccdnum: int) -> np.ndarray:
    """A CP linearity table (``linearity_table_v0.4.fits`` layout) for one CCD as the
    (2, N) lookup table of ADU offsets ``ADU_LINEAR_<amp> - ADU`` (row 0 = A, row 1 = B).

    The CCD's HDU is the one whose header has CCDNUM = ccdnum, or EXTNAME = DETPOS or
    'ccd<N>', else HDU index ``ccdnum``. The ADU column must run 0, 1, 2, ...
    """
    from astropy.io import fits

    path = Path(path)
    name = ccd_info(ccdnum).name
    try:
        with fits.open(path, memmap=False) as hdul:
            index = None
            for i, hdu in enumerate(hdul[1:], start=1):
                h = hdu.header
                if h.get("CCDNUM") == ccdnum or str(h.get("EXTNAME", "")).strip().lower() in (name.lower(), f"ccd{ccdnum}"):
                    index = i
                    break
            if index is None:
                index = ccdnum
            table = hdul[index].data
            adu = np.asarray(table["ADU"], np.float64)
            offsets = np.vstack([np.asarray(table["ADU_LINEAR_A"], np.float64) - adu,
                                 np.asarray(table["ADU_LINEAR_B"], np.float64) - adu])
    except (OSError, KeyError, IndexError, TypeError, ValueError) as err:
        raise RawFormatError(f"{path}: no linearity table for CCD {ccdnum}: {err}") from err
    if not np.array_equal(adu, np.arange(adu.size)):
        raise RawFormatError(f"{path}: CCD {ccdnum} linearity ADU column is not 0, 1, 2, ...")
    return offsets.astype(np.float32)
