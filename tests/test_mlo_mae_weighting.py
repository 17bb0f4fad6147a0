"""MLO-MAE's hypergradient weighting and masking-network input options
(``problems.mlo_mae``: ``hypergrad_weighting``, ``mask_input_position``, ``mask_input_norm``;
``problems.mask_statistics``).

The weighting: with finite differences each level's best-response Jacobian is
``−s·∂²f`` with ``s = η`` ("paper", the one-step unrolled derivation) or ``s = 1``
("official", Betty's darts). So, path by path, at the same state and batches,

    paper[mask→pretrain→mask]          = η_pre          · official[mask→pretrain→mask]
    paper[mask→pretrain→finetune→mask] = η_pre · η_fin  · official[mask→pretrain→finetune→mask]

(the central difference is homogeneous of degree 1 in ``v``: ``ε = epsilon/‖v‖``), checked
in float64 at non-default rates, plus the total against a hand sum of the weighted paths.
"""
from __future__ import annotations

import pytest
import torch

from problems.mask_statistics import mask_statistics
from problems.masking_net import MaskingNetwork
from problems.mlo_mae import MLOMAESettings, build
from test_mlo_mae_graph import data, dict_rel, float64, settings

PRE, FIN = ("mask", "pretrain", "mask"), ("mask", "pretrain", "finetune", "mask")
LR_PRE, LR_FIN = 3e-2, 7e-3


def _paths(weighting, variant="mlo-mae"):
    x, y = data()
    with float64():
        g = build(variant, settings(pretrain_lr=LR_PRE, finetune_lr=LR_FIN, mask_lr=1e-2, cosine=False,
                                    hypergrad_weighting=weighting,
                                    method_options={"epsilon": 0.003}), (x.double(), y), seed=3)
        return g, g.engine.gradient("mask", by_path=True)


def test_paper_weighting_is_official_times_learning_rates(measured):
    _, paper = _paths("paper")
    _, official = _paths("official")
    for path, factor in ((PRE, LR_PRE), (FIN, LR_PRE * LR_FIN)):
        want = {k: factor * v for k, v in official["paths"][path].items()}
        err = dict_rel(paper["paths"][path], want)
        measured(f"MLO-MAE paper weighting: path {'→'.join(path)} = η-factor × official", err, 1e-9)
    # and the two weightings really differ in direction: the head path's share moves by 1/η_fin
    ratio_paper = _norm(paper["paths"][FIN]) / _norm(paper["paths"][PRE])
    ratio_official = _norm(official["paths"][FIN]) / _norm(official["paths"][PRE])
    assert ratio_official / ratio_paper == pytest.approx(1 / LR_FIN, rel=1e-9)


def test_blo_mae_paper_weighting_uses_per_group_rates(measured):
    """BLO-MAE's merged lower has two rates (encoder η_pre, head η_fin): H⁻¹ ≈ diag(η_i I)."""
    g_p, paper = _paths("paper", "blo-mae")
    _, official = _paths("official", "blo-mae")
    # one rate would make paper = η·official exactly; the head's own rate breaks that
    scaled = {k: LR_PRE * v for k, v in official["grad"].items()}
    assert dict_rel(paper["grad"], scaled) > 1e-8
    assert g_p.problems["pretrain"].config.method_options["scale_by_lr"] is True


def _norm(d):
    return float(torch.cat([t.reshape(-1) for t in d.values()]).norm())


def test_weighting_sets_scale_by_lr_and_refuses_contradictions():
    x, y = data()
    g = build("mlo-mae", settings(), (x, y))
    assert g.problems["pretrain"].config.method_options["scale_by_lr"] is True
    assert g.problems["finetune"].config.method_options["scale_by_lr"] is True
    g = build("mlo-mae", settings(hypergrad_weighting="official"), (x, y))
    assert g.problems["pretrain"].config.method_options["scale_by_lr"] is False
    with pytest.raises(ValueError, match=r"hypergrad_weighting='official'.*'pretrain' uses 'cg'"):
        build("mlo-mae", settings(method="cg", hypergrad_weighting="official"), (x, y))
    with pytest.raises(ValueError, match=r"'pretrain'.*scale_by_lr=False contradicts "
                                         r"hypergrad_weighting='paper'"):
        build("mlo-mae", settings(method_options={"scale_by_lr": False}), (x, y))
    with pytest.raises(ValueError, match=r"hypergrad_weighting must be one of \['paper', 'official'\]"):
        MLOMAESettings(hypergrad_weighting="eta")
    g = build("mlo-mae", settings(method="cg", method_options={"max_iter": 2}), (x, y))   # paper: fine
    assert "scale_by_lr" not in g.problems["pretrain"].config.method_options
    g = build("mlo-mae", settings(method="sama", cosine=False), (x, y))   # SAMA's u = η D ⊙ v has η
    assert "scale_by_lr" not in g.problems["pretrain"].config.method_options
    g.engine.run(4)
    assert g.engine.records["mask"]["hypergrad_norm"] > 0


# ------------------------------------------------------------ masker input
def test_position_free_masker_input_ignores_position_embeddings():
    x, y = data(image_size=8)
    g = build("mlo-mae", settings(image_size=8, mask_input_position=False), (x, y))
    mask = g.problems["pretrain"].masker
    scores, weights = mask(x[:5], g.problems["pretrain"])
    tok = g.mae.tokenizer
    want = g.masker(tok._embed_patches(tok.patchify(x[:5])))
    assert torch.equal(scores, want)
    before = tok.embed(x[:5])
    with torch.no_grad():                       # positions change, masks do not
        tok.pos.table.add_(1.0)
    assert not torch.equal(tok.embed(x[:5]), before)        # the change reaches the embeddings
    assert torch.equal(mask(x[:5], g.problems["pretrain"])[0], want)
    # the paper's input does change with the positions
    g2 = build("mlo-mae", settings(image_size=8), (x, y))
    full = g2.problems["pretrain"].masker(x[:5], g2.problems["pretrain"])[0]
    assert torch.equal(full, g2.masker(g2.mae.tokenizer.embed(x[:5])))


def test_layer_normalised_masker_input():
    torch.manual_seed(0)
    net = MaskingNetwork(4, 6, 5, input_norm=True)
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5), net.norm.bias.uniform_(-0.2, 0.2)
    e = torch.randn(3, 4, 6, dtype=torch.float32) * 7 + 3
    z = (e - e.mean(-1, keepdim=True)) / torch.sqrt(e.var(-1, unbiased=False, keepdim=True) + 1e-5)
    z = z * net.norm.weight + net.norm.bias
    want = torch.sigmoid(net.fc2(torch.relu(net.fc1(z.reshape(3, 24)))))
    torch.testing.assert_close(net(e), want, rtol=1e-5, atol=1e-6)
    x, y = data()
    g = build("mlo-mae", settings(mask_input_norm=True), (x, y))
    assert any(n.startswith("norm.") for n, _ in g.masker.named_parameters())
    g = build("mlo-mae", settings(mask_input_norm=True, cosine=False), (x, y))
    before = g.masker.norm.weight.detach().clone()
    g.engine.run(4)      # the hypergradient reaches the norm's parameters too
    assert not torch.equal(g.masker.norm.weight, before)


# --------------------------------------------------------------- statistics
def test_mask_statistics_by_hand():
    p = torch.tensor([[0.9, 0.05, 0.6, 0.2],
                      [0.8, 0.3, 0.01, 0.7],
                      [0.4, 0.5, 0.02, 0.95]])
    s = mask_statistics(p, ratio=0.5, labels=torch.tensor([0, 1, 1]), num_classes=3)
    top = torch.tensor([[0.9, 0.6], [0.8, 0.7], [0.95, 0.5]])     # 2 masked of 4
    assert s["masked_p_mean"] == pytest.approx(float(top.double().mean()))
    assert s["masked_p_below_0.1"] == 0.0
    assert s["std_across_images"] == pytest.approx(float(p.double().std(0).mean()))
    assert s["std_across_positions"] == pytest.approx(float(p.double().mean(0).std()))
    assert s["mean_p_per_class"][0] == pytest.approx(p[0].double().tolist())
    assert s["mean_p_per_class"][1] == pytest.approx(p[1:].double().mean(0).tolist())
    assert s["mean_p_per_class"][2] is None
    s = mask_statistics(torch.tensor([[0.05, 0.9, 0.01, 0.02], [0.2, 0.8, 0.03, 0.6]]), ratio=0.5)
    assert s["masked_p_below_0.1"] == pytest.approx(0.25)         # 2 masked each, one tiny
    with pytest.raises(ValueError, match=r"p must be \[N >= 2, L\]"):
        mask_statistics(torch.rand(5), 0.5)
