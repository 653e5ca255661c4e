"""What a training run sets up before its loop: precision, the model and tokenizer, the data, FLOPs."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from gptcli.errors import GptcliError, UsageError, first_line
from gptcli.generation.tokens import unknown_token_id
from gptcli.loading.adapters import is_adapter_folder
from gptcli.loading.cpu import cpu_has_bf16
from gptcli.loading.models import (
    BUILTIN,
    as_contract,
    check_model_folder,
    context_length,
    is_hub_id,
    load_tokenizer,
    refuse_remote_code,
    resolve,
    resolve_device,
    resolve_dtype,
)
from gptcli.training.config import TrainConfig
from gptcli.training.data import BatchOrder, Blocks, make_blocks, prepare_tokens, split_validation
from gptcli.training.distributed import Dist
from gptcli.training.instruct import (
    Examples,
    is_instruction_file,
    make_examples,
    read_examples,
    split_examples,
)

Rows = Blocks | Examples
"""Training or validation rows: packed text blocks, or instruction examples."""

# Config attributes that hold dropout probabilities, across the causal LMs transformers ships.
_DROPOUT_FIELDS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout",
    "attention_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "embed_dropout",
    "resid_dropout",
    "dropout",
)
# Defaults of a --from-scratch model: nanoGPT's "baby GPT" (about 10M parameters with GPT-2's vocabulary).
SCRATCH_DEFAULTS = {"n_layer": 6, "n_head": 6, "n_embd": 384, "context": 256}
# Dense bf16 tensor-core peaks (FLOP/s) for MFU, matched against torch.cuda.get_device_name().
_PEAK_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


@dataclass
class TrainData:
    """The training rows and the order in which samples are drawn from them."""

    blocks: Rows
    order: BatchOrder


def resolve_precision(spec: str, device: torch.device) -> torch.dtype:
    """auto|fp32|bf16|fp16 -> the autocast dtype (float32 means no autocast)."""
    dtype = resolve_dtype(spec, device)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GptcliError("this GPU has no bf16 support: use --precision fp16 (or fp32)")
    return dtype


def precision_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """A warning when bf16 autocast is asked for on a CPU without bf16 instructions, where it is
    emulated and many times slower than fp32; else None."""
    if device.type != "cpu" or dtype != torch.bfloat16 or cpu_has_bf16() is not False:
        return None
    return (
        "this CPU has no bf16 instructions (avx512_bf16 or amx_bf16), so bf16 autocast is emulated, many "
        "times slower than fp32 (docs/training.md has the figures): --precision fp32 trains faster here"
    )


def build_model(cfg: TrainConfig) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, str | None]:
    """The tokenizer and fp32 model to train (a pretrained one loaded safely, or new random weights),
    and a notice for the user when the default model had to stand in.

    The tokenizer is always transformers' (not gptcli.loading.gpt2_folder's stand-in): the run ends by saving
    it with the model, which only transformers' tokenizer does.
    """
    if cfg.from_scratch:
        _, path, notice = resolve(cfg.tokenizer or cfg.model)
        if not cfg.trust_remote_code:
            refuse_remote_code(path)  # a tokenizer with its own code (auto_map) runs only if trusted
        tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
        config = scratch_config(cfg, tokenizer)
        check_model_fits(config, cfg.device)
        return tokenizer, AutoModelForCausalLM.from_config(config, dtype=torch.float32), notice

    _, path, notice = resolve(cfg.model, allow_pickle=cfg.allow_pickle)
    if is_adapter_folder(path):  # else check_model_folder calls it "not a model folder", no way out
        raise UsageError(
            f"{path} is a LoRA adapter, not a model: merge it first (gptcli merge {path} -o FOLDER), "
            "then fine-tune FOLDER"
        )
    safetensors = check_model_folder(
        path, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code
    )
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:
        raise GptcliError(f"could not read {path / 'config.json'}: {first_line(exc)}") from exc
    _set_dropout(config, cfg.dropout)
    try:
        # Master weights in fp32 whatever the checkpoint holds: autocast does the low-precision compute.
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=torch.float32,
            local_files_only=True,
            use_safetensors=safetensors,
            trust_remote_code=cfg.trust_remote_code,
        )
    except Exception as exc:
        weights = next(iter(sorted(path.glob("*.safetensors"))), path / "pytorch_model.bin")
        raise GptcliError(f"could not load the model weights from {weights}: {first_line(exc)}") from exc
    if cfg.lora_rank:
        name = cfg.model or "builtin"
        # A local folder wins over a hub id of the same shape ("models/tiny"): record it absolute, so
        # the adapter still finds its base when used from another directory.
        from_hub = is_hub_id(name) and name != BUILTIN and not Path(name).is_dir()
        base = name if from_hub else str(path.resolve())
        return tokenizer, add_lora(model, cfg, base), notice
    return tokenizer, model, notice


def add_lora(model: PreTrainedModel, cfg: TrainConfig, base: str) -> PreTrainedModel:
    """`model` wrapped by PEFT with LoRA adapters on --lora-targets; only the adapters train.

    `base` (a hub id or an absolute folder) is recorded in adapter_config.json as the base model, so
    `-m OUT` and PEFT's AutoPeftModel find it offline. GPT-2's Conv1D layers store their weight
    transposed (in, out), hence fan_in_fan_out for them.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    leaves = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()}
    missing = [t for t in cfg.targets if t not in leaves]
    if missing:
        layers = sorted(n for n, m in leaves.items() if isinstance(m, torch.nn.Linear | Conv1D))
        raise UsageError(
            f"--lora-targets {', '.join(missing)}: no such module in this model "
            f"(its layers: {', '.join(layers)})"
        )
    fan_in_fan_out = {isinstance(leaves[t], Conv1D) for t in cfg.targets}
    if len(fan_in_fan_out) > 1:
        raise UsageError("--lora-targets mixes Conv1D and Linear layers: adapt one kind per run")
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cast(
            int, cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank
        ),  # a float works
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.targets,
        fan_in_fan_out=fan_in_fan_out.pop(),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # PEFT asks transformers about a deprecated name (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base  # PEFT fills in the config's path
    return cast(PreTrainedModel, peft_model)


def memory_bytes(device: torch.device | str) -> int | None:
    """The most memory a run on `device` can have: the GPU's, else this machine's RAM (None: unknown)."""
    device = torch.device(device) if isinstance(device, str) else device
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on every OS
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n < 1e15 else f"{n / 1e9:.2g} GB"


def check_model_fits(config: PretrainedConfig, device: str) -> None:
    """Refuse a new model whose weights, gradients and AdamW moments (16 bytes a parameter in fp32)
    cannot fit in memory, before building it: a slip like --n-layer 1000000 would otherwise allocate
    for minutes (or loop for ever over the layers) before failing."""
    limit = memory_bytes(resolve_device(device))
    width = getattr(config, "hidden_size", 0) or 0
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width
    positions = getattr(config, "max_position_embeddings", 0) or 0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    params = layers * (4 * width * width + 2 * width * inner) + (config.vocab_size + positions) * width
    if limit is not None and 16 * params > limit:
        raise UsageError(
            f"a model of {params:.3g} parameters needs about {_gb(16 * params)} to train (weights, "
            f"gradients and AdamW moments in fp32), more than the {_gb(limit)} of memory here: "
            "pick a smaller --n-layer, --n-embd or --context"
        )


def check_batch_fits(batch_size: int, block_size: int, vocab_size: int, device: torch.device) -> None:
    """Refuse a --batch-size whose logits alone (and their gradient) cannot fit in memory."""
    limit = memory_bytes(device)
    need = 8 * batch_size * block_size * vocab_size
    if limit is not None and need > limit:
        raise UsageError(
            f"--batch-size {batch_size} with blocks of {block_size} tokens needs {_gb(need)} for the "
            f"logits of a {vocab_size:,}-token vocabulary and their gradient alone, more than the "
            f"{_gb(limit)} of memory here: lower --batch-size (and raise --grad-accum to keep the "
            "global batch)"
        )


def scratch_config(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The config of a new model: --config JSON (or GPT-2's), then --n-layer/--n-head/--n-embd/--context."""
    values: dict[str, Any] = {}
    if cfg.model_config is not None:
        values = _read_config(cfg.model_config, cfg.trust_remote_code)
    model_type = values.pop("model_type", "gpt2")
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{cfg.model_config}: {exc}") from exc
    # Generic names: transformers maps them onto n_layer/n_head/n_embd/n_positions for GPT-2.
    sizes = {
        "num_hidden_layers": ("n_layer", cfg.n_layer),
        "num_attention_heads": ("n_head", cfg.n_head),
        "hidden_size": ("n_embd", cfg.n_embd),
        "max_position_embeddings": ("context", cfg.context),
    }
    for attribute, (option, value) in sizes.items():
        if value is not None:
            setattr(config, attribute, value)
        elif cfg.model_config is None:
            setattr(config, attribute, SCRATCH_DEFAULTS[option])
    if config.hidden_size % config.num_attention_heads:
        raise UsageError(
            f"--n-embd {config.hidden_size} must be a multiple of --n-head {config.num_attention_heads}"
        )
    if not values.get("vocab_size"):
        config.vocab_size = len(tokenizer)
    elif config.vocab_size < len(tokenizer):
        raise UsageError(
            f"vocab_size {config.vocab_size} in {cfg.model_config} is below the tokenizer's {len(tokenizer)}"
        )
    # The tokenizer's special ids, unless the JSON names them: GPT2Config's defaults (50256) would point
    # outside any vocabulary but GPT-2's own.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in values:
            setattr(config, key, getattr(tokenizer, key))
    # Dropout helps fine-tuning on little data; training from zero on a corpus learns faster without it.
    _set_dropout(config, 0.0 if cfg.dropout is None and cfg.model_config is None else cfg.dropout)
    return config


def _read_config(path: Path, trust_remote_code: bool) -> dict[str, Any]:
    try:
        values = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read --config {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a JSON object")
    if values.get("auto_map") and not trust_remote_code:
        raise GptcliError(
            f"{path} asks to run its own Python code (auto_map); pass --trust-remote-code to allow it"
        )
    return values


def _set_dropout(config: PretrainedConfig, p: float | None) -> None:
    if p is None:
        return
    for name in _DROPOUT_FIELDS:
        if isinstance(getattr(config, name, None), float | int) and not isinstance(
            getattr(config, name), bool
        ):
            setattr(config, name, p)


def eos_id(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> int:
    """The token put after every document: the tokenizer's EOS, else the model's, else the separator."""
    for candidate in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None), tokenizer.sep_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int):
            return candidate
    raise GptcliError("the tokenizer has no end-of-text (EOS) token to put between documents")


def load_data(
    cfg: TrainConfig, ddp: Dist, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, out: Path
) -> tuple[TrainData, Rows | None, list[str]]:
    """Tokenize (rank 0, once; cached in OUTDIR/data) and pack the data; return train, val and notes."""
    context = context_length(config)
    block_size = cfg.block_size or min(context, 1024)
    if block_size > context:
        raise UsageError(
            f"--block-size {block_size} is longer than the model's context ({context} positions)"
        )
    check_batch_fits(cfg.batch_size, block_size, config.vocab_size, ddp.device)
    eos = eos_id(tokenizer, config)
    kinds = {is_instruction_file(path, cfg.text_field) for path in cfg.data + cfg.val}
    if len(kinds) > 1:
        raise UsageError(
            "the data mixes instruction JSONL (prompt/completion or messages) with plain text: give one kind"
        )
    if kinds == {True}:
        return load_examples(cfg, tokenizer, eos, block_size)
    cache = ddp.on_main(
        lambda: prepare_tokens(cfg.data, cfg.val, tokenizer, eos, out / "data", text_field=cfg.text_field)
    )
    notes = []
    tokens = cache.open("train")
    if cache.reused:
        notes.append(f"reusing the tokenized data in {cache.folder} ({len(tokens):,} tokens)")
    else:
        documents = f"{cache.documents:,} document{'s' if cache.documents != 1 else ''}"
        notes.append(f"tokenized {documents}: {len(tokens):,} tokens")
    blocks = make_blocks(tokens, block_size, "training")
    # Block i holds tokens i*B .. i*B+B (B+1 of them, one shared with the next); what is left at the end
    # is the short final block's (data.make_blocks).
    left_over = (len(tokens) - 1) % block_size
    val: Blocks | None = None
    if cfg.val:
        val = make_blocks(cache.open("val"), block_size, "validation")
    elif cfg.val_split > 0:
        blocks, val = split_validation(blocks, cfg.val_split)
        if val is None:
            notes.append(
                f"no validation loss: {len(blocks)} blocks of {block_size} tokens are too few to hold out "
                f"{cfg.val_split:g} of them (pass --val FILE)"
            )
    held = f" + {len(val)} validation" if val is not None else ""
    plural = "s" if len(blocks) + (len(val) if val is not None else 0) != 1 else ""
    notes.append(
        f"{len(blocks)} training{held} block{plural} of {block_size} tokens"
        + (f"; the last {left_over:,} tokens make a short final block" if left_over else "")
    )
    unknown = unknown_share(tokens, tokenizer)
    if unknown >= 0.01:
        notes.append(
            f"{unknown:.0%} of the training tokens are the unknown token {tokenizer.unk_token} (text "
            "this tokenizer cannot spell, such as English for a Chinese character vocabulary): the model "
            "will learn to write it; a tokenizer that covers the text (-m, or --from-scratch --tokenizer) "
            "avoids that"
        )
    return TrainData(blocks, BatchOrder(len(blocks), cfg.seed)), val, notes


def load_examples(
    cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, eos: int, block_size: int
) -> tuple[TrainData, Examples | None, list[str]]:
    """Instruction data, tokenized in memory on every process (instruction sets are small; the same
    input gives every process the same rows)."""
    train = make_examples(
        read_examples(cfg.data),
        tokenizer,
        eos,
        block_size,
        pack=cfg.pack,
        train_on_prompt=cfg.train_on_prompt,
    )
    val: Examples | None = None
    if cfg.val:
        val = make_examples(
            read_examples(cfg.val),
            tokenizer,
            eos,
            block_size,
            pack=cfg.pack,
            train_on_prompt=cfg.train_on_prompt,
        )
    elif cfg.val_split > 0:
        train, val = split_examples(train, cfg.val_split)
    layout = f"packed into {len(train)} rows of {block_size}" if cfg.pack else f"{len(train)} padded rows"
    held = f" (+ {len(val)} validation rows)" if val is not None else ""
    trained = "all trained on (--train-on-prompt)" if cfg.train_on_prompt else "the answers' trained on"
    notes = [
        f"{len(train.examples):,} instruction examples: {train.tokens:,} tokens, {train.targets:,} of them "
        f"{trained}; {layout}{held}"
    ]
    if train.truncated:
        notes.append(
            f"{train.truncated} examples are longer than --block-size {block_size}: their ends are cut"
        )
    return TrainData(train, BatchOrder(len(train), cfg.seed)), val, notes


def unknown_share(tokens: np.ndarray, tokenizer: PreTrainedTokenizerBase) -> float:
    """The fraction of `tokens` that are the unknown token (`unknown_token_id`: 0 where there is no
    real one)."""
    unk = unknown_token_id(as_contract(tokenizer))
    if unk is None or not len(tokens):
        return 0.0
    return int(np.count_nonzero(tokens == unk)) / len(tokens)


def model_flops_per_token(config: PretrainedConfig, params: int, block_size: int) -> float:
    """Training FLOPs per token, as in nanoGPT (PaLM appendix B): 6N + 12·layers·width·context."""
    layers = getattr(config, "num_hidden_layers", 0) or 0
    width = getattr(config, "hidden_size", 0) or 0
    return 6 * params + 12 * layers * width * block_size


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, for MFU; None off CUDA (MFU means little on a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16:
        if key in name:
            return flops
    return 312e12  # unknown GPU: report against an A100, as nanoGPT does
