"""Text → packed token blocks, through `datasets`.

`load_raw_datasets` reads text files (or a Hub dataset) into `train` / `validation` splits; `tokenize_and_pack`
tokenizes with a batched `map`, concatenates every row and cuts the stream into fixed `block_size` blocks
(the `group_texts` recipe of Transformers' run_clm_no_trainer.py). Both maps are cached by `datasets`.

When no validation data is given, the validation split is the tail of the text, as nanoGPT's
`data/shakespeare_char/prepare.py` does (`train = data[:0.9n]`, `val = data[0.9n:]`); we cut at the first row
boundary at or after that character count, so no line is split.
"""

import io
from itertools import accumulate
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict
from pydoc_data.topics import topics

# File suffix -> `datasets` packaged builder.
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def default_corpus_text() -> str:
    """The embedded default corpus: the text of Python's built-in help topics, shipped with every CPython."""
    return "\n\n".join(topics[name] for name in sorted(topics))


def split_tail(dataset: Dataset, validation_split_percentage: float, text_column: str = "text") -> DatasetDict:
    """Train on the head of the rows, validate on the tail holding ~`validation_split_percentage` % of the text."""
    if not 0 < validation_split_percentage < 100:
        raise ValueError(f"validation_split_percentage must be in (0, 100), got {validation_split_percentage}")
    lengths = [len(text or "") for text in dataset[text_column]]
    cumulative = list(accumulate(lengths))
    total = cumulative[-1] if cumulative else 0
    if total == 0:
        raise ValueError("the training text is empty")
    cut_at = total * (100 - validation_split_percentage) / 100
    first_validation_row = next(i for i, chars in enumerate(cumulative) if chars >= cut_at) + 1
    if first_validation_row >= len(dataset):
        raise ValueError(
            f"cannot hold out {validation_split_percentage}% of the text for validation: its last row is longer "
            "than that; pass a validation file or split the text into more rows (lines)"
        )
    return DatasetDict(
        train=dataset.select(range(first_validation_row)),
        validation=dataset.select(range(first_validation_row, len(dataset))),
    )


def text_to_dataset(text: str, validation_split_percentage: float = 10) -> DatasetDict:
    """An in-memory text (e.g. `default_corpus_text()`) as line rows that keep their line breaks, split by tail."""
    lines = io.StringIO(text).readlines()  # splits on "\n" only, as the `text` builder does for files
    return split_tail(Dataset.from_dict({"text": lines}), validation_split_percentage)


def _check_files(paths: list[str], role: str) -> str:
    """Every path exists, is non-empty and shares one supported suffix; returns the `datasets` builder name."""
    suffixes = set()
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"{role} file {str(path)!r} does not exist")
        if path.stat().st_size == 0:
            raise ValueError(f"{role} file {str(path)!r} is empty")
        if path.suffix.lower() not in BUILDERS:
            raise ValueError(f"{role} file {str(path)!r}: unsupported format; use one of {', '.join(sorted(BUILDERS))}")
        suffixes.add(BUILDERS[path.suffix.lower()])
    if len(suffixes) > 1:
        raise ValueError(f"{role} files mix formats ({', '.join(sorted(suffixes))}); use one format")
    return suffixes.pop()


def _load_files(paths: list[str], role: str) -> Dataset:
    builder = _check_files(paths, role)
    # Text lines keep their "\n" so that packing the rows back to back restores the file byte for byte.
    options = {"keep_linebreaks": True} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files={"train": list(paths)}, split="train", **options)


def load_raw_datasets(
    train_files: list[str] | None,
    validation_file: str | None = None,
    validation_split_percentage: float = 10,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    text_column: str = "text",
) -> DatasetDict:
    """`train` and `validation` splits of raw text from files (txt/json/jsonl/csv/parquet) or a Hub dataset.

    Without validation data, the validation split is the tail of the training text (nanoGPT's split).
    """
    if dataset_name and train_files:
        raise ValueError("give either a dataset name or train files, not both")
    if dataset_name:
        raw = datasets.load_dataset(dataset_name, dataset_config_name)
        train = raw["train"]
        validation = raw["validation"] if "validation" in raw else None
    elif train_files:
        train = _load_files(list(train_files), "train")
        validation = _load_files([validation_file], "validation") if validation_file else None
    else:
        raise ValueError("no training data: pass train files or a dataset name")
    for split, dataset in (("train", train), ("validation", validation)):
        if dataset is not None and text_column not in dataset.column_names:
            raise ValueError(
                f"the {split} data has no column {text_column!r} (columns: {', '.join(dataset.column_names)}); "
                "set the text column"
            )
    if validation is None:
        return split_tail(train, validation_split_percentage, text_column)
    return DatasetDict(train=train, validation=validation)


def tokenize_and_pack(
    raw_datasets: DatasetDict, tokenizer, block_size: int, text_column: str = "text", num_proc: int | None = None
) -> DatasetDict:
    """Tokenize every split, concatenate its rows and cut the stream into `block_size` blocks (labels = input_ids).

    No special tokens are added: the rows are packed exactly as written (the tail shorter than a block is
    dropped, as in run_clm_no_trainer.py). The causal-LM head shifts labels itself.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")

    def tokenize(batch):
        texts = [text or "" for text in batch[text_column]]
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)

    def pack(batch):
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) // block_size * block_size
        blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    tokenized = DatasetDict({
        split: dataset.map(tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
                           desc=f"Tokenizing {split}")
        for split, dataset in raw_datasets.items()
    })
    # One map batch is one stream: a large batch wastes at most block_size - 1 tokens per 10k rows.
    packed = tokenized.map(pack, batched=True, batch_size=10_000, num_proc=num_proc, desc=f"Packing into blocks of {block_size}")
    for split, dataset in packed.items():
        if len(dataset) == 0:
            raise ValueError(f"the {split} split holds fewer than block_size={block_size} tokens after tokenization")
    return packed


__all__ = ["default_corpus_text", "load_raw_datasets", "split_tail", "text_to_dataset", "tokenize_and_pack"]
