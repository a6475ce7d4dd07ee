"""Forward passes over calibration data: which modules are merged, their input features at the thinking
positions (stage 1), and per-head instruction-attention statistics (stage 2).

Everything is captured with hooks during ordinary forward passes of the reasoning (or probe) model: one pass per
batch covers every layer. The sequential form of stage 1 (:class:`LayerReplay`) instead runs one decoder layer at a
time on cached inputs, as the model is merged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ._modes import eval_mode
from .calibration import CalibrationSample
from .coefficients import attention_mass, masked_query_mean
from .config import RCOND_FLOOR, ConfigError, RainMergingConfig
from .projection import feature_svd, with_bias_column

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "rain_hf.think_features.v1"
HELDOUT = "__heldout__"  # tensor-name prefix of the samples held out for lam="auto" (not a module group)


@dataclass
class TargetModule:
    """A linear module of a decoder layer that the merge changes.

    Attributes:
        name: module name in the model, e.g. ``model.layers.0.self_attn.q_proj``.
        layer: decoder layer index.
        kind: ``"q"``, ``"kv"``, ``"o"``, ``"qkv"`` (attention projections, mapped per head in stage 2; ``"qkv"``
            is Phi-3's fused [q | k | v] projection) or ``"other"``.
        shape: (out_features, in_features).
        has_bias: whether the module has a bias.
        in_attention: whether the module sits in the block's attention module (where ``kind`` ``"other"`` means
            a projection stage 2 could not map to heads).
    """

    name: str
    layer: int
    kind: str
    shape: tuple[int, int]
    has_bias: bool
    in_attention: bool = False

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_key(self) -> str | None:
        return f"{self.name}.bias" if self.has_bias else None


@dataclass
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_layers: int
    fused_qkv: bool = False  # a "qkv_proj" holds the q, k and v rows as three blocks, [q | k | v]


# Architectures whose fused "qkv_proj" is split into [q | k | v] row blocks (CodeGen's interleaves them).
_BLOCK_QKV_MODELS = {"phi3", "phi4_multimodal"}


def text_config(model_config):
    """The decoder's config: a multimodal config's text config, any other config itself."""
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def attention_geometry(model_config) -> AttentionGeometry:
    """Head counts and head_dim from a transformers config (explicit ``head_dim`` wins, as in Qwen3)."""
    cfg = text_config(model_config)
    try:
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    except RuntimeError as exc:  # transformers' per-layer configs (Gemma 4) refuse a global head count or width
        raise ConfigError(f"{type(cfg).__name__} gives its layers different attention geometries (head_dim or kv "
                          f"heads per layer: {exc.__class__.__name__}), and rain_hf maps heads with one geometry "
                          "for the whole model: such models cannot be merged yet.") from exc
    return AttentionGeometry(heads, kv, head_dim, cfg.hidden_size, cfg.num_hidden_layers,
                             getattr(cfg, "model_type", None) in _BLOCK_QKV_MODELS)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the longest ModuleList some of whose blocks hold an attention module (a
    hybrid model such as Qwen3-Next starts with linear-attention blocks), looked for in the text decoder first
    (``get_decoder()``), so that a multimodal model's vision encoder is not taken for it."""
    try:
        decoder = _decoder(model)
    except Exception:  # noqa: BLE001 - a model class without a usable decoder accessor: search it whole
        decoder = model
    if decoder is not model:
        prefix = next((name for name, module in model.named_modules() if module is decoder), None)
        found = _longest_attention_list(decoder) if prefix is not None else None
        if found is not None:
            return (f"{prefix}.{found[0]}" if prefix else found[0]), found[1]
    found = _longest_attention_list(model)
    if found is None:
        raise ValueError(_no_attention_found(model))
    return found


def _longest_attention_list(root: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in root.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 0
                and any(_attention_of(block) is not None for block in module)):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def _attention_of(block: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in block.named_modules():
        if name and type(module).__name__.endswith("Attention"):
            return name, module
    return None


def _no_attention_found(model: nn.Module) -> str:
    """The refusal for a model whose blocks hold no module rain_hf recognises as attention (by its class name)."""
    try:
        root = _decoder(model)  # the text decoder, not a vision encoder's blocks
    except Exception:  # noqa: BLE001 - no usable decoder accessor: the whole model
        root = model
    lists = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    block = max(lists, key=len)[0] if lists else None
    inside = sorted({type(m).__name__ for name, m in block.named_modules() if name and not isinstance(
        m, (nn.ModuleList, nn.Linear))}) if block is not None else []
    seen = f" (its blocks hold {', '.join(inside[:8])}{' …' if len(inside) > 8 else ''})" if inside else ""
    return (f"{type(model).__name__}: no decoder block holds a module whose class name ends in 'Attention'{seen}, "
            "and stage 2 and the head mapping need one: rain_hf does not support this architecture.")


def unmergeable_weights(model: nn.Module) -> list[str]:
    """Names of the matrices (parameters with ≥ 2 dims) inside the decoder blocks that are not ``nn.Linear``
    weights, such as the fused expert tensors of Mixtral or Qwen3-MoE: no method here merges them. Norm weights
    are left out, whatever their shape (Cohere's per-head q/k norms are [heads, head_dim]): no method merges a
    norm, by design."""
    prefix, layers = find_decoder_layers(model)
    skip = {id(m.weight) for m in layers.modules() if isinstance(m, nn.Linear)}
    skip |= {id(p) for m in layers.modules() if "norm" in type(m).__name__.lower() for p in m.parameters()}
    return [f"{prefix}.{name}" for name, p in layers.named_parameters() if p.dim() >= 2 and id(p) not in skip]


def local_attention(model_config) -> list[tuple[str, int] | None]:
    """Per decoder layer, how far its attention reaches: ``("sliding", w)`` (a query sees the ``w`` positions up
    to itself, as transformers masks them), ``("chunked", c)`` (the positions of its own block of ``c``, Llama 4)
    or ``None`` for full attention. From the config's ``layer_types`` (Gemma 2/3, Cohere 2, gpt-oss, OLMo 3,
    Llama 4 …), else a ``sliding_window`` that applies to every layer (Mistral, Starcoder2, Phi-3).

    Example:
        >>> from transformers import MistralConfig
        >>> local_attention(MistralConfig(num_hidden_layers=2, sliding_window=4096))
        [('sliding', 4096), ('sliding', 4096)]
    """
    cfg = text_config(model_config)
    layers = cfg.num_hidden_layers

    def size(name: str) -> int | None:
        value = getattr(cfg, name, None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    window, chunk = size("sliding_window"), size("attention_chunk_size")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        reach = {"sliding_attention": ("sliding", window) if window else None,
                 "chunked_attention": ("chunked", chunk) if chunk else None}
        return [reach.get(kind) for kind in layer_types]
    if window is None or getattr(cfg, "use_sliding_window", None) is False:
        return [None] * layers
    return [("sliding", window)] * layers


def layers_without_attention(model: nn.Module) -> list[int]:
    """Indices of the decoder blocks that hold no softmax attention module (the linear-attention blocks of a hybrid
    model such as Qwen3-Next or MiniMax): stage 2 has no instruction attention to score there."""
    config = text_config(getattr(model, "config", None))
    # MiniMax's linear attention is a class named *Attention too: the config's layer types tell them apart
    layer_types = list(getattr(config, "layer_types", None) or [])
    blocks = find_decoder_layers(model)[1]
    return [i for i, block in enumerate(blocks) if _attention_of(block) is None
            or (i < len(layer_types) and layer_types[i] == "linear_attention")]


def merged_routers(model: nn.Module, targets: Sequence[TargetModule]) -> list[str]:
    """Targets that are mixture-of-experts routers: a linear layer named ``router`` or of a ``*Router`` class
    (Llama 4, Phi-MoE), which "all-linear" selects although the experts they route to are fused weights."""
    modules = dict(model.named_modules())
    return [t.name for t in targets if "router" in t.name.split(".")
            or type(modules[t.name]).__name__.endswith("Router")]


def find_target_modules(model: nn.Module, config: RainMergingConfig) -> list[TargetModule]:
    """Linear modules inside the decoder blocks selected by ``config.target_modules`` and ``config.layers``.

    ``target_modules`` entries match as in peft: a module's full name or a dotted suffix of it (``"q_proj"``,
    ``"mlp.down_proj"``, ``"layers.1.mlp.up_proj"``); an entry that matches no linear module, or none in the
    selected layers, is an error. A single string other than ``"all-linear"`` is a regular expression that must
    match a module's whole name. Attention projections are mapped to heads by their
    usual names (q/k/v/o_proj and kin) and otherwise by shape inside the block's attention module: a linear with
    out = H·head_dim is a query projection, out = KV·head_dim a key/value projection, in = H·head_dim and
    out = hidden the output projection.
    """
    geo = attention_geometry(model.config)
    prefix, layers = find_decoder_layers(model)
    if config.layers is not None:
        bad = [i for i in config.layers if i >= len(layers)]
        if bad:
            raise ConfigError(f"config.layers names layers {bad}, but the model has {len(layers)} "
                              f"(0–{len(layers) - 1}): drop them, or leave layers unset to merge every layer.")
    wanted_layers = set(range(len(layers))) if config.layers is None else set(config.layers)
    every = config.target_modules == "all-linear"
    regex = re.compile(config.target_modules) if isinstance(config.target_modules, str) and not every else None
    entries = [] if every or regex else list(config.target_modules)
    matched: set[str] = set()
    matched_in_layers: set[str] = set()
    targets: list[TargetModule] = []
    for idx, block in enumerate(layers):
        attn = _attention_of(block)
        attn_name = attn[0] if attn else None
        for sub, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            leaf = sub.rsplit(".", 1)[-1]
            # peft's rule: an entry is the module's full name or a dotted suffix of it ("mlp.down_proj")
            full = f"{prefix}.{idx}.{sub}"
            hits = [e for e in entries if full == e or full.endswith("." + e)]
            matched.update(hits)
            if regex is not None and regex.fullmatch(full):
                hits = [regex.pattern]
                matched.add(regex.pattern)
            if (not every and not hits) or idx not in wanted_layers:
                continue
            matched_in_layers.update(hits)
            out_f, in_f = module.weight.shape
            kind = "other"
            in_attention = attn_name is not None and sub.startswith(attn_name + ".")
            if in_attention:
                kind = _attention_kind(leaf, out_f, in_f, geo)
            targets.append(TargetModule(f"{prefix}.{idx}.{sub}", idx, kind, (out_f, in_f), module.bias is not None,
                                        in_attention))
    if regex is not None and regex.pattern not in matched:
        example = f"{prefix}.0.{next(sub for sub, m in layers[0].named_modules() if isinstance(m, nn.Linear))}"
        if regex.pattern.lower().replace("_", "-") in ("all", "linear", "all-linears", "all-linear"):
            raise ConfigError(f"target_modules={regex.pattern!r} is read as a regular expression (as in peft) and "
                              "matches no linear module's whole name: did you mean 'all-linear' (every linear "
                              "layer of the decoder blocks)?")
        raise ConfigError(f"target_modules={regex.pattern!r} is a regular expression (as in peft) and matches no "
                          f"linear module's whole name, such as {example!r}: write e.g. '.*q_proj', or a "
                          f"list of names such as [{regex.pattern!r}].")
    unmatched = [e for e in entries if e not in matched]
    if unmatched:
        names = sorted({sub for block in layers for sub, m in block.named_modules() if isinstance(m, nn.Linear)})
        example = [names[-1].rsplit(".", 1)[-1], names[0]] if len(names) > 1 else names
        raise ConfigError(f"target_modules entries {unmatched} match no linear module in the decoder blocks, whose "
                          f"linear modules are {names}: name them or a dotted suffix of their names (e.g. "
                          f"{example}), or use 'all-linear'.")
    outside = [e for e in entries if e not in matched_in_layers]
    if outside and len(outside) < len(entries):  # with nothing selected at all, the error below says so
        raise ConfigError(f"target_modules entries {outside} match no linear module in the layers "
                          f"{sorted(wanted_layers)} that config.layers selects, only modules of other layers: add "
                          "their layers or drop the entries.")
    if not targets:
        conv1d = sorted({sub for block in layers for sub, m in block.named_modules()
                         if type(m).__name__ == "Conv1D"})
        if conv1d and not any(isinstance(m, nn.Linear) for block in layers for m in block.modules()):
            raise ConfigError(f"The decoder blocks are built from GPT-2-style Conv1D layers ({', '.join(conv1d)}; "
                              "weights stored [in, out]), not nn.Linear, and rain_hf merges linear layers only: use "
                              "a model whose blocks use nn.Linear (Llama, Qwen2/3, Mistral, …).")
        raise ConfigError(f"target_modules={config.target_modules!r} matches no linear module in the layers "
                          f"{sorted(wanted_layers)} that config.layers selects: choose other layers or modules.")
    return targets


_QUERY_NAMES = {"q_proj", "query", "q", "wq", "query_proj"}
_KV_NAMES = {"k_proj", "v_proj", "key", "value", "k", "v", "wk", "wv", "key_proj", "value_proj"}
_OUT_NAMES = {"o_proj", "out_proj", "dense", "o", "wo", "c_proj"}
# names whose shape may match a per-head layout by chance: fused key/value and multi-head latent attention parts
_NOT_HEAD_MAPPED = {"kv_proj", "kv", "wkv"}
_LOW_RANK_RE = re.compile(r"_[ab]_proj")


def _attention_kind(leaf: str, out_f: int, in_f: int, geo: AttentionGeometry) -> str:
    """Which head layout a linear inside the attention module has: "q", "kv", "o", "qkv" or "other".

    The usual names decide, checked against the head geometry; a module with another name is classified by its
    shape only where the shape is unambiguous (q and o have the same shape when H·head_dim == hidden).
    """
    q_dim, kv_dim, hidden = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim, geo.hidden_size
    if leaf == "qkv_proj" and geo.fused_qkv and (out_f, in_f) == (q_dim + 2 * kv_dim, hidden):
        return "qkv"
    if leaf in _QUERY_NAMES and out_f == q_dim:
        return "q"
    if leaf in _KV_NAMES and out_f == kv_dim:
        return "kv"
    if leaf in _OUT_NAMES and in_f == q_dim:
        return "o"
    if leaf in _QUERY_NAMES | _KV_NAMES | _OUT_NAMES or leaf in _NOT_HEAD_MAPPED or _LOW_RANK_RE.search(leaf):
        # a fused [k | v] (JetMoE's kv_proj) or a latent projection (MLA's q_b_proj) can have q's or o's shape
        return "other"
    shapes = {"q": (q_dim, hidden), "kv": (kv_dim, hidden), "o": (hidden, q_dim)}
    matches = [k for k, shape in shapes.items() if shape == (out_f, in_f)]
    return matches[0] if len(matches) == 1 else "other"


# ---------------------------------------------------------------------------------------------- batching
def _batches(samples: Sequence[CalibrationSample], batch_size: int):
    for start in range(0, len(samples), batch_size):
        yield samples[start : start + batch_size]


def _pad(samples: Sequence[CalibrationSample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T] and attention mask [B, T]."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.long)
        mask[i, : len(s.input_ids)] = 1
    return ids.to(device), mask.to(device)


def _sees_keys(query_mask: torch.Tensor, key_mask: torch.Tensor, reach: tuple[str, int]) -> torch.Tensor:
    """The queries of ``query_mask`` [B, T] (right-padded) that see at least one key of ``key_mask`` [B, T] through
    a local attention ``reach`` of :func:`local_attention`: keys τ ≤ t with t − w < τ (``("sliding", w)``) or in t's
    block of c positions (``("chunked", c)``)."""
    kind, size = reach
    seen = key_mask.long().cumsum(dim=1)  # keys up to and including t
    positions = torch.arange(seen.shape[1])
    first = positions - size + 1 if kind == "sliding" else positions - positions % size  # the first visible key
    before = torch.where(first > 0, seen[:, (first - 1).clamp(min=0)], torch.zeros_like(seen))
    return query_mask & (seen - before > 0)


def _span_mask(samples: Sequence[CalibrationSample], attr: str, width: int) -> torch.Tensor:
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        for a, b in getattr(s, attr):
            mask[i, a:b] = True
    return mask


def _think_index(batch: Sequence[CalibrationSample], config: RainMergingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch row, token position) [m] each of every thinking position of a padded batch."""
    b_idx: list[int] = []
    t_idx: list[int] = []
    for i, s in enumerate(batch):
        pos = s.think_positions(config.positions, config.window)
        b_idx += [i] * len(pos)
        t_idx += pos
    return torch.tensor(b_idx, dtype=torch.long), torch.tensor(t_idx, dtype=torch.long)


def _rows_at(x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor], shape: tuple[int, int],
             name: str) -> torch.Tensor:
    """The rows [m, d] (on the CPU, in the model's dtype until the SVD: a bfloat16 model's rows take half the
    memory of float32 ones, and the cast is exact) of a module's input at the (batch row, position) pairs
    ``index`` of a padded batch of ``shape`` (B, T). The input is [B, T, d]; [B·T, d] where a block flattens the tokens before
    the module (the shared experts of Qwen2-MoE and Llama 4); or [B, 1, T, d] (the latent that DeepSeek-V3's
    multi-head latent attention feeds kv_b_proj)."""
    batch, width = shape
    if x.dim() == 2 and x.shape[0] == batch * width:
        x = x.view(batch, width, x.shape[-1])
    elif x.dim() > 3 and [n for n in x.shape[:-1] if n != 1] == [n for n in (batch, width) if n != 1]:
        x = x.reshape(batch, width, x.shape[-1])
    if x.dim() != 3 or tuple(x.shape[:2]) != (batch, width):
        raise RuntimeError(f"{name} receives inputs of shape {tuple(x.shape)}, not one row per token of the batch "
                           f"({batch} × {width}), so its thinking features cannot be told apart: leave it out of "
                           "config.target_modules.")
    b_idx, t_idx = index
    return x[b_idx.to(x.device), t_idx.to(x.device)].cpu()


def _input_device(model: nn.Module):
    return model.get_input_embeddings().weight.device


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head: the passes that read module inputs or attention run it alone."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


# ---------------------------------------------------------------------------------------------- stage 1
@dataclass
class ThinkFeatures:
    """SVD of the reasoning model's module inputs at the thinking positions, per group of modules that share an
    input (q/k/v; gate/up). Depends only on the reasoning model and its calibration set, so one instance serves any
    number of instruct models (see :meth:`save` / :meth:`load`).

    Attributes:
        bases: group name → (V [d, k], s [k]) of the group's feature matrix H [m, d] (with a column of ones when
            ``settings["project_bias"]`` and a module of the group has a bias).
        module_group: module name → group name.
        settings: what the features were computed with (positions, window, project_bias, the SVD's precision,
            num_samples, num_rows, and ``calls_per_pass`` for groups that run more than once in a pass; from a
            merger also the think tokens, think_spacing, max_length and the reasoning model's fingerprint, the
            calibration set's source and hashes (``calibration``), the warnings its calibration data and layout
            drew (``data_warnings``, ``spacing_warnings``: a merge that reuses the features reports them again),
            and for ``lam="auto"`` the ``holdout_share`` and ``holdout_seed`` of the held-out draw).
        heldout: reasoning samples kept out of the features for ``lam="auto"``: (token ids, thinking positions)
            each, so that features reused in another merge can still measure L_think.
    """

    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
    module_group: dict[str, str]
    settings: dict = field(default_factory=dict)
    heldout: list[tuple[list[int], list[int]]] = field(default_factory=list)

    def __repr__(self) -> str:  # the bases are whole matrices: a summary, not their values
        shown = {k: self.settings[k] for k in ("positions", "num_samples", "num_rows", "precision")
                 if k in self.settings}
        return (f"ThinkFeatures({len(self.bases)} groups of {len(self.module_group)} modules, "
                f"{len(self.heldout)} held-out samples, {', '.join(f'{k}={v!r}' for k, v in shown.items())})")

    def basis(self, module_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if module_name not in self.module_group:
            raise KeyError(f"No thinking features were captured for {module_name}: compute the features with the "
                           "same target_modules and layers as the merge.")
        return self.bases[self.module_group[module_name]]

    def check_compatible(self, config: RainMergingConfig, module_names: Sequence[str], projects: bool = True
                         ) -> None:
        """Refuse features computed with other position settings or sample cap, for other modules, (for
        ``lam="auto"``) with another held-out draw, or (when their bases will project, ``projects``) by an SVD in
        another precision or too coarse for ``config.rcond``."""
        # the generation settings are recorded only for features of samples whose traces the model wrote
        for key in ("positions", "window", "project_bias", "think_open", "think_close", "think_spacing",
                    "max_length", "max_reasoning_samples", "max_new_tokens", "do_sample", "temperature", "top_p",
                    "generation_seed"):
            if key == "window" and config.positions not in ("window", "window-before-answer"):
                continue  # the radius plays no part in the other position sets
            if key in ("temperature", "top_p", "generation_seed") and not config.do_sample:
                continue  # greedy traces: do_sample itself says they differ
            name = "seed" if key == "generation_seed" else key  # the seed the sampled traces were drawn with
            if key in self.settings and self.settings[key] != getattr(config, name):
                raise ValueError(f"These thinking features were computed with {name}={self.settings[key]!r} but the "
                                 f"config asks for {getattr(config, name)!r}: recompute them or change the config.")
        recorded = self.settings.get("precision")
        floor = RCOND_FLOOR.get(recorded)
        if projects and config.projection == "svd" and floor is not None and config.rcond < floor:
            # the config's own floor is for its precision; these singular values are only as exact as their SVD
            raise ValueError(f"These thinking features' SVD ran in {recorded}, which resolves "
                             f"singular values down to about {floor:g}·σ_max, but the config asks for rcond="
                             f"{config.rcond:g}: below that, rounding noise would be protected. Recompute the "
                             f"features with precision='float64', or use rcond >= {floor:g}.")
        if projects and recorded is not None and recorded != config.precision:
            raise ValueError(f"These thinking features' SVD ran in {recorded}, but the config asks for precision="
                             f"{config.precision!r}: recompute them in it (pass reasoning_calibration=... to merge()), "
                             f"or set precision={recorded!r}.")
        # lam="auto" measures L_think on the samples these features left out: the config must name the same draw
        for recorded, key in (("holdout_share", "lam_auto_holdout"), ("holdout_seed", "seed")):
            if config.lam == "auto" and recorded in self.settings and self.settings[recorded] != getattr(config, key):
                raise ValueError(f"These thinking features held out the lam='auto' samples drawn with {key}="
                                 f"{self.settings[recorded]!r}, but the config asks for {getattr(config, key)!r}, "
                                 "and the saved config must reproduce the hold-out: pass reasoning_calibration=... to "
                                 f"merge() to draw it anew, set {key}={self.settings[recorded]!r}, or set lam to a "
                                 "number.")
        missing = [m for m in module_names if m not in self.module_group]
        if missing:
            raise ValueError(f"The thinking features lack {len(missing)} merged modules (e.g. {missing[0]}): "
                             "recompute them with the merge's target_modules and layers.")

    def save(self, path: str | os.PathLike) -> None:
        """Write the features to one safetensors file (metadata in its header)."""
        tensors = {}
        for group, (v, s) in self.bases.items():
            tensors[f"{group}::V"] = v.contiguous().cpu()
            tensors[f"{group}::s"] = s.contiguous().cpu()
        if self.heldout:
            ids, positions = zip(*self.heldout)
            tensors[HELDOUT + "::ids"] = torch.tensor([t for x in ids for t in x], dtype=torch.int64)
            tensors[HELDOUT + "::ids_len"] = torch.tensor([len(x) for x in ids], dtype=torch.int64)
            tensors[HELDOUT + "::pos"] = torch.tensor([p for x in positions for p in x], dtype=torch.int64)
            tensors[HELDOUT + "::pos_len"] = torch.tensor([len(x) for x in positions], dtype=torch.int64)
        meta = {"format": FEATURES_FORMAT, "module_group": json.dumps(self.module_group),
                "settings": json.dumps(self.settings)}
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ThinkFeatures:
        def damaged(what: str) -> ValueError:
            return ValueError(f"{path} is damaged: {what}. Compute the features again "
                              "(RainMerger.compute_features) and save them.")

        path = Path(path).expanduser()
        if path.is_dir():  # safetensors' own error for it is "No such device"
            found = sorted(p.name for p in path.glob("*.safetensors"))[:3]
            raise IsADirectoryError(f"{path} is a folder; ThinkFeatures.load takes the file merger.features.save(path) "
                                    f"wrote{f' (the folder holds {found})' if found else ''}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FEATURES_FORMAT:
                    raise ValueError(f"{path} is not a rain_hf thinking-features file (format "
                                     f"{meta.get('format')!r}).")
                bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
                held = {}
                for key in f.keys():
                    group, _, part = key.rpartition("::")
                    if group == HELDOUT:
                        held[part] = f.get_tensor(key).tolist()
                        continue
                    if part not in ("V", "s"):  # every tensor saved is a group's V or s, or a held-out sample
                        raise damaged(f"it holds a tensor {key!r} that is no group's V or s")
                    v, s = bases.get(group, (None, None))
                    if part == "V":
                        v = f.get_tensor(key)
                    else:
                        s = f.get_tensor(key)
                    bases[group] = (v, s)
        except SafetensorError as exc:  # a cut-off copy, or a file of another kind
            raise damaged(f"it is no complete safetensors file ({exc}); if it is not the features file, pass the "
                          "one merger.features.save(path) wrote") from exc

        try:
            module_group, settings = json.loads(meta["module_group"]), json.loads(meta["settings"])
        except (KeyError, ValueError) as exc:
            raise damaged(f"its metadata lacks a readable {exc}") from exc
        if not isinstance(module_group, dict) or not isinstance(settings, dict):
            raise damaged("its module_group or settings metadata is not a mapping")
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(settings.get("precision"))
        for group in sorted(set(module_group.values())):
            v, s = bases.get(group, (None, None))
            if v is None or s is None or v.dim() != 2 or s.dim() != 1 or v.shape[1] != s.numel():
                shapes = [None if x is None else list(x.shape) for x in (v, s)]
                raise damaged(f"the basis of {group} is missing or malformed (V, s shapes {shapes}; V must be [d, k] "
                              "and s [k])")
            if dtype is not None and (v.dtype != dtype or s.dtype != dtype):
                raise damaged(f"the basis of {group} is stored as {v.dtype}/{s.dtype}, not the "
                              f"{settings['precision']} its SVD ran in")
        heldout = []
        if held:
            try:
                ids, pos = iter(held["ids"]), iter(held["pos"])
                heldout = [([next(ids) for _ in range(n)], [next(pos) for _ in range(m)])
                           for n, m in zip(held["ids_len"], held["pos_len"], strict=True)]
            except (KeyError, StopIteration, ValueError) as exc:
                raise damaged(f"its held-out samples do not add up ({exc!r})") from exc
        return cls(bases, module_group, settings, heldout)


def _register_all(pairs: Sequence[tuple[nn.Module, Any]], pre: bool, with_kwargs: bool = False) -> list[Any]:
    """Register each (module, hook) as a forward pre-hook (``pre``) or forward hook; all of them or none: a failure
    part way removes the ones already registered, so no hook outlives a failed call."""
    handles: list[Any] = []
    try:
        for module, hook in pairs:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs) if pre else
                           module.register_forward_hook(hook, with_kwargs=with_kwargs))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


class _FeatureRecorder:
    """Forward pre-hooks that keep each targeted module's input rows at the thinking positions.

    Modules called one after another on the very same input tensor (q/k/v, gate/up) share one feature matrix.
    """

    def __init__(self, model: nn.Module, targets: Sequence[TargetModule]) -> None:
        modules = dict(model.named_modules())
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.module_group: dict[str, str] = {}
        # inputs each group read in the batch running now, and the most over batches: a module that runs twice in a
        # pass (Gemma 3n's AltUp router) has two inputs to protect, which the sequential replay must wait for
        self.batch_calls: dict[str, int] = {}
        self.calls_per_pass: dict[str, int] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self.index: tuple[torch.Tensor, torch.Tensor] | None = None
        self.shape: tuple[int, int] = (0, 0)  # (batch rows, padded length) of the batch running now
        self.handles = _register_all([(modules[t.name], self._hook(t.name)) for t in targets], pre=True)

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                group = self._last[1]
            else:
                group = self.module_group.get(name, name)
                self.rows.setdefault(group, []).append(_rows_at(x, self.index, self.shape, name))
                self.batch_calls[group] = self.batch_calls.get(group, 0) + 1
                self.calls_per_pass[group] = max(self.calls_per_pass.get(group, 0), self.batch_calls[group])
            # the grouping is decided on the first batch and must stay the same on the others
            self.module_group.setdefault(name, group)
            self._last = (x, group)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None


@torch.no_grad()
def capture_think_features(
    model: nn.Module,
    samples: Sequence[CalibrationSample],
    targets: Sequence[TargetModule],
    config: RainMergingConfig,
    pad_token_id: int,
    svd_device: str | torch.device | None = None,
) -> ThinkFeatures:
    """Stage-1 features: one forward pass per batch captures every targeted module's input at the thinking
    positions of every layer; then one SVD per input group.

    Args:
        model: the reasoning model (any device map).
        samples: reasoning calibration samples.
        targets: the modules to be merged (from :func:`find_target_modules`).
        config: positions, window, batch_size, project_bias and precision are used.
        pad_token_id: id used to right-pad batches (masked out).
        svd_device: where to run the SVDs (default: the model's input device).
    """
    device = _input_device(model)
    decoder = _decoder(model)  # before any hook: nothing may fail between the hooks and the try removing them
    recorder = _FeatureRecorder(model, targets)
    n_rows = 0
    try:
        with eval_mode(model):
            for batch in tqdm(list(_batches(samples, config.batch_size)), desc="stage 1: thinking features",
                              unit="batch"):
                ids, mask = _pad(batch, pad_token_id, device)
                recorder.index = _think_index(batch, config)
                recorder.shape = tuple(ids.shape)
                recorder._last = None
                recorder.batch_calls = {}
                n_rows += len(recorder.index[1])
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        recorder.close()
    uncalled = [t.name for t in targets if t.name not in recorder.module_group]
    if uncalled:
        raise ValueError(
            f"{len(uncalled)} of the modules to merge never ran in the reasoning model's forward pass over the "
            f"calibration data (e.g. {uncalled[0]}), so they have no thinking features: the model uses their "
            "weights without calling them (BLOOM with pretraining_tp > 1 and slow_but_exact) or no calibration "
            "token reaches them (an unrouted expert). Leave them out with target_modules (a list of the other "
            "modules' names, or a regular expression), or add calibration samples that reach them.")
    svd_device = svd_device or device
    biased = {recorder.module_group[t.name] for t in targets if t.has_bias}  # every target ran (checked above)
    bases = {}
    for group, chunks in tqdm(recorder.rows.items(), desc="stage 1: feature SVD", unit="group"):
        bases[group] = _rows_svd(chunks, config, svd_device, bias_column=group in biased, where=group)
        chunks.clear()
    settings = {"positions": config.positions, "window": config.window, "project_bias": config.project_bias,
                "precision": config.precision, "max_reasoning_samples": config.max_reasoning_samples,
                "num_samples": len(samples), "num_rows": n_rows}
    repeated = {group: n for group, n in recorder.calls_per_pass.items() if n > 1}
    if repeated:
        settings["calls_per_pass"] = repeated
    logger.info("Captured thinking features: %d samples, %d positions, %d input groups", len(samples), n_rows,
                len(bases))
    return ThinkFeatures(bases, dict(recorder.module_group), settings)


class NonFiniteFeaturesError(ValueError):
    """Thinking features that hold inf or NaN: the activations they were taken from overflowed."""


def _rows_svd(chunks: list[torch.Tensor], config: RainMergingConfig, device, bias_column: bool, where: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, s) on the CPU of the feature matrix stacked from ``chunks``, with the column of ones when
    ``config.project_bias`` and ``bias_column`` (a module of the group has a bias to project with its weight).
    ``where`` names the group's input in the error raised for non-finite features."""
    h = torch.cat(chunks).to(device)
    bad = int((~torch.isfinite(h)).sum())
    if bad:
        # An SVD of such rows either fails inside LAPACK or gives NaN singular values, which would protect
        # nothing and merge the task vector unprojected.
        rows, cols = h.shape
        raise NonFiniteFeaturesError(
            f"The thinking features at the input of {where} hold {bad} non-finite values (inf or NaN) in a [{rows} x "
            f"{cols}] matrix: the reasoning model's activations overflow (float16 models often do: load it with "
            "torch_dtype='float32', and output_dtype='float16' to save in its own dtype) or its weights hold inf/NaN "
            "(check the checkpoint).")
    if config.project_bias and bias_column:
        h = with_bias_column(h)
    v, s = feature_svd(h, torch.float64 if config.precision == "float64" else torch.float32)
    return v.cpu(), s.cpu()


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside it, through tuples (named ones included), lists and
    dicts; anything else is kept as is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [map_tensors(o, fn) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _shared_mappings(obj: Any) -> Iterator[Mapping]:
    """The mappings other than dicts inside ``obj`` (tuples, lists and dicts), which :func:`map_tensors` keeps as
    they are: transformers' ``KVSharingDict`` (a ``UserDict``), which the layers that store keys and values for
    later layers fill in place, so it must stay the same object."""
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _shared_mappings(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _shared_mappings(o)
    elif isinstance(obj, Mapping):
        yield obj


def move_tensors(obj: Any, device: torch.device, moved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """``obj`` (tensors inside tuples, lists and dicts, e.g. a layer call's arguments) with every tensor on
    ``device``; a tensor met twice, here or in an earlier call with the same ``moved``, is copied once, so tensors
    the decoder shares between layers (masks, position embeddings) stay shared. ``moved`` maps a source tensor's
    id to (source, copy), holding the source so that its id cannot be reused while the dict lives."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in moved:
            moved[id(t)] = (t, t.to(device))
        return moved[id(t)][1]

    return map_tensors(obj, move)


class _Stop(Exception):
    """Raised from a pre-hook once everything a pass was run for is recorded: the rest of the forward pass is
    not needed."""


class LayerReplay:
    """The sequential form of stage 1 without re-running the prefix for every group: the calibration batches'
    hidden states at the input of one decoder layer, moved forward one layer at a time through the model as it is
    being merged.

    A group of layer ℓ is captured by running layer ℓ alone on the cached inputs, and :meth:`group_basis` moves
    the cache past a layer only once it is asked for a later one, so each decoder layer runs about (groups + 1)
    times over the calibration set in all, instead of once per group after it.

    Example:
        >>> replay = LayerReplay(model, samples, config, pad_token_id)          # doctest: +SKIP
        >>> v, s = replay.group_basis(0, ["model.layers.0.self_attn.q_proj"])  # doctest: +SKIP
        >>> # ... merge layer 0's q/k/v, then ask for the next group

    With ``config.sequential_offload`` the cache is kept in CPU memory and each batch is copied to the layer's
    device only while it runs.

    Args:
        model: the model being merged (any device map).
        samples: reasoning calibration samples.
        config: positions, window, batch_size, project_bias, precision and sequential_offload are used.
        pad_token_id: id used to right-pad batches (masked out).
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, samples: Sequence[CalibrationSample], config: RainMergingConfig,
                 pad_token_id: int) -> None:
        self.model = model
        self.config = config
        self.layers = find_decoder_layers(model)[1]
        self.layer = 0  # the layer whose input ``hidden`` holds
        self.broken = False  # set while _advance_to moves the batches on, and left set if it is interrupted
        self.hidden: list[torch.Tensor] = []
        self.index: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.shapes: list[tuple[int, int]] = []  # (batch rows, padded length) per batch
        # Per batch and layer, the other arguments the decoder passed (masks differ between layer types, e.g.
        # sliding-window layers); tensors shared between layers are stored once, by reference.
        self.calls: list[list[tuple[tuple, dict]]] = []
        self.store = torch.device("cpu") if config.sequential_offload else None
        # where each layer's inputs arrived in the decoder's own pass, to put an offloaded batch back there
        self.devices: list[torch.device] = []
        device = _input_device(model)
        last = len(self.layers) - 1
        shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one batch's offloaded tensors, by source id

        def record(i: int):
            def hook(_module, args, kwargs):
                hidden, rest = (args[0], args[1:]) if args else (kwargs["hidden_states"], ())
                if len(self.calls) == 1:
                    self.devices.append(hidden.device)
                if i == 0:
                    self.hidden.append(hidden if self.store is None else hidden.to(self.store))
                call = (rest, {k: v for k, v in kwargs.items() if k != "hidden_states"})
                self.calls[-1].append(call if self.store is None else move_tensors(call, self.store, shared))
                if i == last:
                    raise _Stop

            return hook

        decoder = _decoder(model)  # before the hooks (see capture_think_features)
        handles = _register_all([(layer, record(i)) for i, layer in enumerate(self.layers)], pre=True,
                                with_kwargs=True)
        try:
            with eval_mode(model):
                for batch in _batches(samples, config.batch_size):
                    ids, mask = _pad(batch, pad_token_id, device)
                    self.index.append(_think_index(batch, config))
                    self.shapes.append(tuple(ids.shape))
                    self.calls.append([])
                    try:
                        decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                    except _Stop:
                        continue
                    finally:
                        shared.clear()  # drops the references that kept this batch's device tensors alive
                    raise RuntimeError("The decoder's forward pass never reached its last layer: the sequential "
                                       "projection cannot replay it layer by layer.")
        finally:
            for h in handles:
                h.remove()

    def nbytes(self) -> int:
        """Bytes the cache holds (one layer's inputs for every batch, and every tensor argument counted once): the
        same at every layer, as each layer's outputs have its inputs' shape."""
        seen: dict[int, int] = {}

        def count(t: torch.Tensor) -> None:
            seen.setdefault(id(t), t.numel() * t.element_size())

        map_tensors((self.hidden, self.calls), count)
        for shared in _shared_mappings(self.calls):
            map_tensors(list(shared.values()), count)
        return sum(seen.values())

    def _run_layer(self, b: int) -> torch.Tensor:
        hidden, args, kwargs = self.hidden[b], *self.calls[b][self.layer]
        if self.store is not None:
            hidden, args, kwargs = move_tensors((hidden, args, kwargs), self.devices[self.layer], {})
        out = self.layers[self.layer](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def _advance_to(self, layer: int) -> None:
        if self.broken:
            raise RuntimeError("This LayerReplay was interrupted while advancing a layer, so its batches sit at "
                               "different layers: build a new one.")
        if layer < self.layer:
            raise ValueError(f"Layer {layer} was asked for after layer {self.layer}: the groups must come in "
                             "forward order.")
        while self.layer < layer:
            # batch by batch in place, so the old and the new layer's inputs are never all alive together; an
            # interruption part way leaves the batches at different layers, which no later call may read
            self.broken = True
            with eval_mode(self.model):
                for b in range(len(self.hidden)):
                    out = self._run_layer(b)
                    self.hidden[b] = out if self.store is None else out.to(self.store)
            self.layer += 1
            self.broken = False

    @torch.no_grad()
    def group_rows(self, layer: int, module_names: Sequence[str], calls: int = 1) -> list[torch.Tensor]:
        """The input rows [m_b, d] per batch, at the thinking positions, of the group of ``module_names`` (modules
        of decoder layer ``layer`` that read the same input), in the model as it is now; a group that runs
        ``calls`` times in a pass (on different inputs) gives the rows of every call, stacked."""
        self._advance_to(layer)
        modules = dict(self.model.named_modules())
        rows: list[torch.Tensor] = []
        b, seen = 0, []

        def hook(_module, args):
            if seen and args[0] is seen[-1]:
                return  # another module of the group on the same input
            seen.append(args[0])
            rows.append(_rows_at(args[0], self.index[b], self.shapes[b], module_names[0]))
            if len(seen) == calls:
                raise _Stop

        handles = _register_all([(modules[name], hook) for name in module_names], pre=True)
        try:
            with eval_mode(self.model):
                for b in range(len(self.hidden)):
                    seen.clear()
                    batch_rows = len(rows)
                    try:
                        self._run_layer(b)
                    except _Stop:
                        if len(rows) - batch_rows > 1:
                            rows[batch_rows:] = [torch.cat(rows[batch_rows:])]
                        continue
                    raise RuntimeError(f"Decoder layer {layer} called {module_names[0]} {len(seen)} times, not "
                                       f"{calls}: its thinking features cannot be captured.")
        finally:
            seen.clear()
            for h in handles:
                h.remove()
        return rows

    def group_basis(self, layer: int, module_names: Sequence[str], svd_device: str | torch.device | None = None,
                    calls: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """V [d, k] and s [k] of the group's feature matrix H [m, d] (see :meth:`group_rows` and
        :func:`rain_hf.projection.feature_svd`)."""
        biased = any(getattr(self.model.get_submodule(name), "bias", None) is not None for name in module_names)
        return _rows_svd(self.group_rows(layer, module_names, calls), self.config,
                         svd_device or _input_device(self.model), bias_column=biased, where=module_names[0])


# ---------------------------------------------------------------------------------------------- stage 2
def eager_attention_bytes(lengths: Sequence[int], batch_size: int, num_heads: int, dtype_bytes: int) -> int:
    """Peak bytes of one layer's eager attention over the largest calibration batch.

    Eager attention holds the scores [B, H, T, T] in the model's dtype, their float32 softmax and its cast back,
    with T the batch's longest sequence; :func:`collect_attention_stats` batches ``lengths`` in order.
    """
    largest = max((len(lengths[i:i + batch_size]) * max(lengths[i:i + batch_size]) ** 2
                   for i in range(0, len(lengths), batch_size)), default=0)
    return largest * num_heads * (2 * dtype_bytes + 4)


@torch.no_grad()
def collect_attention_stats(
    model: nn.Module,
    samples: Sequence[CalibrationSample],
    layers: Sequence[int],
    batch_size: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer, per-head alignment a and leakage u from the model's real attention probabilities.

    a[l, h] = mean over samples of the mean over queries t ∈ R of Σ_{τ ∈ I} A_l[h, t, τ]; u the same over t ∈ U.
    Each layer's attention map is reduced inside its own hook, so no two layers' T×T maps are alive together.
    In a sliding-window or chunked layer only the queries whose window (chunk) reaches an instruction token
    count: for the others the mass is zero by the mask, not by the head. Such a layer where no
    constrained-response query reaches one has no measurement: its rows are NaN.

    Returns:
        alignment [len(layers), H] and leakage [len(layers), H] (float64).
    """
    _, blocks = find_decoder_layers(model)
    geo = attention_geometry(model.config)
    device = _input_device(model)
    n = len(layers)
    sums = {"a": torch.zeros(n, geo.num_heads, dtype=torch.float64), "u": torch.zeros(n, geo.num_heads,
                                                                                     dtype=torch.float64)}
    counts = {"a": torch.zeros(n, dtype=torch.float64), "u": torch.zeros(n, dtype=torch.float64)}
    masks: dict[tuple[str, int | None], torch.Tensor] = {}
    all_windows = local_attention(model.config)
    with_response = 0  # samples with constrained-response tokens
    windows = [all_windows[layer] if layer < len(all_windows) else None for layer in layers]

    def make_hook(row: int):
        def hook(_module, _args, output):
            attn = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if attn is None:
                raise RuntimeError("The attention module returned no attention probabilities; stage 2 needs the "
                                   "'eager' attention implementation.")
            mass = attention_mass(attn, masks["I", None].to(attn.device))
            for key, qmask in (("a", masks["R", windows[row]]), ("u", masks["U", windows[row]])):
                mean, valid = masked_query_mean(mass, qmask.to(attn.device))
                if not bool(torch.isfinite(mean[valid]).all()):
                    # NaN must stay the mark of a head no query could measure (the measured heads' mean α, a warning);
                    # an overflowed softmax would otherwise pass for one
                    heads = sorted({int(h) for h in (~torch.isfinite(mean[valid])).nonzero()[:, -1]})
                    raise NonFiniteFeaturesError(
                        f"Stage 2: the attention probabilities of layer {layers[row]} (heads {heads}) hold inf or "
                        f"NaN in {attn.dtype}: the attention scores overflowed.")
                sums[key][row] += mean[valid].sum(dim=0).double().cpu()
                counts[key][row] += float(valid.sum())

        return hook

    peak = eager_attention_bytes([len(s.input_ids) for s in samples], batch_size, geo.num_heads,
                                 next(model.parameters()).element_size())
    # eager is the one implementation that returns the probabilities; its T×T maps dwarf a flash/sdpa pass
    logger.info("Stage 2 runs eager attention: up to %.1f MiB per layer for the largest calibration batch (lower "
                "batch_size or max_length if that does not fit).", peak / 2**20)
    previous = getattr(model.config, "_attn_implementation", None)
    decoder = _decoder(model)  # before the hooks (see capture_think_features)
    handles = _register_all([(_attention_of(blocks[layer])[1], make_hook(row)) for row, layer in enumerate(layers)],
                            pre=False)
    try:
        model.set_attn_implementation("eager")
        with eval_mode(model):
            for batch in tqdm(list(_batches(samples, batch_size)), desc="stage 2: instruction attention", unit="batch"):
                ids, mask = _pad(batch, pad_token_id, device)
                width = ids.shape[1]
                masks["I", None] = _span_mask(batch, "instruction_spans", width)
                masks["R", None] = _span_mask(batch, "constrained_spans", width)
                masks["U", None] = _span_mask(batch, "unrelated_spans", width)
                with_response += int(masks["R", None].any(dim=1).sum())
                for window in set(windows) - {None}:
                    for kind in "RU":
                        masks[kind, window] = _sees_keys(masks[kind, None], masks["I", None], window)
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        if previous is not None:
            model.set_attn_implementation(previous)
    if not with_response:
        raise ValueError("No instruction calibration sample has constrained-response tokens (R) to measure "
                         "alignment on: the responses are empty, their annotated R spans all lie past "
                         "config.max_length (raise it), or annotated unrelated spans cover them whole.")
    alignment = sums["a"] / counts["a"].unsqueeze(1)  # NaN for a local layer that never saw the instruction
    leakage = sums["u"] / counts["u"].clamp(min=1).unsqueeze(1)
    leakage[counts["a"] == 0] = float("nan")
    return alignment, leakage

