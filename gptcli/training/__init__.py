"""`gptcli finetune`: the training loop and what it stands on.

config      TrainConfig: one field per `finetune` option, documented and checked (imports no torch)
loop        train(): the training loop, top to bottom
setup       what the loop needs before it starts: precision, model (LoRA via PEFT), tokenizer, data, FLOPs
data        text and JSONL -> token ids in a memmap cache -> packed blocks -> each rank's batches
instruct    prompt/completion and chat JSONL -> answer-only labels -> packed or padded rows
checkpoint  OUTDIR: its lock, the checkpoint, the final model folder, metrics.jsonl, loss.png
atomic      files written under a temporary name, fsynced, then renamed into place
distributed one process or many under torchrun: rank, world, collectives, stop requests

Only `config` is imported outside a training run (the CLI reads its defaults); the others import torch
at the top, as nanoGPT's train.py does.
"""
