"""`gptcli merge`: a LoRA adapter folder merged into its base, written as a plain model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gptcli.cli._common import TRAIN, command, examples, note, status


@command(
    rich_help_panel=TRAIN,
    epilog=examples(
        "gptcli finetune chats.jsonl -m gpt2 -o my-lora --lora-rank 8",
        "gptcli merge my-lora -o my-model",
        "gptcli complete -m my-model 'User: Hello\\nAssistant:'",
    ),
)
def merge(
    adapter: Annotated[Path, typer.Argument(help="A LoRA adapter folder (finetune --lora-rank's output).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write (new, or empty).")],
) -> None:
    """Merge a LoRA adapter into its base model, written as a plain model folder.

    OUT holds fp32 safetensors, config, generation config and tokenizer, which transformers and every
    gptcli command load like any other model.

    The adapter folder itself also works as -m in every command (merged in memory at load); merge
    once to share the model or to load it without PEFT.
    """
    from gptcli.loading.adapters import merge_adapter

    with status("merging the adapter"):
        written = merge_adapter(adapter.expanduser(), out.expanduser())
    note(f"merged model in {written}")
