"""MAE: masking (random, learned scores, per modality), losses checked against hand
computations (masked-only mean, norm_pix, CE, per-modality weights, MLO-MAE
probability weighting), linear decoder, features, functional calls, weight tying of
discrete logits to the input embedding table.

Text padding in the multimodal MAE: ``tests/test_multimodal_padding.py``.

Second-order gradients through the decoder: ``tests/test_mae_second_order.py``.
"""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from problems.mae import MaskedAutoencoder, num_masked, random_masking
from problems.masking_net import MaskingNetwork
from problems.multimodal import MultimodalTokenizer
from problems.tokenizers import DiscreteTokenizer, ImageTokenizer, TabularTokenizer
from _hand import ce as _ce, mse as _mse, pixels as _pixels, rel_scalar as _rel

D = 16


def _image_mae(**kw):
    torch.manual_seed(0)
    cfg = dict(depth=1, num_heads=2, decoder_dim=8, decoder_depth=1, decoder_heads=2)
    cfg.update(kw)
    return MaskedAutoencoder(ImageTokenizer(8, 2, 3, D), **cfg)  # L = 16, P = 12


def _multimodal_mae(loss_weights=(0.3, 2.0), mask_ratios=(0.75, 0.5)):
    torch.manual_seed(0)
    tok = MultimodalTokenizer(ImageTokenizer(8, 2, 3, D), DiscreteTokenizer(20, 8, D),
                              mask_ratios=mask_ratios, loss_weights=loss_weights)
    return MaskedAutoencoder(tok, depth=1, num_heads=2, decoder_dim=8, decoder_depth=1,
                             decoder_heads=2)  # L = 16 image + 8 text


# --- masking ------------------------------------------------------------------------

@pytest.mark.parametrize("length,ratio,expected", [(16, 0.75, 12), (10, 0.25, 3), (7, 0.5, 4),
                                                   (9, 0.0, 0), (196, 0.75, 147), (10, 0.33, 4),
                                                   (5, 1.0, 5)])
def test_random_masking_counts_and_restore(length, ratio, expected):
    x = torch.randn(4, length, 3)
    kept, mask, ids_restore = random_masking(x, ratio)
    n_mask = num_masked(length, ratio)  # MAE: L - int(L * (1 - ratio)) tokens masked
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


def test_random_masking_without_scores_is_random():
    x = torch.randn(64, 16, 2)
    _, m1, _ = random_masking(x, 0.5)
    _, m2, _ = random_masking(x, 0.5)
    assert not torch.equal(m1, m2)
    # every position is masked about half of the time (uniform noise)
    freq = torch.cat([random_masking(x, 0.5)[1] for _ in range(20)]).mean(0)
    assert ((freq > 0.35) & (freq < 0.65)).all()


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


def test_multimodal_masks_stated_count_per_modality():
    mae = _multimodal_mae(mask_ratios=(0.75, 0.5))
    x = {"image": torch.randn(3, 3, 8, 8), "text": torch.randint(0, 20, (3, 8))}
    _, pred, mask = mae(x)
    assert torch.equal(mask[:, :16].sum(1), torch.full((3,), 12.0))  # 0.75 · 16
    assert torch.equal(mask[:, 16:].sum(1), torch.full((3,), 4.0))   # 0.5 · 8
    assert pred["image"].shape == (3, 16, 12) and pred["text"].shape == (3, 8, 20)
    # the encoder sees exactly the kept tokens of both modalities (+ CLS)
    latent, _, _ = mae.forward_encoder(x)
    assert latent.shape == (3, 1 + 4 + 4, D)
    # per-modality ratios by name, or one float for every modality
    _, _, mask = mae(x, mask_ratio={"text": 0.25})
    assert mask[:, :16].sum(1).eq(12).all() and mask[:, 16:].sum(1).eq(2).all()
    _, _, mask = mae(x, mask_ratio=0.25)
    assert mask[:, :16].sum(1).eq(4).all() and mask[:, 16:].sum(1).eq(2).all()


def test_multimodal_learned_scores_topk_within_each_modality():
    mae = _multimodal_mae(mask_ratios=(0.75, 0.5))
    x = {"image": torch.randn(3, 3, 8, 8), "text": torch.randint(0, 20, (3, 8))}
    scores = torch.rand(3, 24)
    scores[:, 16:] += 10.0  # text scores all higher: a global top-k would take only text
    _, _, mask = mae(x, scores=scores)
    for b in range(3):
        top_img = set(torch.topk(scores[b, :16], 12).indices.tolist())
        top_txt = set((torch.topk(scores[b, 16:], 4).indices + 16).tolist())
        assert set(torch.nonzero(mask[b]).flatten().tolist()) == top_img | top_txt


# --- losses -------------------------------------------------------------------------

def test_loss_averages_over_masked_tokens_only(measured):
    mae = _image_mae().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    loss, pred, mask = mae(x)
    terms = [_mse(pred[n, i].tolist(), _pixels(x, n, i))
             for n in range(2) for i in range(16) if mask[n, i] == 1]
    measured("MAE loss vs hand mean over masked tokens (float64)",
             _rel(loss, sum(terms) / len(terms)), 1e-12)
    # predictions of visible tokens do not enter the loss
    pred2 = pred + 5.0 * (1 - mask).unsqueeze(-1)
    assert torch.equal(mae.forward_loss(x, pred2, mask), loss)
    pred3 = pred + 5.0 * mask.unsqueeze(-1)
    assert mae.forward_loss(x, pred3, mask) > loss + 1.0


def test_norm_pix_target_is_per_patch_standardised(measured):
    """MAE: target = (x − mean) / sqrt(var + 1e-6) per patch, var unbiased (torch.var)."""
    mae = _image_mae(norm_pix=True).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    pred = torch.randn(2, 16, 12, dtype=torch.float64)
    ours = mae.token_losses(x, pred)  # [N, L]
    worst = 0.0
    for n in range(2):
        for i in range(16):
            v = _pixels(x, n, i)
            mean = sum(v) / len(v)
            var = sum((u - mean) ** 2 for u in v) / (len(v) - 1)
            target = [(u - mean) / math.sqrt(var + 1e-6) for u in v]
            worst = max(worst, _rel(ours[n, i], _mse(pred[n, i].tolist(), target)))
    measured("norm_pix per-token loss vs hand (x-mean)/sqrt(var+1e-6)", worst, 1e-12)
    # without norm_pix the raw pixels are the target
    raw = _image_mae(norm_pix=False).double().token_losses(x, pred)
    assert _rel(raw[0, 5], _mse(pred[0, 5].tolist(), _pixels(x, 0, 5))) < 1e-12


def test_cross_entropy_for_discrete_tokens(measured):
    torch.manual_seed(0)
    mae = MaskedAutoencoder(DiscreteTokenizer(13, 10, D), depth=1, num_heads=2,
                            decoder_dim=8, decoder_depth=2, decoder_heads=2,
                            mask_ratio=0.5).double()
    ids = torch.randint(0, 13, (3, 10))
    loss, logits, mask = mae(ids)
    assert logits.shape == (3, 10, 13) and mask.sum() == 15
    terms = [_ce(logits[n, i].tolist(), int(ids[n, i]))
             for n in range(3) for i in range(10) if mask[n, i] == 1]
    measured("discrete-token CE vs hand log-softmax over masked", _rel(loss, sum(terms) / 15), 1e-12)


def test_per_modality_loss_weights(measured):
    """loss = Σ_s w_s · Σ_{i∈s} ℓ_i m_i a_i / #masked_s, with w = (0.3, 2.0)."""
    mae = _multimodal_mae(loss_weights=(0.3, 2.0)).double()
    x = {"image": torch.randn(3, 3, 8, 8, dtype=torch.float64),
         "text": torch.randint(0, 20, (3, 8))}
    a = torch.rand(3, 24, dtype=torch.float64)
    for weights in (None, a):
        loss, pred, mask = mae(x, token_weights=weights)
        img, txt = [], []
        for n in range(3):
            for i in range(16):
                if mask[n, i] == 1:
                    w = 1.0 if weights is None else a[n, i].item()
                    img.append(w * _mse(pred["image"][n, i].tolist(), _pixels(x["image"], n, i)))
            for j in range(8):
                if mask[n, 16 + j] == 1:
                    w = 1.0 if weights is None else a[n, 16 + j].item()
                    txt.append(w * _ce(pred["text"][n, j].tolist(), int(x["text"][n, j])))
        assert len(img) == 3 * 12 and len(txt) == 3 * 4
        expected = 0.3 * sum(img) / len(img) + 2.0 * sum(txt) / len(txt)
        label = "plain" if weights is None else "with token weights"
        measured(f"M3AE weighted loss (0.3 img, 2.0 text) vs hand, {label}",
                 _rel(loss, expected), 1e-12)
    # changing a weight changes the loss by exactly that modality's term
    loss_a = mae.forward_loss(x, pred, mask)
    zero_text = _multimodal_mae(loss_weights=(0.3, 0.0)).double()
    zero_text.load_state_dict(mae.state_dict())
    img_only = zero_text.forward_loss(x, pred, mask)
    assert _rel(loss_a - img_only, 2.0 * sum(_text_terms(pred, x, mask)) / 12) < 1e-12


def _text_terms(pred, x, mask):
    return [_ce(pred["text"][n, j].tolist(), int(x["text"][n, j]))
            for n in range(3) for j in range(8) if mask[n, 16 + j] == 1]


def test_mlo_mae_masking_and_probability_weighted_loss(measured):
    """MLO-MAE: mask the top-k probabilities (deterministic); loss = Σ_masked ℓ_i p_i / #masked,
    so ∂loss/∂p_i = ℓ_i m_i / #masked — the masking network's only gradient."""
    mae = _image_mae().double()
    net = MaskingNetwork(num_tokens=16, embed_dim=D, hidden=32).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    probs = net(mae.patch_embeddings(x))  # [N, L]
    assert probs.shape == (3, 16) and ((probs > 0) & (probs < 1)).all()
    p = probs.detach().requires_grad_(True)
    loss, pred, mask = mae(x, scores=p, token_weights=p)
    top = torch.topk(probs, 12, dim=1).indices
    assert torch.equal(mask.gather(1, top), torch.ones(3, 12, dtype=torch.float64))
    assert mask.sum() == 36
    assert torch.equal(mae(x, scores=p, token_weights=p)[2], mask)  # deterministic
    ell = [[_mse(pred[n, i].tolist(), _pixels(x, n, i)) for i in range(16)] for n in range(3)]
    expected = sum(ell[n][i] * p[n, i].item()
                   for n in range(3) for i in range(16) if mask[n, i] == 1) / 36
    measured("MLO-MAE loss Σ_masked ℓ·p / #masked vs hand", _rel(loss, expected), 1e-12)
    (grad,) = torch.autograd.grad(loss, p)
    hand = torch.tensor(ell, dtype=torch.float64) * mask / 36
    measured("MLO-MAE dloss/dp vs ℓ·m/#masked", (grad - hand).abs().max() / hand.abs().max(), 1e-12)
    # end to end, the gradient reaches the masking network's weights
    loss, _, _ = mae(x, scores=probs, token_weights=probs)
    loss.backward()
    assert net.fc1.weight.grad.abs().sum() > 0


# --- decoder, features, functional use ----------------------------------------------

def test_linear_decoder_sees_every_token_and_trains_the_encoder(measured):
    """decoder_depth=0 (DABS / MetaMAE "decoder size 0"): masked tokens enter the encoder
    as mask token + position, a linear head reads every encoder output."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(TabularTokenizer(6, D), depth=1, num_heads=2,
                            decoder_depth=0).double()
    assert isinstance(mae.decoder, nn.Identity) and mae.heads["tabular"].in_features == D
    assert not any(n.startswith("decoder") for n, _ in mae.named_parameters())
    x = torch.randn(4, 6, dtype=torch.float64)
    scores = torch.rand(4, 6)
    loss, pred, mask = mae(x, mask_ratio=0.5, scores=scores)
    assert pred.shape == (4, 6, 1) and mask.sum() == 12
    latent, _, ids = mae.forward_encoder(x, 0.5, scores)
    assert latent.shape == (4, 1 + 6, D)  # CLS + every position
    # the head is the decoder: pred = head(latent) token by token, affine in the latent
    assert torch.equal(pred, mae.heads["tabular"](latent[:, 1:]))
    z1, z2 = torch.randn(2, 4, 7, D, dtype=torch.float64)
    mix = mae.forward_decoder(0.3 * z1 + 0.7 * z2, ids)
    err = (mix - 0.3 * mae.forward_decoder(z1, ids) - 0.7 * mae.forward_decoder(z2, ids)).abs().max()
    measured("linear decoder (depth 0): affine in the latent", err.item(), 1e-12)
    # the encoder's input: data tokens where visible, mask token + position where masked
    seen = []
    hook = mae.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    mae.forward_encoder(x, 0.5, scores)
    hook.remove()
    tokens, table = mae.patch_embeddings(x), mae.tokenizer.pos.table.double()
    expected = torch.where(mask.unsqueeze(-1) > 0, mae.mask_token[0] + table, tokens)
    assert torch.allclose(seen[0][:, 1:], expected, atol=1e-12)
    # masked inputs are hidden from the model; visible inputs inform masked predictions
    hidden = x + 3.0 * mask
    assert torch.equal(mae(hidden, mask_ratio=0.5, scores=scores)[1], pred)
    shown = x + 3.0 * (1 - mask)
    moved = (mae(shown, mask_ratio=0.5, scores=scores)[1] - pred).squeeze(-1)
    assert (moved.abs() * mask).sum() > 1e-3
    # so the reconstruction loss trains the encoder and the tokenizer
    loss.backward()
    assert mae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.tokenizer.weight.grad.abs().sum() > 0


def _dropout_rates(module):
    return {m.p for m in module.modules() if isinstance(m, nn.Dropout)}


def test_decoder_dropout_is_its_own_setting():
    """The encoder's ``dropout`` does not reach the decoder: ``decoder_dropout`` (default 0,
    MetaMAE Table 7 and its official code) sets the decoder blocks' rate."""
    mae = _image_mae(depth=2, decoder_depth=2, dropout=0.3)
    assert _dropout_rates(mae.encoder) == {0.3}
    assert _dropout_rates(mae.decoder) == {0.0} and mae.input_drop.p == 0.0
    mae.train()                               # a training-mode decoder is deterministic
    latent, _, ids = mae.forward_encoder(torch.randn(2, 3, 8, 8))
    assert torch.equal(mae.forward_decoder(latent, ids), mae.forward_decoder(latent, ids))
    both = _image_mae(depth=2, decoder_depth=2, dropout=0.3, decoder_dropout=0.2)
    assert _dropout_rates(both.encoder) == {0.3} and _dropout_rates(both.decoder) == {0.2}
    assert not torch.equal(both.forward_decoder(latent, ids), both.forward_decoder(latent, ids))
    assert _dropout_rates(_image_mae(decoder_dropout=0.1).encoder) == {0.0}
    with pytest.raises(ValueError, match="decoder_dropout must be a number in"):
        _image_mae(decoder_dropout=1.5)


@pytest.mark.parametrize("linear", [False, True])
def test_input_dropout_on_encoder_tokens(linear):
    """``input_dropout`` drops entries of ``[CLS ; tokens]`` (positions added) before the
    encoder, scaled by 1/(1-p) (the official MetaMAE code's ``nn.Dropout`` / timm's
    ``pos_drop``); identity in eval mode and at the default 0; no parameters."""
    depth = 0 if linear else 1
    seen = []
    mae = _image_mae(input_dropout=0.5, decoder_depth=depth)
    plain = _image_mae(decoder_depth=depth)
    assert mae.state_dict().keys() == plain.state_dict().keys()
    mae.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    plain.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    x, scores = torch.randn(2, 3, 8, 8), torch.rand(2, 16)
    mae.train(), plain.train()
    mae.forward_encoder(x, scores=scores), plain.forward_encoder(x, scores=scores)
    dropped, clean = seen[-2:]
    assert dropped.shape == clean.shape == (2, 1 + (16 if linear else 4), D)
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1
    assert torch.allclose(dropped[kept], 2 * clean[kept])
    mae.features(x)                           # features: the same input dropout
    assert (seen[-1] == 0).any()
    mae.eval(), plain.eval()
    mae.forward_encoder(x, scores=scores), plain.forward_encoder(x, scores=scores)
    assert torch.equal(seen[-2], seen[-1])


def test_qkv_bias_setting():
    """``qkv_bias=False`` (the official MetaMAE code's timm Block) removes the QKV bias
    of every encoder and decoder block; the default keeps it."""
    with_bias, without = _image_mae(depth=2, decoder_depth=2), _image_mae(depth=2, decoder_depth=2,
                                                                          qkv_bias=False)
    blocks = lambda m: [*m.encoder.blocks, *m.decoder.blocks]  # noqa: E731
    assert all(b.attn.qkv.bias is not None for b in blocks(with_bias))
    assert all(b.attn.qkv.bias is None for b in blocks(without))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(with_bias) - n(without) == 2 * 3 * D + 2 * 3 * 8
    loss, _, _ = without(torch.randn(2, 3, 8, 8))
    loss.backward()
    assert without.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_features_cls_and_mean_pool():
    mae = _image_mae()
    x = torch.randn(2, 3, 8, 8)
    tokens = mae.patch_embeddings(x)
    h = mae.encoder(torch.cat([mae.cls_token.expand(2, -1, -1), tokens], 1))
    assert torch.equal(mae.features(x), h[:, 0])
    assert torch.allclose(mae.features(x, pool="mean"), h[:, 1:].mean(1))
    with pytest.raises(ValueError):
        mae.features(x, pool="max")


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


# --- weight tying for discrete tokens -----------------------------------------------

def _tied_mae(decoder_depth, tie=True, bias=True):
    torch.manual_seed(0)
    return MaskedAutoencoder(DiscreteTokenizer(13, 10, D), depth=1, num_heads=2, decoder_dim=8,
                             decoder_depth=decoder_depth, decoder_heads=2, mask_ratio=0.5,
                             tie_embeddings=tie, tied_bias=bias).double()


def _head_input(mae, ids, scores, mask_ratio=None):
    """What the output layer reads, ``h [N, L, Dd]`` (captured by a hook)."""
    seen = []
    hook = mae.heads["tokens"].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    out = mae(ids, mask_ratio=mask_ratio, scores=scores)
    hook.remove()
    return seen[0], out


@pytest.mark.parametrize("decoder_depth", [2, 0], ids=["decoder", "linear"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_tied_logits_use_the_embedding_table(measured, decoder_depth, bias):
    """tie_embeddings: logits = proj(h) @ Eᵀ + b with E the input table itself."""
    mae = _tied_mae(decoder_depth, bias=bias)
    table = mae.tokenizer.table.weight  # E [13, D]
    head = mae.heads["tokens"]
    # one parameter object under one name; the head holds no [V, ·] weight of its own
    assert [n for n, p in mae.named_parameters() if p is table] == ["tokenizer.table.weight"]
    assert all(p.shape[0] != 13 or p.dim() == 1 for p in head.parameters())
    assert (head.bias is not None) == bias
    assert isinstance(head.proj, nn.Identity) == (decoder_depth == 0)  # D → D needs no proj
    if bias:
        with torch.no_grad():
            head.bias.normal_()  # zeros at init: make it count
    ids = torch.randint(0, 12, (3, 10))  # id 12 is never an input
    scores = torch.rand(3, 10)
    h, (loss, logits, mask) = _head_input(mae, ids, scores)
    z = head.proj(h)  # [N, L, D]
    hand = torch.tensor([[[sum(z[n, i, d].item() * table[v, d].item() for d in range(D))
                           + (head.bias[v].item() if bias else 0.0) for v in range(13)]
                          for i in range(10)] for n in range(3)], dtype=torch.float64)
    measured("tied logits vs hand proj(h)·Eᵀ + b (float64)",
             ((logits - hand).abs().max() / hand.abs().max()).item(), 1e-12)
    delta = torch.randn(D, dtype=torch.float64)
    with torch.no_grad():  # editing a row never used as input moves its output logit only
        table[12] += delta
    moved = _head_input(mae, ids, scores)[1][1]
    assert torch.equal(moved[..., :12], logits[..., :12])
    assert torch.allclose(moved[..., 12] - logits[..., 12], z @ delta, atol=1e-12)
    assert (z @ delta).abs().min() > 1e-6


def test_tied_embedding_gets_its_gradient_from_the_output_side(measured):
    """Every token masked: the table never embeds an encoder input, so its gradient is
    the output layer's alone — zero untied, dloss/dE of CE(z Eᵀ + b) tied."""
    untied = _tied_mae(2, tie=False)
    assert isinstance(untied.heads["tokens"], nn.Linear)  # default: untied, as before
    ids = torch.randint(0, 13, (3, 10))
    untied(ids, mask_ratio=1.0)[0].backward()
    assert untied.tokenizer.table.weight.grad.abs().max() == 0
    mae = _tied_mae(2)
    h, (loss, _, mask) = _head_input(mae, ids, None, mask_ratio=1.0)
    assert mask.sum() == 30
    loss.backward()
    grad = mae.tokenizer.table.weight.grad
    # reference: the same CE through an independent copy of E on the detached features
    z = mae.heads["tokens"].proj(h).detach()  # [N, L, D]
    e = mae.tokenizer.table.weight.detach().clone().requires_grad_(True)
    ref_logits = torch.einsum("nld,vd->nlv", z, e) + mae.heads["tokens"].bias.detach()
    ref = nn.functional.cross_entropy(ref_logits.flatten(0, 1), ids.flatten())
    (ref_grad,) = torch.autograd.grad(ref, e)
    assert grad.abs().max() > 0
    measured("tied E gradient (all masked) vs output-side CE gradient",
             (grad - ref_grad).abs().max() / ref_grad.abs().max(), 1e-12)


def test_tied_weights_under_functional_call(measured):
    mae = _tied_mae(2)
    ids = torch.randint(0, 13, (3, 10))
    scores = torch.rand(3, 10)
    h, (loss, logits, _) = _head_input(mae, ids, scores)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in mae.named_parameters()}
    assert "tokenizer.table.weight" in params and not any(k.startswith("heads.tokens.w")
                                                          for k in params)
    loss_f, logits_f, _ = functional_call(mae, params, (ids,), {"scores": scores})
    assert torch.allclose(logits_f, logits, atol=1e-14)
    (g_f,) = torch.autograd.grad(loss_f, params["tokenizer.table.weight"])
    loss.backward()
    measured("tied E gradient: functional_call vs module",
             (g_f - mae.tokenizer.table.weight.grad).abs().max().item(), 1e-14)
    # a perturbed table in the dict reaches the output side too, module untouched
    delta = torch.zeros(13, D, dtype=torch.float64)
    delta[5] = torch.randn(D, dtype=torch.float64)
    params = {k: v.detach() for k, v in mae.named_parameters()}
    params["tokenizer.table.weight"] = params["tokenizer.table.weight"] + delta
    ids = ids.clamp(max=4)  # id 5 is never an input: only the output side sees δ
    _, logits_p, _ = functional_call(mae, params, (ids,), {"scores": scores})
    h0, (_, logits_0, _) = _head_input(mae, ids, scores)
    expected = logits_0.detach().clone()
    expected[..., 5] += mae.heads["tokens"].proj(h0) @ delta[5]
    measured("functional_call: perturbed E row moves its logit by proj(h)·δ",
             (logits_p - expected).abs().max().item(), 1e-12)


def test_multimodal_tied_text_head_with_padding():
    """M3AE: only the text segment ties (to the text table); with pads the loss still
    counts masked real tokens only."""
    torch.manual_seed(0)
    tok = MultimodalTokenizer(ImageTokenizer(8, 2, 3, D), DiscreteTokenizer(20, 8, D, pad_id=0),
                              mask_ratios=(0.75, 0.5), loss_weights=(0.0, 1.0))
    mae = MaskedAutoencoder(tok, depth=1, num_heads=2, decoder_dim=8, decoder_depth=1,
                            decoder_heads=2, tie_embeddings=True).double()
    assert isinstance(mae.heads["image"], nn.Linear)
    assert [n for n, p in mae.named_parameters() if p is tok.text.table.weight] == \
        ["tokenizer.text.table.weight"]
    text = torch.randint(1, 20, (3, 8))
    text[:, 6:] = 0
    x = {"image": torch.randn(3, 3, 8, 8, dtype=torch.float64), "text": text}
    loss, pred, mask = mae(x)
    terms = [t for n in range(3) for j in range(6) if mask[n, 16 + j] == 1
             for t in [_ce(pred["text"][n, j].tolist(), int(text[n, j]))]]
    assert len(terms) == 3 * 3 and _rel(loss, sum(terms) / len(terms)) < 1e-12
    loss.backward()
    assert tok.text.table.weight.grad.abs().sum() > 0
