"""Small random checkpoints and calibration records, built on the fly (nothing is downloaded).

Used by the test suite, the memory benchmark and anyone who wants to try a merge without real checkpoints.

Example:
    >>> import tempfile, pathlib
    >>> from rain_hf.testing import build_triple
    >>> folder = tempfile.TemporaryDirectory()
    >>> paths = build_triple(pathlib.Path(folder.name), "qwen2")
    >>> sorted(paths)
    ['base', 'instruct', 'reasoning']
    >>> folder.cleanup()
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ("alpha beta gamma delta apples pears sells eats answer write words lowercase capital quote "
         "title comma end think step first then so the is are of and max has now how many").split()


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with chat and think special tokens (every character is representable)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + f" {rng.randint(0, 99)}." for _ in range(300)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(arch: str, vocab_size: int, **overrides):
    """Random-model configs: Qwen2 (biases, GQA, tied embeddings), Llama (GQA), Qwen3 (explicit head_dim), Phi-3
    (fused qkv_proj and gate_up_proj, partial rotary), Gemma 3n text (a module that runs twice per layer: the
    AltUp router; sliding and full attention layers)."""
    from transformers import Gemma3nTextConfig, LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, eos_token_id=3)
    extra = {"qwen2": {"tie_word_embeddings": True}, "llama": {"tie_word_embeddings": False},
             "qwen3": {"head_dim": 32, "tie_word_embeddings": False},
             "phi3": {"tie_word_embeddings": False, "partial_rotary_factor": 0.75, "bos_token_id": 1},
             "gemma3n": {"vocab_size_per_layer_input": vocab_size, "hidden_size_per_layer_input": 8, "head_dim": 16,
                         "num_kv_shared_layers": 0, "sliding_window": 6, "laurel_rank": 8,
                         "activation_sparsity_pattern": [0.0] * 2, "bos_token_id": 1,
                         "layer_types": ["sliding_attention", "full_attention"]}}
    if arch not in extra:
        raise ValueError(f"unknown arch {arch!r}: use qwen2, llama, qwen3, phi3 or gemma3n")
    common.update(extra[arch])
    common.update(overrides)
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config, "phi3": Phi3Config,
                    "gemma3n": Gemma3nTextConfig}[arch]
    return config_class(**common)


def save_model(model, tokenizer, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` (cast to ``dtype`` first, when given) and ``tokenizer`` into ``folder``; return ``folder``."""
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_triple(root: Path, arch: str = "qwen2", noise: float = 0.02, seed: int = 0, tokenizer=None,
                 dtype: torch.dtype | None = None, **overrides) -> dict[str, Path]:
    """Save base / reasoning / instruct checkpoints (reasoning and instruct = base + small random deltas).

    ``overrides`` change the config (e.g. hidden_size); a ``vocab_size`` below the tokenizer's size is raised to
    it. ``dtype`` is the stored dtype (default float32). The weights depend on ``seed`` only; the caller's torch
    random state is left as it was.
    """
    tokenizer = tokenizer or build_tokenizer()
    cfg = model_config(arch, max(len(tokenizer), overrides.pop("vocab_size", 0)), **overrides)
    with torch.random.fork_rng(devices=[]):  # from_config initialises with the global generator
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(cfg)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        paths = {"base": save_model(base, tokenizer, root / "base", dtype)}
        del base
        for i, role in enumerate(("reasoning", "instruct")):
            model = AutoModelForCausalLM.from_config(cfg)
            model.load_state_dict(state)
            g = torch.Generator().manual_seed(seed + 100 + i)
            with torch.no_grad():
                for p in model.parameters():
                    # biases start at 0 and norms at 1 (std 0): they get absolute noise, so they change too
                    scale = float(p.std()) if p.numel() > 1 else 0.0
                    p.add_(noise * torch.randn(p.shape, generator=g) * (scale if scale > 0 else 1.0))
            paths[role] = save_model(model, tokenizer, root / role, dtype)
            del model
    return paths


def reasoning_records(n: int = 6, seed: int = 0) -> list[dict]:
    """``n`` reasoning calibration records in the paper's format (``prompt``, ``reasoning``, ``response``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(20, 45), rng.randint(2, 9)
        out.append({"prompt": f"Max has {a} apples. He eats {b}. How many apples does Max have now?",
                    "reasoning": f"{a} - {b} = {a - b}. so the answer is {a - b}.",
                    "response": f"Max has {a - b} apples now. So, the answer is {a - b}."})
    return out


def instruction_records(n: int = 6, seed: int = 1) -> list[dict]:
    """``n`` instruction calibration records in the paper's format (``prompt``, ``reason``, ``response``, and the
    instruction's text in ``instruction_spans``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(20, 45), rng.randint(2, 9)
        instr = "Write the answer in lowercase."
        out.append({"prompt": f"Max has {a} pears. He sells {b}. How many pears now? {instr}",
                    "reason": f"{a} - {b} = {a - b}.",
                    "response": f"max has {a - b} pears now. so, the answer is {a - b}.",
                    "instruction_spans": [instr]})
    return out
