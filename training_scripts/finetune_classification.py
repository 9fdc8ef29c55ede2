"""Fine-tune a sequence classifier from a causal-LM checkpoint with the Transformers Trainer:
`python finetune_classification.py --model_name_or_path DIR --train_file train.csv ...` (or `accelerate launch`).
`--help` lists the options, every `TrainingArguments` flag included."""

import sys

from acx_ramanujan.training.classification import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
