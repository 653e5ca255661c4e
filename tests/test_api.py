"""The Python API: everything `gptcli` exports resolves, and the README's library use works."""

from __future__ import annotations

from pathlib import Path

import gptcli


def test_every_exported_name_resolves() -> None:
    for name in gptcli.__all__:
        assert getattr(gptcli, name) is not None, name


def test_library_use_without_the_cli(bpe_model: Path) -> None:
    lm = gptcli.load_model(str(bpe_model), device="cpu")
    top = gptcli.next_token_distribution(lm, ["今天天气"], k=3)[0]
    assert len(top.tokens) == 3 and top.tokens[0]["prob"] >= top.tokens[1]["prob"]
    score = gptcli.score_text(lm, "今天天气很好")
    assert score.num_tokens == len(lm.tokenizer.encode("今天天气很好"))
