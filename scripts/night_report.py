"""Snakemake adapter: the night report, one self-contained HTML page."""

import pyarrow.parquet as pq

from apsnake.logs import finish_job, workflow_step
from apsnake.qa.products import data_id_of, data_id_products
from apsnake.qa.report import build_report, write_report

with workflow_step("report", snakemake.log[0]) as log:
    data_ids = [data_id_products(snakemake.params.root, *data_id_of(path), fakes=False)
                for path in snakemake.input.diffexp]
    text = build_report(
        data_ids, pq.read_table(snakemake.input.summary), pq.read_table(snakemake.input.completeness),
        apdb_root=snakemake.params.root, fakes_enabled=bool(snakemake.input.fakes),
    )
    write_report(text, snakemake.output.report)
    log.info("%d data IDs, %d bytes: %s", len(data_ids), len(text.encode()), snakemake.output.report)

finish_job()
