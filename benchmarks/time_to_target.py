"""Time to target: training seconds until each run first reaches the plain Llama + AdamW script's final loss.

Runs, for each seed, `acx-rt train` at the quality anchor's shape (dense `tiny`, MoE `tiny-moe`; any extra flags)
and the plain peers of benchmarks/peer_llama.py (Llama + AdamW, Llama + Muon), each evaluating the full validation
split every --eval_steps steps. The target of a seed is the final validation loss of its Llama + AdamW run (or
--target). A run's time to target is its training seconds (evaluation excluded) at the first evaluation at or under
the target; ours are summed from metrics.jsonl's per-step tokens/s, the peers' are timed by the peer script.
Runs go --jobs at a time (each with --threads threads), seed by seed, so that peers and ours share the machine's
conditions; the table (markdown) goes to stdout and OUT/time_to_target.md, the curves to OUT/time_to_target.json.

usage: python benchmarks/time_to_target.py --train_file ../shared/data/tinyshakespeare.txt --out DIR
         [--seeds 1337 1338] [--runs llama-adamw llama-muon ours-dense ours-moe]
         [--variant NAME=PRESET:FLAGS ...] [--jobs 2] [--threads 1] [--eval_steps 100]
(results: docs/benchmarks.md, "Time to target")
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The quality anchor (benchmarks/quality_anchor.sh): nanoGPT's CPU budget on tiny Shakespeare.
ANCHOR_SHAPE = "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=4,intermediate_size=344"
BLOCK_SIZE, BATCH_SIZE, STEPS, PEAK_LR = 64, 12, 2000, 1e-3
PEERS = {"llama-adamw": "adamw", "llama-muon": "muon"}
OURS = {"ours-dense": ("tiny", ""), "ours-moe": ("tiny-moe", "")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for every run and the results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    parser.add_argument("--runs", nargs="+", default=[*PEERS, *OURS], help=f"of {[*PEERS, *OURS]} and the variants")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PRESET:FLAGS",
                        help='`acx-rt train` with extra flags, e.g. "dense-fp32=tiny:--mixed_precision no" (repeatable)')
    parser.add_argument("--target", type=float, help="a fixed target loss instead of each seed's Llama + AdamW final loss")
    parser.add_argument("--max_train_steps", type=int, default=STEPS)
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    args = parser.parse_args(argv)
    args.commands = {**{name: ("peer", optimizer) for name, optimizer in PEERS.items()},
                     **{name: ("ours", preset, flags) for name, (preset, flags) in OURS.items()}}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        preset, sep, flags = rest.partition(":")
        if not (name and preset and sep):
            parser.error(f"--variant {spec!r} is not NAME=PRESET:FLAGS")
        args.commands[name] = ("ours", preset, flags)
        args.runs.append(name) if name not in args.runs else None
    unknown = [name for name in args.runs if name not in args.commands]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; known: {sorted(args.commands)}")
    if args.target is None and "llama-adamw" not in args.runs:
        parser.error("without --target the target is llama-adamw's final loss: keep llama-adamw in --runs")
    if not Path(args.train_file).is_file():
        parser.error(f"--train_file {args.train_file} is not a file")
    return args


def command(args: argparse.Namespace, name: str, seed: int, folder: Path) -> list[str]:
    kind, *spec = args.commands[name]
    common = ["--train_file", args.train_file, "--max_train_steps", str(args.max_train_steps), "--eval_steps",
              str(args.eval_steps), "--learning_rate", str(PEAK_LR), "--seed", str(seed)]
    if kind == "peer":
        return [sys.executable, str(HERE / "peer_llama.py"), "--optimizer", spec[0], "--block_size", str(BLOCK_SIZE),
                "--batch_size", str(BATCH_SIZE), "--log", str(folder / "curve.jsonl"), *common]
    preset, flags = spec
    return [sys.executable, "-m", "acx_ramanujan.cli", "train", "--config_name", preset, "--config_overrides",
            ANCHOR_SHAPE, "--validation_split_percentage", "10", "--block_size", str(BLOCK_SIZE),
            "--per_device_train_batch_size", str(BATCH_SIZE), "--per_device_eval_batch_size", "64", "--output_dir",
            str(folder), "--overwrite_output_dir", *common, *shlex.split(flags)]


def ours_curve(folder: Path) -> list[dict]:
    """(step, training seconds, eval loss) at each evaluation of an `acx-rt train` run, from its metrics.jsonl: the
    seconds are the sum of tokens per step / tokens_per_second over the steps up to it (evaluation excluded), the
    tokens per step from the run's own training_args.json (a variant may change the batch; one process)."""
    settings = json.loads((folder / "training_args.json").read_text())
    tokens_per_step = (settings["block_size"] * settings["per_device_train_batch_size"]
                       * settings["gradient_accumulation_steps"])
    curve, seconds = [], 0.0
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "tokens_per_second" in record:
            seconds += tokens_per_step / record["tokens_per_second"]
        if "eval_loss" in record:
            curve.append({"step": record["step"], "train_seconds": seconds, "eval_loss": record["eval_loss"]})
    return curve


def first_reaching(curve: list[dict], target: float) -> dict | None:
    """The first evaluation at or under `target`, or None."""
    return next((point for point in curve if point["eval_loss"] <= target), None)


def run_one(args: argparse.Namespace, name: str, seed: int) -> list[dict]:
    folder = args.out / f"{name}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(folder / "run.log", "w") as log:
        subprocess.run(command(args, name, seed, folder), env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    if args.commands[name][0] == "peer":
        return [json.loads(line) for line in (folder / "curve.jsonl").read_text().splitlines()]
    return ours_curve(folder)


def report(args: argparse.Namespace, curves: dict) -> str:
    """One row per run and seed: final loss, training seconds, time to target, and its ratio to the peers."""
    lines = ["| run | seed | target | final loss | training s | first at target: step | s | "
             "× Llama+AdamW's training s | × Llama+Muon's time to target |", "|---|---|---|---|---|---|---|---|---|"]
    for seed in args.seeds:
        target = args.target if args.target is not None else curves[("llama-adamw", seed)][-1]["eval_loss"]
        adamw = curves.get(("llama-adamw", seed))
        muon = first_reaching(curves.get(("llama-muon", seed), []), target)
        for name in args.runs:
            curve = curves[(name, seed)]
            hit = first_reaching(curve, target)
            cells = [name, str(seed), f"{target:.4f}", f"{curve[-1]['eval_loss']:.4f}", f"{curve[-1]['train_seconds']:.1f}"]
            if hit is None:
                cells += ["not reached", "—", "—", "—"]
            else:
                cells += [str(hit["step"]), f"{hit['train_seconds']:.1f}",
                          f"{hit['train_seconds'] / adamw[-1]['train_seconds']:.2f}" if adamw else "—",
                          f"{hit['train_seconds'] / muon['train_seconds']:.2f}" if muon else "—"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    order = [(name, seed) for seed in args.seeds for name in args.runs]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        curves = dict(zip(order, pool.map(lambda key: run_one(args, *key), order)))
    table = report(args, curves)
    (args.out / "time_to_target.json").write_text(json.dumps(
        {f"{name}-seed{seed}": curve for (name, seed), curve in curves.items()}, indent=1))
    (args.out / "time_to_target.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
