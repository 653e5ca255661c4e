"""The `complete` command (being written)."""
