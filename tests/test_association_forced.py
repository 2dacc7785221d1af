"""Forced PSF photometry of DiaObjects on the difference image and the calexp."""

import numpy as np
import pytest

from apsnake import schema
from apsnake.association import forced_photometry
from apsnake.ids import unpack
from test_dia import FLUX_PER_SNR, SIG_S, SIGMA, VISIT, DETECTOR, make_images


def _radec(exposure, x, y):
    ra, dec = exposure.wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    return ra, dec


def test_fluxes_at_object_positions_match_the_truth():
    rng = np.random.default_rng(3)
    xs, ys = rng.uniform(40, 980, 60), rng.uniform(40, 470, 60)
    flux = np.where(np.arange(60) % 2 == 0, 30.0, -15.0) * FLUX_PER_SNR  # brightened / faded
    static = 60.0 * FLUX_PER_SNR
    diff, sci, _ = make_images(transients=[(x, y, max(f, 0) + static) for x, y, f in zip(xs, ys, flux)],
                               vanished=[(x, y, max(-f, 0) + static) for x, y, f in zip(xs, ys, flux)],
                               seed=4)
    ra, dec = _radec(diff, xs, ys)
    ids = np.arange(1000, 1060)[::-1]  # unsorted ids: rows come back in id order
    table = forced_photometry(diff, sci, ids, ra, dec, time_processed_mjd=60000.0)
    assert table.schema.equals(schema.arrow_schema("DiaForcedSource"), check_metadata=False)
    rows = table.to_pandas()
    assert rows["diaObjectId"].tolist() == sorted(ids.tolist())
    order = np.argsort(ids)
    pull = (rows["psfFlux"].to_numpy() - flux[order]) / rows["psfFluxErr"].to_numpy()
    assert abs(np.median(pull)) < 0.4 and 0.6 < np.std(pull) < 1.5
    assert np.allclose(rows["psfFluxErr"], FLUX_PER_SNR, rtol=0.1)
    sci_expected = np.maximum(flux[order], 0) + static
    assert np.allclose(rows["scienceFlux"], sci_expected, atol=5 * SIG_S * np.sqrt(4 * np.pi) * SIGMA)
    assert (rows["visit"] == VISIT).all() and (rows["detector"] == DETECTOR).all()
    assert (rows["midpointMjdTai"] == 57000.25).all() and (rows["band"] == "g").all()
    assert (rows["timeProcessedMjdTai"] == 60000.0).all()
    assert [unpack(i)[:2] for i in rows["diaForcedSourceId"]] == [(VISIT, DETECTOR)] * 60
    assert rows["diaForcedSourceId"].is_unique


def test_objects_off_the_image_or_without_template_are_not_measured():
    diff, sci, _ = make_images(seed=5)
    diff.mask[:, :200] |= np.int32(diff.mask_bit("NO_DATA"))
    x = np.array([100.0, 500.0, -30.0, 1500.0, 600.0])
    y = np.array([100.0, 200.0, 100.0, 100.0, 511.4])
    ra, dec = _radec(diff, x, y)
    rows = forced_photometry(diff, sci, [1, 2, 3, 4, 5], ra, dec).to_pandas()
    assert rows["diaObjectId"].tolist() == [2, 5]
    assert np.isfinite(rows["psfFlux"]).all()


def test_empty_input_and_shape_mismatch():
    diff, sci, _ = make_images(seed=6)
    assert forced_photometry(diff, sci, [], [], []).num_rows == 0
    small, _, _ = make_images(shape=(256, 256), seed=6)
    with pytest.raises(ValueError, match="shape"):
        forced_photometry(small, sci, [1], [150.0], [2.0])
