"""Instruction and chat data: JSONL examples -> token ids with the loss on the answers -> batches.

A line is `{"prompt": ..., "completion": ...}` or `{"messages": [{"role": ..., "content": ...}, ...]}`.
Messages are rendered with the tokenizer's chat template when it has one; otherwise (GPT-2 has none)
with this plain default, which is also how to prompt the trained model:

    System: {content}\\n        (a system message, if any)
    User: {content}\\n
    Assistant: {content}<eos>\\n
    User: ...                   (the next turn, if any)

`gptcli serve`'s chat transcript for models without a template (gptcli.serving.chat) is the same text
without the EOS tokens.

Labels: only the answer tokens (the completion, or each assistant message, and the EOS after it) are
targets, unless `train_on_prompt`. A prompt and its completion are tokenized apart and joined, so the
boundary is exactly where the user put it (write the completion with its leading space, " Paris").

Batches: packed (several examples in a row of `block_size` positions, each example its own attention
segment with positions from 0, so it sees exactly what it would alone), or one example a row, padded on
the right to the longest row of its batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gptcli.errors import UsageError
from gptcli.textio import decode_utf8
from gptcli.training.data import IGNORE, Batch, held_out

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def is_instruction_file(path: str, text_field: str = "text") -> bool:
    """Whether `path` is instruction data: a .jsonl file whose first record has prompt and completion,
    or messages (and not the text field)."""
    if path == "-" or not path.lower().endswith(".jsonl"):
        return False
    try:
        with open(Path(path).expanduser(), "rb") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    break
            else:
                return False
    except (OSError, ValueError):
        return False  # the text reader gives the error, with the line number
    if not isinstance(record, dict) or text_field in record:
        return False
    return "messages" in record or ("prompt" in record and "completion" in record)


def read_examples(paths: Iterable[str]) -> list[Any]:
    """The records of instruction JSONL files, in order; refuses a line that is not one."""
    records = []
    for path in paths:
        try:
            data = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        offset = 0
        for number, line in enumerate(data.split(b"\n"), 1):
            text = decode_utf8(line, path, offset=offset)
            offset += len(line) + 1
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path} line {number} is not valid JSON: {exc.msg}") from exc
            problem = _problem(record)
            if problem:
                raise UsageError(f"{path} line {number}: {problem}")
            records.append(record)
    if not records:
        raise UsageError(f"no examples in {', '.join(paths)}")
    return records


def _problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "expected a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list"
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES):
                return 'each message needs a "role" (system, user or assistant) and a string "content"'
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message: nothing to learn"
        return None
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return None
    return 'expected {"prompt": str, "completion": str} or {"messages": [...]}'


def encode_example(
    record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, eos: int, train_on_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """The token ids of one example and, per id, whether it is a target (an answer token)."""
    if "messages" in record:
        if getattr(tokenizer, "chat_template", None):
            ids, answer = _templated(record["messages"], tokenizer)
        else:
            ids, answer = _plain(record["messages"], tokenizer, eos)
    else:
        prompt, completion = _ids(tokenizer, record["prompt"]), _ids(tokenizer, record["completion"])
        ids, answer = prompt + completion + [eos], [False] * len(prompt) + [True] * (len(completion) + 1)
    return ids, [True] * len(ids) if train_on_prompt else answer


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _plain(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, eos: int
) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    answer: list[bool] = []
    newline = ""  # after an answer's EOS, the next line starts (as in `gptcli serve`'s transcript)
    for m in messages:
        if m["role"] == "assistant":
            head, body = _ids(tokenizer, newline + "Assistant:"), [*_ids(tokenizer, " " + m["content"]), eos]
            newline = "\n"
        else:
            head, body = _ids(tokenizer, f"{newline}{ROLES[m['role']]}: {m['content']}\n"), []
            newline = ""
        ids += head + body
        answer += [False] * len(head) + [True] * len(body)
    return ids, answer


def _templated(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[bool]]:
    """The chat template's text, tokenized whole; answer tokens found by character offsets: each
    assistant message is what its turn adds after the generation prompt."""
    whole = str(tokenizer.apply_chat_template(messages, tokenize=False))
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if (
            isinstance(before, str)
            and isinstance(upto, str)
            and whole.startswith(upto)
            and upto.startswith(before)
        ):
            spans.append((len(before), len(upto)))
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    answer = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    return ids, answer


@dataclass
class Examples:
    """Tokenized examples as training rows: packed (several a row) or padded (one a row).

    Each example of n tokens gives n - 1 positions: inputs ids[:-1], labels ids[1:] (IGNORE where the
    target is not an answer token).
    """

    inputs: list[np.ndarray]
    labels: list[np.ndarray]
    block_size: int
    pack: bool
    rows: list[list[int]] = field(default_factory=list)
    """The examples in each row, in order."""
    truncated: int = 0

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = (
                pack_rows([len(x) for x in self.inputs], self.block_size)
                if self.pack
                else [[i] for i in range(len(self.inputs))]
            )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def examples(self) -> list[int]:
        """The examples of these rows."""
        return [e for row in self.rows for e in row]

    @property
    def tokens(self) -> int:
        """Input positions over all rows (padding not counted)."""
        return sum(len(self.inputs[e]) for e in self.examples)

    @property
    def targets(self) -> int:
        """Positions that count in the loss over all rows."""
        return sum(int(np.count_nonzero(self.labels[e] != IGNORE)) for e in self.examples)

    def subset(self, keep: np.ndarray) -> Examples:
        """The rows where the boolean `keep` is true."""
        rows = [row for row, k in zip(self.rows, keep, strict=True) if k]
        return Examples(self.inputs, self.labels, self.block_size, self.pack, rows, self.truncated)

    def batch(self, which: np.ndarray) -> Batch:
        rows = [self.rows[i] for i in which]
        width = self.block_size if self.pack else max(sum(len(self.inputs[e]) for e in row) for row in rows)
        inputs = np.zeros((len(rows), width), dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        segments = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            at = 0
            for number, e in enumerate(row, 1):
                n = len(self.inputs[e])
                inputs[r, at : at + n] = self.inputs[e]
                labels[r, at : at + n] = self.labels[e]
                segments[r, at : at + n] = number
                at += n
            segments[r, at:] = len(row) + 1  # padding: a segment of its own, which no example sees
        padding = inputs.size - sum(len(self.inputs[e]) for row in rows for e in row)
        if self.pack:
            return Batch(inputs, labels, segments=segments, padding=padding)
        return Batch(inputs, labels, attention=(segments <= 1).astype(np.int64), padding=padding)


def pack_rows(lengths: list[int], block_size: int) -> list[list[int]]:
    """Examples in order into rows of at most `block_size` positions, greedily (a new row when the next
    example does not fit)."""
    rows: list[list[int]] = []
    used = block_size
    for i, n in enumerate(lengths):
        if used + n > block_size:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def make_examples(
    records: list[Any],
    tokenizer: PreTrainedTokenizerBase,
    eos: int,
    block_size: int,
    *,
    pack: bool,
    train_on_prompt: bool = False,
) -> Examples:
    """Tokenize `records`; an example longer than block_size + 1 tokens keeps its first block_size + 1."""
    inputs, labels, truncated = [], [], 0
    for record in records:
        ids, answer = encode_example(record, tokenizer, eos, train_on_prompt)
        if len(ids) > block_size + 1:
            ids, answer, truncated = ids[: block_size + 1], answer[: block_size + 1], truncated + 1
        if len(ids) < 2:
            continue
        array = np.asarray(ids, dtype=np.int64)
        inputs.append(array[:-1])
        labels.append(np.where(np.asarray(answer[1:]), array[1:], IGNORE))
    if not inputs:
        raise UsageError("every example is shorter than two tokens: nothing to learn")
    return Examples(inputs, labels, block_size, pack, truncated=truncated)


def split_examples(data: Examples, fraction: float) -> tuple[Examples, Examples | None]:
    """Hold out every 1/fraction-th row for validation (as split_validation does for text blocks)."""
    is_val = held_out(len(data), fraction)
    if not is_val.any():
        return data, None
    if is_val.all():
        raise UsageError(f"--val-split {fraction} leaves no training data")
    return data.subset(~is_val), data.subset(is_val)
