"""The README's quickstart snippet runs as written (on small synthetic data)."""
from __future__ import annotations

import pathlib

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart: a bilevel graph", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert "engine.run(1000)" in code
    code = code.replace("engine.run(1000)", "engine.run(60)").replace("print(", "_ = (")
    torch.manual_seed(0)
    X = torch.randn(120, 30)
    y = (X[:, 0] > 0).float()
    ns = {"train_batches": [(X[:60], y[:60])], "val_batches": [(X[60:], y[60:])]}
    exec(compile(code, str(README), "exec"), ns)
    assert ns["engine"].counts() == {"classifier": 60, "hyper": 3}
    g = ns["engine"].gradient("hyper", by_path=True)
    assert set(g["paths"]) == {("hyper", "classifier", "hyper")}
    assert torch.isfinite(g["grad"]["log_wd"]).all() and g["grad"]["log_wd"].abs().sum() > 0
