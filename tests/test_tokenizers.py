"""Tokenizers: shapes, exact patchify/unpatchify round trips, position embeddings."""

import math

import pytest
import torch

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


def test_discrete_tokenizer():
    tok = DiscreteTokenizer(vocab_size=11, length=9, embed_dim=D)
    ids = torch.randint(0, 11, (2, 9))
    assert torch.equal(tok.unpatchify(tok.patchify(ids)), ids)
    assert tok.embed(ids).shape == (2, 9, D)
    assert tok.target_kind == "classification" and tok.patch_dim == 11
    assert torch.allclose(tok.embed(ids)[0, 3], tok.table.weight[ids[0, 3]] + tok.pos.table[3])


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
    pos = tok.position_embedding(8)
    assert pos(torch.zeros(2, 9, 8)).shape == (2, 9, 8)
