"""`gptcli score`: per-token surprise, perplexity and bits per byte of a text."""

from __future__ import annotations

import math
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
    emit_json,
    examples,
    is_tty,
    load,
    note,
    progress,
    read_text,
    stdout,
    surprise_legend,
    surprise_style,
    whole_characters,
)
from gptcli.errors import UsageError
from gptcli.generation.tokens import one_line
from gptcli.textio import check_text

if TYPE_CHECKING:
    from gptcli.contracts import ScoredToken
    from gptcli.inspection.predict import Score


@command(
    rich_help_panel=INSPECT,
    epilog=examples(
        'gptcli score "The cat sat on the mat."',
        "gptcli score -f essay.txt --json | jq .perplexity",
        "gptcli score -f notes.txt | sort -t$'\\t' -k3 -g | head   [dim]# the most surprising tokens[/dim]",
    ),
)
def score(
    text: TextArg = None,
    file: FileOpt = None,
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
    from gptcli.inspection.predict import score_text

    source = check_text(read_text(text, file))
    if not source:
        raise UsageError("nothing to score: the text is empty")
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    with progress(0, "scoring tokens") as update:  # the first window tells the total
        result = score_text(lm, source, stride=stride, on_progress=update)
    _note_unknown(result)
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
            print(f"{t['id']}\t{one_line(t['token'])}\t{t['logprob']:.6g}\t{t['rank']}")
        note(totals)


def _note_unknown(result: Score) -> None:
    if result.unknown:
        share = result.unknown / max(result.num_tokens, 1)
        note(
            f"{result.unknown} of the {result.num_tokens} tokens ({share:.0%}) are the unknown token [UNK] "
            "(text this tokenizer cannot spell): predicting [UNK] counts as a hit, so the perplexity and "
            "bits per byte say little about this text"
        )


def _heat_map(tokens: list[ScoredToken]) -> None:
    """The text with each token's background going from green (expected) to red (surprising).

    Byte pieces of one character are coloured together, by the least likely of them, so a split
    CJK character shows as itself rather than as replacement characters. 16-colour terminals get five
    distinct colours, and NO_COLOR gets underline/bold/reverse marks; a legend says which is which.
    """
    from rich.text import Text

    console = stdout()
    text = Text()
    pieces = ((bytes.fromhex(t["bytes"]), t["logprob"]) for t in tokens)
    for piece, logprobs in whole_characters(pieces):
        text.append(piece, style=surprise_style(math.exp(min(logprobs)), console))
    console.print(text)
    console.print(surprise_legend(console), style="dim" if console.color_system else "")
    sys.stdout.flush()
