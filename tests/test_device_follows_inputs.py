"""Every tensor a library function creates follows its inputs' device (issue 19).

A CUDA run crashes where a function builds a tensor on the CPU next to inputs on the
GPU (``linear_probe`` did, at the last step of a run). Without a GPU, the simulated
device of ``tests/_fake_device.py`` makes that bug raise: inputs live on it, and any
host tensor of one or more dimensions mixed into their operations is an error, as on
CUDA. The functions run to the end there and must give the CPU run's numbers.

A static check complements it for code paths no test runs: every torch factory call
in ``mlo/``, ``engines/``, ``problems/`` (and ``problems/datasets/splits.py``) outside a
module constructor names its ``device=`` (``device="cpu"`` for host tensors by design,
e.g. indices drawn with a CPU generator: then they stay on the host even under
``torch.set_default_device("cuda")``), or is listed below with the reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlo
from _fake_device import FAKE, OnDevice, fake_device, host, to_fake
from engines.base import available
from problems.evaluation import Features, extract_features, finetune, linear_probe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _data(n=120, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return centers[y] + torch.randn(n, d, generator=g), y


# ----------------------------------------------------------------- the harness
def test_the_simulated_device_catches_host_tensors():
    def buggy(x):                       # the old linear_probe's bug
        w = torch.zeros(x.shape[1], 2)
        return x @ w + torch.zeros(2)

    def right(x):
        w = torch.zeros(x.shape[1], 2, device=x.device, dtype=x.dtype)
        return x @ w + torch.zeros_like(w[0]) + x.new_ones(2) * torch.tensor(2.0)

    x = torch.randn(4, 3)
    with fake_device():
        xd = to_fake(x)
        with pytest.raises(RuntimeError, match="host tensor"):
            buggy(xd)
        out = right(xd)
        assert isinstance(out, OnDevice) and out.device == FAKE
        assert torch.equal(host(out), right(x))
        assert isinstance(torch.ones(2, device=xd.device), OnDevice)
        with pytest.raises(RuntimeError, match="'cpu' generator"):
            torch.rand(3, generator=torch.Generator(), device=xd.device)
        assert type(xd.cpu()) is torch.Tensor and xd.sum().item() == pytest.approx(float(x.sum()))


# ------------------------------------------------------------ problems.evaluation
def test_linear_probe_runs_where_the_features_are():
    x, y = _data()
    want = linear_probe(lambda t: t, (x[:80], y[:80]), (x[80:], y[80:]))
    with fake_device():
        xd, yd = to_fake(x), to_fake(y)
        got = linear_probe(lambda t: t, (xd[:80], yd[:80]), (xd[80:], yd[80:]))
        # labels on the host, features on the device: the labels follow the features
        got_mixed = linear_probe(lambda t: t.to(FAKE), (x[:80], y[:80]), (x[80:], y[80:]))
    assert got == want == got_mixed and want.accuracy > 0.9


def test_module_features_and_finetune_move_host_batches_to_the_model():
    x, y = _data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    want = linear_probe(net, (x[:80], y[:80]), (x[80:], y[80:]))
    want_h = extract_features(net, x)
    torch.manual_seed(1)
    model, head = nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 3)
    state = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, head)]
    want_ft = finetune(model, head, (x[:80], y[:80]), (x[80:], y[80:]), epochs=2, batch_size=16)
    with fake_device():
        net.to(FAKE)
        got = linear_probe(net, (x[:80], y[:80]), (x[80:], y[80:]))    # host data, device model
        h = extract_features(Features(_Feat(net), "cls"), x)
        assert isinstance(h, OnDevice)
        model.load_state_dict(state[0])
        head.load_state_dict(state[1])
        model.to(FAKE), head.to(FAKE)
        got_ft = finetune(model, head, (x[:80], y[:80]), (x[80:], y[80:]), epochs=2, batch_size=16)
    assert got == want
    assert torch.allclose(host(h), want_h, atol=1e-6)
    assert got_ft.steps == want_ft.steps and got_ft.accuracy == want_ft.accuracy
    assert got_ft.train_loss == pytest.approx(want_ft.train_loss, rel=1e-5)


class _Feat(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def features(self, x, pool="cls"):
        return self.net(x)


def test_contrastive_loss_and_jacobian_on_the_device():
    from problems.compare_graphs import _jacobian
    from problems.task_contrastive import info_nce

    a, b = torch.randn(5, 4), torch.randn(5, 4)
    A = torch.randn(3, 4, dtype=torch.float64)
    with fake_device():
        got = info_nce(to_fake(a), to_fake(b))
        Ad = to_fake(A)
        J = _jacobian(lambda v: torch.tanh(Ad @ v), to_fake(torch.ones(4, dtype=torch.float64)))
    assert float(got) == pytest.approx(float(info_nce(a, b)), rel=1e-6)
    assert torch.allclose(host(J), _jacobian(lambda v: torch.tanh(A @ v), torch.ones(4, dtype=torch.float64)))


# ------------------------------------------------------------------- the engine
OPTIONS = {"cg": {"max_iter": 5}, "neumann": {"iterations": 5, "alpha": 0.5},
           "finite_difference": {"epsilon": 0.01}, "darts": {"epsilon": 0.01}}


class Classifier(mlo.Problem):
    def __init__(self, hyper, data, method, device):
        super().__init__("classifier", module=nn.Linear(6, 1).double().to(device), data=data,
                         optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05},
                         config=mlo.ProblemConfig(unroll_steps=3, method=method,
                                                  method_options=OPTIONS.get(method, {})))
        self.hyper = hyper

    def training_step(self, batch):
        x, y = batch
        w = self.params["weight"].squeeze(0)
        return F.binary_cross_entropy_with_logits(self(x).squeeze(-1), y) \
            + 0.5 * (self.hyper.params["log_wd"].exp() * w * w).sum()


class WeightDecay(mlo.Problem):
    def __init__(self, data, device):
        super().__init__("hyper", params={"log_wd": torch.full((6,), -2.0, dtype=torch.float64).to(device)},
                         data=data, optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.05})
        self.classifier = None

    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.classifier(x).squeeze(-1), y)


def quickstart(method, device):
    x, y = _data(96, seed=3)
    x, y = x.double().to(device), (y == 0).double().to(device)
    torch.manual_seed(0)
    hyper = WeightDecay([(x[48:], y[48:])], device)
    clf = Classifier(hyper, [(x[:48], y[:48])], method, device)
    hyper.classifier = clf
    return mlo.Engine([clf, hyper], {"u2l": {hyper: [clf]}, "l2u": {clf: [hyper]}})


@pytest.mark.parametrize("method", available())
def test_engine_runs_on_the_device_with_every_method(method, measured):
    """Gradients, hypergradients, optimizer states, guards and windows of mlo/ and
    engines/ are made where the variables are."""
    want = quickstart(method, "cpu")
    want.run(9)
    with fake_device():
        got = quickstart(method, FAKE)
        got.run(9)
        got.gradient("hyper")
    for name in ("classifier", "hyper"):
        for a, b in zip(got.problems[name].variables, want.problems[name].variables):
            assert isinstance(a, OnDevice)
            measured(f"device: quickstart {method}, 9 it., simulated device vs CPU (max abs)",
                     float((host(a).detach() - b.detach()).abs().max()), 1e-12)
    assert got.records["hyper"]["updates"] == want.records["hyper"]["updates"] == 3


def test_mlo_mae_and_metamae_graphs_run_on_the_device():
    """The MLO-MAE graph (masking network, MAE, head; finite differences) and MetaMAE's
    (per-window latents, Nearby-S supports drawn with a *CPU* generator, as the example
    does) built on the device, run, and probed there."""
    from problems.latent_adaptation import MetaMAEOptions
    from problems.mae import MaskedAutoencoder
    from problems.meta_mae import build_graph
    from problems.mlo_mae import MLOMAESettings, build
    from problems.tokenizers import ImageTokenizer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    s = MLOMAESettings(image_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                       decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_hidden=8,
                       batch_size=8, steps=8, num_classes=3)

    def run(device):
        xs, ys = (x, y) if device == "cpu" else (to_fake(x), to_fake(y))
        torch.set_default_device(device)      # models built on the device (factories
        torch.set_default_dtype(torch.float64)  # inside functions still name theirs)
        try:
            graph = build("mlo-mae", s, (xs, ys), seed=0)
            torch.manual_seed(0)
            mae = MaskedAutoencoder(ImageTokenizer(4, 2, 1, 8), depth=1, num_heads=2, mlp_ratio=2.0,
                                    decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5,
                                    attn_impl="math")
            meta, _ = build_graph(mae, [xs[i:i + 6] for i in range(0, 48, 6)] * 3,
                                  MetaMAEOptions(steps=2), projector_hidden=8, projector_out=4,
                                  generator=torch.Generator().manual_seed(1))
        finally:
            torch.set_default_device(None)
            torch.set_default_dtype(torch.float32)
        graph.engine.run(4)
        meta.run(4)
        probe = linear_probe(Features(graph.mae, "cls"), (xs[:32], ys[:32]), (xs[32:], ys[32:]),
                             num_classes=3, max_iter=20)
        return ([host(p).detach().clone() for P in (graph.engine, meta) for Q in P.problems.values()
                 for p in Q.variables], probe)

    want, want_probe = run("cpu")
    with fake_device():
        got, got_probe = run(FAKE)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), float((a - b).abs().max())
    assert got_probe.accuracy == want_probe.accuracy


# ------------------------------------------------------------- the static check
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "randn", "rand", "randint", "randperm",
             "eye", "tensor", "linspace", "logspace", "as_tensor", "scalar_tensor", "normal"}
MODULES = sorted([*ROOT.glob("mlo/*.py"), *ROOT.glob("engines/*.py"), *ROOT.glob("problems/*.py"),
                  ROOT / "problems/datasets/splits.py"])
# (file, function, factory): why it is created on the host.
HOST_BY_DESIGN = {
    ("problems/mlo_mae.py", "with_mask_noise", "rand"):
        "sampled-mask noise from the stream's seeded CPU generator (the same masks on every "
        "device), moved to the batch's device",
    ("mlo/optim.py", "_update", "tensor"):
        "Adam's step count of an old checkpoint: torch.optim keeps it on the CPU too",
    ("mlo/optim_rules.py", "_step", "tensor"):
        "the step count of an old checkpoint: torch.optim keeps it on the CPU too",
    ("mlo/optim_rules.py", "asgd", "as_tensor"):
        "ASGD's 0-dim eta/mu, built as torch's ASGD builds them and moved to the state's device",
    ("problems/pos_embed.py", "sincos_1d", "arange"):
        "a constructor's table (float64 arithmetic) on the default device",
    ("problems/pos_embed.py", "sincos_2d", "arange"):
        "a constructor's table (float64 arithmetic) on the default device",
    ("mlo/checkpoint.py", "_same_setting", "as_tensor"):
        "a host-side comparison of two optimizer settings (both moved to the CPU in float64)",
    ("engines/solvers.py", "_norm", "zeros"):
        "the norm of an empty vector (a diagnostic): no tensor to take a device from",
    ("mlo/distributed.py", "agree_stop", "tensor"):
        "a control flag; _all_reduce_ moves it to the collective's device",
    ("mlo/distributed.py", "main_value", "tensor"):
        "a control value; _all_reduce_ moves it to the collective's device",
    ("problems/betty_logreg_hpo.py", "build_betty", "ones"):
        "the Betty port's parameters, as Betty's own example builds them on the host",
    ("problems/betty_logreg_hpo.py", "build_betty", "zeros"):
        "the Betty port's parameters, as Betty's own example builds them on the host",
    ("problems/betty_logreg_hpo.py", "first_hypergradients", "ones"):
        "the Betty port's parameters, as Betty's own example builds them on the host",
    ("problems/betty_logreg_hpo.py", "make_data", "randn"):
        "example data drawn on the host from a seeded generator (the caller moves it to its device)",
    ("problems/betty_logreg_hpo.py", "split", "randn"):
        "example data drawn on the host from a seeded generator (the caller moves it to its device)",
    ("problems/maml.py", "uniform", "rand"):
        "example data drawn on the host from a seeded generator (the caller moves it to its device)",
    ("problems/nesting.py", "example_data", "eye"):
        "example data drawn on the host from a seeded generator (the caller moves it to its device)",
    ("problems/nesting.py", "example_data", "randn"):
        "example data drawn on the host from a seeded generator (the caller moves it to its device)",
    ("problems/nesting.py", "closed_form_hypergradient", "eye"):
        "the closed form's identity, in float64 on the host like the example data",
    ("problems/reweight_digits.py", "make_data", "rand"):
        "example data drawn on the host from a seeded generator (the caller moves it to its device)",
    ("problems/reweight_digits.py", "make_data", "randint"):
        "example data drawn on the host from a seeded generator (the caller moves it to its device)",
    ("problems/reweight_digits.py", "__iter__", "randperm"):
        "a batch order drawn on the host (indices), as DataLoader draws it",
    ("problems/weight_decay.py", "load", "tensor"):
        "the quickstart's data loaded from scikit-learn's arrays on the host",
    ("problems/weight_decay.py", "load", "randperm"):
        "the quickstart's split drawn on the host from a seeded generator",
}


def _host_factory_calls():
    found = set()
    for path in MODULES:
        rel = path.relative_to(ROOT).as_posix()
        stack = []

        class Visitor(ast.NodeVisitor):
            def visit_FunctionDef(self, node):
                stack.append(node.name)
                self.generic_visit(node)
                stack.pop()

            visit_AsyncFunctionDef = visit_FunctionDef

            def visit_Call(self, node):
                fn = node.func
                if (isinstance(fn, ast.Attribute) and fn.attr in FACTORIES and isinstance(fn.value, ast.Name)
                        and fn.value.id == "torch" and stack and stack[-1] != "__init__"
                        and not any(k.arg == "device" for k in node.keywords)):
                    found.add((rel, stack[-1], fn.attr, node.lineno))
                self.generic_visit(node)

        Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_factory_calls_name_their_device():
    calls = _host_factory_calls()
    new = sorted(f"{f}:{line} in {fn}(): torch.{what}(...) without device=" for f, fn, what, line in calls
                 if (f, fn, what) not in HOST_BY_DESIGN)
    assert not new, ("tensors created on the host inside library functions (pass device= of an "
                     "input, use *_like / x.new_*, or list them in HOST_BY_DESIGN with the "
                     "reason):\n  " + "\n  ".join(new))
    stale = sorted(set(HOST_BY_DESIGN) - {(f, fn, what) for f, fn, what, _ in calls})
    assert not stale, f"HOST_BY_DESIGN lists calls that are gone: {stale}"
