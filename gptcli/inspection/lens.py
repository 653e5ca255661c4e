"""The logit lens: what the model would predict if it stopped after each layer.

For each point of the residual stream (the embeddings, then the output of every block, optionally also
the point after each block's attention) and each chosen prompt position, the vector goes through the
model's own final LayerNorm and output layer and a float32 softmax (nostalgebraist, "interpreting GPT:
the logit lens", 2020). The last block's row is the model's real next-token distribution.

Only the top k of each cell is kept: 13 × 1,024 × 50,257 float32 logits would be 2.7 GB, so the
vectors go through the output layer a few positions at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError
from gptcli.generation.tokens import TokenText
from gptcli.inspection.predict import check_k
from gptcli.inspection.tracing import Prompt, check_mid_points, encode, final_logits, run

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import TokenInfo
    from gptcli.inspection.pictures import Grid
    from gptcli.loading.models import LoadedModel

# Stream vectors decoded per output-layer call: 64 × 50,257 float32 logits are 13 MB.
CHUNK = 64
_POSITION_ITEM = re.compile(r"^\s*(-?\d+)?\s*(:)?\s*(-?\d+)?\s*$")


def check_lens_options(*, k: int = 5, positions: str | None = None, at: int | None = None) -> None:
    """Refuse a -k, --positions or --at that cannot work (before a model loads, too)."""
    check_k(k)
    if positions is not None:
        parse_positions(positions, None)
        if at is not None:
            raise UsageError("--at shows one position; do not pass --positions too")


def parse_positions(spec: str, count: int | None, what: str = "--positions") -> list[int]:
    """Positions named by `spec`: "all", or comma-separated indices and START:END ranges (END excluded,
    negative numbers count from the end, as Python's slices), e.g. "0,3", "-8:", "2:10".

    `count` None checks the syntax only (and returns []).
    """
    items = [item for item in spec.split(",")]
    if spec.strip().lower() == "all":
        return [] if count is None else list(range(count))
    chosen: list[int] = []
    for item in items:
        match = _POSITION_ITEM.match(item)
        if not match or not (match.group(1) or match.group(2) or match.group(3)):
            raise UsageError(
                f"{what} {spec!r}: expected 'all', positions such as 0,3,-1, or ranges such as 2:10 or -8:"
            )
        if match.group(2) is None and match.group(3) is not None:  # "5 7" and the like
            raise UsageError(f"{what} {spec!r}: separate positions with commas")
        if count is None:
            continue
        start, colon, end = match.groups()
        if colon is None:
            index = int(start)
            if not -count <= index < count:
                raise UsageError(
                    f"{what} {index} is out of range: the prompt has {count} tokens (0 to {count - 1})"
                )
            chosen.append(index % count)
        else:
            chosen.extend(
                range(count)[slice(None if start is None else int(start), None if end is None else int(end))]
            )
    if count is not None and not chosen:
        raise UsageError(f"{what} {spec!r} names no position of the {count} tokens")
    return sorted(set(chosen))


@dataclass
class Row:
    """One point of the residual stream: `layer` 0 is the embeddings, L the output of block L, or with
    point "attention" the stream after block L's attention (before its MLP)."""

    layer: int
    point: str  # "embeddings", "attention" or "block"
    top: list[list[dict[str, Any]]]  # per position: [{"id", "token", "bytes", "prob", "logprob"}] best first
    target: list[dict[str, Any]] | None = None  # per position: {"id", "token", "rank", "prob", "logprob"}

    @property
    def name(self) -> str:
        """ "embeddings", "L" or "L attn": the row's heading in heat maps."""
        return self.point if self.point == "embeddings" else self.label.replace(".", " ")

    @property
    def label(self) -> str:
        """ "0" (embeddings), "L", or "L.attn": the layer column of the TSV output."""
        return f"{self.layer}.attn" if self.point == "attention" else str(self.layer)


@dataclass
class Lens:
    """The logit lens of one prompt: a row per point of the stream, a cell per chosen position."""

    prompt: Prompt
    positions: list[int]  # indices into prompt.tokens; position P is the prediction after token P
    rows: list[Row] = field(default_factory=list)
    target: TokenInfo | None = None  # the --token
    target_pieces: int = 1  # how many tokens --token's text encodes to (only the first is followed)

    def next_id(self, position: int) -> int | None:
        """The prompt's actual next token after `position` (None after the last one)."""
        ids = self.prompt.ids
        return ids[position + 1] if position + 1 < len(ids) else None

    def to_json(self, model: str) -> dict[str, Any]:
        layers = []
        for row in self.rows:
            entry: dict[str, Any] = {"layer": row.layer}
            if row.point == "attention":
                entry["point"] = "attention"
            entry["positions"] = []
            for i, position in enumerate(self.positions):
                cell: dict[str, Any] = {"position": position, "top": row.top[i]}
                if row.target is not None:
                    cell["target"] = row.target[i]
                entry["positions"].append(cell)
            layers.append(entry)
        return {"model": model, "prompt": self.prompt.text, "tokens": self.prompt.tokens, "layers": layers}


def target_token(lm: LoadedModel, text: str) -> tuple[int, int]:
    """(the first token id of `text`, how many tokens it encodes to) for --token."""
    ids = lm.tokenizer.encode(text, add_special_tokens=False) if text else []
    if not ids:
        raise UsageError(f"--token {text!r} encodes to no token")
    return int(ids[0]), len(ids)


def logit_lens(
    lm: LoadedModel,
    text: str,
    *,
    positions: str | Sequence[int] | None = None,
    at: int | None = None,
    k: int = 5,
    sublayer: bool = False,
    token: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Lens:
    """Top-k next tokens at every layer and chosen position of `text` (see the module's docstring).

    Args:
        positions: a --positions spec, or indices (negative from the end); None: every position.
        at: one position (negative from the end), instead of `positions`.
        sublayer: also the point after each block's attention, before its MLP.
        token: also the rank and probability of this text's first token in every cell.
        on_progress: called with (points decoded, points) as each point of the stream is decoded.
    """
    import torch

    check_lens_options(k=k, at=at, positions=positions if isinstance(positions, str) else None)
    if sublayer:
        check_mid_points(lm)
    prompt = encode(lm, text)
    count = len(prompt.ids)
    if at is not None:
        chosen = parse_positions(str(at), count, "--at")
    elif positions is None:
        chosen = list(range(count))
    elif isinstance(positions, str):
        chosen = parse_positions(positions, count)
    else:
        chosen = parse_positions(",".join(map(str, positions)), count)
    lens = Lens(prompt, chosen)
    target_id = None
    if token is not None:
        target_id, lens.target_pieces = target_token(lm, token)
        lens.target = TokenText(lm.tokenizer).describe(target_id)
    k = min(k, lm.config.vocab_size)
    decode = final_logits(lm)
    index = torch.tensor(chosen, device=lm.device)
    results: list[tuple[int, str, Any, Any, Any]] = []

    def on_point(layer: int, point: str, x: torch.Tensor) -> None:
        if point == "attention" and not sublayer:
            return
        vectors = x[0, index]
        values, ids, chosen_lp, ranks = [], [], [], []
        for start in range(0, len(chosen), CHUNK):
            logprobs = torch.log_softmax(decode(vectors[start : start + CHUNK]), dim=-1)
            top = torch.topk(logprobs, k, dim=-1)
            values.append(top.values.cpu())
            ids.append(top.indices.cpu())
            if target_id is not None:
                lp = logprobs[:, target_id]
                chosen_lp.append(lp.cpu())
                ranks.append(((logprobs > lp[:, None]).sum(dim=-1) + 1).cpu())
        target = (torch.cat(chosen_lp), torch.cat(ranks)) if target_id is not None else None
        results.append((layer, point, torch.cat(values), torch.cat(ids), target))
        if on_progress is not None:
            layers = lm.config.num_hidden_layers
            on_progress(len(results), layers + 1 + (layers if sublayer else 0))

    run(lm, prompt.ids, on_point)
    names = TokenText(lm.tokenizer)
    for layer, point, values, ids, target in results:
        top = [
            [
                {**names.describe(tid), "prob": math.exp(lp), "logprob": lp}
                for lp, tid in zip(lps, tids, strict=True)
            ]
            for lps, tids in zip(values.tolist(), ids.tolist(), strict=True)
        ]
        row = Row(layer, point, top)
        if target is not None and lens.target is not None:
            row.target = [
                {
                    "id": lens.target["id"],
                    "token": lens.target["token"],
                    "rank": rank,
                    "prob": math.exp(lp),
                    "logprob": lp,
                }
                for lp, rank in zip(target[0].tolist(), target[1].tolist(), strict=True)
            ]
        lens.rows.append(row)
    return lens


def lens_grid(lens: Lens, positions: Sequence[int] | None = None) -> Grid:
    """The heat map of a lens: rows = points of the stream (embeddings on top), columns = positions
    headed by their token, each cell the top-1 next token shaded by its probability, outlined where
    it is the prompt's actual next token. `positions`: some of the lens's positions (default all)."""
    from gptcli.inspection.pictures import Grid, visible

    keep = [lens.positions.index(p) for p in (lens.positions if positions is None else positions)]
    shown = [lens.positions[i] for i in keep]
    columns = [visible(lens.prompt.tokens[p]["token"]) for p in shown]
    rows, values, texts, details, marks = [], [], [], [], []
    for full in lens.rows:
        row = Row(
            full.layer,
            full.point,
            [full.top[i] for i in keep],
            None if full.target is None else [full.target[i] for i in keep],
        )
        rows.append(row.name)
        values.append([cell[0]["prob"] for cell in row.top])
        texts.append([visible(cell[0]["token"]) for cell in row.top])
        marks.append([cell[0]["id"] == lens.next_id(p) for cell, p in zip(row.top, shown, strict=True)])
        tips = []
        for i, cell in enumerate(row.top):
            lines = [f"{n}. {t['token']!r:<14} {t['prob']:7.2%}" for n, t in enumerate(cell, 1)]
            if row.target is not None:
                t = row.target[i]
                lines.append(f"{t['token']!r}: rank {t['rank']}, {t['prob']:.2%}")
            tips.append("\n".join(lines))
        details.append(tips)
    return Grid(
        title="logit lens: the most likely next token after each layer",
        rows=rows,
        columns=columns,
        values=values,
        texts=texts,
        details=details,
        marks=marks,
        palette="blue",
        caption="shade: the probability of the token shown",
        mark_meaning="the prompt's actual next token",
        row_title="layer",
    )
