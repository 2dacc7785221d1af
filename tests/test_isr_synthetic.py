"""run_isr on a hand-built full-size raw CCD whose every ingredient is known."""

import numpy as np
import pytest
from astropy.io import fits

from apsnake import isr
from apsnake.instruments import decam, decam_files


def _raw_ccd(ccdnum, rng, sky_e=400.0):
    """A raw CCD: flat-fielded constant sky, per-amp bias with row structure, read noise."""
    info = decam.ccd_info(ccdnum)
    header = fits.Header()
    for key, value in decam.raw_section_keywords(ccdnum).items():
        header[key] = value
    header["CCDNUM"] = ccdnum
    header["DETPOS"] = info.name
    primary = fits.Header()
    for key, value in {"INSTRUME": "DECam", "EXPNUM": 419802, "OBSTYPE": "object", "EXPTIME": 90.0,
                       "DATE-OBS": "2015-03-17T03:00:00.0", "FILTER": "g DECam SDSS c0001 4720.0 1520.0"}.items():
        primary[key] = value
    ny, nx = decam.TRIMMED_SHAPE
    yy, xx = np.mgrid[0:ny, 0:nx]
    flat = (1 + 0.04 * (xx / nx - 0.5) + 0.03 * (yy / ny - 0.5) + rng.normal(0, 0.01, (ny, nx))).astype(np.float32)
    bias2d = (3.0 * np.sin(xx / 300.0)).astype(np.float32)
    electrons = rng.poisson(sky_e * flat).astype(np.float32)
    raw = np.zeros(decam.RAW_SHAPE, np.float32)
    geoms = decam.amp_geometry(header)
    truth = {}
    for amp, geom in geoms.items():
        gain, rn = info.amps[amp].gain, info.amps[amp].read_noise
        row_bias = 1800 + 40 * (amp == "B") + 4 * np.sin(np.arange(raw.shape[0]) / 50.0)
        raw += 0  # bias is added per section below
        cy, cx = geom.ccd.slices
        data = electrons[cy, cx] / gain + bias2d[cy, cx]
        raw[geom.data.slices] = data + row_bias[geom.data.slices[0], None]
        raw[geom.serial_overscan.slices] = row_bias[geom.serial_overscan.slices[0], None]
        raw[geom.data.slices] += rng.normal(0, rn / gain, geom.data.shape)
        raw[geom.serial_overscan.slices] += rng.normal(0, rn / gain, geom.serial_overscan.shape)
        truth[amp] = (gain, rn)
    raw = np.clip(np.round(raw), 0, 65535).astype(np.uint16)
    return decam_files.RawCcd("synthetic.fits", 1, primary, header, raw), bias2d, flat, truth


@pytest.mark.parametrize("ccdnum", [25, 32])
def test_isr_recovers_sky_and_noise(ccdnum, rng):
    raw, bias, flat, truth = _raw_ccd(ccdnum, rng)
    bpm = np.zeros(decam.TRIMMED_SHAPE, np.int16)
    bpm[:, 700] = 1  # a bad column
    result = isr.run_isr(raw, bias, flat, bpm, flat_band="g")
    exp = result.exposure
    assert exp.image.shape == decam.TRIMMED_SHAPE and exp.unit == "adu"
    inner = (slice(100, -100), slice(100, -100))
    info = decam.ccd_info(ccdnum)
    for amp, cols in (("A", decam.amp_geometry(raw.header)["A"].ccd.slices[1]),
                      ("B", decam.amp_geometry(raw.header)["B"].ccd.slices[1])):
        gain, rn = truth[amp]
        block = exp.image[100:-100, cols][:, 50:-50]
        assert np.median(block) == pytest.approx(400.0 / gain, rel=0.005)  # bias, overscan, flat gone
        assert result.metadata["amps"][amp]["read_noise_e"] == pytest.approx(rn, rel=0.05)
        var_pred = np.median(exp.variance[100:-100, cols][:, 50:-50])
        assert np.std(block) ** 2 == pytest.approx(var_pred, rel=0.05)  # variance plane matches noise
    assert exp.mask_of("BAD")[:, 700].all() and exp.mask_of("INTRP")[:, 700].all()
    assert np.isfinite(exp.image).all()
    assert exp.mask_of("SUSPECT")[:35].all() and not exp.mask_of("SUSPECT")[inner].any()
    assert result.metadata["n_interpolated"] >= 4096


def test_bad_amp_is_masked_not_failed(rng):
    raw, bias, flat, _ = _raw_ccd(31, rng)  # S7: amp A is dead
    exp = isr.run_isr(raw, bias, flat, None, flat_band="g").exposure
    cols_a = decam.amp_geometry(raw.header)["A"].ccd.slices[1]
    assert exp.mask_of("BAD")[:, cols_a].all()
    assert not exp.mask_of("BAD")[100:-100, 100:900].any()


def test_bad_calibrations_fail_with_the_reason(rng):
    raw, bias, flat, _ = _raw_ccd(25, rng)
    with pytest.raises(isr.IsrInputError, match=r"visit=419802, detector=25.*flat .* band r"):
        isr.run_isr(raw, bias, flat, None, flat_band="r", calib_paths={"flat": "flat_r.fits"})
    with pytest.raises(isr.IsrInputError, match=r"bias bias\.fits has shape \(100, 100\)"):
        isr.run_isr(raw, np.zeros((100, 100)), flat, None, calib_paths={"bias": "bias.fits"})
    bad_flat = flat.copy()
    bad_flat[5, 5] = np.nan
    with pytest.raises(isr.IsrInputError, match="non-finite"):
        isr.run_isr(raw, bias, bad_flat, None)
