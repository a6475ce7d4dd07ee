"""Recipe sweep: build several organism recipes and compare the merges that decide issue 4's targets on each.

    python -m benchmarks.organism.sweep run --out DIR [--device cuda] [--jobs N] [--recipes a,b] [--quick]
    python -m benchmarks.organism.sweep score DIR [--markdown FILE]

``run`` builds every recipe of :data:`RECIPES` (tokenizer, base, both fine-tunes, data files) into ``DIR/<name>/``,
one process per recipe, and generates greedily on the held-out prompts (free template) from the reference models,
task arithmetic, SLERP and RAIN (stage 1, stage 1 + 2, stage 1 + 2 on the plain calibration samples). It writes the
generations to ``DIR/<name>/sweep.json`` and does not score them, so that it also runs where lm-eval is not
installed (a GPU machine); ``score`` scores them with the IFEval checkers and prints one line per recipe.

Builds on a GPU (``--device cuda``) are not bit-identical to the CPU builds of ``build.py``: the sweep chooses a
recipe, and the chosen recipe is then rebuilt on CPU and measured with ``python -m benchmarks.organism``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.organism import bench as BE
from benchmarks.organism import build as B

# Overrides of build.Recipe, composed from the knobs the sweep varies. "default" is the committed organism's recipe;
# "orthogonal" is build.VARIANTS' variant without its thread count; "plain_r300_itm2" became build.VARIANTS' variant.
PLAIN = {"reasoning_ft_plain_share": 1.0}  # the reasoning fine-tune never sees a format instruction
ITM2 = {"instruct_forced_think_share": 0.25}  # a quarter of the instruct prompts end with a forced <think>
ORTHOGONAL = {"p_think": 0.2, "reasoning_ft_steps": 600, **PLAIN}


def _steps(n: int) -> dict[str, Any]:
    return {"reasoning_ft_steps": n}


RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "default_s1": {"seed_offset": 1},
    "default_s2": {"seed_offset": 2},
    "orthogonal": ORTHOGONAL,
    "orthogonal_s1": {**ORTHOGONAL, "seed_offset": 1},
    "plain": PLAIN,
    "plain_r300": {**PLAIN, **_steps(300)},
    "plain_half": {"reasoning_ft_plain_share": 0.5},
    "follow25_plain": {"p_follow": 0.25, **PLAIN},
    "think20_follow25_plain": {"p_think": 0.2, "p_follow": 0.25, **_steps(600), **PLAIN},
    "think35_plain_r300": {"p_think": 0.35, **_steps(300), **PLAIN},
    "itm2": ITM2,
    "orthogonal_itm2": {**ORTHOGONAL, **ITM2},
    "instruct50": {"ft_steps": 50},
    "plain_itm2": {**PLAIN, **ITM2},
    # second round, fine-tunes only (run with --base benchmarks/organism/checkpoints/base)
    "plain_r300_itm2": B.VARIANTS["plain_r300_itm2"],
    "plain_r600": {**PLAIN, **_steps(600)},
    "plain_r600_itm2": {**PLAIN, **_steps(600), **ITM2},
    "plain_r1000": {**PLAIN, **_steps(1000)},
    "plain_r1000_itm2": {**PLAIN, **_steps(1000), **ITM2},
    "plain90_r300": {"reasoning_ft_plain_share": 0.9, **_steps(300)},
    "plain90_r300_itm2": {"reasoning_ft_plain_share": 0.9, **_steps(300), **ITM2},
    "plain75_r300_itm2": {"reasoning_ft_plain_share": 0.75, **_steps(300), **ITM2},
    "plain_r300_itm2_i200": {**PLAIN, **_steps(300), **ITM2, "ft_steps": 200},
    "plain_r450_itm2": {**PLAIN, **_steps(450), **ITM2},
    "plain_r600_itm50": {**PLAIN, **_steps(600), "instruct_forced_think_share": 0.5},
}

# Generated in this order (RAIN 1+2 first), so that a run stopped early has the rows that matter most.
TA_GRID = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0)
SLERP_TS = (0.5, 0.625, 0.75)
RAIN_GRID = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)
PLAIN_GRID = (2.0, 3.0)

logger = logging.getLogger("benchmarks.organism.sweep")


# ---------------------------------------------------------------------------------------------- build + generate
def make_recipe(overrides: dict[str, Any], quick: bool) -> B.Recipe:
    return replace(B.Recipe(), **{**overrides, **(B.QUICK_STEPS if quick else {})})


def base_dir(out: Path, recipe: B.Recipe) -> Path:
    fields = {k: v for k, v in asdict(recipe).items() if k not in B.FINETUNE_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return out / "_bases" / digest


def train_shared_base(overrides: dict[str, Any], out: str, quick: bool, device: str, given: str | None) -> float:
    """Train the base of a recipe into ``<out>/_bases/<hash of its base fields>`` (phase 1), or copy ``given``."""
    recipe = make_recipe(overrides, quick)
    if given is not None:
        shutil.copytree(given, base_dir(Path(out), recipe), dirs_exist_ok=True)
        return 0.0
    return B.train_base(recipe, B.build_tokenizer(recipe), base_dir(Path(out), recipe), device=device)


def build_recipe(root: Path, overrides: dict[str, Any], quick: bool, device: str) -> dict[str, Any]:
    """Both fine-tunes of one recipe from its shared base, in build.py's layout under ``root``. The data files do
    not depend on the recipe: they are the committed organism's (so no IFEval checker runs on this machine)."""
    recipe = make_recipe(overrides, quick)
    ckpt = root / "checkpoints"
    shutil.copytree(base_dir(root.parent, recipe), ckpt / "base", dirs_exist_ok=True)
    shutil.copytree(B.HERE / "data", root / "data", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("build_report.json"))
    timings = {kind: B.finetune_worker(kind, asdict(recipe), str(ckpt / "base"), str(ckpt / kind), 1,
                                       device=device)["seconds"] for kind in ("reasoning", "instruct")}
    report = {"recipe": asdict(recipe), "timings_s": timings, "device": device}
    (root / "data" / "build_report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def sweep_recipe(name: str, overrides: dict[str, Any], out: str, quick: bool, device: str) -> str:
    """Fine-tune one recipe and write the generations of every swept merge to ``<out>/<name>/sweep.json`` (rewritten
    after each model, so that a run stopped early still leaves what it generated)."""
    import torch

    from rain_hf import RainMergingConfig

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("rain_hf", "transformers", "httpx", "benchmarks.organism"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = Path(out) / name
    start = time.perf_counter()
    report = build_recipe(root, overrides, quick, device)
    logger.info("fine-tuned in %.0fs", time.perf_counter() - start)

    settings = dataclasses.replace(BE.QUICK if quick else BE.FULL, training_check=False, shared_note=False,
                                   batch_size=16 if quick else 120, plot=False)
    bench = BE.Bench(BE.Organism(root), settings, root / "work")
    (root / "work").mkdir(exist_ok=True)
    bench.setup()
    bench.evaluate = GenerateOnly(**{f.name: getattr(bench.evaluate, f.name)
                                     for f in dataclasses.fields(BE.Evaluator)}, device=device)

    def save(complete: bool = False) -> None:
        rows = [{"method": r.method, "family": r.family, "lam": r.lam, "label": label}
                for r, label in zip(bench.rows, bench.evaluate.generations)]
        record = {"name": name, "overrides": overrides, "quick": quick, "build": report, "info": bench.info,
                  "rows": rows, "generations": {r["label"]: bench.evaluate.generations[r["label"]] for r in rows},
                  "wall_s": time.perf_counter() - start, "complete": complete}
        (root / "sweep.json").write_text(json.dumps(record, default=str), encoding="utf-8")

    feats = bench.features_for(RainMergingConfig().positions)
    plain = bench.features_for(RainMergingConfig().positions, bench.stage1_plain_path, "plain samples")
    ins = {"instruction_calibration": str(bench.instruction_path)}
    # (method, family, λ, config, stage-1 features, merge kwargs) in generation order
    plan = [("RAIN stage 1+2", "rain_both", lam, bench.cfg(lam=lam), feats, ins) for lam in RAIN_GRID]
    plan += [("task_arithmetic", "task_arithmetic", lam, RainMergingConfig(method="task_arithmetic", lam=lam),
              None, {}) for lam in TA_GRID]
    plan += [(f"slerp t={t:g}", "slerp", None, RainMergingConfig(method="slerp", slerp_t=t), None, {})
             for t in SLERP_TS]
    plan += [("RAIN stage 1", "rain_stage1", lam, bench.cfg(lam=lam, stage2=False), feats, {}) for lam in RAIN_GRID]
    plan += [("RAIN 1+2 stage 1 on plain samples", "rain_ablations", lam, bench.cfg(lam=lam), plain, ins)
             for lam in PLAIN_GRID]
    bench.references()
    save()
    for i, (method, family, lam, cfg, features, kwargs) in enumerate(plan):
        bench.merge_and_add(method, family, lam, cfg, features, **kwargs)
        save(complete=i == len(plan) - 1)
    logger.info("done in %.0fs", time.perf_counter() - start)
    return name


@dataclasses.dataclass
class GenerateOnly(BE.Evaluator):
    """Generations only (scored later by ``score``): the machine that generates may lack lm-eval."""

    device: str = "cpu"

    def __call__(self, model: Any, label: str, forced: bool = False) -> dict[str, Any]:
        model.to(self.device)
        self.outputs(model, label, forced)
        model.to("cpu")
        nan = float("nan")
        return {"think": nan, "accuracy": nan, "if_prompt": nan, "if_instruction": nan, "l_think": nan,
                "per_instruction": {}}


# ---------------------------------------------------------------------------------------------- scoring
def load_records(path: Path) -> list[dict[str, Any]]:
    """``sweep.json`` records of a sweep folder, of a gzipped bundle written by ``run --bundle``, or one
    ``sweep.json``."""
    if path.is_file():
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
        except gzip.BadGzipFile:
            data = json.loads(path.read_text(encoding="utf-8"))
        return [data] if isinstance(data, dict) else data
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(path.glob("*/sweep.json"))]


def write_bundle(records: list[dict[str, Any]], path: Path) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(records, f)


def score_record(record: dict[str, Any], evals: list[dict]) -> tuple[list[Any], list[tuple[str, bool, str]]]:
    n = len(next(iter(record["generations"].values())))
    evals = evals[:n]
    rows = []
    for meta in record["rows"]:
        metrics = BE.score_generations(evals, record["generations"][meta["label"]])
        rows.append(BE.Row(meta["method"], meta["family"], meta["lam"], l_think=float("nan"), merge_s=None,
                           **metrics))
    info = {**record["info"], "calibration": {**record["info"].get("calibration", {}), "eval_prompts": n}}
    return rows, BE.target_checks(rows, info)


# the merged families of a sweep, in the table's column order
FAMILIES = ("task_arithmetic", "slerp", "rain_stage1", "rain_both", "rain_ablations")


def summary_table(records: list[dict[str, Any]], evals: list[dict]) -> str:
    head = ["recipe", "cos", "‖Δ‖/‖W‖ R / I", "reasoning think/acc/IF", "instruct think/acc/IF",
            "TA best feasible IF", "SLERP", "RAIN s1", "RAIN 1+2", "1+2 plain samples", "targets met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def best(top: Any, ran: bool) -> str:
        if not ran:
            return "–"  # not merged (a run stopped early)
        if top is None:
            return "none"
        at = f"λ {top.lam:g}" if top.lam is not None else top.method.split()[-1]
        return f"{top.if_prompt:.3f} ({at})"

    for rec in records:
        rows, checks = score_record(rec, evals)
        ref = BE.reasoning_row(rows)
        ins = next(r for r in rows if r.method == "instruct model")
        top = BE.best_constrained(rows)
        geo = rec["info"]["geometry"]
        # a record a stopped run left lacks some merges: its checks would not line up with the legend (a record
        # written before the flag: complete when every family has rows)
        complete = rec.get("complete", set(FAMILIES) <= {r.family for r in rows})
        met = "".join("✓" if ok else "✗" for _, ok, _ in checks) if complete else "– (run stopped)"
        families = {r.family for r in rows}
        lines.append("| " + " | ".join([
            rec["name"] + ("" if complete else f" (stopped after {len(rows)} models)"), f"{geo['cosine']:+.3f}",
            f"{geo['relative_norm']['reasoning']:.2%} / {geo['relative_norm']['instruct']:.2%}",
            f"{ref.think:.2f} / {ref.accuracy:.2f} / {ref.if_prompt:.2f}",
            f"{ins.think:.2f} / {ins.accuracy:.2f} / {ins.if_prompt:.2f}",
            *(best(top.get(family), family in families) for family in FAMILIES), met]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build the recipes and generate")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--device", default="cpu", help="where training and generation run (cpu, cuda)")
    run.add_argument("--jobs", type=int, default=2, help="recipes built at the same time (one process each)")
    run.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names of RECIPES")
    run.add_argument("--quick", action="store_true", help="build.py's quick step counts and 16 prompts")
    run.add_argument("--base", type=Path, default=None,
                     help="use this base checkpoint for every recipe instead of training one (fine-tune-only sweeps)")
    run.add_argument("--bundle", type=Path, default=None, help="also write every record into one gzipped file")
    bundle = sub.add_parser("bundle", help="write the records a run has finished into one gzipped file")
    bundle.add_argument("source", type=Path, help="a run's --out folder")
    bundle.add_argument("file", type=Path)
    score = sub.add_parser("score", help="score the generations of a run (needs rain_hf[eval])")
    score.add_argument("source", type=Path, help="a run's --out folder or its --bundle file")
    score.add_argument("--markdown", type=Path, default=None, help="write the table into this file too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if args.command == "run":
        names = [n for n in args.recipes.split(",") if n]
        if not names:
            ap.error(f"--recipes {args.recipes!r} names no recipe; choose from {sorted(RECIPES)}")
        unknown = [n for n in names if n not in RECIPES]
        if unknown:
            ap.error(f"unknown recipe(s) {unknown}; choose from {sorted(RECIPES)}")
        args.out.mkdir(parents=True, exist_ok=True)
        jobs = [(n, RECIPES[n], str(args.out), args.quick, args.device) for n in names]
        given = None if args.base is None else str(args.base)
        bases = {base_dir(args.out, make_recipe(RECIPES[n], args.quick)): (RECIPES[n], str(args.out), args.quick,
                                                                          args.device, given) for n in names}
        start = time.perf_counter()
        # a fresh process per task: each sets its own thread count and its log lines' recipe name
        with mp.get_context("spawn").Pool(max(1, min(args.jobs, len(jobs))), maxtasksperchild=1) as pool:
            pool.starmap(train_shared_base, list(bases.values()), chunksize=1)
            logger.info("%d bases for %d recipes: %.0fs", len(bases), len(jobs), time.perf_counter() - start)
            for done in pool.starmap(sweep_recipe, jobs, chunksize=1):
                logger.info("recipe %s written", done)
        logger.info("sweep of %d recipes: %.0fs", len(jobs), time.perf_counter() - start)
        if args.bundle is not None:
            write_bundle(load_records(args.out), args.bundle)
        return 0
    if args.command == "bundle":
        records = load_records(args.source)
        if not records:
            print(f"No sweep records under {args.source}: give a `sweep run` --out folder.", file=sys.stderr)
            return 2
        write_bundle(records, args.file)
        logger.info("%d records (%s) in %s", len(records), ", ".join(r["name"] for r in records), args.file)
        return 0

    records = load_records(args.source)
    if not records:
        print(f"No sweep records under {args.source}: run `python -m benchmarks.organism.sweep run` first.",
              file=sys.stderr)
        return 2
    # The held-out prompts depend only on build.py's seeds, never on the recipe.
    evals = B.eval_records()
    table = summary_table(records, evals)
    legend = (f"Feasible: think ≥ {BE.THINK_MIN}, accuracy ≥ reasoning model − {BE.ACC_SLACK}; "
              f"{len(next(iter(records[0]['generations'].values())))} held-out prompts, free template. Targets "
              "(in bench.target_checks order): TA phenomenon, RAIN 1+2 ≥ reasoning + 0.6, 1+2 > stage 1, |cos| ≤ 0.2. "
              "\"none\": no feasible row; \"–\": not merged (a run that stopped early: its targets are not scored).")
    print(table)
    print(legend)
    if args.markdown is not None:
        args.markdown.write_text(table + "\n\n" + legend + "\n", encoding="utf-8")
    print(f"wall time per recipe (s; fine-tunes, merges and generation, a shared base's training not counted): { {r['name']: round(r['wall_s']) for r in records} }")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
