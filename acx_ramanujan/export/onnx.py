"""`acx-rt export --format onnx`: a Ramanujan checkpoint → ONNX, checked in ONNX Runtime against PyTorch.

The graph is traced by Transformers' own exporter (`transformers.exporters.OnnxExporter`: `torch.export`, then the
dynamo path of `torch.onnx.export`, with its fixes for Transformers models). The TorchScript exporter
(`dynamo=False`) fails on this model with torch 2.13: it has no ONNX symbolic for `aten::rms_norm` (`F.rms_norm`).
The model is loaded with `attn_implementation="sdpa"` (lowered to MatMul/Softmax, with the causal and padding mask
built in the graph) and `experts_implementation="grouped_mm"`, which Transformers' exporter lowers to one MatMul per
expert over the tokens routed to it: routing (Softmax → TopK → sort by expert) stays in the graph and stays dropless.

One graph, `model.onnx` (weights in `model.onnx.data`), with dynamic batch and sequence axes:

- default: `input_ids`, `attention_mask` → `logits`.
- `--with_past`: also `position_ids` and, per layer i, `input.cache.layers.{i}.keys` / `.values`
  (batch, kv_heads, past_length, head_dim) → `logits` and `output.cache.layers.{i}.keys` / `.values`,
  the cache grown by the new tokens. A past of length 0 makes it the prefill, so one graph serves every step.
  The names are the `DynamicCache`'s pytree paths under the installed release's name for the cache argument
  (`modeling_ramanujan.CACHE_NAME`: `cache` from Transformers 5.24, `past_key_values` before), which the model's
  output carries too, so the exporter pairs them as `input.` / `output.` and
  `transformers.exporters.ExportedModel.from_pretrained` reads the graph.
"""

import shutil
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.exporters import OnnxConfig, OnnxExporter

from ..configuration_ramanujan import RamanujanConfig
from . import ExportError, random_batch
from ..modeling_ramanujan import CACHE_NAME, RamanujanForCausalLM

ONNX_FILE = "model.onnx"
# Written beside the graph when the checkpoint has them: the tokenizer (whatever kind saved it) and generation defaults.
COMPANION_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "chat_template*",
    "tokenization_*.py",
    "generation_config.json",
)
MAX_ABS_DIFF = 1e-3
VERIFY_LENGTHS = (5, 17)
VERIFY_BATCH = 3
GENERATE_PROMPT_LENGTH = 6
GENERATE_TOKENS = 5


def export(model: RamanujanForCausalLM, checkpoint: Path, args, directory: Path) -> tuple[list[str], list[str]]:
    """Write the graph and its companions into `directory` and verify it: (written files, report lines)."""
    export_onnx(model, args.with_past, args.opset, directory)
    companions = copy_companions(checkpoint, directory)
    return [ONNX_FILE, "config.json", *companions], verify(directory, model, args.with_past)


def trace_inputs(config: RamanujanConfig, with_past: bool, generator: torch.Generator) -> dict:
    """Example inputs for tracing. Batch, new and past lengths differ (2, 3, 5), so no axis is taken for another."""
    batch, new_tokens, past_length = 2, 3, 5
    if not with_past:
        input_ids = torch.randint(config.vocab_size, (batch, new_tokens + past_length), generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "use_cache": False}
    cache = DynamicCache(config=config)
    kv_shape = (batch, config.num_key_value_heads, past_length, config.head_dim)
    for layer_idx in range(config.num_hidden_layers):
        cache.update(torch.randn(kv_shape, generator=generator), torch.randn(kv_shape, generator=generator), layer_idx)
    return {
        "input_ids": torch.randint(config.vocab_size, (batch, new_tokens), generator=generator),
        "attention_mask": torch.ones(batch, past_length + new_tokens, dtype=torch.long),
        "position_ids": torch.arange(past_length, past_length + new_tokens).expand(batch, -1),
        CACHE_NAME: cache,  # the same name as the output's cache field: the exporter pairs input and output by name
        "use_cache": True,
    }


def export_onnx(model: RamanujanForCausalLM, with_past: bool, opset: int | None, directory: Path) -> None:
    """Trace with every input axis dynamic and write `model.onnx`, its weights, the manifest and config.json."""
    sample = trace_inputs(model.config, with_past, torch.Generator().manual_seed(0))
    exported = OnnxExporter().export(model, sample, OnnxConfig(dynamic=True, opset_version=opset))
    exported.save_pretrained(directory)


def copy_companions(checkpoint: Path, directory: Path) -> list[str]:
    names = sorted({path.name for pattern in COMPANION_PATTERNS for path in checkpoint.glob(pattern) if path.is_file()})
    for name in names:
        shutil.copy2(checkpoint / name, directory / name)
    return names


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token = attended tokens before it, 0 on padding: what `generate()` feeds the model."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def onnx_forward(session, config: RamanujanConfig, input_ids, attention_mask, past: dict | None = None):
    """One run of the exported graph. With a cache, `attention_mask` covers past and new tokens; no `past` = empty.

    Returns the logits and, for a `--with_past` graph, the grown cache keyed by the input names it feeds next.
    """
    feed = {"input_ids": input_ids, "attention_mask": attention_mask}
    input_names = [spec.name for spec in session.get_inputs()]
    if "position_ids" in input_names:
        feed["position_ids"] = generation_positions(attention_mask)[:, -input_ids.shape[1] :]
        empty = torch.zeros(input_ids.shape[0], config.num_key_value_heads, 0, config.head_dim)
        feed.update(past or {name: empty for name in input_names if name.startswith(f"input.{CACHE_NAME}.")})
    outputs = session.run(None, {name: tensor.numpy() for name, tensor in feed.items()})
    named = {spec.name: torch.from_numpy(value) for spec, value in zip(session.get_outputs(), outputs)}
    logits = named.pop("logits")
    return logits, {name.replace("output.", "input.", 1): tensor for name, tensor in named.items()}


def max_logit_differences(session, model: RamanujanForCausalLM, with_past: bool) -> dict[int, float]:
    """Max |ONNX − PyTorch| logit over the attended positions at each of VERIFY_LENGTHS. A `--with_past` graph
    prefills the first half and continues from its own cache with the second, so both an empty and a filled cache
    are compared."""
    config, generator = model.config, torch.Generator().manual_seed(1)
    differences = {}
    for length in VERIFY_LENGTHS:
        input_ids, attention_mask = random_batch(config, VERIFY_BATCH, length, generator)
        position_ids = generation_positions(attention_mask) if with_past else None
        with torch.no_grad():
            expected = model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).logits
        if with_past:
            split = length // 2
            first, past = onnx_forward(session, config, input_ids[:, :split], attention_mask[:, :split])
            rest, _ = onnx_forward(session, config, input_ids[:, split:], attention_mask, past)
            actual = torch.cat([first, rest], dim=1)
        else:
            actual, _ = onnx_forward(session, config, input_ids, attention_mask)
        attended = attention_mask.bool()  # a padded position's logits mean nothing and differ between backends
        differences[length] = (actual - expected)[attended].abs().max().item()
    return differences


def until_eos(row: list[int], eos_ids: set[int]) -> list[int]:
    """A generated row up to and including its first eos: `generate()` pads after it, a fixed-length loop doesn't."""
    for index, token in enumerate(row):
        if token in eos_ids:
            return row[: index + 1]
    return row


def greedy_tokens(session, model: RamanujanForCausalLM) -> tuple[list[list[int]], list[list[int]]]:
    """GENERATE_TOKENS greedy tokens for a left-padded batch of two prompts: (PyTorch `generate()`, ONNX Runtime)."""
    config = model.config
    input_ids, attention_mask = random_batch(config, 2, GENERATE_PROMPT_LENGTH, torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=GENERATE_TOKENS, do_sample=False
        )[:, GENERATE_PROMPT_LENGTH:]

    generated = []
    logits, past = onnx_forward(session, config, input_ids, attention_mask)
    while True:
        next_tokens = logits[:, -1].argmax(-1, keepdim=True)
        generated.append(next_tokens)
        if len(generated) == GENERATE_TOKENS:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=1)
        logits, past = onnx_forward(session, config, next_tokens, attention_mask, past)
    actual = torch.cat(generated, dim=1)

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return [until_eos(row, eos_ids) for row in expected.tolist()], [until_eos(row, eos_ids) for row in actual.tolist()]


def verify(directory: Path, model: RamanujanForCausalLM, with_past: bool) -> list[str]:
    """Open the written graph in ONNX Runtime and compare it with the model; a mismatch raises ExportError."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(directory / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    differences = max_logit_differences(session, model, with_past)
    report = ", ".join(f"length {length}: {diff:.1e}" for length, diff in differences.items())
    lines = [f"onnxruntime vs PyTorch, max |logit difference| (batch {VERIFY_BATCH}): {report} (limit {MAX_ABS_DIFF:g})"]
    worst = max(differences.values())
    if not worst <= MAX_ABS_DIFF:
        raise ExportError(f"onnxruntime logits differ from PyTorch by {worst:.2e} (> {MAX_ABS_DIFF:g}): {report}")
    if with_past:
        expected, actual = greedy_tokens(session, model)
        if actual != expected:
            raise ExportError(f"greedy generation through onnxruntime gave {actual}, generate() gave {expected}")
        lines.append(f"greedy generation with the KV cache, 2 prompts x {GENERATE_TOKENS} tokens: same as generate() {actual}")
    return lines


