"""`gptcli step` and gptcli.inspection.step: choices replayed against `complete`, the KV cache against a
recompute,
and the interactive loop driven through a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
from forked import fork_main

from gptcli.generation.sampling import resolve_settings
from gptcli.inspection.step import StepSession, parse_choices
from gptcli.loading.models import load_model

import tiny


@pytest.fixture(scope="module")
def lms(models: dict[str, Path]) -> dict:
    return {name: load_model(str(path), device="cpu") for name, path in models.items()}


def step_json(cli, *args: object) -> tuple[list[dict], dict, str]:
    """The step records, the final line and stderr of `gptcli step ARGS`."""
    result = cli("step", *args)
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in result.out.splitlines()]
    return lines[:-1], lines[-1], result.err


def complete_json(cli, *args: object) -> dict:
    result = cli("complete", *args, "--json")
    assert result.code == 0, result.err
    record: dict = json.loads(result.out)
    return record


@pytest.mark.parametrize("fixture", ["bpe", "bert"])
@pytest.mark.parametrize("penalty", ["1.0", "1.3"])
def test_always_rank_0_is_greedy_complete(cli, models, fixture: str, penalty: str) -> None:
    model = models[fixture]
    zeros = ",".join(["0"] * 24)
    steps, final, _ = step_json(
        cli, "今天天气", "-m", model, "--choose", zeros, "--repetition-penalty", penalty
    )
    greedy = complete_json(
        cli, "今天天气", "-m", model, "--greedy", "-n", "24", "--repetition-penalty", penalty
    )
    assert final["token_ids"] == greedy["token_ids"]
    assert [s["chosen"]["id"] for s in steps] == greedy["token_ids"]
    assert final["text"] == "今天天气" + greedy["text"]
    assert all(s["chosen"]["rank"] == 0 and s["top"][0]["id"] == s["chosen"]["id"] for s in steps)


def test_samples_with_a_seed_are_completes_samples(cli, bpe_model) -> None:
    args = ["--seed", "7", "--temperature", "8", "--top-k", "0", "--top-p", "1"]
    _, final, _ = step_json(cli, "The", "-m", bpe_model, "--choose", ",".join(["s"] * 16), *args)
    sampled = complete_json(cli, "The", "-m", bpe_model, "-n", "16", *args)
    assert final["token_ids"] == sampled["token_ids"]
    assert len(set(final["token_ids"])) > 3  # really sampled, not a greedy loop


def test_records_show_the_top_k_and_the_choice(cli, bpe_model) -> None:
    steps, final, _ = step_json(cli, "Hello", "-m", bpe_model, "--choose", "2,0,s", "-k", "4", "--seed", "1")
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[0]["text"] == "Hello"
    topk = json.loads(cli("topk", "Hello", "-m", bpe_model, "-k", "4", "--json").out)["tokens"]
    assert [t["id"] for t in steps[0]["top"]] == [t["id"] for t in topk]
    assert [t["prob"] for t in steps[0]["top"]] == pytest.approx([t["prob"] for t in topk], abs=1e-6)
    for s in steps:
        assert [t["rank"] for t in s["top"]] == [0, 1, 2, 3]
        assert set(s["top"][0]) == {"rank", "id", "token", "bytes", "prob", "logprob"}
        assert set(s["chosen"]) == {"rank", "id", "token"}
    assert steps[0]["chosen"]["id"] == steps[0]["top"][2]["id"]
    assert steps[1]["chosen"]["id"] == steps[1]["top"][0]["id"]
    assert final["token_ids"] == [s["chosen"]["id"] for s in steps] and final["finish_reason"] is None


@pytest.mark.parametrize("path", ["gptcli", "transformers"])
def test_cached_steps_and_undo_equal_a_recompute(lms, path: str) -> None:
    lm = lms["bpe"] if path == "gptcli" else tiny.on_transformers(lms["bpe"])
    session = StepSession(lm, "今天天气", resolve_settings(lm.generation_config, seed=3))

    def recomputed() -> torch.Tensor:
        with torch.inference_mode():
            logits: torch.Tensor = lm.logits(torch.tensor([session.ids]))
            return logits[0, -1].float()

    tops = []
    for choice in [0, 3, "s", 1, 0, "s", 2]:
        tops.append(session.top(5))
        if isinstance(choice, int):
            session.choose(choice)
        else:
            session.sample()
        assert torch.allclose(session.logits, recomputed(), atol=1e-5)
    for _ in range(3):
        session.undo()
        assert torch.allclose(session.logits, recomputed(), atol=1e-5)
    assert session.top(5) == tops[4]  # the same candidates as before those choices, exactly
    for rank in (4, 0, 1):  # go on after the undos: the cache was cut at the right place
        session.choose(rank)
        assert torch.allclose(session.logits, recomputed(), atol=1e-5)
    assert len(session.chosen) == 7
    while session.undo() is not None:
        pass
    assert session.ids == session.prompt_ids and session.top(5) == tops[0]


def test_a_split_character_shows_as_bytes_until_it_is_whole(lms) -> None:
    lm = lms["bpe"]
    # A character the tiny byte-level BPE splits into several tokens.
    char = next(c for c in "猫窗阳照身睡觉台" if len(lm.tokenizer.encode(c, add_special_tokens=False)) > 1)
    pieces = lm.tokenizer.encode(char, add_special_tokens=False)
    session = StepSession(lm, "小", resolve_settings(lm.generation_config))
    for i, token in enumerate(pieces):
        session.choose(session.rank_of(token))
        shown = session.display_text()
        if i < len(pieces) - 1:
            held = b"".join(session.names.bytes(t) for t in pieces[: i + 1])
            assert shown == "小<" + " ".join(f"{b:02x}" for b in held) + ">"
            assert not session.pieces()[-1].complete
        else:
            assert shown == "小" + char == session.text()
            assert session.pieces()[-1].complete and session.pieces()[-1].text == char


def test_the_end_of_text_token_ends_the_replay(cli, lms, bpe_model) -> None:
    lm = lms["bpe"]
    session = StepSession(lm, "Hello", resolve_settings(lm.generation_config))
    session.choose(0)
    rank = session.rank_of(lm.tokenizer.eos_token_id)
    session.choose(rank)
    assert session.finish_reason == "eos" and session.top() == []
    steps, final, err = step_json(cli, "Hello", "-m", bpe_model, "--choose", f"0,{rank},0,0")
    assert len(steps) == 2 and final["finish_reason"] == "eos"
    assert final["token_ids"][-1] == lm.tokenizer.eos_token_id
    assert "the text ended" in err and "after 2 of 4 choices" in err


def test_a_full_context_ends_the_walk(cli, lms, models) -> None:
    from gptcli.errors import GptcliError

    lm = lms["short"]  # 24 positions
    session = StepSession(lm, "a", resolve_settings(lm.generation_config))
    ranks = []
    while not session.done:  # the top token, unless it would end the text
        ranks.append(1 if session.top(1)[0]["id"] == lm.tokenizer.eos_token_id else 0)
        session.choose(ranks[-1])
    assert session.finish_reason == "length" and len(session.ids) == 24 and session.top() == []
    with pytest.raises(GptcliError, match="context is full"):
        session.choose(0)

    choices = ",".join(map(str, [*ranks, 0, 0]))
    _, final, err = step_json(cli, "a", "-m", models["short"], "--choose", choices)
    assert final["token_ids"] == [c.id for c in session.chosen] and final["finish_reason"] == "length"
    assert f"the context is full (24 tokens) after {len(ranks)} of {len(ranks) + 2} choices" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--choose", "0,x"], "--choose takes ranks"),
        (["--choose", "0,-1"], "--choose takes ranks"),
        (["-k", "0", "--choose", "0"], "-k must be at least 1"),
        (["--temperature", "-1", "--choose", "0"], "--temperature"),
    ],
)
def test_bad_values_are_refused(cli, bpe_model, args, message) -> None:
    result = cli("step", "x", "-m", bpe_model, *args)
    assert result.code == 2 and message in result.err


def test_off_a_terminal_without_choices_is_refused(cli, bpe_model) -> None:
    result = cli("step", "-m", bpe_model, stdin="今天\n")
    assert result.code == 2 and "--choose" in result.err and result.out == ""


def test_parse_choices() -> None:
    assert parse_choices("0, 2,S,10") == [0, 2, "s", 10]


# --- the interactive loop, through a real pseudo-terminal ---------------------------------------------


def _whole(screen: str) -> bool:
    """Whether a screen was drawn to its end: its last line, the key help, has arrived whole."""
    last = screen.rstrip().rsplit("\n", 1)[-1]
    return last.startswith("step ") and last.endswith("q done")


_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>78])")


class Terminal:
    """A pseudo-terminal on a forked `gptcli step`: its stdin and stderr; stdout is a pipe of its own."""

    def __init__(self, *args: object) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.initial = termios.tcgetattr(slave)  # before gptcli changes it
        self.out_r, out_w = os.pipe()

        def stdin_is_the_terminal() -> None:
            os.dup2(slave, 0)
            sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
            os.environ["TERM"] = "xterm-256color"
            os.environ["COLUMNS"] = "120"

        self.pid = fork_main(
            "step",
            *args,
            stdout=out_w,
            stderr=slave,
            close=(self.master, self.out_r),
            before=stdin_is_the_terminal,
        )
        os.close(slave)
        os.close(out_w)
        self.raw = b""

    def screen(self) -> str:
        """The last screen drawn, without escape sequences."""
        last = self.raw.decode("utf-8", errors="replace").split("\x1b[2J")[-1]
        return _ANSI.sub("", last).replace("\r\n", "\n")

    def wait_for(self, screens: int, timeout: float = 30) -> str:
        """Read until `screens` screens have been drawn in all, the last one whole."""
        deadline = time.monotonic() + timeout
        while self.raw.count(b"\x1b[2J") < screens or not _whole(self.screen()):
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no screen {screens} in {timeout} s; got:\n{self.screen()}")
            self.raw += os.read(self.master, 65536)
        return self.screen()

    def press(self, key: bytes, screens: int) -> str:
        os.write(self.master, key)
        return self.wait_for(screens)

    def finish(self) -> tuple[int, str]:
        """Exit code and stdout, once the process ends."""
        out = b""
        while chunk := os.read(self.out_r, 65536):
            out += chunk
        _, status = os.waitpid(self.pid, 0)
        try:
            while select.select([self.master], [], [], 0)[0]:
                self.raw += os.read(self.master, 65536)
        except OSError:  # the terminal's other end closed
            pass
        os.close(self.master)
        os.close(self.out_r)
        return os.waitstatus_to_exitcode(status), out.decode("utf-8")


def test_interactive_keys_choose_sample_undo_and_quit(lms, bpe_model) -> None:
    lm = lms["bpe"]
    expected = StepSession(lm, "今天", resolve_settings(lm.generation_config))
    first_top = expected.top(10)

    term = Terminal("今天", "-m", bpe_model, "--seed", "5")
    screen = term.wait_for(1)
    assert screen.startswith("今天▏")
    for t in first_top[:5]:  # the numbered candidates, as `topk` ranks them
        assert re.search(rf"^\s*{t['rank']}\s+{re.escape(t['token'])}\s+{t['prob']:.4f}", screen, re.M), (
            screen
        )

    screen = term.press(b"\r", 2)  # Enter: the top one
    expected.choose(0)
    assert screen.startswith(expected.display_text() + "▏")
    screen = term.press(b"3", 3)  # a digit: that candidate
    expected.choose(3)
    assert screen.startswith(expected.display_text() + "▏")
    after_three = expected.display_text()
    screen = term.press(b"\x7f", 4)  # Backspace: undo the 3
    expected.undo()
    assert screen.startswith(expected.display_text() + "▏") and expected.display_text() != after_three
    assert "step 2" in screen
    screen = term.press(b"1", 5)
    expected.choose(1)
    assert "step 3" in screen
    screen = term.press(b"x", 6)  # not a key: the help, nothing chosen
    assert "step 3" in screen and "keys: 0-9 pick" in screen
    os.write(term.master, b"q")
    code, out = term.finish()
    assert code == 0
    assert out == expected.text() + "\n"  # the text on stdout, nothing of the screen
    assert "\x1b" not in out


def test_interactive_undo_of_nothing_and_ctrl_d(bpe_model) -> None:
    term = Terminal("Hello", "-m", bpe_model)
    term.wait_for(1)
    screen = term.press(b"\x7f", 2)
    assert "nothing to undo" in screen
    os.write(term.master, b"\x04")  # Ctrl-D ends too
    code, out = term.finish()
    assert code == 0 and out == "Hello\n"


def test_ctrl_c_keeps_the_text_exits_130_and_restores_the_terminal(bpe_model) -> None:
    import signal

    term = Terminal("Hello", "-m", bpe_model)
    before = term.initial
    term.wait_for(1)
    during = termios.tcgetattr(term.master)
    assert not during[3] & (termios.ICANON | termios.ECHO)  # keys one at a time, not echoed
    term.press(b"\r", 2)
    # The forked child has no controlling terminal, so Ctrl-C typed into the pty would signal nobody:
    # send the SIGINT that the terminal would send.
    os.kill(term.pid, signal.SIGINT)
    after = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the child restores the terminal before it exits
        after = termios.tcgetattr(term.master)
        if after == before:
            break
        time.sleep(0.05)
    code, out = term.finish()
    assert code == 130
    assert out.startswith("Hello") and len(out) > len("Hello\n") and out.endswith("\n")
    assert after == before


def test_rank_zero_with_penalties_is_complete_greedy_with_them(lms) -> None:
    from gptcli.generation.generate import complete

    lm = lms["bpe"]
    values = {"repetition_penalty": 1.2, "presence_penalty": -2.0, "frequency_penalty": 0.5}
    session = StepSession(lm, "今天天气", resolve_settings(lm.generation_config, **values))
    for _ in range(12):
        session.choose(0)
    (done,) = complete(
        lm, "今天天气", resolve_settings(None, greedy=True, max_new_tokens=12, ignore_eos=True, **values)
    )
    assert [c.id for c in session.chosen] == done.token_ids
    plain = StepSession(lm, "今天天气", resolve_settings(lm.generation_config))
    for _ in range(12):
        plain.choose(0)
    assert [c.id for c in plain.chosen] != done.token_ids  # the penalties change the ranking
