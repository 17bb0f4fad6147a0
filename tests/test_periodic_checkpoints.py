"""EngineConfig(checkpoint_every=N, checkpoint_path=DIR, checkpoint_keep=k): periodic,
atomic checkpoints that keep the newest k.

A run that writes periodic checkpoints equals the run that writes none; resumed from
any kept checkpoint (data realigned by skipping ``P.step_count`` batches, as
mlo.checkpoint documents) it ends bit-identical to the uninterrupted run — also with an
unrolled lower, whose checkpoints wait for an iteration end with no open window. keep=k
leaves exactly k files; a failed write raises, deletes nothing and leaves the earlier
files intact; under 2 gloo ranks every rank saves and rank 0 writes.
"""
from __future__ import annotations

import datetime
import os
import time
import warnings

import pytest
import torch
from torch import nn

import mlo
from mlo import checkpoint
from test_checkpoint_resume import Lower, Upper  # the same two-level model
from test_reliability_checkpoint import equal  # exact, dtype-checked, nested

DT = torch.float64
D, K, TOTAL = 4, 3, 11
METHODS = {"unrolled": {}, "cg": {"max_iter": 3, "damping": 0.5}}


def build(method, config=None):
    """BatchNorm (buffers), Dropout (RNG), Adam lower (unrolled or CG), SGD-momentum +
    StepLR upper, updating every K iterations."""
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    train = [(2 * r(8, D) + 1, r(8)) for _ in range(4)]
    val = [(r(8, D), r(8)) for _ in range(3)]
    torch.manual_seed(1)
    module = nn.Sequential(nn.BatchNorm1d(D, momentum=0.2), nn.Linear(D, 5), nn.Tanh(),
                           nn.Dropout(0.25), nn.Linear(5, 1)).double()
    lo = Lower("lo", module=module, optimizer=torch.optim.Adam, data=train,
               optimizer_kwargs={"lr": 0.05, "betas": (0.8, 0.9)},
               config=mlo.ProblemConfig(unroll_steps=K, method=method, method_options=METHODS[method]))
    up = Upper("up", params={"lam": torch.full((1, D), -1.0, dtype=DT)},
               optimizer_kwargs={"lr": 0.3, "momentum": 0.6}, data=val,
               scheduler=torch.optim.lr_scheduler.StepLR, scheduler_kwargs={"step_size": 2, "gamma": 0.5})
    lo.up, up.lo = up, lo
    return mlo.Engine([lo, up], {"u2l": {up: [lo]}, "l2u": {lo: [up]}}, config)


def periodic(path, every=2, keep=3):
    return mlo.EngineConfig(checkpoint_every=every, checkpoint_path=path, checkpoint_keep=keep)


def snapshot(engine):
    """Parameters, buffers, optimizer states, counters and the RNG (windows closed)."""
    engine.close_windows()
    return {"tensors": [t.detach().clone() for P in engine.problems.values()
                        for t in list(P.module.parameters()) + list(P.module.buffers())],
            "optim": [P.optimizer.state_dict() for P in engine.problems.values()],
            "counts": engine.counts(), "iteration": engine.iteration, "rng": torch.get_rng_state()}


def run(method, iterations, config=None):
    torch.manual_seed(7)
    engine = build(method, config)
    torch.manual_seed(7)
    engine.run(iterations)
    return engine


def resume(method, path, total, config=None):
    engine = build(method, config)
    checkpoint.load(engine, path)
    for P in engine.problems.values():        # realign the data: skip what was consumed
        for _ in range(P.step_count):
            P.next_batch()
    engine.run(total - engine.iteration)
    return engine


def iterations_in(directory):
    return [i for i, _ in checkpoint.list_checkpoints(directory)]


def no_temp_files(directory):
    return [f for f in os.listdir(directory) if f.startswith(".mlo-ckpt-")] == []


# The unrolled lower's window is open at every iteration end but the multiples of K = 3:
# the checkpoints due at 2, 4 | 6, 8 | 10 wait for 3, 6, 9 (6 once); CG has no window.
WRITTEN = {"unrolled": [3, 6, 9], "cg": [2, 4, 6, 8, 10]}


@pytest.mark.parametrize("method", ["unrolled", "cg"])
def test_resume_from_each_kept_checkpoint_is_bit_identical(method, tmp_path):
    ref = snapshot(run(method, TOTAL))
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # never saved inside a window: no warning
        engine = run(method, TOTAL, periodic(tmp_path / "ck", every=2, keep=3))
    assert equal(snapshot(engine), ref), "writing periodic checkpoints changed the run"
    kept = WRITTEN[method][-3:]
    assert iterations_in(tmp_path / "ck") == kept
    assert engine.periodic_checkpoints.last_path == str(tmp_path / "ck" / f"ckpt-{kept[-1]:06d}.pt")
    assert checkpoint.latest(tmp_path / "ck") == engine.periodic_checkpoints.last_path
    for it, path in checkpoint.list_checkpoints(tmp_path / "ck"):
        blob = torch.load(path, weights_only=True)
        assert blob["iteration"] == it and blob["open_windows"] == {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = resume(method, path, TOTAL)
        assert equal(snapshot(got), ref), f"{method}: resumed from {os.path.basename(path)}, the run differs"


def test_resumed_run_writes_on_and_leaves_later_files_alone(tmp_path):
    """Resuming from an older checkpoint into the same folder: the run rewrites the
    later ones as it reaches them; files past it are not pruned (not this run's past)."""
    run("cg", TOTAL, periodic(tmp_path, every=2, keep=None))
    assert iterations_in(tmp_path) == [2, 4, 6, 8, 10]
    ref = snapshot(run("cg", 7))
    got = resume("cg", tmp_path / "ckpt-000004.pt", 7, periodic(tmp_path, every=2, keep=2))
    assert equal(snapshot(got), ref)
    assert iterations_in(tmp_path) == [4, 6, 8, 10]     # 2 pruned (≤ 6: keep 4, 6); 8, 10 left


@pytest.mark.parametrize("keep,left", [(1, [7]), (2, [6, 7]), (5, [3, 4, 5, 6, 7]), (None, [1, 2, 3, 4, 5, 6, 7])])
def test_keep_leaves_exactly_k_files(tmp_path, keep, left):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "ckpt-final.pt").write_text("not a periodic checkpoint")
    run("cg", 7, periodic(tmp_path, every=1, keep=keep))
    assert iterations_in(tmp_path) == left
    assert sorted(os.listdir(tmp_path)) == sorted([f"ckpt-{i:06d}.pt" for i in left] + ["notes.txt", "ckpt-final.pt"])


def test_a_failed_write_raises_and_leaves_the_previous_checkpoints_intact(tmp_path, monkeypatch):
    engine = run("cg", 4, periodic(tmp_path, every=1, keep=2))
    assert iterations_in(tmp_path) == [3, 4]
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        engine.step()
    assert engine.iteration == 5                        # the iteration itself is complete
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    assert no_temp_files(tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    engine.step()                                       # next multiple: written, then pruned
    assert iterations_in(tmp_path) == [4, 6]
    ref = snapshot(run("cg", 6))
    assert equal(snapshot(resume("cg", checkpoint.latest(tmp_path), 6)), ref)


def test_a_checkpoint_that_keeps_waiting_warns_once(tmp_path):
    """Windows open at every iteration end (the upper needs 50 lower steps): the due
    checkpoint waits; after N iterations one warning says so; nothing is written."""
    torch.manual_seed(7)
    engine = build("unrolled", periodic(tmp_path, every=2))
    engine.problems["lo"].config.unroll_steps = 50
    with pytest.warns(RuntimeWarning, match=r"checkpoint due at iteration 2 is still waiting at "
                                            r"iteration 4: unrolled window\(s\) of 'lo'") as rec:
        engine.run(9)
    assert len([w for w in rec if "still waiting" in str(w.message)]) == 1
    assert iterations_in(tmp_path) == [] and engine.periodic_checkpoints.pending_since == 2


def test_latest_orders_by_iteration_and_lists_only_periodic_files(tmp_path):
    assert checkpoint.list_checkpoints(tmp_path / "absent") == [] and checkpoint.latest(tmp_path / "absent") is None
    for name in ["ckpt-999999.pt", "ckpt-1000000.pt", "ckpt-000120.pt", "checkpoint.pt", "ckpt-12.pt.tmp",
                 ".mlo-ckpt-1-abc"]:
        (tmp_path / name).write_bytes(b"")
    assert checkpoint.checkpoint_name(120) == "ckpt-000120.pt"
    assert iterations_in(tmp_path) == [120, 999999, 1000000]
    assert checkpoint.latest(tmp_path) == str(tmp_path / "ckpt-1000000.pt")


@pytest.mark.parametrize("kwargs,match", [
    ({"checkpoint_every": 0, "checkpoint_path": "x"}, r"EngineConfig.checkpoint_every must be an integer >= 1"),
    ({"checkpoint_every": 2.0, "checkpoint_path": "x"}, r"EngineConfig.checkpoint_every must be an integer >= 1"),
    ({"checkpoint_every": True, "checkpoint_path": "x"}, r"EngineConfig.checkpoint_every must be an integer >= 1"),
    ({"checkpoint_every": 5}, r"EngineConfig.checkpoint_every=5 needs checkpoint_path"),
    ({"checkpoint_path": "x"}, r"EngineConfig.checkpoint_path='x' needs checkpoint_every"),
    ({"checkpoint_every": 5, "checkpoint_path": "x", "checkpoint_keep": 0},
     r"EngineConfig.checkpoint_keep must be an integer >= 1 or None"),
    ({"checkpoint_every": 5, "checkpoint_path": 3}, r"EngineConfig.checkpoint_path must be a folder"),
    ({"checkpoint_every": 5, "checkpoint_path": ""}, r"EngineConfig.checkpoint_path must be a folder"),
    ({"checkpoint_every": 5, "checkpoint_path": "FILE"}, r"EngineConfig.checkpoint_path must be a folder .* is a file"),
])
def test_bad_settings_are_named(tmp_path, kwargs, match):
    (tmp_path / "FILE").write_text("")
    if kwargs.get("checkpoint_path") == "FILE":
        kwargs = {**kwargs, "checkpoint_path": tmp_path / "FILE"}
    with pytest.raises(ValueError, match=match):
        mlo.EngineConfig(**kwargs)


# ------------------------------------------------------------- 2 gloo ranks
WORLD, TIMEOUT = 2, 600


def _worker(rank, init_file, directory):
    import torch.distributed as dist
    from mlo import distributed as mdist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    torch.manual_seed(7)
    engine = build("cg", periodic(directory, every=2, keep=2))
    for P in engine.problems.values():
        P.data = mdist.shard_batches(P.data)
    engine.run(7)                  # a rank that did not save would leave rank 0 waiting: timeout
    assert engine.periodic_checkpoints.last_path.endswith("ckpt-000006.pt")
    fresh = build("cg")            # every rank builds (a collective broadcast) and loads
    checkpoint.load(fresh, checkpoint.latest(directory))
    assert fresh.iteration == 6
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_every_rank_saves_rank_0_writes(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path / "ck")), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks did not finish within {TIMEOUT}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    assert iterations_in(tmp_path / "ck") == [4, 6] and no_temp_files(tmp_path / "ck")
