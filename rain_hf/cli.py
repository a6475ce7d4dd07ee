"""``rain-merge``: run a merge described by a YAML file.

Usage::

    rain-merge CONFIG.yaml --out DIR [--push-to-hub REPO] [--device cuda] [--dry-run] [--overwrite] [--verbose]

``rain-merge --help`` documents every key of the YAML file; ``examples/`` holds complete configs. Errors print
one line (``rain-merge: error: ...``) and exit with status 2 (configuration or usage) or 1 (loading, merging,
saving or pushing); ``--verbose`` adds the traceback and debug logs.

Example:
    >>> from rain_hf.cli import main
    >>> main(["examples/organism_rain.yaml", "--dry-run"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import os
import re
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from . import __version__
from .config import CONFIG_NAME, ConfigError, RainMergingConfig, did_you_mean, mergekit_hints, parse_size

logger = logging.getLogger("rain_hf.cli")

__all__ = ["CliError", "MergeJob", "load_job", "main"]

PROG = "rain-merge"
DTYPE_CHOICES = ("auto", "float64", "float32", "float16", "bfloat16")
ROLES = {"base_model": "base", "reasoning_model": "reasoning", "instruct_model": "instruct"}

#: Top-level keys of the YAML file and their documentation (``parameters`` lists RainMergingConfig's fields).
TOP_LEVEL_KEYS: dict[str, str] = {
    "base_model": "The pretrained base θ_B: a Hub id, a local folder, or a mapping {path: ..., revision: ...}.",
    "reasoning_model": "The reasoning model θ_R (the anchor of the merge; its tokenizer, chat template and "
                       "generation config are kept). Same forms as base_model.",
    "instruct_model": "The instruct model θ_I, or a peft LoRA adapter trained on base_model. Same forms as "
                      "base_model.",
    "token": "Hub token for gated/private inputs and for --push-to-hub (default: env HF_TOKEN or `hf auth "
             "login`). Prefer the environment variable over writing a token into a file.",
    "method": "rain (default) or a baseline: task_arithmetic, ties, dare_ties, dare_linear, slerp.",
    "parameters": "Any RainMergingConfig field (listed below), e.g. {lam: 1.0, rcond: 0.1, window: 3}.",
    "calibration": "{reasoning: PATH, instruction: PATH}: JSON/JSONL calibration sets for stages 1 and 2 "
                   "(needed by method rain with stage1 / stage2, and the reasoning set also for lam: auto, which "
                   "measures L_think on it; the baselines do not read them, though a file named here must exist).",
    "dtype": "dtype the reasoning model is loaded in for the calibration passes: auto (the dtype config.json "
             "names, else as stored), float64, float32, float16 or bfloat16. Not the saved dtype, as mergekit's "
             "dtype is: parameters.output_dtype sets that.",
    "output": "{max_shard_size: '5GB', private: true, card_template: PATH}: shard size of the saved weights "
              "(overrides parameters.max_shard_size), visibility of a repository --push-to-hub creates (left out: "
              "the Hub's default; with private: true a push to an existing public repository is refused), and a "
              "Jinja model card template of your own.",
}
#: mergekit's top-level keys and what a rain-merge file has instead, named in the error on an unknown key
MERGEKIT_TOP_LEVEL = {
    "models": "name the models base_model, reasoning_model and instruct_model",
    "merge_method": "use method",
    "slices": "rain-merge merges whole models; parameters.layers picks decoder layers",
    "tokenizer_source": "the reasoning model's tokenizer is kept",
    "tokenizer": "the reasoning model's tokenizer is kept",
    "chat_template": "the reasoning model's chat template is kept",
    "out_dtype": "use parameters.output_dtype",
}
#: mergekit-yaml's on/off options: the word after one is no value of it (`mergekit-yaml c.yml --cuda out/`)
MERGEKIT_SWITCHES = frozenset({"--cuda", "--lazy-unpickle", "--copy-tokenizer", "--allow-crimes", "--low-cpu-memory",
                               "--trust-remote-code", "--write-model-card", "--safe-serialization", "--clone-tensors",
                               "--quiet"})
#: what a rain-merge run does instead of the mergekit-yaml switches a user may carry over
MERGEKIT_SWITCH_HINTS = {
    "--cuda": "for a GPU pass --device cuda",
    "--copy-tokenizer": "the reasoning model's tokenizer and chat template are always saved with the merge",
    "--write-model-card": "a model card is always written",
    "--lazy-unpickle": "safetensors checkpoints are always read tensor by tensor (pickled ones are refused)",
    "--trust-remote-code": "models with custom code are not supported",
}
#: keys a file may use to name the output folder, which is --out here (mergekit's out_path, a trainer's output_dir)
OUT_FOLDER_KEYS = ("out", "out_path", "output_dir", "output_path", "output_folder")
#: keys that name an option of the Python API or of the command line, not of a rain-merge file
ELSEWHERE_KEYS = {
    "features": "precomputed thinking features are a Python option, RainMerger.from_pretrained(features=...); a "
                "rain-merge run computes them from calibration.reasoning",
    **{key: "the output folder is the command line's --out DIR, not a key of the file" for key in OUT_FOLDER_KEYS},
    "revision": "a revision belongs to one model: base_model: {path: org/name, revision: v1.0}",
    "device": "the device is the command line's --device, not a key of the file",
    **{key: f"it goes under output: (output.{key})" for key in ("private", "card_template")},
}
MODEL_KEYS = ("path", "revision")
CALIBRATION_KEYS = ("reasoning", "instruction")
OUTPUT_KEYS = ("max_shard_size", "private", "card_template")


class CliError(Exception):
    """A problem with the command line or the YAML file (exit status 2)."""


_MAX_YAML_VALUES = 10_000


def _expanded_size(value: Any) -> int:
    """How many values ``value`` holds once its YAML aliases are written out (each shared object counted at
    every place it is used), without writing them out."""
    sizes: dict[int, int] = {}

    def size(item: Any) -> int:
        if not isinstance(item, (dict, list)):
            return 1
        if id(item) not in sizes:
            sizes[id(item)] = 0  # a recursive alias (&a [*a]) counts once
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            sizes[id(item)] = min(1 + sum(size(child) for child in children), _MAX_YAML_VALUES + 1)
        return sizes[id(item)]

    return size(value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML itself keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: SafeLoader flattens it below
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so below
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@dataclass
class MergeJob:
    """A validated YAML merge description, with paths resolved against the YAML file's folder."""

    models: dict[str, str]
    revisions: dict[str, str]
    config: RainMergingConfig
    token: str | None = field(default=None, repr=False)  # a printed or logged job must not show it
    calibration: dict[str, Path] = field(default_factory=dict)
    dtype: str = "auto"
    max_shard_size: int | str | None = None
    private: bool | None = None
    card_template: Path | None = None
    #: local model folders (by role) and calibration files (by kind) as the YAML writes them, relative to its
    #: folder: what the card and sidecar name them by, instead of this machine's absolute paths
    written_models: dict[str, str] = field(default_factory=dict)
    written_calibration: dict[str, str] = field(default_factory=dict)
    #: the YAML file itself (an input the output folder must not replace)
    source: Path | None = None

    @property
    def revision(self) -> dict[str, str] | None:
        return dict(self.revisions) if self.revisions else None

    def describe(self, out: str | None, push: str | None) -> str:
        """The job's own part of the dry-run plan (data and output)."""
        lines = ["calibration:"]
        for name in CALIBRATION_KEYS:
            path = self.calibration.get(name)
            lines.append(f"  {name:11s}: {path if path else '(none)'}")
        if self.config.method != "rain" and self.calibration:
            lines.append(f"  (method {self.config.method} does not use calibration data)")
        ignored = self.config.unused_settings()
        if ignored:  # the merge warns about them too
            lines.append("parameters this merge does not read: " + ", ".join(f"{k}={v!r}" for k, v in ignored.items()))
        lines.append(f"reasoning model dtype: {self.dtype}")
        shard = self.max_shard_size if self.max_shard_size is not None else self.config.max_shard_size
        lines.append(f"output: {out or '(none: dry run)'} (max_shard_size {shard}"
                     f"{', card template ' + str(self.card_template) if self.card_template else ''})")
        if push:
            visibility = {None: "visibility unchanged/default", True: "private", False: "public"}[self.private]
            lines.append(f"push to the Hub: {push} ({visibility})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- YAML
def load_job(path: str | os.PathLike) -> MergeJob:
    """Read and validate a ``rain-merge`` YAML file; raises :class:`CliError` or :class:`ConfigError`.

    Example:
        >>> job = load_job("examples/organism_rain.yaml")
        >>> job.config.think_spacing
        ['', '', '']
    """
    path = Path(path)
    if path.is_dir():
        raise CliError(f"config file {str(path)!r} is a folder; pass the YAML file in it.")
    if path.exists() and not path.is_file():
        # a pipe (<(...)) has no folder for the YAML's relative paths to be read from
        raise CliError(f"config file {str(path)!r} is not a regular file (a pipe?): write the YAML to a file, "
                       "since the paths in it are relative to its folder.")
    if not path.is_file():
        raise CliError(f"config file {str(path)!r} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text (byte {exc.start}); save the YAML file as UTF-8.") from exc
    except OSError as exc:
        raise CliError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        # not chained: PyYAML's error quotes the line, which may be the token's (printed by --verbose)
        raise CliError(f"{path}: invalid YAML{where}: {problem}.") from None
    if _expanded_size(data) > _MAX_YAML_VALUES:
        # aliases of aliases: a few hundred bytes can stand for billions of values, which an error message
        # that shows one would write out in full
        raise CliError(f"{path}: the YAML expands to more than {_MAX_YAML_VALUES} values through its aliases "
                       "(*name): a merge description needs a few dozen; write the values out.")
    if not isinstance(data, dict):
        raise CliError(f"{path}: the top level must be a mapping of keys ({', '.join(TOP_LEVEL_KEYS)}).")
    unknown = sorted(set(map(str, data)) - set(TOP_LEVEL_KEYS))
    if unknown:
        mergekit = mergekit_hints(unknown, MERGEKIT_TOP_LEVEL)
        mergekit += "".join(f" ({key!r}: {ELSEWHERE_KEYS[key]})" for key in unknown if key in ELSEWHERE_KEYS)
        others = [key for key in unknown if key not in MERGEKIT_TOP_LEVEL and key not in ELSEWHERE_KEYS]
        fields = [f.name for f in dataclasses.fields(RainMergingConfig)]
        near = {key: (difflib.get_close_matches(key, fields, n=1) or [None])[0] for key in others}
        named = ", ".join(f"{key!r}: did you mean parameters.{field}?" for key, field in near.items()
                          if field and field != key)
        hint = (" Merge parameters go under 'parameters:'" + (f" ({named})" if named else "") + "."
                if any(near.values()) else "")
        raise CliError(f"{path}: unknown key(s) {unknown}{mergekit}{did_you_mean(others, TOP_LEVEL_KEYS)}; known "
                       f"keys: {list(TOP_LEVEL_KEYS)}.{hint}")
    folder = path.resolve().parent

    models: dict[str, str] = {}
    revisions: dict[str, str] = {}
    written_models: dict[str, str] = {}
    for key, role in ROLES.items():
        if data.get(key) in (None, ""):
            raise CliError(f"{path}: '{key}' is missing; give a Hub id or a local folder.")
        models[role], revision, name = _model_entry(data[key], key, folder, path)
        if revision:
            revisions[role] = revision
        if models[role] != name:  # a local folder: keep the name the YAML gives it
            written_models[role] = name

    parameters = {} if data.get("parameters") is None else data["parameters"]
    if not isinstance(parameters, dict):
        raise CliError(f"{path}: 'parameters' must be a mapping of RainMergingConfig fields.")
    misplaced = [key for key in map(str, parameters)
                 if key not in _FIELDS and (key in TOP_LEVEL_KEYS or key in OUTPUT_KEYS)]
    if misplaced:  # a RainMergingConfig error would list its fields only
        key = misplaced[0]
        where = f"under output: (output.{key})" if key in OUTPUT_KEYS else "at the top level of the file"
        raise CliError(f"{path}: {key!r} is not a merge parameter: it goes {where}, not under parameters:.")
    parameters = _coerce_numbers(dict(parameters))
    method = data.get("method")
    if method is not None and "method" in parameters and parameters["method"] != method:
        raise CliError(f"{path}: method is {method!r} at the top level but {parameters['method']!r} under "
                       "parameters; give it once.")
    if method is not None:
        parameters["method"] = method
    try:
        config = RainMergingConfig.from_dict(parameters)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except TypeError as exc:  # e.g. a YAML list where the dataclass expects a mapping
        raise ConfigError(f"{path}: parameters: {exc}") from exc

    token = data.get("token")
    if token is not None and not isinstance(token, str):
        raise CliError(f"{path}: 'token' must be a string (or leave it out and set HF_TOKEN).")

    calibration = _calibration(data.get("calibration"), folder, path)
    written_calibration = {kind: str(data["calibration"][kind]) for kind in calibration}
    if config.method == "rain":
        if config.stage1 and "reasoning" not in calibration:
            raise CliError(f"{path}: method rain with stage1 needs 'calibration: {{reasoning: PATH}}' (or set "
                           "parameters.stage1: false).")
        if config.lam == "auto" and "reasoning" not in calibration:
            raise CliError(f"{path}: lam: auto measures L_think on reasoning calibration samples, so it needs "
                           "'calibration: {reasoning: PATH}' also with stage1: false (or give parameters.lam a "
                           "number).")
        if config.stage2 and "instruction" not in calibration:
            raise CliError(f"{path}: method rain with stage2 needs 'calibration: {{instruction: PATH}}' (or set "
                           "parameters.stage2: false).")

    dtype = data.get("dtype", "auto") or "auto"
    if dtype not in DTYPE_CHOICES:
        raise CliError(f"{path}: dtype {dtype!r} is not one of {list(DTYPE_CHOICES)}.")

    output = {} if data.get("output") is None else data["output"]
    folder_hint = " The output folder is the command line's --out DIR."
    if not isinstance(output, dict):
        raise CliError(f"{path}: 'output' must be a mapping with keys {list(OUTPUT_KEYS)}."
                       + (folder_hint if isinstance(output, str) else ""))
    unknown = sorted(set(map(str, output)) - set(OUTPUT_KEYS))
    if unknown:
        named_folder = any(key in ("path", "dir", "folder", *OUT_FOLDER_KEYS) for key in unknown)
        raise CliError(f"{path}: unknown output key(s) {unknown}{did_you_mean(unknown, OUTPUT_KEYS)}; known: "
                       f"{list(OUTPUT_KEYS)}." + (folder_hint if named_folder else ""))
    max_shard_size = output.get("max_shard_size")
    if max_shard_size is not None:
        try:
            parse_size(max_shard_size)
        except ConfigError as exc:
            raise ConfigError(f"{path}: output.{exc}") from exc
    private = output.get("private")
    if private is not None and not isinstance(private, bool):
        raise CliError(f"{path}: output.private must be true or false, got {private!r}.")
    card_template = None
    if output.get("card_template") is not None:
        card_template = _local_path(_path_value(output["card_template"], "output.card_template", path), folder)
        if not card_template.is_file():
            state = "is a folder, not a template file" if card_template.is_dir() else "does not exist"
            raise CliError(f"{path}: output.card_template {str(card_template)!r} {state} (paths are relative to the "
                           "YAML file's folder).")
        from .card import TemplateProblem, check_template, trial_render

        try:  # a template that cannot compile would fail after the merge
            check_template(card_template)
        except TemplateProblem as exc:
            raise CliError(f"{path}: output.card_template: {exc}") from exc
        local = [role for role, location in models.items() if Path(location).is_dir()]
        problem = trial_render(card_template, config.to_dict(), local)
        if problem:  # a sample merge cannot hold every real value: warn, and save with the default card if need be
            logger.warning("%s: output.card_template failed a trial render for a sample merge: %s If the save "
                           "fails the same way, the model is saved with the default card.", path, problem)
    return MergeJob(models, revisions, config, token or None, calibration, dtype, max_shard_size, private,
                    card_template, written_models, written_calibration, path.resolve())


def _model_entry(value: Any, key: str, folder: Path, path: Path) -> tuple[str, str | None, str]:
    """(where to load from, revision, the name as written) of a model entry."""
    if isinstance(value, dict):
        unknown = sorted(set(map(str, value)) - set(MODEL_KEYS))
        if unknown or not value.get("path"):
            raise CliError(f"{path}: '{key}' as a mapping needs 'path' (and optionally 'revision'); got keys "
                           f"{sorted(map(str, value))}{did_you_mean(unknown, MODEL_KEYS)}.")
        name, revision = value["path"], value.get("revision")
        if not isinstance(name, str):
            raise CliError(f"{path}: {key}.path {name!r} is not a string (YAML read it as {type(name).__name__}); "
                           "quote it so that YAML keeps it as written.")
        if revision is not None and not isinstance(revision, str):
            # YAML reads 0123456 as the octal number 42798: converting back would name another revision
            raise CliError(f"{path}: {key}.revision {revision!r} is not a string (YAML read it as "
                           f"{type(revision).__name__}); quote it (revision: '0123456') so YAML keeps it as written.")
    elif isinstance(value, str):
        name, revision = value, None
    else:
        raise CliError(f"{path}: '{key}' must be a Hub id, a folder, or {{path: ..., revision: ...}}; got {value!r}.")
    name = str(name)
    location = _model_location(name, folder, f"{path}: {key}")
    if revision and (location != name or Path(name).expanduser().is_absolute()):
        raise CliError(f"{path}: {key}.revision {revision!r} is given for the local folder {location}; a revision "
                       "picks a commit of a Hub repository: check out that revision into the folder, or name the "
                       "model by its Hub id.")
    return location, revision, name


def _model_location(name: str, folder: Path, where: str) -> str:
    """Local folders are relative to the YAML file; anything else is passed on as a Hub id."""
    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or os.path.isabs(name):
        local = _local_path(name, folder)
        if not local.exists():  # written as a path, so never a Hub id: say so now, not at load time
            hint = (f" It exists under the current directory, but model paths are relative to the YAML file: write "
                    f"it relative to {folder}, or as an absolute path." if Path(name).expanduser().is_dir() else
                    " Model paths are relative to the YAML file's folder." if not Path(name).expanduser().is_absolute()
                    else "")
            raise CliError(f"{where}: {name!r} names the local folder {local}, which does not exist.{hint}")
        return str(local)
    candidate = folder / name
    if candidate.is_dir():
        return str(candidate)
    if Path(name).is_dir() and Path(name).resolve() != candidate.resolve():
        # the same YAML must name the same model from any working directory
        raise CliError(f"{where}: {name!r} is a folder under the current directory but not under the YAML file's "
                       f"folder {folder}, and model paths are relative to the YAML file: write it relative to "
                       f"{folder}, or as an absolute path. If you mean the Hub repository {name!r}, run rain-merge "
                       "from another directory: a name that is also a folder there is read as the folder (as "
                       "transformers reads it).")
    return name


def _path_value(value: Any, key: str, path: Path) -> str:
    """A YAML value that names a file: a non-empty string (a list or a bool would become a path like "['a']")."""
    if not isinstance(value, str) or not value.strip():
        raise CliError(f"{path}: {key} must be a file path, got {value!r}.")
    return value


def _local_path(name: str, folder: Path) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else (folder / path).resolve()


def _calibration(value: Any, folder: Path, path: Path) -> dict[str, Path]:
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise CliError(f"{path}: 'calibration' must be a mapping {{reasoning: PATH, instruction: PATH}}.")
    unknown = sorted(set(map(str, value)) - set(CALIBRATION_KEYS))
    if unknown:
        raise CliError(f"{path}: unknown calibration key(s) {unknown}{did_you_mean(unknown, CALIBRATION_KEYS)}; "
                       f"known: {list(CALIBRATION_KEYS)}.")
    found = {}
    for name in CALIBRATION_KEYS:
        if value.get(name) is not None:
            file = _local_path(_path_value(value[name], f"calibration.{name}", path), folder)
            if not file.exists():
                raise CliError(f"{path}: calibration.{name} {str(file)!r} does not exist (paths are relative to "
                               "the YAML file's folder).")
            found[name] = file
    return found


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce_numbers(parameters: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``1e-2`` as a string: turn such strings into numbers for the numeric fields."""
    numeric = {f.name for f in dataclasses.fields(RainMergingConfig) if "float" in str(f.type)}
    def number(value: Any) -> Any:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        return value

    for name in numeric & set(parameters):
        value = parameters[name]
        parameters[name] = [number(v) for v in value] if isinstance(value, list) else number(value)
    return parameters


# ---------------------------------------------------------------------------------------------- help
def _attribute_docs() -> dict[str, str]:
    """The ``Attributes:`` section of RainMergingConfig's docstring, as {field: description}."""
    doc = textwrap.dedent((RainMergingConfig.__doc__ or "").split("Attributes:", 1)[-1])
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in doc.splitlines():
        # a field starts a line; indented lines continue its description (and may hold "word: " themselves)
        match = re.match(r"^([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): (.*)$", line)
        if match:
            names = match.group(1).split(", ")
            for name in names:
                docs[name] = match.group(2).strip()
        elif line.strip() and names:
            for name in names:
                docs[name] += " " + line.strip()
    return docs


def _default_text(f: dataclasses.Field) -> str:
    if f.name == "lam":  # resolved per method in RainMergingConfig.validate
        return f"{RainMergingConfig().lam} (method rain), {RainMergingConfig(method='ties').lam} (baselines)"
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if isinstance(value, list) and any(isinstance(v, str) and not v.strip() for v in value):
        return json.dumps(value)  # whitespace strings: YAML would fold them into blank lines
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def build_epilog(width: int = 100) -> str:
    """The ``--help`` epilog: every YAML key, with RainMergingConfig's fields, defaults and descriptions."""
    wrap = textwrap.TextWrapper(width=width, initial_indent="      ", subsequent_indent="      ")
    lines = ["YAML keys:", ""]
    for key, text in TOP_LEVEL_KEYS.items():
        lines.append(f"  {key}")
        lines.extend(wrap.wrap(text))
    lines += ["", "parameters: (RainMergingConfig fields; unknown keys are an error)", ""]
    docs = _attribute_docs()
    for f in dataclasses.fields(RainMergingConfig):
        lines.append(f"  {f.name} (default: {_default_text(f)})")
        lines.extend(wrap.wrap(docs.get(f.name, "(undocumented)").replace("``", "")))
    lines += [
        "",
        "Example (paths are relative to the YAML file):",
        "",
        "  base_model: Qwen/Qwen2.5-7B",
        "  reasoning_model: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        "  instruct_model: {path: Qwen/Qwen2.5-7B-Instruct, revision: main}",
        "  method: rain",
        "  parameters: {lam: 1.0, rcond: 0.1, window: 3}",
        "  calibration: {reasoning: data/reasoning.json, instruction: data/instruction.jsonl}",
        "  dtype: bfloat16",
        "  output: {max_shard_size: 5GB, private: true}",
        "",
        "Exit status: 0 success, 1 loading/merging/saving/pushing failed, 2 bad command line, YAML or "
        "calibration data.",
    ]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    _argv: list[str] = []

    def parse_args(self, args=None, namespace=None):  # the command line, for the hints of error()
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        if message.startswith("unrecognized arguments: "):
            extra = message.removeprefix("unrecognized arguments: ").split()
            # a word after an unknown --flag is that flag's value, not a folder (mergekit-yaml's switches take none)
            folders = [a for i, a in enumerate(extra) if not a.startswith("-")
                       and not (i and extra[i - 1].startswith("-") and "=" not in extra[i - 1]
                                and extra[i - 1] not in MERGEKIT_SWITCHES)]
            has_out = any(a == "--out" or a.startswith("--out=") for a in self._argv)
            if folders and not has_out:  # mergekit-yaml's habit: `mergekit-yaml config.yml out/`
                message += f"; the output folder is an option here: --out {folders[0]}"
            message += "".join(f"; {flag}: {MERGEKIT_SWITCH_HINTS[flag]}" for flag in dict.fromkeys(extra)
                               if flag in MERGEKIT_SWITCH_HINTS)
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=textwrap.fill("Merge an instruct model into a reasoning model with RAIN-Merging (or a baseline), "
                                  "keeping its <think> format; save it as a Hugging Face model folder and optionally "
                                  "push it to the Hub.", width=100),
        epilog=build_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG.yaml", help="the merge description (keys below)")
    parser.add_argument("--out", metavar="DIR", help="output folder (required unless --dry-run)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="after saving, upload DIR to this model repository "
                        "in one commit")
    parser.add_argument("--device", default="cpu", help="where forward passes and projections run, e.g. cuda, "
                        "cuda:1 (default: cpu)")
    parser.add_argument("--dry-run", action="store_true", help="validate the models, config and calibration "
                        "samples, print the plan, merge nothing (Hub models are still downloaded in full: the check "
                        "reads their files)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (only an earlier "
                        "output: a folder holding rain_merging_config.json)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logs, and tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s (rain_hf) {__version__}")
    return parser


# ---------------------------------------------------------------------------------------------- run
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rain-merge``; returns the exit status.

    Example:
        >>> main(["--version"])
        rain-merge (rain_hf) 0.1.0
        0
    """
    encoding = _lenient_output()
    try:
        return _main(argv)
    finally:
        encoding()


def _lenient_output() -> Callable[[], None]:
    """Print θ, λ and ‖ΔW‖ as escapes where stdout/stderr cannot encode them (a cp1252 console, a redirect on
    Windows) instead of failing after the model was saved; returns the function that restores the streams."""
    restores = []
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)
        if errors == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
            restores.append(functools.partial(stream.reconfigure, errors=errors))

    def restore_all() -> None:
        for restore in restores:
            restore()

    return restore_all


def _say(*lines: str) -> None:
    """Print ``lines`` to stdout. A reader that went away (``| head -1``) loses the rest of the report, not the
    run: the output is saved by then, and the push must still happen."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        try:  # later prints, and Python's own flush at exit, go nowhere instead of failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return int(exc.code or 0)
    restore = _configure_logging(args.verbose)
    previous = _raise_on_sigterm()
    try:
        return _run(args)
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CliError, ConfigError) as exc:
        return _fail(exc, 2, args.verbose)
    except Exception as exc:  # everything else is a runtime failure: one line, the traceback on --verbose
        return _fail(exc, 1, args.verbose)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        restore()


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a job scheduler), raised like Ctrl-C so a half-written output is removed."""


def _raise_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`_Terminated`; returns the previous handler (``None`` off the main thread)."""
    def handler(signum, frame):
        raise _Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # signals can only be set from the main thread
        return None


_FIELDS = frozenset(f.name for f in dataclasses.fields(RainMergingConfig))


def yaml_terms(message: str) -> str:
    """``message`` with the Python API's names for settings put as a rain-merge YAML writes them: the library's
    errors and warnings say ``config.layers`` or ``RainMergingConfig(stage2=False)``, and the YAML user needs
    ``parameters.layers`` and ``parameters.stage2: False``; ``device='cpu'`` is the ``--device cpu`` flag and
    ``torch_dtype='float32'`` the ``dtype: float32`` key.

    Example:
        >>> yaml_terms("set RainMergingConfig(stage2=False), config.layers or device='cpu' (config.json)")
        'set parameters.stage2: False, parameters.layers or --device cpu (config.json)'
        >>> yaml_terms("use precision='float64'; not read: lam=3.0, lam_grid=[1.0, 2.0]")
        'use parameters.precision: float64; not read: parameters.lam: 3.0, parameters.lam_grid: [1.0, 2.0]'
    """
    def key(name: str) -> str:  # method is a top-level key of the YAML
        return name if name == "method" else f"parameters.{name}"

    def call(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        return f"{key(name)}: {value.strip(chr(39))}" if name in _FIELDS else match.group(0)

    # one setting only: a call with several is Python code, left as written
    message = re.sub(r"\bRainMergingConfig\((\w+)=([^(),]*)\)", call, message)
    # name=value in prose: not an argument of a call written out, nor part of a path or URL (/runs/lam=2.0/)
    kept = _call_spans(message) + [m.span() for m in re.finditer(r"\S+", message) if re.search(r"[/\\]", m[0])]

    def setting(match: re.Match) -> str:
        inside = any(start <= match.start() < end for start, end in kept)
        return match.group(0) if inside or match.group(1) not in _FIELDS else call(match)

    message = re.sub(r"(?<![\w./\\?&=,])(\w+)=('[^']*'|\[[^\]]*\]|[\w.+-]+)", setting, message)
    message = message.replace("Unknown RainMergingConfig keys", "Unknown keys under parameters:")
    # not inside a path (/data/config.layers/)
    message = re.sub(r"(?<![\w./\\])(?:merger\.)?(?:RainMergingConfig|config)\.(\w+)",
                     lambda m: key(m.group(1)) if m.group(1) in _FIELDS else m.group(0), message)
    message = re.sub(r"\btorch_dtype='(\w+)'", r"dtype: \1", message)  # the YAML's load dtype
    return re.sub(r"\bdevice='([\w:]+)'", r"--device \1", message)


def _warnings_in_yaml_terms(text: str) -> str:
    """A plan summary or merge report with its warning lines in :func:`yaml_terms`, as stderr logs them (its
    other lines list settings as the merge read them)."""
    return "\n".join(yaml_terms(line) if line.startswith("  warning: ") else line for line in text.split("\n"))


def _call_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each ``name(...)`` in ``text``, nested parentheses included."""
    spans = []
    for match in re.finditer(r"\w+\(", text):
        depth, end = 0, None
        for i in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                end = i + 1
                break
        spans.append((match.start(), end if end is not None else len(text)))
    return spans


class _YamlTerms(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a formatting mistake is the handler's to report, as logging does
            return True
        record.msg, record.args = yaml_terms(message), None
        return True


def _fail(exc: BaseException, status: int, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    message = yaml_terms(" ".join(str(exc).split())) or type(exc).__name__
    if not isinstance(exc, (CliError, ConfigError)) and type(exc).__name__ not in message:
        message = f"{message} ({type(exc).__name__})"
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _configure_logging(verbose: bool) -> Callable[[], None]:
    """Send rain_hf's logs to stderr (INFO, or DEBUG with --verbose); returns a function that undoes it."""
    package = logging.getLogger("rain_hf")
    saved = (package.level, package.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else
                                           f"{PROG}: %(message)s"))
    handler.addFilter(_YamlTerms())
    package.addHandler(handler)
    package.setLevel(logging.DEBUG if verbose else logging.INFO)
    package.propagate = False

    def restore() -> None:
        package.removeHandler(handler)
        package.setLevel(saved[0])
        package.propagate = saved[1]

    return restore


def _check_push_target(repo_id: str | None, online: bool, token: str | None = None) -> None:
    """A repo id the Hub would refuse, or (with ``online``) an offline Hub or no token at all, found before the
    merge rather than after it."""
    if repo_id is None:
        return
    if not repo_id.strip():  # e.g. --push-to-hub "$REPO" with REPO unset: not "no push"
        raise CliError(f"--push-to-hub {repo_id!r}: give the repository id to push to (e.g. me/my-merge), or leave "
                       "the option out.")
    from .hub import HubError, check_push_target

    try:
        check_push_target(repo_id, need_network=online)
    except HubError as exc:
        later = " (or merge without --push-to-hub and upload the folder later)" if "OFFLINE" in exc.reason else ""
        raise CliError(f"--push-to-hub {repo_id!r}: {exc.reason}{later}") from exc
    if online and token is None:
        from huggingface_hub import get_token

        if not get_token():  # the push would fail only after the whole merge
            raise CliError(f"--push-to-hub {repo_id!r}: no Hub token: log in (`hf auth login`), set HF_TOKEN, or "
                           "give token: in the YAML (or merge without --push-to-hub and upload the folder later).")


def _check_calibration_files(job: MergeJob, config_path: str) -> None:
    """Each calibration file this merge reads must parse and hold records with a prompt: checked before any model
    is loaded (the merge validates every record again)."""
    from .calibration import CalibrationError, check_records

    for name, path in job.calibration.items():
        if job.config.uses_calibration(name):
            try:
                check_records(str(path), f"{name} calibration")
            except CalibrationError as exc:
                raise CliError(f"{config_path}: calibration.{name}: {exc}") from exc


def _dry_run_calibration(job: MergeJob, tokenizer: Any, config_path: str, context: int | None = None) -> list[str]:
    """The dry run's tokenised check of each calibration set the merge reads (what ``max_length`` cuts off,
    samples longer than the model's ``context``, and ``lam: auto``'s hold-out), as the merge prepares them after
    the load; one plan line per set. Sets with prompt-only records are written by the reasoning model during the
    merge, so they are checked then."""
    from .calibration import (
        CalibrationError,
        PromptOnlyError,
        lam_auto_holdout,
        prepare_instruction_calibration,
        prepare_reasoning_calibration,
    )

    lines = []
    for name, prepare in (("reasoning", prepare_reasoning_calibration),
                          ("instruction", prepare_instruction_calibration)):
        if name not in job.calibration or not job.config.uses_calibration(name):
            continue
        stats: dict[str, Any] = {}
        try:
            samples = prepare(str(job.calibration[name]), tokenizer, job.config, stats=stats)
        except PromptOnlyError:
            lines.append(f"  {name}: prompt-only records, written by the reasoning model during the merge and "
                         "checked then")
            continue
        except CalibrationError as exc:
            raise CliError(f"{config_path}: calibration.{name}: {exc}") from exc
        line = f"  {name}: {len(samples)} usable samples ({stats['num_malformed']} malformed, skipped)"
        longer = sum(len(s.input_ids) > context for s in samples) if context else 0
        if longer:
            line += (f", {longer} longer than the model's context (max_position_embeddings={context}): set "
                     f"parameters.max_length to at most {context}")
        if name == "reasoning" and job.config.lam == "auto" and job.config.stage1:  # else nothing is held out
            try:
                kept, held = lam_auto_holdout(samples, job.config.lam_auto_holdout, job.config.seed)
            except ConfigError as exc:
                raise ConfigError(f"{config_path}: {exc}") from exc
            line += f", {len(held)} held out by lam: auto, {len(kept)} for stage 1"
        lines.append(line)
    return lines


def _check_load_dtype(job: MergeJob, plan: Any, reasoning: Any, config_path: str) -> None:
    """``dtype:`` narrower than the weights the merge saves, found before the load (and in a dry run)."""
    from .merger import _DTYPES, _saved_dtype, auto_load_dtype, load_dtype_problem

    auto = auto_load_dtype(plan, reasoning)
    if job.dtype == "auto" and auto is None:
        return  # the load's own check says it, once the dtype is known
    loaded = auto[0] if job.dtype == "auto" else _DTYPES[job.dtype]
    found = load_dtype_problem(plan, reasoning, loaded)
    if found:
        name, short = str(found[0]).replace("torch.", ""), str(loaded).replace("torch.", "")
        how = f"dtype: auto loads the model as {short} ({auto[1]})" if job.dtype == "auto" else f"dtype: {short}"
        or_auto = " (or auto)" if job.dtype != "auto" and auto and auto[0] == found[0] else ""
        raise CliError(f"{config_path}: {how}, which cannot hold the merged weights, saved as {name} "
                       f"({'parameters.output_dtype' if job.config.output_dtype else 'as stored'}): use dtype: "
                       f"{name}{or_auto}, or set parameters.output_dtype: {short} to save in {short}.")
    saved = {_saved_dtype(plan.config, reasoning.dtype(t.weight_key)) for t in plan.targets}
    if job.dtype != "auto" and job.config.output_dtype is None and saved and loaded not in saved:
        # mergekit's top-level dtype is the saved one: a file written for it would silently keep the stored dtype
        from .config import DTYPES

        stored = ", ".join(sorted(str(d).replace("torch.", "") for d in saved))
        fix = (f"Set parameters.output_dtype: {job.dtype} to save in {job.dtype} (mergekit's dtype means that)"
               if job.dtype in DTYPES else f"The merged weights can be saved as {', '.join(DTYPES)} "
               "(parameters.output_dtype)")
        if len(saved) == 1:
            fix += f", or parameters.output_dtype: {stored} to keep the stored dtype and say so"
        fix += "."
        logger.warning("%s: dtype: %s is the dtype the reasoning model is loaded in; the merged weights are saved "
                       "as stored (%s). %s", config_path, job.dtype, stored, fix)


def _check_out_models(out: Path, plan: Any) -> None:
    """--out must not be, or hold, an input model's folder (known once the plan has resolved them)."""
    from .merger import input_folder_in

    clash = input_folder_in(out, plan.sources)
    if clash:
        raise CliError(f"--out {str(out)!r} is (or holds) the {clash[0]} model's folder {clash[1]}: the merge would "
                       "replace an input. Pick another folder.")


def _check_out_folder(out: Path, job: MergeJob, overwrite: bool) -> None:
    """--out problems the save would only meet after the merge, found before any model is fetched; the most
    specific first (an input inside it, a file), so that the advice given is one that works."""
    target = out.expanduser().resolve()
    files = {f"calibration.{kind}": path for kind, path in job.calibration.items()}
    files.update({"output.card_template": job.card_template, "config file": job.source})
    for what, file in files.items():
        if file is not None and file.resolve() == target:
            raise CliError(f"--out {str(out)!r} is the {what} itself; --out names the folder the merged model is "
                           "written to: pick another path.")
        if file is not None and file.resolve().is_relative_to(target):
            raise CliError(f"--out {str(out)!r} holds the {what} {file}: saving there would replace the folder and "
                           "delete it. Pick another folder.")
    if target.exists() and not target.is_dir():  # target: ~ expanded (--out=~/x reaches us unexpanded)
        raise CliError(f"--out {str(out)!r} is a file, not a folder: pick another path.")
    from .merger import input_folder_in
    from .writer import holds_output, replace_problem

    # an input's folder is named by _check_out_models, once planning has resolved the models
    is_input = input_folder_in(out, {role: m for role, m in job.models.items() if Path(m).is_dir()})
    problem = None if is_input else replace_problem(out, marker=CONFIG_NAME)
    if problem:  # --overwrite would not help
        raise CliError(f"--out {str(out)!r}: {problem}")
    # an empty folder made ahead is filled in place (it may be a mount point): only it must be writable
    parent = target if target.is_dir() and not holds_output(target) else target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"--out {str(out)!r}: {parent} is a file, so no folder can be made under it.")
    if not os.access(parent, os.W_OK):
        raise CliError(f"--out {str(out)!r}: {parent} is not writable, so the output cannot be written there.")
    if not is_input and not overwrite and holds_output(out):
        raise CliError(f"--out {str(out)!r} already exists; pass --overwrite to replace it or pick another "
                       "folder.")


def _reworded(exc: Exception, job: MergeJob) -> str:
    """``exc``'s message naming the folder the CLI looked in: a name that is no folder under the YAML's folder
    is tried as a Hub id, and a failed download names the folder under the working directory instead."""
    message = str(exc)
    anchor = job.source.resolve().parent
    for name in job.models.values():
        seen = f"local folder {Path(name).resolve()} "
        if seen in message and Path(name).resolve() != anchor / name:
            message = message.replace(seen, f"local folder {anchor / name} (model paths are relative to the YAML "
                                             "file) ")
    return message


def _run(args: argparse.Namespace) -> int:
    job = load_job(args.config)
    if not args.dry_run and not args.out:
        raise CliError("--out DIR is required (or pass --dry-run).")
    out = Path(args.out) if args.out else None
    from .calibration import CalibrationError
    from .checkpoints import CheckpointError, ModelNameError
    from .lora import AdapterError
    from .merger import ModelMismatchError, RainMerger, check_device

    check_device(args.device)
    for kind, path in job.calibration.items():  # the Python API warns when given data it does not use: so does this
        if not job.config.uses_calibration(kind):
            logger.warning("%s: calibration.%s (%s) is not used by this merge (method=%s, stage1=%s, stage2=%s, "
                           "lam=%s).", args.config, kind, path, job.config.method, job.config.stage1,
                           job.config.stage2, job.config.lam)
    _check_push_target(args.push_to_hub, online=not args.dry_run, token=job.token)
    # everything that can be checked without loading weights, before the load (and in a dry run); the checks
    # that need no model first, as planning a Hub model downloads its weights
    _check_calibration_files(job, args.config)
    if out is not None:
        _check_out_folder(out, job, args.overwrite)
    try:
        parts = RainMerger._plan_parts(job.models["base"], job.models["reasoning"], job.models["instruct"],
                                       config=job.config, revision=job.revision, token=job.token)
    except (CalibrationError, ConfigError) as exc:  # e.g. think_open is not one token: a parameters problem
        raise CliError(f"{args.config}: {exc}") from exc
    except (ModelMismatchError, AdapterError, ModelNameError) as exc:
        # the YAML names no model, or models that do not fit together: fix the YAML
        raise CliError(f"{args.config}: {_reworded(exc, job)}") from exc
    except CheckpointError as exc:
        message = _reworded(exc, job)
        if message != str(exc):
            raise type(exc)(message) from exc
        raise
    plan, reasoning = parts[0], parts[2]
    for role, source in plan.sources.items():
        if role in job.written_models and source.hub_id is None:
            source.name_or_path = job.written_models[role]  # the card names local inputs as the YAML does
    _check_load_dtype(job, plan, reasoning, args.config)
    if out is not None:
        _check_out_models(out, plan)
    if args.dry_run:
        checked = _dry_run_calibration(job, parts[1], args.config, plan.context_length)
        _say(_warnings_in_yaml_terms(plan.summary()), job.describe(args.out, args.push_to_hub))
        if checked:
            _say("calibration samples (tokenised as the merge will):", "\n".join(checked))
        _say("dry run: nothing was merged.")
        return 0

    torch_dtype = None if job.dtype == "auto" else job.dtype
    merger = RainMerger._from_plan(parts, device=args.device, torch_dtype=torch_dtype)
    reasoning_file, instruction_file = (str(job.calibration[kind]) if job.config.uses_calibration(kind) else None
                                        for kind in CALIBRATION_KEYS)
    try:
        merger.merge(reasoning_calibration=reasoning_file, instruction_calibration=instruction_file)
    except (CalibrationError, ConfigError) as exc:  # the YAML's data or parameters, as when planning: exit 2
        raise CliError(f"{args.config}: {exc}") from exc
    for kind in CALIBRATION_KEYS:
        if (merger.calibration_info.get(kind) or {}).get("is_file") and kind in job.written_calibration:
            merger.calibration_info[kind]["source"] = job.written_calibration[kind]
    model_id = None
    if args.push_to_hub:
        from .hub import namespaced_repo_id

        model_id = namespaced_repo_id(args.push_to_hub, job.token)
    from .card import TemplateProblem

    save = functools.partial(merger.save_pretrained, out, overwrite=args.overwrite,
                             max_shard_size=job.max_shard_size, model_id=model_id)
    try:
        saved, card_failed = save(card_template=job.card_template), None
    except TemplateProblem as exc:  # the merge is not thrown away for its card
        saved, card_failed = save(card_template=None), exc
        logger.error("output.card_template: %s The model was saved with the default card instead.", exc)
    _say(_warnings_in_yaml_terms(str(merger.report)), f"saved: {saved}")
    if card_failed is not None:  # the output is complete but not as asked: say so in the status
        pushed = (f" It was not pushed to {args.push_to_hub}: fix the template, write the card again "
                  f"(rain_hf.card.write_model_card with model_id={args.push_to_hub!r}) and push the folder "
                  "(rain_hf.hub.push_folder)." if args.push_to_hub else "")
        print(f"{PROG}: error: the card template failed, so {saved} has the default card.{pushed}", file=sys.stderr)
        return 1
    if args.push_to_hub:
        from .hub import push_folder

        info = push_folder(saved, args.push_to_hub, private=job.private, token=job.token,
                           commit_message=f"Upload {job.config.method} merge made with rain-merge")
        _say(f"pushed: {info.pr_url or info.commit_url}")
    return 0
