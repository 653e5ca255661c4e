"""`gptcli tokenize` and `gptcli detokenize`: text to tokens and back."""

from __future__ import annotations

from typing import Annotated

import typer

from gptcli.cli._common import (
    INSPECT,
    FileOpt,
    JsonOpt,
    ModelOpt,
    TextArg,
    TrustCodeOpt,
    command,
    emit_json,
    examples,
    note,
    read_text,
)
from gptcli.errors import UsageError
from gptcli.generation.tokens import one_line
from gptcli.textio import check_text


@command(
    rich_help_panel=INSPECT,
    epilog=examples(
        'gptcli tokenize "今天天气 hello"',
        'echo "今天天气" | gptcli tokenize --ids',
        "gptcli tokenize --count -f chapter.txt",
        "gptcli tokenize --json \"龙\" | jq -c '.tokens[]'",
    ),
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
    from gptcli.generation.tokens import tokenize as tokenize_text
    from gptcli.loading.models import load_tokenizer_only

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
            print(f"{t['id']}\t{one_line(t['token'])}")


@command(
    rich_help_panel=INSPECT,
    epilog=examples(
        "gptcli detokenize 31373 995",
        'gptcli tokenize --ids "今天天气" | gptcli detokenize',
        "gptcli detokenize --json 164 119 | jq -r '.tokens[].bytes'",
    ),
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
    from gptcli.generation.tokens import TokenText
    from gptcli.generation.tokens import detokenize as detokenize_ids
    from gptcli.loading.models import load_tokenizer_only

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
