"""The speed-motivated code paths compute what the straightforward formulas compute, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_moe_config

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


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("num_experts", [4, 16])
def test_expert_dispatch_gradients_match_naive_loop(implementation, num_experts):
    """Sorted dispatch: same output and same gradients for input, routing weights and every expert weight.

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

    fast = grads(lambda e, *args: e(*args))
    reference = grads(naive_experts)
    for got, expected in zip(fast, reference):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if num_experts == 16:
        assert fast[3][12:].abs().sum() == 0 and fast[4][12:].abs().sum() == 0
