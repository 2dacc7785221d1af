"""The night report's figures, each returned as PNG bytes (matplotlib, Agg backend).

Every function takes tables or arrays already read (``apsnake.qa.summary``, ``images``) and
draws one figure; none reads files.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

DPI = 80


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def _limits(image: np.ndarray, lo: float = 1.0, hi: float = 99.0, symmetric: bool = False):
    finite = image[np.isfinite(image)]
    if not finite.size:
        return -1.0, 1.0
    if symmetric:
        scale = float(np.percentile(np.abs(finite - np.median(finite)), hi)) or 1.0
        centre = float(np.median(finite))
        return centre - scale, centre + scale
    vmin, vmax = (float(v) for v in np.percentile(finite, [lo, hi]))
    return (vmin, vmax) if vmax > vmin else (vmin - 1.0, vmin + 1.0)


def _time_axis(mjd):
    """Hours since the integer MJD that starts the night, and that MJD."""
    mjd = np.asarray(mjd, float)
    start = float(np.floor(np.nanmin(mjd))) if np.isfinite(mjd).any() else 0.0
    return (mjd - start) * 24.0, start


def qa_versus_time(summary: pd.DataFrame, m50: pd.DataFrame | None = None) -> bytes:
    """Seeing, zero point, depth (limiting magnitude and m50), sky level and DIA counts of
    each data ID (dots) and each visit (median, line) against time.

    ``m50``: per-visit rows (visit, m50_mag, m50_err_mag), drawn on the depth panel.
    """
    plt = _pyplot()
    data = summary[summary["visit"].notna() & summary["midpointMjdTai"].notna()].copy()
    hours, start = _time_axis(data["midpointMjdTai"])
    data["hours"] = hours
    per_visit = data.groupby("visit").median(numeric_only=True).sort_values("hours")
    sums = data.groupby("visit")[["n_dia_sources", "n_dia_positive", "n_dia_negative"]].sum(min_count=1)
    panels = [("seeing_arcsec", "seeing (arcsec)"), ("zero_point_mag", "zero point (mag)"),
              ("limiting_mag", "depth (mag)"), ("sky_level_adu", "sky (ADU)")]
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(7, 10), sharex=True)
    for ax, (column, label) in zip(axes, panels):
        ax.plot(data["hours"], data[column], ".", color="0.6", label="CCD")
        ax.plot(per_visit["hours"], per_visit[column], "o-", color="C0", label="visit median")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    depth = axes[2]
    depth.set_ylabel("5σ depth / m50 (mag)")
    if m50 is not None and len(m50):
        joined = m50.merge(per_visit[["hours"]], left_on="visit", right_index=True)
        depth.errorbar(joined["hours"], joined["m50_mag"], yerr=joined["m50_err_mag"], fmt="s",
                       color="C3", label="m50 (fakes)")
    depth.invert_yaxis()
    depth.legend(fontsize=7, loc="best")
    ax = axes[-1]
    dia_hours = per_visit["hours"].reindex(sums.index)
    for column, label, colour in (("n_dia_sources", "all", "k"), ("n_dia_positive", "positive", "C2"),
                                  ("n_dia_negative", "negative", "C1")):
        ax.plot(dia_hours, sums[column], "o-", color=colour, label=label)
    ax.set_ylabel("DiaSources / visit")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_xlabel(f"hours since MJD {start:.0f} (TAI)")
    fig.suptitle("Per-visit QA")
    fig.subplots_adjust(left=0.12, right=0.97, top=0.95, bottom=0.06, hspace=0.08)
    return _png(fig)


def completeness_curves(table: pd.DataFrame) -> bytes:
    """Recovered fraction of the fakes against injected magnitude and expected S/N, per visit
    (thin) and for the night (thick, with Clopper-Pearson errors), m50 marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, variable, label in ((axes[0], "injectedMag", "injected magnitude (AB)"),
                                (axes[1], "expectedSnr", "expected S/N")):
        rows = table[table["variable"] == variable]
        for (scope, visit), group in rows.groupby(["scope", "visit"], dropna=False, sort=True):
            group = group[group["n"] > 0]
            if group.empty:
                continue
            centre = 0.5 * (group["lo"] + group["hi"])
            if scope == "night":
                yerr = [group["fraction"] - group["err_lo"], group["err_hi"] - group["fraction"]]
                ax.errorbar(centre, group["fraction"], yerr=yerr, fmt="o-", color="k", lw=2, label="night", zorder=3)
                m50 = group["m50_mag"].iloc[0]
                if variable == "injectedMag" and np.isfinite(m50):
                    ax.axvline(m50, color="C3", ls="--", label=f"night m50 = {m50:.2f}")
            else:
                ax.plot(centre, group["fraction"], ".-", alpha=0.6, lw=1, label=f"visit {int(visit)}")
        ax.set_xlabel(label)
        ax.set_ylabel("recovered fraction")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        if variable == "expectedSnr":
            ax.set_xscale("symlog", linthresh=1.0)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Completeness of injected fakes")
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.13, wspace=0.22)
    return _png(fig)


def focal_plane(summary: pd.DataFrame, column: str = "limiting_mag", label: str = "median 5σ depth (mag)") -> bytes:
    """The 62 DECam CCDs in the focal plane; the processed ones coloured by the night's median
    of ``column``, each labelled with its name."""
    plt = _pyplot()
    from matplotlib.collections import PolyCollection

    from apsnake.instruments.decam import CCDS, TRIMMED_SHAPE, trimmed_to_focal_plane

    values = summary[summary["detector"].notna()].groupby("detector")[column].median()
    ny, nx = TRIMMED_SHAPE
    corners_x, corners_y = np.array([0, nx - 1, nx - 1, 0], float), np.array([0, 0, ny - 1, ny - 1], float)
    polygons, colours, empty = [], [], []
    for ccdnum, info in sorted(CCDS.items()):
        fx, fy = trimmed_to_focal_plane(ccdnum, corners_x, corners_y)
        polygon = np.column_stack([fx, fy])
        value = values.get(ccdnum, np.nan)
        (polygons if np.isfinite(value) else empty).append(polygon)
        if np.isfinite(value):
            colours.append(value)
    fig, ax = plt.subplots(figsize=(7, 6.5))
    ax.add_collection(PolyCollection(empty, facecolor="0.93", edgecolor="0.5", lw=0.5))
    if polygons:
        colours = np.asarray(colours)
        middle, half = 0.5 * (colours.min() + colours.max()), max(0.5 * np.ptp(colours), 0.25)
        coll = PolyCollection(polygons, array=colours, cmap="viridis", edgecolor="k", lw=0.8)
        coll.set_clim(middle - half, middle + half)  # at least 0.5 mag of range: no crowded labels
        ax.add_collection(coll)
        fig.colorbar(coll, ax=ax, label=label, shrink=0.8, format="%.2f")
    for ccdnum, info in CCDS.items():
        ax.text(info.x_mm, info.y_mm, info.name, ha="center", va="center", fontsize=6,
                color="k" if ccdnum not in values.index else "w")
    ax.set_xlim(-250, 250)
    ax.set_ylim(-250, 250)
    ax.set_aspect("equal")
    ax.set_xlabel("focal plane x (mm)")
    ax.set_ylabel("focal plane y (mm)")
    ax.set_title(f"Processed CCDs ({len(polygons)} of {len(CCDS)})")
    fig.subplots_adjust(left=0.1, right=0.98, top=0.94, bottom=0.08)
    return _png(fig)


def thumbnail_grid(thumbnails: list[tuple[str, np.ndarray]], columns: int = 8) -> bytes:
    """Downsampled difference images, one panel per data ID, on a symmetric grey scale."""
    plt = _pyplot()
    n = max(len(thumbnails), 1)
    columns = min(columns, n)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (label, image) in zip(axes.ravel(), thumbnails):
        vmin, vmax = _limits(image, hi=99.5, symmetric=True)
        ax.imshow(image, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(label, fontsize=7)
    fig.suptitle("Difference images (16 x 16 binned)")
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.35 / rows, bottom=0.01, wspace=0.05, hspace=0.2)
    return _png(fig)


def cutout_gallery(entries: list[dict], per_row: int = 2) -> bytes:
    """Science / template / difference cutouts of objects: ``entries`` of dicts with
    ``label``, ``science``, ``template``, ``difference`` (arrays or None)."""
    plt = _pyplot()
    n = max(len(entries), 1)
    per_row = min(per_row, n)
    rows = int(np.ceil(n / per_row))
    fig, axes = plt.subplots(rows, 3 * per_row, figsize=(1.6 * 3 * per_row, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, entry in enumerate(entries):
        row, col = divmod(i, per_row)
        science = entry.get("science")
        sci_limits = _limits(science) if science is not None else (0, 1)
        for j, key in enumerate(("science", "template", "difference")):
            ax = axes[row, 3 * col + j]
            image = entry.get(key)
            if image is not None:
                limits = _limits(image, symmetric=True) if key == "difference" else sci_limits
                ax.imshow(image, origin="lower", cmap="gray", vmin=limits[0], vmax=limits[1], interpolation="nearest")
            ax.set_title(f"{entry['label']}\n{key}" if j == 0 else key, fontsize=6, loc="left" if j == 0 else "center")
    fig.suptitle("New DiaObjects of the night (brightest first)")
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.55 / rows, bottom=0.01, wspace=0.05, hspace=0.45)
    return _png(fig)


def light_curves(curves: list[tuple[int, pd.DataFrame]], columns: int = 2) -> bytes:
    """DiaSource psfFlux and DiaForcedSource psfFlux against time, one panel per object
    (``curves``: (diaObjectId, ``Apdb.lightcurve`` frame))."""
    plt = _pyplot()
    n = max(len(curves), 1)
    columns = min(columns, n)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(curves):]:
        ax.set_axis_off()
    all_mjd = np.concatenate([np.asarray(c["midpointMjdTai"], float) for _, c in curves]) if curves else np.zeros(1)
    _, start = _time_axis(all_mjd)
    for ax, (object_id, curve) in zip(axes.ravel(), curves):
        hours = (np.asarray(curve["midpointMjdTai"], float) - start) * 24.0
        forced = curve["fpFlux"].notna()
        ax.errorbar(hours[forced], curve["fpFlux"][forced], yerr=curve["fpFluxErr"][forced], fmt="s", mfc="none",
                    color="C0", label="DiaForcedSource")
        detected = curve["psfFlux"].notna()
        ax.errorbar(hours[detected], curve["psfFlux"][detected], yerr=curve["psfFluxErr"][detected], fmt="o",
                    color="C3", label="DiaSource")
        ax.axhline(0, color="0.5", lw=0.5)
        n_det = int(detected.sum())
        ax.set_title(f"diaObjectId {object_id} ({n_det} DiaSources)", fontsize=8)
        ax.set_ylabel("psfFlux (nJy)")
        ax.set_xlabel(f"hours since MJD {start:.0f} (TAI)")
        ax.grid(alpha=0.3)
    if curves:
        axes.ravel()[0].legend(fontsize=7)
    fig.suptitle("Light curves of the objects with the most DiaSources")
    fig.subplots_adjust(left=0.09, right=0.98, top=1 - 0.35 / rows, bottom=0.5 / rows / 2.6 + 0.04, hspace=0.6,
                        wspace=0.25)
    return _png(fig)
