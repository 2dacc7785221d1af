"""Warping an exposure onto another pixel grid (docs/algorithms.md, templates: warping).

* Mapping: ``templates.mapping`` (exact at nodes every ``grid_spacing`` target pixels).
* Image: Lanczos-3 (``kernel="lanczos3"``; also lanczos2..5, "bilinear", or "cubic" = cubic
  B-spline interpolation, ``scipy.ndimage.map_coordinates`` order 3). The weights come from
  tables of 1024 sub-pixel phases (phase error <= 0.0005 px); each phase's Lanczos weights
  get the smallest correction that makes them reproduce constants, ramps and parabolas
  exactly (plain Lanczos-3 shifts centroids by up to 0.02 px with the phase). Taps are
  gathered in cache-sized chunks along the source rows (the target is traversed along the
  axis that follows them, whatever the rotation).
* Variance: ``(sum of the squared kernel weights) x (bilinear interpolation of the source
  variance)``: exactly ``sum(k^2 var)`` where the variance is constant over the kernel
  (sky-limited pixels), with 4 instead of 36 taps. Warping correlates the noise, so the
  per-pixel variance is lower than the input's (by 0.6-1.0 for Lanczos-3 with the phase);
  the covariance is not recorded.
* Mask: a target pixel gets every plane that any source pixel under its kernel footprint
  has. Target pixels whose footprint leaves the source or touches a NO_DATA (or
  non-finite) source pixel are NO_DATA with image 0 and variance 0 (0, not NaN, so FFT
  convolutions of a template stay finite; NO_DATA pixels must never be used).
* Flux: images hold flux per pixel, so they are multiplied by the Jacobian determinant of
  the target -> source mapping (the variance by its square): a star keeps its flux.
* PSF: the source PSF evaluated at source positions and resampled through the local affine
  part of the mapping (which holds the ~90 degree rotation and flip between DECam pixels
  and a north-up grid); a spatially varying model is sampled on a small grid over the
  covered area and refitted with the same polynomial order (at most 2).

Pixel coordinates are 0-based (x column, y row); images are flux per pixel (nJy for
calexps and coadds), variances in image units squared.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from apsnake.exposure import Exposure, PsfModel, add_mask_plane
from apsnake.numerics import lanczos, window_or
from apsnake.psf import measure_fwhm
from apsnake.templates.errors import TemplateError
from apsnake.templates.mapping import Mapping, compute_mapping, interp_matrix

_PHASE_BITS = 10

_PHASES = 1 << _PHASE_BITS  # sub-pixel phases of the kernel tables

_COORD_OFFSET = 64  # added to source coordinates so that int truncation is a floor

_CHUNK = 32768  # target pixels processed together (cache-sized)


@dataclass(frozen=True)
class _Kernel:
    name: str
    taps: int  # number of taps per axis
    lo: int  # taps below floor(x): they run over floor(x) - lo ... floor(x) - lo + taps - 1
    weights: np.ndarray | None  # (taps, _PHASES) float32, unit sum per phase; None: spline path
    sum_sq: np.ndarray  # (_PHASES,) float32: sum of squared weights per phase


@lru_cache(maxsize=None)
def _kernel(name: str) -> _Kernel:
    phase = (np.arange(_PHASES) + 0.5) / _PHASES
    m = re.fullmatch(r"lanczos([2-5])", name)
    if m:
        a = int(m.group(1))
        offsets = np.arange(-(a - 1), a + 1)
        w = np.stack([lanczos(phase - k, a) for k in offsets])
        # Smallest change making each phase's weights reproduce constants, linear ramps and
        # parabolas exactly: plain (even normalised) Lanczos-3 moves centroids by up to
        # 0.02 px and widens stars by up to 0.02 px^2, depending on the sub-pixel phase.
        for col in range(_PHASES):
            d = offsets - phase[col]
            A = np.stack([np.ones(len(offsets)), d, d * d])
            w[:, col] += A.T @ np.linalg.solve(A @ A.T, np.array([1.0, 0.0, 0.0]) - A @ w[:, col])
        return _Kernel(name, 2 * a, a - 1, w.astype(np.float32), (w**2).sum(axis=0).astype(np.float32))
    if name == "bilinear":
        w = np.stack([1.0 - phase, phase])
        return _Kernel(name, 2, 0, w.astype(np.float32), (w**2).sum(axis=0).astype(np.float32))
    if name == "cubic":
        # Cubic B-spline interpolation (prefiltered): the cardinal spline's weights, for the
        # variance; its 4x4 B-spline support is used for the mask footprint.
        from scipy import ndimage

        n = 41
        pos = n // 2 + phase
        w = []
        for k in range(n):
            coeffs = ndimage.spline_filter1d(np.eye(n)[k], order=3, mode="mirror")
            w.append(ndimage.map_coordinates(coeffs, [pos], order=3, prefilter=False, mode="mirror"))
        w = np.array(w)
        return _Kernel(name, 4, 1, None, (w**2).sum(axis=0).astype(np.float32))
    raise TemplateError(f"unknown warping kernel {name!r} (lanczos2..5, bilinear, cubic)")


def _lagrange_weights(nodes: np.ndarray, positions: np.ndarray):
    """4-node (fewer if there are fewer nodes) Lagrange interpolation weights.

    Returns the first node used at each position and the (N, m) weights on nodes
    ``first .. first + m - 1``.
    """
    m = min(4, len(nodes))
    k = np.clip(np.searchsorted(nodes, positions, side="right") - 1, 0, len(nodes) - 2)
    first = np.clip(k - 1, 0, len(nodes) - m)
    xs = nodes[first[:, None] + np.arange(m)]
    coef = np.ones((len(positions), m))
    for j in range(m):
        for l in range(m):
            if l != j:
                coef[:, j] *= (positions - xs[:, l]) / (xs[:, j] - xs[:, l])
    return first, coef


def _chunks(first_node: np.ndarray, size: int):
    """Consecutive (start, stop) runs of at most ``size`` positions sharing their first node."""
    n = len(first_node)
    breaks = np.flatnonzero(np.diff(first_node)) + 1
    edges = np.concatenate([[0], breaks, [n]])
    for lo_, hi_ in zip(edges[:-1], edges[1:]):
        for a in range(int(lo_), int(hi_), size):
            yield a, min(a + size, int(hi_))


def _combine(coef: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``coef @ rows`` for a few nodes, without BLAS: (N, m) x (m, L) -> (N, L)."""
    out = coef[:, 0, None] * rows[0]
    for j in range(1, coef.shape[1]):
        out += coef[:, j, None] * rows[j]
    return out


def _resample(mapping: Mapping, src_image, src_var, src_mask_dilated, nodata_bit: int, tgt_shape,
              kernel: _Kernel, spline_coeffs=None, origin=(0, 0)):
    """Resample image, variance and mask through the mapping; returns (image, var, mask, covered).

    The source planes may be a box of the source frame whose first pixel is at ``origin`` =
    (x0, y0) of the frame the mapping points into (``_source_box``).
    """
    ny_t, nx_t = tgt_shape
    ny_s, nx_s = src_image.shape
    ox, oy = (int(v) for v in origin)
    image = np.zeros(tgt_shape, np.float32)
    variance = np.zeros(tgt_shape, np.float32)
    mask = np.full(tgt_shape, nodata_bit, np.int32)
    covered = np.zeros(tgt_shape, bool)
    span_x, span_y = nx_s - kernel.taps, ny_s - kernel.taps  # allowed first-tap range 0..span
    if span_x < 0 or span_y < 0:
        return image, variance, mask, covered

    # Target bounding box of nodes that may map onto the source.
    jmax = float(np.nanmax(np.abs(mapping.jac))) if np.isfinite(mapping.jac).any() else 1.0
    step = max(float(np.max(np.diff(mapping.xn))), float(np.max(np.diff(mapping.yn))))
    reach = step * jmax * 1.5 + kernel.taps + 2
    near = (mapping.valid & (mapping.sx > ox - reach) & (mapping.sx < ox + nx_s - 1 + reach)
            & (mapping.sy > oy - reach) & (mapping.sy < oy + ny_s - 1 + reach))
    if not near.any():
        return image, variance, mask, covered
    rows, cols = np.nonzero(near)
    y0 = int(mapping.yn[max(rows.min() - 1, 0)])
    y1 = int(mapping.yn[min(rows.max() + 1, len(mapping.yn) - 1)]) + 1
    x0 = int(mapping.xn[max(cols.min() - 1, 0)])
    x1 = int(mapping.xn[min(cols.max() + 1, len(mapping.xn) - 1)]) + 1
    y1, x1 = min(y1, ny_t), min(x1, nx_t)

    # Orientation: chunks run along the target axis that follows the source rows (so the
    # gathers read memory nearly contiguously); in the transposed case work on .T views.
    jx = np.abs(mapping.jac[0, 0][mapping.valid]).mean() if mapping.valid.any() else 1.0
    jy = np.abs(mapping.jac[0, 1][mapping.valid]).mean() if mapping.valid.any() else 0.0
    transposed = jy > jx
    scale = float(_PHASES)
    det = np.abs(mapping.jac[0, 0] * mapping.jac[1, 1] - mapping.jac[0, 1] * mapping.jac[1, 0])
    # Node grids, stored pre-offset and pre-scaled so that interpolation directly gives
    # (coordinate + offset) * phases.
    grids = {
        "tx": (mapping.sx + _COORD_OFFSET) * scale,
        "ty": (mapping.sy + _COORD_OFFSET) * scale,
        "det": det,
    }
    bad_nodes = ~mapping.valid
    mesh_bad = None
    if bad_nodes.any():
        bad_meshes = bad_nodes[:-1, :-1] | bad_nodes[1:, :-1] | bad_nodes[:-1, 1:] | bad_nodes[1:, 1:]
        cy = np.clip(np.searchsorted(mapping.yn, np.arange(y0, y1), side="right") - 1, 0, bad_meshes.shape[0] - 1)
        cx = np.clip(np.searchsorted(mapping.xn, np.arange(x0, x1), side="right") - 1, 0, bad_meshes.shape[1] - 1)
        mesh_bad = bad_meshes[cy][:, cx]  # (bh, bw)
    # Along the inner axis a cubic spline (one matrix product per grid); along the outer
    # axis 4-node Lagrange weights, so that the chunk loop needs no BLAS call.
    if transposed:
        inner = {k: (interp_matrix(mapping.yn, ny_t)[y0:y1] @ g).T for k, g in grids.items()}  # (nxn, bh)
        outer_nodes, outer_range = mapping.xn, np.arange(x0, x1)
        views = (image[y0:y1, x0:x1].T, variance[y0:y1, x0:x1].T, mask[y0:y1, x0:x1].T,
                 covered[y0:y1, x0:x1].T)
        mesh_bad = mesh_bad.T if mesh_bad is not None else None
    else:
        inner = {k: g @ interp_matrix(mapping.xn, nx_t)[x0:x1].T for k, g in grids.items()}  # (nyn, bw)
        outer_nodes, outer_range = mapping.yn, np.arange(y0, y1)
        views = (image[y0:y1, x0:x1], variance[y0:y1, x0:x1], mask[y0:y1, x0:x1], covered[y0:y1, x0:x1])
    out_img, out_var, out_mask, out_cov = views
    n_outer, n_inner = out_img.shape
    per_chunk = max(1, _CHUNK // max(n_inner, 1))
    first_node, coef = _lagrange_weights(outer_nodes, outer_range)

    img_flat = np.ascontiguousarray(src_image, dtype=np.float32).ravel()
    var_flat = np.ascontiguousarray(src_var, dtype=np.float32).ravel()
    msk_flat = src_mask_dilated.ravel() if src_mask_dilated is not None else None
    taps, lo = kernel.taps, kernel.lo
    shift, phase_mask = _PHASE_BITS, _PHASES - 1
    sum_sq = kernel.sum_sq
    for a0, a1 in _chunks(first_node, per_chunk):
        k0 = first_node[a0]
        c = coef[a0:a1]
        tx = _combine(c, inner["tx"][k0:k0 + c.shape[1]]).ravel()
        ty = _combine(c, inner["ty"][k0:k0 + c.shape[1]]).ravel()
        itx = tx.astype(np.intp)
        ity = ty.astype(np.intp)
        ix = (itx >> shift) - (_COORD_OFFSET + lo + ox)  # first tap column of the source box
        iy = (ity >> shift) - (_COORD_OFFSET + lo + oy)
        px = itx & phase_mask
        py = ity & phase_mask
        inside = (ix.view(np.uintp) <= span_x) & (iy.view(np.uintp) <= span_y) & (tx > 0) & (ty > 0)
        if mesh_bad is not None:
            inside &= ~mesh_bad[a0:a1].ravel()
        if not inside.any():
            continue
        np.clip(ix, 0, span_x, out=ix)
        np.clip(iy, 0, span_y, out=iy)
        base = iy * nx_s + ix
        n = base.size
        # Image.
        if kernel.weights is not None:
            wxs = [np.take(kernel.weights[j], px) for j in range(taps)]
            acc = np.zeros(n, np.float32)
            row = np.empty(n, np.float32)
            tmp = np.empty(n, np.float32)
            for i in range(taps):
                np.take(img_flat[i * nx_s:], base, out=row, mode="wrap")
                row *= wxs[0]
                for j in range(1, taps):
                    np.take(img_flat[i * nx_s + j:], base, out=tmp, mode="wrap")
                    tmp *= wxs[j]
                    row += tmp
                row *= np.take(kernel.weights[i], py)
                acc += row
        else:
            from scipy import ndimage

            xs = tx / scale - (_COORD_OFFSET + ox)
            ys = ty / scale - (_COORD_OFFSET + oy)
            acc = ndimage.map_coordinates(spline_coeffs, [ys, xs], order=3, prefilter=False, mode="mirror",
                                          output=np.float32)
        # Variance: bilinear interpolation times the kernel's sum of squared weights.
        fx = (px.astype(np.float32) + 0.5) * np.float32(1.0 / _PHASES)
        fy = (py.astype(np.float32) + 0.5) * np.float32(1.0 / _PHASES)
        b0 = base + (lo * nx_s + lo)
        v = np.take(var_flat, b0, mode="wrap") * (1 - fx)
        v += np.take(var_flat[1:], b0, mode="wrap") * fx
        v *= 1 - fy
        v2 = np.take(var_flat[nx_s:], b0, mode="wrap") * (1 - fx)
        v2 += np.take(var_flat[nx_s + 1:], b0, mode="wrap") * fx
        v2 *= fy
        v += v2
        v *= np.take(sum_sq, px)
        v *= np.take(sum_sq, py)
        # Flux conservation: times the source-per-target pixel area (slowly varying: one
        # row per chunk).
        mid = (a0 + a1 - 1) // 2
        det_c = np.tile(_combine(coef[mid:mid + 1], inner["det"][k0:k0 + c.shape[1]]).astype(np.float32)[0],
                        a1 - a0)
        acc *= det_c
        v *= det_c * det_c
        m = np.take(msk_flat, base, mode="wrap") if msk_flat is not None else np.zeros(n, np.int32)
        good = inside & ((m & nodata_bit) == 0)
        acc[~good] = 0.0
        v[~good] = 0.0
        m = np.where(inside, m, nodata_bit).astype(np.int32)
        shape = (a1 - a0, n_inner)
        out_img[a0:a1] = acc.reshape(shape)
        out_var[a0:a1] = v.reshape(shape)
        out_mask[a0:a1] = m.reshape(shape)
        out_cov[a0:a1] = good.reshape(shape)
    return image, variance, mask, covered


def _resample_stamp(stamp: np.ndarray, jac: np.ndarray, size: int) -> np.ndarray:
    """A centred PSF stamp seen through a local affine map: ``out(u) = stamp(J u)``, unit sum.

    ``jac`` is d(source x, y)/d(target x, y); stamps are (rows, cols) with the PSF centred
    on the central pixel.
    """
    from scipy import ndimage

    c_s = (stamp.shape[0] - 1) / 2.0
    c_t = (size - 1) / 2.0
    v, u = np.mgrid[0:size, 0:size].astype(float)
    du, dv = u - c_t, v - c_t
    sx = jac[0, 0] * du + jac[0, 1] * dv + c_s
    sy = jac[1, 0] * du + jac[1, 1] * dv + c_s
    out = ndimage.map_coordinates(np.asarray(stamp, float), [sy, sx], order=3, mode="constant", cval=0.0)
    total = out.sum()
    return out / total if total != 0 else out


def _stamp_size(psf: PsfModel, jac: np.ndarray) -> int:
    """Odd target stamp size covering the source stamp through the map."""
    size = psf.components.shape[-1]
    try:
        stretch = float(np.linalg.norm(np.linalg.inv(jac), 2))
    except np.linalg.LinAlgError:
        stretch = 1.0
    n = int(math.ceil(size * max(stretch, 1e-3) - 1e-6))
    n = max(n, 3)
    return n if n % 2 == 1 else n + 1


def _warp_psf(psf: PsfModel | None, mapping: Mapping, covered: np.ndarray) -> PsfModel | None:
    """PsfModel of the warped exposure (see the module docstring)."""
    if psf is None or not covered.any():
        return None
    rows = np.flatnonzero(covered.any(axis=1))
    cols = np.flatnonzero(covered.any(axis=0))
    ylo, yhi, xlo, xhi = rows[0], rows[-1], cols[0], cols[-1]
    order = min(int(psf.spatial_order), 2)
    n_side = 1 if order == 0 else order + 2
    if n_side == 1:
        gx = np.array([0.5 * (xlo + xhi)])
        gy = np.array([0.5 * (ylo + yhi)])
    else:
        gx, gy = np.meshgrid(np.linspace(xlo, xhi, n_side), np.linspace(ylo, yhi, n_side))
        gx, gy = gx.ravel(), gy.ravel()
    # Snap each sample onto a covered pixel (a subsampled search keeps this cheap).
    step = max(1, int(math.sqrt(covered.size / 40000)))
    cy, cx = np.nonzero(covered[::step, ::step])
    cy, cx = cy * step, cx * step
    if cx.size == 0:
        cy, cx = np.nonzero(covered)
    pick = [int(np.argmin((cx - x) ** 2 + (cy - y) ** 2)) for x, y in zip(gx, gy)]
    px, py = cx[pick].astype(float), cy[pick].astype(float)
    sx, sy = mapping.source_at(px, py)
    jacs = mapping.partials_at(px, py)
    size = _stamp_size(psf, jacs[len(jacs) // 2])
    stamps = np.stack([_resample_stamp(psf.evaluate(x, y), j, size) for x, y, j in zip(sx, sy, jacs)])
    if n_side == 1:
        return PsfModel(components=stamps.astype(np.float32), spatial_order=0, x0=float(px[0]),
                        y0=float(py[0]), scale=1.0, fwhm_pixels=measure_fwhm(stamps[0]))
    x0, y0 = 0.5 * (xlo + xhi), 0.5 * (ylo + yhi)
    scale = max(0.5 * (xhi - xlo), 0.5 * (yhi - ylo), 1.0)
    model = PsfModel(components=np.zeros((1, size, size), np.float32), spatial_order=order, x0=x0, y0=y0,
                     scale=scale)
    design = np.stack([model.polynomial_terms(x, y) for x, y in zip(px, py)])
    coef, *_ = np.linalg.lstsq(design, stamps.reshape(len(stamps), -1), rcond=None)
    model.components = coef.reshape(-1, size, size).astype(np.float32)
    model.fwhm_pixels = measure_fwhm(model.evaluate(x0, y0))
    return model


def _source_box(mapping: Mapping, src_shape, taps: int) -> tuple[slice, slice]:
    """The box of the source frame that the target can read: the nodes' source positions
    (every target pixel maps inside their bounding box, the spline between nodes of a smooth
    map overshooting by far less than a pixel) widened by the kernel's reach and a margin,
    clipped to the frame. A CCD of a dithered visit covers only part of the science CCD, so
    only that part of it is converted, masked and dilated."""
    ny_s, nx_s = src_shape
    finite = np.isfinite(mapping.sx) & np.isfinite(mapping.sy)
    if not finite.any():
        return slice(0, 0), slice(0, 0)
    margin = taps + 16
    x0 = int(np.clip(math.floor(np.min(mapping.sx[finite])) - margin, 0, nx_s))
    x1 = int(np.clip(math.ceil(np.max(mapping.sx[finite])) + margin + 1, 0, nx_s))
    y0 = int(np.clip(math.floor(np.min(mapping.sy[finite])) - margin, 0, ny_s))
    y1 = int(np.clip(math.ceil(np.max(mapping.sy[finite])) + margin + 1, 0, ny_s))
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def warp_exposure(exposure: Exposure, target_wcs, target_shape, grid_spacing: int = 64,
                  kernel: str = "lanczos3") -> Exposure:
    """Resample an exposure onto another pixel grid.

    Parameters
    ----------
    exposure : Exposure
        Source, with a WCS (TAN-SIP for calexps); image in flux per pixel (nJy for a calexp).
    target_wcs : astropy.wcs.WCS
        WCS of the target grid (0-based pixel frame as everywhere in apsnake).
    target_shape : tuple of int
        (ny, nx) of the target grid, pixels.
    grid_spacing : int
        Spacing of the nodes where the target -> source mapping is computed exactly,
        target pixels; interpolated by a cubic spline in between.
    kernel : str
        "lanczos3" (default; also "lanczos2", "lanczos4", "lanczos5"), "bilinear", or
        "cubic" (cubic B-spline interpolation with ``scipy.ndimage.map_coordinates``).

    Returns
    -------
    Exposure
        On the target grid: image (flux per target pixel, flux-conserving), variance
        (per-pixel variance, see the module docstring), mask (source planes over the kernel
        footprint; NO_DATA with image 0 and variance 0 where the footprint leaves the source
        or touches NO_DATA), ``wcs = target_wcs``, the warped PSF, the source's visit info,
        detector, unit and photometric calibration. Metadata: ``WARPKERN`` (kernel) and
        ``WARPCOV`` (covered fraction of the target).

    Raises
    ------
    TemplateError
        Without a WCS, with a bad shape or an unknown kernel.
    """
    if exposure.wcs is None:
        raise TemplateError(f"warp_exposure: exposure {exposure.data_id} has no WCS")
    ny_t, nx_t = (int(v) for v in target_shape)
    if ny_t <= 0 or nx_t <= 0:
        raise TemplateError(f"warp_exposure: bad target shape {target_shape}")
    if int(grid_spacing) < 2:
        raise TemplateError(f"warp_exposure: grid_spacing must be >= 2, got {grid_spacing}")
    kern = _kernel(str(kernel))
    mapping = compute_mapping(exposure.wcs, exposure.shape, target_wcs, (ny_t, nx_t), int(grid_spacing))

    planes = dict(exposure.mask_planes)
    nodata_bit = add_mask_plane(planes, "NO_DATA")  # on a copy: never modify the input exposure
    # Only the part of the source that the target reads (the whole of it for the spline path,
    # whose prefilter sees the whole image); planes may be memory maps in the file's byte
    # order: converted here, box only.
    box = _source_box(mapping, exposure.shape, kern.taps) if kern.weights is not None else np.s_[:, :]
    src_image = np.ascontiguousarray(exposure.image[box], dtype=np.float32)
    src_var = np.ascontiguousarray(exposure.variance[box], dtype=np.float32)
    src_mask = np.ascontiguousarray(exposure.mask[box], dtype=np.int32)
    origin = (box[1].start or 0, box[0].start or 0)
    finite = np.isfinite(src_image) & np.isfinite(src_var)
    if not finite.all():
        src_mask = src_mask | np.where(finite, 0, nodata_bit).astype(np.int32)  # never the input's array
    dilated = window_or(src_mask, 0, kern.taps - 1) if src_mask.any() else None
    coeffs = None
    if kern.weights is None:
        from scipy import ndimage

        coeffs = ndimage.spline_filter(np.where(finite, src_image, 0.0).astype(np.float64), order=3,
                                       mode="mirror")
    image, variance, mask, covered = _resample(mapping, src_image, src_var, dilated, nodata_bit,
                                               (ny_t, nx_t), kern, coeffs, origin=origin)
    psf = _warp_psf(exposure.psf, mapping, covered)
    metadata = dict(exposure.metadata)
    metadata["WARPKERN"] = kern.name
    metadata["WARPCOV"] = float(covered.mean())
    return Exposure(
        image=image, mask=mask, variance=variance, visit_info=replace(exposure.visit_info),
        detector=exposure.detector, detector_name=exposure.detector_name, unit=exposure.unit,
        wcs=target_wcs.deepcopy(), psf=psf,
        photo_calib=replace(exposure.photo_calib) if exposure.photo_calib is not None else None,
        mask_planes=planes, metadata=metadata,
    )
