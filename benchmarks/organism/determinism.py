"""Will this machine rebuild the committed organism bit for bit? The base's first 40 pretraining steps, hashed.

    python -m benchmarks.organism.determinism                      # ≈35 s on 2 cores
    ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.organism.determinism
    python -m benchmarks.organism.determinism --compare benchmarks/organism/traces/intel-xeon-family6-model207.json

The organism's weights are a function of its seeds and of the floating-point kernels torch picks on the machine:
MKL's code path, the vector width of ATen's own kernels (``torch.backends.cpu.get_cpu_capability()``) and, on the
Intel Xeon measured, the thread count change the last bits of a training step, and 1800 steps turn those bits into
another base (BUILD.md, "Seeds and determinism"). This script runs the first ``--steps`` steps of the committed
base's pretraining in memory and prints a fingerprint of the weights, and what a full build gave on machines with
that fingerprint: the committed checkpoints (the AMD machines with AVX-512 so far) or another organism (the Intel
machines so far; AMD machines without AVX-512 another again), whose target lines differ (ANALYSIS.md). The full
build, ``python -m benchmarks.organism.build``, takes ≈20 min to tell.

``--trace OUT.json`` hashes what the first step computes, module by module, and ``--compare TRACE.json`` names the
first hash where this machine and the one that wrote TRACE.json part: the kernel to look at. ``traces/`` holds the
traces of machines whose full build was run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import platform
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

# Set before torch loads (see build.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks.organism import build as B  # noqa: E402

DEFAULT_STEPS = 40
# DEFAULT_STEPS steps on an AMD EPYC (CPU family 25, model 17; ATen capability AVX512, no kernel variable set; the
# same on 1 and 2 threads) whose full build gave the committed checkpoints' sha256 (BUILD.md).
REFERENCE = "bb3c74c736da06a1"
# Fingerprints (DEFAULT_STEPS steps, the build's thread count, no kernel variable set) of machines whose full build
# was run, and the sha256 prefixes of the base, reasoning and instruct model.safetensors it gave (BUILD.md).
KNOWN_BUILDS = {
    REFERENCE: ("an AMD EPYC (CPU family 25, model 17)", True,
                "base c25b22689e6ab464, reasoning e10108935f7220c9, instruct 635f26ee68499e3f"),
    "dd7a4f68fb6ce835": ("an Intel Xeon (CPU family 6, model 207)", False,
                         "base a8a03c15615db369, reasoning a5775d4d314e89f0, instruct f843a6d725c2b3e0; an earlier "
                         "Intel Xeon gave the same"),
    # ATen's kernels at AVX2 width: forced on the AVX-512 EPYC above, and the only width of a Zen 3 EPYC
    "52755888e1c7f218": ("an AMD EPYC without AVX-512 (CPU family 25, model 1; ATen capability AVX2) and the AMD EPYC "
                         "(25, 17) run with ATEN_CPU_CAPABILITY=avx2", False,
                         "base 6241ef8c40a007d2, reasoning a9c3f3c5e4a277a3, instruct 919c4dacfd9e572b"),
}

# Environment variables that select the kernels (read once, when torch loads), printed with the result.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(model: torch.nn.Module) -> str:
    """First 16 hex digits of a sha256 over every tensor of ``model``'s state dict (name, dtype, shape, bytes),
    in name order: the same weights give the same digits whatever file format or metadata they are saved with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()[:16]


def tensors_digest(value) -> str | None:
    """16 hex digits over the tensors in ``value`` (a tensor, or a tuple / list / dict / model output holding
    some), or None where it holds none."""
    if isinstance(value, torch.Tensor):
        found = [value]
    elif isinstance(value, dict):  # transformers' ModelOutput is a dict
        found = [v for v in value.values() if isinstance(v, torch.Tensor)]
    elif isinstance(value, (tuple, list)):
        found = [v for v in value if isinstance(v, torch.Tensor)]
    else:
        found = []
    if not found:
        return None
    digest = hashlib.sha256()
    for i, tensor in enumerate(found):
        _hash_tensor(digest, str(i), tensor)
    return digest.hexdigest()[:16]


def step_trace(threads: int) -> dict[str, str]:
    """What the committed base's first pretraining step computes, hashed in the order it is computed: the inputs
    and output of every module in the first micro-batch's forward pass, the gradient reaching every module's output
    in its backward pass, then every parameter's gradient and value after the step. Two machines' traces first
    differ at the kernel that gives them other bits (``first_difference``)."""
    from torch.nn.modules import module as nn_module

    names: dict[int, str] = {}
    entries: dict[str, str] = {}
    calling: list[str] = []  # names of the modules whose forward is running, outermost first
    state = {"top_calls": 0}

    def name_of(mod: torch.nn.Module) -> str:
        if id(mod) in names:
            return names[id(mod)]
        # modules made on the fly (transformers wraps some functions, e.g. the rotary embedding, as modules)
        return f"{calling[-1] if calling else ''}/{type(mod).__name__}"

    def recording() -> bool:
        return state["top_calls"] == 1  # the first micro-batch: its forward and its backward

    def pre_hook(mod, args):
        if type(mod).__name__.endswith("ForCausalLM"):
            state["top_calls"] += 1
            if not names:  # name the modules the way state_dict does
                names.update({id(m): n or "model" for n, m in mod.named_modules()})
        calling.append(name_of(mod))

    def forward_hook(mod, args, output):
        name = calling.pop()
        if not recording():
            return
        for tag, value in (("in", args), ("out", output)):
            digits = tensors_digest(value)
            if digits is not None:
                entries[f"forward {len(entries):04d} {name} {tag}"] = digits
        if isinstance(output, torch.Tensor) and output.requires_grad:
            # the gradient arriving at this output, computed by the backward of whatever consumed it
            output.register_hook(lambda grad: entries.__setitem__(
                f"backward {len(entries):04d} {name} grad", tensors_digest(grad)))

    handles = [nn_module.register_module_forward_pre_hook(pre_hook),
               nn_module.register_module_forward_hook(forward_hook)]
    try:
        model, _ = pretrain_first_steps(1, threads)
    finally:
        for handle in handles:
            handle.remove()
    for name, param in model.named_parameters():
        entries[f"gradient {name}"] = tensors_digest(param.grad)
    for name, param in model.named_parameters():
        entries[f"weight {name}"] = tensors_digest(param)
    return entries


def first_difference(ours: dict[str, str], theirs: dict[str, str]) -> tuple[str | None, int]:
    """The first entry of ``ours`` (in computation order) whose hash ``theirs`` does not share, and how many entries
    differ in all; an entry one trace lacks counts as different."""
    differing = [k for k in ours if theirs.get(k) != ours[k]] + [k for k in theirs if k not in ours]
    return (differing[0] if differing else None), len(differing)


@functools.lru_cache(maxsize=1)
def committed_tokenizer():
    """The recipe's tokenizer (the thread count does not enter it, nor does it draw from the global seeds), built
    once per process: ≈8 s."""
    return B.build_tokenizer(B.Recipe())


def pretrain_first_steps(steps: int, threads: int) -> tuple[torch.nn.Module, float]:
    """The committed recipe's base after the first ``steps`` steps of its pretraining run (same documents, same
    learning-rate schedule) on ``threads`` torch threads, and the training seconds."""
    recipe = replace(B.Recipe(), base_threads=threads)
    random.seed(0)  # the global seeds build.main sets, should anything in the recipe come to draw from them
    torch.manual_seed(0)
    tok = committed_tokenizer()
    with contextlib.redirect_stdout(io.StringIO()):  # per-step lines; the result is one line
        return B.pretrain_base(recipe, tok, stop_after=steps)


def pretrain_fingerprint(steps: int, threads: int) -> tuple[str, float]:
    """Fingerprint of the base after ``pretrain_first_steps(steps, threads)``, and the training seconds."""
    model, secs = pretrain_first_steps(steps, threads)
    return fingerprint(model), secs


def verdict(digits: str, steps: int, threads: int) -> str:
    """What a full build on this machine will most likely give, from a fingerprint of ``steps`` steps on
    ``threads`` threads."""
    build_threads = B.Recipe().base_threads
    if steps != DEFAULT_STEPS:
        return f"no known build for {steps} steps (the known fingerprints are for {DEFAULT_STEPS})"
    if threads != build_threads:
        # On the Intel Xeon, 1 thread gave another fingerprint than 2 (on the AMD EPYC the same one).
        return (f"no prediction: the build pretrains the base on {build_threads} threads, and the thread count can "
                f"change the weights; rerun with --threads {build_threads}")
    if digits in KNOWN_BUILDS:
        machine, committed, weights = KNOWN_BUILDS[digits]
        if committed:
            return (f"same as {machine}, whose full build gave the committed checkpoints (sha256 {weights}): a full "
                    "build here should give them too")
        return (f"same as {machine}, whose full build gave other weights than the committed ones (sha256 {weights}): "
                "a full build here should give those, whose benchmark lines differ (ANALYSIS.md)")
    return (f"matches none of the known builds ({', '.join(KNOWN_BUILDS)}): a full build here will most likely give "
            "weights no recorded build has, not the committed ones (BUILD.md, 'Seeds and determinism')")


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines()[:30] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "model name" in fields:
            return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return platform.processor() or platform.machine()


def machine_line() -> str:
    import transformers

    kernels = ", ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if k in os.environ) or "none set"
    return (f"{cpu_name()}; torch {torch.__version__}, transformers {transformers.__version__}, ATen capability "
            f"{torch.backends.cpu.get_cpu_capability()}; kernel variables: {kernels}")


def run_trace(threads: int, out: Path | None, compare: Path | None) -> int:
    """``--trace`` / ``--compare``: write this machine's step trace, and / or name its first difference from a
    trace written elsewhere."""
    theirs = None
    if compare is not None:
        try:
            theirs = json.loads(compare.read_text())
            their_entries, their_machine = theirs["entries"], theirs["machine"]
            if not isinstance(their_entries, dict):
                raise TypeError(f"'entries' is a {type(their_entries).__name__}, not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"error: cannot read a trace from {compare} ({err}); give a file that --trace wrote",
                  file=sys.stderr)
            return 2
    entries = step_trace(threads)
    record = {"machine": machine_line(), "threads": threads, "entries": entries}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"trace of the first pretraining step ({len(entries)} hashes) written to {out}")
    print(f"machine: {record['machine']}; {threads} thread(s)")
    if theirs is not None:
        first, count = first_difference(entries, their_entries)
        print(f"{compare}: {their_machine}; {theirs.get('threads', '?')} thread(s)")
        missing = sum(k not in their_entries for k in entries)
        if missing:
            # entry names carry the call order, which the torch and transformers versions decide
            print(f"{missing} of the {len(entries)} entries have no counterpart there: the traces come from other "
                  "code (compare the versions above)")
        if first is None:
            print(f"the traces agree in all {len(entries)} hashes")
        else:
            print(f"first difference: {first} ({count} of {len(entries)} hashes differ)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help=f"pretraining steps to run (the reference is for {DEFAULT_STEPS})")
    ap.add_argument("--threads", type=int, default=B.Recipe().base_threads, help="torch threads")
    ap.add_argument("--trace", type=Path, metavar="OUT.json",
                    help="instead of the fingerprint: hash what the first step computes, module by module, into "
                         "OUT.json")
    ap.add_argument("--compare", type=Path, metavar="TRACE.json",
                    help="instead of the fingerprint: trace the first step and name the first module whose hash "
                         "differs from TRACE.json's (written by --trace on another machine)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        ap.error("--steps and --threads must be at least 1")
    if args.trace is not None or args.compare is not None:
        if args.steps != DEFAULT_STEPS:
            ap.error("--steps sets the fingerprint's steps; --trace and --compare always trace the first step")
        return run_trace(args.threads, args.trace, args.compare)

    start = time.perf_counter()
    digits, secs = pretrain_fingerprint(args.steps, args.threads)
    print(f"fingerprint {digits} after {args.steps} steps on {args.threads} thread(s) "
          f"({secs:.0f} s training, {time.perf_counter() - start:.0f} s in all)")
    print(f"machine: {machine_line()}")
    print(verdict(digits, args.steps, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
