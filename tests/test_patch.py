"""patch: every cell of the three grids equals patching done one run at a time with transformers' own
modules; all of block 1's input scores 1, nothing scores 0, the clean run into itself changes nothing;
ROME's noise; the formats and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptcli.inspection.patching import GRIDS, Patch, diffs, patch, prepare
from gptcli.inspection.tracing import encode

CLEAN, CORRUPT = "The weather is nice today", "The weather is bad today"


@pytest.fixture(scope="module")
def references(traced_folders: dict[str, Path]):
    return {name: AutoModelForCausalLM.from_pretrained(traced_folders[name]).eval() for name in ("bpe", "hf")}


def modules(model, grid: str, layer: int):
    """(module, whether its input (pre-hook) or output is the grid's point) in transformers' GPT-2."""
    block = model.transformer.h[layer]
    return {"resid_pre": (block, True), "attn_out": (block.attn, False), "mlp_out": (block.mlp, False)}[grid]


def run(model, ids: list[int], edits: list, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Last-position logits of one run, with edits (grid, layer, position, value) and the values seen."""
    seen: dict = {}
    hooks = []
    for grid in GRIDS:
        for layer in range(len(model.transformer.h)):
            module, before = modules(model, grid, layer)
            mine = [(p, v) for g, at, p, v in edits if (g, at) == (grid, layer)]

            def edit(x, key=(grid, layer), mine=mine):
                x = x.clone()
                for p, v in mine:
                    x[0, p] = v
                seen[key] = x[0].clone()
                return x

            if before:
                hooks.append(module.register_forward_pre_hook(lambda _m, a, edit=edit: (edit(a[0]), *a[1:])))
            else:
                hooks.append(
                    module.register_forward_hook(
                        lambda _m, _i, o, edit=edit: (edit(o[0]), *o[1:]) if isinstance(o, tuple) else edit(o)
                    )
                )
    if noise is not None:
        hooks.append(model.transformer.wte.register_forward_hook(lambda _m, _i, o: o + noise))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
    return logits, seen


@pytest.mark.parametrize("name", ["bpe", "hf"])
def test_every_cell_equals_patching_one_run_at_a_time(traced_lms, references, name: str) -> None:
    lm, ref = traced_lms[name], references[name]
    clean_ids, corrupt_ids = encode(lm, CLEAN).ids, encode(lm, CORRUPT).ids
    result = patch(lm, CLEAN, CORRUPT)
    clean_logits, clean = run(ref, clean_ids, [])
    corrupt_logits, _ = run(ref, corrupt_ids, [])
    target = int(clean_logits.argmax())
    foil = int(corrupt_logits.argmax())
    if foil == target:
        foil = int(clean_logits.topk(2).indices[1])
    assert (result.target["id"], result.foil["id"]) == (target, foil)

    def ld(logits: torch.Tensor) -> float:
        return float(logits[target] - logits[foil])

    assert abs(result.clean_diff - ld(clean_logits)) < 1e-4
    assert abs(result.corrupt_diff - ld(corrupt_logits)) < 1e-4
    denominator = ld(clean_logits) - ld(corrupt_logits)
    assert abs(denominator) > 0.05  # the fixture's two prompts do differ
    for grid in GRIDS:
        assert len(result.scores[grid]) == 2 and all(
            len(row) == len(clean_ids) for row in result.scores[grid]
        )
        for layer in range(2):
            for p in range(len(clean_ids)):
                logits, _ = run(ref, corrupt_ids, [(grid, layer, p, clean[(grid, layer)][p])])
                expected = (ld(logits) - ld(corrupt_logits)) / denominator
                score = result.scores[grid][layer][p]
                assert score is not None and abs(score - expected) < 1e-4, (grid, layer, p)


def head_patched(model, ids: list[int], clean_z: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Last-position logits with head `head` of block `layer` (its slice of c_proj's input, every
    position) taken from `clean_z` [positions, width]."""
    d = model.config.n_embd // model.config.n_head

    def swap(_m, args):
        x = args[0].clone()
        x[0, :, head * d : (head + 1) * d] = clean_z[:, head * d : (head + 1) * d]
        return (x,)

    handle = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(swap)
    try:
        with torch.no_grad():
            logits: torch.Tensor = model(torch.tensor([ids])).logits
            return logits[0, -1]
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["bpe", "hf"])
def test_every_head_equals_patching_its_output_with_transformers(traced_lms, references, name: str) -> None:
    lm, ref = traced_lms[name], references[name]
    clean_ids, corrupt_ids = encode(lm, CLEAN).ids, encode(lm, CORRUPT).ids
    result = patch(lm, CLEAN, CORRUPT, heads=True, grids=())
    target, foil = result.target["id"], result.foil["id"]
    clean_z: list[torch.Tensor] = []
    hooks = [
        b.attn.c_proj.register_forward_pre_hook(lambda _m, a: clean_z.append(a[0][0]))
        for b in ref.transformer.h
    ]
    try:
        with torch.no_grad():
            ref(torch.tensor([clean_ids]))
    finally:
        for hook in hooks:
            hook.remove()
    assert result.heads is not None and result.scores == {}
    for layer in range(2):
        for head in range(2):
            logits = head_patched(ref, corrupt_ids, clean_z[layer], layer, head)
            ld = float(logits[target] - logits[foil])
            expected = (ld - result.corrupt_diff) / (result.clean_diff - result.corrupt_diff)
            score = result.heads[layer][head]
            assert score is not None and abs(score - expected) < 1e-4, (layer, head)


@pytest.mark.parametrize("name", ["bpe", "hf"])
def test_all_of_the_first_input_scores_one_and_nothing_scores_zero(traced_lms, name: str) -> None:
    lm = traced_lms[name]
    clean_ids, corrupt_ids = encode(lm, CLEAN).ids, encode(lm, CORRUPT).ids
    setup = prepare(lm, clean_ids, corrupt_ids)
    n = len(clean_ids)
    everything = (Patch("hook_resid_pre", 0, tuple(range(n))),)
    all_heads = tuple(Patch("attn.hook_z", 0, None, h) for h in range(2))
    nothing, restored, heads = diffs(lm, setup, [(), everything, all_heads])
    corrupt = diffs(lm, setup, [()])[0]
    assert abs(restored - setup.clean_diff) < 1e-4  # score 1
    assert abs(nothing - corrupt) < 1e-5  # score 0
    assert heads != corrupt


def test_patching_the_clean_run_into_itself_changes_nothing(traced_lms) -> None:
    lm = traced_lms["bpe"]
    ids = encode(lm, CLEAN).ids
    setup = prepare(lm, ids, ids)
    cells: list[tuple[Patch, ...]] = [
        (Patch(point, layer, (p,)),)
        for point in GRIDS.values()
        for layer in range(2)
        for p in range(len(ids))
    ]
    cells += [(Patch("attn.hook_z", layer, None, h),) for layer in range(2) for h in range(2)]
    assert max(abs(d - setup.clean_diff) for d in diffs(lm, setup, cells)) < 1e-5
    result = patch(lm, CLEAN, CLEAN, heads=True)
    assert abs(result.clean_diff - result.corrupt_diff) < 1e-5
    assert all(v is None for rows in result.scores.values() for row in rows for v in row)  # no score


@pytest.mark.parametrize("name", ["bpe", "hf"])
def test_noise_on_the_subject(traced_lms, references, name: str) -> None:
    """ROME's corruption, rebuilt from its recipe: N(0, (3 std(wte))²) on the subject's token
    embeddings, seed 0, averaged over the samples."""
    lm, ref = traced_lms[name], references[name]
    prompt = "今天天气很好，我们去"
    tokens = encode(lm, prompt).tokens
    result = patch(lm, prompt, subject="天气", samples=3)
    assert result.subject == [i for i, t in enumerate(tokens) if "天气" in t["token"]] == [1]
    assert result.corrupt is None and result.samples == 3
    width = ref.config.n_embd
    draw = torch.randn(3, 1, width, generator=torch.Generator().manual_seed(0))
    noise = torch.zeros(3, len(tokens), width)
    noise[:, [1]] = 3 * float(ref.transformer.wte.weight.detach().std()) * draw
    ids = [t["id"] for t in tokens]
    target, foil = result.target["id"], result.foil["id"]
    lds = []
    for s in range(3):
        logits, _ = run(ref, ids, [], noise[s])
        lds.append(float(logits[target] - logits[foil]))
    assert abs(result.corrupt_diff - sum(lds) / 3) < 1e-4
    assert result.scores["resid_pre"][0][1] == pytest.approx(1, abs=1e-4)  # the clean subject restores all
    assert all(v is not None and abs(v) < 1e-5 for p, v in enumerate(result.scores["resid_pre"][0]) if p != 1)


def test_json_schema(traced_folders, cli) -> None:
    out = cli("patch", CLEAN, CORRUPT, "-m", traced_folders["bpe"], "--json", "--heads")
    assert out.code == 0, out.err
    obj = json.loads(out.out)
    assert set(obj) == {"clean", "corrupt", "target", "foil", "clean_diff", "corrupt_diff", "scores", "heads"}
    assert set(obj["target"]) == {"id", "token"} and set(obj["clean"]) == {"tokens"}
    n = len(obj["clean"]["tokens"])
    assert set(obj["scores"]) == {"resid_pre", "attn_out", "mlp_out"}
    assert all(len(rows) == 2 and all(len(r) == n for r in rows) for rows in obj["scores"].values())
    assert len(obj["heads"]) == 2 and len(obj["heads"][0]) == 2


def test_tsv_lines(traced_folders, cli) -> None:
    out = cli("patch", CLEAN, CORRUPT, "-m", traced_folders["bpe"], "--target", ",", "--foil-id", "66")
    assert out.code == 0, out.err
    lines = [line.split("\t") for line in out.out.splitlines()]
    assert [line[0] for line in lines[:2]] == ["clean_diff", "corrupt_diff"]
    assert all(len(line) == 5 for line in lines)
    grids = [line for line in lines[2:]]
    assert {line[0] for line in grids} == {"resid_pre", "attn_out", "mlp_out"}
    assert len(grids) == 3 * 2 * 11


@pytest.mark.parametrize("colours", ["256", "16", "none"])
def test_terminal_view(traced_folders, cli, monkeypatch: pytest.MonkeyPatch, colours: str) -> None:
    monkeypatch.setattr("gptcli.cli.patch.is_tty", lambda *a: True)
    if colours == "none":
        monkeypatch.setenv("NO_COLOR", "1")
    else:
        monkeypatch.setenv("FORCE_COLOR", "1")
        monkeypatch.setenv("TERM", "xterm" if colours == "16" else "xterm-256color")
    out = cli("patch", CLEAN, CORRUPT, "-m", traced_folders["bpe"], "--heads")
    assert out.code == 0, out.err
    assert "logit difference" in out.out and "the input of block L" in out.out
    assert "MLP output" in out.out and "each head" in out.out
    if colours == "none":
        assert "\x1b[" not in out.out and any(shade in out.out for shade in "░▒▓█")


def test_pictures_are_written(traced_folders, cli, tmp_path: Path) -> None:
    for suffix in (".png", ".svg", ".html"):
        path = tmp_path / f"patch{suffix}"
        out = cli("patch", CLEAN, CORRUPT, "-m", traced_folders["bpe"], "--save", path, "--json")
        assert out.code == 0, out.err
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") if suffix == ".png" else b"block" in data


@pytest.mark.parametrize(
    "args,message",
    [
        ([CLEAN, "The weather is bad todays"], "the clean prompt is 11 tokens and the corrupted one 12"),
        ([CLEAN], "give a CORRUPT prompt, or --noise"),
        ([CLEAN, CORRUPT, "--noise", "--subject", "x"], "give no CORRUPT prompt"),
        ([CLEAN, "--noise"], "--noise needs --subject"),
        ([CLEAN, "--noise", "--subject", "rain"], "--subject 'rain' is not in the prompt"),
        ([CLEAN, "--noise", "--subject", "nice", "--samples", "0"], "--samples must be at least 1"),
        ([CLEAN, CORRUPT, "--subject", "nice"], "--subject goes with --noise"),
        ([CLEAN, CORRUPT, "--target", "a", "--target-id", "1"], "--target or --target-id"),
        ([CLEAN, CORRUPT, "--foil", "nice day"], "give one token"),
    ],
)
def test_bad_input_is_one_error_line(traced_folders, cli, args: list[str], message: str) -> None:
    out = cli("patch", *args, "-m", traced_folders["bpe"])
    assert out.code == 2, out.err
    assert out.err.startswith("Error: ") and message in out.err and len(out.err.strip().splitlines()) == 1
