"""MLO-MAE masking network: per-token masking probabilities from the MAE's embeddings.

    p = σ(W₂ ReLU(W₁ vec(N(E)) + b₁) + b₂)

``E [N, L, D]`` are the MAE's patch + position embeddings (the paper's input) or,
position-free, their patch part alone; ``N`` is the identity (the paper) or a
LayerNorm over each token's ``D`` values (``input_norm=True``). ``vec`` flattens
the ``L·D`` values of a sample; ``p ∈ (0, 1)^L``. The MAE masks the
``num_masked(L, r)`` highest-probability tokens (pass ``p`` as ``scores`` to
``random_masking``/``MaskedAutoencoder.forward``: the lowest scores are kept) and
multiplies each masked token's loss by its probability (``token_weights=p``),
which is the masking network's only path for a gradient.

Why the two input options: with the paper's input the position part is the same
for every image and, early in training, larger than the patch part, so the network
can settle on one per-position pattern for all images. Dropping the positions, or
normalising each token, makes the image content the input's dominant variation.
"""

import torch
from torch import nn

__all__ = ["MaskingNetwork"]


class MaskingNetwork(nn.Module):
    """``[N, L, D] -> [N, L]`` probabilities: [LayerNorm(D)] → Linear(L·D, hidden) → ReLU →
    Linear(hidden, L) → sigmoid.

    Args:
        num_tokens: ``L``.
        embed_dim: ``D`` (the MAE encoder width).
        hidden: hidden width (MLO-MAE: 512).
        input_norm: LayerNorm each token's embedding before the MLP (not in the paper).
    """

    def __init__(self, num_tokens: int, embed_dim: int, hidden: int = 512, input_norm: bool = False):
        super().__init__()
        self.num_tokens, self.embed_dim = num_tokens, embed_dim
        self.norm = nn.LayerNorm(embed_dim) if input_norm else nn.Identity()
        self.fc1 = nn.Linear(num_tokens * embed_dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_tokens)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings: [N, L, D]`` → probabilities ``[N, L]``."""
        n = embeddings.shape[0]
        e = self.norm(embeddings)  # [N, L, D]
        h = self.act(self.fc1(e.reshape(n, self.num_tokens * self.embed_dim)))  # [N, hidden]
        return torch.sigmoid(self.fc2(h))  # [N, L]
