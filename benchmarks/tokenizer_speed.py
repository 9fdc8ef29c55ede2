"""Encode and decode speed: RamanujanByteTokenizer against transformers.ByT5Tokenizer on 1 MB of tiny Shakespeare.

Both are byte-level slow (Python) tokenizers; the timed calls are the ones users make: `tokenizer(text)` and
`tokenizer.decode(ids)`. Runs are interleaved (ours, ByT5, ours, ...) so that load from other jobs on a shared
machine hits both alike; the table gives medians and the ByT5 / ours ratio.

usage: python benchmarks/tokenizer_speed.py [--corpus PATH] [--n_bytes 1000000] [--repeats 5]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from transformers import ByT5Tokenizer

from acx_ramanujan import RamanujanByteTokenizer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def seconds(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--n_bytes", type=int, default=1_000_000, help="bytes of the corpus to encode (default 1 MB)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.corpus.is_file():
        print(f"tokenizer_speed.py: corpus {args.corpus} not found (pass --corpus)", file=sys.stderr)
        return 2
    text = args.corpus.read_bytes()[: args.n_bytes].decode("utf-8", errors="ignore")

    tokenizers = {"RamanujanByteTokenizer": RamanujanByteTokenizer(), "ByT5Tokenizer": ByT5Tokenizer()}
    times = {name: {"encode": [], "decode": []} for name in tokenizers}
    exact = {}
    for _ in range(args.repeats):
        for name, tokenizer in tokenizers.items():
            encode_s, ids = seconds(tokenizer, text)
            decode_s, decoded = seconds(tokenizer.decode, ids["input_ids"], skip_special_tokens=True)
            times[name]["encode"].append(encode_s)
            times[name]["decode"].append(decode_s)
            exact[name] = decoded == text

    print(f"{len(text.encode()):,} bytes, {args.repeats} interleaved repeats, medians in seconds\n")
    print("| tokenizer | encode (s) | decode (s) | decode(encode(text)) == text |")
    print("|---|---|---|---|")
    for name in tokenizers:
        encode_s, decode_s = (statistics.median(times[name][step]) for step in ("encode", "decode"))
        print(f"| {name} | {encode_s:.3f} | {decode_s:.3f} | {exact[name]} |")
    for step in ("encode", "decode"):
        byt5, ours = (statistics.median(times[name][step]) for name in ("ByT5Tokenizer", "RamanujanByteTokenizer"))
        print(f"{step}: ByT5Tokenizer / RamanujanByteTokenizer = {byt5 / ours:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
