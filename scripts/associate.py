"""Snakemake adapter: associate one data ID's DIA sources into the Parquet APDB."""

import pyarrow.parquet as pq

from apsnake.association import AssociationConfig, associate_data_id
from apsnake.logs import finish_job, workflow_step
from apsnake.options import dataclass_from_options

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("associate", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    marker = associate_data_id(
        snakemake.params.root,
        pq.read_table(snakemake.input.diaSrc),
        snakemake.input.diffexp,  # paths: read one at a time inside
        snakemake.input.calexp,
        cells=snakemake.params.cells,
        config=dataclass_from_options(AssociationConfig, snakemake.params.options, "association"),
    )
    log.info(
        "visit=%d detector=%d: %d DiaSources, %d new and %d updated DiaObjects, %d unassociated "
        "sources, %d forced sources (%.2f s)",
        visit, detector, marker["counts"]["DiaSource"], marker["numNewDiaObjects"],
        marker["numUpdatedDiaObjects"], marker["numUnassociatedDiaSources"],
        marker["counts"]["DiaForcedSource"], marker["seconds"],
    )

finish_job()
