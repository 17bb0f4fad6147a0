"""Printing and saving a :class:`mlo.compare.runner.Report`: text tables, CSV, PNG."""
from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict
from typing import List

from .runner import Report

__all__ = ["format_table", "format_paths", "format_report", "write_csv", "plot", "save"]


def _fmt(x: float, spec: str) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(header: List[str], rows: List[List[str]], right_from: int) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if i >= right_from else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def format_table(rep: Report) -> str:
    """method | settings | cosine | rel. error | time [ms] | peak mem [KiB]."""
    header = ["method", "settings", "cosine", "rel. error", "time [ms]", "peak mem [KiB]"]
    rows = [[r.setting.method, r.setting.settings or "-", _fmt(r.cosine, ".6f"),
             _fmt(r.rel_error, ".2e"), _fmt(r.time_s * 1e3, ".2f"), _fmt(r.peak_bytes / 1024, ".1f")]
            for r in rep.rows]
    return _table(header, rows, right_from=2)


def format_paths(rep: Report) -> str:
    """Per-path breakdown: share ‖term‖/‖Σ terms‖, cosine and rel. error vs the exact term."""
    if len(rep.paths) < 2:
        return ""
    header = ["method", "settings", "path", "share", "cosine", "rel. error"]
    rows = []
    for r in rep.rows:
        for p in r.paths:
            rows.append([r.setting.method, r.setting.settings or "-", " → ".join(p.path),
                         _fmt(p.share, ".3f"), _fmt(p.cosine, ".6f"), _fmt(p.rel_error, ".2e")])
    return _table(header, rows, right_from=3)


def format_report(rep: Report) -> str:
    head = [f"== {rep.name}: {rep.description}" if rep.description else f"== {rep.name}",
            f"   reference: {rep.reference}; evaluated after {rep.warmup} lower steps; "
            f"time = median of {rep.repeats}; peak mem = torch CPU allocator peak during one "
            f"hypergradient (profiler allocation events)"]
    parts = ["\n".join(head), format_table(rep)]
    paths = format_paths(rep)
    if paths:
        parts += [f"per-path breakdown ({len(rep.paths)} paths; share = ‖term‖ / ‖sum of terms‖ "
                  f"of the same method):", paths]
    parts.append(f"({rep.name}: {len(rep.rows)} settings in {rep.seconds:.1f}s)")
    return "\n".join(parts)


def write_csv(rep: Report, path: str) -> List[str]:
    """Writes ``path`` (one row per setting) and, for several paths, ``<stem>_paths.csv``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["graph", "method", "settings", "curve", "steps", "options", "cosine",
                    "rel_error", "time_ms", "peak_mem_bytes"])
        for r in rep.rows:
            s = r.setting
            w.writerow([rep.name, s.method, s.settings, s.curve_name, s.steps, dict(s.options),
                        repr(r.cosine), repr(r.rel_error), repr(r.time_s * 1e3), repr(r.peak_bytes)])
    written = [path]
    if len(rep.paths) > 1:
        stem, ext = os.path.splitext(path)
        ppath = f"{stem}_paths{ext or '.csv'}"
        with open(ppath, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["graph", "method", "settings", "path", "share", "cosine", "rel_error"])
            for r in rep.rows:
                for p in r.paths:
                    w.writerow([rep.name, r.setting.method, r.setting.settings, "->".join(p.path),
                                repr(p.share), repr(p.cosine), repr(p.rel_error)])
        written.append(ppath)
    return written


def _place_labels(fig, ax, points, fontsize: float = 7.0) -> None:
    """Annotates ``points`` (``[(x, y, text, color)]``, data coordinates) without overlap.

    Greedy: each label takes the first candidate offset (8 directions, growing radius)
    whose box overlaps no other label, no marker and not the legend, and stays inside
    the axes; a label pushed away from its point gets a thin leader line. Points are
    taken left to right so that neighbours compete in a fixed order.
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    axes_box = ax.get_window_extent(renderer)
    pt_px = fig.dpi / 72.0
    marker = 5 * pt_px
    obstacles = [(float(px) - marker, float(py) - marker, float(px) + marker, float(py) + marker)
                 for px, py in (to_px((x, y)) for x, y, _, _ in points)]
    legend = ax.get_legend()
    if legend is not None:
        b = legend.get_window_extent(renderer)
        obstacles.append((b.x0, b.y0, b.x1, b.y1))

    def free(box):
        x0, y0, x1, y1 = box
        if x0 < axes_box.x0 or x1 > axes_box.x1 or y0 < axes_box.y0 or y1 > axes_box.y1:
            return False
        return all(x1 <= a0 or x0 >= a1 or y1 <= b0 or y0 >= b1 for a0, b0, a1, b1 in obstacles)

    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for x, y, text, color in sorted(points, key=lambda p: (p[0], p[1])):
        px, py = (float(v) for v in to_px((x, y)))
        t = ax.text(0, 0, text, fontsize=fontsize)
        bb = t.get_window_extent(renderer)
        t.remove()
        w, h = bb.width, bb.height
        choice = None
        for radius in (4, 9, 16, 26, 40, 60):
            for dx, dy in directions:
                ox = px + dx * radius * pt_px - (w if dx < 0 else w / 2 if dx == 0 else 0)
                oy = py + dy * radius * pt_px - (h if dy < 0 else h / 2 if dy == 0 else 0)
                box = (ox, oy, ox + w, oy + h)
                if free(box):
                    choice = (box, radius)
                    break
            if choice:
                break
        if choice is None:              # crowded: keep it readable nearby rather than drop it
            choice = ((px + 4 * pt_px, py + 4 * pt_px, px + 4 * pt_px + w, py + 4 * pt_px + h), 4)
        (x0, y0, x1, y1), radius = choice
        obstacles.append((x0, y0, x1, y1))
        offset = ((x0 - px) / pt_px, (y0 - py) / pt_px)
        ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", fontsize=fontsize,
                    color=color, ha="left", va="bottom",
                    arrowprops=(dict(arrowstyle="-", color=color, lw=0.5, alpha=0.6,
                                     shrinkA=0, shrinkB=3) if radius > 9 else None))


def plot(rep: Report, path: str, floor: float = 1e-17) -> str:
    """Relative error vs time per hypergradient, log-log, one curve per method curve.

    Each point is labelled with its setting (``K=5``, ``iters=12``, ``ε=0.01``...) in
    its curve's colour, placed so that no two labels overlap (:func:`_place_labels`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: "OrderedDict[str, list]" = OrderedDict()
    for r in rep.rows:
        curves.setdefault(r.setting.curve_name, []).append(r)
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    points = []
    for name, rows in curves.items():
        rows = sorted(rows, key=lambda r: r.time_s)
        xs = [r.time_s * 1e3 for r in rows]
        ys = [max(r.rel_error, floor) for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        for r, x, y in zip(rows, xs, ys):
            points.append((x, y, r.setting.settings.split(" ")[0] or name, line.get_color()))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("time per hypergradient [ms] (median)")
    ax.set_ylabel("relative error vs reference")
    ax.set_title(f"{rep.name}: hypergradient error vs cost", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _place_labels(fig, ax, points)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(rep: Report, out_dir: str) -> List[str]:
    """CSV(s) and PNG for ``rep`` under ``out_dir``; returns the paths written."""
    files = write_csv(rep, os.path.join(out_dir, f"compare_{rep.name}.csv"))
    files.append(plot(rep, os.path.join(out_dir, f"compare_{rep.name}.png")))
    return files
