"""A small English Punkt sentence model, trained here with nltk's own ``PunktTrainer``.

lm-eval's IFEval checkers count sentences and words with nltk's ``punkt_tab`` model, which nltk normally downloads.
This module writes a deterministic training text (plain sentences, questions, exclamations, and titles such as
"Dr." or "Mr." before names inside sentences), trains Punkt on it, adds a short list of common English abbreviations and the
case statistics of common function words, so that the project never needs a download. :func:`rain_hf.evaluation.ensure_nltk_data` saves the result as a
``punkt_tab`` folder.

Example:
    >>> from rain_hf._punkt import build_punkt_parameters
    >>> params = build_punkt_parameters()
    >>> "dr" in params.abbrev_types
    True
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nltk.tokenize.punkt import PunktParameters

# Bump when the training text or the word lists change: saved models with another version are rebuilt.
PUNKT_BUILD_VERSION = "rain_hf-punkt-4"

# Common abbreviations that rarely end a sentence (lowercase, without the final period), limited to those that
# nltk's published English model also treats as abbreviations, since IFEval's scores were computed with that model:
# it ends a sentence after "e.g.", "i.e.", "fig.", "vol.", "approx." or "dept.", and so does this one. Words that
# are also ordinary sentence-final words ("no", "min", "etc") are left out on purpose.
EXTRA_ABBREVIATIONS = (
    "mr", "mrs", "ms", "messrs", "dr", "prof", "sr", "jr", "st", "vs", "a.m", "p.m", "u.s", "u.k", "u.s.a", "u.n",
    "u.s.s.r", "d.c", "inc", "ltd", "corp", "co", "bros", "ph.d", "m.b.a", "jan", "feb", "aug", "sep", "sept", "oct",
    "nov", "dec", "gen", "lt", "col", "maj", "adm", "sen", "rep", "reps", "ave", "ft", "mg", "yr",
)  # fmt: skip

# Function words written in lower case inside a sentence and capitalised only at its start. Punkt's orthographic
# heuristic must have seen a word that way before it ends a sentence at an abbreviation followed by the word
# capitalised ("at 5 p.m. It was late"); the training text alone covers a few dozen words. Words that are also
# names or months ("will", "may", "mark", "who", "rather") are left out: "Mr. Will Smith" must stay one sentence.
COMMON_WORDS = """
a about above according across after afterwards again against all almost along already also although always among an
and another any anyone anything anyway are around as at back because before behind below besides between both but
by can cannot could despite did do does doing during each either even eventually ever every everybody everyone
everything except few finally first for from further furthermore given had has have having he her here hers herself
him himself his how however if in including indeed instead into is it its itself just last later least less let like
many meanwhile more moreover most much my myself near neither never nevertheless next nobody none nor not nothing now
of often on once one only or other others otherwise our ours ourselves out over overall perhaps please really
second she should similarly since so some someone something sometimes soon still such than that the their theirs
them themselves there therefore these they third this those though through throughout thus to today together
tomorrow too toward towards under unless unlike until up upon us usually very was we were what whatever when
whenever where whereas whether which while whoever whom whose why with within without would yesterday yet you
your yours yourself yourselves
""".split()

_SUBJECTS = (
    "the farmer", "my sister", "a young teacher", "the old doctor", "our team", "the small dog",
    "her brother", "the driver", "a quiet student", "the baker", "his neighbour", "the captain",
)  # fmt: skip
_VERBS = ("found", "carried", "painted", "sold", "counted", "cleaned", "opened", "watched", "fixed", "packed")
_OBJECTS = (
    "a red box", "three apples", "the garden gate", "an old map", "the kitchen window", "seven letters",
    "a heavy bag", "the broken chair", "two blue cups", "the river boat", "a long rope", "the school bus",
)  # fmt: skip
_TAILS = ("", " before noon", " after the storm", " in the morning", " near the river", " with great care")
_NAMES = ("Lee", "Park", "Smith", "Garcia", "Brown", "Novak", "Khan", "Rossi", "Silva", "Weber")
_TITLES = ("Dr.", "Mr.", "Mrs.", "Ms.", "Prof.")


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def punkt_training_text() -> str:
    """Return the deterministic English text the Punkt model is trained on (about 1,000 sentences).

    Every sentence-final word also occurs inside sentences, so that the trainer does not take it for an
    abbreviation; titles ("Dr.", "Mr.") occur inside sentences, before names.

    Example:
        >>> from rain_hf._punkt import punkt_training_text
        >>> punkt_training_text().startswith("The farmer found a red box.")
        True
    """
    sentences: list[str] = []
    combos = itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TAILS)
    for i, (subject, verb, obj, tail) in enumerate(combos):
        if i % 11:
            continue
        kind = (i // 11) % 5
        if kind == 3:
            sentences.append(f"Did {subject} say that {subject} {verb} {obj}{tail}?")
        elif kind == 4:
            sentences.append(f"{_capitalize(subject)} {verb} {obj}{tail}!")
        else:
            sentences.append(f"{_capitalize(subject)} {verb} {obj}{tail}.")
        if i % 3 == 0:
            title = _TITLES[i % len(_TITLES)]
            name = _NAMES[i % len(_NAMES)]
            # the title inside the sentence: a fixed first word here would be learnt as a sentence starter
            sentences.append(f"{_capitalize(subject)} met {title} {name}, and they {verb} {obj}.")
        if i % 7 == 0:
            sentences.append(f"They {verb} small things, such as {obj}, and nothing else{tail}.")
    paragraphs = [" ".join(sentences[j : j + 8]) for j in range(0, len(sentences), 8)]
    return "\n\n".join(paragraphs)


def build_punkt_parameters() -> PunktParameters:
    """Train Punkt on :func:`punkt_training_text`, add :data:`EXTRA_ABBREVIATIONS`, and mark each of
    :data:`COMMON_WORDS` as seen capitalised at a sentence start and in lower case inside sentences.

    Returns:
        ``nltk.tokenize.punkt.PunktParameters`` (abbreviation types, collocations, sentence starters and
        orthographic context), ready for ``nltk.tokenize.punkt.save_punkt_params``.

    Example:
        >>> from nltk.tokenize.punkt import PunktSentenceTokenizer
        >>> from rain_hf._punkt import build_punkt_parameters
        >>> PunktSentenceTokenizer(build_punkt_parameters()).tokenize("Dr. Lee sat down. He smiled.")
        ['Dr. Lee sat down.', 'He smiled.']
    """
    from nltk.tokenize.punkt import _ORTHO_BEG_UC, _ORTHO_MID_LC, _ORTHO_MID_UC, PunktTrainer

    trainer = PunktTrainer()
    trainer.train(punkt_training_text(), finalize=True)
    params = trainer.get_params()
    params.abbrev_types.update(EXTRA_ABBREVIATIONS)
    for word in COMMON_WORDS:
        params.ortho_context[word] |= _ORTHO_BEG_UC | _ORTHO_MID_LC
    # a capital "A" inside a sentence is an initial ("Mr. A. Smith"), and "a" after an initial starts no sentence:
    # nltk's model has seen it so, and lists no "a" among its sentence starters
    params.ortho_context["a"] |= _ORTHO_MID_UC
    params.sent_starters.discard("a")
    return params
