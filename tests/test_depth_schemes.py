"""The depth schemes (CompleteP / depth-μP branch multiplier, LayerNorm Scaling, the depth_scaled and deepnorm inits,
DeepNorm's post-norm layers): their formulas against the sources' closed forms, their forwards against direct
computations, and today's defaults unchanged bit for bit."""

import hashlib
import math

import pytest
import torch
from conftest import run_without_package, tiny_config, tiny_moe_config

from acx_ramanujan import RamanujanConfig, RamanujanForCausalLM
from acx_ramanujan.initialization_ramanujan import hidden_optimizer_factors, residual_multiplier, weight_std

COMPLETEP = dict(depth_parametrization="completep", depth_base_layers=1)
DEPTH_MUP = dict(depth_parametrization="depth_mup", depth_base_layers=1)
DEEPNORM = dict(deepnorm=True, init_scheme="deepnorm")


def build(config, seed=0):
    torch.manual_seed(seed)
    return RamanujanForCausalLM(config).eval()


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- defaults unchanged

# sha256 of the state dict (names and bytes, sorted by name) and logits[1, -1, :4] / sum |logits| of
# `build(config)` on `(arange(24).reshape(2, 12) * 7) % 256`, computed with the code of commit be50c58 (before the
# depth schemes existed), torch 2.13.0, one thread. A new torch may draw differently: then recompute them there.
BEFORE = {
    "dense_normal": (lambda: tiny_config(),
                     "0f3d27e03afeeeeb5f768c650423e52d8fb5303ed0f062556f4f3d2234f6c541",
                     [-0.17976154386997223, 0.07117316126823425, 0.013459065929055214, -0.00880915392190218],
                     553.390513187446),
    "dense_ramanujan": (lambda: tiny_config(init_scheme="ramanujan"),
                        "81d178467d9e44081e4544dea3970b3dfe1e8227e78dc297e909c99665118deb",
                        [0.0791047215461731, 0.04456261545419693, -0.052636053413152695, -0.06109985336661339],
                        763.1336334312364),
    "dense_mitchell_tied": (lambda: tiny_config(init_scheme="mitchell", tie_word_embeddings=True),
                            "0087a0e533d572d4a12ab6caee71b9c65f26a985861b8b8b58ee9f112365ed61",
                            [0.11818877607584, 0.019856959581375122, 0.06196077540516853, -0.06436651945114136],
                            554.0096396592971),
    "moe_shared_dense_first": (lambda: tiny_moe_config(num_shared_experts=1, first_k_dense_layers=1, num_hidden_layers=3,
                                                       init_scheme="small_wang"),
                               "718686e7725271c9ba81cd52e5f929ef80c533f1badee0743a14e8659f782ccb",
                               [-0.04336558282375336, -0.08996134251356125, -0.18420682847499847, 0.15452417731285095],
                               553.8622178081787),
}


@pytest.mark.parametrize("name", BEFORE)
def test_default_configs_draw_the_same_weights_and_logits_as_before(name):
    make, digest, last_logits, total = BEFORE[name]
    model = build(make())
    hasher = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        hasher.update(key.encode())
        hasher.update(tensor.contiguous().numpy().tobytes())
    assert hasher.hexdigest() == digest
    with torch.no_grad():
        logits = model(input_ids=(torch.arange(24).reshape(2, 12) * 7) % 256).logits
    assert logits[1, -1, :4].tolist() == pytest.approx(last_logits, abs=1e-6)
    assert logits.double().abs().sum().item() == pytest.approx(total, rel=1e-6)


# ------------------------------------------------------------------------------------------------- the formulas


def test_branch_multiplier_and_optimizer_factors_follow_the_sources():
    # CompleteP (α = 1): branch × L0/L, learning rate unchanged, ε × L0/L; depth-μP (α = 1/2): × √(L0/L) for all three.
    config = tiny_config(num_hidden_layers=48, depth_parametrization="completep", depth_base_layers=12)
    assert residual_multiplier(config) == pytest.approx(0.25)
    assert hidden_optimizer_factors(config) == pytest.approx((1.0, 0.25))
    config = tiny_config(num_hidden_layers=48, depth_parametrization="depth_mup", depth_base_layers=12)
    assert residual_multiplier(config) == pytest.approx(0.5)
    assert hidden_optimizer_factors(config) == pytest.approx((0.5, 0.5))
    assert residual_multiplier(tiny_config()) is None and hidden_optimizer_factors(tiny_config()) == (1.0, 1.0)


def test_depth_scaled_init_scales_output_and_up_projections_by_layer():
    """torchtitan's depth_init: wo, w2, w3 (o_proj, down_proj, up_proj) get r/√(2(l+1)); wq, wk, wv, w1 get r."""
    config = tiny_moe_config(num_hidden_layers=4, init_scheme="depth_scaled", first_k_dense_layers=1, num_shared_experts=1)
    r = config.initializer_range
    for layer, role in [(0, "output_projection"), (3, "output_projection"), (2, "up_projection")]:
        assert weight_std(config, role, 64, 32, layer) == pytest.approx(r / math.sqrt(2 * (layer + 1)))
    for role in ("linear", "value_projection", "gate_projection", "router", "embedding", "lm_head"):
        assert weight_std(config, role, 64, 32, 3) == pytest.approx(r)


def test_deepnorm_init_is_xavier_with_gain_beta_on_v_out_and_ffn():
    config = tiny_config(num_hidden_layers=6, **DEEPNORM)
    beta = (8 * 6) ** -0.25
    xavier = math.sqrt(2 / (32 + 64))
    assert weight_std(config, "linear", 32, 64, 0) == pytest.approx(xavier)  # q, k: gain 1
    for role in ("value_projection", "gate_projection", "up_projection", "output_projection"):
        assert weight_std(config, role, 32, 64, 5) == pytest.approx(beta * xavier)


@pytest.mark.parametrize("depth", [COMPLETEP, DEPTH_MUP, dict(layernorm_scaling=True)])
@pytest.mark.parametrize("scheme, plain", [("normal", 0.02), ("mitchell", 1 / math.sqrt(64)),
                                           ("small_wang", math.sqrt(2 / (5 * 32))), ("xavier", math.sqrt(2 / 96))])
def test_schemes_that_replace_scaled_init_draw_output_projections_like_the_others(depth, scheme, plain):
    config = tiny_config(num_hidden_layers=4, init_scheme=scheme, **depth)
    assert weight_std(config, "output_projection", 64, 32, 2) == pytest.approx(plain)
    assert weight_std(config, "linear", 64, 32, 2) == pytest.approx(plain)


def test_drawn_weights_have_their_roles_std():
    """Every projection of a real model, MoE experts' fused halves included, drawn with its role's std."""
    config = tiny_moe_config(hidden_size=64, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=3,
                             first_k_dense_layers=1, num_shared_experts=1, init_scheme="depth_scaled")
    model = build(config)
    layer = model.model.layers[2]
    experts, inner = layer.mlp.experts, config.moe_intermediate_size
    tensors = {
        "linear": layer.self_attn.q_proj.weight,
        "value_projection": layer.self_attn.v_proj.weight,
        "output_projection": layer.self_attn.o_proj.weight,
        "gate_projection": experts.gate_up_proj[:, :inner],
        "up_projection": experts.gate_up_proj[:, inner:],
    }
    for role, tensor in tensors.items():
        assert tensor.std().item() == pytest.approx(weight_std(config, role, 64, 256, 2), rel=0.1), role
    assert experts.down_proj.std().item() == pytest.approx(config.initializer_range / math.sqrt(6), rel=0.1)
    assert layer.mlp.shared_experts.up_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.1)
    deep = build(tiny_config(hidden_size=64, intermediate_size=256, num_hidden_layers=3, **DEEPNORM)).model.layers[1]
    xavier = math.sqrt(2 / sum(deep.self_attn.v_proj.weight.shape))  # k_proj and v_proj: 64 → 32 (GQA)
    assert deep.self_attn.v_proj.weight.std().item() == pytest.approx((8 * 3) ** -0.25 * xavier, rel=0.1)
    assert deep.self_attn.k_proj.weight.std().item() == pytest.approx(xavier, rel=0.1)


# ------------------------------------------------------------------------------------------------- the forwards


def with_scaled_weights(model, scales: dict[str, float]):
    """A default-config copy of `model` whose weights ending in each key are multiplied by the key's factor."""
    values = {name: getattr(model.config, name) for name in RamanujanConfig.field_types() if hasattr(model.config, name)}
    values.update(depth_parametrization=None, depth_base_layers=None, layernorm_scaling=False)
    plain = RamanujanForCausalLM(RamanujanConfig(**values)).eval()
    state = {name: tensor * next((factor for end, factor in scales.items() if name.endswith(end)), 1.0)
             for name, tensor in model.state_dict().items()}
    plain.load_state_dict(state)
    return plain


@pytest.mark.parametrize("make", [tiny_config, lambda **kw: tiny_moe_config(num_shared_experts=1, **kw)])
@pytest.mark.parametrize("depth", [COMPLETEP, DEPTH_MUP])
def test_branch_multiplier_scales_every_attention_and_mlp_branch(make, depth):
    """x + m·attn(norm x), x + m·mlp(norm x): the same as a plain model with o_proj and every down_proj × m."""
    model = build(make(num_hidden_layers=4, **depth))
    m = residual_multiplier(model.config)
    assert m == pytest.approx(4 ** -(1.0 if depth is COMPLETEP else 0.5))
    plain = with_scaled_weights(model, {"o_proj.weight": m, "down_proj.weight": m, "experts.down_proj": m})
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, plain(ids()).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(ids()).logits, with_scaled_weights(model, {})(ids()).logits, atol=1e-4)


def test_layernorm_scaling_scales_both_prenorms_of_layer_l_by_one_over_root_l_plus_one():
    model = build(tiny_config(num_hidden_layers=3, layernorm_scaling=True))
    scales = {f"layers.{layer}.{norm}.weight": 1 / math.sqrt(layer + 1)
              for layer in range(3) for norm in ("input_layernorm", "post_attention_layernorm")}
    plain = with_scaled_weights(model, scales)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, plain(ids()).logits, rtol=1e-5, atol=1e-6)
    assert [layer.norm_scale for layer in model.model.layers] == [None, 1 / math.sqrt(2), 1 / math.sqrt(3)]  # the final norm is not scaled: the logits above


@pytest.mark.parametrize("make", [tiny_config, tiny_moe_config])
def test_deepnorm_layers_are_post_norm_with_alpha(make):
    """Each layer's output from its input, by DeepNet's formula written out: x ← n1(α·x + attn(x)), x ← n2(α·x + ffn(x))."""
    model = build(make(num_hidden_layers=3, **DEEPNORM))
    alpha = (2 * 3) ** 0.25
    inputs, outputs = [], []

    def record(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    hooks = [layer.register_forward_hook(record) for layer in model.model.layers]
    input_ids = ids()
    with torch.no_grad():
        model(input_ids, use_cache=False)
        for hook in hooks:
            hook.remove()
        position_ids = torch.arange(input_ids.shape[1])[None]
        for layer, x, expected in zip(model.model.layers, inputs, outputs):
            rotary = model.model.rotary_emb(x, position_ids)
            mid = layer.input_layernorm(alpha * x + layer.self_attn(x, position_embeddings=rotary, attention_mask=None)[0])
            out = layer.post_attention_layernorm(alpha * mid + layer.mlp(mid))
            torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------------------- config and round trips


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(depth_parametrization="mup"), "depth_parametrization 'mup' is unknown; valid: None or one of completep, depth_mup"),
        (dict(depth_parametrization="completep"), "depth_parametrization='completep' needs depth_base_layers"),
        (dict(depth_base_layers=12), "depth_base_layers (12) applies only with a depth_parametrization"),
        (dict(depth_parametrization="completep", depth_base_layers=0), "depth_base_layers must be a positive integer"),
        (dict(deepnorm=True, layernorm_scaling=True), "deepnorm=True (post-norm layers) does not combine with layernorm_scaling"),
        (dict(deepnorm=True, **COMPLETEP), "does not combine with depth_parametrization"),
        (dict(init_scheme="depth_scaled", layernorm_scaling=True), "init_scheme 'depth_scaled' scales the init with depth"),
        (dict(init_scheme="deepnorm", **DEPTH_MUP), "init_scheme 'deepnorm' scales the init with depth"),
        (dict(layernorm_scaling=1), "layernorm_scaling must be bool"),
    ],
)
def test_bad_depth_fields_are_one_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


SCHEMES = {
    "completep_ramanujan": dict(init_scheme="ramanujan", **COMPLETEP),
    "layernorm_scaling_moe": dict(layernorm_scaling=True, num_experts=4, moe_intermediate_size=48),
    "deepnorm": DEEPNORM,
}


@pytest.mark.parametrize("name", SCHEMES)
def test_depth_fields_round_trip_through_save_and_remote_code(name, tmp_path):
    model = build(tiny_config(num_hidden_layers=3, **SCHEMES[name]))
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    loaded = RamanujanForCausalLM.from_pretrained(checkpoint).eval()
    for field in ("depth_parametrization", "depth_base_layers", "layernorm_scaling", "deepnorm", "init_scheme"):
        assert getattr(loaded.config, field) == getattr(model.config, field)
    input_ids = ids()
    with torch.no_grad():
        expected = model(input_ids).logits
        assert torch.equal(loaded(input_ids).logits, expected)
    torch.save({"ids": input_ids, "logits": expected}, tmp_path / "expected.pt")
    run_without_package(
        f"""
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
expected = torch.load({str(tmp_path / "expected.pt")!r})
model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"])
""",
        cwd=tmp_path,
    )
