"""The table behind `--mixed_precision auto` on a CPU with native bf16: the probe's timings (forward + backward in
fp32 and under bf16 autocast, interleaved; acx_ramanujan/training/precision.py) for the shapes the package trains
by default and at width 256, and what `auto` picks for each.

usage: python benchmarks/precision_table.py [--steps 7] [--threads N]     (results: docs/benchmarks.md, "Time to target")
"""

import argparse

import torch

from acx_ramanujan import RamanujanConfig
from acx_ramanujan.training.precision import BF16_MUST_SAVE, probe_seconds

ANCHOR = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=344)
WIDTH256 = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4, intermediate_size=688,
                moe_intermediate_size=192)
# name: (preset, overrides, (blocks, tokens per block) of one micro-batch)
SHAPES = {
    "quality anchor, dense": ("tiny", ANCHOR, (12, 64)),
    "quality anchor, MoE": ("tiny-moe", ANCHOR, (12, 64)),
    "`acx-rt train` default (tiny, block 256)": ("tiny", {}, (8, 256)),
    "`acx-rt train --config_name tiny-moe` (block 256)": ("tiny-moe", {}, (8, 256)),
    "width 256, dense": ("tiny", WIDTH256, (8, 256)),
    "width 256, MoE (8 experts, top-2)": ("tiny-moe", WIDTH256, (8, 256)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="timed passes per precision (after one warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}, "
          f"amx {torch.cpu._is_amx_tile_supported()}\n")
    print("| shape | micro-batch | fp32 ms | bf16 autocast ms | bf16 / fp32 | `auto` picks |")
    print("|---|---|---|---|---|---|")
    for name, (preset, overrides, micro_batch) in SHAPES.items():
        seconds = probe_seconds(RamanujanConfig.from_preset(preset, **overrides), micro_batch, steps=args.steps)
        ratio = seconds["bf16"] / seconds["no"]
        choice = "bf16" if ratio <= 1 - BF16_MUST_SAVE else "fp32"
        print(f"| {name} | {micro_batch[0]}×{micro_batch[1]} | {seconds['no'] * 1e3:.1f} | {seconds['bf16'] * 1e3:.1f} "
              f"| {ratio:.2f} | {choice} |", flush=True)


if __name__ == "__main__":
    main()
