"""`acx-rt train --streaming`: a training corpus read as a stream, never loaded whole or cached on disk.

The files (txt/json/jsonl/csv/parquet, any number of shards) or a Hub dataset open as a `datasets` IterableDataset,
tokenized and packed into blocks on the fly by the same functions as the cached path (`data.tokenize_rows`,
`data.pack_rows`). Each process reads its own part (`datasets.distributed.split_dataset_by_node`: whole shards when
their number divides by the process count, else every Nth block) and splits it again over its dataloader workers
(by shard, `datasets`' own rule), so no block is read twice or skipped. torchdata's StatefulDataLoader collects the
position of every worker; `TrainStream.state_dict` is that position as plain JSON, kept per process in the
checkpoint's training_state.json, so a resume continues exactly where the stream stopped.

The stream is read in file order (no shuffle buffer: `datasets` does not restore one on resume); each process starts
over when its part ends, so the processes never wait on one that ran dry. Validation stays a fixed, finite set
(`--validation_file`, or the Hub dataset's validation split), tokenized and cached as without --streaming.
"""

from functools import partial

import datasets
import torch
from datasets import DatasetDict, IterableDataset
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader

from .checkpoints import BadCheckpoint, TrainingState
from .data import check_block_size, data_files_builder, load_text_files, pack_rows, tokenize_rows

# Rows tokenized and packed together: a batch wastes at most block_size - 1 tokens at its end.
PACK_ROWS = 1_000


def check_streaming_args(args) -> None:
    """What --streaming needs, checked before anything is read."""
    if not args.streaming:
        return
    if args.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps (a stream has no length to count epochs in)")
    if not (args.train_file or args.dataset_name):
        raise ValueError("--streaming needs --train_file or --dataset_name")
    if args.train_file and not args.validation_file:
        raise ValueError("--streaming needs --validation_file (a stream has no tail to hold out for validation)")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")


def open_stream(train_files: list[str] | None, dataset_name: str | None, dataset_config_name: str | None,
                text_column: str) -> IterableDataset:
    """The training rows as an IterableDataset (nothing is read yet beyond the files' existence and format)."""
    if dataset_name:
        stream = datasets.load_dataset(dataset_name, dataset_config_name, split="train", streaming=True)
    else:
        builder = data_files_builder(list(train_files), "train")
        options = {"keep_linebreaks": True} if builder == "text" else {}
        stream = datasets.load_dataset(builder, data_files={"train": list(train_files)}, split="train",
                                       streaming=True, **options)
    columns = stream.column_names
    if columns is not None and text_column not in columns:  # json streams learn their columns only when read
        raise ValueError(f"the train data has no column {text_column!r} (columns: {', '.join(columns)}); "
                         "set the text column")
    return stream


def validation_rows(validation_file: str | None, dataset_name: str | None, dataset_config_name: str | None,
                    text_column: str) -> DatasetDict:
    """The fixed validation set of a streaming run: the validation file, else the Hub dataset's validation split."""
    if validation_file:
        return DatasetDict(validation=load_text_files([validation_file], "validation", text_column))
    return DatasetDict(validation=datasets.load_dataset(dataset_name, dataset_config_name, split="validation"))


def stream_blocks(stream: IterableDataset, tokenizer, block_size: int, text_column: str) -> IterableDataset:
    """Rows → `block_size` blocks of token ids (labels = input_ids), lazily."""
    check_block_size(block_size)
    rows = stream.select_columns([text_column])
    tokenized = rows.map(partial(tokenize_rows, tokenizer=tokenizer, text_column=text_column), batched=True,
                         batch_size=PACK_ROWS, remove_columns=[text_column])
    return tokenized.map(partial(pack_rows, block_size=block_size), batched=True, batch_size=PACK_ROWS,
                         remove_columns=["input_ids"])


class TrainStream:
    """Endless batches of this process's part of the blocks, on `device`, with the position as JSON."""

    def __init__(self, blocks: IterableDataset, batch_size: int, num_workers: int, rank: int, world_size: int,
                 device: torch.device):
        self.dataset = split_dataset_by_node(blocks, rank=rank, world_size=world_size).with_format("torch")
        self.loader = StatefulDataLoader(self.dataset, batch_size=batch_size, num_workers=num_workers)
        self.rank, self.device, self.passes, self.resumed = rank, device, 0, False

    def __iter__(self):
        while True:
            self.dataset.set_epoch(self.passes)
            empty = True
            for batch in self.loader:
                empty = False
                yield {name: tensor.to(self.device) for name, tensor in batch.items()}
            if empty and not self.resumed:  # a resume saved right at the end of a pass may find nothing left
                raise ValueError(f"process {self.rank}'s part of the training stream holds no block of the "
                                 "block size: more or longer data, or fewer processes")
            self.passes, self.resumed = self.passes + 1, False

    def state_dict(self) -> dict:
        """Where this process is in the stream: the pass, and every worker's shard and row (plain JSON)."""
        return {"passes": self.passes, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.passes, self.resumed = state["passes"], True
        self.loader.load_state_dict(state["loader"])


def resumed_position(state: TrainingState, streaming: bool, rank: int, world_size: int, path) -> dict | None:
    """This process's stream position in a checkpoint (None without --streaming); a checkpoint of the other kind,
    or of another number of processes, is refused by name."""
    saved = state.stream_positions
    if (saved is None) == streaming:
        kind = "with" if saved is not None else "without"
        raise BadCheckpoint(f"--resume_from_checkpoint {path} was saved by a run {kind} --streaming; resume it the same way")
    if saved is not None and len(saved) != world_size:
        raise BadCheckpoint(f"--resume_from_checkpoint {path} holds the stream positions of {len(saved)} processes, "
                            f"this run has {world_size}; resume a streaming run with the same number of processes")
    return saved[rank] if saved is not None else None


__all__ = ["TrainStream", "check_streaming_args", "open_stream", "resumed_position", "stream_blocks", "validation_rows"]
