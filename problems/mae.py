"""Masked autoencoder over any tokenizer: tokenize → mask → encode → decode → loss.

Reads top to bottom like the MAE reference model::

    tokens = tokenizer.embed(x)                       # [N, L, D]   (+ positions)
    kept, mask, ids_restore = random_masking(tokens)  # [N, K, D], [N, L], [N, L]
    latent = encoder(drop_in([cls ; kept]))           # [N, 1+K, D]
    pred = decoder(unshuffle([latent ; mask tokens])) # [N, L, patch_dim] per segment
    loss = Σ_s w_s · Σ_{i∈s} ℓ_i m_i a_i / #masked_s  # ℓ: MSE per token or CE

With ``decoder_depth=0`` (the *linear decoder* of DABS 2.0 / MetaMAE's "decoder
size 0") the masked tokens cannot be dropped from the encoder: a per-token linear
head on ``[latent ; mask tokens]`` would predict every masked token from its mask
token and position alone, and the encoder would get no reconstruction gradient.
The encoder then sees the whole sequence, masked tokens replaced by a learned
mask token at their position (BERT style), and the head reads every output::

    seq = where(mask, mask_token + P, tokens)         # [N, L, D]
    latent = encoder(drop_in([cls ; seq]))            # [N, 1+L, D]
    pred = Linear(latent[:, 1:])                      # [N, L, patch_dim]

``drop_in`` is dropout on the encoder's input tokens (``input_dropout``, default 0:
the identity); the encoder's and the decoder's blocks have their own dropout rates
(``dropout``, ``decoder_dropout``; MAE and MetaMAE use none in the decoder).

``m_i = 1`` for masked tokens, ``a_i`` optional per-token weights (MLO-MAE: the
masking network's probability of token ``i``), ``w_s`` per-segment loss weights
(M3AE: image 1.0, text 0.5).

Padding (M3AE text): the tokenizer reports pads from ``x`` itself (``padding(x)``,
e.g. ``DiscreteTokenizer(pad_id=0)``), so every ``forward_loss`` caller (MetaMAE
support/query too) skips them unasked. Pads are never visible: the returned mask is 1
there (never fed to the encoder; a linear decoder sees only mask tokens), but the loss
sets ``m_i = 0`` — zero weight, not in ``#masked_s``. The ratio counts real tokens
(fixed-shape rule: ``random_masking``).

Weight tying (``tie_embeddings=True``, MetaMAE/DABS): the logits of a discrete segment
are ``proj(h) @ Eᵀ + b`` with ``E`` the tokenizer's input embedding table, looked up
at call time so the one parameter also works under ``functional_call``.

Masking keeps the ``K`` tokens with the LOWEST scores. Uniform noise gives MAE's
random masking; the MLO-MAE masking network's probabilities as scores mask the
highest-probability tokens (deterministic top-k).

The model is a plain ``nn.Module`` with no cached parameter-derived tensors, so it
runs under ``torch.func.functional_call(model, params, args)`` and in float64.
Second-order use (MetaMAE latent adaptation) needs ``math_attention()`` or
``attn_impl="math"`` (see ``problems/transformer.py``).
"""

from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from problems.tokenizers import CLASSIFICATION
from problems.transformer import Transformer

__all__ = ["num_masked", "random_masking", "MaskedAutoencoder", "TiedLogits"]

Ratio = Union[float, Sequence[float]]


def num_masked(length: int, ratio: float) -> int:
    """Number of masked tokens, counted as MAE does: ``L − int(L · (1 − ratio))``.

    MAE keeps ``len_keep = int(L · (1 − r))`` tokens (e.g. ``L=10, r=0.33`` → 6 kept,
    4 masked); the same floating-point expression is used here so counts agree
    with the reference implementation in every case.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return length - int(length * (1 - ratio))


def random_masking(
    x: torch.Tensor,
    mask_ratio: Ratio,
    scores: Optional[torch.Tensor] = None,
    lengths: Optional[Sequence[int]] = None,
    padding: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the lowest-score tokens of each segment, mask the rest.

    Within segment ``s`` (``lengths[s]`` consecutive tokens) ``num_masked(L_s, r_s)``
    tokens with the highest scores are masked. Ties are broken by position (stable
    sort). Kept tokens are ordered segment by segment, by increasing score.

    Args:
        x: tokens ``[N, L, D]``.
        mask_ratio: one ratio, or one per segment.
        scores: ``[N, L]``; None → uniform noise (MAE random masking). Not
            differentiated (selection is discrete); pass probabilities as
            ``token_weights`` to the loss for a gradient.
        lengths: segment lengths summing to ``L``; None → one segment.
        padding: ``[N, L]`` bool, True at padding tokens; None → no padding. Pads rank
            after every real token of their segment, so they are never kept. The kept
            count must be one ``K_s`` for the whole batch (the encoder input is a
            fixed-shape gather and ``problems.transformer`` has no key-padding mask, so
            per-sample counts cannot be padded out): ``K_s = min_n (R_n −
            num_masked(R_n, r_s))``, ``R_n`` = real tokens of sample ``n`` in segment
            ``s``. The shortest sample gets exactly ``r_s``; longer ones mask more real
            tokens (``r_s`` is a lower bound; batches bucketed by length get exactly
            ``r_s``). A sample with only pads in ``s`` makes ``K_s = 0``.

    Returns:
        ``x_kept [N, K, D]``, ``mask [N, L]`` (1 = masked or pad, 0 = kept, dtype of ``x``),
        ``ids_restore [N, L]`` with ``cat([x_kept, masked], 1).gather(ids_restore)``
        back in the original order.
    """
    n, length, dim = x.shape
    lengths = [length] if lengths is None else [int(v) for v in lengths]
    if sum(lengths) != length:
        raise ValueError(f"segment lengths {lengths} do not sum to {length}")
    ratios = [float(mask_ratio)] * len(lengths) if isinstance(mask_ratio, (int, float)) \
        else [float(r) for r in mask_ratio]
    if len(ratios) != len(lengths):
        raise ValueError("one mask ratio per segment expected")
    if scores is None:
        scores = torch.rand(n, length, device=x.device)
    elif not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n, length):
        got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"masking scores must have shape [N, L] = [{n}, {length}] (one per token), "
                         f"got {got}")
    scores = scores.detach()
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError(f"masking scores contain NaN ({int(torch.isnan(scores).sum())} of "
                         f"{scores.numel()}): top-k masking needs comparable scores")

    keep, drop, start = [], [], 0
    for seg_len, ratio in zip(lengths, ratios):
        seg = slice(start, start + seg_len)
        order = torch.argsort(scores[:, seg], dim=1, stable=True)  # [N, L_s]
        if padding is None:
            n_keep = seg_len - num_masked(seg_len, ratio)
        else:  # pads last (stable: real tokens keep their score order); K_s from the batch
            pad = padding[:, seg].gather(1, order).to(torch.uint8)  # [N, L_s], sorted order
            order = order.gather(1, torch.argsort(pad, dim=1, stable=True))
            real = (seg_len - padding[:, seg].sum(1)).tolist()  # R_n
            n_keep = min((r - num_masked(r, ratio) for r in real),
                         default=seg_len - num_masked(seg_len, ratio))
        order = order + start
        keep.append(order[:, :n_keep])
        drop.append(order[:, n_keep:])
        start += seg_len
    ids_keep = torch.cat(keep, dim=1)  # [N, K]
    ids_shuffle = torch.cat([ids_keep] + drop, dim=1)  # [N, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]

    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [N, K, D]
    mask = torch.ones(n, length, dtype=x.dtype, device=x.device)
    mask[:, :ids_keep.shape[1]] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [N, L], 1 = masked
    return x_kept, mask, ids_restore


class TiedLogits(nn.Module):
    """Discrete-token output layer tied to the input table: ``proj(h) @ Eᵀ + b``.

    ``E [V, D]`` is passed to ``forward`` (not stored), so the embedding stays one
    parameter under one name and ``functional_call`` substitutes it everywhere.

    Args:
        in_dim: width of ``h`` (decoder width).
        embed_dim: ``D``; ``proj = Linear(in_dim, D)`` if different, else identity.
        vocab_size: ``V``.
        bias: learn ``b [V]`` (zeros at init).
    """

    def __init__(self, in_dim: int, embed_dim: int, vocab_size: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Identity() if in_dim == embed_dim else nn.Linear(in_dim, embed_dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def forward(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``h [N, L, in_dim]``, ``table [V, D]`` → logits ``[N, L, V]``."""
        return F.linear(self.proj(h), table, self.bias)


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder (CLS token) and a light Transformer decoder.

    Args:
        tokenizer: a tokenizer from ``problems.tokenizers``; its ``embed_dim`` is
            the encoder width ``D``.
        depth: encoder blocks.
        num_heads: encoder heads.
        mlp_ratio: encoder MLP ratio.
        decoder_dim: decoder width (ignored when ``decoder_depth == 0``).
        decoder_depth: decoder blocks; 0 = linear decoder: the encoder sees every
            token (masked ones as a mask token) and one ``Linear`` per segment maps
            each encoder output to its target (see the module docstring).
        decoder_heads: decoder heads.
        decoder_mlp_ratio: decoder MLP ratio (default: ``mlp_ratio``).
        mask_ratio: default ratio; used for segments without their own ratio.
        norm_pix: normalise each regression target token by its own mean and
            (unbiased) variance, ``(t − μ)/√(σ² + 1e-6)``, as in MAE.
        dropout: dropout in the encoder blocks (MLP and attention output projection).
        decoder_dropout: the same in the decoder blocks; default 0 (MAE; MetaMAE's
            Table 7 and official code: no dropout in the decoder). Before this setting
            existed the decoder used ``dropout``: pass ``decoder_dropout=dropout`` for that.
        input_dropout: dropout on the encoder's input ``[CLS ; tokens]`` (positions
            already added), in ``forward_encoder`` and ``features``; default 0 (the
            identity). The official MetaMAE code applies ``nn.Dropout(dropout)`` there
            with the encoder's rate (timm's ``pos_drop``).
        qkv_bias: bias in the attention QKV projections of encoder and decoder
            (default True; the official MetaMAE code's timm ``Block`` has none).
        attn_impl: ``"fused"``, ``"math"`` or None for every attention layer.
        learnable_decoder_pos: learnable decoder position table (unused with a
            linear decoder: mask tokens take the tokenizer's own positions).
        tie_embeddings: discrete (classification) segments predict ``proj(h) @ Eᵀ + b``
            with the tokenizer's embedding table ``E [V, D]`` (``tokenizer.
            embedding_table(name)``); ``proj = Linear(decoder_dim, D)`` if the widths
            differ, else identity. Off by default; no effect without such segments.
        tied_bias: the ``b [V]`` of a tied output layer.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        decoder_dim: int = 128,
        decoder_depth: int = 4,
        decoder_heads: int = 4,
        decoder_mlp_ratio: Optional[float] = None,
        mask_ratio: float = 0.75,
        norm_pix: bool = False,
        dropout: float = 0.0,
        attn_impl: Optional[str] = None,
        learnable_decoder_pos: bool = False,
        tie_embeddings: bool = False,
        tied_bias: bool = True,
        decoder_dropout: float = 0.0,
        input_dropout: float = 0.0,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.segments = tuple(tokenizer.segments)
        self.embed_dim = dim = tokenizer.embed_dim
        self.num_tokens = tokenizer.num_tokens
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix
        for seg in self.segments:
            if norm_pix and seg.kind != CLASSIFICATION and seg.patch_dim < 2:
                raise ValueError(f"norm_pix needs >= 2 values per token ({seg.name})")

        # --- encoder -------------------------------------------------------------
        for key, rate in (("dropout", dropout), ("decoder_dropout", decoder_dropout),
                          ("input_dropout", input_dropout)):
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
                raise ValueError(f"MaskedAutoencoder: {key} must be a number in [0, 1), got {rate!r}")
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.input_drop = nn.Dropout(input_dropout)  # no parameters: state_dict unchanged
        self.encoder = Transformer(dim, depth, num_heads, mlp_ratio, dropout,
                                   attn_impl=attn_impl, qkv_bias=qkv_bias)

        # --- decoder -------------------------------------------------------------
        self.linear_decoder = decoder_depth == 0
        if self.linear_decoder:
            decoder_dim = dim
            self.decoder_embed = nn.Identity()
            self.decoder = nn.Identity()
        else:
            self.decoder_embed = nn.Linear(dim, decoder_dim)
            self.decoder = Transformer(decoder_dim, decoder_depth, decoder_heads,
                                       decoder_mlp_ratio or mlp_ratio, decoder_dropout,
                                       attn_impl=attn_impl, qkv_bias=qkv_bias)
        self.decoder_dim = decoder_dim
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.decoder_pos = None if self.linear_decoder else \
            tokenizer.position_embedding(decoder_dim, learnable_decoder_pos)
        self.heads = nn.ModuleDict({s.name: TiedLogits(decoder_dim, dim, s.patch_dim, tied_bias)
                                    if tie_embeddings and s.kind == CLASSIFICATION
                                    else nn.Linear(decoder_dim, s.patch_dim)
                                    for s in self.segments})
        for s in self.segments:  # the table a tied head reads must exist, [V, D]
            if isinstance(self.heads[s.name], TiedLogits):
                table = getattr(tokenizer, "embedding_table", None)
                if table is None or tuple(table(s.name).shape) != (s.patch_dim, dim):
                    raise ValueError(f"tie_embeddings: tokenizer has no [{s.patch_dim}, {dim}] "
                                     f"embedding_table({s.name!r})")
        for m in [self.decoder_embed, *self.heads.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # --- tokens ------------------------------------------------------------------
    def patch_embeddings(self, x, position: bool = True) -> torch.Tensor:
        """Tokens + position (+ type) embeddings, no masking: ``[N, L, D]``; with
        ``position=False`` the tokens' content part alone (no position or type)."""
        return self.tokenizer.embed(x) if position else self.tokenizer.embed_tokens(x)

    def padding(self, x) -> Optional[torch.Tensor]:
        """``[N, L]`` bool, True at padding tokens (``tokenizer.padding``), or None."""
        fn = getattr(self.tokenizer, "padding", None)
        return None if fn is None else fn(x)

    def segment_ratios(self, mask_ratio=None) -> Tuple[float, ...]:
        """Per-segment ratios: explicit float → all segments; dict → by name;
        None → each segment's own ratio, else ``self.mask_ratio``."""
        out = []
        if isinstance(mask_ratio, Mapping):
            unknown = sorted(set(mask_ratio) - {seg.name for seg in self.segments}, key=str)
            if unknown:
                raise ValueError(f"mask_ratio names unknown segment(s) {unknown}; this MAE's "
                                 f"segments: {[seg.name for seg in self.segments]}")
        for seg in self.segments:
            if isinstance(mask_ratio, Mapping):
                r = mask_ratio.get(seg.name, seg.mask_ratio)
            else:
                r = mask_ratio
            if r is None:
                r = seg.mask_ratio if seg.mask_ratio is not None else self.mask_ratio
            out.append(float(r))
        return tuple(out)

    # --- encoder -----------------------------------------------------------------
    def forward_encoder(self, x, mask_ratio=None, scores: Optional[torch.Tensor] = None):
        """Returns ``latent [N, 1+K, D]`` (CLS first; ``[N, 1+L, D]`` with a linear
        decoder), ``mask [N, L]`` (1 = masked or pad) and ``ids_restore [N, L]``."""
        tokens = self.patch_embeddings(x)  # [N, L, D]
        kept, mask, ids_restore = random_masking(
            tokens, self.segment_ratios(mask_ratio), scores, [s.length for s in self.segments],
            self.padding(x))
        if self.linear_decoder:  # every position enters, masked ones as mask token + position
            filler = self.tokenizer.add_position(self.mask_token.to(tokens.dtype).expand_as(tokens))
            kept = torch.where(mask.unsqueeze(-1) > 0, filler, tokens)  # [N, L, D]
        cls = self.cls_token.to(kept.dtype).expand(kept.shape[0], -1, -1)  # [N, 1, D]
        latent = self.encoder(self.input_drop(torch.cat([cls, kept], dim=1)))  # [N, 1+K, D] (or 1+L)
        return latent, mask, ids_restore

    # --- decoder -----------------------------------------------------------------
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor):
        """``latent [N, 1+K, D]`` (``[N, 1+L, D]`` with a linear decoder) → predictions.

        Returns:
            ``[N, L, patch_dim]`` (values or logits) for a single-segment tokenizer,
            else ``{segment name: [N, L_s, patch_dim_s]}``.
        """
        if self.linear_decoder:
            seq = latent[:, 1:]  # [N, L, D], already in token order
        else:
            h = self.decoder_embed(latent)  # [N, 1+K, Dd]
            n, k1, dd = h.shape
            n_mask = ids_restore.shape[1] - (k1 - 1)
            masks = self.mask_token.to(h.dtype).expand(n, n_mask, -1)  # [N, L-K, Dd]
            seq = torch.cat([h[:, 1:], masks], dim=1)  # [N, L, Dd] (shuffled order)
            seq = torch.gather(seq, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # unshuffle
            seq = torch.cat([h[:, :1], self.decoder_pos(seq)], dim=1)  # [N, 1+L, Dd]
            seq = self.decoder(seq)[:, 1:]  # [N, L, Dd]
        pred = {s.name: self._head(s.name, seq[:, s.start:s.stop]) for s in self.segments}
        return pred[self.segments[0].name] if len(self.segments) == 1 else pred

    def _head(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """``h [N, L_s, Dd] -> [N, L_s, patch_dim]``; a tied head reads ``E`` now."""
        head = self.heads[name]
        if isinstance(head, TiedLogits):
            return head(h, self.tokenizer.embedding_table(name))
        return head(h)

    # --- loss --------------------------------------------------------------------
    def token_losses(self, x, pred) -> torch.Tensor:
        """Per-token reconstruction loss ``ℓ [N, L]`` (no masking, no weights).

        Regression: mean squared error over the token's values (``norm_pix`` target
        if set). Classification: cross-entropy of the logits against the id.
        """
        targets = self.tokenizer.targets(x)
        if not isinstance(pred, Mapping):
            pred = {self.segments[0].name: pred}
        losses = []
        for seg in self.segments:
            p, t = pred[seg.name], targets[seg.name]
            if seg.kind == CLASSIFICATION:  # p: [N, L_s, V], t: [N, L_s]
                losses.append(F.cross_entropy(p.flatten(0, 1), t.flatten(), reduction="none")
                              .view(t.shape))
            else:  # p, t: [N, L_s, P]
                if self.norm_pix:
                    mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
                    t = (t - mean) / (var + 1e-6).sqrt()
                losses.append((p - t).pow(2).mean(dim=-1))
        return torch.cat(losses, dim=1)  # [N, L]

    def forward_loss(self, x, pred, mask: torch.Tensor,
                     token_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Σ_s w_s · Σ_{i∈s} ℓ_i m_i a_i / max(Σ_{i∈s} m_i, 1)`` (sums over the batch too).

        Padding tokens (``self.padding(x)``) get ``m_i = 0`` here whatever ``mask``
        says: zero loss, not counted — the loss is a mean over masked real tokens.

        Args:
            x: raw input (targets are recomputed from it).
            pred: output of ``forward_decoder``.
            mask: ``[N, L]``, 1 where the loss counts (masked tokens; any support or
                query selection works).
            token_weights: optional ``[N, L]`` multipliers ``a_i`` (not normalised).
        """
        per_token = self.token_losses(x, pred) * mask  # [N, L]
        if token_weights is not None:
            per_token = per_token * token_weights
        pad = self.padding(x)  # [N, L] bool or None
        if pad is not None:
            mask = mask.masked_fill(pad, 0)
            per_token = per_token.masked_fill(pad, 0)  # exact zero (and zero gradient) at pads
        total = per_token.new_zeros(())
        for seg in self.segments:
            count = mask[:, seg.start:seg.stop].sum().clamp_min(1.0)
            total = total + seg.loss_weight * per_token[:, seg.start:seg.stop].sum() / count
        return total

    def forward(self, x, mask_ratio=None, scores: Optional[torch.Tensor] = None,
                token_weights: Optional[torch.Tensor] = None):
        """Returns ``(loss, pred, mask)``; see ``forward_encoder``/``forward_loss``."""
        latent, mask, ids_restore = self.forward_encoder(x, mask_ratio, scores)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(x, pred, mask, token_weights), pred, mask

    # --- evaluation --------------------------------------------------------------
    def features(self, x, pool: str = "cls") -> torch.Tensor:
        """Encoder features without masking: CLS token or mean of tokens, ``[N, D]``.
        Pads are encoded and pooled here too (the encoder has no key-padding mask)."""
        tokens = self.patch_embeddings(x)  # [N, L, D]
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        h = self.encoder(self.input_drop(torch.cat([cls, tokens], dim=1)))  # [N, 1+L, D]
        if pool == "cls":
            return h[:, 0]
        if pool == "mean":
            return h[:, 1:].mean(dim=1)
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
