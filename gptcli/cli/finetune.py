"""The `finetune` command (being written)."""
