"""One forward pass of a prompt with the residual stream and the attention weights reported on the way.

What `gptcli lens` and `gptcli attention` stand on, for both kinds of model gptcli runs, through the
hook points of gptcli.inspection.hooks: each block's input (`hook_resid_pre` of block 0 is the
embeddings), the stream after its attention (`hook_resid_mid`) and its raw output (`hook_resid_post`;
transformers' `output_hidden_states` puts the final LayerNorm's output in its last slot instead, which
the final LayerNorm must not normalise a second time), and the attention pattern.

Attention weights are the eager ones (softmax of the scaled scores), as transformers' eager attention
computes them; reading them leaves the stream as the model computes it without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gptcli.batching import fit_context
from gptcli.errors import GptcliError, UsageError
from gptcli.generation.tokens import TokenText, encode_prompt
from gptcli.inspection.hooks import has_mid_point, num_heads, num_layers, parts, run_with_hooks, runs_gptcli

if TYPE_CHECKING:
    import torch

    from gptcli.contracts import TokenInfo
    from gptcli.loading.models import LoadedModel

__all__ = ["Prompt", "check_mid_points", "encode", "final_logits", "num_heads", "num_layers", "run"]

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

    rows = None if attention_rows is None else torch.tensor(attention_rows, device=lm.device)
    hooks: dict[str, Any] = {"blocks.0.hook_resid_pre": lambda x, _: on_point(0, "embeddings", x)}
    for layer in range(num_layers(lm)):
        number = layer + 1  # the lens counts blocks from 1, the embeddings being layer 0
        if has_mid_point(lm):
            hooks[f"blocks.{layer}.hook_resid_mid"] = lambda x, _, n=number: on_point(n, "attention", x)
        hooks[f"blocks.{layer}.hook_resid_post"] = lambda x, _, n=number: on_point(n, "block", x)
        if on_attention is not None:
            hooks[f"blocks.{layer}.attn.hook_pattern"] = lambda w, _, n=number: on_attention(
                n, w if rows is None else w[:, :, rows]
            )
    with torch.inference_mode():
        run_with_hooks(lm, torch.tensor([ids], device=lm.device), hooks)


def final_logits(lm: LoadedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's own last step, final LayerNorm then output layer, as a function of stream vectors;
    float32 logits."""
    if runs_gptcli(lm):
        from gptcli.gpt2 import final_logits as net_logits

        net = lm.net
        assert net is not None
        return lambda x: net_logits(net, x)
    model = lm.model
    norm = parts(model)[1]
    head = model.get_output_embeddings()
    if head is None:
        raise GptcliError(f"{type(model).__name__} has no output layer to decode the layers with")
    return lambda x: head(norm(x)).float()


def check_mid_points(lm: LoadedModel) -> None:
    """Refuse --sublayer for a transformers model whose blocks have no norm before the MLP to hook."""
    if not has_mid_point(lm):
        raise UsageError(
            f"--sublayer: gptcli does not know where the MLP of a {lm.config.model_type} block starts"
        )
