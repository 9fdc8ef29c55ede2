"""Checkpoints of `acx-rt train`: what one holds, how it is written whole, and how it is read back without running
anybody's code.

A `checkpoint-STEP` folder holds exactly (one process, DDP):
  model.safetensors                    the weights (safetensors: tensors only, nothing to execute)
  optimizer.bin, scheduler.bin         Accelerate's `save_state`: AdamW moments and the schedule's step (torch.save);
  optimizer_1.bin, scheduler_1.bin     the same for Muon (`--optimizer muon`, the default)
  random_states_R.pkl (one per process) the Python, NumPy and torch RNG states (torch.save)
  config.json                          the model config: a resume refuses a different model by name
  training_state.json                  our own progress (`TrainingState`): plain JSON, never a pickle

torch.save writes pickles, and unpickling can run arbitrary code. So a resume refuses a folder holding any other
file, and opens every pickle first with `torch.load(weights_only=True)` (through `accelerate.utils.load`, which
also allows the NumPy arrays and dtypes of the RNG states): tensors, numbers, strings and containers load, anything else is refused with
the file named. Accelerate then loads them the same way (`load_kwargs={"weights_only": True}`). Our own state is
not registered with `register_for_checkpointing`: Accelerate would pickle it and read it back with
`weights_only=False` (`load_custom_state`).

Under FSDP (sharded state dict) the model and optimizer are saved by torch.distributed.checkpoint (DCP) instead:
`pytorch_model_fsdp_0/` and `optimizer_0/`, each holding exactly `.metadata` and one `__RANK_0.distcp` per process.
DCP reads tensors weights-only itself, but it unpickles `.metadata` with plain `pickle.load` and the non-tensor
values (the optimizer's lr, betas, ...) with `torch.load(weights_only=False)`. So a resume first unpickles each
`.metadata` admitting only DCP's own metadata classes (`_DCP_GLOBALS`), and opens every non-tensor value weights-only,
before DCP loads anything. DeepSpeed's and Megatron-LM's layouts are read by those engines' own loaders, which this
check cannot vouch for: resume only your own checkpoints there.
"""

import io
import os
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_MODEL_NAME, DistributedType
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from transformers.utils import CONFIG_NAME

from ..commands import InputError, WorkFailed
from ..configuration_ramanujan import RamanujanConfig
from ..files import first_line, read_json_object, safetensors_shapes, write_json_atomically

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
# Every file a plain (one-process or DDP) `save_state` writes, plus ours; the pickled ones are opened weights-only.
PICKLED_FILES = re.compile(r"(optimizer|scheduler)(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt")
OTHER_FILES = re.compile(rf"model(_\d+)?\.safetensors|{re.escape(CONFIG_NAME)}|{re.escape(TRAINING_STATE_NAME)}")
# FSDP's sharded save (torch.distributed.checkpoint): one folder per model and per optimizer.
DCP_FOLDERS = re.compile(r"pytorch_model_fsdp_\d+|optimizer_\d+")
DCP_FILES = re.compile(r"\.metadata|__\d+_\d+\.distcp")
# Engines that save their own layout and load it with their own code.
UNCHECKED_ENGINES = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
# What a DCP `.metadata` pickle may name (torch 2.x): DCP's metadata dataclasses, torch.Size, dtypes and layouts.
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class BadCheckpoint(InputError):
    """A checkpoint that cannot be resumed from: named in one line, nothing loaded."""


class SaveFailed(WorkFailed):
    """A checkpoint or final model that could not be written (disk full, file-size limit): named in one line."""


@dataclass
class TrainingState:
    """What a checkpoint needs beyond model/optimizer/scheduler/RNG to resume exactly (training_state.json)."""

    completed_steps: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    blocks_per_step: int = 0  # global batch: the data position is completed_steps × this, so a resume must match
    metrics_records: int = 0  # lines in metrics.jsonl when saved: a resume cuts the log back to them
    last_eval_step: int | None = None  # the last evaluation and its results: a finished run is not evaluated twice
    eval_results: dict = field(default_factory=dict)
    stream_positions: list | None = None  # --streaming: each process's position in its stream (TrainStream)

    @classmethod
    def from_json_file(cls, path: Path) -> "TrainingState":
        values = read_json_object(path, "training state")
        types = {item.name: item.type for item in fields(cls)}
        for name, value in values.items():
            if name not in types:
                raise BadCheckpoint(f"{path}: unknown field {name!r}")
            if isinstance(value, bool) or not isinstance(value, types[name]) or (
                    isinstance(value, (int, float)) and value < 0):
                raise BadCheckpoint(f"{path}: {name}={value!r} is not a valid {types[name]}")
        return cls(**values)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-STEP folders in output_dir, oldest first."""
    pattern = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
    found = [(int(m.group(1)), path) for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if path.is_dir() and (m := pattern.match(path.name))]
    return [path for _, path in sorted(found)]


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """`latest` → the highest checkpoint-STEP in output_dir; otherwise the given directory."""
    path = Path(spec)
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise BadCheckpoint(f"--resume_from_checkpoint latest: no {CHECKPOINT_PREFIX}STEP folder in {output_dir}")
        path = checkpoints[-1]
    if not (path / TRAINING_STATE_NAME).is_file():
        raise BadCheckpoint(f"--resume_from_checkpoint {path}: not a checkpoint folder written by acx-rt train "
                            f"(no {TRAINING_STATE_NAME}; the pickled state of versions before it is not loaded)")
    return path


def check_resume_config(path: Path, config: RamanujanConfig) -> None:
    """A checkpoint resumes the model it was saved from: name the config fields that differ (rather than fail later
    inside Accelerate on a weight shape)."""
    try:
        saved = RamanujanConfig.from_json_file(str(path / CONFIG_NAME)).to_dict()
    except (OSError, ValueError) as error:
        raise BadCheckpoint(f"--resume_from_checkpoint {path}: no readable {CONFIG_NAME} ({first_line(error)})") from None
    current = config.to_dict()
    bookkeeping = {"transformers_version", "architectures", "auto_map", "_name_or_path"}
    differing = sorted(key for key in saved.keys() | current.keys()
                       if key not in bookkeeping and saved.get(key) != current.get(key))
    if differing:
        details = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now" for key in differing)
        raise BadCheckpoint(f"--resume_from_checkpoint {path}: the model config differs ({details}); "
                            "resume with the same --config_name and --config_overrides")


def check_checkpoint_files(path: Path, distributed_type: DistributedType) -> None:
    """Refuse unexpected files, and any pickle that holds more than tensors, numbers, strings and containers."""
    for entry in sorted(path.iterdir()):
        if PICKLED_FILES.fullmatch(entry.name):
            try:
                # mmap: the tensors are mapped, not read, so checking costs little even for a large optimizer state.
                accelerate_load(entry, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # noqa: BLE001 - the weights-only unpickler raises several types; all refuse
                raise BadCheckpoint(f"--resume_from_checkpoint {path}: {entry.name} holds more than tensors and "
                                    f"numbers, refused unread ({first_line(error)})") from None
        elif OTHER_FILES.fullmatch(entry.name):
            if entry.suffix == ".safetensors":
                try:
                    safetensors_shapes([entry])
                except ValueError as error:
                    raise BadCheckpoint(f"--resume_from_checkpoint {path}: {error}") from None
        elif entry.is_dir() and DCP_FOLDERS.fullmatch(entry.name) and distributed_type == DistributedType.FSDP:
            check_dcp_folder(entry)
        elif distributed_type not in UNCHECKED_ENGINES:
            raise BadCheckpoint(f"--resume_from_checkpoint {path}: unexpected file {entry.name} (a checkpoint of "
                                "another program?), not loaded")


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata`, refusing every global but `_DCP_GLOBALS` and torch dtypes (the standard library's
    "restricting globals" recipe: DCP offers no weights-only way to read its metadata)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def check_dcp_folder(folder: Path) -> None:
    """A DCP folder of Accelerate's FSDP save: only `.metadata` and `__R_0.distcp` files, metadata of DCP's own
    classes, every stored item inside those files, every non-tensor value loadable weights-only."""
    def refuse(problem: str):
        return BadCheckpoint(f"--resume_from_checkpoint {folder.parent}: {folder.name}/{problem}, refused unread")

    names = {entry.name for entry in folder.iterdir()}
    if unexpected := sorted(name for name in names if not DCP_FILES.fullmatch(name)):
        raise refuse(f"{unexpected[0]} is not a file of torch.distributed.checkpoint")
    if ".metadata" not in names:
        raise refuse(".metadata is missing")
    try:
        with (folder / ".metadata").open("rb") as stream:
            metadata = _DCPMetadataUnpickler(stream).load()
        entries = metadata.storage_data.items()
        byte_items = {fqn for fqn, kind in metadata.state_dict_metadata.items() if isinstance(kind, BytesStorageMetadata)}
    except Exception as error:  # noqa: BLE001 - a refused global, a truncated file, a foreign object: all refuse
        raise refuse(f".metadata holds more than checkpoint metadata ({first_line(error)})") from None
    for index, info in entries:
        if info.relative_path not in names or not DCP_FILES.fullmatch(info.relative_path):
            raise refuse(f".metadata names {info.relative_path!r}, not a .distcp file of this folder")
        if index.fqn not in byte_items:
            continue  # a tensor: DCP reads tensors with weights_only=True itself
        if info.transform_descriptors:
            raise refuse(f"{info.relative_path}: {index.fqn} is stored transformed ({info.transform_descriptors})")
        with (folder / info.relative_path).open("rb") as stream:
            stream.seek(info.offset)
            value = stream.read(info.length)
        try:
            torch.load(io.BytesIO(value), weights_only=True)
        except Exception as error:  # noqa: BLE001 - as above
            raise refuse(f"{info.relative_path}: {index.fqn} holds more than tensors and numbers "
                         f"({first_line(error)})") from None


def load_checkpoint(accelerator: Accelerator, model: torch.nn.Module, path: Path) -> TrainingState:
    """Model, optimizer, scheduler and RNG states into the prepared objects; returns the training state."""
    check_checkpoint_files(path, accelerator.distributed_type)
    state = TrainingState.from_json_file(path / TRAINING_STATE_NAME)
    strict = check_checkpoint_weights(accelerator, model, path)
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": True}, strict=strict)
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as error:
        raise BadCheckpoint(f"--resume_from_checkpoint {path}: could not be loaded ({first_line(error)})") from None
    return state


def check_checkpoint_weights(accelerator: Accelerator, model: torch.nn.Module, path: Path) -> bool:
    """Refuse a weights file whose names differ from the prepared model's, naming them (torch's strict load would
    only say "Error(s) in loading state_dict"). It may lack only what the model says older files may lack (its
    `_keys_to_ignore_on_load_missing`, the rule `from_pretrained` applies: the MoE routing bias, zero until trained,
    that checkpoints saved before it existed do not hold); those keep their initial value. Returns whether the load
    can be strict. Only the plain layout is read here; FSDP's sharded load is checked by torch.distributed.checkpoint."""
    weights = path / f"{SAFE_MODEL_NAME}.safetensors"  # Accelerate's name for the first (our only) model
    if accelerator.distributed_type in (DistributedType.FSDP, *UNCHECKED_ENGINES) or not weights.is_file():
        return True
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)  # what Accelerate saves and loads
    saved, state = safetensors_shapes([weights]).keys(), unwrapped.state_dict()
    # safetensors writes tensors that share storage (tied embeddings) once, under one of their names.
    saved_storages = {state[key].untyped_storage().data_ptr() for key in saved & state.keys()}
    absent = [key for key in state.keys() - saved if state[key].untyped_storage().data_ptr() not in saved_storages]
    allowed = getattr(unwrapped, "_keys_to_ignore_on_load_missing", None) or []
    older = {key for key in absent if any(re.search(pattern, key) for pattern in allowed)}
    for problem, keys in (("lacks", sorted(set(absent) - older)), ("has unknown weights", sorted(saved - state.keys()))):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise BadCheckpoint(f"--resume_from_checkpoint {path}: {weights.name} {problem} {shown}")
    return not older


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainingState, save_total_limit: int | None,
                    config: RamanujanConfig) -> Path:
    """Write checkpoint-STEP whole or not at all: into `.checkpoint-STEP.partial`, renamed once complete; prune to
    the newest N. A failed write (disk full) on any process removes the partial folder and raises SaveFailed;
    every earlier checkpoint is left as it was."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.completed_steps}"
    partial = output_dir / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-save
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            config.to_json_file(partial / CONFIG_NAME)
            write_json_atomically(partial / TRAINING_STATE_NAME, asdict(state))
    except (OSError, RuntimeError, SafetensorError) as caught:  # torch.save reports a failed write as RuntimeError
        error = caught
    # Every process learns whether any of them failed, so none waits forever for the others.
    failures = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), reduction="sum")
    if failures.item():
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        detail = first_line(error) if error is not None else "another process failed"
        raise SaveFailed(f"could not write the checkpoint {final} ({detail}; disk full?); earlier checkpoints are kept")
    if accelerator.is_main_process:
        if final.exists():  # re-saving a step after resuming from an earlier checkpoint
            discard(final)
        os.replace(partial, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                discard(old)
    accelerator.wait_for_everyone()
    return final


def discard(checkpoint: Path) -> None:
    """Rename out of the checkpoint-STEP namespace first, so a kill mid-delete never leaves a half checkpoint that
    `latest` or a user could pick."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)
