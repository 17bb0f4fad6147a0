"""MLO-MAE's mask options (``problems.mlo_mae``): sampled masks (``mask_sampling:
gumbel``) and the masking budget (``mask_budget``).

With ``gumbel`` the pretrain stream's batches carry uniform noise ``u [N, L]`` drawn
with the batch (``{"x": x, "noise": u}``); the masker masks the k largest
``log p − log(−log u)`` — k patches sampled without replacement with probabilities
∝ ``p`` — and still weights their losses by ``p``. What is checked:

* the masked set is exactly the top-k of the Gumbel-perturbed log-probabilities
  (by hand), the weights are ``p`` (or ``p / mean`` over the *sampled* set);
* for k = 1 the selection frequencies over many noise draws are ∝ ``p`` (a
  chi-square bound that a uniform or a top-k selection fails);
* the loss is one function of the batch: re-evaluating it (as finite differences
  and Hessian-vector products do) gives the same value, whatever the global RNG;
  the finite-difference hypergradient differs from the top-k one (the masks differ);
* the noise stream is reproducible from the seed, and the setting is validated;
* ``mask_budget = λ``: the mask level's own gradient is exactly ``∇_φ λ·mean_n (mean_i
  p_{n,i} − k/L)²`` on the detached embeddings (by hand, float64), its hypergradient is the
  one without the budget, and ``λ = 0`` leaves the mask with no direct gradient.
"""
from __future__ import annotations

import pytest
import torch

from problems.mae import num_masked, random_masking
from problems.mlo_mae import MLOMAESettings, build, gumbel_scores, with_mask_noise
from test_mlo_mae_graph import data, dict_rel, float64, settings


def _graph(**kw):
    x, y = data(n=16, image_size=8, dtype=torch.float64)
    with float64():
        return build("mlo-mae", settings(image_size=8, mask_sampling="gumbel", **kw), (x, y), seed=1), x


def test_masked_set_is_top_k_of_gumbel_perturbed_log_p():
    g, x = _graph()
    pre = g.problems["pretrain"]
    xb = x[:8]
    u = torch.rand(8, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scores, weights = pre.masker(xb, pre, noise=u)
    p = g.masker(g.mae.patch_embeddings(xb, position=g.settings.mask_input_position)).detach()
    assert torch.equal(weights.detach(), p)                # the losses are weighted by p itself
    k = num_masked(16, g.settings.mask_ratio)
    want = p.log() - (-u.log()).log()
    _, mask, _ = random_masking(g.mae.patch_embeddings(xb), g.settings.mask_ratio, scores=scores.detach())
    for n in range(8):
        assert set(mask[n].nonzero().flatten().tolist()) == set(want[n].topk(k).indices.tolist())
    # and the sample is not the deterministic top-k of p on every row
    top = torch.zeros_like(mask).scatter_(1, p.topk(k, dim=1).indices, 1.0)
    assert not torch.equal(top, mask)


def test_normalised_weights_average_one_over_the_sampled_set():
    g, x = _graph(normalize_weights=True)
    pre = g.problems["pretrain"]
    u = torch.rand(8, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scores, weights = pre.masker(x[:8], pre, noise=u)
    k = num_masked(16, g.settings.mask_ratio)
    masked = scores.detach().topk(k, dim=1).indices
    mean = weights.detach().gather(1, masked).mean(1)
    assert torch.allclose(mean, torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-14)


def test_selection_frequencies_are_proportional_to_p():
    """k = 1: P(patch i is masked) = p_i / Σ p (Gumbel-max). 20 000 draws, chi-square."""
    p = torch.tensor([[0.05, 0.1, 0.2, 0.4, 0.8, 0.9]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    draws = 20000
    u = torch.rand(draws, 6, generator=gen, dtype=torch.float64)
    counts = torch.bincount(gumbel_scores(p, u).argmax(1), minlength=6).double()
    expected = draws * p[0] / p.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, chi2   # 5 dof: P(chi2 > 25) < 2e-4; uniform selection gives ~ 5 000
    uniform = torch.full((6,), draws / 6, dtype=torch.float64)
    assert float(((uniform - expected) ** 2 / expected).sum()) > 1000


def test_loss_is_one_function_of_the_batch():
    g, x = _graph()
    pre = g.problems["pretrain"]
    batch = next(iter(pre.data))
    assert set(batch) == {"x", "noise"} and batch["noise"].shape == (8, 16)
    a = pre.training_step(batch)["loss"]
    torch.manual_seed(123)       # the global RNG plays no part
    b = pre.training_step(batch)["loss"]
    assert torch.equal(a, b)


def test_noise_stream_is_reproducible_and_differs_by_seed():
    x = torch.zeros(10, 1, 4, 4)
    stream = [(x[:5],), (x[5:],)]
    a = [b["noise"] for b in with_mask_noise(iter(stream), 4, seed=3)]
    b = [b["noise"] for b in with_mask_noise(iter(stream), 4, seed=3)]
    c = [b["noise"] for b in with_mask_noise(iter(stream), 4, seed=4)]
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (5, 4) and ((a[0] > 0) & (a[0] < 1)).all()


def test_sampled_masks_change_the_hypergradient_and_run_finite():
    x, y = data(n=16, image_size=8)
    grads = {}
    for sampling in ("topk", "gumbel"):
        g = build("mlo-mae", settings(image_size=8, mask_sampling=sampling), (x, y), seed=1)
        grads[sampling] = g.engine.gradient("mask")["grad"]
        g.engine.run(4)
        assert all(torch.isfinite(p).all() for p in g.masker.parameters())
    assert any(not torch.equal(grads["topk"][k], grads["gumbel"][k]) for k in grads["topk"])


def test_unknown_sampling_is_a_named_error():
    with pytest.raises(ValueError, match="mask_sampling must be one of"):
        MLOMAESettings(mask_sampling="random")


def test_budget_adds_exactly_its_own_gradient(measured):
    x, y = data(n=16, image_size=8, dtype=torch.float64)
    reports = {}
    for lam in (0.0, 0.7):
        with float64():
            g = build("mlo-mae", settings(image_size=8, mask_budget=lam, pretrain_lr=2e-2,
                                          mask_input_position=False), (x, y), seed=2)
        mk = g.problems["mask"]
        batch = next(iter(mk.data))
        reports[lam] = (g, batch, g.engine.gradient("mask", batch=batch))
    g, batch, r = reports[0.7]
    _, _, r0 = reports[0.0]
    assert all(float(t.abs().max()) == 0.0 for t in r0["own"].values())   # no direct gradient
    # by hand: the budget term on the detached patch-only embeddings
    xb = batch[0]
    net = g.masker
    emb = g.mae.patch_embeddings(xb, position=False).detach()
    L = emb.shape[1]
    k = num_masked(L, g.settings.mask_ratio)
    pen = 0.7 * (net(emb).mean(1) - k / L).pow(2).mean()
    names = [n for n, _ in net.named_parameters()]
    hand = dict(zip(names, torch.autograd.grad(pen, list(net.parameters()))))
    measured("MLO-MAE mask_budget own gradient vs hand", dict_rel(r["own"], hand), 1e-12)
    hyper = {n: r["grad"][n] - r["own"][n] for n in names}
    hyper0 = {n: r0["grad"][n] - r0["own"][n] for n in names}
    measured("MLO-MAE mask_budget leaves the hypergradient", dict_rel(hyper, hyper0), 1e-12)


def test_negative_budget_is_a_named_error():
    with pytest.raises(ValueError, match="mask_budget must be >= 0"):
        MLOMAESettings(mask_budget=-1.0)
