"""The `serve` command: the model behind a local OpenAI-compatible HTTP server."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gptcli.cli._common import (
    SERVE,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    QuantizeOpt,
    ThreadsOpt,
    TrustCodeOpt,
    command,
    load,
    note,
    warn,
)
from gptcli.loading.models import check_quantize, check_threads
from gptcli.serving import GRACE_SECONDS, MAX_CONNECTIONS, MAX_WAITING, PREFILL_CHUNK, TIMEOUT_SECONDS

_EXAMPLES = """\
[bold]Examples[/bold]

  gptcli serve -m gpt2
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 3}'
  GPTCLI_API_KEY=secret gptcli serve --host 0.0.0.0 --port 8080

docs/serve.md: the endpoints, their parameters, and use from the openai package and simonw/llm.
"""


@command(rich_help_panel=SERVE, epilog=_EXAMPLES)
def serve(
    model: ModelOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="GPTCLI_API_KEY",
            help="Require `Authorization: Bearer KEY` on every endpoint but /health.",
            show_default=False,
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Most completions decoded together (fewer when long).")
    ] = 32,
    max_waiting: Annotated[
        int,
        typer.Option(
            "--max-waiting", help="Most requests waiting for room in the batch; past it, 429 (Retry-After)."
        ),
    ] = MAX_WAITING,
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="Most connections open at once; past it, 503.")
    ] = MAX_CONNECTIONS,
    prefill_chunk: Annotated[
        int,
        typer.Option(
            "--prefill-chunk",
            metavar="TOKENS",
            help="Most prompt tokens prefilled between two decoding steps of the running rows "
            "(0: whole prompts at once).",
        ),
    ] = PREFILL_CHUNK,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            help="Seconds a client has to send its request, or to take the next piece of a stream.",
        ),
    ] = TIMEOUT_SECONDS,
    grace: Annotated[
        float,
        typer.Option("--grace", help="Seconds requests in flight get after Ctrl-C or SIGTERM; then 503."),
    ] = GRACE_SECONDS,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="A Host name to answer for besides the listening address's own (repeatable).",
            show_default=False,
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            "--served-model-name",
            help="The model's id in /v1/models (default: its name, or a local folder's own name).",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    threads: ThreadsOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Serve the model over HTTP with OpenAI's API: /v1/completions (with logprobs), /v1/chat/completions.

    Loads the model once; requests that arrive together share the batched decode. Logs a line per request.

    Ctrl-C or SIGTERM stops it: requests in flight get --grace seconds to finish, then a 503.
    """
    from gptcli.errors import UsageError
    from gptcli.serving import check_port, is_loopback, listen
    from gptcli.serving.engine import check_max_batch

    check_port(port)
    check_quantize(quantize)
    check_threads(threads)
    check_max_batch(max_batch)
    if max_connections < 1:
        raise UsageError(f"--max-connections must be at least 1 (got {max_connections})")
    if max_waiting < 0:
        raise UsageError(f"--max-waiting must be at least 0 (got {max_waiting})")
    if prefill_chunk < 0:
        raise UsageError(f"--prefill-chunk must be at least 0 (got {prefill_chunk})")
    for name, seconds in (("--timeout", timeout), ("--grace", grace)):
        if not 0 < seconds < 86400:  # NaN fails both
            raise UsageError(f"{name} must be a number of seconds above 0 and below a day (got {seconds})")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key must not be empty")
    if not api_key and not is_loopback(host):
        warn(f"listening on {host} without --api-key: anyone who can reach this machine can use the model")
    sock = listen(host, port)  # before loading: a busy port fails at once
    try:
        lm = load(model, device, dtype, allow_pickle, trust_remote_code, quantize, threads)
    except BaseException:
        sock.close()
        raise
    from gptcli.serving import serve as run_server

    def listening(url: str) -> None:
        note(f"serving {lm.name} at {url}/v1 (OpenAI API; Ctrl-C stops)")

    try:
        run_server(
            lm,
            sock=sock,
            api_key=api_key,
            log=_log,
            on_listening=listening,
            max_rows=max_batch,
            max_waiting=max_waiting,
            prefill_chunk=prefill_chunk or None,
            max_connections=max_connections,
            timeout=timeout,
            grace=grace,
            allowed_host=allowed_host,
            model_id=served_model_name,
        )
    except KeyboardInterrupt:
        note("stopped")
        raise typer.Exit(130) from None
    note("stopped")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
