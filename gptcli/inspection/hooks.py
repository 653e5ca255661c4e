"""Named hook points on both kinds of model gptcli runs: one pass that reads or replaces activations.

Every view that looks inside a model (lens, attention, attribute, patch) is "run the model once with
these hooks": a hook is a function fn(x, name) at a named point (TransformerLens' names, blocks
counted from 0: `blocks.3.attn.hook_z`, `blocks.3.hook_mlp_out`, `ln_final.hook_scale`) that returns
None to only read x, or a tensor of x's shape that replaces it for the rest of the pass.

- gptcli's own GPT-2: its one forward pass takes the hooks (`gptcli.gpt2.GPT2.forward`, every point of
  `gptcli.gpt2.hook_names`); without hooks it is the decode path, unchanged.
- transformers models: PyTorch forward hooks on the modules that compute the same values, for the
  points in `TRANSFORMERS_POINTS`. Some can only be read there (the value is not a module's input or
  output, or replacing it would not reach the stream). The attention pattern exists only under eager
  attention, so a model is switched to eager for a pass that hooks it, and back after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from gptcli.errors import GptcliError, UsageError

if TYPE_CHECKING:
    import torch

    from gptcli.loading.models import LoadedModel

HookFn = Callable[["torch.Tensor", str], "torch.Tensor | None"]

# Where the parts of a decoder live in transformers' causal LMs, by the names their classes use.
_LAYERS = ("h", "layers", "blocks", "layer")
_FINAL_NORM = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "final_norm")
_ATTENTION = ("attn", "self_attn", "attention")
_MLP = ("mlp", "feed_forward")
_MLP_NORM = ("ln_2", "post_attention_layernorm")  # its input: the stream after attention, before the MLP
_OUT_PROJ = ("c_proj", "o_proj", "out_proj", "dense")
_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")

# The points a transformers model offers, and whether a hook may replace the value there.
TRANSFORMERS_POINTS = {
    "hook_embed": True,
    "hook_resid_pre": True,
    "attn.hook_v": False,
    "attn.hook_pattern": False,
    "attn.hook_z": True,
    "hook_attn_out": True,
    "hook_resid_mid": False,
    "hook_mlp_out": True,
    "hook_resid_post": True,
    "ln_final.hook_scale": False,
}


def runs_gptcli(lm: LoadedModel) -> bool:
    """Whether `lm` runs on gptcli's own GPT-2 (`lm.net`) rather than a transformers model."""
    return lm.runtime == "gptcli"


def num_layers(lm: LoadedModel) -> int:
    return lm.net.config.n_layer if lm.net is not None else len(parts(lm.model)[0])


def num_heads(lm: LoadedModel) -> int:
    return lm.net.config.n_head if lm.net is not None else int(lm.config.num_attention_heads)


def run_with_hooks(
    lm: LoadedModel, input_ids: torch.Tensor, hooks: Mapping[str, HookFn], *, logits_to_keep: int = 0
) -> torch.Tensor:
    """The model's logits [batch, positions, vocab] for unpadded `input_ids`, run once with `hooks`
    (the last `logits_to_keep` positions, 0: all). Call under torch.inference_mode()."""
    import torch

    batch, length = input_ids.shape
    if runs_gptcli(lm):
        assert lm.net is not None
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        return lm.net.forward(input_ids, positions, logits_to_keep=logits_to_keep, hooks=hooks)
    model = lm.model
    handles = _attach(model, int(lm.config.num_attention_heads), hooks)
    try:
        with eager_attention(model, any(name.endswith("attn.hook_pattern") for name in hooks)):
            logits: torch.Tensor = model(input_ids=input_ids, logits_to_keep=logits_to_keep).logits
            return logits
    finally:
        for handle in handles:
            handle.remove()


def run_with_cache(
    lm: LoadedModel, input_ids: torch.Tensor, names: Iterable[str], *, logits_to_keep: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, {name: the activation there}) of one pass that reads the named points."""
    cache: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, name: str) -> None:
        cache[name] = x.detach().clone()

    logits = run_with_hooks(lm, input_ids, dict.fromkeys(names, keep), logits_to_keep=logits_to_keep)
    return logits, cache


def check_points(lm: LoadedModel, names: Iterable[str]) -> None:
    """Refuse a point the model does not have (a transformers model has fewer, `TRANSFORMERS_POINTS`)."""
    if runs_gptcli(lm):
        from gptcli.gpt2 import hook_names

        known = set(hook_names(num_layers(lm)))
        for name in names:
            if name not in known:
                raise GptcliError(f"gptcli's GPT-2 has no hook point {name}")
        return
    layers = parts(lm.model)[0]
    for name in names:
        layer, point = _split(name)
        if point not in TRANSFORMERS_POINTS or (layer is not None and not 0 <= layer < len(layers)):
            raise GptcliError(f"{type(lm.model).__name__} has no hook point {name}")


def _split(name: str) -> tuple[int | None, str]:
    match = _NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def child(module: Any, names: tuple[str, ...]) -> Any:
    """The first of `module`'s children named one of `names`, or None."""
    for name in names:
        found = getattr(module, name, None)
        if found is not None:
            return found
    return None


def parts(model: Any) -> tuple[Any, Any]:
    """(the list of blocks, the final norm) of a transformers causal LM."""
    import torch

    base = model.base_model
    layers = child(base, _LAYERS)
    norm = child(base, _FINAL_NORM)
    if not isinstance(layers, torch.nn.ModuleList) or norm is None:
        raise GptcliError(
            f"gptcli does not know where the blocks and the final norm of a {type(model).__name__} are"
        )
    return layers, norm


def has_mid_point(lm: LoadedModel) -> bool:
    """Whether the stream between attention and MLP can be read: every gptcli GPT-2, and transformers
    models whose blocks have a norm before the MLP to hook."""
    return runs_gptcli(lm) or all(child(block, _MLP_NORM) is not None for block in parts(lm.model)[0])


def _attach(model: Any, heads: int, hooks: Mapping[str, HookFn]) -> list[Any]:
    """Register a PyTorch hook for each named point; returns their handles."""
    layers, norm = parts(model)
    handles = []
    for name, fn in hooks.items():
        layer, point = _split(name)
        if point not in TRANSFORMERS_POINTS or (layer is not None and not 0 <= layer < len(layers)):
            raise GptcliError(f"{type(model).__name__} has no hook point {name}")
        if layer is None:
            target = model.get_input_embeddings() if point == "hook_embed" else norm
        else:
            target = layers[layer]
        handles.append(_register(target, point, _guard(fn, name, TRANSFORMERS_POINTS[point]), heads, model))
    return handles


def _guard(fn: HookFn, name: str, replaceable: bool) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """fn bound to its name; refuses a replacement where the point can only be read."""

    def call(x: torch.Tensor) -> torch.Tensor | None:
        out = fn(x, name)
        if out is not None and not replaceable:
            raise GptcliError(f"{name} can be read but not replaced on a transformers model")
        return out

    return call


def _input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs["hidden_states"]


def _with_input(args: tuple[Any, ...], kwargs: dict[str, Any], x: Any) -> tuple[Any, dict[str, Any]]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def _with_first(out: Any, x: Any) -> Any:
    return (x, *out[1:]) if isinstance(out, tuple) else x


def _find(block: Any, names: tuple[str, ...], what: str) -> Any:
    found = child(block, names)
    if found is None:
        raise GptcliError(f"gptcli does not know where the {what} of a {type(block).__name__} is")
    return found


def _register(target: Any, point: str, call: Callable[[Any], Any], heads: int, model: Any) -> Any:
    """One PyTorch hook on `target` (a block, the input embeddings or the final norm) for `point`."""

    def on_input(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = call(_input(args, kwargs))
        return None if out is None else _with_input(args, kwargs, out)

    def on_output(_m: Any, _args: Any, out: Any) -> Any:
        new = call(_first(out))
        return None if new is None else _with_first(out, new)

    if point in ("hook_embed", "hook_resid_post"):
        return target.register_forward_hook(on_output)
    if point == "hook_resid_pre":
        return target.register_forward_pre_hook(on_input, with_kwargs=True)
    if point == "hook_resid_mid":
        return _find(target, _MLP_NORM, "norm before the MLP").register_forward_pre_hook(
            on_input, with_kwargs=True
        )
    if point == "hook_mlp_out":
        return _find(target, _MLP, "MLP").register_forward_hook(on_output)
    if point == "ln_final.hook_scale":
        return target.register_forward_pre_hook(_scale_hook(target, call), with_kwargs=True)
    attention = _find(target, _ATTENTION, "attention")
    if point == "hook_attn_out":
        return attention.register_forward_hook(on_output)
    if point == "attn.hook_pattern":
        return attention.register_forward_hook(_pattern_hook(call, model))
    if point == "attn.hook_z":
        return _find(attention, _OUT_PROJ, "attention's output projection").register_forward_pre_hook(
            _z_hook(call, heads), with_kwargs=True
        )
    return _v_hook(attention, call, heads)


def _pattern_hook(call: Callable[[Any], Any], model: Any) -> Callable[..., None]:
    def on_output(_m: Any, _args: Any, out: Any) -> None:
        weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if weights is None:
            raise GptcliError(f"{type(model).__name__} did not return its attention weights")
        call(weights.float())

    return on_output


def _z_hook(call: Callable[[Any], Any], heads: int) -> Callable[..., Any]:
    """The output projection's input [batch, pos, width], shown per head [batch, pos, head, d_head]."""

    def on_input(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = _input(args, kwargs)
        out = call(x.view(*x.shape[:-1], heads, -1))
        return None if out is None else _with_input(args, kwargs, out.reshape(x.shape))

    return on_input


def _v_hook(attention: Any, call: Callable[[Any], Any], heads: int) -> Any:
    """The values [batch, pos, head, d_head]: v_proj's output, or the last third of GPT-2's c_attn."""
    v_proj = getattr(attention, "v_proj", None)
    fused = getattr(attention, "c_attn", None)
    if v_proj is None and fused is None:
        raise GptcliError(f"gptcli does not know where the values of a {type(attention).__name__} are")

    def on_output(_m: Any, _args: Any, out: Any) -> None:
        v = out if v_proj is not None else out.chunk(3, dim=-1)[2]
        call(v.view(*v.shape[:-1], heads, -1))

    module: Any = v_proj if v_proj is not None else fused
    return module.register_forward_hook(on_output)


def _scale_hook(norm: Any, call: Callable[[Any], Any]) -> Callable[..., None]:
    """The final LayerNorm's divisor sqrt(var + eps) [batch, pos, 1], from its input."""
    import torch

    if not isinstance(norm, torch.nn.LayerNorm):
        raise GptcliError(f"ln_final.hook_scale needs a LayerNorm; the final norm is a {type(norm).__name__}")

    def on_input(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = _input(args, kwargs)
        call((x.var(dim=-1, keepdim=True, unbiased=False) + norm.eps).sqrt())

    return on_input


@contextmanager
def eager_attention(model: Any, wanted: bool) -> Iterator[None]:
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
