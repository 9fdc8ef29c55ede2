"""`acx-rt train`: pretrain a dense or mixture-of-experts Ramanujan decoder with Accelerate.

The shape is Transformers' `examples/pytorch/language-modeling/run_clm_no_trainer.py` (same flag names, same
checkpoint/resume recipe), run through Accelerate so the same script works with `python`, `accelerate launch`
(DDP, FSDP, DeepSpeed; mixed precision: `precision.choose_precision`) and several CPU processes over gloo
(`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`; see training_scripts/accelerate_configs).

Recipe: text → byte (or BPE) tokens packed into blocks (`data.py`), read as random windows → Muon + AdamW with
warmup and a cosine schedule, gradient accumulation and clipping (`recipe.py`) → evaluation (loss, perplexity,
bits per byte; expert load for MoE) → checkpoints (`accelerator.save_state`, exact resume) → `save_pretrained` + tokenizer + model card.
With no data flags it trains the `tiny` preset on Python's own help text, so it runs offline anywhere.
"""

import argparse
import math
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, TorchDynamoPlugin, gather_object, set_seed
from datasets import DatasetDict
from huggingface_hub import get_token
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, SchedulerType, default_data_collator

from ..cards import hardware_description, write_model_card
from ..commands import InputError, WorkFailed, run_command
from ..configuration_ramanujan import RamanujanConfig
from ..files import first_line, write_json_atomically
from ..hub import PUSH_ERRORS, hub_error_line, push_to_hub
from ..modeling_ramanujan import RamanujanForCausalLM
from ..tokenization_ramanujan import RamanujanByteTokenizer
from .checkpoints import (BadCheckpoint, SaveFailed, TrainingState, check_resume_config, find_checkpoint,
                          list_checkpoints, load_checkpoint, save_checkpoint)
from .data import default_corpus_text, load_raw_datasets, text_to_dataset, tokenize_and_pack
from .evaluation import count_predicted_bytes, evaluate_model
from .progress import (METRICS_LOG, PROG, MetricsLog, check_output_dir_is_free, output_dir_lock, remove_leftovers,
                       stop_requests)
from .precision import choose_precision
from .recipe import Muon, RandomWindows, make_optimizers, make_schedulers
from .sharding import buffers_fsdp2_can_load, describe_launch, describe_shards, enable_fsdp_on_cpu
from .streaming import (TrainStream, check_streaming_args, open_stream, resumed_position, stream_blocks,
                        validation_rows)

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
    data.add_argument("--sampling", choices=["epochs", "windows"], default="epochs",
                      help="epochs: the fixed packed blocks, reshuffled every epoch; windows: each row starts at a "
                      "random offset of the training text (nanoGPT's batches; measured worse at the quality anchor's "
                      "budget, docs/benchmarks.md); --streaming reads the stream in order")
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
    model.add_argument("--mixed_precision", choices=["auto", "no", "bf16", "fp16"], default="auto",
                       help="auto: the launcher's --mixed_precision under `accelerate launch`; else bf16 autocast on a GPU "
                       "with bf16, fp32 (no) where bf16 is not native, and on a CPU with native bf16 the faster of the "
                       "two for this model, timed once and cached")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--per_device_train_batch_size", type=int, default=8, help="blocks per process per micro-batch")
    optim.add_argument("--per_device_eval_batch_size", type=int, default=8, help="blocks per process when evaluating")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--optimizer", choices=["muon", "adamw"],
                       help="muon: torch.optim.Muon for the decoder layers' matrices (and each MoE expert's), AdamW for "
                       "the rest; adamw: AdamW for all. Default: muon, or adamw under FSDP/DeepSpeed")
    optim.add_argument("--learning_rate", type=float, default=1e-3, help="peak AdamW learning rate")
    optim.add_argument("--muon_learning_rate", type=float, default=2e-3, help="peak Muon learning rate (match_rms_adamw)")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's beta1")
    optim.add_argument("--adam_beta2", type=float, default=0.99, help="AdamW's beta2")
    optim.add_argument("--weight_decay", type=float, default=0.1, help="decay of matrices (not norms)")
    optim.add_argument("--lr_scheduler_type", type=SchedulerType, default="cosine_with_min_lr",
                       choices=[kind.value for kind in SchedulerType], metavar="{cosine_with_min_lr,cosine,linear,...}",
                       help="learning-rate schedule (transformers.get_scheduler)")
    optim.add_argument("--min_lr_rate", type=float, default=0.1, help="cosine_with_min_lr's floor, a share of the peak")
    optim.add_argument("--num_warmup_steps", type=int, help="linear warmup steps (default: --warmup_ratio of the steps)")
    optim.add_argument("--warmup_ratio", type=float, default=0.01, help="share of the steps spent warming up")
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


def check_args(args: argparse.Namespace) -> None:
    """Errors a user can fix, found before any data is read."""
    positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_train_steps", "num_train_epochs", "eval_steps", "save_total_limit", "block_size")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if not (0 < args.learning_rate < math.inf and 0 < args.muon_learning_rate < math.inf) or not (
            0 <= args.max_grad_norm < math.inf and 0 <= args.weight_decay < math.inf):
        raise ValueError("--learning_rate and --muon_learning_rate must be finite and > 0; --max_grad_norm and "
                         "--weight_decay finite and >= 0")
    if (args.num_warmup_steps or 0) < 0 or not all(0 <= getattr(args, name) <= 1 for name in ("warmup_ratio", "min_lr_rate")):
        raise ValueError("--num_warmup_steps must be >= 0; --warmup_ratio and --min_lr_rate in [0, 1]")
    if not all(0 <= getattr(args, name) < 1 for name in ("adam_beta1", "adam_beta2")):
        raise ValueError("--adam_beta1 and --adam_beta2 must be in [0, 1)")
    if args.validation_file and not (args.train_file or args.dataset_name):
        raise ValueError("--validation_file needs --train_file (or --dataset_name)")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    if args.push_to_hub and not (args.hub_token or get_token()):
        raise ValueError("--push_to_hub needs a Hugging Face token: --hub_token, HF_TOKEN or `hf auth login`")
    check_streaming_args(args)


def load_pretraining_tokenizer(name: str | None):
    """The byte tokenizer, or a saved one (e.g. a BPE from `acx-rt tokenizer train`)."""
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
    overrides = RamanujanConfig.parse_overrides(args.config_overrides)
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


def hyperparameters(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    keys = ("config_name", "config_overrides", "block_size", "sampling", "per_device_train_batch_size",
            "gradient_accumulation_steps", "optimizer", "learning_rate", "muon_learning_rate", "adam_beta1",
            "adam_beta2", "weight_decay", "min_lr_rate", "num_warmup_steps", "warmup_ratio", "max_train_steps",
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


# ---------------------------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: parse_args(argv), lambda args: exit_status(pretrain(args)))


def training_arguments(**values) -> argparse.Namespace:
    """`acx-rt train`'s defaults with `values` in place (flag names without dashes): what code passes to `pretrain`."""
    args = parse_args([])
    unknown = sorted(set(values) - set(vars(args)))
    if unknown:
        raise ValueError(f"unknown training argument(s): {', '.join(unknown)}")
    return argparse.Namespace(**{**vars(args), **values})


def pretrain(args: argparse.Namespace) -> dict:
    """Train as `args` says (from `parse_args` or `training_arguments`); the results as in `all_results.json`, with
    `stopped_by` (a signal name) when a stop request ended the run at a checkpoint.

    Bad input raises InputError before any training (with every process of a launch); a failed save or push raises
    WorkFailed, saying what was kept.
    """
    with ExitStack() as run_scope:  # holds the output dir's lock until the run ends
        try:
            check_args(args)
            run = prepare(args, run_scope)
        except (ValueError, OSError) as error:  # bad input, found before training starts
            raise InputError(str(error)) from error
        return train(args, run)


def exit_status(results: dict) -> int:
    stopped_by = results.get("stopped_by")
    return 128 + signal.Signals[stopped_by].value if stopped_by else 0


@dataclass
class Run:
    """What `prepare` checked and built: the run's processes, tokenizer, config, packed blocks (--streaming: a plain
    dict whose train blocks are an IterableDataset, read only while training), and resume point."""

    accelerator: Accelerator
    tokenizer: object
    config: RamanujanConfig
    blocks: DatasetDict | dict
    resume_path: Path | None


def prepare(args: argparse.Namespace, run_scope: ExitStack) -> Run:
    """Everything that can fail on bad input: tokenizer, config, output dir, checkpoint, data; then Accelerate."""
    tokenizer = load_pretraining_tokenizer(args.tokenizer_name)
    config = build_config(args, tokenizer)
    precision = choose_precision(args.mixed_precision, config, (args.per_device_train_batch_size, args.block_size))
    accelerator = Accelerator(
        mixed_precision=precision.value,
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
    accelerator.print(describe_launch(accelerator) + f" ({precision.reason})")
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if args.optimizer is None:  # Muon orthogonalizes whole matrices, which FSDP and DeepSpeed shard
        args.optimizer = "adamw" if sharded else "muon"
    elif args.optimizer == "muon" and sharded:
        raise ValueError("--optimizer muon orthogonalizes whole matrices, which FSDP and DeepSpeed shard; "
                         "pass --optimizer adamw")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file")
    run_scope.enter_context(output_dir_lock(accelerator, output_dir))
    check_output_dir_is_free(args)
    resume_path = find_checkpoint(args.resume_from_checkpoint, output_dir) if args.resume_from_checkpoint else None
    if resume_path is not None:
        check_resume_config(resume_path, config)
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    with accelerator.main_process_first():
        if args.streaming:
            raw, text_column = validation_rows(args.validation_file, args.dataset_name, args.dataset_config_name,
                                               args.text_column), args.text_column
        else:
            raw, text_column = raw_text(args)
        blocks = tokenize_and_pack(raw, tokenizer, args.block_size, text_column=text_column,
                                   num_proc=args.preprocessing_num_workers)
        if args.streaming:
            blocks = {"train": stream_blocks(open_stream(args.train_file, args.dataset_name, args.dataset_config_name,
                                                         args.text_column), tokenizer, args.block_size, args.text_column),
                      "validation": blocks["validation"]}
    if accelerator.is_main_process:
        remove_leftovers(output_dir)
        if args.overwrite_output_dir and not resume_path:
            for stale in list_checkpoints(output_dir):
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return Run(accelerator, tokenizer, config, blocks, resume_path)


def raw_text(args: argparse.Namespace) -> tuple[DatasetDict, str]:
    """The train and validation text a run without --streaming reads, and its text column: the files or Hub dataset,
    else the default corpus (validation: the given file, else the tail of the training text)."""
    if args.train_file or args.dataset_name:
        return load_raw_datasets(args.train_file, args.validation_file, args.validation_split_percentage,
                                 args.dataset_name, args.dataset_config_name, args.text_column), args.text_column
    return text_to_dataset(default_corpus_text(), args.validation_split_percentage), "text"


@dataclass
class Loop:
    """The prepared (wrapped) training objects and the progress a resumed run starts from."""

    model: torch.nn.Module
    optimizers: list  # AdamW, then Muon (--optimizer muon)
    lr_schedulers: list  # one per optimizer
    train_dataloader: DataLoader | TrainStream
    eval_dataloader: DataLoader
    eval_bytes: float
    steps_per_epoch: int
    state: TrainingState


def train(args: argparse.Namespace, run: Run) -> dict:
    """The loop (nanoGPT's, through Accelerate): forward, backward, clip, step (and the MoE routers' balancing
    biases, when `router_bias_update_rate` > 0); log, evaluate, checkpoint, stop."""
    accelerator, config, output_dir = run.accelerator, run.config, Path(args.output_dir)
    loop = set_up(args, run)
    model, state = loop.model, loop.state
    metrics_log = MetricsLog(accelerator, output_dir / METRICS_LOG, state.metrics_records if run.resume_path else None)
    tokens_per_step = args.block_size * state.blocks_per_step
    step_loss, step_start = torch.zeros((), device=accelerator.device), time.perf_counter()
    routed_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # its routers' biases move each step
    with stop_requests(accelerator) as received, progress_bar(args, accelerator, state) as bar:
        for batch in remaining_batches(args, accelerator, loop):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                for optimizer in loop.optimizers:
                    optimizer.step()
                    optimizer.zero_grad()
            step_loss += loss.detach() / args.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            routed_model.update_router_biases()
            for lr_scheduler in loop.lr_schedulers:
                lr_scheduler.step()
            seconds, step_start = time.perf_counter() - step_start, time.perf_counter()
            state.completed_steps, state.tokens_seen = state.completed_steps + 1, state.tokens_seen + tokens_per_step
            state.train_seconds += seconds
            train_loss = accelerator.reduce(step_loss, reduction="mean").item()
            step_loss.zero_()
            lr = loop.lr_schedulers[0].get_last_lr()[0]  # AdamW's
            metrics_log.log(state.completed_steps, {"loss": train_loss, "learning_rate": lr,
                                                    "tokens_per_second": tokens_per_step / seconds})
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:,.0f}")
            if args.eval_steps and state.completed_steps % args.eval_steps == 0:
                evaluate(accelerator, loop, config, metrics_log)
            stop = accelerator.check_trigger()
            every = loop.steps_per_epoch if args.checkpointing_steps == "epoch" else args.checkpointing_steps
            if (every and state.completed_steps % every == 0) or stop:
                state.metrics_records = metrics_log.records
                if args.streaming:  # every process's position, gathered for the main process to write
                    state.stream_positions = gather_object([loop.train_dataloader.state_dict()])
                path = save_checkpoint(accelerator, output_dir, state, args.save_total_limit, config)
            if stop:
                bar.close()  # before the message below
                signum = received[0] if received else signal.SIGTERM
                accelerator.print(f"Stopped by {signal.Signals(signum).name}; resume with --resume_from_checkpoint {path}")
                accelerator.end_training()
                return {**results_of(state), "stopped_by": signal.Signals(signum).name}
            if state.completed_steps >= args.max_train_steps:
                break
            step_start = time.perf_counter()

    if state.last_eval_step != state.completed_steps:
        evaluate(accelerator, loop, config, metrics_log)
    save_final(args, accelerator, model, run.tokenizer, state)
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        try:
            push_to_hub(output_dir, args.hub_model_id, commit_message=f"{PROG}: {state.completed_steps} steps",
                        token=args.hub_token)
        except PUSH_ERRORS as error:
            raise WorkFailed(f"the push to the Hub failed ({hub_error_line(error)}); the run is saved in "
                             f"{output_dir}") from None
    return results_of(state)


def set_up(args: argparse.Namespace, run: Run) -> Loop:
    """Model, optimizer, loaders and schedule, wrapped by Accelerate; the resumed progress when resuming."""
    accelerator, blocks = run.accelerator, run.blocks
    model = RamanujanForCausalLM(run.config)
    eval_bytes = count_predicted_bytes(blocks["validation"], run.tokenizer)
    blocks["validation"].set_format("torch")
    # Loaders draw their worker seeds from their own generators, not the global RNG that dropout uses: starting
    # an (evaluation or resumed) iteration then leaves the training randomness exactly where it was.
    eval_dataloader = DataLoader(blocks["validation"], batch_size=args.per_device_eval_batch_size,
                                 collate_fn=default_data_collator, generator=torch.Generator().manual_seed(args.seed))
    blocks_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizers = make_optimizers(model, args, accelerator.device)
    if args.streaming:  # each process reads its own part of the stream (TrainStream): not for Accelerate to shard
        train_dataloader = TrainStream(blocks["train"], args.per_device_train_batch_size, args.dataloader_num_workers,
                                       accelerator.process_index, accelerator.num_processes, accelerator.device)
        with buffers_fsdp2_can_load(model, accelerator):
            model, *optimizers, eval_dataloader = accelerator.prepare(model, *optimizers, eval_dataloader)
        steps_per_epoch = args.max_train_steps  # a stream has no epochs: one "epoch" of all the steps
    else:
        # An epoch is one pass over the packed blocks (each process's loader: ceil(blocks / (batch × processes))
        # batches); its last batches form a (shorter) step of their own: Accelerate syncs at the end of a dataloader.
        batches_per_epoch = math.ceil(len(blocks["train"]) / (args.per_device_train_batch_size * accelerator.num_processes))
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * steps_per_epoch
        train_rows = blocks["train"].with_format("torch")
        if args.sampling == "windows":
            train_rows = RandomWindows(train_rows[:]["input_ids"].reshape(-1), args.block_size,
                                       args.max_train_steps * blocks_per_step, args.seed)
        train_dataloader = DataLoader(train_rows, shuffle=args.sampling == "epochs",
                                      batch_size=args.per_device_train_batch_size, collate_fn=default_data_collator,
                                      generator=torch.Generator().manual_seed(args.seed))
        with buffers_fsdp2_can_load(model, accelerator):
            model, *optimizers, train_dataloader, eval_dataloader = accelerator.prepare(
                model, *optimizers, train_dataloader, eval_dataloader)
    if accelerator.distributed_type == DistributedType.FSDP:
        # One write per line: two processes share the launcher's stdout, and print() writes the text and the
        # newline apart, so the ranks' lines could interleave.
        sys.stdout.write(describe_shards(model, accelerator) + "\n")
        sys.stdout.flush()
    lr_schedulers = [accelerator.prepare(scheduler) for scheduler in make_schedulers(args, optimizers)]
    state = TrainingState(blocks_per_step=blocks_per_step)
    if run.resume_path is not None:
        state = resumed_state(args, accelerator, model, run.resume_path, blocks_per_step)
        position = resumed_position(state, args.streaming, accelerator.process_index, accelerator.num_processes,
                                    run.resume_path)
        if position is not None:
            train_dataloader.load_state_dict(position)
    if args.with_tracking:
        accelerator.init_trackers("acx-rt-train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                          for k, v in hyperparameters(args, accelerator).items()})
    muon = next((o.optimizer for o in optimizers if isinstance(o.optimizer, Muon)), None)
    accelerator.print(
        f"{sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{'a stream of' if args.streaming else format(len(blocks['train']), ',')} train blocks of {args.block_size} "
        f"tokens; {args.max_train_steps} steps of {args.block_size * blocks_per_step:,} tokens"
        + (f"; Muon's Newton-Schulz iteration in {str(muon.ns_dtype).removeprefix('torch.')}" if muon else "")
    )
    return Loop(model, optimizers, lr_schedulers, train_dataloader, eval_dataloader, eval_bytes, steps_per_epoch, state)


def resumed_state(args, accelerator: Accelerator, model, resume_path: Path, blocks_per_step: int) -> TrainingState:
    """Load the checkpoint (weights, optimizer, schedule, RNG) and its progress; refuse one this run cannot continue."""
    state = load_checkpoint(accelerator, model, resume_path)
    if state.blocks_per_step != blocks_per_step:
        raise BadCheckpoint(f"{resume_path} was trained with {state.blocks_per_step} blocks per step, this run "
                            f"takes {blocks_per_step} (per-device batch × accumulation × processes); resume with "
                            "the same global batch")
    if state.completed_steps > args.max_train_steps:
        raise BadCheckpoint(f"{resume_path} is at step {state.completed_steps}, past --max_train_steps "
                            f"{args.max_train_steps}")
    accelerator.print(f"Resumed from {resume_path} at step {state.completed_steps}")
    return state


def remaining_batches(args, accelerator: Accelerator, loop: Loop):
    """The training batches from the loop's current step on: the run's random windows, or Accelerate's seeded
    epochs, skipped to where a resumed run stopped. A resumed run that had already finished its steps (killed while
    evaluating or saving, or run again) gets none: it only finishes the final evaluation and save."""
    start_step = loop.state.completed_steps
    if start_step >= args.max_train_steps:
        return
    if args.streaming:  # endless, and already at the resumed position (TrainStream.load_state_dict)
        yield from loop.train_dataloader
        return
    if args.sampling == "windows":  # one pass over the run's rows
        skip = start_step * args.gradient_accumulation_steps
        yield from accelerator.skip_first_batches(loop.train_dataloader, skip) if skip else loop.train_dataloader
        return
    start_epoch, step_in_epoch = divmod(start_step, loop.steps_per_epoch)
    for epoch in range(start_epoch, math.ceil(args.max_train_steps / loop.steps_per_epoch)):
        loop.train_dataloader.set_epoch(epoch)
        batches = loop.train_dataloader
        if epoch == start_epoch and step_in_epoch:
            batches = accelerator.skip_first_batches(batches, step_in_epoch * args.gradient_accumulation_steps)
        yield from batches


def progress_bar(args, accelerator: Accelerator, state: TrainingState) -> tqdm:
    return tqdm(total=args.max_train_steps, initial=state.completed_steps, desc="train",
                disable=not accelerator.is_local_main_process)


def evaluate(accelerator: Accelerator, loop: Loop, config: RamanujanConfig, metrics_log: MetricsLog) -> None:
    loop.state.eval_results = evaluate_model(accelerator, loop.model, loop.eval_dataloader, loop.eval_bytes, config)
    loop.state.last_eval_step = loop.state.completed_steps
    metrics_log.log(loop.state.completed_steps, loop.state.eval_results)


def results_of(state: TrainingState) -> dict:
    """`all_results.json`'s values: training progress, then the last evaluation."""
    return {
        "train_steps": state.completed_steps,
        "train_tokens": state.tokens_seen,
        "train_runtime_s": round(state.train_seconds, 3),
        "train_tokens_per_second": state.tokens_seen / max(state.train_seconds, 1e-9),
        **(state.eval_results or {}),
    }


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
        write_json_atomically(stage / "eval_results.json", eval_results)
        write_json_atomically(stage / "training_args.json", hyperparameters(args, accelerator))
        write_json_atomically(stage / "all_results.json", results_of(state))
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
