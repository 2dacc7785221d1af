"""The registry: every raw and calibration header read once, into Parquet tables.

``exposures.parquet`` has one row per exposure x detector, ``calibs.parquet`` one row per
calibration x detector and ``rejected.parquet`` one row per input file that could not be
used, with the reason. The workflow expands its targets from these tables and never opens
FITS files while building the DAG (docs/architecture.md §2).
"""

from __future__ import annotations

import glob
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apsnake.errors import ApsnakeError
from apsnake.instruments import decam

log = logging.getLogger(__name__)

RAW_SUFFIXES = (".fits", ".fits.fz", ".fz", ".fit")

EXPOSURE_COLUMNS = [
    "visit", "detector", "detector_name", "observation_type", "band", "physical_filter",
    "mjd_mid_tai", "date_obs_utc", "exposure_time", "airmass", "boresight_ra", "boresight_dec",
    "ra_center", "dec_center", "ra_ll", "dec_ll", "ra_lr", "dec_lr", "ra_ur", "dec_ur", "ra_ul", "dec_ul",
    "object_name", "raw_path", "hdu",
]
CALIB_COLUMNS = ["calib_type", "band", "physical_filter", "mjd", "date_obs_utc", "detector", "path", "hdu"]
REJECTED_COLUMNS = ["path", "kind", "reason"]


class IngestError(ApsnakeError, ValueError):
    """An input file that cannot be registered, or inputs that give nothing to register;
    the message says why."""


class InputNotFound(IngestError):
    """A configured input location (``raw``, ``calibs``, ``refcat``) that matches no file;
    the message names the config key and the location."""


class CalibrationNotFound(ApsnakeError, LookupError):
    """No usable calibration for a data ID."""


def find_input_files(location: str | Path) -> list[Path]:
    """FITS files named by a folder (searched recursively) or a glob pattern, sorted."""
    text = str(location)
    if _is_glob(text):
        paths = [Path(p) for p in glob.glob(text, recursive=True)]
    else:
        root = Path(text)
        paths = list(root.rglob("*")) if root.is_dir() else ([root] if root.exists() else [])
    return sorted(p for p in paths if p.is_file() and p.name.endswith(RAW_SUFFIXES) and not p.name.startswith("."))


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _shown(location: str | Path) -> str:
    """A location as configured, with its absolute form when it is relative."""
    text = str(location)
    absolute = str(Path(text).absolute())
    return text if absolute == text else f"{text} (= {absolute})"


def _label(key: str, label: str | None) -> str:
    return label if label is not None else f"config key {key!r}"


def check_input_files(key: str, location: str | Path, label: str | None = None) -> list[Path]:
    """The FITS files of a folder-or-glob input location (config keys ``raw``, ``calibs``).

    Raises ``InputNotFound`` naming the key (or ``label``, e.g. a command-line option) and
    the location when it matches no file: a mistyped folder must stop the run, not
    register nothing.
    """
    files = find_input_files(location)
    if files:
        return files
    text = str(location)
    what = "a folder searched recursively for .fits/.fits.fz, or a glob"
    if not _is_glob(text):
        root = Path(text)
        if root.is_dir():
            what = "the folder exists but holds no .fits/.fits.fz file, searched recursively"
        elif root.exists():
            what = f"not a .fits/.fits.fz file; give {what}"
        else:
            what = f"no such file or folder; give {what}"
    raise InputNotFound(f"{_label(key, label)}: {_shown(location)} matches no file ({what})")


def check_input_file(key: str, path: str | Path, label: str | None = None,
                     what: str = "a reference catalogue file: Parquet, FITS or CSV") -> Path:
    """One input file (config key ``refcat``); raises ``InputNotFound`` naming the key (or
    ``label``) and the path when it is missing or is not a file."""
    location = Path(path)
    if location.is_file():
        return location
    problem = "is a folder" if location.is_dir() else "matches no file"
    raise InputNotFound(f"{_label(key, label)}: {_shown(path)} {problem} ({what})")


def _open_headers(path: Path):
    """Primary header and every extension header of a FITS file, without reading pixels.

    Raises ``IngestError`` for a non-FITS or truncated file.
    """
    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", VerifyWarning)
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                headers = [h.header.copy() for h in hdul]
                kinds = [type(h).__name__ for h in hdul]
                size = path.stat().st_size
                # The end of the last HDU's data must lie within the file.
                last = hdul[-1]
                info = last.fileinfo()
                expected = info["datLoc"] + info["datSpan"] if info else size
    except OSError as err:
        raise IngestError(f"not a readable FITS file: {err}") from None
    except Exception as err:  # astropy raises assorted errors on garbage input
        raise IngestError(f"not a readable FITS file: {type(err).__name__}: {err}") from None
    truncated = [str(w.message) for w in caught if "truncated" in str(w.message).lower()]
    if truncated or expected > size:
        raise IngestError(f"file is truncated ({size} bytes, headers describe {expected})")
    return headers, kinds


def ingest_raw_file(path: str | Path) -> list[dict]:
    """Registry rows (one per science CCD) for one raw DECam file.

    Raises ``IngestError`` naming the problem when the file cannot be used at all.
    """
    path = Path(path)
    headers, kinds = _open_headers(path)
    primary = headers[0]
    try:
        info = decam.translate_header(primary)
    except (decam.HeaderError, decam.UnknownFilterError, ValueError) as err:
        raise IngestError(str(err)) from None
    rows = []
    problems = []
    for index, (header, kind) in enumerate(zip(headers, kinds)):
        if index == 0 or "CCDNUM" not in header:
            continue
        ccdnum = int(header["CCDNUM"])
        if ccdnum not in decam.CCDS:
            continue  # focus and guide CCDs
        shape = (int(header.get("ZNAXIS2", header.get("NAXIS2", 0))),
                 int(header.get("ZNAXIS1", header.get("NAXIS1", 0))))
        if shape != decam.RAW_SHAPE:
            problems.append(f"CCD {ccdnum} has shape {shape}, expected {decam.RAW_SHAPE}")
            continue
        try:
            corners = decam.footprint_corners(header, ccdnum)
        except Exception as err:  # a CCD without a usable WCS still gets registered
            log.warning("%s: CCD %d: no usable header WCS (%s)", path, ccdnum, err)
            corners = np.full((4, 2), np.nan)
        centre_ra, centre_dec = _mean_position(corners)
        row = {
            "visit": info.visit, "detector": ccdnum, "detector_name": decam.ccd_info(ccdnum).name,
            "observation_type": info.observation_type, "band": info.band,
            "physical_filter": info.physical_filter, "mjd_mid_tai": info.mjd_mid_tai,
            "date_obs_utc": info.date_obs_utc, "exposure_time": info.exposure_time,
            "airmass": info.airmass, "boresight_ra": info.boresight_ra, "boresight_dec": info.boresight_dec,
            "ra_center": centre_ra, "dec_center": centre_dec,
            "object_name": info.object_name, "raw_path": str(path), "hdu": index,
        }
        for (ra, dec), corner in zip(corners, ("ll", "lr", "ur", "ul")):
            row[f"ra_{corner}"], row[f"dec_{corner}"] = float(ra), float(dec)
        rows.append(row)
    if not rows:
        reason = "; ".join(problems) if problems else "no science CCD extension (CCDNUM 1-62)"
        raise IngestError(f"raw file without usable CCD extensions: {reason}")
    for problem in problems:
        log.warning("%s: %s (CCD skipped)", path, problem)
    return rows


def _mean_position(corners: np.ndarray) -> tuple[float, float]:
    if not np.all(np.isfinite(corners)):
        return float("nan"), float("nan")
    ra, dec = np.radians(corners[:, 0]), np.radians(corners[:, 1])
    vec = np.array([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)]).sum(axis=1)
    return float(np.degrees(np.arctan2(vec[1], vec[0])) % 360.0), float(np.degrees(np.arcsin(vec[2] / np.linalg.norm(vec))))


_CALIB_TYPES = {"bias": "bias", "flat": "flat", "bpm": "bpm"}


def ingest_calib_file(path: str | Path) -> list[dict]:
    """Registry rows (one per CCD) for one master calibration MEF (bias, flat or BPM)."""
    path = Path(path)
    headers, _ = _open_headers(path)
    primary = headers[0]
    try:
        obstype = decam.observation_type(primary)
    except decam.HeaderError as err:
        raise IngestError(str(err)) from None
    if obstype not in _CALIB_TYPES:
        raise IngestError(f"OBSTYPE {primary.get('OBSTYPE')!r} is not a calibration we use (zero, dome flat, bpm)")
    band, physical = "", ""
    if obstype == "flat":
        try:
            band, physical = decam.band_from_filter(str(primary.get("FILTER", "")))
        except decam.UnknownFilterError as err:
            raise IngestError(str(err)) from None
    mjd, date = _calib_date(primary)
    rows = []
    for index, header in enumerate(headers):
        ccdnum = header.get("CCDNUM")
        if index == 0 or ccdnum is None or int(ccdnum) not in decam.CCDS:
            continue
        shape = (int(header.get("ZNAXIS2", header.get("NAXIS2", 0))), int(header.get("ZNAXIS1", header.get("NAXIS1", 0))))
        if shape != decam.TRIMMED_SHAPE:
            log.warning("%s: CCD %s has shape %s, expected %s (skipped)", path, ccdnum, shape, decam.TRIMMED_SHAPE)
            continue
        rows.append({
            "calib_type": _CALIB_TYPES[obstype], "band": band, "physical_filter": physical,
            "mjd": mjd, "date_obs_utc": date, "detector": int(ccdnum), "path": str(path), "hdu": index,
        })
    if not rows:
        raise IngestError(f"calibration without {decam.TRIMMED_SHAPE[1]}x{decam.TRIMMED_SHAPE[0]} CCD extensions")
    return rows


def _calib_date(primary) -> tuple[float, str]:
    from astropy.time import Time

    if str(primary.get("DATE-OBS", "")).strip():
        t = Time(str(primary["DATE-OBS"]).strip(), format="isot", scale="utc")
        return float(t.tai.mjd), t.isot
    if "MJD-OBS" in primary:
        t = Time(float(primary["MJD-OBS"]), format="mjd", scale="utc")
        return float(t.tai.mjd), t.isot
    return float("nan"), ""


@dataclass
class Registry:
    """The three registry tables (pandas DataFrames)."""

    exposures: object
    calibs: object
    rejected: object


def build_registry(raw_files: list[Path], calib_files: list[Path]) -> Registry:
    """Read every header once; bad files go to ``rejected`` with the reason, never silently.

    Two raw files claiming the same EXPNUM: when their headers agree (a copy), the first
    path in sorted order is kept and the other is rejected as a duplicate; when they
    disagree, both are rejected since neither can be trusted.
    """
    import pandas as pd

    rejected = []
    by_visit: dict[int, list[tuple[Path, list[dict]]]] = {}
    for path in sorted(raw_files):
        try:
            rows = ingest_raw_file(path)
        except IngestError as err:
            log.error("rejected raw %s: %s", path, err)
            rejected.append({"path": str(path), "kind": "raw", "reason": str(err)})
            continue
        by_visit.setdefault(rows[0]["visit"], []).append((path, rows))
    exposure_rows = []
    for visit, claims in sorted(by_visit.items()):
        if len(claims) > 1:
            signatures = {(r[0]["date_obs_utc"], r[0]["physical_filter"], len(r)) for _, r in claims}
            paths = [str(p) for p, _ in claims]
            if len(signatures) == 1:
                keep = claims[0]
                for path, _ in claims[1:]:
                    reason = f"duplicate EXPNUM {visit}: same exposure as {keep[0]}, which is registered"
                    log.error("rejected raw %s: %s", path, reason)
                    rejected.append({"path": str(path), "kind": "raw", "reason": reason})
                claims = [keep]
            else:
                for path, _ in claims:
                    others = ", ".join(p for p in paths if p != str(path))
                    reason = f"duplicate EXPNUM {visit}: also claimed by {others} with different headers"
                    log.error("rejected raw %s: %s", path, reason)
                    rejected.append({"path": str(path), "kind": "raw", "reason": reason})
                continue
        exposure_rows.extend(claims[0][1])
    calib_rows = []
    for path in sorted(calib_files):
        try:
            calib_rows.extend(ingest_calib_file(path))
        except IngestError as err:
            log.error("rejected calibration %s: %s", path, err)
            rejected.append({"path": str(path), "kind": "calib", "reason": str(err)})
    exposures = pd.DataFrame(exposure_rows, columns=EXPOSURE_COLUMNS)
    exposures = exposures.astype({"visit": "int64", "detector": "int64", "hdu": "int64"})
    exposures = exposures.sort_values(["mjd_mid_tai", "visit", "detector"], kind="stable").reset_index(drop=True)
    calibs = pd.DataFrame(calib_rows, columns=CALIB_COLUMNS).astype({"detector": "int64", "hdu": "int64"})
    return Registry(exposures, calibs, pd.DataFrame(rejected, columns=REJECTED_COLUMNS))


def registry_paths(folder: str | Path) -> dict[str, Path]:
    """Standard file names of the three registry tables inside ``folder``."""
    return {name: Path(folder) / f"{name}.parquet" for name in ("exposures", "calibs", "rejected")}


def write_registry(registry: Registry, paths: dict[str, str | Path]) -> None:
    """Write the exposures/calibs/rejected tables atomically to ``paths[name]``."""
    from apsnake.atomic import write_parquet

    for name in ("exposures", "calibs", "rejected"):
        write_parquet(getattr(registry, name), paths[name])


def run_ingest(raw: str | Path, calibs: str | Path, registry_paths: dict[str, str | Path],
               labels: tuple[str, str] = ("config key 'raw'", "config key 'calibs'")) -> Registry:
    """Find the raw and calibration files, read their headers and write the registry.

    Bad files are listed in the rejected table and logged; the rest are registered.
    Raises ``IngestError`` naming the input (``labels``: how the caller names ``raw`` and
    ``calibs``, config keys by default) and its location when either matches no file or
    when no raw exposure can be registered; no registry is written then.
    """
    raw_files = check_input_files("raw", raw, label=labels[0])
    calib_files = check_input_files("calibs", calibs, label=labels[1])
    log.info("ingest: %d raw files under %s, %d calibration files under %s",
             len(raw_files), raw, len(calib_files), calibs)
    registry = build_registry(raw_files, calib_files)
    if registry.exposures.empty:
        bad = registry.rejected[registry.rejected["kind"] == "raw"]
        examples = "; ".join(f"{row.path}: {row.reason}" for row in bad.head(3).itertuples())
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise IngestError(
            f"{labels[0]}: none of the {len(raw_files)} raw files under {_shown(raw)} could be registered: "
            f"{len(bad)} rejected, each listed with its reason in the log above ({examples}{more}); "
            "no registry written"
        )
    write_registry(registry, registry_paths)
    exposures = registry.exposures
    log.info(
        "registered %d visits x detectors (%d visits, detectors %s), %d calibration CCDs, %d rejected files",
        len(exposures), exposures["visit"].nunique(), sorted(exposures["detector"].unique().tolist()),
        len(registry.calibs), len(registry.rejected),
    )
    for row in registry.rejected.itertuples():
        log.warning("rejected %s %s: %s", row.kind, row.path, row.reason)
    return registry


def read_table(path: str | Path):
    import pandas as pd

    return pd.read_parquet(path)


def select_data_ids(exposures, visits="all", detectors="all", observation_type="science") -> list[tuple[int, int]]:
    """(visit, detector) pairs to process, in (MJD, visit, detector) order."""
    table = exposures[exposures["observation_type"] == observation_type]
    if visits != "all":
        table = table[table["visit"].isin([int(v) for v in visits])]
    if detectors != "all":
        table = table[table["detector"].isin([int(d) for d in detectors])]
    return [(int(v), int(d)) for v, d in zip(table["visit"], table["detector"])]


def select_calibrations(calibs, exposure_row) -> dict[str, tuple[str, int] | None]:
    """Calibrations for one data ID: bias nearest in time, flat nearest in time with the
    same physical filter, BPM valid at the exposure date (the latest one that starts
    before it). Raises ``CalibrationNotFound`` naming the data ID for a missing bias or flat;
    the BPM is optional (None). For many data IDs, build one ``CalibrationSelector``.
    """
    return CalibrationSelector(calibs).select(exposure_row)


class CalibrationSelector:
    """``select_calibrations`` for many data IDs: the calibration table is split once by
    detector, type and band into numpy arrays, so that a selection costs microseconds instead
    of a few pandas filters (the workflow selects for every data ID while building the DAG)."""

    def __init__(self, calibs):
        self._groups: dict[tuple, tuple[np.ndarray, list[tuple[str, int]]]] = {}
        keys: dict[tuple, list[int]] = {}
        types, bands, dets = (calibs[c].tolist() for c in ("calib_type", "band", "detector"))
        for i, (kind, band, det) in enumerate(zip(types, bands, dets)):
            keys.setdefault((int(det), kind, band if kind == "flat" else None), []).append(i)
        mjds, paths, hdus = calibs["mjd"].to_numpy(dtype=float), calibs["path"].tolist(), calibs["hdu"].tolist()
        for key, index in keys.items():  # table order kept: ties go to the first row, as before
            self._groups[key] = (mjds[index], [(str(paths[i]), int(hdus[i])) for i in index])

    def select(self, exposure_row) -> dict[str, tuple[str, int] | None]:
        visit, detector = int(exposure_row["visit"]), int(exposure_row["detector"])
        mjd = float(exposure_row["mjd_mid_tai"])
        chosen: dict[str, tuple[str, int] | None] = {}
        for kind in ("bias", "flat"):
            group = self._groups.get((detector, kind, exposure_row["band"] if kind == "flat" else None))
            if group is None:
                what = f"{kind} for band {exposure_row['band']}" if kind == "flat" else kind
                raise CalibrationNotFound(f"data ID (visit={visit}, detector={detector}): no {what} in the calibration registry")
            chosen[kind] = group[1][int(np.argmin(np.abs(group[0] - mjd)))]
        chosen["bpm"] = None
        group = self._groups.get((detector, "bpm", None))
        if group is not None:
            valid = np.flatnonzero(~(group[0] > mjd))  # NaN dates count as always valid
            if valid.size:
                best = valid[int(np.argmax(np.nan_to_num(group[0][valid], nan=-np.inf)))]
                chosen["bpm"] = group[1][int(best)]
        return chosen
