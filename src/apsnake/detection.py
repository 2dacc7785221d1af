"""Source detection and measurement on a background-subtracted image, and cosmic rays.

Detection uses sep (SExtractor's core) with a PSF-matched filter, as Rubin smooths with the
PSF before thresholding (docs/algorithms.md §2.4). Cosmic rays follow the logic of
Rubin's findCosmicRays (meas_algorithms, defaults minSigma=6, min_DN=150, cond3_fac=2,
cond3_fac2=0.35): a pixel is a cosmic ray when it stands out from its neighbours more
sharply than the PSF allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CosmicRayConfig:
    """Rubin findCosmicRays defaults.

    min_sigma: detection threshold above background, in noise sigma.
    min_dn: minimum excess above background, image unit. Rubin uses min_DN=150 ADU; DECam's
        250-um CCDs see many hits of 200-600 e- (50-150 ADU) that would then stay on the sky
        and come back as DIA sources, so we rely on min_sigma and the sharpness test and
        keep only a low floor.
    cond3_fac: noise allowance (in sigma) when comparing with the neighbours.
    cond3_fac2: a pixel is a CR when its neighbours are fainter than this fraction of what
        the PSF would put there.
    grow_sigma: neighbours of a CR above this many sigma join it.
    """

    min_sigma: float = 6.0
    min_dn: float = 30.0
    cond3_fac: float = 2.0
    cond3_fac2: float = 0.35
    grow_sigma: float = 3.0
    n_grow: int = 3


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, psf_sigma: float,
                     bad: np.ndarray | None = None, config: CosmicRayConfig | None = None) -> np.ndarray:
    """Boolean mask of cosmic-ray pixels in a background-subtracted image.

    A pixel p is a candidate when p > min_sigma * sigma and p > min_dn; it is a cosmic ray
    when, along at least one of the four axes through it, the mean of its two neighbours
    (plus cond3_fac sigma) is below cond3_fac2 times what a PSF of width ``psf_sigma``
    (pixels) centred on it would put at that distance (p minus cond3_fac sigma, scaled by
    the PSF). Stars, being at least PSF-wide, fail this test; single-pixel hits and tracks
    pass it along the axis across the track. A track two pixels wide has a bright neighbour
    across it too, so the same test is also made with the pixels two away along the row and
    the column (not the diagonals: at 2.8 px a sharp star's PSF ratio is too small to tell).

    CR footprints are then grown (n_grow steps) into adjacent pixels above grow_sigma, and
    by one last ring of pixels above grow_sigma / 2.
    """
    config = config or CosmicRayConfig()
    img = np.asarray(image, np.float32)
    sigma = np.sqrt(np.maximum(np.asarray(variance, np.float32), 1e-12))
    cand = (img > config.min_sigma * sigma) & (img > config.min_dn)
    if bad is not None:
        cand &= ~bad
    cand[:2, :] = cand[-2:, :] = cand[:, :2] = cand[:, -2:] = False
    ys, xs = np.nonzero(cand)
    if ys.size == 0:
        return np.zeros(img.shape, bool)
    p = img[ys, xs]
    sp = sigma[ys, xs]
    is_cr = np.zeros(ys.size, bool)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0)):
        dist2 = dy * dy + dx * dx
        psf_ratio = np.exp(-0.5 * dist2 / psf_sigma**2)
        a = img[ys + dy, xs + dx]
        b = img[ys - dy, xs - dx]
        mean = 0.5 * (a + b)
        smean = 0.5 * np.sqrt(sigma[ys + dy, xs + dx] ** 2 + sigma[ys - dy, xs - dx] ** 2)
        is_cr |= (mean + config.cond3_fac * smean) < config.cond3_fac2 * psf_ratio * (p - config.cond3_fac * sp)
    crs = np.zeros(img.shape, bool)
    crs[ys[is_cr], xs[is_cr]] = True
    if not crs.any():
        return crs
    from scipy import ndimage

    above = img > config.grow_sigma * sigma
    square = np.ones((3, 3), bool)  # diagonal neighbours belong to a track too

    # Grow inside small boxes around the hits only: a few hundred CRs cover < 1% of a CCD.
    labels, _ = ndimage.label(crs, structure=square)
    pad = config.n_grow + 1
    out = crs.copy()
    for box in ndimage.find_objects(labels):
        ys = slice(max(box[0].start - pad, 0), box[0].stop + pad)
        xs = slice(max(box[1].start - pad, 0), box[1].stop + pad)
        sub = crs[ys, xs]
        for _ in range(config.n_grow):
            grown = ndimage.binary_dilation(sub, structure=square) & above[ys, xs]
            if (grown == sub).all():
                break
            sub = sub | grown
        out[ys, xs] |= sub | (ndimage.binary_dilation(sub, structure=square)
                              & (img[ys, xs] > 0.5 * config.grow_sigma * sigma[ys, xs]))
    return out


@dataclass
class DetectionConfig:
    """threshold: detection threshold in sigma of the PSF-filtered image (Rubin 5);
    min_area: minimum footprint, pixels; aperture_radius: aperture flux radius, pixels
    (Rubin base_CircularApertureFlux_12_0)."""

    threshold: float = 5.0
    min_area: int = 5
    deblend_cont: float = 0.005
    aperture_radius: float = 12.0


# Mask planes summarised per source: (column suffix, planes). "Center" looks at the 3x3
# pixels around the centroid, the plain flag at the whole footprint.
FLAG_PLANES = {
    "bad": ("BAD",), "saturated": ("SAT",), "interpolated": ("INTRP",), "cr": ("CR",),
    "edge": ("EDGE",), "suspect": ("SUSPECT",), "nodata": ("NO_DATA",),
}


def smooth_for_detection(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, psf_sigma: float):
    """The PSF-smoothed image and its noise (Rubin detects on the image convolved with the
    PSF, thresholding in units of the smoothed image's noise).

    Masked pixels count as zero signal. The noise is sqrt(sum_i k_i^2 var_i) for the
    Gaussian kernel k of width ``psf_sigma`` (pixels). Returns float32 arrays.
    """
    from scipy import ndimage

    data = np.where(bad, 0.0, image).astype(np.float32)
    var = np.where(bad | ~np.isfinite(variance), 0.0, variance).astype(np.float32)
    # Zero padding outside the image and on masked pixels, for the image and the variance
    # alike: sum(k^2 var) = gaussian_filter(var, sigma / sqrt(2)) / (4 pi sigma^2) exactly,
    # so the noise stays right at the edges and around masks (reflected edges would count
    # pixels twice and underestimate it).
    smoothed = ndimage.gaussian_filter(data, psf_sigma, truncate=3.0, mode="constant")
    noise = np.sqrt(np.maximum(ndimage.gaussian_filter(var, psf_sigma / np.sqrt(2.0), truncate=4.2, mode="constant"),
                               0.0)) / np.float32(2.0 * np.sqrt(np.pi) * psf_sigma)
    noise[bad] = np.inf
    return smoothed, noise.astype(np.float32)


def detect_and_measure(image: np.ndarray, variance: np.ndarray, mask: np.ndarray, mask_planes: dict[str, int],
                       psf_sigma: float, config: DetectionConfig | None = None, bad_planes=("BAD", "NO_DATA"),
                       smoothed=None):
    """Detect sources above ``threshold`` sigma of the PSF-smoothed image and measure them.

    Parameters
    ----------
    image, variance : background-subtracted image and its variance (any linear unit).
    mask, mask_planes : the exposure's mask and plane numbers.
    psf_sigma : Gaussian-equivalent PSF width, pixels.
    smoothed : optional ``(smoothed_image, smoothed_noise)`` from ``smooth_for_detection``
        (computed when not given).

    Returns
    -------
    table : pandas DataFrame, one row per source: ``x, y`` (0-based pixels, windowed
        centroid), ``xErr, yErr`` (pixels), ``apFlux, apFluxErr`` (image unit, radius
        ``aperture_radius``), ``ixx, iyy, ixy`` (pixel^2, PSF-smoothing removed), ``peak``,
        ``npix``, ``snr`` (peak significance in the smoothed image, Rubin's detection
        S/N), ``isoFlux``, ``sepFlag``, and boolean ``pixelFlags_<name>[Center]``.
    footprints : boolean image of the detection footprints (Rubin's DETECTED).
    """
    import pandas as pd
    import sep

    config = config or DetectionConfig()
    bits = 0
    for name in bad_planes:
        if name in mask_planes:
            bits |= 1 << mask_planes[name]
    masked = np.ascontiguousarray((mask & bits) != 0)
    if smoothed is None:
        smoothed = smooth_for_detection(image, variance, masked, psf_sigma)
    smooth, noise = (np.ascontiguousarray(a, np.float32) for a in smoothed)
    sep.set_extract_pixstack(10_000_000)
    sep.set_sub_object_limit(4096)
    objects, segmap = sep.extract(smooth, config.threshold, err=noise, mask=masked, minarea=config.min_area,
                                  filter_kernel=None, deblend_cont=config.deblend_cont, segmentation_map=True)
    n = len(objects)
    ny, nx = image.shape
    ixp = np.clip(objects["xpeak"], 0, nx - 1)
    iyp = np.clip(objects["ypeak"], 0, ny - 1)
    s2 = psf_sigma * psf_sigma
    table = pd.DataFrame({
        "x": objects["x"], "y": objects["y"],
        "ixx": objects["x2"] - s2, "iyy": objects["y2"] - s2, "ixy": objects["xy"],
        "peak": objects["peak"], "npix": objects["npix"], "isoFlux": objects["flux"],
        "snr": smooth[iyp, ixp] / noise[iyp, ixp],
        "sepFlag": objects["flag"].astype(np.int32),
    })
    footprints = segmap > 0
    if n == 0:
        for col in ("xErr", "yErr", "apFlux", "apFluxErr"):
            table[col] = np.empty(0)
        return table, footprints
    data = np.ascontiguousarray(image, np.float32)
    err = np.ascontiguousarray(np.sqrt(np.where(np.isfinite(variance) & (variance > 0), variance, 0)), np.float32)
    # Windowed centroids on the unsmoothed image (sep.winpos) are more precise.
    sig = np.full(n, max(psf_sigma, 1.0))
    wx, wy, wflag = sep.winpos(data, objects["x"], objects["y"], sig, mask=masked)
    ok = (wflag == 0) & np.isfinite(wx) & np.isfinite(wy) & (np.hypot(wx - objects["x"], wy - objects["y"]) < 2.0)
    table["x"] = np.where(ok, wx, objects["x"])
    table["y"] = np.where(ok, wy, objects["y"])
    ap, ap_err, ap_flag = sep.sum_circle(data, table["x"].to_numpy(), table["y"].to_numpy(), config.aperture_radius,
                                         err=err, mask=masked, subpix=5)
    table["apFlux"], table["apFluxErr"] = ap, ap_err
    table["apFlux_flag"] = ap_flag != 0
    # Centroid errors: sigma_PSF / S/N per axis (adequate for weighting astrometric fits).
    table["xErr"] = table["yErr"] = np.maximum(psf_sigma, 0.5) / np.maximum(table["snr"], 1.0)
    _pixel_flags(table, mask, mask_planes, segmap, n)
    return table, footprints


def _pixel_flags(table, mask, mask_planes, segmap, n) -> None:
    ny, nx = mask.shape
    xi = np.clip(np.round(table["x"].to_numpy()).astype(int), 0, nx - 1)
    yi = np.clip(np.round(table["y"].to_numpy()).astype(int), 0, ny - 1)
    inside = np.flatnonzero(segmap.ravel())  # footprint pixels only: a few % of the image
    labels = segmap.ravel()[inside]
    mask_in = mask.ravel()[inside]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    centre_values = [mask[np.clip(yi + dy, 0, ny - 1), np.clip(xi + dx, 0, nx - 1)] for dy, dx in offsets]
    for name, planes in FLAG_PLANES.items():
        bits = 0
        for plane in planes:
            if plane in mask_planes:
                bits |= 1 << mask_planes[plane]
        counts = np.bincount(labels, weights=(mask_in & bits) != 0, minlength=n + 1)[1:n + 1]
        table[f"pixelFlags_{name}"] = counts > 0
        centre = np.zeros(len(xi), bool)
        for values in centre_values:
            centre |= (values & bits) != 0
        table[f"pixelFlags_{name}Center"] = centre
    table["pixelFlags_offimage"] = (table["x"] < 0) | (table["x"] > nx - 1) | (table["y"] < 0) | (table["y"] > ny - 1)
