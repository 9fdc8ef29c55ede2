"""How a run is spread over processes: FSDP on CPU processes, and the lines that say, at startup, how it is laid out.

Accelerate 1.15 turns the launcher's FSDP (`distributed_type: FSDP`, ACCELERATE_USE_FSDP) on only for accelerator
devices: with CPU processes (ACCELERATE_USE_CPU=1) `AcceleratorState` drops the FSDP plugin and the run silently
becomes a replicated MULTI_CPU run (state.py: MULTI_CPU is missing from the device types that select FSDP).
PyTorch's FSDP2 (`fully_shard`) itself shards CPU tensors over gloo, so `enable_fsdp_on_cpu` makes the one switch
Accelerate's state makes on a GPU (distributed type FSDP, the plugin read from the launcher's environment); every
FSDP code path after it (`prepare`, `save_state`/`load_state` through torch.distributed.checkpoint,
`get_state_dict`) is Accelerate's own. No Accelerate API does this, hence the few lines here.
"""

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Under `accelerate launch` with an FSDP config on CPU processes, use FSDP as the config says (see above)."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables, as Accelerator() reads them
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # PartialState and AcceleratorState are two shared-state singletons; AcceleratorState copies PartialState's
    # fields each time it is constructed (as Accelerate does during `prepare`), so both are set.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


@contextmanager
def buffers_fsdp2_can_load(model: torch.nn.Module, accelerator: Accelerator):
    """Around `accelerator.prepare(model, ...)`: let FSDP2's `cpu_ram_efficient_loading` take persistent buffers.

    That loading (Accelerate 1.15, `fsdp2_load_full_state_dict`) rebuilds the sharded model entry by entry from
    rank 0's state dict and takes every entry for a sharded parameter: a persistent buffer (the MoE routers'
    balancing bias, `e_score_correction_bias`, as in DeepSeek-V3) fails there with "'Tensor' object has no attribute
    'device_mesh'". Non-persistent buffers it keeps, each process its own copy. So persistent buffers are marked
    non-persistent for the `prepare` and persistent again after: every process builds the model the same way, so
    the copies are equal, and checkpoints keep the buffers as before.
    """
    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    if not (plugin is not None and plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading):
        yield
        return
    saved = model.state_dict(keep_vars=True).keys()
    persistent = []
    for name, _ in model.named_buffers():
        if name in saved:
            owner, _, local = name.rpartition(".")
            persistent.append((model.get_submodule(owner), local))
    for module, name in persistent:
        module.register_buffer(name, getattr(module, name), persistent=False)
    try:
        yield
    finally:
        for module, name in persistent:  # Accelerate registers a copy: the tensor the module holds now
            module.register_buffer(name, getattr(module, name), persistent=True)


def describe_launch(accelerator: Accelerator) -> str:
    """One line: processes, distributed type, backend and device; for FSDP its version, sharding, wrapped layers and
    checkpoint format. Printed first, so that a one-process run is never mistaken for several."""
    state = accelerator.state
    line = (f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}, distributed type "
            f"{accelerator.distributed_type.value}, backend {state.backend or 'none'}, device {accelerator.device.type}, "
            f"mixed precision {accelerator.mixed_precision}")
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = state.fsdp_plugin
        if plugin.fsdp_version == 2:
            strategy = "FULL_SHARD" if plugin.reshard_after_forward else "SHARD_GRAD_OP"
            strategy += f" (reshard_after_forward={plugin.reshard_after_forward})"
        else:
            strategy = plugin.sharding_strategy.name
        wrapped = ", ".join(plugin.transformer_cls_names_to_wrap or []) or "by size"
        line += (f"; FSDP{plugin.fsdp_version} sharding {strategy}, one unit per {wrapped}, "
                 f"checkpoints {plugin.state_dict_type.name}")
    return line


def describe_shards(model: torch.nn.Module, accelerator: Accelerator) -> str:
    """What this process holds of the parameters, counted from its own local shards (DTensor.to_local).

    One line per process: the share of all parameter elements it stores, and the largest share it stores of any
    single parameter (about 1/world size when every parameter is sharded)."""
    held = total = 0
    largest, replicated = 0.0, []
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        held, total = held + local.numel(), total + param.numel()
        largest = max(largest, local.numel() / param.numel())
        if not hasattr(param, "to_local"):
            replicated.append(name)
    line = (f"rank {accelerator.process_index} of {accelerator.num_processes} holds {held:,} of {total:,} parameter "
            f"elements ({held / total:.1%}); largest share of one parameter {largest:.1%}")
    return line + (f"; not sharded: {', '.join(replicated)}" if replicated else "")
