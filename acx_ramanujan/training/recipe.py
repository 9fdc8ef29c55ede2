"""The pretraining recipe's optimizers, schedules and data order (measured in docs/benchmarks.md,
"Training recipe").

- `make_optimizers`: AdamW for embeddings, norms, head and router, and (`--optimizer muon`, the default)
  `torch.optim.Muon` for the decoder layers' 2-D matrices (attention and dense MLP projections), as in the
  modded-nanoGPT line of work; MoE expert tensors (3-D: one matrix per expert) through `ExpertMuon`, the same update
  per expert matrix.
- `make_schedulers`: one Transformers schedule per optimizer, the same shape for each (warmup, then cosine to
  `min_lr_rate` × the peak by default).
- `RandomWindows`: each training row is a window of the packed training stream starting at a random offset
  (nanoGPT's `get_batch`), instead of the same fixed blocks every epoch. The offsets are drawn once from the seed,
  in chunks seeded by (seed, chunk), so any row's window is fixed in advance whatever the run's length: a resumed
  run, or a run over several processes with the same global batch, reads exactly the rows of the uninterrupted
  one-process run.
"""

import argparse
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import get_scheduler


def make_optimizers(model: torch.nn.Module, args: argparse.Namespace) -> list[torch.optim.Optimizer]:
    """[AdamW] (--optimizer adamw), or [AdamW, Muon] and for MoE [AdamW, Muon, ExpertMuon]; AdamW's weight decay on
    matrices only, not on norms (nanoGPT's `configure_optimizers`)."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    muon = args.optimizer == "muon"
    matrices = [param for name, param in named if muon and is_hidden_matrix(name, param)]
    experts = [(name, param) for name, param in named if muon and ".layers." in name and param.ndim == 3]
    taken = {id(param) for param in matrices} | {id(param) for _, param in experts}
    rest = [param for _, param in named if id(param) not in taken]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizers = [torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))]
    # match_rms_adamw (Moonshot's scaling): the update's RMS matches AdamW's, so AdamW's weight decay carries over.
    muon_options = dict(lr=args.muon_learning_rate, weight_decay=args.weight_decay, adjust_lr_fn="match_rms_adamw")
    if matrices:
        optimizers.append(torch.optim.Muon(matrices, **muon_options))
    if experts:
        optimizers.append(ExpertMuon(experts, **muon_options))
    return optimizers


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A decoder layer's 2-D weight other than the MoE router's: what Muon orthogonalizes."""
    return ".layers." in name and param.ndim == 2 and ".router." not in name


class ExpertMuon(torch.optim.Muon):
    """torch.optim.Muon for MoE expert tensors (experts, out, in), one matrix per expert, which torch's Muon (2-D
    parameters only) cannot take: each matrix gets a 2-D stand-in that Muon steps, copied from the expert tensor
    (weights and gradient) before the step and back after it. The fused gate_up tensor's gate and up halves are
    matrices of their own, as the dense MLP's gate_proj and up_proj are."""

    def __init__(self, named_tensors: list[tuple[str, torch.Tensor]], **options):
        self.pieces = []  # (expert tensor, index of one matrix in it)
        for name, tensor in named_tensors:
            halves = (slice(0, tensor.shape[1] // 2), slice(tensor.shape[1] // 2, None)) if name.endswith("gate_up_proj") \
                else (slice(None),)
            self.pieces += [(tensor, (expert, rows)) for expert in range(tensor.shape[0]) for rows in halves]
        super().__init__([tensor[index].detach().clone() for tensor, index in self.pieces], **options)

    @torch.no_grad()
    def step(self, closure=None):
        stand_ins = self.param_groups[0]["params"]
        for (tensor, index), stand_in in zip(self.pieces, stand_ins):
            stand_in.copy_(tensor[index])
            stand_in.grad = None if tensor.grad is None else tensor.grad[index]
        super().step()
        for (tensor, index), stand_in in zip(self.pieces, stand_ins):
            tensor[index] = stand_in

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        for tensor in {id(tensor): tensor for tensor, _ in self.pieces}.values():
            tensor.grad = None


def make_schedulers(args: argparse.Namespace, optimizers: list[torch.optim.Optimizer]) -> list:
    """The same schedule (relative to each optimizer's peak) for every optimizer."""
    warmup = args.num_warmup_steps if args.num_warmup_steps is not None else round(args.warmup_ratio * args.max_train_steps)
    extra = {"min_lr_rate": args.min_lr_rate} if args.lr_scheduler_type == "cosine_with_min_lr" else None
    return [get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                          num_training_steps=args.max_train_steps, scheduler_specific_kwargs=extra)
            for optimizer in optimizers]


class RandomWindows(Dataset):
    """`num_rows` windows of `block_size` tokens of `stream` at uniformly drawn offsets (labels = input_ids, as for
    packed blocks); row i's offset depends only on (seed, i)."""

    CHUNK = 4096

    def __init__(self, stream: torch.Tensor, block_size: int, num_rows: int, seed: int):
        self.stream, self.block_size, self.num_rows, self.seed = stream, block_size, num_rows, seed

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_rows:
            raise IndexError(index)
        start = int(self._offsets(index // self.CHUNK)[index % self.CHUNK])
        window = self.stream[start:start + self.block_size]
        return {"input_ids": window, "labels": window}

    @lru_cache(maxsize=2)
    def _offsets(self, chunk: int) -> np.ndarray:
        return np.random.default_rng((self.seed, chunk)).integers(0, len(self.stream) - self.block_size + 1, self.CHUNK)
