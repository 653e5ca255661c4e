"""`gptcli patch`: which layer and position cause a prediction (activation patching)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from gptcli.cli._common import (
    INSPECT,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    TrustCodeOpt,
    command,
    emit_json,
    examples,
    is_tty,
    load,
    note,
    status,
    stdout,
)
from gptcli.cli._grids import DpiOpt, SaveOpt, print_grid, save_grids, title
from gptcli.cli._targets import FoilIdOpt, FoilOpt, TargetIdOpt, TargetOpt
from gptcli.generation.tokens import one_line
from gptcli.textio import check_text

if TYPE_CHECKING:
    from gptcli.inspection.patching import Patching


@command(
    rich_help_panel=INSPECT,
    epilog=examples(
        "gptcli patch '今天天气很好，我们去' '今天天气不好，我们去'",
        "gptcli patch 'The Eiffel Tower is in' --noise --subject 'Eiffel Tower'",
        "gptcli patch 'When Mary and John went, John gave it to' 'When Mary and John went, Mary gave it to' "
        "--heads --save patch.html",
    ),
)
def patch(
    clean: Annotated[
        str, typer.Argument(metavar="CLEAN", help="The prompt whose answer is restored.", show_default=False)
    ],
    corrupt: Annotated[
        str | None,
        typer.Argument(
            metavar="CORRUPT", help="The corrupted prompt, of the same token length.", show_default=False
        ),
    ] = None,
    model: ModelOpt = None,
    heads: Annotated[bool, typer.Option("--heads", help="Also patch each head (at every position).")] = False,
    noise: Annotated[
        bool,
        typer.Option(
            "--noise", help="Corrupt CLEAN with noise on --subject (ROME) instead of a second prompt."
        ),
    ] = False,
    subject: Annotated[
        str | None, typer.Option("--subject", metavar="TEXT", help="With --noise: the text to add noise to.")
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", metavar="N", help="With --noise: noise samples averaged.")
    ] = 10,
    target: TargetOpt = None,
    target_id: TargetIdOpt = None,
    foil: FoilOpt = None,
    foil_id: FoilIdOpt = None,
    save: SaveOpt = None,
    dpi: DpiOpt = 110,
    json_: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Activation patching: run CORRUPT with one activation from CLEAN's run, and score how much of the
    clean answer it restores.

    The score is (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt), LD the logit difference target -
    foil at the last position (target: the clean top-1; foil: the corrupted top-1, or the clean second
    when they agree): 1 restores the clean answer, 0 does nothing. On a terminal: heat maps of blocks x
    tokens for each block's input (resid_pre), attention output and MLP output. Piped: tab-separated
    `grid block position token score` lines (`heads block head - score` with --heads).
    """
    from gptcli.inspection.attribution import check_token_options, token_id
    from gptcli.inspection.patching import check_patch_options, patching_grids, same
    from gptcli.inspection.patching import patch as run
    from gptcli.inspection.pictures import check_picture_options

    check_token_options(target=target, target_id=target_id, foil=foil, foil_id=foil_id)
    check_patch_options(noise=noise, corrupt=corrupt, subject=subject, samples=samples)
    check_picture_options(save, dpi)
    clean = check_text(clean)
    corrupt = None if corrupt is None else check_text(corrupt)
    lm = load(model, device, dtype, allow_pickle, trust_remote_code)
    with status("patching: the runs of every cell, batched"):
        result = run(
            lm,
            clean,
            corrupt,
            subject=subject,
            samples=samples,
            target=token_id(lm, target, target_id, "--target"),
            foil=token_id(lm, foil, foil_id, "--foil"),
            heads=heads,
        )
    if result.clean.dropped:
        note(f"the prompts have more tokens than the context ({lm.context_length}); kept the last ones")
    if same(result.clean_diff, result.corrupt_diff):
        note("the two runs give the same logit difference: there is nothing to restore, no score")
    if save is not None:
        shown = f"{clean} → {corrupt}" if corrupt is not None else f"{clean} (noise on {subject})"
        save_grids(patching_grids(result), save, title(lm.name, shown), dpi)
    if json_:
        emit_json(result.to_json())
    elif is_tty():
        console = stdout()
        console.print(_what(result))
        for grid in patching_grids(result):
            print_grid(grid, console)
    else:
        _tsv(result)


def _what(result: Patching) -> str:
    return (
        f"logit difference {result.target['token']!r} - {result.foil['token']!r} at the last position: "
        f"clean {result.clean_diff:.4f}, corrupted {result.corrupt_diff:.4f}"
    )


def _tsv(result: Patching) -> None:
    tokens = [one_line(t["token"]) for t in result.clean.tokens]
    print(f"clean_diff\t-\t-\t-\t{result.clean_diff:.6g}")
    print(f"corrupt_diff\t-\t-\t-\t{result.corrupt_diff:.6g}")
    for grid, rows in result.scores.items():
        for layer, row in enumerate(rows, 1):
            for position, value in enumerate(row):
                shown = "-" if value is None else f"{value:.6g}"
                print(f"{grid}\t{layer}\t{position}\t{tokens[position]}\t{shown}")
    for layer, row in enumerate(result.heads or [], 1):
        for head, value in enumerate(row):
            print(f"heads\t{layer}\t{head}\t-\t{'-' if value is None else f'{value:.6g}'}")
