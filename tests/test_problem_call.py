"""``Problem.call``: a module method other than ``forward`` read as a differentiable
variable — equal to the module's method outside the engine and at the current iterate
of an open unrolled window, a clear error for a missing method, the same hypergradient
as ``problem(x)`` and the closed forms of :mod:`_ridge_call`, and recorded as a read.
"""
from __future__ import annotations

import pytest
import torch

import mlo
from _helpers import rel
from _ridge_call import D, ift, ridge_data, ridge_engine, unrolled_sgd

torch.set_num_threads(1)


def test_call_equals_the_module_method_outside_the_engine():
    P = ridge_data()
    eng, lo, up = ridge_engine(P, via_call=True, method="unrolled", opts={})
    X = P["Xv"]
    assert torch.equal(lo.call("predict", X), lo.module.predict(X))
    assert torch.equal(lo.call("predict", X, scale=2.5), lo.module.predict(X, scale=2.5))
    assert torch.equal(lo.call("predict", X, 2.5), 2.5 * (X @ lo.module.w))
    # between iterations of an open unrolled window: the current iterate, not the stale module
    eng.step()
    assert eng.state["lo"].iterates is not None and not torch.equal(lo.own_state()["w"], lo.module.w)
    assert torch.equal(lo.call("predict", X).detach(), (X @ lo.own_state()["w"]).detach())
    # an MAE's method with keyword arguments
    from problems.mae import MaskedAutoencoder
    from problems.pretrain import MAEPretrain
    from problems.tokenizers import ImageTokenizer
    torch.manual_seed(0)
    mae = MaskedAutoencoder(ImageTokenizer(4, 2, 1, 8), depth=1, num_heads=2, decoder_dim=8,
                            decoder_depth=1, decoder_heads=2)
    pre = MAEPretrain(mae)
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(pre.call("features", x, pool="mean"), mae.features(x, pool="mean"))
    assert torch.equal(pre.call("patch_embeddings", x), mae.patch_embeddings(x))


def test_call_missing_method_is_a_clear_attribute_error():
    P = ridge_data()
    eng, lo, up = ridge_engine(P, via_call=True)
    with pytest.raises(AttributeError, match=r"problem 'lo'.*PredictOnly.*'nope'"):
        lo.call("nope", P["X"])
    with pytest.raises(AttributeError, match=r"problem 'lo'.*'w'"):   # an attribute, not a method
        lo.call("w", P["X"])
    lo.predict = lambda X: lo.call("predcit", X)                        # inside an engine loss
    with pytest.raises(AttributeError, match=r"problem 'lo'.*'predcit'"):
        eng.step()


@pytest.mark.parametrize("method", ["cg", "unrolled"])
def test_call_inside_a_loss_is_a_differentiable_read(method, measured):
    """The upper reads the lower through ``lower.call("predict", ·)`` (and the lower its own
    variables the same way): same hypergradient as ``lower(·)`` with forward == predict,
    and both equal the closed form."""
    P = ridge_data()
    K, eta = 3, 0.05
    opts = {"max_iter": D, "tol": 0.0} if method == "cg" else {}
    out = {}
    for via_call in (True, False):
        eng, lo, up = ridge_engine(P, via_call, method, opts, K=K, lr=eta)
        eng.run(K)
        assert eng.counts() == {"lo": K, "up": 1}
        out[via_call] = (eng.last_hypergradient["up"]["lam"], up.optimizer.record[0][0], lo)
    h_call, applied, lo = out[True]
    measured(f"Problem.call vs problem(x) read: hypergradient ({method})", rel(h_call, out[False][0]), 1e-14)
    assert torch.equal(applied, h_call)   # the upper has no direct term here
    w_K, unrolled = unrolled_sgd(P, P["lam"], K, eta)
    assert rel(lo.module.w.detach(), w_K) < 1e-13
    exact = ift(P, w_K, P["lam"]) if method == "cg" else unrolled
    label = "IFT −w⊙H⁻¹g at w_K" if method == "cg" else "K-step s_Kᵀg"
    measured(f"Problem.call read, {method} hypergradient vs closed form ({label})", rel(h_call, exact), 1e-10)


def test_call_is_recorded_as_a_read():
    """An undeclared read through ``call`` is caught like one through ``problem(x)``."""
    P = ridge_data()
    eng, lo, up = ridge_engine(P, via_call=True, declare=False, K=1)
    with pytest.raises(mlo.GraphError, match=r"'up' read the variables of 'lo'"):
        eng.step()
