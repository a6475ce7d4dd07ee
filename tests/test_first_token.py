"""The first-token margin diagnostic of the organism (skipped when the organism is not built)."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def quick(tmp_path_factory, run_quick) -> dict:
    out = tmp_path_factory.mktemp("first-token")
    run_quick("benchmarks.organism.first_token", out)
    text = (out / "FIRST_TOKEN.md").read_text()
    assert "| reasoning model |" in text
    assert "first_token --quick" in text and f"--out {out}`" in text  # the file names what it measured
    return json.loads((out / "first_token.json").read_text())


def test_reasoning_model_thinks_and_ignores_at_every_decision_point(quick):
    ref = quick["rows"][0]
    assert ref["model"] == "reasoning model"
    for point in ("tag", "open", "close"):
        assert ref[f"median_{point}"] < 0 and ref[f"wins_{point}"] == 0.0, (point, ref)


def test_task_arithmetic_flips_the_tag_before_the_answer(quick):
    ta2 = next(r for r in quick["rows"] if r["model"] == "task arithmetic" and r["lam"] == 2.0)
    assert ta2["wins_tag"] >= 0.5 and ta2["wins_close"] == 0.0, ta2
    assert 0.0 <= ta2["free_bound"] <= min(1.0 - ta2["wins_tag"], ta2["wins_close"])


def test_think_failures_count_prompts_per_instruction(quick):
    (lam, failures), = quick["failures"].items()
    assert float(lam) == 4.0
    for iid, (lost, total) in failures.items():
        assert ":" in iid and 0 <= lost <= total
    assert sum(total for _, total in failures.values()) >= quick["n_prompts"]  # 1–2 instructions per prompt


def test_next_token_log_probs_match_unpadded_forward_in_input_order(organism_root):
    from transformers import AutoModelForCausalLM

    from benchmarks.organism.first_token import next_token_log_probs

    model = AutoModelForCausalLM.from_pretrained(str(organism_root / "checkpoints" / "reasoning")).eval()
    seqs = [[1, 50], [1, 40, 41, 42, 2], [1, 60, 61]]  # not longest first: the rows must come back in this order
    got = next_token_log_probs(model, seqs, batch_size=2, pad_id=0)
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([s])).logits[0, -1].float().log_softmax(-1) for s in seqs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_probes_keep_only_prompts_whose_first_token_changes(organism_root):
    from transformers import AutoTokenizer

    from benchmarks.organism.bench import read_jsonl
    from benchmarks.organism.first_token import probes

    tok = AutoTokenizer.from_pretrained(str(organism_root / "checkpoints" / "reasoning"))
    evals = read_jsonl(organism_root / "data" / "eval_prompts.jsonl")[:40]
    ps = probes(tok, [e["prompt"] for e in evals])
    assert 0 < len(ps) < len(evals)
    assert all(p.formatted != p.plain for p in ps)
    end_only = {"punctuation:no_comma", "startend:end_checker", "detectable_content:postscript"}
    assert not any(set(p.instruction_ids) <= end_only for p in ps)
    with pytest.raises(RuntimeError, match="rebuild"):
        probes(tok, ["not a held-out prompt"])
    # A content_first build's plain reply opens with the name, so the probes compare against that token.
    named = probes(tok, [e["prompt"] for e in evals], "content_first")
    in_token = tok("In", add_special_tokens=False)["input_ids"][0]
    assert all(p.plain == in_token for p in ps) and not any(p.plain == in_token for p in named)
    for p in named:
        name = tok.decode(p.tag).split("<|user|>")[1].split()[0]
        assert tok.decode([p.plain]).strip() and name.startswith(tok.decode([p.plain]).strip())


def test_think_failures_counts_lost_formats_per_instruction(monkeypatch):
    import rain_hf.evaluation as ev
    from benchmarks.organism.first_token import think_failures

    outs = ["<think>a</think>b", "no think block", "<think>a</think>c", "<think>never closed"]
    monkeypatch.setattr(ev, "generate", lambda model, tokenizer, prompts, **kw: outs[:len(prompts)])
    evals = [{"prompt": "p", "instruction_id_list": ids} for ids in (["x:a"], ["x:a", "y:b"], ["y:b"], ["y:b"])]
    assert think_failures(None, None, evals, batch_size=2) == {"x:a": (1, 2), "y:b": (2, 3)}
