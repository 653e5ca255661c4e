"""The token options of `attribute` and `patch`: which logit (difference) they explain."""

from __future__ import annotations

from typing import Annotated

import typer

TargetOpt = Annotated[
    str | None,
    typer.Option("--target", metavar="TEXT", help="The token to explain (one token; default: the top-1)."),
]
TargetIdOpt = Annotated[int | None, typer.Option("--target-id", metavar="N", help="The target by its id.")]
FoilOpt = Annotated[
    str | None,
    typer.Option("--foil", metavar="TEXT", help="Explain the target's logit minus this token's (one token)."),
]
FoilIdOpt = Annotated[int | None, typer.Option("--foil-id", metavar="N", help="The foil by its id.")]
