"""``ProblemConfig.update_every_iterations``: at most one update per block of N
iterations (with ``update_every``), kept across a checkpoint, and its validation."""
from __future__ import annotations

import warnings

import pytest
import torch

import mlo
import mlo.checkpoint
from _ridge_call import ridge_data, ridge_engine

torch.set_num_threads(1)


def expected_updates(iters, unroll, period, every=1):
    """ProblemConfig's rule: readinesses after every ``unroll`` lower steps; ``update_every``
    keeps every ``every``-th; at most one update per block ``[jN, (j+1)N)`` of iterations,
    at the first readiness both allow."""
    out, ready, last_block = [], 0, None
    for it in range(iters):
        if (it + 1) % unroll:
            continue
        ready += 1
        if ready % every or (period is not None and it // period == last_block):
            continue
        last_block = None if period is None else it // period
        out.append(it)
    return out


def schedule_engine(period, every=1, method="unrolled"):
    P = ridge_data()
    return ridge_engine(P, True, method, {} if method == "unrolled" else None, K=2, lr=0.05,
                        up_kw={"config": mlo.ProblemConfig(update_every=every,
                                                           update_every_iterations=period)})


def run_recording(eng, up, iters):
    at = []
    for _ in range(iters):
        before = up.step_count
        it = eng.iteration
        eng.step()
        if up.step_count > before:
            at.append(it)
    return at


@pytest.mark.parametrize("every", [1, 2, 3])
def test_update_every_iterations_schedule(every):
    eng, lo, up = schedule_engine(5, every)
    at = run_recording(eng, up, 40)
    assert at == expected_updates(40, 2, 5, every)
    if every == 1:
        assert at == [1, 5, 11, 15, 21, 25, 31, 35]      # the documented example
    if every == 2:
        assert at == [3, 7, 11, 15, 23, 27, 31, 35]
    assert up.ready_count == 20 and lo.step_count == 40
    assert eng.records["up"]["updates"] == len(at) == up.step_count
    # at most one update per block of 5 iterations
    assert len({i // 5 for i in at}) == len(at)


@pytest.mark.parametrize("method", ["unrolled", "cg"])
def test_update_every_iterations_survives_a_checkpoint(tmp_path, method):
    """Saved after 12 iterations: the update at iteration 11 opened block 2, so the
    readiness at 13 must stay blocked after loading (``_last_block`` restored)."""
    eng, lo, up = schedule_engine(5, method=method)
    full = run_recording(eng, up, 40)
    final = (lo.module.w.detach().clone(), up.params["lam"].detach().clone())

    eng_a, lo_a, up_a = schedule_engine(5, method=method)
    first = run_recording(eng_a, up_a, 12)
    path = tmp_path / "mid.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no open window at iteration 12
        mlo.checkpoint.save(eng_a, path)
        eng_b, lo_b, up_b = schedule_engine(5, method=method)
        mlo.checkpoint.load(eng_b, path)
    assert eng_b.iteration == 12
    second = run_recording(eng_b, up_b, 28)
    assert first + second == full == [1, 5, 11, 15, 21, 25, 31, 35]
    assert torch.equal(lo_b.module.w.detach(), final[0])
    assert torch.equal(up_b.params["lam"].detach(), final[1])


@pytest.mark.parametrize("bad", [0, -1, "5", True, 2.5])
def test_problem_config_rejects_bad_update_every_iterations(bad):
    with pytest.raises(ValueError, match="update_every_iterations"):
        mlo.ProblemConfig(update_every_iterations=bad)
    with pytest.raises(ValueError, match="update_every_iterations"):
        mlo.ProblemConfig.from_dict({"update_every_iterations": bad})


def test_problem_config_accepts_update_every_iterations():
    assert mlo.ProblemConfig().update_every_iterations is None
    assert mlo.ProblemConfig(update_every_iterations=1).update_every_iterations == 1
    assert mlo.ProblemConfig.from_dict({"update_every_iterations": 5}).update_every_iterations == 5
