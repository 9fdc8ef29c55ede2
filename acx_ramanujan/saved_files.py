"""Reading what `save_pretrained` and the Trainer wrote, without loading it: JSON objects and safetensors headers.

Each reader raises ValueError naming the file, so every command can turn a bad file into its one-line error.
"""

import json
from collections.abc import Iterable
from pathlib import Path

from safetensors import SafetensorError, safe_open


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
