"""Files on disk, both ways: written whole or not at all, and read back (without loading) with one-line errors.

Writing: write beside the target under a temporary name, then rename once, so a reader (or a run interrupted
mid-write) never sees half a file. The temporary name is ordinary, so the file gets the usual umask permissions.

Reading what `save_pretrained` and the Trainer wrote (JSON objects, safetensors headers): each reader raises
ValueError naming the file, so every command can turn a bad file into its one-line error. `check_saved_weights`
is the one check that finetune, export, visualize and push run on a checkpoint's weights.
"""

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)`, then rename the result to `path`; the temporary is removed if writing fails.

    The temporary keeps `path`'s suffix, so writers that infer the format from it (matplotlib's savefig) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | os.PathLike, data) -> Path:
    """Indented JSON with a final newline (NaN and infinities written as JSON's extension allows)."""
    return write_text_atomically(path, json.dumps(data, indent=2) + "\n")


WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def first_line(error: BaseException) -> str:
    """The line of an exception's message that names the problem (library errors often add hints below it)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_json_object(path: Path, kind: str = "JSON file") -> dict:
    """A JSON file holding an object; `kind` says what the file should be in the error ("JSON file of arguments")."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not a readable {kind}: {first_line(error)}") from None
    if isinstance(values, dict):
        return values
    raise ValueError(f"{path} does not hold a JSON object")


def safetensors_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape over the given safetensors files, read from their headers (no tensor data)."""
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as weights:
                shapes.update({name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()})
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file} is not a readable safetensors file: {error}") from None
    return shapes


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files `from_pretrained(directory)` reads: `model.safetensors` (which Transformers prefers),
    else every shard `model.safetensors.index.json` names. ValueError when there are none or a shard is missing."""
    directory = Path(directory)
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    if not (directory / WEIGHTS_INDEX).is_file():
        raise ValueError(f"{directory} has no weights ({WEIGHTS} or {WEIGHTS_INDEX}): save with model.save_pretrained")
    weight_map = read_json_object(directory / WEIGHTS_INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{directory / WEIGHTS_INDEX} has no weight_map")
    names = sorted(set(map(str, weight_map.values())))
    absent = [name for name in names if not (directory / name).is_file()]
    if absent:
        raise ValueError(f"{directory}/{WEIGHTS_INDEX} names shard(s) that are missing: {', '.join(absent)}")
    return [directory / name for name in names]


def check_saved_weights(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint's weights is readable and finite; returns tensor name → shape.

    A truncated or corrupted file, or a NaN/inf anywhere, raises ValueError naming the file (and the first
    non-finite tensor) before any command trains on, exports or shares it. Tensors are read one at a time from
    the memory-mapped file, so checking a large checkpoint holds at most one tensor in memory.
    """
    shapes = {}
    for file in weight_files(directory):
        try:
            with safe_open(file, framework="pt") as weights:
                for name in weights.keys():
                    tensor = weights.get_tensor(name)
                    if tensor.is_floating_point() and not bool(torch.isfinite(finite_checkable(tensor)).all()):
                        raise ValueError(f"{file} holds non-finite values (NaN or inf) in {name}: refusing to use these "
                                         "weights (the training run that wrote them diverged, or the file is damaged)")
                    shapes[name] = tuple(tensor.shape)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file} is not a readable safetensors file: {first_line(error)}") from None
    return shapes


def finite_checkable(tensor: torch.Tensor) -> torch.Tensor:
    """float8 tensors have no `isfinite` kernel on every device: compare them in float16 (which holds all their values)."""
    return tensor.to(torch.float16) if tensor.element_size() == 1 else tensor
