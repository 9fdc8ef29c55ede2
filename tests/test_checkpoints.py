"""Checkpoints that can be trusted: nothing in one runs code, a finished run resumed changes nothing, one run per
output dir, a full disk costs no earlier checkpoint, and kill -9 anywhere (mid-save too) resumes exactly."""

import errno
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate_state
from safetensors.torch import load_file
from transformers import modeling_utils

from acx_ramanujan.training import pretrain
from acx_ramanujan.training.checkpoints import list_checkpoints
from test_pretraining import REPO_ROOT, read_jsonl, train_args

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
PRETRAIN = [sys.executable, str(REPO_ROOT / "training_scripts" / "pretrain.py")]


def file_digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != "metrics.jsonl"}


def assert_same_weights(expected: Path, actual: Path) -> None:
    expected_weights, actual_weights = load_file(expected), load_file(actual)
    assert expected_weights.keys() == actual_weights.keys()
    for name in expected_weights:
        assert torch.equal(expected_weights[name], actual_weights[name]), name


def assert_one_line_error(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("acx-rt train: error: ") and message in last, last


class WritesMarker:
    """Unpickling this creates `path`: what a crafted checkpoint file could do with any code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus) -> Path:
    """6 steps, checkpoints at 3 and 6, evaluation at 3 and at the end."""
    reset_accelerate_state()
    out = tmp_path_factory.mktemp("finished") / "run"
    assert pretrain.main(train_args(corpus, out, "--max_train_steps", "6", "--checkpointing_steps", "3",
                                       "--eval_steps", "3")) == 0
    return out


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "optimizer_1.bin",
                                  "random_states_0.pkl"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_unrun(tmp_path, corpus, finished_run, capsys, name):
    """Each file a resume reads (and the file Accelerate's registered objects come from) holding a pickle that runs
    code: refused in one line naming the file; the code never runs."""
    checkpoint = shutil.copytree(finished_run / "checkpoint-3", tmp_path / "checkpoint-3")
    marker = tmp_path / "code-ran"
    torch.save({"state": WritesMarker(marker)}, checkpoint / name)
    args = train_args(corpus, tmp_path / "out", "--max_train_steps", "6", "--resume_from_checkpoint", str(checkpoint))
    assert pretrain.main(args) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert_one_line_error(err, str(checkpoint))
    assert name in err.strip().splitlines()[-1]


def test_a_finished_run_resumed_trains_no_further(tmp_path, corpus, finished_run, capsys):
    """Run again with `--resume_from_checkpoint latest` (or killed during its final evaluation or save): no step past
    --max_train_steps, the same model, no line logged twice."""
    out = shutil.copytree(finished_run, tmp_path / "run")
    before = file_digests(out)
    log = (out / "metrics.jsonl").read_text()
    (out / "model.safetensors").unlink()  # as if killed while saving the final model
    assert pretrain.main(train_args(corpus, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")) == 0
    assert_same_weights(finished_run / "model.safetensors", out / "model.safetensors")
    assert (out / "metrics.jsonl").read_text() == log
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 6
    after = file_digests(out)
    for name in ("checkpoint-6/optimizer.bin", "eval_results.json", "config.json"):
        assert after[name] == before[name], name
    reset_accelerate_state()
    shorter = train_args(corpus, out, "--max_train_steps", "5", "--resume_from_checkpoint", "latest")
    assert pretrain.main(shorter) == 2
    assert_one_line_error(capsys.readouterr().err, "is at step 6, past --max_train_steps 5")


@pytest.mark.parametrize("name, content, message", [
    ("pytorch_model.bin", b"not ours", "unexpected file pytorch_model.bin"),
    ("training_state.json", b'{"completed_steps": "3"}', "completed_steps='3' is not a valid"),
    ("model.safetensors", b"garbage", "model.safetensors is not a readable safetensors file"),
])
def test_unexpected_or_damaged_files_in_a_checkpoint_are_refused(tmp_path, corpus, finished_run, capsys, name,
                                                                 content, message):
    checkpoint = shutil.copytree(finished_run / "checkpoint-3", tmp_path / "checkpoint-3")
    (checkpoint / name).write_bytes(content)
    args = train_args(corpus, tmp_path / "out", "--max_train_steps", "6", "--resume_from_checkpoint", str(checkpoint))
    assert pretrain.main(args) == 2
    assert_one_line_error(capsys.readouterr().err, message)


def limit_file_size(limit: int):
    """For the child: files may not grow past `limit` bytes, and a write past it fails with EFBIG (SIGXFSZ, which
    would kill the process instead, is ignored) - a full disk without filling one."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_write_failure_while_checkpointing_costs_nothing_earlier(tmp_path, corpus):
    """A file-size limit between the model's size and the optimizer state's: checkpoint-9 cannot be written.
    (AdamW for every weight, whose two moments outweigh the model; Muon's state is smaller than the model.)"""
    out, adamw = tmp_path / "run", ("--optimizer", "adamw", "--checkpointing_steps", "3")
    assert pretrain.main(train_args(corpus, out, "--max_train_steps", "6", *adamw)) == 0
    before = file_digests(out)
    model_size, optimizer_size = ((out / "checkpoint-6" / name).stat().st_size for name in ("model.safetensors", "optimizer.bin"))
    assert model_size < optimizer_size
    args = train_args(corpus, out, "--max_train_steps", "12", *adamw, "--resume_from_checkpoint", "latest")
    result = subprocess.run(PRETRAIN + args, capture_output=True, text=True, timeout=240,
                            preexec_fn=limit_file_size((model_size + optimizer_size) // 2))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"could not write the checkpoint {out / 'checkpoint-9'} (")
    assert "earlier checkpoints are kept" in result.stderr
    assert [path.name for path in out.iterdir() if "partial" in path.name] == []
    assert file_digests(out) == before  # checkpoints 3 and 6 and the finished model, byte for byte


def test_a_full_disk_while_saving_the_final_model_keeps_the_earlier_one(tmp_path, corpus, finished_run, monkeypatch,
                                                                        capsys):
    """A longer run resumed in a folder holding a finished model: ENOSPC while writing the new weights."""
    out = shutil.copytree(finished_run, tmp_path / "run")
    before = file_digests(out)

    def disk_full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full)  # what save_pretrained writes weights with
    assert pretrain.main(train_args(corpus, out, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")) == 1
    assert_one_line_error(capsys.readouterr().err, f"could not write the final model into {out} ([Errno 28] No space")
    assert [path.name for path in out.iterdir() if "partial" in path.name] == []
    assert file_digests(out) == before


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until `condition()` or the process ends."""
    deadline = time.monotonic() + timeout
    while not condition() and process.poll() is None:
        assert time.monotonic() < deadline, "the training run made no progress"
        time.sleep(0.005)


def logged_steps(out: Path) -> int:
    log = out / "metrics.jsonl"
    return sum('"loss"' in line for line in log.read_text().splitlines()) if log.is_file() else 0


def test_kill_9_anywhere_then_resume_equals_the_uninterrupted_run(tmp_path, corpus, capsys):
    """SIGKILL three times at seeded random points (once while a checkpoint is being written), resume each time:
    the final weights and losses equal an uninterrupted run's. While a run holds the output dir, a second one is
    refused in one line; a killed run leaves no lock behind."""
    steps = ("--max_train_steps", "20", "--checkpointing_steps", "1", "--gradient_accumulation_steps", "1")
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert pretrain.main(train_args(corpus, reference, *steps)) == 0
    rng = random.Random(0)
    kills = 0
    for attempt, mid_save in enumerate((False, True, False)):
        resume = ("--resume_from_checkpoint", "latest") if list_checkpoints(out) else ()
        with (tmp_path / f"attempt-{attempt}.log").open("w") as log:  # a file, not a pipe that could fill and block
            victim = subprocess.Popen(PRETRAIN + train_args(corpus, out, *steps, *resume), stdout=log, stderr=log)
        try:
            target = logged_steps(out) + rng.randint(1, 4)
            wait_for(lambda: logged_steps(out) >= target and list_checkpoints(out), victim)
            if attempt == 0:
                victim.send_signal(signal.SIGSTOP)  # paused mid-run, still holding the output dir
                reset_accelerate_state()
                second = train_args(corpus, out, *steps, "--overwrite_output_dir")
                assert pretrain.main(second) == 2
                assert_one_line_error(capsys.readouterr().err, f"--output_dir {out} is in use by another acx-rt train run")
                victim.send_signal(signal.SIGCONT)
            if mid_save:
                wait_for(lambda: any(out.glob(".checkpoint-*.partial")), victim)
            else:
                time.sleep(rng.uniform(0, 0.2))
            kills += victim.poll() is None
            victim.kill()
        finally:
            victim.kill()
            victim.wait()
    assert kills >= 2, "the runs finished before they could be killed"  # 3 here; a much faster machine may skip one
    reset_accelerate_state()
    assert pretrain.main(train_args(corpus, out, *steps, "--resume_from_checkpoint", "latest")) == 0
    assert_same_weights(reference / "model.safetensors", out / "model.safetensors")
    losses = [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in read_jsonl(reference / "metrics.jsonl") if "loss" in r]
