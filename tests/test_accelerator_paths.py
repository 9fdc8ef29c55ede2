"""Branches of our code that run only on an accelerator, entered on this CPU-only machine.

Each test drives one such branch with what a CPU has: meta tensors (a device whose values cannot be read back, so a
host read fails loudly) or a forced predicate (`on_accelerator`, `torch.cuda.is_current_stream_capturing`).
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
