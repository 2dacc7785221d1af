"""Helpers of run_slurm_test.sh: simulate the ``test`` night, write the run configs, compare two runs.

    python tests/slurm/night.py prepare WORK     # WORK/sim (the night), WORK/{slurm,local}/config.yaml
    python tests/slurm/night.py compare OUT_A OUT_B

``prepare`` writes the same config as the workflow tests (tests/workflow_helpers._config), one per
run folder. ``compare`` checks that two runs wrote the same APDB (every DiaSource, every DiaObject
version and every DiaForcedSource, sorted by their ids, apart from the processing timestamps) and
the same alert files; it prints one line and exits 1 on the first difference.
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

TABLES = {"DiaSource": ["diaSourceId"], "DiaObject": ["diaObjectId", "validityStartMjdTai"],
          "DiaForcedSource": ["diaForcedSourceId"]}
RUNS = ("slurm", "local")


def prepare(work: Path) -> None:
    from apsnake.sim import simulate_night
    from workflow_helpers import _config

    sim = work / "sim"
    if not (sim / "refcat.parquet").exists():
        simulate_night(sim, preset="test", seed=1)
    for run in RUNS:
        (work / run).mkdir(parents=True, exist_ok=True)
        _config(sim, work / run)


def _table(out: Path, name: str):
    """Every row of one APDB table (committed data IDs only), sorted, without the columns
    that record when a row was made (they differ between two runs on the same inputs)."""
    import pandas as pd

    committed = {p.name.removeprefix("apdb_marker_").removesuffix(".json")
                 for p in (out / "apdb_marker").rglob("apdb_marker_*.json")}
    paths = sorted(p for p in (out / "apdb" / name).rglob(f"{name}_*.parquet")
                   if p.stem.removeprefix(f"{name}_") in committed)
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("timeProcessed")])
    return frame.sort_values(TABLES[name]).reset_index(drop=True), len(paths)


def compare(out_a: Path, out_b: Path) -> str:
    import pandas as pd
    from workflow_helpers import assert_same_alert_files

    markers = [sorted(p.name for p in (out / "apdb_marker").rglob("apdb_marker_*.json")) for out in (out_a, out_b)]
    if not markers[0]:
        raise AssertionError(f"no apdb_marker under {out_a}")
    if markers[0] != markers[1]:
        raise AssertionError(f"committed data IDs differ: {sorted(set(markers[0]) ^ set(markers[1]))}")
    counts = []
    for name in TABLES:
        (a, files), (b, _) = _table(out_a, name), _table(out_b, name)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
        counts.append(f"{len(a)} {name}")
    assert_same_alert_files(out_a, out_b)
    return f"same APDB ({len(markers[0])} data IDs: {', '.join(counts)} rows) and same alerts"


def main(argv):
    if len(argv) == 2 and argv[0] == "prepare":
        prepare(Path(argv[1]))
    elif len(argv) == 3 and argv[0] == "compare":
        try:
            print(compare(Path(argv[1]), Path(argv[2])))
        except AssertionError as error:
            print(f"the SLURM and local runs differ: {error}", file=sys.stderr)
            return 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
