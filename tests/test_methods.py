"""Baseline merge methods against slow, element-by-element computations on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rain_hf.config import METHODS, RainMergingConfig
from rain_hf.methods import (
    BASELINE_METHODS,
    _dare_drop,
    merge_tensor,
    needs_base,
    slerp,
    tensor_seed,
    trim_by_magnitude,
)

KEY = "model.layers.0.mlp.up_proj.weight"


def _triple(seed: int = 0, shape: tuple[int, ...] = (3, 4)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    reasoning = base + torch.randn(shape, generator=g)
    delta = torch.randn(shape, generator=g)
    return reasoning, base, delta


def _trim(values: list[float], density: float) -> list[float]:
    """Keep the int(density * n) largest magnitudes (inputs have distinct magnitudes)."""
    k = int(density * len(values))
    keep = sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k]
    return [v if i in keep else 0.0 for i, v in enumerate(values)]


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _disjoint_merge(columns: list[list[float]], weights: list[float]) -> list[float]:
    """Per entry: elect the sign of the unweighted sum, average the weighted agreeing entries by count."""
    merged = []
    for entries in zip(*columns):
        elected = 1 if sum(entries) >= 0 else -1
        agree = [w * v for v, w in zip(entries, weights) if _sign(v) == elected]
        merged.append(sum(agree) / max(len(agree), 1))
    return merged


def _dare_masks(shape: tuple[int, ...], density: float, seed: int, key: str) -> list[list[bool]]:
    g = torch.Generator().manual_seed(tensor_seed(seed, key))
    return [(torch.rand(shape, generator=g) < density).reshape(-1).tolist() for _ in range(2)]


def test_method_lists():
    assert set(BASELINE_METHODS) == set(METHODS) - {"rain"}
    assert {m for m in METHODS if needs_base(m)} == {"ties", "dare_ties", "dare_linear", "slerp"}
    with pytest.raises(ValueError, match="Unknown merge method"):
        needs_base("average")


def test_lam_auto_is_refused_for_the_baselines_with_what_to_set():
    with pytest.raises(ValueError, match="give method='ties' a number"):
        RainMergingConfig(method="ties", lam="auto")
    with pytest.raises(ValueError, match="slerp does not use lam: leave lam out and set slerp_t"):
        RainMergingConfig(method="slerp", lam="auto")


@pytest.mark.parametrize("lam", [0.0, 0.7, 2.5])
def test_task_arithmetic(lam):
    reasoning, _, delta = _triple()
    out = merge_tensor("task_arithmetic", reasoning, None, delta, RainMergingConfig(lam=lam), KEY)
    expected = [r + lam * d for r, d in zip(reasoning.reshape(-1).tolist(), delta.reshape(-1).tolist())]
    assert out.dtype == torch.float32 and out.shape == reasoning.shape
    torch.testing.assert_close(out.reshape(-1), torch.tensor(expected))


@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("lam", [1.0, 1.5])
def test_ties(density, lam):
    reasoning, base, delta = _triple(1)
    cfg = RainMergingConfig(method="ties", lam=lam, density=density)
    out = merge_tensor("ties", reasoning, base, delta, cfg, KEY)
    b = base.reshape(-1).tolist()
    delta_r = [r - x for r, x in zip(reasoning.reshape(-1).tolist(), b)]
    trimmed = [_trim(delta_r, density), _trim(delta.reshape(-1).tolist(), density)]
    expected = [x + m for x, m in zip(b, _disjoint_merge(trimmed, [1.0, lam]))]
    torch.testing.assert_close(out.reshape(-1), torch.tensor(expected))


def test_ties_matches_peft_convention():
    """The documented convention is peft's: same result as peft.utils.merge_utils.ties on the two vectors."""
    from peft.utils import merge_utils

    reasoning, base, delta = _triple(2, (8, 8))
    cfg = RainMergingConfig(method="ties", lam=0.8, density=0.3)
    ours = merge_tensor("ties", reasoning, base, delta, cfg, KEY)
    theirs = base + merge_utils.ties([reasoning - base, delta], torch.tensor([1.0, 0.8]), density=0.3)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_disjoint_merge_gives_peft_numbers_bit_for_bit(dtype):
    from peft.utils import merge_utils

    from rain_hf.methods import disjoint_merge

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 48, generator=generator, dtype=dtype) for _ in range(2))
    a[::3] = 0.0  # trimmed or dropped entries, and sums of exactly zero
    b[1::4] = -a[1::4]
    for lam in (1.0, 0.7, 2.5):
        stacked = torch.stack([a, b])
        majority = merge_utils.calculate_majority_sign_mask(stacked, method="total")
        weights = torch.tensor([1.0, lam], dtype=dtype)
        theirs = merge_utils.disjoint_merge(stacked * merge_utils.reshape_weight_task_tensors(stacked, weights),
                                            majority)
        ours = disjoint_merge(a, b, lam)
        assert ours.dtype == dtype and torch.equal(ours, theirs), lam
    for method in ("dare_ties", "dare_linear"):  # and the whole tensor merge, as peft's helpers gave it
        cfg = RainMergingConfig(method=method, lam=0.7, density=0.5, seed=3)
        reasoning, base, delta = _triple(4, (16, 16))
        dropped = _dare_drop([reasoning - base, delta], 0.5, tensor_seed(3, KEY))
        stacked = torch.stack(dropped)
        weights = torch.tensor([1.0, 0.7])
        if method == "dare_ties":
            mixed = merge_utils.disjoint_merge(stacked * merge_utils.reshape_weight_task_tensors(stacked, weights),
                                               merge_utils.calculate_majority_sign_mask(stacked, method="total"))
        else:
            mixed = merge_utils.task_arithmetic(dropped, weights)
        assert torch.equal(merge_tensor(method, reasoning, base, delta, cfg, KEY), base + mixed), method


def test_trim_keeps_ties_at_the_cut_in_index_order():
    # bf16 deltas tie in bulk: which tied entries survive must not depend on topk's device-specific choice
    values = torch.tensor([0.5, -1.0, 0.5, 2.0, -0.5, 0.5, 0.25, 0.5])
    for density, kept in [(0.5, [0, 1, 2, 3]), (0.375, [1, 3, 0]), (0.75, [0, 1, 2, 3, 4, 5]), (0.1, []),
                          (1.0, list(range(8)))]:
        out = trim_by_magnitude(values, density)
        expected = torch.zeros_like(values)
        expected[kept] = values[kept]
        assert torch.equal(out, expected), density
    big = torch.randn(64, 32).bfloat16().float() * 1e-3  # many exact ties at every magnitude
    k = int(0.3 * big.numel())
    out = trim_by_magnitude(big, 0.3)
    assert int((out != 0).sum()) == k and out.shape == big.shape
    assert float(out[out != 0].abs().min()) == float(big.abs().reshape(-1).topk(k).values[-1])
    assert torch.equal(out, trim_by_magnitude(big.double(), 0.3).float())  # same entries whatever the dtype


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare(method, density):
    lam = 1.3
    reasoning, base, delta = _triple(3, (4, 5))
    cfg = RainMergingConfig(method=method, lam=lam, density=density, seed=11)
    out = merge_tensor(method, reasoning, base, delta, cfg, KEY)
    masks = _dare_masks(tuple(reasoning.shape), density, 11, KEY)
    b = base.reshape(-1).tolist()
    delta_r = [r - x for r, x in zip(reasoning.reshape(-1).tolist(), b)]
    dropped = [[v / density if keep else 0.0 for v, keep in zip(tv, mask)]
               for tv, mask in zip([delta_r, delta.reshape(-1).tolist()], masks)]
    if method == "dare_ties":
        merged = _disjoint_merge(dropped, [1.0, lam])
    else:
        merged = [r + lam * i for r, i in zip(*dropped)]
    expected = [x + m for x, m in zip(b, merged)]
    torch.testing.assert_close(out.reshape(-1), torch.tensor(expected))


def test_dare_is_seeded_and_independent_of_call_order():
    tensors = {f"model.layers.{i}.self_attn.q_proj.weight": _triple(i, (16, 16)) for i in range(3)}
    cfg = RainMergingConfig(method="dare_ties", density=0.5, seed=5)

    def run(keys):
        return {k: merge_tensor("dare_ties", *tensors[k], cfg, k) for k in keys}

    forward, backward = run(list(tensors)), run(list(reversed(tensors)))
    for k in tensors:
        assert torch.equal(forward[k], backward[k])
    # another seed, or another name for the same numbers, draws another mask
    r, b, d = tensors["model.layers.0.self_attn.q_proj.weight"]
    first = forward["model.layers.0.self_attn.q_proj.weight"]
    other_seed = RainMergingConfig(method="dare_ties", density=0.5, seed=6)
    assert not torch.equal(first, merge_tensor("dare_ties", r, b, d, other_seed, "model.layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(first, merge_tensor("dare_ties", r, b, d, cfg, "model.layers.1.self_attn.q_proj.weight"))


def test_dare_keeps_density_fraction_and_is_unbiased():
    n = 200_000
    base = torch.zeros(n)
    reasoning = torch.zeros(n)
    delta = torch.ones(n)
    out = merge_tensor("dare_linear", reasoning, base, delta, RainMergingConfig(density=0.25, lam=1.0), KEY)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.01
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 4.0))  # rescaled by 1/density
    assert abs(out.mean().item() - 1.0) < 0.05


def test_density_one_reduces_to_sums():
    reasoning, base, delta = _triple(4)
    cfg = RainMergingConfig(lam=0.5, density=1.0)
    torch.testing.assert_close(merge_tensor("dare_linear", reasoning, base, delta, cfg, KEY), reasoning + 0.5 * delta)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_against_rotation(t):
    """Two 2-D vectors at an angle ω: slerp rotates v0 by t·ω and interpolates the norms along the arc."""
    omega = 1.1
    v0 = torch.tensor([2.0, 0.0])
    v1 = torch.tensor([2.0 * math.cos(omega), 2.0 * math.sin(omega)])
    expected = torch.tensor([2.0 * math.cos(t * omega), 2.0 * math.sin(t * omega)])
    torch.testing.assert_close(slerp(v0, v1, t), expected)


def test_slerp_merge_uses_instruct_weights_and_slerp_t():
    reasoning, base, delta = _triple(5, (2, 3))
    t = 0.4
    out = merge_tensor("slerp", reasoning, base, delta, RainMergingConfig(method="slerp", slerp_t=t), KEY)
    a = reasoning.reshape(-1).tolist()
    b = (base + delta).reshape(-1).tolist()
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    omega = math.acos(sum(x * y for x, y in zip(a, b)) / (na * nb))
    ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    expected = [ca * x + cb * y for x, y in zip(a, b)]
    torch.testing.assert_close(out.reshape(-1), torch.tensor(expected))


def test_slerp_falls_back_to_lerp_when_colinear():
    v0 = torch.tensor([1.0, 2.0, 3.0])
    v1 = 3.0 * v0 + 1e-6
    torch.testing.assert_close(slerp(v0, v1, 0.25), 0.75 * v0 + 0.25 * v1)
    torch.testing.assert_close(slerp(torch.zeros(3), v0, 0.5), 0.5 * v0)
    # pointing the opposite way is colinear too: sin ω ≈ 0 would blow the slerp weights up
    torch.testing.assert_close(slerp(v0, -2.0 * v0, 0.25), torch.lerp(v0, -2.0 * v0, 0.25))


def test_lam_override_and_errors():
    reasoning, base, delta = _triple(6)
    auto = RainMergingConfig(lam="auto")
    with pytest.raises(ValueError, match="lam='auto'"):
        merge_tensor("task_arithmetic", reasoning, None, delta, auto, KEY)
    torch.testing.assert_close(merge_tensor("task_arithmetic", reasoning, None, delta, auto, KEY, lam=2.0),
                               reasoning + 2.0 * delta)
    # a numpy λ is a number; slerp reads slerp_t, so a rain config's lam='auto' does not stop it
    torch.testing.assert_close(merge_tensor("task_arithmetic", reasoning, None, delta, auto, KEY, lam=np.float32(0.5)),
                               reasoning + 0.5 * delta)
    slerp = merge_tensor("slerp", reasoning, base, delta, RainMergingConfig(method="slerp", slerp_t=0.3), KEY)
    torch.testing.assert_close(merge_tensor("slerp", reasoning, base, delta, RainMergingConfig(slerp_t=0.3), KEY),
                               slerp)
    with pytest.raises(ValueError, match=r"got \[1.0\]: pass a number"):
        merge_tensor("task_arithmetic", reasoning, None, delta, auto, KEY, lam=[1.0])
    with pytest.raises(ValueError, match="RainMerger"):
        merge_tensor("rain", reasoning, base, delta, RainMergingConfig(), KEY)
    with pytest.raises(ValueError, match="needs the base"):
        merge_tensor("ties", reasoning, None, delta, RainMergingConfig(method="ties"), KEY)
    with pytest.raises(ValueError, match="differ in shape"):
        merge_tensor("ties", reasoning, base.T, delta, RainMergingConfig(method="ties"), KEY)


def test_inputs_are_not_modified():
    reasoning, base, delta = _triple(7)
    copies = [t.clone() for t in (reasoning, base, delta)]
    for method in BASELINE_METHODS:
        merge_tensor(method, reasoning, base, delta, RainMergingConfig(method=method, density=0.5), KEY)
    for original, copy in zip((reasoning, base, delta), copies):
        assert torch.equal(original, copy)


def test_merge_tensor_refuses_weights_that_cannot_merge():
    reasoning, base, delta = _triple(5, (2, 3))
    for lam in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="needs a finite lam >= 0"):
            merge_tensor("task_arithmetic", reasoning, base, delta, RainMergingConfig(method="task_arithmetic"),
                         KEY, lam=lam)
    cfg = RainMergingConfig(method="dare_linear")
    cfg.density = 0.0  # edited after validation: merge_tensor is public, and 1/density would give NaN weights
    with pytest.raises(ValueError, match=r"density=0.0: the share of entries dare_linear keeps must be in \(0, 1\]"):
        merge_tensor("dare_linear", reasoning, base, delta, cfg, KEY)
    cfg = RainMergingConfig(method="slerp")
    cfg.slerp_t = 2.0  # would extrapolate past the instruct model
    with pytest.raises(ValueError, match=r"slerp_t=2.0: .* use a value in \[0, 1\]"):
        merge_tensor("slerp", reasoning, base, delta, cfg, KEY)
