"""The requests the server accepts: OpenAI's fields (and llama.cpp's extras), checked strictly.

Unknown fields are refused, as OpenAI refuses them; a wrong type is refused rather than converted
("5" is not 5); numbers must be finite. Fields OpenAI has and gptcli does not do (`best_of` other than
n, `suffix`, `tools`) are refused, so no request silently gets something other than what it asked for.

The decoding settings a request may set under their own name (top_k, presence_penalty...) are
generated from gptcli.generation.sampling.Settings, where each declares its server names and range.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from gptcli.errors import UsageError
from gptcli.generation.sampling import Settings, options, resolve_settings

if TYPE_CHECKING:
    from gptcli.contracts import GenerationConfig

MAX_CHOICES = 128  # prompts × n of one request
MAX_LOGPROBS = 100  # alternatives per token (OpenAI: 5 for completions, 20 for chat)
MAX_STOPS = 16
MAX_BIAS = 300  # logit_bias entries (OpenAI's limit)
# Most token entries one answer may hold: tokens generated or echoed, each with its alternatives
# (n × max_tokens × (1 + logprobs), over the prompts). 262,144 entries are about 8 MB of completions
# JSON (chat's are about 2.5 times bigger); lm-eval's loglikelihood batches of 64 full 1,024-token
# contexts with logprobs 1 take half of it.
MAX_OUTPUT = 2**18
MAX_PIECES = 2**16  # tokens /tokenize describes one by one (with_pieces): about 6 MB of JSON


class ApiError(Exception):
    """A request the server refuses: OpenAI's error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        # Every refusal names its reason for programs, as OpenAI's validation errors do.
        self.code = code if code is not None or status != 400 else "invalid_value"
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's; there is nothing to obfuscate here


class _Shared(_Strict):
    """What completions and chat completions share, but the settings generated from Settings."""

    model: str | None = None  # any name: the server has one model
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token ids (JSON keys) -> bias; checked by `logit_bias`
    ignore_eos: bool = False


def _setting_fields() -> dict[str, Any]:
    """A request field per server name of each decoding setting (top_p, seed: OpenAI's; top_k,
    min_p, repeat_penalty: llama.cpp's server's; repetition_penalty: vLLM's and transformers'),
    with the setting's range; None: not given."""
    hints = typing.get_type_hints(Settings)
    made: dict[str, Any] = {}
    for name, (how, _) in options().items():
        bare = [a for a in typing.get_args(hints[name]) if a is not type(None)] or [hints[name]]
        bounds = {k: v for k in ("ge", "gt", "le", "lt") if (v := getattr(how, k)) is not None}
        for api in how.api:
            made[api] = (bare[0] | None, Field(None, description=how.help, **bounds))
    return made


# A class built from the declarations: mypy sees its subclasses' own fields, and Any for these.
_Decoding = create_model("_Decoding", __base__=_Shared, **_setting_fields())


class CompletionRequest(_Decoding):  # type: ignore[misc,valid-type]
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Decoding):  # type: ignore[misc,valid-type]
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class TokenizeRequest(_Strict):
    """llama.cpp's fields (`content`, `add_special`, `with_pieces`) or vLLM's (`prompt`,
    `add_special_tokens`, `return_token_strs`): either text field, either flag."""

    content: str | None = None
    prompt: str | None = None
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    with_pieces: bool = False
    return_token_strs: bool = False
    model: str | None = None


class DetokenizeRequest(_Strict):
    tokens: list[int]
    model: str | None = None


# Union fields: one message for all the ways a value failed to be one of the types.
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts ({'type': 'text', 'text': ...})",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def parse(model: type[_Strict], body: dict[str, Any]) -> Any:
    """`body` as `model`, or ApiError(400) naming the first field that is wrong and why."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        path = [p for p in error["loc"] if not _is_type_tag(p)]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or None
        if error["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
            raise ApiError(400, message, param=param, code="unknown_parameter") from None
        if error["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
            raise ApiError(400, message, param=param, code="missing_required_parameter") from None
        name = str(path[-1]) if path and not isinstance(path[-1], int) else str(path[0]) if path else ""
        if len(error["loc"]) > len(path) and name in _EXPECTED:  # a union: say what it may be
            message = f"Invalid value for '{param}': expected {_EXPECTED[name]}."
        else:
            message = f"Invalid value for '{param}': {error['msg']} (got {_shown(error.get('input'))})."
        raise ApiError(400, message, param=param, code="invalid_value") from None


def _is_type_tag(part: object) -> bool:
    """Whether a location part names a member of a union (list[int], str, TextPart...), not a field."""
    if not isinstance(part, str):
        return False
    return "[" in part or part in _TYPE_TAGS or part[:1].isupper() or part.startswith("function-")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def unsupported(request: CompletionRequest | ChatRequest) -> None:
    """Refuse OpenAI fields that would ask for something gptcli does not do."""
    if isinstance(request, CompletionRequest):
        if request.best_of not in (None, 1, request.n):
            raise ApiError(
                400, "best_of is not supported (only best_of = n)", param="best_of", code="unsupported_value"
            )
        if request.suffix:
            raise ApiError(
                400,
                "suffix is not supported: GPT-2 models do not fill in the middle",
                param="suffix",
                code="unsupported_parameter",
            )
    if isinstance(request, ChatRequest) and request.tools:
        raise ApiError(
            400,
            "tools are not supported: gptcli serves language models without tool use",
            param="tools",
            code="unsupported_parameter",
        )
    for how, _ in options().values():  # a setting given under two names
        given = {api: value for api in how.api if (value := getattr(request, api)) is not None}
        if len(set(given.values())) > 1:
            first, second = list(given)[:2]
            raise ApiError(400, f"{first} and {second} differ: give one", param=first)


def logit_bias(request: CompletionRequest | ChatRequest, vocab: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids (as strings, JSON's keys) to a bias from -100 to 100."""
    if not request.logit_bias:
        return None
    if len(request.logit_bias) > MAX_BIAS:
        raise ApiError(400, f"logit_bias takes at most {MAX_BIAS} tokens", param="logit_bias")
    bias: dict[int, float] = {}
    for key, value in request.logit_bias.items():
        if not (key.isascii() and key.isdigit()) or not 0 <= int(key) < vocab:
            message = f"Invalid key in 'logit_bias': {_shown(key)} is not a token id (0 to {vocab - 1})."
            raise ApiError(400, message, param="logit_bias")
        if not -100 <= value <= 100:
            message = f"Invalid value in 'logit_bias': {value} for token {key} is not between -100 and 100."
            raise ApiError(400, message, param="logit_bias")
        bias[int(key)] = float(value)
    return bias


def stops(request: CompletionRequest | ChatRequest) -> tuple[str, ...]:
    values = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(values) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} texts (got {len(values)})", param="stop")
    if any(not s for s in values):
        raise ApiError(400, "stop texts must not be empty", param="stop")
    return tuple(values)


def settings(
    request: CompletionRequest | ChatRequest,
    generation_config: GenerationConfig | None,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    extra_stops: tuple[str, ...] = (),
) -> Settings:
    """The decoding Settings of a request, as `gptcli complete` would build them from the same values.

    Fields the request leaves out take gptcli's defaults, replaced by the model's generation_config.json,
    exactly as the CLI's flags do. `temperature: 0` means greedy; a temperature above 0 samples, even
    when generation_config.json makes greedy the default (as `--sample` would).
    """
    temperature = request.temperature
    flags: dict[str, Any] = {
        name: next((v for api in how.api if (v := getattr(request, api)) is not None), None)
        for name, (how, _) in options().items()
        if how.api
    }
    flags |= {
        "max_new_tokens": max_tokens or None,  # 0 (echo only) decodes nothing: any valid value
        "temperature": temperature if temperature else None,
        "greedy": None if temperature is None else temperature == 0,
        "stop": (stops(request) + extra_stops) or None,
        "ignore_eos": request.ignore_eos or None,
        "num_samples": request.n,
        "logprobs": logprobs,
    }
    try:
        return resolve_settings(generation_config, **flags)
    except UsageError as exc:  # a value in the model's generation_config.json that cannot work
        raise ApiError(400, str(exc)) from None
