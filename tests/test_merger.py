"""RainMerger end to end on tiny random triples, against slow references written here."""

import copy
import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rain_hf import RainMerger, RainMergingConfig
from rain_hf.calibration import (
    CalibrationError,
    holdout_indices,
    prepare_instruction_calibration,
    prepare_reasoning_calibration,
    template_opens_think,
)
from rain_hf.checkpoints import CheckpointError
from rain_hf.config import CONFIG_NAME, ConfigError
from rain_hf.features import LayerReplay, NonFiniteFeaturesError, ThinkFeatures, move_tensors
from rain_hf.merger import ModelMismatchError
from rain_hf.testing import (
    build_tokenizer,
    build_triple,
    instruction_records,
    model_config,
    reasoning_records,
)
from rain_hf.writer import OutputExistsError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tokenizer):
    return build_triple(tmp_path_factory.mktemp("qwen2"), "qwen2", tokenizer=tokenizer)


def _merger(paths, **cfg):
    return RainMerger.from_pretrained(paths["base"], paths["reasoning"], paths["instruct"], RainMergingConfig(**cfg))


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def _capture_inputs(model, samples, names, positions):
    """Slow reference: each module's input rows at the given positions, one sample at a time."""
    modules = dict(model.named_modules())
    rows = {n: [] for n in names}
    for s in samples:
        pos = s.think_positions(*positions)
        handles = [modules[n].register_forward_pre_hook(
            lambda m, a, n=n, pos=pos: rows[n].append(a[0][0, pos].detach().double())) for n in names]
        with torch.no_grad():
            model(torch.tensor([s.input_ids]))
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_end_to_end_reloads_and_generates(tmp_path, tokenizer, arch):
    paths = build_triple(tmp_path, arch, tokenizer=tokenizer)
    merger = _merger(paths, lam=1.0)
    merger.merge(reasoning_records(), instruction_records())
    out = merger.save_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == tokenizer.chat_template
    enc = tok.apply_chat_template([{"role": "user", "content": "Max has 3 apples."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 4
    sidecar = json.loads((out / "rain_merging_config.json").read_text())
    assert sidecar["config"]["lam"] == 1.0 and sidecar["inputs"]["instruct"]["kind"] == "full"
    assert len(sidecar["report"]["head_coefficients"]) == 2
    assert (out / "README.md").is_file() and (out / "rain_merging_heatmap.png").is_file()
    # every tensor that is not merged is bit-identical to the reasoning model's
    merged = _weights(out)
    reasoning = _weights(paths["reasoning"])
    assert merged.keys() == reasoning.keys()
    for key, value in reasoning.items():
        if not key.endswith("proj.weight"):
            assert torch.equal(merged[key], value), key
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], reasoning["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("arch, geometry", [
    ("llama", {"num_attention_heads": 4, "num_key_value_heads": 4}),  # MHA
    ("llama", {"num_attention_heads": 4, "num_key_value_heads": 1}),  # MQA
    ("llama", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2}),  # groups of 3
    ("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24}),  # head_dim ≠ hidden / heads
], ids=["mha", "mqa", "group3", "qwen3-head_dim"])
def test_stage2_head_mapping_for_every_attention_geometry(tmp_path, tokenizer, arch, geometry):
    """Stage 2 scales the stage-1 Δ⊥ per query head (q rows, o columns), per kv head with the mean of its query
    heads (k/v rows) and per layer (MLP): (θ_1+2 − θ_R) = scale ⊙ (θ_1 − θ_R) on the same one-shot features."""
    paths = build_triple(tmp_path / "triple", arch, tokenizer=tokenizer, **geometry)
    common = dict(lam=1.5, sequential=False, coef_max=3.0)
    stage1 = RainMerger.from_pretrained(paths["base"], paths["reasoning"], paths["instruct"],
                                        RainMergingConfig(stage2=False, **common))
    stage1.merge(reasoning_records(3))
    both = RainMerger.from_pretrained(paths["base"], paths["reasoning"], paths["instruct"], RainMergingConfig(**common),
                                      features=stage1.features)
    both.merge(instruction_calibration=instruction_records(3))
    alpha = torch.tensor(both.report.head_coefficients, dtype=torch.float64)
    n_heads, n_kv = geometry["num_attention_heads"], geometry["num_key_value_heads"]
    hd = geometry.get("head_dim", geometry.get("hidden_size", 64) // n_heads)
    assert alpha.shape == (2, n_heads) and float(alpha.std()) > 1e-3
    reasoning = dict(AutoModelForCausalLM.from_pretrained(paths["reasoning"]).named_parameters())
    one, two = dict(stage1.model.named_parameters()), dict(both.model.named_parameters())
    for target in both.targets:
        key = target.name + ".weight"
        d1 = (one[key] - reasoning[key]).detach().double()
        d2 = (two[key] - reasoning[key]).detach().double()
        scale = _head_scale(target.name.rsplit(".", 1)[-1], alpha[target.layer], d1.shape, n_heads, n_kv, hd)
        assert torch.allclose(d2, scale * d1, atol=1e-6), key


def test_layer_subset_with_the_ridge_projection(qwen2, tokenizer):
    """layers=[1]: layer 0 stays the reasoning model's bit for bit; layer 1 gets the ridge projection of Δ
    (closed form on the captured features) scaled by α row 0, the row stage 2 reports for layer 1."""
    cfg = RainMergingConfig(lam=1.5, projection="ridge", ridge=1e-2, rcond=1e-9, layers=[1], positions="think+prev",
                            sequential=False)
    rec_r = reasoning_records(3)
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], cfg)
    merger.merge(rec_r, instruction_records(3))
    assert {t.layer for t in merger.targets} == {1} and merger.report.layers == [1]
    alpha = torch.tensor(merger.report.head_coefficients, dtype=torch.float64)
    assert alpha.shape == (1, 4) and not torch.allclose(alpha, torch.ones_like(alpha))
    reasoning = AutoModelForCausalLM.from_pretrained(qwen2["reasoning"])
    lib = dict(merger.model.named_parameters())
    for name, param in reasoning.named_parameters():
        if ".layers.1." not in name:
            assert torch.equal(lib[name], param), name
    names = [t.name for t in merger.targets]
    feats = _capture_inputs(reasoning, prepare_reasoning_calibration(rec_r, tokenizer, cfg), names,
                            ("think+prev", 0))
    base, instruct = _weights(qwen2["base"]), _weights(qwen2["instruct"])
    for n in names:
        key = n + ".weight"
        dw, h = (instruct[key] - base[key]).double(), feats[n]
        eps = cfg.ridge * torch.linalg.svdvals(h)[0] ** 2
        perp = dw - dw @ h.T @ torch.linalg.solve(h @ h.T + eps * torch.eye(h.shape[0], dtype=h.dtype), h)
        scale = _head_scale(n.rsplit(".", 1)[-1], alpha[0], dw.shape, 4, 2, 16)
        expected = reasoning.get_parameter(key).detach().double() + cfg.lam * scale * perp
        assert torch.allclose(lib[key].detach().double(), expected, atol=1e-5), n


def test_projection_residual_on_calibration_features(qwen2, tokenizer):
    cfg = dict(lam=1.0, stage2=False, rcond=1e-5, positions="window", window=1, sequential=False)
    merger = _merger(qwen2, **cfg)
    records = reasoning_records(3)
    merger.merge(records)
    reasoning = AutoModelForCausalLM.from_pretrained(qwen2["reasoning"])
    samples = prepare_reasoning_calibration(records, tokenizer, RainMergingConfig(**cfg))
    names = [t.name for t in merger.targets]
    feats = _capture_inputs(reasoning, samples, names, ("window", 1))
    base, instruct = _weights(qwen2["base"]), _weights(qwen2["instruct"])
    merged = dict(merger.model.named_parameters())
    for name in names:
        key = name + ".weight"
        h = feats[name]
        assert h.shape[0] < h.shape[1]  # fewer rows than dims: an exact null space exists
        dw = (instruct[key] - base[key]).double()
        dw_perp = merged[key].detach().double() - reasoning.get_parameter(key).detach().double()
        assert torch.linalg.norm(dw_perp @ h.T) <= 1e-4 * torch.linalg.norm(dw @ h.T), name
        assert merger.report.modules[name]["residual"] < 1e-4


@pytest.mark.parametrize("sequential", [False, True])
def test_float64_precision_projects_in_float64(tmp_path, tokenizer, sequential):
    """precision="float64" on a float64 triple: the merge is the float64 projection on the float64 SVD of the
    reasoning model's (or, sequential, the merged model's) features, to float64 rounding; a float32 SVD or float32
    arithmetic anywhere is ~1e-7 off."""
    paths = build_triple(tmp_path, "qwen2", tokenizer=tokenizer, dtype=torch.float64)
    cfg = dict(lam=1.0, stage2=False, sequential=sequential, precision="float64", rcond=1e-12, positions="think+prev",
               target_modules=["q_proj"] if sequential else "all-linear")
    records = reasoning_records(2)
    merger = _merger(paths, **cfg)
    merger.merge(records)
    names = [t.name for t in merger.targets]
    assert all(merger.features.basis(n)[0].dtype == torch.float64 for n in names)
    reasoning = AutoModelForCausalLM.from_pretrained(paths["reasoning"], dtype=torch.float64)
    # sequential: merged q_proj weights leave the queries at the thinking positions as they were (keys are not
    # merged), so the later layers' inputs there, which q_proj's features are, stay the reasoning model's
    feats = _capture_inputs(reasoning, prepare_reasoning_calibration(records, tokenizer, RainMergingConfig(**cfg)),
                            names, ("think+prev", 0))
    base, instruct = _weights(paths["base"]), _weights(paths["instruct"])
    merged = dict(merger.model.named_parameters())
    for n in names:
        key = n + ".weight"
        h = feats[n]
        assert h.dtype == torch.float64 and h.shape[0] < h.shape[1]
        _, s, vh = torch.linalg.svd(h, full_matrices=False)
        keep = vh[s > 1e-12 * s[0]].T
        dw = instruct[key] - base[key]
        expected = reasoning.get_parameter(key).detach() + (dw - dw @ keep @ keep.T)
        assert merged[key].dtype == torch.float64
        assert torch.allclose(merged[key].detach(), expected, rtol=0, atol=1e-12), n


def test_float64_precision_on_float32_checkpoints_rounds_once(qwen2):
    """precision="float64" on float32 checkpoints: θ_R + λ·ΔW⊥ is summed in float64 and rounded to float32 once,
    so every merged weight is within half a float32 ulp of the float64 result (ΔW⊥ rounded to float32 before the
    sum put about one weight in forty a whole ulp off)."""
    merger = _merger(qwen2, lam=3.0, stage2=False, sequential=False, precision="float64", rcond=1e-6,
                     target_modules=["q_proj", "o_proj"])
    merger.merge(reasoning_records(4))
    reasoning, base, instruct = _weights(qwen2["reasoning"]), _weights(qwen2["base"]), _weights(qwen2["instruct"])
    merged = dict(merger.model.named_parameters())
    half_ulp = torch.finfo(torch.float32).eps / 2
    for target in merger.targets:
        key = target.weight_key
        v, s = merger.features.basis(target.name)
        keep = v[:, s > 1e-6 * s[0]].double()
        dw = (instruct[key] - base[key]).double()  # the float32 checkpoints' difference, exact in float32
        exact = reasoning[key].double() + 3.0 * (dw - (dw @ keep) @ keep.T)
        assert merged[key].dtype == torch.float32
        assert ((merged[key].detach().double() - exact).abs() <= half_ulp * exact.abs() * (1 + 1e-9)).all(), key


@pytest.mark.parametrize("sequential", [False, True])
def test_project_bias_protects_modules_with_and_without_a_bias(qwen2, tokenizer, sequential):
    # Qwen2: q/k/v have biases (projected with them, [ΔW | Δb] against [H | 1]); o_proj and the MLP have none
    cfg = dict(lam=1.0, stage2=False, rcond=1e-5, positions="window", window=1, project_bias=True,
               sequential=sequential)
    merger = _merger(qwen2, **cfg)
    records = reasoning_records(3)
    merger.merge(records)
    if not sequential:  # only the groups that hold a bias get the column of ones
        for target in merger.targets:
            assert merger.features.basis(target.name)[0].shape[0] == target.shape[1] + target.has_bias, target.name
    model = merger.model if sequential else AutoModelForCausalLM.from_pretrained(qwen2["reasoning"])
    samples = prepare_reasoning_calibration(records, tokenizer, RainMergingConfig(**cfg))
    feats = _capture_inputs(model, samples, [t.name for t in merger.targets], ("window", 1))
    reasoning, base, instruct = (_weights(qwen2[role]) for role in ("reasoning", "base", "instruct"))
    merged = dict(merger.model.named_parameters())
    kinds = set()
    for target in merger.targets:
        h = feats[target.name]
        keys = [target.weight_key] + ([target.bias_key] if target.bias_key else [])
        applied = [merged[k].detach().double() - reasoning[k].double() for k in keys]
        task = [(instruct[k] - base[k]).double() for k in keys]
        out, before = h @ applied[0].T, h @ task[0].T
        if target.bias_key:
            assert float(applied[1].abs().max()) > 0, target.name
            out, before = out + applied[1], before + task[1]
        kinds.add(target.has_bias)
        assert torch.linalg.norm(out) <= 1e-4 * torch.linalg.norm(before), target.name
    assert kinds == {True, False}


def _own_input_residuals(merger, samples, positions):
    """Per module: ‖ΔW_merged Hᵀ‖ / ‖ΔW_instruct Hᵀ‖ with H the merged model's own inputs (slow reference)."""
    names = [t.name for t in merger.targets]
    feats = _capture_inputs(merger.model, samples, names, positions)
    reasoning = _weights(merger.sources["reasoning"].path)
    base, instruct = _weights(merger.sources["base"].path), _weights(merger.sources["instruct"].path)
    merged = dict(merger.model.named_parameters())
    out = {}
    for name in names:
        key = name + ".weight"
        h = feats[name]
        assert h.shape[0] < h.shape[1]  # fewer rows than dims: an exact null space exists
        applied = (merged[key].detach().double() - reasoning[key].double()) @ h.T
        out[name] = float(torch.linalg.norm(applied) / torch.linalg.norm((instruct[key] - base[key]).double() @ h.T))
    return out


def test_sequential_projection_is_null_on_the_merged_models_own_inputs(qwen2, tokenizer):
    cfg = dict(lam=3.0, stage2=False, rcond=1e-5, positions="window", window=1)
    records = reasoning_records(3)
    samples = prepare_reasoning_calibration(records, tokenizer, RainMergingConfig(**cfg))
    seq = _merger(qwen2, sequential=True, **cfg)
    seq.merge(records)
    one_shot = _merger(qwen2, sequential=False, **cfg)
    one_shot.merge(records)
    assert (seq.report.projection, one_shot.report.projection) == ("sequential", "one-shot")
    seq_res = _own_input_residuals(seq, samples, ("window", 1))
    one_res = _own_input_residuals(one_shot, samples, ("window", 1))
    assert max(seq_res.values()) < 1e-4, seq_res
    # the one-shot projection protects the reasoning model's inputs: after layer 0, the merged model's differ
    assert max(v for n, v in one_res.items() if ".layers.1." in n) > 1e-2, one_res
    # the first input group sees nothing merged before it, so both forms agree there
    first = dict(seq.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(first, dict(one_shot.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"])


def test_sequential_projection_covers_every_call_of_a_module_that_runs_twice(tmp_path, tokenizer):
    # Gemma 3n's AltUp router runs twice per layer on different inputs: both are protected, in the merged model
    # (the router is the only target here: the layer's other modules, downstream of its first call and upstream of
    # its second, would hold their reasoning weights when it is captured; see RainMergingConfig.sequential)
    paths = build_triple(tmp_path, "gemma3n", tokenizer=tokenizer)
    cfg = dict(lam=3.0, stage2=False, rcond=1e-5, positions="window", window=1, target_modules=["modality_router"])
    records = reasoning_records(2)
    samples = prepare_reasoning_calibration(records, tokenizer, RainMergingConfig(**cfg))
    merger = _merger(paths, sequential=True, **cfg)
    merger.merge(records)
    assert set(merger.features.settings["calls_per_pass"].values()) == {2}
    residuals = _own_input_residuals(merger, samples, ("window", 1))
    assert len(residuals) == 2 and max(residuals.values()) < 1e-4, residuals


def test_sequential_lam_search_measures_each_lambda_from_the_reasoning_weights(tmp_path, tokenizer):
    # The router's second call reads what its layer's attention and MLP wrote: searched after another λ, they held
    # that λ's merge, so λ 4's L_think depended on the grid values before it
    paths = build_triple(tmp_path, "gemma3n", tokenizer=tokenizer, noise=0.3)
    records = reasoning_records(10)

    def l_think_at_4(grid):
        merger = _merger(paths, lam="auto", lam_grid=grid, lam_auto_max_kl=1e9, stage2=False, sequential=True,
                         positions="window", window=2)
        merger.merge(records)
        return next(row["l_think"] for row in merger.report.lam_search if row["lam"] == 4.0), merger

    alone, merger = l_think_at_4([4.0])
    after_one, _ = l_think_at_4([1.0, 4.0])
    assert set(merger.features.settings["calls_per_pass"].values()) == {2}
    assert after_one == alone


def test_sequential_overflow_of_the_merged_model_is_named_and_fails_the_lam_search(tmp_path, tokenizer):
    # float16: at λ 3000 the merged layers overflow, not the reasoning model (its one-shot capture is finite)
    paths = build_triple(tmp_path, "llama", tokenizer=tokenizer, noise=0.5, dtype=torch.float16)
    records = reasoning_records(10)
    with pytest.raises(NonFiniteFeaturesError, match="taken on the model merged at λ=3000 up to that module"):
        _merger(paths, lam=3000.0, stage2=False, sequential=True).merge(records)
    merger = _merger(paths, lam="auto", lam_grid=[1.0, 3000.0], lam_auto_max_kl=1e9, stage2=False, sequential=True)
    merger.merge(records)  # the search went on: that λ fails the budget, as a NaN L_think does in the one-shot form
    assert merger.report.lam == 1.0
    assert merger.report.lam_search[1] == {"lam": 3000.0, "l_think": None, "think_open": None, "within_budget": False}


def test_layer_replay_counts_the_key_values_layers_share(tokenizer):
    # Gemma 3n's KV-sharing layers read keys/values from a KVSharingDict (a UserDict, not a dict) in the calls
    cfg = model_config("gemma3n", len(tokenizer), num_hidden_layers=4, num_kv_shared_layers=2,
                       activation_sparsity_pattern=[0.0] * 4,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    config = RainMergingConfig(lam=1.0, batch_size=3)
    replay = LayerReplay(model, prepare_reasoning_calibration(reasoning_records(6), tokenizer, config), config,
                         tokenizer.pad_token_id)
    tensors: dict[int, torch.Tensor] = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            tensors[id(obj)] = obj
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                walk(o)
        elif isinstance(obj, Mapping):
            for o in obj.values():
                walk(o)

    walk((replay.hidden, replay.calls))
    shared = [v for calls in replay.calls for _, kwargs in calls for v in kwargs.values()
              if isinstance(v, Mapping) and not isinstance(v, dict)]
    assert shared and any(len(s) for s in shared)
    assert replay.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())


def _replay_model(tokenizer, layer_types):
    torch.manual_seed(0)
    cfg = model_config("qwen2", len(tokenizer), num_hidden_layers=3, use_sliding_window=True, sliding_window=6,
                       max_window_layers=0, layer_types=layer_types)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_layer_replay_interrupted_while_it_registers_its_hooks_leaves_none(tokenizer, monkeypatch):
    samples = prepare_reasoning_calibration(reasoning_records(2), tokenizer, RainMergingConfig())
    model = _replay_model(tokenizer, ["full_attention"] * 3)
    real, calls = torch.nn.Module.register_forward_pre_hook, []

    def register(module, hook, **kwargs):
        calls.append(module)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(module, hook, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_pre_hook", register)
    with pytest.raises(KeyboardInterrupt):
        LayerReplay(model, samples, RainMergingConfig(), tokenizer.pad_token_id)
    monkeypatch.undo()
    assert not any(m._forward_pre_hooks for m in model.modules())  # a left hook broke every later forward pass


def test_layer_replay_matches_full_forward_passes(tokenizer):
    """Cached layer inputs replayed after a merge give the rows a full forward pass of the changed model gives,
    with padded batches and a sliding-window layer between full-attention ones."""
    config = RainMergingConfig(positions="window", window=2, batch_size=3)
    records = [{"prompt": "Max has 30 apples. " * 4 + "How many?", "reasoning": "30 - 0 = 30. " * 3,
                "response": "Max has 30 apples now."}] + reasoning_records(4)
    samples = prepare_reasoning_calibration(records, tokenizer, config)
    assert len({len(s.input_ids) for s in samples[:3]}) > 1  # the first batch is padded
    layer_types = ["full_attention", "sliding_attention", "full_attention"]
    model = _replay_model(tokenizer, layer_types)
    replay = LayerReplay(model, samples, config, tokenizer.pad_token_id)
    positions = (config.positions, config.window)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)] + ["model.layers.2.mlp.down_proj"]
    got = {0: torch.cat(replay.group_rows(0, [names[0]]))}
    with torch.no_grad():  # a "merge" of layer 0 that the later layers' inputs must see
        model.model.layers[0].self_attn.o_proj.weight.mul_(3.0)
    got[1] = torch.cat(replay.group_rows(1, [names[1]]))
    got[2] = torch.cat(replay.group_rows(2, [names[2]]))
    down = torch.cat(replay.group_rows(2, [names[3]]))
    ref = _capture_inputs(model, samples, names, positions)
    for i in range(3):
        torch.testing.assert_close(got[i].double(), ref[names[i]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(down.double(), ref[names[3]], atol=1e-5, rtol=1e-5)
    # the sliding window reaches the rows compared here: layer 2's inputs differ without it
    full = _replay_model(tokenizer, ["full_attention"] * 3)
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(_capture_inputs(full, samples, [names[2]], positions)[names[2]], ref[names[2]],
                              atol=1e-3)
    with pytest.raises(ValueError, match="forward order"):
        replay.group_rows(0, [names[0]])
    # the cache's size: one layer's inputs per batch, plus every other tensor argument once (by storage)
    hidden = sum(len(batch) * max(len(s.input_ids) for s in batch) * model.config.hidden_size * 4
                 for batch in (samples[:3], samples[3:]))
    others = {}
    for calls in replay.calls:
        for args, kwargs in calls:
            for t in [*args, *kwargs.values(), *(kwargs.get("position_embeddings") or ())]:
                if isinstance(t, torch.Tensor):
                    others[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
    assert replay.nbytes() == hidden + sum(others.values()) and len(others) > len(replay.calls)


def test_move_tensors_keeps_shared_tensors_shared():
    mask, cos, sin = torch.ones(2, 1, 4, 4, dtype=torch.bool), torch.zeros(2, 4, 8), torch.ones(2, 4, 8)
    layer0 = ((), {"attention_mask": mask, "position_embeddings": (cos, sin), "use_cache": False})
    layer1 = ((), {"attention_mask": mask, "position_embeddings": (cos, sin), "use_cache": False})
    moved: dict = {}
    out0 = move_tensors(layer0, torch.device("meta"), moved)
    out1 = move_tensors(layer1, torch.device("meta"), moved)
    assert out0[1]["attention_mask"].device.type == "meta" and out0[1]["attention_mask"].dtype == torch.bool
    assert out0[1]["use_cache"] is False and isinstance(out0[1]["position_embeddings"], tuple)
    # the layers' shared tensors are copied once and stay shared; distinct ones stay distinct
    assert out1[1]["attention_mask"] is out0[1]["attention_mask"]
    assert out1[1]["position_embeddings"][0] is out0[1]["position_embeddings"][0]
    assert out0[1]["position_embeddings"][0] is not out0[1]["position_embeddings"][1]
    assert len(moved) == 3


def test_sequential_offload_gives_the_same_merge(qwen2, tokenizer):
    cfg = dict(lam=2.0, stage2=False, sequential=True, positions="window", window=1, batch_size=2)
    on_device, offloaded = _merger(qwen2, **cfg), _merger(qwen2, sequential_offload=True, **cfg)
    on_device.merge(reasoning_records(5))
    offloaded.merge(reasoning_records(5))
    replay = LayerReplay(offloaded.model, offloaded._stage1_samples, offloaded.config, tokenizer.pad_token_id)
    assert replay.store == torch.device("cpu") and len(replay.devices) == len(replay.layers)
    merged = dict(on_device.model.named_parameters())
    assert all(torch.equal(v, merged[k]) for k, v in offloaded.model.named_parameters())
    assert offloaded.report.projection == "sequential"
    assert offloaded.report.replay_cache_bytes == on_device.report.replay_cache_bytes == replay.nbytes() > 0
    # on a CPU-only machine "offloaded" and "on the device" are one place: pretend layer 0 ran on another device
    # (meta) and check that a replayed batch is moved there, every tensor argument with it
    seen = []

    def layer(hidden, *args, **kwargs):
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        seen.append((hidden.device, [t.device for t in tensors]))
        return hidden

    replay.layers, replay.devices = [layer], [torch.device("meta")]
    replay._run_layer(0)
    assert seen[0][0].type == "meta" and seen[0][1] and all(d.type == "meta" for d in seen[0][1])
    # precomputed features only: the merge runs one-shot, and says the offload setting did nothing
    given = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                       RainMergingConfig(sequential_offload=True, **{**cfg, "sequential": None}),
                                       features=on_device.compute_features(reasoning_records(3)))
    given.merge()
    assert given.report.projection == "one-shot"
    assert any(w.startswith("This merge does not read sequential_offload=True") for w in given.report.warnings)
    assert replay.hidden[0].device == replay.store  # the cache itself stays where it is kept


def _answer_first(ids, close_id, tokenizer) -> int:
    """Index of the answer's first token: after </think> and the layout's whitespace tokens."""
    i = ids.index(close_id) + 1
    while tokenizer.decode([ids[i]]) in ("\n", "\n\n", " "):
        i += 1
    return i


def _reference_l_think(merged, reasoning, heldout, open_id, close_id, tokenizer) -> float:
    """Slow L_think: full forward passes, one held-out sample at a time, KL(merged ‖ reasoning) averaged over the
    thinking positions but the one predicting the answer's first token and those predicting prompt tokens (a free
    template: from the think-open decision on)."""
    kls = []
    for ids, positions in heldout:
        with torch.no_grad():
            log_m = torch.log_softmax(merged(torch.tensor([ids])).logits[0].double(), -1)
            log_r = torch.log_softmax(reasoning(torch.tensor([ids])).logits[0].double(), -1)
        kl = (log_m.exp() * (log_m - log_r)).sum(-1)
        before_answer = _answer_first(ids, close_id, tokenizer) - 1
        kls += [kl[p] for p in positions if p >= ids.index(open_id) - 1 and p != before_answer]
    return float(torch.stack(kls).mean())


def test_sequential_with_lam_auto_and_stage2(qwen2, tmp_path, tokenizer):
    # λ large enough for L_think (≈1e-4) to stand well above the batched/unbatched rounding noise (≈3e-8)
    merger = _merger(qwen2, sequential=True, lam_grid=[16.0, 32.0], lam_auto_max_kl=1.0)
    merger.merge(reasoning_records(8), instruction_records())
    assert [row["lam"] for row in merger.report.lam_search] == [16.0, 32.0]
    assert merger.report.lam == 32.0 and merger.report.head_coefficients is not None
    # each searched λ is measured on the sequential merge itself: a fixed-λ sequential merge on the six stage-1
    # samples, with the same stage 2, has the same L_think on the two held-out samples
    reasoning = AutoModelForCausalLM.from_pretrained(qwen2["reasoning"], dtype=torch.float32).eval()
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    held = holdout_indices(8, 0.25)
    stage1_records = [r for i, r in enumerate(reasoning_records(8)) if i not in held]
    for row in merger.report.lam_search:
        fixed = _merger(qwen2, sequential=True, lam=row["lam"])
        model = fixed.merge(stage1_records, instruction_records()).eval()
        assert fixed.report.projection == "sequential"
        expected = _reference_l_think(model, reasoning, merger.features.heldout, open_id, close_id, tokenizer)
        assert row["l_think"] == pytest.approx(expected, rel=1e-3)
    one_shot = _merger(qwen2, sequential=False, lam=32.0)
    model = one_shot.merge(stage1_records, instruction_records()).eval()
    other = _reference_l_think(model, reasoning, merger.features.heldout, open_id, close_id, tokenizer)
    assert abs(other - merger.report.lam_search[-1]["l_think"]) > 0.1 * other  # the two forms differ here
    out = merger.save_pretrained(tmp_path / "out")
    sidecar = json.loads((out / "rain_merging_config.json").read_text())
    assert sidecar["config"]["sequential"] is True
    assert sidecar["report"]["replay_cache_bytes"] == merger.report.replay_cache_bytes > 0


def test_sequential_needs_the_calibration_samples_unless_left_unset(qwen2):
    first = _merger(qwen2, lam=1.0, stage2=False)
    first.merge(reasoning_records(4))
    reuse = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                       RainMergingConfig(lam=1.0, stage2=False, sequential=True),
                                       features=first.features)
    before = {k: v.clone() for k, v in reuse.model.named_parameters()}
    with pytest.raises(ValueError, match="sequential=True .*pass reasoning_calibration"):
        reuse.merge()
    assert not reuse.merged
    assert all(torch.equal(v, before[k]) for k, v in reuse.model.named_parameters())
    # left unset, precomputed features give the one-shot projection; with the samples, the sequential one
    unset = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                       RainMergingConfig(lam=1.0, stage2=False), features=first.features)
    one_shot = _merger(qwen2, lam=1.0, stage2=False, sequential=False)
    one_shot.merge(reasoning_records(4))
    unset.merge()
    assert (first.report.projection, unset.report.projection) == ("sequential", "one-shot")
    assert all(torch.equal(v, dict(one_shot.model.named_parameters())[k]) for k, v in unset.model.named_parameters())


def test_first_layer_hidden_states_at_think_positions(qwen2, tokenizer):
    # k/v are left out: the think token's attention reads keys and values of every earlier position, which the
    # projection at the think positions does not protect; q, o and the MLP see only the think rows.
    cfg = dict(lam=3.0, stage2=False, rcond=1e-5, positions="think",
               target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    records = reasoning_records(4)
    samples = prepare_reasoning_calibration(records, tokenizer, RainMergingConfig(**cfg))
    reasoning = AutoModelForCausalLM.from_pretrained(qwen2["reasoning"])

    def layer0(model, s):
        with torch.no_grad():
            hs = model(torch.tensor([s.input_ids]), output_hidden_states=True).hidden_states[1]
        return hs[0, [s.think_open, s.think_close]]

    rain = _merger(qwen2, **cfg)
    rain.merge(records)
    plain = _merger(qwen2, **{**cfg, "stage1": False})
    plain.merge()
    for s in samples:
        ref = layer0(reasoning, s)
        assert torch.allclose(layer0(rain.model, s), ref, atol=1e-5)
        assert not torch.allclose(layer0(plain.model, s), ref, atol=1e-3)


def _head_scale(leaf: str, alpha_row: torch.Tensor, shape, n_heads: int, n_kv: int, hd: int) -> torch.Tensor:
    """Stage 2's scale of one module, by explicit loops: query rows and o_proj columns per head, k/v rows per kv
    head (the mean of its query heads), the MLP by the layer mean."""
    scale = torch.ones(shape, dtype=torch.float64)
    group = n_heads // n_kv
    for h in range(n_heads):
        if leaf == "q_proj":
            scale[h * hd:(h + 1) * hd, :] = alpha_row[h]
        if leaf == "o_proj":
            scale[:, h * hd:(h + 1) * hd] = alpha_row[h]
    for g in range(n_kv):
        if leaf in ("k_proj", "v_proj"):
            scale[g * hd:(g + 1) * hd, :] = alpha_row[[h for h in range(n_heads) if h // group == g]].mean()
    if leaf.endswith(("gate_proj", "up_proj", "down_proj")):
        scale[:] = alpha_row.mean()
    return scale


@pytest.mark.parametrize("stage2_settings", [{}, {"probe_lam": 0.5, "coef_normalize": "none"}],
                         ids=["defaults", "probe_lam+no_normalize"])
def test_gqa_reference_coefficients_and_merged_tensors(qwen2, tokenizer, stage2_settings):
    """Slow reference with explicit loops over heads (4 query heads, 2 kv heads)."""
    cfg = RainMergingConfig(lam=1.5, rcond=0.05, positions="think+prev", coef_max=3.0, sequential=False,
                            **stage2_settings)
    rec_r, rec_i = reasoning_records(3), instruction_records(3)
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], cfg)
    merger.merge(rec_r, rec_i)
    lib = {k: v.detach().double() for k, v in merger.model.named_parameters()}

    reasoning = AutoModelForCausalLM.from_pretrained(qwen2["reasoning"], attn_implementation="eager")
    base, instruct = _weights(qwen2["base"]), _weights(qwen2["instruct"])
    r_samples = prepare_reasoning_calibration(rec_r, tokenizer, cfg)
    names = [t.name for t in merger.targets]
    feats = _capture_inputs(reasoning, r_samples, names, ("think+prev", 0))

    def project(name):
        key = name + ".weight"
        dw = (instruct[key] - base[key]).double()
        _, s, vh = torch.linalg.svd(feats[name], full_matrices=False)
        b = vh[s > cfg.rcond * s[0]].T
        return dw - dw @ b @ b.T

    perp = {n: project(n) for n in names}
    probe = AutoModelForCausalLM.from_pretrained(qwen2["reasoning"], attn_implementation="eager")
    with torch.no_grad():
        for n in names:
            probe.get_parameter(n + ".weight").add_(cfg.probe_lam * perp[n].float())
    i_samples = prepare_instruction_calibration(rec_i, tokenizer, cfg)
    n_layers, n_heads, n_kv, hd = 2, 4, 2, 16
    a = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    u = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for s in i_samples:
        with torch.no_grad():
            attn = probe(torch.tensor([s.input_ids]), output_attentions=True).attentions
        instr = [t for x, y in s.instruction_spans for t in range(x, y)]
        resp = [t for x, y in s.constrained_spans for t in range(x, y)]
        unrel = [t for x, y in s.unrelated_spans for t in range(x, y)]
        for layer in range(n_layers):
            for h in range(n_heads):
                A = attn[layer][0, h].double()
                a[layer, h] += sum(float(A[t, instr].sum()) for t in resp) / len(resp) / len(i_samples)
                u[layer, h] += sum(float(A[t, instr].sum()) for t in unrel) / len(unrel) / len(i_samples)
    score = (a - cfg.rho * u) / (1 + u)
    alpha = (score / score.mean() if cfg.coef_normalize == "mean" else score).clamp(cfg.coef_min, cfg.coef_max)
    assert torch.allclose(torch.tensor(merger.report.head_coefficients, dtype=torch.float64), alpha, atol=1e-5)

    for n in names:
        layer = int(n.split(".")[2])
        leaf = n.rsplit(".", 1)[-1]
        scale = _head_scale(leaf, alpha[layer], perp[n].shape, n_heads, n_kv, hd)
        expected = reasoning.get_parameter(n + ".weight").detach().double() + cfg.lam * scale * perp[n]
        assert torch.allclose(lib[n + ".weight"], expected, atol=1e-5), n
        row = merger.report.modules[n]
        if leaf == "o_proj":
            # per-head column scales move Δ⊥ off the null space; the report gives the residual as merged
            dw = (instruct[n + ".weight"] - base[n + ".weight"]).double()
            merged = float(torch.linalg.norm((scale * perp[n]) @ feats[n].T)
                           / torch.linalg.norm((scale * dw) @ feats[n].T))
            assert row["residual_after_stage2"] == pytest.approx(merged, rel=2e-4), n
            assert row["residual_after_stage2"] != pytest.approx(row["residual"], rel=2e-3), n
        else:
            assert "residual_after_stage2" not in row, n


def test_features_reused_from_memory_and_disk(qwen2, tmp_path):
    first = _merger(qwen2, lam=1.0, stage2=False, sequential=False)  # reused features give the one-shot form
    first.merge(reasoning_records())
    path = tmp_path / "features.safetensors"
    first.features.save(path)
    again = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                       RainMergingConfig(lam=1.0, stage2=False), features=path)
    again.merge()
    for (k, v), (k2, v2) in zip(first.model.named_parameters(), again.model.named_parameters()):
        assert k == k2 and torch.equal(v, v2)
    assert "stage1_features" not in again.report.timings
    # features set by hand replace the computed ones whole: not the old samples' sequential form with them
    other = _merger(qwen2, lam=1.0, stage2=False)
    other.compute_features(reasoning_records(5))
    other.features = ThinkFeatures.load(path)
    other.merge()
    for (k, v), (k2, v2) in zip(first.model.named_parameters(), other.model.named_parameters()):
        assert k == k2 and torch.equal(v, v2)
    again.merge(reasoning_records())  # data given to merge() replaces the features given: said, not silent
    assert any("features passed to from_pretrained(features=...) are replaced" in w for w in again.report.warnings)
    loaded = ThinkFeatures.load(path)
    with pytest.raises(ValueError, match="positions"):
        loaded.check_compatible(RainMergingConfig(positions="think"), [])
    assert loaded.settings["loaded_dtype"] == "float32" and len(loaded.settings["tokenizer_digest"]) == 16
    assert "max_new_tokens" not in loaded.settings  # traces given, none generated: how to generate plays no part
    # a damaged file is refused when it is loaded, naming it, not with an internal error half way into a merge
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    group = next(iter(json.loads(meta["module_group"]).values()))
    for edit, says in ((lambda d: d.pop(f"{group}::s"), "missing or malformed"),
                       (lambda d: d.update({f"{group}::V": d[f"{group}::V"][:-1, :-1].contiguous()}), "missing or malformed"),
                       (lambda d: d.update({f"{group}::V": d[f"{group}::V"].bfloat16()}), "not the float32")):
        damaged = dict(tensors)
        edit(damaged)
        save_file(damaged, tmp_path / "damaged.safetensors", metadata=meta)
        with pytest.raises(ValueError, match=f"damaged.safetensors is damaged: the basis of {group} .*{says}"):
            ThinkFeatures.load(tmp_path / "damaged.safetensors")
    for extra in ("extra", f"{group}::U"):  # a tensor no group saves, with or without a group's name
        save_file({**tensors, extra: torch.zeros(2)}, tmp_path / "damaged.safetensors", metadata=meta)
        with pytest.raises(ValueError, match=f"is damaged: it holds a tensor '{re.escape(extra)}' that is no group's"):
            ThinkFeatures.load(tmp_path / "damaged.safetensors")
    save_file(tensors, tmp_path / "damaged.safetensors", metadata={**meta, "settings": "[]"})
    with pytest.raises(ValueError, match="is damaged: its module_group or settings"):
        ThinkFeatures.load(tmp_path / "damaged.safetensors")
    # a cut-off copy, or another kind of file: the same refusal, not safetensors' header error alone
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "notes.txt").write_text("not features")
    for name in ("cut.safetensors", "notes.txt"):
        with pytest.raises(ValueError, match=f"{name} is damaged: it is no complete safetensors file .*Compute the "
                                             r"features again \(RainMerger.compute_features\)"):
            ThinkFeatures.load(tmp_path / name)


def test_features_from_another_tokenizer_or_dtype_are_warned_about(qwen2, tmp_path):
    features = _merger(qwen2, lam=1.0, stage2=False).compute_features(reasoning_records())
    templated = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], templated)
    template = templated / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|assistant|>", "<|assistant|> "))
    merger = RainMerger.from_pretrained(qwen2["base"], templated, qwen2["instruct"],
                                        RainMergingConfig(lam=1.0, stage2=False), features=features,
                                        torch_dtype="float64")
    merger.merge()
    text = " ".join(merger.report.warnings)
    assert "computed with another tokenizer or chat template" in text
    assert "loaded in float32, this merge loads it in float64" in text
    # the same tokenizer after a padded, truncated call (batched generation between merges) is the same tokenizer
    same = _merger(qwen2, lam=1.0, stage2=False)
    same.compute_features(reasoning_records())
    same.tokenizer(["a b c", "a"], padding=True, truncation=True, max_length=2)
    same.merge()
    assert not any("another tokenizer" in w for w in same.report.warnings)


def test_features_set_after_a_merge_leave_its_record_alone(qwen2, tmp_path):
    path = tmp_path / "features.safetensors"
    _merger(qwen2, lam=1.0, stage2=False).compute_features(reasoning_records(3)).save(path)
    merger = _merger(qwen2, lam=1.0, stage2=False)
    merger.merge(reasoning_records(6))
    held = copy.deepcopy(merger.sidecar())  # a copy: the sidecar holds the report's own dicts
    merger.features = str(path)  # a path, as from_pretrained(features=PATH) takes it; no merge after it
    assert merger.features.settings["num_samples"] == 3
    assert merger.sidecar()["calibration"] == held["calibration"] and merger.sidecar()["report"] == held["report"]
    # a merge with features given (its calibration record comes from them) keeps theirs too
    given = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                       RainMergingConfig(lam=1.0, stage2=False), features=merger.features)
    given.merge()
    held = copy.deepcopy(given.sidecar())
    given.features = _merger(qwen2, lam=1.0, stage2=False).compute_features(reasoning_records(5))
    assert given.sidecar()["calibration"]["reasoning"]["num_samples"] == held["calibration"]["reasoning"][
        "num_samples"] == 3
    merger.merge()  # with the features set: its own record
    assert merger.sidecar()["calibration"]["reasoning"]["num_samples"] == 3
    assert "stage1_features" not in merger.report.timings  # computed elsewhere
    with pytest.raises(TypeError, match="merger.features takes ThinkFeatures .*got dict"):
        merger.features = {"basis": None}
    # the time compute_features took stays with its features across a merge that does not use them
    timed = _merger(qwen2, lam=1.0, stage2=False)
    timed.compute_features(reasoning_records(3))
    timed.config.method = "ties"
    timed.merge()
    assert "stage1_features" not in timed.report.timings
    timed.config.method = "rain"
    timed.merge()
    assert "stage1_features" in timed.report.timings


def test_compute_features_reads_the_config_as_merge_does(qwen2):
    import numpy as np

    merger = _merger(qwen2, lam=1.0, stage2=False)
    merger.config.think_spacing = ("\n", "\n", "\n\n")  # the default, as a tuple
    merger.config.window = np.int64(2)
    merger.compute_features(reasoning_records(3))
    merger.merge()  # the features match the config they were computed with
    for name, value, says in (("batch_size", 0, "batch_size"), ("precision", "float16", "precision"),
                              ("think_spacing", ["\n"], "think_spacing")):
        merger.config = copy.deepcopy(merger.plan.config)
        setattr(merger.config, name, value)
        with pytest.raises(ConfigError, match=says):
            merger.compute_features(reasoning_records(3))
        assert merger.merged  # refused before the merge held is undone


def test_a_failed_first_merge_has_nothing_to_describe(qwen2, monkeypatch):
    merger = _merger(qwen2, lam=1.0, stage2=False)
    original = RainMerger._merge_module
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RainMerger, "_merge_module", failing)
    with pytest.raises(KeyboardInterrupt):
        merger.merge(reasoning_records(3))
    assert not merger.merged
    with pytest.raises(RuntimeError, match="Nothing to describe: the model no longer holds a finished merge"):
        merger.sidecar()
    monkeypatch.setattr(RainMerger, "_merge_module", original)
    merger.merge(reasoning_records(3))
    assert merger.sidecar()["report"]["modules"]


def test_features_of_another_reasoning_model_or_template_are_refused(qwen2, tmp_path, tokenizer, caplog):
    features = _merger(qwen2, lam=1.0, stage2=False).compute_features(reasoning_records())
    assert features.settings["reasoning_fingerprint"].startswith("2-")
    other = build_triple(tmp_path / "other", "qwen2", seed=1, tokenizer=tokenizer)
    cfg = RainMergingConfig(lam=1.0, stage2=False)
    with pytest.raises(ValueError, match="another reasoning model"):
        RainMerger.from_pretrained(other["base"], other["reasoning"], other["instruct"], cfg, features=features).merge()
    merged = RainMerger.from_pretrained(other["base"], other["reasoning"], other["instruct"], cfg)
    merged.merge(reasoning_records())
    assert merged.report.projection == "sequential"
    merged.features = merged.features  # the same features set back: nothing changes
    merged.merge()
    assert merged.report.projection == "sequential"
    merged.features = features  # refused before the finished merge is undone
    with pytest.raises(ValueError, match="another reasoning model"):
        merged.merge()
    assert merged.merged and "stage1_features" in merged.report.timings  # the merge held keeps its own record
    # a fine-tune that differs only in its last merged module is another model too
    import shutil

    from safetensors.torch import save_file

    late = tmp_path / "late"
    shutil.copytree(qwen2["reasoning"], late)
    weights = _weights(late)
    weights["model.layers.1.mlp.down_proj.weight"] += 1e-3
    save_file(weights, late / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="another reasoning model"):
        RainMerger.from_pretrained(qwen2["base"], late, qwen2["instruct"], cfg, features=features).merge()
    # so is one that retrained only the think tokens' embedding rows, which may sit mid-table (Qwen: 151,648 of
    # 152,064), where neither the tensor's ends nor the reads spread over it see them
    from rain_hf.checkpoints import LazyCheckpoint, checkpoint_fingerprint, legacy_fingerprint

    think_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], cfg)
    reference = LazyCheckpoint(qwen2["reasoning"])
    assert merger._reasoning_fingerprint() == checkpoint_fingerprint(  # tied: the input embeddings only
        reference, sample_rows={"model.embed_tokens.weight": think_ids})
    untied = build_triple(tmp_path / "untied", "llama", tokenizer=tokenizer)  # its own lm_head rows count too
    untied_merger = RainMerger.from_pretrained(untied["base"], untied["reasoning"], untied["instruct"], cfg)
    assert untied_merger._reasoning_fingerprint() == checkpoint_fingerprint(
        LazyCheckpoint(untied["reasoning"]),
        sample_rows={"model.embed_tokens.weight": think_ids, "lm_head.weight": think_ids})
    mid_rows = tmp_path / "mid-rows"
    shutil.copytree(qwen2["reasoning"], mid_rows)
    weights = _weights(mid_rows)
    weights["model.embed_tokens.weight"][150] += 1e-2  # 300 rows of 256 bytes: bytes 38400-38656 of 76800
    save_file(weights, mid_rows / "model.safetensors", metadata={"format": "pt"})
    edited = LazyCheckpoint(mid_rows)
    assert checkpoint_fingerprint(edited) == checkpoint_fingerprint(reference)
    rows = {"model.embed_tokens.weight": [150]}
    assert checkpoint_fingerprint(edited, sample_rows=rows) != checkpoint_fingerprint(reference, sample_rows=rows)
    # a file from before version 2 records the tensor ends only: checked against those, with a warning
    old = ThinkFeatures(features.bases, features.module_group, dict(features.settings))
    old.settings["reasoning_fingerprint"] = legacy_fingerprint(reference)
    caplog.clear()
    with caplog.at_level("WARNING", logger="rain_hf.merger"):
        RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], cfg, features=old).merge()
    assert "saved by an older rain_hf, whose fingerprint of the reasoning model covers only the ends" in caplog.text
    with pytest.raises(ValueError, match="another reasoning model"):
        RainMerger.from_pretrained(qwen2["base"], late, qwen2["instruct"], cfg, features=old).merge()
    # the fingerprint is the checkpoint's, not the merge's: merging fewer layers with the same features is fine
    subset = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                        RainMergingConfig(lam=1.0, stage2=False, layers=[1]), features=features)
    subset.merge()
    assert {t.layer for t in subset.targets} == {1}
    with pytest.raises(ValueError, match="think_spacing"):
        features.check_compatible(RainMergingConfig(think_spacing=["", "", ""]), [])
    # a file from before the fingerprint: accepted, with a warning naming the model to check
    del features.settings["reasoning_fingerprint"]
    with caplog.at_level("WARNING", logger="rain_hf.merger"):
        RainMerger.from_pretrained(other["base"], other["reasoning"], other["instruct"], cfg, features=features).merge()
    assert "do not record which reasoning model" in caplog.text


def test_a_merge_that_fails_half_way_leaves_nothing_behind(qwen2, monkeypatch):
    import rain_hf.evaluation as ev
    import rain_hf.merger as merger_module

    cfg = dict(lam="auto", lam_grid=[1.0, 2.0], sequential=False, lam_auto_max_kl=1e-12)
    data = (reasoning_records(8), instruction_records(3))
    clean = _merger(qwen2, **cfg)
    clean.merge(*data)
    reasoning = _weights(qwen2["reasoning"])
    merger = _merger(qwen2, **cfg)
    for name, module in (("think_open_share", ev), ("collect_attention_stats", merger_module)):
        original = getattr(module, name)

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(module, name, interrupted)
        with pytest.raises(KeyboardInterrupt):
            merger.merge(*data)
        monkeypatch.setattr(module, name, original)
        assert not merger.merged
        params = dict(merger.model.named_parameters())
        assert all(torch.equal(params[t.weight_key].detach(), reasoning[t.weight_key]) for t in merger.targets), name
    merger.merge(*data)
    merger.merge(*data)  # twice: the report holds one merge's warnings
    for (k, v), (k2, v2) in zip(clean.model.named_parameters(), merger.model.named_parameters()):
        assert k == k2 and torch.equal(v, v2), k
    assert merger.report.lam_search == clean.report.lam_search
    assert merger.report.warnings == clean.report.warnings and len(clean.report.warnings) == 3
    assert clean.report.warnings[0].startswith("the instruct model changed 6 biases of merged modules")
    # a random "reasoning" model never opens the think block: lam=auto says so and names the argument order
    assert "opens the think block first on 0 of 5 calibration prompts" in clean.report.warnings[1]
    assert "(base_model, reasoning_model, instruct_model)" in clean.report.warnings[1]
    calibration = merger.sidecar()["calibration"]
    assert calibration["reasoning"]["sha256"] == clean.sidecar()["calibration"]["reasoning"]["sha256"]
    assert len(calibration["instruction"]["sha256"]) == 64


@pytest.mark.parametrize("method", ["rain", "ties"])
def test_a_final_pass_that_fails_half_way_puts_the_reasoning_model_back(qwen2, monkeypatch, method):
    import rain_hf.merger as merger_module
    import rain_hf.methods as methods_module

    merger = _merger(qwen2, method=method, lam=1.0, stage2=False, sequential=False)
    if method == "rain":
        merger.compute_features(reasoning_records())
    reasoning = _weights(qwen2["reasoning"])
    calls = {"n": 0}
    module, name = (methods_module, "merge_tensor") if method == "ties" else (merger_module, "project_svd")
    original = getattr(module, name)

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the fifth module: four are merged already
            raise OSError("disk read failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    with pytest.raises(OSError, match="disk read failed"):  # the failure itself, not a cleanup's
        merger.merge()
    assert calls["n"] == 5 and not merger.merged
    params = dict(merger.model.named_parameters())
    assert all(torch.equal(params[t.weight_key].detach(), reasoning[t.weight_key]) for t in merger.targets)


def test_an_interrupted_feature_capture_changes_nothing(qwen2, monkeypatch):
    import rain_hf.features as features_module

    merger = _merger(qwen2, lam=1.0, stage2=False)
    first = merger.compute_features(reasoning_records(3))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merger, "_tokenizer_digest", interrupted)  # after the capture, before the features are set
    with pytest.raises(KeyboardInterrupt):
        merger.compute_features(reasoning_records(5))
    assert merger.features is first and merger._features_calibration["num_samples"] == 3
    monkeypatch.undo()
    # a failure between registering the capture's hooks and the try that removes them leaves none behind
    monkeypatch.setattr(merger.model, "get_decoder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        features_module.capture_think_features(merger.model, [], merger.targets, merger.config, 0)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in merger.model.modules())


def test_bf16_output_rounds_once_from_fp32(qwen2, tmp_path):
    merger = _merger(qwen2, lam=1.0, stage1=False, stage2=False, output_dtype="bfloat16")
    merger.merge()
    out = merger.save_pretrained(tmp_path / "bf16")
    w = _weights(out)
    base, inst, reas = _weights(qwen2["base"]), _weights(qwen2["instruct"]), _weights(qwen2["reasoning"])
    key = "model.layers.1.mlp.down_proj.weight"
    assert w[key].dtype == torch.bfloat16
    assert torch.equal(w[key], (reas[key].float() + (inst[key].float() - base[key].float())).to(torch.bfloat16))
    assert w["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # what dtype="auto" loads


def test_crash_during_save_leaves_no_output(qwen2, tmp_path, monkeypatch):
    merger = _merger(qwen2, lam=1.0, stage1=False, stage2=False)
    merger.merge()
    import rain_hf.writer as writer

    calls = {"n": 0}
    original = writer.ShardedSafetensorsWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, name, tensor)

    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        merger.save_pretrained(tmp_path / "out", max_shard_size=20_000)
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    def full(self, name, tensor):  # a full disk: the error names the folder and the size the save needs
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "write", full)
    total = sum(v.numel() * v.element_size() for v in _weights(qwen2["reasoning"]).values())
    with pytest.raises(OSError, match=rf"holding \S+out ran out of space while the merged model was written: its "
                                      rf"weights take 0.00 GB \({total} bytes\).*Nothing was saved") as caught:
        merger.save_pretrained(tmp_path / "out")
    assert caught.value.errno == errno.ENOSPC
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_sharded_output_reloads(qwen2, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the card's usage snippet loads the folder, ~ expanded
    merger = _merger(qwen2, lam=1.0, stage1=False, stage2=False)
    merger.merge()
    out = merger.save_pretrained("~/sharded", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert f"model_id = {json.dumps(str(out))}" in (out / "README.md").read_text(encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(out)
    for k, v in model.named_parameters():
        assert torch.equal(v, merger.model.get_parameter(k)), k


# ------------------------------------------------------------------------------------ refusals (item 1)
def test_stage2_leaves_sliding_layers_that_never_reach_the_instruction_at_alpha_1(tmp_path, tokenizer):
    # layer 1 slides over 2 tokens: no constrained-response query reaches the instruction, so nothing is measured
    paths = build_triple(tmp_path / "t", "qwen2", tokenizer=tokenizer, use_sliding_window=True, sliding_window=2,
                         max_window_layers=1)
    cfg = dict(lam=1.0, sequential=False)
    merger = _merger(paths, **cfg)
    merger.merge(reasoning_records(3), instruction_records(3))
    assert merger.report.head_coefficients[1] == [1.0] * 4
    assert merger.report.alignment[1] == [None] * 4
    assert merger.report.head_coefficients[0] != [1.0] * 4 and None not in merger.report.alignment[0]
    warning = next(w for w in merger.report.warnings if w.startswith("stage 2: in layers [1] the local attention"))
    assert "α = 1 (stage 1 alone there)" in warning
    # the literal α are attention masses (≪ 1): the unmeasured layer gets their mean, not 1
    literal = _merger(paths, coef_normalize="none", **cfg)
    literal.merge(reasoning_records(3), instruction_records(3))
    measured = literal.report.head_coefficients[0]
    assert literal.report.head_coefficients[1] == pytest.approx([sum(measured) / 4] * 4, rel=1e-5)
    assert max(measured) < 0.5
    assert any(w.startswith("stage 2: in layers [1] the local attention") and
               f"α = {sum(measured) / 4:.3g} (the measured heads' mean)" in w for w in literal.report.warnings)
    stage1 = _merger(paths, stage2=False, **cfg)
    stage1.merge(reasoning_records(3))
    alone = dict(stage1.model.named_parameters())
    for name, param in merger.model.named_parameters():
        if ".layers.1." in name:
            assert torch.allclose(param, alone[name], rtol=0, atol=1e-7), name
    out = merger.save_pretrained(tmp_path / "out")
    sidecar = json.loads((out / "rain_merging_config.json").read_text(encoding="utf-8"),
                         parse_constant=lambda c: pytest.fail(f"{c} in the sidecar"))
    assert sidecar["report"]["alignment"][1] == [None] * 4
    assert warning in (out / "README.md").read_text(encoding="utf-8")


def test_stage2_overflowed_attention_is_named_not_read_as_unmeasured(tmp_path, tokenizer):
    # float16 q·k of layer 1's head 0 overflows: its softmax is NaN, which stage 2 took for a head no query reached
    paths = build_triple(tmp_path / "t", "qwen2", tokenizer=tokenizer, dtype=torch.float16)
    file = os.path.join(paths["reasoning"], "model.safetensors")
    weights = load_file(file)
    config = json.loads(open(os.path.join(paths["reasoning"], "config.json")).read())
    hd = config["hidden_size"] // config["num_attention_heads"]
    for leaf in ("q_proj", "k_proj"):
        weights[f"model.layers.1.self_attn.{leaf}.weight"][:hd] = 50.0
    save_file(weights, file, metadata={"format": "pt"})
    merger = _merger(paths, lam=1.0, stage1=False, think_spacing=["", "", ""])
    with pytest.raises(NonFiniteFeaturesError, match=r"layer 1 \(heads \[0\]\) hold inf or NaN in torch.float16.*"
                       r"probe_lam=1.0: lower probe_lam, or merge in a wider dtype"):
        merger.merge(instruction_calibration=instruction_records(3))
    for name, param in merger.model.named_parameters():  # the probe was taken back
        assert torch.equal(param.detach(), weights[name]), name


def _swap(paths, role, folder):
    return {**paths, role: folder}


def test_a_model_too_far_from_the_base_to_be_its_fine_tune_is_warned_about(organism_root, qwen2, tokenizer, tmp_path):
    other = build_triple(tmp_path / "other", "qwen2", seed=7, tokenizer=tokenizer)  # same shapes, another base

    def warned(*paths):
        return [w for w in RainMerger.plan(*paths).warnings if "where a fine-tune moves weights" in w]

    assert not warned(qwen2["base"], qwen2["reasoning"], qwen2["instruct"])
    ckpt = [os.path.join(organism_root, "checkpoints", r) for r in ("base", "reasoning", "instruct")]
    assert not warned(*ckpt)  # the organism's fine-tunes: 2–4 % of the weights' norm
    found = warned(qwen2["base"], qwen2["reasoning"], other["instruct"])
    assert len(found) == 1 and found[0].startswith("instruct_model differs from base_model by ")
    assert "is base_model the model instruct_model was fine-tuned from?" in found[0]
    found = warned(qwen2["base"], other["reasoning"], other["instruct"])
    assert [w.split(" ")[0] for w in found] == ["reasoning_model", "instruct_model"]


def test_an_instruct_model_given_as_the_reasoning_model_is_warned_about(organism_root, tmp_path):
    ckpt = {r: os.path.join(organism_root, "checkpoints", r) for r in ("base", "reasoning", "instruct")}
    data = os.path.join(organism_root, "data", "reasoning_calibration.json")
    config = RainMergingConfig(lam=1.0, stage2=False, think_spacing=["", "", ""])

    def warned(reasoning, instruct):
        merger = RainMerger.from_pretrained(ckpt["base"], ckpt[reasoning], ckpt[instruct], config)
        merger.compute_features(data)
        return [w for w in merger.report.warnings if "does not open <think> after the prompt" in w]

    assert not warned("reasoning", "instruct")
    found = warned("instruct", "reasoning")  # the organism's instruct model answers at once
    assert len(found) == 1 and "confidently writes something else first" in found[0]
    assert "the models go in the order base_model, reasoning_model, instruct_model" in found[0]
    # a template that writes <think> itself (bare, or with whitespace) leaves the model nothing to open: no probe
    for suffix in ("<think>", "<think>\n"):
        opened = tmp_path / f"opened{len(suffix)}"
        shutil.copytree(ckpt["instruct"], opened, dirs_exist_ok=True)
        template = (opened / "chat_template.jinja").read_text()
        assert template.count("<|assistant|>{%- endif -%}") == 1
        (opened / "chat_template.jinja").write_text(template.replace(
            "<|assistant|>{%- endif -%}", "<|assistant|>{{ " + repr(suffix) + " }}{%- endif -%}"))
        ckpt[f"opened{len(suffix)}"] = str(opened)
        assert not warned(f"opened{len(suffix)}", "reasoning")


def test_models_passed_in_another_order_are_warned_about(organism_root, qwen2, tmp_path):
    ckpt = {r: os.path.join(organism_root, "checkpoints", r) for r in ("base", "reasoning", "instruct")}
    def warned(*paths):
        return [w for w in RainMerger.plan(*paths).warnings if "point the same way" in w]

    for order, swapped in ((("base", "reasoning", "instruct"), False), (("reasoning", "base", "instruct"), True),
                           (("instruct", "reasoning", "base"), True), (("base", "instruct", "reasoning"), False)):
        found = warned(*(ckpt[r] for r in order))  # (reasoning and instruct swapped cannot be told from the weights)
        assert len(found) == int(swapped) and (not found or "check the order of the models" in found[0]), order
    assert not warned(qwen2["base"], qwen2["reasoning"], qwen2["instruct"])
    # right order, correlated task vectors (cos ≈ 0.37) and a smaller instruct one, which puts the instruct model
    # between the other two: no warning (the first version, which asked only that, warned)
    from safetensors.torch import save_file

    correlated = tmp_path / "correlated"
    shutil.copytree(qwen2["instruct"], correlated)
    base, reasoning, instruct = (_weights(qwen2[r]) for r in ("base", "reasoning", "instruct"))
    mixed = {}
    for key, b in base.items():
        delta_r, noise = reasoning[key] - b, instruct[key] - b
        scale = float(delta_r.norm() / noise.norm()) if float(noise.norm()) > 0 else 0.0
        mixed[key] = b + 0.2 * delta_r + 0.5 * scale * noise
    save_file(mixed, correlated / "model.safetensors", metadata={"format": "pt"})
    assert not warned(qwen2["base"], qwen2["reasoning"], correlated)
    assert len(warned(qwen2["reasoning"], qwen2["base"], correlated)) == 1


def test_the_order_warning_reads_only_weights_that_tell_something():
    from types import SimpleNamespace

    from rain_hf.merger import _order_warning

    gen = torch.Generator().manual_seed(0)

    def triple(swapped: bool):
        base = {f"w{i}": torch.randn(8, 16, generator=gen) for i in range(5)}
        tuned = [{k: v + 0.1 * torch.randn(8, 16, generator=gen) for k, v in base.items()} for _ in range(2)]
        roles = ({"base": tuned[0], "reasoning": base, "instruct": tuned[1]} if swapped
                 else {"base": base, "reasoning": tuned[0], "instruct": tuned[1]})
        checkpoints = {role: SimpleNamespace(shape=lambda k, d=d: tuple(d[k].shape), get=lambda k, d=d: d[k])
                       for role, d in roles.items()}
        return [SimpleNamespace(weight_key=k) for k in base], roles, checkpoints

    targets, roles, checkpoints = triple(swapped=False)
    roles["reasoning"]["w0"][0, 0] = float("nan")  # the first sampled weight: min() kept the NaN and warned
    assert _order_warning(targets, checkpoints) is None
    targets, roles, checkpoints = triple(swapped=True)
    roles["base"]["w2"] = roles["reasoning"]["w2"].clone()  # equal in the middle weight: the other two still tell
    warning = _order_warning(targets, checkpoints)
    assert warning is not None and warning.startswith("On 2 sampled weights")


def test_what_is_not_a_model_name_or_a_config_is_named(qwen2, tmp_path):
    from transformers import Qwen2Config

    model = AutoModelForCausalLM.from_pretrained(qwen2["base"])
    with pytest.raises(TypeError, match="base_model must be a Hub id or a local folder, got a Qwen2ForCausalLM: save"):
        RainMerger.from_pretrained(model, qwen2["reasoning"], qwen2["instruct"])
    with pytest.raises(TypeError, match="config must be a RainMergingConfig .*got Qwen2Config"):
        RainMerger.plan(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], Qwen2Config())
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['lam', 'stage2'\]: \['lam', 'stage2'\] are "
                                        r"merge settings, passed as config=RainMergingConfig\(lam=..., stage2=...\)"):
        RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], lam=2.0, stage2=False)
    with pytest.raises(TypeError, match=r"\['trust_remote_code'\] \(trust_remote_code: rain_hf loads the reasoning "
                                        r"model with transformers' own classes"):
        RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], trust_remote_code=True)
    # transformers' habits and typos get the spelling rain_hf has
    for kwargs, says in (({"lamda": 2.0}, r"\['lamda'\] \('lamda': did you mean the setting 'lam', as "
                                          r"config=RainMergingConfig\(lam=...\)\?\)"),
                         ({"tp_plan": "auto", "device_mesh": None}, r"\['device_mesh', 'tp_plan'\] \(device_mesh, "
                                                                     r"tp_plan: transformers loading options .*\.$"),
                         ({"unknow": 1}, r"\['unknow'\]\.$"),
                         ({"torch_dype": "float32"}, r"\('torch_dype': did you mean 'torch_dtype'\?\)"),
                         ({"cache_dir": "/x"}, r"\(cache_dir: set HF_HUB_CACHE or HF_HOME\)"),
                         ({"max_memory": {0: "1GB"}}, r"\(max_memory: pass a device_map dict, e.g. accelerate's")):
        with pytest.raises(TypeError, match=says):
            RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], **kwargs)
    with pytest.raises(TypeError, match=r"from_pretrained\(features=...\) takes ThinkFeatures .*got dict"):
        RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], features={"basis": None})
    merger = _merger(qwen2, method="task_arithmetic", lam=1.0)
    # a new config as a dict, as from_pretrained takes it; anything else is named at once
    merger.config = {"method": "task_arithmetic", "lam": 0.5}
    assert merger.config == RainMergingConfig(method="task_arithmetic", lam=0.5)
    layer0 = _merger(qwen2, method="task_arithmetic", layers=[0])
    layer0.config = {"method": "ties", "lam": 0.5}  # what the plan fixed stays, not the defaults
    assert layer0.config.layers == [0] and layer0.config.method == "ties"
    with pytest.raises(TypeError, match=r"merge\(\) got unexpected keyword arguments \['lam'\] \(merge settings: set "
                                        r"them on merger.config first, merger.config.lam = ...\)"):
        layer0.merge(lam=2.0)
    with pytest.raises(TypeError, match=r"\['layers'\] \(layers: fixed by the plan; make a new RainMerger"):
        layer0.merge(layers=[1])
    with pytest.raises(TypeError, match=r"push_to_hub\(\) got unexpected keyword arguments \['exist_ok', "
                                        r"'safe_serialization'\] \(exist_ok: .*\) \(safe_serialization: "):
        layer0.push_to_hub("me/x", safe_serialization=True, exist_ok=True)  # refused before any Hub call
    layer0.merge()
    with pytest.raises(TypeError, match="merger.config takes a RainMergingConfig or a dict of its fields; got str"):
        merger.config = "task_arithmetic"
    merger.config.lam = 1.0
    merger.merge()
    with pytest.raises(TypeError, match=r"save_pretrained\(\) got unexpected keyword arguments \['push_to_hub', "
                                        r"'safe_serialization'\] \(push_to_hub: push with merger.push_to_hub\(repo_id\) "
                                        r"instead\) \(safe_serialization: the weights are always written as safetensors\)"):
        merger.save_pretrained(tmp_path / "out", push_to_hub=True, safe_serialization=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="config must be a RainMergingConfig"):
        template_opens_think(AutoTokenizer.from_pretrained(qwen2["reasoning"]), Qwen2Config())


def test_refuses_other_architecture(qwen2, tmp_path, tokenizer):
    llama = build_triple(tmp_path, "llama", tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match="'llama' model .* reasoning model .* 'qwen2'"):
        RainMerger.plan(llama["base"], qwen2["reasoning"], qwen2["instruct"])


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 3}, "layer count differs"),
    ({"hidden_size": 96}, "hidden size differs"),
    ({"num_key_value_heads": 4}, "key/value heads differs"),
    ({"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16}, "attention heads differs"),
])
def test_refuses_geometry_mismatch(qwen2, tmp_path, tokenizer, change, message):
    from rain_hf.testing import model_config

    cfg = model_config("qwen2", len(tokenizer), **change)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "odd")
    tokenizer.save_pretrained(tmp_path / "odd")
    with pytest.raises(CheckpointError, match=message):
        RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "odd")


def test_refuses_tensor_shape_mismatch(qwen2, tmp_path):
    import shutil

    from safetensors.torch import save_file

    odd = tmp_path / "odd"
    shutil.copytree(qwen2["instruct"], odd)
    w = _weights(odd)
    w["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(w, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj.weight has shape \(100, 64\) in the instruct model"):
        RainMerger.plan(qwen2["base"], qwen2["reasoning"], odd)
    # saved from the bare decoder: the same architecture, the names without "model."
    bare = tmp_path / "bare"
    shutil.copytree(qwen2["instruct"], bare)
    save_file({k.split(".", 1)[1]: v for k, v in _weights(qwen2["instruct"]).items() if k.startswith("model.")},
              bare / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"stores its tensors without the 'model.' prefix \(layers.0.self_attn"
                                              r".q_proj.weight, not model.layers.0.self_attn.q_proj.weight\): it "
                                              "was saved from the bare decoder"):
        RainMerger.plan(qwen2["base"], qwen2["reasoning"], bare)


def test_a_reasoning_checkpoint_missing_unmerged_tensors_is_refused(qwen2, tmp_path):
    # the plan checks the merged tensors; transformers would fill the others (a norm here) at random
    folder = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], folder)
    weights = _weights(folder)
    del weights["model.layers.1.post_attention_layernorm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors its model class needs \(model.layers.1."
                                              r"post_attention_layernorm.weight\).*Pass the complete checkpoint"):
        RainMerger.from_pretrained(qwen2["base"], folder, qwen2["instruct"], RainMergingConfig(lam=1.0))


def test_refuses_missing_and_non_safetensors_inputs(qwen2, tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing local folder nor a valid Hub id"):
        RainMerger.plan(qwen2["base"], tmp_path / "nope" / "deeper", qwen2["instruct"])
    with pytest.raises(CheckpointError, match=r"If 'checkpoint-500' is a subfolder of the Hub repository 'me/run', "
                                              r"download it .*hf download me/run --include 'checkpoint-500/\*'"):
        RainMerger.plan(qwen2["base"], qwen2["reasoning"], "me/run/checkpoint-500")
    binonly = tmp_path / "bin"
    binonly.mkdir()
    (binonly / "config.json").write_text((qwen2["base"] / "config.json").read_text())
    torch.save({}, binonly / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="convert them to safetensors"):
        RainMerger.plan(binonly, qwen2["reasoning"], qwen2["instruct"])


def test_refuses_quantized_inputs(qwen2, tmp_path):
    import shutil

    from safetensors.torch import save_file

    fp8 = tmp_path / "fp8"
    shutil.copytree(qwen2["instruct"], fp8)
    w = _weights(fp8)
    key = "model.layers.0.self_attn.q_proj.weight"
    w[key] = w[key].to(torch.float8_e4m3fn)
    save_file(w, fp8 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key} is stored as torch.float8_e4m3fn in the instruct model"):
        RainMerger.plan(qwen2["base"], qwen2["reasoning"], fp8)
    config = json.loads((qwen2["instruct"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    shutil.rmtree(fp8)
    shutil.copytree(qwen2["instruct"], fp8)
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"instruct model .* is quantized \(quant_method='fp8'\)"):
        RainMerger.plan(qwen2["base"], qwen2["reasoning"], fp8)


def test_damaged_or_ambiguous_checkpoint_folders(qwen2, tmp_path, caplog, monkeypatch):
    import shutil

    from safetensors.torch import save_file

    from rain_hf.checkpoints import LazyCheckpoint, checkpoint_fingerprint

    folder = tmp_path / "sharded"
    shutil.copytree(qwen2["base"], folder)
    # a stale single file next to shards: transformers loads the single file, so the merge must read it too
    weights = _weights(qwen2["base"])
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in weights}}))
    with caplog.at_level(logging.WARNING, logger="rain_hf.checkpoints"):
        both = LazyCheckpoint(folder, "the base model")
    assert torch.equal(both.get("model.norm.weight"), weights["model.norm.weight"])
    assert "the base model holds both model.safetensors and model.safetensors.index.json; transformers loads " \
           "model.safetensors, and so does rain_hf" in caplog.text
    assert torch.equal(AutoModelForCausalLM.from_pretrained(folder).model.norm.weight.detach(),
                       weights["model.norm.weight"])  # what transformers loads
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": ')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not valid JSON"):
        LazyCheckpoint(folder)
    for damaged in ('{"metadata": {}}', '{"weight_map": {}}'):  # an empty map says nothing of the shards beside it
        (folder / "model.safetensors.index.json").write_text(damaged)
        with pytest.raises(CheckpointError, match="no valid 'weight_map'.*download or save it again"):
            LazyCheckpoint(folder)
    # no index, no model.safetensors: every *.safetensors is read, and a tensor in two files is an error
    loose = tmp_path / "loose"
    loose.mkdir()
    save_file(weights, loose / "part-a.safetensors")
    save_file({"model.norm.weight": torch.zeros(64)}, loose / "part-b.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight is in both part-a.safetensors and part-b"):
        LazyCheckpoint(loose)
    (loose / "part-b.safetensors").rename(loose / "adapter_model.safetensors")  # not part of the model
    assert torch.equal(LazyCheckpoint(loose).get("model.norm.weight"), weights["model.norm.weight"])
    # a dtype rain_hf cannot read only matters for a tensor that is read
    save_file({**weights, "odd_buffer": torch.zeros(3, dtype=torch.complex64)}, loose / "part-a.safetensors")
    ckpt = LazyCheckpoint(loose)
    assert ckpt.get("model.norm.weight").shape == (64,)
    assert len(checkpoint_fingerprint(ckpt)) == 18  # reads the stored dtype names only
    # a header whose shape does not fit its bytes is refused when the file is opened, naming the tensor
    data = (loose / "part-a.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["model.norm.weight"]["shape"] = [65]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    assert len(text) == size
    (loose / "part-a.safetensors").write_bytes(data[:8] + text + data[8 + size:])
    with pytest.raises(CheckpointError, match=r"part-a.safetensors has a damaged header entry for model.norm.weight "
                                              r"\(shape \[65\] of F32 needs 260 bytes, its offsets give 256\)"):
        LazyCheckpoint(loose)
    # two tensors whose offsets overlap would share bytes (safetensors refuses such a file too)
    overlapping = tmp_path / "overlapping"
    overlapping.mkdir()
    header_bytes = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                               "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
    (overlapping / "model.safetensors").write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes
                                                    + bytes(24))
    with pytest.raises(CheckpointError, match=r"model.safetensors is damaged: tensors a and b overlap in its data"):
        LazyCheckpoint(overlapping)
    # what safetensors refuses: a header that is no object, offsets into the header, shapes that are no sizes
    for header, says in (([], "its header is a JSON list"),
                         ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, r"offsets \[-4, 0\]"),
                         ({"a": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}, r"shape \[-1, -1\]"),
                         ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, r"shape \[1.5\]")):
        header_bytes = json.dumps(header).encode()
        (overlapping / "model.safetensors").write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes
                                                        + bytes(24))
        with pytest.raises(CheckpointError, match=says):
            LazyCheckpoint(overlapping)
    (loose / "part-a.safetensors").write_bytes(data[:-100])  # cut short: the header is fine, the data is not
    with pytest.raises(CheckpointError, match=r"^\S+: \S+part-a.safetensors is truncated: tensor \S+ ends at byte "
                                              r"\d+, the file has \d+\. Download or save the checkpoint again\.$"):
        LazyCheckpoint(loose)
    for cut, says in ((3, r"it has 3 bytes, fewer than a safetensors file's 8-byte header length"),
                      (8 + size // 2, rf"its header needs {8 + size} bytes, the file has {8 + size // 2}")):
        (loose / "part-a.safetensors").write_bytes(data[:cut])  # cut off inside the header
        with pytest.raises(CheckpointError, match=rf"part-a.safetensors is truncated: {says}\. Download or save "
                                                  r"the checkpoint again\.$"):  # said once, not wrapped again
            LazyCheckpoint(loose)
    (loose / "part-a.safetensors").write_bytes(b"\x10" + bytes(7) + b"not json here!!!")
    with pytest.raises(CheckpointError, match=r"is not a valid safetensors file \(.*\): download or save the"):
        LazyCheckpoint(loose)
    (loose / "part-a.safetensors").write_bytes(data)  # whole again, for the reads below
    # a Hub snapshot without safetensors: the repository may ship .bin weights only, which are not fetched
    snapshot = tmp_path / "hub" / "models--org--bin-only" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"The Hub repository org/bin-only may ship only PyTorch .bin weights.* "
                                              r"Or: this is the Hub cache's snapshot of org/bin-only, which may be "
                                              r"incomplete .*`hf download org/bin-only --revision 0{40}`"):
        LazyCheckpoint(snapshot)
    # a repository without an owner is cached as models--name; a shard missing from a snapshot is a partial download
    from rain_hf.checkpoints import _hub_identity_of_folder

    bare = tmp_path / "hub" / "models--tinyreason" / "snapshots" / ("a" * 40)
    bare.mkdir(parents=True)
    assert _hub_identity_of_folder(bare) == ("tinyreason", "a" * 40)
    save_file(weights, bare / "model-00001-of-00002.safetensors")
    (bare / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002.safetensors is missing from .* This is the "
                                              r"Hub cache's snapshot of tinyreason, which may be incomplete"):
        LazyCheckpoint(bare)
    # only the ends of each tensor are read: a change in the middle of one is not seen, one at an end is
    reference = LazyCheckpoint(qwen2["reasoning"])
    edited = tmp_path / "edited"
    shutil.copytree(qwen2["reasoning"], edited)
    tensors = _weights(edited)
    tensors["model.layers.1.mlp.up_proj.weight"][64, 3] += 1.0  # 128×64 fp32: byte 16396 of 32768
    save_file(tensors, edited / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_fingerprint(LazyCheckpoint(edited)) == checkpoint_fingerprint(reference)
    tensors["model.layers.1.mlp.up_proj.weight"][-1, -1] += 1.0
    save_file(tensors, edited / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_fingerprint(LazyCheckpoint(edited)) != checkpoint_fingerprint(reference)
    with pytest.raises(CheckpointError, match="odd_buffer has dtype C64, which rain_hf cannot read"):
        ckpt.get("odd_buffer")
    # with an index, a tensor in two shards is read from the shard the index names
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    save_file(weights, indexed / "model-00001-of-00002.safetensors")
    save_file({"model.norm.weight": torch.zeros(64)}, indexed / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in weights}
    (indexed / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(LazyCheckpoint(indexed).get("model.norm.weight"), weights["model.norm.weight"])
    def refused_with(changes: dict[str, str], message: str) -> None:
        (indexed / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**weight_map, **changes}}))
        with pytest.raises(CheckpointError, match=message):
            LazyCheckpoint(indexed)

    # ... but when the index lists both shards, transformers reads both and may keep the other copy: refused
    refused_with({"model.norm.weight": "model-00002-of-00002.safetensors"},
                 r"tensor model.norm.weight \(and 0 more\) is stored in both model-00002-of-00002.safetensors and "
                 r"model-00001-of-00002.safetensors; model.safetensors.index.json names model-00002")
    # an index that names the wrong shard says so, instead of calling the checkpoint incomplete
    refused_with({"model.layers.0.mlp.up_proj.weight": "model-00002-of-00002.safetensors"},
                 r"names model-00002-of-00002.safetensors for tensor model.layers.0.mlp.up_proj.weight \(and 0 "
                 r"more\), but it is in model-00001-of-00002.safetensors: the index is wrong")
    (indexed / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="no valid 'weight_map'"):
        LazyCheckpoint(indexed)
    # shard names climbing out of the folder would feed another file into the merge (and the upload)
    outside = tmp_path / "outside.safetensors"
    save_file(weights, outside)
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        (indexed / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**weight_map,
                                                                                         "model.norm.weight": name}}))
        with pytest.raises(CheckpointError, match=f"names the shard {re.escape(repr(name))}, outside the "
                                                  "checkpoint's folder; shards are files in the folder"):
            LazyCheckpoint(indexed)
    from rain_hf import checkpoints

    (indexed / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    size = (indexed / "model.safetensors.index.json").stat().st_size
    monkeypatch.setattr(checkpoints, "MAX_JSON_BYTES", size - 1)  # a gigabyte of index, in small
    with pytest.raises(CheckpointError, match=rf"holds {size} bytes, more than the 0 MB any model's JSON file needs"):
        LazyCheckpoint(indexed)


def test_hub_fetch_skips_the_native_mistral_copy_of_the_weights(qwen2, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    from rain_hf.checkpoints import ADAPTER_PATTERNS, resolve_model

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(qwen2["base"])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert resolve_model("mistralai/Some-Reasoner").path == qwen2["base"].resolve()
    repo = ["config.json", "consolidated.safetensors", "params.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "pytorch_model.bin"]
    fetched = list(filter_repo_objects(repo, allow_patterns=calls[0]["allow_patterns"],
                                       ignore_patterns=calls[0]["ignore_patterns"]))
    assert fetched == ["config.json", "params.json", "model-00001-of-00002.safetensors",
                       "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    resolve_model("me/adapter", allow_patterns=ADAPTER_PATTERNS)
    assert calls[1]["allow_patterns"] == ADAPTER_PATTERNS and calls[1]["ignore_patterns"] is None
    with pytest.raises(ValueError, match=r"^The model '.*config.json' is a file"):  # no role given: "The model"
        resolve_model(str(qwen2["base"] / "config.json"))


def test_revisions_reach_the_hub_fetch_per_role(qwen2, monkeypatch):
    fetched = {}

    def fake_snapshot_download(repo_id, **kwargs):
        fetched[repo_id] = kwargs.get("revision")
        return str(qwen2[repo_id.split("/")[1]])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    plan = RainMerger.plan("org/base", "org/reasoning", "org/instruct",
                           revision={"instruct": "v2", "reasoning": "a" * 40})
    assert fetched == {"org/base": None, "org/reasoning": "a" * 40, "org/instruct": "v2"}
    assert plan.sources["instruct"].hub_id == "org/instruct"
    RainMerger.plan("org/base", "org/reasoning", "org/instruct", revision="main")
    assert set(fetched.values()) == {"main"}
    with pytest.raises(ConfigError, match="unknown roles"):
        RainMerger.plan("org/base", "org/reasoning", "org/instruct", revision={"instruction": "v2"})


def test_refuses_think_tokens_that_are_not_single_tokens(qwen2, tmp_path):
    with pytest.raises(CalibrationError, match="<reason>"):
        RainMerger.plan(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                        RainMergingConfig(think_open="<reason>", think_close="</reason>"))
    # tokens added to the tokenizer but not to the embeddings: refused by the plan, not by the forward pass
    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    tokenizer = AutoTokenizer.from_pretrained(reasoning)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<reason>", "</reason>"]})
    tokenizer.save_pretrained(reasoning)
    with pytest.raises(ModelMismatchError, match=r"gives the think tokens \{'<reason>': \d+, '</reason>': \d+\} ids "
                                                 r"beyond the vocab_size=\d+ of its config.json"):
        RainMerger.plan(qwen2["base"], reasoning, qwen2["instruct"],
                        RainMergingConfig(think_open="<reason>", think_close="</reason>", method="task_arithmetic"))
    # a folder without tokenizer files: transformers gives an empty tokenizer, not an error
    for name in os.listdir(reasoning):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            os.remove(reasoning / name)
    with pytest.raises(CheckpointError, match=r"has no tokenizer files \(tokenizer.json, tokenizer_config.json"):
        RainMerger.plan(qwen2["base"], reasoning, qwen2["instruct"], RainMergingConfig(method="task_arithmetic"))


def test_a_checkpoint_missing_a_tensor_its_config_describes_is_named_incomplete(qwen2, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(qwen2["base"], base)
    weights = load_file(base / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelMismatchError, match=r"The base model .* has no tensor model.layers.1.mlp.down_proj.weight"
                                                 r", which the merge needs .*: the checkpoint is incomplete"):
        RainMerger.plan(base, qwen2["reasoning"], qwen2["instruct"], RainMergingConfig(method="task_arithmetic"))


def test_vocab_difference_is_reported_not_refused(qwen2, tmp_path, tokenizer):
    from rain_hf.testing import model_config

    cfg = model_config("qwen2", len(tokenizer) + 8)
    big = AutoModelForCausalLM.from_config(cfg)
    big.save_pretrained(tmp_path / "big")
    plan = RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "big")
    assert any("vocabulary sizes differ" in w for w in plan.warnings)
    assert "vocab sizes" in plan.summary()
    # the header names what the method reads: slerp's t (not λ), the DARE methods' density and seed
    slerp = RainMerger.plan(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                            RainMergingConfig(method="slerp", slerp_t=0.3))
    assert slerp.summary().splitlines()[0] == "rain_hf merge plan (method=slerp, slerp_t=0.3)"
    dare = RainMerger.plan(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                           RainMergingConfig(method="dare_ties", lam=0.8, density=0.2, seed=4))
    assert dare.summary().splitlines()[0] == "rain_hf merge plan (method=dare_ties, lam=0.8, density=0.2, seed=4)"
    ridge = RainMerger.plan(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                            RainMergingConfig(projection="ridge", ridge=0.05, positions="think", lam=1.0))
    assert "stage 1: on (positions=think, ridge, ridge=0.05); stage 2: on" in ridge.summary()


def test_missing_calibration_is_a_clear_error(qwen2):
    merger = _merger(qwen2, lam=1.0)
    with pytest.raises(ValueError, match="reasoning_calibration"):
        merger.merge()
    merger = _merger(qwen2, lam=1.0, stage1=False)
    with pytest.raises(ValueError, match="instruction_calibration"):
        merger.merge()


@pytest.mark.parametrize("trained", ["lora", "lora+copies+biases"])
def test_lora_instruct_model_merges_like_its_merged_copy(qwen2, tmp_path, trained):
    """A LoRA adapter as instruct model gives the same merge as the full model from merge_and_unload(), also with
    trained full copies (modules_to_save on a merged module) and trained biases merged with project_bias."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(qwen2["base"])
    extra = {} if trained == "lora" else {"modules_to_save": ["o_proj"], "bias": "all"}
    targets = "all-linear" if trained == "lora" else ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                      "down_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or (p.requires_grad and "lora_" not in name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "adapter")
    full = peft_model.merge_and_unload()
    full.save_pretrained(tmp_path / "full")
    AutoTokenizer.from_pretrained(qwen2["base"]).save_pretrained(tmp_path / "full")

    cfg = RainMergingConfig(lam=1.0, stage2=False, project_bias=trained != "lora")
    records = reasoning_records(3)
    results = {}
    for kind in ("adapter", "full"):
        merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], tmp_path / kind, cfg)
        merger.merge(records)
        results[kind] = {k: v.detach().clone() for k, v in merger.model.named_parameters()}
        assert merger.plan.instruct_kind == ("lora" if kind == "adapter" else "full")
    for key, value in results["full"].items():
        assert torch.allclose(results["adapter"][key], value, atol=1e-6), key


def test_offloaded_modules_are_refused(qwen2, tmp_path):
    """accelerate keeps offloaded weights outside the model (meta tensors): a merge there would write nothing."""
    from accelerate import dispatch_model

    from rain_hf.merger import refuse_offloaded

    model = AutoModelForCausalLM.from_pretrained(qwen2["reasoning"])
    refuse_offloaded(model, "auto")  # all on one device: fine
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map, offload_dir=str(tmp_path / "offload"))
    with pytest.raises(ConfigError, match=r"offloaded \d+ modules to CPU or disk \(e\.g\. model\.layers\.1\."):
        refuse_offloaded(model, device_map)


def test_device_map_auto_loads_and_merges(qwen2):
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                        RainMergingConfig(lam=1.0, stage2=False), device_map="auto")
    merger.merge(reasoning_records(2))
    assert merger.merged and merger.report.modules
    plain = _merger(qwen2, lam=1.0, stage2=False)
    plain.merge(reasoning_records(2))
    for (k, v), (k2, v2) in zip(merger.model.named_parameters(), plain.model.named_parameters()):
        assert k == k2 and torch.equal(v, v2), k


def test_lam_auto_picks_largest_lambda_within_think_budget(qwen2):
    grid = [0.5, 1.0, 4.0, 16.0]
    loose = _merger(qwen2, lam="auto", lam_grid=grid, stage2=False, lam_auto_max_kl=1.0)
    loose.merge(reasoning_records(8))
    kl = [row["l_think"] for row in loose.report.lam_search]
    assert [row["lam"] for row in loose.report.lam_search] == grid and 0 < kl[0] < kl[1] < kl[2] < kl[3]
    assert loose.report.lam == 16.0
    # a budget between λ 1's and λ 4's L_think: the search must stop at 1
    assert any("the largest λ of the grid, 16.0, keeps L_think" in w for w in loose.report.warnings)
    tight = _merger(qwen2, lam="auto", lam_grid=grid, stage2=False, lam_auto_max_kl=(kl[1] * kl[2]) ** 0.5)
    tight.merge(reasoning_records(8))
    assert tight.report.lam == 1.0 and not any("largest λ" in w for w in tight.report.warnings)
    printed = str(tight.report)  # what print(merger.report) shows: how λ was chosen, how stage 1 projected
    assert "MergeReport(method=rain, lam=1.0)\n  λ chosen by lam='auto' on the grid [0.5, 1.0, 4.0, 16.0] (within the " \
           "budget: [0.5, 1.0])\n  stage 1: sequential projection\n" in printed
    assert [row["l_think"] for row in tight.report.lam_search] == pytest.approx(kl, rel=1e-6)
    assert tight.features.settings["num_samples"] == 6  # two of eight held out to measure L_think
    # exactly on the budget (L_think ≤ δ, think-open share ≥ its guard): within it; a hair over: not
    at = dict(tight.report.lam_search[1], l_think=tight.config.lam_auto_max_kl, think_open=0.5)
    tight.config.lam_auto_min_think_open = 0.5
    assert tight._passes(at) and not tight._passes(dict(at, l_think=math.nextafter(at["l_think"], 1.0)))
    assert not tight._passes(dict(at, think_open=math.nextafter(0.5, 0.0)))
    # below every λ's: the smallest, with a warning
    none = _merger(qwen2, lam="auto", lam_grid=grid, stage2=False, lam_auto_max_kl=kl[0] / 2)
    none.merge(reasoning_records(8))
    assert none.report.lam == 0.5 and any("no λ of the grid" in w for w in none.report.warnings)


@pytest.mark.parametrize("forced, spacing, position_set", [
    ("", "\n\n", "window-before-answer"), ("<think>", "\n\n", "window-before-answer"),
    ("<think>\n", "\n\n", "window-before-answer"), ("", "", "window-before-answer"), ("", "\n\n", "window"),
    ("", "", "window")], ids=["free", "think", "think-newline", "free-unspaced", "free-window", "unspaced-window"])
def test_lam_auto_l_think_leaves_out_the_answers_first_prediction_and_prompt_positions(qwen2, tokenizer, tmp_path,
                                                                                        forced, spacing, position_set):
    # The answer's first token is where format instructions act: lam="auto" must not count the change of its
    # prediction (at </think>, or at the last of the whitespace the layout writes after it) against λ; nor
    # predictions of tokens the prompt supplies (the template's tokens before the
    # think-open decision, and <think> itself where the template writes it, and the "\n" after it where the
    # template writes that too, as R1-Distill's and QwQ's do): they never shape a generation. Slow reference: full
    # forward passes of each searched λ, one sample at a time.
    reasoning_folder = qwen2["reasoning"]
    if forced:
        reasoning_folder = tmp_path / "reasoning"
        shutil.copytree(qwen2["reasoning"], reasoning_folder)
        template = reasoning_folder / "chat_template.jinja"
        template.write_text(template.read_text().replace("<|assistant|>{% endif %}",
                                                         f"<|assistant|>{forced}{{% endif %}}"))
    layout = {"think_spacing": ["\n", "\n", spacing], "positions": position_set}
    auto = RainMerger.from_pretrained(qwen2["base"], reasoning_folder, qwen2["instruct"],
                                      RainMergingConfig(lam="auto", lam_grid=[32.0, 128.0], stage2=False,
                                                        sequential=False, **layout))
    auto.merge(reasoning_records(8))
    assert auto.calibration_info["reasoning"]["num_samples"] == 8
    assert auto.calibration_info["reasoning"]["num_held_out"] == len(auto.features.heldout) == 2  # for the card
    card = (auto.save_pretrained(tmp_path / "out") / "README.md").read_text()
    assert ("no think-open share is checked" in card) == bool(forced)
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    reasoning = AutoModelForCausalLM.from_pretrained(qwen2["reasoning"], dtype=torch.float32).eval()
    for row in auto.report.lam_search:
        fixed = RainMerger.from_pretrained(qwen2["base"], reasoning_folder, qwen2["instruct"],
                                           RainMergingConfig(lam=row["lam"], stage2=False, **layout),
                                           features=auto.features)
        merged = fixed.merge().eval()
        assert any("leave 2 reasoning calibration samples out of stage 1" in w and "with sequential=False for the "
                   "one-shot projection" in w for w in fixed.report.warnings)
        kept, with_all = [], []
        for ids, positions in auto.features.heldout:
            assert sum(ids[p] == close_id for p in positions) == 1
            opened = ids.index(open_id)
            # the first prediction the model's own output follows
            first = {"": opened - 1, "<think>": opened, "<think>\n": opened + 1}[forced]
            if forced == "<think>\n":
                assert tokenizer.decode(ids[opened + 1]) == "\n"
            assert min(positions) < first  # the ±3 window reaches into what the prompt supplies
            with torch.no_grad():
                log_m = torch.log_softmax(merged(torch.tensor([ids])).logits[0].double(), -1)
                log_r = torch.log_softmax(reasoning(torch.tensor([ids])).logits[0].double(), -1)
            kl = (log_m.exp() * (log_m - log_r)).sum(-1)
            close = ids.index(close_id)
            answer = close + 1 + len(spacing)  # the tiny tokenizer writes each "\n" as one token
            assert tokenizer.decode(ids[answer]).strip()
            assert answer - 1 == close or not tokenizer.decode(ids[answer - 1]).strip()
            assert (answer - 1 in positions) == (position_set == "window" or not spacing)
            kept += [kl[p] for p in positions if p >= first and p != answer - 1]
            with_all += [kl[p] for p in positions]
        expected, other = float(torch.stack(kept).mean()), float(torch.stack(with_all).mean())
        assert row["l_think"] == pytest.approx(expected, rel=1e-4)
        assert abs(other - expected) > 1e-3 * expected  # the left-out positions would change the figure
    if forced == "<think>\n":  # the think tokens alone: <think> predicts the template's "\n", and </think> the
        # answer's first token when nothing comes between them
        unspaced = {"think_spacing": ["\n", "\n", ""]}
        for settings, named in (({"positions": "think"}, "positions='think' every"),
                                ({"window": 0}, "positions='window-before-answer' and window=0 every")):
            with pytest.raises(ConfigError, match=f"lam='auto' has no thinking position .* with {named}"):
                RainMerger.plan(qwen2["base"], reasoning_folder, qwen2["instruct"],
                                RainMergingConfig(**settings, **unspaced))
            # with the default "\n\n" after </think>, </think> predicts that, and L_think has it
            spaced = RainMerger.from_pretrained(qwen2["base"], reasoning_folder, qwen2["instruct"],
                                                RainMergingConfig(lam_grid=[32.0], stage2=False, **settings))
            spaced.merge(reasoning_records(8))
            assert spaced.report.lam_search[0]["l_think"] > 0
        # … and when the setting is changed on a merger made before: refused before any forward pass
        bare = RainMerger.from_pretrained(qwen2["base"], reasoning_folder, qwen2["instruct"],
                                          RainMergingConfig(lam=1.0, positions="think", stage2=False, **unspaced))
        bare.config.lam = "auto"
        with pytest.raises(ConfigError, match="lam='auto' has no thinking position"):
            bare.merge(reasoning_records(8))
        assert "stage1_features" not in bare.report.timings


def test_a_chat_template_that_refuses_a_lone_user_turn_does_not_stop_merges_that_never_render_it(qwen2, tmp_path):
    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    (reasoning / "chat_template.jinja").write_text("{{ raise_exception('a system message must come first') }}")
    for cfg in (RainMergingConfig(method="task_arithmetic"), RainMergingConfig(lam=1.0, stage1=False, stage2=False)):
        merger = RainMerger.from_pretrained(qwen2["base"], reasoning, qwen2["instruct"], cfg)
        assert merger.plan.think_tail is None
        merger.merge()
        assert merger.merged


def test_default_lam_is_auto_and_reused_features_keep_their_heldout_samples(qwen2, tmp_path):
    assert RainMergingConfig().lam == "auto" and RainMergingConfig(method="ties").lam == 1.0
    grid = dict(lam_grid=[0.5, 1.0, 4.0, 16.0], stage2=False, lam_auto_max_kl=1e-3)
    first = _merger(qwen2, sequential=False, **grid)  # reused features give the one-shot form
    first.merge(reasoning_records(8))
    assert len(first.features.heldout) == 2 and all(ids and pos for ids, pos in first.features.heldout)
    path = tmp_path / "features.safetensors"
    first.features.save(path)
    loaded = ThinkFeatures.load(path)
    assert loaded.heldout == first.features.heldout
    again = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                       RainMergingConfig(**grid), features=path)
    again.merge()  # no calibration passed: L_think is measured on the samples the features carry
    assert again.report.lam == first.report.lam and again.report.lam_search == first.report.lam_search
    summary = again._calibration_summary()["reasoning"]  # counted as the calibration set had them: 6 + 2
    assert summary["num_samples"] == 8 and summary["num_held_out"] == 2
    direct = first._calibration_summary()["reasoning"]  # the same figures as the merge that computed them
    assert (direct["num_samples"], direct["num_held_out"]) == (8, 2)
    numeric = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                         RainMergingConfig(lam=1.0, stage2=False), features=path)
    numeric.merge()  # projects with the six samples the features kept: the card says a rerun from the file differs
    summary = numeric._calibration_summary()["reasoning"]
    assert (summary["num_samples"], summary["held_out_not_projected"]) == (6, 2)
    first.config.lam = 1.0  # edited, not merged yet: the records still describe the lam='auto' merge
    assert first._calibration_summary()["reasoning"]["num_held_out"] == 2
    first.merge()  # a number since: the reused features project the 6 not held out, on either path
    assert "num_held_out" not in (summary := first._calibration_summary()["reasoning"])
    assert summary["num_samples"] == 6 and first.calibration_info["reasoning"]["num_held_out"] == 2
    again.config.lam = 1.0
    again.merge()
    assert again._calibration_summary()["reasoning"]["num_samples"] == 6
    for (k, v), (k2, v2) in zip(first.model.named_parameters(), again.model.named_parameters()):
        assert k == k2 and torch.equal(v, v2)


def test_lam_auto_errors_name_the_fix(qwen2, tmp_path):
    numeric = _merger(qwen2, lam=1.0, stage2=False)
    numeric.merge(reasoning_records(4))
    assert numeric.features.heldout == []  # a numeric λ holds nothing out
    reuse = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                       RainMergingConfig(stage2=False), features=numeric.features)
    with pytest.raises(ValueError, match="without any .*set lam to a number"):
        reuse.merge()
    with_stage2 = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                             RainMergingConfig(), features=numeric.features)

    def no_probe(*args, **kwargs):
        raise AssertionError("stage 2 ran before lam='auto' found the features unusable")

    with_stage2._probe_attention = no_probe
    with pytest.raises(ValueError, match="without any .*set lam to a number"):
        with_stage2.merge(instruction_calibration=instruction_records())
    with pytest.raises(ValueError, match="holds out 1 of the 1 .*pass at least 2 samples, or set lam to a number"):
        _merger(qwen2, stage2=False).merge(reasoning_records(1))  # a lower share still holds one out
    with pytest.raises(ValueError, match="holds out 2 of the 2 .*samples, lower lam_auto_holdout, or set lam"):
        _merger(qwen2, stage2=False, lam_auto_holdout=0.9).merge(reasoning_records(2))
    stage2_only = _merger(qwen2, stage1=False)
    with pytest.raises(ValueError, match="reasoning_calibration=.*set lam to a number"):
        stage2_only.merge(instruction_calibration=instruction_records())
    stage2_only.merge(reasoning_records(4), instruction_records())  # every sample measures L_think
    assert len(stage2_only.report.lam_search) == len(RainMergingConfig().lam_grid)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"])
def test_baselines_share_the_engine(qwen2, tmp_path, method):
    from rain_hf.methods import merge_tensor

    cfg = RainMergingConfig(method=method, lam=0.7, density=0.6, slerp_t=0.3, seed=3)
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], cfg)
    merger.merge()  # no calibration passes
    out = _weights(merger.save_pretrained(tmp_path / method))
    base, inst, reas = _weights(qwen2["base"]), _weights(qwen2["instruct"]), _weights(qwen2["reasoning"])
    assert merger.report.timings.keys() == {"load", "merge", "save"}
    for key, value in reas.items():
        if key.endswith("proj.weight"):
            expected = merge_tensor(method, value.float(), base[key].float(), inst[key].float() - base[key].float(),
                                    cfg, key)
            assert torch.equal(out[key], expected), key
        else:
            assert torch.equal(out[key], value), key
    again = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], cfg)
    again.merge()
    for k, v in again.model.named_parameters():  # seeded: the same merge twice
        assert torch.equal(v, merger.model.get_parameter(k)), k


@pytest.mark.parametrize("settings, unread", [
    (dict(method="task_arithmetic", lam=0.7), dict(density=0.2, rho=0.1, positions="think", seed=5, lam_grid=[1.0])),
    (dict(method="rain", lam=2.0, stage2=False, sequential=False),
     dict(rho=0.1, coef_max=1.5, probe_lam=2.0, lam_grid=[1.0], slerp_t=0.9, seed=4, temperature=0.3, ridge=0.5)),
    (dict(method="rain", lam=2.0, stage1=False), dict(rcond=0.3, precision="float64", window=1, density=0.9)),
    (dict(method="rain", lam=2.0, stage1=False, stage2=False), dict(max_length=8, batch_size=1, on_malformed="error")),
    (dict(method="rain", lam="auto", lam_grid=[1.0, 2.0], stage1=False, stage2=False),
     dict(lam_auto_holdout=0.5, seed=3, probe_lam=2.0)),
])
def test_settings_a_merge_does_not_read_are_warned_about_and_change_nothing(qwen2, settings, unread):
    merger = _merger(qwen2, **settings)
    data = (reasoning_records(3) if merger.config.uses_calibration("reasoning") else None,
            instruction_records(3) if merger.config.uses_calibration("instruction") else None)
    merger.merge(*data)
    assert not any("does not read" in w for w in merger.report.warnings)
    before = {k: v.clone() for k, v in merger.model.state_dict().items()}
    for name, value in unread.items():
        setattr(merger.config, name, value)
    assert merger.config.unused_settings() == unread
    merger.merge(*data)
    warning, = (w for w in merger.report.warnings if w.startswith("This merge does not read "))
    assert all(f"{k}={v!r}" in warning for k, v in unread.items())
    for key, value in merger.model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("role, method, key", [
    ("instruct", "rain", "model.layers.1.mlp.up_proj.weight"), ("instruct", "ties", "model.layers.1.mlp.up_proj.weight"),
    ("reasoning", "rain", "model.layers.1.mlp.up_proj.weight"),
    ("base", "task_arithmetic", "model.layers.1.mlp.up_proj.weight"),
    ("instruct", "rain", "model.layers.1.self_attn.q_proj.bias"),  # merged biases are checked as weights are
])
def test_non_finite_weights_are_refused_with_their_model_named(qwen2, tmp_path, role, method, key):
    folders = {r: tmp_path / r for r in ("base", "reasoning", "instruct")}
    for r, folder in folders.items():
        shutil.copytree(qwen2[r], folder)
    weights = _weights(folders[role])
    weights[key].view(-1)[3] = float("nan")  # a damaged file or a diverged fine-tune
    save_file(weights, str(folders[role] / "model.safetensors"), metadata={"format": "pt"})
    merger = _merger(folders, method=method, lam=1.0, stage1=False, stage2=False, project_bias=key.endswith("bias"))
    what = {"instruct": "the instruct model's task vector", "reasoning": "the reasoning model's",
            "base": "the base model's and the instruct model's task vector"}[role]
    with pytest.raises(CheckpointError, match=f"Merging {re.escape(key)} gives NaN or infinite "
                                              f"values, from {what} tensor"):
        merger.merge()
    with pytest.raises(RuntimeError, match="Nothing to save"):
        merger.save_pretrained(tmp_path / "out")


def test_a_lam_past_float32_is_named_not_the_checkpoints(qwen2):
    merger = _merger(qwen2, lam=1e39, stage1=False, stage2=False)  # finite inputs, an infinite product
    with pytest.raises(CheckpointError, match=r"at λ=1e\+39 gives NaN or infinite values, from the arithmetic .*use "
                                              r"a smaller lam \(or lam_grid's values\)\.$"):
        merger.merge()
    merger.config = {"method": "ties", "lam": 1e39}  # a baseline has no grid
    with pytest.raises(CheckpointError, match=r"at λ=1e\+39 gives NaN .*use a smaller lam\.$"):
        merger.merge()


def test_lam_auto_refuses_a_reasoning_model_whose_own_probabilities_are_not_finite(qwen2, tmp_path):
    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    weights = _weights(reasoning)
    weights["model.norm.weight"][0] = float("nan")  # not a merged tensor: the reasoning model's own forward breaks
    save_file(weights, str(reasoning / "model.safetensors"), metadata={"format": "pt"})
    merger = RainMerger.from_pretrained(qwen2["base"], reasoning, qwen2["instruct"],
                                        RainMergingConfig(lam="auto", stage1=False, stage2=False))
    with pytest.raises(CheckpointError, match="the reasoning model's own next-token probabilities .* hold NaN"):
        merger.merge(reasoning_records(4))


def test_a_nan_l_think_fails_the_budget_and_is_null_in_the_sidecar(qwen2, tmp_path, monkeypatch):
    import rain_hf.evaluation

    monkeypatch.setattr(rain_hf.evaluation, "kl_rows", lambda p, q: torch.full(p.shape[:1], float("nan")))
    merger = _merger(qwen2, lam="auto", lam_grid=[1.0, 2.0], stage2=False, lam_auto_min_think_open=None)
    merger.merge(reasoning_records(4))
    assert merger.report.lam == 1.0 and [row["l_think"] for row in merger.report.lam_search] == [None, None]
    out = merger.save_pretrained(tmp_path / "out")
    json.loads((out / "rain_merging_config.json").read_text(),
               parse_constant=lambda constant: pytest.fail(f"{constant} is not JSON"))
    assert "| 1.0 | NaN |" in (out / "README.md").read_text()


def test_prompt_only_calibration_is_completed_by_the_reasoning_model(organism_root):
    ckpt = os.path.join(organism_root, "checkpoints")
    cfg = RainMergingConfig(lam=2.0, stage2=False, max_reasoning_samples=8, max_new_tokens=96, batch_size=8,
                            think_spacing=["", "", ""])
    merger = RainMerger.from_pretrained(*(os.path.join(ckpt, r) for r in ("base", "reasoning", "instruct")), cfg)
    merger.merge(reasoning_calibration=os.path.join(organism_root, "data", "prompts_only.jsonl"))
    info = merger.sidecar()["calibration"]["reasoning"]
    assert info["num_samples"] == 8 and info["num_malformed"] == 0
    assert merger.features.settings["num_samples"] == 8
    # the traces the model wrote depend on how it generated them: reused features must have been made so
    assert (merger.features.settings["max_new_tokens"], merger.features.settings["do_sample"]) == (96, False)
    assert "temperature" not in merger.features.settings  # greedy: the sampling settings play no part
    merger.config.temperature = 0.9
    merger.merge()  # still greedy: the same traces
    merger.config.max_new_tokens = 64
    with pytest.raises(ValueError, match="computed with max_new_tokens=96 but the config asks for 64"):
        merger.merge()
    merger.config.max_new_tokens, merger.config.do_sample = 96, True
    with pytest.raises(ValueError, match="computed with do_sample=False"):
        merger.merge()


def test_a_think_spacing_the_reasoning_model_does_not_write_is_warned_about(organism_root, qwen2, tmp_path):
    # the organism writes <think>…</think>answer; the default think_spacing is R1's "\n", "\n", "\n\n", and the
    # samples are rendered with it whatever the data wrote
    ckpt = [os.path.join(organism_root, "checkpoints", r) for r in ("base", "reasoning", "instruct")]
    data = os.path.join(organism_root, "data", "reasoning_calibration.json")
    for spacing, warned in ((None, {0: "''", 2: "''"}), (["", "", "\n\n"], {2: "''"}), (["", "", ""], {})):
        merger = RainMerger.from_pretrained(*ckpt, RainMergingConfig(lam=1.0, stage2=False, sequential=False,
                                                                     **({"think_spacing": spacing} if spacing else {})))
        features = merger.compute_features(data)
        found = {int(w[len("think_spacing["):][0]): w for w in merger.report.warnings if w.startswith("think_spacing[")}
        assert found.keys() == warned.keys(), (spacing, found)
        for slot, fix in warned.items():
            assert (f"the reasoning model writes {fix} there (greedy, on 8 of 8 samples, and something other than the "
                    f"layout on 8): set think_spacing[{slot}]={fix} if that is its layout") in found[slot]
    # the warnings travel with the features: a merge that reuses them (from memory or a file) says so too
    default = RainMerger.from_pretrained(*ckpt, RainMergingConfig(lam=1.0, stage2=False, sequential=False))
    features = default.compute_features(data)
    default.merge()
    assert sum(w.startswith("think_spacing[") for w in default.report.warnings) == 2
    features.save(tmp_path / "features.safetensors")
    reused = RainMerger.from_pretrained(*ckpt, RainMergingConfig(lam=1.0, stage2=False),
                                        features=tmp_path / "features.safetensors")
    reused.merge()
    assert sum(w.startswith("think_spacing[") for w in reused.report.warnings) == 2
    # a random tiny model predicts nothing with confidence: no warning
    tiny = _merger(qwen2, lam=1.0, stage2=False)
    tiny.compute_features(reasoning_records(4))
    assert not any(w.startswith("think_spacing[") for w in tiny.report.warnings)


def test_think_spacing_shorter_than_the_models_whitespace_is_warned_about(qwen2, tokenizer, monkeypatch):
    # this tokenizer spells "\n\n" as two "\n" tokens (as SentencePiece byte fallback does): a model that writes
    # "</think>\n\n" agrees with a layout of one "\n" at its first token and differs one token later
    import rain_hf.evaluation as ev

    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert tokenizer("\n\n", add_special_tokens=False)["input_ids"] == newline * 2
    real = ev.think_log_probs

    def always_newline(model, ids, positions, *args):  # a reasoning model that writes newlines, confidently
        out = real(model, ids, positions, *args)
        out[:] = -30.0
        out[:, newline[0]] = 0.0
        return out

    monkeypatch.setattr(ev, "think_log_probs", always_newline)
    merger = _merger(qwen2, lam=1.0, stage2=False, think_spacing=["\n", "\n", "\n"])
    merger.compute_features(reasoning_records(8))
    found = [w for w in merger.report.warnings if w.startswith("think_spacing[2]")]
    assert len(found) == 1 and "writes '\\n\\n' there (greedy, on 8 of 8 samples" in found[0]
    assert "perhaps followed by more whitespace" in found[0]


def test_lam_auto_rejects_lambdas_whose_merge_stops_opening_think(organism_root):
    """On the organism a large λ makes the merged model start formatted answers without thinking, which the
    think-open guard catches; the shares match a slow reference (one full forward pass per prompt)."""
    ckpt = [os.path.join(organism_root, "checkpoints", r) for r in ("base", "reasoning", "instruct")]
    data = [os.path.join(organism_root, "data", f) for f in ("reasoning_calibration.json",
                                                             "instruction_calibration.jsonl")]
    grid = dict(lam="auto", lam_grid=[1.0, 8.0], lam_auto_max_kl=1e9, sequential=False, think_spacing=["", "", ""])
    guarded = RainMerger.from_pretrained(*ckpt, RainMergingConfig(**grid))
    guarded.merge(*data)
    low, high = guarded.report.lam_search
    assert guarded.report.lam == 1.0 and low["think_open"] >= 0.98 > high["think_open"]
    unguarded = RainMerger.from_pretrained(*ckpt, RainMergingConfig(**grid, lam_auto_min_think_open=None))
    unguarded.merge(*data)
    assert unguarded.report.lam == 8.0 and all(row["think_open"] is None for row in unguarded.report.lam_search)

    cfg = guarded.config
    open_id = guarded.plan.think_token_ids[0]
    prompts = [ids for ids, _ in guarded.features.heldout]
    prompts += [s.input_ids for s in prepare_instruction_calibration(data[1], guarded.tokenizer, cfg)]
    prefixes = [ids[:ids.index(open_id)] for ids in prompts]
    reasoning = AutoModelForCausalLM.from_pretrained(ckpt[1], dtype=torch.float32).eval()
    fixed = RainMerger.from_pretrained(*ckpt, dataclasses.replace(cfg, lam=8.0), features=guarded.features)
    merged = fixed.merge(instruction_calibration=data[1]).eval()

    def first(model, ids):
        with torch.no_grad():
            return int(model(torch.tensor([ids])).logits[0, -1].argmax())

    opened = [p for p in prefixes if first(reasoning, p) == open_id]
    assert len(opened) > len(prefixes) // 2
    expected = sum(first(merged, p) == open_id for p in opened) / len(opened)
    assert high["think_open"] == pytest.approx(expected)


def test_think_open_prefixes_end_before_the_block_not_before_a_quoted_token(qwen2):
    merger = _merger(qwen2, lam="auto")
    open_id = merger.plan.think_token_ids[0]
    # a prompt may quote the think-open token; the block's own is the last one (thinking and answer carry none)
    assert merger._think_open_prefixes([[5, open_id, 7, open_id, 9], [open_id, 9], [5, 6]]) == [[5, open_id, 7]]
    off = _merger(qwen2, lam="auto", lam_auto_min_think_open=None)
    assert off._think_open_prefixes([[5, open_id, 9]]) == []


def test_output_dtype_wider_than_the_loaded_model_is_refused(qwen2, monkeypatch):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the dtype check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    for kwargs in ({"config": RainMergingConfig(output_dtype="float32"), "torch_dtype": "bfloat16"},
                   {"torch_dtype": "bfloat16"}, {"dtype": "bfloat16"}):  # the triple is stored in float32
        with pytest.raises(ConfigError, match=r"torch_dtype='float32', or set RainMergingConfig\(output_dtype="
                                              r"'bfloat16'\)"):
            RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], **kwargs)
    # as wide, yet neither holds the other: bfloat16's range, float16's precision
    with pytest.raises(ConfigError, match=r"saved as float16 .* loaded as bfloat16, which cannot hold them exactly"):
        RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], torch_dtype="bfloat16",
                                   config=RainMergingConfig(output_dtype="float16"))
    with pytest.raises(ConfigError, match="disagree"):
        RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], torch_dtype="float32",
                                   dtype="bfloat16")
    for dtype in (torch.int8, torch.float8_e4m3fn, 16):
        with pytest.raises(ConfigError, match=r"a merge computes in floating point; use one of \['bfloat16'"):
            RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], torch_dtype=dtype)
    monkeypatch.undo()
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                        torch_dtype=torch.float32, dtype="float32")  # the same dtype, two spellings
    assert merger.model.dtype == torch.float32


def test_loaded_dtype_from_the_config_is_checked_before_the_load(qwen2, tmp_path, monkeypatch):
    """dtype='auto' loads in config.json's dtype, which may be narrower than the stored tensors."""
    import shutil

    import transformers

    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    config = json.loads((reasoning / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (reasoning / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded before the dtype check"))
    with pytest.raises(ConfigError, match=r"saved as float32 .* loaded as bfloat16.*\(torch_dtype='auto' loads it "
                                          r"as bfloat16: its config.json's dtype.\)"):
        RainMerger.from_pretrained(qwen2["base"], reasoning, qwen2["instruct"])


def test_the_merger_keeps_its_own_config(qwen2, tmp_path, caplog):
    cfg = RainMergingConfig(lam=1.0, stage2=False, target_modules=["q_proj"])
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], cfg)
    cfg.lam, cfg.target_modules = 3.0, "all-linear"  # the caller sets up their next run
    with caplog.at_level("WARNING", logger="rain_hf.merger"):
        merger.merge(reasoning_records(3))
    assert merger.report.lam == 1.0 and len(merger.targets) == 2
    # ... or thought this would change the merge: either way, say which object the merge follows
    assert "changed afterwards (lam=3.0, target_modules='all-linear')" in caplog.text
    assert "set merger.config.lam instead" in caplog.text
    out = merger.save_pretrained(tmp_path / "out")
    assert json.loads((out / "rain_merging_config.json").read_text())["config"]["target_modules"] == ["q_proj"]
    merger.config.lam, merger.config.lam_grid = 2.0, (1.0, 2.0)  # λ and the stages may change between merges
    merger.merge(reasoning_records(3))
    assert merger.report.lam == 2.0
    merger.config.method = "ties"  # so may the method: one loaded model, several methods compared
    merger.merge()
    assert merger.report.method == "ties"
    merger.config.target_modules = ["q_proj", "k_proj"]  # the modules may not: the plan was made for q_proj
    with pytest.raises(ConfigError, match="target_modules changed after the merger was made"):
        merger.merge(reasoning_records(3))


def test_inputs_are_protected(qwen2, tmp_path, caplog):
    with pytest.raises(ConfigError, match="instruct and the base model are the same folder"):
        RainMerger.plan(qwen2["base"], qwen2["reasoning"], qwen2["base"])
    merger = _merger(qwen2, method="slerp")
    with caplog.at_level("WARNING", logger="rain_hf.merger"):
        merger.merge(reasoning_records(2), instruction_records(2))
    assert merger.report.lam is None  # SLERP has no λ
    assert sum("was given but this merge does not use it" in w for w in merger.report.warnings) == 2
    assert not any("does not read" in w for w in merger.report.warnings)  # lam left unset
    merger.config.lam = 3.0
    merger.merge()
    assert merger.report.warnings[1:] == ["This merge does not read lam=3.0 (method=slerp): leave them out, or set "
                                          "what uses them. method='slerp' mixes by slerp_t=0.5: set slerp_t to move "
                                          "towards the instruct model."]
    for folder in (qwen2["reasoning"], qwen2["reasoning"].parent):
        with pytest.raises(ConfigError, match="would replace an input"):
            merger.save_pretrained(folder, overwrite=True)
    models = tmp_path / "models"  # a folder of other things: overwrite=True replaces only an earlier output
    (models / "other-model").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="holds no rain_merging_config.json, so it is not an earlier output"):
        merger.save_pretrained(models, overwrite=True)
    assert (models / "other-model").is_dir()
    assert (qwen2["reasoning"] / "model.safetensors").is_file()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA device"):
            RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], device="cuda")
        for index in (0, np.int64(0)):
            with pytest.raises(ConfigError, match=r"device=0 means accelerator 0 \(cuda:0 on an NVIDIA GPU\), but torch "
                                                  "sees none here"):
                RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], device=index)
    else:
        with pytest.raises(ConfigError, match="CUDA device\\(s\\)"):
            RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                       device=f"cuda:{torch.cuda.device_count()}")
    for bad in (True, -1, np.bool_(True), np.int64(-1)):  # by rain_hf, not as torch's TypeError, nor as '-1'
        with pytest.raises(ConfigError, match=rf"device={int(bad) if bad < 0 else True} is not a torch device: use "
                                              "cpu, cuda or cuda:N"):
            RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], device=bad)
    with pytest.raises(ConfigError, match="device='meta' holds no weights"):
        RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], device="meta")


def test_licence_comes_from_the_reasoning_models_card(qwen2, tmp_path):
    import shutil

    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    (reasoning / "README.md").write_text("---\nlicense: apache-2.0\nlicense_link: LICENSE\n---\n# A reasoning model\n")
    (reasoning / "LICENSE").write_text("Apache License, Version 2.0\n")
    merger = RainMerger.from_pretrained(qwen2["base"], reasoning, qwen2["instruct"],
                                        RainMergingConfig(method="task_arithmetic"))
    merger.merge()
    out = merger.save_pretrained(tmp_path / "out")
    assert json.loads((out / "rain_merging_config.json").read_text())["license"] == "apache-2.0"
    assert "license: apache-2.0" in (out / "README.md").read_text()
    # the merge ships the reasoning model's licence file, so its relative link resolves in the new repository
    assert (out / "LICENSE").read_text() == "Apache License, Version 2.0\n"
    assert "license_link: LICENSE" in (out / "README.md").read_text()
    # Apache-2.0's NOTICE must travel with the weights, and licences come in other spellings
    for name in ("NOTICE", "license.txt", "LICENCE.md", "USE_POLICY.md", "COPYING"):
        (reasoning / name).write_text(name)
    (reasoning / "notes.txt").write_text("not a licence")
    merger = RainMerger.from_pretrained(qwen2["base"], reasoning, qwen2["instruct"],
                                        RainMergingConfig(method="task_arithmetic"))
    merger.merge()
    out = merger.save_pretrained(tmp_path / "out_notice")
    assert all((out / name).read_text() == name for name in ("NOTICE", "license.txt", "LICENCE.md", "USE_POLICY.md",
                                                             "COPYING"))
    assert not (out / "notes.txt").exists()
    from fnmatch import fnmatchcase  # what huggingface_hub filters a Hub fetch with

    from rain_hf.checkpoints import MODEL_PATTERNS

    for name in ("NOTICE", "Notice.md", "license.txt", "LICENCE.md", "Use_Policy.md", "copying"):
        assert any(fnmatchcase(name, pattern) for pattern in MODEL_PATTERNS), name
    # an instruct model under another licence: the merge is bound by both, so the metadata names neither
    instruct = tmp_path / "instruct"
    shutil.copytree(qwen2["instruct"], instruct)
    (instruct / "README.md").write_text("---\nlicense: other\nlicense_name: llama3.1\n---\n")
    merger = RainMerger.from_pretrained(qwen2["base"], reasoning, instruct, RainMergingConfig(method="task_arithmetic"))
    merger.merge()
    out = merger.save_pretrained(tmp_path / "out2")
    sidecar = json.loads((out / "rain_merging_config.json").read_text())
    assert sidecar["license"] is None and sidecar["input_licenses"] == {
        "reasoning": {"license": "apache-2.0", "license_link": "LICENSE"},
        "instruct": {"license": "other", "license_name": "llama3.1"}}
    text = (out / "README.md").read_text()
    assert "license:" not in text.split("\n---\n", 1)[0] and "`llama3.1`" in text


def test_the_reasoning_models_tokenizer_files_are_copied_byte_for_byte(qwen2, tmp_path):
    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    # a tokenizer laid out as another transformers version wrote it: saving the loaded one would rewrite it (class
    # name, keys, the chat template's place) and drop the files it does not use
    config = json.loads((reasoning / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = (reasoning / "chat_template.jinja").read_text()
    (reasoning / "chat_template.jinja").unlink()
    (reasoning / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (reasoning / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end|>", "pad_token": "<pad>"}))
    (reasoning / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    merger = RainMerger.from_pretrained(qwen2["base"], reasoning, qwen2["instruct"],
                                        RainMergingConfig(method="task_arithmetic"))
    merger.merge()
    out = merger.save_pretrained(tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (reasoning / name).read_bytes(), name
    assert not (out / "chat_template.jinja").exists()  # where the input keeps it, in tokenizer_config.json
    reloaded, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(reasoning)
    messages = [{"role": "user", "content": "Max has 3 apples."}]
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # named chat templates beside the default one travel too
    from rain_hf.merger import copy_tokenizer_files

    (reasoning / "additional_chat_templates").mkdir()
    (reasoning / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    (tmp_path / "copy").mkdir()
    copy_tokenizer_files(reasoning, tmp_path / "copy", original)
    assert (tmp_path / "copy" / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ messages }}"


def test_links_out_of_the_reasoning_models_folder_are_not_copied(qwen2, tmp_path, caplog):
    # a clone or an archive may hold links: LICENSE -> ~/.cache/huggingface/token would be saved and pushed
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token").write_text("hf_not_for_the_merge")
    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    (reasoning / "LICENSE").symlink_to(secret / "token")
    (reasoning / "docs").mkdir()
    (reasoning / "docs" / "NOTICE.txt").write_text("notice")
    (reasoning / "NOTICE").symlink_to("docs/NOTICE.txt")  # a link inside the folder is its file
    (reasoning / "additional_chat_templates").mkdir()
    (reasoning / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    (reasoning / "additional_chat_templates" / "extra").symlink_to(secret, target_is_directory=True)
    merger = RainMerger.from_pretrained(qwen2["base"], reasoning, qwen2["instruct"],
                                        RainMergingConfig(method="task_arithmetic"))
    merger.merge()
    with caplog.at_level(logging.WARNING, logger="rain_hf"):
        out = merger.save_pretrained(tmp_path / "out")
    assert not (out / "LICENSE").exists() and (out / "NOTICE").read_text() == "notice"
    assert (out / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert not (out / "additional_chat_templates" / "extra").exists()
    assert not any(b"hf_not_for_the_merge" in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert f"LICENSE in the reasoning model's folder links to {secret / 'token'}, outside the folder" in caplog.text
    assert f"additional_chat_templates/extra in the reasoning model's folder links to {secret}" in caplog.text
    # a Hub cache snapshot: every file links into the repository's blobs/, which is the model's own
    from rain_hf.merger import license_files

    repo = tmp_path / "hub" / "models--org--reasoner"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text("Apache-2.0")
    (snapshot / "LICENSE").symlink_to(Path("..", "..", "blobs", "f00d"))
    assert license_files(snapshot) == [snapshot / "LICENSE"]
    # a local folder whose files link into its own store (an old huggingface_hub local_dir: the blobs its
    # config.json links into; git-annex or DVC: the repository that holds it) keeps them
    local = tmp_path / "repo" / "model"
    local.mkdir(parents=True)
    annexed = tmp_path / "repo" / ".git" / "annex" / "objects" / "ab" / "cd" / "KEY"
    annexed.parent.mkdir(parents=True)
    annexed.write_text("MIT")
    (repo / "blobs" / "c0f1").write_text("{}")
    (local / "model.safetensors").symlink_to(repo / "blobs" / "c0f1")  # local_dir "auto" links large files only
    (local / "LICENSE").symlink_to(repo / "blobs" / "f00d")
    (local / "NOTICE").symlink_to(annexed)
    (local / "COPYING").symlink_to(secret / "token")
    assert license_files(local) == [local / "LICENSE", local / "NOTICE"]
    # … but not another repository's: a link into a private model's blobs, or another annex, would publish them
    other = tmp_path / "hub" / "models--victim--private" / "blobs" / "beef"
    other.parent.mkdir(parents=True)
    other.write_text("private")
    elsewhere = tmp_path / "other" / ".git" / "annex" / "objects" / "KEY"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("private")
    for name, target in (("LICENSE", other), ("NOTICE", elsewhere)):
        (local / name).unlink()
        (local / name).symlink_to(target)
    (local / "model.safetensors").unlink()
    (local / "USE_POLICY.md").symlink_to(repo / "blobs" / "f00d")  # blobs, but not the folder's own (no link)
    assert license_files(local) == []


def _as_tekken(folder: Path) -> None:
    """Store a folder's byte-level BPE tokenizer as Mistral's tekken.json instead of tokenizer.json."""
    import base64

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = json.loads((folder / "tokenizer.json").read_text())
    specials = [t["content"] for t in sorted(spec["added_tokens"], key=lambda t: t["id"])]
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = sorted((i, token) for token, i in spec["model"]["vocab"].items() if token not in specials)
    tekken = {"config": {"pattern": r"\s+|[^\s]+", "num_vocab_tokens": len(vocab), "version": "v7",
                         "default_vocab_size": len(vocab) + len(specials),
                         "default_num_special_tokens": len(specials)},
              "vocab": [{"rank": k, "token_bytes": base64.b64encode(bytes(byte_of[c] for c in token)).decode(),
                         "token_str": None} for k, (_, token) in enumerate(vocab)],
              "special_tokens": [{"rank": k, "token_str": t, "is_control": True} for k, t in enumerate(specials)]}
    (folder / "tekken.json").write_text(json.dumps(tekken))
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()


def test_a_tokenizer_under_another_name_still_reaches_the_merge(qwen2, tmp_path, monkeypatch, caplog):
    import re

    import rain_hf.merger

    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    _as_tekken(reasoning)  # transformers falls back to tekken.json where tokenizer.json is missing
    original = AutoTokenizer.from_pretrained(reasoning)
    merger = RainMerger.from_pretrained(qwen2["base"], reasoning, qwen2["instruct"],
                                        RainMergingConfig(method="task_arithmetic"))
    merger.merge()
    out = merger.save_pretrained(tmp_path / "out")
    assert (out / "tekken.json").read_bytes() == (reasoning / "tekken.json").read_bytes()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == original.get_vocab()
    # a file under a name the copy does not know: the copies do not load back, so the loaded tokenizer is saved
    monkeypatch.setattr(rain_hf.merger, "_TOKENIZER_FILE", re.compile("chat_template.*"))
    with caplog.at_level(logging.WARNING, logger="rain_hf.merger"):
        out = merger.save_pretrained(tmp_path / "out2")
    assert "do not load back as its tokenizer" in caplog.text
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.get_vocab() == original.get_vocab() and reloaded.chat_template == original.chat_template


def test_card_snippet_keeps_special_think_tokens_visible(qwen2, tmp_path):
    """The random triple's tokenizer marks <think> special (the organism's and R1-Distill's do not): decoding with
    skip_special_tokens=True would hide the thinking the merge keeps, so the card's snippet keeps them."""
    merger = _merger(qwen2, method="task_arithmetic", lam=0.5)
    merger.merge()
    out = merger.save_pretrained(tmp_path / "out")
    assert json.loads((out / "rain_merging_config.json").read_text())["think_tokens_special"] is True
    card = (out / "README.md").read_text()
    assert "skip_special_tokens=False" in card and "skip_special_tokens=True" not in card
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode("<think>so</think>4", add_special_tokens=False)
    assert "<think>" not in tokenizer.decode(ids, skip_special_tokens=True)  # what the old snippet printed
    assert "<think>" in tokenizer.decode(ids, skip_special_tokens=False)
    organism = Path(__file__).resolve().parents[1] / "benchmarks" / "organism" / "checkpoints"
    merger = RainMerger.from_pretrained(organism / "base", organism / "reasoning", organism / "instruct",
                                        RainMergingConfig(method="task_arithmetic", lam=0.5))
    assert merger.sidecar()["think_tokens_special"] is False  # tokens that are not special: the usual snippet
    assert "starts inside the thinking" not in card and merger.sidecar()["template_opens_think"] is False


def test_card_snippet_says_when_the_template_opens_the_think_block(qwen2, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(qwen2["reasoning"])
    tokenizer.chat_template = tokenizer.chat_template + "{% if add_generation_prompt %}<think>{% endif %}"
    folder = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], folder)
    tokenizer.save_pretrained(folder)
    merger = RainMerger.from_pretrained(qwen2["base"], folder, qwen2["instruct"],
                                        RainMergingConfig(method="task_arithmetic", lam=0.5))
    merger.merge()
    out = merger.save_pretrained(tmp_path / "out")
    assert json.loads((out / "rain_merging_config.json").read_text())["template_opens_think"] is True
    assert "the completion starts inside the thinking, then </think>" in (out / "README.md").read_text()
    merger.config.think_open = "<|im_start|>"  # an edit after the merge: the saved files describe the merge
    assert merger.sidecar()["template_opens_think"] is True
    tokenizer.chat_template = None  # a baseline merge needs no chat template: the card just says nothing of it
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    merger = RainMerger.from_pretrained(qwen2["base"], folder, qwen2["instruct"],
                                        RainMergingConfig(method="task_arithmetic", lam=0.5))
    merger.merge()
    out = merger.save_pretrained(tmp_path / "plain")
    assert json.loads((out / "rain_merging_config.json").read_text())["template_opens_think"] is None
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}{{ raise_exception('boom') }}"
    tokenizer.save_pretrained(folder)  # a template transformers cannot render: a jinja error, not a ValueError
    merger = RainMerger.from_pretrained(qwen2["base"], folder, qwen2["instruct"],
                                        RainMergingConfig(method="task_arithmetic", lam=0.5))
    merger.merge()
    out = merger.save_pretrained(tmp_path / "unrenderable")
    assert json.loads((out / "rain_merging_config.json").read_text())["template_opens_think"] is None


def test_bad_card_template_fails_before_the_weights_are_written(qwen2, tmp_path, monkeypatch):
    import rain_hf.writer

    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                        RainMergingConfig(method="task_arithmetic"))
    merger.merge()
    written = []
    monkeypatch.setattr(rain_hf.writer.ShardedSafetensorsWriter, "write",
                        lambda self, name, tensor: written.append(name))
    with pytest.raises(FileNotFoundError, match="typo.md.j2"):
        merger.save_pretrained(tmp_path / "out", card_template=tmp_path / "typo.md.j2")
    assert written == [] and not (tmp_path / "out").exists()


def test_output_dtype_changed_after_construction_is_checked_again(qwen2, tmp_path):
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                        config=RainMergingConfig(method="task_arithmetic", lam=1.0,
                                                                 output_dtype="bfloat16"),
                                        torch_dtype="bfloat16")
    merger.config.output_dtype = "float32"  # would save bf16-rounded weights labelled float32
    with pytest.raises(ConfigError, match="output_dtype"):
        merger.merge()
    merger.config.output_dtype = "bfloat16"
    merger.merge()
    merger.config.output_dtype = "float32"  # after the merge: the save is that merge, in bf16 as it was rounded
    out = merger.save_pretrained(tmp_path / "out")
    assert {t.dtype for t in _weights(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _drawn(merger, n):
    """(kept, held) indices of n samples with distinct prompts, as merger._hold_out draws them."""
    from types import SimpleNamespace

    kept, held = merger._hold_out([SimpleNamespace(input_ids=[i, 7], think_open=1) for i in range(n)])
    return [k.input_ids[0] for k in kept], [h.input_ids[0] for h in held]


def test_lam_auto_holds_out_a_seeded_draw_of_the_samples(qwen2):
    merger = _merger(qwen2, lam="auto")
    kept, held = _drawn(merger, 12)
    assert held == holdout_indices(12, 0.25, seed=0) and sorted(kept + held) == list(range(12)) and len(held) == 3
    assert _drawn(merger, 12) == (kept, held)  # the same draw every time
    assert holdout_indices(150, 0.25, seed=1) != holdout_indices(150, 0.25, seed=0)
    merger.config.seed = 1  # the merge's own seed draws it
    assert _drawn(merger, 12)[1] == holdout_indices(12, 0.25, seed=1) != held
    merger.config.seed = 0
    # the paper's file is 50 math, 50 code, 50 science traces: the held-out share takes from every domain, not
    # the last one whole; an alternating layout (plain, instructed, …) gives both kinds
    paper = holdout_indices(150, 0.25)
    assert len(paper) == 38 and {i // 50 for i in paper} == {0, 1, 2}
    assert {i % 2 for i in holdout_indices(64, 0.25)} == {0, 1}
    with pytest.raises(ConfigError, match="holds out 1 of the 1 .*pass at least 2 samples"):
        _drawn(merger, 1)
    merger.config.lam_auto_holdout = 0.9
    with pytest.raises(ConfigError, match=r"holds out 3 of the 3 .*lam_auto_holdout=0.9.*at least 5 samples, lower "):
        _drawn(merger, 3)
    assert len(_drawn(merger, 5)[0]) == 1  # five is enough


def test_lam_auto_keeps_samples_of_one_prompt_on_one_side(qwen2, tokenizer):
    # equal prompts give equal hidden states up to <think>: a held-out sample whose prompt stage 1 saw would
    # measure L_think partly on protected features
    groups = [i // 3 for i in range(30)] + list(range(10, 60))  # 10 prompts with 3 traces each, 50 single ones
    for seed in range(20):
        held = set(holdout_indices(80, 0.25, seed, groups))
        assert len(held) == 20 and all((i in held) == (j in held) for i in range(80) for j in range(80)
                                       if groups[i] == groups[j]), seed
    assert holdout_indices(80, 0.25, 3, list(range(80))) == holdout_indices(80, 0.25, 3)  # distinct: same draw
    for seed in range(10):  # a group larger than the count is passed over for ones that fit …
        assert holdout_indices(8, 0.25, seed, ["a"] * 6 + ["b", "c"]) == [6, 7]
        # … and when none fits, the smallest is held out alone
        assert holdout_indices(9, 0.25, seed, ["a"] * 3 + ["b"] * 4 + ["c"] * 2) == [7, 8]
    records = reasoning_records(4)
    records = [dict(r, prompt=records[0]["prompt"]) if i % 2 else r for i, r in enumerate(records)]
    merger = _merger(qwen2, lam="auto", lam_auto_holdout=0.5)
    samples = prepare_reasoning_calibration(records, tokenizer, merger.config)
    kept, held = merger._hold_out(samples)
    assert {s.index for s in kept}.isdisjoint({0, 1, 3}) or {s.index for s in held}.isdisjoint({0, 1, 3})
    # two prompts with two traces each: a quarter asks for one sample, and a prompt's two go together; the card
    # and the features (which hold the held-out rows) say so
    pairs = [dict(r, prompt=records[i // 2 * 2]["prompt"]) for i, r in enumerate(records)]
    merger = _merger(qwen2, lam="auto", lam_auto_holdout=0.25)
    kept, held = merger._hold_out(prepare_reasoning_calibration(pairs, tokenizer, merger.config))
    assert len(held) == 2
    said = [w for w in merger.report.warnings if "holds out 2 of the 4 reasoning calibration samples, where "
                                                 "lam_auto_holdout=0.25 asks for 1" in w]
    assert len(said) == 1 and merger._reasoning_data_warnings == said
    same = [dict(r, prompt=records[0]["prompt"]) for r in records]
    with pytest.raises(ConfigError, match="all 4 reasoning calibration samples share one prompt: add samples"):
        merger._hold_out(prepare_reasoning_calibration(same, tokenizer, merger.config))


def test_plan_refuses_a_reasoning_checkpoint_transformers_cannot_load(qwen2, tmp_path):
    # the forward passes load the reasoning model with transformers: its layout and config are checked at plan()
    weights = _weights(qwen2["reasoning"])
    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    (reasoning / "model.safetensors").unlink()
    keys = sorted(weights)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), start=1):
        save_file({k: weights[k] for k in part}, reasoning / f"model-0000{i}-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"holds the safetensors files \['model-00001-of-00002.safetensors', "
                                              r"'model-00002-of-00002.safetensors'\] but neither model.safetensors "
                                              r"nor model.safetensors.index.json.*restore the index"):
        RainMerger.plan(qwen2["base"], reasoning, qwen2["instruct"])
    shutil.rmtree(reasoning)
    shutil.copytree(qwen2["reasoning"], reasoning)
    config = json.loads((reasoning / "config.json").read_text())
    stored = config["intermediate_size"]
    config["intermediate_size"] = stored - 32  # the weights say otherwise
    (reasoning / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match=rf"stores model.layers.0.mlp.down_proj.weight with shape \(64, "
                                                 rf"{stored}\), but its config.json makes it \(64, {stored - 32}\) "
                                                 r"\(and 5 more\): the config does not describe these weights"):
        RainMerger.plan(qwen2["base"], reasoning, qwen2["instruct"])
    # configs that count a layer no checkpoint stores: not a renaming of tensors on load
    folders = {}
    for role in ("base", "reasoning", "instruct"):
        folders[role] = tmp_path / f"three-{role}"
        shutil.copytree(qwen2[role], folders[role])
        config = json.loads((folders[role] / "config.json").read_text())
        config.update(num_hidden_layers=3, layer_types=["full_attention"] * 3)
        (folders[role] / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelMismatchError, match=r"No checkpoint stores a tensor of decoder layers \[2\] \(e\.g\. "
                                                 r"model\.layers\.2\..*config.json counts \(3 layers; stored: \[0, 1\]\)"):
        RainMerger.plan(folders["base"], folders["reasoning"], folders["instruct"])


def test_plan_warns_about_merged_modules_the_adapter_leaves_alone(qwen2, tmp_path, caplog):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(qwen2["base"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "qv")
    adapter_config = json.loads((tmp_path / "qv" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "/train/elsewhere/base-v0"  # an adapter warning of its own
    (tmp_path / "qv" / "adapter_config.json").write_text(json.dumps(adapter_config))
    with caplog.at_level("WARNING"):
        plan = RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "qv", RainMergingConfig(lam=1.0))
    logged = [record.getMessage() for record in caplog.records]
    assert logged == plan.warnings and any("base-v0" in w for w in logged)  # the adapter's too, each once
    idle = [w for w in plan.warnings if "holds no delta" in w]
    assert len(idle) == 1 and f"for {len(plan.targets) - 4} of the {len(plan.targets)} merged modules" in idle[0]
    assert "they keep the reasoning model's weights (set target_modules to the adapter's modules to leave them out of " \
           "the merge and its report)" in idle[0] and "they then keep" not in idle[0]  # the advice is no repetition
    # a baseline still changes them (TIES trims, DARE drops the reasoning model's own task vector, SLERP moves
    # toward the base): the warning must not promise the reasoning model's weights
    for method, says in (("ties", "ties still merges them"), ("dare_linear", "dare_linear still merges them"),
                         ("slerp", "slerp still moves them toward the base model")):
        warnings = RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "qv",
                                   RainMergingConfig(method=method, lam=1.0)).warnings
        idle = [w for w in warnings if "holds no delta" in w]
        assert len(idle) == 1 and says in idle[0] and "they keep the" not in idle[0], method
    # a merger made for one method and merged with another describes the merge it ran, not the one it was made for
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], tmp_path / "qv",
                                        RainMergingConfig(method="task_arithmetic", lam=1.0))
    merger.config.method = "slerp"
    merger.merge()
    idle = [w for w in merger.report.warnings if "holds no delta" in w]
    assert len(idle) == 1 and "slerp still moves them toward the base model" in idle[0]
    for settings in ({"method": "ties", "density": 1.0}, {"method": "slerp", "slerp_t": 0.0}):  # these change nothing
        warnings = RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "qv",
                                   RainMergingConfig(lam=1.0, **settings)).warnings
        assert any("holds no delta" in w and "they keep the reasoning model's weights" in w for w in warnings)
    narrow = RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "qv",
                             RainMergingConfig(lam=1.0, target_modules=["q_proj", "v_proj"]))
    assert not [w for w in narrow.warnings if "holds no delta" in w]


def test_an_instruct_model_without_a_task_vector_is_warned_about(qwen2, tmp_path, caplog):
    from peft import LoraConfig, get_peft_model

    shutil.copytree(qwen2["base"], tmp_path / "copy")  # the same folder is refused; a copy only the merge can tell
    assert not any("task vector" in w for w in RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "copy",
                                                                RainMergingConfig(lam=1.0)).warnings)
    base = AutoModelForCausalLM.from_pretrained(qwen2["base"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "untrained")
    for instruct, says in ((tmp_path / "copy", "The instruct model equals base_model in every merged module"),
                           (tmp_path / "untrained", "lora_B still at its zero init")):
        for cfg, effect in ((dict(lam=1.0, stage2=False), "they keep the reasoning model's weights"),
                            (dict(method="slerp"), "slerp still moves them toward the base model")):
            merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], instruct,
                                                RainMergingConfig(target_modules=["q_proj"], **cfg))
            with caplog.at_level("WARNING"):
                merger.merge(reasoning_records(4) if merger.config.method == "rain" else None)
            warning = [w for w in merger.report.warnings if "there is no task vector to merge" in w]
            assert len(warning) == 1 and says in warning[0] and effect in warning[0], (instruct, cfg)
    merger = _merger(qwen2, lam=1.0, stage2=False)  # a real instruct model: not a word
    merger.merge(reasoning_records(4))
    assert not any("no task vector" in w for w in merger.report.warnings)
    # a task vector in the biases alone: merged with project_bias=True, so the merge does add something
    weights = load_file(tmp_path / "copy" / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.bias"] += 0.5
    save_file(weights, tmp_path / "copy" / "model.safetensors", metadata={"format": "pt"})
    for project_bias, warned in ((True, False), (False, True)):
        merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], tmp_path / "copy",
                                            RainMergingConfig(target_modules=["q_proj"], lam=1.0, stage2=False,
                                                              project_bias=project_bias))
        merger.merge(reasoning_records(4))
        assert any("there is no task vector to merge" in w for w in merger.report.warnings) == warned
        assert any("changed 1 biases" in w for w in merger.report.warnings) == warned


def test_an_adapter_beside_a_full_model_and_a_hub_adapter_fetch(qwen2, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from rain_hf.checkpoints import ADAPTER_PATTERNS, MODEL_PATTERNS

    base = AutoModelForCausalLM.from_pretrained(qwen2["base"])
    folder = tmp_path / "both"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    # transformers loads such a folder as its full model with the adapter on top: the two tools would disagree
    for name in ("config.json", "model.safetensors"):
        shutil.copy(qwen2["instruct"] / name, folder / name)
    plan = RainMerger.plan(qwen2["base"], qwen2["reasoning"], folder, RainMergingConfig(lam=1.0))
    assert plan.instruct_kind == "lora"
    assert any("holds a LoRA adapter and a full model (model.safetensors, config.json); rain_hf merges the adapter"
               in w for w in plan.warnings)
    # a Hub adapter repository (which may also hold a full model or Trainer checkpoints): adapter files only
    calls, probed = [], []
    folders = {"me/base": qwen2["base"], "me/reasoning": qwen2["reasoning"], "me/lora": folder,
               "me/instruct": qwen2["instruct"]}

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs["allow_patterns"]))
        return str(folders[repo_id])

    def fake_hf_hub_download(repo_id, filename, **kwargs):
        probed.append(repo_id)
        if not (folders[repo_id] / filename).is_file():
            raise FileNotFoundError(filename)  # what the Hub client raises is an error of its own; any will do
        return str(folders[repo_id] / filename)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_hf_hub_download)
    RainMerger.plan("me/base", "me/reasoning", "me/lora", RainMergingConfig(lam=1.0))
    assert [c for c in calls if c[0] == "me/lora"] == [("me/lora", ADAPTER_PATTERNS)] and probed == ["me/lora"]
    assert all(c[1] != ADAPTER_PATTERNS for c in calls if c[0] != "me/lora")
    calls.clear()  # a full instruct model: one probe, then the full-model fetch
    RainMerger.plan("me/base", "me/reasoning", "me/instruct", RainMergingConfig(lam=1.0))
    assert ("me/instruct", MODEL_PATTERNS) in calls and probed[-1] == "me/instruct"


def test_plan_counts_trained_biases_in_the_adapter_warnings(qwen2, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(qwen2["base"])
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], bias="all")).save_pretrained(tmp_path / "q")
    # merging q_proj only, the k/v biases peft trained are dropped: said so
    narrow = RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "q",
                             RainMergingConfig(lam=1.0, target_modules=["q_proj"], project_bias=True))
    outside = [w for w in narrow.warnings if "outside the merged set" in w]
    assert len(outside) == 1 and "for 4 tensors" in outside[0] and "layers.0.self_attn.k_proj.bias" in outside[0]
    # without project_bias: the merged modules' biases are the ones it would merge, the others never are
    kept = RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "q",
                           RainMergingConfig(lam=1.0, target_modules=["q_proj"])).warnings
    trained = [w for w in kept if "trained" in w]
    assert trained == ["the adapter trained 2 biases of merged modules (e.g. model.layers.0.self_attn.q_proj.bias); "
                       "they are merged only with project_bias=True"]
    assert [w for w in kept if "outside the merged set" in w] == outside
    # merging all linear layers, k/v change through their biases: not "no delta"
    wide = RainMerger.plan(qwen2["base"], qwen2["reasoning"], tmp_path / "q",
                           RainMergingConfig(lam=1.0, project_bias=True))
    idle = [w for w in wide.warnings if "holds no delta" in w][0]
    assert f"for {len(wide.targets) - 6} of the {len(wide.targets)} merged modules" in idle
    assert "k_proj" not in idle and "v_proj" not in idle
    assert not [w for w in wide.warnings if "outside the merged set" in w]


@pytest.mark.parametrize("method", ["task_arithmetic", "slerp", "rain"])
def test_float64_checkpoints_are_merged_in_float64(tmp_path, tokenizer, method):
    paths = build_triple(tmp_path, "llama", tokenizer=tokenizer, dtype=torch.float64)
    r, b, i = (_weights(paths[role]) for role in ("reasoning", "base", "instruct"))
    key = "model.layers.0.mlp.up_proj.weight"
    identity = {"slerp_t": 0.0} if method == "slerp" else {"lam": 0.0}
    stages = {"stage1": False, "stage2": False} if method == "rain" else {}
    merger = _merger(paths, method=method, **identity, **stages)
    merger.merge()
    same = _weights(merger.save_pretrained(tmp_path / "identity"))
    assert same[key].dtype == torch.float64 and torch.equal(same[key], r[key])  # fp32 work would round θ_R
    if method in ("task_arithmetic", "rain"):
        merger = _merger(paths, method=method, lam=0.7, **stages)
        merger.merge()
        out = _weights(merger.save_pretrained(tmp_path / "merged"))
        assert torch.allclose(out[key], r[key] + 0.7 * (i[key] - b[key]), rtol=0, atol=1e-14)


def test_build_triple_leaves_the_callers_random_state_alone(tmp_path, tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_triple(tmp_path / "a", "qwen2", tokenizer=tokenizer)
    assert torch.equal(torch.rand(3), expected)
    second = build_triple(tmp_path / "b", "qwen2", tokenizer=tokenizer)
    for role in ("base", "reasoning", "instruct"):  # the weights depend on the seed alone
        one, two = _weights(first[role]), _weights(second[role])
        assert all(torch.equal(one[k], two[k]) for k in one), role


def test_lam_auto_refuses_features_held_out_with_another_seed_or_share(qwen2, tmp_path):
    merger = _merger(qwen2, lam="auto", lam_grid=[1.0], stage2=False)
    merger.compute_features(reasoning_records(8))
    merger.features.save(tmp_path / "features.safetensors")
    merger.config.seed = 5  # the sidecar would record seed 5 for a split drawn with seed 0
    with pytest.raises(ValueError, match="held out the lam='auto' samples drawn with seed=0, but the config asks for 5"):
        merger.merge()
    for change in ({"seed": 5}, {"lam_auto_holdout": 0.5}):
        reuse = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                           RainMergingConfig(lam="auto", lam_grid=[1.0], stage2=False, **change),
                                           features=tmp_path / "features.safetensors")
        with pytest.raises(ValueError, match=f"drawn with {next(iter(change))}="):
            reuse.merge()
    same = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                      RainMergingConfig(lam="auto", lam_grid=[1.0], stage2=False),
                                      features=tmp_path / "features.safetensors")
    same.merge()
    numeric = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                         RainMergingConfig(lam=1.0, stage2=False, seed=5),
                                         features=tmp_path / "features.safetensors")
    numeric.merge()  # a numeric λ measures nothing on the held-out samples: any seed


def test_lam_auto_search_edge_cases(qwen2, monkeypatch, caplog):
    import rain_hf.evaluation as evaluation

    # λ 0 merges nothing, so its L_think is 0: picked when every other λ fails, with a warning; duplicates once
    zero = _merger(qwen2, lam="auto", lam_grid=[4.0, 0.0, 4.0, 16.0], stage2=False, lam_auto_max_kl=1e-12)
    zero.merge(reasoning_records(8))
    assert [row["lam"] for row in zero.report.lam_search] == [0.0, 4.0, 16.0]
    assert zero.report.lam == 0.0 and any("picked λ 0: the merged model is the reasoning model" in w
                                          for w in zero.report.warnings)
    with caplog.at_level(logging.WARNING, logger="rain_hf.merger"):
        none = _merger(qwen2, lam="auto", lam_grid=[4.0, 16.0], stage2=False, lam_auto_max_kl=1e-12)
        none.merge(reasoning_records(8))
    assert none.report.lam == 4.0 and "no λ of the grid keeps L_think" in caplog.text  # logged, not only recorded
    # this random model never opens <think> first: no think-open share was measured, so the warning names none
    assert all(row["think_open"] is None for row in none.report.lam_search) and "think-open share" not in caplog.text
    caplog.clear()
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="rain_hf.merger"):
        patch.setattr(evaluation, "think_open_share", lambda *a: 0.5)  # measured, and below the guard's 0.98
        _merger(qwen2, lam="auto", lam_grid=[4.0], stage2=False, lam_auto_max_kl=1e-12).merge(reasoning_records(8))
    assert "no λ of the grid keeps L_think ≤ 1e-12 with a think-open share ≥ 0.98" in caplog.text
    # a pass above a failure: picked (the largest that passes), with a warning that the budget is not monotone
    values = iter([0.0, 1.0, 0.0])
    monkeypatch.setattr(evaluation, "kl_rows", lambda *a: torch.tensor([next(values)]))
    bumpy = _merger(qwen2, lam="auto", lam_grid=[1.0, 2.0, 3.0], stage2=False, lam_auto_max_kl=0.5)
    bumpy.merge(reasoning_records(8))
    assert bumpy.report.lam == 3.0
    assert any("λ 3 passed but the smaller 2 did not" in w for w in bumpy.report.warnings)


def test_editing_the_passed_config_warns_once_per_edit(qwen2, caplog):
    given = RainMergingConfig(method="task_arithmetic", lam=1.0)
    merger = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], given)
    given.lam = 2.0  # changes nothing: the merger keeps its own copy
    with caplog.at_level("WARNING", logger="rain_hf.merger"):
        merger.merge()
    assert merger.report.lam == 1.0 and "changed afterwards (lam=2.0)" in caplog.text
    caplog.clear()
    merger.config.lam = 3.0  # what the warning says to do: no warning again
    with caplog.at_level("WARNING", logger="rain_hf.merger"):
        merger.merge()
        merger.merge()
    assert merger.report.lam == 3.0 and "changed afterwards" not in caplog.text
    given.lam = 4.0  # a new edit of the passed object is said again
    with caplog.at_level("WARNING", logger="rain_hf.merger"):
        merger.merge()
    assert "changed afterwards (lam=4.0)" in caplog.text


def test_warnings_about_the_calibration_data_reach_the_report_and_the_card(qwen2, tmp_path):
    merger = _merger(qwen2, lam=1.0, stage2=False, sequential=False)
    merger.merge(instruction_records(4))  # the instruction set passed as the reasoning set
    swapped = [w for w in merger.report.warnings if "looks like the instruction calibration set" in w]
    assert len(swapped) == 1
    merger.save_pretrained(tmp_path / "out")
    assert "looks like the instruction calibration set" in (tmp_path / "out" / "README.md").read_text()
    # seven malformed samples give seven warnings: the first four, and a count with the summing-up last one
    merger.merge(reasoning_records(4) + [{"prompt": "x", "reasoning": "y", "response": 7}] * 7)
    said = [w for w in merger.report.warnings if "malformed" in w or "more warnings" in w]
    assert len(said) == 5 and all("Skipping malformed reasoning calibration sample" in w for w in said[:4])
    assert said[4].startswith("… 2 more warnings about the reasoning calibration data, which the log holds; the "
                              "last: Skipped 7 malformed reasoning calibration samples in all")
    assert not any("looks like the instruction" in w for w in merger.report.warnings)  # a new merge, a new report
    # the report does not depend on how loud the log is
    logging.getLogger("rain_hf").setLevel(logging.ERROR)
    try:
        merger.merge(instruction_records(4))
    finally:
        logging.getLogger("rain_hf").setLevel(logging.NOTSET)
    assert sum("looks like the instruction calibration set" in w for w in merger.report.warnings) == 1
    # features computed first, or saved and passed in: the warnings their data drew are kept with them
    merger.compute_features(instruction_records(4))
    merger.merge()
    assert sum("looks like the instruction calibration set" in w for w in merger.report.warnings) == 1
    merger.features.save(tmp_path / "features.safetensors")
    reused = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], merger.config,
                                        features=tmp_path / "features.safetensors")
    reused.merge()
    assert sum("looks like the instruction calibration set" in w for w in reused.report.warnings) == 1


def test_calibration_longer_than_the_model_s_context_is_warned_about(qwen2):
    merger = _merger(qwen2, lam=1.0, stage2=False, sequential=False)
    merger.merge(reasoning_records(4))
    assert not any("longer than the model's context" in w for w in merger.report.warnings)
    lengths = [len(s.input_ids) for s in merger._prepare("reasoning", reasoning_records(4))]
    merger.model.config.max_position_embeddings = min(lengths) - 1  # as if the model had a shorter context
    merger.merge(reasoning_records(4))
    found = [w for w in merger.report.warnings if "longer than the model's context" in w]
    assert found == [f"4 of 4 reasoning calibration samples are longer than the model's context "
                     f"(max_position_embeddings={min(lengths) - 1}; the longest {max(lengths)} tokens): set max_length "
                     f"to at most {min(lengths) - 1} to cut them, or use shorter samples"]


def test_paths_given_with_a_tilde_are_the_home_folder_s(qwen2, tmp_path, monkeypatch):
    from rain_hf.card import check_template, default_template_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "reasoning.json").write_text(json.dumps(reasoning_records(4)))
    merger = _merger(qwen2, lam=1.0, stage2=False, sequential=False)
    merger.merge("~/reasoning.json")
    assert merger.calibration_info["reasoning"]["file_sha256"]
    merger.features.save("~/features.safetensors")
    merger.config.save("~/config.json")
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["config.json", "features.safetensors",
                                                                     "reasoning.json"]
    assert not (tmp_path / "~").exists()  # no folder named "~" under the working directory
    assert ThinkFeatures.load("~/features.safetensors").bases.keys() == merger.features.bases.keys()
    assert RainMergingConfig.load("~/config.json") == merger.config
    shutil.copy(default_template_path(), tmp_path / "home" / "card.md.j2")
    check_template("~/card.md.j2")
    merger.save_pretrained(tmp_path / "out", card_template="~/card.md.j2")
    # the saved folder, as transformers' from_pretrained takes it: its sidecar; a features folder is named
    assert RainMergingConfig.load(tmp_path / "out") == RainMergingConfig.load(tmp_path / "out" / CONFIG_NAME)
    with pytest.raises(ConfigError, match="home is a folder without rain_merging_config.json: pass a file"):
        RainMergingConfig.load("~")
    with pytest.raises(IsADirectoryError, match=r"home is a folder; ThinkFeatures.load takes the file .* \(the folder "
                                                r"holds \['features.safetensors'\]\)"):
        ThinkFeatures.load("~")


def test_calibration_files_are_recorded_with_the_hash_sha256sum_prints(qwen2, tmp_path):
    import hashlib

    path = tmp_path / "reasoning.json"
    path.write_text(json.dumps(reasoning_records(3), indent=3))
    merger = _merger(qwen2, lam=1.0, stage2=False, sequential=False)
    merger.merge(str(path))
    entry = merger.sidecar()["calibration"]["reasoning"]
    assert entry["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]
    merger.merge(reasoning_records(3))  # the same records, not from a file: the records' hash alone
    again = merger.sidecar()["calibration"]["reasoning"]
    assert again["sha256"] == entry["sha256"] and again["file_sha256"] is None
    # features computed from the file, saved, and loaded by another merger: the file is still named, with its hashes
    merger.compute_features(str(path))
    merger.features.save(tmp_path / "features.safetensors")
    reused = RainMerger.from_pretrained(qwen2["base"], qwen2["reasoning"], qwen2["instruct"], merger.config,
                                        features=tmp_path / "features.safetensors")
    reused.merge()
    origin = reused.sidecar()["calibration"]["reasoning"]
    assert origin["source"] == "precomputed thinking features" and origin["computed_from"] == str(path)
    assert (origin["sha256"], origin["file_sha256"]) == (entry["sha256"], entry["file_sha256"])
    card = reused.save_pretrained(tmp_path / "out") / "README.md"
    text = card.read_text()
    assert f"add under calibration: the file they were computed from ({path})" in text
    assert f"precomputed thinking features (computed from {path})" in text and entry["file_sha256"] in text


def test_saved_records_describe_the_merge_the_model_holds(qwen2, tmp_path, caplog, monkeypatch):
    """Config edits after a merge, later merges that read less data, and failed merges never leak into the
    sidecar or card of the model that is saved."""
    data_a, data_b = reasoning_records(4), reasoning_records(4, seed=1)
    merger = _merger(qwen2, lam=1.0, stage2=False, sequential=False)
    merger.merge(data_a)
    sha_a = merger.sidecar()["calibration"]["reasoning"]["sha256"]
    # edited for the next merge, then saved without merging: the files describe the merge that was made
    merger.config.lam, merger.config.stage1 = 4.0, False
    with caplog.at_level(logging.WARNING, logger="rain_hf.merger"):
        out = merger.save_pretrained(tmp_path / "a")
    sidecar = json.loads((out / "rain_merging_config.json").read_text())
    assert (sidecar["config"]["lam"], sidecar["config"]["stage1"], sidecar["lam"]) == (1.0, True, 1.0)
    assert "merger.config was changed after the last merge (lam: 1.0 → 4.0; stage1: True → False); the saved " \
           "model is that merge, and its card" in caplog.text
    assert "Stage 1 was off" not in (out / "README.md").read_text()
    merger.config.lam, merger.config.stage1 = 1.0, True
    merger.config.lam_grid = tuple(merger.config.lam_grid)  # equal as a tuple: no edit
    merger.config.output_dtype = "bfloat16"  # the merged weights were not rounded to it: an edit
    merger.config.project_bias = True  # fixed by the plan: merge() refuses it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rain_hf.merger"):
        out = merger.save_pretrained(tmp_path / "b")
    assert "changed after the last merge (project_bias: False → True; output_dtype: None → 'bfloat16'); the saved " \
           "model is that merge (saved in the checkpoint's own dtypes, which its merged weights were rounded to), " \
           "and its card and rain_merging_config.json describe it: make a new RainMerger with project_bias " \
           "changed" in caplog.text
    # ... and it is saved as it was merged: in float32, its biases the reasoning model's (project_bias was off),
    # and so its records say
    recorded = json.loads((out / "rain_merging_config.json").read_text())["config"]
    assert (recorded["output_dtype"], recorded["project_bias"]) == (None, False)
    saved = load_file(out / "model.safetensors")
    params = dict(merger.model.named_parameters())
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert "dtype" not in json.loads((out / "config.json").read_text()) or \
        json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert all(torch.equal(saved[k], params[k].detach()) for k in saved if not k.startswith("lm_head"))
    merger.config.project_bias = False
    merger.config.output_dtype, merger.config.lam, merger.config.stage1 = None, 4.0, False
    # a merge without stage 1 lists no reasoning data and no feature timing, though the features are kept
    merger.merge()
    record = merger.sidecar()
    assert record["calibration"] == {"reasoning": None, "instruction": None}
    assert "stage1_features" not in record["report"]["timings"]
    merger.config.method = "ties"
    merger.merge()
    assert merger.sidecar()["calibration"] == {"reasoning": None, "instruction": None}
    # back to stage 1 without data: the features' own data (A) is named
    merger.config.method, merger.config.stage1 = "rain", True
    merger.merge()
    assert merger.sidecar()["calibration"]["reasoning"]["sha256"] == sha_a
    # a merge on B interrupted in its feature capture keeps A's features, and a retry names A, not B
    import rain_hf.merger as merger_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merger_module, "capture_think_features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merger.merge(data_b)
    monkeypatch.undo()
    merger.merge()
    assert merger.sidecar()["calibration"]["reasoning"]["sha256"] == sha_a


def test_a_refused_merge_keeps_the_finished_one_and_a_failed_restore_hides_no_error(qwen2, tmp_path, monkeypatch):
    import rain_hf.merger as merger_module

    merger = _merger(qwen2, lam=1.0)
    merger.merge(reasoning_records(3), instruction_records(3))
    merged = {k: p.detach().clone() for k, p in merger.model.named_parameters()}
    for call in (lambda: merger.merge(reasoning_records(3)),  # the instruction data forgotten
                 lambda: setattr(merger.config, "lam", "auto") or merger.merge(None, instruction_records(3))):
        with pytest.raises(ValueError, match="Stage 2 needs instruction calibration data|computed without any"):
            call()
        assert merger.merged and all(torch.equal(p, merged[k]) for k, p in merger.model.named_parameters())
    merger.config.lam = 1.0
    merger.save_pretrained(tmp_path / "kept")  # the finished merge is still there to save

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    def unreadable(key):
        raise OSError("the reasoning checkpoint went away")

    monkeypatch.setattr(merger_module, "collect_attention_stats", out_of_memory)
    real_apply = merger._apply_rain

    def apply_then_break_reads(*args, **kwargs):  # the restore after the probe fails too
        real_apply(*args, **kwargs)
        monkeypatch.setattr(merger.reasoning, "get", unreadable)

    monkeypatch.setattr(merger, "_apply_rain", apply_then_break_reads)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # why the merge stopped, not the restore's error
        merger.merge(reasoning_records(3), instruction_records(3))


def test_an_interrupted_restore_leaves_nothing_to_save(qwen2, tmp_path, monkeypatch):
    merger = _merger(qwen2, lam=1.0, stage2=False, sequential=False)
    merger.merge(reasoning_records(3))
    merger.config.lam = 3.0
    get, calls = merger.reasoning.get, []

    def interrupted(key):
        calls.append(key)
        if len(calls) == 5:  # half way through putting the reasoning weights back
            raise KeyboardInterrupt
        return get(key)

    monkeypatch.setattr(merger.reasoning, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merger.merge()
    monkeypatch.undo()
    assert not merger.merged
    with pytest.raises(RuntimeError, match=r"no longer holds a finished merge .*or a later merge\(\) did not finish"):
        merger.save_pretrained(tmp_path / "mixed")
    with pytest.raises(RuntimeError, match=r"Nothing to describe: the model no longer holds a finished merge"):
        merger.sidecar()  # the last merge's config beside the failed one's report would describe neither


def test_compute_features_after_a_merge_says_it_undoes_it(qwen2, tmp_path, caplog):
    merger = _merger(qwen2, lam=1.0, stage2=False, sequential=False)
    with pytest.raises(RuntimeError, match=r"Nothing to save yet: call merge\(\) first"):
        merger.save_pretrained(tmp_path / "out")
    merger.merge(reasoning_records(3))
    with caplog.at_level(logging.WARNING, logger="rain_hf.merger"):
        merger.compute_features(reasoning_records(3))
    assert "compute_features() puts the reasoning model's weights back, undoing the last merge" in caplog.text
    reasoning = _weights(qwen2["reasoning"])
    assert all(torch.equal(p.detach(), reasoning[k]) for k, p in merger.model.named_parameters() if k in reasoning)
    with pytest.raises(RuntimeError, match=r"no longer holds a finished merge \(compute_features\(\) or reset"):
        merger.save_pretrained(tmp_path / "out")


def test_biases_merge_with_lambda_and_their_rows_head_scale(qwen2):
    """project_bias with stage 2 and λ ≠ 1: each q/k/v bias entry moves by λ·(its row's stage-2 scale)·Δb (stage 1
    off, so Δb⊥ = Δb); a baseline merges biases with λ too."""
    base, inst, reas = _weights(qwen2["base"]), _weights(qwen2["instruct"]), _weights(qwen2["reasoning"])
    merger = _merger(qwen2, lam=2.0, stage1=False, project_bias=True)
    merger.merge(instruction_calibration=instruction_records(3))
    alpha = torch.tensor(merger.report.head_coefficients, dtype=torch.float64)
    merged = {k: v.detach().double() for k, v in merger.model.named_parameters()}
    checked = 0
    for target in merger.targets:
        if not target.bias_key:
            continue
        leaf = target.name.rsplit(".", 1)[-1]
        rows = _head_scale(leaf, alpha[target.layer], target.shape, 4, 2, 16)[:, 0]
        delta_b = (inst[target.bias_key] - base[target.bias_key]).double()
        torch.testing.assert_close(merged[target.bias_key] - reas[target.bias_key].double(), 2.0 * rows * delta_b,
                                   atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked == 6  # q, k and v of both layers
    baseline = _merger(qwen2, method="task_arithmetic", lam=0.5, project_bias=True)
    baseline.merge()
    key = "model.layers.0.self_attn.k_proj.bias"
    torch.testing.assert_close(baseline.model.get_parameter(key).detach(), reas[key] + 0.5 * (inst[key] - base[key]))


def test_o_proj_and_mlp_biases_take_their_layers_mean_alpha(tmp_path, tokenizer):
    """A Llama with attention and MLP biases: an o_proj or MLP bias entry moves by λ·mean(α of its layer)·Δb (its
    output is not split by head), a q/k/v bias entry by its row's head scale."""
    paths = build_triple(tmp_path, "llama", tokenizer=tokenizer, seed=5, attention_bias=True, mlp_bias=True)
    base, inst, reas = _weights(paths["base"]), _weights(paths["instruct"]), _weights(paths["reasoning"])
    merger = _merger(paths, lam=2.0, stage1=False, project_bias=True)
    merger.merge(instruction_calibration=instruction_records(3))
    alpha = torch.tensor(merger.report.head_coefficients, dtype=torch.float64)
    assert float(alpha.std()) > 0  # per-head α that differ, or a wrong scale could pass
    merged = {k: v.detach().double() for k, v in merger.model.named_parameters()}
    kinds = set()
    for target in merger.targets:
        leaf = target.name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj"):
            rows = _head_scale(leaf, alpha[target.layer], target.shape, 4, 2, 16)[:, 0]
        else:  # o_proj and the MLP: one scale for the whole output
            rows = alpha[target.layer].mean()
        delta_b = (inst[target.bias_key] - base[target.bias_key]).double()
        torch.testing.assert_close(merged[target.bias_key] - reas[target.bias_key].double(), 2.0 * rows * delta_b,
                                   atol=1e-6, rtol=1e-5)
        kinds.add(leaf)
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_the_stage2_probe_projects_one_shot_in_a_sequential_merge(qwen2, monkeypatch):
    """The probe only ranks heads: it uses the reasoning model's features (one-shot); only the final merge replays
    the layers, once per λ merged."""
    from rain_hf import merger as merger_module

    built = []
    real = merger_module.LayerReplay

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(merger_module, "LayerReplay", counting)
    merger = _merger(qwen2, lam=1.0, sequential=True)
    merger.merge(reasoning_records(4), instruction_records(3))
    assert merger.report.projection == "sequential" and len(built) == 1


def test_a_tensor_that_overflows_float16_is_refused_before_it_is_saved(qwen2, tmp_path, tokenizer):
    # a bf16 or fp32 checkpoint may hold values past float16's 65504 (an outlier norm weight)
    folders = {role: tmp_path / role for role in ("base", "reasoning", "instruct")}
    for role, folder in folders.items():
        shutil.copytree(qwen2[role], folder)
    weights = _weights(folders["reasoning"])
    weights["model.norm.weight"][0] = 1.0e5
    save_file(weights, str(folders["reasoning"] / "model.safetensors"), metadata={"format": "pt"})
    merger = RainMerger.from_pretrained(folders["base"], folders["reasoning"], folders["instruct"],
                                        RainMergingConfig(method="task_arithmetic", output_dtype="float16"))
    merger.merge()
    with pytest.raises(ConfigError, match=r"model.norm.weight does not fit in float16 .*: set output_dtype='bfloat16' "
                                          r"\(float16's size, float32's range\) or 'float32' and merge again"):
        merger.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merger.config.output_dtype = "bfloat16"
    merger.merge()
    assert _weights(merger.save_pretrained(tmp_path / "out"))["model.norm.weight"][0].item() > 65504
    # merged in float16 (a float16 checkpoint loaded as stored): the weights in memory overflowed already
    half = build_triple(tmp_path / "half", "llama", tokenizer=tokenizer, dtype=torch.float16)
    key = "model.layers.0.self_attn.q_proj.weight"
    for role, value in (("reasoning", 60000.0), ("instruct", 60000.0), ("base", 0.0)):
        weights = _weights(half[role])
        weights[key][0, 0] = value
        save_file(weights, str(half[role] / "model.safetensors"), metadata={"format": "pt"})
    merger = _merger(half, method="task_arithmetic")
    with pytest.raises(ConfigError, match=rf"{key} does not fit in float16 .*: load the models with "
                                          r"torch_dtype='float32' \(or 'bfloat16'\), set output_dtype='bfloat16'"):
        merger.merge()  # refused by the merge: the model it would return holds inf
    assert not merger.merged and torch.equal(merger.model.get_parameter(key).detach(), _weights(half["reasoning"])[key])
    # a merged weight past 65504 in a float32 merge saved as float16: refused by the merge, whose setting mends it
    for cfg in (dict(method="task_arithmetic", output_dtype="float16"), dict(lam=1.0, stage1=False, stage2=False)):
        merger = RainMerger.from_pretrained(half["base"], half["reasoning"], half["instruct"],
                                            RainMergingConfig(**cfg), torch_dtype="float32")
        with pytest.raises(ConfigError, match=rf"{key} does not fit in float16 .*: set output_dtype='bfloat16'"):
            merger.merge()
        merger.config.output_dtype = "float32"
        merger.merge()
        assert merger.model.get_parameter(key)[0, 0].item() == 120000.0


def test_a_reasoning_model_with_its_own_code_gives_a_merge_that_loads_the_same_way(qwen2, tmp_path, caplog,
                                                                                    monkeypatch):
    folders = {role: tmp_path / role for role in ("base", "reasoning", "instruct")}
    for role, folder in folders.items():
        shutil.copytree(qwen2[role], folder)
    reasoning = folders["reasoning"]
    config = json.loads((reasoning / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_mine.MineConfig",
                          "AutoModelForCausalLM": "modeling_mine.MineForCausalLM",
                          "AutoModel": "other/repo--modeling_other.Other"}  # code in another repository
    (reasoning / "config.json").write_text(json.dumps(config))
    (reasoning / "configuration_mine.py").write_text(
        "from transformers import Qwen2Config\n\n\nclass MineConfig(Qwen2Config):\n    pass\n")
    (reasoning / "modeling_mine.py").write_text(
        "from transformers import Qwen2ForCausalLM\n\nfrom .configuration_mine import MineConfig\n\n\n"
        "class MineForCausalLM(Qwen2ForCausalLM):\n    config_class = MineConfig\n")
    merger = RainMerger.from_pretrained(folders["base"], reasoning, folders["instruct"],
                                        RainMergingConfig(method="task_arithmetic"))
    merger.merge()
    out = merger.save_pretrained(tmp_path / "out")
    for name in ("configuration_mine.py", "modeling_mine.py"):
        assert (out / name).read_bytes() == (reasoning / name).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "MineForCausalLM"
    (reasoning / "modeling_mine.py").unlink()
    with caplog.at_level(logging.WARNING, logger="rain_hf.merger"):
        merger.save_pretrained(tmp_path / "out2")
    assert "auto_map names modeling_mine.py, which its folder lacks" in caplog.text
    # a model type transformers does not know: its code is never run, and the user is not asked whether to run it
    config["model_type"] = "rain-hf-unknown"
    (reasoning / "config.json").write_text(json.dumps(config))
    (reasoning / "configuration_mine.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    import builtins

    asked = []
    monkeypatch.setattr(builtins, "input", lambda *args: asked.append(args) or "y")
    # ... and the refusal is not transformers' advice to pass trust_remote_code=True, which rain_hf refuses
    with pytest.raises(CheckpointError, match=r"needs the Python code in its repository .* a model with custom code "
                                              r"is not supported"):
        RainMerger.plan(folders["base"], reasoning, folders["instruct"])
    assert not asked and not (tmp_path / "ran").exists()


def test_bias_changes_of_a_full_instruct_model_left_behind_are_named(qwen2, tokenizer, tmp_path):
    # Qwen2's q/k/v biases change in its instruct fine-tune; without project_bias they stay the reasoning model's
    warning = ("the instruct model changed 6 biases of merged modules (e.g. model.layers.0.self_attn.q_proj.bias); "
               "they keep the reasoning model's values: they are merged only with project_bias=True")
    for method in ("rain", "task_arithmetic"):
        assert warning in RainMerger.plan(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                          RainMergingConfig(method=method)).warnings
    assert not any("biases" in w for w in RainMerger.plan(qwen2["base"], qwen2["reasoning"], qwen2["instruct"],
                                                          RainMergingConfig(project_bias=True)).warnings)
    llama = build_triple(tmp_path, "llama", tokenizer=tokenizer)  # no biases at all
    assert not any("biases" in w for w in RainMerger.plan(llama["base"], llama["reasoning"], llama["instruct"],
                                                          RainMergingConfig()).warnings)


def test_a_reasoning_tensor_that_cannot_be_copied_is_refused_by_the_plan(qwen2, tmp_path):
    # every reasoning tensor goes into the output: finding one it cannot read at the save would waste the merge
    reasoning = tmp_path / "reasoning"
    shutil.copytree(qwen2["reasoning"], reasoning)
    weights = _weights(reasoning)
    save_file({**weights, "odd_buffer": torch.zeros(3, dtype=torch.complex64)}, reasoning / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"stores odd_buffer \(and 0 more\) as C64, which rain_hf cannot read "
                                              r"or copy into the merged model"):
        RainMerger.plan(qwen2["base"], reasoning, qwen2["instruct"])


def test_phi3_fused_qkv_rows_are_scaled_per_head(tokenizer, tmp_path):
    # Phi-4-mini's layout: [q heads | k heads | v heads] rows in one qkv_proj; stage 2 scales each block per head
    paths = build_triple(tmp_path, "phi3", tokenizer=tokenizer)
    plan = RainMerger.plan(paths["base"], paths["reasoning"], paths["instruct"])
    assert {t.name.rsplit(".", 1)[-1]: t.kind for t in plan.targets}["qkv_proj"] == "qkv"
    assert not any("could not be mapped to heads" in w for w in plan.warnings)
    merged = {}
    for stage2 in (True, False):  # the same one-shot Δ⊥, with and without the head scales
        merger = _merger(paths, lam=2.0, stage2=stage2, sequential=False)
        merger.merge(reasoning_records(4), instruction_records(3) if stage2 else None)
        merged[stage2] = {k: v.detach().double() for k, v in merger.model.named_parameters()}
        if stage2:
            alpha = torch.tensor(merger.report.head_coefficients, dtype=torch.float64)
    reasoning = _weights(paths["reasoning"])
    for layer in (0, 1):
        key = f"model.layers.{layer}.self_attn.qkv_proj.weight"
        heads = alpha[layer]
        kv = torch.stack([heads[2 * g:2 * g + 2].mean() for g in range(2)])  # 4 query heads over 2 kv heads
        rows = torch.cat([heads.repeat_interleave(16), kv.repeat_interleave(16), kv.repeat_interleave(16)])
        delta = merged[False][key] - reasoning[key].double()
        torch.testing.assert_close(merged[True][key] - reasoning[key].double(), rows[:, None] * delta,
                                   atol=1e-6, rtol=1e-5)
        # the per-layer scale it used to get is told apart at these tolerances
        assert not torch.allclose(merged[True][key] - reasoning[key].double(), heads.mean() * delta,
                                  atol=1e-6, rtol=1e-5)


def test_a_multimodal_layout_is_refused_with_the_text_only_route(qwen2, tmp_path):
    # Gemma 3's 4B-27B checkpoints store the decoder as language_model.model.layers.*
    from rain_hf.merger import ModelMismatchError

    folders = {}
    for role in ("base", "reasoning", "instruct"):
        folders[role] = tmp_path / role
        shutil.copytree(qwen2[role], folders[role])
        weights = _weights(folders[role])
        save_file({f"language_model.{k}": v for k, v in weights.items()}, folders[role] / "model.safetensors",
                  metadata={"format": "pt"})
    with pytest.raises(ModelMismatchError, match=r"cannot merge this layout. It is a multimodal checkpoint \(its "
                                                 r"decoder is stored under language_model.\): save each of the three "
                                                 r"models' language model as a text-only causal LM"):
        RainMerger.plan(folders["base"], folders["reasoning"], folders["instruct"])


def test_merged_biases_are_saved_after_project_bias_is_edited(qwen2, tmp_path):
    # project_bias is fixed by the plan: an edit after the merge must not make the save drop the merged biases
    merger = _merger(qwen2, method="task_arithmetic", lam=0.5, project_bias=True)
    merger.merge()
    merger.config.project_bias = False
    saved = _weights(merger.save_pretrained(tmp_path / "out"))
    key = "model.layers.0.self_attn.k_proj.bias"
    assert not torch.equal(saved[key], _weights(qwen2["reasoning"])[key])
    assert torch.equal(saved[key], merger.model.get_parameter(key).detach())


def test_a_module_without_bias_is_projected_on_its_groups_features_without_the_ones_column(qwen2):
    """In a group whose features carry the column of ones (another module of it has a bias), a module without one
    must still get ΔW h = 0 on the rows of H itself."""
    from rain_hf.projection import feature_svd, with_bias_column

    merger = _merger(qwen2, lam=1.0, stage2=False, project_bias=True, rcond=1e-5, sequential=False)
    target = next(t for t in merger.targets if t.name.endswith("o_proj"))
    assert not target.has_bias
    h = torch.randn(20, target.shape[1], generator=torch.Generator().manual_seed(0))
    dw = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    out, bias = merger._projected(target, dw, None, record=False, basis=feature_svd(with_bias_column(h)))
    assert bias is None and out.shape == dw.shape
    assert float(torch.linalg.norm(out @ h.T)) < 1e-4 * float(torch.linalg.norm(dw @ h.T))


@pytest.mark.parametrize("arch", ["qwen3_next", "phimoe", "deepseek_v3"])
def test_moe_layouts_the_plan_cannot_merge_are_named(tmp_path, arch):
    from transformers import DeepseekV3Config, PhimoeConfig, Qwen3NextConfig

    from rain_hf import testing
    from rain_hf.merger import ModelMismatchError

    tokenizer = testing.build_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tokenizer))
    config = {"qwen3_next": lambda: Qwen3NextConfig(**small, moe_intermediate_size=16, num_experts=4,
                                                    num_experts_per_tok=2, head_dim=8),
              "phimoe": lambda: PhimoeConfig(**small, num_local_experts=4),
              "deepseek_v3": lambda: DeepseekV3Config(**{**small, "num_key_value_heads": 4}, moe_intermediate_size=16,
                                                      n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                                      n_group=1, topk_group=1, first_k_dense_replace=1,
                                                      q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                                      qk_nope_head_dim=8, v_head_dim=8)}[arch]()
    torch.manual_seed(0)
    base = testing.save_model(AutoModelForCausalLM.from_config(config), tokenizer, tmp_path / "base")
    models = (base, shutil.copytree(base, tmp_path / "reasoning"), shutil.copytree(base, tmp_path / "instruct"))
    if arch == "qwen3_next":  # linear-attention blocks first: no instruction attention for stage 2 to score
        with pytest.raises(ConfigError, match=r"Decoder layers \[0, 1, 2\] hold no softmax attention module .*"
                                              r"set stage2=False, or config.layers to the attention layers \[3\]"):
            RainMerger.plan(*models, RainMergingConfig(lam=1.0))
        with pytest.raises(ConfigError, match=r"the attention layers \[3\]"):  # not the empty selected ones
            RainMerger.plan(*models, RainMergingConfig(lam=1.0, layers=[0, 1]))
        plan = RainMerger.plan(*models, RainMergingConfig(lam=1.0, stage2=False))
        assert {t.layer for t in plan.targets} == {0, 1, 2, 3}
        merger = RainMerger.from_pretrained(*models, RainMergingConfig(lam=1.0, stage2=False))
        merger.merge(testing.reasoning_records(2))
        merger.config.stage2 = True  # as the README suggests for comparing stages on one loaded model
        with pytest.raises(ConfigError, match=r"Decoder layers \[0, 1, 2\] hold no softmax attention module"):
            merger.merge(testing.reasoning_records(2), testing.instruction_records(2))
        assert merger.merged  # the refusal keeps the finished merge
    elif arch == "deepseek_v3":  # latent attention: no projection has the per-head layout stage 2 scales
        plan = RainMerger.plan(*models, RainMergingConfig(lam=1.0))
        assert any(w.startswith("16 attention projections could not be mapped to heads (e.g. model.layers.0."
                                "self_attn.q_a_proj): stage 2 scales each of them by its layer's mean α")
                   for w in plan.warnings), plan.warnings
        plan = RainMerger.plan(*models, RainMergingConfig(lam=1.0, stage2=False))
        assert not any("could not be mapped to heads" in w for w in plan.warnings)
    else:  # transformers stores the router as block_sparse_moe.gate and loads it as mlp.router
        with pytest.raises(ModelMismatchError, match=r"No checkpoint stores 4 tensors .*\(e.g. model.layers.0.mlp"
                                                     r".router.weight\).*List target_modules without router\."):
            RainMerger.plan(*models, RainMergingConfig(lam=1.0))
        RainMerger.plan(*models, RainMergingConfig(lam=1.0, target_modules=["q_proj", "o_proj"]))


def test_a_layout_stored_under_other_names_throughout_is_named(qwen2, tmp_path):
    from safetensors.torch import save_file

    from rain_hf.merger import ModelMismatchError

    models = []
    for role in ("base", "reasoning", "instruct"):  # every decoder tensor under another prefix than it loads with
        folder = shutil.copytree(qwen2[role], tmp_path / role)
        tensors = load_file(str(folder / "model.safetensors"))
        save_file({k.replace("model.layers.", "backbone.layers."): v for k, v in tensors.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        models.append(folder)
    with pytest.raises(ModelMismatchError, match=r"None of the \d+ tensors of the targeted modules is stored under "
                                                 r"the name the model class gives it"):
        RainMerger.plan(*models, RainMergingConfig(lam=1.0, method="task_arithmetic"))


def test_a_model_type_without_a_causal_lm_class_is_refused_with_the_text_only_route(qwen2, tmp_path):
    # Mistral 3 (Ministral 3, Magistral): transformers' own error lists ~300 config classes and no way out
    from transformers import Mistral3Config

    from rain_hf.merger import ModelMismatchError

    text = json.loads((Path(qwen2["reasoning"]) / "config.json").read_text())
    config = Mistral3Config(text_config={k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                "num_hidden_layers", "num_attention_heads",
                                                                "num_key_value_heads")} | {"model_type": "mistral"},
                            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                                           "head_dim": 16})
    folders = {}
    for role in ("base", "reasoning", "instruct"):
        folders[role] = tmp_path / role
        shutil.copytree(qwen2[role], folders[role])
        config.save_pretrained(folders[role])
    with pytest.raises(ModelMismatchError, match=r"transformers has no causal-LM class for model_type 'mistral3' "
                                                 r"\(Mistral3Config\).* It is a multimodal model .*text-only causal LM"):
        RainMerger.plan(folders["base"], folders["reasoning"], folders["instruct"])
