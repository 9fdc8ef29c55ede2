"""The pretraining recipe's optimizers, schedules and data order (measured in docs/benchmarks.md,
"Training recipe").

- `make_optimizers`: AdamW for embeddings, norms, head and router, and (`--optimizer muon`, the default)
  `torch.optim.Muon` for the decoder layers' 2-D matrices (attention and dense MLP projections), as in the
  modded-nanoGPT line of work; MoE expert tensors (3-D: one matrix per expert) through `ExpertMuon`, the same update
  per expert matrix. Both run Muon's Newton–Schulz iteration in bf16 (as torch does) where bf16 matmuls are native,
  and in fp32 elsewhere (`Muon`, `newton_schulz_dtype`). Under a depth parametrization (`config.
  depth_parametrization`) the decoder layers' parameters get their own groups, with the learning rate and AdamW ε
  of `initialization_ramanujan.hidden_optimizer_factors`.
- `make_schedulers`: one Transformers schedule per optimizer, the same shape for each (warmup, then cosine to
  `min_lr_rate` × the peak by default).
- `RandomWindows`: each training row is a window of the packed training stream starting at a random offset
  (nanoGPT's `get_batch`), instead of the same fixed blocks every epoch. The offsets are drawn once from the seed,
  in chunks seeded by (seed, chunk), so any row's window is fixed in advance whatever the run's length: a resumed
  run, or a run over several processes with the same global batch, reads exactly the rows of the uninterrupted
  one-process run.
"""

import argparse
import inspect
import math
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import get_scheduler

from ..initialization_ramanujan import hidden_optimizer_factors


def make_optimizers(model: torch.nn.Module, args: argparse.Namespace,
                    device: torch.device | None = None) -> list[torch.optim.Optimizer]:
    """[AdamW] (--optimizer adamw), or [AdamW, Muon] and for MoE [AdamW, Muon, ExpertMuon]; AdamW's weight decay on
    matrices only, not on norms (nanoGPT's `configure_optimizers`). `device`: where training runs (default: the
    model's), which decides Muon's Newton–Schulz precision.

    Under a depth parametrization the decoder layers' parameters (".layers.") form AdamW groups of their own, whose
    learning rate and ε are the base ones × `hidden_optimizer_factors` (the schedulers scale each group from its own
    peak), and Muon's learning rate gets the same factor: with match_rms_adamw its updates have AdamW's RMS, so the
    depth rule written for Adam is applied to it as it stands (an assumption; the sources state it for Adam only)."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    muon = args.optimizer == "muon"
    matrices = [param for name, param in named if muon and is_hidden_matrix(name, param)]
    experts = [(name, param) for name, param in named if muon and ".layers." in name and param.ndim == 3]
    taken = {id(param) for param in matrices} | {id(param) for _, param in experts}
    rest = [(name, param) for name, param in named if id(param) not in taken]
    lr_factor, eps_factor = hidden_optimizer_factors(model.config)
    if model.config.depth_parametrization is None:
        groups = [
            {"params": [p for _, p in rest if p.ndim >= 2], "weight_decay": args.weight_decay},
            {"params": [p for _, p in rest if p.ndim < 2], "weight_decay": 0.0},
        ]
    else:
        eps = inspect.signature(torch.optim.AdamW).parameters["eps"].default  # the base ε: torch's default
        groups = [
            {"params": [p for name, p in rest if (".layers." in name) == hidden and (p.ndim >= 2) == matrix],
             "weight_decay": args.weight_decay if matrix else 0.0,
             **({"lr": args.learning_rate * lr_factor, "eps": eps * eps_factor} if hidden else {})}
            for hidden in (False, True) for matrix in (True, False)
        ]
        groups = [group for group in groups if group["params"]]
    optimizers = [torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))]
    # match_rms_adamw (Moonshot's scaling): the update's RMS matches AdamW's, so AdamW's weight decay carries over.
    muon_options = dict(lr=args.muon_learning_rate * lr_factor, weight_decay=args.weight_decay,
                        adjust_lr_fn="match_rms_adamw", ns_dtype=newton_schulz_dtype(device or next(model.parameters()).device))
    if matrices:
        optimizers.append(Muon(matrices, **muon_options))
    if experts:
        optimizers.append(ExpertMuon(experts, **muon_options))
    return optimizers


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A decoder layer's 2-D weight other than the MoE router's: what Muon orthogonalizes."""
    return ".layers." in name and param.ndim == 2 and ".router." not in name


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware: CUDA GPUs that support bf16, CPUs with AVX512-BF16 or AMX (other
    accelerators: assumed). Elsewhere they are emulated and several times slower than fp32 (docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16, torch's choice, where bf16 matmuls are native; fp32 elsewhere, where the bf16 iteration alone made a
    training step several times slower (benchmarks/optimizer_step.py; docs/benchmarks.md, "Training recipe")."""
    return torch.bfloat16 if bf16_is_native(device) else torch.float32


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton–Schulz iteration in `ns_dtype`. Written out because torch's step casts to
    bf16 unconditionally (torch/optim/_muon.py, `_zeropower_via_newtonschulz`); with `ns_dtype=torch.bfloat16` this
    step is torch's, bit for bit (tests/test_recipe.py), and the state (`momentum_buffer`) is the same."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **options):
        super().__init__(params, **options)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            # Nesterov momentum, orthogonalize, decoupled weight decay, then the shape-scaled step.
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, buffers, group["momentum"]) if group["nesterov"] else buffers
            updates = orthogonalized(updates, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            for param, update in zip(params, updates):
                param.add_(update, alpha=-group["lr"] * lr_ratio(group["adjust_lr_fn"], param.shape))
        return loss


def orthogonalized(matrices: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int, eps: float,
                   dtype: torch.dtype) -> list[torch.Tensor]:
    """Muon's quintic Newton–Schulz iteration (Jordan et al. 2024, github.com/KellerJordan/Muon) of each matrix, as
    torch runs it: X ← X / ‖X‖_F on the wide orientation, then `steps` times X ← aX + (bA + cA²)X with A = XXᵀ.

    Matrices of the same (wide) shape go through it together, one batched matmul per product instead of one per
    matrix: at the quality anchor's widths the iteration is a few hundred tiny matmuls per step, and their per-call
    cost, not their arithmetic, was most of Muon's time (docs/benchmarks.md, "Time to target"). Each matrix's
    result is its own iteration's: batching changes no arithmetic (tests/test_recipe.py compares with torch's Muon).
    """
    a, b, c = coefficients
    results: list[torch.Tensor | None] = [None] * len(matrices)
    by_shape: dict[tuple, list[tuple[int, bool]]] = {}
    for index, matrix in enumerate(matrices):
        tall = matrix.size(0) > matrix.size(1)
        by_shape.setdefault((matrix.device, *(matrix.mT if tall else matrix).shape), []).append((index, tall))
    for members in by_shape.values():
        x = torch.stack([matrices[i].mT if tall else matrices[i] for i, tall in members]).to(dtype)
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for (index, tall), result in zip(members, x.unbind(0)):
            results[index] = result.mT if tall else result
    return results


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate scaling by shape: "original" √max(1, rows/cols) (Jordan et al.),
    "match_rms_adamw" 0.2·√max(rows, cols) (Moonshot AI, "Muon is Scalable for LLM Training", 2025)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else 1.0


class ExpertMuon(Muon):
    """`Muon` for MoE expert tensors (experts, out, in), one matrix per expert, which torch's Muon (2-D
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
