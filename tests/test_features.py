"""Which modules a merge touches, and when saved thinking features fit a config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2Config, Qwen3MoeConfig

from rain_hf.config import ConfigError, RainMergingConfig
from rain_hf.features import (
    ThinkFeatures,
    eager_attention_bytes,
    find_decoder_layers,
    find_target_modules,
    unmergeable_weights,
)


def _meta(config) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def qwen2_skeleton() -> torch.nn.Module:
    return _meta(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100))


def _names(targets) -> list[str]:
    return sorted({t.name.split(".", 3)[-1] for t in targets})


def test_target_modules_match_dotted_suffixes_as_in_peft(qwen2_skeleton):
    targets = find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=["q_proj", "mlp.down_proj"]))
    assert _names(targets) == ["mlp.down_proj", "self_attn.q_proj"]
    assert len(targets) == 4  # both layers
    one = find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=["self_attn.o_proj"],
                                                                layers=[1]))
    assert [t.name for t in one] == ["model.layers.1.self_attn.o_proj"]
    full = find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=[
        "model.layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"]))  # full names and longer suffixes, as in peft
    assert [t.name for t in full] == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ConfigError, match=r"matches no linear module in the layers \[0\] that config.layers"):
        find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=["layers.1.mlp.up_proj"],
                                                              layers=[0]))
    # beside an entry that selects something, one that names only other layers' modules is not dropped unsaid
    with pytest.raises(ConfigError, match=r"entries \['layers.1.mlp.up_proj'\] match no linear module in the layers "
                                          r"\[0\] that config.layers selects, only modules of other layers"):
        find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=["layers.1.mlp.up_proj",
                                                                                         "q_proj"], layers=[0]))


@pytest.mark.parametrize("entries, named", [(["q_proj", "dwon_proj"], "['dwon_proj']"),
                                            (["attn.q_proj"], "['attn.q_proj']"),  # not a whole-part suffix
                                            (["foo"], "['foo']")])
def test_target_modules_entry_matching_nothing_is_an_error(qwen2_skeleton, entries, named):
    with pytest.raises(ConfigError, match="match no linear module") as err:
        find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=entries))
    assert named in str(err.value) and "'mlp.down_proj'" in str(err.value)  # lists what there is
    assert "(e.g. ['v_proj', 'mlp.down_proj'])" in str(err.value)  # the example is the model's own names


def test_fused_expert_weights_are_reported_as_unmergeable(qwen2_skeleton):
    assert unmergeable_weights(qwen2_skeleton) == []
    for config in (Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  vocab_size=100),
                   MixtralConfig(hidden_size=64, intermediate_size=128, num_local_experts=4, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=100)):
        model = _meta(config)
        linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        expected = [n for n, p in model.named_parameters()
                    if ".layers." in n and p.dim() >= 2 and n not in linear]
        assert expected and unmergeable_weights(model) == expected
    # Cohere's per-head q/k norm weights are matrices, and norms: never merged, by design, so not reported
    from transformers import CohereConfig

    cohere = _meta(CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=100, use_qk_norm=True))
    assert any(p.dim() >= 2 and "q_norm" in n for n, p in cohere.named_parameters())
    assert unmergeable_weights(cohere) == []


def test_features_print_as_a_summary_not_their_matrices():
    features = ThinkFeatures({"g": (torch.randn(64, 8), torch.rand(8))}, {"m.q_proj": "g", "m.k_proj": "g"},
                             {"positions": "window", "num_samples": 8})
    assert repr(features) == ("ThinkFeatures(1 groups of 2 modules, 0 held-out samples, positions='window', "
                              "num_samples=8)")


def test_saved_features_ignore_a_window_their_position_set_does_not_use():
    features = ThinkFeatures({}, {}, {"positions": "think", "window": 3})
    features.check_compatible(RainMergingConfig(lam=1.0, positions="think", window=1), [])
    windowed = ThinkFeatures({}, {}, {"positions": "window", "window": 3})
    with pytest.raises(ValueError, match="window=3"):
        windowed.check_compatible(RainMergingConfig(lam=1.0, positions="window", window=1), [])


def test_saved_features_refuse_an_rcond_their_svd_precision_does_not_resolve():
    # the config allows rcond 1e-12 in float64, but singular values from a float32 SVD are noise down to ~1e-7
    fine = RainMergingConfig(lam=1.0, precision="float64", rcond=1e-12)
    with pytest.raises(ValueError, match="SVD ran in float32.*rcond=1e-12.*precision='float64'"):
        ThinkFeatures({}, {}, {"precision": "float32"}).check_compatible(fine, [])
    ThinkFeatures({}, {}, {"precision": "float64"}).check_compatible(fine, [])
    ridge32 = dataclasses.replace(fine, projection="ridge", precision="float32", rcond=1e-5)
    ThinkFeatures({}, {}, {"precision": "float32"}).check_compatible(dataclasses.replace(ridge32, rcond=1e-12), [])
    # bases from another precision than the config's would project in it unnoticed
    with pytest.raises(ValueError, match=r"SVD ran in float32, but the config asks for precision='float64': "
                                         r"recompute them in it .*or set precision='float32'"):
        ThinkFeatures({}, {}, {"precision": "float32"}).check_compatible(dataclasses.replace(fine, rcond=1e-5), [])
    with pytest.raises(ValueError, match=r"computed with max_reasoning_samples=8 but the config asks for 4"):
        ThinkFeatures({}, {}, {"max_reasoning_samples": 8}).check_compatible(
            dataclasses.replace(fine, max_reasoning_samples=4), [])
    ThinkFeatures({}, {}, {}).check_compatible(fine, [])  # saved before the precision was recorded
    # a sequential merge without stage 2 recomputes every basis in the config's precision
    ThinkFeatures({}, {}, {"precision": "float32"}).check_compatible(fine, [], projects=False)


def test_a_string_target_is_a_regex_over_whole_names_as_in_peft(qwen2_skeleton):
    targets = find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=r".*\.self_attn\.(q|v)_proj"))
    assert [t.name for t in targets] == [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"]
    # peft matches a string against the whole name: "q_proj" alone names no module
    with pytest.raises(ConfigError, match=r"regular expression .*'model\.layers\.0\..*list of names such as \['q_proj'\]"):
        find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules="q_proj"))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        RainMergingConfig(lam=1.0, target_modules="(")
    for near in ("all", "all_linear", "Linear"):
        with pytest.raises(ConfigError, match=r"did you mean 'all-linear'"):
            find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=near))
    # a set of names, as peft takes it
    assert find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules={"v_proj", "q_proj"})) == \
        find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match=r"in the layers \[0\]"):
        find_target_modules(qwen2_skeleton, RainMergingConfig(lam=1.0, target_modules=r"model\.layers\.1\..*",
                                                              layers=[0]))


def test_eager_attention_estimate_takes_the_largest_batch_in_calibration_order():
    # batches of 2 in order: [3, 5] → 2·5², [2, 7] → 2·7², [1] → 1·1²; a batch costs its size × its longest²
    lengths = [3, 5, 2, 7, 1]
    assert eager_attention_bytes(lengths, 2, num_heads=3, dtype_bytes=2) == 2 * 7**2 * 3 * (2 * 2 + 4)
    assert eager_attention_bytes([9, 1, 1, 1], 4, num_heads=1, dtype_bytes=4) == 4 * 81 * 12
    assert eager_attention_bytes([9, 1, 1, 1], 1, num_heads=1, dtype_bytes=4) == 81 * 12
    assert eager_attention_bytes([], 4, num_heads=8, dtype_bytes=2) == 0


# ----------------------------------------------------------------------------------------------------------------
# Capture passes called directly (the merger puts the model in eval mode and passes valid targets itself)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_model_and_samples():
    from rain_hf import testing
    from rain_hf.calibration import prepare_reasoning_calibration

    tokenizer = testing.build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(testing.model_config("qwen2", len(tokenizer), attention_dropout=0.3))
    samples = prepare_reasoning_calibration(testing.reasoning_records(4), tokenizer, RainMergingConfig(lam=1.0))
    return model, samples, tokenizer.pad_token_id


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_direct_capture_runs_in_eval_mode_and_leaves_no_hooks(dropout_model_and_samples):
    from rain_hf.features import (
        LayerReplay,
        capture_think_features,
        collect_attention_stats,
        find_decoder_layers,
    )

    model, samples, pad = dropout_model_and_samples
    model.train()  # from_config models start in training mode: dropout would make every capture differ
    config = RainMergingConfig(lam=1.0, batch_size=2)
    targets = find_target_modules(model, config)
    first, second = (capture_think_features(model, samples, targets, config, pad) for _ in range(2))
    for group, (_, s) in first.bases.items():
        torch.testing.assert_close(s, second.bases[group][1])
    assert model.training and all(m.training for m in model.modules())  # the caller's mode is back
    replay = LayerReplay(model, samples, config, pad)
    rows = replay.group_rows(1, ["model.layers.1.mlp.down_proj"])
    again = LayerReplay(model, samples, config, pad).group_rows(1, ["model.layers.1.mlp.down_proj"])
    assert all(torch.equal(a, b) for a, b in zip(rows, again)) and model.training
    # a bad name after good ones: no hook stays behind to break the model's later passes
    bad = [*targets, dataclasses.replace(targets[0], name="model.layers.0.self_attn.qproj")]
    with pytest.raises(KeyError):
        capture_think_features(model, samples, bad, config, pad)
    with pytest.raises(KeyError):
        replay.group_rows(1, ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.qproj"])
    with pytest.raises(IndexError):
        collect_attention_stats(model, samples, [0, 5], 2, pad)
    assert _hook_count(model) == 0 and model.config._attn_implementation != "eager"
    assert len(find_decoder_layers(model)[1]) == 2


def test_an_interrupted_replay_refuses_to_go_on(dropout_model_and_samples, monkeypatch):
    from rain_hf.features import LayerReplay

    model, samples, pad = dropout_model_and_samples
    replay = LayerReplay(model, samples, RainMergingConfig(lam=1.0, batch_size=2), pad)
    run, calls = replay._run_layer, []

    def interrupted(b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run(b)

    monkeypatch.setattr(replay, "_run_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replay.group_rows(1, ["model.layers.1.mlp.down_proj"])
    monkeypatch.setattr(replay, "_run_layer", run)
    with pytest.raises(RuntimeError, match="interrupted while advancing a layer, so its batches sit at different "
                                           "layers: build a new one"):
        replay.group_rows(1, ["model.layers.1.mlp.down_proj"])


def test_non_finite_features_are_refused_with_the_module_named(dropout_model_and_samples):
    # An SVD of rows holding inf either fails inside LAPACK or gives NaN singular values, and a NaN cut-off would
    # keep no direction: the task vector would be merged unprojected.
    from rain_hf import testing
    from rain_hf.features import LayerReplay, capture_think_features

    _, samples, pad = dropout_model_and_samples
    model = AutoModelForCausalLM.from_config(testing.model_config("qwen2", 300)).eval()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    config = RainMergingConfig(lam=1.0, batch_size=2)
    targets = find_target_modules(model, config)
    with pytest.raises(ValueError, match=r"input of model\.layers\.1\.mlp\.(gate|up)_proj hold \d+ non-finite"):
        capture_think_features(model, samples, targets, config, pad)
    replay = LayerReplay(model, samples, config, pad)
    replay.group_basis(0, ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"])  # layer 0 is finite
    with pytest.raises(ValueError, match=r"input of model\.layers\.1\.mlp\.gate_proj .*float16 models often do: load it with torch_dtype=.float32."):
        replay.group_basis(1, ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"])


def test_modules_fed_flattened_tokens_get_their_rows_at_the_thinking_positions():
    # Qwen2-MoE calls its shared expert on hidden_states.view(-1, d): rows [B·T, d], not [B, T, d]
    from transformers import Qwen2MoeConfig

    from rain_hf import testing
    from rain_hf.calibration import prepare_reasoning_calibration
    from rain_hf.features import LayerReplay, capture_think_features

    tokenizer = testing.build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer))).eval()
    config = RainMergingConfig(lam=1.0, batch_size=3)
    samples = prepare_reasoning_calibration(testing.reasoning_records(5), tokenizer, config)
    name = "model.layers.1.mlp.shared_expert.gate_proj"
    reference = []  # one unpadded sample at a time
    handle = dict(model.named_modules())[name].register_forward_pre_hook(
        lambda _m, args: reference.append(args[0].reshape(-1, 64)[positions]))
    for sample in samples:
        positions = sample.think_positions(config.positions, config.window)
        with torch.no_grad():
            model(input_ids=torch.tensor([sample.input_ids]))
    handle.remove()
    reference = torch.cat(reference)
    targets = [t for t in find_target_modules(model, config) if "shared_expert." in t.name]
    features = capture_think_features(model, samples, targets, config, tokenizer.pad_token_id)
    v, s = features.bases[features.module_group[name]]
    torch.testing.assert_close(v @ torch.diag(s**2) @ v.T, reference.T @ reference, rtol=1e-4, atol=1e-4)
    rows = LayerReplay(model, samples, config, tokenizer.pad_token_id).group_rows(1, [name])
    torch.testing.assert_close(torch.cat(rows), reference)


def test_rows_keep_the_model_dtype_until_the_svd():
    from rain_hf.features import _rows_at

    x = torch.randn(2, 5, 8).to(torch.bfloat16)  # half the memory of float32 rows; the later cast is exact
    index = (torch.tensor([0, 1, 1]), torch.tensor([4, 0, 2]))
    rows = _rows_at(x, index, (2, 5), "m")
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, x[index])
    assert torch.equal(_rows_at(x.reshape(10, 8), index, (2, 5), "m"), rows)
    with pytest.raises(RuntimeError, match=r"m receives inputs of shape \(3, 8\).*leave it out"):
        _rows_at(x.reshape(10, 8)[:3], index, (2, 5), "m")


def test_conv1d_blocks_are_named_as_unsupported():
    from transformers import GPT2Config

    gpt2 = _meta(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64))
    with pytest.raises(ConfigError, match=r"GPT-2-style Conv1D layers \(attn.c_attn, .*merges linear layers only"):
        find_target_modules(gpt2, RainMergingConfig(lam=1.0))


def test_hybrid_and_moe_layouts_are_told_apart():
    from transformers import Llama4TextConfig, Qwen3NextConfig

    from rain_hf.features import _rows_at, layers_without_attention, merged_routers

    hybrid = _meta(Qwen3NextConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                   num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=100))
    assert layers_without_attention(hybrid) == [0, 1, 2]  # Gated DeltaNet blocks first, softmax attention last
    from transformers import JetMoeConfig, MiniMaxConfig

    minimax = _meta(MiniMaxConfig(hidden_size=64, intermediate_size=128, num_local_experts=4, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
                                  layer_types=["linear_attention", "full_attention"]))
    assert layers_without_attention(minimax) == [0]  # its linear attention's class is named *Attention too
    jetmoe = _meta(JetMoeConfig(hidden_size=64, intermediate_size=128, num_local_experts=4, num_hidden_layers=2,
                                num_key_value_heads=2, kv_channels=16, vocab_size=100))
    jet_targets = find_target_modules(jetmoe, RainMergingConfig(lam=1.0))
    assert set(merged_routers(jetmoe, jet_targets)) == {f"model.layers.{i}.{part}.router.layer" for i in range(2)
                                                        for part in ("mlp", "self_attention.experts")}
    assert {t.layer for t in find_target_modules(hybrid, RainMergingConfig(lam=1.0))} == {0, 1, 2, 3}
    llama4 = _meta(Llama4TextConfig(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                                    num_local_experts=4, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=100))
    targets = find_target_modules(llama4, RainMergingConfig(lam=1.0))
    assert merged_routers(llama4, targets) == [f"model.layers.{i}.feed_forward.router" for i in range(2)]
    assert merged_routers(llama4, [t for t in targets if "router" not in t.name]) == []
    # DeepSeek-V3's latent attention feeds kv_b_proj [B, 1, T, r]
    x = torch.randn(2, 1, 5, 8)
    index = (torch.tensor([0, 1]), torch.tensor([4, 2]))
    assert torch.equal(_rows_at(x, index, (2, 5), "kv_b_proj"), x[:, 0][index])


def test_sliding_window_layers_count_only_queries_whose_window_reaches_the_instruction():
    """Slow reference from eager attention maps: in a sliding layer, R and U queries that cannot see any instruction
    token through the window are left out of a and u; a layer where no R query can is NaN (not measured)."""
    from rain_hf import testing
    from rain_hf.calibration import prepare_instruction_calibration
    from rain_hf.coefficients import head_coefficients
    from rain_hf.features import collect_attention_stats, local_attention

    tokenizer = testing.build_tokenizer()
    samples = prepare_instruction_calibration(testing.instruction_records(3), tokenizer, RainMergingConfig(lam=1.0))

    def reach(s, t):  # distance from query t back to the nearest instruction token at or before it
        return min((t - x for a, b in s.instruction_spans for x in range(a, b) if x <= t), default=10**6)

    gaps = sorted(reach(s, t) for s in samples for a, b in s.constrained_spans for t in range(a, b))
    partial, blind = (gaps[0] + gaps[-1]) // 2 + 1, gaps[0]  # some R queries reach it / none does
    assert gaps[0] < partial <= gaps[-1]
    for window in (partial, blind):
        torch.manual_seed(0)  # layer 0 full attention, layer 1 sliding (Qwen2's max_window_layers)
        config = testing.model_config("qwen2", len(tokenizer), use_sliding_window=True, sliding_window=window,
                                      max_window_layers=1)
        assert local_attention(config) == [None, ("sliding", window)]
        model = AutoModelForCausalLM.from_config(config)
        a, u = collect_attention_stats(model, samples, [0, 1], 2, tokenizer.pad_token_id)
        model.set_attn_implementation("eager")
        ref_a, ref_u = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
        n_a, n_u = torch.zeros(2), torch.zeros(2)
        for s in samples:
            with torch.no_grad():
                maps = model(torch.tensor([s.input_ids]), output_attentions=True).attentions
            instr = [x for a_, b_ in s.instruction_spans for x in range(a_, b_)]
            for layer, limit in ((0, 10**6), (1, window)):
                for out, count, spans in ((ref_a, n_a, s.constrained_spans), (ref_u, n_u, s.unrelated_spans)):
                    queries = [t for a_, b_ in spans for t in range(a_, b_) if reach(s, t) < limit]
                    if queries:
                        mass = maps[layer][0][:, queries][:, :, instr].double().sum(dim=2).mean(dim=1)
                        out[layer] += mass
                        count[layer] += 1
        torch.testing.assert_close(a[0], ref_a[0] / n_a[0])
        torch.testing.assert_close(u[0], ref_u[0] / n_u[0])
        if window == partial:
            assert 0 < n_a[1] and bool((a[1] > 0).all())
            torch.testing.assert_close(a[1], ref_a[1] / n_a[1])
            torch.testing.assert_close(u[1], ref_u[1] / n_u[1].clamp(min=1))
        else:  # not measured: α = 1 there, and the full layer's scores alone set the mean
            assert n_a[1] == 0 and bool(torch.isnan(a[1]).all() and torch.isnan(u[1]).all())
            alpha = head_coefficients(a, u, rho=0.5, normalize="mean", lo=0.0, hi=2.0)
            assert torch.equal(alpha[1], torch.ones(4))
            score = (a[0] - 0.5 * u[0]) / (1 + u[0])
            torch.testing.assert_close(alpha[0], (score / score.mean()).clamp(0, 2).float())


def test_a_sample_without_constrained_tokens_counts_for_leakage_only():
    """A sample whose R spans max_length cut away adds to the leakage mean u and not to the alignment mean a."""
    from rain_hf import testing
    from rain_hf.calibration import prepare_instruction_calibration
    from rain_hf.features import collect_attention_stats

    tokenizer = testing.build_tokenizer()
    samples = prepare_instruction_calibration(testing.instruction_records(3), tokenizer, RainMergingConfig(lam=1.0))
    samples[0] = dataclasses.replace(samples[0], constrained_spans=[])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(testing.model_config("qwen2", len(tokenizer)))
    a, u = collect_attention_stats(model, samples, [0, 1], 2, tokenizer.pad_token_id)
    model.set_attn_implementation("eager")
    per_sample = {"a": [], "u": []}
    for s in samples:
        with torch.no_grad():
            maps = model(torch.tensor([s.input_ids]), output_attentions=True).attentions
        instr = [x for a_, b_ in s.instruction_spans for x in range(a_, b_)]
        for key, spans in (("a", s.constrained_spans), ("u", s.unrelated_spans)):
            queries = [t for a_, b_ in spans for t in range(a_, b_)]
            if queries:
                per_sample[key].append(torch.stack([m[0][:, queries][:, :, instr].double().sum(dim=2).mean(dim=1)
                                                    for m in maps[:2]]))
    assert (len(per_sample["a"]), len(per_sample["u"])) == (2, 3)
    torch.testing.assert_close(a, torch.stack(per_sample["a"]).mean(dim=0).to(a.dtype))
    torch.testing.assert_close(u, torch.stack(per_sample["u"]).mean(dim=0).to(u.dtype))


def test_local_attention_reach_matches_the_masks_transformers_builds():
    from transformers import Gemma2Config, Llama4TextConfig, Qwen2Config

    from rain_hf.features import _sees_keys, local_attention

    assert local_attention(Llama4TextConfig(num_hidden_layers=4, attention_chunk_size=8)) == [("chunked", 8)] * 3 + [None]
    assert local_attention(Gemma2Config(num_hidden_layers=2, sliding_window=16)) == [("sliding", 16), None]
    assert local_attention(Qwen2Config(num_hidden_layers=2, sliding_window=16)) == [None, None]  # not switched on
    generator = torch.Generator().manual_seed(0)
    keys, queries = (torch.rand(3, 40, generator=generator) < p for p in (0.1, 0.5))
    for reach in (("sliding", 1), ("sliding", 5), ("sliding", 64), ("chunked", 8), ("chunked", 7)):
        kind, size = reach
        expected = torch.zeros_like(queries)
        for b in range(3):
            for t in range(40):
                # transformers: kv_idx > q_idx - window, or kv_idx // chunk == q_idx // chunk; causal: kv_idx <= q_idx
                visible = [k for k in range(t + 1) if (k > t - size if kind == "sliding" else k // size == t // size)]
                expected[b, t] = bool(queries[b, t]) and any(bool(keys[b, k]) for k in visible)
        assert torch.equal(_sees_keys(queries, keys, reach), expected), reach


def test_per_layer_head_geometry_is_refused_by_name():
    from transformers import Gemma4TextConfig

    from rain_hf.features import attention_geometry

    config = Gemma4TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8)
    with pytest.raises(ConfigError, match="Gemma4TextConfig gives its layers different attention geometries .*cannot "
                                          "be merged yet"):
        attention_geometry(config)


def _random_samples(n: int, vocab: int, seed: int):
    import random

    from rain_hf.calibration import CalibrationSample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(14, 30)
        ids = [rng.randint(6, vocab - 1) for _ in range(length)]
        open_at = rng.randint(3, length // 2)
        close_at = rng.randint(open_at + 2, length - 2)
        ids[open_at], ids[close_at] = 4, 5
        out.append(CalibrationSample(ids, open_at, close_at, (0, open_at), (open_at + 1, close_at),
                                     (close_at + 1, length), index=i))
    return out


def test_a_module_that_runs_twice_in_a_pass_gives_both_inputs_one_shot_and_replayed():
    from transformers import Gemma3nTextConfig

    from rain_hf.features import LayerReplay, capture_think_features

    # Gemma 3n's AltUp router runs twice per layer (predict, then correct) on different inputs
    config = Gemma3nTextConfig(vocab_size=300, vocab_size_per_layer_input=300, hidden_size=64,
                               hidden_size_per_layer_input=8, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_kv_shared_layers=0,
                               sliding_window=6, laurel_rank=8, activation_sparsity_pattern=[0.0] * 2,
                               layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    samples = _random_samples(4, 300, seed=3)
    cfg = RainMergingConfig(lam=1.0, batch_size=2, positions="window", window=2)
    name = "model.layers.1.altup.modality_router"
    targets = [t for t in find_target_modules(model, cfg) if t.name in (name, "model.layers.1.mlp.down_proj")]
    features = capture_think_features(model, samples, targets, cfg, 0)
    assert features.settings["calls_per_pass"] == {name: 2}
    inputs = []  # the obvious reference: every input the module gets in unpadded passes, at the thinking positions
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    reference = []
    with torch.no_grad():
        for sample in samples:
            inputs.clear()
            model(input_ids=torch.tensor([sample.input_ids]))
            positions = torch.tensor(sample.think_positions(cfg.positions, cfg.window))
            reference += [x.reshape(-1, x.shape[-1])[positions] for x in inputs]
    handle.remove()
    assert len(reference) == 2 * len(samples)
    gram = torch.cat(reference).T @ torch.cat(reference)
    v, s = features.bases[name]
    torch.testing.assert_close(v @ torch.diag(s**2) @ v.T, gram, rtol=1e-4, atol=1e-4)
    rows = torch.cat(LayerReplay(model, samples, cfg, 0).group_rows(1, [name], calls=2))
    torch.testing.assert_close(rows.T @ rows, gram, rtol=1e-4, atol=1e-4)


def test_modules_that_never_run_are_named_when_features_are_captured():
    from transformers import BloomConfig

    from rain_hf.features import capture_think_features

    # with pretraining_tp > 1 and slow_but_exact, BLOOM multiplies by slices of these weights without calling them
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=300, hidden_size=64, n_layer=2, n_head=4,
                                                         pretraining_tp=2, slow_but_exact=True),
                                             attn_implementation="eager").eval()
    cfg = RainMergingConfig(lam=1.0, batch_size=2)
    with pytest.raises(ValueError, match=r"4 of the modules to merge never ran .*\(e\.g\. transformer\.h\.0\."
                                         r"self_attention\.dense\).*Leave them out with target_modules"):
        capture_think_features(model, _random_samples(3, 300, seed=0), find_target_modules(model, cfg), cfg, 0)


def test_decoder_layers_are_the_text_decoders_not_a_longer_vision_encoder():
    from transformers import Gemma3Config

    # a vision tower with more layers than the text decoder was taken for the decoder (the longest ModuleList)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=3, bos_token_id=1, sliding_window=6),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=399, boi_token_index=397, eoi_token_index=398)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    name, layers = find_decoder_layers(model)
    assert name == "model.language_model.layers" and len(layers) == 2


def test_shapes_that_match_a_head_layout_by_chance_are_not_mapped_to_heads():
    from rain_hf.features import AttentionGeometry, _attention_kind

    geo = AttentionGeometry(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
    assert _attention_kind("q_proj", 64, 64, geo) == "q" and _attention_kind("o_proj", 64, 64, geo) == "o"
    assert _attention_kind("kv_in", 32, 64, geo) == "kv"  # an unknown name with kv's shape only
    # JetMoE's fused [k | v] has q's shape, and MLA's q_b_proj (latent 64 → heads) o's: neither is per head
    assert _attention_kind("kv_proj", 64, 48, dataclasses.replace(geo, hidden_size=48)) == "other"
    assert _attention_kind("q_b_proj", 64, 32, dataclasses.replace(geo, head_dim=8)) == "other"
    assert _attention_kind("out", 64, 32, dataclasses.replace(geo, head_dim=8)) == "o"


def test_a_model_without_a_recognised_attention_module_is_named():
    class Mla(torch.nn.Module):  # LongCat-Flash's attention class ends in MLA, not Attention
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Mla(), torch.nn.Linear(4, 4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match=r"Model: no decoder block holds a module whose class name ends in "
                                         r"'Attention' \(its blocks hold Mla\)"):
        find_decoder_layers(Model())
