"""What a pretraining run keeps beside its checkpoints: one run per output folder (a lock), the metrics log, and the
stop requests (SIGTERM, Ctrl-C) that end a run with a checkpoint instead of losing it."""

import argparse
import json
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from ..files import write_text_atomically

PROG = "acx-rt train"
METRICS_LOG = "metrics.jsonl"
LOCK_NAME = ".train.lock"


def check_output_dir_is_free(args: argparse.Namespace) -> None:
    """Refuse to mix two runs in one folder (checked by every process, with the lock held, before any writes)."""
    output_dir = Path(args.output_dir)
    holds_run = output_dir.is_dir() and any(entry.name != LOCK_NAME for entry in output_dir.iterdir())
    if holds_run and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        raise ValueError(
            f"--output_dir {output_dir} is not empty (another run?); pass --overwrite_output_dir, "
            "--resume_from_checkpoint, or another directory"
        )


@contextmanager
def output_dir_lock(accelerator: Accelerator, output_dir: Path):
    """One run per output dir: the main process holds an OS file lock (`filelock`) for the whole run, released when
    the run ends or its process dies, even by kill -9. The other processes of the same launch learn the outcome
    from it, so a refused launch stops on every process. A folder made here that is still empty at the end (bad
    input found before training) is removed again."""
    lock_file, refusal = output_dir / LOCK_NAME, None
    lock, created = FileLock(lock_file, timeout=0), not output_dir.exists()
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            refusal = f"--output_dir {output_dir} is in use by another {PROG} run (lock file {lock_file})"
    [refusal] = broadcast_object_list([refusal])
    if refusal:
        raise ValueError(refusal)
    try:
        yield
    finally:
        if lock.is_locked:
            if created and [entry.name for entry in output_dir.iterdir()] == [LOCK_NAME]:
                lock_file.unlink()  # while still held: a run starting now finds the lock taken, or no folder
                output_dir.rmdir()
            lock.release()


def remove_leftovers(output_dir: Path) -> None:
    """Half-written folders and files of a run that was killed (`.checkpoint-N.partial`, `.final.partial`, ...):
    with the lock held, no other run can be writing them."""
    for leftover in [*output_dir.glob(".*.partial*"), *output_dir.glob(".*.deleting")]:
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


class MetricsLog:
    """`output_dir/metrics.jsonl`: one JSON object per logged step or evaluation (main process only).

    `records` counts the lines written; a checkpoint saves it, and a resume keeps only that many lines, dropping
    what the interrupted run logged after its checkpoint (the resumed run logs it again).
    """

    def __init__(self, accelerator: Accelerator, path: Path, resume_records: int | None):
        self.accelerator, self.path, self.records = accelerator, path, 0
        if accelerator.is_main_process:
            kept = []
            if resume_records is not None and path.is_file():
                kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:resume_records]
                kept = [line for line in kept if line.endswith("\n")]  # a line cut by a kill is dropped
            write_text_atomically(path, "".join(kept))
            self.records = len(kept)

    def log(self, step: int, values: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as stream:
                stream.write(json.dumps({"step": step, **values}) + "\n")
            self.records += 1
        scalars = {name: value for name, value in values.items() if isinstance(value, (int, float))}
        self.accelerator.log(scalars, step=step)


@contextmanager
def stop_requests(accelerator: Accelerator):
    """SIGTERM / Ctrl-C set Accelerate's cross-process trigger; the loop checks it after each optimizer step."""
    received: list[int] = []

    def request_stop(signum, frame):
        received.append(signum)
        accelerator.set_trigger()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
