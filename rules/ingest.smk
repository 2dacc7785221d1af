# Ingest: read every raw and calibration header once into the registry (Parquet).
# A checkpoint, because every later target list is expanded from its output.


def ingest_inputs(wildcards):
    if SIMULATE:
        # The files appear only when the simulation has run; the summary is written last.
        return {"simulation": SIM_SUMMARY}
    return INPUT_FILES  # checked in common.smk


checkpoint ingest:
    input:
        unpack(ingest_inputs),
    output:
        **REGISTRY,
    log:
        logs("ingest"),
    benchmark:
        bench("ingest")
    params:
        raw=config["raw"],
        calibs=config["calibs"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    localrule: True
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/ingest.py"
