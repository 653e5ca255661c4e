"""`gptcli complete` end to end: output modes, seeds, stops, context, batches, pipes and signals."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from forked import fork_main

from gptcli.generation.tokens import TokenText
from gptcli.loading.models import as_contract

# Random fixtures at a high temperature emit many byte tokens, so characters get split across tokens.
HOT = ("--temperature", "3", "--top-k", "0", "--top-p", "1")


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def split_characters(model: Path, ids: list[int], text: str) -> list[str]:
    """Characters of `text` that no single token of `ids` holds whole: their bytes came in pieces."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model)
    names = TokenText(as_contract(tokenizer))
    pieces = [names.bytes(token) for token in ids]
    return [
        ch for ch in text if ord(ch) > 127 and ch != "\ufffd" and not any(ch.encode() in p for p in pieces)
    ]


# -- output modes and seeds ---------------------------------------------------------------------------


def test_streamed_text_equals_json_text_with_split_characters(cli, bpe_model: Path) -> None:
    for seed in ("1", "3"):
        args = ("complete", "龙", "-m", bpe_model, "-n", "40", "--seed", seed, *HOT)
        plain = cli(*args)
        assert plain.code == 0, plain.err
        (obj,) = json_lines(cli(*args, "--json").out)
        assert plain.out == obj["text"] + "\n"
        assert split_characters(bpe_model, obj["token_ids"], obj["text"])  # the case this test is about
        assert plain.err == ""


def test_same_seed_same_tokens_in_every_output_mode(cli, bpe_model: Path) -> None:
    args = ("-m", bpe_model, "-n", "12", *HOT)
    (plain_json,) = json_lines(cli("complete", "今天天气", *args, "--seed", "42", "--json").out)
    (with_logprobs,) = json_lines(cli("complete", "今天天气", *args, "--seed", "42", "--logprobs", "2").out)
    (each_line,) = json_lines(cli("complete", "--each-line", *args, "--seed", "42", stdin="今天天气\n").out)
    streamed = cli("complete", "今天天气", *args, "--seed", "42").out
    assert plain_json["token_ids"] == with_logprobs["token_ids"] == each_line["token_ids"]
    assert streamed == plain_json["text"] + "\n"
    assert plain_json["seed"] == 42
    (other,) = json_lines(cli("complete", "今天天气", *args, "--seed", "43", "--json").out)
    assert other["token_ids"] != plain_json["token_ids"]  # the seed matters, so the equalities above do


def test_json_schema(cli, bpe_model: Path) -> None:
    result = cli("complete", "The cat", "-m", bpe_model, "-n", "3", "--greedy", "--logprobs", "2")
    (obj,) = json_lines(result.out)
    assert set(obj) == {
        "model",
        "prompt",
        "text",
        "token_ids",
        "finish_reason",
        "usage",
        "seconds",
        "tokens_per_second",
        "seed",
        "logprobs",
    }
    assert obj["prompt"] == "The cat" and obj["finish_reason"] == "length" and obj["seed"] is None
    assert obj["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}
    assert [e["id"] for e in obj["logprobs"]] == obj["token_ids"]
    for entry in obj["logprobs"]:
        assert set(entry) == {"id", "token", "bytes", "logprob", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["id"] == entry["id"]  # greedy picks the most likely
    assert "logprobs" not in json_lines(cli("complete", "x", "-m", bpe_model, "-n", "2", "--json").out)[0]


def test_echo_stdin_and_file(cli, bpe_model: Path, tmp_path: Path) -> None:
    base = ("-m", bpe_model, "-n", "6", "--greedy")
    text = cli("complete", "今天天气", *base).out
    assert cli("complete", "今天天气", *base, "--echo").out == "今天天气" + text
    assert cli("complete", *base, stdin="今天天气\n").out == text
    assert cli("complete", "-", *base, stdin="今天天气").out == text
    (tmp_path / "p.txt").write_text("今天天气", encoding="utf-8")
    assert cli("complete", "-f", tmp_path / "p.txt", *base).out == text


def test_bert_continuation_of_an_english_word_starts_with_a_space(cli, bert_model: Path) -> None:
    """WordPiece tokens carry no spaces: `--echo` must not glue the first new word to the prompt's last."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    from gptcli.generation.tokens import Detokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(bert_model)
    ids = tokenizer.convert_tokens_to_ids(["world", "numbers"])
    assert isinstance(ids, list)
    world, numbers = ids
    cases = {
        "Hello": " world numbers",
        "Hello ": "world numbers",
        "你好": "world numbers",
        "": "world numbers",
    }
    for after, expected in cases.items():
        detok = Detokenizer(as_contract(tokenizer), after=after)
        assert detok.push(world) + detok.push(numbers) == expected, after
    # And the command: --echo prints the prompt, then exactly the text --json reports.
    base = ("-m", bert_model, "-n", "12", "--seed", "3", "--ignore-eos", *HOT)
    (done,) = json_lines(cli("complete", "Hello", *base, "--json").out)
    assert cli("complete", "Hello", *base, "--echo").out == "Hello" + done["text"] + "\n"


def test_num_samples(cli, bpe_model: Path) -> None:
    args = ("complete", "今天", "-m", bpe_model, "-n", "8", *HOT)
    samples = json_lines(cli(*args, "--seed", "7", "-N", "3", "--json").out)
    assert [s["seed"] for s in samples] == [7, 8, 9]
    assert len({tuple(s["token_ids"]) for s in samples}) == 3
    (second,) = json_lines(cli(*args, "--seed", "8", "--json").out)  # sample k is seed + k
    assert second["token_ids"] == samples[1]["token_ids"]
    # Plain text: each sample under a line that says which it is.
    plain = cli(*args, "--seed", "7", "-N", "3").out
    assert plain == "".join(f"── sample {i} of 3 ──\n{s['text']}\n" for i, s in enumerate(samples, 1))


def test_verbose_reports_speed_on_stderr_only(cli, bpe_model: Path) -> None:
    args = ("complete", "今天", "-m", bpe_model, "-n", "5", "--seed", "2")
    quiet, verbose = cli(*args), cli(*args, "-v")
    assert quiet.out == verbose.out and quiet.err == ""
    assert "settings: temperature 0.8, top-k 50, top-p 0.95" in verbose.err
    assert "\n1 prompt tokens, 5 new tokens, first token" in verbose.err
    assert "first token" in verbose.err and "tokens/s" in verbose.err and "seed 2" in verbose.err


# -- stops and the context ----------------------------------------------------------------------------


def test_stop_text_spanning_two_tokens(cli, bert_model: Path) -> None:
    base = ("complete", "今天天气", "-m", bert_model, "-n", "8", "--greedy")
    (free,) = json_lines(cli(*base, "--json").out)
    text = free["text"]  # one character a token: 不错，适合出去…
    assert len(text) == len(free["token_ids"]) - (free["finish_reason"] == "eos")
    stop = text[1:3]  # the end of token 2 and the start of token 3
    assert cli(*base, "--stop", stop).out == text[:1] + "\n"
    (obj,) = json_lines(cli(*base, "--stop", "雨", "--stop", stop, "--json").out)
    assert (obj["text"], obj["finish_reason"], len(obj["token_ids"])) == (text[:1], "stop", 3)


def test_context_limit_and_long_prompt_notes(cli, models: dict[str, Path]) -> None:
    short = models["short"]
    result = cli("complete", "Hello world", "-m", short, "-n", "100", "--greedy", "--ignore-eos", "--json")
    (obj,) = json_lines(result.out)
    assert obj["finish_reason"] == "length"
    assert obj["usage"]["prompt_tokens"] + obj["usage"]["completion_tokens"] == 24
    assert "context limit (24 tokens)" in result.err
    budget = cli("complete", "Hello world", "-m", short, "-n", "5", "--greedy", "--ignore-eos")
    assert budget.code == 0 and budget.err == ""
    long_prompt = "The weather is nice today, so we are going for a walk in the park. " * 2
    cut = cli("complete", long_prompt, "-m", short, "-n", "4", "--greedy", "--ignore-eos", "--json")
    (obj,) = json_lines(cut.out)
    assert obj["usage"] == {"prompt_tokens": 20, "completion_tokens": 4}
    assert "more tokens than the context (24)" in cut.err and "kept the last 20" in cut.err


def test_generation_config_defaults_and_flags_win(cli, bpe_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "tuned"
    shutil.copytree(bpe_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    config.update(do_sample=False, max_new_tokens=7, repetition_penalty=3.0)
    (model / "generation_config.json").write_text(json.dumps(config))
    prompt = "The weather is"  # greedy from here repeats itself: " sleeee..."
    (own,) = json_lines(cli("complete", prompt, "-m", model, "--json").out)
    flags = ("--greedy", "-n", "7", "--repetition-penalty", "3", "--json")
    (explicit,) = json_lines(cli("complete", prompt, "-m", bpe_model, *flags).out)
    assert own["token_ids"] == explicit["token_ids"] and len(own["token_ids"]) == 7
    (stock,) = json_lines(cli("complete", prompt, "-m", bpe_model, "--greedy", "-n", "7", "--json").out)
    assert stock["token_ids"] != own["token_ids"]  # the penalty from the file really applied
    (short,) = json_lines(cli("complete", prompt, "-m", model, "-n", "3", "--json").out)
    assert short["token_ids"] == own["token_ids"][:3]
    verbose = cli("complete", "今天天气", "-m", model, "-v").err
    assert (
        "greedy (generation_config.json)" in verbose
        and "max new tokens 7 (generation_config.json)" in verbose
    )
    sampled = cli("complete", "今天天气", "-m", model, "--sample", "--seed", "1", "-v").err
    assert "temperature 0.8, top-k 50" in sampled and "seed 1" in sampled


# -- --each-line --------------------------------------------------------------------------------------


def test_each_line_keeps_order_and_batches_equal_one_at_a_time(cli, bpe_model: Path, tmp_path: Path) -> None:
    prompts = ["今天天气很好", "The weather is", "", "明天可能会下雨", "I like", "龙", "Hello world! 12345"]
    stdin = "\n".join(prompts) + "\n"
    args = ("complete", "--each-line", "-m", bpe_model, "-n", "8", "--greedy")
    batched = json_lines(cli(*args, "--batch-size", "3", stdin=stdin).out)
    alone = json_lines(cli(*args, "--batch-size", "1", stdin=stdin).out)
    assert [o["prompt"] for o in batched] == prompts
    assert [o["token_ids"] for o in batched] == [o["token_ids"] for o in alone]
    assert [o["text"] for o in batched] == [o["text"] for o in alone]
    single = json_lines(cli("complete", prompts[3], *args[2:], "--json").out)[0]
    assert batched[3]["token_ids"] == single["token_ids"]
    (tmp_path / "prompts.txt").write_text(stdin, encoding="utf-8")
    from_file = json_lines(cli(*args, "-f", tmp_path / "prompts.txt").out)
    assert [o["token_ids"] for o in from_file] == [o["token_ids"] for o in batched]


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        ("-n", "0"),
        ("-n", "-5"),
        ("--temperature", "-0.1"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-k", "-1"),
        ("-N", "0"),
        ("--min-p", "2"),
        ("--repetition-penalty", "0"),
        ("--logprobs", "-1"),
        ("--batch-size", "0"),
        ("-n", "many"),
    ],
)
def test_bad_values_exit_2(cli, bad: tuple[str, str]) -> None:
    # No model is loaded for these: -m points nowhere, and the value is refused first.
    result = cli("complete", "hello", "-m", "./no-such-model", *bad)
    assert result.code == 2
    assert result.err.startswith("Error:") and "Traceback" not in result.err
    assert result.out == ""


def test_each_line_with_a_prompt_is_a_usage_error(cli, bpe_model: Path) -> None:
    result = cli("complete", "hello", "--each-line", "-m", bpe_model, stdin="a\n")
    assert result.code == 2 and "--each-line" in result.err


# -- pipes and signals (real processes) ---------------------------------------------------------------


def _forked_gptcli(*args: object) -> tuple[int, int, int]:
    """Run `gptcli ARGS` in a forked child with stdout and stderr on real pipes; (pid, out fd, err fd)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = fork_main(*args, stdout=out_w, stderr=err_w, close=[out_r, out_w, err_r, err_w])
    os.close(out_w)
    os.close(err_w)
    return pid, out_r, err_r


def _read_all(fd: int, pid: int, timeout: float = 60) -> bytes:
    """Everything until the child closes `fd`; a child still writing after `timeout` is killed."""
    data, deadline = b"", time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"gptcli still running after {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            os.close(fd)
            return data
        data += chunk


def _read_all_ready(fd: int, pid: int, timeout: float = 60) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"no output from gptcli within {timeout} s")
    return os.read(fd, 4096)


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# Output that would go on for minutes (1000 samples) unless the reader goes away or Ctrl-C comes.
ENDLESS = ("-n", "100", "-N", "1000", "--ignore-eos", "--seed", "1")


def test_closed_pipe_ends_quietly(bpe_model: Path) -> None:
    pid, out, err = _forked_gptcli("complete", "今天", "-m", bpe_model, *ENDLESS, *HOT)
    head = subprocess.run(["head", "-c", "20"], stdin=out, capture_output=True, timeout=60)
    os.close(out)  # the reader is gone
    errors = _read_all(err, pid)
    assert _exit_code(pid) == 141
    assert len(head.stdout) == 20
    assert errors == b""  # no traceback, no error line


def test_ctrl_c_keeps_the_text_and_ends_the_line(bpe_model: Path) -> None:
    pid, out, err = _forked_gptcli("complete", "今天", "-m", bpe_model, *ENDLESS)
    printed = b""
    while len(printed) < 10:  # a few characters in: generation is under way
        printed += _read_all_ready(out, pid)
    time.sleep(0.05)  # mid-generation
    os.kill(pid, signal.SIGINT)
    printed += _read_all(out, pid)
    errors = _read_all(err, pid)
    assert _exit_code(pid) == 130
    text = printed.decode("utf-8", errors="replace").removeprefix("── sample 1 of 1000 ──\n")
    assert len(text) > 3 and text.endswith("\n")  # printed text kept, its line ended
    assert b"Traceback" not in errors and b"Error" not in errors
