# Night QA: every science data ID's products + the APDB (complete: every marker) + the fakes
#   --night_summary--> qa/night_summary.parquet (one row per data ID) + qa/completeness.parquet
#   --report--> qa/report.html (one self-contained page: figures embedded as PNG data URIs).
# docs/formats.md (night summary) lists the columns; apsnake.qa computes everything.


def qa_fake_tables(wildcards=None):
    """The fake tables of the night: rules/fakes.smk's data-ID subset (empty when
    fakes.fraction is 0)."""
    return fake_data_ids()


def qa_products(name, ext="fits"):
    """Every science (differenced) data ID's file of a product."""
    return lambda wildcards: expand_data_ids(product(name, ext), science_only=True)


QA_MARKERS = lambda wildcards: expand_data_ids(str(marker_path(OUT, "{visit}", "{detector}")), science_only=True)


rule night_summary:
    input:
        calexp=qa_products("calexp"),
        metadata=qa_products("diffexp", "json"),
        diaSrc=qa_products("diaSrc", "parquet"),
        markers=QA_MARKERS,
        fakes=qa_fake_tables,
        rejected=REGISTRY["rejected"],
    output:
        summary=f"{OUT}/qa/night_summary.parquet",
        completeness=f"{OUT}/qa/completeness.parquet",
    log:
        f"{OUT}/logs/qa/night_summary.log",
    benchmark:
        f"{OUT}/benchmarks/qa/night_summary.tsv"
    params:
        root=OUT,
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/night_summary.py"


rule report:
    input:
        summary=rules.night_summary.output.summary,
        completeness=rules.night_summary.output.completeness,
        calexp=qa_products("calexp"),
        diffexp=qa_products("diffexp"),
        matched_template=qa_products("matchedTemplate"),
        markers=QA_MARKERS,
        fakes=qa_fake_tables,
    output:
        report=f"{OUT}/qa/report.html",
    log:
        f"{OUT}/logs/qa/report.log",
    benchmark:
        f"{OUT}/benchmarks/qa/report.tsv"
    params:
        root=OUT,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/night_report.py"


def night_report_target(wildcards):
    """The report, as a target of `rule all` that waits for the ingest checkpoint like every other
    target (a dry run before ingest then plans ingest alone)."""
    registered_exposures()
    return [rules.report.output.report]
