# Shared helpers: paths, wildcard constraints, and the registry-driven target lists.
# Rules never open FITS files to build the DAG: they read the Parquet registry that the
# `ingest` checkpoint writes.

import os
import sys

from apsnake.registry import (
    InputNotFound,
    check_input_file,
    check_input_files,
    read_table,
    select_data_ids,
)

OUT = config["outdir"]
SIMULATE = config.get("simulate")


def simulated(location):
    """Whether an input location lies under simulate.outdir, so that the `simulate` job
    writes it (it need not exist when the workflow loads)."""
    return bool(SIMULATE) and os.path.abspath(str(location)).startswith(
        os.path.abspath(SIMULATE["outdir"]) + os.sep
    )


if SIMULATE and not simulated(config["raw"]):
    # A user config that points `raw` at real data but inherits the default `simulate`
    # block must not simulate anything.
    print(
        f"apsnake: raw={config['raw']} is outside simulate.outdir={SIMULATE['outdir']}: "
        "not simulating (set `simulate: null` to silence this)",
        file=sys.stderr,
    )
    SIMULATE = None


# Inputs that must already exist: a mistyped location stops the workflow here, naming the
# config key and the location (else a raw folder that matches nothing would register no
# exposure and the run would end "successfully" with nothing done).
INPUT_FILES = {}
try:
    for key in ("raw", "calibs"):
        if not simulated(config[key]):
            INPUT_FILES[key] = check_input_files(key, config[key])
    if not simulated(config["refcat"]):
        check_input_file("refcat", config["refcat"])
except InputNotFound as err:
    raise err.with_traceback(None)  # the message says it all; no library frames
REGISTRY = {
    name: f"{OUT}/registry/{name}.parquet" for name in ("exposures", "calibs", "rejected")
}


wildcard_constraints:
    visit=r"\d+",
    detector=r"\d+",
    band=r"[A-Za-z0-9]+",
    patch=r"[A-Za-z0-9_]+",


def logs(name):
    return f"{OUT}/logs/{name}.log"


def bench(name):
    return f"{OUT}/benchmarks/{name}.tsv"


def registered_exposures():
    """The exposures table; waits for the ingest checkpoint."""
    return read_table(checkpoints.ingest.get().output.exposures)


def science_data_ids():
    """(visit, detector) pairs selected by the `visits` and `detectors` config keys."""
    return select_data_ids(
        registered_exposures(), visits=config["visits"], detectors=config["detectors"]
    )


def exposure_row(wildcards):
    """The registry row of one data ID (visit, detector)."""
    table = registered_exposures()
    rows = table[
        (table["visit"] == int(wildcards.visit))
        & (table["detector"] == int(wildcards.detector))
    ]
    if rows.empty:
        raise ValueError(
            f"data ID (visit={wildcards.visit}, detector={wildcards.detector}) is not in "
            f"{REGISTRY['exposures']}"
        )
    return rows.iloc[0]


def product(name, ext="fits"):
    """Path pattern of a per-data-ID product (docs/architecture.md §3.1)."""
    return f"{OUT}/{name}/{{visit}}/{name}_{{visit}}_{{detector}}.{ext}"


def expand_data_ids(pattern, science_only=False):
    """Every selected data ID's file for a product pattern, detector zero-padded.

    ``science_only`` leaves out the template visits (they build the templates; a
    difference against a coadd of themselves is not wanted).
    """
    template_visits = set(config["templates"]["visits"]) if science_only else set()
    return [
        pattern.format(visit=v, detector=f"{d:02d}")
        for v, d in science_data_ids()
        if v not in template_visits
    ]
