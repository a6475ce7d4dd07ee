"""The stage-2 ablation script: how its coefficient variants are formed, and its quick run on the organism."""

from __future__ import annotations

import torch

from benchmarks.organism.stage2 import VARIANTS, coefficients
from rain_hf import RainMergingConfig
from rain_hf.coefficients import head_coefficients


def test_variants_split_alpha_into_its_layer_and_head_parts():
    g = torch.Generator().manual_seed(0)
    a, u = torch.rand(4, 6, generator=g) * 0.3 + 0.1, torch.rand(4, 6, generator=g) * 0.2
    cfg = RainMergingConfig(coef_max=10.0)  # no clipping, so the means are exact
    alpha = head_coefficients(a, u, cfg.rho, "mean", cfg.coef_min, cfg.coef_max)
    assert coefficients("stage 1 only", a, u, cfg) is None
    assert torch.equal(coefficients("mean", a, u, cfg), alpha)
    within = coefficients("within-layer", a, u, cfg)
    assert torch.allclose(within.mean(dim=1), torch.ones(4), atol=1e-6)
    # within a layer, heads keep the library's ratios
    assert torch.allclose(within / within[:, :1], alpha / alpha[:, :1], atol=1e-5)
    between = coefficients("between-layer", a, u, cfg)
    assert torch.allclose(between, alpha.mean(dim=1, keepdim=True).expand(4, 6))
    assert not torch.allclose(between.mean(dim=1), torch.ones(4), atol=1e-3)
    assert torch.allclose(coefficients("rho=0", a, u, cfg), head_coefficients(a, u, 0.0, "mean", 0.0, 10.0))


def test_quick_run_writes_every_variant(tmp_path, run_quick):
    run_quick("benchmarks.organism.stage2", tmp_path)
    text = (tmp_path / "STAGE2.md").read_text()
    assert text.count("| 0 | alignment |") == 1 and text.count("| alpha |") == 4
    for variant in VARIANTS:
        assert f"| 4 | {variant} |" in text, variant
    # each variant merges other weights: its L_think on the held-out calibration rows differs from every other's
    # (labels alone would pass if every variant silently became stage 1 alone)
    l_think = {row.split("|")[2].strip(): row.split("|")[7].strip() for row in text.splitlines()
               if row.startswith("| 4 | ")}
    assert set(l_think) == set(VARIANTS) and len(set(l_think.values())) == len(VARIANTS), l_think

def test_within_layer_leaves_a_layer_with_a_non_positive_mean_at_one():
    cfg = RainMergingConfig(coef_max=10.0)
    a = torch.tensor([[0.3, 0.1], [0.0, 0.1]])
    u = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # layer 1: mean a − ρu ≤ 0, the leaking head would get the most
    within = coefficients("within-layer", a, u, cfg)
    assert torch.allclose(within[1], torch.ones(2)) and torch.allclose(within[0], torch.tensor([1.5, 0.5]))


def test_a_variant_whose_scores_cannot_rank_heads_says_so(caplog):
    cfg = RainMergingConfig()
    a, u = torch.tensor([[0.1, 0.1]]), torch.tensor([[0.9, 0.8]])  # leakage outweighs alignment on every head
    with caplog.at_level("WARNING", logger="benchmarks.organism.stage2"):
        assert torch.equal(coefficients("mean", a, u, cfg), torch.ones(1, 2))
    assert "mean: stage 2: the head scores a − ρ·u have a non-positive mean" in caplog.text
