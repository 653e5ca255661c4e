"""What gptcli needs of a tokenizer, a model config and a generation config, declared once.

A loaded model carries either transformers' objects or gptcli.gpt2_folder's transformers-free stand-ins
(for plain GPT-2 folders, which then never import transformers). Everything outside those two modules
sees only these protocols, so mypy checks that nothing reaches for more than both provide. Code that
needs transformers' whole tokenizer API asks for it explicitly (`gpt2_folder.transformers_tokenizer`).
"""

from __future__ import annotations

from typing import Any, Protocol


class Tokenizer(Protocol):
    """The tokenizer API gptcli uses: transformers' PreTrainedTokenizerBase and gpt2_folder.Tokenizer."""

    name_or_path: str

    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def unk_token_id(self) -> int | None: ...
    @property
    def sep_token_id(self) -> int | None: ...
    @property
    def pad_token_id(self) -> int | None: ...
    @property
    def cls_token_id(self) -> int | None: ...
    @property
    def all_special_ids(self) -> list[int]: ...

    def encode(self, text: str, *, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, token_ids: Any, *, skip_special_tokens: bool = ...) -> str: ...
    def convert_ids_to_tokens(self, ids: Any) -> Any: ...
    def get_vocab(self) -> dict[str, int]: ...
    def __len__(self) -> int: ...
    def __call__(
        self, text: Any, *, add_special_tokens: bool = ..., return_attention_mask: bool = ...
    ) -> Any: ...


class ModelConfig(Protocol):
    """config.json as gptcli reads it: transformers' PretrainedConfig and gpt2_folder.Config.

    Both answer the generic names (num_hidden_layers...) as well as GPT-2's own (n_layer...).
    """

    model_type: str
    architectures: list[str] | None
    vocab_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_size: int
    bos_token_id: Any
    eos_token_id: Any
    pad_token_id: Any

    def to_dict(self) -> dict[str, Any]: ...


class GenerationConfig(Protocol):
    """generation_config.json: the decoding defaults a model ships (each None when not set)."""

    max_new_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float | None
    do_sample: bool | None
    stop_strings: Any
    eos_token_id: Any
