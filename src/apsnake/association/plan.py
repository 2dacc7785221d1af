"""Sky cells for association ordering (docs/architecture.md §5).

The sky is cut into nested HEALPix pixels ("cells") at ``order`` (``nside = 2**order``); at the
default order 9 a cell is about 6.9 arcmin across, smaller than a DECam CCD (9 x 18 arcmin).
Each data ID touches the cells under its footprint, padded by the association radius plus the
uncertainty of the raw pointing. For every cell, the visits touching it, sorted by (MJD,
visit), form a chain; the association of a data ID runs after the data IDs of the previous
visit in every cell it touches. Data IDs that share no cell associate in parallel, and so do
the detectors of one visit: they do not overlap on the sky, so no position is seen by two of
them and they can never share a DiaObject (``apdb.load_history`` does not read them either).
Chaining them would also serialise a whole focal plane and make the DAG as deep as visits x
detectors (Snakemake recurses two frames per chained job: rules/common.smk raises Python's
limit, but depth still costs); it is as deep as the visits instead.

Everything here works from the registry (footprint corners from the raw header WCS), so the
order is known before any job runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from apsnake.sphere import gnomonic, inverse_gnomonic, mean_direction

DEFAULT_ORDER = 9
#: Pointing error of a raw header WCS that the padding must absorb (arcsec); our astrometric
#: matcher tolerates 90 arcsec, real DECam raws are usually within 20 arcsec.
DEFAULT_PAD_ARCSEC = 60.0


@functools.lru_cache(maxsize=None)
def _healpix(order: int):
    from astropy_healpix import HEALPix

    if not 0 <= int(order) <= 29:
        raise ValueError(f"HEALPix order {order} outside 0..29")
    return HEALPix(nside=2 ** int(order), order="nested")


@functools.lru_cache(maxsize=None)
def cell_size_arcsec(order: int) -> float:
    """Typical side of a cell at ``order`` (square root of its area), arcsec."""
    return float(_healpix(order).pixel_resolution.to_value("arcsec"))


def cells_of(ra_deg, dec_deg, order: int = DEFAULT_ORDER) -> np.ndarray:
    """Nested HEALPix index (int64) at ``order`` of each position (ra, dec in degrees, ICRS)."""
    import astropy.units as u

    ra = np.atleast_1d(np.asarray(ra_deg, dtype=float))
    dec = np.atleast_1d(np.asarray(dec_deg, dtype=float))
    if ra.size == 0:
        return np.zeros(0, dtype=np.int64)
    index = _healpix(order).lonlat_to_healpix(np.mod(ra, 360.0) * u.deg, np.clip(dec, -90, 90) * u.deg)
    return np.asarray(index, dtype=np.int64)


def footprint_cells(corners_deg, order: int = DEFAULT_ORDER, pad_arcsec: float = DEFAULT_PAD_ARCSEC) -> np.ndarray:
    """Sorted unique cells touched by a footprint padded by ``pad_arcsec``.

    ``corners_deg`` is a (4, 2) array of (ra, dec) corners in degrees. The footprint is
    taken as the bounding box of the corners in the tangent plane at their mean, grown by
    the pad on every side, and sampled on a grid with a spacing of a quarter of a cell plus
    its border at 1/32 of a cell: a cell that clips the box by less than ~1/64 of a cell
    (about 6 arcsec at order 9) may be missed, which the pad (far larger than the association
    radius) absorbs.
    """
    corners = np.asarray(corners_deg, dtype=float).reshape(-1, 2)
    if not np.all(np.isfinite(corners)):
        raise ValueError("footprint corners are not finite (no usable WCS in the raw header)")
    ra0, dec0 = mean_direction(corners[:, 0], corners[:, 1])
    xi, eta, _ = gnomonic(corners[:, 0], corners[:, 1], ra0, dec0)
    pad = pad_arcsec / 3600.0
    step = cell_size_arcsec(order) / 4.0 / 3600.0
    xs = _axis(xi.min() - pad, xi.max() + pad, step)
    ys = _axis(eta.min() - pad, eta.max() + pad, step)
    gx, gy = np.meshgrid(xs, ys)
    fine_x = _axis(xs[0], xs[-1], step / 8)
    fine_y = _axis(ys[0], ys[-1], step / 8)
    border_x = np.concatenate([fine_x, fine_x, np.full(fine_y.size, xs[0]), np.full(fine_y.size, xs[-1])])
    border_y = np.concatenate([np.full(fine_x.size, ys[0]), np.full(fine_x.size, ys[-1]), fine_y, fine_y])
    ra, dec = inverse_gnomonic(np.concatenate([gx.ravel(), border_x]),
                               np.concatenate([gy.ravel(), border_y]), ra0, dec0)
    return np.unique(cells_of(ra, dec, order))


def _axis(lo: float, hi: float, step: float) -> np.ndarray:
    n = max(int(np.ceil((hi - lo) / step)), 1)
    return np.linspace(lo, hi, n + 1)


DataId = tuple[int, int]


@dataclass
class AssociationPlan:
    """Cells and chain predecessors of every data ID of one workflow run.

    ``cells[data_id]`` are the sorted cells it touches; ``predecessors[data_id]`` the data IDs
    of the previous visit in any of its cells' chains (sorted); ``key[data_id]`` its sort key,
    (MJD TAI, visit, detector).
    """

    order: int
    pad_arcsec: float
    cells: dict[DataId, list[int]] = field(default_factory=dict)
    predecessors: dict[DataId, list[DataId]] = field(default_factory=dict)
    key: dict[DataId, tuple[float, int, int]] = field(default_factory=dict)


def association_plan(exposures, data_ids, order: int = DEFAULT_ORDER,
                     pad_arcsec: float = DEFAULT_PAD_ARCSEC) -> AssociationPlan:
    """Cells and per-cell chains for ``data_ids`` from the registry's exposures table.

    ``exposures`` needs the columns visit, detector, mjd_mid_tai and the footprint corners
    ra_ll/dec_ll ... ra_ul/dec_ul (degrees). Each data ID depends only on the data IDs of the
    immediately preceding visit in each of its cells (a handful), so the number of edges grows
    linearly with the data IDs.
    """
    wanted = {(int(v), int(d)) for v, d in data_ids}
    plan = AssociationPlan(order=int(order), pad_arcsec=float(pad_arcsec))
    rows = exposures[[(int(v), int(d)) in wanted for v, d in zip(exposures["visit"], exposures["detector"])]]
    chains: dict[int, list[tuple[tuple[float, int, int], DataId]]] = {}
    for row in rows.itertuples(index=False):
        data_id = (int(row.visit), int(row.detector))
        corners = [(getattr(row, f"ra_{c}"), getattr(row, f"dec_{c}")) for c in ("ll", "lr", "ur", "ul")]
        try:
            cells = footprint_cells(corners, order, pad_arcsec)
        except ValueError:
            # No usable footprint in the raw header: the data ID cannot be calibrated either,
            # and must not stop the DAG of the others; it takes part in no chain, and its
            # association (if it ever gets that far) fails naming the reason.
            cells = np.zeros(0, dtype=np.int64)
        key = (float(row.mjd_mid_tai), data_id[0], data_id[1])
        plan.cells[data_id] = [int(c) for c in cells]
        plan.key[data_id] = key
        for cell in cells:
            chains.setdefault(int(cell), []).append((key, data_id))
    preds: dict[DataId, set[DataId]] = {d: set() for d in plan.cells}
    for members in chains.values():
        members.sort()
        visits: list[list[DataId]] = []  # members grouped by visit, in time order
        for i, (key, data_id) in enumerate(members):
            if i == 0 or key[:2] != members[i - 1][0][:2]:
                visits.append([])
            visits[-1].append(data_id)
        for earlier, later in zip(visits[:-1], visits[1:]):
            for data_id in later:
                preds[data_id].update(earlier)
    plan.predecessors = {d: sorted(p) for d, p in preds.items()}
    return plan
