"""Round residuals of bright stars taken out of a difference image (issue 11,
``apsnake.diffim.star_profiles``): a halo-mismatch ring goes, a transient inside it stays."""

import math

import numpy as np
import pandas as pd

from apsnake.diffim.star_profiles import profile_stars, subtract_star_profiles

SIGMA = 50.0  # nJy per pixel


def _gaussian(shape, x, y, flux, sigma):
    gy, gx = np.mgrid[:shape[0], :shape[1]]
    return flux * np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)


def _ring_image(rng, shape=(401, 401), centre=(200.3, 199.6)):
    """Noise plus a halo-mismatch residual around a saturated star at ``centre``: a
    difference of two beta = 2 profiles, negative inside ~25 px (-16 sigma per pixel at 12 px)
    and positive beyond (+1.2 sigma per pixel at 40 px: ~7 sigma over a PSF's area, which a
    5-sigma detection picks up in pieces)."""
    gy, gx = np.mgrid[:shape[0], :shape[1]]
    r2 = (gx - centre[0]) ** 2 + (gy - centre[1]) ** 2

    def beta2(alpha):
        return 1 / (math.pi * alpha ** 2) * (1 + r2 / alpha ** 2) ** -2

    ring = 6.0e6 * (beta2(30.0) - beta2(22.0))
    return rng.normal(0, SIGMA, shape).astype(np.float32), ring.astype(np.float32)


def _psf_snr(image, x, y, sigma):
    """PSF-weighted S/N of a Gaussian source of width ``sigma`` at (x, y), white noise SIGMA."""
    h = int(4 * sigma) + 1
    ix, iy = int(round(x)), int(round(y))
    w = _gaussian(image.shape, x, y, 1.0, sigma)[iy - h:iy + h + 1, ix - h:ix + h + 1]
    flux = (image[iy - h:iy + h + 1, ix - h:ix + h + 1] * w).sum() / (w ** 2).sum()
    return flux, flux / (SIGMA / math.sqrt((w ** 2).sum()))


def test_a_halo_ring_goes_and_a_transient_inside_it_stays():
    rng = np.random.default_rng(7)
    noise, ring = _ring_image(rng)
    transient_xy, transient_flux, psf_sigma = (245.0, 215.0), 6000.0, 1.8  # ~48 px out, S/N ~ 18
    transient = _gaussian(noise.shape, *transient_xy, transient_flux, psf_sigma).astype(np.float32)
    image = noise + ring + transient
    variance = np.full(image.shape, SIGMA ** 2, np.float32)
    bad = np.zeros(image.shape, bool)
    bad[190:210, 150:250] = True  # a bleed trail: left out of the profile, corrected all the same

    r = np.hypot(*np.mgrid[-200:201, -200:201])
    annulus = (r > 12) & (r < 150)
    before = np.abs((image - noise - transient)[annulus]).max()
    info = subtract_star_profiles(image, variance, bad, [200.3], [199.6], [160.0], r_in=10.0)
    residual = image - noise - transient
    assert info["n_corrected"] == 1
    assert before > 1.5 * SIGMA
    # The ring is gone to a small fraction of the pixel noise everywhere between 12 and 150 px.
    assert np.abs(residual[annulus]).max() < 0.25 * SIGMA, np.abs(residual[annulus]).max()
    # Nothing inside the inner radius is touched.
    inner = r < 9.5
    assert np.array_equal(image[inner], (noise + ring + transient)[inner])
    # The transient keeps its flux (within 3 %, its own noise is ~6 %: the profile is a median).
    flux, snr = _psf_snr(image - noise, *transient_xy, psf_sigma)
    assert abs(flux / transient_flux - 1) < 0.03 and snr > 15


def test_noise_alone_is_left_alone():
    rng = np.random.default_rng(8)
    image = rng.normal(0, SIGMA, (301, 301)).astype(np.float32)
    original = image.copy()
    info = subtract_star_profiles(image, np.full(image.shape, SIGMA ** 2, np.float32), np.zeros(image.shape, bool),
                                  [150.0], [150.0], [140.0], r_in=10.0)
    # At most a knot or two by chance at 3 sigma; what is subtracted is far below the noise.
    assert np.abs(image - original).max() < 0.2 * SIGMA
    assert info["n_stars"] == 1


def test_profile_stars_chooses_saturated_and_bright_sources():
    sources = pd.DataFrame({"x": [10.0, 50.0, 90.0, 130.0], "y": [20.0, 60.0, 100.0, 140.0],
                            "psfFlux": [1e5, 1e8, 5e6, 2e6], "snr": [40.0, 350.0, 600.0, 400.0],
                            "pixelFlags_saturatedCenter": [False, True, False, False]})
    sat = np.zeros((200, 200), bool)
    sat[139:142, 129:132] = True  # saturated in the template only: found from the mask
    x, y, outer = profile_stars(sources, sat, min_snr=300, radius=40, radius_saturated=160, max_stars=10)
    assert x.tolist() == [50.0, 130.0, 90.0]  # saturated ones first, then by flux
    assert outer.tolist() == [160.0, 160.0, 40.0]
    x, _, _ = profile_stars(sources, sat, min_snr=300, radius=40, radius_saturated=160, max_stars=1)
    assert x.tolist() == [50.0]
