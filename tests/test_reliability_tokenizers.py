"""Tokenizer and masking inputs: bad sizes, channels, layouts, vocabularies, mask
ratios and scores give named errors with expected and got — and change nothing."""
import copy
import re

import pytest
import torch

from problems.mae import MaskedAutoencoder, random_masking
from problems.multimodal import MultimodalTokenizer
from problems.tokenizers import DiscreteTokenizer, ImageTokenizer, SequenceTokenizer, TabularTokenizer

torch.set_num_threads(1)


@pytest.mark.parametrize("make, match", [
    (lambda: ImageTokenizer(8, 0, 3, 16), r"ImageTokenizer: patch_size must be an integer >= 1, got 0"),
    (lambda: ImageTokenizer(8, -2, 3, 16), r"ImageTokenizer: patch_size must be an integer >= 1, got -2"),
    (lambda: ImageTokenizer(8, 2, 0, 16), r"ImageTokenizer: in_chans must be an integer >= 1, got 0"),
    (lambda: SequenceTokenizer(12, 0, 2, 16), r"SequenceTokenizer: patch_length must be an integer >= 1, got 0"),
    (lambda: TabularTokenizer(0, 16), r"TabularTokenizer: num_features must be an integer >= 1, got 0"),
    (lambda: DiscreteTokenizer(0, 5, 16), r"DiscreteTokenizer: vocab_size must be an integer >= 1, got 0"),
])
def test_bad_constructor_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def unchanged(module, fn):
    before = copy.deepcopy(module.state_dict())
    fn()
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("x, match", [
    (torch.randn(4, 3, 16, 16), r"\[N, C, H, W\] = \[N, 3, 8, 8\], got \[4, 3, 16, 16\]"),
    (torch.randn(4, 1, 8, 8), r"got \[4, 1, 8, 8\] \(1 channels, the tokenizer has 3\)"),
    (torch.randn(4, 8, 8, 3), r"got \[4, 8, 8, 3\] — it looks channels-last; pass x.permute\(0, 3, 1, 2\)"),
    (torch.randn(3, 8, 8), r"got \[3, 8, 8\]"),
])
def test_image_input_errors(x, match):
    tok = ImageTokenizer(8, 2, 3, 16)
    with pytest.raises(ValueError, match=r"ImageTokenizer: expected input .*" + match):
        unchanged(tok, lambda: tok.embed(x))


def test_sequence_tabular_discrete_input_errors():
    seq = SequenceTokenizer(12, 3, 2, 16)
    with pytest.raises(ValueError, match=r"SequenceTokenizer: expected input \[N, C, T\] = \[N, 2, 12\], got "
                                         r"\[4, 12, 2\] — it looks channels-last; pass x.permute\(0, 2, 1\)"):
        seq.embed(torch.randn(4, 12, 2))
    tab = TabularTokenizer(6, 16)
    with pytest.raises(ValueError, match=r"TabularTokenizer: expected input \[N, F\] = \[N, 6\], got \[4, 7\]"):
        tab.embed(torch.randn(4, 7))
    dis = DiscreteTokenizer(10, 5, 16)
    with pytest.raises(ValueError, match=r"DiscreteTokenizer 'tokens': token id\(s\) outside the vocabulary "
                                         r"\[0, 10\): e.g. \[10\]"):
        unchanged(dis, lambda: dis.embed(torch.tensor([[1, 2, 3, 10, 0]])))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 10\): e.g. \[-1\]"):
        dis.embed(torch.tensor([[1, 2, 3, -1, 0]]))
    with pytest.raises(ValueError, match=r"expected input \[N, T\] = \[N, 5\], got \[1, 6\]"):
        dis.embed(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(TypeError, match=r"expected integer token ids, got torch.float32"):
        dis.embed(torch.zeros(1, 5))


def small_mae():
    torch.manual_seed(0)
    tok = MultimodalTokenizer(ImageTokenizer(4, 2, 1, 16), DiscreteTokenizer(10, 3, 16, name="text"))
    return MaskedAutoencoder(tok, depth=1, num_heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def test_mask_ratio_with_an_unknown_segment_is_named():
    mae = small_mae()
    x = {"image": torch.randn(2, 1, 4, 4), "text": torch.randint(0, 10, (2, 3))}
    mae(x, mask_ratio={"image": 0.5, "text": 0.3})        # known names: fine
    with pytest.raises(ValueError, match=r"mask_ratio names unknown segment\(s\) \['txt'\]; this MAE's "
                                         r"segments: \['image', 'text'\]"):
        unchanged(mae, lambda: mae(x, mask_ratio={"image": 0.5, "txt": 0.3}))


@pytest.mark.parametrize("shape", [(4, 15), (4, 17), (3, 16), (16,)])
def test_scores_of_the_wrong_shape_are_named(shape):
    x = torch.randn(4, 16, 8)
    msg = f"masking scores must have shape [N, L] = [4, 16] (one per token), got {list(shape)}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        random_masking(x, 0.5, torch.rand(*shape))


def test_nan_scores_are_named():
    x = torch.randn(2, 16, 8)
    s = torch.rand(2, 16)
    s[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"masking scores contain NaN \(1 of 32\)"):
        random_masking(x, 0.5, s)
    kept, mask, _ = random_masking(x, 0.5, torch.rand(2, 16))
    assert kept.shape == (2, 8, 8) and int(mask.sum()) == 16
