"""Method options are validated when the engine is built, with errors naming the problem."""
from __future__ import annotations

import pytest
import torch

import mlo
from engines.base import available, check_options


class Node(mlo.Problem):
    def __init__(self, name, loss, **kw):
        super().__init__(name, params={"x": torch.zeros(3, dtype=torch.float64)}, **kw)
        self._loss = loss

    def training_step(self, batch):
        return self._loss(self)


def build(method, options):
    up = Node("hyper", lambda s: (s.low.params["x"] ** 2).sum())
    low = Node("inner", lambda s: ((s.params["x"] - s.up.params["x"]) ** 2).sum(),
               config=mlo.ProblemConfig(method=method, method_options=options))
    up.low, low.up = low, up
    return mlo.Engine([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}})


@pytest.mark.parametrize("method, options", [
    ("neumann", {"iterations": 3, "alpha": 0.2}), ("cg", {"max_iter": 4, "tol": 0.0, "damping": 0.1}),
    ("finite_difference", {"epsilon": 1e-3, "scale_by_lr": True}), ("darts", {}),
    ("unrolled", {"first_order": True})])
def test_valid_options_build(method, options):
    build(method, options).run(2)


@pytest.mark.parametrize("method, options, match", [
    ("neumann", {"iter": 5}, r"problem 'inner'.*no option\(s\) \['iter'\].*'iterations'"),
    ("cg", {"maxiter": 5}, r"problem 'inner'.*\['maxiter'\].*'max_iter'"),
    ("finite_difference", {"eps": 0.1}, r"problem 'inner'.*\['eps'\].*'epsilon'"),
    ("unrolled", {"firstorder": True}, r"problem 'inner'.*\['firstorder'\].*'first_order'"),
])
def test_unknown_option_names_problem_and_choices(method, options, match):
    with pytest.raises(TypeError, match=match):
        build(method, options)


@pytest.mark.parametrize("method, options, match", [
    ("neumann", {"alpha": 0.0}, r"problem 'inner'.*alpha must be a number > 0 .*got 0.0"),
    ("neumann", {"alpha": -0.5}, r"alpha must be a number > 0 .*got -0.5"),
    ("neumann", {"iterations": -1}, r"iterations must be an integer >= 0, got -1"),
    ("neumann", {"iterations": 2.5}, r"iterations must be an integer >= 0, got 2.5"),
    ("cg", {"max_iter": 0}, r"problem 'inner'.*max_iter must be an integer >= 1 or None, got 0"),
    ("cg", {"tol": -1e-3}, r"tol must be a number >= 0"),
    ("cg", {"damping": -1.0}, r"damping must be a number >= 0, got -1.0"),
    ("finite_difference", {"epsilon": 0}, r"problem 'inner'.*epsilon must be a number > 0, got 0"),
    ("darts", {"epsilon": -0.01}, r"epsilon must be a number > 0"),
])
def test_bad_option_values_name_problem_and_field(method, options, match):
    with pytest.raises(ValueError, match=match):
        build(method, options)


def test_unknown_method_names_problem():
    with pytest.raises(mlo.GraphError, match=r"problem 'inner'.*unknown hypergradient method 'newman'"):
        build("newman", {})


def test_direct_calls_validate_too():
    from engines.base import get
    with pytest.raises(ValueError, match="alpha"):
        get("neumann")(None, (), alpha=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        get("finite_difference")(None, (), epsilon=0.0)


def test_every_method_accepts_its_defaults():
    for name in available():
        check_options(name, {})


def test_unrolled_with_unsupported_optimizer_names_problem():
    up = Node("hyper", lambda s: (s.low.params["x"] ** 2).sum())
    low = Node("inner", lambda s: ((s.params["x"] - s.up.params["x"]) ** 2).sum(),
               optimizer=torch.optim.Rprop, optimizer_kwargs={"lr": 0.1})
    up.low, low.up = low, up
    with pytest.raises(mlo.GraphError, match=r"problem 'inner'.*got Rprop"):
        mlo.Engine([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}})
    low.config = mlo.ProblemConfig(method="cg")   # implicit methods work with any optimizer
    mlo.Engine([up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}}).run(2)


def test_data_must_be_iterable():
    with pytest.raises(TypeError, match=r"problem 'inner': `data` must be an iterable.*int"):
        Node("inner", lambda s: s.params["x"].sum(), data=5)


def test_param_groups_by_name():
    P = Node("inner", lambda s: s.params["x"].sum(), optimizer=torch.optim.AdamW,
             optimizer_kwargs={"lr": 0.1, "weight_decay": 0.05},
             param_groups=[{"params": ["x"], "weight_decay": 0.0, "lr": 0.3}])
    (g,) = P.optimizer.param_groups
    assert g["weight_decay"] == 0.0 and g["lr"] == 0.3 and g["params"][0] is P.module.x


def test_param_groups_default_group_and_errors():
    from torch import nn
    mod = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))

    class M(mlo.Problem):
        def training_step(self, batch):
            return self(torch.ones(2, 3)).sum()

    P = M("net", module=mod, optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1, "weight_decay": 0.01},
          param_groups=[{"params": ["0.bias", "1.weight", "1.bias"], "weight_decay": 0.0}])
    g0, g1 = P.optimizer.param_groups
    assert [id(p) for p in g0["params"]] == [id(mod[0].bias), id(mod[1].weight), id(mod[1].bias)]
    assert g0["weight_decay"] == 0.0 and g1["weight_decay"] == 0.01 and g1["params"][0] is mod[0].weight
    with pytest.raises(ValueError, match=r"problem 'net': param_groups\[0\] names unknown parameter "
                                         r"'0.weigth'.*'0.weight'"):
        M("net", module=mod, param_groups=[{"params": ["0.weigth"]}])
    with pytest.raises(ValueError, match=r"'0.bias' is in param_groups\[0\] and param_groups\[1\]"):
        M("net", module=mod, param_groups=[{"params": ["0.bias"]}, {"params": ["0.bias"]}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] must be a list of parameter names"):
        M("net", module=mod, param_groups=[{"params": "0.bias"}])
    with pytest.raises(ValueError, match=r"problem 'net': SGD\(\*\*optimizer_kwargs\):.*learning rate"):
        M("net", module=mod, optimizer_kwargs={"lr": -1.0})
