"""Every DECam fact the pipeline needs, in one place (the files are read by
``instruments.decam_files``).

Sources (docs/formats.md §3 summarises them): the obs_decam camera geometry
(``decam/camGeom``, ``curated_calib_origin/segmentfile.txt``), the raw headers in
astro_metadata_translator's test data, and the CTIO crosstalk table
``xtalk_20130606.txt`` shipped in ``data/``.

Conventions
-----------
* A detector is identified by ``CCDNUM`` (1-62 science CCDs); its name is ``DETPOS``
  (``S1`` ... ``S31``, ``N1`` ... ``N31``). Raw files are always read by ``CCDNUM``,
  never by HDU index.
* Pixel sections are returned as 0-based numpy slices ``(rows, cols)``.
* A raw science-CCD extension is 2160 x 4146 pixels (x by y) of unsigned 16-bit ADU;
  the trimmed, assembled CCD is 2048 x 4096, already in CCD orientation (no flips).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

from apsnake.errors import ApsnakeError

INSTRUMENT_NAME = "DECam"

#: Raw science-CCD extension shape (rows, cols) = (NAXIS2, NAXIS1).
RAW_SHAPE = (4146, 2160)
#: Trimmed CCD shape (rows, cols).
TRIMMED_SHAPE = (4096, 2048)
#: Pixel size in micron and the nominal plate scale.
PIXEL_SIZE_UM = 15.0
PIXEL_SCALE_ARCSEC = 0.263  # arcsec/pixel at the field centre (obs_decam base_Jacobian)
PLATE_SCALE_ARCSEC_PER_MM = 17.575
#: Width of the CCD border flagged SUSPECT by ISR (Rubin ``numEdgeSuspect``), pixels.
NUM_EDGE_SUSPECT = 35
#: Source-pixel level above which a crosstalk victim pixel is flagged CROSSTALK (ADU).
CROSSTALK_MIN_PIXEL_TO_MASK = 45000.0

#: Cerro Tololo, Blanco 4 m (header OBS-LONG is west-positive: east longitude is negative).
OBSERVATORY_LONGITUDE_DEG = -70.81489
OBSERVATORY_LATITUDE_DEG = -30.16606
OBSERVATORY_ELEVATION_M = 2215.0
#: Header TELESCOP / OBSERVAT values of raw files.
TELESCOPE_NAME = "CTIO 4.0-m telescope"
OBSERVATORY_NAME = "CTIO"

#: |CD| of the nominal SISPI raw TPV WCS and of CP products, deg/pixel (docs/formats.md §3.5);
#: the raw orientation is +Y = East, +X = South: CD1_2 = +RAW_WCS_CD_DEG, CD2_1 = -RAW_WCS_CD_DEG.
RAW_WCS_CD_DEG = 7.285e-5
#: Focal plane (mm) -> field angle (rad) radial polynomial, obs_decam ``camera.py``.
FIELD_ANGLE_COEFFS = (0.0, 8.516497674138379e-05, 0.0, -4.501399132955917e-12)
#: Focal-plane read-out time, s (approximate; unverified).
READOUT_TIME_S = 20.0
#: Fully depleted CCD thickness (micron) and the cosmic-ray rate seen at CTIO in it,
#: events per cm^2 per minute of exposure + read-out (approximate; unverified).
CCD_THICKNESS_UM = 250.0
COSMIC_RAY_RATE_PER_CM2_MIN = 2.5
#: Approximate photometric defaults per band (unverified, for simulation and sanity checks):
#: (AB mag giving 1 e-/s at airmass 1, extinction in mag/airmass, dark-sky mag/arcsec^2).
NOMINAL_PHOTOMETRY: dict[str, tuple[float, float, float]] = {
    "u": (23.3, 0.45, 22.9),
    "g": (25.0, 0.20, 22.0),
    "r": (25.2, 0.10, 21.1),
    "i": (25.0, 0.08, 20.3),
    "z": (24.6, 0.08, 19.0),
    "y": (23.6, 0.08, 18.0),
}

# ---------------------------------------------------------------------------
# CCD table: obs_decam camGeom (docs/formats.md §3.2).
# CCDNUM name usual_hdu x_mm y_mm yaw_deg gainA gainB(e/ADU) rnA rnB(e) satA satB(ADU)
_CCD_TABLE = """
1 S29 34 -185.592 -63.748 -0.01 4.039 3.781 6.139 5.982 38652 37531
2 S30 35 -185.542 -0.024 -0.105 4.180 4.150 6.124 6.184 41945 48203
3 S31 36 -185.618 63.776 -0.0 3.894 3.885 5.993 5.905 42449 42345
4 S25 12 -151.832 -95.611 -0.004 4.061 4.249 6.051 6.080 42059 42605
5 S26 31 -151.870 -31.869 0.025 4.085 4.240 6.209 6.415 47929 41000
6 S27 32 -151.904 31.901 -0.025 3.793 3.997 5.936 6.203 50010 43534
7 S28 33 -151.852 95.595 0.004 4.128 3.940 6.258 6.209 43219 42163
8 S20 11 -118.018 -127.452 0.03 3.917 3.725 5.703 5.815 43397 48732
9 S21 27 -118.166 -63.738 -0.02 3.870 3.935 5.944 6.162 46442 45402
10 S22 28 -118.134 0.002 0.006 3.881 4.036 6.182 6.232 47817 46155
11 S23 29 -118.174 63.738 -0.03 3.966 4.047 6.112 6.362 44428 46770
12 S24 30 -118.086 127.486 -0.027 3.952 4.170 6.019 6.434 47000 43941
13 S14 9 -84.268 -159.323 -0.004 3.992 3.975 5.900 5.784 43172 42871
14 S15 10 -84.380 -95.689 0.01 3.809 4.053 5.729 5.873 47577 44265
15 S16 25 -84.466 -31.907 0.011 3.821 4.031 6.026 6.220 46000 46370
16 S17 26 -84.384 31.891 0.008 3.848 4.057 6.161 6.341 44000 44467
17 S18 23 -84.460 95.663 -0.04 3.654 4.110 5.930 6.264 48000 42982
18 S19 24 -84.316 159.413 0.019 3.889 4.028 5.962 6.187 49415 49231
19 S8 7 -50.620 -159.277 0.016 3.945 3.999 5.894 5.955 40534 39960
20 S9 8 -50.596 -95.689 -0.001 4.018 4.003 5.826 5.816 46380 42551
21 S10 19 -50.700 -31.931 0.007 4.011 4.008 6.157 6.180 47000 43939
22 S11 20 -50.758 31.915 -0.022 4.068 3.970 6.269 6.265 52795 46334
23 S12 21 -50.698 95.761 -0.022 3.999 4.091 6.266 6.325 44823 46250
24 S13 22 -50.634 159.391 -0.016 3.778 4.108 6.060 6.285 48000 50504
25 S1 1 -16.798 -191.216 0.007 4.104 3.958 6.119 6.000 40469 42151
26 S2 2 -16.894 -127.524 0.003 3.747 3.984 5.748 5.928 47435 44650
27 S3 3 -16.850 -63.792 -0.01 3.838 4.071 5.976 6.054 33874 28164
28 S4 41 -16.892 0.092 0.019 3.934 4.148 10.209 10.341 45246 42626
29 S5 42 -16.836 63.824 0.01 4.088 4.094 10.367 10.427 47232 42720
30 S6 43 -16.850 127.636 0.001 4.086 4.016 10.146 10.405 57491 44346
31 S7 44 -16.898 191.268 0.023 3.510 3.940 9.624 10.071 37951 44138
32 N1 4 16.894 -191.252 -0.024 3.875 3.924 5.789 6.102 50304 45586
33 N2 5 16.884 -127.546 -0.012 3.944 4.156 5.959 6.163 44938 42834
34 N3 6 16.922 -63.836 0.01 3.915 4.068 5.833 5.935 39748 49000
35 N4 37 16.908 -0.018 0.003 4.025 4.077 12.268 11.954 44144 43448
36 N5 38 16.978 63.708 0.05 3.989 4.180 12.162 12.314 45844 43798
37 N6 39 16.872 127.480 0.008 4.006 4.295 11.449 11.837 46753 39364
38 N7 40 16.878 191.230 -0.014 4.435 4.271 12.689 12.189 40983 42716
39 N8 13 50.662 -159.379 0.011 3.869 4.160 5.877 6.020 44177 42492
40 N9 14 50.682 -95.727 0.007 3.843 4.096 5.718 5.923 51000 44144
41 N10 45 50.664 -31.911 0.016 3.911 4.127 5.941 6.170 47271 39973
42 N11 46 50.714 31.933 0.015 4.018 3.983 5.975 6.074 45678 46060
43 N12 47 50.678 95.689 0.017 4.008 3.917 6.064 5.907 39602 40252
44 N13 48 50.646 159.333 0.01 3.788 3.970 5.970 6.241 38914 43511
45 N14 15 84.352 -159.393 0.026 3.903 4.139 5.878 6.026 48694 42599
46 N15 16 84.384 -95.787 0.005 4.036 4.148 5.836 6.039 38696 37655
47 N16 51 84.412 -31.899 -0.025 3.991 4.046 5.971 5.895 46559 41908
48 N17 52 84.482 31.787 0.032 4.026 4.260 6.047 6.275 41302 38771
49 N18 49 84.388 95.663 0.012 3.981 4.134 5.824 6.135 49133 42883
50 N19 50 84.308 159.357 0.006 3.950 4.188 5.806 6.114 46642 40239
51 N20 17 118.086 -127.458 -0.018 3.940 4.135 5.760 6.016 48450 39981
52 N21 53 118.086 -63.762 -0.007 4.005 4.076 5.923 5.975 40268 42913
53 N22 54 118.090 0.050 -0.008 3.998 4.142 6.101 6.080 40698 42397
54 N23 55 118.166 63.754 0.006 3.877 4.156 5.947 6.188 50306 41791
55 N24 56 118.074 127.464 0.01 3.830 3.837 5.979 5.913 46959 43185
56 N25 18 151.808 -95.587 -0.008 3.892 4.091 5.748 5.875 48147 42401
57 N26 57 151.800 -31.935 0.0 3.759 3.665 5.932 5.725 36677 33214
58 N27 58 151.860 31.847 0.039 4.215 4.072 6.116 6.067 43135 41106
59 N28 59 151.794 95.557 0.021 3.959 3.881 5.923 5.868 41544 42196
60 N29 60 185.558 -63.732 -0.012 3.743 3.616 5.832 5.760 43295 41383
61 N30 61 185.504 0.016 0.0 3.700 4.140 5.472 6.541 56282 45592
62 N31 62 185.550 63.794 -0.026 3.743 3.487 5.465 5.813 47995 43079
"""

AMP_NAMES = ("A", "B")

#: CCDs with a non-operational amplifier (obs_decam curated_calib_origin/README.md, DES BPMs).
BAD_AMPS: dict[int, tuple[str, ...]] = {31: ("A",)}
#: Science CCDs out of service for a period: CCDNUM -> (first UT date out, first UT date back in
#: service, or None while it stays out). N30 (61): light damage on 2012-11-07 (DES science-
#: verification wiki, "N30 Analysis"), never recovered. S30 (2): "not functional 2014-2016"
#: (NOIRLab DECam characteristics page); the exact dates here are those remembered from the DES
#: data releases (failed 2013-11-30, back 2016-12-07) and are unverified.
CCD_OUTAGES: dict[int, tuple[str, str | None]] = {
    61: ("2012-11-07", None),
    2: ("2013-11-30", "2016-12-07"),
}
#: CCDs dead for good (N30 since late 2012).
DEAD_CCDS: frozenset[int] = frozenset(c for c, (_, back) in CCD_OUTAGES.items() if back is None)


@dataclass(frozen=True)
class AmpInfo:
    """Nominal electronic properties of one amplifier (camera table values).

    gain in e-/ADU, read_noise in e-, saturation in ADU (raw counts).
    """

    name: str
    gain: float
    read_noise: float
    saturation: float


@dataclass(frozen=True)
class CcdInfo:
    """One science CCD: identity, focal-plane placement and its two amplifiers."""

    ccdnum: int
    name: str  # DETPOS, e.g. "S1"
    usual_hdu: int  # HDU index in a raw file written by SISPI (a hint only)
    x_mm: float  # focal-plane centre, obs_decam "transposed" system, mm
    y_mm: float
    yaw_deg: float
    amps: dict[str, AmpInfo] = field(hash=False, compare=False)

    @property
    def group(self) -> str:
        """'S' or 'N': the two halves of the focal plane have different raw layouts."""
        return self.name[0]

    @property
    def is_north(self) -> bool:
        return self.group == "N"


def _parse_ccd_table() -> dict[int, CcdInfo]:
    ccds = {}
    for line in _CCD_TABLE.strip().splitlines():
        f = line.split()
        num = int(f[0])
        amps = {
            "A": AmpInfo("A", float(f[6]), float(f[8]), float(f[10])),
            "B": AmpInfo("B", float(f[7]), float(f[9]), float(f[11])),
        }
        ccds[num] = CcdInfo(num, f[1], int(f[2]), float(f[3]), float(f[4]), float(f[5]), amps)
    return ccds


#: The 62 science CCDs keyed by CCDNUM.
CCDS: dict[int, CcdInfo] = _parse_ccd_table()
_CCD_BY_NAME = {c.name: c for c in CCDS.values()}
SCIENCE_CCDNUMS = tuple(sorted(CCDS))


def working_ccdnums(date_utc: str) -> tuple[int, ...]:
    """The science CCDNUMs in service on a UT date (``YYYY-MM-DD`` or an ISO time such as
    ``DATE-OBS``): all 62 less those of :data:`CCD_OUTAGES` out on that date. S7 (31), with one
    dead amplifier (:data:`BAD_AMPS`), counts as working: its other half is good.
    """
    day = str(date_utc)[:10]
    return tuple(c for c in SCIENCE_CCDNUMS
                 if not (c in CCD_OUTAGES and CCD_OUTAGES[c][0] <= day
                         and (CCD_OUTAGES[c][1] is None or day < CCD_OUTAGES[c][1])))


def ccd_info(ccd: int | str) -> CcdInfo:
    """The CCD table row for a CCDNUM (int) or DETPOS name ("S1")."""
    if isinstance(ccd, str) and not ccd.isdigit():
        try:
            return _CCD_BY_NAME[ccd.strip().upper()]
        except KeyError:
            raise KeyError(f"unknown DECam detector name {ccd!r}") from None
    try:
        return CCDS[int(ccd)]
    except KeyError:
        raise KeyError(f"CCDNUM {ccd} is not a DECam science CCD (1-62)") from None


# ---------------------------------------------------------------------------
# Filters (obs_decam decamFilters.py): first word of FILTER -> band.
_FILTERS = {
    "u": ("u", "u DECam c0006 3500.0 1000.0"),
    "g": ("g", "g DECam SDSS c0001 4720.0 1520.0"),
    "r": ("r", "r DECam SDSS c0002 6415.0 1480.0"),
    "i": ("i", "i DECam SDSS c0003 7835.0 1470.0"),
    "z": ("z", "z DECam SDSS c0004 9260.0 1520.0"),
    "Y": ("y", "Y DECam c0005 10095.0 1130.0"),
    "VR": ("VR", "VR DECam c0007 6300.0 2600.0"),
    "N964": ("N964", "N964 DECam c0008 9645.0 94.0"),
    "N708": ("N708", "N708 DECam c0012 7080.0 400.0"),
    "N419": ("N419", "N419 DECam c0013 4194.0 75.0"),
    "N540": ("N540", "N540 DECam c0014 5403.2 210.0"),
    "solid": ("opaque", "solid plate 0.0 0.0"),
}
#: band -> full physical filter name as written in FILTER.
BAND_TO_PHYSICAL_FILTER = {band: phys for band, phys in _FILTERS.values()}


class UnknownFilterError(ApsnakeError, ValueError):
    """A FILTER header value that is not a DECam filter."""


def band_from_filter(filter_value: str) -> tuple[str, str]:
    """Return ``(band, physical_filter)`` for a FILTER header value.

    Accepts the full SISPI string (``'g DECam SDSS c0001 4720.0 1520.0'``) and the short
    form some processed files carry (``'g'``).
    """
    text = (filter_value or "").strip()
    if not text:
        raise UnknownFilterError("FILTER keyword is empty")
    key = text.split()[0]
    if key not in _FILTERS:
        raise UnknownFilterError(f"unknown DECam filter {filter_value!r}")
    band, physical = _FILTERS[key]
    return band, (text if len(text.split()) > 1 else physical)


def filter_wavelength(band: str) -> tuple[float, float]:
    """(central wavelength, width) in Angstrom of a band, from its physical filter name."""
    try:
        words = BAND_TO_PHYSICAL_FILTER[band].split()
    except KeyError:
        raise UnknownFilterError(f"unknown DECam band {band!r}") from None
    return float(words[-2]), float(words[-1])


# ---------------------------------------------------------------------------
# Raw layout.
_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


@dataclass(frozen=True)
class Section:
    """A FITS section ``[x1:x2,y1:y2]`` (1-based, inclusive) as 0-based slices.

    ``flip_x``/``flip_y`` are True when the section was written high-to-low, as
    DECam's AMPSEC does to encode the read-out direction.
    """

    y0: int
    y1: int  # exclusive
    x0: int
    x1: int  # exclusive
    flip_x: bool = False
    flip_y: bool = False

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def to_fits(self) -> str:
        xa, xb = (self.x1, self.x0 + 1) if self.flip_x else (self.x0 + 1, self.x1)
        ya, yb = (self.y1, self.y0 + 1) if self.flip_y else (self.y0 + 1, self.y1)
        return f"[{xa}:{xb},{ya}:{yb}]"


def parse_section(value: str) -> Section:
    """Parse a FITS section string such as ``'[57:2104,51:4146]'``."""
    m = _SECTION_RE.match(str(value))
    if not m:
        raise ValueError(f"not a FITS section: {value!r}")
    xa, xb, ya, yb = (int(g) for g in m.groups())
    return Section(
        y0=min(ya, yb) - 1, y1=max(ya, yb), x0=min(xa, xb) - 1, x1=max(xa, xb),
        flip_x=xa > xb, flip_y=ya > yb,
    )


@dataclass(frozen=True)
class AmpGeometry:
    """Where one amplifier's pixels are in a raw extension and in the trimmed CCD."""

    name: str
    data: Section  # DATASEC<amp>: science pixels in the raw frame
    serial_overscan: Section  # BIASSEC<amp> (50 columns)
    prescan: Section | None  # PRESEC<amp> (6 columns)
    parallel_overscan: Section | None  # POSTSEC<amp> (50 rows)
    ccd: Section  # CCDSEC<amp>: position in the trimmed 2048x4096 CCD
    readout_flip_x: bool  # True when this amp reads out from the right (high x)
    readout_flip_y: bool  # True when this amp reads out from the top (high y)


def amp_geometry(header) -> dict[str, AmpGeometry]:
    """Per-amp sections parsed from one raw extension header (keys 'A', 'B').

    Raises ``KeyError`` naming the missing keyword when a section is absent.
    """
    amps = {}
    for amp in AMP_NAMES:
        def get(key, required=True):
            if key in header:
                return parse_section(header[key])
            if required:
                raise KeyError(f"raw header lacks {key}")
            return None

        ampsec = get(f"AMPSEC{amp}", required=False)
        ccdsec = get(f"CCDSEC{amp}")
        amps[amp] = AmpGeometry(
            name=amp,
            data=get(f"DATASEC{amp}"),
            serial_overscan=get(f"BIASSEC{amp}"),
            prescan=get(f"PRESEC{amp}", required=False),
            parallel_overscan=get(f"POSTSEC{amp}", required=False),
            ccd=ccdsec,
            readout_flip_x=ampsec.flip_x if ampsec else False,
            readout_flip_y=ampsec.flip_y if ampsec else False,
        )
    return amps


def raw_section_keywords(ccdnum: int) -> dict[str, str]:
    """The section keywords a raw extension of this CCD carries (S and N layouts differ).

    Values are those of real DECam raws (docs/formats.md §3.3); DETSEC is placed on
    the focal-plane mosaic grid from the CCD's position.
    """
    info = ccd_info(ccdnum)
    col = int(round(info.x_mm / 33.76 - 0.5)) + 7
    row = int(round((info.y_mm + 191.25) / 63.75))
    dx0, dy0 = col * 2048, row * 4096
    if info.is_north:
        kw = {
            "DATASEC": "[57:2104,1:4096]", "TRIMSEC": "[57:2104,1:4096]",
            "DATASECA": "[57:1080,1:4096]", "TRIMSECA": "[57:1080,1:4096]",
            "BIASSECA": "[7:56,1:4096]", "PRESECA": "[1:6,1:4096]",
            "POSTSECA": "[57:1080,4097:4146]", "CCDSECA": "[1:1024,1:4096]",
            "AMPSECA": "[1:1024,1:4096]",
            "DATASECB": "[1081:2104,1:4096]", "TRIMSECB": "[1081:2104,1:4096]",
            "BIASSECB": "[2105:2154,1:4096]", "PRESECB": "[2155:2160,1:4096]",
            "POSTSECB": "[1081:2104,4097:4146]", "CCDSECB": "[1025:2048,1:4096]",
            "AMPSECB": "[2048:1025,1:4096]",
            "DETSECA": f"[{dx0 + 1}:{dx0 + 1024},{dy0 + 1}:{dy0 + 4096}]",
            "DETSECB": f"[{dx0 + 1025}:{dx0 + 2048},{dy0 + 1}:{dy0 + 4096}]",
        }
        ltv2 = 0.0
    else:
        kw = {
            "DATASEC": "[57:2104,51:4146]", "TRIMSEC": "[57:2104,51:4146]",
            "DATASECA": "[1081:2104,51:4146]", "TRIMSECA": "[1081:2104,51:4146]",
            "BIASSECA": "[2105:2154,51:4146]", "PRESECA": "[2155:2160,51:4146]",
            "POSTSECA": "[1081:2104,1:50]", "CCDSECA": "[1025:2048,1:4096]",
            "AMPSECA": "[2048:1025,4096:1]",
            "DATASECB": "[57:1080,51:4146]", "TRIMSECB": "[57:1080,51:4146]",
            "BIASSECB": "[7:56,51:4146]", "PRESECB": "[1:6,51:4146]",
            "POSTSECB": "[57:1080,1:50]", "CCDSECB": "[1:1024,1:4096]",
            "AMPSECB": "[1:1024,4096:1]",
            "DETSECA": f"[{dx0 + 1025}:{dx0 + 2048},{dy0 + 1}:{dy0 + 4096}]",
            "DETSECB": f"[{dx0 + 1}:{dx0 + 1024},{dy0 + 1}:{dy0 + 4096}]",
        }
        ltv2 = 50.0
    kw.update({
        "DETSIZE": "[1:29400,1:29050]",
        "DETSEC": f"[{dx0 + 1}:{dx0 + 2048},{dy0 + 1}:{dy0 + 4096}]",
        "CCDSEC": "[1:2048,1:4096]",
        "LTV1": 56.0, "LTV2": ltv2, "LTM1_1": 1.0, "LTM2_2": 1.0,
    })
    return kw


def trimmed_offset(ccdnum: int) -> tuple[int, int]:
    """(x, y) offset of trimmed pixel (0, 0) in the raw extension frame, pixels."""
    return (56, 0) if ccd_info(ccdnum).is_north else (56, 50)


def trimmed_to_focal_plane(ccdnum: int, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Focal-plane position (mm, obs_decam "transposed" system) of trimmed pixels (0-based).

    Raw/trimmed x runs along focal-plane x and y along y, rotated by the CCD yaw about the
    CCD centre (``refpos`` = trimmed pixel (1023.5, 2047.5)).
    """
    info = ccd_info(ccdnum)
    pix_mm = PIXEL_SIZE_UM / 1000.0
    dx = (np.asarray(x, dtype=float) - (TRIMMED_SHAPE[1] - 1) / 2.0) * pix_mm
    dy = (np.asarray(y, dtype=float) - (TRIMMED_SHAPE[0] - 1) / 2.0) * pix_mm
    c, s = np.cos(np.radians(info.yaw_deg)), np.sin(np.radians(info.yaw_deg))
    return info.x_mm + c * dx - s * dy, info.y_mm + s * dx + c * dy


def nominal_raw_wcs(ccdnum: int, ra_deg: float, dec_deg: float, extra_pv: dict | None = None) -> dict:
    """Header cards of a SISPI-like nominal TPV WCS for one raw extension (raw pixel frame).

    ``CRVAL`` is the pointing, ``CRPIX`` (1-based, raw pixels) the focal-plane centre seen
    from this CCD (its position and yaw from the CCD table; raw = trimmed + trimmed_offset),
    the CD matrix has the raw orientation of ``RAW_WCS_CD_DEG`` rotated by the yaw, and the
    TPV polynomial carries the radial term of ``FIELD_ANGLE_COEFFS`` (PV1_7/9, PV2_7/9), the
    same for every CCD. ``extra_pv`` ({'PV1_4': value, ...}, degrees) is added on top.
    """
    info = ccd_info(ccdnum)
    pix_mm = PIXEL_SIZE_UM / 1000.0
    yaw = np.radians(info.yaw_deg)
    c, s = np.cos(yaw), np.sin(yaw)
    # Focal-plane centre in CCD pixel offsets: solve centre_mm + R(yaw) @ d * pix_mm = 0.
    fx, fy = -info.x_mm / pix_mm, -info.y_mm / pix_mm
    dx, dy = c * fx + s * fy, -s * fx + c * fy
    ox, oy = trimmed_offset(ccdnum)
    crpix1 = (TRIMMED_SHAPE[1] - 1) / 2.0 + dx + ox + 1.0
    crpix2 = (TRIMMED_SHAPE[0] - 1) / 2.0 + dy + oy + 1.0
    # CD = CD0 @ R(yaw), CD0 = [[0, +a], [-a, 0]].
    a = RAW_WCS_CD_DEG
    cd = np.array([[0.0, a], [-a, 0.0]]) @ np.array([[c, -s], [s, c]])
    # Relative cubic radial term, per deg^2 of intermediate world coordinate.
    c1, c3 = FIELD_ANGLE_COEFFS[1], FIELD_ANGLE_COEFFS[3]
    mm_per_deg = pix_mm / RAW_WCS_CD_DEG
    k = c3 / c1 * mm_per_deg**2
    pv = {f"PV{axis}_{i}": 0.0 for axis in (1, 2) for i in range(11)}
    pv.update({"PV1_1": 1.0, "PV2_1": 1.0, "PV1_7": k, "PV1_9": k, "PV2_7": k, "PV2_9": k})
    for key, value in (extra_pv or {}).items():
        pv[key] = pv[key] + float(value)
    cards = {
        "WCSAXES": 2, "CTYPE1": "RA---TPV", "CTYPE2": "DEC--TPV", "CUNIT1": "deg", "CUNIT2": "deg",
        "CRVAL1": float(ra_deg), "CRVAL2": float(dec_deg),
        "CRPIX1": float(crpix1), "CRPIX2": float(crpix2),
        "CD1_1": float(cd[0, 0]), "CD1_2": float(cd[0, 1]), "CD2_1": float(cd[1, 0]), "CD2_2": float(cd[1, 1]),
        "RADESYS": "ICRS", "EQUINOX": 2000.0,
    }
    cards.update({key: float(value) for key, value in pv.items()})
    return cards


# ---------------------------------------------------------------------------
# Crosstalk (CTIO xtalk_20130606.txt, linear terms).
@dataclass(frozen=True)
class CrosstalkTerm:
    victim_ccd: int
    victim_amp: str
    source_ccd: int
    source_amp: str
    coefficient: float  # dimensionless: victim ADU per source ADU


@lru_cache(maxsize=1)
def crosstalk_table() -> tuple[CrosstalkTerm, ...]:
    """Every linear crosstalk term of the 2013-06-06 CTIO table (249 rows)."""
    text = resources.files("apsnake.instruments").joinpath("data/decam_xtalk_20130606.txt").read_text()
    terms = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        victim, source, coeff = line.split()[:3]
        terms.append(CrosstalkTerm(int(victim[3:5]), victim[5], int(source[3:5]), source[5], float(coeff)))
    return tuple(terms)


def crosstalk_sources(victim_ccd: int) -> list[CrosstalkTerm]:
    """The crosstalk terms whose victim is on this CCD (intra- and inter-CCD)."""
    return [t for t in crosstalk_table() if t.victim_ccd == victim_ccd]


def crosstalk_source_ccds(victim_ccd: int) -> list[int]:
    """The other CCDs that are inter-CCD crosstalk sources for ``victim_ccd``."""
    return sorted({t.source_ccd for t in crosstalk_sources(victim_ccd) if t.source_ccd != victim_ccd})


def readout_corner(ccdnum: int, amp: str) -> str:
    """Read-out corner of an amplifier in the trimmed CCD frame: 'LL', 'LR', 'UL' or 'UR'.

    S CCDs: A = UR, B = UL. N CCDs: A = LL, B = LR (obs_decam camGeom).
    """
    if ccd_info(ccdnum).is_north:
        return {"A": "LL", "B": "LR"}[amp]
    return {"A": "UR", "B": "UL"}[amp]


def crosstalk_flips(victim: tuple[int, str], source: tuple[int, str]) -> tuple[bool, bool]:
    """(flip_x, flip_y) that aligns a source amp's pixels with the victim's read order."""
    cv, cs = readout_corner(*victim), readout_corner(*source)
    return cv[1] != cs[1], cv[0] != cs[0]


# ---------------------------------------------------------------------------
# Header translation.
class HeaderError(ApsnakeError, ValueError):
    """A raw or calibration header that cannot be translated."""


def _sexagesimal_to_deg(value, hours: bool) -> float:
    """'02:51:16.790' (hours or degrees) -> degrees; a number is taken as degrees."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    sign = -1.0 if text.startswith("-") else 1.0
    parts = [abs(float(p)) for p in text.lstrip("+-").split(":")]
    while len(parts) < 3:
        parts.append(0.0)
    deg = sign * (parts[0] + parts[1] / 60.0 + parts[2] / 3600.0)
    return deg * 15.0 if hours else deg


#: OBSTYPE -> our observation type.
_OBSTYPES = {
    "object": "science", "standard": "science", "science": "science", "sky flat": "flat",
    "zero": "bias", "bias": "bias", "dark": "dark", "dome flat": "flat", "flat": "flat",
    "bpm": "bpm", "illumcor": "illumcor",
}


def observation_type(header) -> str:
    """'science', 'bias', 'flat', 'dark', 'bpm' or 'illumcor' from OBSTYPE."""
    raw = str(header.get("OBSTYPE", "")).strip().lower()
    if raw not in _OBSTYPES:
        raise HeaderError(f"unknown OBSTYPE {header.get('OBSTYPE')!r}")
    return _OBSTYPES[raw]


def translate_header(header):
    """Translate a DECam primary (or merged primary + extension) header into a VisitInfo.

    Times: MJD mid-exposure in TAI from DATE-OBS (UTC start) + EXPTIME/2, falling back to
    MJD-OBS. Bias frames get band 'opaque' whatever FILTER says (SISPI leaves a stale
    filter in zero frames). Raises ``HeaderError``/``UnknownFilterError`` with the reason.
    """
    from astropy.time import Time

    from apsnake.exposure import VisitInfo

    if str(header.get("INSTRUME", INSTRUMENT_NAME)).strip().lower() != "decam":
        raise HeaderError(f"INSTRUME is {header.get('INSTRUME')!r}, not DECam")
    if "EXPNUM" not in header:
        raise HeaderError("header has no EXPNUM")
    obstype = observation_type(header)
    exptime = float(header.get("EXPTIME", 0.0) or 0.0)
    if "DATE-OBS" in header and str(header["DATE-OBS"]).strip():
        start = Time(str(header["DATE-OBS"]).strip(), format="isot", scale="utc")
    elif "MJD-OBS" in header:
        start = Time(float(header["MJD-OBS"]), format="mjd", scale="utc")
    else:
        raise HeaderError("header has neither DATE-OBS nor MJD-OBS")
    mid_tai = start.tai.mjd + exptime / 2.0 / 86400.0
    if obstype == "bias":
        band, physical = "opaque", BAND_TO_PHYSICAL_FILTER["opaque"]
    else:
        band, physical = band_from_filter(str(header.get("FILTER", "")))

    def angle(key, hours):
        value = header.get(key)
        if value is None or str(value).strip() in ("", "NaN"):
            return float("nan")
        try:
            return _sexagesimal_to_deg(value, hours)
        except ValueError:
            return float("nan")

    obs_long = header.get("OBS-LONG")
    return VisitInfo(
        visit=int(header["EXPNUM"]),
        instrument=INSTRUMENT_NAME,
        observation_type=obstype,
        mjd_mid_tai=float(mid_tai),
        date_obs_utc=start.isot,
        exposure_time=exptime,
        dark_time=float(header.get("DARKTIME", exptime) or exptime),
        band=band,
        physical_filter=physical,
        airmass=float(header.get("AIRMASS", float("nan")) or float("nan")),
        boresight_ra=angle("TELRA", hours=True),
        boresight_dec=angle("TELDEC", hours=False),
        zenith_distance=float(header.get("ZD", float("nan")) or float("nan")),
        azimuth=float(header.get("AZ", float("nan")) or float("nan")),
        observatory_longitude=-float(obs_long) if obs_long is not None else OBSERVATORY_LONGITUDE_DEG,
        observatory_latitude=float(header.get("OBS-LAT", OBSERVATORY_LATITUDE_DEG)),
        observatory_elevation=float(header.get("OBS-ELEV", OBSERVATORY_ELEVATION_M)),
        object_name=str(header.get("OBJECT", "")),
    )


def archive_filename(date_obs_utc: str, code: str = "ori", suffix: str = ".fits.fz") -> str:
    """NOIRLab archive name ``c4d_YYMMDD_HHMMSS_<code>`` from the UT start (ISO ``DATE-OBS``)."""
    d = str(date_obs_utc).strip()
    return f"c4d_{d[2:4]}{d[5:7]}{d[8:10]}_{d[11:13]}{d[14:16]}{d[17:19]}_{code}{suffix}"


def sispi_filename(expnum: int) -> str:
    """SISPI's original raw file name (header ``FILENAME``): ``DECam_%08d.fits``."""
    return f"DECam_{int(expnum):08d}.fits"


def detector_exposure_id(visit: int, ccdnum: int) -> int:
    """Rubin's DECam detector-exposure id: EXPNUM * 100 + CCDNUM."""
    return int(visit) * 100 + int(ccdnum)


def raw_wcs(header):
    """The nominal TPV WCS of a raw extension (astropy/WCSLIB evaluate TPV), raw pixel frame."""
    import warnings

    from astropy.wcs import FITSFixedWarning, WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def footprint_corners(header, ccdnum: int) -> np.ndarray:
    """(4, 2) array of (ra, dec) in degrees of the trimmed CCD corners from the header WCS."""
    ox, oy = trimmed_offset(ccdnum)
    ny, nx = TRIMMED_SHAPE
    xs = np.array([0, nx - 1, nx - 1, 0], dtype=float) + ox
    ys = np.array([0, 0, ny - 1, ny - 1], dtype=float) + oy
    ra, dec = raw_wcs(header).all_pix2world(xs, ys, 0)
    return np.column_stack([ra, dec])
