"""The decoder behaves like a model that ships inside Transformers: shapes, cache, masks, save/load, MoE routing."""

import inspect
import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import run_without_package, tiny_config, tiny_moe_config
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from acx_ramanujan import RamanujanForCausalLM, RamanujanForSequenceClassification, RamanujanModel
from acx_ramanujan.modeling_ramanujan import (
    CACHE_NAME,
    RamanujanRMSNorm,
    expert_load,
    load_balancing_loss,
    switch_balance_loss,
    router_z_loss,
)

CONFIGS = {
    "dense": tiny_config, "moe": tiny_moe_config,
    "moe_qk_norm": lambda **overrides: tiny_moe_config(qk_norm=True, **overrides),
}


def build(kind="dense", seed=0, **overrides):
    torch.manual_seed(seed)
    return RamanujanForCausalLM(CONFIGS[kind](**overrides)).eval()


def random_ids(batch=2, length=12, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_random_norms(model):
    """Every RMSNorm weight (the q/k norms too) drawn away from its initial ones, so each must be applied right."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kind", CONFIGS)
def test_shapes_and_outputs(kind):
    model = build(kind)
    ids = random_ids(3, 10)
    out = model(ids, output_hidden_states=True, output_attentions=False)
    assert out.logits.shape == (3, 10, 259)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids))
    base = model.model(ids)
    assert base.last_hidden_state.shape == (3, 10, 32)
    as_tuple = model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    assert model(ids, logits_to_keep=1).logits.shape == (3, 1, 259)


def test_auto_classes_resolve():
    config = tiny_config()
    assert type(AutoModelForCausalLM.from_config(config)) is RamanujanForCausalLM
    assert type(AutoModel.from_config(config)) is RamanujanModel
    assert type(AutoModelForSequenceClassification.from_config(config)) is RamanujanForSequenceClassification


def test_llama_module_names():
    model = build("moe", num_shared_experts=1, first_k_dense_layers=1)
    names = {name for name, _ in model.named_modules()}
    for expected in [
        "model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm", "model.norm", "lm_head", "model.layers.1.mlp.router",
        "model.layers.1.mlp.experts", "model.layers.1.mlp.shared_experts.gate_proj",
    ]:
        assert expected in names, expected


PLAN_SHAPES = {  # each config's plans may name only modules that config builds
    "dense": ("dense", {}),
    "dense-tied": ("dense", {"tie_word_embeddings": True}),
    "moe": ("moe", {}),
    "moe-shared-dense-first": ("moe", {"num_shared_experts": 1, "first_k_dense_layers": 1}),
    "qk_norm": ("dense", {"qk_norm": True}),
}


@pytest.mark.parametrize("shape", PLAN_SHAPES)
def test_parallel_plans_name_modules_that_exist(shape):
    """Every tensor-, expert- and pipeline-parallel rule names a module or parameter of the built model and a style
    Transformers knows; the embedding is split like the head it may be tied to; experts get an expert plan."""
    import re

    from transformers.distributed import expert_parallel, tensor_parallel  # noqa: F401  (they register the styles)
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    kind, overrides = PLAN_SHAPES[shape]
    model = build(kind, **overrides)
    names = {name for name, _ in model.named_modules()}
    names |= {name for name, _ in model.named_parameters(remove_duplicate=False)}
    plans = {"tp": model.tp_plan, "ep": model.ep_plan or {}, "pp": model.pp_plan}
    assert plans["tp"]["model.embed_tokens"] == "embedding_rowwise" and "lm_head" in plans["tp"]
    assert ("model.layers.*.mlp.experts" in plans["ep"]) == (kind == "moe")
    for plan_kind, plan in plans.items():
        for key, style in plan.items():
            pattern = re.compile(re.escape(key).replace(r"\*", r"\d+"))
            assert any(pattern.fullmatch(name) for name in names), f"{plan_kind} plan rule {key!r} matches no module"
            if plan_kind != "pp":
                assert style in ALL_PARALLEL_STYLES, f"{plan_kind} plan style {style!r} of {key!r} is unknown"
    layer_inputs = plans["pp"]["model.layers"][0]
    assert set(layer_inputs) <= set(inspect.signature(model.model.layers[0].forward).parameters)


def test_tensor_parallel_plan_applies_without_deprecation(tmp_path):
    """Our TP plan, applied by Transformers' own `apply_tensor_parallelism` on a one-process gloo mesh (every shard
    whole, so the logits must not change), warns about nothing: since 5.25 the expert styles (`moe_tp_experts`,
    removed in 5.28) are deprecated, and the routed experts are replicated under TP as in Qwen3-MoE."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    # every kind of layer the plan has rules for
    model = build("moe", num_shared_experts=1, first_k_dense_layers=1, qk_norm=True)
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        plan = model._expand_parallel_plan(model.tp_plan)
        assert deprecation_messages(lambda: apply_tensor_parallelism(model, mesh, plan)) == []
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    finally:
        torch.distributed.destroy_process_group()


def test_token_id_out_of_range_is_named():
    model = build()
    with pytest.raises(ValueError, match=r"token id 300 .*vocab_size=259"):
        model(torch.tensor([[1, 2, 300]]))
    with pytest.raises(ValueError, match=r"token id -1"):
        model(torch.tensor([[1, -1]]))


@pytest.mark.parametrize("tied", [False, True])
def test_resized_embeddings_take_new_ids(tied):
    """After resize_token_embeddings the new ids run through forward, loss and generate; the next id past is named."""
    model = build(tie_word_embeddings=tied)
    model.resize_token_embeddings(300)
    new_id = torch.tensor([[1, 2, 299]])
    out = model(new_id, labels=new_id)
    assert out.logits.shape == (1, 3, 300) and torch.isfinite(out.loss)
    assert model.generate(new_id, max_new_tokens=2, do_sample=False, pad_token_id=256).shape == (1, 5)
    with pytest.raises(ValueError, match=r"token id 300 .*vocab_size=300"):
        model(torch.tensor([[1, 300]]))


def test_id_range_check_skips_decode_steps_on_accelerators():
    """The range check reads the ids back to the host (a sync on an accelerator). On CPU it always runs (free); on
    any other device it runs unless the pass extends a filled cache (a decode step). A CPU machine cannot run an
    accelerator, so this drives the policy with meta tensors, which have a device but no values to read: reading one
    raises, so "no error" proves the check did not read."""
    from acx_ramanujan.modeling_ramanujan import check_ids_in_range

    model = build()
    filled = getattr(model(random_ids(1, 3), use_cache=True), CACHE_NAME)
    on_accelerator = torch.zeros(1, 1, dtype=torch.long, device="meta")
    check_ids_in_range(on_accelerator, 259, "token id", filled)  # decode step: not read
    for cache in (None, type(filled)(config=model.config)):  # no cache (training), or an empty one (prefill): read
        with pytest.raises((RuntimeError, NotImplementedError)):
            check_ids_in_range(on_accelerator, 259, "token id", cache)
    with pytest.raises(ValueError, match="token id 300"):  # CPU: checked even when extending a cache
        check_ids_in_range(torch.tensor([[300]]), 259, "token id", filled)


@pytest.mark.parametrize("kind", CONFIGS)
def test_tiny_overfit_loss_drops(kind):
    model = build(kind).train()
    ids = random_ids(2, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_causal_lm_loss_is_shifted_cross_entropy():
    model = build()
    ids = random_ids(2, 9)
    out = model(ids, labels=ids)
    reference = F.cross_entropy(out.logits[:, :-1].reshape(-1, 259), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert out.aux_loss is None


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_cached_and_uncached_greedy_generation_match(kind, attention):
    model = build(kind)
    model.set_attn_implementation(attention)
    prompt = random_ids(2, 5)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=256)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=256)
    assert torch.equal(cached, uncached)
    # and greedy means: each new token is the argmax of a full forward pass over everything before it
    sequence = prompt[:1]
    for _ in range(12):
        next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(sequence, cached[:1])


def deprecation_messages(call) -> list[str]:
    """The FutureWarnings and Transformers log records mentioning deprecation that `call()` emits."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # Transformers warns once per process; start afresh
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FutureWarning)
            call()
    finally:
        transformers_logger.removeHandler(handler)
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    return messages + [r.getMessage() for r in records if "deprecated" in r.getMessage()]


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cache_is_taken_under_both_names_and_warns_as_llama_does(name):
    """Transformers 5.24 passes the KV cache as `cache=`, earlier 5.x releases as `past_key_values=`: both names extend
    the cache (same logits as one full pass). generate() warns about nothing on any release; an explicit
    `past_key_values=` warns exactly when Llama on the installed release warns (5.24+: it is deprecated there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = build()
    ids = random_ids(2, 7)
    full = model(ids).logits
    prefix = model(ids[:, :4], use_cache=True)
    cache = getattr(prefix, CACHE_NAME)
    steps = []
    ours = deprecation_messages(lambda: steps.append(model(ids[:, 4:], **{name: cache})))
    torch.testing.assert_close(steps[0].logits, full[:, 4:], rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 7

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2)).eval()
    llama_cache = getattr(llama(ids[:, :4], use_cache=True), CACHE_NAME)
    llamas = deprecation_messages(lambda: llama(ids[:, 4:], **{name: llama_cache}))
    assert bool(ours) == bool(llamas), (ours, llamas)
    assert deprecation_messages(lambda: model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=256)) == []


@pytest.mark.parametrize("kind", CONFIGS)
def test_eager_and_sdpa_agree_with_padding(kind):
    model = build(kind)
    ids = random_ids(3, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    model.set_attn_implementation("sdpa")
    sdpa = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(sdpa[keep], eager[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", CONFIGS)
def test_left_padded_batch_generation_equals_single(kind):
    model = build(kind)
    short, long = random_ids(1, 4, seed=2)[0], random_ids(1, 9, seed=3)[0]
    pad = model.config.pad_token_id
    batch = torch.stack([torch.cat([torch.full((5,), pad), short]), long])
    mask = (torch.arange(9) >= 5).long().unsqueeze(0).repeat(2, 1)
    mask[1] = 1
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    for row, prompt in enumerate([short, long]):
        single = model.generate(prompt[None], max_new_tokens=8, do_sample=False, pad_token_id=pad)
        assert torch.equal(batched[row, 9:], single[0, len(prompt):]), row


def test_attention_scale_follows_the_seed_formula():
    config = tiny_config(num_hidden_layers=3, attention_scale_alpha=0.3, attention_scale_decay=0.5)
    model = RamanujanForCausalLM(config)
    for layer_idx, layer in enumerate(model.model.layers):
        expected = 1 / (math.sqrt(config.head_dim) * (1 + 0.3 * math.exp(-0.5 * layer_idx)))
        assert layer.self_attn.scaling == pytest.approx(expected)
    standard = RamanujanForCausalLM(tiny_config(attention_scale_alpha=0.0))
    assert standard.model.layers[0].self_attn.scaling == pytest.approx(config.head_dim**-0.5)


def test_eager_attention_matches_naive_softmax():
    """Layer-0 attention output against a hand-written causal softmax attention with GQA and the seed's scale."""
    model = build()
    model.set_attn_implementation("eager")
    attention = model.model.layers[0].self_attn
    x = torch.randn(2, 6, 32)
    positions = torch.arange(6)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    additive_mask = torch.zeros(6, 6).masked_fill(future, float("-inf"))[None, None]
    out, _ = attention(x, position_embeddings=(cos, sin), attention_mask=additive_mask)
    heads, kv_heads, d = 4, 2, 8
    q = attention.q_proj(x).view(2, 6, heads, d).transpose(1, 2)
    k = attention.k_proj(x).view(2, 6, kv_heads, d).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attention.v_proj(x).view(2, 6, kv_heads, d).transpose(1, 2).repeat_interleave(2, dim=1)

    def rotate(t):  # rotary: (x1, x2) → (x1 cos − x2 sin, x2 cos + x1 sin), pairs split by halves
        t1, t2 = t[..., : d // 2], t[..., d // 2 :]
        c, s = cos[:, None, :, : d // 2], sin[:, None, :, : d // 2]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], dim=-1)

    scores = rotate(q) @ rotate(k).transpose(-1, -2) * attention.scaling
    scores = scores.masked_fill(future, float("-inf"))
    reference = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32)
    torch.testing.assert_close(out, attention.o_proj(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_gradient_checkpointing_gives_same_gradients(kind, enable):
    ids = random_ids(2, 10)

    def gradients(checkpointing: bool):
        model = build(kind).train()
        if checkpointing:
            getattr(model, enable)()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", CONFIGS)
def test_save_load_round_trip_identical_logits(kind, tmp_path):
    model = with_random_norms(build(kind, rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    ids = random_ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert {"configuration_ramanujan.py", "modeling_ramanujan.py", "initialization_ramanujan.py"} <= files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert torch.equal(loaded(ids).logits, expected)
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name


def test_tied_embeddings_save_and_load(tmp_path):
    model = build(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = RamanujanForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("kind", CONFIGS)
def test_remote_code_load_in_fresh_process(kind, tmp_path):
    model = with_random_norms(build(kind))
    ids = random_ids()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    import json

    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_ramanujan.RamanujanForCausalLM"
    run_without_package(
        f"""
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)  # as the parent: matmul blocking (and so rounding) depends on the thread count
expected = torch.load({str(tmp_path / "expected.pt")!r})
model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert torch.equal(model(expected["ids"]).logits, expected["logits"])
""",
        cwd=tmp_path,
    )


def test_every_head_loads_by_remote_code_whichever_head_saved(tmp_path):
    """config.json's auto_map names all heads, so a causal-LM checkpoint loads as a classifier or a base model (and a
    classifier checkpoint as a causal LM) with trust_remote_code, in a process where our package cannot be imported."""
    import json

    model = build()
    lm_dir, classifier_dir = tmp_path / "causal_lm", tmp_path / "classifier"
    model.save_pretrained(lm_dir)
    RamanujanForSequenceClassification(tiny_config(num_labels=3)).save_pretrained(classifier_dir)
    heads = {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    for directory in (lm_dir, classifier_dir):
        assert set(json.loads((directory / "config.json").read_text())["auto_map"]) == heads
    ids = random_ids()
    torch.save({"ids": ids, "hidden": model.model(ids).last_hidden_state}, tmp_path / "expected.pt")
    run_without_package(
        f"""
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
torch.set_num_threads(1)
expected = torch.load({str(tmp_path / "expected.pt")!r})
classifier = AutoModelForSequenceClassification.from_pretrained({str(lm_dir)!r}, trust_remote_code=True, num_labels=3)
assert type(classifier).__module__.startswith("transformers_modules"), type(classifier).__module__
assert type(classifier).__name__ == "RamanujanForSequenceClassification", type(classifier)
classifier.eval()
assert torch.equal(classifier.model(expected["ids"]).last_hidden_state, expected["hidden"])
assert classifier(expected["ids"]).logits.shape == (2, 3)
base = AutoModel.from_pretrained({str(lm_dir)!r}, trust_remote_code=True).eval()
assert torch.equal(base(expected["ids"]).last_hidden_state, expected["hidden"])
causal_lm = AutoModelForCausalLM.from_pretrained({str(classifier_dir)!r}, trust_remote_code=True)
assert type(causal_lm).__name__ == "RamanujanForCausalLM", type(causal_lm)
""",
        cwd=tmp_path,
    )


def test_sequence_classification_pools_last_non_pad_token():
    torch.manual_seed(0)
    model = RamanujanForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids = random_ids(2, 8)
    pad = model.config.pad_token_id
    padded = ids.clone()
    padded[0, 5:] = pad  # right padding: last real token at 4
    out = model(padded, attention_mask=(padded != pad).long(), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    alone = model(padded[:1, :5]).logits
    torch.testing.assert_close(out.logits[:1], alone, rtol=1e-5, atol=1e-6)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits, torch.tensor([0, 2])).item(), rel=1e-5)


# ---------------------------------------------------------------- mixture of experts


def naive_moe_forward(block, x):
    """Every token, one at a time, through its own top-k experts: the reference for the batched dispatch."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    experts = block.experts
    for t in range(flat.shape[0]):
        probs = torch.softmax(block.router(flat[t]), dim=-1)
        weights, chosen = torch.topk(probs, block.top_k)
        if block.norm_topk_prob:
            weights = weights / weights.sum()
        for w, e in zip(weights, chosen):
            gate_up = experts.gate_up_proj[e] @ flat[t]
            gate, up = gate_up.chunk(2)
            out[t] += w * (experts.down_proj[e] @ (F.silu(gate) * up))
        if block.shared_experts is not None:
            out[t] += block.shared_experts(flat[t])
    return out.reshape(x.shape)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("shared", [0, 1])
def test_moe_routing_matches_naive_loop(implementation, shared):
    model = build("moe", num_shared_experts=shared)
    model.set_experts_implementation(implementation)
    block = model.model.layers[0].mlp
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_moe_forward(block, x), rtol=1e-4, atol=1e-5)


def test_moe_drops_no_token_even_when_all_pick_one_expert():
    model = build("moe", num_experts=4, num_experts_per_tok=1)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[2, 0] = 1.0  # expert 2 wins for every token whose feature 0 > 0
    x = torch.randn(2, 16, 32).abs()
    with torch.no_grad():
        out = block(x)
        assert torch.all(out.abs().sum(-1) > 0)  # no token skipped, however unbalanced
        torch.testing.assert_close(out, naive_moe_forward(block, x), rtol=1e-4, atol=1e-5)


def test_load_balancing_loss_on_hand_made_logits():
    # 4 tokens, 4 experts, top-2. Perfectly balanced: every expert chosen by half the tokens, mean prob 1/4 → loss
    # E · Σ_e ½ · ¼ = 2 = k.
    balanced = torch.tensor(
        [[5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0], [5.0, 0.0, 5.0, 0.0], [0.0, 5.0, 0.0, 5.0]]
    )
    assert load_balancing_loss((balanced,), top_k=2).item() == pytest.approx(2.0, rel=1e-6)
    # Collapsed: every token picks experts 0 and 1 with prob p each: assignments per token (1, 1, 0, 0).
    collapsed = torch.tensor([[3.0, 3.0, 0.0, 0.0]] * 4)
    p = math.exp(3) / (2 * math.exp(3) + 2)
    q = 1 / (2 * math.exp(3) + 2)
    assert load_balancing_loss((collapsed,), top_k=2).item() == pytest.approx(4 * (p + p), rel=1e-6)
    # Padding is left out: masking the collapsed rows of a mixed batch gives the balanced value.
    mixed = torch.cat([balanced, collapsed])
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    assert load_balancing_loss((mixed,), 2, mask).item() == pytest.approx(2.0, rel=1e-6)
    # Layers are pooled (Mixtral's form), not averaged: f = (¾, ¾, ¼, ¼), P = ((¼ + p)/2, ×2, (¼ + q)/2, ×2).
    both = load_balancing_loss((balanced, collapsed), 2).item()
    assert both == pytest.approx(3 * (0.25 + p) + (0.25 + q), rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_is_mixtrals(top_k, masked):
    """Without a router bias, `load_balancing_loss` is Transformers' Mixtral `load_balancing_loss_func` (which
    Qwen3-MoE uses): random logits of three layers, six experts, with and without a padding mask, several k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    generator = torch.Generator().manual_seed(top_k)
    logits = tuple(torch.randn(2 * 9, 6, generator=generator) for _ in range(3))
    mask = (torch.rand(2, 9, generator=generator) > 0.3).long() if masked else None
    ours = load_balancing_loss(logits, top_k, mask)
    mixtral = load_balancing_loss_func(logits, num_experts=6, top_k=top_k, attention_mask=mask)
    torch.testing.assert_close(ours, mixtral, rtol=1e-6, atol=1e-7)
    biases = tuple(torch.zeros(6) for _ in logits)  # a zero balancing bias changes nothing
    torch.testing.assert_close(load_balancing_loss(logits, top_k, mask, biases), mixtral, rtol=1e-6, atol=1e-7)


def test_aux_loss_matches_qwen3_moes_on_its_own_router_logits_and_its_test():
    """Qwen3-MoE's `aux_loss` on its own router logits is ours on the same logits, and our fresh model gives what
    Qwen3-MoE's own test_load_balancing_loss expects of a fresh model: 2.0 at top-2 (rtol 1e-2), unchanged by masked
    padding, changed by unmasked padding."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    ids = random_ids(2, 11)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    torch.manual_seed(0)
    qwen = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=259, hidden_size=32, intermediate_size=64,
                                              moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
                                              output_router_logits=True)).eval()
    out = qwen(ids, attention_mask=mask)
    torch.testing.assert_close(load_balancing_loss(out.router_logits, 2, mask), out.aux_loss, rtol=1e-6, atol=1e-7)

    model = build("moe", num_experts=3, num_experts_per_tok=2)
    ours = model(ids, output_router_logits=True).aux_loss
    torch.testing.assert_close(ours, torch.tensor(2.0), rtol=1e-2, atol=1e-2)
    pad = model.config.pad_token_id
    padded = torch.cat([torch.full((2, 50), pad), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(2, 50, dtype=torch.long), torch.ones_like(ids)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=padded_mask, output_router_logits=True).aux_loss, ours,
                               rtol=1e-4, atol=1e-4)
    assert model(padded, output_router_logits=True).aux_loss.item() != pytest.approx(ours.item(), abs=1e-4)


def qwen3_twin(model):
    """Transformers' Qwen3ForCausalLM (dense) / Qwen3MoeForCausalLM (MoE) holding the weights of a qk_norm `model`,
    written out by hand from the two classes' fields. Qwen3 scales attention by 1/√head_dim: our layer-l temperature
    1/(1 + α·e^(−λ·l)) multiplies q_norm's weight (the normalized q; RoPE is linear, so q·k scales the same)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = model.config
    fields = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                  num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
                  rms_norm_eps=config.rms_norm_eps, rope_parameters=config.rope_parameters,
                  tie_word_embeddings=config.tie_word_embeddings, max_position_embeddings=config.max_position_embeddings,
                  pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    if config.is_moe:
        twin = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **fields, num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
            mlp_only_layers=list(range(config.first_k_dense_layers))))
    else:
        twin = Qwen3ForCausalLM(Qwen3Config(**fields))
    state = {name.replace(".mlp.router.", ".mlp.gate."): tensor for name, tensor in model.state_dict().items()
             if not name.endswith("e_score_correction_bias")}
    for layer in range(config.num_hidden_layers):
        temperature = 1 / (1 + config.attention_scale_alpha * math.exp(-config.attention_scale_decay * layer))
        state[f"model.layers.{layer}.self_attn.q_norm.weight"] = state[f"model.layers.{layer}.self_attn.q_norm.weight"] * temperature
    twin.load_state_dict(state, strict=True)
    return twin.eval()


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("kind, overrides", [
    ("dense", {}),
    ("dense", {"tie_word_embeddings": True, "head_dim": 16, "num_key_value_heads": 1}),
    ("moe", {"first_k_dense_layers": 1, "norm_topk_prob": False}),
])
def test_qk_norm_is_qwen3s_attention(kind, overrides, alpha):
    """With qk_norm our model computes Transformers' Qwen3 (dense) / Qwen3-MoE: logits of a left-padded batch, and
    greedy generate() through both KV caches, step by step; the seed's temperature α still applies."""
    model = with_random_norms(build(kind, qk_norm=True, attention_scale_alpha=alpha, **overrides))
    assert isinstance(model.model.layers[1].self_attn.q_norm, RamanujanRMSNorm)
    twin = qwen3_twin(model)
    ids = random_ids(3, 13)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, twin(ids, attention_mask=mask).logits
    assert (ours - theirs)[mask.bool()].abs().max() < 1e-5

    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=256, eos_token_id=None,
                    output_logits=True, return_dict_in_generate=True)
    ours, theirs = model.generate(ids, **settings), twin.generate(ids, **settings)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert max((a - b).abs().max() for a, b in zip(ours.logits, theirs.logits)) < 1e-5


def test_qk_norm_weights_are_per_head_and_start_at_one():
    """q_norm / k_norm exist only with qk_norm, hold one weight per head channel (shared by the heads), start at 1."""
    model = build(qk_norm=True)
    attention = model.model.layers[0].self_attn
    assert attention.q_norm.weight.shape == attention.k_norm.weight.shape == (model.config.head_dim,)
    assert torch.equal(attention.q_norm.weight, torch.ones(model.config.head_dim))
    assert attention.q_norm.variance_epsilon == model.config.rms_norm_eps
    assert not any("q_norm" in name or "k_norm" in name for name, _ in build().named_parameters())


def test_switch_balance_loss_on_hand_made_logits():
    """The training term: the same balance loss per layer with the top-k shares (1.0 at balance for any k),
    averaged over layers (the first release's closed forms)."""
    balanced = torch.tensor(
        [[5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0], [5.0, 0.0, 5.0, 0.0], [0.0, 5.0, 0.0, 5.0]]
    )
    assert switch_balance_loss((balanced,), top_k=2).item() == pytest.approx(1.0, rel=1e-6)
    collapsed = torch.tensor([[3.0, 3.0, 0.0, 0.0]] * 4)  # shares (1/2, 1/2, 0, 0), prob p each on experts 0 and 1
    p = math.exp(3) / (2 * math.exp(3) + 2)
    assert switch_balance_loss((collapsed,), top_k=2).item() == pytest.approx(4 * (0.5 * p + 0.5 * p), rel=1e-6)
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    assert switch_balance_loss((torch.cat([balanced, collapsed]),), 2, mask).item() == pytest.approx(1.0, rel=1e-6)
    # Layers are averaged, each balanced on its own (Mixtral's pooled form would see these two as half balanced).
    assert switch_balance_loss((balanced, collapsed), 2).item() == pytest.approx((1.0 + 4 * p) / 2, rel=1e-6)


def test_router_z_loss_on_hand_made_logits():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss((logits,)).item() == pytest.approx(expected, rel=1e-6)


def test_expert_load_counts_assignments():
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 0.0, 2.0]])
    load = expert_load((logits,), top_k=2)
    assert load.tolist() == [[0.5, 0.25, 0.25]]


def test_moe_losses_have_qwen3_moe_meaning_and_the_old_total():
    """aux_loss is Mixtral's raw balance loss and z_loss the raw z-loss (Qwen3-MoE / Mixtral meaning); the total
    `loss` is bit-for-bit the formula of the first release: lm + (aux_coef·per-layer balance + z_coef·z)."""
    model = build("moe", router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == model.config.num_hidden_layers
    balance = switch_balance_loss(out.router_logits, 2, mask)
    z = router_z_loss(out.router_logits, mask)
    assert torch.equal(out.aux_loss, load_balancing_loss(out.router_logits, 2, mask)) and torch.equal(out.z_loss, z)
    lm_only = model.loss_function(logits=out.logits, labels=ids, vocab_size=259)
    assert torch.equal(out.loss, lm_only + (0.5 * balance + 0.25 * z))  # the pre-split formula, exactly
    assert out.loss.item() == pytest.approx(lm_only.item() + 0.5 * balance.item() + 0.25 * z.item(), rel=1e-6)
    # without labels or the flag, no router work is returned
    plain = model(ids)
    assert plain.aux_loss is None and plain.z_loss is None and plain.router_logits is None


def test_moe_all_padding_batch_gives_a_finite_loss():
    model = build("moe")
    ids = random_ids(2, 6)
    out = model(ids, attention_mask=torch.zeros_like(ids), labels=ids)
    assert torch.isfinite(out.loss) and out.aux_loss == 0 and out.z_loss == 0


# ---------------------------------------------------------------- bad input through the Python API


# name: (forward's arguments, built from good ids of shape (2, 7); the error message expected)
BAD_INPUTS = {
    "mask-length": (lambda ids: dict(input_ids=ids, attention_mask=torch.ones(2, 5, dtype=torch.long)),
                    r"attention_mask has shape \(2, 5\).*\(2, 7\)"),
    "mask-batch": (lambda ids: dict(input_ids=ids, attention_mask=torch.ones(1, 7, dtype=torch.long)),
                   r"attention_mask has shape \(1, 7\)"),
    "empty-batch": (lambda ids: dict(input_ids=ids[:0]), r"input_ids is empty \(shape \(0, 7\)\)"),
    "empty-prompt": (lambda ids: dict(input_ids=ids[:, :0]), r"input_ids is empty \(shape \(2, 0\)\)"),
    "float-ids": (lambda ids: dict(input_ids=ids.float()),
                  r"input_ids must hold integer token ids, got dtype torch.float32"),
    "1d-ids": (lambda ids: dict(input_ids=ids[0]),
               r"input_ids must have the axes \(batch, sequence\), got shape \(7,\)"),
    "label-high": (lambda ids: dict(input_ids=ids, labels=torch.full_like(ids, 259)),
                   r"label 259 is outside the vocabulary .*or -100 to ignore"),
    "label-negative": (lambda ids: dict(input_ids=ids, labels=torch.full_like(ids, -5)),
                       r"label -5 is outside the vocabulary"),
    "float-labels": (lambda ids: dict(input_ids=ids, labels=ids.float()), r"labels must hold integer token ids"),
    "label-shape": (lambda ids: dict(input_ids=ids, labels=ids[:, :3]), r"labels have shape \(2, 3\)"),
    "labels-only": (lambda ids: dict(labels=ids), r"exactly one of input_ids or inputs_embeds"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_python_input_is_one_clear_value_error(case):
    arguments, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        build()(**arguments(random_ids(2, 7)))


def test_attention_mask_after_cached_tokens_must_cover_them():
    model = build()
    ids = random_ids(2, 7)
    cache = getattr(model(ids[:, :4], use_cache=True), CACHE_NAME)
    with pytest.raises(ValueError, match=r"after 4 cached tokens.*\(2, 7\)"):
        model(ids[:, 4:], attention_mask=torch.ones(2, 3, dtype=torch.long), cache=cache)
    # the right shape still works and -100 labels are allowed
    model(ids[:, 4:], attention_mask=torch.ones(2, 7, dtype=torch.long), cache=cache)
    labels = ids.clone()
    labels[:, :2] = -100
    assert torch.isfinite(model(ids, labels=labels).loss)
