"""LoraDelta against peft itself: ΔW from the adapter tensors must equal merge_and_unload() minus the base."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rain_hf import RainMerger, RainMergingConfig
from rain_hf.checkpoints import CheckpointError, LazyCheckpoint
from rain_hf.lora import (
    AdapterError,
    LoraDelta,
    _saved_keys_sorted,
    is_lora_adapter,
    resolve_pattern,
    same_base_model,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=64, max_position_embeddings=64)


def _save_random(model_cls, config, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "qwen": _save_random(Qwen2ForCausalLM, Qwen2Config(**TINY), root / "qwen"),
        "qwen_wide": _save_random(Qwen2ForCausalLM, Qwen2Config(**{**TINY, "hidden_size": 48}), root / "qwen_wide"),
        "llama": _save_random(LlamaForCausalLM, LlamaConfig(**TINY), root / "llama"),
        "gpt2": _save_random(GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                                         n_positions=64), root / "gpt2"),
    }


def _base_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    ckpt = LazyCheckpoint(folder)
    return {key: ckpt.shape(key) for key in ckpt.keys()}


def make_adapter(base: Path, out: Path, config, seed: int = 1, merge: bool = True, train_all: bool = False,
                 **save_kwargs):
    """Save a peft adapter with random (non-zero) factors; return the reference ΔW per adapted weight (or None).

    ``train_all`` also moves every other trainable parameter (modules_to_save copies, trained biases)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif train_all and param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(out, **save_kwargs)
    if not merge:
        return None
    base_sd = load_file(str(base / "model.safetensors"))
    merged = peft_model.merge_and_unload().state_dict()
    return {key: merged[key] - base_sd[key] for key in base_sd if not torch.equal(merged[key], base_sd[key])}


def _assert_matches(lora: LoraDelta, reference: dict[str, torch.Tensor], base: Path) -> None:
    assert sorted(lora.weight_keys()) == sorted(reference), "adapted modules differ from what peft merged"
    for key, expected in reference.items():
        got = lora.delta(key)
        assert got.dtype == torch.float32 and got.shape == expected.shape, key
        err = (got - expected).norm() / expected.norm()
        assert err < 1e-6, f"{key}: relative error {err:.2e}"
        left, right = lora.factors(key)
        torch.testing.assert_close(left @ right, got)
    for key in _base_shapes(base):
        if key not in reference:
            assert lora.delta(key) is None
    assert lora.validate(_base_shapes(base), None, str(base)) == []


@pytest.mark.parametrize("use_rslora", [False, True], ids=["plain", "rslora"])
def test_qwen_all_linear_matches_merge_and_unload(bases, tmp_path, use_rslora):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=use_rslora)
    reference = make_adapter(bases["qwen"], tmp_path / "ad", config)
    assert len(reference) == 2 * 7  # q k v o gate up down in each of the 2 layers
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    assert lora.base_model_name_or_path == str(bases["qwen"])
    assert lora.config["use_rslora"] is use_rslora
    expected_scaling = 8 / 2 if use_rslora else 8 / 4
    assert lora.scaling("model.layers.0.self_attn.q_proj.weight") == pytest.approx(expected_scaling)
    assert lora.weight_keys()[0].startswith("model.layers.0.")
    _assert_matches(lora, reference, bases["qwen"])


def test_rank_and_alpha_patterns_resolve_like_peft(bases, tmp_path):
    # dict order matters: the first matching key wins, in peft and here
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 6, "q_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 8},
        alpha_pattern={"^model.layers.1.self_attn.k_proj": 3, "v_proj": 16, "o_proj": 5.5},
    )
    reference = make_adapter(bases["qwen"], tmp_path / "ad", config)
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    ranks = {key: lora.rank(key) for key in lora.weight_keys()}
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 6
    assert ranks["model.layers.1.self_attn.q_proj.weight"] == 2
    assert ranks["model.layers.1.mlp.down_proj.weight"] == 8
    assert ranks["model.layers.0.mlp.down_proj.weight"] == 4
    assert lora.scaling("model.layers.1.self_attn.k_proj.weight") == pytest.approx(3 / 4)
    assert lora.scaling("model.layers.0.self_attn.k_proj.weight") == pytest.approx(8 / 4)
    assert lora.scaling("model.layers.0.self_attn.v_proj.weight") == pytest.approx(16 / 4)
    assert lora.scaling("model.layers.1.self_attn.q_proj.weight") == pytest.approx(8 / 2)
    _assert_matches(lora, reference, bases["qwen"])


def test_clashing_alpha_pattern_keys_are_warned(bases, tmp_path):
    # layers.1's q_proj matches both keys; the first key in the saved file's order wins, in peft as here. peft 0.21
    # saves adapter_config.json with sorted keys, so the module trained with alpha 32 (the first key at creation)
    # reloads with alpha 2; 0.22 keeps the order. A file from before 0.22 cannot tell which was trained, so it is
    # said; one from 0.22 on reloads as trained
    alphas = {"q_proj": 32, r"layers\.1\..*": 2}
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], alpha_pattern=alphas)
    reference = make_adapter(bases["qwen"], tmp_path / "ad", config)
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    saved = list(lora.config["alpha_pattern"])
    assert sorted(saved) == sorted(alphas)
    key = "model.layers.1.self_attn.q_proj.weight"
    assert lora.scaling(key) == pytest.approx(alphas[saved[0]] / 4)
    torch.testing.assert_close(lora.delta(key) * 32 / alphas[saved[0]], reference[key])  # trained with alpha 32
    text = "\n".join(lora.validate(_base_shapes(bases["qwen"]), None, str(bases["qwen"])))
    if _saved_keys_sorted(lora.config):
        assert "several alpha_pattern keys with different values match 1 modules" in text
        shown = ", ".join(f"{k!r}: {alphas[k]}" for k in saved)
        assert f"model.layers.1.self_attn.q_proj ({shown})" in text and "peft before 0.22 saved the keys" in text
    else:
        assert "alpha_pattern" not in text
    for version, said in (("0.21.2", True), ("0.22.0", False), (None, True)):  # an unknown writer may have sorted
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**lora.config, "peft_version": version}))
        warned = LoraDelta.from_pretrained(tmp_path / "ad").validate(_base_shapes(bases["qwen"]), None, "base")
        assert any("several alpha_pattern keys" in w for w in warned) == said, version
    plain = make_adapter(bases["qwen"], tmp_path / "plain", LoraConfig(r=4, target_modules=["q_proj"],
                                                                      alpha_pattern={"q_proj": 32, "x_proj": 2}))
    assert plain and not [w for w in LoraDelta.from_pretrained(tmp_path / "plain").validate(
        _base_shapes(bases["qwen"]), None, str(bases["qwen"])) if "alpha_pattern" in w]


def test_resolve_pattern_is_suffix_or_full_regex_match():
    assert resolve_pattern({"q_proj": 2}, "model.layers.0.self_attn.q_proj") == 2
    assert resolve_pattern({"proj": 2}, "model.layers.0.self_attn.q_proj") is None  # not a dotted suffix
    assert resolve_pattern({"self_attn": 2}, "model.layers.0.self_attn.q_proj") is None  # must reach the end
    assert resolve_pattern({r"layers\.\d\.mlp\..*": 3}, "model.layers.1.mlp.up_proj") == 3
    assert resolve_pattern({}, "x") is None and resolve_pattern(None, "x") is None


def test_llama_matches_merge_and_unload(bases, tmp_path):
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    reference = make_adapter(bases["llama"], tmp_path / "ad", config)
    _assert_matches(LoraDelta.from_pretrained(tmp_path / "ad"), reference, bases["llama"])


def test_gpt2_conv1d_fan_in_fan_out(bases, tmp_path):
    # peft forces fan_in_fan_out=True on Conv1D (weights stored [in, out]) and records it in the config
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])
    reference = make_adapter(bases["gpt2"], tmp_path / "ad", config)
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    assert lora.config["fan_in_fan_out"] is True
    assert lora.delta("transformer.h.0.attn.c_attn.weight").shape == (32, 96)  # [in, out] like the base weight
    _assert_matches(lora, reference, bases["gpt2"])


def test_gpt2_conv1d_with_lm_head_is_read_per_module(bases, tmp_path):
    # peft rewrites the saved fan_in_fan_out at every module: Conv1D layers, then the nn.Linear lm_head, leave false
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*(attn\.c_attn|attn\.c_proj)|lm_head")
    reference = make_adapter(bases["gpt2"], tmp_path / "ad", config)
    conv = [k for k in reference if ".attn." in k]
    assert len(conv) == 4
    shapes = _base_shapes(bases["gpt2"])
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    assert lora.config["fan_in_fan_out"] is False
    conv1d = {k.removesuffix(".weight") for k in shapes if ".attn.c_" in k and k.endswith(".weight")}
    lora.validate(shapes, None, str(bases["gpt2"]), conv1d_modules=conv1d)
    for key in conv:
        torch.testing.assert_close(lora.delta(key), reference[key], rtol=1e-5, atol=1e-7)
    # without the module types, the non-square c_attn [32, 96] is read in the layout its base weight shows
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    warnings = lora.validate(shapes, None, str(bases["gpt2"]))
    # … and the square attn.c_proj, which the shapes cannot tell, is named with the way to read it right
    assert any("its square modules (transformer.h.0.attn.c_proj, transformer.h.1.attn.c_proj)" in w
               and "pass conv1d_modules=" in w for w in warnings)
    torch.testing.assert_close(lora.delta("transformer.h.0.attn.c_attn.weight"),
                               reference["transformer.h.0.attn.c_attn.weight"], rtol=1e-5, atol=1e-7)


def test_ignored_parts_are_warned(bases, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"],
                        modules_to_save=["norm"], bias="all")
    make_adapter(bases["qwen"], tmp_path / "ad", config, merge=False)
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    # saved copies (the norms of modules_to_save) are deltas too; the merger says that those outside its merged
    # modules are not merged. The frozen base layers peft saves beside an embedding or output-layer LoRA are not
    # trained copies: their delta (copy − base) would read as zero where peft's merge changes the weight
    assert lora.weight_keys()[:2] == ["model.layers.0.self_attn.q_proj.weight",
                                      "model.layers.1.self_attn.q_proj.weight"]
    assert "model.norm.weight" in lora.weight_keys()[2:]
    assert {"lm_head.weight", "model.embed_tokens.weight"}.isdisjoint(lora.weight_keys())
    assert lora.delta("model.embed_tokens.weight") is None
    text = "\n".join(lora.validate(_base_shapes(bases["qwen"]), None, str(bases["qwen"])))
    for expected in ("embeddings", "output layer"):
        assert expected in text


@pytest.mark.parametrize("extra", [{"modules_to_save": ["o_proj"], "bias": "all"}, {"bias": "lora_only"},
                                   {"lora_bias": True}], ids=["modules_to_save+bias_all", "lora_only", "lora_bias"])
def test_trained_copies_and_biases_match_merge_and_unload(bases, tmp_path, extra):
    targets = ["q_proj", "v_proj"] + ([] if extra.get("lora_bias") else ["down_proj"])  # peft: lora_bias needs a bias
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra)
    reference = make_adapter(bases["qwen"], tmp_path / "ad", config, train_all=True)
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    assert sorted(lora.weight_keys() + lora.bias_keys()) == sorted(reference)
    assert any(key.endswith(".bias") for key in reference)
    assert lora.validate(_base_shapes(bases["qwen"]), None, str(bases["qwen"])) == []
    with pytest.raises(AdapterError, match="use_base") if ("modules_to_save" in extra or "bias" in extra) else (
            warnings.catch_warnings()):
        for key in reference:
            lora.delta(key)
    lora.use_base(LazyCheckpoint(bases["qwen"]))
    for key, expected in reference.items():
        got = lora.delta(key)
        assert (got - expected).norm() / expected.norm() < 1e-6, key


def test_velora_adapter_merges_like_plain_lora(bases, tmp_path):
    from peft.tuners.lora.config import VeloraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], velora_config=VeloraConfig())
    reference = make_adapter(bases["qwen"], tmp_path / "velora", config)
    lora = LoraDelta.from_pretrained(tmp_path / "velora")  # its training-only buffers are not factors
    for key, expected in reference.items():
        assert (lora.delta(key) - expected).norm() / expected.norm() < 1e-6, key
    assert "lora_velora_embed" in "\n".join(lora.validate(_base_shapes(bases["qwen"]), None, str(bases["qwen"])))


def test_monteclora_adapter_merges_like_plain_lora(bases, tmp_path):
    from peft.tuners.lora.config import MontecloraConfig

    # peft's merge ignores MonteCLoRA's sampler and merges B @ A, as for plain LoRA
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], monteclora_config=MontecloraConfig())
    reference = make_adapter(bases["llama"], tmp_path / "monteclora", config)
    lora = LoraDelta.from_pretrained(tmp_path / "monteclora")
    assert sorted(lora.weight_keys()) == sorted(reference)
    for key, expected in reference.items():
        assert (lora.delta(key) - expected).norm() / expected.norm() < 1e-6, key


def test_target_parameters_on_linear_weights_merge_and_on_fused_experts_are_ignored(bases, tmp_path):
    from transformers import Qwen3MoeConfig

    dense = LoraConfig(r=4, lora_alpha=8, target_modules=[],
                       target_parameters=["self_attn.q_proj.weight", "mlp.down_proj.weight"])
    reference = make_adapter(bases["llama"], tmp_path / "dense", dense)
    _assert_matches(LoraDelta.from_pretrained(tmp_path / "dense"), reference, bases["llama"])
    # peft resolves rank/alpha patterns on a targeted parameter's name ("...q_proj.weight"), not its module's
    for n, patterns in enumerate([dict(alpha_pattern={"q_proj.weight": 2}, rank_pattern={"down_proj.weight": 2}),
                                  dict(alpha_pattern={"q_proj": 2})]):  # matches no parameter: peft ignores it
        config = LoraConfig(r=4, lora_alpha=8, target_modules=[], **patterns,
                            target_parameters=["self_attn.q_proj.weight", "mlp.down_proj.weight"])
        reference = make_adapter(bases["llama"], tmp_path / f"patterns{n}", config)
        _assert_matches(LoraDelta.from_pretrained(tmp_path / f"patterns{n}"), reference, bases["llama"])

    moe = _save_random(AutoModelForCausalLM.from_config, Qwen3MoeConfig(
        **TINY, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=8), tmp_path / "moe")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    make_adapter(moe, tmp_path / "experts", config, merge=False)
    # bare parameter names match by suffix in peft: the experts are told apart by their stacked factors
    bare = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      target_parameters=["gate_up_proj", "down_proj"])
    make_adapter(moe, tmp_path / "bare", bare, merge=False)
    assert all(".self_attn." in key for key in LoraDelta.from_pretrained(tmp_path / "bare").weight_keys())
    before = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).state_dict()  # experts fused in memory
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32),
                                       tmp_path / "experts").merge_and_unload().state_dict()
    reference = {key: merged[key] - before[key] for key in before if not torch.equal(merged[key], before[key])}
    lora = LoraDelta.from_pretrained(tmp_path / "experts")
    attention = {key: delta for key, delta in reference.items() if ".self_attn." in key}
    assert len(attention) == 4 and len(reference) > 4  # peft also changed the experts
    assert sorted(lora.weight_keys()) == sorted(attention)
    for key, expected in attention.items():
        assert (lora.delta(key) - expected).norm() / expected.norm() < 1e-6, key
    warned = "\n".join(lora.validate(_base_shapes(moe), None, str(moe)))
    assert "LoRA on parameters that are not linear-layer weights (target_parameters ['mlp.experts.down_proj', " in warned
    assert "model.layers.0.mlp.experts, model.layers.1.mlp.experts) is ignored" in warned


def test_lora_bias_on_a_layer_without_bias_is_not_counted_as_merged(bases, tmp_path):
    # Qwen2's o_proj has no bias: peft's merge_and_unload refuses such an adapter
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_bias=True)
    make_adapter(bases["qwen"], tmp_path / "ad", config, merge=False, train_all=True)
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    warned = "\n".join(lora.validate(_base_shapes(bases["qwen"]), None, str(bases["qwen"])))
    assert "lora_bias" in warned and "model.layers.0.self_attn.o_proj.bias" in warned and "ignored" in warned
    assert lora.bias_keys() == ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.bias"]


def test_ungathered_zero3_factors_are_named(plain_adapter):
    file = plain_adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    for which in "AB":
        tensors[f"base_model.model.model.layers.0.mlp.down_proj.lora_{which}.weight"] = torch.zeros(0)
    save_file(tensors, str(file))
    with pytest.raises(AdapterError, match=r"down_proj has LoRA factors of shapes \[0\] and \[0\].*ZeRO-3"):
        LoraDelta.from_pretrained(plain_adapter)


@pytest.fixture
def plain_adapter(bases, tmp_path) -> Path:
    make_adapter(bases["qwen"], tmp_path / "plain", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                 merge=False)
    return tmp_path / "plain"


def _edit_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def test_dora_is_refused(bases, tmp_path):
    make_adapter(bases["qwen"], tmp_path / "dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
                 merge=False)
    assert is_lora_adapter(tmp_path / "dora")
    with pytest.raises(AdapterError, match=r"DoRA.*depends on the base weight.*merge_and_unload"):
        LoraDelta.from_pretrained(tmp_path / "dora")


def test_other_peft_type_is_refused(bases, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bases["qwen"])
    ia3 = get_peft_model(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    assert not is_lora_adapter(tmp_path / "ia3")
    with pytest.raises(AdapterError, match=r"is a IA3 adapter; only LoRA"):
        LoraDelta.from_pretrained(tmp_path / "ia3")


@pytest.mark.parametrize("field,value,match", [
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication=.*belongs to a model whose layers are duplicated.*"
                                            "cannot be merged"),
    ("use_qalora", True, "QALoRA"),
    ("alora_invocation_tokens", [1, 2], "aLoRA"),
    ("init_lora_weights", "pissa_niter_4", "path_initial_model_for_weight_conversion"),
    ("init_lora_weights", "astra", "path_initial_model_for_weight_conversion"),  # subtracts its init from the base
    ("init_lora_weights", "loftq", "rewrites the base weights before training, so B·A is not its change to the "
                                   "original base. Merge it into its base model"),  # peft cannot convert LoftQ
])
def test_unsupported_features_are_refused(plain_adapter, field, value, match):
    _edit_config(plain_adapter, **{field: value})
    with pytest.raises(AdapterError, match=match) as info:
        LoraDelta.from_pretrained(plain_adapter)
    assert str(plain_adapter) in str(info.value)


def test_shape_mismatch_names_module_and_shapes(bases, tmp_path):
    make_adapter(bases["qwen_wide"], tmp_path / "wide", LoraConfig(r=4, target_modules=["q_proj", "k_proj"]),
                 merge=False)
    lora = LoraDelta.from_pretrained(tmp_path / "wide")
    with pytest.raises(AdapterError) as info:
        lora.validate(_base_shapes(bases["qwen"]), None, str(bases["qwen"]))
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "[48, 48]" in message and "[32, 32]" in message


def test_module_missing_from_base_is_refused(bases, tmp_path):
    make_adapter(bases["gpt2"], tmp_path / "gpt2", LoraConfig(r=4, target_modules=["c_attn"]), merge=False)
    lora = LoraDelta.from_pretrained(tmp_path / "gpt2")
    with pytest.raises(AdapterError, match=r"transformer\.h\.0\.attn\.c_attn\.weight.*another architecture"):
        lora.validate(_base_shapes(bases["qwen"]), None, str(bases["qwen"]))


def test_base_model_mismatch(bases, plain_adapter):
    shapes = _base_shapes(bases["qwen"])
    # recorded local folder that exists and is another model
    _edit_config(plain_adapter, base_model_name_or_path=str(bases["llama"]))
    (warning,) = LoraDelta.from_pretrained(plain_adapter).validate(shapes, None, str(bases["qwen"]))
    assert re.search(r"records base model '.*llama', but the base is .*qwen\. Tensor shapes agree, so the merge "
                     r"goes on; .*pass the adapter's base model", warning)
    # recorded Hub id against a known Hub id: case-insensitive
    _edit_config(plain_adapter, base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    lora = LoraDelta.from_pretrained(plain_adapter)
    assert lora.validate(shapes, "qwen/qwen2.5-0.5b", str(bases["qwen"])) == []
    assert "records base model 'Qwen/Qwen2.5-0.5B', but the base is Qwen/Qwen2.5-1.5B" in lora.validate(
        shapes, "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B")[0]
    # a folder of the Hub cache, here or on the training machine, stands for its repo
    _edit_config(plain_adapter, base_model_name_or_path="/home/u/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/"
                                                        "snapshots/" + "a" * 40)
    assert LoraDelta.from_pretrained(plain_adapter).validate(shapes, "Qwen/Qwen2.5-0.5B", str(bases["qwen"])) == []
    # a Hub id against a local folder of that name matches; an unknown one is only warned about
    assert lora.validate(shapes, None, "/models/Qwen2.5-0.5B") == []
    assert "cannot be compared" in lora.validate(shapes, None, str(bases["qwen"]))[0]


def test_same_base_model_rules(bases, tmp_path):
    qwen = str(bases["qwen"])
    assert same_base_model(qwen, None, qwen) is True
    assert same_base_model(qwen + "/", None, str(bases["qwen"] / ".." / "qwen")) is True
    assert same_base_model("/elsewhere/qwen", None, qwen) is True  # same folder name
    assert same_base_model("/elsewhere/other", None, qwen) is None  # not on this machine: undecidable
    assert same_base_model(str(bases["llama"]), None, qwen) is False
    assert same_base_model("/train/Qwen2.5-7B", "Qwen/Qwen2.5-7B", qwen) is True
    assert same_base_model("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", "x") is False
    assert same_base_model(r"C:\models\qwen", None, qwen) is True  # recorded on Windows: same folder name
    assert same_base_model(r"C:\models\other", None, qwen) is None
    # two folders on this machine with one generic name: their weights decide
    other, copy = tmp_path / "run2" / "qwen", tmp_path / "copy" / "qwen"
    _save_random(Qwen2ForCausalLM, Qwen2Config(**TINY), other, seed=7)
    shutil.copytree(bases["qwen"], copy)
    assert same_base_model(str(other), None, qwen) is False
    assert same_base_model(str(copy), None, qwen) is True


def test_a_different_base_revision_is_warned(bases, plain_adapter):
    shapes = _base_shapes(bases["qwen"])
    _edit_config(plain_adapter, base_model_name_or_path="org/tiny-base", revision="1" * 40)
    lora = LoraDelta.from_pretrained(plain_adapter)
    assert any(f"records base revision '{'1' * 40}', but the base is at '{'2' * 40}'" in w
               for w in lora.validate(shapes, "org/tiny-base", str(bases["qwen"]), "2" * 40))
    assert lora.validate(shapes, "org/tiny-base", str(bases["qwen"]), "1" * 7) == []  # an abbreviated hash
    assert lora.validate(shapes, "org/tiny-base", str(bases["qwen"]), "main") == []  # a branch: not comparable
    # a recorded Hub-cache snapshot carries its commit
    _edit_config(plain_adapter, revision=None,
                 base_model_name_or_path="/c/hub/models--org--tiny-base/snapshots/" + "1" * 40)
    assert any("records base revision" in w for w in LoraDelta.from_pretrained(plain_adapter).validate(
        shapes, "org/tiny-base", str(bases["qwen"]), "2" * 40))


def test_an_adapter_of_the_bare_decoder_is_named(bases, plain_adapter):
    file = plain_adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in tensors.items()}, str(file))
    with pytest.raises(AdapterError, match=r"without the 'model.' prefix .*trained on the bare decoder \(AutoModel\)"):
        LoraDelta.from_pretrained(plain_adapter).validate(_base_shapes(bases["qwen"]), None, str(bases["qwen"]))


def test_bin_only_adapter_is_refused(bases, tmp_path):
    make_adapter(bases["qwen"], tmp_path / "bin", LoraConfig(r=4, target_modules=["q_proj"]), merge=False,
                 safe_serialization=False)
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterError, match=r"adapter_model\.bin.*Convert it to safetensors"):
        LoraDelta.from_pretrained(tmp_path / "bin")
    # a Trainer checkpoint's state files are no adapter pickle to convert: the weights are missing
    (tmp_path / "bin" / "adapter_model.bin").unlink()
    for state in ("optimizer.pt", "rng_state.pth"):
        torch.save({}, tmp_path / "bin" / state)
    with pytest.raises(AdapterError, match=r"has no adapter_model\.safetensors in .*Otherwise download the adapter"):
        LoraDelta.from_pretrained(tmp_path / "bin")


def test_missing_lora_b_is_refused(plain_adapter):
    file = plain_adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, str(file))
    with pytest.raises(AdapterError, match=r"incomplete: model\.layers\.1\.mlp\.up_proj \(has lora_A, lacks lora_B\)"):
        LoraDelta.from_pretrained(plain_adapter)


def test_rank_disagreeing_with_config_is_refused(plain_adapter):
    _edit_config(plain_adapter, rank_pattern={"o_proj": 8})
    with pytest.raises(AdapterError, match=r"o_proj has rank 4 tensors but .* r=8"):
        LoraDelta.from_pretrained(plain_adapter)


def test_clashing_rank_pattern_keys_name_the_fix(plain_adapter):
    _edit_config(plain_adapter, rank_pattern={"layers.1.*": 2, ".*proj": 4})
    with pytest.raises(AdapterError, match=r"layers\.1\..* has rank 4 tensors but .* r=2, .*Several rank_pattern keys "
                                           r"match it \('layers\.1\.\*': 2, '\.\*proj': 4\) and the first wins"):
        LoraDelta.from_pretrained(plain_adapter)


def test_invalid_json_names_the_file(plain_adapter):
    (plain_adapter / "adapter_config.json").write_text("{not json")
    assert not is_lora_adapter(plain_adapter)
    with pytest.raises(AdapterError, match=r"adapter_config\.json is not valid JSON"):
        LoraDelta.from_pretrained(plain_adapter)


def test_not_an_adapter(bases, tmp_path):
    assert not is_lora_adapter(bases["qwen"]) and not is_lora_adapter(tmp_path / "nowhere")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        LoraDelta.from_pretrained(bases["qwen"])
    with pytest.raises(CheckpointError, match="neither an existing local folder"):
        LoraDelta.from_pretrained(tmp_path / "nowhere" / "deeper")
    # an adapter saved under another name than "default" lands in a subfolder of that name
    model = AutoModelForCausalLM.from_pretrained(bases["qwen"])
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="instr").save_pretrained(
        tmp_path / "named")
    with pytest.raises(AdapterError, match=r"Its subfolder 'instr' holds a peft adapter .*: pass that folder, "
                                           + re.escape(str(tmp_path / "named" / "instr"))):
        LoraDelta.from_pretrained(tmp_path / "named")
    assert LoraDelta.from_pretrained(tmp_path / "named" / "instr").weight_keys()
    shutil.copytree(tmp_path / "named" / "instr", tmp_path / "named" / "other")
    with pytest.raises(AdapterError, match=r"subfolders 'instr', 'other' hold peft adapters .*: pass one of them, e\.g\. .*instr\.$"):
        LoraDelta.from_pretrained(tmp_path / "named")
    with pytest.raises(CheckpointError, match=r"The reasoning model .*no config\.json in [^ ]*named\.$"):
        RainMerger.plan(bases["qwen"], tmp_path / "named", tmp_path / "named" / "instr", RainMergingConfig(lam=1.0))
    with pytest.raises(CheckpointError, match=r"no config\.json in .*Its subfolders 'instr', 'other' hold peft "
                                              r"adapters .*: pass one of them"):
        RainMerger.plan(bases["qwen"], shutil.copytree(bases["qwen"], tmp_path / "reasoning"), tmp_path / "named",
                        RainMergingConfig(lam=1.0))


def test_tensors_are_read_lazily(plain_adapter):
    lora = LoraDelta.from_pretrained(plain_adapter)
    assert isinstance(lora._tensors, LazyCheckpoint)
    assert lora.shape("model.layers.0.mlp.down_proj.weight") == (32, 64)


def test_an_adapter_given_as_another_model_than_the_instruct_one_is_named(bases, plain_adapter):
    from rain_hf import RainMerger
    from rain_hf.merger import ModelNameError

    with pytest.raises(ModelNameError, match=r"The reasoning model .* has no config\.json .* It is a peft adapter "
                                             r"\(adapter_config\.json\), and only instruct_model may be one"):
        RainMerger.plan(bases["qwen"], plain_adapter, bases["qwen_wide"])
    # an adapter folder that lost its adapter_config.json: not a model without config.json
    (plain_adapter / "adapter_config.json").unlink()
    with pytest.raises(ModelNameError, match=r"The instruct model .* has no config\.json .* It holds peft adapter "
                                             r"weights without their adapter_config\.json: restore that file"):
        RainMerger.plan(bases["qwen"], bases["qwen_wide"], plain_adapter)


def test_a_config_without_alpha_or_rslora_keys_takes_peft_defaults(plain_adapter):
    # r=4, lora_alpha=8 (peft's default): an older or hand-written config may leave both keys out
    key = "model.layers.0.self_attn.q_proj.weight"
    full = LoraDelta.from_pretrained(plain_adapter).delta(key)
    config = json.loads((plain_adapter / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8 and config["use_rslora"] is False
    del config["lora_alpha"], config["use_rslora"]
    (plain_adapter / "adapter_config.json").write_text(json.dumps(config))
    assert torch.equal(LoraDelta.from_pretrained(plain_adapter).delta(key), full)  # scaling 8 / 4, not 8 / √4


def test_a_float64_adapter_gives_a_float64_delta(bases, tmp_path):
    """Factors, trained copies and the base they are subtracted from stay float64, as full float64 checkpoints do:
    a small copy − base delta cut to float32 first would lose its low bits."""
    base = tmp_path / "base64"
    AutoModelForCausalLM.from_pretrained(bases["qwen"], dtype=torch.float64).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                      modules_to_save=["down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
            elif "modules_to_save" in name:
                param.add_(1e-6 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(tmp_path / "ad")
    base_sd = load_file(str(base / "model.safetensors"))
    merged = peft_model.merge_and_unload().state_dict()
    lora = LoraDelta.from_pretrained(tmp_path / "ad")
    lora.use_base(LazyCheckpoint(base))
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        expected = merged[key] - base_sd[key]
        got = lora.delta(key)
        assert got.dtype == torch.float64, key
        assert (got - expected).norm() / expected.norm() < 1e-12, key


def test_factors_of_different_dtypes_give_one_delta(plain_adapter):
    """peft saves each factor in its own dtype; a float64 lora_A beside a bfloat16 lora_B is multiplied in one
    dtype (float64 here), not refused by torch's matmul."""
    folder = plain_adapter
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    mixed = {k: v.double() if "lora_A" in k else v.bfloat16() for k, v in tensors.items()}
    save_file(mixed, str(folder.parent / "mixed.safetensors"))
    (folder.parent / "mixed").mkdir()
    (folder.parent / "mixed" / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    (folder.parent / "mixed.safetensors").rename(folder.parent / "mixed" / "adapter_model.safetensors")
    lora = LoraDelta.from_pretrained(folder.parent / "mixed")
    for key in lora.weight_keys():
        assert lora.delta(key).dtype == torch.float64, key
