"""The command lines of the GPU check, the memory benchmark and the punkt comparison (their figures are measured
by running them)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, merge_memory


def test_gpu_check_fails_a_nan_difference_and_takes_no_arguments():
    zeros = {"a": torch.zeros(2), "b": torch.zeros(2)}
    # max() over floats drops a NaN that is not met first: the check printed OK for a merge that went NaN
    assert gpu_check.max_diff(zeros, {"a": torch.zeros(2), "b": torch.tensor([float("nan"), 0.0])}) == float("inf")
    assert gpu_check.max_diff(zeros, {"a": torch.tensor([0.5, 0.0]), "b": torch.zeros(2)}) == 0.5
    with pytest.raises(SystemExit) as exc:  # not silently ignored, on a machine whose GPU time is scarce
        gpu_check.main(["--shape", "1.5b"])
    assert exc.value.code == 2


def test_merge_memory_reads_a_relative_workdir_from_the_callers_folder(tmp_path, monkeypatch, capsys):
    for bad in ("foo", "nan", "inf", "-1"):
        with pytest.raises(SystemExit) as exc:
            merge_memory.main(["--lam", bad])
        assert exc.value.code == 2 and f"--lam {bad!r}: give a finite number ≥ 0, or auto" in capsys.readouterr().err
    # refused before the build, not by the merge's traceback after it (and not exit 1, a missed target)
    for bad, says in ((["--samples", "0"], "--samples 0: each stage needs at least 1"),
                      (["--device", "gpu"], "--device 'gpu'")):
        with pytest.raises(SystemExit) as exc:
            merge_memory.main(["--workdir", str(tmp_path / "never"), *bad])
        assert exc.value.code == 2 and says in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            merge_memory.main(["--workdir", str(tmp_path / "never"), "--device", "cuda"])
        assert exc.value.code == 2 and "sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    monkeypatch.chdir(tmp_path)
    assert merge_memory.main(["--shape", "tiny", "--samples", "4", "--workdir", "rel"]) == 0
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["merged-tiny", "qwen2-tiny"]
    out = capsys.readouterr().out
    assert "stage 1: 2 forward passes for 1 batches over 2 layers, and 1 of the think_spacing check: OK" in out
    assert re.search(r"shape tiny: 0\.\d+M parameters", out)  # not rounded to "0M"
    # a build stopped before it finished is redone, not trusted for the files it left
    (tmp_path / "rel" / "qwen2-tiny" / "built").unlink()
    (tmp_path / "rel" / "qwen2-tiny" / "instruct" / "model.safetensors").write_bytes(b"cut off")
    assert merge_memory.main(["--shape", "tiny", "--samples", "4", "--workdir", "rel", "--lam", "auto"]) == 0
    assert "wall time (load + stage 1 + stage 2 + λ search + merge + save)" in capsys.readouterr().out


def test_side_benchmarks_refuse_arguments_that_would_fail_late_or_overwrite_committed_files(tmp_path, capsys):
    from benchmarks.organism import first_token, stage2
    from benchmarks.organism.bench import HERE

    for bad in ("nan", "inf", "-1", "4,nan"):  # refused before any model loads, not as a checkpoint's NaN
        with pytest.raises(SystemExit) as exc:
            stage2.main(["--lams", bad, "--out", str(tmp_path / "s2")])
        assert exc.value.code == 2 and "each λ is a finite number >= 0" in capsys.readouterr().err
    other = tmp_path / "organism"  # another organism: its figures must not replace the committed FIRST_TOKEN.md
    other.mkdir()
    for part in ("checkpoints", "data"):
        (other / part).symlink_to(HERE / part)
    before = (HERE / "FIRST_TOKEN.md").read_bytes()
    assert first_token.main(["--organism", str(other)]) == 2
    assert "give --out DIR" in capsys.readouterr().err and (HERE / "FIRST_TOKEN.md").read_bytes() == before


def test_punkt_comparison_counts_no_difference_against_the_projects_own_model(tmp_path, capsys, monkeypatch):
    from benchmarks import punkt_vs_nltk
    from rain_hf.evaluation import ensure_nltk_data

    monkeypatch.setattr("nltk.data.path", list(__import__("nltk").data.path))  # ensure_nltk_data puts its folder first
    english = os.path.join(ensure_nltk_data(str(tmp_path / "nltk")), "tokenizers", "punkt_tab", "english")
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    answer = "Dr. Lee sat down. He smiled."
    (calibration / "instruction_calibration_set.jsonl").write_text(json.dumps({"response": answer}) + "\n")
    (calibration / "reasoning_calibration_set.json").write_text(json.dumps([{"response": answer}]))
    assert punkt_vs_nltk.main(["--english", english, "--calibration", str(calibration)]) == 0
    out = capsys.readouterr().out
    assert "calibration answers (sentence count differs): 0 of 2" in out
    assert '"in <abbreviation> <Word>" sentences (split differs): 0 of 120' in out
    # a model without "dr" as an abbreviation splits the answers differently, and the count says so
    abbreviations = Path(english, "abbrev_types.txt").read_text().split("\n")
    Path(english, "abbrev_types.txt").write_text("\n".join(a for a in abbreviations if a.strip() != "dr"))
    assert punkt_vs_nltk.main(["--english", english, "--calibration", str(calibration)]) == 0
    assert "calibration answers (sentence count differs): 2 of 2" in capsys.readouterr().out
    for bad, says in ((tmp_path / "missing", "does not exist"), (calibration, "not nltk's punkt_tab language folder")):
        with pytest.raises(SystemExit) as exc:  # one line, not a traceback
            punkt_vs_nltk.main(["--english", str(bad), "--calibration", str(calibration)])
        assert exc.value.code == 2 and says in capsys.readouterr().err
