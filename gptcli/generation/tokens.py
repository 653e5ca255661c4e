"""What tokens stand for: their exact bytes, a readable piece, prompt encoding, and UTF-8-safe detokenizing.

Two tokenizer families matter for GPT-2 models:
- byte-level BPE (GPT-2 itself): a token is a run of bytes, and a CJK character is often split across
  two or three tokens, so a single token may not be valid UTF-8 on its own;
- BERT-style WordPiece (Chinese GPT-2s such as uer/gpt2-chinese-*): a token is text, "##" marks a word
  continuation, [CLS]/[SEP] frame the input, and the stock decoder puts spaces between CJK characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from typing import TYPE_CHECKING, Any

from gptcli.contracts import TokenSpan
from gptcli.errors import UsageError
from gptcli.textio import check_text

if TYPE_CHECKING:
    from gptcli.contracts import TokenInfo, Tokenizer

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def tokenizer_kind(tokenizer: Tokenizer) -> str:
    """'bytelevel', 'wordpiece' or 'other', from the tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = type(getattr(backend, "decoder", None)).__name__
    if decoder == "ByteLevel":
        return "bytelevel"
    if decoder == "WordPiece" or "Bert" in type(tokenizer).__name__:
        return "wordpiece"
    return "other"


class TokenText:
    """Exact bytes and readable pieces of a tokenizer's tokens, cached per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.kind = tokenizer_kind(tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        """The bytes this token adds to the text (special tokens: the UTF-8 of their name)."""
        cached = self._bytes.get(token_id)
        if cached is not None:
            return cached
        token = self.tokenizer.convert_ids_to_tokens(int(token_id))
        token = "" if token is None else str(token)
        if token_id in self.special_ids:
            data = token.encode("utf-8")
        elif self.kind == "bytelevel":
            table = _byte_decoder()
            if all(ch in table for ch in token):
                data = bytes(table[ch] for ch in token)
            else:  # an added token stored as plain text
                data = token.encode("utf-8")
        elif self.kind == "wordpiece":
            data = token.removeprefix("##").encode("utf-8")
        elif match := _BYTE_FALLBACK.match(token):
            data = bytes([int(match.group(1), 16)])
        else:  # sentencepiece-style: '▁' marks a space
            data = token.replace("▁", " ").encode("utf-8")
        self._bytes[token_id] = data
        return data

    def describe(self, token_id: int) -> TokenInfo:
        """{"id", "token", "bytes"} as the --json outputs give it: `token` is the exact text
        (`token_text`), `bytes` its bytes in hex."""
        data = self.bytes(token_id)
        return {"id": int(token_id), "token": token_text(data), "bytes": data.hex()}


def tokenize(tokenizer: Tokenizer, text: str) -> list[TokenSpan]:
    """The tokens of `text` (no special tokens added): [{"id", "token", "bytes", "start", "end"}].

    `start`/`end` are character offsets into `text` as the `tokenizers` library gives them (the pieces
    of one split character share its offsets); they are left out for tokenizers without that library.
    """
    names = TokenText(tokenizer)
    if not text:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [TokenSpan(**names.describe(i)) for i in tokenizer.encode(text, add_special_tokens=False)]
    encoding = backend.encode(text, add_special_tokens=False)
    return [
        {**names.describe(i), "start": start, "end": end}
        for i, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
    ]


def detokenize(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """The text of token ids, special tokens written out by name: what `tokenize` took apart.

    Byte pieces join into characters; bytes that do not form UTF-8 become U+FFFD (the exact bytes are
    in `TokenText.describe`). WordPiece tokens are joined by the same rules as `complete`'s output.
    """
    names = TokenText(tokenizer)
    ids = [int(i) for i in ids]
    size = len(tokenizer)
    for i in ids:
        if not 0 <= i < size:
            raise UsageError(f"token id {i} is not in the vocabulary (ids 0 to {size - 1})")
    if names.kind != "wordpiece":
        return b"".join(names.bytes(i) for i in ids).decode("utf-8", errors="replace")
    joiner = Detokenizer(tokenizer)
    return "".join(names.bytes(i).decode() if i in names.special_ids else joiner.push(i) for i in ids)


def unknown_token_id(tokenizer: Tokenizer) -> int | None:
    """The tokenizer's unknown token ([UNK]: text it cannot spell), or None where it has none or where
    that token is also end or start of text: GPT-2 names <|endoftext|> its unk_token, but encoding text
    never produces it for want of a spelling."""
    unk = tokenizer.unk_token_id
    return None if unk in (tokenizer.eos_token_id, tokenizer.bos_token_id) else unk


def describe_tokenizer(tokenizer: Tokenizer) -> str:
    """What a person would call a tokenizer: its algorithm, then the class the hub would name,
    e.g. "byte-level BPE (GPT2Tokenizer)", "WordPiece (BertTokenizer)"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    algorithm = type(backend.model).__name__ if backend is not None else ""
    kinds = {
        "BPE": "byte-level BPE" if tokenizer_kind(tokenizer) == "bytelevel" else "BPE",
        "WordPiece": "WordPiece",
        "Unigram": "Unigram (SentencePiece)",
        "WordLevel": "word-level",
    }
    name = getattr(tokenizer, "class_name", None) or type(tokenizer).__name__
    if name in ("TokenizersBackend", "PreTrainedTokenizerFast"):  # transformers' generic wrappers
        name = "tokenizers"
    return f"{kinds.get(algorithm, algorithm or 'tokenizer')} ({name})"


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def token_text(data: bytes) -> str:
    """A token's text by the one rule of every JSON output and the server: its exact text (a newline
    token is "\\n", a real line break), or, when its bytes are not whole UTF-8 characters (a piece of a
    CJK character), the bytes as `<e4 bb>`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "<" + " ".join(f"{b:02x}" for b in data) + ">"


def one_line(text: str) -> str:
    """A token's text for a terminal, a TSV line or a picture: control characters escaped (`\\n`,
    `\\t`, `\\x1b`), so a piece never breaks a line or sends an escape sequence."""
    return "".join(
        _ESCAPES.get(ch, ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}") for ch in text
    )


def readable(data: bytes) -> str:
    """Bytes as one line of text: invalid UTF-8 as `<e4 bb>`, control characters escaped."""
    return one_line(token_text(data))


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, the way the model saw text in training; never empty.

    BERT-style tokenizers frame text as [CLS] text [SEP]; a model that continues text was trained on
    [CLS] text ..., so the trailing [SEP] (which would mean "the end") is dropped. An empty prompt
    becomes the model's BOS token (EOS when there is none: GPT-2 uses <|endoftext|> for both).
    """
    text = check_text(text, "the prompt")
    ids = list(tokenizer.encode(text, add_special_tokens=True)) if text else []
    sep = tokenizer.sep_token_id
    if ids and sep is not None and ids[-1] == sep:
        ids.pop()
    if not ids:
        ids = [start_token_id(tokenizer)]
    return ids


def start_token_id(tokenizer: Tokenizer) -> int:
    """The token that stands for "start of text": BOS, else CLS, else EOS."""
    for candidate in (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _is_cjk(ch: str) -> bool:
    """CJK ideographs, kana, hangul and CJK/full-width punctuation: scripts written without spaces."""
    code = ord(ch)
    return (
        0x2E80 <= code <= 0x9FFF  # radicals, punctuation, kana, CJK unified ideographs
        or 0xAC00 <= code <= 0xD7AF  # hangul syllables
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0xFE30 <= code <= 0xFE4F  # CJK compatibility forms
        or 0xFF00 <= code <= 0xFFEF  # full-width forms
        or 0x20000 <= code <= 0x3FFFF  # extension planes
    )


class Detokenizer:
    """Turns token ids into text incrementally, never emitting half a character.

    `push(id)` returns the text that became final with that token ("" while bytes of a character are
    still incomplete); `flush()` returns whatever is left at the end. The concatenation of all chunks
    equals `decode(tokenizer, ids)`, the one-shot decode of the same ids.

    `after` is the text the ids continue (the prompt). WordPiece tokens carry no spaces, so the first
    word gets a joining space when the prompt ends in a word (as byte-level BPE tokens carry their own):
    `after + text` reads right either way.
    """

    def __init__(self, tokenizer: Tokenizer, after: str = "") -> None:
        self.tokenizer = tokenizer
        self.kind = tokenizer_kind(tokenizer)
        self.ids: list[int] = []
        self.emitted = ""
        self._special = set(tokenizer.all_special_ids)
        self._stream: Any = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.kind != "wordpiece" and backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=True)
        # wordpiece: the last character of the text so far, to decide on a joining space
        self._last_char = after[-1:] if after[-1:].strip() else ""

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self.ids.append(token_id)
        if self.kind == "wordpiece":
            chunk = self._wordpiece(token_id)
        elif self._stream is not None:
            chunk = self._stream.step(self._backend, token_id) or ""
        else:  # slow tokenizers: decode everything again and hold back a trailing replacement char
            full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            chunk = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
            if chunk.endswith("\ufffd"):
                chunk = ""
        self.emitted += chunk
        return chunk

    def flush(self) -> str:
        """Text held back at the end. The bytes of a character that the ids leave unfinished are not
        text: they are left out (as by `decode`), never shown as U+FFFD."""
        if self.kind == "wordpiece":
            return ""
        full = _without_unfinished_character(self.tokenizer, self.ids)
        rest = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += rest
        return rest

    def _wordpiece(self, token_id: int) -> str:
        if token_id in self._special:
            return ""
        token = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        if token.startswith("##"):
            text = token[2:]
        else:
            text = token
            # WordPiece drops the spaces of the text; put one back only between two non-CJK words.
            if self._last_char and not _is_cjk(self._last_char) and text and not _is_cjk(text[0]):
                text = " " + text
        if text:
            self._last_char = text[-1]
        return text


def decode(tokenizer: Tokenizer, ids: Iterable[int], after: str = "") -> str:
    """One-shot decode of generated ids, without special tokens, with the same rules as Detokenizer
    (a character the ids leave unfinished at the end is left out)."""
    detok = Detokenizer(tokenizer, after)
    if detok.kind != "wordpiece":
        return _without_unfinished_character(tokenizer, list(ids))
    return "".join(detok.push(i) for i in ids)


def unfinished_tail(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character that is not finished (0 to 3)."""
    for n in range(1, min(3, len(data)) + 1):
        if data[-n] & 0xC0 == 0x80:  # a continuation byte: the character starts further back
            continue
        try:
            data[-n:].decode("utf-8")
        except UnicodeDecodeError as exc:
            return n if exc.start == 0 and exc.reason == "unexpected end of data" else 0
        return 0
    return 0


def _without_unfinished_character(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The decode of `ids` (special tokens skipped), less the U+FFFD that stands for a character the
    last tokens began but did not finish (a budget or a stop that ended between its bytes)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not text.endswith("\ufffd"):
        return text
    names = TokenText(tokenizer)
    last = [i for i in ids if i not in names.special_ids][-3:]  # a character has at most 4 bytes
    tail = b"".join(names.bytes(i) for i in last)
    return text[:-1] if unfinished_tail(tail) else text
