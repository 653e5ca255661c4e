"""The `serve` command: the model behind a local OpenAI-compatible HTTP server."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gptcli.cli._common import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    QuantizeOpt,
    TrustCodeOpt,
    command,
    load,
    note,
)
from gptcli.loading.models import check_quantize

_EXAMPLES = """\
[bold]Examples[/bold]

  gptcli serve -m gpt2
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 3}'
  GPTCLI_API_KEY=secret gptcli serve --host 0.0.0.0 --port 8080

docs/serve.md: the endpoints, their parameters, and use from the openai package and simonw/llm.
"""


@command(epilog=_EXAMPLES)
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
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustCodeOpt = False,
) -> None:
    """Serve the model over HTTP with OpenAI's API: /v1/completions (with logprobs), /v1/chat/completions.

    Loads the model once; requests that arrive together share the batched decode. Logs a line per request.

    Ctrl-C or SIGTERM stops it: requests in flight get a few seconds to finish.
    """
    from gptcli.errors import UsageError
    from gptcli.serving import check_port, is_loopback, listen
    from gptcli.serving.engine import check_max_batch

    check_port(port)
    check_quantize(quantize)
    check_max_batch(max_batch)
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key must not be empty")
    if not api_key and not is_loopback(host):
        note(
            f"warning: listening on {host} without --api-key: anyone who can reach this machine "
            "can use the model"
        )
    sock = listen(host, port)  # before loading: a busy port fails at once
    try:
        lm = load(model, device, dtype, allow_pickle, trust_remote_code, quantize)
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
        )
    except KeyboardInterrupt:
        note("stopped")
        raise typer.Exit(130) from None
    note("stopped")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
