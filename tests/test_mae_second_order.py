"""Second-order gradients through the MAE decoder (float64, central differences) and the
transformer's configuration and attention paths.

The second-order quantity is MetaMAE's adapted-latent query loss

    Lq(θ, Z) = L_query(decoder_θ(Z*)),   Z* = Z − α ∇_Z L_support(decoder_θ(Z)),

whose gradient differentiates through ``∇_Z L_support`` (double backward through the
decoder's attention). Its directional derivative along a random direction over all
parameters and ``Z`` is compared with ``[Lq(·+εv) − Lq(·−εv)] / 2ε``.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from problems.mae import MaskedAutoencoder
from problems.tokenizers import ImageTokenizer
from problems.transformer import Transformer, math_attention

D = 16


class AdaptedQueryLoss(nn.Module):
    """``Lq(Z − α ∇_Z L_support(decoder(Z)))`` on fixed data and masks."""

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
        z_star = z - self.alpha * g  # [N, 1+K, D]
        return mae.forward_loss(self.x, mae.forward_decoder(z_star, self.ids), self.query)


def _grad(loss, inputs):
    """Gradients, zeros for inputs the loss does not use (the linear decoder's mask token
    lives in the encoder, upstream of ``Z``)."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]


def _setup(decoder_depth=2, attn_impl=None, norm_pix=True):
    torch.manual_seed(0)
    mae = MaskedAutoencoder(ImageTokenizer(8, 2, 3, D), depth=1, num_heads=2, decoder_dim=8,
                            decoder_depth=decoder_depth, decoder_heads=2, norm_pix=norm_pix,
                            attn_impl=attn_impl).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        latent, mask, ids_restore = mae.forward_encoder(x)  # [N, 1+K, D], [N, 16]
    # support: visible tokens ∪ half of the masked ones (as Nearby-S), query: masked tokens
    g = torch.Generator().manual_seed(2)
    support = (1 - mask) + mask * (torch.rand(mask.shape, generator=g) < 0.5).double()
    model = AdaptedQueryLoss(mae, x, ids_restore, support, mask, alpha=0.5)
    return model, latent


@pytest.mark.parametrize("decoder_depth,attn_impl", [(2, None), (2, "math"), (0, None)],
                         ids=["depth2-math_attention()", "depth2-attn_impl=math", "linear"])
def test_second_order_gradient_matches_central_differences(measured, decoder_depth, attn_impl):
    model, latent = _setup(decoder_depth, attn_impl)
    params = {k: v for k, v in model.named_parameters() if not k.startswith(("mae.encoder.",
                                                                               "mae.tokenizer.",
                                                                               "mae.cls_token"))}
    assert any(k.startswith("mae.decoder.blocks") for k in params) == (decoder_depth > 0)
    torch.manual_seed(1)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    v_z = torch.randn_like(latent)
    eps = 1e-6

    with math_attention(attn_impl is None):
        z = latent.clone().requires_grad_(True)
        grads = _grad(model(z), [*params.values(), z])
        g_fo = _grad(model(z, first_order=True), [*params.values(), z])

        def lq(t):
            shifted = {k: p.detach() + t * v[k] for k, p in params.items()}
            zz = (latent + t * v_z).requires_grad_(True)
            return functional_call(model, shifted, (zz,), {"create_graph": False}).item()

        fd = (lq(eps) - lq(-eps)) / (2 * eps)

    def along_v(g):  # directional derivative ⟨g, (v, v_z)⟩
        return (sum((gi * v[k]).sum() for gi, k in zip(g[:-1], params)) + (g[-1] * v_z).sum()).item()

    analytic, first_order = along_v(grads), along_v(g_fo)
    label = "linear decoder" if decoder_depth == 0 else f"depth-{decoder_depth} decoder, math attention"
    measured(f"2nd-order grad through {label} vs central FD (float64)",
             abs(analytic - fd) / abs(fd), 1e-8)
    # the second-order term is not negligible, so the comparison can tell it apart
    assert abs(first_order - fd) / abs(fd) > 1e-3


def test_fused_attention_has_no_double_backward_on_cpu():
    """Documented behaviour (torch 2.13, CPU): the fused SDPA kernel's backward has no
    derivative; forcing the math path fixes it for the same module."""
    model, latent = _setup(decoder_depth=2, attn_impl="fused")
    z = latent.clone().requires_grad_(True)
    loss = model(z)  # builds ∇_Z L_support with create_graph=True: fine
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(loss, z)  # differentiating it again: not
    with math_attention():
        assert torch.isfinite(torch.autograd.grad(model(z), z)[0]).all()


def test_math_and_fused_attention_agree(measured):
    torch.manual_seed(0)
    net = Transformer(D, 2, 4).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with math_attention():
        y_math = net(x)
    measured("math vs fused attention, 2 blocks (float64)", (net(x) - y_math).abs().max().item(),
             1e-12)
    assert Transformer(D, 1, 4, attn_impl="math").blocks[0].attn.attn_impl == "math"
    with pytest.raises(ValueError):
        Transformer(D, 1, 4, attn_impl="flash")


def test_transformer_and_mae_sizes_are_configurable():
    net = Transformer(24, depth=3, num_heads=6, mlp_ratio=3.0, dropout=0.25)
    assert len(net.blocks) == 3 and net.blocks[0].attn.num_heads == 6
    assert net.blocks[0].mlp.fc1.out_features == 72 and net.blocks[0].attn.qkv.in_features == 24
    x = torch.randn(2, 5, 24)
    net.train()
    assert not torch.equal(net(x), net(x))  # dropout active in training
    net.eval()
    assert torch.equal(net(x), net(x))
    assert Transformer(24, 0, 6)(x).shape == x.shape  # depth 0: final norm only
    torch.manual_seed(0)
    mae = MaskedAutoencoder(ImageTokenizer(8, 2, 3, 32), depth=2, num_heads=4, mlp_ratio=2.0,
                            decoder_dim=16, decoder_depth=3, decoder_heads=2,
                            decoder_mlp_ratio=4.0, dropout=0.1, decoder_dropout=0.2)
    enc, dec = mae.encoder.blocks, mae.decoder.blocks
    assert (len(enc), enc[0].attn.num_heads, enc[0].mlp.fc1.out_features) == (2, 4, 64)
    assert (len(dec), dec[0].attn.num_heads, dec[0].mlp.fc1.out_features) == (3, 2, 64)
    assert enc[0].mlp.drop.p == 0.1 and dec[0].attn.proj_drop.p == 0.2
