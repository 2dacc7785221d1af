"""The ``apsnake`` command: simulate a night, ingest headers, summarise a registry, query the APDB,
read alert files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _simulate(args) -> int:
    from apsnake.logs import workflow_step
    from apsnake.sim import simulate_night

    with workflow_step("simulate", None, f"preset={args.preset}"):
        summary = simulate_night(args.outdir, preset=args.preset, seed=args.seed)
    print(f"simulated {summary.get('n_visits', '?')} visits into {args.outdir}")
    return 0


def _ingest(args) -> int:
    from apsnake.logs import workflow_step
    from apsnake.registry import registry_paths, run_ingest

    with workflow_step("ingest", None):
        run_ingest(args.raw, args.calibs, registry_paths(args.registry), labels=("option --raw", "option --calibs"))
    return _show(argparse.Namespace(registry=args.registry))


def _show(args) -> int:
    from apsnake.registry import read_table, registry_paths

    paths = registry_paths(args.registry)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        print(f"no registry at {args.registry} (missing {', '.join(missing)})", file=sys.stderr)
        return 1
    exposures, calibs, rejected = (read_table(paths[n]) for n in ("exposures", "calibs", "rejected"))
    print(f"registry: {Path(args.registry).resolve()}")
    for obstype, table in exposures.groupby("observation_type"):
        print(f"  {obstype}: {table['visit'].nunique()} visits, {len(table)} data IDs, "
              f"bands {sorted(table['band'].unique())}, detectors {sorted(table['detector'].unique().tolist())}")
    for kind, table in calibs.groupby("calib_type"):
        print(f"  {kind}: {table['path'].nunique()} files, {len(table)} CCDs")
    print(f"  rejected: {len(rejected)} files")
    for row in rejected.itertuples():
        print(f"    {row.path}: {row.reason}")
    return 0


def _apdb_summary(args) -> int:
    from apsnake.apdb import Apdb
    from apsnake.errors import ApsnakeError

    try:
        summary = Apdb(args.root).summary()
    except ApsnakeError as err:
        print(f"apsnake apdb: {err}", file=sys.stderr)
        return 1
    rows = summary["rows"]
    print(f"APDB: {Path(args.root).resolve()}")
    if summary["data_ids"]:
        span = f", MJD (TAI) {summary['mjd_first']:.5f} .. {summary['mjd_last']:.5f}"
    else:
        span = " (nothing committed yet)"
    print(f"  committed data IDs: {summary['data_ids']} in {summary['visits']} visits{span}")
    print(f"  DiaObject: {summary['objects']} objects ({summary['objects_2plus_sources']} with >= 2 DiaSources), "
          f"{rows['DiaObject']} version rows")
    print(f"  DiaSource: {rows['DiaSource']} rows ({summary['unassociated_sources']} without a DiaObject)")
    print(f"  DiaForcedSource: {rows['DiaForcedSource']} rows")
    return 0


def _apdb_lightcurve(args) -> int:
    from apsnake.apdb import Apdb
    from apsnake.errors import ApsnakeError

    try:
        curve = Apdb(args.root).lightcurve(args.object_id)
    except ApsnakeError as err:
        print(f"apsnake apdb: {err}", file=sys.stderr)
        return 1
    if args.csv:
        curve.to_csv(sys.stdout, index=False)
    else:
        print(f"DiaObject {args.object_id}: {len(curve)} visits (fluxes in nJy, times MJD TAI)")
        print(curve.to_string(index=False, float_format="{:.2f}".format,
                              formatters={"midpointMjdTai": "{:.5f}".format}))
    return 0


def _alerts_show(args) -> int:
    from apsnake.alerts import read_alert_file
    from apsnake.alerts.avro import alert_summary
    from apsnake.errors import ApsnakeError

    try:
        metadata, alerts = read_alert_file(args.file)
    except ApsnakeError as err:
        print(f"apsnake alerts: {err}", file=sys.stderr)
        return 1
    table = alert_summary(alerts)
    print(f"{args.file}: {len(alerts)} alerts, schema {metadata.get('apsnake.schema_version', '?')} "
          f"(id {metadata.get('apsnake.schema_id', '?')}), visit {metadata.get('apsnake.visit', '?')} "
          f"detector {metadata.get('apsnake.detector', '?')}; fluxes in nJy, cutouts in pixels")
    if len(table):
        print(table.to_string(index=False, float_format="{:.2f}".format,
                              formatters={"ra": "{:.6f}".format, "dec": "{:.6f}".format}))
    return 0


def _alerts_cutouts(args) -> int:
    from apsnake.alerts import read_alert_file
    from apsnake.alerts.avro import write_cutouts
    from apsnake.errors import ApsnakeError

    try:
        _, alerts = read_alert_file(args.file)
        paths = write_cutouts(alerts, args.id, args.out)
    except ApsnakeError as err:
        print(f"apsnake alerts: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    from apsnake.sim.presets import PRESETS

    parser = argparse.ArgumentParser(prog="apsnake", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate a DECam night in the real raw format")
    p.add_argument("outdir", type=Path)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=_simulate)

    p = sub.add_parser("ingest", help="read raw and calibration headers into a registry")
    p.add_argument("--raw", required=True, help="folder or glob of raw files")
    p.add_argument("--calibs", required=True, help="folder of master calibrations")
    p.add_argument("--registry", required=True, type=Path, help="output folder for the Parquet tables")
    p.set_defaults(func=_ingest)

    p = sub.add_parser("registry", help="summarise a registry folder")
    p.add_argument("registry", type=Path)
    p.set_defaults(func=_show)

    p = sub.add_parser("apdb", help="query the APDB (committed association results) of a workflow run")
    apdb_sub = p.add_subparsers(dest="apdb_command", required=True)
    q = apdb_sub.add_parser("summary", help="counts of data IDs, objects and sources")
    q.add_argument("--root", type=Path, default=Path("out"), help="the workflow's outdir (default: out)")
    q.set_defaults(func=_apdb_summary)
    q = apdb_sub.add_parser("lightcurve", help="one DiaObject's fluxes per visit")
    q.add_argument("object_id", type=int, help="diaObjectId")
    q.add_argument("--root", type=Path, default=Path("out"), help="the workflow's outdir (default: out)")
    q.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    q.set_defaults(func=_apdb_lightcurve)

    p = sub.add_parser("alerts", help="read alert files (alerts/{visit}/alerts_{visit}_{detector:02d}.avro)")
    alerts_sub = p.add_subparsers(dest="alerts_command", required=True)
    q = alerts_sub.add_parser("show", help="one line per alert: ids, position, flux, S/N, history, cutout sizes")
    q.add_argument("file", type=Path, help="an alert file (.avro)")
    q.set_defaults(func=_alerts_show)
    q = alerts_sub.add_parser("cutouts", help="write the three cutouts of one alert as FITS files")
    q.add_argument("file", type=Path, help="an alert file (.avro)")
    q.add_argument("id", type=int, help="diaSourceId of the alert")
    q.add_argument("--out", type=Path, default=Path("."), help="folder for the FITS files (default: here)")
    q.set_defaults(func=_alerts_cutouts)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
