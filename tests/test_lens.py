"""lens: every row equals transformers' own numbers, the formats hold, and the pictures are real files."""

from __future__ import annotations

import json
import math
import warnings
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from transformers import AutoModelForCausalLM

import gptcli.inspection.lens
from gptcli.errors import UsageError
from gptcli.inspection.lens import lens_grid, logit_lens, parse_positions
from gptcli.inspection.tracing import encode, run
from gptcli.loading.models import load_model

import tiny

PROMPTS = tiny.TRACED_PROMPTS


@pytest.fixture(scope="module")
def folders(traced_folders: dict[str, Path]) -> dict[str, Path]:
    return traced_folders


@pytest.fixture(scope="module")
def lms(traced_lms):
    return traced_lms


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]):
    """transformers' models of the same folders, loaded independently of gptcli."""
    return {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in folders.items()}


def raw_stream(model, ids: list[int]) -> dict[str, list[torch.Tensor]]:
    """The residual stream from forward hooks on transformers' own blocks: each block's input, its
    attention's output, and its raw output (before ln_f)."""
    blocks = model.transformer.h
    got: dict[str, list[torch.Tensor]] = {"input": [], "attn": [], "output": []}
    hooks = []
    for block in blocks:
        hooks.append(block.register_forward_pre_hook(lambda _m, args: got["input"].append(args[0][0])))
        hooks.append(block.attn.register_forward_hook(lambda _m, _i, out: got["attn"].append(out[0][0])))
        hooks.append(block.register_forward_hook(lambda _m, _i, out: got["output"].append(out[0])))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return got


def decode(model, x: torch.Tensor) -> torch.Tensor:
    """log-softmax(lm_head(ln_f(x))), float32, computed with transformers' modules."""
    with torch.no_grad():
        return torch.log_softmax(model.lm_head(model.transformer.ln_f(x)).float(), dim=-1)


def assert_row(row, logprobs: torch.Tensor, positions: list[int]) -> None:
    """A lens row's top-k equals the reference's: same ids, probabilities within 1e-5."""
    k = len(row.top[0])
    top = torch.topk(logprobs[positions], k, dim=-1)
    for i in range(len(positions)):
        assert [t["id"] for t in row.top[i]] == top.indices[i].tolist()
        for t, lp in zip(row.top[i], top.values[i].tolist(), strict=True):
            assert abs(t["prob"] - math.exp(lp)) < 1e-5 and abs(t["logprob"] - lp) < 1e-4


@pytest.mark.parametrize("name", ["bpe", "bert", "hf"])
def test_every_row_is_the_output_layer_on_the_raw_block_output(lms, references, name: str) -> None:
    lm, ref = lms[name], references[name]
    result = logit_lens(lm, PROMPTS[name], k=5, sublayer=True)
    ids = result.prompt.ids
    stream = raw_stream(ref, ids)
    everywhere = list(range(len(ids)))
    assert result.positions == everywhere
    layers = len(ref.transformer.h)
    assert [(r.layer, r.point) for r in result.rows] == [(0, "embeddings")] + [
        (n, point) for n in range(1, layers + 1) for point in ("attention", "block")
    ]
    embeddings = result.rows[0]
    assert_row(embeddings, decode(ref, stream["input"][0]), everywhere)
    for n in range(1, layers + 1):
        attention, block = result.rows[2 * n - 1], result.rows[2 * n]
        # --sublayer: the point after attention is the block's input plus its attention's output
        assert_row(attention, decode(ref, stream["input"][n - 1] + stream["attn"][n - 1]), everywhere)
        assert_row(block, decode(ref, stream["output"][n - 1]), everywhere)
    # The last row is the model's own next-token distribution at every position.
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].float()
    assert_row(result.rows[-1], torch.log_softmax(logits, dim=-1), everywhere)


@pytest.mark.parametrize("name", ["bpe", "hf"])
def test_the_stream_points_add_up(lms, references, name: str) -> None:
    """residual + attention output = the mid point, and the mid point + MLP output = the block output."""
    lm, ref = lms[name], references[name]
    ids = encode(lm, PROMPTS[name]).ids
    points: dict[tuple[int, str], torch.Tensor] = {}
    run(lm, ids, lambda layer, point, x: points.__setitem__((layer, point), x[0].clone()))
    stream = raw_stream(ref, ids)
    for n, block in enumerate(ref.transformer.h, 1):
        residual = points[(n - 1, "block")] if n > 1 else points[(0, "embeddings")]
        assert torch.allclose(residual, stream["input"][n - 1], atol=1e-5)
        assert torch.allclose(residual + stream["attn"][n - 1], points[(n, "attention")], atol=1e-5)
        with torch.no_grad():
            mlp = block.mlp(block.ln_2(points[(n, "attention")]))
        assert torch.allclose(points[(n, "attention")] + mlp, points[(n, "block")], atol=1e-5)


def test_output_hidden_states_last_slot_would_be_normalised_twice(lms, references) -> None:
    """The trap the lens avoids: hidden_states[-1] is ln_f's output already; ln_f on it again differs."""
    lm, ref = lms["bpe"], references["bpe"]
    result = logit_lens(lm, PROMPTS["bpe"], k=1)
    with torch.no_grad():
        hidden = ref(torch.tensor([result.prompt.ids]), output_hidden_states=True).hidden_states
    twice = decode(ref, hidden[-1])[:, :].exp()
    ours = torch.tensor([cell[0]["prob"] for cell in result.rows[-1].top])
    assert (twice.max(dim=-1).values - ours).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["bpe", "bert"])
def test_last_row_equals_topk(lms, folders, cli, name: str) -> None:
    prompt = PROMPTS[name]
    topk = json.loads(cli("topk", prompt, "-m", folders[name], "-k", "5", "--json").out)
    out = cli("lens", prompt, "-m", folders[name], "--json", "--positions", "-1")
    assert out.code == 0, out.err
    last = json.loads(out.out)["layers"][-1]["positions"][0]["top"]
    assert [t["id"] for t in last] == [t["id"] for t in topk["tokens"]]
    for ours, theirs in zip(last, topk["tokens"], strict=True):
        assert abs(ours["prob"] - theirs["prob"]) < 1e-5
        assert ours["token"] == theirs["token"] and ours["bytes"] == theirs["bytes"]


def test_decoding_in_chunks_gives_the_same_numbers(lms, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = lms["bpe"]
    whole = logit_lens(lm, PROMPTS["bpe"], k=3)
    monkeypatch.setattr(gptcli.inspection.lens, "CHUNK", 2)
    chunked = logit_lens(lm, PROMPTS["bpe"], k=3)
    for a, b in zip(whole.rows, chunked.rows, strict=True):
        for x, y in zip(a.top, b.top, strict=True):
            assert [t["id"] for t in x] == [t["id"] for t in y]
            assert max(abs(s["prob"] - t["prob"]) for s, t in zip(x, y, strict=True)) < 1e-6


def test_target_token_rank_and_probability(lms, references) -> None:
    lm, ref = lms["bpe"], references["bpe"]
    result = logit_lens(lm, PROMPTS["bpe"], k=2, token=" the")
    target = lm.tokenizer.encode(" the")[0]
    assert result.target is not None and result.target["id"] == target and result.target_pieces == 1
    stream = raw_stream(ref, result.prompt.ids)
    vectors = [stream["input"][0], *stream["output"]]
    for row, x in zip(result.rows, vectors, strict=True):
        logprobs = decode(ref, x)
        assert row.target is not None
        for position, cell in enumerate(row.target):
            lp = logprobs[position, target]
            assert cell["id"] == target and abs(cell["logprob"] - float(lp)) < 1e-4
            assert cell["rank"] == int((logprobs[position] > lp).sum()) + 1
    several = logit_lens(lm, PROMPTS["bpe"], k=1, token="龙龙龙")
    assert (
        several.target_pieces > 1
        and several.target is not None
        and several.target["id"] == lm.tokenizer.encode("龙龙龙")[0]
    )


def test_json_schema(folders, cli) -> None:
    out = cli(
        "lens", PROMPTS["bpe"], "-m", folders["bpe"], "--json", "-k", "3", "--sublayer", "--token", " the"
    )
    assert out.code == 0, out.err
    obj = json.loads(out.out)
    assert set(obj) == {"model", "prompt", "tokens", "layers"}
    assert obj["prompt"] == PROMPTS["bpe"] and obj["model"] == str(folders["bpe"])
    assert all(set(t) == {"id", "token", "bytes"} for t in obj["tokens"])
    assert [(e["layer"], e.get("point")) for e in obj["layers"]] == [
        (0, None), (1, "attention"), (1, None), (2, "attention"), (2, None)
    ]  # fmt: skip
    for entry in obj["layers"]:
        assert set(entry) == ({"layer", "point", "positions"} if "point" in entry else {"layer", "positions"})
        assert [p["position"] for p in entry["positions"]] == list(range(len(obj["tokens"])))
        for cell in entry["positions"]:
            assert set(cell) == {"position", "top", "target"}
            assert len(cell["top"]) == 3
            assert all(set(t) == {"id", "token", "bytes", "prob", "logprob"} for t in cell["top"])
            assert set(cell["target"]) == {"id", "token", "rank", "prob", "logprob"}
    default = json.loads(cli("lens", "hi", "-m", folders["bpe"], "--json").out)
    assert all(len(c["top"]) == 5 and "target" not in c for e in default["layers"] for c in e["positions"])


def test_tsv_lines(folders, cli) -> None:
    out = cli("lens", PROMPTS["bpe"], "-m", folders["bpe"], "-k", "2", "--sublayer", "--positions", "0,-1")
    assert out.code == 0, out.err
    lines = [line.split("\t") for line in out.out.splitlines()]
    assert all(len(line) == 7 for line in lines)
    last = len(encode(load_model(str(folders["bpe"]), device="cpu"), PROMPTS["bpe"]).ids) - 1
    assert {(line[0], line[1]) for line in lines} == {
        (layer, str(p)) for layer in ("0", "1.attn", "1", "2.attn", "2") for p in (0, last)
    }
    assert [line[2] for line in lines[:2]] == ["1", "2"]
    assert float(lines[0][5]) >= float(lines[1][5]) and math.isclose(
        math.log(float(lines[0][5])), float(lines[0][6]), abs_tol=1e-4
    )
    target = cli("lens", PROMPTS["bpe"], "-m", folders["bpe"], "--token", " the", "--at", "-1")
    rows = [line.split("\t") for line in target.out.splitlines()]
    assert [r[0] for r in rows] == ["0", "1", "2"] and {r[4] for r in rows} == {" the"}


def test_the_mark_is_the_prompts_actual_next_token(lms) -> None:
    lm = lms["bpe"]
    # A prompt whose greedy next token survives decoding and encoding again as itself.
    for start in ("今天天气", "The weather is", "我们", "He takes the subway to", "Hello"):
        ids = encode(lm, start).ids
        with torch.no_grad():
            greedy = int(lm.logits(torch.tensor([ids]))[0, -1].argmax())
        prompt = lm.tokenizer.decode([*ids, greedy])
        result = logit_lens(lm, prompt, k=1)
        if result.prompt.ids[: len(ids) + 1] == [*ids, greedy]:
            break
    else:
        pytest.fail("no prompt whose greedy continuation tokenizes back as itself")
    grid = lens_grid(result)
    assert grid.marks is not None
    assert grid.marks[-1][len(ids) - 1]  # the last block predicted exactly the token that follows
    assert not grid.marks[-1][-1]  # nothing follows the last position
    assert grid.columns == [t["token"] for t in result.prompt.tokens]


def test_bert_prompts_start_with_cls(lms, folders, cli) -> None:
    obj = json.loads(cli("lens", "今天", "-m", folders["bert"], "--json").out)
    assert [t["token"] for t in obj["tokens"]] == ["[CLS]", "今", "天"]
    grid = lens_grid(logit_lens(lms["bert"], "今天", k=1))
    assert grid.columns[0] == "[CLS]"


def test_input_rules(folders, models, cli, tmp_path: Path) -> None:
    bpe = folders["bpe"]
    empty = json.loads(cli("lens", "", "-m", bpe, "--json").out)
    assert [t["token"] for t in empty["tokens"]] == ["<|endoftext|>"]
    piped = json.loads(cli("lens", "-m", bpe, "--json", stdin="今天天气\n").out)
    assert piped["prompt"] == "今天天气"
    file = tmp_path / "prompt.txt"
    file.write_text("今天天气", encoding="utf-8")
    assert json.loads(cli("lens", "-f", file, "-m", bpe, "--json").out)["tokens"] == piped["tokens"]
    long = cli("lens", "今天天气很好" * 40, "-m", models["short"], "--json")
    assert long.code == 0 and "more tokens than the context (24); kept the last ones" in long.err
    assert len(json.loads(long.out)["tokens"]) == 24


def test_terminal_grid_shows_the_last_positions_that_fit(
    folders, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gptcli.cli.lens.is_tty", lambda *a: True)
    monkeypatch.setenv("COLUMNS", "60")
    out = cli("lens", "The weather is nice today, so we are going", "-m", folders["bpe"])
    assert out.code == 0, out.err
    assert "showing the last" in out.err and "--positions" in out.err
    lines = out.out.splitlines()
    assert lines[1].split() == ["layer", "we", "a", "re", "go", "ing"]  # the last 5 tokens head the columns
    assert [line.split()[0] for line in lines[2:5]] == ["embeddings", "1", "2"]
    assert max(len(line) for line in lines[:-1]) <= 60
    table = cli("lens", "The weather is", "-m", folders["bpe"], "--at", "-1", "-k", "3", "--token", " we")
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[1].split() == ["layer", "#1", "#2", "#3", "'", "we'"]
    assert [line.split()[0] for line in lines[2:]] == ["embeddings", "1", "2"]
    assert all("rank" in line for line in lines[2:])
    grid = cli("lens", "The weather is", "-m", folders["bpe"], "--token", " we", "--positions", "0:2")
    assert grid.code == 0 and grid.out.splitlines()[1].split() == ["layer", "The", "we"]


def test_parse_positions() -> None:
    assert parse_positions("all", 5) == [0, 1, 2, 3, 4]
    assert parse_positions("0,-1", 5) == [0, 4]
    assert parse_positions("-2:", 5) == [3, 4]
    assert parse_positions("1:3,3", 5) == [1, 2, 3]
    for bad, message in (("7", "out of range"), ("1 2", "commas"), ("x", "expected"), ("4:2", "names no")):
        with pytest.raises(UsageError, match=message):
            parse_positions(bad, 5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], "-k must be at least 1"),
        (["--positions", "a:b"], "--positions 'a:b'"),
        (["--at", "0", "--positions", "1"], "do not pass --positions too"),
        (["--save", "out.jpg"], "must end in .png, .svg, .html"),
        (["--save", "no-such-folder/x.png"], "--save no-such-folder/x.png: no-such-folder does not exist"),
        (["--dpi", "5"], "--dpi must be between 20 and 600 (got 5)"),
    ],
)
def test_bad_options_fail_before_loading(cli, args: list[str], message: str) -> None:
    out = cli("lens", "hi", "-m", "./no-such-model", *args)
    assert out.code == 2 and message in out.err, out.err


def test_position_out_of_range(folders, cli) -> None:
    out = cli("lens", "hi", "-m", folders["bpe"], "--at", "9")
    assert out.code == 2 and "--at 9 is out of range: the prompt has 2 tokens (0 to 1)" in out.err


# -- pictures ------------------------------------------------------------------------------------------


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        self.tags.append(tag)
        assert not any(name in ("src", "href") for name, _ in attrs), attrs

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_a_picture_does_not_change_what_is_printed(lms, folders, cli, tmp_path: Path) -> None:
    long = "The weather is nice today, so we are going for a walk in the park. " * 4
    count = len(encode(lms["bpe"], long).ids)
    assert count > 64
    plain = cli("lens", long, "-m", folders["bpe"], "-k", "1")
    saved = cli("lens", long, "-m", folders["bpe"], "-k", "1", "--save", tmp_path / "x.html")
    assert saved.out == plain.out and len(plain.out.splitlines()) == 3 * count  # every position
    assert "the picture shows the last 64 positions" in saved.err
    assert (tmp_path / "x.html").read_text(encoding="utf-8").count("<th>") == 65  # + the corner


def test_pictures_are_written(folders, cli, tmp_path: Path) -> None:
    from PIL import Image

    prompt = "今天天气 <b>&"
    for suffix in ("png", "svg", "html"):
        path = tmp_path / f"lens.{suffix}"
        out = cli("lens", prompt, "-m", folders["bert"], "--save", path, "--json")
        assert out.code == 0, out.err
        assert f"wrote {path}" in out.err and json.loads(out.out)["tokens"]  # the JSON is still printed
    with Image.open(tmp_path / "lens.png") as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        assert "今天天气" in image.text["Title"]  # PNG metadata: the prompt
        image.load()  # decodes every pixel: a truncated or corrupt file fails here
    svg = ElementTree.parse(tmp_path / "lens.svg").getroot()
    texts = "".join(svg.itertext())
    for label in ("[CLS]", "今", "天", "气", "embeddings"):
        assert label in texts
    page = (tmp_path / "lens.html").read_text(encoding="utf-8")
    parser = _Text()
    parser.feed(page)
    text = "".join(parser.text)
    assert "[CLS]" in text and "今" in text and "<b>" in text  # escaped, shown as text
    assert "script" not in parser.tags and "http" not in page
    assert "1. " in text  # the hover details: the top-k of a cell


def test_png_without_a_cjk_font_uses_byte_notation() -> None:
    from gptcli.inspection.pictures import drawable

    assert drawable("今天 ok") == "<e4 bb 8a e5 a4 a9> ok"
    assert drawable("<e4 bb>") == "<e4 bb>"


def test_labels_show_spaces_alone_as_such() -> None:
    from gptcli.inspection.pictures import visible

    assert visible("  ") == "␣␣" and visible(" the") == " the" and visible("") == ""


def _render(label: str):
    import numpy as np

    from gptcli.inspection.pictures import Grid, figure

    grid = Grid("", ["r"], [label], [[0.5]], [[label]], [[""]])
    fig = figure([grid], title=label)
    fig.canvas.draw()
    # Agg draws it (gptcli.inspection.pictures picks Agg); matplotlib types the canvas as the base class
    return np.asarray(fig.canvas.buffer_rgba()).copy()  # type: ignore[attr-defined]


def test_cjk_labels_are_drawn_as_characters() -> None:
    from gptcli.inspection.pictures import cjk_font

    if cjk_font() is None:
        pytest.skip("no CJK font installed (e.g. Debian's fonts-noto-cjk)")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*[Gg]lyph.*missing")  # matplotlib's missing-glyph warning
        jin, tian = _render("今"), _render("天")
    # A missing glyph is the same box for every character; two real glyphs differ.
    assert (jin != tian).any()


def _grid(columns: int, rows: int, title: str = "logit lens"):
    from gptcli.inspection.pictures import Grid

    pieces = ["今", "天", "<e5 8e>", " the", "去去去去去去去去"]
    texts = [[pieces[(i + j) % len(pieces)] + " 99%" for j in range(columns)] for i in range(rows)]
    return Grid(
        title=title,
        rows=[f"block {i}" for i in range(rows)],
        columns=[pieces[j % len(pieces)] for j in range(columns)],
        values=[[0.5] * columns for _ in range(rows)],
        texts=texts,
        details=[[""] * columns for _ in range(rows)],
        row_title="层",
    )


def _png_size(path: Path) -> tuple[int, int]:
    import struct

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_a_picture_without_a_cjk_font_shows_bytes_everywhere_and_nothing_spills() -> None:
    """No CJK font (fallback): every text, titles too, in byte notation; long titles wrap inside the
    picture; a cell's text stays in its cell (the first column's never runs over the row labels)."""
    from matplotlib.text import Text

    from gptcli.inspection.pictures import drawable, figure

    grid = _grid(6, 3, title="after position 3 ('去'): " + "去" * 30)
    fig = figure([grid], title="model: '" + "去天" * 30 + "'", fallback=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. constrained layout giving up: titles took all the room
        fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    texts = [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
    lines = [line for t in texts for line in t.get_text().split("\n")]
    assert all(drawable(line) == line for line in lines), lines
    width = fig.bbox.x1
    # get_suptitle() gives only the text; the Text artist, whose extent we need, has no public getter
    for title in (fig._suptitle, fig.axes[0].title):  # type: ignore[attr-defined]
        box = title.get_window_extent(renderer)
        assert box.x0 >= -1 and box.x1 <= width + 1, (title.get_text(), box)
    ax = fig.axes[0]
    axes_box = ax.get_window_extent(renderer)
    for cell in ax.texts:
        assert cell.get_window_extent(renderer).x0 >= axes_box.x0 - 1, cell.get_text()


def test_a_large_picture_stays_within_4096_pixels_and_dpi_sets_the_resolution(tmp_path: Path) -> None:
    from gptcli.inspection.pictures import save

    big = tmp_path / "big.png"
    notes = save([_grid(64, 13), _grid(64, 13)], big, title="t", dpi=110)
    assert max(_png_size(big)) <= 4096
    assert any("drawn at" in n and "4096 px a side" in n for n in notes), notes
    small = tmp_path / "small.png"
    notes = save([_grid(8, 3)], small, title="t", dpi=40)
    width, _ = _png_size(small)
    assert not any("drawn at" in n for n in notes)
    assert abs(width - 40 * (2.0 + 8 * 0.75)) <= 2  # 8 cells of 0.75 inch and the labels' 2 inches
