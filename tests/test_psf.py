"""PSF: star selection, the PSFEx-like model, FWHM and PSF photometry.

The main scene is a full DECam CCD (2048 x 4096 px) with a pixel-integrated elliptical
Moffat (beta 3) PSF whose FWHM grows from 3.6 px at the centre to 4.0 px in the corners
(quadratically with radius) and whose shear varies across the CCD, ~320 isolated stars
(S/N ~20 to ~1500), galaxies, saturated stars and close pairs, on a 1000 e-/px sky.
Everything is deterministic (fixed seeds).
"""


import numpy as np
import pytest

from apsnake.exposure import PsfModel
from apsnake.psf import (PsfConfig, PsfError, fit_psf, fit_psf_model, measure_fwhm, psf_flux, select_psf_stars,
                         windowed_moments)

NX, NY = 2048, 4096          # DECam CCD: columns, rows
SKY = 1000.0                 # e-/px: the variance of the background-subtracted sky
SATURATION = 60000.0         # e-, counted above zero (sky included)
BETA = 3.0
HALF = 20                    # rendered star stamps: 41 x 41 px
STAMP_HALF = 12              # PsfConfig().stamp_size // 2


def true_fwhm(x, y):
    """Nominal FWHM (px) of the (unpixelated) Moffat: 3.6 at the centre, 4.0 in the corners."""
    u = (np.asarray(x, float) - (NX - 1) / 2) / ((NX - 1) / 2)
    v = (np.asarray(y, float) - (NY - 1) / 2) / ((NY - 1) / 2)
    return 3.6 + 0.2 * (u**2 + v**2)


def true_shear(x, y):
    u = (np.asarray(x, float) - (NX - 1) / 2) / ((NX - 1) / 2)
    v = (np.asarray(y, float) - (NY - 1) / 2) / ((NY - 1) / 2)
    return 0.03 + 0.02 * u, 0.02 * v


def moffat_stamp(fwhm, g1, g2, dx, dy, half=HALF, sub=5):
    """Pixel-integrated elliptical Moffat of unit total flux centred at (dx, dy) from the centre.

    Integrated over each pixel with sub x sub samples; (g1, g2) is an area-preserving shear.
    """
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / BETA) - 1))
    s = (np.arange(sub) + 0.5) / sub - 0.5
    g = np.arange(-half, half + 1)
    xx = (g[None, :, None, None] + s[None, None, None, :]) - dx
    yy = (g[:, None, None, None] + s[None, None, :, None]) - dy
    det = np.sqrt(1 - g1**2 - g2**2)
    xp = ((1 - g1) * xx - g2 * yy) / det
    yp = (-g2 * xx + (1 + g1) * yy) / det
    prof = (BETA - 1) / (np.pi * alpha**2) * (1 + (xp**2 + yp**2) / alpha**2) ** (-BETA)
    return prof.mean(axis=(2, 3))


def true_psf_fwhm(x, y):
    """measure_fwhm of the true pixel-integrated PSF at (x, y), on a model-sized stamp."""
    g1, g2 = true_shear(x, y)
    return measure_fwhm(moffat_stamp(true_fwhm(x, y), g1, g2, 0.0, 0.0, half=STAMP_HALF))


def _place(rng, placed, n, margin, min_dist):
    pts = []
    while len(pts) < n:
        p = rng.uniform([margin, margin], [NX - 1 - margin, NY - 1 - margin])
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 > min_dist**2 for q in placed + pts):
            pts.append(p)
    placed.extend(pts)
    return pts


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(20260429)
    placed: list = []
    rows = []  # x, y, flux (e-), kind, size factor
    for p in _place(rng, placed, 320, 22, 40):
        rows.append((p[0], p[1], 10 ** rng.uniform(np.log10(4e3), np.log10(8e5)), "star", 1.0))
    for p in _place(rng, placed, 40, 22, 40):
        rows.append((p[0], p[1], 10 ** rng.uniform(5.0, 5.7), "galaxy", rng.uniform(1.6, 2.5)))
    for p in _place(rng, placed, 8, 30, 60):
        rows.append((p[0], p[1], 10 ** rng.uniform(6.6, 7.0), "saturated", 1.0))
    for p in _place(rng, placed, 15, 30, 50):
        f = 10 ** rng.uniform(4.8, 5.5)
        sep, ang = rng.uniform(4, 8), rng.uniform(0, 2 * np.pi)
        rows.append((p[0], p[1], f, "pair", 1.0))
        rows.append((p[0] + sep * np.cos(ang), p[1] + sep * np.sin(ang), f * rng.uniform(0.3, 1.0), "pair", 1.0))
    x = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    flux = np.array([r[2] for r in rows])
    kind = np.array([r[3] for r in rows])
    size_factor = np.array([r[4] for r in rows])

    model = np.zeros((NY, NX))
    frac_in_stamp = np.zeros(len(x))  # fraction of the flux inside the 25 x 25 PSF-flux stamp
    for i in range(len(x)):
        ix, iy = int(np.floor(x[i] + 0.5)), int(np.floor(y[i] + 0.5))
        g1, g2 = true_shear(x[i], y[i])
        st = moffat_stamp(true_fwhm(x[i], y[i]) * size_factor[i], g1, g2, x[i] - ix, y[i] - iy)
        frac_in_stamp[i] = st[HALF - STAMP_HALF:HALF + STAMP_HALF + 1, HALF - STAMP_HALF:HALF + STAMP_HALF + 1].sum()
        model[iy - HALF:iy + HALF + 1, ix - HALF:ix + HALF + 1] += flux[i] * st
    variance = SKY + model
    image = model + rng.standard_normal(model.shape) * np.sqrt(variance)
    saturated = image + SKY >= SATURATION
    image[saturated] = SATURATION - SKY

    # The detection catalogue: windowed centroids and sizes, aperture S/N, pixel flags.
    import sep

    x0 = x + rng.normal(0, 0.2, len(x))
    y0 = y + rng.normal(0, 0.2, len(y))
    xw, yw, size = windowed_moments(image, x0, y0, saturated, sigma=1.6)
    xw, yw = np.where(np.isfinite(xw), xw, x0), np.where(np.isfinite(yw), yw, y0)
    ap, ap_err, _ = sep.sum_circle(image, xw, yw, 6.0, err=np.sqrt(variance))
    snr = ap / ap_err
    ix, iy = np.floor(xw + 0.5).astype(int), np.floor(yw + 0.5).astype(int)
    flags = np.array([saturated[b - 3:b + 4, a - 3:a + 4].any() for a, b in zip(ix, iy)])
    cr_flagged = np.zeros(len(x), bool)
    cr_flagged[rng.choice(np.flatnonzero((kind == "star") & (flux > 5e4)), 10, replace=False)] = True
    flags |= cr_flagged
    return dict(image=image.astype(np.float32), variance=variance.astype(np.float32), bad=saturated,
                x=x, y=y, flux=flux, kind=kind, frac_in_stamp=frac_in_stamp, xw=xw, yw=yw, size=size,
                ap=ap, snr=snr, flags=flags, cr_flagged=cr_flagged)


@pytest.fixture(scope="module")
def fitted(scene):
    s = scene
    selected = select_psf_stars(s["xw"], s["yw"], s["ap"], s["snr"], s["size"], s["flags"])
    fit = fit_psf(s["image"], s["variance"], s["bad"], s["xw"][selected], s["yw"][selected])
    return selected, fit


def _clean_stars(scene):
    return (scene["kind"] == "star") & ~scene["flags"]


# ---------------------------------------------------------------------------
def test_measure_fwhm_gaussian_and_moffat():
    g = np.arange(-12, 13)
    for fwhm in (2.5, 3.0, 4.0, 6.0):
        sigma = fwhm / 2.3548
        for q in (1.0, 0.7):  # elliptical: the geometric mean of the axes' FWHMs
            sx, sy = sigma / np.sqrt(q), sigma * np.sqrt(q)
            for off in (0.0, 0.3):
                im = np.exp(-0.5 * (((g[None, :] - off) / sx) ** 2 + ((g[:, None] - off / 2) / sy) ** 2))
                assert measure_fwhm(im) == pytest.approx(fwhm, rel=0.005)
    # Moffat sampled at pixel centres: the analytic FWHM, not a second-moment width.
    alpha = 4.0 / (2 * np.sqrt(2 ** (1 / BETA) - 1))
    moffat = (1 + (g[None, :] ** 2 + g[:, None] ** 2) / alpha**2) ** -BETA
    assert measure_fwhm(moffat) == pytest.approx(4.0, rel=0.005)
    stack = np.stack([moffat, 3 * moffat])
    assert np.allclose(measure_fwhm(stack), measure_fwhm(moffat))
    assert np.isnan(measure_fwhm(np.zeros((9, 9))))


def test_evaluate_many_matches_evaluate():
    rng = np.random.default_rng(5)
    comps = rng.normal(size=(6, 25, 25)).astype(np.float32)
    comps[0] += 5.0
    psf = PsfModel(components=comps, spatial_order=2, x0=1023.5, y0=2047.5, scale=2048.0)
    xs, ys = rng.uniform(0, NX, 7), rng.uniform(0, NY, 7)
    many = psf.evaluate_many(xs, ys)
    for k in range(7):
        assert np.allclose(many[k], psf.evaluate(xs[k], ys[k]), rtol=1e-5, atol=1e-7)


def test_select_psf_stars_rules():
    rng = np.random.default_rng(11)
    gx, gy = np.meshgrid(np.arange(100, 1000, 100), np.arange(100, 800, 100))
    x, y = gx.ravel().astype(float), gy.ravel().astype(float)
    n = len(x)  # 63 isolated stars on the locus
    flux = 10 ** rng.uniform(4, 6, n)
    snr = np.sqrt(flux)  # 100 .. 1000
    size = 3.8 * (1 + rng.normal(0, 0.02, n))
    flags = np.zeros(n, bool)
    extra = []  # x, y, flux, snr, size, flag

    def add(*row):
        extra.append(row)
        return n + len(extra) - 1

    flagged = add(1500.0, 100.0, 1e5, 300.0, 3.8, True)
    faint = add(1500.0, 200.0, 900.0, 30.0, 3.8, False)
    pair_a = add(1500.0, 300.0, 1e5, 300.0, 3.8, False)
    pair_b = add(1506.0, 300.0, 5e4, 200.0, 3.8, False)
    with_faint_neighbour = add(1500.0, 400.0, 1e5, 300.0, 3.8, False)
    faint_neighbour = add(1506.0, 400.0, 5e3, 40.0, 3.8, False)
    far_a = add(1500.0, 500.0, 1e5, 300.0, 3.8, False)
    far_b = add(1515.0, 500.0, 1e5, 300.0, 3.8, False)
    next_to_nan = add(1500.0, 600.0, 1e5, 300.0, 3.8, False)
    nan_neighbour = add(1505.0, 600.0, np.nan, np.nan, np.nan, True)  # e.g. a saturated star
    galaxies = [add(1700.0, 100.0 * k, 1e5, 300.0, 6.5 + 0.3 * k, False) for k in range(1, 8)]
    artefact = add(1800.0, 100.0, 1e5, 300.0, 1.2, False)
    ex = np.array(extra, dtype=float)
    x, y = np.concatenate([x, ex[:, 0]]), np.concatenate([y, ex[:, 1]])
    flux, snr = np.concatenate([flux, ex[:, 2]]), np.concatenate([snr, ex[:, 3]])
    size, flags = np.concatenate([size, ex[:, 4]]), np.concatenate([flags, ex[:, 5].astype(bool)])

    sel = select_psf_stars(x, y, flux, snr, size, flags, PsfConfig())
    assert sel[:n].mean() > 0.95  # the 3-sigma clip of the locus may drop an outlier or two
    for i in (flagged, faint, pair_a, pair_b, faint_neighbour, next_to_nan, nan_neighbour, artefact, *galaxies):
        assert not sel[i], i
    for i in (with_faint_neighbour, far_a, far_b):
        assert sel[i], i
    # max_stars keeps the highest-S/N ones.
    few = select_psf_stars(x, y, flux, snr, size, flags, PsfConfig(max_stars=20))
    assert few.sum() == 20
    assert snr[few].min() >= np.sort(snr[sel])[-20]
    assert not select_psf_stars([], [], [], [], [], []).any()
    with pytest.raises(PsfError):
        select_psf_stars(x, y[:-1], flux, snr, size, flags)


def test_selection_on_image(scene, fitted):
    s = scene
    selected, fit = fitted
    kind = s["kind"]
    assert not (selected & s["flags"]).any()
    assert not (selected & s["cr_flagged"]).any()
    assert not (selected & (s["snr"] < 50)).any()
    for k in ("galaxy", "pair", "saturated"):
        assert not selected[kind == k].any(), k
    good = _clean_stars(s) & (s["snr"] > 60)
    assert selected[good].mean() > 0.9
    assert fit.used.sum() >= 0.95 * selected.sum()


def test_model_fwhm_matches_truth(scene, fitted):
    _, fit = fitted
    psf = fit.model
    assert psf.spatial_order == 2 and psf.components.shape == (6, 25, 25)
    for px, py in [((NX - 1) / 2, (NY - 1) / 2), (0, 0), (NX - 1, 0), (0, NY - 1), (NX - 1, NY - 1)]:
        got, truth = measure_fwhm(psf.evaluate(px, py)), true_psf_fwhm(px, py)
        assert got == pytest.approx(truth, rel=0.03), (px, py, got, truth)
    median_truth = np.median([true_psf_fwhm(a, b) for a, b in zip(fit.x[fit.used], fit.y[fit.used])])
    assert psf.fwhm_pixels == pytest.approx(median_truth, rel=0.02)
    # Unit sum and centred on the stamp centre.
    image = psf.evaluate(300.0, 3000.0)
    assert image.sum() == pytest.approx(1.0)
    g = np.arange(-12, 13)
    assert abs((image.sum(axis=0) * g).sum()) < 0.02 and abs((image.sum(axis=1) * g).sum()) < 0.02


def test_residuals_consistent_with_noise(scene, fitted):
    s = scene
    _, fit = fitted
    psf = fit.model
    bright = _clean_stars(s) & (s["snr"] > 100)
    assert bright.sum() > 100
    # Within 2 FWHM (the core, where a wrong model shows) and over the whole stamp.
    _, _, chi2, nd = psf_flux(s["image"], s["variance"], psf, s["x"][bright], s["y"][bright], s["bad"],
                              radius=2 * psf.fwhm_pixels)
    core = chi2 / (nd - 1)
    _, _, chi2_all, nd_all = psf_flux(s["image"], s["variance"], psf, s["x"][bright], s["y"][bright], s["bad"])
    stamp = chi2_all / (nd_all - 1)
    assert np.mean(core) < 1.25 and np.percentile(core, 95) < 1.6
    assert np.mean(stamp) < 1.1
    # The fit's own diagnostic agrees.
    assert np.nanmedian(fit.chi2_dof[fit.used]) < 1.25


def test_psf_flux_recovers_injected_fluxes(scene, fitted):
    s = scene
    _, fit = fitted
    clean = _clean_stars(s)
    flux, err, chi2, nd = psf_flux(s["image"], s["variance"], fit.model, s["x"][clean], s["y"][clean], s["bad"])
    expected = s["flux"][clean] * s["frac_in_stamp"][clean]  # the model is unit-sum over its stamp
    pull = (flux - expected) / err
    assert np.all(np.isfinite(pull)) and np.all(nd == 625)
    assert abs(np.mean(pull)) < 0.15
    assert 0.85 < np.std(pull) < 1.15
    sn = expected / err
    for lo, hi in ((0, 100), (100, 300), (300, np.inf)):
        band = (sn >= lo) & (sn < hi)
        assert band.sum() > 40
        assert abs(np.mean(pull[band])) < 0.3, (lo, hi)
        assert 0.75 < np.std(pull[band]) < 1.25, (lo, hi)
    # flux_err matches the scatter of the faint stars (sky-dominated).
    faint = sn < 100
    assert np.std(flux[faint] - expected[faint]) / np.sqrt(np.mean(err[faint] ** 2)) == pytest.approx(1.0, abs=0.15)


def test_psf_flux_on_noise_and_edges():
    rng = np.random.default_rng(7)
    shape = (600, 500)
    variance = np.full(shape, 400.0, np.float32)
    image = (rng.standard_normal(shape) * 20.0).astype(np.float32)
    stamp = moffat_stamp(3.8, 0.03, 0.0, 0.0, 0.0, half=12)
    psf = PsfModel(components=stamp[None].astype(np.float32), spatial_order=0)
    gx, gy = np.meshgrid(np.arange(20, 480, 13.3), np.arange(20, 580, 13.7))
    flux, err, chi2, nd = psf_flux(image, variance, psf, gx.ravel(), gy.ravel())
    snr = flux / err
    assert abs(np.mean(snr)) < 0.1 and np.std(snr) == pytest.approx(1.0, abs=0.06)
    assert np.mean(chi2 / (nd - 1)) == pytest.approx(1.0, abs=0.02)
    # Off the image, NaN positions, masked pixels, scalars.
    f, e, c, n = psf_flux(image, variance, psf, np.array([3.0, np.nan, 250.0]), np.array([300.0, 5.0, 300.0]))
    assert n[0] == 25 * 16 and np.isfinite(f[0]) and np.isnan(f[1]) and n[1] == 0
    bad = np.zeros(shape, bool)
    bad[295:306, 245:256] = True
    f2, _, _, n2 = psf_flux(image, variance, psf, 250.0, 300.0, bad=bad)
    assert np.ndim(f2) == 0 and n2 == 625 - 121
    f3, _, _, n3 = psf_flux(image, variance, psf, 250.0, 300.0, bad=np.ones(shape, bool))
    assert np.isnan(f3) and n3 == 0


def test_psf_flux_subpixel_noise_free():
    """A star rendered at any sub-pixel position is recovered by the PSF shifted there."""
    stamp = moffat_stamp(3.0, 0.05, -0.02, 0.0, 0.0, half=12)  # DECam good seeing: 3 px
    psf = PsfModel(components=stamp[None].astype(np.float32), spatial_order=0)
    image = np.zeros((400, 400))
    rng = np.random.default_rng(3)
    gx, gy = np.meshgrid(np.arange(40, 380, 50), np.arange(40, 380, 50))
    xs, ys = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size), gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    for a, b in zip(xs, ys):
        ix, iy = int(np.floor(a + 0.5)), int(np.floor(b + 0.5))
        st = moffat_stamp(3.0, 0.05, -0.02, a - ix, b - iy, half=HALF)
        image[iy - HALF:iy + HALF + 1, ix - HALF:ix + HALF + 1] += 1e4 * st
    flux, _, _, _ = psf_flux(image, np.ones_like(image), psf, xs, ys)
    # The model is unit-sum over its stamp: the truth is 1e4 times the flux fraction in it.
    assert np.allclose(flux / (1e4 * stamp.sum()), 1.0, atol=5e-4)


def test_rejects_non_stars_given_to_the_fit(scene, fitted):
    """Galaxies slipped into the star list are rejected by the chi2 clipping."""
    s = scene
    selected, _ = fitted
    gal = np.flatnonzero((s["kind"] == "galaxy") & (s["snr"] > 100))[:6]
    xs = np.concatenate([s["xw"][selected], s["xw"][gal]])
    ys = np.concatenate([s["yw"][selected], s["yw"][gal]])
    fit = fit_psf(s["image"], s["variance"], s["bad"], xs, ys)
    assert not fit.used[-len(gal):].any()
    centre = measure_fwhm(fit.model.evaluate((NX - 1) / 2, (NY - 1) / 2))
    assert centre == pytest.approx(true_psf_fwhm((NX - 1) / 2, (NY - 1) / 2), rel=0.03)


def test_too_few_stars_raise(scene):
    s = scene
    clean = np.flatnonzero(_clean_stars(s) & (s["snr"] > 100))
    with pytest.raises(PsfError, match="min_stars"):
        fit_psf_model(s["image"], s["variance"], s["bad"], s["xw"][clean[:9]], s["yw"][clean[:9]])
    with pytest.raises(PsfError):
        fit_psf_model(s["image"], s["variance"], s["bad"], [5.0] * 20, [5.0] * 20)  # all at the edge
    # Few stars: the spatial order drops (20 stars per polynomial term) so that the fit
    # stays well determined: 10 stars -> constant, 90 -> linear, enough -> order 2.
    fit = fit_psf(s["image"], s["variance"], s["bad"], s["xw"][clean[:10]], s["yw"][clean[:10]])
    assert fit.spatial_order == 0 and fit.used.sum() == 10
    fit = fit_psf(s["image"], s["variance"], s["bad"], s["xw"][clean[:90]], s["yw"][clean[:90]])
    assert fit.spatial_order == 1
    with pytest.raises(PsfError):
        PsfConfig(stamp_size=24)
