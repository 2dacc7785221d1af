# Templates: template visits' calexps -> coadd cells on a fixed sky grid -> per data ID,
# the coadd warped onto the calexp's pixel grid (ARCHITECTURE.md section 6).

from apsnake.template import SkyGrid

SKY_GRID = SkyGrid(cell_size_deg=config["templates"]["cell_size_deg"])
TEMPLATE_VISITS = set(config["templates"]["visits"])
CELL_PAD_ARCSEC = config["templates"]["cell_pad_arcsec"]


def cells_of(row):
    """Sky cells touched by a data ID's footprint (registry corners, padded)."""
    return SKY_GRID.cell_ids_for_corners(
        [row["ra_ll"], row["ra_lr"], row["ra_ur"], row["ra_ul"]],
        [row["dec_ll"], row["dec_lr"], row["dec_ur"], row["dec_ul"]],
        pad_arcsec=CELL_PAD_ARCSEC,
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
        if wildcards.cell in cells_of(r)
    ]


def template_inputs(wildcards):
    """Coadd cells under the data ID (mode coadd), or the template visits' calexps that
    share a sky cell with it (mode single)."""
    row = exposure_row(wildcards)
    cells = set(cells_of(row))
    if config["templates"]["mode"] == "single":
        rows = template_rows()
        rows = rows[rows["band"] == row["band"]]
        return [
            product("calexp").format(visit=r["visit"], detector=f"{int(r['detector']):02d}")
            for _, r in rows.iterrows()
            if cells & set(cells_of(r))
        ]
    return [f"{OUT}/coadd/{row['band']}/{cell}.fits" for cell in sorted(cells)]


rule coadd:
    input:
        calexps=coadd_inputs,
    output:
        coadd=f"{OUT}/coadd/{{band}}/{{cell}}.fits",
    log:
        f"{OUT}/logs/coadd/{{band}}/coadd_{{cell}}.log",
    benchmark:
        f"{OUT}/benchmarks/coadd/{{band}}/coadd_{{cell}}.tsv"
    params:
        cell_size_deg=config["templates"]["cell_size_deg"],
        homogenize_psf=config["templates"]["homogenize_psf"],
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
