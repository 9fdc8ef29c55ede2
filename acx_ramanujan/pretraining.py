"""`acx-rt train`: pretrain a dense or mixture-of-experts Ramanujan decoder with Accelerate.

The shape is Transformers' `examples/pytorch/language-modeling/run_clm_no_trainer.py` (same flag names, same
checkpoint/resume recipe), run through Accelerate so the same script works with `python`, `accelerate launch`
(DDP, FSDP, DeepSpeed; mixed precision from the launcher) and several CPU processes over gloo
(`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`; see training_scripts/accelerate_configs).

Recipe: text → byte (or BPE) tokens packed into blocks (`data.py`) → AdamW + schedule with gradient
accumulation and clipping → evaluation (loss, perplexity, bits per byte; expert load for MoE) → checkpoints
(`accelerator.save_state`, exact resume) → `save_pretrained` + tokenizer + model card.
With no data flags it trains the `tiny` preset on Python's own help text, so it runs offline anywhere.
"""

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import typing
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedType, TorchDynamoPlugin, broadcast_object_list,
                               gather_object, set_seed)
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from huggingface_hub import get_token
from safetensors import SafetensorError
from transformers import AutoTokenizer, SchedulerType, default_data_collator, get_scheduler

from hub_cards import hardware_description, write_model_card

from .atomic_files import write_json_atomically, write_text_atomically
from .checkpoints import (BadCheckpoint, SaveFailed, TrainingState, check_resume_config, find_checkpoint,
                          list_checkpoints, load_checkpoint, save_checkpoint)
from .configuration_ramanujan import RamanujanConfig
from .data import default_corpus_text, load_raw_datasets, text_to_dataset, tokenize_and_pack
from .hub import PUSH_ERRORS, hub_error_line, push_to_hub
from .metrics import load_metric
from .modeling_ramanujan import RamanujanForCausalLM, expert_load
from .saved_files import first_line
from .tokenization_ramanujan import RamanujanByteTokenizer
from .training.sharding import describe_launch, describe_shards, enable_fsdp_on_cpu
from .training.streaming import (TrainStream, check_streaming_args, open_stream, resumed_position, stream_blocks,
                                 validation_rows)

PROG = "acx-rt train"
METRICS_LOG = "metrics.jsonl"
LOCK_NAME = ".train.lock"
DEFAULT_CORPUS_NAME = "pydoc_data.topics (Python's help text)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Pretrain a Ramanujan decoder with Accelerate. Without data flags: the tiny preset on Python's "
        "built-in help text (offline, about two minutes on a 2-core CPU).",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train_file", action="append", help="txt/json/jsonl/csv/parquet file (repeatable)")
    data.add_argument("--validation_file", help="validation data; default: the tail of the training text")
    data.add_argument("--validation_split_percentage", type=float, default=10,
                      help="share of the training text (its tail) held out for validation when no validation file")
    data.add_argument("--dataset_name", help="a Hub dataset (where the network allows)")
    data.add_argument("--dataset_config_name", help="the Hub dataset's configuration")
    data.add_argument("--text_column", default="text", help="column holding the text (json/csv/parquet/Hub)")
    data.add_argument("--block_size", type=int, default=256, help="tokens per training block (context length)")
    data.add_argument("--preprocessing_num_workers", type=int,
                      help="processes for tokenization and packing; default: one per 100k rows, up to one per core")
    data.add_argument("--streaming", action="store_true",
                      help="read the training data as a stream, tokenized and packed on the fly, never cached whole "
                           "(needs --max_train_steps, and --validation_file with --train_file)")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="--streaming: worker processes reading and tokenizing each process's part of the stream")

    model = parser.add_argument_group("model")
    model.add_argument("--config_name", default="tiny", help="preset name (tiny, tiny-moe, ...) or a config JSON path")
    model.add_argument("--config_overrides", help='config fields, e.g. "hidden_size=128,init_scheme=xavier"')
    model.add_argument("--tokenizer_name", help="a saved tokenizer directory (e.g. a trained BPE); None: the byte tokenizer")
    model.add_argument("--torch_compile", action="store_true",
                       help="compile the model with torch.compile (the launcher's --dynamo_backend, else inductor)")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--per_device_train_batch_size", type=int, default=8, help="blocks per process per micro-batch")
    optim.add_argument("--per_device_eval_batch_size", type=int, default=8, help="blocks per process when evaluating")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--learning_rate", type=float, default=1e-3, help="peak AdamW learning rate")
    optim.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay of matrices (not norms)")
    optim.add_argument("--lr_scheduler_type", type=SchedulerType, default="cosine",
                       choices=[kind.value for kind in SchedulerType], metavar="{linear,cosine,constant,...}", help="learning-rate schedule (transformers.get_scheduler)")
    optim.add_argument("--num_warmup_steps", type=int, default=0, help="linear warmup steps")
    optim.add_argument("--max_train_steps", type=int, help="optimizer steps; overrides --num_train_epochs")
    optim.add_argument("--num_train_epochs", type=int, default=3, help="passes over the training blocks")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    optim.add_argument("--seed", type=int, default=42, help="seeds the initialization, data order and dropout")

    run = parser.add_argument_group("outputs")
    run.add_argument("--output_dir", default="ramanujan-tiny", help="where the model, checkpoints and logs go")
    run.add_argument("--overwrite_output_dir", action="store_true", help="start over in an output dir holding a run")
    run.add_argument("--checkpointing_steps", type=steps_or_epoch, metavar="{N,epoch}",
                     help="save a checkpoint every N optimizer steps, or at the end of every epoch")
    run.add_argument("--save_total_limit", type=int, help="keep only the newest N checkpoints")
    run.add_argument("--resume_from_checkpoint", help="a checkpoint-STEP directory, or `latest` in --output_dir")
    run.add_argument("--eval_steps", type=int, help="evaluate every N optimizer steps (always at the end)")
    run.add_argument("--with_tracking", action="store_true", help="log to Accelerate trackers")
    run.add_argument("--report_to", default="all", help="tracker(s): tensorboard, wandb, ... or all installed")
    run.add_argument("--push_to_hub", action="store_true", help="push the output dir to the Hub at the end")
    run.add_argument("--hub_model_id", help="repo id for --push_to_hub (e.g. user/ramanujan-tiny)")
    run.add_argument("--hub_token", help="Hub token (default: the logged-in token)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- checking inputs


def steps_or_epoch(text: str) -> int | str:
    """`--checkpointing_steps`: a positive number of optimizer steps, or `epoch` (as in run_clm_no_trainer)."""
    if text == "epoch":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer or 'epoch', got {text!r}")


def parse_config_overrides(text: str | None) -> dict:
    """`"k=v,k=v"` → {field: typed value}; each value is parsed as its RamanujanConfig field's annotated type."""
    if not text:
        return {}
    annotations = RamanujanConfig.field_types()
    overrides = {}
    # Split on commas that start a new `name=`, so JSON values such as rope_parameters may hold commas.
    for item in re.split(r",(?=\s*\w+\s*=)", text):
        name, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ValueError(f"--config_overrides: {item!r} is not of the form key=value")
        if name not in annotations:
            raise ValueError(f"--config_overrides: unknown config field {name!r}")
        overrides[name] = _parse_typed(name, raw, annotations[name])
    return overrides


def _parse_typed(name: str, raw: str, annotation) -> object:
    """The first member of `annotation` (e.g. `int | None`) that `raw` parses as."""
    kinds = [typing.get_origin(kind) or kind for kind in (typing.get_args(annotation) or (annotation,))]
    if raw.lower() in ("none", "null") and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is bool and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        if kind in (int, float):
            try:
                return kind(raw)
            except ValueError:
                continue
        if kind in (dict, list):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(value, kind):
                return value
        if kind is str:
            return raw
    expected = " | ".join(getattr(kind, "__name__", str(kind)) for kind in kinds)
    raise ValueError(f"--config_overrides: {name}={raw!r} is not a valid {expected}")


def check_args(args: argparse.Namespace) -> None:
    """Errors a user can fix, found before any data is read."""
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_train_steps", "num_train_epochs", "eval_steps", "save_total_limit", "block_size")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if not (0 < args.learning_rate < math.inf) or args.num_warmup_steps < 0 or not (
            0 <= args.max_grad_norm < math.inf and 0 <= args.weight_decay < math.inf):
        raise ValueError("--learning_rate must be finite and > 0; --num_warmup_steps, --max_grad_norm, --weight_decay "
                         "finite and >= 0")
    if args.validation_file and not (args.train_file or args.dataset_name):
        raise ValueError("--validation_file needs --train_file (or --dataset_name)")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    if args.push_to_hub and not (args.hub_token or get_token()):
        raise ValueError("--push_to_hub needs a Hugging Face token: --hub_token, HF_TOKEN or `hf auth login`")
    check_streaming_args(args)


def check_output_dir(args: argparse.Namespace) -> None:
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


def load_tokenizer(name: str | None):
    if name is None:
        return RamanujanByteTokenizer()
    if not Path(name).is_dir():
        raise ValueError(f"--tokenizer_name {name}: not a directory holding a saved tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"--tokenizer_name {name}: no tokenizer could be loaded from it ({first_line(error)})") from None


def build_config(args: argparse.Namespace, tokenizer) -> RamanujanConfig:
    """The preset plus overrides; the special token ids are the tokenizer's (an override that differs is refused)."""
    overrides = parse_config_overrides(args.config_overrides)
    config = RamanujanConfig.from_preset(args.config_name, **overrides)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if name in overrides and overrides[name] != getattr(tokenizer, name):
            raise ValueError(f"--config_overrides: {name}={overrides[name]} differs from the tokenizer's "
                             f"{name} ({getattr(tokenizer, name)}); special token ids come from the tokenizer")
    if len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the config's vocab_size is {config.vocab_size}; "
            f"add vocab_size={len(tokenizer)} to --config_overrides"
        )
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if args.block_size > config.max_position_embeddings:
        raise ValueError(
            f"--block_size {args.block_size} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    return config


# ---------------------------------------------------------------------------------------------- training state


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


# ---------------------------------------------------------------------------------------------- evaluation


def count_predicted_bytes(dataset, tokenizer) -> float:
    """UTF-8 bytes behind the tokens the model predicts (all but each block's first), for bits per byte.

    Bytes per token is measured on the decoded validation stream: exact for the byte tokenizer (one byte per
    token), the corpus average for BPE, as in the bits-per-byte conversion of the Pile paper (Gao et al. 2020).
    """
    blocks = dataset["input_ids"]
    stream = [token for block in blocks for token in block]
    bytes_per_token = len(tokenizer.decode(stream).encode("utf-8")) / len(stream)
    predicted = sum(len(block) - 1 for block in blocks)
    return predicted * bytes_per_token


@torch.no_grad()
def evaluate_model(accelerator, model, dataloader, num_bytes: float, config: RamanujanConfig) -> dict:
    """Token-weighted loss, perplexity and bits per byte over the validation blocks; expert load for MoE.

    The NLL is the plain next-token cross-entropy (the MoE auxiliary losses are left out).
    """
    model.eval()
    metric = load_metric("perplexity")
    load_sum, load_batches = None, 0
    for batch in dataloader:
        outputs = model(input_ids=batch["input_ids"], output_router_logits=config.is_moe)
        logits, targets = outputs.logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(dim=1)
        predicted = torch.full_like(nll, targets.shape[1], dtype=torch.long)
        nll, predicted = accelerator.gather_for_metrics((nll, predicted))
        metric.add_batch(predictions=nll.tolist(), references=predicted.tolist())
        if config.is_moe:
            load = expert_load(outputs.router_logits, config.num_experts_per_tok)
            load_sum = load if load_sum is None else load_sum + load
            load_batches += 1
    model.train()
    result = metric.compute(num_bytes=num_bytes)
    results = {"eval_loss": result["loss"], "perplexity": result["perplexity"],
               "bits_per_byte": result["bits_per_byte"]}
    if config.is_moe:
        mean_load = accelerator.reduce(load_sum / load_batches, reduction="mean")
        results["expert_load"] = [[round(share, 6) for share in row] for row in mean_load.tolist()]
    return results


# ---------------------------------------------------------------------------------------------- the run


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and expert tensors only, not on norms (nanoGPT's `configure_optimizers`)."""
    params = [param for param in model.parameters() if param.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate)


def hyperparameters(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    keys = ("config_name", "config_overrides", "block_size", "per_device_train_batch_size",
            "gradient_accumulation_steps", "learning_rate", "weight_decay", "num_warmup_steps", "max_train_steps",
            "max_grad_norm", "seed")
    values = {key: getattr(args, key) for key in keys}
    values["lr_scheduler_type"] = SchedulerType(args.lr_scheduler_type).value
    values["num_processes"] = accelerator.num_processes
    values["mixed_precision"] = accelerator.mixed_precision
    values["global_batch_tokens"] = (args.block_size * args.per_device_train_batch_size
                                     * args.gradient_accumulation_steps * accelerator.num_processes)
    return values


def compile_plugin() -> TorchDynamoPlugin:
    """--torch_compile: torch.compile with the launcher's Dynamo backend (ACCELERATE_DYNAMO_BACKEND), else inductor."""
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
    return TorchDynamoPlugin(backend="inductor" if backend.lower() == "no" else backend)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as run_scope:  # holds the output dir's lock until the run ends
        try:
            check_args(args)
            run = prepare(args, run_scope)
        except (ValueError, OSError) as error:  # bad input, found before training starts
            return fail(error, 2)
        try:
            return train(args, *run)
        except BadCheckpoint as error:
            return fail(error, 2)
        except OSError as error:  # disk full or a file-size limit while writing (SaveFailed names the checkpoint)
            return fail(error, 1)


def fail(error: Exception, exit_code: int) -> int:
    print(f"{PROG}: error: {error}", file=sys.stderr)
    return exit_code


def prepare(args: argparse.Namespace, run_scope: ExitStack):
    """Everything that can fail on bad input: tokenizer, config, output dir, checkpoint, data; then Accelerate."""
    tokenizer = load_tokenizer(args.tokenizer_name)
    config = build_config(args, tokenizer)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # Seeded data order that checkpoints can restore (SeedableRandomSampler, epoch-dependent seed).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # The schedule advances once per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dynamo_plugin=compile_plugin() if args.torch_compile else None,
    )
    enable_fsdp_on_cpu(accelerator)
    accelerator.print(describe_launch(accelerator))
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file")
    run_scope.enter_context(output_dir_lock(accelerator, output_dir))
    check_output_dir(args)
    resume_path = find_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    if resume_path is not None:
        check_resume_config(resume_path, config)
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    with accelerator.main_process_first():
        if args.streaming:
            raw, text_column = validation_rows(args.validation_file, args.dataset_name, args.dataset_config_name,
                                               args.text_column), args.text_column
        elif args.train_file or args.dataset_name:
            raw, text_column = load_raw_datasets(args.train_file, args.validation_file, args.validation_split_percentage,
                                                 args.dataset_name, args.dataset_config_name, args.text_column), args.text_column
        else:
            raw, text_column = text_to_dataset(default_corpus_text(), args.validation_split_percentage), "text"
        blocks = tokenize_and_pack(raw, tokenizer, args.block_size, text_column=text_column,
                                   num_proc=args.preprocessing_num_workers)
        if args.streaming:  # a plain dict: the train blocks are an IterableDataset, read only while training
            blocks = {"train": stream_blocks(open_stream(args.train_file, args.dataset_name, args.dataset_config_name,
                                                         args.text_column), tokenizer, args.block_size, args.text_column),
                      "validation": blocks["validation"]}
    if accelerator.is_main_process:
        remove_leftovers(output_dir)
        if args.overwrite_output_dir and not resume_path:
            for stale in list_checkpoints(output_dir):
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return accelerator, tokenizer, config, blocks, resume_path


def remove_leftovers(output_dir: Path) -> None:
    """Half-written folders and files of a run that was killed (`.checkpoint-N.partial`, `.final.partial`, ...):
    with the lock held, no other run can be writing them."""
    for leftover in [*output_dir.glob(".*.partial*"), *output_dir.glob(".*.deleting")]:
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()


def train(args, accelerator: Accelerator, tokenizer, config: RamanujanConfig, blocks, resume_path: Path | None) -> int:
    output_dir = Path(args.output_dir)
    model = RamanujanForCausalLM(config)
    eval_bytes = count_predicted_bytes(blocks["validation"], tokenizer)
    blocks["validation"].set_format("torch")
    # Loaders draw their worker seeds from their own generators, not the global RNG that dropout uses: starting
    # an (evaluation or resumed) iteration then leaves the training randomness exactly where it was.
    eval_dataloader = DataLoader(blocks["validation"], batch_size=args.per_device_eval_batch_size,
                                 collate_fn=default_data_collator, generator=torch.Generator().manual_seed(args.seed))
    if args.streaming:  # each process reads its own part of the stream (TrainStream): not for Accelerate to shard
        train_dataloader = TrainStream(blocks["train"], args.per_device_train_batch_size, args.dataloader_num_workers,
                                       accelerator.process_index, accelerator.num_processes, accelerator.device)
        model, optimizer, eval_dataloader = accelerator.prepare(model, make_optimizer(model, args), eval_dataloader)
    else:
        train_dataloader = DataLoader(blocks["train"].with_format("torch"), shuffle=True,
                                      batch_size=args.per_device_train_batch_size, collate_fn=default_data_collator,
                                      generator=torch.Generator().manual_seed(args.seed))
        model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
            model, make_optimizer(model, args), train_dataloader, eval_dataloader)
    if accelerator.distributed_type == DistributedType.FSDP:
        print(describe_shards(model, accelerator), flush=True)  # every process: its own shards
    # The last batches of an epoch form a (shorter) step of their own: Accelerate syncs at the end of a dataloader.
    steps_per_epoch = args.max_train_steps if args.streaming else math.ceil(
        len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps))
    blocks_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    state = TrainingState(blocks_per_step=blocks_per_step)

    if resume_path is not None:
        state = load_checkpoint(accelerator, resume_path)
        if state.blocks_per_step != blocks_per_step:
            raise BadCheckpoint(f"{resume_path} was trained with {state.blocks_per_step} blocks per step, this run "
                                f"takes {blocks_per_step} (per-device batch × accumulation × processes); resume with "
                                "the same global batch")
        if state.completed_steps > args.max_train_steps:
            raise BadCheckpoint(f"{resume_path} is at step {state.completed_steps}, past --max_train_steps "
                                f"{args.max_train_steps}")
        position = resumed_position(state, args.streaming, accelerator.process_index, accelerator.num_processes,
                                    resume_path)
        if position is not None:
            train_dataloader.load_state_dict(position)
        accelerator.print(f"Resumed from {resume_path} at step {state.completed_steps}")
    start_step = state.completed_steps
    start_epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
    metrics_log = MetricsLog(accelerator, output_dir / METRICS_LOG, state.metrics_records if resume_path else None)
    if args.with_tracking:
        accelerator.init_trackers("acx-rt-train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                          for k, v in hyperparameters(args, accelerator).items()})

    tokens_per_step = args.block_size * blocks_per_step
    accelerator.print(
        f"{sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{'a stream' if args.streaming else format(len(blocks['train']), ',')} of train blocks of {args.block_size} "
        f"tokens; {args.max_train_steps} steps of {tokens_per_step:,} tokens"
    )
    step_loss = torch.zeros((), device=accelerator.device)
    # A resumed run that had already finished its steps (killed while evaluating or saving, or simply run again)
    # trains no further: it only finishes what was left, the final evaluation and save.
    epochs = range(start_epoch, num_epochs) if start_step < args.max_train_steps else range(0)
    bar = tqdm(total=args.max_train_steps, initial=start_step, desc="train", disable=not accelerator.is_local_main_process)
    with stop_requests(accelerator) as received, bar:
        for epoch in epochs:
            batches = train_dataloader
            if not args.streaming:
                train_dataloader.set_epoch(epoch)
            if epoch == start_epoch and step_in_epoch and not args.streaming:  # a stream resumes by its position
                batches = accelerator.skip_first_batches(train_dataloader, step_in_epoch * args.gradient_accumulation_steps)
            step_start = time.perf_counter()
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                step_loss += loss.detach() / args.gradient_accumulation_steps
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                seconds = time.perf_counter() - step_start
                state.completed_steps += 1
                state.tokens_seen += tokens_per_step
                state.train_seconds += seconds
                step = state.completed_steps
                train_loss = accelerator.reduce(step_loss, reduction="mean").item()
                step_loss.zero_()
                lr = lr_scheduler.get_last_lr()[0]
                metrics_log.log(step, {"loss": train_loss, "learning_rate": lr, "tokens_per_second": tokens_per_step / seconds})
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:,.0f}")

                if args.eval_steps and step % args.eval_steps == 0:
                    state.eval_results = evaluate_model(accelerator, model, eval_dataloader, eval_bytes, config)
                    state.last_eval_step = step
                    metrics_log.log(step, state.eval_results)
                every = steps_per_epoch if args.checkpointing_steps == "epoch" else args.checkpointing_steps
                stop = accelerator.check_trigger()
                if (every and step % every == 0) or stop:
                    state.metrics_records = metrics_log.records
                    if args.streaming:  # every process's position, gathered for the main process to write
                        state.stream_positions = gather_object([train_dataloader.state_dict()])
                    path = save_checkpoint(accelerator, output_dir, state, args.save_total_limit, config)
                if stop:
                    bar.close()  # before the message below
                    signum = received[0] if received else signal.SIGTERM
                    accelerator.print(f"Stopped by {signal.Signals(signum).name}; resume with "
                                      f"--resume_from_checkpoint {path}")
                    accelerator.end_training()
                    return 128 + signum
                if step >= args.max_train_steps:
                    break
                step_start = time.perf_counter()
            if state.completed_steps >= args.max_train_steps:
                break

    if state.last_eval_step != state.completed_steps:
        state.eval_results = evaluate_model(accelerator, model, eval_dataloader, eval_bytes, config)
        metrics_log.log(state.completed_steps, state.eval_results)
    save_final(args, accelerator, model, tokenizer, state)
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        try:
            push_to_hub(output_dir, args.hub_model_id, commit_message=f"{PROG}: {state.completed_steps} steps",
                        token=args.hub_token)
        except PUSH_ERRORS as error:
            print(f"{PROG}: error: the push to the Hub failed ({hub_error_line(error)}); the run is saved in {output_dir}",
                  file=sys.stderr)
            return 1
    return 0


def save_final(args, accelerator: Accelerator, model, tokenizer, state: TrainingState) -> None:
    """Model (safetensors + remote code), tokenizer, results and model card, staged then moved into output_dir.

    A failed write (disk full) removes the stage and raises SaveFailed; the model already in output_dir (of an
    earlier, shorter run) is then left as it was.
    """
    output_dir = Path(args.output_dir)
    stage = output_dir / ".final.partial"
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # get_state_dict gathers FSDP / DeepSpeed shards; a compiled model's names carry torch.compile's `_orig_mod.`.
    state_dict = {name.removeprefix("_orig_mod."): tensor for name, tensor in accelerator.get_state_dict(model).items()}
    eval_results = state.eval_results
    if not accelerator.is_main_process:  # the gather above was the collective part; writing is the main process's
        return  # (another process inside save_pretrained(stage) raced the main one's move of the stage: ENOENT)
    try:
        unwrapped.save_pretrained(stage, state_dict=state_dict)
        tokenizer.save_pretrained(stage)
        train_results = {
            "train_steps": state.completed_steps,
            "train_tokens": state.tokens_seen,
            "train_runtime_s": round(state.train_seconds, 3),
            "train_tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
        }
        write_json_atomically(stage / "eval_results.json", eval_results)
        write_json_atomically(stage / "training_args.json", hyperparameters(args, accelerator))
        write_json_atomically(stage / "all_results.json", {**train_results, **eval_results})
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(stage, ignore_errors=True)
        raise SaveFailed(f"could not write the final model into {output_dir} ({first_line(error)}; disk full?); the "
                         "checkpoints and any earlier model there are kept") from None
    for item in stage.iterdir():
        os.replace(item, output_dir / item.name)
    stage.rmdir()
    dataset = args.dataset_name or ", ".join(Path(f).name for f in args.train_file or []) or DEFAULT_CORPUS_NAME
    write_model_card(output_dir, unwrapped.config, eval_results=eval_results, dataset_name=dataset, training={
        "steps": state.completed_steps,
        "tokens": state.tokens_seen,
        "wall_time_s": round(state.train_seconds, 1),
        "hardware": hardware_description(accelerator.device, accelerator.num_processes),
        "hyperparameters": hyperparameters(args, accelerator),
    })
    accelerator.print(f"Saved the model, tokenizer and model card to {output_dir}: eval_loss "
                      f"{eval_results['eval_loss']:.4f}, bits per byte {eval_results['bits_per_byte']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
