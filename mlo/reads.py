"""The engine's windows and reads: who sees which state of whom.

:class:`ReadsMixin` is part of :class:`mlo.Engine`. It opens and closes unrolled
windows (a problem's differentiable iterates, or a :class:`mlo.WindowProblem`'s
per-window variables), hands a reading loss the state of the problem it calls
(an alias that starts a new graph and is recorded as a :class:`mlo.state.Read`, or
the live iterates in exact nesting and for the fused top), and computes the top's
gradient in one backward when its nest allows it.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from engines.base import grad_mode

from . import precision as _precision
from .graph import GraphError
from .guard import combine_gradients
from .hypergrad import naming_second_order_errors, second_order_kernels
from .optim import FunctionalOptimizer
from .problem import Problem
from .state import Read, ReadContext, Window, reading

__all__ = ["ReadsMixin"]


class ReadsMixin:
    """Windows, reads and the fused/exact top gradient of an engine."""

    def _open_window(self, P: Problem) -> None:
        """Opens ``P``'s window: its iterates start from its parameters and its twin
        optimizer from its torch state — or, for per-window variables, both start
        fresh from ``init_window`` on the window's one batch (its reads recorded)."""
        run = self.state[P.name]
        if not P.per_window:
            run.window = Window(FunctionalOptimizer.from_torch(P.optimizer, list(P.variables)))
            run.iterates = dict(zip(P.param_names, P.variables))
            return
        batch, reads = P.next_batch(), []
        nodes = self.graph.path_nodes(P.name)
        run.window = win = Window(None)   # open now: the steps share init_window's reads
        with second_order_kernels(True), reading(ReadContext(
                P, lambda S: self._alias(P, S, True, nodes, reads), own={})):
            result = P.init_window(_precision.to_device(batch, self._device))
        init = P.open_window(batch, result)
        win.fopt = FunctionalOptimizer.fresh(P.optimizer, len(init))
        win.add_reads(reads)

    def _discard_window(self, P: Problem) -> None:
        """Drops a window in which nothing stepped (also one that failed to open)."""
        run = self.state[P.name]
        run.window = None
        if P.per_window:
            P.close_window()
        else:
            run.iterates = None

    def _alias(self, R: Problem, S: Problem, diff: bool, nodes, reads: List[Read], live: bool = False):
        """The state ``R``'s loss sees when it calls problem ``S``."""
        if S.name not in self.problems or self.problems[S.name] is not S:
            raise GraphError(f"problem {R.name!r} read problem {S.name!r}, which is not in this engine")
        if S.name not in self.graph.reads[R.name]:
            raise GraphError(
                f"problem {R.name!r} read the variables of {S.name!r}, but no dependency declares "
                f"it: add {S.name!r} to u2l[...]/l2u[...] (u2l={{{S.name!r}: [{R.name!r}]}} if "
                f"{S.name!r} is the upper, l2u={{{S.name!r}: [{R.name!r}]}} if it is the lower)")
        for r in reads:
            if r.source == S.name:
                return r.alias
        st = S.readable_state()
        if (self._exact or live) and S.name in self._windowed:
            # Exact nesting: the live iterates (no new graph); the top's backward
            # runs through every level's steps.
            reads.append(Read(S.name, st, st, live=True))
            return st
        track = diff or S.name in nodes or R.name not in self._linted   # (lint sees every first read)
        # A differentiable reader keeps its graph past this step; if S then steps in
        # place (torch.optim), the saved values would change under it. Clone then —
        # unless S is the only top problem and R lies on one of its paths: the top is
        # the last problem of an iteration, it backpropagates through R's window
        # before its own in-place step, and that window is closed (never
        # backpropagated again) at the end of the same iteration.
        swin = self.state[S.name].window
        rwin = self.state[R.name].window if diff else None
        if rwin is not None and swin is None and track:
            # Inside R's window, S has not stepped since an earlier step read it: the
            # same aliases serve (one set of leaves per window, not one per step).
            hit = rwin.shared.get(S.name)
            if hit is not None and hit[0] == (S.step_count, self.state[S.name].edits):
                reads.append(hit[1])
                return hit[1].alias
        clone = diff and swin is None and not (
            S.name == self._unique_top and R.name in self.graph.path_nodes(S.name))
        alias = {}
        for k, t in st.items():
            a = t.detach()
            if clone:
                a = a.clone()
            alias[k] = a.requires_grad_() if track else a
        r = Read(S.name, alias, st if swin is not None else None)
        if swin is not None:
            swin.referrers.append(r)
        elif rwin is not None and track:
            rwin.shared[S.name] = ((S.step_count, self.state[S.name].edits), r)
        reads.append(r)
        return alias

    def _close_window(self, name: str) -> None:
        run = self.state[name]
        win, run.window = run.window, None
        if win is None:
            return
        P = self.problems[name]
        if P.per_window:        # nothing to write back, nothing kept
            P.close_window()
        else:
            with grad_mode(False):             # (cheaper than `with torch.no_grad()`)
                for p, k in zip(P.variables, P.param_names):
                    p.copy_(run.iterates[k])
            win.fopt.state_to_torch(P.optimizer, list(P.variables))
            run.iterates = None
        for r in win.referrers:   # truncate paths through the closed window
            r.src_state = None
        win.reads.clear()
        win.referrers.clear()

    def _exact_top_gradient(self, P: Problem, loss: Tensor, keep_graph: bool):
        """``EngineConfig(nesting="exact")``, the top's update: its loss reads the nest's
        live iterates, so one backward reaches every read of the top's variables made
        inside the nest's open windows (aliases, new graphs) — the total derivative."""
        if not loss.requires_grad:
            raise RuntimeError(f"problem {P.name!r}: its loss has no autograd graph (it depends "
                               f"neither on its own variables {P.param_names} nor on its lowers)")
        own = list(P.own_state().values())
        seen, leaves = set(), []
        nest = self.graph.path_nodes(P.name)
        for n in nest:
            win = self.state[n].window
            for r in (win.reads if win is not None else ()):
                if r.source == P.name and not r.live:
                    for k, a in r.alias.items():
                        if a.requires_grad and id(a) not in seen:
                            seen.add(id(a))
                            leaves.append((k, a))
        names = sorted(nest)
        with naming_second_order_errors(names, [self.problems[n].config.method for n in names]):
            allg = torch.autograd.grad(loss, own + [a for _, a in leaves], allow_unused=True,
                                       retain_graph=keep_graph or None)
        acc: Dict[str, Tensor] = {}
        for (k, _), x in zip(leaves, allg[len(own):]):
            if x is not None:
                acc[k] = acc[k] + x if k in acc else x
        own_d, hyper, total = combine_gradients(P.param_names, own, allg[:len(own)], acc)
        return loss, total, [], {"own": own_d, "hyper": hyper}

    def window(self, name: str) -> Optional[Window]:
        """Problem ``name``'s open window (its differentiable steps), or ``None``."""
        return self.state[name].window

    def windowed(self, name: str) -> bool:
        """Whether problem ``name`` steps through windows (its method's declaration)."""
        return name in self._windowed

    def open_windows(self) -> Dict[str, int]:
        """``{problem: steps taken}`` of every open window."""
        return self.state.open_windows()

    def close_windows(self) -> None:
        """Writes all unrolled iterates back into the modules (e.g. before saving)."""
        for n in list(self.state.open_windows()):
            self._close_window(n)
