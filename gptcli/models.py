"""Resolve a model name to files on disk, pick device and dtype, and load tokenizer + model safely.

Every command goes through `load_model`. The rules it enforces:
- a hub id that is cached loads from the cache without touching the network;
- a hub id that is not cached fails in about a second when the hub is unreachable (transformers on its
  own retries for ~48 s);
- weights load from safetensors only, unless the caller allows pickle (then torch's weights_only loader);
- a model's own Python code (auto_map) never runs unless the caller trusts it, and nobody is prompted.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.errors import GptcliError, UsageError
from gptcli.hub import cached_snapshot, download, first_line, hub_reachable

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "gpt2"
BUILTIN = "builtin"
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# A hub id is "name" or "owner/name" made of letters, digits, '-', '_' and '.', never '..'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    """A tokenizer and model ready for inference, and where they came from."""

    name: str
    path: Path
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    device: torch.device
    dtype: torch.dtype
    notice: str | None = None  # something the user should hear about, e.g. a fallback to the builtin

    @property
    def context_length(self) -> int:
        return context_length(self.model.config)


def context_length(config: Any) -> int:
    """How many positions the model can attend to (GPT-2: n_positions)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn auto|cpu|cuda|cuda:N|mps into a torch.device that exists on this machine."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise GptcliError("device 'mps' requested but Apple's MPS backend is not available here")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise UsageError(f"unknown device {spec!r}: use one of {', '.join(DEVICES)}")
    if not torch.cuda.is_available():
        raise GptcliError(f"device {spec!r} requested but no CUDA GPU is available (try --device cpu)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise GptcliError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Turn auto|float32|bfloat16|float16 into a torch.dtype; auto is bf16 on GPUs that have it, else fp32."""
    import torch

    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # fp32 on CPU and MPS: it is the reference numerics, and CPU fp16 matmuls are slow.
        return torch.float32
    if spec not in names:
        raise UsageError(f"unknown dtype {spec!r}: use one of {', '.join(DTYPES)}")
    return names[spec]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1) or "\\" in name


def is_hub_id(name: str) -> bool:
    """Whether `name` can only mean a hub repo: "name" or "owner/name", no path tricks."""
    return not _looks_like_path(name) and bool(_HUB_ID.match(name)) and ".." not in name


def builtin_path() -> Path:
    """The folder of the small model that ships inside the package."""
    return Path(__file__).parent / "builtin"


def resolve(name: str | None, *, allow_pickle: bool = False) -> tuple[str, Path, str | None]:
    """Which model to use and where its files are: (name, folder, notice for the user or None).

    Precedence, lowest to highest: gpt2, $GPTCLI_MODEL, the name passed in (-m). Only when the
    default applies and gpt2 is neither cached nor downloadable does the builtin model stand in;
    an explicit gpt2 that cannot be had is an error, never a silent substitution.
    """
    if name is None and os.environ.get("GPTCLI_MODEL"):
        name = os.environ["GPTCLI_MODEL"]
    if name is not None:
        return name, resolve_model_path(name, allow_pickle=allow_pickle), None
    cached = cached_snapshot(DEFAULT_MODEL)
    if cached is not None:
        return DEFAULT_MODEL, cached, None
    if hub_reachable():
        return DEFAULT_MODEL, download(DEFAULT_MODEL, allow_pickle=allow_pickle, probed=True), None
    notice = (
        f"{DEFAULT_MODEL} is not in the local cache and the hub is unreachable, so the built-in model "
        f"answers; run `gptcli pull {DEFAULT_MODEL}` once online to use {DEFAULT_MODEL}"
    )
    return BUILTIN, resolve_model_path(BUILTIN), notice


def resolve_model_path(name: str, *, allow_pickle: bool = False) -> Path:
    """Find the folder that holds `name`: a local folder, or a hub id in the cache (downloaded if online).

    Raises GptcliError with what was tried and how to fix it; never waits long on an unreachable hub.
    """
    if not name or not name.strip():
        raise UsageError("empty model name: pass -m with a hub id (e.g. gpt2) or a model folder")
    if name == BUILTIN:
        if not (builtin_path() / "config.json").is_file():
            raise GptcliError(f"the built-in model is missing from this installation ({builtin_path()})")
        return builtin_path()
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise UsageError(f"{name} is a file, not a model folder (a folder saved with save_pretrained)")
    if not is_hub_id(name):
        raise UsageError(f"no model folder at {name}")
    cached = cached_snapshot(name)
    if cached is not None:
        return cached
    return download(name, allow_pickle=allow_pickle)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptcliError(f"{path} is not valid JSON: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise GptcliError(f"{path} is not valid JSON: expected an object")
    return data


def check_model_folder(path: Path, *, allow_pickle: bool, trust_remote_code: bool) -> bool:
    """Refuse folders that are not models, ship code we were not told to trust, or hold only pickle weights.

    Returns whether the weights are safetensors (False: pickle, allowed by the caller).
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise GptcliError(f"no config.json in {path}: not a model folder saved with save_pretrained")
    if not trust_remote_code:
        _refuse_remote_code(path)
    else:
        _read_json(config_file)
    if any(path.glob("*.safetensors")):
        return True
    pickles = [name for name in _PICKLE_WEIGHTS if (path / name).is_file()]
    if not pickles:
        raise GptcliError(f"no weights in {path}: expected model.safetensors")
    if not allow_pickle:
        raise GptcliError(
            f"{path / pickles[0]} is a pickle file, which can run code when loaded; gptcli loads "
            "safetensors only. Convert it to safetensors, or pass --allow-pickle to load it with "
            "torch's weights_only loader"
        )
    return False


def _refuse_remote_code(path: Path) -> None:
    """Refuse a folder whose config or tokenizer config points at its own Python code (auto_map)."""
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file() and _read_json(file).get("auto_map"):
            raise GptcliError(
                f"{file} asks to run the model's own Python code (auto_map); "
                "gptcli never runs it unless you pass --trust-remote-code"
            )


def _quiet_transformers() -> None:
    """Keep transformers' progress bars and advice off our stderr; our errors say what matters."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in `path` (never from the network)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise GptcliError(f"could not load the tokenizer in {path}: {first_line(exc)}") from exc


def load_tokenizer_only(
    name: str | None = None, *, trust_remote_code: bool = False
) -> tuple[str, PreTrainedTokenizerBase, str | None]:
    """(name, tokenizer, notice) of model `name`, without loading weights (for `gptcli tokenize`)."""
    name, path, notice = resolve(name)
    if not trust_remote_code:
        _refuse_remote_code(path)
    return name, load_tokenizer(path, trust_remote_code=trust_remote_code), notice


def load_model(
    name: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load tokenizer and causal LM `name` (hub id, folder or "builtin"; see `resolve`) for inference."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    name, path, notice = resolve(name, allow_pickle=allow_pickle)
    safetensors = check_model_folder(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)

    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            local_files_only=True,
            use_safetensors=safetensors,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:
        weights = next(iter(sorted(path.glob("*.safetensors"))), path / _PICKLE_WEIGHTS[0])
        raise GptcliError(f"could not load the model weights from {weights}: {first_line(exc)}") from exc
    model.to(torch_device)
    model.eval()
    return LoadedModel(name, path, tokenizer, model, torch_device, torch_dtype, notice)


def model_info(lm: LoadedModel) -> dict[str, Any]:
    """What `gptcli info` reports: architecture, size, context, vocabulary, tokenizer, dtype, device, path."""
    config = lm.model.config
    return {
        "model": lm.name,
        "path": str(lm.path),
        "architecture": (config.architectures or [type(lm.model).__name__])[0],
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "layers": getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", None),
        "heads": getattr(config, "n_head", None) or getattr(config, "num_attention_heads", None),
        "embedding_size": getattr(config, "n_embd", None) or getattr(config, "hidden_size", None),
        "context_length": lm.context_length,
        "vocab_size": config.vocab_size,
        "tokenizer": type(lm.tokenizer).__name__,
        "tokenizer_size": len(lm.tokenizer),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
    }
