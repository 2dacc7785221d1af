"""The night report: one self-contained HTML page (figures embedded as PNG data URIs).

Sections: the night at a glance (counts, skipped data IDs), per-visit QA against time,
completeness of injected fakes with m50 (a one-line note when there are none), a focal-plane
map of the processed CCDs coloured by depth, difference-image thumbnails, a cutout gallery of
the night's new DiaObjects (science / template / difference) and light curves of the objects
with the most DiaSources. Every image is an ``<img>`` with a ``data-figure`` attribute naming
it (``FIGURES``), so that tests and scripts can find them.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from apsnake import atomic
from apsnake.qa import images, plots
from apsnake.qa.products import DataIdProducts

log = logging.getLogger(__name__)

#: data-figure names of the report's images, in page order.
FIGURES = ("qa_vs_time", "completeness", "focal_plane", "thumbnails", "gallery", "lightcurves")
#: Thumbnails beyond this many data IDs are left out (the page stays small).
MAX_THUMBNAILS = 64

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.8em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; }
img { max-width: 100%; } p.note { color: #666; font-style: italic; }
"""


def _frame(table) -> pd.DataFrame:
    return table.to_pandas() if isinstance(table, pa.Table) else pd.DataFrame(table)


def _figure(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img data-figure="{name}" alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _summary_table(summary: pd.DataFrame) -> str:
    columns = [("visit", "visit", "{:.0f}"), ("detector", "CCD", "{:.0f}"), ("band", "band", "{}"),
               ("seeing_arcsec", "seeing (\u2033)", "{:.2f}"), ("zero_point_mag", "ZP", "{:.3f}"),
               ("sky_level_adu", "sky (ADU)", "{:.1f}"), ("astrometry_rms_mas", "astrom. rms (mas)", "{:.0f}"),
               ("limiting_mag", "5σ depth", "{:.2f}"), ("m50_mag", "m50", "{:.2f}"),
               ("n_fakes_recovered", "fakes rec.", "{:.0f}"), ("n_fakes", "fakes", "{:.0f}"),
               ("n_dia_sources", "DIA", "{:.0f}"), ("n_dia_positive", "DIA +", "{:.0f}"),
               ("n_dia_negative", "DIA −", "{:.0f}"), ("n_kernel_stars", "kernel stars", "{:.0f}"),
               ("kernel_residual_std", "kernel resid. std", "{:.2f}"), ("skip_reason", "skipped", "{}")]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in columns)
    body = []
    for _, row in summary.iterrows():
        cells = []
        for column, _, fmt in columns:
            value = row.get(column)
            text = "" if value is None or (isinstance(value, float) and not np.isfinite(value)) or pd.isna(value) \
                else fmt.format(value)
            cls = ' class="text"' if column in ("band", "skip_reason") else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _apdb_tables(apdb_root, night_ids: set[tuple[int, int]]):
    """(every DiaSource of the objects seen in the night's data IDs, Apdb), or (None, None)
    when there is no APDB. Only the night's visits' row groups and those objects' rows are
    read, so a long-lived APDB is not read whole."""
    import pyarrow.dataset as ds

    from apsnake.apdb import Apdb, ApdbError, to_pandas

    try:
        apdb = Apdb(apdb_root)
        visits = sorted({v for v, _ in night_ids})
        night = apdb.dataset("DiaSource").to_table(columns=["diaObjectId", "visit", "detector"],
                                                   filter=ds.field("visit").isin(visits)).to_pandas()
    except ApdbError as err:
        log.warning("no APDB to report on: %s", err)
        return None, None
    ids = night["diaObjectId"].dropna().astype("int64").unique()
    if not len(ids):
        return to_pandas(apdb.dataset("DiaSource").schema.empty_table()), apdb
    return apdb.sources(ids), apdb


def new_objects(sources: pd.DataFrame, night_ids: set[tuple[int, int]], limit: int = 12) -> pd.DataFrame:
    """The night's new DiaObjects, brightest first: objects whose first DiaSource (in time)
    belongs to one of the night's data IDs. One row per object: its first DiaSource (visit,
    detector, x, y, ...) and ``maxFlux``, its largest psfFlux (nJy), by which they are sorted."""
    if sources is None or sources.empty:
        return pd.DataFrame()
    associated = sources[sources["diaObjectId"].notna()]
    if associated.empty:
        return pd.DataFrame()
    ordered = associated.sort_values(["midpointMjdTai", "diaSourceId"], kind="stable")
    first = ordered.drop_duplicates("diaObjectId").copy()
    in_night = [(int(v), int(d)) in night_ids for v, d in zip(first["visit"], first["detector"])]
    first = first[np.asarray(in_night, bool)]
    peak = associated.groupby("diaObjectId")["psfFlux"].max()
    first["maxFlux"] = first["diaObjectId"].map(peak).to_numpy()
    return first.sort_values("maxFlux", ascending=False, kind="stable").head(limit)


def _gallery(objects: pd.DataFrame, products: dict[tuple[int, int], DataIdProducts], half: int = 20) -> list[dict]:
    entries = []
    for row in objects.itertuples():
        p = products.get((int(row.visit), int(row.detector)))
        if p is None:
            continue
        entries.append({
            "label": f"{int(row.diaObjectId)} ({row.maxFlux:.0f} nJy)",
            "science": images.cutout(p.calexp, row.x, row.y, half),
            "template": images.cutout(p.matched_template, row.x, row.y, half),
            "difference": images.cutout(p.diffexp, row.x, row.y, half),
        })
    return entries


def build_report(data_ids: list[DataIdProducts], summary, completeness=None, apdb_root: str | Path | None = None,
                 fakes_enabled: bool = False, title: str = "apsnake night report", n_gallery: int = 12,
                 n_curves: int = 6) -> str:
    """The report's HTML.

    ``data_ids``: the night's science data IDs (for thumbnails and cutouts); ``summary``: the
    night summary (``night_summary``); ``completeness``: the completeness table (empty or None
    without fakes); ``apdb_root``: the outdir holding the APDB (None: no gallery or light
    curves); ``fakes_enabled``: whether fakes were configured (only changes the note).
    """
    start = time.perf_counter()
    summary = _frame(summary)
    completeness = _frame(completeness) if completeness is not None else pd.DataFrame()
    science = summary[summary["visit"].notna()]
    skipped = summary[summary["skipped"].fillna(False).astype(bool)]
    mjd = science["midpointMjdTai"].dropna()
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    night = f"MJD {mjd.min():.4f} to {mjd.max():.4f} (TAI)" if len(mjd) else "no processed data IDs"
    bands = ", ".join(sorted(set(science["band"].dropna()))) or "none"
    parts.append(f"<p>{html.escape(night)}; {science['visit'].nunique()} visits, {len(science)} data IDs, "
                 f"bands {html.escape(bands)}; {int(science['n_dia_sources'].fillna(0).sum())} DiaSources; "
                 f"{len(skipped)} skipped or rejected.</p>")
    if len(skipped):
        items = "".join(
            f"<li>{'' if pd.isna(r.visit) else f'visit {int(r.visit)} CCD {int(r.detector)}: '}"
            f"{html.escape(str(r.skip_reason))}</li>" for r in skipped.itertuples())
        parts.append(f"<ul>{items}</ul>")

    parts.append("<h2>Per-visit QA</h2>")
    m50_visits = None
    if not completeness.empty:
        m50_visits = (completeness[completeness["scope"] == "visit"].drop_duplicates("visit")
                      [["visit", "m50_mag", "m50_err_mag"]])
    if len(science):
        parts.append(_figure("qa_vs_time", plots.qa_versus_time(science, m50_visits),
                             "Seeing, zero point, depth (5σ PSF limit and fake m50), sky and DIA counts against time"))
    else:
        parts.append(_note("No processed data IDs."))

    parts.append("<h2>Completeness</h2>")
    if completeness.empty:
        parts.append(_note("No fakes in this night (fakes.fraction is 0 or none injected): no completeness curves or m50."
                           if not fakes_enabled else "Fakes were enabled but no fake table was found."))
    else:
        night_rows = completeness[completeness["scope"] == "night"]
        if len(night_rows) and np.isfinite(night_rows["m50_mag"].iloc[0]):
            parts.append(f"<p>Night m50 = {night_rows['m50_mag'].iloc[0]:.2f} ± "
                         f"{night_rows['m50_err_mag'].iloc[0]:.2f} mag "
                         f"({int(night_rows[night_rows['variable'] == 'injectedMag']['n'].sum())} fakes).</p>")
        parts.append(_figure("completeness", plots.completeness_curves(completeness),
                             "Recovered fraction of injected fakes per visit and for the night, m50 marked"))

    parts.append("<h2>Focal plane</h2>")
    parts.append(_figure("focal_plane", plots.focal_plane(science), "Processed CCDs coloured by median 5σ depth"))

    parts.append("<h2>Difference images</h2>")
    thumbs = []
    for p in data_ids[:MAX_THUMBNAILS]:
        if Path(p.diffexp).exists():
            thumbs.append((f"{p.visit} CCD {p.detector}", images.thumbnail(p.diffexp)))
    if thumbs:
        parts.append(_figure("thumbnails", plots.thumbnail_grid(thumbs), "Difference images, 16 x 16 binned"))
        if len(data_ids) > MAX_THUMBNAILS:
            parts.append(_note(f"First {MAX_THUMBNAILS} of {len(data_ids)} data IDs shown."))
    else:
        parts.append(_note("No difference images."))

    products = {(p.visit, p.detector): p for p in data_ids}
    sources, apdb = _apdb_tables(apdb_root, set(products)) if apdb_root is not None else (None, None)
    parts.append("<h2>New DiaObjects</h2>")
    objects = new_objects(sources, set(products), n_gallery)
    entries = _gallery(objects, products) if len(objects) else []
    if entries:
        parts.append(_figure("gallery", plots.cutout_gallery(entries),
                             f"The {len(entries)} brightest new DiaObjects: science, matched template, difference"))
    else:
        parts.append(_note("No new DiaObjects in this night."))

    parts.append("<h2>Light curves</h2>")
    curves = []
    if sources is not None and len(sources) and sources["diaObjectId"].notna().any():
        counts = sources["diaObjectId"].dropna().astype("int64").value_counts()
        counts = counts.sort_index().sort_values(ascending=False, kind="stable")
        curves = [(int(oid), apdb.lightcurve(int(oid))) for oid in counts.index[:n_curves]]
    if curves:
        parts.append(_figure("lightcurves", plots.light_curves(curves),
                             "DiaSource and DiaForcedSource psfFlux of the objects with the most DiaSources"))
    else:
        parts.append(_note("No DiaObjects with DiaSources: no light curves."))

    parts.append("<h2>Data IDs</h2>")
    parts.append(_summary_table(summary))
    parts.append(f"<p class='note'>Made by apsnake in {time.perf_counter() - start:.1f} s.</p></body></html>")
    return "".join(parts)


def write_report(text: str, path: str | Path) -> None:
    atomic.write_text(text, path)


def report_from_outdir(root: str | Path, fakes: bool | None = None, **kwargs) -> str:
    """The report of a finished run's outdir, made directly (no workflow): data IDs found from
    the diffexp JSONs, the summary and completeness computed afresh."""
    from apsnake.qa.products import data_id_products, find_science_data_ids
    from apsnake.qa.summary import completeness_table, night_fakes, night_summary

    root = Path(root)
    data_ids = [data_id_products(root, v, d, fakes=fakes) for v, d in find_science_data_ids(root)]
    rejected_path = root / "registry" / "rejected.parquet"
    rejected = pd.read_parquet(rejected_path) if rejected_path.exists() else None
    summary = night_summary(data_ids, rejected)
    fake_rows = night_fakes(data_ids)
    return build_report(data_ids, summary, completeness_table(fake_rows), apdb_root=root,
                        fakes_enabled=fake_rows is not None, **kwargs)
