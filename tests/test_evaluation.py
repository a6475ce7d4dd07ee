"""Tests of rain_hf.evaluation and the rain_ifeval metric module; fully offline (network blocked)."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from fractions import Fraction

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rain_hf import evaluation as ev
from rain_hf._modes import end_ids
from rain_hf._punkt import PUNKT_BUILD_VERSION, build_punkt_parameters

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: offline environment, tiny tokenizer and models
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def offline(tmp_path_factory, monkeypatch):
    """Temporary nltk data folders for every test of this file (conftest.py keeps the network away)."""
    root = tmp_path_factory.mktemp("offline")
    monkeypatch.setenv("NLTK_DATA", str(root / "nltk"))
    monkeypatch.setenv("RAIN_HF_NLTK_DATA", str(root / "nltk"))
    yield root


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run faster (and steadier on a shared machine) on one thread; restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def own_nltk_path(monkeypatch):
    """A copy of ``nltk.data.path`` for the test, so that folders the test prepends do not outlive it."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))


@pytest.fixture
def no_nltk_download(monkeypatch):
    """Make any nltk download attempt fail loudly."""
    import nltk

    def _fail(*args, **kwargs):
        raise AssertionError("nltk tried to download data")

    monkeypatch.setattr(nltk, "download", _fail)


SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", THINK_OPEN, THINK_CLOSE]
WORDS = [
    "user",
    "assistant",
    "what",
    "is",
    "two",
    "plus",
    "three",
    "four",
    "the",
    "answer",
    "hello",
    "world",
    "?",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A 64-token word-level tokenizer with chat and think special tokens and a chat template."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), 64)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        extra_special_tokens=[THINK_OPEN, THINK_CLOSE],
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=64,
        initializer_range=0.2,
    )
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return tiny_qwen2(0)


# ----------------------------------------------------------------------------------------------------------------
# Think format
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, thinking, answer, ok",
    [
        ("<think>2+3=5</think>The answer is 5.", "2+3=5", "The answer is 5.", True),
        ("  \n<think>\nplan\n</think>\n\n answer \n", "plan", "answer \n", True),  # trailing kept, as lm-eval
        ("<think></think>answer", "", "answer", True),
        ("<think>plan and answer", "plan and answer", "", False),  # never closed: all thinking, no answer
        ("Sure. <think>plan", "plan", "Sure.", False),  # an unclosed block after some text
        ("<think>a</think>b<think>c</think>d", "a\nb\nc", "d", False),  # two blocks: pieces kept apart
        ("<think>a</think>  \n", "a", "", False),  # empty answer
        ("<think>a</think>Answer. \n<think>", "a", "Answer.", False),  # cut at a tag that opens an empty block
        ("intro <think>a</think>b", "intro\na", "b", False),  # block not first
        ("just an answer", None, "just an answer", False),
        ("just an answer \n", None, "just an answer \n", False),  # runs to the end: trailing whitespace kept
        ("<think>a</think>b<think>c</think>d\n", "a\nb\nc", "d\n", False),
    ],
)
def test_split_generation_free_template(text, thinking, answer, ok):
    split = ev.split_generation(text)
    assert split.format_ok is ok
    assert split.answer == answer
    assert split.thinking == thinking


def test_split_generation_close_before_open_best_effort():
    split = ev.split_generation("</think>b<think>a")
    assert not split.format_ok
    assert (split.answer, split.thinking) == ("b", "a")  # the block opened again after the close is thinking


@pytest.mark.parametrize("forced", [False, True])
def test_split_generation_block_reopened_after_answer_is_not_answer(forced):
    text = ("" if forced else "<think>") + "plan</think>hello world\n<think>Hmm, wait, maybe"
    split = ev.split_generation(text, prompt_ends_with_open=forced)
    assert not split.format_ok
    assert split.answer == "hello world"
    assert split.thinking == "plan\nHmm, wait, maybe"


@pytest.mark.parametrize(
    "text, answer, ok",
    [
        ("plan</think>The answer is 5.", "The answer is 5.", True),
        ("\nplan\n</think>\nanswer", "answer", True),
        ("<think>plan</think>answer", "answer", False),  # a second open
        ("plan and answer", "", False),  # the block the prompt opened is never closed: no answer
        ("a</think>b</think>c", "c", False),  # two closes
        ("plan</think>", "", False),  # empty answer
    ],
)
def test_split_generation_forced_template(text, answer, ok):
    split = ev.split_generation(text, prompt_ends_with_open=True)
    assert split.format_ok is ok
    assert split.answer == answer


def test_generations_opened_by_the_prompt_are_pointed_out(caplog):
    r1_style = ["2+3=5</think>5", "so 7</think>7", "still thinking"]  # the template wrote <think>
    with caplog.at_level("WARNING", logger="rain_hf.evaluation"):
        assert ev.think_format_rate(r1_style) == 0.0
    assert "2 of 3 generations close a think block they never opened" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rain_hf.evaluation"):
        assert ev.think_format_rate(r1_style, prompt_ends_with_open=True) == pytest.approx(2 / 3)
        assert ev.think_format_rate(["<think>a</think>b", "a</think>b", "<think>c</think>d"]) == pytest.approx(2 / 3)
    assert "never opened" not in caplog.text


def test_split_generation_custom_tags_and_rate():
    split = ev.split_generation("<reason>r</reason>a", think_open="<reason>", think_close="</reason>")
    assert split == ev.ThinkSplit(thinking="r", answer="a", format_ok=True)
    gens = ["<think>a</think>b", "<think>a b", "a</think>b", "<think>x</think>y"]
    assert ev.think_format_rate(gens) == 0.5
    assert ev.think_format_rate(["a</think>b"], prompt_ends_with_open=True) == 1.0
    with pytest.raises(ValueError):
        ev.think_format_rate([])


# ----------------------------------------------------------------------------------------------------------------
# nltk data and IFEval
# ----------------------------------------------------------------------------------------------------------------


def test_ensure_nltk_data_builds_punkt_tab_offline(tmp_path, no_nltk_download, own_nltk_path):
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    root = ev.ensure_nltk_data(str(tmp_path / "data"))
    assert nltk.data.path[0] == root
    lang_dir = os.path.join(root, "tokenizers", "punkt_tab", "english")
    assert sorted(os.listdir(lang_dir)) == sorted(ev._PUNKT_FILES + (ev._PUNKT_MARKER,))
    assert str(nltk.data.find("tokenizers/punkt_tab/english/")).startswith(root)
    params = load_punkt_params(nltk.data.find("tokenizers/punkt_tab/english/"))
    assert {"dr", "mr", "p.m"} <= params.abbrev_types and "e.g" not in params.abbrev_types
    sentences = PunktSentenceTokenizer(params).tokenize(
        "Dr. Smith arrived. He sat down! Did Mr. Lee come? Yes."
    )
    assert sentences == ["Dr. Smith arrived.", "He sat down!", "Did Mr. Lee come?", "Yes."]

    mtime = os.path.getmtime(os.path.join(lang_dir, "abbrev_types.txt"))
    assert ev.ensure_nltk_data(str(tmp_path / "data")) == root  # reused, path not duplicated
    assert os.path.getmtime(os.path.join(lang_dir, "abbrev_types.txt")) == mtime
    assert nltk.data.path.count(root) == 1

    with open(os.path.join(lang_dir, ev._PUNKT_MARKER), "w") as f:
        f.write("old-version\n")
    ev.ensure_nltk_data(root)  # another build version: rebuilt
    with open(os.path.join(lang_dir, ev._PUNKT_MARKER)) as f:
        assert f.read().strip() == PUNKT_BUILD_VERSION


@pytest.mark.parametrize("text, expected", [
    # a capitalised function word after an abbreviation starts a sentence
    ("We met at 5 p.m. It was raining.", ["We met at 5 p.m.", "It was raining."]),
    ("Sales grew in the U.S. However, Europe lagged.", ["Sales grew in the U.S.", "However, Europe lagged."]),
    ("Martin Luther King Jr. It was his dream.", ["Martin Luther King Jr.", "It was his dream."]),
    ("The meeting moved to Feb. This was expected.", ["The meeting moved to Feb.", "This was expected."]),
    # … a name or other capitalised word does not
    ("Ask Mr. Brown about it. He knows.", ["Ask Mr. Brown about it.", "He knows."]),
    ("The U.S. Army arrived. Nobody cheered.", ["The U.S. Army arrived.", "Nobody cheered."]),
    ("Mr. Will Smith arrived late.", ["Mr. Will Smith arrived late."]),
    ("We saw Dr. Who yesterday.", ["We saw Dr. Who yesterday."]),
    ("We drove to St. Louis. Then we flew home.", ["We drove to St. Louis.", "Then we flew home."]),
    # abbreviations nltk's model knows, before a lower-case word; initials after a title
    ("She earned a Ph.D. in physics. Then she taught.", ["She earned a Ph.D. in physics.", "Then she taught."]),
    ("Acme Co. and the U.N. signed. Good.", ["Acme Co. and the U.N. signed.", "Good."]),
    ("Mr. A. Smith left. Bye.", ["Mr. A. Smith left.", "Bye."]),
    ("Mr. A. B. Smith left.", ["Mr. A. B. Smith left."]),
    # as in nltk's published English model, "e.g." is not an abbreviation
    ("I like fruit, e.g. apples.", ["I like fruit, e.g.", "apples."]),
])
def test_the_built_punkt_model_splits_after_abbreviations(text, expected):
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    assert PunktSentenceTokenizer(build_punkt_parameters()).tokenize(text) == expected


def test_switching_punkt_models_drops_the_cached_sentence_tokenizers(tmp_path, no_nltk_download, own_nltk_path):
    # lm-eval and nltk cache the sentence tokenizer they load first; a later model would be ignored otherwise
    import nltk
    from nltk.tokenize.punkt import save_punkt_params

    ours = ev.ensure_nltk_data(str(tmp_path / "ours"))
    ev._ifeval_registry(ours)
    from lm_eval.tasks.ifeval import instructions_util

    text = "We met at 5 p.m. It was raining."
    assert instructions_util.count_sentences(text) == 2
    other = build_punkt_parameters()
    del other.ortho_context["it"]  # a model that never saw "it": no break at "p.m. It"
    lang_dir = tmp_path / "other" / "tokenizers" / "punkt_tab" / "english"
    lang_dir.parent.mkdir(parents=True, mode=0o700)  # nltk writes only into private folders …
    nltk.data.path.insert(0, str(tmp_path / "other"))  # … inside its data folders
    save_punkt_params(other, dir=str(lang_dir))
    ev.ensure_nltk_data(str(tmp_path / "other"))
    assert instructions_util.count_sentences(text) == 1
    ev.ensure_nltk_data(ours)
    assert instructions_util.count_sentences(text) == 2


def test_ensure_nltk_data_leaves_a_foreign_model_alone(tmp_path, own_nltk_path):
    lang_dir = tmp_path / "tokenizers" / "punkt_tab" / "english"
    lang_dir.mkdir(parents=True)
    for name in ev._PUNKT_FILES:
        (lang_dir / name).write_text("")
    ev.ensure_nltk_data(str(tmp_path))
    assert sorted(os.listdir(lang_dir)) == sorted(ev._PUNKT_FILES)  # no marker written, nothing replaced


def test_ensure_nltk_data_under_a_group_writable_umask(tmp_path, own_nltk_path):
    previous = os.umask(0o002)  # many desktop accounts: new folders are group-writable
    try:
        root = ev.ensure_nltk_data(str(tmp_path / "deeper" / "data"))
    finally:
        os.umask(previous)
    marker = os.path.join(root, "tokenizers", "punkt_tab", "english", ev._PUNKT_MARKER)
    assert os.path.isfile(marker) and not os.stat(marker).st_mode & 0o022  # nltk refuses files others can write
    assert not os.stat(os.path.join(root, "tokenizers")).st_mode & 0o022
    import nltk

    assert nltk.sent_tokenize("Dr. Lee sat down. He smiled.") == ["Dr. Lee sat down.", "He smiled."]
    os.chmod(marker, 0o664)  # as an older build left it: rebuilt, not trusted
    assert ev._punkt_state(os.path.dirname(marker), PUNKT_BUILD_VERSION) == "stale"
    ev.ensure_nltk_data(root)
    assert not os.stat(marker).st_mode & 0o022
    # folders an older run left group-writable are mended, not a dead end
    left = tmp_path / "left"
    (left / "tokenizers" / "punkt_tab").mkdir(parents=True)
    for folder in (left / "tokenizers", left / "tokenizers" / "punkt_tab"):
        folder.chmod(0o775)
    root = ev.ensure_nltk_data(str(left))
    assert os.path.isfile(os.path.join(root, "tokenizers", "punkt_tab", "english", ev._PUNKT_MARKER))


def test_ensure_nltk_data_prefers_a_real_punkt_tab_nltk_finds(tmp_path, own_nltk_path, monkeypatch):
    import nltk

    real = tmp_path / "nltk_data"
    lang_dir = real / "tokenizers" / "punkt_tab" / "english"
    lang_dir.mkdir(parents=True)
    for name in ev._PUNKT_FILES:
        (lang_dir / name).write_text("")
    monkeypatch.delenv(ev._NLTK_DATA_ENV, raising=False)
    nltk.data.path.insert(0, str(real))
    assert ev.ensure_nltk_data() == str(real)
    assert sorted(os.listdir(lang_dir)) == sorted(ev._PUNKT_FILES)  # used as it is
    own = ev.ensure_nltk_data(str(tmp_path / "own"))  # a named folder: the project's model, put first on the path
    assert nltk.data.path[0] == own
    assert ev.ensure_nltk_data() == str(real)  # … which must not hide the real one from the next default call
    assert own not in nltk.data.path  # nltk loads an unzipped model from any folder before a zipped one
    # as nltk's downloader leaves it: tokenizers/punkt_tab.zip
    import zipfile

    zipped = tmp_path / "zipped"
    (zipped / "tokenizers").mkdir(parents=True)
    with zipfile.ZipFile(zipped / "tokenizers" / "punkt_tab.zip", "w") as archive:
        for name in ev._PUNKT_FILES:
            archive.writestr(f"punkt_tab/english/{name}", "")
    nltk.data.path[:] = [str(zipped)]
    assert ev.ensure_nltk_data() == str(zipped)


def test_a_real_punkt_tab_behind_the_projects_folder_is_the_one_loaded(tmp_path, own_nltk_path, monkeypatch):
    import shutil

    import nltk

    own = ev.ensure_nltk_data(str(tmp_path / "own"))
    # a stand-in for nltk's download: the project's model without its marker, and without "dr" as an abbreviation
    real = tmp_path / "real"
    shutil.copytree(os.path.join(own, "tokenizers"), real / "tokenizers")
    lang_dir = real / "tokenizers" / "punkt_tab" / "english"
    (lang_dir / ev._PUNKT_MARKER).unlink()
    abbreviations = (lang_dir / "abbrev_types.txt").read_text().split("\n")
    (lang_dir / "abbrev_types.txt").write_text("\n".join(a for a in abbreviations if a.strip() != "dr"))
    nltk.data.path.insert(1, str(real))  # NLTK_DATA or ~/nltk_data: behind the project's folder
    monkeypatch.delenv(ev._NLTK_DATA_ENV, raising=False)
    text = "Dr. Lee sat down. He smiled."
    assert len(nltk.sent_tokenize(text)) == 2
    assert ev.ensure_nltk_data() == str(real)
    assert nltk.sent_tokenize(text) == ["Dr.", "Lee sat down.", "He smiled."]
    # the same model zipped, as nltk's downloader leaves it: found only once no folder holds an unzipped one
    import zipfile

    zipped = tmp_path / "zipped"
    (zipped / "tokenizers").mkdir(parents=True)
    with zipfile.ZipFile(zipped / "tokenizers" / "punkt_tab.zip", "w") as archive:
        for file in lang_dir.iterdir():
            archive.write(file, f"punkt_tab/english/{file.name}")
    ev.ensure_nltk_data(own)
    nltk.data.path[:] = [p for p in nltk.data.path if p != str(real)] + [str(zipped)]
    assert len(nltk.sent_tokenize(text)) == 2
    assert ev.ensure_nltk_data() == str(zipped)
    assert nltk.sent_tokenize(text) == ["Dr.", "Lee sat down.", "He smiled."]
    # the zipped folder named: used as it is, not built over (nor hidden by the project's folder on the path)
    ev.ensure_nltk_data(own)
    assert ev.ensure_nltk_data(str(zipped)) == str(zipped)
    assert nltk.sent_tokenize(text) == ["Dr.", "Lee sat down.", "He smiled."]
    assert sorted(os.listdir(zipped / "tokenizers")) == ["punkt_tab.zip"]
    ev.ensure_nltk_data(own)  # the project's model again, for the tests that follow (nltk caches the loaded one)
    assert len(nltk.sent_tokenize(text)) == 2


def test_ensure_nltk_data_default_folder_from_env(offline):
    assert ev.ensure_nltk_data() == os.path.abspath(str(offline / "nltk"))


IFEVAL_CASES = [
    # (answer, prompt, ids, kwargs, strict, loose)
    ("hello world", "p", ["change_case:english_lowercase"], [{}], [True], [True]),
    ("Hello World", "p", ["change_case:english_lowercase"], [{}], [False], [False]),
    ("no commas here", "p", ["punctuation:no_comma"], [{}], [True], [True]),
    ("yes, commas", "p", ["punctuation:no_comma"], [{}], [False], [False]),
    (
        "Here you go.\nAny other questions?\nBye",
        "p",
        ["startend:end_checker"],
        [{"end_phrase": "Any other questions?"}],
        [False],
        [True],  # loose drops the last line
    ),
    # loose drops the first line ("Here you go:"), or the first and the last
    ("Here you go:\nall lowercase text", "p", ["change_case:english_lowercase"], [{}], [False], [True]),
    ("Intro:\nlowercase body\nThanks!", "p", ["change_case:english_lowercase"], [{}], [False], [True]),
    ('"quoted answer"', "p", ["startend:quotation"], [{}], [True], [True]),
    ('**"quoted answer"**', "p", ["startend:quotation"], [{}], [False], [True]),  # loose strips *
    ("<<A Title>>\nbody text", "p", ["detectable_format:title"], [{}], [True], [True]),
    (
        "one two three four five six",
        "p",
        ["length_constraints:number_words"],
        [{"num_words": 5, "relation": "at least", "end_phrase": None, "num_sentences": None}],
        [True],
        [True],
    ),
    # number_sentences uses nltk's punkt_tab: "Dr." must not end a sentence (2 sentences < 3)
    (
        "Dr. Smith arrived. He sat down.",
        "p",
        ["length_constraints:number_sentences"],
        [{"num_sentences": 3, "relation": "less than"}],
        [True],
        [True],
    ),
    (
        "One. Two. Three. Four.",
        "p",
        ["length_constraints:number_sentences", "change_case:english_lowercase"],
        [{"num_sentences": 3, "relation": "less than"}, {}],
        [False, False],
        [False, False],
    ),
    (
        "Repeat me please. The answer is 4.",
        "Repeat me please.",
        ["combination:repeat_prompt"],
        [{"prompt_to_repeat": "Repeat me please."}],
        [True],
        [True],
    ),
    ("", "p", ["punctuation:no_comma"], [{}], [False], [False]),  # an empty answer follows nothing
]


def test_instruction_following_strict_and_loose(no_nltk_download):
    answers, prompts, ids, kwargs, strict, loose = (list(col) for col in zip(*IFEVAL_CASES))
    scores = ev.instruction_following(answers, prompts, ids, kwargs)
    assert scores["strict_per_instruction"] == strict
    assert scores["loose_per_instruction"] == loose
    flat_strict = [x for row in strict for x in row]
    flat_loose = [x for row in loose for x in row]
    assert scores["instruction_strict"] == pytest.approx(sum(flat_strict) / len(flat_strict))
    assert scores["instruction_loose"] == pytest.approx(sum(flat_loose) / len(flat_loose))
    assert scores["prompt_strict"] == pytest.approx(sum(map(all, strict)) / len(strict))
    assert scores["prompt_loose"] == pytest.approx(sum(map(all, loose)) / len(loose))
    assert scores["strict_per_prompt"] == [all(r) for r in strict]
    assert scores["prompt_loose"] > scores["prompt_strict"]
    # a prompt is followed when all its instructions are, loosely too
    two = ev.instruction_following(["hello, world"], ["p"], [["change_case:english_lowercase", "punctuation:no_comma"]],
                                   [[{}, {}]])
    assert two["loose_per_instruction"] == [[True, False]] and two["prompt_loose"] == two["prompt_strict"] == 0.0


def test_instruction_following_matches_lm_eval_reference(no_nltk_download):
    """Same verdicts as lm-eval's own IFEval scoring functions (kwargs without None or falsy values)."""
    ev.ensure_nltk_data()
    from lm_eval.tasks.ifeval import utils as lm_ifeval

    for answer, prompt, ids, kwargs, _, _ in IFEVAL_CASES:
        kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in kwargs]
        if "combination:repeat_prompt" in ids:
            kwargs = [{"prompt_to_repeat": prompt}]
        inp = lm_ifeval.InputExample(key=0, instruction_id_list=ids, prompt=prompt, kwargs=kwargs)
        ours = ev.instruction_following([answer], [prompt], [ids], [kwargs])
        assert (
            ours["strict_per_instruction"][0]
            == lm_ifeval.test_instruction_following_strict(inp, answer).follow_instruction_list
        )
        assert (
            ours["loose_per_instruction"][0]
            == lm_ifeval.test_instruction_following_loose(inp, answer).follow_instruction_list
        )


def test_an_answer_is_scored_as_lm_eval_scores_the_text_after_think_close(no_nltk_download):
    """lm-eval strips only the leading whitespace after </think>: a trailing newline makes the loose variant
    "without the last line" drop an empty line, not the comma's."""
    ev.ensure_nltk_data()
    generation = "<think>Plan.</think>\n\nhello world\nHope this helps, friend!\n"
    answer = ev.split_generation(generation).answer
    assert answer == "hello world\nHope this helps, friend!\n"
    scores = ev.instruction_following([answer], ["p"], [["punctuation:no_comma"]], [[{}]])
    assert scores["prompt_loose"] == 0.0  # lm-eval's verdict; the stripped answer passed (its last line dropped)
    assert ev.instruction_following([answer.strip()], ["p"], [["punctuation:no_comma"]], [[{}]])["prompt_loose"] == 1
    # an empty string is no argument: end_phrase "" would pass on any text
    with pytest.raises(ValueError, match=r"startend:end_checker needs the kwargs \['end_phrase'\]"):
        ev.instruction_following(["one two"], ["p"], [["startend:end_checker"]], [[{"end_phrase": " "}]])


def test_generations_without_think_tags_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="rain_hf.evaluation"):
        assert ev.think_format_rate(["plan, so: 5", "5"]) == 0.0
    assert "None of the 2 generations holds <think> or </think>" in caplog.text
    assert "skip_special_tokens=False" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rain_hf.evaluation"):
        ev.think_format_rate(["<think>a</think>b", "5"])
    assert "None of" not in caplog.text


def test_instruction_following_on_answer_part_only(caplog):
    generations = ["<think>First, think: commas, Capitals, everything.</think>\nhello world without commas"]
    answers = [ev.split_generation(g).answer for g in generations]
    ids = [["punctuation:no_comma", "change_case:english_lowercase"]]
    with caplog.at_level(logging.WARNING, logger="rain_hf.evaluation"):
        on_answer = ev.instruction_following(answers, ["p"], ids, [[{}, {}]])
        assert "think tag" not in caplog.text
        on_whole = ev.instruction_following(generations, ["p"], ids, [[{}, {}]])
    assert on_answer["prompt_strict"] == 1.0
    assert on_whole["prompt_strict"] == 0.0
    assert "1 of 1 answers hold a think tag: pass the answer part" in caplog.text  # whole generations, said


def test_instruction_following_errors(monkeypatch):
    with pytest.raises(ValueError, match="same length"):
        ev.instruction_following(["a"], [], [[]], [[]])
    with pytest.raises(ValueError, match="Unknown IFEval instruction id"):
        ev.instruction_following(["a"], ["p"], [["no:such_id"]], [[{}]])
    with pytest.raises(ValueError, match="needs the kwarg 'prompt_to_repeat'"):
        ev.instruction_following(["a"], ["p"], [["combination:repeat_prompt"]], [[{"prompt_to_repeat": None}]])
    # lm-eval would draw the missing word limit (and relation) at random: the score would be a coin toss
    for kwargs in ({}, {"num_words": 10, "relation": None}):
        with pytest.raises(ValueError, match=r"length_constraints:number_words needs the kwargs \[.*'relation'\]"):
            ev.instruction_following(["one two"], ["p"], [["length_constraints:number_words"]], [[kwargs]])
    with pytest.raises(TypeError, match=r"kwargs of punctuation:no_comma are a str, not a dict .*json.loads"):
        ev.instruction_following(["a"], ["p"], [["punctuation:no_comma"]], [['{"num_words": 3}']])
    # a whole row as the JSON string of a CSV export: refused as such, not counted in characters
    for ids, kwargs in (([["punctuation:no_comma"]], ["[{}]"]), (['["punctuation:no_comma"]'], [[{}]])):
        with pytest.raises(TypeError, match=r"of prompt 'p' are one string .*, not a list: parse a JSON string"):
            ev.instruction_following(["a"], ["p"], ids, kwargs)
    # IFEval read with pandas from parquet: keyword lists as numpy arrays, whole numbers as floats or NaN
    import numpy as np

    pandas_like = ev.instruction_following(
        ["An apple and a pear.", "One.\n\nThen two."], ["p", "q"],
        [["keywords:existence"], ["length_constraints:nth_paragraph_first_word"]],
        [np.array([{"keywords": np.array(["apple", "pear"]), "num_words": float("nan")}], dtype=object),
         [{"num_paragraphs": 2.0, "nth_paragraph": np.float64(2.0), "first_word": "then", "keywords": None}]])
    assert pandas_like["strict_per_prompt"] == [True, True]
    with pytest.raises(ValueError, match=r"takes the kwargs none, not \['num_words'\]"):
        ev.instruction_following(["a"], ["p"], [["punctuation:no_comma"]], [[{"num_words": 3}]])
    zero = ev.instruction_following(["lll"], ["p"], [["keywords:letter_frequency"]],
                                    [[{"letter": "l", "let_frequency": 0, "let_relation": "at least"}]])
    assert zero["prompt_strict"] == 1.0  # a 0 is an argument, not a missing one
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "rain_hf\[eval\]"'):
        ev.instruction_following(["a"], ["p"], [["punctuation:no_comma"]], [[{}]])


def test_kwargs_a_checker_cannot_use_give_a_repeatable_score(caplog):
    # IFEval's records 1122 and 1129 ask for the letter "#" and "!": lm-eval's checker draws a letter at random
    answer = "".join(chr(c) * 3 for c in range(ord("a"), ord("z") + 1))[:40]
    kwargs = {"letter": "#", "let_frequency": 3, "let_relation": "at least"}
    scores = set()
    with caplog.at_level("WARNING", logger="rain_hf.evaluation"):
        for seed in range(12):
            random.seed(seed)
            before = random.getstate()
            scores.add(ev.instruction_following([answer], ["p"], [["keywords:letter_frequency"]],
                                                [[kwargs]])["prompt_strict"])
            assert random.getstate() == before  # the caller's random state is untouched
    assert len(scores) == 1
    assert caplog.text.count("cannot use the kwargs {'letter': '#'") == 1  # once, not per call


# ----------------------------------------------------------------------------------------------------------------
# Answer accuracy
# ----------------------------------------------------------------------------------------------------------------


def test_answer_accuracy():
    answers = [
        "Max has 33 apples now. So, the answer is 33.",
        "It is 1,200",
        "20-5 = 15",
        "no number",
        "-4.5",
    ]
    assert ev.answer_accuracy(answers, [33, "1200", 15, 3, -4.5]) == pytest.approx(4 / 5)
    assert ev.answer_accuracy(["x = 2.0"], ["2"]) == 1.0
    assert ev.extract_last_number("20-5") == "5"
    assert ev.extract_last_number("The answer is .5") == ".5"
    assert ev.extract_last_number("The answer is \u22123.") == "-3"  # Unicode minus sign
    assert ev.extract_last_number("20\u22125") == "5"
    assert ev.extract_last_number("version 1.25.") == "1.25"
    assert ev.extract_last_number("The answer is...42") == "42"  # an ellipsis is not a decimal point
    assert ev.answer_accuracy([".5", "\u22123"], [0.5, -3]) == 1.0
    assert ev.extract_last_number("none") is None
    assert ev.answer_accuracy(["Answer: Paris"], ["paris"], extract=lambda a: a.split(":")[-1]) == 1.0
    # references as a `datasets` column in torch or numpy format gives them, and as fractions
    assert ev.answer_accuracy(["The answer is 41.", "0.5", "3"], [torch.tensor(41), torch.tensor([0.5]),
                                                                np.array(3.0)]) == 1.0
    assert ev.answer_accuracy(["0.5", "2"], [Fraction(1, 2), np.int64(2)]) == 1.0
    with pytest.raises(ValueError):
        ev.answer_accuracy(["1"], [1, 2])
    # an exponent belongs to its number, and a thousands group is exactly three digits
    assert ev.extract_last_number("It is 1.5e-3.") == "1.5e-3"
    assert ev.extract_last_number("about 6.02e23 atoms") == "6.02e23"
    assert ev.answer_accuracy(["so 1e3"], [1000]) == 1.0
    assert ev.extract_last_number("12,3456") == "3456"
    assert ev.extract_last_number("12,345,678") == "12345678"
    # arrays and Series, as generate accepts
    assert ev.answer_accuracy(np.array(["It is 3"]), np.array([3])) == 1.0
    assert ev.think_format_rate(np.array(["<think>a</think>b", "b"])) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        ev.think_format_rate(np.array([], dtype=str))


# ----------------------------------------------------------------------------------------------------------------
# L_think
# ----------------------------------------------------------------------------------------------------------------


def slow_kl(model, reference, input_ids, positions) -> float:
    """KL(p_model ‖ p_reference) per position, one unpadded sequence at a time, in float64."""
    values = []
    with torch.no_grad():
        for ids, pos in zip(input_ids, positions):
            lp = model(input_ids=ids[None]).logits[0].double().log_softmax(-1)
            lq = reference(input_ids=ids[None]).logits[0].double().log_softmax(-1)
            for t in pos:  # Σ_v p(v) (log p(v) − log q(v))
                values.append(float(torch.dot(lp[t].exp(), lp[t] - lq[t])))
    return float(sum(values) / len(values))


def perturbed(model: Qwen2ForCausalLM, scale: float = 0.05, seed: int = 1) -> Qwen2ForCausalLM:
    other = tiny_qwen2(0)
    other.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture(scope="module")
def kl_data():
    gen = torch.Generator().manual_seed(3)
    input_ids = [torch.randint(1, 64, (n,), generator=gen) for n in (7, 12, 4, 9, 5)]
    positions = [[0, 3, 6], [11, 2, 5], [], [8, 8], [1]]
    return input_ids, positions


def test_think_kl_identical_models_is_zero(model, kl_data):
    assert ev.think_kl(model, model, *kl_data, batch_size=2) == pytest.approx(0.0, abs=1e-7)
    twin = tiny_qwen2(0)
    assert ev.think_kl(twin, model, *kl_data) == pytest.approx(0.0, abs=1e-6)


def test_think_kl_matches_hand_computation(model, kl_data):
    merged = perturbed(model)
    fast = ev.think_kl(merged, model, *kl_data, batch_size=2, pad_token_id=0)
    slow = slow_kl(merged, model, *kl_data)
    assert fast > 1e-4
    assert fast == pytest.approx(slow, rel=1e-4)
    # direction matters: KL(merged ‖ LRM) differs from KL(LRM ‖ merged)
    reverse = ev.think_kl(model, merged, *kl_data)
    assert reverse == pytest.approx(slow_kl(model, merged, *kl_data), rel=1e-4)
    assert reverse != pytest.approx(fast, rel=1e-3)


def test_think_log_probs_rows_follow_input_order(model, kl_data):
    input_ids, positions = kl_data  # lengths 7, 12, 4, 9, 5 and unsorted, repeated and empty position lists
    got = ev.think_log_probs(model, input_ids, positions, batch_size=2, pad_token_id=0)
    with torch.no_grad():
        want = torch.cat([model(ids.unsqueeze(0)).logits[0, pos].float().log_softmax(-1)
                          for ids, pos in zip(input_ids, positions) if pos])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: think_kl must fall back to full logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_think_open_share_counts_only_prompts_the_reference_opens():
    reference = torch.tensor([7, 7, 3, 7, 5])
    assert ev.think_open_share(reference, torch.tensor([7, 2, 7, 7, 7]), 7) == pytest.approx(2 / 3)
    assert ev.think_open_share(reference, reference, 7) == 1.0
    assert ev.think_open_share(torch.tensor([1, 2]), torch.tensor([7, 7]), 7) is None  # nothing to keep
    with pytest.raises(ValueError, match="reference choices"):
        ev.think_open_share(reference, reference[:2], 7)


def test_think_kl_without_logits_to_keep_and_errors(model, kl_data):
    merged = perturbed(model)
    expected = ev.think_kl(merged, model, *kl_data, batch_size=3)
    assert ev.think_kl(_NoLogitsToKeep(merged), model, *kl_data, batch_size=3) == pytest.approx(
        expected, rel=1e-5
    )
    merged.train()
    ev.think_kl(merged, model, *kl_data)
    assert merged.training  # training flag restored
    with pytest.raises(ValueError, match="outside"):
        ev.think_kl(model, model, [torch.tensor([1, 2])], [[2]])
    with pytest.raises(ValueError, match="No position to score"):
        ev.think_kl(model, model, [torch.tensor([1, 2])], [[]])
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            ev.think_kl(merged, model, *kl_data, batch_size=bad)
    # a tokenizer without a pad token gives pad_token_id=None: the padding is never scored, so any id does
    assert ev.think_kl(merged, model, *kl_data, batch_size=3, pad_token_id=None) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Task-vector geometry
# ----------------------------------------------------------------------------------------------------------------


def _random_deltas(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(3):
        out[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(8, 6, generator=gen)
        out[f"model.layers.{layer}.self_attn.q_proj.bias"] = torch.randn(8, generator=gen)
        out[f"model.layers.{layer}.mlp.down_proj.weight"] = torch.randn(6, 10, generator=gen)
    return out


def _direct_geometry(a: dict, b: dict, module: str, k: int) -> tuple[float, float]:
    names = [n for n in a if n.endswith(f"{module}.weight")]
    flat_a = torch.cat([a[n].flatten() for n in names]).double()
    flat_b = torch.cat([b[n].flatten() for n in names]).double()
    cosine = float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))
    overlaps = []
    for n in names:
        ua = torch.linalg.svd(a[n].double()).U[:, :k]
        ub = torch.linalg.svd(b[n].double()).U[:, :k]
        overlaps.append(float(torch.linalg.matrix_norm(ua.T @ ub) ** 2 / k))
    return cosine, sum(overlaps) / len(overlaps)


class _LazyDeltas(Mapping):
    """A mapping that builds each tensor on access and counts the loads."""

    def __init__(self, source: dict[str, torch.Tensor]):
        self.source, self.loads = source, 0

    def __getitem__(self, key):
        self.loads += 1
        return self.source[key].clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)


def test_task_vector_geometry_matches_direct_computation():
    a, b = _random_deltas(0), _random_deltas(1)
    b["model.layers.0.mlp.down_proj.weight"] = (
        a["model.layers.0.mlp.down_proj.weight"] * 2 + 0.1 * b["model.layers.0.mlp.down_proj.weight"]
    )
    geo = ev.task_vector_geometry(a, b, k=3)
    for module in ("q_proj", "down_proj"):
        cosine, overlap = _direct_geometry(a, b, module, k=3)
        assert geo["modules"][module]["cosine"] == pytest.approx(cosine, abs=1e-5)
        assert geo["modules"][module]["subspace_overlap"] == pytest.approx(overlap, abs=1e-4)
        assert geo["modules"][module]["num_tensors"] == 3
    assert geo["modules"]["q_proj.bias"]["subspace_overlap"] is None
    flat_a = torch.cat([t.flatten() for t in a.values()]).double()
    flat_b = torch.cat([b[n].flatten() for n in a]).double()
    assert geo["cosine"] == pytest.approx(float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm())), abs=1e-5)
    same = ev.task_vector_geometry(a, a, k=3)
    assert same["modules"]["down_proj"]["cosine"] == pytest.approx(1.0)
    assert same["modules"]["down_proj"]["subspace_overlap"] == pytest.approx(1.0, abs=1e-5)
    for bad in (0, -1, 1.5):  # k=-1 sliced off the last direction instead of keeping one
        with pytest.raises(ValueError, match="subspace rank"):
            ev.task_vector_geometry(a, b, k=bad)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_task_vector_geometry_ignores_directions_a_delta_does_not_have(svd):
    gen = torch.Generator().manual_seed(6)
    rank1 = torch.randn(20, 1, generator=gen) @ torch.randn(1, 12, generator=gen)
    full = torch.randn(20, 12, generator=gen)
    # the rank-1 delta's one direction, inside the full-rank one's top subspace: overlap 1, whatever k
    within = full + 50 * rank1
    geo = ev.task_vector_geometry({"l0.o_proj.weight": rank1, "l1.o_proj.weight": torch.zeros(20, 12)},
                                  {"l0.o_proj.weight": within, "l1.o_proj.weight": full}, k=4, svd=svd)
    assert geo["modules"]["o_proj"]["subspace_overlap"] == pytest.approx(1.0, abs=1e-3)  # the zero pair left out
    # ... and along the full-rank one's second direction, not its first
    u, sv, vh = torch.linalg.svd(full.double(), full_matrices=False)
    second = (u[:, 1:2] @ vh[1:2]).float()
    geo = ev.task_vector_geometry({"l.o_proj.weight": second}, {"l.o_proj.weight": full}, k=4, svd=svd)
    assert geo["modules"]["o_proj"]["subspace_overlap"] == pytest.approx(1.0, abs=1e-3)
    zero = ev.task_vector_geometry({"l.o_proj.weight": torch.zeros(20, 12)}, {"l.o_proj.weight": full}, k=4)
    assert zero["modules"]["o_proj"]["subspace_overlap"] is None and math.isnan(zero["cosine"])


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_task_vector_geometry_of_low_rank_deltas_stored_in_bfloat16(svd):
    # two rank-4 LoRA products spanning one subspace; stored in bf16, their rounding noise is no direction of theirs
    gen = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(256, 4, generator=gen)).Q
    a, b = ({"l.o_proj.weight": basis @ torch.randn(4, 300, generator=gen)} for _ in range(2))
    for dtype in (torch.float32, torch.bfloat16):
        geo = ev.task_vector_geometry({n: t.to(dtype) for n, t in a.items()}, {n: t.to(dtype) for n, t in b.items()},
                                      k=8, svd=svd)
        assert geo["modules"]["o_proj"]["subspace_overlap"] == pytest.approx(1.0, abs=1e-3), dtype


def test_task_vector_geometry_lazy_sources_and_randomized_svd():
    a, b = _random_deltas(0), _random_deltas(1)
    expected = ev.task_vector_geometry(a, b, k=2)
    lazy_a = _LazyDeltas(a)
    assert ev.task_vector_geometry(lazy_a, b.__getitem__, k=2) == expected
    assert lazy_a.loads == len(a)  # each tensor loaded once
    assert ev.task_vector_geometry(a.__getitem__, b.__getitem__, k=2, keys=list(a)) == expected
    with pytest.raises(ValueError, match="keys"):
        ev.task_vector_geometry(a.__getitem__, b.__getitem__)
    # rank-2 deltas: the randomized range finder recovers the exact top-2 subspace
    gen = torch.Generator().manual_seed(5)
    low = {
        f"l{i}.o_proj.weight": torch.randn(40, 2, generator=gen) @ torch.randn(2, 30, generator=gen)
        for i in range(2)
    }
    other = {n: t + 0.5 * torch.randn(t.shape, generator=gen) for n, t in low.items()}
    exact = ev.task_vector_geometry(low, other, k=2, svd="exact")["modules"]["o_proj"]["subspace_overlap"]
    approx = ev.task_vector_geometry(low, other, k=2, svd="randomized")["modules"]["o_proj"][
        "subspace_overlap"
    ]
    assert approx == pytest.approx(exact, abs=1e-3)
    # a flat spectrum (full-rank noise around a shared matrix): six fixed power iterations were 0.018 off here
    gen = torch.Generator().manual_seed(7)
    shared = torch.randn(300, 300, generator=gen)
    a, b = ({"l.o_proj.weight": shared + 0.5 * torch.randn(300, 300, generator=gen)} for _ in range(2))
    exact, approx = (ev.task_vector_geometry(a, b, k=8, svd=svd)["modules"]["o_proj"]["subspace_overlap"]
                     for svd in ("exact", "randomized"))
    assert approx == pytest.approx(exact, abs=0.005)


def test_task_vector_geometry_names_tensors_either_side_lacks(caplog):
    a = _random_deltas(0)
    one = dict(list(a.items())[:1])
    for first, second, side in ((one, a, "of delta_b are not in delta_a"), (a, one, "of delta_a are not in delta_b")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rain_hf.evaluation"):
            geo = ev.task_vector_geometry(first, second, k=1)
        assert f"{len(a) - 1} tensors {side}" in caplog.text
        assert sum(m["num_tensors"] for m in geo["modules"].values()) == 1


def test_randomized_svd_stops_once_the_kept_directions_settle(monkeypatch):
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or svd(*a, **k))
    gen = torch.Generator().manual_seed(3)
    rank2 = torch.randn(200, 2, generator=gen) @ torch.randn(2, 150, generator=gen)  # a LoRA-like delta, k > rank
    u = ev._top_left_singular_vectors(rank2, 8, randomized=True)
    assert u.shape == (200, 2) and len(calls) <= 3  # not max_iter rounds on the six noise directions


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------

PROMPTS = ["what is two plus three ?", "hello", "what is the answer ?", "two plus two plus four is what ?"]


def test_render_prompts(tokenizer, monkeypatch):
    plain = ev.render_prompts(tokenizer, ["hello"])
    for unwrapped in ("hello", {"role": "user", "content": "hello"}):
        with pytest.raises(TypeError, match="wrap one prompt, or one conversation"):
            ev.render_prompts(tokenizer, unwrapped)
    with pytest.raises(TypeError, match="this is one conversation"):
        ev.render_prompts(tokenizer, [{"role": "user", "content": "hello"}])
    # calibration records and malformed messages: templates render them as empty turns without an error
    with pytest.raises(TypeError, match=r"prompts\[0\] is a mapping with keys \['prompt', 'response'\]"):
        ev.render_prompts(tokenizer, [{"prompt": "hello", "response": "hi"}])
    for message, problem in (({"role": "user", "text": "hello"}, "has no 'content': give a string, or a list of "
                              "content parts (its keys: ['role', 'text'])"),
                             ({"content": "hello"}, "has no string 'role' (its keys: ['content'])"),
                             ({"role": "user", "content": 3}, "has 'content' of type int"),
                             ("hello", "must be a message {'role': str, 'content': str}, got a str")):
        with pytest.raises(TypeError, match=re.escape(f"prompts[0][0] {problem}")):
            ev.render_prompts(tokenizer, [[message]])
    # an assistant turn that only calls a tool has no content, as transformers' tool-use format writes it
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    assert ev.render_prompts(tokenizer, [[{"role": "user", "content": "hello"}, call]])
    with pytest.raises(TypeError, match="got a DataFrame"):
        ev.render_prompts(tokenizer, type("Frame", (), {"columns": ["prompt"], "__iter__": lambda s: iter([])})())
    with pytest.raises(TypeError, match=r"prompts\[1\] has type int"):
        ev.render_prompts(tokenizer, ["hello", 3])
    assert ev.render_prompts(tokenizer, (p for p in ["hello"])) == plain  # any iterable of prompts
    assert plain == ["<|im_start|>user hello<|im_end|> <|im_start|>assistant "]
    forced = ev.render_prompts(
        tokenizer, [[{"role": "user", "content": "hello"}]], force_think_open=THINK_OPEN
    )
    assert forced == [plain[0] + THINK_OPEN]
    assert ev.render_prompts(tokenizer, [forced[0]], force_think_open=None)[0].count(THINK_OPEN) == 1
    # a template that already ends with the tag and a newline, asked for the tag with R1's newline: not doubled
    monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template.replace(
        "<|im_start|>assistant ", f"<|im_start|>assistant {THINK_OPEN}\n"))
    rendered = ev.render_prompts(tokenizer, ["hello"], force_think_open=f"{THINK_OPEN}\n")[0]
    assert rendered.count(THINK_OPEN) == 1 and rendered.endswith(f"{THINK_OPEN}\n"), rendered


def test_render_prompts_passes_chat_template_kwargs(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template.replace(
        "<|im_start|>assistant ", "<|im_start|>assistant {% if enable_thinking is false %}<think> </think> {% endif %}"))
    plain = ev.render_prompts(tokenizer, ["hello"])
    off = ev.render_prompts(tokenizer, ["hello"], chat_template_kwargs={"enable_thinking": False})
    assert off == [plain[0] + "<think> </think> "]
    with pytest.raises(ValueError, match="cannot set \\['add_generation_prompt'\\]"):
        ev.render_prompts(tokenizer, ["hello"], chat_template_kwargs={"add_generation_prompt": False})


def test_generate_passes_chat_template_kwargs(model, tokenizer, monkeypatch):
    seen = []
    render = ev.render_prompts
    monkeypatch.setattr(ev, "render_prompts", lambda *a, **k: seen.append(k["chat_template_kwargs"]) or render(*a, **k))
    ev.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=1, chat_template_kwargs={"enable_thinking": False})
    assert seen == [{"enable_thinking": False}]


def test_generate_batched_equals_one_by_one(model, tokenizer):
    batched = ev.generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4)
    single = [ev.generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert len(batched) == len(PROMPTS)
    assert batched == single
    for text in batched:
        assert 0 < len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 6
        assert "<pad>" not in text
    assert ev.generate(model, tokenizer, [], max_new_tokens=2) == []
    assert ev.generate(model, tokenizer, iter([]), max_new_tokens=2) == []
    assert ev.generate(model, tokenizer, np.array(PROMPTS[:2]), max_new_tokens=6) == batched[:2]
    assert ev.generate(model, tokenizer, PROMPTS[:2], max_new_tokens=6, batch_size=np.int64(1)) == batched[:2]
    for bad in (0, -1):  # -1 gave an empty completion for every prompt
        with pytest.raises(ValueError, match="batch_size"):
            ev.generate(model, tokenizer, PROMPTS[:2], max_new_tokens=6, batch_size=bad)


def test_greedy_generate_is_the_argmax_whatever_the_generation_config(tokenizer):
    penalised = tiny_qwen2(0)
    with torch.no_grad():
        penalised.lm_head.weight.mul_(5)
    text = ev.render_prompts(tokenizer, PROMPTS[:1])[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stops, out = end_ids(penalised.generation_config, tokenizer), []
    with torch.no_grad():
        for _ in range(8):
            token = int(penalised(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
    argmax = tokenizer.decode(out, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # Qwen2.5-Instruct ships repetition_penalty 1.05: a greedy comparison must not decode it by other rules
    penalised.generation_config.repetition_penalty = 3.0
    penalised.generation_config.no_repeat_ngram_size = 1
    assert ev.generate(penalised, tokenizer, PROMPTS[:1], max_new_tokens=8) == [argmax]
    # settings that ban, bias or force tokens are not the argmax either
    for name, value in (("bad_words_ids", [[out[0]]]), ("suppress_tokens", [out[0]]),
                        ("sequence_bias", {(out[0],): -100.0}), ("forced_eos_token_id", stops[0])):
        fresh = tiny_qwen2(0)
        fresh.load_state_dict(penalised.state_dict())
        setattr(fresh.generation_config, name, value)
        assert ev.generate(fresh, tokenizer, PROMPTS[:1], max_new_tokens=8) == [argmax], name


def test_generate_stops_at_eos_and_keeps_think_tokens(model, tokenizer):
    first = tokenizer(ev.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=1)[0])["input_ids"][0]
    stopper = tiny_qwen2(0)
    stopper.generation_config.eos_token_id = first  # the first greedy token is now an end-of-turn token
    assert ev.generate(stopper, tokenizer, PROMPTS[:1], max_new_tokens=5) == [""]

    thinker = tiny_qwen2(0)
    open_id, close_id = tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # only the two think tokens get non-zero logits
        thinker.lm_head.weight.zero_()
        thinker.lm_head.weight[open_id] = direction
        thinker.lm_head.weight[close_id] = -direction
    out = ev.generate(thinker, tokenizer, PROMPTS[:2], max_new_tokens=4, force_think_open=THINK_OPEN)
    for text in out:
        tokens = text.split()
        assert len(tokens) == 4 and set(tokens) <= {THINK_OPEN, THINK_CLOSE}


def test_generate_sampling_is_seeded(model, tokenizer):
    state = torch.random.get_rng_state()
    kwargs = dict(max_new_tokens=5, do_sample=True, temperature=1.5, top_p=0.95, batch_size=2)
    first = ev.generate(model, tokenizer, PROMPTS, seed=7, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    assert ev.generate(model, tokenizer, PROMPTS, seed=7, **kwargs) == first
    assert ev.generate(model, tokenizer, PROMPTS, seed=8, **kwargs) != first


def test_generate_warns_that_greedy_decoding_drops_sampling_settings(model, tokenizer, caplog):
    greedy = ev.generate(model, tokenizer, PROMPTS, max_new_tokens=5)
    assert ev.generate(model, tokenizer, PROMPTS, max_new_tokens=5, temperature=None, top_p=None) == greedy
    assert "sampling settings" not in caplog.text  # (None: no setting given)
    with caplog.at_level(logging.WARNING, logger="rain_hf.evaluation"):
        assert ev.generate(model, tokenizer, PROMPTS, max_new_tokens=5, temperature=0.6, top_p=0.95) == greedy
    assert "temperature=0.6 and top_p=0.95" in caplog.text and "do_sample=True" in caplog.text


def test_completion_ids():
    assert ev._completion_ids([5, 6, 3, 0, 0], stop_ids=[3], pad_token_id=0) == [5, 6]
    assert ev._completion_ids([5, 6, 0, 0], stop_ids=[3], pad_token_id=0) == [5, 6]
    assert ev._completion_ids([3, 5], stop_ids=[3], pad_token_id=0) == []


# ----------------------------------------------------------------------------------------------------------------
# Calibration overlap
# ----------------------------------------------------------------------------------------------------------------


def test_calibration_overlap():
    calibration = [
        "Write a poem about the sea.",
        "Add 2 and 3",
        "Write a poem about the sea.",
        "List  three  colours!",
    ]
    evaluation = [
        "write a POEM about the sea",
        "Add 2 and 3",
        "Unrelated prompt",
        "list three colours",
        "Add 2 and 3",
    ]
    report = ev.calibration_overlap(calibration, evaluation)
    assert (report.num_calibration, report.num_eval) == (4, 5)
    assert report.exact_indices == [1, 4]
    assert report.normalized_indices == [0, 1, 3, 4]
    assert report.normalized_pairs == [(0, 0), (1, 1), (3, 3), (4, 1)]
    assert (report.exact_matches, report.normalized_matches) == (2, 4)
    assert report.exact_fraction == pytest.approx(0.4) and report.normalized_fraction == pytest.approx(0.8)
    assert "2/5" in report.summary()
    assert ev.normalize_prompt("«Hello», World —  ok…") == "hello world ok"
    assert ev.normalize_prompt("about cats.Do not") == ev.normalize_prompt("about cats. Do not")
    assert ev.calibration_overlap(["Write about cats.Do not use commas."],
                                  ["write about cats. do not use commas"]).normalized_matches == 1
    empty = ev.calibration_overlap(calibration, [])
    assert empty.normalized_fraction == 0.0 and empty.normalized_indices == []
    # symbols, zero-width characters and case folding do not hide a twin
    assert ev.normalize_prompt("use ©2024 ★ $5") == "use 2024 5"
    assert len({ev.normalize_prompt(f"What is 2{op}3?") for op in "+×<="}) == 4  # math symbols tell prompts apart
    # ASCII operators and a minus are punctuation or symbols to Unicode, yet tell maths prompts apart
    assert len({ev.normalize_prompt(f"Compute 12{op}4.") for op in "+*/-^% "}) == 7
    assert ev.normalize_prompt("What is -5 + 3?") != ev.normalize_prompt("What is 5 + 3?")
    assert ev.normalize_prompt("What is 2 - 3?") == "what is 2 - 3" == ev.normalize_prompt("What is 2-3?")
    assert ev.normalize_prompt("Is 2<=3?") == "is 2 <= 3"
    assert ev.normalize_prompt("a well-known fact") == ev.normalize_prompt("a well known fact")
    # a typeset minus or dash between numbers is the hyphen's minus ("12–4" lost its operator)
    assert {ev.normalize_prompt(f"What is 12{op}4?") for op in ("-", "\u2212", "\u2013", "\u2012", " - ")} == {
        "what is 12 - 4"}
    assert ev.normalize_prompt("x \u2212 y") == ev.normalize_prompt("x - y")  # a minus sign reads as the hyphen
    assert ev.normalize_prompt("2\u2212x") == "2 - x" == ev.normalize_prompt("2-x")
    assert ev.normalize_prompt("a \u2013 b") == "a b"
    operators = ev.calibration_overlap(["Compute 12*4."], ["Compute 12/4.", "Compute 12-4.", "Compute 12 * 4"])
    assert operators.normalized_indices == [2]
    assert ev.normalize_prompt("hello\u200bworld") == "helloworld" == ev.normalize_prompt("HELLOWORLD")
    assert ev.normalize_prompt("Straße") == ev.normalize_prompt("STRASSE")
    # a decimal point belongs to its number, a superscript is a power, a vulgar fraction a division
    assert ev.normalize_prompt("Is 3.14 > 3?") != ev.normalize_prompt("Is 3 14 > 3?")
    assert ev.normalize_prompt("Add 1.2 and 3.") != ev.normalize_prompt("Add 1, 2 and 3.")
    assert ev.normalize_prompt("What is 3²?") == ev.normalize_prompt("What is 3^2?") != ev.normalize_prompt("What is 32?")
    assert ev.normalize_prompt("2¹⁰") == "2 ^ 10" and ev.normalize_prompt("½") == ev.normalize_prompt("1/2")
    assert ev.normalize_prompt("x⁻¹") == ev.normalize_prompt("x^-1") != ev.normalize_prompt("x^1")
    assert ev.normalize_prompt("OH⁻ and Na⁺") == ev.normalize_prompt("OH- and Na+")  # a sign alone is a charge
    assert ev.normalize_prompt("³⁄₄ cup") == ev.normalize_prompt("3/4 cup") == ev.normalize_prompt("¾ cup")
    # a comma between digits stays a separator: lists and coordinates match their spaced twins
    assert ev.normalize_prompt("Sort 1,2,3 in order") == ev.normalize_prompt("Sort 1, 2, 3 in order")
    assert ev.normalize_prompt("1,000 apples") == ev.normalize_prompt("1 000 apples")
    with pytest.raises(TypeError, match=r"eval_prompts\[0\] is a list, not a string"):
        ev.calibration_overlap(calibration, [[{"role": "user", "content": "Add 2 and 3"}]])
    with pytest.raises(TypeError, match="calibration_prompts is one string"):
        ev.calibration_overlap("Add 2 and 3", evaluation)
    assert ev.calibration_overlap(iter(calibration), iter(evaluation)).normalized_pairs == report.normalized_pairs


# ----------------------------------------------------------------------------------------------------------------
# evaluate metric module
# ----------------------------------------------------------------------------------------------------------------


def test_metric_path():
    assert os.path.isfile(os.path.join(ev.METRIC_PATH, "rain_ifeval.py"))


def test_evaluate_load_offline(offline):
    """evaluate.load(METRIC_PATH) in a fresh process with the Hub offline, a temp HF_HOME and no network."""
    script = textwrap.dedent(
        """
        import json, socket
        def _no_network(*args, **kwargs):
            raise RuntimeError("network access")
        socket.socket.connect = _no_network
        import nltk
        nltk.download = _no_network
        import evaluate
        from rain_hf.evaluation import METRIC_PATH
        metric = evaluate.load(METRIC_PATH)
        out = metric.compute(
            predictions=[
                "<think>Think, with commas, Capitals.</think>hello world",
                "<think>plan</think>Hello, World",
                "no think block here",
            ],
            prompts=["p1", "p2", "p3"],
            instruction_id_list=[["punctuation:no_comma", "change_case:english_lowercase"]] * 3,
            kwargs=[[{}, {}], [{}, None], ["{}", "null"]],
        )
        ids = [["punctuation:no_comma", "change_case:english_lowercase"]]
        extra = {
            # the template put <think> in the prompt: the generation starts inside the block
            "opened": metric.compute(predictions=["plan, with Commas</think>hello world"], prompts=["p"],
                                     instruction_id_list=ids, prompt_ends_with_open=True),
            "tags": metric.compute(predictions=["<reason>A, B</reason>hello world"], prompts=["p"],
                                   instruction_id_list=ids, think_open="<reason>", think_close="</reason>"),
            "whole": metric.compute(predictions=["<think>think, with commas</think>hello world"], prompts=["p"],
                                    instruction_id_list=ids, split_thinking=False),
        }
        try:
            metric.compute(predictions=["a", "b"], prompts=["p", "q"], instruction_id_list=ids * 2, kwargs=[[{}, {}]])
        except ValueError as exc:
            extra["mismatch"] = str(exc)
        try:
            metric.compute(predictions=["one two"], prompts=["p"], instruction_id_list=[["startend:end_checker"]])
        except ValueError as exc:
            extra["no_kwargs"] = str(exc)
        try:
            metric.compute(predictions=["one two"], prompts=["p"], instruction_id_list=[["startend:end_checker"]],
                           kwargs=[["{'end_phrase': 'two'}"]])
        except ValueError as exc:
            extra["bad_json"] = str(exc)
        end = [["startend:end_checker"]]
        # a row as one JSON list string, as CSV and parquet exports of IFEval store it
        extra["json_row"] = metric.compute(predictions=["<think>a</think>one two"], prompts=["p"],
                                           instruction_id_list=end, kwargs=['[{"end_phrase": "two"}]'])
        metric.compute(predictions=["hello world"], prompts=["p"], instruction_id_list=ids)  # warns: no tag
        import numpy as np  # IFEval read with pandas: each row a numpy array of dicts
        extra["array_row"] = metric.compute(predictions=["<think>a</think>one two"], prompts=["p"],
                                            instruction_id_list=end,
                                            kwargs=[np.array([{"end_phrase": "two"}], dtype=object)])
        for name, rows in (("dict_row", [{"end_phrase": "two"}]), ("none_row", [None]), ("int_item", [["5"]])):
            try:
                metric.compute(predictions=["one two"], prompts=["p"], instruction_id_list=end, kwargs=rows)
            except ValueError as exc:
                extra[name] = str(exc)
        print("RESULT" + json.dumps(out))
        print("EXTRA" + json.dumps(extra))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert out["prompt_strict"] == pytest.approx(2 / 3)
    assert out["instruction_strict"] == pytest.approx(4 / 6)
    assert out["think_format_rate"] == pytest.approx(2 / 3)
    assert set(out) == {
        "prompt_strict",
        "instruction_strict",
        "prompt_loose",
        "instruction_loose",
        "think_format_rate",
    }
    assert os.path.isdir(os.path.join(os.environ["HF_HOME"], "modules"))  # the module cache went to the temp HF_HOME
    line = next(x for x in proc.stdout.splitlines() if x.startswith("EXTRA"))
    extra = json.loads(line[len("EXTRA") :])
    for name in ("opened", "tags"):  # the thinking (commas, capitals) is not scored; the answer passes
        assert extra[name]["think_format_rate"] == 1.0 and extra[name]["prompt_strict"] == 1.0, name
    assert extra["whole"]["prompt_strict"] == 0.0 and extra["whole"]["instruction_strict"] == 0.5
    assert "2 predictions but 1 kwargs lists" in extra["mismatch"]
    assert "startend:end_checker needs the kwargs ['end_phrase']" in extra["no_kwargs"]
    assert extra["bad_json"].startswith("kwargs[0][0] is not valid JSON (Expecting property name enclosed in double")
    assert extra["json_row"]["prompt_strict"] == 1.0 and extra["array_row"]["prompt_strict"] == 1.0
    assert "None of the 1 generations holds <think> or </think>" in proc.stderr
    shape = ": each row of kwargs is a list with one dict (or JSON object string, or None) per instruction id"
    assert extra["dict_row"].startswith("kwargs[0] is a dict" + shape), extra["dict_row"]
    assert extra["none_row"].startswith("kwargs[0] is a NoneType" + shape), extra["none_row"]
    assert extra["int_item"].startswith("kwargs[0][0] is a int (5)" + shape), extra["int_item"]


def test_kl_rows_masked_tokens_add_nothing():
    inf = float("inf")
    log_p = torch.log_softmax(torch.tensor([[0.0, 1.0, -inf], [2.0, -inf, -inf]]), -1)
    log_q = torch.log_softmax(torch.tensor([[1.0, 0.0, -inf], [2.0, 0.0, -inf]]), -1)
    kl = ev.kl_rows(log_p, log_q)
    assert torch.isfinite(kl).all()
    p = log_p[0, :2].exp()
    assert float(kl[0]) == pytest.approx(float((p * (log_p[0, :2] - log_q[0, :2])).sum()))
    assert float(kl[1]) == pytest.approx(-float(log_q[1, 0]))
    # a row with NaN (a merge whose logits are NaN) is NaN, in either place, not a perfect 0
    nan_row = torch.full((1, 3), float("nan"))
    assert torch.isnan(ev.kl_rows(nan_row, log_q[:1])).all() and torch.isnan(ev.kl_rows(log_p[:1], nan_row)).all()
