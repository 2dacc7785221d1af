"""Times: the current time as MJD (TAI), and MJD -> decimal year."""

from __future__ import annotations


def now_mjd_tai() -> float:
    """The current time as an MJD in the TAI scale (``timeProcessedMjdTai`` columns)."""
    from astropy.time import Time

    return float(Time.now().tai.mjd)


def mjd_to_year(mjd: float) -> float:
    """Julian epoch (decimal year) of an MJD: 2000.0 + (MJD - 51544.5) / 365.25."""
    return 2000.0 + (float(mjd) - 51544.5) / 365.25
