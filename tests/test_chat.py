"""`gptcli chat` and gptcli.generation.session: a model kept loaded for entry after entry.

The REPL is driven through a pseudo-terminal, keys as a person types them (Ctrl-C, Ctrl-D included).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from gptcli.errors import UsageError
from gptcli.generation.generate import complete
from gptcli.generation.sampling import resolve_settings
from gptcli.generation.session import Session, Turn

import tiny

GREEDY = {"greedy": True, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def lm(bpe_model: Path):
    from gptcli.loading.models import load_model

    return load_model(str(bpe_model), device="cpu")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixture GPT-2 with 8,192 positions: a reply as long as that takes seconds, time to press Ctrl-C."""
    folder = tmp_path_factory.mktemp("long") / "tiny-long"
    return tiny.save_gpt2(folder, tiny.byte_level_tokenizer(), n_positions=8192)


def test_each_entry_continues_the_text_so_far(lm) -> None:
    """Without a chat template, entry 2 continues entry 1 and its reply: each reply is `complete`'s
    greedy continuation of the whole text so far."""
    session = Session.start(lm, resolve_settings(lm.generation_config, **GREEDY))
    assert not session.chat
    first = "".join(session.send("今天"))
    settings = resolve_settings(lm.generation_config, **GREEDY)
    assert first == complete(lm, "今天", settings)[0].text and first
    second = "".join(session.send("我们"))
    assert second == complete(lm, "今天" + first + "我们", settings)[0].text
    assert session.text() == "今天" + first + "我们" + second
    top = session.top(3)
    assert top.prompt == session.text() and [t["rank"] for t in top.tokens] == [1, 2, 3]
    session.reset()
    assert session.text() == "" and session.top(1).prompt == ""


def test_a_stopped_reply_keeps_what_was_generated(lm) -> None:
    session = Session.start(lm, resolve_settings(lm.generation_config, greedy=True, max_new_tokens=40))
    reply = session.send("今天")
    shown = next(reply)
    reply.close()  # what Ctrl-C does while the reply is being printed
    assert session.turns[-1].reply == shown and session.turns[-1].finish_reason == "interrupted"
    assert session.text() == "今天" + shown


def test_set_changes_one_setting_or_none(lm) -> None:
    session = Session.start(lm)
    assert session.set("temperature", "0.7") == 0.7 and session.settings.temperature == 0.7
    assert session.set("top-k", "0") == 0 and session.settings.top_k == 0
    assert session.set("greedy", "on") is True and session.set("seed", "off") is None
    assert session.set("min_p", "0.1") == 0.1
    before = session.settings
    for name, value, message in (
        ("temperature", "-1", "--temperature must be a number >= 0"),
        ("top_p", "2", "--top-p must be in (0, 1]"),
        ("top_k", "x", "top_k takes a whole number"),
        ("greedy", "maybe", "greedy is on or off"),
        ("batch_size", "2", "no setting 'batch_size'"),
    ):
        with pytest.raises(UsageError, match=re.escape(message)):
            session.set(name, value)
    assert session.settings == before


def test_a_model_with_a_chat_template_keeps_the_conversation(bpe_model: Path, tmp_path: Path) -> None:
    from gptcli.loading.models import load_model

    folder = tmp_path / "chat-model"
    shutil.copytree(bpe_model, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    lm = load_model(str(folder), device="cpu")
    session = Session.start(lm, resolve_settings(lm.generation_config, **GREEDY), system="Be brief.")
    assert session.chat
    first = "".join(session.send("今天"))
    "".join(session.send("我们"))
    assert session.messages()[1:] == [
        {"role": "user", "content": "今天"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "我们"},
        {"role": "assistant", "content": session.turns[1].reply},
    ]
    assert session.text().startswith("<system>Be brief.\n<user>今天\n<assistant>" + first + "\n<user>我们\n")


def test_piped_entries_are_read_one_a_line(cli, bpe_model: Path, tmp_path: Path, lm) -> None:
    script = f"今天\n/set bogus 1\n/topk 2\n/save {tmp_path / 'text.txt'}\n/reset\n/text\n"
    result = cli("chat", "-m", bpe_model, "--greedy", "-n", "8", stdin=script)
    assert result.code == 0, result.err
    reply = complete(lm, "今天", resolve_settings(lm.generation_config, **GREEDY))[0].text
    top = Session(lm, resolve_settings(lm.generation_config), chat=False)
    top.turns.append(Turn("今天", reply, "length"))
    expected = [f"{t['rank']}\t{t['id']}" for t in top.top(2).tokens]
    lines = result.out.split("\n")
    assert "".join(lines[: reply.count("\n") + 1]) == reply.replace("\n", "")
    assert [line.split("\t")[0] + "\t" + line.split("\t")[1] for line in lines if "\t" in line] == expected
    assert (tmp_path / "text.txt").read_text(encoding="utf-8") == "今天" + reply
    assert "Error: no setting 'bogus'" in result.err and "Traceback" not in result.err


def test_the_repl_on_a_terminal(long_model: Path, tmp_path: Path) -> None:
    """A person at a terminal: an entry, /set, /topk, Ctrl-C at the prompt and during a long reply (the
    session goes on), a multi-line entry, /save, /reset, and Ctrl-D to leave."""
    import pexpect.fdpexpect
    from forked import fork_main_on_a_terminal

    from gptcli.loading.models import load_model

    lm = load_model(str(long_model), device="cpu")
    greedy = resolve_settings(lm.generation_config, **GREEDY)
    first = complete(lm, "今天", greedy)[0].text
    after_first = Session(lm, greedy, chat=False)
    "".join(after_first.send("今天"))
    top_ids = [t["id"] for t in after_first.top(3).tokens]

    pid, master = fork_main_on_a_terminal(
        "chat", "-m", long_model, "--greedy", "-n", "8", env={"NO_COLOR": "1", "TERM": "xterm"}
    )
    term = pexpect.fdpexpect.fdspawn(master, timeout=30, encoding="utf-8")

    def enter(line: str) -> str:
        """Type a line and wait for the next prompt; what the terminal showed in between."""
        term.sendline(line)
        term.expect_exact("\r\n> ")
        return str(term.before)

    try:
        term.expect("/help for commands, Ctrl-D to leave")
        term.expect_exact("> ")
        assert first.replace("\n", "\r\n") in enter("今天")
        assert "greedy off" in enter("/set greedy off")
        assert "temperature 0.7" in enter("/set temperature 0.7")
        assert "greedy on" in enter("/set greedy on")
        table = enter("/topk 3")
        assert [int(i) for i in re.findall(r"^\s*\d+\s+(\d+)\s", table, re.M)] == top_ids
        term.send("half a line")
        term.expect_exact("half a line")  # echoed: readline has the line (a loaded machine is slow)
        term.send("\x03")  # Ctrl-C at the prompt drops the line, not the session
        term.expect_exact("\r\n> ")
        enter("/set max_new_tokens 8000")
        assert "ignore_eos on" in enter("/set ignore_eos on")
        term.sendline("我们")
        term.expect(r"\S{20}")  # the long reply is under way (thousands of tokens, seconds)
        term.send("\x03")
        term.expect_exact("stopped; the reply so far is kept")
        term.expect_exact("\r\n> ")
        saved = tmp_path / "text.txt"
        assert "saved " in enter(f"/save {saved}")
        text = saved.read_text(encoding="utf-8")
        assert text.startswith("今天" + first + "我们") and len(text) > len("今天" + first + "我们") + 20
        assert len(lm.tokenizer.encode(text)) < 4000  # stopped long before the 8,000 tokens
        assert "started anew" in enter("/reset")
        enter("/set max_new_tokens 1")
        term.sendline("line one\\")
        term.expect_exact("\r\n. ")
        enter("line two")
        enter(f"/save {saved}")
        assert saved.read_text(encoding="utf-8").startswith("line one\nline two")
        term.send("\x04")  # Ctrl-D leaves
        term.expect(pexpect.EOF)
    finally:
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:  # a failed expectation: the child still waits for keys
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0


def test_topk_of_zero_is_refused_in_chat_s_own_words(cli, bpe_model: Path) -> None:
    result = cli("chat", "-m", bpe_model, "--greedy", "-n", "2", stdin="/topk 0\n/topk -3\n")
    assert result.code == 0, result.err
    assert result.err.count("Error: /topk takes a number of at least 1") == 2
    assert "-k must" not in result.err and "Traceback" not in result.err
