"""Text → packed token blocks, through `datasets`.

`load_raw_datasets` reads text files (or a Hub dataset) into `train` / `validation` splits; `tokenize_and_pack`
tokenizes with a batched `map`, concatenates every row and cuts the stream into fixed `block_size` blocks
(the `group_texts` recipe of Transformers' run_clm_no_trainer.py). Both maps are cached by `datasets`.

When no validation data is given, the validation split is the tail of the text, as nanoGPT's
`data/shakespeare_char/prepare.py` does (`train = data[:0.9n]`, `val = data[0.9n:]`); we cut at the first row
boundary at or after that character count, so no line is split.
"""

import codecs
import io
import json
import os
from functools import partial
from itertools import accumulate
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, Value
from datasets.exceptions import DatasetGenerationError
from pydoc_data.topics import topics

from ..files import first_line

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


def data_files_builder(paths: list[str], role: str) -> str:
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


def check_data_files(paths: list[str], role: str = "training", text_column: str = "text") -> None:
    """Refuse what `load_raw_datasets` would refuse in these files (missing, empty, unsupported, not UTF-8, bad JSON
    rows) without loading them: for a command that starts several runs on the same files."""
    problem = _find_bad_row(paths, data_files_builder(paths, role), text_column)
    if problem:
        raise ValueError(problem)


def load_text_files(paths: list[str], role: str, text_column: str | None) -> Dataset:
    """The files as one dataset; `text_column` (None: no column is checked) must hold strings."""
    builder = data_files_builder(paths, role)
    # Text lines keep their "\n" so that packing the rows back to back restores the file byte for byte.
    options = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files={"train": list(paths)}, split="train", **options)
    except (DatasetGenerationError, ValueError) as error:  # ValueError: pandas/pyarrow parse errors seen directly
        # `datasets` says only that generation failed; find the file and the byte or line ourselves.
        raise ValueError(_find_bad_row(paths, builder, text_column) or
                         f"{role} file(s) {', '.join(paths)}: {first_line(error.__cause__ or error)}") from None
    if text_column in dataset.column_names and not _holds_text(dataset, text_column):  # (None is never a column)
        raise ValueError(_find_bad_row(paths, builder, text_column) or
                         f"{role} file(s) {', '.join(paths)}: column {text_column!r} holds "
                         f"{dataset.features[text_column]}, not text")
    return dataset


def _holds_text(dataset: Dataset, text_column: str) -> bool:
    feature = dataset.features[text_column]
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null")


def _find_bad_row(paths: list[str], builder: str, text_column: str) -> str | None:
    """The first byte that is not UTF-8 (text, JSON, CSV), or the first JSON row that is not valid JSON or whose
    text column holds something other than a string; None if nothing is found."""
    for path in map(Path, paths):
        problem = _utf8_problem(path) if builder in ("text", "json", "csv") else None
        if problem is None and builder == "json":
            problem = _json_problem(path, text_column)
        if problem:
            return f"{path}: {problem}"
    return None


def _utf8_problem(path: Path) -> str | None:
    """Where the file stops being UTF-8 (a binary file, or another encoding), read in 1 MiB pieces."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with path.open("rb") as stream:
        while True:
            chunk = stream.read(1 << 20)
            start = offset - len(decoder.getstate()[0])  # bytes of a character split across pieces come first
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                return f"not UTF-8 text at byte {start + error.start} ({error.reason}); a binary file or another " \
                       "encoding? convert it to UTF-8"
            if not chunk:
                return None
            offset += len(chunk)


def _json_problem(path: Path, text_column: str) -> str | None:
    """The first JSON Lines line (or item of a JSON array) that is not an object whose text column is a string."""
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, list):
        rows = ((f"element [{index}]", item) for index, item in enumerate(document))
    else:
        rows = _json_lines(text)
    for where, row in rows:
        if isinstance(row, str):  # the line's parse error
            return f"{where}: {row}"
        if not isinstance(row, dict):
            return f"{where} is not a JSON object"
        value = row.get(text_column) if text_column is not None else None
        if value is not None and not isinstance(value, str):
            return f"{where}: {text_column!r} is {json.dumps(value)[:40]}, not a string"
    return None


def _json_lines(text: str):
    """(`line N`, parsed row) per non-blank line; a line that does not parse yields its error message instead."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                yield f"line {number}", f"not valid JSON ({error.msg} at column {error.colno})"


def load_raw_datasets(
    train_files: list[str] | None,
    validation_file: str | None = None,
    validation_split_percentage: float = 10,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    text_column: str = "text",
    column_is_text: bool = True,
) -> DatasetDict:
    """`train` and `validation` splits of raw text from files (txt/json/jsonl/csv/parquet) or a Hub dataset.

    `text_column` must exist, and hold strings unless `column_is_text` is False (a chat column of message lists).

    Without validation data, the validation split is the tail of the training text (nanoGPT's split).
    """
    if dataset_name and train_files:
        raise ValueError("give either a dataset name or train files, not both")
    if dataset_name:
        raw = datasets.load_dataset(dataset_name, dataset_config_name)
        train = raw["train"]
        validation = raw["validation"] if "validation" in raw else None
    elif train_files:
        checked_column = text_column if column_is_text else None
        train = load_text_files(list(train_files), "train", checked_column)
        validation = load_text_files([validation_file], "validation", checked_column) if validation_file else None
    else:
        raise ValueError("no training data: pass train files or a dataset name")
    for split, dataset in (("train", train), ("validation", validation)):
        if dataset is not None and text_column not in dataset.column_names:
            raise ValueError(
                f"the {split} data has no column {text_column!r} (columns: {', '.join(dataset.column_names)}); "
                "set the text column"
            )
        if dataset is not None and column_is_text and not _holds_text(dataset, text_column):
            raise ValueError(f"the {split} data's column {text_column!r} holds {dataset.features[text_column]}, "
                             "not text")
    if validation is None:
        return split_tail(train, validation_split_percentage, text_column)
    return DatasetDict(train=train, validation=validation)


# Below this many rows per process, a pool's start-up costs more than it saves.
ROWS_PER_PROCESS = 100_000


def default_num_proc(num_rows: int) -> int | None:
    """Tokenization processes when none are asked for: one per ROWS_PER_PROCESS rows, at most one per CPU core
    (None: no pool, for small data)."""
    processes = min(os.cpu_count() or 1, num_rows // ROWS_PER_PROCESS)
    return processes if processes > 1 else None


def tokenize_rows(batch: dict, tokenizer, text_column: str) -> dict:
    """A batch of text rows → token ids, no special tokens added (a module-level function: pools and dataloader
    workers can pickle it)."""
    texts = [text or "" for text in batch[text_column]]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)


def pack_rows(batch: dict, block_size: int) -> dict:
    """A batch of token rows concatenated and cut into `block_size` blocks (labels = input_ids); the tail shorter
    than a block is dropped (`group_texts` of run_clm_no_trainer.py)."""
    stream = [token for ids in batch["input_ids"] for token in ids]
    usable = len(stream) // block_size * block_size
    blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


def check_block_size(block_size: int) -> None:
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")


def tokenize_and_pack(
    raw_datasets: DatasetDict, tokenizer, block_size: int, text_column: str = "text", num_proc: int | None = None
) -> DatasetDict:
    """Tokenize every split, concatenate its rows and cut the stream into `block_size` blocks (labels = input_ids).

    No special tokens are added: the rows are packed exactly as written (the tail shorter than a block is
    dropped, as in run_clm_no_trainer.py). The causal-LM head shifts labels itself. Without `num_proc`, large
    splits are tokenized by several processes (`default_num_proc`).
    """
    check_block_size(block_size)
    processes = {split: num_proc or default_num_proc(len(dataset)) for split, dataset in raw_datasets.items()}
    tokenized = DatasetDict({
        split: dataset.map(partial(tokenize_rows, tokenizer=tokenizer, text_column=text_column), batched=True,
                           num_proc=processes[split], remove_columns=dataset.column_names, desc=f"Tokenizing {split}")
        for split, dataset in raw_datasets.items()
    })
    # One map batch is one stream: a large batch wastes at most block_size - 1 tokens per 10k rows.
    packed = DatasetDict({
        split: dataset.map(partial(pack_rows, block_size=block_size), batched=True, batch_size=10_000,
                           num_proc=processes[split], desc=f"Packing into blocks of {block_size}")
        for split, dataset in tokenized.items()
    })
    for split, dataset in packed.items():
        if len(dataset) == 0:
            raise ValueError(f"the {split} split holds fewer than block_size={block_size} tokens after tokenization")
    return packed


__all__ = ["default_corpus_text", "load_raw_datasets", "split_tail", "text_to_dataset", "tokenize_and_pack"]
