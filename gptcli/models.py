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
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from gptcli.errors import GptcliError, UsageError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "gpt2"
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# A hub id is "name" or "owner/name" made of letters, digits, '-', '_' and '.', never '..'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Files a causal LM needs from a hub repo; pickle weights are fetched only when the caller allows them.
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
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

    @property
    def context_length(self) -> int:
        return context_length(self.model.config)


def default_model_name() -> str:
    """The model used when `-m` is not given: $GPTCLI_MODEL, else gpt2."""
    return os.environ.get("GPTCLI_MODEL") or DEFAULT_MODEL


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


def resolve_model_path(name: str, *, allow_pickle: bool = False) -> Path:
    """Find the folder that holds `name`: a local folder, or a hub id in the cache (downloaded if online).

    Raises GptcliError with what was tried and how to fix it; never waits long on an unreachable hub.
    """
    if not name or not name.strip():
        raise UsageError("empty model name: pass -m with a hub id (e.g. gpt2) or a model folder")
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise UsageError(f"{name} is a file, not a model folder (a folder saved with save_pretrained)")
    if _looks_like_path(name) or not _HUB_ID.match(name) or ".." in name:
        raise UsageError(f"no model folder at {name}")
    cached = _cached_snapshot(name)
    if cached is not None:
        return cached
    return _download(name, allow_pickle=allow_pickle)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cache folder of `repo_id` if its config.json is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname or "", port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # The connect timeout does not cover the DNS lookup, which can hang for many seconds on a
    # machine without network: run the probe in a daemon thread and stop waiting after `timeout`.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _download(repo_id: str, *, allow_pickle: bool) -> Path:
    from huggingface_hub import constants, snapshot_download

    if not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} is unreachable"
        raise GptcliError(
            f"model {repo_id!r} is not in the local cache ({constants.HF_HUB_CACHE}) and {why}: "
            "pass -m with a local model folder, or connect once so it can be downloaded "
            "(later runs work offline, also with HF_HUB_OFFLINE=1)"
        )
    patterns = _HUB_FILES + (["*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the hub's errors are many; the user needs the one line
        raise GptcliError(f"could not download {repo_id!r} from the hub: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptcliError(f"{path} is not valid JSON: {_first_line(exc)}") from exc
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
        raise GptcliError(f"could not load the tokenizer in {path}: {_first_line(exc)}") from exc


def load_tokenizer_only(
    name: str | None = None, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of model `name`, without loading weights (for `gptcli tokenize`)."""
    path = resolve_model_path(name or default_model_name())
    if not trust_remote_code:
        _refuse_remote_code(path)
    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def load_model(
    name: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load tokenizer and causal LM `name` (hub id or folder; default $GPTCLI_MODEL or gpt2) for inference."""
    name = name or default_model_name()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = resolve_model_path(name, allow_pickle=allow_pickle)
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
        raise GptcliError(f"could not load the model weights from {weights}: {_first_line(exc)}") from exc
    model.to(torch_device)
    model.eval()
    return LoadedModel(name, path, tokenizer, model, torch_device, torch_dtype)


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
