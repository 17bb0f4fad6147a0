"""``ProblemConfig(implicit_batch=...)``: which batches an implicit or finite-difference
method evaluates the lower loss on (issue 21; docs/methods.md#which-batch-an-implicit-method-sees).

Float64. The lower is ridge regression with per-example weights, the upper's variables::

    f_b(w, a) = ½ mean_{i∈b} a_i (x_iᵀw − y_i)² + ½ρ‖w‖²,     F(w) = ½‖X_v w − y_v‖²,

its data a re-iterable list of batches ``(idx, X, y)``, ``unroll_steps=3``. Every
hypergradient the upper applies is checked against a naive computation on exactly the
batches the option promises — ``f_B = mean_{b∈B} f_b``, its Hessian and mixed derivative
by ``torch.autograd.functional`` on the explicitly assembled loss, a dense solve — at the
state of that update:

* ``"last"``: ``B`` = the lower's last step's batch (stream position 3j+2 in window j);
* ``"fresh"``: ``B`` = the next batch of its stream (position 4j+3; its steps take 4j..4j+2);
* ``"window"``: ``B`` = the window's three batches (3j, 3j+1, 3j+2).

CG to convergence gives ``−Jᵀ H⁻¹ g``, Neumann ``−Jᵀ N_K g``, finite differences
``−Jᵀ g`` (exact: ``∇_a f`` is quadratic in ``w``), with ``H = ∂²_ww f_B``,
``J = ∂(∇_w f_B)/∂a`` and ``g = ∂F/∂w``.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mlo
from mlo import checkpoint
from test_reliability_checkpoint import equal

DT = torch.float64
D, N, BS, K = 3, 12, 2, 3       # features, examples, batch size, unroll_steps
RHO, LR_LO, LR_UP = 0.3, 0.3, 0.05
NB = N // BS                    # batches in the stream (it cycles)


def setting(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=gen, dtype=DT)
    y = torch.randn(N, generator=gen, dtype=DT)
    Xv, yv = torch.randn(8, D, generator=gen, dtype=DT), torch.randn(8, generator=gen, dtype=DT)
    a0 = 0.5 + torch.rand(N, generator=gen, dtype=DT)
    w0 = torch.randn(D, generator=gen, dtype=DT)
    perm = torch.randperm(N, generator=gen)
    stream = [(perm[k * BS:(k + 1) * BS], X[perm[k * BS:(k + 1) * BS]], y[perm[k * BS:(k + 1) * BS]])
              for k in range(NB)]
    return {"X": X, "y": y, "Xv": Xv, "yv": yv, "a0": a0, "w0": w0, "stream": stream}


def batch_loss(w, a, batch):
    idx, Xb, yb = batch
    return 0.5 * (a[idx] * (Xb @ w - yb) ** 2).mean() + 0.5 * RHO * (w * w).sum()


class Lower(mlo.Problem):
    def training_step(self, batch):
        return batch_loss(self.params["w"], self.up.params["a"], batch)


class Upper(mlo.Problem):
    def __init__(self, S, **kw):
        super().__init__("up", params={"a": S["a0"]}, optimizer_kwargs={"lr": LR_UP, "momentum": 0.2}, **kw)
        self.S, self.seen = S, []

    def training_step(self, batch):
        w = self.lo.params["w"]
        self.seen.append((w.detach().clone(), self.params["a"].detach().clone()))
        return 0.5 * ((self.S["Xv"] @ w - self.S["yv"]) ** 2).sum() + 0 * self.params["a"].sum()


def build(S, method, options, implicit_batch=None, upper_config=None, engine_config=None):
    cfg = {"unroll_steps": K, "method": method, "method_options": dict(options)}
    if implicit_batch is not None:
        cfg["implicit_batch"] = implicit_batch
    up = Upper(S, config=upper_config)
    lo = Lower("lo", params={"w": S["w0"]}, optimizer_kwargs={"lr": LR_LO}, data=S["stream"],
               config=mlo.ProblemConfig(**cfg))
    up.lo, lo.up = lo, up
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}, engine_config), up, lo


def naive(S, method, options, w, a, batches):
    """The method's hypergradient on ``mean_{b∈batches} f_b``, from the assembled loss."""
    def f(w_, a_):
        return sum(batch_loss(w_, a_, b) for b in batches) / len(batches)

    def grad_w(a_):
        w_ = w.detach().requires_grad_()
        return torch.autograd.grad(f(w_, a_), w_, create_graph=True)[0]

    H = torch.autograd.functional.hessian(lambda w_: f(w_, a), w)
    J = torch.autograd.functional.jacobian(grad_w, a)            # [D, N]
    g = S["Xv"].T @ (S["Xv"] @ w - S["yv"])
    if method == "cg":
        u = torch.linalg.solve(H, g)
    elif method == "neumann":
        M = torch.eye(D, dtype=DT) - options["alpha"] * H
        u = options["alpha"] * sum(torch.linalg.matrix_power(M, k) for k in range(options["iterations"] + 1)) @ g
    else:
        assert method == "finite_difference" and not options.get("scale_by_lr")
        u = g
    return -J.T @ u


def promised(S, option, j, k=K):
    """The stream batches option ``option`` promises for upper update ``j`` (0-based)."""
    s = S["stream"]
    if option == "fresh":
        return [s[((k + 1) * j + k) % NB]]
    first = k * j
    if option == "window":
        return [s[(first + i) % NB] for i in range(k)]
    return [s[(first + k - 1) % NB]]


METHODS = {"cg": ({"max_iter": 20, "tol": 1e-13}, 1e-11),
           "neumann": ({"iterations": 6, "alpha": 0.4}, 1e-11),
           "finite_difference": ({"epsilon": 0.02}, 1e-7)}


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("option", ["last", "fresh", "window"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_hypergradient_is_that_of_the_promised_batches(method, option):
    S = setting()
    opts, tol = METHODS[method]
    eng, up, _ = build(S, method, opts, option)
    others = [o for o in ("last", "fresh", "window") if o != option]
    for j in range(3):
        eng.run(K)
        assert eng.counts() == {"lo": K * (j + 1), "up": j + 1}
        got = eng.last_hypergradient["up"]["a"]
        w, a = up.seen[-1]
        want = naive(S, method, opts, w, a, promised(S, option, j))
        assert rel(got, want) < tol, (j, rel(got, want))
        # the check can fail: the other options' batches give other hypergradients here
        for o in others:
            assert rel(got, naive(S, method, opts, w, a, promised(S, o, j))) > 1e-2, (j, o)
    taken = eng.state["lo"].batches_taken
    assert taken == (3 * (K + 1) if option == "fresh" else 3 * K)


def test_last_is_the_default_and_bitwise_unchanged():
    """``implicit_batch="last"`` given or not is one run, bit for bit (the code path
    of before: ``P.last_batch``)."""
    S = setting(1)
    runs = []
    for ib in (None, "last"):
        eng, up, lo = build(S, "cg", {"max_iter": 20, "tol": 1e-13}, ib)
        eng.run(3 * K)
        runs.append((up.module.a.detach().clone(), lo.module.w.detach().clone(),
                     eng.last_hypergradient["up"]["a"].clone(), eng.state["lo"].batches_taken))
        assert lo.window_batches == ()
    assert mlo.ProblemConfig().implicit_batch == "last"
    (a1, w1, h1, t1), (a2, w2, h2, t2) = runs
    assert torch.equal(a1, a2) and torch.equal(w1, w2) and torch.equal(h1, h2) and t1 == t2 == 3 * K


def test_window_restarts_at_every_readiness_and_stays_bounded():
    """With ``update_every=2`` on the upper the window still restarts at each readiness
    (as an unrolled window would); the kept batches are only the current window's."""
    S = setting(2)
    opts = {"max_iter": 20, "tol": 1e-13}
    eng, up, lo = build(S, "cg", opts, "window", upper_config=mlo.ProblemConfig(update_every=2))
    for it in range(1, 4 * K + 1):
        eng.run(1)
        assert len(lo.window_batches) == (it - 1) % K + 1
    assert eng.counts() == {"lo": 4 * K, "up": 2}
    # the second update (readiness 4) saw the window of steps 9, 10, 11
    w, a = up.seen[-1]
    want = naive(S, "cg", opts, w, a, promised(S, "window", 3))
    assert rel(eng.last_hypergradient["up"]["a"], want) < 1e-11


def test_fresh_uses_one_batch_per_update_and_reports_consume_nothing():
    """A report (``engine.gradient``) and the monitor peek the fresh batch: the run with
    them is the run without, bit for bit, and the monitor's reference (CG, converged)
    is the hypergradient applied — it saw the same batch."""
    S = setting(3)
    opts = {"max_iter": 20, "tol": 1e-13}
    eng, _, lo = build(S, "cg", opts, "fresh")
    eng.run(4 * K)
    mon, _, lo_m = build(S, "cg", opts, "fresh", engine_config=mlo.EngineConfig(
        monitor={"every": 1, "reference": ("cg", {"max_iter": 30, "tol": 1e-13})}))
    rep, _, lo_r = build(S, "cg", opts, "fresh")
    for _ in range(4 * K):
        rep.run(1)
        first = rep.gradient("up", batch=None)["grad"]["a"]
        again = rep.gradient("up", batch=None)["grad"]["a"]
        assert torch.equal(first, again)       # the same peeked batch, twice
    mon.run(4 * K)
    for e, lo_x in ((mon, lo_m), (rep, lo_r)):
        assert torch.equal(e.problems["up"].module.a, eng.problems["up"].module.a)
        assert torch.equal(lo_x.module.w, lo.module.w)
        assert e.state["lo"].batches_taken == eng.state["lo"].batches_taken == 4 * (K + 1)
    assert mon.records["up"]["monitor_rel_error"] < 1e-10


def snapshot(eng):
    return {"params": {n: {k: t.detach().clone() for k, t in P.own_state().items()}
                       for n, P in eng.problems.items()},
            "optim": {n: copy.deepcopy(P.optimizer.state_dict()) for n, P in eng.problems.items()},
            "hyper": {n: {k: t.clone() for k, t in h.items()} for n, h in eng.last_hypergradient.items()},
            "counters": eng.state.counters()}


@pytest.mark.parametrize("option", ["fresh", "window"])
@pytest.mark.parametrize("stop", [4, 5, 6])
def test_resume_is_bitwise_the_uninterrupted_run(option, stop, tmp_path):
    """Saved mid-window (4, 5: one and two steps into the second window) and between
    windows (6), resumed with ``realign_data=True``: the fresh batches consumed are
    counted in ``batches_taken`` and the window's earlier batches are recovered (the last
    ``since`` batches of the realigned stream)."""
    S = setting(4)
    opts, total = {"iterations": 8, "alpha": 0.4}, 5 * K
    ref, *_ = build(S, "neumann", opts, option)
    ref.run(total)
    a, *_ = build(S, "neumann", opts, option)
    a.run(stop)
    expect_taken = stop + (stop // K if option == "fresh" else 0)
    assert a.state["lo"].batches_taken == expect_taken
    checkpoint.save(a, tmp_path / "ck.pt")
    b, _, lo_b = build(S, "neumann", opts, option)
    checkpoint.load(b, tmp_path / "ck.pt", realign_data=True)
    if option == "window":
        assert len(lo_b.window_batches) == stop % K
    b.run(total - stop)
    assert equal(snapshot(b), snapshot(ref))
    # The checks can fail: realigned past the steps' batches only (not the fresh ones), or
    # without the window's earlier batches, the resumed run is another one.
    if option == "window" and stop % K == 0:
        return                  # (saved between windows: nothing to recover)
    c, _, lo_c = build(S, "neumann", opts, option)
    checkpoint.load(c, tmp_path / "ck.pt", realign_data=True)
    if option == "fresh":
        lo_c.skip_batches(lo_c.step_count)
    else:
        c.state["lo"].window_batches = []
    c.run(total - stop)
    assert not equal(snapshot(c)["params"], snapshot(ref)["params"])


@pytest.mark.parametrize("bad", ["all", "Window", "", None, 1, ["last"]])
def test_bad_value_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"ProblemConfig\.implicit_batch must be one of 'last', "
                                         r"'fresh', 'window', got"):
        mlo.ProblemConfig(method="cg", implicit_batch=bad)
    with pytest.raises(ValueError, match="implicit_batch"):
        mlo.ProblemConfig.from_dict({"method": "cg", "implicit_batch": bad})


@pytest.mark.parametrize("option", ["fresh", "window"])
def test_refused_with_a_window_method(option):
    """``unrolled`` differentiates through the steps and their batches: no choice to make."""
    with pytest.raises(ValueError, match=f"implicit_batch='{option}' with method='unrolled'"):
        mlo.ProblemConfig(implicit_batch=option)        # (the default method is unrolled)
    with pytest.raises(ValueError, match="actual steps"):
        mlo.ProblemConfig(method="unrolled", implicit_batch=option, unroll_steps=3)
    assert mlo.ProblemConfig(method="unrolled", implicit_batch="last").implicit_batch == "last"
    for m in ("cg", "neumann", "finite_difference", "darts", "sama"):
        assert mlo.ProblemConfig(method=m, implicit_batch=option).implicit_batch == option


# ------------------------------------------------------------------ issue 21's setting
def flipped_labels(seed=0, n=200, d=10, flip=0.3, bs=20):
    """Logistic regression with per-example weights ``sigmoid(s_i)`` (the upper's
    variables); ``flip`` of the training labels flipped; a clean validation set."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen, dtype=DT)
    X = torch.randn(n, d, generator=gen, dtype=DT)
    y = (X @ w_true > 0).to(DT)
    bad = torch.rand(n, generator=gen) < flip
    y_noisy = torch.where(bad, 1 - y, y)
    Xv = torch.randn(n, d, generator=gen, dtype=DT)
    yv = (Xv @ w_true > 0).to(DT)
    perm = torch.randperm(n, generator=gen)
    stream = [(perm[k:k + bs], X[perm[k:k + bs]], y_noisy[perm[k:k + bs]]) for k in range(0, n, bs)]
    return {"stream": stream, "Xv": Xv, "yv": yv, "bad": bad, "d": d, "n": n}


def reweighting(S, option, method="finite_difference", options=None, unroll=5, lr_up=30.0, lr_lo=0.5,
                wd=1e-3):
    """The engine of :func:`flipped_labels`: lower weighted logistic regression, upper the
    clean validation loss through the lower's iterate."""
    import torch.nn.functional as F

    class Lo(mlo.Problem):
        def training_step(self, batch):
            idx, Xb, yb = batch
            wts = torch.sigmoid(self.up.params["s"][idx])
            loss = F.binary_cross_entropy_with_logits(Xb @ self.params["w"], yb, reduction="none")
            return (wts * loss).mean() + wd * (self.params["w"] ** 2).sum()

    class Up(mlo.Problem):
        def training_step(self, batch):
            logits = S["Xv"] @ self.lo.params["w"]
            return F.binary_cross_entropy_with_logits(logits, S["yv"]) + 0 * self.params["s"].sum()

    up = Up("up", params={"s": torch.zeros(S["n"], dtype=DT)}, optimizer_kwargs={"lr": lr_up})
    lo = Lo("lo", params={"w": torch.zeros(S["d"], dtype=DT)}, optimizer_kwargs={"lr": lr_lo},
            data=S["stream"], config=mlo.ProblemConfig(unroll_steps=unroll, method=method,
                                                       method_options=options or {}, implicit_batch=option))
    up.lo, lo.up = lo, up
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}), up


def separation(option, method="finite_difference", options=None, iterations=300, seed=0, n=200):
    """``(AUC, mean weight clean − flipped)`` of the learned weights after ``iterations``:
    the AUC is the probability that a clean example weighs more than a flipped one."""
    S = flipped_labels(seed, n=n)
    eng, up = reweighting(S, option, method, options)
    eng.run(iterations)
    wts = torch.sigmoid(up.module.s.detach())
    clean, flip = wts[~S["bad"]], wts[S["bad"]]
    auc = (clean[:, None] > flip[None, :]).to(DT).mean() + 0.5 * (clean[:, None] == flip[None, :]).to(DT).mean()
    return float(auc), float(clean.mean() - flip.mean())


def test_window_moves_every_example_of_the_window():
    """After one upper update, ``"last"`` moved the weights of the last batch's examples
    only; ``"window"`` those of all five batches of the window; ``"fresh"`` those of the
    next batch (which the lower has not trained on yet). (The separation numbers of the
    issue's setting are printed by ``python tests/test_implicit_batch.py``.)"""
    S = flipped_labels()
    moved = {}
    for option in ("last", "fresh", "window"):
        eng, _ = reweighting(S, option)
        eng.run(5)
        assert eng.counts() == {"lo": 5, "up": 1}
        moved[option] = set((eng.last_hypergradient["up"]["s"] != 0).nonzero().flatten().tolist())
    idx = [set(b[0].tolist()) for b in S["stream"]]
    assert moved["last"] == idx[4]
    assert moved["fresh"] == idx[5]
    assert moved["window"] == set().union(*idx[:5])


if __name__ == "__main__":      # the measurement (about 15 s on one core)
    # n=200: 10 batches, a multiple of unroll_steps=5: "last" only ever evaluates 2 of them,
    # "fresh" 5; n=220: 11 batches, every batch is some window's last one in turn.
    for n in (200, 220):
        print(f"{n} examples, {n // 20} batches of 20, 30% flipped, unroll_steps=5, 300 iterations, seeds 0 1 2")
        for method, options in (("finite_difference", {}), ("cg", {"max_iter": 20, "damping": 1e-3})):
            for option in ("last", "fresh", "window"):
                res = [separation(option, method, options, seed=s, n=n) for s in range(3)]
                print(f"  {method:18s} {option:7s} AUC " + " ".join(f"{r[0]:.3f}" for r in res)
                      + "   clean−flipped mean weight " + " ".join(f"{r[1]:+.3f}" for r in res))
        res = [separation("last", "unrolled", {}, seed=s, n=n) for s in range(3)]
        print(f"  {'unrolled':18s} {'':7s} AUC " + " ".join(f"{r[0]:.3f}" for r in res)
              + "   clean−flipped mean weight " + " ".join(f"{r[1]:+.3f}" for r in res))
