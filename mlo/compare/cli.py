"""Command line of the comparison tool: ``python -m mlo.compare``."""
from __future__ import annotations

import argparse
import time
from typing import List, Optional, Sequence

from .graphs import available_graphs, get_graph
from .report import format_report, save
from .runner import Report, compare

__all__ = ["main", "run_graph"]


def run_graph(name: str, quick: bool = False, repeats: int = 5, memory: bool = True) -> Report:
    """Builds the registered graph ``name`` and runs its default settings."""
    spec = get_graph(name, quick=quick)
    return compare(spec.factory, spec.settings, spec.reference, warmup=spec.warmup,
                   repeats=repeats, memory=memory, name=spec.name,
                   description=spec.description, reference_name=spec.reference_name)


def main(argv: Optional[Sequence[str]] = None) -> List[Report]:
    ap = argparse.ArgumentParser(
        prog="python -m mlo.compare",
        description="Compare hypergradient methods (unrolled, Neumann, CG, finite differences) "
                    "against an exact reference on built-in graphs: error, time, memory.")
    ap.add_argument("--graphs", nargs="+", default=["ridge", "logreg", "p4"],
                    help=f"graphs to run (registered: {', '.join(available_graphs())})")
    ap.add_argument("--out", default="compare_out", help="directory for CSV and PNG files")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    ap.add_argument("--quick", action="store_true", help="fewer settings (smoke run)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    reports = []
    for name in args.graphs:
        rep = run_graph(name, quick=args.quick, repeats=args.repeats, memory=not args.no_memory)
        print(format_report(rep))
        print("wrote " + ", ".join(save(rep, args.out)))
        print()
        reports.append(rep)
    print(f"total {time.perf_counter() - t0:.1f}s")
    return reports
