"""Inspection commands: info, tokenize, topk, score."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from gptcli.cli._common import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    TrustCodeOpt,
    command,
    emit_json,
    is_tty,
    load,
    note,
    read_lines,
    read_text,
    stdout,
)
from gptcli.errors import UsageError
from gptcli.textio import check_text

TextArg = Annotated[str | None, typer.Argument(help="The text; read from stdin when absent or '-'.")]
EachLineOpt = Annotated[
    bool, typer.Option("--each-line", help="Every stdin line is a prompt; one JSON line per prompt.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass with --each-line.")]


@command()
def info(
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Architecture, size, context, vocabulary, tokenizer, dtype, device and where the files are."""
    from gptcli.models import model_info

    facts = model_info(load(model, device, dtype, allow_pickle, trust_remote_code))
    if json_:
        emit_json(facts)
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key.replace('_', ' '):<{width}}  {shown}")


@command()
def tokenize(
    text: TextArg = None,
    model: ModelOpt = None,
    ids: Annotated[bool, typer.Option("--ids", help="Print only the ids, space-separated.")] = False,
    count: Annotated[bool, typer.Option("--count", help="Print only the number of tokens.")] = False,
    json_: JsonOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Show how text becomes tokens: one token per line, id and piece.

    Pieces that are not whole characters (GPT-2 splits most CJK characters into byte pieces) are shown
    by their bytes, e.g. <e4 bb>.
    """
    from gptcli.models import load_tokenizer_only
    from gptcli.tokens import tokenize as tokenize_text

    source = check_text(read_text(text))
    name, tokenizer, notice = load_tokenizer_only(model, trust_remote_code=trust_remote_code)
    if notice:
        note(notice)
    if (count or ids) and not json_:
        # Ids alone, as tokens.tokenize encodes them: describing every token of a 10 MB file would
        # cost several times the encoding itself.
        token_ids = tokenizer.encode(source, add_special_tokens=False) if source else []
        print(len(token_ids) if count else " ".join(map(str, token_ids)))
        return
    tokens = tokenize_text(tokenizer, source)
    if json_:
        emit_json({"model": name, "text": source, "tokens": tokens})
    else:
        for t in tokens:
            print(f"{t['id']}\t{t['token']}")


@command()
def topk(
    prompt: TextArg = None,
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
    from gptcli.predict import check_topk_options, next_token_distribution

    check_topk_options(k=k, temperature=temperature, batch_size=batch_size)
    prompts = read_lines() if each_line else [check_text(read_text(prompt))]
    if each_line and prompt not in (None, "-"):
        raise UsageError("--each-line reads prompts from stdin; do not pass PROMPT too")
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    results = next_token_distribution(lm, prompts, k=k, temperature=temperature, batch_size=batch_size)
    for number, result in enumerate(results, 1):
        if result.dropped:
            where = f"prompt {number}" if each_line else "the prompt"
            note(f"{where} has more tokens than the context ({lm.context_length}); kept the last ones")
        if json_ or each_line:
            emit_json(result.to_json(lm.name))
        elif is_tty():
            _topk_table(result.tokens)
        else:
            for t in result.tokens:
                print(f"{t['rank']}\t{t['id']}\t{t['token']}\t{t['prob']:.6g}\t{t['logprob']:.6g}")


def _topk_table(tokens: list[dict[str, Any]]) -> None:
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
            repr(t["token"])[1:-1],
            f"{t['prob']:.4f}",
            f"{t['logprob']:.3f}",
            bar,
        )
    stdout().print(table)


@command()
def score(
    text: TextArg = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the text from this file.")] = None,
    model: ModelOpt = None,
    stride: Annotated[
        int | None, typer.Option(help="Sliding-window step for long texts. \\[default: context/2]")
    ] = None,
    json_: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Per-token log-probabilities, perplexity and bits per byte of a text.

    On a terminal the text is shown as a heat map: the redder a token, the more it surprised the model.
    Piped: tab-separated `id piece logprob rank` lines, with the totals on stderr.
    """
    from gptcli.predict import score_text

    source = check_text(read_text(text, file, strip_newline=False))
    if not source:
        raise UsageError("nothing to score: the text is empty")
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    result = score_text(lm, source, stride=stride)
    totals = (
        f"tokens {result.num_tokens}  perplexity {result.perplexity:.3f}  "
        f"bits/byte {result.bits_per_byte:.4f}  logprob {result.total_logprob:.3f}"
    )
    if json_:
        emit_json(result.to_json(lm.name))
    elif is_tty():
        _heat_map(result.tokens)
        stdout().print(totals)
    else:
        for t in result.tokens:
            print(f"{t['id']}\t{t['token']}\t{t['logprob']:.6g}\t{t['rank']}")
        note(totals)


def _heat_map(tokens: list[dict[str, Any]]) -> None:
    """The text with each token's background going from green (expected) to red (surprising).

    Byte pieces of one character are coloured together, by the least likely of them, so a split
    CJK character shows as itself rather than as replacement characters.
    """
    from rich.text import Text

    text = Text()
    pending, worst = b"", 0.0
    for t in tokens:
        pending += bytes.fromhex(t["bytes"])
        worst = min(worst, t["logprob"])
        try:
            piece = pending.decode("utf-8")
        except UnicodeDecodeError:
            if len(pending) < 4:  # wait for the rest of the character
                continue
            piece = pending.decode("utf-8", errors="replace")
        p = math.exp(worst)
        red, green = round(255 * (1 - p) ** 2), round(200 * p**0.5)
        text.append(piece, style=f"black on rgb({red},{green},60)")
        pending, worst = b"", 0.0
    if pending:
        text.append(pending.decode("utf-8", errors="replace"), style="black on rgb(255,0,60)")
    stdout().print(text)
