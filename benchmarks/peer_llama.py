"""The plain peer of our training recipe: Transformers' LlamaForCausalLM trained with nanoGPT's CPU loop.

Nothing of ours trains here: the model is `transformers.LlamaForCausalLM` at the quality anchor's shape (4 layers,
4 heads, width 128, SwiGLU width 344, tied embeddings, Llama's own initialization), the loop is nanoGPT's
`train.py` (random windows of the training text each step, AdamW with betas (0.9, 0.99) and weight decay 0.1 on
matrices, 100 linear warmup steps, cosine to a floor of 1e-4 over the run, gradient clipping at 1.0, float32).
`--optimizer muon` puts the decoder layers' matrices on `torch.optim.Muon` as it comes (Newton–Schulz in bf16,
`match_rms_adamw`, lr 2e-3 on the same schedule), the strongest plain peer we know. Only the data split and the
validation loss are the package's, so that both sides are scored on the same bytes: the tail 10 % of the text as
64-byte blocks, token-weighted next-byte cross-entropy (`acx-rt train`'s `eval_loss`).

Training seconds exclude evaluation. One JSON line per evaluation goes to --log:
{"step", "train_seconds", "eval_loss"}. usage: python benchmarks/peer_llama.py --train_file FILE --log peer.jsonl
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from acx_ramanujan import RamanujanByteTokenizer
from acx_ramanujan.training.data import text_to_dataset, tokenize_and_pack


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--log", type=Path, required=True, help="JSON lines: one per evaluation")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--eval_steps", type=int, default=100, help="evaluate every N steps (and at the end)")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--muon_learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1337)
    return parser.parse_args(argv)


def load_data(path: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training stream, validation blocks) split and packed as `acx-rt train` does."""
    blocks = tokenize_and_pack(text_to_dataset(Path(path).read_text(encoding="utf-8")), RamanujanByteTokenizer(),
                               block_size)
    return (torch.tensor(blocks["train"]["input_ids"]).reshape(-1), torch.tensor(blocks["validation"]["input_ids"]))


def lr_factor(step: int, steps: int, peak: float, warmup: int = 100, floor: float = 1e-4) -> float:
    """nanoGPT's `get_lr` as a share of the peak: linear warmup, then cosine from the peak to `floor`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    return (floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)) / peak


def optimizers(model: LlamaForCausalLM, args: argparse.Namespace) -> list[torch.optim.Optimizer]:
    named = [(name, p) for name, p in model.named_parameters()]
    hidden = [p for name, p in named if args.optimizer == "muon" and ".layers." in name and p.ndim == 2]
    rest = [p for _, p in named if all(p is not h for h in hidden)]
    groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}]
    found = [torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.99))]
    if hidden:
        found.append(torch.optim.Muon(hidden, lr=args.muon_learning_rate, weight_decay=0.1,
                                      adjust_lr_fn="match_rms_adamw"))
    return found


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, blocks: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in blocks.split(64):
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def main(argv=None) -> None:
    args = parse_args(argv)
    train, validation = load_data(args.train_file, args.block_size)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.block_size,
                         tie_word_embeddings=True, rms_norm_eps=1e-6, pad_token_id=256, bos_token_id=257,
                         eos_token_id=258, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    opts = optimizers(model, args)
    peaks = [group["lr"] for opt in opts for group in opt.param_groups]
    batches = torch.Generator().manual_seed(args.seed)
    train_seconds, log = 0.0, []
    for step in range(args.max_train_steps):
        start = time.perf_counter()
        factor = lr_factor(step, args.max_train_steps, args.learning_rate)
        for group, peak in zip((g for opt in opts for g in opt.param_groups), peaks):
            group["lr"] = peak * factor
        offsets = torch.randint(len(train) - args.block_size, (args.batch_size,), generator=batches)
        x = torch.stack([train[i:i + args.block_size] for i in offsets.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - start
        if (step + 1) % args.eval_steps == 0 or step + 1 == args.max_train_steps:
            log.append({"step": step + 1, "train_seconds": round(train_seconds, 3),
                        "eval_loss": evaluate(model, validation)})
            print(json.dumps(log[-1]), flush=True)
    args.log.write_text("".join(json.dumps(entry) + "\n" for entry in log))


if __name__ == "__main__":
    main()
