# Single-frame calibration: postISR -> calexp (nJy, TAN-SIP WCS, PSF) + src + background.


rule calibrate:
    input:
        exposure=product("postISR"),
        refcat=config["refcat"],
    output:
        calexp=product("calexp"),
        src=product("src", "parquet"),
        background=product("calexpBackground"),
        metadata=product("calexp", "json"),
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
