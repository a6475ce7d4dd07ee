"""Stage-2 math: per-head instruction-attention statistics → coefficients α → per-weight scales.

Pure functions on tensors; the forward passes that produce attention maps live in :mod:`rain_hf.features`.
"""

from __future__ import annotations

import torch


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
    """Paper Eq. 14–15 before the box: g / H̃ with g = a − ρu and H̃ = 1 + u (any shape, elementwise).

    Example:
        >>> head_scores(torch.tensor([0.3, 0.5]), torch.tensor([0.0, 0.25]), rho=0.5)
        tensor([0.3000, 0.3000])
    """
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
    are ≪ 1, so the literal form gives every α about the size of an attention mass, ≈ 0.05: λ about 20 times
    smaller); ``"none"`` is the paper's literal α = clip(g / H̃, lo, hi). Heads without a measurement (NaN: a
    sliding-window layer that never saw the instruction) stay out of the mean and get the measured heads' mean
    score, on the scale of the others: α = 1 (stage 1 alone) with ``"mean"``, the mean α of the measured heads
    with ``"none"`` (1 where no head was measured). Every head gets α = 1 when the mean score is not positive under
    ``"mean"`` (nothing to rank by), whatever the box.

    Example:
        >>> a, u = torch.tensor([[0.1, 0.3], [0.2, 0.6]]), torch.zeros(2, 2)
        >>> head_coefficients(a, u, rho=0.5, normalize="mean", lo=0.0, hi=2.0)  # mean score 0.3
        tensor([[0.3333, 1.0000],
                [0.6667, 2.0000]])
    """
    scores = head_scores(alignment.double(), leakage.double(), rho)
    unmeasured = torch.isnan(scores)
    mean = scores[~unmeasured].mean()
    if normalize == "mean":
        if not torch.isfinite(mean) or mean <= 0:
            return torch.ones_like(scores, dtype=torch.float32)  # coefficient_warning says so
        scores, fill = scores / mean, 1.0
    elif normalize == "none":
        # α = 1 would be ≈ 20 times the measured heads' α here (attention masses), not a neutral value
        measured = scores[~unmeasured].clamp(lo, hi)
        fill = float(measured.mean()) if measured.numel() else 1.0
    else:
        raise ValueError(f"normalize={normalize!r} is not 'mean' or 'none'")
    return scores.clamp(lo, hi).masked_fill(unmeasured, fill).float()


def coefficient_warning(
    alignment: torch.Tensor, leakage: torch.Tensor, rho: float, normalize: str, alpha: torch.Tensor,
    lo: float, hi: float,
) -> str | None:
    """Why the coefficients α [L, H] that :func:`head_coefficients` made from a, u [L, H] rank the heads poorly, or
    None: the mean-normalised scores have a non-positive mean (every α set to 1: stage 2 changed nothing), or most
    heads sit on a bound of the box (the mean is small against the spread of the scores, which happens when
    leakage outweighs alignment on many heads).
    """
    scores = head_scores(alignment.double(), leakage.double(), rho)
    measured = ~torch.isnan(scores)
    if not bool(measured.any()):
        return None  # nothing was measured: the caller names the sliding windows
    raw = scores[measured]
    mean = float(raw.mean())
    outside = float(((raw < lo) | (raw > hi)).float().mean())
    positive = float((raw > 0).float().mean())
    if normalize == "none" and outside > 0.5 and positive > 0.5:  # the literal form's box misses the raw scores
        low = float(raw.min())
        span = (f"they lie between {low:.3g} and {float(raw.max()):.3g}" if low >= 0 else
                f"the positive ones reach {float(raw.max()):.3g}; coef_min cannot go below 0")
        hint = f"coef_min / coef_max that suit the raw scores a − ρ·u ({span}), or coef_normalize='mean'"
    else:
        # the raw scores suit a box of their own only where they are mostly positive (the box starts at 0)
        hint = ", or ".join((["a smaller rho"] if rho > 0 else []) + (
            ["coef_normalize='none' with a box that suits the raw scores"] if normalize == "mean" and mean > 0 else
            ["calibration data whose responses attend to the instruction more than the thinking does"]))
    if normalize == "mean" and not mean > 0:
        return (f"stage 2: the head scores a − ρ·u have a non-positive mean ({mean:.3g}), so every head got α = 1 "
                f"and stage 2 changed nothing; try {hint}.")
    alpha = alpha[measured]
    at_bound = float(((alpha <= lo) | (alpha >= hi)).float().mean()) if alpha.numel() else 0.0
    if at_bound > 0.5:
        return (f"stage 2: {at_bound:.0%} of the heads' coefficients sit on a bound of [{lo:g}, {hi:g}], so they "
                f"hardly rank the heads; try {hint}.")
    return None


def kv_coefficients(alpha: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """GQA: kv head g gets the mean α of the query heads h with h // (H / KV) == g.

    Args:
        alpha: [H] (one layer) or [L, H].

    Returns:
        [KV] or [L, KV].

    Example:
        >>> kv_coefficients(torch.tensor([1.0, 3.0, 0.5, 1.5]), num_kv_heads=2)  # heads 0, 1 → kv 0; 2, 3 → kv 1
        tensor([2., 1.])
    """
    heads = alpha.shape[-1]
    if heads % num_kv_heads:
        raise ValueError(f"{heads} query heads cannot be grouped over {num_kv_heads} kv heads")
    return alpha.reshape(*alpha.shape[:-1], num_kv_heads, heads // num_kv_heads).mean(dim=-1)


def weight_scale(kind: str, alpha: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The scale of one layer's module, broadcastable against its ΔW [out, in].

    Args:
        kind: ``"q"`` (rows of query head h get α_h), ``"kv"`` (rows of kv head g get the mean α of its query
            heads), ``"qkv"`` (a fused [q | k | v] projection: its three row blocks as ``q``, ``kv``, ``kv``),
            ``"o"`` (input columns of head h get α_h) or ``"other"`` (the layer's mean α, e.g. the MLP).
        alpha: α [H] of the layer.

    Returns:
        [out, 1] for ``q``/``kv``/``qkv``, [1, in] for ``o``, a 0-d tensor for ``other``.
    """
    if kind == "q":
        return alpha.repeat_interleave(head_dim).unsqueeze(1)
    if kind == "kv":
        return kv_coefficients(alpha, num_kv_heads).repeat_interleave(head_dim).unsqueeze(1)
    if kind == "qkv":
        kv = kv_coefficients(alpha, num_kv_heads)
        return torch.cat([alpha, kv, kv]).repeat_interleave(head_dim).unsqueeze(1)
    if kind == "o":
        return alpha.repeat_interleave(head_dim).unsqueeze(0)
    if kind == "other":
        return alpha.mean()
    raise ValueError(f"unknown module kind {kind!r}")
