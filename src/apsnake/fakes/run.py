"""Fakes of one data ID: place, inject into copies of the calexp and the difference image,
detect and measure as ``detect_dia_sources`` does, match, tabulate (``schema`` table ``Fake``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from apsnake import schema
from apsnake.fakes.config import FakesConfig
from apsnake.fakes.inject import expected_snr_sigma, render_fakes
from apsnake.fakes.match import match_fakes
from apsnake.fakes.place import Placement, place_fakes
from apsnake.ids import dia_source_ids
from apsnake.photometry import AB_NJY_ZERO_POINT

log = logging.getLogger(__name__)


@dataclass
class FakesResult:
    """What ``run_fakes`` returns.

    ``table``: the ``Fake`` table (one row per fake); ``dia_sources``: the DiaSource table of
    the run with the fakes (real sources included; never written to the APDB); ``science`` and
    ``difference``: the calexp and difference image with the fakes (None when nothing was
    injected).
    """

    table: object
    dia_sources: object = None
    science: object = None
    difference: object = None

    @property
    def n_injected(self) -> int:
        return int(self.table.num_rows)

    @property
    def n_recovered(self) -> int:
        return int(np.count_nonzero(self.table.column("recovered").to_numpy(zero_copy_only=False)))


def _light_copy(exposure):
    """A copy with its own image, mask and mask planes; the variance plane (unchanged by
    injection) is shared."""
    return replace(exposure, image=np.array(exposure.image, np.float32, copy=True),
                   mask=np.array(exposure.mask, np.int32, copy=True), mask_planes=dict(exposure.mask_planes),
                   metadata=dict(exposure.metadata))


def _rng(config: FakesConfig, visit: int, detector: int) -> np.random.Generator:
    return np.random.default_rng([int(config.seed), int(visit), int(detector)])


def fake_table(difference, placement: Placement, flux, snr, index=None, separation=None, dia_sources=None):
    """The ``Fake`` table of placed fakes and (optionally) their matches."""
    n = len(placement)
    vi = difference.visit_info
    visit, detector = int(vi.visit), int(difference.detector)
    if n and difference.wcs is not None:
        ra, dec = difference.wcs.all_pix2world(placement.x, placement.y, 0)
    else:
        ra = dec = np.full(n, np.nan)
    index = np.full(n, -1) if index is None else index
    separation = np.full(n, np.nan) if separation is None else separation
    found = index >= 0
    cols = {"diaSourceId": pa_nullable_int(n), "psfFlux": np.full(n, np.nan), "psfFluxErr": np.full(n, np.nan)}
    if dia_sources is not None and found.any():
        rows = index[found]
        ids = np.asarray(dia_sources.column("diaSourceId").to_numpy(zero_copy_only=False), np.int64)[rows]
        cols["diaSourceId"] = pa_nullable_int(n, found, ids)
        for name in ("psfFlux", "psfFluxErr"):
            values = np.asarray(dia_sources.column(name).to_numpy(zero_copy_only=False), float)
            cols[name][found] = values[rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = -2.5 * np.log10(flux) + AB_NJY_ZERO_POINT
    data = {
        "fakeId": dia_source_ids(visit, detector, n), "visit": np.full(n, visit, np.int64),
        "detector": np.full(n, detector, np.int64), "band": np.array([vi.band or None] * n, dtype=object),
        "midpointMjdTai": np.full(n, vi.mjd_mid_tai), "x": placement.x, "y": placement.y, "ra": ra, "dec": dec,
        "injectedFlux": flux, "injectedMag": mag, "expectedSnr": snr, "onHost": placement.on_host,
        "recovered": found, "separation": np.where(found, separation, np.nan), **cols,
    }
    return schema.conform(data, "Fake")


def pa_nullable_int(n, where=None, values=None):
    """An int64 Arrow array of length n, null except at ``where`` (set to ``values``)."""
    import pyarrow as pa

    out = np.zeros(n, np.int64)
    valid = np.zeros(n, bool) if where is None else np.asarray(where, bool)
    if values is not None:
        out[valid] = values
    return pa.array(out, mask=~valid, type=pa.int64())


def run_fakes(science, difference, matched_template, src=None, config: FakesConfig | None = None,
              dia_config=None, *, diffim_metadata: dict | None = None,
              time_processed_mjd: float | None = None) -> FakesResult:
    """Inject PSF-shaped fakes into one data ID, detect and measure them as the pipeline does,
    and match them.

    Method (docs/algorithms.md, Fakes): positions from ``place_fakes`` with a generator seeded by
    (``seed``, visit, detector); expected S/N drawn log-uniform in [``snr_min``, ``snr_max``]
    and turned into a flux with the optimal PSF-fit error of the difference image at the
    position (``expected_snr_sigma``); each fake rendered with the calexp PSF into a copy of the
    calexp and with the difference PSF into a copy of the difference image (``inject``
    explains why that equals re-running the subtraction with the same kernel), both copies
    marked ``INJECTED`` on the fakes' footprints; then ``detect_dia_sources(difference copy,
    calexp copy, matched_template, dia_config)`` and ``match_fakes``. No noise is added.

    Parameters
    ----------
    science : Exposure
        The calexp (nJy, PSF model, aperture correction in its metadata).
    difference : Exposure
        Its difference image (diffexp) with the difference PSF model and WCS.
    matched_template : Exposure
        The PSF-matched template, passed on to ``detect_dia_sources``.
    src : pandas.DataFrame, optional
        The calexp's source table (``x``, ``y``, ``ixx``, ``iyy``, ``snr``, ``psfFlux``,
        ``apFlux``, ``apFluxErr``, pixel flags) for hosts and bright stars; None: no hosts, no
        stars avoided.
    config : FakesConfig, optional
    dia_config : DiaConfig, optional
        The options of the pipeline's own detection (config ``dia``).
    diffim_metadata : dict, optional
        The diffexp's JSON metadata: ``skipped`` true gives an empty table.
    time_processed_mjd : float, optional
        Passed on to ``detect_dia_sources``.

    Returns
    -------
    FakesResult
        ``table`` conforms to ``schema`` table ``Fake``; fluxes in nJy on the DiaSource
        ``psfFlux`` scale, positions 0-based px and degrees.
    """
    from apsnake.dia import detect_dia_sources
    from apsnake.photometry import aperture_correction_at

    cfg = config or FakesConfig()
    if (diffim_metadata or {}).get("skipped") or difference.metadata.get("DIFFSKIP"):
        return FakesResult(schema.empty_table("Fake"))
    visit, detector = int(difference.visit_info.visit), int(difference.detector)
    rng = _rng(cfg, visit, detector)
    placement = place_fakes(difference, src, cfg, rng)
    n = len(placement)
    if n == 0:
        log.warning("data ID %s: no room for fakes", difference.data_id)
        return FakesResult(fake_table(difference, placement, np.empty(0), np.empty(0)))
    snr = np.exp(rng.uniform(np.log(cfg.snr_min), np.log(cfg.snr_max), n))
    sigma = expected_snr_sigma(difference, placement.x, placement.y, cfg.bad_planes)
    apcorr = aperture_correction_at(science, placement.x, placement.y)
    amplitude_njy = snr * sigma * difference.njy_per_unit("difference image")  # PSF-model flux, nJy
    flux = amplitude_njy * apcorr

    sci = _light_copy(science)
    diff = _light_copy(difference)
    render_fakes(sci, placement.x, placement.y, amplitude_njy / sci.njy_per_unit("science image"))
    render_fakes(diff, placement.x, placement.y, amplitude_njy / diff.njy_per_unit("difference image"))
    sources = detect_dia_sources(diff, sci, matched_template, dia_config, time_processed_mjd=time_processed_mjd)
    index, separation = match_fakes(placement.x, placement.y, sources, cfg.match_radius)
    table = fake_table(difference, placement, flux, snr, index, separation, sources)
    result = FakesResult(table, sources, sci, diff)
    log.info("data ID %s: %d fakes injected (%d on hosts), %d recovered", difference.data_id, n,
             int(placement.on_host.sum()), result.n_recovered)
    return result
