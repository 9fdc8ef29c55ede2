"""Measurements on real Ramanujan models: residual stream per layer, weight gradients per layer, attention, experts.

Forward hooks read the residual stream where it is (the embedding output and each decoder layer's output),
so nothing depends on how `output_hidden_states` post-processes its last entry.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_ramanujan import expert_load, router_biases


def byte_token_batch(text_file: Path | None, batch_size: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """(batch_size, seq_len) token ids: random windows of a file's bytes, or uniform random bytes without a file.

    Byte ids are the package tokenizer's ids 0..255, so any config with vocab_size ≥ 256 takes them.
    """
    generator = torch.Generator().manual_seed(seed)
    if text_file is None:
        return torch.randint(0, min(256, vocab_size), (batch_size, seq_len), generator=generator)
    data = torch.frombuffer(bytearray(Path(text_file).read_bytes()), dtype=torch.uint8).long()
    if data.numel() <= seq_len:
        raise ValueError(f"{text_file} holds {data.numel()} bytes; need more than seq_len={seq_len}")
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([data[start : start + seq_len] for start in starts.tolist()])


def residual_stream(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering layer 0 (embeddings) and leaving each decoder layer: L+1 tensors, no grad."""
    base = model.model
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [base.embed_tokens.register_forward_hook(keep)]
    handles += [layer.register_forward_hook(keep) for layer in base.layers]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def residual_rms_per_layer(model, input_ids: torch.Tensor) -> list[float]:
    """√mean(h²) of the residual stream over tokens and features: embeddings, then after each layer."""
    return [hidden.double().pow(2).mean().sqrt().item() for hidden in residual_stream(model, input_ids)]


def layer_gradients(model, input_ids: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """LM loss (labels = inputs, MoE aux loss included as in training) and each decoder layer's flattened weight grads."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    grads = []
    for layer in model.model.layers:
        pieces = [parameter.grad.detach().reshape(-1) for parameter in layer.parameters() if parameter.grad is not None]
        grads.append(torch.cat(pieces))
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def layer_gradient_norms(model, input_ids: torch.Tensor) -> tuple[float, list[float]]:
    """LM loss and the L2 norm of each decoder layer's weight gradient."""
    loss, grads = layer_gradients(model, input_ids)
    return loss, [grad.double().norm().item() for grad in grads]


def lm_loss(model, input_ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of the LM head (no router losses), no grad."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()).item()


def layer_drop_losses(model, input_ids: torch.Tensor) -> tuple[float, list[float]]:
    """The LM loss of the whole model, and with each decoder layer skipped in turn (the residual stream passes the
    layer unchanged; the others compute as before): how much the model relies on each layer, the layer-pruning
    measurement of the Curse of Depth paper (arXiv 2502.05795, section 2). One forward per layer, each without it."""
    base = model.model
    layers = base.layers
    dropped = []
    try:
        for skipped in range(len(layers)):
            base.layers = nn.ModuleList(layer for index, layer in enumerate(layers) if index != skipped)
            dropped.append(lm_loss(model, input_ids))
    finally:
        base.layers = layers
    return lm_loss(model, input_ids), dropped


def attention_maps(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer (heads, seq, seq) attention probabilities of the first sequence; needs the eager backend."""
    if model.config._attn_implementation != "eager":
        raise ValueError("attention maps need attn_implementation='eager' (sdpa/flash do not return weights)")
    with torch.no_grad():
        outputs = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    return [attention[0].float() for attention in outputs.attentions]


def expert_load_per_layer(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(num_moe_layers, num_experts) share of top-k assignments per expert (rows sum to 1)."""
    if not model.config.is_moe:
        raise ValueError("expert load needs a mixture-of-experts model (num_experts > 0)")
    with torch.no_grad():
        outputs = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
    return expert_load(outputs.router_logits, model.config.num_experts_per_tok, router_biases(model))
