"""Write simulated raw exposures (SISPI layout, tile-compressed) and CP-style master calibrations.

Every file goes through :func:`apsnake.atomic.atomic_output` (temporary name + rename).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from apsnake.atomic import atomic_output
from apsnake.instruments import decam
from apsnake.sim.observing import VisitConditions
from apsnake.sim.presets import Preset
from apsnake.sim.signature import CcdSignature

log = logging.getLogger(__name__)

#: Raw-file tile: one row of 2160 pixels (ZTILE1 = 2160, ZTILE2 = 1), numpy order (rows, cols).
RAW_TILE_SHAPE = (1, decam.RAW_SHAPE[1])


def _sexagesimal(value_deg: float, hours: bool, places: int = 3) -> str:
    """'HH:MM:SS.sss' (hours=True, from degrees) or '+DD:MM:SS.ss' with a leading sign."""
    v = value_deg / 15.0 if hours else value_deg
    sign = "-" if v < 0 else ("" if hours else "+")
    v = abs(v)
    d = int(v)
    m = int((v - d) * 60.0)
    s = (v - d - m / 60.0) * 3600.0
    if round(s, places) >= 60.0:
        s, m = 0.0, m + 1
    if m >= 60:
        m, d = 0, d + 1
    return f"{sign}{d:02d}:{m:02d}:{s:0{3 + places}.{places}f}"


def raw_primary_header(visit: VisitConditions, preset: Preset, n_ext: int):
    """Primary header of a raw file (docs/formats.md §3.4 keywords, in SISPI order)."""
    from astropy.io import fits
    from astropy.time import Time

    start = Time(visit.date_obs, format="isot", scale="utc")
    end = Time(start.mjd + visit.exptime / 86400.0, format="mjd", scale="utc")
    shutter = Time(start.mjd + 0.08 / 86400.0, format="mjd", scale="utc")
    obsid = "ct4m" + visit.date_obs[:10].replace("-", "") + "t" + visit.date_obs[11:19].replace(":", "")
    h = fits.Header()
    cards = [
        ("SIMPLE", True, "conforms to FITS standard"),
        ("BITPIX", 8, "array data type"),
        ("NAXIS", 0, "number of array dimensions"),
        ("EXTEND", True, ""),
        ("NEXTEND", n_ext, "Number of extensions"),
        ("PROCTYPE", "RAW", "Data processing level"),
        ("PRODTYPE", "image", "Data product type"),
        ("PIXSCAL1", 0.27, "[arcsec/pixel] Pixel scale, axis 1"),
        ("PIXSCAL2", 0.27, "[arcsec/pixel] Pixel scale, axis 2"),
        ("FILENAME", decam.sispi_filename(visit.expnum), "Filename"),
        ("OBS-LONG", -decam.OBSERVATORY_LONGITUDE_DEG, "[deg] Observatory east longitude"),
        ("TELESCOP", decam.TELESCOPE_NAME, "Telescope name"),
        ("OBSERVAT", decam.OBSERVATORY_NAME, "Observatory name"),
        ("OBS-LAT", decam.OBSERVATORY_LATITUDE_DEG, "[deg] Observatory latitude"),
        ("OBS-ELEV", decam.OBSERVATORY_ELEVATION_M, "[m] Observatory elevation"),
        ("INSTRUME", decam.INSTRUMENT_NAME, "Instrument used to obtain these data"),
        ("EXPREQ", visit.exptime, "[s] Requested exposure duration"),
        ("EXPTIME", visit.exptime, "[s] Exposure duration"),
        ("DARKTIME", visit.dark_time, "[s] Dark time"),
        ("OBSID", obsid, "Unique Observation ID"),
        ("DATE-OBS", start.isot, " UTC epoch"),
        ("TIME-OBS", start.isot[11:], "Time of observation start (UTC)"),
        ("MJD-OBS", round(start.mjd, 8), "MJD of observation start"),
        ("OPENSHUT", shutter.isot, "Time when shutter opened (UTC)"),
        ("TIMESYS", "UTC", "Time system"),
        ("EXPNUM", visit.expnum, "DECam exposure number"),
        ("OBJECT", preset.object_name, "Object name"),
        ("OBSTYPE", "object", "Observation type"),
        ("CAMSHUT", "Open", "Camera shutter at exposure start"),
        ("PROGRAM", "apsnake simulation", "Current observing orogram"),
        ("OBSERVER", "apsnake", "Observer name(s)"),
        ("PROPOSER", "apsnake", "Proposal Principle Investigator"),
        ("DTPI", "apsnake", " Principal Investigator"),
        ("PROPID", preset.propid, "Proposal ID"),
        ("EXCLUDED", "", "DECam components not used for this frame"),
        ("SEQID", f"{preset.name} {'templates' if visit.is_template else 'science'}", ""),
        ("SEQNUM", visit.index + 1, "Number of image in sequence"),
        ("SEQTOT", len(preset.visits), "Total number of images in sequence"),
        ("FILTER", decam.BAND_TO_PHYSICAL_FILTER[visit.band], "Unique filter identifier"),
        ("FILTPOS", "cassette_2", "Filter position in FCM"),
        ("INSTANCE", f"DECam_{visit.date_obs[:10].replace('-', '')}", "SISPI instance name"),
        ("ERRORS", "None", "SISPI readout errors"),
        ("TELEQUIN", 2000.0, "Equinox of telescope coordinates"),
        ("TELSTAT", "Track", "Telescope tracking status"),
        ("RA", _sexagesimal(visit.tel_ra, True), "[HH:MM:SS] Target RA"),
        ("DEC", _sexagesimal(visit.tel_dec, False, 2), "[DD:MM:SS] Target DEC"),
        ("TELRA", _sexagesimal(visit.tel_ra, True), "[HH:MM:SS] Telescope RA"),
        ("TELDEC", _sexagesimal(visit.tel_dec, False, 2), "[DD:MM:SS] Telescope DEC"),
        ("HA", _sexagesimal(visit.ha_deg, True), "[HH:MM:SS] Telescope hour angle"),
        ("ZD", round(visit.zd_deg, 2), "[deg] Telescope zenith distance"),
        ("AZ", round(visit.az_deg, 2), "[deg] Telescope azimuth angle"),
        ("AIRMASS", round(visit.airmass, 2), "Airmass"),
        ("RADESYS", "ICRS", "Coordinate system of TELRA/TELDEC"),
        ("DIMMSEE", round(visit.fwhm_arcsec * 0.85, 3), "[arcsec] DIMM seeing"),
        ("HDRVER", "13", "DECam header version"),
        ("DTUTC", end.isot[:19], " post exposure UTC epoch from DTS"),
        ("DTACQNAM", decam.sispi_filename(visit.expnum), "File name supplied at telescope"),
        ("DTNSANAM", visit.filename, "Archive file name"),
    ]
    for key, value, comment in cards:
        h[key] = (value, comment)
    return h


def raw_extension_header(sig: CcdSignature, wcs_cards: dict):
    """Extension header of one raw CCD: identity, sections, SISPI gain/noise/saturation, nominal WCS."""
    from astropy.io import fits

    info = decam.ccd_info(sig.ccdnum)
    h = fits.Header()
    h["BUNIT"] = ("adu", "Brightness units for pixel array")
    h["WCSAXES"] = (2, "WCS Dimensionality")
    sections = decam.raw_section_keywords(sig.ccdnum)
    for key in ("DETSIZE", "TRIMSEC", "DATASEC", "DETSEC", "CCDSEC"):
        h[key] = sections[key]
    for amp in decam.AMP_NAMES:
        for key in ("TRIMSEC", "DETSEC", "CCDSEC", "AMPSEC", "DATASEC", "BIASSEC", "PRESEC", "POSTSEC"):
            h[f"{key}{amp}"] = sections[f"{key}{amp}"]
    h["DETECTOR"] = (f"S3-{100 + sig.ccdnum:03d}_sim-{sig.ccdnum}", "Detector Identifier")
    h["CCDNUM"] = (sig.ccdnum, "CCD number")
    h["DETPOS"] = (info.name, "detector position ID")
    for amp in decam.AMP_NAMES:
        a = sig.amps[amp]
        h[f"GAIN{amp}"] = (a.header_gain, f"[electrons/adu] Gain for amp {amp}")
        h[f"RDNOISE{amp}"] = (a.header_read_noise, f"[electrons] Read noise for amp {amp}")
        h[f"SATURAT{amp}"] = (a.header_saturation, f"[adu] Saturation for amp {amp}")
    h["FPA"] = ("DECAM_BKP1", "DECam focal plane name")
    h["INHERIT"] = (True, "Inherits PHDU header")
    h["CCDBIN1"] = (1, "Pixel binning, axis 1")
    h["CCDBIN2"] = (1, "Pixel binning, axis 2")
    for key, value in wcs_cards.items():
        h[key] = value
    for key in ("LTV1", "LTV2", "LTM1_1", "LTM2_2"):
        h[key] = (sections[key], "Detector to image transformation")
    h["VALIDA"] = (True, "Data from amp A is valid")
    h["VALIDB"] = (True, "Data from amp B is valid")
    return h


class MefWriter:
    """Write a multi-extension FITS file one extension at a time (a context manager).

    Only the extension being appended is in memory, so a whole focal plane (60 raw CCDs, or
    60 float32 calibration images, 2 GB) is never held at once. The file is written under a
    temporary name and renamed onto ``path`` when the ``with`` block ends without an error
    (:func:`apsnake.atomic.atomic_output`); the bytes are those ``HDUList.writeto`` writes for
    the same HDUs.

    Parameters
    ----------
    path : str or Path
    primary : astropy.io.fits.Header
        Primary header (``NEXTEND`` is set to ``n_ext``).
    n_ext : int
        Number of extensions that will be appended (checked on exit).
    """

    def __init__(self, path: str | Path, primary, n_ext: int):
        self.path, self.primary, self.n_ext, self.written = Path(path), primary, int(n_ext), 0
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None

    def __enter__(self) -> "MefWriter":
        from astropy.io import fits

        self._tmp = self._stack.enter_context(atomic_output(self.path))
        hdu = fits.PrimaryHDU(header=self.primary)
        hdu.header["NEXTEND"] = self.n_ext
        if self.n_ext and "EXTEND" not in hdu.header:
            hdu.header.set("EXTEND", True, after="NAXIS")  # as HDUList.writeto adds it
        fits.HDUList([hdu]).writeto(self._tmp)
        return self

    def append(self, hdu) -> None:
        """Append one extension HDU to the file."""
        from astropy.io import fits

        with fits.open(self._tmp, mode="append") as hdul:
            hdul.append(hdu)
        self.written += 1

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.written != self.n_ext:
            err = ValueError(f"{self.path.name}: {self.written} extensions written, {self.n_ext} announced")
            self._stack.__exit__(ValueError, err, None)
            raise err
        return self._stack.__exit__(exc_type, exc, tb)


def raw_hdu(header, data: np.ndarray):
    """One raw extension: RICE tile-compressed uint16, EXTNAME = DETPOS."""
    from astropy.io import fits

    if data.dtype != np.uint16 or data.shape != decam.RAW_SHAPE:
        raise ValueError(f"raw CCD {header['CCDNUM']}: need uint16 {decam.RAW_SHAPE}, "
                         f"got {data.dtype} {data.shape}")
    return fits.CompImageHDU(data=data, header=header, name=str(header["DETPOS"]),
                             compression_type="RICE_1", tile_shape=RAW_TILE_SHAPE)


def raw_extension_order(ccdnums) -> list[int]:
    """CCDNUMs in the order of a raw file's extensions (the usual SISPI HDU order)."""
    return sorted((int(c) for c in ccdnums), key=lambda c: decam.ccd_info(c).usual_hdu)


def calib_primary_header(obstype: str, date_obs: str, band: str | None, night: str, n_ext: int):
    """Primary header of a CP-style MasterCal (bias 'zero', flat 'dome flat', or 'bpm')."""
    from astropy.io import fits
    from astropy.time import Time

    t = Time(date_obs, format="isot", scale="utc")
    h = fits.Header()
    h["NEXTEND"] = (n_ext, "Number of extensions")
    h["OBSTYPE"] = (obstype, "Observation type")
    h["PROCTYPE"] = ("MasterCal", "Data processing level")
    h["PRODTYPE"] = ("image", "Data product type")
    h["INSTRUME"] = (decam.INSTRUMENT_NAME, "Instrument used to obtain these data")
    h["TELESCOP"] = (decam.TELESCOPE_NAME, "Telescope name")
    h["OBSERVAT"] = (decam.OBSERVATORY_NAME, "Observatory name")
    h["DATE-OBS"] = (t.isot, "UTC epoch of the calibration")
    h["MJD-OBS"] = (round(t.mjd, 8), "MJD of the calibration")
    h["TIMESYS"] = ("UTC", "Time system")
    h["NITE"] = (night, "Night (YYMMDD UT date of its exposures)")
    if band is not None:
        h["FILTER"] = (decam.BAND_TO_PHYSICAL_FILTER[band], "Unique filter identifier")
    elif obstype == "zero":
        h["FILTER"] = (decam.BAND_TO_PHYSICAL_FILTER["opaque"], "Unique filter identifier")
    h["PLVER"] = ("apsnake-sim", "Pipeline version")
    return h


def calib_hdu(ccdnum: int, data: np.ndarray, bunit: str):
    """One master-calibration extension (EXTNAME = DETPOS, CCDNUM, BUNIT)."""
    from astropy.io import fits

    if data.shape != decam.TRIMMED_SHAPE:
        raise ValueError(f"calibration CCD {ccdnum}: shape {data.shape}, expected {decam.TRIMMED_SHAPE}")
    hdu = fits.ImageHDU(data=data, name=decam.ccd_info(ccdnum).name)
    hdu.header["CCDNUM"] = (ccdnum, "CCD number")
    hdu.header["DETPOS"] = (decam.ccd_info(ccdnum).name, "detector position ID")
    hdu.header["BUNIT"] = bunit
    return hdu
