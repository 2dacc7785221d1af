"""apsnake.completeness: binned fractions with binomial errors, the logistic fit and its m50."""

import numpy as np
import pytest

from apsnake.completeness import binned_completeness, fit_completeness


def _outcomes(rng, x, plateau, center, width):
    return rng.random(x.size) < plateau / (1.0 + np.exp(-(x - center) / width))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fit_recovers_m50_and_plateau_of_a_known_curve(seed):
    rng = np.random.default_rng(seed)
    mag = rng.uniform(20.0, 25.0, 600)
    detected = _outcomes(rng, mag, 0.95, 23.2, -0.25)  # fainter is less complete
    fit = fit_completeness(mag, detected, decreasing=True)
    truth_m50 = 23.2 + 0.25 * np.log(0.95 / 0.5 - 1.0)
    assert abs(fit.x50 - truth_m50) < 3 * fit.x50_err + 0.02
    assert 0.01 < fit.x50_err < 0.15
    assert fit.plateau == pytest.approx(0.95, abs=0.04) and fit.width < 0
    assert fit(fit.x50) == pytest.approx(0.5)  # the curve and its x50 agree


def test_fit_in_snr_rises_and_is_deterministic():
    rng = np.random.default_rng(4)
    snr = np.exp(rng.uniform(np.log(3.0), np.log(30.0), 400))
    detected = _outcomes(rng, snr, 1.0, 5.0, 0.6)
    a, b = fit_completeness(snr, detected), fit_completeness(snr, detected)
    assert a == b
    assert a.width > 0 and abs(a.x50 - 5.0) < 3 * a.x50_err + 0.05


def test_fit_needs_both_outcomes_and_enough_points():
    x = np.linspace(20, 25, 50)
    assert np.isnan(fit_completeness(x, np.ones(50, bool)).x50)
    assert np.isnan(fit_completeness(x, np.zeros(50, bool)).x50)
    assert np.isnan(fit_completeness(x[:5], [True, False, True, False, True]).x50)
    # Non-finite values are left out, not propagated.
    assert fit_completeness(np.r_[x, np.nan], np.r_[x < 22.5, True]).n == 50


def test_binned_fractions_and_clopper_pearson_errors():
    values = np.array([0.5, 0.6, 0.7, 1.5, 1.6, 2.5, 9.0])
    detected = np.array([True, True, True, True, False, False, True])
    bins = binned_completeness(values, detected, [0, 1, 2, 3])
    assert bins["n"].tolist() == [3, 2, 1] and bins["k"].tolist() == [3, 1, 0]
    assert bins["fraction"].tolist() == [1.0, 0.5, 0.0]  # 9.0 lies outside the bins
    # 3 of 3: the upper error is 1, the lower one the exact binomial bound ((1 - 0.683) / 2)^(1/3).
    assert bins["err_hi"][0] == 1.0
    assert bins["err_lo"][0] == pytest.approx(((1 - 0.6826894921370859) / 2) ** (1 / 3), rel=1e-6)
    assert bins["err_lo"][2] == 0.0 and 0 < bins["err_hi"][2] < 1
    assert bins["err_lo"][1] < 0.5 < bins["err_hi"][1]
    empty = binned_completeness([], [], [0, 1])
    assert empty["n"].tolist() == [0] and np.isnan(empty["fraction"][0])


def test_completeness_leaves_scipy_stats_unloaded():
    """The night report's completeness (binomial errors, logistic fits) must not pay the 0.7 s
    import of scipy.stats in the QA jobs."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys, numpy as np\n"
        "from apsnake.completeness import binned_completeness, fit_completeness\n"
        "rng = np.random.default_rng(1)\n"
        "mag = rng.uniform(20, 25, 300)\n"
        "found = rng.uniform(size=300) < 1 / (1 + np.exp((mag - 23) / 0.3))\n"
        "fit = fit_completeness(mag, found, decreasing=True)\n"
        "binned_completeness(mag, found, np.arange(20, 25.5, 0.5))\n"
        "print(json.dumps([fit.x50, 'scipy.stats' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    x50, loaded = json.loads(out.strip().splitlines()[-1])
    assert abs(x50 - 23.0) < 0.15 and not loaded
