"""Astrometric calibration of one CCD: match sources to a reference catalogue, fit TAN-SIP.

Stage 8 of calibrateImage (docs/algorithms.md §2.9). Our decision ("Initial WCS"): start
from the raw header's TPV WCS as evaluated by astropy/WCSLIB and fit a TAN-SIP WCS
(order 3 by default) against the reference catalogue with a matcher that tolerates
pointing errors up to ~1 arcmin and rotations up to ~1 degree. Rubin instead starts from
a camera model and uses MatchPessimisticB (150 bright stars, ``maxRotationDeg=1``) with an
affine fitter; the old DECam CalibrateTask fitted TAN-SIP of order 4.

Method
------
All positions live in one gnomonic tangent plane whose tangent point is the initial
WCS's sky position of the CCD centre (standard coordinates xi towards East, eta towards
North, arcsec). Sources are placed there through the initial WCS (so its distortion
model is kept), reference stars through the exact projection.

1. Coarse match (pose voting). Between the initial-WCS positions ``s`` and the reference
   positions ``r`` the error is, to first order, a rotation about the CCD centre and a
   shift: ``r = R(theta) s + t``. For trial angles ``theta`` within +/- ``max_rotation_deg``,
   spaced so that a half step moves the outermost bright source by less than half a
   vote bin, every pair of one of the ``n_bright`` brightest sources and one of the
   ``n_bright`` brightest reference stars in the nominal footprint votes for the shift
   ``r - R(theta) s`` if it lies within ``max_offset_arcsec``. Votes are binned in
   ``coarse_bin_arcsec`` cells and summed over 2x2 cells; the highest sum over all angles
   is the pose. Missing and spurious entries only add a flat background of chance pairs;
   the peak must beat that background at a false-alarm probability ``coarse_false_alarm``
   (Poisson tail times the number of cells and angles tried), otherwise
   :class:`AstrometryError` is raised instead of returning a wrong WCS.
2. Affine refinement: nearest-neighbour matches (scipy cKDTree, one-to-one) within a
   radius that shrinks from two bins to a few times the scatter; a clipped affine fit
   ``r = M s + t`` in the tangent plane, three times.
3. TAN-SIP: :func:`fit_tan_sip` (CRPIX at the CCD centre) on the affine matches, then
   ``n_iter`` times: re-match every source with the current WCS within
   ``match_radius_arcsec``, fit, clip at ``clip_sigma``. The SIP order is lowered if the
   number of matches cannot constrain it (see ``min_matches_per_term``).
4. Checks: at least ``min_matches`` matches and a 2-D rms no larger than
   ``max_rms_arcsec``; otherwise :class:`AstrometryError`.

Offsets and rotations are those at the CCD centre. A rotation error about the boresight
also shifts an off-axis CCD (by 63" per degree at 1 degree from the axis, DECam's outer
CCDs), and that shift counts against ``max_offset_arcsec``. Near a celestial pole an
east-west error of the initial CRVAL also turns the frame (by dRA sin(Dec)), which counts
against ``max_rotation_deg``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.wcs import Sip, WCS
from scipy.spatial import cKDTree
from scipy.special import gammainc

from apsnake.errors import ApsnakeError
from apsnake.sphere import gnomonic, inverse_gnomonic, mean_direction

log = logging.getLogger(__name__)

ARCSEC_PER_DEG = 3600.0
MAS_PER_DEG = 3.6e6


class AstrometryError(ApsnakeError, ValueError):
    """The astrometric solution failed; the message says what failed (too few matches,
    no significant coarse match, rms too large, ...)."""


@dataclass
class AstrometryConfig:
    """Options of :func:`fit_wcs`.

    sip_order : int
        Order of the SIP distortion polynomials (A, B); the inverse (AP, BP) gets one more.
    max_offset_arcsec : float
        Largest pointing error of the initial WCS at the CCD centre searched, arcsec.
    max_rotation_deg : float
        Largest rotation error of the initial WCS about the CCD centre searched, degrees.
    match_radius_arcsec : float
        Match radius once the coarse solution is known, arcsec.
    n_bright : int
        Brightest sources and reference stars used for the coarse match (Rubin: 150).
    min_matches : int
        Fewer final matches -> :class:`AstrometryError`.
    max_rms_arcsec : float
        Final 2-D rms (sqrt of mean of dRA*cos(Dec)^2 + dDec^2) above this ->
        :class:`AstrometryError`, arcsec.
    clip_sigma : float
        Matches whose residual exceeds ``clip_sigma`` times the robust 1-D scatter are
        rejected (scatter from the median squared radial residual).
    n_iter : int
        Re-match / fit / clip iterations with the TAN-SIP WCS.
    coarse_bin_arcsec : float
        Cell size of the offset vote histogram, arcsec. Must exceed the distortion error
        of the initial WCS across the CCD (DECam TPV: < 0.5 arcsec).
    coarse_false_alarm : float
        Largest accepted probability that the coarse peak is a chance coincidence.
    min_matches_per_term : float
        The SIP order is lowered until the matches number at least this many times the
        polynomial terms per axis ((order+1)(order+2)/2).
    """

    sip_order: int = 3
    max_offset_arcsec: float = 90.0
    max_rotation_deg: float = 1.5
    match_radius_arcsec: float = 1.0
    n_bright: int = 150
    min_matches: int = 10
    max_rms_arcsec: float = 0.15
    clip_sigma: float = 3.0
    n_iter: int = 3
    coarse_bin_arcsec: float = 2.0
    coarse_false_alarm: float = 1e-3
    min_matches_per_term: float = 2.0


@dataclass
class AstrometryResult:
    """Result of :func:`fit_wcs`.

    wcs : astropy.wcs.WCS
        TAN-SIP WCS (plain TAN if the order fell to 1) of the trimmed pixel frame, 0-based
        pixels in ``all_pix2world(x, y, 0)``; ``to_header(relax=True)`` round-trips.
    matches : pandas.DataFrame
        Matches used in the final fit: ``src_index``, ``ref_index`` (indices into the input
        arrays), ``x``, ``y`` (pixels), ``ra_ref``, ``dec_ref`` (deg), ``dra_mas``,
        ``ddec_mas`` (fitted WCS minus reference, RA residual times cos(Dec), mas).
    n_matches : int
        Number of rows of ``matches``.
    rms_mas : float
        2-D rms residual, sqrt(mean(dra^2 + ddec^2)), mas.
    offset_arcsec : tuple of float
        Fitted minus initial WCS at the CCD centre, (dRA*cos(Dec), dDec), arcsec.
    rotation_deg : float
        Fitted minus initial position angle (North through East) of the pixel +y axis at
        the CCD centre, degrees.
    sip_order : int
        SIP order actually fitted.
    """

    wcs: WCS
    matches: pd.DataFrame
    n_matches: int
    rms_mas: float
    offset_arcsec: tuple[float, float]
    rotation_deg: float
    sip_order: int = 0


# Points this close to 90 degrees from the tangent point (cos of the distance) get no
# standard coordinates (NaN) in the projections below.
_MIN_COS = 1e-6


def _sky_residual_mas(ra, dec, ra_ref, dec_ref):
    """(ra - ra_ref) cos(dec_ref) and dec - dec_ref in mas (RA difference wrapped)."""
    dra = (np.asarray(ra) - ra_ref + 180.0) % 360.0 - 180.0
    return dra * np.cos(np.radians(dec_ref)) * MAS_PER_DEG, (np.asarray(dec) - dec_ref) * MAS_PER_DEG


# ---------------------------------------------------------------------------
# TAN-SIP fit.
def _terms(order, min_total=0):
    """Exponents (p, q) with min_total <= p + q <= order, in a fixed order."""
    return [(p, t - p) for t in range(min_total, order + 1) for p in range(t, -1, -1)]


def _design(u, v, terms, scale):
    """Design matrix of the monomials (u/scale)^p (v/scale)^q."""
    un, vn = u / scale, v / scale
    return np.stack([un ** p * vn ** q for p, q in terms], axis=1)


def _lstsq(design, values):
    """Linear least squares ``design @ coef ~ values`` (values 1-D or one column per axis).

    Normal equations of the column-equilibrated design matrix plus one step of iterative
    refinement: as accurate as an SVD solver for these well-scaled polynomial bases and
    ~100 times faster than LAPACK's threaded SVD on a busy machine (small matrices).
    """
    norm = np.sqrt((design ** 2).sum(axis=0))
    norm[norm == 0] = 1.0
    a = design / norm
    normal = a.T @ a
    coef = np.linalg.solve(normal, a.T @ values)
    coef = coef + np.linalg.solve(normal, a.T @ (values - a @ coef))
    return coef / norm[:, None] if coef.ndim == 2 else coef / norm


def n_sip_terms(order: int) -> int:
    """Number of polynomial terms per axis of a TAN-SIP fit of ``order`` (incl. linear and
    constant terms): (order+1)(order+2)/2."""
    return (order + 1) * (order + 2) // 2


def fit_tan_sip(x, y, ra, dec, crpix, order=3, *, shape=None, inv_order=None) -> WCS:
    """Fit a TAN-SIP WCS to matched pixel and sky positions by linear least squares.

    The model is ``(xi, eta) = CD @ (u + f(u, v), v + g(u, v))`` with ``u, v`` the pixel
    offsets from CRPIX and ``f``, ``g`` the SIP polynomials (terms of total order 2 to
    ``order``). Writing ``xi`` and ``eta`` as full polynomials of ``u, v`` makes it linear:
    the linear terms give CD, the higher terms ``CD^-1`` times give A and B, and the
    constant term moves the tangent point (CRVAL), after which the projection is redone
    until the constant vanishes (< 1e-10 deg; 2-3 passes). The inverse polynomials AP, BP
    (order ``inv_order``) are fitted on a 40x40 grid over the pixel domain so that
    ``world2pix`` works.

    Parameters
    ----------
    x, y : array_like
        Pixel positions, 0-based (astropy origin 0), pixels.
    ra, dec : array_like
        Sky positions of the same objects, ICRS, deg.
    crpix : (float, float)
        Reference pixel in the FITS 1-based convention (as ``WCS.wcs.crpix``), pixels.
    order : int
        SIP order; 1 gives a plain TAN WCS (no SIP).
    shape : (int, int), optional
        (ny, nx) of the image: the domain of the inverse polynomials and the WCS
        ``pixel_shape``. Default: the bounding box of ``x, y``.
    inv_order : int, optional
        Order of AP, BP; default ``order + 1``.

    Returns
    -------
    astropy.wcs.WCS
        CTYPE ``RA---TAN-SIP``/``DEC--TAN-SIP`` (``RA---TAN``/``DEC--TAN`` for order 1),
        CD matrix in deg/pixel, RADESYS ICRS.

    Raises
    ------
    AstrometryError
        Mismatched lengths, non-finite input, or fewer points than terms per axis.
    """
    x, y, ra, dec = (np.asarray(a, dtype=float).ravel() for a in (x, y, ra, dec))
    if not (len(x) == len(y) == len(ra) == len(dec)):
        raise AstrometryError(f"fit_tan_sip: x, y, ra, dec lengths differ "
                              f"({len(x)}, {len(y)}, {len(ra)}, {len(dec)})")
    if not np.all(np.isfinite(np.concatenate([x, y, ra, dec]))):
        raise AstrometryError("fit_tan_sip: non-finite positions")
    order = int(order)
    if order < 1:
        raise AstrometryError(f"fit_tan_sip: order must be >= 1, got {order}")
    terms = _terms(order)
    if len(x) < len(terms):
        raise AstrometryError(f"fit_tan_sip: {len(x)} matches cannot constrain an order-{order} "
                              f"fit ({len(terms)} terms per axis)")
    crpix = np.asarray(crpix, dtype=float)
    u = x + 1.0 - crpix[0]
    v = y + 1.0 - crpix[1]
    scale = max(float(np.max(np.abs(np.concatenate([u, v])))), 1.0)
    design = _design(u, v, terms, scale)

    ra0, dec0 = mean_direction(ra, dec)
    for _ in range(6):
        xi, eta, _ = gnomonic(ra, dec, ra0, dec0, min_cos=_MIN_COS)
        coef = _lstsq(design, np.stack([xi, eta], axis=1))  # (n_terms, 2), deg
        c0 = coef[0]  # constant term: tangent-plane position of CRPIX
        if math.hypot(*c0) < 1e-10:
            break
        ra0, dec0 = (float(a) for a in inverse_gnomonic(c0[0], c0[1], ra0, dec0))
    # Undo the column scaling: the coefficient of u^p v^q is coef / scale^(p+q).
    powers = np.array([p + q for p, q in terms])
    coef = coef / scale ** powers[:, None]
    index = {t: i for i, t in enumerate(terms)}
    cd = np.array([[coef[index[(1, 0)], 0], coef[index[(0, 1)], 0]],
                   [coef[index[(1, 0)], 1], coef[index[(0, 1)], 1]]])
    if abs(np.linalg.det(cd)) == 0:
        raise AstrometryError("fit_tan_sip: singular CD matrix (degenerate star positions)")

    w = WCS(naxis=2)
    w.wcs.crpix = crpix
    w.wcs.crval = [ra0, dec0]
    w.wcs.cd = cd
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    if order >= 2:
        cd_inv = np.linalg.inv(cd)
        a = np.zeros((order + 1, order + 1))
        b = np.zeros((order + 1, order + 1))
        for (p, q), i in index.items():
            if p + q >= 2:
                a[p, q], b[p, q] = cd_inv @ coef[i]
        if shape is not None:
            ny, nx = shape
            x_lo, x_hi, y_lo, y_hi = 0.0, nx - 1.0, 0.0, ny - 1.0
        else:
            x_lo, x_hi, y_lo, y_hi = x.min(), x.max(), y.min(), y.max()
        gy, gx = np.meshgrid(np.linspace(y_lo, y_hi, 40), np.linspace(x_lo, x_hi, 40), indexing="ij")
        gu = gx.ravel() + 1.0 - crpix[0]
        gv = gy.ravel() + 1.0 - crpix[1]
        fu = gu + sum(a[p, q] * gu ** p * gv ** q for p, q in _terms(order, 2))
        fv = gv + sum(b[p, q] * gu ** p * gv ** q for p, q in _terms(order, 2))
        inv_order = order + 1 if inv_order is None else int(inv_order)
        inv_terms = _terms(inv_order)
        inv_scale = max(float(np.max(np.abs(np.concatenate([fu, fv])))), 1.0)
        inv_coef = _lstsq(_design(fu, fv, inv_terms, inv_scale), np.stack([gu - fu, gv - fv], axis=1))
        ap = np.zeros((inv_order + 1, inv_order + 1))
        bp = np.zeros((inv_order + 1, inv_order + 1))
        for (p, q), c in zip(inv_terms, inv_coef):
            ap[p, q], bp[p, q] = c / inv_scale ** (p + q)
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.sip = Sip(a, b, ap, bp, crpix)
    else:
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.set()
    if shape is not None:
        w.pixel_shape = (int(shape[1]), int(shape[0]))
    return w


# ---------------------------------------------------------------------------
# Matching helpers.
def _unique_match(src_xy, tree, radius):
    """One-to-one nearest-neighbour match of ``src_xy`` (n, 2) against the points of a
    cKDTree within ``radius`` (same units); a reference claimed by several sources goes
    to the closest. Returns (src_idx, ref_idx, distance)."""
    if len(src_xy) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    dist, idx = tree.query(src_xy, k=1, distance_upper_bound=radius)
    ok = np.isfinite(dist)
    s = np.nonzero(ok)[0]
    r, d = idx[ok], dist[ok]
    order = np.lexsort((d, r))  # by reference, then distance
    s, r, d = s[order], r[order], d[order]
    first = np.ones(len(r), bool)
    first[1:] = r[1:] != r[:-1]
    return s[first], r[first], d[first]


def _robust_sigma_1d(dx, dy):
    """1-D scatter of 2-D residuals from the median squared radius (Gaussian:
    median(r^2) = 2 ln 2 sigma^2)."""
    r2 = dx ** 2 + dy ** 2
    return math.sqrt(max(float(np.median(r2)), 0.0) / (2.0 * math.log(2.0)))


def _dof_factor(n, n_par):
    """sqrt(n / (n - n_par)): residual scatter -> noise, for n points and n_par parameters
    per axis (large when the fit has hardly any freedom)."""
    return math.sqrt(n / max(n - n_par, 1))


def _fit_affine(s, r, clip_sigma, n_clip=3):
    """Clipped affine fit r = M s + t; s, r (n, 2). Returns (M, t, keep, sigma_1d)."""
    keep = np.ones(len(s), bool)
    design = np.column_stack([s, np.ones(len(s))])
    for _ in range(n_clip + 1):
        coef = _lstsq(design[keep], r[keep])
        res = r - design @ coef
        sigma = _robust_sigma_1d(res[keep, 0], res[keep, 1]) * _dof_factor(int(keep.sum()), 3)
        new_keep = np.hypot(res[:, 0], res[:, 1]) <= clip_sigma * max(sigma, 1e-6)
        if new_keep.sum() < 3 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return coef[:2].T, coef[2], keep, sigma


def _coarse_match(s, r, cfg):
    """Pose voting (rotation about the tangent point + shift) between source positions
    ``s`` and reference positions ``r`` (both (n, 2), arcsec).

    Returns
    -------
    theta : float, rotation (radians, from +xi towards +eta) to apply to ``s``.
    shift : (2,) ndarray, shift to add after the rotation, arcsec.
    votes : int, pairs in the best 2x2-cell window.
    p_false : float, probability that chance pairs alone give such a peak anywhere.
    lam : float, mean number of chance pairs per window.
    """
    b = float(cfg.coarse_bin_arcsec)
    lim = float(cfg.max_offset_arcsec)
    n_bins = int(math.ceil(2.0 * lim / b))
    r_max = max(float(np.max(np.hypot(s[:, 0], s[:, 1]))), b)
    step = b / r_max  # a half step moves the outermost source by b/2
    max_rot = math.radians(max(cfg.max_rotation_deg, 0.0))
    n_half = int(math.ceil(max_rot / step))
    thetas = np.linspace(-max_rot, max_rot, 2 * n_half + 1)  # spacing <= step
    best = (0, 0.0, np.zeros(2), 0)
    n_pairs_total = 0
    for theta in thetas[np.argsort(np.abs(thetas), kind="stable")]:  # ties go to the smaller angle
        c, sn = math.cos(theta), math.sin(theta)
        sr = s @ np.array([[c, sn], [-sn, c]])  # rows: R(theta) @ s_i
        d = r[None, :, :] - sr[:, None, :]
        d = d.reshape(-1, 2)
        d = d[(np.abs(d[:, 0]) < lim) & (np.abs(d[:, 1]) < lim)]
        n_pairs_total += len(d)
        ij = np.floor((d + lim) / b).astype(np.int64)
        np.clip(ij, 0, n_bins - 1, out=ij)
        hist = np.bincount(ij[:, 0] * n_bins + ij[:, 1], minlength=n_bins * n_bins).reshape(n_bins, n_bins)
        win = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
        k = int(np.argmax(win))
        votes = int(win.flat[k])
        if votes > best[0] and votes > 0:
            i, j = divmod(k, n_bins - 1)
            lo = np.array([i, j]) * b - lim
            inside = np.all((d >= lo) & (d < lo + 2 * b), axis=1)
            best = (votes, theta, np.median(d[inside], axis=0), len(d))
    votes, theta, shift, _n = best
    # Chance pairs per 2x2 window (mean over angles), number of windows tried.
    lam = (n_pairs_total / max(len(thetas), 1)) * (4.0 * b * b) / (2.0 * lim) ** 2
    n_tests = (n_bins - 1) ** 2 * len(thetas)
    # P(Poisson(lam) >= votes) is the regularised lower incomplete gamma function.
    p_false = min(1.0, n_tests * float(gammainc(votes, lam))) if votes > 0 else 1.0
    return theta, shift, votes, p_false, lam


def _pa_deg(wcs, x, y, dy=10.0):
    """Position angle (North through East, deg) of the pixel +y direction at (x, y)."""
    ra, dec = wcs.all_pix2world([x, x], [y, y + dy], 0)
    dra = ((ra[1] - ra[0] + 180.0) % 360.0 - 180.0) * math.cos(math.radians(dec[0]))
    return math.degrees(math.atan2(dra, dec[1] - dec[0]))


def fit_wcs(x, y, flux, ref_ra, ref_dec, ref_mag, initial_wcs, shape=(4096, 2048),
            config: AstrometryConfig | None = None) -> AstrometryResult:
    """Match the sources of one CCD to a reference catalogue and fit a TAN-SIP WCS.

    Parameters
    ----------
    x, y : array_like
        Source centroids in the trimmed pixel frame, 0-based, pixels.
    flux : array_like
        Source fluxes (any linear unit); only their order is used (brightest first).
    ref_ra, ref_dec : array_like
        Reference star positions at the epoch of the exposure, ICRS, deg.
    ref_mag : array_like
        Reference magnitudes (NaN sorts as faintest); only their order is used.
    initial_wcs : astropy.wcs.WCS
        Initial WCS of the same pixel frame (e.g. the raw header's TPV), evaluated with
        ``all_pix2world(x, y, 0)``.
    shape : (int, int)
        (ny, nx) of the CCD, pixels.
    config : AstrometryConfig, optional

    Returns
    -------
    AstrometryResult

    Raises
    ------
    AstrometryError
        Bad input, too few sources or reference stars in the footprint, no significant
        coarse match within the offset/rotation tolerance, too few final matches, or a
        final rms above ``max_rms_arcsec``.
    """
    t_start = time.perf_counter()
    cfg = config if config is not None else AstrometryConfig()
    x, y, flux = (np.asarray(a, dtype=float).ravel() for a in (x, y, flux))
    ref_ra, ref_dec, ref_mag = (np.asarray(a, dtype=float).ravel() for a in (ref_ra, ref_dec, ref_mag))
    if not (len(x) == len(y) == len(flux)):
        raise AstrometryError(f"source arrays differ in length: x {len(x)}, y {len(y)}, flux {len(flux)}")
    if not (len(ref_ra) == len(ref_dec) == len(ref_mag)):
        raise AstrometryError(f"reference arrays differ in length: ra {len(ref_ra)}, dec {len(ref_dec)}, "
                              f"mag {len(ref_mag)}")
    ny, nx = (int(v) for v in shape)
    min_needed = max(int(cfg.min_matches), 3)

    # Tangent plane about the initial WCS's CCD centre (arcsec).
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    ra_c, dec_c = (float(v[0]) for v in initial_wcs.all_pix2world([xc], [yc], 0))
    src_ok = np.isfinite(x) & np.isfinite(y)
    src_idx = np.nonzero(src_ok)[0]
    s_ra, s_dec = initial_wcs.all_pix2world(x[src_idx], y[src_idx], 0)
    s_xi, s_eta, _ = gnomonic(s_ra, s_dec, ra_c, dec_c, min_cos=_MIN_COS)
    s_all = np.column_stack([s_xi, s_eta]) * ARCSEC_PER_DEG
    good = np.all(np.isfinite(s_all), axis=1)
    src_idx, s_all = src_idx[good], s_all[good]

    ref_ok = np.isfinite(ref_ra) & np.isfinite(ref_dec)
    r_xi, r_eta, _ = gnomonic(np.where(ref_ok, ref_ra, ra_c), np.where(ref_ok, ref_dec, dec_c), ra_c, dec_c,
                              min_cos=_MIN_COS)
    r_all = np.column_stack([r_xi, r_eta]) * ARCSEC_PER_DEG
    ref_ok &= np.all(np.isfinite(r_all), axis=1)

    # Approximate pixel positions of the refs through the local affine map of the
    # initial WCS (grid over the CCD) to select the footprint; distortion < 1 arcsec.
    gy, gx = np.meshgrid(np.linspace(0, ny - 1, 9), np.linspace(0, nx - 1, 5), indexing="ij")
    g_ra, g_dec = initial_wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    g_xi, g_eta, _ = gnomonic(g_ra, g_dec, ra_c, dec_c, min_cos=_MIN_COS)
    tp = np.column_stack([g_xi, g_eta]) * ARCSEC_PER_DEG
    aff = _lstsq(np.column_stack([tp, np.ones(len(tp))]), np.column_stack([gx.ravel(), gy.ravel()]))
    pix_scale = math.sqrt(abs(np.linalg.det(np.linalg.inv(aff[:2].T))))  # arcsec/pixel
    r_pix = np.column_stack([r_all, np.ones(len(r_all))]) @ aff
    half_diag = 0.5 * math.hypot(nx, ny) * pix_scale
    margin = (cfg.max_offset_arcsec + half_diag * math.sin(math.radians(cfg.max_rotation_deg))
              + 2 * cfg.coarse_bin_arcsec) / pix_scale

    def in_box(p, pad):
        with np.errstate(invalid="ignore"):
            return ((p[:, 0] >= -0.5 - pad) & (p[:, 0] <= nx - 0.5 + pad)
                    & (p[:, 1] >= -0.5 - pad) & (p[:, 1] <= ny - 0.5 + pad))

    near = ref_ok & in_box(r_pix, margin)
    nominal = ref_ok & in_box(r_pix, 0.0)
    if nominal.sum() < min_needed:
        raise AstrometryError(f"only {int(nominal.sum())} reference stars in the CCD footprint of the "
                              f"initial WCS (centre RA {ra_c:.5f}, Dec {dec_c:.5f} deg); "
                              f"need at least {min_needed}")
    if len(src_idx) < min_needed:
        raise AstrometryError(f"only {len(src_idx)} usable sources; need at least {min_needed}")

    # 1. Coarse match on the brightest entries.
    s_flux = np.where(np.isfinite(flux[src_idx]), flux[src_idx], -np.inf)
    bright_s = np.argsort(-s_flux, kind="stable")[: cfg.n_bright]
    nominal_idx = np.nonzero(nominal)[0]
    mags = np.where(np.isfinite(ref_mag[nominal_idx]), ref_mag[nominal_idx], np.inf)
    bright_r = nominal_idx[np.argsort(mags, kind="stable")[: cfg.n_bright]]
    theta, shift, votes, p_false, lam = _coarse_match(s_all[bright_s], r_all[bright_r], cfg)
    log.debug("coarse match: %d votes (chance %.2f per cell, false alarm %.1e), rotation %.3f deg, "
              "shift %.1f, %.1f arcsec", votes, lam, p_false, math.degrees(theta), *shift)
    if votes < 4 or p_false > cfg.coarse_false_alarm:
        raise AstrometryError(
            f"no significant coarse match within {cfg.max_offset_arcsec:g} arcsec and "
            f"{cfg.max_rotation_deg:g} deg of the initial WCS: best peak {votes} pairs of "
            f"{len(bright_s)} sources x {len(bright_r)} reference stars (chance {lam:.2f} per cell, "
            f"false-alarm probability {p_false:.2g})")

    # 2. Affine refinement in the tangent plane.
    near_idx = np.nonzero(near)[0]
    r_near = r_all[near_idx]
    tree = cKDTree(r_near)
    c, sn = math.cos(theta), math.sin(theta)
    M, t = np.array([[c, -sn], [sn, c]]), np.asarray(shift, float)
    radius = 2.0 * cfg.coarse_bin_arcsec
    sigma = radius
    for _ in range(3):
        si, ri, _d = _unique_match(s_all @ M.T + t, tree, radius)
        if len(si) < 3:
            raise AstrometryError(f"only {len(si)} matches within {radius:.2f} arcsec after the coarse "
                                  f"match; need at least {min_needed}")
        M, t, keep, sigma = _fit_affine(s_all[si], r_near[ri], cfg.clip_sigma)
        radius = max(cfg.match_radius_arcsec, min(radius, 5.0 * sigma))

    # 3. TAN-SIP fits with re-matching and clipping.
    crpix = ((nx + 1) / 2.0, (ny + 1) / 2.0)
    si, ri, _d = _unique_match(s_all @ M.T + t, tree, max(cfg.match_radius_arcsec, min(radius, 5.0 * sigma)))
    order = int(cfg.sip_order)

    def usable_order(n):
        o = order
        while o > 1 and n < cfg.min_matches_per_term * n_sip_terms(o):
            o -= 1
        return o

    if len(si) < min_needed:
        raise AstrometryError(f"only {len(si)} matches after the affine refinement; need at least {min_needed}")
    x_src, y_src = x[src_idx], y[src_idx]
    ref_near_ra, ref_near_dec = ref_ra[near_idx], ref_dec[near_idx]
    wcs = None
    fit_order = order
    for it in range(max(int(cfg.n_iter), 1) + 1):
        if wcs is not None:  # re-match with the current WCS
            p_ra, p_dec = wcs.all_pix2world(x_src, y_src, 0)
            p_xi, p_eta, _ = gnomonic(p_ra, p_dec, ra_c, dec_c, min_cos=_MIN_COS)
            si, ri, _d = _unique_match(np.column_stack([p_xi, p_eta]) * ARCSEC_PER_DEG, tree,
                                       cfg.match_radius_arcsec)
            if len(si) < min_needed:
                raise AstrometryError(f"only {len(si)} matches within {cfg.match_radius_arcsec:g} arcsec "
                                      f"(iteration {it}); need at least {min_needed}")

        def fit(sel):
            o = usable_order(int(sel.sum()))
            return o, fit_tan_sip(x_src[si[sel]], y_src[si[sel]], ref_near_ra[ri[sel]], ref_near_dec[ri[sel]],
                                  crpix, o, shape=(ny, nx))

        keep = np.ones(len(si), bool)
        for _ in range(5):  # fit and clip
            fit_order, wcs = fit(keep)
            f_ra, f_dec = wcs.all_pix2world(x_src[si], y_src[si], 0)
            dra, ddec = _sky_residual_mas(f_ra, f_dec, ref_near_ra[ri], ref_near_dec[ri])
            # Scatter corrected for the fitted parameters (else few matches clip themselves away).
            sig = _robust_sigma_1d(dra[keep], ddec[keep]) * _dof_factor(int(keep.sum()), n_sip_terms(fit_order))
            new_keep = np.hypot(dra, ddec) <= cfg.clip_sigma * max(sig, 1e-3)
            if new_keep.sum() < min_needed or np.array_equal(new_keep, keep):
                break
            keep = new_keep
        else:  # clipping still changing: fit the last selection
            fit_order, wcs = fit(keep)
        si, ri = si[keep], ri[keep]
        if it > 0 and it >= int(cfg.n_iter):
            break

    # Final residuals of the last fit's matches.
    f_ra, f_dec = wcs.all_pix2world(x_src[si], y_src[si], 0)
    dra, ddec = _sky_residual_mas(f_ra, f_dec, ref_near_ra[ri], ref_near_dec[ri])
    n_matches = len(si)
    rms = float(np.sqrt(np.mean(dra ** 2 + ddec ** 2))) if n_matches else float("nan")
    matches = pd.DataFrame({
        "src_index": src_idx[si].astype(np.int64),
        "ref_index": near_idx[ri].astype(np.int64),
        "x": x_src[si], "y": y_src[si],
        "ra_ref": ref_near_ra[ri], "dec_ref": ref_near_dec[ri],
        "dra_mas": dra, "ddec_mas": ddec,
    })
    if n_matches < min_needed:
        raise AstrometryError(f"only {n_matches} matches in the final fit; need at least {min_needed}")
    if not rms <= cfg.max_rms_arcsec * 1000.0:
        raise AstrometryError(f"astrometric rms {rms:.0f} mas over {n_matches} matches exceeds "
                              f"{cfg.max_rms_arcsec * 1000:.0f} mas")

    f_c_ra, f_c_dec = (float(v[0]) for v in wcs.all_pix2world([xc], [yc], 0))
    d_ra, d_dec = _sky_residual_mas(f_c_ra, f_c_dec, ra_c, dec_c)
    offset = (float(d_ra) / 1000.0, float(d_dec) / 1000.0)
    rotation = (_pa_deg(wcs, xc, yc) - _pa_deg(initial_wcs, xc, yc) + 180.0) % 360.0 - 180.0
    log.info("astrometry: %d matches, rms %.1f mas, SIP order %d, offset (%.2f, %.2f) arcsec, "
             "rotation %.3f deg, %.3f s", n_matches, rms, fit_order, offset[0], offset[1], rotation,
             time.perf_counter() - t_start)
    return AstrometryResult(wcs=wcs, matches=matches, n_matches=n_matches, rms_mas=rms,
                            offset_arcsec=offset, rotation_deg=float(rotation), sip_order=fit_order)
