"""Instruction data, the loss on answers, packing, gradient accumulation's normalisation, and the
evaluation features (baseline, --save-best, --patience, the short final block), on the tiny fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gptcli.training.data import IGNORE, make_blocks
from gptcli.training.instruct import make_examples

import tiny

RECORDS: list[dict[str, Any]] = [
    {"prompt": "Question: how is the weather today?\nAnswer:", "completion": " The weather is nice today."},
    {"prompt": "Say hello.\n", "completion": "Hello world!"},
    {
        "messages": [
            {"role": "user", "content": "Where is the cat?"},
            {"role": "assistant", "content": "In the sun."},
        ]
    },
    {"prompt": "Count:", "completion": " 12345 and 3.14159 should tokenize too."},
    {"prompt": "今天天气很好，", "completion": "我们去公园散步吧。"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tea?"},
            {"role": "assistant", "content": "Yes, hot tea."},
            {"role": "user", "content": "When?"},
            {"role": "assistant", "content": "In the morning."},
        ]
    },
]


@pytest.fixture(scope="module")
def model_and_tokenizer(bpe_model: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        bpe_model, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(bpe_model)


def direct_loss(model, tokenizer, eos: int) -> tuple[float, int]:
    """The summed loss over answer tokens, each example run alone, the mask made from the records."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for record in RECORDS:
        ids: list[int] = []
        answer: list[bool] = []

        def add(text: str, is_answer: bool, ids=ids, answer=answer) -> None:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            answer += [is_answer] * len(piece)

        if "prompt" in record:
            add(record["prompt"], False)
            add(record["completion"], True)
            ids.append(eos)
            answer.append(True)
        else:  # the documented plain chat format
            newline = ""
            for m in record["messages"]:
                if m["role"] == "assistant":
                    add(newline + "Assistant:", False)
                    add(" " + m["content"], True)
                    ids.append(eos)
                    answer.append(True)
                    newline = "\n"
                else:
                    add(f"{newline}{m['role'].capitalize()}: {m['content']}\n", False)
                    newline = ""
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x[:, :-1]).logits[0]
        losses = F.cross_entropy(logits, x[0, 1:], reduction="none")
        mask = torch.tensor(answer[1:])
        total += losses[mask].sum().item()
        count += int(mask.sum())
    return total, count


@pytest.mark.parametrize("pack", [True, False])
def test_the_loss_is_the_answers_alone_packed_or_padded(model_and_tokenizer, pack: bool) -> None:
    """Batched (packed: several examples a row; or padded), the loss equals each example's own masked
    loss to 1e-6: neither attention nor loss crosses from one example into the next."""
    from contextlib import nullcontext

    import torch

    from gptcli.training.loop import batch_loss

    model, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id
    examples = make_examples(RECORDS, tokenizer, eos, block_size=128, pack=pack)
    assert examples.truncated == 0
    assert (len(examples) < len(RECORDS)) == pack  # packing puts several in a row
    batch = examples.batch(np.arange(len(examples)))
    with torch.no_grad():
        ours = batch_loss(model, batch, torch.device("cpu"), nullcontext()).item()
    expected, count = direct_loss(model, tokenizer, eos)
    assert batch.targets == count
    assert abs(ours / count - expected / count) < 1e-6


def test_packed_examples_see_only_themselves(model_and_tokenizer) -> None:
    """Every logit of a packed row equals that of its example run alone (to 1e-5)."""
    import torch

    from gptcli.training.loop import model_inputs

    model, tokenizer = model_and_tokenizer
    examples = make_examples(RECORDS, tokenizer, tokenizer.eos_token_id, block_size=128, pack=True)
    batch = examples.batch(np.arange(len(examples)))
    with torch.no_grad():
        packed = model(**model_inputs(batch, torch.device("cpu"))).logits
        for r, row in enumerate(examples.rows):
            at = 0
            for e in row:
                alone = model(input_ids=torch.from_numpy(examples.inputs[e])[None]).logits[0]
                assert torch.allclose(packed[r, at : at + len(alone)], alone, atol=1e-5, rtol=0)
                at += len(alone)


def test_train_on_prompt_and_the_plain_chat_format(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    eos = tokenizer.eos_token_id
    answers = make_examples(RECORDS[2:3], tokenizer, eos, block_size=128, pack=False)
    everything = make_examples(RECORDS[2:3], tokenizer, eos, block_size=128, pack=False, train_on_prompt=True)
    ids = [*answers.inputs[0].tolist(), eos]
    assert tokenizer.decode(ids) == f"User: Where is the cat?\nAssistant: In the sun.{tokenizer.eos_token}"
    assert (
        tokenizer.decode([t for t in answers.labels[0] if t != IGNORE])
        == f" In the sun.{tokenizer.eos_token}"
    )
    assert everything.targets == len(ids) - 1 > answers.targets


def test_grad_accumulation_gives_the_one_big_batch_gradient(model_and_tokenizer, bpe_model: Path) -> None:
    """Micro-batches with different numbers of answer tokens: the accumulated gradient is the gradient
    of the mean over all the step's targets (to 1e-6), not of a mean of micro-batch means."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from gptcli.training.config import TrainConfig
    from gptcli.training.data import BatchOrder
    from gptcli.training.distributed import Dist
    from gptcli.training.loop import Position, batch_loss, train_step
    from gptcli.training.setup import TrainData

    _, tokenizer = model_and_tokenizer
    model = AutoModelForCausalLM.from_pretrained(bpe_model, dtype=torch.float32).train()
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    for module in model.modules():  # no dropout: the two gradients must come from the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    examples = make_examples(RECORDS * 2, tokenizer, tokenizer.eos_token_id, block_size=128, pack=False)
    order = BatchOrder(len(examples), seed=3)
    micro = [examples.batch(order.take(i * 2, 2)) for i in range(3)]
    assert len({b.targets for b in micro}) == 3  # the micro-batches hold different token counts

    class Recording(torch.optim.SGD):
        def step(self, closure=None):  # the gradients as the optimizer sees them
            self.grads = [p.grad.clone() for p in model.parameters()]
            return super().step(closure)

    cfg = TrainConfig(batch_size=2, grad_accum=3, clip=0.0)
    ddp = Dist(0, 0, 1, torch.device("cpu"))
    run: Any = SimpleNamespace(  # a stand-in for training.loop.Run: only the fields train_step reads
        cfg=cfg, ddp=ddp, optimizer=Recording(model.parameters(), lr=0.0), data=TrainData(examples, order),
        net=model, model=model, scaler=torch.amp.GradScaler("cpu", enabled=False), no_sync=nullcontext,
        autocast=nullcontext(), at=Position(), global_batch=6,
    )  # fmt: skip
    loss = train_step(run, lr=0.0)
    accumulated = run.optimizer.grads

    big = examples.batch(order.take(0, 6))
    model.zero_grad()
    reference = batch_loss(model, big, torch.device("cpu"), nullcontext()) / big.targets
    reference.backward()
    assert abs(loss.item() - reference.item()) < 1e-6
    for ours, theirs in zip(accumulated, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)

    model.zero_grad()  # the mean of micro-batch means (the old way) is another gradient
    for b in micro:
        (batch_loss(model, b, torch.device("cpu"), nullcontext()) / b.targets / 3).backward()
    assert (
        max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), accumulated, strict=True))
        > 1e-5
    )


def test_the_short_final_block_trains_every_token_once() -> None:
    blocks = make_blocks(np.arange(12, dtype=np.uint16), 3, "training")  # 11 targets: 3 blocks + 2 left
    assert len(blocks) == 4 and blocks.targets == 11
    batch = blocks.batch(np.arange(4))
    assert batch.inputs[-1].tolist() == [8, 9, 10]
    assert batch.labels[-1].tolist() == [IGNORE, 10, 11]  # 9 is the block before's last target
    targets = sorted(t for t in batch.labels.flatten().tolist() if t != IGNORE)
    assert targets == list(range(1, 12))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("pack", ["--pack", "--no-pack"])
def test_finetune_on_instruction_data_with_lora(cli, bpe_model: Path, tmp_path: Path, pack: str) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS * 10)
    out = tmp_path / "out"
    args = ["--lora-rank", "4", "--steps", "6", "--batch-size", "4", "--block-size", "128", "--lr", "1e-2"]
    result = cli(
        "finetune", data, "-m", bpe_model, "-o", out, pack, "--eval-every", "3", "--log-every", "1", *args
    )
    assert result.code == 0, result.err
    assert "instruction examples:" in result.err and ("packed into" in result.err) == (pack == "--pack")
    assert "validation loss before training:" in result.err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and [r["step"] for r in records[1:]] == [1, 2, 3, 4, 5, 6]
    assert (out / "adapter_config.json").is_file()


def test_mixed_text_and_instruction_data_is_refused(cli, bpe_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    text = tmp_path / "t.txt"
    text.write_text(tiny.TEXT, encoding="utf-8")
    result = cli("finetune", data, text, "-m", bpe_model, "-o", tmp_path / "out", "--steps", "1")
    assert result.code == 2 and "mixes instruction JSONL" in result.err, result.err


@pytest.mark.slow
def test_patience_stops_and_save_best_keeps_the_best(cli, bpe_model: Path, tmp_path: Path) -> None:
    """A learning rate that makes things worse: the baseline stays the best, --patience 2 stops after two
    worse evaluations, and with --save-best OUT holds the base model's weights."""
    from safetensors.torch import load_file

    corpus = tmp_path / "c.txt"
    corpus.write_text(tiny.TEXT * 4, encoding="utf-8")
    out = tmp_path / "out"
    args = ["--steps", "20", "--lr", "1.0", "--warmup", "0", "--eval-every", "1", "--block-size", "32"]
    result = cli("finetune", corpus, "-m", bpe_model, "-o", out, *args, "--patience", "2", "--save-best")
    assert result.code == 0, result.err
    assert "stopped early at step 2/20: 2 validation losses in a row without a new best" in result.err
    assert "best val loss" in result.err and "at step 0" in result.err
    vals = [r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert len(vals) == 3 and min(vals) == vals[0]
    base, kept = load_file(bpe_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(kept[k].float().equal(base[k].float()) for k in base if k in kept)
    resumed = cli("finetune", corpus, "-m", bpe_model, "-o", out, *args, "--patience", "2", "--resume")
    assert resumed.code == 0 and "stopped early at step 2/20" in resumed.err  # still out of patience


def test_save_best_without_validation_data_is_refused(cli, bpe_model: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(tiny.TEXT * 4, encoding="utf-8")
    args = ["--val-split", "0", "--save-best", "--steps", "1", "--block-size", "32"]
    result = cli("finetune", corpus, "-m", bpe_model, "-o", tmp_path / "out", *args)
    assert result.code == 2 and "--save-best and --patience need a validation loss" in result.err
