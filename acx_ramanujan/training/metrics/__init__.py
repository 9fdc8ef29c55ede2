"""The package's `evaluate` metrics, loaded by local path so nothing is fetched from the Hub.

Each metric is a standard `evaluate` module in its own folder: `metrics/<name>/<name>.py`.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).parent


def load_metric(name: str):
    """`evaluate.load` on the bundled module `name` (e.g. "perplexity", "accuracy", "f1")."""
    import evaluate

    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"unknown metric {name!r}; bundled metrics: {', '.join(available) or 'none'}")
    return evaluate.load(str(path))
