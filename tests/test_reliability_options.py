"""Strict option types: method options, EngineConfig and ProblemConfig fields and
YAML files are checked when they are built, with errors naming the problem, the
option (or the file, key and lines); a finite-difference epsilon lost to rounding
warns."""
import math

import pytest
import torch

import mlo
from _helpers import Vars

torch.set_num_threads(1)


def graph(method, options, engine_config=None):
    up = Vars("up", {"lam": torch.tensor([0.5, -0.3], dtype=torch.float64)},
              lambda s: 0.5 * ((s.lo.params["th"] - 1.0) ** 2).sum(), optimizer_kwargs={"lr": 0.1})
    lo = Vars("lo", {"th": torch.tensor([1.0, 2.0], dtype=torch.float64)},
              lambda s: 0.5 * ((s.params["th"] - s.up.params["lam"]) ** 2).sum(),
              optimizer_kwargs={"lr": 0.1},
              config=mlo.ProblemConfig(method=method, method_options=dict(options)))
    lo.up, up.lo = up, lo
    before = [t.detach().clone() for P in (lo, up) for t in P.variables]
    make = lambda: mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}, config=engine_config)  # noqa: E731
    return make, (lo, up), before


BAD = [
    ("unrolled", {"first_order": "false"}, r"unrolled: first_order must be a bool \(True or False\), got 'false' \(str\)"),
    ("unrolled", {"create_graph": "yes"}, r"unrolled: create_graph must be a bool .*'yes'"),
    ("unrolled", {"first_order": 1}, r"unrolled: first_order must be a bool .*got 1 \(int\)"),
    ("neumann", {"alpha": math.inf}, r"neumann: alpha must be a number > 0 .*got inf"),
    ("neumann", {"alpha": math.nan}, r"neumann: alpha must be a number > 0 .*got nan"),
    ("neumann", {"alpha": "0.1"}, r"neumann: alpha must be a number > 0 .*got '0.1'"),
    ("neumann", {"iterations": 2.0}, r"neumann: iterations must be an integer >= 0, got 2.0"),
    ("neumann", {"create_graph": "no"}, r"neumann: create_graph must be a bool"),
    ("cg", {"damping": math.inf}, r"cg: damping must be a number >= 0, got inf \(not finite\)"),
    ("cg", {"damping": True}, r"cg: damping must be a number >= 0, got True \(bool\)"),
    ("cg", {"tol": "1e-9"}, r"cg: tol must be a number >= 0, got '1e-9' \(str\)"),
    ("cg", {"max_iter": True}, r"cg: max_iter must be an integer >= 1 or None, got True"),
    ("finite_difference", {"epsilon": math.inf}, r"finite_difference: epsilon must be a number > 0, got inf"),
    ("finite_difference", {"epsilon": "1e-3"}, r"finite_difference: epsilon must be a number > 0, got '1e-3'"),
    ("darts", {"scale_by_lr": "True"}, r"finite_difference: scale_by_lr must be a bool"),
    ("finite_difference", {"create_graph": 0}, r"finite_difference: create_graph must be a bool"),
]


@pytest.mark.parametrize("method, options, match", BAD, ids=[f"{m}-{list(o)[0]}" for m, o, _ in BAD])
def test_bad_method_option_is_named_at_engine_construction(method, options, match):
    make, problems, before = graph(method, options)
    with pytest.raises(ValueError, match=r"problem 'lo': ProblemConfig.method_options: " + match):
        make()
    assert all(torch.equal(a, b) for a, b in zip(before, (t for P in problems for t in P.variables)))
    assert all(not P.optimizer.state for P in problems)


@pytest.mark.parametrize("method, options", [("unrolled", {"first_order": True}), ("neumann", {"alpha": 1}),
                                             ("cg", {"damping": 0, "tol": 0}),
                                             ("finite_difference", {"epsilon": 1, "scale_by_lr": False})])
def test_good_options_still_pass(method, options):
    make, _, _ = graph(method, options)
    make().run(2)


def test_tiny_finite_difference_epsilon_warns_naming_the_problem():
    make, (lo, up), _ = graph("finite_difference", {"epsilon": 1e-30})
    eng = make()
    with pytest.warns(RuntimeWarning, match=r"problem 'lo': finite_difference: epsilon=1e-30 is too small: "
                                            r"θ ± εv rounds to θ .* exactly 0"):
        eng.step()
    assert torch.count_nonzero(eng.last_hypergradient["up"]["lam"]) == 0
    make, _, _ = graph("finite_difference", {"epsilon": 1e-3})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make().run(2)


@pytest.mark.parametrize("kw, match", [
    ({"validate_every": "5"}, r"EngineConfig.validate_every must be an integer >= 1 or None, got '5' \(str\)"),
    ({"validate_every": 0}, r"validate_every must be an integer >= 1"),
    ({"validate_every": True}, r"validate_every must be an integer >= 1"),
    ({"log_every": 2.5}, r"EngineConfig.log_every must be an integer >= 1 or None, got 2.5"),
    ({"validation": 3}, r"EngineConfig.validation must be a callable .* got int"),
    ({"nonfinite": None}, r"EngineConfig.nonfinite must be 'raise', 'skip' or 'ignore'"),
])
def test_engine_config_fields_are_checked_when_built(kw, match):
    with pytest.raises(ValueError, match=match):
        mlo.EngineConfig(**kw)


def test_validation_returning_a_float_is_named():
    make, _, _ = graph("cg", {}, mlo.EngineConfig(validate_every=1, validation=lambda e: 0.5))
    eng = make()
    with pytest.raises(TypeError, match=r"EngineConfig.validation must return a dict of metrics, got float \(0.5\)"):
        eng.step()
    make, _, _ = graph("cg", {}, mlo.EngineConfig(validate_every=1, validation=lambda e: {"acc": 1.0}))
    assert make().run(2) == [{"iteration": 1, "acc": 1.0}, {"iteration": 2, "acc": 1.0}]


@pytest.mark.parametrize("clip", ["1.0", math.nan, math.inf, True, 0, -1.0])
def test_grad_clip_must_be_a_positive_finite_number(clip):
    with pytest.raises(ValueError, match=r"ProblemConfig.grad_clip must be a positive finite number or None"):
        mlo.ProblemConfig(grad_clip=clip)
    assert mlo.ProblemConfig(grad_clip=2).grad_clip == 2


@pytest.mark.parametrize("text, match", [
    ("pretrain: {unroll_steps: 2}\nfinetune: {method: cg}\npretrain: {method: cg}\n",
     r"duplicate key 'pretrain' at line 3 \(first at line 1\)"),
    ("finetune:\n  method: cg\n  grad_clip: 1.0\n  method: neumann\n",
     r"duplicate key 'method' at line 4 \(first at line 2\)"),
    ("a: {method: cg, method_options: {max_iter: 3, max_iter: 4}}\n",
     r"duplicate key 'max_iter' at line 1 \(first at line 1\)"),
])
def test_yaml_duplicate_keys_name_file_key_and_lines(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=rf"^{p}: " + match):
        mlo.load_problem_configs(p)


def test_yaml_exponent_floats_and_merges(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base: &b {method: cg, grad_clip: 1e-3}\n"
                 "lo: {<<: *b, method_options: {damping: 1e-4, tol: 0.}}\n")
    cfg = mlo.load_problem_configs(p)
    assert cfg["base"].grad_clip == 1e-3 and cfg["lo"].method == "cg"
    assert cfg["lo"].method_options == {"damping": 1e-4, "tol": 0.0}
