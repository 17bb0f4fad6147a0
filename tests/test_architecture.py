"""Architecture of the ``mlo`` package, read from its source (nothing is imported).

* No import cycle between modules of ``mlo``: every import statement counts — at
  module level, under ``if TYPE_CHECKING:`` and inside functions, relative
  (``from . import x``, ``from .x import y``) and absolute (``import mlo.x``,
  ``from mlo.x import y``). A failure prints each cycle as ``a -> b -> c -> a``.
* ``mlo/hypergrad.py``, ``mlo/monitor.py`` and ``mlo/callbacks.py`` do not import
  ``mlo.engine`` in any form.
* The checker itself: the cycle finder on synthetic graphs (a cycle found, a DAG
  passes) and the import reader on a synthetic package with every import form.

The graph code lives in ``benchmarks/code_shape.py`` (loaded here from its path), which
also prints the size picture; :func:`size_report` prints the longest functions of
``mlo/`` and its line counts per file — a report, not a check
(``pytest -s tests/test_architecture.py -k size`` shows it).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_code_shape():
    """``benchmarks/code_shape.py`` as a module (``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location("code_shape", ROOT / "benchmarks" / "code_shape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cs = _load_code_shape()

#: Modules that must not depend on the engine (the engine depends on them).
NOT_ON_ENGINE = ("mlo.hypergrad", "mlo.monitor", "mlo.callbacks")


# ------------------------------------------------------------- the checker
def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert cs.find_cycles(graph) == [["a", "b", "c", "a"]]
    assert cs.format_cycle(cs.find_cycles(graph)[0]) == "a -> b -> c -> a"
    # two cycles sharing an edge, found from their members; a self-import
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"a"}, "s": {"s"}}
    assert cs.find_cycles(graph) == [["s", "s"], ["a", "b", "a"], ["a", "b", "c", "a"]]
    assert cs.cycle_components(graph) == [["a", "b", "c"], ["s"]]
    # two separate cycles
    graph = {"x": {"y"}, "y": {"x"}, "p": {"q"}, "q": {"r"}, "r": {"p"}}
    assert cs.find_cycles(graph) == [["x", "y", "x"], ["p", "q", "r", "p"]]


def test_cycle_finder_passes_a_dag():
    graph = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set(), "e": {"a", "d"}}
    assert cs.find_cycles(graph) == []
    assert cs.cycle_components(graph) == []
    assert cs.find_cycles({}) == []


def _write(root: Path, files: dict) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_import_reader_on_every_import_form(tmp_path):
    _write(tmp_path, {
        "mlo/__init__.py": "from .a import A\nfrom . import b\n",
        "mlo/a.py": "import torch\nfrom . import b\nfrom .c import thing\n",
        "mlo/b.py": "import mlo.c\nimport mlo.sub.d as d\n",
        "mlo/c.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from mlo.a import A\nelse:\n    import mlo.b\n"),
        "mlo/sub/__init__.py": "from .. import a\nfrom .d import y\n",
        "mlo/sub/d.py": ("import typing\nif typing.TYPE_CHECKING:\n    import mlo\n"
                         "def f():\n    from mlo.sub import e\n    from ..c import thing\n"),
        "mlo/sub/e.py": "from mlo import sub\nfrom mlo.sub import nothing_here\nfrom mlo_other import z\n",
    })
    assert set(cs.module_names(tmp_path)) == {"mlo", "mlo.a", "mlo.b", "mlo.c", "mlo.sub",
                                              "mlo.sub.d", "mlo.sub.e"}
    assert cs.import_edges(tmp_path) == {
        ("mlo", "mlo.a"): {"module"}, ("mlo", "mlo.b"): {"module"},
        ("mlo.a", "mlo.b"): {"module"}, ("mlo.a", "mlo.c"): {"module"},
        ("mlo.b", "mlo.c"): {"module"}, ("mlo.b", "mlo.sub.d"): {"module"},
        ("mlo.c", "mlo.a"): {"type_checking"}, ("mlo.c", "mlo.b"): {"module"},
        ("mlo.sub", "mlo.a"): {"module"}, ("mlo.sub", "mlo.sub.d"): {"module"},
        ("mlo.sub.d", "mlo"): {"type_checking"}, ("mlo.sub.d", "mlo.sub.e"): {"function"},
        ("mlo.sub.d", "mlo.c"): {"function"},
        ("mlo.sub.e", "mlo.sub"): {"module"},
    }
    cycles = [cs.format_cycle(c) for c in cs.find_cycles(cs.import_graph(tmp_path))]
    assert "mlo.a -> mlo.c -> mlo.a" in cycles                      # through TYPE_CHECKING
    assert "mlo.sub -> mlo.sub.d -> mlo.sub.e -> mlo.sub" in cycles   # through a function


# ------------------------------------------------------------- the package
def test_no_import_cycle_inside_mlo():
    graph = cs.import_graph(ROOT)
    assert "mlo.engine" in graph and "mlo.compare.graphs" in graph
    cycles = cs.find_cycles(graph)
    if cycles:
        comps = cs.cycle_components(graph)
        lines = [f"{len(comps)} group(s) of mutually importing modules in mlo/:"]
        lines += [f"  {len(c)} modules: {', '.join(c)}" for c in comps]
        lines += ["cycles:"] + [f"  {cs.format_cycle(c)}" for c in cycles]
        pytest.fail("\n".join(lines), pytrace=False)


@pytest.mark.parametrize("module", NOT_ON_ENGINE)
def test_module_does_not_import_the_engine(module):
    edges = cs.import_edges(ROOT)
    kinds = edges.get((module, "mlo.engine"))
    assert not kinds, f"{module} imports mlo.engine ({', '.join(sorted(kinds))} import)"


# ------------------------------------------------------------ size report
def size_report(top: int = 15) -> str:
    """The longest functions in ``mlo/`` (lines, name, file) and lines per file."""
    lines = [f"{top} longest functions in mlo/:"]
    lines += [f"  {n:5d}  {name}  ({path})" for n, name, path in cs.function_lengths(ROOT, ["mlo"])[:top]]
    counts = cs.line_counts(ROOT, ["mlo"])["mlo"]
    lines.append(f"lines per file in mlo/ ({len(counts)} files, {sum(n for _, n in counts)} lines):")
    lines += [f"  {n:6d}  {path}" for path, n in sorted(counts, key=lambda t: -t[1])]
    return "\n".join(lines)


def test_size_report():
    """Prints :func:`size_report` (a picture for notes, not a limit)."""
    text = size_report()
    print(text)
    assert "mlo/engine.py" in text
