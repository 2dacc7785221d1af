"""DAG scale (issue 14): a long association chain on one field, planned and dry-run.

A field observed at every visit of a long night makes one association chain as long as the
visits. The plan must link each visit only to the previous one (edges linear in the visits),
and Snakemake, which resolves dependencies recursively, must build the DAG when it is entered
at the end of the chain (Python's default recursion limit fails beyond ~480 chained visits;
rules/common.smk raises it). The registry is synthetic, written by benchmarks/bench_dryrun.py:
no pixels, empty placeholder inputs.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dryrun", REPO / "benchmarks" / "bench_dryrun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_of_a_300_visit_field_links_each_visit_to_the_previous_one_only(tmp_path):
    from apsnake.association.plan import association_plan
    from apsnake.registry import read_table

    bench = _bench()
    n = 300
    bench.make_registry(tmp_path, [(150.0, 2.2)] * n, [28, 35])
    exposures = read_table(tmp_path / "out" / "registry" / "exposures.parquet")
    data_ids = [(int(v), int(d)) for v, d in zip(exposures["visit"], exposures["detector"])]
    plan = association_plan(exposures, data_ids)
    visits = sorted({v for v, _ in data_ids})
    previous = dict(zip(visits[1:], visits[:-1]))
    assert all(preds == [] for (v, _), preds in plan.predecessors.items() if v == visits[0])
    for (visit, detector), preds in plan.predecessors.items():
        if visit != visits[0]:
            assert preds and {v for v, _ in preds} == {previous[visit]}, (visit, detector, preds)
    assert sum(len(p) for p in plan.predecessors.values()) <= 2 * len(data_ids)
    # The chain is as deep as the visits, not visits x detectors.
    depth = {}
    for data_id in sorted(plan.key, key=plan.key.get):
        depth[data_id] = 1 + max((depth[p] for p in plan.predecessors[data_id]), default=0)
    assert max(depth.values()) == n


def test_dry_run_entered_at_the_end_of_a_600_visit_chain(tmp_path):
    """Past Python's default recursion limit (~480 chained visits): the last data ID's APDB
    marker as the only target makes Snakemake walk the whole chain recursively."""
    bench = _bench()
    n = 600
    paths = bench.make_registry(tmp_path, [(150.0, 2.2)] * n, [28])
    last = bench.VISIT0 + n - 1
    target = f"{paths['outdir']}/apdb_marker/{last}/apdb_marker_{last}_28.json"
    result = bench.dry_run(tmp_path, paths, [bench.VISIT0], [target])
    assert result["ok"], result["tail"]
    assert result["jobs"]["associate"] == n - 1 and result["jobs"]["processCcd"] == n


def test_whatif_copies_of_the_workflow_plan_the_same_products(tmp_path):
    """bench_dryrun.py whatif edits copies of the rules: they must still apply (the edits fail
    loudly when the rules change) and plan every product of every data ID, in fewer jobs."""
    bench = _bench()
    pointings, templates = bench.wide_pointings(4, n_fields=1)
    paths = bench.make_registry(tmp_path, pointings, [28, 35])
    as_is = bench.dry_run(tmp_path, paths, templates)
    assert as_is["ok"], as_is["tail"]
    science = 3 * 2
    assert as_is["jobs"]["imageDifference"] == science and as_is["jobs"]["package_alerts"] == science
    for variant in ("bare", "two_jobs", "two_jobs_bare"):
        result = bench.dry_run(tmp_path, paths, templates, snakefile=bench.workflow_copy(tmp_path, variant))
        assert result["ok"], (variant, result["tail"])
        jobs = result["jobs"]
        if variant == "bare":
            assert jobs == as_is["jobs"]
        else:
            assert jobs["ccdPipe"] == science and jobs["associate"] == science and jobs["processCcd"] == 2
            assert not {"imageDifference", "fakes", "package_alerts"} & set(jobs)
