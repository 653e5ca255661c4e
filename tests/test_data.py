"""gptcli.training.data: strict reading, one tokenization into a cache, packing, splits, batch order."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from gptcli.errors import UsageError
from gptcli.training.data import (
    BatchOrder,
    make_blocks,
    prepare_tokens,
    read_documents,
    shard_start,
    split_document,
    split_validation,
    splits_exactly,
    tokenize_to_file,
)

import tiny


@pytest.fixture(scope="module")
def bpe(bpe_model: Path):
    from gptcli.loading.models import load_tokenizer

    return load_tokenizer(bpe_model)


@pytest.fixture(scope="module")
def bert(bert_model: Path):
    from gptcli.loading.models import load_tokenizer

    return load_tokenizer(bert_model)


def test_txt_is_one_document_and_jsonl_one_per_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first file\nsecond line\n", encoding="utf-8")
    lines = [{"body": "今天天气很好"}, {"body": "second"}, {}, {"body": "third"}]
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) if r else "" for r in lines) + "\n", encoding="utf-8"
    )
    docs = list(read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], text_field="body"))
    assert docs == ["first file\nsecond line\n", "今天天气很好", "second", "third"]


def test_jsonl_without_the_field_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(
        UsageError, match=r"d\.jsonl line 2 has no field 'text' \(its fields: 'body'; use --text-field"
    ):
        list(read_documents([str(path)]))
    for line, why in (
        ('{"text": 3}', "has a number in field 'text', not a string"),
        ('{"text": ["a"]}', "has an array in field 'text', not a string"),
        ('{"text": null}', "has null in field 'text', not a string"),
        ('["text"]', "is an array, not an object with a 'text' field"),
    ):
        path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
        with pytest.raises(UsageError, match=re.escape(f"d.jsonl line 2 {why}")):
            list(read_documents([str(path)]))
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"d\.jsonl line 2 is not valid JSON"):
        list(read_documents([str(path)]))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path: Path, suffix: str) -> None:
    good = '{"text": "héllo"}\n' if suffix == ".jsonl" else "héllo\n"
    data = (good * 3).encode("utf-8")
    bad = data + b'{"text": "caf\xe9"}\n' if suffix == ".jsonl" else data + b"caf\xe9\n"
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(bad)
    offset = bad.index(b"\xe9")
    with pytest.raises(UsageError, match=rf"latin1\{suffix} is not valid UTF-8 \(byte offset {offset}\)"):
        list(read_documents([str(path)]))


def test_a_path_no_file_can_have_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read a\x00b: embedded null byte"):
        list(read_documents(["a\x00b"]))


def test_split_document_cuts_only_between_words_at_newlines() -> None:
    text = "alpha beta\ngamma\n  indented\ndelta\n\nepsilon\nzeta"
    pieces = split_document(text, piece_chars=1)
    assert "".join(pieces) == text
    assert pieces == ["alpha beta\n", "gamma\n  indented\n", "delta\n\nepsilon\n", "zeta"]


def test_pieces_tokenize_exactly_like_the_whole(bpe, bert, tmp_path: Path) -> None:
    """Cutting long documents must not change a single id (for both fixture tokenizers)."""
    text = tiny.TEXT * 3
    for tokenizer in (bpe, bert):
        assert splits_exactly(tokenizer)
        eos = 7
        count, docs = tokenize_to_file(
            [text, "", text[:50]], tokenizer, eos, tmp_path / "t.bin", "uint16", 40
        )
        ids = np.fromfile(tmp_path / "t.bin", dtype=np.uint16).tolist()
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        short = tokenizer(text[:50], add_special_tokens=False)["input_ids"]
        assert ids == [*whole, eos, *short, eos]  # one EOS after each non-empty document
        assert (count, docs) == (len(ids), 2)


def test_cache_is_reused_and_rebuilt_when_inputs_or_tokenizer_change(bpe, bert, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny.TEXT, encoding="utf-8")
    cache = tmp_path / "data"
    first = prepare_tokens([str(corpus)], [], bpe, bpe.eos_token_id, cache)
    assert not first.reused and first.documents == 1
    ids = first.open("train")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == [*bpe(tiny.TEXT, add_special_tokens=False)["input_ids"], bpe.eos_token_id]

    assert prepare_tokens([str(corpus)], [], bpe, bpe.eos_token_id, cache).reused
    corpus.write_text(tiny.TEXT + "more text\n", encoding="utf-8")
    os.utime(corpus, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    changed = prepare_tokens([str(corpus)], [], bpe, bpe.eos_token_id, cache)
    assert not changed.reused and changed.train_tokens > first.train_tokens
    other = prepare_tokens([str(corpus)], [], bert, bert.sep_token_id, cache)
    assert not other.reused and other.open("train")[-1] == bert.sep_token_id


def test_empty_data_is_refused(bpe, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UsageError, match=r"no text in the training data: .*empty\.txt"):
        prepare_tokens([str(tmp_path / "empty.txt")], [], bpe, 0, tmp_path / "data")


def test_blocks_overlap_by_one_token_and_short_data_is_refused() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    blocks = make_blocks(tokens, 3, "training")
    assert len(blocks) == 3
    assert blocks.read(np.array([0, 2])).tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    with pytest.raises(UsageError, match=r"10 tokens, fewer than one block of 16.*refusing to pad.*9"):
        make_blocks(tokens, 16, "training")


def test_validation_blocks_are_spread_and_disjoint() -> None:
    blocks = make_blocks(np.arange(1001, dtype=np.uint16), 10, "training")
    train, val = split_validation(blocks, 0.05)
    assert val is not None and len(val) == 5 and len(train) == 95
    assert val.starts.tolist() == [190, 390, 590, 790, 990]
    assert not set(val.starts.tolist()) & set(train.starts.tolist())
    few = make_blocks(np.arange(101, dtype=np.uint16), 10, "training")
    assert split_validation(few, 0.05) == (few, None)


def test_every_epoch_visits_every_block_once_in_a_new_order() -> None:
    order = BatchOrder(50, seed=3)
    first, second = order.take(0, 50), order.take(50, 50)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50))
    assert first.tolist() != second.tolist()
    assert order.take(45, 10).tolist() == [*first[45:].tolist(), *second[:5].tolist()]
    assert BatchOrder(50, seed=3).take(70, 4).tolist() == second[20:24].tolist()  # a function of position


def test_ranks_share_each_micro_step_like_one_process_with_a_bigger_batch() -> None:
    order = BatchOrder(1000, seed=0)
    seen, batch, accum, world = 96, 2, 3, 4
    for micro in range(accum):
        one = order.take(shard_start(seen, micro, 0, 1, batch * world), batch * world)
        ranks = [order.take(shard_start(seen, micro, r, world, batch), batch) for r in range(world)]
        assert np.concatenate(ranks).tolist() == one.tolist()


def test_half_an_instruction_record_asks_for_prompt_and_completion(tmp_path: Path) -> None:
    """{"prompt": ...} alone is neither text nor instruction data: say what instruction data needs, not
    that the line lacks 'text'."""
    path = tmp_path / "i.jsonl"
    path.write_text('{"prompt": "Say hi"}\n', encoding="utf-8")
    with pytest.raises(
        UsageError, match=r'i\.jsonl line 1 has .prompt.: instruction data needs both "prompt"'
    ):
        list(read_documents([str(path)]))
