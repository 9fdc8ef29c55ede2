"""How far could any model that computes the same numbers get past Transformers' Llama and Qwen3-MoE?

The speed targets are ratios of medians, ours / theirs, at fp32 on CPU. This module measures the work a model with
identical numerics cannot skip, and so the largest ratio any such model could reach:

- Training: the matmuls (`aten::mm`, also inside `_grouped_mm`) and the fused attention kernels (sdpa flash forward
  and backward) of each model's step, timed by torch.profiler. Computing the same numbers means running the same
  matmuls and attention at the same FLOPs, so peer step / the faster of the two kernel times bounds the ratio. For MoE, our own
  dense model with the same active parameters per token is a second reference: routing only adds work to it.
- Generation (batch 1, greedy, KV cache): the peer's time per token split by forward hooks into `generate()`'s own
  loop (Transformers code every model shares) and the forward, and a hand-written decode step that runs only the
  kernels of one token (no modules, no Transformers code). Even a forward with zero Python overhead inside
  `generate()` could reach at most peer / (loop + kernels).
- Generation with a static cache and the decode step compiled by `generate()` (`bench-speed`'s fast path): each
  token's time split by torch.profiler into what runs outside the compiled call (`generate()`'s loop, the 4-D mask
  it builds for static caches, input preparation, the prompt's eager forward), the compiled call's guard check ("TorchDynamo Cache Lookup"),
  its matmul and attention kernels, and the rest of the compiled graph (fused elementwise kernels, its wrapper).
  Then what two settings that attack those parts buy, against Llama's default `generate()`: inductor's C++ wrapper
  (`cpp_wrapper`, the graph's Python wrapper in C++) and skipping the guard check on calls after the first
  (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`: safe only while every call has the same shapes, as in
  one greedy run with a static cache).

usage: python benchmarks/speed_bounds.py [--shapes nanogpt width256] [--repeats 9] [--threads 2]
       [--parts training generation compiled_split compile_variants]
"""

import argparse
import sys
import time
from statistics import median

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ..modeling_ramanujan import CACHE_NAME
from .speed import (
    NUM_EXPERTS,
    SHAPES,
    VOCAB_SIZE,
    build,
    greedy_generation,
    interleaved_seconds,
    model_configs,
    static_compiled_settings,
    train_step,
)

# Kernels a same-numbers model must run: every matmul (grouped_mm calls aten::mm per group on CPU) and fused attention.
REQUIRED_KERNELS = (
    "aten::mm",
    "aten::bmm",
    "aten::addmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)
COMPILED_REGION, GUARD_CHECK = "Torch-Compiled Region", "TorchDynamo Cache Lookup"


def required_kernel_seconds(step, steps: int = 3) -> float:
    """Seconds per step spent in REQUIRED_KERNELS (profiler self time on the calling thread, which waits for the others)."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    total_us = sum(event.self_cpu_time_total for event in prof.key_averages() if event.key in REQUIRED_KERNELS)
    return total_us / 1e6 / steps


def training_bounds(shape_name: str, num_experts: int, repeats: int) -> dict:
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    configs = model_configs(shape, num_experts)
    batch = torch.randint(0, VOCAB_SIZE, (shape["batch"], shape["context"]))
    steps = {label: train_step(build(config), batch) for label, config in configs.items()}
    if num_experts:  # our dense model with the MoE's active parameters per token (top-2 of half-width experts)
        steps["ours_dense"] = train_step(build(model_configs(shape)["ours"]), batch)
    step_s = {label: median(times) for label, times in interleaved_seconds(steps, repeats).items()}
    kernel_rounds = {label: [] for label in configs}
    for _ in range(3):  # profiled rounds, alternating models like the timed runs
        for label in configs:
            kernel_rounds[label].append(required_kernel_seconds(steps[label]))
    kernel_s = {label: median(rounds) for label, rounds in kernel_rounds.items()}
    peer = next(label for label in configs if label != "ours")
    fastest_kernels = min(kernel_s.values())
    result = {"shape": shape_name, "num_experts": num_experts, "peer": peer, "step_ms": _ms(step_s),
              "required_kernels_ms": _ms(kernel_s), "ratio_now": step_s[peer] / step_s["ours"],
              "ratio_bound_kernels": step_s[peer] / fastest_kernels}
    if num_experts:
        result["ratio_bound_dense_reference"] = step_s[peer] / step_s["ours_dense"]
    return result


def bare_decode_step(model, keys: list[torch.Tensor], values: list[torch.Tensor], position: int):
    """One decode step of a dense `RamanujanForCausalLM` in bare torch calls on its own weights: the kernels of
    a token and nothing else (no modules, no Transformers code). `keys` / `values` are the per-layer cache after
    `position` tokens, (batch, kv_heads, position, head_dim); returns `step(token_ids) -> logits` of the next token.

    Default RoPE only; the cache is read, not grown, so repeated calls time the same step.
    """
    config = model.config
    d, head_dim, eps = config.hidden_size, config.head_dim, config.rms_norm_eps
    inv_freq = model.model.rotary_emb.inv_freq
    angles = torch.full((1,), float(position)).unsqueeze(-1) * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    half = head_dim // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)  # rotate_half(x) · sin == roll(x, half) · signed_sin
    layers = [(layer.input_layernorm.weight, layer.self_attn, layer.post_attention_layernorm.weight, layer.mlp)
              for layer in model.model.layers]

    def rotate(x):
        return x * cos + x.roll(half, -1) * signed_sin

    def heads(x):
        return x.view(x.shape[0], 1, -1, head_dim).transpose(1, 2)

    def step(token_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(token_ids, model.model.embed_tokens.weight)
        for (norm_in, attn, norm_post, mlp), k_cache, v_cache in zip(layers, keys, values):
            h = F.rms_norm(x, (d,), norm_in, eps)
            q = rotate(heads(F.linear(h, attn.q_proj.weight)))
            k = torch.cat((k_cache, rotate(heads(F.linear(h, attn.k_proj.weight)))), 2)
            v = torch.cat((v_cache, heads(F.linear(h, attn.v_proj.weight))), 2)
            attended = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling, enable_gqa=True)
            x = x + F.linear(attended.transpose(1, 2).reshape(x.shape), attn.o_proj.weight)
            h = F.rms_norm(x, (d,), norm_post, eps)
            x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)
        return F.linear(F.rms_norm(x, (d,), model.model.norm.weight, eps), model.lm_head.weight)

    return step


def bare_decode_run(model, cached_tokens: int, new_tokens: int):
    """`run() -> (seconds per token, same)` for `new_tokens` bare decode steps with greedy argmax after `cached_tokens`."""
    with torch.no_grad():
        cache = getattr(model(torch.randint(0, VOCAB_SIZE, (1, cached_tokens)), use_cache=True), CACHE_NAME)
    step = bare_decode_step(model, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                            cached_tokens)
    token = torch.tensor([[5]])

    def run():
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(new_tokens):
                step(token).argmax(-1)
        seconds = (time.perf_counter() - start) / new_tokens
        return seconds, seconds

    return run


def generate_run(model, prompt: torch.Tensor, new_tokens: int):
    """`run() -> (seconds per token of greedy generate(), median seconds of its decode forwards)`, the latter timed by
    forward hooks on the model (its first forward is the prompt's and is left out)."""
    forward_seconds = []
    model.register_forward_pre_hook(lambda module, args: setattr(module, "_started", time.perf_counter()))
    model.register_forward_hook(lambda module, args, output: forward_seconds.append(time.perf_counter() - module._started))

    def run():
        forward_seconds.clear()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
        return (time.perf_counter() - start) / new_tokens, median(forward_seconds[1:])

    return run


def generation_bounds(shape_name: str, repeats: int, prompt_tokens: int = 16, new_tokens: int = 64) -> dict:
    """Ours, Llama and the bare decode step, interleaved run by run; medians of per-token and per-forward seconds."""
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    prompt = torch.randint(0, VOCAB_SIZE, (1, prompt_tokens))
    models = {label: build(config).eval() for label, config in model_configs(shape).items()}
    runs = {label: generate_run(model, prompt, new_tokens) for label, model in models.items()}
    runs["kernels"] = bare_decode_run(models["ours"], prompt_tokens + new_tokens // 2, new_tokens)
    samples = {label: [] for label in runs}
    for repeat in range(repeats + 1):
        for label, run in runs.items():
            result = run()
            if repeat:  # the first round warms up
                samples[label].append(result)
    token = {label: median(t for t, _ in rows) for label, rows in samples.items()}
    forward = {label: median(f for _, f in rows) for label, rows in samples.items()}
    loop = token["llama"] - forward["llama"]
    return {"shape": shape_name, "us_per_token": {label: 1e6 * token[label] for label in models},
            "us_decode_forward": {label: 1e6 * forward[label] for label in models},
            "us_llama_generate_loop": 1e6 * loop, "us_decode_kernels_alone": 1e6 * token["kernels"],
            "ratio_now": token["llama"] / token["ours"],
            "ratio_bound_zero_overhead_forward": token["llama"] / (loop + token["kernels"]),
            "us_forward_needed_for_1.3x": 1e6 * (token["llama"] / 1.3 - loop)}


def compiled_generation_split(shape_name: str, repeats: int, batch_size: int = 1, prompt_tokens: int = 16,
                              new_tokens: int = 64) -> dict:
    """Microseconds per decode step (one new token per sequence of the batch) with a static cache and the compiled
    decode step, ours and Llama: the
    timed total (median of `repeats` interleaved runs), and from one profiled run each the parts named in the module
    docstring. Profiling slows what it records, so the parts are read as shares of the profiled run's time."""
    torch.compiler.reset()  # see compiled_generation in speed.py
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    prompt = torch.randint(0, VOCAB_SIZE, (batch_size, prompt_tokens))
    models = {label: build(config).eval() for label, config in model_configs(shape).items()}
    runs = {label: greedy_generation(model, prompt, new_tokens, **static_compiled_settings())
            for label, model in models.items()}
    timed = interleaved_seconds(runs, repeats)  # its warm-up call compiles
    result = {"shape": shape_name, "batch": batch_size, "us_per_step": {}, "profiled_share": {}}
    for label, run in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            run()
            profiled_s = time.perf_counter() - start
        events = prof.events()
        region = sum(e.cpu_time_total for e in events if e.name.startswith(COMPILED_REGION)) / 1e6
        guard = sum(e.self_cpu_time_total for e in events if e.name == GUARD_CHECK) / 1e6
        kernels = sum(e.self_cpu_time_total for e in events
                      if e.name in REQUIRED_KERNELS and inside_compiled_region(e)) / 1e6  # not the prompt's
        result["us_per_step"][label] = 1e6 * median(timed[label]) / new_tokens
        result["profiled_share"][label] = {"outside the compiled call": (profiled_s - region - guard) / profiled_s,
                                           "guard check": guard / profiled_s,
                                           "matmul + attention kernels": kernels / profiled_s,
                                           "rest of the compiled graph": (region - kernels) / profiled_s}
    return result


def compile_variants(shape_name: str, repeats: int, batch_size: int = 1, prompt_tokens: int = 16,
                     new_tokens: int = 64) -> dict:
    """Microseconds per decode step: Llama's default `generate()` against our static-cache compiled generation with the
    default settings, with `cpp_wrapper`, and each with the guard check skipped; interleaved, medians."""
    torch.compiler.reset()  # see compiled_generation in speed.py
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    prompt = torch.randint(0, VOCAB_SIZE, (batch_size, prompt_tokens))
    configs = model_configs(shape)
    runs = {"llama eager": greedy_generation(build(configs["llama"]).eval(), prompt, new_tokens)}
    for label, options in (("compiled", None), ("compiled, cpp_wrapper", {"cpp_wrapper": True})):
        torch.manual_seed(0)
        model = build(configs["ours"]).eval()  # one model per setting: generate() keeps one compiled call per model
        settings = static_compiled_settings()
        if options:  # torch.compile takes a mode or options, not both
            settings["compile_config"].mode, settings["compile_config"].options = None, options
        runs[label] = greedy_generation(model, prompt, new_tokens, **settings)
        runs[label + ", guards skipped"] = skipping_guards(runs[label])
    seconds = interleaved_seconds(runs, repeats)
    return {"shape": shape_name, "batch": batch_size,
            "us_per_step": {label: 1e6 * median(t) / new_tokens for label, t in seconds.items()}}


def skipping_guards(run):
    def skipping():
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return run()

    return skipping


def inside_compiled_region(event) -> bool:
    while event.cpu_parent is not None:
        event = event.cpu_parent
        if event.name.startswith(COMPILED_REGION):
            return True
    return False


def _ms(seconds: dict) -> dict:
    return {label: round(1e3 * s, 1) for label, s in seconds.items()}


def training_table(args) -> None:
    print("| shape | peer | step ms (ours / peer) | required kernels ms (ours / peer) | ratio now | bound (kernels) | bound (our dense) |")
    print("|---|---|---|---|---|---|---|")
    for shape_name in args.shapes:
        for num_experts in (0, NUM_EXPERTS):
            r = training_bounds(shape_name, num_experts, args.repeats)
            peer = r["peer"]
            dense = f"{r['ratio_bound_dense_reference']:.2f}x" if num_experts else "-"
            print(f"| {shape_name}{' MoE' if num_experts else ''} | {peer} | {r['step_ms']['ours']} / {r['step_ms'][peer]} | "
                  f"{r['required_kernels_ms']['ours']} / {r['required_kernels_ms'][peer]} | {r['ratio_now']:.2f}x | "
                  f"{r['ratio_bound_kernels']:.2f}x | {dense} |", flush=True)


def generation_table(args) -> None:
    print("| shape | µs/token (ours / llama) | decode forward µs (ours / llama) | generate() loop µs | kernels alone µs | "
          "forward needed for 1.3x µs | ratio now | bound (zero-overhead forward) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape_name in args.shapes:
        g = generation_bounds(shape_name, args.repeats)
        print(f"| {shape_name} | {g['us_per_token']['ours']:.0f} / {g['us_per_token']['llama']:.0f} | "
              f"{g['us_decode_forward']['ours']:.0f} / {g['us_decode_forward']['llama']:.0f} | {g['us_llama_generate_loop']:.0f} | "
              f"{g['us_decode_kernels_alone']:.0f} | {g['us_forward_needed_for_1.3x']:.0f} | {g['ratio_now']:.2f}x | "
              f"{g['ratio_bound_zero_overhead_forward']:.2f}x |", flush=True)


def compiled_split_table(args) -> None:
    parts = ("outside the compiled call", "guard check", "matmul + attention kernels", "rest of the compiled graph")
    print("| shape | batch | model | µs per decode step, static cache + compiled | " + " | ".join(parts) + " |")
    print("|---|---|---|---|" + "---|" * len(parts))
    for shape_name in args.shapes:
        for batch_size in (1, 8):
            g = compiled_generation_split(shape_name, args.repeats, batch_size)
            for label, share in g["profiled_share"].items():
                print(f"| {shape_name} | {batch_size} | {label} | {g['us_per_step'][label]:.0f} | "
                      + " | ".join(f"{share[part]:.0%}" for part in parts) + " |", flush=True)


def compile_variants_table(args) -> None:
    print("| shape | batch | µs per decode step (× Llama's default generate()) |")
    print("|---|---|---|")
    for shape_name in args.shapes:
        for batch_size in (1, 8):
            v = compile_variants(shape_name, args.repeats, batch_size)["us_per_step"]
            print(f"| {shape_name} | {batch_size} | " + "; ".join(
                f"{label} {us:.0f} ({v['llama eager'] / us:.2f}x)" for label, us in v.items()) + " |", flush=True)


PARTS = {"training": training_table, "generation": generation_table, "compiled_split": compiled_split_table,
         "compile_variants": compile_variants_table}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed runs (medians reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="which tables to measure")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    for part in args.parts:
        PARTS[part](args)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
