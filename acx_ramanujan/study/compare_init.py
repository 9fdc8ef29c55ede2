"""`acx-rt compare-init`: train layers × variants × seeds with `pretrain` (`acx-rt train`'s loop) and compare validation loss.

A variant is an init scheme (`--schemes normal,ramanujan`) or a named set of config overrides
(`--variant "ram-no-embed:init_scheme=ramanujan,embedding_init_scheme=normal"`), so any ablation of the
initialization can be reproduced. Every run gets the same hyperparameters; runs with the same seed get the same
model seed and the same data order (the pretraining code seeds both from --seed), so variants are paired by seed.

Each run lives in OUTPUT_DIR/runs/<layers>L-<variant>-seed<k>/ and is reused when it already finished with the
same settings (its training_args.json: preset, overrides, steps, learning rate, batch, block size, seed; the
training file is not recorded there), so an interrupted comparison picks up where it stopped; a finished run with
other settings is refused before anything trains. Results: compare_init.json, compare_init.md, compare_init_loss.png.
A run counts as diverged when its final validation loss is NaN/inf or above its initial training loss.
"""

import argparse
import json
import math
import shlex
import statistics
import types
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt

from ..configuration_ramanujan import RamanujanConfig
from ..initialization_ramanujan import INIT_SCHEMES
from ..training.data import check_data_files
from ..commands import InputError, WorkFailed, run_command
from ..files import read_json_object, write_json_atomically, write_text_atomically
from ..reporting import markdown_table, parse_name_list, save_figure
from ..tokenization_ramanujan import RamanujanByteTokenizer
from ..training.progress import METRICS_LOG
from ..training.pretrain import build_config, pretrain, training_arguments


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acx-rt compare-init", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4", help="comma-separated layer counts, e.g. 4,12,48")
    parser.add_argument("--schemes", default="", help="comma-separated init schemes, each a variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDES",
                        help='a named variant, e.g. "normal-alpha0:init_scheme=normal,attention_scale_alpha=0" (repeatable)')
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..K-1 for every (layers, variant)")
    parser.add_argument("--moe", action="store_true", help="mixture-of-experts models (the tiny-moe preset)")
    parser.add_argument("--config_overrides", default="", help="overrides shared by every run (shape, etc.)")
    parser.add_argument("--train_file", default=None, help="training text (default: the pretraining default corpus)")
    parser.add_argument("--max_train_steps", type=int, required=True)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--per_device_train_batch_size", type=int, default=12)
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every problem found before the first run starts; config values are validated by building each config."""
    try:
        args.layers = [int(value) for value in args.layers.split(",") if value.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
    if not args.layers or min(args.layers) < 1:
        raise ValueError(f"--layers needs layer counts >= 1, got {args.layers}")
    for name in ("seeds", "max_train_steps", "block_size", "per_device_train_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    variants = {}
    if args.schemes:
        variants.update({scheme: f"init_scheme={scheme}" for scheme in parse_name_list(args.schemes, INIT_SCHEMES, "init scheme")})
    for spec in args.variant:
        name, sep, overrides = spec.partition(":")
        if not sep or not name.strip() or "=" not in overrides or "/" in name:
            raise ValueError(f"--variant {spec!r} is not of the form NAME:key=value,key=value")
        variants[name.strip()] = overrides
    if not variants:
        raise ValueError("nothing to compare: give --schemes and/or --variant")
    args.variants = variants
    if args.train_file is not None:
        check_data_files([str(args.train_file)])
    tokenizer = RamanujanByteTokenizer()  # what every run trains with
    for layers in args.layers:
        for name, overrides in variants.items():
            # The config checks `acx-rt train` makes (field values, vocab size, block size vs max positions).
            train_args = types.SimpleNamespace(config_name=preset(args), block_size=args.block_size,
                                               config_overrides=run_overrides(args, layers, overrides))
            try:
                build_config(train_args, tokenizer)
            except (ValueError, TypeError) as error:
                raise ValueError(f"variant {name!r} at {layers} layers: {error}") from None
    check_finished_runs(args)


def run_dir_of(args: argparse.Namespace, layers: int, name: str, seed: int) -> Path:
    return args.output_dir / "runs" / f"{layers}L-{name}-seed{seed}"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "all_results.json").is_file()


def expected_settings(args: argparse.Namespace, layers: int, overrides: str, seed: int) -> dict:
    """The training_args.json values (as `acx-rt train` writes them) of the run this comparison would train."""
    return {"config_name": preset(args), "config_overrides": run_overrides(args, layers, overrides),
            "max_train_steps": args.max_train_steps, "learning_rate": args.learning_rate,
            "block_size": args.block_size, "per_device_train_batch_size": args.per_device_train_batch_size,
            "seed": seed}


def planned_runs(args: argparse.Namespace):
    """(layers, variant name, variant overrides, seed, run directory) of every run, in training order."""
    for layers in args.layers:
        for name, overrides in args.variants.items():
            for seed in range(args.seeds):
                yield layers, name, overrides, seed, run_dir_of(args, layers, name, seed)


def check_finished_runs(args: argparse.Namespace) -> None:
    """A finished run is reused only if it was trained with this comparison's settings; otherwise refuse, naming it."""
    advice = "use another --output_dir or delete that run"
    for layers, _, overrides, seed, run_dir in planned_runs(args):
        if not is_finished(run_dir):
            continue
        try:
            trained = read_json_object(run_dir / "training_args.json")
        except ValueError:
            raise ValueError(f"finished run {run_dir} has no readable training_args.json, so its settings "
                             f"cannot be checked; {advice}") from None
        for key, value in expected_settings(args, layers, overrides, seed).items():
            if not same_setting(key, trained.get(key), value):
                raise ValueError(f"finished run {run_dir} was trained with {key}={trained.get(key)!r}, this comparison "
                                 f"would use {value!r}; {advice}")


def same_setting(key: str, old, new) -> bool:
    """Equal values; config overrides compare as parsed fields, so their order and spelling do not matter."""
    if old == new or key != "config_overrides" or not isinstance(old, str):
        return old == new
    try:
        return RamanujanConfig.parse_overrides(old) == RamanujanConfig.parse_overrides(new)
    except ValueError:  # e.g. a field this version no longer has
        return False


def preset(args: argparse.Namespace) -> str:
    return "tiny-moe" if args.moe else "tiny"


def run_overrides(args: argparse.Namespace, layers: int, variant_overrides: str) -> str:
    """Shared overrides, then the layer count, then the variant's own (later keys win)."""
    return ",".join(part for part in (args.config_overrides, f"num_hidden_layers={layers}", variant_overrides) if part)


def run_arguments(args: argparse.Namespace, layers: int, variant_overrides: str, seed: int, run_dir: Path):
    """The `pretrain` arguments of one run: the comparison's budget, this variant's config, this seed."""
    return training_arguments(
        config_name=preset(args),
        config_overrides=run_overrides(args, layers, variant_overrides),
        block_size=args.block_size,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        max_train_steps=args.max_train_steps,
        seed=seed,
        output_dir=str(run_dir),
        overwrite_output_dir=True,
        train_file=None if args.train_file is None else [str(args.train_file)],
        # The recipe docs/init-study.md measured (AdamW, fixed blocks, cosine to 0, fp32), not acx-rt train's newer
        # default (which also trains in bf16 where bf16 is native).
        optimizer="adamw", sampling="epochs", adam_beta2=0.999, lr_scheduler_type="cosine", num_warmup_steps=0,
        mixed_precision="no",
    )


def read_run(run_dir: Path) -> dict:
    """Final validation loss, initial (step-1) training loss, steps/s and the training-loss curve of a finished run."""
    results = json.loads((run_dir / "all_results.json").read_text())
    records = [json.loads(line) for line in (run_dir / METRICS_LOG).read_text().splitlines()]
    train_losses = [record["loss"] for record in records if "loss" in record]
    final, initial = results["eval_loss"], train_losses[0]
    return {
        "eval_loss": final,
        "initial_loss": initial,
        "diverged": not math.isfinite(final) or final > initial,
        "steps_per_second": results["train_steps"] / results["train_runtime_s"],
        "train_loss": train_losses,
    }


def run_all(args: argparse.Namespace) -> dict:
    """(layers, variant, seed) → run record; finished runs (checked by check_finished_runs) are read back."""
    runs = {}
    for layers, name, overrides, seed, run_dir in planned_runs(args):
        if not is_finished(run_dir):
            try:
                pretrain(run_arguments(args, layers, overrides, seed, run_dir))
            except (InputError, WorkFailed) as error:  # a run's input error is this comparison's failure
                raise WorkFailed(f"training run {run_dir} failed: {error}") from None
        runs[(layers, name, seed)] = read_run(run_dir)
    return runs


def summarize(args: argparse.Namespace, runs: dict) -> list[dict]:
    """Per (layers, variant): final val loss mean ± std over seeds, the paired Δ against the first variant, etc."""
    reference = next(iter(args.variants))
    rows = []
    for layers in args.layers:
        for name, overrides in args.variants.items():
            seeds = range(args.seeds)
            losses = [runs[(layers, name, seed)]["eval_loss"] for seed in seeds]
            deltas = [loss - runs[(layers, reference, seed)]["eval_loss"] for seed, loss in zip(seeds, losses)]
            rows.append({
                "layers": layers,
                "variant": name,
                "overrides": overrides,
                "runs": len(losses),
                "eval_loss_mean": statistics.fmean(losses),
                "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "delta_vs_reference_mean": statistics.fmean(deltas),
                "delta_vs_reference_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                "diverged": sum(runs[(layers, name, seed)]["diverged"] for seed in seeds),
                "initial_loss_mean": statistics.fmean(runs[(layers, name, seed)]["initial_loss"] for seed in seeds),
                "steps_per_second_median": statistics.median(runs[(layers, name, seed)]["steps_per_second"] for seed in seeds),
            })
    return rows


def markdown_report(args: argparse.Namespace, argv: list[str], rows: list[dict]) -> str:
    reference = next(iter(args.variants))
    table = markdown_table(
        ["layers", "variant", "final val loss (mean ± std)", f"Δ vs {reference} (paired)", "diverged",
         "initial loss", "steps/s (median)", "overrides"],
        [[row["layers"], row["variant"], f"{row['eval_loss_mean']:.4f} ± {row['eval_loss_std']:.4f}",
          f"{row['delta_vs_reference_mean']:+.4f} ± {row['delta_vs_reference_std']:.4f}",
          f"{row['diverged']}/{row['runs']}", row["initial_loss_mean"], row["steps_per_second_median"],
          f"`{row['overrides']}`"] for row in rows],
    )
    return "\n".join([
        f"# acx-rt compare-init{' (MoE)' if args.moe else ''}",
        "",
        f"Command: `acx-rt compare-init {shlex.join(argv)}`  ",
        f"Finished: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Seeds 0..{args.seeds - 1}, "
        f"{args.max_train_steps} steps, lr {args.learning_rate}, batch {args.per_device_train_batch_size}×{args.block_size} "
        f"tokens, preset {preset(args)}" + (f" with `{args.config_overrides}`" if args.config_overrides else "") + ". "
        "Δ: mean ± std over seeds of (variant − reference) with the same seed (same init seed and data order).",
        "",
        table,
    ])


def plot_curves(args: argparse.Namespace, runs: dict, path: Path, window: int = 20) -> None:
    """Training loss (moving average over `window` steps, mean over seeds) per variant; one panel per depth."""
    figure, axes = plt.subplots(1, len(args.layers), figsize=(5.5 * len(args.layers), 4), squeeze=False)
    for axis, layers in zip(axes[0], args.layers):
        for index, name in enumerate(args.variants):
            curves = [runs[(layers, name, seed)]["train_loss"] for seed in range(args.seeds)]
            length = min(len(curve) for curve in curves)
            mean = [statistics.fmean(curve[step] for curve in curves) for step in range(length)]
            smooth = [statistics.fmean(mean[max(0, step - window + 1) : step + 1]) for step in range(length)]
            color = plt.cm.tab20(2 * (index % 10) + (index // 10) % 2)  # 10 dark hues, then their light shades
            axis.plot(range(1, length + 1), smooth, label=name, color=color)
        axis.set(xlabel="step", ylabel=f"train loss ({window}-step mean)", title=f"{layers} layers")
        axis.legend(fontsize=7)
    save_figure(figure, path)


def main(argv: list[str]) -> int:
    return run_command("acx-rt compare-init", lambda: parse_args(argv), lambda args: report(args, argv, run_all(args)))


def report(args: argparse.Namespace, argv: list[str], runs: dict) -> None:
    rows = summarize(args, runs)
    records = {f"{layers}L-{name}-seed{seed}": {k: v for k, v in run.items() if k != "train_loss"}
               for (layers, name, seed), run in runs.items()}
    write_json_atomically(args.output_dir / "compare_init.json", {
        "command": ["acx-rt", "compare-init", *argv], "variants": args.variants, "summary": rows, "runs": records})
    write_text_atomically(args.output_dir / "compare_init.md", markdown_report(args, argv, rows))
    plot_curves(args, runs, args.output_dir / "compare_init_loss.png")
    print(markdown_report(args, argv, rows))
