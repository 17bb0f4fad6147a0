"""Data parallelism (mlo.distributed): 2 gloo processes on CPU vs one process.

Each rank keeps rows ``r, r+2, ...`` of every global batch (``shard_batches``); with
mean-reduced losses the run must end with the parameters of one process fed the
global batches — for every hypergradient method, whose Hessian-vector products,
finite differences and unrolled backward passes are averaged over ranks inside the
method (float64, relative error ≤ 1e-6; measured ~1e-15). Processes are started with
``torch.multiprocessing`` (spawn) and a file-based rendezvous (no network); every
spawn is bounded by a timeout, and a rank that raises must stop both with its error.

Ranks agree (issue 20): early stopping on rank-dependent metrics (rank 0's decide),
``request_stop()`` and a SIGTERM on one rank only end ``run`` at the same iteration on
both ranks, and the ranks then go on in lockstep; a metric one rank cannot read raises
on both; a ``WindowProblem`` graph is refused with a named ``GraphError``.

Time limits hold on a loaded 2-core machine: each spawn may take ``TIMEOUT`` (600 s)
and the process group waits ``PG_TIMEOUT`` (600 s) for a collective — limits that only
a hang reaches (a passing spawn takes seconds).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import mlo
from mlo import distributed as mdist

WORLD = 2
TIMEOUT = 600         # seconds per spawned test (a deadline only a hang reaches, even under load)
PG_TIMEOUT = 600      # seconds the process group waits for a collective (torch: 30 min)
METHODS = {"unrolled": {}, "cg": {"max_iter": 10}, "neumann": {"iterations": 10, "alpha": 0.5},
           "finite_difference": {"epsilon": 0.01}}
MAE_METHODS = {"unrolled": {}, "cg": {"max_iter": 3}, "neumann": {"iterations": 3, "alpha": 0.1},
               "finite_difference": {}}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


# ----------------------------------------------------------------- the graphs
class Classifier(mlo.Problem):
    def __init__(self, hyper, data, method, options):
        super().__init__("classifier", module=nn.Linear(6, 1).double(), data=data,
                         optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.5, "momentum": 0.5},
                         config=mlo.ProblemConfig(unroll_steps=4, method=method, method_options=options))
        self.hyper = hyper

    def training_step(self, batch):
        x, y = batch
        w = self.params["weight"].squeeze(0)
        wd = self.hyper.params["log_wd"].exp()
        return F.binary_cross_entropy_with_logits(self(x).squeeze(-1), y) + 0.5 * (wd * w * w).sum()


class WeightDecay(mlo.Problem):
    def __init__(self, data):
        super().__init__("hyper", params={"log_wd": torch.full((6,), -1.0, dtype=torch.float64)},
                         data=data, optimizer=torch.optim.Adam, optimizer_kwargs={"lr": 0.1})
        self.classifier = None

    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.classifier(x).squeeze(-1), y)


def quickstart_batches():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 6, generator=g, dtype=torch.float64)
    Y = (X[:, 0] + 0.5 * torch.randn(96, generator=g, dtype=torch.float64) > 0).double()
    train = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 48, 16)]      # 3 global batches of 16
    val = [(X[i:i + 24], Y[i:i + 24]) for i in range(48, 96, 24)]       # 2 global batches of 24
    return train, val


def quickstart_engine(method, shard, config=None):
    torch.manual_seed(1)
    train, val = quickstart_batches()
    wrap = mdist.shard_batches if shard else (lambda d: d)
    hyper = WeightDecay(wrap(val))
    clf = Classifier(hyper, wrap(train), method, METHODS[method])
    hyper.classifier = clf
    return mlo.Engine([clf, hyper], {"u2l": {hyper: [clf]}, "l2u": {clf: [hyper]}}, config=config)


def mae_engine(method, shard):
    from problems.mlo_mae import MLOMAESettings, build

    s = MLOMAESettings(image_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                       decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_hidden=8,
                       batch_size=8, steps=8, num_classes=3, head_dropout=0.0, method=method,
                       method_options=MAE_METHODS[method])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    graph = build("mlo-mae", s, (x, y), seed=0)
    if shard:
        for P in graph.problems.values():
            P.data = mdist.shard_batches(P.data)
    return graph.engine


GRAPHS = {"quickstart": (quickstart_engine, 12), "mlo_mae": (mae_engine, 6)}


def params_of(engine):
    return {f"{n}.{k}": t.detach().clone() for n, P in engine.problems.items()
            for k, t in zip(P.param_names, P.variables)}


def run_graph(graph, method, shard):
    build, iters = GRAPHS[graph]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        engine = build(method, shard)
        start = params_of(engine)
        t0 = time.perf_counter()
        engine.run(iters)
        engine.close_windows()
        return start, params_of(engine), (time.perf_counter() - t0) / iters
    finally:
        torch.set_default_dtype(old)


# --------------------------------------------------------------- spawn plumbing
def _init(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT))


def _parity_worker(rank, init_file, graph, out):
    _init(rank, init_file)
    try:
        result = {m: run_graph(graph, m, shard=True)[1:] for m in METHODS}
        if rank == 0:
            torch.save(result, out)
        if graph == "quickstart":   # checkpoints: every rank calls save, rank 0 writes; all load
            engine = quickstart_engine("cg", shard=True)
            engine.run(4)
            mlo.checkpoint.save(engine, out + ".ckpt")
            assert os.path.isfile(out + ".ckpt")
            assert [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".mlo-ckpt")] == []
            fresh = quickstart_engine("cg", shard=True)
            mlo.checkpoint.load(fresh, out + ".ckpt")
            assert fresh.iteration == 4 and rel(params_of(fresh), params_of(engine)) == 0.0
            # Printing and loggers: rank 0 only.
            logged, text = [], io.StringIO()

            class Logger:
                def log(self, iteration, metrics):
                    logged.append(iteration)

            engine = quickstart_engine("cg", shard=True, config=mlo.EngineConfig(
                log_every=1, loggers=[Logger()], progress=False))
            with contextlib.redirect_stdout(text):
                engine.run(2)
            assert ("[mlo] iter 2" in text.getvalue()) == (rank == 0), text.getvalue()
            assert (logged == [1, 2]) == (rank == 0) and (logged == []) == (rank != 0)
    except BaseException:
        raise           # no barrier: the launcher stops the other rank
    _shutdown()


def _shutdown():
    # Both ranks leave together: a gloo process group torn down while the other rank
    # still sends can abort the process ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def _failing_worker(rank, init_file):
    _init(rank, init_file)

    class Boom(WeightDecay):
        def training_step(self, batch):
            if mdist.rank() == 1 and self.step_count == 1:
                raise ValueError("rank 1 failed on purpose")
            return super().training_step(batch)

    torch.manual_seed(1)
    train, val = quickstart_batches()
    hyper = Boom(mdist.shard_batches(val))
    clf = Classifier(hyper, mdist.shard_batches(train), "cg", METHODS["cg"])
    hyper.classifier = clf
    try:
        mlo.Engine([clf, hyper], {"u2l": {hyper: [clf]}, "l2u": {clf: [hyper]}}).run(40)
    except BaseException as e:      # which rank's error spawn reports first is a race: record
        with open(f"{init_file}.rank{rank}.err", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise
    _shutdown()


def spawn(fn, args, timeout=TIMEOUT):
    """Runs ``fn(rank, *args)`` on WORLD processes; fails (and kills them) after ``timeout``."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"spawned ranks did not finish within {timeout}s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def rel(a, b):
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b) ** 0.5
    den = sum(float(b[k].pow(2).sum()) for k in b) ** 0.5
    return num / den


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_two_ranks_match_one_process_on_the_global_batch(graph, tmp_path, measured):
    out = tmp_path / "result.pt"
    spawn(_parity_worker, (str(tmp_path / "init"), graph, str(out)))
    result = torch.load(out, weights_only=True)
    if graph == "quickstart":
        assert (tmp_path / "result.pt.ckpt").is_file()
    for method in METHODS:
        start, want, _ = run_graph(graph, method, shard=False)
        got, _ = result[method]
        assert rel(want, start) > 1e-3, "the run must move the parameters"
        for name in ("hyper.log_wd", "mask.net.0.weight"):
            if name in want:   # the upper level really learned (a hypergradient was applied)
                assert float((want[name] - start[name]).abs().max()) > 1e-6
        measured(f"distributed: {graph}, {method}, 2 ranks vs 1 process (rel. params)",
                 rel(got, want), 1e-6)


def test_a_failing_rank_stops_all_ranks_with_its_error(tmp_path):
    t0 = time.monotonic()
    # Rank 1 raises; spawn then stops rank 0 (blocked in a collective) and re-raises —
    # rank 1's error, or rank 0's broken connection when that is noticed first.
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        spawn(_failing_worker, (str(tmp_path / "init"),))
    assert time.monotonic() - t0 < TIMEOUT
    assert (tmp_path / "init.rank1.err").read_text() == "ValueError: rank 1 failed on purpose"


def test_single_process_helpers_and_shard_semantics():
    assert not mdist.is_distributed() and mdist.rank() == 0 and mdist.world_size() == 1
    assert not mdist.enabled("auto") and not mdist.enabled(False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        mdist.enabled(True)
    t = torch.arange(5.0)
    assert mdist.average([t])[0] is t and mdist.grad_average([t])[0] is t
    # DistributedSampler semantics: rank r takes r, r+W, ...; padded by wrapping around.
    assert mdist.shard(list(range(5)), 0, 2) == [0, 2, 4]
    assert mdist.shard(list(range(5)), 1, 2) == [1, 3, 0]
    assert mdist.shard(list(range(5)), 1, 2, drop_last=True) == [1, 3]
    assert torch.equal(mdist.shard(torch.arange(6), 1, 3), torch.tensor([1, 4]))
    batches = list(mdist.shard_batches([(torch.arange(4), torch.arange(4) * 10)], 1, 2))
    assert [b.tolist() for b in batches[0]] == [[1, 3], [10, 30]]
    with pytest.raises(ValueError, match="divisible"):
        list(mdist.shard_batches([torch.arange(3)], 0, 2))


# ------------------------------------------------------- ranks that agree (issue 20)
# Rank-dependent validation values. Alone, rank 1 would stop at iteration 3 (best 1.0 at 1)
# and rank 0 at iteration 5 (a NaN first, then best 4.0 at 3): rank 0's decide on both.
ES_VALUES = {0: [float("nan"), 5.0, 4.0, 4.5, 4.2, 3.0, 2.0, 1.0],
             1: [1.0, 2.0, 3.0, 0.5, 0.4, 0.3, 0.2, 0.1]}
ES_PATIENCE = 2


class _OnRank:
    """A callback acting at the end of one iteration on one rank only."""

    def __init__(self, rank, iteration, action):
        self.rank, self.iteration, self.action = rank, iteration, action

    def after_iteration(self, engine):
        if mdist.rank() == self.rank and engine.iteration == self.iteration:
            self.action(engine)


class _Latent(mlo.WindowProblem):
    def init_window(self, x):
        return {"z": x @ self.up.params["W"]}, {}

    def training_step(self, x):
        return ((self.params["z"] - x[:, :2]) ** 2).sum()


class _LatentUpper(mlo.Problem):
    def training_step(self, x):
        return ((self.lat.params["z"] - x[:, 2:]) ** 2).sum()


def window_engine(config=None):
    x = torch.randn(4, 4, dtype=torch.float64)
    up = _LatentUpper("up", params={"W": torch.randn(4, 2, dtype=torch.float64)}, data=[x],
                      optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.01})
    lat = _Latent("latents", optimizer=torch.optim.SGD, optimizer_kwargs={"lr": 0.1}, data=[x],
                  config=mlo.ProblemConfig(method="unrolled", unroll_steps=2))
    up.lat, lat.up = lat, up
    return mlo.Engine([lat, up], {"u2l": {up: [lat]}, "l2u": {lat: [up]}}, config)


def _early_stopping_case(rank):
    values, seen = iter(ES_VALUES[rank]), []

    def validation(engine):
        seen.append(params_of(engine))
        return {"loss": next(values)}

    engine = quickstart_engine("cg", shard=True, config=mlo.EngineConfig(
        validate_every=1, validation=validation, progress=False,
        early_stopping={"metric": "loss", "mode": "min", "patience": ES_PATIENCE}))
    with contextlib.redirect_stdout(io.StringIO()):
        engine.run(20)
    es = engine.early_stopping
    kept = {f"{n}.{k}": t for n, st in es.state.items() for k, t in st["module"].items()}
    return {"iteration": engine.iteration, "stopped": engine.stop_requested, "best": es.best,
            "best_iteration": es.best_iteration, "kept": kept, "seen": seen,
            "history": [h["loss"] for h in engine.history]}


def _request_stop_case(rank):
    engine = quickstart_engine("cg", shard=True)
    engine.run(10, callbacks=[_OnRank(1, 3, lambda e: e.request_stop())])
    first = (engine.iteration, engine.stop_requested)
    engine.run(2)                                    # both ranks go on together
    return {"first": first, "then": engine.iteration, "params": params_of(engine)}


def _signal_case(rank):
    engine = quickstart_engine("cg", shard=True)
    got = None
    try:
        engine.run(10, callbacks=[_OnRank(1, 2, lambda e: os.kill(os.getpid(), signal.SIGTERM))])
    except mlo.interrupt.Interrupted as e:
        got = (e.signum, e.iteration, engine.iteration, e.exit_code)
    engine.run(1)
    return {"interrupted": got, "then": engine.iteration, "params": params_of(engine)}


def _metric_error_case(rank):
    value = 1.0 if rank == 0 else "not a number"
    engine = quickstart_engine("cg", shard=True, config=mlo.EngineConfig(
        validate_every=2, validation=lambda e: {"loss": value}, progress=False,
        early_stopping={"metric": "loss"}))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            engine.run(6)
    except (TypeError, RuntimeError) as e:
        return {"error": f"{type(e).__name__}: {e}", "iteration": engine.iteration}
    return {"error": None, "iteration": engine.iteration}


def _window_case(rank):
    torch.manual_seed(0)
    try:
        window_engine()
    except mlo.graph.GraphError as e:
        refused = str(e)
    else:
        refused = None
    single = window_engine(mlo.EngineConfig(distributed=False))    # each rank alone: allowed
    single.run(2)
    return {"refused": refused, "alone": single.counts()}


AGREEMENT_CASES = {"early_stopping": _early_stopping_case, "request_stop": _request_stop_case,
                   "signal": _signal_case, "metric_error": _metric_error_case, "window": _window_case}


def _agreement_worker(rank, init_file, out):
    _init(rank, init_file)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    result = {}
    try:
        for name, case in AGREEMENT_CASES.items():
            t0 = time.perf_counter()
            result[name] = case(rank)
            result[name]["seconds"] = time.perf_counter() - t0
            torch.save(result, f"{out}.{rank}")     # after each case: a later hang keeps it
    finally:
        torch.set_default_dtype(old)
    _shutdown()


@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    """Both ranks' results of :data:`AGREEMENT_CASES` (one spawn for all of them)."""
    tmp = tmp_path_factory.mktemp("agreement")
    out = str(tmp / "result")
    try:
        spawn(_agreement_worker, (str(tmp / "init"), out))
        failure = None
    except (Exception, pytest.fail.Exception) as e:     # a hang or a rank's error: each test
        failure = f"{type(e).__name__}: {e}"             # says which case did not complete
    results = [torch.load(f"{out}.{r}", weights_only=True) if os.path.isfile(f"{out}.{r}") else {}
               for r in range(WORLD)]
    return results, failure


def case_results(agreement, name):
    """Both ranks' results of case ``name``; fails naming the case when a rank lacks them."""
    results, failure = agreement
    if any(name not in r for r in results):
        pytest.fail(f"case {name!r} did not complete on every rank ({failure})")
    return [r[name] for r in results]


def test_early_stopping_follows_rank_0s_metric_on_every_rank(agreement):
    r0, r1 = case_results(agreement, "early_stopping")
    assert r1["history"] == ES_VALUES[1][:5], "each rank validated with its own values"
    for r in (r0, r1):
        assert (r["iteration"], r["stopped"], r["best"], r["best_iteration"]) == (5, True, 4.0, 3)
        for k, t in r0["seen"][2].items():          # the kept state: the parameters at iteration 3
            assert torch.equal(r["kept"][k], t), k
    assert r0["kept"].keys() == r1["kept"].keys()
    for k in r0["kept"]:
        assert torch.equal(r0["kept"][k], r1["kept"][k]), k


def test_request_stop_on_one_rank_stops_every_rank(agreement):
    r0, r1 = case_results(agreement, "request_stop")
    assert r0["first"] == r1["first"] == (3, True)
    assert r0["then"] == r1["then"] == 5
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k


def test_a_signal_on_one_rank_interrupts_every_rank(agreement):
    r0, r1 = case_results(agreement, "signal")
    assert r0["interrupted"] == r1["interrupted"] == (signal.SIGTERM, 2, 2, 143)
    assert r0["then"] == r1["then"] == 3
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k


def test_a_metric_one_rank_cannot_read_raises_on_every_rank(agreement):
    r0, r1 = case_results(agreement, "metric_error")
    assert r0["iteration"] == r1["iteration"] == 2
    assert r1["error"] == ("TypeError: EngineConfig.early_stopping: metric 'loss' must be a real number "
                           "(or a one-element real tensor), got 'not a number' (str)")
    assert r0["error"] == ("RuntimeError: EngineConfig.early_stopping: metric 'loss' could not be read "
                           "on another rank (see that rank's error); every rank stops")


def test_window_problem_graphs_are_refused_under_data_parallelism(agreement):
    for a in case_results(agreement, "window"):
        assert a["refused"] == (
            "problem 'latents' has per-window variables (WindowProblem): they are not yet supported "
            "with data parallelism over 2 ranks (each rank would adapt them for its own rows only and "
            "the replicas would diverge); run this graph in one process (without torchrun)")
        assert a["alone"] == {"latents": 2, "up": 1}


# ------------------------------------------------------- init_from_env's timeout
def test_init_from_env_has_a_bounded_settable_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("MLO_DIST_TIMEOUT", raising=False)
    assert mdist.init_from_env("gloo") is False and calls == []        # not under torchrun
    monkeypatch.setenv("LOCAL_RANK", "0")

    def timeout_of(*args, **kw):
        calls.clear()
        assert mdist.init_from_env("gloo", *args, **kw) is True
        (backend, kwargs), = calls
        assert backend == "gloo"
        return kwargs["timeout"]

    assert mdist.DEFAULT_TIMEOUT_SECONDS == 300
    assert timeout_of() == datetime.timedelta(seconds=300)
    assert timeout_of(timeout_seconds=45) == datetime.timedelta(seconds=45)
    monkeypatch.setenv("MLO_DIST_TIMEOUT", " 120.5 ")
    assert timeout_of() == datetime.timedelta(seconds=120.5)
    assert timeout_of(timeout_seconds=7) == datetime.timedelta(seconds=7)     # the argument wins
    for bad in ("abc", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("MLO_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match=r"^the environment variable MLO_DIST_TIMEOUT: the process "
                                             r"group's timeout must be a positive finite number of seconds"):
            timeout_of()
    monkeypatch.setenv("MLO_DIST_TIMEOUT", "")
    assert timeout_of() == datetime.timedelta(seconds=300)                  # empty: unset
    for bad in (0, -1.0, float("nan"), "60", True):
        with pytest.raises(ValueError, match=r"^init_from_env\(timeout_seconds=\.\.\.\): the process"):
            timeout_of(timeout_seconds=bad)
    assert calls == []


def test_stop_agreement_in_one_process_is_the_local_decision():
    strategy = mlo.parallel.SingleProcess()
    assert strategy.agree_stop(False, None) == (False, None)
    assert strategy.agree_stop(True, signal.SIGINT) == (True, signal.SIGINT)
    assert strategy.main_value(2.5) == (2.5, True) and strategy.main_value(None) == (None, False)
    assert mdist.agree_stop(True, None) == (True, None) and mdist.main_value(1.0) == (1.0, True)
