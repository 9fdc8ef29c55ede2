"""Files written whole or not at all: write beside the target under a temporary name, then rename once.

A reader (or a run interrupted mid-write) never sees half a file. The temporary name is ordinary, so the file gets
the usual permissions from the umask.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path


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
