"""Branches of our code that run only on an accelerator, entered on this CPU-only machine.

Each test drives one such branch with what a CPU has: meta tensors (a device whose values cannot be read back, so a
host read fails loudly) or a forced predicate (`on_accelerator`, `torch.cuda.is_current_stream_capturing`, the device
Hub kernels are resolved for). The experts' per-device and capture paths are tested in test_fast_paths.py, beside the
other expert-dispatch tests.
"""

import pytest
import torch
from conftest import tiny_config, tiny_moe_config
from test_generation import generate_batch
from transformers.cache_utils import Cache

from acx_ramanujan import RamanujanForCausalLM, modeling_ramanujan
from acx_ramanujan.modeling_ramanujan import check_ids_in_range

CONFIGS = {"dense": tiny_config, "moe": tiny_moe_config}


def build(kind="dense", seed=0, **overrides):
    torch.manual_seed(seed)
    return RamanujanForCausalLM(CONFIGS[kind](**overrides)).eval()


def prompts(seed=1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=generator).tolist() for length in (5, 9, 3)]


def greedy(model, prompt: list[int], new_tokens: int = 5) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


# --- continuous batching ---------------------------------------------------------------------------------------------


def test_id_range_check_skips_continuous_batchings_paged_cache_on_accelerators():
    """`generate_batch` hands the forward a `PagedAttentionCache`, which is not a `Cache` (no `is_initialized`): with
    ids on an accelerator the check raised AttributeError at the first forward. The cache here is the very object
    continuous batching passed to our forward; meta ids stand for an accelerator's (reading them raises)."""
    model = build()
    caches = []
    # `cache=` on every supported release (continuous batching took the 5.24 name in 5.23 already)
    model.register_forward_pre_hook(lambda module, args, kwargs: caches.append(kwargs["cache"]), with_kwargs=True)
    generate_batch(model, prompts(), new_tokens=1)
    paged = caches[0]
    assert type(paged).__name__ == "PagedAttentionCache" and not isinstance(paged, Cache)
    check_ids_in_range(torch.zeros(1, 4, dtype=torch.long, device="meta"), 259, "token id", paged)  # not read
    with pytest.raises(ValueError, match="token id 300"):  # on CPU the ids are still checked (a free read)
        check_ids_in_range(torch.tensor([[1, 300]]), 259, "token id", paged)


@pytest.mark.parametrize("kind", CONFIGS)
def test_generate_batch_with_the_accelerator_branches_taken_equals_generate(kind, monkeypatch):
    """With `on_accelerator` forced, a whole `generate_batch` run takes the accelerator branches (id check skipped
    for the paged cache; MoE experts through grouped_mm) and gives each prompt `generate()`'s tokens."""
    model = build(kind)
    expected = [greedy(model, prompt) for prompt in prompts()]
    monkeypatch.setattr(modeling_ramanujan, "on_accelerator", lambda tensor: True)
    assert generate_batch(model, prompts(), new_tokens=5) == expected


def test_id_range_check_reads_nothing_while_a_cuda_graph_is_captured(monkeypatch):
    """Continuous batching captures CUDA graphs; a capture cannot read ids back. While a capture is on (forced),
    even a forward without a cache (which otherwise checks) must not read: meta ids raise if read."""
    on_accelerator = torch.zeros(1, 4, dtype=torch.long, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_ids_in_range(on_accelerator, 259, "token id", None)  # no capture: read (and meta cannot be read)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    check_ids_in_range(on_accelerator, 259, "token id", None)


# --- Hub kernels -----------------------------------------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def kernelized_layers(model) -> dict[str, str]:
    """{module class: Hub kernel layer} of every module (or module's rotary function) that kernelize replaced."""
    found = {}
    for module in model.modules():
        for owner in (module, *module.__dict__.get("_kernel_funcs", {}).values()):
            repo = owner.__dict__.get("_kernel_repo")
            if repo is not None:
                found[type(owner).__name__ if owner is module else "rotary function"] = repo.layer_name
    return found


def test_hub_kernels_resolve_for_our_layers_as_for_llamas(kernels_on_a_fake_gpu):
    """On CUDA, Hub kernelization (what `from_pretrained` runs from 5.25) replaces our RMSNorm, rotary function and
    SiLU with the kernels it gives Llama's: the same kernel names, and they run in the forward."""
    from kernels import Mode
    from transformers.integrations import hub_kernels

    hub_kernels.register_kernel_mapping_transformers()
    resolved, ran = {}, {}
    for name, model in (("ours", build("moe")), ("llama", tiny_llama())):
        hub_kernels.kernelize(model, mode=Mode.INFERENCE)
        resolved[name] = sorted(set(kernelized_layers(model).values()))
        kernels_on_a_fake_gpu.clear()
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        ran[name] = sorted(set(kernels_on_a_fake_gpu))
    assert resolved["ours"] == resolved["llama"] == ran["ours"] == ran["llama"], (resolved, ran)
    assert {"LigerRMSNorm", "apply_rotary_transformers"} <= set(resolved["ours"])


@pytest.mark.parametrize("use_hub_kernels", [None, "0"])
def test_from_pretrained_applies_hub_kernels_as_for_llama_unless_turned_off(use_hub_kernels, kernels_on_a_fake_gpu,
                                                                             tmp_path, monkeypatch):
    """`from_pretrained` kernelizes our layers exactly when it kernelizes Llama's (by default from 5.25) and, with
    `USE_HUB_KERNELS=0`, neither."""
    from transformers import AutoModelForCausalLM

    if use_hub_kernels is None:
        monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    else:
        monkeypatch.setenv("USE_HUB_KERNELS", use_hub_kernels)
    loaded = {}
    for name, model in (("ours", build("dense")), ("llama", tiny_llama())):
        model.save_pretrained(tmp_path / name)
        loaded[name] = kernelized_layers(AutoModelForCausalLM.from_pretrained(tmp_path / name))
    assert sorted(loaded["ours"].values()) == sorted(loaded["llama"].values()), loaded
    if use_hub_kernels == "0":
        assert loaded["ours"] == {}
