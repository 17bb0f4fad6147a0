"""Graph validation through ``mlo.Engine``: every error names the problems involved,
and hypergradient paths of the MLO-MAE graph."""
from __future__ import annotations

import re

import pytest
import torch

import mlo

DT = torch.float64


class Node(mlo.Problem):
    """``loss(self)`` decides what the problem reads; default: ½‖x‖²."""

    def __init__(self, name, loss=None, method="unrolled"):
        super().__init__(name, params={"x": torch.ones(2, dtype=DT)}, optimizer_kwargs={"lr": 0.1},
                         config=mlo.ProblemConfig(method=method))
        self._loss = loss or (lambda s: 0.5 * (s.params["x"] ** 2).sum())

    def training_step(self, batch):
        return self._loss(self)


def nodes(*names):
    return [Node(n) for n in names]


def raises(exc, *words):
    """``pytest.raises`` whose message must contain every word (problem names)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


def test_unknown_name():
    up, lo = nodes("up", "lo")
    with raises(mlo.GraphError, "ghost", "u2l"):
        mlo.Engine([up, lo], {"u2l": {"up": ["ghost"]}})
    with raises(mlo.GraphError, "ghost", "l2u"):
        mlo.Engine([up, lo], {"u2l": {"up": ["lo"]}, "l2u": {"ghost": ["up"]}})
    with raises(mlo.GraphError, "phantom", "u2l"):                   # as a key
        mlo.Engine([up, lo], {"u2l": {"phantom": ["lo"]}})
    with raises(mlo.GraphError, "phantom", "l2u"):                   # as a value
        mlo.Engine([up, lo], {"u2l": {"up": ["lo"]}, "l2u": {"lo": ["up", "phantom"]}})


def test_duplicate_name():
    with raises(mlo.GraphError, "duplicate", "twin"):
        mlo.Engine([Node("twin"), Node("twin")], {"u2l": {"twin": ["twin"]}})


def test_problem_not_in_engine():
    up, lo, stranger = nodes("up", "lo", "stranger")
    with raises(mlo.GraphError, "stranger", "not in this engine"):
        mlo.Engine([up, lo], {"u2l": {up: [lo, stranger]}})
    with raises(mlo.GraphError, "stranger", "not in this engine"):
        mlo.Engine([up, lo], {"u2l": {up: [lo]}, "l2u": {stranger: [up]}})


def cycle_in(message):
    """The cycle ``x -> y -> ... -> x`` a GraphError message reports, as a list of names."""
    m = re.search(r"cycle: (\w+(?: -> \w+)+)", message)
    assert m, message
    return m.group(1).split(" -> ")


def test_cycle():
    a, b, c, d = nodes("alpha", "beta", "gamma", "delta")
    # alpha above beta above gamma, and gamma above alpha; delta hangs below alpha
    with raises(mlo.GraphError, "cycle", "alpha", "beta", "gamma") as info:
        mlo.Engine([a, b, c, d], {"u2l": {"alpha": ["beta", "delta"], "beta": ["gamma"]},
                                  "l2u": {"alpha": ["gamma"], "delta": ["alpha"]}})
    cyc = cycle_in(str(info.value))
    assert cyc[0] == cyc[-1] and sorted(cyc[:-1]) == ["alpha", "beta", "gamma"]   # delta is not in it
    with raises(mlo.GraphError, "cycle", "alpha", "beta") as info:   # each below the other
        mlo.Engine([a, b], {"u2l": {"alpha": ["beta"], "beta": ["alpha"]}})
    assert sorted(cycle_in(str(info.value))[:-1]) == ["alpha", "beta"]
    with raises(mlo.GraphError, "cycle", "alpha", "beta"):           # through l2u only
        mlo.Engine([a, b], {"l2u": {"alpha": ["beta"], "beta": ["alpha"]}})


def test_self_dependency():
    a, b = nodes("a", "b")
    with raises(mlo.GraphError, "'a'", "itself"):
        mlo.Engine([a, b], {"u2l": {"a": ["b", "a"]}})
    with raises(mlo.GraphError, "'b'", "itself"):
        mlo.Engine([a, b], {"u2l": {"a": ["b"]}, "l2u": {"b": ["b"]}})


def test_unconnected_problem():
    """A problem no upper level reaches (connected to nothing) is an error naming it."""
    up, lo, alone, lost = nodes("up", "lo", "alone", "lost")
    with raises(mlo.GraphError, "alone", "not connected"):
        mlo.Engine([up, lo, alone], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    with raises(mlo.GraphError, "'alone'", "'lost'", "not connected") as info:   # all of them
        mlo.Engine([up, alone, lo, lost], {"u2l": {up: [lo]}})
    assert "'up'" not in str(info.value) and "'lo'" not in str(info.value)


def test_unknown_method_name():
    up, lo = Node("up"), Node("lo", method="newton_magic")
    with raises(mlo.GraphError, "lo", "newton_magic", "unrolled"):   # lists the choices
        mlo.Engine([up, lo], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})


def test_bad_dependency_kind():
    up, lo = nodes("up", "lo")
    with raises(mlo.GraphError, "upper2lower", "u2l", "l2u"):
        mlo.Engine([up, lo], {"upper2lower": {up: [lo]}})


def test_undeclared_read_at_runtime():
    """``lo`` reads ``side`` in its loss, but only ``up`` is declared above it."""
    side = Node("side")
    up = Node("up", lambda s: (s.lo.params["x"] ** 2).sum() + 0 * s.params["x"].sum())
    lo = Node("lo", lambda s: ((s.params["x"] - s.up.params["x"] - s.side.params["x"]) ** 2).sum())
    up.lo, lo.up, lo.side = lo, up, side
    side2 = Node("side2")
    eng = mlo.Engine([up, lo, side, side2], {"u2l": {up: [lo], side: [side2]}, "l2u": {lo: [up]}})
    with raises(mlo.GraphError, "'lo'", "'side'", "no dependency declares"):
        eng.step()


def test_read_of_problem_outside_engine():
    outside = Node("outside")
    up = Node("up", lambda s: (s.lo.params["x"] ** 2).sum() + 0 * s.params["x"].sum())
    lo = Node("lo", lambda s: ((s.params["x"] - s.outside.params["x"]) ** 2).sum())
    up.lo, lo.outside = lo, outside
    eng = mlo.Engine([up, lo], {"l2u": {lo: [up]}})
    with raises(mlo.GraphError, "'lo'", "'outside'", "not in this engine"):
        eng.step()


def test_training_step_not_scalar():
    up = Node("up", lambda s: s.lo.params["x"] ** 2 + 0 * s.params["x"])   # a vector
    lo = Node("lo")
    up.lo = lo
    eng = mlo.Engine([up, lo], {"l2u": {lo: [up]}})
    with raises(TypeError, "'up'", "scalar"):
        eng.run(1)


def test_loss_not_depending_on_own_variables():
    up = Node("up", lambda s: (s.lo.params["x"] ** 2).sum() + (s.params["x"] ** 2).sum())
    lo = Node("lo", lambda s: (s.up.params["x"] ** 2).sum())   # reads up, ignores its own x
    up.lo, lo.up = lo, up
    eng = mlo.Engine([up, lo], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    with raises(RuntimeError, "'lo'", "does not depend on its own variables"):
        eng.step()


def test_loss_not_depending_on_own_variables_untracked_reads():
    up = Node("up", lambda s: (s.params["x"] ** 2).sum())
    lo = Node("lo", lambda s: (s.up.params["x"] ** 2).sum())   # no l2u: lo is off every path
    lo.up = up
    eng = mlo.Engine([up, lo], {"u2l": {up: [lo]}})
    with raises(RuntimeError, "'lo'", "does not depend on its own variables"):
        eng.step()


def test_mlo_mae_paths():
    pretrain, finetune, mask = nodes("pretrain", "finetune", "mask")
    eng = mlo.Engine([pretrain, finetune, mask],
                     {"u2l": {mask: [pretrain]}, "l2u": {pretrain: [finetune, mask], finetune: [mask]}})
    assert set(eng.graph.paths("mask")) == {("mask", "pretrain", "finetune", "mask"),
                                            ("mask", "pretrain", "mask")}
    assert len(eng.graph.paths("mask")) == 2
    assert eng.graph.paths("finetune") == [] and eng.graph.paths("pretrain") == []
    assert eng.graph.order == ["pretrain", "finetune", "mask"]


def test_dependencies_by_name_equal_by_object():
    a1, b1 = nodes("a", "b")
    a2, b2 = nodes("a", "b")
    g1 = mlo.Engine([a1, b1], {"u2l": {a1: [b1]}, "l2u": {b1: [a1]}}).graph
    g2 = mlo.Engine([a2, b2], {"u2l": {"a": ["b"]}, "l2u": {"b": ["a"]}}).graph
    assert g1.paths("a") == g2.paths("a") == [("a", "b", "a")]
