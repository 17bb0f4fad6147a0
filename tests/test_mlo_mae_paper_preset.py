"""The MLO-MAE ``paper`` preset's official-code choices (issue 19): input pipeline (random
crop + flip on fixture CIFAR images, normalization inside the model), length, weight decay
per level with no decay on 1-D parameters, cosine end points, learnable position tables,
the stage-II head's test accuracy next to the linear probe — each a setting whose default
is today's behaviour — and the preset itself through the main job
(``examples/mlo_mae_cifar.py``, i.e. ``problems.jobs.mlo_mae_job.main``)."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from problems.datasets import (CIFAR_MEAN, CIFAR_STD, augment_stream, infinite_loader, load_cifar,
                               random_crop_flip, write_cifar_like)
from problems.jobs import mlo_mae_job
from problems.jobs.mlo_mae_options import PRESETS, read_preset
from problems.mlo_mae import (MLOMAESettings, NormalizedImageTokenizer, build, build_mae_model,
                              head_accuracy, no_decay_names)
from problems.pos_embed import sincos_table
from problems.tokenizers import ImageTokenizer

pytestmark = pytest.mark.usefixtures("restore_threads")

TINY = dict(image_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=1, num_heads=2, decoder_dim=16,
            decoder_depth=1, decoder_heads=2, mask_hidden=8, batch_size=8, steps=8, pretrain_lr=1e-3)
PAPER_ON = dict(learnable_pos=True, normalize=[list(CIFAR_MEAN), list(CIFAR_STD)],
                augment=["pretrain", "finetune", "mask"], pretrain_weight_decay=1e-3, no_decay_1d=True,
                finetune_weight_decay=0.01, mask_weight_decay=0.01,
                cosine_final={"pretrain": 0.0, "finetune": 0.5, "mask": 0.5})


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """Fixture CIFAR-10 in the official format: ``(x [40, 3, 32, 32] in [0, 1], y [40])``."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_like(str(root), "cifar10", n_per_file=8, n_test=8)
    return load_cifar(str(root), "cifar10").tensors("train")


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(0)
    return torch.rand(40, 3, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)


def windows(x, p):
    """Every ``H × W`` window of the zero-padded ``x [C, H, W]``, keyed by offset."""
    c, h, w = x.shape
    pad = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=x.dtype)
    pad[:, p:p + h, p:p + w] = x
    return {(dy, dx): pad[:, dy:dy + h, dx:dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)}


# ------------------------------------------------------------------ augmentation
def test_crop_is_a_shifted_window_of_the_zero_padded_image(cifar):
    x = cifar[0][:16]
    out = random_crop_flip(x, padding=4, flip=False, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets = []
    for n in range(len(x)):
        hits = [o for o, win in windows(x[n], 4).items() if torch.equal(out[n], win)]
        assert len(hits) == 1, n          # random pixels: exactly one window matches
        offsets.append(hits[0])
    assert len(set(offsets)) > 1 and any(o != (4, 4) for o in offsets)   # shifts, per sample
    assert all(0 <= dy <= 8 and 0 <= dx <= 8 for dy, dx in offsets)


def test_flip_is_an_exact_mirror(cifar):
    x = cifar[0][:32]
    out = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    mirrored = [bool(torch.equal(out[n], x[n].flip(-1))) for n in range(len(x))]
    kept = [bool(torch.equal(out[n], x[n])) for n in range(len(x))]
    assert all(m != k for m, k in zip(mirrored, kept))     # each image: exactly one of the two
    assert 0 < sum(mirrored) < len(x)


def test_crop_and_flip_together(cifar):
    x = cifar[0][:16]
    out = random_crop_flip(x, padding=4, flip=True, generator=torch.Generator().manual_seed(1))
    for n in range(len(x)):
        wins = windows(x[n], 4).values()
        assert any(torch.equal(out[n], w) or torch.equal(out[n], w.flip(-1)) for w in wins)


def test_uint8_and_fill():
    x = torch.full((2, 1, 4, 4), 7, dtype=torch.uint8)
    out = random_crop_flip(x, padding=2, flip=False, generator=torch.Generator().manual_seed(0), fill=5)
    assert out.dtype == torch.uint8 and set(out.unique().tolist()) <= {5, 7}


def test_identity_when_off(cifar):
    x = cifar[0][:4]
    assert random_crop_flip(x, padding=0, flip=False) is x


def test_same_seed_same_batches_and_the_global_rng_untouched(cifar):
    x, y = cifar

    def take(seed, k=3):
        st = augment_stream(infinite_loader((x, y), 8, seed=0), seed=seed)
        return [next(st) for _ in range(k)]
    rng = torch.get_rng_state()
    a, b, c = take(5), take(5), take(6)
    assert torch.equal(torch.get_rng_state(), rng)
    plain = infinite_loader((x, y), 8, seed=0)
    for (xa, ya), (xb, yb), (xc, _), (xp, yp) in zip(a, b, c, plain):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ya, yp)   # labels pass through
        assert not torch.equal(xa, xp) and not torch.equal(xa, xc)


def test_build_augments_only_the_named_levels(small):
    x, y = small
    s = MLOMAESettings.from_dict({**TINY, "augment": ["finetune"]})
    aug = build("mlo-mae", s, (x, y), seed=0).problems
    plain = build("mlo-mae", MLOMAESettings.from_dict(TINY), (x, y), seed=0).problems
    for name in ("pretrain", "mask"):
        for u, v in zip(next(aug[name].data), next(plain[name].data)):
            assert torch.equal(u, v)
    (xa, ya), (xp, yp) = next(aug["finetune"].data), next(plain["finetune"].data)
    assert torch.equal(ya, yp) and not torch.equal(xa, xp)
    assert s.augment == ("finetune",)
    with pytest.raises(ValueError, match=r"unknown level\(s\) \['head'\]"):
        MLOMAESettings.from_dict({**TINY, "augment": ["head"]})


# ----------------------------------------------------------------- normalization
def test_normalization_is_inside_the_model(small):
    x = small[0][:4]
    s = MLOMAESettings.from_dict({**TINY, "normalize": [list(CIFAR_MEAN), list(CIFAR_STD)]})
    torch.manual_seed(0)
    mae = build_mae_model(s)
    assert isinstance(mae.tokenizer, NormalizedImageTokenizer)
    torch.manual_seed(0)
    plain = build_mae_model(MLOMAESettings.from_dict(TINY))
    assert type(plain.tokenizer) is ImageTokenizer
    assert mae.state_dict().keys() == plain.state_dict().keys()       # statistics not in checkpoints
    plain.load_state_dict(mae.state_dict())
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    xn = (x - mean) / std
    torch.testing.assert_close(mae.tokenizer.patchify(x), plain.tokenizer.patchify(xn), rtol=0, atol=1e-6)
    torch.testing.assert_close(mae.features(x, pool="cls"), plain.features(xn, pool="cls"))
    torch.testing.assert_close(mae.patch_embeddings(x), plain.patch_embeddings(xn))
    torch.testing.assert_close(mae.tokenizer.unpatchify(mae.tokenizer.patchify(x)), xn, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [[[0.5, 0.5], [0.2, 0.2]], [[0.5] * 3, [0.2, 0.0, 0.2]], "cifar", [[0.5] * 3]])
def test_normalize_is_checked(bad):
    with pytest.raises(ValueError, match="normalize"):
        MLOMAESettings.from_dict({**TINY, "normalize": bad})


# ------------------------------------------------------------------------ length
def test_paper_length_is_the_official_count():
    settings = yaml.safe_load(PRESETS["paper"].read_text())["settings"]
    epochs, n, portion, batch, unroll = 200, 50_000, 0.8, 128, 2
    train_iters = int(epochs * (n * portion // batch + 1)) * unroll     # official main_cifar10.py
    assert train_iters == 125_200 == settings["steps"] and settings["unroll_steps"] == unroll


def test_paper_schedules_match_the_official_t_max(small):
    """The official code gives all three CosineAnnealingLRs T_max = TRAIN_ITERS = 125 200."""
    s = MLOMAESettings.from_dict({**TINY, **PAPER_ON, "steps": 125_200})
    graph = build("mlo-mae", s, small, seed=0)
    assert {n: P.scheduler.T_max for n, P in graph.problems.items()} == \
        {"pretrain": 125_200, "finetune": 125_200, "mask": 125_200}
    default = build("mlo-mae", MLOMAESettings.from_dict({**TINY, "steps": 125_200}), small, seed=0)
    assert {n: P.scheduler.T_max for n, P in default.problems.items()} == \
        {"pretrain": 125_200, "finetune": 62_600, "mask": 62_600}


# ------------------------------------------------------------------ weight decay
def groups_by_decay(problem):
    out = {}
    for g in problem.optimizer.param_groups:
        out.setdefault(g["weight_decay"], set()).update(id(p) for p in g["params"])
    return out


def test_no_decay_on_1d_parameters_of_the_pretrain_level(small):
    s = MLOMAESettings.from_dict({**TINY, **PAPER_ON})
    graph = build("mlo-mae", s, small, seed=0)
    pre = graph.problems["pretrain"]
    named = dict(graph.mae.named_parameters())
    one_d = {id(p) for p in named.values() if p.ndim == 1}
    assert groups_by_decay(pre) == {0.0: one_d, 1e-3: {id(p) for p in named.values()} - one_d}
    assert set(no_decay_names(graph.mae)) == {n for n, p in named.items() if p.ndim == 1}
    for n in ("cls_token", "mask_token", "tokenizer.pos.table", "decoder_pos.table"):   # official: decayed (ndim > 1)
        assert id(named[n]) in groups_by_decay(pre)[1e-3], n
    for name in ("finetune", "mask"):             # AdamW's default 0.01 on every parameter
        P = graph.problems[name]
        assert groups_by_decay(P) == {0.01: {id(p) for p in P.module.parameters()}}


def test_weight_decay_defaults_are_weight_decay(small):
    graph = build("mlo-mae", MLOMAESettings.from_dict({**TINY, "weight_decay": 0.05}), small, seed=0)
    for P in graph.problems.values():
        assert [g["weight_decay"] for g in P.optimizer.param_groups] == [0.05]


def test_blo_mae_groups(small):
    s = MLOMAESettings.from_dict({**TINY, **PAPER_ON})
    graph = build("blo-mae", s, small, seed=0)
    lower = graph.problems["pretrain"]
    head = {id(p) for p in graph.head.parameters()}
    one_d = {id(p) for p in graph.mae.parameters() if p.ndim == 1}
    rest = {id(p) for p in graph.mae.parameters()} - one_d
    groups = [({id(p) for p in g["params"]}, g["lr"], g["weight_decay"]) for g in lower.optimizer.param_groups]
    assert groups == [(head, s.finetune_lr, 0.01), (one_d, s.pretrain_lr, 0.0), (rest, s.pretrain_lr, 1e-3)]


@pytest.mark.parametrize("bad", [-1e-3, "x", True])
def test_level_weight_decay_is_checked(bad):
    with pytest.raises((TypeError, ValueError), match="mask_weight_decay"):
        MLOMAESettings.from_dict({**TINY, "mask_weight_decay": bad})


# --------------------------------------------------------------------- schedules
def test_final_learning_rates(small):
    s = MLOMAESettings.from_dict({**TINY, **PAPER_ON, "steps": 8})
    graph = build("mlo-mae", s, small, seed=0)
    graph.engine.run(8)
    lrs = {n: [g["lr"] for g in P.optimizer.param_groups] for n, P in graph.problems.items()}
    assert graph.problems["finetune"].step_count == graph.problems["mask"].step_count == 4
    assert lrs["pretrain"] == pytest.approx([0.0, 0.0], abs=1e-15)
    assert lrs["finetune"] == pytest.approx([0.5 * s.finetune_lr])
    assert lrs["mask"] == pytest.approx([0.5 * s.mask_lr])


def test_cosine_shape_is_the_first_part_of_a_cosine_to_zero(small):
    """f = 0.25 over 6 updates: lr_k = lr (1 + cos(π k / T)) / 2, T = 6π / arccos(−0.5) = 9."""
    s = MLOMAESettings.from_dict({**TINY, "steps": 12, "cosine_final": {"finetune": 0.25}})
    graph = build("mlo-mae", s, small, seed=0)
    fin = graph.problems["finetune"]
    assert fin.scheduler.T_max == pytest.approx(9.0)
    seen = []
    for _ in range(12):
        graph.engine.step()
        seen.append(fin.optimizer.param_groups[0]["lr"])
    expected = [s.finetune_lr * (1 + math.cos(math.pi * k / 9)) / 2 for k in range(1, 7)]
    assert seen[1::2] == pytest.approx(expected)
    assert seen[-1] == pytest.approx(0.25 * s.finetune_lr)
    assert graph.problems["mask"].optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("bad,match", [({"head": 0.5}, r"unknown level"), ({"mask": 1.0}, r"\[0, 1\)"),
                                       ({"mask": -0.1}, r"\[0, 1\)")])
def test_cosine_final_is_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        MLOMAESettings.from_dict({**TINY, "cosine_final": bad})
    with pytest.raises(ValueError, match="needs cosine: true"):
        MLOMAESettings.from_dict({**TINY, "cosine": False, "cosine_final": {"mask": 0.5}})


# ------------------------------------------------------------ position embeddings
def test_learnable_pos_is_a_pretrain_parameter(small):
    s = MLOMAESettings.from_dict({**TINY, "learnable_pos": True})
    graph = build("mlo-mae", s, small, seed=0)
    names = graph.problems["pretrain"].param_names
    assert "tokenizer.pos.table" in names and "decoder_pos.table" in names
    table = graph.mae.tokenizer.pos.table
    assert isinstance(table, torch.nn.Parameter)
    assert torch.equal(table.detach(), sincos_table(16, (4, 4)))       # sin-cos initialised
    graph.engine.run(2)
    assert not torch.equal(table.detach(), sincos_table(16, (4, 4)))   # and learned
    plain = build("mlo-mae", MLOMAESettings.from_dict(TINY), small, seed=0)
    assert not any("pos" in n for n in plain.problems["pretrain"].param_names)
    assert not isinstance(plain.mae.tokenizer.pos.table, torch.nn.Parameter)


# --------------------------------------------------------- defaults: today's behaviour
def test_neutral_values_equal_the_defaults(small):
    """Each new setting at the value meaning "today's" trains exactly as the defaults."""
    neutral = dict(learnable_pos=False, normalize=None, augment=[], augment_padding=4,
                   pretrain_weight_decay=1e-3, finetune_weight_decay=1e-3, mask_weight_decay=1e-3,
                   no_decay_1d=False, cosine_final={"pretrain": 0.0, "finetune": 0.0, "mask": 0.0})

    def state(extra):
        torch.manual_seed(0)
        graph = build("mlo-mae", MLOMAESettings.from_dict({**TINY, **extra}), small, seed=0)
        graph.engine.run(4)
        return ({n: P.module.state_dict() for n, P in graph.problems.items()},
                {n: P.optimizer.state_dict() for n, P in graph.problems.items()}, torch.get_rng_state())
    a, b = state({}), state(neutral)
    assert torch.equal(a[2], b[2])
    for n in a[0]:
        assert all(torch.equal(a[0][n][k], b[0][n][k]) for k in a[0][n])
        sa, sb = a[1][n], b[1][n]
        assert sa["param_groups"] == sb["param_groups"]
        assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])


def test_cpu_and_fmnist_presets_keep_the_defaults():
    new = set(PAPER_ON) | {"augment_padding"}
    for name in ("cpu", "fmnist"):
        settings = yaml.safe_load(PRESETS[name].read_text())["settings"]
        assert not new & set(settings), name


# --------------------------------------------------------------- reported metrics
def test_head_accuracy(small):
    x, y = small
    for variant in ("mae", "frozen-mask"):
        assert head_accuracy(build(variant, MLOMAESettings.from_dict(TINY), small, seed=0), x, y) is None
    graph = build("mlo-mae", MLOMAESettings.from_dict(TINY), small, seed=0)
    graph.engine.run(2)
    assert graph.head.training and graph.mae.training
    acc = head_accuracy(graph, x, y, batch_size=7)
    assert graph.head.training and graph.mae.training           # modes restored
    graph.head.eval(), graph.mae.eval()
    with torch.no_grad():
        expected = (graph.head(graph.mae.features(x, pool="cls")).argmax(-1) == y).float().mean().item()
    assert acc == pytest.approx(expected)


# ----------------------------------------------------------- the preset, end to end
PROBE = re.compile(r"^linear-probe test accuracy: (\d+\.\d\d)%$")
HEAD = re.compile(r"^stage-II head test accuracy: (\d+\.\d\d)%$")


@pytest.fixture(scope="module")
def fake_cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_cifar")
    write_cifar_like(str(root), "cifar10", n_per_file=8, n_test=8)
    return root


def run_paper(fake_cifar_root, out, capsys, *extra):
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 4, "decoder_dim": 32, "decoder_depth": 1,
            "decoder_heads": 4, "mask_hidden": 16, "batch_size": 4}
    sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
    acc = mlo_mae_job.main(["--quick", "--no-progress", "--device", "cpu", "--out", str(out), "--preset", "paper",
                           "--data-dir", str(fake_cifar_root), "--steps", "4", *sets, *extra])
    return acc, capsys.readouterr().out.strip().splitlines(), json.loads((out / "summary.json").read_text())


def test_paper_preset_runs_with_every_setting_on(fake_cifar_root, tmp_path, capsys):
    preset = read_preset(PRESETS["paper"])
    s = MLOMAESettings.from_dict(preset["settings"])
    assert s.learnable_pos and s.no_decay_1d and s.augment == ("pretrain", "finetune", "mask")
    assert s.augment_padding == 4 and s.steps == 125_200
    assert s.normalize == ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768))
    assert [round(v, 4) for v in s.normalize[0]] == list(CIFAR_MEAN)
    assert (s.level_weight_decay("pretrain"), s.level_weight_decay("finetune"),
            s.level_weight_decay("mask")) == (1e-3, 0.01, 0.01)
    assert s.cosine and s.cosine_final == {"pretrain": 0.0, "finetune": 0.5, "mask": 0.5}

    acc, lines, summary = run_paper(fake_cifar_root, tmp_path / "out", capsys)
    assert PROBE.match(lines[-1]) and lines[-1] == f"linear-probe test accuracy: {100 * acc:.2f}%"
    head = HEAD.match(lines[-2])
    assert head, lines[-2]
    assert summary["steps"] == 4 and summary["data"] == "cifar10"
    assert summary["linear_probe_test_accuracy"] == summary["accuracy"] == pytest.approx(acc)
    h = summary["stage2_head_test_accuracy"]
    assert 0.0 <= h <= 1.0 and head.group(1) == f"{100 * h:.2f}"
    got = summary["settings"]
    assert got["learnable_pos"] and got["no_decay_1d"] and got["augment"] == ["pretrain", "finetune", "mask"]
    assert got["cosine_final"] == {"pretrain": 0.0, "finetune": 0.5, "mask": 0.5}
    assert MLOMAESettings.from_dict(got).normalize == s.normalize      # summary settings round-trip


def test_paper_preset_variant_without_head(fake_cifar_root, tmp_path, capsys):
    acc, lines, summary = run_paper(fake_cifar_root, tmp_path / "out", capsys, "--variant", "mae")
    assert PROBE.match(lines[-1])
    assert lines[-2] == "stage-II head test accuracy: none (the mae variant has no classifier head)"
    assert summary["stage2_head_test_accuracy"] is None
    assert summary["linear_probe_test_accuracy"] == pytest.approx(acc)
