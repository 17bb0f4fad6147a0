"""MAE pretraining as a problem node (level I of MLO-MAE; alone, plain MAE training).

    min_θ  E_x  L_rec(θ; x, mask(s), a),     (s, a) = masker(x) or (uniform noise, 1)

``L_rec`` is :class:`problems.mae.MaskedAutoencoder`'s loss: the masked tokens are the
``num_masked(L, r) = L − int(L·(1−r))`` highest scores ``s`` (uniform noise = MAE's
random masking) and each masked token's loss is multiplied by its weight ``a``. A
learned masker (MLO-MAE's masking network, an upper problem) plugs in through
``masker``; upstream problems are passed explicitly, as the masker closure or a
subclass attribute.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

import mlo

__all__ = ["MAEPretrain", "Masker"]

# masker(x, problem[, noise]) -> scores [N, L]  or  (scores [N, L], token_weights [N, L] | None)
Masker = Callable[..., Union[Tensor, Tuple[Tensor, Optional[Tensor]]]]


class MAEPretrain(mlo.Problem):
    """MAE reconstruction loss on ``batch[0]``; variables: all trainable MAE parameters.

    Args:
        mae: a :class:`problems.mae.MaskedAutoencoder` (anything with the same
            ``forward(x, mask_ratio, scores, token_weights) -> (loss, pred, mask)``).
        data: iterable of batches; ``batch[0]`` (or the batch itself if a tensor) is x.
            A batch may also be a dict ``{"x": x, "noise": u}``: ``u [N, L]`` uniform
            noise drawn with the batch, passed to the masker as ``noise=u`` (a sampled
            mask that is one function of the batch, so every re-evaluation of the loss —
            Hessian-vector products, finite differences — masks the same tokens).
        mask_ratio: fraction of tokens masked (None: the model's own default).
        masker: optional ``masker(x, problem)`` (``masker(x, problem, noise=u)`` for a
            batch that carries noise) returning per-token ``scores`` ``[N, L]``,
            or ``(scores, token_weights)``. MLO-MAE's masking network returns its
            probabilities ``p`` as both (mask the top-k, weight their losses by ``p``);
            :meth:`patch_embeddings` gives it the MAE's embeddings at the current state.
        name: problem name.
        optimizer, optimizer_kwargs: default AdamW(lr 1e-4, betas (0.9, 0.95), wd 1e-3)
            as in the MLO-MAE code.
        **kwargs: the remaining :class:`mlo.Problem` arguments (scheduler, config, ...).
    """

    def __init__(self, mae: nn.Module, data=None, *, mask_ratio: Optional[float] = None,
                 masker: Optional[Masker] = None, name: str = "pretrain",
                 optimizer=torch.optim.AdamW, optimizer_kwargs: Optional[Dict[str, Any]] = None,
                 **kwargs):
        if optimizer_kwargs is None and optimizer is torch.optim.AdamW:
            optimizer_kwargs = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 1e-3}
        super().__init__(name, module=mae, optimizer=optimizer, optimizer_kwargs=optimizer_kwargs,
                         data=data, **kwargs)
        self.mask_ratio = mask_ratio
        self.masker = masker

    def patch_embeddings(self, x: Tensor, position: bool = True) -> Tensor:
        """The MAE's token + position embeddings ``[N, L, D]`` at the problem's current state
        (``position=False``: the tokens' content part alone)."""
        if position:
            return self.call("patch_embeddings", x)
        return self.call("patch_embeddings", x, position=False)

    def training_step(self, batch) -> Dict[str, Tensor]:
        noise = None
        if isinstance(batch, dict):
            x, noise = batch["x"], batch.get("noise")
        else:
            x = batch if isinstance(batch, Tensor) else batch[0]
        scores = token_weights = None
        if self.masker is not None:
            out = self.masker(x, self) if noise is None else self.masker(x, self, noise=noise)
            scores, token_weights = out if isinstance(out, tuple) else (out, None)
        loss, _, _ = self(x, mask_ratio=self.mask_ratio, scores=scores, token_weights=token_weights)
        return {"loss": loss}
