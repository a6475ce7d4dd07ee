"""Every runnable example in the package's docstrings runs and prints what it shows (the brief's promise of
docstrings with a runnable example; ``# doctest: +SKIP`` marks the ones that need a real model)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import rain_hf

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(name for _, name, _ in pkgutil.walk_packages(rain_hf.__path__, "rain_hf."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, monkeypatch):
    monkeypatch.chdir(REPO)  # examples name the committed organism relative to the repository root
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
