"""Byte-level BPE tokenizers trained with Hugging Face `tokenizers`, numbered like the byte tokenizer.

Id order of a trained tokenizer:

    0 .. 255   the 256 single bytes (id b is byte b, as in `RamanujanByteTokenizer`; the token strings are GPT-2's
               byte-to-character alphabet)
    256        <pad>
    257        <s>   (bos; `add_special_tokens=True` prepends it, as the byte tokenizer does)
    258        </s>  (eos)
    259 ...    merged tokens, in the order BPE learned them

`len(tokenizer) <= vocab_size` (smaller when the corpus runs out of pairs to merge), so a model config takes
`vocab_size=len(tokenizer)`. The result is a plain `PreTrainedTokenizerFast` saved as `tokenizer.json`, which
`AutoTokenizer.from_pretrained(dir)` loads without remote code. Unlike `RamanujanByteTokenizer`, it keeps the
Transformers default of parsing special-token text in the input ("</s>" in the text becomes eos) and needs no
override for the chat template, which it shares with the byte tokenizer.

CLI: `acx-rt tokenizer train --files a.txt b.txt --vocab_size 4096 --output_dir DIR`.
"""

import argparse
import codecs
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ..commands import InputError, run_command
from ..tokenization_ramanujan import BYTE_VOCAB_SIZE, DEFAULT_CHAT_TEMPLATE

PROG = "acx-rt tokenizer"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}  # ids 256, 257, 258, in this order
MIN_VOCAB_SIZE = BYTE_VOCAB_SIZE + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 2**32  # `tokenizers` numbers tokens with u32 ids
MAX_MIN_FREQUENCY = 2**64 - 1  # the trainer's counts are u64


def train_bpe_tokenizer(
    files_or_iterator: str | os.PathLike | list[str | os.PathLike] | Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    output_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` tokens (bytes, 3 specials and merges; ids in the module doc).

    `files_or_iterator`: a text file, a list of text files, or any other iterable of str (a generator, a dataset
    column: pass `iter(texts)` for a list of texts). `min_frequency`: pairs seen fewer times are never merged.
    With `output_dir`, the tokenizer is saved there too (staged in a temporary folder, then moved in).
    Raises ValueError for a vocabulary smaller than 259, a negative min_frequency, missing, empty or non-UTF-8
    files, before training.
    """
    if not _is_int(vocab_size) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be an int of at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens) and at most {MAX_VOCAB_SIZE}, got {vocab_size!r}"
        )
    if not _is_int(min_frequency) or not 0 <= min_frequency <= MAX_MIN_FREQUENCY:
        raise ValueError(f"min_frequency must be an int >= 0 (and at most {MAX_MIN_FREQUENCY}), got {min_frequency!r}")
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    if isinstance(files_or_iterator, (list, tuple)):
        files = [Path(path) for path in files_or_iterator]
        _check_files(files)
        texts = None
    else:
        files, texts = None, _non_empty_texts(files_or_iterator)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Every byte is in the alphabet from the start, so no input is ever unknown; the specials are added afterwards
    # (with their fixed ids), so the trainer leaves room for them.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if files is not None:
        backend.train([str(path) for path in files], trainer)
    else:
        backend.train_from_iterator(texts, trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_renumbered_like_byte_tokenizer(backend), chat_template=DEFAULT_CHAT_TEMPLATE, **SPECIAL_TOKENS
    )
    if output_dir is not None:
        save_atomically(tokenizer, Path(output_dir))
    return tokenizer


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_files(files: list[Path]) -> None:
    if not files:
        raise ValueError("empty corpus: no training files given")
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise ValueError(
            f"missing training file(s): {', '.join(missing)} (a list is read as file paths; to train on texts in "
            "memory, pass an iterator: iter(texts))"
        )
    if all(path.stat().st_size == 0 for path in files):
        raise ValueError(f"empty corpus: every training file is empty ({', '.join(map(str, files))})")
    for path in files:
        _check_utf8(path)


def _check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """`tokenizers` reads training files as UTF-8 and fails with a bare "stream did not contain valid UTF-8"."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as stream:
        while True:
            chunk = stream.read(chunk_size)
            pending = len(decoder.getstate()[0])  # bytes of a character the previous chunk left unfinished
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:  # error.start counts from the first pending byte
                position = offset - pending + error.start
                raise ValueError(f"training file {path} is not UTF-8 text (invalid byte at offset {position})") from None
            if not chunk:
                return
            offset += len(chunk)


def _non_empty_texts(texts: Iterable[str]) -> Iterator[str]:
    """The same texts; reads ahead to the first non-empty one, so that an empty corpus fails before training."""
    texts = _only_strings(iter(texts))
    read_ahead = []
    for text in texts:
        read_ahead.append(text)
        if text:
            return itertools.chain(read_ahead, texts)
    raise ValueError("empty corpus: the texts are all empty")


def _only_strings(texts: Iterator) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_bpe_tokenizer expects texts as str, got {type(text).__name__}")
        yield text


def _renumbered_like_byte_tokenizer(trained: Tokenizer) -> Tokenizer:
    """The trained BPE with ids renumbered: byte b -> b, then the specials (256-258), then the merges in order."""
    trained_model = json.loads(trained.to_str())["model"]
    byte_to_character = bytes_to_unicode()  # the alphabet ByteLevel pre-tokenization writes bytes in
    vocab = {byte_to_character[byte]: byte for byte in range(BYTE_VOCAB_SIZE)}
    vocab.update({token: BYTE_VOCAB_SIZE + offset for offset, token in enumerate(SPECIAL_TOKENS.values())})
    for token, _ in sorted(trained_model["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(merge) for merge in trained_model["merges"]]))
    tokenizer.pre_tokenizer = trained.pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in SPECIAL_TOKENS.values()])
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
    )
    return tokenizer


def save_atomically(tokenizer, output_dir: Path) -> None:
    """`save_pretrained` into a temporary folder beside `output_dir`, then move each file in (no half-written file)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}-") as staging:
        tokenizer.save_pretrained(staging)
        for staged in Path(staging).iterdir():
            os.replace(staged, output_dir / staged.name)


# ------------------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Byte-level BPE tokenizers (Hugging Face tokenizers).")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE and save it as tokenizer.json")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--files", nargs="+", help="text files to train on")
    source.add_argument("--dataset_name", help="a Hub dataset to train on (where the network allows)")
    train.add_argument("--dataset_config_name", help="the dataset's configuration")
    train.add_argument("--dataset_split", default="train", help="the dataset split to train on (default: train)")
    train.add_argument("--text_column", default="text", help="the dataset column holding the text (default: text)")
    train.add_argument("--vocab_size", type=int, required=True,
                       help=f"total vocabulary: 256 bytes + 3 special tokens + merges (at least {MIN_VOCAB_SIZE})")
    train.add_argument("--min_frequency", type=int, default=2, help="merge only pairs seen this often (default: 2)")
    train.add_argument("--output_dir", required=True, help="where tokenizer.json and tokenizer_config.json go")
    return parser.parse_args(argv)


def dataset_texts(name: str, config_name: str | None, split: str, text_column: str) -> Iterator[str]:
    """The text column of a Hub dataset split (streamed from the local cache or the network)."""
    from datasets import load_dataset

    dataset = load_dataset(name, config_name, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(f"dataset {name} has no column {text_column!r} (columns: {', '.join(dataset.column_names)})")
    return (row[text_column] for row in dataset)


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: parse_args(sys.argv[1:] if argv is None else argv), train_and_report)


def train_and_report(args: argparse.Namespace) -> None:
    """Read the corpus and train; bad data (a file, a Hub dataset, a vocabulary size) is an input error."""
    try:
        corpus = args.files or dataset_texts(args.dataset_name, args.dataset_config_name, args.dataset_split,
                                             args.text_column)
        tokenizer = train_bpe_tokenizer(corpus, args.vocab_size, min_frequency=args.min_frequency,
                                        output_dir=args.output_dir)
    except (ValueError, TypeError, OSError) as error:
        raise InputError(str(error)) from error
    print(f"{PROG}: trained a byte-level BPE of {len(tokenizer)} tokens; saved to {args.output_dir}")


__all__ = ["MIN_VOCAB_SIZE", "SPECIAL_TOKENS", "train_bpe_tokenizer"]
