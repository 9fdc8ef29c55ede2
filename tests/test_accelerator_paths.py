"""Branches of our code that run only on an accelerator, entered on this CPU-only machine.

Each test drives one such branch with what a CPU has: meta tensors (a device whose values cannot be read back, so a
host read fails loudly), a forced predicate (`on_accelerator`, `torch.cuda.is_current_stream_capturing`, the device
Hub kernels are resolved for), or plain-torch stand-ins for a GPU library (flash-attn's functions). The experts'
per-device and capture paths are tested in test_fast_paths.py, beside the other expert-dispatch tests.
"""

import pytest
import torch
from conftest import tiny_config, tiny_moe_config
from test_generation import generate_batch
from transformers.cache_utils import Cache

from acx_ramanujan import RamanujanForCausalLM, modeling_ramanujan
from acx_ramanujan.bench.gpu_check import kernelized_layers
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


# --- flash attention -------------------------------------------------------------------------------------------------


def reference_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's `flash_attn_func` in plain torch: (batch, seq, heads, dim), grouped-query heads, causal mask
    aligned to the bottom right (flash-attn ≥ 2.1: query i of Lq sees keys up to i + Lk − Lq)."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * softmax_scale
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)


def reference_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    """flash-attn's `flash_attn_varlen_func` in plain torch: (total tokens, heads, dim), one sequence per
    cu_seqlens interval, each attending only within itself."""
    pieces = []
    for i in range(len(cu_seqlens_q) - 1):
        qs, ks = slice(cu_seqlens_q[i], cu_seqlens_q[i + 1]), slice(cu_seqlens_k[i], cu_seqlens_k[i + 1])
        pieces.append(reference_flash(q[None, qs], k[None, ks], v[None, ks], softmax_scale=softmax_scale,
                                      causal=causal)[0])
    return torch.cat(pieces)


@pytest.fixture
def flash_attention_in_plain_torch(monkeypatch):
    """Transformers' flash-attention path (`flash_attention_forward`: unpadding, packed sequences from position_ids,
    varlen calls) with flash-attn's two functions replaced by the references above. Returns the names called."""
    from transformers import modeling_flash_attention_utils as flash_utils

    calls = []

    def recorded(function):
        def call(*args, **kwargs):
            calls.append(function.__name__)
            return function(*args, **kwargs)
        return call

    process = flash_utils._lazy_define_process_function(reference_flash_varlen)
    functions = (recorded(reference_flash), recorded(reference_flash_varlen), None, flash_utils._pad_input,
                 flash_utils._unpad_input)
    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention",
                        lambda implementation, *args, **kwargs: (functions, (process, dict)))
    return calls


def flash_and_eager(kind):
    """A model whose layers each have their own attention temperature (`attention_scale_alpha`): flash attention must
    get our scaling, not its default 1/√head_dim. Returns (model, switch), switch(name) setting the attention."""
    model = build(kind, attention_scale_alpha=0.3)

    def use(implementation):
        model.config._attn_implementation = implementation  # as `from_pretrained` sets it where flash-attn exists

    return model, use


@pytest.mark.parametrize("kind", CONFIGS)
def test_flash_attention_padding_free_batch_equals_each_sequence_alone(kind, flash_attention_in_plain_torch):
    """Padding-free training batches (DataCollatorWithFlattening, TRL's `padding_free`) put several sequences in one
    row, position_ids restarting at 0, no mask; flash attention turns those position_ids into varlen boundaries. Our
    forward must hand it the position_ids: each sequence's logits equal its own forward with eager attention."""
    model, use = flash_and_eager(kind)
    sequences = [torch.tensor(prompt) for prompt in prompts()]
    with torch.no_grad():
        use("eager")
        alone = torch.cat([model(sequence[None]).logits[0] for sequence in sequences])
        use("flash_attention_2")
        packed = torch.cat(sequences)[None]
        position_ids = torch.cat([torch.arange(len(sequence)) for sequence in sequences])[None]
        got = model(packed, position_ids=position_ids).logits[0]
    assert set(flash_attention_in_plain_torch) == {"reference_flash_varlen"}
    torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", CONFIGS)
def test_flash_attention_padded_batch_and_generation_equal_eager(kind, flash_attention_in_plain_torch):
    """A left-padded batch (flash unpads it by the mask and runs varlen) gives eager's logits on real tokens, and
    greedy generation with the KV cache (prefill, then one query against the cache per step) gives eager's tokens,
    padded (varlen at every step) and unpadded (flash-attn's plain function, causal aligned to the cache's end)."""
    model, use = flash_and_eager(kind)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    settings = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                    pad_token_id=model.config.pad_token_id)
    results = {}
    with torch.no_grad():
        for implementation in ("eager", "flash_attention_2"):
            use(implementation)
            results[implementation] = (model(ids, attention_mask=mask).logits, model.generate(ids, **settings))
            if implementation != "eager":
                assert set(flash_attention_in_plain_torch) == {"reference_flash_varlen"}  # padding: every call
            unpadded = {**settings, "attention_mask": torch.ones_like(ids[:1])}
            results[implementation] += (model.generate(ids[:1], **unpadded),)
    assert set(flash_attention_in_plain_torch) == {"reference_flash_varlen", "reference_flash"}
    assert torch.equal(results["flash_attention_2"][2], results["eager"][2])
    real = mask.bool()
    torch.testing.assert_close(results["flash_attention_2"][0][real], results["eager"][0][real], rtol=1e-4, atol=1e-5)
    assert torch.equal(results["flash_attention_2"][1], results["eager"][1])


# --- model cards -----------------------------------------------------------------------------------------------------


def test_card_names_the_gpu_a_run_used(monkeypatch):
    from acx_ramanujan.cards import hardware_description

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert hardware_description(torch.device("cuda"), 8) == "8 processes on NVIDIA H100 80GB HBM3"
