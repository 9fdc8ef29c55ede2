"""`acx-rt train --streaming`: the stream's parts over processes and dataloader workers hold every block exactly once
(txt/jsonl/parquet shards), an interrupted two-process streaming run resumes to the uninterrupted run's weights,
a local dataset folder streams like a Hub dataset, and the cached path tokenizes large data with several processes."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate_state
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file

from acx_ramanujan.training import data, pretrain
from acx_ramanujan.training.data import default_corpus_text
from acx_ramanujan.tokenization_ramanujan import RamanujanByteTokenizer
from acx_ramanujan.training.streaming import TrainStream, open_stream, stream_blocks
from test_fsdp import launch
from test_pretraining import TINY, read_jsonl

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
BLOCK = 32
SHARD_ROWS = (5, 7, 3, 6)  # unequal shards


def block_rows(count: int, start: int) -> list[str]:
    """Rows of exactly one block each (31 characters and a line break, one byte per token): however the rows are
    batched for packing, every block is one row, so blocks identify rows."""
    return [f"row {start + i:05d} " + "x" * 21 + "\n" for i in range(count)]


def write_shards(folder: Path, suffix: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = [], 0
    for index, count in enumerate(SHARD_ROWS):
        rows, path = block_rows(count, start), folder / f"part-{index}{suffix}"
        start += count
        if suffix == ".txt":
            path.write_text("".join(rows))
        elif suffix == ".jsonl":  # another column first: only the text column is streamed
            path.write_text("".join(json.dumps({"id": i, "text": row}) + "\n" for i, row in enumerate(rows)))
        else:
            Dataset.from_dict({"id": list(range(count)), "text": rows}).to_parquet(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("suffix, world_size, workers", [
    (".txt", 1, 0), (".txt", 2, 2), (".txt", 3, 2), (".jsonl", 2, 2), (".parquet", 2, 1),
], ids=["txt-1x0", "txt-2x2", "txt-3x2-rows", "jsonl-2x2", "parquet-2x1"])
def test_the_parts_of_every_process_and_worker_hold_each_block_once(tmp_path, suffix, world_size, workers):
    """3 processes do not divide 4 shards: then each process keeps every third block instead of whole shards."""
    paths = write_shards(tmp_path, suffix)
    blocks = stream_blocks(open_stream(paths, None, None, "text"), RamanujanByteTokenizer(), BLOCK, "text")
    seen = Counter()
    for rank in range(world_size):
        stream = TrainStream(blocks, batch_size=2, num_workers=workers, rank=rank, world_size=world_size,
                             device=torch.device("cpu"))
        for batch in stream.loader:  # one pass
            assert torch.equal(batch["labels"], batch["input_ids"])
            seen.update(bytes(block.tolist()).decode() for block in batch["input_ids"])
    expected = Counter(block_rows(sum(SHARD_ROWS), 0))
    assert seen == expected  # no block twice, none lost


def streaming_args(shards: list[str], validation: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--streaming", *[arg for path in shards for arg in ("--train_file", path)], "--validation_file",
            str(validation), "--config_overrides", TINY, "--block_size", str(BLOCK), "--per_device_train_batch_size",
            "2", "--learning_rate", "3e-3", "--dataloader_num_workers", "2", "--output_dir", str(output_dir), *extra]


@pytest.fixture
def text_shards(tmp_path) -> tuple[list[str], Path]:
    """4 shards of Python's help text (about 10 blocks each) and a validation file."""
    text = default_corpus_text()
    folder = tmp_path / "shards"
    folder.mkdir()
    shards = []
    for index in range(4):
        path = folder / f"part-{index}.txt"
        path.write_text(text[index * 330 : (index + 1) * 330])
        shards.append(str(path))
    validation = tmp_path / "validation.txt"
    validation.write_text(text[5000:5600])
    return shards, validation


def test_an_interrupted_two_process_streaming_run_resumes_to_the_same_weights(tmp_path, text_shards):
    """Each process reads 2 shards (about 20 blocks, 10 batches) with 2 workers: the 14 steps wrap around its part
    once, after the resume at step 7."""
    shards, validation = text_shards
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    steps = ("--max_train_steps", "14", "--checkpointing_steps", "7")
    launch(None, streaming_args(shards, validation, full, *steps))
    state = json.loads((full / "checkpoint-7" / "training_state.json").read_text())
    assert [position["passes"] for position in state["stream_positions"]] == [0, 0]  # per process, plain JSON
    last = json.loads((full / "checkpoint-14" / "training_state.json").read_text())
    assert [position["passes"] for position in last["stream_positions"]] == [1, 1]  # both wrapped around
    launch(None, streaming_args(shards, validation, resumed, *steps, "--resume_from_checkpoint",
                                str(full / "checkpoint-7")))

    full_weights, resumed_weights = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in full_weights:
        assert torch.equal(resumed_weights[name], full_weights[name]), name
    def after_7(log):
        return [(r["step"], r["loss"]) for r in log if "loss" in r and r["step"] > 7]

    assert after_7(read_jsonl(full / "metrics.jsonl")) == after_7(read_jsonl(resumed / "metrics.jsonl"))
    results = json.loads((resumed / "eval_results.json").read_text())
    assert math.isfinite(results["eval_loss"]) and results == json.loads((full / "eval_results.json").read_text())


def test_a_dataset_folder_streams_with_its_validation_split(tmp_path):
    """`--dataset_name` with a local folder goes through the same `load_dataset` calls as a Hub dataset."""
    write_shards(tmp_path / "corpus" / "train", ".txt")
    (tmp_path / "corpus" / "validation").mkdir()
    (tmp_path / "corpus" / "validation" / "part-0.txt").write_text("".join(block_rows(4, 100)))
    out = tmp_path / "run"
    args = ["--streaming", "--dataset_name", str(tmp_path / "corpus"), "--config_overrides", TINY, "--block_size",
            str(BLOCK), "--per_device_train_batch_size", "2", "--max_train_steps", "3", "--output_dir", str(out)]
    assert pretrain.main(args) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(results["eval_loss"])
    assert json.loads((out / "all_results.json").read_text())["train_tokens"] == 3 * 2 * BLOCK


@pytest.mark.parametrize("extra, drop_validation, message", [
    ((), False, "--streaming needs --max_train_steps (a stream has no length to count epochs in)"),
    (("--max_train_steps", "2"), True,
     "--streaming needs --validation_file (a stream has no tail to hold out for validation)"),
    (("--max_train_steps", "2", "--dataloader_num_workers", "-1"), False,
     "--dataloader_num_workers must be >= 0, got -1"),
], ids=["no-steps", "no-validation", "workers"])
def test_streaming_bad_input_is_one_line(tmp_path, text_shards, capsys, extra, drop_validation, message):
    shards, validation = text_shards
    args = streaming_args(shards, validation, tmp_path / "run", *extra)
    if drop_validation:
        at = args.index("--validation_file")
        del args[at : at + 2]
    assert pretrain.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"acx-rt train: error: {message}"
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_resumes_only_the_way_it_was_saved(tmp_path, text_shards, capsys):
    shards, validation = text_shards
    streamed = tmp_path / "streamed"
    assert pretrain.main(streaming_args(shards, validation, streamed, "--max_train_steps", "2",
                                           "--checkpointing_steps", "2")) == 0
    reset_accelerate_state()
    plain = ["--train_file", shards[0], "--validation_file", str(validation), "--config_overrides", TINY,
             "--block_size", str(BLOCK), "--per_device_train_batch_size", "2", "--max_train_steps", "2",
             "--output_dir", str(tmp_path / "plain"), "--resume_from_checkpoint", str(streamed / "checkpoint-2")]
    assert pretrain.main(plain) == 2
    assert "was saved by a run with --streaming; resume it the same way" in capsys.readouterr().err


def test_large_data_is_tokenized_by_several_processes_by_default(monkeypatch, capfd):
    """Without --preprocessing_num_workers: one process per ROWS_PER_PROCESS rows (here 10), the same blocks."""
    rows = DatasetDict(train=Dataset.from_dict({"text": block_rows(40, 0)}))
    tokenizer = RamanujanByteTokenizer()
    alone = data.tokenize_and_pack(rows, tokenizer, BLOCK, num_proc=1)
    monkeypatch.setattr(data, "ROWS_PER_PROCESS", 10)
    monkeypatch.setattr(data.os, "cpu_count", lambda: 2)
    capfd.readouterr()
    pooled = data.tokenize_and_pack(rows, tokenizer, BLOCK)
    assert "(num_proc=2)" in capfd.readouterr().err  # datasets' progress bar names the pool
    assert pooled["train"]["input_ids"] == alone["train"]["input_ids"]
    assert data.default_num_proc(10) is None and data.default_num_proc(10**9) == 2
