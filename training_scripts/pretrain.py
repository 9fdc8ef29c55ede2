"""Pretrain with Accelerate: `python training_scripts/pretrain.py ...` or `accelerate launch training_scripts/pretrain.py ...`.

The same code as `acx-rt train` (acx_ramanujan.training.pretrain); run with `--help` for the flags. Ready-made launcher
configs for multi-GPU DDP, FSDP and DeepSpeed ZeRO are in training_scripts/accelerate_configs/.
"""

import sys

from acx_ramanujan.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
