"""Fine-tune a causal LM with the Transformers Trainer: `python finetune_clm.py --model_name_or_path DIR ...`
(or `accelerate launch finetune_clm.py ...`). Same code and options as `acx-rt finetune`; `--help` lists them,
every `TrainingArguments` flag included."""

import sys

from acx_ramanujan.training.causal_lm import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
