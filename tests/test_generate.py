"""The decode loop and sampling: checked against transformers' logits processors and `generate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gptcli.errors import UsageError
from gptcli.generation.generate import Completion, StopScanner, TextChunk, complete, stream
from gptcli.generation.sampling import (
    Settings,
    apply_repetition_penalty,
    candidates,
    draw,
    min_p_filter,
    process_logits,
    resolve_settings,
    top_k_filter,
    top_p_filter,
)
from gptcli.generation.tokens import TokenText, decode
from gptcli.loading.models import load_model

import tiny

PROMPTS = ["今天天气", "The weather is", "", "我喜欢在早上喝一杯热茶", "Hello world! 12345", "龙"]


@pytest.fixture(scope="module")
def lms(models: dict[str, Path]):
    return {name: load_model(str(path)) for name, path in models.items()}


def greedy(**kw) -> Settings:
    return resolve_settings(None, greedy=True, **kw)


def hot(seed: int, **kw) -> Settings:
    """Near-uniform sampling: the random fixtures then emit many byte tokens, so characters get split."""
    return resolve_settings(None, **{"seed": seed, "temperature": 3.0, "top_k": 0, "top_p": 1.0, **kw})


# -- sampling: the same numbers as transformers' processors ------------------------------------------


@pytest.fixture
def logits() -> torch.Tensor:
    """Two rows of fixed logits with ties and a wide spread, so every filter keeps a different set."""
    torch.manual_seed(0)
    rows = torch.randn(2, 64) * 3
    rows[0, 10:14] = rows[0].max()  # a four-way tie at the top
    rows[1, 5] = 20.0  # one dominant token
    return rows


def test_temperature_equals_transformers(logits: torch.Tensor) -> None:
    for t in (0.3, 0.8, 1.7):
        ours = process_logits(logits, Settings(temperature=t, top_k=0, top_p=1.0))
        theirs = TemperatureLogitsWarper(t)(None, logits)
        # Ours are shifted so the largest is 0 (no overflow at tiny temperatures): the same softmax.
        torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=0, atol=1e-7)
        assert torch.equal(ours.amax(-1), torch.zeros(2))


@pytest.mark.parametrize("t", [1e-30, 1e-300, 5e-324])
def test_a_tiny_temperature_tends_to_greedy(logits: torch.Tensor, t: float) -> None:
    probs = process_logits(logits, Settings(temperature=t, top_k=0, top_p=1.0)).softmax(-1)
    assert torch.equal(probs[1], torch.nn.functional.one_hot(torch.tensor(5), 64).float())
    top = (logits[0] == logits[0].max()).float()  # the tie at the top stays a tie
    assert torch.equal(probs[0], top / top.sum())


@pytest.mark.parametrize("k", [1, 3, 12, 64, 100])
def test_top_k_equals_transformers(logits: torch.Tensor, k: int) -> None:
    expected = TopKLogitsWarper(k)(None, logits)
    assert torch.equal(top_k_filter(logits, k), expected)
    if k < 64:
        assert torch.isinf(expected).any()  # the filter really removed something


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_equals_transformers(logits: torch.Tensor, p: float) -> None:
    assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits))


@pytest.mark.parametrize("p", [0.0, 0.01, 0.2, 0.9, 1.0])
def test_min_p_equals_transformers(logits: torch.Tensor, p: float) -> None:
    assert torch.equal(min_p_filter(logits, p), MinPLogitsWarper(p)(None, logits))  # type: ignore[arg-type]  # min-p reads no ids


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(logits: torch.Tensor, penalty: float) -> None:
    seen_ids = torch.tensor([[3, 10, 10, 40, 5], [5, 5, 63, 0, 7]])  # repeats count once
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seen_ids, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seen_ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, penalty), expected)


def test_full_chain_in_transformers_order(logits: torch.Tensor) -> None:
    seen_ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seen_ids, True)
    settings = Settings(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    expected = RepetitionPenaltyLogitsProcessor(1.2)(seen_ids, logits.clone())
    for step in (
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
        MinPLogitsWarper(0.05),
    ):
        # transformers annotates ids as torch.LongTensor, a type no torch function is stubbed to return
        expected = step(seen_ids, expected)  # type: ignore[arg-type]
    ours = process_logits(logits, settings, seen)
    assert torch.equal(ours.isfinite(), expected.isfinite())  # the same tokens kept
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1), rtol=0, atol=1e-7)
    # Greedy keeps the penalty and nothing else, as generate(do_sample=False) does.
    greedy_scores = process_logits(logits, Settings(greedy=True, repetition_penalty=1.2), seen)
    assert torch.equal(greedy_scores, RepetitionPenaltyLogitsProcessor(1.2)(seen_ids, logits.clone()))


@pytest.mark.parametrize(
    "settings",
    [
        Settings(top_k=50, top_p=0.95, temperature=0.8),  # the defaults
        Settings(top_k=2, top_p=1.0),  # row 0's four-way tie at the top: more than k are kept
        Settings(top_k=20, top_p=0.5, min_p=0.05, temperature=1.3, repetition_penalty=1.2),
        Settings(top_k=64, top_p=0.9),  # k = the vocabulary
        Settings(top_k=0, top_p=0.8),  # no top-k: the whole vocabulary
        Settings(top_k=7, top_p=1.0, temperature=0.3),
    ],
)
def test_sampling_candidates_are_the_processed_distribution(logits: torch.Tensor, settings: Settings) -> None:
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, [1, 5, 12]] = True
    expected = torch.softmax(process_logits(logits, settings, seen), dim=-1)
    ids, scores = candidates(logits, settings, seen)
    probs = torch.softmax(scores, dim=-1)
    got = torch.zeros_like(expected).scatter_(1, ids, probs)
    assert torch.equal(got > 0, expected > 0)  # the same tokens can be drawn
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    if settings.top_k == 2:
        assert int((got[0] > 0).sum()) > 2  # ties with the k-th kept, as TopKLogitsWarper keeps them


def test_draw_follows_the_distribution() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, 300) * 2
    settings = Settings(top_k=5, top_p=1.0, temperature=1.0)
    expected = torch.softmax(process_logits(logits, settings), dim=-1)[0]
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(300)
    for _ in range(4000):
        counts[draw(logits, settings, None, [generator])] += 1
    assert set(counts.nonzero()[:, 0].tolist()) == set(expected.nonzero()[:, 0].tolist())
    assert torch.allclose(counts / 4000, expected, atol=0.03)


# -- greedy equals transformers' generate --------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["bpe", "bert"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers_generate(lms, fixture: str, penalty: float) -> None:
    lm = lms[fixture]
    ours = complete(lm, PROMPTS, greedy(max_new_tokens=24, repetition_penalty=penalty), batch_size=1)
    for prompt, done in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([done.prompt_ids])
        reference = tiny.reference_model(lm).generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=24,
            repetition_penalty=penalty,
            pad_token_id=0,
        )
        assert done.token_ids == reference[0, ids.shape[1] :].tolist(), prompt
    assert sum(len(d.token_ids) for d in ours) > 3 * len(PROMPTS)  # long enough to tell


def test_bert_prompt_keeps_cls_and_drops_sep(lms) -> None:
    lm = lms["bert"]
    (done,) = complete(lm, "今天天气", greedy(max_new_tokens=2))
    tokenizer = lm.tokenizer
    assert done.prompt_ids[0] == tokenizer.cls_token_id
    assert tokenizer.sep_token_id not in done.prompt_ids
    assert tokenizer.convert_ids_to_tokens(done.prompt_ids[1:]) == list("今天天气")


@pytest.mark.parametrize("fixture", ["bpe", "bert"])
def test_batched_greedy_equals_one_at_a_time(lms, fixture: str) -> None:
    lm = lms[fixture]
    settings = greedy(max_new_tokens=20)
    alone = [complete(lm, p, settings)[0] for p in PROMPTS]
    batched = complete(lm, PROMPTS, settings, batch_size=4)
    assert [(d.index, d.prompt) for d in batched] == list(enumerate(PROMPTS))
    assert [d.token_ids for d in batched] == [d.token_ids for d in alone]
    assert [d.text for d in batched] == [d.text for d in alone]
    lengths = {len(d.prompt_ids) for d in batched[:4]}
    assert len(lengths) > 1  # the first batch really was padded


def test_batches_take_fewer_rows_when_their_kv_cache_would_not_fit(lms, monkeypatch) -> None:
    import gptcli.generation.decoding as decoding
    import gptcli.generation.generate as generate

    lm = lms["bpe"]
    settings = greedy(max_new_tokens=6)
    # Room for the KV cache of exactly two rows of the longest prompt (4 bytes, keys and values).
    longest = max(len(lm.tokenizer.encode(p)) for p in PROMPTS) + 6
    per_row = 2 * lm.config.n_layer * lm.config.n_embd * longest * 4
    monkeypatch.setattr(decoding, "KV_BUDGET", 2 * per_row)
    assert decoding.rows_that_fit(lm, longest - 6, 6, 16) == 2
    sizes = []
    real_decode = generate._decode

    def counted(lm, rows, *a):
        sizes.append(len(rows))
        return real_decode(lm, rows, *a)

    monkeypatch.setattr(generate, "_decode", counted)
    batched = complete(lm, PROMPTS, settings, batch_size=16)
    assert max(sizes) == 2 and sum(sizes) == len(PROMPTS)  # (the longest row is in every window here)
    alone = [complete(lm, p, settings)[0] for p in PROMPTS]
    assert [d.token_ids for d in batched] == [d.token_ids for d in alone]


def test_batched_rows_reach_the_context_at_different_steps(lms) -> None:
    lm = lms["short"]  # 24 positions: every row below stops at the context, each at its own step
    prompts = [
        "a",
        "The weather is nice today, so we are going for a walk in the park. " * 2,
        "",
        "今天天气很好",
    ]
    for settings in (
        greedy(max_new_tokens=100, ignore_eos=True),
        hot(4, max_new_tokens=100, ignore_eos=True),
    ):
        batched = complete(lm, prompts, settings, batch_size=4)
        alone = [complete(lm, p, settings)[0] for p in prompts]
        assert [d.token_ids for d in batched] == [d.token_ids for d in alone]
        assert all(d.context_full and len(d.prompt_ids) + len(d.token_ids) == 24 for d in batched)
        assert len({len(d.token_ids) for d in batched}) > 1 and batched[1].dropped > 0


def test_bad_batch_size_fails_at_the_call(lms) -> None:
    with pytest.raises(UsageError, match="--batch-size"):
        stream(lms["bpe"], ["x"], greedy(), batch_size=0)  # not only once iterated


def test_eos_ends_generation_unless_ignored(lms) -> None:
    lm = lms["bpe"]  # a line of its training text: "。" and then the end of the text
    (done,) = complete(lm, "明天可能会下雨，记得带伞", greedy(max_new_tokens=10))
    assert (done.finish_reason, done.token_ids[-1], done.text) == ("eos", lm.tokenizer.eos_token_id, "。")
    (more,) = complete(lm, "明天可能会下雨，记得带伞", greedy(max_new_tokens=10, ignore_eos=True))
    assert more.finish_reason == "length" and len(more.token_ids) == 10


# -- seeds, streaming and UTF-8 ------------------------------------------------------------------------


def test_same_seed_same_tokens_whatever_the_batch(lms) -> None:
    lm = lms["bpe"]
    settings = hot(11, max_new_tokens=16, num_samples=3)
    first = complete(lm, PROMPTS[:3], settings, batch_size=1)
    again = complete(lm, PROMPTS[:3], settings, batch_size=5)
    assert [d.token_ids for d in first] == [d.token_ids for d in again]
    assert [(d.index, d.sample, d.seed) for d in first[:3]] == [(0, 0, 11), (0, 1, 12), (0, 2, 13)]
    # Sample k of seed S is sample 0 of seed S+k, so any sample can be reproduced alone.
    (alone,) = complete(lm, PROMPTS[0], hot(12, max_new_tokens=16))
    assert alone.token_ids == first[1].token_ids
    assert first[0].token_ids != first[1].token_ids
    other = complete(lm, PROMPTS[:3], hot(99, max_new_tokens=16, num_samples=3))
    assert [d.token_ids for d in other] != [d.token_ids for d in first]


def _split_characters(names: TokenText, ids: list[int]) -> list[str]:
    """Valid multi-byte characters of the generated bytes whose bytes come from two or more tokens."""
    ends, data = set(), b""
    for token in ids:
        data += names.bytes(token)
        ends.add(len(data))
    found, at = [], 0
    while at < len(data):
        size = next((n for n in (2, 3, 4) if _one_char(data[at : at + n]) and at + n <= len(data)), 1)
        if size > 1 and any(at < end < at + size for end in ends):
            found.append(data[at : at + size].decode("utf-8"))
        at += size
    return found


def _one_char(data: bytes) -> bool:
    try:
        return len(data) > 1 and len(data.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("fixture", ["bpe", "bert"])
def test_streamed_chunks_equal_the_one_shot_decode(lms, fixture: str) -> None:
    lm = lms[fixture]
    names = TokenText(lm.tokenizer)
    split = []
    for seed in range(6):
        events = list(stream(lm, ["龙", "今天天气"], hot(seed, max_new_tokens=40)))
        chunks = [e for e in events if isinstance(e, TextChunk)]
        done = [e for e in events if isinstance(e, Completion)]
        for d in done:
            streamed = "".join(c.text for c in chunks if c.index == d.index)
            assert streamed == d.text == decode(lm.tokenizer, d.token_ids)
            split += _split_characters(names, d.token_ids)
            # The naive per-token decode is what streaming must not do: it prints U+FFFD.
            naive = "".join(lm.tokenizer.decode([t], skip_special_tokens=True) for t in d.token_ids)
            if _split_characters(names, d.token_ids):
                assert naive != d.text
    if fixture == "bpe":
        assert len(split) >= 5, "the test no longer exercises characters split across tokens"
    else:  # one token per character: nothing to split, and no spaces or [SEP] between CJK characters
        assert not split


def test_bert_text_has_no_special_tokens_or_cjk_spaces(lms) -> None:
    lm = lms["bert"]
    texts = [d.text for d in complete(lm, ["今天", "hello"], hot(5, max_new_tokens=60, ignore_eos=True))]
    joined = "".join(texts)
    assert not any(s in joined for s in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"))
    cjk = [ch for ch in joined if "\u4e00" <= ch <= "\u9fff"]
    assert len(cjk) > 10
    for text in texts:
        for a, b, c in zip(text, text[1:], text[2:], strict=False):
            assert not (b == " " and "\u4e00" <= a <= "\u9fff" and "\u4e00" <= c <= "\u9fff"), text


# -- stop texts ---------------------------------------------------------------------------------------


def test_stop_scanner_holds_back_a_possible_start() -> None:
    scanner = StopScanner(["\n\n", "END"])
    assert scanner.feed("one\n") == ("one", False)  # "\n" may begin "\n\n"
    assert scanner.feed("two E") == ("\ntwo ", False)  # it did not; "E" may begin "END"
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("Dx") == ("", True)  # "END" spans three chunks; nothing of it is released
    tail = StopScanner(["abc"])
    assert tail.feed("xab") == ("x", False)
    assert tail.flush() == "ab"  # at the end, a partial stop text is just text
    first = StopScanner(["c", "ab"])
    assert first.feed("zabc") == ("z", True)  # the earliest stop text wins


def test_stop_text_spanning_two_tokens(lms) -> None:
    lm = lms["bert"]  # one character a token: greedy from 今天天气 is 不|错|，|适|合|…
    (free,) = complete(lm, "今天天气", greedy(max_new_tokens=6))
    text = free.text
    assert len(text) == 6 and free.finish_reason == "length"
    events = list(stream(lm, ["今天天气"], greedy(max_new_tokens=6, stop=(text[1:3],))))
    done = events[-1]
    assert isinstance(done, Completion)
    assert (done.text, done.finish_reason, len(done.token_ids)) == (text[:1], "stop", 3)
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == text[:1]
    (inside,) = complete(lm, "今天天气", greedy(max_new_tokens=6, stop=(text[:1],)))
    assert (inside.text, inside.finish_reason, len(inside.token_ids)) == ("", "stop", 1)
    (never,) = complete(lm, "今天天气", greedy(max_new_tokens=6, stop=("雨",)))
    assert (never.text, never.finish_reason) == (free.text, "length")


# -- context limit ------------------------------------------------------------------------------------


def test_context_limit_stops_with_length(lms) -> None:
    lm = lms["short"]
    assert lm.context_length == 24
    (done,) = complete(lm, "Hello world", greedy(max_new_tokens=100, ignore_eos=True))
    assert done.finish_reason == "length" and done.context_full
    assert len(done.prompt_ids) + len(done.token_ids) == 24
    (budget,) = complete(lm, "Hello world", greedy(max_new_tokens=5, ignore_eos=True))
    assert budget.finish_reason == "length" and not budget.context_full


def test_long_prompt_is_cut_from_the_left_keeping_room(lms) -> None:
    lm = lms["short"]
    prompt = "The weather is nice today, so we are going for a walk in the park. It might rain tomorrow."
    full = lm.tokenizer.encode(prompt)
    assert len(full) > 24
    (done,) = complete(lm, prompt, greedy(max_new_tokens=5, ignore_eos=True))
    assert done.prompt_ids == full[-19:] and done.dropped == len(full) - 19
    assert len(done.token_ids) == 5 and not done.context_full
    (capped,) = complete(lm, prompt, greedy(max_new_tokens=100, ignore_eos=True))
    assert len(capped.prompt_ids) == 12 and len(capped.token_ids) == 12 and capped.context_full


# -- logprobs -----------------------------------------------------------------------------------------


def test_logprobs_are_the_model_distribution(lms) -> None:
    lm = lms["bpe"]
    settings = hot(3, max_new_tokens=5, logprobs=4, temperature=1.5, top_k=10)
    (done,) = complete(lm, "今天", settings)
    ids = done.prompt_ids + done.token_ids
    with torch.no_grad():
        full = torch.log_softmax(tiny.reference_model(lm)(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert done.logprobs is not None and len(done.logprobs) == 5
    for step, (token, entry) in enumerate(zip(done.token_ids, done.logprobs, strict=True)):
        row = full[len(done.prompt_ids) - 1 + step]
        assert entry["id"] == token
        assert entry["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        top = torch.topk(row, 4)
        assert [a["id"] for a in entry["top_logprobs"]] == top.indices.tolist()
        assert [a["logprob"] for a in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert set(entry["top_logprobs"][0]) == {"id", "token", "bytes", "logprob"}
    as_json = done.to_json("m")
    assert as_json["logprobs"] == done.logprobs and as_json["usage"]["completion_tokens"] == 5


# -- settings -----------------------------------------------------------------------------------------


def test_generation_config_replaces_defaults_and_flags_win() -> None:
    config = GenerationConfig(do_sample=False, temperature=0.5, top_k=7, max_new_tokens=9, stop_strings="##")
    settings = resolve_settings(config)
    assert (settings.greedy, settings.temperature, settings.top_k, settings.max_new_tokens) == (
        True,
        0.5,
        7,
        9,
    )
    assert settings.stop == ("##",) and settings.top_p == 0.95
    assert settings.sources["top_k"] == "generation_config.json" and settings.sources["top_p"] == "default"
    flagged = resolve_settings(config, greedy=False, top_k=3, stop=("x", "y"))
    assert (flagged.sampling, flagged.top_k, flagged.temperature, flagged.stop) == (True, 3, 0.5, ("x", "y"))
    assert flagged.sources["top_k"] == "flag"
    assert not resolve_settings(None, temperature=0).sampling  # temperature 0 means greedy


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"max_new_tokens": 0}, "-n/--max-new-tokens"),
        ({"max_new_tokens": -3}, "-n/--max-new-tokens"),
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": float("inf")}, "--temperature"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.01}, "--top-p"),
        ({"top_k": -1}, "--top-k"),
        ({"min_p": 1.5}, "--min-p"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty"),
        ({"num_samples": 0}, "-N/--num-samples"),
        ({"logprobs": -1}, "--logprobs"),
        ({"stop": ("",)}, "--stop"),
    ],
)
def test_bad_values_are_usage_errors(flags: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_settings(None, **flags)


def test_bad_value_from_generation_config_names_the_file() -> None:
    with pytest.raises(UsageError, match=r"top_p in generation_config\.json"):
        resolve_settings(GenerationConfig(top_p=2.0))


# -- lookup decoding: the same greedy tokens in fewer passes --------------------------------------------

REPEATING = [
    "今天天气很好，我们去公园散步吧。今天天气很好，我们去公园散步吧。今天天气",
    "The weather is nice today, so we are going for a walk in the park. The weather is nice",
    "1, 2, 3, 4, 1, 2, 3, 4, 1, 2,",
    "",
    "龙",
]


@pytest.mark.parametrize("fixture", ["bpe", "bert", "short"])
@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3}, {"logprobs": 3}, {"stop": ("。",)}])
def test_lookup_decoding_gives_greedy_decodings_tokens(lms, fixture: str, extra: dict) -> None:
    lm = lms[fixture]
    plain = complete(lm, REPEATING, greedy(max_new_tokens=30, lookup=0, **extra), batch_size=1)
    looked = complete(lm, REPEATING, greedy(max_new_tokens=30, lookup=8, **extra), batch_size=1)
    for a, b in zip(plain, looked, strict=True):
        assert (a.token_ids, a.text, a.finish_reason, a.context_full) == (
            b.token_ids,
            b.text,
            b.finish_reason,
            b.context_full,
        ), a.prompt
        if a.logprobs is not None:
            assert b.logprobs is not None and [e["id"] for e in a.logprobs] == [e["id"] for e in b.logprobs]
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert abs(x["logprob"] - y["logprob"]) < 1e-4
                assert [t["id"] for t in x["top_logprobs"]] == [t["id"] for t in y["top_logprobs"]]


def test_lookup_decoding_takes_fewer_passes_on_repeating_text(lms, monkeypatch: pytest.MonkeyPatch) -> None:
    from gptcli.gpt2 import GPT2

    lm = lms["bert"]
    passes = []
    forward = GPT2.forward

    def counted(self, *args, **kwargs):
        passes.append(args[0].shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT2, "forward", counted)
    prompt = "今天天气很好，我们去公园散步吧。" * 3 + "今天"
    (plain,) = complete(lm, prompt, greedy(max_new_tokens=20, ignore_eos=True, lookup=0))
    plain_passes, passes[:] = len(passes), []
    (looked,) = complete(lm, prompt, greedy(max_new_tokens=20, ignore_eos=True, lookup=8))
    assert looked.token_ids == plain.token_ids
    assert len(passes) <= plain_passes / 2, (len(passes), plain_passes)


def test_lookup_drafts_follow_the_last_earlier_occurrence() -> None:
    from gptcli.generation.generate import _Index

    ids = [1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    index = _Index(ids)
    assert index.draft(ids, 3) == [4, 5, 1]  # "1 2" last seen before the end at 4..5, then 4 5 1
    assert index.draft(ids, 0) == []
    fresh = [7, 8]
    assert _Index(fresh).draft(fresh, 5) == []  # nothing occurred before


# -- presence and frequency penalties (OpenAI's definitions) -------------------------------------------


def penalized_greedy(lm, prompt: str, n: int, presence: float, frequency: float) -> list[int]:
    """Greedy decoding computed directly: the whole text through the model at each step (no cache),
    logit[j] -= c[j] * frequency + (c[j] > 0) * presence with c the counts of the generated tokens."""
    from gptcli.generation.tokens import encode_prompt

    ids = encode_prompt(lm.tokenizer, prompt)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = lm.logits(torch.tensor([ids + new]))[0, -1].float()
            counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=len(logits)).float()
            new.append(int((logits - counts * frequency - (counts > 0).float() * presence).argmax()))
    return new


def test_penalties_follow_openais_formula() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    settings = Settings(greedy=True, presence_penalty=0.5, frequency_penalty=0.25)
    expected = torch.tensor([[2.0, 1.0 - 0.25 - 0.5, 0.5 - 0.75 - 0.5, -1.0]])
    assert torch.allclose(process_logits(logits, settings, None, counts), expected)
    assert torch.equal(process_logits(logits, Settings(greedy=True), None, counts), logits)  # 0: off


@pytest.mark.parametrize("runtime", ["gptcli", "transformers"])
def test_penalties_change_greedy_output_as_computed_directly(lms, runtime: str) -> None:
    lm = lms["bpe"] if runtime == "gptcli" else tiny.on_transformers(lms["bpe"])
    n, presence, frequency = 16, 1.5, 1.0
    penalized = greedy(
        max_new_tokens=n, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency
    )
    plain = complete(lm, PROMPTS, greedy(max_new_tokens=n, ignore_eos=True), batch_size=1)
    alone = complete(lm, PROMPTS, penalized, batch_size=1)  # one row: lookup decoding
    batched = complete(lm, PROMPTS, penalized, batch_size=4)
    no_lookup = complete(
        lm,
        PROMPTS,
        greedy(
            max_new_tokens=n,
            ignore_eos=True,
            lookup=0,
            presence_penalty=presence,
            frequency_penalty=frequency,
        ),
    )
    changed = 0
    for prompt, a, b, c, d in zip(PROMPTS, plain, alone, batched, no_lookup, strict=True):
        expected = penalized_greedy(lm, prompt, n, presence, frequency)
        assert b.token_ids == c.token_ids == d.token_ids == expected
        # The expected direction: a penalized text repeats its tokens less than the plain greedy one.
        assert len(b.token_ids) - len(set(b.token_ids)) <= len(a.token_ids) - len(set(a.token_ids))
        changed += a.token_ids != b.token_ids
    assert changed >= len(PROMPTS) // 2  # the tiny models repeat themselves: the penalties matter


def test_a_negative_presence_penalty_makes_repeats_likelier(lms) -> None:
    lm = lms["bpe"]
    plain = complete(lm, PROMPTS, greedy(max_new_tokens=16, ignore_eos=True))
    eager = complete(lm, PROMPTS, greedy(max_new_tokens=16, ignore_eos=True, presence_penalty=-2.0))
    for prompt, a, b in zip(PROMPTS, plain, eager, strict=True):
        assert b.token_ids == penalized_greedy(lm, prompt, 16, -2.0, 0.0)
        assert len(set(b.token_ids)) <= len(set(a.token_ids))


def test_sampled_rows_apply_the_penalties_to_their_candidates(lms) -> None:
    """Sampling draws from the penalized distribution: a seeded sample equals a draw computed here."""
    lm = lms["bpe"]
    settings = resolve_settings(
        None,
        seed=5,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=8,
        ignore_eos=True,
        presence_penalty=2.0,
        frequency_penalty=2.0,
        lookup=0,
    )
    (done,) = complete(lm, "今天", settings)
    ids = done.prompt_ids
    generator = torch.Generator().manual_seed(5)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(8):
            logits = lm.logits(torch.tensor([ids + new]))[0, -1].float()
            counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=len(logits)).float()
            probs = torch.softmax(logits - 2.0 * counts - 2.0 * (counts > 0).float(), dim=-1)
            new.append(int(torch.multinomial(probs, 1, generator=generator)))
    assert done.token_ids == new


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--presence-penalty", "2.5"), ("--frequency-penalty", "-3"), ("--presence-penalty", "nan")],
)
def test_penalties_out_of_range_are_usage_errors(cli, flag: str, value: str) -> None:
    result = cli("complete", "hi", flag, value)
    assert result.code == 2 and f"{flag} must be between -2 and 2" in result.err
