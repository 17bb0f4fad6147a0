"""MAE: masking, losses, second-order gradients through the decoder, functional calls."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from problems.mae import MaskedAutoencoder, num_masked, random_masking
from problems.masking_net import MaskingNetwork
from problems.multimodal import MultimodalTokenizer
from problems.tokenizers import (
    DiscreteTokenizer,
    ImageTokenizer,
    TabularTokenizer,
)
from problems.transformer import Transformer, math_attention

D = 16


def _image_mae(**kw):
    torch.manual_seed(0)
    cfg = dict(depth=1, num_heads=2, decoder_dim=8, decoder_depth=1, decoder_heads=2)
    cfg.update(kw)
    return MaskedAutoencoder(ImageTokenizer(8, 2, 3, D), **cfg)  # L = 16, P = 12


# --- masking ------------------------------------------------------------------------

@pytest.mark.parametrize("length,ratio,expected", [(16, 0.75, 12), (10, 0.25, 3),
                                                   (7, 0.5, 4), (9, 0.0, 0), (196, 0.75, 147)])
def test_random_masking_counts_and_restore(length, ratio, expected):
    x = torch.randn(4, length, 3)
    kept, mask, ids_restore = random_masking(x, ratio)
    n_mask = num_masked(length, ratio)  # round(ratio * L), halves up
    assert n_mask == expected
    assert torch.equal(mask.sum(1), torch.full((4,), float(n_mask)))
    assert kept.shape == (4, length - n_mask, 3)
    # unshuffling [kept ; masked placeholders] puts the kept tokens back in place
    filler = torch.zeros(4, n_mask, 3)
    restored = torch.gather(torch.cat([kept, filler], 1), 1,
                            ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    visible = (1 - mask).bool()
    assert torch.equal(restored[visible], x[visible])
    assert torch.equal(restored[~visible], torch.zeros_like(x[~visible]))


def test_random_masking_keeps_lowest_scores():
    x = torch.randn(3, 8, 2)
    scores = torch.rand(3, 8)
    kept, mask, _ = random_masking(x, 0.75, scores)
    for b in range(3):
        lowest = torch.argsort(scores[b])[:2]
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(lowest.tolist())
        assert torch.equal(kept[b], x[b, lowest])  # ordered by increasing score


def test_random_masking_per_segment_ratios():
    x = torch.randn(5, 12, 2)
    _, mask, _ = random_masking(x, (0.75, 0.5), lengths=(8, 4))
    assert torch.equal(mask[:, :8].sum(1), torch.full((5,), 6.0))
    assert torch.equal(mask[:, 8:].sum(1), torch.full((5,), 2.0))


def test_multimodal_mae_masks_per_modality_and_weights_losses():
    torch.manual_seed(0)
    tok = MultimodalTokenizer(ImageTokenizer(8, 2, 3, D), DiscreteTokenizer(20, 8, D),
                              mask_ratios=(0.75, 0.5), loss_weights=(1.0, 0.5))
    mae = MaskedAutoencoder(tok, depth=1, num_heads=2, decoder_dim=8, decoder_depth=1,
                            decoder_heads=2)
    x = {"image": torch.randn(3, 3, 8, 8), "text": torch.randint(0, 20, (3, 8))}
    loss, pred, mask = mae(x)
    assert torch.equal(mask[:, :16].sum(1), torch.full((3,), 12.0))
    assert torch.equal(mask[:, 16:].sum(1), torch.full((3,), 4.0))
    assert pred["image"].shape == (3, 16, 12) and pred["text"].shape == (3, 8, 20)
    m_img, m_txt = mask[:, :16].bool(), mask[:, 16:].bool()
    target = tok.image.patchify(x["image"])
    img = ((pred["image"] - target) ** 2).mean(-1)[m_img].mean()
    txt = F.cross_entropy(pred["text"][m_txt], x["text"][m_txt])
    assert torch.allclose(loss, 1.0 * img + 0.5 * txt)
    # an explicit float overrides the per-modality defaults
    _, _, mask = mae(x, mask_ratio=0.25)
    assert torch.equal(mask[:, :16].sum(1), torch.full((3,), 4.0))


# --- losses -------------------------------------------------------------------------

def test_loss_only_on_masked_tokens_and_norm_pix():
    mae = _image_mae(norm_pix=True)
    x = torch.randn(2, 3, 8, 8)
    loss, pred, mask = mae(x)
    t = mae.tokenizer.patchify(x)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    per_token = ((pred - t) ** 2).mean(-1)
    assert torch.allclose(loss, (per_token * mask).sum() / mask.sum())
    # changing predictions of visible tokens does not change the loss
    pred2 = pred + 5.0 * (1 - mask).unsqueeze(-1)
    assert torch.allclose(mae.forward_loss(x, pred2, mask), loss)


def test_token_weights_hand_computation():
    mae = _image_mae()
    x = torch.randn(2, 3, 8, 8)
    weights = torch.rand(2, 16)
    loss, pred, mask = mae(x, token_weights=weights)
    per_token = ((pred - mae.tokenizer.patchify(x)) ** 2).mean(-1)  # [N, L]
    expected = sum(per_token[b, i] * weights[b, i]
                   for b in range(2) for i in range(16) if mask[b, i] == 1) / mask.sum()
    assert torch.allclose(loss, expected)


def test_cross_entropy_for_discrete_tokens():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(DiscreteTokenizer(13, 10, D), depth=1, num_heads=2,
                            decoder_dim=8, decoder_depth=2, decoder_heads=2, mask_ratio=0.5)
    ids = torch.randint(0, 13, (3, 10))
    loss, logits, mask = mae(ids)
    assert logits.shape == (3, 10, 13)
    m = mask.bool()
    assert torch.allclose(loss, F.cross_entropy(logits[m], ids[m]))


def test_linear_decoder_and_tabular_features():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(TabularTokenizer(6, D), depth=1, num_heads=2, decoder_depth=0)
    assert isinstance(mae.decoder, nn.Identity) and mae.heads["tabular"].in_features == D
    x = torch.randn(4, 6)
    loss, pred, mask = mae(x, mask_ratio=0.5)
    assert pred.shape == (4, 6, 1) and torch.isfinite(loss)
    assert mae.features(x).shape == (4, D) and mae.features(x, pool="mean").shape == (4, D)


def test_masking_network_masks_highest_probabilities():
    mae = _image_mae()
    net = MaskingNetwork(num_tokens=16, embed_dim=D, hidden=32)
    x = torch.randn(3, 3, 8, 8)
    probs = net(mae.patch_embeddings(x))  # [N, L]
    assert probs.shape == (3, 16) and ((probs > 0) & (probs < 1)).all()
    loss, _, mask = mae(x, scores=probs, token_weights=probs)
    top = torch.topk(probs, 12, dim=1).indices
    assert torch.equal(mask.gather(1, top), torch.ones(3, 12))
    loss.backward()
    assert net.fc1.weight.grad.abs().sum() > 0  # gradient through the weights only


# --- second order through the decoder ------------------------------------------------

class _AdaptedQueryLoss(nn.Module):
    """``Lq(Z − α ∇_Z L_support(decoder(Z)))`` (MetaMAE latent adaptation)."""

    def __init__(self, mae, x, ids_restore, support, query, alpha):
        super().__init__()
        self.mae, self.x, self.ids, self.alpha = mae, x, ids_restore, alpha
        self.support, self.query = support, query

    def forward(self, z, create_graph=True, first_order=False):
        mae = self.mae
        support_loss = mae.forward_loss(self.x, mae.forward_decoder(z, self.ids), self.support)
        (g,) = torch.autograd.grad(support_loss, z, create_graph=create_graph)
        if first_order:
            g = g.detach()
        z_star = z - self.alpha * g
        return mae.forward_loss(self.x, mae.forward_decoder(z_star, self.ids), self.query)


def _second_order_setup(attn_impl=None):
    mae = _image_mae(decoder_depth=2, attn_impl=attn_impl).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        latent, mask, ids_restore = mae.forward_encoder(x)
    support = 1 - mask  # visible tokens
    return mae, _AdaptedQueryLoss(mae, x, ids_restore, support, mask, alpha=0.5), latent


def test_second_order_gradient_matches_finite_differences():
    mae, model, latent = _second_order_setup()
    name = "mae.decoder.blocks.0.attn.qkv.weight"
    params = dict(model.named_parameters())
    torch.manual_seed(1)
    v_param = torch.randn_like(params[name])
    v_z = torch.randn_like(latent)
    eps = 1e-5

    z = latent.clone().requires_grad_(True)
    with math_attention():
        loss = model(z)
        g_param, g_z = torch.autograd.grad(loss, [params[name], z])
        first = model(z, first_order=True)
        g_param_fo = torch.autograd.grad(first, params[name])[0]

        def lq(delta_param=0.0, delta_z=0.0):
            p = {**params, name: params[name].detach() + delta_param}
            zz = (latent + delta_z).requires_grad_(True)
            return functional_call(model, p, (zz,), {"create_graph": False}).item()

        fd_param = (lq(eps * v_param) - lq(-eps * v_param)) / (2 * eps)
        fd_z = (lq(delta_z=eps * v_z) - lq(delta_z=-eps * v_z)) / (2 * eps)

    an_param = (g_param * v_param).sum().item()
    an_z = (g_z * v_z).sum().item()
    err_param = abs(an_param - fd_param) / abs(fd_param)
    err_z = abs(an_z - fd_z) / abs(fd_z)
    print(f"\nsecond-order FD relative error: decoder param {err_param:.2e}, latent {err_z:.2e}")
    assert err_param <= 1e-6 and err_z <= 1e-6
    # the second-order term is not negligible, so the check is meaningful
    an_param_fo = (g_param_fo * v_param).sum().item()
    assert abs(an_param_fo - fd_param) / abs(fd_param) > 1e-4


def test_fused_attention_has_no_double_backward_on_cpu():
    """Documented behaviour (torch 2.13, CPU): building g with create_graph=True works,
    differentiating g again raises inside the fused SDPA kernel's backward."""
    mae, model, latent = _second_order_setup(attn_impl="fused")
    z = latent.clone().requires_grad_(True)
    loss = model(z)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(loss, z)
    # forcing the math path fixes it for the same module
    with math_attention():
        assert torch.isfinite(torch.autograd.grad(model(z), z)[0]).all()


def test_math_and_fused_attention_agree():
    torch.manual_seed(0)
    block = Transformer(D, 2, 4).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with math_attention():
        y_math = block(x)
    assert torch.allclose(block(x), y_math, atol=1e-12)


# --- functional use -----------------------------------------------------------------

def test_functional_call_matches_module_float64():
    mae = _image_mae().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    scores = torch.rand(2, 16)
    loss, pred, mask = mae(x, scores=scores)
    assert pred.dtype == torch.float64
    params = {k: v.detach().clone() for k, v in mae.named_parameters()}
    loss_f, pred_f, mask_f = functional_call(mae, params, (x,), {"scores": scores})
    assert torch.equal(mask_f, mask) and torch.allclose(pred_f, pred, atol=1e-14)
    assert torch.allclose(loss_f, loss, atol=1e-14)
    # a perturbed dict changes the output and leaves the module untouched
    params["heads.image.bias"] = params["heads.image.bias"] + 1.0
    _, pred_p, _ = functional_call(mae, params, (x,), {"scores": scores})
    assert torch.allclose(pred_p, pred + 1.0, atol=1e-12)
    assert torch.equal(mae(x, scores=scores)[1], pred)
    assert mae.features(x).shape == (2, D)
