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


def test_readme_quickstart_pasted_into_a_fresh_interpreter():
    """Pasted line by line into the interactive interpreter (blank lines end blocks there),
    with nothing predefined: no NameError, no IndentationError."""
    import code
    import contextlib
    import io

    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart: a bilevel graph", 1)[1]
    src = section.split("```python", 1)[1].split("```", 1)[0]
    src = src.replace("engine.run(1000)", "engine.run(40)").replace("print(", "_ = (")
    console = code.InteractiveConsole(locals={})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        for line in src.splitlines() + [""]:
            console.push(line)
    assert err.getvalue() == "", err.getvalue()
    assert console.locals["engine"].counts() == {"classifier": 40, "hyper": 2}
