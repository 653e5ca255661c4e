"""What every command shares: one input rule, flags that contradict each other refused, messages and
help that fit what the user typed, and the small commands around tokens and the cache."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TEXT = "The cat sat on the mat."
COMMANDS = {
    "tokenize": ["--count"],
    "topk": ["--json"],
    "score": ["--json"],
    "complete": ["--greedy", "-n", "4", "--json"],
}


# -- one input rule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_argument_file_and_stdin_mean_the_same_text(
    cli, bpe_model: Path, tmp_path: Path, command: str
) -> None:
    """`echo TEXT |`, `< file`, `-f file` and the argument all give the same result (one final line break
    of a file or a pipe is not part of the text)."""
    args = (command, "-m", bpe_model, *COMMANDS[command])
    file = tmp_path / "text.txt"
    file.write_text(TEXT + "\n", encoding="utf-8")

    def output(*more: object, stdin: str | None = None) -> str:
        result = cli(*args, *more, stdin=stdin)
        assert result.code == 0, result.err
        if command != "complete":
            return str(result.out)
        timeless = {
            k: v for k, v in json.loads(result.out).items() if k not in ("seconds", "tokens_per_second")
        }
        return json.dumps(timeless)

    typed = output(TEXT)
    assert output(stdin=TEXT + "\n") == typed
    assert output("-f", file) == typed
    file.write_text(TEXT + "\r\n", encoding="utf-8")
    assert output("-f", file) == typed


def test_score_and_tokenize_count_the_same_tokens(cli, bpe_model: Path) -> None:
    count = int(cli("tokenize", "-m", bpe_model, "--count", stdin=TEXT + "\n").out)
    scored = json.loads(cli("score", "-m", bpe_model, "--json", stdin=TEXT + "\n").out)
    assert scored["num_tokens"] == count


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_piped_text_is_never_silently_dropped(cli, bpe_model: Path, tmp_path: Path, command: str) -> None:
    file = tmp_path / "text.txt"
    file.write_text("x", encoding="utf-8")
    both = cli(command, "-m", bpe_model, *COMMANDS[command], "hi", stdin="今天天气很好\n")
    assert both.code == 2 and "piped on stdin and given as TEXT" in both.err, both.err
    assert cli(command, "-m", bpe_model, "-f", file, "hi").code == 2
    assert cli(command, "-m", bpe_model, *COMMANDS[command], "-f", file, stdin="more\n").code == 2
    # '-' asks for stdin explicitly, and an empty pipe holds no second text.
    assert cli(command, "-m", bpe_model, *COMMANDS[command], "-", stdin="hi\n").code == 0
    assert cli(command, "-m", bpe_model, *COMMANDS[command], "hi", stdin="").code == 0


def test_an_argument_never_waits_on_an_open_empty_pipe(bpe_model: Path) -> None:
    """A pipe that stays open and empty (a script's inherited stdin) is not waited on."""
    argv = [sys.executable, "-m", "gptcli", "tokenize", "-m", str(bpe_model), "--count", "hi"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.wait(timeout=60) == 0
        assert proc.stdout is not None and int(proc.stdout.read()) > 0
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.kill()


def test_each_line_reads_lines_from_a_file_or_stdin(cli, bpe_model: Path, tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("a\nb\n", encoding="utf-8")
    from_file = cli("topk", "-m", bpe_model, "--each-line", "-f", file, "-k", "2")
    assert from_file.code == 0 and len(from_file.out.splitlines()) == 2
    assert cli("topk", "-m", bpe_model, "--each-line", "-k", "2", stdin="a\nb\n").out == from_file.out
    assert cli("topk", "-m", bpe_model, "--each-line", "-f", file, stdin="c\n").code == 2


# -- flags that contradict each other ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tokenize", "--ids", "--count", "hi"], "--ids and --count are different outputs"),
        (["tokenize", "--json", "--count", "hi"], "--count and --json are different outputs"),
        (["complete", "hi", "--greedy", "--temperature", "0.5"], "--temperature has no effect with --greedy"),
        (["complete", "hi", "--greedy", "--top-k", "5", "--seed", "1"], "--top-k, --seed have no effect"),
        (["complete", "hi", "-N", "3", "--greedy"], "-N 3 with --greedy would print 3 identical"),
        (["complete", "hi", "-N", "2", "--temperature", "0"], "identical completions"),
    ],
)
def test_conflicting_flags_are_refused(cli, bpe_model: Path, args: list[str], message: str) -> None:
    result = cli(*args, "-m", bpe_model)
    assert result.code == 2 and message in result.err, result.err
    assert result.out == ""


def test_greedy_by_the_model_with_samples_says_how_to_sample(cli, bpe_model: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(bpe_model, tmp_path / "greedy"))
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "do_sample": False}))
    result = cli("complete", "hi", "-m", folder, "-N", "2")
    assert result.code == 2 and "do_sample false" in result.err and "--sample" in result.err
    assert cli("complete", "hi", "-m", folder, "-N", "2", "--sample", "-n", "2").code == 0


# -- help and messages ----------------------------------------------------------------------------------


def test_bare_gptcli_prints_the_help_and_succeeds(cli) -> None:
    result = cli()
    assert result.code == 0 and "Usage: gptcli" in result.out and "Error" not in result.out + result.err


def test_help_shows_flags_without_a_value_and_every_command_has_examples(cli) -> None:
    commands = ["info", "tokenize", "detokenize", "topk", "score", "complete", "finetune", "models", "pull"]
    commands += ["compare", "step", "lens", "attention", "attribute", "patch", "chat", "serve"]
    for name in commands:
        result = cli(name, "--help")
        assert result.code == 0, name
        assert "<bool>" not in result.out and "<list[" not in result.out, name
        assert "Examples" in result.out, name
        examples = [line.strip() for line in result.out[result.out.index("Examples") :].splitlines()[1:]]
        commands = [line for line in examples if line]
        assert len(commands) >= 2 and " · " not in " ".join(commands), name  # one example a line


@pytest.mark.parametrize("name", ["attribute", "chat", "patch"])
def test_a_command_s_help_wraps_at_the_terminal_not_at_the_docstring_s_line_breaks(
    cli, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    import inspect

    from gptcli.cli import app

    monkeypatch.setenv("COLUMNS", "1000")
    result = cli(name, "--help")
    callbacks = [c.callback for c in app.registered_commands if c.callback is not None]
    callback = next(c for c in callbacks if c.__name__ == name)
    for paragraph in inspect.cleandoc(callback.__doc__ or "").split("\n\n"):
        assert " ".join(paragraph.split()) in result.out, paragraph


ORDER = {
    "Generate": ["complete", "chat", "step"],
    "Inspect": [
        "tokenize",
        "detokenize",
        "topk",
        "score",
        "lens",
        "attention",
        "attribute",
        "patch",
        "compare",
    ],
    "Train": ["finetune", "merge"],
    "Serve": ["serve"],
    "Models": ["models", "pull", "info"],
}


def test_gptcli_help_groups_the_commands_each_on_one_line(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gptcli --help`: panels Generate, Inspect, Train, Serve, Models in that order; on a wide terminal
    each command's summary is one line, never broken mid-phrase."""
    monkeypatch.setenv("COLUMNS", "250")
    out = cli("--help").out
    panels = re.findall(r"╭─ (\w+) ─", out)
    assert panels == ["Options", *ORDER], panels
    for panel, names in ORDER.items():
        body = out[out.index(f"╭─ {panel} ─") :]
        body = body[: body.index("╰")]
        rows = [line.strip("│ ").split()[0] for line in body.splitlines()[1:]]
        assert rows == names, (panel, rows)  # every row starts with a command: no wrapped lines


def test_messages_fit_what_was_typed(cli, unreachable_hub: Path) -> None:
    stop = cli("complete", "hi", "--stop", "")
    assert stop.code == 2 and "('',)" not in stop.err and "--stop must not be empty" in stop.err
    typo = cli("complete", "--bogus", "hi")
    assert typo.code == 2 and "--verbose" not in typo.err and "No such option: --bogus" in typo.err
    near = cli("complete", "--temprature", "1", "hi")
    assert "did you mean --temperature?" in near.err
    name = cli("pull", "bad name!!")
    assert name.code == 2 and "is not a hub id" in name.err and "local folder" not in name.err
    offline = cli("pull", "someone/nothing-here")
    assert (
        offline.code == 1 and "gptcli pull someone/nothing-here" in offline.err and " -m " not in offline.err
    )


# -- tokens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["bpe", "bert"])
def test_detokenize_inverts_tokenize(cli, models: dict[str, Path], fixture: str) -> None:
    text = "今天天气很好 Hello world"
    ids = cli("tokenize", "-m", models[fixture], "--ids", text).out.split()
    back = cli("detokenize", "-m", models[fixture], *ids)
    assert back.code == 0, back.err
    # WordPiece keeps no spaces: they come back between words, not next to CJK; BERT lowercases.
    assert back.out == (text if fixture == "bpe" else "今天天气很好hello world") + "\n"
    piped = cli("detokenize", "-m", models[fixture], stdin=" ".join(ids) + "\n")
    assert piped.out == back.out
    described = json.loads(cli("detokenize", "-m", models[fixture], "--json", *ids).out)
    assert described["ids"] == [int(i) for i in ids] and described["text"] + "\n" == back.out
    if fixture == "bpe":
        assert b"".join(bytes.fromhex(t["bytes"]) for t in described["tokens"]) == text.encode()


def test_detokenize_refuses_what_is_not_an_id(cli, bpe_model: Path) -> None:
    assert "is not a token id" in cli("detokenize", "-m", bpe_model, "12", "x").err
    assert "is not in the vocabulary" in cli("detokenize", "-m", bpe_model, "999999").err


def test_tokenize_json_offsets_point_into_the_text(cli, models: dict[str, Path]) -> None:
    text = "Hello 世界, 龙🐉!"
    for fixture in ("bpe", "bert"):
        tokens = json.loads(cli("tokenize", "-m", models[fixture], "--json", text).out)["tokens"]
        assert all(0 <= t["start"] < t["end"] <= len(text) for t in tokens)
        if fixture == "bpe":  # byte-level pieces cover the text in order, split characters sharing one
            assert tokens[0]["start"] == 0 and tokens[-1]["end"] == len(text)
            assert all(
                a["end"] <= b["start"] or a["start"] == b["start"] for a, b in itertools.pairwise(tokens)
            )
        else:
            assert [text[t["start"] : t["end"]].lower() for t in tokens if t["token"] != "[UNK]"] == [
                t["token"] for t in tokens if t["token"] != "[UNK]"
            ]


# -- output that does not mislead -----------------------------------------------------------------------


def test_a_character_left_unfinished_at_the_end_is_left_out(cli, bpe_model: Path) -> None:
    """A budget that ends between the bytes of a character: no U+FFFD, the same text streamed and in
    JSON, and the JSON keeps every token id."""
    from gptcli.generation.generate import complete
    from gptcli.generation.sampling import resolve_settings
    from gptcli.generation.tokens import TokenText, unfinished_tail
    from gptcli.loading.models import load_model

    lm = load_model(str(bpe_model), device="cpu")
    names = TokenText(lm.tokenizer)
    found = 0
    for seed in range(40):
        settings = resolve_settings(
            lm.generation_config, max_new_tokens=6, seed=seed, temperature=2.0, top_k=0
        )
        (done,) = complete(lm, "今天", settings)
        data = b"".join(names.bytes(i) for i in done.token_ids)
        if done.finish_reason != "length" or not unfinished_tail(data):
            continue
        found += 1
        # What the bytes say, less the character they leave unfinished (bytes that are not UTF-8 at
        # all, earlier on, stay U+FFFD: that is what the model wrote).
        assert done.text == data[: len(data) - unfinished_tail(data)].decode("utf-8", errors="replace")
        args = (
            "complete",
            "今天",
            "-m",
            bpe_model,
            "-n",
            "6",
            "--seed",
            seed,
            "--temperature",
            "2",
            "--top-k",
            "0",
        )
        (line,) = [json.loads(x) for x in cli(*args, "--json").out.splitlines()]
        assert line["text"] == done.text and line["token_ids"] == done.token_ids
        assert cli(*args).out == done.text + "\n"
    assert found, "no sample ended mid-character: widen the search"


def test_score_says_when_unknown_tokens_make_the_figure_meaningless(cli, bert_model: Path) -> None:
    result = cli("score", "-m", bert_model, "Zebras juggle xylophones quietly")
    assert result.code == 0
    assert "are the unknown token [UNK]" in result.err
    assert json.loads(cli("score", "-m", bert_model, "--json", "今天天气很好").out)["unknown_tokens"] == 0


def test_complete_notes_a_completion_of_only_unknown_tokens(cli, bert_model: Path, tmp_path: Path) -> None:
    """A model that learned to write only [UNK] (English through a Chinese character vocabulary)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(bert_model, tmp_path / "unk"))
    weights = load_file(folder / "model.safetensors")
    unk = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]["[UNK]"]
    wte = weights["transformer.wte.weight"]
    wte[unk] = wte[unk] / wte[unk].norm() * 50  # the tied output layer: [UNK] wins from any hidden state
    weights["transformer.ln_f.weight"] = torch.zeros_like(weights["transformer.ln_f.weight"])
    weights["transformer.ln_f.bias"] = wte[unk].clone() / 10
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    result = cli("complete", "today", "-m", folder, "--greedy", "-n", "5")
    assert result.code == 0, result.err
    assert "only the unknown token [UNK]" in result.err


def test_info_names_the_tokenizer_as_people_know_it(cli, models: dict[str, Path]) -> None:
    bpe = json.loads(cli("info", "-m", models["bpe"], "--json").out)
    bert = json.loads(cli("info", "-m", models["bert"], "--json").out)
    assert bpe["tokenizer"].startswith("byte-level BPE (") and "TokenizersBackend" not in bpe["tokenizer"]
    assert bert["tokenizer"].startswith("WordPiece (Bert")


def test_heat_map_levels_stay_apart_on_16_colours_and_without_colour() -> None:
    from rich.console import Console

    from gptcli.cli._common import SURPRISE, surprise_style

    probs = [0.9, *(bound * 0.9 for bound in SURPRISE)]
    for console in (Console(color_system="standard"), Console(color_system="256"), Console(no_color=True)):
        styles = [surprise_style(p, console) for p in probs]
        assert len(set(styles)) == len(styles) if console.color_system else len(set(styles)) >= 4
    plain = Console(no_color=True)
    assert surprise_style(0.0001, plain) == "reverse" and "on" not in surprise_style(0.01, plain)


def test_score_reports_progress_window_by_window(bpe_model: Path) -> None:
    from gptcli.inspection.predict import score_text
    from gptcli.loading.models import load_model

    lm = load_model(str(bpe_model), device="cpu")
    seen: list[tuple[int, int]] = []
    result = score_text(lm, TEXT * 40, stride=32, on_progress=lambda done, total: seen.append((done, total)))
    assert len(seen) > 3 and seen[-1] == (result.num_tokens, result.num_tokens)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# -- the cache ------------------------------------------------------------------------------------------


def _cache_entry(
    cache: Path, repo_id: str, model: Path, commit: str = "0123456789abcdef" * 2 + "01234567"
) -> Path:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_pull_offline_answers_from_the_cache(cli, unreachable_hub: Path, bpe_model: Path) -> None:
    snapshot = _cache_entry(unreachable_hub, "gpt2", bpe_model)
    result = cli("pull", "gpt2")
    assert result.code == 0, result.err
    assert result.out == f"{snapshot}\n" and "already cached at" in result.err
    assert cli("pull", "gpt2", "--revision", "main").code == 0
    assert cli("pull", "gpt2", "--revision", "v9").code == 1  # not cached at that revision, no network


def test_models_rm_removes_every_revision_and_says_what_it_freed(
    cli, unreachable_hub: Path, bpe_model: Path
) -> None:
    _cache_entry(unreachable_hub, "someone/tiny", bpe_model)
    listed = [json.loads(line)["id"] for line in cli("models", "--json").out.splitlines()]
    assert "someone/tiny" in listed
    result = cli("models", "rm", "someone/tiny")
    assert result.code == 0, result.err
    assert result.out.startswith("removed someone/tiny (") and "freed)" in result.out
    assert not (unreachable_hub / "models--someone--tiny").exists()
    assert cli("models", "rm", "someone/tiny").code == 2
    assert cli("models", "rm", "builtin").code == 2


def test_models_rm_of_a_path_says_it_is_a_path(cli, unreachable_hub: Path, tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    for name in (str(tmp_path / "folder"), "./folder", "~/x"):
        result = cli("models", "rm", name)
        assert result.code == 2 and f"Error: '{name}' is a path, not a hub id: " in result.err, result.err
    bad = cli("models", "rm", "a--b")
    assert bad.code == 2 and "is not a hub id: a hub id is NAME or OWNER/NAME" in bad.err
    assert "repo_type" not in bad.err


def test_an_uncached_hub_id_fails_before_torch_loads(unreachable_hub: Path, tmp_path: Path) -> None:
    """`complete -m gpt2` offline: the answer comes before the seconds torch takes to import."""
    code = (
        "import sys; from gptcli.cli import run; code = run(['complete', '-m', 'someone/absent', 'hi']); "
        "print(code, 'torch' in sys.modules)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(unreachable_hub), "HF_ENDPOINT": "http://127.0.0.1:9"}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["1", "False"], out.stderr
    assert time.monotonic() - started < 20


def test_every_doc_is_linked_from_the_readme() -> None:
    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in sorted((root / "docs").glob("*.md")) if f"(docs/{p.name})" not in readme]
    assert unlinked == []


@pytest.mark.parametrize("command", [["topk", "hi"], ["score", "hi there"], ["lens", "hi"]])
def test_no_empty_progress_bar_flashes_on_a_terminal(bpe_model: Path, command: list[str]) -> None:
    """stderr on a terminal: a progress bar appears only once its total is known, never as `0/0`."""
    import pty

    from forked import fork_main

    master, slave = pty.openpty()
    out_r, out_w = os.pipe()
    pid = fork_main(*command, "-m", bpe_model, stdout=out_w, stderr=slave, close=[master, out_r])
    os.close(slave)
    os.close(out_w)
    shown = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown += data
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.read(out_r, 1 << 16)  # the command's data went to stdout
    os.close(out_r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b" 0/0 " not in shown.replace(b"\x1b[32m", b" ").replace(b"\x1b[0m", b" "), shown
