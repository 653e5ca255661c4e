"""Attention weights: how much each query position draws on each earlier position, per block and head.

The weights are softmax(q kᵀ / sqrt(head_dim)) over the keys up to the query, as transformers' eager
attention computes them (gptcli.inspection.tracing), kept only for the query rows asked for. Attention rollout
(Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020) multiplies the head-averaged
weights, with the residual connection added as (A + I) / 2, through the layers: a heuristic for how
much each input token reaches the top layer's position, not a measurement.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError
from gptcli.inspection.lens import parse_positions
from gptcli.inspection.tracing import Prompt, encode, num_heads, num_layers, run

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gptcli.inspection.pictures import Grid
    from gptcli.loading.models import LoadedModel

_HEAD = re.compile(r"^\s*(\d+)\s*\.\s*(\d+)\s*$")


def parse_head(spec: str) -> tuple[int, int]:
    """--head L.H: (block L, 1-based as in `lens`, head H, 0-based as transformers indexes heads)."""
    match = _HEAD.match(spec)
    if not match:
        raise UsageError(f"--head {spec!r}: expected LAYER.HEAD, e.g. 5.1 (block 5, head 1)")
    return int(match.group(1)), int(match.group(2))


def check_attention_options(
    *, layer: int | None = None, head: str | None = None, query: str | None = None, rollout: bool = False
) -> None:
    """Refuse options that cannot work together or cannot be read (before a model loads, too)."""
    if head is not None:
        parse_head(head)
        if layer is not None:
            raise UsageError("--head LAYER.HEAD names its layer; do not pass --layer too")
    if rollout and (layer is not None or head is not None):
        raise UsageError("--rollout combines every layer and head; it takes no --layer or --head")
    if query is not None:
        parse_positions(query, None, "--query")


def check_layer_head(lm: LoadedModel, layer: int | None, head: tuple[int, int] | None) -> None:
    """Refuse a block or head the model does not have."""
    layers, heads = num_layers(lm), num_heads(lm)
    chosen = head[0] if head is not None else layer
    if chosen is not None and not 1 <= chosen <= layers:
        raise UsageError(f"block {chosen} does not exist: the model has blocks 1 to {layers}")
    if head is not None and not 0 <= head[1] < heads:
        raise UsageError(f"head {head[1]} does not exist: block {head[0]} has heads 0 to {heads - 1}")


@dataclass
class Attention:
    """Attention weights of one prompt for some query positions."""

    prompt: Prompt
    queries: list[int]  # positions whose attention rows were kept
    weights: np.ndarray  # [layers, heads, len(queries), positions] float32; 0 for keys after the query
    rollout: np.ndarray | None = None  # [len(queries), positions] float64

    def to_json(self, model: str) -> dict[str, Any]:
        out = {**self.to_json_head(model), "attention": self.weights.tolist()}
        if self.rollout is not None:
            out["rollout"] = self.rollout.tolist()
        return out

    def json_pieces(self, model: str) -> Iterator[str]:
        """`to_json` as JSON text, in pieces: for --query all on 1,024 tokens the weights are 150 million
        numbers, several GB as Python lists, 600 MB as the array they stay in here."""
        yield json.dumps(self.to_json_head(model), ensure_ascii=False)[:-1] + ', "attention": ['
        for number, layer in enumerate(self.weights):
            yield (", " if number else "") + "["
            yield ", ".join(json.dumps(head.tolist()) for head in layer)
            yield "]"
        yield "]"
        if self.rollout is not None:
            yield ', "rollout": ' + json.dumps(self.rollout.tolist())
        yield "}\n"

    def to_json_head(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": self.prompt.text,
            "tokens": self.prompt.tokens,
            "queries": self.queries,
        }


def attention_weights(
    lm: LoadedModel, text: str, *, queries: str | list[int] | None = None, rollout: bool = False
) -> Attention:
    """The attention weights of every block and head for the query positions of `text`.

    Args:
        queries: a --query spec ("all", "-1", "3,5", "2:8"), or indices; None: the last position, the
            one that predicts the next token.
        rollout: also attention rollout for those queries (it needs every row up to the last query).
    """
    import numpy as np
    import torch

    prompt = encode(lm, text)
    count = len(prompt.ids)
    if queries is None:
        chosen = [count - 1]
    elif isinstance(queries, str):
        chosen = parse_positions(queries, count, "--query")
    else:
        chosen = parse_positions(",".join(map(str, queries)), count, "--query")
    # Rollout multiplies whole (causal) matrices, but only up to the last query's row and column.
    rows = list(range(max(chosen) + 1)) if rollout else chosen
    picked: list[torch.Tensor] = []
    means: list[torch.Tensor] = []

    def on_attention(layer: int, weights: torch.Tensor) -> None:
        if rollout:
            means.append(weights[0, :, :, : len(rows)].mean(dim=0).double().cpu())
            picked.append(weights[0, :, chosen].cpu())
        else:
            picked.append(weights[0].cpu())

    run(lm, prompt.ids, lambda *_: None, on_attention=on_attention, attention_rows=rows)
    result = Attention(prompt, chosen, torch.stack(picked).numpy())
    if rollout:
        result.rollout = np.zeros((len(chosen), count))
        result.rollout[:, : len(rows)] = attention_rollout(torch.stack(means).numpy())[chosen]
    return result


def attention_rollout(means: np.ndarray) -> np.ndarray:
    """Rollout of head-averaged weights [layers, positions, positions]: Â = (A + I) / 2 with rows
    renormalised, multiplied from the first layer up (Abnar & Zuidema 2020). Row i: how much each
    input position reaches position i at the top layer, by this heuristic."""
    import numpy as np

    eye = np.eye(means.shape[-1])
    joint = eye
    for mean in means:
        mixed = (mean + eye) / 2
        mixed = mixed / mixed.sum(axis=-1, keepdims=True)
        joint = mixed @ joint
    return joint


def attention_grids(
    result: Attention,
    *,
    layer: int | None = None,
    head: tuple[int, int] | None = None,
    rollout: bool = False,
    hide_sink: bool = False,
) -> list[Grid]:
    """The heat maps of one view: rows are blocks (default), the heads of `layer`, the queries (several
    queries, `head`, or rollout); columns are the keys; cells show the weight in percent.

    `hide_sink`: the first token's column is left out of the shading, which then spans the other
    weights (GPT-2 parks much of its attention on the first token).
    """
    from gptcli.inspection.pictures import Grid, visible

    tokens = [visible(t["token"]) for t in result.prompt.tokens]
    width = max(result.queries) + 1  # no query looks further
    columns = tokens[:width]
    layers, heads = result.weights.shape[:2]

    def grid(
        title: str,
        rows: list[str],
        matrix: list[list[float]],
        queries: list[int],
        what: list[str],
        row_title: str = "query",
    ) -> Grid:
        values: list[list[float | None]] = [
            [float(w) if j <= q else None for j, w in enumerate(line[:width])]
            for line, q in zip(matrix, queries, strict=True)
        ]
        return Grid(
            title=title,
            rows=rows,
            columns=columns,
            values=values,
            texts=[["" if w is None else f"{100 * w:.0f}" for w in line] for line in values],
            details=[
                [
                    "" if w is None else f"{name}\n{q} {tokens[q]!r} → {j} {tokens[j]!r}\n{w:.4f}"
                    for j, w in enumerate(line)
                ]
                for line, q, name in zip(values, queries, what, strict=True)
            ],
            palette="orange",
            dim_columns=(0,) if hide_sink else (),
            caption="weights in percent; each row sums to 100"
            + ("; the first token is left out of the shading" if hide_sink else ""),
            row_title=row_title,
        )

    def query_label(q: int) -> str:
        return f"{q} {tokens[q]}"

    qs = result.queries
    if rollout:
        assert result.rollout is not None
        return [
            grid(
                "attention rollout (Abnar & Zuidema 2020), a heuristic: how much each token reaches the top",
                [query_label(q) for q in qs],
                result.rollout.tolist(),
                qs,
                [f"rollout, query {q}" for q in qs],
            )
        ]
    mean = result.weights.mean(axis=1)  # [layers, queries, positions]
    if len(qs) == 1:
        q = qs[0]
        where = f"position {q} ({tokens[q]!r})"
        if head is not None:
            block, h = head
            name = f"block {block} head {h}"
            return [
                grid(
                    f"attention of {where}: {name}",
                    [f"{block}.{h}"],
                    [result.weights[block - 1, h, 0].tolist()],
                    [q],
                    [name],
                    "head",
                )
            ]
        if layer is not None:
            rows = [f"head {h}" for h in range(heads)] + ["mean"]
            matrix = [*result.weights[layer - 1, :, 0].tolist(), mean[layer - 1, 0].tolist()]
            names = [f"block {layer} {r}" for r in rows]
            return [
                grid(
                    f"attention of {where}: the heads of block {layer}",
                    rows,
                    matrix,
                    [q] * len(rows),
                    names,
                    "head",
                )
            ]
        rows = [str(n) for n in range(1, layers + 1)]
        names = [f"block {n}, mean of {heads} heads" for n in range(1, layers + 1)]
        return [
            grid(
                f"attention of {where} by block, mean of the {heads} heads",
                rows,
                mean[:, 0].tolist(),
                [q] * layers,
                names,
                "block",
            )
        ]
    labels = [query_label(q) for q in qs]
    if head is not None:
        block, h = head
        name = f"block {block} head {h}"
        return [
            grid(
                f"attention pattern of {name}",
                labels,
                result.weights[block - 1, h].tolist(),
                qs,
                [name] * len(qs),
            )
        ]
    chosen = [layer] if layer is not None else list(range(1, layers + 1))
    return [
        grid(
            f"attention pattern of block {n}, mean of the {heads} heads",
            labels,
            mean[n - 1].tolist(),
            qs,
            [f"block {n}, mean"] * len(qs),
        )
        for n in chosen
    ]
