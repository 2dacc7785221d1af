"""apsnake.steps: the per-data-ID image steps as the one-step and the merged jobs run them."""

import logging

import pytest

from apsnake import schema, steps
from apsnake.exposure import VisitInfo
from apsnake.isr import IsrInputError

from test_diffim import make_pair

LOG = logging.getLogger("test_steps")


def test_a_skipped_subtraction_gives_no_data_images_and_an_empty_dia_table(caplog):
    """Too little template coverage is an outcome, not a crash: both images all NO_DATA, the
    reason in the metadata, and the DIA step an empty (valid) table without reading an image."""
    science, template, sources, _ = make_pair(shape=(256, 256), n_stars=40, n_var=0, n_trans=0, seed=7)
    template.mask[:, :235] |= template.mask_bit("NO_DATA")
    with caplog.at_level(logging.WARNING):
        difference, matched, metadata = steps.run_diffim_step(science, template, sources, {}, LOG,
                                                              "visit=1 detector=2")
    assert metadata["skipped"] and "covers 8.2%" in metadata["reason"]
    assert "visit=1 detector=2 skipped" in caplog.text
    assert difference.mask_of("NO_DATA").all() and matched.mask_of("NO_DATA").all()

    def not_read():
        raise AssertionError("a skipped difference's images must not be read")

    table = steps.run_dia_step(not_read, not_read, not_read, metadata, {}, LOG, "visit=1 detector=2")
    assert table.num_rows == 0 and table.schema.names == schema.empty_table("DiaSource").schema.names


def test_a_subtraction_hands_on_its_metadata_and_the_dia_step_measures():
    from astropy.wcs import WCS

    science, template, sources, _ = make_pair(shape=(512, 512), n_stars=150, n_var=0, n_trans=5, seed=3)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype, wcs.wcs.crval, wcs.wcs.crpix = ["RA---TAN", "DEC--TAN"], [150.0, 2.0], [256.0, 256.0]
    wcs.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    science.wcs = template.wcs = wcs
    science.visit_info = VisitInfo(visit=1, band="g", mjd_mid_tai=57098.1)
    difference, matched, metadata = steps.run_diffim_step(science, template, sources, {}, LOG, "d")
    assert metadata["skipped"] is False and metadata["n_kernel_stars"] > 0
    table = steps.run_dia_step(difference, science, matched, metadata, {}, LOG, "d")
    assert table.num_rows >= 3


def test_isr_step_reports_the_calibration_choice_error_before_reading_files():
    with pytest.raises(IsrInputError, match="no flat for band g"):
        steps.run_isr_step(25, {"raw": "/nonexistent/raw.fits.fz"}, {"error": "visit=1, detector=25: no flat for band g"},
                           {})
