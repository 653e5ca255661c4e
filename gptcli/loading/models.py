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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.loading import gpt2_folder
from gptcli.loading.adapters import Adapter, find_adapter, is_adapter_folder, load_merged_transformers_model
from gptcli.loading.hub import cached_snapshot, download, hub_reachable

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from gptcli.contracts import GenerationConfig, ModelConfig, Runtime, Tokenizer
    from gptcli.gpt2 import GPT2

DEFAULT_MODEL = "gpt2"
BUILTIN = "builtin"
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

# A hub id is "name" or "owner/name" made of letters, digits, '-', '_' and '.', never '..'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Any of these makes a tokenizer (fast, byte-level BPE, WordPiece, SentencePiece, tiktoken).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tekken.json", "*.model", "*.tiktoken")


@dataclass
class LoadedModel:
    """A tokenizer and model ready for inference, and where they came from.

    `runtime` says which implementation runs it. "gptcli": a plain GPT-2 safetensors checkpoint on
    `net`, gptcli's own forward pass (gptcli.gpt2), which starts and decodes faster than transformers'
    model with the same numbers in fp32. "transformers": any other checkpoint, on `model`, a
    transformers PreTrainedModel. Only one of the two is loaded: `net` is None on "transformers", and
    `model` refuses on "gptcli" (code that wants transformers' model of such a folder loads it itself,
    with `load_transformers_model`).
    """

    name: str
    path: Path
    # transformers' classes, or for a plain GPT-2 folder gptcli.loading.gpt2_folder's stand-ins (no
    # transformers
    # import); gptcli.contracts declares what gptcli uses of either
    tokenizer: Tokenizer
    config: ModelConfig
    generation_config: GenerationConfig | None
    device: torch.device
    dtype: torch.dtype
    net: GPT2 | None = None
    notice: str | None = None  # something the user should hear about, e.g. a fallback to the builtin
    quantize: str | None = None  # "int8": `net`'s matmul weights are int8 (gptcli.loading.quantize)
    threads: int | None = None  # --threads: torch's threads, and one sequence's decoding steps'
    _model: PreTrainedModel | None = field(default=None, repr=False)
    _decode_threads: int | None = field(default=None, repr=False)

    def decode_threads(self) -> int:
        """Threads for the steps of one sequence's decoding: `threads` when given, else measured for
        gptcli's GPT-2 (GPT2.decode_threads, cached per machine), else 1."""
        if self._decode_threads is None:
            if self.net is not None:
                self._decode_threads = self.net.decode_threads(self.threads)
            else:
                self._decode_threads = self.threads or 1
        return self._decode_threads

    @property
    def runtime(self) -> Runtime:
        """Which implementation runs the model: "gptcli" (`net`) or "transformers" (`model`)."""
        return "gptcli" if self.net is not None else "transformers"

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model that runs this checkpoint (runtime "transformers" only)."""
        if self._model is None:
            raise GptcliError(
                f"{self.name} runs on gptcli's own GPT-2 (lm.net), not on a transformers model; "
                "load one with gptcli.loading.models.load_transformers_model if you need it"
            )
        return self._model

    @property
    def context_length(self) -> int:
        return context_length(self.config)

    @property
    def num_parameters(self) -> int:
        if self.net is not None:
            return self.net.num_parameters
        return sum(p.numel() for p in self.model.parameters())

    def pack_for_batches(self) -> None:
        """Give gptcli's GPT-2 its oneDNN-packed weights for batched steps (GPT2.pack_for_batches); nothing
        on the "transformers" runtime."""
        if self.net is not None:
            self.net.pack_for_batches()

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """The model's logits [batch, positions, vocab] (the last `logits_to_keep` positions; 0: all).

        `attention_mask` is 1 for tokens, 0 for left padding; without `position_ids` positions count
        from 0 in every row.
        """
        import torch

        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if self.runtime == "transformers":
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                logits_to_keep=logits_to_keep,
            )
            logits: torch.Tensor = out.logits
            return logits
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()
        assert self.net is not None
        return self.net.forward(input_ids, position_ids, mask=mask, logits_to_keep=logits_to_keep)


def context_length(config: object) -> int:
    """How many positions the model can attend to (GPT-2: n_positions)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def check_device_spec(spec: str) -> None:
    """Refuse a --device that is none of auto|cpu|cuda|cuda:N|mps, without importing torch."""
    spec = spec.strip().lower()
    if spec not in ("auto", "cpu", "mps") and not re.fullmatch(r"cuda(?::\d+)?", spec):
        raise UsageError(f"unknown device {spec!r}: use one of {', '.join(DEVICES)}")


def check_dtype_spec(spec: str) -> None:
    """Refuse a --dtype gptcli does not know, without importing torch."""
    if spec.strip().lower() not in ("auto", *_DTYPE_NAMES):
        raise UsageError(f"unknown dtype {spec!r}: use one of {', '.join(DTYPES)}")


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn auto|cpu|cuda|cuda:N|mps into a torch.device that exists on this machine."""
    import torch

    check_device_spec(spec)
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
    assert match is not None  # check_device_spec let it through
    if not torch.cuda.is_available():
        raise GptcliError(f"device {spec!r} requested but no CUDA GPU is available (try --device cpu)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise GptcliError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Turn auto|float32|bfloat16|float16 into a torch.dtype; auto is bf16 on GPUs that have it, else fp32."""
    import torch

    check_dtype_spec(spec)
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # fp32 on CPU and MPS: it is the reference numerics, and CPU fp16 matmuls are slow.
        return torch.float32
    dtype: torch.dtype = getattr(torch, _DTYPE_NAMES[spec])
    return dtype


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1) or "\\" in name


def is_hub_id(name: str) -> bool:
    """Whether `name` can only mean a hub repo: "name" or "owner/name", no path tricks."""
    return not _looks_like_path(name) and bool(_HUB_ID.match(name)) and ".." not in name


def builtin_path() -> Path:
    """The folder of the small model that ships inside the package."""
    return Path(__file__).parent.parent / "builtin"


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
    try:
        if local.is_dir():
            return local.resolve()
        if local.exists():
            raise UsageError(f"{name} is a file, not a model folder (a folder saved with save_pretrained)")
    except OSError as exc:  # a name longer than the file system allows, say
        raise UsageError(f"no model folder at {name}: {exc.strerror}") from exc
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
        refuse_remote_code(path)
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


def refuse_remote_code(path: Path) -> None:
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

    # With no tokenizer files at all transformers builds an empty tokenizer (one token) instead of failing.
    missing = GptcliError(
        f"no tokenizer in {path}: expected {path / 'tokenizer.json'} (or vocab.json and merges.txt, "
        "or a WordPiece vocab.txt)"
    )
    if not trust_remote_code and not any(any(path.glob(name)) for name in _TOKENIZER_FILES):
        raise missing  # (a model's own tokenizer code may read files of any name)
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).is_file():
                _read_json(path / name)  # a file that is not JSON: the error names it
        raise GptcliError(f"could not load the tokenizer in {path}: {first_line(exc)}") from exc
    if len(tokenizer) <= 1:
        raise missing
    return tokenizer


def load_tokenizer_only(
    name: str | None = None, *, trust_remote_code: bool = False
) -> tuple[str, Tokenizer, str | None]:
    """(name, tokenizer, notice) of model `name`, without loading weights (for `gptcli tokenize`)."""
    name, path, notice = resolve(name)
    if not trust_remote_code:
        refuse_remote_code(path)
    tokenizer = gpt2_folder.load_tokenizer(path)
    if tokenizer is None:
        return name, as_contract(load_tokenizer(path, trust_remote_code=trust_remote_code)), notice
    return name, tokenizer, notice


def as_contract(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """transformers' tokenizer seen through gptcli.contracts.Tokenizer, the API gptcli uses.

    A cast, not a check: transformers declares `decode` for batches too (`str | list[str]`), and
    gptcli only ever decodes one flat list of ids, which gives a str.
    """
    return cast("Tokenizer", tokenizer)


def check_quantize(quantize: str | None) -> None:
    """Refuse a --quantize method gptcli does not have (before a model loads, too)."""
    from gptcli.loading.quantize import METHODS

    if quantize is not None and quantize not in METHODS:
        raise UsageError(f"--quantize must be {' or '.join(METHODS)} (got {quantize!r})")


def check_threads(threads: int | None) -> None:
    """Refuse a --threads count below 1 (before a model loads, too)."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {threads})")


def load_model(
    name: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """Load tokenizer and causal LM `name` (hub id, folder or "builtin"; see `resolve`) for inference.

    `threads`: torch's thread count for everything, one sequence's decoding included (default: torch's
    own, and for decoding one sequence the count measured fastest on this machine).

    `quantize="int8"` stores a plain GPT-2's matmul weights as int8 (gptcli.loading.quantize); other models
    cannot be quantized.
    """
    check_quantize(quantize)
    check_threads(threads)
    check_device_spec(device)
    check_dtype_spec(dtype)
    # Which model, before torch loads: a hub id that is neither cached nor reachable fails at once.
    name, path, notice = resolve(name, allow_pickle=allow_pickle)
    # A LoRA adapter folder runs as its base with the adapter merged into the weights at load: the
    # base's files (config, tokenizer, weights) are read, and `path` stays the adapter's folder.
    adapter = find_adapter(path)
    files = adapter.base if adapter is not None else path
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    safetensors = check_model_folder(files, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    plain = gpt2_folder.load(files) if safetensors else None  # a plain GPT-2: no need to import transformers
    config: ModelConfig
    generation_config: GenerationConfig | None
    tokenizer: Tokenizer
    if plain is not None:
        config, generation_config, tokenizer = plain
    else:
        # The configs first: the tokenizer reads config.json too, and would take the blame for its errors.
        config, generation_config = _load_configs(files, trust_remote_code)
        tokenizer = as_contract(load_tokenizer(files, trust_remote_code=trust_remote_code))
    lm = LoadedModel(
        name,
        path,
        tokenizer,
        config,
        generation_config,
        torch_device,
        torch_dtype,
        notice=notice,
        quantize=quantize,
        threads=threads,
    )
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    lm.net = _load_gpt2(files, torch_device, torch_dtype, quantize, adapter) if safetensors else None
    if lm.net is None:
        if quantize:
            raise UsageError(f"--quantize works with plain GPT-2 checkpoints only; {path} is not one")
        lm._model = load_transformers_model(
            path, torch_device, torch_dtype, trust_remote_code=trust_remote_code
        )
    return lm


def _load_configs(path: Path, trust_remote_code: bool) -> tuple[ModelConfig, GenerationConfig | None]:
    """config.json, and the generation config transformers' from_pretrained would give the model."""
    from transformers import AutoConfig
    from transformers import GenerationConfig as HFGenerationConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise GptcliError(f"could not read {path / 'config.json'}: {first_line(exc)}") from exc
    generation_config: HFGenerationConfig | None
    try:
        generation_config = HFGenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:  # no generation_config.json: what transformers derives from config.json
        try:
            generation_config = HFGenerationConfig.from_model_config(config)
        except Exception:
            generation_config = None
    # transformers' configs carry every name gptcli reads (ModelConfig), declared or set by subclasses.
    return cast("ModelConfig", config), cast("GenerationConfig | None", generation_config)


def _load_gpt2(
    path: Path, device: torch.device, dtype: torch.dtype, quantize: str | None, adapter: Adapter | None = None
) -> GPT2 | None:
    """gptcli's GPT-2 over the folder's model.safetensors (with `adapter` merged into its weights), or
    None when the checkpoint is not one it runs."""
    from gptcli.gpt2 import GPT2, GPT2Config, read_safetensors

    weights_file = path / "model.safetensors"
    raw = _read_json(path / "config.json")
    shape = GPT2Config.from_config(raw)
    if shape is None or raw.get("auto_map") or not weights_file.is_file():
        return None  # another architecture, the model's own code, or sharded weights: transformers runs it
    try:
        # Memory-mapped; GPT2 copies or converts each weight once and gives its file pages back.
        tensors = read_safetensors(weights_file)
        if adapter is not None:
            from gptcli.loading.adapters import merge_into

            merge_into(adapter, tensors)
        return GPT2(shape, tensors, dtype=dtype, device=device, quantize=quantize)
    except (GptcliError, OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise GptcliError(f"could not load the model weights from {weights_file}: {first_line(exc)}") from exc


def load_transformers_model(
    path: Path, device: torch.device, dtype: torch.dtype, *, trust_remote_code: bool = False
) -> PreTrainedModel:
    """transformers' model of the folder at `path` (checked by `check_model_folder` first), for
    inference: in eval mode, on `device`, in `dtype`."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    adapter = find_adapter(path)
    if adapter is not None:  # the base with the adapter merged by PEFT
        # PEFT's merge_and_unload is typed as returning a bare nn.Module; it is the base's model class.
        merged: PreTrainedModel = load_merged_transformers_model(adapter, dtype)
        merged.to(device)  # type: ignore[arg-type]  # in place; transformers' decorator hides .to's signature
        return merged
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=not _only_pickle(path),
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:
        weights = next(iter(sorted(path.glob("*.safetensors"))), path / _PICKLE_WEIGHTS[0])
        raise GptcliError(f"could not load the model weights from {weights}: {first_line(exc)}") from exc
    model.eval()
    model.to(device)  # type: ignore[arg-type]  # transformers' decorator hides nn.Module.to's signature
    return model


def _only_pickle(path: Path) -> bool:
    return not any(path.glob("*.safetensors"))


def folder_info(
    name: str | None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> tuple[dict[str, Any], str | None] | None:
    """(what `gptcli info` reports, a notice or None) for a plain GPT-2 folder, read from its files
    without importing torch or transformers: config.json, tokenizer.json and the safetensors header.

    None when the answer needs them: another architecture, weights whose header does not match the
    config (the full load names the problem), or a device only torch can find (a machine with a GPU).
    """
    check_device_spec(device)
    check_dtype_spec(dtype)
    spec = device.strip().lower()
    if not (spec == "cpu" or (spec == "auto" and not _may_have_an_accelerator())):
        return None
    name, path, notice = resolve(name, allow_pickle=allow_pickle)
    if is_adapter_folder(path):
        return None  # the base and the merge: the full load
    if not check_model_folder(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code):
        return None  # pickle weights: transformers reads them
    plain = gpt2_folder.load(path)
    from gptcli.generation.tokens import describe_tokenizer
    from gptcli.gpt2 import GPT2Config, check_shapes, safetensors_shapes

    shape = GPT2Config.from_config(plain[0].to_dict()) if plain is not None else None
    if plain is None or shape is None:
        return None
    try:
        check_shapes(shape, safetensors_shapes(path / "model.safetensors"))
    except (GptcliError, OSError):
        return None
    config, _, tokenizer = plain
    facts = {
        "model": name,
        "path": str(path),
        "architecture": (config.architectures or ["GPT2LMHeadModel"])[0],
        "model_type": config.model_type,
        "parameters": shape.num_parameters,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "embedding_size": config.hidden_size,
        "context_length": context_length(config),
        "vocab_size": config.vocab_size,
        "tokenizer": describe_tokenizer(tokenizer),
        "tokenizer_size": len(tokenizer),
        "dtype": "float32" if dtype.strip().lower() == "auto" else _DTYPE_NAMES[dtype.strip().lower()],
        "device": "cpu",
    }
    return facts, notice


def _may_have_an_accelerator() -> bool:
    """Whether `--device auto` might pick something but the CPU here (only torch can say for sure)."""
    if sys.platform == "darwin":  # Apple's MPS
        return True
    return any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def model_info(lm: LoadedModel) -> dict[str, Any]:
    """What `gptcli info` reports: architecture, size, context, vocabulary, tokenizer, dtype, device, path."""
    from gptcli.generation.tokens import describe_tokenizer

    config = lm.config
    return {
        "model": lm.name,
        "path": str(lm.path),
        "architecture": (
            config.architectures
            or [type(lm.model).__name__ if lm.runtime == "transformers" else "GPT2LMHeadModel"]
        )[0],
        "model_type": config.model_type,
        "parameters": lm.num_parameters,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "embedding_size": config.hidden_size,
        "context_length": lm.context_length,
        "vocab_size": config.vocab_size,
        "tokenizer": describe_tokenizer(lm.tokenizer),
        "tokenizer_size": len(lm.tokenizer),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
    }
