"""`gptcli attention`: which earlier tokens each layer and head draws on."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from gptcli.cli._common import (
    INSPECT,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    FileOpt,
    JsonOpt,
    ModelOpt,
    TextArg,
    TrustCodeOpt,
    command,
    examples,
    is_tty,
    load,
    note,
    read_text,
    stdout,
)
from gptcli.cli._grids import (
    DpiOpt,
    SaveOpt,
    print_grid,
    save_grids,
    title,
)
from gptcli.generation.tokens import one_line
from gptcli.textio import check_text

if TYPE_CHECKING:
    from gptcli.inspection.attention import Attention
    from gptcli.inspection.pictures import Grid


@command(
    rich_help_panel=INSPECT,
    epilog=examples(
        "gptcli attention '今天天气很好，我们去'",
        "gptcli attention 'I like' --layer 3",
        "gptcli attention 'The cat sat' --head 2.1 --query all",
        "gptcli attention 'I like tea' --rollout",
    ),
)
def attention(
    prompt: TextArg = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    layer: Annotated[
        int | None, typer.Option("--layer", metavar="L", help="The heads of block L (1 = the first).")
    ] = None,
    head: Annotated[
        str | None, typer.Option("--head", metavar="L.H", help="One head: block L, head H (0 = the first).")
    ] = None,
    query: Annotated[
        str | None,
        typer.Option(
            "--query", metavar="POS|all", help="Which positions look (default: the last); all, 3, 2:8."
        ),
    ] = None,
    rollout: Annotated[
        bool, typer.Option("--rollout", help="Attention rollout through all layers (a heuristic).")
    ] = False,
    hide_sink: Annotated[
        bool,
        typer.Option("--hide-sink", help="Leave the first token (the attention sink) out of the shading."),
    ] = False,
    save: SaveOpt = None,
    dpi: DpiOpt = 110,
    json_: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Attention weights: how much each position draws on each earlier token, per block and head.

    On a terminal: for the last position (the one that predicts the next token), a blocks × tokens
    heat map of the weights averaged over the heads, in percent. Piped: tab-separated `layer head
    query key piece weight` lines (blocks count from 1, heads from 0; keys after the query are left
    out, their weight is 0).
    """
    from gptcli.inspection.attention import (
        attention_grids,
        attention_weights,
        check_attention_options,
        check_layer_head,
        parse_head,
    )
    from gptcli.inspection.pictures import check_picture_options

    check_attention_options(layer=layer, head=head, query=query, rollout=rollout)
    check_picture_options(save, dpi)
    text = check_text(read_text(prompt, file))
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    chosen_head = parse_head(head) if head is not None else None
    check_layer_head(lm, layer, chosen_head)
    result = attention_weights(lm, text, queries=query, rollout=rollout)
    if result.prompt.dropped:
        note(f"the prompt has more tokens than the context ({lm.context_length}); kept the last ones")

    def grids() -> list[Grid]:
        return attention_grids(result, layer=layer, head=chosen_head, rollout=rollout, hide_sink=hide_sink)

    if save is not None:
        save_grids(grids(), save, title(lm.name, text), dpi)
    if json_:
        for piece in result.json_pieces(lm.name):
            sys.stdout.write(piece)
        sys.stdout.flush()
    elif is_tty():
        console = stdout()
        for grid in grids():
            print_grid(grid, console)
    else:
        _tsv(result, layer, chosen_head, rollout)


def _tsv(result: Attention, layer: int | None, head: tuple[int, int] | None, rollout: bool) -> None:
    """`layer head query key piece weight` lines (rollout: `rollout - query key piece weight`)."""
    tokens = [one_line(t["token"]) for t in result.prompt.tokens]
    if rollout and result.rollout is not None:
        for i, q in enumerate(result.queries):
            for j in range(q + 1):
                print(f"rollout\t-\t{q}\t{j}\t{tokens[j]}\t{result.rollout[i, j]:.6g}")
        return
    blocks = [head[0]] if head else [layer] if layer else range(1, result.weights.shape[0] + 1)
    heads = [head[1]] if head else range(result.weights.shape[1])
    for block in blocks:
        for h in heads:
            for i, q in enumerate(result.queries):
                weights = result.weights[block - 1, h, i]
                for j in range(q + 1):
                    print(f"{block}\t{h}\t{q}\t{j}\t{tokens[j]}\t{weights[j]:.6g}")


# --- Rendering ----------------------------------------------------------------------------------------
