"""The `compare` command: what changed between two models, on a text or after a prompt."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.cli._common import (
    INSPECT,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    TrustCodeOpt,
    change_style,
    command,
    emit_json,
    is_tty,
    load,
    note,
    read_text,
    stdout,
    whole_characters,
)
from gptcli.errors import UsageError
from gptcli.generation.tokens import one_line
from gptcli.textio import check_text

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from gptcli.contracts import ComparedCandidate, ComparedToken
    from gptcli.inspection.compare import Comparison, NextComparison

_EXAMPLES = """\
[bold]Examples[/bold]

  gptcli finetune notes.txt -m gpt2 -o my-model
  gptcli compare gpt2 ./my-model -f held-out.txt
  gptcli compare gpt2 ./my-model --next "The meeting is on"
  gptcli compare gpt2 ./my-model -f held-out.txt --json | jq .mean_kl
"""


@command(rich_help_panel=INSPECT, epilog=_EXAMPLES)
def compare(
    model_a: Annotated[str, typer.Argument(help="The first model (A), e.g. the base model.")],
    model_b: Annotated[str, typer.Argument(help="The second model (B), e.g. its fine-tune.")],
    text: Annotated[
        str | None,
        typer.Argument(help="The text; read from stdin when absent or '-'.", show_default=False),
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the text from this file.")] = None,
    next_: Annotated[
        bool,
        typer.Option("--next", help="TEXT is a prompt: compare the two models' next-token candidates."),
    ] = False,
    k: Annotated[int, typer.Option("--k", "-k", help="Candidates shown per model at each position.")] = 5,
    changes: Annotated[
        int, typer.Option("--changes", help="Positions with the largest change to show on a terminal.")
    ] = 5,
    stride: Annotated[
        int | None, typer.Option(help="Sliding-window step for long texts. \\[default: context/2]")
    ] = None,
    json_: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Where two models differ on a text: each token's log-probability under A and B, the KL divergence
    of their next-token distributions, and each model's perplexity and bits per byte.

    On a terminal the text is shaded green where B predicts it better, red where worse, followed by the
    positions that changed most with both models' top candidates side by side (▲ rose under B, ▼ fell).
    Piped: tab-separated `id piece logprob_a logprob_b change kl` lines, the totals on stderr.
    Models with different vocabularies compare on perplexity and bits per byte only.
    """
    from gptcli.inspection.compare import check_compare_options, compare_next, compare_text

    check_compare_options(k=k, changes=changes)
    source = check_text(read_text(text, file))
    if not source and not next_:
        raise UsageError("nothing to compare: the text is empty")
    a = load(model_a, device, dtype, allow_pickle, trust_remote_code)
    b = load(model_b, device, dtype, allow_pickle, trust_remote_code)
    if next_:
        result = compare_next(a, b, source, k=k)
        if result.dropped:
            note(f"the prompt has more tokens than the context; kept the last ones (cut {result.dropped})")
        _show_next(result, a.name, b.name, k, json_)
        return
    shown = 0 if json_ or not is_tty() else changes  # the largest changes appear on a terminal only
    comparison = compare_text(a, b, source, stride=stride, changes=shown, k=k)
    if comparison.reason:
        note(
            f"{comparison.reason}, so they cannot be compared token by token: only perplexity (per token "
            "of each model's own tokenizer) and bits per byte (comparable across tokenizers)"
        )
    if json_:
        emit_json(comparison.to_json(a.name, b.name))
    elif is_tty():
        _show_comparison(comparison, a.name, b.name, k)
    elif comparison.reason:
        print(_totals(comparison))
    else:
        for t in comparison.tokens:
            change = t["logprob_b"] - t["logprob_a"]
            print(
                f"{t['id']}\t{one_line(t['token'])}\t{t['logprob_a']:.6g}\t{t['logprob_b']:.6g}\t{change:.6g}\t{t['kl']:.6g}"
            )
        note(_totals(comparison))


def _totals(c: Comparison) -> str:
    parts = [f"tokens {len(c.tokens)}"] if c.tokens else []
    parts += [
        f"perplexity A {c.perplexity_a:.3f} B {c.perplexity_b:.3f}",
        f"bits/byte A {c.bits_per_byte_a:.4f} B {c.bits_per_byte_b:.4f}",
    ]
    if c.mean_kl is not None:
        parts.append(f"mean KL {c.mean_kl:.4f}")
    return "  ".join(parts)


# --- the terminal view ----------------------------------------------------------------------------------


def _shaded(tokens: list[ComparedToken], console: Console) -> Text:
    from rich.text import Text

    text = Text()
    pieces = ((bytes.fromhex(t["bytes"]), t["logprob_b"] - t["logprob_a"]) for t in tokens)
    for piece, changes in whole_characters(pieces):
        text.append(piece, style=change_style(sum(changes), console))
    return text


def _show_comparison(c: Comparison, name_a: str, name_b: str, k: int) -> None:
    from rich.text import Text

    console = stdout()
    console.print(Text.assemble("A ", (name_a, "bold"), "   B ", (name_b, "bold")))
    if c.tokens:
        console.print(
            Text.assemble(
                "shading: ",
                ("better under B", change_style(3, console)),
                " ",
                ("worse under B", change_style(-3, console)),
            )
        )
        console.print(_shaded(c.tokens, console))
    console.print(_totals(c))
    for change in c.changes:
        t = c.tokens[change.index]
        window = c.tokens[max(0, change.index - 16) : change.index]
        before = b"".join(bytes.fromhex(x["bytes"]) for x in window).decode("utf-8", errors="ignore")
        delta = t["logprob_b"] - t["logprob_a"]
        console.print()
        console.print(
            Text.assemble(
                f"token {change.index + 1} ",
                (one_line(t["token"]), change_style(delta, console)),
                " after " + ("…" if len(before) > 24 or change.index > 16 else ""),
                before[-24:].replace("\n", "\\n"),
                f"   logprob A {t['logprob_a']:.3f} → B {t['logprob_b']:.3f} ({delta:+.3f})",
                f"   KL {t['kl']:.4f}",
            )
        )
        console.print(_side_by_side(change.candidates, k, chosen=t["id"]))


def _side_by_side(candidates: list[ComparedCandidate], k: int, chosen: int | None = None) -> Any:
    """A's top k (with how each one moved under B) beside B's top k (new: not in A's top k)."""
    from rich.table import Table
    from rich.text import Text

    def piece(t: ComparedCandidate) -> Text:
        return Text(one_line(t["token"]), style="bold underline" if t["id"] == chosen else "")

    def move(t: ComparedCandidate, new: bool) -> Text:
        change = math.exp(t["logprob_b"]) - math.exp(t["logprob_a"])
        mark = "▲" if t["logprob_b"] > t["logprob_a"] else "▼" if t["logprob_b"] < t["logprob_a"] else "="
        style = "green" if mark == "▲" else "red" if mark == "▼" else ""
        return Text(f"{mark} {change:+.4f}" + (" new" if new else ""), style=style)

    top_a = sorted((t for t in candidates if t["rank_a"] <= k), key=lambda t: t["rank_a"])
    top_b = sorted((t for t in candidates if t["rank_b"] <= k), key=lambda t: t["rank_b"])
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column, justify in (("#", "right"), ("A", "left"), ("p(A)", "right"), ("under B", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_column("│", justify="center")
    for column, justify in (("#", "right"), ("B", "left"), ("p(B)", "right"), ("since A", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for i in range(max(len(top_a), len(top_b))):
        row: list[Any] = []
        for side, tops in (("a", top_a), ("b", top_b)):
            if i < len(tops):
                t = tops[i]
                prob = math.exp(t["logprob_a"] if side == "a" else t["logprob_b"])
                row += [str(i + 1), piece(t), f"{prob:.4f}", move(t, side == "b" and t["rank_a"] > k)]
            else:
                row += ["", "", "", ""]
            if side == "a":
                row.append("│")
        table.add_row(*row)
    return table


def _show_next(result: NextComparison, name_a: str, name_b: str, k: int, json_: bool) -> None:
    if json_:
        emit_json(result.to_json(name_a, name_b))
        return
    if is_tty():
        from rich.text import Text

        console = stdout()
        console.print(Text.assemble("A ", (name_a, "bold"), "   B ", (name_b, "bold")))
        console.print(f"next token after the prompt: KL(A‖B) {result.kl:.4f}")
        console.print(_side_by_side(result.tokens, k))
        return
    for t in result.tokens:
        pa, pb = math.exp(t["logprob_a"]), math.exp(t["logprob_b"])
        change = t["logprob_b"] - t["logprob_a"]
        print(
            f"{t['rank_a']}\t{t['rank_b']}\t{t['id']}\t{one_line(t['token'])}\t{pa:.6g}\t{pb:.6g}\t{change:.6g}"
        )
    note(f"KL(A‖B) {result.kl:.6g}")
