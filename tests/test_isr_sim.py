"""ISR on the simulated night, against the simulator's truth (issue: ISR 'What it must show')."""

import numpy as np
import pandas as pd
import pytest
import sep

from sim_inputs import isr_inputs

from apsnake import isr
from apsnake.instruments import decam, decam_files

VISIT = 419803  # the worse-seeing science visit of the test preset


@pytest.fixture(scope="module", params=[25, 32], ids=["S1", "N1"])
def processed(request, sim_test_dir):
    ccd = request.param
    raw, calibs = isr_inputs(sim_test_dir, VISIT, ccd)
    bias, flat, bpm = calibs["bias"], calibs["flat"], calibs["bpm"]
    result = isr.run_isr(raw, bias, flat, bpm, flat_band="g")
    no_xtalk = isr.run_isr(raw, bias, flat, bpm, flat_band="g", config=isr.IsrConfig(crosstalk=False))
    visits = pd.read_parquet(sim_test_dir / "truth" / "visits.parquet").set_index("visit")
    sig = pd.read_parquet(sim_test_dir / "truth" / "signature.parquet")
    sig = sig[(sig["visit"] == VISIT) & (sig["detector"] == ccd)].set_index("amp")
    exp = result.exposure
    masked = exp.mask_of("BAD", "SAT", "SUSPECT")
    back = sep.Background(exp.image, mask=masked, bw=128, bh=128)
    return dict(ccd=ccd, raw=raw, bpm=bpm, result=result, exp=exp, no_xtalk=no_xtalk.exposure, sig=sig,
                sky_e=visits.loc[VISIT, "sky_e_per_pixel"], masked=masked, back=back)


def test_bias_and_overscan_structure_gone(processed):
    # The flat carries the amp gain ratio (as a dome flat in ADU does), so after ISR the
    # sky is sky_e / flat_gain everywhere.
    sky_adu = processed["sky_e"] / processed["sig"]["flat_gain_e_per_adu"].iloc[0]
    assert processed["back"].globalback == pytest.approx(sky_adu, rel=0.005)


def test_flat_pattern_gone_across_ccd_and_amp_boundary(processed):
    back = processed["back"].back()
    inner = back[128:-128, 128:-128]
    median = np.median(inner)
    # A flat-field residual would tilt or step the whole sky; the halos of the few bright stars
    # (a few per cent of their light, hundreds of pixels wide) are real sky bumps in the 128-px
    # background meshes, so the 2nd-98th percentiles are judged, not the extremes.
    assert np.abs(np.percentile(inner, [2, 98]) / median - 1).max() < 0.005
    assert np.percentile(inner, 0.5) / median - 1 > -0.005  # the halos only add light
    left, right = np.median(back[:, 1000:1024]), np.median(back[:, 1024:1048])
    assert abs(right / left - 1) < 0.005


def test_read_noise_measured_from_overscan(processed):
    for amp, meta in processed["result"].metadata["amps"].items():
        assert meta["read_noise_e"] == pytest.approx(processed["sig"].loc[amp, "read_noise_e"], rel=0.05)
        assert meta["overscan_level_adu"] == pytest.approx(processed["sig"].loc[amp, "bias_row_mean_adu"], abs=3.0)


def test_variance_matches_blank_sky_noise(processed):
    from astropy.stats import sigma_clipped_stats

    exp, masked = processed["exp"], processed["masked"]
    resid = exp.image - processed["back"].back()
    for rows, cols in ((slice(500, 1500), slice(200, 900)), (slice(2500, 3500), slice(1100, 1900))):
        sel = ~masked[rows, cols]
        _, _, std = sigma_clipped_stats(resid[rows, cols][sel], sigma=3, maxiters=5)
        assert std**2 == pytest.approx(np.median(exp.variance[rows, cols][sel]), rel=0.05)


def test_crosstalk_ghosts_removed(processed):
    # Where ISR subtracted a ghost of more than 5 ADU, the uncorrected image shows it and
    # the corrected one keeps less than 10% of it (a wrong mirroring would leave a negative
    # ghost here and the positive one elsewhere).
    back = processed["back"].back()
    removed = processed["no_xtalk"].image - processed["exp"].image
    ghost = removed > 5.0
    assert ghost.sum() > 50
    raw_amplitude = np.median((processed["no_xtalk"].image - back)[ghost])
    residual = np.median((processed["exp"].image - back)[ghost])
    assert raw_amplitude > 4.0
    assert abs(residual) < 0.1 * raw_amplitude
    # CROSSTALK marks victims of sources above 45000 ADU overscan-subtracted (Rubin
    # minPixelToMask): S1's amps saturate below that, N1's amp A above it.
    raw, levels = processed["raw"], processed["result"].metadata["amps"]
    brightest = max(float(raw.data[geom.data.slices].max()) - levels[amp]["overscan_level_adu"]
                    for amp, geom in decam.amp_geometry(raw.header).items())
    can_exceed = brightest > isr.IsrConfig().crosstalk_min_pixel_to_mask
    assert processed["exp"].mask_of("CROSSTALK").any() == can_exceed


def test_defects_bad_and_saturation_sat(processed):
    exp, raw = processed["exp"], processed["raw"]
    bad = processed["bpm"] != 0
    assert bad.sum() > 1000  # the simulated BPM has bad columns and hot pixels
    assert exp.mask_of("BAD")[bad].all() and exp.mask_of("INTRP")[bad].all()
    # No hot pixel survives: interpolated defect pixels away from sources look like sky.
    sky = processed["back"].back()
    far = bad & ~exp.mask_of("SAT", "SUSPECT", "CROSSTALK")
    assert np.percentile(exp.image[far] - sky[far], 99) < 10 * np.sqrt(np.median(exp.variance))
    # Every raw pixel at or above the amp's saturation is SAT, and trails are widened.
    saturated_raw = np.zeros(decam.TRIMMED_SHAPE, bool)
    for amp, geom in decam.amp_geometry(raw.header).items():
        saturated_raw[geom.ccd.slices] = raw.data[geom.data.slices] >= decam.ccd_info(processed["ccd"]).amps[amp].saturation
    truth_saturated = int(processed["sig"]["n_saturated_pixels"].iloc[0])
    assert saturated_raw.sum() >= 0.95 * truth_saturated
    assert exp.mask_of("SAT")[saturated_raw].all()
    assert exp.mask_of("SAT").sum() > saturated_raw.sum()  # trail widening added pixels
    assert np.isfinite(exp.image).all()


def test_truncated_raw_and_nan_pixels_fail_with_the_file_and_reason(sim_test_dir, tmp_path):
    raw_path = sorted((sim_test_dir / "raw").glob("*.fits.fz"))[-1]
    data = raw_path.read_bytes()
    cut = tmp_path / "truncated.fits.fz"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(decam_files.RawFormatError, match="truncated.fits.fz"):
        decam_files.read_raw_ccd(cut, 32)  # the second CCD's extension is cut short
    raw = decam_files.read_raw_ccd(raw_path, 25)
    raw.data = raw.data.astype(np.float32)
    raw.data[100, 100] = np.nan
    flat = np.ones(decam.TRIMMED_SHAPE, np.float32)
    with pytest.raises(isr.IsrInputError, match=r"visit=\d+, detector=25\).*NaN"):
        isr.run_isr(raw, np.zeros(decam.TRIMMED_SHAPE, np.float32), flat, None)


def test_several_ccds_read_in_one_open(sim_test_dir):
    raw_path = sorted((sim_test_dir / "raw").glob("*.fits.fz"))[-1]
    both = decam_files.read_raw_ccds(raw_path, [25, 32, 27], optional=[27])  # S3 is not simulated
    assert sorted(both) == [25, 32]
    for ccd in (25, 32):
        one = decam_files.read_raw_ccd(raw_path, ccd)
        assert one.hdu == both[ccd].hdu and np.array_equal(one.data, both[ccd].data)
    with pytest.raises(decam_files.RawFormatError, match="no extension with CCDNUM = 27"):
        decam_files.read_raw_ccds(raw_path, [25, 27])
    assert decam.crosstalk_source_ccds(25) == [27]
