"""M3AE-style multimodal tokenizer: one sequence of image patches and text tokens.

``[image patches ; text tokens]`` with learned modality-type embeddings, per-modality
mask ratios and loss weights (image: pixel regression, text: cross-entropy). The
interface is the one of ``problems/tokenizers.py``, so the MAE treats it like any
other tokenizer.
"""

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from problems.tokenizers import (CLASSIFICATION, REGRESSION, DiscreteTokenizer, ImageTokenizer,
                                 Segment)

__all__ = ["MultimodalTokenizer", "SegmentPositionEmbedding"]


class SegmentPositionEmbedding(nn.Module):
    """Per-segment position embeddings plus a learned type vector per segment.

    ``x: [N, L, D]`` with ``L = Σ_s L_s``; segment ``s`` gets ``P_s + t_s``.
    """

    def __init__(self, positions: Sequence[nn.Module], dim: int, type_std: float = 0.02):
        super().__init__()
        self.positions = nn.ModuleList(positions)
        self.lengths = [p.num_tokens for p in positions]
        self.types = nn.Parameter(torch.randn(len(positions), dim) * type_std)  # [S, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.lengths, dim=1)
        return torch.cat([pos(part) + self.types[i]
                          for i, (pos, part) in enumerate(zip(self.positions, parts))], dim=1)


class MultimodalTokenizer(nn.Module):
    """M3AE image+text: one sequence ``[image patches ; text tokens]``.

    ``embed(x) = [img.embed(image) + t_img ; txt.embed(text) + t_txt]`` where the
    ``t`` are learned modality-type vectors (2-D sin-cos positions for patches, 1-D
    for text come from the sub-tokenizers). Image targets are pixels (MSE), text
    targets are ids (CE). M3AE defaults: both mask ratios 0.75, loss weights
    image 1.0 / text 0.5.

    Text padding: give the text tokenizer a ``pad_id`` (``DiscreteTokenizer(...,
    pad_id=0)``); ``padding(x)`` is then ``[N, L_img + T]`` with image patches never
    padding, and the MAE hides pads and drops them from the text loss.

    Input: ``{"image": [N, C, H, W], "text": [N, T] long}`` or a tuple
    ``(image, text)``. ``patchify`` returns ``{"image": [N, L_img, p·p·C],
    "text": [N, T]}``; ``unpatchify`` maps that dict back to the input dict.

    Args:
        image: an ``ImageTokenizer``.
        text: a ``DiscreteTokenizer`` (its segment is renamed ``"text"``).
        mask_ratios: ``(image, text)`` mask ratios; None entries use the model's.
        loss_weights: ``(image, text)`` loss weights.
    """

    def __init__(self, image: ImageTokenizer, text: DiscreteTokenizer,
                 mask_ratios: Tuple[Optional[float], Optional[float]] = (0.75, 0.75),
                 loss_weights: Tuple[float, float] = (1.0, 0.5)):
        super().__init__()
        if image.embed_dim != text.embed_dim:
            raise ValueError("image and text tokenizers need the same embed_dim")
        text.name = "text"
        self.image, self.text = image, text
        self.embed_dim = image.embed_dim
        self.num_tokens = image.num_tokens + text.num_tokens
        self.mask_ratios = tuple(mask_ratios)
        self.loss_weights = tuple(loss_weights)
        self.types = nn.Parameter(torch.randn(2, self.embed_dim) * 0.02)  # [2, D]

    @property
    def segments(self) -> Tuple[Segment, ...]:
        li = self.image.num_tokens
        return (
            Segment("image", 0, li, REGRESSION, self.image.patch_dim,
                    self.mask_ratios[0], self.loss_weights[0]),
            Segment("text", li, self.text.num_tokens, CLASSIFICATION, self.text.vocab_size,
                    self.mask_ratios[1], self.loss_weights[1]),
        )

    @staticmethod
    def split(x: Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]):
        """``x -> (image, text)`` for dict or tuple input."""
        if isinstance(x, Mapping):
            return x["image"], x["text"]
        image, text = x
        return image, text

    def embed(self, x) -> torch.Tensor:
        """``x -> [N, L_img + T, D]``."""
        image, text = self.split(x)
        return torch.cat([self.image.embed(image) + self.types[0],
                          self.text.embed(text) + self.types[1]], dim=1)

    def embed_tokens(self, x) -> torch.Tensor:
        """``x -> [N, L_img + T, D]`` without positions or type vectors (content only)."""
        image, text = self.split(x)
        return torch.cat([self.image.embed_tokens(image), self.text.embed_tokens(text)], dim=1)

    def add_position(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, L_img + T, D]`` → each part + its sub-tokenizer's positions + its type."""
        image, text = tokens.split([self.image.num_tokens, self.text.num_tokens], dim=1)
        return torch.cat([self.image.add_position(image) + self.types[0],
                          self.text.add_position(text) + self.types[1]], dim=1)

    def patchify(self, x) -> Dict[str, torch.Tensor]:
        image, text = self.split(x)
        return {"image": self.image.patchify(image), "text": self.text.patchify(text)}

    def unpatchify(self, p: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"image": self.image.unpatchify(p["image"]), "text": self.text.unpatchify(p["text"])}

    def targets(self, x) -> Dict[str, torch.Tensor]:
        return self.patchify(x)

    def padding(self, x) -> Optional[torch.Tensor]:
        """``[N, L_img + T]`` bool, True at text pads; None if the text has no ``pad_id``."""
        image, text = self.split(x)
        pad = self.text.padding(text)  # [N, T] or None
        if pad is None:
            return None
        return torch.cat([pad.new_zeros(pad.shape[0], self.image.num_tokens), pad], dim=1)

    def embedding_table(self, name: str = "text") -> torch.Tensor:
        """The text embedding weight ``E [V, D]`` (read by a tied output layer)."""
        return self.text.embedding_table(name)

    def position_embedding(self, dim: int, learnable: bool = False) -> nn.Module:
        """Decoder positions: sub-tokenizer layouts at width ``dim`` + new type vectors."""
        return SegmentPositionEmbedding(
            [self.image.position_embedding(dim, learnable),
             self.text.position_embedding(dim, learnable)], dim)
