"""The organism benchmark: every merge method on held-out prompts of the self-trained (base, reasoning, instruct).

    python -m benchmarks.organism            # full run (240 prompts, fine λ grids), writes RESULTS.md + results.png
    python -m benchmarks.organism --quick    # a few prompts and a small grid (smoke test, < 1 minute)
    python -m benchmarks.organism --organism /tmp/orth --grids orthogonal   # a variant, into variants/orthogonal/
    python -m benchmarks.organism --workers 1   # every row in this process (default: 2 workers, 1 thread each)

Each merged model is generated from greedily in the free template (the prompt ends at the assistant tag, so the
model must open ``<think>`` itself) and scored with :mod:`rain_hf.evaluation`: think-format rate, answer accuracy
(last number of the answer), IFEval prompt- and instruction-level strict accuracy on the answer part, and L_think
(mean KL(merged ‖ reasoning model) at the positions that predict the think block's tokens — ``<think>``, every
thinking token and ``</think>`` — of reasoning calibration samples held out of stage 1).

A second, smaller section (rows named ``[forced] …``) repeats the reference models, task arithmetic and RAIN in the
paper's own setting: the prompt ends with ``<think>`` (as DeepSeek-R1-Distill templates do) and stage 1 sees only
the reasoning calibration samples without format instructions (like the paper's math/code/science traces).

Every row is a job (:meth:`Bench.jobs`). With ``--workers N`` the jobs go to N spawned processes that each load the
organism once; rows come back in table order. On 2 cores two one-thread workers ran the full benchmark in 184 and
212 s, one process in 394 s on one thread and 522 s on two, with every table row the same (README).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.organism import tasks as T

logger = logging.getLogger("benchmarks.organism")

HERE = Path(__file__).resolve().parent
SHARED_CALIBRATION = HERE.parents[2] / "shared" / "calibration"
THINK_MIN = 0.98  # constraint of the headline comparison: think-format rate ≥ this …
ACC_SLACK = 0.05  # … and accuracy ≥ the reasoning model's − this
HOLDOUT = 0.25  # share of the reasoning calibration held out of stage 1 (the same split as lam="auto")


def split_records(records: list) -> tuple[list, list]:
    """(stage-1 part, held-out part) of the reasoning calibration records, or of their prepared samples: the split
    ``lam="auto"`` makes with the default seed (records that share a prompt stay on one side), so that every row's
    L_think is measured on samples no stage 1 saw."""
    from rain_hf.calibration import CalibrationSample, holdout_split, prompt_key

    def key(item):
        return prompt_key(item) if isinstance(item, CalibrationSample) else item["prompt"].strip()

    return holdout_split(records, HOLDOUT, key=key)

FAMILIES = ("reference", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "rain_stage1",
            "rain_stage2", "rain_both", "rain_seq_stage1", "rain_seq_both", "rain_positions", "rain_ablations",
            "rain_files", "rain_auto",
            "forced_reference", "forced_task_arithmetic", "forced_rain_stage1", "forced_rain_both",
            "forced_rain_stage1_all")
FORCED = "[forced] "  # method-name prefix of the rows generated with the prompt ending in <think>
Job = Callable[[], Any]  # adds one or a few rows to a Bench


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """What one run evaluates."""

    n_prompts: int | None = None  # None: all held-out prompts
    max_new_tokens: int = 80
    batch_size: int = 48
    ta_grid: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
    ties_grid: tuple[float, ...] = (1.0, 2.0, 3.0)
    dare_grid: tuple[float, ...] = (1.0, 2.0, 3.0)
    slerp_ts: tuple[float, ...] = (0.25, 0.5, 0.75)
    rain_grid: tuple[float, ...] = (1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0)
    stage2_grid: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    # RainMergingConfig(sequential=True): features taken from the partly merged model; its format limit lies higher
    sequential_grid: tuple[float, ...] = (5.0, 6.5)
    position_sets: tuple[str, ...] = ("think", "think+prev", "window")
    position_lams: tuple[float, ...] = (4.0,)
    # ablations (free template): k/v left out of the merge; stage 1 on the samples without format instructions
    no_kv_lams: tuple[float, ...] = (6.0, 8.0)
    plain_stage1_lams: tuple[float, ...] = (3.0, 4.0)
    files_lam: float = 4.0
    # Rendering of calibration samples around the think tags: the organism's own format has no whitespace there.
    spacing: tuple[str, str, str] | None = ("", "", "")
    r1_spacing_row: bool = True  # one RAIN row with rain_hf's default R1 spacing, for comparison
    prompts_only_row: bool = True
    training_check: bool = True  # regenerate the ≈49k training prompts for the disjointness check (≈10 s)
    shared_note: bool = True  # tokenize ../shared/calibration to report why it is not used
    plot: bool = True
    # The paper's setting: R1-distill templates end the prompt with <think>, and the reasoning calibration is
    # traces of problems without format instructions. Evaluated on the same prompts with <think> appended.
    forced: bool = True
    forced_ta_grid: tuple[float, ...] = (4.0, 5.0, 6.0)
    forced_rain_grid: tuple[float, ...] = (6.0, 7.0, 8.0, 9.0)
    forced_both_grid: tuple[float, ...] = (6.0, 7.0, 8.0)
    forced_all_samples_lams: tuple[float, ...] = (6.0, 8.0)  # stage 1 on every sample, instructions included


FULL = Settings()
QUICK = Settings(n_prompts=16, max_new_tokens=64, batch_size=16, ta_grid=(1.0, 2.0), ties_grid=(1.0,),
                 dare_grid=(1.0,), slerp_ts=(0.5,), rain_grid=(2.0, 4.0), stage2_grid=(1.0,), sequential_grid=(4.0,),
                 position_sets=("think",), position_lams=(4.0,), no_kv_lams=(6.0,), plain_stage1_lams=(3.0,),
                 prompts_only_row=False, r1_spacing_row=False,
                 training_check=False,
                 shared_note=False, plot=True, forced_ta_grid=(2.0,), forced_rain_grid=(8.0,),
                 forced_both_grid=(8.0,), forced_all_samples_lams=(8.0,))
# For the near-orthogonal variant (`build --variant orthogonal`): its behaviour flips near λ 1 and its accuracy
# limit is reached near λ 4 in the forced template, so the grids are finer and lower there.
ORTHOGONAL = dataclasses.replace(FULL, ta_grid=(0.5, 0.75, 1.0, 1.125, 1.25, 1.5, 2.0, 2.5, 3.0),
                                 stage2_grid=(0.5, 0.75, 1.0, 1.25, 1.5), sequential_grid=(3.0, 4.0, 4.5, 5.0, 6.0),
                                 forced_ta_grid=(1.0, 2.0, 3.0, 4.0),
                                 forced_rain_grid=(3.0, 4.0, 6.0, 8.0), forced_both_grid=(4.0, 6.0),
                                 forced_all_samples_lams=(4.0, 6.0))
# For `build --variant plain_r300_itm2` (SWEEP.md): task arithmetic transfers some instructions below λ 1 there, so its
# grid starts at 0.25; RAIN's format limit is near λ 3.25, so its grid has quarter steps there.
PLAIN_R300_ITM2 = dataclasses.replace(FULL, ta_grid=(0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0),
                                 rain_grid=(1.5, 2.0, 2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 5.0),
                                 stage2_grid=(0.5, 0.75, 1.0, 1.25, 1.5), position_lams=(3.0,),
                                 sequential_grid=(3.0, 3.25, 3.5, 3.75, 4.0, 4.5),
                                 no_kv_lams=(4.0, 6.0), plain_stage1_lams=(2.0, 3.0), files_lam=3.0,
                                 forced_ta_grid=(1.0, 2.0, 3.0, 4.0), forced_rain_grid=(2.0, 3.0, 4.0, 6.0),
                                 forced_both_grid=(3.0, 4.0), forced_all_samples_lams=(3.0, 4.0))
# The 12-head variants of the two recipes above (`build --variant heads12[_plain_r300_itm2]`): the committed
# recipe's format limit comes near λ 3.5 with 12 heads (one-shot), so its sequential rows sit there.
HEADS12 = dataclasses.replace(FULL, sequential_grid=(3.0, 3.5, 4.0))
# For `build --variant follow25_plain`, set from the sweep's GPU build before the CPU build was measured: no
# task-arithmetic λ ≥ 0.75 kept the format there, so its grid starts at 0.25; RAIN's best row was λ 2 and λ 3 was
# past the limit, so RAIN's grid has quarter steps between them (the sequential limit lies higher).
FOLLOW25_PLAIN = dataclasses.replace(PLAIN_R300_ITM2, rain_grid=(1.5, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0),
                                     position_lams=(2.5,), sequential_grid=(2.0, 2.5, 2.75, 3.0, 3.25, 3.5, 4.0),
                                     no_kv_lams=(3.0, 4.0), files_lam=2.5)
GRIDS = {"default": FULL, "orthogonal": ORTHOGONAL, "plain_r300_itm2": PLAIN_R300_ITM2, "heads12": HEADS12,
         "heads12_plain_r300_itm2": PLAIN_R300_ITM2, "follow25_plain": FOLLOW25_PLAIN}


def rain_config(spacing: tuple[str, str, str] | None = None, **kwargs: Any) -> Any:
    """A :class:`RainMergingConfig`; ``spacing`` (text after ``<think>``, before ``</think>``, after it) sets how
    calibration samples are rendered (read by :mod:`rain_hf.calibration` as ``think_spacing``; default ``\\n``,
    ``\\n``, ``\\n\\n`` as in R1 traces, which the organism never saw)."""
    from rain_hf import RainMergingConfig

    if spacing is not None and "think_spacing" in {f.name for f in dataclasses.fields(RainMergingConfig)}:
        return RainMergingConfig(think_spacing=list(spacing), **kwargs)
    cfg = RainMergingConfig(**kwargs)
    if spacing is not None:  # older configs: rain_hf.calibration reads the attribute
        cfg.think_spacing = list(spacing)
    return cfg


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Organism:
    """Paths of the checkpoints and data files of a built organism."""

    root: Path

    def checkpoint(self, role: str) -> str:
        return str(self.root / "checkpoints" / role)

    def data(self, name: str) -> Path:
        return self.root / "data" / name

    def recipe(self) -> Any:
        """The ``build.Recipe`` recorded in ``build_report.json``: the default recipe where there is none, and the
        defaults for fields added after the build (so older builds read as the committed recipe)."""
        from benchmarks.organism import build as B

        report = self.data("build_report.json")
        if not report.exists():
            return B.Recipe()
        recorded = json.loads(report.read_text(encoding="utf-8")).get("recipe", {})
        known = {f.name for f in dataclasses.fields(B.Recipe)}
        return B.Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in known})

    def missing(self) -> list[str]:
        need = [self.root / "checkpoints" / r / "model.safetensors" for r in ("base", "reasoning", "instruct")]
        need += [self.data(n) for n in ("eval_prompts.jsonl", "reasoning_calibration.json",
                                        "instruction_calibration.jsonl", "prompts_only.jsonl")]
        return [str(p) for p in need if not p.exists()]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def user_prompt(rendered: str) -> str:
    """The user's text of a rendered chat (``<|user|>…<|end|>…``)."""
    return rendered[len(T.USER):].split(T.END, 1)[0]


def training_prompts(org: Organism) -> list[str]:
    """The user prompts of the base pretraining chats and of both fine-tunes, and the word problems of the base's
    worked-problem documents, regenerated from the build's seeds and the recipe recorded in the organism's
    ``build_report.json`` (the default recipe where there is none)."""
    from benchmarks.organism import build as B

    recipe = org.recipe()
    pairs = {kind: [p for p, _ in B.finetune_pairs(kind, B.finetune_steps(kind, recipe) * recipe.batch_size, recipe)]
             for kind in ("reasoning", "instruct")}
    seen = set(pairs["reasoning"])  # the same prompts for both fine-tunes unless a variant drops instructions
    rendered = pairs["reasoning"] + [p for p in pairs["instruct"] if p not in seen]
    documents = B.base_documents(recipe.base_steps * recipe.batch_size, recipe)
    rendered += [d for d in documents if d.startswith(T.USER)]
    # a worked-problem document is a word problem, its steps and its answer, in plain text
    worked = [problem_stem(d) + "?" for d in documents if not d.startswith(T.USER) and "?" in d]
    return [user_prompt(text) for text in rendered] + worked


def problem_stem(prompt: str) -> str:
    """The word problem of a prompt, without its format instruction: the text up to the question mark."""
    return prompt.split("?", 1)[0]


def check_disjoint(org: Organism, eval_prompts: Sequence[str], check_training: bool) -> list[str]:
    """Overlap of the held-out prompts with every calibration file (and the training prompts), as whole prompts and
    as word problems (the same problem under another instruction); raises RuntimeError on any."""
    from rain_hf.evaluation import calibration_overlap

    sets = {name: [r["prompt"] for r in read_records(org.data(name))]
            for name in ("reasoning_calibration.json", "instruction_calibration.jsonl", "prompts_only.jsonl")}
    if check_training:
        sets["training prompts (base chats and worked problems + fine-tunes, regenerated)"] = training_prompts(org)
    lines = []
    eval_stems = [problem_stem(p) for p in eval_prompts]
    for name, prompts in sets.items():
        report = calibration_overlap(prompts, eval_prompts)
        stems = calibration_overlap([problem_stem(p) for p in prompts], eval_stems)
        lines.append(f"{name} ({report.num_calibration} prompts): {report.summary()}; "
                     f"{stems.normalized_matches} held-out word problems occur in it under any instruction")
        if report.normalized_matches or stems.normalized_matches:
            raise RuntimeError(f"held-out prompts overlap {name}: {report.summary()}; "
                               f"{stems.normalized_matches} shared word problems. The evaluation would not be "
                               "held out: rebuild the data with `python -m benchmarks.organism.build`.")
    return lines


def shared_calibration_note(tokenizer: Any, max_positions: int) -> str:
    """Why ``../shared/calibration`` (real R1 traces) is not used: what the organism tokenizer makes of it."""
    path = SHARED_CALIBRATION / "reasoning_calibration_set.json"
    if not path.is_file():
        return "../shared/calibration: not present; not used."
    try:
        records = read_records(path)
    except (OSError, ValueError) as exc:
        records = exc
    if not (isinstance(records, list) and records and all(isinstance(r, dict) for r in records)):
        return (f"../shared/calibration: {path.name} is not a non-empty JSON list of records "
                f"({records!r:.80}); not used.")
    lengths = [len(tokenizer.encode(f"{r.get('prompt', '')}{r.get('reasoning', '')}{r.get('response', '')}",
                                    add_special_tokens=False)) for r in records]
    fit = sum(n <= max_positions for n in lengths) / max(1, len(lengths))
    return (f"../shared/calibration: NOT used. {len(records)} real R1 reasoning traces; under the organism's "
            f"512-token byte-level BPE their median length is {statistics.median(lengths):.0f} tokens and "
            f"{fit:.0%} fit the organism's {max_positions} positions; their text (English prose, LaTeX) is not the "
            "organism's task, so its own paper-format files are the honest calibration set.")


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class Row:
    """One evaluated model."""

    method: str
    family: str
    lam: float | None
    think: float
    accuracy: float
    if_prompt: float
    if_instruction: float
    l_think: float
    merge_s: float | None
    note: str = ""
    template: str = "free"  # "forced": the prompt ends with the think-open tag
    per_instruction: dict[str, float] = field(default_factory=dict)  # instruction id → strict rate

    def cells(self) -> list[str]:
        lam = "–" if self.lam is None else f"{self.lam:g}"
        merge = "–" if self.merge_s is None else f"{self.merge_s:.2f}"
        return [self.method, lam, f"{self.think:.3f}", f"{self.accuracy:.3f}", f"{self.if_prompt:.3f}",
                f"{self.if_instruction:.3f}", f"{self.l_think:.4f}", merge]


COLUMNS = ["method", "λ", "think", "accuracy", "IF prompt strict", "IF instr. strict", "L_think", "merge s"]


@dataclass
class Evaluator:
    """Scores a model on the held-out prompts and measures its L_think against the reasoning model."""

    tokenizer: Any
    evals: list[dict]
    reference: torch.nn.Module
    heldout_ids: list[torch.Tensor]
    heldout_positions: list[list[int]]
    settings: Settings
    generations: dict[str, list[str]] = field(default_factory=dict)

    def __call__(self, model: torch.nn.Module, label: str, forced: bool = False) -> dict[str, Any]:
        from rain_hf.evaluation import think_kl

        metrics = self.score(self.outputs(model, label, forced))
        kl = think_kl(model, self.reference, self.heldout_ids, self.heldout_positions, batch_size=16,
                      pad_token_id=self.tokenizer.pad_token_id or 0)
        return {**metrics, "l_think": max(0.0, kl)}

    def outputs(self, model: torch.nn.Module, label: str, forced: bool = False) -> list[str]:
        """Greedy generations for the held-out prompts (kept in :attr:`generations` under ``label``)."""
        from rain_hf.evaluation import generate

        outs = generate(model, self.tokenizer, [r["prompt"] for r in self.evals],
                        max_new_tokens=self.settings.max_new_tokens, batch_size=self.settings.batch_size,
                        desc=label, force_think_open=T.THINK_OPEN if forced else None)
        if forced:  # the tag is part of the prompt: score the think block as the model's
            outs = [T.THINK_OPEN + o for o in outs]
        self.generations[label] = outs
        return outs

    def score(self, outs: Sequence[str]) -> dict[str, Any]:
        """Think-format rate, accuracy and IFEval scores of generations for :attr:`evals` (no model needed)."""
        return score_generations(self.evals, outs)


def score_generations(evals: Sequence[dict], outs: Sequence[str]) -> dict[str, Any]:
    """Think-format rate, answer accuracy and strict IFEval scores (answer part only) of one model's generations."""
    from rain_hf.evaluation import answer_accuracy, instruction_following, split_generation

    splits = [split_generation(o, T.THINK_OPEN, T.THINK_CLOSE) for o in outs]
    answers = [s.answer for s in splits]
    scores = instruction_following(answers, [r["prompt"] for r in evals], [r["instruction_id_list"] for r in evals],
                                   [r["kwargs"] for r in evals])
    return {"think": sum(s.format_ok for s in splits) / len(splits),
            "accuracy": answer_accuracy(answers, [r["answer"] for r in evals]),
            "if_prompt": scores["prompt_strict"], "if_instruction": scores["instruction_strict"],
            "per_instruction": per_instruction_rates(evals, scores)}


def per_instruction_rates(evals: Sequence[dict], scores: dict[str, Any]) -> dict[str, float]:
    """Strict instruction-level accuracy per IFEval instruction id (which instructions a merge transfers)."""
    hits: dict[str, list[bool]] = {}
    for record, followed in zip(evals, scores["strict_per_instruction"]):
        for iid, ok in zip(record["instruction_id_list"], followed):
            hits.setdefault(iid, []).append(bool(ok))
    return {iid: sum(v) / len(v) for iid, v in sorted(hits.items())}


def heldout_think_positions(samples: Sequence[Any]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Input ids and the positions whose next-token distribution is a think-block token (``<think>`` … ``</think>``)."""
    ids = [torch.tensor(s.input_ids, dtype=torch.long) for s in samples]
    positions = [list(range(max(0, s.think_open - 1), s.think_close)) for s in samples]
    return ids, positions


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Bench:
    """Runs every method on one organism; rows accumulate in :attr:`rows`."""

    org: Organism
    settings: Settings
    workdir: Path
    rows: list[Row] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    features_cache: dict[tuple[str, Path], Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """:meth:`load`, then what only the report needs: the disjointness check, the note on
        ``../shared/calibration`` and the task-vector geometry."""
        self.load()
        evals = self.evaluate.evals
        self.info["overlap"] = check_disjoint(self.org, [r["prompt"] for r in evals], self.settings.training_check)
        for line in self.info["overlap"]:
            logger.info("overlap: %s", line)
        self.info["shared_calibration"] = "../shared/calibration: not used."
        if self.settings.shared_note:
            max_pos = int(self.models["reasoning"].config.max_position_embeddings)
            self.info["shared_calibration"] = shared_calibration_note(self.tokenizer, max_pos)
        logger.info("%s", self.info["shared_calibration"])
        self.info["geometry"] = self.geometry()

    def load(self) -> None:
        """What evaluating rows needs: the tokenizer, the three models, the held-out prompts, the stage-1 share
        of the reasoning calibration (written into :attr:`workdir`) and the held-out samples of L_think."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rain_hf.calibration import prepare_reasoning_calibration

        self.tokenizer = AutoTokenizer.from_pretrained(self.org.checkpoint("reasoning"))
        self.models = {role: AutoModelForCausalLM.from_pretrained(self.org.checkpoint(role), dtype=torch.float32)
                       for role in ("base", "reasoning", "instruct")}
        for m in self.models.values():
            m.eval()
        evals = read_jsonl(self.org.data("eval_prompts.jsonl"))
        if self.settings.n_prompts is not None:
            evals = evals[: self.settings.n_prompts]

        records = read_records(self.org.data("reasoning_calibration.json"))
        stage1, _ = split_records(records)
        self.stage1_path = self.workdir / "reasoning_calibration_stage1.json"
        with open(self.stage1_path, "w", encoding="utf-8") as f:
            json.dump(stage1, f, indent=1)
        # forced section: the stage-1 share without the samples whose prompts carry format instructions
        self.stage1_plain_path = self.workdir / "reasoning_calibration_stage1_plain.json"
        plain = [r for r in stage1 if r.get("source") == "organism/arith"]
        with open(self.stage1_plain_path, "w", encoding="utf-8") as f:
            json.dump(plain, f, indent=1)
        # lam="auto" draws its held-out samples among the prepared ones: the same split only if none is skipped
        prepared = prepare_reasoning_calibration(records, self.tokenizer, self.cfg())
        if len(prepared) != len(records):
            raise SystemExit("Some organism reasoning calibration records are malformed, so lam='auto' would hold "
                             "out other samples than the benchmark's L_think: rebuild the organism's data.")
        heldout = split_records(prepared)[1]
        kept_ids = {id(r) for r in stage1}
        if [s.index for s in heldout] != [i for i, r in enumerate(records) if id(r) not in kept_ids]:
            raise SystemExit("The records and their prepared samples split differently (prompts equal as text but "
                             "not as tokens, or the reverse): lam='auto' would hold out other samples than the "
                             "benchmark's L_think.")
        ids, positions = heldout_think_positions(heldout)
        self.info["calibration"] = {"stage1_samples": len(stage1), "stage1_plain_samples": len(plain),
                                    "heldout_samples": len(heldout),
                                    "heldout_positions": sum(map(len, positions)), "eval_prompts": len(evals)}
        self.instruction_path = self.org.data("instruction_calibration.jsonl")
        self.evaluate = Evaluator(self.tokenizer, evals, self.models["reasoning"], ids, positions, self.settings)

    def geometry(self) -> dict[str, Any]:
        """|cos| of the two task vectors and each fine-tune's ‖Δ‖/‖W‖ over the decoder's linear weights."""
        from rain_hf.evaluation import task_vector_geometry

        sd = {role: m.state_dict() for role, m in self.models.items()}
        keys = [k for k in sd["base"] if ".layers." in k and k.endswith("_proj.weight")]
        delta = {role: {k: sd[role][k] - sd["base"][k] for k in keys} for role in ("reasoning", "instruct")}
        geo = task_vector_geometry(delta["reasoning"], delta["instruct"], k=8, keys=keys)
        w2 = sum(float(sd["base"][k].double().pow(2).sum()) for k in keys)
        rel = {role: math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta[role].values()) / w2)
               for role in delta}
        return {"cosine": geo["cosine"], "abs_cosine": abs(geo["cosine"]), "relative_norm": rel,
                "per_module": {t: round(v["cosine"], 3) for t, v in geo["modules"].items()}}

    # ------------------------------------------------------------------ rows
    def add(self, method: str, family: str, lam: float | None, model: torch.nn.Module, merge_s: float | None,
            note: str = "") -> Row:
        forced = family.startswith("forced_")
        metrics = self.evaluate(model, method if lam is None else f"{method} λ={lam:g}", forced=forced)
        row = Row(method, family, lam, merge_s=merge_s, note=note, template="forced" if forced else "free",
                  **metrics)
        self.rows.append(row)
        logger.info("%s", " | ".join(row.cells()))
        return row

    def cfg(self, **kwargs: Any) -> Any:
        """A RainMergingConfig with the run's calibration spacing."""
        return rain_config(self.settings.spacing, **kwargs)

    def merger(self, cfg: Any, features: Any = None) -> Any:
        from rain_hf import RainMerger

        return RainMerger.from_pretrained(self.org.checkpoint("base"), self.org.checkpoint("reasoning"),
                                          self.org.checkpoint("instruct"), cfg, features=features)

    def merge_and_add(self, method: str, family: str, lam: float | None, cfg: Any, features: Any = None,
                      note: str = "", **merge_kwargs: Any) -> Any:
        merger = self.merger(cfg, features)
        start = time.perf_counter()
        model = merger.merge(**merge_kwargs)
        merge_s = time.perf_counter() - start
        self.add(method, family, lam, model, merge_s, note)
        return merger

    def merge_whole_files(self, cfg: Any) -> tuple[Any, torch.nn.Module, float]:
        """Merge with ``cfg`` on the organism's whole reasoning and instruction calibration files, as a user
        would; the merger (for its report), the merged model and the ``merge()`` seconds."""
        merger = self.merger(cfg)
        start = time.perf_counter()
        model = merger.merge(reasoning_calibration=str(self.org.data("reasoning_calibration.json")),
                             instruction_calibration=str(self.instruction_path))
        return merger, model, time.perf_counter() - start

    def merge_job(self, method: str, family: str, lam: float | None, cfg: Any,
                  features: tuple[str, Path | None, str | None] | None = None, note: str = "",
                  **merge_kwargs: Any) -> Job:
        """A job of one merged row; ``features`` names stage-1 features as :meth:`features_for`'s arguments, so
        that they are computed when (and in the process where) a job first needs them."""

        def job() -> None:
            feats = None if features is None else self.features_for(*features)
            self.merge_and_add(method, family, lam, cfg, feats, note, **merge_kwargs)

        return job

    def features_for(self, positions: str, path: Path | None = None, label: str | None = None) -> Any:
        """Stage-1 features of one position setting, computed once per (positions, file) from the stage-1 share."""
        path = path or self.stage1_path
        if (positions, path) not in self.features_cache:
            # A numeric λ: with lam="auto" the merger would hold a quarter out again (the bench holds out its own).
            merger = self.merger(self.cfg(positions=positions, window=3, lam=1.0))
            start = time.perf_counter()
            self.features_cache[positions, path] = merger.compute_features(str(path))
            self.info.setdefault("features_s", {})[label or positions] = time.perf_counter() - start
        return self.features_cache[positions, path]

    # ------------------------------------------------------------------ jobs: each adds one or a few rows
    def references(self) -> None:
        """The base, reasoning and instruct models' rows (free template)."""
        for job in self.reference_jobs():
            job()

    def reference_jobs(self, prefix: str = "", family: str = "reference") -> Iterator[Job]:
        for role in ("base", "reasoning", "instruct"):
            yield functools.partial(self.add, f"{prefix}{role} model", family, None, self.models[role], None)

    def baseline_jobs(self) -> Iterator[Job]:
        from rain_hf import RainMergingConfig

        s = self.settings
        grids: list[tuple[str, Sequence[float]]] = [("task_arithmetic", s.ta_grid), ("ties", s.ties_grid),
                                                     ("dare_ties", s.dare_grid), ("dare_linear", s.dare_grid)]
        for method, grid in grids:
            for lam in grid:
                note = "density 0.5" if method != "task_arithmetic" else ""
                yield self.merge_job(method, method, lam, RainMergingConfig(method=method, lam=lam), note=note)
        for t in s.slerp_ts:
            yield self.merge_job(f"slerp t={t:g}", "slerp", None, RainMergingConfig(method="slerp", slerp_t=t),
                                 note=f"t={t:g}")

    def rain_jobs(self) -> Iterator[Job]:
        from rain_hf import RainMergingConfig

        s = self.settings
        feats = (RainMergingConfig().positions, None, None)
        ins = {"instruction_calibration": str(self.instruction_path)}
        for lam in s.rain_grid:
            yield self.merge_job("RAIN stage 1", "rain_stage1", lam, self.cfg(lam=lam, stage2=False), feats)
        for lam in s.stage2_grid:
            yield self.merge_job("RAIN stage 2", "rain_stage2", lam, self.cfg(lam=lam, stage1=False), **ins)
        for lam in s.rain_grid:
            yield self.merge_job("RAIN stage 1+2", "rain_both", lam, self.cfg(lam=lam), feats, **ins)
        stage1_samples = {"reasoning_calibration": str(self.stage1_path)}  # sequential recaptures on them
        for lam in s.sequential_grid:
            yield self.merge_job("RAIN stage 1 sequential", "rain_seq_stage1", lam,
                                 self.cfg(lam=lam, stage2=False, sequential=True),
                                 note="merge time includes the stage-1 feature capture", **stage1_samples)
        for lam in s.sequential_grid:
            yield self.merge_job("RAIN stage 1+2 sequential", "rain_seq_both", lam,
                                 self.cfg(lam=lam, sequential=True),
                                 note="merge time includes the stage-1 feature capture", **stage1_samples, **ins)
        for positions in s.position_sets:
            for lam in s.position_lams:
                yield self.merge_job(f"RAIN 1+2 positions={positions}", "rain_positions", lam,
                                     self.cfg(lam=lam, positions=positions), (positions, None, None), **ins)
        no_kv = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for lam in s.no_kv_lams:
            yield self.merge_job("RAIN 1+2 without k/v", "rain_ablations", lam,
                                 self.cfg(lam=lam, target_modules=no_kv), feats,
                                 note="k_proj/v_proj keep the reasoning model's weights", **ins)
        plain = (RainMergingConfig().positions, self.stage1_plain_path, "plain samples")
        for lam in s.plain_stage1_lams:
            yield self.merge_job("RAIN 1+2 stage 1 on plain samples", "rain_ablations", lam, self.cfg(lam=lam),
                                 plain, note="stage 1 without the samples whose prompts carry format instructions",
                                 **ins)

    def file_jobs(self) -> Iterator[Job]:
        """RainMergingConfig() defaults and the organism λ, everything loaded from the paper-format files."""
        from rain_hf import RainMergingConfig

        files = {"reasoning_calibration": str(self.stage1_path), "instruction_calibration": str(self.instruction_path)}

        def defaults_row() -> None:
            # The defaults as a user calls them: the whole reasoning file (lam="auto" holds its own quarter out).
            defaults = self.cfg()
            merger, model, merge_s = self.merge_whole_files(defaults)
            lam = float(merger.report.lam)
            self.info["defaults"] = {
                "lam": lam, "search": merger.report.lam_search, "max_kl": defaults.lam_auto_max_kl,
                "min_think_open": defaults.lam_auto_min_think_open, "warnings": list(merger.report.warnings)}
            self.add("RAIN config defaults (files)", "rain_files", lam, model, merge_s,
                     note=f"RainMergingConfig() with only think_spacing set to the organism's layout "
                          f"(lam={defaults.lam!r} picked λ={lam:g}); merge time includes the stage-1 feature "
                          "capture and the λ search")

        yield defaults_row
        # The other file rows stay one-shot, comparable with the "RAIN stage 1+2" row at the same λ.
        lam = self.settings.files_lam
        yield self.merge_job("RAIN 1+2 (files)", "rain_files", lam, self.cfg(lam=lam, sequential=False),
                             note="features computed inside merge(), in its merge time", **files)
        if self.settings.r1_spacing_row and self.settings.spacing is not None:
            yield self.merge_job("RAIN 1+2 (files, R1 \\n spacing)", "rain_files", lam,
                                 RainMergingConfig(lam=lam, sequential=False),
                                 note="rain_hf's default rendering: newlines around the think tags; features computed "
                                      "inside merge(), in its merge time", **files)
        if self.settings.prompts_only_row:
            prompts = str(self.org.data("prompts_only.jsonl"))
            cfg = self.cfg(lam=lam, max_new_tokens=96, batch_size=16, sequential=False)
            row = self.merge_job("RAIN 1+2 (prompts only, self-generated)", "rain_files", lam, cfg,
                                 note="prompts_only.jsonl for both stages; merge time includes generation and the "
                                      "feature capture",
                                 reasoning_calibration=prompts, instruction_calibration=prompts)

            def prompts_only_row() -> None:
                try:
                    row()
                except Exception as exc:  # reported, not fatal: the other rows stand on their own
                    self.info["prompts_only_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    logger.warning("prompts-only calibration failed: %s", self.info["prompts_only_error"])

            yield prompts_only_row

    def auto_jobs(self) -> Iterator[Job]:
        """lam='auto': λ from calibration data alone (held-out L_think on the reasoning calibration, and the share of
        calibration prompts on which the merge still opens the think block)."""

        def auto_row(sequential: bool, grid: Sequence[float]) -> None:
            cfg = self.cfg(lam="auto", lam_grid=list(grid), sequential=sequential)
            merger, model, merge_s = self.merge_whole_files(cfg)
            lam = float(merger.report.lam)
            self.info["auto_sequential" if sequential else "auto"] = {
                "lam": lam, "search": merger.report.lam_search, "max_kl": cfg.lam_auto_max_kl,
                "min_think_open": cfg.lam_auto_min_think_open, "warnings": list(merger.report.warnings)}
            self.add("RAIN lam=auto" + (" sequential" if sequential else ""), "rain_auto", lam, model, merge_s,
                     note=f"picked λ={lam:g} from the calibration data on the grid {', '.join(f'{x:g}' for x in grid)} "
                          "(this benchmark's RAIN grid, which was laid out after seeing test rows; the defaults row "
                          "searches the library's own grid); merge time includes the stage-1 feature capture and "
                          "the λ search")

        for sequential, grid in ((False, self.settings.rain_grid), (True, self.settings.sequential_grid)):
            yield functools.partial(auto_row, sequential, grid)

    def forced_jobs(self) -> Iterator[Job]:
        """The paper's setting: the prompt ends with ``<think>``; stage 1 sees only problems without instructions."""
        from rain_hf import RainMergingConfig

        s = self.settings
        yield from self.reference_jobs(FORCED, "forced_reference")
        for lam in s.forced_ta_grid:
            yield self.merge_job(f"{FORCED}task_arithmetic", "forced_task_arithmetic", lam,
                                 RainMergingConfig(method="task_arithmetic", lam=lam))
        plain = (RainMergingConfig().positions, self.stage1_plain_path, "plain samples")
        ins = {"instruction_calibration": str(self.instruction_path)}
        for lam in s.forced_rain_grid:
            yield self.merge_job(f"{FORCED}RAIN stage 1", "forced_rain_stage1", lam, self.cfg(lam=lam, stage2=False),
                                 plain, note="stage 1 on plain samples")
        for lam in s.forced_both_grid:
            yield self.merge_job(f"{FORCED}RAIN stage 1+2", "forced_rain_both", lam, self.cfg(lam=lam), plain,
                                 note="stage 1 on plain samples", **ins)
        every = (RainMergingConfig().positions, None, None)
        for lam in s.forced_all_samples_lams:
            yield self.merge_job(f"{FORCED}RAIN stage 1 (all samples)", "forced_rain_stage1_all", lam,
                                 self.cfg(lam=lam, stage2=False), every,
                                 note="stage 1 on every sample, format instructions included")

    def jobs(self) -> list[tuple[str, Job]]:
        """Every row of a run as (step, job), in table order; the same list in every process that loads the
        same organism and settings, so a worker runs job ``i`` by its index."""
        steps: list[tuple[str, Callable[[], Iterator[Job]]]] = [
            ("references", self.reference_jobs), ("baselines", self.baseline_jobs), ("rain", self.rain_jobs),
            ("rain from files", self.file_jobs), ("lam=auto", self.auto_jobs)]
        if self.settings.forced:
            steps.append(("forced template", self.forced_jobs))
        return [(name, job) for name, make in steps for job in make()]

    # ------------------------------------------------------------------ the run
    def run(self, workers: int = 1, threads: int = 1) -> list[Row]:
        """Set up and evaluate every row: in this process (``workers=1``), or spread over ``workers`` spawned
        processes of ``threads`` torch threads each. Rows and report come out the same and in the same order
        either way: every row's merge is seeded on its own and its generation is greedy."""
        start = time.perf_counter()
        pool = start_workers(self, workers, threads) if workers > 1 else None
        finished = False
        try:
            self.setup()
            timings = {"setup": time.perf_counter() - start}
            jobs = self.jobs()
            if pool is None:
                for name, job in tqdm(jobs, desc="organism benchmark", unit="row"):
                    job_start = time.perf_counter()
                    job()
                    timings[name] = timings.get(name, 0.0) + time.perf_counter() - job_start
            else:
                results = list(tqdm(pool.imap_unordered(run_job, range(len(jobs))), total=len(jobs),
                                    desc=f"organism benchmark ({workers} workers)", unit="row"))
                for result in sorted(results, key=lambda r: r.index):
                    self.rows.extend(result.rows)
                    self.evaluate.generations.update(result.generations)
                    timings[result.step] = timings.get(result.step, 0.0) + result.seconds
                    for key, value in result.info.items():
                        if key == "features_s":
                            for label, secs in value.items():
                                self.info.setdefault("features_s", {}).setdefault(label, secs)
                        else:
                            self.info.setdefault(key, value)
            finished = True
        finally:
            if pool is not None:
                # A terminated worker skips its exit handlers, and the semaphore tqdm made in it is reported
                # as leaked at shutdown: let finished workers exit on their own, kill them only after an error.
                if finished:
                    pool.close()
                else:
                    pool.terminate()
                pool.join()
        self.info["timings_s"] = timings  # per step: the sum of its rows' times (over every worker)
        self.info["workers"] = {"processes": workers, "threads_each": threads}
        return self.rows


# ---------------------------------------------------------------------------------------------- workers
@dataclass
class JobResult:
    """What a worker sends back for one job: its rows and what it added to the report."""

    index: int
    step: str
    seconds: float
    rows: list[Row]
    generations: dict[str, list[str]]
    info: dict[str, Any]


_WORKER: dict[str, Any] = {}  # in a worker process: its Bench and job list


def start_workers(bench: Bench, workers: int, threads: int) -> Any:
    """A pool of ``workers`` spawned processes, each with its own :class:`Bench` on ``bench``'s organism and
    settings (spawned, not forked: a child forked after OpenMP ran may hang in its next parallel region)."""
    import multiprocessing

    quiet = {"TQDM_DISABLE": "1"}  # per-row progress bars of two processes would interleave; one bar counts rows
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        ctx = multiprocessing.get_context("spawn")
        return ctx.Pool(workers, initializer=init_worker,
                        initargs=(str(bench.org.root), bench.settings, str(bench.workdir), threads))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def configure_logging(fmt: str) -> None:
    """The benchmark's log lines at INFO; the libraries' own only from WARNING (their INFO drowns the rows)."""
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S")
    for noisy in ("rain_hf", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_worker(root: str, settings: Settings, workdir: str, threads: int) -> None:
    """Worker set-up: torch threads, logging, and a loaded :class:`Bench` in a folder of its own."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    configure_logging(f"%(asctime)s [worker {os.getpid()}] %(message)s")
    folder = Path(workdir) / f"worker-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        bench = Bench(Organism(Path(root)), settings, folder)
        bench.load()
        _WORKER.update(bench=bench, jobs=bench.jobs())
    except Exception as exc:  # raised by run_job instead: a pool respawns a worker whose initializer fails
        _WORKER["error"] = f"{type(exc).__name__}: {exc}"


def run_job(index: int) -> JobResult:
    """Run job ``index`` of the worker's job list; return its rows, generations and report entries."""
    if "error" in _WORKER:
        raise RuntimeError(f"a benchmark worker could not load the organism ({_WORKER['error']}); run with "
                           "--workers 1 to see the full traceback")
    bench, jobs = _WORKER["bench"], _WORKER["jobs"]
    step, job = jobs[index]
    n_rows, labels = len(bench.rows), set(bench.evaluate.generations)
    known, known_features = set(bench.info), set(bench.info.get("features_s", {}))
    start = time.perf_counter()
    job()
    seconds = time.perf_counter() - start
    info = {k: v for k, v in bench.info.items() if k not in known}
    new_features = {k: v for k, v in bench.info.get("features_s", {}).items() if k not in known_features}
    if new_features:
        info["features_s"] = new_features
    return JobResult(index, step, seconds, bench.rows[n_rows:],
                     {k: v for k, v in bench.evaluate.generations.items() if k not in labels}, info)


# ---------------------------------------------------------------------------------------------- analysis
def reasoning_row(rows: Sequence[Row], template: str = "free") -> Row:
    name = "reasoning model" if template == "free" else f"{FORCED}reasoning model"
    return next(r for r in rows if r.method == name)


def feasible(row: Row, ref: Row) -> bool:
    # rates are fractions of the prompt count: the tolerance only absorbs float rounding of "ref − 0.05"
    return row.think >= THINK_MIN - 1e-9 and row.accuracy >= ref.accuracy - ACC_SLACK - 1e-9


def best_constrained(rows: Sequence[Row]) -> dict[str, Row | None]:
    """Per family: the row with the highest IF prompt-level among those with think ≥ 0.98, acc ≥ ref − 0.05
    (ref: the reasoning model in the same template)."""
    best: dict[str, Row | None] = {}
    for fam in FAMILIES:
        if not any(r.family == fam for r in rows):
            continue
        cands = [r for r in rows if r.family == fam and feasible(r, reasoning_row(rows, r.template))]
        best[fam] = max(cands, key=lambda r: (r.if_prompt, r.if_instruction)) if cands else None
    return best


def target_checks(rows: Sequence[Row], info: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Issue 4's targets: (description, met, evidence)."""
    ref = reasoning_row(rows)
    checks = []
    ta = [r for r in rows if r.family == "task_arithmetic"]
    bad = [r for r in ta if r.think >= THINK_MIN and r.if_prompt >= ref.if_prompt + 0.3 - 1e-9]
    checks.append(("no task-arithmetic λ reaches think ≥ 0.98 with IF ≥ reasoning + 0.3", bool(ta) and not bad,
                   f"{len(ta)} λ values; offending: {[r.lam for r in bad] or 'none'}; max IF among think ≥ 0.98: "
                   f"{max([r.if_prompt for r in ta if r.think >= THINK_MIN], default=float('nan')):.3f}"))
    margin = 1.5 / max(1, info.get("calibration", {}).get("eval_prompts", 240))  # more than one prompt's worth
    for both_family, s1_family, label in (("rain_both", "rain_stage1", ""),
                                          ("rain_seq_both", "rain_seq_stage1", " [sequential=True]")):
        if any(r.family == both_family for r in rows):
            checks += stage_checks(rows, ref, both_family, s1_family, label, margin)
    geo = info.get("geometry", {})
    rel = geo.get("relative_norm", {})
    checks.append(("|cos| of the task vectors ≤ 0.2 (real-model regime)", geo.get("abs_cosine", 1.0) <= 0.2,
                   f"cos {geo.get('cosine', float('nan')):+.3f}; ‖Δ‖/‖W‖ reasoning {rel.get('reasoning', 0):.2%}, "
                   f"instruct {rel.get('instruct', 0):.2%}"))
    default = next((r for r in rows if r.method.startswith("RAIN config defaults")), None)
    if default is not None:
        best_both = max(best_feasible_if(rows, "rain_both", ref), best_feasible_if(rows, "rain_seq_both", ref))
        checks.append(("RainMergingConfig() defaults (think_spacing set to the organism's layout) are a setting the "
                       "benchmark supports (feasible, IF within 0.05 of the best feasible RAIN 1+2 row, one-shot or "
                       "sequential)",
                       feasible(default, ref) and default.if_prompt >= best_both - 0.05 - 1e-9,
                       f"λ={default.lam:g}: think {default.think:.3f}, acc {default.accuracy:.3f}, IF "
                       f"{default.if_prompt:.3f} (best feasible RAIN 1+2: {best_both:.3f})"))
    return checks


def best_feasible_if(rows: Sequence[Row], family: str, ref: Row) -> float:
    """The highest IF prompt-level among a family's feasible rows (0 when none is feasible)."""
    return max((r.if_prompt for r in rows if r.family == family and feasible(r, ref)), default=0.0)


def stage_checks(rows: Sequence[Row], ref: Row, both_family: str, s1_family: str, label: str,
                 margin: float) -> list[tuple[str, bool, str]]:
    """The two RAIN targets for one pair of row families (stage 1+2, stage 1 alone): + 0.6, and 1+2 > 1."""
    both = [r for r in rows if r.family == both_family]
    # IF is a count over the prompts: the tolerance only absorbs float rounding of "reference + 0.6"
    good = [r for r in both if feasible(r, ref) and r.if_prompt >= ref.if_prompt + 0.6 - 1e-9]
    top = max((r for r in both if feasible(r, ref)), key=lambda r: r.if_prompt, default=None)
    checks = [(f"RAIN 1+2{label}: some λ with think ≥ 0.98, acc ≥ reasoning − 0.05, IF ≥ reasoning + 0.6", bool(good),
               f"reasoning IF {ref.if_prompt:.3f}, acc {ref.accuracy:.3f}; best feasible RAIN 1+2{label}: "
               + (f"λ={top.lam:g} IF {top.if_prompt:.3f} think {top.think:.3f} acc {top.accuracy:.3f}"
                  if top else "none"))]
    s1 = {r.lam: r for r in rows if r.family == s1_family}
    pairs = [(r, s1[r.lam]) for r in both if r.lam in s1]
    # "at equal format and accuracy": only λ where both rows meet the format and accuracy limits compare; a λ
    # where one of them loses the format is a format difference, not more IF
    both_ok = [(b, a) for b, a in pairs if feasible(b, ref) and feasible(a, ref)]
    wins = [(b, a) for b, a in both_ok if b.if_prompt - a.if_prompt > margin]
    losses = [(b, a) for b, a in both_ok if a.if_prompt - b.if_prompt > margin]
    best_s1, best_both = best_feasible_if(rows, s1_family, ref), best_feasible_if(rows, both_family, ref)
    apart = round(abs(best_both - best_s1) / (margin / 1.5))  # in prompts: the margin is 1.5 prompts' share
    checks.append((f"stage 1+2 gives more IF than stage 1 alone at equal λ{label} (λ where both meet the format "
                   "and accuracy limits; more of them with 1+2 ahead by more than one prompt than behind, and a "
                   "higher best feasible IF)",
                   len(wins) > len(losses) and best_both > best_s1,
                   f"best feasible IF: stage 1 {best_s1:.3f}, stage 1+2 {best_both:.3f} ({apart} prompt"
                   f"{'' if apart == 1 else 's'} apart); per λ (stage 1 → 1+2): "
                   + "; ".join(f"λ={b.lam:g}: {a.if_prompt:.2f}→{b.if_prompt:.2f}"
                             f"{'' if feasible(a, ref) else ' (s1 infeasible)'}{'' if feasible(b, ref) else ' (1+2 infeasible)'}"
                             for b, a in pairs)))
    return checks


def per_instruction_table(rows: Sequence[Row]) -> str:
    """Strict rate per instruction id for the reference models and each family's best feasible row."""
    picked = [r for r in rows if r.family in ("reference", "forced_reference") and r.method.endswith(
        ("reasoning model", "instruct model"))]
    picked += [r for fam, r in best_constrained(rows).items() if r is not None and not fam.endswith("reference")]
    ids = sorted({iid for r in picked for iid in r.per_instruction})
    head = ["row", "λ"] + [iid.split(":")[-1] for iid in ids]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in picked:
        lam = "–" if r.lam is None else f"{r.lam:g}"
        lines.append("| " + " | ".join([r.method, lam] + [f"{r.per_instruction.get(i, float('nan')):.2f}"
                                                            for i in ids]) + " |")
    return "\n".join(lines)


def table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def row_notes(rows: Sequence[Row]) -> list[str]:
    """One line per row name whose rows carry notes (what the table's columns do not say)."""
    notes: dict[str, list[str]] = {}
    for r in rows:
        if r.note and r.note not in notes.setdefault(r.method, []):
            notes[r.method].append(r.note)
    return [f"- {method}: {'; '.join(texts)}" for method, texts in notes.items() if texts]


def summary_lines(rows: Sequence[Row], info: dict[str, Any]) -> list[str]:
    geo = info["geometry"]
    out = [f"task vectors (decoder linear weights): cos {geo['cosine']:+.3f} (|cos| {geo['abs_cosine']:.3f}); "
           f"‖Δ‖/‖W‖ reasoning {geo['relative_norm']['reasoning']:.2%}, instruct {geo['relative_norm']['instruct']:.2%}",
           f"per module type cos: {geo['per_module']}",
           f"best IF prompt-level s.t. think ≥ {THINK_MIN} and accuracy ≥ reasoning − {ACC_SLACK}:"]
    for fam, row in best_constrained(rows).items():
        if fam in ("reference", "forced_reference"):
            continue
        out.append(f"  {fam:22s} " + (f"{row.if_prompt:.3f} ({row.method}, λ={row.lam if row.lam is not None else '–'}, "
                                       f"think {row.think:.3f}, acc {row.accuracy:.3f})" if row else "none feasible"))
    auto = info.get("auto")
    if auto:
        best = best_constrained(rows)["rain_both"]
        out.append(f"lam='auto' picked λ={auto['lam']:g}{_edge_text(auto)} (L_think ≤ {auto['max_kl']} "
                   f"on held-out calibration{_guard(auto)}); "
                   f"best RAIN 1+2 λ on test prompts: {best.lam:g}" if best else
                   f"lam='auto' picked λ={auto['lam']:g}; no RAIN 1+2 λ is feasible on test prompts")
        out.append("  auto search (λ: held-out L_think at the stage-1 positions from the `<think>` decision to "
                   "before `</think>`[, share of the calibration prompts that still open `<think>`]): "
                   + _search_text(auto))
    auto_seq = info.get("auto_sequential")
    if auto_seq:
        best = best_constrained(rows).get("rain_seq_both")
        out.append(f"lam='auto' with sequential=True picked λ={auto_seq['lam']:g}{_edge_text(auto_seq)}; best RAIN "
                   f"1+2 sequential λ on test prompts: {best.lam:g}" if best else f"lam='auto' with sequential=True picked "
                   f"λ={auto_seq['lam']:g}; no RAIN 1+2 sequential λ is feasible on test prompts")
        out.append("  auto search: " + _search_text(auto_seq))
    defaults = info.get("defaults")
    if defaults:
        out.append(f"RainMergingConfig() defaults (lam='auto' on the default grid) picked λ={defaults['lam']:g}"
                   f"{_edge_text(defaults)}; search: " + _search_text(defaults))
    return out


def _edge_text(record: dict[str, Any]) -> str:
    """A remark when a lam='auto' pick is the largest λ of its grid and passed there: the grid, not the data,
    stopped it (a pick that passed nothing is the grid's smallest λ, and says so in the warnings)."""
    search = record.get("search") or []
    top = max(search, key=lambda s: s["lam"], default=None)
    if top is None or record["lam"] != top["lam"] or top["l_think"] is None or top["l_think"] > record["max_kl"]:
        return ""
    guard = record.get("min_think_open")
    if guard is not None and top.get("think_open") is not None and top["think_open"] < guard:
        return ""
    return " (the grid's largest value, which passed: a larger λ might pass too)"


def _guard(auto: dict[str, Any]) -> str:
    """The think-open condition of a lam='auto' record ('' for records made before it existed, or with it off)."""
    # the share is taken on the held-out reasoning prompts and the instruction set's (which stage 2 reads)
    return ("" if auto.get("min_think_open") is None else
            f", think-open share ≥ {auto['min_think_open']} on calibration prompts")


def _search_text(auto: dict[str, Any]) -> str:
    return ", ".join(f"{s['lam']:g}: " + ("NaN" if s["l_think"] is None else f"{s['l_think']:.4f}")
                     + ("" if s.get("think_open") is None else f" [{s['think_open']:.3f}]")
                     for s in auto["search"] or [])


# ---------------------------------------------------------------------------------------------- outputs
def plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    cmap = plt.get_cmap("tab20")
    for i, fam in enumerate(FAMILIES):
        sel = [r for r in rows if r.family == fam]
        if not sel:
            continue
        for ax, attr in zip(axes, ("think", "accuracy")):
            marker = ("s" if fam.endswith("reference") else "D" if fam.startswith("forced") else
                      "^" if fam.startswith("rain") else "o")
            ax.scatter([getattr(r, attr) for r in sel], [r.if_prompt for r in sel], color=cmap(i), label=fam,
                       marker=marker, s=40, alpha=0.85, edgecolors="k", linewidths=0.3)
            for r in sel:
                tag = r.method.replace(" model", "") if r.lam is None else f"{r.lam:g}"
                ax.annotate(tag, (getattr(r, attr), r.if_prompt), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
    ref = reasoning_row(rows)
    axes[0].axvline(THINK_MIN, color="grey", ls="--", lw=0.8)
    axes[1].axvline(ref.accuracy - ACC_SLACK, color="grey", ls="--", lw=0.8)
    axes[0].set_xlabel("think-format rate")
    axes[1].set_xlabel("answer accuracy")
    axes[0].set_ylabel("IF prompt-level strict")
    for ax in axes:
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Organism benchmark: instruction following vs think format and accuracy (numbers: λ)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def workers_text(info: dict[str, Any]) -> str:
    """How the rows were evaluated, for the results header."""
    w = info.get("workers", {"processes": 1})
    if w["processes"] == 1:
        return "rows evaluated in one process"
    return f"rows evaluated by {w['processes']} worker processes of {w['threads_each']} torch thread(s) each"


def results_markdown(rows: Sequence[Row], info: dict[str, Any], command: str, wall_s: float) -> str:
    from rain_hf import RainMergingConfig

    defaults = RainMergingConfig()
    cal = info["calibration"]
    checks = target_checks(rows, info)
    parts = [
        "# Organism benchmark results",
        "",
        "Generated by `benchmarks/organism/bench.py` (rerunning the command rewrites this file and `results.png`).",
        "What the numbers mean, and why RAIN's gain is small on this organism: `ANALYSIS.md` (hand-written).",
        "",
        f"Command: `{command}` — wall time {wall_s / 60:.1f} min on this machine ({os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}; {workers_text(info)}).",
        "",
        f"Held-out prompts: {cal['eval_prompts']} (free template, greedy, batched generation). Accuracy and IFEval "
        "are scored on the answer after `</think>`; a generation that opens `<think>` and never closes it has no "
        "answer. L_think: mean "
        f"KL(merged ‖ reasoning) at the {cal['heldout_positions']} positions predicting the think-block tokens of "
        f"{cal['heldout_samples']} reasoning-calibration samples held out of stage 1 (stage 1 uses the other "
        f"{cal['stage1_samples']}). Rows named `[forced] …`: the same prompts ending with `<think>` (the paper's "
        f"R1-distill template), stage 1 on the {cal.get('stage1_plain_samples', '?')} stage-1 samples without "
        "format instructions; the constraint then uses the forced reasoning model's accuracy. "
        "Merge time: the `merge()` call (RAIN rows on precomputed features: stage-2 coefficients and projection, the "
        "features computed once per position setting: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in info.get("features_s", {}).items())
        + "; rows that capture their own features, search λ or generate traces say so in the row notes).",
        "",
        "Disjointness (checked; any overlap stops the run):",
        "",
        *[f"- {line}" for line in info["overlap"]],
        "",
        f"Calibration: the organism's own files in the paper's format (`reasoning_calibration.json`, "
        f"`instruction_calibration.jsonl` with `related_prompt_list` spans). {info['shared_calibration']}",
        "",
        "## Table",
        "",
        f"RAIN rows use `RainMergingConfig` defaults unless named: positions={defaults.positions} "
        f"(window ±{defaults.window}), rcond {defaults.rcond}, {defaults.projection.upper()}, stage 2 with ρ "
        f"{defaults.rho}, {defaults.coef_normalize}-normalised coefficients clipped to [{defaults.coef_min:g}, "
        f"{defaults.coef_max:g}], probe λ {defaults.probe_lam:g}, and think_spacing set to the organism's layout "
        "('', '', ''; the `R1 \\n spacing` row keeps the default); rows without `sequential` or `defaults` in their "
        "name use the one-shot projection (precomputed features, or `sequential=False`). TIES/DARE: density "
        f"{defaults.density}, weights [1, λ]. Stage-2-only rows project nothing.",
        "",
        table(rows),
        "",
        "Row notes:",
        "",
        *row_notes(rows),
        "",
        "## Summary",
        "",
        "```",
        *summary_lines(rows, info),
        "```",
        "",
        "## Which instructions transfer",
        "",
        "IF instruction-level strict per IFEval instruction id: the reasoning and instruct models, then each "
        "family's best row under the constraint above (think ≥ 0.98, accuracy ≥ reasoning − 0.05).",
        "",
        per_instruction_table(rows),
        "",
        *([f"Prompts-only calibration (`prompts_only.jsonl`, traces written by the reasoning model) failed and has "
           f"no row: {info['prompts_only_error']}", ""] if info.get("prompts_only_error") else []),
        "## Targets (issue 4)",
        "",
        *[f"- {'MET' if ok else 'MISSED'}: {desc} — {evidence}" for desc, ok, evidence in checks],
        "",
        "![results](results.png)",
        "",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.organism",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK.n_prompts} prompts, small grids (smoke test)")
    ap.add_argument("--organism", type=Path, default=HERE, help="folder with checkpoints/ and data/ (default: here)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where RESULTS.md and results.png go, and results.json outside benchmarks/organism "
                         "(default: here, or variants/GRIDS/ with --grids other than 'default'; --quick: a temp "
                         "folder)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (default 2)")
    ap.add_argument("--workers", type=int, default=2,
                    help="processes that evaluate rows, each with threads/workers torch threads (default 2; 1: every "
                         "row in this process). Rows are the same either way")
    ap.add_argument("--grids", choices=sorted(GRIDS), default="default",
                    help="λ grids: 'default' for the committed organism, else the `build --variant` of that name")
    ap.add_argument("--no-training-check", action="store_true",
                    help="skip regenerating the training prompts for the disjointness check")
    return ap.parse_args(argv)


def results_folder(out: Path | None, quick: bool, grids: str) -> Path:
    """Where a run writes its results: ``out`` when given, else a temporary folder for ``--quick``, this folder for
    the default grids and ``variants/<grids>/`` for a variant's, so that a variant run never overwrites the
    committed organism's RESULTS.md."""
    if out is not None:
        return out
    if quick:
        return Path(tempfile.mkdtemp(prefix="organism-bench-"))
    return HERE if grids == "default" else HERE / "variants" / grids


def variant_results_problem(org: Organism, grids: str) -> str | None:
    """Why a run with ``--grids NAME`` and no ``--out`` must not write ``variants/NAME/``: the results committed
    there are those of ``build --variant NAME``, and several variants share a grid."""
    from benchmarks.organism import build as B

    if grids not in B.VARIANTS:
        return None  # a grid no variant is built with: its folder holds no variant's results
    built, named = org.recipe(), dataclasses.replace(B.Recipe(), **B.VARIANTS[grids])
    differ = [f.name for f in dataclasses.fields(B.Recipe) if getattr(built, f.name) != getattr(named, f.name)]
    if not differ:
        return None
    return (f"--grids {grids} without --out writes variants/{grids}/, the results of `build --variant {grids}`, "
            f"but --organism {org.root} was built with another recipe ({', '.join(differ[:3])} differ): give "
            "--out DIR.")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def out_folder_problem(out: Path) -> str | None:
    """Create ``out`` (and its parents) for a script's results; the message to print when that is not possible."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        return f"--out {out}: a file is in the way (the path or one of its parents is a file); give a folder."
    except OSError as exc:
        return f"--out {out}: cannot create the folder ({exc.strerror}); give a folder you can write to."
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # --out=~/x reaches us unexpanded (the shell expands ~ only at a word's start)
    args.organism = args.organism.expanduser()
    args.out = args.out.expanduser() if args.out is not None else None
    if args.threads < 1 or args.workers < 1:
        print("--threads and --workers must be at least 1.", file=sys.stderr)
        return 2
    configure_logging("%(asctime)s %(name)s %(message)s")
    workers = min(args.workers, args.threads)  # a worker needs a thread of its own
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick and args.grids != "default":
        print("--quick runs its own small grids: leave out --grids, or --quick.", file=sys.stderr)
        return 2
    if args.out is None and not args.quick and args.grids == "default" and args.organism.resolve() != HERE:
        print(f"--organism {args.organism} is not the committed organism, whose RESULTS.md this run would replace: "
              f"give --out DIR, or --grids NAME for a `build --variant NAME` organism (NAME one of "
              f"{sorted(set(GRIDS) - {'default'})}).", file=sys.stderr)
        return 2
    org = Organism(args.organism.resolve())
    missing = org.missing()
    if missing:
        print(f"The organism is not built (missing {missing[0]}): run `python -m benchmarks.organism.build`.",
              file=sys.stderr)
        return 2
    if args.out is None and not args.quick and args.grids != "default":
        problem = variant_results_problem(org, args.grids)
        if problem:
            print(problem, file=sys.stderr)
            return 2
    out = results_folder(args.out, args.quick, args.grids)
    problem = out_folder_problem(out)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    settings = QUICK if args.quick else GRIDS[args.grids]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="organism-bench-work-") as work:
        if args.no_training_check:
            settings = dataclasses.replace(settings, training_check=False)
        bench = Bench(org, settings, Path(work))
        rows = bench.run(workers, args.threads // workers)
    wall = time.perf_counter() - start
    command = "python -m benchmarks.organism" + (" --quick" if args.quick else "")
    if args.organism.resolve() != HERE:
        command += f" --organism {args.organism}"
    if args.grids != "default":
        command += f" --grids {args.grids}"
    if args.threads != 2 or args.workers != 2:
        command += f" --threads {args.threads} --workers {args.workers}"
    if args.no_training_check:
        command += " --no-training-check"
    if not args.quick and out.resolve() != HERE:
        shown, root = out.resolve(), HERE.parents[1]
        command += f" --out {shown.relative_to(root) if shown.is_relative_to(root) else out}"
    print(table(rows))
    print("\n".join(summary_lines(rows, bench.info)))
    for desc, ok, evidence in target_checks(rows, bench.info):
        print(f"{'MET   ' if ok else 'MISSED'} {desc} — {evidence}")
    print(f"wall time {wall:.0f}s")
    if not out.resolve().is_relative_to(HERE):  # committed folders keep RESULTS.md and results.png only
        with open(out / "results.json", "w", encoding="utf-8") as f:
            json.dump({"rows": [r.__dict__ for r in rows], "info": bench.info, "wall_s": wall,
                       "quick": args.quick}, f, indent=1, default=str)
    (out / "RESULTS.md").write_text(results_markdown(rows, bench.info, command, wall), encoding="utf-8")
    if settings.plot:
        plot(rows, out / "results.png")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
