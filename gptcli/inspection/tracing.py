"""One forward pass of a prompt with the residual stream and the attention weights reported on the way.

What `gptcli lens` and `gptcli attention` stand on, for both kinds of model gptcli runs:
- gptcli's own GPT-2 (`lm.net`): `gpt2.trace`, a copy of its forward loop with the reports added;
- transformers models (`lm.net` is None): forward hooks on the model's blocks. Each block's raw output
  is taken from the block itself: `output_hidden_states` puts the final LayerNorm's output in its last
  slot, which the final LayerNorm must not normalise a second time.

Attention weights are the eager ones (softmax of the scaled scores), as transformers' eager attention
computes them; under its default SDPA the model never forms them, so a transformers model is switched
to eager for the pass and back after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gptcli.batching import fit_context
from gptcli.errors import GptcliError, UsageError
from gptcli.generation.tokens import TokenText, encode_prompt

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import TokenInfo
    from gptcli.loading.models import LoadedModel

# Where the parts of a decoder live in transformers' causal LMs, by the names their classes use.
_LAYERS = ("h", "layers", "blocks", "layer")
_FINAL_NORM = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "final_norm")
_ATTENTION = ("attn", "self_attn", "attention")
_MLP_NORM = ("ln_2", "post_attention_layernorm")  # its input: the stream after attention, before the MLP

PointFn = Callable[[int, str, "torch.Tensor"], None]
AttentionFn = Callable[[int, "torch.Tensor"], None]


@dataclass
class Prompt:
    """A prompt as the model sees it: its ids (cut to the context) and what each token stands for."""

    text: str
    ids: list[int]
    tokens: list[TokenInfo]
    dropped: int  # tokens cut from the left to fit the context


def encode(lm: LoadedModel, text: str) -> Prompt:
    """The prompt's ids as `topk` feeds them (start token for an empty prompt), its last `context` ones."""
    ids, dropped = fit_context(encode_prompt(lm.tokenizer, text), lm.context_length)
    names = TokenText(lm.tokenizer)
    return Prompt(text, ids, [names.describe(i) for i in ids], dropped)


def num_layers(lm: LoadedModel) -> int:
    return lm.net.config.n_layer if lm.net is not None else len(_parts(lm.model)[0])


def num_heads(lm: LoadedModel) -> int:
    return lm.net.config.n_head if lm.net is not None else int(lm.config.num_attention_heads)


def run(
    lm: LoadedModel,
    ids: list[int],
    on_point: PointFn,
    *,
    on_attention: AttentionFn | None = None,
    attention_rows: list[int] | None = None,
) -> None:
    """Run the model on `ids` once, calling `on_point(layer, point, x)` for the residual stream x
    [1, positions, width] at each point (layer 0 "embeddings"; for block L = 1..n "attention", then
    "block") and `on_attention(layer, weights)` with block L's weights [1, heads, rows, positions] for
    the query positions `attention_rows` (all when None).
    """
    import torch

    input_ids = torch.tensor([ids], device=lm.device)
    rows = None if attention_rows is None else torch.tensor(attention_rows, device=lm.device)
    with torch.inference_mode():
        if lm.net is not None:
            from gptcli.gpt2 import trace

            trace(lm.net, input_ids, on_point, on_attention=on_attention, attention_rows=rows)
        else:
            _run_transformers(lm.model, input_ids, on_point, on_attention, rows)


def final_logits(lm: LoadedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's own last step, final LayerNorm then output layer, as a function of stream vectors;
    float32 logits."""
    if lm.net is not None:
        from gptcli.gpt2 import final_logits as net_logits

        net = lm.net
        return lambda x: net_logits(net, x)
    model = lm.model
    norm = _parts(model)[1]
    head = model.get_output_embeddings()
    if head is None:
        raise GptcliError(f"{type(model).__name__} has no output layer to decode the layers with")
    return lambda x: head(norm(x)).float()


def _child(module: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        child = getattr(module, name, None)
        if child is not None:
            return child
    return None


def _parts(model: Any) -> tuple[Any, Any]:
    """(the list of blocks, the final norm) of a transformers causal LM."""
    import torch

    base = model.base_model
    layers = _child(base, _LAYERS)
    norm = _child(base, _FINAL_NORM)
    if not isinstance(layers, torch.nn.ModuleList) or norm is None:
        raise GptcliError(
            f"gptcli does not know where the blocks and the final norm of a {type(model).__name__} are"
        )
    return layers, norm


def _run_transformers(
    model: Any,
    input_ids: torch.Tensor,
    on_point: PointFn,
    on_attention: AttentionFn | None,
    rows: torch.Tensor | None,
) -> None:
    layers, _ = _parts(model)
    hooks = []

    def first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    def output(value: Any) -> Any:
        return value[0] if isinstance(value, tuple) else value

    hooks.append(
        layers[0].register_forward_pre_hook(
            lambda _m, args, kwargs: on_point(0, "embeddings", first(args, kwargs)), with_kwargs=True
        )
    )
    for number, block in enumerate(layers, 1):
        mlp_norm = _child(block, _MLP_NORM)
        if mlp_norm is not None:
            hooks.append(
                mlp_norm.register_forward_pre_hook(
                    lambda _m, args, kwargs, n=number: on_point(n, "attention", first(args, kwargs)),
                    with_kwargs=True,
                )
            )
        hooks.append(
            block.register_forward_hook(lambda _m, _i, out, n=number: on_point(n, "block", output(out)))
        )
        if on_attention is not None:
            attention = _child(block, _ATTENTION)
            if attention is None:
                raise GptcliError(f"gptcli does not know where the attention of a {type(block).__name__} is")

            def report(_m: Any, _i: Any, out: Any, n: int = number) -> None:
                weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
                if weights is None:
                    raise GptcliError(f"{type(model).__name__} did not return its attention weights")
                on_attention(n, (weights if rows is None else weights[:, :, rows]).float())

            hooks.append(attention.register_forward_hook(report))
    try:
        with _eager(model, on_attention is not None):
            model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def _eager(model: Any, wanted: bool) -> Iterator[None]:
    """The model with eager attention for the duration (it forms the weights), then as it was."""
    before = getattr(model.config, "_attn_implementation", None)
    if not wanted or before == "eager":
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except Exception as exc:
        raise UsageError(
            f"{type(model).__name__} cannot run eager attention, so it has no weights to show"
        ) from exc
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def check_mid_points(lm: LoadedModel) -> None:
    """Refuse --sublayer for a transformers model whose blocks have no norm before the MLP to hook."""
    if lm.net is None and any(_child(block, _MLP_NORM) is None for block in _parts(lm.model)[0]):
        raise UsageError(
            f"--sublayer: gptcli does not know where the MLP of a {lm.config.model_type} block starts"
        )
