"""RamanujanConfig: defaults, presets, Auto registration and every construction error."""

import json

import pytest
from transformers import AutoConfig

from acx_ramanujan import INIT_SCHEMES, RamanujanConfig
from acx_ramanujan.configuration_ramanujan import PRESETS_DIR


def test_defaults_follow_llama_conventions():
    config = RamanujanConfig(hidden_size=64, num_attention_heads=4)
    assert config.model_type == "ramanujan"
    assert config.head_dim == 16
    assert config.num_key_value_heads == 4
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.init_scheme == "normal"  # the best-measured scheme (docs/init-study.md)
    assert config.attention_scale_alpha == 0.0
    assert config.moe_intermediate_size == config.intermediate_size
    assert not config.is_moe
    assert config.qk_norm is False  # so configs saved before the field existed load as they were


def test_qk_norm_is_a_boolean_field():
    assert RamanujanConfig.parse_overrides("qk_norm=true") == {"qk_norm": True}
    assert RamanujanConfig.from_preset("tiny", qk_norm=True).qk_norm is True


def test_auto_config_round_trip(tmp_path):
    config = RamanujanConfig(hidden_size=64, num_attention_heads=4, num_experts=4, init_scheme="xavier")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RamanujanConfig)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())
    assert AutoConfig.for_model("ramanujan").__class__ is RamanujanConfig


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS_DIR.glob("*.json")))
def test_every_preset_builds(name):
    config = RamanujanConfig.from_preset(name)
    assert config.num_hidden_layers > 0
    expected = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    for key, value in expected.items():
        if key != "model_type":
            assert getattr(config, key) == value, key


def test_required_presets_exist():
    required = {"tiny", "tiny-moe", "deep", "default", "gpt2_style", "llama_7b_style", "llama_13b_style", "moe_8x"}
    assert required <= {p.stem for p in PRESETS_DIR.glob("*.json")}


def test_preset_from_json_path_and_overrides(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"hidden_size": 48, "num_attention_heads": 4, "num_hidden_layers": 3}))
    config = RamanujanConfig.from_preset(str(path), num_hidden_layers=5)
    assert (config.hidden_size, config.num_hidden_layers) == (48, 5)


def test_unknown_preset_and_override_are_named():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny"):
        RamanujanConfig.from_preset("nope")
    with pytest.raises(ValueError, match="hidden_sise"):
        RamanujanConfig.from_preset("tiny", hidden_sise=3)


@pytest.mark.parametrize(
    "values, field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_experts=4, num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(num_hidden_layers=-2), "num_hidden_layers"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(num_experts=-1), "num_experts"),
        (dict(head_dim=7), "head_dim"),
        (dict(ramanujan_depth=-1), "ramanujan_depth"),
        (dict(attention_dropout=1.5), "attention_dropout"),
    ],
)
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        RamanujanConfig(**values)


def test_unknown_init_scheme_lists_valid_ones():
    with pytest.raises(ValueError) as error:
        RamanujanConfig(init_scheme="lecun")
    message = str(error.value)
    assert "lecun" in message
    for scheme in INIT_SCHEMES:
        assert scheme in message


def test_first_k_dense_layers():
    config = RamanujanConfig(num_hidden_layers=4, num_experts=4, first_k_dense_layers=1)
    assert [config.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert not any(RamanujanConfig(num_hidden_layers=4).is_moe_layer(i) for i in range(4))


def test_ramanujan_scheme_brings_the_seed_attention_temperature():
    assert RamanujanConfig(init_scheme="ramanujan").attention_scale_alpha == 0.3
    assert RamanujanConfig(init_scheme="ramanujan", attention_scale_alpha=0.0).attention_scale_alpha == 0.0
    assert RamanujanConfig(init_scheme="xavier").attention_scale_alpha == 0.0
    assert RamanujanConfig(init_scheme="normal", attention_scale_alpha=0.3).attention_scale_alpha == 0.3


# Every field, a family of bad values: a wrong type (as JSON or the command line would give it), NaN/inf, and values
# out of range. Each must be refused at construction with a ValueError naming the field.
BAD_VALUES = [
    ("num_experts", "4"), ("num_experts", 4.0), ("num_experts", True), ("hidden_size", "64"), ("num_hidden_layers", 2.5),
    ("vocab_size", None), ("head_dim", 16.0), ("ramanujan_depth", 2.5), ("ramanujan_transition", "3"),
    ("num_experts_per_tok", "2"), ("first_k_dense_layers", -1), ("num_shared_experts", -1),
    ("ramanujan_gain", "1"), ("ramanujan_gain", float("nan")), ("ramanujan_gain", float("inf")), ("ramanujan_gain", -1.0),
    ("initializer_range", float("nan")), ("initializer_range", 0.0), ("initializer_range", float("inf")),
    ("rms_norm_eps", -1), ("rms_norm_eps", 0.0), ("rms_norm_eps", float("nan")), ("rms_norm_eps", "1e-6"),
    ("attention_scale_alpha", float("nan")), ("attention_scale_alpha", -1.0), ("attention_scale_alpha", "0.3"),
    ("attention_scale_decay", float("inf")), ("attention_scale_decay", float("nan")),
    ("attention_dropout", -0.1), ("attention_dropout", float("nan")),
    ("hidden_act", "bogus"), ("hidden_act", 3),
    ("rope_parameters", "x"), ("rope_parameters", {"rope_type": "bogus", "rope_theta": 10000.0}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": -1.0}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": float("nan")}),
    ("tie_word_embeddings", "yes"), ("use_cache", 1), ("qk_norm", "true"), ("qk_norm", 1), ("norm_topk_prob", "true"), ("ramanujan_layer_schedule", 0),
    ("init_scheme", None), ("embedding_init_scheme", 3),
    ("eos_token_id", "258"), ("pad_token_id", 1.0),
]


@pytest.mark.parametrize("name, value", BAD_VALUES, ids=lambda item: repr(item))
def test_every_field_refuses_bad_types_and_ranges(name, value):
    with pytest.raises(ValueError, match=name):
        RamanujanConfig(**{name: value})


@pytest.mark.parametrize(
    "name, value",
    [("router_aux_loss_coef", -0.1), ("router_aux_loss_coef", float("nan")), ("router_aux_loss_coef", "0.01"),
     ("router_z_loss_coef", float("inf")), ("router_z_loss_coef", -1.0), ("output_router_logits", "yes")],
)
def test_moe_loss_fields_refuse_bad_values(name, value):
    with pytest.raises(ValueError, match=name):
        RamanujanConfig(num_experts=4, **{name: value})


@pytest.mark.parametrize("name, value", [("pad_token_id", 259), ("pad_token_id", -1), ("bos_token_id", 1000),
                                         ("eos_token_id", [258, 300])])
def test_special_token_ids_outside_the_vocabulary_are_refused_when_a_model_is_built(name, value):
    from acx_ramanujan import RamanujanForCausalLM

    config = RamanujanConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1,
                             **{name: value})
    with pytest.raises(ValueError, match=f"{name} .* is outside the vocabulary"):
        RamanujanForCausalLM(config)
    # a config may pass through such a state while being edited (Transformers' own tests shrink the vocabulary first)
    setattr(config, name, 0)
    RamanujanForCausalLM(config)


def test_bad_values_are_refused_from_presets_and_saved_configs(tmp_path):
    preset = tmp_path / "bad.json"
    preset.write_text(json.dumps({"num_experts": "4"}))
    with pytest.raises(ValueError, match="num_experts"):
        RamanujanConfig.from_preset(str(preset))
    RamanujanConfig(hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved" / "config.json"
    values = json.loads(saved.read_text())
    saved.write_text(json.dumps({**values, "rms_norm_eps": -1}))
    with pytest.raises(ValueError, match="rms_norm_eps"):
        AutoConfig.from_pretrained(tmp_path / "saved")


def test_router_loss_fields_exist_on_moe_configs_only():
    """Clients such as TRL take `hasattr(config, "output_router_logits")` to mean "this model has a router"."""
    dense, moe = RamanujanConfig(), RamanujanConfig(num_experts=4, router_aux_loss_coef=0.05)
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "output_router_logits"):
        assert not hasattr(dense, name) and name not in dense.to_dict()
        assert hasattr(moe, name) and name in moe.to_dict()
    assert (moe.router_aux_loss_coef, moe.router_z_loss_coef, moe.output_router_logits) == (0.05, 0.001, False)
    # a dense config saved before these became MoE-only carries their defaults: still loads
    assert not hasattr(RamanujanConfig(router_aux_loss_coef=0.01, output_router_logits=False), "router_aux_loss_coef")
    with pytest.raises(ValueError, match="router_aux_loss_coef applies to mixture-of-experts models only"):
        RamanujanConfig(router_aux_loss_coef=0.5)
    assert RamanujanConfig.from_preset("tiny", num_experts=4, router_z_loss_coef=0.0).router_z_loss_coef == 0.0


@pytest.mark.parametrize("extra", [{}, {"num_experts": 4}, {"num_experts": 4, "num_shared_experts": 1},
                                   {"num_experts": 4, "first_k_dense_layers": 1}, {"qk_norm": True},
                                   {"num_experts": 4, "qk_norm": True}])
def test_parallel_plans_name_only_modules_the_config_builds(extra):
    """Every tensor/expert-parallel rule matches a module or parameter of this config's model (what Transformers'
    test_tp_plan_matches_params checks, per config), and every weight matrix of a decoder layer has a tensor-parallel
    rule (the q/k norms too, whose gradients each rank computes from its own heads), except the routed experts':
    replicated under tensor parallelism, they have an expert-parallel one."""
    import fnmatch

    from acx_ramanujan import RamanujanModel

    config = RamanujanConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2, **extra)
    model = RamanujanModel(config)
    names = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    plans = {**config.base_model_tp_plan, **(config.base_model_ep_plan or {}), **config.base_model_pp_plan}
    assert (config.base_model_ep_plan is None) == (not config.is_moe)
    for key in plans:
        assert any(fnmatch.fnmatch(name, key.replace(".*.", ".[0-9]*.")) for name in names), key
    layer_weights = {name for name in names if name.startswith("layers.")
                     and name.endswith(("proj.weight", "proj", "self_attn.q_norm.weight", "self_attn.k_norm.weight"))}
    for name in layer_weights:
        plan = config.base_model_ep_plan if ".mlp.experts." in name else config.base_model_tp_plan
        assert any(fnmatch.fnmatch(name.removesuffix(".weight"), key.replace(".*.", ".[0-9]*.")) for key in plan), name


def test_deep_preset_is_the_depth_studys_completep_model_at_96_layers():
    """docs/init-study.md section 8 chose the `deep` preset from runs of `acx-rt compare-init`'s `completep` variant at
    width 64 (SwiGLU 172) and 96 layers: the preset must be that very model, built the way compare-init built it."""
    from acx_ramanujan import RamanujanByteTokenizer
    from acx_ramanujan.study import compare_init
    from acx_ramanujan.training.pretrain import build_config, training_arguments

    args = compare_init.parse_args(["--depths", "96", "--variant", "completep:depth_parametrization=completep,"
                                    "depth_base_layers=12", "--config_overrides", "hidden_size=64,intermediate_size=172",
                                    "--max_train_steps", "1", "--seeds", "1", "--output_dir", "unused"])
    (run,) = compare_init.planned_runs(args)
    tokenizer = RamanujanByteTokenizer()
    studied = build_config(compare_init.run_arguments(args, run), tokenizer)
    assert build_config(training_arguments(config_name="deep"), tokenizer).to_dict() == studied.to_dict()
