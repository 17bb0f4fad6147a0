"""Graph lint (issue 11): a declared u2l/l2u edge whose read leaves no autograd
connection — the lower's loss uses ``upper.module.weight`` instead of
``upper.params[...]``, never reads the upper, or reads it and drops the graph —
gets one warning naming both problems and the fix; a correct graph gets none."""
import warnings

import pytest
import torch
from torch import nn

import mlo

torch.set_num_threads(1)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return [(x, x.sum(-1, keepdim=True))]


class Upper(mlo.Problem):
    """A linear layer whose weight the lower pulls toward (a prior)."""

    def __init__(self, read_lower="params"):
        super().__init__("upper", module=nn.Linear(3, 1, bias=False).double(), data=data(1),
                         optimizer_kwargs={"lr": 0.1})
        self.read_lower = read_lower

    def training_step(self, batch):
        x, y = batch
        w = self.lower.module.weight if self.read_lower == "raw" else self.lower.params["weight"]
        return ((x @ w.t() - y) ** 2).mean() + 1e-3 * (self.params["weight"] ** 2).sum()


class Lower(mlo.Problem):
    def __init__(self, upper, read, method):
        super().__init__("lower", module=nn.Linear(3, 1, bias=False).double(), data=data(2),
                         optimizer_kwargs={"lr": 0.1}, config=mlo.ProblemConfig(method=method))
        self.upper, self.read = upper, read

    def training_step(self, batch):
        x, y = batch
        if self.read == "params":
            prior = self.upper.params["weight"]
        elif self.read == "call":
            prior = self.upper(torch.eye(3, dtype=torch.float64)).t()
        elif self.read == "raw":
            prior = self.upper.module.weight                 # the mistake
        elif self.read == "item":
            prior = torch.tensor(self.upper.params["weight"].sum().item())
        else:                                                # "none": never reads the upper
            prior = torch.zeros(1, 3, dtype=torch.float64)
        return ((self(x) - y) ** 2).mean() + ((self.params["weight"] - prior) ** 2).sum()


def run(read, method="cg", read_lower="params", steps=3):
    torch.manual_seed(0)
    up = Upper(read_lower)
    lo = Lower(up, read, method)
    up.lower = lo
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eng.run(steps)
    lint = [str(x.message) for x in w if "graph lint" in str(x.message)]
    return eng, lint


@pytest.mark.parametrize("method", ["cg", "unrolled", "neumann", "finite_difference"])
def test_raw_tensor_read_warns_once_naming_both_problems(method):
    eng, lint = run("raw", method)
    assert len(lint) == 1, lint                               # once, not per step
    msg = lint[0]
    assert "problem 'lower'" in msg and "'upper'" in msg and "u2l {'upper': ['lower']}" in msg
    assert "uses the real parameters of 'upper' directly (e.g. upper.module.<name>)" in msg
    assert "the hypergradient of 'upper' through 'lower' is silently zero" in msg
    assert "upper.params[...] / upper(x) / upper.call(...)" in msg
    # what the lint is about: the upper's hypergradient is exactly zero
    assert all(float(h.abs().max()) == 0.0 for h in eng.last_hypergradient["upper"].values())


@pytest.mark.parametrize("method", ["cg", "unrolled"])
@pytest.mark.parametrize("read", ["params", "call"])
def test_correct_graph_gives_no_warning(read, method):
    eng, lint = run(read, method)
    assert lint == []
    assert float(eng.last_hypergradient["upper"]["weight"].abs().max()) > 1e-6


@pytest.mark.parametrize("read,cause", [("none", "it never reads 'upper'"),
                                        ("item", "it reads 'upper' but drops the graph")])
def test_missing_or_detached_read_warns(read, cause):
    _, lint = run(read)
    assert len(lint) == 1 and cause in lint[0] and "problem 'lower'" in lint[0], lint


def test_l2u_edge_read_raw_warns():
    """The upper's loss uses the lower's raw weight: its hypergradient through the
    lower is silently zero (the direct term still trains it)."""
    eng, lint = run("params", read_lower="raw")
    assert len(lint) == 1, lint
    assert "problem 'upper'" in lint[0] and "l2u {'lower': ['upper']}" in lint[0]
    assert "the hypergradient of 'upper' through 'lower' is silently zero" in lint[0]
    assert "lower.params[...] / lower(x) / lower.call(...)" in lint[0]


def test_lint_leaves_the_run_unchanged():
    """The first read is made differentiable for the check: same numbers as before."""
    a, _ = run("params", "cg", steps=4)
    torch.manual_seed(0)
    up = Upper()
    lo = Lower(up, "params", "cg")
    up.lower = lo
    b = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    b._lint_done = set(b.problems)                            # lint off
    b.run(4)
    for n in a.problems:
        for p, q in zip(a.problems[n].module.parameters(), b.problems[n].module.parameters()):
            assert torch.equal(p, q)


# ------------------------------------------------ per-window reads (MAML, issue 21)
# A MAML task reads the meta-parameters only in init_window (its fast weights start from
# them) and its loss uses only its own iterates: a real connection, which the lint must not
# report; a window started from a detached copy, or never from the meta problem, still is.
class MetaW(mlo.Problem):
    """Meta-parameters ``w``; loss: the tasks' mean query loss at their adapted weights."""

    def training_step(self, batch):
        return torch.stack([((t.batch[1] @ t.params["w"] - t.batch[1].sum(-1)) ** 2).mean()
                            for t in self.tasks]).mean()


class TaskW(mlo.WindowProblem):
    """Fast weights started in ``init_window`` from the meta problem (or not: ``init``)."""

    init = "params"

    def init_window(self, batch):
        if self.init == "params":
            return {"w": self.meta.params["w"]}
        if self.init == "detached":                      # the mistake: a copy without graph
            return {"w": self.meta.params["w"].detach().clone().requires_grad_()}
        return {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}   # never reads

    def training_step(self, batch):
        x = batch[0]
        return ((x @ self.params["w"] - 2.0 * x.sum(-1)) ** 2).mean()


def run_maml(init="params", first_order=False, steps=1, windows=2):
    g = torch.Generator().manual_seed(3)
    meta = MetaW("meta", params={"w": torch.randn(3, generator=g, dtype=torch.float64)},
                 optimizer_kwargs={"lr": 0.05})
    tasks = []
    for i in range(2):
        batches = [(torch.randn(6, 3, generator=g, dtype=torch.float64),
                    torch.randn(4, 3, generator=g, dtype=torch.float64)) for _ in range(windows)]
        t = TaskW(f"task{i}", optimizer_kwargs={"lr": 0.1}, data=batches, first_order=first_order,
                  config=mlo.ProblemConfig(method="unrolled", unroll_steps=steps))
        t.meta, t.init = meta, init
        tasks.append(t)
    meta.tasks = tasks
    eng = mlo.Engine(tasks + [meta], {"u2l": {meta: tasks}, "l2u": {t: [meta] for t in tasks}})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eng.run(steps * windows)
    assert eng.state.linted == set(eng.problems)           # the lint did look at every problem
    return eng, [str(x.message) for x in w if "graph lint" in str(x.message)]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_read_in_init_window_gives_no_warning(steps, first_order):
    eng, lint = run_maml(first_order=first_order, steps=steps)
    assert lint == []
    assert float(eng.last_hypergradient["meta"]["w"].abs().max()) > 1e-6


def test_maml_window_started_from_a_detached_copy_warns_per_task():
    eng, lint = run_maml("detached")
    assert len(lint) == 2, lint
    for i, msg in enumerate(lint):
        assert f"problem 'task{i}' declares that it reads 'meta'" in msg
        assert "it reads 'meta' (in init_window) but drops the graph" in msg
        assert "the hypergradient of 'meta' through 'task" in msg
    assert float(eng.last_hypergradient["meta"]["w"].abs().max()) == 0.0   # what it warns about


def test_maml_window_that_never_reads_the_meta_problem_warns():
    _, lint = run_maml("never")
    assert len(lint) == 2 and all("it never reads 'meta'" in m for m in lint), lint
