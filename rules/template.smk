# Templates: template visits' calexps -> coadd patches on a fixed sky grid -> per data ID,
# the coadd (or the best single template visit) warped onto the calexp's pixel grid
# (docs/architecture.md, templates).

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


def template_rows():
    table = registered_exposures()
    return table[
        table["visit"].isin(TEMPLATE_VISITS) & (table["observation_type"] == "science")
    ]


def coadd_inputs(wildcards):
    rows = template_rows()
    rows = rows[rows["band"] == wildcards.band]
    return [
        product("calexp").format(visit=r["visit"], detector=f"{int(r['detector']):02d}")
        for _, r in rows.iterrows()
        if wildcards.patch in patches_of(r)
    ]


def template_inputs(wildcards):
    """Coadd patches under the data ID (mode coadd), or the template visits' calexps that
    share a patch with it (mode single)."""
    row = exposure_row(wildcards)
    patches = set(patches_of(row))
    if config["templates"]["mode"] == "single":
        rows = template_rows()
        rows = rows[rows["band"] == row["band"]]
        return [
            product("calexp").format(visit=r["visit"], detector=f"{int(r['detector']):02d}")
            for _, r in rows.iterrows()
            if patches & set(patches_of(r))
        ]
    return [f"{OUT}/coadd/{row['band']}/{patch}.fits" for patch in sorted(patches)]


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
