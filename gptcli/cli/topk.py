"""`gptcli topk`: the next-token distribution after a prompt."""

from __future__ import annotations

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
    emit_json,
    examples,
    is_tty,
    load,
    note,
    progress,
    read_lines,
    read_text,
    stdout,
)
from gptcli.generation.tokens import one_line
from gptcli.textio import check_text

if TYPE_CHECKING:
    from gptcli.contracts import Candidate

EachLineOpt = Annotated[
    bool,
    typer.Option(
        "--each-line", help="Every line of stdin (or -f FILE) is a prompt; one JSON line per prompt."
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass with --each-line.")]


@command(
    rich_help_panel=INSPECT,
    epilog=examples(
        'gptcli topk "The capital of France is"',
        'gptcli topk "今天天气" -k 5 | cut -f3',
        "gptcli topk --each-line -f prompts.txt | jq -c '.tokens[0]'",
    ),
)
def topk(
    prompt: TextArg = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    k: Annotated[int, typer.Option("--k", "-k", help="How many tokens to show.")] = 10,
    temperature: Annotated[float, typer.Option(help="Divide the logits by this before the softmax.")] = 1.0,
    each_line: EachLineOpt = False,
    batch_size: BatchOpt = 16,
    json_: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """The model's next-token distribution after PROMPT.

    On a terminal: a table with rank, id, piece, probability, log-probability. Piped: tab-separated
    `rank id piece prob logprob` lines. An empty prompt conditions on the start-of-text token.
    """
    from gptcli.inspection.predict import check_topk_options, next_token_distribution

    check_topk_options(k=k, temperature=temperature, batch_size=batch_size)
    prompts = read_lines(prompt, file) if each_line else [check_text(read_text(prompt, file))]
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    with progress(len(prompts) if each_line else 0, "prompts") as update:
        results = next_token_distribution(
            lm, prompts, k=k, temperature=temperature, batch_size=batch_size, on_progress=update
        )
    for number, result in enumerate(results, 1):
        if result.dropped:
            where = f"prompt {number}" if each_line else "the prompt"
            note(f"{where} has more tokens than the context ({lm.context_length}); kept the last ones")
        if json_ or each_line:
            emit_json(result.to_json(lm.name))
        else:
            print_tokens(result.tokens, table=is_tty())


def print_tokens(tokens: list[Candidate], *, table: bool) -> None:
    """A next-token distribution on stdout: a table for a person, tab-separated lines for a pipe."""
    if table:
        _topk_table(tokens)
        return
    for t in tokens:
        print(f"{t['rank']}\t{t['id']}\t{one_line(t['token'])}\t{t['prob']:.6g}\t{t['logprob']:.6g}")


def _topk_table(tokens: list[Candidate]) -> None:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("rank", justify="right")
    table.add_column("id", justify="right")
    table.add_column("piece", justify="left")
    table.add_column("prob", justify="right")
    table.add_column("logprob", justify="right")
    table.add_column("", justify="left")
    for t in tokens:
        bar = "█" * round(t["prob"] * 30)
        table.add_row(
            str(t["rank"]),
            str(t["id"]),
            one_line(t["token"]),
            f"{t['prob']:.4f}",
            f"{t['logprob']:.3f}",
            bar,
        )
    stdout().print(table)
