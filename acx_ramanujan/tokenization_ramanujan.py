"""RamanujanByteTokenizer: UTF-8 bytes as tokens, so it needs no vocabulary file and never meets an unknown character.

Id order (fixed, and the default of `RamanujanConfig`):

    0 .. 255   the UTF-8 byte with that value (the token string of byte b is `chr(b)`, as in ByT5)
    256        <pad>
    257        <s>   (bos)
    258        </s>  (eos)

`len(tokenizer) == 259 == RamanujanConfig().vocab_size`; there is no unk token. Encoding and decoding run on
Python's C codecs (`str.encode` / `bytes.decode`) rather than per-character Python, which is why this is much faster
than `transformers.ByT5Tokenizer` (numbers in docs/benchmarks.md).
"""

import re

from transformers import AddedToken, PreTrainedTokenizer

BYTE_VOCAB_SIZE = 256

# One conversation turn is `<s>{role}\n{content}</s>`; the generation prompt opens an assistant turn, so a model
# fine-tuned on this format answers and then emits </s>, which stops `generate`.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ bos_token }}{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)


def _check_encodable(text, argument: str) -> None:
    """TypeError, before any work, for input that is neither text, a batch of texts, nor token ids."""
    if isinstance(text, str):
        return
    if isinstance(text, (list, tuple)) and all(isinstance(item, (str, int, list, tuple)) for item in text):
        for item in text:
            if isinstance(item, (list, tuple)):
                _check_encodable(item, argument)
        return
    hint = " (decode bytes to str first)" if isinstance(text, (bytes, bytearray)) else ""
    raise TypeError(
        f"RamanujanByteTokenizer: `{argument}` must be a str, a list of str (a batch), or a list of int token ids; "
        f"got {type(text).__name__}{hint}"
    )


class RamanujanByteTokenizer(PreTrainedTokenizer):
    """Byte-level tokenizer: one id per UTF-8 byte, plus `<pad>`, `<s>` and `</s>` (ids 256, 257, 258).

    - `decode(encode(s, add_special_tokens=False)) == s` for every string.
    - `add_special_tokens=True` (the default of `__call__` and `encode`) puts `<s>` in front, as Llama does
      (`special_tokens_pattern="bos"`; PreTrainedTokenizer's other patterns, e.g. "bos_eos" or "none", also work).
    - Special-token text typed in the input (the literal string "</s>") is encoded as its bytes, not as the special
      token: `split_special_tokens` defaults to True here. Pass `split_special_tokens=False` to parse the special and
      added tokens' text into their ids.
    - `decode` never raises on integer ids: invalid UTF-8 and ids outside the vocabulary become U+FFFD.
    - Chat: `apply_chat_template` renders each message as `<s>{role}\\n{content}</s>` (`DEFAULT_CHAT_TEMPLATE`) and
      encodes the `<s>`/`</s>` the template writes as special ids. Pass `sanitize_control_tokens=True` to keep
      special-token text typed inside messages as bytes.
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        split_special_tokens=True,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        **kwargs,
    ):
        specials = [pad_token, bos_token, eos_token]
        # The special tokens take the ids right after the 256 bytes, in this order, whatever their text.
        self._added_tokens_decoder = {
            BYTE_VOCAB_SIZE + offset: token if isinstance(token, AddedToken) else AddedToken(token, special=True)
            for offset, token in enumerate(specials)
        }
        kwargs.setdefault("special_tokens_pattern", "bos")
        super().__init__(
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            split_special_tokens=split_special_tokens,
            chat_template=chat_template,
            **kwargs,
        )
        # PreTrainedTokenizer consumes `special_tokens_pattern` before recording init kwargs; keep it so that
        # save_pretrained / from_pretrained preserve a non-default choice.
        self.init_kwargs["special_tokens_pattern"] = self.special_tokens_pattern

    @property
    def vocab_size(self) -> int:
        """The byte vocabulary (256); `len(tokenizer)` adds the special and added tokens."""
        return BYTE_VOCAB_SIZE

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(byte): byte for byte in range(BYTE_VOCAB_SIZE)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    # --- encoding -------------------------------------------------------------------------------------------------

    def _added_tokens_regex(self) -> re.Pattern:
        """Matches any added token's text, longest first, so that a token wins over the tokens it contains."""
        contents = sorted(self._added_tokens_encoder, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, contents)) + ")")

    def _byte_tokens(self, text: str) -> list[str]:
        # Latin-1 maps byte b to chr(b): the C codecs give the token list without a Python loop.
        return list(text.encode("utf-8").decode("latin-1"))

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Byte tokens of `text`; with `split_special_tokens=False`, added tokens' text becomes those tokens.

        Added tokens are matched literally: their lstrip / rstrip / single_word flags are not applied.
        """
        if not isinstance(text, str):
            raise TypeError(f"RamanujanByteTokenizer.tokenize expects a str, got {type(text).__name__}")
        if kwargs.get("split_special_tokens", self.split_special_tokens) or not self._added_tokens_encoder:
            return self._byte_tokens(text)
        tokens = []
        # Splitting on a capturing group alternates text (even places) and added tokens (odd places).
        for position, piece in enumerate(self._added_tokens_regex().split(text)):
            tokens.extend(self._byte_tokens(piece) if position % 2 == 0 else [piece])
        return tokens

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self._byte_tokens(text)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int] | None:
        """Byte tokens map to their byte value; a string that is no token gives None (there is no unk)."""
        if isinstance(tokens, str):
            return self._convert_token_to_id_with_added_voc(tokens)
        joined = "".join(tokens)
        if len(joined) == len(tokens) and max(joined, default="\0") < chr(BYTE_VOCAB_SIZE):
            return list(joined.encode("latin-1"))  # all are byte tokens: one C call
        added = self._added_tokens_encoder
        return [added[token] if token in added else self._convert_token_to_id(token) for token in tokens]

    def _convert_token_to_id(self, token: str) -> int | None:
        return ord(token) if len(token) == 1 and ord(token) < BYTE_VOCAB_SIZE else None

    def _encode_marked_chat(self, chat: str) -> list[int]:
        """Ids of a chat rendered with `sanitize_control_tokens=True`.

        transformers' `encode_marked_chat` relies on the tokenizer parsing special tokens by default, which this
        one does not; here the template's text is parsed and the marked (user-typed) control tokens stay bytes.
        """
        # Imported where used: a private helper of the recent `sanitize_control_tokens` feature (this method's only
        # caller), so loading the tokenizer never depends on it.
        from transformers.utils.chat_template_utils import _get_control_token_patterns

        _, markers_regex = _get_control_token_patterns(tuple(self._added_tokens_encoder))
        ids = []
        # Splitting alternates template text (even places) and marked user tokens or lone markers (odd places).
        for position, piece in enumerate(markers_regex.split(chat)):
            if piece:
                ids += self.encode(piece, add_special_tokens=False, split_special_tokens=position % 2 == 1)
        return ids

    def _encode_plus(self, text, text_pair=None, **kwargs):
        _check_encodable(text, "text")
        if text_pair is not None:
            _check_encodable(text_pair, "text_pair")
        if kwargs.pop("sanitize_control_tokens", False):
            encode_chat = self._encode_marked_chat
            text = encode_chat(text) if isinstance(text, str) else [encode_chat(chat) for chat in text]
        return super()._encode_plus(text, text_pair, **kwargs)

    # --- decoding -------------------------------------------------------------------------------------------------

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        """Runs of byte ids are decoded in one C call each; invalid UTF-8 and unknown ids give U+FFFD."""
        token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
        try:
            text = bytes(token_ids).decode("utf-8", errors="replace")
        except ValueError:  # some ids are not bytes: special, added or out-of-vocabulary ids
            text = self._decode_mixed(token_ids, skip_special_tokens)
        except TypeError:
            raise TypeError(f"RamanujanByteTokenizer.decode expects integer token ids, got {token_ids!r:.80}") from None
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def _decode_mixed(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        non_byte_positions = [i for i, token_id in enumerate(token_ids) if not 0 <= token_id < BYTE_VOCAB_SIZE]
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        pieces, start = [], 0
        for position in non_byte_positions + [len(token_ids)]:
            pieces.append(bytes(token_ids[start:position]).decode("utf-8", errors="replace"))
            if position < len(token_ids) and token_ids[position] not in skipped:
                added_token = self._added_tokens_decoder.get(token_ids[position])
                pieces.append(added_token.content if added_token is not None else "\ufffd")
            start = position + 1
        return "".join(pieces)

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index) if 0 <= index < BYTE_VOCAB_SIZE else "\ufffd"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        added = self._added_tokens_encoder
        data = b"".join(
            token.encode("latin-1") if token not in added and self._convert_token_to_id(token) is not None
            else token.encode("utf-8")
            for token in tokens
        )
        return data.decode("utf-8", errors="replace")

    # --- chat -----------------------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation, *args, tokenizer_kwargs=None, **kwargs):
        """`PreTrainedTokenizerBase.apply_chat_template`, with the `<s>`/`</s>` the template writes parsed to ids."""
        tokenizer_kwargs = {"split_special_tokens": False, **(tokenizer_kwargs or {})}
        return super().apply_chat_template(conversation, *args, tokenizer_kwargs=tokenizer_kwargs, **kwargs)


__all__ = ["DEFAULT_CHAT_TEMPLATE", "RamanujanByteTokenizer"]
