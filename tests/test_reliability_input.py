"""Bad input, tried systematically: every command, driven in this process with generated arguments and stdin.

The promise under test (docs/reliability.md): whatever the arguments and stdin, a command ends with exit
code 0, 1 or 2, within a time bound; when it fails, stderr ends with exactly one `Error:` line written
for a person (never a traceback, never the catch-all `set GPTCLI_DEBUG=1` line of an unexpected
exception), and when it succeeds its output holds (finite probabilities, bytes that reassemble the text).

Example counts are small here so the file runs in seconds; GPTCLI_HEAVY=1 raises them (and draws new
examples on every run instead of the same derandomized ones).
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny

HEAVY = os.environ.get("GPTCLI_HEAVY", "") not in ("", "0")
CASE_SECONDS = 30  # far above any case here (most take 0.1 s): only a hang reaches it
TALLY: dict[str, int] = {}  # cases run per test, printed at the end (pytest -s) for docs/reliability.md


def examples(ci: int, heavy: int) -> settings:
    return settings(
        max_examples=heavy if HEAVY else ci,
        deadline=None,  # a shared 2-core machine: the time bound below is what catches a hang
        derandomize=not HEAVY,  # CI tries the same cases every run; heavy runs explore new ones
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- running a command --------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by the time bound; a BaseException so that no `except Exception` in gptcli can swallow it."""


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Terminal(io.TextIOWrapper):
    """stdin when nothing is piped: a terminal."""

    def isatty(self) -> bool:
        return True


@dataclass
class Outcome:
    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("Error:")]


def invoke(argv: list[str], stdin: bytes | None = None, bound: float = CASE_SECONDS) -> Outcome:
    """`gptcli ARGV` through gptcli.cli.run, with stdin, stdout and stderr as a real process has them:
    stdin bytes (None: a terminal), strict UTF-8 stdout, stderr that escapes what it cannot encode."""
    from gptcli.cli import run

    fake_in = (_Terminal if stdin is None else io.TextIOWrapper)(io.BytesIO(stdin or b""), encoding="utf-8")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", newline="")
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = fake_in, out, err
    started = time.perf_counter()
    try:
        with time_bound(bound):
            code = run(list(argv))
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    seconds = time.perf_counter() - started
    out.flush()
    err.flush()
    return Outcome(argv, code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode(), seconds)


def check_outcome(outcome: Outcome) -> None:
    """The promise every case keeps."""
    shown = f"{ascii(outcome.argv)[:600]} -> {outcome.code}\n{outcome.err[-2000:]}"
    assert outcome.code in (0, 1, 2), shown
    assert "Traceback" not in outcome.err, shown
    if outcome.code == 0:
        assert outcome.error_lines == [], shown
        return
    assert len(outcome.error_lines) == 1, shown
    assert outcome.err.rstrip("\n").splitlines()[-1].startswith("Error: "), shown  # the last word
    # The catch-all line of gptcli.cli.run means an exception nobody anticipated: a bug to fix.
    assert "GPTCLI_DEBUG" not in outcome.err, shown


def tally(name: str) -> None:
    TALLY[name] = TALLY.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def offline_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An empty Hugging Face cache and no network: `pull`, `models` and hub ids answer at once."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        yield
    assert not any(cache.iterdir()), "something was written into the Hugging Face cache"
    if TALLY:
        print("\ncases run:", ", ".join(f"{k} {v}" for k, v in sorted(TALLY.items())))


# -- what is generated ----------------------------------------------------------------------------------

# Hand-picked hard cases, mixed into the generated text.
NASTY = [
    "",
    " ",
    "\n",
    " \t\r\n\x0b\x0c",
    "\x00",
    "a\x00b",
    "\x1b[31mred\x1b[0m",
    "今天天气很好",
    "龙🐉",
    "👩‍👩‍👧‍👦🏳️‍🌈",  # ZWJ sequences
    "e\u0301\u0302\u0303" * 5,  # combining marks
    "שלום عربي \u202eevil\u202c",  # RTL text and a bidi override
    "\ufeffBOM",
    "\ufffd\ufffe\uffff",
    "\U0010ffff\U000e0001",
    "a\udcffb",  # argv bytes that were not UTF-8 (surrogateescape)
    "\udce4\udcbb",  # half of 今, as argv bytes
    "\ud800",  # a surrogate no byte stands for
    "<|endoftext|>",
    "[CLS][SEP][PAD]",
    "%s%n{0}$(x)`x`",
    "-",
    "--",
    "--help",
]

texts = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=200),
    st.text(st.characters(codec="utf-8"), max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.builds(lambda s, n: s * n, st.sampled_from(["a", "今", " ", "\n", "🐉", "ab "]), st.integers(1, 3000)),
)


def as_bytes(text: str) -> bytes:
    """The bytes a text stands for: escaped bytes as themselves, other lone surrogates as CESU-8."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


stdin_data = st.one_of(
    st.none(),  # a terminal: nothing piped
    st.sampled_from([b"", b" ", b"\n", b"\n\n\n", b"\t \r\n", b"\xff", b"ok \xff\xfe", b"\xe4\xbb", b"\x00"]),
    texts.map(as_bytes),
    st.binary(max_size=300),
)
INT_EDGES = [0, 1, -1, 2, 3, 24, 128, 2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]
FLOAT_EDGES = [0.0, -0.0, 5e-324, 1e-320, 1e-300, 1e-30, 1e-7, 0.5, 1.0, 1.5, 1e30, 1e308]
FLOAT_EDGES += [math.inf, -math.inf, math.nan, -1.0]
NOT_NUMBERS = ["", "many", "1e", "0x10", "1_000", "½", "١٢", "1,5", " 3 ", "nan", "-inf", "+1", "1e999"]


def ints(valid: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[str]:
    """An integer option's value as typed: edges, any integer, or text that is no integer."""
    parts = [st.sampled_from(INT_EDGES), st.integers(), st.sampled_from(NOT_NUMBERS)]
    if valid is not None:
        parts.insert(0, valid)
    return st.one_of(*parts).map(str)


def floats() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(FLOAT_EDGES).map(repr), st.floats().map(repr), st.sampled_from(NOT_NUMBERS)
    )


def option(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """[] (option left out) or [name, value]."""
    return st.one_of(st.just([]), values.map(lambda v: [name, v]))


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [name]])


def argument(text: st.SearchStrategy[str] = texts) -> st.SearchStrategy[list[str]]:
    """The TEXT/PROMPT argument: absent (stdin), '-', or generated text."""
    return st.one_of(st.just([]), st.just(["-"]), text.map(lambda t: ["--", t]))


def joined(*parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    """Options in a generated order; an argument after `--` stays last (it may look like an option)."""

    def build(chunks: list[list[str]]) -> list[str]:
        tail = [c for c in chunks if c[:1] == ["--"]]
        return [a for c in chunks if c[:1] != ["--"] for a in c] + [a for c in tail for a in c]

    return st.tuples(*parts).flatmap(lambda chunks: st.permutations(list(chunks))).map(build)


MODEL = st.sampled_from(["bpe", "bert", "short"])
DEVICES = st.one_of(st.sampled_from(["auto", "cpu", "CPU", " cpu ", "cuda", "cuda:1", "mps", "tpu"]), texts)
DTYPES = st.one_of(st.sampled_from(["auto", "float32", "bfloat16", "float16", "fp16", "int8"]), texts)

COMMANDS = {
    "tokenize": joined(argument(), flag("--ids"), flag("--count"), flag("--json")),
    "topk": joined(
        argument(),
        option("-k", ints(st.integers(1, 500))),
        option("--temperature", floats()),
        flag("--each-line"),
        option("--batch-size", ints(st.integers(1, 4))),
        flag("--json"),
        option("--device", DEVICES),
        option("--dtype", DTYPES),
    ),
    "score": joined(
        argument(),
        option("--stride", ints(st.integers(1, 130))),
        flag("--json"),
        option("--device", DEVICES),
    ),
    "complete": joined(
        argument(),
        option("-n", ints(st.integers(1, 40))),
        option("--temperature", floats()),
        option("--top-k", ints()),
        option("--top-p", floats()),
        option("--min-p", floats()),
        option("--repetition-penalty", floats()),
        flag("--greedy"),
        option("--seed", ints()),
        option("--stop", texts),
        flag("--ignore-eos"),
        # -N only up to 3: larger counts are valid requests for that much output (see the test of 10**12)
        option("-N", st.one_of(st.integers(-3, 3).map(str), st.sampled_from([str(-(2**63)), "many", ""]))),
        flag("--echo"),
        flag("--json"),
        option("--logprobs", ints(st.integers(0, 5))),
        flag("--each-line"),
        option("--batch-size", ints(st.integers(1, 4))),
        option("--dtype", DTYPES),
    ),
    "info": joined(flag("--json"), option("--device", DEVICES), option("--dtype", DTYPES)),
}


# -- the properties -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
@examples(ci=14, heavy=400)
@given(model=MODEL, data=st.data(), stdin=stdin_data)
def test_every_inference_command_survives_generated_input(models, command, model, data, stdin) -> None:
    args = data.draw(COMMANDS[command], label="args")
    outcome = invoke([command, "-m", str(models[model]), *args], stdin)
    tally(command)
    check_outcome(outcome)
    if outcome.code == 0:
        check_output(command, model, args, outcome)


def check_output(command: str, model: str, args: list[str], outcome: Outcome) -> None:
    """What a successful run printed holds together."""
    shown = f"{ascii(outcome.argv)[:600]}\n{outcome.out[:1000]}"
    json_lines = "--json" in args or "--each-line" in args or (command == "complete" and "--logprobs" in args)
    if command in ("topk", "score", "complete", "info") and json_lines and outcome.out:
        for line in outcome.out.splitlines():
            obj = json.loads(line)
            for token in obj.get("tokens", []):
                if "prob" in token:
                    assert 0.0 <= token["prob"] <= 1.0 and math.isfinite(token["logprob"]), shown
                if "logprob" in token:
                    assert token["logprob"] <= 0.0 or math.isclose(token["logprob"], 0.0, abs_tol=1e-5), shown
    if command == "tokenize" and "--json" in args and model == "bpe":
        # Byte-level BPE is lossless: the tokens' bytes are the text's UTF-8, whatever the text.
        obj = json.loads(outcome.out)
        assert b"".join(bytes.fromhex(t["bytes"]) for t in obj["tokens"]) == obj["text"].encode(), shown


@examples(ci=25, heavy=600)
@given(
    argv=st.lists(
        st.one_of(texts, st.sampled_from([*sorted(COMMANDS), "finetune", "pull", "models"])), max_size=6
    )
)
def test_arbitrary_argv(argv: list[str]) -> None:
    """Whatever the words: a parser error, a help text, or a refusal; never a crash."""
    outcome = invoke(argv, stdin=b"")
    tally("argv")
    check_outcome(outcome)


@examples(ci=15, heavy=300)
@given(command=st.sampled_from(["pull", "models", "info", "tokenize"]), name=texts, json_=flag("--json"))
def test_model_names_and_hub_commands(command: str, name: str, json_: list[str]) -> None:
    """Any -m or pull NAME: a clear refusal (no such folder, not a hub id, not cached and offline)."""
    argv = {"pull": ["pull", "--", name], "models": ["models", *json_]}.get(
        command, [command, "-m", name, "hi"]
    )
    outcome = invoke(argv, stdin=b"")
    tally(command + " (names)")
    check_outcome(outcome)


# -- finetune ---------------------------------------------------------------------------------------------

SMALL = st.integers(1, 2).map(str)
FINETUNE = joined(
    option("--steps", st.one_of(SMALL, st.sampled_from(["0", "-1", str(-(2**63)), "x", ""]))),
    # Only epochs that end soon: a huge (valid) count is that much training.
    option(
        "--epochs", st.one_of(st.floats(max_value=0.3).map(repr), st.sampled_from(["nan", "inf", "0", "x"]))
    ),
    option("--batch-size", ints(st.integers(1, 4))),
    option("--grad-accum", st.one_of(SMALL, st.sampled_from(["0", "-1", "x"]))),
    option("--block-size", ints(st.sampled_from([8, 16, 32]))),
    option("--lr", floats()),
    option("--min-lr", floats()),
    option("--warmup", ints()),
    option("--weight-decay", floats()),
    option("--clip", floats()),
    option("--dropout", floats()),
    option("--seed", ints()),
    option("--val-split", floats()),
    option("--eval-every", ints()),
    option("--eval-batches", ints(st.integers(1, 3))),
    option("--save-every", ints()),
    option("--log-every", ints()),
    option("--precision", st.one_of(st.sampled_from(["auto", "fp32", "bf16", "fp16", "int8"]), texts)),
    option("--text-field", texts),
    flag("--resume"),
    flag("--overwrite"),
)
SCRATCH = joined(
    st.just(["--from-scratch"]),
    option("--n-layer", ints(st.integers(1, 2))),
    option("--n-head", ints(st.integers(1, 4))),
    option("--n-embd", ints(st.sampled_from([8, 16]))),
    option("--context", ints(st.sampled_from([16, 32, 64]))),
)
DATA_KINDS = [
    "corpus",
    "jsonl",
    "stdin",
    "missing",
    "folder",
    "latin1",
    "empty",
    "blank",
    "bad-jsonl",
    "text",
]


@pytest.fixture(scope="module")
def finetune_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune-inputs")
    files = {
        "corpus": ("corpus.txt", tiny.TEXT.encode()),
        "jsonl": (
            "chats.jsonl",
            "".join(json.dumps({"text": line}) + "\n" for line in tiny.TEXT.splitlines()).encode(),
        ),
        "latin1": ("latin1.txt", b"caf\xe9 " * 200),
        "empty": ("empty.txt", b""),
        "blank": ("blank.txt", b" \n\t\n" * 50),
        "bad-jsonl": ("bad.jsonl", b'{"text": "ok"}\n{not json}\n'),
    }
    paths = {}
    for kind, (name, content) in files.items():
        paths[kind] = root / name
        paths[kind].write_bytes(content)
    (root / "folder").mkdir()
    paths["folder"] = root / "folder"
    return paths


@examples(ci=10, heavy=300)
@given(
    data=st.data(),
    kind=st.sampled_from(DATA_KINDS),
    scratch=st.booleans(),
    stdin=stdin_data,
    out_name=texts.filter(lambda t: t.strip() and "/" not in t and "\x00" not in t and t not in (".", "..")),
)
def test_finetune_survives_generated_options(
    models, finetune_inputs, tmp_path_factory, data, kind, scratch, stdin, out_name
) -> None:
    args = data.draw(FINETUNE, label="options")
    if scratch:
        args += data.draw(SCRATCH, label="from scratch")
    if kind == "stdin":
        source = "-"
        stdin = data.draw(st.one_of(st.just(tiny.TEXT.encode()), stdin_data), label="stdin")
    elif kind == "text":
        source = data.draw(texts, label="data path")
    else:
        source = str(finetune_inputs.get(kind, Path("/no/such/file.txt")))
    out = tmp_path_factory.mktemp("ft") / out_name[:60]
    argv = ["finetune", "-m", str(models["bpe"]), "-o", str(out), "--block-size", "16", "--device", "cpu"]
    outcome = invoke([*argv, *args, "--", source], stdin)
    tally("finetune")
    check_outcome(outcome)
    if outcome.code == 0:
        assert (out / "model.safetensors").is_file() and (out / "checkpoint.pt").is_file()


# -- long input -------------------------------------------------------------------------------------------


def ten_megabytes() -> bytes:
    """10 MiB of mixed text: English, Chinese, emoji, combining marks, long runs without spaces."""
    unit = (tiny.TEXT + "🐉👩‍👩‍👧 e\u0301 " + "a" * 5000 + "今" * 3000 + "\n").encode()
    data = unit * (10 * 2**20 // len(unit) + 1)
    return data[: 10 * 2**20].decode("utf-8", "ignore").encode()  # cut at a character boundary


HEAVY_ONLY = pytest.mark.skipif(not HEAVY, reason="about 10 s of tokenizing each: GPTCLI_HEAVY=1")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["tokenize", "--count"], marks=HEAVY_ONLY),
        pytest.param(["topk", "-k", "3"], marks=HEAVY_ONLY),
        pytest.param(["complete", "-n", "4", "--seed", "1"], marks=HEAVY_ONLY),
        pytest.param(["topk", "--each-line"], marks=HEAVY_ONLY),
        pytest.param(["score", "--json"], marks=HEAVY_ONLY),
    ],
)
def test_ten_megabytes_on_stdin(models, argv: list[str]) -> None:
    """A 10 MiB prompt is read, tokenized and cut to the context, in bounded time."""
    bound = 1800 if argv[0] == "score" else 120  # score really scores every token: minutes
    outcome = invoke([*argv, "-m", str(models["short"])], ten_megabytes(), bound=bound)
    tally("10 MiB stdin")
    check_outcome(outcome)
    assert outcome.code == 0
    print(f"\n10 MiB on stdin, {' '.join(argv)}: {outcome.seconds:.1f} s")
    if argv[0] == "topk" and "--each-line" not in argv:
        assert "more tokens than the context (24); kept the last ones" in outcome.err
        assert len(outcome.out.splitlines()) == 3


def test_one_megabyte_prompt_and_ten_megabytes_of_bad_bytes(models) -> None:
    """In CI: a 1 MiB prompt is cut to the context; 10 MiB with one byte that is not UTF-8 at its end
    is refused, with that byte's offset, by every command that reads stdin, before a model loads."""
    data = ten_megabytes()
    outcome = invoke(
        ["topk", "-k", "3", "-m", str(models["short"])], data[: 2**20].decode("utf-8", "ignore").encode()
    )
    check_outcome(outcome)
    assert outcome.code == 0 and "kept the last ones" in outcome.err and len(outcome.out.splitlines()) == 3
    for command in (["tokenize"], ["topk"], ["score"], ["complete"], ["topk", "--each-line"]):
        bad = invoke([*command, "-m", str(models["short"])], data + b"\xff")
        tally("10 MiB stdin")
        assert bad.code == 2 and bad.err == f"Error: stdin is not valid UTF-8 (byte offset {len(data)})\n"


# -- prompts longer than the context ----------------------------------------------------------------------


LONG_EXTRA = {
    "topk": st.sampled_from([[], ["-k", "400"], ["--each-line"]]),
    "score": st.sampled_from([[], ["--stride", "1"], ["--stride", "24"], ["--stride", "7"]]),
    "complete": st.sampled_from(
        [["-n", "1"], ["-n", "40", "--ignore-eos"], ["-n", "5", "--echo", "-N", "2"]]
    ),
}


@examples(ci=12, heavy=400)
@given(
    command=st.sampled_from(sorted(LONG_EXTRA)),
    unit=st.sampled_from(["a", "今天", "The weather is nice. ", "🐉", "\n", "e\u0301", "<|endoftext|>"]),
    repeat=st.integers(1, 120),
    data=st.data(),
)
def test_prompts_longer_than_the_context(models, command, unit, repeat, data) -> None:
    """The `short` model has 24 positions: prompts of 1 to ~700 tokens are cut (topk, complete) or
    scored in windows (score); no position past 23 ever reaches the model."""
    extra = data.draw(LONG_EXTRA[command], label="options")
    text = unit * repeat
    stdin = None
    if "--each-line" in extra:
        text, stdin = "-", "\n".join([unit * repeat, unit, unit * (repeat // 2)]).encode()
    outcome = invoke([command, "-m", str(models["short"]), "--json", *extra, "--", text], stdin)
    tally("longer than the context")
    check_outcome(outcome)
    assert outcome.code == 0, outcome.err
    for line in outcome.out.splitlines():
        obj = json.loads(line)
        if command == "complete":
            usage = obj["usage"]
            assert usage["prompt_tokens"] + usage["completion_tokens"] <= 24
        if command == "topk":
            assert len(obj["tokens"]) == (400 if "-k" in extra else 10)
        if command == "score":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(models["short"])
            assert obj["num_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))
            assert all(math.isfinite(t["logprob"]) for t in obj["tokens"])


# -- values that once reached the catch-all ---------------------------------------------------------------


@pytest.mark.parametrize("extreme", [["--temperature", "1e-300"], ["--repetition-penalty", "5e-324"]])
def test_extreme_sampling_values_do_not_reach_the_catch_all(models, extreme: list[str]) -> None:
    outcome = invoke(["complete", "-m", str(models["bpe"]), "hi", "-n", "5", "--seed", "1", *extreme])
    check_outcome(outcome)
    assert outcome.code == 0 and outcome.out.strip(), outcome.err


def test_topk_tiny_temperature_gives_finite_probabilities(models) -> None:
    outcome = invoke(["topk", "-m", str(models["bpe"]), "hi", "--temperature", "1e-320", "--json"])
    check_outcome(outcome)
    probs = [t["prob"] for t in json.loads(outcome.out)["tokens"]]
    assert all(math.isfinite(p) for p in probs) and probs[0] == 1.0
    # Every log-probability stays a number strict JSON can carry (no -Infinity), even far down the list
    # of a trained model, whose logits are far apart (the built-in one: 360 of its top 400 overflowed).
    outcome = invoke(["topk", "-m", "builtin", "hi", "--temperature", "1e-320", "--json", "-k", "400"])
    assert "Infinity" not in outcome.out and "NaN" not in outcome.out


def test_many_samples_start_streaming_at_once(models) -> None:
    from gptcli.generation.generate import stream
    from gptcli.generation.sampling import resolve_settings
    from gptcli.loading.models import load_model

    lm = load_model(str(models["bpe"]), device="cpu")
    settings = resolve_settings(lm.generation_config, num_samples=10**12, max_new_tokens=1, seed=0)
    # In a forked child, killed from here: a loop that only allocates must not take this process along.
    pid = os.fork()
    if pid == 0:
        try:
            next(iter(stream(lm, ["hi"], settings)))
        finally:
            os._exit(0)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("no completion within 3 s")
