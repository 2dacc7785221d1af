"""Cutouts of the difference, science and template images for alert packets.

Each cutout is a small FITS file, held in bytes, laid out as astropy's ``CCDData`` writes it
(which is what Rubin's alert cutouts are, so brokers' readers work unchanged):

* primary HDU: the image in nJy (float32, ``BUNIT = 'nJy'``) with the celestial WCS of the
  product shifted to the cutout (``CTYPE = 'RA---TAN-SIP'``: the calexp's TAN-SIP fit, exact
  to the product's WCS at every pixel), the data ID, ``DIASRCID``, the source's position in
  the cutout (``SRCX``, ``SRCY``, 0-based) and the cutout's origin on the CCD (``CUTX0``,
  ``CUTY0``: 0-based trimmed-CCD column and row of pixel [0, 0]; ``LTV1``/``LTV2`` say the
  same for ds9's physical coordinates);
* ``MASK``: int32 mask bit planes, named by ``MP_<NAME> = bit`` keywords as in the products;
* ``UNCERT``: the variance, nJy^2 (``UTYPE = 'VarianceUncertainty'``);
* ``PSFIMAGE``: the image's PSF model evaluated at the source, normalised to unit sum
  (``CCDData.psf``).

``CCDData.read(io.BytesIO(data))`` therefore gives image, variance, mask, PSF and WCS.

Geometry: the side is the source's ``bboxSize`` clamped to [min, max] (Rubin: 30-102 px); the
box is placed on whole pixels so that the source centroid lies within half a pixel of the
cutout's centre ((side - 1) / 2 in 0-based pixels) and the cutout's pixels are the product's
pixels unchanged. Where the box reaches beyond the CCD, its pixels are 0 with ``NO_DATA`` set
(the products' convention for missing pixels).

Speed: astropy builds and writes a 4-HDU FITS file in ~5 ms, which for 100 alerts x 3 cutouts
is 1.5 s. The headers are therefore made once per image with astropy and each cutout only
replaces the handful of cards that change; the data are written as big-endian bytes.
"""

from __future__ import annotations

import math

import numpy as np

from apsnake.errors import ApsnakeError
from apsnake.exposure import Exposure

_BLOCK = 2880
#: Cards that change from cutout to cutout (the rest of each header is made once per image).
_VARYING = ("NAXIS1", "NAXIS2", "DIASRCID", "SRCX", "SRCY", "CUTX0", "CUTY0", "LTV1", "LTV2", "CRPIX1", "CRPIX2",
            "PSFX", "PSFY")
_COMMENTS = {
    "DIASRCID": "diaSourceId the cutout is centred on",
    "SRCX": "[pix] source column in the cutout, 0-based",
    "SRCY": "[pix] source row in the cutout, 0-based",
    "CUTX0": "[pix] CCD column (0-based) of pixel [0, 0]",
    "CUTY0": "[pix] CCD row (0-based) of pixel [0, 0]",
    "LTV1": "physical (CCD, 1-based) = image - LTV",
    "LTV2": "physical (CCD, 1-based) = image - LTV",
    "PSFX": "[pix] CCD column where the PSF is evaluated",
    "PSFY": "[pix] CCD row where the PSF is evaluated",
}


class CutoutError(ApsnakeError, ValueError):
    """An image that cannot give cutouts (no WCS, no nJy scale); the message names the file."""


def cutout_size(bbox_size, min_size: int = 30, max_size: int = 102) -> int:
    """Side of a source's cutouts: its footprint's ``bboxSize`` clamped to [min_size, max_size] px."""
    return int(min(max(int(bbox_size), int(min_size)), int(max_size)))


def cutout_origin(x: float, y: float, size: int) -> tuple[int, int]:
    """0-based CCD (column, row) of the cutout's pixel [0, 0] for a source at (x, y): the whole-pixel
    box whose centre, (size - 1) / 2, is nearest to the source (within half a pixel per axis)."""
    half = (int(size) - 1) / 2.0
    return int(math.floor(x - half + 0.5)), int(math.floor(y - half + 0.5))


def _pad(data: bytes, fill: bytes) -> bytes:
    return data + fill * ((-len(data)) % _BLOCK)


class CutoutMaker:
    """Makes the cutouts of one image (difference, science or template) as FITS bytes.

    Parameters
    ----------
    exposure : Exposure
        The image; its planes may be memory maps (``read_exposure(path, memmap=True)``), of
        which only the cutouts' pixels are read.
    kind : str
        'difference', 'science' or 'template' (the ``CUTOUT`` keyword).
    source : str
        The file the image came from, for error messages and the ``PRODUCT`` keyword.
    """

    def __init__(self, exposure: Exposure, kind: str, source: str = ""):
        from astropy.io import fits

        if exposure.wcs is None:
            raise CutoutError(f"{source or 'exposure'} of data ID {exposure.data_id}: no WCS, cannot make cutouts")
        self.exposure, self.kind, self.source = exposure, kind, str(source)
        self.scale = exposure.njy_per_unit(f"{kind} image {source}")
        self.no_data = np.int32(exposure.bits("NO_DATA") or exposure.mask_bit("NO_DATA"))
        wcs_header = exposure.wcs.to_header(relax=True)
        self._crpix = (float(wcs_header["CRPIX1"]), float(wcs_header["CRPIX2"]))
        visit, detector = exposure.data_id

        primary = fits.Header()
        primary["SIMPLE"], primary["BITPIX"], primary["NAXIS"] = True, -32, 2
        primary["NAXIS1"], primary["NAXIS2"] = 0, 0
        primary["EXTEND"] = True
        primary["BUNIT"] = ("nJy", "image unit")
        primary["CUTOUT"] = (kind, "difference, science or template")
        primary["PRODUCT"] = (_short(self.source), "source file")
        primary["VISIT"] = (int(visit), "visit (DECam EXPNUM)")
        primary["DETECTOR"] = (int(detector), "detector (DECam CCDNUM)")
        primary["MJD-MID"] = (_finite(exposure.visit_info.mjd_mid_tai), "[d] mid-exposure MJD (TAI)")
        primary["BAND"] = (exposure.visit_info.band, "filter band")
        for key in ("DIASRCID", "CUTX0", "CUTY0"):
            primary[key] = (0, _COMMENTS[key])
        for key in ("SRCX", "SRCY", "LTV1", "LTV2"):
            primary[key] = (0.0, _COMMENTS[key])
        for card in wcs_header.cards:
            if card.keyword not in ("DATE-OBS", "MJD-OBS", "DATEREF", "MJDREF"):  # times are the primary's
                primary[card.keyword] = (card.value, card.comment)
        self._primary = _Template(primary)

        mask = _extension_header("MASK", 32)
        for name, bit in sorted(exposure.mask_planes.items(), key=lambda kv: kv[1]):
            mask[f"HIERARCH MP_{name}"] = bit
        self._mask = _Template(mask)
        uncert = _extension_header("UNCERT", -32)
        uncert["BUNIT"] = ("nJy2", "variance unit")
        uncert["UTYPE"] = ("VarianceUncertainty", "astropy.nddata uncertainty class")
        self._uncert = _Template(uncert)
        self._psf = None
        if exposure.psf is not None:
            psf = _extension_header("PSFIMAGE", -32)
            psf["PSFX"], psf["PSFY"] = (0.0, _COMMENTS["PSFX"]), (0.0, _COMMENTS["PSFY"])
            psf["COMMENT"] = "PSF model at the source, normalised to unit sum"
            self._psf = _Template(psf)

    def cutout(self, x: float, y: float, size: int, source_id: int = 0) -> bytes:
        """The FITS bytes of the ``size`` x ``size`` cutout centred on CCD pixel (x, y)."""
        size = int(size)
        x0, y0 = cutout_origin(x, y, size)
        ny, nx = self.exposure.shape
        image = np.zeros((size, size), ">f4")
        variance = np.zeros((size, size), ">f4")
        mask = np.full((size, size), self.no_data, ">i4")
        ya, yb, xa, xb = max(y0, 0), min(y0 + size, ny), max(x0, 0), min(x0 + size, nx)
        if ya < yb and xa < xb:
            inner = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
            box = (slice(ya, yb), slice(xa, xb))
            if self.scale == 1.0:
                image[inner] = self.exposure.image[box]
                variance[inner] = self.exposure.variance[box]
            else:
                image[inner] = self.exposure.image[box] * self.scale
                variance[inner] = self.exposure.variance[box] * self.scale ** 2
            mask[inner] = self.exposure.mask[box]
        common = {"NAXIS1": size, "NAXIS2": size}
        parts = [
            self._primary.render({**common, "DIASRCID": int(source_id), "SRCX": float(x - x0), "SRCY": float(y - y0),
                                  "CUTX0": x0, "CUTY0": y0, "LTV1": float(-x0), "LTV2": float(-y0),
                                  "CRPIX1": self._crpix[0] - x0, "CRPIX2": self._crpix[1] - y0}),
            _pad(image.tobytes(), b"\0"),
            self._mask.render(common), _pad(mask.tobytes(), b"\0"),
            self._uncert.render(common), _pad(variance.tobytes(), b"\0"),
        ]
        if self._psf is not None:
            stamp = self.exposure.psf.evaluate(x, y).astype(">f4")
            parts += [self._psf.render({"NAXIS1": stamp.shape[1], "NAXIS2": stamp.shape[0], "PSFX": float(x),
                                        "PSFY": float(y)}),
                      _pad(stamp.tobytes(), b"\0")]
        return b"".join(parts)


def _short(path: str) -> str:
    """The last three parts of a path (``calexp/419802/calexp_419802_25.fits``), to fit a FITS card."""
    parts = str(path).replace("\\", "/").split("/")
    return "/".join(parts[-3:])[:68]


def _finite(value: float):
    return float(value) if np.isfinite(value) else "NaN"


def _extension_header(name: str, bitpix: int):
    from astropy.io import fits

    header = fits.Header()
    header["XTENSION"], header["BITPIX"], header["NAXIS"] = "IMAGE", bitpix, 2
    header["NAXIS1"], header["NAXIS2"] = 0, 0
    header["PCOUNT"], header["GCOUNT"] = 0, 1
    header["EXTNAME"] = name
    return header


def _number_card(key: str, value, comment: str) -> str:
    """An 80-character FITS card of an integer or a finite float, in the fixed format (value
    right-justified in columns 11-30); ``repr`` keeps every float exactly."""
    if isinstance(value, (int, np.integer)):
        text = str(int(value))
    else:
        text = repr(float(value)).upper()
        if not any(c in text for c in ".E"):
            text += ".0"
    card = f"{key:<8}= {text:>20}" + (f" / {comment}" if comment else "")
    return card[:80].ljust(80)


class _Template:
    """A FITS header as 80-character cards, with the numeric cards of ``_VARYING`` keywords
    replaced per cutout (astropy's ``Card`` would take 20 us each)."""

    def __init__(self, header):
        self.cards = [card.image for card in header.cards]
        self.comments = {card.keyword: card.comment for card in header.cards}
        self.index = {card.keyword: i for i, card in enumerate(header.cards) if card.keyword in _VARYING}

    def render(self, values: dict) -> bytes:
        cards = list(self.cards)
        for key, value in values.items():
            cards[self.index[key]] = _number_card(key, value, self.comments.get(key, ""))
        text = "".join(cards) + "END".ljust(80)
        return _pad(text.encode("ascii"), b" ")


def cutout_shape(data: bytes | None) -> str:
    """``'WxH'`` of a cutout's image, from its primary header ('' without a cutout)."""
    if not data:
        return ""
    header = data[:_BLOCK].decode("ascii", "replace")
    sizes = {}
    for i in range(0, len(header), 80):
        key = header[i:i + 8].strip()
        if key in ("NAXIS1", "NAXIS2"):
            sizes[key] = header[i + 10:i + 30].strip()
    return f"{sizes.get('NAXIS1', '?')}x{sizes.get('NAXIS2', '?')}"
