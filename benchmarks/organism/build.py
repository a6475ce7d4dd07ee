"""Build the model organism: tokenizer, base / reasoning / instruct Qwen2 checkpoints and their data, on CPU.

    python -m benchmarks.organism.build            # full build into benchmarks/organism/{checkpoints,data}
    python -m benchmarks.organism.build --quick    # pipeline smoke test with tiny step counts (temp folder)
    python -m benchmarks.organism.build --force    # retrain even when the checkpoints exist

Recipe (see BUILD.md): the base is pretrained on every surface form (chat dialogues in which thinking and
instruction following are independent 50/50 choices, arithmetic facts, plain worked problems); the reasoning
model is a short fine-tune that always thinks and ignores format instructions; the instruct model a short
fine-tune that never thinks and follows them. Both fine-tunes start from the base, run in parallel processes
with one thread each, and put the loss on the assistant response only.

``--variant orthogonal`` builds the near-orthogonal variant of BUILD.md instead (base thinks 20 % of the time;
the reasoning fine-tune sees no format instructions), into the folder given with ``--out``. ``--help`` lists every
variant and BUILD.md gives each one's recipe and figures.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.organism import tasks as T

HERE = Path(__file__).resolve().parent

# Seeds (documented in BUILD.md).
SEED_TOKENIZER_CORPUS = 11
SEED_BASE_DATA = 12
SEED_FINETUNE_DATA = 13
SEED_EVAL = 14
SEED_CALIB = 15
SEED_TORCH_INIT = 0
SEED_TORCH_FINETUNE = 1

N_EVAL = 240
N_REASONING_CALIB = 64
N_INSTRUCTION_CALIB = 64
N_PROMPTS_ONLY = 32


@dataclass
class Recipe:
    vocab_size: int = 512
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 768
    max_positions: int = 512
    base_steps: int = 1800
    base_lr: float = 2e-3
    base_warmup: int = 100
    base_weight_decay: float = 0.01
    ft_steps: int = 100  # the instruct fine-tune
    reasoning_ft_steps: int = 100
    ft_lr: float = 5e-5
    ft_warmup: int = 10
    batch_size: int = 32
    base_threads: int = 2
    # base mixture
    p_chat: float = 0.55
    p_facts: float = 0.20  # the rest: plain worked problems
    p_think: float = 0.5
    p_follow: float = 0.5
    n_instructions_probs: tuple = (0.2, 0.4, 0.4)  # prompts with 0 / 1 / 2 format instructions
    # Share of the reasoning fine-tune's prompts whose format instructions are dropped (the problem stays): real
    # reasoning traces rarely carry format instructions, so the reasoning model ignores them mostly by omission.
    reasoning_ft_plain_share: float = 0.0
    # Share of the instruct fine-tune's prompts that end with a forced <think> while the target stays the direct
    # formatted reply ("ITM2" in organism-findings.md): an instruct model that never learned to think.
    instruct_forced_think_share: float = 0.0
    # Added to every data and torch seed (0: the committed organism); the recipe sweep uses it for seed variance.
    seed_offset: int = 0
    eval_max_new_tokens: int = 64
    # How the plain reply opens (tasks.REPLY_STYLES): the committed organism's "In the end, Max has ..." or
    # "Max has ... in the end." (the name first, copied from the prompt).
    reply_style: str = T.DEFAULT_REPLY_STYLE


# Recipe fields that only the fine-tunes read: recipes that differ in these alone share one base.
FINETUNE_FIELDS = {"ft_steps", "reasoning_ft_steps", "ft_lr", "ft_warmup", "reasoning_ft_plain_share",
                   "instruct_forced_think_share", "eval_max_new_tokens"}
QUICK_STEPS = dict(base_steps=30, ft_steps=6, reasoning_ft_steps=6, base_warmup=5, ft_warmup=2)
# Near-orthogonal task vectors (cos -0.08 against -0.53): the base rarely thinks, and the reasoning model ignores
# format instructions by omission (its fine-tune never sees one) instead of being taught to. BUILD.md, "Variant".
VARIANTS = {"orthogonal": dict(p_think=0.2, p_follow=0.5, reasoning_ft_steps=600, reasoning_ft_plain_share=1.0,
                               base_threads=1),
            # The committed base; a reasoning fine-tune without format instructions (300 steps) and an instruct
            # fine-tune with a quarter of its prompts ending in a forced <think> (ITM2). Chosen by sweep.py.
            "plain_r300_itm2": dict(reasoning_ft_steps=300, reasoning_ft_plain_share=1.0,
                               instruct_forced_think_share=0.25)}
# Stage 2 scores query heads; with 6 per layer its head-level part changed nothing (STAGE2.md). These give 12
# heads of width 16 (4 kv heads: the same GQA ratio and the same parameter count) to the two recipes above.
HEADS12 = dict(num_heads=12, num_kv_heads=4)
VARIANTS["heads12"] = dict(HEADS12)
VARIANTS["heads12_plain_r300_itm2"] = {**VARIANTS["plain_r300_itm2"], **HEADS12}
# A base that follows format instructions a quarter of the time (the committed one: half) and a reasoning
# fine-tune without format instructions: round 1 of the sweep (SWEEP.md) met every target line there but + 0.6
# (0.579 at λ 2 on a coarse grid, one-shot projection), and it was never rebuilt on CPU.
VARIANTS["follow25_plain"] = dict(p_follow=0.25, reasoning_ft_plain_share=1.0)
# The committed recipe and follow25_plain with replies that open with the name ("Max has 33 apples in the end.
# ...") instead of the fixed "In the end, ...": the organism of organism-findings.md, whose replies opened with
# the name, reached IF 0.85 with the format kept in the free template, which takes first-token instructions; the
# committed one, whose replies all open alike, transfers none (FIRST_TOKEN.md). Fixed before either was built.
VARIANTS["content_first"] = dict(reply_style="content_first")
VARIANTS["follow25_plain_content_first"] = {**VARIANTS["follow25_plain"], "reply_style": "content_first"}
# follow25_plain with the instruct fine-tune of plain_r300_itm2 (a quarter of its prompts end with a forced
# <think>): organism-findings.md lists this pair (a base that follows a quarter of the time, with ITM2) as not
# tried. Fixed, with its bench grid (follow25_plain's), before it was built.
VARIANTS["follow25_plain_itm2"] = {**VARIANTS["follow25_plain"], "instruct_forced_think_share": 0.25}
# plain_r300_itm2 (the closest organism: it misses only "stage 1 + 2 > stage 1") on the content_first base, whose
# name-first replies let the lowercase instruction transfer on the committed recipe. Fixed with its grid
# (plain_r300_itm2's) before it was built.
VARIANTS["content_first_plain_r300_itm2"] = {**VARIANTS["plain_r300_itm2"], "reply_style": "content_first"}


# --------------------------------------------------------------------------------------------------------------
# Text generation
# --------------------------------------------------------------------------------------------------------------


def n_instructions(rng: random.Random, probs) -> int:
    return rng.choices(range(len(probs)), weights=probs)[0]


def assistant_text(problem: T.Problem, instructions, think: bool, follow: bool,
                   style: str = T.DEFAULT_REPLY_STYLE) -> str:
    reply = T.formatted_reply(problem, instructions, style).text if follow else problem.plain_reply(style)
    if think:
        return f"{T.THINK_OPEN}{problem.reasoning()}{T.THINK_CLOSE}{reply}"
    return reply


def facts_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 8)):
        a, b = rng.randint(2, 54), rng.randint(2, 9)
        if rng.random() < 0.5:
            lines.append(f"{a} + {b} = {a + b}.")
        else:
            a = max(a, b)
            lines.append(f"{a} - {b} = {a - b}.")
    return " ".join(lines)


def worked_doc(problem: T.Problem, style: str = T.DEFAULT_REPLY_STYLE) -> str:
    return f"{problem.text()} {problem.reasoning()} {problem.plain_reply(style)}"


def base_documents(n: int, recipe: Recipe, seed: int = SEED_BASE_DATA) -> list[str]:
    """Pretraining documents (full text incl. chat special tokens, each ending with the end token)."""
    rng = random.Random(seed + recipe.seed_offset)
    docs = []
    for _ in range(n):
        r = rng.random()
        if r < recipe.p_chat:
            p = T.sample_problem(rng, "train")
            ins = T.sample_instructions(rng, n_instructions(rng, recipe.n_instructions_probs))
            think = rng.random() < recipe.p_think
            follow = rng.random() < recipe.p_follow
            reply = assistant_text(p, ins, think, follow, recipe.reply_style)
            docs.append(T.render_chat(T.make_prompt(p, ins), reply))
        elif r < recipe.p_chat + recipe.p_facts:
            docs.append(facts_doc(rng) + T.END)
        else:
            docs.append(worked_doc(T.sample_problem(rng, "train"), recipe.reply_style) + T.END)
    return docs


def finetune_steps(kind: str, recipe: Recipe) -> int:
    return recipe.reasoning_ft_steps if kind == "reasoning" else recipe.ft_steps


def finetune_pairs(kind: str, n: int, recipe: Recipe, seed: int = SEED_FINETUNE_DATA) -> list[tuple[str, str]]:
    """(rendered generation prompt, assistant text) pairs; both fine-tunes see the same problems in the same order."""
    seed += recipe.seed_offset
    rng = random.Random(seed)
    side_rng = random.Random(seed + 1)  # its own stream, so that both fine-tunes keep the same problems
    pairs = []
    for _ in range(n):
        p = T.sample_problem(rng, "train")
        ins = T.sample_instructions(rng, n_instructions(rng, recipe.n_instructions_probs))
        forced_open = ""  # ITM2: the generation prompt ends with <think>, the target stays the direct reply
        if kind == "reasoning":
            if side_rng.random() < recipe.reasoning_ft_plain_share:
                ins = []
            target = assistant_text(p, ins, think=True, follow=False, style=recipe.reply_style)
        elif kind == "instruct":
            if side_rng.random() < recipe.instruct_forced_think_share:
                forced_open = T.THINK_OPEN
            target = assistant_text(p, ins, think=False, follow=True, style=recipe.reply_style)
        else:
            raise ValueError(kind)
        pairs.append((T.render_chat(T.make_prompt(p, ins)) + forced_open, target + T.END))
    return pairs


def tokenizer_corpus(n: int = 6000, seed: int = SEED_TOKENIZER_CORPUS,
                     style: str = T.DEFAULT_REPLY_STYLE) -> list[str]:
    """Plain text (no special tokens) covering every surface form, from the training pool only."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = T.sample_problem(rng, "train")
        ins = T.sample_instructions(rng, rng.choice([0, 1, 2]))
        out.append(T.make_prompt(p, ins))
        out.append(p.reasoning())
        out.append(T.formatted_reply(p, ins, style).text)
        out.append(p.plain_reply(style))
        out.append(facts_doc(rng))
    return out


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------------------------


def build_tokenizer(recipe: Recipe):
    """Train the byte-level BPE and wrap it as the ``Qwen2Tokenizer`` that transformers loads for it.

    transformers 5 always loads a ``model_type: qwen2`` checkpoint's tokenizer as ``Qwen2Tokenizer``, which keeps
    the vocabulary and merges of ``tokenizer.json`` but applies Qwen2's own normaliser and pre-tokenisation
    regex (also one token per digit). The merges are learned with digit-splitting byte-level pre-tokenisation and
    then wrapped in ``Qwen2Tokenizer`` directly, so the tokenizer used for training, the saved one and the loaded
    one are the same object; the build asserts that both pre-tokenisations give identical ids on the corpus.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    raw = Tokenizer(models.BPE())
    # One token per digit: digits are split off individually before the byte-level split.
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    raw.decoder = decoders.ByteLevel()
    control = [T.PAD, T.USER, T.ASSISTANT, T.END]
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size - 2,
        special_tokens=control,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    corpus = tokenizer_corpus(style=recipe.reply_style)
    raw.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,  # the class default "<|endoftext|>" would add a 513th token
        bos_token=None,
        eos_token=T.END,
        pad_token=T.PAD,
        extra_special_tokens=[T.USER, T.ASSISTANT],
        chat_template=T.CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=recipe.max_positions,
        clean_up_tokenization_spaces=False,
    )
    # Think tags are added tokens but not "special" (like real reasoning models): decode keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (T.THINK_OPEN, T.THINK_CLOSE)])
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in (T.THINK_OPEN, T.THINK_CLOSE)])
    assert len(tok) == recipe.vocab_size, len(tok)
    same = [a.ids == b for a, b in zip(raw.encode_batch(corpus), tok(corpus, add_special_tokens=False)["input_ids"])]
    assert all(same), f"{same.count(False)} corpus texts tokenise differently under Qwen2's pre-tokenizer"
    check_tokenizer(tok, recipe)
    return tok


def check_tokenizer(tok, recipe: Recipe) -> None:
    assert len(tok) == recipe.vocab_size and tok.unk_token is None, (len(tok), tok.unk_token)
    assert tok.eos_token == T.END and tok.pad_token == T.PAD, (tok.eos_token, tok.pad_token)
    for t in T.SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, (t, ids)
    for d in "0123456789":
        assert len(tok.encode(f"x {d}{d}{d}", add_special_tokens=False)) >= 3
    ids = tok.encode("45 - 6 = 39.", add_special_tokens=False)
    digits = [i for i in ids if tok.decode([i]).strip().isdigit()]
    assert all(len(tok.decode([i]).strip()) == 1 for i in digits), "digits must be single tokens"
    msgs = [{"role": "user", "content": "Hi"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == T.render_chat("Hi"), text
    assert tok.decode(ids) == text, tok.decode(ids)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "<think>a</think>b"}], tokenize=False)
    assert full == T.render_chat("Hi", "<think>a</think>b"), full
    assert tok.decode(tok.encode(full, add_special_tokens=False), skip_special_tokens=True).startswith("Hi<think>")


def make_model(recipe: Recipe, tok):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    end_id = tok.convert_tokens_to_ids(T.END)
    pad_id = tok.convert_tokens_to_ids(T.PAD)
    config = Qwen2Config(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=end_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(SEED_TORCH_INIT + recipe.seed_offset)
    model = Qwen2ForCausalLM(config)
    model.generation_config = generation_config(tok)
    assert isinstance(model.generation_config, GenerationConfig)
    return model


def generation_config(tok):
    from transformers import GenerationConfig

    return GenerationConfig(
        eos_token_id=tok.convert_tokens_to_ids(T.END),
        pad_token_id=tok.convert_tokens_to_ids(T.PAD),
        bos_token_id=None,
        do_sample=False,
        max_new_tokens=128,
    )


def save_tokenizer_files(tok, path: Path) -> None:
    """Tokenizer files and generation_config of a checkpoint folder (the weights are left alone)."""
    tok.save_pretrained(path)
    generation_config(tok).save_pretrained(path)


def save_checkpoint(model, tok, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype=__import__("torch").float32)
    model.generation_config = generation_config(tok)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, warmup: int, peak: float, final_ratio: float = 0.0) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def collate(seqs: list[list[int]], loss_from: list[int], pad_id: int):
    """Right-padded batch; labels are -100 before ``loss_from[i]`` and on padding."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, loss_from)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, start : len(s)] = torch.tensor(s[start:])
    return ids, mask, labels


def train(model, seqs, loss_from, *, steps, batch_size, lr, warmup, weight_decay, pad_id, log_every, tag,
          final_ratio=0.0, micro_batch=8, stop_after=None):
    """Train ``model`` for ``steps`` optimiser steps on the learning-rate schedule of ``steps`` (``stop_after``:
    run only the first that many of them, on the same schedule)."""
    import torch

    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )
    device = next(model.parameters()).device
    if device.type != "cpu":  # padding is cheap there; one micro-batch per step saves kernel launches
        micro_batch = batch_size
    t0 = time.time()
    running = 0.0
    for step in range(steps if stop_after is None else min(steps, stop_after)):
        lo = step * batch_size
        # One optimiser step per batch of `batch_size` sequences (token-mean loss over the whole batch); the
        # batch is run as length-sorted micro-batches only to avoid computing on padding.
        order = sorted(range(lo, min(lo + batch_size, len(seqs))), key=lambda i: len(seqs[i]))
        micro = [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
        counts = [sum(max(0, len(seqs[i]) - max(loss_from[i], 1)) for i in m) for m in micro]
        total = sum(counts)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, warmup, lr, final_ratio)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for m, count in zip(micro, counts):
            if count == 0:
                continue
            ids, mask, labels = collate([seqs[i] for i in m], [loss_from[i] for i in m], pad_id)
            assert int((labels[:, 1:] != -100).sum()) == count
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         labels=labels.to(device)).loss * (count / total)
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += step_loss
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"[{tag}] step {step + 1}/{steps} loss {running / ((step % log_every) + 1):.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s", flush=True)
            running = 0.0
    model.eval()
    return time.time() - t0


def pretrain_base(recipe: Recipe, tok, device: str = "cpu", stop_after: int | None = None):
    """The base model pretrained on the recipe's mixture, in memory, and the seconds its training took
    (``stop_after``: only the first that many steps of the recipe's run)."""
    import torch

    torch.set_num_threads(recipe.base_threads)
    model = make_model(recipe, tok).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[base] Qwen2ForCausalLM with {n_params / 1e6:.2f} M parameters", flush=True)
    steps = recipe.base_steps if stop_after is None else min(recipe.base_steps, stop_after)
    docs = base_documents(steps * recipe.batch_size, recipe)  # a prefix of the full run's documents
    seqs = tok(docs, add_special_tokens=False)["input_ids"]
    print(f"[base] {len(docs)} documents, mean {sum(map(len, seqs)) / len(seqs):.1f} tokens, "
          f"max {max(map(len, seqs))}", flush=True)
    secs = train(model, seqs, [0] * len(seqs), steps=recipe.base_steps, batch_size=recipe.batch_size,
                 lr=recipe.base_lr, warmup=recipe.base_warmup, weight_decay=recipe.base_weight_decay,
                 pad_id=tok.pad_token_id, log_every=50, tag="base", final_ratio=0.05, stop_after=stop_after)
    return model, secs


def train_base(recipe: Recipe, tok, out: Path, device: str = "cpu") -> float:
    model, secs = pretrain_base(recipe, tok, device)
    save_checkpoint(model.to("cpu"), tok, out)
    return secs


def finetune_worker(kind: str, recipe_dict: dict, base_dir: str, out_dir: str, threads: int,
                    device: str = "cpu") -> dict:
    """Fine-tune the base into the reasoning or instruct model (runs in its own process)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    torch.set_num_threads(threads)
    recipe = Recipe(**recipe_dict)
    torch.manual_seed(SEED_TORCH_FINETUNE + recipe.seed_offset)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    steps = finetune_steps(kind, recipe)
    pairs = finetune_pairs(kind, steps * recipe.batch_size, recipe)
    prompt_ids = tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    full_ids = tok([p + a for p, a in pairs], add_special_tokens=False)["input_ids"]
    for pi, fi in zip(prompt_ids[:64], full_ids[:64]):
        assert fi[: len(pi)] == pi, "prompt tokens must be a prefix of the full sample"
    secs = train(model, full_ids, [len(p) for p in prompt_ids], steps=steps,
                 batch_size=recipe.batch_size, lr=recipe.ft_lr, warmup=recipe.ft_warmup, weight_decay=0.0,
                 pad_id=tok.pad_token_id, log_every=10, tag=kind)
    save_checkpoint(model.to("cpu"), tok, Path(out_dir))
    return {"kind": kind, "seconds": secs}


# --------------------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------------------


def _distinct_problems(rng: random.Random, split: str, n: int, seen: set) -> list[T.Problem]:
    out = []
    while len(out) < n:
        p = T.sample_problem(rng, split)
        if p.canonical not in seen:
            seen.add(p.canonical)
            out.append(p)
    return out


def eval_records(n: int = N_EVAL, seed: int = SEED_EVAL, style: str = T.DEFAULT_REPLY_STYLE) -> list[dict]:
    rng = random.Random(seed)
    problems = _distinct_problems(rng, "eval", n, set())
    recs = []
    for i, p in enumerate(problems):
        ins = T.sample_instructions(rng, 1 if i % 2 == 0 else 2)
        recs.append({
            "key": i,
            "prompt": T.make_prompt(p, ins),
            "instruction_id_list": [x.id for x in ins],
            "kwargs": [dict(x.kwargs) for x in ins],
            "answer": p.answer,
            "reasoning": p.reasoning(),
            "target_response": T.formatted_reply(p, ins, style).text,
            "plain_response": p.plain_reply(style),
        })
    return recs


def _span_record(ins: T.Instruction, reply: T.Reply) -> dict:
    whole = {"change_case:english_capital", "change_case:english_lowercase", "startend:quotation",
             "length_constraints:number_words"}
    if ins.id in whole:
        resp, unrelated = [reply.text], []
    elif ins.id == "punctuation:no_comma":
        resp, unrelated = [reply.core], []
    else:
        resp, unrelated = [reply.parts[ins.id]], [reply.core]
    return {
        "instruction_id": ins.id,
        "kwargs": dict(ins.kwargs),
        "normalized": {"type": ins.id.split(":", 1)[1], "args": dict(ins.kwargs)},
        "prompt_spans": [ins.sentence()],
        "response_spans": resp,
        "negative_response_spans": [],
        "unrelated_response_spans": unrelated,
    }


def calibration_records(seed: int = SEED_CALIB, style: str = T.DEFAULT_REPLY_STYLE):
    """Reasoning calibration (paper's JSON list), instruction calibration (paper's JSONL), prompts-only."""
    rng = random.Random(seed)
    seen: set = set()
    reasoning = []
    for i, p in enumerate(_distinct_problems(rng, "calib", N_REASONING_CALIB, seen)):
        # Half plain problems, half with format instructions that the reasoning model ignores.
        ins = [] if i % 2 == 0 else T.sample_instructions(rng, 1 + (i // 2) % 2)
        reasoning.append({
            "prompt": T.make_prompt(p, ins),
            "reasoning": p.reasoning(),
            "response": p.plain_reply(style),
            "source": "organism/arith" if not ins else "organism/arith+format",
            "sample_id": f"organism_{i:04d}",
        })
    instruction = []
    for i, p in enumerate(_distinct_problems(rng, "calib", N_INSTRUCTION_CALIB, seen)):
        ins = T.sample_instructions(rng, 1 + i % 2)
        reply = T.formatted_reply(p, ins, style)
        prompt = T.make_prompt(p, ins)
        related = [_span_record(x, reply) for x in ins]
        core_free = all(r["unrelated_response_spans"] for r in related)
        verdict = T.check_instructions(reply.text, [x.id for x in ins], [x.kwargs for x in ins])
        rec = {
            "id": 1 + i,
            "prompt": prompt,
            "reason": p.reasoning(),
            "response": reply.text,
            "instruction_id_list": [x.id for x in ins],
            "kwargs": [dict(x.kwargs) for x in ins],
            "instruction_list": [x.sentence() for x in ins],
            "related_prompt_list": related,
            "unrelated_response_spans": [reply.core] if core_free else [],
            "verdict": {x.id: v for x, v in zip(ins, verdict)},
            "meta": {"source": "rain_hf organism", "answer": p.answer, "split": "calib"},
        }
        for r in related:
            assert all(s in prompt for s in r["prompt_spans"]), r
            assert all(s in reply.text for s in r["response_spans"] + r["unrelated_response_spans"]), r
        instruction.append(rec)
    prompts_only = []
    for i, p in enumerate(_distinct_problems(rng, "calib", N_PROMPTS_ONLY, seen)):
        ins = T.sample_instructions(rng, 1 + i % 2)
        prompts_only.append({
            "prompt": T.make_prompt(p, ins),
            "instruction_id_list": [x.id for x in ins],
            "kwargs": [dict(x.kwargs) for x in ins],
            "answer": p.answer,
        })
    return reasoning, instruction, prompts_only


def verify_targets(records: list[dict]) -> None:
    """Every followed target passes the real IFEval checkers; every plain (ignoring) reply fails each of them."""
    for r in records:
        ids, kw = r["instruction_id_list"], r["kwargs"]
        assert all(T.check_instructions(r["target_response"], ids, kw)), r
        assert not any(T.check_instructions(r["plain_response"], ids, kw)), r
        assert T.extract_answer(r["target_response"]) == r["answer"] == T.extract_answer(r["plain_response"])


def write_data(data_dir: Path, tok, style: str = T.DEFAULT_REPLY_STYLE) -> dict:
    data_dir.mkdir(parents=True, exist_ok=True)
    evals = eval_records(style=style)
    verify_targets(evals)
    reasoning, instruction, prompts_only = calibration_records(style=style)
    for r in reasoning:
        full = T.render_chat(r["prompt"]) + T.THINK_OPEN + r["reasoning"] + T.THINK_CLOSE + r["response"]
        r["num_tokens"] = len(tok.encode(full, add_special_tokens=False))
    with open(data_dir / "eval_prompts.jsonl", "w") as f:
        for r in evals:
            f.write(json.dumps({k: r[k] for k in ("key", "prompt", "instruction_id_list", "kwargs", "answer")}) + "\n")
    with open(data_dir / "reasoning_calibration.json", "w") as f:
        json.dump(reasoning, f, indent=1)
    with open(data_dir / "instruction_calibration.jsonl", "w") as f:
        for r in instruction:
            f.write(json.dumps(r) + "\n")
    with open(data_dir / "prompts_only.jsonl", "w") as f:
        for r in prompts_only:
            f.write(json.dumps(r) + "\n")
    # Disjointness by construction (problem-level hash split), asserted here once more on the prompts.
    eval_prompts = {r["prompt"] for r in evals}
    calib_prompts = {r["prompt"] for r in reasoning} | {r["prompt"] for r in instruction} | {
        r["prompt"] for r in prompts_only}
    assert not eval_prompts & calib_prompts
    return {"eval": evals}


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------


def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 48, raw: bool = False):
    import torch

    outs = []
    tok.padding_side = "left"
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        texts = chunk if raw else [T.render_chat(p) for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:]:
            outs.append(tok.decode(row, skip_special_tokens=False).split(T.END)[0].replace(T.PAD, ""))
    return outs


def evaluate_model(model, tok, evals: list[dict], max_new_tokens: int) -> tuple[dict, list[str]]:
    gens = generate(model, tok, [r["prompt"] for r in evals], max_new_tokens)
    scores = [T.score_generation(g, r["answer"], r["instruction_id_list"], r["kwargs"]) for g, r in zip(gens, evals)]
    n = len(scores)
    inst = [x for s in scores for x in s["if_instruction"]]
    return {
        "think": sum(s["think_ok"] for s in scores) / n,
        "accuracy": sum(s["correct"] for s in scores) / n,
        "if_prompt_strict": sum(s["if_prompt"] for s in scores) / n,
        "if_instruction_strict": sum(inst) / max(1, len(inst)),
        "n": n,
    }, gens


def plain_arithmetic(model, tok, n: int = 100) -> float:
    rng = random.Random(SEED_EVAL + 1)
    problems = [T.sample_problem(rng, "eval") for _ in range(n)]
    gens = generate(model, tok, [p.text() + " " for p in problems], 48, raw=True)
    return sum(T.extract_answer(g) == p.answer for g, p in zip(gens, problems)) / n


def linear_weight_names(model) -> list[str]:
    import torch

    names = []
    for mod_name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            names.append(f"model.layers.{mod_name}.weight")
    return names


def task_vector_stats(base, reasoning, instruct) -> dict:
    import torch

    sb, sr, si = base.state_dict(), reasoning.state_dict(), instruct.state_dict()
    lin = linear_weight_names(base)

    def rel(sd, keys):
        num = math.sqrt(sum(float((sd[k] - sb[k]).pow(2).sum()) for k in keys))
        den = math.sqrt(sum(float(sb[k].pow(2).sum()) for k in keys))
        return num / den

    dr = torch.cat([(sr[k] - sb[k]).flatten() for k in lin])
    di = torch.cat([(si[k] - sb[k]).flatten() for k in lin])
    per_type = {}
    for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        keys = [k for k in lin if f".{t}." in k]
        a = torch.cat([(sr[k] - sb[k]).flatten() for k in keys])
        b = torch.cat([(si[k] - sb[k]).flatten() for k in keys])
        per_type[t] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return {
        "reasoning_rel_delta_all": rel(sr, list(sb)),
        "instruct_rel_delta_all": rel(si, list(sb)),
        "reasoning_rel_delta_linear": rel(sr, lin),
        "instruct_rel_delta_linear": rel(si, lin),
        "cosine_linear": float(torch.nn.functional.cosine_similarity(dr, di, dim=0)),
        "cosine_per_module_type": per_type,
        "n_linear_modules": len(lin),
    }


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/organism)")
    ap.add_argument("--quick", action="store_true", help="tiny step counts into a temp folder, retrained each time (smoke test)")
    ap.add_argument("--force", action="store_true", help="retrain even when checkpoints exist")
    ap.add_argument("--force-finetunes", action="store_true", help="retrain the two fine-tunes only")
    ap.add_argument("--sequential", action="store_true", help="run the two fine-tunes one after the other")
    ap.add_argument("--skip-checks", action="store_true", help="do not generate / evaluate after building")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default=None,
                    help="build a variant recipe (BUILD.md); needs --out, the committed organism stays as it is")
    args = ap.parse_args(argv)
    if args.variant and args.out is None:
        ap.error("--variant needs --out DIR: the committed checkpoints are the default recipe's")

    recipe = replace(Recipe(), **{**VARIANTS.get(args.variant, {}), **(QUICK_STEPS if args.quick else {})})
    out = args.out or (Path(tempfile.gettempdir()) / "organism_quick" if args.quick else HERE)
    if args.quick and args.out is None:
        args.force = True  # a smoke test of the training code must train, not reuse an earlier smoke test's weights
    ckpt, data_dir = out / "checkpoints", out / "data"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The build machine is shared: busy-waiting OpenMP threads slow everyone down (set before torch loads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(0)
    torch.set_num_threads(recipe.base_threads)

    t_start = time.time()
    report: dict = {"recipe": asdict(recipe), "seeds": {
        "tokenizer_corpus": SEED_TOKENIZER_CORPUS, "base_data": SEED_BASE_DATA,
        "finetune_data": SEED_FINETUNE_DATA, "eval": SEED_EVAL, "calibration": SEED_CALIB,
        "torch_init": SEED_TORCH_INIT, "torch_finetune": SEED_TORCH_FINETUNE}, "timings_s": {}}
    base_dir = ckpt / "base"
    have = lambda d: (d / "model.safetensors").exists()  # noqa: E731
    t0 = time.time()
    tok = build_tokenizer(recipe)  # deterministic and cheap: always rebuilt, and rewritten into reused checkpoints
    report["timings_s"]["tokenizer"] = time.time() - t0
    print(f"[tokenizer] {len(tok)} tokens, {report['timings_s']['tokenizer']:.1f}s", flush=True)
    if args.force_finetunes and not args.force and not have(base_dir):
        own_base = sorted(set(VARIANTS.get(args.variant, {})) - FINETUNE_FIELDS)
        source = (f"a base built with this variant's recipe (it changes {', '.join(own_base)}, which the base reads)"
                  if own_base else f"the committed one (mkdir -p {ckpt} && cp -r benchmarks/organism/checkpoints/base "
                  f"{ckpt}/)")
        raise SystemExit(f"--force-finetunes retrains the fine-tunes from the base at {base_dir}, and there is none: "
                         f"copy {source} there first, or drop --force-finetunes to train a new base.")
    if have(base_dir) and not args.force:
        print(f"[base] exists at {base_dir}, reusing (use --force to retrain)", flush=True)
        save_tokenizer_files(tok, base_dir)
    else:
        report["timings_s"]["base"] = train_base(recipe, tok, base_dir)
        for kind in ("reasoning", "instruct"):  # a new base invalidates the fine-tunes
            if have(ckpt / kind):
                (ckpt / kind / "model.safetensors").unlink()

    t0 = time.time()
    written = write_data(data_dir, tok, recipe.reply_style)
    report["timings_s"]["data"] = time.time() - t0
    print(f"[data] written to {data_dir} ({report['timings_s']['data']:.1f}s)", flush=True)

    todo = [k for k in ("reasoning", "instruct") if args.force or args.force_finetunes or not have(ckpt / k)]
    if todo:
        t0 = time.time()
        # one thread each, also when only one is retrained: the thread count changes the bits on some CPUs
        jobs = [(k, asdict(recipe), str(base_dir), str(ckpt / k), 1) for k in todo]
        if args.sequential or len(todo) == 1:
            results = [finetune_worker(*j) for j in jobs]
        else:
            with mp.get_context("spawn").Pool(len(jobs)) as pool:
                results = pool.starmap(finetune_worker, jobs)
                # Leaving the block terminates the workers, which skips their exit handlers, so a semaphore
                # made in one (tqdm's lock) is reported as leaked: let them exit first (bench.py does the same).
                pool.close()
                pool.join()
        for r in results:
            report["timings_s"][r["kind"]] = r["seconds"]
        report["timings_s"]["finetunes_wall"] = time.time() - t0
    for kind in ("reasoning", "instruct"):
        if kind not in todo:
            print(f"[{kind}] exists, reusing (use --force or --force-finetunes to retrain)", flush=True)
            save_tokenizer_files(tok, ckpt / kind)
    for kind in ("base", "reasoning", "instruct"):  # what users get from AutoTokenizer is what was trained with
        loaded = AutoTokenizer.from_pretrained(ckpt / kind)
        check_tokenizer(loaded, recipe)
        sample = [T.render_chat(r["prompt"], r["target_response"]) for r in written["eval"]]
        assert loaded(sample, add_special_tokens=False)["input_ids"] == tok(sample, add_special_tokens=False)[
            "input_ids"], kind
    if "base" in report["timings_s"] or todo:
        report["timings_s"]["build_total"] = time.time() - t_start

    if not args.skip_checks:
        torch.set_num_threads(recipe.base_threads)
        t0 = time.time()
        models = {k: Qwen2ForCausalLM.from_pretrained(ckpt / k, dtype=torch.float32).eval()
                  for k in ("base", "reasoning", "instruct")}
        evals = written["eval"]
        report["metrics"] = {}
        report["samples"] = {}
        for k, m in models.items():
            metrics, gens = evaluate_model(m, tok, evals, recipe.eval_max_new_tokens)
            report["metrics"][k] = metrics
            report["samples"][k] = [{"prompt": evals[i]["prompt"], "generation": gens[i]} for i in range(3)]
            print(f"[check] {k:9s} think {metrics['think']:.3f}  accuracy {metrics['accuracy']:.3f}  "
                  f"IF prompt strict {metrics['if_prompt_strict']:.3f}  "
                  f"IF instruction strict {metrics['if_instruction_strict']:.3f}", flush=True)
            print(f"          e.g. {gens[0]!r}", flush=True)
        report["metrics"]["base"]["plain_text_arithmetic"] = plain_arithmetic(models["base"], tok)
        print(f"[check] base plain-text arithmetic {report['metrics']['base']['plain_text_arithmetic']:.3f}")
        tv = task_vector_stats(models["base"], models["reasoning"], models["instruct"])
        report["task_vectors"] = tv
        print(f"[check] ||delta||/||W||  reasoning {tv['reasoning_rel_delta_all']:.4f} "
              f"(linear {tv['reasoning_rel_delta_linear']:.4f})  instruct {tv['instruct_rel_delta_all']:.4f} "
              f"(linear {tv['instruct_rel_delta_linear']:.4f})", flush=True)
        print(f"[check] cosine(reasoning delta, instruct delta) over {tv['n_linear_modules']} linear modules: "
              f"{tv['cosine_linear']:.3f}  per type {json.dumps({k: round(v, 3) for k, v in tv['cosine_per_module_type'].items()})}",
              flush=True)
        report["timings_s"]["checks"] = time.time() - t0
    report["sizes_bytes"] = {
        str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).parts[0] in ("checkpoints", "data") and p.name != "build_report.json"
    }
    previous = data_dir / "build_report.json"
    if previous.exists():  # keep the training timings of a build whose checkpoints were reused
        old_timings = json.loads(previous.read_text()).get("timings_s", {})
        report["timings_s"] = {**old_timings, **report["timings_s"]}
    with open(data_dir / "build_report.json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"[done] {time.time() - t_start:.0f}s; report at {data_dir / 'build_report.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
