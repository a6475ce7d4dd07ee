"""Model card: front matter round trip, base models for Hub and local inputs, eval results, heatmap, templates."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import EvalResult, ModelCard

import rain_hf.card as card_module
from rain_hf.card import (
    HEATMAP_NAME,
    TemplateProblem,
    build_model_card,
    check_template,
    default_template_path,
    trial_render,
    write_model_card,
)
from rain_hf.config import RainMergingConfig

REASONING = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
INSTRUCT = "Qwen/Qwen2.5-7B-Instruct"
BASE = "Qwen/Qwen2.5-7B"
SHA = "0123456789abcdef0123456789abcdef01234567"


def _source(hub_id: str | None, path: str, revision: str | None = None, **extra) -> dict:
    return {"name_or_path": hub_id or path, "path": path, "hub_id": hub_id, "revision": revision, **extra}


def _info(method: str = "rain", *, local: tuple[str, ...] = (), coefficients: bool = True) -> dict:
    """A sidecar dict as save_pretrained writes it; roles in ``local`` are local-only folders."""
    hub = {"reasoning": REASONING, "instruct": INSTRUCT, "base": BASE}
    inputs = {}
    for role, hub_id in hub.items():
        if role in local:
            inputs[role] = _source(None, f"/data/checkpoints/{role}")
        else:
            inputs[role] = _source(hub_id, f"/hf/hub/models--{hub_id.replace('/', '--')}/snapshots/{SHA}", SHA)
    inputs["instruct"]["kind"] = "full"
    config = RainMergingConfig(method=method, lam=1.25).to_dict()
    rain = method == "rain"
    return {
        "rain_hf_version": "0.1.0",
        "library_versions": {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2",
                             "safetensors": "0.6.2", "huggingface_hub": "2.4.0"},
        "method": method,
        "lam": 1.25,
        "config": config,
        "inputs": inputs,
        "calibration": {
            "reasoning": {"num_samples": 150, "num_malformed": 3, "source": "calib/reasoning.json",
                          "file_sha256": "ab" * 32} if rain else None,
            "instruction": {"num_samples": 365, "num_malformed": 0, "source": "calib/instr.jsonl"} if rain else None,
        },
        "report": {
            "timings": {"features": 1.5, "merge": 2.25},
            "modules": {
                "model.layers.0.self_attn.q_proj": {"removed_fraction": 0.10, "residual": 1e-6},
                "model.layers.1.self_attn.q_proj": {"removed_fraction": 0.30, "residual": 3e-6},
                "model.layers.0.mlp.down_proj": {"removed_fraction": 0.05, "residual": None},
            } if rain else {},
            "head_coefficients": [[1.0, 0.5, 1.5, 1.0], [0.8, 1.2, 0.9, 1.1]] if rain and coefficients else None,
            "layers": [0, 1],
            "vocab": {"reasoning": 100, "instruct": 100, "base": 100},
        },
        "license": "mit",
    }


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "the card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def _yaml_block(text: str) -> dict:
    match = re.search(r"```yaml\n(.*?)```", text, flags=re.S)
    assert match
    return yaml.safe_load(match.group(1))


def test_front_matter_round_trips_through_modelcard_load(tmp_path):
    readme = write_model_card(tmp_path / "out", _info())
    assert readme == tmp_path / "out" / "README.md"
    loaded = ModelCard.load(readme)
    data = loaded.data
    assert data.base_model == [REASONING, INSTRUCT, BASE]
    assert data.base_model_relation == "merge"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.tags == ["merge", "rain-merging", "reasoning"]
    assert data.license == "mit"
    assert data.eval_results is None
    front = _front_matter(readme.read_text(encoding="utf-8"))
    assert "model-index" not in front
    assert set(front) == {"base_model", "base_model_relation", "library_name", "license", "pipeline_tag", "tags"}
    assert loaded.text == ModelCard(readme.read_text(encoding="utf-8")).text


def test_body_has_method_config_calibration_and_usage(tmp_path):
    info = _info()
    text = write_model_card(tmp_path, info, model_id="me/merged").read_text(encoding="utf-8")
    assert "https://arxiv.org/abs/2602.22538" in text and "@inproceedings" in text
    assert "λ = 1.25" in text
    assert f"| reasoning | 150 | 3 | calib/reasoning.json | `{'ab' * 32}` |" in text  # what sha256sum prints
    assert "| instruction | 365 | 0 | calib/instr.jsonl | – |" in text
    assert 'model_id = "me/merged"' in text
    assert "AutoModelForCausalLM.from_pretrained(model_id" in text and "apply_chat_template(" in text
    # removed fraction: mean over layers per module type
    assert re.search(r"\| `q_proj` \| 2 \| 0\.2000 \| 2\.00e-06 \|", text)
    assert re.search(r"\| `down_proj` \| 1 \| 0\.0500 \| – \|\n", text)
    assert "residual as merged" not in text
    # the full config is a rain-merge YAML whose parameters rebuild the same RainMergingConfig
    block = _yaml_block(text)
    assert block["reasoning_model"] == {"path": REASONING, "revision": SHA}
    # line breaks written as escapes, not folded into quoted blocks of blank lines
    assert block["parameters"]["think_spacing"] == ["\n", "\n", "\n\n"] and '  - "\\n\\n"\n' in text
    assert block["method"] == "rain"
    # a local folder named like a Hub id stays a path: elsewhere rain-merge would fetch that repository instead
    local = _info(local=("base", "instruct"))
    local["inputs"]["base"].update(name_or_path="Qwen/R1-base", path="/work/Qwen/R1-base")
    local["inputs"]["instruct"].update(name_or_path="../models/it", path="/models/it")
    local["inputs"]["reasoning"].update(name_or_path="./r1", path="/work/r1", hub_id=None)
    local_block = _yaml_block(build_model_card(local).text)
    assert (local_block["base_model"], local_block["instruct_model"], local_block["reasoning_model"]) == (
        "./Qwen/R1-base", "../models/it", "./r1")
    rebuilt = RainMergingConfig.from_dict({"method": block["method"], **block["parameters"]})
    assert rebuilt.to_dict() == info["config"]
    assert "projection was sequential" not in text
    info["report"]["projection"] = "sequential"
    text = build_model_card(info).text
    assert "projection was sequential" in text and "stage 1 ran sequential: written here" in text
    # an unset mode follows the data given, so the card writes the one that ran: adding the file that precomputed
    # features came from must not turn a one-shot merge into a sequential rerun
    assert _yaml_block(text)["parameters"]["sequential"] is True
    info["report"]["projection"] = "one-shot"
    info["config"]["sequential_offload"] = True  # allowed while sequential is unset; it had nothing to offload
    parameters = _yaml_block(build_model_card(info).text)["parameters"]
    assert parameters["sequential"] is False and parameters["sequential_offload"] is False
    RainMergingConfig.from_dict(parameters)  # the block loads
    assert "was off for this merge" not in text
    picked = copy.deepcopy(info)
    picked["config"]["lam"] = "auto"
    picked["calibration"]["reasoning"]["num_held_out"] = 38
    text = build_model_card(picked).text
    assert "| reasoning | 150 (38 held out to choose λ) | 3 | calib/reasoning.json |" in text
    assert _yaml_block(text)["parameters"]["lam"] == "auto"  # a rerun repeats the search and its hold-out
    assert ("lam='auto' chose λ = 1.25, projecting with the reasoning samples it did not hold out; lam: 1.25 with the "
            "same file projects with all of them") in text
    picked["config"]["stage1"] = False  # nothing projected: lam: 1.25 gives the same weights
    assert "lam='auto' chose" not in build_model_card(picked).text
    for stage, said in (("stage1", "Stage 1 was off for this merge: Δ⊥ = Δ, nothing was projected."),
                        ("stage2", "Stage 2 was off for this merge: every α = 1.")):
        ablation = copy.deepcopy(info)
        ablation["config"][stage] = False
        assert said in " ".join(build_model_card(ablation).text.split())


@pytest.mark.parametrize("model_id", [r"C:\Users\me\merged", 'out/the "final" merge', "me/merged"])
def test_usage_snippet_is_python_that_names_the_model(model_id):
    code = build_model_card(_info(), model_id=model_id, model_revision="dev").text.split("```python\n")[1]
    names = {}
    exec(code.split("tokenizer = ")[0], names)  # the lines up to the load: model_id and revision
    assert names["model_id"] == model_id and names["revision"] == "dev"


def test_usage_snippet_revision():
    assert 'revision = "dev"' in build_model_card(_info(), model_id="me/m", model_revision="dev").text
    for revision in (None, "main", "refs/pr/3"):  # a pull request's ref is not where the model stays
        text = build_model_card(_info(), model_id="me/m", model_revision=revision).text
        assert "revision" not in text.split("## Usage")[1].split("```")[1]


def test_paths_cannot_break_the_markdown():
    info = _info(local=("instruct",))
    info["inputs"]["instruct"]["name_or_path"] = "/data/it|v2\n## Heading"
    info["calibration"]["reasoning"]["source"] = "calib/r|v2.jsonl"
    text = build_model_card(info).text
    assert "| reasoning | 150 | 3 | calib/r\\|v2.jsonl |" in text
    assert "| local folder `/data/it\\|v2 ## Heading` |" in text  # a table cell
    # named once, in the table; the note under it says why it is not in the metadata
    assert "The instruct model is a local folder not on the Hugging Face Hub, so it is not listed under " in text
    assert "- instruct model (θ_I): local folder" not in text
    assert "of `/data/it|v2 ## Heading` into" in text and "\n## Heading" not in text


def test_o_proj_residual_as_merged_gets_its_own_column():
    info = _info()
    info["report"]["modules"]["model.layers.0.self_attn.o_proj"] = {
        "removed_fraction": 0.2, "residual": 1e-6, "residual_after_stage2": 0.04}
    text = build_model_card(info).text
    assert "| module | layers | removed fraction | residual | residual as merged |" in text
    assert re.search(r"\| `o_proj` \| 1 \| 0\.2000 \| 1\.00e-06 \| 4\.00e-02 \|", text)
    assert re.search(r"\| `q_proj` \| 2 \| 0\.2000 \| 2\.00e-06 \| – \|", text)


def test_local_inputs_are_named_in_the_body_not_in_base_model(tmp_path):
    mixed = write_model_card(tmp_path / "mixed", _info(local=("instruct",))).read_text(encoding="utf-8")
    assert ModelCard(mixed).data.base_model == [REASONING, BASE]
    assert "local folder `/data/checkpoints/instruct`" in mixed
    assert "/data/checkpoints" not in mixed.split("---", 2)[1]

    all_local = write_model_card(tmp_path / "local", _info(local=("reasoning", "instruct", "base")))
    text = all_local.read_text(encoding="utf-8")
    front = _front_matter(text)
    assert "base_model" not in front and "base_model_relation" not in front
    assert None not in front.values()
    assert ModelCard.load(all_local).data.base_model is None
    for role in ("reasoning", "instruct", "base"):
        assert f"`/data/checkpoints/{role}`" in text


def test_hub_cache_snapshot_is_named_by_its_hub_id(tmp_path):
    """A local folder inside the Hub cache is resolved to its repo and commit, and the card names those."""
    from rain_hf.checkpoints import resolve_model

    snapshot = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-R1-Distill-Qwen-7B" / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    source = resolve_model(str(snapshot))
    assert (source.hub_id, source.revision) == (REASONING, SHA)
    info = _info()
    info["inputs"]["reasoning"] = {**source.to_dict(), "path": None}
    text = build_model_card(info).content
    assert _front_matter(text)["base_model"][0] == REASONING and str(tmp_path) not in text


def test_only_a_snapshot_root_stands_for_its_repo_and_a_local_folder_keeps_no_revision(tmp_path, caplog):
    from rain_hf.checkpoints import resolve_model

    adapters = tmp_path / "hub" / "models--acme--adapters" / "snapshots" / SHA / "ifeval-v2"
    adapters.mkdir(parents=True)
    source = resolve_model(str(adapters))  # one of several models in the repo: not the repo's root model
    assert (source.hub_id, source.revision) == (None, None)
    assert resolve_model(str(adapters.parent) + "/").hub_id == "acme/adapters"
    with caplog.at_level("WARNING", logger="rain_hf.checkpoints"):
        source = resolve_model(str(adapters.parent), revision="v2", role="instruct")
    assert source.revision == SHA  # where the files came from, not what was asked for
    assert "revision='v2' is ignored for the instruct model" in caplog.text
    assert resolve_model(str(adapters), revision="v2").revision is None


def test_a_revision_missing_from_the_offline_cache_is_named():
    from rain_hf.checkpoints import CheckpointError, resolve_model

    with pytest.raises(CheckpointError, match="^Revision 'v2' of the reasoning model 'org/reasoning' is not in the "
                                              r"local Hub cache and the Hub cannot be reached \(offline\?\), and no "
                                              r"local folder /.*/org/reasoning exists either"):
        resolve_model("org/reasoning", revision="v2", role="reasoning")  # a mistyped relative path looks the same


def test_local_inputs_are_shown_as_given_not_resolved():
    info = _info(local=("instruct",))
    info["inputs"]["instruct"].update(name_or_path="ckpt/my|instruct", path="/home/someone/work/ckpt/my|instruct")
    text = build_model_card(info).content
    assert "/home/someone" not in text
    assert "`ckpt/my\\|instruct`" in text  # a bar would end the table cell


def test_differing_input_licences_are_listed_not_merged():
    info = _info()
    info.update(license=None, input_licenses={"reasoning": {"license": "mit"},
                                              "instruct": {"license": "other", "license_name": "llama3.1",
                                                           "license_link": "https://llama.com/license"}})
    text = build_model_card(info).content
    assert "license" not in _front_matter(text)
    assert "- reasoning model (θ_R, the anchor): `mit`" in text
    assert "- instruct model (θ_I): [llama3.1](https://llama.com/license)" in text
    # one licence, each repo linking its own copy: the licence stands, the link goes
    links = {role: {"license": "apache-2.0", "license_link": f"https://huggingface.co/org/{role}/blob/main/LICENSE"}
             for role in ("reasoning", "instruct", "base")}
    from rain_hf.checkpoints import ModelSource
    from rain_hf.merger import _merged_license

    sources = {role: ModelSource(f"org/{role}", Path(role), f"org/{role}", SHA) for role in links}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rain_hf.merger._card_license", lambda folder: dict(links[folder.name]))
        merged = _merged_license(sources)
        assert merged["license"] == "apache-2.0" and merged["license_name"] is None
        assert merged["license_link"] == links["reasoning"]["license_link"]  # the reasoning model's own copy
        # a link relative to an input repository would resolve in the merged one: it names the input's file
        links = {role: {"license": "other", "license_name": "acme", "license_link": "LICENSE"} for role in links}
        sources["base"] = ModelSource("/data/base", Path("base"))  # local, and its LICENSE is not shipped
        merged = _merged_license(sources)
    assert merged["license_link"] == f"https://huggingface.co/org/reasoning/blob/{SHA}/LICENSE"
    assert merged["input_licenses"]["instruct"]["license_link"] == f"https://huggingface.co/org/instruct/blob/{SHA}/LICENSE"
    assert "license_link" not in merged["input_licenses"]["base"]
    info.update(license="other", license_name="llama3.1", license_link="https://llama.com/license",
                input_licenses={"reasoning": {"license": "other", "license_name": "llama3.1",
                                              "license_link": "https://llama.com/license"}})
    front = _front_matter(build_model_card(info).content)
    assert (front["license"], front["license_name"], front["license_link"]) == (
        "other", "llama3.1", "https://llama.com/license")


def test_calibration_that_is_not_a_file_is_not_put_in_the_config():
    info = _info()
    info["calibration"]["instruction"].update(source="a list of 365 records", is_file=False)
    text = build_model_card(info).content
    assert _yaml_block(text)["calibration"] == {"reasoning": "calib/reasoning.json"}
    assert "# instruction calibration: a list of 365 records, not a file" in text
    info["calibration"]["reasoning"].update(source="precomputed thinking features")
    text = build_model_card(info).content
    assert "calibration" not in _yaml_block(text)
    assert "# reasoning calibration: precomputed thinking features; add under calibration: the file" in text
    info["calibration"]["reasoning"]["held_out_not_projected"] = 2  # lam='auto' features reused at a numeric λ
    assert ("# the thinking features held out 2 reasoning samples for lam='auto' and project with the rest; a rerun "
            "from the file projects with all of them") in build_model_card(info).content


@pytest.mark.parametrize("coefficients", [[[float("nan"), float("nan")]], []])
def test_coefficients_without_a_finite_value_give_no_heatmap(tmp_path, coefficients):
    info = _info()
    info["report"]["head_coefficients"] = coefficients
    readme = write_model_card(tmp_path / "out", info)
    assert HEATMAP_NAME not in readme.read_text() and not (tmp_path / "out" / HEATMAP_NAME).exists()


@pytest.mark.parametrize("as_objects", [False, True])
def test_eval_results_make_a_model_index(tmp_path, as_objects):
    results = [
        {"task_type": "text-generation", "dataset_name": "IFEval", "dataset_type": "google/IFEval",
         "metric_type": "accuracy", "metric_name": "prompt-level strict", "metric_value": 0.613},
        {"task_type": "text-generation", "dataset_name": "MATH-500", "dataset_type": "HuggingFaceH4/MATH-500",
         "metric_type": "accuracy", "metric_name": "pass@1", "metric_value": 0.87},
    ]
    passed = [EvalResult(**r) for r in results] if as_objects else copy.deepcopy(results)
    readme = write_model_card(tmp_path, _info(), eval_results=passed, model_name="r1-rain-merged")
    front = _front_matter(readme.read_text(encoding="utf-8"))
    assert front["model-index"][0]["name"] == "r1-rain-merged"
    loaded = ModelCard.load(readme).data
    assert [(r.dataset_name, r.metric_value) for r in loaded.eval_results] == [("IFEval", 0.613), ("MATH-500", 0.87)]
    assert loaded.model_name == "r1-rain-merged"


def test_numpy_and_torch_scores_are_written_as_numbers(tmp_path):
    import numpy as np
    import torch

    results = [{"task_type": "text-generation", "dataset_name": "IFEval", "dataset_type": "google/IFEval",
                "metric_type": "accuracy", "metric_value": np.float64(0.61)},
               EvalResult(task_type="text-generation", dataset_type="x/MATH", dataset_name="MATH",
                          metric_type="accuracy", metric_value=torch.tensor(0.5))]
    readme = write_model_card(tmp_path, _info(), eval_results=results)
    loaded = ModelCard.load(readme).data
    assert [r.metric_value for r in loaded.eval_results] == [0.61, 0.5]


def test_bad_eval_results_name_the_problem():
    with pytest.raises(ValueError, match="lacks"):
        build_model_card(_info(), eval_results=[{"dataset_name": "IFEval", "metric_value": 1.0}])
    with pytest.raises(ValueError, match="EvalResult does not know"):
        build_model_card(_info(), eval_results=[{"task_type": "t", "dataset_name": "d", "dataset_type": "d",
                                                  "metric_type": "m", "metric_value": 1, "score": 2}])


def test_heatmap_written_and_linked_only_with_coefficients(tmp_path):
    readme = write_model_card(tmp_path / "rain", _info())
    png = tmp_path / "rain" / HEATMAP_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({HEATMAP_NAME})" in readme.read_text(encoding="utf-8")

    readme = write_model_card(tmp_path / "stage1", _info(coefficients=False))
    assert not (tmp_path / "stage1" / HEATMAP_NAME).exists()
    assert HEATMAP_NAME not in readme.read_text(encoding="utf-8")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"])
def test_baseline_cards(tmp_path, method):
    info = _info(method)
    info["license"] = None
    readme = write_model_card(tmp_path, info)
    text = readme.read_text(encoding="utf-8")
    data = ModelCard.load(readme).data
    assert data.tags == ["merge", "reasoning", method]  # not tagged as a RAIN merge
    assert data.license is None and "license" not in _front_matter(text)
    assert "## Calibration data" not in text and not (tmp_path / HEATMAP_NAME).exists()
    assert _yaml_block(text)["method"] == method
    assert "Only the linear layers inside the decoder blocks are merged;" in " ".join(text.split())
    info["config"].update(target_modules=["q_proj"], layers=[0], project_bias=True)  # a narrower merge says so
    text = " ".join(build_model_card(info).text.split())
    assert "Only the linear layers `q_proj` of decoder layers 0 are merged, with their biases;" in text


def test_custom_template(tmp_path):
    template = tmp_path / "mine.md.j2"
    template.write_text("---\n{{ card_data }}\n---\n\n# Custom card for {{ model_name }} ({{ method_title }})\n"
                        "λ={{ lam }}; samples={{ calibration[0].num_samples }}\n", encoding="utf-8")
    readme = write_model_card(tmp_path / "out", _info(), template_path=template, model_name="my-merge")
    text = readme.read_text(encoding="utf-8")
    assert "# Custom card for my-merge (RAIN-Merging)" in text and "λ=1.25; samples=150" in text
    assert ModelCard.load(readme).data.base_model == [REASONING, INSTRUCT, BASE]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model_card(_info(), template_path=tmp_path / "missing.j2")


def test_a_card_template_cannot_reach_the_environment_or_run_commands(tmp_path, monkeypatch):
    # a template shared with a YAML file renders in a sandbox: no os.environ (the Hub token), no os.popen
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_the_card")
    template = tmp_path / "evil.md.j2"
    for body in ("{{ cycler.__init__.__globals__.os.environ['HF_TOKEN'] }}",
                 "{{ cycler.__init__.__globals__.os.popen('touch " + str(tmp_path / "ran") + "').read() }}",
                 "{{ ''.__class__.__mro__[1].__subclasses__() }}"):
        template.write_text(f"# card\n{body}\n")
        check_template(template)  # it compiles; rendering it is refused
        with pytest.raises(TemplateProblem, match=r"evil.md.j2: rendering the card failed \((SecurityError|"
                                                  r"UndefinedError)"):
            build_model_card(_info(), template)
        assert "rendering the card failed" in trial_render(template)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("method", ["rain", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"])
def test_trial_render_of_a_sample_merge(tmp_path, method):
    for extra in ({}, {"lam": "auto"}, {"stage1": False}, {"stage2": False}, {"sequential": False}):
        if method != "rain" and extra:
            continue
        config = RainMergingConfig(method=method, **extra).to_dict()
        assert trial_render(default_template_path(), config) is None  # the default template, every kind of merge
        assert trial_render(default_template_path(), config, ["base", "instruct", "reasoning"]) is None
    check_template(default_template_path())
    config = RainMergingConfig(method=method).to_dict()
    for body, what in (("{{ nope.attr }}", "UndefinedError: 'nope' is undefined"),
                       ("{{ config.seed + 'x' }}", "TypeError"),
                       ("{{ info.report.modules['model.layers.9.mlp.up_proj'].removed_fraction }}", "UndefinedError")):
        template = tmp_path / "bad.md.j2"
        template.write_text(f"---\nlicense: mit\n---\n# {{{{ model_name }}}} {body}\n")
        check_template(template)  # compiles
        assert re.match(f".*bad.md.j2: rendering the card failed \\({what}", trial_render(template, config))
        with pytest.raises(TemplateProblem, match="bad.md.j2: rendering the card failed"):  # at save time too
            build_model_card(_info(method), template)
    # what every real sidecar holds renders in the trial too; local inputs are local there
    template.write_text("# {{ info.library_versions.torch }} {{ info.calibration.reasoning.sha256 if "
                        "info.calibration.reasoning else '' }} {{ local_inputs[0].path }}\n")
    assert trial_render(template, config, ["reasoning"]) is None
    template.write_text("# {{ info.report.head_coefficients | length }}\n")  # None without stage 2: fails
    stage2_off = RainMergingConfig(method="rain", stage2=False).to_dict()
    assert "TypeError" in trial_render(template, stage2_off)


def test_default_template_discovery(tmp_path, monkeypatch):
    path = default_template_path()
    assert path == Path(__file__).resolve().parents[1] / "model_card_templates" / "rain_merging.md.j2"
    # installed from a wheel: the template sits under <prefix>/share/rain_hf/model_card_templates
    monkeypatch.setattr(card_module, "__file__", str(tmp_path / "site-packages" / "rain_hf" / "card.py"))
    monkeypatch.setattr(card_module.sysconfig, "get_path", lambda name: str(tmp_path / "nowhere"))
    monkeypatch.setattr(card_module.sys, "prefix", str(tmp_path / "prefix"))
    with pytest.raises(FileNotFoundError, match="card_template"):
        default_template_path()
    shared = tmp_path / "prefix" / "share" / "rain_hf" / "model_card_templates"
    shared.mkdir(parents=True)
    (shared / "rain_merging.md.j2").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert default_template_path() == shared / "rain_merging.md.j2"
    # pip install --target DIR / --prefix DIR: the data files sit under DIR, outside the running Python's prefixes,
    # and are the ones of this code even where the prefix holds another (older) install's
    for package, root in (("target/rain_hf", "target"), ("pfx/lib/python3.11/site-packages/rain_hf", "pfx")):
        monkeypatch.setattr(card_module, "__file__", str(tmp_path / package / "card.py"))
        template = tmp_path / root / "share" / "rain_hf" / "model_card_templates" / "rain_merging.md.j2"
        template.parent.mkdir(parents=True)
        template.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        assert default_template_path() == template


def test_the_lam_search_and_the_merge_warnings_are_in_the_card():
    info = card_module._sample_sidecar(RainMergingConfig(lam="auto", lam_grid=[1.0, 2.0]).to_dict())
    info["report"]["lam_search"] = [{"lam": 1.0, "l_think": 0.004, "think_open": 1.0, "within_budget": True},
                                    {"lam": 2.0, "l_think": 0.0213, "think_open": None, "within_budget": False}]
    info["report"]["warnings"] = ["lam='auto': no λ of the grid keeps\nL_think ≤ 0.01; using the smallest, 1.0"]
    text = build_model_card(info).content
    assert "## Choosing λ" in text and "within L_think ≤ 0.01 and a share ≥ 0.98" in text
    assert "| 1.0 | 0.004 | 1.000 | yes |\n| 2.0 | 0.0213 | – | no |" in text
    assert "## Warnings\n\nThe merge reported:\n\n- lam='auto': no λ of the grid keeps L_think ≤ 0.01; using the " \
           "smallest, 1.0\n" in text
    info["report"]["warnings"] = ["'\\n' is written after <think> & </think>"]  # markdown would drop the tags
    assert "- '\\n' is written after &lt;think&gt; &amp; &lt;/think&gt;\n" in build_model_card(info).content
    del info["report"]["lam_search"][0]["within_budget"]  # a sidecar from before the column existed
    assert "| 1.0 | 0.004 | 1.000 | – |" in build_model_card(info).content
    for row in info["report"]["lam_search"]:  # a template that opens the block itself: no share was measured
        row["think_open"] = None
    assert "within L_think ≤ 0.01 (or the smallest" in build_model_card(info).content
    assert "at the thinking positions of held-out reasoning samples" in build_model_card(info).content
    info["config"]["stage1"] = False  # nothing is held out: every reasoning sample measures L_think
    assert "at the thinking positions of reasoning samples" in build_model_card(info).content
    numeric = card_module._sample_sidecar(RainMergingConfig(lam=2.0).to_dict())
    numeric["report"]["warnings"] = []
    text = build_model_card(numeric).content
    assert "## Choosing λ" not in text and "## Warnings" not in text
