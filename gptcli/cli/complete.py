"""The `complete` command: stream a continuation of a prompt to stdout."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gptcli.batching import check_batch_size
from gptcli.cli._common import (
    GENERATE,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    QuantizeOpt,
    ThreadsOpt,
    TrustCodeOpt,
    command,
    emit_json,
    load,
    note,
    progress,
    read_lines,
    read_text,
)
from gptcli.cli._decoding import decoding_flags, with_decoding_options
from gptcli.generation.sampling import (  # light: no torch until decoding
    Settings,
    check_flags,
    check_samples,
    resolve_settings,
)
from gptcli.generation.tokens import unknown_token_id
from gptcli.loading.models import check_quantize, check_threads

if TYPE_CHECKING:
    from gptcli.contracts import Tokenizer
    from gptcli.generation.generate import Completion

_EXAMPLES = """\
[bold]Examples[/bold]

  gptcli complete "今天天气" -m uer/gpt2-chinese-cluecorpussmall
  gptcli complete "Once upon a time" -n 200 --seed 42 --stop $'\\n\\n'
  echo "The capital of France is" | gptcli complete --greedy -n 5
  cat prompts.txt | gptcli complete --each-line --greedy | jq -r .text
"""


@command(rich_help_panel=GENERATE, epilog=_EXAMPLES)
@with_decoding_options("complete")
def complete(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt; read from stdin when absent or '-'.", show_default=False)
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the prompt from this file.")] = None,
    model: ModelOpt = None,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the continuation.")] = False,
    json_: JsonOpt = False,
    each_line: Annotated[
        bool,
        typer.Option("--each-line", help="Every input line is a prompt; one JSON line per prompt, in order."),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="Most prompts decoded together with --each-line (fewer when long)."
        ),
    ] = 32,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Settings, time to first token and tokens/s on stderr.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    threads: ThreadsOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
    **decoding: Any,
) -> None:
    """Continue PROMPT: the text streams to stdout as it is generated and ends with one newline.

    Generation ends at the end-of-text token, a --stop text (not printed), -n tokens or the context.

    Values in the model's generation_config.json replace the defaults shown; flags replace both.
    """
    from gptcli.generation.generate import TextChunk, stream

    flags = decoding_flags(decoding)
    check_flags(**flags)
    check_quantize(quantize)
    check_threads(threads)
    check_batch_size(batch_size)
    prompts = read_lines(prompt, file) if each_line else [read_text(prompt, file)]
    lm = load(model, device, dtype, allow_pickle, trust_remote_code, quantize, threads)
    settings = resolve_settings(lm.generation_config, **flags)
    check_samples(settings)
    if verbose:
        _describe(settings)
    as_json = json_ or each_line or settings.logprobs is not None
    events = stream(lm, prompts, settings, batch_size=batch_size if each_line else 1)
    line_open = False  # part of a plain-text sample is on stdout
    headed = None  # the sample whose header line was written last (-N in plain text)
    report = _Stderr(lm.context_length, each_line, settings.num_samples, verbose, lm.tokenizer)
    # --each-line can take long: a bar of finished completions on stderr (when it is a terminal).
    bar = progress(len(prompts) * settings.num_samples, "completions") if each_line else nullcontext(None)
    done = 0
    try:
        with bar as update:
            for event in events:
                if not as_json and settings.num_samples > 1 and headed != (event.index, event.sample):
                    # Samples follow each other in plain text; a line between them tells where one ends.
                    headed = (event.index, event.sample)
                    _write(f"── sample {event.sample + 1} of {settings.num_samples} ──\n")
                if isinstance(event, TextChunk):
                    if not as_json:
                        if echo and not line_open:
                            _write(prompts[event.index])
                        _write(event.text)
                        line_open = True
                    continue
                if as_json:
                    emit_json(event.to_json(lm.name))
                else:
                    _write(("" if line_open or not echo else event.prompt) + "\n")
                    line_open = False
                report.finished(event)
                done += 1
                if update is not None:
                    update(done)
    except KeyboardInterrupt:
        # Stop generating, keep what was printed, and end its line so the shell prompt starts clean.
        events.close()
        if line_open:
            _write("\n")
        raise typer.Exit(130) from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@dataclass
class _Stderr:
    """What goes to stderr as samples finish: notes once per prompt, and -v statistics."""

    context: int
    each_line: bool
    samples: int
    verbose: bool
    tokenizer: Tokenizer
    noted: set[tuple[str, int]] = field(default_factory=set)

    def finished(self, done: Completion) -> None:
        where = f"prompt {done.index + 1}" if self.each_line else "the prompt"
        unk = unknown_token_id(self.tokenizer)
        new = done.token_ids[:-1] if done.finish_reason == "eos" else done.token_ids
        if unk is not None and new and all(i == unk for i in new) and self._first("unk", done.index):
            note(
                f"the completion of {where} is only the unknown token [UNK]: the model learned to predict "
                "text its tokenizer cannot spell (see `gptcli score` on your training text)"
            )
        if done.dropped and self._first("cut", done.index):
            note(
                f"{where} has more tokens than the context ({self.context}); "
                f"cut {done.dropped} from the start, kept the last {len(done.prompt_ids)}"
            )
        if done.context_full and self._first("full", done.index):
            note(f"{where} reached the model's context limit ({self.context} tokens) before -n new tokens")
        if not self.verbose:
            return
        label = [f"prompt {done.index + 1}"] if self.each_line else []
        label += [f"sample {done.sample + 1}"] if self.samples > 1 else []
        print(
            (f"{' '.join(label)}: " if label else "")
            + f"{len(done.prompt_ids)} prompt tokens, {len(done.token_ids)} new tokens, "
            f"first token {done.first_token_seconds * 1000:.0f} ms, {done.tokens_per_second:.1f} tokens/s, "
            f"finish {done.finish_reason}" + (f", seed {done.seed}" if done.seed is not None else ""),
            file=sys.stderr,
            flush=True,
        )

    def _first(self, kind: str, index: int) -> bool:
        seen = (kind, index) in self.noted
        self.noted.add((kind, index))
        return not seen


def _describe(settings: Settings) -> None:
    """The decoding settings in effect and where each came from (-v)."""
    if settings.sampling:
        parts = [
            f"temperature {settings.temperature}",
            f"top-k {settings.top_k or 'off'}",
            f"top-p {settings.top_p if settings.top_p < 1 else 'off'}",
            f"min-p {settings.min_p or 'off'}",
        ]
        names = ["temperature", "top_k", "top_p", "min_p"]
    else:
        parts, names = ["greedy"], ["greedy"]
    parts += [
        f"repetition penalty {settings.repetition_penalty}",
        f"max new tokens {settings.max_new_tokens}",
    ]
    names += ["repetition_penalty", "max_new_tokens"]
    shown = [
        f"{part} ({settings.sources.get(name)})" if settings.sources.get(name) != "default" else part
        for part, name in zip(parts, names, strict=True)
    ]
    print(f"settings: {', '.join(shown)}", file=sys.stderr, flush=True)
