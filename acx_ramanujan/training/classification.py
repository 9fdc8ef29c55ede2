"""Sequence classification with the Transformers Trainer (training_scripts/finetune_classification.py).

`AutoModelForSequenceClassification.from_pretrained(causal_lm_checkpoint, num_labels=…, id2label=…, label2id=…)`
keeps the decoder and adds a freshly initialized `score` head that reads the last non-pad token. Labels may be
strings or integers; their sorted set in the training data defines the class ids, saved in the config.
Sequences are padded per batch with the tokenizer's pad id (`DataCollatorWithPadding`). Evaluation keeps one
argmax per example (`preprocess_logits_for_metrics`) and reports `eval_accuracy` and macro `eval_f1`
(the bundled metrics) in OUTPUT_DIR/eval_results.json. For MoE checkpoints the expert load is logged, but the
loss is the classification loss alone: `RamanujanForSequenceClassification` adds no router losses.
"""

from dataclasses import dataclass, field

import torch
from datasets import ClassLabel, DatasetDict
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, EvalPrediction

from .finetune import (
    DataSourceArguments,
    ModelArguments,
    check_columns,
    load_checkpoint_config,
    load_checkpoint_tokenizer,
    make_trainer,
    run_cli,
)
from .lora import LoraArguments
from .metrics import load_metric


@dataclass
class DataArguments(DataSourceArguments):
    text_column: str = field(default="text", metadata={"help": "Column of texts to classify."})
    label_column: str = field(default="label", metadata={"help": "Column of labels (strings or integers)."})
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Longer texts are truncated. Default: the model's max_position_embeddings."}
    )


def label_ids(raw_datasets: DatasetDict, label_column: str) -> tuple[dict, dict[int, str]]:
    """(label value -> class id, class id -> label name): a ClassLabel's own ids and names, else the sorted
    labels of the training data. Fails when the validation data holds a label the training data never shows."""
    feature = raw_datasets["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return {index: index for index in range(feature.num_classes)}, dict(enumerate(feature.names))
    classes = sorted(set(raw_datasets["train"][label_column]))
    unseen = sorted(set(raw_datasets["validation"][label_column]) - set(classes), key=str)
    if unseen:
        raise ValueError(
            f"the validation data has label(s) the training data lacks: {', '.join(map(repr, unseen[:10]))}"
            f"{' …' if len(unseen) > 10 else ''} (training labels: {', '.join(map(repr, classes[:10]))}"
            f"{' …' if len(classes) > 10 else ''})"
        )
    if len(classes) < 2:
        raise ValueError(f"the training data has a single label ({classes[0]!r}); classification needs at least two")
    return {label: index for index, label in enumerate(classes)}, {index: str(label) for index, label in enumerate(classes)}


def argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics` hook: keep each example's predicted class, not its logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    predictions, references = prediction.predictions, prediction.label_ids
    return {
        **load_metric("accuracy").compute(predictions=predictions, references=references),
        **load_metric("f1").compute(predictions=predictions, references=references),
    }


def build_trainer(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments, training_args):
    """Check every input, tokenize, load the model with a new head (+ LoRA). Raises ValueError on bad input."""
    config = load_checkpoint_config(model_args, AutoModelForSequenceClassification, "sequence-classification")
    tokenizer = load_checkpoint_tokenizer(model_args, config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the usual choice for decoder-only tokenizers without one
    raw_datasets = data_args.load(data_args.text_column)
    check_columns(raw_datasets, [data_args.text_column, data_args.label_column], [data_args.text_column])
    class_ids, id2label = label_ids(raw_datasets, data_args.label_column)
    max_length = data_args.max_seq_length or getattr(config, "max_position_embeddings", None)

    def encode(batch):
        encoded = tokenizer(batch[data_args.text_column], truncation=max_length is not None, max_length=max_length)
        encoded["labels"] = [class_ids[label] for label in batch[data_args.label_column]]
        return encoded

    with training_args.main_process_first(desc="tokenization"):
        features = raw_datasets.map(
            encode, batched=True, remove_columns=raw_datasets["train"].column_names,
            num_proc=data_args.preprocessing_num_workers, desc="Tokenizing",
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
        pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=model_args.trust_remote_code,
    )
    return make_trainer(
        model, "SEQ_CLS", lora_args, training_args, tokenizer, features,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
        preprocess_logits_for_metrics=argmax_logits,
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, DataArguments, build_trainer, prog="finetune_classification")
