"""acx_ramanujan.training.data: loading, nanoGPT's tail split, packing (against a plain byte-chunking reference)."""

import json
import random

import pandas as pd
import pytest

from acx_ramanujan import RamanujanByteTokenizer
from acx_ramanujan.training.data import default_corpus_text, load_raw_datasets, text_to_dataset, tokenize_and_pack

TEXT = "".join(f"line {i}: the quick brown fox — jumps over {i % 7} lazy dogs\n" for i in range(200))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def joined(split) -> str:
    return "".join(split["text"])


def test_txt_split_is_the_tail_of_the_text_like_nanogpt(text_file):
    raw = load_raw_datasets([str(text_file)], validation_split_percentage=10)
    train, validation = joined(raw["train"]), joined(raw["validation"])
    assert train + validation == TEXT  # line breaks kept, nothing reordered or lost
    # nanoGPT cuts at 90 % of the characters; we cut at the next line end, so within one line of that.
    longest_line = max(len(line) for line in TEXT.splitlines(keepends=True))
    assert 0 <= len(train) - int(0.9 * len(TEXT)) <= longest_line


def test_text_to_dataset_matches_file_loading(text_file):
    in_memory = text_to_dataset(TEXT, 25)
    from_file = load_raw_datasets([str(text_file)], validation_split_percentage=25)
    for split in ("train", "validation"):
        assert list(in_memory[split]["text"]) == list(from_file[split]["text"])


def test_validation_file_and_multiple_train_files(tmp_path, text_file):
    second = tmp_path / "second.txt"
    second.write_text("more text\n")
    validation = tmp_path / "val.txt"
    validation.write_text("held out\n")
    raw = load_raw_datasets([str(text_file), str(second)], validation_file=str(validation))
    assert joined(raw["train"]) == TEXT + "more text\n"
    assert joined(raw["validation"]) == "held out\n"


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet"])
def test_record_formats_read_the_text_column(tmp_path, suffix):
    rows = [{"body": f"document {i:02d}", "id": i} for i in range(20)]
    path = tmp_path / f"data.{suffix}"
    frame = pd.DataFrame(rows)
    if suffix in ("json", "jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    raw = load_raw_datasets([str(path)], validation_split_percentage=10, text_column="body")
    assert list(raw["train"]["body"]) + list(raw["validation"]["body"]) == [row["body"] for row in rows]
    assert len(raw["validation"]) == 2  # equal-length rows: the tail 10 % is the last two records


@pytest.mark.parametrize("block_size", [7, 64])
def test_packing_equals_chunking_the_byte_stream(text_file, block_size):
    raw = load_raw_datasets([str(text_file)], validation_split_percentage=10)
    packed = tokenize_and_pack(raw, RamanujanByteTokenizer(), block_size)
    for split in ("train", "validation"):
        stream = list(joined(raw[split]).encode("utf-8"))  # the byte tokenizer's ids are the UTF-8 bytes
        expected = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
        assert list(packed[split]["input_ids"]) == expected
        assert list(packed[split]["labels"]) == expected


def test_default_corpus_is_pythons_help_text():
    from pydoc_data.topics import topics

    text = default_corpus_text()
    assert len(text) > 100_000
    assert topics["while"] in text and topics["with"] in text
    assert all(topics[key] in text for key in topics)  # every help topic
    assert text.startswith(topics[min(topics)])  # in a fixed order (by name), not the dict's


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp: ([str(tmp / "absent.txt")], {}), "does not exist"),
        (lambda tmp: ([str(tmp / "empty.txt")], {}), "is empty"),
        (lambda tmp: ([str(tmp / "data.xml")], {}), "unsupported format"),
        (lambda tmp: ([str(tmp / "ok.txt"), str(tmp / "ok.csv")], {}), "mix formats"),
        (lambda tmp: ([str(tmp / "ok.txt")], {"text_column": "body"}), "no column 'body'"),
        (lambda tmp: ([str(tmp / "ok.txt")], {"validation_split_percentage": 100}), "must be in (0, 100)"),
        (lambda tmp: ([str(tmp / "one_line.txt")], {}), "its last row is longer than that"),
        (lambda tmp: (None, {}), "no training data"),
    ],
)
def test_bad_inputs_raise_clear_errors(tmp_path, make_args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "data.xml").write_text("<a/>")
    (tmp_path / "ok.txt").write_text(TEXT)
    (tmp_path / "ok.csv").write_text("text\nhello\n")
    (tmp_path / "one_line.txt").write_text("no line break at all")
    files, kwargs = make_args(tmp_path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_raw_datasets(files, **kwargs)


def test_empty_dataset_after_tokenization_is_an_error(tmp_path, text_file):
    short = tmp_path / "short.txt"
    short.write_text("tiny\n")
    raw = load_raw_datasets([str(text_file)], validation_file=str(short))
    with pytest.raises(ValueError, match="validation split holds fewer than block_size=16 tokens"):
        tokenize_and_pack(raw, RamanujanByteTokenizer(), 16)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("latin1.txt", "line one\ncaf\xe9 au lait\n".encode("latin-1"), "latin1.txt: not UTF-8 text at byte 12"),
        # A character split across the 1 MiB reading pieces is still UTF-8; the bad byte after it is found.
        ("long.txt", b"a" * ((1 << 20) - 1) + "é".encode() + b"\n\xff\n", f"long.txt: not UTF-8 text at byte {(1 << 20) + 2}"),
        ("binary.txt", bytes(random.Random(0).randrange(256) for _ in range(4096)), "binary.txt: not UTF-8 text at byte"),
        ("truncated.jsonl", b'{"text": "a"}\n{"text": "b"\n', "truncated.jsonl: line 2: not valid JSON"),
        ("numbers.jsonl", b'{"text": 1}\n{"text": 2}\n', "numbers.jsonl: line 1: 'text' is 1, not a string"),
        ("mixed.jsonl", b'{"text": "a"}\n\n{"text": 2.5}\n', "mixed.jsonl: line 3: 'text' is 2.5, not a string"),
        ("array.json", b'[{"text": "a"}, {"text": ["b"]}]', "array.json: element [1]: 'text' is [\"b\"], not a string"),
        ("latin1.csv", "text\nhello\ncaf\xe9\n".encode("latin-1"), "latin1.csv: not UTF-8 text at byte 14"),
    ],
)
def test_unreadable_rows_are_named_by_file_and_position(tmp_path, name, content, message):
    """Binary or non-UTF-8 text, malformed JSON, a text column of numbers: one error naming the file and the byte
    or line (`datasets` itself says only that generation failed, or the tokenizer fails on an int)."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_raw_datasets([str(path)], validation_split_percentage=50)
    assert str(error.value).startswith(f"{path.parent}/{message}")


def test_a_chat_column_of_message_lists_loads_and_a_broken_line_is_still_named(tmp_path):
    """`column_is_text=False` (finetune's --messages_column): lists are fine, JSON errors are still located."""
    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]} for i in range(20)]
    chat.write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = load_raw_datasets([str(chat)], text_column="messages", column_is_text=False)
    assert len(raw["train"]) + len(raw["validation"]) == 20
    with pytest.raises(ValueError, match="messages"):
        load_raw_datasets([str(chat)], text_column="messages")  # as a text column, the lists are refused
    chat.write_text(chat.read_text() + '{"messages": [\n')
    with pytest.raises(ValueError, match=r"chat.jsonl: line 21: not valid JSON"):
        load_raw_datasets([str(chat)], text_column="messages", column_is_text=False)
