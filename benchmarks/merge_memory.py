"""Peak memory and wall time of a RAIN merge of a random Qwen2-shaped model (default ≈0.5B parameters).

    python -m benchmarks.merge_memory                       # Qwen2-0.5B shape, CPU
    python -m benchmarks.merge_memory --shape 1.5b --device cuda
    python -m benchmarks.merge_memory --lam auto             # the default λ search (RainMergingConfig())
    python -m benchmarks.merge_memory --one-shot             # the paper's one-shot projection (sequential=False)
    python -m benchmarks.merge_memory --device cuda --offload  # the sequential replay cache kept in CPU memory

The three checkpoints are built once (in a separate process, cached under --workdir); the merge then runs in a
fresh process whose peak resident set size is read from the kernel (ru_maxrss). Prints the figures and checks the
target peak RSS ≤ 1.5 × reasoning checkpoint size + 1 GiB, and that stage 1 ran one forward pass per batch (besides
the think_spacing check's passes over the first 8 samples); exits 1 when either is missed, 2 on a bad option, 3
when the build or the merge fails (its error is printed above).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # Qwen2.5-0.5B / 1.5B geometry: tied embeddings, GQA, q/k/v biases
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
}
GIB = 2**30


def _millions(count: int) -> str:
    """A parameter count in millions, with the digits a tiny shape needs (not "0M")."""
    millions = count / 1e6
    return f"{millions:.0f}" if millions >= 10 else f"{millions:.2g}"


def build(workdir: Path, shape: str) -> dict[str, str]:
    import torch

    from rain_hf.testing import build_triple

    root = workdir / f"qwen2-{shape}"
    paths = {r: root / r for r in ("base", "reasoning", "instruct")}
    done = root / "built"  # written last: a build stopped half way (a weights file cut off too) is redone
    if done.is_file():
        return {k: str(v) for k, v in paths.items()}
    start = time.perf_counter()
    build_triple(root, "qwen2", noise=0.01, dtype=torch.bfloat16, **SHAPES[shape])
    done.write_text("complete\n")
    print(f"built {shape} triple in {time.perf_counter() - start:.0f}s under {root}", file=sys.stderr)
    return {k: str(v) for k, v in paths.items()}


def run_merge(paths: dict[str, str], device: str, samples: int, out: Path, lam: float | str = 1.0,
              one_shot: bool = False, offload: bool = False) -> dict:
    """Runs in its own process: the merge, then the figures as JSON on stdout."""
    import torch

    from rain_hf import RainMerger, RainMergingConfig
    from rain_hf.features import find_decoder_layers
    from rain_hf.merger import SPACING_PROBE_SAMPLES
    from rain_hf.testing import instruction_records, reasoning_records

    cuda_startup = None
    if device.startswith("cuda"):
        # the CUDA context and the cuBLAS/cuSOLVER libraries take host memory and time before any merge work:
        # start them first so the figures below can say what is the merge's
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        torch.linalg.svd(torch.randn(8, 8, device=device) @ torch.randn(8, 8, device=device))
        torch.cuda.synchronize(device)
        cuda_startup = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / GIB
    start = time.perf_counter()
    cfg = RainMergingConfig(lam=lam, batch_size=4, sequential=False if one_shot else None, sequential_offload=offload)
    merger = RainMerger.from_pretrained(paths["base"], paths["reasoning"], paths["instruct"], cfg, device=device)
    calls = {"decoder": 0, "layer": 0}

    def count(kind):
        return lambda *_: calls.__setitem__(kind, calls[kind] + 1)

    merger.model.get_decoder().register_forward_pre_hook(count("decoder"))
    for layer in find_decoder_layers(merger.model)[1]:
        layer.register_forward_pre_hook(count("layer"))
    merger.compute_features(reasoning_records(samples))
    stage1 = dict(calls)
    merger.merge(instruction_calibration=instruction_records(samples))
    merger.save_pretrained(out, overwrite=True)
    wall = time.perf_counter() - start
    if device.startswith("cuda"):
        gpu_peak = torch.cuda.max_memory_allocated(torch.device(device)) / GIB
        gpu_reserved = torch.cuda.max_memory_reserved(torch.device(device)) / GIB
    else:
        gpu_peak = gpu_reserved = None
    return {
        "wall_s": wall,
        "timings": merger.report.timings,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "gpu_peak_gib": gpu_peak,
        "gpu_reserved_gib": gpu_reserved,
        "cuda_startup_rss_gib": cuda_startup,
        "reasoning_bytes": merger.reasoning.nbytes(),
        "parameters": sum(p.numel() for p in merger.model.parameters()),
        "stage1_batches": -(-merger.features.settings["num_samples"] // cfg.batch_size),  # lam="auto" holds some out
        # the think_spacing check's own passes, over the first samples of the whole set, before any hold-out
        "probe_batches": -(-min(SPACING_PROBE_SAMPLES, merger.calibration_info["reasoning"]["num_samples"])
                           // cfg.batch_size),
        "lam": merger.report.lam,
        "projection": merger.report.projection,
        "replay_cache_bytes": merger.report.replay_cache_bytes,
        "stage1_forwards": stage1["decoder"],
        "merge_forwards": calls["decoder"] - stage1["decoder"],  # the stage-2 probe, and the sequential replay's start
        "merge_layer_calls": calls["layer"] - stage1["layer"],  # also counts the replayed layers
        "input_groups": len(merger._input_groups()),
        "num_layers": merger.plan.geometry.num_layers,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples per stage")
    parser.add_argument("--lam", default="1.0", help='λ, or "auto" for the calibration-only search (default 1.0)')
    parser.add_argument("--one-shot", action="store_true",
                        help="RainMergingConfig(sequential=False); by default stage 1 is sequential")
    parser.add_argument("--offload", action="store_true",
                        help="RainMergingConfig(sequential_offload=True): the replay cache in CPU memory")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rain_hf_bench")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        lam = args.lam if args.lam == "auto" else float(args.lam)
    except ValueError:
        lam = None
    if lam is None or (lam != "auto" and not 0 <= lam < float("inf")):  # NaN fails both comparisons
        parser.error(f"--lam {args.lam!r}: give a finite number ≥ 0, or auto.")
    # the build and the merge run in the repository root: a relative folder must mean the caller's
    args.workdir = args.workdir.expanduser().resolve()
    if args.offload and args.one_shot:
        parser.error("--offload moves the sequential projection's cache, and --one-shot turns it off: pick one.")
    if args.samples < 1:
        parser.error(f"--samples {args.samples}: each stage needs at least 1 calibration sample.")
    if not args._child:  # before the build, which is the slow part at the larger shapes
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            parser.error(f"--device {args.device!r}: {exc}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device.")
    if args._child:
        paths = json.loads(args._child)
        print(json.dumps(run_merge(paths, args.device, args.samples, args.workdir / f"merged-{args.shape}", lam,
                                   args.one_shot, args.offload)))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    build_cmd = [sys.executable, "-c", "import json,sys; from benchmarks.merge_memory import build; "
                 f"print(json.dumps(build(__import__('pathlib').Path({str(args.workdir)!r}), {args.shape!r})))"]
    built = subprocess.run(build_cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    if built.returncode:
        print(f"merge_memory: building the {args.shape} checkpoints failed (exit {built.returncode}; its error is "
              "above).", file=sys.stderr)
        return 3
    paths = json.loads(built.stdout.strip().splitlines()[-1])
    child = [sys.executable, "-m", "benchmarks.merge_memory", "--shape", args.shape, "--device", args.device,
             "--samples", str(args.samples), "--lam", args.lam, "--workdir", str(args.workdir),
             "--_child", json.dumps(paths)] + (["--one-shot"] if args.one_shot else []) + (
                 ["--offload"] if args.offload else [])
    done = subprocess.run(child, stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:  # not a missed target (exit 1): no figure was measured
        print(f"merge_memory: the merge failed (exit {done.returncode}; its error is above).", file=sys.stderr)
        return 3
    fig = json.loads(done.stdout.strip().splitlines()[-1])
    size = fig["reasoning_bytes"] / GIB
    target = 1.5 * size + 1.0
    print(f"shape {args.shape}: {_millions(fig['parameters'])}M parameters, reasoning checkpoint {size:.2f} GiB, "
          f"device {args.device}, lam {args.lam} (merged with λ = {fig['lam']:g}), {fig['projection']} projection"
          f"{' (replay cache offloaded to CPU)' if args.offload else ''}")
    search = " + λ search" if "lam_auto" in fig["timings"] else ""
    print(f"wall time (load + stage 1 + stage 2{search} + merge + save): {fig['wall_s']:.1f} s")
    for stage, seconds in fig["timings"].items():
        print(f"  {stage:22s} {seconds:8.1f} s")
    rss = fig["peak_rss_gib"]
    if fig["cuda_startup_rss_gib"] is not None:
        # the target is a CPU-merge budget; the CUDA runtime's own host memory is not the merge's
        print(f"peak RSS {rss:.2f} GiB, of which CUDA start-up {fig['cuda_startup_rss_gib']:.2f} GiB (taken before "
              "the merge)")
        rss -= fig["cuda_startup_rss_gib"]
    rss_ok = rss <= target
    print(f"peak RSS{' without CUDA start-up' if fig['cuda_startup_rss_gib'] is not None else ''} {rss:.2f} GiB; "
          f"target ≤ 1.5 × {size:.2f} + 1 = {target:.2f} GiB: {'OK' if rss_ok else 'MISSED'} (glibc heap "
          "fragmentation makes the peak vary between identical runs: compare several)")
    if fig["gpu_peak_gib"] is not None:
        print(f"peak GPU memory allocated {fig['gpu_peak_gib']:.2f} GiB, reserved by the allocator "
              f"{fig['gpu_reserved_gib']:.2f} GiB")
    passes_ok = fig["stage1_forwards"] == fig["stage1_batches"] + fig["probe_batches"]
    print(f"stage 1: {fig['stage1_forwards']} forward passes for {fig['stage1_batches']} batches over "
          f"{fig['num_layers']} layers, and {fig['probe_batches']} of the think_spacing check: "
          f"{'OK' if passes_ok else 'MISSED'}")
    # a replayed layer stopped at its first captured module (or the replay's start stopped before the last
    # layer) counts as one call too, so the call count is an upper bound on the layer work
    print(f"merge: {fig['merge_forwards']} decoder passes, {fig['merge_layer_calls']} decoder-layer calls, partial "
          f"ones included (at most {fig['merge_layer_calls'] / fig['num_layers']:.1f} passes over "
          f"{fig['num_layers']} layers; {fig['input_groups']} input groups"
          f"{', each captured on replayed layer inputs' if fig['projection'] == 'sequential' else ''})")
    if fig["replay_cache_bytes"] is not None:
        print(f"replay cache: {fig['replay_cache_bytes'] / 2**20:.1f} MiB "
              f"{'in CPU memory' if args.offload else 'on ' + args.device}")
    return 0 if rss_ok and passes_ok else 1


if __name__ == "__main__":
    sys.exit(main())
