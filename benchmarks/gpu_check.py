"""One prepared GPU check (run on a CUDA machine): the organism merged on CPU and on CUDA must agree, in the
one-shot and in the sequential projection, a ``device_map="auto"`` load must merge to the same weights, the
sequential replay cache offloaded to CPU must not change the merge, and a LoRA instruct model must merge on CUDA.

    python -m benchmarks.gpu_check            # prints max |Δ| per check; exit 1 if any check fails

The memory/time figures of a larger model come from ``python -m benchmarks.merge_memory --shape 1.5b --device cuda``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    # progress bars (tens of kB over a dozen merges) would push the figures out of a captured output's tail; tqdm
    # reads the switch when first imported, which importing torch does
    os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ORG = HERE / "organism"
TOL = 1e-4  # fp32 organism: CPU and CUDA kernels differ in summation order only


def merged_state(device: str, sequential: bool = False, offload: bool = False,
                 **kwargs) -> tuple[dict[str, torch.Tensor], float]:
    from rain_hf import RainMerger, RainMergingConfig

    cfg = RainMergingConfig(lam=4.0, think_spacing=["", "", ""], sequential=sequential, sequential_offload=offload)
    merger = RainMerger.from_pretrained(str(ORG / "checkpoints/base"), str(ORG / "checkpoints/reasoning"),
                                        str(ORG / "checkpoints/instruct"), cfg, device=device, **kwargs)
    start = time.perf_counter()
    model = merger.merge(reasoning_calibration=str(ORG / "data/reasoning_calibration.json"),
                         instruction_calibration=str(ORG / "data/instruction_calibration.jsonl"))
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}  # the copy also synchronises
    return state, time.perf_counter() - start


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), "state dict keys differ"
    # NaN where a merge went non-finite: inf, so that it fails (max() over floats drops a NaN not met first)
    diffs = [float((a[k] - b[k]).abs().max()) for k in a]
    return float("inf") if any(d != d for d in diffs) else max(diffs)


def lora_on_cuda() -> float:
    """A random LoRA adapter on the organism base, merged on CPU and on CUDA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rain_hf import RainMerger, RainMergingConfig

    base = AutoModelForCausalLM.from_pretrained(str(ORG / "checkpoints/base"), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        for device in ("cpu", "cuda"):
            merger = RainMerger.from_pretrained(str(ORG / "checkpoints/base"), str(ORG / "checkpoints/reasoning"),
                                                tmp, RainMergingConfig(lam=1.0, think_spacing=["", "", ""], sequential=False),
                                                device=device)
            model = merger.merge(reasoning_calibration=str(ORG / "data/reasoning_calibration.json"),
                                 instruction_calibration=str(ORG / "data/instruction_calibration.jsonl"))
            out[device] = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    return max_diff(out["cpu"], out["cuda"])


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu_check needs a CUDA device and none is visible; run it on a GPU machine.",
              file=sys.stderr)
        return 2
    import huggingface_hub
    import peft
    import transformers

    # the GPU image's own packages run this (rain_hf from the checkout, not installed): say which
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, huggingface_hub {huggingface_hub.__version__}, peft {peft.__version__}",
          flush=True)
    # start CUDA, cuBLAS, cuSOLVER, the eager attention kernels and the lazy imports before anything is timed
    try:
        merged_state("cpu")
        merged_state("cuda")
    except Exception as exc:  # the checks below run (and fail) one by one, each printing its own reason
        print(f"warm-up merge failed: {type(exc).__name__}: {exc}", flush=True)
    results: dict[str, float] = {}

    def check(name: str, run) -> None:
        """Run one comparison and print it at once: a later failure must not lose the earlier figures."""
        try:
            diff = run()
        except Exception as exc:  # reported as a failure, with the reason; the other checks still run
            print(f"{name}: failed with {type(exc).__name__}: {exc}", flush=True)
            diff = float("inf")
        results[name] = diff
        print(f"{name}: max |Δ| = {diff:.2e} ({'OK' if diff <= TOL else 'FAIL'}, tolerance {TOL:g})", flush=True)

    states: dict[str, dict[str, torch.Tensor]] = {}
    for sequential in (False, True):
        form = "sequential" if sequential else "one-shot"
        try:
            cpu, t_cpu = merged_state("cpu", sequential)
            cuda, t_cuda = merged_state("cuda", sequential)
        except Exception as exc:
            print(f"organism {form} merge failed: {type(exc).__name__}: {exc}", flush=True)
            results[f"organism RAIN λ4 {form} cpu vs cuda"] = float("inf")
            continue
        states[form] = cuda
        print(f"organism {form} merge (calibration, stages 1 and 2, load excluded): cpu {t_cpu:.1f}s, "
              f"cuda {t_cuda:.1f}s", flush=True)
        check(f"organism RAIN λ4 {form} cpu vs cuda", lambda cpu=cpu, cuda=cuda: max_diff(cpu, cuda))
        check(f"organism RAIN λ4 {form} cpu vs device_map=auto", lambda cpu=cpu, sequential=sequential: max_diff(
            cpu, merged_state("cuda", sequential, device_map="auto")[0]))

    def offloaded() -> float:
        if "sequential" not in states:
            raise RuntimeError("skipped: the sequential CUDA merge failed above")
        state, seconds = merged_state("cuda", True, offload=True)
        print(f"organism sequential merge wall, cache offloaded: cuda {seconds:.1f}s", flush=True)
        return max_diff(states["sequential"], state)

    check("organism RAIN λ4 sequential cuda vs cuda with the cache offloaded", offloaded)
    check("LoRA adapter cpu vs cuda", lora_on_cuda)
    failed = [name for name, diff in results.items() if not diff <= TOL]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
