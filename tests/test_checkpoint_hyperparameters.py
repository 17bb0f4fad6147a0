"""Issue 20: loading a checkpoint replaces the engine's optimizer settings, and says so.

``mlo.checkpoint.load`` calls torch's ``optimizer.load_state_dict``, which restores every
parameter group's hyperparameters as saved: resuming continues the saved run (kept).
When a saved value differs from the one the engine was built with, one
``RuntimeWarning`` names the problem, the group, the key and both values:

1. other ``lr``/``momentum`` (SGD) and ``betas`` (Adam): one warning listing each; the
   loaded engine holds the saved values and continues bit for bit like the saved run,
   not like a run with its own values;
2. the same settings: no warning;
3. under a scheduler the scheduled ``lr`` is not compared (the schedule resumes), its
   ``initial_lr`` is;
4. a learned learning rate (``optimizer_hyperparameters``) is not compared;
5. setting the values again after loading (the documented way) runs with them.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import mlo
from _helpers import Vars
from mlo import checkpoint

DT = torch.float64
# (the graph lint says cg gives 'up' no gradient through a learned lr: true, not the point here)
pytestmark = pytest.mark.filterwarnings("ignore:graph lint")


def build(lo_kw=None, up_kw=None, scheduler=None, learned_lr=False):
    """``up`` (λ, Adam) above ``lo`` (θ, SGD): ``f = ½‖θ − λ‖² + 0.1‖θ‖²``, ``F = ½‖θ − t‖²``."""
    target = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    up = Vars("up", {"lam": torch.zeros(3, dtype=DT)},
              lambda s: 0.5 * ((s.lo.params["th"] - target) ** 2).sum() + 0.01 * (s.params["lam"] ** 2).sum(),
              optimizer=torch.optim.Adam, optimizer_kwargs=up_kw or {"lr": 0.05})
    cls = Vars
    if learned_lr:
        class LearnedLr(Vars):
            def optimizer_hyperparameters(self):
                return {"lr": 0.05 + 0.01 * torch.tanh(self.up.params["lam"].sum())}
        cls = LearnedLr
    lo = cls("lo", {"th": torch.ones(3, dtype=DT)},
             lambda s: 0.5 * ((s.params["th"] - s.up.params["lam"]) ** 2).sum() + 0.1 * (s.params["th"] ** 2).sum(),
             optimizer=torch.optim.SGD, optimizer_kwargs=lo_kw or {"lr": 0.1, "momentum": 0.9},
             scheduler=scheduler, scheduler_kwargs={"step_size": 2, "gamma": 0.5} if scheduler else None,
             config=mlo.ProblemConfig(method="cg", method_options={"max_iter": 10}, unroll_steps=2))
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})


def params(engine):
    return [t.detach().clone() for P in engine.problems.values() for t in P.own_state().values()]


def load_recording(engine, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint.load(engine, path)
    return [str(w.message) for w in caught if "replaced optimizer settings" in str(w.message)]


def test_other_settings_are_replaced_with_one_warning_naming_each(tmp_path):
    saved = build()
    saved.run(4)
    path = tmp_path / "c.pt"
    checkpoint.save(saved, path)
    mine = build(lo_kw={"lr": 0.2, "momentum": 0.5}, up_kw={"lr": 0.05, "betas": (0.8, 0.99)})
    msgs = load_recording(mine, path)
    assert len(msgs) == 1, msgs
    assert msgs[0] == (
        f"{path}: loading replaced optimizer settings the engine was built with by the checkpoint's "
        f"(engine -> checkpoint; torch's optimizer.load_state_dict restores parameter groups, so the "
        f"resumed run continues with the saved ones): problem 'lo' group 0: lr 0.2 -> 0.1, momentum "
        f"0.5 -> 0.9; problem 'up' group 0: betas (0.8, 0.99) -> (0.9, 0.999). To run on with the "
        f"engine's values, set them again after loading (for g in P.optimizer.param_groups: g[key] = value)")
    g_lo, g_up = mine.problems["lo"].optimizer.param_groups[0], mine.problems["up"].optimizer.param_groups[0]
    assert (g_lo["lr"], g_lo["momentum"], g_up["betas"]) == (0.1, 0.9, (0.9, 0.999))   # torch's behaviour
    # the loaded engine continues exactly as the saved one, not as one with its own values
    saved.run(6)
    mine.run(6)
    assert all(torch.equal(a, b) for a, b in zip(params(saved), params(mine)))
    own = build(lo_kw={"lr": 0.2, "momentum": 0.5}, up_kw={"lr": 0.05, "betas": (0.8, 0.99)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint.load(own, path)
    for g, kw in ((own.problems["lo"].optimizer.param_groups[0], {"lr": 0.2, "momentum": 0.5}),
                  (own.problems["up"].optimizer.param_groups[0], {"betas": (0.8, 0.99)})):
        g.update(kw)                       # 5: the documented way to keep the engine's values
    own.run(6)
    assert not all(torch.equal(a, b) for a, b in zip(params(saved), params(own)))
    assert own.problems["lo"].optimizer.param_groups[0]["lr"] == 0.2


def test_the_same_settings_load_silently(tmp_path):
    saved = build()
    saved.run(3)
    checkpoint.save(saved, tmp_path / "c.pt")
    assert load_recording(build(), tmp_path / "c.pt") == []
    # a float where the checkpoint has the same int (SGD's default weight_decay=0) is the same setting
    assert saved.problems["lo"].optimizer.param_groups[0]["weight_decay"] == 0
    assert load_recording(build(lo_kw={"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}), tmp_path / "c.pt") == []


def test_a_scheduled_lr_is_not_compared_its_initial_lr_is(tmp_path):
    saved = build(scheduler=torch.optim.lr_scheduler.StepLR)
    saved.run(8)
    assert saved.problems["lo"].optimizer.param_groups[0]["lr"] < 0.1       # the schedule moved it
    checkpoint.save(saved, tmp_path / "c.pt")
    assert load_recording(build(scheduler=torch.optim.lr_scheduler.StepLR), tmp_path / "c.pt") == []
    msgs = load_recording(build(lo_kw={"lr": 0.3, "momentum": 0.9}, scheduler=torch.optim.lr_scheduler.StepLR),
                          tmp_path / "c.pt")
    assert len(msgs) == 1 and re.search(r"problem 'lo' group 0: initial_lr 0\.3 -> 0\.1\. To run on", msgs[0]), msgs


def test_a_learned_lr_is_not_compared(tmp_path):
    saved = build(learned_lr=True)
    saved.run(4)
    assert saved.problems["lo"].optimizer.param_groups[0]["lr"] != 0.1      # learned, not configured
    checkpoint.save(saved, tmp_path / "c.pt")
    assert load_recording(build(learned_lr=True), tmp_path / "c.pt") == []
    # in a running engine the learned keys are known: the others are still compared
    running = build(learned_lr=True, lo_kw={"lr": 0.1, "momentum": 0.7})
    running.run(2)
    msgs = load_recording(running, tmp_path / "c.pt")
    assert len(msgs) == 1 and re.search(r"\): problem 'lo' group 0: momentum 0\.7 -> 0\.9\. To run on", msgs[0]), msgs
