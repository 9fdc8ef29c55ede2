"""Training: pretraining with Accelerate (`pretrain`), its data, checkpoints, progress and evaluation; fine-tuning
with the Transformers Trainer (causal LM, sequence classification, LoRA); BPE tokenizer training; bundled metrics."""
