"""Collectives on the process group's device (issue 19; mlo.distributed.collective_device).

NCCL takes CUDA tensors only: the parameter broadcast of an engine built while its
models are still on the CPU, and a checkpoint save's status flag, must go through copies
on ``cuda:LOCAL_RANK`` and back. Without a GPU the device choice is unit-tested per
backend, and the move-and-copy-back path runs for real with gloo on the simulated
device of ``tests/_fake_device.py`` (a device gloo does not take, as NCCL does not take
the CPU): 2 ranks, differently initialised, must end with rank 0's parameters and the
same run as on plain CPU tensors. Time limits are test_distributed's (600 s for the
spawn and for a collective: only a hang reaches them, even on a loaded machine).
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mlo
from mlo import distributed as mdist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def test_collective_device_follows_the_backend(monkeypatch):
    cpu, cuda1, meta = torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)    # cuda:LOCAL_RANK, no GPU needed
    assert mdist.collective_device("cpu", "gloo") == cpu              # used in place
    assert mdist.collective_device(cuda1, "gloo") == cuda1
    assert mdist.collective_device(meta, "gloo") == cpu
    assert mdist.collective_device("cpu", "nccl") == torch.device("cuda", 3)   # a copy on the GPU
    assert mdist.collective_device(cuda1, "nccl") == cuda1
    assert mdist.collective_device("cpu", "cpu:gloo,cuda:nccl") == cpu
    assert mdist.collective_device(cuda1, "cpu:gloo,cuda:nccl") == cuda1
    assert mdist.collective_device("cpu", "mpi") == cpu
    with pytest.raises(RuntimeError, match="backend 'xccl' takes \\['xpu'\\] tensors"):
        mdist.collective_device("cpu", "xccl")


# ------------------------------------------------------------------ 2 gloo ranks
class Lower(mlo.Problem):
    def __init__(self, upper, data, device):
        super().__init__("lower", module=nn.Linear(5, 1).double().to(device), data=data,
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.3, "momentum": 0.5},
                         config=mlo.ProblemConfig(unroll_steps=2, method="cg",
                                                  method_options={"max_iter": 5}))
        self.upper = upper

    def training_step(self, batch):
        x, y = batch
        w = self.params["weight"].squeeze(0)
        return F.binary_cross_entropy_with_logits(self(x).squeeze(-1), y) \
            + 0.5 * (self.upper.params["log_wd"].exp() * w * w).sum()


class Upper(mlo.Problem):
    def __init__(self, data, device):
        super().__init__("upper", params={"log_wd": (-1.0 + 0.1 * torch.randn(5, dtype=torch.float64)).to(device)},
                         data=data, optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.1})
        self.lower = None

    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.lower(x).squeeze(-1), y)


def engine_on(device, seed):
    """Every rank seeds its models differently: the engine's broadcast must fix that."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    Y = (X[:, 0] > 0).double()
    X, Y = X.to(device), Y.to(device)
    torch.manual_seed(seed)
    up = Upper(mdist.shard_batches([(X[32:], Y[32:])]), device)
    lo = Lower(up, mdist.shard_batches([(X[:16], Y[:16]), (X[16:32], Y[16:32])]), device)
    up.lower = lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}})


def _values(engine):
    from _fake_device import host

    return [host(t).detach().clone() for P in engine.problems.values() for t in P.variables]


def _worker(rank, init_file, out):
    from _fake_device import FAKE, OnDevice, fake_device
    from test_distributed import PG_TIMEOUT

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    try:
        plain = engine_on("cpu", seed=rank)
        start_plain = _values(plain)
        plain.run(6)
        with fake_device():
            assert mdist.collective_device(FAKE) == torch.device("cpu")
            eng = engine_on(FAKE, seed=rank)           # rank 1's own init is overwritten
            assert all(isinstance(t, OnDevice) for P in eng.problems.values() for t in P.variables)
            start = _values(eng)
            eng.run(6)                                # gradients averaged through CPU copies
            mlo.checkpoint.save(eng, out + ".ckpt")   # the status flag's all-reduce
        torch.save({"start": start, "start_plain": start_plain, "end": _values(eng),
                    "end_plain": _values(plain)}, f"{out}.{rank}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_collectives_copy_through_the_group_device_under_gloo(tmp_path):
    from test_distributed import spawn

    out = str(tmp_path / "result")
    spawn(_worker, (str(tmp_path / "init"), out))
    r = [torch.load(f"{out}.{k}", weights_only=True) for k in (0, 1)]
    torch.manual_seed(0)
    want = torch.randn(5, dtype=torch.float64)      # rank 0's upper initialisation
    for k in (0, 1):
        assert torch.equal(r[k]["start"][-1], -1.0 + 0.1 * want)     # broadcast from rank 0
        for a, b in zip(r[k]["start"], r[0]["start_plain"]):
            assert torch.equal(a, b)
        for a, b, c in zip(r[k]["end"], r[k]["end_plain"], r[0]["end"]):
            assert torch.allclose(a, b, rtol=0, atol=1e-12) and torch.equal(a, c)
    assert not torch.equal(r[0]["end"][-1], r[0]["start"][-1])       # the upper learned
    assert os.path.isfile(out + ".ckpt")
