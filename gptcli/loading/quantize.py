"""Quantized weights: int8 (one scale per output channel) and int4 (a scale and offset per 32 weights).

int8: every output channel's weights scaled into [-127, 127], one float scale per channel.

Decoding a token reads every weight once, so on a CPU it is bound by memory bandwidth, and int8 weights
are a quarter of fp32's bytes. What multiplies by them:
- on a CPU, FBGEMM's dynamic int8 matmul (`quantized::linear_dynamic`): each token's activations are
  quantized to 8 bits on the fly and multiplied in integers with AVX2. It is several times faster
  than the weight-only kernel below, whose CPU path for fp32 activations is not vectorized and whose
  bf16 path is no faster than fp32 (docs/performance.md has the figures);
- elsewhere, or where torch lacks FBGEMM (torch marks its quantized tensors deprecated),
  `_weight_int8pack_mm`: float activations times int8 weights, weight-only.

int4 (`Int4Linear`): every run of 32 weights along a row gets its own scale and offset (asymmetric,
llama.cpp's q4_1 idea), 4 bits a weight; torch's CPU kernel `_weight_int4pack_mm_for_cpu` multiplies
bf16 activations by them (its fp32 path is not vectorized). A token reads about half int8's bytes.
Quality against fp32 (topk probabilities, perplexity) is measured in docs/performance.md.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

METHODS = ("int8", "int4")
INT4_GROUP = 32  # weights per scale: the group size with the best quality; 32-128 decode equally fast


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a [out, in] weight: (int8 [out, in], float32 scales [out]), w ≈ q·s."""
    import torch

    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    # A few thousand rows at a time: the float temporaries of a whole 50,257-row embedding table
    # would be several times the size of the model's int8 weights.
    for start in range(0, weight.shape[0], 4096):
        w = weight[start : start + 4096].float()
        # The largest |w| of a row maps to 127; a row of zeros keeps scale 1 so nothing divides by zero.
        s = w.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start : start + 4096] = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        scales[start : start + 4096] = s
    return q, scales


def _fbgemm_pack(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> Any | None:
    """FBGEMM's packed form of int8 weights (the same q and scales), or None where it is unavailable."""
    import torch

    if q.device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        with warnings.catch_warnings():  # torch's deprecation notice of quantized tensors, once per process
            warnings.simplefilter("ignore")
            zero = torch.zeros(len(scales), dtype=torch.long)
            weight = torch._make_per_channel_quantized_tensor(q, scales.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(weight, None if bias is None else bias.float())
    except (AttributeError, RuntimeError):
        return None


class Int8Linear:
    """y = x (q·s)ᵀ + b for an int8 weight q [out, in] and per-output scales s."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, *, rows: bool = False
    ) -> None:
        """Args:
        weight: [out, in] (nn.Linear's layout, and the tied embedding table's).
        dtype: the activations' dtype, which x comes in and y goes out in.
        rows: keep the int8 table for `rows` (an embedding lookup in the same weights).
        """
        import torch

        q, scales = quantize_int8(weight)
        self.bias = bias
        self.dtype = dtype
        self.packed = _fbgemm_pack(q, scales, bias)
        # Weight-only kernel: activations and scales in one dtype; bf16 is its fast CPU path.
        self.kernel_dtype = torch.bfloat16 if weight.device.type == "cpu" else dtype
        self.scales = scales.to(self.kernel_dtype)
        self.row_scales = scales.to(dtype)
        self.weight: torch.Tensor | None = q if rows or self.packed is None else None
        self.nbytes = q.numel() + scales.numel() * 4  # what one pass over the weights reads

    @classmethod
    def from_conv1d(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Int8Linear:
        """From transformers' Conv1D layout, [in, out]."""
        return cls(weight.t(), bias, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        flat = x.reshape(-1, x.shape[-1])
        if self.packed is not None:
            # reduce_range: 7-bit activations, so AVX2's 16-bit pair sums cannot overflow (no VNNI).
            out = torch.ops.quantized.linear_dynamic(flat.float(), self.packed, True).to(self.dtype)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat.to(self.kernel_dtype), self.weight, self.scales)
            out = out.to(self.dtype)
            if self.bias is not None:
                out = out + self.bias
        shaped: torch.Tensor = out.view(*x.shape[:-1], out.shape[-1])
        return shaped

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized weight: an embedding lookup in the same table."""
        assert self.weight is not None, "built without rows=True"
        return self.weight[ids].to(self.dtype) * self.row_scales[ids, None]


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit of a [out, in] weight: (q [out, in] uint8 in 0..15, scales_and_zeros).

    `scales_and_zeros` is [in / group, out, 2] float32, torch's int4 layout: w ≈ (q - 8) * scale + zero.
    Each group's minimum maps to 0 and its maximum to 15.
    """
    import torch

    out, width = weight.shape
    q = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    params = torch.empty(width // group, out, 2, dtype=torch.float32, device=weight.device)
    for start in range(0, out, 4096):  # a slice at a time, as quantize_int8 does
        w = weight[start : start + 4096].float().reshape(-1, width // group, group)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)  # a constant group keeps a tiny scale, no 0/0
        codes = torch.round((w - low) / scale).clamp(0, 15)
        q[start : start + 4096] = codes.reshape(-1, width).to(torch.uint8)
        params[:, start : start + 4096, 0] = scale.squeeze(-1).t()
        params[:, start : start + 4096, 1] = (low + 8 * scale).squeeze(-1).t()
    return q, params


def can_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> bool:
    """Whether torch's int4 kernel takes this [out, in] weight (its CPU kernel, a width of whole groups)."""
    import torch

    return (
        weight.device.type == "cpu"
        and weight.shape[1] % group == 0
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    )


class Int4Linear:
    """y = x Wᵀ + b with W stored as 4-bit groups (quantize_int4), multiplied in bf16 on the CPU.

    The kernel wants a multiple of 16 output rows: GPT-2's 50,257-row output layer is padded with zero
    rows, whose logits are cut off again.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, *, rows: bool = False
    ) -> None:
        """Args as Int8Linear's: weight [out, in]; `dtype` the activations'; `rows` keeps the codes for
        embedding lookups in the same table."""
        import torch

        out = weight.shape[0]
        padded = -out % 16
        if padded:
            weight = torch.cat([weight, weight.new_zeros(padded, weight.shape[1])])
        q, params = quantize_int4(weight)
        self.out = out
        self.bias = bias
        self.dtype = dtype
        # The kernel's packed layout takes the codes as int32 [out, in]; two codes a byte once packed.
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.params = params.to(torch.bfloat16)
        self.codes = q[:out] if rows else None
        self.row_params = params[:, :out].to(dtype) if rows else None

    @classmethod
    def from_conv1d(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Int4Linear:
        """From transformers' Conv1D layout, [in, out]."""
        return cls(weight.t(), bias, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.params)
        out = out[:, : self.out].to(self.dtype)
        if self.bias is not None:
            out = out + self.bias
        shaped: torch.Tensor = out.view(*x.shape[:-1], self.out)
        return shaped

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized weight: an embedding lookup in the same table."""
        assert self.codes is not None and self.row_params is not None, "built without rows=True"
        codes = self.codes[ids].to(self.dtype)  # [..., in]
        groups = codes.view(*codes.shape[:-1], -1, INT4_GROUP)
        params = self.row_params[:, ids].movedim(0, -2)  # [..., groups, 2]
        return ((groups - 8) * params[..., :1] + params[..., 1:]).reshape(codes.shape)
