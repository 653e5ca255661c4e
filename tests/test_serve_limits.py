"""`gptcli serve` against clients that are not nice, each case against a real server process: connection
floods, answers far bigger than their requests, slow and vanished readers, full queues, cross-site
requests, SIGTERM mid-stream, and the log telling what happened.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_serve import Server

openai = pytest.importorskip("openai")

LONG = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def folder(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    import tiny

    root = tmp_path_factory.mktemp("limits")
    return tiny.save_gpt2(
        root / "tiny-limits", AutoTokenizer.from_pretrained(models["bpe"]), n_positions=1024
    )


@pytest.fixture(scope="module")
def server(folder: Path):
    running = Server("-m", str(folder), "--timeout", "2", "--allowed-host", "gptcli.test").ready()
    yield running
    running.stop()


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def raw(server: Server, data: bytes, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # a small window: the server's writes block as soon as the client stops reading
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port_of(server)))
    sock.sendall(data)
    return sock


def received(sock: socket.socket, end: bytes, timeout: float = 10) -> bytes:
    """What the socket receives until it ends with `end`, closes, or `timeout` passes."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while not data.endswith(end):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def post_head(body: bytes, path: str = "/v1/completions", length: int | None = None) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    ).encode() + body


def wait_for(predicate, timeout: float = 20, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def log_lines(server: Server, pattern: str) -> list[str]:
    return [line for line in server.lines if re.search(pattern, line)]


# --- Connections --------------------------------------------------------------------------------------


def test_a_flood_of_stalled_connections_is_bounded_and_logged_once_a_second(folder: Path) -> None:
    """Half a header from five times more clients than allowed: the server keeps at most
    --max-connections open, a stalled one makes room for a new one, so others are still served during
    the flood; connections that are all in requests refuse a new one with a 503; the log has a few lines
    (counts), no traceback; the soft limit on open files is raised to the hard one."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 512))

    flooded = Server(
        "-m", str(folder), "--max-connections", "40", "--timeout", "1.5", preexec_fn=low_limit
    ).ready()
    try:
        limits = Path(f"/proc/{flooded.process.pid}/limits").read_text()
        assert re.search(r"Max open files\s+512\s+512", limits), "the soft limit is raised to the hard one"
        stalled = [raw(flooded, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-") for _ in range(200)]
        assert _health_ok(flooded)  # served during the flood
        assert len(_open_connections(flooded)) <= 41
        for sock in stalled:
            sock.close()
        # Connections that are all in a request (a body that has not arrived): the next one gets a 503.
        busy = [raw(flooded, post_head(b'{"prompt": ', length=100)) for _ in range(40)]
        time.sleep(0.3)
        extra = raw(flooded, b"")
        assert received(extra, b"}").startswith(b"HTTP/1.1 503")
        for sock in [*busy, extra]:
            sock.close()
        assert wait_for(lambda: _health_ok(flooded), timeout=15)
        assert flooded.process.poll() is None
        lines = [line for line in flooded.lines if line.startswith("server:")]
        assert lines and len(lines) < 20, lines
        assert any("closed the oldest" in line for line in lines)
        assert any("refused connections" in line for line in lines)
        assert not any("Traceback" in line for line in flooded.lines)
    finally:
        flooded.stop()


def test_running_out_of_files_is_a_line_a_second_not_a_traceback_each(folder: Path) -> None:
    """With 100 files and 300 connections, accepting fails (asyncio's `socket.accept() out of system
    resource`): counted in one line a second, never a traceback; the server answers once they go."""

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))

    starved = Server("-m", str(folder), preexec_fn=few_files).ready()
    try:
        stalled = [raw(starved, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-") for _ in range(300)]
        time.sleep(3)
        for sock in stalled:
            sock.close()
        assert wait_for(lambda: _health_ok(starved), timeout=15)
        lines = [line for line in starved.lines if line.startswith("server:")]
        assert any("out of system resource" in line for line in lines), lines
        assert len(lines) < 30 and not any("Traceback" in line for line in starved.lines), lines
    finally:
        starved.stop()


def _open_connections(server: Server) -> list[str]:
    """The server's established TCP connections (from /proc: its sockets' inodes in /proc/net/tcp)."""
    import os

    inodes = set()
    for fd in Path(f"/proc/{server.process.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    rows = (
        Path("/proc/net/tcp").read_text().splitlines()[1:]
        + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    )
    return [r for r in rows if r.split()[9] in inodes and r.split()[3] == "01"]  # 01: ESTABLISHED


def _health_ok(server: Server) -> bool:
    try:
        return httpx.get(server.url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_body_that_does_not_arrive_gets_408_and_a_short_one_is_logged_as_a_disconnect(server) -> None:
    sock = raw(server, post_head(b'{"prompt": ', length=100))
    answer = received(sock, b"}")
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in answer.replace(b" ", b"")
    sock.close()
    assert wait_for(lambda: log_lines(server, r'"POST /v1/completions" 408 '))
    before = len(server.lines)
    sock = raw(server, post_head(b'{"prompt": "x"', length=100))
    sock.close()
    line = wait_for(lambda: [x for x in server.lines[before:] if "/v1/completions" in x])
    assert line and " disconnected " in line[0] and " 500 " not in line[0]


# --- Amplification ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/completions",
            {
                "prompt": "Hello",
                "max_tokens": 255,
                "n": 128,
                "temperature": 1,
                "logprobs": 100,
                "ignore_eos": True,
            },
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 255,
                "n": 128,
                "logprobs": True,
                "top_logprobs": 100,
                "ignore_eos": True,
            },
        ),
        ("/v1/completions", {"prompt": ["Hello"] * 64, "max_tokens": 0, "echo": True, "logprobs": 100}),
        ("/tokenize", {"content": "今天天气很好 " * 120_000, "with_pieces": True}),
    ],
    ids=["completions", "chat", "echo", "with_pieces"],
)
def test_an_answer_far_bigger_than_its_request_is_refused_before_any_work(server, path, body) -> None:
    if path == "/v1/completions" and body.get("echo"):
        body = {**body, "prompt": ["今天天气很好 " * 60] * 64}
    tokens = server.idle()["tokens"]
    rss = server.rss_kib()
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "output_too_large" and "at most" in error["message"]
    assert server.idle()["tokens"] == tokens  # nothing generated
    assert server.rss_kib() < rss + 200 * 1024


def test_the_same_requests_within_the_budget_are_served(server) -> None:
    body = {"prompt": "Hello", "max_tokens": 20, "n": 16, "logprobs": 5, "temperature": 1, "seed": 1}
    answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert len(answer["choices"]) == 16 and all(len(c["logprobs"]["tokens"]) >= 1 for c in answer["choices"])
    text = "今天天气很好 " * 100
    pieces = httpx.post(server.url + "/tokenize", json={"content": text, "with_pieces": True}).json()
    assert pieces["count"] == len(pieces["tokens"]) > 100


def test_a_huge_prompt_is_refused_from_its_start(server) -> None:
    """2 MB of words: refused from its first characters (its start alone is past the context), with
    the same code as any prompt too long; a prompt of the same size but fewer, long tokens is not
    refused that way (a prompt is tokenized whole unless its start already proves it too long)."""
    for path, body in (
        ("/v1/completions", {"prompt": "今天 天气 很好 " * 100_000, "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b " * 600_000}]}),
    ):
        response = httpx.post(server.url + path, json=body, timeout=60)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "more than" in error["message"]
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * 40_000}, timeout=60)
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "more than" not in response.json()["error"]["message"]  # no space to cut at: counted whole


# --- Slow readers, vanished ones, full queues ------------------------------------------------------------


def test_a_client_that_stops_reading_pauses_its_rows_then_is_cut_off(server) -> None:
    """8 streamed completions with logprobs (megabytes of events) to a client that never reads: its rows
    leave the batch while it is behind (no token generated), then after --timeout the stream is cut and
    the rows are let go; other clients are served meanwhile."""
    before = server.idle()["tokens"]
    body = json.dumps({**LONG, "n": 8, "logprobs": 5, "stream": True}).encode()
    sock = raw(server, post_head(body), rcvbuf=4096)
    paused = wait_for(lambda: server.health()["paused"] == 8, timeout=20)
    assert paused, server.health()
    tokens = server.health()["tokens"]
    answer = httpx.post(server.url + "/v1/completions", json={"prompt": "b", "max_tokens": 5}, timeout=30)
    assert answer.status_code == 200  # the batch goes on for others
    time.sleep(0.5)
    assert server.health()["tokens"] - tokens <= 5 + 8  # the paused rows made at most one more step
    state = wait_for(lambda: (lambda h: h["rows"] == h["paused"] == 0 and h)(server.health()), timeout=20)
    assert state, server.health()
    assert state["tokens"] - before < 8 * 1000  # far from the 8,000 tokens asked for
    line = wait_for(lambda: log_lines(server, r"cut short .*client took no data"))
    assert line and " 200 " in line[-1], server.lines[-5:]
    sock.close()


def test_a_full_waiting_line_answers_429_with_retry_after(folder: Path) -> None:
    busy = Server("-m", str(folder), "--max-batch", "1", "--max-waiting", "1").ready()
    streams = []
    try:
        # 4 completions, one row at a time: the request waits until its last one has joined the batch
        streams.append(raw(busy, post_head(json.dumps({**LONG, "n": 4}).encode())))
        assert wait_for(lambda: busy.health()["waiting"] == 1)
        response = httpx.post(busy.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        client = openai.OpenAI(base_url=busy.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="m", prompt="x", max_tokens=2)
        assert wait_for(lambda: log_lines(busy, r'"POST /v1/completions" 429 '))
    finally:
        for sock in streams:
            sock.close()
        busy.stop()


def test_a_request_reset_while_waiting_is_logged_as_a_disconnect(folder: Path) -> None:
    busy = Server("-m", str(folder), "--max-batch", "1").ready()
    try:
        first = raw(busy, post_head(json.dumps({**LONG, "n": 4}).encode()))
        assert wait_for(lambda: busy.health()["rows"] == 1)
        queued = raw(busy, post_head(json.dumps({"prompt": "x", "max_tokens": 16}).encode()))
        assert wait_for(lambda: busy.health()["waiting"] == 2)
        queued.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        queued.close()  # a reset
        first.close()
        line = wait_for(lambda: log_lines(busy, r'"POST /v1/completions" disconnected .*client went away$'))
        assert line, busy.lines[-5:]
        assert not log_lines(busy, r'"POST /v1/completions" 200 .*\+0 tokens')
    finally:
        busy.stop()


# --- Cross-site -------------------------------------------------------------------------------------------


def test_other_hosts_and_non_json_bodies_are_refused(server) -> None:
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    ok = {"content-type": "application/json"}
    for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example"):
        response = httpx.post(server.url + "/v1/completions", content=body, headers={**ok, "host": host})
        assert response.status_code == 421 and response.json()["error"]["code"] == "invalid_host"
    for host in (f"127.0.0.1:{port_of(server)}", "localhost", "[::1]:80", "gptcli.test", "GPTCLI.test:1"):
        response = httpx.post(server.url + "/v1/completions", content=body, headers={**ok, "host": host})
        assert response.status_code == 200, (host, response.text)
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": kind} if kind else {}
        response = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
        assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    headers = {"content-type": "Application/JSON; charset=utf-8"}
    assert httpx.post(server.url + "/v1/completions", content=body, headers=headers).status_code == 200
    (model,) = httpx.get(server.url + "/v1/models").json()["data"]
    assert model["id"] == "tiny-limits" and "/" not in model["id"]


# --- Stopping ---------------------------------------------------------------------------------------------


def test_sigterm_gives_a_grace_period_then_503_and_an_error_event(folder: Path) -> None:
    stopping = Server("-m", str(folder), "--grace", "1").ready()
    results: dict[str, object] = {}

    def whole() -> None:
        body = {**LONG, "n": 64}
        results["whole"] = httpx.post(stopping.url + "/v1/completions", json=body, timeout=60)

    def stream() -> None:
        lines = []
        body = {**LONG, "n": 16, "stream": True}
        with httpx.stream("POST", stopping.url + "/v1/completions", json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        results["stream"] = lines

    threads = [threading.Thread(target=whole), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    assert wait_for(lambda: stopping.health()["rows"] >= 32)
    stopping.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    whole_answer = results["whole"]
    assert isinstance(whole_answer, httpx.Response)
    assert whole_answer.status_code == 503, whole_answer.text[:200]
    assert whole_answer.json()["error"]["code"] == "server_shutting_down"
    lines = results["stream"]
    assert isinstance(lines, list) and lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])
    assert error["error"]["message"] == "the server is shutting down"
    assert stopping.process.wait(30) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    assert not any("Traceback" in line or "CancelledError" in line for line in stopping.lines)
    assert log_lines(stopping, r'"POST /v1/completions" 503 ')


def test_a_failing_request_gets_a_500_and_the_others_go_on(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose processing raises mid-batch (the engine's test-only fault, a real code path) gets
    a 500 with the reason; a stream decoding beside it and a request waiting for room (--max-batch 2)
    finish with what they give alone."""
    monkeypatch.setenv("GPTCLI_ENGINE_FAULT", "boom")
    server = Server("-m", str(folder), "--max-batch", "2").ready()
    try:
        body = {"max_tokens": 60, "temperature": 0, "ignore_eos": True}
        url = server.url + "/v1/completions"
        streamed: list[str] = []
        first = threading.Event()

        def stream() -> None:
            with httpx.stream(
                "POST", url, json={**body, "prompt": "The weather", "stream": True}, timeout=60
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        streamed.append(json.loads(line[6:])["choices"][0]["text"])
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        answers: dict[str, httpx.Response] = {}

        def post(prompt: str) -> None:
            answers[prompt] = httpx.post(url, json={**body, "prompt": prompt}, timeout=60)

        posts = [threading.Thread(target=post, args=(p,)) for p in ("boom", "今天")]
        for t in posts:
            t.start()
        for t in [*posts, reader]:
            t.join(60)
        failed = answers["boom"]
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert "injected fault" in error["message"] and error["code"] == "generation_failed"
        assert (
            answers["今天"].status_code == 200 and answers["今天"].json()["usage"]["completion_tokens"] == 60
        )
        for prompt, text in (
            ("The weather", "".join(streamed)),
            ("今天", answers["今天"].json()["choices"][0]["text"]),
        ):
            alone = httpx.post(url, json={**body, "prompt": prompt}, timeout=60)
            assert text == alone.json()["choices"][0]["text"]
        assert server.idle()["rows"] == 0
    finally:
        server.stop()
