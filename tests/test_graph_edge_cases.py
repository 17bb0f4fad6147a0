"""Graph validation edge cases (complements ``test_graph.py``) and the one-problem engine.

* contradictory edges: ``u2l`` and ``l2u`` relating the same two problems in opposite
  directions (directly, or closing a longer loop) are a cycle;
* self-loops, also in a one-problem engine and with Problem objects;
* a problem listed twice under one key;
* a one-problem engine is plain training: no paths, no windows, no hypergradient,
  the trajectory of a torch.optim loop;
* reads that no dependency declares — from a training step, from
  ``optimizer_hyperparameters()``, from ``engine.gradient()``, of a problem only
  *transitively* related, of a look-alike outside the engine — raise a
  ``GraphError`` naming the reader and the problem read.
"""
from __future__ import annotations

import re

import pytest
import torch

import mlo

DT = torch.float64


class Node(mlo.Problem):
    """``loss(self, batch)`` decides what the problem reads; default: ½‖x‖²."""

    def __init__(self, name, loss=None, hyper=None, **kw):
        kw.setdefault("optimizer_kwargs", {"lr": 0.1})
        super().__init__(name, params={"x": torch.tensor([1.0, -2.0], dtype=DT)}, **kw)
        self._loss = loss or (lambda s, b: 0.5 * (s.params["x"] ** 2).sum())
        self._hyper = hyper

    def training_step(self, batch):
        return self._loss(self, batch)

    def optimizer_hyperparameters(self):
        return self._hyper(self) if self._hyper else None


def raises(exc, *words):
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


def x(p):
    return p.params["x"]


# ------------------------------------------------------------ contradictions
def test_u2l_and_l2u_in_opposite_directions_is_a_cycle():
    a, b = Node("a"), Node("b")
    # u2l says b is below a; l2u {a: [b]} says a is below b
    with raises(mlo.GraphError, "cycle", "a", "b") as info:
        mlo.Engine([a, b], {"u2l": {a: [b]}, "l2u": {a: [b]}})
    cyc = re.search(r"cycle: (\w+(?: -> \w+)+)", str(info.value)).group(1).split(" -> ")
    assert cyc[0] == cyc[-1] and sorted(cyc[:-1]) == ["a", "b"]
    with raises(mlo.GraphError, "cycle", "a", "b"):          # by name, keys swapped
        mlo.Engine([a, b], {"u2l": {"b": ["a"]}, "l2u": {"b": ["a"]}})


def test_contradiction_closing_a_longer_loop():
    """T above M above B (u2l), but l2u {T: [B]} puts T below B."""
    T, M, B, side = Node("top"), Node("mid"), Node("bot"), Node("side")
    with raises(mlo.GraphError, "cycle", "top", "mid", "bot") as info:
        mlo.Engine([T, M, B, side], {"u2l": {T: [M, side], M: [B]}, "l2u": {T: [B]}})
    cyc = re.search(r"cycle: (\w+(?: -> \w+)+)", str(info.value)).group(1).split(" -> ")
    assert sorted(cyc[:-1]) == ["bot", "mid", "top"]          # 'side' is not part of it


def test_consistent_duplicate_declaration_is_fine_but_a_repeated_entry_is_not():
    a, b = Node("a"), Node("b")
    eng = mlo.Engine([a, b], {"u2l": {a: [b]}, "l2u": {b: [a]}})
    assert eng.graph.paths("a") == [("a", "b", "a")] and eng.graph.lowers("a") == ["b"]
    with raises(mlo.GraphError, "u2l", "'a'", "'b'", "twice"):
        mlo.Engine([a, b], {"u2l": {a: [b, "b"]}})
    with raises(mlo.GraphError, "l2u", "'b'", "'a'", "twice"):
        mlo.Engine([a, b], {"u2l": {a: [b]}, "l2u": {b: [a, a]}})


# ---------------------------------------------------------------- self-loops
@pytest.mark.parametrize("kind", ["u2l", "l2u"])
def test_self_loop_in_a_one_problem_engine(kind):
    a = Node("solo")
    with raises(mlo.GraphError, kind, "'solo'", "itself"):
        mlo.Engine([a], {kind: {a: [a]}})
    with raises(mlo.GraphError, kind, "'solo'", "itself"):
        mlo.Engine([a], {kind: {"solo": a}})                 # a single problem, not a list


def test_self_loop_among_valid_edges():
    a, b, c = Node("a"), Node("b"), Node("c")
    with raises(mlo.GraphError, "l2u", "'c'", "itself"):
        mlo.Engine([a, b, c], {"u2l": {a: [b], b: [c]}, "l2u": {c: [a, c]}})


# ------------------------------------------------------- one-problem engine
@pytest.mark.parametrize("deps", [None, {}, {"u2l": {}, "l2u": {}}])
def test_single_problem_is_plain_training(deps, measured):
    """Adam (non-default hyperparameters) over cycled batches: the engine's trajectory
    equals a plain torch.optim loop; no paths, no windows, no hypergradient."""
    batches = [torch.tensor([0.5, 1.0], dtype=DT), torch.tensor([-1.0, 2.0], dtype=DT),
               torch.tensor([1.5, -0.5], dtype=DT)]
    f = lambda w, b: torch.log(torch.cosh(w * b - 1)).sum() + 0.1 * (w ** 4).sum()  # noqa: E731
    kw = dict(lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.01, amsgrad=True)
    p = Node("solo", lambda s, b: f(s.params["x"], b), optimizer=torch.optim.Adam, optimizer_kwargs=kw,
             data=batches)
    eng = mlo.Engine([p], deps)
    assert eng.graph.order == ["solo"] and eng.graph.paths("solo") == []
    ref = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=DT))
    opt = torch.optim.Adam([ref], **kw)
    errs = []
    for it in range(7):
        out = eng.gradient("solo", batch=batches[it % 3])
        assert set(out) == {"loss", "grad"}                  # no "own", no "paths"
        eng.step()
        assert not eng.open_windows() and p._run.iterates is None
        ref.grad, = torch.autograd.grad(f(ref, batches[it % 3]), ref)
        errs.append(rel_max(out["grad"]["x"], ref.grad))
        opt.step()
        errs.append(rel_max(p.module.x.detach(), ref.detach()))
    assert eng.counts() == {"solo": 7} and p.ready_count == 7 and eng.iteration == 7
    measured("one-problem engine vs plain torch.optim.Adam loop (gradients, trajectory)", max(errs), 1e-14)


def rel_max(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------ undeclared reads
def test_top_reads_its_lower_without_l2u():
    """u2l {up: [lo]} lets lo read up — not up read lo."""
    up = Node("up", lambda s, b: (x(s.lo) ** 2).sum() + (x(s) ** 2).sum())
    lo = Node("lo", lambda s, b: ((x(s) - x(s.up)) ** 2).sum())
    up.lo, lo.up = lo, up
    eng = mlo.Engine([up, lo], {"u2l": {up: [lo]}})
    with raises(mlo.GraphError, "'up'", "'lo'", "no dependency declares", "l2u"):
        eng.step()


def test_lower_reads_its_upper_declared_only_as_l2u():
    up = Node("up", lambda s, b: (x(s.lo) ** 2).sum() + (x(s) ** 2).sum())
    lo = Node("lo", lambda s, b: ((x(s) - x(s.up)) ** 2).sum())
    up.lo, lo.up = lo, up
    eng = mlo.Engine([up, lo], {"l2u": {lo: [up]}})
    with raises(mlo.GraphError, "'lo'", "'up'", "no dependency declares", "u2l"):
        eng.step()


def test_read_of_a_problem_related_only_transitively():
    """T above M above B, but T reads B's variables without l2u {B: [T]}."""
    T = Node("T", lambda s, b: (x(s.B) ** 2).sum() + (x(s.M) ** 2).sum() + 0 * x(s).sum())
    M = Node("M", lambda s, b: ((x(s) - x(s.T)) ** 2).sum())
    B = Node("B", lambda s, b: ((x(s) - x(s.M)) ** 2).sum())
    T.B, T.M, M.T, B.M = B, M, T, M
    eng = mlo.Engine([T, M, B], {"u2l": {T: [M], M: [B]}, "l2u": {M: [T]}})
    with raises(mlo.GraphError, "'T'", "'B'", "no dependency declares"):
        eng.step()
    with raises(mlo.GraphError, "'T'", "'B'", "no dependency declares"):
        eng.gradient("T")


def test_undeclared_read_in_optimizer_hyperparameters():
    """lo's learning rate computed from a problem lo does not declare reading."""
    up = Node("up", lambda s, b: (x(s.lo) ** 2).sum() + 0 * x(s).sum())
    lo = Node("lo", lambda s, b: ((x(s) - x(s.up)) ** 2).sum(),
              hyper=lambda s: {"lr": 0.1 * torch.sigmoid(x(s.other)[0])})
    other = Node("other")
    up.lo, lo.up, lo.other = lo, up, other
    eng = mlo.Engine([up, lo, other], {"u2l": {up: [lo, other]}, "l2u": {lo: [up]}})
    with raises(mlo.GraphError, "'lo'", "'other'", "no dependency declares"):
        eng.step()


def test_look_alike_problem_outside_the_engine():
    """A second Problem object named like an engine problem is not that problem."""
    up, lo = Node("up"), Node("lo", lambda s, b: ((x(s) - x(s.up)) ** 2).sum())
    lo.up = Node("up")                                     # same name, different object
    up._loss = lambda s, b: (x(lo) ** 2).sum() + 0 * x(s).sum()
    eng = mlo.Engine([up, lo], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    with raises(mlo.GraphError, "'lo'", "'up'", "not in this engine"):
        eng.step()


def test_one_problem_engine_reading_another_problem():
    other = Node("other")
    solo = Node("solo", lambda s, b: ((x(s) - x(other)) ** 2).sum())
    eng = mlo.Engine([solo])
    with raises(mlo.GraphError, "'solo'", "'other'", "not in this engine"):
        eng.step()
