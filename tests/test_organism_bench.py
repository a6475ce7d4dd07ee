"""The organism benchmark's ``--quick`` path on the committed organism (skipped when it is not built)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from benchmarks.organism.bench import main as bench_main


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, run_quick) -> dict:
    out = tmp_path_factory.mktemp("organism-bench")
    run_quick("benchmarks.organism", out)
    for name in ("RESULTS.md", "results.png", "results.json"):
        assert (out / name).is_file(), name
    return json.loads((out / "results.json").read_text())


def test_every_method_has_a_row(quick_results):
    from benchmarks.organism.bench import FAMILIES

    rows = quick_results["rows"]
    methods = {r["method"] for r in rows}
    assert {"base model", "reasoning model", "instruct model", "task_arithmetic", "ties", "dare_ties",
            "dare_linear", "RAIN stage 1", "RAIN stage 2", "RAIN stage 1+2", "RAIN stage 1 sequential",
            "RAIN stage 1+2 sequential", "RAIN lam=auto", "RAIN lam=auto sequential"} <= methods
    assert any(m.startswith("slerp") for m in methods)
    assert any(m.startswith("RAIN config defaults") for m in methods)
    assert {r["family"] for r in rows} == set(FAMILIES)


def test_metrics_are_rates(quick_results):
    for row in quick_results["rows"]:
        for key in ("think", "accuracy", "if_prompt", "if_instruction"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
        assert math.isfinite(row["l_think"]) and row["l_think"] >= 0.0, row
    by_method = {r["method"]: r for r in quick_results["rows"]}
    assert by_method["reasoning model"]["l_think"] == pytest.approx(0.0, abs=1e-6)


def test_reports_geometry_disjointness_and_auto(quick_results):
    info = quick_results["info"]
    assert 0.0 <= info["geometry"]["abs_cosine"] <= 1.0
    assert set(info["geometry"]["relative_norm"]) == {"reasoning", "instruct"}
    assert all("0 (0.0%) after normalisation" in line and "; 0 held-out word problems" in line
               for line in info["overlap"])
    for key in ("auto", "defaults"):
        assert info[key]["lam"] in {r["lam"] for r in info[key]["search"]}, key


def test_per_instruction_rates_and_forced_rows(quick_results):
    rows = {r["method"]: r for r in quick_results["rows"]}
    reasoning, instruct = rows["reasoning model"], rows["instruct model"]
    # the reasoning model ignores every instruction, the instruct model follows them: the breakdown must say so
    assert reasoning["per_instruction"] and set(reasoning["per_instruction"]) == set(instruct["per_instruction"])
    assert all(v == 0.0 for v in reasoning["per_instruction"].values())
    assert min(instruct["per_instruction"].values()) >= 0.75
    forced = [r for r in quick_results["rows"] if r["template"] == "forced"]
    assert {r["family"] for r in forced} == {"forced_reference", "forced_task_arithmetic", "forced_rain_stage1",
                                             "forced_rain_both", "forced_rain_stage1_all"}
    assert all(r["method"].startswith("[forced] ") for r in forced)
    # the think tag is part of a forced prompt, so the forced reasoning model still scores as thinking
    assert rows["[forced] reasoning model"]["think"] == 1.0


def test_a_variant_run_writes_beside_the_committed_results_not_over_them(tmp_path):
    from benchmarks.organism.bench import HERE, results_folder

    assert results_folder(None, False, "default") == HERE
    assert results_folder(None, False, "orthogonal") == HERE / "variants" / "orthogonal"
    assert results_folder(tmp_path, False, "orthogonal") == tmp_path
    quick = results_folder(None, True, "default")
    assert quick.is_dir() and not quick.is_relative_to(HERE)
    quick.rmdir()


def test_one_process_gives_the_rows_of_two_workers(quick_results, tmp_path, run_quick):
    """The default run spreads rows over two spawned workers of one thread each; run in one process, also with
    one thread, every row, its order and the report must come out the same (merge times aside)."""
    run_quick("benchmarks.organism", tmp_path, "--threads", "1", "--workers", "1")
    serial = json.loads((tmp_path / "results.json").read_text())
    assert quick_results["info"]["workers"] == {"processes": 2, "threads_each": 1}
    assert serial["info"]["workers"] == {"processes": 1, "threads_each": 1}
    assert [r["method"] for r in serial["rows"]] == [r["method"] for r in quick_results["rows"]]
    for one, two in zip(serial["rows"], quick_results["rows"], strict=True):
        for key, value in one.items():
            if key == "l_think":  # reductions may group differently in another process
                assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-8), (one["method"], one["lam"])
            elif key != "merge_s":
                assert two[key] == value, (one["method"], one["lam"], key)
    assert list(serial["info"]["features_s"]) == list(quick_results["info"]["features_s"])
    for key in ("auto", "auto_sequential"):
        assert serial["info"][key]["lam"] == quick_results["info"][key]["lam"]
    assert set(serial["info"]["timings_s"]) == set(quick_results["info"]["timings_s"])


@pytest.mark.parametrize("args", [["--workers", "0"], ["--threads", "0"]])
def test_workers_and_threads_must_be_positive(args, capsys):
    assert bench_main(args) == 2
    assert "at least 1" in capsys.readouterr().err


def test_a_worker_that_cannot_load_the_organism_fails_its_jobs_instead_of_hanging(tmp_path, monkeypatch):
    """A pool respawns a worker whose initializer raises, so the map would wait forever: the error must come
    back through the first job instead."""
    import torch

    from benchmarks.organism import bench as BE

    monkeypatch.setattr(BE, "_WORKER", {})
    threads = torch.get_num_threads()
    try:
        BE.init_worker(str(tmp_path / "no-organism"), BE.QUICK, str(tmp_path / "work"), 1)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="could not load the organism.*--workers 1"):
        BE.run_job(0)


def _row(method: str, family: str, lam: float | None, think: float, acc: float, if_prompt: float):
    from benchmarks.organism.bench import Row

    return Row(method, family, lam, think, acc, if_prompt, if_prompt, 0.0, None)


def test_stage_1_plus_2_wins_only_where_both_keep_the_format():
    from benchmarks.organism.bench import stage_checks

    ref = _row("reasoning model", "reference", None, 1.0, 1.0, 0.0)
    margin = 1.5 / 240

    def verdict(pairs):
        rows = [ref]
        for lam, (s1, both) in pairs.items():
            rows += [_row("RAIN stage 1", "s1", lam, *s1), _row("RAIN stage 1+2", "both", lam, *both)]
        return stage_checks(rows, ref, "both", "s1", "", margin)[1][1]

    # a tie where both keep the format, and 1+2 feasible where stage 1 loses the format: no IF win at equal format
    assert not verdict({5: ((1.0, 1.0, 0.225), (1.0, 0.99, 0.225)), 6.5: ((0.9, 0.9, 0.33), (1.0, 0.98, 0.233))})
    # ahead by more than one prompt at two λ where both are feasible, and a higher best feasible IF
    assert verdict({4: ((1.0, 1.0, 0.20), (1.0, 1.0, 0.22)), 5: ((1.0, 1.0, 0.21), (1.0, 1.0, 0.23))})
    # ahead by one prompt only: within the margin
    assert not verdict({4: ((1.0, 1.0, 0.200), (1.0, 1.0, 0.204))})
    # 1+2 ahead of an infeasible stage 1 is no win: a tie elsewhere stays a tie
    assert not verdict({5: ((1.0, 1.0, 0.225), (1.0, 0.99, 0.225)), 6.5: ((0.9, 0.9, 0.10), (1.0, 0.98, 0.233))})


def test_target_lines_hold_at_exactly_their_thresholds():
    from benchmarks.organism.bench import target_checks

    info = {"calibration": {"eval_prompts": 240}, "geometry": {"abs_cosine": 0.5, "cosine": -0.5}}
    ref = _row("reasoning model", "reference", None, 1.0, 1.0, 31 / 240)
    ta = _row("task_arithmetic", "task_arithmetic", 1.25, 1.0, 1.0, 103 / 240)  # exactly reasoning + 0.3
    phenomenon = target_checks([ref, ta], info)[0]
    assert phenomenon[0].startswith("no task-arithmetic λ") and phenomenon[1] is False
    both = _row("RAIN stage 1+2", "rain_both", 5.0, 1.0, 1.0, 23 / 240)
    defaults = _row("RAIN config defaults (files)", "rain_files", 5.0, 1.0, 1.0, 11 / 240)  # exactly 0.05 below
    checks = target_checks([ref, both, defaults], info)
    line = [c for c in checks if c[0].startswith("RainMergingConfig()")][0]
    assert line[1] is True
    assert checks[0][0].startswith("no task-arithmetic λ") and checks[0][1] is False  # no rows: nothing shown
    s1 = _row("RAIN stage 1", "rain_stage1", 5.0, 1.0, 1.0, 22 / 240)
    line = [c for c in target_checks([ref, both, s1], info) if c[0].startswith("stage 1+2 gives more IF")][0]
    assert "best feasible IF: stage 1 0.092, stage 1+2 0.096 (1 prompt apart)" in line[2]


def test_row_notes_are_listed_once_per_row_name():
    from benchmarks.organism.bench import row_notes

    rows = [_row("ties", "ties", lam, 1.0, 1.0, 0.0) for lam in (1.0, 2.0)] + [_row("ta", "ta", 1.0, 1.0, 1.0, 0.0)]
    for row in rows[:2]:
        row.note = "density 0.5"
    assert row_notes(rows) == ["- ties: density 0.5"]


def test_disjointness_stops_on_a_held_out_word_problem_under_another_instruction():
    from benchmarks.organism.bench import HERE, Organism, check_disjoint, read_records

    org = Organism(HERE)
    evals = [r["prompt"] for r in read_records(org.data("eval_prompts.jsonl"))]
    assert any("0 held-out word problems" in line for line in check_disjoint(org, evals, check_training=False))
    calibration = read_records(org.data("instruction_calibration.jsonl"))[0]["prompt"]
    reworded = calibration.split("?", 1)[0] + "? Answer in capital letters only."
    assert reworded != calibration
    with pytest.raises(RuntimeError, match="instruction_calibration.jsonl.*1 shared word problems"):
        check_disjoint(org, evals + [reworded], check_training=False)


def test_cli_refuses_runs_that_would_mislabel_or_replace_results(tmp_path, capsys, monkeypatch):
    from benchmarks.organism import bench

    def accepted(*args, **kwargs):  # a run that got past the checks must not write the committed results
        raise AssertionError("the run was accepted")

    monkeypatch.setattr(bench, "Bench", accepted)
    monkeypatch.setattr(bench, "out_folder_problem", lambda out: None)
    monkeypatch.setattr(bench, "configure_logging", lambda fmt: None)  # the run's logging, not the suite's
    monkeypatch.setattr(bench.torch, "set_num_threads", lambda n: None)  # nor its thread count
    other = tmp_path / "other-organism"
    assert bench_main(["--organism", str(other)]) == 2  # would replace the committed RESULTS.md
    # the hint names only grids --grids takes (several built variants have none: --out is their way)
    assert "give --out DIR, or --grids NAME for a `build --variant NAME` organism (NAME one of ['follow25_plain'," \
        in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))  # --organism=~/x and --out=~/y reach the script unexpanded
    assert bench_main(["--organism=~/other-organism", "--out=~/results"]) == 2
    assert f"The organism is not built (missing {other}/checkpoints" in capsys.readouterr().err
    assert bench_main(["--quick", "--grids", "orthogonal"]) == 2
    assert "--quick runs its own small grids" in capsys.readouterr().err
    # variants/NAME/ holds the results of `build --variant NAME`: not the committed organism's, nor another
    # variant's that shares the grid
    assert bench_main(["--grids", "orthogonal"]) == 2
    assert "--grids orthogonal without --out writes variants/orthogonal/, the results of `build --variant " \
           "orthogonal`, but --organism" in capsys.readouterr().err
    from benchmarks.organism import build

    for role in ("base", "reasoning", "instruct"):
        (other / "checkpoints" / role).mkdir(parents=True)
        (other / "checkpoints" / role / "model.safetensors").touch()
    for name in ("eval_prompts.jsonl", "reasoning_calibration.json", "instruction_calibration.jsonl",
                 "prompts_only.jsonl"):
        (other / "data").mkdir(exist_ok=True)
        (other / "data" / name).touch()
    recipe = dataclasses.replace(build.Recipe(), **build.VARIANTS["follow25_plain_itm2"])
    (other / "data" / "build_report.json").write_text(json.dumps({"recipe": dataclasses.asdict(recipe)}))
    assert bench_main(["--organism", str(other), "--grids", "follow25_plain"]) == 2
    assert "built with another recipe (instruct_forced_think_share differ)" in capsys.readouterr().err


def test_grid_edge_picks_are_marked_and_bad_shared_calibration_is_a_note(tmp_path, monkeypatch):
    from benchmarks.organism import bench as BE

    search = [{"lam": 4.0, "l_think": 0.004, "think_open": 1.0}, {"lam": 5.0, "l_think": 0.008, "think_open": 1.0}]
    record = {"lam": 5.0, "search": search, "max_kl": 0.01, "min_think_open": 0.98}
    assert "grid's largest value, which passed" in BE._edge_text(record)
    assert BE._edge_text(dict(record, lam=4.0)) == ""  # the data stopped it
    assert BE._edge_text(dict(record, max_kl=0.005)) == ""  # λ 5 failed (a fallback, not an edge pick)
    assert BE._edge_text(dict(record, min_think_open=1.01)) == ""
    nan = [search[0], dict(search[1], l_think=None)]  # a NaN L_think is null in the sidecar and fails the budget
    assert BE._edge_text(dict(record, search=nan)) == ""
    assert BE._search_text(dict(record, search=nan)) == "4: 0.0040 [1.000], 5: NaN [1.000]"

    class Tokenizer:
        def encode(self, text, add_special_tokens=False):
            return text.split()

    monkeypatch.setattr(BE, "SHARED_CALIBRATION", tmp_path)
    for content in ("[]", '{"prompt": "not a list"}', "[1, 2]", "not json"):
        (tmp_path / "reasoning_calibration_set.json").write_text(content)
        assert "is not a non-empty JSON list of records" in BE.shared_calibration_note(Tokenizer(), 512), content
    (tmp_path / "reasoning_calibration_set.json").write_text('[{"prompt": "a b", "response": "c"}]')
    assert "1 real R1 reasoning traces" in BE.shared_calibration_note(Tokenizer(), 512)


def test_script_arguments_that_cannot_work_get_a_message(tmp_path):
    import argparse

    from benchmarks.organism.bench import out_folder_problem, positive_int

    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert out_folder_problem(out) == f"--out {out}: a file is in the way (the path or one of its parents is a " \
                                          "file); give a folder."
    assert out_folder_problem(tmp_path / "new" / "deeper") is None and (tmp_path / "new" / "deeper").is_dir()
    assert positive_int("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)


def test_generations_are_scored_strictly_on_the_answer():
    from benchmarks.organism import tasks as T
    from benchmarks.organism.bench import score_generations

    evals = [{"prompt": "Answer in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
              "kwargs": [{}], "answer": 5}]
    # loose IFEval drops the first line and would pass; strict does not; the thinking (capitals) is not scored
    outs = [f"{T.THINK_OPEN}Think About It{T.THINK_CLOSE}A Title\nthe answer is 5."]
    scores = score_generations(evals, outs)
    assert (scores["think"], scores["accuracy"], scores["if_prompt"], scores["if_instruction"]) == (1.0, 1.0, 0.0, 0.0)
    assert scores["per_instruction"] == {"change_case:english_lowercase": 0.0}
    scores = score_generations(evals, [f"{T.THINK_OPEN}Think About It{T.THINK_CLOSE}the answer is 5."])
    assert (scores["if_prompt"], scores["if_instruction"]) == (1.0, 1.0)
