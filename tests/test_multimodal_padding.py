"""Text padding in the M3AE-style multimodal MAE (``DiscreteTokenizer(pad_id=...)``).

Design under test (``problems/mae.py``): pads are never visible (they rank as masked,
so they never reach the encoder), carry zero loss weight and are left out of the
masked count; the text mask ratio counts real tokens, with one kept count per batch
``K = min_n (R_n − num_masked(R_n, r))`` because the encoder input is a fixed-shape
gather. Without padding, everything is bit-identical to the unpadded model.
"""


import pytest
import torch

from problems.mae import MaskedAutoencoder, num_masked, random_masking
from problems.multimodal import MultimodalTokenizer
from problems.tokenizers import DiscreteTokenizer, ImageTokenizer
from _hand import ce as _ce, mse as _mse, pixels as _pixels, rel_scalar as _rel

D, V, T, PAD = 16, 20, 8, 0
LI = 16  # image tokens (8x8 image, patch 2)


def _mae(pad_id=PAD, decoder_depth=1, mask_ratios=(0.75, 0.5), loss_weights=(0.3, 2.0)):
    torch.manual_seed(0)
    tok = MultimodalTokenizer(ImageTokenizer(8, 2, 3, D), DiscreteTokenizer(V, T, D, pad_id=pad_id),
                              mask_ratios=mask_ratios, loss_weights=loss_weights)
    return MaskedAutoencoder(tok, depth=1, num_heads=2, decoder_dim=8,
                             decoder_depth=decoder_depth, decoder_heads=2)


def _batch(real_lengths=(8, 6, 4), left_pad=(False, False, True), dtype=torch.float64, seed=1):
    """Text of real ids in 1..V-1 with ``T − R_n`` pads (trailing, or leading)."""
    g = torch.Generator().manual_seed(seed)
    n = len(real_lengths)
    text = torch.randint(1, V, (n, T), generator=g)
    for b, (r, left) in enumerate(zip(real_lengths, left_pad)):
        if left:
            text[b, :T - r] = PAD
        else:
            text[b, r:] = PAD
    return {"image": torch.randn(n, 3, 8, 8, generator=g, dtype=dtype), "text": text}


# --- loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("decoder_depth", [1, 0], ids=["decoder", "linear"])
def test_padded_loss_is_mean_over_masked_real_tokens(measured, decoder_depth):
    """loss = 0.3 · mean_{masked patches} MSE + 2.0 · mean_{masked, non-pad text} CE."""
    mae = _mae(decoder_depth=decoder_depth).double()
    x = _batch()
    a = torch.rand(3, LI + T, dtype=torch.float64)
    for weights in (None, a):
        loss, pred, mask = mae(x, token_weights=weights)
        img, txt = [], []
        for n in range(3):
            for i in range(LI):
                if mask[n, i] == 1:
                    w = 1.0 if weights is None else a[n, i].item()
                    img.append(w * _mse(pred["image"][n, i].tolist(), _pixels(x["image"], n, i)))
            for j in range(T):
                label = int(x["text"][n, j])
                if mask[n, LI + j] == 1 and label != PAD:
                    w = 1.0 if weights is None else a[n, LI + j].item()
                    txt.append(w * _ce(pred["text"][n, j].tolist(), label))
        # R = (8, 6, 4), r = 0.5: K = min(int(R/2)) = 2 kept, so 6 + 4 + 2 masked real tokens
        assert len(img) == 3 * 12 and len(txt) == 12
        expected = 0.3 * sum(img) / len(img) + 2.0 * sum(txt) / len(txt)
        label = "plain" if weights is None else "token weights"
        measured(f"M3AE padded loss vs hand mean over masked non-pad tokens ({label})",
                 _rel(loss, expected), 1e-12)


def test_predictions_at_pads_do_not_change_the_loss():
    mae = _mae().double()
    x = _batch()
    pad = x["text"] == PAD  # [N, T]
    _, pred, mask = mae(x)
    pred = {k: v.detach().requires_grad_(True) for k, v in pred.items()}
    loss = mae.forward_loss(x, pred, mask)
    moved = dict(pred, text=pred["text"] + 100.0 * torch.randn_like(pred["text"]) * pad[..., None])
    assert torch.equal(mae.forward_loss(x, moved, mask), loss)
    (grad,) = torch.autograd.grad(loss, pred["text"])
    assert torch.equal(grad[pad], torch.zeros_like(grad[pad]))  # exactly no gradient at pads
    masked_real = (mask[:, LI:] == 1) & ~pad
    assert (grad[masked_real].abs().sum(-1) > 0).all()
    # a caller's selection that includes pads (e.g. a support set) still skips them
    everything = torch.ones_like(mask)
    ref = mae.forward_loss(x, pred, everything)
    assert torch.equal(mae.forward_loss(x, moved, everything), ref)


# --- masking ------------------------------------------------------------------------

@pytest.mark.parametrize("decoder_depth", [1, 0], ids=["decoder", "linear"])
def test_no_pad_ever_reaches_the_encoder(decoder_depth):
    """Scores that would keep the pads first: pads still end up masked, and the
    encoder's output does not depend on the pad embedding at all."""
    mae = _mae(decoder_depth=decoder_depth).double()
    x = _batch(real_lengths=(5, 3, 7), left_pad=(False, True, False))
    pad = mae.padding(x)  # [N, L]
    assert pad[:, :LI].sum() == 0 and torch.equal(pad[:, LI:], x["text"] == PAD)
    scores = torch.rand(3, LI + T).masked_fill(pad, -1.0)  # pads = lowest score = kept first
    latent, mask, _ = mae.forward_encoder(x, scores=scores)
    assert torch.equal(mask[pad], torch.ones(int(pad.sum()), dtype=mask.dtype))
    if decoder_depth:  # encoder input = CLS + exactly the kept tokens, none of them a pad
        seen = []
        hook = mae.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        mae.forward_encoder(x, scores=scores)
        hook.remove()
        tokens = mae.patch_embeddings(x)
        for b in range(3):
            kept = torch.nonzero(mask[b] == 0).flatten()
            assert not pad[b, kept].any()
            rows = seen[0][b, 1:]
            assert rows.shape[0] == kept.numel()
            assert all(any(torch.equal(r, tokens[b, k]) for k in kept) for r in rows)
    with torch.no_grad():  # whatever a pad embeds to, the encoder never sees it
        mae.tokenizer.text.table.weight[PAD] += 10.0
    latent2, mask2, _ = mae.forward_encoder(x, scores=scores)
    assert torch.equal(mask2, mask) and torch.equal(latent2, latent)


def test_text_ratio_counts_real_tokens_with_one_kept_count_per_batch():
    mae = _mae(mask_ratios=(0.75, 0.75))
    for lengths in [(8, 6, 4), (5, 5, 5), (8, 1, 7), (2, 8, 3)]:
        x = _batch(real_lengths=lengths, left_pad=(True, False, False), dtype=torch.float32)
        _, _, mask = mae(x)
        pad = x["text"] == PAD
        kept_real = ((mask[:, LI:] == 0) & ~pad).sum(1)
        masked_real = ((mask[:, LI:] == 1) & ~pad).sum(1)
        k = min(r - num_masked(r, 0.75) for r in lengths)
        assert torch.equal(kept_real, torch.full((3,), k))
        assert torch.equal(masked_real, torch.tensor(lengths) - k)
        shortest = lengths.index(min(lengths))  # exactly the ratio for the shortest sample
        assert masked_real[shortest] == num_masked(min(lengths), 0.75)
        assert torch.equal(mask[:, :LI].sum(1), torch.full((3,), 12.0))  # image unaffected
    # equal real lengths (a length-bucketed batch): exactly the ratio for every sample
    x = _batch(real_lengths=(6, 6, 6), dtype=torch.float32)
    mask = mae(x)[2]
    assert (((mask[:, LI:] == 1) & (x["text"] != PAD)).sum(1) == num_masked(6, 0.75)).all()


def test_random_masking_padding_rule_and_all_pad_sample():
    x = torch.randn(3, 10, 2)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[0, 7:] = True   # segment 2 (positions 4..9): 3 real tokens
    padding[1, 4:] = True   # segment 2: only pads (an image-only sample)
    kept, mask, ids_restore = random_masking(x, (0.5, 0.5), lengths=(4, 6), padding=padding)
    assert kept.shape == (3, 2 + 0, 2)  # segment 1: 4 − 2; segment 2: min over samples = 0
    assert mask[padding].eq(1).all()
    # no padding given vs an all-False padding: the same masks, bit for bit
    scores = torch.rand(3, 10)
    a = random_masking(x, (0.5, 0.5), scores, (4, 6))
    b = random_masking(x, (0.5, 0.5), scores, (4, 6), torch.zeros(3, 10, dtype=torch.bool))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# --- unchanged without padding --------------------------------------------------------

@pytest.mark.parametrize("decoder_depth", [1, 0], ids=["decoder", "linear"])
def test_without_pads_the_model_is_bit_identical(decoder_depth):
    """``pad_id`` set but no pad in the batch ≡ ``pad_id=None``: same parameters,
    masks, predictions, loss and gradients, bit for bit."""
    plain, padded = _mae(None, decoder_depth), _mae(PAD, decoder_depth)
    x = _batch(real_lengths=(8, 8, 8), dtype=torch.float32)
    assert plain.padding(x) is None and not padded.padding(x).any()
    for name, p in plain.named_parameters():
        assert torch.equal(p, dict(padded.named_parameters())[name])
    weights = torch.rand(3, LI + T)
    torch.manual_seed(3)
    la, pa, ma = plain(x, token_weights=weights)
    torch.manual_seed(3)
    lb, pb, mb = padded(x, token_weights=weights)
    assert torch.equal(la, lb) and torch.equal(ma, mb)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ga = torch.autograd.grad(la, list(plain.parameters()), allow_unused=True)
    gb = torch.autograd.grad(lb, list(padded.parameters()), allow_unused=True)
    assert all((u is None and v is None) or torch.equal(u, v) for u, v in zip(ga, gb))
    # without pad_id the id 0 is an ordinary token: masked, encoded and in the loss
    x0 = _batch(real_lengths=(4, 4, 4))
    _, pred, mask = plain.double()(x0)
    assert torch.equal(mask[:, LI:].sum(1), torch.full((3,), 4.0, dtype=mask.dtype))
