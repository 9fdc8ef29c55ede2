"""Scale on paper: what a 125M or 1B run, dense or MoE, needs per GPU, computed from the configs (docs/scaling.md).

Nothing here is a guess that the CPU cannot check:
- parameters: counted on the meta device (the real module tree, no memory); active parameters per token leave out
  the routed experts a token does not use.
- training FLOPs per token: 6 × the active matmul parameters (every parameter but the input embedding) plus PaLM's
  attention term 12 · layers · heads · head_dim · context (Chowdhery et al. 2022, app. B; attention counted dense,
  as torch.utils.flop_counter counts it). Tokens/s at a sustained FLOP/s is their ratio.
- memory per GPU: weights, gradients and AdamW's two moments in fp32 (16 bytes per parameter; bf16 autocast keeps
  fp32 master weights, so the same), divided as the sharding divides them (DDP: nothing; ZeRO-2: gradients and
  optimizer; FSDP / ZeRO-3: all, plus the one decoder layer FSDP gathers at a time), plus activations.
- activations: the bytes of the tensors autograd saves for backward, measured on CPU (saved_tensors_hooks) for the
  same config cut to 1 and 2 layers at two context lengths; the layers are identical and the bytes are a fixed
  part plus a part per token, so the bytes of L layers and any batch follow exactly.
- checkpoint sizes: model.safetensors holds the fp32 weights (4 bytes per parameter), a training checkpoint adds
  AdamW's moments (8 bytes per parameter), whole or in per-process DCP shards.

usage: python -m acx_ramanujan.bench.scaling [--output docs/scaling.md]
"""

import argparse
import sys
from pathlib import Path

import torch

from ..configuration_ramanujan import RamanujanConfig
from ..modeling_ramanujan import RamanujanForCausalLM

# (preset, overrides, context, micro-batch per GPU). 125M: the gpt2_style preset; 1B: TinyLlama-1.1B's shape. The
# MoE variants swap each MLP for 8 experts, top-2, of half the width: the same active parameters per token.
SIZES = {
    "125M dense": ("gpt2_style", {}, 1024, 8),
    "125M-active MoE (8 experts, top-2)": ("gpt2_style", dict(num_experts=8, num_experts_per_tok=2,
                                                             moe_intermediate_size=1024), 1024, 8),
    "moe_8x preset": ("moe_8x", {}, 2048, 4),
    "1.1B dense": ("llama_7b_style", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                          num_attention_heads=32, num_key_value_heads=4), 2048, 4),
    "1.1B-active MoE (8 experts, top-2)": ("llama_7b_style", dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=2816), 2048, 4),
}
STATE_BYTES = {"weights": 4, "gradients": 4, "adamw": 8}  # per parameter, fp32 (also under bf16 autocast)
SHARDINGS = ("DDP", "ZeRO-2", "FSDP")
GPUS = 8


def build(config: RamanujanConfig, device: str = "meta") -> RamanujanForCausalLM:
    with torch.device(device):
        return RamanujanForCausalLM(config)


def parameter_counts(config: RamanujanConfig) -> dict:
    """total, active per token (routed experts weighted by top-k / experts), matmul-active (minus the input
    embedding, a lookup), and the largest decoder layer (FSDP's unit)."""
    model = build(config)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    unused = routed * (1 - config.num_experts_per_tok / config.num_experts) if config.num_experts else 0
    active = total - unused
    embedding = model.get_input_embeddings().weight.numel()
    # Tied embeddings are one parameter: the head's matmul still runs on it.
    matmul = active - (0 if config.tie_word_embeddings else embedding)
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    return {"total": total, "active": int(active), "matmul_active": int(matmul), "largest_layer": layer}


def training_flops_per_token(config: RamanujanConfig, context: int) -> float:
    """Forward + backward FLOPs per token (see the module docstring)."""
    counts = parameter_counts(config)
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    return 6 * counts["matmul_active"] + attention


def saved_activation_bytes(config: RamanujanConfig, batch: int, context: int, autocast: bool = False) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (parameters excluded; each storage once)."""
    torch.manual_seed(0)
    model = build(config, "cpu")
    kept: list[torch.Tensor] = []  # alive until the pass ends, so that no storage address is reused meanwhile
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(tensor):
        kept.append(tensor)
        # Not the tensor itself: a saved tensor that is its own packed value keeps the graph (and the model) alive
        # after the pass. Nothing is unpacked: no backward runs.

    tokens = torch.randint(0, config.vocab_size, (batch, context))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda packed: packed), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=tokens, labels=tokens)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    kept.clear()
    return sum(size for address, size in storages.items() if address not in params)


def activation_bytes(config: RamanujanConfig, batch: int, context: int, autocast: bool = False,
                     probes: tuple[int, int] = (128, 256)) -> float:
    """Saved-for-backward bytes of the full config at (batch, context), from four measurements of the config cut to
    its first k+1 and k+2 layers (k = first_k_dense_layers, so both hold the layer kind that repeats) at two
    context lengths: linear in layers (identical layers), and a fixed part (under autocast, the bf16 copies of the
    weights) plus a part linear in tokens (sdpa keeps no context × context scores)."""
    first = config.first_k_dense_layers + 1

    def full_depth(probe: int) -> float:
        one, two = (saved_activation_bytes(_with_layers(config, n), 1, probe, autocast) for n in (first, first + 1))
        per_layer = two - one
        return one - first * per_layer + per_layer * config.num_hidden_layers

    short, long = (full_depth(probe) for probe in probes)
    per_token = (long - short) / (probes[1] - probes[0])
    return short - per_token * probes[0] + per_token * batch * context


def _with_layers(config: RamanujanConfig, layers: int) -> RamanujanConfig:
    values = config.to_dict()
    values["num_hidden_layers"] = layers
    return RamanujanConfig.from_dict(values)


def memory_per_gpu(counts: dict, activations: float, sharding: str, gpus: int, gathered_dtype_bytes: int) -> float:
    """Bytes per GPU: training states divided by the sharding, plus activations; FSDP also holds one gathered layer
    (in the compute dtype) while it computes it and the next one it prefetches."""
    params = counts["total"]
    weights, grads, adamw = (params * STATE_BYTES[kind] for kind in ("weights", "gradients", "adamw"))
    if sharding == "DDP":
        states = weights + grads + adamw
    elif sharding == "ZeRO-2":
        states = weights + (grads + adamw) / gpus
    else:
        states = (weights + grads + adamw) / gpus + 2 * counts["largest_layer"] * gathered_dtype_bytes
    return states + activations


def checkpoint_bytes(counts: dict) -> dict:
    return {"model.safetensors": 4 * counts["total"], "training checkpoint": 12 * counts["total"]}


def report(sizes: dict = SIZES) -> str:
    """docs/scaling.md's tables."""
    gib = 2**30
    lines = ["| model | parameters (total / active per token) | training FLOPs per token | tokens/s per 100 TFLOP/s "
             "sustained | model.safetensors | training checkpoint (model + AdamW) |", "|---|---|---|---|---|---|"]
    memory = ["| model | micro-batch | activations fp32 / bf16 autocast | " + " | ".join(
        f"{sharding} fp32 / bf16" for sharding in SHARDINGS) + " |", "|---|---|---|" + "---|" * len(SHARDINGS)]
    for name, (preset, overrides, context, batch) in sizes.items():
        config = RamanujanConfig.from_preset(preset, **overrides, max_position_embeddings=max(context, 1024))
        counts = parameter_counts(config)
        flops = training_flops_per_token(config, context)
        files = checkpoint_bytes(counts)
        lines.append(f"| {name} | {counts['total'] / 1e6:,.1f}M / {counts['active'] / 1e6:,.1f}M | {flops:.3g} | "
                     f"{1e14 / flops:,.0f} | {files['model.safetensors'] / gib:.2f} GiB | "
                     f"{files['training checkpoint'] / gib:.2f} GiB |")
        fp32, bf16 = (activation_bytes(config, batch, context, autocast) for autocast in (False, True))
        cells = [f"{memory_per_gpu(counts, fp32, s, GPUS, 4) / gib:.1f} / "
                 f"{memory_per_gpu(counts, bf16, s, GPUS, 2) / gib:.1f} GiB" for s in SHARDINGS]
        memory.append(f"| {name} | {batch} × {context} | {fp32 / gib:.1f} / {bf16 / gib:.1f} GiB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nMemory per GPU (8 GPUs; DDP holds every state on each):\n\n" + "\n".join(memory) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m acx_ramanujan.bench.scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="write the tables here (default: print them)")
    args = parser.parse_args(argv)
    tables = report()
    if args.output:
        args.output.write_text(tables)
    else:
        print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
