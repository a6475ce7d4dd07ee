"""`RainMergingConfig`: every knob of the merge, with documented defaults and a JSON round trip."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("rain", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")
POSITION_SETS = ("think", "think+prev", "window", "window-before-answer")
PROJECTIONS = ("svd", "ridge")
NORMALIZATIONS = ("mean", "none")
MALFORMED_POLICIES = ("skip", "error")
DTYPES = ("float32", "float16", "bfloat16")
PRECISIONS = ("float32", "float64")
# Smallest usable rcond per SVD precision, ~100 machine epsilons: a float32 SVD of a rank-300 feature matrix
# [2400, 3584] gave noise singular values at 1.2e-6·σ_max (the exact ones are 0).
RCOND_FLOOR = {"float32": 1e-5, "float64": 1e-13}
#: the ridge strength that half-protects directions at RCOND_FLOOR·σ_max (ε = ridge·σ_max², shrink s²/(s² + ε))
RIDGE_FLOOR = {"float32": 1e-10, "float64": 1e-26}

CONFIG_NAME = "rain_merging_config.json"


class ConfigError(ValueError):
    """A field of :class:`RainMergingConfig` has a value the merge cannot use."""


def did_you_mean(unknown: Sequence[Any], known: Iterable[str]) -> str:
    """' (key: did you mean …?)' hints for misspelt keys, one per key with a close known one."""
    known = list(known)
    close = {key: difflib.get_close_matches(str(key), known, n=1) for key in unknown}
    return "".join(f" ({key!r}: did you mean {match[0]!r}?)" for key, match in close.items() if match)


_PEFT_CONVENTIONS = "no such switch: TIES and DARE follow peft's conventions (see rain_hf.methods)"
#: mergekit's merge parameters and what RainMergingConfig has instead, named in the error on an unknown key
MERGEKIT_PARAMETERS = {"weight": "use lam", "lambda": "use lam", "t": "use slerp_t", "out_dtype": "use output_dtype",
                       "normalize": _PEFT_CONVENTIONS, "rescale": _PEFT_CONVENTIONS,
                       "int8_mask": "leave it out: in mergekit it only stores the masks in int8 to save memory, and "
                                    "changes no merged value"}

#: mergekit merge methods whose name is close to one of ours but means another merge (``linear`` is not
#: ``dare_linear``), or that are not offered here
MERGEKIT_METHODS = {
    "linear": "a weighted average of whole models; the nearest here are 'task_arithmetic' (λ times the instruct "
              "model's task vector added to the reasoning model) and 'slerp'",
    "nuslerp": "use 'slerp'",
    "breadcrumbs": "not offered here", "breadcrumbs_ties": "not offered here", "della": "not offered here",
    "della_linear": "not offered here", "model_stock": "not offered here", "passthrough": "not offered here",
    "sce": "not offered here", "karcher": "not offered here", "nearswap": "not offered here",
    "arcee_fusion": "not offered here", "multislerp": "not offered here",
}


def mergekit_hints(unknown: Sequence[Any], advice: Mapping[str, str]) -> str:
    """' ('key' is mergekit's: …)' hints for the keys ``advice`` knows as mergekit's."""
    return "".join(f" ({key!r} is mergekit's: {advice[key]})" for key in unknown
                   if isinstance(key, str) and key in advice)


def holdout_count(n: int, share: float) -> int:
    """How many of ``n`` calibration samples ``lam="auto"`` holds out: ``round(n · share)``, at least one."""
    return max(1, round(n * share))


def fewest_for_holdout(share: float) -> int:
    """The fewest reasoning calibration samples that leave one for stage 1 after ``lam="auto"``'s hold-out."""
    return next(n for n in range(2, 10**6) if n - holdout_count(n, share) >= 1)


@dataclass
class RainMergingConfig:
    """All settings of a RAIN merge (and of the baseline methods that share its engine).

    Defaults are the settings the project's organism benchmark supports (see ``benchmarks/organism/RESULTS.md``).
    Setting a name that is no setting (``config.lamda = 3``) is an ``AttributeError`` naming the closest one.

    Example:
        >>> from rain_hf import RainMergingConfig
        >>> cfg = RainMergingConfig(lam=1.5, positions="window", window=3)
        >>> RainMergingConfig.from_json(cfg.to_json()) == cfg
        True

    Attributes:
        method: ``"rain"`` or a baseline: ``"task_arithmetic"``, ``"ties"``, ``"dare_ties"``, ``"dare_linear"``,
            ``"slerp"``.
        lam: global strength λ of θ = θ_R + λ·α⊙Δ⊥ (also the weight of the instruct vector in the baselines;
            with ``ties`` and ``dare_ties``, and ``dare_linear`` at ``density`` < 1, λ = 0 is not the reasoning
            model, see :mod:`rain_hf.methods`),
            or ``"auto"`` to pick λ on ``lam_grid`` from calibration data alone. Left unset, it is ``"auto"`` for
            ``method="rain"`` (no fixed λ fits every model size: the paper's 7B merge used λ ≈ 1, the organism
            benchmark needs 4–5) and 1.0 for the baselines.
        lam_grid: candidate λ values for ``lam="auto"``.
        lam_auto_max_kl: the largest L_think (mean KL(merged ‖ reasoning) at the thinking positions of held-out
            reasoning calibration samples, the one that predicts the answer's first token left out (the
            think-close token's own, or the last of the whitespace ``think_spacing`` writes after it), as format
            instructions act there, and so are those whose next token the prompt supplies: the chat
            template's tokens before the think-open token, and the think-open token itself where the template
            writes it) ``lam="auto"`` accepts; it picks the largest λ of the grid
            within it (and the think-open guard below), or, when none is, the grid's smallest λ with a warning.
        lam_auto_holdout: share of the reasoning calibration samples held out of stage 1 to measure L_think (a
            random draw seeded with ``seed``, not the last samples, so that a file grouped by domain does not hold
            out one domain only; samples that share a prompt are held out or kept together).
        lam_auto_min_think_open: the smallest share of calibration prompts (the held-out reasoning samples' and,
            with stage 2, the instruction samples') on which the merged model still picks the think-open token
            first where the reasoning model does; ``lam="auto"`` also rejects the λ values below it. It only
            applies to chat templates that let the model decide whether to think (the generation prompt does not
            already end with the think-open token); ``None`` turns it off. A prompt whose format instruction
            changes the answer's first token is where merges tend to lose the think format first: the merged
            model starts the formatted answer instead of thinking, which L_think, an average over every thinking
            position, hardly registers.
        stage1: project the task vector onto the null space of the thinking-token features.
        stage2: scale each attention head by its instruction-attention coefficient.
        positions: which token positions define the thinking features: ``"think"`` (the think tokens),
            ``"think+prev"`` (plus the token before each, whose output predicts it), ``"window"`` (plus a
            ±``window`` neighbourhood of both) or ``"window-before-answer"`` (``"window"`` without the positions
            after the think-close token, whose outputs pick the answer's first tokens).
        window: radius r of the ``"window"`` position set.
        projection: ``"svd"`` (exact projection onto the null space, singular values above ``rcond``·σ_max
            span the protected subspace) or ``"ridge"`` (ΔW − ΔW Hᵀ(HHᵀ+εI)⁻¹H with ε = ``ridge``·σ_max²).
        rcond: relative singular-value cut-off of the SVD projection (at least 1e-5 with float32 precision, 1e-13
            with float64: smaller cut-offs would count rounding noise as features).
        ridge: relative ridge strength of the ridge projection (at least 1e-10 with float32 precision, 1e-26 with
            float64, for the same reason).
        project_bias: also merge biases, projecting [ΔW | Δb] against features with a constant 1 column (every
            method; off, the merged modules keep the reasoning model's biases, and a plan warns when the instruct
            model changed them).
        precision: arithmetic of the projection (``"float32"`` or ``"float64"``).
        sequential: take each module's thinking features from the model being merged instead of the reasoning
            model: input groups (q/k/v, o, gate/up, down) are merged in forward order, and each group's features
            are captured with every earlier group already merged, so the projection also covers what the earlier
            merged layers changed in its input. A module that runs more than once in a layer (Gemma 3n's AltUp
            router) is captured for all its calls before that layer's later groups are merged, so its later calls,
            which read their output, are protected on the layer's reasoning weights. The calibration batches'
            inputs to each decoder layer are cached and replayed, so it costs a few forward passes over the stage-1 calibration in all (per grid value with
            ``lam="auto"``), and memory on the model's device (or the CPU's, see ``sequential_offload``) for one
            layer's inputs (samples × tokens × hidden size in the model's dtype) plus each padded batch's attention
            mask (batch_size × tokens² elements: 1 byte each with sdpa, the model dtype's size with eager
            attention) and position embeddings (cos and sin, up to batch_size × tokens × head_dim each). ``None``
            (YAML ``null``, the default): sequential whenever ``merge()`` has the reasoning calibration samples,
            the one-shot projection when it only has precomputed ``features``; ``True``: always (an error without
            the samples); ``False``: the paper's one-shot projection. :meth:`load` of a sidecar sets an unset
            value to the mode that merge ran in.
        sequential_offload: keep the sequential projection's replay cache (each calibration batch's layer inputs,
            attention masks and position embeddings) in CPU memory and copy one batch at a time to the device of
            the layer it runs through, so an accelerator holds one batch of it instead of the whole calibration set,
            for a host–device copy each way per batch and layer run. Merged weights are the same; nothing changes
            for a model on the CPU. The keys and values Gemma 3n's layers store for later layers stay on the device
            (the layers fill them in place during the replay).
        rho: leakage penalty ρ of the stage-2 score g = a − ρu.
        coef_normalize: ``"mean"`` divides the stage-2 scores by their mean over all heads (mean coefficient 1
            before the clip to ``[coef_min, coef_max]``, so λ alone sets the strength); ``"none"`` keeps the
            paper's literal g / (1 + u).
        coef_min, coef_max: the box the measured heads' coefficients are clipped to. With ``"mean"``, heads no
            response token could measure (sliding-window layers that never see the instruction), and every head
            when the mean score is not positive, get α = 1, stage 1 alone there, even where 1 lies outside the box.
        probe_lam: the expansion point of the stage-2 probe model θ_R + probe_lam·Δ⊥.
        target_modules: ``"all-linear"`` (every linear layer inside the decoder blocks) or, as in peft, a list of
            module names or dotted suffixes of them such as ``["q_proj", "v_proj", "mlp.down_proj"]`` (a tuple or
            set too; an entry that matches no linear module, or none in the layers ``layers`` selects, is an
            error), or a regular expression that must match a module's whole name (``".*self_attn.(q|v)_proj"``).
        layers: indices of decoder layers to merge (``None``: all).
        think_open, think_close: the thinking special tokens; each must be a single token of the tokenizer.
        think_spacing: the text written after think_open, before think_close and after think_close when a
            calibration sample (or a prompt-only generation prefix) is rendered. The default is DeepSeek-R1's
            layout (a newline after the think-open token, one before the think-close token, two after it); use
            ``["", "", ""]`` for models that write ``<think>…</think>answer`` (the project's organism). The data's
            own whitespace around the tags is replaced by it, except that a chat template whose generation prompt
            already ends with think_open and whitespace (R1-Distill's ``<think>`` and a newline) keeps its own; a
            merge warns when the reasoning model confidently writes something else after the think-open or
            think-close token on most calibration samples (and, where the template leaves the think-open token to
            the model, when it confidently writes something else first: an instruct model as reasoning model).
        output_dtype: dtype of every floating-point tensor saved (and config.json's ``dtype``), a name
            (``"bfloat16"``) or a torch dtype (``None``: as the reasoning model stores them). The merged weights
            take it in memory too; the model in memory keeps its loaded dtype elsewhere (embeddings, norms).
        batch_size: calibration samples per forward pass. Stage 2 runs eager attention, which holds each layer's
            attention scores and their float32 softmax, batch_size × heads × tokens² × (4 + 2 × dtype bytes):
            about 14 GiB for 4 samples of 4096 tokens with 28 heads in bf16 (logged when stage 2 starts).
        max_length: calibration sequences are cut to this many tokens (the think tokens and at least one answer
            token must survive the cut); keep it within the model's ``max_position_embeddings``: longer samples
            are warned about.
        max_reasoning_samples, max_instruction_samples: use at most this many calibration samples (``None``: all):
            the first usable ones in input order. The paper's files are grouped by domain (its reasoning set starts
            with 50 maths samples), so shuffle a file with a seed before capping it to draw from every domain.
        on_malformed: ``"skip"`` a malformed calibration sample (logged with its index, and listed in the merge's
            report and card) or raise (``"error"``).
        max_new_tokens, do_sample, temperature, top_p: generation of traces for prompt-only calibration data
            (greedy is the plain argmax: the model's own repetition penalties, beams and token bans are not applied).
        density: fraction of entries kept by TIES / DARE (peft's conventions, not mergekit's: see
            :mod:`rain_hf.methods`).
        slerp_t: interpolation factor of SLERP (0: reasoning model, 1: instruct model).
        seed: seed of DARE's random masks, of sampled generation and of the draw of the samples ``lam="auto"``
            holds out (so it can change the λ picked). DARE's masks use its low 32 bits only (torch's CPU
            generator), so seeds that differ by a multiple of 2³² draw the same masks.
        max_shard_size: shard size of ``save_pretrained`` (bytes or a string such as ``"5GB"``).
    """

    method: str = "rain"
    lam: float | str | None = None
    lam_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0])
    lam_auto_max_kl: float = 0.01
    lam_auto_holdout: float = 0.25
    lam_auto_min_think_open: float | None = 0.98
    stage1: bool = True
    stage2: bool = True
    positions: str = "window-before-answer"
    window: int = 3
    projection: str = "svd"
    rcond: float = 0.1
    ridge: float = 1e-2
    project_bias: bool = False
    precision: str = "float32"
    sequential: bool | None = None
    sequential_offload: bool = False
    rho: float = 0.5
    coef_normalize: str = "mean"
    coef_min: float = 0.0
    coef_max: float = 2.0
    probe_lam: float = 1.0
    target_modules: str | list[str] = "all-linear"
    layers: list[int] | None = None
    think_open: str = "<think>"
    think_close: str = "</think>"
    think_spacing: list[str] = field(default_factory=lambda: ["\n", "\n", "\n\n"])
    output_dtype: str | None = None
    batch_size: int = 4
    max_length: int = 4096
    max_reasoning_samples: int | None = None
    max_instruction_samples: int | None = None
    on_malformed: str = "skip"
    max_new_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.95
    density: float = 0.5
    slerp_t: float = 0.5
    seed: int = 0
    max_shard_size: int | str = "5GB"

    def __setattr__(self, name: str, value: Any) -> None:
        # merger.config.lamda = 3 would otherwise be kept beside lam and change nothing (a subclass keeps its own)
        if type(self) is RainMergingConfig and not name.startswith("_") and name not in _FIELD_NAMES:
            raise AttributeError(f"RainMergingConfig has no setting {name!r}{did_you_mean([name], _FIELD_NAMES)}; "
                                 f"its settings are {sorted(_FIELD_NAMES)}.")
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def _normalize(self) -> None:
        """Tuples, ranges and numpy arrays as lists, numpy numbers and booleans as Python ones (see :meth:`validate`;
        also run by :meth:`to_dict`, for values set after the config was made)."""
        for name in ("lam_grid", "target_modules", "layers", "think_spacing"):  # tuples as peft takes them
            value = getattr(self, name)
            if isinstance(value, (tuple, range)):
                setattr(self, name, list(value))
            elif type(value).__name__ == "ndarray":  # np.linspace(…) as a grid, np.arange(…) as layers
                setattr(self, name, value.tolist())
        if isinstance(self.target_modules, (set, frozenset)):  # peft takes a set of names too
            self.target_modules = sorted(self.target_modules, key=str)
        # numpy scalars (a λ from np.linspace) as the Python numbers they stand for: the config is saved as JSON
        for f in dataclasses.fields(self):
            setattr(self, f.name, _plain_number(getattr(self, f.name)))
        for name in ("lam_grid", "layers"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, [_plain_number(v) for v in getattr(self, name)])
        if type(self.output_dtype).__module__ == "torch":  # torch.bfloat16, as torch_dtype= takes it
            self.output_dtype = str(self.output_dtype).removeprefix("torch.")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field with an unusable value. First, tuples, ranges and
        numpy arrays become lists (a set of ``target_modules`` a sorted list), numpy numbers Python ones, and an
        unset ``lam`` takes the method's default, so ``merger.config.lam = None`` between merges works too."""
        self._normalize()

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                lowered = [a for a in allowed if isinstance(value, str) and a.lower() == value.lower()]
                close = lowered or (difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) else [])
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                if name == "method" and not lowered and isinstance(value, str) and value in MERGEKIT_METHODS:
                    hint = f" ({value!r} is mergekit's: {MERGEKIT_METHODS[value]})"
                raise ConfigError(f"RainMergingConfig.{name}={value!r} is not one of {list(allowed)}{hint}.")

        def number(name: str, lo: float | None = None, hi: float | None = None, strict_lo: bool = False,
                   strict_hi: bool = False, value: Any = _FIELD) -> None:
            value = getattr(self, name) if value is _FIELD else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                raise ConfigError(f"RainMergingConfig.{name} must be a finite number (an int or a float), got "
                                  f"{value!r}.")
            if lo is not None and (value <= lo if strict_lo else value < lo):
                raise ConfigError(f"RainMergingConfig.{name}={value!r} must be {'>' if strict_lo else '>='} {lo}.")
            if hi is not None and (value >= hi if strict_hi else value > hi):
                raise ConfigError(f"RainMergingConfig.{name}={value!r} must be {'<' if strict_hi else '<='} {hi}.")

        def flag(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"RainMergingConfig.{name} must be true or false, got {getattr(self, name)!r}.")

        def positive_int(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"RainMergingConfig.{name} must be a positive integer, got {value!r}.")

        choice("method", METHODS)
        if self.lam is None:
            self.lam = "auto" if self.method == "rain" else 1.0
        if isinstance(self.lam, str):
            if self.lam != "auto":
                raise ConfigError(f"RainMergingConfig.lam={self.lam!r}: use a number or 'auto'.")
            if self.method == "slerp":
                raise ConfigError("RainMergingConfig.lam='auto' works with method='rain' only, and slerp does not "
                                  "use lam: leave lam out and set slerp_t, the interpolation from the reasoning "
                                  "model (0) to the instruct model (1).")
            if self.method != "rain":
                raise ConfigError(f"RainMergingConfig.lam='auto' works with method='rain' only (it measures L_think "
                                  f"on held-out reasoning samples); give method={self.method!r} a number.")
        else:
            number("lam", 0.0)  # a negative λ would subtract the instruct model's task vector
        if not isinstance(self.lam_grid, list) or not self.lam_grid:
            raise ConfigError("RainMergingConfig.lam_grid must be a non-empty list of numbers.")
        for v in self.lam_grid:
            number("lam_grid", 0.0, value=v)
        number("lam_auto_max_kl", 0.0, strict_lo=True)
        number("lam_auto_holdout", 0.0, 0.9, strict_lo=True)
        guard = self.lam_auto_min_think_open
        share = not isinstance(guard, bool) and isinstance(guard, (int, float)) and 0 <= guard <= 1
        if guard is not None and not share:
            raise ConfigError("RainMergingConfig.lam_auto_min_think_open must be a share between 0 and 1, or null "
                              f"to turn the think-open check off, got {guard!r}.")
        for name in ("stage1", "stage2", "project_bias", "do_sample"):
            flag(name)
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise ConfigError("RainMergingConfig.sequential must be true, false or null (sequential when the "
                              f"calibration samples are at hand), got {self.sequential!r}.")
        flag("sequential_offload")
        if self.sequential_offload and (self.sequential is False or not self.stage1):
            raise ConfigError("RainMergingConfig.sequential_offload=True offloads the sequential projection's cache, "
                              "and stage 1 is not sequential here (sequential=False or stage1=False): drop "
                              "sequential_offload or leave sequential unset.")
        if self.sequential and not self.stage1:
            raise ConfigError("RainMergingConfig.sequential=True changes how stage 1 projects, and stage1 is False: "
                              "turn stage 1 on or leave sequential unset.")
        choice("positions", POSITION_SETS)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ConfigError(f"RainMergingConfig.window must be an integer >= 0, got {self.window!r}.")
        choice("projection", PROJECTIONS)
        number("rcond", 0.0, 1.0, strict_lo=True, strict_hi=True)  # rcond 1 would keep no direction
        number("ridge", 0.0, strict_lo=True)
        choice("precision", PRECISIONS)
        floor = RCOND_FLOOR[self.precision]
        if self.projection == "svd" and self.rcond < floor:
            raise ConfigError(
                f"RainMergingConfig.rcond={self.rcond!r} is below what a {self.precision} SVD resolves: singular "
                f"values under about {floor:g}·σ_max are rounding noise there, and protecting their directions "
                f"would remove task-vector directions no feature asks to protect. Use rcond >= {floor:g}"
                + (" or precision='float64'." if self.precision == "float32" else ".")
            )
        if self.projection == "ridge" and self.ridge < RIDGE_FLOOR[self.precision]:
            raise ConfigError(
                f"RainMergingConfig.ridge={self.ridge!r} is below what a {self.precision} SVD resolves: it would "
                f"protect directions of singular values down to about {self.ridge**0.5:.1g}·σ_max, while those "
                f"under about {floor:g}·σ_max are rounding noise, and remove task-vector directions no feature "
                f"asks to protect. Use ridge >= {RIDGE_FLOOR[self.precision]:g}"
                + (" or precision='float64'." if self.precision == "float32" else ".")
            )
        number("rho", 0.0)
        choice("coef_normalize", NORMALIZATIONS)
        number("coef_min", 0.0)  # a negative α would flip a head's share of the task vector
        number("coef_max", 0.0, strict_lo=True)
        if self.coef_min > self.coef_max:
            raise ConfigError(
                f"RainMergingConfig.coef_min={self.coef_min} is above coef_max={self.coef_max}: swap them."
            )
        number("probe_lam", 0.0, strict_lo=True)
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:  # as in peft, a string other than "all-linear" is a regular expression
                    re.compile(self.target_modules)
                except re.error as err:
                    raise ConfigError(
                        f"RainMergingConfig.target_modules={self.target_modules!r} is not a valid regular expression "
                        f"({err}): use 'all-linear', a regular expression, or a list of module names such as "
                        "['q_proj', 'v_proj']."
                    ) from None
        elif not (isinstance(self.target_modules, list) and self.target_modules
                  and all(isinstance(m, str) and m for m in self.target_modules)):
            raise ConfigError("RainMergingConfig.target_modules must be 'all-linear' or a non-empty list of names.")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers
            ):
                raise ConfigError(f"RainMergingConfig.layers must be null or a list of layer indices >= 0, "
                                  f"got {self.layers!r}.")
            if not self.layers:
                raise ConfigError("RainMergingConfig.layers=[] merges nothing: list layer indices, or leave layers "
                                  "unset to merge every layer.")
        for name in ("think_open", "think_close"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"RainMergingConfig.{name} must be a non-empty string.")
        if not (isinstance(self.think_spacing, list) and len(self.think_spacing) == 3
                and all(isinstance(x, str) and not x.strip() for x in self.think_spacing)):
            raise ConfigError(f"RainMergingConfig.think_spacing must be a list of three whitespace strings (after "
                              f"<think>, before and after </think>), got {self.think_spacing!r}.")
        if self.think_open == self.think_close:
            raise ConfigError("RainMergingConfig.think_open and think_close must differ.")
        if self.output_dtype == "float64":  # not "did you mean 'float16'"
            raise ConfigError(f"RainMergingConfig.output_dtype='float64' is not one of {list(DTYPES)}: leave "
                              "output_dtype unset (None) to save a float64 checkpoint as stored, in float64.")
        if self.output_dtype is not None:
            choice("output_dtype", DTYPES)
        positive_int("batch_size")
        positive_int("max_length")
        positive_int("max_reasoning_samples", optional=True)
        cap = self.max_reasoning_samples
        if self.lam == "auto" and self.method == "rain" and self.stage1 and cap is not None:
            held = holdout_count(cap, self.lam_auto_holdout)
            if cap - held < 1:
                raise ConfigError(f"RainMergingConfig.max_reasoning_samples={cap} with lam='auto': the search holds "
                                  f"out {held} of them to measure L_think, which leaves none for stage 1. Allow at "
                                  f"least {fewest_for_holdout(self.lam_auto_holdout)} samples, or set lam to a "
                                  "number.")
        positive_int("max_instruction_samples", optional=True)
        choice("on_malformed", MALFORMED_POLICIES)
        positive_int("max_new_tokens")
        number("temperature", 0.0, strict_lo=True)
        number("top_p", 0.0, 1.0, strict_lo=True)
        number("density", 0.0, 1.0, strict_lo=True)
        number("slerp_t", 0.0, 1.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"RainMergingConfig.seed must be an integer in [0, 2**63), got {self.seed!r}.")
        parse_size(self.max_shard_size)

    # ------------------------------------------------------------------ (de)serialisation
    def uses_calibration(self, kind: str) -> bool:
        """Whether a merge with this config reads the ``"reasoning"`` calibration set (stage 1, or L_think for
        ``lam="auto"``) or the ``"instruction"`` one (stage 2); the baselines read neither.

        Example:
            >>> RainMergingConfig(stage1=False).uses_calibration("reasoning")  # lam="auto" measures L_think on it
            True
        """
        if kind not in ("reasoning", "instruction"):
            raise ValueError(f"Unknown calibration kind {kind!r}; use 'reasoning' or 'instruction'.")
        if self.method != "rain":
            return False
        return self.stage1 or self.lam == "auto" if kind == "reasoning" else self.stage2

    def unused_settings(self) -> dict[str, Any]:
        """The fields set away from their default that a merge with this config never reads, e.g. ``density``
        with task arithmetic, ``rho`` with stage 2 off or ``lam_grid`` with a numeric λ (merges warn about them).

        Example:
            >>> RainMergingConfig(method="task_arithmetic", density=0.7, rho=0.2).unused_settings()
            {'rho': 0.2, 'density': 0.7}
        """
        read = {"method", "lam", "target_modules", "layers", "think_open", "think_close", "output_dtype",
                "max_shard_size", "project_bias"}
        if self.method == "slerp":
            read = (read - {"lam"}) | {"slerp_t"}  # its mix is slerp_t
        elif self.method in ("ties", "dare_ties", "dare_linear"):
            read.add("density")
            if self.method.startswith("dare") and self.density < 1:  # keeping every entry draws no mask
                read.add("seed")
        elif self.method == "rain":
            read |= {"stage1", "stage2"}
            if self.uses_calibration("reasoning") or self.uses_calibration("instruction"):
                # calibration handling and trace generation: whether the data is prompt-only is not known here
                read |= {"think_spacing", "batch_size", "max_length", "on_malformed", "max_new_tokens", "do_sample"}
                if self.do_sample:
                    read |= {"temperature", "top_p", "seed"}
            if self.lam == "auto":  # L_think at the thinking positions of samples stage 1 did not see
                read |= {"lam_grid", "lam_auto_max_kl", "lam_auto_min_think_open"}
                if self.stage1:  # without stage 1 every sample measures L_think: nothing is held out
                    read |= {"lam_auto_holdout", "seed"}
            if self.stage1 or self.lam == "auto":
                read |= {"max_reasoning_samples", "positions"}
                if self.positions.startswith("window"):
                    read.add("window")
            if self.stage1:
                read |= {"projection", "precision", "sequential", "sequential_offload",
                         "rcond" if self.projection == "svd" else "ridge"}
            if self.stage2:
                read |= {"rho", "coef_normalize", "coef_min", "coef_max", "probe_lam", "max_instruction_samples"}
        default = RainMergingConfig(method=self.method).to_dict()  # lam's default depends on the method
        return {name: value for name, value in self.to_dict().items()
                if name not in read and (list(value) if isinstance(value, tuple) else value) != default[name]}

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict of JSON types (``merger.config.lam_grid = np.linspace(…)`` set after the config was
        made is a list here)."""
        self._normalize()
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RainMergingConfig:
        """Build a config from a dict; unknown keys are an error that lists the known ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"RainMergingConfig.from_dict expects a dict of fields, got {type(data).__name__}.")
        data = dict(data)  # a read-only or custom mapping is as good as a dict
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown and "rain_hf_version" in data and isinstance(data.get("config"), dict):
            raise ConfigError("This is a rain_merging_config.json sidecar (the config, the inputs and the report of "
                              "a merge), not a config: read it with RainMergingConfig.load(path), or pass its "
                              "'config' entry.")
        if unknown:
            others = [key for key in unknown if key not in MERGEKIT_PARAMETERS]
            raise ConfigError(f"Unknown RainMergingConfig keys {unknown}{mergekit_hints(unknown, MERGEKIT_PARAMETERS)}"
                              f"{did_you_mean(others, known)}; known keys: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RainMergingConfig:
        """The config a :meth:`to_json` text describes."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to ``path`` (read it back with :meth:`load`).

        Example:
            >>> import tempfile, os
            >>> folder = tempfile.TemporaryDirectory()
            >>> path = os.path.join(folder.name, "rain.json")
            >>> RainMergingConfig(lam=2.5, layers=range(4)).save(path)
            >>> RainMergingConfig.load(path).layers
            [0, 1, 2, 3]
            >>> folder.cleanup()
        """
        text = self.to_json() + "\n"  # first: a value JSON cannot hold must not leave the file emptied
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)  # as ThinkFeatures.save and save_pretrained do
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RainMergingConfig:
        """Read a config from a JSON file (a ``rain_merging_config.json`` sidecar works too: its config as the
        merge ran, with an unset ``sequential`` set to the mode stage 1 ran in, as the card's YAML writes it), or
        the folder ``save_pretrained`` wrote (its sidecar is read)."""
        path = Path(path).expanduser()
        if path.is_dir():  # transformers' habit: the saved folder, not its file
            if not (path / CONFIG_NAME).is_file():
                raise ConfigError(f"{path} is a folder without {CONFIG_NAME}: pass a file written by "
                                  "RainMergingConfig.save, or the folder save_pretrained wrote.")
            path = path / CONFIG_NAME
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                                  "pass a file written by RainMergingConfig.save or save_pretrained.") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of RainMergingConfig fields, got "
                              f"{type(data).__name__}.")
        written_by = None
        if "config" in data and isinstance(data["config"], dict):  # the sidecar written by save_pretrained
            projection = (data.get("report") or {}).get("projection")
            written_by, data = data.get("rain_hf_version"), dict(data["config"])
            if data.get("sequential", False) is None and projection in ("sequential", "one-shot"):
                # unset, the mode follows the data a merge is given: features passed in ran one-shot
                data["sequential"] = projection == "sequential"
                if not data["sequential"]:
                    data["sequential_offload"] = False
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            from . import __version__

            if written_by and str(written_by) != __version__ and "Unknown RainMergingConfig keys" in str(exc):
                raise ConfigError(f"{exc} {path} was written by rain_hf {written_by} and this is rain_hf "
                                  f"{__version__}: install rain_hf {written_by} (or newer) to read it.") from exc
            raise


_FIELD = object()  # "read the value from the field" for validate's number()
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(RainMergingConfig))


def _plain_number(value: Any) -> Any:
    """A numpy (or other non-builtin) real number as a Python int or float; anything else as it is."""
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # no numbers.Real
        return bool(value)
    if type(value) in (bool, int, float) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value  # (np.float64 is a float subclass, and becomes a plain float too)
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def _finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def parse_size(size: int | str) -> int:
    """Bytes of a shard size such as ``5_000_000_000``, ``"5GB"`` or ``"500MiB"`` (decimal units as in HF; as there,
    a decimal unit ending in a lowercase ``b`` counts bits: ``"8Gb"`` is 1 GB, ``"8GiB"`` and ``"8Gib"`` 8 GiB)."""
    if isinstance(size, bool):
        raise ConfigError(f"max_shard_size={size!r} is not a size.")
    if isinstance(size, str) and _finite_number(size.strip()):  # YAML 1.1 reads 5e9 as a string
        size = float(size.strip())
    if isinstance(size, float) and math.isfinite(size) and size.is_integer():  # a byte count written as 5e9
        size = int(size)
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"max_shard_size={size} must be positive.")
        return size
    if isinstance(size, str):
        text = size.strip().upper().replace(" ", "")
        for unit in sorted(_UNITS, key=len, reverse=True):
            if text.endswith(unit):
                number = text[: -len(unit)]
                try:
                    value = float(number)
                except ValueError:
                    break
                if not math.isfinite(value):
                    break
                scaled = int(value * _UNITS[unit])
                if size.strip().endswith("b") and unit in ("KB", "MB", "GB", "TB"):  # decimal units only
                    scaled //= 8
                if scaled < 1:
                    break
                return scaled
    raise ConfigError(f"max_shard_size={size!r} is not a size: use bytes or a string such as '5GB' or '500MB'.")
