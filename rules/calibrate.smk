# Single-frame calibration: postISR -> calexp (nJy, TAN-SIP WCS, PSF) + src + background.
# step_jobs: separate runs it as its own job; merged (the default) runs ISR and calibration as
# one processCcd job that writes the same products (docs/architecture.md, jobs).

CALIBRATE_OUTPUTS = dict(
    calexp=product("calexp"),
    src=product("src", "parquet"),
    background=product("calexpBackground"),
    metadata=product("calexp", "json"),
)


if STEP_JOBS == "separate":

    rule calibrate:
        input:
            exposure=product("postISR"),
            refcat=config["refcat"],
        output:
            **CALIBRATE_OUTPUTS,
        log:
            f"{OUT}/logs/calibrate/{{visit}}/calibrate_{{visit}}_{{detector}}.log",
        benchmark:
            f"{OUT}/benchmarks/calibrate/{{visit}}/calibrate_{{visit}}_{{detector}}.tsv"
        params:
            options=config["calibrate"],
            refcat_columns=config["refcat_columns"],
        threads: 1
        resources:
            mem_mb=2000,
            runtime=15,
        conda:
            "../envs/apsnake.yaml"
        script:
            "../scripts/calibrate.py"

else:

    rule processCcd:
        input:
            unpack(isr_inputs),
            refcat=config["refcat"],
        output:
            **(dict(exposure=product("postISR")) if KEEP_POSTISR else {}),
            isr_metadata=product("postISR", "json"),
            **CALIBRATE_OUTPUTS,
        log:
            f"{OUT}/logs/processCcd/{{visit}}/processCcd_{{visit}}_{{detector}}.log",
        benchmark:
            f"{OUT}/benchmarks/processCcd/{{visit}}/processCcd_{{visit}}_{{detector}}.tsv"
        params:
            calibs=isr_calibrations,
            isr=config["isr"],
            calibrate=config["calibrate"],
            refcat_columns=config["refcat_columns"],
        threads: 1
        resources:
            mem_mb=2000,
            runtime=20,
        conda:
            "../envs/apsnake.yaml"
        script:
            "../scripts/process_ccd.py"
