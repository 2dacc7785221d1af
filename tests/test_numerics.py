"""The shared numerical helpers (apsnake.numerics) against the libraries they stand in for."""

import numpy as np
import pytest
from astropy.stats import gaussian_sigma_to_fwhm, mad_std
from scipy import ndimage

from apsnake import numerics
from apsnake.exposure import PsfModel


def test_mad_sigma_is_astropys_mad_std(rng):
    values = np.concatenate([rng.normal(3.0, 2.0, 5001), [np.nan, np.inf, 1e6]])
    finite = values[np.isfinite(values)]
    assert numerics.mad_sigma(values) == pytest.approx(mad_std(finite), rel=1e-12)
    assert numerics.mad_sigma(values[:5000]) == pytest.approx(2.0, rel=0.05)
    assert np.isnan(numerics.mad_sigma([])) and np.isnan(numerics.mad_sigma([np.nan]))
    assert numerics.SIGMA_TO_FWHM == pytest.approx(gaussian_sigma_to_fwhm, rel=1e-12)


def test_clipped_mean_ignores_outliers(rng):
    values = np.concatenate([rng.normal(100, 1, 10000), np.full(50, 1e5), [np.nan]])
    assert np.mean(values[np.isfinite(values)]) > 500
    assert numerics.clipped_mean(values) == pytest.approx(100, abs=0.05)
    assert np.isnan(numerics.clipped_mean([np.nan]))
    assert numerics.clipped_mean([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # too few values to clip


def test_cutouts_inside_and_across_the_edge():
    image = np.arange(7 * 9, dtype=float).reshape(7, 9)
    stamps, inside = numerics.cutouts(image, [4, 0], [3, 6], 1, fill=-1.0)
    np.testing.assert_array_equal(stamps[0], image[2:5, 3:6])
    assert inside[0].all()
    # Centred on the bottom-left... the last row, first column: the off-image part is filled.
    assert inside[1].sum() == 4 and (stamps[1][~inside[1]] == -1).all()
    np.testing.assert_array_equal(stamps[1][:2, 1:], image[5:7, 0:2])


def test_polynomial_terms_follow_the_psf_model_order():
    assert numerics.n_terms(2) == 6 and numerics.term_powers(1) == [(0, 0), (1, 0), (0, 1)]
    u, v = np.array([0.5, -2.0]), np.array([3.0, 0.25])
    terms = numerics.polynomial_terms(2, u, v)
    np.testing.assert_allclose(terms, np.stack([np.ones(2), u, v, u * u, u * v, v * v], axis=-1))
    x0, y0, scale = numerics.polynomial_frame((4096, 2048))
    assert (x0, y0, scale) == (1023.5, 2047.5, 2048.0)
    model = PsfModel(components=np.ones((6, 3, 3), np.float32), spatial_order=2, x0=x0, y0=y0, scale=scale)
    np.testing.assert_allclose(model.polynomial_terms(1500.0, 10.0),
                               numerics.polynomial_terms(2, (1500 - x0) / scale, (10 - y0) / scale))


def test_lanczos_kernel():
    t = np.array([-3.5, -3.0, -1.0, 0.0, 0.5, 2.9])
    k = numerics.lanczos(t, 3)
    assert k[0] == 0 and k[1] == pytest.approx(0, abs=1e-12) and k[2] == pytest.approx(0, abs=1e-12)
    assert k[3] == 1.0 and k[4] == pytest.approx(np.sinc(0.5) * np.sinc(0.5 / 3))
    # A Lanczos-3 interpolation of a constant is close to the constant at any phase.
    phase = 0.3
    assert numerics.lanczos(np.arange(-2, 4) - phase, 3).sum() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("before,after", [(0, 0), (1, 1), (0, 5), (3, 2), (7, 7)])
def test_window_or_is_a_box_or_of_every_bit_plane(rng, before, after):
    bits = rng.integers(1, 4, (60, 70))
    mask = np.where(rng.random((60, 70)) < 0.02, 1 << bits, 0).astype(np.int32)
    out = numerics.window_or(mask, before, after)
    # Brute force: out[i, j] = OR of mask[i - before .. i + after, j - before .. j + after].
    pad = before + after
    padded = np.pad(mask, pad)
    expected = np.zeros_like(mask)
    for dy in range(-before, after + 1):
        for dx in range(-before, after + 1):
            expected |= padded[pad + dy:pad + dy + 60, pad + dx:pad + dx + 70]
    np.testing.assert_array_equal(out, expected)
    grown0 = numerics.grow_bits(mask, 0)
    assert grown0 is not mask and (grown0 == mask).all()


def test_dilate_disc_and_square(rng):
    mask = rng.random((80, 90)) < 0.003
    mask[40, 45] = True
    for radius in (1, 3):
        np.testing.assert_array_equal(numerics.dilate(mask, radius),
                                      ndimage.binary_dilation(mask, structure=numerics.disc(radius)))
        np.testing.assert_array_equal(numerics.dilate(mask, radius, "square"),
                                      ndimage.binary_dilation(mask, structure=np.ones((2 * radius + 1,) * 2, bool)))
    assert numerics.disc(2).sum() == 13
    with pytest.raises(ValueError, match="footprint"):
        numerics.dilate(mask, 2, "diamond")


def test_pad_and_crop_centered_round_trip_and_do_not_shift_an_fft_convolution(rng):
    stamp = rng.random((5, 5))
    padded = numerics.pad_centered(stamp, (16, 16))
    assert padded[0, 0] == stamp[2, 2] and padded[-1, -1] == stamp[1, 1]
    np.testing.assert_array_equal(numerics.crop_centered(padded, 5), stamp)
    delta = np.zeros((16, 16))
    delta[8, 8] = 1.0
    conv = np.real(np.fft.ifft2(np.fft.fft2(delta) * np.fft.fft2(padded)))
    np.testing.assert_allclose(conv[6:11, 6:11], stamp, atol=1e-12)


@pytest.mark.parametrize("n_nodes", [2, 3, 4, 5, 9, 65])
def test_cubic_spline_weights_are_scipys_not_a_knot_spline(rng, n_nodes):
    from scipy.interpolate import CubicSpline

    nodes = np.sort(rng.choice(np.arange(0.0, 400.0, 0.5), n_nodes, replace=False))
    positions = rng.uniform(nodes[0] - 20, nodes[-1] + 20, 300)  # extrapolation included
    expected = CubicSpline(nodes, np.eye(n_nodes), axis=0, bc_type="not-a-knot")(positions)
    assert np.allclose(numerics.cubic_spline_weights(nodes, positions), expected, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="strictly increasing"):
        numerics.CubicSpline1d(nodes[::-1])


def test_tensor_product_of_spline_weights_is_rect_bivariate_spline(rng):
    from scipy.interpolate import RectBivariateSpline

    grid = np.arange(-9.0, 10.0)
    values = rng.normal(size=(grid.size, grid.size))
    rows, cols = np.sort(rng.uniform(-9, 9, 15)), np.sort(rng.uniform(-9, 9, 11))
    spline = numerics.CubicSpline1d(grid)
    ours = spline.weights(rows) @ values @ spline.weights(cols).T
    expected = RectBivariateSpline(grid, grid, values, kx=3, ky=3)(rows, cols, grid=True)
    assert np.allclose(ours, expected, rtol=0, atol=1e-9)
