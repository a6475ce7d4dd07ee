"""Baseline merge methods that share RAIN-Merging's streaming engine: pure tensor functions, no I/O.

The merge engine calls :func:`merge_tensor` once per merged weight tensor, with fp32 copies of the reasoning
model's tensor θ_R, the base model's tensor θ_B (when :func:`needs_base` says so) and the instruct task vector
Δ_I = θ_I − θ_B (for a LoRA instruct model, the adapter's ΔW). Every method returns the merged θ in fp32.

========================  ===========================================================================
``task_arithmetic``       θ_R + λ·Δ_I
``ties``                  θ_B + TIES(Δ_R, Δ_I; weights [1, λ], density)  with Δ_R = θ_R − θ_B
``dare_ties``             θ_B + DARE-TIES(Δ_R, Δ_I; weights [1, λ], density)
``dare_linear``           θ_B + DARE-linear(Δ_R, Δ_I; weights [1, λ], density)
``slerp``                 SLERP(θ_R, θ_I; t = ``slerp_t``) with θ_I = θ_B + Δ_I  (λ is not used)
========================  ===========================================================================

TIES / DARE convention: **peft's** (:mod:`peft.utils.merge_utils`, whose conventions this module reimplements), not
mergekit's:

* trimming (TIES): each task vector keeps its ``int(density · numel)`` largest-magnitude entries, as peft's
  ``magnitude_based_pruning`` does (so none of a tensor with fewer than ``1 / density`` entries; mergekit 0.1.5
  keeps at least one), but entries tied at the cut are kept in index order (peft's ``topk`` picks among ties
  differently on CPU and CUDA, and bf16 deltas tie by the hundred thousand); the others become 0;
* drop (DARE): each entry of each task vector is kept with probability ``density`` and the kept entries are
  rescaled by ``1 / density`` (mergekit's DARE methods instead rescale each dropped task vector back to its L1
  norm, by default);
* sign election (``*_ties``): the sign of the sum of the **unweighted** trimmed task vectors
  (``calculate_majority_sign_mask(method="total")``; a zero sum elects +); mergekit votes on the weighted ones;
* disjoint merge (``*_ties``): the weighted entries that agree with the elected sign are summed and divided by
  the **number** of agreeing entries (``disjoint_merge``). mergekit's ``ties`` divides by the sum of their
  weights, and its ``dare_ties`` does not divide: where both task vectors agree, this ``dare_ties`` gives half
  of mergekit's;
* ``dare_linear`` is the weighted sum of the dropped-and-rescaled task vectors, with no normalisation (as
  mergekit's, apart from the rescale).

The weights are ``[1, λ]`` for ``[Δ_R, Δ_I]``. In the ``*_ties`` methods λ weighs Δ_I's entries in the sum but
not in the sign election or the count, so λ = 0 does not give back the reasoning model: where Δ_I agrees with
the elected sign Δ_R's entry is halved, and where Δ_I outweighs it with the other sign it is dropped. Nor does
``dare_linear`` below density 1: Δ_R is dropped and rescaled too.

Besides the tie order at the trim cut, the other departure from peft is DARE's random masks: peft draws them from
torch's global generator, this module from a :class:`torch.Generator` seeded with :func:`tensor_seed`
(``config.seed`` and a CRC-32 of the tensor's name), on the CPU, so a merge is reproducible whatever the order,
device or number of workers that process the tensors.

SLERP interpolates along the great circle between the flattened tensors (the angle is measured between their
normalised copies, the interpolation weights are applied to the tensors themselves, as mergekit does) and falls
back to linear interpolation when the two are nearly colinear (|cos| > 0.9995) or one of them is ~0.

Example:
    >>> import torch
    >>> from rain_hf.config import RainMergingConfig
    >>> from rain_hf.methods import merge_tensor, needs_base
    >>> theta_r, theta_b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])
    >>> delta_i = torch.tensor([0.5, -0.5])
    >>> merge_tensor("task_arithmetic", theta_r, None, delta_i, RainMergingConfig(lam=2.0), "w")
    tensor([2., 1.])
    >>> needs_base("ties")
    True
"""

from __future__ import annotations

import math
import numbers
import zlib

import torch

from .config import METHODS, RainMergingConfig

__all__ = ["BASELINE_METHODS", "disjoint_merge", "merge_tensor", "needs_base", "slerp", "tensor_seed",
           "trim_by_magnitude"]

#: The methods :func:`merge_tensor` implements (every ``RainMergingConfig.method`` except ``"rain"``).
BASELINE_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")

_NEEDS_BASE = frozenset({"ties", "dare_ties", "dare_linear", "slerp"})
_SLERP_DOT_THRESHOLD = 0.9995
_SLERP_EPS = 1e-8


def needs_base(method: str) -> bool:
    """Whether ``method`` reads the base model's tensor θ_B (besides θ_R and Δ_I).

    ``"rain"`` and ``"task_arithmetic"`` only need the reasoning tensor and the instruct task vector.

    Example:
        >>> needs_base("task_arithmetic"), needs_base("slerp"), needs_base("rain")
        (False, True, False)
    """
    if method not in METHODS:
        raise ValueError(f"Unknown merge method {method!r}; use one of {list(METHODS)}.")
    return method in _NEEDS_BASE


def tensor_seed(seed: int, key: str) -> int:
    """The seed of DARE's random mask for tensor ``key``: the CRC-32 of ``key`` started from ``seed``.

    32 bits, because torch's CPU generator only uses the low 32 bits of its seed; for a given ``key`` distinct
    seeds (mod 2³²) give distinct values. Stable across processes and Python versions (unlike ``hash``), so
    masks do not depend on call order.

    Example:
        >>> tensor_seed(0, "model.layers.0.mlp.up_proj.weight") == tensor_seed(0, "model.layers.0.mlp.up_proj.weight")
        True
        >>> tensor_seed(0, "a") != tensor_seed(1, "a")
        True
    """
    return zlib.crc32(key.encode("utf-8"), int(seed) % 2**32)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation between two tensors of the same shape (``t=0``: ``v0``, ``t=1``: ``v1``).

    Falls back to linear interpolation when the tensors are nearly colinear or one of them is ~0.

    Example:
        >>> import torch
        >>> slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
        tensor([0.7071, 0.7071])
    """
    if v0.shape != v1.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(v0.shape)} and {tuple(v1.shape)}.")
    # The angle in float64: the dot product of two large tensors loses precision in fp32.
    n0 = torch.linalg.vector_norm(v0, dtype=torch.float64).item()
    n1 = torch.linalg.vector_norm(v1, dtype=torch.float64).item()
    if n0 < _SLERP_EPS or n1 < _SLERP_EPS:
        return torch.lerp(v0, v1, t)
    dot = torch.dot(v0.reshape(-1).double(), v1.reshape(-1).double()).item() / (n0 * n1)
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > _SLERP_DOT_THRESHOLD:
        return torch.lerp(v0, v1, t)
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return (math.sin((1.0 - t) * omega) / sin_omega) * v0 + (math.sin(t * omega) / sin_omega) * v1


def merge_tensor(
    method: str,
    reasoning: torch.Tensor,
    base: torch.Tensor | None,
    delta_instruct: torch.Tensor,
    config: RainMergingConfig,
    key: str,
    *,
    lam: float | None = None,
) -> torch.Tensor:
    """Merge one weight tensor with a baseline method (see the module docstring for the formulas).

    Args:
        method: one of :data:`BASELINE_METHODS`.
        reasoning: θ_R, the reasoning model's tensor.
        base: θ_B, the base model's tensor (required when ``needs_base(method)``; ignored otherwise).
        delta_instruct: Δ_I = θ_I − θ_B.
        config: supplies ``lam``, ``density``, ``slerp_t`` and ``seed``.
        key: the tensor's name in the checkpoint; seeds DARE's mask together with ``config.seed``.
        lam: overrides ``config.lam`` (e.g. the value ``lam="auto"`` resolved to).

    Returns:
        The merged tensor, float32 (float64 when ``reasoning`` is float64), on the inputs' device.

    Example:
        >>> import torch
        >>> from rain_hf.config import RainMergingConfig
        >>> cfg = RainMergingConfig(method="dare_linear", density=0.5, seed=0)
        >>> r, b, d = torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4)
        >>> a = merge_tensor("dare_linear", r, b, d, cfg, "model.layers.0.mlp.up_proj.weight")
        >>> bool(torch.equal(a, merge_tensor("dare_linear", r, b, d, cfg, "model.layers.0.mlp.up_proj.weight")))
        True
    """
    if method not in BASELINE_METHODS:
        if method == "rain":
            raise ValueError("merge_tensor implements the baselines only; method='rain' is merged by RainMerger "
                             "(null-space projection and head coefficients).")
        raise ValueError(f"Unknown baseline merge method {method!r}; use one of {list(BASELINE_METHODS)}.")
    weight = config.lam if lam is None else lam
    if method == "slerp":  # its mix is slerp_t; a rain config's lam='auto' must not stop it
        weight = 0.0
    elif isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        advice = "resolve lam='auto' first and pass lam=<number>" if isinstance(weight, str) else "pass a number"
        raise ValueError(f"merge_tensor needs a numeric lam, got {weight!r}: {advice}.")
    weight = float(weight)  # a numpy scalar too
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"merge_tensor needs a finite lam >= 0, got {weight!r}.")
    if method in ("ties", "dare_ties", "dare_linear") and not 0.0 < float(config.density) <= 1.0:
        raise ValueError(f"config.density={config.density!r}: the share of entries {method} keeps must be in (0, 1].")
    if method == "slerp" and not 0.0 <= float(config.slerp_t) <= 1.0:
        raise ValueError(f"config.slerp_t={config.slerp_t!r}: slerp interpolates from the reasoning model (0) to the "
                         "instruct model (1); use a value in [0, 1].")
    if reasoning.shape != delta_instruct.shape:
        raise ValueError(f"{key}: reasoning tensor {tuple(reasoning.shape)} and instruct task vector "
                         f"{tuple(delta_instruct.shape)} differ in shape.")
    if method in _NEEDS_BASE:
        if base is None:
            raise ValueError(f"{key}: method {method!r} needs the base model's tensor θ_B; pass base=...")
        if base.shape != reasoning.shape:
            raise ValueError(f"{key}: base tensor {tuple(base.shape)} and reasoning tensor "
                             f"{tuple(reasoning.shape)} differ in shape.")
    dtype = torch.promote_types(reasoning.dtype, torch.float32)
    theta_r = reasoning.to(dtype)
    delta_i = delta_instruct.to(dtype)
    if method == "task_arithmetic":
        return theta_r + float(weight) * delta_i

    theta_b = base.to(dtype)  # type: ignore[union-attr]
    if method == "slerp":
        return slerp(theta_r, theta_b + delta_i, float(config.slerp_t))

    task_vectors = [theta_r - theta_b, delta_i]
    density = float(config.density)
    if method == "ties":
        if density < 1.0:
            task_vectors = [trim_by_magnitude(tv, density) for tv in task_vectors]
        return theta_b + disjoint_merge(*task_vectors, float(weight))
    task_vectors = _dare_drop(task_vectors, density, tensor_seed(config.seed, key))
    if method == "dare_ties":
        return theta_b + disjoint_merge(*task_vectors, float(weight))
    return theta_b + (task_vectors[0] + task_vectors[1] * float(weight))  # dare_linear


def trim_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trimming: keep the ``int(density · numel)`` largest-magnitude entries of ``tensor``, zero the rest.

    Entries tied with the smallest kept magnitude are kept in index order, so the result is the same on every
    device.

    Example:
        >>> trim_by_magnitude(torch.tensor([1.0, -3.0, 1.0, 1.0, 2.0]), 0.6)
        tensor([ 1., -3.,  0.,  0.,  2.])
    """
    flat = tensor.reshape(-1)
    k = int(density * flat.numel())
    if k <= 0:
        return torch.zeros_like(tensor)
    if k >= flat.numel():
        return tensor.clone()
    magnitude = flat.abs()
    cut = torch.topk(magnitude, k, sorted=False).values.min()  # the k-th largest magnitude
    keep = magnitude > cut
    ties = torch.nonzero(magnitude == cut).squeeze(1)  # in index order
    keep[ties[: k - int(keep.sum())]] = True
    return (flat * keep).reshape(tensor.shape)


def disjoint_merge(delta_r: torch.Tensor, delta_i: torch.Tensor, lam: float) -> torch.Tensor:
    """peft's TIES merge of two task vectors: the sign elected by their unweighted sum (a zero sum elects +), then
    the mean of the weighted entries (Δ_R with weight 1, Δ_I with ``lam``) that agree with it, zero where none do.

    The same numbers as ``peft.utils.merge_utils`` (``calculate_majority_sign_mask(method="total")`` then
    ``disjoint_merge``) without stacking the two: about 4 tensors of temporary memory instead of 13.

    Args:
        delta_r, delta_i: task vectors of one shape [*].
        lam: Δ_I's weight.

    Returns:
        The merged task vector [*].

    Example:
        >>> disjoint_merge(torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([3.0, 1.0, -1.0, 0.0]), 1.0)
        tensor([ 2., -2.,  3.,  0.])
    """
    positive = (delta_r + delta_i) >= 0
    keep_r = torch.where(positive, delta_r > 0, delta_r < 0)
    keep_i = torch.where(positive, delta_i > 0, delta_i < 0)
    count = (keep_r.to(delta_r.dtype) + keep_i.to(delta_r.dtype)).clamp_(min=1.0)
    mixed = delta_r * keep_r
    mixed += (delta_i * lam) * keep_i
    return mixed.div_(count)


def _dare_drop(task_vectors: list[torch.Tensor], density: float, seed: int) -> list[torch.Tensor]:
    """Keep each entry with probability ``density`` and rescale the kept ones by 1/density (seeded, on the CPU)."""
    if density >= 1.0:
        return task_vectors
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dropped = []
    for tv in task_vectors:  # one generator, drawn in a fixed order: Δ_R's mask, then Δ_I's
        keep = torch.rand(tv.shape, generator=generator, dtype=torch.float32) < density
        dropped.append(tv * keep.to(tv.device) / density)
    return dropped
