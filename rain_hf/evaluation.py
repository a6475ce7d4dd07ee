"""Evaluation of merged reasoning models: think format, instruction following, accuracy, L_think, geometry.

Everything here is model-agnostic and works offline:

- :func:`split_generation` / :func:`think_format_rate`: split a generation into its ``<think> … </think>`` block
  and the answer, and check the format.
- :func:`instruction_following`: IFEval strict and loose accuracy, prompt- and instruction-level, with lm-eval's
  own checkers (``pip install "rain_hf[eval]"``), scored on the answer part only. :func:`ensure_nltk_data` builds
  the nltk ``punkt_tab`` model those checkers need with nltk's own trainer, so nothing is ever downloaded.
- :func:`answer_accuracy`: accuracy against references (last number of the answer by default).
- :func:`think_kl`: L_think = mean KL(merged ‖ reasoning model) of the next-token distributions at given positions.
- :func:`task_vector_geometry`: cosine and principal-subspace overlap of two task vectors per module type.
- :func:`generate`: batched chat-template generation that keeps the think tokens in the decoded text.
- :func:`calibration_overlap`: exact and normalised prompt overlap between a calibration and an evaluation set.

The same instruction-following score is available as an ``evaluate`` metric module at :data:`METRIC_PATH`:

    >>> import evaluate
    >>> metric = evaluate.load(METRIC_PATH)
    >>> metric.name
    'rain_ifeval'
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import os
import random
import re
import shutil
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rain_hf._modes import ONE_SEQUENCE, PLAIN_GREEDY, end_ids, model_device, seeded
from rain_hf._modes import eval_mode as _eval_mode

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_PATH",
    "OverlapReport",
    "ThinkSplit",
    "answer_accuracy",
    "calibration_overlap",
    "ensure_nltk_data",
    "extract_last_number",
    "generate",
    "instruction_following",
    "normalize_prompt",
    "render_prompts",
    "split_generation",
    "task_vector_geometry",
    "think_format_rate",
    "think_kl",
]

METRIC_PATH: str = str(Path(__file__).resolve().parent / "metrics" / "rain_ifeval")
"""Folder of the ``rain_ifeval`` metric module, for ``evaluate.load(METRIC_PATH)``."""

_EVAL_EXTRA_HINT = 'pip install "rain_hf[eval]"'
_NLTK_DATA_ENV = "RAIN_HF_NLTK_DATA"
_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
_PUNKT_MARKER = "rain_hf_build.txt"


# ---------------------------------------------------------------------------------------------------------------
# Think format
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThinkSplit:
    """A generation split into its thinking and its answer.

    Attributes:
        thinking: the text inside the think block (stripped; an unclosed block runs to the end), ``None`` when
            the generation has no think tag at all and the prompt did not open a block. When the format is
            broken: all the text that is not the answer, its pieces between tags joined by newlines.
        answer: the answer, its leading whitespace removed and, where it runs to the end of the generation,
            its trailing whitespace kept, as lm-eval's IFEval scores the text after the think-close token (a
            trailing newline decides what its loose variant "without the last line" drops). When the format is
            broken: the text after the last think-close tag, up
            to a think-open tag that follows it, if there is one; else the text before an unclosed think-open tag
            (so empty when the generation opens a block and never closes it: thinking is not an answer); when
            there is no tag, the whole text, or nothing when the prompt opened the block
            (``prompt_ends_with_open=True``: the block never closed, so all of it is thinking).
        format_ok: whether the generation has exactly one ``<think> … </think>`` block first, then a non-empty
            answer (see :func:`split_generation`).
    """

    thinking: str | None
    answer: str
    format_ok: bool


def split_generation(
    text: str,
    think_open: str = "<think>",
    think_close: str = "</think>",
    prompt_ends_with_open: bool = False,
) -> ThinkSplit:
    """Split a generated completion into thinking and answer, and check the think format.

    The format is correct when:

    - ``prompt_ends_with_open=False`` (the model must open the block itself): the completion starts with
      ``think_open`` (leading whitespace allowed), contains exactly one ``think_open`` and one ``think_close``,
      and a non-empty answer follows the close tag;
    - ``prompt_ends_with_open=True`` (the chat template already put ``think_open`` at the end of the prompt): the
      completion contains no ``think_open``, exactly one ``think_close``, and a non-empty answer after it.

    An empty block (``<think>\\n\\n</think>``) in the completion passes the format check; test
    ``thinking.strip()`` as well where the model must actually think. (Qwen3's template with thinking switched off
    writes that empty block into the prompt, so such a completion has no block and fails the check.)

    Args:
        text: the decoded completion (prompt excluded), decoded with the think tokens kept and the end-of-turn and
            padding tokens cut off (else they end the answer; :func:`generate` cuts them).
        think_open, think_close: the think tags.
        prompt_ends_with_open: whether the rendered prompt already ended with ``think_open``
            (:func:`rain_hf.calibration.template_opens_think` tells for a tokenizer's chat template).

    Returns:
        A :class:`ThinkSplit`.

    Example:
        >>> split_generation("<think>2+3=5</think> The answer is 5.")
        ThinkSplit(thinking='2+3=5', answer='The answer is 5.', format_ok=True)
        >>> split_generation("2+3=5</think>5", prompt_ends_with_open=True).format_ok
        True
        >>> split_generation("<think>2+3=5 The answer is 5.")  # never closed: everything is thinking
        ThinkSplit(thinking='2+3=5 The answer is 5.', answer='', format_ok=False)
        >>> split_generation("The answer is 5.")  # no block at all: the model did not think
        ThinkSplit(thinking=None, answer='The answer is 5.', format_ok=False)
        >>> split_generation("The answer is 5.", prompt_ends_with_open=True)  # the block the prompt opened
        ThinkSplit(thinking='The answer is 5.', answer='', format_ok=False)
    """
    n_open = text.count(think_open)
    n_close = text.count(think_close)
    if prompt_ends_with_open:
        structure_ok = n_open == 0 and n_close == 1
    else:
        structure_ok = (
            n_open == 1
            and n_close == 1
            and text.lstrip().startswith(think_open)
            and text.index(think_close) > text.index(think_open)
        )
    if structure_ok:
        before, _, after = text.partition(think_close)
        thinking = before.lstrip()
        if thinking.startswith(think_open):
            thinking = thinking[len(think_open) :]
        answer = after.lstrip()
        return ThinkSplit(thinking=thinking.strip(), answer=answer, format_ok=bool(answer.strip()))
    if n_close:
        before, _, after = text.rpartition(think_close)
        # a block opened again after the last close never ended: it is thinking, not answer
        answer, tag, reopened = after.partition(think_open)
        thinking = _join_pieces((before, reopened), think_open, think_close)
        # an answer that a reopened block ends is cut at a tag; one that runs to the end is scored as written
        return ThinkSplit(thinking=thinking, answer=answer.strip() if tag else answer.lstrip(), format_ok=False)
    if prompt_ends_with_open:  # the block the prompt opened was never closed: all of it is thinking
        return ThinkSplit(thinking=_join_pieces((text,), think_open, think_close), answer="", format_ok=False)
    if n_open:  # an unclosed block runs to the end: only what precedes it can be an answer
        before, _, after = text.partition(think_open)
        return ThinkSplit(thinking=_join_pieces((after,), think_open, think_close), answer=before.strip(),
                          format_ok=False)
    return ThinkSplit(thinking=None, answer=text.lstrip(), format_ok=False)


def _join_pieces(texts: Sequence[str], think_open: str, think_close: str) -> str:
    """The text between the tags of ``texts``, one stripped non-empty piece per line (pieces of a broken
    generation: glued together they would run an answer draft into the next block's thinking)."""
    pieces = []
    for text in texts:
        for piece in text.replace(think_close, think_open).split(think_open):
            if piece.strip():
                pieces.append(piece.strip())
    return "\n".join(pieces)


def warn_if_opened_by_prompt(generations: Sequence[str], think_open: str = "<think>", think_close: str = "</think>",
                             prompt_ends_with_open: bool = False) -> bool:
    """Warn (and return True) when most generations close a think block they never opened while
    ``prompt_ends_with_open`` is False: the prompts most likely ended with ``think_open`` (an R1-Distill template),
    and without the flag every such generation counts as a broken format, and one that never closes its thinking
    is scored as all answer."""
    if prompt_ends_with_open:
        return False
    closed_only = sum(think_close in g and think_open not in g for g in generations)
    if closed_only * 2 <= len(generations):
        return False
    logger.warning("%d of %d generations close a think block they never opened: the prompts probably ended with "
                   "%s (pass prompt_ends_with_open=True, e.g. template_opens_think(tokenizer, RainMergingConfig())).",
                   closed_only, len(generations), think_open)
    return True


def warn_if_no_think_tags(generations: Sequence[str], think_open: str = "<think>",
                          think_close: str = "</think>") -> bool:
    """Warn (and return True) when no generation holds a think tag: text decoded with ``skip_special_tokens=True``
    has lost them where they are special tokens (R1-Distill, QwQ), and would be scored as all answer, all broken
    format; a model that does not think at all reads the same."""
    if len(generations) == 0 or any(think_open in g or think_close in g for g in generations):
        return False
    logger.warning("None of the %d generations holds %s or %s: a model that does not think, or text decoded with "
                   "skip_special_tokens=True, which drops the think tokens where they are special tokens (decode "
                   "with skip_special_tokens=False).", len(generations), think_open, think_close)
    return True


def think_format_rate(
    generations: Sequence[str],
    think_open: str = "<think>",
    think_close: str = "</think>",
    prompt_ends_with_open: bool = False,
) -> float:
    """Fraction of generations whose think format is correct (see :func:`split_generation`).

    Example:
        >>> think_format_rate(["<think>a</think>b", "<think>a b", "a</think>b"])
        0.3333333333333333
    """
    if len(generations) == 0:  # not `not generations`: a numpy array or pandas Series has no truth value
        raise ValueError("think_format_rate needs at least one generation.")
    warn_if_opened_by_prompt(generations, think_open, think_close, prompt_ends_with_open)
    warn_if_no_think_tags(generations, think_open, think_close)
    ok = sum(
        split_generation(g, think_open, think_close, prompt_ends_with_open=prompt_ends_with_open).format_ok
        for g in generations
    )
    return ok / len(generations)


# ---------------------------------------------------------------------------------------------------------------
# IFEval (lm-eval's checkers) and the nltk data they need
# ---------------------------------------------------------------------------------------------------------------


def _default_nltk_data_dir() -> str:
    if os.environ.get(_NLTK_DATA_ENV):
        return os.environ[_NLTK_DATA_ENV]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "rain_hf", "nltk_data")


def _real_punkt_tab(nltk: Any, version: str) -> str | None:
    """The first folder on ``nltk.data.path`` that holds a punkt_tab English model this module did not build (a
    folder or a ``punkt_tab.zip``), else None. Every folder is looked at: one of this module's, which an earlier
    call with a named folder put first, must not hide a real model behind it."""
    for root in nltk.data.path:
        root = os.path.abspath(os.path.expanduser(str(root)))
        lang_dir = os.path.join(root, "tokenizers", "punkt_tab", "english")
        if os.path.isdir(lang_dir):
            if _punkt_state(lang_dir, version) == "foreign":
                return root
        elif os.path.isfile(os.path.join(root, "tokenizers", "punkt_tab.zip")):  # as nltk's downloader leaves it
            return root
    return None


def _make_unshared_dirs(directory: str, ours: str) -> None:
    """Create ``directory`` and its missing parents without group or world write, whatever the umask, and take
    that write bit off the folders from ``ours`` down that this account owns (a umask-002 run may have left them):
    nltk refuses to save into a folder with a parent others can write to (unless sticky)."""
    missing = []
    current = os.path.abspath(directory)
    while not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:  # another process made it meanwhile
            continue
        os.chmod(folder, 0o755)
    folder = os.path.abspath(directory)
    while True:
        info = os.stat(folder)
        if info.st_uid == os.getuid() and info.st_mode & 0o022:
            os.chmod(folder, info.st_mode & 0o7755)
        if folder == os.path.abspath(ours) or folder == os.path.dirname(folder):
            break
        folder = os.path.dirname(folder)


def _drop_own_folders(nltk: Any, version: str) -> None:
    """Take this module's folders off ``nltk.data.path``: put there by an earlier call, they would still be what
    nltk loads, since it looks for the unzipped model in every folder before it opens a punkt_tab.zip."""
    nltk.data.path[:] = [p for p in nltk.data.path if _punkt_state(os.path.join(
        os.path.abspath(os.path.expanduser(str(p))), "tokenizers", "punkt_tab", "english"),
        version) not in ("current", "stale")]


def _punkt_state(lang_dir: str, version: str) -> str:
    """``"missing"``, ``"current"`` / ``"stale"`` (our build, this / another version) or ``"foreign"`` (not ours)."""
    if not os.path.isdir(lang_dir):
        return "missing"
    marker = os.path.join(lang_dir, _PUNKT_MARKER)
    if not os.path.isfile(marker):
        return "foreign"
    with open(marker, encoding="utf-8") as f:
        built = f.read().strip()
    complete = all(os.path.isfile(os.path.join(lang_dir, name)) for name in _PUNKT_FILES)
    # a build whose marker a umask-002 run left group-writable: nltk refuses to load the folder, so rebuild it
    shared = bool(os.stat(marker).st_mode & 0o022)
    return "current" if built == version and complete and not shared else "stale"


_PUNKT_IN_USE: list[str] = []  # the nltk data folder of the last call, whose punkt model the caches hold


def _in_use(root: str) -> str:
    """``root``, after dropping the sentence tokenizers cached from another folder's punkt model."""
    if not _PUNKT_IN_USE or _PUNKT_IN_USE[0] != root:  # the first call too: lm-eval may have loaded one already
        ifeval_util = sys.modules.get("lm_eval.tasks.ifeval.instructions_util")
        cached = [getattr(ifeval_util, "_get_sentence_tokenizer", None),
                  getattr(sys.modules.get("nltk.tokenize"), "_get_punkt_tokenizer", None)]
        for fn in cached:
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()
    _PUNKT_IN_USE[:] = [root]
    return root


def ensure_nltk_data(path: str | None = None) -> str:
    """Build the English ``punkt_tab`` model that IFEval's checkers need, and put it first on ``nltk.data.path``.

    The model is trained here with nltk's own ``PunktTrainer`` on a small deterministic English text (see
    ``rain_hf._punkt``) and written with ``nltk.tokenize.punkt.save_punkt_params`` to
    ``<path>/tokenizers/punkt_tab/english``. Nothing is downloaded. An existing build of the same version is
    reused, an older build is replaced, and a ``punkt_tab/english`` folder that this function did not write (a real
    nltk download, say) is left alone and used. The only global change is that ``path`` is moved to the front of
    ``nltk.data.path``; when the model in use changes, the sentence tokenizers that nltk and lm-eval cache are
    dropped, so the next check loads the new one.

    Without ``path`` and ``$RAIN_HF_NLTK_DATA``, a real punkt_tab model that nltk already finds (``NLTK_DATA``,
    ``~/nltk_data`` …) is used as it is, since it is the one IFEval's published scores used, and its folder is
    returned (``nltk.data.path`` is then left as it was, but for the folders of this function's that an earlier
    call put there, which are taken off it: nltk would load the project's model from them first). The project's
    own model splits some sentences differently from nltk's English one (``python -m benchmarks.punkt_vs_nltk``,
    build "rain_hf-punkt-4"): the sentence count of 10 of the 515 answers of the paper's calibration sets, 4 of
    395 paragraphs of licence texts and this project's README, and 45 of 120 sentences "… in <abbreviation>
    <Word> …" (it ends a sentence at "Jan. We" or "p.m. She", nltk's does not), which can move
    ``length_constraints:number_sentences`` near its threshold.

    Args:
        path: nltk data folder. Defaults to ``$RAIN_HF_NLTK_DATA``, else ``~/.cache/rain_hf/nltk_data``
            (``$XDG_CACHE_HOME`` respected).

    Returns:
        The absolute nltk data folder.

    Example:
        >>> import nltk, tempfile
        >>> root = ensure_nltk_data(tempfile.mkdtemp())
        >>> nltk.data.path[0] == root
        True
        >>> nltk.sent_tokenize("Dr. Lee sat down. He smiled.")
        ['Dr. Lee sat down.', 'He smiled.']
    """
    try:
        import nltk
        from nltk.tokenize.punkt import save_punkt_params
    except ImportError as err:
        raise ImportError(f"IFEval scoring needs nltk: {_EVAL_EXTRA_HINT}") from err
    from rain_hf._punkt import PUNKT_BUILD_VERSION, build_punkt_parameters

    named = path is not None or bool(os.environ.get(_NLTK_DATA_ENV))
    if not named:
        real = _real_punkt_tab(nltk, PUNKT_BUILD_VERSION)
        if real is not None:
            logger.info("Using nltk's own punkt_tab model under %s", real)
            _drop_own_folders(nltk, PUNKT_BUILD_VERSION)
            return _in_use(real)
    root = os.path.abspath(os.path.expanduser(path or _default_nltk_data_dir()))
    nltk.data.path[:] = [root] + [p for p in nltk.data.path if p != root]
    tab_dir = os.path.join(root, "tokenizers", "punkt_tab")
    lang_dir = os.path.join(tab_dir, "english")
    state = _punkt_state(lang_dir, PUNKT_BUILD_VERSION)
    if state == "current":
        return _in_use(root)
    if state == "foreign":
        logger.info("Using the existing nltk punkt_tab model in %s", lang_dir)
        return _in_use(root)
    if state == "missing" and os.path.isfile(tab_dir + ".zip"):  # as nltk's downloader leaves it
        logger.info("Using the existing nltk punkt_tab model in %s.zip", tab_dir)
        _drop_own_folders(nltk, PUNKT_BUILD_VERSION)  # root, put first above, holds none of ours: it stays first
        return _in_use(root)

    # the default folder is this module's own, down from ~/.cache/rain_hf; a folder the caller named is not
    ours = os.path.join(root, "tokenizers") if named else os.path.dirname(root)
    _make_unshared_dirs(tab_dir, ours)
    staging = tempfile.mkdtemp(prefix=".english-", dir=tab_dir)  # private (0700), as nltk's sandbox requires
    try:
        try:
            save_punkt_params(build_punkt_parameters(), dir=staging)
        except PermissionError as exc:
            raise PermissionError(f"nltk refuses to write the punkt data under {root} ({exc}). Take the "
                                  "group/other write bit off the folder it names (chmod go-w), or point "
                                  f"{_NLTK_DATA_ENV} at a folder that only you can write to, with no parent "
                                  "writable by others unless it is sticky like /tmp.") from exc
        # private as nltk's own files are, whatever the umask: nltk refuses a data file others can write to
        marker = os.open(os.path.join(staging, _PUNKT_MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(marker, "w", encoding="utf-8") as f:
            f.write(PUNKT_BUILD_VERSION + "\n")
        if _punkt_state(lang_dir, PUNKT_BUILD_VERSION) == "stale":
            shutil.rmtree(lang_dir, ignore_errors=True)
        try:
            os.rename(staging, lang_dir)
        except OSError:  # another process finished first
            if _punkt_state(lang_dir, PUNKT_BUILD_VERSION) != "current":
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Built nltk punkt_tab (english) in %s", lang_dir)
    return _in_use(root)


def _ifeval_registry(nltk_data_path: str | None = None) -> Mapping[str, type]:
    """lm-eval's ``INSTRUCTION_DICT`` (instruction id → checker class), imported without any download."""
    # Before the import: lm-eval downloads punkt_tab at import time when nltk cannot find it.
    ensure_nltk_data(nltk_data_path)
    try:
        from langdetect import DetectorFactory
        from lm_eval.tasks.ifeval import instructions_registry
    except ImportError as err:
        raise ImportError(f"IFEval scoring needs lm-eval's IFEval checkers: {_EVAL_EXTRA_HINT}") from err
    DetectorFactory.seed = 0
    return instructions_registry.INSTRUCTION_DICT


def _build_checker(
    registry: Mapping[str, type], instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str
):
    """Instantiate one IFEval checker (prompt passed to the checkers that read it).

    Kwargs with a ``None`` value are dropped, as the IFEval data pads every record with all keys, and so are
    empty or whitespace-only strings (either would make checks such as ``end_phrase`` pass on any text). lm-eval
    drops every falsy value (so the empty strings too); for a ``0`` (e.g. ``let_frequency``) that makes its checker
    draw a random number, so a 0 is kept here. A missing argument is an error rather than a random draw, and so is
    an unknown one. A value the checker cannot use (IFEval's own data asks for the letter ``"#"`` twice; an empty
    keyword list) makes it draw one at random: that draw is seeded by the instruction and its kwargs, so the score
    is repeatable, and warned about once.
    """
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"The kwargs of {instruction_id} are a {type(kwargs).__name__}, not a dict (or None): parse "
                        "a JSON string first (json.loads), or score with the evaluate metric, which reads them.")
    if instruction_id not in registry:
        raise ValueError(f"Unknown IFEval instruction id {instruction_id!r}; known ids: {sorted(registry)}")
    checker = registry[instruction_id](instruction_id)
    arg_keys = checker.get_instruction_args_keys() or []
    plain = {k: _plain_kwarg(v) for k, v in (kwargs or {}).items()}
    clean = {k: v for k, v in plain.items() if v is not None and not (isinstance(v, str) and not v.strip())}
    if "prompt_to_repeat" in arg_keys and not clean.get("prompt_to_repeat"):
        # the whole prompt holds the repeat instruction itself, which IFEval's request to repeat leaves out
        raise ValueError(f"{instruction_id} needs the kwarg 'prompt_to_repeat' (the request to repeat, without the "
                         f"repeat instruction, as in IFEval's data); prompt: {prompt[:60]!r}")
    missing = [k for k in arg_keys if k != "prompt" and k not in clean]
    if missing:
        # lm-eval's checkers draw a missing argument at random, which would make the score a coin toss
        raise ValueError(f"{instruction_id} needs the kwargs {missing} (it takes {list(arg_keys)}); give them as "
                         f"IFEval's data does, e.g. in the record's kwargs list. Prompt: {prompt[:60]!r}")
    unknown = sorted(set(clean) - set(arg_keys))
    if unknown:
        raise ValueError(f"{instruction_id} takes the kwargs {list(arg_keys) or 'none'}, not {unknown}: drop them or "
                         f"check the instruction id. Prompt: {prompt[:60]!r}")
    state = random.getstate()  # the caller's random state is left as it was
    try:
        random.seed(f"{instruction_id}|{sorted(clean.items())!r}")
        seeded_state = random.getstate()
        checker.build_description(**clean)
        drew = random.getstate() != seeded_state
    finally:
        random.setstate(state)
    key = (instruction_id, repr(sorted(clean.items())))
    if drew and key not in _RANDOM_KWARGS_WARNED:
        _RANDOM_KWARGS_WARNED.add(key)
        logger.warning("IFEval: the checker %s cannot use the kwargs %s and drew its own at random (as lm-eval "
                       "does; seeded here, so the score is repeatable, but it does not check what the prompt asks). "
                       "Prompt: %r", instruction_id, clean, prompt[:60])
    if "prompt" in arg_keys:
        checker.build_description(prompt=prompt)
    return checker


_RANDOM_KWARGS_WARNED: set[tuple[str, str]] = set()


def _plain_kwarg(value: Any) -> Any:
    """A kwarg as IFEval's checkers take it: IFEval read with pandas (from parquet, say) gives keyword lists as numpy
    arrays and whole numbers as floats (2.0, NaN for a missing one, where a column mixes numbers and nulls), which
    the checkers cannot index or test for truth; they are turned into lists, ints and None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_plain_kwarg(v) for v in value]
    if isinstance(value, float) and not isinstance(value, bool):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def _loose_variants(response: str) -> list[str]:
    """IFEval's loose responses: as is, without the first/last/both lines, each also with ``*`` removed."""
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [r.replace("*", "") for r in trimmed]


def _follows(checker, response: str) -> bool:
    return bool(response.strip()) and bool(checker.check_following(response))


def instruction_following(
    answers: Sequence[str],
    prompts: Sequence[str],
    instruction_id_lists: Sequence[Sequence[str]],
    kwargs_lists: Sequence[Sequence[Mapping[str, Any] | None]],
    *,
    nltk_data_path: str | None = None,
) -> dict[str, Any]:
    """IFEval accuracy of answers with lm-eval's checkers (``lm_eval.tasks.ifeval.instructions_registry``).

    Pass the answer part only (see :func:`split_generation`): the thinking is not the answer. Strict checks the
    answer as is; loose (IFEval's upper bound) also accepts the answer without its first line, its last line or
    both, each with or without ``*``. Keys of an instruction's kwargs whose value is ``None`` are dropped (the
    IFEval data pads every record with all keys; unlike lm-eval, a ``0`` is kept). Every argument the checker
    takes must be given: lm-eval's checkers would draw a missing one at random (a word limit, a keyword …), so it
    is a ``ValueError`` here, as is an argument the checker does not take. ``prompts`` reach any checker whose
    arguments take a prompt.
    langdetect is seeded (``DetectorFactory.seed = 0``) so that language checks are deterministic.

    Args:
        answers: N answers.
        prompts: N prompts (the instruction text, used by prompt-dependent checkers).
        instruction_id_lists: N lists of IFEval instruction ids, e.g. ``["punctuation:no_comma"]``.
        kwargs_lists: N lists of kwargs dicts (or None), one per instruction id; a JSON string is a TypeError
            (``json.loads`` it, or score with the metric, which reads them). Answers holding a think tag (whole
            generations) are warned about.
        nltk_data_path: where :func:`ensure_nltk_data` builds the nltk data (default: its default).

    Returns:
        ``prompt_strict``, ``instruction_strict``, ``prompt_loose``, ``instruction_loose`` (floats: prompt-level =
        fraction of answers that follow all their instructions, instruction-level = fraction of all
        instructions followed), ``strict_per_prompt`` / ``loose_per_prompt`` (N bools) and
        ``strict_per_instruction`` / ``loose_per_instruction`` (N lists of bools).

    Example:
        >>> scores = instruction_following(
        ...     ["hello world", "Hello, World"], ["Say hi, lowercase.", "Say hi, lowercase."],
        ...     [["change_case:english_lowercase"]] * 2, [[{}]] * 2)
        >>> scores["prompt_strict"]
        0.5
    """
    n = len(answers)
    if not (len(prompts) == len(instruction_id_lists) == len(kwargs_lists) == n):
        raise ValueError(
            f"answers, prompts, instruction_id_lists and kwargs_lists must have the same length, got {n}, "
            f"{len(prompts)}, {len(instruction_id_lists)}, {len(kwargs_lists)}"
        )
    if n == 0:
        raise ValueError("instruction_following needs at least one answer.")
    whole = sum(isinstance(a, str) and ("<think>" in a or "</think>" in a) for a in answers)
    if whole:  # the thinking would be scored as part of the answer
        logger.warning("%d of %d answers hold a think tag: pass the answer part of each generation "
                       "(split_generation(text).answer), not the whole text.", whole, n)
    registry = _ifeval_registry(nltk_data_path)

    strict: list[list[bool]] = []
    loose: list[list[bool]] = []
    for answer, prompt, ids, kwargs_list in tqdm(
        zip(answers, prompts, instruction_id_lists, kwargs_lists), total=n, desc="IFEval", leave=False
    ):
        for row, what in ((ids, "instruction ids"), (kwargs_list, "kwargs")):
            if isinstance(row, (str, bytes)):  # a CSV export's JSON column: its length would count characters
                raise TypeError(f"The {what} of prompt {prompt[:60]!r} are one string ({row[:60]!r}), not a list: "
                                "parse a JSON string first (json.loads), or score with the evaluate metric, which "
                                "reads them.")
        if len(kwargs_list) != len(ids):
            raise ValueError(
                f"{len(ids)} instruction ids but {len(kwargs_list)} kwargs dicts for prompt {prompt!r}"
            )
        variants = _loose_variants(answer)
        strict.append([])
        loose.append([])
        for instruction_id, kwargs in zip(ids, kwargs_list):
            checker = _build_checker(registry, instruction_id, kwargs, prompt)
            strict[-1].append(_follows(checker, answer))
            loose[-1].append(any(_follows(checker, r) for r in variants))

    def _instruction_level(results: list[list[bool]]) -> float:
        flat = [x for row in results for x in row]
        return sum(flat) / len(flat) if flat else float("nan")

    strict_prompt = [all(row) for row in strict]
    loose_prompt = [all(row) for row in loose]
    return {
        "prompt_strict": sum(strict_prompt) / n,
        "instruction_strict": _instruction_level(strict),
        "prompt_loose": sum(loose_prompt) / n,
        "instruction_loose": _instruction_level(loose),
        "strict_per_prompt": strict_prompt,
        "loose_per_prompt": loose_prompt,
        "strict_per_instruction": strict,
        "loose_per_instruction": loose,
    }


# ---------------------------------------------------------------------------------------------------------------
# Answer accuracy
# ---------------------------------------------------------------------------------------------------------------

# A number, thousands separators allowed (a group is exactly three digits: "12,3456" is 12 and 3456), or a bare
# decimal (.5, but "...42" is 42), with its exponent if it has one (1.5e-3); a minus sign only when it does not
# follow a word character (20-5 → 5).
_NUMBER_RE = re.compile(
    r"(?:(?<!\w)-)?(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|(?<![\d.])\.\d+)(?:[eE][-+]?\d+(?!\w|\.\d))?")
# Unicode minus, figure dash and en dash before a digit read as a minus sign (−3 → -3).
_MINUS_RE = re.compile(r"[\u2212\u2012\u2013](?=[\d.])")


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` (thousands separators removed, an exponent kept), or ``None``.

    Example:
        >>> extract_last_number("Max has 1,033 apples now. So, the answer is -4.5.")
        '-4.5'
        >>> extract_last_number("about 6.02e23 of them")
        '6.02e23'
    """
    matches = _NUMBER_RE.findall(_MINUS_RE.sub("-", text))
    return matches[-1].replace(",", "") if matches else None


def _as_number(value: Any) -> float | None:
    size = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", 0)
    if hasattr(value, "item") and size == 1:
        # a `datasets` column in torch or numpy format gives 0-d tensors and numpy scalars; str() of a tensor
        # is "tensor(41)", which parses as no number
        value = value.item()
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):  # int, float, Fraction (whose str() is "1/2")
        return float(value)
    try:
        return float(str(value).strip().replace(",", ""))
    except ValueError:
        return None


def _same_answer(prediction: Any, reference: Any) -> bool:
    if prediction is None:
        return False
    a, b = _as_number(prediction), _as_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return " ".join(str(prediction).split()).lower() == " ".join(str(reference).split()).lower()


def answer_accuracy(
    answers: Sequence[str],
    references: Sequence[int | float | str],
    extract: Callable[[str], Any] | None = None,
) -> float:
    """Fraction of answers whose extracted value equals the reference.

    Values are compared numerically when both parse as numbers, else as whitespace-normalised lowercase strings.
    The default ``extract`` finds numbers only, so an answer to a reference such as ``"B"`` or ``"yes"`` counts
    as wrong unless you pass an ``extract`` that returns that kind of value.

    Args:
        answers: N answers (the answer part, see :func:`split_generation`).
        references: N references.
        extract: maps an answer to its value (``None``: no answer); default :func:`extract_last_number`.

    Example:
        >>> answer_accuracy(["So, the answer is 33.", "It is 12", "no idea"], [33, "12.0", 7])
        0.6666666666666666
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    if len(answers) == 0:
        raise ValueError("answer_accuracy needs at least one answer.")
    extract = extract or extract_last_number
    return sum(_same_answer(extract(a), r) for a, r in zip(answers, references)) / len(answers)


# ---------------------------------------------------------------------------------------------------------------
# L_think
# ---------------------------------------------------------------------------------------------------------------


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give a whole number of sequences per batch, 1 or more.")


def _pad(seqs: Sequence[torch.Tensor], pad_token_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1-D token tensors to ``input_ids`` [B, T] and ``attention_mask`` [B, T] (left or right padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = s
        mask[i, span] = 1
    return ids, mask


def _log_probs_at(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """fp32 log-softmax of the model's logits at (rows[i], cols[i]): [N, V], on the model's device.

    Uses ``logits_to_keep`` (transformers CausalLM models) so that only the requested positions go through the
    LM head.
    """
    device = model_device(model)
    kwargs: dict[str, Any] = {}
    keep, inverse = torch.unique(cols, return_inverse=True)
    try:
        takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_keep = False
    if takes_keep:
        kwargs["logits_to_keep"] = keep.to(device)
    out = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, **kwargs
    )
    logits = out.logits if hasattr(out, "logits") else out[0]  # [B, T or len(keep), V]
    col_index = inverse if (takes_keep and logits.shape[1] == len(keep)) else cols
    picked = logits[rows.to(device), col_index.to(device)]
    return torch.log_softmax(picked.float(), dim=-1)


def think_kl(
    model: torch.nn.Module,
    reference_model: torch.nn.Module,
    input_ids: Sequence[torch.Tensor],
    positions: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_token_id: int | None = 0,
) -> float:
    """L_think: mean KL(p_model ‖ p_reference) of the next-token distributions at the given positions.

    Direction, as the paper defines L_think: KL(merged ‖ LRM) = Σ_v p_merged(v) (log p_merged(v) − log p_LRM(v)),
    so pass the merged model as ``model`` and the reasoning model as ``reference_model``. Position ``t`` of a
    sequence means the logits computed at token ``t``, i.e. the distribution of token ``t + 1``: to score how the
    think token at index ``t`` is predicted, pass ``t - 1``. Sequences are right-padded into batches with attention
    masks; softmax in fp32; no gradients; dropout off. Both models should live on the same device (otherwise the
    reference's log-probabilities are moved to the model's device).

    Args:
        model: the merged model (a causal LM returning ``.logits`` [B, T, V]).
        reference_model: the reasoning model, same tokenizer.
        input_ids: N 1-D LongTensors (token ids of held-out reasoning samples).
        positions: N lists of positions (0 ≤ t < len(input_ids[i])); samples with no position are skipped.
        batch_size: sequences per forward pass.
        pad_token_id: the id used for right padding (masked out, never scored; ``None``, as from a tokenizer without
            a pad token, pads with 0).

    Returns:
        The mean KL over all positions (nats).

    Example:
        >>> import torch
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> cfg = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ...                   intermediate_size=64, vocab_size=64)
        >>> lrm = Qwen2ForCausalLM(cfg)
        >>> think_kl(lrm, lrm, [torch.tensor([1, 2, 3, 4])], [[1, 3]])
        0.0
    """
    total, count = 0.0, 0
    with torch.no_grad(), _eval_mode(model, reference_model):
        for ids, mask, rows, cols, _ in tqdm(_scoring_batches(input_ids, positions, batch_size, pad_token_id),
                                             desc="think_kl", leave=False):
            log_p = _log_probs_at(model, ids, mask, rows, cols)  # [N, V]
            log_q = _log_probs_at(reference_model, ids, mask, rows, cols).to(log_p.device)
            kl = kl_rows(log_p, log_q)  # [N]
            total += float(kl.double().sum())
            count += kl.numel()
    return total / count


def think_log_probs(
    model: torch.nn.Module,
    input_ids: Sequence[torch.Tensor],
    positions: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_token_id: int | None = 0,
) -> torch.Tensor:
    """fp32 next-token log-probabilities [N, V] (CPU) at the given positions, one row per position in the order of
    ``input_ids`` and of each sample's positions; keep a reference model's once and compare later models with
    :func:`kl_rows`.

    Arguments as in :func:`think_kl`.
    """
    out, order = [], []
    with torch.no_grad(), _eval_mode(model):
        for ids, mask, rows, cols, index in tqdm(_scoring_batches(input_ids, positions, batch_size, pad_token_id),
                                                 desc="think_log_probs", leave=False):
            out.append(_log_probs_at(model, ids, mask, rows, cols).cpu())
            order.append(index)
    return torch.cat(out)[torch.argsort(torch.cat(order))]  # batches run longest first; back to input order


def think_open_share(reference_choices: torch.Tensor, choices: torch.Tensor, open_id: int) -> float | None:
    """Share of the prompts on which a model's greedy first token is the think-open token, among those where the
    reference model's is; ``None`` when the reference opens the think block on none.

    Args:
        reference_choices: [N] the reference (reasoning) model's greedy next token after each prompt.
        choices: [N] another model's, for the same prompts.
        open_id: the think-open token id.
    """
    if reference_choices.shape != choices.shape:
        raise ValueError(f"{tuple(reference_choices.shape)} reference choices but {tuple(choices.shape)} choices")
    opened = reference_choices == open_id
    if not bool(opened.any()):
        return None
    return float((choices[opened] == open_id).double().mean())


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row of log-probabilities [N, V] → [N]; tokens with p = 0 add nothing (0·log 0 = 0), also where
    a logit was masked to −inf. A NaN in either row gives NaN (a broken model must not score as a perfect one)."""
    p = log_p.exp()
    return torch.where(p == 0, torch.zeros((), dtype=p.dtype, device=p.device), p * (log_p - log_q)).sum(-1)


def _scoring_batches(
    input_ids: Sequence[torch.Tensor], positions: Sequence[Sequence[int]], batch_size: int, pad_token_id: int | None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded batches (ids, mask, rows, cols, index) of the sequences that have positions, longest first;
    ``index`` is each scored row's place in input order (samples, then their positions)."""
    if len(input_ids) != len(positions):
        raise ValueError(f"{len(input_ids)} sequences but {len(positions)} position lists")
    _check_batch_size(batch_size)
    samples = []
    first_row = 0
    for i, (ids, pos) in enumerate(zip(input_ids, positions)):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        pos = [int(p) for p in pos]
        bad = [p for p in pos if not 0 <= p < len(ids)]
        if bad:
            raise ValueError(f"sample {i}: positions {bad} are outside its {len(ids)} tokens")
        if pos:
            samples.append((ids, pos, first_row))
            first_row += len(pos)
    if not samples:
        raise ValueError("No position to score: every sample's position list is empty.")
    samples.sort(key=lambda s: len(s[0]), reverse=True)  # less padding
    batches = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        # the padding is masked and never scored, so a tokenizer without a pad token (None) may pad with 0
        ids, mask = _pad([s[0] for s in batch], 0 if pad_token_id is None else pad_token_id, left=False)
        rows = torch.tensor([b for b, s in enumerate(batch) for _ in s[1]], dtype=torch.long)
        cols = torch.tensor([p for s in batch for p in s[1]], dtype=torch.long)
        index = torch.tensor([s[2] + k for s in batch for k in range(len(s[1]))], dtype=torch.long)
        batches.append((ids, mask, rows, cols, index))
    return batches


# ---------------------------------------------------------------------------------------------------------------
# Task-vector geometry
# ---------------------------------------------------------------------------------------------------------------

TensorSource = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]


def _module_type(name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` → ``down_proj``; a bias gives ``down_proj.bias``."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] == "weight":
        return parts[-2]
    if len(parts) > 1 and parts[-1] == "bias":
        return f"{parts[-2]}.bias"
    return parts[-1]


def _top_left_singular_vectors(
    matrix: torch.Tensor, k: int, randomized: bool, max_iter: int = 40, tol: float = 1e-4, rtol: float = 1e-5
) -> torch.Tensor:
    """Orthonormal top-k left singular vectors of ``matrix`` [m, n] → [m, r] (fp32), r ≤ k.

    Directions with a singular value ≤ ``rtol``·s_max are left out (r < k for a matrix of rank below k, r = 0 for
    a zero matrix): the SVD returns arbitrary vectors for them. ``randomized`` uses a seeded range finder (own
    generator: the global RNG is untouched) instead of a full SVD, with power iterations until the kept top-r
    subspace moves less than ``tol`` (1 − ‖U_prevᵀU‖_F²/r), at most ``max_iter``: a fixed small count is far off on
    flat spectra.
    """
    a = matrix.float()
    k = min(k, *a.shape)
    if not randomized:
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
    else:
        q = min(2 * k + 8, *a.shape)
        gen = torch.Generator(device=a.device).manual_seed(0)
        basis = torch.linalg.qr(a @ torch.randn(a.shape[1], q, generator=gen, device=a.device)).Q
        previous = None
        for step in range(max_iter + 1):
            u_small, s, _ = torch.linalg.svd(basis.T @ a, full_matrices=False)
            u = basis @ u_small
            # only the directions that are kept count: below a rank of k the others are noise that never settles
            rank = int((s[:k] > rtol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
            top = u[:, :rank]
            if rank == 0 or step == max_iter or (
                previous is not None and previous.shape[1] == rank
                and 1 - float((previous.T @ top).pow(2).sum()) / rank < tol
            ):
                break
            previous = top
            basis = torch.linalg.qr(a @ (a.T @ basis)).Q
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    return u[:, :k][:, s[:k] > rtol * s[0]]


def _rank_cutoff(delta: torch.Tensor) -> float:
    """Relative singular value below which a delta's direction is rounding noise of its stored dtype: a rank-4
    LoRA product stored in bfloat16 has noise directions near 1e-3·s_max."""
    eps = torch.finfo(delta.dtype).eps if delta.is_floating_point() else 0.0
    return max(1e-5, eps)


def _cosine(dot: float, norm_a2: float, norm_b2: float) -> float:
    denom = math.sqrt(norm_a2 * norm_b2)
    return dot / denom if denom > 0 else float("nan")


def task_vector_geometry(
    delta_a: TensorSource,
    delta_b: TensorSource,
    k: int = 8,
    *,
    keys: Iterable[str] | None = None,
    svd: str = "auto",
) -> dict[str, Any]:
    """Cosine and principal-subspace overlap of two task vectors, per module type and overall.

    For each module type (the module's last name component: ``q_proj``, ``down_proj``; biases as
    ``q_proj.bias``), the cosine is that of the deltas flattened and concatenated over layers:
    Σ_l⟨a_l, b_l⟩ / √(Σ_l‖a_l‖² · Σ_l‖b_l‖²). The subspace overlap of one 2-D delta pair is ‖U_aᵀU_b‖_F² / r with
    U_a, U_b each delta's own top left singular vectors, k of them or fewer where its rank is below k (a LoRA
    delta; directions with a singular value below the delta's dtype's machine epsilon times the largest, or 1e-5
    of it in float32, count as rounding noise), and r the smaller of their two counts: 1 for the same subspace or
    for a low-rank delta inside the other's top-k subspace, ≈ k/m for random ones. The type's value is its mean over
    layers, leaving out pairs with a zero delta.
    The overall cosine uses all shared tensors, each name once: a tied embedding given under both of its names
    (``lm_head.weight`` and ``embed_tokens.weight``) counts twice, so leave one out with ``keys``. Tensors are
    read one at a time (a lazy mapping, such as a view of safetensors shards, or a callable ``name → tensor``
    works) and processed in fp32 on their device.

    Args:
        delta_a, delta_b: task vectors, ``{name: tensor}`` or callables ``name → tensor``.
        k: subspace rank (capped by the matrix size).
        keys: the tensor names to compare (default: the names of ``delta_a`` that ``delta_b`` also has; required
            when both are callables).
        svd: ``"exact"`` (full SVD), ``"randomized"`` (seeded range finder) or ``"auto"`` (exact up to 1024 on the
            smaller side).

    Returns:
        ``{"cosine": float, "k": int, "modules": {type: {"cosine": float, "subspace_overlap": float | None,
        "num_tensors": int}}}``; cosines are NaN where a delta is zero.

    Example:
        >>> import torch
        >>> a = {"layers.0.q_proj.weight": torch.eye(4), "layers.0.up_proj.weight": torch.ones(3, 4)}
        >>> b = {"layers.0.q_proj.weight": torch.eye(4), "layers.0.up_proj.weight": -torch.ones(3, 4)}
        >>> geo = task_vector_geometry(a, b, k=1)
        >>> geo["modules"]["q_proj"]["cosine"], geo["modules"]["up_proj"]["cosine"]
        (1.0, -1.0)
    """
    if svd not in ("auto", "exact", "randomized"):
        raise ValueError(f"svd must be 'auto', 'exact' or 'randomized', got {svd!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k={k!r}: the subspace rank is a whole number, 1 or more.")
    get_a = delta_a.__getitem__ if isinstance(delta_a, Mapping) else delta_a
    get_b = delta_b.__getitem__ if isinstance(delta_b, Mapping) else delta_b
    if keys is None:
        if isinstance(delta_a, Mapping):
            names = list(delta_a.keys())
            if isinstance(delta_b, Mapping):
                missing = [n for n in names if n not in delta_b]
                only_b = sum(1 for n in delta_b.keys() if n not in delta_a)
                for count, one, other in ((len(missing), "delta_a", "delta_b"), (only_b, "delta_b", "delta_a")):
                    if count:
                        logger.warning("%d tensors of %s are not in %s and are skipped", count, one, other)
                names = [n for n in names if n in delta_b]
        elif isinstance(delta_b, Mapping):
            names = list(delta_b.keys())
        else:
            raise ValueError("Pass `keys` when both task vectors are callables.")
    else:
        names = list(keys)
    if not names:
        raise ValueError("The two task vectors share no tensor.")

    stats: dict[str, dict[str, Any]] = {}
    dot_all = norm_a_all = norm_b_all = 0.0
    for name in tqdm(names, desc="task-vector geometry", leave=False):
        a, b = get_a(name), get_b(name)
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
        a32, b32 = a.float(), b.to(device=a.device, dtype=torch.float32)
        dot, na2, nb2 = (float((x * y).double().sum()) for x, y in ((a32, b32), (a32, a32), (b32, b32)))
        entry = stats.setdefault(
            _module_type(name), {"dot": 0.0, "na2": 0.0, "nb2": 0.0, "overlaps": [], "n": 0}
        )
        entry["dot"] += dot
        entry["na2"] += na2
        entry["nb2"] += nb2
        entry["n"] += 1
        dot_all, norm_a_all, norm_b_all = dot_all + dot, norm_a_all + na2, norm_b_all + nb2
        if a32.ndim == 2:
            randomized = svd == "randomized" or (svd == "auto" and min(a32.shape) > 1024)
            u_a = _top_left_singular_vectors(a32, k, randomized, rtol=_rank_cutoff(a))
            u_b = _top_left_singular_vectors(b32, k, randomized, rtol=_rank_cutoff(b))
            # each side keeps its own top directions: a rank-1 LoRA delta lying along the other delta's second
            # direction overlaps it fully, which cutting both to rank 1 would score as 0
            r = min(u_a.shape[1], u_b.shape[1])
            if r:  # undefined where a delta is zero
                # ≤ 1 in exact arithmetic; float32 rounding can put it a few ulps above
                entry["overlaps"].append(min(1.0, float((u_a.T @ u_b).pow(2).sum()) / r))

    modules = {
        t: {
            "cosine": _cosine(s["dot"], s["na2"], s["nb2"]),
            "subspace_overlap": sum(s["overlaps"]) / len(s["overlaps"]) if s["overlaps"] else None,
            "num_tensors": s["n"],
        }
        for t, s in stats.items()
    }
    return {"cosine": _cosine(dot_all, norm_a_all, norm_b_all), "k": k, "modules": modules}


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def render_prompts(
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[Mapping[str, str]]],
    force_think_open: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """Render prompts with the tokenizer's chat template (``add_generation_prompt=True``).

    A string prompt becomes one user message; a list of ``{"role", "content"}`` dicts is used as is. With
    ``force_think_open``, the tag is appended unless the rendered prompt already ends with it (trailing whitespace
    ignored). ``chat_template_kwargs`` are extra template variables, as in ``apply_chat_template`` (for Qwen3,
    ``{"enable_thinking": False}`` renders the prompt with thinking switched off).

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained("benchmarks/organism/checkpoints/reasoning")
        >>> render_prompts(tok, ["What is 2+3?"], force_think_open="<think>")[0].endswith("<think>")
        True
    """
    if isinstance(prompts, (str, Mapping)):
        raise TypeError("render_prompts takes a list of prompts: wrap one prompt, or one conversation (a list of "
                        "{'role', 'content'} dicts), in a list.")
    if hasattr(prompts, "columns"):  # a DataFrame iterates over its column names
        raise TypeError("render_prompts got a DataFrame: pass the column that holds the prompts (df['prompt']).")
    prompts = list(prompts)  # arrays, Series and generators too
    if prompts and isinstance(prompts[0], Mapping) and {"role", "content"} <= set(prompts[0]):
        raise TypeError("render_prompts takes a list of prompts, and this is one conversation (a list of "
                        "{'role', 'content'} dicts): wrap it in a list.")
    template_kwargs = dict(chat_template_kwargs or {})
    reserved = sorted({"conversation", "messages", "tokenize", "add_generation_prompt"} & set(template_kwargs))
    if reserved:
        raise ValueError(f"chat_template_kwargs cannot set {reserved}: render_prompts sets them itself; pass only "
                         "template variables such as enable_thinking.")
    texts = []
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, i)
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )
        if force_think_open and not text.rstrip().endswith(force_think_open.rstrip()):
            text += force_think_open
        texts.append(text)
    return texts


def _messages(prompt: Any, i: int) -> list[dict]:
    """One conversation of :func:`render_prompts`, checked: a template renders a message without ``role`` or
    ``content`` as an empty or assistant turn, without an error."""
    if isinstance(prompt, Mapping):
        raise TypeError(f"prompts[{i}] is a mapping with keys {sorted(map(str, prompt))}, not a prompt: pass the "
                        "prompt's text (e.g. [record['prompt'] for record in records]) or a list of {'role', "
                        "'content'} messages.")
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Iterable):
        raise TypeError(f"prompts[{i}] has type {type(prompt).__name__}: give a string or a list of {{'role', "
                        "'content'} messages.")
    messages = []
    for j, message in enumerate(prompt):
        where = f"prompts[{i}][{j}]"
        if not isinstance(message, Mapping):
            raise TypeError(f"{where} must be a message {{'role': str, 'content': str}}, got a "
                            f"{type(message).__name__}.")
        if not isinstance(message.get("role"), str):
            raise TypeError(f"{where} has no string 'role' (its keys: {sorted(map(str, message))}).")
        content = message.get("content")
        # an assistant turn that only calls tools has no content (transformers' tool-use format)
        if not (isinstance(content, (str, list)) or (content is None and message.get("tool_calls"))):
            got = "no 'content'" if "content" not in message else f"'content' of type {type(content).__name__}"
            raise TypeError(f"{where} has {got}: give a string, or a list of content parts (its keys: "
                            f"{sorted(map(str, message))}).")
        messages.append(dict(message))
    return messages


def _completion_ids(ids: Sequence[int], stop_ids: Iterable[int], pad_token_id: int | None) -> list[int]:
    """Cut a generated id sequence at its first stop token, and drop trailing padding.

    Example:
        >>> _completion_ids([5, 6, 2, 0, 0], stop_ids=[2], pad_token_id=0)
        [5, 6]
    """
    stops = set(stop_ids)
    out = []
    for i in ids:
        if i in stops:
            break
        out.append(int(i))
    while out and out[-1] == pad_token_id:
        out.pop()
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[Mapping[str, str]]],
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    force_think_open: str | None = None,
    seed: int = 0,
    desc: str = "generate",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """Generate completions for chat prompts in left-padded batches; the think tags survive decoding.

    Prompts are rendered with :func:`render_prompts`, tokenized without extra special tokens (the template has
    them), sorted by length and left-padded. Completions are decoded with ``skip_special_tokens=False`` (think
    tokens are often special tokens) after cutting at the first eos / end-of-turn id (model generation_config and
    tokenizer) and dropping padding.

    Args:
        model: a causal LM with ``generate``.
        tokenizer: its tokenizer (with a chat template; pad defaults to the first eos id).
        prompts: N strings (one user message each) or N message lists.
        max_new_tokens: generation budget per prompt.
        do_sample, temperature, top_p: greedy (default) or sampled decoding; other sampling settings (such as
            ``top_k``, repetition penalties) come from the model's ``generation_config``. Greedy decoding is the
            plain argmax: it ignores them, and sets the config's beams, repetition penalties, minimum lengths, banned,
            suppressed, biased and forced tokens and watermarking to their neutral values; a ``temperature`` or
            ``top_p`` given without ``do_sample=True`` is ignored, with a warning.
        batch_size: prompts per ``generate`` call.
        force_think_open: append this tag (e.g. ``"<think>"``) to each rendered prompt.
        seed: torch seed of sampled decoding, set once for the whole run (the caller's RNG state is restored
            afterwards): a sampled text also depends on ``batch_size`` and on the order of the prompts.
        desc: progress-bar label.
        chat_template_kwargs: extra chat-template variables (e.g. ``{"enable_thinking": False}`` for Qwen3).

    Returns:
        N completion strings (prompt excluded), in the order of ``prompts``.

    Example:
        >>> outs = generate(model, tokenizer, ["What is 2+3?"], max_new_tokens=64)  # doctest: +SKIP
        >>> split_generation(outs[0]).format_ok  # doctest: +SKIP
        True
    """
    _check_batch_size(batch_size)
    if not do_sample and (temperature not in (None, 1.0) or top_p not in (None, 1.0)):
        logger.warning("generate: temperature=%s and top_p=%s are sampling settings, and do_sample=False decodes "
                       "greedily without them; pass do_sample=True to sample.", temperature, top_p)
    texts = render_prompts(
        tokenizer, prompts, force_think_open=force_think_open, chat_template_kwargs=chat_template_kwargs
    )
    if not texts:
        return []
    stop_ids = end_ids(getattr(model, "generation_config", None), tokenizer)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else None)
    )
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token.")
    encoded = [
        torch.tensor(ids, dtype=torch.long) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)

    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": pad_id,
        **ONE_SEQUENCE,
    }
    if stop_ids:
        gen_kwargs["eos_token_id"] = stop_ids
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:  # don't let the model's sampling defaults (e.g. temperature 0.6) trigger warnings under greedy decoding
        gen_kwargs.update(temperature=None, top_p=None, top_k=None, **PLAIN_GREEDY)

    device = model_device(model)
    results: list[str] = [""] * len(texts)
    progress = tqdm(total=len(texts), desc=desc, unit="prompt", leave=False)
    seeding = seeded(seed, device, enabled=do_sample)
    with torch.no_grad(), _eval_mode(model), seeding:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = _pad([encoded[i] for i in idx], pad_id, left=True)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
            for row, i in enumerate(idx):
                ids = _completion_ids(out[row, input_ids.shape[1] :].tolist(), stop_ids, pad_id)
                results[i] = tokenizer.decode(
                    ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
            progress.update(len(idx))
    progress.close()
    return results


# ---------------------------------------------------------------------------------------------------------------
# Calibration / evaluation overlap
# ---------------------------------------------------------------------------------------------------------------


def normalize_prompt(text: str) -> str:
    """Normalise a prompt for overlap checks: NFKC, case folded (so "straße" and "STRASSE" agree), punctuation and
    symbols other than mathematical ones turned into spaces (so "cats.Do" and "cats. Do" agree, while "2+3" and
    "2×3" stay apart), invisible format characters (zero-width spaces …) dropped, whitespace collapsed. The ASCII
    operators ``* / % ^`` count as mathematical, and so does a hyphen with a digit next to it (a minus: "2-3",
    "-5"), while a hyphen between words is a space ("well-known" and "well known" agree). The minus sign (U+2212)
    is read as the hyphen, and so is a figure or en dash with a digit next to it ("12−4", "12–4" and "12-4" agree;
    "x − y" and "x - y" agree).
    Mathematical symbols stand apart from their neighbours, so "12*4" and "12 * 4" agree. A point between two
    digits belongs to the number ("3.14" and "3 14" stay apart; a comma is a separator, so "1,2" and "1, 2"
    agree), and superscript digits are a power ("3²" and "3^2" agree, "x⁻¹" and "x^-1" too; "32" stays apart).

    Example:
        >>> normalize_prompt("  Write a POEM,   please!\\n")
        'write a poem please'
    """
    # a superscript is a power: NFKC alone would read "3²" as "32"
    text = _SUPERSCRIPTS_RE.sub(_as_power, text)
    text = unicodedata.normalize("NFKC", text).casefold().replace("\u2044", "/")  # NFKC turns "½" into 1⁄2
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    kept = []
    in_math = False
    for i, ch in enumerate(text):
        if ch == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
            kept.append(ch)  # a decimal point: "3.14" is not "3 14" (a comma stays a separator: "1,2" is "1, 2")
            continue
        if ch == "\u2212" or (ch in _NUMERIC_DASHES and _digit_beside(text, i)):
            ch = "-"
        math = ch in _ASCII_OPERATORS or (ch == "-" and _digit_beside(text, i))
        category = unicodedata.category(ch)
        math = math or category == "Sm"
        if math != in_math:
            kept.append(" ")  # a run of symbols ("<=") is one word, apart from its neighbours
            in_math = math
        kept.append(ch if math or not (category[0] == "P" or category in ("Sc", "Sk", "So")) else " ")
    return " ".join("".join(kept).split())


_SUPERSCRIPT_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻", "0123456789+-")
# a run of superscripts is an exponent ("x⁻¹" is x^-1), unless it is a vulgar fraction's numerator ("³⁄₄")
_SUPERSCRIPTS_RE = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻]+(?![⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁄])")


def _as_power(match: re.Match) -> str:
    run = match.group()
    if all(ch in "⁺⁻" for ch in run):
        return run  # a sign alone is a charge ("OH⁻" is "OH-"), left to NFKC
    return "^" + run.translate(_SUPERSCRIPT_DIGITS)
# Unicode files these under punctuation or modifier symbols, yet in a prompt they are arithmetic.
_ASCII_OPERATORS = frozenset("*/%^")
# Figure dash and en dash: typeset minus signs between or before numbers.
_NUMERIC_DASHES = frozenset("\u2012\u2013")


def _digit_beside(text: str, i: int) -> bool:
    """Whether the nearest non-space character before or after ``text[i]`` is a digit."""
    before = text[:i].rstrip()
    after = text[i + 1 :].lstrip()
    return bool(before and before[-1].isdigit()) or bool(after and after[0].isdigit())


@dataclass
class OverlapReport:
    """Overlap between a calibration prompt set and an evaluation prompt set.

    Attributes:
        num_calibration, num_eval: set sizes.
        exact_matches, normalized_matches: how many evaluation prompts occur in the calibration set verbatim /
            after :func:`normalize_prompt` (every exact match is also a normalised match).
        exact_fraction, normalized_fraction: the same as fractions of the evaluation set.
        exact_indices, normalized_indices: the matching evaluation indices.
        normalized_pairs: (evaluation index, first matching calibration index) for each normalised match.
    """

    num_calibration: int
    num_eval: int
    exact_matches: int
    normalized_matches: int
    exact_fraction: float
    normalized_fraction: float
    exact_indices: list[int] = field(default_factory=list)
    normalized_indices: list[int] = field(default_factory=list)
    normalized_pairs: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.exact_matches}/{self.num_eval} evaluation prompts ({self.exact_fraction:.1%}) occur verbatim in the "
            f"calibration set, {self.normalized_matches} ({self.normalized_fraction:.1%}) after normalisation"
        )


def calibration_overlap(calibration_prompts: Sequence[str], eval_prompts: Sequence[str]) -> OverlapReport:
    """Report which evaluation prompts also occur in the calibration set (exactly, or after normalisation).

    Example:
        >>> report = calibration_overlap(["Write a poem.", "Add 2 and 3"], ["write a POEM", "Add 2 and 3", "Hi"])
        >>> report.exact_indices, report.normalized_indices, report.normalized_pairs
        ([1], [0, 1], [(0, 0), (1, 1)])
    """
    checked = []
    for name, prompts in (("calibration_prompts", calibration_prompts), ("eval_prompts", eval_prompts)):
        if isinstance(prompts, str):
            raise TypeError(f"calibration_overlap: {name} is one string; pass a list of prompts.")
        prompts = list(prompts)  # generators are read twice below
        checked.append(prompts)
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if bad is not None:
            raise TypeError(f"calibration_overlap: {name}[{bad}] is a {type(prompts[bad]).__name__}, not a string; "
                            "pass the prompt texts (for chat records, the user message's content).")
    calibration_prompts, eval_prompts = checked
    exact = set(calibration_prompts)
    first_by_norm: dict[str, int] = {}
    for j, prompt in enumerate(calibration_prompts):
        first_by_norm.setdefault(normalize_prompt(prompt), j)
    exact_idx = [i for i, p in enumerate(eval_prompts) if p in exact]
    pairs = [
        (i, first_by_norm[n]) for i, n in enumerate(map(normalize_prompt, eval_prompts)) if n in first_by_norm
    ]
    n_eval = len(eval_prompts)
    report = OverlapReport(
        num_calibration=len(calibration_prompts),
        num_eval=n_eval,
        exact_matches=len(exact_idx),
        normalized_matches=len(pairs),
        exact_fraction=len(exact_idx) / n_eval if n_eval else 0.0,
        normalized_fraction=len(pairs) / n_eval if n_eval else 0.0,
        exact_indices=exact_idx,
        normalized_indices=[i for i, _ in pairs],
        normalized_pairs=pairs,
    )
    if report.normalized_matches:
        logger.warning("Calibration/evaluation overlap: %s", report.summary())
    return report
