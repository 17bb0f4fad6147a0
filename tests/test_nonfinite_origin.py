"""Issue 20: a non-finite hypergradient names the lower whose loss went non-finite.

CG, Neumann and finite differences re-evaluate a lower's loss — at its current
iterate, or at ``θ ± εv`` — and differentiate it. When that evaluation (or its
derivatives) is NaN, the guard's error names the upper *and* says which lower's loss,
on which path, by which method, in which evaluation:

1. a lower whose last step leaves the domain of its loss (``−√(1 − θ₀)``): its own
   steps evaluated the loss only inside; CG and Neumann are the first to evaluate it
   at the new iterate, where it is NaN;
2. a lower whose loss is finite at every iterate it visits but NaN at the points
   finite differences perturb it to (a barrier ``√(1 − (θ₀ − λ₀)²)`` and a step
   ``‖εv‖ = epsilon`` that crosses it): which of ``θ + εv`` / ``θ − εv`` and ``‖δ‖``;
3. a loss finite everywhere whose Hessian-vector product is not (``|θ₁|^1.5`` at
   ``θ₁ = 0``): the loss is cleared, the derivatives are blamed;
4. a NaN two best responses down reaches the top through the middle's best response;
5. a cotangent that arrives non-finite (from the upper's own loss): the lower is
   named as not to blame;
6. ``nonfinite="skip"``'s warning says the same; a finite run leaves nothing noted.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import mlo
from mlo import nonfinite

DT = torch.float64
TARGET = torch.tensor([0.3, -0.2], dtype=DT)


class Lower(mlo.Problem):
    """``f(θ, λ) = ½‖θ − λ‖² + barrier(θ, λ)``; ``self.up`` is the problem it reads."""

    def __init__(self, name, barrier, method, options, lr, theta0=(0.0, 0.0), reads="up"):
        super().__init__(name, params={"th": torch.tensor(theta0, dtype=DT)}, optimizer=torch.optim.SGD,
                         optimizer_kwargs={"lr": lr},
                         config=mlo.ProblemConfig(method=method, method_options=options, unroll_steps=1))
        self.barrier, self.reads = barrier, reads

    def training_step(self, batch):
        th = self.params["th"]
        lam = getattr(self, self.reads).params[self.key]
        return 0.5 * ((th - lam) ** 2).sum() + self.barrier(th, lam)


class Upper(mlo.Problem):
    """``F = ½‖θ − t‖²`` (``loss`` may replace it); variables ``lam``."""

    def __init__(self, lam, loss=None):
        super().__init__("up", params={"lam": torch.tensor(lam, dtype=DT)}, optimizer=torch.optim.SGD,
                         optimizer_kwargs={"lr": 0.1})
        self.loss = loss or (lambda th: 0.5 * ((th - TARGET) ** 2).sum())

    def training_step(self, batch):
        return self.loss(self.lo.params["th"])


def out_of_domain(th, lam):          # 1: NaN once θ₀ > 1
    return -torch.sqrt(1.0 - th[0])


def barrier(th, lam):                # 2: NaN once |θ₀ − λ₀| > 1
    return -0.1 * torch.sqrt(1.0 - (th[0] - lam[0]) ** 2)


def kink(th, lam):                   # 3: finite value and gradient at θ₁ = 0, Hessian 0.75/√|θ₁|
    return th[1].abs() ** 1.5


def bilevel(barrier_fn, method, options, lam=(2.0, 0.5), lr=1.5, loss=None, config=None):
    up = Upper(lam, loss)
    lo = Lower("lo", barrier_fn, method, options, lr)
    lo.key = "lam"
    up.lo, lo.up = lo, up
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}, config), lo, up


def error_of(engine, iterations=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # the methods' own warnings about the NaN
        with pytest.raises(FloatingPointError) as e:
            engine.run(iterations)
    return str(e.value)


HEAD = "problem 'up': non-finite hypergradient (in 'lam') at iteration 0 (its update 1): "


@pytest.mark.parametrize("method,options", [("cg", {"max_iter": 7}), ("neumann", {"iterations": 4, "alpha": 0.3})])
def test_a_step_out_of_the_domain_is_named(method, options):
    engine, lo, _ = bilevel(out_of_domain, method, options)
    msg = error_of(engine)
    assert float(lo.params["th"][0].detach()) == 2.25         # θ₀ = 0 − 1.5·(0 − 2 + ½): outside θ₀ < 1
    assert msg.startswith(
        HEAD + f"problem 'lo''s loss evaluated by {method} for the hypergradient of 'up' (path up -> lo -> "
        f"up) returned nan at its current iterate θ (evaluation 1 of 1); its parameters and optimizer "
        f"state are unchanged"), msg
    assert not nonfinite._ORIGINS                      # taken by the guard


def fd_expectation(lo, up, epsilon):
    """Which of θ ± εv leaves |θ₀ − λ₀| < 1 first (plus is evaluated first), by hand."""
    th, lam = lo.params["th"].detach(), up.params["lam"].detach()
    v = th - TARGET                                    # ∂F/∂θ
    delta = epsilon * v / v.norm()
    outside = [bool(abs(p[0] - lam[0]) > 1) for p in (th + delta, th - delta)]
    assert abs(float(th[0] - lam[0])) < 1              # finite where the lower stands
    return outside


@pytest.mark.parametrize("epsilon,evaluation,sign", [(1.5, 1, "+"), (0.9, 2, "−")])
def test_finite_differences_at_a_perturbed_point(epsilon, evaluation, sign):
    # λ = (−0.6, −0.2): one step from θ = 0 takes the lower to θ ≈ (−0.34, −0.1), with
    # θ₀ − λ₀ ≈ 0.26 (inside); v = θ − t points along −θ₀ (v₀/‖v‖ ≈ −0.99), so θ + εv
    # leaves the barrier's domain for ε > 1.28, θ − εv for ε > 0.75: ε = 1.5 crosses
    # on the plus side (evaluated first), ε = 0.9 only on the minus side (second)
    engine, lo, up = bilevel(barrier, "finite_difference", {"epsilon": epsilon}, lam=(-0.6, -0.2), lr=0.5)
    msg = error_of(engine)
    outside = fd_expectation(lo, up, epsilon)
    assert outside == ([True, True] if evaluation == 1 else [False, True])
    assert msg.startswith(
        HEAD + f"problem 'lo''s loss evaluated by finite_difference for the hypergradient of 'up' (path up -> "
        f"lo -> up) returned nan at the perturbed iterate θ {sign} δ (‖δ‖ = {epsilon:.3g}, δ along the "
        f"vector v) (evaluation {evaluation} of 2); "), msg


@pytest.mark.parametrize("method,options", [("cg", {"max_iter": 7}), ("neumann", {"iterations": 4, "alpha": 0.3})])
def test_a_finite_loss_with_a_non_finite_hessian_vector_product(method, options):
    # θ₁ starts at 0 and stays there (∂|θ₁|^1.5/∂θ₁ = 0), F reads θ₁ (v₁ = −t₁ ≠ 0)
    engine, lo, _ = bilevel(kink, method, options, lam=(0.5, 0.0), lr=0.5)
    msg = error_of(engine)
    assert float(lo.params["th"][1].detach()) == 0.0
    assert msg.startswith(
        HEAD + f"problem 'lo''s loss evaluated by {method} for the hypergradient of 'up' (path up -> lo -> "
        f"up) returned a finite loss (1 evaluation), but the Hessian-vector products and mixed "
        f"second derivatives {method} takes of it were not finite; "), msg


def test_a_nan_down_the_path_reaches_the_top():
    """M reads T, B reads M, T reads B (path T -> M -> B -> T; neither M nor B has a
    path of its own); B steps out of its domain. B's best response (cg) goes NaN for
    M; M's (cg), handed that NaN, is not the origin and passes B's on to T."""
    top = mlo.Problem("T", params={"lam": torch.tensor([2.0, 0.5], dtype=DT)}, optimizer=torch.optim.SGD,
                      optimizer_kwargs={"lr": 0.1})
    top.training_step = lambda batch: 0.5 * ((bot.params["th"] - TARGET) ** 2).sum()
    mid = Lower("M", lambda th, lam: 0.0, "cg", {"max_iter": 5}, 0.1, theta0=(2.0, 0.5), reads="top")
    mid.top, mid.key = top, "lam"
    bot = Lower("B", out_of_domain, "cg", {"max_iter": 5}, 1.5, reads="mid")
    bot.mid, bot.key = mid, "th"
    engine = mlo.Engine([bot, mid, top], {"u2l": {top: [mid], mid: [bot]}, "l2u": {bot: [top]}})
    assert engine.graph.paths("T") == [("T", "M", "B", "T")]
    assert not engine.graph.paths("B") and not engine.graph.paths("M")
    msg = error_of(engine)
    assert msg.startswith(
        "problem 'T': non-finite hypergradient (in 'lam') at iteration 0 (its update 1): problem 'B''s loss "
        "evaluated by cg for the hypergradient of 'T' (path T -> M -> B -> T) returned nan at its current "
        "iterate θ (evaluation 1 of 1); "), msg
    assert not nonfinite._ORIGINS


def test_a_non_finite_cotangent_is_not_the_lower_s_fault():
    # F = √(θ₁²) at θ₁ = 0: F = 0, ∂F/∂θ₁ = 0·∞ = nan; the lower's loss is innocent
    engine, lo, _ = bilevel(lambda th, lam: 0.0 * th.sum(), "cg", {"max_iter": 5}, lam=(0.5, 0.0), lr=0.5,
                            loss=lambda th: 0.5 * (th[0] - 0.3) ** 2 + torch.sqrt(th[1] ** 2))
    msg = error_of(engine)
    assert msg.startswith(
        HEAD + "problem 'lo''s loss evaluated by cg for the hypergradient of 'up' (path up -> lo -> up) was not "
        "to blame: the vector v its best response was applied to was already non-finite; "), msg


def test_skip_warns_with_the_origin_and_a_finite_run_notes_nothing():
    engine, _, _ = bilevel(out_of_domain, "cg", {"max_iter": 7}, config=mlo.EngineConfig(nonfinite="skip"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.run(1)
    ours = [str(w.message) for w in caught if "update skipped" in str(w.message)]
    assert len(ours) == 1 and "problem 'lo''s loss evaluated by cg for the hypergradient of 'up' (path up -> " \
        "lo -> up) returned nan at its current iterate θ" in ours[0], ours
    assert not nonfinite._ORIGINS
    finite, _, _ = bilevel(barrier, "cg", {"max_iter": 7}, lam=(0.0, 0.5), lr=0.5)
    finite.run(6)
    assert finite.counts() == {"lo": 6, "up": 6} and not nonfinite._ORIGINS


def test_the_good_path_traces_nothing(monkeypatch):
    """The traces are deferred to the guard: a finite run never checks a best response's
    vectors (no host read per implicit VJP), a non-finite update runs each trace once,
    before the step; a report leaves no trace behind for the next update."""
    calls = []
    real = nonfinite.all_finite
    monkeypatch.setattr(nonfinite, "all_finite", lambda ts: calls.append(1) or real(ts))
    finite, _, _ = bilevel(barrier, "cg", {"max_iter": 7}, lam=(0.0, 0.5), lr=0.5)
    finite.run(6)
    finite.gradient("up")
    assert calls == [] and finite.updater.traces == [] and not nonfinite._ORIGINS
    engine, lo, _ = bilevel(out_of_domain, "cg", {"max_iter": 7}, config=mlo.EngineConfig(nonfinite="skip"))
    before = lo.params["th"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.run(1)
    assert calls                       # traced: the update was non-finite
    assert engine.updater.traces == [] and not nonfinite._ORIGINS
    assert not torch.equal(before, lo.params["th"])     # (the lower stepped; the upper skipped)
