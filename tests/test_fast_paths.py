"""The speed-motivated code paths compute what the straightforward formulas compute, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_moe_config

from acx_ramanujan import RamanujanForCausalLM


def moe_block(seed=0, **overrides):
    torch.manual_seed(seed)
    model = RamanujanForCausalLM(tiny_moe_config(**overrides))
    return model, model.model.layers[0].mlp


def naive_experts(experts, x, top_k_index, top_k_weights):
    """Each (token, chosen expert) pair on its own, indexing the fused weights directly: the gradient reference."""
    out = []
    for token, chosen, weights in zip(x, top_k_index, top_k_weights):
        total = torch.zeros_like(token)
        for e, w in zip(chosen.tolist(), weights):
            gate, up = (experts.gate_up_proj[e] @ token).chunk(2)
            total = total + w * (experts.down_proj[e] @ (F.silu(gate) * up))
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("num_experts", [4, 16])
def test_expert_dispatch_gradients_match_naive_loop(implementation, num_experts, autocast):
    """Sorted dispatch: same output and same gradients for input, routing weights and every expert weight, in fp32
    and under bf16 autocast (where the eager path casts the weights once, not per expert; to bf16's precision).

    With 16 experts and 10 tokens at top-2 some experts get no token; their gradient must be exactly zero.
    """
    model, block = moe_block(num_experts=num_experts)
    model.set_experts_implementation(implementation)
    experts = block.experts
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(10, 32, generator=generator)
    top_k_index = torch.stack([torch.randperm(num_experts, generator=generator)[:2] for _ in range(10)])
    if num_experts == 16:
        top_k_index = top_k_index % 12  # experts 12..15 never chosen
        top_k_index[:, 1] = (top_k_index[:, 0] + 1) % 12
    top_k_weights = torch.rand(10, 2, generator=generator)

    def grads(function):
        experts.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        weights = top_k_weights.clone().requires_grad_(True)
        out = function(experts, inputs, top_k_index, weights)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out, inputs.grad, weights.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fast = grads(lambda e, *args: e(*args))
        reference = grads(naive_experts)
    tolerance = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    for got, expected in zip(fast, reference):
        torch.testing.assert_close(got, expected.to(got.dtype), **tolerance)
    assert fast[3].dtype == fast[4].dtype == torch.float32  # the weights' gradients stay fp32 under autocast
    if autocast and implementation == "eager":  # ours computed in bf16 (torch's grouped_mm is no autocast op on CPU)
        assert not torch.allclose(fast[0], grads(lambda e, *args: e(*args))[0], rtol=1e-4, atol=0)
    if num_experts == 16:
        assert fast[3][12:].abs().sum() == 0 and fast[4][12:].abs().sum() == 0


# ------------------------------------------- the whole model against Transformers' own, with the same weights


def reference_pair(kind: str):
    """Ours (attention_scale_alpha=0: the standard 1/√d scale) and Llama or Mixtral holding the same weights.

    Mixtral is the MoE reference because its block is ours without shared experts: softmax router, top-k,
    renormalized weights, fused 3-D experts (its router is called `gate` instead of `router`).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from conftest import tiny_config

    torch.manual_seed(0)
    ours_config = (tiny_moe_config if kind == "moe" else tiny_config)(attention_scale_alpha=0.0, intermediate_size=48)
    ours = RamanujanForCausalLM(ours_config).eval()
    shared = dict(
        vocab_size=ours_config.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=ours_config.rms_norm_eps,
        pad_token_id=ours_config.pad_token_id, bos_token_id=ours_config.bos_token_id, eos_token_id=ours_config.eos_token_id,
        intermediate_size=48, rope_parameters=dict(ours_config.rope_parameters),
    )
    if kind == "moe":
        theirs = MixtralForCausalLM(MixtralConfig(**shared, num_local_experts=4, num_experts_per_tok=2))
    else:
        theirs = LlamaForCausalLM(LlamaConfig(**shared))
    # Our routers' balancing bias is zero here (it changes nothing) and has no Mixtral counterpart.
    state = {name.replace(".mlp.router.", ".mlp.gate."): tensor for name, tensor in ours.state_dict().items()
             if not name.endswith("e_score_correction_bias")}
    theirs.load_state_dict(state, strict=True)
    return ours, theirs.eval()


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_logits_match_transformers_reference_with_left_padding(kind, implementation):
    ours, theirs = reference_pair(kind)
    ours.set_attn_implementation(implementation)
    theirs.set_attn_implementation(implementation)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on the first row
    ids[0, :4] = ours.config.pad_token_id
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        expected = theirs(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_cached_greedy_generation_matches_transformers_reference(kind):
    ours, theirs = reference_pair(kind)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(6))
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(prompt, **settings), theirs.generate(prompt, **settings))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_training_gradients_match_transformers_reference(kind):
    """Same loss and same gradient for every weight (the MoE balance losses are switched off: Mixtral adds its own)."""
    ours, theirs = reference_pair(kind)
    ours.config.router_aux_loss_coef = ours.config.router_z_loss_coef = 0.0
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(7))
    losses = [model.train()(ids, labels=ids).loss for model in (ours, theirs)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    theirs_grads = {name.replace(".mlp.gate.", ".mlp.router."): p.grad for name, p in theirs.named_parameters()}
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, theirs_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_generate_does_not_recompute_the_forward_signature_per_token(monkeypatch):
    """generate() inspects `model.forward` on every token for remote-code models; ours answers from a stored signature.

    The stored signature must be forward's own, and the number of signatures computed must not grow with the tokens.
    """
    import inspect

    forward = RamanujanForCausalLM.forward
    assert forward.__signature__ == inspect.signature(inspect.unwrap(forward))
    model = RamanujanForCausalLM(tiny_config()).eval()
    assert model.is_remote_code()  # registered for AutoModel: the path that runs the per-token check

    computed = []
    compute = inspect._signature_from_function
    monkeypatch.setattr(inspect, "_signature_from_function", lambda *a, **k: computed.append(1) or compute(*a, **k))

    def signatures_computed(new_tokens):
        computed.clear()
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
        return len(computed)

    assert signatures_computed(12) == signatures_computed(2)


# ------------------------------------------- compiled and expert-parallel paths of the MoE dispatch


def test_expert_parallel_dispatch_drops_the_sentinel_expert_id():
    """Under expert parallelism Transformers hands the experts the id `num_experts` (with weight 0) for assignments
    that belong to another rank; they must contribute nothing, and the rest must be computed as usual."""
    model, block = moe_block()
    experts = block.experts
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 32, generator=generator)
    top_k_index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(6)])
    top_k_weights = torch.rand(6, 2, generator=generator)
    off_rank = torch.zeros_like(top_k_index, dtype=torch.bool)
    off_rank[::2, 1] = True
    expected = naive_experts(experts, x, top_k_index.masked_fill(off_rank, 0), top_k_weights.masked_fill(off_rank, 0.0))
    experts._is_expert_parallel = True
    got = experts(x, top_k_index.masked_fill(off_rank, 4), top_k_weights.masked_fill(off_rank, 0.0))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def routing(num_experts=4, tokens=10, seed=5):
    """Hidden states, top-2 expert ids and routing weights for `tokens` tokens of width 32."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=generator)
    top_k_index = torch.stack([torch.randperm(num_experts, generator=generator)[:2] for _ in range(tokens)])
    return x, top_k_index, torch.rand(tokens, 2, generator=generator)


def spy_on(monkeypatch, name):
    """Record each call of the Transformers experts function `name` that the modeling file calls."""
    from acx_ramanujan import modeling_ramanujan

    calls, original = [], getattr(modeling_ramanujan, name)

    def recorded(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_ramanujan, name, recorded)
    return calls


def test_default_experts_run_grouped_mm_on_an_accelerator(monkeypatch):
    """The default experts forward ("eager") picks its path per device: our sorted dispatch on CPU, Transformers'
    grouped_mm elsewhere (Qwen3-MoE's default; no host read of the routing). Entered on CPU two ways: on the meta
    device, whose values cannot be read at all (the sorted dispatch would fail reading its counts), and with the
    device predicate forced on CPU tensors, where the result must equal the per-token loop."""
    from acx_ramanujan import modeling_ramanujan

    model, block = moe_block()
    assert model.config._experts_implementation == "eager"
    x, top_k_index, top_k_weights = routing()
    expected = naive_experts(block.experts, x, top_k_index, top_k_weights)
    grouped = spy_on(monkeypatch, "grouped_mm_experts_forward")
    batched = spy_on(monkeypatch, "batched_mm_experts_forward")
    with torch.no_grad():
        torch.testing.assert_close(block.experts(x, top_k_index, top_k_weights), expected, rtol=1e-4, atol=1e-5)
        assert grouped == batched == []  # CPU: the sorted dispatch
        monkeypatch.setattr(modeling_ramanujan, "on_accelerator", lambda tensor: True)
        torch.testing.assert_close(block.experts(x, top_k_index, top_k_weights), expected, rtol=1e-4, atol=1e-5)
        assert grouped == ["grouped_mm_experts_forward"] and batched == []
        monkeypatch.undo()
        # meta in bf16: torch's grouped_mm meta kernel takes only bf16 inputs
        experts = block.experts.to("meta", torch.bfloat16)
        meta = [t.to("meta", torch.bfloat16) if t.is_floating_point() else t.to("meta") for t in routing()]
        grouped = spy_on(monkeypatch, "grouped_mm_experts_forward")
        assert experts(*meta).shape == x.shape and grouped == ["grouped_mm_experts_forward"]


def test_experts_take_the_shape_static_path_while_a_cuda_graph_is_captured(monkeypatch):
    """Continuous batching captures CUDA graphs; a capture cannot read the per-expert counts to the host. Captured
    tensors live on the accelerator, where grouped_mm runs (the test above); the sorted dispatch also asks
    Transformers' `is_tracing`, which says yes during a capture: forced on (`torch.cuda.is_current_stream_capturing`),
    the CPU forward runs batched_mm, as under torch.compile, and gives the per-token loop's result."""
    model, block = moe_block()
    x, top_k_index, top_k_weights = routing()
    expected = naive_experts(block.experts, x, top_k_index, top_k_weights)
    batched = spy_on(monkeypatch, "batched_mm_experts_forward")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with torch.no_grad():
        got = block.experts(x, top_k_index, top_k_weights)
    assert batched == ["batched_mm_experts_forward"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_static_cache_fullgraph_compiled_generation_equals_dynamic_eager(kind):
    """`_can_compile_fullgraph = True` holds: with a static cache and `torch.compile(forward, fullgraph=True)` (no graph
    break allowed: the MoE dispatch must not read its routing back to the host) greedy tokens equal eager ones."""
    torch.manual_seed(0)
    model = RamanujanForCausalLM((tiny_moe_config if kind == "moe" else tiny_config)()).eval()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(8))
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=256)
    dynamic_eager = model.generate(prompt, **settings)
    # aot_eager: Dynamo must capture the whole forward (fullgraph) and AOTAutograd trace it; inductor code generation
    # would add minutes on a 2-core CPU and tests torch, not us.
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    compiled_static = model.generate(prompt, cache_implementation="static", **settings)
    assert torch.equal(compiled_static, dynamic_eager)
