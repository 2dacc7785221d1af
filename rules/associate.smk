# Association: diaSrc (+ diffexp, calexp) + the APDB state of the data ID's sky cells
#   -> APDB fragments (DiaSource, DiaObject versions, DiaForcedSource) + apdb_marker.
#
# Order (docs/architecture.md, association order): the sky is cut into HEALPix cells; the visits touching a
# cell, sorted by (MJD, visit), form a chain, and each association waits for the apdb_markers
# of the previous visit's data IDs in every cell it touches. The chains are computed from the
# registry before any job runs; data IDs sharing no cell, and the detectors of one visit,
# associate in parallel. No `apdb` resource is needed: every job writes only its own fragments.

from apsnake.apdb import fragment_path, marker_path
from apsnake.association.plan import association_plan

ASSOCIATION = config["association"]
_PLAN_CACHE = {}


def apdb_fragment(table):
    """The rule's pattern of a data ID's APDB fragment (the library spells the path)."""
    return str(fragment_path(OUT, table, "{visit}", "{detector}"))


def run_association_plan():
    """Cells and chain predecessors of every associated data ID (cached per registry)."""
    path = ingest_output().exposures
    stamp = os.path.getmtime(path)
    if _PLAN_CACHE.get("stamp") != stamp:
        template_visits = set(config["templates"]["visits"])
        data_ids = [(v, d) for v, d in science_data_ids() if v not in template_visits]
        _PLAN_CACHE["plan"] = association_plan(
            registered_exposures(),
            data_ids,
            order=ASSOCIATION["healpix_order"],
            pad_arcsec=ASSOCIATION["footprint_pad_arcsec"],
        )
        _PLAN_CACHE["stamp"] = stamp
    return _PLAN_CACHE["plan"]


def planned(wildcards):
    data_id = (int(wildcards.visit), int(wildcards.detector))
    plan = run_association_plan()
    if data_id not in plan.cells:
        raise ValueError(
            f"data ID (visit={data_id[0]}, detector={data_id[1]}) is not associated in this run "
            "(template visit, or outside the `visits`/`detectors` selection)"
        )
    return plan, data_id


def previous_markers(wildcards):
    """apdb_markers of the previous visit's data IDs in every sky cell of this data ID."""
    plan, data_id = planned(wildcards)
    return [
        str(marker_path(OUT, v, d)) for v, d in plan.predecessors[data_id]
    ]


def data_id_cells(wildcards):
    """The sky cells of the data ID (sorted HEALPix indices at healpix_order)."""
    plan, data_id = planned(wildcards)
    return plan.cells[data_id]


rule associate:
    input:
        diaSrc=product("diaSrc", "parquet"),
        diffexp=product("diffexp"),
        calexp=product("calexp"),
        previous=previous_markers,
    output:
        sources=apdb_fragment("DiaSource"),
        objects=apdb_fragment("DiaObject"),
        forced=apdb_fragment("DiaForcedSource"),
        marker=str(marker_path(OUT, "{visit}", "{detector}")),
    log:
        f"{OUT}/logs/associate/{{visit}}/associate_{{visit}}_{{detector}}.log",
    benchmark:
        f"{OUT}/benchmarks/associate/{{visit}}/associate_{{visit}}_{{detector}}.tsv"
    params:
        root=OUT,
        options=ASSOCIATION,
        cells=data_id_cells,
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/associate.py"
