"""Tokenizers: raw input → tokens ``[N, L, D]`` and the per-token reconstruction target.

Every tokenizer shares one small interface, so the MAE (``problems/mae.py``) never
looks at the modality:

- ``embed(x) -> [N, L, D]``: token embeddings **including** position embeddings
  (and modality-type embeddings for multimodal input).
- ``patchify(x)`` / ``unpatchify(p)``: exact round trip between raw input and the
  per-token target (``[N, L, patch_dim]`` floats for regression, ``[N, L]`` ids
  for classification; a dict of those for multimodal input).
- ``targets(x) -> {segment name: target}``: ``patchify`` keyed by segment.
- ``segments``: contiguous token ranges of one modality, each with its target kind
  (``"regression"`` | ``"classification"``), target width (``patch_dim``: values per
  token, or vocabulary size), optional own mask ratio and a loss weight.
- ``add_position(tokens)``: ``[N, L, D] -> [N, L, D]``, adds exactly the positions
  (and types) ``embed`` adds — used to place mask tokens at the encoder width.
- ``position_embedding(dim)``: a fresh module adding the same position layout at
  another width (the MAE decoder's positions, plus new modality types if any).
- ``num_tokens``, ``embed_dim``, ``patch_dim``, ``target_kind`` (single-segment
  tokenizers; the multimodal one reports per segment).
- ``padding(x) -> [N, L] bool | None``: True at padding tokens (never visible, no
  loss; see ``problems/mae.py``). None unless a ``DiscreteTokenizer`` has a ``pad_id``.
- ``embedding_table(name) -> [V, D]`` (discrete segments only): the input embedding
  weight, which a tied output layer reuses.

Input conventions (channels first, like ``torch.nn.Conv*``):

=================  ==========================  =================================
tokenizer          input ``x``                 token ``i`` / target
=================  ==========================  =================================
ImageTokenizer     ``[N, C, H, W]`` float      ``p×p×C`` pixels, row-major grid
SequenceTokenizer  ``[N, C, T]`` float         ``p×C`` values of a time window
TabularTokenizer   ``[N, F]`` float            one feature (``patch_dim = 1``)
DiscreteTokenizer  ``[N, T]`` long             one id (CE over ``vocab_size``)
MultimodalTok.     ``{"image": [N,C,H,W],      ``[image patches ; text tokens]``
                   "text": [N, T] long}``      (``problems/multimodal.py``)
=================  ==========================  =================================
"""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from problems.pos_embed import PositionEmbedding

__all__ = [
    "Segment",
    "Tokenizer",
    "ImageTokenizer",
    "SequenceTokenizer",
    "TabularTokenizer",
    "DiscreteTokenizer",
]

REGRESSION = "regression"
CLASSIFICATION = "classification"


@dataclass(frozen=True)
class Segment:
    """A contiguous range ``[start, start + length)`` of tokens of one modality.

    Attributes:
        name: key of this segment in ``targets``/predictions (e.g. ``"image"``).
        start: first token index in the full sequence.
        length: number of tokens.
        kind: ``"regression"`` (MSE on values) or ``"classification"`` (CE on ids).
        patch_dim: target width per token (values) or vocabulary size (classes).
        mask_ratio: this segment's own mask ratio, or None to use the model's.
        loss_weight: weight of this segment's loss in the total.
    """

    name: str
    start: int
    length: int
    kind: str
    patch_dim: int
    mask_ratio: Optional[float] = None
    loss_weight: float = 1.0

    @property
    def stop(self) -> int:
        return self.start + self.length


class Tokenizer(nn.Module):
    """Base class of single-modality tokenizers (one segment, one position table).

    Subclasses set ``self.pos`` (a ``PositionEmbedding``), ``self.grid``,
    ``embed_dim``, ``patch_dim``, ``target_kind``, ``name`` and implement
    ``patchify``, ``unpatchify`` and ``_embed_patches`` (target → token, no position).
    """

    name: str = "tokens"
    target_kind: str = REGRESSION

    def __init__(self, embed_dim: int, grid: Sequence[int], patch_dim: int, learnable_pos: bool):
        super().__init__()
        self.embed_dim = embed_dim
        self.grid = tuple(grid)
        self.patch_dim = patch_dim
        self.pos = PositionEmbedding(embed_dim, self.grid, learnable=learnable_pos)
        self.num_tokens = self.pos.num_tokens

    @property
    def segments(self) -> Tuple[Segment, ...]:
        return (Segment(self.name, 0, self.num_tokens, self.target_kind, self.patch_dim),)

    def embed(self, x) -> torch.Tensor:
        """Tokens with position embedding: ``x -> [N, L, D]``."""
        return self.add_position(self.embed_tokens(x))

    def embed_tokens(self, x) -> torch.Tensor:
        """Tokens without position embedding: ``x -> [N, L, D]`` (content only)."""
        return self._embed_patches(self.patchify(x))

    def add_position(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [N, L, D] -> tokens + P`` with this tokenizer's own position table."""
        return self.pos(tokens)

    def targets(self, x) -> Dict[str, torch.Tensor]:
        """Reconstruction target keyed by segment name."""
        return {self.name: self.patchify(x)}

    def padding(self, x) -> Optional[torch.Tensor]:
        """``[N, L]`` bool, True at padding tokens; None: no padding."""
        return None

    def position_embedding(self, dim: int, learnable: bool = False) -> nn.Module:
        """A new position embedding with this layout at width ``dim``."""
        return PositionEmbedding(dim, self.grid, learnable=learnable)

    def _embed_patches(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def patchify(self, x):
        raise NotImplementedError

    def unpatchify(self, p):
        raise NotImplementedError


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _positive(owner: str, **values) -> None:
    """Each value must be an integer >= 1 (a named ``ValueError`` otherwise)."""
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {k} must be an integer >= 1, got {v!r}")


def _check_input(owner: str, x, layout: str, expected: Sequence[Optional[int]],
                 channel_dim: Optional[int] = None) -> None:
    """``x`` must be a tensor of shape ``expected`` (``None`` = any size) in ``layout``
    (e.g. ``"[N, C, H, W]"``); the error names expected and got, with a channels-last
    hint when the channel count sits in the last dimension instead."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: expected a tensor {layout}, got {type(x).__name__}")
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == g for e, g in zip(expected, shape))
    if ok:
        return
    want = "[" + ", ".join("N" if e is None else str(e) for e in expected) + "]"
    msg = f"{owner}: expected input {layout} = {want}, got {list(shape)}"
    if channel_dim is not None and len(shape) == len(expected):
        c = expected[channel_dim]
        if shape[-1] == c and shape[channel_dim] != c:
            perm = (0, len(shape) - 1) + tuple(range(1, len(shape) - 1))
            msg += f" — it looks channels-last; pass x.permute{perm}"
        elif shape[channel_dim] != c:
            msg += f" ({shape[channel_dim]} channels, the tokenizer has {c})"
    raise ValueError(msg)


class ImageTokenizer(Tokenizer):
    """Non-overlapping ``p×p`` patches of a ``C``-channel image (RGB, multispectral).

    ``embed``: ``Linear(p·p·C, D)`` on the flattened patch (equal to a stride-``p``
    convolution) + fixed 2-D sin-cos position embedding over the ``H/p × W/p`` grid.

    Args:
        image_size: ``H`` or ``(H, W)``; divisible by ``patch_size``.
        patch_size: ``p``.
        in_chans: ``C``.
        embed_dim: ``D``.
        learnable_pos: learnable position table (initialised with sin-cos).
    """

    name = "image"
    target_kind = REGRESSION

    def __init__(self, image_size, patch_size: int, in_chans: int, embed_dim: int,
                 learnable_pos: bool = False):
        h, w = _pair(image_size)
        _positive("ImageTokenizer", height=h, width=w, patch_size=patch_size, in_chans=in_chans,
                  embed_dim=embed_dim)
        if h % patch_size or w % patch_size:
            raise ValueError(f"image {h}x{w} not divisible by patch {patch_size}")
        self.image_size, self.patch_size, self.in_chans = (h, w), patch_size, in_chans
        super().__init__(embed_dim, (h // patch_size, w // patch_size),
                         patch_size * patch_size * in_chans, learnable_pos)
        self.proj = nn.Linear(self.patch_dim, embed_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [N, C, H, W] -> [N, L, p·p·C]``, patch entries ordered ``(row, col, c)``."""
        _check_input("ImageTokenizer", x, "[N, C, H, W]", (None, self.in_chans) + self.image_size, 1)
        n, c, _, _ = x.shape
        (gh, gw), p = self.grid, self.patch_size
        x = x.reshape(n, c, gh, p, gw, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # [N, gh, gw, p, p, C]
        return x.reshape(n, gh * gw, p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, L, p·p·C] -> [N, C, H, W]`` (inverse of ``patchify``)."""
        n = patches.shape[0]
        (gh, gw), p, c = self.grid, self.patch_size, self.in_chans
        x = patches.reshape(n, gh, gw, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # [N, C, gh, p, gw, p]
        return x.reshape(n, c, gh * p, gw * p)

    def _embed_patches(self, p: torch.Tensor) -> torch.Tensor:
        return self.proj(p)  # [N, L, D]


class SequenceTokenizer(Tokenizer):
    """Windows of ``p`` time steps of a ``C``-channel series (time series, speech).

    ``embed``: ``Linear(p·C, D)`` + fixed 1-D sin-cos positions over ``T/p`` tokens.

    Args:
        length: ``T``; divisible by ``patch_length``.
        patch_length: ``p``.
        in_chans: ``C``.
        embed_dim: ``D``.
        learnable_pos: learnable position table.
    """

    name = "sequence"
    target_kind = REGRESSION

    def __init__(self, length: int, patch_length: int, in_chans: int, embed_dim: int,
                 learnable_pos: bool = False):
        _positive("SequenceTokenizer", length=length, patch_length=patch_length, in_chans=in_chans,
                  embed_dim=embed_dim)
        if length % patch_length:
            raise ValueError(f"length {length} not divisible by patch {patch_length}")
        self.length, self.patch_length, self.in_chans = length, patch_length, in_chans
        super().__init__(embed_dim, (length // patch_length,), patch_length * in_chans,
                         learnable_pos)
        self.proj = nn.Linear(self.patch_dim, embed_dim)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [N, C, T] -> [N, L, p·C]``, entries ordered ``(step, channel)``."""
        _check_input("SequenceTokenizer", x, "[N, C, T]", (None, self.in_chans, self.length), 1)
        n, c, _ = x.shape
        x = x.reshape(n, c, self.num_tokens, self.patch_length).permute(0, 2, 3, 1)
        return x.reshape(n, self.num_tokens, self.patch_dim)  # [N, L, p·C]

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, L, p·C] -> [N, C, T]``."""
        n = patches.shape[0]
        x = patches.reshape(n, self.num_tokens, self.patch_length, self.in_chans)
        return x.permute(0, 3, 1, 2).reshape(n, self.in_chans, self.length)

    def _embed_patches(self, p: torch.Tensor) -> torch.Tensor:
        return self.proj(p)


class TabularTokenizer(Tokenizer):
    """One token per feature, a linear embedding of its scalar value, plus position.

    Two forms (``embedding``):

    - ``"per_feature"`` (default): ``token_f = x_f · w_f + b_f`` with its own
      ``w_f, b_f ∈ R^D`` per feature (parameters ``weight``, ``bias`` ``[F, D]``;
      ``w ~ N(0, 0.02²)``, ``b = 0``); ``2·F·D`` parameters.
    - ``"shared"``: ``token_f = x_f · w + b``, one ``w, b ∈ R^D`` for every feature
      (``proj = Linear(1, D)``, xavier-uniform ``w``, ``b = 0``); ``2·D``
      parameters, whatever ``F``. The official MetaMAE code's form: a
      ``Conv1d(1, D, kernel_size=1)`` over the ``[N, 1, F]`` row, xavier-initialised
      (it keeps Conv1d's default bias init, ``U(−1, 1)``; ours is 0, as for the
      image and sequence tokenizers).

    A 1-D sin-cos position over the feature index is added in both (in the shared
    form it is what tells features apart; it also locates a mask token in the
    decoder). Target: the scalar itself (``patch_dim = 1``).

    Args:
        num_features: ``F``.
        embed_dim: ``D``.
        learnable_pos: learnable position table.
        embedding: ``"per_feature"`` or ``"shared"``.
    """

    name = "tabular"
    target_kind = REGRESSION
    EMBEDDINGS = ("per_feature", "shared")

    def __init__(self, num_features: int, embed_dim: int, learnable_pos: bool = False,
                 embedding: str = "per_feature"):
        _positive("TabularTokenizer", num_features=num_features, embed_dim=embed_dim)
        if embedding not in self.EMBEDDINGS:
            raise ValueError(f"TabularTokenizer: embedding must be one of {self.EMBEDDINGS}, "
                             f"got {embedding!r}")
        super().__init__(embed_dim, (num_features,), 1, learnable_pos)
        self.embedding = embedding
        if embedding == "shared":
            self.proj = nn.Linear(1, embed_dim)  # weight [D, 1], bias [D]
            nn.init.xavier_uniform_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.weight = nn.Parameter(torch.randn(num_features, embed_dim) * 0.02)  # [F, D]
            self.bias = nn.Parameter(torch.zeros(num_features, embed_dim))  # [F, D]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [N, F] -> [N, F, 1]``."""
        _check_input("TabularTokenizer", x, "[N, F]", (None, self.grid[0]))
        return x.unsqueeze(-1)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, F, 1] -> [N, F]``."""
        return patches.squeeze(-1)

    def _embed_patches(self, p: torch.Tensor) -> torch.Tensor:
        if self.embedding == "shared":
            return self.proj(p)  # [N, F, 1] -> [N, F, D]: x_f · w + b
        return p * self.weight + self.bias  # [N, F, 1] * [F, D] -> [N, F, D]


class DiscreteTokenizer(Tokenizer):
    """Sequences of ids (text, DNA, proteins): embedding table + 1-D positions.

    Target: the id itself; the MAE predicts ``vocab_size`` logits per token and
    uses cross-entropy (``target_kind = "classification"``, ``patch_dim = vocab_size``).

    With ``pad_id`` set, tokens equal to it are padding (``padding(x) = x == pad_id``):
    the MAE never shows them to the encoder and gives them no loss. Their embedding
    row is an ordinary one (no ``padding_idx``), so ``pad_id=None`` changes nothing.

    Args:
        vocab_size: ``V``.
        length: ``T`` (tokens per sample).
        embed_dim: ``D``.
        learnable_pos: learnable position table.
        name: segment name (``"tokens"``; the multimodal tokenizer uses ``"text"``).
        pad_id: id of the padding token, or None (no padding).
    """

    target_kind = CLASSIFICATION

    def __init__(self, vocab_size: int, length: int, embed_dim: int,
                 learnable_pos: bool = False, name: str = "tokens",
                 pad_id: Optional[int] = None):
        _positive("DiscreteTokenizer", vocab_size=vocab_size, length=length, embed_dim=embed_dim)
        if pad_id is not None and not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id {pad_id} outside the vocabulary [0, {vocab_size})")
        super().__init__(embed_dim, (length,), vocab_size, learnable_pos)
        self.name = name
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.table = nn.Embedding(vocab_size, embed_dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Ids are their own target: ``[N, T] -> [N, T]`` (long)."""
        _check_input(f"DiscreteTokenizer {self.name!r}", x, "[N, T]", (None, self.grid[0]))
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"DiscreteTokenizer {self.name!r}: expected integer token ids, got {x.dtype}")
        return x

    def unpatchify(self, ids: torch.Tensor) -> torch.Tensor:
        """``[N, T] -> [N, T]``; pass ``logits.argmax(-1)`` to decode predictions."""
        return ids

    def padding(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``x: [N, T] -> [N, T]`` bool (``x == pad_id``), or None without ``pad_id``."""
        return None if self.pad_id is None else x == self.pad_id

    def embedding_table(self, name: Optional[str] = None) -> torch.Tensor:
        """The input embedding weight ``E [V, D]`` (read by a tied output layer)."""
        if name is not None and name != self.name:
            raise KeyError(f"no discrete segment {name!r} (this one is {self.name!r})")
        return self.table.weight

    def _embed_patches(self, ids: torch.Tensor) -> torch.Tensor:
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"DiscreteTokenizer {self.name!r}: token id(s) outside the vocabulary "
                             f"[0, {self.vocab_size}): e.g. {ids[bad][:5].tolist()}")
        return self.table(ids)  # [N, T, D]
