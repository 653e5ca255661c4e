"""The engine: rows that join and leave a running batch compute what they compute alone."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from gptcli.generation.generate import Completion, complete
from gptcli.generation.sampling import resolve_settings
from gptcli.generation.tokens import encode_prompt
from gptcli.gpt2 import CachedDecoder, KVCache
from gptcli.loading.models import load_model
from gptcli.serving.engine import Done, Engine, Failed, Job, PromptLogprobs, Token

import tiny

PROMPTS = ["今天天气", "The weather is", "", "我喜欢在早上喝一杯热茶", "Hello world! 12345", "龙"]


@pytest.fixture(scope="module")
def lms(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    # A checkpoint gptcli.gpt2 does not run (another attention scaling): transformers' path.
    other = tmp_path_factory.mktemp("engine") / "tiny-hf"
    shutil.copytree(models["bpe"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    lms = {name: load_model(str(path)) for name, path in models.items()}
    lms["hf"] = load_model(str(other))
    assert lms["hf"].net is None and lms["bpe"].net is not None
    return lms


def greedy(**kw):
    return resolve_settings(None, greedy=True, **kw)


def hot(seed: int, **kw):
    return resolve_settings(None, **{"seed": seed, "temperature": 3.0, "top_k": 0, "top_p": 1.0, **kw})


def completions(engine: Engine, prompts: list[str], settings, stagger: float = 0.002) -> list[Completion]:
    """Each prompt as its own job from its own thread, started a little apart so that rows join a batch
    that is already decoding; completions in prompt order."""
    results: dict[int, list[Completion]] = {}

    def client(i: int) -> None:
        done = [e for e in engine.stream([prompts[i]], settings) if isinstance(e, Completion)]
        results[i] = sorted(done, key=lambda c: c.sample)  # (samples finish in any order)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(60)
    return [c for i in range(len(prompts)) for c in results[i]]


@pytest.mark.parametrize("fixture", ["bpe", "bert", "hf"])
def test_concurrent_jobs_equal_one_at_a_time(lms, fixture: str) -> None:
    lm = lms[fixture]
    engine = Engine(lm, max_rows=4).start()
    try:
        for settings in (
            greedy(max_new_tokens=24, ignore_eos=True),
            hot(5, max_new_tokens=24, num_samples=2, logprobs=3, repetition_penalty=1.3),
            greedy(max_new_tokens=24, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.5),
            hot(7, max_new_tokens=12, num_samples=2, presence_penalty=-1.0, frequency_penalty=2.0),
        ):
            alone = complete(lm, PROMPTS, settings, batch_size=1)
            together = completions(engine, PROMPTS, settings)
            assert [c.token_ids for c in together] == [c.token_ids for c in alone]
            assert [c.text for c in together] == [c.text for c in alone]
            assert [c.finish_reason for c in together] == [c.finish_reason for c in alone]
            for a, b in zip(alone, together, strict=True):
                for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
                    assert x["id"] == y["id"] and abs(x["logprob"] - y["logprob"]) < 1e-5
        # The rows really shared steps (transformers' models decode one job at a time).
        assert engine.peak_rows == (2 if fixture == "hf" else 4)
    finally:
        engine.stop()


def test_a_gathered_row_computes_what_it_computes_alone(lms) -> None:
    """KVCache.gather: prompts prefilled alone, gathered with left padding, step as they would alone."""
    lm = lms["bpe"]
    net = lm.net
    ids = [encode_prompt(lm.tokenizer, p) for p in ["今天天气很好", "a", "The weather is nice today"]]
    decoders, parts = [], []
    with torch.inference_mode():
        for row in ids:
            decoder = CachedDecoder(net, 1, len(row) + 1)
            decoder.prefill(torch.tensor([row]), None, torch.arange(len(row))[None])
            decoders.append(decoder)
            parts.append((decoder.cache, 0, len(row)))
        gathered = CachedDecoder(net, 0, 0, cache=KVCache.gather(net.config, parts, max(map(len, ids)) + 1))
        alone = [
            d.step(torch.tensor([[7]]), torch.tensor([[len(r)]])) for d, r in zip(decoders, ids, strict=True)
        ]
        assert gathered.cache.real is not None and not bool(gathered.cache.real[1, 0])  # "a" is padded
        together = gathered.step(torch.tensor([[7]] * 3), torch.tensor([[len(r)] for r in ids]))
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_cancel_frees_the_rows_and_spares_the_others(lms) -> None:
    lm = lms["bpe"]
    engine = Engine(lm).start()
    try:
        events: list = []
        first = threading.Event()

        def sink(event) -> None:
            events.append(event)
            first.set()

        settings = greedy(max_new_tokens=120, ignore_eos=True)
        job = engine.submit(Job(["a"], [encode_prompt(lm.tokenizer, "a")], settings, sink))
        others = completions(engine, PROMPTS[:2], greedy(max_new_tokens=16))
        assert first.wait(10)
        job.cancel()
        deadline = time.monotonic() + 10
        while engine.stats()["rows"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["rows"] == 0
        seen = len(events)
        time.sleep(0.05)
        assert len(events) == seen  # nothing more after the cancel
        assert not any(isinstance(e, (Completion, Done)) for e in events)
        assert [c.token_ids for c in others] == [
            c.token_ids for c in complete(lm, PROMPTS[:2], greedy(max_new_tokens=16), batch_size=1)
        ]
    finally:
        engine.stop()


def test_jobs_wait_for_room_and_join_when_rows_leave(lms) -> None:
    lm = lms["bpe"]
    engine = Engine(lm, max_rows=2).start()
    try:
        settings = greedy(max_new_tokens=12, ignore_eos=True)
        together = completions(engine, PROMPTS, settings, stagger=0)
        assert engine.peak_rows == 2
        assert [c.token_ids for c in together] == [c.token_ids for c in complete(lm, PROMPTS, settings)]
    finally:
        engine.stop()


def test_prompt_logprobs_are_the_model_distribution(lms) -> None:
    lm = lms["bpe"]
    engine = Engine(lm).start()
    try:
        prompt = "今天天气很好"
        events = list(engine.stream([prompt], greedy(), prompt_logprobs=3, generate=False))
        (scored,) = [e for e in events if isinstance(e, PromptLogprobs)]
        assert not [e for e in events if isinstance(e, (Token, Completion))]
        ids = encode_prompt(lm.tokenizer, prompt)
        reference = torch.log_softmax(tiny.reference_model(lm)(torch.tensor([ids])).logits[0].float(), dim=-1)
        assert scored.entries[0] is None and len(scored.entries) == len(ids)
        for j, entry in enumerate(scored.entries[1:], 1):
            assert entry is not None
            assert entry["id"] == ids[j]
            assert abs(entry["logprob"] - reference[j - 1, ids[j]].item()) < 1e-5
            best = reference[j - 1].topk(3)
            assert [t["id"] for t in entry["top_logprobs"]] == best.indices.tolist()
    finally:
        engine.stop()


def test_a_failing_sink_stops_its_job_only(lms) -> None:
    lm = lms["bpe"]
    engine = Engine(lm).start()
    try:

        def broken(event) -> None:
            raise RuntimeError("the listener is gone")

        engine.submit(Job(["a"], [encode_prompt(lm.tokenizer, "a")], greedy(max_new_tokens=50), broken))
        assert [c.token_ids for c in completions(engine, PROMPTS[:2], greedy(max_new_tokens=8))] == [
            c.token_ids for c in complete(lm, PROMPTS[:2], greedy(max_new_tokens=8))
        ]
    finally:
        engine.stop()


def test_stop_fails_waiting_and_running_jobs(lms) -> None:
    lm = lms["bpe"]
    engine = Engine(lm).start()
    got: list = []
    engine.submit(Job(["a"], [encode_prompt(lm.tokenizer, "a")], greedy(max_new_tokens=127), got.append))
    engine.stop()
    assert isinstance(got[-1], (Failed, Done))
    with pytest.raises(Exception, match="not running"):
        engine.submit(Job(["a"], [[1]], greedy(), got.append))


def test_a_job_the_model_cannot_run_fails_and_the_engine_goes_on(lms) -> None:
    """A failure in the loop (here an id past the embedding table) fails every job it touched, whether
    decoding, joining or waiting, instead of leaving them without an answer; then the engine serves on."""
    lm = lms["bpe"]
    engine = Engine(lm).start()
    try:
        events: list = []
        bad = Job(["?"], [[len(lm.tokenizer) + 1000]], greedy(max_new_tokens=4), events.append)
        engine.submit(bad)
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
        (failed,) = events
        assert isinstance(failed, Failed) and "generation failed" in failed.message
        assert [c.token_ids for c in completions(engine, PROMPTS[:2], greedy(max_new_tokens=8))] == [
            c.token_ids for c in complete(lm, PROMPTS[:2], greedy(max_new_tokens=8))
        ]
    finally:
        engine.stop()


def test_a_paused_job_leaves_the_batch_and_resumes_with_the_same_numbers(lms) -> None:
    """A job paused mid-way (its reader is behind) stops generating while the others go on; resumed,
    its rows rejoin and every row equals `complete` alone: greedy ids and a seeded sample."""
    lm = lms["bpe"]
    engine = Engine(lm, max_rows=8).start()
    try:
        for settings in (
            greedy(max_new_tokens=40, ignore_eos=True),
            hot(3, max_new_tokens=40, num_samples=2),
        ):
            alone = complete(lm, PROMPTS[:2], settings, batch_size=1)
            events: list = []
            arrived = threading.Event()

            def sink(event, events=events, arrived=arrived) -> None:
                events.append(event)
                arrived.set()

            ids = [encode_prompt(lm.tokenizer, p) for p in PROMPTS[:2]]
            job = engine.submit(Job(PROMPTS[:2], ids, settings, sink))
            other = engine.stream(["龙"], greedy(max_new_tokens=30, ignore_eos=True))
            assert arrived.wait(30)
            job.pause()
            deadline = time.monotonic() + 10
            while engine.stats()["paused"] < job.rows and time.monotonic() < deadline:
                time.sleep(0.001)
            assert engine.stats()["paused"] == job.rows
            made = sum(isinstance(e, Token) for e in events)
            assert sum(isinstance(e, Completion) for e in other) == 1  # the others go on
            assert sum(isinstance(e, Token) for e in events) == made  # the paused job does not
            job.resume()
            deadline = time.monotonic() + 30
            while not any(isinstance(e, Done) for e in events) and time.monotonic() < deadline:
                time.sleep(0.01)
            done = sorted((e for e in events if isinstance(e, Completion)), key=lambda c: (c.index, c.sample))
            assert [c.token_ids for c in done] == [c.token_ids for c in alone]
            assert [c.text for c in done] == [c.text for c in alone]
            assert engine.stats()["paused"] == 0
    finally:
        engine.stop()


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(lms) -> None:
    """A prompt longer than prefill_chunk goes in a chunk per step: a row already decoding gets tokens
    between the chunks, and every row still equals `complete` alone (greedy ids, logprobs to 1e-5)."""
    lm = lms["bpe"]
    long_prompt = "今天天气很好，我们去公园散步吧。" * 4
    long_ids = encode_prompt(lm.tokenizer, long_prompt)
    assert 60 < len(long_ids) < lm.context_length - 16
    engine = Engine(lm, prefill_chunk=8).start()
    try:
        settings = greedy(max_new_tokens=12, logprobs=2)
        runner_settings = greedy(max_new_tokens=60, ignore_eos=True)
        during: list[int] = []  # engine.chunks when each of the running row's tokens arrived
        first = threading.Event()
        finished = threading.Event()
        running: list = []

        def sink(event) -> None:
            running.append(event)
            if isinstance(event, Token):
                during.append(engine.chunks)
                first.set()
            if isinstance(event, Done):
                finished.set()

        engine.submit(Job(["a"], [encode_prompt(lm.tokenizer, "a")], runner_settings, sink))
        assert first.wait(30)
        (long_done,) = [e for e in engine.stream([long_prompt], settings) if isinstance(e, Completion)]
        assert finished.wait(30)
        total = engine.chunks
        assert total == -(-len(long_ids) // 8)
        assert any(0 < seen < total for seen in during)  # the running row decoded between chunks
        (alone,) = complete(lm, [long_prompt], settings, batch_size=1)
        assert long_done.token_ids == alone.token_ids
        for x, y in zip(alone.logprobs or [], long_done.logprobs or [], strict=True):
            assert x["id"] == y["id"] and abs(x["logprob"] - y["logprob"]) < 1e-5
        (runner_done,) = [e for e in running if isinstance(e, Completion)]
        assert runner_done.token_ids == complete(lm, ["a"], runner_settings)[0].token_ids
    finally:
        engine.stop()


def test_a_failing_job_fails_alone(lms, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job whose processing raises (the test-only fault: a real path through the engine) while a job
    decodes beside it and another waits for room gets Failed with the reason; the other two finish with
    what they give alone."""
    from gptcli.serving.engine import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "boom")
    lm = lms["bpe"]
    engine = Engine(lm, max_rows=2).start()
    try:
        settings = greedy(max_new_tokens=30, ignore_eos=True)
        running: list = []
        failed: list = []
        waiting: list = []
        first = threading.Event()

        def sink(event) -> None:
            running.append(event)
            first.set()

        engine.submit(Job(PROMPTS[:1], [encode_prompt(lm.tokenizer, PROMPTS[0])], settings, sink))
        assert first.wait(30)
        engine.submit(Job(["boom"], [encode_prompt(lm.tokenizer, "boom")], settings, failed.append))
        engine.submit(Job(PROMPTS[1:2], [encode_prompt(lm.tokenizer, PROMPTS[1])], settings, waiting.append))
        deadline = time.monotonic() + 60
        while not (waiting and isinstance(waiting[-1], (Done, Failed))) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [type(e) for e in failed] == [Failed]
        assert "injected fault" in failed[0].message and "generation failed" in failed[0].message
        alone = complete(lm, PROMPTS[:2], settings, batch_size=1)
        for events, reference in zip((running, waiting), alone, strict=True):
            assert isinstance(events[-1], Done)
            (done,) = [e for e in events if isinstance(e, Completion)]
            assert done.token_ids == reference.token_ids
    finally:
        engine.stop()


def test_a_job_transformers_cannot_run_fails_alone(lms) -> None:
    """On the one-job-at-a-time path too (lm.runtime "transformers"): a prompt the model cannot run (an
    id past its embedding table), waiting behind a running job, fails alone when its turn comes; the
    job running before it and the one waiting behind it are answered as alone."""
    lm = lms["hf"]
    engine = Engine(lm).start()
    try:
        settings = greedy(max_new_tokens=24, ignore_eos=True)
        ids = [encode_prompt(lm.tokenizer, p) for p in PROMPTS[:2]]
        before: list = []
        bad: list = []
        after: list = []
        engine.submit(Job(PROMPTS[:1], ids[:1], settings, before.append))
        engine.submit(Job(["?"], [[len(lm.tokenizer) + 1000]], settings, bad.append))
        engine.submit(Job(PROMPTS[1:2], ids[1:2], settings, after.append))
        deadline = time.monotonic() + 60
        while not (after and isinstance(after[-1], (Done, Failed))) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [type(e) for e in bad] == [Failed] and "generation failed" in bad[0].message
        alone = complete(lm, PROMPTS[:2], settings, batch_size=1)
        for events, reference in zip((before, after), alone, strict=True):
            assert isinstance(events[-1], Done)
            (done,) = [e for e in events if isinstance(e, Completion)]
            assert done.token_ids == reference.token_ids
    finally:
        engine.stop()
