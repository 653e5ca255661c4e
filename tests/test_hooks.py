"""Hook points: each one holds what transformers' own modules compute there, on both runtimes; a hook
that replaces a value changes the pass as the same replacement does in transformers; no hook, no change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptcli.gpt2 import hook_names
from gptcli.inspection.hooks import check_points, run_with_cache, run_with_hooks
from gptcli.inspection.tracing import encode

import tiny

PROMPTS = tiny.TRACED_PROMPTS


@pytest.fixture(scope="module")
def references(traced_folders: dict[str, Path]):
    """transformers' models of the same folders, eager attention, loaded independently of gptcli."""
    return {
        name: AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        for name, path in traced_folders.items()
    }


def reference_points(model, ids: list[int]) -> dict[str, torch.Tensor]:
    """The points, from forward hooks on transformers' GPT-2 modules and their own weights."""
    got: dict[str, torch.Tensor] = {}
    hooks = []
    heads = model.config.n_head
    for layer, block in enumerate(model.transformer.h):
        prefix = f"blocks.{layer}."

        def keep(name: str, value: torch.Tensor) -> None:
            got[name] = value.detach().clone()

        hooks += [
            block.register_forward_pre_hook(lambda _m, a, p=prefix: keep(p + "hook_resid_pre", a[0])),
            block.attn.register_forward_hook(lambda _m, _i, o, p=prefix: keep(p + "hook_attn_out", o[0])),
            block.attn.register_forward_hook(lambda _m, _i, o, p=prefix: keep(p + "attn.hook_pattern", o[1])),
            block.attn.c_proj.register_forward_pre_hook(
                lambda _m, a, p=prefix: keep(p + "attn.hook_z", a[0].view(*a[0].shape[:-1], heads, -1))
            ),
            block.attn.c_attn.register_forward_hook(
                lambda _m, _i, o, p=prefix: keep(
                    p + "attn.hook_v", o.chunk(3, -1)[2].unflatten(-1, (heads, -1))
                )
            ),
            block.mlp.register_forward_hook(lambda _m, _i, o, p=prefix: keep(p + "hook_mlp_out", o)),
            block.register_forward_hook(lambda _m, _i, o, p=prefix: keep(p + "hook_resid_post", o)),
        ]
    ln_f = model.transformer.ln_f
    hooks.append(
        ln_f.register_forward_pre_hook(
            lambda _m, a: keep(
                "ln_final.hook_scale", (a[0].var(-1, keepdim=True, unbiased=False) + ln_f.eps).sqrt()
            )
        )
    )
    try:
        with torch.no_grad():
            got["logits"] = model(torch.tensor([ids])).logits
    finally:
        for hook in hooks:
            hook.remove()
    return got


POINTS = [
    "hook_resid_pre",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_resid_post",
]


@pytest.mark.parametrize("name", ["bpe", "hf"])
def test_every_point_holds_what_transformers_computes_there(traced_lms, references, name: str) -> None:
    lm, ref = traced_lms[name], references[name]
    ids = encode(lm, PROMPTS[name]).ids
    names = [f"blocks.{layer}.{point}" for layer in range(2) for point in POINTS] + ["ln_final.hook_scale"]
    with torch.inference_mode():
        logits, cache = run_with_cache(lm, torch.tensor([ids]), names)
    expected = reference_points(ref, ids)
    for point in names:
        assert cache[point].shape == expected[point].shape, point
        assert torch.allclose(cache[point], expected[point], atol=1e-5), point
    assert torch.allclose(logits, expected["logits"], atol=1e-4)


def test_the_residual_stream_adds_up_at_every_point(traced_lms) -> None:
    """resid_pre + attn_out = resid_mid, + mlp_out = resid_post; ln scale and normalized are LayerNorm's."""
    lm = traced_lms["bpe"]
    ids = torch.tensor([encode(lm, PROMPTS["bpe"]).ids])
    with torch.inference_mode():
        _, cache = run_with_cache(lm, ids, hook_names(2))
    for layer in range(2):
        p = f"blocks.{layer}."
        assert torch.allclose(
            cache[p + "hook_resid_pre"] + cache[p + "hook_attn_out"], cache[p + "hook_resid_mid"]
        )
        assert torch.allclose(
            cache[p + "hook_resid_mid"] + cache[p + "hook_mlp_out"], cache[p + "hook_resid_post"]
        )
        x = cache[p + "hook_resid_pre"]
        normalized = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-5)
        assert torch.allclose(cache[p + "ln1.hook_normalized"], normalized, atol=1e-5)
        assert torch.allclose(
            cache[p + "ln1.hook_scale"], (x.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt()
        )
    embeddings = cache["hook_embed"] + cache["hook_pos_embed"]
    assert torch.equal(embeddings, cache["blocks.0.hook_resid_pre"])


def test_no_hooks_and_reading_hooks_leave_the_logits_exactly_as_they_were(traced_lms) -> None:
    lm = traced_lms["bpe"]
    ids = torch.tensor([encode(lm, PROMPTS["bpe"]).ids])
    with torch.inference_mode():
        plain = lm.logits(ids)
        assert torch.equal(run_with_hooks(lm, ids, {}), plain)
        read = run_with_hooks(lm, ids, dict.fromkeys(hook_names(2), lambda x, _: None))
    assert torch.equal(read, plain)  # the pattern is formed on the side; SDPA still computes the stream


@pytest.mark.parametrize("name", ["bpe", "hf"])
def test_replacing_a_head_and_an_mlp_changes_the_pass_as_in_transformers(
    traced_lms, references, name: str
) -> None:
    """Zeroing head 1 of block 0 (hook_z) and doubling block 1's MLP output, against the same edits
    made with transformers' own modules."""
    lm, ref = traced_lms[name], references[name]
    ids = encode(lm, PROMPTS[name]).ids

    def zero_head(z: torch.Tensor, _: str) -> torch.Tensor:
        z = z.clone()
        z[:, :, 1] = 0
        return z

    hooks = {"blocks.0.attn.hook_z": zero_head, "blocks.1.hook_mlp_out": lambda x, _: 2 * x}
    with torch.inference_mode():
        got = run_with_hooks(lm, torch.tensor([ids]), hooks)
    width = ref.config.n_embd
    handles = [
        ref.transformer.h[0].attn.c_proj.register_forward_pre_hook(
            lambda _m, a: (
                torch.cat([a[0][..., : width // 2], torch.zeros_like(a[0][..., width // 2 :])], -1),
            )
        ),
        ref.transformer.h[1].mlp.register_forward_hook(lambda _m, _i, o: 2 * o),
    ]
    try:
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, reference_points(ref, ids)["logits"], atol=1e-3)


def test_a_replaced_pattern_feeds_the_values(traced_lms, references) -> None:
    """Every query of block 0 attending to the first token only: z is then that token's value."""
    lm = traced_lms["bpe"]
    ids = torch.tensor([encode(lm, PROMPTS["bpe"]).ids])

    def first_only(w: torch.Tensor, _: str) -> torch.Tensor:
        out = torch.zeros_like(w)
        out[..., 0] = 1
        return out

    with torch.inference_mode():
        _, cache = run_with_cache(lm, ids, ["blocks.0.attn.hook_v"])
        got: dict[str, torch.Tensor] = {}
        run_with_hooks(
            lm,
            ids,
            {
                "blocks.0.attn.hook_pattern": first_only,
                "blocks.0.attn.hook_z": lambda z, _: got.update(z=z.clone()),
            },
        )
    v = cache["blocks.0.attn.hook_v"]
    assert torch.allclose(got["z"], v[:, :1].expand_as(v), atol=1e-6)


def test_points_a_model_does_not_have_are_refused(traced_lms) -> None:
    from gptcli.errors import GptcliError

    check_points(traced_lms["bpe"], hook_names(2))
    check_points(traced_lms["hf"], ["blocks.1.attn.hook_z", "ln_final.hook_scale"])
    with pytest.raises(GptcliError, match=r"no hook point blocks\.2\.hook_resid_pre"):
        check_points(traced_lms["bpe"], ["blocks.2.hook_resid_pre"])
    with pytest.raises(GptcliError, match=r"no hook point blocks\.0\.mlp\.hook_post"):
        check_points(traced_lms["hf"], ["blocks.0.mlp.hook_post"])
    ids = torch.tensor([encode(traced_lms["hf"], "hello").ids])
    with pytest.raises(GptcliError, match="can be read but not replaced"), torch.inference_mode():
        run_with_hooks(traced_lms["hf"], ids, {"blocks.0.attn.hook_pattern": lambda w, _: w * 0})
