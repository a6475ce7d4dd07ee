"""Model cards for merged models: Hub metadata, merge details, a head-coefficient heatmap.

:func:`write_model_card` turns the sidecar that ``save_pretrained`` writes (``rain_merging_config.json``) into the
folder's ``README.md``, rendered as :meth:`huggingface_hub.ModelCard.from_template` renders it, but in a Jinja
sandbox, from the Jinja template ``model_card_templates/rain_merging.md.j2`` (or a template of your own), plus
``rain_merging_heatmap.png`` when the merge computed per-head coefficients.

The front matter lists the inputs' Hub ids under ``base_model`` (also for local folders that are Hub cache
snapshots); inputs known only as local folders are named in the card's body instead, and ``base_model`` /
``base_model_relation`` are left out when no input has a Hub id. ``model-index`` is written only for evaluation
results passed in explicitly.

A custom template receives the same variables as the default one: ``card_data`` (the YAML front matter),
``info`` (the sidecar dict), ``model_name``, ``model_id``, ``model_revision``, ``method``, ``method_title``, ``method_formula``,
``lam``, ``config``, ``config_yaml``, ``merged_scope``, ``inputs`` / ``local_inputs`` (rows with ``role``, ``link``, ``path``,
``path_code`` (the path as a markdown code span), ``revision``, ``hub_id``), ``reasoning_name`` / ``instruct_name`` /
``base_name`` (markdown links or paths), ``input_licenses`` (the inputs' licences when they differ),
``has_calibration``, ``calibration``, ``heatmap_file``, ``coef_stats``, ``removed``, ``timings``, ``lam_search``
(``lam="auto"``'s rows), ``think_open_checked``, ``warnings`` (the merge's), ``projection``
(stage 1 as it ran: ``"sequential"``, ``"one-shot"`` or ``None``), ``versions``, ``think_open``, ``think_close``,
``think_tokens_special`` (whether decoding with ``skip_special_tokens=True`` would drop them),
``template_opens_think`` (whether the chat template's generation prompt ends with ``think_open``), ``paper_url``
and ``citation``.

Example:
    >>> from rain_hf.card import build_model_card
    >>> info = {"method": "task_arithmetic", "lam": 0.5, "config": {"method": "task_arithmetic", "lam": 0.5},
    ...         "inputs": {"reasoning": {"name_or_path": "org/r1", "hub_id": "org/r1"},
    ...                    "instruct": {"name_or_path": "/data/it", "hub_id": None},
    ...                    "base": {"name_or_path": "org/base", "hub_id": "org/base"}}}
    >>> card = build_model_card(info)
    >>> card.data.base_model, card.data.base_model_relation
    (['org/r1', 'org/base'], 'merge')
    >>> "/data/it" in card.text
    True
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

__all__ = [
    "HEATMAP_NAME",
    "PAPER_URL",
    "TEMPLATE_NAME",
    "build_model_card",
    "default_template_path",
    "plot_head_coefficients",
    "write_model_card",
]

#: File name of the default template, in ``model_card_templates/``.
TEMPLATE_NAME = "rain_merging.md.j2"
#: How the sidecar names a reasoning calibration replaced by saved thinking features.
PRECOMPUTED_FEATURES_SOURCE = "precomputed thinking features"

#: File name of the head-coefficient heatmap written next to the card.
HEATMAP_NAME = "rain_merging_heatmap.png"
PAPER_URL = "https://arxiv.org/abs/2602.22538"
CITATION = """@inproceedings{huang2026rainmerging,
  title         = {{RAIN-Merging}: A Gradient-Free Method to Enhance Instruction Following in Large Reasoning
                   Models with Preserved Thinking Format},
  author        = {Huang and others},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2026},
  eprint        = {2602.22538},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2602.22538}
}"""

_METHOD_TITLES = {
    "rain": "RAIN-Merging",
    "task_arithmetic": "Task Arithmetic",
    "ties": "TIES-Merging",
    "dare_ties": "DARE-TIES",
    "dare_linear": "DARE (linear)",
    "slerp": "SLERP",
}
_ROLE_ORDER = ("reasoning", "instruct", "base")
_EVAL_KEYS = ("task_type", "dataset_name", "dataset_type", "metric_type", "metric_name", "metric_value")


def named_branch(revision: str | None) -> str | None:
    """The branch ``revision`` names, or None for main and for an open pull request's ref (``refs/pr/N``), which is
    no branch to create and stops being the model's home once merged (a card's snippet then loads main)."""
    return None if revision in (None, "main") or revision.startswith("refs/pr/") else revision


def default_template_path() -> Path:
    """Where the default card template lives.

    Looked up, in order: ``model_card_templates/`` next to the ``rain_hf`` package (a source checkout or an
    editable install), then ``share/rain_hf/model_card_templates/`` (where a wheel's ``data_files`` put it) under
    each folder above the package (``pip install --target`` or ``--prefix`` puts it there, outside the running
    Python's prefixes), nearest first, and under the installation prefixes.

    Example:
        >>> default_template_path().name
        'rain_merging.md.j2'
    """
    candidates = [Path(__file__).resolve().parent.parent / "model_card_templates" / TEMPLATE_NAME]
    # the folders above this package first: the install that holds this code holds its template, where another
    # (older) rain_hf under the running Python's prefix may hold another
    prefixes = [str(folder) for folder in Path(__file__).resolve().parents[1:]]
    prefixes += [sysconfig.get_path("data"), sys.prefix, sys.base_prefix]
    user_base = getattr(__import__("site"), "USER_BASE", None)
    if user_base:
        prefixes.append(user_base)
    for prefix in dict.fromkeys(p for p in prefixes if p):
        candidates.append(Path(prefix) / "share" / "rain_hf" / "model_card_templates" / TEMPLATE_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The default model card template {TEMPLATE_NAME} was not found (looked in "
        f"{', '.join(str(c.parent) for c in candidates)}). Reinstall rain_hf, or pass template_path= / "
        "`output: {card_template: ...}`."
    )


def build_model_card(
    info: dict[str, Any],
    template_path: str | os.PathLike | None = None,
    eval_results: Sequence[dict[str, Any] | EvalResult] | None = None,
    *,
    model_id: str | None = None,
    model_name: str | None = None,
    model_revision: str | None = None,
) -> ModelCard:
    """Render the model card of a merge from its sidecar dict (``rain_merging_config.json``).

    Args:
        info: the sidecar dict ``save_pretrained`` writes (method, λ, config, inputs, calibration, report, …).
        template_path: a Jinja template of your own (default: :func:`default_template_path`).
        eval_results: measured results for ``model-index``: ``huggingface_hub.EvalResult`` objects or dicts with
            ``task_type``, ``dataset_name``, ``dataset_type``, ``metric_type``, ``metric_name``, ``metric_value``
            (and optionally any other ``EvalResult`` field).
        model_id: the repository id or folder the usage snippet loads (default ``"path/to/merged-model"``).
        model_revision: the branch the snippet loads, when the model is pushed to one other than main.
        model_name: the card's title and ``model-index`` name (default: derived from the inputs).

    Returns:
        A :class:`huggingface_hub.ModelCard`; ``card.save(path)`` writes it.

    Example:
        >>> info = {"method": "rain", "lam": 1.0, "config": {"method": "rain", "lam": 1.0},
        ...         "inputs": {"reasoning": {"name_or_path": "org/r", "hub_id": "org/r"}}}
        >>> card = build_model_card(info, eval_results=[{"task_type": "text-generation", "dataset_name": "IFEval",
        ...     "dataset_type": "google/IFEval", "metric_type": "accuracy", "metric_name": "prompt-level strict",
        ...     "metric_value": 0.61}])
        >>> card.data.eval_results[0].metric_value
        0.61
    """
    path = Path(template_path).expanduser() if template_path is not None else default_template_path()
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {str(path)!r} does not exist; pass the path of a Jinja "
                                "markdown template (or None for the default one).")
    method = str(info.get("method") or (info.get("config") or {}).get("method") or "rain")
    config: dict[str, Any] = dict(info.get("config") or {})
    inputs = _input_rows(info.get("inputs") or {})
    hub_ids = list(dict.fromkeys(row["hub_id"] for row in inputs if row["hub_id"]))
    name = _inline(model_name or _default_model_name(method, inputs))
    results = _eval_results(eval_results)

    # the rain-merging tag only on RAIN merges: a baseline made with this library is not one
    tags = ["merge", "rain-merging", "reasoning"] if method == "rain" else ["merge", "reasoning", method]
    card_data = ModelCardData(
        base_model=hub_ids or None,
        library_name="transformers",
        license=info.get("license") or None,
        license_name=info.get("license_name") or None,
        license_link=info.get("license_link") or None,
        pipeline_tag="text-generation",
        tags=tags,
        eval_results=results,
        model_name=name if results else None,
        **({"base_model_relation": "merge"} if hub_ids else {}),
    )

    report = info.get("report") or {}
    coefficients = report.get("head_coefficients")
    calibration = _calibration_rows(info.get("calibration") or {})
    lam = info.get("lam", config.get("lam"))
    lam_search = (report.get("lam_search") or []) if method == "rain" else []
    variables = {
        "info": info,
        "model_name": name,
        "model_id": model_id or "path/to/merged-model",
        "model_revision": named_branch(model_revision),
        "method": method,
        "method_title": _METHOD_TITLES.get(method, method),
        "method_formula": _method_formula(method, lam, config),
        "merged_scope": _merged_scope(config),
        "lam": None if method == "slerp" else lam,
        "config": config,
        "config_yaml": _reproduction_yaml(method, config, info),
        "inputs": inputs,
        **{f"{row['key']}_name": _display_name(row) for row in inputs},
        "local_inputs": [row for row in inputs if not row["hub_id"]],
        "input_licenses": _license_rows(info, inputs),
        "has_calibration": bool(calibration),
        "calibration": calibration,
        "heatmap_file": HEATMAP_NAME if _stats(coefficients) is not None else None,
        "coef_stats": _stats(coefficients),
        "removed": _removed_rows(report.get("modules") or {}),
        "timings": [(str(k), float(v)) for k, v in (report.get("timings") or {}).items()],
        # the λ search of lam="auto" (method rain only) and whatever the merge warned about
        "lam_search": lam_search,
        # the think-open share is None where the chat template opens the block itself (nothing to check)
        "think_open_checked": any(row.get("think_open") is not None for row in lam_search),
        # a warning may name the think tokens: markdown would read "<think>" as an HTML tag and drop it
        "warnings": [html.escape(_inline(str(w)), quote=False) for w in report.get("warnings") or []],
        "projection": report.get("projection"),
        "versions": _versions(info),
        "think_open": config.get("think_open", "<think>"),
        "think_close": config.get("think_close", "</think>"),
        "think_tokens_special": bool(info.get("think_tokens_special")),
        "template_opens_think": bool(info.get("template_opens_think")),
        "paper_url": PAPER_URL,
        "citation": CITATION,
    }
    variables = {"reasoning_name": "the reasoning model", "instruct_name": "the instruct model",
                 "base_name": "the base model", **variables}
    try:
        # as ModelCard.from_template renders it (its variables, then ours), but sandboxed: a template someone shares
        # with a YAML file must not reach os.environ (the Hub token) or run commands, also in a dry run
        template = _sandbox().from_string(path.read_text(encoding="utf-8"))
        card = ModelCard(template.render(card_data=card_data.to_yaml(), **{**card_data.to_dict(), **variables}))
    except Exception as exc:  # a user's template can fail in any way (undefined names, type errors, bad YAML)
        if template_path is None:
            raise
        raise TemplateProblem(f"{path}: rendering the card failed ({type(exc).__name__}: {exc}). Fix the template, "
                              "or pass none for the default one.") from exc
    card.content = card.content.rstrip("\n") + "\n"
    return card


def _sandbox():
    """The Jinja environment card templates render in: jinja2's defaults (as ``jinja2.Template``), sandboxed."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment()


class TemplateProblem(ValueError):
    """A model card template that cannot be rendered (its file and line are in the message)."""


def check_template(template_path: str | os.PathLike) -> None:
    """Compile a card template the way :func:`build_model_card` renders it; raise :class:`TemplateProblem` naming
    the file and line of a syntax error or unknown filter, so it is found before a merge rather than after (see
    also :func:`trial_render`)."""
    import jinja2

    path = Path(template_path).expanduser()
    try:
        _sandbox().from_string(path.read_text(encoding="utf-8"))
    except jinja2.TemplateSyntaxError as exc:  # unknown filters and tests are reported as syntax errors too
        raise TemplateProblem(f"{path}, line {exc.lineno}: {exc.message}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateProblem(f"{path} cannot be read as UTF-8 text ({exc}).") from exc


def trial_render(template_path: str | os.PathLike, config: dict[str, Any] | None = None,
                 local_roles: Sequence[str] = ()) -> str | None:
    """Render a card template for a sample merge shaped like the one ``config`` (a
    :meth:`RainMergingConfig.to_dict`, default the defaults) will make, with the inputs in ``local_roles`` as local
    folders; return why it failed, or None. A sample cannot hold every value a real merge records, so a failure here
    is a strong hint, not a proof, that the save will fail.
    """
    # the sample's card is thrown away: huggingface_hub's notes on it (e.g. no metadata block) come at the save
    repocard = logging.getLogger("huggingface_hub.repocard")
    level = repocard.level
    repocard.setLevel(logging.ERROR)
    try:
        build_model_card(_sample_sidecar(config, local_roles), template_path)
    except TemplateProblem as exc:
        return str(exc)
    finally:
        repocard.setLevel(level)
    return None


def _sample_sidecar(config: dict[str, Any] | None, local_roles: Sequence[str] = ()) -> dict[str, Any]:
    """The sidecar of a plausible two-layer merge with ``config`` (the keys :meth:`RainMerger.sidecar` writes, and
    which of them a merge of that kind leaves empty), for trial renders of a template."""
    from . import __version__
    from .config import RainMergingConfig

    config = dict(config) if config is not None else RainMergingConfig().to_dict()
    method = config.get("method", "rain")
    rain, auto = method == "rain", config.get("lam") == "auto"
    grid = list(config.get("lam_grid") or [1.0])
    lam = None if method == "slerp" else grid[-1] if auto else config.get("lam")
    stage1, stage2 = rain and config.get("stage1", True), rain and config.get("stage2", True)
    sequential = stage1 and config.get("sequential") is not False
    module = {"removed_fraction": 0.2, "residual": 1e-6, **({"residual_after_stage2": 1e-3} if stage2 else {})}
    modules = {f"model.layers.{i}.self_attn.{name}": dict(module) for i in (0, 1) for name in ("q_proj", "o_proj")}

    def calibration(used: bool, held_out: bool = False) -> dict[str, Any] | None:
        entry = {"num_samples": 8, "num_malformed": 0, "source": "calibration.jsonl", "sha256": "0" * 64,
                 "is_file": True}
        return {**entry, "num_held_out": 2} if used and held_out else entry if used else None

    inputs = {}
    for role in ("reasoning", "instruct", "base"):
        local = role in local_roles
        inputs[role] = {"name_or_path": f"models/{role}" if local else f"org/{role}", "path": None,
                        "hub_id": None if local else f"org/{role}", "revision": None if local else "0" * 40,
                        **({"kind": "full"} if role == "instruct" else {})}
    timings = {"load": 1.0, **({"stage1_features": 1.0} if stage1 else {}),
               **({"lam_auto": 1.0} if rain and auto else {}),
               **({"stage2_coefficients": 1.0} if stage2 else {}), "merge": 1.0}
    return {
        "rain_hf_version": __version__, "method": method, "lam": lam, "config": config,
        "library_versions": {"torch": "2", "transformers": "5", "peft": "0", "safetensors": "0",
                             "huggingface_hub": "2"},
        "loaded_dtype": "bfloat16", "think_tokens_special": True, "template_opens_think": False, "inputs": inputs,
        "calibration": {"reasoning": calibration(stage1 or (rain and auto), held_out=stage1 and auto),
                        "instruction": calibration(stage2)},
        "report": {"timings": timings, "modules": modules if stage1 else {}, "layers": [0, 1] if rain else [],
                   "head_coefficients": [[1.0, 0.5], [1.5, 1.0]] if stage2 else None,
                   "alignment": [[0.1, 0.2], [0.3, 0.4]] if stage2 else None,
                   "leakage": [[0.01, 0.02], [0.03, 0.04]] if stage2 else None,
                   "lam_search": [{"lam": v, "l_think": 0.01, "think_open": 1.0, "within_budget": True}
                                  for v in grid] if rain and auto else None,
                   "projection": ("sequential" if sequential else "one-shot") if stage1 else None,
                   "replay_cache_bytes": 1024 if sequential else None,
                   "vocab": {"reasoning": 100, "instruct": 100, "base": 100},
                   "warnings": ["a sample warning"]},
        "license": None, "license_name": None, "license_link": None, "input_licenses": {},
    }


def write_model_card(
    folder: str | os.PathLike,
    info: dict[str, Any],
    template_path: str | os.PathLike | None = None,
    eval_results: Sequence[dict[str, Any] | EvalResult] | None = None,
    *,
    model_id: str | None = None,
    model_name: str | None = None,
    model_revision: str | None = None,
) -> Path:
    """Write ``README.md`` (and ``rain_merging_heatmap.png`` when there are head coefficients) into ``folder``.

    Arguments as in :func:`build_model_card`. Pass ``model_id`` (the Hub repo id, or the final folder when
    ``folder`` is a temporary one) for a usage snippet that loads the right model. Returns the README's path.

    Example:
        >>> import tempfile
        >>> info = {"method": "slerp", "config": {"method": "slerp", "slerp_t": 0.5},
        ...         "inputs": {"reasoning": {"name_or_path": "org/r", "hub_id": "org/r"}}}
        >>> with tempfile.TemporaryDirectory() as out:
        ...     write_model_card(out, info).name
        'README.md'
    """
    folder = Path(folder)
    card = build_model_card(info, template_path, eval_results, model_id=model_id, model_name=model_name,
                            model_revision=model_revision)
    folder.mkdir(parents=True, exist_ok=True)
    coefficients = (info.get("report") or {}).get("head_coefficients")
    if _stats(coefficients) is not None:  # the card links the heatmap only then
        plot_head_coefficients(coefficients, (info.get("report") or {}).get("layers"), folder / HEATMAP_NAME)
    readme = folder / "README.md"
    card.save(readme)
    logger.debug("Wrote the model card %s", readme)
    return readme


def plot_head_coefficients(
    coefficients: Sequence[Sequence[float]],
    layers: Sequence[int] | None,
    path: str | os.PathLike,
) -> Path:
    """Save a layers × heads heatmap of the stage-2 coefficients as a PNG (matplotlib, no global pyplot state).

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as out:
        ...     p = plot_head_coefficients([[1.0, 0.5], [1.2, 0.8]], [0, 1], os.path.join(out, "h.png"))
        ...     p.stat().st_size > 0
        True
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [list(row) for row in coefficients]
    if not rows or not any(rows):
        raise ValueError("head_coefficients is empty: nothing to plot.")
    width = max(len(row) for row in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        grid[i, : len(row)] = [np.nan if v is None else float(v) for v in row]
    labels = list(layers) if layers is not None and len(layers) == len(rows) else list(range(len(rows)))

    fig = Figure(figsize=(min(2.0 + 0.3 * width, 16.0), min(1.5 + 0.25 * len(rows), 14.0)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="coefficient α")
    ax.set_xlabel("query head")
    ax.set_ylabel("decoder layer")
    ax.set_title("RAIN-Merging head coefficients")
    if len(rows) <= 64:
        ax.set_yticks(range(len(rows)), [str(v) for v in labels])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------------------------------- helpers
def _inline(text: str, cell: bool = False) -> str:
    """``text`` fit for one markdown line: whitespace runs (newlines too) become one space; in a table ``cell``, a
    bar, which would end the cell, is escaped too.

    Example:
        >>> _inline("data/r|v2\\n.jsonl"), _inline("data/r|v2\\n.jsonl", cell=True)
        ('data/r|v2 .jsonl', 'data/r\\\\|v2 .jsonl')
    """
    text = " ".join(str(text).split())
    return text.replace("|", "\\|") if cell else text


def _code(text: str, cell: bool = False) -> str:
    """``text`` as one markdown code span, fenced with more backticks than any run inside it (a path holding a
    backtick would otherwise end the span early).

    Example:
        >>> _code("models/r"), _code("models/r `1`")
        ('`models/r`', '`` models/r `1` ``')
    """
    text = _inline(text, cell)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _input_rows(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for role in list(_ROLE_ORDER) + sorted(set(inputs) - set(_ROLE_ORDER)):
        entry = inputs.get(role)
        if not entry:
            continue
        hub_id = entry.get("hub_id") or None
        # as the user gave it: the resolved folder may be a cache path under someone's home directory
        path = str(entry.get("name_or_path") or entry.get("path") or "")
        lora = role == "instruct" and entry.get("kind") == "lora"
        label = {"reasoning": "reasoning model (θ_R, the anchor)", "base": "base model (θ_B)",
                 "instruct": "instruct LoRA adapter (on θ_B)" if lora else "instruct model (θ_I)"}.get(role, role)
        link = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"local folder {_code(path, cell=True)}"
        revision = entry.get("revision") or None
        rows.append({"role": label, "key": role, "hub_id": hub_id, "path": _inline(path), "path_code": _code(path),
                     "link": link,
                     "revision": f"`{revision}`" if revision else None,
                     "name": entry.get("name_or_path") or hub_id or str(path),
                     "note": None})
    return rows


def _license_rows(info: dict[str, Any], inputs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The inputs' licences, listed in the card when they differ (then the metadata names none)."""
    licenses = info.get("input_licenses") or {}
    if info.get("license") or len(licenses) < 2:
        return []
    labels = {row["key"]: row["role"] for row in inputs}
    return [{"role": labels.get(role, role), "license": entry.get("license_name") or entry.get("license", "?"),
             "link": entry.get("license_link")} for role, entry in licenses.items()]


def _display_name(row: dict[str, Any]) -> str:
    return f"[{row['hub_id']}](https://huggingface.co/{row['hub_id']})" if row["hub_id"] else _code(row['name'])


def _default_model_name(method: str, inputs: list[dict[str, Any]]) -> str:
    def short(role: str) -> str | None:
        for row in inputs:
            if row["key"] == role:
                return str(row["hub_id"] or row["path"] or row["name"]).rstrip("/\\").replace("\\", "/").split("/")[-1]
        return None

    reasoning, instruct = short("reasoning"), short("instruct")
    tag = "RAIN" if method == "rain" else method.replace("_", "-")
    return "-".join(part for part in (reasoning, tag, instruct) if part) or f"{tag}-merge"


def _merged_scope(config: dict[str, Any]) -> str:
    """Which linear layers the merge changed, as the card's sentence starts ("Only the linear layers … are merged").

    Example:
        >>> _merged_scope({"target_modules": ["q_proj", "v_proj"], "layers": [0, 3]})
        'Only the linear layers `q_proj`, `v_proj` of decoder layers 0, 3 are merged'
    """
    targets = config.get("target_modules") or "all-linear"
    if targets == "all-linear":
        what = "the linear layers"
    elif isinstance(targets, str):
        what = f"the linear layers matching `{targets}`"
    else:
        what = "the linear layers " + ", ".join(f"`{t}`" for t in targets)
    layers = config.get("layers")
    where = f"of decoder layers {', '.join(map(str, layers))}" if layers else "inside the decoder blocks"
    return f"Only {what} {where} are merged"


def _method_formula(method: str, lam: Any, config: dict[str, Any]) -> str:
    density = config.get("density")
    convention = ("Trimming, sign election and the disjoint merge follow peft's `merge_utils` convention (sign vote "
                  "on the unweighted task vectors, mean over the agreeing entries by count")
    if method == "task_arithmetic":
        return f"θ = θ_R + λ·Δ_I with Δ_I = θ_I − θ_B and λ = {lam}."
    if method == "ties":
        return (f"θ = θ_B + TIES(Δ_R, Δ_I) with Δ_R = θ_R − θ_B, Δ_I = θ_I − θ_B, weights [1, {lam}] and "
                f"density {density}. {convention}).")
    if method == "dare_ties":
        return (f"θ = θ_B + DARE-TIES(Δ_R, Δ_I) with weights [1, {lam}] and density {density}: random drop with "
                f"1/density rescale (seed {config.get('seed')}), then TIES. {convention}).")
    if method == "dare_linear":
        return (f"θ = θ_B + Δ̃_R + {lam}·Δ̃_I where Δ̃ keeps each entry with probability {density} and rescales it by "
                f"1/density (seed {config.get('seed')}).")
    if method == "slerp":
        return (f"θ = SLERP(θ_R, θ_I; t = {config.get('slerp_t')}) per tensor (t = 0: the reasoning model, t = 1: "
                "the instruct model), linear interpolation where the two are nearly colinear.")
    return f"method {method!r}."


_HUB_ID_LIKE = re.compile(r"[\w.\-]+(/[\w.\-]+)?")


def _reproduction_yaml(method: str, config: dict[str, Any], info: dict[str, Any]) -> str:
    document: dict[str, Any] = {}
    for role, key in (("base", "base_model"), ("reasoning", "reasoning_model"), ("instruct", "instruct_model")):
        entry = (info.get("inputs") or {}).get(role)
        if not entry:
            continue
        name = entry.get("hub_id") or entry.get("name_or_path") or entry.get("path")
        if not entry.get("hub_id") and _HUB_ID_LIKE.fullmatch(str(name)) and not str(name).startswith("."):
            name = f"./{name}"  # a local folder named like a Hub id: elsewhere rain-merge would fetch that repo
        revision = entry.get("revision")
        document[key] = {"path": name, "revision": revision} if revision and entry.get("hub_id") else name
    document["method"] = method
    if info.get("loaded_dtype"):  # the calibration passes ran in it
        document["dtype"] = info["loaded_dtype"]
    parameters = {k: v for k, v in config.items() if k != "method"}
    projection = (info.get("report") or {}).get("projection")
    if "sequential" in parameters and parameters["sequential"] is None and projection:
        # unset, the mode follows the data given: a rerun with the features' source file would run sequential
        parameters["sequential"] = projection == "sequential"
        if not parameters["sequential"]:  # offloading the cache of a sequential run that did not happen
            parameters["sequential_offload"] = False
    if parameters:
        document["parameters"] = parameters
    calibration = {name: entry for name, entry in (info.get("calibration") or {}).items() if entry}
    # only files can be named in a config; "a list of N records" or precomputed features cannot
    files = {name: entry["source"] for name, entry in calibration.items()
             if entry.get("source") and entry.get("is_file", True)
             and entry.get("source") != PRECOMPUTED_FEATURES_SOURCE}
    if files:
        document["calibration"] = files
    text = yaml.dump(document, Dumper=_ReadableDumper, sort_keys=False, allow_unicode=True, width=100,
                     default_flow_style=None).rstrip()
    for name, entry in calibration.items():
        if name in files or not entry.get("source"):
            continue
        if entry["source"] == PRECOMPUTED_FEATURES_SOURCE:
            origin = entry.get("computed_from")
            text += (f"\n# {name} calibration: precomputed thinking features; add under calibration: the file they "
                     "were computed from" + (f" ({origin})" if origin else ""))
        else:
            text += (f"\n# {name} calibration: {entry['source']}, not a file; save it as JSONL and add it under "
                     "calibration:")
    unprojected = (calibration.get("reasoning") or {}).get("held_out_not_projected")
    if unprojected and config.get("lam") != "auto":
        text += (f"\n# the thinking features held out {unprojected} reasoning samples for lam='auto' and project with "
                 "the rest; a rerun from the file projects with all of them, so its weights differ")
    if config.get("lam") == "auto" and info.get("lam") is not None and config.get("stage1", True):
        text += (f"\n# lam='auto' chose λ = {info['lam']}, projecting with the reasoning samples it did not hold out; "
                 f"lam: {info['lam']} with the same file projects with all of them, so its weights differ")
    if config.get("sequential") is None and projection:
        text += f"\n# sequential was unset (null) and stage 1 ran {projection}: written here so that a rerun does too"
    return text


class _ReadableDumper(yaml.SafeDumper):
    """Safe YAML in which strings holding line breaks are written double-quoted ("\\n\\n"): the plain dumper folds
    them into quoted blocks of blank lines (R1's think_spacing), correct but easy to break when edited."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if "\n" in value or "\r" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _represent_str)


def _calibration_rows(calibration: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in ("reasoning", "instruction"):
        entry = calibration.get(name)
        if entry:
            used = entry.get("num_samples", "?")
            if entry.get("num_held_out"):
                used = f"{used} ({entry['num_held_out']} held out to choose λ)"
            rows.append({"name": name, "num_samples": used, "num_malformed": entry.get("num_malformed", "–"),
                         "source": _inline((entry.get("source") or "–") + (
                             f" (computed from {entry['computed_from']})" if entry.get("computed_from") else ""),
                             cell=True),
                         # what sha256sum prints for the file, to check a copy of it against
                         "file_sha256": f"`{entry['file_sha256']}`" if entry.get("file_sha256") else "–"})
    return rows


def _stats(coefficients: Sequence[Sequence[float]] | None) -> dict[str, float] | None:
    if coefficients is None:
        return None
    values = [float(v) for row in coefficients for v in row if v is not None and not math.isnan(float(v))]
    if not values:
        return None
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def _removed_rows(modules: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, entry in modules.items():
        if entry and entry.get("removed_fraction") is not None:
            groups.setdefault(name.rsplit(".", 1)[-1], []).append(entry)
    rows = []
    for module, entries in groups.items():
        row = {"module": module, "count": len(entries),
               "removed_fraction": sum(float(e["removed_fraction"]) for e in entries) / len(entries)}
        for key in ("residual", "residual_after_stage2"):
            values = [float(e[key]) for e in entries if e.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        rows.append(row)
    return rows


def _versions(info: dict[str, Any]) -> list[tuple[str, str]]:
    versions = [("rain_hf", str(info["rain_hf_version"]))] if info.get("rain_hf_version") else []
    versions += [(str(k), str(v)) for k, v in (info.get("library_versions") or {}).items() if v]
    return versions


def _eval_results(results: Sequence[dict[str, Any] | EvalResult] | None) -> list[EvalResult] | None:
    if not results:
        return None
    converted = []
    for i, result in enumerate(results):
        if isinstance(result, EvalResult):
            converted.append(result)
            continue
        if not isinstance(result, dict):
            raise TypeError(f"eval_results[{i}] is a {type(result).__name__}; pass dicts or huggingface_hub.EvalResult.")
        missing = [k for k in _EVAL_KEYS if k != "metric_name" and k not in result]
        if missing:
            raise ValueError(f"eval_results[{i}] lacks {missing}; each result needs {list(_EVAL_KEYS)}.")
        try:
            converted.append(EvalResult(**result))
        except TypeError as exc:
            raise ValueError(f"eval_results[{i}] has a key EvalResult does not know ({exc}); use "
                             f"{list(_EVAL_KEYS)} and the other huggingface_hub.EvalResult fields.") from exc
    for result in converted:  # YAML would write a numpy or torch scalar as a Python object the Hub cannot read
        for name, value in vars(result).items():
            if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
                setattr(result, name, value.item())
    return converted
