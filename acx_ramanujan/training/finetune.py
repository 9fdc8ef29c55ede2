"""The Trainer side shared by the fine-tuning commands (causal LM and sequence classification).

- `ModelArguments`: the checkpoint to start from; `DataSourceArguments`: the data files or Hub dataset.
- `load_checkpoint_config` / `load_checkpoint_tokenizer`: fail before any work when the checkpoint cannot be fine-tuned.
- `check_columns`: the data has the named text columns, as text, without nulls.
- `ExpertLoadTrainer`: the Transformers `Trainer`, plus the MoE expert load in every training log.
- `run_cli` parses (HfArgumentParser over our dataclasses and `TrainingArguments`, so every Trainer flag works) and
  calls `finetune`, which builds the trainer (all checks happen here: bad input gives one line on stderr and exit
  status 2), then trains → evaluates → saves the model, `eval_results.json`, model card and, with LoRA, the merged model; then, with
  --push_to_hub, push the finished run once through `hub.push_to_hub` (`take_hub_push` says why not Trainer's push).
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict
from huggingface_hub import get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import HubStrategy

from ..cards import hardware_description, write_model_card

from ..commands import InputError, WorkFailed, run_command
from .data import load_raw_datasets
from ..hub import PUSH_ERRORS, hub_error_line, push_to_hub
from .lora import LoraArguments, apply_lora, save_merged
from ..modeling_ramanujan import RamanujanSparseMoeBlock, expert_load, update_router_biases
from ..files import WEIGHTS, WEIGHTS_INDEX, check_saved_weights, first_line, read_json_object, safetensors_shapes


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "The checkpoint to fine-tune: a local directory or a Hub id."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or Hub id, if not the one saved with the model."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with a Hub checkpoint (needed for models not installed here)."}
    )


@dataclass
class DataSourceArguments:
    """Where the data comes from (the names of Transformers' run_clm.py); each command adds its own columns."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset id (instead of --train_file)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: txt, json, jsonl, csv or parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, in the same format."})
    validation_split_percentage: float = field(
        default=5, metadata={"help": "Without validation data: the percentage of the training text held out (the last rows)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self):
        if not (self.train_file or self.dataset_name):
            raise ValueError("no training data: pass --train_file or --dataset_name")

    @property
    def dataset_label(self) -> str:
        """The name the model card gives the data."""
        return self.dataset_name or Path(self.train_file).name

    def load(self, required_column: str, column_is_text: bool = True) -> DatasetDict:
        """`train` and `validation` splits (`data.load_raw_datasets`), failing early when `required_column` is absent
        (or, with `column_is_text`, holds anything but strings)."""
        return load_raw_datasets(
            [self.train_file] if self.train_file else None,
            validation_file=self.validation_file,
            validation_split_percentage=self.validation_split_percentage,
            dataset_name=self.dataset_name,
            dataset_config_name=self.dataset_config_name,
            text_column=required_column,
            column_is_text=column_is_text,
        )


def load_checkpoint_config(model_args: ModelArguments, auto_class, head: str):
    """The checkpoint's config, after checking that `auto_class` (e.g. AutoModelForCausalLM) can build it.

    `head` names the wanted model kind in the error ("causal-LM", "sequence-classification").
    """
    path = model_args.model_name_or_path
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        raise ValueError(f"the checkpoint directory {path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a model config from {path!r}: {first_line(error)}") from error
    remote_classes = getattr(config, "auto_map", None) or {}
    if type(config) not in auto_class._model_mapping and auto_class.__name__ not in remote_classes:
        raise ValueError(
            f"{path!r} is a {config.model_type!r} checkpoint, which has no {head} model; "
            f"start from a Ramanujan checkpoint or another {head} model"
        )
    local = Path(path).expanduser()
    if (local / WEIGHTS).is_file() or (local / WEIGHTS_INDEX).is_file():
        check_saved_weights(local)  # a damaged or diverged checkpoint: one line now, not a traceback or NaN training
    return config


def load_checkpoint_tokenizer(model_args: ModelArguments, config):
    """The tokenizer saved with the checkpoint (or --tokenizer_name); its ids must fit the model's vocabulary."""
    source = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {source!r} ({first_line(error)}); pass --tokenizer_name") from error
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer from {source!r} has {len(tokenizer)} tokens but the model's vocabulary holds {vocab_size}"
        )
    return tokenizer


def check_columns(raw_datasets: DatasetDict, columns: list[str], text_columns: list[str]) -> None:
    """Every split has `columns`, none of them holds a null, and each of `text_columns` holds strings."""
    for split, dataset in raw_datasets.items():
        for column in columns:
            if column not in dataset.column_names:
                raise ValueError(
                    f"the {split} data has no column {column!r} (columns: {', '.join(dataset.column_names)})"
                )
            nulls = dataset.with_format("arrow")[column].null_count
            if nulls:
                raise ValueError(
                    f"the {split} data has {nulls} null value(s) in column {column!r}; drop or fill those rows"
                )
        for column in text_columns:
            dtype = getattr(dataset.features[column], "dtype", None)
            if dtype not in ("string", "large_string"):
                raise ValueError(f"column {column!r} of the {split} data holds {dataset.features[column]}, not text")


class ExpertLoadMeter:
    """Share of top-k assignments per expert of each MoE layer, averaged over training forwards since the last read.

    Forward hooks on the routers see every training batch (padding positions included); evaluation forwards
    are not counted. Reads `(expert_load_max, expert_load_min)`: 1/num_experts each at perfect balance.
    """

    def __init__(self, model: torch.nn.Module):
        blocks = [module for module in model.modules() if isinstance(module, RamanujanSparseMoeBlock)]
        self.sums: list[torch.Tensor | None] = [None] * len(blocks)
        self.counts = [0] * len(blocks)
        for index, block in enumerate(blocks):
            block.router.register_forward_hook(self._recorder(index, block))

    def _recorder(self, index: int, block: RamanujanSparseMoeBlock):
        def record(router, inputs, router_logits):
            if router.training:
                load = expert_load((router_logits.detach(),), block.top_k, (block.e_score_correction_bias,))[0]
                self.sums[index] = load if self.sums[index] is None else self.sums[index] + load
                self.counts[index] += 1

        return record

    def read_and_reset(self) -> dict[str, float]:
        loads = [total / count for total, count in zip(self.sums, self.counts) if count]
        self.sums, self.counts = [None] * len(self.sums), [0] * len(self.counts)
        if not loads:
            return {}
        loads = torch.stack(loads)
        return {"expert_load_max": loads.max().item(), "expert_load_min": loads.min().item()}


class RouterBiasUpdate(TrainerCallback):
    """After each optimizer step, one auxiliary-loss-free balancing step of the routers' biases
    (`update_router_biases`; nothing unless `config.router_bias_update_rate` > 0). `on_step_end` runs before the
    step's checkpoint is saved, so a resumed run starts from the updated biases. Not with LoRA: the biases are
    buffers of the frozen base model, which the saved adapter would not carry, so they stay as loaded."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and not isinstance(model, PeftModel):
            update_router_biases(model)


class ExpertLoadTrainer(Trainer):
    """`Trainer` whose training logs also carry `expert_load_max` / `expert_load_min` for MoE models, and which
    updates the routers' balancing biases after every optimizer step (`RouterBiasUpdate`).

    `Trainer.log` is the documented override point: a callback's `on_log` runs after the log is recorded.
    The MoE router losses need no code here: `RamanujanForCausalLM` adds them to `loss` whenever labels are
    given. (`RamanujanForSequenceClassification` does not, like Transformers' own MoE classifiers.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert_load_meter = ExpertLoadMeter(self.model)
        self.add_callback(RouterBiasUpdate)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.expert_load_meter.read_and_reset())
        super().log(logs, start_time)


def make_trainer(model, task_type: str, lora_args: LoraArguments, training_args, tokenizer, features: DatasetDict, **hooks):
    """Wrap `model` in LoRA adapters when asked (PEFT `task_type`), and build the trainer on its train and
    validation splits; `hooks`: data_collator, compute_metrics, preprocess_logits_for_metrics."""
    if lora_args.use_lora:
        model = apply_lora(model, lora_args, task_type)
    return ExpertLoadTrainer(
        model=model,
        args=training_args,
        train_dataset=features["train"],
        eval_dataset=features["validation"],
        processing_class=tokenizer,
        **hooks,
    )


def write_card(directory: Path, model, eval_results: dict, train_metrics: dict, training_args, model_args, dataset_name):
    """README.md model card for Ramanujan checkpoints (acx_ramanujan.cards); other architectures keep Trainer's files only."""
    config = model.config
    if config.model_type != "ramanujan":
        return
    config.architectures = [type(model).__name__]
    source = model_args.model_name_or_path
    training = {
        "steps": train_metrics.get("global_step"),
        "wall_time_s": train_metrics.get("train_runtime"),
        "hardware": hardware_description(training_args.device, training_args.world_size),
        "hyperparameters": {
            "model_name_or_path": source,
            "learning_rate": training_args.learning_rate,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "seed": training_args.seed,
        },
    }
    # The card's `base_model` must be a Hub id; a local directory is recorded among the hyperparameters only.
    base_model = None if Path(source).exists() else source
    write_model_card(directory, config, eval_results=eval_results, training=training, dataset_name=dataset_name, base_model=base_model)


@dataclass
class HubPush:
    """Where --push_to_hub sends the finished run; the token lives here only, never in TrainingArguments."""

    repo_id: str
    token: str | None
    private: bool
    revision: str | None


def take_hub_push(training_args: TrainingArguments, lora_args: LoraArguments) -> HubPush | None:
    """Take the Hub settings, and the token, out of `training_args`, so that Trainer neither pushes nor keeps the token.

    Trainer pickles its arguments, `hub_token` included, into training_args.bin in the output dir and in every
    checkpoint; with push_to_hub it also uploads every file of the output dir (those pickles too) from background
    threads during training, and replaces our model card with its own draft. So the token is removed from the
    arguments before the Trainer exists, and the finished run is pushed once, at the end, by `hub.push_to_hub`:
    the same checks, file list and single commit as `acx-rt push`. Checkpoint pushing (--hub_strategy checkpoint
    or all_checkpoints, which would upload optimizer state) is refused rather than silently not done.
    """
    token, training_args.hub_token = training_args.hub_token, None
    if not training_args.push_to_hub:
        return None
    training_args.push_to_hub = False
    if not training_args.do_train:
        raise ValueError("--push_to_hub needs --do_train: an evaluation-only run writes no model to push")
    if training_args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        raise ValueError(f"--hub_strategy {training_args.hub_strategy.value} is not supported: --push_to_hub uploads the "
                         "finished model once, at the end of the run (checkpoints stay local)")
    if lora_args.use_lora and not lora_args.merge_lora:
        raise ValueError("--push_to_hub with --use_lora needs --merge_lora: the Hub repository gets the merged model "
                         "(the adapter alone cannot be loaded without its base)")
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a valid repo id: {error}") from None
    if not (token or get_token()):
        raise ValueError("--push_to_hub needs a Hugging Face token: --hub_token, HF_TOKEN or `hf auth login`")
    return HubPush(repo_id, token, bool(training_args.hub_private_repo), training_args.hub_revision)


def train_evaluate_save(trainer: Trainer, model_args, lora_args: LoraArguments, dataset_name: str | None) -> dict:
    """Train (resuming when asked), save, evaluate into eval_results.json, write the card and the merged model."""
    args = trainer.args
    output_dir = Path(args.output_dir)
    train_metrics, eval_metrics = {}, {}
    if args.do_train:
        result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        train_metrics = {**result.metrics, "global_step": result.global_step}
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if not trainer.is_world_process_zero():
        return eval_metrics
    # With LoRA the card describes the base architecture the adapters belong to (the merged model is that object).
    card_model = trainer.model.get_base_model() if lora_args.use_lora else trainer.model
    if args.do_train:
        write_card(output_dir, card_model, eval_metrics, train_metrics, args, model_args, dataset_name)
    if lora_args.merge_lora:
        merged_dir = save_merged(trainer.model, trainer.processing_class, output_dir / "merged")
        write_card(merged_dir, card_model, eval_metrics, train_metrics, args, model_args, dataset_name)
    return eval_metrics


def parse_arguments(data_arguments_class: type, argv: list[str], prog: str):
    """HfArgumentParser over (ModelArguments, data arguments, LoraArguments, TrainingArguments).

    A single `.json` argument is read as a file of arguments, as in Transformers' example scripts. Without
    --do_train or --do_eval, both are on. --output_dir is required: the fine-tuned model is written there
    (TrainingArguments would otherwise default it to ./trainer_output, so it is checked before that default applies).
    A --resume_from_checkpoint must be a Trainer checkpoint directory (it holds trainer_state.json).
    """
    parser = HfArgumentParser((ModelArguments, data_arguments_class, LoraArguments, TrainingArguments), prog=prog)
    if len(argv) == 1 and argv[0].endswith(".json"):
        values = read_json_object(Path(argv[0]), kind="JSON file of arguments")
        given_output_dir = values.get("output_dir")
        parsed = parser.parse_dict(values)
    else:
        # The namespace before the dataclasses are built: output_dir is None here when the flag was not given.
        given_output_dir = parser.parse_known_args(args=argv)[0].output_dir
        parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, lora_args, training_args = parsed
    if not given_output_dir:
        raise ValueError("--output_dir is required: the directory the fine-tuned model is written to")
    if training_args.resume_from_checkpoint is not None:
        check_resume_checkpoint(training_args.resume_from_checkpoint)
    if not (training_args.do_train or training_args.do_eval):
        training_args.do_train = training_args.do_eval = True
    return model_args, data_args, lora_args, training_args


def check_resume_checkpoint(path: str) -> None:
    """What `Trainer.train(resume_from_checkpoint=path)` reads first: a directory with trainer_state.json."""
    if not Path(path).is_dir():
        raise ValueError(f"--resume_from_checkpoint {path} is not a directory: pass a checkpoint-STEP folder a run saved")
    if not (Path(path) / "trainer_state.json").is_file():
        raise ValueError(f"--resume_from_checkpoint {path} is not a Trainer checkpoint: it has no trainer_state.json")


def check_checkpoint_fits(model, checkpoint: str) -> None:
    """A resume loads the checkpoint's weights (or LoRA adapter) into `model`: refuse, naming a tensor, when they do
    not fit, instead of Trainer's size-mismatch traceback after setup. Reads only the safetensors headers."""
    expected = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()
    saved = safetensors_shapes(sorted(Path(checkpoint).glob("*.safetensors")))
    if saved and not saved.keys() & expected.keys():
        raise ValueError(f"--resume_from_checkpoint {checkpoint} holds none of this model's weights "
                         f"({'a LoRA adapter' if isinstance(model, PeftModel) else 'the model'} was expected)")
    for name in sorted(saved.keys() & expected.keys()):
        if saved[name] != tuple(expected[name].shape):
            raise ValueError(f"--resume_from_checkpoint {checkpoint} is from another model: {name} has shape "
                             f"{list(saved[name])} there and {list(expected[name].shape)} here")


def run_cli(argv: list[str] | None, data_arguments_class: type, build_trainer: Callable[..., Trainer], prog: str) -> int:
    """Parse (exit 2 on a bad command line), then `finetune` (bad input: exit 2; a failed push: exit 1)."""
    argv = sys.argv[1:] if argv is None else argv

    def work(parsed) -> None:
        finetune(*parsed, build_trainer=build_trainer, prog=prog)

    return run_command(prog, lambda: parse_arguments(data_arguments_class, argv, prog), work)


def finetune(model_args, data_args, lora_args: LoraArguments, training_args: TrainingArguments, *,
             build_trainer: Callable[..., Trainer], prog: str = "acx-rt finetune") -> dict:
    """Fine-tune as the four argument dataclasses say; the evaluation metrics.

    Every input check happens first (the Hub settings, then `build_trainer`: checkpoint, tokenizer, data), raising
    InputError before any training; then train, evaluate, save, and push the finished run when asked (WorkFailed
    if the push fails, the run being saved).
    """
    try:
        hub_push = take_hub_push(training_args, lora_args)
        trainer = build_trainer(model_args, data_args, lora_args, training_args)
        if training_args.resume_from_checkpoint is not None:
            check_checkpoint_fits(trainer.model, training_args.resume_from_checkpoint)
    except (ValueError, OSError) as error:
        raise InputError(str(error)) from error
    eval_metrics = train_evaluate_save(trainer, model_args, lora_args, data_args.dataset_label)
    if hub_push is None or not trainer.is_world_process_zero():
        return eval_metrics
    output_dir = Path(training_args.output_dir)
    pushed_dir = output_dir / "merged" if lora_args.merge_lora else output_dir
    try:
        commit = push_to_hub(pushed_dir, hub_push.repo_id, private=hub_push.private, revision=hub_push.revision,
                             token=hub_push.token, commit_message=f"{prog}: fine-tuned model")
    except PUSH_ERRORS as error:
        raise WorkFailed(f"the push to the Hub failed ({hub_error_line(error)}); the run is saved in {output_dir}") from None
    print(f"pushed {pushed_dir} to {commit.commit_url}")
    return eval_metrics
