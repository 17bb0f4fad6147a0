"""Command line of the comparison tool: ``python -m mlo.compare``.

``--graphs`` takes built-in names and plug-in graphs (``mlo.compare_graphs`` entry
points, e.g. ``mlo_mae``; see :mod:`mlo.compare.graphs`). An unknown name, or a
plug-in that fails to import, ends the run before anything is computed with a
one-line error that lists the available graphs. A deprecated old name (``p4``) still
runs its graph, with a note on stderr naming the new one.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence

from .graphs import DEPRECATED_NAMES, GraphSpec, available_graphs, get_graph
from .report import format_report, save
from .runner import Report, compare

__all__ = ["main", "run_graph"]


def run_graph(name: str, quick: bool = False, repeats: int = 5, memory: bool = True,
              spec: Optional[GraphSpec] = None) -> Report:
    """Builds the graph ``name`` (unless ``spec`` is given) and runs its default settings."""
    spec = spec or get_graph(name, quick=quick)
    return compare(spec.factory, spec.settings, spec.reference, warmup=spec.warmup,
                   repeats=repeats, memory=memory, name=spec.name,
                   description=spec.description, reference_name=spec.reference_name)


def main(argv: Optional[Sequence[str]] = None) -> List[Report]:
    ap = argparse.ArgumentParser(
        prog="python -m mlo.compare",
        description="Compare hypergradient methods (unrolled, Neumann, CG, finite differences) "
                    "against an exact reference on built-in and plug-in graphs: error, time, memory.")
    default = ["ridge", "logreg", "three_level_quadratic"]
    ap.add_argument("--graphs", nargs="+", default=default,
                    help=f"graphs to run (available: {', '.join(available_graphs())}; "
                         f"default: {' '.join(default)})")
    ap.add_argument("--out", default="compare_out", help="directory for CSV and PNG files")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    ap.add_argument("--quick", action="store_true", help="fewer settings (smoke run)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = ap.parse_args(argv)
    known = available_graphs()
    unknown = [n for n in args.graphs if n not in known and n not in DEPRECATED_NAMES]
    if unknown:
        ap.exit(2, f"{ap.prog}: error: unknown graph{'s' if len(unknown) > 1 else ''} "
                   f"{', '.join(unknown)}; available: {', '.join(known)}\n")
    t0 = time.perf_counter()
    reports = []
    for name in args.graphs:
        if name in DEPRECATED_NAMES and name not in known:
            print(f"{ap.prog}: note: graph name {name!r} is deprecated; use "
                  f"{DEPRECATED_NAMES[name]!r}", file=sys.stderr)
        try:
            spec = get_graph(name, quick=args.quick)
        except ImportError as e:          # a plug-in or an optional dependency is missing
            ap.exit(1, f"{ap.prog}: error: {' '.join(str(e).split())}\n")
        rep = run_graph(name, quick=args.quick, repeats=args.repeats, memory=not args.no_memory,
                        spec=spec)
        print(format_report(rep))
        print("wrote " + ", ".join(save(rep, args.out)))
        print()
        reports.append(rep)
    print(f"total {time.perf_counter() - t0:.1f}s")
    return reports
