"""Tests of rain_hf.calibration: loading, rendering, token spans, validation and trace generation (CPU, offline)."""

from __future__ import annotations

import json
import logging
import os
import re
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rain_hf.calibration import (
    CalibrationError,
    CalibrationSample,
    _Malformed,
    check_records,
    check_think_tokens,
    collect_warnings,
    generate_traces,
    load_records,
    locate_annotations,
    merge_spans,
    prepare_instruction_calibration,
    prepare_reasoning_calibration,
    split_generated_ids,
    template_opens_think,
)
from rain_hf.config import RainMergingConfig

SHARED_CALIBRATION = Path(__file__).resolve().parents[1].parent / "shared" / "calibration"

SPECIALS = ["<pad>", "<s>", "</s>", "<think>", "</think>", "<|user|>", "<|assistant|>", "<|end|>"]
PLAIN = (
    "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WITH_BOS = "{{ bos_token }}" + PLAIN
R1_STYLE = (  # like DeepSeek-R1: the generation prompt already opens the thinking
    "{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
WITH_SYSTEM = "{{ bos_token }}System: answer at once. Be brief.\n" + PLAIN

CORPUS = [
    "Write a short poem about the sea. Answer in one line.",
    "Okay, let me think about that. The sea is wide and deep.",
    "The answer is 42. Cats sat on the mat at home.",
    "Reply in lowercase letters only, and end with a dot.",
]

RECORD = {
    "prompt": "Write a short poem about the sea.",
    "reasoning": "Okay, the sea is wide. Let me write one line.",
    "response": "The sea is wide and deep.",
}


def _train_bpe(texts: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A byte-level BPE (every character is representable) trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _wrap(backend: Tokenizer, template: str | None) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    return _train_bpe(CORPUS * 5, 400, SPECIALS)


@pytest.fixture(scope="module")
def make_tok(backend):
    return lambda template=WITH_BOS: _wrap(backend, template)


@pytest.fixture(scope="module")
def tok(make_tok) -> PreTrainedTokenizerFast:
    return make_tok(WITH_BOS)


def _cfg(**kwargs) -> RainMergingConfig:
    return RainMergingConfig(**kwargs)


def _text(tok, sample: CalibrationSample, span: tuple[int, int]) -> str:
    return tok.decode(sample.input_ids[span[0]:span[1]], clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------- rendering and spans
@pytest.mark.parametrize("template", [PLAIN, WITH_BOS, R1_STYLE, WITH_SYSTEM])
def test_spans_decode_back_to_their_text(make_tok, template):
    tok = make_tok(template)
    (sample,) = prepare_reasoning_calibration([RECORD], tok, _cfg())
    open_id, close_id = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    assert sample.input_ids[sample.think_open] == open_id
    assert sample.input_ids[sample.think_close] == close_id
    assert sample.input_ids.count(open_id) == 1  # the R1-style template's own <think> is not doubled
    assert _text(tok, sample, sample.prompt_span) == RECORD["prompt"]
    assert _text(tok, sample, sample.thinking_span).strip() == RECORD["reasoning"]
    assert _text(tok, sample, sample.response_span).strip() == RECORD["response"]
    assert sample.thinking_span == (sample.think_open + 1, sample.think_close)
    assert sample.response_span == (sample.think_close + 1, len(sample.input_ids))
    assert sample.instruction_spans == [sample.prompt_span]
    assert sample.constrained_spans == [sample.response_span]
    assert sample.unrelated_spans == [sample.thinking_span]
    assert sample.index == 0
    rendered = tok.apply_chat_template([{"role": "user", "content": RECORD["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
    assert tok.decode(sample.input_ids).startswith(rendered)


def test_template_opens_think_only_when_the_generation_prompt_ends_with_it(make_tok):
    assert template_opens_think(make_tok(R1_STYLE), _cfg())
    assert not any(template_opens_think(make_tok(t), _cfg()) for t in (PLAIN, WITH_BOS, WITH_SYSTEM))


def test_bos_and_no_bos_give_the_same_spans_relative_to_the_prompt(make_tok):
    (plain,) = prepare_instruction_calibration([RECORD], make_tok(PLAIN), _cfg())
    (bos,) = prepare_instruction_calibration([RECORD], make_tok(WITH_BOS), _cfg())
    assert bos.input_ids[1:] == plain.input_ids
    shift = bos.prompt_span[0] - plain.prompt_span[0]
    assert shift == 1

    def rel(s: CalibrationSample):
        base = s.prompt_span[0]
        moved = lambda sp: (sp[0] - base, sp[1] - base)  # noqa: E731
        return (s.think_open - base, s.think_close - base, moved(s.prompt_span), moved(s.thinking_span),
                moved(s.response_span), [moved(x) for x in s.instruction_spans],
                [moved(x) for x in s.constrained_spans], [moved(x) for x in s.unrelated_spans])

    assert rel(bos) == rel(plain)


def test_short_ambiguous_annotations_stay_in_their_segment(make_tok):
    tok = make_tok(WITH_SYSTEM)  # the template itself contains "at" and "." before the prompt
    record = {
        "prompt": "Reply in one line. End at noon.",
        "reason": "Okay. A cat sat at the mat. That is it.",
        "response": "Cats sat. The first part at home.",
        "related_prompt_list": [
            {"prompt_spans": ["at", "."], "response_spans": ["."], "unrelated_response_spans": []},
        ],
        "unrelated_response_spans": ["The first part", "at"],
    }
    (s,) = prepare_instruction_calibration([record], tok, _cfg())
    p0, p1 = s.prompt_span
    assert all(p0 <= a < b <= p1 for a, b in s.instruction_spans)
    # "at" of "End at noon", then the "." searched forward from it (the final one, not the one of "line.")
    assert [_text(tok, s, sp).strip() for sp in s.instruction_spans] == ["at", "."]
    assert s.instruction_spans[1][1] == p1
    r0, r1 = s.response_span
    assert all(r0 <= a < b <= r1 for a, b in s.constrained_spans)
    assert [_text(tok, s, sp).strip() for sp in s.constrained_spans] == ["."]
    assert _text(tok, s, (r0, s.constrained_spans[0][1])).strip() == "Cats sat."
    # U = thinking + "The first part" + the "at" right after it (not the "at" of "Cats"/"sat")
    assert s.unrelated_spans[0] == s.thinking_span
    assert len(s.unrelated_spans) == 2
    assert _text(tok, s, s.unrelated_spans[1]).strip() == "The first part at"


def test_annotations_forward_search_and_offsets():
    spans, missing = locate_annotations("a cat sat at the mat", [["sat", "at"], ["mat", "at"], [[2, 5], "zzz"]])
    assert spans == [(6, 9), (10, 12), (17, 20), (18, 20), (2, 5)]  # "at" after "sat"; nested "at" in "mat"
    assert missing == ["'zzz'"]
    text = "skills as a [Sales Associate] at [Company]. Eager"
    spans, _ = locate_annotations(text, [["skills as a", "at", ". Eager"]])
    assert [text[a:b] for a, b in spans] == ["skills as a", "at", ". Eager"] and spans[1][0] == text.index(" at ") + 1
    # forward first, for an annotation with edge whitespace too ("at " is the "at" after "look", not in "Sit at")
    spans, _ = locate_annotations("Sit at home. Then look at.", [["Then look", "at "]])
    assert spans == [(13, 22), (23, 25)]
    spans, _ = locate_annotations("the ink, the links", [["links", "ink"], ["ink"]])
    assert spans == [(13, 18), (14, 17), (4, 7)]
    assert merge_spans([(5, 7), (1, 3), (2, 4), (7, 9), (10, 10)]) == [(1, 4), (5, 9)]
    # whitespace at an annotation's ends is not part of it (a trailing space would take the next word's token)
    spans, missing = locate_annotations("max has pears. the answer", [["max has pears. "], [[3, 8], [14, 15]]])
    assert spans == [(0, 14), (4, 7)] and missing == ["offsets [14, 15] cover only whitespace"]


def test_a_trailing_space_does_not_pull_the_next_word_into_an_annotation(tok):
    record = {"prompt": "Write the answer in lowercase. Max has pears.", "reason": "ok.",
              "response": "max has pears. the answer is three.",
              "instruction_spans": ["Write the answer in lowercase. "], "response_spans": ["the answer is three."],
              "unrelated_response_spans": ["max has pears. "]}
    (s,) = prepare_instruction_calibration([record], tok, _cfg())
    tokens = {kind: {t for a, b in spans for t in range(a, b)}
              for kind, spans in (("I", s.instruction_spans), ("R", s.constrained_spans), ("U", s.unrelated_spans))}
    assert not tokens["R"] & tokens["U"]
    assert tok.decode([s.input_ids[t] for t in sorted(tokens["I"])]).strip() == "Write the answer in lowercase."


def test_missing_annotation_is_logged_not_fatal(tok, caplog):
    record = dict(RECORD, instruction_spans=["no such text", "poem"], response_spans=["absent"])
    with caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):
        (s,) = prepare_instruction_calibration([record], tok, _cfg())
    assert "not found" in caplog.text and "no such text" in caplog.text and "absent" in caplog.text
    assert [_text(tok, s, sp).strip() for sp in s.instruction_spans] == ["poem"]
    assert s.constrained_spans == [s.response_span]


def test_special_tokens_inside_the_text(tok):
    record = {"prompt": "Say <|end|> then <s> twice.", "reasoning": "Hmm <|user|> odd.", "response": "Done <|end|>."}
    (s,) = prepare_instruction_calibration([record], tok, _cfg())
    assert _text(tok, s, s.prompt_span) == record["prompt"]
    assert _text(tok, s, s.response_span).strip() == record["response"]
    assert s.input_ids[s.think_close] == tok.convert_tokens_to_ids("</think>")


def test_a_template_that_renders_the_date_survives_midnight(tok, monkeypatch):
    # Llama 3.2-style templates put today's date in a default system prompt: a run crossing midnight renders the
    # later records with another date than the split around the user message that was made first
    original = tok.apply_chat_template
    calls = {"n": 0}

    def dated(*args, **kwargs):
        calls["n"] += 1
        return f"Today: day {1 if calls['n'] <= 3 else 2}. " + original(*args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", dated)
    samples = prepare_reasoning_calibration([RECORD] * 4, tok, _cfg(on_malformed="error"))
    assert len(samples) == 4
    for s in samples:
        assert _text(tok, s, s.prompt_span) == RECORD["prompt"]
    assert "day 1" in tok.decode(samples[0].input_ids) and "day 2" in tok.decode(samples[-1].input_ids)


def test_messages_records(tok):
    records = [
        {"messages": [{"role": "user", "content": RECORD["prompt"]},
                      {"role": "assistant", "content": f"<think>\n{RECORD['reasoning']}\n</think>\n\n{RECORD['response']}"}]},
        {"messages": [{"role": "user", "content": RECORD["prompt"]},
                      {"role": "assistant", "content": RECORD["response"], "reasoning_content": RECORD["reasoning"]}]},
    ]
    a, b = prepare_reasoning_calibration(records, tok, _cfg())
    assert a.input_ids == b.input_ids
    assert _text(tok, a, a.thinking_span).strip() == RECORD["reasoning"]


def test_think_positions(tok):
    (s,) = prepare_reasoning_calibration([RECORD], tok, _cfg())
    o, c, n = s.think_open, s.think_close, len(s.input_ids)
    assert s.think_positions("think") == [o, c]
    assert s.think_positions("think+prev") == [o - 1, o, c - 1, c]
    assert s.think_positions("window", 2) == sorted({*range(o - 2, o + 3), *range(c - 2, min(c + 3, n))})
    assert s.think_positions("window", 1000) == list(range(n))
    with pytest.raises(ValueError, match="think\\+prev"):
        s.think_positions("bogus")


# ----------------------------------------------------------------------------------------------------- validation
def test_think_token_that_is_not_one_token_is_refused(backend):
    no_think = _train_bpe(CORPUS * 5, 400, [t for t in SPECIALS if "think" not in t])
    with pytest.raises(CalibrationError, match=r"'<think>' is not a single token.*config\.think_open.*check the "
                                                r"order of the models: base_model, reasoning_model, instruct_model"):
        prepare_reasoning_calibration([RECORD], _wrap(no_think, WITH_BOS), _cfg())
    with pytest.raises(CalibrationError, match=r"'<reason>' is not a single token.*config\.think_open"):
        check_think_tokens(_wrap(backend, WITH_BOS), _cfg(think_open="<reason>"))
    assert check_think_tokens(_wrap(backend, WITH_BOS), _cfg()) == (3, 4)


def test_slow_tokenizer_and_missing_template_are_refused(make_tok):
    with pytest.raises(CalibrationError, match="fast tokenizer"):
        prepare_reasoning_calibration([RECORD], types.SimpleNamespace(is_fast=False), _cfg())
    with pytest.raises(CalibrationError, match="no chat template"):
        prepare_reasoning_calibration([RECORD], make_tok(None), _cfg())
    upper = PLAIN.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    with pytest.raises(CalibrationError, match="verbatim"):
        prepare_reasoning_calibration([RECORD], make_tok(upper), _cfg())
    bang = PLAIN.replace("{{ m['content'] }}", "{{ m['content'] | replace('!', '.') }}")
    with pytest.raises(CalibrationError, match="index 1: the chat template does not render this prompt verbatim"):
        prepare_reasoning_calibration([RECORD, dict(RECORD, prompt="Hi!")], make_tok(bang), _cfg(on_malformed="error"))


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "Hi", "reasoning": "Hmm."}, "field 'response' is missing"),
        ({"prompt": 3, "reasoning": "Hmm.", "response": "Ok."}, "field 'prompt' is a int, not a string"),
        ({"prompt": "Hi", "reasoning": "  ", "response": "Ok."}, "field 'reasoning' / 'reason' is empty, and field "
                                                                 "'response' holds no '</think>'"),
        ({"prompt": "Hi", "reasoning": "a </think> b", "response": "Ok."}, "contains the think token '</think>'"),
        ({"prompt": "Hi", "reasoning": "Hmm.", "response": "<think>Ok."}, "contains the think token '<think>'"),
        ({"prompt": "Hi", "reasoning": "Hmm " * 40, "response": "Ok."}, "config.max_length=30"),
        (dict(RECORD, related_prompt_list="oops"), "'related_prompt_list' must be a list"),
        # a chat record names its own fields
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None,
                                                            "reasoning_content": "Hmm."}]},
         "'messages[1].content' is missing"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok.",
                                                            "reasoning_content": " "}]},
         "'messages[1].reasoning_content' is empty"),
        # another dataset's layout: the error says which fields a record is read from
        ({"conversations": [{"from": "human", "value": "Hi"}]}, "field 'prompt' is missing (the record's fields: "
         "['conversations']); a record holds 'prompt' with 'reasoning' and 'response'"),
    ],
)
def test_malformed_sample_is_refused_with_index_and_reason(tok, record, reason):
    short = {"prompt": "Hi", "reasoning": "Hmm.", "response": "Ok."}
    with pytest.raises(CalibrationError, match="at index 1") as err:
        prepare_instruction_calibration([short, record], tok, _cfg(on_malformed="error", max_length=30))
    assert reason in str(err.value)


def test_skip_versus_error(tok, caplog):
    records = [RECORD, {"prompt": "Hi", "reasoning": "Hmm."}, RECORD]
    with caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):
        samples = prepare_reasoning_calibration(records, tok, _cfg(on_malformed="skip"))
    assert [s.index for s in samples] == [0, 2]
    assert "sample at index 1" in caplog.text and "'response' is missing" in caplog.text
    with pytest.raises(CalibrationError, match="index 1: field 'response' is missing"):
        prepare_reasoning_calibration(records, tok, _cfg(on_malformed="error"))


def test_a_file_of_malformed_samples_does_not_flood_the_log(tok, caplog):
    records = [RECORD] + [{"prompt": "Hi", "reasoning": "Hmm."}] * 3 + [{"reasoning": "Hmm.", "response": "Ok."}] * 37
    with caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):
        assert len(prepare_reasoning_calibration(records, tok, _cfg(on_malformed="skip"))) == 1
    assert caplog.text.count("Skipping malformed reasoning calibration sample at") == 5
    assert ("Skipped 40 malformed reasoning calibration samples in all: 3 × field 'response' is missing; 37 × field "
            "'prompt' is missing") in caplog.text  # counted, in the order first met
    # reasons that differ in their numbers only are one kind, shown by the sample that needs the most
    too_long = [dict(RECORD, reasoning="Hmm. " * n) for n in (40, 60, 50, 45, 55, 48)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):
        assert len(prepare_reasoning_calibration([RECORD] + too_long, tok, _cfg(max_length=60))) == 1
    summary = caplog.text[caplog.text.index("Skipped 6 malformed"):]
    need = max(int(n) for n in re.findall(r"raise max_length to at least (\d+)", caplog.text))
    assert summary.startswith("Skipped 6 malformed reasoning calibration samples in all: 6 × the rendered sample has")
    assert f"raise max_length to at least {need} or shorten the prompt/reasoning (the most any of the 6 asks; " \
           "the others differ only in their numbers)." in summary


def test_sample_limits_take_the_first_usable(tok):
    records = [RECORD, {"prompt": "x", "reasoning": "Hmm."}, RECORD, RECORD, RECORD]
    samples = prepare_reasoning_calibration(records, tok, _cfg(max_reasoning_samples=2))
    assert [s.index for s in samples] == [0, 2]
    samples = prepare_instruction_calibration(records, tok, _cfg(lam=1.0, max_instruction_samples=3, max_reasoning_samples=1))
    assert [s.index for s in samples] == [0, 2, 3]


def test_empty_sets_are_refused(tok, tmp_path):
    bad = [{"prompt": "Hi", "reasoning": "Hmm."}, {"prompt": "Hi", "reasoning": "Hmm.", "response": 5}]
    with pytest.raises(CalibrationError, match=r"no usable reasoning calibration samples: 2 malformed, first reasons: "
                                               r"index 0: field 'response' is missing; index 1: field 'response' is a "
                                               r"int"):
        prepare_reasoning_calibration(bad, tok, _cfg())
    with pytest.raises(CalibrationError, match=r"6 malformed, first reasons: index 0, index 2, index 3 and 2 more: "
                                               r"field 'response' is missing; index 1: field 'response' is a int, not a "
                                               r"string$"):
        prepare_reasoning_calibration([bad[0], bad[1]] + [bad[0]] * 4, tok, _cfg())
    # from a file, the summary gives the lines, as the per-record messages do (blank lines are skipped)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(bad[0]) + "\n\n" + json.dumps(bad[1]) + "\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"first reasons: index 0 \(.*bad.jsonl line 1\): field 'response' "
                                               r"is missing; index 1 \(.*bad.jsonl line 3\): field 'response' is a int"):
        prepare_reasoning_calibration(str(path), tok, _cfg())
    with pytest.raises(CalibrationError, match="empty"):
        prepare_reasoning_calibration([], tok, _cfg())


def test_long_sample_is_cut_when_the_think_close_survives(tok):
    record = dict(RECORD, response="The sea is wide and deep. " * 20, response_spans=["deep"] * 20)
    (full,) = prepare_instruction_calibration([record], tok, _cfg())
    limit = full.think_close + 4
    (cut,) = prepare_instruction_calibration([record], tok, _cfg(max_length=limit))
    assert len(cut.input_ids) == limit and cut.input_ids == full.input_ids[:limit]
    assert cut.response_span == (full.think_close + 1, limit)
    assert all(b <= limit for a, b in cut.constrained_spans)
    assert cut.think_positions("window", 5)[-1] == limit - 1


# -------------------------------------------------------------------------------------------------------- loading
def test_load_records_from_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([RECORD, RECORD]))
    (tmp_path / "a.jsonl").write_text(json.dumps(RECORD) + "\n\n" + json.dumps(RECORD) + "\n")
    assert load_records(tmp_path / "a.json") == [RECORD, RECORD]
    assert load_records(str(tmp_path / "a.jsonl")) == [RECORD, RECORD]
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORD) + "\n" + json.dumps(RECORD) + "\n{oops\n")
    with pytest.raises(CalibrationError, match="line 3 is not valid JSON"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(CalibrationError, match="does not exist"):
        load_records(tmp_path / "missing.json")
    (tmp_path / "a.csv").write_text("prompt\n")
    with pytest.raises(CalibrationError, match=r"extension '\.csv'.*\.jsonl"):
        load_records(tmp_path / "a.csv")
    with pytest.raises(CalibrationError, match="is a folder"):
        load_records(tmp_path)
    (tmp_path / "dict.json").write_text(json.dumps({"data": [RECORD]}))
    with pytest.raises(CalibrationError, match="must hold a list"):
        load_records(tmp_path / "dict.json")
    with pytest.raises(CalibrationError, match="record 1 is a str"):
        load_records([RECORD, "text"])
    (tmp_path / "int.json").write_text(json.dumps([RECORD, 5]))
    with pytest.raises(CalibrationError, match=r"int\.json: Calibration record 1 is a int"):
        load_records(tmp_path / "int.json")
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps(RECORD) + "\n", encoding="utf-8")
    (tmp_path / "bom.json").write_text("\ufeff" + json.dumps([RECORD]), encoding="utf-8")
    assert load_records(tmp_path / "bom.jsonl") == load_records(tmp_path / "bom.json") == [RECORD]
    both = (tmp_path / "bom.jsonl").read_bytes() * 2  # `cat a.jsonl b.jsonl`: a byte-order mark opens line 2 too
    (tmp_path / "cat.jsonl").write_bytes(both)
    assert load_records(tmp_path / "cat.jsonl") == [RECORD, RECORD]
    with pytest.raises(CalibrationError, match="Unsupported calibration data"):
        load_records(42)


def test_errors_about_a_record_name_its_file_and_line(tok, tmp_path):
    short = {"prompt": "Hi", "reasoning": "Hmm."}
    (tmp_path / "r.jsonl").write_text(json.dumps(RECORD) + "\n\n\n" + json.dumps(short) + "\n")
    with pytest.raises(CalibrationError, match=r"at index 1 \(.*r\.jsonl line 4\): field 'response' is missing"):
        prepare_reasoning_calibration(tmp_path / "r.jsonl", tok, _cfg(on_malformed="error"))
    (tmp_path / "r.json").write_text(json.dumps([RECORD, short]))
    with pytest.raises(CalibrationError, match=r"at index 1 \(.*r\.json record 1\)"):
        prepare_reasoning_calibration(tmp_path / "r.json", tok, _cfg(on_malformed="error"))
    with pytest.raises(CalibrationError, match=r"at index 1: field 'response'"):
        prepare_reasoning_calibration([RECORD, short], tok, _cfg(on_malformed="error"))


def test_offset_annotations_count_characters_of_the_field_as_given(tok):
    record = {"prompt": "  Tell me about apples. Write in lowercase.", "reasoning": "ok",
              "response": "  apples are good.", "instruction_spans": [[24, 43]], "response_spans": [[2, 8]]}
    (s,) = prepare_instruction_calibration([record], tok, _cfg(on_malformed="error"))
    assert [_text(tok, s, sp).strip() for sp in s.instruction_spans] == ["Write in lowercase."]
    assert [_text(tok, s, sp).strip() for sp in s.constrained_spans] == ["apples"]


def test_offsets_may_take_in_the_whitespace_stripped_off_a_field(tok, caplog):
    prompt = "Tell me about apples. Write in lowercase.\n"
    response = "<think>ok</think>\n\napples are good.\n"
    record = {"prompt": prompt, "response": response,
              "instruction_spans": [[prompt.index("Write"), len(prompt)]],
              "response_spans": [[response.index("</think>") + 8, response.index(" are")], [0, 9]]}
    with caplog.at_level(logging.WARNING, logger="rain_hf"):
        (s,) = prepare_instruction_calibration([record], tok, _cfg())
    assert [_text(tok, s, sp).strip() for sp in s.instruction_spans] == ["Write in lowercase."]
    assert [_text(tok, s, sp).strip() for sp in s.constrained_spans] == ["apples"]
    # the warning quotes the offsets the record gave: [0, 9] is the think block, not the answer
    assert ("response offsets [0, 9] outside the segment of 16 characters (it starts at character 19 of the "
            "field, edge whitespace stripped)") in caplog.text
    record = dict(record, instruction_spans=[[len(prompt) - 1, len(prompt)]], response_spans=[])
    with caplog.at_level(logging.WARNING, logger="rain_hf"):
        prepare_instruction_calibration([record], tok, _cfg())
    assert f"prompt offsets [{len(prompt) - 1}, {len(prompt)}] cover only whitespace" in caplog.text
    caplog.clear()  # in a field without edge whitespace, neither is said
    record = {"prompt": "Tell me about apples.", "reasoning": "ok", "response": "apples are good.",
              "instruction_spans": [[5, 5], [0, 500]]}
    with caplog.at_level(logging.WARNING, logger="rain_hf"):
        prepare_instruction_calibration([record], tok, _cfg())
    assert "prompt offsets [5, 5] are empty or reversed (write [start, end) with start < end); prompt offsets " \
           "[0, 500] outside the segment of 21 characters" in caplog.text


def test_dataset_input(tok):
    import datasets

    records = [RECORD, dict(RECORD, prompt="Reply in lowercase letters only.")]
    ds = datasets.Dataset.from_list(records)
    assert load_records(ds) == records
    from_ds = prepare_reasoning_calibration(ds, tok, _cfg())
    from_list = prepare_reasoning_calibration(records, tok, _cfg())
    assert [s.input_ids for s in from_ds] == [s.input_ids for s in from_list]
    with pytest.raises(CalibrationError, match="DatasetDict"):
        load_records(datasets.DatasetDict({"train": ds}))


# ----------------------------------------------------------------------------------------------------- generation
def test_prompt_only_without_model_is_refused(tok):
    with pytest.raises(CalibrationError, match=r"1 of 2 .*only a prompt.*'reasoning' and 'response'.*model="):
        prepare_instruction_calibration([RECORD, {"prompt": "Hi"}], tok, _cfg())


def test_split_generation(tok):
    o, c, eos, pad = (tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "</s>", "<pad>"))
    words = tok.encode("Hmm ok", add_special_tokens=False)
    answer = tok.encode("The answer", add_special_tokens=False)
    assert split_generated_ids(words + [c] + answer + [eos, pad], tok, o, c, {eos, pad}) == ("Hmm ok", "The answer")
    cases = [
        (words + answer, r"never closes its thinking \(it may have run out"),
        (words + [eos] + [c] + answer, "never closes its thinking"),
        (words + [c] + words + [c] + answer, "closes its thinking 2 times"),
        ([o] + words + [c] + answer, "second think block"),
        ([c] + answer + [eos], "empty thinking"),
        (words + [c, eos], "no answer"),
    ]
    for ids, reason in cases:
        with pytest.raises(_Malformed, match=reason):
            split_generated_ids(ids, tok, o, c, {eos, pad})


def _chain_model(tok, successor: dict[int, int]) -> Qwen2ForCausalLM:
    """A tiny random Qwen2 whose greedy next token is ``successor[last token]``.

    The attention and MLP outputs are zeroed, so the residual stream is the last token's embedding; those
    embeddings are orthonormal for the chain tokens and the lm_head maps each one to its successor.
    """
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    basis = torch.eye(config.hidden_size)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (current, nxt) in enumerate(successor.items()):
            model.model.embed_tokens.weight[current] = basis[k]
            model.lm_head.weight[nxt] += 10.0 * basis[k]
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


@pytest.fixture(scope="module")
def chain_ids(tok):
    last = tok.encode("\n", add_special_tokens=False)[-1]  # the prompt ends with "<think>\n"
    a, b, c, d = tok.convert_tokens_to_ids(["o", "k", "y", "s"])
    ids = dict(last=last, a=a, b=b, c=c, d=d, close=tok.convert_tokens_to_ids("</think>"), eos=tok.eos_token_id)
    assert len(set(ids.values())) == len(ids)
    return ids


@pytest.mark.parametrize("do_sample", [False, True])
def test_prompt_only_records_are_generated(tok, chain_ids, do_sample):
    i = chain_ids
    model = _chain_model(tok, {i["last"]: i["a"], i["a"]: i["b"], i["b"]: i["close"], i["close"]: i["c"],
                               i["c"]: i["d"], i["d"]: i["eos"]})
    cfg = _cfg(max_new_tokens=12, batch_size=2, do_sample=do_sample)
    records = [{"prompt": "Hi"}, RECORD, {"prompt": "Write a short poem about the sea, please."},
               {"messages": [{"role": "user", "content": "Hi"}]}]
    traces = generate_traces(records, model, tok, cfg)
    assert traces[1] == RECORD
    for t in (traces[0], traces[2], traces[3]):
        assert (t["reasoning"], t["response"]) == ("ok", "ys") and "generation_error" not in t
    assert generate_traces(traces, model, tok, cfg) == traces  # nothing left to generate
    samples = prepare_reasoning_calibration(records, tok, _cfg(on_malformed="error", max_new_tokens=12,
                                                               batch_size=2, do_sample=do_sample), model=model)
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert samples[3].input_ids == samples[0].input_ids
    assert _text(tok, samples[0], samples[0].thinking_span).strip() == "ok"
    assert _text(tok, samples[2], samples[2].response_span).strip() == "ys"
    assert _text(tok, samples[2], samples[2].prompt_span) == records[2]["prompt"]


def test_sampled_traces_follow_the_seed(tok, chain_ids):
    model = _forked_chain_model(tok, chain_ids)  # after "o", another "o" is as likely as "k"
    records = [{"prompt": f"Question {n}?"} for n in range(8)]

    def reasonings(**settings) -> list:
        cfg = _cfg(max_new_tokens=12, batch_size=4, **settings)
        return [t.get("reasoning") for t in generate_traces(records, model, tok, cfg)]

    assert len(set(reasonings())) == 1  # greedy: one path for every prompt
    first = reasonings(do_sample=True, seed=0)
    assert len(set(first)) > 1 and reasonings(do_sample=True, seed=0) == first
    assert reasonings(do_sample=True, seed=1) != first


def _forked_chain_model(tok, chain_ids):
    """The chain model of the traces above, with a fork after "o" that only sampling takes both ways."""
    i = chain_ids
    successor = {i["last"]: i["a"], i["a"]: i["b"], i["b"]: i["close"], i["close"]: i["c"], i["c"]: i["d"],
                 i["d"]: i["eos"]}
    model = _chain_model(tok, successor)
    with torch.no_grad():
        model.lm_head.weight[i["a"]] += 10.0 * torch.eye(32)[list(successor).index(i["a"])]
    return model


def test_generated_traces_are_the_same_from_the_merge_and_leave_the_random_state_alone(tok, chain_ids):
    model = _forked_chain_model(tok, chain_ids)
    records = [{"prompt": "Q1?"}, RECORD, {"prompt": "Q2?"}, {"prompt": "Q3?"}, RECORD, {"prompt": "Q4?"},
               {"prompt": "Q5?"}]
    cfg = _cfg(max_new_tokens=12, batch_size=2, do_sample=True, seed=3)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    traces = generate_traces(records, model, tok, cfg)
    # the merge completes prompt-only records in the same batches as generate_traces: the same sampled traces
    by_merge = prepare_reasoning_calibration(records, tok, cfg, model=model)
    prepare_reasoning_calibration(records, tok, _cfg(max_new_tokens=12, batch_size=2), model=model)  # greedy
    assert torch.equal(torch.rand(4), expected)  # the caller's stream goes on where it was
    assert len({traces[k].get("reasoning") for k in (0, 2, 3, 5, 6)}) > 1  # it did sample
    assert [s.input_ids for s in by_merge] == [s.input_ids for s in prepare_reasoning_calibration(traces, tok, cfg)]


@pytest.mark.parametrize("setting", [{"no_repeat_ngram_size": 1}, {"num_beams": 2, "num_return_sequences": 2},
                                     {"return_dict_in_generate": True}])
def test_greedy_traces_ignore_the_models_own_decoding_rules(tok, chain_ids, setting):
    i = chain_ids
    model = _chain_model(tok, {i["last"]: i["a"], i["a"]: i["b"], i["b"]: i["close"], i["close"]: i["c"],
                               i["c"]: i["d"], i["d"]: i["eos"]})
    for name, value in setting.items():
        setattr(model.generation_config, name, value)
    traces = generate_traces([{"prompt": "Hi"}, {"prompt": "Hello there"}], model, tok,
                             _cfg(max_new_tokens=12, batch_size=2))
    assert [(t.get("reasoning"), t.get("response")) for t in traces] == [("ok", "ys")] * 2


def test_generation_stops_at_the_tokenizers_end_and_says_when_an_answer_is_cut(tok, chain_ids, caplog):
    i = chain_ids
    model = _chain_model(tok, {i["last"]: i["a"], i["a"]: i["b"], i["b"]: i["close"], i["close"]: i["c"],
                               i["c"]: i["d"], i["d"]: i["eos"]})
    model.generation_config.eos_token_id = i["c"] + 1  # an end-of-turn id the model never writes
    (trace,) = generate_traces([{"prompt": "Hi"}], model, tok, _cfg(max_new_tokens=40))
    assert trace["generation"].endswith(tok.eos_token) and "generation_cut" not in trace  # not 40 tokens on
    looping = _chain_model(tok, {i["last"]: i["a"], i["a"]: i["b"], i["b"]: i["close"], i["close"]: i["c"],
                                 i["c"]: i["d"], i["d"]: i["c"]})
    with caplog.at_level("WARNING", logger="rain_hf.calibration"):
        (sample,) = prepare_reasoning_calibration([{"prompt": "Hi"}], tok, _cfg(max_new_tokens=8), model=looping)
    assert _text(tok, sample, sample.response_span).strip() == "ysysy"  # kept, cut short
    assert "1 of 1 generated reasoning answers ran out of max_new_tokens=8" in caplog.text


def test_generation_without_think_block_is_malformed(tok, chain_ids):
    i = chain_ids
    model = _chain_model(tok, {i["last"]: i["a"], i["a"]: i["b"], i["b"]: i["a"]})  # never closes
    cfg = _cfg(max_new_tokens=6, batch_size=4)
    traces = generate_traces([{"prompt": "Hi"}], model, tok, cfg)
    assert "never closes" in traces[0]["generation_error"] and "reasoning" not in traces[0]
    with pytest.raises(CalibrationError, match=r"no usable reasoning .*1 malformed.*index 0: generated trace .*never closes"):
        prepare_reasoning_calibration([{"prompt": "Hi"}], tok, cfg, model=model)
    with pytest.raises(CalibrationError, match="index 0: generated trace"):
        prepare_reasoning_calibration([{"prompt": "Hi"}], tok, _cfg(on_malformed="error", max_new_tokens=6), model=model)


# ------------------------------------------------------------------------------------------ the paper's public sets
def test_public_calibration_sets(caplog):
    if not SHARED_CALIBRATION.is_dir():
        # CI runs beside ../shared, and .ci/run says so: there a missing folder is a failure, not a skip
        if os.environ.get("RAIN_HF_REQUIRE_SHARED"):
            pytest.fail(f"{SHARED_CALIBRATION} is missing and RAIN_HF_REQUIRE_SHARED is set.")
        pytest.skip("../shared/calibration/ is not available")
    reasoning_path = SHARED_CALIBRATION / "reasoning_calibration_set.json"
    instruction_path = SHARED_CALIBRATION / "instruction_calibration_set.jsonl"
    reasoning_records = load_records(reasoning_path)
    instruction_records = load_records(instruction_path)
    texts = [r[k] for r in reasoning_records[::10] + instruction_records[::10] for k in ("prompt", "response")]
    tok = _wrap(_train_bpe(texts, 1000, SPECIALS), WITH_BOS)
    cfg = _cfg(max_length=1_000_000)
    with caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):
        reasoning = prepare_reasoning_calibration(reasoning_path, tok, cfg)
        instruction = prepare_instruction_calibration(instruction_path, tok, cfg)
    assert [s.index for s in reasoning] == list(range(150))
    assert [s.index for s in instruction] == list(range(365))
    assert "not found" not in caplog.text and "Skipping" not in caplog.text

    for sample, record in zip(instruction, instruction_records):
        groups = [
            (sample.instruction_spans, [s for rp in record["related_prompt_list"] for s in rp["prompt_spans"]]),
            (sample.constrained_spans, [s for rp in record["related_prompt_list"] for s in rp["response_spans"]]),
            (sample.unrelated_spans, record["unrelated_response_spans"]),
        ]
        for spans, strings in groups:
            decoded = [_text(tok, sample, span) for span in spans]
            for string in strings:
                assert any(string.strip() in d for d in decoded), (sample.index, string)
        p0, p1 = sample.prompt_span
        assert all(p0 <= a < b <= p1 for a, b in sample.instruction_spans)
        assert all(sample.response_span[0] <= a for a, _ in sample.constrained_spans)


def test_think_spacing_sets_the_layout_of_rendered_samples():
    from rain_hf.testing import build_tokenizer

    tok = build_tokenizer()
    rec = [{"prompt": "Max has 3 apples.", "reasoning": "3 + 0 = 3.", "response": "The answer is 3."}]
    r1 = prepare_reasoning_calibration(rec, tok, RainMergingConfig())[0]
    compact = prepare_reasoning_calibration(rec, tok, RainMergingConfig(think_spacing=["", "", ""]))[0]
    assert tok.decode(r1.input_ids).endswith("<think>\n3 + 0 = 3.\n</think>\n\nThe answer is 3.")
    assert tok.decode(compact.input_ids).endswith("<think>3 + 0 = 3.</think>The answer is 3.")
    assert len(compact.input_ids) < len(r1.input_ids)


def test_window_before_answer_leaves_the_answer_positions_free():
    from rain_hf.testing import build_tokenizer

    tok = build_tokenizer()
    rec = [{"prompt": "Max has 3 apples.", "reasoning": "3 + 0 = 3 so the answer is 3.", "response": "The answer is 3."}]
    s = prepare_reasoning_calibration(rec, tok, RainMergingConfig())[0]
    full = s.think_positions("window", 2)
    pre = s.think_positions("window-before-answer", 2)
    assert max(pre) == s.think_close and set(pre) <= set(full)
    assert set(full) - set(pre) == {s.think_close + 1, s.think_close + 2}
    assert s.think_open - 2 in pre and s.think_open + 2 in pre


# ------------------------------------------------------------------------------------------ reviewed edge cases
def test_reasoning_inside_the_response_is_split(tok):
    embedded = {"prompt": RECORD["prompt"],
                "response": f"<think>\n{RECORD['reasoning']}\n</think>\n\n{RECORD['response']}"}
    assert check_records([embedded]) == 1
    (reference,) = prepare_reasoning_calibration([RECORD], tok, _cfg())
    (split,) = prepare_reasoning_calibration([embedded], tok, _cfg(on_malformed="error"))
    (instruction,) = prepare_instruction_calibration([embedded], tok, _cfg(on_malformed="error"))
    assert split.input_ids == instruction.input_ids == reference.input_ids
    assert instruction.constrained_spans == [instruction.response_span]
    # [start, end] offsets into such a response count from the field's start, think block included
    response = "<think>ok</think>  apples are good."
    record = {"prompt": "Tell me about apples.", "response": response,
              "response_spans": [[response.index("apples"), response.index(" are")]]}
    (s,) = prepare_instruction_calibration([record], tok, _cfg(on_malformed="error"))
    assert [_text(tok, s, sp).strip() for sp in s.constrained_spans] == ["apples"]
    # in a chat answer they count from the text after </think>, as they always have
    chat = {"messages": [{"role": "user", "content": "Tell me about apples."},
                         {"role": "assistant", "content": response}],
            "response_spans": [[2, 8]]}
    (c,) = prepare_instruction_calibration([chat], tok, _cfg(on_malformed="error"))
    assert [_text(tok, c, sp).strip() for sp in c.constrained_spans] == ["apples"]
    cases = [
        ({"prompt": "Hi", "response": "<think>Hmm. Ok."},
         r"'response' holds think tags but cannot be split .*\(found 0\).*as 'reasoning'"),
        ({"prompt": "Hi", "response": "a</think>b</think>c"}, "cannot be split .*exactly one '</think>' .*found 2"),
        ({"prompt": "Hi", "response": "<think></think>Ok."}, "the thinking in 'response' is empty"),
        ({"prompt": "Hi", "response": "Sure.\n<think>Hmm.</think>Ok."},
         r"'response' has text before '<think>' \('Sure.'\): the think block comes first"),
        ({"prompt": "Hi", "response": "Ok."}, "field 'reasoning' / 'reason' is missing, and field 'response' holds "
                                              "no '</think>' .*or leave the answer out"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ok."}]},
         r"field 'messages\[1\].content' holds no '</think>' to split the thinking off: write it as "
         "'<think>thinking</think>answer', or leave the answer out"),
    ]
    for bad, reason in cases:
        with pytest.raises(CalibrationError, match=reason):
            prepare_reasoning_calibration([bad], tok, _cfg(on_malformed="error"))


def test_one_set_hashes_alike_from_a_file_and_from_a_dataset(tok, tmp_path):
    import datasets

    records = [{"prompt": "Reply in one line. End at noon.", "reason": "Okay. That is it.", "response": "Cats sat.",
                "related_prompt_list": [{"prompt_spans": ["noon"], "response_spans": ["."]}]},
               {"prompt": "Say it twice.", "reason": "Fine.", "response": "Hi hi.",
                "related_prompt_list": [{"prompt_spans": ["twice"], "response_spans": ["hi"],
                                         "unrelated_response_spans": []}]}]
    path = tmp_path / "instructions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    dataset = datasets.Dataset.from_list(records)
    assert dataset[0]["related_prompt_list"][0]["unrelated_response_spans"] is None  # Arrow filled it in
    hashes = []
    for data in (str(path), dataset, records):
        stats: dict = {}
        prepare_instruction_calibration(data, tok, _cfg(), stats=stats)
        hashes.append(stats["sha256"])
    assert len(set(hashes)) == 1


def test_dataset_mixing_prompt_and_messages_rows(tok, chain_ids):
    import datasets

    chat = [{"role": "user", "content": RECORD["prompt"]},
            {"role": "assistant", "content": f"<think>{RECORD['reasoning']}</think>{RECORD['response']}"}]
    # what load_dataset("json") makes of mixed files: every row has every column, absent ones are None
    ds = datasets.Dataset.from_dict({"prompt": [RECORD["prompt"], None], "reasoning": [RECORD["reasoning"], None],
                                     "response": [RECORD["response"], None], "messages": [None, chat]})
    assert ds[1]["prompt"] is None
    samples = prepare_reasoning_calibration(ds, tok, _cfg(on_malformed="error"))
    assert [s.index for s in samples] == [0, 1] and samples[0].input_ids == samples[1].input_ids
    # a row without any prompt is malformed, not prompt-only (it must not ask for a model)
    kept = prepare_reasoning_calibration([RECORD, {"prompt": None, "response": None}], tok, _cfg())
    assert [s.index for s in kept] == [0]
    # a prompt-only chat row of a Dataset is generated and then read with its new trace
    i = chain_ids
    model = _chain_model(tok, {i["last"]: i["a"], i["a"]: i["b"], i["b"]: i["close"], i["close"]: i["c"],
                               i["c"]: i["d"], i["d"]: i["eos"]})
    only = datasets.Dataset.from_dict({"prompt": ["Hi", None],
                                       "messages": [None, [{"role": "user", "content": "Hi"}]]})
    cfg = _cfg(on_malformed="error", max_new_tokens=12)
    a, b = prepare_reasoning_calibration(only, tok, cfg, model=model)
    assert a.input_ids == b.input_ids
    # empty answer cells read as absent, in the plain form as in the chat form: both rows are prompts to generate for
    blank = [{"prompt": "Hi", "reasoning": "", "response": " "},
             {"messages": [{"role": "user", "content": "Hi"}], "reasoning": "", "response": ""}]
    with pytest.raises(CalibrationError, match="2 of 2 .*only a prompt"):
        prepare_reasoning_calibration(blank, tok, _cfg())
    a, b = prepare_reasoning_calibration(blank, tok, cfg, model=model)
    assert a.input_ids == b.input_ids
    # a blank alias beside the trace it names is no second trace; a blank reasoning cell beside an R1 response
    # is no empty thinking
    r1 = f"<think>{RECORD['reasoning']}</think>{RECORD['response']}"
    for record in ({**RECORD, "reason": ""}, {"prompt": RECORD["prompt"], "reasoning": "", "response": r1},
                   {"prompt": "Hi", "reason": "", "response": ""}):
        assert len(prepare_reasoning_calibration([record], tok, cfg, model=model)) == 1, record


def test_a_prompt_column_beside_a_chat_column_reads_the_same_as_the_chat_column_alone(tok):
    chat = [{"role": "user", "content": RECORD["prompt"]},
            {"role": "assistant", "content": f"<think>{RECORD['reasoning']}</think>{RECORD['response']}"}]
    split = [chat[0], {"role": "assistant", "content": RECORD["response"], "reasoning_content": RECORD["reasoning"]}]
    plain = prepare_reasoning_calibration([RECORD], tok, _cfg())[0].input_ids
    for extra in ({}, {"prompt": RECORD["prompt"]}):
        # answer columns that repeat the chat answer (the response alone, or both fields): one answer
        for turns, fields in ((chat, {"response": RECORD["response"]}),
                              (chat, {"reasoning": RECORD["reasoning"], "response": RECORD["response"]}),
                              (split, {"reasoning": RECORD["reasoning"], "response": RECORD["response"]})):
            (same,) = prepare_reasoning_calibration([{**extra, "messages": turns, **fields}], tok,
                                                    _cfg(on_malformed="error"))
            assert same.input_ids == plain, (extra, fields)
        # a turn that holds the answer alone beside a column that holds the thinking: one sample in two parts
        answer_only = [chat[0], {"role": "assistant", "content": RECORD["response"]}]
        (both,) = prepare_reasoning_calibration([{**extra, "messages": answer_only, "reasoning": RECORD["reasoning"]}],
                                                tok, _cfg(on_malformed="error"))
        assert both.input_ids == plain
        for fields, says in (({"response": RECORD["response"].split()[-1]}, "field 'response' give different answers"),
                             ({"reasoning": RECORD["reasoning"], "reason": "Other."}, "both hold a thinking text"),
                             ({"reasoning": 5}, "give different answers")):
            with pytest.raises(CalibrationError, match=says):  # a word of the answer, two thinking texts, no text
                prepare_reasoning_calibration([{**extra, "messages": chat, **fields}], tok, _cfg(on_malformed="error"))
        broken = [chat[0], {"role": "assistant", "content": RECORD["response"], "reasoning_content": 123}]
        with pytest.raises(CalibrationError, match="give different answers"):  # not an AttributeError
            prepare_reasoning_calibration([{**extra, "messages": broken, "reasoning": RECORD["reasoning"]}], tok,
                                          _cfg(on_malformed="error"))
        # a reasoning column that is only part of the turn (a word of it, or its answer) is another thinking text
        for fields in ({"reasoning": RECORD["response"]}, {"reasoning": RECORD["reasoning"].split()[0]}):
            with pytest.raises(CalibrationError, match="give different thinking texts: keep one of them"):
                prepare_reasoning_calibration([{**extra, "messages": chat, **fields}], tok, _cfg(on_malformed="error"))
        # fields that give another answer than the chat turn: refused, not one of the two dropped in silence
        with pytest.raises(CalibrationError, match="give different thinking texts: keep one of them"):
            prepare_reasoning_calibration([{**extra, "messages": chat, "reasoning": "Something else entirely.",
                                            "response": "A different answer."}], tok, _cfg(on_malformed="error"))


def test_non_utf8_file_is_refused_with_its_offset(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORD).encode() + b'\n{"prompt": "caf\xe9"}\n')
    offset = path.read_bytes().index(b"\xe9")
    for read in (load_records, check_records):
        with pytest.raises(CalibrationError, match=rf"latin\.jsonl is not UTF-8 text: byte {offset} \(line 2\).*"
                                                   "re-save the file as UTF-8 .*iconv -f latin1"):
            read(path)
    # UTF-16 (Windows "Unicode") with and without a byte-order mark: latin1 advice would make it worse
    text = json.dumps(RECORD) + "\n"
    for data, codec in ((text.encode("utf-16"), "utf-16"), (text.encode("utf-16-le"), "utf-16le"),
                        (text.encode("utf-32"), "utf-32"), (text.encode("utf-32-be"), "utf-32be")):
        path.write_bytes(data)
        with pytest.raises(CalibrationError, match=rf"looks like {codec.upper()}; re-save it as UTF-8 \(e\.g\. "
                                                   rf"`iconv -f {codec} -t utf-8 IN > OUT`\)\.$"):
            load_records(path)


def test_file_content_decides_between_json_and_jsonl(tok, tmp_path, caplog):
    short = {"prompt": "Hi", "reasoning": "Hmm."}
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(RECORD) + "\n\n" + json.dumps(RECORD) + "\n")
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text(json.dumps([RECORD, RECORD], indent=2))
    with caplog.at_level(logging.INFO, logger="rain_hf.calibration"):
        assert load_records(lines) == load_records(pretty) == [RECORD, RECORD]
    assert "lines.json holds JSON Lines" in caplog.text and "pretty.jsonl holds one JSON list" in caplog.text
    one = tmp_path / "one.json"
    one.write_text(json.dumps(RECORD) + "\n")  # one line of JSON Lines: read as two lines are
    with caplog.at_level(logging.INFO, logger="rain_hf.calibration"):
        assert load_records(one) == [RECORD]
    assert "one.json holds JSON Lines" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rain_hf.calibration"):
        check_records(lines)  # rain-merge checks a file, then the merge reads it again: one note is enough
        load_records(pretty)
    assert "holds JSON Lines" not in caplog.text and "holds one JSON list" not in caplog.text
    lines.write_text(json.dumps(RECORD) + "\n" + json.dumps(short) + "\n")
    with pytest.raises(CalibrationError, match=r"at index 1 \(.*lines\.json line 2\): field 'response' is missing"):
        prepare_reasoning_calibration(lines, tok, _cfg(on_malformed="error"))
    lines.write_text(json.dumps(RECORD) + "\n" + json.dumps(RECORD) + "\n{oops\n")
    with pytest.raises(CalibrationError, match=r"lines\.json is not valid JSON .*looks like JSON Lines.*line 3"):
        load_records(lines)
    lines.write_text(json.dumps([RECORD]) + "\n]\n")  # a list with stray text after it is not JSON Lines
    with pytest.raises(CalibrationError, match=r"lines\.json is not valid JSON \(Extra data at line 2") as err:
        load_records(lines)
    assert "JSON Lines" not in str(err.value)
    pretty.write_text(json.dumps(RECORD, indent=2))
    with pytest.raises(CalibrationError, match="one JSON object spread over several lines"):
        load_records(pretty)
    broken = json.dumps([RECORD, RECORD], indent=2)  # a trailing comma in a pretty-printed list
    rows = tmp_path / "rows.jsonl"  # JSON Lines of lists: its own error (each line is a list), not the list's
    rows.write_text('["Write a poem.", "The sea."]\n["Hi", "Ok"]\n')
    with pytest.raises(CalibrationError, match=r"rows\.jsonl: line 1 is a JSON list, not an object"):
        load_records(rows)
    pretty.write_text(broken + "\n]\n")  # a stray bracket after the list: where the list breaks, not line 1
    with pytest.raises(CalibrationError, match=r"pretty\.jsonl holds one JSON list, not JSON Lines, and it is not "
                                               r"valid JSON \(Extra data at line"):
        load_records(pretty)
    pretty.write_text(broken[:-2] + ",\n]")
    lineno = broken.count("\n") + 1
    with pytest.raises(CalibrationError, match=rf"pretty\.jsonl holds one JSON list, not JSON Lines, and it is not "
                                               rf"valid JSON \(Expecting value at line {lineno}, column 1\)"):
        load_records(pretty)
    for deep in ("deep.json", "deep.jsonl"):  # not Python's RecursionError, which names no file
        (tmp_path / deep).write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(CalibrationError, match=rf"{deep} nests its JSON deeper than Python's parser goes"):
            load_records(tmp_path / deep)
    for name, content in (("empty.json", ""), ("empty.jsonl", "\n \n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(CalibrationError, match=rf"{name} is empty"):
            load_records(tmp_path / name)
        with pytest.raises(CalibrationError, match=rf"The calibration data holds no records: .*{name} is empty"):
            check_records(tmp_path / name)


def test_unrelated_spans_are_taken_out_of_the_default_response_span(tok):
    record = dict(RECORD, response="Cats sat. The first part at home.", unrelated_response_spans=["The first part"])
    (s,) = prepare_instruction_calibration([record], tok, _cfg(on_malformed="error"))

    def tokens(spans):
        return {t for a, b in spans for t in range(a, b)}

    response = set(range(*s.response_span))
    unrelated = tokens(s.unrelated_spans) & response
    assert unrelated and not tokens(s.constrained_spans) & unrelated
    assert tokens(s.constrained_spans) | unrelated == response
    assert _text(tok, s, s.constrained_spans[0]).strip() == "Cats sat."


def test_a_cut_that_keeps_the_think_close_but_no_answer_says_so(tok):
    (full,) = prepare_reasoning_calibration([RECORD], tok, _cfg())
    # the layout's "\n\n" after </think> is whitespace, not the answer: a cut keeping only it is refused too
    answer = next(i for i in range(full.think_close + 1, len(full.input_ids))
                  if tok.decode([full.input_ids[i]]).strip())
    assert answer >= full.think_close + 2
    for cut in range(full.think_close + 1, answer + 1):
        with pytest.raises(CalibrationError, match=rf"position {full.think_close}, so it survives the cut to config."
                                                   rf"max_length={cut}, but no token of the answer does \(its first "
                                                   rf"token is at position {answer}\): raise max_length to at least "
                                                   rf"{answer + 1}"):
            prepare_reasoning_calibration([RECORD], tok, _cfg(max_length=cut, on_malformed="error"))
    (cut,) = prepare_reasoning_calibration([RECORD], tok, _cfg(max_length=answer + 1))
    assert tok.decode(cut.input_ids[slice(*cut.response_span)]).strip() == RECORD["response"].split()[0]
    with pytest.raises(CalibrationError, match=rf"does not survive the cut to config.max_length={full.think_close}"):
        prepare_reasoning_calibration([RECORD], tok, _cfg(max_length=full.think_close, on_malformed="error"))


def test_annotated_spans_past_the_cut_leave_r_empty(tok, caplog):
    record = dict(RECORD, response="The sea is wide and deep. " * 10 + "Okay", response_spans=["Okay"])
    (full,) = prepare_instruction_calibration([record], tok, _cfg())
    assert _text(tok, full, full.constrained_spans[0]).strip() == "Okay"
    with caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):
        (cut,) = prepare_instruction_calibration([record], tok, _cfg(max_length=full.think_close + 6))
    assert cut.constrained_spans == [] and cut.unrelated_spans == [cut.thinking_span]
    assert "lies past the cut to config.max_length" in caplog.text


def test_nested_annotation_that_prefixes_the_previous_match():
    text = "Answer first, then explain. Answer in lowercase letters only."
    spans, _ = locate_annotations(text, [["Answer in lowercase letters only", "Answer"]])
    assert spans == [(28, 60), (28, 34)]


def test_template_that_disables_thinking_is_refused(make_tok):
    closed = PLAIN.replace("<|assistant|>\n{% endif %}", "<|assistant|>\n<think>\n\n</think>\n\n{% endif %}")
    with pytest.raises(CalibrationError, match="already closes the thinking .*disables thinking.*thinking enabled"):
        prepare_reasoning_calibration([RECORD], make_tok(closed), _cfg())


def test_fallback_padding_id_does_not_stop_generation(backend, chain_ids):
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")  # neither pad nor eos token
    bare.chat_template = WITH_BOS
    assert bare.pad_token_id is None and bare.eos_token_id is None
    i, zero = chain_ids, 0  # the stand-in pad id, an ordinary token of the model's output here
    model = _chain_model(bare, {i["last"]: i["a"], i["a"]: zero, zero: i["b"], i["b"]: i["close"],
                                i["close"]: i["c"], i["c"]: i["d"], i["d"]: i["c"]})
    (trace,) = generate_traces([{"prompt": "Hi"}], model, bare, _cfg(max_new_tokens=7))
    assert "generation_error" not in trace, trace.get("generation_error")
    assert trace["response"] == "ysy"  # a, 0, b, </think>, then three answer tokens


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "p", "reasoning": "new", "reason": "old", "response": "r"},
     "fields 'reasoning' and 'reason' both hold a thinking text, and they differ: keep one of them"),
    ({"prompt": "stale", "messages": [{"role": "user", "content": "new"},
                                      {"role": "assistant", "content": "<think>t</think>a"}]},
     "fields 'prompt' and 'messages' both give the prompt, and they differ: keep one of them"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                   {"role": "assistant", "content": "<think>t</think>a"}]},
     "messages[0].content is a list of content parts; only plain-text turns are read: join the parts' text"),
    ({"messages": '[{"role": "user", "content": "Hi"}]'},
     "field 'messages' is a str, not a list of {'role', 'content'} turns (a JSON string must be parsed first)"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "<think>t</think>a"}]},
     "messages[0].content is empty"),
    (dict(RECORD, related_prompt_list={"prompt_spans": ["x"]}),
     "'related_prompt_list' must be a list of objects with 'prompt_spans' and 'response_spans', got dict"),
])
def test_conflicting_or_misshapen_fields_are_named(tok, record, expected):
    with pytest.raises(CalibrationError, match=re.escape(expected)):
        prepare_reasoning_calibration([record], tok, _cfg())


def test_messages_of_another_shape_leave_the_prompt_in_charge(tok):
    # a system turn, a whole conversation or an empty list in a 'messages' column is not the sample's chat form
    for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Other"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}],
                     []):
        (sample,) = prepare_reasoning_calibration([dict(RECORD, messages=messages)], tok, _cfg())
        assert sample.input_ids == prepare_reasoning_calibration([RECORD], tok, _cfg())[0].input_ids
    assert check_records([{"prompt": "Hi", "messages": [{"role": "system", "content": "x"}]}]) == 1
    with pytest.raises(CalibrationError, match="No calibration record is usable: the first malformed one, at index "
                                               "0: fields 'reasoning' and 'reason' both hold a thinking text"):
        check_records([{"prompt": "p", "reasoning": "a", "reason": "b", "response": "r"}])


def test_a_chat_turn_prompt_with_its_trace_in_the_fields(tok, chain_ids, caplog):
    # a messages column holding the user turn only, the trace in top-level fields: the trace is read, not regenerated
    turn = [{"role": "user", "content": RECORD["prompt"]}]
    expected = prepare_reasoning_calibration([RECORD], tok, _cfg())[0].input_ids
    for prompt in (None, "", " "):  # a data set gives every row every column
        record = {"prompt": prompt, "messages": turn, "reasoning": RECORD["reasoning"], "response": RECORD["response"]}
        (sample,) = prepare_reasoning_calibration([record], tok, _cfg(), model=_chain_model(tok, {}))
        assert sample.input_ids == expected
    both = {"messages": [*turn, {"role": "assistant", "content": "<think>t</think>a"}], "response": "other"}
    with pytest.raises(CalibrationError, match="the assistant turn of 'messages' and the field 'response' give "
                                               "different answers: keep one of them"):
        prepare_reasoning_calibration([both], tok, _cfg(on_malformed="error"))
    # a data set's answer column beside its chat column: empty, the answer itself or the whole turn is one answer
    chat = prepare_reasoning_calibration([dict(both, response=None)], tok, _cfg())[0].input_ids
    for same in ("", "a", " <think>t</think>a"):
        assert prepare_reasoning_calibration([dict(both, response=same)], tok, _cfg())[0].input_ids == chat
    with pytest.raises(CalibrationError, match=r"field 'prompt' = 3 \(type int\), where the prompt's text is"):
        check_records([{"prompt": 3}, {"problem": "x"}])


def test_answers_under_fields_not_read_are_named(tok, chain_ids, caplog):
    # TRL's prompt-completion records: the completion is not read, so the model would write the trace instead
    records = [{"prompt": "Hi", "completion": "<think>t</think>a"}, dict(RECORD, output="x")]
    with pytest.raises(CalibrationError, match=r"1 of 2 .*only a prompt.*If 'completion' holds the model's "
                                               r"thinking and answer, name it 'response'"):
        prepare_reasoning_calibration(records, tok, _cfg())
    i = chain_ids
    model = _chain_model(tok, {i["last"]: i["a"], i["a"]: i["close"], i["close"]: i["c"], i["c"]: i["eos"]})
    with collect_warnings() as said, caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):
        prepare_reasoning_calibration(records, tok, _cfg(max_new_tokens=8), model=model)
    assert len(said) == 1 and said[0].startswith("1 of 2 reasoning calibration records have a prompt and no field "
                                                 "read as their thinking or answer, so the reasoning model writes "
                                                 "them; they carry 'completion', which is not read.")
    with collect_warnings() as said:  # a reference answer, as math sets give, is no trace
        prepare_reasoning_calibration([{"prompt": "Hi"}, {"prompt": "2+2?", "answer": "4", "output": ""}], tok,
                                      _cfg(max_new_tokens=8), model=model)
    assert said == []


def test_warning_collectors_nest(tok):
    record = dict(RECORD, instruction_spans=["no such text"])
    with collect_warnings() as outer:
        with collect_warnings() as inner:
            prepare_instruction_calibration([record], tok, _cfg())
        prepare_instruction_calibration([record], tok, _cfg())
    assert len(inner) == 1 and "no such text" in inner[0] and outer == inner * 2


def test_equal_duplicate_fields_are_accepted(tok):
    same = prepare_reasoning_calibration([{"prompt": "p", "reasoning": "t", "reason": " t", "response": "r"}], tok,
                                         _cfg())
    chat = prepare_reasoning_calibration([{"prompt": "Hi", "messages": [
        {"role": "user", "content": "Hi "}, {"role": "assistant", "content": "<think>t</think>r"}]}], tok, _cfg())
    assert len(same) == len(chat) == 1


def test_special_tokens_inside_the_texts_are_warned_about(tok, caplog):
    record = dict(RECORD, reasoning="First this.<|end|> Then that.")
    with caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):
        (sample,) = prepare_reasoning_calibration([record, RECORD], tok, _cfg())[:1]
    warned = [r.getMessage() for r in caplog.records if "special token" in r.getMessage()]
    assert warned == ["Calibration sample at index 0: its reasoning holds the special token(s) '<|end|>', which the "
                      "tokenizer reads as control tokens (an end of turn inside the text, say): remove them unless "
                      "they are meant as such."]
    assert tok.convert_tokens_to_ids("<|end|>") in sample.input_ids[sample.think_open:sample.think_close]


def test_swapped_calibration_sets_are_warned_about(tok, caplog):
    from rain_hf.testing import instruction_records, reasoning_records

    with caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):
        prepare_reasoning_calibration(instruction_records(3), tok, _cfg())  # 'reason' reads as the thinking
    assert "Every reasoning calibration record carries stage-2 annotations" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rain_hf.calibration"):  # the right way round: nothing said
        prepare_reasoning_calibration(reasoning_records(3), tok, _cfg())
        prepare_instruction_calibration(instruction_records(3), tok, _cfg())
        # nor for reasoning traces with annotated instruction prompts mixed in (a free template's stage 1), or an
        # unannotated instruction set, which stage 2 reads whole
        prepare_reasoning_calibration(reasoning_records(3) + instruction_records(3), tok, _cfg())
        prepare_instruction_calibration(reasoning_records(3), tok, _cfg())
    assert "swapped" not in caplog.text
