"""`acx-rt train --mixed_precision auto`: the precision a run trains in, chosen so that it is never the slow one.

- Under `accelerate launch`: the launcher's `--mixed_precision`, as in any Accelerate script.
- Where bf16 matmuls are not native (CPUs without AVX512-BF16 or AMX) bf16 autocast is emulated and several times
  slower than fp32 (913 against 107 ms per step at the quality anchor's shape, docs/benchmarks.md): fp32.
- On a CUDA GPU with bf16: bf16 autocast (Transformers' and Accelerate's usual choice; not measured here, no GPU).
- On a CPU with native bf16 neither precision is always the faster: bf16 autocast made our training step 2.1×
  (dense) and 1.3× (MoE) faster at width 256, and slower at the quality anchor's width 128 and context 64 (dense
  0.96×, MoE 0.61×), where the bf16 attention-backward kernels and the small matmuls gain nothing
  (docs/benchmarks.md, "Training precision"); an MoE model's bf16 step is also slowed by its expert matmuls, whose
  shapes change with the routing every step (`probe_seconds`). So a short probe times this model's forward and
  backward on the run's micro-batch in both precisions, interleaved, and bf16 is chosen only when it is at least
  `BF16_MUST_SAVE` faster (its loss at the quality anchor is 0.002–0.003 nats above fp32's). The answer is cached
  per CPU, torch version, thread count, model shape and micro-batch, so the same command on the same machine
  trains in the same precision every time and probes once.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
from accelerate.utils import parse_flag_from_env

from ..configuration_ramanujan import RamanujanConfig
from ..files import read_json_object, write_json_atomically
from ..modeling_ramanujan import RamanujanForCausalLM
from .recipe import bf16_is_native

BF16_MUST_SAVE = 0.10  # bf16 is taken when its step is at least 10 % shorter than fp32's
PROBE_STEPS = 3  # timed forward + backward passes per precision, after one warm-up each
CACHE_FILE = "precision-probe.json"
PROBE_VERSION = 2  # in the cache key: 2 draws new tokens every pass (probe_seconds); 1's cached timings are not reused
# The config fields that set the work of a training step.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "num_shared_experts", "first_k_dense_layers", "tie_word_embeddings")


@dataclass
class Precision:
    """Accelerate's `mixed_precision` value for the run, and why (printed at the start of the run)."""

    value: str
    reason: str


def choose_precision(choice: str, config: RamanujanConfig, micro_batch: tuple[int, int]) -> Precision:
    """--mixed_precision as Accelerate takes it (see the module docstring). `micro_batch` is (blocks, tokens per
    block) of one forward pass. Decided before the Accelerator exists, which fixes its precision when it is built."""
    if choice != "auto":
        return Precision(choice, "--mixed_precision")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher:
        return Precision(launcher.lower(), "ACCELERATE_MIXED_PRECISION, which `accelerate launch` sets")
    on_cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    device = torch.device("cuda" if on_cuda else "cpu")
    if not bf16_is_native(device):
        return Precision("no", f"bf16 matmuls are not native on this {device.type.upper()}")
    if on_cuda:
        return Precision("bf16", "bf16 is native on this GPU")
    probe, cached = cached_probe(config, micro_batch)
    faster = probe["bf16"] <= (1 - BF16_MUST_SAVE) * probe["no"]
    timings = f"fp32 {probe['no'] * 1e3:.1f} ms, bf16 autocast {probe['bf16'] * 1e3:.1f} ms"
    return Precision("bf16" if faster else "no", f"a forward and backward of this model on this CPU took {timings}"
                     f" ({'cached' if cached else 'probed now'}; bf16 is taken when {BF16_MUST_SAVE:.0%} faster)")


def cached_probe(config: RamanujanConfig, micro_batch: tuple[int, int]) -> tuple[dict[str, float], bool]:
    """`probe_seconds` for this machine and shape, from the cache when it holds them (then True)."""
    path = cache_dir() / CACHE_FILE
    key = probe_key(config, micro_batch)
    try:
        cache = read_json_object(path) if path.is_file() else {}
    except ValueError:  # a damaged cache is probed again and rewritten, not trusted
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and all(isinstance(entry.get(name), (int, float)) for name in ("no", "bf16")):
        return entry, True
    cache[key] = probe_seconds(config, micro_batch)
    try:
        write_json_atomically(path, cache)
    except OSError:  # a read-only home still trains; it probes again next time
        pass
    return cache[key], False


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "acx-ramanujan"


def probe_key(config: RamanujanConfig, micro_batch: tuple[int, int]) -> str:
    """What the timings depend on: the CPU (model name, bf16 and AMX support), torch, threads, shape, micro-batch."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown CPU")
    facts = {"probe": PROBE_VERSION, "cpu": cpu, "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
             "amx": torch.cpu._is_amx_tile_supported(), "torch": torch.__version__, "threads": torch.get_num_threads(),
             "shape": {name: getattr(config, name, None) for name in SHAPE_FIELDS},
             "attention": config._attn_implementation or "sdpa", "micro_batch": list(micro_batch)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def probe_seconds(config: RamanujanConfig, micro_batch: tuple[int, int], steps: int = PROBE_STEPS) -> dict[str, float]:
    """Median seconds of one forward + backward (LM loss) of a fresh model of `config` on random tokens, in fp32
    ("no") and under bf16 autocast ("bf16"), interleaved so that other load on the machine hits both alike.

    Every pass gets new tokens (both precisions the same ones), as training does: an MoE layer's per-expert matmuls
    then change shape each step, as they do in training, and a bf16 matmul of a new shape first builds its oneDNN
    kernel (about 0.65 ms at the quality anchor's expert size, fp32's MKL path builds none). A probe that repeated
    one batch timed only cached kernels and took bf16 for `tiny-moe` on one thread, whose bf16 training step is 1.40×
    slower (docs/benchmarks.md, "Time to target"). The global RNG is left as it was, so the run's own initialization and
    data order do not depend on the probe."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RamanujanForCausalLM(config).train()

        def step(precision: str, tokens: torch.Tensor) -> float:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        seconds = {"no": [], "bf16": []}
        for round_ in range(steps + 1):  # round 0 warms up: first calls allocate and pick kernels
            tokens = torch.randint(0, config.vocab_size, micro_batch)
            for precision, samples in seconds.items():
                elapsed = step(precision, tokens)
                if round_:
                    samples.append(elapsed)
    return {precision: median(samples) for precision, samples in seconds.items()}
