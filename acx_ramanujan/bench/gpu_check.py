"""`python -m acx_ramanujan.bench.gpu_check`: the checks to run the first time a CUDA GPU is at hand.

Nothing in this package had run on a GPU when this was written, and a GPU is only sometimes lent, so one prepared
run answers the questions a CPU cannot: (1) attention backends — flash-attn 2 (when installed), sdpa and eager give
the same logits and gradients for dense and MoE models on a left-padded batch; (2) bf16 autocast training steps
track fp32; (3) greedy generation with a static cache and a compiled forward gives the eager dynamic-cache tokens,
and how fast; (4) one FSDP2 training step (`fully_shard` per decoder layer, then the root) equals the plain step;
(5) training tokens/s and model FLOP utilization (MFU) against Transformers' Llama with the same shapes, against the
GPU's measured bf16 matmul peak; (6) continuous batching (`generate_batch`, also with CUDA graphs forced on) gives
`generate()`'s greedy tokens, dense and MoE; (7) which Hub kernels `from_pretrained` applied to our layers and to
Llama's, and how far the logits moved from the plain torch forward. `--device cpu --quick` runs every part that a
CPU can (the test suite does), so a typo cannot waste the first GPU session. Results print as one JSON object (and
go to `--output` if given).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from statistics import median

import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig, LlamaForCausalLM

from ..files import write_json_atomically
from ..configuration_ramanujan import RamanujanConfig
from ..export.llama import target_config  # the Llama config of the same shapes
from ..modeling_ramanujan import RamanujanForCausalLM
from .speed import counted_flops, static_compiled_settings


def tiny_config(moe: bool, attn_implementation: str = "eager", **overrides) -> RamanujanConfig:
    moe_fields = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, num_shared_experts=1) if moe else {}
    fields = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                  num_hidden_layers=2, **moe_fields)
    return RamanujanConfig(**{**fields, **overrides}, attn_implementation=attn_implementation)


def left_padded_batch(config: RamanujanConfig, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 48), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    ids[1, :11] = config.pad_token_id
    return ids.to(device), mask.to(device)


def flash_attention_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def attention_backends(device: str, dtype: torch.dtype) -> dict:
    """Max |Δ| of logits (real tokens only) and of gradients, each backend against eager, dense and MoE."""
    implementations = ["sdpa"] + (["flash_attention_2"] if flash_attention_available() else [])
    results = {"flash_attn_installed": flash_attention_available(), "dtype": str(dtype)}
    for kind in ("dense", "moe"):
        torch.manual_seed(0)
        reference = RamanujanForCausalLM(tiny_config(kind == "moe")).to(device, dtype)
        ids, mask = left_padded_batch(reference.config, device)
        # Only real tokens predicted from a real token count: a padding position's output (a fully masked query
        # row) is left to each backend, as in Llama, and must not reach the loss.
        follows_padding = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1) == 0
        labels = ids.masked_fill((mask == 0) | follows_padding, -100)
        expected = run_with_grads(reference, ids, mask, labels)
        for implementation in implementations:
            model = RamanujanForCausalLM(tiny_config(kind == "moe", implementation)).to(device, dtype)
            model.load_state_dict(reference.state_dict())
            logits, grads = run_with_grads(model, ids, mask, labels)
            real = mask.bool()
            results[f"{kind}/{implementation}"] = {
                "max_abs_logit_diff": (logits[real] - expected[0][real]).abs().max().item(),
                "max_rel_grad_diff": max(((grads[name] - expected[1][name]).norm() / expected[1][name].norm().clamp_min(1e-12)).item()
                                         for name in grads),
            }
    return results


def run_with_grads(model, ids, mask, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = model(input_ids=ids, attention_mask=mask, labels=labels)
    output.loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.logits.float().detach(), grads


def bf16_training(device: str, steps: int) -> dict:
    """The same model and data trained in fp32 and under bf16 autocast: losses at the end, step by step gap."""
    losses = {}
    for label, autocast in (("fp32", False), ("bf16_autocast", True)):
        torch.manual_seed(0)
        model = RamanujanForCausalLM(tiny_config(moe=False, attn_implementation="sdpa")).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        text = torch.tensor(list(b"To be, or not to be, that is the question. " * 8), device=device)[None, :256]
        losses[label] = []
        for _ in range(steps):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=text, labels=text).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[label].append(loss.item())
    gap = max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16_autocast"]))
    return {"steps": steps, "final_loss": {label: values[-1] for label, values in losses.items()}, "max_loss_gap": gap,
            "all_finite": all(torch.isfinite(torch.tensor(values)).all() for values in losses.values())}


def timed(run, repeats: int, device: str) -> float:
    """Median seconds of `run` after one warm-up, with the device synchronized around each call."""
    run()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return median(seconds)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def static_compiled_generation(device: str, new_tokens: int, repeats: int, kinds=("dense", "moe", "llama")) -> dict:
    """Greedy tokens and tokens/s: dynamic cache (eager) against a static cache with the forward compiled by
    `generate()` itself (its own auto-compile path, `CompileConfig(fullgraph=True)`), ours dense/MoE and Llama."""
    results = {}
    for kind in kinds:
        try:
            results[kind] = generation_run(kind, device, new_tokens, repeats)
        except Exception as error:  # one model's failure must not hide the others' results
            results[kind] = {"error": first_line(error)}
    return results


def generation_run(kind: str, device: str, new_tokens: int, repeats: int) -> dict:
    """One model's greedy tokens and tokens/s, both ways."""
    torch.manual_seed(0)
    config = tiny_config(kind == "moe", "sdpa")
    model = (LlamaForCausalLM(target_config(config)) if kind == "llama"
             else RamanujanForCausalLM(config)).to(device).eval()
    prompt = torch.tensor([list(b"To be, or not to be")], device=device)
    settings = {"dynamic_eager": {}, "static_compiled": static_compiled_settings()}
    tokens, speed = {}, {}
    for label, extra in settings.items():
        def run(label=label, extra=extra):
            with torch.no_grad():
                tokens[label] = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                               do_sample=False, **extra)
        speed[label] = new_tokens / timed(run, repeats, device)
    return {"tokens_equal": torch.equal(tokens["dynamic_eager"], tokens["static_compiled"]), "tokens_per_s": speed}


def fsdp_step(device: str) -> dict:
    """One FSDP2 training step in a one-process group against the same step without FSDP: equal loss and weights."""
    from torch.distributed.fsdp import fully_shard

    # A one-process group needs no network rendezvous: an in-process store cannot collide with another job's port
    # (a fixed MASTER_PORT failed with EADDRINUSE when two test runs shared a machine).
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", store=torch.distributed.HashStore(),
                                         rank=0, world_size=1)
    try:
        results = {}
        for kind in ("dense", "moe"):
            torch.manual_seed(0)
            plain = RamanujanForCausalLM(tiny_config(kind == "moe", "sdpa")).to(device)
            sharded = RamanujanForCausalLM(plain.config).to(device)
            sharded.load_state_dict(plain.state_dict())
            for layer in sharded.model.layers:
                fully_shard(layer)
            fully_shard(sharded)
            ids = torch.tensor([list(b"To be, or not to be, that is the question.")], device=device)
            losses = {}
            for label, model in (("plain", plain), ("fsdp", sharded)):
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                losses[label] = loss.item()
            after = {name: p.full_tensor() if hasattr(p, "full_tensor") else p for name, p in sharded.named_parameters()}
            weight_diff = max((after[name] - p).abs().max().item() for name, p in plain.named_parameters())
            results[kind] = {"loss": losses, "max_weight_diff_after_step": weight_diff,
                             "parameters_are_dtensors": all(hasattr(p, "full_tensor") for p in sharded.parameters())}
        return results
    finally:
        torch.distributed.destroy_process_group()


def matmul_peak(device: str, dtype: torch.dtype, size: int) -> float:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / timed(lambda: torch.mm(a, b), 10, device)


def training_throughput(device: str, width: int, layers: int, context: int, batch: int, repeats: int) -> dict:
    """Tokens/s and MFU of a bf16-autocast training step (sdpa), ours against Llama with identical shapes.

    MFU = counted FLOPs per step (torch.utils.flop_counter: matmuls and attention) / step time / measured bf16
    matmul peak of this device (not the datasheet's).
    """
    config = RamanujanConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                             intermediate_size=8 * width // 3 // 64 * 64 or 64, max_position_embeddings=context,
                             attn_implementation="sdpa")
    models = {"ours": RamanujanForCausalLM(config), "llama": LlamaForCausalLM(target_config(config))}
    tokens = torch.randint(0, 256, (batch, context), device=device)
    peak = matmul_peak(device, torch.bfloat16, 8192 if device == "cuda" else 512)
    results = {"shape": dict(width=width, layers=layers, context=context, batch=batch), "bf16_matmul_peak_tflops": peak / 1e12}
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

        def step(model=model, optimizer=optimizer):
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        flops = counted_flops(step)
        seconds = timed(step, repeats, device)
        results[name] = {"step_ms": 1e3 * seconds, "tokens_per_s": batch * context / seconds,
                         "mfu_vs_measured_peak": flops / seconds / peak}
        model.to("cpu")
    results["ours_over_llama_tokens_per_s"] = results["ours"]["tokens_per_s"] / results["llama"]["tokens_per_s"]
    return results


def continuous_batching(device: str, new_tokens: int) -> dict:
    """Greedy `generate_batch` (paged attention, the prompts batched together) against `generate()` per prompt, dense
    and MoE, with Transformers' default settings (CUDA graphs off with sdpa) and with CUDA graphs forced on (what
    flash attention in half precision turns on by itself); on CPU the second is the first (no graph backend)."""
    prompts = [list(b"To be, or not to be"), list(b"that is"), list(b"the question: whether 'tis nobler")]
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    results = {}
    for kind in ("dense", "moe"):
        torch.manual_seed(0)
        model = RamanujanForCausalLM(tiny_config(kind == "moe", "sdpa")).to(device).eval()
        expected = []
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False)
            expected.append(out[0, len(prompt):].tolist())
        for label, graphs in (("default", None), ("cuda_graphs", True)):
            batching = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=128, use_cuda_graph=graphs)
            try:
                outputs = model.generate_batch(inputs=prompts, generation_config=generation,
                                               continuous_batching_config=batching)
                by_prompt = {tuple(output.prompt_ids): output.generated_tokens for output in outputs.values()}
                results[f"{kind}/{label}"] = {"tokens_equal": [by_prompt[tuple(p)] for p in prompts] == expected}
            except Exception as error:  # the error is the finding (issue 25: AttributeError on the first forward)
                results[f"{kind}/{label}"] = {"error": first_line(error)}
    return results


def kernelized_layers(model: torch.nn.Module) -> dict[str, str]:
    """{module class: Hub kernel layer} of each module (or an attention module's rotary function) whose forward Hub
    kernelization replaced: what `kernels` records as the module's `_kernel_repo`."""
    found = {}
    for module in model.modules():
        for owner in (module, *module.__dict__.get("_kernel_funcs", {}).values()):
            repo = owner.__dict__.get("_kernel_repo")
            if repo is not None:
                found[type(owner).__name__ if owner is module else "rotary function"] = repo.layer_name
    return found


def hub_kernels(device: str) -> dict:
    """Ours (dense, MoE) and Llama loaded with `from_pretrained` as a user would (Hub kernels on by default from
    5.25): the kernels applied, and the max |Δ| of the logits against the same checkpoint with `use_kernels=False`."""
    results = {"USE_HUB_KERNELS": os.environ.get("USE_HUB_KERNELS")}
    torch.manual_seed(0)
    dense = tiny_config(moe=False, attn_implementation="sdpa")
    models = {"ours": RamanujanForCausalLM(dense), "ours_moe": RamanujanForCausalLM(tiny_config(moe=True)),
              "llama": LlamaForCausalLM(target_config(dense))}
    ids = torch.tensor([list(b"To be, or not to be")], device=device)
    for name, model in models.items():
        path = tempfile.mkdtemp(prefix=f"gpu_check_{name}_")
        try:
            model.save_pretrained(path)
            kernelized = AutoModelForCausalLM.from_pretrained(path, device_map=device).eval()
            plain = AutoModelForCausalLM.from_pretrained(path, device_map=device, use_kernels=False).eval()
            with torch.no_grad():
                diff = (kernelized(ids).logits - plain(ids).logits).abs().max().item()
            results[name] = {"use_kernels": kernelized.use_kernels, "applied": kernelized_layers(kernelized),
                             "max_abs_logit_diff_vs_torch": diff}
        except Exception as error:  # e.g. the Hub unreachable: that is the finding
            results[name] = {"error": first_line(error)}
        finally:
            shutil.rmtree(path, ignore_errors=True)
    if "applied" in results["ours"] and "applied" in results["llama"]:
        results["same_kernels_as_llama"] = (sorted(results["ours"]["applied"].values())
                                            == sorted(results["llama"]["applied"].values()))
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m acx_ramanujan.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (what the CPU test runs)")
    parser.add_argument("--output", help="also write the results JSON here")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu for the CPU parts)", file=sys.stderr)
        return 2
    quick = args.quick
    results = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    import transformers

    results["transformers"] = transformers.__version__
    parts = {
        "attention_fp32": lambda: attention_backends(args.device, torch.float32),
        "attention_bf16": lambda: attention_backends(args.device, torch.bfloat16),
        "bf16_training": lambda: bf16_training(args.device, 5 if quick else 50),
        "static_compiled_generation": lambda: static_compiled_generation(args.device, 8 if quick else 64, 1 if quick else 5),
        "fsdp_step": lambda: fsdp_step(args.device),
        "training_throughput": lambda: training_throughput(
            args.device, *((64, 2, 32, 2, 1) if quick else (1024, 12, 1024, 8, 10))),
        "continuous_batching": lambda: continuous_batching(args.device, 4 if quick else 16),
        "hub_kernels": lambda: hub_kernels(args.device),
    }
    for name, part in parts.items():
        start = time.perf_counter()
        try:
            results[name] = part()
        except Exception as error:  # a failed part is a result too; the rest still runs
            results[name] = {"error": first_line(error)}
        results[name + "_seconds"] = round(time.perf_counter() - start, 1)
        print(f"gpu_check: {name} done in {results[name + '_seconds']} s", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))
    if args.output:
        write_json_atomically(args.output, results)
    return 1 if '"error"' in json.dumps(results) else 0


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
