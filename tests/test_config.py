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
    required = {"tiny", "tiny-moe", "default", "gpt2_style", "llama_7b_style", "llama_13b_style", "moe_8x"}
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
