"""`gptcli serve`: a real server process, driven by the official `openai` client and by raw HTTP.

Every number is checked against the CLI on the same model: greedy completions against `complete
--greedy`, logprobs against `topk`, seeded samples against `complete --seed`, tokens against `tokenize`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gptcli.serving.chat import TRANSCRIPT_STOPS, transcript
from gptcli.serving.responses import legacy_piece

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-Zq9"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Server:
    """`python -m gptcli serve ARGS --port 0` in a subprocess; its URL, log lines and process."""

    def __init__(self, *args: str, **popen) -> None:
        """Start it (`popen`: more of subprocess.Popen's arguments); `ready()` waits until it answers."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        env["OMP_NUM_THREADS"] = "1"  # tiny models: a second thread costs more than it gives
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gptcli", "serve", *args, "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            **popen,
        )
        self.lines: list[str] = []
        self.url = ""
        self._found = found = threading.Event()

        def read() -> None:
            for line in self.process.stderr:  # type: ignore[union-attr]
                self.lines.append(line.rstrip("\n"))
                match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
                if match and not self.url:
                    self.url = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()

    def ready(self) -> Server:
        if not self._found.wait(120) or not self.url:
            self.process.kill()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines))
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server does not answer /health")
            time.sleep(0.1)
        return self

    def health(self) -> dict:
        state: dict = httpx.get(self.url + "/health", timeout=10).json()
        return state

    def idle(self, timeout: float = 20) -> dict:
        """/health once no row decodes and no job waits."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.health()
            if (state["rows"], state["waiting"]) == (0, 0) or time.monotonic() > deadline:
                return state
            time.sleep(0.02)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture(scope="module")
def folders(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 with a 1,024-token context (long streams to cut short), and a copy with a chat
    template."""
    from transformers import AutoTokenizer

    import tiny

    root = tmp_path_factory.mktemp("serve")
    plain = tiny.save_gpt2(
        root / "tiny-serve", AutoTokenizer.from_pretrained(models["bpe"]), n_positions=1024
    )
    chat = root / "tiny-chat"
    shutil.copytree(plain, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return {"plain": plain, "chat": chat}


@pytest.fixture(scope="module")
def servers(folders: dict[str, Path]):
    """Two servers, started together: the plain model, and the chat-template one behind --api-key."""
    running = {
        "plain": Server("-m", str(folders["plain"])),
        "keyed": Server("-m", str(folders["chat"]), "--api-key", KEY),
    }
    yield running
    for one in running.values():
        one.stop()


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    return servers["plain"].ready()


@pytest.fixture(scope="module")
def keyed(servers: dict[str, Server]) -> Server:
    return servers["keyed"].ready()


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def cli_json(cli, *args: str) -> list[dict]:
    result = cli(*args)
    assert result.code == 0, result.err
    return [json.loads(line) for line in result.out.splitlines()]


# --- The same numbers as the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["今天天气", "The weather is", "Hello world! 12345"])
def test_greedy_completion_equals_the_cli(server, client, cli, folders, prompt: str) -> None:
    answer = client.completions.create(model="any", prompt=prompt, max_tokens=20, temperature=0, logprobs=3)
    (ref,) = cli_json(
        cli, "complete", prompt, "-m", folders["plain"], "--greedy", "-n", "20", "--logprobs", "3"
    )
    choice = answer.choices[0]
    assert choice.text == ref["text"]
    assert choice.logprobs.tokens == [legacy_piece(e["bytes"]) for e in ref["logprobs"]]
    assert len(choice.logprobs.tokens) == len(ref["token_ids"])
    for ours, theirs in zip(choice.logprobs.token_logprobs, ref["logprobs"], strict=True):
        assert abs(ours - theirs["logprob"]) < 1e-5
    for ours, theirs in zip(choice.logprobs.top_logprobs, ref["logprobs"], strict=True):
        expected = {legacy_piece(t["bytes"]): t["logprob"] for t in theirs["top_logprobs"]}
        assert set(expected) <= set(ours) and all(abs(ours[k] - v) < 1e-5 for k, v in expected.items())
    assert choice.finish_reason == {"eos": "stop"}.get(ref["finish_reason"], ref["finish_reason"])
    assert answer.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == len(ref["token_ids"])


def test_presence_and_frequency_penalties_equal_the_cli(client, cli, folders) -> None:
    prompt = "今天天气"
    penalties = {"presence_penalty": 1.5, "frequency_penalty": -0.5}
    answer = client.completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0, **penalties)
    chat = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "x"}], max_tokens=4, temperature=0, **penalties
    )
    assert chat.choices[0].message.content is not None  # the chat endpoint takes them too
    flags = ["--presence-penalty", "1.5", "--frequency-penalty", "-0.5"]
    (ref,) = cli_json(
        cli, "complete", prompt, "-m", folders["plain"], "--greedy", "-n", "16", "--json", *flags
    )
    (plain,) = cli_json(cli, "complete", prompt, "-m", folders["plain"], "--greedy", "-n", "16", "--json")
    assert answer.choices[0].text == ref["text"] != plain["text"]


def test_logprobs_equal_topk(client, cli, folders) -> None:
    prompt = "今天天气很"
    answer = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0, logprobs=5)
    top = answer.choices[0].logprobs.top_logprobs[0]
    (ref,) = cli_json(cli, "topk", prompt, "-m", folders["plain"], "-k", "5", "--json")
    for token in ref["tokens"]:
        assert abs(top[legacy_piece(token["bytes"])] - token["logprob"]) < 1e-5


def test_a_seeded_sample_equals_the_cli(client, cli, folders) -> None:
    prompt = "The weather is"
    answer = client.completions.create(
        model="m",
        prompt=prompt,
        max_tokens=24,
        temperature=2.5,
        top_p=0.95,
        seed=7,
        n=2,
        extra_body={"top_k": 40},
    )
    refs = cli_json(
        cli, "complete", prompt, "-m", folders["plain"], "--seed", "7", "--temperature", "2.5",
        "--top-p", "0.95", "--top-k", "40", "-n", "24", "-N", "2", "--json",
    )  # fmt: skip
    assert [c.text for c in answer.choices] == [r["text"] for r in refs]
    assert answer.choices[0].text != answer.choices[1].text  # sample 1 is seed 8, its own draw


def test_streamed_text_is_whole_characters_and_equals_the_answer(client) -> None:
    split = 0
    for seed in range(4):
        asked = {
            "model": "m",
            "prompt": "龙",
            "max_tokens": 40,
            "temperature": 3.0,
            "top_p": 1.0,
            "seed": seed,
        }
        whole = client.completions.create(**asked, logprobs=0, extra_body={"top_k": 0}).choices[0]
        chunks = [
            c.choices[0].text
            for c in client.completions.create(**asked, stream=True, extra_body={"top_k": 0})
        ]
        # A chunk with half a character would decode to U+FFFD and differ from the one-shot text.
        assert "".join(chunks) == whole.text
        split += sum(t.startswith("bytes:") for t in whole.logprobs.tokens)
    assert split >= 3, "no token was part of a character: the test no longer covers split characters"


def test_server_sent_events_end_with_usage_and_done(server) -> None:
    body = {
        "prompt": "今天",
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    texts = [json.loads(line[6:])["choices"] for line in lines[:-2]]
    assert texts[-1][0]["finish_reason"] == "length"


def test_echo_scores_the_prompt(client, folders) -> None:
    import torch

    from gptcli.generation.tokens import encode_prompt
    from gptcli.loading.models import load_model

    prompt = "今天天气很好"
    answer = client.completions.create(model="m", prompt=prompt, max_tokens=0, echo=True, logprobs=2).choices[
        0
    ]
    assert answer.text == prompt
    lm = load_model(str(folders["plain"]))
    ids = encode_prompt(lm.tokenizer, prompt)
    reference = torch.log_softmax(lm.logits(torch.tensor([ids]))[0].float(), dim=-1)
    assert answer.logprobs.token_logprobs[0] is None and len(answer.logprobs.tokens) == len(ids)
    for j, logprob in enumerate(answer.logprobs.token_logprobs[1:], 1):
        assert abs(logprob - reference[j - 1, ids[j]].item()) < 1e-5
    assert answer.logprobs.text_offset[0] == 0 and answer.logprobs.text_offset == sorted(
        answer.logprobs.text_offset
    )
    more = client.completions.create(
        model="m", prompt=prompt, max_tokens=5, echo=True, temperature=0
    ).choices[0]
    alone = client.completions.create(model="m", prompt=prompt, max_tokens=5, temperature=0).choices[0]
    assert more.text == prompt + alone.text


def test_prompt_lists_and_token_ids(server, client) -> None:
    answer = client.completions.create(model="m", prompt=["今天", "The"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    alone = client.completions.create(model="m", prompt="The", max_tokens=4, temperature=0).choices[0]
    assert answer.choices[2].text == answer.choices[3].text == alone.text
    ids = httpx.post(server.url + "/tokenize", json={"content": "The"}).json()["tokens"]
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0).choices[0]
    assert by_ids.text == alone.text


def test_chat_without_a_template_is_a_plain_transcript(client, cli, folders) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "今天天气"}]
    answer = client.chat.completions.create(
        model="m", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    prompt = transcript(messages)
    stops = [arg for stop in TRANSCRIPT_STOPS for arg in ("--stop", stop)]
    (ref,) = cli_json(
        cli, "complete", prompt, "-m", folders["plain"], "--greedy", "-n", "12", *stops, "--json"
    )
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    (top,) = cli_json(cli, "topk", prompt, "-m", folders["plain"], "-k", "3", "--json")
    first = choice.logprobs.content[0]
    assert [bytes(t.bytes).hex() for t in first.top_logprobs] == [t["bytes"] for t in top["tokens"]]
    assert all(
        abs(a.logprob - b["logprob"]) < 1e-5 for a, b in zip(first.top_logprobs, top["tokens"], strict=True)
    )
    streamed = client.chat.completions.create(
        model="m", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


def test_tokenize_and_detokenize_match_the_cli(server, cli, folders) -> None:
    text = "今天天气 hello 龙"
    answer = httpx.post(server.url + "/tokenize", json={"content": text, "with_pieces": True}).json()
    (ref,) = cli_json(cli, "tokenize", text, "-m", folders["plain"], "--json")
    assert [(t["id"], t["token"], t["bytes"]) for t in answer["tokens"]] == [
        (t["id"], t["token"], t["bytes"]) for t in ref["tokens"]
    ]
    assert any(isinstance(t["piece"], list) for t in answer["tokens"])  # part of a character: its bytes
    ids = httpx.post(server.url + "/tokenize", json={"content": text}).json()["tokens"]
    assert ids == [t["id"] for t in ref["tokens"]]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json() == {
        "content": text,
        "prompt": text,
    }


def test_models_and_health(server, client) -> None:
    (model,) = client.models.list().data
    assert model.id == "tiny-serve" and model.owned_by == "gptcli"  # the folder's name, not its path
    assert server.health()["status"] == "ok"


def test_concurrent_requests_equal_one_at_a_time(client) -> None:
    prompts = ["今天天气", "The weather is", "龙", "Hello world", "我喜欢", "It might rain", "a", "学习"]
    asked = {"model": "m", "max_tokens": 24, "temperature": 0}
    alone = [client.completions.create(prompt=p, **asked).choices[0].text for p in prompts]
    together: list[str | None] = [None] * len(prompts)

    def ask(i: int) -> None:
        together[i] = client.completions.create(prompt=prompts[i], **asked).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone


# --- Bad requests: OpenAI's error object, never a traceback, never a dead server --------------------

LONG = "今天天气很好 " * 400  # far past the 1,024-token context

BAD = [
    ("POST", "/v1/completions", b'{"prompt": "x"', 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "invalid_encoding"),
    ("POST", "/v1/completions", b'["prompt"]', 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1e999}', 400, "invalid_value"),
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, None),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 10**9}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 10**9}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "seed": -3}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "stop": ""}, 400, None),
    ("POST", "/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "unknown_parameter"),
    ("POST", "/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400, None),
    ("POST", "/v1/completions", {"prompt": [], "max_tokens": 1}, 400, None),
    ("POST", "/v1/completions", {"prompt": [10**9]}, 400, None),
    ("POST", "/v1/completions", {"prompt": "\ud800"}, 400, None),
    ("POST", "/v1/completions", b'{"prompt": "x", "stop": "\\ud800"}', 400, "invalid_value"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, None),
    ("POST", "/v1/completions", {"prompt": LONG}, 400, "context_length_exceeded"),
    ("POST", "/v1/completions", {"max_tokens": 3}, 400, None),
    ("POST", "/v1/completions", {"prompt": ["a"] * 100, "n": 2}, 400, None),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        None,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        None,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{}]},
        400,
        None,
    ),
    ("POST", "/tokenize", {"content": 5}, 400, "invalid_value"),
    ("POST", "/detokenize", {"tokens": [-1]}, 400, None),
    ("GET", "/v1/completions", None, 405, "method_not_allowed"),
    ("GET", "/v1/nothing", None, 404, "unknown_url"),
    ("GET", "/v1/models/other-model", None, 404, "model_not_found"),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}', 413, "request_too_large"),
]


def send(server: Server, method: str, path: str, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.request(method, server.url + path, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD, ids=range(len(BAD)))
def test_bad_requests_get_an_openai_error(server, method, path, body, status: int, code) -> None:
    response = send(server, method, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    assert error["code"], "every refusal names its reason for programs"


def test_errors_reach_the_openai_client_as_its_exceptions(client) -> None:
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="m", prompt=LONG, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        client.completions.create(model="m", prompt="x", extra_body={"mirostat": 2})


def test_a_client_that_leaves_mid_stream_frees_its_row(server) -> None:
    before = server.idle()["tokens"]
    body = {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # The row leaves the batch at the next step: far fewer than the 1,000 tokens asked for.
    after = server.idle()
    assert after["rows"] == 0 and after["tokens"] - before < 100
    deadline = time.monotonic() + 5
    while not any("cut short" in line for line in server.lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("cut short" in line for line in server.lines)


def test_one_log_line_per_request(server) -> None:
    marker = f"/v1/models/log-{random.randrange(10**9)}"
    httpx.get(server.url + marker)
    deadline = time.monotonic() + 5
    while not [line for line in server.lines if marker in line] and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = [line for line in server.lines if marker in line]
    assert line.startswith("127.0.0.1 ") and " 404 " in line
    assert not any("Traceback" in line for line in server.lines)


# --- The command's own checks -------------------------------------------------------------------------


def test_a_busy_port_fails_before_the_model_loads(cli) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "-m", "/no/such/model", "--port", port, "--host", "0.0.0.0")
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("warning: listening on 0.0.0.0 without --api-key: ")  # one prefix
    assert lines[-1].startswith("Error: cannot listen on 0.0.0.0:") and len(lines) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "--max-batch"),
        (["--api-key", " "], "--api-key"),
        (["--max-waiting", "-1"], "--max-waiting"),
        (["--max-connections", "0"], "--max-connections"),
        (["--prefill-chunk", "-1"], "--prefill-chunk"),
        (["--timeout", "0"], "--timeout"),
        (["--grace", "nan"], "--grace"),
    ],
)
def test_bad_options_are_usage_errors(cli, args: list[str], message: str) -> None:
    result = cli("serve", "-m", "/no/such/model", *args)
    assert result.code == 2 and message in result.err


# --- The API key, a chat template, and stopping --------------------------------------------------------


def test_the_api_key_guards_every_endpoint_but_health(keyed) -> None:
    assert httpx.get(keyed.url + "/health").status_code == 200
    for headers, code in (
        ({}, "missing_api_key"),
        ({"Authorization": KEY}, "missing_api_key"),
        ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEY}x"}, "invalid_api_key"),
    ):
        response = httpx.get(keyed.url + "/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == code
        assert response.headers["www-authenticate"].startswith("Bearer")
    response = httpx.post(keyed.url + "/tokenize", json={"content": "x"})
    assert response.status_code == 401 and "didn't provide an API key" in response.json()["error"]["message"]
    for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 9110: the scheme is case-insensitive
        headers = {"Authorization": f"{scheme} {KEY}"}
        assert httpx.get(keyed.url + "/v1/models", headers=headers).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_uses_the_model_s_template(keyed, cli, folders) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "今天天气"}]
    chat = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    answer = chat.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(folders["chat"])
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>今天天气\n<|assistant|>"
    (ref,) = cli_json(cli, "complete", prompt, "-m", folders["chat"], "--greedy", "-n", "10", "--json")
    assert answer.choices[0].message.content == ref["text"]


def test_sigterm_lets_the_request_in_flight_finish_and_stops(keyed) -> None:
    body = {"prompt": "a", "max_tokens": 600, "ignore_eos": True, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    lines: list[str] = []
    with httpx.stream(
        "POST", keyed.url + "/v1/completions", json=body, headers=headers, timeout=30
    ) as response:
        for line in response.iter_lines():
            if line and not lines:
                keyed.process.send_signal(signal.SIGTERM)
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]"  # finished within the grace period
    started = time.monotonic()
    code = keyed.process.wait(20)
    assert time.monotonic() - started < 15
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    assert not any("Traceback" in line for line in keyed.lines)


# --- Load ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reliability_under_mixed_load(server) -> None:
    """16 clients, 208 requests: valid ones (whole and streamed), malformed ones, and streams abandoned
    after their first chunk. Every valid answer is right, the server stays up, memory comes back."""
    prompts = [
        "今天天气",
        "The weather is",
        "龙",
        "Hello world! 12345",
        "我喜欢在早上喝",
        "It might rain",
        "a",
    ]
    asked = {"max_tokens": 16, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        expected = {p: http.post("/v1/completions", json={"prompt": p, **asked}).json() for p in prompts}
    expected_text = {p: a["choices"][0]["text"] for p, a in expected.items()}
    failures: list[str] = []

    def one(http: httpx.Client, rng: random.Random) -> None:
        kind = rng.choice(["whole", "whole", "stream", "bad", "leave"])
        prompt = rng.choice(prompts)
        if kind == "whole":
            text = http.post("/v1/completions", json={"prompt": prompt, **asked}).json()["choices"][0]["text"]
            if text != expected_text[prompt]:
                failures.append(f"{prompt!r}: {text!r}")
        elif kind == "stream":
            body = {"prompt": prompt, **asked, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            text = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])
            if data[-1] != "[DONE]" or text != expected_text[prompt]:
                failures.append(f"stream {prompt!r}: {text!r}")
        elif kind == "bad":
            method, path, bad_body, status, _ = rng.choice([b for b in BAD if b[3] != 413])
            response = send(server, method, path, bad_body)
            if response.status_code != status or "error" not in response.json():
                failures.append(f"bad {path}: {response.status_code}")
        else:
            body = {"prompt": prompt, "max_tokens": 500, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                next(response.iter_lines())

    def client(seed: int, count: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for _ in range(count):
                try:
                    one(http, rng)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

    def load(count: int) -> None:
        threads = [threading.Thread(target=client, args=(seed, count)) for seed in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    # Warm up until the allocations that stay (thread pools, caches, the widest batch's buffers, whose
    # width depends on how the clients happen to overlap) are made; then a second round as long as the
    # first must not grow the server: memory does not grow with the requests served.
    load(6)
    server.idle()
    before = server.rss_kib()
    load(7)  # 16 × (6 + 7) = 208 requests
    state = server.idle()
    after = server.rss_kib()
    assert not failures, failures[:5]
    assert state == {**state, "status": "ok", "rows": 0, "waiting": 0}
    assert server.process.poll() is None
    assert after < before + 16 * 1024, (before, after)  # KiB: back near where it was (measured: +2 to 5 MiB)
