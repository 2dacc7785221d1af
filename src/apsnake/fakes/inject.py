"""Rendering fakes into a calexp and its difference image, and their expected S/N.

Why this is exact (for a fixed kernel). The Alard-Lupton difference is linear in the science
image: with the template convolved (``diffim.convolve`` = template, the default when the science
PSF is the wider), ``D = phi * (S - K * T)`` with the fitted kernel ``K`` and the decorrelation
filter ``phi`` both fixed once fitted, so a point source of flux ``f`` added to ``S`` adds
``f * (phi * P_S)`` to ``D``. ``phi * P_S`` is exactly the PSF model written with the diffexp
(``decorrelation`` convolves the science PSF's pixel-basis components with ``phi``, whose sum is
1, and the model is evaluated at unit sum), so rendering ``f`` times the diffexp PSF into a copy
of the diffexp gives what re-running the subtraction on the calexp with the fake would give,
without the cost of the kernel fit and the convolutions. When the science image is convolved,
``D = phi * (K * S - T) / k`` (``k`` the kernel sum at the centre): the fake enters as
``f * phi * K * P_S / k``, which the diffexp PSF (``phi`` times the template PSF) describes to the
accuracy of the kernel fit, the same approximation every real source of that image is measured
with. ZOGY is linear in the science image too, with its own difference PSF as the written model.

What is not reproduced: a fake does not change the kernel (it would not: kernel stars are bright,
isolated and constant), and no noise is added (the fakes are faint, so sky noise dominates their
own photon noise, and the images' variance planes are left as they are).

Flux scale: ``injectedFlux`` is on the scale of DiaSource ``psfFlux``, which is the PSF-model
flux times the science image's aperture correction at the source (as for real sources, whose
nJy scale is set on aperture-corrected fluxes). A fake of flux ``F`` is therefore rendered as
``F / apcorr(x, y)`` times the unit-sum PSF model, in each image's own unit.
"""

from __future__ import annotations

import numpy as np

from apsnake.numerics import cutouts
from apsnake.psf.shift import shift_stack

#: INJECTED footprint: stamp pixels where the rendered PSF reaches this fraction of its peak
#: (about 1.3 FWHM from the centre for a Gaussian), plus the 3x3 centre.
FOOTPRINT_FRACTION = 0.01
INJECTED = "INJECTED"


def psf_stamps(psf, x, y) -> np.ndarray:
    """Unit-sum PSF models at sub-pixel positions, each on the stamp centred on the nearest
    pixel (N, n, n): exactly the model ``psf_flux`` fits there."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ix, iy = np.floor(x + 0.5), np.floor(y + 0.5)
    return shift_stack(psf.evaluate_many(x, y), -(x - ix), -(y - iy))


def expected_snr_sigma(difference, x, y, bad_planes=()) -> np.ndarray:
    """Optimal PSF-fit flux error on the difference image at (x, y), image unit:
    ``sigma = (sum P^2 / V)^-1/2`` over the stamp pixels with a finite value, positive variance
    and none of ``bad_planes`` (P: the difference PSF, V: the difference variance)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0:
        return np.empty(0)
    stamps = psf_stamps(difference.psf, x, y)
    half = stamps.shape[-1] // 2
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    var, inside = cutouts(difference.variance, ix, iy, half)
    img, _ = cutouts(difference.image, ix, iy, half)
    bad, _ = cutouts(difference.mask_of(*bad_planes), ix, iy, half) if bad_planes else (None, None)
    var = var.astype(float)
    valid = inside & np.isfinite(var) & (var > 0) & np.isfinite(img)
    if bad is not None:
        valid &= ~bad
    inv = np.where(valid, stamps ** 2 / np.where(valid, var, 1.0), 0.0).sum(axis=(1, 2))
    with np.errstate(divide="ignore"):
        return np.where(inv > 0, 1.0 / np.sqrt(inv), np.nan)


def render_fakes(exposure, x, y, amplitude) -> None:
    """Add point sources (amplitude in the exposure's image unit, PSF model of the exposure) at
    sub-pixel positions to ``exposure.image`` in place, and OR the ``INJECTED`` plane into its
    mask over each fake's footprint. Pixels off the image are skipped; NO_DATA pixels get no
    flux (they stay 0 in a difference image)."""
    x, y, amplitude = (np.asarray(a, float) for a in (x, y, amplitude))
    if len(x) == 0:
        exposure.mask_bit(INJECTED)
        return
    stamps = psf_stamps(exposure.psf, x, y)
    half = stamps.shape[-1] // 2
    ny, nx = exposure.image.shape
    bit = np.int32(exposure.mask_bit(INJECTED))
    no_data = np.int32(exposure.bits("NO_DATA"))
    centre = np.zeros(stamps.shape[1:], bool)
    centre[half - 1:half + 2, half - 1:half + 2] = True
    for k in range(len(x)):
        ix, iy = int(np.floor(x[k] + 0.5)), int(np.floor(y[k] + 0.5))
        y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
        x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
        if y1 <= y0 or x1 <= x0:
            continue
        sy = slice(y0 - (iy - half), y1 - (iy - half))
        sx = slice(x0 - (ix - half), x1 - (ix - half))
        stamp = stamps[k][sy, sx]
        mask = exposure.mask[y0:y1, x0:x1]
        add = (amplitude[k] * stamp).astype(np.float32)
        if no_data:
            add[(mask & no_data) != 0] = 0
        exposure.image[y0:y1, x0:x1] += add
        footprint = (stamps[k] >= FOOTPRINT_FRACTION * stamps[k].max()) | centre
        mask[footprint[sy, sx]] |= bit
