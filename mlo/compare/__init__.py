"""Compare hypergradient approximations: accuracy against an exact reference, time, memory.

Any graph can be compared from Python::

    from mlo.compare import Setting, compare, format_report, save

    def factory(method, options):          # a fresh engine, same initial state each call
        ...                                # lowers use `method`/`options`; the upper
        return engine, "upper"             # must never become ready (unroll_steps=HOLD)

    rep = compare(factory,
                  methods=[Setting("cg", {"max_iter": 10}), Setting("unrolled", steps=20)],
                  reference=Setting("cg", {"tol": 1e-12, "max_iter": 1000}),
                  warmup=100)
    print(format_report(rep)); save(rep, "out/")

The protocol (same state for every method, unrolled windows ending at it, the
reference at exactly the evaluated state, what time and memory mean) is described
in :mod:`mlo.compare.runner`. Built-in graphs (``ridge``, ``logreg``,
``three_level_quadratic``) are in :mod:`mlo.compare.graphs`; ``python -m mlo.compare`` runs them.
"""
from .runner import PathRow, Report, Row, Setting, compare, peak_memory
from .graphs import (HOLD, GraphSpec, available_graphs, default_settings, get_graph,
                     register_graph)
from .report import format_paths, format_report, format_table, plot, save, write_csv
from .cli import main, run_graph

__all__ = ["Setting", "Row", "PathRow", "Report", "compare", "peak_memory", "HOLD", "GraphSpec",
           "available_graphs", "default_settings", "get_graph", "register_graph", "format_table",
           "format_paths", "format_report", "write_csv", "plot", "save", "main", "run_graph"]
