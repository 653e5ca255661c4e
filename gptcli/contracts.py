"""What gptcli needs of a tokenizer, a model config, a generation config and a decoder, and the records
that cross modules, declared once.

A loaded model carries either transformers' objects or gptcli.loading.gpt2_folder's
transformers-free stand-ins
(for plain GPT-2 folders, which then never import transformers). Everything outside those two modules
sees only these protocols, so mypy checks that nothing reaches for more than both provide. Code that
needs transformers' whole tokenizer API asks for it explicitly (`gpt2_folder.transformers_tokenizer`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

if TYPE_CHECKING:
    import torch


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

    @property
    def model_type(self) -> str: ...
    @property
    def architectures(self) -> list[str] | None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def num_attention_heads(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def bos_token_id(self) -> Any: ...
    @property
    def eos_token_id(self) -> Any: ...
    @property
    def pad_token_id(self) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...


class GenerationConfig(Protocol):
    """generation_config.json: the decoding defaults a model ships (each None when not set)."""

    @property
    def max_new_tokens(self) -> int | None: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def min_p(self) -> float | None: ...
    @property
    def repetition_penalty(self) -> float | None: ...
    @property
    def do_sample(self) -> bool | None: ...
    @property
    def stop_strings(self) -> Any: ...
    @property
    def eos_token_id(self) -> Any: ...


# Which implementation runs a loaded model: gptcli's own GPT-2 (gptcli.gpt2, `LoadedModel.net`) or a
# transformers PreTrainedModel (`LoadedModel.model`).
Runtime = Literal["gptcli", "transformers"]


class Decoder(Protocol):
    """A model run one step at a time over its KV cache, returning float32 logits of the new positions:
    gptcli.gpt2.CachedDecoder and gptcli.generation.decoding.KVStepper (gptcli.generation.decoding's
    `open_decoder` makes the right one)."""

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Feed the left-padded prompts [batch, n]; the logits of each row's last position [batch, vocab]."""
        ...

    def step(self, next_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row ([batch, 1]) at `position_ids` ([batch, 1]); logits [batch, vocab]."""
        ...

    def extend(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Feed several new tokens of one unpadded row ([1, n]); the logits of each [n, vocab]."""
        ...

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only (indices into the current batch)."""
        ...

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on: the next step writes at `length`."""
        ...


# --- Records that cross modules (plain dicts, so they are JSON as they are) ---------------------------


class TokenInfo(TypedDict):
    """A token as the --json outputs show it: its id, readable piece, and exact bytes in hex."""

    id: int
    token: str
    bytes: str


class TokenSpan(TokenInfo, total=False):
    """A token of a tokenized text, with the characters it covers when the tokenizer says
    (`start`/`end`: offsets into the text)."""

    start: int
    end: int


class TopLogprob(TokenInfo):
    """An alternative token and its logprob."""

    logprob: float


class LogprobEntry(TokenInfo):
    """A generated (or prompt) token's logprob and the most likely alternatives at its place
    (`complete --logprobs`, the server's logprobs)."""

    logprob: float
    top_logprobs: list[TopLogprob]


class Candidate(TokenInfo):
    """A ranked next-token candidate: `topk` counts ranks from 1, `step` from 0 (its keys)."""

    rank: int
    prob: float
    logprob: float


class ScoredToken(TokenInfo):
    """A token of a scored text (`score`): its logprob given the text before it, and its rank there
    (1: the most likely)."""

    logprob: float
    rank: int


class ComparedToken(TokenInfo):
    """A token of a text under two models (`compare`): each model's logprob, and KL(A‖B) at its place."""

    logprob_a: float
    logprob_b: float
    kl: float


class ComparedCandidate(TokenInfo):
    """A next-token candidate under two models (`compare`): each model's logprob and rank (1: first)."""

    logprob_a: float
    logprob_b: float
    rank_a: int
    rank_b: int
