"""Weight-only int8: every output channel's weights scaled into [-127, 127]; activations stay float.

Decoding a token reads every weight once, so on a CPU it is bound by memory bandwidth, and int8 weights
are a quarter of fp32's bytes. torch's `_weight_int8pack_mm` multiplies float activations by int8
weights and per-channel scales without materializing a float copy. Quality against fp32 is measured in
docs/performance.md (topk probabilities, perplexity).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

METHODS = ("int8",)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a [out, in] weight: (int8 [out, in], float32 scales [out]), w ≈ q·s."""
    import torch

    w = weight.float()
    # The largest |w| of a row maps to 127; a row of zeros keeps scale 1 so nothing divides by zero.
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


class Int8Linear:
    """y = x (q·s)ᵀ + b for an int8 weight q [out, in] and per-output scales s."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        """`weight` is [out, in] (nn.Linear's layout, and the tied embedding table's); `dtype` is the
        activations' dtype, which x comes in and y goes out in."""
        import torch

        self.weight, scales = quantize_int8(weight)
        # The kernel takes activations and scales in one dtype; on the CPU bf16 is its fast path
        # (fp32 activations are six times slower here, measured), on a GPU the model's dtype.
        self.kernel_dtype = torch.bfloat16 if weight.device.type == "cpu" else dtype
        self.scales = scales.to(self.kernel_dtype)
        self.row_scales = scales.to(dtype)
        self.bias = bias
        self.dtype = dtype

    @classmethod
    def from_conv1d(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Int8Linear:
        """From transformers' Conv1D layout, [in, out]."""
        return cls(weight.t(), bias, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        flat = x.reshape(-1, x.shape[-1]).to(self.kernel_dtype)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).to(self.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized weight: an embedding lookup in the same table."""
        return self.weight[ids].to(self.dtype) * self.row_scales[ids, None]
