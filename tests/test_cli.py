"""rain-merge: --help, YAML validation and error reporting, and end-to-end runs on tiny random models."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rain_hf import testing
from rain_hf.cli import TOP_LEVEL_KEYS, load_job, main
from rain_hf.config import RainMergingConfig

REPO = Path(__file__).resolve().parents[1]


def _write(folder: Path, data: dict | str, name: str = "merge.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _minimal(folder: Path, **extra) -> dict:
    """A valid job with local model folders (empty: enough for YAML validation) and calibration files."""
    for role in ("base", "reasoning", "instruct"):
        (folder / "models" / role).mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "r.json").write_text("[]")
    (folder / "data" / "i.jsonl").write_text("")
    job = {"base_model": "./models/base", "reasoning_model": "./models/reasoning", "instruct_model": "./models/instruct",
           "method": "rain", "parameters": {"lam": 1.0},
           "calibration": {"reasoning": "data/r.json", "instruction": "data/i.jsonl"}}
    job.update(extra)
    return job


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in err
    assert lines[-1].startswith("rain-merge: error: ")
    errors = [line for line in lines if line.startswith("rain-merge: error:")]
    assert len(errors) == 1
    return lines[-1]


# ---------------------------------------------------------------------------------------------- help
def test_help_documents_every_key(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in TOP_LEVEL_KEYS:
        assert f"\n  {key}\n" in out, key
    fields = [f.name for f in dataclasses.fields(RainMergingConfig)]
    for name in fields:
        assert f"\n  {name} (default: " in out, name
    # only fields are listed: "word: " inside a wrapped description is no key of its own
    assert set(re.findall(r"\n  ([a-z_0-9]+) \(default: ", out)) == set(fields)
    assert "the projection also covers what the earlier merged layers changed" in " ".join(out.split())
    assert "(undocumented)" not in out
    for key in ("max_shard_size", "private", "card_template", "reasoning: PATH", "instruction: PATH", "revision"):
        assert key in out
    for flag in ("--out", "--push-to-hub", "--device", "--dry-run", "--overwrite", "--verbose"):
        assert flag in out
    # descriptions come from RainMergingConfig's docstring
    assert 'radius r of the "window" position set' in out and "``" not in out
    assert "lam_grid (default: [0.5, 1.0" in out


def test_help_does_not_import_torch():
    code = "import sys; from rain_hf.cli import main; assert main(['--help']) == 0; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_usage_errors_are_one_line(capsys):
    assert main([]) == 2
    _one_error_line(capsys.readouterr().err)
    assert main(["x.yaml", "--bogus"]) == 2
    assert "--bogus" in _one_error_line(capsys.readouterr().err)
    assert main(["x.yaml", "merged/", "--cuda"]) == 2  # mergekit-yaml's positional output folder and GPU flag
    assert ("unrecognized arguments: merged/ --cuda; the output folder is an option here: --out merged/; --cuda: for "
            "a GPU pass --device cuda") in _one_error_line(capsys.readouterr().err)
    for argv in (["x.yaml", "--random-seed", "3"], ["x.yaml", "--out", "o", "extra/"]):  # a flag's value; --out given
        assert main(argv) == 2
        assert "the output folder is an option" not in _one_error_line(capsys.readouterr().err), argv


def test_mergekit_users_are_pointed_to_where_a_setting_goes(tmp_path, capsys):
    # the output folder written into the file, as mergekit's out_path or a trainer's output_dir
    folder_hint = "The output folder is the command line's --out DIR."
    cases = [
        (dict(out_path="./merged"), "unknown key(s) ['out_path'] ('out_path': the output folder is the command "
                                    "line's --out DIR, not a key of the file); known keys"),
        (dict(output="./merged"), "'output' must be a mapping with keys ['max_shard_size', 'private', "
                                  f"'card_template']. {folder_hint}"),
        (dict(output={"path": "./merged"}), "unknown output key(s) ['path']; known: ['max_shard_size', 'private', "
                                            f"'card_template']. {folder_hint}"),
        # keys of the file's top level or of output: written under parameters
        (dict(parameters={"lam": 1.0, "dtype": "bfloat16"}), "'dtype' is not a merge parameter: it goes at the top "
                                                             "level of the file, not under parameters:."),
        (dict(parameters={"lam": 1.0, "private": True}), "'private' is not a merge parameter: it goes under "
                                                         "output: (output.private), not under parameters:."),
    ]
    for extra, expected in cases:
        config = _write(tmp_path, _minimal(tmp_path, **extra))
        assert main([str(config), "--out", str(tmp_path / "out")]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert expected in line, line
        assert (folder_hint in line) == ("output" in extra), line
    # a printed job does not show the token its file gives
    config = _write(tmp_path, _minimal(tmp_path, token="hf_from_the_yaml"))
    assert "hf_from_the_yaml" not in repr(load_job(config)) and load_job(config).token == "hf_from_the_yaml"
    # max_shard_size is both a parameter and an output key: under parameters it is taken
    config = _write(tmp_path, _minimal(tmp_path, parameters={"lam": 1.0, "max_shard_size": "1GB"}))
    assert load_job(config).config.max_shard_size == "1GB"
    # --out=~/FILE reaches rain-merge unexpanded (the shell expands ~ only at a word's start)
    (tmp_path / "afile").write_text("x")
    config = _write(tmp_path, _minimal(tmp_path, method="task_arithmetic", calibration=None))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path))
        assert main([str(config), "--out=~/afile", "--overwrite"]) == 2
    assert "--out '~/afile' is a file, not a folder: pick another path." in _one_error_line(capsys.readouterr().err)
    # mergekit-yaml's switches take no value: the folder after one is still the output folder
    for argv in (["x.yaml", "--cuda", "merged/"], ["x.yaml", "--lazy-unpickle", "merged/"]):
        assert main(argv) == 2
        assert "the output folder is an option here: --out merged/" in _one_error_line(capsys.readouterr().err)
    assert main(["x.yaml", "--out", "o", "--copy-tokenizer"]) == 2
    assert ("unrecognized arguments: --copy-tokenizer; --copy-tokenizer: the reasoning model's tokenizer and chat "
            "template are always saved with the merge") in _one_error_line(capsys.readouterr().err)


def test_library_messages_in_the_yaml_terms():
    from rain_hf.cli import _YamlTerms, yaml_terms

    assert yaml_terms("config.layers names layers [5]; set RainMergingConfig(stage2=False) or device='cpu'") == (
        "parameters.layers names layers [5]; set parameters.stage2: False or --device cpu")
    assert yaml_terms("RainMergingConfig.method='linear' is not one of") == "method='linear' is not one of"
    assert yaml_terms("load with torch_dtype='float32'") == "load with dtype: float32"
    # settings written name=value in prose read as the YAML writes them ...
    assert yaml_terms("Use rcond >= 1e-05 or precision='float64'; not read: lam=3.0, lam_grid=[1.0, 2.0]") == (
        "Use rcond >= 1e-05 or parameters.precision: float64; not read: parameters.lam: 3.0, parameters.lam_grid: "
        "[1.0, 2.0]")
    # ... but not inside paths, URLs or calls written out (Hydra-style run folders are named lam=2.0,rho=0.5)
    for untouched in ("/runs/lam=2.0,rho=0.5/merged/config.json", "--out '/runs/lam=2.0/merged' already exists",
                      "see https://x/?seed=0&window=5", "C:\\runs\\lam=2\\out",
                      "RainMergingConfig(layers=list(range(4)), lam=2)", "f(a=1,lam=2)", "a/lam=2"):
        assert yaml_terms(untouched) == untouched, untouched
    for untouched in ("/data/config.layers/model.safetensors", "C:\\m\\config.lam", "config.json",
                      "RainMergingConfig(stage2=False, lam=1.0)", "model.config.layers", "config.unknown_name"):
        assert yaml_terms(untouched) == untouched
    record = logging.LogRecord("rain_hf", logging.WARNING, __file__, 1, "%d modules", ("two",), None)
    assert _YamlTerms().filter(record)  # a formatting mistake is left to the handler, as logging does


# ---------------------------------------------------------------------------------------------- YAML errors
@pytest.mark.parametrize("content, expected", [
    ("base_model: [unclosed\n", "invalid YAML at line"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ({"base_model": "a/b", "reasoning_model": "c/d", "instruct_model": "e/f", "lam": 1},
     "unknown key(s) ['lam']; known keys: ['base_model'"),  # ... "Merge parameters go under 'parameters:'."
    ({"base_model": "a/b", "reasoning_model": "c/d", "instruct_model": "e/f", "paramters": {"lam": 1}},
     "unknown key(s) ['paramters'] ('paramters': did you mean 'parameters'?); known keys"),
    ({"base_model": "a/b", "reasoning_model": "c/d", "instruct_model": "e/f", "max_lenght": 512},
     "Merge parameters go under 'parameters:' ('max_lenght': did you mean parameters.max_length?)."),
    ({"base_model": "a/b", "reasoning_model": "c/d"}, "'instruct_model' is missing"),
    ({"base_model": "a/b", "models": [{"model": "c/d"}], "merge_method": "ties", "tokenizer_source": "base"},
     "unknown key(s) ['merge_method', 'models', 'tokenizer_source'] ('merge_method' is mergekit's: use method) "
     "('models' is mergekit's: name the models base_model, reasoning_model and instruct_model) ('tokenizer_source' "
     "is mergekit's: the reasoning model's tokenizer is kept); known keys"),
    ({"base_model": "a/b", "reasoning_model": "c/d", "instruct_model": "e/f", "features": "f.safetensors"},
     "unknown key(s) ['features'] ('features': precomputed thinking features are a Python option, "
     "RainMerger.from_pretrained(features=...); a rain-merge run computes them from calibration.reasoning); known "
     "keys: ['base_model', "),
])
def test_bad_yaml_exits_2_with_one_line(tmp_path, capsys, content, expected):
    code = main([str(_write(tmp_path, content)), "--out", str(tmp_path / "out")])
    assert code == 2
    assert expected in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("parameters, expected", [
    ({"lam": 1.0, "lamda": 2.0}, "Unknown keys under parameters: ['lamda'] ('lamda': did you mean 'lam'?); known keys: ["),
    ({"weight": 1.0, "t": 0.5, "normalize": True}, "Unknown keys under parameters: ['normalize', 't', 'weight'] "
     "('normalize' is mergekit's: no such switch: TIES and DARE follow peft's conventions (see rain_hf.methods)) "
     "('t' is mergekit's: use slerp_t) ('weight' is mergekit's: use lam); known keys: ["),
    ({"density": 2.0}, "density=2.0 must be <= 1"),
    ({"int8_mask": True}, "('int8_mask' is mergekit's: leave it out: in mergekit it only stores the masks in int8"),
    ({"positions": "everywhere"}, "positions='everywhere' is not one of"),
    ({"positions": "Window"}, "is not one of ['think', 'think+prev', 'window', 'window-before-answer'] (did you mean "
                              "'window'?)"),
    ({"rcond": 1e-9}, "rcond=1e-09 is below what a float32 SVD resolves: singular values under about 1e-05·σ_max "
                      "are rounding noise there, and protecting their directions would remove task-vector directions "
                      "no feature asks to protect. Use rcond >= 1e-05 or parameters.precision: float64."),
    ({"rcond": 1e-14, "precision": "float64"}, "Use rcond >= 1e-13."),
    ({"stage1": "yes please"}, "stage1 must be true or false"),
    ({"lam_grid": ["1e-2", "x"]}, "lam_grid"),
    ({"lam": "auto", "max_reasoning_samples": 1}, "max_reasoning_samples=1 with parameters.lam: auto: the search holds out 1 "
                                                  "of them to measure L_think, which leaves none for stage 1. Allow "
                                                  "at least 2 samples, or set lam to a number."),
])
def test_bad_parameters_exit_2(tmp_path, capsys, parameters, expected):
    config = _write(tmp_path, _minimal(tmp_path, parameters=parameters))
    assert main([str(config), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line and str(config) in line


def test_small_rcond_is_accepted_where_it_is_resolved_or_unused():
    from rain_hf.config import RainMergingConfig

    RainMergingConfig(rcond=1e-9, precision="float64").validate()
    RainMergingConfig(rcond=1e-9, projection="ridge").validate()  # ridge does not cut singular values
    RainMergingConfig(ridge=1e-10, projection="ridge").validate()
    RainMergingConfig(ridge=1e-14, projection="ridge", precision="float64").validate()
    RainMergingConfig(ridge=1e-14).validate()  # the svd projection does not read it


def test_ridge_below_what_float32_resolves_is_refused():
    from rain_hf.config import ConfigError, RainMergingConfig

    # ε = ridge·σ_max² would half-protect float32 rounding noise at √ridge·σ_max = 1e-7·σ_max
    with pytest.raises(ConfigError, match=r"ridge=1e-14 is below what a float32 SVD resolves: .* about 1e-07·σ_max"
                                          r".* Use ridge >= 1e-10 or precision='float64'\."):
        RainMergingConfig(ridge=1e-14, projection="ridge").validate()


@pytest.mark.parametrize("change, expected", [
    ({"calibration": {"reasoning": "data/missing.json", "instruction": "data/i.jsonl"}}, "does not exist"),
    ({"calibration": {"instruction": "data/i.jsonl"}}, "needs 'calibration: {reasoning: PATH}'"),
    ({"calibration": {"reasoning": "data/r.json", "instructions": "x"}},
     "unknown calibration key(s) ['instructions'] ('instructions': did you mean 'instruction'?)"),
    ({"dtype": "float8"}, "dtype 'float8' is not one of"),
    ({"output": {"max_shard_size": "lots"}}, "max_shard_size='lots' is not a size"),
    ({"output": {"privat": True}}, "unknown output key(s) ['privat'] ('privat': did you mean 'private'?)"),
    ({"instruct_model": {"path": "a/b", "revison": "x"}},
     "needs 'path' (and optionally 'revision'); got keys ['path', 'revison'] ('revison': did you mean 'revision'?)"),
    ({"method": "ties", "parameters": {"method": "slerp"}}, "give it once"),
    # keys of a model entry, of output: or of the command line, put at the top level
    ({"revision": "main"}, "('revision': a revision belongs to one model: base_model: {path: org/name, revision: "),
    ({"private": True}, "('private': it goes under output: (output.private))"),
    ({"device": "cuda"}, "('device': the device is the command line's --device, not a key of the file)"),
    ({"token": 123}, "'token' must be a string"),
    ({"parameters": []}, "'parameters' must be a mapping"),  # not read as "no parameters"
    ({"output": False}, "'output' must be a mapping"),
    ({"output": {"card_template": ["a"]}}, "output.card_template must be a file path, got ['a']"),
    ({"calibration": {"reasoning": True, "instruction": "data/i.jsonl"}}, "calibration.reasoning must be a file path"),
])
def test_bad_sections_exit_2(tmp_path, capsys, change, expected):
    config = _write(tmp_path, _minimal(tmp_path, **change))
    assert main([str(config), "--out", str(tmp_path / "out")]) == 2
    assert expected in _one_error_line(capsys.readouterr().err)


def test_verbose_shows_the_traceback(tmp_path, capsys):
    config = _write(tmp_path, _minimal(tmp_path, parameters={"density": 2.0}))
    assert main([str(config), "--out", str(tmp_path / "out"), "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("rain-merge: error: ")


def test_out_is_required_and_not_clobbered(tmp_path, capsys):
    config = _write(tmp_path, _minimal(tmp_path))
    assert main([str(config)]) == 2
    assert "--out DIR is required" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "data" / "r.json").write_text('[{"prompt": "2+2?"}]')  # the data checks come first and pass
    (tmp_path / "data" / "i.jsonl").write_text('{"prompt": "Say hi."}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main([str(config), "--out", str(tmp_path / "out")]) == 2  # not offering --overwrite, which would not do
    assert "is not an earlier output of this tool" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "out" / "rain_merging_config.json").write_text("{}")
    assert main([str(config), "--out", str(tmp_path / "out")]) == 2
    assert "already exists; pass --overwrite" in _one_error_line(capsys.readouterr().err)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_unreadable_yaml_exits_2(tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("base_model: caf\xe9\n".encode("latin-1"))
    assert main([str(tmp_path / "latin1.yaml"), "--dry-run"]) == 2
    assert "not UTF-8 text (byte 15); save the YAML file as UTF-8" in _one_error_line(capsys.readouterr().err)


def test_a_yaml_of_nested_aliases_is_refused_before_any_message_writes_it_out(tmp_path, capsys):
    # 10 aliases of 10 aliases …: 500 bytes that stand for 10**8 strings, which "dtype ... is not one of" would print
    anchors = ", ".join([f"&a0 [{', '.join(['lol'] * 10)}]"]
                        + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)])
    config = tmp_path / "laughs.yaml"
    config.write_text(f"base_model: a/b\nreasoning_model: c/d\ninstruct_model: e/f\ndtype: [{anchors}]\n")
    assert main([str(config), "--dry-run"]) == 2
    assert "the YAML expands to more than 10000 values through its aliases (*name)" in _one_error_line(
        capsys.readouterr().err)
    # aliases as people use them (one value named twice, a recursive one) are read
    from rain_hf.cli import _expanded_size

    recursive = []
    recursive.append(recursive)
    assert _expanded_size({"a": [1, 2], "b": [1, 2]}) == 9 and _expanded_size(recursive) == 1


def test_the_token_on_a_broken_yaml_line_stays_out_of_the_verbose_traceback(tmp_path, capsys):
    for text in ("token: hf_SECRET: x\n", "token: hf_SECRET\ntoken: hf_SECRET\n"):
        config = tmp_path / "job.yaml"
        config.write_text("base_model: a/b\nreasoning_model: c/d\ninstruct_model: e/f\n" + text)
        assert main([str(config), "--dry-run", "--verbose"]) == 2
        err = capsys.readouterr().err
        assert "invalid YAML at line" in err and "hf_SECRET" not in err, err


def test_sigterm_removes_the_half_written_output(triple, tmp_path, capsys, monkeypatch):
    import os
    import signal

    from rain_hf import writer

    root, _ = triple
    write = writer.ShardedSafetensorsWriter.write

    def terminated_midway(self, name, tensor):
        write(self, name, tensor)
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill`, `timeout` and job schedulers send

    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "write", terminated_midway)
    before = signal.getsignal(signal.SIGTERM)
    config = _job_file(root, tmp_path, method="task_arithmetic", calibration=None)
    assert main([str(config), "--out", str(tmp_path / "out")]) == 128 + signal.SIGTERM
    assert "terminated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_exits_130_and_removes_the_half_written_output(triple, tmp_path, capsys, monkeypatch):
    from rain_hf import writer

    root, _ = triple
    write = writer.ShardedSafetensorsWriter.write

    def interrupted_midway(self, name, tensor):
        write(self, name, tensor)
        raise KeyboardInterrupt  # Ctrl-C

    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "write", interrupted_midway)
    config = _job_file(root, tmp_path, method="task_arithmetic", calibration=None)
    assert main([str(config), "--out", str(tmp_path / "out")]) == 130  # 128 + SIGINT, as shells report it
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder_is_a_configuration_error(tmp_path, capsys, monkeypatch):
    # a name written as a path is never a Hub id: a missing folder is the YAML's problem (exit 2), named at once
    config = _write(tmp_path / "configs", _minimal(tmp_path / "configs", base_model="./models/nowhere"))
    assert main([str(config), "--dry-run"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert re.search(r"base_model: './models/nowhere' names the local folder .*configs/models/nowhere, which does "
                     r"not exist\. Model paths are relative to the YAML file's folder", line)
    (tmp_path / "models" / "nowhere").mkdir(parents=True)  # relative to the working directory, as mergekit reads
    monkeypatch.chdir(tmp_path)
    assert main([str(config), "--dry-run"]) == 2
    assert "It exists under the current directory, but model paths are relative to the YAML file" in _one_error_line(
        capsys.readouterr().err)
    config = _write(tmp_path, _minimal(tmp_path, base_model={"path": 5}))
    assert main([str(config), "--dry-run"]) == 2
    assert "base_model.path 5 is not a string" in _one_error_line(capsys.readouterr().err)


def test_a_hub_id_that_cannot_be_fetched_names_the_folder_the_cli_looked_in(tmp_path, capsys, monkeypatch):
    config = _write(tmp_path / "configs", _minimal(tmp_path / "configs", base_model="org/missing-model"))
    (tmp_path / "configs" / "data" / "r.json").write_text('[{"prompt": "2+2?"}]')  # the data checks come first
    (tmp_path / "configs" / "data" / "i.jsonl").write_text('{"prompt": "Say hi."}\n')
    monkeypatch.chdir(tmp_path)
    assert main([str(config), "--dry-run"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"no local folder {tmp_path / 'configs' / 'org' / 'missing-model'} (model paths are relative" in line
    assert f"{tmp_path / 'org'}" not in line.replace(str(tmp_path / "configs"), "")


def test_config_paths_that_are_not_files_and_out_naming_an_input_file(tmp_path, capsys):
    assert main([str(tmp_path), "--dry-run"]) == 2
    assert "is a folder; pass the YAML file in it" in _one_error_line(capsys.readouterr().err)
    config = _write(tmp_path, _minimal(tmp_path))
    (tmp_path / "data" / "r.json").write_text('[{"prompt": "2+2?"}]')  # the data checks come first
    (tmp_path / "data" / "i.jsonl").write_text('{"prompt": "Say hi."}\n')
    for out in (config, tmp_path / "data" / "r.json"):
        assert main([str(config), "--out", str(out)]) == 2
        assert "itself; --out names the folder the merged model is written to" in _one_error_line(
            capsys.readouterr().err)


def test_help_survives_a_console_that_cannot_encode_it(tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    code = "import sys; from rain_hf.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode("cp1252")
    assert b"\\u03b8" in done.stdout and b"Traceback" not in done.stderr


def test_load_job_resolves_paths_revisions_and_numbers(tmp_path):
    job_dict = _minimal(tmp_path, instruct_model={"path": "Qwen/Qwen2.5-7B-Instruct", "revision": "abc123"},
                        parameters={"ridge": "1e-2", "lam": "auto", "layers": [0, 1]},
                        dtype="bfloat16", output={"max_shard_size": "500MB", "private": True})
    job = load_job(_write(tmp_path, job_dict))
    assert job.models["base"] == str((tmp_path / "models" / "base").resolve())
    assert job.models["instruct"] == "Qwen/Qwen2.5-7B-Instruct"  # a Hub id stays a Hub id
    assert job.revision == {"instruct": "abc123"}
    assert job.config.ridge == 0.01 and job.config.lam == "auto" and job.config.layers == [0, 1]
    lam_grid = load_job(_write(tmp_path, _minimal(tmp_path, parameters={"lam_grid": ["5e-1", 1, "1.5"]})))
    assert lam_grid.config.lam_grid == [0.5, 1.0, 1.5]
    assert job.calibration["reasoning"] == (tmp_path / "data" / "r.json").resolve()
    assert (job.dtype, job.max_shard_size, job.private) == ("bfloat16", "500MB", True)


def test_example_configs_parse(tmp_path):
    # the 7B example names Hub models and calibration files the user supplies: give it placeholder files
    shutil.copy(REPO / "examples" / "qwen7b_rain.yaml", tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("reasoning_calibration.json", "instruction_calibration.jsonl"):
        (tmp_path / "data" / name).write_text("")
    job = load_job(tmp_path / "qwen7b_rain.yaml")
    assert job.models == {"base": "Qwen/Qwen2.5-7B", "reasoning": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
                          "instruct": "Qwen/Qwen2.5-7B-Instruct"}
    assert job.config.method == "rain" and job.dtype == "bfloat16"

    organism = REPO / "examples" / "organism_rain.yaml"
    data = yaml.safe_load(organism.read_text())
    for key in ("base_model", "reasoning_model", "instruct_model"):
        assert data[key].startswith("../benchmarks/organism/checkpoints/")
    RainMergingConfig.from_dict({"method": data["method"], **data["parameters"]})
    if (REPO / "benchmarks" / "organism" / "data" / "reasoning_calibration.json").exists():
        job = load_job(organism)
        assert job.models["reasoning"] == str(REPO / "benchmarks" / "organism" / "checkpoints" / "reasoning")


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    from rain_hf import testing
    root = tmp_path_factory.mktemp("triple")
    paths = testing.build_triple(root, "qwen2")
    (root / "reasoning.json").write_text(json.dumps(testing.reasoning_records(4)))
    (root / "instruction.jsonl").write_text("\n".join(json.dumps(r) for r in testing.instruction_records(4)))
    return root, paths


def _job_file(root: Path, tmp_path: Path, **extra) -> Path:
    job = {"base_model": "base", "reasoning_model": "reasoning", "instruct_model": "instruct",
           "parameters": {"lam": 1.0, "batch_size": 2},
           "calibration": {"reasoning": "reasoning.json", "instruction": "instruction.jsonl"}}
    job.update(extra)
    return _write(root, job, name=f"{tmp_path.name}.yaml")


def test_dtype_auto_that_loads_narrower_is_refused_before_the_load(triple, tmp_path, capsys, monkeypatch):
    # float32 weights whose config.json says bfloat16 (common on the Hub): transformers' auto loads bfloat16
    root, paths = triple
    narrow = root / f"{tmp_path.name}-reasoning"
    shutil.copytree(paths["reasoning"], narrow)
    stored = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**stored, "dtype": "bfloat16"}))
    config = _job_file(root, tmp_path, reasoning_model=narrow.name)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("loaded before the dtype check"))
    for dry in ([], ["--dry-run"]):
        assert main([str(config), "--out", str(tmp_path / "o"), *dry]) == 2
        assert re.search(r"dtype: auto loads the model as bfloat16 \(its config.json's dtype\), which cannot hold "
                         r"the merged weights, saved as float32 \(as stored\): use dtype: float32, or set "
                         r"parameters.output_dtype: bfloat16", _one_error_line(capsys.readouterr().err)), dry
    assert not (tmp_path / "o").exists()


def test_a_dtype_wider_than_the_saved_weights_is_named_as_the_load_dtype(triple, tmp_path, capsys):
    # mergekit's dtype is the saved dtype; here it is the load dtype, and the merged weights save as stored
    import torch
    from safetensors.torch import load_file, save_file

    root, _ = triple
    bf16 = root / f"{tmp_path.name}-reasoning"
    shutil.copytree(triple[1]["reasoning"], bf16)
    weights = load_file(bf16 / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, bf16 / "model.safetensors", metadata={"format": "pt"})
    stored = json.loads((bf16 / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**stored, "dtype": "bfloat16"}))
    advice = ("Set parameters.output_dtype: float32 to save in float32 (mergekit's dtype means that), or "
              "parameters.output_dtype: bfloat16 to keep the stored dtype and say so.")
    for model, dtype, parameters, expected in (
            (bf16.name, "float32", {}, f"saved as stored (bfloat16). {advice}"),
            (bf16.name, "float32", {"output_dtype": "float32"}, None), (bf16.name, "bfloat16", {}, None),
            (bf16.name, "auto", {}, None),
            (bf16.name, "float32", {"output_dtype": "bfloat16"}, None),
            ("reasoning", "float64", {}, "saved as stored (float32). The merged weights can be saved as float32, "
                                         "float16, bfloat16 (parameters.output_dtype), or parameters.output_dtype: "
                                         "float32 to keep the stored dtype and say so.")):
        config = _job_file(root, tmp_path, reasoning_model=model, method="task_arithmetic", dtype=dtype,
                           parameters={"lam": 1.0, **parameters})
        assert main([str(config), "--dry-run"]) == 0
        err = capsys.readouterr().err
        warned = f"dtype: {dtype} is the dtype the reasoning model is loaded in; the merged weights are"
        assert (warned in err and expected in err) if expected else warned not in err, (dtype, parameters, err)


def test_overwrite_replaces_only_an_earlier_output(triple, tmp_path, capsys, monkeypatch):
    root, _ = triple
    config = _job_file(root, tmp_path, method="task_arithmetic")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    # --overwrite replaces an earlier output only: a folder of other things, the working directory and the
    # folders above it, or the home folder would be deleted whole
    assert main([str(config), "--out", str(tmp_path / "out"), "--overwrite"]) == 2
    assert "holds no rain_merging_config.json, so it is not an earlier output" in _one_error_line(
        capsys.readouterr().err)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")  # (an empty working directory would be filled in place)
    monkeypatch.chdir(tmp_path / "work")
    for out in (".", "..", str(tmp_path)):
        assert main([str(config), "--out", out, "--overwrite"]) == 2
        assert "is the current directory or a folder above it" in _one_error_line(capsys.readouterr().err)
    monkeypatch.setenv("HOME", str(tmp_path / "out"))
    assert main([str(config), "--out", "~", "--overwrite"]) == 2
    assert "is the home folder" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "out" / "rain_merging_config.json").write_text("{}")  # an earlier output (home aside)
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    assert main([str(config), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    # an empty folder made ahead is filled in place: only it must be writable, not its parent (a mount point
    # under a root-owned /mnt); a mount point that holds something cannot be replaced, which is said before the merge
    (tmp_path / "volume").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    assert main([str(config), "--out", str(tmp_path / "volume")]) == 0
    assert (tmp_path / "volume" / "model.safetensors").is_file()
    assert main([str(config), "--out", str(tmp_path / "elsewhere")]) == 2
    assert f"{tmp_path} is not writable" in _one_error_line(capsys.readouterr().err)
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == tmp_path / "volume")
    assert main([str(config), "--out", str(tmp_path / "volume"), "--overwrite"]) == 2
    assert "is a mount point, so the new output cannot take its place" in _one_error_line(capsys.readouterr().err)


def test_dry_run_prints_the_plan(triple, tmp_path, capsys):
    root, _ = triple
    config = _job_file(root, tmp_path)
    assert main([str(config), "--dry-run", "--out", str(tmp_path / "out"), "--push-to-hub", "me/x"]) == 0
    out = capsys.readouterr().out
    assert "merge plan (method=rain" in out and "merged modules:" in out
    assert "reasoning.json" in out and "push to the Hub: me/x" in out and "nothing was merged" in out
    assert "does not read" not in out
    assert "merged only with parameters.project_bias: True" in out  # the plan's warnings as the YAML writes them
    assert not (tmp_path / "out").exists()
    assert "  reasoning: 4 usable samples (0 malformed, skipped)\n  instruction: 4 usable samples" in out
    config = _job_file(root, tmp_path, parameters={"lam": 1.0, "stage2": False, "rho": 0.2, "density": 0.3})
    assert main([str(config), "--dry-run"]) == 0
    assert "parameters this merge does not read: rho=0.2, density=0.3" in capsys.readouterr().out


def test_a_reader_that_goes_away_does_not_fail_the_run(triple, tmp_path, monkeypatch):
    root, _ = triple
    config = _job_file(root, tmp_path)
    read, write = os.pipe()
    os.close(read)  # `rain-merge job.yaml | head -1`: head has read its line and left
    closed = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        assert main([str(config), "--dry-run"]) == 0  # was 1, "error: [Errno 32] Broken pipe", before any push
        print("later output goes nowhere")
        closed.flush()
    finally:
        closed.close()


def test_dry_run_tokenises_the_calibration_as_the_merge_will(triple, tmp_path, capsys, monkeypatch):
    root, _ = triple
    # what only token counts show: samples max_length cuts off, a lam: auto hold-out that leaves stage 1 nothing
    config = _job_file(root, tmp_path, parameters={"lam": 1.0, "max_length": 12})
    assert main([str(config), "--dry-run"]) == 2
    assert "calibration.reasoning: no usable reasoning calibration samples: 4 malformed" in _one_error_line(
        capsys.readouterr().err)
    record = testing.reasoning_records(1)[0]
    (root / "one_prompt.json").write_text(json.dumps([record, dict(record, response="Other words. 3")]))
    config = _job_file(root, tmp_path, parameters={"lam": "auto", "stage2": False},
                       calibration={"reasoning": "one_prompt.json"})
    assert main([str(config), "--dry-run"]) == 2
    assert "all 2 reasoning calibration samples share one prompt" in _one_error_line(capsys.readouterr().err)
    config = _job_file(root, tmp_path, parameters={"lam": "auto", "stage1": False, "stage2": False},
                       calibration={"reasoning": "one_prompt.json"})  # without stage 1 nothing is held out
    assert main([str(config), "--dry-run"]) == 0
    assert "  reasoning: 2 usable samples (0 malformed, skipped)\n" in capsys.readouterr().out
    config = _job_file(root, tmp_path, parameters={"lam": "auto", "stage2": False})
    assert main([str(config), "--dry-run"]) == 0
    assert "  reasoning: 4 usable samples (0 malformed, skipped), 1 held out by lam: auto, 3 for stage 1" in (
        capsys.readouterr().out)
    # a model whose context the samples outgrow: said before the merge, with the fix
    from rain_hf import RainMerger

    planned = RainMerger._plan_parts

    def short_context(cls, *args, **kwargs):
        plan, *rest = planned(*args, **kwargs)
        return (dataclasses.replace(plan, context_length=20), *rest)

    with monkeypatch.context() as patch:
        patch.setattr(RainMerger, "_plan_parts", classmethod(short_context))
        assert main([str(_job_file(root, tmp_path, parameters={"lam": 1.0})), "--dry-run"]) == 0
    assert ("  reasoning: 4 usable samples (0 malformed, skipped), 4 longer than the model's context "
            "(max_position_embeddings=20): set parameters.max_length to at most 20") in capsys.readouterr().out
    (root / "prompts.json").write_text(json.dumps([{"prompt": r["prompt"]} for r in testing.reasoning_records(2)]))
    config = _job_file(root, tmp_path, calibration={"reasoning": "prompts.json", "instruction": "instruction.jsonl"})
    assert main([str(config), "--dry-run"]) == 0
    assert "  reasoning: prompt-only records, written by the reasoning model during the merge" in (
        capsys.readouterr().out)


def test_full_run_writes_the_output_folder(triple, tmp_path, capsys, monkeypatch):
    root, _ = triple
    pushed = {}

    def fake_push(folder, repo_id, **kwargs):
        pushed.update(folder=Path(folder), repo_id=repo_id, **kwargs)
        return type("Info", (), {"pr_url": None, "commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr("rain_hf.hub.push_folder", fake_push)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the push itself is faked
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config_without_token = _job_file(triple[0], tmp_path, parameters={"lam": 1.0, "stage2": False})
    # without any token the push would fail after the whole merge: said first
    assert main([str(config_without_token), "--out", str(tmp_path / "x"), "--push-to-hub", "me/tiny-rain"]) == 2
    assert "no Hub token: log in (`hf auth login`), set HF_TOKEN" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    config = _job_file(root, tmp_path, output={"private": True, "max_shard_size": "10MB"})
    out = tmp_path / "out"
    out.mkdir()  # an empty folder made ahead is filled, not refused
    assert main([str(config), "--out", str(out), "--push-to-hub", "me/tiny-rain"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "README.md", "rain_merging_config.json", "rain_merging_heatmap.png",
            "tokenizer_config.json"} <= files
    assert any(name.endswith(".safetensors") for name in files)
    sidecar = json.loads((out / "rain_merging_config.json").read_text())
    assert sidecar["method"] == "rain" and sidecar["config"]["batch_size"] == 2
    assert sidecar["calibration"]["reasoning"]["num_samples"] == 4
    assert (out / "README.md").read_text().startswith("---\n")
    assert 'model_id = "me/tiny-rain"' in (out / "README.md").read_text()
    # local inputs are named as the YAML names them, not by this machine's absolute paths
    assert {role: entry["name_or_path"] for role, entry in sidecar["inputs"].items()} == {
        "base": "base", "reasoning": "reasoning", "instruct": "instruct"}
    assert [sidecar["calibration"][kind]["source"] for kind in ("reasoning", "instruction")] == [
        "reasoning.json", "instruction.jsonl"]
    assert str(root) not in (out / "README.md").read_text()
    assert str(root) not in (out / "rain_merging_config.json").read_text()  # published with the weights too
    assert pushed["folder"] == out and pushed["repo_id"] == "me/tiny-rain" and pushed["private"] is True
    stdout = capsys.readouterr().out
    assert f"saved: {out}" in stdout and "pushed: https://huggingface.co/me/tiny-rain/commit/1" in stdout


def test_problems_found_before_any_weight_is_loaded(triple, tmp_path, capsys, monkeypatch):
    """Each of these used to surface only after the load (or the whole merge), or not in a dry run."""
    import torch
    import transformers

    root, paths = triple

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the problem was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    (root / "empty.jsonl").write_text("")
    (root / "keys.json").write_text(json.dumps([{"question": "2+2?", "answer": "4"}]))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    (tmp_path / "full" / "rain_merging_config.json").write_text("{}")  # an earlier output
    (root / "cal").mkdir(exist_ok=True)
    shutil.copy(root / "reasoning.json", root / "cal" / "r.json")
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "card.md.j2").write_text("# {{ model_name }}\n")
    (tmp_path / "bad.md.j2").write_text("# card\n{% for x in %}\n")
    (tmp_path / "cwd" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # a folder named relative to the working directory, not to the YAML file
    out = ["--out", str(tmp_path / "o")]
    cases = [
        (dict(calibration={"reasoning": "reasoning.json", "instruction": "empty.jsonl"}), out,
         "calibration.instruction: The instruction calibration data holds no records"),
        (dict(calibration={"reasoning": "keys.json", "instruction": "instruction.jsonl"}), out,
         r"No reasoning calibration record has a prompt: the first one \(.*keys.json record 0\) has keys "
         r"\['answer', 'question'\]"),
        (dict(dtype="bfloat16"), out,
         r"dtype: bfloat16, which cannot hold the merged weights, saved as float32 \(as stored\): use dtype: "
         r"float32 \(or auto\), or set parameters.output_dtype: bfloat16"),
        (dict(), ["--out", str(paths["reasoning"]), "--overwrite"],
         "is \\(or holds\\) the reasoning model's folder"),
        (dict(), ["--out", str(tmp_path / "afile"), "--overwrite"], "is a file, not a folder"),
        # without --overwrite too: the advice must not be to delete an input or to pass --overwrite
        (dict(), ["--out", str(paths["reasoning"])], "is \\(or holds\\) the reasoning model's folder"),
        (dict(), ["--out", str(root)], "holds the calibration.reasoning"),
        (dict(), ["--out", str(tmp_path / "afile")], "is a file, not a folder"),
        (dict(), ["--out", str(tmp_path / "full")], "already exists; pass --overwrite"),
        (dict(), ["--out", str(tmp_path / "o"), "--push-to-hub", ""], "--push-to-hub '': give the repository id"),
        (dict(), ["--out", str(tmp_path / "o"), "--push-to-hub", "not a repo"],
         "is not a valid repository id"),
        (dict(), ["--out", str(tmp_path / "o"), "--push-to-hub", "me/x"],
         "HF_HUB_OFFLINE is set"),
        (dict(), ["--out", str(tmp_path / "o"), "--device", "gpu"], "is not a torch device"),
        (dict(), ["--out", str(tmp_path / "o"), "--device", "meta"], "--device meta holds no weights"),
        *([] if torch.xpu.is_available() else [
            (dict(), ["--out", str(tmp_path / "o"), "--device", "xpu"], "has no usable xpu device")]),
        # --overwrite must not delete an input that is not a model: calibration data, template, the YAML itself
        (dict(), ["--out", str(root), "--overwrite"], "holds the calibration.reasoning"),
        (dict(calibration={"reasoning": "cal/r.json", "instruction": "instruction.jsonl"}),
         ["--out", str(root / "cal"), "--overwrite"], "holds the calibration.reasoning .*cal/r.json"),
        (dict(output={"card_template": str(tmp_path / "tpl" / "card.md.j2")}),
         ["--out", str(tmp_path / "tpl"), "--overwrite"], "holds the output.card_template"),
        (dict(output={"card_template": str(tmp_path / "bad.md.j2")}), out,
         "output.card_template: .*bad.md.j2, line 2: Expected an expression"),
        (dict(base_model={"path": "Qwen/Qwen2.5-7B", "revision": 123}), out,
         "base_model.revision 123 is not a string .*quote it"),
        (dict(base_model={"path": "base", "revision": "v2"}), out,
         "base_model.revision 'v2' is given for the local folder"),
        (dict(base_model="cwd/base"), out, "'cwd/base' is a folder under the current directory but not under the "
                                           "YAML file's folder.* If you mean the Hub repository 'cwd/base', run "
                                           "rain-merge from another directory"),
        (dict(base_model=str(tmp_path)), out, r"\.yaml: The base model .* has no config\.json"),
        # names that name no model (mergekit's name@revision and model+lora forms among them)
        (dict(base_model=str(tmp_path / "afile")), out, "afile' is a file; pass the folder"),
        (dict(base_model="Qwen/Qwen2.5-0.5B@main"), out, r"A revision is given on its own: .*\{path: ..., revision: "),
        (dict(instruct_model="base+instruct"), out, "A LoRA adapter is passed as the instruct model itself"),
    ]
    for job, extra, expected in cases:
        config = _job_file(root, tmp_path, **job)  # one file, rewritten per case
        for dry in ([], ["--dry-run"]):
            if dry and "HF_HUB_OFFLINE" in expected:
                continue  # a dry run may plan a push for later, online
            assert main([str(config), *extra, *dry]) == 2, (expected, dry)
            assert re.search(expected, _one_error_line(capsys.readouterr().err)), (expected, dry)
    assert not (tmp_path / "o").exists() and (paths["reasoning"] / "model.safetensors").is_file()
    assert (root / "reasoning.json").is_file() and (root / "cal" / "r.json").is_file()
    assert (tmp_path / "tpl" / "card.md.j2").is_file()
    (root / "jobs").mkdir()  # the YAML file alone in the folder --out names
    config = _write(root / "jobs", {"base_model": "../base", "reasoning_model": "../reasoning",
                                    "instruct_model": "../instruct", "method": "task_arithmetic"}, name="job.yaml")
    assert main([str(config), "--out", str(config.parent), "--overwrite"]) == 2
    assert "holds the config file" in _one_error_line(capsys.readouterr().err) and config.is_file()
    anchors = root / f"{tmp_path.name}-anchors.yaml"  # YAML merge keys still work beside the duplicate check
    anchors.write_text("base_model: &m {path: base}\nreasoning_model: {<<: *m, path: reasoning}\n"
                       "instruct_model: instruct\nmethod: task_arithmetic\n")
    assert load_job(anchors).models["reasoning"] == str((root / "reasoning").resolve())
    twice = root / f"{tmp_path.name}-twice.yaml"
    twice.write_text("base_model: base\nbase_model: reasoning\nreasoning_model: reasoning\n"
                     "instruct_model: instruct\nmethod: task_arithmetic\n")
    assert main([str(twice), "--dry-run"]) == 2
    assert "'base_model' is given twice" in _one_error_line(capsys.readouterr().err)


def test_stage2_only_with_lam_auto_still_reads_the_reasoning_set(triple, tmp_path, capsys):
    """stage1: false is the stage-2 ablation; lam: auto still measures L_think on the reasoning calibration."""
    root, _ = triple
    parameters = {"lam": "auto", "lam_grid": [0.5, 1.0], "stage1": False, "batch_size": 2}
    config = _job_file(root, tmp_path, parameters=parameters)
    out = tmp_path / "out"
    assert main([str(config), "--out", str(out)]) == 0
    sidecar = json.loads((out / "rain_merging_config.json").read_text())
    assert sidecar["lam"] in (0.5, 1.0) and [row["lam"] for row in sidecar["report"]["lam_search"]] == [0.5, 1.0]
    config = _job_file(root, tmp_path, parameters=parameters, calibration={"instruction": "instruction.jsonl"})
    assert main([str(config), "--out", str(tmp_path / "out2")]) == 2
    assert "lam: auto measures L_think" in _one_error_line(capsys.readouterr().err)


def test_dtype_shard_size_and_card_template_reach_the_merge(triple, tmp_path):
    from safetensors import safe_open

    root, _ = triple
    template = tmp_path / "card.md.j2"
    template.write_text("---\n{{ card_data }}\n---\n\n# Custom card for {{ model_name }}\n")
    config = _job_file(root, tmp_path, dtype="bfloat16",
                       parameters={"lam": 1.0, "batch_size": 2, "output_dtype": "bfloat16"},
                       output={"max_shard_size": "40KB", "card_template": str(template)})
    out = tmp_path / "out"
    assert main([str(config), "--out", str(out)]) == 0
    sidecar = json.loads((out / "rain_merging_config.json").read_text())
    assert sidecar["loaded_dtype"] == "bfloat16"  # the calibration passes ran in the YAML's dtype
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / name).stat().st_size <= 40_000 + 10_000 for name in shards)
    with safe_open(out / shards[0], "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert "# Custom card for" in (out / "README.md").read_text()
    assert sidecar["config"]["max_shard_size"] == "40KB"  # what the save used, not the config's default
    # the default card's YAML names the same dtype and shard size, so it reruns the same job
    from rain_hf.card import build_model_card

    block = yaml.safe_load(re.search(r"```yaml\n(.*?)```", build_model_card(sidecar).text, flags=re.S).group(1))
    assert block["dtype"] == "bfloat16" and block["parameters"]["max_shard_size"] == "40KB"


def test_a_card_template_that_fails_to_render_does_not_cost_the_merge(triple, tmp_path, capsys):
    root, _ = triple
    template = tmp_path / "undefined.md.j2"
    template.write_text("---\nlicense: mit\n---\n# {{ model_name }} {{ nope.attr }}\n")
    config = _job_file(root, tmp_path, method="task_arithmetic", output={"card_template": str(template)})
    assert main([str(config), "--dry-run"]) == 0  # a warning before the merge, not a refusal
    err = capsys.readouterr().err
    assert "failed a trial render for a sample merge" in err and "'nope' is undefined" in err
    out = tmp_path / "out"
    assert main([str(config), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the card template failed, so" in err and "has the default card" in err
    assert (out / "model.safetensors").is_file() and "## Usage" in (out / "README.md").read_text()


def test_float64_card_yaml_reruns(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from rain_hf import testing

    paths = testing.build_triple(tmp_path, "qwen2", dtype=torch.float64)
    config = _write(tmp_path, {"base_model": "base", "reasoning_model": "reasoning", "instruct_model": "instruct",
                               "method": "task_arithmetic", "parameters": {"lam": 0.5}})
    assert paths and main([str(config), "--out", str(tmp_path / "first")]) == 0
    card = (tmp_path / "first" / "README.md").read_text()
    block = yaml.safe_load(re.search(r"```yaml\n(.*?)```", card, flags=re.S).group(1))
    assert block["dtype"] == "float64"  # the card names the dtype it loaded, which the YAML must accept
    rerun = _write(tmp_path, block, name="rerun.yaml")
    assert main([str(rerun), "--out", str(tmp_path / "second")]) == 0, capsys.readouterr().err
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    template_folder = _write(tmp_path, {**block, "output": {"card_template": "first"}}, name="folder.yaml")
    assert main([str(template_folder), "--dry-run"]) == 2
    assert "output.card_template '" in (line := _one_error_line(capsys.readouterr().err))
    assert "is a folder, not a template file (paths are relative to the YAML file's folder)" in line


@pytest.mark.parametrize("parameters, expected", [
    ({"layers": [0, 9]}, "parameters.layers names layers [9], but the model has 2"),  # the YAML's terms
    ({"think_open": "<thinking>"}, "think-open token '<thinking>' is not a single token of the tokenizer"),
    ({"target_modules": ["foo_proj"]}, "['foo_proj'] match no linear module"),
    ({"max_length": 8}, "no usable reasoning calibration samples"),  # found in merge(), exit 2 all the same
    ({"a base of another width": True}, "differs"),  # three models that do not fit together, as the YAML names them
])
def test_config_errors_found_on_the_models_exit_2(triple, tmp_path, capsys, parameters, expected):
    root, _ = triple
    wide = parameters.pop("a base of another width", False)
    if wide and not (root / "other").exists():  # a plan-time mismatch (ModelMismatchError): a YAML problem
        from rain_hf import testing

        testing.build_triple(root / "wide", "qwen2", hidden_size=32)
        shutil.copytree(root / "wide" / "base", root / "other")
    config = _job_file(root, tmp_path, parameters={"lam": 1.0, **parameters}, **({"base_model": "other"} if wide
                                                                                  else {}))
    assert main([str(config), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line and line.startswith(f"rain-merge: error: {config}: "), line
    assert not (tmp_path / "out").exists()


def test_an_adapter_that_does_not_fit_the_base_exits_2(triple, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rain_hf import testing

    root, _ = triple
    if not (root / "narrow-lora").exists():
        narrow = testing.build_triple(root / "narrow", "qwen2", hidden_size=32)
        model = AutoModelForCausalLM.from_pretrained(narrow["base"])
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / "narrow-lora")
    config = _job_file(root, tmp_path, instruct_model="narrow-lora")
    assert main([str(config), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"rain-merge: error: {config}: The instruct adapter") and "does not fit" in line


def test_calibration_a_merge_does_not_use_is_warned_about(triple, tmp_path, capsys):
    root, _ = triple
    config = _job_file(root, tmp_path, parameters={"lam": 1.0, "stage2": False})
    assert main([str(config), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"{config}: calibration.instruction (" in err and ") is not used by this merge (method: rain, " \
        "parameters.stage1: True, parameters.stage2: False, parameters.lam: 1.0)." in err


def test_baseline_run_needs_no_calibration(triple, tmp_path):
    root, _ = triple
    config = _job_file(root, tmp_path, method="ties", calibration=None, parameters={"density": 0.5, "lam": 0.8})
    out = tmp_path / "out"
    assert main([str(config), "--out", str(out)]) == 0
    sidecar = json.loads((out / "rain_merging_config.json").read_text())
    assert sidecar["method"] == "ties" and sidecar["report"]["head_coefficients"] is None
    assert not (out / "rain_merging_heatmap.png").exists()
