"""Snakemake adapter: the night summary and completeness tables of every science data ID."""

import pandas as pd

from apsnake.logs import finish_job, workflow_step
from apsnake.qa import completeness_table, night_summary, write_completeness, write_night_summary
from apsnake.qa.products import data_id_of, data_id_products
from apsnake.qa.summary import night_fakes

with workflow_step("night_summary", snakemake.log[0]) as log:
    with_fakes = {data_id_of(path) for path in snakemake.input.fakes}
    data_ids = [data_id_products(snakemake.params.root, *data_id_of(path), fakes=data_id_of(path) in with_fakes)
                for path in snakemake.input.metadata]
    summary = night_summary(data_ids, pd.read_parquet(snakemake.input.rejected))
    completeness = completeness_table(night_fakes(data_ids))
    write_night_summary(summary, snakemake.output.summary)
    write_completeness(completeness, snakemake.output.completeness)
    log.info("%d data IDs (%d with fakes), %d summary rows, %d completeness rows",
             len(data_ids), len(with_fakes), summary.num_rows, completeness.num_rows)

finish_job()
