"""The speed benchmarks compare like with like, and the bounds' hand-written decode step computes what the model does."""

import re

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


# --- serving: generate() and llama.cpp, token by token -----------------------------------------------------------

TINY_SHAPE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, context=16, batch=2)


def test_timeline_splits_the_prompt_pass_from_decoding():
    """Against hand arithmetic: 3 tokens at 1.0, 1.5 and 2.0 s after a start at 0, the call ending at 2.5 s."""
    from acx_ramanujan.bench.serving import Timeline

    timeline = Timeline(tokens=[7, 8, 9], start=0.0, token_times=[1.0, 1.5, 2.0], end=2.5)
    assert timeline.first_token_s == 1.0
    assert timeline.decode_tokens_per_s == 2.0  # tokens 2 and 3 in 1 s
    assert timeline.tokens_per_s == 3 / 2.5


def test_token_clock_stamps_each_generated_token_once():
    """The streamer sees the prompt, then each new token: its tokens are generate()'s output after the prompt, one
    stamp each, in order, inside the call."""
    from acx_ramanujan.bench.serving import TokenClock, clocked
    from acx_ramanujan.bench.speed import greedy_generation

    torch.manual_seed(0)
    model = RamanujanForCausalLM(tiny_config()).eval()
    prompt = torch.randint(0, 256, (1, 5))
    clock = TokenClock()
    timeline = clocked(greedy_generation(model, prompt, 6, streamer=clock), clock)()
    assert timeline.tokens == greedy_generation(model, prompt, 6)()[0, 5:].tolist()
    stamps = [timeline.start, *timeline.token_times, timeline.end]
    assert len(timeline.token_times) == 6 and stamps == sorted(stamps)


def serving_args(**overrides):
    from types import SimpleNamespace

    return SimpleNamespace(**{**dict(prompt_tokens=4, new_tokens=6, repeats=2, threads=1, compile=False), **overrides})


def test_serving_without_llama_cpp_says_so_in_one_line_and_times_generate(monkeypatch):
    """llama.cpp missing (a module name that does not exist stands in for llama_cpp): the part still times ours and
    Llama on the same weights, whose greedy tokens are equal (the export's Llama is our model), and says in one line
    that llama.cpp did not run."""
    from acx_ramanujan.bench import serving as serving_module
    from acx_ramanujan.bench.speed import markdown, serving

    monkeypatch.setattr(serving_module, "LLAMA_CPP_PACKAGES", {"no_such_module_acx": "llama-cpp-python", "gguf": "gguf"})
    row = serving("tiny", TINY_SHAPE, serving_args())
    assert row["engines"] == ["ours eager", "llama eager"] and row["llama_cpp"] is None
    assert row["not_run"] == "llama.cpp rows not run: llama-cpp-python not installed (pip install llama-cpp-python)"
    assert row["tokens_equal_to_ours_eager"] == {"ours eager": 6, "llama eager": 6}
    for figure in ("decode_tokens_per_s", "first_token_ms", "tokens_per_s", "first_call_s"):
        assert set(row[figure]) == set(row["engines"]) and all(0 < value < float("inf") for value in row[figure].values())
    for engine, calls in row["decode_tokens_per_s_all"].items():  # 2 repeats: the median is their mean
        assert len(calls) == 2 and row["decode_tokens_per_s"][engine] == pytest.approx(sum(calls) / 2, abs=1)
    table = markdown({"peak_gflops": {"fp32": 1.0, "bf16": 1.0}, "comparisons": [], "compiled_generation": [],
                      "precision_and_compile": [], "serving": [row]})
    assert table.count("| tiny |") == 2 and "| tiny | llama eager | " in table and "**1.00x**" in table
    assert table.splitlines()[-1] == ("- tiny, batch 1, 4-token prompt, 6 greedy tokens, 1 thread(s): llama.cpp rows "
                                      "not run: llama-cpp-python not installed (pip install llama-cpp-python).")


def test_serving_needs_two_new_tokens(capsys):
    from acx_ramanujan.bench.speed import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--parts", "serving", "--new_tokens", "1"])
    assert capsys.readouterr().err.splitlines()[-1].endswith("--new_tokens must be >= 2, got 1")
    assert parse_args(["--parts", "models", "--new_tokens", "1"]).new_tokens == 1  # the other parts time one token


@pytest.fixture
def llama_cpp():
    pytest.importorskip("gguf")
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; it compiles llama.cpp)"
    )


@pytest.mark.llama_cpp
def test_serving_runs_the_gguf_export_in_llama_cpp_with_our_greedy_tokens(llama_cpp):
    """The llama.cpp rows at a tiny shape: f32 and f16 files timed beside generate() (static + compiled too), the
    f32 file's greedy tokens equal ours for every new token, and the row names the llama.cpp that ran."""
    from acx_ramanujan.bench.speed import serving

    row = serving("tiny", TINY_SHAPE, serving_args(compile=True))
    assert row["engines"] == ["ours eager", "ours static compiled", "llama eager", "llama.cpp f32", "llama.cpp f16"]
    assert row["not_run"] is None and row["llama_cpp"].startswith(f"llama-cpp-python {llama_cpp.__version__} (ggml ")
    assert re.search(r"; CPU backend: [A-Z0-9_]+( [A-Z0-9_]+)*\)$", row["llama_cpp"]), row["llama_cpp"]
    assert row["tokens_equal_to_ours_eager"]["llama.cpp f32"] == 6
    assert row["tokens_equal_to_ours_eager"]["ours static compiled"] == 6
    assert all(row["deterministic"].values())
    assert all(0 < value < float("inf") for value in row["decode_tokens_per_s"].values())


@pytest.mark.llama_cpp
def test_llama_cpp_generation_goes_on_past_end_of_sequence(tmp_path, llama_cpp):
    """A model whose every greedy token is </s> (id 258): llama.cpp still hands over all the tokens asked for, as
    generate() with eos_token_id=None does, so both sides time the same number of decode steps."""
    from acx_ramanujan.bench.serving import llama_cpp_generation, load_llama_cpp
    from acx_ramanujan.export.gguf import export_gguf
    from acx_ramanujan.export.llama import byte_tokenizer_fast, to_transformers_model

    torch.manual_seed(0)
    model = RamanujanForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # the residual stream is the embedding, dominated by channel 0, which only </s> reads
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.zero_()
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight[258, 0] = 10.0
    tokenizer = byte_tokenizer_fast()
    assert tokenizer.eos_token_id == 258
    path = export_gguf(to_transformers_model(model), tokenizer, "f32", tmp_path)
    llm = load_llama_cpp(path, context=16, threads=1)
    run = llama_cpp_generation(llm, [1, 2, 3], 5)
    timelines = [run(), run()]
    # llama.cpp's own counters: each call evaluated the whole prompt (no KV-cache reuse from the previous call) and
    # then 4 single-token decode steps (the fifth token is not fed back).
    counters = llama_cpp.llama_perf_context(llm.ctx)
    llm.close()
    assert all(timeline.tokens == [258] * 5 and len(timeline.token_times) == 5 for timeline in timelines)
    assert (counters.n_p_eval, counters.n_eval) == (2 * 3, 2 * 4)
