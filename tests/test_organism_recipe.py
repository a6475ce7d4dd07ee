"""The organism's recipe knobs: the near-orthogonal variant and the training prompts the benchmark regenerates."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from benchmarks.organism import build as B
from benchmarks.organism.bench import user_prompt as _user_text

ORGANISM = Path(__file__).resolve().parents[1] / "benchmarks" / "organism"


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


def test_force_finetunes_without_a_base_is_refused_not_a_new_base(tmp_path, monkeypatch):
    def train_base(*args, **kwargs):
        raise AssertionError("--force-finetunes trained a new base")

    monkeypatch.setattr(B, "train_base", train_base)
    # `cp -r benchmarks/organism/checkpoints OUT/` into a missing OUT gives OUT/base, not OUT/checkpoints/base
    (tmp_path / "base").mkdir()
    with pytest.raises(SystemExit, match=r"--force-finetunes retrains the fine-tunes from the base at .*checkpoints/"
                                         r"base, and there is none: copy the committed one \(mkdir -p "):
        B.main(["--out", str(tmp_path), "--force-finetunes", "--skip-checks"])
    # a variant whose recipe changes what the base reads needs its own base, not the committed one
    with pytest.raises(SystemExit, match=r"copy a base built with this variant's recipe \(it changes p_follow"):
        B.main(["--variant", "follow25_plain", "--out", str(tmp_path), "--force-finetunes", "--skip-checks"])
    with pytest.raises(SystemExit, match="copy the committed one"):  # the sweep's fine-tunes on the committed base
        B.main(["--variant", "plain_r300_itm2", "--out", str(tmp_path), "--force-finetunes", "--skip-checks"])


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


def test_plain_r300_itm2_variant_forces_think_on_a_quarter_of_the_instruct_prompts_only():
    recipe = dataclasses.replace(B.Recipe(), **B.VARIANTS["plain_r300_itm2"])
    instruct = B.finetune_pairs("instruct", 400, recipe)
    forced = [(p, t) for p, t in instruct if p.endswith(B.T.THINK_OPEN)]
    assert 60 < len(forced) < 140  # a quarter of 400
    # the target stays the direct formatted reply: never a think block
    assert all(B.T.THINK_OPEN not in t and B.T.THINK_CLOSE not in t for _, t in instruct)
    assert not any(p.endswith(B.T.THINK_OPEN) for p, _ in B.finetune_pairs("reasoning", 400, recipe))
    # the default recipe's instruct data is unchanged by the new knob's random stream
    default = B.finetune_pairs("instruct", 400, B.Recipe())
    assert [p.removesuffix(B.T.THINK_OPEN) for p, _ in instruct] == [p for p, _ in default]
    assert [t for _, t in instruct] == [t for _, t in default]


def test_seed_offset_changes_the_training_data_but_not_the_evaluation_prompts():
    shifted = dataclasses.replace(B.Recipe(), seed_offset=1)
    assert B.base_documents(8, shifted) != B.base_documents(8, B.Recipe())
    assert B.finetune_pairs("instruct", 8, shifted) != B.finetune_pairs("instruct", 8, B.Recipe())
    # held-out prompts never depend on the recipe: its only say in them is the reply style, which changes the
    # reference replies but not what write_data puts in eval_prompts.jsonl (the committed file)
    committed = [json.loads(line) for line in (ORGANISM / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    styles = {B.Recipe().reply_style} | {v["reply_style"] for v in B.VARIANTS.values() if "reply_style" in v}
    assert len(styles) == 2 and len(committed) == B.N_EVAL
    for style in styles:
        written = [{k: r[k] for k in ("key", "prompt", "instruction_id_list", "kwargs", "answer")}
                   for r in B.eval_records(style=style)]
        assert written == committed, style


def test_sweep_shares_a_base_between_recipes_that_differ_only_in_their_fine_tunes(tmp_path):
    from benchmarks.organism import sweep as S

    def base(name):
        return S.base_dir(tmp_path, S.make_recipe(S.RECIPES[name], quick=False))

    assert base("default") == base("plain_r300_itm2") == base("instruct50")
    assert len({base("default"), base("default_s1"), base("orthogonal"), base("follow25_plain")}) == 4
    assert all(set(o) <= {f.name for f in dataclasses.fields(B.Recipe)} for o in S.RECIPES.values())


def test_follow25_plain_variant_is_the_sweeps_recipe_with_its_own_base(tmp_path):
    from benchmarks.organism import sweep as S
    from benchmarks.organism.bench import GRIDS

    assert B.VARIANTS["follow25_plain"] == S.RECIPES["follow25_plain"]
    recipe = dataclasses.replace(B.Recipe(), **B.VARIANTS["follow25_plain"])
    assert B.base_documents(64, recipe) != B.base_documents(64, B.Recipe())  # the base is trained anew
    assert S.base_dir(tmp_path, S.make_recipe(S.RECIPES["follow25_plain"], quick=False)) != S.base_dir(
        tmp_path, S.make_recipe(S.RECIPES["default"], quick=False))
    assert all(_user_text(p).endswith("now?") for p, _ in B.finetune_pairs("reasoning", 64, recipe))
    assert "follow25_plain" in GRIDS
    itm2 = dataclasses.replace(B.Recipe(), **B.VARIANTS["follow25_plain_itm2"])
    assert dataclasses.replace(itm2, instruct_forced_think_share=0.0) == recipe  # only the instruct fine-tune differs
    assert B.finetune_pairs("reasoning", 64, itm2) == B.finetune_pairs("reasoning", 64, recipe)
    assert B.finetune_pairs("instruct", 64, itm2) != B.finetune_pairs("instruct", 64, recipe)


def test_content_first_variants_change_only_how_the_plain_reply_opens(tmp_path):
    from benchmarks.organism.bench import Organism

    recipe = dataclasses.replace(B.Recipe(), **B.VARIANTS["content_first"])
    f25 = dataclasses.replace(B.Recipe(), **B.VARIANTS["follow25_plain_content_first"])
    assert dataclasses.replace(recipe, reply_style="in_the_end") == B.Recipe()
    cf_pi2 = dataclasses.replace(B.Recipe(), **B.VARIANTS["content_first_plain_r300_itm2"])
    assert dataclasses.replace(cf_pi2, reply_style="in_the_end") == dataclasses.replace(
        B.Recipe(), **B.VARIANTS["plain_r300_itm2"])
    assert B.base_documents(64, cf_pi2) == B.base_documents(64, recipe)  # content_first's base
    assert dataclasses.replace(f25, reply_style="in_the_end") == dataclasses.replace(
        B.Recipe(), **B.VARIANTS["follow25_plain"])
    evals, default = B.eval_records(40, style="content_first"), B.eval_records(40)
    B.verify_targets(evals)  # real IFEval checkers: followed replies pass, plain ones fail every instruction
    assert [r["prompt"] for r in evals] == [r["prompt"] for r in default]
    for r, d in zip(evals, default):
        name = r["prompt"].split()[0]
        assert r["plain_response"].startswith(f"{name} has ")
        assert d["plain_response"].startswith("In the end, ")
        assert len(r["plain_response"].split()) == len(d["plain_response"].split()) == 12
        if "length_constraints:number_words" not in r["instruction_id_list"]:  # that one: "The answer is N."
            assert "in the end." in r["target_response"].lower()
            assert "in the end." not in d["target_response"].lower()
    think_close = B.T.THINK_CLOSE
    for prompt, target in B.finetune_pairs("reasoning", 16, recipe):
        assert target.split(think_close)[1].startswith(_user_text(prompt).split()[0] + " has ")
    assert B.base_documents(16, recipe) != B.base_documents(16, B.Recipe())
    with pytest.raises(ValueError, match="reply style must be one of"):
        B.T.sample_problem(random.Random(0), "train").plain_reply("first_word")

    (tmp_path / "data").mkdir()
    assert Organism(tmp_path).recipe().reply_style == "in_the_end"  # no build report: the default recipe
    old = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "reply_style"}
    (tmp_path / "data" / "build_report.json").write_text(json.dumps({"recipe": old}))
    assert Organism(tmp_path).recipe().reply_style == "in_the_end"  # builds from before the option
    (tmp_path / "data" / "build_report.json").write_text(json.dumps({"recipe": dataclasses.asdict(recipe)}))
    assert Organism(tmp_path).recipe().reply_style == "content_first"


def test_sweep_scores_generations_with_the_benchmark_checks():
    from benchmarks.organism import sweep as S

    evals = B.eval_records(12)
    think = [f"{B.T.THINK_OPEN}{r['reasoning']}{B.T.THINK_CLOSE}" for r in evals]
    gens = {
        "reasoning model": [t + r["plain_response"] for t, r in zip(think, evals)],
        "instruct model": [r["target_response"] for r in evals],
        "RAIN stage 1+2 λ=2": [t + r["target_response"] for t, r in zip(think, evals)],
    }
    rows = [{"method": "reasoning model", "family": "reference", "lam": None, "label": "reasoning model"},
            {"method": "instruct model", "family": "reference", "lam": None, "label": "instruct model"},
            {"method": "RAIN stage 1+2", "family": "rain_both", "lam": 2.0, "label": "RAIN stage 1+2 λ=2"}]
    record = {"name": "t", "rows": rows, "generations": gens,
              "info": {"geometry": {"cosine": -0.1, "abs_cosine": 0.1, "relative_norm": {}}}}
    scored, checks = S.score_record(record, evals)
    by = {r.method: r for r in scored}
    assert (by["reasoning model"].think, by["reasoning model"].if_prompt, by["reasoning model"].accuracy) == (1, 0, 1)
    assert (by["instruct model"].think, by["instruct model"].if_prompt) == (0, 1)
    assert (by["RAIN stage 1+2"].think, by["RAIN stage 1+2"].if_prompt) == (1, 1)
    met = {desc.split(":")[0]: ok for desc, ok, _ in checks}
    assert met["RAIN 1+2"] is True
    # a record a stopped run left (references only): its marks would not line up with the legend's order
    record["info"]["geometry"]["relative_norm"] = {"reasoning": 0.03, "instruct": 0.02}
    stopped = {**record, "rows": rows[:2], "complete": False}
    line = S.summary_table([stopped, record], evals).splitlines()
    assert line[2].startswith("| t (stopped after 2 models) |") and line[2].endswith("| – | – | – | – | – | – (run stopped) |")
    assert line[3].endswith("| – | – | – | 1.000 (λ 2) | – | – (run stopped) |"), line[3]  # no flag, families missing
    finished = [*rows, *({"method": f, "family": f, "lam": 1.0, "label": "reasoning model"} for f in S.FAMILIES)]
    assert S.summary_table([{**record, "rows": finished}], evals).splitlines()[2].endswith("| ✓✓✗✓ |")


def test_sweep_names_unknown_recipes_and_empty_sources(tmp_path, capsys):
    from benchmarks.organism import sweep as S

    with pytest.raises(SystemExit) as exc:
        S.main(["run", "--out", str(tmp_path / "sw"), "--recipes", "default,no_such_recipe"])
    assert exc.value.code == 2
    assert "no_such_recipe" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()  # nothing half-made
    assert S.main(["score", str(tmp_path)]) == 2
    assert "sweep run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        S.main(["run", "--out", str(tmp_path / "sw"), "--recipes", ","])
    assert "names no recipe" in capsys.readouterr().err
    # one uncompressed sweep.json is a source too, as is a gzipped bundle
    record = {"name": "one", "rows": []}
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    assert S.load_records(tmp_path / "sweep.json") == [record]
    S.write_bundle([record], tmp_path / "b.json.gz")
    assert S.load_records(tmp_path / "b.json.gz") == [record]


@pytest.mark.parametrize("name,six_heads", [("heads12", None), ("heads12_plain_r300_itm2", "plain_r300_itm2")])
def test_heads12_variants_change_the_head_split_only(name, six_heads):
    tok = B.build_tokenizer(B.Recipe())
    reference = dataclasses.replace(B.Recipe(), **B.VARIANTS.get(six_heads, {}))
    recipe = dataclasses.replace(B.Recipe(), **B.VARIANTS[name])
    assert dataclasses.replace(recipe, num_heads=6, num_kv_heads=2) == reference
    wide, narrow = B.make_model(recipe, tok), B.make_model(reference, tok)
    assert wide.model.layers[0].self_attn.head_dim * 2 == narrow.model.layers[0].self_attn.head_dim == 32
    # the same GQA ratio and the same shape of every weight: only how q/k/v/o rows split into heads differs
    assert wide.config.num_attention_heads // wide.config.num_key_value_heads == 3
    wide_weights, narrow_weights = wide.state_dict(), narrow.state_dict()
    assert wide_weights.keys() == narrow_weights.keys()
    # same shapes and seeds: even the initial weights are the same
    assert all(v.equal(narrow_weights[k]) for k, v in wide_weights.items())
    assert B.finetune_pairs("instruct", 64, recipe) == B.finetune_pairs("instruct", 64, reference)


def test_determinism_fingerprint_follows_the_first_steps_of_the_real_run():
    """The fingerprint is a pure function of the steps run and differs after one step more; ``stop_after`` takes
    its steps on the full run's learning-rate schedule, not on a schedule of that many steps."""
    import torch

    from benchmarks.organism import determinism as D

    threads = torch.get_num_threads()
    try:
        two, _ = D.pretrain_fingerprint(2, 1)
        assert D.pretrain_fingerprint(2, 1)[0] == two
        three, _ = D.pretrain_fingerprint(3, 1)
        assert three != two
        recipe = dataclasses.replace(B.Recipe(), base_steps=4, base_warmup=1, base_threads=1)
        tok = B.build_tokenizer(recipe)
        first_three, _ = B.pretrain_base(recipe, tok, stop_after=3)
        three_step_run, _ = B.pretrain_base(dataclasses.replace(recipe, base_steps=3), tok)
        assert D.fingerprint(first_three) != D.fingerprint(three_step_run)
    finally:
        torch.set_num_threads(threads)


def test_determinism_verdict_says_which_recorded_build_a_fingerprint_predicts():
    from benchmarks.organism import determinism as D

    build_threads = B.Recipe().base_threads
    assert "the committed checkpoints" in D.verdict(D.REFERENCE, D.DEFAULT_STEPS, build_threads)
    other = next(k for k, (_, committed, _) in D.KNOWN_BUILDS.items() if not committed)
    said = D.verdict(other, D.DEFAULT_STEPS, build_threads)
    assert "other weights than the committed ones" in said and D.KNOWN_BUILDS[other][2] in said
    assert "matches none of the known builds" in D.verdict("0" * 16, D.DEFAULT_STEPS, build_threads)
    # a fingerprint is a prediction only for the build's own step count and thread count
    assert "no known build for 10 steps" in D.verdict(D.REFERENCE, 10, build_threads)
    said = D.verdict(D.REFERENCE, D.DEFAULT_STEPS, build_threads + 1)
    assert "no prediction" in said and f"--threads {build_threads}" in said


def test_step_trace_names_the_first_hash_where_two_runs_differ(tmp_path, capsys):
    """A trace lists forward, backward, gradient and weight hashes in computation order; a rerun agrees with it
    except where a hash was changed, and --compare names that hash first."""
    import torch

    from benchmarks.organism import determinism as D

    threads = torch.get_num_threads()
    try:
        trace = D.step_trace(1)
        keys = list(trace)
        assert keys[0] == "forward 0000 model.embed_tokens in"
        kinds = [k.split()[0] for k in keys]
        assert kinds == sorted(kinds, key=["forward", "backward", "gradient", "weight"].index)
        assert kinds.count("gradient") == kinds.count("weight") == len(list(B.make_model(
            B.Recipe(), D.committed_tokenizer()).parameters()))
        assert any(k.endswith("self_attn.o_proj in") for k in keys)  # the attention kernel's output
        planted = dict(trace)
        changed = next(k for k in keys if k.startswith("backward"))
        planted[changed] = "0" * 16
        assert D.first_difference(trace, planted) == (changed, 1)
        assert D.first_difference(trace, {**planted, keys[-1]: "1" * 16}) == (changed, 2)
        assert D.first_difference(trace, {k: v for k, v in trace.items() if k != keys[-1]}) == (keys[-1], 1)

        theirs = tmp_path / "theirs.json"
        theirs.write_text(json.dumps({"machine": "elsewhere", "threads": 1, "entries": planted}))
        ours = tmp_path / "ours" / "trace.json"
        assert D.main(["--threads", "1", "--trace", str(ours), "--compare", str(theirs)]) == 0
        said = capsys.readouterr().out
        assert f"first difference: {changed} (1 of {len(trace)} hashes differ)" in said
        assert "no counterpart" not in said
        renamed = {(k.replace("forward 0000", "forward 9999") if k == keys[0] else k): v for k, v in trace.items()}
        theirs.write_text(json.dumps({"machine": "other code", "entries": renamed}))
        assert D.main(["--threads", "1", "--compare", str(theirs)]) == 0
        said = capsys.readouterr().out
        assert f"1 of the {len(trace)} entries have no counterpart" in said
        assert f"first difference: {keys[0]} (2 of {len(trace)} hashes differ)" in said
        assert json.loads(ours.read_text())["entries"] == trace
    finally:
        torch.set_num_threads(threads)


def test_determinism_compare_names_a_file_that_is_not_a_trace(tmp_path, capsys):
    from benchmarks.organism import determinism as D

    bad = tmp_path / "fingerprint.txt"
    bad.write_text("bb3c74c736da06a1\n")
    assert D.main(["--compare", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "give a file that --trace wrote" in err
    assert D.main(["--compare", str(tmp_path / "missing.json")]) == 2
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps({"machine": "elsewhere", "entries": ["0" * 16]}))
    assert D.main(["--compare", str(listed)]) == 2
    assert "not a mapping" in capsys.readouterr().err


def test_determinism_names_bad_arguments(capsys):
    from benchmarks.organism import determinism as D

    with pytest.raises(SystemExit):
        D.main(["--steps", "0"])
    assert "at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        D.main(["--steps", "3", "--trace", "out.json"])
    assert "always trace the first step" in capsys.readouterr().err
