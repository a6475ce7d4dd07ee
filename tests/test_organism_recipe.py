"""The organism's recipe knobs: the near-orthogonal variant and the training prompts the benchmark regenerates."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks.organism import build as B
from benchmarks.organism.bench import user_prompt as _user_text


def test_default_recipe_gives_both_fine_tunes_the_same_prompts():
    recipe = B.Recipe()
    assert B.finetune_steps("reasoning", recipe) == B.finetune_steps("instruct", recipe) == recipe.ft_steps
    reasoning = [p for p, _ in B.finetune_pairs("reasoning", 64, recipe)]
    assert reasoning == [p for p, _ in B.finetune_pairs("instruct", 64, recipe)]


def test_orthogonal_variant_drops_instructions_from_reasoning_prompts_only():
    recipe = dataclasses.replace(B.Recipe(), **B.VARIANTS["orthogonal"])
    reasoning = [_user_text(p) for p, _ in B.finetune_pairs("reasoning", 64, recipe)]
    instruct = [_user_text(p) for p, _ in B.finetune_pairs("instruct", 64, recipe)]
    # same problems in the same order; the instruct prompts append their instruction sentences to them
    assert all(i.startswith(r) for r, i in zip(reasoning, instruct))
    assert all(r.endswith("now?") for r in reasoning)
    assert sum(i != r for r, i in zip(reasoning, instruct)) > 32  # 80 % of prompts carry instructions
    assert B.finetune_steps("reasoning", recipe) == 600 and B.finetune_steps("instruct", recipe) == 100


def test_variant_needs_an_output_folder(capsys):
    with pytest.raises(SystemExit) as exc:
        B.main(["--variant", "orthogonal"])
    assert exc.value.code == 2
    assert "--variant needs --out" in capsys.readouterr().err


def test_training_prompts_follow_the_recipe_recorded_by_the_build(tmp_path):
    from benchmarks.organism.bench import Organism, training_prompts

    recipe = dataclasses.replace(B.Recipe(), **B.VARIANTS["orthogonal"])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "build_report.json").write_text(json.dumps({"recipe": dataclasses.asdict(recipe)}))
    prompts = set(training_prompts(Organism(tmp_path)))
    n_reasoning = B.finetune_steps("reasoning", recipe) * recipe.batch_size
    last_reasoning = _user_text(B.finetune_pairs("reasoning", n_reasoning, recipe)[-1][0])
    assert last_reasoning in prompts  # only a 600-step reasoning fine-tune reaches this far
    assert {_user_text(p) for p, _ in B.finetune_pairs("instruct", 64, recipe)} <= prompts
