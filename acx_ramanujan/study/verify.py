"""`acx-rt verify`: activations and gradients per layer at initialization, for each scheme, measured.

Two experiments, written to --output_dir as verify.json, verify.md and PNG plots:
1. Real stacks: `RamanujanForCausalLM` with --depth layers per scheme (same seed, same tokens; the deepnorm scheme
   with DeepNet's post-norm layers, which it is written for); the residual-stream RMS entering layer 0 and after
   each layer, and the L2 norm of each layer's weight gradient under the LM loss.
2. The seed's chain experiment (see `chains`): plain linear and ReLU chains of --depth square layers, no norm, no
   residual, measured and next to the closed form — the like-for-like check of the seed's depth table.
"""

import argparse
import shlex
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from ..commands import run_command
from ..configuration_ramanujan import RamanujanConfig
from ..initialization_ramanujan import INIT_SCHEMES
from ..modeling_ramanujan import RamanujanForCausalLM
from . import STUDY_ARCHITECTURE
from .chains import ACTIVATIONS, chain_closed_form_log10, chain_measured_log10
from .probes import byte_token_batch, layer_gradient_norms, residual_rms_per_layer
from ..files import write_json_atomically, write_text_atomically
from ..reporting import markdown_table, parse_name_list, save_figure

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acx-rt verify", description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, required=True, help="number of layers (stack and chains)")
    parser.add_argument("--schemes", default=",".join(INIT_SCHEMES), help="comma-separated init schemes")
    parser.add_argument("--moe", action="store_true", help="mixture-of-experts stacks (the tiny-moe preset)")
    parser.add_argument("--config_name", default=None, help="preset or JSON path (default: tiny, or tiny-moe with --moe)")
    parser.add_argument("--hidden_size", type=int, default=None, help="override the preset's width")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--text_file", type=Path, default=None, help="byte text for the stacks (default: random bytes)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--chain_width", type=int, default=256, help="width of the plain chains")
    parser.add_argument("--chain_batch", type=int, default=256, help="input vectors pushed through each chain")
    parser.add_argument("--no_chains", action="store_true", help="skip the chain experiment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    for name in ("depth", "batch_size", "seq_len", "chain_width", "chain_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.schemes = parse_name_list(args.schemes, INIT_SCHEMES, "init scheme")
    if args.text_file is not None and not args.text_file.is_file():
        raise ValueError(f"--text_file {args.text_file} is not a readable file")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"--output_dir {args.output_dir} exists and is not a directory")
    # Build every stack's config now, so a bad --config_name/--hidden_size fails here and not mid-run.
    try:
        configs = [stack_config(args, scheme) for scheme in args.schemes]
    except (ValueError, TypeError) as error:  # TypeError: a JSON config with fields RamanujanConfig does not take
        raise ValueError(f"config {preset_name(args)!r}: {error}") from error
    if args.text_file is not None:
        size = args.text_file.stat().st_size
        if size <= args.seq_len:
            raise ValueError(f"--text_file {args.text_file} holds {size} bytes; need more than --seq_len {args.seq_len}")
        small = min(config.vocab_size for config in configs)
        if small < 256:
            raise ValueError(f"--text_file feeds byte ids 0..255, but the config's vocab_size is {small}")
    return args


def preset_name(args: argparse.Namespace) -> str:
    return args.config_name or ("tiny-moe" if args.moe else "tiny")


def stack_config(args: argparse.Namespace, scheme: str) -> RamanujanConfig:
    preset = preset_name(args)
    overrides = {**STUDY_ARCHITECTURE, "num_hidden_layers": args.depth, "init_scheme": scheme,
                 "deepnorm": scheme == "deepnorm"}
    if args.hidden_size is not None:
        overrides["hidden_size"] = args.hidden_size
    return RamanujanConfig.from_preset(preset, **overrides)


def measure_stacks(args: argparse.Namespace) -> dict:
    """Per scheme: residual RMS per layer, per-layer gradient norms and the loss at init (same seed and tokens)."""
    results = {}
    for scheme in args.schemes:
        config = stack_config(args, scheme)
        input_ids = byte_token_batch(args.text_file, args.batch_size, args.seq_len, config.vocab_size, args.seed)
        torch.manual_seed(args.seed)
        model = RamanujanForCausalLM(config).to(DTYPES[args.dtype])
        rms = residual_rms_per_layer(model, input_ids)
        loss, grad_norms = layer_gradient_norms(model, input_ids)
        results[scheme] = {"residual_rms": rms, "grad_norm": grad_norms, "initial_loss": loss}
    return results


def measure_chains(args: argparse.Namespace) -> dict:
    """Per activation and scheme: measured and closed-form log10 mean square after each layer."""
    dtype = DTYPES[args.dtype]
    return {
        activation: {
            scheme: {
                "measured_log10": chain_measured_log10(
                    scheme, args.depth, args.chain_width, activation, args.chain_batch, args.seed, dtype
                ),
                "closed_form_log10": chain_closed_form_log10(scheme, args.depth, args.chain_width, activation),
            }
            for scheme in args.schemes
        }
        for activation in ACTIVATIONS
    }


def markdown_report(args: argparse.Namespace, argv: list[str], stacks: dict, chains: dict | None) -> str:
    depth = args.depth
    quarter, half = depth // 4, depth // 2
    lines = [
        f"# acx-rt verify, depth {depth}{' (MoE)' if args.moe else ''}",
        "",
        f"Command: `acx-rt verify {shlex.join(argv)}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, dtype {args.dtype}, seed {args.seed}, "
        f"tokens: {args.text_file or 'random bytes'} ({args.batch_size}×{args.seq_len}).",
        "",
        "## Real stacks at initialization",
        "",
        "Residual-stream RMS entering layer 0 (embeddings) and after layers L/4, L/2, L; weight-gradient L2 norm "
        "of the first and last layer under the LM loss.",
        "",
    ]
    rows = []
    for scheme, result in stacks.items():
        rms, grads = result["residual_rms"], result["grad_norm"]
        rows.append([scheme, rms[0], rms[quarter], rms[half], rms[depth], rms[depth] / rms[0],
                     grads[0], grads[-1], grads[0] / grads[-1], result["initial_loss"]])
    lines.append(markdown_table(
        ["scheme", "RMS emb", f"RMS L{quarter}", f"RMS L{half}", f"RMS L{depth}", "RMS last/emb",
         "grad L1", f"grad L{depth}", "grad first/last", "loss at init"], rows))
    if chains is not None:
        lines += ["## Plain chains (the seed's experiment): log10 mean square after the last layer", "",
                  f"Width {args.chain_width}, {args.chain_batch} unit-variance inputs, no norm, no residual. "
                  "Closed form: log10 of m_0·Π d·σ_l²·g (g = 1 linear, 1/2 ReLU).", ""]
        rows = []
        for scheme in args.schemes:
            row = [scheme]
            for activation in ACTIVATIONS:
                result = chains[activation][scheme]
                row += [round(result["measured_log10"][-1], 3), round(result["closed_form_log10"][-1], 3)]
            rows.append(row)
        lines.append(markdown_table(
            ["scheme", "linear measured", "linear closed form", "ReLU measured", "ReLU closed form"], rows))
    return "\n".join(lines)


def plot_stacks(stacks: dict, depth: int, output_dir: Path) -> None:
    figure, (rms_axis, grad_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for scheme, result in stacks.items():
        rms_axis.plot(range(depth + 1), result["residual_rms"], marker=".", label=scheme)
        grad_axis.plot(range(1, depth + 1), result["grad_norm"], marker=".", label=scheme)
    rms_axis.set(yscale="log", xlabel="layer (0 = embeddings)", ylabel="residual-stream RMS", title="Activations at init")
    grad_axis.set(yscale="log", xlabel="decoder layer", ylabel="weight-gradient L2 norm", title="Gradients at init")
    rms_axis.legend(fontsize=8)
    save_figure(figure, output_dir / "verify_stacks.png")


def plot_chains(chains: dict, depth: int, output_dir: Path) -> None:
    figure, axes = plt.subplots(1, len(ACTIVATIONS), figsize=(11, 4))
    for axis, activation in zip(axes, ACTIVATIONS):
        for index, (scheme, result) in enumerate(chains[activation].items()):
            color = f"C{index}"
            axis.plot(range(depth + 1), result["measured_log10"], color=color, label=f"{scheme}")
            axis.plot(range(depth + 1), result["closed_form_log10"], color=color, linestyle=":")
        axis.axhline(-38, color="grey", linewidth=0.8)
        axis.set(xlabel="layer", ylabel="log10 mean square", title=f"{activation} chain (dotted: closed form; grey: float32 min)")
        axis.legend(fontsize=8)
    save_figure(figure, output_dir / "verify_chains.png")


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    stacks = measure_stacks(args)
    chains = None if args.no_chains else measure_chains(args)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    report = {"command": ["acx-rt", "verify", *argv], "settings": settings, "stacks": stacks, "chains": chains}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.output_dir / "verify.json", report)
    write_text_atomically(args.output_dir / "verify.md", markdown_report(args, argv, stacks, chains))
    plot_stacks(stacks, args.depth, args.output_dir)
    if chains is not None:
        plot_chains(chains, args.depth, args.output_dir)
    return report


def main(argv: list[str]) -> int:
    return run_command("acx-rt verify", lambda: parse_args(argv), lambda args: verify_and_report(args, argv))


def verify_and_report(args: argparse.Namespace, argv: list[str]) -> None:
    run(args, argv)
    print(f"wrote verify.json, verify.md and plots to {args.output_dir}")
