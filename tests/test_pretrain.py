"""MAEPretrain: a plain-training problem, and the masker hook."""
import torch

import mlo
from problems.mae import MaskedAutoencoder
from problems.pretrain import MAEPretrain
from problems.tokenizers import ImageTokenizer


def _mae():
    torch.manual_seed(0)
    return MaskedAutoencoder(ImageTokenizer(8, 2, 1, 16), depth=1, num_heads=2, mlp_ratio=2.0,
                             decoder_dim=16, decoder_depth=1, decoder_heads=2)


def test_pretrain_reduces_reconstruction_loss():
    x = torch.rand(32, 1, 8, 8)
    mae = _mae()
    p = MAEPretrain(mae, [(x,)], mask_ratio=0.5, optimizer_kwargs={"lr": 3e-3})
    torch.manual_seed(1)
    with torch.no_grad():
        before = p.training_step((x,))["loss"].item()
    mlo.Engine([p]).run(60)
    torch.manual_seed(1)
    with torch.no_grad():
        after = p.training_step((x,))["loss"].item()
    assert after < 0.7 * before


def test_masker_scores_and_weights_reach_the_model():
    x = torch.rand(4, 1, 8, 8)
    mae = _mae()
    calls = {}

    def masker(batch, problem):
        emb = problem.patch_embeddings(batch)            # [N, L, D] at the problem's state
        calls["emb"] = emb.shape
        scores = torch.arange(16.0).expand(len(batch), 16)  # highest positions get masked
        return scores, torch.zeros(len(batch), 16)          # zero weights → zero loss

    p = MAEPretrain(mae, mask_ratio=0.25, masker=masker)
    assert p.training_step(x)["loss"].item() == 0.0
    assert calls["emb"] == (4, 16, 16)
    _, _, mask = mae(x, mask_ratio=0.25, scores=torch.arange(16.0).expand(4, 16))
    assert mask[:, 12:].eq(1).all() and mask[:, :12].eq(0).all()
    assert torch.allclose(p.patch_embeddings(x), mae.patch_embeddings(x))
