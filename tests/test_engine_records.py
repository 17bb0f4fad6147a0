"""``engine.records`` and ``engine.last_hypergradient``: update counts, time, losses and
the hypergradient, own-gradient and applied-gradient norms against the optimizer's
recorded gradients and the upper's own gradient in closed form."""
from __future__ import annotations

import pytest
import torch

from _ridge_call import RecSGD, ridge_data, ridge_engine

torch.set_num_threads(1)


@pytest.mark.parametrize("method", ["cg", "unrolled"])
def test_records_match_steps_and_applied_gradients(method, measured):
    P = ridge_data()
    eng, lo, up = ridge_engine(P, False, method, {} if method == "unrolled" else None, K=2, own=0.3,
                               optimizer=RecSGD if method == "cg" else torch.optim.SGD)
    eng.run(10)
    rec_up, rec_lo = eng.records["up"], eng.records["lo"]
    assert rec_up["updates"] == up.step_count == 5 and rec_lo["updates"] == lo.step_count == 10
    assert rec_up["seconds"] > 0 and rec_lo["seconds"] > 0
    assert rec_up["loss"] == float(up.last_loss) and rec_lo["loss"] == float(lo.last_loss)
    assert "hypergrad_norm" not in rec_lo and "own_grad_norm" not in rec_lo and "lo" not in eng.last_hypergradient
    hyper = eng.last_hypergradient["up"]["lam"]
    applied = up.optimizer.record[-1][0]
    own = applied - hyper
    assert float(torch.linalg.vector_norm(own)) > 0 and float(torch.linalg.vector_norm(hyper)) > 0
    def rel_scalar(a, b):
        return abs(a - b) / abs(b)

    measured(f"records['up']['hypergrad_norm'] vs ‖last_hypergradient‖ ({method})",
             rel_scalar(rec_up["hypergrad_norm"], float(torch.linalg.vector_norm(hyper))), 1e-14)
    # the upper's own gradient at its last update: ∂F/∂λ = 2·own·λ at λ before that step
    lam_before = up.params["lam"].detach() + 1e-3 * applied
    own_exact = 2 * 0.3 * lam_before
    measured(f"records['up']['own_grad_norm'] vs ‖∂F/∂λ‖ ({method})",
             rel_scalar(rec_up["own_grad_norm"], float(torch.linalg.vector_norm(own_exact))), 1e-12)
    measured(f"records['up']['grad_norm'] vs ‖applied gradient‖ ({method})",
             rel_scalar(rec_up["grad_norm"], float(torch.linalg.vector_norm(applied))), 1e-14)
    if method == "cg":   # the lower steps in place: its applied gradient is recorded too
        assert abs(rec_lo["grad_norm"] - float(torch.linalg.vector_norm(lo.optimizer.record[-1][0]))) \
            <= 1e-14 * rec_lo["grad_norm"]
