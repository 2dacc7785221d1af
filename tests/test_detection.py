"""Detection (PSF-matched filter + sep), measurement, pixel flags and cosmic rays.

Small scenes (200 x 200 px) with pixel-integrated Gaussian stars of known position and
flux on white noise of known variance.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.special import erf

from apsnake.detection import (CosmicRayConfig, DetectionConfig, detect_and_measure, find_cosmic_rays,
                               smooth_for_detection)

SHAPE = (200, 200)  # rows, columns
PSF_SIGMA = 1.5
# Rubin's fixed planes (exposure.DEFAULT_MASK_PLANES); spelt out so the test stands alone.
PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "DETECTED_NEGATIVE": 6,
          "SUSPECT": 7, "NO_DATA": 8}


def bit(name):
    return np.int32(1 << PLANES[name])


def gaussian_star(x0, y0, flux, sigma=PSF_SIGMA, shape=SHAPE):
    """A circular Gaussian star integrated over the pixels (pixel i covers [i-0.5, i+0.5])."""
    ny, nx = shape
    ex = erf((np.arange(nx + 1) - 0.5 - x0) / (np.sqrt(2) * sigma))
    ey = erf((np.arange(ny + 1) - 0.5 - y0) / (np.sqrt(2) * sigma))
    return flux * np.outer(np.diff(ey) / 2, np.diff(ex) / 2)


def matched_filter_snr(flux, variance, sigma=PSF_SIGMA):
    """S/N of a point source with an optimal (PSF-matched) filter on white noise."""
    return flux / np.sqrt(4 * np.pi * sigma**2 * variance)


def reference_noise(variance, bad, sigma=PSF_SIGMA):
    """sqrt(sum_i k_i^2 var_i) by brute force: discrete Gaussian kernel k (radius 3 sigma),
    zero outside the image and on masked pixels."""
    from scipy import ndimage

    h = int(3 * sigma + 0.5)
    r = np.arange(-h, h + 1)
    g = np.exp(-0.5 * (r / sigma) ** 2)
    k = np.outer(g, g)
    k /= k.sum()
    var = np.where(bad, 0.0, variance)
    return np.sqrt(ndimage.convolve(var, k**2, mode="constant", cval=0.0))


# --- smooth_for_detection ---------------------------------------------------------------------

def test_smoothed_noise_matches_brute_force_with_edges_and_masks(rng):
    y, x = np.mgrid[:SHAPE[0], :SHAPE[1]]
    variance = 20.0 + 80.0 * x / SHAPE[1] + 30.0 * np.sin(y / 15.0) ** 2
    bad = rng.random(SHAPE) < 0.03
    bad[80:95, 20:60] = True
    image = rng.normal(0.0, np.sqrt(variance))
    smooth, noise = smooth_for_detection(image, variance, bad, PSF_SIGMA)
    assert smooth.dtype == np.float32 and noise.dtype == np.float32
    assert np.all(np.isinf(noise[bad]))
    expected = reference_noise(variance, bad)
    assert_allclose(noise[~bad], expected[~bad], rtol=0.01)
    # Known values: constant variance V away from edges gives sqrt(V / (4 pi sigma^2)); at a
    # corner only about a quarter of the kernel is inside the image.
    const = smooth_for_detection(np.zeros(SHAPE), np.full(SHAPE, 100.0), np.zeros(SHAPE, bool), PSF_SIGMA)[1]
    assert_allclose(const[100, 100], np.sqrt(100.0 / (4 * np.pi * PSF_SIGMA**2)), rtol=0.002)
    assert_allclose(const[0, 0], reference_noise(np.full(SHAPE, 100.0), np.zeros(SHAPE, bool))[0, 0], rtol=0.01)
    assert 0.4 < const[0, 0] / const[100, 100] < 0.75


def test_significance_of_white_noise_has_unit_std(rng):
    """smooth / noise is N(0, 1) everywhere: in the middle, at the edges, next to masks, and
    where the variance changes (several realisations to beat down the correlated noise)."""
    y, x = np.mgrid[:SHAPE[0], :SHAPE[1]]
    variance = np.where(x < 100, 4.0, 36.0) * (1.0 + 0.5 * y / SHAPE[0])
    bad = np.zeros(SHAPE, bool)
    bad[120:140, 30:170] = True
    bad[rng.random(SHAPE) < 0.02] = True
    edge = np.zeros(SHAPE, bool)
    edge[:2, :] = edge[-2:, :] = edge[:, :2] = edge[:, -2:] = True
    near_mask = ~bad & (np.abs(np.arange(SHAPE[0])[:, None] - 130) < 13) & (x >= 28) & (x < 172)
    interior, border, masked_side = [], [], []
    for _ in range(6):
        image = rng.normal(0.0, np.sqrt(variance))
        image[bad] = 1e6  # masked pixels must not leak into the smoothed image
        smooth, noise = smooth_for_detection(image, variance, bad, PSF_SIGMA)
        sig = smooth / noise
        interior.append(sig[~bad & ~edge])
        border.append(sig[edge & ~bad])
        masked_side.append(sig[near_mask])
        assert np.all(sig[bad] == 0)
    for values, tol in ((interior, 0.03), (border, 0.06), (masked_side, 0.06)):
        values = np.concatenate(values)
        assert abs(values.mean()) < 0.05
        assert_allclose(values.std(), 1.0, atol=tol)
    assert np.abs(np.concatenate(interior)).max() < 6.0


def test_point_source_peaks_at_its_position_with_matched_filter_snr():
    variance = np.full(SHAPE, 25.0)
    flux = 5000.0
    for x0, y0 in ((70.3, 120.6), (100.0, 100.0), (3.2, 150.4)):
        image = gaussian_star(x0, y0, flux)
        smooth, noise = smooth_for_detection(image, variance, np.zeros(SHAPE, bool), PSF_SIGMA)
        iy, ix = np.unravel_index(np.argmax(smooth), SHAPE)
        assert (ix, iy) == (round(x0), round(y0))
        if (x0, y0) == (100.0, 100.0):
            # Centred on a pixel: the matched-filter S/N, less ~2% for the pixel integration.
            assert_allclose(smooth[iy, ix] / noise[iy, ix], matched_filter_snr(flux, 25.0), rtol=0.03)
            assert_allclose(smooth.sum(), flux, rtol=1e-3)  # smoothing conserves flux


# --- find_cosmic_rays -------------------------------------------------------------------------

def cr_scene(rng, noise=5.0):
    image = rng.normal(0.0, noise, SHAPE)
    variance = np.full(SHAPE, noise**2)
    peak_per_flux = gaussian_star(100.0, 100.0, 1.0)[100, 100]
    image += gaussian_star(120.0, 130.0, 500.0 / peak_per_flux)    # star of peak 500
    image += gaussian_star(60.3, 150.6, 20000.0 / peak_per_flux)   # bright star
    return image, variance


def near(mask, points, radius):
    """True where mask pixels lie within ``radius`` (Chebyshev) of any of ``points`` (row, col)."""
    ys, xs = np.nonzero(mask)
    d = np.full(ys.size, np.inf)
    for py, px in points:
        d = np.minimum(d, np.maximum(np.abs(ys - py), np.abs(xs - px)))
    return d <= radius


def test_cosmic_rays_flag_spikes_and_tracks_not_stars(rng):
    image, variance = cr_scene(rng)
    image[60, 50] += 500.0                        # a single-pixel hit, same peak as the faint star
    image[150, 40:45] += 300.0                    # a horizontal track
    track = [(30 + k, 160 + k) for k in range(5)]  # a diagonal track
    for p in track:
        image[p] += 300.0
    crs = find_cosmic_rays(image, variance, PSF_SIGMA)
    assert crs.dtype == bool and crs.shape == SHAPE
    assert crs[60, 50]
    assert crs[150, 40:45].all()
    assert all(crs[p] for p in track)
    # Nothing on the stars, and nothing far from the hits (growth is limited to neighbours).
    assert not near(crs, [(130, 120), (151, 60)], 8).any()
    hits = [(60, 50)] + [(150, c) for c in range(40, 45)] + track
    assert near(crs, hits, CosmicRayConfig().n_grow + 1).all()


def test_cosmic_rays_are_judged_against_the_psf_width(rng):
    """An undersampled star (sigma 0.5 px: neighbours at ~23% of the peak) is sharper than a
    1.5-px PSF allows, hence a cosmic ray there, but not when the PSF is that sharp."""
    image = rng.normal(0.0, 5.0, SHAPE)
    peak_per_flux = gaussian_star(100.0, 100.0, 1.0, sigma=0.5)[100, 100]
    image += gaussian_star(100.0, 100.0, 2000.0 / peak_per_flux, sigma=0.5)
    variance = np.full(SHAPE, 25.0)
    assert find_cosmic_rays(image, variance, 1.5)[100, 100]
    assert not find_cosmic_rays(image, variance, 0.5).any()


def test_cosmic_ray_grows_into_bright_neighbours(rng):
    image, variance = cr_scene(rng)
    image[170, 100] += 500.0
    image[170, 101] += 25.0  # 5 sigma: below min_sigma, above grow_sigma
    image[171, 100] += 40.0  # 8 sigma: a candidate by itself, joined by growth
    crs = find_cosmic_rays(image, variance, PSF_SIGMA)
    assert crs[170, 100] and crs[170, 101] and crs[171, 100]


def test_cosmic_ray_tracks_two_pixels_wide_are_flagged(rng):
    """A grazing hit leaves a track two pixels wide; each pixel has a bright neighbour
    across the track, so only the comparison two pixels away tells it from a star."""
    image, variance = cr_scene(rng)
    image[40:42, 20:32] += 300.0     # horizontal, 60 sigma per pixel
    image[150:165, 170:172] += 300.0  # vertical
    crs = find_cosmic_rays(image, variance, PSF_SIGMA)
    assert crs[40:42, 20:32].all()
    assert crs[150:165, 170:172].all()
    assert not near(crs, [(130, 120), (151, 60)], 8).any()


def test_cosmic_rays_respect_bad_thresholds_and_variance(rng):
    image, variance = cr_scene(rng, noise=1.0)
    assert not find_cosmic_rays(image, variance, PSF_SIGMA).any()  # noise and stars alone
    image[50, 50] += 20.0    # 20 sigma but below min_dn = 30
    image[50, 150] += 40.0   # above both
    image[150, 150] += 400.0
    variance[140:160, 140:160] = 100.0**2  # ... but only 4 sigma where the variance is large
    image[100, 20] += 400.0
    bad = np.zeros(SHAPE, bool)
    bad[100, 20] = True  # a masked pixel is not a candidate
    crs = find_cosmic_rays(image, variance, PSF_SIGMA, bad=bad)
    assert crs[50, 150]
    assert not crs[50, 50] and not crs[150, 150] and not crs[100, 20]
    # A lower min_dn catches the faint hit.
    crs = find_cosmic_rays(image, variance, PSF_SIGMA, bad=bad, config=CosmicRayConfig(min_dn=10.0))
    assert crs[50, 50]


def test_no_cosmic_rays_in_pure_noise(rng):
    image = rng.normal(0.0, 3.0, SHAPE)
    assert not find_cosmic_rays(image, np.full(SHAPE, 9.0), PSF_SIGMA).any()


# --- detect_and_measure -----------------------------------------------------------------------

NOISE_VAR = 100.0
STARS = [  # x, y, flux: S/N 380 to 1900 with the matched filter
    (40.3, 50.7, 2e4), (150.2, 40.1, 3e4), (100.5, 100.5, 5e4), (60.8, 160.4, 1e5),
    (160.6, 150.9, 4e4), (30.1, 120.2, 2.5e4), (120.4, 170.3, 6e4), (100.9, 30.6, 8e4),
]


@pytest.fixture(scope="module")
def star_scene():
    """Image, variance, mask of eight stars; SAT at the centre of star 0, CR in the wings of
    star 1, BAD next to the centre of star 2, EDGE along the first row, and a BAD / NO_DATA
    region full of garbage."""
    rng = np.random.default_rng(42)
    image = rng.normal(0.0, np.sqrt(NOISE_VAR), SHAPE)
    for x0, y0, flux in STARS:
        image += gaussian_star(x0, y0, flux)
    variance = np.full(SHAPE, NOISE_VAR)
    mask = np.zeros(SHAPE, np.int32)
    mask[51, 40] |= bit("SAT")
    mask[44, 150] |= bit("CR")   # 4 px below the centre of star 1: in its footprint, not its centre
    mask[101, 101] |= bit("BAD")
    mask[0, :] |= bit("EDGE")
    image[180:190, 10:20] = 1e5
    mask[180:190, 10:15] |= bit("BAD")
    mask[180:190, 15:20] |= bit("NO_DATA")
    table, footprints = detect_and_measure(image, variance, mask, PLANES, PSF_SIGMA)
    return image, variance, mask, table, footprints


def match(table):
    """Index into ``table`` of the detection nearest each injected star."""
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    return np.array([np.argmin(np.hypot(x - sx, y - sy)) for sx, sy, _ in STARS])


def test_detect_finds_each_star_once(star_scene):
    *_, table, footprints = star_scene
    assert len(table) == len(STARS)  # no noise peaks, nothing from the masked garbage
    idx = match(table)
    assert len(set(idx)) == len(STARS)
    assert footprints.dtype == bool and footprints.shape == SHAPE
    for sx, sy, _ in STARS:
        assert footprints[round(sy), round(sx)]
    assert not footprints[180:190, 10:20].any()
    assert 0.005 < footprints.mean() < 0.1


def test_detect_positions_fluxes_and_errors(star_scene):
    *_, table, _ = star_scene
    t = table.iloc[match(table)]
    sx, sy, sflux = (np.array(c) for c in zip(*STARS))
    snr_true = matched_filter_snr(sflux, NOISE_VAR)
    # Centroids: S/N > 300, so errors are ~0.01 px; star 2 lost a pixel next to its centre.
    good = np.arange(len(STARS)) != 2
    assert_allclose(t["x"].to_numpy()[good], sx[good], atol=0.03)
    assert_allclose(t["y"].to_numpy()[good], sy[good], atol=0.03)
    assert_allclose(t[["x", "y"]].iloc[2], [sx[2], sy[2]], atol=0.1)
    assert_allclose(t["xErr"], PSF_SIGMA / t["snr"], rtol=1e-6)
    assert (t["xErr"] < 0.01).all()
    # Detection S/N: the matched-filter S/N, less up to ~10% for the sub-pixel offsets and
    # the pixel integration (and the BAD pixel on star 2).
    ratio = t["snr"].to_numpy() / snr_true
    assert np.all((ratio > 0.8) & (ratio < 1.02))
    # 12-px aperture: all the flux, with error sqrt(pi r^2 V).
    ap_err = np.sqrt(np.pi * 12.0**2 * NOISE_VAR)
    assert_allclose(t["apFluxErr"], ap_err, rtol=0.03)
    assert np.all(np.abs(t["apFlux"].to_numpy()[good] - sflux[good]) < 4 * ap_err)
    assert not t["apFlux_flag"].to_numpy()[good].any()
    assert t["apFlux_flag"].iloc[2]  # the masked pixel is left out and flagged
    assert 0.85 * sflux[2] < t["apFlux"].iloc[2] < sflux[2]
    # Shapes: round, about the PSF's second moment once the detection smoothing is removed.
    assert_allclose(t["ixx"], PSF_SIGMA**2, rtol=0.2)
    assert_allclose(t["iyy"], PSF_SIGMA**2, rtol=0.2)
    assert (np.abs(t["ixy"]) < 0.1 * PSF_SIGMA**2).all()
    assert (t["npix"] >= DetectionConfig().min_area).all()
    assert (t["peak"] > 0).all() and (t["isoFlux"] > 0).all()


def test_detect_pixel_flags(star_scene):
    *_, table, _ = star_scene
    t = table.iloc[match(table)].reset_index(drop=True)
    expected = np.zeros(len(STARS), bool)
    only = {i: np.arange(len(STARS)) == i for i in range(3)}
    assert_array_equal(t["pixelFlags_saturated"], only[0])
    assert_array_equal(t["pixelFlags_saturatedCenter"], only[0])
    assert_array_equal(t["pixelFlags_cr"], only[1])
    assert_array_equal(t["pixelFlags_crCenter"], expected)   # 4 px from the centre
    assert_array_equal(t["pixelFlags_badCenter"], only[2])
    for name in ("edge", "edgeCenter", "interpolated", "interpolatedCenter", "suspect", "suspectCenter",
                 "nodata", "nodataCenter", "offimage"):
        assert_array_equal(t[f"pixelFlags_{name}"], expected, err_msg=name)


def test_detect_edge_flag_and_custom_config(star_scene):
    image, variance, mask, *_ = star_scene
    mask = mask.copy()
    mask[:, 115:126] |= bit("EDGE")  # a band through star 6 (x = 120.4)
    # Only stars with matched-filter S/N 1128 and above have min_area pixels over 900 sigma;
    # the next (940, and less for its BAD pixel) has none.
    config = DetectionConfig(threshold=900.0, aperture_radius=6.0)
    table, _ = detect_and_measure(image, variance, mask, PLANES, PSF_SIGMA, config)
    assert len(table) == 3
    assert_array_equal(sorted(match(table)[[3, 6, 7]]), np.arange(3))
    assert (table["snr"] > 900.0).all()
    assert_allclose(table["apFluxErr"], np.sqrt(np.pi * 6.0**2 * NOISE_VAR), rtol=0.03)
    on_band = np.abs(table["x"] - 120.4) < 1
    assert on_band.sum() == 1
    assert_array_equal(table["pixelFlags_edge"], on_band)
    assert_array_equal(table["pixelFlags_edgeCenter"], on_band)


def test_detect_with_precomputed_smoothing_is_the_same(star_scene):
    image, variance, mask, table, footprints = star_scene
    masked = (mask & (bit("BAD") | bit("NO_DATA"))) != 0
    smoothed = smooth_for_detection(image, variance, masked, PSF_SIGMA)
    table2, footprints2 = detect_and_measure(image, variance, mask, PLANES, PSF_SIGMA, smoothed=smoothed)
    assert_array_equal(footprints2, footprints)
    assert_allclose(table2[["x", "y", "apFlux", "snr"]].to_numpy(), table[["x", "y", "apFlux", "snr"]].to_numpy())


def test_detect_nothing_in_pure_noise(rng):
    image = rng.normal(0.0, 1.0, SHAPE)
    table, footprints = detect_and_measure(image, np.ones(SHAPE), np.zeros(SHAPE, np.int32), PLANES, PSF_SIGMA)
    assert len(table) == 0 and not footprints.any()
    for col in ("x", "y", "xErr", "yErr", "apFlux", "apFluxErr", "snr"):
        assert col in table.columns
