# apsnake: DECam alert production (Rubin ap_pipe) as a Snakemake workflow.
#
#   raw DECam exposures --ingest--> registry (exposures, calibs, rejected)
#   --isr--> postISR --calibrate--> calexp + src
#   template visits' calexps --coadd--> coadd patches --template--> template per data ID
#   calexp + template --diffim--> diffexp + matchedTemplate --detectDiaSources--> diaSrc
#   diaSrc (+ diffexp, calexp) + APDB state of its sky cells --associate--> APDB fragments
#   (DiaSource, DiaObject versions, DiaForcedSource) + apdb_marker, ordered per sky cell
#   APDB rows + diffexp, calexp, template --package_alerts--> alerts (Avro, Rubin alert schema)
#   [--produce_alerts--> Kafka, when alerts.kafka.bootstrap_servers is set]
#   calexp + diffexp + matchedTemplate + src --fakes--> fakes (injected fakes and their recovery;
#   a fakes.fraction of the science data IDs; never in the APDB or the alerts)
#   every science data ID's products + APDB + fakes --night_summary--> qa/night_summary.parquet
#   --report--> qa/report.html (the night report: one self-contained HTML page)
#
#   (step_jobs: merged, the default, runs isr + calibrate as one processCcd job and template +
#   diffim + detectDiaSources as one imageDifference job; each still writes every product above)
#
# docs/architecture.md describes data IDs, products, jobs and the DAG ordering.

from snakemake.utils import min_version, validate

min_version("9.27")


configfile: "config.yaml"


validate(config, "config.schema.yaml")


include: "rules/common.smk"
include: "rules/simulate.smk"
include: "rules/ingest.smk"
include: "rules/isr.smk"
include: "rules/calibrate.smk"
include: "rules/template.smk"
include: "rules/diffim.smk"
include: "rules/associate.smk"
include: "rules/alerts.smk"
include: "rules/fakes.smk"
include: "rules/report.smk"


rule all:
    input:
        REGISTRY.values(),
        lambda wildcards: expand_data_ids(product("calexp")),
        lambda wildcards: expand_data_ids(product("diaSrc", "parquet"), science_only=True),
        lambda wildcards: expand_data_ids(str(marker_path(OUT, "{visit}", "{detector}")), science_only=True),
        lambda wildcards: expand_data_ids(product("alerts", "avro"), science_only=True),
        lambda wildcards: (
            expand_data_ids(product("alerts", "kafka.json"), science_only=True) if kafka_enabled() else []
        ),
        lambda wildcards: fake_data_ids(),
        night_report_target,
    localrule: True
