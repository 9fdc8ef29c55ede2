"""`acx-rt compare-init`: train layers × variants × learning rates × seeds with `pretrain` (`acx-rt train`'s loop) and
compare validation loss.

A variant is an init scheme (`--schemes normal,ramanujan`) or a named set of config overrides
(`--variant "ram-no-embed:init_scheme=ramanujan,embedding_init_scheme=normal"`), so any ablation of the
initialization, or depth scheme, can be reproduced. Every run gets the same hyperparameters; runs with the same seed
get the same model seed and the same data order (the pretraining code seeds both from --seed), so variants are
paired by seed. With several learning rates (`--learning_rates 5e-4,1e-3,2e-3`) every (layers, variant) is trained
at each, and the report gives the best one per depth next to the one transferred from the smallest depth.

Each run lives in OUTPUT_DIR/runs/<layers>L-<variant>[-lr<lr>]-seed<k>/ (the learning rate only when it is not the
default 1e-3, so that a grid reuses the runs of a comparison at the default rate) and is reused when it already finished with the same settings (its training_args.json: preset, overrides, steps, learning
rate, optimizer and, under Muon, Muon's rate, betas, warmup, batch, block size, seed; the training file is not
recorded there), so an interrupted
comparison picks up where it stopped; a finished run with other settings is refused before anything trains.
Each finished run is probed once (depth_probes.json beside it, on the first validation blocks): residual-stream
RMS and per-layer gradient norms at initialization and at the end, and the validation-loss change when each layer is
skipped. Results: compare_init.json, compare_init.md, compare_init_loss.png, compare_init_depth.png (loss against
depth per variant) and compare_init_residual.png (residual RMS per layer).
A run counts as diverged when its final validation loss is NaN/inf or above its initial training loss.
"""

import argparse
import json
import math
import shlex
import statistics
import types
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from accelerate.utils import set_seed

from ..configuration_ramanujan import RamanujanConfig
from ..initialization_ramanujan import INIT_SCHEMES
from ..modeling_ramanujan import RamanujanForCausalLM
from ..training.data import check_data_files, tokenize_and_pack
from ..commands import InputError, WorkFailed, run_command
from ..files import read_json_object, write_json_atomically, write_text_atomically
from ..reporting import markdown_table, parse_name_list, save_figure
from . import STUDY_ARCHITECTURE
from ..tokenization_ramanujan import RamanujanByteTokenizer
from ..training.progress import METRICS_LOG
from ..training.pretrain import build_config, pretrain, raw_text, training_arguments
from .probes import layer_drop_losses, layer_gradient_norms, residual_rms_per_layer

DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_MUON_LEARNING_RATE = training_arguments().muon_learning_rate  # acx-rt train's
PROBES = "depth_probes.json"
# Validation blocks the probes read (the first ones): enough for stable per-layer numbers, few enough that the
# layer-drop probe's one forward per layer stays cheap at 128 layers.
PROBE_BLOCKS = 4


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acx-rt compare-init", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", "--depths", dest="layers", default="4", help="comma-separated layer counts, e.g. 4,12,48")
    parser.add_argument("--schemes", default="", help="comma-separated init schemes, each a variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDES",
                        help='a named variant, e.g. "normal-alpha0:init_scheme=normal,attention_scale_alpha=0" (repeatable)')
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..K-1 for every (layers, variant)")
    parser.add_argument("--moe", action="store_true", help="mixture-of-experts models (the tiny-moe preset)")
    parser.add_argument("--config_overrides", default="", help="overrides shared by every run (shape, etc.)")
    parser.add_argument("--train_file", default=None, help="training text (default: the pretraining default corpus)")
    parser.add_argument("--max_train_steps", type=int, required=True)
    parser.add_argument("--learning_rate", "--learning_rates", dest="learning_rates", default=str(DEFAULT_LEARNING_RATE),
                        help="peak AdamW learning rate, or comma-separated rates: one run per rate")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                        help="adamw: the study's recipe; muon: acx-rt train's (Muon for the decoder matrices)")
    parser.add_argument("--muon_learning_rate", type=float, default=DEFAULT_MUON_LEARNING_RATE,
                        help="peak Muon learning rate with --optimizer muon (--learning_rates stays AdamW's)")
    parser.add_argument("--warmup_ratio", type=float, default=0.0, help="share of the steps spent warming up linearly")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
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
    try:
        args.learning_rates = [float(value) for value in args.learning_rates.split(",") if value.strip()]
    except ValueError:
        raise ValueError(f"--learning_rates must be comma-separated numbers, got {args.learning_rates!r}") from None
    if not args.learning_rates or not all(0 < rate < math.inf for rate in args.learning_rates):
        raise ValueError(f"--learning_rates must be finite and > 0, got {args.learning_rates}")
    if len(set(args.learning_rates)) != len(args.learning_rates):
        raise ValueError(f"--learning_rates has a repeated rate: {args.learning_rates}")
    if not 0 < args.muon_learning_rate < math.inf:
        raise ValueError(f"--muon_learning_rate must be finite and > 0, got {args.muon_learning_rate}")
    if args.muon_learning_rate != DEFAULT_MUON_LEARNING_RATE and args.optimizer != "muon":
        raise ValueError("--muon_learning_rate applies only with --optimizer muon")
    if not 0 <= args.warmup_ratio < 1:
        raise ValueError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    for name in ("seeds", "max_train_steps", "block_size", "per_device_train_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    variants = {}
    if args.schemes:  # the deepnorm scheme with DeepNet's post-norm layers, which it is written for (as acx-rt verify)
        variants.update({scheme: f"init_scheme={scheme}" + (",deepnorm=true" if scheme == "deepnorm" else "")
                         for scheme in parse_name_list(args.schemes, INIT_SCHEMES, "init scheme")})
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


def run_name(layers: int, name: str, learning_rate: float, seed: int) -> str:
    """<layers>L-<variant>[-lr<rate>]-seed<k>: the rate only when it is not the default."""
    rate = f"-lr{learning_rate:g}" if learning_rate != DEFAULT_LEARNING_RATE else ""
    return f"{layers}L-{name}{rate}-seed{seed}"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "all_results.json").is_file()


# The training_args.json keys of the recipe every run of one comparison shares; the grid varies the rest (learning
# rate, seed, config overrides). Muon's rate is part of the recipe only under Muon.
RECIPE_KEYS = ("config_name", "max_train_steps", "optimizer", "adam_beta1", "adam_beta2", "num_warmup_steps",
               "block_size", "per_device_train_batch_size")


def recipe_keys(optimizer: str | None) -> tuple[str, ...]:
    return RECIPE_KEYS + (("muon_learning_rate",) if optimizer == "muon" else ())


def recorded_recipe(trained: dict) -> dict:
    """The recipe part of a finished run's training_args.json (None where a key is missing)."""
    return {key: trained.get(key) for key in recipe_keys(trained.get("optimizer"))}


def recipe_settings(args: argparse.Namespace) -> dict:
    """The recipe part of expected_settings, as `acx-rt train` writes it."""
    computed = {"config_name": preset(args), "num_warmup_steps": warmup_steps(args)}
    return {key: computed[key] if key in computed else getattr(args, key) for key in recipe_keys(args.optimizer)}


def expected_settings(args: argparse.Namespace, run: "PlannedRun") -> dict:
    """The training_args.json values (as `acx-rt train` writes them) of the run this comparison would train."""
    return {**recipe_settings(args), "config_overrides": run_overrides(args, run.layers, run.overrides),
            "learning_rate": run.learning_rate, "seed": run.seed}


@dataclass(frozen=True)
class PlannedRun:
    layers: int
    name: str  # the variant's
    overrides: str
    learning_rate: float
    seed: int
    run_dir: Path

    @property
    def key(self) -> tuple:
        return self.layers, self.name, self.learning_rate, self.seed


def planned_runs(args: argparse.Namespace):
    """Every run, in training order: by depth, variant, learning rate, seed."""
    for layers in args.layers:
        for name, overrides in args.variants.items():
            for learning_rate in args.learning_rates:
                for seed in range(args.seeds):
                    run_dir = args.output_dir / "runs" / run_name(layers, name, learning_rate, seed)
                    yield PlannedRun(layers, name, overrides, learning_rate, seed, run_dir)


def check_finished_runs(args: argparse.Namespace) -> None:
    """A finished run is reused only if it was trained with this comparison's settings; otherwise refuse, naming it."""
    advice = "use another --output_dir or delete that run"
    for run in planned_runs(args):
        run_dir = run.run_dir
        if not is_finished(run_dir):
            continue
        try:
            trained = read_json_object(run_dir / "training_args.json")
        except ValueError:
            raise ValueError(f"finished run {run_dir} has no readable training_args.json, so its settings "
                             f"cannot be checked; {advice}") from None
        for key, value in expected_settings(args, run).items():
            if not same_setting(key, trained.get(key), value):
                raise ValueError(f"finished run {run_dir} was trained with {key}={trained.get(key)!r}, this comparison "
                                 f"would use {value!r}; {advice}")


def same_setting(key: str, old, new) -> bool:
    """Equal values; config overrides compare as parsed fields, so their order and spelling do not matter, and a run
    recorded before the study named its block (STUDY_ARCHITECTURE) was trained in that block."""
    if old == new or key != "config_overrides" or not isinstance(old, str):
        return old == new
    try:
        return {**STUDY_ARCHITECTURE, **RamanujanConfig.parse_overrides(old)} == {
            **STUDY_ARCHITECTURE, **RamanujanConfig.parse_overrides(new)}
    except ValueError:  # e.g. a field this version no longer has
        return False


def preset(args: argparse.Namespace) -> str:
    return "tiny-moe" if args.moe else "tiny"


def run_overrides(args: argparse.Namespace, layers: int, variant_overrides: str) -> str:
    """The study's block (STUDY_ARCHITECTURE), the shared overrides, the layer count, then the variant's own (later
    keys win)."""
    study = ",".join(f"{name}={str(value).lower()}" for name, value in STUDY_ARCHITECTURE.items())
    return ",".join(part for part in (study, args.config_overrides, f"num_hidden_layers={layers}", variant_overrides)
                    if part)


def warmup_steps(args: argparse.Namespace) -> int:
    """--warmup_ratio in steps, rounded as `acx-rt train` rounds it."""
    return round(args.warmup_ratio * args.max_train_steps)


def run_arguments(args: argparse.Namespace, run: PlannedRun):
    """The `pretrain` arguments of one run: the comparison's budget, this variant's config, rate and seed."""
    return training_arguments(
        config_name=preset(args),
        config_overrides=run_overrides(args, run.layers, run.overrides),
        block_size=args.block_size,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=64,
        learning_rate=run.learning_rate,
        muon_learning_rate=args.muon_learning_rate,
        max_train_steps=args.max_train_steps,
        seed=run.seed,
        output_dir=str(run.run_dir),
        overwrite_output_dir=True,
        train_file=None if args.train_file is None else [str(args.train_file)],
        # The recipe docs/init-study.md measured (by default AdamW, fixed blocks, cosine to 0, no warmup, fp32), not
        # acx-rt train's newer default (which also trains in bf16 where bf16 is native).
        optimizer=args.optimizer, sampling="epochs", adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        lr_scheduler_type="cosine", num_warmup_steps=warmup_steps(args), mixed_precision="no",
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
    """(layers, variant, learning rate, seed) → run record with its probes; finished runs (checked by
    check_finished_runs) are read back, and probed if they were not yet."""
    runs, probe_ids = {}, None
    for run in planned_runs(args):
        if not is_finished(run.run_dir):
            try:
                pretrain(run_arguments(args, run))
            except (InputError, WorkFailed) as error:  # a run's input error is this comparison's failure
                raise WorkFailed(f"training run {run.run_dir} failed: {error}") from None
        if not has_probes(run.run_dir):
            probe_ids = probe_ids if probe_ids is not None else probe_batch(args, run)
            write_json_atomically(run.run_dir / PROBES, probe(run.run_dir, run.seed, probe_ids))
        runs[run.key] = {**read_run(run.run_dir), "probes": read_json_object(run.run_dir / PROBES)}
    return runs


def probe_batch(args: argparse.Namespace, run: PlannedRun) -> torch.Tensor:
    """The first PROBE_BLOCKS validation blocks of the runs' data (the same for every run): (blocks, block_size)."""
    raw, text_column = raw_text(run_arguments(args, run))
    validation = tokenize_and_pack(raw, RamanujanByteTokenizer(), args.block_size, text_column=text_column)["validation"]
    rows = validation.select(range(min(PROBE_BLOCKS, len(validation))))
    return torch.tensor(rows["input_ids"])


def has_probes(run_dir: Path) -> bool:
    try:
        return read_json_object(run_dir / PROBES).get("probe_blocks") == PROBE_BLOCKS
    except ValueError:  # missing or unreadable: probe again
        return False


def probe(run_dir: Path, seed: int, input_ids: torch.Tensor) -> dict:
    """Per-layer measurements of a finished run: residual RMS (embeddings, then after each layer) and weight-gradient
    norms at initialization and at the end; the loss change when each layer is skipped, at the end.

    The initial model is rebuilt as `pretrain` builds it: the run's config, `set_seed(seed)`, then the model."""
    config = RamanujanConfig.from_pretrained(run_dir)
    set_seed(seed)
    models = {"init": RamanujanForCausalLM(config), "final": RamanujanForCausalLM.from_pretrained(run_dir)}
    record = {"probe_blocks": PROBE_BLOCKS, "tokens": list(input_ids.shape)}
    for stage, model in models.items():
        model.eval()
        _, grad_norms = layer_gradient_norms(model, input_ids)
        record[stage] = {"residual_rms": residual_rms_per_layer(model, input_ids), "grad_norm": grad_norms}
    loss, dropped = layer_drop_losses(models["final"], input_ids)
    record["layer_drop"] = {"loss": loss, "delta": [value - loss for value in dropped]}
    return record


def summarize(args: argparse.Namespace, runs: dict) -> list[dict]:
    """Per (layers, variant, learning rate): final val loss mean ± std over seeds, the paired Δ against the first
    variant at the same rate, divergences, and the probes' summaries (`probe_summary`)."""
    reference = next(iter(args.variants))
    rows = []
    for layers in args.layers:
        for name, overrides in args.variants.items():
            for rate in args.learning_rates:
                group = [runs[(layers, name, rate, seed)] for seed in range(args.seeds)]
                losses = [run["eval_loss"] for run in group]
                deltas = [loss - runs[(layers, reference, rate, seed)]["eval_loss"] for seed, loss in enumerate(losses)]
                rows.append({
                    "layers": layers,
                    "variant": name,
                    "learning_rate": rate,
                    "overrides": overrides,
                    "runs": len(losses),
                    "eval_loss_mean": statistics.fmean(losses),
                    "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                    "delta_vs_reference_mean": statistics.fmean(deltas),
                    "delta_vs_reference_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                    "diverged": sum(run["diverged"] for run in group),
                    "initial_loss_mean": statistics.fmean(run["initial_loss"] for run in group),
                    "steps_per_second_median": statistics.median(run["steps_per_second"] for run in group),
                    **probe_summary([run["probes"] for run in group]),
                })
    return rows


def probe_summary(probes: list[dict]) -> dict:
    """Means over seeds: residual RMS after the last layer / of the embeddings and first / last layer gradient norm,
    at init and at the end; the largest and the median loss change when one layer is skipped."""
    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator else math.nan

    summary = {}
    for stage in ("init", "final"):
        summary[f"rms_last_over_embedding_{stage}"] = statistics.fmean(
            ratio(record[stage]["residual_rms"][-1], record[stage]["residual_rms"][0]) for record in probes)
        summary[f"grad_first_over_last_{stage}"] = statistics.fmean(
            ratio(record[stage]["grad_norm"][0], record[stage]["grad_norm"][-1]) for record in probes)
    summary["layer_drop_max"] = statistics.fmean(max(record["layer_drop"]["delta"]) for record in probes)
    summary["layer_drop_median"] = statistics.fmean(statistics.median(record["layer_drop"]["delta"]) for record in probes)
    return summary


def best_rate(rows: list[dict], layers: int, name: str) -> float:
    """The learning rate with the lowest mean final val loss at (layers, variant); NaN counts as worst."""
    candidates = [row for row in rows if (row["layers"], row["variant"]) == (layers, name)]
    return min(candidates, key=lambda row: sorting_loss(row["eval_loss_mean"]))["learning_rate"]


def sorting_loss(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def learning_rate_transfer(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Per (layers, variant): the best learning rate there, and the rate that was best at the smallest depth used
    here (transferred, as a parametrization that transfers would be used), with both losses."""
    loss = {(row["layers"], row["variant"], row["learning_rate"]): row["eval_loss_mean"] for row in rows}
    base = min(args.layers)
    table = []
    for name in args.variants:
        transferred = best_rate(rows, base, name)
        for layers in args.layers:
            best = best_rate(rows, layers, name)
            table.append({"layers": layers, "variant": name, "best_learning_rate": best,
                          "best_eval_loss": loss[(layers, name, best)], "transferred_from_layers": base,
                          "transferred_learning_rate": transferred,
                          "transferred_eval_loss": loss[(layers, name, transferred)],
                          "transfer_cost": loss[(layers, name, transferred)] - loss[(layers, name, best)]})
    return table


def shown_rate(args: argparse.Namespace, rows: list[dict], layers: int, name: str) -> float:
    """The learning rate a plot shows for (layers, variant): the only one, or the best."""
    return args.learning_rates[0] if len(args.learning_rates) == 1 else best_rate(rows, layers, name)


def markdown_report(args: argparse.Namespace, argv: list[str], rows: list[dict]) -> str:
    reference = next(iter(args.variants))
    grid = len(args.learning_rates) > 1
    rate = ["lr"] if grid else []
    table = markdown_table(
        ["layers", "variant", *rate, "final val loss (mean ± std)", f"Δ vs {reference} (paired)", "diverged",
         "initial loss", "steps/s (median)", "overrides"],
        [[row["layers"], row["variant"], *([f"{row['learning_rate']:g}"] if grid else []),
          f"{row['eval_loss_mean']:.4f} ± {row['eval_loss_std']:.4f}",
          f"{row['delta_vs_reference_mean']:+.4f} ± {row['delta_vs_reference_std']:.4f}",
          f"{row['diverged']}/{row['runs']}", row["initial_loss_mean"], row["steps_per_second_median"],
          f"`{row['overrides']}`"] for row in rows],
    )
    muon = f" at Muon lr {args.muon_learning_rate:g}" if args.optimizer == "muon" else ""
    recipe = (f"{args.optimizer}{muon}, warmup {warmup_steps(args)} steps then cosine, betas ({args.adam_beta1}, "
              f"{args.adam_beta2})")
    rates = ", ".join(f"{rate:g}" for rate in args.learning_rates)
    lines = [
        f"# acx-rt compare-init{' (MoE)' if args.moe else ''}",
        "",
        f"Command: `acx-rt compare-init {shlex.join(argv)}`  ",
        f"Finished: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Seeds 0..{args.seeds - 1}, "
        f"{args.max_train_steps} steps, lr {rates} ({recipe}), batch {args.per_device_train_batch_size}×"
        f"{args.block_size} tokens, preset {preset(args)}"
        + (f" with `{args.config_overrides}`" if args.config_overrides else "") + ". "
        "Δ: mean ± std over seeds of (variant − reference) with the same seed (same init seed and data order).",
        "",
        table,
    ]
    if grid:
        lines += ["## Learning rates", "",
                  f"Best rate per depth (lowest mean final val loss), and the rate best at {min(args.layers)} layers "
                  "used at every depth (transferred).", "",
                  markdown_table(["layers", "variant", "best lr", "loss at best lr", "transferred lr",
                                  "loss at transferred lr", "transferred − best"],
                                 [[row["layers"], row["variant"], f"{row['best_learning_rate']:g}",
                                   f"{row['best_eval_loss']:.4f}", f"{row['transferred_learning_rate']:g}",
                                   f"{row['transferred_eval_loss']:.4f}", f"{row['transfer_cost']:+.4f}"]
                                  for row in learning_rate_transfer(args, rows)])]
    lines += ["## Depth probes", "",
              f"Means over seeds, on the first {PROBE_BLOCKS} validation blocks: residual-stream RMS after the last "
              "layer / of the embeddings and first / last layer weight-gradient norm, at init → at the end; the "
              "validation-loss change when one layer is skipped (largest, median over layers). Per-layer values: "
              "compare_init.json.", "",
              markdown_table(["layers", "variant", *rate, "RMS last/emb", "grad first/last", "layer-drop Δ max",
                              "layer-drop Δ median"],
                             [[row["layers"], row["variant"], *([f"{row['learning_rate']:g}"] if grid else []),
                               f"{row['rms_last_over_embedding_init']:.3g} → {row['rms_last_over_embedding_final']:.3g}",
                               f"{row['grad_first_over_last_init']:.3g} → {row['grad_first_over_last_final']:.3g}",
                               f"{row['layer_drop_max']:+.4f}", f"{row['layer_drop_median']:+.4f}"] for row in rows])]
    return "\n".join(lines)


def variant_color(index: int):
    return plt.cm.tab20(2 * (index % 10) + (index // 10) % 2)  # 10 dark hues, then their light shades


def plot_curves(args: argparse.Namespace, runs: dict, rows: list[dict], path: Path, window: int = 20) -> None:
    """Training loss (moving average over `window` steps, mean over seeds) per variant, at its shown rate; one panel
    per depth."""
    figure, axes = plt.subplots(1, len(args.layers), figsize=(5.5 * len(args.layers), 4), squeeze=False)
    for axis, layers in zip(axes[0], args.layers):
        for index, name in enumerate(args.variants):
            rate = shown_rate(args, rows, layers, name)
            curves = [runs[(layers, name, rate, seed)]["train_loss"] for seed in range(args.seeds)]
            length = min(len(curve) for curve in curves)
            mean = [statistics.fmean(curve[step] for curve in curves) for step in range(length)]
            smooth = [statistics.fmean(mean[max(0, step - window + 1) : step + 1]) for step in range(length)]
            label = f"{name} (lr {rate:g})" if len(args.learning_rates) > 1 else name
            axis.plot(range(1, length + 1), smooth, label=label, color=variant_color(index))
        axis.set(xlabel="step", ylabel=f"train loss ({window}-step mean)", title=f"{layers} layers")
        axis.legend(fontsize=7)
    save_figure(figure, path)


def plot_depth(args: argparse.Namespace, rows: list[dict], path: Path) -> None:
    """Final val loss (mean ± std over seeds) against depth, one line per variant at its best rate; with several
    rates, dashed: at the rate transferred from the smallest depth."""
    loss = {(row["layers"], row["variant"], row["learning_rate"]): row for row in rows}
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, name in enumerate(args.variants):
        shown = [loss[(layers, name, shown_rate(args, rows, layers, name))] for layers in args.layers]
        axis.errorbar(args.layers, [row["eval_loss_mean"] for row in shown], yerr=[row["eval_loss_std"] for row in shown],
                      marker="o", capsize=3, label=name, color=variant_color(index))
        if len(args.learning_rates) > 1:
            transferred = best_rate(rows, min(args.layers), name)
            axis.plot(args.layers, [loss[(layers, name, transferred)]["eval_loss_mean"] for layers in args.layers],
                      linestyle="--", color=variant_color(index))
    rates = "best lr per depth (dashed: lr transferred from the smallest depth)" if len(args.learning_rates) > 1 else \
        f"lr {args.learning_rates[0]:g}"
    axis.set(xlabel="layers", ylabel="final val loss", xticks=args.layers, title=f"{args.max_train_steps} steps, {rates}")
    axis.legend(fontsize=7)
    save_figure(figure, path)


def plot_residual(args: argparse.Namespace, runs: dict, rows: list[dict], path: Path) -> None:
    """Residual-stream RMS per layer (0 = embeddings) of seed 0 at the shown rate, at the end (solid) and at init
    (dotted); one panel per depth."""
    figure, axes = plt.subplots(1, len(args.layers), figsize=(5.5 * len(args.layers), 4), squeeze=False)
    for axis, layers in zip(axes[0], args.layers):
        for index, name in enumerate(args.variants):
            probes = runs[(layers, name, shown_rate(args, rows, layers, name), 0)]["probes"]
            for stage, style in (("final", "-"), ("init", ":")):
                axis.plot(range(layers + 1), probes[stage]["residual_rms"], linestyle=style, color=variant_color(index),
                          label=name if stage == "final" else None)
        axis.set(yscale="log", xlabel="layer (0 = embeddings)", ylabel="residual-stream RMS",
                 title=f"{layers} layers (dotted: at init)")
        axis.legend(fontsize=7)
    save_figure(figure, path)


def main(argv: list[str]) -> int:
    return run_command("acx-rt compare-init", lambda: parse_args(argv), lambda args: report(args, argv, run_all(args)))


def report(args: argparse.Namespace, argv: list[str], runs: dict) -> None:
    rows = summarize(args, runs)
    records = {run_name(*key): {k: v for k, v in run.items() if k != "train_loss"} for key, run in runs.items()}
    results = {"command": ["acx-rt", "compare-init", *argv], "variants": args.variants,
               "learning_rates": args.learning_rates, "summary": rows, "runs": records}
    if len(args.learning_rates) > 1:
        results["learning_rate_transfer"] = learning_rate_transfer(args, rows)
    write_json_atomically(args.output_dir / "compare_init.json", results)
    write_text_atomically(args.output_dir / "compare_init.md", markdown_report(args, argv, rows))
    plot_curves(args, runs, rows, args.output_dir / "compare_init_loss.png")
    plot_depth(args, rows, args.output_dir / "compare_init_depth.png")
    plot_residual(args, runs, rows, args.output_dir / "compare_init_residual.png")
    print(markdown_report(args, argv, rows))
