"""A custom inner solver (``Problem.solve``, issue 21), float64.

Ridge lower solved in closed form::

    f(w, a) = ½ mean((Xw − y)²) + ½ e^a ‖w‖²,   w*(a) = A⁻¹ Xᵀy/n,   A = XᵀX/n + e^a I

upper ``F(w) = ½ mean((X_v w − y_v)²)`` over ``a = log λ``. By the implicit function
theorem ``dw*/da = −A⁻¹ (e^a w*)``, so ``dF/da = −e^a w*ᵀ A⁻¹ g``, ``g = X_vᵀ(X_v w* − y_v)/n_v``.
DARTS / finite differences replace ``A⁻¹`` by ``I``: ``−e^a w*ᵀ g`` (the central difference
of ``∂f/∂a``, quadratic in ``w``, has no truncation error).
"""
from __future__ import annotations

import math

import pytest
import torch

import mlo
from _helpers import RecSGD
from mlo.graph import GraphError

DT = torch.float64
D, N, NV = 4, 20, 15
A0 = math.log(0.7)          # the starting log λ (not a default)
UP_LR = 0.8


def ridge_data(seed=3):
    """Two training batches (the lower cycles through them: the hypergradient must be taken
    at the batch of the solve) and a validation set. Each batch's ``XᵀX/n`` has spectral
    norm 0.5, so ``A``'s eigenvalues lie in ``[e^a, e^a + 0.5]``."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(D, generator=gen, dtype=DT)
    batches = []
    for _ in range(2):
        X = torch.randn(N, D, generator=gen, dtype=DT)
        X = X * (0.5 / torch.linalg.matrix_norm(X.T @ X / N, ord=2)) ** 0.5
        batches.append((X, X @ w_true + 0.3 * torch.randn(N, generator=gen, dtype=DT)))
    Xv = torch.randn(NV, D, generator=gen, dtype=DT)
    yv = torch.randn(NV, generator=gen, dtype=DT)
    return batches, Xv, yv


def w_star(X, y, a):
    A = X.T @ X / len(y) + math.exp(a) * torch.eye(D, dtype=DT)
    return torch.linalg.solve(A, X.T @ y / len(y))


def exact_hypergradient(X, y, Xv, yv, a):
    """``dF(w*(a))/da`` in closed form."""
    w = w_star(X, y, a)
    A = X.T @ X / len(y) + math.exp(a) * torch.eye(D, dtype=DT)
    g = Xv.T @ (Xv @ w - yv) / len(yv)
    return float(-math.exp(a) * w @ torch.linalg.solve(A, g))


def darts_hypergradient(X, y, Xv, yv, a):
    """The finite-difference method's value: ``A⁻¹`` replaced by ``I``."""
    w = w_star(X, y, a)
    g = Xv.T @ (Xv @ w - yv) / len(yv)
    return float(-math.exp(a) * w @ g)


class Upper(mlo.Problem):
    def __init__(self, Xv, yv, lr=UP_LR):
        super().__init__("upper", params={"log_lam": torch.tensor(A0, dtype=DT)},
                         optimizer=RecSGD, optimizer_kwargs={"lr": lr})
        self.Xv, self.yv = Xv, yv

    def training_step(self, batch):
        w = self.lower.params["w"]
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).mean() + 0 * self.params["log_lam"]


class RidgeLower(mlo.Problem):
    """Solved in closed form; ``SGD(lr=0.05)`` would need many steps (and is not used)."""

    def __init__(self, upper, batches, method="cg", options=None, result=None):
        super().__init__("lower", params={"w": torch.zeros(D, dtype=DT)}, data=batches,
                         optimizer_kwargs={"lr": 0.05},
                         config=mlo.ProblemConfig(method=method, method_options=options or {}))
        self.upper = upper
        self.result = result        # a function of the correct solution (refusal tests)
        self.solved_at = []         # the log λ each solve saw
        self.batches = []           # and its batch

    def training_step(self, batch):
        X, y = batch
        w = self.params["w"]
        lam = self.upper.params["log_lam"].exp()
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * lam * (w ** 2).sum()

    def solve(self, batch):
        X, y = batch
        a = self.upper.params["log_lam"]
        assert not a.requires_grad and a.grad_fn is None     # a plain detached value
        self.solved_at.append(float(a))
        self.batches.append(batch)
        eye = torch.eye(X.shape[1], dtype=X.dtype)
        w = torch.linalg.solve(X.T @ X / len(y) + a.exp() * eye, X.T @ y / len(y))
        return {"w": w} if self.result is None else self.result(w)


def ridge_engine(method="cg", options=None, result=None, lr=UP_LR):
    batches, Xv, yv = ridge_data()
    up = Upper(Xv, yv, lr)
    lo = RidgeLower(up, batches, method, options, result)
    up.lower = lo
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    return eng, up, lo, (batches, Xv, yv)


class CheckLower:
    """After each lower update: the lower equals ``w*(a)`` at the ``a`` its solve saw."""

    def __init__(self):
        self.errors = []

    def after_update(self, engine, problem):
        if problem.name == "lower":
            X, y = problem.batches[-1]
            a = problem.solved_at[-1]
            assert a == float(problem.upper.params["log_lam"].detach())
            err = float((problem.params["w"].detach() - w_star(X, y, a)).abs().max())
            self.errors.append(err)


# ------------------------------------------------------------------ (a) the solution
def test_lower_is_the_closed_form_solution_after_each_update():
    eng, _, lo, data = ridge_engine()
    check = CheckLower()
    eng.run(4, callbacks=[check])
    assert len(check.errors) == 4 and max(check.errors) <= 1e-12, check.errors
    assert eng.counts() == {"lower": 4, "upper": 4}
    assert [b[0] is data[0][i % 2][0] for i, b in enumerate(lo.batches)] == [True] * 4
    X, y = lo.batches[-1]
    a = lo.solved_at[-1]
    w = w_star(X, y, a)
    f = 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * math.exp(a) * (w ** 2).sum()
    assert abs(eng.records["lower"]["loss"] - float(f)) <= 1e-14
    assert not lo.params["w"].requires_grad or lo.params["w"].grad_fn is None
    assert lo.optimizer.state == {}          # the optimizer never stepped


# ------------------------------------------------------------------ (b) hypergradients
@pytest.mark.parametrize("method, options, tol", [
    ("cg", {"max_iter": 30, "tol": 1e-14}, 1e-13),
    ("neumann", {"iterations": 100, "alpha": 0.6}, 1e-13),
])
def test_implicit_hypergradient_is_the_closed_form(method, options, tol):
    eng, up, lo, data = ridge_engine(method, options)
    eng.run(3)
    got = [float(g) for g in up.optimizer.record]
    want = [exact_hypergradient(*b, *data[1:], a) for a, b in zip(lo.solved_at, lo.batches)]
    assert len(got) == 3
    for g, w in zip(got, want):
        assert abs(g - w) <= tol * max(1.0, abs(w)), (got, want)
    assert min(abs(w) for w in want) > 1e-3      # not a trivially small value


@pytest.mark.parametrize("method", ["finite_difference", "darts"])
def test_finite_difference_hypergradient_at_the_solution(method):
    eng, up, lo, data = ridge_engine(method, {"epsilon": 0.05})
    eng.run(3)
    got = [float(g) for g in up.optimizer.record]
    want = [darts_hypergradient(*b, *data[1:], a) for a, b in zip(lo.solved_at, lo.batches)]
    # ∂f/∂a is quadratic in w: the central difference is exact up to rounding.
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-12, (got, want)
    exact = [exact_hypergradient(*b, *data[1:], a) for a, b in zip(lo.solved_at, lo.batches)]
    assert max(abs(g - e) for g, e in zip(got, exact)) > 1e-3   # (a different quantity)


# ------------------------------------------------------------------ (c) a whole run
def test_run_matches_a_hand_written_loop():
    T = 6
    eng, up, lo, data = ridge_engine("cg", {"max_iter": 30, "tol": 1e-14})
    eng.run(T)
    (batches, Xv, yv), a, history = data, A0, []
    for t in range(T):
        history.append(a)
        a -= UP_LR * exact_hypergradient(*batches[t % 2], Xv, yv, a)
    assert lo.solved_at == pytest.approx(history, abs=1e-10, rel=0)
    assert abs(float(up.params["log_lam"]) - a) <= 1e-10
    assert abs(a - A0) > 1e-2                     # λ moved
    w = w_star(*batches[(T - 1) % 2], history[-1])
    assert float((lo.params["w"] - w).abs().max()) <= 1e-12


# ------------------------------------------------------------------ (d) L-BFGS, logistic
def logistic_data(seed=5, n=40, d=3):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    y = torch.sign(X @ torch.randn(d, generator=gen, dtype=DT) + 0.5 * torch.randn(n, generator=gen, dtype=DT))
    Xv = torch.randn(n, d, generator=gen, dtype=DT)
    yv = torch.sign(Xv @ torch.randn(d, generator=gen, dtype=DT))
    return X, y, Xv, yv


def logistic_loss(X, y, w, lam):
    return torch.nn.functional.softplus(-y * (X @ w)).mean() + 0.5 * (lam * w ** 2).sum()


def newton_solution(X, y, a, iters=60):
    """An independent solver for the reference: Newton's method on the lower loss."""
    w = torch.zeros(X.shape[1], dtype=DT)
    lam = a.exp()
    for _ in range(iters):
        g = torch.func.grad(lambda v: logistic_loss(X, y, v, lam))(w)
        H = torch.func.hessian(lambda v: logistic_loss(X, y, v, lam))(w)
        w = w - torch.linalg.solve(H, g)
    return w


class LogisticLower(mlo.Problem):
    def __init__(self, upper, X, y):
        super().__init__("lower", params={"w": torch.zeros(X.shape[1], dtype=DT)}, data=[(X, y)],
                         config=mlo.ProblemConfig(method="cg", method_options={"max_iter": 40, "tol": 1e-14}))
        self.upper = upper

    def training_step(self, batch):
        X, y = batch
        return logistic_loss(X, y, self.params["w"], self.upper.params["log_lam"].exp())

    def solve(self, batch):
        X, y = batch
        lam = self.upper.params["log_lam"].exp()
        w = self.params["w"].clone().requires_grad_()       # warm start from the current value
        opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-15, tolerance_change=0.0,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = logistic_loss(X, y, w, lam)
            loss.backward()
            return loss
        opt.step(closure)
        return {"w": w.detach()}


class LogisticUpper(mlo.Problem):
    def __init__(self, Xv, yv, a0):
        super().__init__("upper", params={"log_lam": a0.clone()}, optimizer=RecSGD,
                         optimizer_kwargs={"lr": 0.3})
        self.Xv, self.yv = Xv, yv

    def training_step(self, batch):
        w = self.lower.params["w"]
        return torch.nn.functional.softplus(-self.yv * (self.Xv @ w)).mean() + 0 * self.params["log_lam"].sum()


def test_lbfgs_solve_gives_cg_hypergradient_equal_to_finite_differences():
    X, y, Xv, yv = logistic_data()
    a0 = torch.tensor([math.log(0.3), math.log(0.05), math.log(0.8)], dtype=DT)
    up = LogisticUpper(Xv, yv, a0)
    lo = LogisticLower(up, X, y)
    up.lower = lo
    eng = mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
    eng.run(2)
    # the first update's λ was a0; the second one's is after one upper SGD step
    a1 = a0 - 0.3 * up.optimizer.record[0]
    for a, got in ((a0, up.optimizer.record[0]), (a1, up.optimizer.record[1])):
        def F(b):
            w = newton_solution(X, y, b)
            return float(torch.nn.functional.softplus(-yv * (Xv @ w)).mean())
        h = 1e-4
        fd = torch.tensor([(F(a + h * e) - F(a - h * e)) / (2 * h) for e in torch.eye(3, dtype=DT)], dtype=DT)
        # central differences' truncation at h = 1e-4 is ~9e-11 here (9e-9 at h = 1e-3)
        assert float((got - fd).abs().max()) <= 5e-10, (got, fd)
        assert float(fd.abs().min()) > 1e-4
    # the L-BFGS solution is the lower's optimum at the last λ
    w_ref = newton_solution(X, y, a1)
    assert float((lo.params["w"] - w_ref).abs().max()) <= 1e-10


# ------------------------------------------------------------------ (e) refusals
@pytest.mark.parametrize("method", ["unrolled", "sama"])
def test_step_methods_are_refused_with_a_solver(method):
    with pytest.raises(GraphError, match=r"problem 'lower' defines solve\(batch\).*"
                                         + method + r".*no steps to differentiate"):
        ridge_engine(method)


def test_default_method_is_refused_with_a_solver():
    batches, Xv, yv = ridge_data()
    up = Upper(Xv, yv)
    lo = RidgeLower(up, batches)
    lo.config = mlo.ProblemConfig()               # the default method: unrolled
    up.lower = lo
    with pytest.raises(GraphError, match="'lower' defines solve"):
        mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})


@pytest.mark.parametrize("result, error, match", [
    (lambda w: {"v": w}, KeyError, r"missing \['w'\], unknown \['v'\]"),
    (lambda w: {"w": w, "extra": w}, KeyError, r"missing \[\], unknown \['extra'\]"),
    (lambda w: {"w": w[:2]}, ValueError, r"\['w'\] has shape \(2,\), the variable has \(4,\)"),
    (lambda w: {"w": w.float()}, TypeError, r"dtype torch.float32, the variable has torch.float64"),
    (lambda w: {"w": w.tolist()}, TypeError, r"\['w'\] must be a tensor, got list"),
    (lambda w: w, TypeError, r"must return a dict .* got Tensor"),
    (lambda w: [w], TypeError, r"must return a dict .* got list"),
])
def test_bad_solutions_are_named_errors_and_change_nothing(result, error, match):
    eng, _, lo, _ = ridge_engine(result=result)
    with pytest.raises(error, match=r"problem 'lower': solve\(batch\).*" + match):
        eng.run(1)
    assert float(lo.params["w"].abs().max()) == 0.0
    assert lo.step_count == 0 and eng.counts() == {"lower": 0, "upper": 0}


def test_nonfinite_solution_raises_and_changes_nothing():
    eng, _, lo, _ = ridge_engine(result=lambda w: {"w": w * float("nan")})
    with pytest.raises(FloatingPointError, match="problem 'lower': solve"):
        eng.run(1)
    assert float(lo.params["w"].abs().max()) == 0.0 and lo.step_count == 0


def test_scheduler_is_refused_with_a_solver():
    batches, Xv, yv = ridge_data()
    up = Upper(Xv, yv)
    lo = RidgeLower(up, batches)
    lo.scheduler = torch.optim.lr_scheduler.StepLR(lo.optimizer, step_size=1)
    up.lower = lo
    with pytest.raises(GraphError, match="'lower' defines solve.*scheduler"):
        mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})
