"""Column definitions of the APDB tables, alert records and fakes: the one schema module.

Names, types and nullability follow the Rubin alert schema (PyPI ``lsst-alert-packet``,
schema ``ALERT_SCHEMA_VERSION``: ``lsst.v11_1.{diaSource,diaObject,diaForcedSource}.avsc``),
so that an alert is a projection of APDB rows (docs/formats.md §9). Units follow the same schema:

* positions (``ra``, ``dec``) in degrees (ICRS), their errors in degrees (``raErr`` is
  the error of RA * cos(Dec));
* fluxes in nJy (AB: ``mag = -2.5 log10(flux / nJy) + 31.4``);
* times as MJD (TAI), in days;
* pixel coordinates 0-based in the detector's trimmed frame (``x`` = column, ``y`` = row);
* second moments (``ixx`` ...) in arcsec^2, lengths in arcsec, angles in degrees.

Avro type -> Arrow type: ``long`` -> int64, ``int`` -> int32, ``float`` -> float32,
``double`` -> float64, ``boolean`` -> bool, ``string`` -> string. A column is nullable when
its Avro type is a union with ``null``.

The ``Fake`` table (injected fakes, ``apsnake.fakes``) is apsnake's own, not part of the alert
schema or the APDB; its units follow the same conventions.

Deviations from the alert schema (``SCHEMA_DEVIATIONS``), all on nullability: ``trailNdata``
is non-null in the alert schema, but we have no trailed-source measurement yet and never
invent values, so it is nullable here; alerts send 0 (no pixels used in a trail fit), the one
deliberate fill of ``apsnake.alerts.records.REQUIRED_FILLS``.

``conform`` is the gate through which every table is written: it orders and casts the
columns, turns NaN into null in nullable floating-point columns ("not measured"), fills
missing nullable columns with nulls, and raises ``SchemaError`` for unknown columns (unless
asked to drop them), missing non-nullable columns and nulls in non-nullable columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from apsnake.errors import ApsnakeError

ALERT_SCHEMA_VERSION = "11.1"
#: The bands with per-band summary columns in DiaObject (other bands keep their DiaSource rows).
BANDS = ("u", "g", "r", "i", "z", "y")


class SchemaError(ApsnakeError, ValueError):
    """A table that does not fit its schema (unknown, missing or null columns, bad types)."""


@dataclass(frozen=True)
class Column:
    """One column of an APDB table / alert record.

    Attributes
    ----------
    name : str
        Column name (alert-schema spelling).
    type : pyarrow.DataType
        Arrow type of the stored values.
    unit : str
        Unit of the values (astropy spelling; '' for dimensionless, flags, ids and counts).
    description : str
        What the column holds.
    nullable : bool
        Whether null ("not measured") is allowed.
    """

    name: str
    type: pa.DataType
    unit: str
    description: str
    nullable: bool = True

    def field(self) -> pa.Field:
        """The Arrow field, with ``unit`` and ``description`` in its metadata."""
        return pa.field(self.name, self.type, nullable=self.nullable,
                        metadata={"unit": self.unit, "description": self.description})


I64, I32, F32, F64, BOOL, STR = pa.int64(), pa.int32(), pa.float32(), pa.float64(), pa.bool_(), pa.string()


def _c(name, type_, unit, description, nullable=True) -> Column:
    return Column(name, type_, unit, description, nullable)


# ---------------------------------------------------------------------------
# DiaSource
_PIXEL_FLAGS = (
    # (suffix, plane described, footprint version, centre version)
    ("bad", "BAD"), ("cr", "CR (cosmic ray)"), ("edge", "EDGE"), ("nodata", "NO_DATA"),
    ("interpolated", "INTRP (interpolated)"), ("offimage", None), ("saturated", "SAT (saturated)"),
    ("suspect", "SUSPECT"), ("streak", "STREAK"), ("injected", "INJECTED (injected fake)"),
    ("injected_template", "INJECTED_TEMPLATE (fake injected into the template)"),
)
_PIXEL_FLAG_ORDER = (
    "bad", "cr", "crCenter", "edge", "nodata", "nodataCenter", "interpolated", "interpolatedCenter",
    "offimage", "saturated", "saturatedCenter", "suspect", "suspectCenter", "streak", "streakCenter",
    "injected", "injectedCenter", "injected_template", "injected_templateCenter",
)


def _pixel_flag_columns() -> list[Column]:
    planes = dict(_PIXEL_FLAGS)
    cols = [_c("pixelFlags", BOOL, "", "Setting the pixel flags from the footprint's mask failed; "
                                     "the other pixelFlags_* may then be wrongly False.")]
    for name in _PIXEL_FLAG_ORDER:
        if name == "offimage":
            desc = "The centroid lies outside the image."
        elif name == "edge":
            desc = "Some footprint pixel is masked EDGE (outside the usable region), or the centroid is off the image."
        elif name.endswith("Center"):
            desc = f"A {planes[name[:-6]]} pixel within the 3x3 pixels around the centroid."
        else:
            desc = f"A {planes[name]} pixel in the source footprint."
        cols.append(_c(f"pixelFlags_{name}", BOOL, "", desc))
    return cols


DIA_SOURCE_COLUMNS: tuple[Column, ...] = tuple([
    _c("diaSourceId", I64, "", "Unique id: (visit, detector, running index) packed (apsnake.ids).", False),
    _c("visit", I64, "", "Visit (exposure) in which the source was measured.", False),
    _c("detector", I32, "", "Detector (DECam CCDNUM) on which the source was measured.", False),
    _c("diaObjectId", I64, "", "DiaObject this source belongs to; null until associated, or for solar-system sources."),
    _c("ssObjectId", I64, "", "Solar-system object this source belongs to, if any."),
    _c("parentDiaSourceId", I64, "", "Parent source this one was deblended from, if any."),
    _c("midpointMjdTai", F64, "d", "Mid-exposure time of the visit, MJD (TAI).", False),
    _c("exposureTime", F32, "s", "Exposure time of the visit."),
    _c("ra", F64, "deg", "Right ascension (ICRS) of the centroid.", False),
    _c("raErr", F32, "deg", "Uncertainty of ra, as an angle on the sky (error of RA * cos(Dec))."),
    _c("dec", F64, "deg", "Declination (ICRS) of the centroid.", False),
    _c("decErr", F32, "deg", "Uncertainty of dec."),
    _c("ra_dec_Cov", F32, "deg**2", "Covariance of (RA * cos(Dec), Dec)."),
    _c("x", F32, "pixel", "Column of the centroid, 0-based, trimmed detector frame.", False),
    _c("xErr", F32, "pixel", "Uncertainty of x."),
    _c("y", F32, "pixel", "Row of the centroid, 0-based, trimmed detector frame.", False),
    _c("yErr", F32, "pixel", "Uncertainty of y."),
    _c("centroid_flag", BOOL, "", "The centroid could not be refined; the detection peak is used."),
    _c("apFlux", F32, "nJy", "Flux in a circular aperture of radius 12 pixels on the difference image."),
    _c("apFluxErr", F32, "nJy", "Uncertainty of apFlux."),
    _c("apFlux_flag", BOOL, "", "The aperture flux failed or is unreliable (masked or missing pixels)."),
    _c("apFlux_flag_apertureTruncated", BOOL, "", "The aperture extends beyond the image."),
    _c("isNegative", BOOL, "", "Detected only below the negative threshold (template brighter)."),
    _c("snr", F32, "", "Detection significance: peak of the PSF-filtered difference image over its noise."),
    _c("psfFlux", F32, "nJy", "PSF-fit flux on the difference image (science minus template), less the "
       "excess sigma^2/psfFlux of measuring at its own centroid, sigma its pixel-noise error "
       "(dia.debias_centroid_flux)."),
    _c("psfFluxErr", F32, "nJy", "Uncertainty of psfFlux."),
    _c("psfLnL", F32, "", "Natural log-likelihood of the data under the point-source model."),
    _c("psfChi2", F32, "", "Chi-square of the PSF fit on the difference image."),
    _c("psfNdata", I32, "", "Number of pixels used in the PSF fit.", False),
    _c("psfFlux_flag", BOOL, "", "The PSF flux failed (see the other psfFlux_flag_* columns)."),
    _c("psfFlux_flag_edge", BOOL, "", "The PSF model stamp is cut by the image edge."),
    _c("psfFlux_flag_noGoodPixels", BOOL, "", "No usable pixel for the PSF fit."),
    _c("trailFlux", F32, "nJy", "Flux of the trailed-source model on the difference image."),
    _c("trailFluxErr", F32, "nJy", "Uncertainty of trailFlux."),
    _c("trailRa", F64, "deg", "Right ascension of the trail centroid."),
    _c("trailRaErr", F32, "deg", "Uncertainty of trailRa (RA * cos(Dec))."),
    _c("trailDec", F64, "deg", "Declination of the trail centroid."),
    _c("trailDecErr", F32, "deg", "Uncertainty of trailDec."),
    _c("trailLength", F32, "arcsec", "Length of the trail (maximum likelihood)."),
    _c("trailLengthErr", F32, "arcsec", "Uncertainty of trailLength."),
    _c("trailAngle", F32, "deg", "Position angle of the trail, from north through east."),
    _c("trailAngleErr", F32, "deg", "Uncertainty of trailAngle."),
    _c("trailChi2", F32, "", "Chi-square of the trail fit."),
    _c("trailNdata", I32, "", "Number of pixels used in the trail fit (alert schema: non-null; null here "
                              "until trails are measured)."),
    _c("trailAlgorithm", I32, "", "Trail algorithm: 1 = SDSS shape, 2 = HSM shape."),
    _c("trail_flag_edge", BOOL, "", "The trail reaches the image edge or EDGE pixels."),
    _c("trail_flag", BOOL, "", "The trail fit failed."),
    _c("dipoleMeanFlux", F32, "nJy", "Mean of the absolute fluxes of the two lobes of the dipole fit."),
    _c("dipoleMeanFluxErr", F32, "nJy", "Uncertainty of dipoleMeanFlux."),
    _c("dipoleFluxDiff", F32, "nJy", "Absolute flux of the positive lobe minus that of the negative lobe."),
    _c("dipoleFluxDiffErr", F32, "nJy", "Uncertainty of dipoleFluxDiff."),
    _c("dipoleLength", F32, "arcsec", "Separation of the two lobes of the dipole fit."),
    _c("dipoleAngle", F32, "deg", "Position angle (north through east) of the direction from the negative to "
                                  "the positive lobe."),
    _c("dipoleChi2", F32, "", "Chi-square of the dipole fit."),
    _c("dipoleNdata", I32, "", "Number of data points (pixels) in the dipole fit; 0 when not fitted.", False),
    _c("scienceFlux", F32, "nJy", "Forced PSF flux at the source position on the science (calexp) image."),
    _c("scienceFluxErr", F32, "nJy", "Uncertainty of scienceFlux."),
    _c("forced_PsfFlux_flag", BOOL, "", "The forced PSF flux on the science image failed."),
    _c("forced_PsfFlux_flag_edge", BOOL, "", "The forced PSF stamp on the science image is cut by the edge."),
    _c("forced_PsfFlux_flag_noGoodPixels", BOOL, "", "No usable pixel for the forced PSF flux on the science image."),
    _c("templateFlux", F32, "nJy", "Forced PSF flux at the source position on the PSF-matched template."),
    _c("templateFluxErr", F32, "nJy", "Uncertainty of templateFlux."),
    _c("ixx", F32, "arcsec**2", "Adaptive second moment of the source, x-x (pixel axes, scaled to arcsec)."),
    _c("iyy", F32, "arcsec**2", "Adaptive second moment of the source, y-y."),
    _c("ixy", F32, "arcsec**2", "Adaptive second moment of the source, x-y."),
    _c("ixxPSF", F32, "arcsec**2", "Adaptive second moment of the PSF at the source, x-x."),
    _c("iyyPSF", F32, "arcsec**2", "Adaptive second moment of the PSF at the source, y-y."),
    _c("ixyPSF", F32, "arcsec**2", "Adaptive second moment of the PSF at the source, x-y."),
    _c("shape_flag", BOOL, "", "The shape (adaptive moments) measurement failed."),
    _c("shape_flag_no_pixels", BOOL, "", "No pixels to measure the shape on."),
    _c("shape_flag_not_contained", BOOL, "", "The centre is not inside the footprint's bounding box."),
    _c("shape_flag_parent_source", BOOL, "", "The source is a blend parent (should not be measured)."),
    _c("extendedness", F32, "", "0 = point-like ... 1 = extended, from the source and PSF moments."),
    _c("reliability", F32, "", "Probability (0-1) that the source is astrophysical (machine-learned)."),
    _c("reliabilityVersion", STR, "", "Version of the reliability model."),
    _c("band", STR, "", "Filter band of the visit."),
    _c("isDipole", BOOL, "", "The source is well described by a dipole (two PSFs of opposite sign)."),
    _c("dipoleFitAttempted", BOOL, "", "A dipole fit was attempted (footprint with both signs)."),
    _c("timeProcessedMjdTai", F64, "d", "Time this record was made, MJD (TAI).", False),
    _c("timeWithdrawnMjdTai", F64, "d", "Time this record was withdrawn, MJD (TAI)."),
    _c("bboxSize", I32, "pixel", "Side of the square box that contains the detection footprint.", False),
    *_pixel_flag_columns(),
    _c("glint_trail", BOOL, "", "Part of a glint trail."),
])

# ---------------------------------------------------------------------------
# DiaObject
_BAND_BLOCKS = (
    # One block per avro ordering group: (suffix, type, unit, description template, nullable).
    (("psfFluxMean", F32, "nJy", "Inverse-variance weighted mean of the {b}-band psfFlux.", True),
     ("psfFluxMeanErr", F32, "nJy", "Standard error of {b}_psfFluxMean.", True),
     ("psfFluxSigma", F32, "nJy", "Standard deviation of the {b}-band psfFlux values.", True),
     ("psfFluxNdata", I32, "", "Number of {b}-band DiaSources.", False),
     ("fpFluxMean", F32, "nJy", "Weighted mean of the {b}-band forced difference-image fluxes.", True),
     ("fpFluxMeanErr", F32, "nJy", "Standard error of {b}_fpFluxMean.", True)),
    (("scienceFluxMean", F32, "nJy", "Weighted mean of the {b}-band forced science-image fluxes.", True),
     ("scienceFluxMeanErr", F32, "nJy", "Standard error of {b}_scienceFluxMean.", True)),
    (("psfFluxMin", F32, "nJy", "Smallest {b}-band psfFlux.", True),
     ("psfFluxMax", F32, "nJy", "Largest {b}-band psfFlux.", True),
     ("psfFluxMaxSlope", F32, "nJy/d", "Largest rate of change between consecutive {b}-band psfFluxes.", True),
     ("psfFluxErrMean", F32, "nJy", "Mean of the {b}-band psfFluxErr.", True)),
)


def _band_columns() -> list[Column]:
    cols = []
    for block in _BAND_BLOCKS:
        for b in BANDS:
            for suffix, type_, unit, desc, nullable in block:
                cols.append(_c(f"{b}_{suffix}", type_, unit, desc.format(b=b), nullable))
    return cols


DIA_OBJECT_COLUMNS: tuple[Column, ...] = tuple([
    _c("diaObjectId", I64, "", "Unique id (the diaSourceId of the object's first DiaSource).", False),
    _c("validityStartMjdTai", F64, "d", "Start of validity of this version of the object, MJD (TAI).", False),
    _c("ra", F64, "deg", "Right ascension (ICRS) of the mean position.", False),
    _c("raErr", F32, "deg", "Uncertainty of ra (RA * cos(Dec))."),
    _c("dec", F64, "deg", "Declination (ICRS) of the mean position.", False),
    _c("decErr", F32, "deg", "Uncertainty of dec."),
    _c("ra_dec_Cov", F32, "deg**2", "Covariance of (RA * cos(Dec), Dec)."),
    *_band_columns(),
    _c("firstDiaSourceMjdTai", F64, "d", "Time of the first DiaSource, MJD (TAI)."),
    _c("lastDiaSourceMjdTai", F64, "d", "Time of the latest DiaSource, MJD (TAI)."),
    _c("nDiaSources", I32, "", "Number of DiaSources associated with the object.", False),
])

# ---------------------------------------------------------------------------
# DiaForcedSource
DIA_FORCED_SOURCE_COLUMNS: tuple[Column, ...] = (
    _c("diaForcedSourceId", I64, "", "Unique id of the forced measurement.", False),
    _c("diaObjectId", I64, "", "DiaObject measured.", False),
    _c("ra", F64, "deg", "Right ascension (ICRS) of the DiaObject position measured at.", False),
    _c("dec", F64, "deg", "Declination (ICRS) of the DiaObject position measured at.", False),
    _c("visit", I64, "", "Visit measured.", False),
    _c("detector", I32, "", "Detector measured.", False),
    _c("psfFlux", F32, "nJy", "Forced PSF flux on the difference image."),
    _c("psfFluxErr", F32, "nJy", "Uncertainty of psfFlux."),
    _c("midpointMjdTai", F64, "d", "Mid-exposure time of the visit, MJD (TAI).", False),
    _c("scienceFlux", F32, "nJy", "Forced PSF flux on the science (calexp) image."),
    _c("scienceFluxErr", F32, "nJy", "Uncertainty of scienceFlux."),
    _c("band", STR, "", "Filter band of the visit."),
    _c("timeProcessedMjdTai", F64, "d", "Time this record was made, MJD (TAI).", False),
    _c("timeWithdrawnMjdTai", F64, "d", "Time this record was withdrawn, MJD (TAI)."),
)

# ---------------------------------------------------------------------------
# Fake: injected point sources and what became of them (apsnake.fakes). Not an APDB table and
# not in the alert schema: fakes live only in the per-data-ID ``fakes`` Parquet files.
FAKE_COLUMNS: tuple[Column, ...] = (
    _c("fakeId", I64, "", "Unique id of the fake: (visit, detector, running index) packed as diaSourceId is "
                          "(apsnake.ids); unique among fakes only.", False),
    _c("visit", I64, "", "Visit the fake was injected into.", False),
    _c("detector", I64, "", "Detector (DECam CCDNUM) the fake was injected into.", False),
    _c("band", STR, "", "Filter band of the visit."),
    _c("midpointMjdTai", F64, "d", "Mid-exposure time of the visit, MJD (TAI).", False),
    _c("x", F64, "pixel", "Column of the injected position, 0-based, trimmed detector frame.", False),
    _c("y", F64, "pixel", "Row of the injected position, 0-based, trimmed detector frame.", False),
    _c("ra", F64, "deg", "Right ascension (ICRS) of the injected position (calexp WCS).", False),
    _c("dec", F64, "deg", "Declination (ICRS) of the injected position (calexp WCS).", False),
    _c("injectedFlux", F64, "nJy", "Injected flux, on the scale of DiaSource psfFlux (aperture corrected).",
       False),
    _c("injectedMag", F64, "mag", "AB magnitude of injectedFlux: -2.5 log10(injectedFlux / nJy) + 31.4.", False),
    _c("expectedSnr", F64, "", "Expected PSF-fit S/N on the difference image: flux over the optimal PSF-fit "
                               "error from the difference PSF and variance at the position.", False),
    _c("onHost", BOOL, "", "Placed near the centroid of a galaxy (a src source more extended than the PSF).",
       False),
    _c("recovered", BOOL, "", "A non-negative DiaSource with pixelFlags_injectedCenter lies within the match "
                              "radius (nearest, one-to-one).", False),
    _c("diaSourceId", I64, "", "The matched DiaSource of the fake run (not in the APDB); null if not recovered."),
    _c("psfFlux", F64, "nJy", "psfFlux of the matched DiaSource; null if not recovered."),
    _c("psfFluxErr", F64, "nJy", "psfFluxErr of the matched DiaSource; null if not recovered."),
    _c("separation", F64, "pixel", "Distance from the injected position to the matched DiaSource; null if not "
                                   "recovered."),
)

TABLES: dict[str, tuple[Column, ...]] = {
    "DiaSource": DIA_SOURCE_COLUMNS,
    "DiaObject": DIA_OBJECT_COLUMNS,
    "DiaForcedSource": DIA_FORCED_SOURCE_COLUMNS,
    "Fake": FAKE_COLUMNS,
}
#: The tables that follow the Rubin alert schema (the others are apsnake's own).
ALERT_TABLES = ("DiaSource", "DiaObject", "DiaForcedSource")

#: Columns whose nullability differs from the alert schema: name -> (table, reason).
SCHEMA_DEVIATIONS: dict[tuple[str, str], str] = {
    ("DiaSource", "trailNdata"): "nullable here: no trailed-source measurement yet (never a made-up 0)",
}


def _arrow_schema(table_name: str) -> pa.Schema:
    metadata = {"table": table_name}
    if table_name in ALERT_TABLES:
        metadata["alert_schema_version"] = ALERT_SCHEMA_VERSION
    return pa.schema([c.field() for c in TABLES[table_name]], metadata=metadata)


DIA_SOURCE_SCHEMA = _arrow_schema("DiaSource")
DIA_OBJECT_SCHEMA = _arrow_schema("DiaObject")
DIA_FORCED_SOURCE_SCHEMA = _arrow_schema("DiaForcedSource")
FAKE_SCHEMA = _arrow_schema("Fake")
_SCHEMAS = {"DiaSource": DIA_SOURCE_SCHEMA, "DiaObject": DIA_OBJECT_SCHEMA,
            "DiaForcedSource": DIA_FORCED_SOURCE_SCHEMA, "Fake": FAKE_SCHEMA}


def _table_name(table_name: str) -> str:
    for name in TABLES:
        if name.lower() == str(table_name).lower():
            return name
    raise SchemaError(f"unknown table {table_name!r}; known: {', '.join(TABLES)}")


def columns(table_name: str) -> tuple[Column, ...]:
    """The column definitions of a table ('DiaSource', 'DiaObject', 'DiaForcedSource', 'Fake';
    case-insensitive), in schema order."""
    return TABLES[_table_name(table_name)]


def arrow_schema(table_name: str) -> pa.Schema:
    """The pyarrow schema of a table (field metadata: ``unit``, ``description``)."""
    return _SCHEMAS[_table_name(table_name)]


def column_names(table_name: str) -> list[str]:
    """Column names of a table, in schema order."""
    return [c.name for c in columns(table_name)]


def empty_table(table_name: str) -> pa.Table:
    """A table with no rows and the full schema."""
    return arrow_schema(table_name).empty_table()


def _to_arrow_array(values, n: int, col: Column, table_name: str) -> pa.Array:
    """One column as an Arrow array of the column's type; NaN -> null in nullable floats."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        if hasattr(values, "to_numpy") and getattr(values, "dtype", None) is not None \
                and str(values.dtype) in ("Int64", "Int32", "Int16", "boolean", "string", "Float32", "Float64"):
            values = pa.array(values, from_pandas=True)  # pandas nullable extension dtypes
        else:
            arr = np.asarray(values)
            if arr.ndim == 0:
                arr = np.full(n, arr[()])
            values = pa.array(arr, from_pandas=True) if arr.dtype != object else pa.array(list(arr),
                                                                                          from_pandas=True)
    if len(values) != n:
        raise SchemaError(f"{table_name}.{col.name}: {len(values)} values for {n} rows")
    if pa.types.is_floating(values.type) and pa.types.is_floating(col.type):
        nan = pc.is_nan(values)
        if pc.any(nan).as_py():
            values = pc.if_else(nan, pa.scalar(None, values.type), values)
    if values.type != col.type:
        if pa.types.is_null(values.type):
            values = pa.nulls(n, col.type)
        else:
            try:
                # Float -> int: only exact integers pass; float64 -> float32 may round (safe=False).
                safe = not (pa.types.is_floating(values.type) and pa.types.is_floating(col.type))
                values = values.cast(col.type, safe=safe)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise SchemaError(f"{table_name}.{col.name}: cannot cast {values.type} to {col.type}: {err}") from err
    return values


def conform(data, table_name: str, *, extra: str = "raise") -> pa.Table:
    """Order, cast and complete a table so that it matches its schema exactly.

    Parameters
    ----------
    data : pandas.DataFrame, pyarrow.Table or mapping of column name -> array-like
        The rows; scalar values in a mapping are broadcast.
    table_name : str
        'DiaSource', 'DiaObject', 'DiaForcedSource' or 'Fake' (case-insensitive).
    extra : {'raise', 'drop'}
        What to do with columns the schema does not know: raise ``SchemaError`` (default:
        a typo or a stale name must not vanish silently) or drop them.

    Returns
    -------
    pyarrow.Table
        Columns in schema order with the schema's types, units and descriptions (field
        metadata). NaN in nullable floating-point columns becomes null; missing nullable
        columns are all null.

    Raises
    ------
    SchemaError
        Unknown columns (``extra='raise'``), a missing non-nullable column, nulls (or NaN)
        in a non-nullable column, or values that cannot be cast (e.g. 1.5 to an integer).
    """
    name = _table_name(table_name)
    schema = _SCHEMAS[name]
    if extra not in ("raise", "drop"):
        raise ValueError(f"extra must be 'raise' or 'drop', got {extra!r}")
    if isinstance(data, pa.Table):
        source = {c: data.column(c) for c in data.column_names}
        n = data.num_rows
    elif hasattr(data, "columns") and hasattr(data, "index"):  # pandas DataFrame
        source = {str(c): data[c] for c in data.columns}
        n = len(data.index)
    else:
        source = dict(data)
        lengths = {len(v) for v in source.values() if np.ndim(v) > 0 or isinstance(v, (pa.Array, pa.ChunkedArray))}
        if len(lengths) > 1:
            raise SchemaError(f"{name}: columns of different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else (1 if source else 0)
    known = set(schema.names)
    unknown = [c for c in source if c not in known]
    if unknown and extra == "raise":
        raise SchemaError(f"{name}: columns not in the schema: {', '.join(unknown)}")
    arrays = []
    for col in TABLES[name]:
        if col.name in source:
            arr = _to_arrow_array(source[col.name], n, col, name)
        elif col.nullable:
            arr = pa.nulls(n, col.type)
        else:
            raise SchemaError(f"{name}: required (non-nullable) column {col.name!r} is missing")
        if not col.nullable and arr.null_count:
            raise SchemaError(f"{name}.{col.name}: {arr.null_count} null/NaN values in a non-nullable column")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=schema)
