# Shared helpers: paths, wildcard constraints, and the registry-driven target lists.
# Rules never open FITS files to build the DAG: they read the Parquet registry that the
# `ingest` checkpoint writes.

import gc
import os
import sys

from apsnake.registry import (
    InputNotFound,
    check_input_file,
    check_input_files,
    read_table,
    select_data_ids,
)

# Snakemake resolves dependencies recursively, two Python frames per job of a dependency chain:
# at Python's default limit (1000 frames) a DAG entered at the end of an association chain of
# more than ~480 visits (e.g. the products of the night's last visit as targets) fails with a
# misleading "cyclic dependency" error (docs/architecture.md, association order). At 20000 frames
# a 3000-visit chain entered at its end builds (benchmarks/bench_dryrun.py chain).
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))

# Building the DAG of a whole focal plane creates millions of long-lived objects; at Python's
# default thresholds the cyclic garbage collector rescans them over and over. Fewer collections
# took ~7-9 % off the dry run of 62 CCDs x 20-30 visits (benchmarks/README.md, DAG scale) for
# ~3 % more memory.
gc.set_threshold(100_000, 50, 1000)

OUT = config["outdir"]
# separate: one job per step; merged: isr + calibrate (processCcd) and template + diffim +
# detectDiaSources (imageDifference) as one job each, writing the same products.
STEP_JOBS = config.get("step_jobs", "merged")
KEEP_POSTISR = config.get("keep_postisr", True)
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


# The registry tables and what is derived from them, read once per version of each file:
# the input functions below run for every job while the DAG is built (tens of thousands of
# calls for a whole night; benchmarks/bench_dryrun.py). {path: (mtime_ns, table, {name: value})}
_REGISTRY_CACHE = {}


def registry_table(path, derived=None, build=None):
    """A registry table (pandas, shared: never modify it), or ``build(table)`` cached under the
    name ``derived``; re-read when the file changes."""
    path = str(path)
    stamp = os.stat(path).st_mtime_ns
    entry = _REGISTRY_CACHE.get(path)
    if entry is None or entry[0] != stamp:
        entry = _REGISTRY_CACHE[path] = (stamp, read_table(path), {})
    if derived is None:
        return entry[1]
    if derived not in entry[2]:
        entry[2][derived] = build(entry[1])
    return entry[2][derived]


_INGESTED = []


def ingest_output():
    """The outputs of the ingest checkpoint; raises Snakemake's IncompleteCheckpointException
    until it has run. Once done it stays done for this process (Snakemake's set of created
    checkpoint outputs only grows), so the answer is kept: `get()` costs ~0.3 ms per call."""
    if not _INGESTED:
        _INGESTED.append(checkpoints.ingest.get().output)
    return _INGESTED[0]


def registered_exposures():
    """The exposures table; waits for the ingest checkpoint."""
    return registry_table(ingest_output().exposures)


def science_data_ids():
    """(visit, detector) pairs selected by the `visits` and `detectors` config keys."""
    return list(registry_table(
        ingest_output().exposures, "science_data_ids",
        lambda table: select_data_ids(table, visits=config["visits"], detectors=config["detectors"]),
    ))


def exposure_row(wildcards):
    """The registry row of one data ID (visit, detector), as a dict."""
    rows = registry_table(
        ingest_output().exposures, "rows",
        lambda table: {(int(r["visit"]), int(r["detector"])): r for r in table.to_dict("records")},
    )
    row = rows.get((int(wildcards.visit), int(wildcards.detector)))
    if row is None:
        raise ValueError(
            f"data ID (visit={wildcards.visit}, detector={wildcards.detector}) is not in "
            f"{REGISTRY['exposures']}"
        )
    return row


def product(name, ext="fits"):
    """Path pattern of a per-data-ID product (docs/architecture.md §3.1)."""
    return f"{OUT}/{name}/{{visit}}/{name}_{{visit}}_{{detector}}.{ext}"


def intermediate(path):
    """``path`` as an intermediate product: Snakemake deletes it once every job that reads it
    has run when ``keep_postisr`` is false (``temp()``; a file asked for as a target is kept)."""
    return path if KEEP_POSTISR else temp(path)


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
