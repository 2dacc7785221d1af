# Fakes: PSF-shaped point sources injected into a science data ID's calexp and difference image,
# detected and measured as detectDiaSources does, and matched -> fakes/{visit}/fakes_{visit}_{detector}.parquet
# (schema table Fake). Fakes never reach the APDB or the alerts. `fakes.fraction` of the science
# data IDs get them (a deterministic per-data-ID draw); 0 turns the rule off.

from apsnake.fakes import select_fake_data_ids

FAKES = config.get("fakes") or {}


def fake_data_ids():
    """Every science data ID's fakes file, subset by fakes.fraction (empty when it is 0)."""
    fraction = float(FAKES.get("fraction", 1.0))
    if fraction <= 0:
        return []
    template_visits = set(config["templates"]["visits"])
    science = [(v, d) for v, d in science_data_ids() if v not in template_visits]
    chosen = select_fake_data_ids(science, fraction, int(FAKES.get("seed", 0)))
    return [product("fakes", "parquet").format(visit=v, detector=f"{d:02d}") for v, d in chosen]


rule fakes:
    input:
        calexp=product("calexp"),
        src=product("src", "parquet"),
        diffexp=product("diffexp"),
        metadata=product("diffexp", "json"),
        matched_template=product("matchedTemplate"),
    output:
        fakes=product("fakes", "parquet"),
    log:
        f"{OUT}/logs/fakes/{{visit}}/fakes_{{visit}}_{{detector}}.log",
    benchmark:
        f"{OUT}/benchmarks/fakes/{{visit}}/fakes_{{visit}}_{{detector}}.tsv"
    params:
        options=FAKES,
        dia=config["dia"],
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/inject_fakes.py"
