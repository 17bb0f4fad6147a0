"""Random problem graphs vs an independent path-product reference (float64).

Each seed draws 3–5 problems ``P0..Pn`` (index = level) with random ``u2l`` / ``l2u``
edges from a lower index to a higher one (some pairs both ways, as MLO-MAE's
pretrain–finetune), random dimensions, a random static method per problem (CG,
Neumann with random K and α, finite difference with or without lr scaling), random
``unroll_steps ∈ {1, 2}`` and ``update_every ∈ {1, 2}``, and a shuffled problem
order. Problem ``X`` reading the set ``R(X)``::

    f_X(x; R) = ½‖x − Σ_{Y∈R(X)} W_XY tanh y‖² + 0.1 Σ log cosh x + 0.05 Σ x⁴

After every iteration, for every problem U with paths, ``engine.gradient(U,
by_path=True)`` must equal the formula of docs/design.md#paths computed here from scratch:

* paths enumerated independently: ``U -u2l->⁺ D -l2u->⁺ U`` (one or more u2l steps
  down, one or more l2u steps up; a problem may appear once in each phase);
* each step ``X → Y`` (Y reads X) maps a vector by ``J_YXᵀ`` with
  ``J_YX = −M_Y ∂²f_Y/∂y∂x`` at the current iterates, ``M_Y`` the inverse Hessian as
  Y's method sees it (``H⁻¹``; ``α Σ_{k≤K}(I − αH)^k``; ``I`` or ``η I``), H and the
  mixed block from ``torch.autograd.functional``;
* the term of a path is that product applied to ``∂F_U/∂(last problem)``; the total is
  ``∂F_U/∂u`` plus the sum of the terms.

(The mixed block of f_Y does not depend on y, so central differences are exact.)
"""
from __future__ import annotations

import random

import pytest
import torch

import mlo
from _helpers import rel, Vars

DT = torch.float64
SEEDS = [0, 6, 10, 11, 24, 38]       # 6–15 paths per graph, up to 6 problems long (U twice)


def make(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 5)
    names = [f"P{i}" for i in range(n)]
    u2l, l2u = {}, {}
    for i in range(n):
        for j in range(i + 1, n):
            r = rng.random()
            if r < 0.45 or 0.75 <= r < 0.9:
                u2l.setdefault(names[i], []).append(names[j])
            if 0.45 <= r < 0.9:
                l2u.setdefault(names[j], []).append(names[i])
    reads = {m: set() for m in names}
    for up, los in u2l.items():
        for lo in los:
            reads[lo].add(up)
    for lo, ups in l2u.items():
        for up in ups:
            reads[up].add(lo)
    gen = torch.Generator().manual_seed(seed)
    dims = {m: rng.randint(1, 3) for m in names}
    W = {(a, b): torch.randn(dims[a], dims[b], generator=gen, dtype=DT) / 2 for a in names for b in names}
    lrs = {m: rng.choice([0.1, 0.2, 0.3]) for m in names}
    methods = {m: rng.choice([("cg", {"tol": 1e-14}),
                              ("neumann", {"iterations": rng.randint(1, 4), "alpha": rng.choice([0.3, 0.6])}),
                              ("finite_difference", {"epsilon": 0.02}),
                              ("finite_difference", {"epsilon": 0.01, "scale_by_lr": True})]) for m in names}

    def f(X, x, given):
        tgt = sum((W[(X, Y)] @ torch.tanh(given[Y]) for Y in sorted(reads[X])), torch.zeros(dims[X], dtype=DT))
        return 0.5 * ((x - tgt) ** 2).sum() + 0.1 * torch.log(torch.cosh(x)).sum() + 0.05 * (x ** 4).sum()

    probs = {}
    for X in names:
        probs[X] = Vars(X, {"x": torch.randn(dims[X], generator=gen, dtype=DT)},
                        lambda s, X=X: f(X, s.params["x"], {Y: getattr(s, Y).params["x"] for Y in reads[X]}),
                        optimizer_kwargs={"lr": lrs[X], "momentum": 0.3},
                        config=mlo.ProblemConfig(method=methods[X][0], method_options=dict(methods[X][1]),
                                                 unroll_steps=rng.randint(1, 2), update_every=rng.choice([1, 2])))
    for X in names:
        for Y in reads[X]:
            setattr(probs[X], Y, probs[Y])
    order = names[:]
    rng.shuffle(order)
    eng = mlo.Engine([probs[m] for m in order], {"u2l": u2l, "l2u": l2u})
    return eng, dict(names=names, u2l=u2l, l2u=l2u, reads=reads, f=f, methods=methods, lrs=lrs)


def reference_paths(U, g):
    out = []

    def climb(p):
        for up in g["l2u"].get(p[-1], []):
            if up == U:
                out.append(tuple(p) + (U,))
            else:
                climb(p + [up])

    def descend(p):
        climb(p)
        for lo in g["u2l"].get(p[-1], []):
            descend(p + [lo])

    for lo in g["u2l"].get(U, []):
        descend([U, lo])
    return out


def reference(eng, U, g):
    """``(∂F_U/∂u, {path: term})`` at the engine's current iterates."""
    f, st = g["f"], {m: eng.problems[m].module.x.detach().clone() for m in g["names"]}

    def J(Y, X):                       # best response of Y to X, as Y's method sees it
        given = {Z: st[Z] for Z in g["reads"][Y]}
        H = torch.autograd.functional.hessian(lambda y: f(Y, y, given), st[Y])

        def grad_y(x):
            y = st[Y].clone().requires_grad_()
            return torch.autograd.grad(f(Y, y, {**given, X: x}), y, create_graph=True)[0]

        mixed = torch.autograd.functional.jacobian(grad_y, st[X])
        name, o = g["methods"][Y]
        I = torch.eye(H.shape[0], dtype=DT)
        if name == "cg":
            Minv = torch.linalg.inv(H)
        elif name == "neumann":
            Minv = o["alpha"] * sum(torch.linalg.matrix_power(I - o["alpha"] * H, k)
                                    for k in range(o["iterations"] + 1))
        else:
            Minv = (g["lrs"][Y] if o.get("scale_by_lr") else 1.0) * I
        return -Minv @ mixed

    u = st[U].clone().requires_grad_()
    given = {Z: st[Z].clone().requires_grad_() for Z in sorted(g["reads"][U])}
    grads = torch.autograd.grad(f(U, u, given), [u, *given.values()])
    direct = dict(zip(given, grads[1:]))
    terms = {}
    for p in reference_paths(U, g):
        v = direct[p[-2]]
        for i in range(len(p) - 2, 0, -1):
            v = J(p[i], p[i - 1]).T @ v
        terms[p] = v
    return grads[0], terms


@pytest.mark.parametrize("seed", SEEDS)
def test_random_graph_matches_path_products(seed, measured):
    eng, g = make(seed)
    tops = [U for U in g["names"] if eng.graph.paths(U)]
    assert tops
    errs = []
    for _ in range(3):
        eng.step()
        for U in tops:
            out = eng.gradient(U, by_path=True)
            own, terms = reference(eng, U, g)
            assert sorted(out["paths"]) == sorted(terms)
            total = own + sum(terms.values())
            scale = float(torch.linalg.vector_norm(total))
            errs.append(rel(out["grad"]["x"], total))
            errs += [float(torch.linalg.vector_norm(out["paths"][p]["x"] - t)) / scale for p, t in terms.items()]
    measured("random graphs (3-5 problems, CG/Neumann/FD, random schedules) vs path products",
             max(errs), 1e-11)
