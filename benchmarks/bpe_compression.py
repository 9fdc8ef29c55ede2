"""Bytes per token of byte-level BPE on tiny Shakespeare, for a few vocabulary sizes.

The BPE is trained on the training split and measured on the held-out tail (the same 90/10 nanoGPT-style split
`acx-rt train` uses: `acx_ramanujan.training.data.text_to_dataset`). The byte tokenizer is the 1.00 baseline. More bytes per
token means shorter sequences for the same text, at the price of a larger embedding and output layer.

usage: python benchmarks/bpe_compression.py [--corpus PATH] [--vocab_sizes 512 1024 2048 4096 8192]
"""

import argparse
import sys
import time
from pathlib import Path

from acx_ramanujan import RamanujanByteTokenizer, train_bpe_tokenizer
from acx_ramanujan.training.data import text_to_dataset

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def bytes_per_token(tokenizer, text: str) -> float:
    return len(text.encode("utf-8")) / len(tokenizer.encode(text, add_special_tokens=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--vocab_sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    args = parser.parse_args()
    if not args.corpus.is_file():
        print(f"bpe_compression.py: corpus {args.corpus} not found (pass --corpus)", file=sys.stderr)
        return 2
    splits = text_to_dataset(args.corpus.read_text(encoding="utf-8"), validation_split_percentage=10)
    train_text, validation_text = ("".join(splits[name]["text"]) for name in ("train", "validation"))

    print(f"train {len(train_text.encode()):,} bytes, held-out {len(validation_text.encode()):,} bytes\n")
    print("| tokenizer | tokens | bytes/token (train) | bytes/token (held-out) | training time (s) |")
    print("|---|---|---|---|---|")
    byte_tokenizer = RamanujanByteTokenizer()
    print(f"| bytes | {len(byte_tokenizer)} | {bytes_per_token(byte_tokenizer, train_text):.2f} "
          f"| {bytes_per_token(byte_tokenizer, validation_text):.2f} | - |")
    for vocab_size in args.vocab_sizes:
        start = time.perf_counter()
        tokenizer = train_bpe_tokenizer(iter(splits["train"]["text"]), vocab_size)
        train_s = time.perf_counter() - start
        print(f"| BPE {vocab_size} | {len(tokenizer)} | {bytes_per_token(tokenizer, train_text):.2f} "
              f"| {bytes_per_token(tokenizer, validation_text):.2f} | {train_s:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
