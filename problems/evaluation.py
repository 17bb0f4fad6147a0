"""Evaluation of learned representations: linear probing and full fine-tuning.

Linear probe (frozen features ``h = φ(x)``, no gradient to ``φ``)::

    z = (h − μ_train) / σ_train
    W, b = argmin  1/n Σ_i CE(W z_i + b, y_i) + λ/2 ‖W‖²      (multinomial logistic regression)

solved full-batch in float64 by L-BFGS with strong-Wolfe line search from zero, so
the result is deterministic (the objective is strictly convex for ``λ > 0``).
Accuracy is measured on the test features with the training statistics.

Fine-tuning trains ``head(model(x))`` end to end with AdamW and cross-entropy.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from problems.datasets.splits import as_tensors, infinite_loader

__all__ = ["ProbeResult", "FinetuneResult", "Features", "extract_features", "linear_probe", "finetune"]


@dataclass
class ProbeResult:
    """Result of :func:`linear_probe`."""

    accuracy: float        # test accuracy in [0, 1]
    train_accuracy: float
    num_features: int
    iterations: int        # L-BFGS function evaluations
    others: Dict[str, float] = field(default_factory=dict)   # accuracy on each ``also`` set


@dataclass
class FinetuneResult:
    """Result of :func:`finetune`."""

    accuracy: float        # test accuracy in [0, 1]
    train_loss: float      # mean loss over the last epoch
    steps: int


class Features(nn.Module):
    """``nn.Module`` view of a model's ``features(x, pool=...)`` (e.g. an MAE encoder).

    Lets :func:`finetune` train the encoder: ``Features(mae, "cls")(x) -> [N, D]``.
    """

    def __init__(self, model: nn.Module, pool: str = "cls"):
        super().__init__()
        self.model = model
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        return self.model.features(x, pool=self.pool)


def _owner(fn) -> Optional[nn.Module]:
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _device_of(module: Optional[nn.Module]) -> Optional[torch.device]:
    """The device of ``module``'s first parameter or buffer (``None``: no module, or none)."""
    if module is None:
        return None
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


@contextlib.contextmanager
def _eval_mode(module: Optional[nn.Module]):
    if module is None:
        yield
        return
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


@torch.no_grad()
def extract_features(feature_fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 512) -> Tensor:
    """``feature_fn`` over ``x`` in batches, without gradients and in eval mode → ``[N, D]``.

    When ``feature_fn`` is (a method of) an ``nn.Module`` with parameters, each batch is
    moved to that module's device first (images may stay on the CPU while the model is
    on a GPU); the features are returned where ``feature_fn`` put them.
    """
    owner = _owner(feature_fn)
    dev = _device_of(owner)
    with _eval_mode(owner):
        out = [feature_fn(x[i:i + batch_size] if dev is None else x[i:i + batch_size].to(dev))
               for i in range(0, len(x), batch_size)]
        out = [h.reshape(h.shape[0], -1) for h in out]
    return torch.cat(out).detach()


def linear_probe(feature_fn: Callable[[Tensor], Tensor], train, test, *, num_classes: Optional[int] = None,
                 weight_decay: float = 1e-3, max_iter: int = 500, batch_size: int = 512,
                 also: Optional[Mapping[str, Any]] = None) -> ProbeResult:
    """Accuracy of a logistic-regression probe on frozen, standardized features.

    Args:
        feature_fn: ``x -> [N, ...]`` features (flattened); e.g. ``mae.features`` or
            ``lambda x: x`` for raw inputs. Run under ``no_grad`` and, if it is (a
            method of) an ``nn.Module``, in eval mode.
        train, test: ``TensorDataset`` or ``(x, y)`` with integer labels.
        num_classes: default ``max label + 1`` over train and test.
        weight_decay: ``λ`` of the L2 penalty on ``W`` (mean loss scale).
        max_iter: L-BFGS iteration budget.
        batch_size: feature-extraction batch size.
        also: more evaluation sets by name (e.g. ``{"val": val}``), scored by the same
            probe (trained once) into ``ProbeResult.others``.

    The probe runs on the device of the features (``feature_fn``'s outputs; batches of
    ``x`` are moved to ``feature_fn``'s module first, see :func:`extract_features`): its
    weights, labels and L-BFGS state are created there, in float64.
    """
    x_tr, y_tr = as_tensors(train)[:2]
    x_te, y_te = as_tensors(test)[:2]
    h_tr = extract_features(feature_fn, x_tr, batch_size).double()
    h_te = extract_features(feature_fn, x_te, batch_size).double()
    mu, sd = h_tr.mean(0), h_tr.std(0).clamp_min(1e-6)
    z_tr, z_te = (h_tr - mu) / sd, (h_te - mu) / sd
    # Everything below lives where the features are (labels included).
    y_tr, y_te = y_tr.to(z_tr.device, torch.long), y_te.to(z_tr.device, torch.long)
    k = int(num_classes or int(max(y_tr.max(), y_te.max())) + 1)

    w = torch.zeros(z_tr.shape[1], k, dtype=torch.float64, device=z_tr.device, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, device=z_tr.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z_tr @ w + b, y_tr) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = ((z_tr @ w + b).argmax(1) == y_tr).double().mean().item()
        acc = ((z_te @ w + b).argmax(1) == y_te).double().mean().item()
        others = {}
        for name, data in (also or {}).items():
            x_o, y_o = as_tensors(data)[:2]
            z_o = (extract_features(feature_fn, x_o, batch_size).double() - mu) / sd
            others[name] = ((z_o @ w + b).argmax(1) == y_o.to(z_o.device, torch.long)).double().mean().item()
    n_eval = opt.state[opt._params[0]].get("func_evals", 0)
    return ProbeResult(accuracy=acc, train_accuracy=train_acc, num_features=z_tr.shape[1], iterations=n_eval,
                       others=others)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    dev = _device_of(model)

    def to(t: Tensor) -> Tensor:
        return t if dev is None else t.to(dev)

    with _eval_mode(model):
        correct = sum((model(to(x[i:i + batch_size])).argmax(1) == to(y[i:i + batch_size])).sum().item()
                      for i in range(0, len(x), batch_size))
    return correct / max(len(x), 1)


def finetune(model: nn.Module, head: Optional[nn.Module], train, test, epochs: int = 10, lr: float = 1e-3, *,
             batch_size: int = 64, weight_decay: float = 0.05, seed: int = 0,
             label_smoothing: float = 0.0) -> FinetuneResult:
    """Full fine-tuning of ``head(model(x))`` (or ``model(x)`` if ``head`` is None).

    All parameters of ``model`` and ``head`` are trained with AdamW and
    cross-entropy for ``epochs`` passes over ``train`` (shuffled by ``seed``);
    the modules are modified in place. Batches are moved to the device of the
    model's parameters. Returns the test accuracy.
    """
    net = model if head is None else nn.Sequential(model, head)
    x_tr, y_tr = as_tensors(train)[:2]
    x_te, y_te = as_tensors(test)[:2]
    y_tr, y_te = y_tr.long(), y_te.long()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    bs = min(batch_size, len(x_tr))
    steps_per_epoch = max(len(x_tr) // bs, 1)
    batches = infinite_loader((x_tr, y_tr), bs, seed=seed)
    dev = _device_of(net)
    net.train()
    steps, last = 0, []
    for epoch in range(epochs):
        last = []
        for _ in range(steps_per_epoch):
            xb, yb = next(batches)
            if dev is not None:
                xb, yb = xb.to(dev), yb.to(dev)
            loss = F.cross_entropy(net(xb), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            last.append(loss.item())
    train_loss = sum(last) / len(last) if last else float("nan")
    return FinetuneResult(accuracy=_accuracy(net, x_te, y_te, 512), train_loss=train_loss, steps=steps)
