"""tokenize, topk and score: output formats, and probabilities equal to a direct transformers computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptcli.inspection.predict import next_token_distribution, score_text
from gptcli.loading.models import load_model


@pytest.fixture(scope="module")
def reference(bpe_model: Path, bert_model: Path):
    """Plain transformers objects for the fixtures, loaded independently of gptcli."""
    out = {}
    for name, path in (("bpe", bpe_model), ("bert", bert_model)):
        out[name] = (AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval())
    return out


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


# -- tokenize ---------------------------------------------------------------------------------------


def test_tokenize_plain_shows_split_characters_as_bytes(bpe_model: Path, cli, reference) -> None:
    result = cli("tokenize", "-m", bpe_model, "今天天气 龙")
    assert result.code == 0, result.err
    lines = [line.split("\t") for line in result.out.splitlines()]
    tokenizer, _ = reference["bpe"]
    assert [int(i) for i, _ in lines] == tokenizer.encode("今天天气 龙")
    pieces = [p for _, p in lines]
    assert pieces[:2] == ["今天", "天气"]
    # 龙 (e9 be 99) is not in the tokenizer's training text: three byte tokens, never a bare U+FFFD
    assert pieces[-3:] == ["<e9>", "<be>", "<99>"]
    assert "\ufffd" not in result.out


def test_tokenize_json_bytes_reassemble_the_text(bpe_model: Path, cli) -> None:
    text = "Hello 世界, 龙🐉!\nnew line"
    result = cli("tokenize", "-m", bpe_model, "--json", text)
    obj = json.loads(result.out)
    assert obj["text"] == text and obj["model"] == str(bpe_model)
    assert b"".join(bytes.fromhex(t["bytes"]) for t in obj["tokens"]) == text.encode("utf-8")
    assert {"\n"} <= {t["token"] for t in obj["tokens"]}


def test_json_tokens_are_their_exact_text_and_only_displays_escape(bpe_model: Path, cli) -> None:
    """One rule (docs/usage.md): in JSON `token` is the token's exact text (a newline is "\n" in JSON,
    a real line break), byte notation only for part of a character; `\\n` is for TSV and terminals."""
    text = "a\n\tb 龙"
    for command in ("tokenize", "score"):
        tokens = json.loads(cli(command, "-m", bpe_model, "--json", text).out)["tokens"]
        pieces = {t["token"]: bytes.fromhex(t["bytes"]) for t in tokens}
        assert "\n" in pieces and "\\n" not in pieces, (command, pieces)
        assert {"<e9>", "<be>", "<99>"} <= set(pieces)  # 龙: three byte pieces
        for token, data in pieces.items():
            assert token.encode() == data or token.startswith("<")
        plain = cli(command, "-m", bpe_model, text).out
        assert "\\n" in plain and "\\t" in plain  # one token a line: escaped


def test_tokenize_ids_count_and_stdin(bpe_model: Path, cli, reference) -> None:
    tokenizer, _ = reference["bpe"]
    expected = tokenizer.encode("今天天气很好")
    ids = cli("tokenize", "-m", bpe_model, "--ids", stdin="今天天气很好\n")
    assert ids.out == " ".join(map(str, expected)) + "\n"
    count = cli("tokenize", "-m", bpe_model, "--count", "-", stdin="今天天气很好")
    assert count.out == f"{len(expected)}\n"


def test_tokenize_bert_style(bert_model: Path, cli) -> None:
    obj = json.loads(cli("tokenize", "-m", bert_model, "--json", "今天 hello").out)
    assert [t["token"] for t in obj["tokens"]] == ["今", "天", "hello"]
    assert obj["tokens"][0]["bytes"] == "今".encode().hex()


def test_invalid_utf8_on_stdin(bpe_model: Path, cli) -> None:
    result = cli("tokenize", "-m", bpe_model, stdin=b"ok \xff\xfe")
    assert result.code == 2
    assert result.err == "Error: stdin is not valid UTF-8 (byte offset 3)\n"


@pytest.mark.parametrize("command", ["tokenize", "topk", "score"])
def test_argument_bytes_that_are_not_utf8(bpe_model: Path, cli, command: str) -> None:
    """`gptcli tokenize $'ok \\xff'`: Python hands such argv bytes over as lone surrogates."""
    result = cli(command, "-m", bpe_model, b"ok \xff\xfe".decode("utf-8", "surrogateescape"))
    assert result.code == 2
    assert result.err == "Error: the text is not valid UTF-8 (byte offset 3)\n"
    escaped = "".join(chr(0xDC00 + b) for b in "今".encode())  # escaped bytes that are UTF-8 after all
    assert (
        cli("tokenize", "-m", bpe_model, "--ids", escaped).out
        == cli("tokenize", "-m", bpe_model, "--ids", "今").out
    )


def test_an_error_line_stays_one_line(cli) -> None:
    result = cli("topk", "-m", "no\nsuch\x1b[2J\u202emodel\udcff", "hi")
    assert result.code == 2
    assert result.err == "Error: no model folder at no\\nsuch\\x1b[2J\\u202emodel\\udcff\n"


# -- topk -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["bpe", "bert"])
@pytest.mark.parametrize("prompt", ["今天天气", "The weather is", ""])
def test_topk_equals_transformers(fixture: str, prompt: str, models, reference, cli) -> None:
    tokenizer, model = reference[fixture]
    result = cli("topk", "-m", models[fixture], "--json", "-k", "7", prompt, stdin="")
    assert result.code == 0, result.err
    obj = json.loads(result.out)
    if fixture == "bert":  # trained as [CLS] text ...: the trailing [SEP] would say "the end"
        ids = [tokenizer.cls_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    else:  # GPT-2 adds nothing; an empty prompt is conditioned on <|endoftext|>
        ids = tokenizer.encode(prompt) or [tokenizer.bos_token_id]
    logprobs = direct_logprobs(model, ids)[-1]
    top = torch.topk(logprobs, 7)
    assert [t["id"] for t in obj["tokens"]] == top.indices.tolist()
    for t, lp in zip(obj["tokens"], top.values.tolist(), strict=True):
        assert abs(t["logprob"] - lp) < 1e-5
        assert abs(t["prob"] - math.exp(lp)) < 1e-5
    assert [t["rank"] for t in obj["tokens"]] == list(range(1, 8))
    assert obj["prompt"] == prompt


def test_topk_temperature(bpe_model: Path, reference, cli) -> None:
    tokenizer, model = reference["bpe"]
    obj = json.loads(cli("topk", "-m", bpe_model, "--json", "--temperature", "2.5", "天气").out)
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode("天气")])).logits[0, -1]
    expected = torch.log_softmax(logits / 2.5, dim=-1)
    for t in obj["tokens"]:
        assert abs(t["logprob"] - expected[t["id"]].item()) < 1e-5


def test_topk_piped_is_tab_separated(bpe_model: Path, cli) -> None:
    result = cli("topk", "-m", bpe_model, "-k", "3", "hello")
    rows = [line.split("\t") for line in result.out.splitlines()]
    assert len(rows) == 3 and all(len(r) == 5 for r in rows)
    assert [r[0] for r in rows] == ["1", "2", "3"]
    probs = [float(r[3]) for r in rows]
    assert probs == sorted(probs, reverse=True)
    assert all(abs(math.log(float(r[3])) - float(r[4])) < 1e-4 for r in rows)


def test_topk_each_line_order_and_batching(bpe_model: Path, cli) -> None:
    prompts = ["今天天气", "The cat is", "", "明天可能会下雨，记得", "Hello world! Numbers like 12345"]
    result = cli("topk", "-m", bpe_model, "--each-line", "--batch-size", "2", stdin="\n".join(prompts) + "\n")
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in result.out.splitlines()]
    assert [obj["prompt"] for obj in lines] == prompts
    lm = load_model(str(bpe_model), device="cpu")
    for prompt, obj in zip(prompts, lines, strict=True):
        alone = next_token_distribution(lm, [prompt], k=10)[0].tokens
        assert [t["id"] for t in obj["tokens"]] == [t["id"] for t in alone]
        for a, b in zip(obj["tokens"], alone, strict=True):
            assert abs(a["logprob"] - b["logprob"]) < 1e-5


def test_topk_long_prompt_keeps_the_last_tokens(models, reference, cli) -> None:
    tokenizer, _ = reference["bpe"]
    prompt = "The weather is nice today, so we are going for a walk in the park. " * 3
    ids = tokenizer.encode(prompt)
    assert len(ids) > 24
    result = cli("topk", "-m", models["short"], "--json", prompt)
    assert result.code == 0
    assert "more tokens than the context (24)" in result.err
    short = AutoModelForCausalLM.from_pretrained(models["short"]).eval()
    expected = direct_logprobs(short, ids[-24:])[-1].argmax().item()
    assert json.loads(result.out)["tokens"][0]["id"] == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], "-k must be at least 1"),
        (["--temperature", "0"], "--temperature must be a positive number"),
        (["--temperature", "nan"], "--temperature must be a positive number"),
        (["--device", "quantum"], "unknown device 'quantum'"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["-k", "many"], "Invalid value for '--k'"),
    ],
)
def test_topk_bad_values_are_usage_errors(bpe_model: Path, cli, args: list[str], message: str) -> None:
    result = cli("topk", "-m", bpe_model, *args, "hi")
    assert result.code == 2
    assert result.err.startswith("Error: ") and message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert result.out == ""


# -- score ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["bpe", "bert"])
def test_score_equals_transformers(fixture: str, models, reference, cli) -> None:
    text = "今天天气很好，我们去公园散步吧。The cat is sleeping."
    tokenizer, model = reference[fixture]
    result = cli("score", "-m", models[fixture], "--json", text)
    assert result.code == 0, result.err
    obj = json.loads(result.out)
    text_ids = tokenizer.encode(text, add_special_tokens=False)
    start = tokenizer.bos_token_id if fixture == "bpe" else tokenizer.cls_token_id
    logprobs = direct_logprobs(model, [start, *text_ids])
    expected = [logprobs[i, t].item() for i, t in enumerate(text_ids)]
    assert [t["id"] for t in obj["tokens"]] == text_ids
    assert all(abs(t["logprob"] - e) < 1e-5 for t, e in zip(obj["tokens"], expected, strict=True))
    ranks = [int((logprobs[i] > logprobs[i, t]).sum()) + 1 for i, t in enumerate(text_ids)]
    assert [t["rank"] for t in obj["tokens"]] == ranks
    assert obj["num_tokens"] == len(text_ids)
    assert math.isclose(obj["perplexity"], math.exp(-sum(expected) / len(expected)), rel_tol=1e-5)
    bpb = -sum(expected) / math.log(2) / len(text.encode())
    assert math.isclose(obj["bits_per_byte"], bpb, rel_tol=1e-5)


def test_score_sliding_window(models, reference) -> None:
    """A text longer than the context: every token scored once, each with enough history."""
    tokenizer, _ = reference["bpe"]
    short = AutoModelForCausalLM.from_pretrained(models["short"]).eval()
    lm = load_model(str(models["short"]), device="cpu")
    text = "Learning a new language takes time and patience. 学习一门新的语言需要时间和耐心。" * 2
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text)]
    assert len(ids) > 2 * 24
    result = score_text(lm, text, stride=8)
    assert [t["id"] for t in result.tokens] == ids[1:]
    # The first window is a plain forward pass over the first 24 positions.
    first = direct_logprobs(short, ids[:24])
    for i in range(1, 24):
        assert abs(result.tokens[i - 1]["logprob"] - first[i - 1, ids[i]].item()) < 1e-5
    # The last tokens are scored by the first window that reaches the end (windows start every 8).
    begin = next(b for b in range(0, len(ids), 8) if b + 24 >= len(ids))
    last = direct_logprobs(short, ids[begin:])
    assert len(ids) - begin >= 24 - 8  # every token had at least context - stride tokens of history
    for i in range(begin + 24 - 8, len(ids)):
        assert abs(result.tokens[i - 1]["logprob"] - last[i - 1 - begin, ids[i]].item()) < 1e-5
    assert math.isfinite(result.perplexity)
    # stride == context: windows overlap by the one token the next window needs as history
    assert [t["id"] for t in score_text(lm, text, stride=24).tokens] == ids[1:]


def test_score_plain_and_file(bpe_model: Path, tmp_path: Path, cli) -> None:
    file = tmp_path / "text.txt"
    file.write_text("今天天气很好\n", encoding="utf-8")
    result = cli("score", "-m", bpe_model, "-f", file)
    assert result.code == 0, result.err
    rows = [line.split("\t") for line in result.out.splitlines()]
    assert all(len(r) == 4 for r in rows)
    assert "perplexity" in result.err and "bits/byte" in result.err
    assert cli("score", "-m", bpe_model, "-f", tmp_path / "nope.txt").code == 2
    assert cli("score", "-m", bpe_model, "--stride", "0", "hello").code == 2
    assert cli("score", "-m", bpe_model, "", stdin="").code == 2


# -- start-up ---------------------------------------------------------------------------------------


def test_help_and_version_do_not_import_torch() -> None:
    """`gptcli --help`, `--version` and every command's --help (found on the app, so a new command is
    covered too) load none of the heavy libraries: help must stay instant."""
    code = (
        "import sys\n"
        "import typer.main\n"
        "from gptcli.cli import app, run\n"
        "group = typer.main.get_command(app)\n"
        "commands = [[name] for name in group.commands]\n"
        "for name, command in group.commands.items():\n"
        "    commands += [[name, sub] for sub in getattr(command, 'commands', {})]\n"
        "for argv in [['--help'], ['--version']] + [[*c, '--help'] for c in commands]:\n"
        "    assert run(argv) == 0, argv\n"
        "heavy = ('torch', 'transformers', 'numpy', 'tokenizers', 'matplotlib',\n"
        "         'fastapi', 'uvicorn', 'starlette')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert len(commands) >= 15, commands\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "gptcli 0.1.0" in proc.stdout
    for option in ("--api-key", "model_a", "--choose", "--sublayer", "--rollout"):  # the commands' own
        assert option in proc.stdout, option
