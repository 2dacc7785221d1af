"""Snakemake adapter: inject fakes into one science data ID, detect, match, write the Fake table.

A skipped difference image (diffexp JSON ``skipped``) gives an empty (valid) table.
"""

import json

import pandas as pd
import pyarrow.parquet as pq

from apsnake import schema
from apsnake.atomic import atomic_output
from apsnake.dia import DiaConfig
from apsnake.exposure import read_exposure
from apsnake.fakes import FakesConfig, run_fakes
from apsnake.logs import finish_job, workflow_step
from apsnake.options import dataclass_from_options

visit, detector = int(snakemake.wildcards.visit), int(snakemake.wildcards.detector)

with workflow_step("fakes", snakemake.log[0], f"visit={visit} detector={detector}") as log:
    config = dataclass_from_options(FakesConfig, snakemake.params.options, "fakes")
    dia_config = dataclass_from_options(DiaConfig, snakemake.params.dia, "dia")
    metadata = json.loads(open(snakemake.input.metadata).read())
    if metadata.get("skipped"):
        log.warning("visit=%d detector=%d: no difference image (%s); no fakes", visit, detector, metadata["reason"])
        table = schema.empty_table("Fake")
        n_recovered = 0
    else:
        result = run_fakes(
            read_exposure(snakemake.input.calexp), read_exposure(snakemake.input.diffexp),
            read_exposure(snakemake.input.matched_template), pd.read_parquet(snakemake.input.src), config,
            dia_config, diffim_metadata=metadata,
        )
        table, n_recovered = result.table, result.n_recovered
    log.info("visit=%d detector=%d: %d fakes injected, %d recovered", visit, detector, table.num_rows, n_recovered)
    with atomic_output(snakemake.output.fakes) as tmp:
        pq.write_table(table, tmp)

finish_job()
