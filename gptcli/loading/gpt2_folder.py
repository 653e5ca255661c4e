"""Plain GPT-2 folders read without transformers: config.json, generation_config.json, tokenizer.json.

`import transformers` takes longer than loading GPT-2's weights (it indexes every model it ships:
docs/performance.md has the figures); `gptcli complete` on a plain GPT-2 otherwise needs only torch
and `tokenizers`. For a folder that gptcli.gpt2 runs and whose tokenizer.json is byte-level BPE that
transformers would use unchanged, these small classes stand in for transformers' config, generation
config and tokenizer, with the attributes and methods gptcli uses and the same values (tests compare
them with transformers' on the fixtures and the built-in model). Anything else, or anything unusual in
those files, returns None from `load`, and the folder goes through transformers as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcli.gpt2 import GPT2Config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from gptcli.contracts import Tokenizer as TokenizerLike

# tokenizer_class values under which transformers keeps tokenizer.json's byte-level BPE as it is.
_GPT2_TOKENIZERS = {"GPT2Tokenizer", "GPT2TokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend"}
# The GPT-2 classes' own defaults for tokens the config does not name.
_GPT2_SPECIALS = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys that can change what transformers builds, each with the values that change
# nothing (what the GPT-2 classes do anyway, and what transformers 5's save_pretrained writes for every
# GPT-2 tokenizer): a folder with any other value is left to transformers. add_prefix_space: false must
# also agree with tokenizer.json's pre-tokenizer (_plain_byte_level), clean_up_tokenization_spaces is
# ignored for BPE unless the flag that forces it is set.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "add_prefix_space": (False,),
    "add_bos_token": (False,),
    "add_eos_token": (False,),
    "split_special_tokens": (False,),
    "errors": ("replace",),
    "extra_special_tokens": ([], {}),
    "additional_special_tokens": ([],),
    "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": (False,),
}
_UNUSUAL = ("auto_map",)


class Config:
    """config.json of a plain GPT-2: its values, with GPT2Config's defaults for missing keys, under GPT-2's
    names and the generic ones (num_hidden_layers...), as transformers' GPT2Config answers them.

    A name config.json may hold but gptcli does not use is not an attribute: a misspelt name in gptcli's
    code is an AttributeError, not a silent None.
    """

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = dict(values)
        get = values.get
        self.model_type: str = get("model_type", "gpt2")
        self.architectures: list[str] | None = get("architectures")
        self.vocab_size: int = get("vocab_size", 50257)
        self.n_positions: int = get("n_positions", 1024)
        self.n_embd: int = get("n_embd", 768)
        self.n_layer: int = get("n_layer", 12)
        self.n_head: int = get("n_head", 12)
        self.layer_norm_epsilon: float = get("layer_norm_epsilon", 1e-5)
        self.bos_token_id: int | None = get("bos_token_id", 50256)
        self.eos_token_id: int | None = get("eos_token_id", 50256)
        self.pad_token_id: int | None = get("pad_token_id")

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)


class GenerationConfig:
    """generation_config.json; without one, config.json's token ids (GenerationConfig.from_model_config).

    Every setting gptcli reads is an attribute, None when the file does not set it (as in transformers 5).
    """

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = dict(values)
        get = values.get
        self.max_new_tokens: int | None = get("max_new_tokens")
        self.temperature: float | None = get("temperature")
        self.top_k: int | None = get("top_k")
        self.top_p: float | None = get("top_p")
        self.min_p: float | None = get("min_p")
        self.repetition_penalty: float | None = get("repetition_penalty")
        self.do_sample: bool | None = get("do_sample")
        self.stop_strings: Any = get("stop_strings")
        self.bos_token_id: Any = get("bos_token_id")
        self.eos_token_id: Any = get("eos_token_id")
        self.pad_token_id: Any = get("pad_token_id")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, with the special tokens of tokenizer_config.json.

    The tokenizer API gptcli uses (gptcli.contracts.Tokenizer), with transformers' results. For the rest
    of transformers' API, ask for `transformers_tokenizer()`: transformers' tokenizer of the same folder,
    loaded (and transformers imported) on that call. Calls with options this class does not take
    (`return_tensors=...`, padding) are handed to it the same way.
    """

    def __init__(self, path: Path, backend: Any, specials: dict[str, str | None], class_name: str) -> None:
        self.backend_tokenizer = backend
        self.name_or_path = str(path)
        self.class_name = class_name  # what `gptcli info` reports: the class transformers would build
        self._specials = specials
        self._full: PreTrainedTokenizerBase | None = None

    def transformers_tokenizer(self) -> PreTrainedTokenizerBase:
        """transformers' tokenizer of the same folder (imports transformers on the first call)."""
        if self._full is None:
            from gptcli.loading.models import load_tokenizer

            self._full = load_tokenizer(Path(self.name_or_path))
        return self._full

    def _id(self, role: str) -> int | None:
        token = self._specials.get(role)
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))
    sep_token_id = property(lambda self: self._id("sep_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    cls_token_id = property(lambda self: self._id("cls_token"))
    mask_token_id = property(lambda self: self._id("mask_token"))  # (transformers' API, tested equal)

    @property
    def all_special_ids(self) -> list[int]:
        tokens = dict.fromkeys(t for role in _ROLES if (t := self._specials.get(role)) is not None)
        return [i for t in tokens if (i := self.backend_tokenizer.token_to_id(t)) is not None]

    def __call__(
        self,
        text: str | list[str],
        *,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        **more: Any,
    ) -> Any:
        """{"input_ids": ids (a list of them for a list of texts), "attention_mask": ones alike}."""
        if more:  # tensors, padding, truncation...: transformers' tokenizer does all that
            options = {
                "add_special_tokens": add_special_tokens,
                "return_attention_mask": return_attention_mask,
            }
            return self.transformers_tokenizer()(text, **options, **more)
        ids: Any
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens=add_special_tokens)
            mask: Any = [1] * len(ids)
        else:
            encodings = self.backend_tokenizer.encode_batch(text, add_special_tokens=add_special_tokens)
            ids = [e.ids for e in encodings]
            mask = [[1] * len(row) for row in ids]
        return {"input_ids": ids, "attention_mask": mask} if return_attention_mask else {"input_ids": ids}

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode does not): a server tokenizing a long
        # prompt in a worker thread keeps answering (16 prompts of 2 MB stalled it 29 s), and it is as fast.
        ids: list[int] = self.backend_tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[
            0
        ].ids
        return ids

    def decode(self, token_ids: int | Iterable[int], *, skip_special_tokens: bool = False) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        text: str = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> Any:
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = self.backend_tokenizer.get_vocab(with_added_tokens=True)
        return vocab

    def __len__(self) -> int:
        return int(self.backend_tokenizer.get_vocab_size(with_added_tokens=True))


def _json(path: Path) -> dict[str, Any] | None:
    """The object in `path`; None when it is missing or not an object (transformers then reports it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's fields."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: Path, config: dict[str, Any] | None = None) -> Tokenizer | None:
    """The folder's tokenizer without transformers, or None when transformers is needed for it."""
    has_config = (path / "tokenizer_config.json").exists()
    tokenizer_config = _json(path / "tokenizer_config.json") if has_config else {}
    if tokenizer_config is None:
        return None
    # Without added_tokens_decoder (folders from transformers 4), transformers reads the legacy
    # special_tokens_map.json, whose tokens replace tokenizer_config.json's.
    if (path / "special_tokens_map.json").exists() and "added_tokens_decoder" not in tokenizer_config:
        legacy = _json(path / "special_tokens_map.json")
        if legacy is None:
            return None
        tokenizer_config = {**tokenizer_config, **legacy}
    if config is None:
        config = _json(path / "config.json") or {}
    # AutoTokenizer's order: tokenizer_config.json's class, config.json's, then the model type's.
    class_name: str | None = tokenizer_config.get("tokenizer_class") or config.get("tokenizer_class")
    if class_name is None:
        if config.get("model_type") != "gpt2":
            return None
        class_name = "GPT2Tokenizer"
    if class_name not in _GPT2_TOKENIZERS or any(key in tokenizer_config for key in _UNUSUAL):
        return None
    if any(key in tokenizer_config and tokenizer_config[key] not in ok for key, ok in _NEUTRAL.items()):
        return None
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path / "tokenizer.json"))
    except Exception:  # transformers will say what is wrong with it
        return None
    if not _plain_byte_level(backend, rebuilt=class_name.startswith("GPT2")):
        return None
    # transformers truncates or pads only when asked, whatever tokenizer.json stored.
    backend.no_truncation()
    backend.no_padding()
    specials: dict[str, str | None] = dict(_GPT2_SPECIALS) if class_name.startswith("GPT2") else {}
    for role in _ROLES:
        if role in tokenizer_config:
            specials[role] = _token(tokenizer_config[role])
    # transformers adds every named special token as a special token; here each must already be one.
    added = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    if any(token is not None and token not in added for token in specials.values()):
        return None
    # The name of the class transformers 5 builds for it.
    shown = "GPT2Tokenizer" if class_name.startswith("GPT2") else "TokenizersBackend"
    return Tokenizer(path, backend, specials, shown)


def _plain_byte_level(backend: Any, *, rebuilt: bool) -> bool:
    """Byte-level BPE that transformers uses as it is. `rebuilt`: the GPT-2 classes keep only the
    vocabulary, merges and post-processor, and build a default BPE and pre-tokenizer around them, so
    anything else in the file must be those defaults."""

    def spec(part: Any) -> dict[str, Any]:  # a component's JSON, as in tokenizer.json
        return {} if part is None else json.loads(part.__getstate__())

    model, pre, post, decoder = (
        backend.model,
        spec(backend.pre_tokenizer),
        spec(backend.post_processor),
        spec(backend.decoder),
    )
    plain_post = post.get("type") in (None, "ByteLevel") or (
        post.get("type") == "TemplateProcessing"
        and not post.get("special_tokens")
        and post.get("single") == [{"Sequence": {"id": "A", "type_id": 0}}]
    )
    default_bpe = not (
        model.byte_fallback
        or model.fuse_unk
        or model.ignore_merges
        or model.continuing_subword_prefix
        or model.end_of_word_suffix
        or not pre.get("use_regex", True)
    )
    return (
        type(model).__name__ == "BPE"
        and model.dropout is None
        and backend.normalizer is None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and decoder.get("type") == "ByteLevel"
        and plain_post
        and (default_bpe or not rebuilt)
    )


def _sound_shape(shape: GPT2Config | None) -> bool:
    if shape is None:
        return False
    sizes = (shape.n_layer, shape.n_head, shape.n_embd, shape.n_inner, shape.n_positions, shape.vocab_size)
    return (
        all(type(n) is int and n > 0 for n in sizes)
        and shape.n_embd % shape.n_head == 0
        and type(shape.layer_norm_epsilon) in (int, float)
    )


def load(path: Path) -> tuple[Config, GenerationConfig, Tokenizer] | None:
    """(config, generation config, tokenizer) of a plain GPT-2 folder without transformers, or None."""
    raw = _json(path / "config.json")
    if raw is None or raw.get("auto_map") or not _sound_shape(GPT2Config.from_config(raw)):
        return None  # transformers' own checks then name what is wrong in config.json
    if not (path / "model.safetensors").is_file():
        return None
    tokenizer = load_tokenizer(path, raw)
    if tokenizer is None:
        return None
    config = Config(raw)
    if (path / "generation_config.json").exists():
        generation = _json(path / "generation_config.json")
        if generation is None:
            return None
    else:
        generation = {
            key: getattr(config, key)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(config, key) is not None
        }
    return config, GenerationConfig(generation), tokenizer


def transformers_tokenizer(tokenizer: TokenizerLike) -> PreTrainedTokenizerBase:
    """transformers' own tokenizer: `tokenizer` itself, or the one the stand-in was made from."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.transformers_tokenizer()
    return tokenizer  # type: ignore[return-value]
