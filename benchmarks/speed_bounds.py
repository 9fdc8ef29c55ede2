"""Upper bounds on our speed ratios against Transformers' Llama and Qwen3-MoE: a thin launcher for acx_ramanujan/bench/bounds.py.

usage: python benchmarks/speed_bounds.py [--shapes nanogpt width256] [--repeats 9] [--threads N]
"""

import sys

from acx_ramanujan.bench.bounds import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
