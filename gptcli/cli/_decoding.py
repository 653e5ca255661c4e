"""The decoding options of `complete` and `step`, generated from gptcli.generation.sampling.Settings.

Each Settings field declares its option (help, flags, default shown, range) once; this module turns
the ones a command offers into typer options, as gptcli.cli.finetune does from TrainConfig. The
values come back as `resolve_settings` flags: None for "not given", so a model's
generation_config.json can fill them in.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Annotated, Any, TypeVar

import typer

from gptcli.generation.sampling import Settings, options

F = TypeVar("F", bound=Callable[..., Any])


def _cli_type(kind: Any, flags: tuple[str, ...]) -> tuple[Any, Any]:
    """(annotation, default) of an option whose Settings field has type `kind`."""
    if kind is bool and not any("/" in f for f in flags):
        return bool, False  # an on-switch (--ignore-eos): off means "not given"
    if typing.get_origin(kind) is tuple:
        return list[str] | None, None  # repeatable (--stop)
    bare = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    return bare[0] | None, None


def parameters(command: str) -> list[inspect.Parameter]:
    """One keyword-only typer parameter per decoding setting that `command` offers."""
    hints = typing.get_type_hints(Settings)
    params = []
    for f in fields(Settings):
        declared = options().get(f.name)
        if declared is None or command not in declared[0].commands:
            continue
        how, default = declared
        flags = how.flags or ("--" + f.name.replace("_", "-"),)
        shown = how.shown if how.shown is not None else default
        hidden = shown is None or shown is False or shown == ()  # (not 0.0, which == False)
        help = how.help + ("" if hidden else f" \\[default: {shown}]")
        info = typer.Option(
            *flags, help=help, show_default=False, rich_help_panel=how.panel, metavar=how.metavar
        )
        kind, value = _cli_type(hints[f.name], flags)
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=Annotated[kind, info]
            )
        )
    return params


def with_decoding_options(command: str) -> Callable[[F], F]:
    """Give a command function's `**decoding` one option per decoding setting the command offers."""

    def wrap(fn: F) -> F:
        hints = typing.get_type_hints(fn, include_extras=True)
        hints.pop("decoding", None)
        own = [
            p.replace(annotation=hints[p.name])  # resolved: typer reads the signature's annotations
            for p in inspect.signature(fn).parameters.values()
            if p.kind != p.VAR_KEYWORD
        ]
        generated = parameters(command)
        fn.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
        fn.__annotations__ = {**hints, **{p.name: p.annotation for p in generated}}
        return fn

    return wrap


def decoding_flags(values: dict[str, Any]) -> dict[str, Any]:
    """The options' values as `resolve_settings` flags: a list of stops as a tuple, an on-switch
    left off as None (not given)."""
    flags = {}
    for name, value in values.items():
        if isinstance(value, list):
            value = tuple(value) or None
        elif value is False and not any("/" in f for f in options()[name][0].flags):
            value = None  # (--sample, the off side of --greedy/--sample, is given: False)
        flags[name] = value
    return flags
