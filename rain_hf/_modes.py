"""Mode helpers shared by the passes that read or generate with a model (calibration, features, evaluation)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# generation_config settings a generation here never takes from the model: one sequence per prompt, as tensors
ONE_SEQUENCE = {"num_beams": 1, "num_return_sequences": 1, "return_dict_in_generate": False}
# and those that would make greedy decoding other than the argmax (Qwen2.5-Instruct ships repetition_penalty 1.05;
# Whisper-style configs suppress tokens), at their neutral values, so that two models are decoded alike
PLAIN_GREEDY = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": None, "min_new_tokens": 0,
                "bad_words_ids": None,
                "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
                "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
                "watermarking_config": None}


def end_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence / end-of-turn ids: the generation config's eos ids, then the tokenizer's eos, once each.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> end_ids(NS(eos_token_id=[7, 2]), NS(eos_token_id=2))
        [7, 2]
    """
    ids: list[int] = []
    for eos in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if eos is not None:
            ids += [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
    return list(dict.fromkeys(ids))


def model_device(model: Any) -> torch.device:
    """Where a model's inputs go: its ``device`` (a transformers model's first parameter's), else its first
    parameter's, else the CPU (a stand-in without parameters)."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@contextlib.contextmanager
def seeded(seed: int, device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Seed torch for the block (CPU and the model's accelerator) without changing the caller's RNG state;
    ``enabled=False`` (greedy decoding, which draws nothing) leaves it alone.

    Example:
        >>> state = torch.get_rng_state()
        >>> with seeded(0, torch.device("cpu")):
        ...     a = torch.rand(1)
        >>> with seeded(0, torch.device("cpu")):
        ...     b = torch.rand(1)
        >>> bool(torch.equal(a, b)), bool(torch.equal(torch.get_rng_state(), state))
        (True, True)
    """
    if not enabled:
        yield
        return
    devices = [] if device.type == "cpu" else [device.index or 0]
    with torch.random.fork_rng(devices=devices, device_type=None if device.type == "cpu" else device.type):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put models in eval mode (no dropout) for the block, then restore each module's own training flag.

    Example:
        >>> layer = torch.nn.Dropout(0.5)
        >>> with eval_mode(layer):
        ...     layer.training
        False
        >>> layer.training
        True
    """
    flags = [{m: m.training for m in model.modules()} for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for saved in flags:
            for module, flag in saved.items():
                module.training = flag
