"""Prompts as batches: cut to the context, padded on the left, with positions that ignore the padding.

Every batched path (topk --each-line, complete --each-line, the server's shared decode) builds its
batches here, so a padded row computes exactly what it computes alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gptcli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import Tokenizer


def check_batch_size(batch_size: int) -> None:
    """Refuse a --batch-size below 1."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")


def fit_context(ids: list[int], limit: int) -> tuple[list[int], int]:
    """Keep the last `limit` ids; return them and how many were dropped from the left."""
    if len(ids) <= limit:
        return ids, 0
    return ids[-limit:], len(ids) - limit


def pad_id(tokenizer: Tokenizer) -> int:
    """The id used for padding; masked out, so any valid id works (GPT-2 has no pad token)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def left_pad(
    rows: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch rows of ids with padding on the left: (input_ids, attention_mask, position_ids).

    Left padding puts every row's last real token in the last column, where the next token is read.
    Positions count real tokens only, so a padded row sees the same positions as when it runs alone.
    """
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)
