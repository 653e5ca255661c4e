"""gptcli: GPT-2-family language models from the shell, and the plain library under the commands.

The public API is imported lazily so that `import gptcli` (and `gptcli --help`) never pays for torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "gptcli.loading.models",
    "LoadedModel": "gptcli.loading.models",
    "GptcliError": "gptcli.errors",
    "UsageError": "gptcli.errors",
    "next_token_distribution": "gptcli.inspection.predict",
    "score_text": "gptcli.inspection.predict",
    "logit_lens": "gptcli.inspection.lens",
    "attention_weights": "gptcli.inspection.attention",
    "compare_text": "gptcli.inspection.compare",
    "StepSession": "gptcli.inspection.step",
    "tokenize": "gptcli.generation.tokens",
    "complete": "gptcli.generation.generate",
    "stream": "gptcli.generation.generate",
    "Settings": "gptcli.generation.sampling",
    "resolve_settings": "gptcli.generation.sampling",
    "train": "gptcli.training.loop",
    "TrainConfig": "gptcli.training.config",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'gptcli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
