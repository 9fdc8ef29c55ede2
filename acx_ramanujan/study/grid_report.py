"""`acx-rt grid-report`: one report over every finished `compare-init` run in a folder.

`compare-init` trains a full grid per invocation (every depth × variant × rate × seed). A study that tunes each
scheme's learning rate per depth grows its grid unevenly, over several invocations into one folder (finished runs are
reused, so nothing trains twice); this reads every finished run there back and reports, per (variant, depth), the
final validation loss at each rate and seed, the best rate, the loss there, and the Δ against a reference variant at
the reference's own best rate, paired by seed. The best rate is the one that beats the most others paired by seed
(`best_rate`), so a rate is not favoured for having been run with an extra, luckier seed. A folder whose runs differ
in the recipe compare-init checks (steps, optimizer, warmup, betas, batch, block, Muon's rate) is refused: their
losses are not comparable.

Results: grid_report.json, grid_report.md and grid_report_depth.png (loss at each variant's best rate against depth)
in the folder.
"""

import argparse
import math
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from ..commands import run_command
from ..configuration_ramanujan import RamanujanConfig
from ..files import read_json_object, write_json_atomically, write_text_atomically
from ..reporting import markdown_table, save_figure
from . import STUDY_ARCHITECTURE
from .compare_init import is_finished, recorded_recipe, run_name, sorting_loss, variant_color


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acx-rt grid-report", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a compare-init --output_dir")
    parser.add_argument("--reference", default="normal", help="the variant every Δ is measured against")
    args = parser.parse_args(argv)
    args.runs = read_runs(args.output_dir)
    variants = sorted({run.variant for run in args.runs})
    if args.reference not in variants:
        raise ValueError(f"--reference {args.reference!r} has no finished run in {args.output_dir}; its variants: "
                         f"{', '.join(variants)}")
    return args


@dataclass(frozen=True)
class Run:
    variant: str
    layers: int
    learning_rate: float
    seed: int
    eval_loss: float


def read_runs(output_dir: Path) -> list[Run]:
    """Every finished run under output_dir/runs, checked to share one recipe; ValueError naming the first that does
    not, or a folder that is not a compare-init run."""
    runs_dir = output_dir / "runs"
    if not runs_dir.is_dir():
        raise ValueError(f"{output_dir} has no runs/ folder: not a compare-init --output_dir")
    runs, shared_recipe, first, overrides_of = [], None, None, {}
    for run_dir in sorted(path for path in runs_dir.iterdir() if path.is_dir() and is_finished(path)):
        trained = read_json_object(run_dir / "training_args.json")
        # a run recorded before the study named its block was trained in that block (as compare_init.same_setting)
        overrides = {**STUDY_ARCHITECTURE, **RamanujanConfig.parse_overrides(trained.get("config_overrides"))}
        layers = overrides.pop("num_hidden_layers", None)
        rate, seed = trained.get("learning_rate"), trained.get("seed")
        if not (isinstance(layers, int) and isinstance(rate, (int, float)) and isinstance(seed, int)):
            raise ValueError(f"{run_dir} is not a compare-init run (its training_args.json lacks the layer count, "
                             "learning rate or seed)")
        prefix, suffix = f"{layers}L-", run_name(layers, "", rate, seed).removeprefix(f"{layers}L-")
        name = run_dir.name
        if not (name.startswith(prefix) and name.endswith(suffix)) or name == prefix + suffix:
            raise ValueError(f"{run_dir} is not a compare-init run (its name does not match its training_args.json)")
        variant = name[len(prefix):-len(suffix)]
        own = recorded_recipe(trained)
        if shared_recipe is None:
            shared_recipe, first = own, run_dir
        for key in sorted(shared_recipe.keys() | own.keys()):
            if shared_recipe.get(key) != own.get(key):
                raise ValueError(f"runs in {output_dir} differ in {key}: {first.name} has {shared_recipe.get(key)!r}, "
                                 f"{run_dir.name} has {own.get(key)!r}; give each recipe its own folder")
        if overrides_of.setdefault(variant, (overrides, run_dir.name))[0] != overrides:
            raise ValueError(f"variant {variant!r} names two configs: {overrides_of[variant][1]} and {run_dir.name}")
        loss = read_json_object(run_dir / "all_results.json").get("eval_loss")
        if not isinstance(loss, (int, float)):
            raise ValueError(f"{run_dir / 'all_results.json'} has no numeric eval_loss")
        runs.append(Run(variant, layers, rate, seed, loss))
    if not runs:
        raise ValueError(f"{runs_dir} holds no finished run")
    return runs


def best_rate(rates: dict[float, dict[int, float]]) -> float:
    """The rate that beats the most others paired by seed: rate a beats rate b when a's mean over the seeds both ran
    is lower (each one's own mean if they share none; NaN counts as worst). Ties go to the lower mean over the rate's
    own seeds. Paired, so a rate run with an extra, luckier seed is not favoured; pairwise, so one poor rate run with
    a single seed does not reduce every comparison to that seed."""
    def mean(rate: float, seeds) -> float:
        return sorting_loss(statistics.fmean(rates[rate][seed] for seed in seeds))

    def beats(a: float, b: float) -> bool:
        shared = rates[a].keys() & rates[b].keys()
        return mean(a, shared or rates[a]) < mean(b, shared or rates[b])

    wins = {a: sum(beats(a, b) for b in rates if b != a) for a in rates}
    return min(rates, key=lambda rate: (-wins[rate], mean(rate, rates[rate])))


def summarize(runs: list[Run], reference: str) -> list[dict]:
    """Per (variant, layers): {rate: {seed: loss}}, the best rate (`best_rate`), the mean and seeds at that rate, and
    the mean paired Δ against the reference at its own best rate."""
    grid: dict[tuple, dict] = {}
    for run in runs:
        grid.setdefault((run.variant, run.layers), {}).setdefault(run.learning_rate, {})[run.seed] = run.eval_loss
    best = {key: (rate := best_rate(rates), rates[rate]) for key, rates in grid.items()}
    rows = []
    for (variant, layers), rates in sorted(grid.items(), key=lambda item: (item[0][1], sorting_loss(
            statistics.fmean(best[item[0]][1].values())))):
        rate, losses = best[(variant, layers)]
        paired = []
        if (reference, layers) in best:
            reference_losses = best[(reference, layers)][1]
            paired = [losses[seed] - reference_losses[seed] for seed in sorted(losses.keys() & reference_losses.keys())]
        rows.append({
            "variant": variant, "layers": layers,
            "eval_loss": {f"{r:g}": {str(seed): loss for seed, loss in sorted(seeds.items())}
                          for r, seeds in sorted(rates.items())},
            "best_learning_rate": rate, "best_seeds": sorted(losses),
            "best_eval_loss_mean": statistics.fmean(losses.values()),
            "best_eval_loss_std": statistics.stdev(losses.values()) if len(losses) > 1 else 0.0,
            "delta_vs_reference_mean": statistics.fmean(paired) if paired else math.nan,
            "delta_vs_reference_seeds": len(paired),
        })
    return rows


def loss_cell(seeds: dict[str, float]) -> str:
    values = [f"{loss:.4f}" for loss in seeds.values()]
    mean = f", mean {statistics.fmean(seeds.values()):.4f}" if len(seeds) > 1 else ""
    return " / ".join(values) + mean


def seed_count(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def markdown_report(args: argparse.Namespace, argv: list[str], rows: list[dict]) -> str:
    rates = sorted({float(rate) for row in rows for rate in row["eval_loss"]})
    depths = sorted({row["layers"] for row in rows})
    grid = []
    for row in rows:
        cells = []
        for rate in rates:
            seeds = row["eval_loss"].get(f"{rate:g}")
            cell = loss_cell(seeds) if seeds else "—"
            cells.append(f"**{cell}**" if rate == row["best_learning_rate"] else cell)
        delta = row["delta_vs_reference_mean"]
        grid.append([row["variant"], row["layers"], *cells, f"{row['best_learning_rate']:g}",
                     "—" if math.isnan(delta) else f"{delta:+.4f} ({seed_count(row['delta_vs_reference_seeds'])})"])
    by_depth = {(row["variant"], row["layers"]): row for row in rows}
    variants = sorted({row["variant"] for row in rows},
                      key=lambda v: min(sorting_loss(r["best_eval_loss_mean"]) for r in rows if r["variant"] == v))
    summary = [[variant, *(f"{by_depth[(variant, layers)]['best_eval_loss_mean']:.4f} "
                           f"({by_depth[(variant, layers)]['best_learning_rate']:g}, "
                           f"{seed_count(len(by_depth[(variant, layers)]['best_seeds']))})"
                           if (variant, layers) in by_depth else "—" for layers in depths)] for variant in variants]
    return "\n".join([
        "# acx-rt grid-report", "",
        f"Command: `acx-rt grid-report {shlex.join(argv)}`  ",
        f"{len(args.runs)} finished runs in {args.output_dir}. Final validation loss per seed (\"mean\" over the seeds "
        "shown); bold: the best rate, the one that beats the most others on the mean over the seeds both ran. "
        f"Δ: mean over the shared seeds of (variant − {args.reference}), each at its own best rate at that depth.",
        "",
        markdown_table(["variant", "layers", *(f"lr {rate:g}" for rate in rates), "best lr", f"Δ vs {args.reference}"],
                       grid),
        "## At each variant's best rate", "",
        markdown_table(["variant", *(f"{layers} layers" for layers in depths)], summary),
    ])


def plot_depth(rows: list[dict], path: Path) -> None:
    """Final val loss at each variant's best rate (mean ± std over its seeds there) against depth."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, variant in enumerate(sorted({row["variant"] for row in rows})):
        points = sorted((row["layers"], row["best_eval_loss_mean"], row["best_eval_loss_std"]) for row in rows
                        if row["variant"] == variant)
        axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                      capsize=3, label=variant, color=variant_color(index))
    depths = sorted({row["layers"] for row in rows})
    axis.set(xlabel="layers", ylabel="final val loss", xticks=depths, title="each variant at its best lr per depth")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))  # beside the axes: a legend inside hides points
    save_figure(figure, path)


def report(args: argparse.Namespace, argv: list[str]) -> None:
    rows = summarize(args.runs, args.reference)
    write_json_atomically(args.output_dir / "grid_report.json",
                          {"command": ["acx-rt", "grid-report", *argv], "reference": args.reference, "rows": rows})
    markdown = markdown_report(args, argv, rows)
    write_text_atomically(args.output_dir / "grid_report.md", markdown)
    plot_depth(rows, args.output_dir / "grid_report_depth.png")
    print(markdown)


def main(argv: list[str]) -> int:
    return run_command("acx-rt grid-report", lambda: parse_args(argv), lambda args: report(args, argv))
