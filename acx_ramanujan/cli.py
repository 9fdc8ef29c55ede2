"""`acx-rt`: parses the subcommand and hands the rest of the command line to the module that owns it."""

import importlib
import sys

from .commands import OPTIONAL_PACKAGES, missing_extra_line

# subcommand: (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS = {
    "train": ("acx_ramanujan.training.pretrain", "pretrain a model with Accelerate (default: the tiny preset on Python's help text)"),
    "finetune": ("acx_ramanujan.training.causal_lm", "fine-tune a saved model with the Transformers Trainer"),
    "tokenizer": ("acx_ramanujan.training.bpe", "train a byte-level BPE tokenizer (`acx-rt tokenizer train ...`)"),
    "push": ("acx_ramanujan.hub", "push an output directory to the Hugging Face Hub"),
    "verify": ("acx_ramanujan.study.verify", "measure activations and gradients per layer at initialization"),
    "compare-init": ("acx_ramanujan.study.compare_init", "train layers x schemes x seeds and compare validation loss"),
    "grid-report": ("acx_ramanujan.study.grid_report", "one table over every finished compare-init run in a folder: each "
                    "variant's best rate per depth"),
    "visualize": ("acx_ramanujan.study.visualize", "plot variance, gradients, attention and expert load of a checkpoint"),
    "bench-speed": ("acx_ramanujan.bench.speed", "time training and generation against Transformers' Llama and Qwen3-MoE"),
    "export": ("acx_ramanujan.export", "export a checkpoint to ONNX, a plain Transformers checkpoint (Llama, Mixtral, "
               "ERNIE, Qwen3) or GGUF, verified against the model"),
}


def usage() -> str:
    lines = ["usage: acx-rt <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "`acx-rt <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"acx-rt: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[command][0])
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        extra = OPTIONAL_PACKAGES.get(package)
        if extra is None:
            raise
        print(f"acx-rt {command}: error: {missing_extra_line(package, extra)}", file=sys.stderr)
        return 1
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
