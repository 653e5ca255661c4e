"""gptcli's own GPT-2 forward pass: the same logits as transformers' model, in every way gptcli calls it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gptcli.batching import left_pad
from gptcli.errors import GptcliError
from gptcli.gpt2 import CachedDecoder, TiedOutput, read_safetensors
from gptcli.loading.models import load_model

import tiny

PROMPTS = ["今天天气很好", "The weather is nice today, so we", "", "龙"]


@pytest.fixture(scope="module")
def lms(models: dict[str, Path]):
    return {name: load_model(str(path), device="cpu") for name, path in models.items()}


@pytest.fixture(scope="module")
def references(models: dict[str, Path]):
    """transformers' models of the same folders, loaded independently of gptcli."""
    return {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in models.items()}


def batch(lm, prompts: list[str]):
    rows = [lm.tokenizer.encode(p) or [lm.tokenizer.eos_token_id or 0] for p in prompts]
    return left_pad(rows, 0, torch.device("cpu"))


def test_plain_gpt2_checkpoints_run_on_gptcli_forward(lms) -> None:
    assert all(lm.net is not None for lm in lms.values())
    assert lms["bpe"]._model is None  # transformers' model is not loaded


@pytest.mark.parametrize("fixture", ["bpe", "bert"])
def test_logits_equal_transformers_unpadded_and_padded(lms, references, fixture: str) -> None:
    lm, ref = lms[fixture], references[fixture]
    ids, mask, positions = batch(lm, PROMPTS)
    assert not bool(mask.all())  # the batch really is padded
    with torch.inference_mode():
        ours = lm.logits(ids, attention_mask=mask, position_ids=positions)
        theirs = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        assert torch.allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
        # The fidelity rule: probabilities within 1e-5 (faster kernels may round differently).
        p, q = torch.softmax(ours[real].float(), -1), torch.softmax(theirs[real].float(), -1)
        assert torch.allclose(p, q, atol=1e-5, rtol=0)
        single = lm.tokenizer.encode(PROMPTS[1])
        one = torch.tensor([single])
        assert torch.allclose(lm.logits(one), ref(one).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_kept_positions_equal_transformers(lms, references, keep: int, padded: bool) -> None:
    """Only the kept positions go through the last block past its keys and values: with or without
    padding, a cache before them, one position or several, their logits are transformers'."""
    lm, ref = lms["bpe"], references["bpe"]
    ids, mask, positions = batch(lm, PROMPTS if padded else [PROMPTS[1]] * 2)
    mask = mask.bool()
    split = ids.shape[1] // 2
    with torch.inference_mode():
        theirs = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -keep:]
        whole = lm.net.forward(ids, positions, mask=mask if padded else None, logits_to_keep=keep)
        decoder = CachedDecoder(lm.net, ids.shape[0], ids.shape[1])
        decoder.prefill(ids[:, :split], mask[:, :split] if padded else None, positions[:, :split])
        cached = lm.net.forward(
            ids[:, split:],
            positions[:, split:],
            mask=mask[:, split:] if padded else None,
            cache=decoder.cache,
            logits_to_keep=keep,
        )
    assert decoder.cache.length == ids.shape[1]
    real = mask[:, -keep:]  # padding positions compute nothing anyone reads
    for ours in (whole, cached):
        assert ours.shape == theirs.shape
        p, q = torch.softmax(ours[real], -1), torch.softmax(theirs[real], -1)
        assert torch.allclose(p, q, atol=1e-5, rtol=0)


def test_cached_decoding_equals_a_full_forward_pass(lms) -> None:
    lm = lms["bpe"]
    ids, mask, positions = batch(lm, PROMPTS)
    follow = torch.tensor([[5, 7, 9], [11, 13, 15], [17, 19, 21], [23, 25, 27]])
    with torch.inference_mode():
        decoder = CachedDecoder(lm.net, len(PROMPTS), ids.shape[1] + 3)
        steps = [decoder.prefill(ids, mask, positions)]
        next_pos = mask.sum(dim=1)
        for column in range(3):
            steps.append(decoder.step(follow[:, column : column + 1], (next_pos + column)[:, None]))
        full_ids = torch.cat([ids, follow], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(follow)], dim=1)
        full_pos = torch.cat([positions, next_pos[:, None] + torch.arange(3)], dim=1)
        full = lm.logits(full_ids, attention_mask=full_mask, position_ids=full_pos).float()
    for k, logits in enumerate(steps):
        assert torch.allclose(logits, full[:, ids.shape[1] - 1 + k], atol=1e-5, rtol=0), k


def test_dropping_rows_keeps_the_others_logits(lms) -> None:
    lm = lms["bpe"]
    ids, mask, positions = batch(lm, PROMPTS)
    next_ids = torch.tensor([[3], [4], [5], [6]])
    next_pos = mask.sum(dim=1, keepdim=True)
    with torch.inference_mode():
        whole = CachedDecoder(lm.net, 4, ids.shape[1] + 1)
        whole.prefill(ids, mask, positions)
        expected = whole.step(next_ids, next_pos)
        kept = CachedDecoder(lm.net, 4, ids.shape[1] + 1)
        kept.prefill(ids, mask, positions)
        keep = torch.tensor([1, 3])
        kept.keep(keep)
        got = kept.step(next_ids[keep], next_pos[keep])
    assert torch.allclose(got, expected[keep], atol=1e-5, rtol=0)  # a smaller batch rounds differently


def test_safetensors_reader_equals_the_library(models: dict[str, Path]) -> None:
    file = models["bpe"] / "model.safetensors"
    ours = read_safetensors(file)
    reference = load_file(file)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_fp32_weights_move_to_huge_pages_with_the_same_values(models: dict[str, Path]) -> None:
    """The weights every step reads are copied once into memory advised for huge pages (the file's
    pages are given back), the same numbers."""
    lm = load_model(str(models["bpe"]), device="cpu")
    assert lm.net is not None
    pages = lm.net._pages
    if pages.buffer is None:
        pytest.skip("no MADV_HUGEPAGE here")
    base = torch.frombuffer(pages.buffer, dtype=torch.uint8, count=1).data_ptr()
    reference = load_file(models["bpe"] / "model.safetensors")
    for name, weight in (
        ("transformer.h.0.mlp.c_fc.weight", lm.net.blocks[0].c_fc.weight),
        ("transformer.h.1.attn.c_attn.weight", lm.net.blocks[1].c_attn.weight),
        ("transformer.wte.weight", lm.net.lm_head.weight.t()),
    ):
        assert base <= weight.data_ptr() < base + len(pages.buffer), name
        assert torch.equal(weight, reference[name]), name
    assert pages.used <= len(pages.buffer)
    bf16 = load_model(str(models["bpe"]), device="cpu", dtype="bfloat16")
    assert bf16.net is not None
    assert bf16.net.blocks[0].c_fc.weight_dtype == torch.bfloat16 and bf16.net._pages.buffer is None


def test_output_layer_copy_gives_back_the_table_a_slice_at_a_time() -> None:
    """The transposed copy of the embeddings is made a slice of rows at a time, each slice's file pages
    given back once copied, so the table is never resident twice; the copy is exact."""
    table = torch.randn(2 * TiedOutput._SLICE + 5, 16)
    released: list[tuple[int, int]] = []
    head = TiedOutput(table, release=lambda rows: released.append((rows.data_ptr(), len(rows))))
    assert torch.equal(head.weight, table.t())
    row_bytes = table.stride(0) * table.element_size()
    starts = [(ptr - table.data_ptr()) // row_bytes for ptr, _ in released]
    assert starts == [0, TiedOutput._SLICE, 2 * TiedOutput._SLICE]
    assert sum(count for _, count in released) == len(table)
    x = torch.randn(3, 16)
    assert torch.allclose(head(x), x @ table.t(), atol=1e-5)


def test_mapped_weights_are_never_written_back(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(models["bpe"], folder)
    before = (folder / "model.safetensors").read_bytes()
    tensors = read_safetensors(folder / "model.safetensors")
    next(iter(tensors.values())).fill_(123.0)  # a private mapping: the process's copy changes, not the file
    del tensors
    assert (folder / "model.safetensors").read_bytes() == before


def _resident_bytes(address: int) -> int:
    """Bytes in memory of the mapping that holds `address` (/proc/self/smaps Rss)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)  # a mapping's first line
        if span:
            inside = int(span[1], 16) <= address < int(span[2], 16)
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_released_weights_leave_memory_and_read_back_the_same(models: dict[str, Path]) -> None:
    """Converting to bf16/int8 gives back the file's pages, so the fp32 copy is not kept resident."""
    file = (models["bpe"] / "model.safetensors").resolve()
    tensors = read_safetensors(file)
    assert sum(float(t.float().sum()) for t in tensors.values()) != 0  # read every page
    address = next(iter(tensors.values())).data_ptr()
    before = _resident_bytes(address)
    assert before > 0.9 * file.stat().st_size
    for tensor in tensors.values():
        tensors.release(tensor)
    # Only whole pages inside a tensor go (the tiny model's biases and LayerNorms share pages): most of it.
    assert _resident_bytes(address) < 0.5 * before
    reference = load_file(file)
    assert all(torch.equal(tensors[k], reference[k]) for k in tensors)  # pages come back from the file


def test_missing_tensor_names_it(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    shutil.copytree(models["bpe"], folder)
    state = load_file(folder / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        GptcliError, match=r"model\.safetensors: the weights have no tensor h\.1\.mlp\.c_fc\.bias"
    ):
        load_model(str(folder), device="cpu")


def test_other_variants_load_through_transformers(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "scaled"
    shutil.copytree(models["bpe"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["scale_attn_by_inverse_layer_idx"] = True  # not what gptcli.gpt2 computes
    (folder / "config.json").write_text(json.dumps(config))
    lm = load_model(str(folder), device="cpu")
    assert lm.net is None and lm._model is not None
    ids = torch.tensor([lm.tokenizer.encode("今天天气")])
    with torch.inference_mode():
        assert torch.equal(lm.logits(ids), tiny.reference_model(lm)(ids).logits)


def test_batched_steps_on_packed_weights_compute_the_same(models) -> None:
    """oneDNN-packed weights (long --each-line work): the same probabilities, the same greedy ids."""
    from gptcli.generation.generate import complete
    from gptcli.generation.sampling import resolve_settings
    from gptcli.gpt2 import BATCHED_ROWS

    plain, packed = load_model(str(models["bpe"])), load_model(str(models["bpe"]))
    assert packed.net is not None
    packed.net.pack_for_batches()
    assert packed.net.blocks[0].c_fc.packed is not None
    prompts = [p for p in PROMPTS * 3][: BATCHED_ROWS + 2]
    ids, mask, positions = batch(plain, prompts)
    with torch.inference_mode():
        a = torch.softmax(plain.logits(ids, attention_mask=mask, position_ids=positions), -1)
        b = torch.softmax(packed.logits(ids, attention_mask=mask, position_ids=positions), -1)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    settings = resolve_settings(None, greedy=True, max_new_tokens=12)
    one = complete(plain, prompts, settings, batch_size=1)
    many = complete(packed, prompts, settings, batch_size=len(prompts))
    assert [d.token_ids for d in one] == [d.token_ids for d in many]
