"""The Ramanujan recurrence, its per-layer schedule, and the weights a model actually gets at init."""

import math

import mpmath
import pytest
import torch

from acx_ramanujan import RamanujanConfig, RamanujanForCausalLM, ramanujan_coefficients, ramanujan_layer_scales
from acx_ramanujan.initialization_ramanujan import ramanujan_depth_and_transition, weight_std

PI = math.pi


def reference_coefficients(n: int) -> list[float]:
    """The recurrence in 50-digit arithmetic (mpmath), independent of the float implementation."""
    mpmath.mp.dps = 50
    a = [mpmath.mpf(1), mpmath.pi / mpmath.sqrt(3)]
    for k in range(1, n):
        a.append(mpmath.pi**2 / k**2 * a[k] + 2 * mpmath.pi / (k * (k + 1)) * a[k - 1])
    return [float(x) for x in a[: n + 1]]


def test_coefficients_closed_forms():
    a = ramanujan_coefficients(3)
    assert a[0] == 1.0
    assert a[1] == pytest.approx(PI / math.sqrt(3), rel=1e-15)
    assert a[2] == pytest.approx(PI**3 / math.sqrt(3) + PI, rel=1e-14)  # π²·a_1 + π·a_0
    assert a[3] == pytest.approx(PI**2 / 4 * a[2] + PI / 3 * a[1], rel=1e-14)


def test_coefficients_match_high_precision_reference():
    assert ramanujan_coefficients(30) == pytest.approx(reference_coefficients(30), rel=1e-12)
    assert ramanujan_coefficients(0) == [1.0]
    with pytest.raises(ValueError, match="n must be >= 0"):
        ramanujan_coefficients(-1)


def naive_schedule(num_layers: int) -> list[float]:
    """The issue's formula, written out once more with the high-precision coefficients."""
    r = min(8, max(4, num_layers // 3))
    t = min(16, max(4, num_layers // 4))
    r = min(r, num_layers)
    t = max(0, min(t, num_layers - r))
    a = reference_coefficients(max(r, 1))
    peak = max(abs(x) for x in a[: r + 1])
    out = []
    for layer in range(num_layers):
        if layer < r:
            out.append(max(0.1, math.sqrt(abs(a[layer]) / peak)))
        elif layer < r + t:
            start = max(0.1, math.sqrt(abs(a[r]) / peak))
            out.append(start + (1 - start) * (layer - r) / t)
        else:
            out.append(1.0)
    return out


@pytest.mark.parametrize("num_layers", [1, 2, 4, 5, 6, 12, 24, 48, 96])
def test_schedule_matches_formula(num_layers):
    config = RamanujanConfig(num_hidden_layers=num_layers, hidden_size=32, num_attention_heads=4)
    assert ramanujan_layer_scales(config) == pytest.approx(naive_schedule(num_layers), rel=1e-12)


def test_schedule_hand_values_for_12_layers():
    # R = 4, T = 4, peak = a_4 ≈ 70.0396; a_4 is the peak so the blend starts and ends at 1.
    scales = ramanujan_layer_scales(RamanujanConfig(num_hidden_layers=12, hidden_size=32, num_attention_heads=4))
    a = reference_coefficients(4)
    assert scales[0] == pytest.approx(math.sqrt(1 / a[4]))
    assert scales[2] == pytest.approx(math.sqrt(a[2] / a[4]))
    assert scales[4:] == [1.0] * 8


def test_transition_never_negative():
    # The seed computed T = min(16, max(4, L//4)) without clamping to L - R; with L = 4 it overran the stack.
    assert ramanujan_depth_and_transition(4, None, None) == (4, 0)
    assert ramanujan_depth_and_transition(5, None, None) == (4, 1)
    assert ramanujan_depth_and_transition(3, 8, 16) == (3, 0)
    assert ramanujan_depth_and_transition(48, None, None) == (8, 12)


def truncated_normal_std_factor(a: float = 2.0) -> float:
    """Std of a standard normal truncated to [-a, a]: √(1 − 2aφ(a)/Z)."""
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    z = math.erf(a / math.sqrt(2))
    return math.sqrt(1 - 2 * a * phi / z)


def test_empirical_weight_std_follows_schedule():
    torch.manual_seed(0)
    config = RamanujanConfig(
        vocab_size=259, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        init_scheme="ramanujan",
    )
    model = RamanujanForCausalLM(config)
    scales = ramanujan_layer_scales(config)
    factor = truncated_normal_std_factor()
    for layer_idx, layer in enumerate(model.model.layers):
        for module, fan_in in [
            (layer.self_attn.q_proj, 256), (layer.self_attn.o_proj, 256), (layer.mlp.up_proj, 256), (layer.mlp.down_proj, 512),
        ]:
            expected = scales[layer_idx] / math.sqrt(fan_in) * factor
            assert module.weight.std().item() == pytest.approx(expected, rel=0.03), (layer_idx, module)
            assert module.weight.abs().max().item() <= 2 * expected / factor + 1e-6  # truncated at ±2σ
    peak = max(abs(x) for x in reference_coefficients(4))
    embedding = model.model.embed_tokens.weight
    rows = torch.ones(config.vocab_size, dtype=torch.bool)
    rows[config.pad_token_id] = False
    assert embedding[rows].std().item() == pytest.approx(0.02 * math.sqrt(1 / peak) * factor, rel=0.05)
    assert torch.all(embedding[config.pad_token_id] == 0)
    assert model.lm_head.weight.std().item() == pytest.approx(1 / 256 * factor, rel=0.05)
    for norm in (model.model.norm, model.model.layers[0].input_layernorm):
        assert torch.all(norm.weight == 1)


def test_moe_expert_and_router_std():
    torch.manual_seed(0)
    config = RamanujanConfig(
        vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_experts=8, moe_intermediate_size=128, init_scheme="ramanujan",
    )
    model = RamanujanForCausalLM(config)
    scales = ramanujan_layer_scales(config)
    factor = truncated_normal_std_factor()
    for layer_idx, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        assert experts.gate_up_proj.std().item() == pytest.approx(scales[layer_idx] / math.sqrt(128) * factor, rel=0.03)
        assert experts.down_proj.std().item() == pytest.approx(scales[layer_idx] / math.sqrt(128) * factor, rel=0.03)
        router = layer.mlp.router.weight
        assert router.std().item() == pytest.approx(0.1 * scales[layer_idx] / math.sqrt(128) * factor, rel=0.1)


@pytest.mark.parametrize(
    "scheme, role, expected",
    [
        ("normal", "linear", 0.02),
        ("normal", "output_projection", 0.02 / math.sqrt(2 * 6)),
        ("xavier", "linear", math.sqrt(2 / (256 + 512))),
        ("kaiming", "linear", math.sqrt(2 / 256)),
        ("small_wang", "linear", math.sqrt(2 / (5 * 256))),
        ("small_wang", "output_projection", 2 / (6 * math.sqrt(256))),
        ("mitchell", "linear", 1 / math.sqrt(256)),
        ("mitchell", "output_projection", 1 / math.sqrt(2 * 256 * (3 + 1))),
        ("xavier", "embedding", 0.02),
        ("kaiming", "lm_head", 0.02),
    ],
)
def test_baseline_formulas(scheme, role, expected):
    config = RamanujanConfig(hidden_size=256, num_attention_heads=4, num_hidden_layers=6, init_scheme=scheme)
    assert weight_std(config, role, fan_in=256, fan_out=512, layer_idx=3) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scheme", ["normal", "xavier", "kaiming", "small_wang", "mitchell"])
def test_baseline_models_draw_their_std(scheme):
    torch.manual_seed(0)
    config = RamanujanConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, init_scheme=scheme)
    model = RamanujanForCausalLM(config)
    layer = model.model.layers[2]
    for module, role in [(layer.self_attn.q_proj, "linear"), (layer.mlp.down_proj, "output_projection")]:
        expected = weight_std(config, role, module.in_features, module.out_features, 2)
        assert module.weight.std().item() == pytest.approx(expected, rel=0.03)


def test_tied_embeddings_keep_embedding_rule():
    torch.manual_seed(0)
    config = RamanujanConfig(
        hidden_size=128, num_attention_heads=4, num_hidden_layers=2, tie_word_embeddings=True, init_scheme="ramanujan"
    )
    model = RamanujanForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    peak = max(abs(x) for x in reference_coefficients(2))  # R = min(4, L) = 2 for a 2-layer stack
    assert model.lm_head.weight.std().item() == pytest.approx(0.02 * math.sqrt(1 / peak) * truncated_normal_std_factor(), rel=0.1)


@pytest.mark.parametrize("decoder_scheme, outer_scheme", [("normal", "ramanujan"), ("ramanujan", "normal")])
def test_ablation_switches_draw_each_weight_the_way_its_own_scheme_does(decoder_scheme, outer_scheme):
    """Embedding and untied head set to another scheme: truncated at ±2σ exactly when their own scheme truncates."""
    torch.manual_seed(0)
    config = RamanujanConfig(hidden_size=128, num_attention_heads=4, num_hidden_layers=2, tie_word_embeddings=False,
                             init_scheme=decoder_scheme, embedding_init_scheme=outer_scheme, lm_head_init_scheme=outer_scheme)
    model = RamanujanForCausalLM(config)
    factor = truncated_normal_std_factor()
    weights = {
        "embedding": (model.model.embed_tokens.weight, outer_scheme, weight_std(config, "embedding", 128, config.vocab_size)),
        "lm_head": (model.lm_head.weight, outer_scheme, weight_std(config, "lm_head", 128, config.vocab_size)),
        "linear": (model.model.layers[0].self_attn.q_proj.weight, decoder_scheme, weight_std(config, "linear", 128, 128, 0)),
    }
    for role, (weight, scheme, std) in weights.items():
        truncated = scheme == "ramanujan"
        assert (weight.abs().max().item() <= 2 * std + 1e-7) == truncated, role  # ~4.6 % of a plain normal lies beyond
        assert weight.std().item() == pytest.approx(std * (factor if truncated else 1.0), rel=0.05), role


@pytest.mark.parametrize("scheme", ["normal", "ramanujan", "depth_scaled"])
def test_zero_init_output_projections_zeroes_exactly_the_maps_into_the_residual_stream(scheme, tmp_path):
    """o_proj, down_proj, the experts' and the shared experts' down_proj start at zero; every other weight is drawn
    as the scheme draws it (nonzero, its std); a checkpoint's loaded projections are not zeroed."""
    config = RamanujanConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_experts=4, moe_intermediate_size=32, num_shared_experts=1, first_k_dense_layers=1,
                             init_scheme=scheme, zero_init_output_projections=True)
    model = RamanujanForCausalLM(config)
    output_maps = ("o_proj.weight", "down_proj.weight", "experts.down_proj")
    zeroed = {name for name, param in model.named_parameters() if not param.any()}
    assert zeroed == {name for name, _ in model.named_parameters() if name.endswith(output_maps)}
    assert len(zeroed) == 3 + 3 + 2  # o_proj per layer; one dense down_proj; per MoE layer experts' + shared down_proj
    q_proj = model.model.layers[1].self_attn.q_proj
    expected = weight_std(config, "linear", q_proj.in_features, q_proj.out_features, 1)
    scale = truncated_normal_std_factor() if scheme == "ramanujan" else 1.0
    assert q_proj.weight.std().item() == pytest.approx(expected * scale, rel=0.1)
    # The last step is from_pretrained's: loaded weights stay as saved.
    trained = RamanujanForCausalLM(config)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            param.add_(0.01)
    trained.save_pretrained(tmp_path)
    loaded = RamanujanForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()))
