"""`gptcli serve` for the clients people run, each against a real server process: lm-eval's remote
tokenizer (vLLM's /tokenizer_info, /tokenize, /detokenize) and lm-eval itself, Prometheus' /metrics,
and the request fields they send (logit_bias, stream_options.include_usage).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from test_serve import CHAT_TEMPLATE, Server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def folder(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a 1,024-token context and a chat template."""
    from transformers import AutoTokenizer

    import tiny

    root = tmp_path_factory.mktemp("clients")
    saved = tiny.save_gpt2(
        root / "tiny-clients", AutoTokenizer.from_pretrained(models["bpe"]), n_positions=1024
    )
    config = json.loads((saved / "tokenizer_config.json").read_text())
    (saved / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return saved


@pytest.fixture(scope="module")
def server(folder: Path):
    running = Server("-m", str(folder)).ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# --- The tokenizer, in llama.cpp's words and vLLM's ---------------------------------------------------


def test_tokenizer_info_is_vllm_s(server, folder) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(folder)
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == reference.eos_token and info["eos_token"]
    assert info["bos_token"] == reference.bos_token
    assert info["model_max_length"] == 1024
    assert info["chat_template"] == CHAT_TEMPLATE


def test_tokenize_and_detokenize_answer_both_dialects(server, folder) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(folder)
    text = "今天天气 hello 龙" + reference.eos_token
    ids = reference.encode(text, add_special_tokens=False)
    vllm = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    llama = httpx.post(server.url + "/tokenize", json={"content": text}).json()
    assert vllm == llama == {"tokens": ids, "count": len(ids), "max_model_len": 1024}
    strs = httpx.post(server.url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert strs["token_strs"] == reference.convert_ids_to_tokens(ids)
    decoded = httpx.post(server.url + "/detokenize", json={"tokens": ids, "model": "m"}).json()
    assert decoded == {"prompt": text, "content": text}
    for body in (
        {},
        {"content": "a", "prompt": "a"},
        {"prompt": "a", "add_special": True, "add_special_tokens": False},
    ):
        response = httpx.post(server.url + "/tokenize", json=body)
        assert response.status_code == 400 and response.json()["error"]["code"]


def test_lm_eval_s_remote_tokenizer_check_passes(server, folder) -> None:
    utils = pytest.importorskip("lm_eval.utils")
    from transformers import AutoTokenizer

    assert utils.check_remote_tokenizer_support(server.url + "/v1/completions")
    remote = utils.RemoteTokenizer(server.url + "/v1/completions")
    ids = remote.encode("今天天气")
    assert ids == AutoTokenizer.from_pretrained(folder).encode("今天天气")
    assert remote.decode(ids) == "今天天气"
    assert remote.eos_token_id == AutoTokenizer.from_pretrained(folder).eos_token_id


# --- lm-eval itself --------------------------------------------------------------------------------------

CONTEXTS = [
    ("The weather is", " nice today"),
    ("今天天气", "很好"),
    ("Hello world!", " 12345"),
    ("龙", "的传人"),
    ("我喜欢在早上喝", "一杯热茶"),
    ("It might rain", " tomorrow, they say."),
    ("a", " b c d e f"),
    ("", "The start of a text"),
]


def loglikelihoods(lm, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    from lm_eval.api.instance import Instance

    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=i)
        for i, (context, continuation) in enumerate(requests)
    ]
    results: list[tuple[float, bool]] = lm.loglikelihood(instances)
    return results


def test_lm_eval_local_completions_equals_its_hf_backend(server, folder, monkeypatch) -> None:
    """lm-eval's `local-completions`, given no tokenizer (it finds the server's), with several token-id
    prompts per request, gives the log-likelihoods and greedy flags of its own `hf` backend on the same
    folder, to 1e-4."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = [(c, x) for c, x in CONTEXTS if c]  # (hf refuses an empty context with no prefix token)
    remote = get_model("local-completions")(
        base_url=server.url + "/v1/completions", model="tiny", batch_size=4, max_length=1024
    )
    assert type(remote.tokenizer).__name__ == "RemoteTokenizer"
    served = loglikelihoods(remote, requests)
    local = loglikelihoods(get_model("hf")(pretrained=str(folder), batch_size=4, device="cpu"), requests)
    assert [g for _, g in served] == [g for _, g in local]
    assert max(abs(a - b) for (a, _), (b, _) in zip(served, local, strict=True)) < 1e-4
    assert all(math.isfinite(a) and a < 0 for a, _ in served)


# --- /metrics --------------------------------------------------------------------------------------------


def scrape(server: Server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def test_metrics_count_requests_tokens_and_latencies(server, client) -> None:
    server.idle()
    before = scrape(server)
    answer = client.completions.create(
        model="m", prompt="The weather is", max_tokens=7, n=2, extra_body={"ignore_eos": True}
    )
    assert httpx.post(server.url + "/v1/completions", json={"prompt": 5}).status_code == 400
    after = scrape(server)

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew("gptcli_requests_total{endpoint=/v1/completions,status=200}") == 1
    assert grew("gptcli_requests_total{endpoint=/v1/completions,status=400}") == 1
    assert grew("gptcli_prompt_tokens_total") == answer.usage.prompt_tokens
    assert grew("gptcli_generation_tokens_total") == answer.usage.completion_tokens == 14
    assert grew("gptcli_time_to_first_token_seconds_count") == 2  # one per completion
    assert grew("gptcli_time_per_output_token_seconds_count") == 12  # between tokens
    assert after["gptcli_running_rows"] == 0 and after["gptcli_waiting_requests"] == 0
    assert "gptcli_kv_cache_usage_ratio" in after and "gptcli_kv_cache_bytes" in after


# --- Request fields ---------------------------------------------------------------------------------------


def test_logit_bias_is_openai_s(server, client) -> None:
    asked = {"model": "m", "prompt": "The weather is", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    plain = client.completions.create(**asked)
    first = plain.choices[0].logprobs.top_logprobs[0]
    (token,) = httpx.post(server.url + "/tokenize", json={"content": "a"}).json()["tokens"]
    forced = client.completions.create(**asked, logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == "a" * 6  # +100: that token every time
    assert forced.choices[0].logprobs.token_logprobs[0] > -1e-3  # the logprobs are of the biased logits
    # -100 on the greedy token: the next most likely one instead.
    greedy_id = httpx.post(server.url + "/tokenize", json={"content": plain.choices[0].text}).json()[
        "tokens"
    ][0]
    banned = client.completions.create(**{**asked, "max_tokens": 1}, logit_bias={str(greedy_id): -100})
    second = sorted(first.items(), key=lambda kv: -kv[1])[1][0]
    assert banned.choices[0].logprobs.tokens[0] == second
    for bias in ({"x": 1}, {"-1": 1}, {"99999999": 1}, {"5": 101}, {str(i): 1 for i in range(301)}):
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "logit_bias": bias})
        assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize("chat", [False, True])
def test_include_usage_ends_either_stream_with_usage(client, chat: bool) -> None:
    asked = {"model": "m", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **asked))
    else:
        chunks = list(client.completions.create(prompt="hi", **asked))
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens >= 1
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
