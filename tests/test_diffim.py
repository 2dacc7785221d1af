"""Tests of apsnake.diffim: Alard-Lupton subtraction with decorrelation, ZOGY, masks, skips.

Synthetic pairs: the same stars (log-uniform fluxes) in a template (Gaussian, FWHM 3.5 px, low
noise, like a coadd) and a science image (Moffat beta = 4.765, FWHM 5 px), plus transients (only
in the science image) and variables (brighter or fainter), with sky and source noise and exact
variance planes; pixels in nJy. Real data: the ten registered DECam i-band stamps of the SFFT
test set (../shared/data/real/sfft/input_data, 2018 = science, 2016 = reference).
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import erf

from apsnake.diffim import (DiffimConfig, DiffimError, DiffimSkip, alard_lupton_basis, basis_sigmas,
                            subtract)
from apsnake.exposure import Exposure, PsfModel, VisitInfo
from apsnake.psf import psf_flux

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SFFT = REAL / "sfft" / "input_data"
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


# ---------------------------------------------------------------------------
# Synthetic images.
def _psf_stamps(kind, fwhm, dx, dy, half, beta=4.765, oversample=5):
    """(N, 2h+1, 2h+1) pixel-integrated unit-flux PSFs centred at (dx, dy) from the stamp centre."""
    dx = np.atleast_1d(np.asarray(dx, float))
    dy = np.atleast_1d(np.asarray(dy, float))
    g = np.arange(-half, half + 1, dtype=float)
    if kind == "gauss":
        s = np.broadcast_to(np.asarray(fwhm, float), dx.shape)[:, None] / SIGMA_TO_FWHM

        def profile(c):
            lo = (g[None, :] - 0.5 - c[:, None]) / (math.sqrt(2) * s)
            hi = (g[None, :] + 0.5 - c[:, None]) / (math.sqrt(2) * s)
            return 0.5 * (erf(hi) - erf(lo))

        return profile(dy)[:, :, None] * profile(dx)[:, None, :]
    alpha = float(fwhm) / (2 * math.sqrt(2 ** (1 / beta) - 1))
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    fine = (g[:, None] + sub[None, :]).ravel()
    out = np.empty((len(dx), len(g), len(g)))
    for k in range(len(dx)):
        r2 = (fine[:, None] - dy[k]) ** 2 + (fine[None, :] - dx[k]) ** 2
        img = (beta - 1) / (math.pi * alpha ** 2) * (1 + r2 / alpha ** 2) ** (-beta) / oversample ** 2
        out[k] = img.reshape(len(g), oversample, len(g), oversample).sum(axis=(1, 3))
    return out


def _render(shape, x, y, flux, kind, fwhm, half=20):
    ny, nx = shape
    img = np.zeros((ny + 2 * half, nx + 2 * half))
    ix = np.floor(x + 0.5).astype(int)
    iy = np.floor(y + 0.5).astype(int)
    fwhm = np.broadcast_to(np.asarray(fwhm, float), np.shape(x))
    if kind == "gauss":
        stamps = _psf_stamps(kind, fwhm, x - ix, y - iy, half) * flux[:, None, None]
    for k in range(len(x)):
        st = stamps[k] if kind == "gauss" else _psf_stamps(kind, fwhm[k], x[k] - ix[k], y[k] - iy[k], half)[0] * flux[k]
        img[iy[k]:iy[k] + 2 * half + 1, ix[k]:ix[k] + 2 * half + 1] += st
    return img[half:-half, half:-half]


def _psf_model(kind, fwhm, shape, size=25):
    st = _psf_stamps(kind, fwhm, 0.0, 0.0, size // 2)[0]
    ny, nx = shape
    return PsfModel(components=(st / st.sum())[None].astype(np.float32), spatial_order=0,
                    x0=(nx - 1) / 2, y0=(ny - 1) / 2, scale=max(nx, ny) / 2, fwhm_pixels=fwhm)


def make_pair(shape=(1024, 1024), n_stars=400, sci=("moffat", 5.0), tpl=("gauss", 3.5), sig_s=30.0,
              sig_t=15.0, gain=0.5, n_trans=6, n_var=6, seed=1, sci_fwhm_map=None):
    """Science and template Exposures (nJy), the science source table and the truth.

    ``sci_fwhm_map(x, y)`` optionally gives a spatially varying science FWHM (Gaussian PSFs).
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    x = rng.uniform(15, nx - 15, n_stars)
    y = rng.uniform(15, ny - 15, n_stars)
    flux = 10 ** rng.uniform(3.3, 6.3, n_stars)
    var_idx = rng.choice(n_stars, n_var, replace=False)
    sflux = flux.copy()
    sflux[var_idx] *= np.array([1.5, 0.6, 1.3, 0.75, 2.0, 0.5][:n_var])
    tx = rng.uniform(60, nx - 60, n_trans)
    ty = rng.uniform(60, ny - 60, n_trans)
    tf = rng.uniform(2e4, 6e4, n_trans)
    sx, sy, sf = np.r_[x, tx], np.r_[y, ty], np.r_[sflux, tf]
    sci_fwhm = sci[1] if sci_fwhm_map is None else sci_fwhm_map(sx, sy)
    s_model = _render(shape, sx, sy, sf, sci[0], sci_fwhm)
    t_model = _render(shape, x, y, flux, *tpl)
    s_var = sig_s ** 2 + np.clip(s_model, 0, None) / gain
    t_var = sig_t ** 2 + np.clip(t_model, 0, None) / (4 * gain)
    s_img = s_model + rng.normal(size=shape) * np.sqrt(s_var)
    t_img = t_model + rng.normal(size=shape) * np.sqrt(t_var)
    science = Exposure(image=s_img.astype(np.float32), mask=np.zeros(shape, np.int32),
                       variance=s_var.astype(np.float32), visit_info=VisitInfo(visit=1), detector=1, unit="nJy",
                       psf=_psf_model(sci[0], sci[1], shape))
    template = Exposure(image=t_img.astype(np.float32), mask=np.zeros(shape, np.int32),
                        variance=t_var.astype(np.float32), visit_info=VisitInfo(visit=0), detector=1, unit="nJy",
                        psf=_psf_model(tpl[0], tpl[1], shape))
    area = 4 * math.pi * (sci[1] / SIGMA_TO_FWHM) ** 2
    err = np.sqrt(area * sig_s ** 2 + sf / gain)
    sources = pd.DataFrame({"x": sx, "y": sy, "psfFlux": sf, "psfFluxErr": err, "snr": sf / err,
                            "pixelFlags_saturated": np.zeros(len(sx), bool)})
    truth = dict(x=x, y=y, flux=flux, sflux=sflux, snr=(sf / err)[:n_stars], var_idx=var_idx, tx=tx, ty=ty,
                 tf=tf, s_model=s_model, t_model=t_model, sig_s=sig_s, sig_t=sig_t)
    return science, template, sources, truth


def _source_free(truth, diff, grow=6):
    """Pixels where neither image has source flux above 0.05 sigma, away from masks."""
    from scipy.ndimage import binary_dilation

    busy = (truth["s_model"] > 0.05 * truth["sig_s"]) | (truth["t_model"] > 0.05 * truth["sig_t"])
    return ~binary_dilation(busy, iterations=grow) & (diff.mask == 0)


def _isolated_static(truth, radius=20.0):
    """Indices of stars that are not variable and have no variable or transient within ``radius``."""
    x, y = truth["x"], truth["y"]
    others = np.c_[np.r_[x[truth["var_idx"]], truth["tx"]], np.r_[y[truth["var_idx"]], truth["ty"]]]
    d = np.hypot(x[:, None] - others[None, :, 0], y[:, None] - others[None, :, 1]).min(axis=1)
    static = np.ones(len(x), bool)
    static[truth["var_idx"]] = False
    return np.flatnonzero(static & (d > radius))


def _disk_rms(diff, xs, ys, radius):
    """Per-star rms of diff / sqrt(variance) over the pixels within ``radius``, and the pooled rms."""
    z = diff.image / np.sqrt(diff.variance)
    r = int(math.ceil(radius))
    g = np.arange(-r, r + 1)
    out, pooled = [], []
    ny, nx = z.shape
    for x, y in zip(xs, ys):
        ix, iy = int(round(x)), int(round(y))
        if not (r <= ix < nx - r and r <= iy < ny - r):
            continue
        cut = z[iy - r:iy + r + 1, ix - r:ix + r + 1]
        msk = diff.mask[iy - r:iy + r + 1, ix - r:ix + r + 1] == 0
        disk = ((g[None, :] + ix - x) ** 2 + (g[:, None] + iy - y) ** 2 <= radius ** 2) & msk
        out.append(math.sqrt(np.mean(cut[disk] ** 2)))
        pooled.append(cut[disk])
    return np.array(out), math.sqrt(np.mean(np.concatenate(pooled) ** 2))


@pytest.fixture(scope="module")
def al_pair():
    science, template, sources, truth = make_pair()
    before = [a.copy() for a in (science.image, science.variance, science.mask,
                                 template.image, template.variance, template.mask)]
    result = subtract(science, template, sources)
    after = (science.image, science.variance, science.mask, template.image, template.variance, template.mask)
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "subtract modified its inputs"
    return science, template, sources, truth, result


# ---------------------------------------------------------------------------
def test_basis_widths_follow_rubin_rules():
    sigmas, size = basis_sigmas(3.5, 5.0)
    sk = math.sqrt(5.0 ** 2 - 3.5 ** 2) / SIGMA_TO_FWHM
    assert np.allclose(sigmas, [sk / 2, sk, 2 * sk]) and size == 21
    sigmas, size = basis_sigmas(5.0, 5.0)  # no seeing difference: the 0.7-px floor
    assert np.allclose(sigmas, [0.7, 1.4, 2.8]) and size == 21
    sigmas, size = basis_sigmas(3.0, 9.0)  # very different seeing: size clamped to 35
    assert sigmas[0] == pytest.approx(math.sqrt(81 - 9) / SIGMA_TO_FWHM / 2) and size == 35
    sigmas, _ = basis_sigmas(5.0, 4.9)  # deconvolution: 0.4-px floor
    assert sigmas[0] == pytest.approx(0.4)
    basis = alard_lupton_basis([0.76, 1.52, 3.03], (4, 2, 2), 21)
    assert basis.shape == (27, 21, 21)
    sums = basis.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0) and np.all(np.abs(sums[1:]) < 1e-12)
    assert np.allclose((basis[1:] ** 2).sum(axis=(1, 2)), 1.0)


def test_al_static_stars_consistent_with_noise(al_pair):
    _, _, _, truth, result = al_pair
    diff, meta = result.difference, result.metadata
    assert meta["convolved"] == "template" and meta["decorrelated"]
    idx = _isolated_static(truth)
    faint = idx[truth["snr"][idx] < 200]
    bright = idx[truth["snr"][idx] >= 200]
    per_star, pooled = _disk_rms(diff, truth["x"][faint], truth["y"][faint], 1.5 * 5.0)
    _, pooled_bright = _disk_rms(diff, truth["x"][bright], truth["y"][bright], 1.5 * 5.0)
    print(f"static stars S/N<200: n={len(per_star)} pooled rms {pooled:.3f}, median {np.median(per_star):.3f}, "
          f"max {per_star.max():.3f}; S/N>=200: n={len(bright)} pooled rms {pooled_bright:.3f}; "
          f"kernel stars {meta['n_kernel_stars']}, residual mean {meta['kernel_residual_mean']:.4f} "
          f"std {meta['kernel_residual_std']:.3f}; kernel sum {meta['kernel_sum']:.4f}")
    assert len(per_star) > 100
    assert pooled < 1.3 and np.median(per_star) < 1.2
    # PSF photometry of static stars on the difference: consistent with zero
    f, e, _, _ = psf_flux(diff.image, diff.variance, diff.psf, truth["x"][faint], truth["y"][faint])
    chi = f / e
    assert np.std(chi) < 1.3 and abs(np.mean(chi)) < 0.3
    assert abs(meta["kernel_sum"] - 1) < 0.01
    assert abs(meta["kernel_residual_mean"]) < 0.05 and meta["kernel_residual_std"] < 1.2
    assert abs(meta["differenceFootprintRatioMean"]) < 0.05


def test_al_transients_and_variables_recovered(al_pair):
    _, _, _, truth, result = al_pair
    diff = result.difference
    f, e, _, _ = psf_flux(diff.image, diff.variance, diff.psf, truth["tx"], truth["ty"])
    pull = (f - truth["tf"]) / e
    print("transients: true", np.round(truth["tf"]), "measured", np.round(f), "pull", np.round(pull, 2))
    assert np.all(np.abs(pull) < 3.5) and np.sqrt(np.mean(pull ** 2)) < 2.0
    vi = truth["var_idx"]
    fv, ev, _, _ = psf_flux(diff.image, diff.variance, diff.psf, truth["x"][vi], truth["y"][vi])
    change = truth["sflux"][vi] - truth["flux"][vi]
    loud = np.abs(change) > 10 * ev
    assert np.all(np.sign(fv[loud]) == np.sign(change[loud]))
    assert np.all(np.abs(fv[loud] - change[loud]) < 0.03 * np.abs(change[loud]) + 5 * ev[loud])


def test_al_variance_matches_noise_after_decorrelation(al_pair):
    _, _, _, truth, result = al_pair
    diff = result.difference
    free = _source_free(truth, diff)
    measured = np.var(diff.image[free])
    predicted = np.mean(diff.variance[free])
    print(f"difference noise: measured var {measured:.1f}, variance plane {predicted:.1f}, "
          f"ratio {measured / predicted:.4f}")
    assert free.sum() > 50000
    assert abs(measured / predicted - 1) < 0.1
    # decorrelated noise is white: neighbouring pixels nearly uncorrelated
    d = np.where(free, diff.image, 0)
    both = free[:, 1:] & free[:, :-1]
    rho = np.sum((d[:, 1:] * d[:, :-1])[both]) / np.sqrt(np.sum(d[:, 1:][both] ** 2) * np.sum(d[:, :-1][both] ** 2))
    assert abs(rho) < 0.05


def test_al_matched_template_and_psf(al_pair):
    science, _, _, truth, result = al_pair
    mt, diff = result.matched_template, result.difference
    assert mt.image.shape == science.image.shape and mt.psf is science.psf
    idx = _isolated_static(truth)
    bright = idx[(truth["snr"][idx] > 50) & (truth["snr"][idx] < 500)]
    f, _, _, _ = psf_flux(mt.image, mt.variance, mt.psf, truth["x"][bright], truth["y"][bright])
    assert np.median(f / truth["flux"][bright]) == pytest.approx(1.0, abs=0.01)  # templateFlux
    assert diff.psf is not science.psf and diff.psf.fwhm_pixels == pytest.approx(5.0, abs=0.6)
    assert diff.metadata["DIFFMETH"] == "alard-lupton" and diff.unit == "nJy"
    for key in ("kernel_size", "kernel_sigmas", "n_kernel_stars", "kernel_residual_mean", "kernel_residual_std",
                "template_coverage", "differenceFootprintRatioMean", "differenceFootprintRatioStdev", "time_s"):
        assert key in result.metadata
    json.dumps(result.metadata)  # plain types only


def test_difference_round_trips_through_fits(al_pair, tmp_path):
    from apsnake.exposure import read_exposure, write_exposure

    diff = al_pair[4].difference
    write_exposure(diff, tmp_path / "diff.fits")
    back = read_exposure(tmp_path / "diff.fits")
    assert np.array_equal(back.mask, diff.mask) and back.mask_planes == diff.mask_planes
    assert np.allclose(back.image, diff.image) and np.allclose(back.psf.components, diff.psf.components)
    assert back.metadata["DIFFMETH"] == "alard-lupton" and back.metadata["KERNSTAR"] == diff.metadata["KERNSTAR"]


def test_auto_mode_convolves_science_when_template_is_worse():
    science, template, sources, truth = make_pair(shape=(512, 512), n_stars=150, sci=("gauss", 3.5),
                                                  tpl=("moffat", 5.0), sig_s=20.0, sig_t=10.0, n_var=2, seed=3)
    result = subtract(science, template, sources)
    diff, meta = result.difference, result.metadata
    assert meta["convolved"] == "science"
    assert diff.psf.fwhm_pixels == pytest.approx(5.0, abs=0.6)  # the template's PSF (decorrelated)
    f, e, _, _ = psf_flux(diff.image, diff.variance, diff.psf, truth["tx"], truth["ty"])
    # The transients' own photon noise is in the convolved image here, correlated by the kernel, so
    # the independent-pixel PSF-flux error underestimates it (~1.6x for these bright transients):
    # check the fluxes to 3 %.
    print("auto mode transients: flux ratio", np.round(f / truth["tf"], 4), "pull", np.round((f - truth["tf"]) / e, 2))
    assert np.all(np.abs(f / truth["tf"] - 1) < 0.03) and abs(np.mean(f / truth["tf"]) - 1) < 0.01
    free = _source_free(truth, diff)
    ratio = np.var(diff.image[free]) / np.mean(diff.variance[free])
    assert abs(ratio - 1) < 0.1
    idx = _isolated_static(truth)
    faint = idx[truth["snr"][idx] < 200]
    _, pooled = _disk_rms(diff, truth["x"][faint], truth["y"][faint], 7.5)
    assert pooled < 1.3
    forced = subtract(science, template, sources, DiffimConfig(convolve="template"))
    assert forced.metadata["convolved"] == "template"


def test_no_data_and_template_mask_propagation():
    science, template, sources, _ = make_pair(shape=(512, 512), n_stars=150, n_var=2, n_trans=2, seed=5)
    nd = template.mask_bit("NO_DATA")
    template.mask[:, :150] |= nd
    template.image[:, :150] = np.nan
    template.mask[300:303, 400:403] |= template.mask_bit("SAT")
    template.mask[100:110, 300:310] |= template.mask_bit("DETECTED")
    template.mask[200, 200] |= template.mask_bit("BAD")
    result = subtract(science, template, sources)
    diff = result.difference
    kh = result.metadata["mask_growth_radius"]  # the kernel's 99%-weight half-width
    assert kh <= result.metadata["kernel_size"] // 2
    no_data = diff.mask_of("NO_DATA")
    assert no_data[:, :150 + kh].all() and not no_data[:, 150 + kh + 1:].any()
    assert np.all(diff.image[no_data] == 0) and np.isfinite(diff.image).all() and np.isfinite(diff.variance).all()
    sat_t = diff.mask_of("SAT_TEMPLATE")
    assert sat_t[300 - kh:303 + kh, 400 - kh:403 + kh].all() and sat_t.sum() == (3 + 2 * kh) ** 2
    assert not diff.mask_of("SAT").any()
    assert not diff.mask_of("DETECTED").any()
    assert diff.mask_of("BAD")[200, 200]
    assert diff.mask_of("EDGE")[:kh].all() and not diff.mask_of("EDGE")[kh:-kh, kh:-kh].any()
    assert result.metadata["template_coverage"] == pytest.approx(1 - 150 / 512)
    assert np.all(result.matched_template.image[:, :150] == 0)
    # kernel stars avoided the uncovered part
    ks = result.metadata["kernel_stars"]
    assert min(ks["x"]) > 150


def test_skip_when_template_coverage_too_low():
    science, template, sources, _ = make_pair(shape=(256, 256), n_stars=40, n_var=0, n_trans=0, seed=7)
    template.mask[:, :235] |= template.mask_bit("NO_DATA")
    with pytest.raises(DiffimSkip, match="covers 8.2%"):
        subtract(science, template, sources)


def test_skip_when_too_few_kernel_stars():
    science, template, sources, _ = make_pair(shape=(256, 256), n_stars=40, n_var=0, n_trans=0, seed=7)
    usable = sources[(sources.snr > 20) & (sources.snr < 400)]
    with pytest.raises(DiffimSkip, match="only [0-2] usable kernel stars"):
        subtract(science, template, usable.iloc[:2])
    faint = sources.assign(snr=5.0)
    with pytest.raises(DiffimSkip, match="min_kernel_stars=3"):
        subtract(science, template, faint)


def test_config_from_options_and_skipped_difference(tmp_path):
    from apsnake.diffim import skipped_difference
    from apsnake.exposure import read_exposure, write_exposure
    from apsnake.options import OptionsError, dataclass_from_options

    assert dataclass_from_options(DiffimConfig, None, "diffim") == DiffimConfig()
    cfg = dataclass_from_options(DiffimConfig, {"method": "zogy", "degrees": [4, 2, 2], "kernel_star_snr": [20, 400]},
                                 "diffim")
    assert cfg.method == "zogy" and cfg.degrees == (4, 2, 2) and cfg.kernel_star_snr == (20, 400)
    with pytest.raises(OptionsError, match="unknown diffim option"):
        dataclass_from_options(DiffimConfig, {"kernel_sise": 21}, "diffim")
    with pytest.raises(DiffimError, match="method"):
        dataclass_from_options(DiffimConfig, {"method": "hotpants"}, "diffim")
    science, template, sources, _ = make_pair(shape=(128, 128), n_stars=20, n_var=0, n_trans=0, seed=9)
    try:
        subtract(science, template, sources.iloc[:1])
    except DiffimSkip as reason:
        skipped = skipped_difference(science, str(reason))
    assert skipped.mask_of("NO_DATA").all() and not skipped.image.any()
    assert not science.mask_of("NO_DATA").any()  # input untouched
    write_exposure(skipped, tmp_path / "skipped.fits")
    back = read_exposure(tmp_path / "skipped.fits")
    assert back.metadata["DIFFSKIP"] is True and "kernel stars" in back.metadata["DIFFWHY"]


def test_bad_input_raises():
    science, template, sources, _ = make_pair(shape=(128, 128), n_stars=20, n_var=0, n_trans=0, seed=9)
    with pytest.raises(DiffimError):
        DiffimConfig(method="hotpants")
    with pytest.raises(DiffimError):
        DiffimConfig(degrees=(4, 2))
    bad = Exposure(image=template.image[:64], mask=template.mask[:64], variance=template.variance[:64],
                   visit_info=template.visit_info, detector=1, psf=template.psf)
    with pytest.raises(DiffimError, match="same pixel grid"):
        subtract(science, bad, sources)
    template.psf = None
    with pytest.raises(DiffimError, match="no PSF"):
        subtract(science, template, sources)


def test_without_decorrelation_variance_and_psf(al_pair):
    science, template, sources, truth, _ = al_pair
    result = subtract(science, template, sources, DiffimConfig(decorrelate=False))
    diff = result.difference
    assert not result.metadata["decorrelated"] and diff.psf.fwhm_pixels == pytest.approx(5.0, abs=0.2)
    free = _source_free(truth, diff)
    assert abs(np.var(diff.image[free]) / np.mean(diff.variance[free]) - 1) < 0.1
    f, e, _, _ = psf_flux(diff.image, diff.variance, diff.psf, truth["tx"], truth["ty"])
    assert np.all(np.abs(f - truth["tf"]) < 4 * e)


def test_zogy(al_pair):
    science, template, sources, truth, _ = al_pair
    from apsnake.detection import smooth_for_detection
    from apsnake.psf import psf_sigma

    result = subtract(science, template, sources, DiffimConfig(method="zogy"))
    diff = result.difference
    # The significance the DIA detector sees: D filtered with (a Gaussian of the width of) P_D,
    # over its noise from the variance plane.
    smooth, noise = smooth_for_detection(diff.image, diff.variance, diff.mask_of("NO_DATA"),
                                         psf_sigma(diff.psf, 255.5, 255.5))
    score = smooth / noise
    peaks = []
    for x, y in zip(truth["tx"], truth["ty"]):
        ix, iy = int(round(x)), int(round(y))
        box = score[iy - 10:iy + 11, ix - 10:ix + 11]
        py, px = np.unravel_index(np.argmax(box), box.shape)
        assert math.hypot(px - 10 + ix - x, py - 10 + iy - y) <= 1.0
        peaks.append(box[py, px])
    free = _source_free(truth, diff, grow=10)
    s_std = np.std(score[free])
    f, e, _, _ = psf_flux(diff.image, diff.variance, diff.psf, truth["tx"], truth["ty"])
    print(f"ZOGY: significance at transients {np.round(peaks, 1)}, noise std {s_std:.3f}; flux pulls "
          f"{np.round((f - truth['tf']) / e, 2)}; D noise ratio "
          f"{np.var(diff.image[free]) / np.mean(diff.variance[free]):.3f}")
    assert min(peaks) > 10
    assert abs(s_std - 1) < 0.1
    assert np.all(np.abs(f - truth["tf"]) < 3.5 * e)
    assert abs(np.var(diff.image[free]) / np.mean(diff.variance[free]) - 1) < 0.1
    # static stars: significance consistent with noise at faint static stars
    idx = _isolated_static(truth)
    faint = idx[truth["snr"][idx] < 100]
    at_stars = score[np.round(truth["y"][faint]).astype(int), np.round(truth["x"][faint]).astype(int)]
    assert np.std(at_stars) < 1.5


def test_full_ccd_spatial_kernel():
    """A full 2048 x 4096 DECam CCD with a science FWHM varying from 4.6 to 5.4 px along y."""
    shape = (4096, 2048)
    science, template, sources, truth = make_pair(
        shape=shape, n_stars=2000, sci=("gauss", 5.0), tpl=("gauss", 3.5), n_trans=10, n_var=6, seed=11,
        sci_fwhm_map=lambda x, y: 4.6 + 0.8 * y / shape[0])
    result = subtract(science, template, sources)  # its time: benchmarks/bench_diffim.py
    meta = result.metadata
    print(f"full CCD: {meta['n_kernel_stars']} kernel stars, kernel sum {meta['kernel_sum']:.4f}, "
          f"residual std {meta['kernel_residual_std']:.3f}")
    assert meta["kernel_spatial_order"] == 1 and meta["n_kernel_stars"] > 500
    assert meta["kernel_residual_std"] < 1.15
    diff = result.difference
    idx = _isolated_static(truth)
    faint = idx[truth["snr"][idx] < 200]
    _, pooled = _disk_rms(diff, truth["x"][faint], truth["y"][faint], 7.5)
    top = faint[truth["y"][faint] > 3600]
    bottom = faint[truth["y"][faint] < 500]
    _, pooled_top = _disk_rms(diff, truth["x"][top], truth["y"][top], 7.5)
    _, pooled_bottom = _disk_rms(diff, truth["x"][bottom], truth["y"][bottom], 7.5)
    print(f"full CCD static stars: pooled rms {pooled:.3f} (bottom {pooled_bottom:.3f}, top {pooled_top:.3f})")
    assert pooled < 1.3 and pooled_top < 1.3 and pooled_bottom < 1.3


# ---------------------------------------------------------------------------
# Real DECam stamps (SFFT test data).
def _load_real(path):
    """Exposure of one sky-subtracted DECam stamp: variance = sky variance + image / GAIN, PSF fitted
    on sep-detected stars (a Gaussian of the header FWHM if the fit fails)."""
    import sep
    from astropy.io import fits

    from apsnake.psf import PsfConfig, PsfError, fit_psf

    with fits.open(path) as hdul:
        image = np.array(hdul[0].data, float)
        header = hdul[0].header
    gain = float(header.get("GAIN", 0) or 0)
    sky = sep.Background(np.ascontiguousarray(image)).globalrms
    variance = sky ** 2 + (np.clip(image, 0, None) / gain if gain > 0 else 0.0)
    return image, variance, _real_psf(image, variance, float(header.get("FWHM", 4.0)), sep, PsfConfig,
                                      PsfError, fit_psf)


def _real_psf(image, variance, fwhm_header, sep, PsfConfig, PsfError, fit_psf):
    data, err = np.ascontiguousarray(image), np.sqrt(variance)
    objects = sep.extract(data, 10, err=err, minarea=9)
    flux, flux_err, _ = sep.sum_circle(data, objects["x"], objects["y"], 6.0, err=err)
    good = (flux / flux_err > 30) & (objects["flag"] == 0) & (objects["peak"] < 30000)
    try:
        return fit_psf(image, variance, None, objects["x"][good], objects["y"][good],
                       PsfConfig(min_stars=4, spatial_order=0, stamp_size=25)).model
    except PsfError:
        shape = image.shape
        return _psf_model("gauss", fwhm_header, shape)


def _real_exposure(image, variance, psf, visit):
    shape = image.shape
    return Exposure(image=image.astype(np.float32), mask=np.zeros(shape, np.int32),
                    variance=variance.astype(np.float32), visit_info=VisitInfo(visit=visit), detector=37,
                    unit="adu", psf=psf)


def _residual_peaks(diff, n=10, edge=15):
    """Peaks of |S/N| of the PSF-filtered difference: (x, y, S/N, reduced chi2 of a PSF fit)."""
    from scipy.ndimage import maximum_filter
    from scipy.signal import fftconvolve

    ny, nx = diff.image.shape
    p = diff.psf.evaluate((nx - 1) / 2, (ny - 1) / 2)
    sn = (fftconvolve(diff.image, p[::-1, ::-1], mode="same")
          / np.sqrt(fftconvolve(diff.variance, (p ** 2)[::-1, ::-1], mode="same")))
    sn[:edge], sn[-edge:], sn[:, :edge], sn[:, -edge:] = 0, 0, 0, 0
    sn[diff.mask != 0] = 0
    a = np.abs(sn)
    ys, xs = np.nonzero((a == maximum_filter(a, size=5)) & (a > 5))
    order = np.argsort(-a[ys, xs])[:n]
    xs, ys = xs[order], ys[order]
    _, _, chi2, ndata = psf_flux(diff.image, diff.variance, diff.psf, xs.astype(float), ys.astype(float),
                                 radius=2 * diff.psf.fwhm_pixels)
    return [(int(x), int(y), float(sn[y, x]), float(c / max(nd - 1, 1))) for x, y, c, nd in zip(xs, ys, chi2, ndata)]


@pytest.mark.skipif(not SFFT.exists(), reason="../shared/data/real/sfft/input_data is not present")
def test_real_decam_sfft_stamps():
    """2016 reference stack as the template, each 2018 stamp as the science image.

    The strongest point-like residual (PSF fit chi2/dof < 2, which rejects cosmic rays, satellite
    trails and dipole lobes) is the source at the stamp centre that brightened from ~17k to
    ~29k ADU, in all five science stamps; the star at (101, 73) moved between the epochs (proper
    motion; ~0.3 px more than the ~0.45-px registration offset that the kernel absorbs) and
    leaves a dipole in every stamp.
    """
    refs = [_load_real(p) for p in sorted(glob.glob(str(SFFT / "DEC-OBS18?.mini.fits")))]
    scis = {Path(p).name: _load_real(p) for p in sorted(glob.glob(str(SFFT / "DEC-OBS04?.mini.fits")))}
    assert len(refs) == 5 and len(scis) == 5
    stack = np.array([r[0] for r in refs])
    vstack = np.array([r[1] for r in refs])
    keep = np.abs(stack - np.median(stack, axis=0)) < 5 * np.sqrt(vstack)  # clip cosmic rays
    n = np.maximum(keep.sum(axis=0), 1)
    t_img = np.where(keep, stack, 0).sum(axis=0) / n
    t_var = np.where(keep, vstack, 0).sum(axis=0) / n ** 2
    import sep

    from apsnake.psf import PsfConfig, PsfError, fit_psf

    template = _real_exposure(t_img, t_var, _real_psf(t_img, t_var, 3.8, sep, PsfConfig, PsfError, fit_psf), 0)
    dipoles, transients = [], []
    for name, (img, var, psf) in scis.items():
        result = subtract(_real_exposure(img, var, psf, 1), template)
        diff, meta = result.difference, result.metadata
        good = diff.mask == 0
        z = (diff.image / np.sqrt(diff.variance))[good]
        robust = 1.4826 * np.median(np.abs(z - np.median(z)))
        peaks = _residual_peaks(diff)
        near_star = [p for p in peaks if math.hypot(p[0] - 101, p[1] - 73) < 8 and abs(p[2]) > 5]
        point_like = [p for p in peaks if p[3] < 2.0 and math.hypot(p[0] - 101, p[1] - 73) >= 8]
        print(f"{name}: {meta['convolved']} convolved, {meta['n_kernel_stars']} kernel stars, kernel size "
              f"{meta['kernel_size']}, kernel sum {meta['kernel_sum']:.3f}, residual std "
              f"{meta['kernel_residual_std']:.2f}, robust std(D/sigma) {robust:.3f}; moving star {near_star[:2]}, "
              f"strongest point-like {point_like[:1]}; halo {meta.get('halo_fit_stars')} stars, coeffs {meta.get('halo_coeffs')} +- {meta.get('halo_coeff_errors')}")
        assert 0.8 < robust < 1.4
        assert any(p[2] > 0 for p in near_star) and any(p[2] < 0 for p in near_star), "no dipole at the moving star"
        dipoles.append(np.mean([p[:2] for p in near_star[:2]], axis=0))
        assert point_like and point_like[0][2] > 5
        transients.append(point_like[0][:2])
    dipoles, transients = np.array(dipoles), np.array(transients)
    assert np.all(np.hypot(*(dipoles - np.median(dipoles, axis=0)).T) <= 1.5)
    assert np.all(np.hypot(*(transients - np.median(transients, axis=0)).T) <= 1.0)
    assert np.allclose(np.median(transients, axis=0), [129, 128], atol=2)


@pytest.mark.skipif(not SFFT.exists(), reason="../shared/data/real/sfft/input_data is not present")
def test_real_stamps_kernel_never_uses_the_transient():
    """The source at the stamp centre brightened between 2016 and 2018: it must never be a kernel
    star (its flux ratio is an outlier among the candidates), the kernel found with both epochs
    stacked must agree with the per-stamp kernels (no S/N cap emptying the bright end of the deep
    stack), and the difference must hold the transient's whole flux in every stamp: the same as
    direct photometry of the science stamp (scaled by the kernel sum) minus the template.

    The five 2018 stamps were taken over 4 hours at airmass 1.23-1.65, and the centre source's
    brightness relative to the field stars differs between them by ~3 % in the stamps themselves
    (stamps b and c brighter); its difference flux is therefore compared with each stamp's own
    direct measurement, not between stamps.
    """
    import sep

    from apsnake.psf import PsfConfig, PsfError, fit_psf

    def stacked(items):
        img = np.array([r[0] for r in items])
        var = np.array([r[1] for r in items])
        keep = np.abs(img - np.median(img, axis=0)) < 5 * np.sqrt(var)  # clip cosmic rays
        n = np.maximum(keep.sum(axis=0), 1)
        img, var = np.where(keep, img, 0).sum(axis=0) / n, np.where(keep, var, 0).sum(axis=0) / n ** 2
        return img, var, _real_psf(img, var, 3.8, sep, PsfConfig, PsfError, fit_psf)

    refs = [_load_real(p) for p in sorted(glob.glob(str(SFFT / "DEC-OBS18?.mini.fits")))]
    scis = [_load_real(p) for p in sorted(glob.glob(str(SFFT / "DEC-OBS04?.mini.fits")))]
    t_img, t_var, t_psf = stacked(refs)
    template = _real_exposure(t_img, t_var, t_psf, 0)
    centre = (128.6, 127.7)

    def aperture(img, var, radius=15.0):  # ~3 FWHM: the wings are inside
        f, e, _ = sep.sum_circle(np.ascontiguousarray(img, float), [centre[0]], [centre[1]], radius,
                                 err=np.sqrt(np.ascontiguousarray(var, float)))
        return f[0], e[0]

    f_tpl, e_tpl = aperture(t_img, t_var)
    sums = []
    for img, var, psf in scis:
        result = subtract(_real_exposure(img, var, psf, 1), template)
        meta, diff = result.metadata, result.difference
        stars = meta["kernel_stars"]
        used = np.asarray(stars["used"], bool)
        dist = np.hypot(np.asarray(stars["x"]) - 129, np.asarray(stars["y"]) - 128)
        assert not (used & (dist < 3)).any(), "the brightened centre source was used as a kernel star"
        assert meta["kernel_candidates"]["constant"] < meta["kernel_candidates"]["clean"]  # it was there, and rejected
        ksum = meta["kernel_sum"]
        sums.append(ksum)
        f_sci, e_sci = aperture(img, var)
        f_diff, e_diff = aperture(diff.image, diff.variance)
        direct, e_direct = f_sci / ksum - f_tpl, math.hypot(e_sci / ksum, e_tpl)
        assert abs(f_diff / ksum - direct) < 2.0 * math.hypot(e_diff / ksum, e_direct), (f_diff / ksum, direct)
    s_img, s_var, s_psf = stacked(scis)
    both = subtract(_real_exposure(s_img, s_var, s_psf, 1), template).metadata["kernel_sum"]
    print(f"kernel sums per stamp {np.round(sums, 4)}, mean {np.mean(sums):.4f}; stacked epochs {both:.4f}")
    # Issue 11 asks for 1 %. The per-stamp sums scatter by +-2.5 % (0.985-1.047: 3-5 kernel
    # stars, the brightest of which sets the sum); the stacked fit agrees with their mean to 0.2 %
    # (1.0187 vs 1.0165). It was 1.15 % off (1.0049) while the halo terms, fitted on the stack's
    # five bright stars at 2.8-3 sigma each, moved its sum by -1.2 %: terms that are not jointly
    # significant are now left out (``halo.fit_profiles``).
    assert abs(both / np.mean(sums) - 1) < 0.01


def test_model_error_adds_a_floor_where_the_template_is_bright(al_pair):
    from dataclasses import replace as dc_replace

    science, template, sources, _, base = al_pair
    floor = subtract(science, template, sources, dc_replace(DiffimConfig(), model_error=0.01))
    expected = base.difference.variance + (0.01 * base.matched_template.image) ** 2
    np.testing.assert_allclose(floor.difference.variance, expected, rtol=1e-4)
    faint = np.abs(base.matched_template.image) < 10 * np.sqrt(np.median(base.difference.variance))
    assert np.allclose(floor.difference.variance[faint], base.difference.variance[faint], rtol=0.01)
    assert floor.metadata["model_error"] == 0.01
