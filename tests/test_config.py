"""ProblemConfig validation and YAML loading."""
import pytest

import mlo


def test_yaml_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pretrain: {unroll_steps: 2, method: neumann, method_options: {iterations: 5, alpha: 0.1}}\n"
                 "finetune: {method: cg, grad_clip: 1.5}\n")
    cfg = mlo.load_problem_configs(p)
    assert cfg["pretrain"] == mlo.ProblemConfig(unroll_steps=2, method="neumann",
                                                method_options={"iterations": 5, "alpha": 0.1})
    assert cfg["finetune"].grad_clip == 1.5 and cfg["finetune"].method == "cg"


@pytest.mark.parametrize("text, match", [
    ("pretrain: {unroll_step: 2}\n", r"'pretrain'.*unknown ProblemConfig field\(s\) \['unroll_step'\]"),
    ("pretrain: {unroll_steps: 0}\n", r"'pretrain'.*unroll_steps must be an integer >= 1"),
    ("- a\n- b\n", "expected a mapping"),
    ("pretrain: 3\n", "config of problem 'pretrain' must be a mapping"),
    ("x: !!python/object/apply:os.system ['echo hi']\n", "could not determine a constructor"),
])
def test_yaml_errors(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(Exception, match=match):
        mlo.load_problem_configs(p)


@pytest.mark.parametrize("kw, match", [
    ({"update_every": 0}, "update_every"), ({"unroll_steps": 1.5}, "unroll_steps"),
    ({"method": 3}, "method"), ({"method_options": []}, "method_options"), ({"grad_clip": -1}, "grad_clip")])
def test_invalid_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        mlo.ProblemConfig(**kw)
