"""Checkpoint loads are transactional and verified: every bad file gives one named
error and leaves the engine exactly as it was (variables, optimizer and scheduler
states, counters, open unrolled windows, records, RNG state)."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import mlo
from mlo import checkpoint
from mlo.checkpoint import CheckpointError, UnreadableCheckpointError

torch.set_num_threads(1)


class Lower(mlo.Problem):
    def __init__(self, upper, data):
        super().__init__("lower", module=nn.Linear(4, 1).double(), optimizer=torch.optim.Adam,
                         optimizer_kwargs={"lr": 0.05}, data=data,
                         config=mlo.ProblemConfig(unroll_steps=3))
        self.upper = upper

    def training_step(self, batch):
        x, y = batch
        return ((self(x).squeeze(-1) - y) ** 2).mean() + \
            (self.upper.params["wd"].exp() * self.params["weight"] ** 2).sum()


class Upper(mlo.Problem):
    def __init__(self, data, optimizer=torch.optim.SGD, kw=None):
        super().__init__("upper", params={"wd": torch.full((1, 4), -2.0, dtype=torch.float64)},
                         optimizer=optimizer, optimizer_kwargs=kw or {"lr": 0.1, "momentum": 0.9},
                         scheduler=torch.optim.lr_scheduler.StepLR, scheduler_kwargs={"step_size": 2},
                         data=data)

    def training_step(self, batch):
        x, y = batch
        return ((self.lower(x).squeeze(-1) - y) ** 2).mean()


def build(optimizer=torch.optim.SGD, kw=None):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64),
                torch.randn(8, generator=g, dtype=torch.float64)) for _ in range(3)]
    torch.manual_seed(0)
    up = Upper(batches[:1], optimizer, kw)
    lo = Lower(up, batches)
    up.lower = lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})


def engine_state(e):
    """Everything load may touch, deep-copied."""
    out = {"counters": e.state.counters(), "records": copy.deepcopy(e.records),
           "windows": {n: (w.steps, [t.detach().clone() for t in e.problems[n].own_state().values()],
                           copy.deepcopy([{k: v.detach() if torch.is_tensor(v) else v for k, v in st.items()}
                                          for st in w.fopt.state]))
                       for n, w in ((n, e.window(n)) for n in e.open_windows())},
           "rng": torch.get_rng_state()}
    for n, P in e.problems.items():
        out[n] = (copy.deepcopy(P.module.state_dict()), copy.deepcopy(P.optimizer.state_dict()),
                  P.scheduler.state_dict() if P.scheduler else None, P.step_count, P.ready_count)
    return out


def equal(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def saved(tmp_path):
    """A good checkpoint (after 3 iterations) and a different engine with a window open."""
    src = build()
    src.run(3)
    path = tmp_path / "ck.pt"
    checkpoint.save(src, path)
    dst = build()
    dst.run(4)                                  # the lower's window is open (1 step in)
    assert dst.window("lower").steps == 1
    return path, dst


def rewrite(path, edit):
    blob = torch.load(path, weights_only=True)
    edit(blob)
    out = path.with_name("edited.pt")
    torch.save(blob, out)
    return out


def assert_refused(dst, path, exc, match):
    before = engine_state(dst)
    with pytest.raises(exc, match=match):
        checkpoint.load(dst, path)
    assert equal(engine_state(dst), before), "a refused load changed the engine"


def _shape(b):
    b["problems"]["upper"]["module"]["wd"] = torch.zeros(1, 5, dtype=torch.float64)


def _names(b):
    m = b["problems"]["upper"]["module"]
    m["decay"] = m.pop("wd")


def _dtype(b):
    b["problems"]["upper"]["module"]["wd"] = b["problems"]["upper"]["module"]["wd"].float()


def _no_iteration(b):
    del b["iteration"]


def _no_since(b):
    del b["since"]


def _format(b):
    b["format"] = 99


@pytest.mark.parametrize("edit, match", [
    (_shape, r"problem 'upper': 'wd' has shape \[1, 5\] in the checkpoint, \[1, 4\] in the engine"),
    (_names, r"problem 'upper': variables differ \(missing from the checkpoint: \['wd'\], not in the engine: \['decay'\]\)"),
    (_dtype, r"problem 'upper': 'wd' has dtype torch.float32 in the checkpoint, torch.float64"),
    (_no_iteration, r"no 'iteration' entry"),
    (_no_since, r"no 'since' entry"),
    (_format, r"checkpoint format 99, this mlo reads formats \[1, 2\]"),
], ids=["shape", "names", "dtype", "no-iteration", "no-since", "format"])
def test_a_bad_later_problem_changes_nothing(saved, edit, match):
    path, dst = saved
    assert_refused(dst, rewrite(path, edit), CheckpointError, match)


def test_optimizer_class_changed_is_named(tmp_path):
    src = build()
    src.run(3)
    checkpoint.save(src, tmp_path / "ck.pt")
    dst = build(torch.optim.Adam, {"lr": 0.1})
    dst.run(2)
    assert_refused(dst, tmp_path / "ck.pt", CheckpointError,
                   r"problem 'upper': the checkpoint's optimizer is torch\.optim\.sgd\.SGD, "
                   r"the engine's is torch\.optim\.adam\.Adam")
    # a format-1 file (no class stored): the parameter-group settings tell
    legacy = rewrite(tmp_path / "ck.pt", lambda b: [b.pop("checksum"), b.update(format=1)] and
                     [P.pop("optimizer_class") for P in b["problems"].values()])
    assert_refused(dst, legacy, CheckpointError,
                   r"problem 'upper': optimizer parameter group 0 has settings .*'momentum'.* "
                   r"was the optimizer class changed\?")


def test_flipped_byte_fails_the_checksum(saved):
    path, dst = saved
    data = bytearray(path.read_bytes())
    wd = torch.load(path, weights_only=True)["problems"]["upper"]["module"]["wd"]
    at = bytes(data).find(wd.numpy().tobytes())
    assert at > 0
    data[at + 3] ^= 0x10                        # one bit of one float64
    bad = path.with_name("flipped.pt")
    bad.write_bytes(bytes(data))
    assert not torch.equal(torch.load(bad, weights_only=True)["problems"]["upper"]["module"]["wd"], wd)
    assert_refused(dst, bad, CheckpointError, r"flipped.pt: checksum mismatch .* nothing was loaded")


def test_unreadable_files_give_one_error(saved, tmp_path):
    path, dst = saved
    good = path.read_bytes()
    cases = {"empty.pt": b"", "truncated.pt": good[: len(good) // 2], "text.pt": b"hello, not a checkpoint\n"}
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        assert_refused(dst, p, UnreadableCheckpointError,
                       rf"^not a readable mlo checkpoint: {p} \(\w+")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert_refused(dst, tmp_path / "foreign.pt", CheckpointError, "not an mlo checkpoint")
    with pytest.raises(FileNotFoundError):
        checkpoint.load(dst, tmp_path / "nope.pt")


def test_good_file_loads_and_old_format_still_loads(saved, tmp_path):
    path, dst = saved
    ref = build()
    checkpoint.load(ref, path)
    # format 1 (no checksum, no optimizer classes, no records / last_block) still loads
    def to_v1(b):
        for k in ("checksum", "records", "last_block"):
            b.pop(k)
        b["format"] = 1
        for P in b["problems"].values():
            P.pop("optimizer_class")
            P.pop("scheduler_class")
    old = rewrite(path, to_v1)
    checkpoint.load(dst, old)
    assert "lower" not in dst.open_windows() and dst.iteration == 3
    for n in ref.problems:
        assert equal(ref.problems[n].module.state_dict(), dst.problems[n].module.state_dict())
        assert equal(ref.problems[n].optimizer.state_dict(), dst.problems[n].optimizer.state_dict())


def test_stale_temp_files_are_removed_on_the_next_save(tmp_path):
    e = build()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = [tmp_path / f".mlo-ckpt-{dead}-abc123", tmp_path / ".mlo-ckpt-legacy0x"]
    live = tmp_path / f".mlo-ckpt-{os.getppid()}-busy"   # a live process's save in progress
    for f in stale + [live]:
        f.write_bytes(b"partial")
    checkpoint.save(e, tmp_path / "ck.pt")
    assert not any(f.exists() for f in stale)
    assert live.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([live.name, "ck.pt"])
