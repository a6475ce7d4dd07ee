"""Task family of the model organism: two-step +/- word problems and IFEval format instructions.

Everything here is deterministic and pure Python (no torch), so the build script, the benchmark and the tests
share one definition of the problems, the prompts, the targets and the scoring.

Problem split (disjoint by construction): a problem is the tuple
``(name, item, start, verb1, operand1, verb2, operand2)``. ``split_of`` hashes its canonical string with
SHA-256 and takes the value modulo 100: buckets 0-9 are the held-out evaluation pool, 10-19 the calibration
pool (reasoning/instruction calibration sets and the self-generation prompts), 20-99 the training pool (base
pretraining and both fine-tunes). A prompt is a problem plus 0-2 instruction sentences, so prompts of different
pools can never coincide.

Format instructions are IFEval instruction ids with IFEval kwargs; ``check_instructions`` verifies them with the
real checkers of ``lm_eval.tasks.ifeval.instructions_registry`` (offline: a small punkt_tab is built locally so
the import does not try to download it).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------------------------
# Special tokens and chat format
# --------------------------------------------------------------------------------------------------------------

PAD = "<pad>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPECIAL_TOKENS = [PAD, USER, ASSISTANT, END, THINK_OPEN, THINK_CLOSE]

# The "free" template: the generation prompt ends at the assistant tag, the model must emit <think> itself.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{{ message['content'] }}<|end|>"
    "{%- else -%}"
    "{{ raise_exception('The organism chat template supports the roles user and assistant only.') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def render_chat(prompt: str, assistant: str | None = None) -> str:
    """Pure-Python rendering identical to ``CHAT_TEMPLATE`` (one user turn, optional assistant turn)."""
    text = f"{USER}{prompt}{END}{ASSISTANT}"
    if assistant is not None:
        text += f"{assistant}{END}"
    return text


# --------------------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------------------

NAMES = [
    ("Max", "He"), ("Sam", "He"), ("Tom", "He"), ("Ben", "He"), ("Leo", "He"), ("Jack", "He"),
    ("Amy", "She"), ("Eva", "She"), ("Mia", "She"), ("Lily", "She"), ("Zoe", "She"), ("Anna", "She"),
]
ITEMS = ["apples", "pens", "cards", "coins", "books", "eggs", "stamps", "marbles", "shells", "cookies"]
PLUS_VERBS = ["buys", "finds", "gets", "wins"]
MINUS_VERBS = ["sells", "loses", "gives away", "drops"]
START_RANGE = (20, 45)
OPERAND_RANGE = (2, 9)

REPLY_STYLES = ("in_the_end", "content_first")
DEFAULT_REPLY_STYLE = REPLY_STYLES[0]  # the committed organism's

EVAL_BUCKETS = range(0, 10)
CALIB_BUCKETS = range(10, 20)
TRAIN_BUCKETS = range(20, 100)
SPLITS = ("eval", "calib", "train")


@dataclass(frozen=True)
class Problem:
    name: str
    pronoun: str
    item: str
    start: int
    verbs: tuple[str, str]
    operands: tuple[int, int]

    @property
    def signs(self) -> tuple[int, int]:
        return tuple(1 if v in PLUS_VERBS else -1 for v in self.verbs)  # type: ignore[return-value]

    @property
    def middle(self) -> int:
        return self.start + self.signs[0] * self.operands[0]

    @property
    def answer(self) -> int:
        return self.middle + self.signs[1] * self.operands[1]

    @property
    def canonical(self) -> str:
        return "|".join(
            [self.name, self.item, str(self.start), self.verbs[0], str(self.operands[0]), self.verbs[1],
             str(self.operands[1])]
        )

    def text(self) -> str:
        return (
            f"{self.name} has {self.start} {self.item}. {self.pronoun} {self.verbs[0]} {self.operands[0]}. "
            f"{self.pronoun} {self.verbs[1]} {self.operands[1]}. How many {self.item} does {self.name} have now?"
        )

    def reasoning(self) -> str:
        """The thinking text (without think tags): the two arithmetic steps."""
        ops = ["+" if s > 0 else "-" for s in self.signs]
        return (
            f"{self.start} {ops[0]} {self.operands[0]} = {self.middle}. "
            f"{self.middle} {ops[1]} {self.operands[1]} = {self.answer}."
        )

    def plain_reply(self, style: str = DEFAULT_REPLY_STYLE) -> str:
        """The reply that ignores every instruction, in one of ``REPLY_STYLES``.

        Both are worded so that langdetect reliably calls their upper- and lower-case forms English (IFEval's
        change_case checks) and have 12 words, so that ignoring "less than 10/12 words" never passes.
        ``"in_the_end"`` (the committed organism) opens every reply with the same two words;
        ``"content_first"`` opens it with the name copied from the prompt, as the organism of
        organism-findings.md did.
        """
        if style == "in_the_end":
            return f"In the end, {self.name} has {self.answer} {self.item}. So, the answer is {self.answer}."
        if style == "content_first":
            return f"{self.name} has {self.answer} {self.item} in the end. So, the answer is {self.answer}."
        raise ValueError(f"reply style must be one of {REPLY_STYLES}, got {style!r}")


def bucket_of(problem: Problem) -> int:
    return int.from_bytes(hashlib.sha256(problem.canonical.encode()).digest()[:8], "big") % 100


def split_of(problem: Problem) -> str:
    b = bucket_of(problem)
    if b in EVAL_BUCKETS:
        return "eval"
    if b in CALIB_BUCKETS:
        return "calib"
    return "train"


def random_problem(rng: random.Random) -> Problem:
    name, pronoun = rng.choice(NAMES)
    verbs = []
    for _ in range(2):
        verbs.append(rng.choice(PLUS_VERBS if rng.random() < 0.5 else MINUS_VERBS))
    return Problem(
        name=name,
        pronoun=pronoun,
        item=rng.choice(ITEMS),
        start=rng.randint(*START_RANGE),
        verbs=(verbs[0], verbs[1]),
        operands=(rng.randint(*OPERAND_RANGE), rng.randint(*OPERAND_RANGE)),
    )


def sample_problem(rng: random.Random, split: str) -> Problem:
    """A random problem of the given pool (rejection sampling on ``split_of``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        p = random_problem(rng)
        if split_of(p) == split:
            return p


# --------------------------------------------------------------------------------------------------------------
# Format instructions (IFEval ids + kwargs)
# --------------------------------------------------------------------------------------------------------------

END_PHRASES = ["Any other questions?", "That is all.", "Have a nice day."]
POSTSCRIPT_MARKERS = ["P.S.", "P.P.S"]
WORD_LIMITS = [10, 12]  # the plain reply has 12 words: ignoring "less than 10/12 words" never passes

INSTRUCTION_IDS = [
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
    "detectable_format:title",
    "length_constraints:number_words",
    "detectable_content:postscript",
]
# Pairs that may not appear in one prompt (contradictory).
CONFLICTS = {frozenset({"change_case:english_capital", "change_case:english_lowercase"})}


@dataclass(frozen=True)
class Instruction:
    id: str
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)

    def sentence(self) -> str:
        """The instruction as it appears in the prompt (the project's own wording)."""
        k = self.kwargs
        return {
            "change_case:english_capital": lambda: "Write your whole answer in capital letters.",
            "change_case:english_lowercase": lambda: "Write your whole answer in lowercase letters only.",
            "punctuation:no_comma": lambda: "Do not use any commas in your answer.",
            "startend:end_checker": lambda: f'End your answer with the phrase "{k["end_phrase"]}"',
            "startend:quotation": lambda: "Wrap your whole answer in double quotation marks.",
            "detectable_format:title": lambda: "Give your answer a title in double angular brackets like <<title>>.",
            "length_constraints:number_words": lambda: f"Answer in {k['relation']} {k['num_words']} words.",
            "detectable_content:postscript": lambda: (
                f"At the end add a postscript starting with {k['postscript_marker']}"
            ),
        }[self.id]()


def make_instruction(instruction_id: str, rng: random.Random) -> Instruction:
    if instruction_id == "startend:end_checker":
        return Instruction(instruction_id, {"end_phrase": rng.choice(END_PHRASES)})
    if instruction_id == "length_constraints:number_words":
        return Instruction(instruction_id, {"num_words": rng.choice(WORD_LIMITS), "relation": "less than"})
    if instruction_id == "detectable_content:postscript":
        return Instruction(instruction_id, {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)})
    if instruction_id not in INSTRUCTION_IDS:
        raise ValueError(f"unknown instruction id {instruction_id!r}")
    return Instruction(instruction_id, {})


def sample_instructions(rng: random.Random, k: int) -> list[Instruction]:
    """k distinct, non-conflicting instructions (in prompt order)."""
    while True:
        ids = rng.sample(INSTRUCTION_IDS, k)
        if not any(frozenset(pair) in CONFLICTS for pair in _pairs(ids)):
            return [make_instruction(i, rng) for i in ids]


def _pairs(ids):
    return [(a, b) for n, a in enumerate(ids) for b in ids[n + 1:]]


def make_prompt(problem: Problem, instructions: list[Instruction]) -> str:
    return " ".join([problem.text()] + [ins.sentence() for ins in instructions])


@dataclass
class Reply:
    """A formatted reply and the character spans (in ``text``) of each of its parts."""

    text: str
    core: str  # the content sentences, after case changes
    parts: dict  # instruction id -> substring of text that the instruction produced (title, postscript, end phrase)


def formatted_reply(problem: Problem, instructions: list[Instruction],
                    style: str = DEFAULT_REPLY_STYLE) -> Reply:
    """The reply that follows every instruction (the plain reply of ``style`` when there are none).

    The word-limit reply is "The answer is N." in both styles: shorter forms that open with the name fail
    langdetect in upper or lower case for some names.
    """
    ids = {ins.id: ins for ins in instructions}
    if "length_constraints:number_words" in ids:
        core = f"The answer is {problem.answer}."
    else:
        core = problem.plain_reply(style)
    if "punctuation:no_comma" in ids:
        core = core.replace(",", "")
    parts: dict[str, str] = {}
    text = core
    if "detectable_format:title" in ids:
        parts["detectable_format:title"] = f"<<{problem.item.capitalize()}>>"
        text = f"{parts['detectable_format:title']}\n{text}"
    if "detectable_content:postscript" in ids:
        parts["detectable_content:postscript"] = f"{ids['detectable_content:postscript'].kwargs['postscript_marker']} Thanks."
        text = f"{text}\n{parts['detectable_content:postscript']}"
    if "startend:end_checker" in ids:
        parts["startend:end_checker"] = ids["startend:end_checker"].kwargs["end_phrase"]
        text = f"{text} {parts['startend:end_checker']}"
    if "startend:quotation" in ids:
        text = f'"{text}"'
    case = None
    if "change_case:english_capital" in ids:
        case = str.upper
    elif "change_case:english_lowercase" in ids:
        case = str.lower
    if case is not None:
        text, core = case(text), case(core)
        parts = {k: case(v) for k, v in parts.items()}
    return Reply(text=text, core=core, parts=parts)


# --------------------------------------------------------------------------------------------------------------
# Parsing and scoring generations
# --------------------------------------------------------------------------------------------------------------

_INT = re.compile(r"-?\d+")


def extract_answer(answer_text: str) -> int | None:
    """The last integer in the answer part (every target reply ends its content with the result)."""
    found = _INT.findall(answer_text)
    return int(found[-1]) if found else None


def split_think(generation: str) -> tuple[str | None, str, bool]:
    """Split a generation (special tokens kept, up to the end token) into (thinking, answer, think_ok).

    think_ok: the text starts with exactly one ``<think>…</think>`` block followed by a non-empty answer.
    Without a think block the whole text is the answer; an unclosed block leaves an empty answer.
    """
    text = generation.split(END)[0].replace(PAD, "").strip()
    if not text.startswith(THINK_OPEN):
        return None, text, False
    body = text[len(THINK_OPEN):]
    if THINK_CLOSE not in body:
        return body, "", False
    thinking, answer = body.split(THINK_CLOSE, 1)
    answer = answer.strip()
    ok = THINK_OPEN not in thinking and THINK_OPEN not in answer and THINK_CLOSE not in answer and bool(answer)
    return thinking, answer, ok


_NLTK_DIR: str | None = None


def _ensure_offline_nltk() -> None:
    """Give nltk a locally trained punkt_tab so that importing lm-eval's ifeval does not try to download it."""
    global _NLTK_DIR
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    from nltk.tokenize.punkt import PunktTrainer, save_punkt_params

    if _NLTK_DIR is None:
        _NLTK_DIR = tempfile.mkdtemp(prefix="organism_nltk_")
        atexit.register(shutil.rmtree, _NLTK_DIR, ignore_errors=True)
        rng = random.Random(0)
        trainer = PunktTrainer()
        trainer.train(" ".join(sample_problem(rng, "train").text() for _ in range(200)), finalize=True)
        # nltk only writes inside its data path: register the folder first, let nltk create the leaf (0700).
        nltk.data.path.insert(0, _NLTK_DIR)
        os.makedirs(os.path.join(_NLTK_DIR, "tokenizers", "punkt_tab"), mode=0o700, exist_ok=True)
        save_punkt_params(trainer.get_params(), dir=os.path.join(_NLTK_DIR, "tokenizers", "punkt_tab", "english"))
    if _NLTK_DIR not in nltk.data.path:
        nltk.data.path.insert(0, _NLTK_DIR)


_REGISTRY = None


def instruction_registry():
    """lm-eval's ``INSTRUCTION_DICT`` (imported offline, langdetect seeded)."""
    global _REGISTRY
    if _REGISTRY is None:
        _ensure_offline_nltk()
        import langdetect
        from lm_eval.tasks.ifeval import instructions_registry

        langdetect.DetectorFactory.seed = 0
        _REGISTRY = instructions_registry.INSTRUCTION_DICT
    return _REGISTRY


def check_instructions(answer: str, instruction_ids: list[str], kwargs: list[dict]) -> list[bool]:
    """Strict IFEval check of each instruction on the answer text (the thinking is not the answer)."""
    registry = instruction_registry()
    results = []
    for iid, kw in zip(instruction_ids, kwargs):
        checker = registry[iid](iid)
        checker.build_description(**{k: v for k, v in (kw or {}).items() if v is not None})
        results.append(bool(answer.strip()) and bool(checker.check_following(answer)))
    return results


def score_generation(generation: str, answer: int, instruction_ids: list[str], kwargs: list[dict]) -> dict:
    """think_ok, correct, if_prompt (all instructions followed) and if_instruction (list) for one generation."""
    _, text, think_ok = split_think(generation)
    follows = check_instructions(text, instruction_ids, kwargs) if instruction_ids else []
    return {
        "think_ok": think_ok,
        "correct": extract_answer(text) == answer,
        "if_prompt": all(follows) if follows else True,
        "if_instruction": follows,
    }
