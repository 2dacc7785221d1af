"""Tests of apsnake.templates: sky grid, warping, coaddition and templates on synthetic calexps.

The calexps are built here: a TAN-SIP WCS in DECam orientation (CD1_2 = +s, CD2_1 = -s,
s = 0.263 arcsec), pixel-integrated elliptical Gaussian stars with known fluxes and sky
positions, white noise with a matching variance plane, a few SAT/BAD pixels.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
from scipy.special import erf

from apsnake.exposure import Exposure, PhotoCalib, PsfModel, VisitInfo
from apsnake.psf import measure_fwhm
from apsnake.templates import (
    CoaddConfig, SkyGrid, TemplateError, make_coadd, merge_warps, single_visit_template, template_for_exposure,
    warp_exposure,
)

SCALE_DEG = 0.263 / 3600.0
SIGMA_X, SIGMA_Y = 1.7, 1.4  # source-pixel PSF widths (elongated along the CCD x axis)


# ---------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------
def decam_wcs(ra, dec, shape, rot_deg=0.0, sip=True, crpix_offset=(0.0, 0.0)):
    """TAN-SIP WCS in DECam orientation: +x -> south, +y -> east (rotated by rot_deg)."""
    from astropy.wcs import Sip, WCS

    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx + 1) / 2 + crpix_offset[0], (ny + 1) / 2 + crpix_offset[1]]
    th = math.radians(rot_deg)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    w.wcs.cd = rot @ np.array([[0.0, SCALE_DEG], [-SCALE_DEG, 0.0]])
    w.wcs.cunit = ["deg", "deg"]
    if sip:
        a, b = np.zeros((4, 4)), np.zeros((4, 4))
        a[2, 0], a[0, 2], a[1, 1], a[3, 0] = 2e-7, -1e-7, 5e-8, 1e-11
        b[0, 2], b[1, 1], b[2, 1] = 1.5e-7, -6e-8, 2e-11
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    w.pixel_shape = (nx, ny)
    return w


def _integrated_gauss(grid, centre, sigma):
    s = sigma * math.sqrt(2.0)
    return 0.5 * (erf((grid + 0.5 - centre) / s) - erf((grid - 0.5 - centre) / s))


def render_stars(shape, x, y, flux, sx=SIGMA_X, sy=SIGMA_Y):
    """Pixel-integrated axis-aligned elliptical Gaussians (flux in image units per star)."""
    image = np.zeros(shape)
    half = int(math.ceil(7 * max(sx, sy)))
    for xi, yi, fi in zip(x, y, flux):
        cx, cy = int(round(xi)), int(round(yi))
        x0, x1 = max(cx - half, 0), min(cx + half + 1, shape[1])
        y0, y1 = max(cy - half, 0), min(cy + half + 1, shape[0])
        if x0 >= x1 or y0 >= y1:
            continue
        gx = _integrated_gauss(np.arange(x0, x1, dtype=float), xi, sx)
        gy = _integrated_gauss(np.arange(y0, y1, dtype=float), yi, sy)
        image[y0:y1, x0:x1] += fi * np.outer(gy, gx)
    return image


def gauss_psf(sx=SIGMA_X, sy=SIGMA_Y, size=27):
    c = size // 2
    stamp = render_stars((size, size), [c], [c], [1.0], sx, sy)
    return PsfModel(components=stamp[None].astype(np.float32), spatial_order=0, x0=0.0, y0=0.0, scale=1.0,
                    fwhm_pixels=float(measure_fwhm(stamp)))


class Sky:
    """Stars at fixed sky positions, rendered on any WCS."""

    def __init__(self, ra0, dec0, half_deg, rng, flux=(3e4, 3e5), spacing_arcsec=16.0):
        """Isolated stars on a jittered square grid (tangent plane at ra0, dec0)."""
        step = spacing_arcsec / 3600.0
        k = np.arange(-half_deg, half_deg + 1e-9, step)
        xi, eta = np.meshgrid(k, k)
        xi = xi.ravel() + rng.uniform(-0.15, 0.15, xi.size) * step
        eta = eta.ravel() + rng.uniform(-0.15, 0.15, eta.size) * step
        self.dec = dec0 + eta
        self.ra = ra0 + xi / np.cos(np.radians(self.dec))
        self.flux = rng.uniform(*flux, self.ra.size)

    def pixels(self, wcs):
        return wcs.all_world2pix(self.ra, self.dec, 0)

    def render(self, wcs, shape, extra=()):
        x, y = self.pixels(wcs)
        image = render_stars(shape, x, y, self.flux)
        for (xe, ye, fe) in extra:
            image += render_stars(shape, [xe], [ye], [fe])
        return image


def make_calexp(wcs, shape, truth, sigma, rng, visit=1, band="g", detector=10):
    """A calexp-like Exposure: truth image + white noise of ``sigma`` nJy, variance sigma^2."""
    image = (truth + rng.normal(0.0, sigma, shape)) if sigma > 0 else truth.copy()
    exp = Exposure(
        image=image.astype(np.float32), mask=np.zeros(shape, np.int32),
        variance=np.full(shape, max(sigma, 1e-3) ** 2, np.float32),
        visit_info=VisitInfo(visit=visit, band=band, physical_filter=f"{band} DECam SDSS c0001 4720.0 1520.0",
                             mjd_mid_tai=60000.0 + visit * 1e-3, exposure_time=90.0),
        detector=detector, detector_name="N4", unit="nJy", wcs=wcs, psf=gauss_psf(),
        photo_calib=PhotoCalib(1.0),
    )
    return exp


def centroid_and_flux(image, x, y, radius=9.0, n_iter=3):
    """Centroid (first moments) and aperture sum in a circular aperture, iterated."""
    flux = float("nan")
    for _ in range(max(n_iter, 1)):
        cx, cy = int(round(x)), int(round(y))
        r = int(math.ceil(radius)) + 1
        sub = image[cy - r:cy + r + 1, cx - r:cx + r + 1].astype(float)
        yy, xx = np.mgrid[cy - r:cy + r + 1, cx - r:cx + r + 1]
        ap = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
        flux = sub[ap].sum()
        if n_iter == 0:
            break
        x = (sub[ap] * xx[ap]).sum() / flux
        y = (sub[ap] * yy[ap]).sum() / flux
    return x, y, flux


def second_moments(stamp, x, y):
    yy, xx = np.mgrid[0:stamp.shape[0], 0:stamp.shape[1]]
    w = stamp / stamp.sum()
    return ((xx - x) ** 2 * w).sum(), ((yy - y) ** 2 * w).sum(), ((xx - x) * (yy - y) * w).sum()


def star_mask(x, y, shape, half):
    """True within ``half`` pixels of any star."""
    mask = np.zeros(shape, bool)
    for a, b in zip(x, y):
        if np.isfinite(a) and np.isfinite(b) and -half <= a < shape[1] + half and -half <= b < shape[0] + half:
            ia, ib = int(round(a)), int(round(b))
            mask[max(ib - half, 0):max(ib + half + 1, 0), max(ia - half, 0):max(ia + half + 1, 0)] = True
    return mask


def interior(x, y, shape, margin):
    return (x > margin) & (x < shape[1] - 1 - margin) & (y > margin) & (y < shape[0] - 1 - margin)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------
RA0, DEC0 = 150.1, -5.2
CCD = (1024, 512)


@pytest.fixture(scope="module")
def small_grid():
    return SkyGrid(patch_size_deg=0.1, pixel_scale_arcsec=0.263, margin_pixels=50)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(11)
    wcs = decam_wcs(RA0, DEC0, CCD, rot_deg=0.4)
    sky = Sky(RA0, DEC0, 0.045, rng)
    x, y = sky.pixels(wcs)
    keep = interior(x, y, CCD, 20)
    sky.ra, sky.dec, sky.flux = sky.ra[keep], sky.dec[keep], sky.flux[keep]
    truth = sky.render(wcs, CCD)
    return sky, wcs, truth


@pytest.fixture(scope="module")
def north_up():
    """A north-up TAN target grid around the CCD (a sky-patch-like projection)."""
    from astropy.wcs import WCS

    def make(scale_arcsec=0.263, shape=(700, 1200), crval=(RA0 + 0.001, DEC0 - 0.002)):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = list(crval)
        w.wcs.crpix = [(shape[1] + 1) / 2 + 0.37, (shape[0] + 1) / 2 - 0.21]
        w.wcs.cd = np.diag([-scale_arcsec / 3600.0, scale_arcsec / 3600.0])
        w.wcs.set()
        return w, shape

    return make


# ---------------------------------------------------------------------------
# SkyGrid
# ---------------------------------------------------------------------------
def _footprint(ra, dec, shape=(4096, 2048), rot=0.0):
    w = decam_wcs(ra, dec, shape, rot_deg=rot)
    ny, nx = shape
    cx = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    cy = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    ra_c, dec_c = w.all_pix2world(cx, cy, 0)
    return w, ra_c, dec_c


def _inner_pixel(grid, patch, ra, dec):
    """True if (ra, dec) is inside the patch's pixel grid without its margin."""
    w, (ny, nx) = grid.patch_wcs(patch)
    x, y = w.all_world2pix([ra], [dec], 0)
    m = grid.margin_pixels
    return bool(m - 0.5 <= x[0] <= nx - 1 - m + 0.5 and m - 0.5 <= y[0] <= ny - 1 - m + 0.5)


@pytest.mark.parametrize("ra,dec,rot", [(150.1, -5.2, 0.3), (0.02, -30.0, -0.5), (359.97, 10.0, 1.0),
                                         (45.0, -64.9, 0.0), (210.0, -75.13, 0.7), (120.0, -89.95, 0.0)])
def test_skygrid_patches_cover_ccd(ra, dec, rot):
    grid = SkyGrid()
    w, ra_c, dec_c = _footprint(ra, dec, rot=rot)
    patches = grid.patch_ids_for_corners(ra_c, dec_c)
    assert patches == grid.patch_ids_for_corners(ra_c.copy(), dec_c.copy())  # deterministic
    assert patches == sorted(patches) and len(set(patches)) == len(patches)
    assert all(re.fullmatch(r"d\d{4}r\d{4}", c) for c in patches)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", c) for c in patches)
    # The four corners, the edge midpoints and the centre lie in at least one returned patch,
    # both by the patch bounds and inside its pixel grid without margin.
    ny, nx = 4096, 2048
    px = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5, nx / 2, -0.5, nx - 0.5, nx / 2, nx / 2])
    py = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, ny / 2, ny / 2, ny / 2, -0.5, ny - 0.5])
    pra, pdec = w.all_pix2world(px, py, 0)
    for r, d in zip(pra, pdec):
        holders = [c for c in patches if grid.patch_contains(c, r, d)]
        assert holders, f"point ({r}, {d}) not in any of {patches}"
        assert any(_inner_pixel(grid, c, r, d) for c in holders)
    # Every point of the CCD lies in the patch that contains it, which is returned.
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 9), np.linspace(0, ny - 1, 17))
    gra, gdec = w.all_pix2world(gx.ravel(), gy.ravel(), 0)
    assert set(grid.patch_ids_for_points(gra, gdec)) <= set(patches)
    # A point just outside a patch's nominal area (within its margin) is still on its pixel grid.
    patch = grid.patch_ids_for_points([ra], [dec])[0]
    wc, (cny, cnx) = grid.patch_wcs(patch)
    ra_m, dec_m = wc.all_pix2world([grid.margin_pixels / 2], [cny / 2], 0)
    assert _inner_pixel(grid, patch, ra_m[0], dec_m[0]) is False


def test_skygrid_patch_geometry():
    grid = SkyGrid()
    for dec in (-80.0, -45.0, -5.0, 0.0, 30.0):
        patch = grid.patch_ids_for_points([33.3], [dec])[0]
        w, (ny, nx) = grid.patch_wcs(patch)
        assert ny % 2 == 1 and nx % 2 == 1
        core_x, core_y = nx - 2 * grid.margin_pixels, ny - 2 * grid.margin_pixels
        # At least the patch side (more at high |Dec|, where the parallels curve in projection).
        assert 0.25 * 3600 / 0.263 - 1 <= core_y <= 0.25 * 3600 / 0.263 * 1.01
        assert 0.9 < core_x / core_y < 1.1  # roughly square
        ra_c, dec_c = grid.patch_center(patch)
        x, y = w.all_world2pix([ra_c], [dec_c], 0)
        assert x[0] == pytest.approx((nx - 1) / 2, abs=1e-6) and y[0] == pytest.approx((ny - 1) / 2, abs=1e-6)
        # North up, east left, square pixels of the requested scale.
        r0, d0 = w.all_pix2world([nx / 2], [ny / 2], 0)
        r1, d1 = w.all_pix2world([nx / 2 + 1], [ny / 2], 0)
        r2, d2 = w.all_pix2world([nx / 2], [ny / 2 + 1], 0)
        assert (r1[0] - r0[0]) < 0 and d2[0] > d0[0]
        assert (d2[0] - d0[0]) * 3600 == pytest.approx(0.263, rel=1e-3)
        assert abs(r1[0] - r0[0]) * math.cos(math.radians(d0[0])) * 3600 == pytest.approx(0.263, rel=1e-3)
        # The patch's whole nominal area is inside its pixel grid.
        ra0, ra1, dec0, dec1 = grid.patch_bounds(patch)
        tr, td = np.meshgrid(np.linspace(ra0, ra1, 7), np.linspace(dec0, dec1, 7))
        cx, cy = w.all_world2pix(tr.ravel(), td.ravel(), 0)
        m = grid.margin_pixels
        assert cx.min() >= m - 0.5 and cx.max() <= nx - 1 - m + 0.5
        assert cy.min() >= m - 0.5 and cy.max() <= ny - 1 - m + 0.5
    with pytest.raises(TemplateError):
        grid.patch_wcs("d9999r0000")
    with pytest.raises(TemplateError):
        grid.patch_wcs("../etc")


def test_skygrid_is_pure():
    grid = SkyGrid()
    rng = np.random.default_rng(3)
    ras, decs = rng.uniform(0, 360, 300), rng.uniform(-88, 30, 300)
    results = []
    for ra, dec in zip(ras, decs):
        dra = 0.08 / math.cos(math.radians(dec))
        results.append(grid.patch_ids_for_corners([ra - dra, ra + dra, ra + dra, ra - dra],
                                                 [dec - 0.15, dec - 0.15, dec + 0.15, dec + 0.15]))
    assert all(1 <= len(r) <= 9 for r in results)
    assert results == [SkyGrid().patch_ids_for_corners(
        [ra - 0.08 / math.cos(math.radians(dec)), ra + 0.08 / math.cos(math.radians(dec)),
         ra + 0.08 / math.cos(math.radians(dec)), ra - 0.08 / math.cos(math.radians(dec))],
        [dec - 0.15, dec - 0.15, dec + 0.15, dec + 0.15]) for ra, dec in zip(ras, decs)]


# ---------------------------------------------------------------------------
# Warping
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale_arcsec", [0.263, 0.35])
def test_warp_preserves_flux_and_positions(scene, north_up, scale_arcsec):
    sky, wcs, truth = scene
    exp = make_calexp(wcs, CCD, truth, 0.0, np.random.default_rng(1))
    target, shape = north_up(scale_arcsec=scale_arcsec, shape=(int(700 * 0.263 / scale_arcsec),
                                                                int(1200 * 0.263 / scale_arcsec)))
    warped = warp_exposure(exp, target, shape)
    assert warped.image.shape == shape and warped.wcs is not None
    xt, yt = sky.pixels(target)
    ok = interior(xt, yt, shape, 15)
    assert ok.sum() > 20
    dpos, dflux = [], []
    for x, y, f in zip(xt[ok], yt[ok], sky.flux[ok]):
        mx, my, mf = centroid_and_flux(warped.image, x, y, radius=9.0 * 0.263 / scale_arcsec + 2)
        dpos.append(math.hypot(mx - x, my - y))
        dflux.append(mf / f - 1.0)
    dpos, dflux = np.array(dpos), np.array(dflux)
    print(f"scale {scale_arcsec}: max |dpos| = {dpos.max():.4f} px, max |dflux| = {np.abs(dflux).max():.5f}, "
          f"mean dflux = {dflux.mean():.2e}")
    assert dpos.max() < 0.02
    assert np.abs(dflux).max() < 0.005


def test_warp_noise_variance_and_mask(scene, north_up):
    sky, wcs, truth = scene
    rng = np.random.default_rng(5)
    sigma = 25.0
    exp = make_calexp(wcs, CCD, np.zeros(CCD), sigma, rng)
    exp.set_mask("SAT", np.pad(np.ones((6, 3), bool), ((300, CCD[0] - 306), (200, CCD[1] - 203))))
    exp.mask[:, 400] |= exp.mask_bit("BAD")  # a bad column
    exp.set_mask("DETECTED", np.pad(np.ones((5, 5), bool), ((700, CCD[0] - 705), (100, CCD[1] - 105))))
    exp.image[800, 300] = np.nan  # a non-finite pixel becomes NO_DATA
    target, shape = north_up()
    warped = warp_exposure(exp, target, shape)
    nodata = warped.mask_of("NO_DATA")
    # Out of the CCD footprint: NO_DATA, image 0, variance 0.
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    ra, dec = target.all_pix2world(xx.ravel(), yy.ravel(), 0)
    sx, sy = wcs.all_world2pix(ra, dec, 0)
    sx, sy = sx.reshape(shape), sy.reshape(shape)
    outside = (sx < -0.5) | (sx > CCD[1] - 0.5) | (sy < -0.5) | (sy > CCD[0] - 0.5)
    well_inside = (sx > 4) & (sx < CCD[1] - 5) & (sy > 4) & (sy < CCD[0] - 5)
    assert outside.any() and nodata[outside].all()
    assert np.all(warped.image[nodata] == 0) and np.all(warped.variance[nodata] == 0)
    # Inside: data except around the NaN pixel.
    near_nan = (np.abs(sx - 300) < 4) & (np.abs(sy - 800) < 4)
    assert not nodata[well_inside & ~near_nan].any()
    assert nodata[(np.abs(sx - 300) < 0.5) & (np.abs(sy - 800) < 0.5)].all()
    # Mask planes carried to where they map (within the kernel footprint) and nowhere far.
    sat = warped.mask_of("SAT")
    in_sat = (sx > 199.5) & (sx < 202.5) & (sy > 299.5) & (sy < 305.5)
    assert sat[in_sat].all()
    far = (np.abs(sx - 201) > 6) | (np.abs(sy - 302.5) > 7)
    assert not sat[far].any()
    bad = warped.mask_of("BAD")
    assert bad[well_inside & (np.abs(sx - 400) < 0.5)].all()
    assert not bad[well_inside & (np.abs(sx - 400) > 4)].any()
    assert warped.mask_of("DETECTED")[(np.abs(sx - 102) < 2) & (np.abs(sy - 702) < 2)].all()
    # Noise: the variance plane matches the measured scatter of the warped blank sky.
    clean = well_inside & (warped.mask == 0)
    measured = float(np.var(warped.image[clean]))
    predicted = float(np.mean(warped.variance[clean]))
    print(f"warped noise: measured var {measured:.1f}, variance plane {predicted:.1f}, input {sigma**2:.1f}")
    assert measured == pytest.approx(predicted, rel=0.1)
    assert predicted < sigma**2  # interpolation correlates (and so lowers the per-pixel) noise
    for kernel in ("cubic", "lanczos5", "bilinear"):
        other = warp_exposure(exp, target, shape, kernel=kernel)
        use = clean & (other.mask == 0)
        ratio = np.var(other.image[use]) / np.mean(other.variance[use])
        print(f"{kernel}: measured / plane variance {ratio:.3f}")
        assert ratio == pytest.approx(1.0, abs=0.1)
    assert 0.0 < warped.metadata["WARPCOV"] < 1.0
    # The input is not modified.
    assert "NO_DATA" not in exp.metadata and np.isnan(exp.image[800, 300])


def test_warp_psf_follows_rotation(scene, north_up):
    sky, wcs, truth = scene
    exp = make_calexp(wcs, CCD, truth, 0.0, np.random.default_rng(1))
    target, shape = north_up()
    warped = warp_exposure(exp, target, shape)
    assert warped.psf is not None and warped.psf.spatial_order == 0
    model = warped.psf.evaluate(shape[1] / 2, shape[0] / 2)
    c = model.shape[0] // 2
    mxx, myy, mxy = second_moments(model, c, c)
    # DECam x (the long PSF axis) runs along Dec: the warped PSF is long in target y.
    assert myy > mxx * 1.3
    assert myy == pytest.approx(SIGMA_X**2 + 1 / 12, rel=0.03) and mxx == pytest.approx(SIGMA_Y**2 + 1 / 12, rel=0.03)
    xt, yt = sky.pixels(target)
    ok = interior(xt, yt, shape, 20)
    ratios = []
    for x, y in zip(xt[ok], yt[ok]):
        ix, iy = int(round(x)), int(round(y))
        stamp = warped.image[iy - c:iy + c + 1, ix - c:ix + c + 1].astype(float)
        sxx, syy, sxy = second_moments(stamp, c + x - ix, c + y - iy)
        ratios.append((sxx / mxx, syy / myy))
    ratios = np.median(np.array(ratios), axis=0)
    print(f"warped star / warped PSF model second moments: xx {ratios[0]:.4f}, yy {ratios[1]:.4f}")
    assert ratios == pytest.approx([1.0, 1.0], abs=0.04)
    assert warped.psf.fwhm_pixels == pytest.approx(exp.psf.fwhm_pixels, rel=0.03)


def test_warp_spatially_varying_psf(scene, north_up):
    sky, wcs, truth = scene
    exp = make_calexp(wcs, CCD, truth, 0.0, np.random.default_rng(1))
    base = gauss_psf().components[0]
    wide = gauss_psf(SIGMA_X * 1.2, SIGMA_Y * 1.2).components[0]
    # Order-1 model: PSF widens with the CCD x coordinate.
    exp.psf = PsfModel(components=np.stack([0.5 * (base + wide), 0.5 * (wide - base), np.zeros_like(base)]),
                       spatial_order=1, x0=CCD[1] / 2, y0=CCD[0] / 2, scale=CCD[1] / 2)
    target, shape = north_up()
    warped = warp_exposure(exp, target, shape)
    assert warped.psf.spatial_order == 1
    for sx_src in (60.0, 450.0):
        ra, dec = wcs.all_pix2world([sx_src], [CCD[0] / 2], 0)
        tx, ty = target.all_world2pix(ra, dec, 0)
        f_src = measure_fwhm(exp.psf.evaluate(sx_src, CCD[0] / 2))
        f_tgt = measure_fwhm(warped.psf.evaluate(tx[0], ty[0]))
        assert f_tgt == pytest.approx(f_src, rel=0.02)


def test_warp_kernels_and_errors(scene, north_up):
    sky, wcs, truth = scene
    exp = make_calexp(wcs, CCD, truth, 0.0, np.random.default_rng(1))
    target, shape = north_up()
    xt, yt = sky.pixels(target)
    ok = interior(xt, yt, shape, 15)
    for kernel in ("cubic", "lanczos5", "bilinear"):
        warped = warp_exposure(exp, target, shape, kernel=kernel)
        flux = np.array([centroid_and_flux(warped.image, x, y)[2] for x, y in zip(xt[ok], yt[ok])])
        assert np.abs(flux / sky.flux[ok] - 1).max() < 0.005, kernel
    with pytest.raises(TemplateError):
        warp_exposure(exp, target, shape, kernel="sinc")
    no_wcs = exp.copy()
    no_wcs.wcs = None
    with pytest.raises(TemplateError):
        warp_exposure(no_wcs, target, shape)
    # No overlap at all: everything NO_DATA.
    far, _ = north_up(crval=(RA0 + 3.0, DEC0))
    warped = warp_exposure(exp, far, (50, 60))
    assert warped.mask_of("NO_DATA").all() and warped.psf is None and warped.metadata["WARPCOV"] == 0.0


def test_full_ccd_warp():
    shape = (4096, 2048)
    rng = np.random.default_rng(2)
    wcs = decam_wcs(RA0, DEC0, shape, rot_deg=0.3)
    exp = Exposure(image=rng.normal(0, 30, shape).astype(np.float32), mask=np.zeros(shape, np.int32),
                   variance=np.full(shape, 900.0, np.float32), visit_info=VisitInfo(visit=3, band="g"),
                   detector=5, unit="nJy", wcs=wcs, psf=gauss_psf())
    exp.mask[1000:1010, 500:505] = exp.mask_bit("SAT")
    grid = SkyGrid()
    patch = grid.patch_ids_for_points([RA0], [DEC0])[0]
    target, _ = grid.patch_wcs(patch)
    target.wcs.crval = [RA0, DEC0]  # centre the CCD on this patch-like grid
    target.wcs.set()
    tshape = (2100, 4200)
    target.wcs.crpix = [(tshape[1] + 1) / 2, (tshape[0] + 1) / 2]
    target.wcs.set()
    # The time this takes is measured in benchmarks/bench_warp.py, never asserted here.
    warped = warp_exposure(exp, target, tshape)
    covered = ~warped.mask_of("NO_DATA")
    assert 0.9 < warped.metadata["WARPCOV"] == pytest.approx(covered.mean())
    assert warped.mask_of("SAT").sum() >= 50  # the saturated block is carried over, grown by the kernel
    # White noise of 30 nJy: the warped noise is smoother (correlated), never louder, and the
    # variance plane follows the pixel scatter within the Lanczos-3 smoothing range (0.6-1.0).
    scatter = float(np.std(warped.image[covered & ~warped.mask_of("SAT")]))
    predicted = float(np.sqrt(np.median(warped.variance[covered])))
    assert 0.6 * 30 < scatter < 30.5 and 0.9 < scatter / predicted < 1.25


def test_warp_reads_only_the_part_of_the_source_under_the_target(scene, monkeypatch, tmp_path):
    """A CCD of a dithered template visit covers part of the science CCD: the warp converts,
    masks and dilates only the box of the source that the target reads, and the result is
    identical to warping the whole source (memory-mapped, big-endian planes included)."""
    from apsnake.exposure import read_exposure, write_exposure
    from apsnake.templates import warp as warp_module

    sky, wcs, truth = scene
    exp = make_calexp(wcs, CCD, truth, 20.0, np.random.default_rng(8), visit=7)
    exp.mask[CCD[0] // 2:CCD[0] // 2 + 3, 40:60] |= exp.mask_bit("SAT")
    exp.image[5, 5] = np.nan  # non-finite source pixels are NO_DATA in the warp
    # Half a CCD of dither along the long axis, a little rotation.
    target = decam_wcs(RA0, DEC0, CCD, rot_deg=0.4, crpix_offset=(0.0, 0.5 * CCD[0]))
    ny, nx = exp.shape
    boxes = []
    real_box = warp_module._source_box

    def recording_box(*args, **kwargs):
        boxes.append(real_box(*args, **kwargs))
        return boxes[-1]

    monkeypatch.setattr(warp_module, "_source_box", recording_box)
    cropped = warp_exposure(exp, target, CCD)
    rows, cols = boxes[-1]
    assert (rows.stop - rows.start) * (cols.stop - cols.start) < 0.7 * ny * nx
    monkeypatch.setattr(warp_module, "_source_box", lambda mapping, shape, taps: np.s_[0:shape[0], 0:shape[1]])
    whole = warp_exposure(exp, target, CCD)
    assert 0.3 < whole.metadata["WARPCOV"] < 0.7
    for plane in ("image", "variance", "mask"):
        assert np.array_equal(getattr(cropped, plane), getattr(whole, plane)), plane
    assert cropped.metadata == whole.metadata
    assert np.array_equal(cropped.psf.components, whole.psf.components)
    monkeypatch.setattr(warp_module, "_source_box", real_box)
    write_exposure(exp, tmp_path / "template_calexp.fits")
    mapped = warp_exposure(read_exposure(tmp_path / "template_calexp.fits", memmap=True), target, CCD)
    loaded = warp_exposure(read_exposure(tmp_path / "template_calexp.fits"), target, CCD)
    for plane in ("image", "variance", "mask"):
        assert np.array_equal(getattr(mapped, plane), getattr(loaded, plane)), plane


# ---------------------------------------------------------------------------
# Coadd
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dithered(small_grid):
    """4 dithered, rotated inputs of one sky, warped onto the sky patch holding the field centre."""
    rng = np.random.default_rng(21)
    ra0, dec0 = small_grid.patch_center(small_grid.patch_ids_for_points([RA0], [DEC0])[0])
    sky = Sky(ra0, dec0, 0.1, rng, flux=(5e4, 4e5))
    patch = small_grid.patch_ids_for_points([ra0], [dec0])[0]
    cwcs, cshape = small_grid.patch_wcs(patch)
    shape = (1100, 1100)
    sigmas = [20.0, 20.0, 30.0, 25.0]
    inputs, warps = [], []
    # A transient in input 2 and a cosmic ray in input 1, at empty sky positions.
    tr_ra, tr_dec = ra0 + 0.012, dec0 - 0.011
    cr_ra, cr_dec = ra0 - 0.013, dec0 + 0.009
    for k, sigma in enumerate(sigmas):
        wcs = decam_wcs(ra0 + 0.002 * (k - 1.5), dec0 - 0.0015 * k, shape, rot_deg=0.25 * k - 0.3)
        extra = []
        if k == 2:
            x, y = wcs.all_world2pix([tr_ra], [tr_dec], 0)
            extra.append((x[0], y[0], 8e4))
        truth = sky.render(wcs, shape, extra)
        exp = make_calexp(wcs, shape, truth, sigma, rng, visit=100 + k)
        if k == 1:
            x, y = wcs.all_world2pix([cr_ra], [cr_dec], 0)
            ix, iy = int(round(x[0])), int(round(y[0]))
            exp.image[iy:iy + 2, ix - 1:ix + 2] += 3000.0
            exp.set_mask("CR", np.pad(np.ones((2, 3), bool), ((iy, shape[0] - iy - 2), (ix - 1, shape[1] - ix - 2))))
        if k == 0:
            exp.set_mask("SAT", np.pad(np.ones((4, 4), bool), ((500, shape[0] - 504), (500, shape[1] - 504))))
        inputs.append(exp)
        warps.append(warp_exposure(exp, cwcs, cshape))
    return dict(sky=sky, patch=patch, cwcs=cwcs, cshape=cshape, inputs=inputs, warps=warps, sigmas=sigmas,
                transient=(tr_ra, tr_dec), cosmic=(cr_ra, cr_dec))


def test_coadd_fluxes_variance_and_rejection(dithered):
    d = dithered
    coadd = make_coadd(d["warps"], CoaddConfig(), patch_id=d["patch"])
    cwcs, cshape = d["cwcs"], d["cshape"]
    assert coadd.shape == cshape
    assert coadd.visit_info.visit == 0 and coadd.visit_info.band == "g"
    assert coadd.metadata["NINPUTS"] == 4 and coadd.metadata["INVISITS"] == "100,101,102,103"
    assert coadd.metadata["PATCH"] == d["patch"]
    # Star fluxes.
    sky = d["sky"]
    xt, yt = sky.pixels(cwcs)
    valid = ~coadd.mask_of("NO_DATA")
    ok = interior(xt, yt, cshape, 15)
    ok &= np.array([valid[int(round(y)) - 12:int(round(y)) + 13, int(round(x)) - 12:int(round(x)) + 13].all()
                    if o else False for x, y, o in zip(xt, yt, ok)])
    assert ok.sum() > 20
    flux = np.array([centroid_and_flux(coadd.image, x, y)[2] for x, y in zip(xt[ok], yt[ok])])
    dflux = flux / sky.flux[ok] - 1.0
    print(f"coadd star fluxes: median {np.median(dflux):.2e}, max |dflux| {np.abs(dflux).max():.4f}")
    assert np.abs(np.median(dflux)) < 0.002 and np.abs(dflux).max() < 0.015
    # The transient (one input) and the cosmic ray (one input) are rejected.
    for (ra, dec), amount, name in ((d["transient"], 8e4, "transient"), (d["cosmic"], 3000.0 * 6, "cosmic ray")):
        x, y = cwcs.all_world2pix([ra], [dec], 0)
        left = centroid_and_flux(coadd.image, x[0], y[0], n_iter=0)[2]
        print(f"{name}: {left:.1f} nJy left of {amount:.0f} (a plain mean would keep ~{amount / 4:.0f})")
        assert abs(left) < 0.03 * amount
    assert coadd.metadata["NCLIPPED"] > 0
    x, y = cwcs.all_world2pix([d["cosmic"][0]], [d["cosmic"][1]], 0)
    assert not coadd.mask_of("CR")[int(round(y[0])) - 3:int(round(y[0])) + 4,
                                   int(round(x[0])) - 3:int(round(x[0])) + 4].any()
    # SAT of one input propagates; DETECTED-like single-input planes do not.
    sat_ra, sat_dec = d["inputs"][0].wcs.all_pix2world([501.5], [501.5], 0)
    x, y = cwcs.all_world2pix(sat_ra, sat_dec, 0)
    assert coadd.mask_of("SAT")[int(round(y[0])), int(round(x[0]))]
    # Variance: ~ 1 / sum(1 / var) on blank sky, and it matches the measured scatter.
    nwarp = np.array([~w.mask_of("NO_DATA") for w in d["warps"]]).sum(axis=0)
    blank = (nwarp == 4) & ~star_mask(xt, yt, cshape, 15) & (coadd.mask == 0)
    with np.errstate(divide="ignore"):
        expected = 1.0 / sum(1.0 / np.where(w.variance > 0, w.variance, np.inf) for w in d["warps"])
    ratio = np.median(coadd.variance[blank] / expected[blank])
    measured = float(np.var(coadd.image[blank]))
    predicted = float(np.mean(coadd.variance[blank]))
    single = 1.0 / sum(1.0 / s**2 for s in d["sigmas"])
    print(f"coadd variance: plane/(1/sum(1/var)) = {ratio:.4f}; measured {measured:.2f}, plane {predicted:.2f}, "
          f"1/sum(1/sigma^2) of the inputs = {single:.2f}")
    assert ratio == pytest.approx(1.0, abs=0.03)
    assert measured == pytest.approx(predicted, rel=0.12)
    assert predicted < min(s**2 for s in d["sigmas"]) / 2
    # Pixels without inputs: NO_DATA, 0, 0.
    assert (nwarp == 0).any()
    assert coadd.mask_of("NO_DATA")[nwarp == 0].all() and np.all(coadd.variance[nwarp == 0] == 0)


def test_coadd_psf_matches_inputs(dithered):
    d = dithered
    coadd = make_coadd(d["warps"])
    assert coadd.psf is not None and coadd.psf.spatial_order == 0
    f_in = measure_fwhm(d["inputs"][0].psf.evaluate(0, 0))
    f_co = measure_fwhm(coadd.psf.evaluate(*np.array(d["cshape"][::-1]) / 2))
    print(f"coadd PSF FWHM {f_co:.3f} px, inputs {f_in:.3f} px")
    assert f_co == pytest.approx(f_in, rel=0.03)
    # The coadd PSF describes the coadd's stars.
    sky = d["sky"]
    xt, yt = sky.pixels(d["cwcs"])
    model = coadd.psf.evaluate(0, 0)
    c = model.shape[0] // 2
    mxx, myy, _ = second_moments(model, c, c)
    valid = ~coadd.mask_of("NO_DATA")
    got = []
    for x, y, f in zip(xt, yt, sky.flux):
        ix, iy = int(round(x)), int(round(y))
        if not interior(np.array([x]), np.array([y]), d["cshape"], 20)[0] or f < 1.5e5:
            continue
        if not valid[iy - c:iy + c + 1, ix - c:ix + c + 1].all():
            continue
        stamp = coadd.image[iy - c:iy + c + 1, ix - c:ix + c + 1].astype(float)
        sxx, syy, _ = second_moments(stamp, c + x - ix, c + y - iy)
        got.append((sxx / mxx, syy / myy))
    assert len(got) >= 5
    assert np.median(np.array(got), axis=0) == pytest.approx([1.0, 1.0], abs=0.06)


def test_coadd_fits_round_trip(dithered, tmp_path):
    from apsnake.exposure import read_exposure, write_exposure

    d = dithered
    coadd = make_coadd(d["warps"], patch_id=d["patch"])
    coadd.metadata["INVISITS"] = ",".join(str(1000000 + k) for k in range(40))  # long: CONTINUE cards
    path = tmp_path / "coadd" / "g" / f"{d['patch']}.fits"
    path.parent.mkdir(parents=True)
    write_exposure(coadd, path)
    back = read_exposure(path)
    assert back.metadata["INVISITS"] == coadd.metadata["INVISITS"]
    assert back.metadata["NINPUTS"] == 4 and back.metadata["PATCH"] == d["patch"]
    assert back.visit_info.band == "g" and back.visit_info.visit == 0
    np.testing.assert_array_equal(back.mask, coadd.mask)
    np.testing.assert_allclose(back.psf.evaluate(0, 0), coadd.psf.evaluate(0, 0), atol=1e-7)
    x, y = 100.0, 200.0
    np.testing.assert_allclose(np.ravel(back.wcs.all_pix2world([x], [y], 0)),
                               np.ravel(coadd.wcs.all_pix2world([x], [y], 0)), atol=1e-10)


def test_coadd_errors(dithered):
    d = dithered
    with pytest.raises(TemplateError):
        make_coadd([])
    other = d["warps"][0].copy()
    other.visit_info = VisitInfo(visit=5, band="r")
    with pytest.raises(TemplateError):
        make_coadd([d["warps"][1], other])
    cut = replace_image(d["warps"][0], d["warps"][0].image[:-1])
    with pytest.raises(TemplateError):
        make_coadd([d["warps"][1], cut])
    with pytest.raises(TemplateError):
        make_coadd(d["warps"], band="r")
    with pytest.raises(TemplateError):
        make_coadd(d["warps"], shape=(10, 10))
    # Two inputs: no clipping, plain weighted mean.
    two = make_coadd(d["warps"][:2], wcs=d["cwcs"], shape=d["cshape"], band="g")
    assert two.metadata["NCLIPPED"] == 0 and two.metadata["NINPUTS"] == 2
    # Inputs without coverage are ignored; none at all gives an all-NO_DATA coadd when the
    # grid is known (a workflow rule always gets its output).
    empty = d["warps"][0].copy()
    empty.mask[:] = empty.mask_bit("NO_DATA")
    assert make_coadd(d["warps"][:2] + [empty]).metadata["NINPUTS"] == 2
    none = make_coadd([empty], wcs=d["cwcs"], shape=d["cshape"], band="g", patch_id=d["patch"])
    assert none.mask_of("NO_DATA").all() and none.metadata["NINPUTS"] == 0 and none.psf is None
    assert none.shape == d["cshape"] and none.visit_info.band == "g" and none.metadata["PATCH"] == d["patch"]
    with pytest.raises(TemplateError):
        make_coadd([empty])


def replace_image(exp, image):
    return replace(exp, image=image, mask=exp.mask[:image.shape[0]], variance=exp.variance[:image.shape[0]])


# ---------------------------------------------------------------------------
# Template round trip
# ---------------------------------------------------------------------------
def test_template_round_trip():
    """calexp -> sky patches -> coadd -> back onto the calexp grid reproduces the sky."""
    grid = SkyGrid(patch_size_deg=0.05, margin_pixels=20)
    rng = np.random.default_rng(31)
    # Put the science CCD on the corner of four patches.
    strip = int((DEC0 + 90) / grid.patch_size_deg)
    corner_dec = -90 + (strip + 1) * grid.patch_size_deg
    width = 360.0 / grid.n_ra(strip)
    corner_ra = math.floor(RA0 / width) * width + width
    ra0, dec0 = corner_ra + 0.003, corner_dec - 0.002
    sci_wcs = decam_wcs(ra0, dec0, CCD, rot_deg=0.2)
    sky = Sky(ra0, dec0, 0.06, rng, flux=(5e4, 4e5))
    sci_truth = sky.render(sci_wcs, CCD)
    sci = make_calexp(sci_wcs, CCD, sci_truth, 20.0, rng, visit=500, detector=7)
    patches = grid.patch_ids_for_exposure(sci)
    assert len(patches) >= 4
    # Three template visits covering the science CCD, dithered.
    tshape = (1400, 900)
    tmpl_inputs = []
    for k in range(3):
        wcs = decam_wcs(ra0 + 0.003 * (k - 1), dec0 + 0.002 * (k - 1), tshape, rot_deg=0.1 * k)
        tmpl_inputs.append(make_calexp(wcs, tshape, sky.render(wcs, tshape), 15.0, rng, visit=200 + k))
    coadds = []
    for patch in patches:
        cwcs, cshape = grid.patch_wcs(patch)
        warps = [warp_exposure(e, cwcs, cshape) for e in tmpl_inputs]
        warps = [w for w in warps if w.metadata["WARPCOV"] > 0]
        if warps:
            coadds.append(make_coadd(warps, patch_id=patch))
    assert len(coadds) >= 4
    template = template_for_exposure(sci, coadds)
    assert template.shape == sci.shape
    assert template.visit_info.visit == 500 and template.detector == 7
    assert template.metadata["TMPLCOV"] > 0.99 and template.metadata["TMPLNPAT"] >= 4
    assert template.metadata["INVISITS"] == "200,201,202"
    valid = ~template.mask_of("NO_DATA")
    # Sky pixels: (template - truth) / sigma_template is unit noise (a little more: after two
    # resamplings the noise is correlated, which the per-pixel variance plane does not record).
    xs, ys = sky.pixels(sci_wcs)
    blank = valid & (template.variance > 0) & ~star_mask(xs, ys, CCD, 12)
    blank[:10] = blank[-10:] = False
    blank[:, :10] = blank[:, -10:] = False
    pull = (template.image[blank] - sci_truth[blank]) / np.sqrt(template.variance[blank])
    print(f"template round trip: sky pull mean {pull.mean():.3f}, std {pull.std():.3f}, "
          f"coverage {template.metadata['TMPLCOV']:.4f}")
    assert abs(pull.mean()) < 0.03 and 0.9 < pull.std() < 1.2
    # Star fluxes and positions.
    ok = interior(xs, ys, CCD, 15)
    flux = np.array([centroid_and_flux(template.image, x, y) for x, y in zip(xs[ok], ys[ok])])
    dflux = flux[:, 2] / sky.flux[ok] - 1
    dpos = np.hypot(flux[:, 0] - xs[ok], flux[:, 1] - ys[ok])
    print(f"template stars: median dflux {np.median(dflux):.2e}, max |dflux| {np.abs(dflux).max():.4f}, "
          f"max dpos {dpos.max():.4f} px")
    assert np.abs(np.median(dflux)) < 0.003 and np.abs(dflux).max() < 0.015 and dpos.max() < 0.05
    assert template.psf is not None
    assert measure_fwhm(template.psf.evaluate(0, 0)) == pytest.approx(sci.psf.fwhm_pixels, rel=0.03)
    # With one patch only: NO_DATA where that patch does not reach.
    partials = [(template_for_exposure(sci, [c]), c) for c in coadds]
    partial, one = max(partials, key=lambda pc: pc[0].metadata["TMPLCOV"])
    nodata = partial.mask_of("NO_DATA")
    print(f"one patch: coverage {partial.metadata['TMPLCOV']:.3f}")
    assert 0.05 < partial.metadata["TMPLCOV"] < 0.95
    assert partial.metadata["TMPLCOV"] == pytest.approx(1 - nodata.mean())
    assert partial.metadata["TMPLNPAT"] == 1
    cwcs, (cny, cnx) = grid.patch_wcs(one.detector_name)
    yy, xx = np.mgrid[0:CCD[0]:8, 0:CCD[1]:8]
    ra, dec = sci_wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
    cx, cy = cwcs.all_world2pix(ra, dec, 0)
    off_patch = (cx < -1) | (cx > cnx) | (cy < -1) | (cy > cny)
    on_patch = (cx > 6) & (cx < cnx - 7) & (cy > 6) & (cy < cny - 7)
    cov = ~one.mask_of("NO_DATA")
    on_patch &= cov[np.clip(np.round(cy).astype(int), 0, cny - 1), np.clip(np.round(cx).astype(int), 0, cnx - 1)]
    sub = nodata[::8, ::8].ravel()
    assert off_patch.any() and sub[off_patch].all()
    assert on_patch.any() and not sub[on_patch].any()
    assert np.all(partial.image[nodata] == 0) and np.all(partial.variance[nodata] == 0)


def test_single_visit_template(scene):
    sky, wcs, truth = scene
    rng = np.random.default_rng(41)
    sci = make_calexp(wcs, CCD, truth, 20.0, rng, visit=600)
    twcs = decam_wcs(RA0 + 0.004, DEC0 - 0.003, CCD, rot_deg=-0.2)
    tmpl = make_calexp(twcs, CCD, sky.render(twcs, CCD), 15.0, rng, visit=300)
    out = single_visit_template(sci, tmpl)
    assert out.visit_info.visit == 600 and out.detector == sci.detector
    assert out.metadata["TMPLKIND"] == "visit" and out.metadata["INVISITS"] == "300"
    cov = out.metadata["TMPLCOV"]
    assert 0.5 < cov < 1.0
    valid = ~out.mask_of("NO_DATA")
    xs, ys = sky.pixels(wcs)
    use = valid & (out.variance > 0) & ~star_mask(xs, ys, CCD, 12)
    pull = (out.image[use] - truth[use]) / np.sqrt(out.variance[use])
    print(f"single-visit template: sky pull mean {pull.mean():.3f}, std {pull.std():.3f}, coverage {cov:.3f}")
    assert abs(pull.mean()) < 0.03 and 0.9 < pull.std() < 1.1
    ok = interior(xs, ys, CCD, 15)
    ok &= np.array([valid[int(round(y)) - 10:int(round(y)) + 11, int(round(x)) - 10:int(round(x)) + 11].all()
                    if o else False for x, y, o in zip(xs, ys, ok)])
    flux = np.array([centroid_and_flux(out.image, x, y)[2] for x, y in zip(xs[ok], ys[ok])])
    assert np.abs(np.median(flux / sky.flux[ok] - 1)) < 0.003
    with pytest.raises(TemplateError):
        other = tmpl.copy()
        other.visit_info = VisitInfo(visit=300, band="z")
        single_visit_template(sci, other)


def test_homogenize_psfs_brings_inputs_to_the_widest_psf():
    """Inputs of different seeing leave a coadd whose PSF jumps at their edges; after
    homogenisation every input has the widest PSF and keeps its fluxes."""
    from apsnake.exposure import Exposure, PsfModel, VisitInfo
    from apsnake.psf import measure_fwhm
    from apsnake.templates import homogenize_psfs

    def gaussian(sigma, size=25):
        r = np.arange(size) - size // 2
        g = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sigma**2)
        return (g / g.sum()).astype(np.float32)

    exposures = []
    for sigma in (1.4, 1.9):
        image = np.zeros((128, 128), np.float32)
        image[64 - 12:64 + 13, 64 - 12:64 + 13] = 1000.0 * gaussian(sigma)
        exp = Exposure.empty((128, 128), VisitInfo(visit=1, band="g"), detector=25, unit="nJy")
        exp.image, exp.variance = image, np.full((128, 128), 4.0, np.float32)
        exp.psf = PsfModel(gaussian(sigma)[None], spatial_order=0)
        exposures.append(exp)
    out = homogenize_psfs(exposures)
    fwhm = [measure_fwhm(e.psf.evaluate(64, 64)) for e in out]
    stars = [measure_fwhm(e.image[64 - 12:64 + 13, 64 - 12:64 + 13]) for e in out]
    assert fwhm[0] == pytest.approx(fwhm[1], rel=0.02) and stars[0] == pytest.approx(stars[1], rel=0.02)
    assert fwhm[1] == pytest.approx(1.9 * 2.3548, rel=0.02)
    assert out[0].image.sum() == pytest.approx(1000.0, rel=1e-3)
    assert out[1] is exposures[1]  # the widest input is left alone
    assert np.median(out[0].variance) < 4.0  # per-pixel variance of the smoothed noise


def test_best_single_visit_template_from_memory_maps(scene, tmp_path):
    """The template job hands the candidates over as memory maps (a full focal plane's job has
    up to ~18 of them): the choice (the best-covering visit; among equals the sharpest PSF)
    reads their headers, PSFs and a sparse sample of their masks, only the chosen visit is read
    whole, and the template is identical to the one from fully read candidates."""

    from apsnake.exposure import read_exposure, write_exposure
    from apsnake.templates import best_single_visit_template

    sky, wcs, truth = scene
    rng = np.random.default_rng(5)
    calexp = make_calexp(wcs, CCD, truth, 20.0, rng, visit=1)
    candidates = []
    for visit, (dra, ddec) in zip((101, 102, 103), ((0.0004, -0.0003), (0.0, 0.0), (0.02, 0.0))):
        w = decam_wcs(RA0 + dra, DEC0 + ddec, CCD, rot_deg=0.3)
        exp = make_calexp(w, CCD, sky.render(w, CCD), 15.0, rng, visit=visit)
        if visit == 102:  # covers as much, but with a wider PSF: not chosen
            exp = replace(exp, psf=gauss_psf(SIGMA_X * 1.3, SIGMA_Y * 1.3))
        path = tmp_path / f"calexp_{visit}.fits"
        write_exposure(exp, path)
        candidates.append(path)
    full = best_single_visit_template(calexp, [read_exposure(p) for p in candidates])
    mapped_inputs = [read_exposure(p, memmap=True) for p in candidates]
    assert not mapped_inputs[0].image.dtype.isnative  # the file's big-endian pixels, not read
    mapped = best_single_visit_template(calexp, mapped_inputs)
    assert full.metadata["INVISITS"] == mapped.metadata["INVISITS"] == "101"
    assert np.array_equal(full.image, mapped.image, equal_nan=True)
    assert np.array_equal(full.mask, mapped.mask) and np.array_equal(full.variance, mapped.variance, equal_nan=True)
    assert not mapped_inputs[0].image.dtype.isnative  # the warp converted a copy of the box it reads


def test_merge_warps_takes_the_inverse_variance_mean_where_warps_overlap(rng):
    """Three partial warps: copied where one covers, inverse-variance mean (variance 1 / sum(1 /
    var)) where two or three do, OR of their masks, NO_DATA (0, 0) where none does."""
    shape = (40, 30)
    like = Exposure.empty(shape, VisitInfo(visit=9), detector=1, mask_planes={"BAD": 0, "NO_DATA": 8})
    boxes = [np.s_[0:25, 0:20], np.s_[10:40, 5:30], np.s_[20:30, 0:30]]
    warps, images, variances = [], [], []
    for k, box in enumerate(boxes):
        e = Exposure.empty(shape, VisitInfo(visit=100 + k), detector=k, mask_planes={"NO_DATA": 3, "BAD": 5})
        e.mask[:] = 1 << 3
        e.mask[box] = 0
        e.image[box] = rng.normal(10.0 * (k + 1), 1.0, e.image[box].shape)
        e.variance[box] = rng.uniform(1.0, 4.0, e.variance[box].shape)
        e.mask[box][::7, ::5] |= 1 << 5  # a few BAD pixels inside the box
        warps.append(e)
        covered = np.zeros(shape, bool)
        covered[box] = True
        images.append(np.where(covered, e.image, 0.0))
        variances.append(np.where(covered, e.variance, np.inf))
    merged = merge_warps(iter(warps), like)
    weight = sum(1.0 / v for v in variances)
    expected = sum(i / v for i, v in zip(images, variances)) / np.where(weight > 0, weight, 1.0)
    covered = weight > 0
    assert np.allclose(merged.image[covered], expected[covered], rtol=1e-6)
    assert np.allclose(merged.variance[covered], 1.0 / weight[covered], rtol=1e-6)
    only_first = covered & (np.isinf(variances[1]) & np.isinf(variances[2]))
    assert np.array_equal(merged.image[only_first], warps[0].image[only_first])  # copied, not recomputed
    nodata = merged.mask_of("NO_DATA")
    assert np.array_equal(nodata, ~covered)
    assert np.all(merged.image[~covered] == 0) and np.all(merged.variance[~covered] == 0)
    bad = merged.mask_of("BAD")
    assert np.array_equal(bad[covered], np.logical_or.reduce([w.mask_of("BAD") for w in warps])[covered])
    assert merged.metadata["TMPLCOV"] == pytest.approx(covered.mean())
