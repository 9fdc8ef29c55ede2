"""Speed against Transformers' Llama and Qwen3-MoE: a thin launcher for `acx-rt bench-speed` (see acx_ramanujan/bench/speed.py).

usage: python benchmarks/speed.py [--shapes nanogpt width256] [--parts models precision generation serving]
       [--repeats 7] [--threads N] [--no-compile] [--no-scaling]
"""

import sys

from acx_ramanujan.bench.speed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
