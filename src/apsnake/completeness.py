"""Completeness of detection: binned fractions with binomial errors and a fitted logistic curve.

Used for injected fakes (``apsnake.fakes``, the night report) and for the simulator's truth
(``apsnake.sim.evaluate``), so that both give the same kind of number. ``values`` is what the
completeness is a function of: a magnitude (completeness falls as it grows,
``decreasing=True``) or an expected S/N (completeness rises).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Central interval of the binomial errors (one sigma).
ONE_SIGMA = 0.6826894921370859


@dataclass(frozen=True)
class CompletenessFit:
    """C(x) = plateau / (1 + exp(-(x - center) / width)) (``width`` < 0 when decreasing).

    ``x50``: where C reaches ``level`` (0.5 unless asked otherwise), NaN when the fit failed
    (fewer than ``min_points`` values, all detected or none, or the plateau below ``level``);
    ``x50_err``: its one-sigma error from a bootstrap of the values; ``n``: values used.
    """

    x50: float
    x50_err: float
    plateau: float
    center: float
    width: float
    level: float
    n: int

    def __call__(self, x):
        """The fitted completeness at ``x``."""
        return self.plateau / (1.0 + np.exp(-(np.asarray(x, float) - self.center) / self.width))


def binned_completeness(values, detected, edges) -> dict[str, np.ndarray]:
    """Fraction detected per bin of ``values`` (bins ``[edges[i], edges[i+1])``).

    Returns arrays ``lo``, ``hi`` (bin edges), ``n`` (values in the bin), ``k`` (detected),
    ``fraction`` (k / n, NaN for an empty bin) and ``err_lo``, ``err_hi``: the Clopper-Pearson
    (exact binomial) one-sigma interval, so that a bin of 3 out of 3 is not given zero error.
    """
    from scipy.special import betaincinv  # the beta distribution's quantiles (scipy.stats costs 0.7 s to import)

    values, detected = np.asarray(values, float), np.asarray(detected, bool)
    edges = np.asarray(edges, float)
    which = np.digitize(values, edges) - 1
    nbin = len(edges) - 1
    ok = (which >= 0) & (which < nbin) & np.isfinite(values)
    n = np.bincount(which[ok], minlength=nbin)
    k = np.bincount(which[ok], weights=detected[ok], minlength=nbin).astype(int)
    tail = (1.0 - ONE_SIGMA) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(n > 0, k / np.maximum(n, 1), np.nan)
        err_lo = np.where(k > 0, betaincinv(np.maximum(k, 1), n - k + 1, tail), 0.0)
        err_hi = np.where(k < n, betaincinv(k + 1, np.maximum(n - k, 1), 1.0 - tail), 1.0)
    err_lo = np.where(n > 0, err_lo, np.nan)
    err_hi = np.where(n > 0, err_hi, np.nan)
    return {"lo": edges[:-1], "hi": edges[1:], "n": n, "k": k, "fraction": fraction,
            "err_lo": err_lo, "err_hi": err_hi}


def _fit_logistic(x, d, decreasing, start=None):
    """Maximum-likelihood (Bernoulli) logistic with a plateau: (plateau, center, width).
    ``start``: one (plateau, center, width) to start from, else a small grid of starts.

    Fisher scoring with Levenberg-Marquardt damping in (center, log width, logit plateau):
    the 3 x 3 expected information and the gradient are sums over the values, so a fit takes
    ~10 vectorised iterations (a night summary fits one curve and 40 bootstrap resamples per
    data ID and group; a simplex search needed ~350 likelihood evaluations per fit).
    """
    from scipy.special import expit

    sign = -1.0 if decreasing else 1.0
    spread = max(float(np.std(x)), 1e-3)
    eps = 1e-9

    def model(p):
        center, log_width, logit_plateau = p
        with np.errstate(all="ignore"):  # a trial step may overflow: rejected below
            width = np.exp(log_width)
            z = sign * (x - center) / width
            plateau, s = expit(logit_plateau), expit(z)
            c = np.clip(plateau * s, eps, 1.0 - eps)
            nll = -float(np.sum(d * np.log(c) + (1.0 - d) * np.log1p(-c)))
            ds = plateau * s * (1.0 - s)  # dc/dz
            jac = np.stack([ds * (-sign / width), ds * (-z), plateau * s * (1.0 - plateau)], axis=1)  # dc/dp
        if not (np.isfinite(nll) and np.isfinite(jac).all()):
            return float("inf"), c, jac
        return nll, c, jac

    def fit(p):
        p = np.asarray(p, float)
        nll, c, jac = model(p)
        damping = 1e-3
        for _ in range(200):
            w = 1.0 / (c * (1.0 - c))
            grad = jac.T @ ((c - d) * w)
            info = (jac * w[:, None]).T @ jac
            improved = False
            while damping < 1e10:
                try:
                    step = np.linalg.solve(info + damping * np.diag(np.diag(info) + 1e-12), -grad)
                except np.linalg.LinAlgError:
                    damping *= 10.0
                    continue
                trial = p + step
                t_nll, t_c, t_jac = model(trial)
                if t_nll <= nll:
                    improved = True
                    break
                damping *= 10.0
            if not improved:
                break
            converged = nll - t_nll <= 1e-10 * max(1.0, abs(nll)) and np.max(np.abs(step)) < 1e-7
            p, nll, c, jac = trial, t_nll, t_c, t_jac
            damping = max(damping / 10.0, 1e-12)
            if converged:
                break
        return nll, p

    if start is None:
        starts = [(float(np.quantile(x, q)), np.log(spread * f), 4.0) for q in (0.3, 0.5, 0.7) for f in (0.1, 0.5)]
    else:
        plateau, center, width = start
        starts = [(center, np.log(abs(width)), np.log(plateau / max(1.0 - plateau, 1e-6)))]
    _, (center, log_width, logit_plateau) = min((fit(s) for s in starts), key=lambda r: r[0])
    return float(expit(logit_plateau)), float(center), sign * float(np.exp(log_width))


def _x50(plateau, center, width, level):
    if not plateau > level:
        return float("nan")
    return float(center - width * np.log(plateau / level - 1.0))


def fit_completeness(values, detected, *, decreasing: bool = False, level: float = 0.5,
                     min_points: int = 10, n_bootstrap: int = 40, seed: int = 0) -> CompletenessFit:
    """Fit C(x) = plateau / (1 + exp(-(x - center) / width)) to detected / not detected
    outcomes, unbinned (Bernoulli likelihood), and solve C(x50) = ``level``.

    ``decreasing=True`` for magnitudes (fainter is less complete). The plateau (<= 1) takes
    the sources lost at any brightness (on masked pixels, blended with stars). ``x50_err`` is
    the standard deviation of x50 over ``n_bootstrap`` resamples of the outcomes (seeded:
    the same input gives the same answer).
    """
    x, d = np.asarray(values, float), np.asarray(detected, bool)
    use = np.isfinite(x)
    x, d = x[use], d[use].astype(float)
    nan = float("nan")
    if len(x) < min_points or d.all() or not d.any():
        return CompletenessFit(nan, nan, nan, nan, nan, level, int(len(x)))
    plateau, center, width = _fit_logistic(x, d, decreasing)
    x50 = _x50(plateau, center, width, level)
    err = nan
    if np.isfinite(x50) and n_bootstrap > 1:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(n_bootstrap):
            pick = rng.integers(0, len(x), len(x))
            if 0 < d[pick].sum() < len(pick):
                draws.append(_x50(*_fit_logistic(x[pick], d[pick], decreasing, (plateau, center, width)), level))
        draws = np.asarray(draws)
        draws = draws[np.isfinite(draws)]
        if len(draws) > 1:
            err = float(np.std(draws, ddof=1))
    return CompletenessFit(x50, err, plateau, center, width, level, int(len(x)))
