"""Night QA: the per-data-ID night summary table and the self-contained HTML night report.

Modules, one capability each:

* ``products``: where a data ID's products are (the documented layout under an outdir);
* ``metrics``: one data ID's numbers read from its products (calexp header, PSF and central
  variance -> seeing and limiting magnitude; diffexp JSON -> kernel-fit quality; diaSrc -> counts;
  fakes -> m50);
* ``summary``: the night summary table (``qa/night_summary.parquet``) and the per-visit and
  per-night completeness table (``qa/completeness.parquet``);
* ``images``: downsampled difference-image thumbnails and science/template/difference cutouts;
* ``plots``: the report's figures as PNG bytes (matplotlib, Agg backend);
* ``report``: the HTML page with every figure embedded as a data URI.
"""

from apsnake.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "DataIdProducts": "products", "data_id_of": "products", "data_id_products": "products",
    "find_science_data_ids": "products",
    "completeness_table": "summary", "night_summary": "summary", "read_fakes": "summary",
    "write_completeness": "summary", "write_night_summary": "summary",
})

__all__ = [
    "DataIdProducts",
    "data_id_of",
    "data_id_products",
    "find_science_data_ids",
    "completeness_table",
    "night_summary",
    "read_fakes",
    "write_completeness",
    "write_night_summary",
]
