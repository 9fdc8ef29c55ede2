"""RamanujanByteTokenizer against Python's own UTF-8 codec, the Transformers tokenizer API, and a fresh process."""

import json
import random

import pytest
import torch
from conftest import run_without_package, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from acx_ramanujan import RamanujanByteTokenizer, RamanujanConfig, RamanujanForCausalLM

PAD, BOS, EOS = 256, 257, 258

HARD_STRINGS = [
    "",
    " ",
    "  \t\n\r\n \u00a0\u2003",  # ASCII and Unicode whitespace
    "\x00",
    "a\x00b\x01\x1f\x7f\x1b[31m",  # NUL, control bytes, an ANSI escape
    "café naïve résumé",  # precomposed accents
    "cafe\u0301 n\u0303 a\u0308\u0304\u0301",  # combining marks (decomposed, stacked)
    "漢字かなカナ한국어",  # CJK
    "👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽",  # emoji with ZWJ sequences and skin-tone modifiers
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 𓀀",  # astral-plane letters
    "\ufeffBOM at the start",
    "</s> <s> <pad> literally",  # special-token text typed by a user
    "long " + "ünïcödé 🙂 " * 5_000,  # very long text
]


@pytest.fixture(scope="module")
def tokenizer():
    return RamanujanByteTokenizer()


# ------------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_matches_the_model_config(tokenizer):
    config = RamanujanConfig()
    assert len(tokenizer) == config.vocab_size == 259
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD, BOS, EOS)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (PAD, BOS, EOS)
    assert tokenizer.unk_token is None
    vocab = tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(259))
    assert all(vocab[chr(byte)] == byte for byte in range(256))


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("text", HARD_STRINGS, ids=lambda text: repr(text[:12]))
def test_round_trip_is_exact_with_one_id_per_utf8_byte(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)) == text
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) == ids


def test_bos_is_prepended_with_special_tokens_and_skipped_on_decode(tokenizer):
    ids = tokenizer("hi")["input_ids"]
    assert ids == [BOS, ord("h"), ord("i")]
    assert tokenizer.decode(ids) == "<s>hi"
    assert tokenizer.decode(ids + [EOS, PAD], skip_special_tokens=True) == "hi"


def test_special_token_text_is_bytes_unless_parsing_is_asked_for(tokenizer):
    text = "a</s>b"
    assert tokenizer.encode(text, add_special_tokens=False) == list(text.encode())
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == list(text.encode())
    parsed = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=False)
    assert parsed == [ord("a"), EOS, ord("b")]
    assert tokenizer.decode(parsed) == text


def test_added_tokens_are_parsed_on_request_longest_first():
    tokenizer = RamanujanByteTokenizer()
    tokenizer.add_tokens(["<tool>", "<tool_call>"])
    assert len(tokenizer) == 261
    ids = tokenizer.encode("x<tool_call><tool>", add_special_tokens=False, split_special_tokens=False)
    assert ids == [ord("x"), 260, 259]
    assert tokenizer.decode(ids) == "x<tool_call><tool>"


# ------------------------------------------------------------------------------------------------ decode


def test_decode_matches_pythons_codec_on_random_bytes(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        assert tokenizer.decode(list(data)) == data.decode("utf-8", errors="replace")


def test_decode_never_raises_on_any_integer_ids(tokenizer):
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(-3, 300) for _ in range(rng.randrange(0, 30))]
        expected = []
        for token_id in ids:  # naive reference: one piece per id, bytes joined before UTF-8 decoding
            if 0 <= token_id < 256:
                expected.append(bytes([token_id]))
            else:
                expected.append({PAD: "<pad>", BOS: "<s>", EOS: "</s>"}.get(token_id, "\ufffd"))
        text = "".join(
            b"".join(run).decode("utf-8", errors="replace") if isinstance(run[0], bytes) else "".join(run)
            for run in _runs_by_type(expected)
        )
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(torch.tensor(ids, dtype=torch.long)) == text


def _runs_by_type(pieces):
    runs = []
    for piece in pieces:
        if runs and type(runs[-1][0]) is type(piece):
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return runs


def test_decode_handles_single_ids_batches_and_invalid_utf8(tokenizer):
    assert tokenizer.decode(65) == "A"
    assert tokenizer.decode([0xC3]) == "\ufffd"  # a lone lead byte
    assert tokenizer.decode([0xE2, 0x82, EOS, 0xAC]) == "\ufffd</s>\ufffd"  # a character cut by a special token
    assert tokenizer.batch_decode([[BOS, 104, 105], [121, 111, PAD]], skip_special_tokens=True) == ["hi", "yo"]


# ------------------------------------------------------------------------------------------------ batches


def test_batch_padding_right_and_left_with_attention_mask(tokenizer):
    texts = ["ab", "", "héllo"]
    encoded = [[BOS] + list(text.encode()) for text in texts]
    longest = max(map(len, encoded))
    for side in ("right", "left"):
        batch = tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
        assert batch["input_ids"].shape == (3, longest)
        for row, ids in enumerate(encoded):
            pad = [PAD] * (longest - len(ids))
            expected_ids = ids + pad if side == "right" else pad + ids
            mask = [1] * len(ids) + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * len(ids)
            assert batch["input_ids"][row].tolist() == expected_ids
            assert batch["attention_mask"][row].tolist() == mask
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == texts


def test_pad_to_max_length_and_multiple(tokenizer):
    batch = tokenizer(["abc"], padding="max_length", max_length=6, add_special_tokens=False)
    assert batch["input_ids"] == [[97, 98, 99, PAD, PAD, PAD]]
    batch = tokenizer(["abcde"], padding=True, pad_to_multiple_of=4, add_special_tokens=False)
    assert batch["input_ids"] == [[97, 98, 99, 100, 101, PAD, PAD, PAD]]


def test_truncation_both_sides(tokenizer):
    text = "abcdefgh"
    right = tokenizer(text, truncation=True, max_length=4)["input_ids"]
    assert right == [BOS, 97, 98, 99]  # the special token counts toward max_length
    left = RamanujanByteTokenizer(truncation_side="left")(text, truncation=True, max_length=4)["input_ids"]
    assert left == [BOS, 102, 103, 104]
    batch = tokenizer([text, "xy"], truncation=True, max_length=3, padding=True, add_special_tokens=False)
    assert batch["input_ids"] == [[97, 98, 99], [120, 121, PAD]]


def test_batch_encoding_matches_one_by_one(tokenizer):
    batch = tokenizer(HARD_STRINGS)["input_ids"]
    assert batch == [tokenizer(text)["input_ids"] for text in HARD_STRINGS]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [b"bytes", 42, 3.5, {"text": "x"}, ["ok", 1.5], [None]], ids=repr)
def test_non_string_input_raises_type_error_naming_what_was_expected(tokenizer, bad):
    with pytest.raises(TypeError, match="must be a str, a list of str"):
        tokenizer(bad)
    with pytest.raises(TypeError, match="must be a str, a list of str"):
        tokenizer.encode(bad)


def test_bytes_input_hints_at_decoding(tokenizer):
    with pytest.raises(TypeError, match="decode bytes to str first"):
        tokenizer.encode(b"abc")


def test_tokenize_of_non_string_raises_type_error(tokenizer):
    with pytest.raises(TypeError, match="tokenize expects a str, got list"):
        tokenizer.tokenize(["a"])


def test_decode_of_non_integer_ids_raises_type_error(tokenizer):
    with pytest.raises(TypeError, match="expects integer token ids"):
        tokenizer.decode("abc")
    with pytest.raises(TypeError, match="expects integer token ids"):
        tokenizer.decode([1.5, 2])


# ------------------------------------------------------------------------------------------------ chat


def chat_ids(*turns):
    """Reference encoding of the documented format: `<s>{role}\\n{content}</s>` per turn."""
    ids = []
    for role, content in turns:
        ids += [BOS] + list(f"{role}\n{content}".encode()) + ([EOS] if content is not None else [])
    return ids


def test_chat_template_encodes_turns_with_bos_and_eos(tokenizer):
    messages = [{"role": "user", "content": "Hi ☕"}, {"role": "assistant", "content": "Hello!"}]
    assert tokenizer.apply_chat_template(messages, return_dict=False) == chat_ids(
        ("user", "Hi ☕"), ("assistant", "Hello!")
    )
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=False)
    assert prompt == chat_ids(("user", "Hi ☕")) + [BOS] + list(b"assistant\n")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s>user\nHi ☕</s><s>assistant\nHello!</s>"


def test_chat_template_can_keep_special_text_in_messages_as_bytes(tokenizer):
    messages = [{"role": "user", "content": "say </s> please"}]
    sanitized = tokenizer.apply_chat_template(messages, sanitize_control_tokens=True, return_dict=False)
    assert sanitized == chat_ids(("user", "say </s> please"))
    assert sanitized.count(EOS) == 1
    parsed = tokenizer.apply_chat_template(messages, return_dict=False)
    assert parsed.count(EOS) == 2  # without sanitizing, the typed "</s>" is parsed like the template's


def test_chat_batch_returns_padded_tensors(tokenizer):
    chats = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "longer"}]]
    batch = tokenizer.apply_chat_template(chats, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, len(chat_ids(("user", "longer"))))
    assert batch["attention_mask"][0].sum().item() == len(chat_ids(("user", "a")))


# ------------------------------------------------------------------------------------------------ save / load


def test_save_and_load_with_auto_tokenizer(tmp_path):
    tokenizer = RamanujanByteTokenizer(padding_side="left", model_max_length=64)
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["auto_map"]["AutoTokenizer"][0] == "tokenization_ramanujan.RamanujanByteTokenizer"
    assert (tmp_path / "tokenization_ramanujan.py").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is RamanujanByteTokenizer
    assert (loaded.padding_side, loaded.model_max_length, len(loaded)) == ("left", 64, 259)
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.split_special_tokens is True
    for text in HARD_STRINGS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_a_chosen_special_tokens_pattern_survives_save_and_load(tmp_path):
    tokenizer = RamanujanByteTokenizer(special_tokens_pattern="bos_eos")
    assert tokenizer("a")["input_ids"] == [BOS, 97, EOS]
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("a")["input_ids"] == [BOS, 97, EOS]


def test_auto_tokenizer_follows_a_ramanujan_config(tmp_path):
    tiny_config().save_pretrained(tmp_path)  # a model folder without tokenizer files
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is RamanujanByteTokenizer


def test_model_and_tokenizer_load_and_generate_in_a_fresh_process(tmp_path):
    """A tiny model saved with its tokenizer: remote code alone (package blocked) loads both, generates, decodes."""
    torch.manual_seed(0)
    model = RamanujanForCausalLM(tiny_config()).eval()
    tokenizer = RamanujanByteTokenizer()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    prompt = "To be, or not to bé"
    inputs = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    new_ids = generated[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new_ids) >= 1 and all(0 <= token_id < len(tokenizer) for token_id in new_ids)
    expected = {"ids": generated[0].tolist(), "text": tokenizer.decode(generated[0], skip_special_tokens=True)}
    assert expected["text"].startswith(prompt)
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    run_without_package(
        f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
expected = json.loads(open({str(tmp_path / "expected.json")!r}).read())
tokenizer = AutoTokenizer.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
assert type(tokenizer).__module__.startswith("transformers_modules"), type(tokenizer).__module__
assert len(tokenizer) == 259 and tokenizer.decode(tokenizer.encode("é</s>", add_special_tokens=False)) == "é</s>"
inputs = tokenizer({prompt!r}, return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
assert generated[0].tolist() == expected["ids"], (generated[0].tolist(), expected["ids"])
assert tokenizer.decode(generated[0], skip_special_tokens=True) == expected["text"]
""",
        cwd=tmp_path,
    )


def test_generated_ids_from_a_model_saved_with_its_tokenizer_decode(tmp_path):
    torch.manual_seed(1)
    model = RamanujanForCausalLM(tiny_config()).eval()
    RamanujanByteTokenizer().save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = ["Hello", "Ünïcode ☕ prompt"]
    inputs = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert all(text.startswith(prompt) for text, prompt in zip(texts, prompts))
