"""Rules night_summary and report on the workflow's run of the simulated test night (the
session fixture ``workflow_run``, shared with test_workflow.py)."""

import json

import pandas as pd
import pytest

from apsnake.qa.report import FIGURES

from test_qa import _decoded, _images


def test_night_summary_and_report_of_the_test_night(workflow_run):
    out = workflow_run[0] / "out"
    exposures = pd.read_parquet(out / "registry" / "exposures.parquet")
    science = sorted((int(v), int(d)) for v, d in zip(exposures["visit"], exposures["detector"])
                     if v not in (411371, 411372))
    summary = pd.read_parquet(out / "qa" / "night_summary.parquet")
    assert list(zip(summary["visit"], summary["detector"])) == sorted(
        science, key=lambda vd: (float(exposures.set_index(["visit", "detector"]).loc[vd, "mjd_mid_tai"]), *vd))
    for row in summary.itertuples():
        calexp = json.loads((out / "calexp" / str(row.visit) / f"calexp_{row.visit}_{row.detector:02d}.json").read_text())
        assert row.seeing_arcsec == pytest.approx(calexp["fwhm_arcsec"], rel=0.01)
        assert row.zero_point_mag == pytest.approx(calexp["zero_point"])
        dia = pd.read_parquet(out / "diaSrc" / str(row.visit) / f"diaSrc_{row.visit}_{row.detector:02d}.parquet")
        assert row.n_dia_sources == len(dia) and row.n_dia_negative == int(dia["isNegative"].sum())
    assert summary["limiting_mag"].between(20, 27).all()
    # fakes.fraction 1 (config.yaml): every data ID has fakes; m50 where the fit converged lies
    # near the 5-sigma depth.
    assert (summary["n_fakes"] > 0).all()
    fitted = summary[summary["m50_mag"].notna()]
    assert len(fitted) >= len(summary) // 2
    assert ((fitted["m50_mag"] - fitted["limiting_mag"]).abs() < 1.5).all()
    completeness = pd.read_parquet(out / "qa" / "completeness.parquet")
    assert {"night", "visit"} == set(completeness["scope"])
    text = (out / "qa" / "report.html").read_text()
    images = _images(text)
    assert list(images) == list(FIGURES)
    for png in images.values():
        _decoded(png)
