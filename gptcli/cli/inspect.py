"""Inspection commands: info, tokenize, detokenize, topk, score."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.cli._common import (
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
    is_tty,
    load,
    note,
    progress,
    read_lines,
    read_text,
    stdout,
    surprise_legend,
    surprise_style,
    whole_characters,
)
from gptcli.errors import UsageError
from gptcli.textio import check_text

if TYPE_CHECKING:
    from gptcli.predict import Score

EachLineOpt = Annotated[
    bool,
    typer.Option(
        "--each-line", help="Every line of stdin (or -f FILE) is a prompt; one JSON line per prompt."
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass with --each-line.")]


def _examples(*lines: str) -> str:
    return "[bold]Examples[/bold]\n\n" + "\n".join(f"  {line}" for line in lines) + "\n"


@command(
    epilog=_examples("gptcli info", "gptcli info -m uer/gpt2-chinese-cluecorpussmall --json | jq .parameters")
)
def info(
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Architecture, size, context, vocabulary, tokenizer, dtype, device and where the files are."""
    from gptcli.models import folder_info, model_info

    # A plain GPT-2 folder is described from its files, without the seconds torch takes to import.
    quick = folder_info(
        model, device=device, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    if quick is not None:
        facts, notice = quick
        if notice:
            note(notice)
    else:
        facts = model_info(load(model, device, dtype, allow_pickle, trust_remote_code))
    if json_:
        emit_json(facts)
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key.replace('_', ' '):<{width}}  {shown}")


@command(
    epilog=_examples(
        'gptcli tokenize "今天天气 hello"',
        'echo "今天天气" | gptcli tokenize --ids',
        "gptcli tokenize --count -f chapter.txt",
        "gptcli tokenize --json \"龙\" | jq -c '.tokens[]'",
    )
)
def tokenize(
    text: TextArg = None,
    file: FileOpt = None,
    model: ModelOpt = None,
    ids: Annotated[bool, typer.Option("--ids", help="Print only the ids, space-separated.")] = False,
    count: Annotated[bool, typer.Option("--count", help="Print only the number of tokens.")] = False,
    json_: JsonOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Show how text becomes tokens: one token per line, id and piece.

    Pieces that are not whole characters (GPT-2 splits most CJK characters into byte pieces) are shown
    by their bytes, e.g. <e4 bb>. --json adds each token's exact bytes and its character offsets.
    """
    from gptcli.models import load_tokenizer_only
    from gptcli.tokens import tokenize as tokenize_text

    chosen = [flag for flag, on in (("--ids", ids), ("--count", count), ("--json", json_)) if on]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} are different outputs: pick one")
    source = check_text(read_text(text, file))
    name, tokenizer, notice = load_tokenizer_only(model, trust_remote_code=trust_remote_code)
    if notice:
        note(notice)
    if count or ids:
        # Ids alone: describing every token of a 10 MB file would cost several times the encoding itself.
        token_ids = tokenizer.encode(source, add_special_tokens=False) if source else []
        print(len(token_ids) if count else " ".join(map(str, token_ids)))
        return
    tokens = tokenize_text(tokenizer, source)
    if json_:
        emit_json({"model": name, "text": source, "tokens": tokens})
    else:
        for t in tokens:
            print(f"{t['id']}\t{t['token']}")


@command(
    epilog=_examples(
        "gptcli detokenize 31373 995",
        'gptcli tokenize --ids "今天天气" | gptcli detokenize',
        "gptcli detokenize --json 164 119 | jq -r '.tokens[].bytes'",
    )
)
def detokenize(
    ids: Annotated[
        list[str] | None,
        typer.Argument(
            help="Token ids; read from stdin (separated by spaces or lines) when absent.", show_default=False
        ),
    ] = None,
    model: ModelOpt = None,
    json_: JsonOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Turn token ids back into text: the inverse of `tokenize --ids`.

    Special tokens are written out by name. With --json, each token's piece and exact bytes too.
    """
    from gptcli.models import load_tokenizer_only
    from gptcli.tokens import TokenText
    from gptcli.tokens import detokenize as detokenize_ids

    words = ids if ids else read_text(None).split()
    numbers = []
    for word in words:
        try:
            numbers.append(int(word))
        except ValueError:
            raise UsageError(f"{word!r} is not a token id (a whole number)") from None
    name, tokenizer, notice = load_tokenizer_only(model, trust_remote_code=trust_remote_code)
    if notice:
        note(notice)
    text = detokenize_ids(tokenizer, numbers)
    if json_:
        names = TokenText(tokenizer)
        emit_json(
            {"model": name, "ids": numbers, "text": text, "tokens": [names.describe(i) for i in numbers]}
        )
    else:
        print(text)


@command(
    epilog=_examples(
        'gptcli topk "The capital of France is"',
        'gptcli topk "今天天气" -k 5 | cut -f3',
        "gptcli topk --each-line -f prompts.txt | jq -c '.tokens[0]'",
    )
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
    from gptcli.predict import check_topk_options, next_token_distribution

    check_topk_options(k=k, temperature=temperature, batch_size=batch_size)
    prompts = read_lines(prompt, file) if each_line else [check_text(read_text(prompt, file))]
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    with progress(len(prompts), "prompts") if each_line else progress(0, "") as update:
        results = next_token_distribution(
            lm, prompts, k=k, temperature=temperature, batch_size=batch_size, on_progress=update
        )
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


@command(
    epilog=_examples(
        'gptcli score "The cat sat on the mat."',
        "gptcli score -f essay.txt --json | jq .perplexity",
        "gptcli score -f notes.txt | sort -t$'\\t' -k3 -g | head   [dim]# the most surprising tokens[/dim]",
    )
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
    from gptcli.predict import score_text

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
            print(f"{t['id']}\t{t['token']}\t{t['logprob']:.6g}\t{t['rank']}")
        note(totals)


def _note_unknown(result: Score) -> None:
    if result.unknown:
        share = result.unknown / max(result.num_tokens, 1)
        note(
            f"{result.unknown} of the {result.num_tokens} tokens ({share:.0%}) are the unknown token [UNK] "
            "(text this tokenizer cannot spell): predicting [UNK] counts as a hit, so the perplexity and "
            "bits per byte say little about this text"
        )


def _heat_map(tokens: list[dict[str, Any]]) -> None:
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
