"""LoRA adapter folders (HF PEFT's format, as `gptcli finetune --lora-rank` writes them): find the base
model they adapt, merge them into its weights in memory, or write the merged model as a plain folder.

An adapter folder holds adapter_config.json (with `base_model_name_or_path`: a hub id that resolves
from the cache offline, or a folder) and adapter_model.safetensors (lora_A and lora_B of each adapted
layer). The in-memory merge is LoRA's own definition, W + (alpha / r) B A (transposed for GPT-2's
Conv1D, `fan_in_fan_out`), done once at load in fp32, so gptcli's GPT-2 runs an adapted model at the
base's speed; `merge_adapter` goes through PEFT's `merge_and_unload`, the reference.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.errors import GptcliError, UsageError, first_line

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class Adapter:
    """A LoRA adapter folder and the base model folder it adapts."""

    path: Path
    base: Path
    config: dict[str, Any]

    @property
    def scale(self) -> float:
        r, alpha = int(self.config["r"]), float(self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def find_adapter(path: Path) -> Adapter | None:
    """The adapter in folder `path` and its base model's folder; None when `path` holds no adapter.

    Raises GptcliError for an adapter gptcli cannot run (not LoRA, DoRA, extra trained modules) or
    whose base cannot be found.
    """
    if not is_adapter_folder(path):
        return None
    from gptcli.loading.models import resolve_model_path  # (models imports this module)

    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptcliError(f"{file} is not valid JSON: {first_line(exc)}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise GptcliError(
            f"{file} is not a LoRA adapter (peft_type {config.get('peft_type')!r}): gptcli runs LoRA"
        )
    unsupported = [
        key
        for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")
        if config.get(key)
    ]
    if unsupported or config.get("bias", "none") != "none":
        what = ", ".join(unsupported) or "bias"
        raise GptcliError(f"{file} uses {what}, which gptcli does not merge: load it with PEFT itself")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise GptcliError(f"no {ADAPTER_WEIGHTS} in {path}: the adapter's weights are missing")
    base_name = config.get("base_model_name_or_path")
    if not isinstance(base_name, str) or not base_name:
        raise GptcliError(f"{file} names no base model (base_model_name_or_path)")
    try:
        base = resolve_model_path(base_name)
    except GptcliError as exc:
        raise GptcliError(f"the base model of the adapter in {path} cannot be found: {exc}") from exc
    if is_adapter_folder(base):
        raise GptcliError(f"the base model of {path} ({base}) is itself an adapter: merge it first")
    return Adapter(path, base, config)


def merge_into(adapter: Adapter, weights: dict[str, torch.Tensor]) -> None:
    """Replace each adapted weight in `weights` (the base's tensors, by name) by W + scale·B·A, in fp32;
    the base's tensors themselves are not written to (they may be the file's mapping)."""
    from safetensors.torch import load_file

    lora = load_file(adapter.path / ADAPTER_WEIGHTS)
    merged = {}
    for key in sorted(lora):
        if key.endswith(".lora_B.weight"):
            continue
        if not key.endswith(".lora_A.weight"):
            raise GptcliError(f"{adapter.path / ADAPTER_WEIGHTS} holds {key}, which is not a LoRA weight")
        module = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        b = lora.get(key.replace(".lora_A.", ".lora_B."))
        name = next((n for n in _names(module) if n in weights), None)
        if b is None or name is None:
            raise GptcliError(
                f"the adapter in {adapter.path} does not fit its base {adapter.base} ({module})"
            )
        delta = (b.float() @ lora[key].float()) * adapter.scale  # (out, in)
        if adapter.config.get("fan_in_fan_out"):
            delta = delta.T  # GPT-2's Conv1D keeps its weight as (in, out)
        if delta.shape != weights[name].shape:
            raise GptcliError(
                f"the adapter in {adapter.path} does not fit its base {adapter.base}: {module} is "
                f"{tuple(weights[name].shape)}, the update {tuple(delta.shape)}"
            )
        merged[name] = weights[name].float() + delta
    weights.update(merged)


def _names(module: str) -> list[str]:
    """A module's weight as checkpoints name it: with or without transformers' "transformer." prefix."""
    bare = module.removeprefix("transformer.")
    return [f"{module}.weight", f"{bare}.weight", f"transformer.{bare}.weight"]


def load_merged_transformers_model(adapter: Adapter, dtype: torch.dtype) -> Any:
    """The base as transformers' model with the adapter merged by PEFT (merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gptcli.loading.models import check_model_folder

    check_model_folder(adapter.base, allow_pickle=False, trust_remote_code=False)
    from transformers.utils import logging

    logging.set_verbosity_error()  # no progress bars or advice on our stderr
    logging.disable_progress_bar()
    try:
        base = AutoModelForCausalLM.from_pretrained(
            adapter.base, dtype=dtype, local_files_only=True, use_safetensors=True
        )
        with warnings.catch_warnings():  # PEFT asks transformers about a deprecated name (FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(base, adapter.path, is_trainable=False).merge_and_unload()
    except Exception as exc:
        raise GptcliError(
            f"could not load the adapter in {adapter.path} onto {adapter.base}: {first_line(exc)}"
        ) from exc
    model.eval()
    return model


def merge_adapter(path: Path, out: Path) -> Path:
    """Write the base model with the adapter in `path` merged into it as a plain model folder `out`
    (model.safetensors in fp32, config, generation config and tokenizer), which transformers and gptcli
    load like any other. Refuses an `out` that exists and is not empty; writes nothing on failure."""
    import torch

    from gptcli.loading.models import load_tokenizer

    adapter = find_adapter(path)
    if adapter is None:
        raise UsageError(f"no LoRA adapter in {path}: expected {path / ADAPTER_CONFIG}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty: pick another -o folder")
    model = load_merged_transformers_model(adapter, torch.float32)
    tokenizer_home = path if any(path.glob("tokenizer*")) else adapter.base
    tokenizer = load_tokenizer(tokenizer_home)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(temp, safe_serialization=True)
        tokenizer.save_pretrained(temp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(temp, out)
    except OSError as exc:
        raise GptcliError(f"could not write {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out
