"""train_bpe_tokenizer on a real text corpus: id layout, exact round trip, plain AutoTokenizer reload, CLI, bad input."""

import json

import pytest
import torch
import transformers
from conftest import tiny_config
from test_tokenization import BOS, EOS, HARD_STRINGS, PAD
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from acx_ramanujan import RamanujanForCausalLM, train_bpe_tokenizer
from acx_ramanujan.training.bpe import main
from acx_ramanujan.cli import main as acx_rt

VOCAB_SIZE = 320


@pytest.fixture(scope="module")
def corpus(text_corpus):
    return text_corpus


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("bpe")
    return train_bpe_tokenizer(corpus, VOCAB_SIZE, output_dir=output_dir), output_dir


def test_ids_follow_the_byte_tokenizer(trained):
    tokenizer, _ = trained
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD, BOS, EOS)
    byte_to_character = bytes_to_unicode()
    assert [tokenizer.convert_tokens_to_ids(byte_to_character[byte]) for byte in range(256)] == list(range(256))
    assert tokenizer.decode(list(b"plain ascii")) == "plain ascii"
    merged = tokenizer.convert_ids_to_tokens(list(range(259, VOCAB_SIZE)))
    assert all(len(token) >= 2 for token in merged)  # everything after the specials is a learned merge


@pytest.mark.parametrize("text", HARD_STRINGS, ids=lambda text: repr(text[:12]))
def test_round_trip_is_exact(trained, text):
    tokenizer, _ = trained
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= token_id < len(tokenizer) for token_id in ids)


def test_bos_is_prepended_like_the_byte_tokenizer(trained):
    tokenizer, _ = trained
    ids = tokenizer("First Citizen:")["input_ids"]
    assert ids[0] == BOS and BOS not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "First Citizen:"


def test_reloads_with_auto_tokenizer_and_no_remote_code(trained, corpus):
    tokenizer, output_dir = trained
    config = json.loads((output_dir / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and (output_dir / "tokenizer.json").is_file()
    assert hasattr(transformers, config["tokenizer_class"])  # a class Transformers itself provides
    loaded = AutoTokenizer.from_pretrained(output_dir)
    assert isinstance(loaded, PreTrainedTokenizerFast) and len(loaded) == VOCAB_SIZE
    sample = corpus.read_text()[:5000]
    assert loaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template


def test_chat_template_is_the_byte_tokenizers(trained):
    tokenizer, _ = trained
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids = tokenizer.apply_chat_template(messages, return_dict=False)
    assert [token_id for token_id in ids if token_id >= 256 and token_id < 259] == [BOS, EOS, BOS, EOS]
    assert tokenizer.decode(ids) == "<s>user\nHi</s><s>assistant\nHello</s>"


def test_training_from_an_iterator_of_lines_equals_training_from_the_file(trained, corpus):
    tokenizer, _ = trained
    with corpus.open(encoding="utf-8") as lines:
        from_iterator = train_bpe_tokenizer(lines, VOCAB_SIZE)
    assert from_iterator.get_vocab() == tokenizer.get_vocab()


def test_more_merges_compress_more(trained, corpus):
    """Bytes per token: 1 for raw bytes; BPE must beat that, and a larger vocabulary must beat a smaller one."""
    small, _ = trained
    large = train_bpe_tokenizer(corpus, 1024)
    text = corpus.read_text()[-100_000:]
    n_bytes = len(text.encode())
    bytes_per_token = [n_bytes / len(tok.encode(text, add_special_tokens=False)) for tok in (small, large)]
    assert 1.0 < bytes_per_token[0] < bytes_per_token[1]


def test_a_tiny_model_with_the_bpe_tokenizer_generates_text_that_decodes(trained, tmp_path):
    tokenizer, _ = trained
    torch.manual_seed(0)
    RamanujanForCausalLM(tiny_config(vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    inputs = loaded("ROMEO:", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=loaded.pad_token_id)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert loaded.decode(generated[0], skip_special_tokens=True).startswith("ROMEO:")


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("vocab_size", [0, 258, 300.0, True, 2**70])
def test_too_small_or_non_int_vocab_size_is_a_value_error(corpus, vocab_size, tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be an int of at least 259"):
        train_bpe_tokenizer(corpus, vocab_size, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_files_are_a_value_error_naming_them(corpus, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=f"missing training file.*{missing.name}"):
        train_bpe_tokenizer([corpus, missing], 300, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_corpus_is_a_value_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer(empty, 300)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer(iter(["", ""]), 300)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer([], 300)


@pytest.mark.parametrize("min_frequency", [-1, 2**64, 1.5, None])
def test_negative_or_non_int_min_frequency_is_a_value_error(corpus, min_frequency, tmp_path):
    with pytest.raises(ValueError, match="min_frequency must be an int >= 0"):
        train_bpe_tokenizer(corpus, 300, min_frequency=min_frequency, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_utf8_is_a_value_error_naming_it(corpus, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"training file .*{latin1.name} is not UTF-8 text \\(invalid byte at offset 3\\)"):
        train_bpe_tokenizer([corpus, latin1], 300, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_string_texts_are_a_type_error():
    with pytest.raises(TypeError, match="expects texts as str, got bytes"):
        train_bpe_tokenizer(iter([b"bytes"]), 300)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_trains_and_saves(corpus, tmp_path, capsys):
    output_dir = tmp_path / "tok"
    argv = ["tokenizer", "train", "--files", str(corpus), "--vocab_size", "300", "--output_dir", str(output_dir)]
    assert acx_rt(argv) == 0
    assert "300 tokens" in capsys.readouterr().out
    assert len(AutoTokenizer.from_pretrained(output_dir)) == 300
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging folder left behind


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--files", "missing.txt", "--vocab_size", "300"], "missing training file(s): missing.txt"),
        (["--files", "{corpus}", "--vocab_size", "100"], "vocab_size must be an int of at least 259"),
        (["--files", "{corpus}", "--vocab_size", "300", "--min_frequency", "-1"], "min_frequency must be an int >= 0"),
        (["--files", "{tmp}/latin1.txt", "--vocab_size", "300"], "latin1.txt is not UTF-8 text"),
    ],
)
def test_cli_bad_input_is_one_line_on_stderr(corpus, tmp_path, capsys, argv, message):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    argv = [arg.format(corpus=corpus, tmp=tmp_path) for arg in argv]
    assert main(["train", *argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("acx-rt tokenizer: error:") and message in err
    assert not (tmp_path / "out").exists()
