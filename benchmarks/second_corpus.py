"""Write the recipe's second benchmark corpus: Python's own standard library source, as bytes.

The recipe was tuned on tiny Shakespeare (English verse). A second corpus of a different kind checks that the
default recipe did not just fit that one text: source code, with its indentation, identifiers and long-range
structure. The standard library of the running Python is on every machine that runs this package and needs no
download; its top-level `Lib/*.py` files, sorted by name, are joined and cut to tiny Shakespeare's size
(1,115,394 bytes), so both corpora give the same number of training blocks. The file depends on the Python
version, which is printed with the file's SHA-256 (docs/benchmarks.md records both).

usage: python benchmarks/second_corpus.py OUT.txt
then:  DATA=OUT.txt PRESETS=tiny benchmarks/quality_anchor.sh [flags]
"""

import hashlib
import os
import platform
import sys
import sysconfig
from pathlib import Path

TINY_SHAKESPEARE_BYTES = 1_115_394


def standard_library_text(size: int = TINY_SHAKESPEARE_BYTES) -> bytes:
    library = Path(sysconfig.get_paths()["stdlib"])
    text = b""
    for path in sorted(library.glob("*.py")):
        text += path.read_bytes()
        if len(text) >= size:
            return text[:size]
    raise SystemExit(f"second_corpus.py: {library} holds fewer than {size} bytes of top-level .py files")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    out = Path(argv[0])
    text = standard_library_text()
    text.decode("utf-8")  # the package reads text files as UTF-8; fail here, not in training
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_bytes(text)
    os.replace(temporary, out)
    print(f"{out}: {len(text):,} bytes of Python {platform.python_version()}'s standard library, "
          f"sha256 {hashlib.sha256(text).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
