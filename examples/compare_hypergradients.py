"""Compare hypergradient approximations on built-in and plug-in graphs (wraps ``mlo.compare``).

For each graph it computes the upper problem's hypergradient with every method ×
settings — unrolled K ∈ {1, 5, 20, 100}, Neumann K × α, CG iterations, finite
differences ε — and an exact reference at the same lower state, then prints a
table (cosine, relative error, median time, peak memory), a per-path breakdown
for multilevel graphs, and writes CSV + PNG (error vs cost, log-log)::

    python examples/compare_hypergradients.py        # ridge, logreg, three_level_quadratic
    python examples/compare_hypergradients.py --graphs three_level_quadratic --out out/ --repeats 3
    python examples/compare_hypergradients.py --graphs mlo_mae     # tiny MLO-MAE (plug-in)
    python -m mlo.compare --help                                   # the same tool

``mlo_mae`` is a tiny float64 MLO-MAE built from ``problems`` (``problems/compare_graphs.py``)
with a per-path breakdown of the mask hypergradient; ``mlo`` cannot import ``problems``,
so it is a plug-in: the ``mlo.compare_graphs`` entry point declared in ``setup.cfg``
(``pip install -e .`` registers it). Other packages add graphs the same way.

Your own graph, from Python::

    from mlo.compare import Setting, compare, format_report, save
    rep = compare(factory, methods=[Setting("cg", {"max_iter": 10}),
                                    Setting("unrolled", steps=20)],
                  reference=Setting("cg", {"tol": 1e-12, "max_iter": 1000}), warmup=100)
    print(format_report(rep)); save(rep, "out/")

where ``factory(method, options) -> (engine, upper_name)`` builds a fresh engine whose
lower problems use ``method`` and whose upper never becomes ready (see
``mlo/compare/runner.py`` for the protocol).
"""
from __future__ import annotations

from mlo.compare import main

if __name__ == "__main__":
    main()
