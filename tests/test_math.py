"""Projection and coefficient math against slow, obvious references."""

import pytest
import torch

from rain_hf.coefficients import coefficient_warning, head_coefficients, kv_coefficients, weight_scale
from rain_hf.projection import (
    feature_residual,
    feature_svd,
    project_ridge,
    project_svd,
    protected_basis,
    removed_fraction,
    with_bias_column,
    without_bias_column,
)


def test_exact_projection_kills_feature_outputs_and_matches_pinv_formula():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 12, generator=g, dtype=torch.float64)
    dw = torch.randn(7, 12, generator=g, dtype=torch.float64)
    v, s = feature_svd(h, torch.float64)
    out = project_svd(dw, protected_basis(v, s, 1e-10))
    reference = dw @ (torch.eye(12, dtype=torch.float64) - h.T @ torch.linalg.pinv(h @ h.T) @ h)
    assert torch.allclose(out, reference, atol=1e-10)
    assert torch.linalg.norm(out @ h.T) <= 1e-10 * torch.linalg.norm(dw @ h.T)
    assert feature_residual(dw, out, v, s) < 1e-10
    assert 0 < removed_fraction(dw, out) < 1
    assert removed_fraction(dw, out) == pytest.approx(1 - float(torch.linalg.norm(out) / torch.linalg.norm(dw)),
                                                      rel=1e-12)
    assert removed_fraction(dw, dw) == 0.0 and removed_fraction(dw, torch.zeros_like(dw)) == 1.0
    assert removed_fraction(torch.zeros_like(dw), torch.zeros_like(dw)) == 0.0


def test_rcond_keeps_only_strong_directions():
    v = torch.eye(4)
    s = torch.tensor([10.0, 2.0, 0.5, 0.0])
    assert protected_basis(v, s, 0.1).shape == (4, 2)
    assert protected_basis(v, s, 0.01).shape == (4, 3)
    assert protected_basis(v, torch.zeros(4), 0.1).shape == (4, 0)
    # exactly at the cut-off (exact in binary): not kept, as "s > rcond·s_max" says
    assert protected_basis(v, torch.tensor([8.0, 2.0, 1.0, 0.0]), 0.25).shape == (4, 1)


def test_ridge_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 9, generator=g, dtype=torch.float64)
    dw = torch.randn(3, 9, generator=g, dtype=torch.float64)
    v, s = feature_svd(h, torch.float64)
    eps = 0.05 * float(s[0]) ** 2
    reference = dw - dw @ h.T @ torch.linalg.inv(h @ h.T + eps * torch.eye(6, dtype=torch.float64)) @ h
    assert torch.allclose(project_ridge(dw, v, s, 0.05), reference, atol=1e-10)


@pytest.mark.parametrize("scale", [1e-4, 1e3], ids=["tiny", "large"])
def test_ridge_of_a_half_precision_delta_stays_finite(scale):
    # s² of features this size leaves float16's range (it overflows past 256, underflows below ~1e-4)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 9, generator=g) * scale
    dw = torch.randn(3, 9, generator=g)
    v, s = feature_svd(h, torch.float32)
    got = project_ridge(dw.half(), v, s, 0.05)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), project_ridge(dw, v, s, 0.05), rtol=1e-2, atol=1e-2)


def test_bias_column_projection_protects_affine_outputs():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 8, generator=g, dtype=torch.float64)
    dw = torch.randn(5, 8, generator=g, dtype=torch.float64)
    db = torch.randn(5, generator=g, dtype=torch.float64)
    ha = with_bias_column(h)
    v, s = feature_svd(ha, torch.float64)
    out = project_svd(torch.cat([dw, db[:, None]], 1), protected_basis(v, s, 1e-12))
    dw2, db2 = out[:, :-1], out[:, -1]
    assert torch.allclose(h @ dw2.T + db2, torch.zeros(4, 5, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("rank", [3, 8])
def test_bias_column_dropped_gives_the_features_own_projection(rank):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 8, generator=g, dtype=torch.float64)
    dw = torch.randn(5, 8, generator=g, dtype=torch.float64)
    v, s = without_bias_column(*feature_svd(with_bias_column(h), torch.float64))
    assert v.shape[0] == 8
    reference = dw @ (torch.eye(8, dtype=torch.float64) - torch.linalg.pinv(h) @ h)
    assert torch.allclose(project_svd(dw, protected_basis(v, s, 1e-10)), reference, atol=1e-10)
    direct_v, direct_s = feature_svd(h, torch.float64)
    assert torch.allclose(project_ridge(dw, v, s, 0.05), project_ridge(dw, direct_v, direct_s, 0.05), atol=1e-10)
    assert torch.allclose(s[:rank], direct_s[:rank], atol=1e-10)


def test_projections_of_all_zero_features_change_nothing():
    dw = torch.randn(3, 5, dtype=torch.float64)
    v, s = feature_svd(torch.zeros(4, 5, dtype=torch.float64), torch.float64)
    assert torch.equal(project_svd(dw, protected_basis(v, s, 0.1)), dw)
    assert torch.equal(project_ridge(dw, v, s, 0.05), dw)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_singular_values_are_refused_not_read_as_nothing_to_protect(value):
    v = torch.eye(5, dtype=torch.float64)[:, :3]
    s = torch.tensor([value, 1.0, 0.5], dtype=torch.float64)
    dw = torch.randn(3, 5, dtype=torch.float64)
    for call in (lambda: protected_basis(v, s, 0.1), lambda: project_ridge(dw, v, s, 0.05)):
        with pytest.raises(ValueError, match="non-finite singular values"):
            call()


def test_coefficients_literal_and_normalised():
    a = torch.tensor([[0.2, 0.4], [0.1, 0.3]])
    u = torch.tensor([[0.1, 0.0], [0.2, 0.1]])
    literal = head_coefficients(a, u, 0.5, "none", 0.0, 1.5)
    for i in range(2):
        for j in range(2):
            expected = min(max((a[i, j] - 0.5 * u[i, j]) / (1 + u[i, j]), 0.0), 1.5)
            assert literal[i, j] == pytest.approx(float(expected), rel=1e-6)
    norm = head_coefficients(a, u, 0.5, "mean", 0.0, 10.0)
    assert float(norm.mean()) == pytest.approx(1.0, rel=1e-6)
    # both ends of the box: the scores / their mean are [0.71, 2.10, 0, 1.19] here
    scores = (a - 0.5 * u) / (1 + u)
    expected = (scores / scores.mean()).clamp(0.9, 1.1)
    boxed = head_coefficients(a, u, 0.5, "mean", 0.9, 1.1)
    assert torch.allclose(boxed, expected.float()) and float(boxed.max()) == pytest.approx(1.1)
    assert float(boxed.min()) == pytest.approx(0.9)
    capped = head_coefficients(a, u, 0.5, "none", 0.0, 0.2)  # the literal form's upper clip
    assert torch.allclose(capped, scores.clamp(0.0, 0.2).float()) and float(capped.max()) == pytest.approx(0.2)
    # an unmeasured layer (NaN) gets the measured heads' mean: 1 normalised, the mean of their α literal
    nan = torch.full((1, 2), float("nan"))
    a3, u3 = torch.cat([a, nan]), torch.cat([u, nan])
    assert torch.equal(head_coefficients(a3, u3, 0.5, "mean", 0.0, 10.0)[2], torch.ones(2))
    # ... also where the box leaves 1 out: α = 1 is stage 1 alone, not a clipped value
    assert torch.equal(head_coefficients(a3, u3, 0.5, "mean", 0.0, 0.5)[2], torch.ones(2))
    # a mean score of exactly 0 (no attention to the instruction anywhere): α = 1, not 0 / 0
    zeros = torch.zeros(2, 2)
    assert torch.equal(head_coefficients(zeros, zeros, 0.5, "mean", 0.0, 2.0), torch.ones(2, 2))
    assert torch.allclose(head_coefficients(a3, u3, 0.5, "mean", 0.0, 10.0)[:2], norm)
    raw = head_coefficients(a3, u3, 0.5, "none", 0.0, 1.5)
    assert torch.allclose(raw[:2], literal) and torch.allclose(raw[2], literal.mean().expand(2))
    boxed = head_coefficients(a3, u3, 0.5, "none", 0.0, 0.1)
    assert torch.allclose(boxed[2], boxed[:2].mean().expand(2))  # the measured α as the box clipped them
    # scores mostly negative: the unmeasured layer gets the measured α's mean (here > 0), not the clipped mean score
    a4, u4 = torch.tensor([[0.0, 0.4, 0.0, 0.0], [float("nan")] * 4]), torch.tensor([[0.5, 0.0, 0.5, 0.5], [0.0] * 4])
    mostly = head_coefficients(a4, u4, 0.5, "none", 0.0, 2.0)
    assert float(mostly[1, 0]) == pytest.approx(0.1) and float(mostly[0].mean()) == pytest.approx(0.1)
    assert torch.equal(head_coefficients(nan, nan, 0.5, "none", 0.0, 1.5), torch.ones(1, 2))  # nothing measured



def test_coefficient_warning_names_a_stage_2_that_cannot_rank_heads():
    a = torch.tensor([[0.2, 0.4], [0.1, 0.3]])
    u = torch.tensor([[0.1, 0.0], [0.2, 0.1]])
    fine = head_coefficients(a, u, 0.5, "mean", 0.0, 2.0)
    assert coefficient_warning(a, u, 0.5, "mean", fine, 0.0, 2.0) is None
    # leakage outweighs alignment everywhere: the mean is negative and every α falls back to 1
    leaky = torch.tensor([[0.9, 0.8], [0.7, 0.9]])
    ones = head_coefficients(a, leaky, 0.5, "mean", 0.0, 2.0)
    assert torch.equal(ones, torch.ones(2, 2))
    said = coefficient_warning(a, leaky, 0.5, "mean", ones, 0.0, 2.0)
    # the literal form cannot help: its box starts at 0, and the scores are mostly negative
    assert "non-positive mean" in said and "coef_normalize='none'" not in said and "a smaller rho" in said
    literal = head_coefficients(a, leaky, 0.5, "none", 0.0, 2.0)
    assert "coef_normalize='none'" not in coefficient_warning(a, leaky, 0.5, "none", literal, 0.0, 2.0)
    for lo, hi in ((0.0, 0.5), (1.2, 3.0)):  # a box without 1 in it does not clip the fallback, as the warning says
        assert torch.equal(head_coefficients(a, leaky, 0.5, "mean", lo, hi), torch.ones(2, 2))
    # a mean near 0 against a wide spread: every α lands on a bound
    a2, u2 = torch.tensor([[0.10, 0.10, 0.12, 0.08]]), torch.tensor([[0.19, 0.21, 0.22, 0.17]])
    saturated = head_coefficients(a2, u2, 0.5, "mean", 0.0, 2.0)
    assert set(saturated.flatten().tolist()) == {0.0, 2.0}
    said = coefficient_warning(a2, u2, 0.5, "mean", saturated, 0.0, 2.0)
    assert "100% of the heads' coefficients sit on a bound of [0, 2]" in said and "coef_normalize='none'" in said
    one_head = torch.tensor([[0.0, 0.0, 0.0, 0.4]])  # ρ is 0 already: all the spread is alignment's
    alone = head_coefficients(one_head, torch.zeros(1, 4), 0.0, "mean", 0.0, 2.0)
    said = coefficient_warning(one_head, torch.zeros(1, 4), 0.0, "mean", alone, 0.0, 2.0)
    assert "sit on a bound" in said and "rho" not in said and "coef_normalize='none'" in said
    # the literal form with a floor above every raw score: the box is the cause, and no ρ can help
    floored = head_coefficients(a2, u2, 0.0, "none", 0.5, 3.0)
    said = coefficient_warning(a2, u2, 0.0, "none", floored, 0.5, 3.0)
    assert "coef_min / coef_max that suit the raw scores a − ρ·u (they lie between 0.0684 and 0.0984)" in said
    assert "rho" not in said
    # raw scores mostly negative: no box can hold them (coef_min >= 0) and "mean" falls back to α = 1: ρ is the fix
    a5, u5 = torch.tensor([[0.02, 0.03, 0.01, 0.20]]), torch.tensor([[0.30, 0.40, 0.20, 0.05]])
    said = coefficient_warning(a5, u5, 0.5, "none", head_coefficients(a5, u5, 0.5, "none", 0.0, 2.0), 0.0, 2.0)
    assert "try a smaller rho, or calibration data" in said and "coef_min" not in said
    # mostly positive with a few negative ones: the box advice, which cannot take coef_min below 0
    a6, u6 = torch.tensor([[0.0, 0.0, 0.0, 0.9, 0.8, 0.7, 0.9]]), torch.tensor([[0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]])
    said = coefficient_warning(a6, u6, 0.5, "none", head_coefficients(a6, u6, 0.5, "none", 1.0, 3.0), 1.0, 3.0)
    assert "(the positive ones reach 0.9; coef_min cannot go below 0)" in said


def test_gqa_mapping_groups_consecutive_query_heads():
    alpha = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 11.0])  # 6 query heads, 2 kv heads -> groups {0,1,2}, {3,4,5}
    assert torch.allclose(kv_coefficients(alpha, 2), torch.tensor([2.0, 23.0 / 3]))
    q = weight_scale("q", alpha, 2, 3)
    assert q.shape == (18, 1) and float(q[3, 0]) == 2.0 and float(q[17, 0]) == 11.0
    kv = weight_scale("kv", alpha, 2, 3)
    assert kv.shape == (6, 1) and float(kv[0, 0]) == 2.0 and float(kv[5, 0]) == pytest.approx(23.0 / 3)
    o = weight_scale("o", alpha, 2, 3)
    assert o.shape == (1, 18) and float(o[0, 6]) == 3.0
    assert float(weight_scale("other", alpha, 2, 3)) == pytest.approx(float(alpha.mean()))
    # Phi-3's fused projection: rows [q heads | k heads | v heads], each block as its own projection
    qkv = weight_scale("qkv", alpha, 2, 3)
    assert qkv.shape == (18 + 6 + 6, 1)
    assert torch.equal(qkv, torch.cat([q, kv, kv]))
    expected = [alpha[h] for h in range(6) for _ in range(3)] + [kv_coefficients(alpha, 2)[g] for _ in "kv"
                                                                  for g in range(2) for _ in range(3)]
    assert qkv.squeeze(1).tolist() == pytest.approx([float(x) for x in expected])
