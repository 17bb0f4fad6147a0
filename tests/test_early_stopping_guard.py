"""Early stopping that cannot be fooled, and an ``EngineConfig`` given as a dict (issue 20).

* A NaN or ±inf validation metric never becomes the best: it counts as a validation
  without improvement (a NaN first validation used to become the permanent best, so an
  improving run was stopped and ``restore_best()`` loaded the NaN-time state).
* Settings and metric values are checked with errors naming early stopping and the
  metric (mode ``'high'``, a metric that is a string or a tensor of several elements).
* ``Engine(config={...})`` builds the ``EngineConfig`` as ``Problem(config={...})``
  builds the ``ProblemConfig``; an unknown key is named.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mlo
from mlo.callbacks import EarlyStopping

torch.set_num_threads(1)
NAN, INF = float("nan"), float("inf")


class Lower(mlo.Problem):
    def __init__(self, upper, batch):
        super().__init__("lower", params={"w": torch.zeros(3, dtype=torch.float64)}, data=[batch],
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1},
                         config=mlo.ProblemConfig(method="cg", method_options={"max_iter": 3}))
        self.upper = upper

    def training_step(self, batch):
        x, y = batch
        w = self.params["w"]
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (self.upper.params["lam"].exp() * w * w).sum()


class Upper(mlo.Problem):
    def __init__(self, batch):
        super().__init__("upper", params={"lam": torch.full((3,), -1.0, dtype=torch.float64)},
                         data=[batch], optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.5})
        self.lower = None

    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((x @ self.lower.params["w"] - y) ** 2).mean()


def build(config=None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    up = Upper((x[12:], y[12:]))
    lo = Lower(up, (x[:12], y[:12]))
    up.lower = lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}, config)


def scripted(values, mode="min", patience=2):
    """An EngineConfig validating every iteration with ``values`` in turn, and a list that
    records the upper's variable at each validation."""
    it, seen = iter(values), []

    def validation(engine):
        seen.append(engine.problems["upper"].params["lam"].detach().clone())
        return {"m": next(it)}

    cfg = mlo.EngineConfig(validate_every=1, validation=validation,
                           early_stopping={"metric": "m", "mode": mode, "patience": patience})
    return cfg, seen


# ------------------------------------------------------------- non-finite metrics
def test_nan_first_validation_never_becomes_the_best():
    """[nan, 3, 2, 1]: the run improves from the 2nd validation on and must not stop; the
    kept state is the one at the last validation (iteration 4)."""
    cfg, seen = scripted([NAN, 3.0, 2.0, 1.0], patience=2)
    engine = build(cfg)
    engine.run(4)
    es = engine.early_stopping
    assert engine.iteration == 4 and not engine.stop_requested
    assert (es.best, es.best_iteration, es.bad) == (1.0, 4, 0)
    lam = engine.problems["upper"].params["lam"]
    assert not torch.equal(lam, seen[0])
    engine.restore_best()
    assert torch.equal(engine.problems["upper"].params["lam"].detach(), seen[3])


@pytest.mark.parametrize("mode,bad", [("min", -INF), ("max", INF), ("min", NAN), ("max", NAN)])
def test_an_infinite_or_nan_value_is_never_best(mode, bad):
    """A first value of ±inf (the "best" possible in that mode) or NaN is not kept; the
    finite values after it are compared among themselves."""
    sign = 1.0 if mode == "min" else -1.0
    values = [bad, sign * 5.0, sign * 4.0, bad, sign * 3.0]
    cfg, seen = scripted(values, mode=mode, patience=2)
    engine = build(cfg)
    engine.run(5)
    es = engine.early_stopping
    assert engine.iteration == 5, "an improving run was stopped"
    assert (es.best, es.best_iteration) == (sign * 3.0, 5)
    engine.restore_best()
    assert torch.equal(engine.problems["upper"].params["lam"].detach(), seen[4])


def test_non_finite_values_count_as_no_improvement(capsys):
    """[3, nan, inf]: two validations without improvement after the best → stop at 3."""
    cfg, seen = scripted([3.0, NAN, INF, 0.0], patience=2)
    engine = build(cfg)
    engine.run(10)
    es = engine.early_stopping
    assert engine.iteration == 3 and (es.best, es.best_iteration, es.bad) == (3.0, 1, 2)
    assert "early stopping at iteration 3: m has not improved for 2 validations (best 3 at " \
           "iteration 1" in capsys.readouterr().out
    engine.restore_best()
    assert torch.equal(engine.problems["upper"].params["lam"].detach(), seen[0])


def test_only_non_finite_values_stop_with_nothing_to_restore(capsys):
    cfg, _ = scripted([NAN, -INF, 1.0], patience=2)
    engine = build(cfg)
    engine.run(10)
    es = engine.early_stopping
    assert engine.iteration == 2 and es.best is None and es.best_iteration is None
    assert "(no finite value yet, nothing to restore)" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match=r"no finite value of .m. yet in 2 validation\(s\): nothing to restore"):
        engine.restore_best()


def test_min_delta_and_the_tracker_directly():
    """``observe`` on its own: min_delta, and NaN never replacing a finite best."""

    class Fake:
        iteration = 0
        problems = {}

        def window(self, name):
            return None

    e, es = Fake(), EarlyStopping("m", mode="max", patience=3, min_delta=0.5)
    for it, v in enumerate([1.0, 1.4, NAN, 1.6], start=1):
        e.iteration = it
        stop = es.observe(e, v)
    assert (es.best, es.best_iteration, es.bad, stop) == (1.6, 4, 0, False)
    e.iteration = 5
    assert es.observe(e, INF) is False and es.observe(e, NAN) is False and es.observe(e, 2.0) is True
    assert es.best == 1.6


# ------------------------------------------------------------- named errors
def test_settings_are_checked_with_named_errors():
    with pytest.raises(ValueError) as e:
        EarlyStopping("val_loss", mode="high")
    assert str(e.value) == "EngineConfig.early_stopping: mode must be 'min' or 'max', got 'high'"
    with pytest.raises(ValueError, match=r"EngineConfig.early_stopping: mode must be 'min' or 'max'.*'high'"):
        mlo.EngineConfig(validate_every=1, validation=lambda e: {},
                         early_stopping={"metric": "x", "mode": "high"})
    with pytest.raises(ValueError, match=r"early_stopping: patience must be an integer >= 1, got 0"):
        EarlyStopping("x", patience=0)
    with pytest.raises(ValueError, match=r"early_stopping: patience must be an integer >= 1, got True"):
        EarlyStopping("x", patience=True)
    for d in (-1.0, NAN, INF, "0"):
        with pytest.raises(ValueError, match=r"early_stopping: min_delta must be a finite number >= 0"):
            EarlyStopping("x", min_delta=d)
    with pytest.raises(TypeError, match=r"early_stopping: metric must be the name \(a string\)"):
        EarlyStopping(3)


@pytest.mark.parametrize("value,what", [
    ("high", r"'high' \(str\)"),
    (torch.tensor([1.0, 2.0]), r"a torch.float32 tensor of shape \(2,\)"),
    (torch.tensor([True]), r"a torch.bool tensor of shape \(1,\)"),
    (np.array([1.0, 2.0]), r"an array of dtype float64 and shape \(2,\)"),
    (True, r"True \(bool\)"),
    (None, r"None \(NoneType\)"),
    (1 + 2j, r"\(1\+2j\) \(complex\)"),
])
def test_a_metric_value_that_is_not_a_real_number_is_named(value, what):
    cfg = mlo.EngineConfig(validate_every=1, validation=lambda e: {"val_loss": value},
                           early_stopping={"metric": "val_loss"})
    engine = build(cfg)
    with pytest.raises(TypeError, match=r"^EngineConfig.early_stopping: metric 'val_loss' must be a "
                                        r"real number \(or a one-element real tensor\), got " + what):
        engine.run(1)


@pytest.mark.parametrize("value", [torch.tensor(2.5), torch.tensor([[2.5]], dtype=torch.float64),
                                   torch.tensor(2.5, requires_grad=True) * 1, torch.tensor([2]),
                                   np.float32(2.5), np.array([2.5]), 2, 2.5])
def test_one_element_tensors_arrays_and_numbers_are_read(value):
    cfg = mlo.EngineConfig(validate_every=1, validation=lambda e: {"val_loss": value},
                           early_stopping={"metric": "val_loss"})
    engine = build(cfg)
    engine.run(1)
    assert engine.early_stopping.best == np.asarray(value.detach() if torch.is_tensor(value) else value).reshape(()).item()
    assert isinstance(engine.early_stopping.best, float)


def test_a_missing_metric_is_named():
    cfg = mlo.EngineConfig(validate_every=1, validation=lambda e: {"x": 1.0}, early_stopping={"metric": "y"})
    with pytest.raises(KeyError, match=r"early_stopping: metric 'y' is not among the validation metrics \['x'\]"):
        build(cfg).run(1)


# ------------------------------------------------------------- EngineConfig as a dict
def test_engine_config_as_a_dict_is_built_like_problem_config():
    calls = []
    engine = build({"nonfinite": "skip", "validate_every": 2,
                    "validation": lambda e: calls.append(e.iteration) or {"m": 1.0}})
    assert isinstance(engine.config, mlo.EngineConfig)
    assert engine.config.nonfinite == "skip" and engine.config.validate_every == 2
    engine.run(4)
    assert calls == [2, 4] and engine.iteration == 4
    assert isinstance(build({}).config, mlo.EngineConfig)


def test_engine_config_dict_errors_name_the_key_or_the_type():
    with pytest.raises(ValueError, match=r"^Engine\(config=\.\.\.\): unknown EngineConfig field\(s\) "
                                         r"'log_evry'; known: \[.*'log_every'"):
        build({"log_evry": 5})
    with pytest.raises(ValueError, match=r"EngineConfig.nonfinite must be 'raise', 'skip' or 'ignore'"):
        build({"nonfinite": "nan"})
    with pytest.raises(TypeError, match=r"^Engine\(config=\.\.\.\) must be an EngineConfig or a dict of "
                                        r"its fields, got list"):
        build([("log_every", 5)])
