"""MetaMAE building blocks: Nearby-S support on hand-made masks, task-contrastive loss
against a hand computation (issue 10, deliverables 2 and 6)."""
import math

import pytest
import torch

from problems.nearby_support import adjacent_masked, nearby_support
from problems.task_contrastive import TaskProjector, info_nce, mean_pool, task_contrastive_loss


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------ Nearby-S
def test_adjacent_1d_by_hand():
    #            0  1  2  3  4  5  6  7
    mask = t([[1, 1, 0, 1, 1, 1, 0, 1],
              [0, 1, 1, 1, 1, 1, 1, 1]])
    adj = adjacent_masked(mask, (8,))
    want = torch.tensor([[0, 1, 0, 1, 0, 1, 0, 1],
                         [0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(adj, want)


def test_adjacent_2d_four_neighbourhood_by_hand():
    # 4×4 grid, one visible token at (1, 1) and one at (3, 3): diagonals are NOT adjacent.
    grid = torch.ones(4, 4)
    grid[1, 1] = 0
    grid[3, 3] = 0
    adj = adjacent_masked(grid.reshape(1, 16), (4, 4)).reshape(4, 4)
    want = torch.zeros(4, 4, dtype=torch.bool)
    for r, c in [(0, 1), (2, 1), (1, 0), (1, 2), (2, 3), (3, 2)]:
        want[r, c] = True
    assert torch.equal(adj, want)


def test_adjacent_2d_does_not_wrap_rows():
    # Visible token at the end of row 0 must not make the start of row 1 adjacent.
    grid = torch.ones(3, 3)
    grid[0, 2] = 0
    adj = adjacent_masked(grid.reshape(1, 9), (3, 3)).reshape(3, 3)
    assert not adj[1, 0] and adj[0, 1] and adj[1, 2]
    assert int(adj.sum()) == 2


def test_support_ratio_extremes_and_contents():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(64, 36, generator=g) < 0.75).float()
    visible = mask == 0
    adj = adjacent_masked(mask, (6, 6))
    s0 = nearby_support(mask, (6, 6), ratio=0.0, generator=g)
    s1 = nearby_support(mask, (6, 6), ratio=1.0, generator=g)
    assert torch.equal(s0.bool(), visible)
    assert torch.equal(s1.bool(), visible | adj)
    s = nearby_support(mask, (6, 6), ratio=0.3, generator=g).bool()
    assert torch.equal(s & visible, visible)           # every visible token is in
    assert not (s & (mask > 0) & ~adj).any()           # no non-adjacent masked token
    frac = (s & adj).sum().item() / adj.sum().item()   # Bernoulli(0.3) over ~1000 draws
    assert abs(frac - 0.3) < 0.05


def test_support_excludes_padding():
    mask = t([[0, 1, 1, 1]])
    pad = torch.tensor([[False, True, False, False]])
    s = nearby_support(mask, (4,), ratio=1.0, padding=pad)
    assert torch.equal(s, t([[1, 0, 0, 0]]))           # the only neighbour is a pad


def test_support_rejects_bad_input():
    with pytest.raises(ValueError, match="grid"):
        nearby_support(torch.ones(2, 8), (3, 3))
    with pytest.raises(ValueError, match="ratio"):
        nearby_support(torch.ones(2, 4), (4,), ratio=1.5)


# ------------------------------------------------------------- contrastive
def _nt_xent_by_hand(a, b, tau):
    w = [[v / math.sqrt(sum(u * u for u in x)) for v in x] for x in a + b]
    n2, n = len(w), len(a)
    total = 0.0
    for i in range(n2):
        sims = [sum(p * q for p, q in zip(w[i], w[j])) / tau for j in range(n2)]
        pos = (i + n) % n2
        denom = sum(math.exp(sims[j]) for j in range(n2) if j != i)
        total += -(sims[pos] - math.log(denom))
    return total / n2


def test_info_nce_by_hand(measured):
    a = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 3.0, 1.0]]
    b = [[0.9, 0.2, 1.5], [1.0, -0.5, 0.5], [-1.0, 2.0, 0.0]]
    for tau in (0.5, 0.1):
        got = info_nce(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), tau)
        want = _nt_xent_by_hand(a, b, tau)
        measured(f"MetaMAE task contrastive: InfoNCE vs hand computation (tau={tau})",
                 abs(got.item() - want) / abs(want), 1e-12)


def test_task_contrastive_pools_without_cls_and_reaches_both_latents():
    torch.manual_seed(0)
    z = torch.randn(4, 1 + 5, 8, dtype=torch.float64, requires_grad=True)
    zs = torch.randn(4, 1 + 5, 8, dtype=torch.float64, requires_grad=True)
    proj = TaskProjector(8, hidden=16, out=4).double()
    assert torch.equal(mean_pool(z), z[:, 1:].mean(1))
    loss = task_contrastive_loss(z, zs, proj, tau=0.5)
    gz, gzs = torch.autograd.grad(loss, (z, zs))
    assert gz[:, 0].abs().max() == 0 and gzs[:, 0].abs().max() == 0    # CLS not pooled
    assert gz[:, 1:].abs().max() > 0 and gzs[:, 1:].abs().max() > 0    # no stop-gradient
    # Projector layout of the paper: no biases, BatchNorm in the middle.
    assert proj.fc1.bias is None and proj.fc2.bias is None
    assert isinstance(proj.bn, torch.nn.BatchNorm1d)


# ----------------------------------------------------------- latent adaptation
from problems.latent_adaptation import MetaMAEOptions, metamae_loss  # noqa: E402
from problems.mae import MaskedAutoencoder  # noqa: E402
from problems.tokenizers import ImageTokenizer  # noqa: E402


def _tiny(decoder_depth=1):
    torch.manual_seed(0)
    tok = ImageTokenizer(4, 2, 1, 8)                                       # 4 tokens on a 2×2 grid
    mae = MaskedAutoencoder(tok, depth=1, num_heads=2, mlp_ratio=2.0, decoder_dim=8,
                            decoder_depth=decoder_depth, decoder_heads=2, mask_ratio=0.5,
                            attn_impl="math").double()
    proj = TaskProjector(8, hidden=16, out=4).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    scores = torch.rand(3, 4, dtype=torch.float64)
    mask = torch.zeros(3, 4, dtype=torch.float64).scatter_(1, scores.argsort(1)[:, 2:], 1.0)
    support = nearby_support(mask, (2, 2), ratio=0.5, generator=torch.Generator().manual_seed(1))
    return mae, proj, x, (scores, support)


def _params(mae, proj):
    return [p for p in list(mae.parameters()) + list(proj.parameters()) if p.requires_grad]


@pytest.mark.parametrize("decoder_depth", [0, 1])
def test_metamae_gradient_vs_naive_functional_and_finite_differences(measured, decoder_depth):
    mae, proj, x, masks = _tiny(decoder_depth)
    opts = MetaMAEOptions(alpha=0.3, steps=2, contrastive_weight=0.7, tau=0.5)
    params = _params(mae, proj)
    loss = metamae_loss(mae, x, opts, proj, masks=masks)["loss"]
    got = torch.autograd.grad(loss, params)

    # Independent naive version: inner gradients by torch.func.grad, loss assembled by hand.
    def naive():
        scores, support = masks
        z0, mask, ids = mae.forward_encoder(x, scores=scores)
        z = z0
        for _ in range(opts.steps):
            z = z - opts.alpha * torch.func.grad(
                lambda zz: x.shape[0] * mae.forward_loss(x, mae.forward_decoder(zz, ids), support))(z)
        q = mae.forward_loss(x, mae.forward_decoder(z, ids), mask)
        return q + opts.contrastive_weight * info_nce(proj(z0[:, 1:].mean(1)), proj(z[:, 1:].mean(1)), opts.tau)

    ref = torch.autograd.grad(naive(), params)
    err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, ref))
    measured(f"MetaMAE meta-gradient vs naive torch.func version (decoder depth {decoder_depth})", err, 1e-10)

    # Central finite differences along random directions (all parameters at once).
    g = torch.Generator().manual_seed(2)
    worst = 0.0
    for _ in range(3):
        d = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        scale = math.sqrt(sum((v * v).sum().item() for v in d))
        d = [v / scale for v in d]                                  # unit direction
        eps = 1e-5
        def shift(c):
            with torch.no_grad():
                for p, v in zip(params, d):
                    p.add_(c * v)
        shift(eps)
        lp = metamae_loss(mae, x, opts, proj, masks=masks)["loss"].item()
        shift(-2 * eps)
        lm = metamae_loss(mae, x, opts, proj, masks=masks)["loss"].item()
        shift(eps)
        fd = (lp - lm) / (2 * eps)
        an = sum((a * v).sum() for a, v in zip(got, d)).item()
        worst = max(worst, abs(fd - an) / max(abs(an), 1e-12))
    measured(f"MetaMAE meta-gradient vs central finite differences (decoder depth {decoder_depth})", worst, 1e-6)


def test_first_order_differs_by_exactly_the_second_order_term(measured):
    mae, proj, x, masks = _tiny()
    alpha = 0.4
    params = _params(mae, proj)
    second = torch.autograd.grad(metamae_loss(mae, x, MetaMAEOptions(alpha=alpha), proj, masks=masks)["loss"], params)
    first = torch.autograd.grad(metamae_loss(mae, x, MetaMAEOptions(alpha=alpha, first_order=True), proj,
                                             masks=masks)["loss"], params)
    # Second-order term: −α ∂/∂θ ⟨∇_Z [N·L_s](Z0(θ), θ), u⟩ with u = ∂L/∂Z* held fixed.
    scores, support = masks
    z0, mask, ids = mae.forward_encoder(x, scores=scores)
    gz = torch.autograd.grad(x.shape[0] * mae.forward_loss(x, mae.forward_decoder(z0, ids), support), z0,
                             create_graph=True)[0]
    zs = (z0 - alpha * gz).detach().requires_grad_()
    outer = mae.forward_loss(x, mae.forward_decoder(zs, ids), mask) + info_nce(
        proj(z0.detach()[:, 1:].mean(1)), proj(zs[:, 1:].mean(1)), 0.5)
    u = torch.autograd.grad(outer, zs)[0]
    term = torch.autograd.grad(-alpha * (gz * u).sum(), params, allow_unused=True)
    term = [torch.zeros_like(p) if t is None else t for t, p in zip(term, params)]
    err = max(((s - f - t).norm() / s.norm()).item() for s, f, t in zip(second, first, term))
    nonzero = max((s - f).norm().item() for s, f in zip(second, first))
    assert nonzero > 1e-6                      # the term matters here
    measured("MetaMAE second − first order = the second-order term", err, 1e-10)


def test_ablation_switches():
    mae, proj, x, masks = _tiny()
    off = metamae_loss(mae, x, MetaMAEOptions(adapt=False, contrastive_weight=0.0), proj, masks=masks)
    assert torch.equal(off["z"], off["z0"]) and off["contrastive"].item() == 0.0
    plain = mae.forward_loss(x, mae.forward_decoder(off["z0"], mae.forward_encoder(x, scores=masks[0])[2]),
                             mae.forward_encoder(x, scores=masks[0])[1])
    assert torch.allclose(off["loss"], plain, rtol=0, atol=1e-14)   # = the plain MAE loss
    on = metamae_loss(mae, x, MetaMAEOptions(), proj, masks=masks)
    assert on["query"].item() != off["query"].item()
    with pytest.raises(ValueError, match="projector"):
        metamae_loss(mae, x, MetaMAEOptions(), None, masks=masks)
