"""The speed benchmarks compare like with like, and the bounds' hand-written decode step computes what the model does."""

import pytest
import torch
from conftest import tiny_config

from acx_ramanujan import RamanujanForCausalLM
from acx_ramanujan.modeling_ramanujan import CACHE_NAME
from acx_ramanujan.bench.speed import NUM_EXPERTS, SHAPES, build, model_configs
from acx_ramanujan.bench.bounds import bare_decode_step


def parameter_shapes(model) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in model.parameters())


@pytest.mark.parametrize("num_experts", [0, NUM_EXPERTS])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_ours_and_the_peer_have_the_same_parameters(shape, num_experts):
    """Tensor for tensor the same shapes on both sides; the only extra weights are Qwen3's per-head q/k norms (work it
    does and we don't). Names differ (our router is `router`, Qwen3's `gate`), so shapes are compared as multisets."""
    with torch.device("meta"):
        ours, peer = (build(config) for config in model_configs(SHAPES[shape], num_experts).values())
    qk_norms = [name for name, _ in peer.named_parameters() if name.endswith(("q_norm.weight", "k_norm.weight"))]
    assert bool(qk_norms) == bool(num_experts)  # Llama has none, Qwen3-MoE one pair per layer
    theirs = sorted(tuple(p.shape) for name, p in peer.named_parameters() if name not in qk_norms)
    assert parameter_shapes(ours) == theirs


@pytest.mark.parametrize("init_scheme", ["normal", "ramanujan"])  # ramanujan: a per-layer attention temperature
def test_bare_decode_step_matches_the_model(init_scheme):
    """The "kernels alone" decode step gives the model's own next-token logits (GQA, cache of 7 tokens)."""
    torch.manual_seed(0)
    model = RamanujanForCausalLM(tiny_config(init_scheme=init_scheme)).eval()
    prompt, token = torch.randint(0, 256, (2, 7)), torch.randint(0, 256, (2, 1))
    with torch.no_grad():
        cache = getattr(model(prompt, use_cache=True), CACHE_NAME)  # the installed release's field name
        keys = [layer.keys.clone() for layer in cache.layers]
        values = [layer.values.clone() for layer in cache.layers]
        expected = model(token, cache=cache).logits
        got = bare_decode_step(model, keys, values, position=7)(token)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compiled_generation_compares_both_paths_with_identical_tokens():
    """`bench-speed`'s generation comparison at a tiny shape: all four runs timed, the compiled static-cache tokens
    equal the eager ones for both models, and the FLOP/s fractions come from counted FLOPs (positive, finite)."""
    from types import SimpleNamespace

    from acx_ramanujan.bench.speed import compiled_generation

    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, context=16, batch=2)
    args = SimpleNamespace(prompt_tokens=4, new_tokens=3, repeats=1)
    result = compiled_generation("tiny", shape, 2, args, {"fp32": 1e9, "bf16": 1e9})
    assert set(result["tokens_per_s"]) == {"ours eager", "ours static compiled", "llama eager", "llama static compiled"}
    assert result["identical_tokens"] == {"ours": True, "llama": True}
    assert 0 < result["gflop_per_token"] < 1e-2
    fractions = [value for by_dtype in result["fraction_of_peak"].values() for value in by_dtype.values()]
    assert all(0 < value < float("inf") for value in fractions)


@pytest.mark.parametrize("num_experts", [0, NUM_EXPERTS])
def test_training_precisions_are_timed_for_both_models_against_the_peer_in_fp32_eager(num_experts):
    """`bench-speed`'s precision table at a tiny shape (compile off: inductor is slow here): both models in fp32 and
    under bf16 autocast, ratios that follow from the timed tokens/s, FLOP/s fractions from counted FLOPs."""
    from types import SimpleNamespace

    from acx_ramanujan.bench.speed import markdown, precision_and_compile

    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, context=16, batch=2)
    args = SimpleNamespace(compile=False, repeats=1)
    row = precision_and_compile("tiny", shape, num_experts, args, {"fp32": 1e9, "bf16": 2e9})
    assert row["peer"] == ("qwen3_moe" if num_experts else "llama")
    assert row["settings"] == ["fp32 eager", "bf16 autocast eager"] and row["compile_seconds"] == {}
    speed = row["train_tokens_per_s"]
    for setting in row["settings"]:
        assert row["ours_vs_peer_fp32_eager"][setting] == pytest.approx(speed["ours"][setting] / speed[row["peer"]]["fp32 eager"])
        assert row["ours_vs_peer_same_setting"][setting] == pytest.approx(speed["ours"][setting] / speed[row["peer"]][setting])
        fraction = row["ours_fraction_of_peak"][setting]
        assert 0 < fraction["bf16"] < fraction["fp32"] < float("inf")  # the same FLOP/s against twice the peak
    table = markdown({"peak_gflops": {"fp32": 1.0, "bf16": 2.0}, "comparisons": [], "compiled_generation": [],
                      "precision_and_compile": [row]})
    assert table.count("| tiny") == 2 and "bf16 autocast eager" in table
