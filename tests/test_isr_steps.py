"""ISR steps on small synthetic arrays, each against a hand-computed answer."""

import numpy as np
import pytest

from apsnake import isr
from apsnake.instruments import decam


def test_overscan_per_row_with_masked_row_and_outliers(rng):
    rows = 200
    truth = 1500 + 5 * np.sin(np.arange(rows) / 7.0) + rng.normal(0, 2, rows)  # row structure
    strip = truth[:, None] + rng.normal(0, 3.0, (rows, 50))
    strip[10, 3] += 5000  # a cosmic ray in the overscan
    strip[20, :5] += 200  # charge spilling from a saturated row
    bad = np.zeros_like(strip, bool)
    bad[50] = True  # a fully masked row takes the median of its +/-5 neighbours
    strip[50] = 60000
    level, noise = isr.fit_overscan_rows(strip, bad)
    good = np.ones(rows, bool)
    good[50] = False
    assert np.abs(level[good] - truth[good]).max() < 2.0  # median of 50 px with sigma 3: ~0.5 ADU
    assert abs(level[50] - np.median(truth[45:56])) < 4.0
    assert abs(level[20] - truth[20]) < 2.0  # outliers clipped
    assert noise == pytest.approx(3.0, rel=0.05)


def test_crosstalk_mirroring_s_chip():
    # S chip: A reads from UR, B from UL. A bright pixel in B at distance d from B's read-out
    # (left) edge leaks into A at distance d from A's read-out (right) edge.
    ccd = 25
    shape = (8, 6)
    a = np.zeros(shape, np.float32)
    b = np.zeros(shape, np.float32)
    b[2, 1] = 40000.0
    victims = {(ccd, "A"): a, (ccd, "B"): b}
    coeff = {(t.victim_amp, t.source_amp): t.coefficient for t in decam.crosstalk_sources(ccd) if t.source_ccd == ccd}
    ghost = np.zeros(shape, np.float32)
    ghost[2, -2] = coeff[("A", "B")] * 40000.0
    observed_a = a + ghost
    victims = {(ccd, "A"): observed_a.copy(), (ccd, "B"): b.copy()}
    sources = {(ccd, "A"): observed_a.copy(), (ccd, "B"): b.copy()}
    masks = isr.crosstalk_correct(victims, sources, decam.crosstalk_sources(ccd), min_pixel_to_mask=30000)
    assert np.abs(victims[(ccd, "A")]).max() < 1e-3  # ghost removed exactly at the mirrored pixel
    assert masks[(ccd, "A")][2, -2] and masks[(ccd, "A")].sum() == 1


def test_crosstalk_mirroring_n_chip_and_inter_ccd():
    # N chip 33 (N2): A reads from LL, B from LR -> x flip. Inter-CCD 34A <- 33A: same corner, no flip.
    shape = (6, 5)
    src_a = np.zeros(shape, np.float32)
    src_a[1, 0] = 50000.0
    terms = [t for t in decam.crosstalk_table()
             if (t.victim_ccd, t.source_ccd, t.source_amp) in ((33, 33, "A"), (34, 33, "A"))]
    assert {(t.victim_ccd, t.victim_amp) for t in terms} == {(33, "B"), (34, "A")}
    c33b = next(t.coefficient for t in terms if t.victim_ccd == 33)
    c34a = next(t.coefficient for t in terms if t.victim_ccd == 34)
    v33b = np.zeros(shape, np.float32)
    v33b[1, -1] = c33b * 50000
    v34a = np.zeros(shape, np.float32)
    v34a[1, 0] = c34a * 50000
    victims = {(33, "B"): v33b, (34, "A"): v34a}
    isr.crosstalk_correct(victims, {(33, "A"): src_a}, terms, 45000)
    assert np.abs(v33b).max() < 1e-4 and np.abs(v34a).max() < 1e-4


def test_widen_saturation_trails():
    sat = np.zeros((4, 40), bool)
    sat[0, 10:13] = True  # width 3: not grown
    sat[1, 10:16] = True  # width 6: +1 each side
    sat[2, 10:18] = True  # width 8: +3
    sat[3, 10:22] = True  # width 12: +4
    out = isr.widen_saturation_trails(sat)
    assert out[0].sum() == 3
    assert out[1, 9] and out[1, 16] and out[1].sum() == 8
    assert out[2].sum() == 14 and out[2, 7] and not out[2, 6]
    assert out[3].sum() == 20 and out[3, 6] and out[3, 25] and not out[3, 26]


def test_interpolate_rows():
    image = np.tile(np.arange(10, dtype=np.float32) * 2.0, (3, 1))
    bad = np.zeros_like(image, bool)
    bad[0, 3:6] = True  # interior run: linear between columns 2 and 6
    bad[1, :2] = True  # edge run: nearest good neighbour
    bad[2, :] = True  # whole row: fallback
    out = isr.interpolate_rows(image, bad, fallback=-1.0)
    np.testing.assert_allclose(out[0], image[0])
    np.testing.assert_allclose(out[1, :2], [4.0, 4.0])
    np.testing.assert_allclose(out[2], -1.0)


def _interpolate_rows_reference(image, bad, fallback):
    """Row interpolation written pixel by pixel: the nearest good column on each side."""
    out = image.astype(np.float32).copy()
    for r, c in zip(*np.nonzero(bad)):
        good = np.flatnonzero(~bad[r])
        left, right = good[good < c], good[good > c]
        if left.size and right.size:
            lc, rc = left[-1], right[0]
            out[r, c] = image[r, lc] + (c - lc) / (rc - lc) * (image[r, rc] - image[r, lc])
        elif left.size or right.size:
            out[r, c] = image[r, left[-1]] if left.size else image[r, right[0]]
        else:
            out[r, c] = fallback
    return out


def test_interpolate_rows_and_widened_trails_match_pixel_by_pixel_versions():
    """The run-based implementations give what a pixel-by-pixel reading of their definitions
    gives, on random masks with runs of every width, edge runs and whole bad rows."""
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 10.0, (40, 64)).astype(np.float32)
    bad = rng.random((40, 64)) < 0.15
    for row in range(0, 40, 5):
        a = rng.integers(0, 60)
        bad[row, a:a + rng.integers(1, 14)] = True
    bad[7] = True
    bad[9, :5] = bad[9, -3:] = True
    np.testing.assert_allclose(isr.interpolate_rows(image, bad, -1.0),
                               _interpolate_rows_reference(image, bad, -1.0), rtol=1e-6)
    np.testing.assert_array_equal(isr.interpolate_rows(image, np.zeros_like(bad), -1.0), image)

    expected = bad.copy()
    for r in range(bad.shape[0]):
        c = 0
        while c < bad.shape[1]:
            if bad[r, c]:
                e = c
                while e < bad.shape[1] and bad[r, e]:
                    e += 1
                width = e - c
                grow = 4 if width >= 10 else 3 if width >= 8 else 1 if width >= 6 else 0
                expected[r, max(c - grow, 0):min(e + grow, bad.shape[1])] = True
                c = e
            else:
                c += 1
    np.testing.assert_array_equal(isr.widen_saturation_trails(bad), expected)


def test_linearize_lookup_table():
    image = np.array([[0.0, 10.4, 20.0, 5.0]], np.float32)
    table = np.zeros((2, 100), np.float32)
    table[0, 10] = 1.5  # amp A
    table[1, 20] = -2.0  # amp B
    isr.linearize(image, table, {"A": slice(0, 2), "B": slice(2, 4)})
    np.testing.assert_allclose(image, [[0.0, 11.9, 18.0, 5.0]])
