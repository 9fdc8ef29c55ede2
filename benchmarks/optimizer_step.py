"""Time one training step (forward, backward, optimizer step) of the quality anchor's dense shape under each
optimizer setting `acx-rt train` can end up with: AdamW, and Muon (+ AdamW for the rest) with its Newton–Schulz
iteration in bf16 (torch's choice) or fp32. On a CPU without native bf16 matmuls the bf16 iteration is emulated.
Then the Newton–Schulz iteration alone, over every matrix Muon steps in the dense and the MoE model: batched by
shape (`recipe.orthogonalized`, what Muon runs) against one call per matrix (what torch's Muon runs).

usage: OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py [--steps 20] [--threads 1]
(results: docs/benchmarks.md, "Training recipe" and "Time to target")
"""

import argparse
import time
from statistics import median

import torch

from acx_ramanujan import RamanujanConfig, RamanujanForCausalLM
from acx_ramanujan.training.pretrain import training_arguments
from acx_ramanujan.training.recipe import Muon, make_optimizers, newton_schulz_dtype, orthogonalized

# The quality anchor's shape (benchmarks/quality_anchor.sh): 4 layers, width 128, context 64, batch 12.
SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=344)
SETTINGS = {"adamw": ("adamw", None), "muon, bf16 Newton-Schulz": ("muon", torch.bfloat16),
            "muon, fp32 Newton-Schulz": ("muon", torch.float32)}


def step_function(optimizer_name: str, ns_dtype: torch.dtype | None, batch: torch.Tensor):
    torch.manual_seed(0)
    model = RamanujanForCausalLM(RamanujanConfig.from_preset("tiny", **SHAPE))
    optimizers = make_optimizers(model, training_arguments(optimizer=optimizer_name))
    for optimizer in optimizers:
        if isinstance(optimizer, Muon):
            optimizer.ns_dtype = ns_dtype

    def step():
        model(input_ids=batch, labels=batch).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def muon_matrices(preset: str) -> list[torch.Tensor]:
    """The matrices `acx-rt train`'s Muon optimizers orthogonalize each step for `preset` at the anchor's shape (the
    hidden matrices, and `ExpertMuon`'s per-expert stand-ins), filled with random numbers standing in for updates."""
    model = RamanujanForCausalLM(RamanujanConfig.from_preset(preset, **SHAPE))
    muons = [optimizer for optimizer in make_optimizers(model, training_arguments(optimizer="muon"))
             if isinstance(optimizer, Muon)]  # ExpertMuon is a Muon
    return [torch.randn_like(param) for muon in muons for group in muon.param_groups for param in group["params"]]


def newton_schulz_seconds(matrices: list[torch.Tensor], steps: int) -> dict[str, float]:
    """Median seconds of one iteration over all `matrices`, batched by shape and one matrix at a time, interleaved."""
    defaults = torch.optim.Muon([torch.zeros(2, 2)]).defaults  # torch's coefficients, steps and eps
    options = (defaults["ns_coefficients"], defaults["ns_steps"], defaults["eps"])
    dtype = newton_schulz_dtype(torch.device("cpu"))
    ways = {"batched by shape": lambda: orthogonalized(matrices, *options, dtype),
            "one call per matrix": lambda: [orthogonalized([matrix], *options, dtype) for matrix in matrices]}
    seconds = {name: [] for name in ways}
    for _ in range(steps + 1):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            seconds[name].append(time.perf_counter() - start)
    return {name: median(values[1:]) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = torch.randint(0, 256, (12, 64), generator=torch.Generator().manual_seed(0))
    steps = {name: step_function(*setting, batch) for name, setting in SETTINGS.items()}
    seconds = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        step()
    for _ in range(args.steps):  # interleaved, so that other load hits every setting alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}, amx {torch.cpu._is_amx_tile_supported()}; "
          f"acx-rt train would run Newton-Schulz in {newton_schulz_dtype(torch.device('cpu'))}")
    adamw = median(seconds["adamw"])
    for name, values in seconds.items():
        print(f"{name:26s} median {median(values) * 1e3:8.1f} ms per step  ({median(values) / adamw:.2f}x AdamW)")
    for preset in ("tiny", "tiny-moe"):
        matrices = muon_matrices(preset)
        for name, value in newton_schulz_seconds(matrices, args.steps).items():
            print(f"Newton-Schulz, {preset} ({len(matrices)} matrices), {name:20s} median {value * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
