"""MetaMAE's graph form (``problems.meta_mae.build_graph``) against its plain objective.

The reference is ``metamae_loss(..., masks=(scores, support))`` (itself checked against
naive autograd and finite differences in test_metamae_parts.py). Float64, a tiny
Transformer MAE, fixed masking scores and supports per batch, windows of different
batch sizes in a row; the gradient the upper's optimizer applies (a recording SGD) is
compared parameter by parameter — every encoder, decoder and projector tensor.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mlo
from _helpers import recording
from problems.latent_adaptation import MetaMAEOptions, draw_support, metamae_loss
from problems.mae import MaskedAutoencoder
from problems.meta_mae import MetaMAEPretrain, build_graph
from problems.tokenizers import ImageTokenizer

SIZES = (5, 3, 4)          # one window each, in this order
LR = 0.05                  # the upper's SGD step between windows


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tiny_mae(decoder_depth: int, seed: int = 0) -> MaskedAutoencoder:
    """8×8 one-channel images, 2×2 patches: 16 tokens on a 4×4 grid, width 16."""
    torch.manual_seed(seed)
    return MaskedAutoencoder(ImageTokenizer(8, 2, 1, 16), depth=2, num_heads=2, mlp_ratio=2.0,
                             decoder_dim=8, decoder_depth=decoder_depth, decoder_heads=2,
                             mask_ratio=0.5, attn_impl="math").double()


def fixed_batches(mae: MaskedAutoencoder, seed: int = 1):
    """``(x, scores, support)`` per window: masks and Nearby-S supports drawn once."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in SIZES:
        x = torch.randn(n, 1, 8, 8, generator=g)
        scores = torch.rand(n, mae.num_tokens, generator=g)
        with torch.no_grad():
            _, mask, _ = mae.forward_encoder(x, scores=scores)
        out.append((x, scores, draw_support(mae, x, mask, 0.3, g)))
    return out


def reference(model, batch, opts):
    """``{name: ∇ metamae_loss}`` over the model's trainable parameters."""
    x, scores, support = batch
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    proj = model.projector if opts.contrastive_weight else None
    loss = metamae_loss(model.mae, x, opts, proj, masks=(scores, support))["loss"]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {k: g for (k, _), g in zip(named, grads)}


def worst(got, ref):
    """max over tensors of ``‖got − ref‖ / ‖ref‖``."""
    return max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref)


def run_graph(opts, decoder_depth, check):
    """Runs one window per batch; then ``check(window, applied, reference, batch, model)``
    with the gradient the upper applied, ``metamae_loss``'s and the model before the step."""
    mae = tiny_mae(decoder_depth)
    data = fixed_batches(mae)
    engine, probs = build_graph(mae, data, opts, projector_hidden=16, projector_out=4,
                                optimizer=recording(torch.optim.SGD), optimizer_kwargs={"lr": LR})
    up = probs["upper"]
    assert ("latent" in probs) == opts.adapt
    expect = [k for k, _ in up.module.named_parameters()
              if opts.contrastive_weight or not k.startswith("projector.")]
    assert up.param_names == expect          # every encoder / decoder / projector tensor
    for w, batch in enumerate(data):
        before = copy.deepcopy(up.module)           # the parameters this window starts from
        refs = reference(before, batch, opts)
        engine.run(opts.steps if opts.adapt else 1)
        assert len(up.optimizer.record) == w + 1
        check(w, dict(zip(up.param_names, up.optimizer.record[-1])), refs, batch, before)


CASES = [(k, fo, dec, lam) for k in (1, 3) for fo in (False, True) for dec in (0, 1)
         for lam in (0.5, 0.0)]


@pytest.mark.parametrize("steps,first_order,decoder_depth,lam", CASES)
def test_graph_gradient_equals_metamae_loss(measured, steps, first_order, decoder_depth, lam):
    opts = MetaMAEOptions(alpha=0.3, steps=steps, first_order=first_order, contrastive_weight=lam)
    flipped = MetaMAEOptions(alpha=0.3, steps=steps, first_order=not first_order, contrastive_weight=lam)
    errs = []

    def check(w, applied, refs, batch, model):
        for k, g in refs.items():
            assert float(g.norm()) > 0, f"{k}: zero reference gradient (the check could not fail)"
        errs.append(worst(applied, refs))
        # The comparison resolves the inner steps' second-order term: the other order's
        # gradient (same parameters, same batch) is far outside the tolerance.
        assert worst(applied, reference(model, batch, flipped)) > 1e-6

    run_graph(opts, decoder_depth, check)
    order = "first" if first_order else "second"
    dec = "linear" if decoder_depth == 0 else "transformer"
    measured(f"MetaMAE graph vs metamae_loss grad (K={steps}, {order} order, {dec} decoder, "
             f"lambda={lam}, {len(SIZES)} windows)", max(errs), 1e-10)


@pytest.mark.parametrize("decoder_depth,lam", [(0, 0.0), (1, 0.0), (1, 0.5)])
def test_no_adaptation_is_the_upper_alone(measured, decoder_depth, lam):
    """adapt off: no latent problem; MAE (λ = 0) or MAE + contrast of Z with itself."""
    opts = MetaMAEOptions(adapt=False, contrastive_weight=lam)
    errs = []
    run_graph(opts, decoder_depth, lambda w, a, r, b, m: errs.append(worst(a, r)))
    measured(f"MetaMAE graph without adaptation vs metamae_loss grad (decoder depth "
             f"{decoder_depth}, lambda={lam})", max(errs), 1e-10)


def test_graph_gradient_finite_differences(measured):
    """Central differences of the objective on the largest entry of a few tensors."""
    opts = MetaMAEOptions(alpha=0.3, steps=2, contrastive_weight=0.5)
    names = ["mae.cls_token", "mae.mask_token", "mae.tokenizer.proj.bias",
             "mae.encoder.blocks.0.attn.qkv.weight", "mae.decoder.blocks.0.mlp.fc1.weight",
             "mae.heads.image.weight", "projector.fc1.weight", "projector.bn.weight"]
    errs = {}

    def check(w, applied, refs, batch, model):
        if w:
            return
        x, scores, support = batch
        for k in names:
            i = int(applied[k].abs().argmax())
            eps, vals = 1e-5, []
            for sign in (1, -1):
                m = copy.deepcopy(model)
                with torch.no_grad():
                    dict(m.named_parameters())[k].view(-1)[i] += sign * eps
                vals.append(float(metamae_loss(m.mae, x, opts, m.projector,
                                               masks=(scores, support))["loss"].detach()))
            fd = (vals[0] - vals[1]) / (2 * eps)
            errs[k] = abs(fd - float(applied[k].view(-1)[i])) / abs(fd)

    run_graph(opts, 1, check)
    assert set(errs) == set(names)
    measured("MetaMAE graph grad vs central finite differences (8 entries, K=2)",
             max(errs.values()), 1e-6)


def test_graph_matches_single_problem_form(measured):
    """Random masks, drawn supports, AdamW: the graph's trajectory = MetaMAEPretrain's."""
    opts = MetaMAEOptions(alpha=0.5, steps=1, contrastive_weight=1.0, support_ratio=0.5)
    mae = tiny_mae(1)
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(n, 1, 8, 8, generator=g),) for n in SIZES]
    torch.manual_seed(11)
    single = MetaMAEPretrain(copy.deepcopy(mae), data, options=opts, projector_hidden=16,
                             projector_out=4, generator=torch.Generator().manual_seed(3),
                             optimizer_kwargs={"lr": 1e-2, "weight_decay": 1e-4})
    engine, probs = build_graph(mae, data, opts, projector=copy.deepcopy(single.module.projector),
                                generator=torch.Generator().manual_seed(3),
                                optimizer_kwargs={"lr": 1e-2, "weight_decay": 1e-4})
    start = {k: p.detach().clone() for k, p in single.module.named_parameters()}
    torch.manual_seed(7)
    engine.run(len(SIZES))
    torch.manual_seed(7)
    mlo.Engine([single]).run(len(SIZES))
    a = {k: p.detach() for k, p in probs["upper"].module.named_parameters()}
    b = {k: p.detach() for k, p in single.module.named_parameters()}
    assert set(a) == set(b)
    assert min(float((b[k] - start[k]).norm()) for k in b) > 0     # every tensor moved
    measured("MetaMAE graph vs single-problem form, 3 AdamW steps, random masks (max rel)",
             max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b), 1e-10)


def test_build_graph_checks_its_arguments():
    mae = tiny_mae(1)
    with pytest.raises(TypeError, match="mae must be"):
        build_graph(torch.nn.Linear(2, 2), [])
    with pytest.raises(TypeError, match="options must be"):
        build_graph(mae, [], {"alpha": 0.5})
    with pytest.raises(TypeError, match="options.steps"):
        build_graph(mae, [], MetaMAEOptions(steps=1.0))
    with pytest.raises(ValueError, match="alpha > 0"):
        build_graph(mae, [], MetaMAEOptions(alpha=0.0))
    with pytest.raises(ValueError, match="support_ratio"):
        build_graph(mae, [], MetaMAEOptions(support_ratio=2.0))
    with pytest.raises(TypeError, match="generator"):
        build_graph(mae, [], generator=0)
    engine, probs = build_graph(mae, [], MetaMAEOptions(steps=3, first_order=True))
    lat = probs["latent"]
    assert lat.config.unroll_steps == 3 and lat.first_order
    assert lat.optimizer.param_groups[0]["lr"] == 0.5 and lat.optimizer.param_groups[0]["momentum"] == 0
