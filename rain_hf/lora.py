"""A peft LoRA adapter as a task vector: ΔW per base-model module, computed from the adapter's own tensors.

The instruct model of a merge may be a LoRA adapter on the base model instead of a full checkpoint. Its task
vector is, per adapted module, ``ΔW = scaling · B @ A`` (transposed for GPT-2 style ``Conv1D`` weights), with
``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) and ``r`` / ``alpha`` overridden per module by
``rank_pattern`` / ``alpha_pattern``. :class:`LoraDelta` reads the factors lazily from ``adapter_model.safetensors``
and builds one ΔW at a time: no merged copy of the model is ever made.

Conventions follow peft (checked against peft 0.21 and 0.22): saved keys are
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` without the adapter name; ``lora_A`` is
``[r, in]`` and ``lora_B`` is ``[out, r]``; a pattern key ``p`` applies to a module name ``m`` when
``re.match(rf"(.*\\.)?({p})$", m)`` succeeds, the first matching key in the saved config's order winning
(``peft.utils.other.get_pattern_key``; peft 0.21 saves the keys sorted, 0.22 in the order they were given). For a
linear weight adapted through ``target_parameters`` the name matched is the parameter's, ``m + ".weight"``.

What is refused (:class:`AdapterError`) and what is only reported (warnings from :meth:`LoraDelta.validate`):

- refused: another ``peft_type``; DoRA (its magnitude vector makes the merged weight depend on the base weight);
  initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, Astra) unless converted to
  plain LoRA; ``layer_replication``; aLoRA, QALoRA, BD-LoRA, Arrow, KaSA; LoRA on convolutions; a ``lora_A`` without
  its ``lora_B`` (or the reverse); a ``.bin``-only adapter.
- merged as peft's ``merge_and_unload`` applies them: plain LoRA (VeLoRA, MonteCLoRA and MiCA adapters too: peft
  merges their B·A as plain LoRA's), ``target_parameters`` on linear weights, ``modules_to_save`` copies of merged
  linear layers (copy − base) and trained biases (``bias="all"`` / ``"lora_only"``, ``scaling·lora_B.bias`` for
  ``lora_bias``; biases only with ``project_bias=True``).
- warned and ignored: LoRA on embeddings and on the output layer (never merged), ``target_parameters`` on fused
  expert weights (which a merge never reads), copies of modules outside the merged set (embeddings, norms, the
  output layer), ``trainable_token_indices``, any other non-LoRA tensor; and, in an adapter written before peft
  0.22 (sorted keys) or by an unknown version, ``alpha_pattern`` keys with different values that match one module.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PureWindowsPath

import torch

from rain_hf.checkpoints import (
    _CACHE_SNAPSHOT,
    ADAPTER_PATTERNS,
    CheckpointError,
    LazyCheckpoint,
    ModelSource,
    TensorSource,
    is_adapter_folder,
    read_json,
    resolve_model,
    snapshot_repo_id,
    work_dtype,
)

logger = logging.getLogger(__name__)

__all__ = ["AdapterError", "LoraDelta", "is_lora_adapter"]

#: The prefix peft's PeftModel puts before the wrapped model's module names in a saved adapter.
PEFT_PREFIX = "base_model.model."
#: Last name component of output-embedding modules (LoRA there is never merged, like embeddings).
OUTPUT_EMBEDDING_NAMES = ("lm_head", "embed_out")

_LORA_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_LORA_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_[AB]$")
_LORA_BIAS = re.compile(r"^(?P<module>.+)\.lora_B\.bias$")
_DORA_MAGNITUDE = "lora_magnitude_vector"
#: Buffers peft saves beside the factors that only training uses (VeLoRA's projection for the backward pass):
#: ΔW is still scaling · B @ A, as in peft's own merge.
#: MonteCLoRA's sampler: its merge, as peft's, is the plain B @ A.
_TRAINING_ONLY = (".lora_velora_embed", ".lora_monteclora_sampler.expert_weights",
                  ".lora_monteclora_sampler.expert_weights_prior", ".lora_monteclora_sampler.gaussian_var_prior",
                  ".lora_monteclora_sampler.std_prior")
_HUB_ID = re.compile(r"[\w.\-]+(/[\w.\-]+)?")

#: Config fields whose features change what an adapter's tensors mean: refused when set (truthy).
_REFUSED_FEATURES = {
    "layer_replication": "layer_replication (the adapter belongs to a model with duplicated layers, which the "
                         "base checkpoint does not have)",
    "alora_invocation_tokens": "aLoRA (activated LoRA applies only after its invocation tokens and cannot be "
                               "merged into weights)",
    "use_qalora": "QALoRA (its lora_A acts on pooled input groups)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "arrow_config": "Arrow routing (a mixture of adapters chosen per token)",
    "kasa_config": "KaSA (a learned singular-value diagonal and a truncated base weight)",
}
#: ``init_lora_weights`` values (prefixes) after which the training ran on a rewritten base weight.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "astra")


def _widened(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """``tensor`` on ``device`` in the dtype a delta is computed in (:func:`work_dtype`)."""
    return tensor.to(device=device, dtype=work_dtype(tensor.dtype))


class AdapterError(CheckpointError):
    """A peft adapter cannot be used as an instruct model's task vector (kind, file, or base model)."""


@dataclass(frozen=True)
class _Factor:
    """One adapted module: where its factors are stored and how they combine.

    Attributes:
        module: the base model's module name, e.g. ``"model.layers.0.self_attn.q_proj"``.
        key_a / key_b: the adapter tensors ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``.
        rank, alpha, scaling: the resolved ``r``, ``lora_alpha`` and ``alpha / r`` (or ``alpha / sqrt(r)``).
        out_in: ``(out, in)`` from the factors' shapes.
        transposed: whether the base weight is stored ``[in, out]`` (a GPT-2 style ``Conv1D``).
    """

    module: str
    key_a: str
    key_b: str
    rank: int
    alpha: float
    scaling: float
    out_in: tuple[int, int]
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        """ΔW's shape in the base weight's layout: ``[out, in]``, or ``[in, out]`` when transposed."""
        return (self.out_in[1], self.out_in[0]) if self.transposed else self.out_in


def resolve_pattern(patterns: Mapping[str, object] | None, module: str) -> object | None:
    """The value of the first key of ``patterns`` that applies to ``module`` (peft's ``get_pattern_key``), or None.

    A key applies when it matches the whole module name or a dotted suffix of it, as a regular expression.

    Example:
        >>> resolve_pattern({"layers.0.self_attn.q_proj": 8, "q_proj": 2}, "model.layers.1.self_attn.q_proj")
        2
    """
    for key, value in (patterns or {}).items():
        if _pattern_applies(key, module):
            return value
    return None


def _pattern_applies(key: str, module: str) -> bool:
    """Whether a rank/alpha pattern key matches the whole module name or a dotted suffix of it (a regex)."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def matching_pattern_keys(patterns: Mapping[str, object] | None, module: str) -> list[str]:
    """Every key of ``patterns`` that applies to ``module``, in the config's order (:func:`resolve_pattern` takes
    the first).

    Example:
        >>> matching_pattern_keys({"q_proj": 8, "layers.1.*": 2, "v_proj": 4}, "model.layers.1.self_attn.q_proj")
        ['q_proj', 'layers.1.*']
    """
    return [key for key in (patterns or {}) if _pattern_applies(key, module)]


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """peft's LoRA scaling: ``alpha / sqrt(rank)`` with rsLoRA, else ``alpha / rank``."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _saved_keys_sorted(config: Mapping[str, object]) -> bool:
    """Whether peft wrote the adapter's pattern keys sorted (before 0.22), or the writer is unknown."""
    found = re.match(r"(\d+)\.(\d+)", str(config.get("peft_version") or ""))
    return found is None or (int(found[1]), int(found[2])) < (0, 22)


def module_of_saved_key(key: str) -> str:
    """A saved adapter key with peft's ``base_model.model.`` prefix removed (base-model naming)."""
    return key.removeprefix(PEFT_PREFIX)


def _examples(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return f"{shown} (+{len(items) - n} more)" if len(items) > n else shown


def _natural_key(text: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def check_adapter_config(config: Mapping[str, object], name: str) -> list[str]:
    """Refuse adapter kinds whose ΔW is not ``scaling · B @ A``; return warnings for what will be ignored.

    Args:
        config: the parsed ``adapter_config.json``.
        name: the adapter as the user named it (for messages).

    Raises:
        AdapterError: another peft type, DoRA, a base-rewriting initialisation or an unsupported feature.
    """
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterError(f"The instruct adapter {name}: adapter_config.json has no peft_type, so it is not a "
                           "peft adapter config. Save the adapter with PeftModel.save_pretrained.")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"The instruct adapter {name} is a {peft_type} adapter; only LoRA adapters can be used as "
                           "a task vector. Merge it into the base model (model.merge_and_unload(); "
                           "save_pretrained) and pass that full model as the instruct model.")
    if config.get("use_dora"):
        raise AdapterError(f"The instruct adapter {name} uses DoRA (use_dora=true): its magnitude vector rescales "
                           "every column of the merged weight, so ΔW depends on the base weight and is not "
                           "scaling·B·A. Merge it into the base model (merge_and_unload(); save_pretrained) and "
                           "pass that full model as the instruct model.")
    if config.get("layer_replication"):  # merged, it has more layers than the base: there is nothing to pass
        raise AdapterError(f"The instruct adapter {name} uses layer_replication={config['layer_replication']!r}: it "
                           "belongs to a model whose layers are duplicated, so it holds no task vector of the base "
                           "model, whose layers it would not line up with. Such an adapter cannot be merged into "
                           "the reasoning model.")
    for field, what in _REFUSED_FEATURES.items():
        if config.get(field):
            raise AdapterError(f"The instruct adapter {name} uses {what}, which rain_hf does not support "
                               f"({field}={config[field]!r}). Merge it into its base model with peft "
                               "(merge_and_unload(); save_pretrained) and pass that full model as the instruct model.")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MUTATING_INITS):
        # peft converts PiSSA, OLoRA, CorDA, LoRA-GA and Astra adapters to plain LoRA on save, but not LoftQ ones
        convert = ("" if init.startswith("loftq") else
                   "Convert it to a plain LoRA adapter: save it with PeftModel.save_pretrained(..., "
                   "path_initial_model_for_weight_conversion=<the initial adapter>), or ")
        raise AdapterError(f"The instruct adapter {name} was initialised with init_lora_weights={init!r}, which "
                           "rewrites the base weights before training, so B·A is not its change to the original "
                           f"base. {convert}{'m' if convert else 'M'}erge it into its base model (merge_and_unload(); "
                           "save_pretrained) and pass the full model.")
    warnings: list[str] = []
    if config.get("trainable_token_indices"):
        warnings.append(f"Adapter {name}: trainable_token_indices are embedding changes; they are ignored "
                        "(embeddings are never merged).")
    return warnings


def nested_adapters_hint(folder: Path) -> str:
    """A sentence naming the subfolders of ``folder`` that hold peft adapters, or "": peft saves an adapter whose
    name is not "default" in a subfolder of that name."""
    nested = sorted(p.parent.name for p in Path(folder).glob("*/adapter_config.json"))
    if not nested:
        return ""
    # the full path: for a Hub id it lies in the cache's snapshot, and "org/repo/sub" is no name rain_hf takes
    if len(nested) == 1:
        return (f" Its subfolder {nested[0]!r} holds a peft adapter (peft saves an adapter named other than "
                f"'default' under its name): pass that folder, {Path(folder) / nested[0]}.")
    return (f" Its subfolders {', '.join(map(repr, nested))} hold peft adapters (peft saves an adapter named other "
            f"than 'default' under its name): pass one of them, e.g. {Path(folder) / nested[0]}.")


def _refuse_bin_only(folder: Path, name: str) -> None:
    if (folder / "adapter_model.safetensors").is_file():
        return
    # only the adapter's own pickles: a Trainer checkpoint's optimizer.pt or rng_state.pth is no adapter
    bins = sorted(p.name for p in folder.glob("adapter_model*.bin")) + sorted(
        p.name for p in folder.glob("adapter_model*.pt"))
    if bins:
        raise AdapterError(f"The instruct adapter {name} holds only {bins[0]} (a pickle file, which rain_hf does not "
                           "load). Convert it to safetensors: load it with PeftModel.from_pretrained(base, path) and "
                           "save it again with save_pretrained(path, safe_serialization=True).")
    raise AdapterError(f"The instruct adapter {name} has no adapter_model.safetensors in {folder}. If it only "
                       "has adapter_model.bin (a pickle, which rain_hf neither fetches nor loads), convert it: load "
                       "it with PeftModel.from_pretrained(base, adapter) and save_pretrained(path, "
                       "safe_serialization=True). Otherwise download the adapter completely.")


class LoraDelta:
    """ΔW per base-model module computed from a peft LoRA adapter's tensors, without building a merged model.

    Tensors stay in ``adapter_model.safetensors`` (read one at a time) until :meth:`delta` asks for one module.

    Attributes:
        source: where the adapter came from.
        config: the adapter's ``adapter_config.json``.
        base_model_name_or_path: the base model the adapter was trained on, as peft recorded it (or ``None``).

    Example:
        >>> lora = LoraDelta.from_pretrained("my-instruct-lora")  # doctest: +SKIP
        >>> lora.validate(base_shapes, base_model_id="Qwen/Qwen2.5-7B", base_name="Qwen/Qwen2.5-7B")  # doctest: +SKIP
        >>> dw = lora.delta("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    """

    def __init__(self, source: ModelSource, config: dict, tensors: LazyCheckpoint) -> None:
        self.source = source
        self.config = config
        self.base_model_name_or_path: str | None = config.get("base_model_name_or_path") or None
        self._tensors = tensors
        self._name = source.describe()
        self._warnings = check_adapter_config(config, self._name)
        self._fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        # trained full copies (modules_to_save, bias="all"): base-model name -> saved key; their delta is copy − base
        self._copies: dict[str, str] = {}
        # lora_bias: base bias name -> (saved lora_B.bias key, the module's scaling)
        self._lora_biases: dict[str, tuple[str, float]] = {}
        self._base: TensorSource | None = None
        self._factors: dict[str, _Factor] = self._index_factors()

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> LoraDelta:
        """Open a LoRA adapter from a local folder or a Hub id (only the adapter files are fetched).

        Raises:
            AdapterError: not a LoRA adapter, an unsupported kind, invalid JSON, a ``.bin``-only or incomplete file.
            CheckpointError: the folder or Hub repository cannot be found or fetched.
        """
        source = resolve_model(adapter, revision=revision, token=token, allow_patterns=ADAPTER_PATTERNS,
                               role="instruct")
        name = source.describe()
        if not is_adapter_folder(source.path):
            hint = nested_adapters_hint(source.path) or " Pass the adapter folder, or a full model as the instruct model."
            raise AdapterError(f"The instruct adapter {name} has no adapter_config.json in {source.path}, so it is "
                               f"not a peft adapter.{hint}")
        try:
            config = read_json(source.path / "adapter_config.json", f"The instruct adapter {name}")
        except CheckpointError as exc:
            raise AdapterError(f"{exc} Fix or re-save the adapter (PeftModel.save_pretrained).") from exc
        if not isinstance(config, dict):
            raise AdapterError(f"The instruct adapter {name}: {source.path / 'adapter_config.json'} is not a JSON "
                               "object. Re-save the adapter with PeftModel.save_pretrained.")
        check_adapter_config(config, name)  # refuse an unsupported kind before touching the tensors
        _refuse_bin_only(source.path, name)
        tensors = LazyCheckpoint(source.path, name=f"the instruct adapter {name}", prefix="adapter_model")
        lora = cls(source, config, tensors)
        logger.info("LoRA adapter %s: %d adapted weight matrices, base %s", name, len(lora._factors),
                    lora.base_model_name_or_path)
        return lora

    def _index_factors(self) -> dict[str, _Factor]:
        """Pair every ``lora_A`` with its ``lora_B`` and resolve rank, alpha and scaling per module."""
        pairs: dict[str, dict[str, str]] = {}
        embeddings: list[str] = []
        output_layers: list[str] = []
        biases: list[str] = []
        others: list[str] = []
        for key in self._tensors.keys():
            if _DORA_MAGNITUDE in key:
                raise AdapterError(f"The instruct adapter {self._name} holds DoRA magnitude vectors ({key}) although "
                                   "its config does not say use_dora: ΔW would depend on the base weight. Merge it "
                                   "into the base model (merge_and_unload()) and pass the full model.")
            name = module_of_saved_key(key)
            factor = _LORA_FACTOR.match(name)
            if factor:
                pairs.setdefault(factor["module"], {})[factor["which"]] = key
            elif _LORA_EMBEDDING.match(name):
                embeddings.append(_LORA_EMBEDDING.match(name)["module"])
            elif _LORA_BIAS.match(name):
                biases.append(key)
            elif name.endswith(_TRAINING_ONLY):
                others.append(name)
            elif ".lora_" in name:
                raise AdapterError(f"The instruct adapter {self._name} holds a LoRA tensor in a layout rain_hf does "
                                   f"not know: {key}. Save the adapter with PeftModel.save_pretrained (keys "
                                   "'<module>.lora_A.weight' / '.lora_B.weight', without the adapter name).")
            elif name.endswith((".weight", ".bias")):
                # modules_to_save copies and bias="all" biases, saved under the base model's names (a LoRA
                # module's own bias sits under .base_layer)
                self._copies[name.replace(".base_layer.", ".")] = key
            else:
                others.append(name)
        incomplete = sorted(f"{module} (has lora_{''.join(ab)}, lacks lora_{'B' if 'A' in ab else 'A'})"
                            for module, ab in pairs.items() if len(ab) != 2)
        if incomplete:
            raise AdapterError(f"The instruct adapter {self._name} is incomplete: {_examples(incomplete)}. Every "
                               "adapted module needs both lora_A and lora_B: download or save the adapter again.")
        factors: dict[str, _Factor] = {}
        self._ambiguous_alpha: list[str] = []
        # target_parameters on a linear layer's weight saves ordinary factors; on other parameters (fused experts
        # [E, in, out]) the factors stack the experts and sit on the parameter's module, nested under .base_layer
        targeted = [str(p) for p in self.config.get("target_parameters") or ()]
        parameters = [p for p in targeted if p.rpartition(".")[2] != "weight"]
        # peft names a targeted parameter "<module>.weight" when it resolves rank_pattern / alpha_pattern keys
        self._weight_parameters = [p for p in targeted if p.rpartition(".")[2] == "weight"]
        parents = {p.rpartition(".")[0] for p in parameters if "." in p}
        # a bare parameter name ("gate_up_proj") matches any module holding one, so the modules it adapted are
        # told apart by their factors: they stack one rank per expert where a linear layer's hold one
        bare = any("." not in p for p in parameters)
        parameter_lora: list[str] = []
        for module in sorted(pairs, key=_natural_key):
            if module.rsplit(".", 1)[-1] in OUTPUT_EMBEDDING_NAMES:
                output_layers.append(module)
                continue
            unwrapped = module.replace(".base_layer", "")
            rank = self._configured_rank(module) if bare else None
            if any(unwrapped == parent or unwrapped.endswith(f".{parent}") for parent in parents) or (
                    rank is not None and self._tensors.shape(pairs[module]["A"])[0] != rank):
                parameter_lora.append(unwrapped)
                continue
            entry = self._factor(module, pairs[module]["A"], pairs[module]["B"])
            factors[f"{module}.weight"] = entry
        for module in {*embeddings, *output_layers}:  # their ".base_layer.weight" is the frozen base layer
            saved = self._copies.get(f"{module}.weight", "")
            if ".base_layer." in saved:
                del self._copies[f"{module}.weight"]
        if self._ambiguous_alpha:
            self._warnings.append(f"Adapter {self._name}: several alpha_pattern keys with different values match "
                                  f"{len(self._ambiguous_alpha)} modules (e.g. {self._ambiguous_alpha[0]}); the first "
                                  "in adapter_config.json wins, as on peft's reload, but peft before 0.22 saved the "
                                  "keys sorted, so training may have used another and the scaling may be off: rename "
                                  "the keys so that one matches each module.")
        if parameter_lora:
            targets = sorted(parameters)
            self._warnings.append(f"Adapter {self._name}: LoRA on parameters that are not linear-layer weights "
                                  f"(target_parameters {targets}, e.g. fused mixture-of-experts weights; "
                                  f"{_examples(sorted(set(parameter_lora), key=_natural_key))}) is ignored: they stay "
                                  "the reasoning model's, as a full instruct model's fused expert weights do.")
        if embeddings:
            self._warnings.append(f"Adapter {self._name}: LoRA on embeddings ({_examples(sorted(set(embeddings)))}) "
                                  "is ignored: embeddings are never merged.")
        if output_layers:
            self._warnings.append(f"Adapter {self._name}: LoRA on the output layer ({_examples(output_layers)}) is "
                                  "ignored: the output layer is never merged.")
        for key in biases:
            module = _LORA_BIAS.match(module_of_saved_key(key))["module"]
            if f"{module}.weight" in factors:
                self._lora_biases[f"{module}.bias"] = (key, factors[f"{module}.weight"].scaling)
        if others:
            self._warnings.append(f"Adapter {self._name}: {len(others)} tensors that are neither LoRA factors nor "
                                  f"copies of base-model weights (e.g. {_examples(others)}) are ignored.")
        return factors

    def _pattern_name(self, module: str) -> str:
        """The name rank_pattern / alpha_pattern keys are matched against: the module's, or for a linear weight
        adapted through ``target_parameters`` the parameter's (peft, 0.21 and 0.22, matches ``<module>.weight``)."""
        weight = f"{module.replace('.base_layer', '')}.weight"
        if any(weight == p or weight.endswith(f".{p}") for p in self._weight_parameters):
            return weight
        return module

    def _configured_rank(self, module: str) -> int | None:
        """The rank adapter_config.json gives ``module`` (None when a pattern key is not a valid regex)."""
        try:
            rank = resolve_pattern(self.config.get("rank_pattern"), self._pattern_name(module))
        except re.error:
            return None  # _factor names the bad key
        return int(self.config.get("r", 8) if rank is None else rank)

    def _factor(self, module: str, key_a: str, key_b: str) -> _Factor:
        shape_a, shape_b = self._tensors.shape(key_a), self._tensors.shape(key_b)
        if 0 in (*shape_a, *shape_b) or (len(shape_a) == 1 and len(shape_b) == 1):
            raise AdapterError(f"The instruct adapter {self._name}: module {module} has LoRA factors of shapes "
                               f"{list(shape_a)} and {list(shape_b)}, which is how DeepSpeed ZeRO-3 or FSDP saves "
                               "parameters that were never gathered. Save the adapter again with gathered "
                               "parameters (e.g. the Trainer's save_model, or stage3_gather_16bit_weights_on_model_"
                               "save: true).")
        if len(shape_a) != 2 or len(shape_b) != 2:
            raise AdapterError(f"The instruct adapter {self._name}: module {module} has LoRA factors of shapes "
                               f"{list(shape_a)} and {list(shape_b)}; only LoRA on linear layers (2-D factors) is "
                               "supported. Merge the adapter into its base model and pass the full model.")
        if shape_a[0] != shape_b[1]:
            raise AdapterError(f"The instruct adapter {self._name}: module {module} has lora_A {list(shape_a)} and "
                               f"lora_B {list(shape_b)}, whose ranks differ. The file is corrupt: save it again.")
        name = self._pattern_name(module)
        try:
            rank = resolve_pattern(self.config.get("rank_pattern"), name)
            alpha = resolve_pattern(self.config.get("alpha_pattern"), name)
            matches = {field: matching_pattern_keys(self.config.get(field), name)
                       for field in ("rank_pattern", "alpha_pattern")}
        except re.error as exc:
            raise AdapterError(f"The instruct adapter {self._name}: a rank_pattern / alpha_pattern key is not a valid "
                               f"regular expression ({exc}). Fix adapter_config.json.") from exc
        rank = int(self.config.get("r", 8) if rank is None else rank)
        alpha = float(self.config.get("lora_alpha", 8) if alpha is None else alpha)
        # peft before 0.22 wrote adapter_config.json with sorted keys, so when several keys match, the one that
        # wins on reload (the first in the file) need not be the one that applied in training
        sorted_keys = _saved_keys_sorted(self.config)
        clash = {field: ", ".join(f"{k!r}: {self.config[field][k]}" for k in keys) for field, keys in matches.items()
                 if len({repr(self.config[field][k]) for k in keys}) > 1}
        if rank != shape_a[0]:
            fix = (f"Several rank_pattern keys match it ({clash['rank_pattern']}) and the first wins"
                   + ("; peft before 0.22 saved the keys sorted, which can change which one that is: rename the "
                      "keys so that one matches each module." if sorted_keys else ": fix adapter_config.json.")
                   if "rank_pattern" in clash else "Fix adapter_config.json or save the adapter again with peft.")
            raise AdapterError(f"The instruct adapter {self._name}: module {module} has rank {shape_a[0]} tensors but "
                               f"its config (r / rank_pattern) gives r={rank}, so its scaling is unknown. {fix}")
        if "alpha_pattern" in clash and sorted_keys:  # since 0.22 the file keeps the order training used
            self._ambiguous_alpha.append(f"{module} ({clash['alpha_pattern']})")
        scaling = lora_scaling(rank, alpha, bool(self.config.get("use_rslora", False)))
        return _Factor(module, key_a, key_b, rank, alpha, scaling, (shape_b[0], shape_a[1]), self._fan_in_fan_out)

    def weight_keys(self) -> list[str]:
        """Base-model weight names that have a delta, e.g. ``"model.layers.0.self_attn.q_proj.weight"``: LoRA
        modules and trained full copies (``modules_to_save``)."""
        return list(self._factors) + [k for k in self._copies if k.endswith(".weight") and k not in self._factors]

    def bias_keys(self) -> list[str]:
        """Base-model bias names that have a delta (``bias="all"`` / ``"lora_only"``, ``lora_bias``)."""
        return sorted({k for k in self._copies if k.endswith(".bias")} | set(self._lora_biases), key=_natural_key)

    def __contains__(self, weight_key: object) -> bool:
        return weight_key in self._factors or weight_key in self._copies or weight_key in self._lora_biases

    def use_base(self, base: TensorSource) -> None:
        """The base checkpoint that trained full copies (``modules_to_save``, trained biases) are deltas against."""
        self._base = base

    def rank(self, weight_key: str) -> int:
        """The resolved LoRA rank of ``weight_key``'s module."""
        return self._factors[weight_key].rank

    def scaling(self, weight_key: str) -> float:
        """The resolved scaling (``alpha / r`` or ``alpha / sqrt(r)``) of ``weight_key``'s module."""
        return self._factors[weight_key].scaling

    def shape(self, weight_key: str) -> tuple[int, int]:
        """The shape of ``delta(weight_key)`` (the base weight's layout), read without loading tensors."""
        return self._factors[weight_key].shape

    def factors(self, weight_key: str, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors ``(L, R)`` with ``delta(weight_key) == L @ R``, in fp32 (float64 for float64 factors).

        Shapes: ``L`` ``[out, r]`` and ``R`` ``[r, in]`` (``L`` ``[in, r]``, ``R`` ``[r, out]`` for a ``Conv1D``
        weight, see :meth:`validate`), i.e. ``L @ R`` has the base weight's layout. The scaling is folded into
        ``L``. Useful to project ΔW in O((out + in)·r) memory.
        """
        entry = self._factors[weight_key]
        a, b = self._tensors.get(entry.key_a), self._tensors.get(entry.key_b)  # [r, in], [out, r]
        dtype = work_dtype(torch.promote_types(a.dtype, b.dtype))  # one dtype for the product
        a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        if entry.transposed:
            return a.T.contiguous() * entry.scaling, b.T.contiguous()  # [in, r], [r, out]
        return b * entry.scaling, a

    def delta(self, weight_key: str, device: torch.device | str | None = None) -> torch.Tensor | None:
        """ΔW of ``weight_key`` as fp32 ``[out, in]`` (the base weight's layout; float64 where the adapter or the
        base stores float64), or None when not adapted.

        ``scaling · B @ A`` with ``A`` ``[r, in]``, ``B`` ``[out, r]``; transposed to ``[in, out]`` for GPT-2 style
        ``Conv1D`` weights, stored ``[in, out]`` (before :meth:`validate`: as the adapter's ``fan_in_fan_out`` says).

        Trained full copies (``modules_to_save``, ``bias="all"``) give ``copy − base`` (see :meth:`use_base`), and
        a ``lora_bias`` adds ``scaling · lora_B.bias`` to its module's bias.
        """
        if weight_key not in self:
            return None
        total = None
        if weight_key in self._factors:
            left, right = self.factors(weight_key, device=device)
            total = left @ right
        if weight_key in self._copies:
            if self._base is None:
                raise AdapterError(f"The instruct adapter {self._name} holds a trained copy of {weight_key}; its "
                                   "delta needs the base weights: call use_base(base checkpoint) first.")
            copy = _widened(self._tensors.get(self._copies[weight_key]), device)
            copy = copy - _widened(self._base.get(weight_key), device)
            total = copy if total is None else total + copy
        if weight_key in self._lora_biases:
            key, scaling = self._lora_biases[weight_key]
            bias = _widened(self._tensors.get(key), device) * scaling
            total = bias if total is None else total + bias
        return total

    def validate(
        self,
        base_shapes: Mapping[str, tuple[int, ...]],
        base_model_id: str | None,
        base_name: str,
        base_revision: str | None = None,
        conv1d_modules: Collection[str] | None = None,
    ) -> list[str]:
        """Check that the adapter belongs to this base model; return warnings about what will be ignored.

        Args:
            base_shapes: the base checkpoint's tensor shapes by name.
            base_model_id: the base model's Hub id, if known.
            base_name: the base model's local folder (or its name), used for messages and for comparing a recorded
                local path (two existing folders are compared by their weights' fingerprints).
            base_revision: the base model's Hub commit, if known (compared with the adapter's recorded one).
            conv1d_modules: names of the base model's GPT-2 style ``Conv1D`` modules (weights stored
                ``[in, out]``), if known. peft transposes ΔW per module by this and rewrites the saved
                ``fan_in_fan_out`` at each one, so an adapter on ``Conv1D`` layers and ``lm_head`` is saved with
                ``false``. Without it, a module whose base weight is not square is read in the layout its shape
                shows, and a square one by ``fan_in_fan_out``.

        Raises:
            AdapterError: an adapted module the base does not have, or a ΔW shape that differs from the base
                weight's. A recorded base model that is not this one, with every shape agreeing, is a warning (as
                in peft): the recorded name is often a quantized copy, a renamed or a relative folder of the
                same weights.
        """
        base_label = base_model_id or base_name
        layout_warnings = self._set_layouts(base_shapes, conv1d_modules)
        missing = [key for key in self._factors if key not in base_shapes]
        if missing and all(f"model.{key}" in base_shapes for key in missing):
            raise AdapterError(f"The instruct adapter {self._name} adapts modules without the 'model.' prefix the "
                               f"base model {base_label} stores them under ({_examples(missing)}): it was trained on "
                               "the bare decoder (AutoModel), not on AutoModelForCausalLM. Load it on the causal "
                               "LM's decoder and save it again, or train it on AutoModelForCausalLM.")
        if missing:
            raise AdapterError(f"The instruct adapter {self._name} adapts modules the base model {base_label} does "
                               f"not have: {_examples(missing)}. The adapter was trained on another architecture: "
                               "pass the adapter's base model.")
        mismatched = [f"module {entry.module} has ΔW of shape {list(entry.shape)} but the base weight is "
                      f"{list(base_shapes[key])}"
                      for key, entry in self._factors.items() if tuple(base_shapes[key]) != entry.shape]
        if mismatched:
            raise AdapterError(f"The instruct adapter {self._name} does not fit the base model {base_label}: "
                               f"{'; '.join(mismatched[:3])}{' …' if len(mismatched) > 3 else ''} "
                               f"({len(mismatched)} of {len(self._factors)} modules). The adapter was trained on a "
                               f"model of another size ({self.base_model_name_or_path or 'base not recorded'}): "
                               "pass the adapter's base model.")
        warnings = list(self._warnings) + layout_warnings
        no_bias = sorted(k for k in self._lora_biases if k not in base_shapes)
        if no_bias:  # peft's merge_and_unload refuses these too: a bias-free layer has nowhere to put one
            warnings.append(f"Adapter {self._name} trained biases (lora_bias) for modules whose base layer has no "
                            f"bias ({_examples(no_bias)}): they cannot be merged and are ignored.")
            for key in no_bias:
                del self._lora_biases[key]
        unfit = sorted(k for k in self._copies if tuple(base_shapes.get(k, ())) != self._tensors.shape(self._copies[k]))
        if unfit:  # e.g. a resized embedding saved with modules_to_save: never merged, so only said
            warnings.append(f"Adapter {self._name}: trained copies that the base model {base_label} does not hold "
                            f"in that shape (or at all, e.g. a tied lm_head) are ignored: {_examples(unfit)}.")
            for key in unfit:
                del self._copies[key]
        recorded = self.base_model_name_or_path
        recorded_revision = self.config.get("revision")
        snapshot = _CACHE_SNAPSHOT.search(recorded or "")
        if snapshot and not recorded_revision:
            recorded_revision = snapshot["sha"]
        if _different_commits(recorded_revision, base_revision):
            warnings.append(f"Adapter {self._name} records base revision {recorded_revision!r}, but the base is at "
                            f"{base_revision!r}: if the weights differ, its ΔW is no task vector of this base; pass "
                            "the base model at the adapter's revision.")
        if recorded:
            same = same_base_model(recorded, base_model_id, base_name)
            if same is False:
                warnings.append(f"Adapter {self._name} records base model {recorded!r}, but the base is "
                                f"{base_label}. Tensor shapes agree, so the merge goes on; if the adapter was "
                                "trained on another model, its ΔW is no task vector of this base: pass the "
                                "adapter's base model.")
            if same is None:
                warnings.append(f"Adapter {self._name} records base model {recorded!r}, which cannot be compared "
                                f"with the base {base_label} here (tensor shapes agree).")
        else:
            warnings.append(f"Adapter {self._name} does not record its base model; only tensor shapes were checked.")
        return warnings  # the caller logs them (RainMerger.plan logs every plan warning once)

    def _set_layouts(self, base_shapes: Mapping[str, tuple[int, ...]], conv1d: Collection[str] | None) -> list[str]:
        # the saved fan_in_fan_out is whatever peft set at the last adapted module, so it is a default only
        contradicted, square = [], []
        for key, entry in self._factors.items():
            if conv1d is not None:
                transposed = entry.module in conv1d
            elif tuple(base_shapes.get(key, ())) in (entry.out_in, entry.out_in[::-1]):
                transposed = entry.transposed if entry.out_in[0] == entry.out_in[1] else (
                    tuple(base_shapes[key]) != entry.out_in)
            else:
                transposed = self._fan_in_fan_out  # a shape that fits neither way: the mismatch check names it
            if conv1d is None and entry.out_in[0] != entry.out_in[1] and transposed != self._fan_in_fan_out:
                contradicted.append(entry.module)
            elif conv1d is None and entry.out_in[0] == entry.out_in[1]:
                square.append(entry.module)
            self._factors[key] = replace(entry, transposed=transposed)
        if contradicted and square:
            return [f"Adapter {self._name} says fan_in_fan_out={self._fan_in_fan_out}, but the layout of "
                    f"{_examples(contradicted)} shows otherwise (peft rewrites the flag at each module, e.g. last at "
                    f"an nn.Linear lm_head): its square modules ({_examples(square)}) are read by the flag and may "
                    "be transposed wrongly; pass conv1d_modules= to validate()."]
        return []


def _looks_like_path(text: str) -> bool:
    if Path(text).expanduser().is_dir():
        return True
    return (text.startswith((".", "/", "~", "\\")) or "\\" in text or text.count("/") > 1
            or re.match(r"^[A-Za-z]:", text) is not None or not _HUB_ID.fullmatch(text))


def same_base_model(recorded: str, base_model_id: str | None, base_name: str | None) -> bool | None:
    """Whether an adapter's recorded ``base_model_name_or_path`` names this base model; None when undecidable.

    A recorded Hub id is compared with ``base_model_id`` case-insensitively (when that is unknown, with the base's
    folder name). A recorded local path matches the base folder by resolved path or by folder name; a path that does
    not exist on this machine and has another folder name cannot be decided.

    Example:
        >>> same_base_model("Qwen/Qwen2.5-7B", "qwen/qwen2.5-7b", "Qwen/Qwen2.5-7B")
        True
    """
    snapshot = _CACHE_SNAPSHOT.search(recorded)
    if snapshot:  # a folder of the Hub cache, on this machine or the one the adapter was trained on
        recorded = snapshot_repo_id(snapshot)
    names = set()
    if base_model_id:
        names.add(base_model_id.rsplit("/", 1)[-1].casefold())
    if base_name:
        names.add(Path(base_name).expanduser().name.casefold())
    if not _looks_like_path(recorded):
        if base_model_id:
            return recorded.casefold() == base_model_id.casefold()
        return True if recorded.rsplit("/", 1)[-1].casefold() in names else None
    # a path recorded on Windows names its folder after the last backslash, also when read here
    rec = PureWindowsPath(recorded) if "\\" in recorded else Path(recorded).expanduser()
    base_path = Path(base_name).expanduser() if base_name else None
    exists = isinstance(rec, Path) and rec.exists()
    if exists and base_path is not None and base_path.exists():
        if rec.resolve() == base_path.resolve():
            return True
        # two folders here (a generic name such as "base" or "checkpoint-500" proves nothing): their weights decide
        return _same_weights(rec, base_path)
    if rec.name.casefold() in names:
        return True
    return False if exists else None


def _same_weights(a: Path, b: Path) -> bool | None:
    """Whether two local model folders hold the same weights (by checkpoint fingerprint); None if unreadable."""
    from .checkpoints import checkpoint_fingerprint

    try:
        return checkpoint_fingerprint(LazyCheckpoint(a)) == checkpoint_fingerprint(LazyCheckpoint(b))
    except (CheckpointError, OSError):
        return None


def _different_commits(recorded: str | None, current: str | None) -> bool:
    """Whether two revisions are both commit hashes (full or abbreviated) of different commits; branch names and
    unknown revisions cannot be compared."""
    commit = re.compile(r"[0-9a-f]{7,40}")
    if not (recorded and current and commit.fullmatch(recorded) and commit.fullmatch(current)):
        return False
    return not (recorded.startswith(current) or current.startswith(recorded))


def is_lora_adapter(path: str | os.PathLike) -> bool:
    """True when ``path`` is a local folder holding a peft LoRA adapter (``adapter_config.json`` with LORA).

    DoRA and other LoRA variants count (``LoraDelta.from_pretrained`` then says why it refuses them); other peft
    types (IA3, LoHa, …), full models, unreadable configs and Hub ids give False. To route any adapter to a clear
    error, test :func:`rain_hf.checkpoints.is_adapter_folder` instead.
    """
    folder = Path(path).expanduser()
    if not is_adapter_folder(folder):
        return False
    try:
        config = read_json(folder / "adapter_config.json", str(folder))
    except CheckpointError as exc:
        logger.warning("%s", exc)
        return False
    return isinstance(config, dict) and str(config.get("peft_type", "")).upper() == "LORA"
