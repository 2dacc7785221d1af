"""Snakemake adapter: associate one data ID's DIA sources into the Parquet APDB."""

from pathlib import Path

import pyarrow.parquet as pq

from apsnake import apdb, diapipe
from apsnake.logs import workflow_step

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)
root = Path(snakemake.params.root)

with workflow_step("associate", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    expected = {apdb.fragment_path(root, t, visit, detector) for t in apdb.TABLES}
    expected.add(apdb.marker_path(root, visit, detector))
    if {Path(p).resolve() for p in snakemake.output} != {p.resolve() for p in expected}:
        raise RuntimeError(f"rule outputs {list(snakemake.output)} differ from the APDB layout {sorted(expected)}")
    marker = diapipe.associate_data_id(
        root,
        pq.read_table(snakemake.input.diaSrc),
        snakemake.input.diffexp,  # paths: read one at a time inside
        snakemake.input.calexp,
        cells=snakemake.params.cells,
        config=diapipe.config_from_options(snakemake.params.options),
    )
    log.info(
        "visit=%d detector=%d: %d DiaSources, %d new and %d updated DiaObjects, %d unassociated "
        "sources, %d forced sources (%.2f s)",
        visit, detector, marker["counts"]["DiaSource"], marker["numNewDiaObjects"],
        marker["numUpdatedDiaObjects"], marker["numUnassociatedDiaSources"],
        marker["counts"]["DiaForcedSource"], marker["seconds"],
    )
