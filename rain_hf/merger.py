"""`RainMerger`: load three checkpoints, run RAIN-Merging (or a baseline) and save the result.

The merger only orders the steps; the math lives in :mod:`rain_hf.projection`, :mod:`rain_hf.coefficients` and
:mod:`rain_hf.methods`, the forward passes in :mod:`rain_hf.features`, the data handling in
:mod:`rain_hf.calibration`, the file handling in :mod:`rain_hf.checkpoints` and :mod:`rain_hf.writer`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import errno
import hashlib
import inspect
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo
from tqdm.auto import tqdm

from . import __version__
from .calibration import (
    CalibrationSample,
    check_think_tokens,
    lam_auto_holdout,
    padding_id,
    prepare_instruction_calibration,
    prepare_reasoning_calibration,
    template_opens_think,
    template_think_tail,
)
from .calibration import (
    collect_warnings as collect_calibration_warnings,
)
from .card import PRECOMPUTED_FEATURES_SOURCE, write_model_card
from .checkpoints import (
    ADAPTER_PATTERNS,
    LICENSE_NAMES,
    CheckpointError,
    LazyCheckpoint,
    ModelNameError,
    ModelSource,
    TensorSource,
    checkpoint_fingerprint,
    is_adapter_folder,
    legacy_fingerprint,
    read_json,
    resolve_model,
    work_dtype,
)
from .coefficients import coefficient_warning, head_coefficients, weight_scale
from .config import _FIELD_NAMES, CONFIG_NAME, ConfigError, RainMergingConfig, parse_size
from .features import (
    AttentionGeometry,
    LayerReplay,
    NonFiniteFeaturesError,
    TargetModule,
    ThinkFeatures,
    attention_geometry,
    capture_think_features,
    collect_attention_stats,
    find_decoder_layers,
    find_target_modules,
    layers_without_attention,
    local_attention,
    merged_routers,
    text_config,
    unmergeable_weights,
)
from .projection import (
    feature_residual,
    project_ridge,
    project_svd,
    protected_basis,
    removed_fraction,
    without_bias_column,
)
from .writer import ShardedSafetensorsWriter, TensorSpec, atomic_directory

logger = logging.getLogger(__name__)
#: calibration data as merge() and compute_features() take it: a JSON/JSONL file, or records (a list of dicts, a
#: datasets.Dataset, which iterates over dicts)
CalibrationData = str | os.PathLike | Iterable[Mapping[str, Any]]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ROLES = ("base", "reasoning", "instruct")


#: reasoning calibration samples the think_spacing check runs the reasoning model on (one forward pass each)
SPACING_PROBE_SAMPLES = 8

_NO_L_THINK_POSITION = (
    "lam='auto' has no thinking position to measure L_think at: with {setting} "
    "every one predicts the answer's first token (the think-close token's own, when nothing is written between "
    "them) or a token the chat template supplies (it writes the think-open token and what follows it). Use "
    "positions='think+prev', or 'window' with window ≥ 1 (the default is 'window-before-answer', 3), or a numeric "
    "lam.")


def _position_setting(config: RainMergingConfig) -> str:
    """``positions=…`` as an error names it (with the window where the position set has one)."""
    if config.positions.startswith("window"):
        return f"positions={config.positions!r} and window={config.window}"
    return f"positions={config.positions!r}"


#: Config fields the plan is built on (which modules, which think tokens): fixed for a merger's lifetime.
_PLAN_FIELDS = ("target_modules", "layers", "think_open", "think_close", "project_bias")
# from_pretrained options of transformers that RainMerger.from_pretrained has no counterpart for
_TRANSFORMERS_LOAD_OPTIONS = frozenset({
    "attn_implementation", "low_cpu_mem_usage", "subfolder", "variant", "offload_folder", "offload_state_dict",
    "offload_buffers", "force_download", "proxies", "output_loading_info", "gguf_file", "use_safetensors",
    "weights_only", "quantization_config", "key_mapping", "tp_plan", "tp_size", "device_mesh", "kernel_config",
    "code_revision", "ignore_mismatched_sizes", "generation_config", "adapter_name", "adapter_kwargs", "from_tf",
    "from_flax", "mirror"})
# what to pass instead of keyword arguments of transformers' namesakes that RainMerger's methods do not take
_SAFETENSORS_ONLY = "the weights are always written as safetensors"
_LOAD_HABITS = {"cache_dir": "set HF_HUB_CACHE or HF_HOME", "local_files_only": "set HF_HUB_OFFLINE=1",
                "use_auth_token": "use token=", "max_memory": "pass a device_map dict, e.g. accelerate's "
                "infer_auto_device_map(model, max_memory=...) of the reasoning model"}
_SAVE_HABITS = {"push_to_hub": "push with merger.push_to_hub(repo_id) instead",
                "safe_serialization": _SAFETENSORS_ONLY, "safe_serialisation": _SAFETENSORS_ONLY}
_PUSH_HABITS = {"safe_serialization": _SAFETENSORS_ONLY, "exist_ok": "an existing repository is pushed to as it is",
                "use_temp_dir": "without save_directory the save goes to a temporary folder",
                "repo_url": "pass the repository id as repo_id"}


def _habit_hints(unknown: Mapping[str, Any], habits: Mapping[str, str]) -> str:
    """' (name: what to do instead)' for each unknown keyword argument that ``habits`` knows."""
    return "".join(f" ({k}: {habits[k]})" for k in sorted(unknown) if k in habits)


def _unexpected_arguments(method: str, unknown: Mapping[str, Any], hint: str = "") -> TypeError:
    """The refusal of keyword arguments that ``RainMerger.<method>`` does not take (``hint`` says what to do)."""
    return TypeError(f"RainMerger.{method}() got unexpected keyword arguments {sorted(unknown)}{hint}.")


# config fields that the save applies: the saved record takes them as they are then (not output_dtype: the merged
# weights were rounded to it at merge time, so the save keeps the merge's)
_SAVE_FIELDS = ("max_shard_size",)


def _as_list(value: Any) -> Any:
    """Tuples as lists: a config field set to an equal tuple is no edit (validate() makes it a list)."""
    return list(value) if isinstance(value, tuple) else value


class ModelMismatchError(CheckpointError):
    """The three models cannot be merged with each other."""


# ---------------------------------------------------------------------------------------------- task vectors
class FullDelta:
    """Δ = θ_I − θ_B read tensor by tensor from two checkpoints (float32, or float64 when either is stored so)."""

    kind = "full"

    def __init__(self, instruct: TensorSource, base: TensorSource) -> None:
        self.instruct = instruct
        self.base = base

    def delta(self, key: str, base: torch.Tensor | None = None) -> torch.Tensor | None:
        """Δ of ``key``; ``base`` is θ_B's tensor when the caller has read it already (it is not read again)."""
        if key not in self.instruct or key not in self.base:
            return None
        instruct = self.instruct.get(key)
        base = self.base.get(key) if base is None else base
        dtype = work_dtype(torch.promote_types(instruct.dtype, base.dtype))
        return instruct.to(dtype) - base.to(dtype)


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class MergePlan:
    """What a merge will do, established before any heavy work (see :meth:`RainMerger.plan`)."""

    config: RainMergingConfig
    sources: dict[str, ModelSource]
    instruct_kind: str
    model_type: str
    geometry: AttentionGeometry
    targets: list[TargetModule]
    vocab: dict[str, int]
    think_token_ids: tuple[int, int]
    warnings: list[str] = field(default_factory=list)
    #: what the checks that depend on editable settings (method, stage 2, density, slerp_t) read, so that merge()
    #: repeats them with the config as it is then: decoder layers without softmax attention, number of decoder
    #: layers, attention projections without a head map, merged modules an adapter holds no delta for
    attentionless_layers: list[int] = field(default_factory=list)
    num_decoder_layers: int = 0
    unmapped: list[str] = field(default_factory=list)
    idle: list[str] = field(default_factory=list)
    #: tokens the chat template writes after the think-open token that ends its generation prompt (None: it does
    #: not open the block, or there is no usable template), see calibration.template_think_tail
    think_tail: int | None = None
    #: the reasoning model's max_position_embeddings (None where its config has none): calibration samples longer
    #: than it are warned about
    context_length: int | None = None

    def config_warnings(self, config: RainMergingConfig) -> list[str]:
        """The plan's warnings that depend on editable settings, for ``config``; raise ConfigError where stage 2
        would score decoder layers that hold no softmax attention."""
        merged_layers = {t.layer for t in self.targets}
        bare = [i for i in self.attentionless_layers if i in merged_layers]
        stage2 = config.method == "rain" and config.stage2
        if bare and stage2:
            attention = [i for i in range(self.num_decoder_layers) if i not in self.attentionless_layers]
            raise ConfigError(f"Decoder layers {bare} hold no softmax attention module (linear attention, e.g. "
                              "Qwen3-Next's Gated DeltaNet), so stage 2 has no instruction attention to score "
                              f"there: set stage2=False, or config.layers to the attention layers {attention}.")
        narrow = config.positions == "think" or (config.positions.startswith("window") and config.window == 0)
        # the think tokens alone: <think> predicts the template's "\n", and </think> the answer's first token
        # unless the layout writes whitespace between them (then </think> predicts that, and L_think has it)
        spaced = bool(config.think_spacing[2])
        if config.method == "rain" and config.lam == "auto" and self.think_tail and narrow and not spaced:
            raise ConfigError(_NO_L_THINK_POSITION.format(setting=_position_setting(config)))
        warnings = []
        if self.unmapped and stage2:
            # e.g. multi-head latent attention (DeepSeek-V3), or a query projection that also carries a gate
            warnings.append(f"{len(self.unmapped)} attention projections could not be mapped to heads (e.g. "
                            f"{self.unmapped[0]}): stage 2 scales each of them by its layer's mean α, not per head")
        if self.idle:  # zero deltas: cost stage-1 work and read as "projected"; a baseline even changes them
            effect = zero_task_vector_effect(config)
            advice = ("(set target_modules to the adapter's modules to leave them out of the merge and its report)"
                      if effect == _KEPT else ": set target_modules to the adapter's modules to leave them out (they "
                      "then keep the reasoning model's weights)")
            warnings.append(f"the adapter holds no delta for {len(self.idle)} of the {len(self.targets)} merged "
                            f"modules (e.g. {self.idle[0]}); {effect}{' ' if effect == _KEPT else ''}{advice}")
        return warnings

    def summary(self) -> str:
        cfg = self.config
        mix = {"slerp": f"slerp_t={cfg.slerp_t}", "ties": f"lam={cfg.lam}, density={cfg.density}"}.get(
            cfg.method, f"lam={cfg.lam}")
        if cfg.method.startswith("dare"):
            mix += f", density={cfg.density}" + (f", seed={cfg.seed}" if cfg.density < 1 else "")
        lines = [f"rain_hf merge plan (method={cfg.method}, {mix})"]
        for role in _ROLES:
            src = self.sources[role]
            kind = f" [{self.instruct_kind}]" if role == "instruct" else ""
            rev = f" @ {src.revision}" if src.revision else ""
            lines.append(f"  {role:9s}: {src.describe()}{rev}{kind}")
        g = self.geometry
        lines.append(f"  architecture: {self.model_type}, {g.num_layers} layers, hidden {g.hidden_size}, "
                     f"{g.num_heads} heads / {g.num_kv_heads} kv heads, head_dim {g.head_dim}")
        layers = sorted({t.layer for t in self.targets})
        kinds = sorted({t.name.rsplit(".", 1)[-1] for t in self.targets})
        lines.append(f"  merged modules: {len(self.targets)} ({', '.join(kinds)}) in {len(layers)} "
                     f"layer{'s' if len(layers) != 1 else ''}")
        lines.append("  vocab sizes: " + ", ".join(f"{k} {v}" for k, v in self.vocab.items()))
        lines.append(f"  think tokens: {self.config.think_open!r}={self.think_token_ids[0]}, "
                     f"{self.config.think_close!r}={self.think_token_ids[1]}")
        if self.config.method == "rain":
            window = f", window={cfg.window}" if cfg.positions.startswith("window") else ""
            strength = f"ridge={cfg.ridge}" if cfg.projection == "ridge" else f"rcond={cfg.rcond}"
            lines.append(f"  stage 1: {'on' if cfg.stage1 else 'off'} (positions={cfg.positions}{window}, "
                         f"{cfg.projection}, {strength}); stage 2: {'on' if cfg.stage2 else 'off'} (rho={cfg.rho}, "
                         f"box=[{cfg.coef_min}, {cfg.coef_max}])")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


def _load_model_config(src: ModelSource, role: str):
    from transformers import AutoConfig

    if not (src.path / "config.json").is_file():
        from .lora import nested_adapters_hint

        hint = nested_adapters_hint(src.path) if role == "instruct" else ""  # only it may be an adapter
        if role == "instruct" and next(src.path.glob("adapter_model*"), None) is not None:
            hint = (" It holds peft adapter weights without their adapter_config.json: restore that file (it "
                    "comes with the adapter) or save the adapter again with save_pretrained.")
        if role != "instruct" and (src.path / "adapter_config.json").is_file():
            hint = (f" It is a peft adapter (adapter_config.json), and only instruct_model may be one: pass the full "
                    f"{role} model (an adapter merged into its base with merge_and_unload() and saved).")
        # a folder that is no model folder: the name is wrong, as for a path that does not exist
        raise ModelNameError(f"The {role} model {src.describe()} has no config.json in {src.path}.{hint}")
    try:
        config = AutoConfig.from_pretrained(str(src.path), trust_remote_code=False)  # never asks to run code
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
        if "trust_remote_code" in str(exc):  # its advice would run the repository's code, which rain_hf refuses
            raise CheckpointError(
                f"The {role} model {src.describe()} needs the Python code in its repository (its config.json has an "
                "auto_map and a model_type transformers does not know): rain_hf loads models with transformers' own "
                "classes only, so a model with custom code is not supported.") from None
        raise CheckpointError(f"The {role} model {src.describe()}: its config.json cannot be read ({exc}).") from exc
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else getattr(quantization, "quant_method", None))
        raise CheckpointError(f"The {role} model {src.describe()} is quantized (quant_method={method!r}): its "
                              "weights are stored with scales, so no task vector can be read from them. Pass the "
                              "unquantized checkpoint, or dequantize it first (load it with transformers and "
                              "save_pretrained in bfloat16).")
    return config


def _resolve_role(name: str | os.PathLike, revision: str | None, token: str | bool | None, role: str) -> ModelSource:
    """:func:`resolve_model` for one role; an instruct model on the Hub that is a peft adapter fetches the adapter's
    files only (its repository may also hold a full model or Trainer checkpoints)."""
    text = os.fspath(name)
    if role == "instruct" and not Path(text).expanduser().is_dir() and re.fullmatch(r"[\w.\-]+/[\w.\-]+", text):
        from huggingface_hub import hf_hub_download

        try:  # one small file (the cache answers offline); a full model has none
            hf_hub_download(text, "adapter_config.json", revision=revision, token=token)
            is_adapter = True
        except Exception:  # no such file, or the repository cannot be reached: the fetch below says what is wrong
            is_adapter = False
        if is_adapter:
            return resolve_model(name, revision, token, allow_patterns=ADAPTER_PATTERNS, role=role)
    return resolve_model(name, revision, token, role=role)


def _bias_changed(instruct: LazyCheckpoint, base: LazyCheckpoint, key: str) -> bool:
    """Whether a bias both checkpoints store differs between them (a missing one is reported elsewhere)."""
    if key not in instruct or key not in base or instruct.shape(key) != base.shape(key):
        return False
    return not torch.equal(instruct.get(key), base.get(key))


@contextlib.contextmanager
def _full_disk_named(folder: str | os.PathLike, nbytes: int) -> Iterator[None]:
    """Name the output folder and the size a save needs when the disk fills (a bare ENOSPC names neither); the
    half-written output is gone by then (atomic_directory)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(exc.errno, f"The disk (or quota) holding {folder} ran out of space while the merged model was "
                      f"written: its weights take {nbytes / 1e9:.2f} GB ({nbytes} bytes), written into a temporary "
                      "folder beside the output (an earlier output it replaces stays until the new one is "
                      "complete). Nothing was saved: free space there, or save to another disk.") from exc


def _check_fits_float16(name: str, tensor: torch.Tensor, merged_in_float16: bool) -> None:
    """Refuse a tensor that overflowed float16 (a cast or a merge gave ±inf), naming it and the fix."""
    if bool(torch.isfinite(tensor).all()):
        return
    # output_dtype takes effect at the merge (the merged weights in memory hold what is saved): merge again
    fix = "set output_dtype='bfloat16' (float16's size, float32's range) or 'float32' and merge again"
    if merged_in_float16:  # the merged weights in memory overflowed already
        fix = "load the models with torch_dtype='float32' (or 'bfloat16'), " + fix
    raise ConfigError(f"{name} does not fit in float16 (largest magnitude 65504): as float16 it holds infinite "
                      f"values: {fix}.")


def _dtype_problem(out: torch.dtype, loaded: torch.dtype) -> str | None:
    """Why weights merged in ``loaded`` cannot be saved as ``out`` without losing what the merge computed."""
    wider = out != loaded and torch.finfo(out).bits > torch.finfo(loaded).bits
    if not (wider or {out, loaded} == {torch.float16, torch.bfloat16}):
        return None
    name, short = str(out).replace("torch.", ""), str(loaded).replace("torch.", "")
    return (f"The merged weights are saved as {name} (the stored dtype, or output_dtype) but the reasoning model "
            f"is loaded as {short}, which cannot hold them exactly: load it with torch_dtype={name!r}, or set "
            f"RainMergingConfig(output_dtype={short!r}) to save in {short}.")


def check_device(device: str | torch.device | int | None) -> None:
    """Raise ConfigError for a device torch does not know, or a CUDA device where torch sees none."""
    if device is None:
        return
    if type(device).__name__ in ("bool", "bool_") or isinstance(device, numbers.Integral) and device < 0:
        shown = str(device) if isinstance(device, numbers.Integral) else repr(bool(device))  # numpy's too
        raise ConfigError(f"device={shown} is not a torch device: use cpu, cuda or cuda:N.")
    if isinstance(device, numbers.Integral):
        device = int(device)  # a numpy integer too
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is None or not accelerator.is_available():
            # torch reads a bare index as an accelerator's; with none here its own error names no fix
            raise ConfigError(f"device={device} means accelerator {device} (cuda:{device} on an NVIDIA GPU), but "
                              f"torch sees none here (torch {torch.__version__}): use device='cpu', or install a "
                              "CUDA build of torch.")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={str(device)!r} is not a torch device: use cpu, cuda or cuda:N.") from exc
    if parsed.type == "meta":
        raise ConfigError("device='meta' holds no weights, so nothing could be merged or saved: use cpu or cuda.")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={str(device)!r}, but torch sees no CUDA device here (torch "
                              f"{torch.__version__}): use device='cpu', or install a CUDA build of torch.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device={str(device)!r}, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}; CUDA_VISIBLE_DEVICES renumbers them).")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)  # torch.mps, torch.xpu …
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ConfigError(f"device={str(device)!r}, but this torch build ({torch.__version__}) has no usable "
                              f"{parsed.type} device: use cpu or cuda.")


def _saved_dtype(config: RainMergingConfig, stored: torch.dtype) -> torch.dtype:
    """The dtype a tensor stored as ``stored`` is saved in: ``config.output_dtype`` for floats, else as stored."""
    if config.output_dtype is None or not stored.is_floating_point:
        return stored
    return _DTYPES[config.output_dtype]


def load_dtype_problem(plan: MergePlan, reasoning: LazyCheckpoint,
                       loaded: torch.dtype) -> tuple[torch.dtype, str] | None:
    """(saved dtype, why) when merged weights loaded in ``loaded`` cannot be saved as they will be; None when fine.
    Read from the checkpoint's header, before any load."""
    for target in plan.targets:
        out = _saved_dtype(plan.config, reasoning.dtype(target.weight_key))
        problem = _dtype_problem(out, loaded)
        if problem:
            return out, problem
    return None


def auto_load_dtype(plan: MergePlan, reasoning: LazyCheckpoint) -> tuple[torch.dtype, str] | None:
    """(dtype, where from) that transformers' ``dtype="auto"`` loads the reasoning model in: its config.json's
    ``dtype`` (or ``torch_dtype``), else the dtype its floating-point weights are stored in; None when that cannot
    be told before the load (weights stored in several float dtypes)."""
    try:
        stored_config = json.loads((Path(plan.sources["reasoning"].path) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        stored_config = {}
    for key in ("dtype", "torch_dtype"):
        named = stored_config.get(key)
        if isinstance(named, str) and named in _DTYPES:
            return _DTYPES[named], f"its config.json's {key}"
    stored = {reasoning.dtype(k) for k in reasoning.keys()
              if reasoning.readable(k) and reasoning.dtype(k).is_floating_point}
    return (stored.pop(), "the dtype its weights are stored in") if len(stored) == 1 else None


def input_folder_in(target: str | os.PathLike, sources: Mapping[str, ModelSource | str | os.PathLike]
                    ) -> tuple[str, Path] | None:
    """(role, folder) of an input (a resolved source, or a folder path) that ``target`` is, or holds: writing the
    output there would replace it."""
    target = Path(target).expanduser().resolve()
    for role, source in sources.items():
        folder = Path(getattr(source, "path", source)).resolve()
        if folder == target or folder.is_relative_to(target):
            return role, folder
    return None


_NO_FINISHED_MERGE = ("Nothing to {what}: the model no longer holds a finished merge (compute_features() or reset() "
                      "put the reasoning model's weights back, or a later merge() did not finish): call merge() "
                      "again.")


def zero_task_vector_effect(config: RainMergingConfig) -> str:
    """What ``config``'s merge does to modules whose instruct task vector is zero."""
    if config.method == "slerp" and config.slerp_t > 0:
        return "slerp still moves them toward the base model"
    if config.method in ("ties", "dare_ties", "dare_linear") and config.density < 1:
        # trimming or dropping acts on the reasoning model's own task vector
        return f"{config.method} still merges them, with a zero instruct task vector, and changes them"
    return _KEPT


_KEPT = "they keep the reasoning model's weights"


class _ReadOnce:
    """A checkpoint whose tensors are read at most once each (the plan's weight checks sample the same few)."""

    def __init__(self, checkpoint: LazyCheckpoint) -> None:
        self._checkpoint, self._read = checkpoint, {}

    def shape(self, key: str) -> tuple[int, ...]:
        return self._checkpoint.shape(key)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._read:
            self._read[key] = self._checkpoint.get(key)
        return self._read[key]


def _sampled_keys(targets: Sequence[TargetModule], checkpoints: Mapping[str, LazyCheckpoint | _ReadOnce],
                  samples: int = 3) -> list[str]:
    """``samples`` of the smallest merged weights, from layers apart: cheap to read, and spread over the model."""
    sizes = {t.weight_key: math.prod(checkpoints["base"].shape(t.weight_key)) for t in targets}
    smallest = min(sizes.values())
    keys = [key for key, size in sizes.items() if size == smallest]
    return list(dict.fromkeys(keys[i * (len(keys) - 1) // max(samples - 1, 1)] for i in range(samples)))


#: ‖θ − θ_B‖ / ‖θ_B‖ above which a model is not taken for a fine-tune of base_model: fine-tunes move weights by
#: percents (the organism's 2–4 %), two unrelated models of one shape are ≈ √2 apart
_FINETUNE_DISTANCE = 0.5


def _distance_warnings(targets: Sequence[TargetModule],
                       checkpoints: Mapping[str, LazyCheckpoint | _ReadOnce | None],
                       roles: Sequence[str]) -> list[str]:
    """Warnings for models that are too far from ``base_model`` on sampled weights to be fine-tunes of it (a
    Qwen2 base given for a Qwen2.5 instruct model): their task vector would be mostly another model's weights."""
    if not targets:
        return []
    keys = _sampled_keys(targets, checkpoints)
    warnings = []
    for role in roles:
        ratios = []
        for key in keys:
            base = checkpoints["base"].get(key).double()
            norm = float(base.norm())
            if norm > 0:
                ratios.append(float((checkpoints[role].get(key).double() - base).norm()) / norm)
        ratios = [r for r in ratios if math.isfinite(r)]
        if ratios and min(ratios) > _FINETUNE_DISTANCE:
            warnings.append(
                f"{role}_model differs from base_model by {min(ratios):.0%}–{max(ratios):.0%} of the base's norm on "
                f"{len(ratios)} sampled weights ({keys[0]} …), where a fine-tune moves weights by a few percent: is "
                f"base_model the model {role}_model was fine-tuned from? Its task vector would be mostly the "
                "difference between two unrelated models.")
    return warnings


def _order_warning(targets: Sequence[TargetModule], checkpoints: Mapping[str, LazyCheckpoint | _ReadOnce],
                   samples: int = 3) -> str | None:
    """A warning when the models look passed in another order: when the model given as ``base_model`` is a
    fine-tune, the two "task vectors" measured from it share the true base's direction (cosine ≈ 0.7 for
    near-orthogonal task vectors), while real task vectors of one base are near-orthogonal or opposed. Asked of
    every one of ``samples`` of the smallest merged weights (from layers apart); correlated task vectors with a
    cosine up to 0.5 pass."""
    if not targets:
        return None
    keys = _sampled_keys(targets, checkpoints, samples)
    cosines = []
    for key in keys:
        base = checkpoints["base"].get(key).double().flatten()
        delta_r = checkpoints["reasoning"].get(key).double().flatten() - base
        delta_i = checkpoints["instruct"].get(key).double().flatten() - base
        norms = float(delta_r.norm()) * float(delta_i.norm())
        if norms == 0.0:  # a model equal to the base in this weight: nothing to tell from it
            continue
        cosines.append(float(delta_r @ delta_i) / norms)
    if not cosines or not all(c > 0.5 for c in cosines):  # (a NaN weight is not a vote for a swap either)
        return None
    return (f"On {len(cosines)} sampled weights ({keys[0]} …) the task vectors of reasoning_model and instruct_model, "
            f"measured from base_model, point the same way (cosine {min(cosines):.2f}–{max(cosines):.2f}), as when a "
            "fine-tune is passed as base_model: check the order of the models (base_model, reasoning_model, "
            "instruct_model). (A reasoning model fine-tuned from the instruct model also looks so: its task vector "
            "already holds the instruct one.)")


def refuse_offloaded(model: torch.nn.Module, device_map: Any) -> None:
    """Raise ConfigError when accelerate offloaded part of ``model`` (its weights on the meta device).

    Offloaded weights live in accelerate's hooks, outside the model: writing a merged weight into the module would
    change nothing, and saving would then fail on the meta tensor.
    """
    offloaded = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.device.type == "meta"})
    if offloaded:
        raise ConfigError(f"device_map={device_map!r} offloaded {len(offloaded)} modules to CPU or disk (e.g. "
                          f"{offloaded[0]}); a merge writes into the loaded weights and cannot reach offloaded ones. "
                          "Pass a device_map that places every module on a GPU or the CPU (a dict, e.g. accelerate's "
                          "infer_auto_device_map(model, max_memory=...) with room for every module), or load on one "
                          "device without device_map (device='cpu' fits any model that fits in RAM).")


def _skeleton(model_config) -> torch.nn.Module:
    """The model's module tree on the meta device (no memory), for finding the merged modules."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        kind = getattr(model_config, "model_type", type(model_config).__name__)
        # a multimodal checkpoint (Mistral 3, Qwen2-VL …) whose class transformers offers no causal-LM head for
        multimodal = model_config.get_text_config() is not model_config
        fix = (" It is a multimodal model (its config has a text_config): save each of the three models' language "
               "model as a text-only causal LM with transformers first (its text model class, built from "
               "config.text_config and given the language model's and lm_head's weights, saved with the "
               "tokenizer), and merge those.") if multimodal else (
               " Merge checkpoints whose config.json names a causal LM (an architectures entry ending in "
               "ForCausalLM).")
        raise ModelMismatchError(f"transformers has no causal-LM class for model_type {kind!r} "
                                 f"({type(model_config).__name__}), so rain_hf cannot run it.{fix}") from None


def _compare_configs(configs: dict[str, Any], names: dict[str, str]) -> None:
    ref = configs["reasoning"]
    ref_geo = attention_geometry(ref)
    for role in ("base", "instruct"):
        other = configs.get(role)
        if other is None:
            continue
        if other.model_type != ref.model_type:
            raise ModelMismatchError(
                f"The {role} model {names[role]} is a {other.model_type!r} model but the reasoning model "
                f"{names['reasoning']} is {ref.model_type!r}: all three models must share one architecture.")
        geo = attention_geometry(other)
        for attr, label in (("num_layers", "layer count"), ("hidden_size", "hidden size"),
                            ("num_heads", "attention heads"), ("num_kv_heads", "key/value heads"),
                            ("head_dim", "head_dim")):
            a, b = getattr(geo, attr), getattr(ref_geo, attr)
            if a != b:
                raise ModelMismatchError(
                    f"{label} differs: the {role} model {names[role]} has {a}, the reasoning model "
                    f"{names['reasoning']} has {b}. The models must come from the same pretrained base.")


# ---------------------------------------------------------------------------------------------- report
@dataclass
class MergeReport:
    """What a merge did: timings per stage, per-module projection figures, per-head coefficients."""

    method: str = "rain"
    lam: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    modules: dict[str, dict[str, float | None]] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    head_coefficients: list[list[float]] | None = None
    alignment: list[list[float | None]] | None = None
    leakage: list[list[float | None]] | None = None
    lam_search: list[dict[str, float | bool | None]] | None = None  # λ, l_think, think_open, within_budget
    projection: str | None = None  # stage 1 as it ran: "sequential" or "one-shot"
    replay_cache_bytes: int | None = None  # the sequential form's cached layer inputs, masks and position embeddings
    vocab: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def removed_by_type(self) -> dict[str, float]:
        """Mean removed fraction per module type (q_proj, down_proj, …)."""
        groups: dict[str, list[float]] = {}
        for name, row in self.modules.items():
            if row.get("removed_fraction") is not None:
                groups.setdefault(name.rsplit(".", 1)[-1], []).append(row["removed_fraction"])
        return {k: sum(v) / len(v) for k, v in sorted(groups.items())}

    def __str__(self) -> str:
        lines = [f"MergeReport(method={self.method}, lam={self.lam})"]
        if self.lam_search:
            passed = [row["lam"] for row in self.lam_search if row.get("within_budget")]
            lines.append(f"  λ chosen by lam='auto' on the grid {[row['lam'] for row in self.lam_search]} "
                         f"(within the budget: {passed or 'none'})")
        if self.projection:
            lines.append(f"  stage 1: {self.projection} projection")
        lines.append("  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        removed = self.removed_by_type()
        if removed:
            lines.append("  removed fraction of ‖ΔW‖ by module type: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in removed.items()))
            residuals = [r["residual"] for r in self.modules.values() if r.get("residual") is not None]
            if residuals:
                lines.append(f"  max residual ‖ΔW⊥Hᵀ‖/‖ΔW Hᵀ‖: {max(residuals):.2e}")
            scaled = [r["residual_after_stage2"] for r in self.modules.values() if "residual_after_stage2" in r]
            if scaled:
                lines.append(f"  max residual of o_proj as merged (after stage 2's per-head column scales): "
                             f"{max(scaled):.2e}")
        if self.head_coefficients is not None:
            flat = [a for row in self.head_coefficients for a in row]
            lines.append(f"  head coefficients: {len(self.head_coefficients)} layers × "
                         f"{len(self.head_coefficients[0])} heads, min {min(flat):.3f}, mean "
                         f"{sum(flat) / len(flat):.3f}, max {max(flat):.3f}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- merger
class RainMerger:
    """RAIN-Merging of an instruct model (full checkpoint or peft LoRA adapter) into a reasoning model.

    Only the reasoning model is loaded whole (it runs the calibration forward passes); the base and instruct
    weights are read one tensor at a time from their safetensors files.

    Example:
        >>> import tempfile
        >>> from rain_hf import RainMerger, RainMergingConfig
        >>> merger = RainMerger.from_pretrained(
        ...     base_model="benchmarks/organism/checkpoints/base",
        ...     reasoning_model="benchmarks/organism/checkpoints/reasoning",
        ...     instruct_model="benchmarks/organism/checkpoints/instruct",
        ...     config=RainMergingConfig(lam=4.0, think_spacing=["", "", ""]))  # the organism's spacing
        >>> model = merger.merge(
        ...     reasoning_calibration="benchmarks/organism/data/reasoning_calibration.json",
        ...     instruction_calibration="benchmarks/organism/data/instruction_calibration.jsonl")
        >>> folder = tempfile.TemporaryDirectory()
        >>> out = merger.save_pretrained(folder.name + "/organism-rain")
        >>> (out / "model.safetensors").is_file(), merger.report.lam
        (True, 4.0)
        >>> folder.cleanup()
        >>> print(merger.report)  # doctest: +SKIP
    """

    @property
    def config(self) -> RainMergingConfig:
        """The settings of the next merge; edit them, or set a new :class:`RainMergingConfig` (or a dict of its
        fields: those it leaves out take their defaults, but the modules to merge and the think tokens stay the
        plan's), between merges."""
        return self._config

    @config.setter
    def config(self, config: RainMergingConfig | Mapping[str, Any]) -> None:
        if isinstance(config, Mapping):  # as from_pretrained(config=...) takes it, what the plan fixed kept
            fixed = {name: copy.deepcopy(getattr(self.plan.config, name)) for name in _PLAN_FIELDS}
            config = RainMergingConfig.from_dict({**fixed, **config})
        elif not isinstance(config, RainMergingConfig):
            raise TypeError(f"merger.config takes a RainMergingConfig or a dict of its fields; got "
                            f"{type(config).__name__}.")
        self._config = config

    @property
    def features(self) -> ThinkFeatures | None:
        """The stage-1 thinking features the next merge projects with (see :meth:`compute_features`)."""
        return self._features

    @features.setter
    def features(self, features: ThinkFeatures | str | os.PathLike | None) -> None:
        # features set by hand are treated as features passed to from_pretrained: the samples and calibration
        # record of earlier computed ones would otherwise make a merge of neither (sequential on the old samples).
        # The report and record of a merge the model holds stay its own (the merge keeps the features it used).
        if isinstance(features, (str, os.PathLike)):
            features = ThinkFeatures.load(features)  # as from_pretrained(features=PATH) takes them
        elif features is not None and not isinstance(features, ThinkFeatures):
            raise TypeError(f"merger.features takes ThinkFeatures (compute_features() or ThinkFeatures.load), a "
                            f"path to saved ones, or None; got {type(features).__name__}.")
        if features is self._features:
            return
        self._features, self._given_features = features, features
        self._stage1_samples, self._features_calibration = None, None
        self._features_time = None  # computed elsewhere: no time of this merger's

    def __init__(self, plan: MergePlan, model, tokenizer, reasoning: LazyCheckpoint, base: LazyCheckpoint,
                 instruct, device: torch.device, features: ThinkFeatures | None = None) -> None:
        self.plan = plan
        self.config = copy.deepcopy(plan.config)  # may be changed between merges (λ, stages); the plan's may not
        self.sources = plan.sources
        self.targets = plan.targets
        self.model = model
        self.tokenizer = tokenizer
        self.reasoning = reasoning
        self.base = base
        self.instruct = instruct
        self.device = device
        self._features = features
        self._given_features = features  # from from_pretrained(features=...): replacing them is said
        self._features_time: float | None = None  # how long compute_features took for the features held
        self._merged_features: ThinkFeatures | None = None  # the features of the merge the model holds
        self._report_unfinished = False  # the report is of a merge that did not finish
        self._stage1_samples: list[CalibrationSample] | None = None  # kept for config.sequential
        self._spacing_warnings: list[str] = []  # of the last reasoning set prepared, kept with its features
        self._reasoning_data_warnings: list[str] = []  # what preparing that set logged, kept with them too
        self._blank_tokens: dict[int, bool] = {}  # see _whitespace_token
        self._given_config: tuple[RainMergingConfig, dict[str, Any]] | None = None  # the caller's object, as given
        self.report = MergeReport(method=self.config.method, vocab=dict(plan.vocab), warnings=list(plan.warnings))
        # what the current (or last finished) merge read; the reasoning entry of the features' own data is kept
        # apart, since a later merge may reuse those features without the data
        self.calibration_info: dict[str, dict | None] = {"reasoning": None, "instruction": None}
        self._features_calibration: dict | None = None
        self._merged_config: RainMergingConfig | None = None  # the config of the merge the model now holds
        self.merged = False
        self._touched = False  # whether any merged module holds other weights than the reasoning model's
        self._generated_traces = 0  # how many samples of the last calibration set read the model generated
        self._task_vector_seen = False  # whether this merge read a nonzero instruct task vector
        self._fingerprint: str | None = None
        self._param_map: dict[str, torch.nn.Parameter] | None = None
        self._check_output_dtypes()

    # ------------------------------------------------------------------ construction
    @classmethod
    def plan(
        cls,
        base_model: str | os.PathLike,
        reasoning_model: str | os.PathLike,
        instruct_model: str | os.PathLike,
        config: RainMergingConfig | Mapping[str, Any] | None = None,
        *,
        revision: str | Mapping[str, str] | None = None,
        token: str | bool | None = None,
    ) -> MergePlan:
        """Resolve and validate the three inputs without loading any weights; returns a :class:`MergePlan`.

        Checks: same architecture family, layer count, hidden size, head counts and head_dim; every merged
        module's tensor present with the same shape in all three; think tokens single tokens of the reasoning
        tokenizer; a LoRA adapter's base and shapes. A vocabulary-size difference is allowed and reported.

        Example:
            >>> plan = RainMerger.plan("benchmarks/organism/checkpoints/base",
            ...                        "benchmarks/organism/checkpoints/reasoning",
            ...                        "benchmarks/organism/checkpoints/instruct")
            >>> plan.model_type, plan.instruct_kind, len(plan.targets)
            ('qwen2', 'full', 28)
        """
        return cls._plan_parts(base_model, reasoning_model, instruct_model, config, revision=revision,
                               token=token)[0]

    @classmethod
    def _plan_parts(
        cls,
        base_model: str | os.PathLike,
        reasoning_model: str | os.PathLike,
        instruct_model: str | os.PathLike,
        config: RainMergingConfig | Mapping[str, Any] | None = None,
        *,
        revision: str | Mapping[str, str] | None = None,
        token: str | bool | None = None,
    ) -> tuple[MergePlan, Any, LazyCheckpoint, LazyCheckpoint, Any]:
        """:meth:`plan`, and what it read on the way (tokenizer, reasoning and base checkpoints, the instruct
        delta), for :meth:`from_pretrained` and the command line to reuse."""
        from transformers import AutoTokenizer

        from .lora import LoraDelta, _natural_key

        for role, name in (("base_model", base_model), ("reasoning_model", reasoning_model),
                           ("instruct_model", instruct_model)):
            if not isinstance(name, (str, os.PathLike)):
                raise TypeError(f"{role} must be a Hub id or a local folder, got a {type(name).__name__}: save a "
                                "loaded model (or peft adapter) with save_pretrained(folder) and pass the folder.")
        if isinstance(config, Mapping):
            config = RainMergingConfig.from_dict(dict(config))
        elif config is not None and not isinstance(config, RainMergingConfig):
            raise TypeError(f"config must be a RainMergingConfig (or a dict of its fields), got "
                            f"{type(config).__name__}.")
        # a copy: the caller may change their object for the next merge, and this plan must not follow
        config = copy.deepcopy(config) if config is not None else RainMergingConfig()
        config.validate()
        revs = dict(revision) if isinstance(revision, Mapping) else {r: revision for r in _ROLES}
        unknown = set(revs) - set(_ROLES)
        if unknown:
            raise ConfigError(f"revision names unknown roles {sorted(unknown)}; use {list(_ROLES)}.")
        names = {"base": base_model, "reasoning": reasoning_model, "instruct": instruct_model}
        sources = {role: _resolve_role(names[role], revs.get(role), token, role) for role in _ROLES}
        shown = {role: sources[role].describe() for role in _ROLES}
        for a, b in (("instruct", "base"), ("instruct", "reasoning"), ("reasoning", "base")):
            if sources[a].path.resolve() == sources[b].path.resolve():
                raise ConfigError(f"The {a} and the {b} model are the same folder ({sources[a].path}): the merge "
                                  "needs three different models (θ_B, θ_R and θ_I or a LoRA adapter on θ_B).")
        configs = {role: _load_model_config(sources[role], role) for role in ("base", "reasoning")}
        adapter = is_adapter_folder(sources["instruct"].path)
        warnings: list[str] = []
        if not adapter:
            configs["instruct"] = _load_model_config(sources["instruct"], "instruct")
        _compare_configs(configs, shown)

        reasoning = LazyCheckpoint(sources["reasoning"].path, f"the reasoning model {shown['reasoning']}")
        if not reasoning.loadable_layout:  # the forward passes load it with transformers, which needs one or other
            files = reasoning.files
            raise CheckpointError(
                f"The reasoning model {shown['reasoning']} holds the safetensors files {files[:3]}"
                f"{' …' if len(files) > 3 else ''} but neither model.safetensors nor model.safetensors.index.json, "
                "and transformers loads it through one of them: restore the index that came with the shards, or "
                "save the model again with save_pretrained.")
        unreadable = [key for key in reasoning.keys() if not reasoning.readable(key)]
        if unreadable:  # every tensor of the reasoning model is copied into the output: fail now, not at the save
            key = unreadable[0]
            raise CheckpointError(f"The reasoning model {shown['reasoning']} stores {key} (and {len(unreadable) - 1} "
                                  f"more) as {reasoning.stored_dtype(key)}, which rain_hf cannot read or copy into "
                                  "the merged model: save the reasoning model with transformers in a float dtype "
                                  "first.")
        base = LazyCheckpoint(sources["base"].path, f"the base model {shown['base']}")
        skeleton = _skeleton(configs["reasoning"])
        stated = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
        wrong = [(key, reasoning.shape(key)) for key in reasoning.keys()
                 if key in stated and tuple(reasoning.shape(key)) != stated[key]]
        if wrong:  # transformers refuses to load it: say so before any calibration or download of the others
            key, shape = wrong[0]
            raise ModelMismatchError(
                f"The reasoning model {shown['reasoning']} stores {key} with shape {tuple(shape)}, but its "
                f"config.json makes it {stated[key]}{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}: "
                "the config does not describe these weights. Pass the config.json saved with them.")
        targets = find_target_modules(skeleton, config)
        checks = MergePlan(config, sources, "", "", attention_geometry(configs["reasoning"]), targets, {}, (0, 0),
                           attentionless_layers=layers_without_attention(skeleton),
                           num_decoder_layers=len(find_decoder_layers(skeleton)[1]),
                           unmapped=[t.name for t in targets if t.in_attention and t.kind == "other"])
        checks.config_warnings(config)  # a stage 2 with nothing to score is refused before any download of weights
        fused = unmergeable_weights(skeleton)
        if fused:
            warnings.append(f"{len(fused)} weight matrices inside the decoder blocks do not belong to linear "
                            f"layers (fused mixture-of-experts weights, routers that are no linear layer, "
                            f"convolutions …; e.g. {fused[0]}) and are not merged: they stay the reasoning model's")
        routers = merged_routers(skeleton, targets)
        if routers:
            warnings.append(f"{len(routers)} merged modules are mixture-of-experts routers (e.g. {routers[0]}): the "
                            "instruct model's routing change is merged while the experts it routes to stay the "
                            "reasoning model's; list target_modules without them to keep the reasoning model's "
                            "routing")
        if adapter:
            instruct = LoraDelta.from_pretrained(sources["instruct"].path)
            instruct.source = sources["instruct"]
            base_shapes = {k: base.shape(k) for k in base.keys()}
            conv1d = {name for name, module in skeleton.named_modules() if type(module).__name__ == "Conv1D"}
            warnings += instruct.validate(base_shapes, sources["base"].hub_id, str(sources["base"].path),
                                          sources["base"].revision, conv1d_modules=conv1d)
            beside = [p.name for p in sources["instruct"].path.glob("*.safetensors")
                      if not p.name.startswith("adapter_model")]
            if beside and (sources["instruct"].path / "config.json").is_file():
                warnings.append(f"the instruct folder {shown['instruct']} holds a LoRA adapter and a full model "
                                f"({beside[0]}, config.json); rain_hf merges the adapter, on the base model, while "
                                "transformers would load the full model with the adapter on top: keep one of them "
                                "in the folder")
            instruct.use_base(base)
            merged_biases = {t.bias_key for t in targets if t.bias_key}
            held = [key for key in instruct.bias_keys() if key in merged_biases]
            if held and not config.project_bias:
                warnings.append(f"the adapter trained {len(held)} biases of merged modules (e.g. {held[0]}); they "
                                "are merged only with project_bias=True")
            touched = set(instruct.weight_keys())
            # with project_bias, a bias delta alone makes a merged module change
            touched_bias = set(held) if config.project_bias else set()
            merged = {t.weight_key for t in targets} | merged_biases
            # biases of other modules (norms, the output layer) are never merged, whatever project_bias
            outside = sorted((touched | set(instruct.bias_keys())) - merged, key=_natural_key)
            if outside:
                warnings.append(f"the adapter holds deltas for {len(outside)} tensors outside the merged set "
                                f"(e.g. {outside[0]}); they are not merged")
            checks.idle = [t.weight_key for t in targets
                           if t.weight_key not in touched and t.bias_key not in touched_bias]
        else:
            instruct_ckpt = LazyCheckpoint(sources["instruct"].path, f"the instruct model {shown['instruct']}")
            instruct = FullDelta(instruct_ckpt, base)
            if not config.project_bias:  # as the adapter's trained biases above: say that they stay behind
                changed = [t.bias_key for t in targets if t.bias_key and _bias_changed(instruct_ckpt, base, t.bias_key)]
                if changed:
                    warnings.append(f"the instruct model changed {len(changed)} biases of merged modules (e.g. "
                                    f"{changed[0]}); they keep the reasoning model's values: they are merged only "
                                    "with project_bias=True")
        keys_to_check = [t.weight_key for t in targets]
        if config.project_bias:
            keys_to_check += [t.bias_key for t in targets if t.bias_key]
        checked = [("reasoning", reasoning), ("base", base)]
        if not adapter:
            checked.append(("instruct", instruct.instruct))
        # stored under another name in every checkpoint: renamed on load, reported together after the loop
        unstored = [key for key in keys_to_check if all(key not in ckpt for _, ckpt in checked)]
        for key in keys_to_check:
            expected = None
            for role, ckpt in checked:
                if key in unstored and key.split(".", 1)[-1] not in ckpt:
                    break
                if key not in ckpt:
                    bare = key.split(".", 1)[-1]
                    if bare in ckpt:  # transformers adds the prefix back on load; a merge reads names as stored
                        raise ModelMismatchError(
                            f"The {role} model {shown[role]} stores its tensors without the "
                            f"'{key.split('.', 1)[0]}.' prefix ({bare}, not {key}): it was saved from the bare "
                            "decoder (AutoModel). Load it with AutoModelForCausalLM and save_pretrained it again.")
                    # the configs matched already: most often a checkpoint cut short, else a setting they differ in
                    raise ModelMismatchError(f"The {role} model {shown[role]} has no tensor {key}, which the merge "
                                             "needs and the reasoning model's config.json describes: the checkpoint "
                                             "is incomplete (an interrupted download or save: fetch or save it "
                                             "again), or it was built with other settings (compare the config.json "
                                             "files).")
                if not ckpt.dtype(key).is_floating_point or ckpt.dtype(key).itemsize == 1:
                    raise CheckpointError(f"{key} is stored as {ckpt.dtype(key)} in the {role} model "
                                          f"{shown[role]}: quantized weights hold no task vector. Pass the "
                                          "unquantized (bfloat16, float16 or float32) checkpoint.")
                shape = ckpt.shape(key)
                if expected is None:
                    expected = (role, shape)
                elif shape != expected[1]:
                    raise ModelMismatchError(
                        f"{key} has shape {shape} in the {role} model {shown[role]} but {expected[1]} in the "
                        f"{expected[0]} model {shown[expected[0]]}: the models must share one base.")
        if unstored and len(unstored) == len(keys_to_check):
            multimodal = any("language_model." in key for key in reasoning.keys())
            fix = (" It is a multimodal checkpoint (its decoder is stored under language_model.): save each of the "
                   "three models' language model as a text-only causal LM with transformers first (for Gemma 3: a "
                   "Gemma3ForCausalLM built from config.text_config, given the weights of model.language_model and "
                   "lm_head, saved with its tokenizer), and merge those.") if multimodal else ""
            raise ModelMismatchError(
                f"None of the {len(unstored)} tensors of the targeted modules is stored under the name the model "
                f"class gives it (e.g. {unstored[0]}): transformers converts this checkpoint layout when it loads it, "
                "and a merge reads tensors by the names they are stored under, so rain_hf cannot merge this "
                f"layout.{fix}")
        missing_layers = sorted({t.layer for t in targets if t.weight_key in unstored})
        stored = sorted({t.layer for t in targets} - set(missing_layers))
        if unstored and stored and missing_layers[0] > stored[-1] and not any(
                t.weight_key not in unstored for t in targets if t.layer in missing_layers):
            # the last layers absent whole: the config counts more layers than the weights hold, not a renaming
            raise ModelMismatchError(
                f"No checkpoint stores a tensor of decoder layers {missing_layers} (e.g. {unstored[0]}), which the "
                f"reasoning model's config.json counts "
                f"({getattr(text_config(configs['reasoning']), 'num_hidden_layers', '?')} layers; stored: {stored[:3]}{' …' if len(stored) > 3 else ''}): the config does not describe these "
                "weights. Pass the config.json saved with them.")
        if unstored:
            modules = sorted({key.rsplit(".", 2)[-2] for key in unstored})
            raise ModelMismatchError(
                f"No checkpoint stores {len(unstored)} tensors of targeted modules under the names they are loaded "
                f"with (e.g. {unstored[0]}): transformers renames some stored tensors when it loads them (Phi-MoE's "
                "block_sparse_moe.gate becomes mlp.router), and a merge reads tensors by the names they are stored "
                f"under. List target_modules without {', '.join(modules)}.")
        # both checks read the same few sampled weights of each model: once
        sampled = {"base": _ReadOnce(base), "reasoning": _ReadOnce(reasoning),
                   "instruct": None if adapter else _ReadOnce(instruct.instruct)}
        if not adapter:
            swapped = _order_warning(targets, sampled)
            if swapped:
                warnings.append(swapped)
        warnings += _distance_warnings(targets, sampled, ("reasoning",) if adapter else ("reasoning", "instruct"))
        vocab = {role: int(getattr(text_config(c), "vocab_size", 0)) for role, c in configs.items()}
        if len(set(vocab.values())) > 1:
            warnings.append(f"vocabulary sizes differ ({vocab}); embeddings and lm_head are never merged, the "
                            "merged model keeps the reasoning model's")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(sources["reasoning"].path), trust_remote_code=False)
        except Exception as exc:
            raise CheckpointError(f"The reasoning model {shown['reasoning']} has no loadable tokenizer ({exc}).") from exc
        if len(tokenizer) <= 1:  # transformers builds an empty tokenizer for a folder without tokenizer files
            raise CheckpointError(f"The reasoning model {shown['reasoning']} has no tokenizer files (tokenizer.json, "
                                  "tokenizer_config.json …): the merge reads its think tokens and chat template, and "
                                  "saves them with the merged model. Copy the tokenizer files of the reasoning "
                                  "model into its folder.")
        think_ids = check_think_tokens(tokenizer, config)
        rows = vocab["reasoning"]
        beyond = {token: i for token, i in zip((config.think_open, config.think_close), think_ids) if rows and i >= rows}
        if beyond:  # the forward passes would fail on them with torch's bare IndexError
            raise ModelMismatchError(f"The reasoning model's tokenizer gives the think tokens {beyond} ids beyond "
                                     f"the vocab_size={rows} of its config.json, so its weights have no embedding "
                                     "for them (tokens added without resizing the model?): resize its embeddings "
                                     "(model.resize_token_embeddings(len(tokenizer))) and save it again, or set "
                                     "think_open / think_close to tokens the model was trained with.")
        try:
            checks.think_tail = template_think_tail(tokenizer, config)
        except Exception:  # noqa: BLE001 - no usable chat template (CalibrationError, a jinja error …): the merge
            checks.think_tail = None  # says so where it needs one, and baselines never do
        context = getattr(text_config(configs["reasoning"]), "max_position_embeddings", None)
        plan = replace(checks, instruct_kind="lora" if adapter else "full",
                       model_type=configs["reasoning"].model_type, vocab=vocab, think_token_ids=think_ids,
                       context_length=context if isinstance(context, int) and not isinstance(context, bool) else None)
        plan.warnings = warnings + plan.config_warnings(config)
        for w in plan.warnings:
            logger.warning(w)
        return plan, tokenizer, reasoning, base, instruct

    @classmethod
    def from_pretrained(
        cls,
        base_model: str | os.PathLike,
        reasoning_model: str | os.PathLike,
        instruct_model: str | os.PathLike,
        config: RainMergingConfig | Mapping[str, Any] | None = None,
        *,
        revision: str | Mapping[str, str] | None = None,
        token: str | bool | None = None,
        device: str | torch.device | int | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device_map: str | dict | None = None,
        features: ThinkFeatures | str | os.PathLike | None = None,
        dtype: str | torch.dtype | None = None,
        **unknown: Any,
    ) -> RainMerger:
        """Validate the three models (see :meth:`plan`), then load the reasoning model for the forward passes.

        Args:
            base_model, reasoning_model, instruct_model: Hub ids or local folders; ``instruct_model`` may be a
                peft LoRA adapter (detected from ``adapter_config.json``).
            config: the merge settings (default :class:`RainMergingConfig`; a dict of its fields is read as one).
            revision: one revision for all three, or a dict ``{"base": ..., "reasoning": ..., "instruct": ...}``.
            token: Hub token.
            device: where the forward passes and the projections run (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or
                ``1``; default: the CPU).
                With ``device_map`` the forward passes run where it put each layer, and ``device`` (default: the
                device of the input embeddings) is where the projections run.
            torch_dtype: dtype to load the reasoning model in (default: ``"auto"``, the dtype its config.json
                names, else as stored, as transformers loads it; ``dtype=``, transformers 5's name, is the same).
                Loading narrower than the saved weights is refused before the load: keep the stored dtype, or set
                ``RainMergingConfig(output_dtype=...)`` to save in the loaded one.
            device_map: e.g. ``"auto"`` to spread a reasoning model that does not fit on one device (accelerate).
                Every module must land on a device: modules offloaded to the CPU (next to GPUs) or to disk are
                refused, because their weights live outside the model where a merge cannot write them.
            features: precomputed :class:`ThinkFeatures` (or a path saved by :meth:`ThinkFeatures.save`). A merge
                with them and without ``reasoning_calibration`` uses the one-shot projection (see
                ``RainMergingConfig.sequential``).
        """
        if unknown:
            settings = sorted(k for k in unknown if k in _FIELD_NAMES)
            hint = (f": {settings} are merge settings, passed as config=RainMergingConfig("
                    f"{', '.join(f'{k}=...' for k in settings)})" if settings else "")
            if "trust_remote_code" in unknown:
                hint += (" (trust_remote_code: rain_hf loads the reasoning model with transformers' own classes; a "
                         "model whose code lives in its repository is not supported)")
            hint += _habit_hints(unknown, _LOAD_HABITS)
            # transformers' own loading options are not typos of rain_hf's (tp_plan is no top_p)
            foreign = sorted(k for k in unknown if k in _TRANSFORMERS_LOAD_OPTIONS and k not in _LOAD_HABITS)
            if foreign:
                hint += f" ({', '.join(foreign)}: transformers loading options rain_hf does not take)"
            rest = [k for k in sorted(unknown) if k not in _FIELD_NAMES and k not in _LOAD_HABITS and k not in foreign]
            arguments = [p for p in inspect.signature(cls.from_pretrained).parameters if p not in ("cls", "unknown")]
            for key in rest:
                match = difflib.get_close_matches(key, arguments + sorted(_FIELD_NAMES), n=1)
                if match and match[0] in _FIELD_NAMES:
                    hint += (f" ({key!r}: did you mean the setting {match[0]!r}, as "
                             f"config=RainMergingConfig({match[0]}=...)?)")
                elif match:
                    hint += f" ({key!r}: did you mean {match[0]!r}?)"
            raise _unexpected_arguments("from_pretrained", unknown, hint)
        if features is not None and not isinstance(features, (ThinkFeatures, str, os.PathLike)):
            raise TypeError(f"from_pretrained(features=...) takes ThinkFeatures (compute_features() or "
                            f"ThinkFeatures.load), a path to saved ones, or None; got {type(features).__name__}.")
        start = time.perf_counter()
        parts = cls._plan_parts(base_model, reasoning_model, instruct_model, config, revision=revision, token=token)
        merger = cls._from_plan(parts, device=device, torch_dtype=torch_dtype, dtype=dtype, device_map=device_map,
                                features=features, start=start)
        if isinstance(config, RainMergingConfig):  # to say so when the caller edits it instead of merger.config
            merger._given_config = (config, config.to_dict())
        return merger

    @classmethod
    def _from_plan(cls, parts: tuple, *, device: str | torch.device | int | None = None,
                   torch_dtype: str | torch.dtype | None = None, dtype: str | torch.dtype | None = None,
                   device_map: str | dict | None = None, features: ThinkFeatures | str | os.PathLike | None = None,
                   start: float | None = None) -> RainMerger:
        """:meth:`from_pretrained` after its :meth:`_plan_parts`: for a caller that planned
        already, e.g. the CLI's checks before the load."""
        from transformers import AutoModelForCausalLM

        start = time.perf_counter() if start is None else start
        given = [d for d in (torch_dtype, dtype) if d is not None and d != "auto"]
        if len({_DTYPES.get(d, d) if isinstance(d, str) else d for d in given}) > 1:
            raise ConfigError(f"torch_dtype={torch_dtype!r} and dtype={dtype!r} disagree: pass one of them.")
        dtype = given[0] if given else "auto"
        if isinstance(dtype, str) and dtype != "auto":
            dtype = _DTYPES.get(dtype, dtype)
        if dtype != "auto" and dtype not in _DTYPES.values():  # an unknown name, an integer dtype, or no dtype
            raise ConfigError(f"torch_dtype={dtype!r}: a merge computes in floating point; use one of "
                              f"{sorted(_DTYPES)} or 'auto'.")
        check_device(device)
        plan, tokenizer, reasoning, base, instruct = parts
        # before the load, which takes minutes on a large model
        auto = auto_load_dtype(plan, reasoning) if dtype == "auto" else None
        found = load_dtype_problem(plan, reasoning, auto[0] if auto else dtype) if dtype != "auto" or auto else None
        if found:
            raise ConfigError(found[1] if auto is None else f"{found[1]} (torch_dtype='auto' loads it as "
                              f"{str(auto[0]).replace('torch.', '')}: {auto[1]}.)")
        kwargs: dict[str, Any] = {"dtype": dtype}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model, loading = AutoModelForCausalLM.from_pretrained(str(plan.sources["reasoning"].path),
                                                              output_loading_info=True, trust_remote_code=False,
                                                              **kwargs)
        missing = sorted(loading.get("missing_keys") or [])
        if missing:
            # transformers fills them with random values: the calibration passes and the saved merge would use them
            raise CheckpointError(
                f"The reasoning model {plan.sources['reasoning'].describe()} lacks {len(missing)} tensors its model "
                f"class needs ({', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}), which transformers would "
                "initialise at random: the checkpoint is incomplete. Pass the complete checkpoint (every shard its "
                "index lists, saved with save_pretrained).")
        if device_map is None:
            device = device if device is not None else "cpu"
            model.to(device)
        else:
            refuse_offloaded(model, device_map)
            device = device if device is not None else model.get_input_embeddings().weight.device
        model.eval()
        if isinstance(features, (str, os.PathLike)):
            features = ThinkFeatures.load(features)
        merger = cls(plan, model, tokenizer, reasoning, base, instruct, torch.device(device), features)
        merger.report.timings["load"] = time.perf_counter() - start
        return merger

    # ------------------------------------------------------------------ helpers
    def _output_dtype(self, key: str, cfg: RainMergingConfig | None = None) -> torch.dtype:
        return _saved_dtype(cfg or self.config, self.reasoning.dtype(key))

    def _check_output_dtypes(self) -> None:
        params = self._params()
        for t in self.targets:
            problem = _dtype_problem(self._output_dtype(t.weight_key), params[t.name + ".weight"].dtype)
            if problem:
                raise ConfigError(problem)

    def _params(self) -> dict[str, torch.nn.Parameter]:
        if self._param_map is None:
            self._param_map = dict(self.model.named_parameters())
        return self._param_map

    def _pad_id(self) -> int:
        return padding_id(self.tokenizer)

    def _prepare(self, kind: str, data) -> list[CalibrationSample]:
        prepare = prepare_reasoning_calibration if kind == "reasoning" else prepare_instruction_calibration
        stats: dict[str, Any] = {}
        with collect_calibration_warnings() as said:
            samples = prepare(data, self.tokenizer, self.config, model=self.model, stats=stats)
        # what the data made the library say (sets swapped, answers cut short, spans not found) belongs in the card
        # (many: the first ones and the last, which sums up skipped malformed samples)
        shown = list(said)
        if len(said) > _CALIBRATION_WARNINGS_SHOWN:
            shown = said[: _CALIBRATION_WARNINGS_SHOWN - 1] + [
                f"… {len(said) - _CALIBRATION_WARNINGS_SHOWN} more warnings about the {kind} calibration data, which "
                f"the log holds; the last: {said[-1]}"]
        context = getattr(text_config(self.model.config), "max_position_embeddings", None)
        longer = [len(s.input_ids) for s in samples if isinstance(context, int) and len(s.input_ids) > context]
        if longer:  # positions past the trained context: rotary angles the model never saw, features off its use
            shown.append(f"{len(longer)} of {len(samples)} {kind} calibration samples are longer than the model's "
                         f"context (max_position_embeddings={context}; the longest {max(longer)} tokens): set "
                         f"max_length to at most {context} to cut them, or use shorter samples")
            logger.warning(shown[-1])
        self.report.warnings.extend(shown)
        if kind == "reasoning":
            self._reasoning_data_warnings = shown
        self._generated_traces = int(stats.get("num_generated") or 0)  # the model wrote some samples' traces
        if kind == "reasoning" and not self._touched:  # the reasoning model's own predictions
            self._spacing_warnings = self._check_think_spacing(samples)
            for warning in self._spacing_warnings:
                self._warn(warning)
        if isinstance(data, (str, os.PathLike)):
            source = str(data)
        elif isinstance(data, list):
            source = f"a list of {len(data)} records"
        else:
            source = type(data).__name__
        is_file = isinstance(data, (str, os.PathLike))
        # sha256 is of the records as read (a file and the same records from a datasets.Dataset hash alike);
        # file_sha256 is what sha256sum prints for the file
        self.calibration_info[kind] = {"num_samples": len(samples), "num_malformed": stats.get("num_malformed"),
                                       "source": source, "sha256": stats.get("sha256"), "is_file": is_file,
                                       "file_sha256": _file_sha256(data) if is_file else None}
        return samples

    def _check_think_spacing(self, samples: list[CalibrationSample], probe: int = SPACING_PROBE_SAMPLES) -> list[str]:
        """Warnings for a layout the reasoning model does not write: where, confidently (argmax probability
        > 0.5), it predicts other whitespace after the think-open or the think-close token than ``think_spacing``
        puts there (text where the layout writes whitespace, whitespace where it writes none or more of it) on most
        of ``probe`` calibration samples. The samples are rendered with ``think_spacing`` whatever the data wrote,
        so a wrong layout moves every thinking feature and L_think off what the model generates. Teacher-forced on
        the rendered layout: one forward pass per sample. In the same pass, where the chat template leaves the
        think-open token to the model, a warning when the model confidently opens with something else on most of
        them: an instruct model given as the reasoning model."""
        from .evaluation import think_log_probs

        cfg = self.config
        is_blank = self._whitespace_token
        # where the chat template writes "<think>\n" itself, think_spacing[0] is not used
        boundaries = [(0, "think_open")] if not self.plan.think_tail else []
        boundaries.append((2, "think_close"))
        chosen = samples[:probe]
        # the model's own first token, where the template leaves it: the think-open one, for a reasoning model
        first = self.plan.think_tail is None and all(s.think_open > 0 for s in chosen)
        runs = []  # per sample, per boundary: the tag's position and those of the whitespace tokens after it
        for s in chosen:
            runs.append([])
            for _, attr in boundaries:
                end = getattr(s, attr) + 1
                while end < len(s.input_ids) and is_blank(s.input_ids[end]):
                    end += 1
                runs[-1].append(range(getattr(s, attr), min(end, len(s.input_ids) - 1)))
        log_probs = think_log_probs(self.model, [torch.tensor(s.input_ids) for s in chosen],
                                    [[s.think_open - 1] * first + [p for run in sample_runs for p in run]
                                     for s, sample_runs in zip(chosen, runs)],
                                    cfg.batch_size, self._pad_id())
        best_p, best = (v.tolist() for v in log_probs.exp().max(dim=-1))  # rows in the order of the positions
        offset = 0
        other_first: list[int] = []  # what the model confidently writes first instead of the think-open token
        layouts: dict[int, list[str]] = {k: [] for k in range(len(boundaries))}
        longer: dict[int, int] = {k: 0 for k in range(len(boundaries))}  # read one token past the layout
        for s, sample_runs in zip(chosen, runs):
            if first:
                if best_p[offset] > 0.5 and best[offset] != s.input_ids[s.think_open]:
                    other_first.append(best[offset])
                offset += 1
            for k, run in enumerate(sample_runs):
                rows = zip(run, best[offset:offset + len(run)], best_p[offset:offset + len(run)])
                offset += len(run)
                for q, predicted, p in rows:
                    written = s.input_ids[q + 1]
                    if p <= 0.5 or predicted == written:
                        continue
                    if is_blank(predicted) or is_blank(written):  # not two answer tokens: the layout differs
                        layouts[k].append(self.tokenizer.decode(s.input_ids[run.start + 1:q + 1])
                                          + (self.tokenizer.decode([predicted]) if is_blank(predicted) else ""))
                        longer[k] += is_blank(predicted) and not is_blank(written)
                        break
        warnings = []
        if len(other_first) * 2 > len(chosen):
            seen = self.tokenizer.decode([max(set(other_first), key=other_first.count)])
            warnings.append(
                f"reasoning_model does not open {cfg.think_open} after the prompt: on {len(other_first)} of "
                f"{len(chosen)} calibration samples it confidently writes something else first (greedy, e.g. "
                f"{seen!r}). Check that it is the reasoning model (the models go in the order base_model, "
                "reasoning_model, instruct_model), and that think_open is its think-open token")
        for k, (slot, _) in enumerate(boundaries):
            if len(layouts[k]) * 2 <= len(chosen):
                continue
            seen = max(set(layouts[k]), key=layouts[k].count)
            tag = cfg.think_open if slot == 0 else cfg.think_close
            more = (", perhaps followed by more whitespace: it was read one token past the layout"
                    if longer[k] else "")
            warnings.append(
                f"think_spacing[{slot}]={cfg.think_spacing[slot]!r} is written after {tag} in every calibration "
                f"sample, but the reasoning model writes {seen!r} there (greedy, on {layouts[k].count(seen)} of "
                f"{len(chosen)} samples, and something other than the layout on {len(layouts[k])}{more}): set "
                f"think_spacing[{slot}]={seen!r} if that is its layout (the samples are rendered with think_spacing, "
                "whatever the data wrote), or the thinking features and L_think are taken on text the model does "
                "not write")
        return warnings

    def _check_config(self) -> None:
        """Validate ``merger.config`` as it is now (edited since the merger was made, maybe), and refuse a change
        of what the plan fixed."""
        cfg = self.config
        cfg.validate()
        changed = [name for name in _PLAN_FIELDS if getattr(cfg, name) != getattr(self.plan.config, name)]
        if changed:
            raise ConfigError(f"merger.config.{changed[0]} changed after the merger was made; the modules to merge "
                              "and the think tokens are fixed by the plan: make a new RainMerger with that config.")

    # ------------------------------------------------------------------ stage 1
    def compute_features(self, reasoning_calibration: CalibrationData) -> ThinkFeatures:
        """Stage-1 features of the reasoning model on ``reasoning_calibration`` (kept and returned).

        They depend only on the reasoning model (its weights, tokenizer and chat template, and the dtype it is
        loaded in) and its calibration set: compute them once, then merge several
        instruct models (or save them with :meth:`ThinkFeatures.save` and pass ``features=`` later). They are
        taken on the reasoning model's own weights, so a merge the model holds is undone (merge again).
        """
        self._check_config()  # before the merge the model holds is undone
        if self.merged:  # the capture runs on the reasoning model itself
            logger.warning("compute_features() puts the reasoning model's weights back, undoing the last merge: call "
                           "merge() again to merge with these features.")
        if self._touched:  # a finished merge, or one that failed half way
            self.reset()
        start = time.perf_counter()
        samples = self._prepare("reasoning", reasoning_calibration)
        heldout: list[CalibrationSample] = []
        if self.config.lam == "auto":
            samples, heldout = self._hold_out(samples)
        # built apart and put in place whole: an interruption leaves the merger's features as they were
        features = capture_think_features(self.model, samples, self.targets, self.config, self._pad_id(),
                                          svd_device=self.device)
        cfg = self.config
        features.settings.update(think_open=cfg.think_open, think_close=cfg.think_close,
                                 think_spacing=cfg.think_spacing, max_length=cfg.max_length,
                                 reasoning_fingerprint=self._reasoning_fingerprint(),
                                 tokenizer_digest=self._tokenizer_digest(),
                                 loaded_dtype=str(self.model.dtype).replace("torch.", ""),
                                 spacing_warnings=list(self._spacing_warnings),
                                 data_warnings=list(self._reasoning_data_warnings))
        if self._generated_traces:  # traces the model wrote depend on how it generated them
            features.settings.update(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample)
            if cfg.do_sample:
                features.settings.update(temperature=cfg.temperature, top_p=cfg.top_p, generation_seed=cfg.seed)
        features.heldout = self._think_rows(heldout)
        calibration = copy.deepcopy(self.calibration_info["reasoning"])
        # where they came from, for a merge that loads them from a file: its card names the set and its hashes
        features.settings["calibration"] = {key: calibration.get(key) for key in ("source", "sha256", "file_sha256")}
        if heldout:
            features.settings.update(holdout_share=cfg.lam_auto_holdout, holdout_seed=cfg.seed)
            calibration["num_held_out"] = len(heldout)  # measured L_think, not projected
        self._features, self._stage1_samples, self._features_calibration = features, samples, calibration
        self.calibration_info["reasoning"] = copy.deepcopy(calibration)
        self._features_time = self.report.timings["stage1_features"] = time.perf_counter() - start
        return self.features

    # ------------------------------------------------------------------ the stream
    def _module_delta(self, target: TargetModule) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ΔW [out, in] and, with project_bias, Δb [out] (fp32, or float64 for float64 checkpoints; on the compute
        device)."""
        dw = self.instruct.delta(target.weight_key)
        dw = torch.zeros(target.shape) if dw is None else dw
        db = None
        if self.config.project_bias and target.bias_key:
            db = self.instruct.delta(target.bias_key)
            db = torch.zeros(target.shape[0]) if db is None else db
        self._task_vector_seen = self._task_vector_seen or bool(dw.any()) or (db is not None and bool(db.any()))
        return dw.to(self.device), (db.to(self.device) if db is not None else None)

    def _projected(self, target: TargetModule, dw: torch.Tensor, db: torch.Tensor | None, record: bool,
                   basis: tuple[torch.Tensor, torch.Tensor] | None = None,
                   column_scale: torch.Tensor | None = None):
        """Stage 1 on one module: ΔW⊥ (and Δb⊥), recording the removed fraction and residual.

        ``basis`` is the (V, s) of the module's features; ``None`` takes the reasoning model's from
        :attr:`features`. ``column_scale`` [1, in (+1 with the bias)] is stage 2's per-column scale, given to
        record the residual of the delta as merged too.
        """
        full = dw if db is None else torch.cat([dw, db.unsqueeze(1)], dim=1)
        if self.config.stage1:
            v, s = self.features.basis(target.name) if basis is None else basis
            v, s = v.to(self.device), s.to(self.device)
            if v.shape[0] == full.shape[1] + 1:  # a module without a bias in a group that also holds biased ones
                v, s = without_bias_column(v, s)
            prec = torch.float64 if self.config.precision == "float64" else torch.float32
            work, v, s = full.to(prec), v.to(prec), s.to(prec)
            if self.config.projection == "svd":
                out = project_svd(work, protected_basis(v, s, self.config.rcond))
            else:
                out = project_ridge(work, v, s, self.config.ridge)
            if record:
                row = {"removed_fraction": removed_fraction(work, out), "residual": feature_residual(work, out, v, s)}
                if column_scale is not None:
                    # Eq. 16 scales the input columns of o_proj per head after the projection; unequal scales move
                    # part of ΔW⊥ back onto the protected directions (row and scalar scales cannot).
                    c = column_scale.to(prec)
                    row["residual_after_stage2"] = feature_residual(work * c, out * c, v, s)
                self.report.modules[target.name] = row
            # fp32, or float64 for float64 checkpoints or precision: a float64 result is not rounded here, but once,
            # where it is added to θ_R and written
            full = out.to(torch.promote_types(full.dtype, prec))
        if db is None:
            return full, None
        return full[:, :-1], full[:, -1]

    def _scale(self, target: TargetModule, alpha: torch.Tensor | None) -> tuple[Any, Any]:
        if alpha is None:
            return 1.0, 1.0
        row = self.report.layers.index(target.layer)
        geo = self.plan.geometry
        a = alpha[row].to(self.device)
        w = weight_scale(target.kind, a, geo.num_kv_heads, geo.head_dim)
        b = w.squeeze(1) if target.kind in ("q", "kv", "qkv") else a.mean()
        return w, b

    def _write_param(self, name: str, value: torch.Tensor) -> None:
        param = self._params()[name]
        self._touched = True
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))

    def _apply_rain(self, lam: float, alpha: torch.Tensor | None, record: bool, desc: str,
                    one_shot: bool = False) -> None:
        """θ = θ_R + lam·α⊙Δ⊥ for every target, written into the loaded model (summed in fp32, or float64 for
        float64 checkpoints: one rounding).

        ``one_shot`` projects on the reasoning model's features even with ``config.sequential``.
        """
        if one_shot or not self._sequential():
            for target in tqdm(self.targets, desc=desc, unit="module"):
                self._merge_module(target, lam, alpha, record)
            return
        calls = self.features.settings.get("calls_per_pass", {})  # groups that run more than once in a pass
        # Modules downstream of a group do not change its input, so whatever they hold (the reasoning weights or
        # another λ's merge) does not matter when its features are captured; but a group that runs again later in
        # its layer (Gemma 3n's AltUp router) reads, at its later calls, what that layer's other groups wrote, and
        # they must hold the reasoning weights, as in the final merge, not the λ searched before.
        if self._touched and any(n > 1 for n in calls.values()):
            self.reset()
        replay = LayerReplay(self.model, self._stage1_samples, self.config, self._pad_id())
        self.report.replay_cache_bytes = replay.nbytes()
        for i, group in enumerate(tqdm(self._input_groups(), desc=f"{desc} (sequential)", unit="group")):
            try:
                basis = replay.group_basis(group[0].layer, [t.name for t in group], svd_device=self.device,
                                           calls=calls.get(self.features.module_group[group[0].name], 1))
            except NonFiniteFeaturesError as exc:
                if i == 0:  # nothing merged yet: the reasoning model's own activations, as the error says
                    raise
                dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
                raise NonFiniteFeaturesError(
                    f"The thinking features at the input of {group[0].name}, taken on the model merged at λ={lam:g} "
                    "up to that module (the sequential projection), hold inf or NaN values: the merged layers before "
                    f"it overflow in {dtype} (their weights or activations), or the reasoning model's own activations "
                    "do. Use a smaller λ, load the model in float32 (torch_dtype='float32', with output_dtype to save "
                    "in its own dtype), or set sequential=False.") from exc
            for target in group:
                self._merge_module(target, lam, alpha, record, basis)

    def _sequential(self) -> bool:
        """Whether stage 1 runs in the sequential form (see ``RainMergingConfig.sequential``)."""
        cfg = self.config
        return cfg.stage1 and cfg.sequential is not False and self._stage1_samples is not None

    def _merge_module(self, target: TargetModule, lam: float, alpha: torch.Tensor | None, record: bool,
                      basis: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        dw, db = self._module_delta(target)
        ws, bs = self._scale(target, alpha)
        column_scale = None
        if alpha is not None and target.kind == "o":
            column_scale = ws if db is None else torch.cat([ws, bs.reshape(1, 1)], dim=1)
        dw, db = self._projected(target, dw, db, record, basis, column_scale)
        theta = self.reasoning.get(target.weight_key)
        theta = theta.to(self.device, work_dtype(theta.dtype)) + lam * ws * dw
        self._refuse_non_finite(target.weight_key, theta, lam)
        self._write_merged(target.weight_key, theta, final=record)
        if db is not None:
            b = self.reasoning.get(target.bias_key)
            b = b.to(self.device, work_dtype(b.dtype)) + lam * bs * db
            self._refuse_non_finite(target.bias_key, b, lam)
            self._write_merged(target.bias_key, b, final=record)

    def _write_merged(self, key: str, merged: torch.Tensor, final: bool) -> None:
        """Write a merged tensor, rounded to its output dtype, into the model. The final merge refuses one that
        overflows float16 (in memory or as saved) here, not at the save, where no setting could mend it; a probe or a
        λ of the search is not refused (its scores show the damage)."""
        out = merged.to(self._output_dtype(key))
        in_half = self._params()[key].dtype == torch.float16
        if final and (in_half or out.dtype == torch.float16):
            _check_fits_float16(key, out if out.dtype == torch.float16 else merged.to(torch.float16),
                                merged_in_float16=in_half)
        self._write_param(key, out)

    def _refuse_non_finite(self, key: str, merged: torch.Tensor, lam: float) -> None:
        """Refuse a merged tensor holding NaN or ±inf, naming the input it came from: the merge would otherwise
        save (and ``lam="auto"`` score) a broken model without a word."""
        if bool(torch.isfinite(merged).all()):
            return
        inputs = [("the reasoning model's", lambda: self.reasoning.get(key)),
                  ("the base model's", lambda: self.base.get(key) if key in self.base else None),
                  (f"the instruct {'model' if isinstance(self.instruct, FullDelta) else 'adapter'}'s task vector",
                   lambda: self.instruct.delta(key))]
        broken = [what for what, read in inputs if (t := read()) is not None and not bool(torch.isfinite(t).all())]
        if not broken and self.config.method == "slerp":  # slerp_t ∈ [0, 1] mixes two finite weights
            raise CheckpointError(f"Merging {key} with slerp gives NaN or infinite values from finite weights: their "
                                  "values are near float32's limit; check those checkpoints before merging them.")
        if not broken:  # finite inputs: λ scaled the task vector past float32
            values = "lam (or lam_grid's values)" if self.config.method == "rain" else "lam"
            raise CheckpointError(f"Merging {key} at λ={lam:g} gives NaN or infinite values, from the arithmetic "
                                  f"(values too large for float32): use a smaller {values}.")
        raise CheckpointError(f"Merging {key} gives NaN or infinite values, from {' and '.join(broken)} tensor: "
                              "check that checkpoint (a damaged file or a diverged fine-tune) before merging it.")

    def _input_groups(self) -> list[list[TargetModule]]:
        """The merged modules grouped by shared input, in the order the forward pass reaches them (the order in
        which :attr:`features` first recorded them)."""
        by_name = {t.name: t for t in self.targets}
        groups: dict[str, list[TargetModule]] = {}
        for name, group in self.features.module_group.items():
            if name in by_name:
                groups.setdefault(group, []).append(by_name[name])
        return list(groups.values())

    def _apply_baseline(self) -> None:
        from .methods import merge_tensor, needs_base

        cfg = self.config
        with_base = needs_base(cfg.method)
        for target in tqdm(self.targets, desc=f"merge ({cfg.method})", unit="module"):
            keys = [target.weight_key] + ([target.bias_key] if cfg.project_bias and target.bias_key else [])
            for key in keys:
                reasoning = self.reasoning.get(key)
                reasoning = reasoning.to(self.device, work_dtype(reasoning.dtype))
                base = self.base.get(key) if with_base else None
                if base is not None:  # θ_B is needed twice (in Δ_I and in the method): read and widened once
                    base = base.to(work_dtype(base.dtype))
                if base is not None and isinstance(self.instruct, FullDelta):
                    delta = self.instruct.delta(key, base)
                else:
                    delta = self.instruct.delta(key)
                if base is not None:
                    base = base.to(self.device)
                delta = torch.zeros_like(reasoning) if delta is None else delta.to(self.device)
                self._task_vector_seen = self._task_vector_seen or bool(delta.any())
                merged = merge_tensor(cfg.method, reasoning, base, delta, cfg, key)
                self._refuse_non_finite(key, merged, cfg.lam)
                self._write_merged(key, merged, final=True)

    @contextlib.contextmanager
    def _reset_after(self) -> Iterator[None]:
        """Put the reasoning model back after the block (a probe or a λ search); when the block fails, a failing
        reset must not hide why (as in :meth:`_undo_on_failure`)."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.reset()
            raise
        self.reset()

    def _undo_on_failure(self, final_pass: Callable[[], None]) -> None:
        """Run a merge's final pass over the weights; if it fails half way, put the reasoning model back (the model
        a merge returned must not hold a mix), and raise the failure itself."""
        try:
            final_pass()
        except BaseException:
            with contextlib.suppress(Exception):  # a failing reset must not hide why the merge failed
                self.reset()
            raise

    def reset(self) -> None:
        """Put the reasoning model's own weights back into every merged module (read again from its files)."""
        self.merged = False  # first: an interruption half way must not leave a mixed model that saves
        for target in self.targets:
            for key in (target.weight_key, target.bias_key):
                if key is not None:
                    self._write_param(key, self.reasoning.get(key))
        self._touched = False

    def _reasoning_fingerprint(self) -> str:
        if self._fingerprint is None:
            # the think tokens' embedding rows too: a fine-tune that trains only them changes a few rows mid-table
            names = {id(p): n for n, p in self.model.named_parameters()}
            embeddings = (self.model.get_input_embeddings(), self.model.get_output_embeddings())
            keys = {names.get(id(getattr(m, "weight", None))) for m in embeddings if m is not None} - {None}
            rows = sorted(set(self.plan.think_token_ids))
            self._fingerprint = checkpoint_fingerprint(self.reasoning, sample_rows={k: rows for k in keys})
        return self._fingerprint

    def _tokenizer_digest(self) -> str:
        """A digest of the tokenizer's full definition and chat template: they decide which tokens the calibration
        text becomes, and so where the thinking features were taken."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # without the padding and truncation state, which every padded or truncated call sets for a while
            definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
            text = json.dumps(definition, sort_keys=True)
        else:
            text = repr(sorted(self.tokenizer.get_vocab().items()))
        text += "\0" + str(getattr(self.tokenizer, "chat_template", None))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def _check_features_model(self) -> None:
        """Warn about reused thinking features taken with another tokenizer or chat template, in another dtype, or
        without a full fingerprint (those of another reasoning model are refused by :meth:`_refuse_missing_inputs`)."""
        settings = self.features.settings
        if settings.get("tokenizer_digest") not in (None, self._tokenizer_digest()):
            self._warn(
                "the thinking features were computed with another tokenizer or chat template than this merger's (a "
                "different tokenizer.json or template, or another transformers version that writes it otherwise): "
                "if they render the calibration text differently, the features protect other positions; recompute "
                "them with this tokenizer to be sure")
        loaded = str(self.model.dtype).replace("torch.", "")
        if settings.get("loaded_dtype") not in (None, loaded):
            self._warn(
                f"the thinking features were taken with the reasoning model loaded in {settings['loaded_dtype']}, "
                f"this merge loads it in {loaded}: the protected subspace is {settings['loaded_dtype']}'s; recompute "
                "the features to match")
        recorded = settings.get("reasoning_fingerprint")
        if recorded is None:
            logger.warning("These thinking features do not record which reasoning model they come from (saved by an "
                           "older rain_hf); make sure it is %s.", self.sources["reasoning"].describe())
        elif "-" not in recorded:  # version 1: tensor ends only
            logger.warning("These thinking features were saved by an older rain_hf, whose fingerprint of the "
                           "reasoning model covers only the ends of each tensor; it matches %s there. Recompute them "
                           "to record the fuller one.", self.sources["reasoning"].describe())

    def _refuse_features_of_another_model(self) -> None:
        """Refuse thinking features whose recorded fingerprint is another reasoning model's (they would project the
        wrong null space). The fingerprint is of the checkpoint's files, so this holds before and after a reset."""
        recorded = self.features.settings.get("reasoning_fingerprint")
        if recorded is None:
            return
        this = legacy_fingerprint(self.reasoning) if "-" not in recorded else self._reasoning_fingerprint()
        if recorded != this:
            raise ValueError(f"These thinking features were computed on another reasoning model (fingerprint "
                             f"{recorded}, this one {this}): recompute them with compute_features(...) on this model, "
                             "or pass reasoning_calibration=... to merge().")

    def _warn(self, message: str) -> None:
        """Say ``message`` in this merge's report (and so its card and sidecar) and in the log."""
        self.report.warnings.append(message)
        logger.warning(message)

    def _new_report(self, now: list[str]) -> None:
        """A report for the merge about to run: the load's warnings and timing, the stage-1 feature timing (the
        features may come from an earlier compute_features call), and ``now``, the plan's setting-dependent
        warnings for this merge's config; nothing from an earlier merge."""
        timings = {k: v for k, v in self.report.timings.items() if k == "load"}
        if self._features_time is not None:  # features computed by this merger, maybe before an earlier merge
            timings["stage1_features"] = self._features_time
        # the plan's warnings for its own config, those that depend on editable settings again for this merge's
        fixed = [w for w in self.plan.warnings if w not in self.plan.config_warnings(self.plan.config)]
        for warning in now:
            if warning not in self.plan.warnings:  # the plan logged its own
                logger.warning(warning)
        self.report = MergeReport(method=self.config.method, vocab=dict(self.plan.vocab),
                                  warnings=fixed + now, timings=timings)
        self._report_unfinished = True  # until the merge finishes: sidecar() must not describe it
        self._task_vector_seen = False  # set by the merge's reads of the instruct task vector

    def _warn_without_task_vector(self) -> None:
        """Warn when every merged module's instruct task vector read by this merge was zero: the instruct model
        is base_model again (a copy, or the base's Hub id), or an adapter that was never trained."""
        if self._task_vector_seen:
            return
        what = ("The instruct adapter's ΔW = B·A is zero in every merged module (an adapter saved before training, "
                "with lora_B still at its zero init?)" if not isinstance(self.instruct, FullDelta) else
                "The instruct model equals base_model in every merged module (a copy of the base, or the base's "
                "name given as instruct_model?)")
        self._warn(f"{what}: there is no task vector to merge, and the merge "
                   f"adds no instruction following ({zero_task_vector_effect(self.config)}). Pass "
                   "the instruction-tuned model.")

    def _merged_keys(self) -> set[str]:
        keys = {t.weight_key for t in self.targets}
        if self.plan.config.project_bias:  # fixed by the plan (merge() refuses a change), whatever config says now
            keys |= {t.bias_key for t in self.targets if t.bias_key}
        return keys

    # ------------------------------------------------------------------ merge
    def merge(self, reasoning_calibration: CalibrationData | None = None,
              instruction_calibration: CalibrationData | None = None, **unknown: Any) -> torch.nn.Module:
        """Run the merge; returns the merged model (the loaded reasoning model, a transformers ``PreTrainedModel``,
        changed in place).

        Args:
            reasoning_calibration: stage-1 data — a JSON/JSONL path, a list of dicts or a ``datasets.Dataset``
                with ``prompt``/``reasoning``/``response`` (or prompts only: the reasoning model writes the rest).
                Not needed when features were given or computed before, or with ``stage1=False``.
            instruction_calibration: stage-2 data (the paper's IFEval-style format, or prompts only). Not
                needed with ``stage2=False``.

        The merge follows ``merger.config``, the merger's own copy of the config: to merge again with another λ
        or other stages, change it (``merger.config.lam = 1.0``) and call ``merge()`` again.
        """
        if unknown:
            settings = sorted(k for k in unknown if k in _FIELD_NAMES and k not in _PLAN_FIELDS)
            fixed = sorted(k for k in unknown if k in _PLAN_FIELDS)
            hint = (" (merge settings: set them on merger.config first, "
                    + "; ".join(f"merger.config.{k} = ..." for k in settings) + ")" if settings else "")
            hint += (f" ({', '.join(fixed)}: fixed by the plan; make a new RainMerger with that config)" if fixed
                     else "")
            raise _unexpected_arguments("merge", unknown, hint)
        cfg = self.config
        if self._given_config is not None:
            given, as_given = self._given_config
            edited = sorted(k for k, v in given.to_dict().items() if as_given.get(k) != v and getattr(cfg, k) != v)
            if edited:
                logger.warning("The RainMergingConfig passed to from_pretrained was changed afterwards (%s); the "
                               "merger merges with its own copy, merger.config: set merger.config.%s instead.",
                               ", ".join(f"{k}={getattr(given, k)!r}" for k in edited), edited[0])
                self._given_config = (given, given.to_dict())  # said once per edit, not at every later merge
        self._check_config()
        settings_warnings = self.plan.config_warnings(cfg)  # its refusals before reset(): a finished merge is kept
        self._check_output_dtypes()  # output_dtype may have changed since the merger was made
        self._refuse_missing_inputs(reasoning_calibration, instruction_calibration)  # before reset() too
        if self._touched:  # a finished merge, or one that failed half way
            self.reset()
        self._new_report(settings_warnings)
        self.calibration_info = {"reasoning": None, "instruction": None}
        if cfg.method != "rain" or not cfg.stage1:  # no features in this merge, whenever they were computed
            self.report.timings.pop("stage1_features", None)
        start = time.perf_counter()
        unused = [f"{kind}_calibration" for kind, data in (("reasoning", reasoning_calibration),
                                                           ("instruction", instruction_calibration))
                  if data is not None and not cfg.uses_calibration(kind)]
        for name in unused:
            self._warn(f"{name} was given but this merge does not use it (method={cfg.method}, "
                       f"stage1={cfg.stage1}, stage2={cfg.stage2}, lam={cfg.lam})")
        ignored = cfg.unused_settings()
        if ignored:
            hint = (f" method='slerp' mixes by slerp_t={cfg.slerp_t}: set slerp_t to move towards the instruct "
                    "model." if cfg.method == "slerp" and "lam" in ignored else "")
            context = [f"method={cfg.method}"]
            if cfg.method == "rain":
                context += [f"stage1={cfg.stage1}", f"stage2={cfg.stage2}", f"lam={cfg.lam}"]
                context += [f"projection={cfg.projection}"] if {"rcond", "ridge"} & set(ignored) else []
                context += [f"do_sample={cfg.do_sample}"] if {"temperature", "top_p"} & set(ignored) else []
            self._warn(
                "This merge does not read " + ", ".join(f"{k}={v!r}" for k, v in ignored.items())
                + f" ({', '.join(context)}): leave them out, or set what uses them.{hint}")
        if cfg.method != "rain":
            self._undo_on_failure(self._apply_baseline)
            self._warn_without_task_vector()
            # SLERP has no λ: its strength is slerp_t
            self.report.lam = float(cfg.lam) if not isinstance(cfg.lam, str) and cfg.method != "slerp" else None
            self.report.timings["merge"] = time.perf_counter() - start
            self._finished(cfg)
            return self.model

        heldout: list[tuple[list[int], list[int]]] = []  # lam="auto": where L_think is measured
        if cfg.lam == "auto" and not cfg.stage1:
            heldout = self._think_rows(self._prepare("reasoning", reasoning_calibration))
        if cfg.stage1:
            if reasoning_calibration is not None:
                if self.features is not None and self.features is self._given_features:
                    self._warn(
                        "reasoning_calibration was given to merge(), so the thinking features passed to "
                        "from_pretrained(features=...) are replaced by features of that data (and the merge may run "
                        "sequential); leave reasoning_calibration out to merge with the given features")
                self.compute_features(reasoning_calibration)
            else:  # features given or computed before, refused by _refuse_missing_inputs where they cannot serve
                # their own data, as compute_features recorded it (None for features from a file)
                self.calibration_info["reasoning"] = copy.deepcopy(self._features_calibration)
                for warning in self.features.settings.get("data_warnings", []):
                    self._warn(warning)  # drawn by the data the features were computed from
                for warning in self.features.settings.get("spacing_warnings", []):
                    self._warn(warning)  # found when the features were made
                self._check_features_model()
                if self.features.heldout and cfg.lam != "auto":
                    self._warn(
                        f"the thinking features were computed for lam='auto' and leave {len(self.features.heldout)} "
                        "reasoning calibration samples out of stage 1; pass reasoning_calibration=... to merge() to "
                        "project with all of them (with sequential=False for the one-shot projection these features "
                        "give; left unset, a merge given the samples runs sequential)")
            self.report.projection = "sequential" if self._sequential() else "one-shot"
            if cfg.sequential is None and self._stage1_samples is None:
                logger.info("Precomputed thinking features only: stage 1 uses the one-shot projection (pass "
                            "reasoning_calibration=... to merge() for the sequential one).")
                if cfg.sequential_offload:  # the config takes it with sequential unset, for a sequential run
                    self._warn("This merge does not read sequential_offload=True: with precomputed features only, "
                               "stage 1 runs the one-shot projection, which replays no layer (pass "
                               "reasoning_calibration=... to merge() for the sequential one).")
        self.report.layers = sorted({t.layer for t in self.targets})
        alpha, instruction_samples = None, []
        if cfg.stage2:
            t2 = time.perf_counter()
            instruction_samples = self._prepare("instruction", instruction_calibration)
            a, u = self._probe_attention(instruction_samples, cfg.probe_lam)
            alpha = head_coefficients(a, u, cfg.rho, cfg.coef_normalize, cfg.coef_min, cfg.coef_max)
            problem = coefficient_warning(a, u, cfg.rho, cfg.coef_normalize, alpha, cfg.coef_min, cfg.coef_max)
            if problem:
                self._warn(problem)
            unseen_rows = [i for i, row in enumerate(a) if bool(torch.isnan(row).all())]
            unseen = [self.report.layers[i] for i in unseen_rows]
            if unseen:
                fill = float(alpha[unseen_rows[0], 0])
                neutral = "stage 1 alone there" if fill == 1.0 else "the measured heads' mean"
                reach = local_attention(self.model.config)
                kinds = sorted({f"{'window' if r[0] == 'sliding' else 'chunk'} of {r[1]} tokens"
                                for layer in unseen if (r := reach[layer]) is not None})
                self._warn(
                    f"stage 2: in layers {unseen} the local attention ({', '.join(kinds)}) reaches the instruction "
                    "from no constrained-response token of the calibration data, so their heads were not measured "
                    f"and got α = {fill:.3g} ({neutral}); calibration samples whose responses start within reach "
                    "of the instruction measure them")
            # unmeasured heads are None in the report (JSON has no NaN)
            self.report.alignment = [[None if math.isnan(x) else x for x in row] for row in a.tolist()]
            self.report.leakage = [[None if math.isnan(x) else x for x in row] for row in u.tolist()]
            self.report.head_coefficients = alpha.tolist()
            self.report.timings["stage2_coefficients"] = time.perf_counter() - t2
        lam = cfg.lam
        if lam == "auto":  # timed apart, as "lam_auto"
            lam = self._choose_lambda(alpha, heldout if not cfg.stage1 else self.features.heldout,
                                      [s.input_ids for s in instruction_samples])
        t3 = time.perf_counter()
        self._undo_on_failure(lambda: self._apply_rain(float(lam), alpha, record=True, desc="merge"))
        self._warn_without_task_vector()
        self.report.lam = float(lam)
        self.report.timings["merge"] = time.perf_counter() - t3
        self._finished(cfg)
        return self.model

    def _finished(self, cfg: RainMergingConfig) -> None:
        """Record a merge that finished: its config and features are what the saved files describe."""
        self._merged_config = copy.deepcopy(cfg)
        self._merged_features = self.features if cfg.method == "rain" and cfg.stage1 else None
        self._report_unfinished = False
        self.merged = True

    def _refuse_missing_inputs(self, reasoning_calibration, instruction_calibration) -> None:
        """The refusals of :meth:`merge` for data it was not given, or for features that cannot serve without it:
        all made before the merge the model holds is undone, in the order the merge would meet them."""
        cfg = self.config
        if cfg.method != "rain":
            return
        if reasoning_calibration is None and not cfg.stage1 and cfg.lam == "auto":
            raise ValueError("lam='auto' measures L_think on reasoning calibration samples: pass "
                             "reasoning_calibration=... to merge(), or set lam to a number.")
        if reasoning_calibration is None and cfg.stage1:  # the features given, or computed before
            if self.features is None:
                raise ValueError("Stage 1 needs thinking features: pass reasoning_calibration=..., or features=... "
                                 "to from_pretrained, or set RainMergingConfig(stage1=False).")
            # the sequential form recomputes every basis in cfg.precision; only the one-shot projection and the
            # stage-2 probe project with these features' own
            self.features.check_compatible(cfg, [t.name for t in self.targets],
                                           projects=not self._sequential() or cfg.stage2)
            self._refuse_features_of_another_model()
            if cfg.lam == "auto" and not self.features.heldout:  # before stage 2's attention pass, not after
                raise ValueError("lam='auto' measures L_think on reasoning calibration samples held out of stage 1, "
                                 "and these thinking features were computed without any (with a numeric lam): pass "
                                 "reasoning_calibration=... to merge(), or set lam to a number.")
            if cfg.sequential and self._stage1_samples is None:
                raise ValueError("sequential=True captures thinking features on the partly merged model, so it needs "
                                 "the reasoning calibration samples, not only precomputed features: pass "
                                 "reasoning_calibration=... to merge(), or leave sequential unset.")
        if cfg.stage2 and instruction_calibration is None:
            raise ValueError("Stage 2 needs instruction calibration data: pass instruction_calibration=... or set "
                             "RainMergingConfig(stage2=False).")

    def _probe_attention(self, samples: list[CalibrationSample], probe_lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Alignment and leakage [len(report.layers), H] of the probe model θ_R + probe_lam·Δ⊥ (then reset)."""
        # The probe only ranks heads by attention: the one-shot Δ⊥ serves it at a fraction of the sequential cost.
        with self._reset_after():
            self._apply_rain(probe_lam, None, record=False, desc="stage 2: probe model", one_shot=True)
            try:
                return collect_attention_stats(self.model, samples, self.report.layers, self.config.batch_size,
                                               self._pad_id())
            except NonFiniteFeaturesError as exc:
                raise NonFiniteFeaturesError(
                    f"{exc} This was the stage-2 probe model θ_R + probe_lam·Δ with probe_lam={probe_lam}: lower "
                    "probe_lam, or merge in a wider dtype (torch_dtype='float32', or 'bfloat16' for float16 "
                    "weights).") from None

    def _hold_out(self, samples: list[CalibrationSample]) -> tuple[list[CalibrationSample], list[CalibrationSample]]:
        """(stage-1 samples, held-out samples) for ``lam="auto"`` (:func:`~rain_hf.calibration.lam_auto_holdout`)."""
        with collect_calibration_warnings() as said:  # a larger hold-out than asked: the card says what was used
            split = lam_auto_holdout(samples, self.config.lam_auto_holdout, self.config.seed)
        self.report.warnings.extend(said)
        self._reasoning_data_warnings.extend(said)  # kept with the features, which hold the held-out rows
        return split

    def _think_rows(self, samples: list[CalibrationSample]) -> list[tuple[list[int], list[int]]]:
        """(token ids, thinking positions) of each sample, as L_think reads them."""
        cfg = self.config
        return [(list(s.input_ids), s.think_positions(cfg.positions, cfg.window)) for s in samples]

    def _l_think_rows(self, heldout: list[tuple[list[int], list[int]]]) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Token ids and positions where ``lam="auto"`` measures L_think: the thinking positions of each held-out
        sample but the one whose next token is the answer's first (the think-close token's own, or the last
        whitespace token after it where the layout writes some, as ``think_spacing``'s "\\n\\n"), and those whose
        next token the prompt gives (the chat template's tokens before the think-open decision, and the think-open
        token and the whitespace after it where the template writes them, as R1-Distill's ``<think>\\n``). Format
        instructions act at the answer's first token (capitals, quotation marks, a start phrase), so a KL taken
        there grows with the instruction following that λ is meant to maximise, not with damage to the thinking
        format; and a prediction of a token the prompt supplies never shapes a generation."""
        open_id, close_id = self.plan.think_token_ids
        # the first position the model's own output follows: the think-open decision (the position before
        # <think>), or the last token of a template's "<think>" or "<think>\\n" (think_open is a plan field)
        after_open = -1 if self.plan.think_tail is None else self.plan.think_tail
        ids, positions = [], []
        for sample_ids, sample_positions in heldout:
            opened = _think_open_at(sample_ids, open_id)
            start = 0 if opened is None else opened + after_open
            before_answer = self._answer_start(sample_ids, close_id) - 1
            ids.append(torch.tensor(sample_ids))
            positions.append([p for p in sample_positions if p >= start and p != before_answer])
        if not any(positions):  # the think tokens alone, a template that writes "<think>\\n" and nothing after </think>
            raise ConfigError(_NO_L_THINK_POSITION.format(setting=_position_setting(self.config)))
        return ids, positions

    def _answer_start(self, ids: Sequence[int], close_id: int) -> int:
        """Index of the answer's first token: the first after the last think-close token that is not whitespace
        alone (the layout's spacing is not the answer); 0 without a think-close token (no position is before it)."""
        closed = next((i for i in range(len(ids) - 1, -1, -1) if ids[i] == close_id), None)
        if closed is None:
            return 0
        return next((i for i in range(closed + 1, len(ids)) if not self._whitespace_token(ids[i])), len(ids))

    def _whitespace_token(self, token: int) -> bool:
        """Whether a token decodes to whitespace alone (the layout's spacing around the think tags), cached."""
        if token not in self._blank_tokens:
            self._blank_tokens[token] = not self.tokenizer.decode([token]).strip()
        return self._blank_tokens[token]

    def _think_open_prefixes(self, sequences: list[list[int]]) -> list[list[int]]:
        """Each sequence up to its think-open token, when the model itself decides whether to think there: none
        when the chat template already ends with the think-open token, or when the guard is off."""
        if self.config.lam_auto_min_think_open is None:
            return []
        if self.plan.think_tail is not None:  # the template opens the block itself
            logger.info("lam=auto: the chat template opens the think block itself, so no think-open decision is "
                        "checked.")
            return []
        open_id = self.plan.think_token_ids[0]
        starts = [_think_open_at(ids, open_id) for ids in sequences]
        return [ids[:start] for ids, start in zip(sequences, starts) if start]

    def _choose_lambda(self, alpha: torch.Tensor | None, heldout: list[tuple[list[int], list[int]]],
                       instruction_ids: Sequence[list[int]] = ()) -> float:
        """λ = the largest grid value whose L_think on held-out reasoning samples stays ≤ lam_auto_max_kl and whose
        think-open share (:func:`think_open_share`) stays ≥ lam_auto_min_think_open.

        Instruction following grows with λ along the grid, so the largest λ within the thinking-format budget is
        the calibration-only answer to "maximise instruction following subject to L_think ≤ δ". ``heldout`` is
        never empty: :meth:`merge` refuses features without held-out samples before stage 2.
        """
        cfg = self.config
        from .evaluation import kl_rows, think_log_probs, think_open_share

        start = time.perf_counter()
        ids, positions = self._l_think_rows(heldout)
        prefixes = self._think_open_prefixes([list(sample_ids) for sample_ids, _ in heldout] + list(instruction_ids))
        open_id = self.plan.think_token_ids[0]

        def log_probs() -> torch.Tensor:
            return think_log_probs(self.model, ids, positions, cfg.batch_size, self._pad_id())

        def first_choices() -> torch.Tensor:
            """The greedy next token after each prefix [len(prefixes)]."""
            if not prefixes:
                return torch.empty(0, dtype=torch.long)
            return think_log_probs(self.model, [torch.tensor(p) for p in prefixes], [[len(p) - 1] for p in prefixes],
                                   cfg.batch_size, self._pad_id()).argmax(-1)

        reference, reference_choices = log_probs(), first_choices()
        if not bool(torch.isfinite(reference.max(dim=-1).values).all()):  # -inf entries are masked tokens
            raise CheckpointError(
                "lam='auto': the reasoning model's own next-token probabilities at the held-out calibration samples "
                "hold NaN or infinite values, so L_think cannot be measured: check the reasoning checkpoint, or load "
                "it in float32 (bfloat16 or float16 activations can overflow).")
        opened = int((reference_choices == open_id).sum())
        if prefixes and opened < len(prefixes) / 2:  # a reasoning model opens it on (nearly) every prompt
            self._warn(
                f"lam=auto: the reasoning model opens the think block first on {opened} of {len(prefixes)} "
                "calibration prompts; check that it is a reasoning model and that the models are passed in order "
                "(base_model, reasoning_model, instruct_model)."
                + (" No think-open decision is checked." if not opened else ""))
        search, chosen = [], None
        with self._reset_after():
            for lam in sorted(set(cfg.lam_grid)):
                try:
                    self._apply_rain(float(lam), alpha, record=False, desc=f"lam=auto: λ={lam}")
                except NonFiniteFeaturesError as exc:
                    if not self._sequential():
                        raise
                    # the partly merged model overflowed part way: that λ fails the budget, as a NaN L_think does
                    logger.warning("lam=auto: λ=%s fails the budget: %s", lam, exc)
                    search.append({"lam": float(lam), "l_think": None, "think_open": None, "within_budget": False})
                    continue
                kl = float(kl_rows(log_probs(), reference).mean())
                share = think_open_share(reference_choices, first_choices(), open_id)
                # a NaN (overflowing activations) fails the budget, and is null in the sidecar: JSON has no NaN
                search.append({"lam": float(lam), "l_think": kl if math.isfinite(kl) else None, "think_open": share})
                search[-1]["within_budget"] = self._passes(search[-1])
                logger.info("lam=auto: λ=%s L_think=%.4g%s", lam, kl,
                            "" if share is None else f" think-open share={share:.3f}")
                if search[-1]["within_budget"]:
                    chosen = float(lam)
        if chosen is not None and chosen == float(max(cfg.lam_grid)):
            self._warn(f"lam='auto': the largest λ of the grid, {chosen}, keeps L_think within "
                       f"{cfg.lam_auto_max_kl} (L_think {search[-1]['l_think']:.3g}); a larger λ "
                       "may too: extend lam_grid to search further.")
        if chosen is None:
            chosen = float(min(cfg.lam_grid))
            # the think-open share is only checked where it was measured (not with a template that writes <think>)
            checked = cfg.lam_auto_min_think_open is not None and any(row["think_open"] is not None for row in search)
            guard = f" with a think-open share ≥ {cfg.lam_auto_min_think_open}" if checked else ""
            self._warn(f"lam='auto': no λ of the grid keeps L_think ≤ {cfg.lam_auto_max_kl}"
                       f"{guard}; using the smallest, {chosen}")
        else:
            failed_below = [row["lam"] for row in search if row["lam"] < chosen and not self._passes(row)]
            if failed_below:
                self._warn(
                    f"lam='auto': λ {chosen:g} passed but the smaller {', '.join(f'{v:g}' for v in failed_below)} did "
                    "not: the budget is not monotone in λ on these samples (a noisy L_think or think-open share); "
                    "more held-out samples or a finer lam_grid would make the pick steadier.")
        if chosen == 0:
            self._warn("lam='auto' picked λ 0: the merged model is the reasoning model.")
        self.report.lam_search = search
        self.report.timings["lam_auto"] = time.perf_counter() - start
        return chosen

    def _template_opens_think(self, config: RainMergingConfig) -> bool | None:
        """:func:`template_opens_think` for the card (with the config the saved files describe), or None where the
        tokenizer has no usable chat template (a baseline merge does not need one)."""
        try:
            return template_opens_think(self.tokenizer, config)
        except Exception:  # noqa: BLE001 - CalibrationError, a jinja error …: the card then says nothing of it
            return None

    def _passes(self, row: dict[str, Any]) -> bool:
        """Whether one ``lam_search`` row keeps L_think and the think-open share within the config's budget."""
        cfg = self.config
        share = row["think_open"]
        guard = cfg.lam_auto_min_think_open
        kl = row["l_think"]
        return kl is not None and kl <= cfg.lam_auto_max_kl and (guard is None or share is None or share >= guard)

    # ------------------------------------------------------------------ saving
    def sidecar(self) -> dict[str, Any]:
        """The content of ``rain_merging_config.json``: config, inputs, versions, report (before any merge, of the
        merger's config; refused once a merge was made but the model no longer holds it)."""
        if not self.merged and (self._merged_config is not None or self._report_unfinished):
            # the last finished merge's config beside a failed merge's report and calibration would describe neither
            raise RuntimeError(_NO_FINISHED_MERGE.format(what="describe"))
        import huggingface_hub
        import peft
        import safetensors
        import transformers

        inputs = {role: self.sources[role].to_dict() for role in _ROLES}
        for entry in inputs.values():
            # the sidecar is published with the weights: this machine's resolved folders (home paths, cache
            # folders) stay out; inputs are named as they were given, or by hub id and revision
            entry["path"] = None
            if entry["hub_id"] and Path(entry["name_or_path"]).expanduser().is_dir():
                entry["name_or_path"] = entry["hub_id"]
        inputs["instruct"]["kind"] = self.plan.instruct_kind
        record = self._record_config()
        config = record.to_dict()
        return {
            "rain_hf_version": __version__,
            "library_versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "peft": peft.__version__, "safetensors": safetensors.__version__,
                                 "huggingface_hub": huggingface_hub.__version__},
            "method": config["method"],
            "lam": self.report.lam,
            "loaded_dtype": str(self.model.dtype).replace("torch.", ""),  # features and attention were taken in it
            # decode(skip_special_tokens=True) drops special tokens: the card's snippet must not hide the thinking
            "think_tokens_special": any(getattr(self.tokenizer.added_tokens_decoder.get(i), "special", False)
                                        for i in self.plan.think_token_ids),
            # the generation prompt ends with think_open (R1-Distill): generations start inside the block
            "template_opens_think": self._template_opens_think(record),
            "config": config,
            "inputs": inputs,
            "calibration": self._calibration_summary(record),
            "report": {"timings": self.report.timings, "modules": self.report.modules,
                       "head_coefficients": self.report.head_coefficients, "layers": self.report.layers,
                       "alignment": self.report.alignment, "leakage": self.report.leakage,
                       "lam_search": self.report.lam_search, "projection": self.report.projection,
                       "replay_cache_bytes": self.report.replay_cache_bytes, "vocab": self.report.vocab,
                       "warnings": self.report.warnings},
            **_merged_license({role: self.sources[role] for role in _ROLES}),
        }

    def _record_config(self) -> RainMergingConfig:
        """The config the saved files describe: the merged one, with the save options as they are now."""
        if self._merged_config is None:
            return self.config
        record = copy.deepcopy(self._merged_config)
        for name in _SAVE_FIELDS:
            setattr(record, name, getattr(self.config, name))
        return record

    def _calibration_summary(self, cfg: RainMergingConfig | None = None) -> dict[str, dict | None]:
        """What the recorded merge (``cfg``, default :meth:`_record_config`) read from each calibration set."""
        info = {kind: dict(entry) if entry else entry for kind, entry in self.calibration_info.items()}
        cfg = cfg or self._record_config()
        auto = cfg.lam == "auto"
        # a finished merge's own features, whatever merger.features was set to since
        features = self.features if self._merged_config is None else self._merged_features
        if info["reasoning"] is None and features is not None and cfg.method == "rain" and cfg.stage1:
            projected, held = features.settings.get("num_samples"), len(features.heldout)
            origin = features.settings.get("calibration") or {}
            info["reasoning"] = {  # the count as the calibration set had it: projected + held out, when both count
                "num_samples": projected + held if auto and projected is not None else projected,
                "source": PRECOMPUTED_FEATURES_SOURCE,
                "reasoning_fingerprint": features.settings.get("reasoning_fingerprint"),
                # the set the features were computed from (features saved before this was recorded: unknown)
                "computed_from": origin.get("source"), "sha256": origin.get("sha256"),
                "file_sha256": origin.get("file_sha256")}
            if auto and held:
                info["reasoning"]["num_held_out"] = held
            elif held:  # features for lam="auto" reused at a numeric λ: the held-out samples were not projected
                info["reasoning"]["held_out_not_projected"] = held
        elif info["reasoning"] and not auto and info["reasoning"].get("num_held_out"):
            # λ was set to a number since, and the features are reused: they project the samples not held out
            held = info["reasoning"].pop("num_held_out")
            info["reasoning"]["num_samples"] -= held
            info["reasoning"]["held_out_not_projected"] = held
        return info

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        max_shard_size: int | str | None = None,
        overwrite: bool = False,
        card_template: str | os.PathLike | None = None,
        eval_results: list | None = None,
        model_id: str | None = None,
        model_revision: str | None = None,
        **unknown: Any,
    ) -> Path:
        """Write the merged model as a Hugging Face folder (loadable with ``AutoModelForCausalLM``).

        Sharded safetensors (byte-based ``max_shard_size``), config and generation config of the reasoning model,
        its tokenizer and chat template, ``rain_merging_config.json`` and a model card. The folder is written
        elsewhere and moved into place at the end: an error or Ctrl-C leaves nothing behind, and an existing
        folder is replaced only with ``overwrite=True`` (an empty one is filled), and only if it is an earlier
        output (it holds ``rain_merging_config.json``): other folders, the current directory and the home
        folder are refused rather than deleted.

        ``model_id`` is what the card's usage snippet loads: pass the Hub repository you will push the folder to
        with :func:`rain_hf.hub.push_folder` (default: ``save_directory`` as given, with ``~`` expanded), and
        ``model_revision`` the branch, if not main. Returns the folder's path (``~`` expanded).
        """
        if unknown:
            raise _unexpected_arguments("save_pretrained", unknown, _habit_hints(unknown, _SAVE_HABITS))
        if not self.merged:
            if self._merged_config is None:
                raise RuntimeError("Nothing to save yet: call merge() first.")
            raise RuntimeError(_NO_FINISHED_MERGE.format(what="save"))
        edited = [k for k, v in vars(self._merged_config).items()
                  if k not in _SAVE_FIELDS and _as_list(getattr(self.config, k)) != _as_list(v)]
        if edited:
            was = self._merged_config.output_dtype
            rounded = (f" (rounded to and saved in {was!r})" if was else
                       " (saved in the checkpoint's own dtypes, which its merged weights were rounded to)") \
                if "output_dtype" in edited else ""
            fixed = [k for k in edited if k in _PLAN_FIELDS]
            apply = (f"make a new RainMerger with {fixed[0]} changed (merge() refuses it)" if fixed
                     else "call merge() to apply the changes")
            logger.warning("merger.config was changed after the last merge (%s); the saved model is that merge%s, "
                           "and its card and rain_merging_config.json describe it: %s.",
                           "; ".join(f"{k}: {getattr(self._merged_config, k)!r} → {getattr(self.config, k)!r}"
                                     for k in edited), rounded, apply)
        clash = input_folder_in(save_directory, self.sources)
        if clash:  # overwriting an input would also make every later merge read the merged weights as θ_R/θ_B/θ_I
            raise ConfigError(f"save_directory {str(save_directory)!r} is (or holds) the {clash[0]} model's folder "
                              f"{clash[1]}: saving there would replace an input. Choose another folder.")
        merged_with = self._merged_config  # the saved model is the last merge, in the dtypes it was rounded to
        self.report.timings.pop("save", None)  # the sidecar is written before this save's time is known
        start = time.perf_counter()
        shard_size = parse_size(max_shard_size if max_shard_size is not None else self.config.max_shard_size)
        keys = self.reasoning.keys()
        specs = [TensorSpec(k, self.reasoning.shape(k), self._output_dtype(k, merged_with)) for k in keys]
        merged = self._merged_keys()
        params = self._params()
        src = self.sources["reasoning"].path
        with _full_disk_named(save_directory, sum(spec.nbytes for spec in specs)), \
                atomic_directory(save_directory, overwrite=overwrite, marker=CONFIG_NAME) as tmp:
            # sidecar and card first: a bad template fails before the shards are written, not after
            info = self.sidecar()
            if max_shard_size is not None:  # what this save used, so that the card's YAML reproduces it
                info["config"]["max_shard_size"] = max_shard_size
            with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2)
                f.write("\n")
            write_model_card(tmp, info, template_path=card_template, eval_results=eval_results,
                             model_id=model_id or str(Path(save_directory).expanduser()),
                             model_revision=model_revision)
            writer = ShardedSafetensorsWriter(tmp, specs, shard_size)
            try:
                for spec in tqdm(writer._order, desc="save", unit="tensor"):
                    if spec.name in merged:
                        tensor = params[spec.name].detach().to("cpu", spec.dtype)
                    else:
                        tensor = self.reasoning.get(spec.name).to(spec.dtype)
                    if spec.dtype == torch.float16 and (spec.name in merged or
                                                        self.reasoning.dtype(spec.name) != torch.float16):
                        _check_fits_float16(spec.name, tensor,
                                            spec.name in merged and params[spec.name].dtype == torch.float16)
                    writer.write(spec.name, tensor)
                    del tensor  # else the next read would hold two of the largest tensors (embeddings, LM head)
                writer.close()
            finally:
                writer.abort()
            model_config = read_json(src / "config.json", "the reasoning model")
            if merged_with.output_dtype is not None:
                model_config["dtype"] = merged_with.output_dtype
                model_config.pop("torch_dtype", None)
            with open(tmp / "config.json", "w", encoding="utf-8") as f:
                json.dump(model_config, f, indent=2, sort_keys=True)
                f.write("\n")
            if _copyable(src, src / "generation_config.json"):
                (tmp / "generation_config.json").write_bytes((src / "generation_config.json").read_bytes())
            # the merge redistributes the reasoning model's weights (its licence), and config.json's auto_map still
            # names its code
            for file in [*license_files(src), *remote_code_files(src, model_config)]:
                (tmp / file.name).write_bytes(file.read_bytes())
            copy_tokenizer_files(src, tmp, self.tokenizer)
        self.report.timings["save"] = time.perf_counter() - start
        return Path(save_directory).expanduser()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = None,
        save_directory: str | os.PathLike | None = None,
        overwrite: bool = False,
        card_template: str | os.PathLike | None = None,
        eval_results: list | None = None,
        **unknown: Any,
    ) -> CommitInfo:
        """Save the merged model (to ``save_directory``, or a temporary folder deleted after the upload) and upload
        it in one commit; returns the commit's ``huggingface_hub.CommitInfo`` (its ``commit_url``, ``pr_url``).
        The arguments after ``repo_id`` are keyword-only, as in transformers' ``push_to_hub`` (a commit message
        passed second is refused rather than taken for ``private``). ``overwrite``,
        ``card_template`` and ``eval_results`` are passed to :meth:`save_pretrained`; the card's usage snippet
        loads ``repo_id`` (with your namespace when the id has none and the token says who you are) at
        ``revision``.

        Example:
            >>> merger.push_to_hub("my-user/r1-rain", private=True, save_directory="r1-rain")  # doctest: +SKIP
        """
        from .hub import HubError, check_private, check_push_target, namespaced_repo_id, push_folder

        if unknown:
            raise _unexpected_arguments("push_to_hub", unknown, _habit_hints(unknown, _PUSH_HABITS))
        check_private(private)  # before a save that may take minutes and gigabytes
        check_push_target(repo_id, revision)
        scratch = None
        if save_directory is None:
            scratch = tempfile.TemporaryDirectory(prefix="rain_hf-push-")
            save_directory = Path(scratch.name) / repo_id.replace("/", "--")
        try:
            folder = self.save_pretrained(save_directory, max_shard_size=max_shard_size, overwrite=overwrite,
                                          card_template=card_template, eval_results=eval_results,
                                          model_id=namespaced_repo_id(repo_id, token), model_revision=revision)
            try:
                message = commit_message or f"Upload {self._record_config().method} merge made with rain_hf"
                return push_folder(folder, repo_id, private=private, token=token, revision=revision,
                                   commit_message=message, commit_description=commit_description,
                                   create_pr=create_pr)
            except HubError as exc:
                if scratch is None:
                    raise
                # the temporary copy is about to go: point at what keeps one instead of at a deleted folder
                raise HubError(f"{exc.reason} The merged model was saved to a temporary folder, which is deleted "
                               "now; pass save_directory= to keep a copy that rain_hf.hub.push_folder can push "
                               "again.", repo_id=exc.repo_id, folder=None, status_code=exc.status_code,
                               reason=exc.reason) from exc
        finally:
            if scratch is not None:
                scratch.cleanup()


def _card_license(folder: Path) -> dict[str, str]:
    """``license`` (with ``license_name`` / ``license_link`` when given) from a model folder's card metadata."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(str(readme)).data.to_dict()
    except Exception:  # a malformed card only costs us the licence field
        return {}
    if not isinstance(data.get("license"), str):
        return {}
    return {key: str(data[key]) for key in ("license", "license_name", "license_link") if data.get(key)}


_LICENSE_FILE = re.compile(rf"({'|'.join(LICENSE_NAMES)})([._-].*)?", re.IGNORECASE)
# a tokenizer's own files, as transformers and sentencepiece/tiktoken/Mistral tokenizers store them
_TOKENIZER_FILE = re.compile(r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab.*|merges\.txt|"
                             r".*\.model|.*\.tiktoken|.*tekken.*\.json|chat_template.*)")


def _think_open_at(ids: Sequence[int], open_id: int) -> int | None:
    """Index of the think-open token that opens the block: the last one (a prompt may quote the token, the
    thinking and answer may not); ``None`` without one."""
    return len(ids) - 1 - list(ids)[::-1].index(open_id) if open_id in ids else None


_CALIBRATION_WARNINGS_SHOWN = 5


def _file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _link_root(folder: Path) -> Path:
    """The folder a model folder's links may point into: itself, or for a Hub cache snapshot
    (``models--org--name/snapshots/<sha>``) the repository's cache folder, whose ``blobs/`` its files link to."""
    folder = folder.absolute()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.resolve()
    return folder.resolve()


def _copyable(folder: Path, path: Path) -> bool:
    """Whether ``path`` in the input model folder ``folder`` is a file to copy into the merge: not a link to
    something outside the folder (a planted ``LICENSE -> ~/.cache/huggingface/token`` would be saved and pushed)."""
    return path.is_file() and _inside(folder, path)


def _in_own_file_store(folder: Path, path: Path) -> bool:
    """Whether the resolved ``path`` lies in the store that the model folder ``folder`` links its own files into:
    the Hub cache's ``models--*/blobs`` its ``config.json`` or weights link into (huggingface_hub's old
    ``local_dir`` links, which for large files only are the weights), or git-annex's objects or DVC's cache of a
    repository that holds the folder. Another repository's blobs are not the model's (a link could publish a
    private model's files)."""
    parts = path.parts
    for i, name in enumerate(parts):
        if name == "blobs" and i and parts[i - 1].startswith("models--"):
            own = [folder / "config.json", *folder.glob("*.safetensors")]
            return any(f.is_symlink() and f.resolve().parent == Path(*parts[:i + 1]) for f in own)
        if parts[i:i + 3] == (".git", "annex", "objects") or parts[i:i + 2] == (".dvc", "cache"):
            return folder.resolve().is_relative_to(Path(*parts[:i]))
    return False


def _inside(folder: Path, path: Path) -> bool:
    """Whether ``path`` resolves into ``folder`` (see :func:`_link_root`) or into its file store (see
    :func:`_in_own_file_store`); warn about one that does not."""
    resolved = path.resolve()
    if resolved.is_relative_to(_link_root(folder)) or (path.is_file() and _in_own_file_store(folder, resolved)):
        return True
    logger.warning("%s in the reasoning model's folder links to %s, outside the folder: it is not copied into the "
                   "merge. Copy it into the folder if it belongs to the model.",
                   path.relative_to(folder) if path.is_relative_to(folder) else path.name, resolved)
    return False


def license_files(folder: Path) -> list[Path]:
    """The top-level licence files of a model folder (``LICENSE``, ``LICENCE.txt``, ``license.md``, ``COPYING``,
    ``NOTICE``, ``USE_POLICY.md``, in any case), copied into a merge of it; links to files outside it are left out."""
    return sorted(p for p in folder.iterdir() if _LICENSE_FILE.fullmatch(p.name) and _copyable(folder, p))


def copy_tokenizer_files(folder: Path, out: Path, tokenizer: Any) -> None:
    """Copy the reasoning model's tokenizer into a merge of it byte for byte (``tokenizer.json``,
    ``tokenizer_config.json``, a sentencepiece ``tokenizer.model``, ``chat_template.jinja``,
    ``additional_chat_templates/`` …): saving the loaded tokenizer instead would write what this transformers
    version made of it (another class name, files dropped, keys added), which other versions may load differently.
    Where the copies do not load back as the same tokenizer (a file under a name not known here), ``tokenizer``
    is saved over them instead."""
    names = set(getattr(tokenizer, "vocab_files_names", {}).values())  # the files this tokenizer class reads
    for file in folder.iterdir():
        if (_TOKENIZER_FILE.fullmatch(file.name) or file.name in names) and _copyable(folder, file):
            (out / file.name).write_bytes(file.read_bytes())
    templates = folder / "additional_chat_templates"
    if templates.is_dir() and _inside(folder, templates):

        def outside(directory: str, entries: list[str]) -> list[str]:  # links out of the folder are not copied
            return [name for name in entries if not _inside(folder, Path(directory) / name)]

        shutil.copytree(templates, out / templates.name, dirs_exist_ok=True, ignore=outside)
    if not _same_tokenizer(out, tokenizer):
        logger.warning("The reasoning model's tokenizer files, copied, do not load back as its tokenizer: the merged "
                       "folder gets the tokenizer as this transformers version saves it.")
        tokenizer.save_pretrained(str(out))


def _same_tokenizer(folder: Path, tokenizer: Any) -> bool:
    """Whether ``folder`` loads as a tokenizer with ``tokenizer``'s vocabulary and chat template."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception:  # noqa: BLE001 - any failure to load means the copy is not usable as it is
        return False
    return loaded.get_vocab() == tokenizer.get_vocab() and loaded.chat_template == tokenizer.chat_template


def remote_code_files(folder: Path, model_config: dict) -> list[Path]:
    """The top-level Python files of a model folder whose ``config.json`` or ``tokenizer_config.json`` has an
    ``auto_map`` (code loaded with ``trust_remote_code=True``), so that a merge of it loads the same way; a module
    the map names that the folder lacks is warned about."""
    maps = [model_config.get("auto_map")]
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        with contextlib.suppress(ValueError, OSError):
            maps.append(json.loads(tokenizer_config.read_text(encoding="utf-8")).get("auto_map"))
    named = set()
    for auto_map in maps:
        if not isinstance(auto_map, dict):
            continue
        for value in auto_map.values():
            for reference in value if isinstance(value, list) else [value]:
                # "module.Class", or "org/repo--module.Class" for code that lives in another repository
                if isinstance(reference, str) and "--" not in reference and "." in reference:
                    named.add(reference.rsplit(".", 1)[0] + ".py")
    if not named:
        return []
    missing = sorted(name for name in named if not (folder / name).is_file())
    if missing:
        logger.warning("The reasoning model's auto_map names %s, which its folder lacks: the merged folder loads "
                       "with trust_remote_code=True only once you add it.", ", ".join(missing))
    return sorted(p for p in folder.glob("*.py") if _copyable(folder, p))


def _input_license_link(link: str | None, role: str, source: ModelSource) -> str | None:
    """An input card's ``license_link`` as the merged card can use it: a link relative to the input repository
    (``LICENSE``) would resolve in the merged repository instead, so it becomes the input's file at its recorded
    revision; a local input's relative link stays only where the merge ships the file (the reasoning model's
    licence files), and goes otherwise."""
    if not link or "://" in link or link.startswith(("mailto:", "#")):
        return link or None
    relative = link.removeprefix("./")
    if source.hub_id:
        return f"https://huggingface.co/{source.hub_id}/blob/{source.revision or 'main'}/{relative}"
    if role == "reasoning" and (source.path / relative) in license_files(source.path):
        return relative
    return None


def _merged_license(sources: Mapping[str, ModelSource]) -> dict[str, Any]:
    """The merged model's licence fields: the inputs' licence when every input that states one states the same
    (``license``, and ``license_name`` for ``other``), otherwise none (the merge is bound by each of them, listed
    in ``input_licenses``). A ``license_link`` is kept when every input gives the same one (repos link their own
    copy of one licence), else the reasoning model's; links relative to an input's repository are rewritten
    (:func:`_input_license_link`)."""
    licenses = {}
    for role, source in sources.items():
        found = _card_license(source.path)
        if found:
            link = _input_license_link(found.pop("license_link", None), role, source)
            licenses[role] = {**found, **({"license_link": link} if link else {})}
    kinds = {(entry["license"], entry.get("license_name")) for entry in licenses.values()}
    if len(kinds) != 1:
        return {"license": None, "license_name": None, "license_link": None, "input_licenses": licenses}
    (license, name), = kinds
    links = {entry.get("license_link") for entry in licenses.values()}
    # one link for all, or else the reasoning model's own (a licence "other" needs one on the Hub)
    link = links.pop() if len(links) == 1 else (licenses.get("reasoning") or {}).get("license_link")
    return {"license": license, "license_name": name, "license_link": link, "input_licenses": licenses}
