"""Writing study outputs: atomic JSON / markdown / PNG files and small markdown tables.

Every file is written under a temporary name and renamed, so an interrupted run leaves nothing half-written.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from .files import write_atomically  # noqa: E402


def save_figure(figure, path: Path) -> None:
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=110, bbox_inches="tight"))
    plt.close(figure)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def parse_name_list(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    """'a,b' → ['a', 'b'], each checked against `valid` (ValueError naming the bad one and listing the valid)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"no {what} given")
    for name in names:
        if name not in valid:
            raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    return names
