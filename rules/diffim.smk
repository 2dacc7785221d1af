# Difference imaging and DIA sources: calexp + template -> diffexp (+ the PSF-matched
# template) -> diaSrc.


rule diffim:
    input:
        calexp=product("calexp"),
        template=product("template"),
        src=product("src", "parquet"),
    output:
        diffexp=product("diffexp"),
        metadata=product("diffexp", "json"),
        matched_template=product("matchedTemplate"),
    log:
        f"{OUT}/logs/diffim/{{visit}}/diffim_{{visit}}_{{detector}}.log",
    benchmark:
        f"{OUT}/benchmarks/diffim/{{visit}}/diffim_{{visit}}_{{detector}}.tsv"
    params:
        options=config["diffim"],
    threads: 1
    resources:
        mem_mb=3000,
        runtime=15,
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/diffim.py"


rule detectDiaSources:
    input:
        diffexp=product("diffexp"),
        metadata=product("diffexp", "json"),
        calexp=product("calexp"),
        matched_template=product("matchedTemplate"),
    output:
        diaSrc=product("diaSrc", "parquet"),
    log:
        f"{OUT}/logs/detectDiaSources/{{visit}}/detectDiaSources_{{visit}}_{{detector}}.log",
    benchmark:
        f"{OUT}/benchmarks/detectDiaSources/{{visit}}/detectDiaSources_{{visit}}_{{detector}}.tsv"
    params:
        options=config["dia"],
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/detect_dia_sources.py"
