"""Stage-2 math: per-head instruction-attention statistics → coefficients α → per-weight scales.

Pure functions on tensors; the forward passes that produce attention maps live in :mod:`rain_hf.features`.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def attention_mass(attn: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention mass each query puts on the keys of ``key_mask``.

    Args:
        attn: attention probabilities A [B, H, T, T] (rows are queries, columns keys).
        key_mask: [B, T] bool, the instruction tokens I.

    Returns:
        [B, H, T]: Σ_{τ ∈ I} A[b, h, t, τ].
    """
    return torch.einsum("bhqk,bk->bhq", attn.float(), key_mask.float())


def masked_query_mean(mass: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean of ``mass`` over the queries of ``query_mask``.

    Args:
        mass: [B, H, T]; query_mask: [B, T] bool.

    Returns:
        per-sample means [B, H] (0 where a sample has no such query) and a [B] bool of samples that have one.
    """
    q = query_mask.float()
    count = q.sum(dim=1)
    total = torch.einsum("bhq,bq->bh", mass, q)
    valid = count > 0
    return total / count.clamp(min=1.0).unsqueeze(1), valid


def head_scores(alignment: torch.Tensor, leakage: torch.Tensor, rho: float) -> torch.Tensor:
    """Paper Eq. 14–15 before the box: g / H̃ with g = a − ρu and H̃ = 1 + u (any shape, elementwise)."""
    return (alignment - rho * leakage) / (1.0 + leakage)


def head_coefficients(
    alignment: torch.Tensor,
    leakage: torch.Tensor,
    rho: float,
    normalize: str,
    lo: float,
    hi: float,
) -> torch.Tensor:
    """Coefficients α [L, H] from alignment a [L, H] and leakage u [L, H].

    ``normalize="mean"`` divides the scores by their mean over all heads before the clip (raw attention masses
    are ≪ 1, so the literal form would clip nearly everything to the lower bound); ``"none"`` is the paper's
    literal α = clip(g / H̃, lo, hi).
    """
    scores = head_scores(alignment.double(), leakage.double(), rho)
    if normalize == "mean":
        mean = scores.mean()
        if not torch.isfinite(mean) or mean <= 0:
            logger.warning("Stage-2 scores have a non-positive mean (%.3g); using α = 1 for every head.", float(mean))
            scores = torch.ones_like(scores)
        else:
            scores = scores / mean
    elif normalize != "none":
        raise ValueError(f"normalize={normalize!r} is not 'mean' or 'none'")
    return scores.clamp(lo, hi).float()


def kv_coefficients(alpha: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """GQA: kv head g gets the mean α of the query heads h with h // (H / KV) == g.

    Args:
        alpha: [H] (one layer) or [L, H].

    Returns:
        [KV] or [L, KV].
    """
    heads = alpha.shape[-1]
    if heads % num_kv_heads:
        raise ValueError(f"{heads} query heads cannot be grouped over {num_kv_heads} kv heads")
    return alpha.reshape(*alpha.shape[:-1], num_kv_heads, heads // num_kv_heads).mean(dim=-1)


def weight_scale(kind: str, alpha: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The scale of one layer's module, broadcastable against its ΔW [out, in].

    Args:
        kind: ``"q"`` (rows of query head h get α_h), ``"kv"`` (rows of kv head g get the mean α of its query
            heads), ``"o"`` (input columns of head h get α_h) or ``"other"`` (the layer's mean α, e.g. the MLP).
        alpha: α [H] of the layer.

    Returns:
        [out, 1] for ``q``/``kv``, [1, in] for ``o``, a 0-d tensor for ``other``.
    """
    if kind == "q":
        return alpha.repeat_interleave(head_dim).unsqueeze(1)
    if kind == "kv":
        return kv_coefficients(alpha, num_kv_heads).repeat_interleave(head_dim).unsqueeze(1)
    if kind == "o":
        return alpha.repeat_interleave(head_dim).unsqueeze(0)
    if kind == "other":
        return alpha.mean()
    raise ValueError(f"unknown module kind {kind!r}")
