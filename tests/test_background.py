"""Sky background: a smooth gradient under noise, stars and masked regions.

200 x 200 px images with 50-px boxes (a 4 x 4 grid) unless a test says otherwise; the
noise is 5 per pixel, so a box holds ~2500 samples and its level is good to ~0.2.
"""

import numpy as np
from numpy.testing import assert_allclose

from apsnake.background import BackgroundConfig, BackgroundModel, estimate_background

NY, NX = 200, 200
NOISE = 5.0
CONFIG = BackgroundConfig(bin_size=50)


def gradient():
    y, x = np.mgrid[:NY, :NX]
    return 100.0 + 0.05 * x - 0.03 * y  # 10 ADU across x, -6 across y


def add_stars(rng, image, n=20, sigma=1.5):
    """Gaussian stars (peaks 200-5000) at random positions; returns a mask of their cores."""
    y, x = np.mgrid[:NY, :NX]
    mask = np.zeros(image.shape, bool)
    for _ in range(n):
        x0, y0 = rng.uniform(5, NX - 5), rng.uniform(5, NY - 5)
        r2 = (x - x0) ** 2 + (y - y0) ** 2
        image += rng.uniform(200, 5000) * np.exp(-0.5 * r2 / sigma**2)
        mask |= r2 < 8.0**2
    return mask


def test_recovers_gradient_under_noise(rng):
    truth = gradient()
    image = truth + rng.normal(0, NOISE, truth.shape)
    model = estimate_background(image, config=CONFIG)
    assert isinstance(model, BackgroundModel)
    assert model.image.shape == image.shape and model.image.dtype == np.float32
    err = model.image - truth
    assert np.sqrt(np.mean(err**2)) < 0.1 * NOISE
    assert np.abs(err).max() < 0.4 * NOISE  # including the edges and corners
    # Global level: the middle of the plane; global rms: the pixel noise.
    assert abs(model.level - np.median(truth)) < 0.5
    assert_allclose(model.rms, NOISE, rtol=0.05)


def test_default_config_on_a_small_image(rng):
    image = 50.0 + rng.normal(0, NOISE, (NY, NX))
    model = estimate_background(image)  # 128-px boxes: 2 x 2 on this image
    assert_allclose(model.image, 50.0, atol=0.15 * NOISE)
    assert abs(model.level - 50.0) < 0.2
    assert_allclose(model.rms, NOISE, rtol=0.05)


def test_stars_barely_bias_the_background(rng):
    truth = gradient()
    image = truth + rng.normal(0, NOISE, truth.shape)
    stars = add_stars(rng, image)
    assert 0.05 < stars.mean() < 0.2
    for mask in (None, stars):  # clipping rejects the stars; masking them works too
        err = estimate_background(image, mask, CONFIG).image - truth
        assert np.abs(err).max() < 0.4 * NOISE
        assert np.sqrt(np.mean(err**2)) < 0.1 * NOISE


def test_mask_excludes_a_large_contaminated_region(rng):
    """A quadrant 4 sigma high (scattered light, a large galaxy) pulls the background up
    unless masked. When masked, its 2 x 2 boxes have no pixels left and are filled from the
    neighbouring boxes (not exactly a plane, even without noise), so the background is good
    to half a sigma outside the quadrant and to a sigma under it."""
    truth = gradient()
    image = truth + rng.normal(0, NOISE, truth.shape)
    region = np.zeros(image.shape, bool)
    region[:100, :100] = True
    image[region] += 4 * NOISE
    unmasked = estimate_background(image, None, CONFIG).image - truth
    assert np.median(unmasked[region]) > 3 * NOISE  # the test does need the mask
    masked = estimate_background(image, region, CONFIG).image - truth
    assert np.abs(masked[~region]).max() < 0.5 * NOISE
    assert np.sqrt(np.mean(masked[~region] ** 2)) < 0.15 * NOISE
    assert np.abs(masked[region]).max() < 1.0 * NOISE
    assert abs(np.median(masked[region])) < 0.3 * NOISE


def test_mask_within_one_box(rng):
    """Without the 3x3 median filter of the box grid, a box 30% covered by a +4 sigma patch
    is biased unless the patch is masked (mask given as 0/1 integers)."""
    config = BackgroundConfig(bin_size=50, filter_size=1)
    truth = gradient()
    image = truth + rng.normal(0, NOISE, truth.shape)
    patch = np.zeros(image.shape, np.uint8)
    patch[55:80, 105:135] = 1
    image[patch == 1] += 4 * NOISE
    unmasked = estimate_background(image, None, config).image - truth
    masked = estimate_background(image, patch, config).image - truth
    assert unmasked[50:100, 100:150].mean() > 0.3 * NOISE
    assert np.abs(masked).max() < 0.4 * NOISE
    assert abs(masked[50:100, 100:150].mean()) < 0.05 * NOISE
    # The 3x3 median filter of the box grid (the default) rejects most of that box's bias.
    filtered = estimate_background(image, None, CONFIG).image - truth
    assert filtered[50:100, 100:150].mean() < 0.5 * unmasked[50:100, 100:150].mean()
