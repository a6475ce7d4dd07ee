"""A small English Punkt sentence model, trained here with nltk's own ``PunktTrainer``.

lm-eval's IFEval checkers count sentences and words with nltk's ``punkt_tab`` model, which nltk normally downloads.
This module writes a deterministic training text (plain sentences, questions, exclamations, and abbreviations such
as "Dr." or "e.g." inside sentences), trains Punkt on it and adds a short list of common English abbreviations, so
that the project never needs a download. :func:`rain_hf.evaluation.ensure_nltk_data` saves the result as a
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

# Bump when the training text or the abbreviation list changes: saved models with another version are rebuilt.
PUNKT_BUILD_VERSION = "rain_hf-punkt-1"

# Common abbreviations that rarely end a sentence (lowercase, without the final period). Words that are also
# ordinary sentence-final words ("no", "min", "etc") are left out on purpose.
EXTRA_ABBREVIATIONS = (
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "a.m", "p.m", "u.s", "u.k",
    "inc", "ltd", "corp", "dept", "fig", "approx", "jan", "feb", "apr", "aug", "sept", "oct", "nov", "vol",
    "gen", "capt", "lt", "sgt",
)  # fmt: skip

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
    abbreviation; titles ("Dr.", "Mr.") and "e.g."/"i.e." occur before names and lowercase words.

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
            sentences.append(f"Then {title} {name} {verb} {obj} with {subject}.")
        if i % 7 == 0:
            sentences.append(f"They {verb} small things, e.g. {obj}, and i.e. nothing else{tail}.")
    paragraphs = [" ".join(sentences[j : j + 8]) for j in range(0, len(sentences), 8)]
    return "\n\n".join(paragraphs)


def build_punkt_parameters() -> PunktParameters:
    """Train Punkt on :func:`punkt_training_text` and add :data:`EXTRA_ABBREVIATIONS`.

    Returns:
        ``nltk.tokenize.punkt.PunktParameters`` (abbreviation types, collocations, sentence starters and
        orthographic context), ready for ``nltk.tokenize.punkt.save_punkt_params``.

    Example:
        >>> from nltk.tokenize.punkt import PunktSentenceTokenizer
        >>> from rain_hf._punkt import build_punkt_parameters
        >>> PunktSentenceTokenizer(build_punkt_parameters()).tokenize("Dr. Lee sat down. He smiled.")
        ['Dr. Lee sat down.', 'He smiled.']
    """
    from nltk.tokenize.punkt import PunktTrainer

    trainer = PunktTrainer()
    trainer.train(punkt_training_text(), finalize=True)
    params = trainer.get_params()
    params.abbrev_types.update(EXTRA_ABBREVIATIONS)
    return params
