"""Will this machine rebuild the committed organism bit for bit? The base's first 40 pretraining steps, hashed.

    python -m benchmarks.organism.determinism                      # ≈35 s on 2 cores
    ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.organism.determinism

The organism's weights are a function of its seeds and of the floating-point kernels torch picks on the machine:
MKL's code path and the vector width of ATen's own kernels (``torch.backends.cpu.get_cpu_capability()``) both
change the last bits of a training step, and 1800 steps turn those bits into another base (BUILD.md, "Seeds and
determinism"). This script runs the first ``--steps`` steps of the committed base's pretraining in memory and
prints a fingerprint of the weights. If it equals the fingerprint of a machine whose full build gave the committed
checkpoints' sha256, ``python -m benchmarks.organism.build`` should give them here too; the full build takes
≈20 min to tell.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
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

# Environment variables that select the kernels (read once, when torch loads), printed with the result.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def fingerprint(model: torch.nn.Module) -> str:
    """First 16 hex digits of a sha256 over every tensor of ``model``'s state dict (name, dtype, shape, bytes),
    in name order: the same weights give the same digits whatever file format or metadata they are saved with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def pretrain_fingerprint(steps: int, threads: int) -> tuple[str, float]:
    """Fingerprint of the committed recipe's base after the first ``steps`` steps of its pretraining run (same
    documents, same learning-rate schedule) on ``threads`` torch threads, and the training seconds."""
    recipe = replace(B.Recipe(), base_threads=threads)
    random.seed(0)  # the global seeds build.main sets, should anything in the recipe come to draw from them
    torch.manual_seed(0)
    tok = B.build_tokenizer(recipe)
    with contextlib.redirect_stdout(io.StringIO()):  # per-step lines; the result is one line
        model, secs = B.pretrain_base(recipe, tok, stop_after=steps)
    return fingerprint(model), secs


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines()[:30] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "model name" in fields:
            return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help=f"pretraining steps to run (the reference is for {DEFAULT_STEPS})")
    ap.add_argument("--threads", type=int, default=B.Recipe().base_threads, help="torch threads")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        ap.error("--steps and --threads must be at least 1")

    start = time.perf_counter()
    digits, secs = pretrain_fingerprint(args.steps, args.threads)
    kernels = ", ".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if k in os.environ) or "none set"
    print(f"fingerprint {digits} after {args.steps} steps on {args.threads} thread(s) "
          f"({secs:.0f} s training, {time.perf_counter() - start:.0f} s in all)")
    print(f"machine: {cpu_name()}; torch {torch.__version__}, ATen capability "
          f"{torch.backends.cpu.get_cpu_capability()}; kernel variables: {kernels}")
    if args.steps != DEFAULT_STEPS:
        print(f"no reference for {args.steps} steps (the reference is for {DEFAULT_STEPS})")
    elif digits == REFERENCE:
        print("matches the reference machine, whose full build gave the committed checkpoints' sha256: a full build "
              "here should give them too")
    else:
        print(f"differs from the reference {REFERENCE}: a full build here will most likely give other weights than "
              "the committed ones (BUILD.md, 'Seeds and determinism')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
