"""`acx-rt bench-speed`: time our model against Transformers' Llama (dense) and Qwen3-MoE (experts) in one process.

Peers get identical shapes, vocabulary, thread count and optimizer (AdamW), and their runs are interleaved
(ours, theirs, ours, ...) so that load from other jobs on a shared machine hits both alike; the tables give medians
and the ours / theirs ratio of the medians. Figures per shape: training step (forward + backward + AdamW) tokens/s,
prefill tokens/s, greedy generation tokens/s with the KV cache (batch 1), peak memory of one training step, and the
achieved FLOP/s of the training step as a fraction of this machine's measured matmul peak (fp32 and bf16).
Generation both ways Transformers offers, for ours and Llama at batch 1 and 8: its default `generate()` (eager
forward, dynamic cache) and a static cache with the decode step compiled by `generate()` itself; tokens/s, the
first call's seconds (which include compiling), whether the tokens are identical, and FLOP/s against the peaks.
The training step of ours and the peer in fp32 and under bf16 autocast, eager and compiled, with FLOP/s against
the peaks. Serving one sequence (batch 1, greedy), timed token by token: ours eager and static + compiled, Llama
eager on the same weights, and their GGUF export (f32, f16) in llama.cpp through llama-cpp-python. Optional: two
scaling curves (training step time against context length on the sdpa path, and against the number of experts at
top-2), plotted as PNG.
"""

import argparse
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from ..files import write_json_atomically
from ..configuration_ramanujan import RamanujanConfig
from ..modeling_ramanujan import RamanujanForCausalLM
from ..export.llama import byte_tokenizer_fast, to_transformers_model
from .serving import (Timeline, TokenClock, clocked, llama_cpp_generation, llama_cpp_missing, llama_cpp_version,
                      load_llama_cpp)

VOCAB_SIZE = 256
# nanoGPT's CPU recipe (width 128, 4 layers, 4 heads, context 64, batch 12) and the larger shape.
# SwiGLU widths keep the parameter count of a 4x GELU MLP (2/3 · 4 · d, rounded to a multiple of 8);
# an MoE layer has top-2 experts of half that width, so its active parameters match the dense MLP.
SHAPES = {
    "nanogpt": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344, context=64, batch=12),
    "width256": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=688, context=256, batch=8),
}
NUM_EXPERTS, TOP_K = 8, 2
T = TypeVar("T")


def model_configs(shape: dict, num_experts: int = 0, context: int | None = None,
                  vocab_size: int = VOCAB_SIZE) -> dict[str, object]:
    """Ours and the Transformers peer (Llama when dense, Qwen3-MoE with experts) with the same shapes."""
    context = context or shape["context"]
    common = dict(
        vocab_size=vocab_size, hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_attention_heads"],
        intermediate_size=shape["intermediate_size"], max_position_embeddings=max(1024, context),
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    if not num_experts:
        return {"ours": RamanujanConfig(**common), "llama": LlamaConfig(**common)}
    moe = dict(num_experts=num_experts, num_experts_per_tok=TOP_K, moe_intermediate_size=shape["intermediate_size"] // 2,
               norm_topk_prob=True, router_aux_loss_coef=0.01)
    # Qwen3-MoE adds its balance loss to `loss` only with output_router_logits; ours always does when given labels.
    return {"ours": RamanujanConfig(**common, **moe, router_z_loss_coef=0.0),
            "qwen3_moe": Qwen3MoeConfig(**common, **moe, output_router_logits=True)}


def build(config) -> torch.nn.Module:
    model_class = {RamanujanConfig: RamanujanForCausalLM, LlamaConfig: LlamaForCausalLM, Qwen3MoeConfig: Qwen3MoeForCausalLM}
    return model_class[type(config)](config)


def train_step(model: torch.nn.Module, batch: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> Callable[[], None]:
    """One forward + backward + AdamW step on `batch` (inputs are the labels, shifted inside the loss)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def prefill(model: torch.nn.Module, batch: torch.Tensor) -> Callable[[], None]:
    """The prompt pass of generation: the whole batch through the model, filling a fresh KV cache."""

    def run():
        with torch.no_grad():
            model(input_ids=batch, use_cache=True, logits_to_keep=1)

    return run


def greedy_generation(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int,
                      **generate_kwargs) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0, eos_token_id=None, **generate_kwargs)

    return run


def static_compiled_settings() -> dict:
    """`generate()` arguments for a static KV cache with the decode step compiled (`CompileConfig(fullgraph=True)`).

    `generate()` compiles the decode step by itself on CUDA/XPU when the cache is static; on other devices only when
    `compile_config._compile_all_devices` is set, the switch Transformers keeps for compiling on CPU.
    """
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": compile_config}


def interleaved_calls(runs: dict[str, Callable[[], T]], repeats: int, warmup: int = 1) -> dict[str, list[T]]:
    """What each call returns, peers alternating call by call after `warmup` calls each."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    results = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results


def interleaved_seconds(runs: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds per call, peers alternating call by call."""

    def timed(run):
        def call():
            start = time.perf_counter()
            run()
            return time.perf_counter() - start

        return call

    return interleaved_calls({name: timed(run) for name, run in runs.items()}, repeats, warmup)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def training_peak_mib(config, batch: torch.Tensor, threads: int) -> float:
    """Peak resident memory of two training steps in a fresh process, above its resident memory before the model
    exists: weights, gradients, AdamW state, activations and allocator slack (Linux VmHWM, proc(5)).

    A fresh process because a warm one keeps freed blocks resident, which hides the peak of a later step.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_training_peak_in_this_process, (config, batch, threads))


def _training_peak_in_this_process(config, batch: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    before = _proc_status_kib("VmRSS")
    step = train_step(build(config), batch)
    step()
    step()
    return (_proc_status_kib("VmHWM") - before) / 1024


def counted_flops(run: Callable[[], None]) -> int:
    """FLOPs of one call as torch.utils.flop_counter counts them (matmuls and attention; attention counted dense)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def matmul_peak_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    """Best FLOP/s of a square matmul, the practical peak this process can reach with its threads."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = min(interleaved_seconds({"mm": lambda: torch.mm(a, b)}, repeats, warmup=0)["mm"])
    return 2 * size**3 / best


def compare_shape(name: str, shape: dict, num_experts: int, args, peaks: dict[str, float]) -> dict:
    """Training, prefill and generation of ours and the peer at one shape; medians, ratios, memory, FLOP/s."""
    torch.manual_seed(0)
    models = {label: build(config) for label, config in model_configs(shape, num_experts).items()}
    batch = torch.randint(0, VOCAB_SIZE, (shape["batch"], shape["context"]))
    prompt = torch.randint(0, VOCAB_SIZE, (1, args.prompt_tokens))
    steps = {label: train_step(model, batch) for label, model in models.items()}
    tokens = batch.numel()
    result = {"shape": name, **shape, "num_experts": num_experts, "top_k": TOP_K if num_experts else None}

    train = interleaved_seconds(steps, args.repeats)
    result["train_tokens_per_s"] = {label: tokens / median(times) for label, times in train.items()}
    result["train_step_ms"] = {label: 1e3 * median(times) for label, times in train.items()}
    result["train_step_ms_all"] = {label: [round(1e3 * t, 1) for t in times] for label, times in train.items()}
    result["peak_memory_mib"] = {label: training_peak_mib(model.config, batch, args.threads)
                                 for label, model in models.items()}
    # Counted on a fresh copy of ours, explicitly on the per-expert path: FlopCounterMode sees its matmuls but does
    # not count grouped_mm. The peer does the same matmuls.
    counted = build(models["ours"].config)
    counted.set_experts_implementation("eager")
    flops = counted_flops(train_step(counted, batch))
    result["train_gflop_per_step"] = flops / 1e9
    result["train_fraction_of_peak"] = {
        label: {dtype: flops / (1e-3 * result["train_step_ms"][label]) / peak for dtype, peak in peaks.items()}
        for label in models
    }

    for model in models.values():
        model.eval()
    pre = interleaved_seconds({label: prefill(model, batch) for label, model in models.items()}, args.repeats)
    result["prefill_tokens_per_s"] = {label: tokens / median(times) for label, times in pre.items()}
    gen = interleaved_seconds(
        {label: greedy_generation(model, prompt, args.new_tokens) for label, model in models.items()}, args.repeats
    )
    result["generate_tokens_per_s"] = {label: args.new_tokens / median(times) for label, times in gen.items()}
    counted.eval()
    per_second = {"prefill": counted_flops(prefill(counted, batch)) * result["prefill_tokens_per_s"]["ours"] / tokens,
                  "generate": counted_flops(greedy_generation(counted, prompt, args.new_tokens))
                  * result["generate_tokens_per_s"]["ours"] / args.new_tokens}
    result["ours_inference_fraction_of_peak"] = {
        figure: {dtype: flop_per_s / peak for dtype, peak in peaks.items()} for figure, flop_per_s in per_second.items()
    }
    return result


def compiled_generation(name: str, shape: dict, batch_size: int, args, peaks: dict[str, float]) -> dict:
    """Greedy generation of ours and Llama (same weights' shapes), each both ways: Transformers' default
    `generate()` (eager, dynamic cache) and static cache + compiled decode step. Interleaved, medians."""
    # Every model's compiled call shares one code object (Transformers' forward wrapper), which Dynamo recompiles per
    # model up to its recompile limit; a fresh start per comparison keeps earlier rows from using it up.
    torch.compiler.reset()
    torch.manual_seed(0)
    models = {label: build(config).eval() for label, config in model_configs(shape).items()}
    prompt = torch.randint(0, VOCAB_SIZE, (batch_size, args.prompt_tokens))
    runs = {}
    for label, model in models.items():
        runs[f"{label} eager"] = greedy_generation(model, prompt, args.new_tokens)
        runs[f"{label} static compiled"] = greedy_generation(model, prompt, args.new_tokens, **static_compiled_settings())
    tokens, first_call_s = {}, {}
    for label, run in runs.items():  # the first call compiles; it is timed here and left out of the medians
        start = time.perf_counter()
        tokens[label] = run()
        first_call_s[label] = time.perf_counter() - start
    new_tokens = batch_size * args.new_tokens
    times = interleaved_seconds(runs, args.repeats, warmup=0)
    tokens_per_s = {label: new_tokens / median(t) for label, t in times.items()}
    flops_per_token = counted_flops(runs["ours eager"]) / new_tokens  # the whole call (prompt included) per new token
    return {"shape": name, "batch": batch_size, "tokens_per_s": tokens_per_s, "first_call_s": first_call_s,
            "identical_tokens": {label: torch.equal(tokens[f"{label} eager"], tokens[f"{label} static compiled"])
                                 for label in models},
            "gflop_per_token": flops_per_token / 1e9,
            "fraction_of_peak": {label: {dtype: flops_per_token * tps / peak for dtype, peak in peaks.items()}
                                 for label, tps in tokens_per_s.items()}}


GGUF_TYPES = ("f32", "f16")


def serving(name: str, shape: dict, args) -> dict:
    """What a user gets from serving one sequence (batch 1, greedy) of one model: ours through `generate()` (eager,
    and with --compile static cache + compiled decode step), Llama's eager `generate()` on the same weights (the
    export's Llama, the parity reference) and that model's GGUF export (f32, f16) in llama.cpp, with the same prompt
    tokens, new tokens and threads. Interleaved, medians; each call timed token by token (`serving.Timeline`).

    Random weights (seed 0) in the byte vocabulary (259 tokens: a GGUF file carries a tokenizer, one token per
    embedding row); every engine's greedy tokens are compared with ours eager.
    """
    torch.compiler.reset()  # as in compiled_generation: a fresh recompile budget for this comparison
    torch.manual_seed(0)
    tokenizer = byte_tokenizer_fast()
    ours = build(model_configs(shape, vocab_size=len(tokenizer))["ours"]).eval()
    llama = to_transformers_model(ours)
    prompt = torch.randint(0, VOCAB_SIZE, (1, args.prompt_tokens))
    settings = {"ours eager": (ours, {}),
                **({"ours static compiled": (ours, static_compiled_settings())} if args.compile else {}),
                "llama eager": (llama, {})}
    runs = {}
    for label, (model, generate_kwargs) in settings.items():
        clock = TokenClock()
        run = greedy_generation(model, prompt, args.new_tokens, streamer=clock, **generate_kwargs)
        runs[label] = clocked(run, clock)
    result = {"shape": name, "batch": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "threads": args.threads, "llama_cpp": None, "not_run": llama_cpp_missing()}
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as engines:
        if result["not_run"] is None:
            from ..export.gguf import export_gguf  # imports gguf, checked just above

            result["llama_cpp"] = llama_cpp_version()
            for outtype in GGUF_TYPES:
                path = export_gguf(llama, tokenizer, outtype, Path(directory))
                engine = engines.enter_context(
                    contextlib.closing(load_llama_cpp(path, args.prompt_tokens + args.new_tokens, args.threads)))
                runs[f"llama.cpp {outtype}"] = llama_cpp_generation(engine, prompt[0].tolist(), args.new_tokens)
        first, first_call_s = {}, {}
        for label, run in runs.items():  # the first call compiles; it is timed here and left out of the medians
            start = time.perf_counter()
            first[label] = run()
            first_call_s[label] = time.perf_counter() - start
        timelines = interleaved_calls(runs, args.repeats, warmup=0)
    reference = first["ours eager"].tokens

    def medians(figure: Callable[[Timeline], float]) -> dict[str, float]:
        return {label: median(figure(timeline) for timeline in calls) for label, calls in timelines.items()}

    return {**result, "engines": list(runs), "first_call_s": first_call_s,
            "decode_tokens_per_s": medians(lambda timeline: timeline.decode_tokens_per_s),
            "decode_tokens_per_s_all": {label: [round(timeline.decode_tokens_per_s) for timeline in calls]
                                        for label, calls in timelines.items()},
            "first_token_ms": medians(lambda timeline: 1e3 * timeline.first_token_s),
            "tokens_per_s": medians(lambda timeline: timeline.tokens_per_s),
            "tokens_equal_to_ours_eager": {label: leading_agreement(reference, timeline.tokens)
                                           for label, timeline in first.items()},
            "deterministic": {label: all(timeline.tokens == first[label].tokens for timeline in calls)
                              for label, calls in timelines.items()}}


def leading_agreement(reference: list[int], tokens: list[int]) -> int:
    """How many tokens agree before the first difference (after one, greedy continuations go separate ways)."""
    for index, (a, b) in enumerate(zip(reference, tokens)):
        if a != b:
            return index
    return min(len(reference), len(tokens))


PRECISIONS = {"fp32": None, "bf16 autocast": torch.bfloat16}


def precision_and_compile(name: str, shape: dict, num_experts: int, args, peaks: dict[str, float]) -> dict:
    """The training step of ours and the peer (Llama; Qwen3-MoE with experts) in each precision (fp32; bf16 autocast,
    `acx-rt train`'s default where bf16 is native) and, with --compile (dense only), under `torch.compile` too.
    Interleaved, medians; each setting's tokens/s against the peer's fp32 eager step and against the peer's under
    the same setting, and ours as FLOP/s against the peaks."""
    torch.compiler.reset()  # as in compiled_generation: a fresh recompile budget for this comparison
    torch.manual_seed(0)
    configs = model_configs(shape, num_experts)
    peer = next(label for label in configs if label != "ours")
    batch = torch.randint(0, VOCAB_SIZE, (shape["batch"], shape["context"]))
    runs, compile_seconds = {}, {}
    for label, config in configs.items():
        for precision, dtype in PRECISIONS.items():
            # Compiled MoE training runs Transformers' batched_mm (routing-independent shapes), which holds a copy
            # of the expert weights per token and choice: at width 256 that ran a 24 GiB machine out of memory.
            for compiled in (False, True) if args.compile and not num_experts else (False,):
                setting = f"{precision} {'compiled' if compiled else 'eager'}"
                model = build(config)
                runs[label, setting] = train_step(torch.compile(model) if compiled else model, batch, dtype)
                if compiled:  # the first call compiles; timed here and left out of the medians
                    start = time.perf_counter()
                    runs[label, setting]()
                    compile_seconds[f"{label} {setting}"] = time.perf_counter() - start
    times = interleaved_seconds(runs, args.repeats)
    tokens_per_s = {key: batch.numel() / median(t) for key, t in times.items()}
    settings = list(dict.fromkeys(setting for _, setting in runs))
    baseline = tokens_per_s[peer, "fp32 eager"]
    flops_per_token = counted_flops(runs["ours", "fp32 eager"]) / batch.numel()  # timed already: one more step
    return {"shape": name, "num_experts": num_experts, "peer": peer, "settings": settings,
            "compile_seconds": compile_seconds,
            "train_tokens_per_s": {label: {setting: tokens_per_s[label, setting] for setting in settings}
                                   for label in configs},
            "ours_vs_peer_fp32_eager": {setting: tokens_per_s["ours", setting] / baseline for setting in settings},
            "ours_vs_peer_same_setting": {setting: tokens_per_s["ours", setting] / tokens_per_s[peer, setting]
                                          for setting in settings},
            "ours_fraction_of_peak": {setting: {dtype: flops_per_token * tokens_per_s["ours", setting] / peak
                                                for dtype, peak in peaks.items()} for setting in settings}}


def context_scaling(args) -> dict:
    """Training step time against context length at width 256 (batch 4), ours and Llama, attention on sdpa."""
    shape = dict(SHAPES["width256"], batch=4)
    curves: dict[str, list[float]] = {}
    kernels: dict[int, list[str]] = {}
    for context in args.contexts:
        torch.manual_seed(0)
        models = {label: build(config) for label, config in model_configs(shape, context=context).items()}
        batch = torch.randint(0, VOCAB_SIZE, (shape["batch"], context))
        steps = {label: train_step(model, batch) for label, model in models.items()}
        for label, times in interleaved_seconds(steps, args.scaling_repeats).items():
            curves.setdefault(label, []).append(1e3 * median(times))
        kernels[context] = attention_kernels(steps["ours"])
    return {"context": list(args.contexts), "train_step_ms": curves, "ours_attention_kernels": kernels}


def attention_kernels(run: Callable[[], None]) -> list[str]:
    """Names of the scaled-dot-product kernels a call ran (to show attention stayed on the fused sdpa path)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    return sorted({event.key for event in profiler.key_averages() if "scaled_dot_product" in event.key})


def expert_scaling(args) -> dict:
    """Training step time against the number of experts at top-2 (nanoGPT shape), per experts implementation."""
    shape = SHAPES["nanogpt"]
    variants = {"ours (sorted dispatch)": ("ours", "eager"), "ours + grouped_mm": ("ours", "grouped_mm"),
                "Qwen3-MoE (default: grouped_mm)": ("qwen3_moe", "grouped_mm"),
                "Qwen3-MoE eager (per-expert masks)": ("qwen3_moe", "eager")}
    curves: dict[str, list[float]] = {}
    for num_experts in args.experts:
        torch.manual_seed(0)
        configs = model_configs(shape, num_experts)
        batch = torch.randint(0, VOCAB_SIZE, (shape["batch"], shape["context"]))
        steps = {}
        for label, (peer, implementation) in variants.items():
            model = build(configs[peer])
            model.set_experts_implementation(implementation)
            steps[label] = train_step(model, batch)
        for label, times in interleaved_seconds(steps, args.scaling_repeats).items():
            curves.setdefault(label, []).append(1e3 * median(times))
    return {"num_experts": list(args.experts), "top_k": TOP_K, "train_step_ms": curves}


def plot(curves: dict, x_key: str, x_label: str, title: str, path: Path) -> None:
    """One line per variant; matplotlib is imported here because it is an optional (`train`/`dev`) dependency."""
    import matplotlib.pyplot as plt

    from ..reporting import save_figure  # switches matplotlib to its file-only backend before any figure exists

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, values in curves["train_step_ms"].items():
        axis.plot(curves[x_key], values, marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(curves[x_key], [str(x) for x in curves[x_key]])
    axis.set_xlabel(x_label)
    axis.set_ylabel("training step (ms, median)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def of_peaks(fraction: dict[str, float], peak_gflops: dict[str, float]) -> str:
    """"x % of the fp32 / y % of the bf16 peak"; bf16 left out where its matmul is slower than fp32's (not native)."""
    if peak_gflops["bf16"] <= peak_gflops["fp32"]:
        return f"{fraction['fp32']:.1%} of the fp32 peak"
    return f"{fraction['fp32']:.1%} of the fp32 / {fraction['bf16']:.1%} of the bf16 peak"


def markdown(results: dict) -> str:
    """The comparison tables of docs/benchmarks.md."""
    peaks = results["peak_gflops"]
    lines = []
    if results["comparisons"]:
        lines += ["| shape | peer | train tok/s (ours / theirs = ratio) | prefill tok/s | generate tok/s | peak MiB (ours / "
                  "theirs) | train FLOP/s vs fp32 peak (ours / theirs) |", "|---|---|---|---|---|---|---|"]
    for row in results["comparisons"]:
        ours, peer = "ours", next(label for label in row["train_tokens_per_s"] if label != "ours")

        def ratio(key):
            values = row[key]
            return f"{values[ours]:.0f} / {values[peer]:.0f} = **{values[ours] / values[peer]:.2f}x**"

        memory = row["peak_memory_mib"]
        fraction = row["train_fraction_of_peak"]
        lines.append(
            f"| {row['shape']}{' MoE' if row['num_experts'] else ''} | {peer} | {ratio('train_tokens_per_s')} "
            f"| {ratio('prefill_tokens_per_s')} | {ratio('generate_tokens_per_s')} "
            f"| {memory[ours]:.0f} / {memory[peer]:.0f} "
            f"| {fraction[ours]['fp32']:.0%} / {fraction[peer]['fp32']:.0%} |"
        )
    lines.append("")
    native = peaks["bf16"] > peaks["fp32"]
    lines.append(f"Matmul peak (1024³): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s"
                 + ("." if native else " (slower than fp32: bf16 is not native on this CPU; figures below are against "
                                       "the fp32 peak only)."))
    for row in results["comparisons"]:
        fraction = row["train_fraction_of_peak"]["ours"]
        inference = row["ours_inference_fraction_of_peak"]
        lines.append(f"- {row['shape']}{' MoE' if row['num_experts'] else ''}, ours: training "
                     f"{of_peaks(fraction, peaks)} ({row['train_gflop_per_step']:.1f} GFLOP per step); prefill "
                     f"{of_peaks(inference['prefill'], peaks)}; eager generation (batch 1) "
                     f"{of_peaks(inference['generate'], peaks)}.")
    if results.get("precision_and_compile"):
        lines += ["", "| shape | peer | training step | tok/s ours / peer | ours / peer fp32 eager | ours / peer, same "
                  "setting | compiling s (ours / peer) | ours, FLOP/s |", "|---|---|---|---|---|---|---|---|"]
    for row in results.get("precision_and_compile", []):
        speed, compiling, peer = row["train_tokens_per_s"], row["compile_seconds"], row["peer"]
        for setting in row["settings"]:
            first = (f"{compiling['ours ' + setting]:.0f} / {compiling[peer + ' ' + setting]:.0f}"
                     if "ours " + setting in compiling else "")
            lines.append(f"| {row['shape']}{' MoE' if row['num_experts'] else ''} | {peer} | {setting} "
                         f"| {speed['ours'][setting]:.0f} / {speed[peer][setting]:.0f} "
                         f"| **{row['ours_vs_peer_fp32_eager'][setting]:.2f}x** "
                         f"| {row['ours_vs_peer_same_setting'][setting]:.2f}x | {first} "
                         f"| {of_peaks(row['ours_fraction_of_peak'][setting], peaks)} |")
    if results["compiled_generation"]:
        lines += ["", "| shape | batch | generate tok/s: ours eager / ours static compiled / Llama eager / Llama static "
                  "compiled | ours compiled / Llama eager | ours compiled / Llama compiled | first call s (ours / Llama, "
                  "compiled) | identical tokens (ours, Llama) | ours compiled, FLOP/s |",
                  "|---|---|---|---|---|---|---|---|"]
    for row in results["compiled_generation"]:
        speed, first, fraction = row["tokens_per_s"], row["first_call_s"], row["fraction_of_peak"]["ours static compiled"]
        lines.append(
            f"| {row['shape']} | {row['batch']} | {speed['ours eager']:.0f} / {speed['ours static compiled']:.0f} / "
            f"{speed['llama eager']:.0f} / {speed['llama static compiled']:.0f} "
            f"| **{speed['ours static compiled'] / speed['llama eager']:.2f}x** "
            f"| {speed['ours static compiled'] / speed['llama static compiled']:.2f}x "
            f"| {first['ours static compiled']:.0f} / {first['llama static compiled']:.0f} "
            f"| {row['identical_tokens']['ours']}, {row['identical_tokens']['llama']} "
            f"| {of_peaks(fraction, peaks)} |")
    if results.get("serving"):
        lines += ["", "| shape | engine | decode tok/s (tokens 2..n) | decode × Llama eager | prompt + first token, ms "
                  "| end to end tok/s | greedy tokens equal to ours eager | first call s |",
                  "|---|---|---|---|---|---|---|---|"]
    for row in results.get("serving", []):
        decode = row["decode_tokens_per_s"]
        for engine in row["engines"]:
            lines.append(f"| {row['shape']} | {engine} | {decode[engine]:.0f} "
                         f"| **{decode[engine] / decode['llama eager']:.2f}x** "
                         f"| {row['first_token_ms'][engine]:.1f} | {row['tokens_per_s'][engine]:.0f} "
                         f"| {row['tokens_equal_to_ours_eager'][engine]} / {row['new_tokens']} "
                         f"| {row['first_call_s'][engine]:.1f} |")
    for row in results.get("serving", []):
        lines.append(f"- {row['shape']}, batch 1, {row['prompt_tokens']}-token prompt, {row['new_tokens']} greedy "
                     f"tokens, {row['threads']} thread(s): "
                     + (row["not_run"] or f"llama.cpp through {row['llama_cpp']}") + ".")
    return "\n".join(lines)


PARTS = {"models": "ours against the peer, dense and MoE (training, prefill, generation, memory)",
         "precision": "the training step in fp32 and bf16 autocast, eager and compiled, dense and MoE",
         "generation": "static cache + compiled decode step against the default generate() (needs --compile)",
         "serving": "batch-1 greedy generation as served: ours eager and static + compiled, Llama eager, and the GGUF "
                    "export (f32, f16) in llama.cpp (needs llama-cpp-python; token by token, prompt apart)"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acx-rt bench-speed", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS),
                        help="which comparisons to run: " + "; ".join(f"{name}: {what}" for name, what in PARTS.items()))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for every model")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed runs per figure (medians reported)")
    parser.add_argument("--prompt_tokens", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64, help="greedy tokens generated per run (batch 1)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile, ours and Llama: the training step, and generation with a "
                             "static cache and a compiled decode step (slow to compile on a small CPU)")
    parser.add_argument("--generation_batches", type=int, nargs="+", default=[1, 8],
                        help="batch sizes of the static-cache compiled generation comparison")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure and plot step time against context length and number of experts")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--scaling_repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("speed_results.json"), help="JSON with every measurement")
    parser.add_argument("--plot_dir", type=Path, default=Path("docs/img"), help="where the scaling PNGs go")
    args = parser.parse_args(argv)
    for name in ("threads", "repeats", "prompt_tokens", "new_tokens", "scaling_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if "serving" in args.parts and args.new_tokens < 2:
        parser.error("--parts serving times tokens 2..n apart from the first: "
                     f"--new_tokens must be >= 2, got {args.new_tokens}")
    if min(args.generation_batches) < 1:
        parser.error(f"--generation_batches must be >= 1, got {min(args.generation_batches)}")
    if min(args.contexts) < 2 or min(args.experts) < TOP_K:
        parser.error(f"--contexts must be >= 2 and --experts >= {TOP_K} (top-{TOP_K} routing)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    peaks = {"fp32": matmul_peak_flops(torch.float32), "bf16": matmul_peak_flops(torch.bfloat16)}
    results = {"started": started, "threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "load_average_at_start": os.getloadavg(), "peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
               "argv": argv, "comparisons": [], "precision_and_compile": [], "compiled_generation": [], "serving": []}
    for name in args.shapes:
        if "models" in args.parts:
            for num_experts in (0, NUM_EXPERTS):
                print(f"[bench-speed] {name} {'MoE' if num_experts else 'dense'} ...", file=sys.stderr, flush=True)
                results["comparisons"].append(compare_shape(name, SHAPES[name], num_experts, args, peaks))
        if "precision" in args.parts:
            for num_experts in (0, NUM_EXPERTS):
                print(f"[bench-speed] {name} {'MoE' if num_experts else 'dense'} fp32 / bf16, eager / compiled ...",
                      file=sys.stderr, flush=True)
                results["precision_and_compile"].append(precision_and_compile(name, SHAPES[name], num_experts, args, peaks))
        if "generation" in args.parts and args.compile:
            for batch_size in args.generation_batches:
                print(f"[bench-speed] {name} generation, batch {batch_size}, static cache + compile ...",
                      file=sys.stderr, flush=True)
                results["compiled_generation"].append(compiled_generation(name, SHAPES[name], batch_size, args, peaks))
        if "serving" in args.parts:
            print(f"[bench-speed] {name} serving, batch 1: generate() and llama.cpp ...", file=sys.stderr, flush=True)
            results["serving"].append(serving(name, SHAPES[name], args))
    if args.scaling:
        print("[bench-speed] scaling ...", file=sys.stderr, flush=True)
        results["context_scaling"] = context_scaling(args)
        results["expert_scaling"] = expert_scaling(args)
        plot(results["context_scaling"], "context", "context length (tokens)",
             "Training step vs context (width 256, batch 4, sdpa)", args.plot_dir / "speed_context_scaling.png")
        plot(results["expert_scaling"], "num_experts", f"experts (top-{TOP_K})",
             "Training step vs number of experts (nanoGPT shape)", args.plot_dir / "speed_expert_scaling.png")
    results["load_average_at_end"] = os.getloadavg()
    write_json_atomically(args.output, results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
