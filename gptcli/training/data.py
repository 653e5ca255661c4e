"""Training text -> token ids on disk -> batches of packed blocks.

Inputs are .txt files (each file one document), .jsonl files (one document per line, the text in a
field), or '-' for stdin (one document). Everything is tokenized once, in batches, with an EOS token after
every document, and written as a flat array of token ids (uint16 when the vocabulary fits) that later
runs open as a numpy memmap: resuming, or a second run on the same data, does not tokenize again.

Packing: block i is tokens[i*B : i*B + B + 1], so consecutive blocks share one token and every token of
the stream is predicted exactly once (inputs are the first B ids, targets the last B). The tokens that
do not fill a last block make a short final one: a block that ends at the last token, whose targets
already predicted by the block before are masked, so nothing is dropped and nothing counted twice.

Instruction data (prompt/completion or chat messages) is read by gptcli.training.instruct instead; both
hand the loop the same `Batch`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gptcli.errors import GptcliError, UsageError
from gptcli.textio import decode_utf8
from gptcli.training.atomic import atomic_write_json, move_into_place, temp_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CACHE_FORMAT = 1
# Long documents are cut into pieces of about this many characters so the fast tokenizer can work on
# them in parallel, and so one huge file never becomes one huge Python list of ids.
PIECE_CHARS = 1 << 16
BATCH_CHARS = 1 << 22
# A cut just after "x\n" followed by a non-space character: GPT-2's pre-tokenizer puts a token boundary
# on both sides of such a newline, so tokenizing the pieces separately gives the same ids as the whole.
_SAFE_CUT = re.compile(r"\S\n(?=\S)")
_PROBE = "Hello there.\nSecond line, with 42 numbers.\n今天天气很好。\n  indented\nlast line\n"


IGNORE = -100
"""The label of a position that has no target (prompt, padding, already counted): PyTorch's ignore_index."""


@dataclass
class Batch:
    """What one micro-step trains on, as numpy arrays of shape (rows, positions).

    `labels` hold the target of each position or IGNORE. `segments` (packed examples) number the
    example each position belongs to: attention stays inside one, and positions restart at each.
    `attention` (padded rows) is 1 for tokens, 0 for the padding on the right.
    """

    inputs: np.ndarray
    labels: np.ndarray
    segments: np.ndarray | None = None
    attention: np.ndarray | None = None
    padding: int = 0
    """Positions that hold no token (the end of a packed row, or of a padded one)."""

    @property
    def targets(self) -> int:
        """Positions that count in the loss."""
        return int(np.count_nonzero(self.labels != IGNORE))

    @property
    def tokens(self) -> int:
        """Input tokens that are not padding."""
        return self.inputs.size - self.padding


@dataclass
class Blocks:
    """Packed blocks of `block_size + 1` tokens taken from a token stream at the given start offsets.

    `skip[i]` targets at the start of block i are masked (the short final block's, which the block
    before it already predicts); None: none are.
    """

    tokens: np.ndarray
    starts: np.ndarray
    block_size: int
    skip: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def targets(self) -> int:
        """Targets over all blocks (each token of the stream once)."""
        return len(self) * self.block_size - (int(self.skip.sum()) if self.skip is not None else 0)

    def read(self, which: np.ndarray) -> np.ndarray:
        """The blocks numbered `which`, as an int64 array of shape (len(which), block_size + 1)."""
        offsets = self.starts[which][:, None] + np.arange(self.block_size + 1)
        blocks: np.ndarray = self.tokens[offsets].astype(np.int64)
        return blocks

    def batch(self, which: np.ndarray) -> Batch:
        """Inputs and next-token labels of the blocks numbered `which`."""
        tokens = self.read(which)
        labels = tokens[:, 1:].copy()
        if self.skip is not None:
            labels[np.arange(self.block_size) < self.skip[which][:, None]] = IGNORE
        return Batch(tokens[:, :-1], labels)

    def subset(self, keep: np.ndarray) -> Blocks:
        """The blocks where the boolean `keep` is true."""
        return Blocks(
            self.tokens, self.starts[keep], self.block_size, None if self.skip is None else self.skip[keep]
        )


@dataclass
class TokenCache:
    """Where the token ids of a run live (OUTDIR/data) and what they were made from."""

    folder: Path
    fingerprint: str
    dtype: str
    train_tokens: int
    val_tokens: int
    documents: int
    reused: bool

    def open(self, split: str) -> np.ndarray:
        """The ids of `split` ('train' or 'val') as a read-only memmap."""
        count = self.train_tokens if split == "train" else self.val_tokens
        if count == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.folder / f"{split}.bin", dtype=self.dtype, mode="r", shape=(count,))


# ---- reading ---------------------------------------------------------------------------------------


def _read_bytes(path: str, stdin: bytes | None) -> bytes:
    if path == "-":
        if stdin is None:
            raise UsageError("'-' given as data but nothing was read from stdin")
        return stdin
    try:
        return Path(path).expanduser().read_bytes()
    except IsADirectoryError as exc:
        raise UsageError(f"{path} is a directory: pass the .txt or .jsonl files in it") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path, which no file name holds
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def check_inputs(paths: Iterable[str]) -> None:
    """Refuse inputs that cannot be read (missing, a folder, no permission) before a run creates
    anything: the same errors `read_documents` would raise later."""
    for path in paths:
        if path == "-":
            continue
        try:
            with open(Path(path).expanduser(), "rb"):
                pass
        except IsADirectoryError:
            raise UsageError(f"{path} is a directory: pass the .txt or .jsonl files in it") from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path, which no file name holds
            raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def read_stdin_bytes() -> bytes:
    """All of stdin; refuses a terminal, where nothing was piped."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("'-' means read the text from stdin, but nothing is piped into it")
    return sys.stdin.buffer.read()


def read_documents(
    paths: Iterable[str], text_field: str = "text", stdin: bytes | None = None
) -> Iterator[str]:
    """Yield the documents of every input in order: a .txt file or stdin whole, a .jsonl file per line.

    Raises UsageError naming the file and byte offset of invalid UTF-8, and the line of bad JSON.
    """
    for path in paths:
        data = _read_bytes(path, stdin)
        where = "stdin" if path == "-" else path
        if not path.lower().endswith(".jsonl"):
            yield decode_utf8(data, where)
            continue
        offset = 0
        for number, line in enumerate(data.split(b"\n"), 1):
            text = decode_utf8(line, where, offset=offset)
            offset += len(line) + 1
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where} line {number} is not valid JSON: {exc.msg}") from exc
            value = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise UsageError(f"{where} line {number} {_not_text(record, text_field)}")
            yield value


def _json_type(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _not_text(record: object, field: str) -> str:
    """Why a JSONL line gives no text: not an object, no such field, or a field that is not a string."""
    if not isinstance(record, dict):
        return f"is {_json_type(record)}, not an object with a {field!r} field"
    if field not in record:
        fields = ", ".join(map(repr, list(record)[:8])) or "none"
        if "prompt" in record or "completion" in record:  # half an instruction record, not text
            return f'has {fields}: instruction data needs both "prompt" and "completion" (or "messages")'
        return f"has no field {field!r} (its fields: {fields}; use --text-field NAME)"
    return f"has {_json_type(record[field])} in field {field!r}, not a string"


def split_document(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at least `piece_chars` characters, only at newlines between words."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = _SAFE_CUT.search(text, start + piece_chars)
        if cut is None:
            break
        pieces.append(text[start : cut.end()])
        start = cut.end()
    pieces.append(text[start:])
    return pieces


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # No special tokens: BERT-style tokenizers would wrap every piece in [CLS] ... [SEP].
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)[
        "input_ids"
    ]
    return ids


def splits_exactly(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenizing pieces cut by `split_document` gives the ids of the whole (true for GPT-2's BPE)."""
    pieces = split_document(_PROBE, piece_chars=1)
    whole = _encode(tokenizer, [_PROBE])[0]
    return len(pieces) > 1 and whole == list(itertools.chain.from_iterable(_encode(tokenizer, pieces)))


# ---- tokenizing into the cache -----------------------------------------------------------------------


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenize_to_file(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    eos_id: int,
    path: Path,
    dtype: str,
    piece_chars: int = PIECE_CHARS,
) -> tuple[int, int]:
    """Tokenize `documents` in batches, an EOS after each, appending the ids to `path`.

    Returns (tokens written, non-empty documents).
    """
    exact = splits_exactly(tokenizer)
    tokens = documents_seen = 0
    batch: list[str] = []
    ends: list[bool] = []  # whether batch[i] is the last piece of its document
    size = 0

    def flush(out: Any) -> int:
        ids = _encode(tokenizer, batch)
        flat = itertools.chain.from_iterable(
            itertools.chain(piece, [eos_id]) if end else piece for piece, end in zip(ids, ends, strict=True)
        )
        array = np.fromiter(flat, dtype=np.int64)
        if len(array) and array.max() > np.iinfo(dtype).max:
            raise GptcliError(f"token id {array.max()} does not fit the cache's {dtype}")
        out.write(array.astype(dtype).tobytes())  # not tofile(): its errors do not say why (a full disk)
        batch.clear()
        ends.clear()
        return len(array)

    with open(path, "wb") as out:
        for document in documents:
            if not document:
                continue
            documents_seen += 1
            pieces = split_document(document, piece_chars) if exact else [document]
            for number, piece in enumerate(pieces, 1):
                batch.append(piece)
                ends.append(number == len(pieces))
                size += len(piece)
            if size >= BATCH_CHARS or len(batch) >= 1024:
                tokens += flush(out)
                size = 0
        if batch:
            tokens += flush(out)
        out.flush()
        os.fsync(out.fileno())
    return tokens, documents_seen


def _input_stamp(path: str, stdin: bytes | None) -> Any:
    if path == "-":
        return ["-", hashlib.sha256(stdin or b"").hexdigest()]
    try:
        stat = Path(path).expanduser().stat()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    # Size and modification time, as make and rsync do: hashing gigabytes on every resume costs minutes.
    return [str(Path(path).expanduser().resolve()), stat.st_size, stat.st_mtime_ns]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def prepare_tokens(
    train_paths: list[str],
    val_paths: list[str],
    tokenizer: PreTrainedTokenizerBase,
    eos_id: int,
    folder: Path,
    *,
    text_field: str = "text",
) -> TokenCache:
    """Tokenize the inputs into `folder` (train.bin, val.bin, meta.json), or reuse what is there.

    The cache is reused only when the inputs (path, size, mtime; stdin by content), the text field, the
    tokenizer and the EOS id are all the same; otherwise it is rebuilt.
    """
    if not train_paths:
        raise UsageError("no training data: pass one or more .txt/.jsonl files, or '-' for stdin")
    if (train_paths + val_paths).count("-") > 1:
        raise UsageError("stdin ('-') can be read only once")
    stdin = read_stdin_bytes() if "-" in train_paths + val_paths else None
    dtype = token_dtype(len(tokenizer))
    recipe = {
        "format": CACHE_FORMAT,
        "train": [_input_stamp(p, stdin) for p in train_paths],
        "val": [_input_stamp(p, stdin) for p in val_paths],
        "text_field": text_field,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos": eos_id,
        "dtype": dtype,
    }
    fingerprint = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    cached = _read_meta(folder, fingerprint)
    if cached is not None:
        return cached

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # the old bins are about to change under it
    counts = {}
    documents = 0
    for split, paths in (("train", train_paths), ("val", val_paths)):
        temp = temp_path(folder / f"{split}.bin")
        docs = read_documents(paths, text_field, stdin)
        try:
            counts[split], found = tokenize_to_file(docs, tokenizer, eos_id, temp, dtype)
        except OSError as exc:  # a full disk: the cache is about 2 bytes a token
            temp.unlink(missing_ok=True)
            raise GptcliError(
                f"could not write the token cache {temp.parent} ({exc.strerror or exc})"
            ) from exc
        documents += found
        if counts[split] == 0 and (split == "train" or paths):
            temp.unlink()
            names = ", ".join("stdin" if p == "-" else p for p in paths)
            which = "training" if split == "train" else "validation (--val)"
            raise UsageError(f"no text in the {which} data: {names} holds no documents")
        move_into_place(temp, folder / f"{split}.bin")
    meta = {
        "fingerprint": fingerprint,
        "dtype": dtype,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": documents,
        "recipe": recipe,
    }
    atomic_write_json(folder / "meta.json", meta)
    return TokenCache(folder, fingerprint, dtype, counts["train"], counts["val"], documents, reused=False)


def _read_meta(folder: Path, fingerprint: str) -> TokenCache | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint:
            return None
        itemsize = 2 if meta["dtype"] == "uint16" else 4
        for split in ("train", "val"):
            size = (folder / f"{split}.bin").stat().st_size
            if size != meta[f"{split}_tokens"] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenCache(
        folder,
        fingerprint,
        meta["dtype"],
        meta["train_tokens"],
        meta["val_tokens"],
        meta["documents"],
        reused=True,
    )


# ---- blocks, validation split, batch order --------------------------------------------------------


def make_blocks(tokens: np.ndarray, block_size: int, what: str) -> Blocks:
    """All whole blocks of `tokens`, and a short final one for the tokens left over; refuses (rather
    than pads) data shorter than one block."""
    count = (len(tokens) - 1) // block_size
    if count < 1:
        raise UsageError(
            f"the {what} data has {len(tokens)} tokens, fewer than one block of {block_size} + 1: "
            f"refusing to pad it; pass --block-size {max(len(tokens) - 1, 1)} or less, or more text"
        )
    starts = np.arange(count, dtype=np.int64) * block_size
    left_over = len(tokens) - 1 - count * block_size
    if not left_over:
        return Blocks(tokens, starts, block_size)
    # The final block ends at the last token; its first targets are the previous block's last ones.
    tail = len(tokens) - 1 - block_size
    skip = np.zeros(count + 1, dtype=np.int64)
    skip[-1] = block_size - left_over
    return Blocks(tokens, np.append(starts, tail), block_size, skip)


def split_validation(blocks: Blocks, fraction: float) -> tuple[Blocks, Blocks | None]:
    """Set aside every 1/fraction-th block for validation, spread over the whole corpus.

    Spreading the held-out blocks keeps them representative when files differ (a tail split would hold
    out only the last file). Returns (train, val); val is None when too little data for one block.
    """
    is_val = held_out(len(blocks), fraction)
    if blocks.skip is not None:
        is_val &= blocks.skip == 0  # the short final block overlaps the one before: it trains
    if not is_val.any():
        return blocks, None
    if is_val.all():
        raise UsageError(f"--val-split {fraction} leaves no training data")
    return blocks.subset(~is_val), blocks.subset(is_val)


def held_out(count: int, fraction: float) -> np.ndarray:
    """Which of `count` items a validation split of `fraction` holds out: every 1/fraction-th."""
    index = np.arange(count)
    chosen: np.ndarray = np.floor((index + 1) * fraction) > np.floor(index * fraction)
    return chosen


class BatchOrder:
    """Which training block is sample number i: every epoch a fresh shuffle, fixed by seed and epoch.

    The order depends only on (seed, number of blocks), never on the number of processes, so a run can
    resume from a sample count and N processes can split every global batch among themselves.
    """

    def __init__(self, blocks: int, seed: int) -> None:
        self.blocks = blocks
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.blocks)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Block numbers of samples start, start+1, ..., start+count-1."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, pos = divmod(start + i, self.blocks)
            out[i] = self._permutation(epoch)[pos]
        return out


def shard_start(samples_seen: int, micro_step: int, rank: int, world: int, batch_size: int) -> int:
    """First sample of what `rank` reads at `micro_step` of the global batch that starts at `samples_seen`.

    A global batch is laid out as [micro_step][rank][batch_size], so micro-step k of N processes covers
    exactly the samples of micro-step k of one process with N times the batch size.
    """
    return samples_seen + (micro_step * world + rank) * batch_size
