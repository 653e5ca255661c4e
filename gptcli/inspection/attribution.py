"""Direct logit attribution: which parts of the model wrote a logit, and from which positions.

The residual stream at the last block's output is a sum of parts: the embeddings (token + position),
every head's output (its slice of the attention output before the projection, z_h, times its rows of
the projection W_O^h), each attention projection's bias, and every MLP's output. The final LayerNorm
is linear once its scale (the standard deviation s at that position) is frozen at its value in the
real pass: LN(x) = (x - mean(x)) / s * γ + β. So the logit of token t is

    logit_t = Σ_parts (part - mean(part)) / s · (γ ⊙ u_t)  +  β · u_t

with u_t the output layer's row of t (minus the foil's row, for a difference): each part's term is
its direct effect, and the terms plus β · u_t equal the real logit. A head's term splits further over
the source positions j it reads: z_h = Σ_j a_hj v_hj, so its term is Σ_j a_hj (v_hj W_O^h) · e.

The parts are read from one pass through the hook points (gptcli.inspection.hooks); the projection
matrices are read by applying each projection module to the identity, which works for every layer type
gptcli runs (fp32, bf16, int8, transformers' Conv1D and Linear).
Pitfall: this is the direct effect only; a part also changes the LayerNorm's scale and every later
layer's input, which the attribution ignores (activation patching measures the total effect).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError
from gptcli.generation.tokens import TokenText
from gptcli.inspection.hooks import child, num_heads, num_layers, parts, run_with_cache, runs_gptcli
from gptcli.inspection.lens import parse_positions
from gptcli.inspection.tracing import Prompt, encode

if TYPE_CHECKING:
    import torch

    from gptcli.inspection.pictures import Grid
    from gptcli.loading.models import LoadedModel

KINDS = ("embed", "head", "attn_bias", "mlp")
_OUT_PROJ = ("c_proj", "o_proj", "out_proj", "dense")
_ATTENTION = ("attn", "self_attn", "attention")


@dataclass
class Component:
    """One part of the residual stream and its direct effect on the logit."""

    kind: str  # "embed", "head", "attn_bias" or "mlp"
    layer: int | None  # block, counted from 1 as in `lens` and `attention`; None for the embeddings
    head: int | None  # counted from 0
    logit: float
    sources: list[tuple[int, float]] | None = None  # heads: (source position, its share of the logit)

    @property
    def label(self) -> str:
        """ "embed", "L.H" (a head), "mlp L" or "bias L"."""
        if self.kind == "head":
            return f"{self.layer}.{self.head}"
        return {"embed": "embed", "mlp": f"mlp {self.layer}", "attn_bias": f"bias {self.layer}"}[self.kind]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "layer": self.layer, "head": self.head, "logit": self.logit}
        if self.sources is not None:
            out["sources"] = [{"position": j, "logit": x} for j, x in self.sources]
        return out


@dataclass
class Attribution:
    """The logit of a target token (minus a foil's) at one position, split into the model's parts."""

    prompt: Prompt
    position: int
    target: dict[str, Any]  # {"id", "token"}
    foil: dict[str, Any] | None
    logit: float  # the real logit (difference), from the model's own output
    bias: float  # the final LayerNorm's bias term, β · u
    components: list[Component] = field(default_factory=list)
    heads: int = 0

    @property
    def total(self) -> float:
        """The parts plus the bias term: equals `logit` up to rounding."""
        return sum(c.logit for c in self.components) + self.bias

    def ranked(self) -> list[Component]:
        """The components, largest magnitude first."""
        return sorted(self.components, key=lambda c: -abs(c.logit))

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.prompt.tokens,
            "position": self.position,
            "target": self.target,
            "foil": self.foil,
            "logit": self.logit,
            "bias": self.bias,
            "components": [c.to_json() for c in self.components],
        }


def check_token_options(
    *, target: str | None, target_id: int | None, foil: str | None, foil_id: int | None
) -> None:
    """Refuse a token given twice (before a model loads, too)."""
    if target is not None and target_id is not None:
        raise UsageError("give --target or --target-id, not both")
    if foil is not None and foil_id is not None:
        raise UsageError("give --foil or --foil-id, not both")


def token_id(lm: LoadedModel, text: str | None, number: int | None, option: str) -> int | None:
    """The id a --target/--foil TEXT (exactly one token) or --target-id/--foil-id N names, or None."""
    vocab = int(lm.config.vocab_size)
    if number is not None:
        if not 0 <= number < vocab:
            raise UsageError(f"{option}-id {number} is out of range: the vocabulary has ids 0 to {vocab - 1}")
        return number
    if text is None:
        return None
    ids = lm.tokenizer.encode(text, add_special_tokens=False) if text else []
    if len(ids) != 1:
        names = TokenText(lm.tokenizer)
        pieces = ", ".join(repr(names.describe(i)["token"]) for i in ids)
        raise UsageError(
            f"{option} {text!r} is {len(ids)} tokens ({pieces or 'none'}); give one token, or {option}-id"
        )
    return int(ids[0])


def describe(lm: LoadedModel, token: int) -> dict[str, Any]:
    """{"id", "token"} of a token id."""
    return {"id": token, "token": TokenText(lm.tokenizer).describe(token)["token"]}


def attribute(
    lm: LoadedModel,
    text: str,
    *,
    position: int = -1,
    target: int | None = None,
    foil: int | None = None,
) -> Attribution:
    """Direct logit attribution of `text` at `position` (negative from the end) for the token id
    `target` (default: the model's top-1 there), minus `foil`'s logit when one is given."""
    import torch

    prompt = encode(lm, text)
    at = parse_positions(str(position), len(prompt.ids), "--at")[0]
    layers = num_layers(lm)
    # Before the run: its hooks would otherwise refuse an RMSNorm model in their own terms.
    gain, beta = _final_norm(lm)
    names = ["blocks.0.hook_resid_pre", "ln_final.hook_scale"]
    for layer in range(layers):
        names += [
            f"blocks.{layer}.{p}" for p in ("attn.hook_z", "attn.hook_pattern", "attn.hook_v", "hook_mlp_out")
        ]
    with torch.inference_mode():
        logits, cache = run_with_cache(lm, torch.tensor([prompt.ids], device=lm.device), names)
        logits = logits[0, at].float()
        if target is None:
            target = int(logits.argmax())
        if foil == target:
            raise UsageError("the foil is the target token: their logit difference is 0 by definition")
        unembed = _unembedding(lm, [target] if foil is None else [target, foil])
        direction = unembed[0] if foil is None else unembed[0] - unembed[1]
        scale = cache["ln_final.hook_scale"][0, at].float()
        # (u - mean u) / s · (γ ⊙ d) = u · e, with e the gained direction centred and divided by s
        gained = gain * direction
        e = (gained - gained.mean()) / scale
        result = Attribution(
            prompt,
            at,
            describe(lm, target),
            None if foil is None else describe(lm, foil),
            float(logits[target] - (0 if foil is None else logits[foil])),
            float(beta @ direction) + _output_bias(lm, target, foil),
            heads=num_heads(lm),
        )
        result.components.append(
            Component("embed", None, None, _dot(cache["blocks.0.hook_resid_pre"][0, at], e))
        )
        for layer in range(layers):
            result.components += _layer_parts(lm, layer, cache, at, e)
    return result


def _dot(x: torch.Tensor, e: torch.Tensor) -> float:
    return float(x.float() @ e)


def _layer_parts(
    lm: LoadedModel, layer: int, cache: dict[str, torch.Tensor], at: int, e: torch.Tensor
) -> list[Component]:
    """Block `layer`'s heads (with their sources), its projection bias and its MLP, as logit terms."""
    import torch

    p = f"blocks.{layer}."
    weight, bias = _projection(lm, layer)  # [width in, width out], [width]
    heads = cache[p + "attn.hook_z"].shape[2]
    back = (weight @ e).view(heads, -1)  # W_O^h e for each head: [head, d_head]
    z = cache[p + "attn.hook_z"][0, at].float()  # [head, d_head]
    pattern = cache[p + "attn.hook_pattern"][0, :, at].float()  # [head, key]
    values = cache[p + "attn.hook_v"][0].float()  # [key, head, d_head]
    per_source = pattern * torch.einsum("khd,hd->hk", values, back)  # [head, key]
    out = []
    for h in range(heads):
        sources = [(j, float(x)) for j, x in enumerate(per_source[h, : at + 1].tolist())]
        out.append(Component("head", layer + 1, h, float(z[h] @ back[h]), sources))
    out.append(Component("attn_bias", layer + 1, None, _dot(bias, e)))
    out.append(Component("mlp", layer + 1, None, _dot(cache[p + "hook_mlp_out"][0, at], e)))
    return out


def _projection(lm: LoadedModel, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_O [width in, width out], b_O) of block `layer`'s attention output projection, float32, read by
    applying the layer to the identity and to zero: the same numbers the pass multiplies by."""
    import torch

    if runs_gptcli(lm):
        assert lm.net is not None
        project: Any = lm.net.blocks[layer].attn_proj
        width = lm.net.config.n_embd
    else:
        attention = child(parts(lm.model)[0][layer], _ATTENTION)
        project = child(attention, _OUT_PROJ) if attention is not None else None
        if project is None:
            raise UsageError(
                f"gptcli does not know where the attention projection of a {lm.config.model_type} is"
            )
        width = int(lm.config.hidden_size)
    dtype = lm.net.dtype if lm.net is not None else next(lm.model.parameters()).dtype
    rows = torch.cat([torch.eye(width), torch.zeros(1, width)]).to(device=lm.device, dtype=dtype)
    out = project(rows).float()
    return out[:width] - out[width], out[width]


def _final_norm(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, β) of the final LayerNorm, float32."""
    if runs_gptcli(lm):
        assert lm.net is not None
        gain, beta = lm.net.ln_f
        return gain.float(), beta.float()
    norm = parts(lm.model)[1]
    if getattr(norm, "bias", None) is None:
        raise UsageError(f"attribution needs a final LayerNorm; the {lm.config.model_type}'s has no bias")
    return norm.weight.float(), norm.bias.float()


def _unembedding(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """The output layer's rows of `ids` [len(ids), width], float32."""
    import torch

    index = torch.tensor(ids, device=lm.device)
    if runs_gptcli(lm):
        assert lm.net is not None
        rows: torch.Tensor = lm.net.lm_head.rows(index)  # tied to the embeddings (GPT-2)
    else:
        rows = lm.model.get_output_embeddings().weight[index]
    return rows.float()


def _output_bias(lm: LoadedModel, target: int, foil: int | None) -> float:
    """The output layer's own bias term, for a model that has one (GPT-2 has none)."""
    if runs_gptcli(lm):
        return 0.0
    bias = getattr(lm.model.get_output_embeddings(), "bias", None)
    if bias is None:
        return 0.0
    return float(bias[target] - (0 if foil is None else bias[foil]))


def attribution_grid(result: Attribution) -> Grid:
    """The heat map: a row per block, a column per head plus the MLP's and the projection bias's,
    each cell its logit term, red for, blue against the target."""
    from gptcli.inspection.pictures import Grid

    layers = sorted({c.layer for c in result.components if c.layer is not None})
    columns = [f"h{h}" for h in range(result.heads)] + ["mlp", "bias"]
    cells: dict[tuple[int, str], float] = {}
    for c in result.components:
        if c.layer is not None:
            cells[(c.layer, f"h{c.head}" if c.kind == "head" else "mlp" if c.kind == "mlp" else "bias")] = (
                c.logit
            )
    values: list[list[float | None]] = [[cells[(layer, column)] for column in columns] for layer in layers]
    embed = next(c.logit for c in result.components if c.kind == "embed")
    what = result.target["token"] + ("" if result.foil is None else f" − {result.foil['token']}")
    return Grid(
        title=f"direct logit attribution of {what!r} at position {result.position}",
        rows=[str(layer) for layer in layers],
        columns=columns,
        values=values,
        texts=[[f"{v:+.2f}" if v is not None else "" for v in row] for row in values],
        details=[
            [f"block {layer} {column}: {v:+.4f}" for column, v in zip(columns, row, strict=True)]
            for layer, row in zip(layers, values, strict=True)
        ],
        palette="signed",
        signed=True,
        caption=f"red: for the target, blue: against; embeddings {embed:+.2f}, ln_f bias {result.bias:+.2f}, "
        f"sum {result.total:.4f} = logit {result.logit:.4f}",
        row_title="block",
    )
