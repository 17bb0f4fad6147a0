"""Tokenizers: shapes, exact patchify/unpatchify round trips, position embeddings,
padding masks (``pad_id``) and the embedding table a tied output layer reads."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from problems.pos_embed import PositionEmbedding, sincos_1d, sincos_2d
from problems.multimodal import MultimodalTokenizer
from problems.tokenizers import (
    DiscreteTokenizer,
    ImageTokenizer,
    SequenceTokenizer,
    TabularTokenizer,
)

D = 16


def test_sincos_1d_formula():
    table = sincos_1d(8, 5)  # [5, 8]
    t, i = 3, 1
    omega = 1.0 / 10000 ** (2 * i / 8)
    assert table.shape == (5, 8)
    assert table[t, i].item() == pytest.approx(math.sin(t * omega), abs=1e-6)
    assert table[t, 4 + i].item() == pytest.approx(math.cos(t * omega), abs=1e-6)


def test_sincos_2d_is_row_major_concat_of_1d():
    table = sincos_2d(8, 2, 3)  # [6, 8]
    rows, cols = sincos_1d(4, 2), sincos_1d(4, 3)
    assert torch.equal(table[4], torch.cat([rows[1], cols[1]]))  # (row 1, col 1)


def test_position_embedding_fixed_vs_learnable():
    fixed = PositionEmbedding(D, (2, 2))
    learn = PositionEmbedding(D, (2, 2), learnable=True)
    assert len(list(fixed.parameters())) == 0 and len(list(learn.parameters())) == 1
    x = torch.zeros(3, 4, D)
    assert torch.equal(fixed(x), learn(x).detach())
    assert fixed.double()(x.double()).dtype == torch.float64


@pytest.mark.parametrize("channels", [1, 3, 13])
def test_image_tokenizer_round_trip(channels):
    tok = ImageTokenizer((8, 12), 4, channels, D)
    x = torch.randn(2, channels, 8, 12)
    p = tok.patchify(x)
    assert tok.num_tokens == 6 and tok.patch_dim == 16 * channels
    assert p.shape == (2, 6, 16 * channels)
    assert torch.equal(tok.unpatchify(p), x)
    assert tok.embed(x).shape == (2, 6, D)
    # token (row 1, col 2) holds pixel block x[:, :, 4:8, 8:12] with channels last
    block = x[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(p[0, 1 * 3 + 2], block)
    assert tok.target_kind == "regression"


def test_sequence_tokenizer_round_trip():
    tok = SequenceTokenizer(length=12, patch_length=3, in_chans=5, embed_dim=D)
    x = torch.randn(2, 5, 12)
    p = tok.patchify(x)
    assert p.shape == (2, 4, 15) and tok.num_tokens == 4
    assert torch.equal(tok.unpatchify(p), x)
    assert torch.equal(p[1, 2].view(3, 5), x[1, :, 6:9].T)
    assert tok.embed(x).shape == (2, 4, D)


def test_tabular_tokenizer_per_feature_linear():
    tok = TabularTokenizer(num_features=7, embed_dim=D)
    x = torch.randn(3, 7)
    p = tok.patchify(x)
    assert p.shape == (3, 7, 1) and torch.equal(tok.unpatchify(p), x)
    tokens = tok.embed(x)
    expected = x[1, 4] * tok.weight[4] + tok.bias[4] + tok.pos.table[4]
    assert torch.allclose(tokens[1, 4], expected)


def test_tabular_tokenizer_shared_embedding():
    """``embedding="shared"`` (the official MetaMAE code's 1x1 convolution): one
    ``Linear(1, D)`` for every feature, ``token_f = x_f · w + b + P_f``; 2·D parameters
    whatever F; xavier-uniform ``w``, zero ``b``."""
    torch.manual_seed(0)
    tok = TabularTokenizer(num_features=7, embed_dim=D, embedding="shared")
    assert tok.embedding == "shared" and tok.proj.weight.shape == (D, 1)
    with torch.no_grad():
        tok.proj.bias.normal_()              # a non-zero b, so the test sees it
    w, b = tok.proj.weight[:, 0], tok.proj.bias
    x = torch.randn(3, 7)
    assert torch.allclose(tok.embed(x), x[..., None] * w + b + tok.pos.table, atol=1e-6)
    assert torch.allclose(tok._embed_patches(tok.patchify(x)), x[..., None] * w + b, atol=1e-6)
    n_params = lambda t: sum(q.numel() for q in t.parameters())  # noqa: E731
    for f in (1, 7, 50):
        assert n_params(TabularTokenizer(f, D, embedding="shared")) == D + D
        assert n_params(TabularTokenizer(f, D)) == 2 * f * D      # per_feature, the default
    assert TabularTokenizer(7, D).embedding == "per_feature" and not hasattr(TabularTokenizer(7, D), "proj")
    fresh = TabularTokenizer(7, 256, embedding="shared")
    bound = math.sqrt(6.0 / (1 + 256))       # xavier-uniform of a [256, 1] weight
    assert fresh.proj.weight.abs().max() <= bound and fresh.proj.weight.abs().max() > 0.5 * bound
    assert torch.equal(fresh.proj.bias, torch.zeros(256))
    # equal features at different positions differ only by their positions
    t = tok.embed(torch.full((1, 7), 0.7))
    assert torch.allclose(t[0, 2] - t[0, 5], tok.pos.table[2] - tok.pos.table[5], atol=1e-6)
    with pytest.raises(ValueError, match="embedding must be one of"):
        TabularTokenizer(7, D, embedding="conv")


def test_discrete_tokenizer():
    tok = DiscreteTokenizer(vocab_size=11, length=9, embed_dim=D)
    ids = torch.randint(0, 11, (2, 9))
    assert torch.equal(tok.unpatchify(tok.patchify(ids)), ids)
    assert tok.embed(ids).shape == (2, 9, D)
    assert tok.target_kind == "classification" and tok.patch_dim == 11
    assert torch.allclose(tok.embed(ids)[0, 3], tok.table.weight[ids[0, 3]] + tok.pos.table[3])


def test_discrete_padding_and_embedding_table():
    tok = DiscreteTokenizer(vocab_size=11, length=6, embed_dim=D, pad_id=0)
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [0, 0, 7, 8, 9, 10]])
    assert torch.equal(tok.padding(ids), ids == 0)
    assert DiscreteTokenizer(11, 6, D).padding(ids) is None  # no pad_id: no padding
    assert ImageTokenizer(8, 4, 3, D).padding(torch.randn(1, 3, 8, 8)) is None
    assert tok.embedding_table() is tok.table.weight and tok.embedding_table("tokens") is tok.table.weight
    with pytest.raises(KeyError):
        tok.embedding_table("text")
    for bad in (-1, 11):
        with pytest.raises(ValueError, match="pad_id"):
            DiscreteTokenizer(11, 6, D, pad_id=bad)
    # the multimodal padding mask: image patches are never padding, text pads where x == pad_id
    mm = MultimodalTokenizer(ImageTokenizer(8, 4, 3, D), DiscreteTokenizer(11, 6, D, pad_id=0))
    x = {"image": torch.randn(2, 3, 8, 8), "text": ids}
    pad = mm.padding(x)
    assert pad.shape == (2, 4 + 6) and pad.dtype == torch.bool
    assert not pad[:, :4].any() and torch.equal(pad[:, 4:], ids == 0)
    assert torch.equal(mm.padding((x["image"], ids)), pad)
    assert _multimodal().padding({"image": x["image"], "text": ids.clamp(max=19)}) is None
    assert mm.embedding_table("text") is mm.text.table.weight


def _multimodal():
    return MultimodalTokenizer(ImageTokenizer(8, 4, 3, D), DiscreteTokenizer(20, 5, D),
                               mask_ratios=(0.75, 0.5), loss_weights=(1.0, 0.5))


def test_multimodal_tokenizer_layout_and_round_trip():
    tok = _multimodal()
    x = {"image": torch.randn(2, 3, 8, 8), "text": torch.randint(0, 20, (2, 5))}
    tokens = tok.embed(x)
    assert tokens.shape == (2, 4 + 5, D) and tok.num_tokens == 9
    assert torch.equal(tok.embed((x["image"], x["text"])), tokens)  # tuple input
    image_seg, text_seg = tok.segments
    assert (image_seg.start, image_seg.stop, image_seg.kind) == (0, 4, "regression")
    assert (text_seg.start, text_seg.stop, text_seg.kind) == (4, 9, "classification")
    assert (text_seg.mask_ratio, text_seg.loss_weight, text_seg.patch_dim) == (0.5, 0.5, 20)
    # modality-type vectors are added on top of each sub-tokenizer's embedding
    assert torch.allclose(tokens[:, :4], tok.image.embed(x["image"]) + tok.types[0])
    assert torch.allclose(tokens[:, 4:], tok.text.embed(x["text"]) + tok.types[1])
    back = tok.unpatchify(tok.patchify(x))
    assert torch.equal(back["image"], x["image"]) and torch.equal(back["text"], x["text"])
    # decoder positions: each modality's layout at the new width + its own learned type
    pos = tok.position_embedding(8)
    out = pos(torch.zeros(2, 9, 8))
    assert len(list(pos.parameters())) == 1 and pos.types.shape == (2, 8)
    assert torch.allclose(out[0, :4], sincos_2d(8, 2, 2) + pos.types[0])
    assert torch.allclose(out[0, 4:], sincos_1d(8, 5) + pos.types[1])


# --- every tokenizer: patchify and unpatchify are inverse bijections -----------------

def _image(learnable_pos=False):
    return ImageTokenizer((8, 12), 4, 5, D, learnable_pos=learnable_pos)  # multispectral


def _sequence(learnable_pos=False):
    return SequenceTokenizer(12, 3, 4, D, learnable_pos=learnable_pos)


def _tabular(learnable_pos=False):
    return TabularTokenizer(7, D, learnable_pos=learnable_pos)


def _tabular_shared(learnable_pos=False):
    return TabularTokenizer(7, D, learnable_pos=learnable_pos, embedding="shared")


def _discrete(learnable_pos=False):
    return DiscreteTokenizer(11, 9, D, learnable_pos=learnable_pos)


def _mm(learnable_pos=False):
    return MultimodalTokenizer(ImageTokenizer(8, 4, 3, D, learnable_pos=learnable_pos),
                               DiscreteTokenizer(20, 5, D, learnable_pos=learnable_pos))


def _raw(tok, n=3):
    """A random raw input for ``tok``."""
    if isinstance(tok, MultimodalTokenizer):
        return {"image": _raw(tok.image, n), "text": _raw(tok.text, n)}
    if isinstance(tok, ImageTokenizer):
        return torch.randn(n, tok.in_chans, *tok.image_size)
    if isinstance(tok, SequenceTokenizer):
        return torch.randn(n, tok.in_chans, tok.length)
    if isinstance(tok, TabularTokenizer):
        return torch.randn(n, tok.num_tokens)
    return torch.randint(0, tok.vocab_size, (n, tok.num_tokens))


def _target(tok, n=3):
    """A random per-token target (the codomain of ``patchify``)."""
    if isinstance(tok, MultimodalTokenizer):
        return {"image": _target(tok.image, n), "text": _target(tok.text, n)}
    if isinstance(tok, DiscreteTokenizer):
        return torch.randint(0, tok.vocab_size, (n, tok.num_tokens))
    return torch.randn(n, tok.num_tokens, tok.patch_dim)


class _Embed(nn.Module):
    """``tok.embed`` as a module ``forward``, so ``functional_call`` can run it."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def forward(self, x):
        return self.tok.embed(x)


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a.shape == b.shape and torch.equal(a, b)


ALL = [_image, _sequence, _tabular, _tabular_shared, _discrete, _mm]


@pytest.mark.parametrize("make", ALL, ids=lambda f: f.__name__.strip("_"))
def test_patchify_unpatchify_are_inverse(make):
    torch.manual_seed(0)
    tok = make()
    x, p = _raw(tok), _target(tok)
    assert _equal(tok.unpatchify(tok.patchify(x)), x)  # unpatchify ∘ patchify = id
    assert _equal(tok.patchify(tok.unpatchify(p)), p)  # patchify ∘ unpatchify = id
    for seg in tok.segments:  # targets have the advertised per-segment shapes
        t = tok.targets(x)[seg.name]
        width = () if seg.kind == "classification" else (seg.patch_dim,)
        assert t.shape == (3, seg.length, *width)
    assert tok.embed(x).shape == (3, tok.num_tokens, D)


@pytest.mark.parametrize("make", ALL, ids=lambda f: f.__name__.strip("_"))
def test_add_position_adds_what_embed_adds(make):
    """``add_position`` places any token (a mask token) exactly as ``embed`` places data."""
    torch.manual_seed(0)
    tok = make()
    x = _raw(tok)
    zero = tok.add_position(torch.zeros(3, tok.num_tokens, D))  # P (+ types), [3, L, D]
    if isinstance(tok, MultimodalTokenizer):
        content = torch.cat([tok.image._embed_patches(tok.image.patchify(x["image"])),
                             tok.text._embed_patches(tok.text.patchify(x["text"]))], 1)
    else:
        content = tok._embed_patches(tok.patchify(x))
    assert torch.allclose(tok.embed(x), content + zero, atol=1e-6)
    assert zero.abs().sum() > 0


@pytest.mark.parametrize("make", ALL, ids=lambda f: f.__name__.strip("_"))
def test_learnable_position_option(make):
    torch.manual_seed(0)
    fixed, learn = make(), make(learnable_pos=True)
    fixed_params = {n for n, _ in fixed.named_parameters()}
    learn_params = dict(learn.named_parameters())
    pos_names = [n for n in learn_params if n.endswith("pos.table")]
    assert pos_names and not any(n.endswith("pos.table") for n in fixed_params)
    # the learnable table starts from the same sin-cos values as the fixed buffer
    fixed_buffers = dict(fixed.named_buffers())
    for n in pos_names:
        assert torch.equal(learn_params[n].detach(), fixed_buffers[n])
    # d/dP Σ (tokens + P) = N for every entry: the table is added once per sample
    x = _raw(learn)
    learn.embed(x).sum().backward()
    for n in pos_names:
        assert torch.equal(learn_params[n].grad, torch.full_like(learn_params[n], 3.0))
    # under functional_call a shifted table shifts the tokens by exactly that amount
    delta = {n: learn_params[n].detach() + 0.25 for n in pos_names}
    shifted = functional_call(_Embed(learn), {"tok." + n: v for n, v in delta.items()}, (x,))
    assert torch.allclose(shifted - learn.embed(x), torch.full_like(shifted, 0.25), atol=1e-6)
