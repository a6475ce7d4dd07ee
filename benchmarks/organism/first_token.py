"""Why first-token instructions do not transfer in the free template: logit margins at the three decision points.

    python -m benchmarks.organism.first_token            # writes FIRST_TOKEN.md next to this file
    python -m benchmarks.organism.first_token --quick    # 24 prompts, two λ per family, into a temp folder

For every held-out prompt whose followed reply starts with another token than the plain reply (capitals,
lowercase, title, quotation, word limit), the script reads one merged model's next-token logits at:

- the assistant tag (free template): ``m_tag`` = logit(formatted first token) − logit(``<think>``);
- ``<think>`` at the end of the prompt (forced template): ``m_open`` = logit(formatted first token) −
  logit(first thinking token);
- ``</think>`` after the scripted thinking the reasoning model was trained on (the build's ``reasoning`` text, not
  a generation; both templates): ``m_close`` = logit(formatted first token) − logit(plain first token).

A margin above 0 means the formatted token wins there. In the free template the merge keeps the think format only
while ``m_tag`` < 0, and it writes a formatted answer after thinking only where ``m_close`` > 0, so the share of
prompts with both is the most that first-token instructions can transfer without losing the format. A second table
counts, per instruction, the generations that lost the think format (greedy, free template).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before torch loads: busy-waiting OpenMP threads slow everyone down on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.organism import build as B  # noqa: E402
from benchmarks.organism import tasks as T  # noqa: E402
from benchmarks.organism.bench import (  # noqa: E402
    HERE,
    Organism,
    out_folder_problem,
    positive_int,
    rain_config,
    read_jsonl,
    read_records,
    split_records,
)

logger = logging.getLogger("benchmarks.organism.first_token")

SPACING = ("", "", "")  # the organism's samples have no whitespace around the think tags


@dataclass(frozen=True)
class Settings:
    n_prompts: int | None = None
    ta_lams: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    rain_lams: tuple[float, ...] = (3.0, 4.0, 5.0, 6.0, 8.0)
    failure_lams: tuple[float, ...] = (3.0, 4.0)  # RAIN stage 1 on plain samples: think failures per instruction
    batch_size: int = 32


FULL = Settings()
QUICK = Settings(n_prompts=24, ta_lams=(1.0, 2.0), rain_lams=(4.0, 6.0), failure_lams=(4.0,))


@dataclass
class Probe:
    """Token ids of one held-out prompt's three decision points and the competing tokens."""

    tag: list[int]  # chat prompt ending at the assistant tag
    close: list[int]  # tag + <think> + the reasoning model's thinking + </think>
    formatted: int  # first token of the followed reply
    plain: int  # first token of the plain reply
    first_thought: int  # first token of the thinking
    instruction_ids: list[str]


def probes(tokenizer: Any, eval_prompts: Sequence[str], style: str = T.DEFAULT_REPLY_STYLE) -> list[Probe]:
    """One probe per held-out prompt whose followed reply starts differently from the plain one.

    The replies are regenerated from the build's seeds in the build's reply ``style``; the prompts must equal
    ``eval_prompts`` (a changed build would otherwise compare other texts).
    """
    records = B.eval_records(style=style)[: len(eval_prompts)]
    if [r["prompt"] for r in records] != list(eval_prompts):
        raise RuntimeError("The held-out prompts differ from the build's: rebuild the organism's data files.")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    think = tokenizer.convert_tokens_to_ids(T.THINK_OPEN)
    out = []
    for r in records:
        formatted, plain = ids(r["target_response"])[0], ids(r["plain_response"])[0]
        if formatted == plain:
            continue
        tag = ids(T.render_chat(r["prompt"]))
        thought = ids(r["reasoning"])
        close = tag + [think] + thought + ids(T.THINK_CLOSE)
        out.append(Probe(tag, close, formatted, plain, thought[0], r["instruction_id_list"]))
    return out


def next_token_log_probs(model: torch.nn.Module, seqs: Sequence[list[int]], batch_size: int,
                         pad_id: int) -> torch.Tensor:
    """Log-probabilities of the token after each sequence [N, V]; differences of them are logit differences."""
    from rain_hf.evaluation import think_log_probs

    return think_log_probs(model, [torch.tensor(s) for s in seqs], [[len(s) - 1] for s in seqs], batch_size, pad_id)


def margins(model: torch.nn.Module, ps: Sequence[Probe], think_id: int, batch_size: int,
            pad_id: int) -> dict[str, torch.Tensor]:
    """m_tag, m_open and m_close [N] of ``model`` on the probes (see the module docstring)."""
    n = torch.arange(len(ps))
    fmt = torch.tensor([p.formatted for p in ps])
    tag = next_token_log_probs(model, [p.tag for p in ps], batch_size, pad_id)
    opened = next_token_log_probs(model, [p.tag + [think_id] for p in ps], batch_size, pad_id)
    close = next_token_log_probs(model, [p.close for p in ps], batch_size, pad_id)
    return {
        "tag": tag[n, fmt] - tag[:, think_id],
        "open": opened[n, fmt] - opened[n, torch.tensor([p.first_thought for p in ps])],
        "close": close[n, fmt] - close[n, torch.tensor([p.plain for p in ps])],
    }


def summarize(m: dict[str, torch.Tensor]) -> dict[str, float]:
    """Medians, the share of prompts where the formatted token wins at each point, and the free-template bound."""
    out = {f"median_{k}": float(statistics.median(v.tolist())) for k, v in m.items()}
    out.update({f"wins_{k}": float((v > 0).float().mean()) for k, v in m.items()})
    out["free_bound"] = float(((m["tag"] < 0) & (m["close"] > 0)).float().mean())
    out["forced_bound"] = float(((m["open"] < 0) & (m["close"] > 0)).float().mean())
    return out


def think_failures(model: torch.nn.Module, tokenizer: Any, evals: Sequence[dict], batch_size: int) -> dict:
    """Per instruction id: (generations that lost the think format, prompts carrying the id), free template."""
    from rain_hf.evaluation import generate, split_generation

    outs = generate(model, tokenizer, [e["prompt"] for e in evals], max_new_tokens=80, batch_size=batch_size)
    lost, total = Counter(), Counter()
    for e, o in zip(evals, outs):
        ok = split_generation(o).format_ok
        for iid in e["instruction_id_list"]:
            total[iid] += 1
            lost[iid] += not ok
    return {iid: (lost[iid], total[iid]) for iid in sorted(total)}


def run(org: Organism, settings: Settings, workdir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from rain_hf import RainMerger

    tokenizer = AutoTokenizer.from_pretrained(org.checkpoint("reasoning"))
    evals = read_jsonl(org.data("eval_prompts.jsonl"))
    if settings.n_prompts is not None:
        evals = evals[: settings.n_prompts]
    ps = probes(tokenizer, [e["prompt"] for e in evals], org.recipe().reply_style)
    if not ps:
        raise SystemExit(f"None of the {len(evals)} prompts has a formatted reply whose first token differs from the "
                         "plain reply's, so there is nothing to probe: use more prompts (drop --quick / n_prompts).")
    think_id = tokenizer.convert_tokens_to_ids(T.THINK_OPEN)
    pad_id = tokenizer.pad_token_id

    # The benchmark's stage-1 split: its held-out quarter is left out here too.
    stage1, _ = split_records(read_records(org.data("reasoning_calibration.json")))
    calibrations: dict[str, Path] = {}
    for name, recs in (("all stage-1 samples", stage1),
                       ("plain samples only", [r for r in stage1 if r.get("source") == "organism/arith"])):
        calibrations[name] = workdir / (name.replace(" ", "_") + ".json")
        calibrations[name].write_text(json.dumps(recs), encoding="utf-8")

    def merger(method: str, lam: float, features: Any = None) -> Any:
        # one-shot throughout: features are computed once per calibration and reused, which is the one-shot form
        cfg = rain_config(SPACING, method=method, lam=lam, stage2=False, sequential=False)
        return RainMerger.from_pretrained(org.checkpoint("base"), org.checkpoint("reasoning"),
                                          org.checkpoint("instruct"), cfg, features=features)

    jobs: list[tuple[str, float | None, str | None]] = [("reasoning model", None, None)]
    jobs += [("task arithmetic", lam, None) for lam in settings.ta_lams]
    for name in calibrations:
        jobs += [(f"RAIN stage 1 ({name})", lam, name) for lam in settings.rain_lams]
    rows, failures, features = [], {}, {}
    for label, lam, cal in tqdm(jobs, desc="first-token margins", unit="model"):
        if lam is None:
            m = merger("task_arithmetic", 0.0)
            m.merge()  # λ = 0: the reasoning model itself, loaded the same way
        elif cal is None:
            m = merger("task_arithmetic", lam)
            m.merge()
        else:
            m = merger("rain", lam, features.get(cal))
            if cal not in features:
                features[cal] = m.compute_features(calibrations[cal])
            m.merge()
        m.model.eval()
        rows.append({"model": label, "lam": lam, "n": len(ps),
                     **summarize(margins(m.model, ps, think_id, settings.batch_size, pad_id))})
        if cal == "plain samples only" and lam in settings.failure_lams:
            failures[lam] = think_failures(m.model, tokenizer, evals, settings.batch_size)
    return {"rows": rows, "failures": failures, "n_prompts": len(evals), "n_probes": len(ps)}


def markdown(result: dict[str, Any], command: str, wall_s: float) -> str:
    lines = [
        "# First-token margins (generated)",
        "",
        f"Generated by `{command}` in {wall_s:.0f} s; the module docstring of "
        "`benchmarks/organism/first_token.py` defines the columns. What it means: `ANALYSIS.md`.",
        "",
        f"{result['n_probes']} of {result['n_prompts']} held-out prompts carry an instruction that changes the "
        "reply's first token. Margins are logit(formatted first token) minus the competitor's logit (median over "
        "those prompts); \"wins\" is the share of prompts where the formatted token is ahead. Stage 1 only "
        "(no stage 2), default positions and rcond.",
        "",
        "| model | λ | m_tag (vs `<think>`) | m_open (forced, vs 1st thought) | m_close (vs plain) | wins tag | "
        "wins open | wins close | free bound | forced bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lam = "–" if r["lam"] is None else f"{r['lam']:g}"
        lines.append(f"| {r['model']} | {lam} | {r['median_tag']:+.2f} | {r['median_open']:+.2f} | "
                     f"{r['median_close']:+.2f} | {r['wins_tag']:.2f} | {r['wins_open']:.2f} | "
                     f"{r['wins_close']:.2f} | {r['free_bound']:.2f} | {r['forced_bound']:.2f} |")
    lines += ["", "\"free bound\": share of prompts with m_tag < 0 and m_close > 0 (the format is kept and the "
              "answer starts formatted); \"forced bound\": the same with m_open.", ""]
    if result["failures"]:
        lams = sorted(result["failures"])
        lines += ["## Which prompts lose the think format", "",
                  "RAIN stage 1 on the plain calibration samples, greedy generation, free template: prompts that "
                  "lost the think format / prompts carrying the instruction.", "",
                  "| instruction | " + " | ".join(f"λ {lam:g}" for lam in lams) + " |",
                  "|---|" + "---|" * len(lams)]
        ids = sorted({iid for f in result["failures"].values() for iid in f})
        for iid in ids:
            cells = [f"{result['failures'][lam][iid][0]}/{result['failures'][lam][iid][1]}" for lam in lams]
            lines.append(f"| {iid} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.organism.first_token", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="24 prompts, two λ per family (smoke test)")
    ap.add_argument("--organism", type=Path, default=HERE, help="folder with checkpoints/ and data/")
    ap.add_argument("--out", type=Path, default=None, help="where FIRST_TOKEN.md goes (default: here; "
                                                             "--quick: a temp folder)")
    ap.add_argument("--threads", type=positive_int, default=2)
    args = ap.parse_args(argv)
    if args.out is None and not args.quick and args.organism.resolve() != HERE:
        print(f"--organism {args.organism} is not the committed organism, whose FIRST_TOKEN.md this run would "
              "replace: give --out DIR.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("rain_hf", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    org = Organism(args.organism.resolve())
    if org.missing():
        print(f"The organism is not built (missing {org.missing()[0]}): run `python -m benchmarks.organism.build`.",
              file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="organism-first-token-")) if args.quick else HERE)
    problem = out_folder_problem(out)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="organism-first-token-work-") as work:
        result = run(org, QUICK if args.quick else FULL, Path(work))
    wall = time.perf_counter() - start
    # Name the organism and output folder when given: a variant's file must say which checkpoints it measured.
    command = " ".join(["python -m benchmarks.organism.first_token", *(["--quick"] if args.quick else []),
                        *(["--organism", str(args.organism)] if args.organism.resolve() != HERE else []),
                        *(["--out", str(args.out)] if args.out else [])])
    text = markdown(result, command, wall)
    (out / "FIRST_TOKEN.md").write_text(text, encoding="utf-8")
    if out.resolve() != HERE:  # the committed folder keeps FIRST_TOKEN.md only
        (out / "first_token.json").write_text(json.dumps({**result, "wall_s": wall}, indent=1), encoding="utf-8")
    print(text)
    print(f"results in {out / 'FIRST_TOKEN.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
