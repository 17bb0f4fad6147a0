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
