"""PSF matching that follows the wings (issue 11): encircled energy, halo-wide kernels, kernel
stars that vary or move. Synthetic images whose PSF is a Moffat core plus a beta = 2 halo, as
DECam's (docs/algorithms.md §4.4-4.6)."""

import math

import numpy as np
import pandas as pd
import pytest

from apsnake.diffim import DiffimConfig, subtract
from apsnake.diffim.extent import encircled_energy_radius, stacked_growth_curve
from apsnake.diffim.halo import fit_profiles, halo_sigmas, local_convolution, ring_sums, wide_kernels
from apsnake.diffim.kernel_stars import flux_ratio_outliers
from apsnake.exposure import Exposure, PsfModel, VisitInfo

AB = 31.4  # mag of 1 nJy
SKY_SIGMA = 49.0  # nJy per pixel, as a simulated DECam g calexp


def _moffat(r2, fwhm, beta):
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    return (beta - 1) / (math.pi * alpha ** 2) * (1 + r2 / alpha ** 2) ** (-beta)


def _psf(dx, dy, half, p, oversample=3):
    """Pixel-integrated unit-flux PSF: Moffat core (fwhm, beta) + a beta = 2 halo holding ``hf``
    of the flux, ``hw`` times wider."""
    g = np.arange(-half, half + 1, dtype=float)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    f = (g[:, None] + sub[None, :]).ravel()
    r2 = (f[:, None] - dy) ** 2 + (f[None, :] - dx) ** 2
    img = (1 - p["hf"]) * _moffat(r2, p["fwhm"], p["beta"]) + p["hf"] * _moffat(r2, p["fwhm"] * p["hw"], 2.0)
    return img.reshape(len(g), oversample, len(g), oversample).sum(axis=(1, 3)) / oversample ** 2


def _analytic_ee(r, p):
    """Encircled energy of the PSF within radius r (continuous, no pixels)."""
    core = 1 - (1 + (r / (p["fwhm"] / (2 * math.sqrt(2 ** (1 / p["beta"]) - 1)))) ** 2) ** (1 - p["beta"])
    alpha_h = p["fwhm"] * p["hw"] / (2 * math.sqrt(2 ** 0.5 - 1))
    return (1 - p["hf"]) * core + p["hf"] * (1 - 1 / (1 + (r / alpha_h) ** 2))


def _image(shape, x, y, flux, p, sigma, rng):
    ny, nx = shape
    pad = 60
    model = np.zeros((ny + 2 * pad, nx + 2 * pad))
    for xi, yi, fi in zip(x, y, flux):
        ix, iy = int(round(xi)), int(round(yi))
        # Every star's halo drawn far beyond where it drops below the noise: the halo fit uses
        # ring profiles in units of each star's flux, which a cut halo would bias.
        half = 60 if fi > 3e4 else 40
        model[iy + pad - half:iy + pad + half + 1, ix + pad - half:ix + pad + half + 1] += fi * _psf(xi - ix, yi - iy,
                                                                                                  half, p)
    model = model[pad:-pad, pad:-pad]
    var = sigma ** 2 + np.clip(model, 0, None) / 5.0
    return (model + rng.normal(size=shape) * np.sqrt(var)).astype(np.float32), var.astype(np.float32)


def _pair(seed, sci, tpl, shape=(768, 768), n_stars=450):
    """Science and template of one star field (g ~ 15-23, numbers rising ~0.3 dex/mag) and the
    source table a calexp would give."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    mags = 23 - rng.exponential(1 / (0.3 * math.log(10)), n_stars)
    mags = mags[mags > 15]
    flux = 10 ** ((AB - mags) / 2.5)
    x, y = rng.uniform(5, nx - 5, len(flux)), rng.uniform(5, ny - 5, len(flux))

    def exposure(p, visit, sigma):
        img, var = _image(shape, x, y, flux, p, sigma, rng)
        stamp = _psf(0.0, 0.0, 12, p)
        psf = PsfModel(components=(stamp / stamp.sum())[None].astype(np.float32), x0=(nx - 1) / 2, y0=(ny - 1) / 2,
                       scale=max(nx, ny) / 2, fwhm_pixels=p["fwhm"])
        return Exposure(image=img, mask=np.zeros(shape, np.int32), variance=var, visit_info=VisitInfo(visit=visit),
                        detector=1, unit="nJy", psf=psf)

    science, template = exposure(sci, 1, SKY_SIGMA), exposure(tpl, 0, 0.7 * SKY_SIGMA)
    err = np.sqrt(26 * SKY_SIGMA ** 2 + flux / 5)
    sources = pd.DataFrame({"x": x, "y": y, "psfFlux": flux, "psfFluxErr": err, "snr": flux / err})
    return science, template, sources, dict(x=x, y=y, mags=mags)


def _ring_significance(diff, x, y, r_in=11.4, r_out=19.0):
    """Per star and stacked: the difference summed over the 3-5 arcsec annulus (11.4-19 px at
    0.263"/px) over its noise."""
    ny, nx = diff.image.shape
    big = int(r_out) + 1
    g = np.arange(-big, big + 1)
    ring = (np.hypot(g[:, None], g[None, :]) >= r_in) & (np.hypot(g[:, None], g[None, :]) < r_out)
    sums, variances = [], []
    for xi, yi in zip(x, y):
        ix, iy = int(round(xi)), int(round(yi))
        if big <= ix < nx - big and big <= iy < ny - big:
            sums.append(diff.image[iy - big:iy + big + 1, ix - big:ix + big + 1][ring].sum())
            variances.append(diff.variance[iy - big:iy + big + 1, ix - big:ix + big + 1][ring].sum())
    sums, variances = np.array(sums), np.array(variances)
    return sums / np.sqrt(variances), sums.sum() / math.sqrt(variances.sum())


HALO_WIDE_IN_SCIENCE = (dict(fwhm=4.2, beta=2.8, hf=0.05, hw=4.0), dict(fwhm=3.6, beta=3.6, hf=0.02, hw=4.0))
HALO_WIDE_IN_TEMPLATE = (dict(fwhm=4.6, beta=3.4, hf=0.02, hw=5.0), dict(fwhm=3.4, beta=2.6, hf=0.05, hw=5.0))


def test_stacked_growth_curve_measures_the_halo():
    """The stacked, background-fitted growth curve of a few bright stars follows the analytic
    encircled energy of a core + 4 % halo PSF (beyond the 25-px PSF-model stamp) within 0.5 %."""
    rng = np.random.default_rng(3)
    p = dict(fwhm=4.0, beta=3.0, hf=0.04, hw=4.0)
    shape = (400, 400)
    x = np.array([100.3, 300.6, 100.8, 300.1, 200.4])
    y = np.array([100.7, 100.2, 300.5, 300.9, 200.0])
    img, var = _image(shape, x, y, np.full(5, 1.5e6), p, SKY_SIGMA, rng)
    img += 3.0  # a residual background the fit must take out (15 % of the halo's light within 40 px)
    curve, n, _ = stacked_growth_curve(img, np.zeros(shape, bool), x, y, 40)
    assert n == 5
    g = np.arange(-40, 41)
    n_pixels = np.array([(np.hypot(g[:, None], g[None, :]) <= r).sum() for r in range(41)])
    r_eff = np.sqrt(n_pixels / np.pi)  # pixels whose centres lie within r cover this radius's disc
    for r in (5, 10, 20, 30, 40):
        assert curve[r] == pytest.approx(_analytic_ee(r_eff[r], p), abs=0.005), r
    r99 = min(r for r in range(41) if _analytic_ee(r_eff[r], p) >= 0.99)
    assert abs(encircled_energy_radius(curve, 0.99) - r99) <= 2
    assert r99 > 12  # the PSF model's stamp (25 px) does not hold 99 % of this PSF


@pytest.mark.parametrize("psfs", [HALO_WIDE_IN_SCIENCE, HALO_WIDE_IN_TEMPLATE], ids=["science-halo", "template-halo"])
def test_halo_mismatch_leaves_no_ring(psfs):
    """Science and template halos of 5 % and 2 % of the flux, with different core betas.
    The kernel alone (no star profiles): the residual at 3-5 arcsec around g = 16-20 stars,
    stacked over all of them, is 2.5 times smaller than the core kernel's or more and within
    4 sigma (3 when the halo terms are fitted to S/N >= 50 stars, not the default S/N >= 200,
    which does better on the simulated nights); the photometric scale (1 in truth) within 2 %,
    where the core kernel alone is 4 % off. The whole subtraction (the kernel, then the round
    residuals of the S/N >= 300 stars taken out, ``star_profiles``): no single star's ring
    above 3 sigma, as issue 11 asks; stacked over the ~60 stars within 3.5 sigma (3.2 in the
    science-halo case: what is left is below each star's noise, and lowering the profiles'
    S/N or significance limits adds noise to single stars, 2.2 -> 3.1 sigma)."""
    science, template, sources, truth = _pair(2, *psfs)
    stars = (truth["mags"] >= 16) & (truth["mags"] < 20)
    kernel_only = subtract(science, template, sources, DiffimConfig(star_profile_min_snr=None))
    per_star, stacked = _ring_significance(kernel_only.difference, truth["x"][stars], truth["y"][stars])
    core_only = subtract(science, template, sources, DiffimConfig(halo_encircled_energy=None,
                                                                  star_profile_min_snr=None))
    _, stacked_core = _ring_significance(core_only.difference, truth["x"][stars], truth["y"][stars])
    result = subtract(science, template, sources, DiffimConfig())
    per_star_all, stacked_all = _ring_significance(result.difference, truth["x"][stars], truth["y"][stars])
    print(f"kernel {kernel_only.metadata['kernel_size']} px (sigmas {kernel_only.metadata['kernel_sigmas']}), ring: "
          f"stacked {stacked:.1f}, worst star {np.abs(per_star).max():.1f} sigma; core-sized kernel "
          f"{core_only.metadata['kernel_size']} px: stacked {stacked_core:.1f} sigma; with star profiles "
          f"({result.metadata['star_profiles_n_corrected']} of {result.metadata['star_profiles_n_stars']} stars "
          f"corrected): stacked {stacked_all:.1f}, worst star {np.abs(per_star_all).max():.1f} sigma")
    assert len(per_star) > 30
    assert abs(stacked) < 4.0 and abs(stacked) < abs(stacked_core) / 2.5 and np.abs(per_star).max() < 4.0
    assert abs(stacked_core) > 5.0
    assert abs(kernel_only.metadata["kernel_sum"] - 1) < 0.02 and abs(core_only.metadata["kernel_sum"] - 1) > 0.012
    strict = subtract(science, template, sources, DiffimConfig(halo_fit_min_snr=50, star_profile_min_snr=None))
    assert abs(_ring_significance(strict.difference, truth["x"][stars], truth["y"][stars])[1]) < 3.0
    assert result.metadata["star_profiles_n_stars"] > 20  # examined; corrected only where significant
    assert np.abs(per_star_all).max() < 3.0 and abs(stacked_all) < 3.5


def test_flux_ratio_outliers_finds_a_variable_among_the_candidates():
    rng = np.random.default_rng(5)
    p = dict(fwhm=4.0, beta=3.0, hf=0.0, hw=1.0)
    shape = (300, 300)
    x, y = rng.uniform(30, 270, 9), rng.uniform(30, 270, 9)
    flux = rng.uniform(3e5, 1e6, 9)
    s_flux = 1.03 * flux  # another transparency: every ratio 1.03 ...
    s_flux[4] *= 1.10     # ... but one star brightened by 10 %
    sci, s_var = _image(shape, x, y, s_flux, p, SKY_SIGMA, rng)
    tpl, t_var = _image(shape, x, y, flux, p, SKY_SIGMA, rng)
    stamp = _psf(0.0, 0.0, 12, p)
    psf = PsfModel(components=(stamp / stamp.sum())[None].astype(np.float32), x0=150, y0=150, scale=150)
    outliers = flux_ratio_outliers((sci, s_var, psf), (tpl, t_var, psf), x, y, n_sigma=4.0, floor=0.01)
    assert outliers.tolist() == [i == 4 for i in range(9)]
    assert not flux_ratio_outliers((sci, s_var, psf), (tpl, t_var, psf), x[:2], y[:2], 4.0, 0.01).any()


def test_a_kernel_star_that_moved_is_rejected():
    """Few kernel stars (as on a small image), one of which moved by 0.4 px between the epochs
    (proper motion): it must not define the kernel, whose centroid it would drag."""
    rng = np.random.default_rng(11)
    p = dict(fwhm=4.0, beta=3.0, hf=0.03, hw=4.0)
    shape = (400, 400)
    x = np.array([80.2, 300.7, 90.4, 310.1, 200.6, 150.3])
    y = np.array([90.8, 80.3, 310.5, 300.2, 200.9, 250.4])
    flux = np.array([8e5, 6e5, 7e5, 9e5, 1.2e6, 5e5])
    moved_x = x.copy()
    moved_x[4] += 0.4
    sci, s_var = _image(shape, moved_x, y, flux, p, SKY_SIGMA, rng)
    tpl, t_var = _image(shape, x, y, flux, dict(p, fwhm=3.4), 0.7 * SKY_SIGMA, rng)

    def exposure(img, var, q, visit):
        stamp = _psf(0.0, 0.0, 12, q)
        return Exposure(image=img, mask=np.zeros(shape, np.int32), variance=var, visit_info=VisitInfo(visit=visit),
                        detector=1, unit="nJy", psf=PsfModel(components=(stamp / stamp.sum())[None].astype(np.float32),
                                                              x0=199.5, y0=199.5, scale=200, fwhm_pixels=q["fwhm"]))

    err = np.sqrt(26 * SKY_SIGMA ** 2 + flux / 5)
    sources = pd.DataFrame({"x": x, "y": y, "psfFlux": flux, "psfFluxErr": err, "snr": flux / err})
    meta = subtract(exposure(sci, s_var, p, 1), exposure(tpl, t_var, dict(p, fwhm=3.4), 0), sources,
                    DiffimConfig(min_kernel_stars=3)).metadata
    stars = meta["kernel_stars"]
    moved = np.hypot(np.asarray(stars["x"]) - 201, np.asarray(stars["y"]) - 201) < 2
    assert moved.any(), "the moving star should have been a candidate"
    assert not np.asarray(stars["used"])[moved].any()
    assert int(np.sum(stars["used"])) >= 3


def test_wide_kernels_leave_the_core_square_to_the_core_kernel():
    kernels = wide_kernels([5.6, 11.2], 10, 40)
    g = np.arange(-40, 41)
    for sigma, k in zip((5.6, 11.2), kernels):
        assert k.shape == (81, 81)
        assert not k[30:51, 30:51].any()  # |u|, |v| <= 10: the core kernel's pixels
        full = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
        assert np.allclose(k[:30], full[:30]) and np.allclose(k[:, 51:], full[:, 51:])
    assert kernels[0].sum() < kernels[1].sum() < 1
    assert halo_sigmas(2.8, 40.0) == [5.6, 11.2]
    assert halo_sigmas(2.8, 10.0) == []
    ref = np.zeros((200, 300), np.float32)
    ref[60, 80] = 1000.0
    ref[15, 250] = 500.0  # near the edge: the image is zero beyond it
    ix, iy = np.array([80, 250]), np.array([60, 15])
    local, local_wider = local_convolution(ref, ix, iy, 40, kernels)
    assert local.shape == (2, 81, 81)
    assert local[0, 40, 40 + 15] == pytest.approx(1000 * kernels[0][40, 55], rel=1e-5)
    assert local[0].sum() == pytest.approx(1000 * kernels[0].sum(), rel=1e-5)
    assert local[1].sum() == pytest.approx(500 * kernels[0].sum(), rel=1e-5)
    assert local_wider[0].sum() == pytest.approx(1000 * kernels[1].sum(), rel=1e-5)
    per_star = local_convolution(ref, ix, iy, 40, [np.stack([kernels[0], 2 * kernels[0]])])[0]
    assert np.allclose(per_star, local * np.array([1.0, 2.0])[:, None, None], rtol=1e-5, atol=1e-6)


def test_ring_sums_replace_masked_pixels_by_the_ring_mean():
    edges = [0.5, 5.5, 10.5]
    stamps = np.stack([np.full((23, 23), 2.0), np.arange(23.0)[None, :].repeat(23, axis=0)])
    good = np.ones(stamps.shape, bool)
    good[0, 12:, :] = False  # half of every ring of the first stamp
    g = np.arange(-11, 12)
    r = np.hypot(g[:, None], g[None, :])
    rings = [(r >= a) & (r < b) for a, b in zip(edges[:-1], edges[1:])]
    sums = ring_sums(stamps, good, edges)
    assert np.allclose(sums[0], [2.0 * ring.sum() for ring in rings])
    assert np.allclose(sums[1], [stamps[1][ring].sum() for ring in rings])
    good[0, 7:, :] = False  # less than a quarter of the inner ring left
    assert np.isnan(ring_sums(stamps, good, edges)[0, 0])


def test_fit_profiles_recovers_the_coefficients_despite_an_odd_star():
    rng = np.random.default_rng(8)
    n_stars, n_rings = 40, 10
    flux = 10 ** rng.uniform(5, 6.5, n_stars)
    shapes = [np.exp(-np.arange(n_rings) / 2.0), np.exp(-np.arange(n_rings) / 6.0)]
    terms = [np.outer(flux, s) * 0.02 for s in shapes]
    truth = np.array([0.8, -0.5])
    noise = np.sqrt(np.outer(flux, np.ones(n_rings))) * 3
    residual = sum(c * t for c, t in zip(truth, terms)) + rng.normal(size=noise.shape) * noise
    residual[np.argmax(flux)] += 0.05 * flux.max()  # the brightest star varied
    coeffs, errors = fit_profiles(residual, terms, noise, flux)
    assert np.all(np.abs(coeffs - truth) < 0.05) and np.all(np.isfinite(errors))
    few = fit_profiles(residual[:3], [t[:3] for t in terms], noise[:3], flux[:3])
    assert np.all(few[0] == 0) and np.all(np.isinf(few[1]))


def test_fit_profiles_leaves_out_terms_that_noise_explains():
    """Five stars (a small image, as the real DECam stamps): the terms fitted to pure noise are
    dropped (they moved the stacked stamps' kernel sum by 1.2 %) in all but ~0.1 % of
    realisations; a real halo difference of the same stars, at a total S/N of 20, is kept."""
    rng = np.random.default_rng(9)
    n_stars, n_rings = 5, 10
    flux = 10 ** rng.uniform(5, 6.5, n_stars)
    shapes = [np.exp(-np.arange(n_rings) / 2.0), np.exp(-np.arange(n_rings) / 6.0)]
    terms = [np.outer(flux, s) * 0.02 for s in shapes]
    noise = np.sqrt(np.outer(flux, np.ones(n_rings))) * 3
    kept = 0
    for _ in range(200):
        coeffs, errors = fit_profiles(rng.normal(size=noise.shape) * noise, terms, noise, flux)
        kept += bool(coeffs.any())
        assert np.all(np.isfinite(errors))  # the errors are reported either way
    assert kept <= 3
    truth = np.array([0.8, -0.5])
    signal = sum(c * t for c, t in zip(truth, terms))
    signal *= 20 / np.sqrt(np.sum((signal / noise) ** 2))
    coeffs, _ = fit_profiles(signal + rng.normal(size=noise.shape) * noise, terms, noise, flux)
    assert coeffs.any()
