"""MLO-MAE masking network: per-token masking probabilities from the MAE's embeddings.

    p = σ(W₂ ReLU(W₁ vec(E) + b₁) + b₂),    E = patch + position embeddings  [N, L, D]

``vec(E)`` flattens the ``L·D`` embedding values of a sample; ``p ∈ (0, 1)^L``. The
MAE masks the ``num_masked(L, r)`` highest-probability tokens (pass ``p`` as ``scores``
to ``random_masking``/``MaskedAutoencoder.forward``: the lowest scores are kept)
and multiplies each masked token's loss by its probability (``token_weights=p``),
which is the masking network's only path for a gradient.
"""

import torch
from torch import nn

__all__ = ["MaskingNetwork"]


class MaskingNetwork(nn.Module):
    """``[N, L, D] -> [N, L]`` probabilities: Linear(L·D, hidden) → ReLU → Linear(hidden, L) → sigmoid.

    Args:
        num_tokens: ``L``.
        embed_dim: ``D`` (the MAE encoder width).
        hidden: hidden width (MLO-MAE: 512).
    """

    def __init__(self, num_tokens: int, embed_dim: int, hidden: int = 512):
        super().__init__()
        self.num_tokens, self.embed_dim = num_tokens, embed_dim
        self.fc1 = nn.Linear(num_tokens * embed_dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_tokens)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings: [N, L, D]`` → probabilities ``[N, L]``."""
        n = embeddings.shape[0]
        h = self.act(self.fc1(embeddings.reshape(n, self.num_tokens * self.embed_dim)))
        return torch.sigmoid(self.fc2(h))  # [N, L]
