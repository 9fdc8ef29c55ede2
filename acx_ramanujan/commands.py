"""One exit convention for every command (`acx-rt ...` and the training_scripts launchers).

- Bad input (a flag, a file, a checkpoint the user named) is found before any work starts and reported as one line
  on stderr, exit status 2: `argparse`'s own convention for a bad command line, extended to everything the command
  reads. `InputError` marks bad input that can only be found once the work has started (a damaged checkpoint).
- A failure during the work (disk full, the Hub refusing a push, a training run of the study failing) is one line
  too, exit status 1 (`WorkFailed`), and says what was kept.
Anything else is a bug and keeps its traceback.
"""

import sys
from collections.abc import Callable
from typing import TypeVar

Checked = TypeVar("Checked")

# Packages of the optional extras (pyproject.toml) that some commands import: named in the error when missing.
OPTIONAL_PACKAGES = {"peft": "train", "matplotlib": "train", "tensorboard": "train",
                     "onnx": "export", "onnxruntime": "export", "onnxscript": "export", "gguf": "export"}


class InputError(ValueError):
    """Bad input found after the work started (exit status 2)."""


class WorkFailed(RuntimeError):
    """The work started and could not finish (exit status 1); the message says what was kept."""


def missing_extra_line(package: str, extra: str) -> str:
    return (f"needs the {package!r} package from the [{extra}] extra: pip install 'acx-ramanujan-transformer[{extra}]' "
            f"(in a clone: pip install -e '.[{extra}]')")


def run_command(prog: str, check: Callable[[], Checked], work: Callable[[Checked], int | None]) -> int:
    """`check()` reads and checks the input (ValueError/OSError there: exit 2); `work(checked)` does the job and may
    return its own exit status (a run stopped by a signal returns 128 + the signal number)."""
    try:
        checked = check()
    except (ValueError, OSError) as error:
        return report(prog, error, 2)
    try:
        return work(checked) or 0
    except InputError as error:
        return report(prog, error, 2)
    except (WorkFailed, OSError) as error:
        return report(prog, error, 1)


def report(prog: str, error: Exception, exit_status: int) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return exit_status
