"""Calibration data for RAIN-Merging: loading, validation, rendering and token spans.

Two calibration sets drive a RAIN merge, one per stage:

* the *reasoning* set (``prompt``, ``reasoning``, ``response``), whose think-token positions define the stage-1
  features;
* the *instruction* set (the same fields, the thinking text may be called ``reason``), optionally annotated with
  the instruction strings inside the prompt and the parts of the response they constrain; it gives stage 2 its
  query spans (response R, unrelated U) and key spans (instructions I).

Every sample is rendered with the reasoning model's chat template as::

    <chat template with the prompt as the user message, add_generation_prompt=True>
    [<think>\\n]                 (only when the rendered prompt does not already end with the think-open token)
    <reasoning>\\n</think>\\n\\n<response>

(the R1 trace layout; the three texts are stripped of surrounding whitespace first; a template whose generation
prompt already closes the thinking, i.e. one with thinking disabled, is refused). Every segment is placed by
construction, so its character offsets are known; the text is tokenized once with an offset mapping and each
character span becomes the token span of the tokens that overlap it. Annotation strings are searched only inside
the segment they belong to, never in the whole text, so short strings such as ``"."`` or ``"at"`` land in the
right place, with or without a BOS token in the template.

Records that carry only a prompt can be completed by the reasoning model itself with :func:`generate_traces`.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import contextvars
import copy
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._modes import ONE_SEQUENCE, PLAIN_GREEDY, end_ids, model_device, seeded
from .config import POSITION_SETS as POSITION_MODES
from .config import ConfigError, fewest_for_holdout, holdout_count

logger = logging.getLogger(__name__)
_COLLECTED: contextvars.ContextVar[tuple[list[str], ...]] = contextvars.ContextVar("rain_hf_calibration_warnings",
                                                                                   default=())


def _warn(message: str, *args: Any) -> None:
    """Log a warning about the calibration data, and hand its text to :func:`collect_warnings` when one is open
    (whatever the logging level: a merge's report and card list them)."""
    logger.warning(message, *args)
    for said in _COLLECTED.get():
        said.append(message % args if args else message)


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """The texts of the warnings about calibration data given inside the block, in order; a block inside another
    (a merge's own, inside a caller's) hands them to both."""
    said: list[str] = []
    token = _COLLECTED.set((*_COLLECTED.get(), said))
    try:
        yield said
    finally:
        _COLLECTED.reset(token)

Span = tuple[int, int]
REASONING_KEYS = ("reasoning", "reason")
# model answers in other formats (TRL's prompt-completion, Alpaca's output, preference sets): not read, but a
# prompt-only record carrying one is warned about, as its trace would be replaced by a generated one (a reference
# 'answer' or 'solution', as math sets give, is no trace and is not warned about)
_UNREAD_ANSWER_KEYS = ("chosen", "completion", "output")
# Stand-in user message used to find where the chat template puts the user's text.
_SENTINEL = "RainHfPromptSentinel7c1e5b"
_MAX_REASONS_SHOWN = 5
_MAX_SKIPS_LOGGED = 5  # malformed samples logged one by one; a whole file of them would flood the log


class CalibrationError(ValueError):
    """The calibration data (or the tokenizer used to render it) cannot be used; the message says how to fix it."""


class PromptOnlyError(CalibrationError):
    """Records with only a prompt were given without the reasoning model that writes their reasoning and response."""


class _Malformed(Exception):
    """Internal: one calibration record cannot be used (the reason is its message)."""


class _EmptyFile(CalibrationError):
    """A calibration file holding nothing but whitespace (:func:`check_records` words it as "no records")."""


@dataclass
class CalibrationSample:
    """One rendered calibration sample with the token spans the two stages need.

    All spans are half-open ``[start, end)`` token index ranges into :attr:`input_ids`; span lists are sorted and
    non-overlapping.

    Attributes:
        input_ids: the full rendered sequence (chat-templated prompt, think block, response).
        think_open: token index of the think-open token.
        think_close: token index of the think-close token.
        prompt_span: tokens of the user prompt text (a token that straddles the template and the prompt counts).
        thinking_span: tokens strictly between the two think tokens.
        response_span: tokens after the think-close token, to the end of the sequence.
        instruction_spans: I, the instruction tokens inside the prompt (default: the whole prompt span).
        constrained_spans: R, the response tokens constrained by the instructions. Default (no R annotation
            found): the response span less the annotated unrelated spans, so that R and U never share a token.
            Empty when the cut to ``max_length`` removed every annotated R span (logged): stage 2 then leaves the
            sample out of the alignment mean.
        unrelated_spans: U, the thinking span plus any annotated unrelated response spans. Annotated R and U share
            the tokens where the annotations themselves overlap (26 of the paper's 365 instruction samples do);
            those tokens count in both.
        index: index of the record in the user's input.
    """

    input_ids: list[int]
    think_open: int
    think_close: int
    prompt_span: Span
    thinking_span: Span
    response_span: Span
    instruction_spans: list[Span] = field(default_factory=list)
    constrained_spans: list[Span] = field(default_factory=list)
    unrelated_spans: list[Span] = field(default_factory=list)
    index: int = 0

    def think_positions(self, mode: str = "window", window: int = 3) -> list[int]:
        """Token positions of the thinking features, sorted and unique.

        Args:
            mode: ``"think"`` = the two think tokens; ``"think+prev"`` adds the token before each (its output
                predicts the think token); ``"window"`` adds every position within ±``window`` of both;
                ``"window-before-answer"`` is ``"window"`` without the positions after the think-close token
                (they predict the answer's first tokens, where format instructions act).
            window: radius of the window neighbourhoods.

        Returns:
            Positions clipped to ``[0, len(input_ids))``.
        """
        anchors = (self.think_open, self.think_close)
        if mode == "think":
            positions = set(anchors)
        elif mode == "think+prev":
            positions = {p + d for p in anchors for d in (-1, 0)}
        elif mode in ("window", "window-before-answer"):
            if isinstance(window, bool) or not isinstance(window, int) or window < 0:
                raise ValueError(f"window={window!r} must be an integer >= 0.")
            positions = {p + d for p in anchors for d in range(-window, window + 1)}
            if mode == "window-before-answer":
                positions = {p for p in positions if p <= self.think_close}
        else:
            raise ValueError(f"Unknown think-position mode {mode!r}; use one of {list(POSITION_MODES)}.")
        n = len(self.input_ids)
        return sorted(p for p in positions if 0 <= p < n)


# ----------------------------------------------------------------------------------------------------- loading
def load_records(data: Any) -> list[dict]:
    """Read calibration records from a path, a list of dicts or a ``datasets.Dataset``.

    Args:
        data: a ``.json`` file holding a list of objects, a ``.jsonl`` file (one object per line, blank lines
            ignored), a list/tuple of dicts, or a ``datasets.Dataset``. Files must be UTF-8; a file whose content
            is plainly the other format (JSON Lines in ``.json``, one list in ``.jsonl``) is read as what it holds.

    Returns:
        The records as a list of plain dicts (shallow copies).

    Raises:
        CalibrationError: missing, empty or non-UTF-8 file, unsupported extension, invalid JSON (with the line
            number for JSONL), a record that is not an object, or an unsupported input type.
    """
    return _load_with_locations(data)[0]


def check_records(data: Any, what: str = "calibration") -> int:
    """Read calibration records without a tokenizer or model, and refuse data no record of which has a prompt.

    A quick check before minutes of model loading: the merge itself still validates each record (and skips or
    refuses malformed ones by ``on_malformed``). Returns the number of records with a prompt.

    Raises:
        CalibrationError: what :func:`load_records` raises, no records, or none with a prompt (naming the first
            record's keys and the fields expected).
    """
    try:
        records, locations = _load_with_locations(data)
    except _EmptyFile as err:
        raise CalibrationError(f"The {what} data holds no records: {err}") from None
    if not records:
        raise CalibrationError(f"The {what} data holds no records.")
    usable, malformed = 0, None
    for i, record in enumerate(records):
        try:
            prompt = _raw_fields(record)[0]
        except _Malformed as err:
            malformed = malformed or (i, str(err))
            continue
        usable += isinstance(prompt, str) and bool(prompt.strip())
    if not usable:
        where = f" ({locations[0]})" if locations else ""
        if malformed is not None:
            at = f"index {malformed[0]}" + (f" ({locations[malformed[0]]})" if locations else "")
            raise CalibrationError(f"No {what} record is usable: the first malformed one, at {at}: {malformed[1]}.")
        first = records[0].get("prompt") if isinstance(records[0], Mapping) else None
        if first is not None:  # a prompt field that holds no text: say what it holds
            shown = repr(first) if len(repr(first)) <= 60 else repr(first)[:57] + "..."
            raise CalibrationError(
                f"No {what} record has a prompt: the first one{where} has field 'prompt' = {shown} (type "
                f"{type(first).__name__}), where the prompt's text is wanted as a non-empty string.")
        raise CalibrationError(
            f"No {what} record has a prompt: the first one{where} has keys {sorted(records[0])}. Records need "
            "'prompt' (with 'reasoning' and 'response', or alone to let the reasoning model write them), or "
            "'messages' (one user turn, optionally one assistant turn).")
    return usable


def _load_with_locations(data: Any) -> tuple[list[dict], list[str] | None]:
    """:func:`load_records`, plus where each record came from (``"FILE line N"`` / ``"FILE record N"``) when
    ``data`` is a path, so that errors about a record can name it."""
    if isinstance(data, (str, os.PathLike)):
        locations: list[str] = []
        return _load_path(Path(data).expanduser(), locations), locations
    return _load_in_memory(data), None


def _load_in_memory(data: Any) -> list[dict]:
    if isinstance(data, Mapping):
        raise CalibrationError(
            "Calibration data is a single dict (or a DatasetDict): pass a list of records, a Dataset split "
            "(e.g. dataset['train']) or a path to a .json/.jsonl file."
        )
    if _is_hf_dataset(data):
        return [dict(row) for row in data]
    if isinstance(data, (list, tuple)):
        records = []
        for i, record in enumerate(data):
            if not isinstance(record, Mapping):
                raise CalibrationError(
                    f"Calibration record {i} is a {type(record).__name__}, not a dict: every record must be an "
                    "object with 'prompt', 'reasoning' and 'response'."
                )
            records.append(dict(record))
        return records
    raise CalibrationError(
        f"Unsupported calibration data of type {type(data).__name__}: pass a path to a .json/.jsonl file, a list "
        "of dicts or a datasets.Dataset."
    )


def _is_hf_dataset(data: Any) -> bool:
    """True for a ``datasets.Dataset`` / ``IterableDataset`` (without importing ``datasets`` otherwise)."""
    if not type(data).__module__.startswith("datasets"):
        return False
    import datasets

    return isinstance(data, (datasets.Dataset, datasets.IterableDataset))


def _load_path(path: Path, locations: list[str]) -> list[dict]:
    """Read a ``.json`` list or a ``.jsonl`` file of records, appending each record's location to ``locations``.

    The extension picks the format, but a file whose content is plainly the other format (JSON Lines named
    ``.json``, one JSON list named ``.jsonl``) is read as what it holds, with a logged note. A UTF-8 byte-order
    mark is accepted.
    """
    if not path.exists():
        raise CalibrationError(f"Calibration file {str(path)!r} does not exist: check the path.")
    if path.is_dir():
        raise CalibrationError(f"Calibration path {str(path)!r} is a folder: pass a .json or .jsonl file.")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise CalibrationError(
            f"Unsupported calibration file extension {path.suffix!r} ({path}): use .json (a list of objects) or "
            ".jsonl (one object per line)."
        )
    text = _read_utf8(path)
    if not text.strip():
        raise _EmptyFile(
            f"{path} is empty: fill it with records (a JSON list in .json, one JSON object per "
            "line in .jsonl)."
        )
    try:
        if suffix == ".jsonl":
            return _read_jsonl_file(path, text, locations)
        return _read_json_file(path, text, locations)
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise CalibrationError(f"{path} nests its JSON deeper than Python's parser goes: a calibration record is "
                               "a flat object of strings (and lists of them).") from None


def _read_utf8(path: Path) -> str:
    """The file's text, refusing bytes that are not UTF-8 with their offset (a leading BOM is dropped)."""
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    wide = next((name for mark, name in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                                         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
                 if data.startswith(mark)), None)
    if wide is None and b"\x00" in data[:64]:  # JSON never holds a raw NUL: ASCII text in UTF-16/32 without a BOM
        width = 4 if data[1:3] == b"\x00\x00" or data[:3] == b"\x00\x00\x00" else 2
        order = "be" if data[:1] == b"\x00" else "le"
        wide = f"utf-{8 * width}{order}"
    if wide:
        raise CalibrationError(f"{path} is not UTF-8 text: it looks like {wide.upper()}; re-save it as UTF-8 (e.g. "
                               f"`iconv -f {wide} -t utf-8 IN > OUT`).")
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = bom + err.start
        line = data.count(b"\n", 0, at) + 1
        raise CalibrationError(
            f"{path} is not UTF-8 text: byte {at} (line {line}) is {data[at:at + 1]!r} ({err.reason}); re-save the "
            "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT` for a Latin-1 file, `-f cp1252` for one "
            "written by Windows programs)."
        ) from None


_NOTED: set[str] = set()  # files whose format note was logged: rain-merge reads each file twice (check, merge)


def _note_once(path: Path, message: str) -> None:
    key = str(path.resolve())
    if key not in _NOTED:
        _NOTED.add(key)
        logger.info(message, path)


def _read_jsonl_file(path: Path, text: str, locations: list[str]) -> list[dict]:
    """Records of a ``.jsonl`` file; a file holding one JSON list instead (often pretty-printed) is read as one."""
    try:
        records, where = _parse_jsonl(path, text)
    except CalibrationError:
        try:
            whole, broken = json.loads(text), None
        except json.JSONDecodeError as err:
            whole, broken = None, err
        if isinstance(whole, list):
            _note_once(path, "%s holds one JSON list, not JSON Lines: read as a list of records (name it .json).")
            return _records_of_list(path, whole, locations)
        if isinstance(whole, dict):
            raise CalibrationError(
                f"{path} holds one JSON object spread over several lines, not JSON Lines: write one record per line "
                "(e.g. `jq -c . IN > OUT`), or a list of records in a .json file."
            ) from None
        # a pretty-printed list with an error: its line 1 is "[", so name where the list breaks (a first line that
        # is a whole value is JSON Lines of lists, whose own error stands)
        first_line = text.lstrip().splitlines()[0]
        if broken is not None and first_line.startswith("[") and _json_or_none(first_line) is None:
            raise CalibrationError(f"{path} holds one JSON list, not JSON Lines, and it is not valid JSON "
                                   f"({broken.msg} at line {broken.lineno}, column {broken.colno}).") from None
        raise
    locations.extend(where)
    return records


def _read_json_file(path: Path, text: str, locations: list[str]) -> list[dict]:
    """Records of a ``.json`` list; a file holding JSON Lines instead (one object per line) is read as such."""
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        # JSON Lines content fails as "Extra data" after its first object
        if err.msg != "Extra data" or not text.lstrip().startswith("{"):
            raise CalibrationError(
                f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
            ) from err
        try:
            records, where = _parse_jsonl(path, text)
        except CalibrationError as jsonl_err:
            raise CalibrationError(
                f"{path} is not valid JSON (extra data at line {err.lineno}, column {err.colno}); it looks like JSON "
                f"Lines (name it .jsonl), but as JSON Lines: {jsonl_err}"
            ) from None
        _note_once(path, "%s holds JSON Lines (one object per line), not a JSON list: read as JSON Lines (name it "
                         ".jsonl).")
        locations.extend(where)
        return records
    one_record = isinstance(content, dict) and ("prompt" in content or "messages" in content)
    if one_record and "\n" not in text.strip():  # one line of JSON Lines, read as two lines would be
        _note_once(path, "%s holds JSON Lines (one object per line), not a JSON list: read as JSON Lines (name it "
                         ".jsonl).")
        return _records_of_list(path, [content], locations)
    if not isinstance(content, list):
        raise CalibrationError(
            f"{path} holds a JSON {type(content).__name__}; a .json calibration file must hold a list of "
            "objects (use .jsonl for one object per line)."
        )
    return _records_of_list(path, content, locations)


def _parse_jsonl(path: Path, text: str) -> tuple[list[dict], list[str]]:
    """(records, locations) of JSON Lines text; blank lines are skipped."""
    records, where = [], []
    # split on "\n" only: JSON strings may hold U+2028 and other characters that str.splitlines() breaks at
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:  # a byte-order mark opens each file of a concatenation of files, not only the first line
            record = json.loads(line.removeprefix("\ufeff"))
        except json.JSONDecodeError as err:
            raise CalibrationError(
                f"{path}: line {lineno} is not valid JSON ({err.msg}): fix or remove that line."
            ) from err
        if not isinstance(record, dict):
            raise CalibrationError(f"{path}: line {lineno} is a JSON {type(record).__name__}, not an object.")
        records.append(record)
        where.append(f"{path} line {lineno}")
    return records, where


def _json_or_none(text: str) -> Any:
    """``text`` parsed as one JSON document, or ``None`` when it is not one."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _records_of_list(path: Path, content: list, locations: list[str]) -> list[dict]:
    """The records of a JSON list read from ``path`` (each must be an object)."""
    try:
        records = _load_in_memory(content)
    except CalibrationError as err:
        raise CalibrationError(f"{path}: {err}") from None
    locations.extend(f"{path} record {i}" for i in range(len(records)))
    return records


# --------------------------------------------------------------------------------------------- tokenizer checks

def holdout_indices(n: int, share: float, seed: int = 0, groups: Sequence[Any] | None = None) -> list[int]:
    """Sorted indices of the ``round(n · share)`` (at least one) of ``n`` calibration samples that ``lam="auto"``
    holds out of stage 1 to measure L_think, drawn by a permutation seeded with ``seed``.

    Drawn, not taken from the end or at a fixed stride: calibration files come grouped by domain (the paper's:
    math, then code, then science) or alternating (plain and instructed prompts), and either layout would make
    the held-out samples one kind only.

    ``groups`` (one hashable key per sample, e.g. :func:`prompt_key`) keeps samples with equal keys on one side:
    samples that share a prompt share every hidden state up to the think-open token, so holding out one while
    stage 1 sees another would measure L_think partly on features stage 1 protected (the paper's reasoning set
    has 150 traces of 118 prompts). Groups are taken in the permutation's order when they fit in the count, so
    with distinct keys the draw is the same as without ``groups``; when no group fits, the smallest one (the first
    drawn among equals) is held out alone.

    Example:
        >>> holdout_indices(8, 0.25) == holdout_indices(8, 0.25)
        True
        >>> len(holdout_indices(64, 0.25))
        16
        >>> holdout_indices(4, 0.5, groups=["a", "a", "b", "c"]) in ([0, 1], [2, 3])
        True
    """
    n_out = holdout_count(n, share)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    order = torch.randperm(n, generator=generator).tolist()
    if groups is None:
        return sorted(order[:n_out])
    if len(groups) != n:
        raise ValueError(f"holdout_indices: {len(groups)} group keys for {n} samples.")
    members: dict[Any, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    held: list[int] = []
    drawn = list(dict.fromkeys(groups[i] for i in order))  # the groups in the order of their first drawn sample
    for key in drawn:
        if len(held) + len(members[key]) <= n_out:
            held.extend(members[key])
        if len(held) == n_out:
            break
    if not held:
        held = list(members[min(drawn, key=lambda k: len(members[k]))])
    return sorted(held)


def holdout_split(items: Sequence[Any], share: float, seed: int = 0, key: Any = None
                  ) -> tuple[list[Any], list[Any]]:
    """(kept, held out): ``items`` split at :func:`holdout_indices`, each part in input order; ``key`` (a function
    of an item) groups the items that must stay on one side."""
    groups = None if key is None else [key(x) for x in items]
    out = set(holdout_indices(len(items), share, seed, groups))
    return [x for i, x in enumerate(items) if i not in out], [x for i, x in enumerate(items) if i in out]


def lam_auto_holdout(samples: Sequence[CalibrationSample], share: float, seed: int
                     ) -> tuple[list[CalibrationSample], list[CalibrationSample]]:
    """(stage-1 samples, held-out samples) of ``lam="auto"``: a seeded draw of ``share`` of the samples, those that
    share a prompt kept together, is left out of stage 1 to measure L_think.

    Raises:
        ConfigError: when the draw leaves no sample for stage 1.
    """
    kept, held = holdout_split(samples, share, seed, key=prompt_key)
    if kept and len(held) > holdout_count(len(samples), share):
        _warn("lam='auto' holds out %d of the %d reasoning calibration samples, where lam_auto_holdout=%s "
                       "asks for %d: every prompt has more traces than that, and one prompt's traces are held out "
                       "together.", len(held), len(samples), share, holdout_count(len(samples), share))
    if not kept and len({prompt_key(s) for s in samples}) == 1 and len(samples) > 1:
        raise ConfigError(f"lam='auto' holds out samples whose prompts stage 1 does not see, and all {len(samples)} "
                          "reasoning calibration samples share one prompt: add samples with other prompts, or set "
                          "lam to a number.")
    if not kept:
        # one sample is held out whatever the share, so a lower lam_auto_holdout helps only from two samples on
        lower = ", lower lam_auto_holdout" if len(samples) > 1 else ""
        raise ConfigError(f"lam='auto' holds out {len(held)} of the {len(samples)} reasoning calibration samples "
                          f"(lam_auto_holdout={share}), which leaves none for stage 1: pass at least "
                          f"{fewest_for_holdout(share)} samples{lower}, or set lam to a number.")
    return kept, held


def prompt_key(sample: CalibrationSample) -> tuple[int, ...]:
    """The tokens before the think-open token: samples with equal keys have equal hidden states there."""
    return tuple(sample.input_ids[:sample.think_open])


def check_think_tokens(tokenizer: Any, config: Any) -> tuple[int, int]:
    """Ids of ``config.think_open`` / ``config.think_close``, each required to be one token of the vocabulary.

    Raises:
        CalibrationError: naming the token that is missing or splits into several tokens.
    """
    if not all(hasattr(config, name) for name in ("think_open", "think_close")):
        # e.g. a transformers model config: the think tokens are rain_hf's settings
        raise TypeError(f"config must be a RainMergingConfig (it names the think tokens), got "
                        f"{type(config).__name__}: pass RainMergingConfig() or the merger's config.")
    ids = []
    for name in ("think_open", "think_close"):
        text = getattr(config, name)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        token_id = tokenizer.convert_tokens_to_ids(text)
        single = len(encoded) == 1 and token_id is not None and encoded[0] == token_id
        if not single or tokenizer.convert_ids_to_tokens(token_id) != text:
            raise CalibrationError(
                f"The {name.replace('_', '-')} token {text!r} is not a single token of the tokenizer (it encodes to "
                f"{len(encoded)} tokens {encoded}). Set config.{name} to the model's thinking token, or use the "
                "reasoning model's own tokenizer, which must have it as one token (check the order of the models: "
                "base_model, reasoning_model, instruct_model)."
            )
        ids.append(token_id)
    return ids[0], ids[1]


def _check_fast(tokenizer: Any) -> None:
    """Refuse tokenizers without an offset mapping (slow, Python-only tokenizers)."""
    if not getattr(tokenizer, "is_fast", False):
        raise CalibrationError(
            f"Calibration needs a fast tokenizer (character offsets), got {type(tokenizer).__name__}: load it "
            "with AutoTokenizer.from_pretrained(..., use_fast=True) or convert it to a tokenizers-backed one."
        )


@dataclass(frozen=True)
class _Template:
    """The chat template split around the user message, plus the think-token settings."""

    before: str
    after: str
    think_open: str
    think_close: str
    open_id: int
    close_id: int
    spacing: tuple[str, str, str] = ("\n", "\n", "\n\n")
    specials: tuple[str, ...] = ()  # the tokenizer's other special tokens, read as control tokens inside any text


def _template_parts(tokenizer: Any, config: Any) -> _Template:
    """Validate the tokenizer and find where its chat template puts the user message."""
    _check_fast(tokenizer)
    open_id, close_id = check_think_tokens(tokenizer, config)
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(
            "The tokenizer has no chat template: use the reasoning model's tokenizer, or set "
            "tokenizer.chat_template to its template."
        )
    rendered = _apply_template(tokenizer, _SENTINEL)
    if rendered.count(_SENTINEL) != 1:
        raise CalibrationError(
            "The chat template does not render the user message verbatim (a test message appears "
            f"{rendered.count(_SENTINEL)} times instead of once), so prompt spans cannot be located: use a "
            "template that inserts the message content unchanged."
        )
    before, after = rendered.split(_SENTINEL)
    if config.think_close in after:
        # Qwen3 rendered with enable_thinking=False and "no-think" variants end the generation prompt with an
        # empty think block; each sample would then carry a second think block the model never writes.
        raise CalibrationError(
            f"The chat template's generation prompt {after!r} already closes the thinking ({config.think_close!r}): "
            "the template disables thinking, so the calibration samples would hold two think blocks. Use a "
            "tokenizer/chat template with thinking enabled (for Qwen3, do not bake in enable_thinking=False), or "
            "set tokenizer.chat_template to one whose generation prompt stops at or before the think-open token."
        )
    spacing = tuple(getattr(config, "think_spacing", ("\n", "\n", "\n\n")))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    specials |= {t.content for t in added.values() if getattr(t, "special", False)}
    specials -= {config.think_open, config.think_close, ""}
    return _Template(before, after, config.think_open, config.think_close, open_id, close_id, spacing,
                     tuple(sorted(specials)))


def template_opens_think(tokenizer: Any, config: Any) -> bool:
    """Whether the chat template's generation prompt already ends with the think-open token (the R1-distill
    templates), so that the model never decides whether to think.

    Example (from the repository root):
        >>> from transformers import AutoTokenizer
        >>> from rain_hf import RainMergingConfig
        >>> tokenizer = AutoTokenizer.from_pretrained("benchmarks/organism/checkpoints/reasoning")
        >>> template_opens_think(tokenizer, RainMergingConfig())
        False
    """
    return template_think_tail(tokenizer, config) is not None


def template_think_tail(tokenizer: Any, config: Any) -> int | None:
    """How many tokens the chat template's generation prompt writes after the think-open token it ends with: 0 for
    a bare ``<think>``, 1 for R1-Distill's and QwQ's ``<think>\\n``; None when it does not open the think block.
    A generation's first own token follows them, so predictions up to there are the prompt's, not the model's."""
    template = _template_parts(tokenizer, config)
    stripped = template.after.rstrip()
    if not stripped.endswith(template.think_open):
        return None
    written = template.after[len(stripped):]
    return len(tokenizer(written, add_special_tokens=False)["input_ids"]) if written else 0


def _apply_template(tokenizer: Any, prompt: str) -> str:
    """The chat-templated text of a single user message, with the generation prompt."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str):
        raise CalibrationError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}, not text.")
    return rendered


def _generation_prefix(tokenizer: Any, template: _Template, prompt: str) -> tuple[str, int, int]:
    """The rendered prompt up to and including ``<think>\\n``, the character offset of the think-open token, and
    that of the prompt.

    The real rendering is compared with the sentinel split so that the prompt's offset is known exactly. A
    template that renders something of the moment (today's date in a default system prompt) is split again when
    it changed since: a run that crosses midnight must not lose the records rendered after it.
    """
    rendered = _apply_template(tokenizer, prompt)
    if rendered != template.before + prompt + template.after:
        again = _apply_template(tokenizer, _SENTINEL)
        if again.count(_SENTINEL) == 1:
            before, after = again.split(_SENTINEL)
            if rendered == before + prompt + after:
                template = replace(template, before=before, after=after)
    if rendered != template.before + prompt + template.after:
        raise _Malformed("the chat template does not render this prompt verbatim, so its span cannot be located")
    stripped = rendered.rstrip()
    if stripped.endswith(template.think_open):
        open_char = len(stripped) - len(template.think_open)
        prefix = rendered if len(stripped) < len(rendered) else rendered + template.spacing[0]
    else:
        open_char = len(rendered)
        prefix = rendered + template.think_open + template.spacing[0]
    return prefix, open_char, len(template.before)


# -------------------------------------------------------------------------------------------- record parsing
@dataclass
class _Fields:
    """The validated texts of one record and its annotations (groups of strings or ``[start, end]`` pairs)."""

    prompt: str
    reasoning: str
    response: str
    prompt_groups: list[list[Any]] = field(default_factory=list)
    response_groups: list[list[Any]] = field(default_factory=list)
    unrelated_groups: list[list[Any]] = field(default_factory=list)


class _ThinkSplit:
    """Marker: a text ``[<think>]thinking</think>answer`` whose thinking and answer still have to be split at the
    think tokens (an assistant message, or a ``response`` given without a separate reasoning field)."""

    def __init__(self, content: Any, source: str, reasoning_cell: str = "missing") -> None:
        self.content = content
        self.source = source  # the field as errors name it
        self.reasoning_cell = reasoning_cell  # "missing", or "empty" (a blank reasoning cell beside the response)
        # columns beside a chat turn: a reasoning text must repeat its thinking, a response its answer
        self.expected_thinking: str | None = None
        self.expected_answer: str | None = None


_FIELD_LABELS = ("field 'reasoning' / 'reason'", "field 'response'")


def _raw_fields(record: Mapping) -> tuple[Any, Any, Any]:
    """The raw (prompt, reasoning, response) of a record; ``None`` marks an absent field (see
    :func:`_labelled_fields`)."""
    return _labelled_fields(record)[:3]


def _labelled_fields(record: Mapping) -> tuple[Any, Any, Any, tuple[str, str]]:
    """The raw (prompt, reasoning, response) of a record, and how errors name the reasoning and the response;
    ``None`` marks an absent field.

    ``messages``-style records (one user turn, optionally one assistant turn whose content holds
    ``<think>…</think>answer`` or which has a ``reasoning_content``) are accepted too, or one user turn with the
    trace in the fields, or an answer-only assistant turn with its thinking in a reasoning field (fields beside a
    turn must repeat it, see :func:`_repeats_turn`), and so is a ``response`` holding ``<think>…</think>answer``
    when there is no reasoning field (the usual R1 dump).
    """
    # a datasets.Dataset gives every row every column, so a chat-format row arrives with prompt=None (or "")
    messages = record.get("messages")
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages] \
        if isinstance(messages, list) else None
    if not _no_prompt_field(record) and roles in (["user"], ["user", "assistant"]) \
            and isinstance(messages[0].get("content"), str):
        # both forms of one sample; any other 'messages' (a system turn, a whole conversation, []) is another
        # column of the data set, and the record is read through 'prompt' as it always was
        if messages[0]["content"].strip() != str(record["prompt"]).strip():
            raise _Malformed("fields 'prompt' and 'messages' both give the prompt, and they differ: keep one of "
                             "them")
        record = {**record, "prompt": None}  # the same prompt twice: read as the chat form, answers reconciled
    if _no_prompt_field(record) and messages is not None:
        if not isinstance(messages, list):
            raise _Malformed(f"field 'messages' is a {type(messages).__name__}, not a list of {{'role', 'content'}} "
                             "turns (a JSON string must be parsed first)")
        fields = _fields_from_messages(messages)
        given = {key: record[key] for key in (*REASONING_KEYS, "response") if not _blank(record.get(key))}
        if not given:
            return fields
        if len(messages) > 1:
            # a data set's answer columns beside its chat column, repeating its answer: one answer
            if _repeats_turn(given, messages[1], fields):
                return fields
            raise _Malformed("the assistant turn of 'messages' and the fields 'reasoning' / 'reason' / 'response' "
                             "give different answers: keep one of them")
        record = {**record, "prompt": fields[0]}  # the prompt as a chat turn, its trace in the fields
    if all(_blank(record.get(key)) for key in (*REASONING_KEYS, "response")):
        return record.get("prompt"), None, None, _FIELD_LABELS  # empty answer cells: a prompt to generate for
    given = {key: record[key] for key in REASONING_KEYS if not _blank(record.get(key))}
    if len(given) > 1 and len({str(v).strip() for v in given.values()}) > 1:
        raise _Malformed("fields 'reasoning' and 'reason' both hold a thinking text, and they differ: keep one of them")
    reasoning = next(iter(given.values()), None)
    response = record.get("response")
    if reasoning is None and response is not None:
        cell = "empty" if any(key in record and record[key] is not None for key in REASONING_KEYS) else "missing"
        return record.get("prompt"), _ThinkSplit(response, "response", cell), None, _FIELD_LABELS
    return record.get("prompt"), reasoning, response, _FIELD_LABELS


def _repeats_turn(given: Mapping[str, Any], turn: Mapping, fields: tuple) -> bool:
    """Whether the answer fields ``given`` beside a chat column repeat its assistant ``turn``. With a
    ``reasoning_content`` turn they must equal it and its content. Otherwise the content is split at the think
    tokens later, where the template is known, and compared then (see :class:`_ThinkSplit`): a reasoning text
    must equal the turn's thinking, or supply it where the turn holds the answer alone; a response must equal the
    turn's answer or its whole content."""
    content, thinking = turn.get("content"), turn.get("reasoning_content")
    if not isinstance(content, str) or not all(isinstance(value, str) for value in given.values()):
        return False
    reasoning = {value.strip() for key, value in given.items() if key != "response"}
    if len(reasoning) > 1:
        raise _Malformed("fields 'reasoning' and 'reason' both hold a thinking text, and they differ: keep one of "
                         "them")
    response = given["response"].strip() if "response" in given else None
    if thinking is not None or not isinstance(fields[1], _ThinkSplit):
        return (isinstance(thinking, str) and reasoning <= {thinking.strip()}
                and response in (None, content.strip()))
    fields[1].expected_thinking = reasoning.pop() if reasoning else None
    fields[1].expected_answer = response
    return True


def _grouped_reasons(failures: Sequence[tuple[int, str]]) -> list[tuple[str, list[int]]]:
    """Malformed samples' reasons, one per kind in the order first met, with the indices of its samples. Reasons
    that differ only in their numbers (token counts, positions) are one kind: a whole file usually fails the same
    way. A kind's shown reason is the one that asks for the most ("raise max_length to at least N"), so following
    it mends them all."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for index, reason in failures:
        groups.setdefault(re.sub(r"\d+", "#", reason), []).append((index, reason))

    def asks(reason: str) -> int:
        found = re.search(r"at least (\d+)", reason)
        return int(found.group(1)) if found else 0

    out = []
    for members in groups.values():
        reason = max((r for _, r in members), key=asks)  # the first met among equals
        if len({r for _, r in members}) > 1:
            shown = f"the most any of the {len(members)} asks" if asks(reason) else "the first"
            reason += f" ({shown}; the others differ only in their numbers)"
        out.append((reason, [i for i, _ in members]))
    return out


def _blank(value: Any) -> bool:
    """None or a whitespace-only string: a data set's empty cell."""
    return value is None or (isinstance(value, str) and not value.strip())


def _no_prompt_field(record: Mapping) -> bool:
    """Whether the record's 'prompt' is absent, None or blank (its chat form in 'messages' is then read)."""
    return _blank(record.get("prompt"))


def _prompt_label(record: Mapping) -> str:
    """Where a record's prompt comes from, as error messages name it."""
    if _no_prompt_field(record) and isinstance(record.get("messages"), list):
        return "messages[0].content"
    return "field 'prompt'"


def _fields_from_messages(messages: list) -> tuple[Any, Any, Any, tuple[str, str]]:
    """(prompt, reasoning, response, their labels) of a chat-format record; reasoning is split off at the think
    tokens later."""
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
    if roles not in (["user"], ["user", "assistant"]):
        raise _Malformed(f"'messages' must be one user turn, optionally followed by one assistant turn; got {roles}")
    for i, turn in enumerate(messages):
        if isinstance(turn.get("content"), list):
            raise _Malformed(f"messages[{i}].content is a list of content parts; only plain-text turns are read: "
                             "join the parts' text into one string")
    prompt = messages[0].get("content")
    if len(messages) == 1:
        return prompt, None, None, _FIELD_LABELS
    answer = messages[1]
    if answer.get("reasoning_content") is not None:
        return (prompt, answer["reasoning_content"], answer.get("content"),
                ("'messages[1].reasoning_content'", "'messages[1].content'"))
    return prompt, _ThinkSplit(answer.get("content"), "messages[1].content"), None, _FIELD_LABELS


def _is_prompt_only(record: Mapping) -> bool:
    """True when a record has a non-empty prompt but neither a reasoning trace nor a response (generation
    needed); a record without a usable prompt is left to validation, which names what is wrong."""
    if record.get("generation_error") is not None:
        return False
    try:
        prompt, reasoning, response = _raw_fields(record)
    except _Malformed:
        return False
    return isinstance(prompt, str) and bool(prompt.strip()) and reasoning is None and response is None


def _text(value: Any, label: str, template: _Template, check_think: bool) -> str:
    """A stripped, non-empty string (optionally free of think tokens), else :class:`_Malformed` naming ``label``
    (e.g. ``"field 'prompt'"``)."""
    if value is None:
        raise _Malformed(f"{label} is missing")
    if not isinstance(value, str):
        raise _Malformed(f"{label} is a {type(value).__name__}, not a string")
    value = value.strip()
    if not value:
        raise _Malformed(f"{label} is empty")
    if check_think:
        for token in (template.think_open, template.think_close):
            if token in value:
                raise _Malformed(
                    f"{label} contains the think token {token!r}: pass the thinking text and the answer "
                    "without think tags"
                )
    return value


def _parse_record(record: Mapping, template: _Template) -> _Fields:
    """Validate one record and gather its annotations."""
    if record.get("generation_error") is not None:
        raise _Malformed(f"generated trace unusable: {record['generation_error']}")
    if record.get("prompt") is None and "messages" not in record:
        # another dataset's layout (ShareGPT 'conversations', Alpaca 'instruction'/'output' …): say what is read
        raise _Malformed(f"field 'prompt' is missing (the record's fields: {sorted(map(str, record))[:8]}); a "
                         "record holds 'prompt' with 'reasoning' and 'response' (or a 'response' written "
                         "'<think>…</think>answer', or the prompt alone), or chat 'messages'")
    prompt, reasoning, response, (reasoning_label, response_label) = _labelled_fields(record)
    answer_at = 0  # where the answer starts in its field as given
    if isinstance(reasoning, _ThinkSplit):
        split, source = reasoning, reasoning.source
        content = split.content
        if (split.expected_thinking is not None and isinstance(content, str) and template.think_open not in content
                and template.think_close not in content):
            # a turn that holds the answer alone beside a column that holds its thinking: one sample in two parts
            reasoning, response, answer_at = split.expected_thinking, content, 0
            reasoning_label, response_label = _FIELD_LABELS[0], f"the answer in '{source}'"
        else:
            reasoning, response, answer_at = _split_think_text(content, template, source, split.reasoning_cell)
            if split.expected_thinking not in (None, reasoning.strip()):
                raise _Malformed("the assistant turn of 'messages' and the fields 'reasoning' / 'reason' give "
                                 "different thinking texts: keep one of them")
            reasoning_label, response_label = f"the thinking in '{source}'", f"the answer in '{source}'"
        if split.expected_answer not in (None, response.strip(), str(content).strip()):
            raise _Malformed("the assistant turn of 'messages' and the field 'response' give different answers: "
                             "keep one of them")
        if source != "response":  # a chat answer's offsets have always counted from the text after </think>
            answer_at = 0
    stripped_prompt = _text(prompt, _prompt_label(record), template, check_think=False)
    if reasoning is None and response is None:
        raise _Malformed("only a prompt: no reasoning trace and no response")
    fields = _Fields(
        prompt=stripped_prompt,
        reasoning=_text(reasoning, reasoning_label, template, check_think=True),
        response=_text(response, response_label, template, check_think=True),
    )
    _collect_annotations(record, fields)
    # [start, end] offsets count characters of the field as given; the fields were stripped (and split)
    fields.prompt_groups = _shift_offsets(fields.prompt_groups, prompt, 0)
    for name in ("response_groups", "unrelated_groups"):
        setattr(fields, name, _shift_offsets(getattr(fields, name), response, answer_at))
    return fields


class _GivenOffsets(tuple):
    """A ``(start, end)`` pair in the stripped text, remembering the offsets the record gave and where the text
    sits in its field (for messages)."""

    given: list[int]
    where: str

    def __new__(cls, start: int, end: int, given: Sequence[int], where: str) -> _GivenOffsets:
        pair = super().__new__(cls, (start, end))
        pair.given, pair.where = list(given), where
        return pair


def _shift_offsets(groups: list[list[Any]], text: str, text_at: int) -> list[list[Any]]:
    """Annotation groups with every ``[start, end]`` offset pair, given in a field where the unstripped ``text``
    starts at ``text_at``, moved into ``text.strip()``.

    An edge that falls into the whitespace stripped off ``text`` moves to the stripped text's edge: an annotation
    of "Write in lowercase.\n" or of the blank line before an answer still means the text it covers.
    """
    leading = len(text) - len(text.lstrip())
    stripped = len(text.strip())
    notes = [f"it starts at character {text_at + leading} of the field" if text_at + leading else "",
             "edge whitespace stripped" if stripped != len(text) else ""]
    where = ", ".join(note for note in notes if note)

    def inside(offset: int) -> int:
        offset -= text_at + leading
        if -leading <= offset < 0:
            return 0
        if stripped < offset <= len(text) - leading:
            return stripped
        return offset

    return [[_GivenOffsets(inside(item[0]), inside(item[1]), item, where) if _is_offset_pair(item) else item
             for item in group] for group in groups]


def _split_think_text(content: Any, template: _Template, source: str,
                      reasoning_cell: str = "missing") -> tuple[str, str, int]:
    """Split the text ``[<think>]reasoning</think>answer`` of field ``source`` into (reasoning, answer, where the
    answer starts in ``content``); the two texts are not stripped here. ``reasoning_cell`` says how a response's
    error names the reasoning field beside it ("missing" or "empty")."""
    _text(content, f"field '{source}'", template, check_think=False)
    close = template.think_close
    found = content.count(close)
    if found != 1:
        if not found and template.think_open not in content:
            # no think tags at all: the sample has no thinking, which is what stage 1 protects
            missing = f"field 'reasoning' / 'reason' is {reasoning_cell}, and " if source == "response" else ""
            give = "pass the thinking as 'reasoning', or " if source == "response" else ""
            raise _Malformed(
                f"{missing}field '{source}' holds no {close!r} to split the thinking off: {give}write it as "
                f"'{template.think_open}thinking{close}answer', or leave the answer out and the reasoning model "
                "writes its own"
            )
        alternative = ""
        if source == "response":
            alternative = ", or pass the thinking as 'reasoning' and only the answer as 'response'"
        raise _Malformed(
            f"field '{source}' holds think tags but cannot be split into thinking and answer: it must contain "
            f"exactly one {close!r} (found {found}), as '{template.think_open}thinking{close}answer'{alternative}"
        )
    cut = content.index(close)
    reasoning = content[:cut].strip()
    if reasoning.startswith(template.think_open):
        reasoning = reasoning[len(template.think_open):]
    elif template.think_open in reasoning:
        preamble = reasoning[:reasoning.index(template.think_open)].strip()
        raise _Malformed(
            f"field '{source}' has text before {template.think_open!r} ({preamble[:40]!r}): the think block "
            f"comes first, as '{template.think_open}thinking{close}answer'; drop the text or move it into the "
            "prompt"
        )
    return reasoning, content[cut + len(close):], cut + len(close)


def _annotation_list(value: Any, where: str, items: str = "strings (or [start, end] offsets)") -> list[Any]:
    """An annotation list (``None`` = empty); anything but a list makes the record malformed."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list):
        raise _Malformed(f"'{where}' must be a list of {items}, got {type(value).__name__}")
    return value


def _collect_annotations(record: Mapping, fields: _Fields) -> None:
    """Fill the annotation groups of ``fields`` from the paper's format and the plain keys.

    Paper format: ``related_prompt_list[*].prompt_spans`` (in the prompt), ``.response_spans`` and
    ``.unrelated_response_spans`` (in the response), and a top-level ``unrelated_response_spans``. Plain format:
    ``instruction_spans`` (in the prompt) and ``response_spans`` (in the response). ``negative_response_spans``
    are not used. Each list is one group, searched forward in order.
    """
    related = record.get("related_prompt_list")
    for i, item in enumerate(_annotation_list(related, "related_prompt_list", "objects with 'prompt_spans' and 'response_spans'")):
        if not isinstance(item, Mapping):
            raise _Malformed(f"related_prompt_list[{i}] is a {type(item).__name__}, not an object")
        fields.prompt_groups.append(_annotation_list(item.get("prompt_spans"), f"related_prompt_list[{i}].prompt_spans"))
        fields.response_groups.append(
            _annotation_list(item.get("response_spans"), f"related_prompt_list[{i}].response_spans")
        )
        fields.unrelated_groups.append(
            _annotation_list(item.get("unrelated_response_spans"), f"related_prompt_list[{i}].unrelated_response_spans")
        )
    fields.prompt_groups.append(_annotation_list(record.get("instruction_spans"), "instruction_spans"))
    fields.response_groups.append(_annotation_list(record.get("response_spans"), "response_spans"))
    fields.unrelated_groups.append(_annotation_list(record.get("unrelated_response_spans"), "unrelated_response_spans"))


# -------------------------------------------------------------------------------------------------------- spans
def locate_annotations(segment: str, groups: Iterable[Sequence[Any]]) -> tuple[list[Span], list[str]]:
    """Character spans of annotations inside one segment of text.

    Each group is searched in order, each string forward from the end of the previous match of its group (a
    whole-word occurrence first); when not found there, from the start of the previous match (nested
    annotations, a prefix of the previous match included) and then from the start of the segment (annotations
    out of order). The search never leaves ``segment``. An item may also be a ``[start, end]`` pair of character
    offsets into the segment. Each item gives one span, trimmed of whitespace at both ends.

    Returns:
        (spans relative to the segment, descriptions of the items that were not found or not usable).
    """
    spans: list[Span] = []
    missing: list[str] = []
    for group in groups:
        prev_start = prev_end = 0
        for item in group:
            if _is_offset_pair(item):
                start, end = int(item[0]), int(item[1])
                given = getattr(item, "given", None)
                named = f"offsets {given or list(item)}"
                if (given or item)[0] >= (given or item)[1]:
                    missing.append(f"{named} are empty or reversed (write [start, end) with start < end)")
                elif given is not None and 0 <= start == end <= len(segment):
                    missing.append(f"{named} cover only whitespace")  # all of it in the stripped edges
                elif not 0 <= start < end <= len(segment):
                    where = f" ({item.where})" if getattr(item, "where", "") else ""
                    missing.append(f"{named} outside the segment of {len(segment)} characters{where}")
                elif not segment[start:end].strip():
                    missing.append(f"{named} cover only whitespace")
                else:
                    spans.append(_without_edge_space(segment, (start, end)))
                continue
            if not isinstance(item, str) or not item.strip():
                missing.append(repr(item)[:60])
                continue
            found = _find_in_segment(segment, item, prev_start, prev_end)
            if found is None:
                missing.append(repr(item)[:60])
                continue
            spans.append(_without_edge_space(segment, found))
            prev_start, prev_end = found
    return spans, missing


def _without_edge_space(segment: str, span: Span) -> Span:
    """``span`` without whitespace at either end: byte-level BPE glues a space to the next word, so a span that
    ends in one would also take the following word's token."""
    start, end = span
    while start < end and segment[start].isspace():
        start += 1
    while end > start and segment[end - 1].isspace():
        end -= 1
    return start, end


def _is_offset_pair(item: Any) -> bool:
    """True for a ``[start, end]`` pair of ints."""
    return (
        isinstance(item, (list, tuple))
        and len(item) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
    )


def _find_in_segment(segment: str, needle: str, prev_start: int, prev_end: int) -> Span | None:
    """Where ``needle`` (or its stripped form) sits in ``segment``, searching forward from the previous match.

    From each starting point a whole-word occurrence is preferred (``"at"`` in ``"Associate at X"`` is the word
    ``at``), then any occurrence.
    """
    candidates = dict.fromkeys((needle, needle.strip()))
    for start_at in dict.fromkeys((prev_end, prev_start, 0)):
        for candidate in candidates:
            whole_word = _whole_word_pattern(candidate)
            match = whole_word.search(segment, start_at)
            if match:
                return match.span()
            pos = segment.find(candidate, start_at)
            if pos >= 0:
                return pos, pos + len(candidate)
    return None


def _whole_word_pattern(text: str) -> re.Pattern[str]:
    """A regex matching ``text`` not glued to word characters on a side where ``text`` itself has one."""
    head = r"(?<!\w)" if re.match(r"\w", text[0]) else ""
    tail = r"(?!\w)" if re.match(r"\w", text[-1]) else ""
    return re.compile(head + re.escape(text) + tail)


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    """Sorted union of half-open spans (overlapping or touching spans are merged, empty ones dropped)."""
    merged: list[list[int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


class _OffsetIndex:
    """Maps character spans of the tokenized text to token spans (tokens that overlap the characters)."""

    def __init__(self, offsets: Sequence[Sequence[int]]) -> None:
        self.starts = [int(o[0]) for o in offsets]
        self.ends = [int(o[1]) for o in offsets]
        self.monotone = all(a <= b for a, b in zip(self.starts, self.starts[1:])) and all(
            a <= b for a, b in zip(self.ends, self.ends[1:])
        )

    def token_span(self, char_start: int, char_end: int) -> Span | None:
        """Token span ``[lo, hi)`` of the tokens overlapping ``[char_start, char_end)``; ``None`` if none do."""
        if self.monotone:
            lo = bisect.bisect_right(self.ends, char_start)
            hi = bisect.bisect_left(self.starts, char_end)
        else:
            hits = [i for i, (s, e) in enumerate(zip(self.starts, self.ends)) if s < char_end and e > char_start]
            lo, hi = (hits[0], hits[-1] + 1) if hits else (0, 0)
        return (lo, hi) if hi > lo else None


def _token_spans(index: _OffsetIndex, char_spans: Iterable[Span], offset: int, within: Span) -> list[Span]:
    """Merged token spans of segment-relative character spans, clipped to the segment's token span ``within``."""
    spans = []
    for start, end in char_spans:
        span = index.token_span(start + offset, end + offset)
        if span is not None:
            spans.append((max(span[0], within[0]), min(span[1], within[1])))
    return merge_spans(spans)


def _clip(spans: list[Span], limit: int) -> list[Span]:
    """Spans cut at token ``limit`` (empty ones dropped)."""
    return [(a, min(b, limit)) for a, b in spans if a < limit]


def _subtract(span: Span, holes: Iterable[Span]) -> list[Span]:
    """The parts of ``span`` outside every span of ``holes``."""
    parts, start = [], span[0]
    for a, b in merge_spans(holes):
        parts.append((start, min(a, span[1])))
        start = max(start, b)
    parts.append((start, span[1]))
    return merge_spans(parts)


def _default_constrained(response_span: Span, unrelated: list[Span], where: str) -> list[Span]:
    """R of a sample without located R annotations: the response less the annotated unrelated spans (U), so
    that the two query sets stay disjoint."""
    constrained = _subtract(response_span, unrelated)
    if not constrained:
        _warn("Calibration sample at %s: its annotated unrelated spans cover the whole response, so it has "
                       "no constrained-response tokens (R) and counts for leakage only.", where)
    return constrained


def _think_token(index: _OffsetIndex, ids: list[int], char_pos: int, text: str, token_id: int) -> int:
    """Token index of the think token written at ``char_pos``; it must be exactly one token with ``token_id``."""
    span = index.token_span(char_pos, char_pos + len(text))
    if span is None or span[1] - span[0] != 1 or ids[span[0]] != token_id:
        raise _Malformed(
            f"the think token {text!r} did not tokenize as the single token {token_id} in context (it merged with "
            "neighbouring text)"
        )
    return span[0]


def _build_sample(fields: _Fields, index: int, tokenizer: Any, template: _Template, max_length: int,
                  where: str | None = None) -> CalibrationSample:
    """Render one validated record and compute all its token spans (see the module docstring for the layout);
    ``where`` names the record in warnings (default: its index)."""
    where = where or f"index {index}"
    for name in ("prompt", "reasoning", "response"):
        found = [t for t in template.specials if t in getattr(fields, name)]
        if found:
            _warn("Calibration sample at %s: its %s holds the special token(s) %s, which the tokenizer "
                           "reads as control tokens (an end of turn inside the text, say): remove them unless they "
                           "are meant as such.", where, name, ", ".join(map(repr, found)))
    prefix, open_char, prompt_char = _generation_prefix(tokenizer, template, fields.prompt)
    text = prefix + fields.reasoning + template.spacing[1]
    close_char = len(text)
    text += template.think_close + template.spacing[2]
    response_char = len(text)
    text += fields.response

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = _OffsetIndex(encoding["offset_mapping"])
    open_tok = _think_token(offsets, ids, open_char, template.think_open, template.open_id)
    close_tok = _think_token(offsets, ids, close_char, template.think_close, template.close_id)
    n = len(ids)
    prompt_span = offsets.token_span(prompt_char, prompt_char + len(fields.prompt))
    if prompt_span is None or prompt_span[1] > open_tok:
        raise _Malformed("the prompt tokens could not be located before the think-open token")
    thinking_span = (open_tok + 1, close_tok)
    response_span = (close_tok + 1, n)
    if thinking_span[1] <= thinking_span[0] or response_span[1] <= response_span[0]:
        raise _Malformed("the thinking or the response has no tokens")

    prompt_chars, missing_p = locate_annotations(fields.prompt, fields.prompt_groups)
    response_chars, missing_r = locate_annotations(fields.response, fields.response_groups)
    unrelated_chars, missing_u = locate_annotations(fields.response, fields.unrelated_groups)
    missing = [f"prompt {m}" for m in missing_p] + [f"response {m}" for m in missing_r + missing_u]
    if missing:
        _warn(
            "Calibration sample at %s: %d annotation(s) not found in their segment, ignored: %s",
            where, len(missing), "; ".join(missing[:_MAX_REASONS_SHOWN]) + (" …" if len(missing) > _MAX_REASONS_SHOWN else ""),
        )
    instruction = _token_spans(offsets, prompt_chars, prompt_char, prompt_span) or [prompt_span]
    constrained = _token_spans(offsets, response_chars, response_char, response_span)
    unrelated = _token_spans(offsets, unrelated_chars, response_char, response_span)
    annotated = bool(constrained)

    if n > max_length:
        # the layout's whitespace after </think> (think_spacing[2]) is no answer: a cut must keep a token of the text
        answer = offsets.token_span(response_char, response_char + len(fields.response))
        answer_tok = close_tok + 1 if answer is None else max(answer[0], close_tok + 1)
        if answer_tok >= max_length:
            kept = ("survives the cut to config.max_length={max_length}, but no token of the answer does (its "
                    "first token is at position {after})" if close_tok < max_length else
                    "does not survive the cut to config.max_length={max_length}")
            raise _Malformed(
                f"the rendered sample has {n} tokens and its think-close token is at position {close_tok}, so it "
                + kept.format(max_length=max_length, after=answer_tok)
                + f": raise max_length to at least {answer_tok + 1} or shorten the prompt/reasoning"
            )
        logger.info("Calibration sample at %s: %d tokens, response cut to max_length=%d.", where, n, max_length)
        ids = ids[:max_length]
        response_span = (close_tok + 1, max_length)
        constrained = _clip(constrained, max_length)
        unrelated = _clip(unrelated, max_length)
    if annotated and not constrained:
        # falling back to the whole (cut) response would measure alignment on tokens the annotation left out; an
        # empty R only drops the sample from the alignment mean (stage 2 averages over samples that have R)
        _warn(
            "Calibration sample at %s: every annotated constrained-response span (R) lies past the cut to "
            "config.max_length=%d, so its R is empty and it counts for leakage only: raise max_length to keep it.",
            where, max_length,
        )
    elif not annotated:
        constrained = _default_constrained(response_span, unrelated, where)
    return CalibrationSample(
        input_ids=ids,
        think_open=open_tok,
        think_close=close_tok,
        prompt_span=prompt_span,
        thinking_span=thinking_span,
        response_span=response_span,
        instruction_spans=instruction,
        constrained_spans=constrained,
        unrelated_spans=merge_spans([thinking_span, *unrelated]),
        index=index,
    )


# --------------------------------------------------------------------------------------------------- generation
def split_generated_ids(
    token_ids: Sequence[int], tokenizer: Any, open_id: int, close_id: int, stop_ids: Iterable[int] = ()
) -> tuple[str, str]:
    """Split the generated continuation of ``…<think>\\n`` into (reasoning, response) texts.

    The continuation is cut at the first stop token (EOS or padding); it must then hold exactly one think-close
    token, no think-open token, and non-empty text on both sides.

    Raises:
        _Malformed: with the reason, for a generation without a proper think block and answer.
    """
    ids = list(token_ids)
    stops = set(stop_ids)
    ended = False
    for i, token in enumerate(ids):
        if token in stops:
            ids, ended = ids[:i], True
            break
    if open_id in ids:
        raise _Malformed("the generation opens a second think block")
    closes = ids.count(close_id)
    if closes == 0:
        hint = "" if ended else " (it may have run out of config.max_new_tokens)"
        raise _Malformed(f"the generation never closes its thinking{hint}")
    if closes > 1:
        raise _Malformed(f"the generation closes its thinking {closes} times")
    cut = ids.index(close_id)
    reasoning = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
    response = tokenizer.decode(ids[cut + 1:], skip_special_tokens=True).strip()
    if not reasoning:
        raise _Malformed("the generation has an empty thinking block")
    if not response:
        hint = "" if ended else " (it may have run out of config.max_new_tokens)"
        raise _Malformed(f"the generation has no answer after the thinking{hint}")
    return reasoning, response


def _generation_config(model: Any, tokenizer: Any, config: Any, pad_id: int) -> Any:
    """The model's generation config with the calibration settings applied: greedy (the plain argmax, whatever
    penalties the model's config sets) or sampled; one sequence per prompt, stopping at any end-of-sequence id of
    the config or the tokenizer."""
    from transformers import GenerationConfig

    gen = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    gen.max_new_tokens = config.max_new_tokens
    gen.max_length = None
    gen.do_sample = config.do_sample
    settings = dict(ONE_SEQUENCE)
    if config.do_sample:
        settings.update(temperature=config.temperature, top_p=config.top_p)
    else:
        settings.update(temperature=None, top_p=None, top_k=None, **PLAIN_GREEDY)
    for name, value in settings.items():
        setattr(gen, name, value)
    gen.pad_token_id = pad_id
    gen.eos_token_id = end_ids(gen, tokenizer) or None
    return gen


def padding_id(tokenizer: Any) -> int:
    """The id that pads batches (prompts on the left for generation, samples on the right for scoring): the
    tokenizer's pad token, else its EOS token, else 0 (any id will do, the attention mask hides it)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _generate_batch(records: list[dict], model: Any, tokenizer: Any, config: Any, template: _Template) -> list[dict]:
    """Generate reasoning and response for one batch of prompt-only records (left padding, no grad)."""
    results = [dict(r) for r in records]
    rows, prefix_ids, prompts = [], [], {}
    for i, record in enumerate(records):
        try:
            prompt = prompts[i] = _text(_raw_fields(record)[0], _prompt_label(record), template, check_think=False)
            prefix, _, _ = _generation_prefix(tokenizer, template, prompt)
        except _Malformed as err:
            results[i]["generation_error"] = str(err)
            continue
        rows.append(i)
        prefix_ids.append(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    if not rows:
        return results
    pad_id = padding_id(tokenizer)
    width = max(len(p) for p in prefix_ids)
    device = model_device(model)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prefix_ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefix_ids], device=device)
    gen = _generation_config(model, tokenizer, config, pad_id)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen)
    # a stand-in pad id is an ordinary token (id 0 is "!" in Qwen's vocabulary): it must not end a generation
    stops = {*end_ids(gen, tokenizer), *([] if tokenizer.pad_token_id is None else [tokenizer.pad_token_id])}
    for row, generated in zip(rows, output[:, width:].tolist()):
        results[row]["generation"] = tokenizer.decode(generated, skip_special_tokens=False)
        try:
            reasoning, response = split_generated_ids(generated, tokenizer, template.open_id, template.close_id, stops)
        except _Malformed as err:
            results[row]["generation_error"] = str(err)
            continue
        results[row]["reasoning"], results[row]["response"] = reasoning, response
        if not stops.intersection(generated):  # max_new_tokens ran out: the answer is cut short
            results[row]["generation_cut"] = True
        # a chat-format record is read from its messages while its 'prompt' is absent or None (a Dataset row):
        # give it one, or the trace just generated would be ignored and the record would still be prompt-only
        if results[row].get("prompt") is None:
            results[row]["prompt"] = prompts[row]
    return results


def generate_traces(records: list[dict], model: Any, tokenizer: Any, config: Any) -> list[dict]:
    """Complete prompt-only records with the reasoning model's own thinking and answer.

    Prompts are rendered exactly as the calibration samples are (chat template, then the think-open token) and
    generated in batches of ``config.batch_size`` with left padding, greedy or sampled (``config.do_sample``,
    ``temperature``, ``top_p``, seeded with ``config.seed``), at most ``config.max_new_tokens`` new tokens.
    Each generation is split at the think-close token.

    Returns:
        One dict per input record, in order. Records that already had a reasoning trace or a response are copied
        unchanged; generated ones get ``reasoning``, ``response`` and the raw ``generation`` text (and
        ``generation_cut: True`` when ``max_new_tokens`` ran out in the answer, which is then kept cut short), or a
        ``generation_error`` (no proper think block and answer) that makes them malformed calibration samples.
        The merge's own completion of prompt-only records (``prepare_*_calibration(model=...)``) gives the same
        traces. The caller's random state is left as it was.
    """
    template = _template_parts(tokenizer, config)
    records = load_records(records)
    todo = [i for i, r in enumerate(records) if _is_prompt_only(r)]
    results = [dict(r) for r in records]
    batches = range(0, len(todo), config.batch_size)
    with seeded(config.seed, model_device(model), enabled=config.do_sample):
        for start in tqdm(batches, desc="Generating calibration traces", unit="batch"):
            rows = todo[start:start + config.batch_size]
            for row, done in zip(rows, _generate_batch([records[i] for i in rows], model, tokenizer, config,
                                                       template)):
                results[row] = done
    _log_generated([results[i] for i in todo], "calibration", config.max_new_tokens)
    return results


def _log_generated(records: Sequence[Mapping], kind: str, max_new_tokens: int) -> None:
    """Say how many generated traces failed, and how many answers ``max_new_tokens`` cut short."""
    if not records:
        return
    failed = sum(r.get("generation_error") is not None for r in records)
    cut = sum(bool(r.get("generation_cut")) for r in records)
    logger.info("Generated %d %s traces (%d without a proper think block).", len(records), kind, failed)
    if cut:
        _warn("%d of %d generated %s answers ran out of max_new_tokens=%d and are kept cut short; raise "
                       "max_new_tokens for whole answers.", cut, len(records), kind, max_new_tokens)


# ----------------------------------------------------------------------------------------------------- pipeline
_STAGE2_ANNOTATIONS = ("related_prompt_list", "instruction_spans", "response_spans")


def _warn_if_swapped(records: Sequence[Any], kind: str) -> None:
    """Warn when the reasoning set looks like the instruction set (the two files passed the wrong way round):
    every record carries stage-2 span annotations, as in the paper's instruction set. A reasoning set that mixes
    in annotated instruction prompts, as the README suggests for templates where the model opens ``<think>``, is
    not warned about."""
    dicts = [r for r in records if isinstance(r, Mapping)]
    annotated = sum(any(r.get(key) for key in _STAGE2_ANNOTATIONS) for r in dicts)
    if kind == "reasoning" and dicts and annotated == len(dicts) == len(records):
        _warn("Every reasoning calibration record carries stage-2 annotations (%s): this looks like the "
                       "instruction calibration set. Stage 1 wants reasoning traces (the paper's "
                       "reasoning_calibration_set.json); check that the two sets are not swapped.",
                       ", ".join(_STAGE2_ANNOTATIONS))


def _prepare(data: Any, tokenizer: Any, config: Any, model: Any, kind: str, limit: int | None,
             stats: dict | None = None) -> list[CalibrationSample]:
    """Load, (generate,) validate and render a calibration set; see the public wrappers."""
    records, locations = _load_with_locations(data)
    if not records:
        raise CalibrationError(f"The {kind} calibration set is empty: pass at least one record.")

    def where(index: int) -> str:
        return f"index {index}" + (f" ({locations[index]})" if locations else "")

    _warn_if_swapped(records, kind)
    template = _template_parts(tokenizer, config)
    prompt_only = [i for i, r in enumerate(records) if _is_prompt_only(r)]
    carrying = [i for i in prompt_only if any(not _blank(records[i].get(key)) for key in _UNREAD_ANSWER_KEYS)]
    unread = sorted({key for i in carrying for key in _UNREAD_ANSWER_KEYS if not _blank(records[i].get(key))})
    rename = (f"If {' / '.join(repr(k) for k in unread)} holds the model's thinking and answer, name it 'response' "
              "('<think>…</think>answer'), or split it into 'reasoning' and 'response'.") if unread else ""
    if prompt_only and model is None:
        raise PromptOnlyError(
            f"{len(prompt_only)} of {len(records)} {kind} calibration records (first: {where(prompt_only[0])}) have "
            "only a prompt. Pass 'reasoning' and 'response' for every record, or pass the reasoning model "
            "(model=...), or complete them first with generate_traces." + (" " + rename if rename else "")
        )
    if unread:  # a trace under a name this library does not read would be replaced by the model's own
        _warn("%d of %d %s calibration records have a prompt and no field read as their thinking or answer, so the "
              "reasoning model writes them; they carry %s, which is not read. %s", len(carrying), len(records),
              kind, " / ".join(repr(k) for k in unread), rename)
    # prompt-only records are generated in batches of the next batch_size of them, as generate_traces does (a
    # sampled trace depends on its batch), and only as far as the sample limit reaches
    batch_starts = iter(range(0, len(prompt_only), config.batch_size))
    generated: dict[int, dict] = {}
    made_all: list[dict] = []
    samples: list[CalibrationSample] = []
    failures: list[tuple[int, str]] = []
    progress = tqdm(total=len(records), desc=f"Preparing {kind} calibration", unit="sample")
    try:
        with seeded(config.seed, model_device(model), enabled=config.do_sample and bool(prompt_only)):
            for index, record in enumerate(records):
                if _is_prompt_only(record):
                    if index not in generated:
                        start = next(batch_starts)
                        rows = prompt_only[start:start + config.batch_size]
                        made = _generate_batch([records[i] for i in rows], model, tokenizer, config, template)
                        generated.update(zip(rows, made))
                        made_all += made
                    record = generated.pop(index)
                progress.update(1)
                try:
                    samples.append(_build_sample(_parse_record(record, template), index, tokenizer, template,
                                                 config.max_length, where(index)))
                except _Malformed as err:
                    failures.append((index, str(err)))
                    if config.on_malformed == "error":
                        raise CalibrationError(
                            f"Malformed {kind} calibration sample at {where(index)}: {err}. Fix the record, or set "
                            "config.on_malformed='skip' to leave such samples out."
                        ) from None
                    if len(failures) <= _MAX_SKIPS_LOGGED:
                        _warn("Skipping malformed %s calibration sample at %s: %s", kind, where(index), err)
                    elif len(failures) == _MAX_SKIPS_LOGGED + 1:
                        _warn("Skipping more malformed %s calibration samples; their reasons, counted, "
                                       "follow at the end.", kind)
                if limit is not None and len(samples) >= limit:
                    break
    finally:
        progress.close()
    _log_generated(made_all, kind, config.max_new_tokens)
    if not samples:
        reasons = "; ".join(
            f"{', '.join(map(where, ids[:3]))}{f' and {len(ids) - 3} more' if len(ids) > 3 else ''}: {reason}"
            for reason, ids in _grouped_reasons(failures)[:_MAX_REASONS_SHOWN])
        raise CalibrationError(
            f"no usable {kind} calibration samples: {len(failures)} malformed, first reasons: {reasons}"
        )
    if len(failures) > _MAX_SKIPS_LOGGED:
        groups = _grouped_reasons(failures)
        shown = "; ".join(f"{len(ids)} × {reason}" for reason, ids in groups[:_MAX_REASONS_SHOWN])
        more = f"; and {len(groups) - _MAX_REASONS_SHOWN} other reasons" if len(groups) > _MAX_REASONS_SHOWN else ""
        _warn("Skipped %d malformed %s calibration samples in all: %s%s.", len(failures), kind, shown, more)
    logger.info("Using %d %s calibration samples (%d malformed skipped).", len(samples), kind, len(failures))
    if stats is not None:
        # null and absent fields read alike, so one set hashes alike from a file and from a datasets.Dataset (whose
        # Arrow schema gives every nested record every key, filled with None)
        canonical = json.dumps(_without_nulls(records), sort_keys=True, ensure_ascii=False, default=str).encode()
        stats.update(num_records=len(records), num_samples=len(samples), num_malformed=len(failures),
                     num_generated=len(made_all),
                     malformed=[{"index": i, "reason": r} for i, r in failures],
                     sha256=hashlib.sha256(canonical).hexdigest())
    return samples


def _without_nulls(value: Any) -> Any:
    """``value`` with every ``None``-valued mapping entry left out, at any depth."""
    if isinstance(value, Mapping):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [_without_nulls(item) for item in value]
    return value


def prepare_reasoning_calibration(
    data: Any, tokenizer: Any, config: Any, model: Any = None, stats: dict | None = None
) -> list[CalibrationSample]:
    """The stage-1 calibration samples: records with ``prompt``, ``reasoning`` and ``response`` (or a ``response``
    holding ``<think>reasoning</think>answer``, or ``messages``).

    Args:
        data: anything :func:`load_records` reads (e.g. the paper's ``reasoning_calibration_set.json``).
        tokenizer: the reasoning model's fast tokenizer (its chat template renders the prompts).
        config: a :class:`~rain_hf.RainMergingConfig` (think tokens, ``max_length``, ``on_malformed``,
            ``max_reasoning_samples`` and the generation settings).
        model: the reasoning model; needed only when some records have only a prompt (it then writes their
            reasoning and response, see :func:`generate_traces`).
        stats: a dict to fill with ``num_records``, ``num_samples``, ``num_malformed``, ``malformed`` (index and
            reason of each skipped record) and ``sha256`` (of the records as read, before any generation; null and
            absent fields hash alike).

    Returns:
        The first ``config.max_reasoning_samples`` usable samples (all when ``None``), in input order.

    Raises:
        CalibrationError: unreadable data, an unsuitable tokenizer, a malformed sample with
            ``on_malformed="error"``, prompt-only records without a model, or no usable sample at all.
    """
    return _prepare(data, tokenizer, config, model, "reasoning", config.max_reasoning_samples, stats)


def prepare_instruction_calibration(
    data: Any, tokenizer: Any, config: Any, model: Any = None, stats: dict | None = None
) -> list[CalibrationSample]:
    """The stage-2 calibration samples: records with ``prompt``, ``reason``/``reasoning``, ``response``.

    Annotations (optional): the paper's ``related_prompt_list[*].prompt_spans`` (instruction text inside the
    prompt), ``.response_spans`` (constrained response text), ``.unrelated_response_spans`` and a top-level
    ``unrelated_response_spans``; or plain ``instruction_spans`` / ``response_spans`` lists. Items are strings
    located inside their own segment, or ``[start, end]`` character offsets into its field as given (leading
    whitespace counted; for a ``response`` holding ``<think>…</think>answer``, counted from the field's start;
    for a chat ``messages`` answer, from the text after ``</think>``). Each item marks one occurrence (a string
    repeated in the prompt is marked once; list it twice to mark both), without whitespace at its ends.
    Without annotations I = the prompt, R = the response, U = the thinking. Annotated unrelated spans are added
    to U and, when no R span is annotated, taken out of R (R = the response less U). A sample whose annotated R
    spans all fall past ``config.max_length`` keeps an empty R (with a warning) instead of the whole cut
    response.

    Arguments, return value and errors as in :func:`prepare_reasoning_calibration`, with
    ``config.max_instruction_samples`` as the limit.
    """
    return _prepare(data, tokenizer, config, model, "instruction", config.max_instruction_samples, stats)
