"""Validation of a pretraining run: token-weighted loss, perplexity, bits per byte, and expert load for MoE."""

import torch
import torch.nn.functional as F

from ..configuration_ramanujan import RamanujanConfig
from ..modeling_ramanujan import expert_load, router_biases
from .metrics import load_metric


def count_predicted_bytes(dataset, tokenizer) -> float:
    """UTF-8 bytes behind the tokens the model predicts (all but each block's first), for bits per byte.

    Bytes per token is measured on the decoded validation stream: exact for the byte tokenizer (one byte per
    token), the corpus average for BPE, as in the bits-per-byte conversion of the Pile paper (Gao et al. 2020).
    """
    blocks = dataset["input_ids"]
    stream = [token for block in blocks for token in block]
    bytes_per_token = len(tokenizer.decode(stream).encode("utf-8")) / len(stream)
    predicted = sum(len(block) - 1 for block in blocks)
    return predicted * bytes_per_token


@torch.no_grad()
def evaluate_model(accelerator, model, dataloader, num_bytes: float, config: RamanujanConfig) -> dict:
    """Token-weighted loss, perplexity and bits per byte over the validation blocks; expert load for MoE.

    The NLL is the plain next-token cross-entropy (the MoE auxiliary losses are left out).
    """
    model.eval()
    metric = load_metric("perplexity")
    load_sum, load_batches = None, 0
    for batch in dataloader:
        outputs = model(input_ids=batch["input_ids"], output_router_logits=config.is_moe)
        logits, targets = outputs.logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(dim=1)
        predicted = torch.full_like(nll, targets.shape[1], dtype=torch.long)
        nll, predicted = accelerator.gather_for_metrics((nll, predicted))
        metric.add_batch(predictions=nll.tolist(), references=predicted.tolist())
        if config.is_moe:
            load = expert_load(outputs.router_logits, config.num_experts_per_tok, router_biases(model))
            load_sum = load if load_sum is None else load_sum + load
            load_batches += 1
    model.train()
    result = metric.compute(num_bytes=num_bytes)
    results = {"eval_loss": result["loss"], "perplexity": result["perplexity"],
               "bits_per_byte": result["bits_per_byte"]}
    if config.is_moe:
        mean_load = accelerator.reduce(load_sum / load_batches, reduction="mean")
        results["expert_load"] = [[round(share, 6) for share in row] for row in mean_load.tolist()]
    return results
