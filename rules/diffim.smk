# Difference imaging and DIA sources: calexp + template -> diffexp (+ the PSF-matched
# template) -> diaSrc. step_jobs: separate runs diffim and detectDiaSources as jobs of their
# own; merged (the default) runs template + diffim + detectDiaSources as one imageDifference job
# that writes the same products (docs/architecture.md, jobs).

DIFFIM_OUTPUTS = dict(
    diffexp=product("diffexp"),
    metadata=product("diffexp", "json"),
    matched_template=product("matchedTemplate"),
)


if STEP_JOBS == "separate":

    rule diffim:
        input:
            calexp=product("calexp"),
            template=product("template"),
            src=product("src", "parquet"),
        output:
            **DIFFIM_OUTPUTS,
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

else:

    rule imageDifference:
        input:
            calexp=product("calexp"),
            src=product("src", "parquet"),
            inputs=template_inputs,
        output:
            template=product("template"),
            **DIFFIM_OUTPUTS,
            diaSrc=product("diaSrc", "parquet"),
        log:
            f"{OUT}/logs/imageDifference/{{visit}}/imageDifference_{{visit}}_{{detector}}.log",
        benchmark:
            f"{OUT}/benchmarks/imageDifference/{{visit}}/imageDifference_{{visit}}_{{detector}}.tsv"
        params:
            mode=config["templates"]["mode"],
            diffim=config["diffim"],
            dia=config["dia"],
        threads: 1
        resources:
            mem_mb=3000,
            runtime=25,
        conda:
            "../envs/apsnake.yaml"
        script:
            "../scripts/image_difference.py"
