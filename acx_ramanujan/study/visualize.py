"""`acx-rt visualize`: plots of a saved checkpoint — activation variance and gradient distributions per layer,
attention heatmaps per layer and head (eager attention), and the expert load of MoE layers.

The model is loaded with attn_implementation="eager" (the only backend that returns attention weights) and
fed the prompt, tokenized with the checkpoint's own tokenizer (the byte tokenizer when none was saved).
Gradients are those of the LM loss on the prompt.
"""

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import AutoTokenizer

from ..commands import run_command
from ..modeling_ramanujan import RamanujanForCausalLM
from ..files import check_saved_weights
from ..tokenization_ramanujan import RamanujanByteTokenizer
from .probes import attention_maps, expert_load_per_layer, layer_gradients, residual_stream
from ..reporting import save_figure

PLOT_TYPES = ("variance", "gradients", "attention", "experts")
DEFAULT_PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acx-rt visualize", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a directory written by save_pretrained")
    parser.add_argument("--type", choices=(*PLOT_TYPES, "all"), default="all")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text fed to the model")
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.prompt:
        raise ValueError("--prompt is empty")
    if not (args.checkpoint / "config.json").is_file():
        raise ValueError(f"--checkpoint {args.checkpoint} is not a readable checkpoint (no config.json)")
    return args


def load(checkpoint: Path):
    """Model (eager attention, eval mode) and tokenizer; any loading failure becomes a ValueError naming the folder."""
    try:
        check_saved_weights(checkpoint)  # a damaged file or NaN weights: one line, instead of a traceback or empty plots
        model = RamanujanForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
        has_tokenizer = (checkpoint / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint) if has_tokenizer else RamanujanByteTokenizer()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"--checkpoint {checkpoint} could not be loaded: {error}") from None
    return model, tokenizer


def plot_variance(model, input_ids: torch.Tensor, path: Path) -> None:
    variances = [hidden.double().var().item() for hidden in residual_stream(model, input_ids)]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(range(len(variances)), variances, marker="o")
    axis.set(yscale="log", xlabel="layer (0 = embeddings)", ylabel="residual-stream variance",
             title="Activation variance per layer")
    save_figure(figure, path)


def plot_gradients(model, input_ids: torch.Tensor, path: Path) -> None:
    loss, grads = layer_gradients(model, input_ids)
    magnitudes = [grad.abs().clamp_min(1e-30).log10().numpy() for grad in grads]
    figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(grads)), 4))
    axis.boxplot(magnitudes, showfliers=False)
    axis.set(xlabel="decoder layer", ylabel="log10 |weight gradient|",
             title=f"Gradient distribution per layer (LM loss {loss:.3f})")
    save_figure(figure, path)


def plot_attention(model, input_ids: torch.Tensor, path: Path) -> None:
    maps = attention_maps(model, input_ids)
    layers, heads = len(maps), maps[0].shape[0]
    figure, axes = plt.subplots(layers, heads, figsize=(2.2 * heads, 2.2 * layers), squeeze=False)
    for layer, layer_maps in enumerate(maps):
        for head in range(heads):
            axis = axes[layer][head]
            axis.imshow(layer_maps[head].numpy(), cmap="viridis")  # per-panel colour scale
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"layer {layer} head {head}", fontsize=7)
    figure.suptitle("Attention probabilities (rows: queries, columns: keys)")
    save_figure(figure, path)


def plot_experts(model, input_ids: torch.Tensor, path: Path) -> None:
    load = expert_load_per_layer(model, input_ids)
    num_layers, num_experts = load.shape
    moe_layers = [layer for layer in range(model.config.num_hidden_layers) if model.config.is_moe_layer(layer)]
    figure, axes = plt.subplots(num_layers, 1, figsize=(6, 1.8 * num_layers), squeeze=False, sharex=True)
    for row, (axis, layer) in enumerate(zip(axes[:, 0], moe_layers)):
        axis.bar(range(num_experts), load[row].numpy())
        axis.axhline(1.0 / num_experts, color="grey", linestyle=":", linewidth=1)
        axis.set_ylabel(f"layer {layer}", fontsize=8)
    axes[-1][0].set_xlabel("expert (dotted: uniform load)")
    figure.suptitle("Share of top-k assignments per expert")
    save_figure(figure, path)


PLOTTERS = {"variance": plot_variance, "gradients": plot_gradients, "attention": plot_attention,
            "experts": plot_experts}


def main(argv: list[str]) -> int:
    return run_command("acx-rt visualize", lambda: checked_inputs(parse_args(argv)), plot_all)


def checked_inputs(args: argparse.Namespace):
    """The checkpoint (loaded) and the prompt (tokenized), refused by name when they cannot be plotted."""
    model, tokenizer = load(args.checkpoint)
    if args.type == "experts" and not model.config.is_moe:
        raise ValueError(f"--type experts needs a mixture-of-experts checkpoint; {args.checkpoint} is dense")
    input_ids = torch.tensor([tokenizer(args.prompt)["input_ids"]])
    if input_ids.shape[1] > model.config.max_position_embeddings:
        raise ValueError(f"--prompt is {input_ids.shape[1]} tokens; the model takes at most "
                         f"{model.config.max_position_embeddings}")
    return args, model, input_ids


def plot_all(checked) -> None:
    args, model, input_ids = checked
    kinds = [args.type] if args.type != "all" else [k for k in PLOT_TYPES if k != "experts" or model.config.is_moe]
    for kind in kinds:
        PLOTTERS[kind](model, input_ids, args.output_dir / f"{kind}.png")
    print(f"wrote {', '.join(f'{kind}.png' for kind in kinds)} to {args.output_dir}")
