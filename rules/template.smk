# Templates: template visits' calexps -> coadd patches on a fixed sky grid -> per data ID,
# the coadd (or the best single template visit) warped onto the calexp's pixel grid
# (docs/architecture.md, templates). With step_jobs: merged (the default) the template is made
# in the imageDifference job (rules/diffim.smk).

from apsnake.templates.skygrid import SkyGrid

SKY_GRID = SkyGrid(patch_size_deg=config["templates"]["patch_size_deg"])
TEMPLATE_VISITS = set(config["templates"]["visits"])
PATCH_PAD_ARCSEC = config["templates"]["patch_pad_arcsec"]


def patches_of(row):
    """Patches touched by a data ID's footprint (registry corners, padded)."""
    return SKY_GRID.patch_ids_for_corners(
        [row["ra_ll"], row["ra_lr"], row["ra_ur"], row["ra_ul"]],
        [row["dec_ll"], row["dec_lr"], row["dec_ur"], row["dec_ul"]],
        pad_arcsec=PATCH_PAD_ARCSEC,
    )


def _template_calexps_by_patch(table):
    """{(band, patch): calexps of the template data IDs touching the patch, in table order}."""
    index = {}
    rows = table[table["visit"].isin(TEMPLATE_VISITS) & (table["observation_type"] == "science")]
    for r in rows.to_dict("records"):
        calexp = product("calexp").format(visit=r["visit"], detector=f"{int(r['detector']):02d}")
        for patch in patches_of(r):
            index.setdefault((r["band"], patch), []).append(calexp)
    return index


def template_calexps_by_patch():
    """The template index, built once per registry (the DAG asks for it per data ID)."""
    return registry_table(
        ingest_output().exposures, "template_calexps_by_patch", _template_calexps_by_patch
    )


def coadd_inputs(wildcards):
    return list(template_calexps_by_patch().get((wildcards.band, wildcards.patch), []))


def template_inputs(wildcards):
    """Coadd patches under the data ID (mode coadd), or the template visits' calexps that
    share a patch with it (mode single), in registry order."""
    row = exposure_row(wildcards)
    patches = sorted(set(patches_of(row)))
    if config["templates"]["mode"] == "single":
        index = template_calexps_by_patch()
        found = {c for patch in patches for c in index.get((row["band"], patch), [])}
        order = registry_table(
            ingest_output().exposures, "calexp_order",
            lambda table: {product("calexp").format(visit=v, detector=f"{int(d):02d}"): i
                           for i, (v, d) in enumerate(zip(table["visit"], table["detector"]))},
        )
        return sorted(found, key=order.__getitem__)
    return [f"{OUT}/coadd/{row['band']}/{patch}.fits" for patch in patches]


rule coadd:
    input:
        calexps=coadd_inputs,
    output:
        coadd=f"{OUT}/coadd/{{band}}/{{patch}}.fits",
    log:
        f"{OUT}/logs/coadd/{{band}}/coadd_{{patch}}.log",
    benchmark:
        f"{OUT}/benchmarks/coadd/{{band}}/coadd_{{patch}}.tsv"
    params:
        sky_grid=SKY_GRID,
        options=config["templates"]["coadd"],
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/coadd.py"


if STEP_JOBS == "separate":

    rule template:
        input:
            calexp=product("calexp"),
            inputs=template_inputs,
        output:
            template=product("template"),
        params:
            mode=config["templates"]["mode"],
        log:
            f"{OUT}/logs/template/{{visit}}/template_{{visit}}_{{detector}}.log",
        benchmark:
            f"{OUT}/benchmarks/template/{{visit}}/template_{{visit}}_{{detector}}.tsv"
        threads: 1
        resources:
            mem_mb=3000,
            runtime=10,
        conda:
            "../envs/apsnake.yaml"
        script:
            "../scripts/template.py"
