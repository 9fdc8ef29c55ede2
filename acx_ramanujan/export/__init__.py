"""`acx-rt export`: a Ramanujan checkpoint in a format other software runs, checked against the model before anything
is written (a failed check writes nothing).

- `--format onnx` (`export_onnx`): one ONNX graph, verified in ONNX Runtime.
- `--format llama` (`export_llama`): a standard LlamaForCausalLM (dense) or MixtralForCausalLM / ERNIE 4.5 MoE (MoE)
  checkpoint, Qwen3 / Qwen3-MoE with `qk_norm`, loadable without this package, verified by loading it back with
  Transformers' own class.
- `--format gguf` (`export_gguf`): one GGUF file for llama.cpp, verified in llama.cpp when llama-cpp-python is
  installed.

The format modules are imported when their format is asked for: each needs only its own optional packages.
"""

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..commands import OPTIONAL_PACKAGES, WorkFailed, run_command
from ..configuration_ramanujan import RamanujanConfig
from ..modeling_ramanujan import RamanujanForCausalLM
from ..files import check_saved_weights, first_line, read_json_object

# format: (module that writes and verifies it, packages of the [export] extra it imports)
FORMATS = {
    "onnx": ("acx_ramanujan.export.onnx", ("onnx", "onnxruntime", "onnxscript")),
    "llama": ("acx_ramanujan.export.llama", ()),
    "gguf": ("acx_ramanujan.export.gguf", ("gguf",)),
}
# The dynamo exporter writes opsets from torchlib's 18 up to torch.onnx's ONNX_MAX_OPSET (23 in torch 2.13).
OPSET_RANGE = range(18, 24)
OUTTYPES = ("f32", "f16", "q8_0")


class ExportError(WorkFailed):
    """The exported file does not compute what the model computes (exit status 1; nothing is written)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acx-rt export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="directory written by save_pretrained (a Ramanujan model)")
    parser.add_argument("--format", default="onnx", help=f"export format ({', '.join(FORMATS)})")
    parser.add_argument("--output_dir", required=True, help="where the graph, config and tokenizer go")
    parser.add_argument(
        "--opset", type=int, default=None,
        help=f"ONNX opset, {OPSET_RANGE.start}-{OPSET_RANGE.stop - 1} (default: torch.onnx's, 20 in torch 2.13)",
    )
    parser.add_argument("--with_past", action="store_true", help="onnx: add KV-cache inputs and outputs for step-by-step decoding")
    parser.add_argument("--outtype", default=None, help=f"gguf: weight type, one of {', '.join(OUTTYPES)} (default: f16)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every input problem, named, before the model is loaded."""
    if args.format not in FORMATS:
        raise ValueError(f"unknown --format {args.format!r} (supported: {', '.join(FORMATS)})")
    onnx_only = [flag for flag, given in (("--opset", args.opset is not None), ("--with_past", args.with_past)) if given]
    if onnx_only and args.format != "onnx":
        raise ValueError(f"--format {args.format} does not take {', '.join(onnx_only)} (only --format onnx does)")
    if args.outtype is not None and args.format != "gguf":
        raise ValueError(f"--format {args.format} does not take --outtype (only --format gguf does)")
    if args.outtype is not None and args.outtype not in OUTTYPES:
        raise ValueError(f"unknown --outtype {args.outtype!r} (supported: {', '.join(OUTTYPES)})")
    if args.opset is not None and args.opset not in OPSET_RANGE:
        raise ValueError(f"--opset {args.opset} is outside {OPSET_RANGE.start}-{OPSET_RANGE.stop - 1}, the opsets the exporter writes")
    missing = [name for name in FORMATS[args.format][1] if importlib.util.find_spec(name) is None]
    if missing:
        extra = OPTIONAL_PACKAGES[missing[0]]
        raise ValueError(f"{', '.join(missing)} not installed: pip install 'acx-ramanujan-transformer[{extra}]'")
    checkpoint, output_dir = Path(args.checkpoint), Path(args.output_dir)
    config_file = checkpoint / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--checkpoint {checkpoint} has no config.json: not a directory written by save_pretrained")
    try:
        config_values = read_json_object(config_file)
    except ValueError as error:
        raise ValueError(f"--checkpoint {checkpoint}: {error}") from None
    model_type = config_values.get("model_type")
    if model_type != RamanujanConfig.model_type:
        raise ValueError(f"--checkpoint {checkpoint} holds a {model_type!r} model, not a Ramanujan one (model_type 'ramanujan')")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} exists and is not a directory")


def load_model(checkpoint: Path) -> RamanujanForCausalLM:
    """float32, with the attention and experts implementations the exporter lowers to plain ONNX ops."""
    try:
        check_saved_weights(checkpoint)  # damaged or non-finite weights: one line, nothing exported
        model = RamanujanForCausalLM.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="sdpa", experts_implementation="grouped_mm"
        )
    except (OSError, ValueError, RuntimeError) as error:  # no weights; bad config values; weights of another shape
        raise ValueError(f"cannot load --checkpoint {checkpoint}: {first_line(error)}") from error
    return model.eval()


def random_batch(config: RamanujanConfig, batch: int, length: int, generator: torch.Generator):
    """Random ids, the first row left-padded by a third of its length, so the mask path is exercised."""
    input_ids = torch.randint(config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, : length // 3] = 0
    if config.pad_token_id is not None:
        input_ids[attention_mask == 0] = config.pad_token_id
    return input_ids, attention_mask


def publish(staging: Path, output_dir: Path) -> None:
    """Move each finished file over its old version (a moved file replaces the old one in one step)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in staging.iterdir():
        os.replace(path, output_dir / path.name)


def main(argv: list[str]) -> int:
    return run_command("acx-rt export", lambda: checked_model(parse_args(argv)), write_and_verify)


def checked_model(args: argparse.Namespace):
    """Bad input, named before the export: the flags, then the checkpoint (loaded here)."""
    check_args(args)
    return args, load_model(Path(args.checkpoint))


def write_and_verify(checked) -> None:
    """Write the format into a staging folder beside --output_dir, verify it, then move it into place."""
    args, model = checked
    output_dir = Path(args.output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}-") as staging:
        format_module = importlib.import_module(FORMATS[args.format][0])
        written, lines = format_module.export(model, Path(args.checkpoint), args, Path(staging))
        publish(Path(staging), output_dir)
    print(f"wrote {', '.join(written)} to {output_dir}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
