"""GPT-2 inference in plain PyTorch, straight from a safetensors checkpoint.

gptcli runs plain GPT-2 checkpoints through this module instead of transformers' GPT2LMHeadModel:
- start-up: transformers' modeling code takes seconds and over 100 MB to import; this needs torch only;
- loading: model.safetensors is memory-mapped; each weight is copied once (fp32 on a CPU: into huge
  pages; bf16, int8: converted) and its file pages given back, so a model costs its size about once;
- decoding: keys and values go into a cache allocated once per batch, and a step is a fixed run of
  kernels, without the masks, cache objects and output records transformers builds at every step.

It computes what transformers computes, with kernels chosen for speed where they differ only in rounding
(a fused tanh GELU, the output layer as a product on a transposed copy of the embeddings), so fp32
probabilities agree with transformers' to 1e-5 and greedy ids on trained models are identical (the tests
check both). Checkpoints it does not cover (other
architectures, GPT-2 variants with cross-attention or other attention scalings, sharded or pickle
weights) load through transformers instead: `from_config` returns None for them.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gptcli.errors import GptcliError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch


@dataclass(frozen=True)
class GPT2Config:
    """The shape of a GPT-2, from config.json (transformers' GPT2Config defaults for missing keys)."""

    n_layer: int
    n_head: int
    n_embd: int
    n_inner: int
    n_positions: int
    vocab_size: int
    layer_norm_epsilon: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPT2Config | None:
        """The shape of a plain GPT-2; None for a model this module does not compute exactly."""
        plain = (
            config.get("model_type") == "gpt2"
            and config.get("activation_function", "gelu_new") == "gelu_new"
            and config.get("scale_attn_weights", True)
            and not config.get("scale_attn_by_inverse_layer_idx", False)
            and not config.get("reorder_and_upcast_attn", False)
            and not config.get("add_cross_attention", False)
            and config.get("tie_word_embeddings", True)
        )
        if not plain:
            return None
        n_embd = config.get("n_embd", 768)
        return cls(
            n_layer=config.get("n_layer", 12),
            n_head=config.get("n_head", 12),
            n_embd=n_embd,
            n_inner=config.get("n_inner") or 4 * n_embd,
            n_positions=config.get("n_positions", 1024),
            vocab_size=config.get("vocab_size", 50257),
            layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight the forward pass reads, by its name in transformers' GPT2Model, with its shape."""
        shapes: dict[str, tuple[int, ...]] = {
            "wte.weight": (self.vocab_size, self.n_embd),
            "wpe.weight": (self.n_positions, self.n_embd),
            "ln_f.weight": (self.n_embd,),
            "ln_f.bias": (self.n_embd,),
        }
        width, inner = self.n_embd, self.n_inner
        for i in range(self.n_layer):
            for name, shape in {
                "ln_1.weight": (width,),
                "ln_1.bias": (width,),
                "attn.c_attn.weight": (width, 3 * width),
                "attn.c_attn.bias": (3 * width,),
                "attn.c_proj.weight": (width, width),
                "attn.c_proj.bias": (width,),
                "ln_2.weight": (width,),
                "ln_2.bias": (width,),
                "mlp.c_fc.weight": (width, inner),
                "mlp.c_fc.bias": (inner,),
                "mlp.c_proj.weight": (inner, width),
                "mlp.c_proj.bias": (width,),
            }.items():
                shapes[f"h.{i}.{name}"] = shape
        return shapes

    @property
    def num_parameters(self) -> int:
        """As transformers counts them: the tied output layer once."""
        return sum(math.prod(shape) for shape in self.shapes().values())


def check_shapes(config: GPT2Config, found: dict[str, tuple[int, ...]]) -> None:
    """Raise GptcliError unless `found` (name -> shape; a "transformer." prefix is dropped) holds every
    weight `config` needs, with its shape."""
    found = {name.removeprefix("transformer."): shape for name, shape in found.items()}
    for name, shape in config.shapes().items():
        if name not in found:
            raise GptcliError(f"the weights have no tensor {name}")
        if tuple(found[name]) != shape:
            raise GptcliError(f"{name} has shape {tuple(found[name])}, config.json says {shape}")


def _read_header(file: IO[bytes]) -> tuple[int, dict[str, Any]]:
    """(header size, header) of an open .safetensors file: an 8-byte little-endian size, then JSON."""
    try:
        (size,) = struct.unpack("<Q", file.read(8))
        if size > os.fstat(file.fileno()).st_size - 8:  # garbage, or truncated: do not try to read it
            raise ValueError
        header = json.loads(file.read(size))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise GptcliError("not a safetensors file (its header does not parse)") from exc
    if not isinstance(header, dict):
        raise GptcliError("not a safetensors file (its header is not an object)")
    return size, header


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a .safetensors file, from its header alone (no torch, nothing mapped)."""
    with open(path, "rb") as file:
        _, header = _read_header(file)
    return {
        name: tuple(info["shape"])
        for name, info in header.items()
        if name != "__metadata__" and isinstance(info, dict) and isinstance(info.get("shape"), list)
    }


# --- Reading weights ----------------------------------------------------------------------------------

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class MappedTensors(dict):
    """Tensors that live in one memory-mapped file, and a way to give back the pages of one of them."""

    def __init__(self, data: mmap.mmap, tensors: dict[str, torch.Tensor]) -> None:
        import torch

        super().__init__(tensors)
        self._data = data
        self._base = torch.frombuffer(data, dtype=torch.uint8, count=1).data_ptr() if len(data) else 0

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages of `tensor` (one of ours, no longer needed: it was converted) from memory.

        Its whole pages only, so neighbours are untouched; a page read again later comes back from the
        file (the mapping is private, and gptcli never writes to it: a caller that edited a tensor in
        place would see the edit undone). Without this, converting the fp32 weights to
        bf16 or int8 keeps both copies resident, over twice the weights' size at peak.
        """
        start = tensor.data_ptr() - self._base
        if not 0 <= start < len(self._data) or not hasattr(self._data, "madvise"):
            return
        page = mmap.PAGESIZE
        first = -(-start // page) * page
        last = (start + tensor.numel() * tensor.element_size()) // page * page
        if last > first:
            self._data.madvise(mmap.MADV_DONTNEED, first, last - first)


def read_safetensors(path: Path) -> MappedTensors:
    """Every tensor of a .safetensors file, memory-mapped: nothing is copied, pages load when read.

    Why not `safetensors.safe_open`: gptcli needs the mmap itself, to give back the file pages of a
    weight once it has been converted to bf16 or int8 (`MappedTensors.release`, madvise), which the
    library does not expose; and a private (copy-on-write) mapping, so tensors are writable in place.

    The format is an 8-byte little-endian header size, a JSON header of {name: dtype, shape, offsets},
    then the data. The mapping is private (copy-on-write), so the tensors are writable and the file
    is never changed. Raises GptcliError saying what is wrong with the file.
    """
    import torch

    with open(path, "rb") as file:
        size, header = _read_header(file)
        data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise GptcliError(f"{name} has an unknown dtype {info.get('dtype')!r}")
        dtype = getattr(torch, _DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        count = math.prod(info["shape"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != count * itemsize or 8 + size + end > len(data):
            raise GptcliError(f"{name} does not fit in the file (truncated?)")
        if count == 0:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + size + begin)
        tensors[name] = flat.view(info["shape"])
    return MappedTensors(data, tensors)


class HugePages:
    """Anonymous memory the kernel may back with 2 MiB pages (transparent huge pages), for the weights
    a decoding step reads from end to end: streamed from 4 KiB pages (the file's mapping) the same
    matrix-vector products run about 10% slower, each page a TLB walk and a stop for the hardware
    prefetcher (docs/performance.md). Linux only (`madvise`); elsewhere tensors are plain copies.
    """

    ALIGN = 2 << 20

    def __init__(self, nbytes: int) -> None:
        import torch

        self.used = 0
        self.buffer: mmap.mmap | None = None
        if hasattr(mmap, "MADV_HUGEPAGE") and nbytes > 0:
            self.buffer = mmap.mmap(-1, nbytes + self.ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.buffer.madvise(mmap.MADV_HUGEPAGE)
            base = torch.frombuffer(self.buffer, dtype=torch.uint8, count=1).data_ptr()
            self.used = -base % self.ALIGN  # start on a 2 MiB boundary

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in this memory (a plain one when there is none, or no room)."""
        import torch

        count = math.prod(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if self.buffer is None or self.used + nbytes > len(self.buffer):
            return torch.empty(shape, dtype=dtype)
        tensor = torch.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.used).view(shape)
        self.used += -(-nbytes // 4096) * 4096
        return tensor

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.empty(tuple(tensor.shape), tensor.dtype).copy_(tensor)


# --- The layers ---------------------------------------------------------------------------------------


# From this many rows on, a matmul runs on oneDNN's prepacked fp32 weights when the model has them
# (`GPT2.pack_for_batches`): faster for batched decoding steps, no faster for one row or a long prompt.
BATCHED_ROWS = 8


def _onednn_pack(weight: torch.Tensor, block: int = 32) -> Any | None:
    """oneDNN's blocked layout of an fp32 or bf16 [out, in] weight for `block`-row inputs, or None where
    torch lacks it."""
    import torch

    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), block)
    except (AttributeError, RuntimeError):
        return None


def _cpu_bf16() -> bool:
    from gptcli.loading.cpu import cpu_has_bf16

    return bool(cpu_has_bf16())


def _onednn_linear(x: torch.Tensor, packed: Any, bias: torch.Tensor | None) -> torch.Tensor:
    import torch

    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


class Conv1D:
    """y = x W + b with W as transformers' Conv1D stores it, [in, out].

    For fp32 weights, which this layout suits (MKL's fp32 matrix-vector product runs at memory speed
    on it), as given (on a CPU, GPT2 gives it a copy in huge pages). With a oneDNN-packed copy
    (`pack`), batches of BATCHED_ROWS rows or more run on it instead.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight
        self.bias = bias
        self.packed: Any = None

    def pack(self) -> None:
        if self.packed is None:
            self.packed = _onednn_pack(self.weight.t())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        flat = x.reshape(-1, x.shape[-1])
        if self.packed is not None and flat.shape[0] >= BATCHED_ROWS:
            out = _onednn_linear(flat, self.packed, self.bias)
        else:
            out = torch.addmm(self.bias, flat, self.weight)
        return out.view(*x.shape[:-1], out.shape[-1])


class Linear:
    """y = x Wᵀ + b with W [out, in] in its own dtype (bf16, fp16 or fp32); x is cast to it and y back.

    bf16 weights must be [out, in]: torch's CPU bf16 kernel is many times slower on the [in, out]
    layout transformers keeps (docs/performance.md). Also the tied output layer, whose
    embedding table is [vocab, width] already, and which `rows` looks the input embeddings up in.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, *, rows: bool = False
    ) -> None:
        """`dtype`: the activations' dtype, which x comes in and y goes out in; `rows`: the weight is also
        an embedding table (`rows`), so it stays besides a packed copy."""
        import torch

        self.weight: torch.Tensor | None = weight
        self.weight_dtype = weight.dtype
        self.bias = bias
        self.dtype = dtype
        # bf16 on a CPU with bf16 instructions: oneDNN's packed layout multiplies one row at about half
        # fp32's time, where F.linear runs no faster than fp32 (docs/performance.md); without the
        # instructions oneDNN would emulate them, so F.linear stays.
        self.packed: Any = None
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _cpu_bf16():
            self.packed = _onednn_pack(weight, block=1)
            if self.packed is not None and not rows:
                self.weight = None  # the packed copy is the only one a product reads

    @classmethod
    def from_conv1d(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Linear:
        return cls(weight.t().contiguous(), bias, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        if self.packed is not None:
            flat = x.reshape(-1, x.shape[-1]).to(self.weight_dtype)
            out = _onednn_linear(flat, self.packed, None).view(*x.shape[:-1], -1).to(self.dtype)
        else:
            assert self.weight is not None
            out = F.linear(x.to(self.weight_dtype), self.weight).to(self.dtype)
        return out if self.bias is None else out + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        assert self.weight is not None, "built without rows=True"
        return F.embedding(ids, self.weight).to(self.dtype)


class TiedOutput:
    """The fp32 output layer on a CPU, tied to the token embeddings E [vocab, width]: logits = x Eᵀ.

    The product runs on a transposed copy Eᵀ [width, vocab] with addmm, a matrix-vector product MKL
    streams at memory speed on this layout; F.linear over E itself, as transformers runs it, is far
    slower for one token (docs/performance.md). The file's pages of E are given back as the copy is
    made (`release`); `rows` reads the few rows it needs from E, which come back from the page cache.
    Only the rounding differs from transformers' product (fp32 sums in another order).
    """

    _SLICE = 1024  # rows of the table copied (then given back) at a time

    def __init__(
        self,
        table: torch.Tensor,
        pages: HugePages | None = None,
        release: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """`release(rows)` gives back the file's pages of rows of `table` once they are copied: the copy
        is made a slice at a time, so the table is never resident twice (peak memory)."""
        import torch

        self.table = table
        shape = (table.shape[1], table.shape[0])  # [width, vocab]
        self.weight = pages.empty(shape, table.dtype) if pages else torch.empty(shape)
        for start in range(0, table.shape[0], self._SLICE):
            rows = table[start : start + self._SLICE]
            self.weight[:, start : start + len(rows)].copy_(rows.t())
            if release is not None:
                release(rows)
        self.zero = torch.zeros(table.shape[0], dtype=table.dtype)
        self.dtype = table.dtype
        self.packed: Any = None

    def pack(self) -> None:
        if self.packed is None:
            self.packed = _onednn_pack(self.table)  # [vocab, width] is already [out, in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        flat = x.reshape(-1, x.shape[-1])
        if self.packed is not None and flat.shape[0] >= BATCHED_ROWS:
            out = _onednn_linear(flat, self.packed, None)
        else:
            out = torch.addmm(self.zero, flat, self.weight)
        return out.view(*x.shape[:-1], out.shape[-1])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.embedding(ids, self.table)


def _quantized(
    method: str, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, *, rows: bool = False
) -> Any:
    """A [out, in] weight as `method` ("int8" or "int4") stores it. int4 needs torch's CPU kernel and a
    width of whole 32-weight groups; a layer without them is stored as int8 instead, and so is the
    output layer (`rows`: the tied embeddings) as llama.cpp keeps its output layer above 4 bits: in 4
    bits it cost the built-in model 4% perplexity, in 8 bits 0.8%, at about the same speed (its int8
    product is FBGEMM's; docs/performance.md)."""
    from gptcli.loading.quantize import Int4Linear, Int8Linear, can_int4

    if method == "int4" and can_int4(weight) and not rows:
        return Int4Linear(weight, bias, dtype, rows=rows)
    return Int8Linear(weight, bias, dtype, rows=rows)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (tanh approximation) in one fused kernel: transformers' NewGELUActivation writes the
    same formula as seven elementwise operations, each a pass over the activations; the results differ
    by rounding only (about 5e-7)."""
    import torch.nn.functional as F

    return F.gelu(x, approximate="tanh")


@dataclass
class Block:
    """One transformer layer's weights (pre-LayerNorm attention, then pre-LayerNorm MLP)."""

    ln_1: tuple[torch.Tensor, torch.Tensor]
    c_attn: Any  # Conv1D, Linear, quantize.Int8Linear or quantize.Int4Linear
    attn_proj: Any
    ln_2: tuple[torch.Tensor, torch.Tensor]
    c_fc: Any
    mlp_proj: Any


class KVCache:
    """Keys and values of every layer for one batch, allocated once for the whole generation.

    keys[layer] and values[layer] are [batch, head, max_length, head_dim]; the first `length` columns
    are filled. `real` marks which columns of each row hold a token rather than left padding (None: no
    padding anywhere, so attention needs no mask).
    """

    def __init__(
        self, config: GPT2Config, batch_size: int, max_length: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        import torch

        shape = (config.n_layer, batch_size, config.n_head, max_length, config.n_embd // config.n_head)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.real: torch.Tensor | None = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices), e.g. to stop computing rows that are done."""
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)
        if self.real is not None:
            self.real = self.real.index_select(0, rows)

    @classmethod
    def gather(cls, config: GPT2Config, rows: list[tuple[KVCache, int, int]], capacity: int) -> KVCache:
        """A new cache made of rows of other caches, right-aligned, with room for `capacity` columns.

        Each (cache, row, length) takes the last `length` filled columns of that row. Shorter rows get
        left padding, marked in `real`, as `left_pad` lays out prompts: every row's last token sits in
        the last column, and its positions are its own, so a row computes what it computes alone. This
        is how a prompt prefilled on its own joins a batch that is already decoding.
        """
        first = rows[0][0]
        merged = cls.empty_for(config, [length for _, _, length in rows], capacity, first)
        for i, (cache, row, length) in enumerate(rows):
            merged.put(i, cache, row, length)
        return merged

    @classmethod
    def empty_for(cls, config: GPT2Config, lengths: list[int], capacity: int, like: KVCache) -> KVCache:
        """A cache for rows of these lengths, right-aligned (see `gather`), to be filled with `put`."""
        import torch

        width = max(lengths)
        merged = cls(config, len(lengths), max(capacity, width), like.keys.dtype, like.keys.device)
        # Padding columns are masked out, but a masked NaN still poisons attention (0 * NaN): zero them.
        merged.keys.zero_()
        merged.values.zero_()
        merged.length = width
        if any(length != width for length in lengths):
            merged.real = torch.zeros(
                len(lengths), merged.keys.shape[3], dtype=torch.bool, device=like.keys.device
            )
            for i, length in enumerate(lengths):
                merged.real[i, width - length : width] = True
        return merged

    def put(self, i: int, cache: KVCache, row: int, length: int) -> None:
        """Row `i` becomes the last `length` filled columns of `cache`'s row `row`, right-aligned."""
        end, width = cache.length, self.length
        self.keys[:, i, :, width - length : width] = cache.keys[:, row, :, end - length : end]
        self.values[:, i, :, width - length : width] = cache.values[:, row, :, end - length : end]


class GPT2:
    """GPT-2's forward pass over a checkpoint's tensors, for inference."""

    def __init__(
        self,
        config: GPT2Config,
        weights: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        quantize: str | None = None,
    ) -> None:
        """Args:
        weights: named as in transformers' GPT2Model ("h.0.attn.c_attn.weight"; a "transformer."
            prefix is dropped), in any dtype and on the CPU (e.g. memory-mapped from the file).
        dtype: what the matmul weights are stored in (default: as given). Activations, the KV cache,
            biases and LayerNorms are float32 on the CPU, whatever the weights: CPUs have no fast
            low-precision elementwise kernels, and fp32 keeps the residual stream exact. On a GPU
            everything is in `dtype`.
        quantize: "int8" or "int4" stores the matmul weights so (gptcli.loading.quantize).
        """
        import torch

        self.config = config
        w = {name.removeprefix("transformer."): t for name, t in weights.items()}
        self._check(w)
        device = device or torch.device("cpu")
        dtype = dtype or w["wte.weight"].dtype
        self.device = device
        self.dtype = torch.float32 if device.type == "cpu" else dtype  # activations and the KV cache
        self.quantize = quantize
        self.weight_dtype = dtype  # what the matmul weights are stored in (before any quantizing)

        def small(name: str) -> torch.Tensor:  # biases, LayerNorms, positions: in the activations' dtype
            return w[name].to(device=device, dtype=self.dtype)

        def release(name: str) -> None:
            """The file's copy of a weight that was converted is not needed any more: drop its pages."""
            if isinstance(weights, MappedTensors):
                weights.release(w[name])

        # fp32 on a CPU: the weights every step reads go to huge pages, the file's pages are given back.
        plain = quantize is None and dtype == torch.float32 and device.type == "cpu"
        self._pages = HugePages(4 * config.num_parameters if plain else 0)

        def matmul(name: str) -> Any:
            weight = w[name].to(device=device, dtype=dtype)  # no copy when it already is (fp32 on CPU)
            bias = small(name.replace(".weight", ".bias"))
            if quantize is not None:
                layer: Any = _quantized(quantize, weight.t(), bias, self.dtype)
                release(name)
            elif weight.dtype == torch.float32:
                if plain:
                    weight = self._pages.copy(weight)
                    release(name)
                layer = Conv1D(weight, bias)
            else:
                layer = Linear.from_conv1d(weight, bias, self.dtype)
                release(name)
            return layer

        self.wpe = small("wpe.weight")
        self.ln_f = (small("ln_f.weight"), small("ln_f.bias"))
        self.blocks = [
            Block(
                ln_1=(small(f"h.{i}.ln_1.weight"), small(f"h.{i}.ln_1.bias")),
                c_attn=matmul(f"h.{i}.attn.c_attn.weight"),
                attn_proj=matmul(f"h.{i}.attn.c_proj.weight"),
                ln_2=(small(f"h.{i}.ln_2.weight"), small(f"h.{i}.ln_2.bias")),
                c_fc=matmul(f"h.{i}.mlp.c_fc.weight"),
                mlp_proj=matmul(f"h.{i}.mlp.c_proj.weight"),
            )
            for i in range(config.n_layer)
        ]
        # The output layer is tied to the token embeddings (GPT-2): one table serves both, int8 too.
        wte = w["wte.weight"].to(device=device, dtype=dtype)
        if quantize is not None:
            self.lm_head: Any = _quantized(quantize, wte, None, self.dtype, rows=True)
        elif wte.dtype == torch.float32 and device.type == "cpu":
            self.lm_head = TiedOutput(
                wte, self._pages, weights.release if isinstance(weights, MappedTensors) else None
            )
        else:
            self.lm_head = Linear(wte, None, self.dtype, rows=True)
        if quantize is not None or wte.data_ptr() != w["wte.weight"].data_ptr():
            release("wte.weight")  # (TiedOutput gave its pages back as it copied them)

    def matmuls(self) -> list[Any]:
        """The weight matmuls one token passes through, in order, the output layer last."""
        return [m for b in self.blocks for m in (b.c_attn, b.attn_proj, b.c_fc, b.mlp_proj)] + [self.lm_head]

    def decode_threads(self, requested: int | None = None) -> int:
        """Threads for the steps of one sequence's decoding: `requested`, else measured once per machine
        and weight format on these matmuls (gptcli.loading.cpu). On a GPU the CPU's threads hardly matter."""
        import torch

        from gptcli.loading.cpu import decode_threads

        if self.device.type != "cpu":
            return requested or 1
        width, hidden = self.config.n_embd, 4 * self.config.n_embd
        x, h = torch.randn(1, width, dtype=self.dtype), torch.randn(1, hidden, dtype=self.dtype)

        def step() -> None:
            with torch.inference_mode():
                for b in self.blocks:
                    b.c_attn(x), b.attn_proj(x), b.c_fc(x), b.mlp_proj(h)
                self.lm_head(x)

        kind = self.quantize or str(self.weight_dtype).removeprefix("torch.")
        return decode_threads(kind, step, requested)

    def pack_for_batches(self) -> None:
        """Give the fp32 matmuls a oneDNN-packed copy of their weights, for batched steps (BATCHED_ROWS
        rows or more): about a second for GPT-2-124M, and memory for a second copy of the matmul weights;
        worth it for long batched work (`--each-line`), so the callers decide (docs/performance.md)."""
        for layer in self.matmuls():
            if isinstance(layer, Conv1D | TiedOutput):
                layer.pack()

    def _check(self, w: dict[str, torch.Tensor]) -> None:
        check_shapes(self.config, {name: tuple(t.shape) for name, t in w.items()})
        self.num_parameters = self.config.num_parameters

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        hooks: Hooks | None = None,
    ) -> torch.Tensor:
        """Logits [batch, positions, vocab] (the last `logits_to_keep` positions, 0: all), weights' dtype.

        Args:
            input_ids, position_ids: [batch, new].
            mask: [batch, new] bool, False for left padding; None when there is none. With a cache, the
                mask of the columns already cached is the cache's own.
            cache: where the new keys and values go (after the `cache.length` columns already there),
                and what the new tokens attend to besides themselves.
            hooks: functions at named points (`hook_names`), each called as fn(x, name) with the
                activation there, and returning None (read it) or a tensor of its shape that replaces it.
                None or empty: no hook is looked for, and the pass is the decode path's, kernel for
                kernel. With `logits_to_keep`, the last block's points after its keys and values hold
                only the kept positions.
        """
        import torch
        import torch.nn.functional as F

        new = input_ids.shape[1]
        start = 0 if cache is None else cache.length
        if cache is not None and mask is not None:
            if cache.real is None:
                cache.real = torch.ones(
                    cache.keys.shape[1], cache.keys.shape[3], dtype=torch.bool, device=mask.device
                )
            cache.real[:, start : start + new] = mask
        real = mask if cache is None else cache.real
        attn_mask = _attention_mask(real, start, new, input_ids.device)
        # Many queries and no padding: SDPA's causal mode, the path transformers takes too.
        causal = attn_mask is None and new > 1

        if hooks:
            top = _At(hooks, "")
            x = top("hook_embed", self.lm_head.rows(input_ids)) + top(
                "hook_pos_embed", F.embedding(position_ids, self.wpe)
            )
        else:
            x = self.lm_head.rows(input_ids) + F.embedding(position_ids, self.wpe)
        attention = _Attention(start, attn_mask, causal, 0)
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            if layer == last and 0 < logits_to_keep < new:
                # Past the last block's keys and values, only the kept positions matter: their queries
                # alone go on through attention, its projection and the MLP (a prompt's prefill keeps
                # one position of hundreds, so this skips most of a block's work).
                kept = _kept_queries(attn_mask, causal, start + new, logits_to_keep, x.device)
                attention = _Attention(start, *kept, logits_to_keep)
            at = _At(hooks, f"blocks.{layer}.") if hooks else None
            x = self._block(layer, block, x, attention, cache, at)
        if cache is not None:
            cache.length = start + input_ids.shape[1]
        eps = self.config.layer_norm_epsilon
        if hooks:
            x = _layer_norm(x, self.ln_f, eps, _At(hooks, "ln_final."))
        else:
            x = F.layer_norm(x, (x.shape[-1],), *self.ln_f, eps)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits: torch.Tensor = self.lm_head(x)
        return logits

    def _block(
        self,
        layer: int,
        block: Block,
        x: torch.Tensor,
        attention: _Attention,
        cache: KVCache | None,
        at: _At | None,
    ) -> torch.Tensor:
        """One block on the stream x [batch, new, width]; `at`: its hooks (None: none, the decode path,
        which calls the kernels directly: a step of a small model is a few milliseconds, and a helper
        call or an import per kernel would show in it)."""
        import torch.nn.functional as F

        batch, new = x.shape[:2]
        heads, width, eps = self.config.n_head, self.config.n_embd, self.config.layer_norm_epsilon
        start = attention.start
        if at is None:
            h = F.layer_norm(x, (width,), *block.ln_1, eps)
        else:
            x = at("hook_resid_pre", x)
            h = _layer_norm(x, block.ln_1, eps, at.sub("ln1."))
        q, k, v = block.c_attn(h).split(width, dim=2)
        q, k, v = (t.view(batch, new, heads, -1).transpose(1, 2) for t in (q, k, v))
        if at is not None:  # [batch, new, head, d_head], as TransformerLens shows them
            q, k, v = (at.heads(f"attn.hook_{name}", t) for name, t in (("q", q), ("k", k), ("v", v)))
        if cache is not None:
            cache.keys[layer, :, :, start : start + new] = k
            cache.values[layer, :, :, start : start + new] = v
            if start:  # attend to the cached columns too
                k = cache.keys[layer, :, :, : start + new]
                v = cache.values[layer, :, :, : start + new]
        residual = x
        if attention.kept:
            q, residual = q[:, :, -attention.kept :], residual[:, -attention.kept :]
            new = attention.kept
        if at is None or not at.wants("attn.hook_pattern"):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention.mask, is_causal=attention.causal)
        else:
            y = attention.with_pattern(q, k, v, at)
        y = y.transpose(1, 2)  # [batch, new, head, d_head]
        if at is not None:
            y = at("attn.hook_z", y)
            out = at("hook_attn_out", block.attn_proj(y.reshape(batch, new, width)))
            x = at("hook_resid_mid", out + residual)
        else:
            x = block.attn_proj(y.reshape(batch, new, width)) + residual
        residual = x
        if at is None:
            h = F.layer_norm(x, (width,), *block.ln_2, eps)
            mlp: torch.Tensor = block.mlp_proj(gelu_new(block.c_fc(h)))
            return residual + mlp
        h = _layer_norm(x, block.ln_2, eps, at.sub("ln2."))
        post = at("mlp.hook_post", gelu_new(at("mlp.hook_pre", block.c_fc(h))))
        return at("hook_resid_post", residual + at("hook_mlp_out", block.mlp_proj(post)))


# --- Hook points: what `forward` lets a caller read or replace on the way ------------------------------

HookFn = Callable[["torch.Tensor", str], "torch.Tensor | None"]
Hooks = Mapping[str, HookFn]

# Per block, with their shapes (TransformerLens' names; blocks count from 0 here).
BLOCK_POINTS = {
    "hook_resid_pre": "[batch, pos, width]: the block's input",
    "ln1.hook_scale": "[batch, pos, 1]: the first LayerNorm's divisor, sqrt(var + eps)",
    "ln1.hook_normalized": "[batch, pos, width]: centred and divided, before the gain and bias",
    "attn.hook_q": "[batch, pos, head, d_head]",
    "attn.hook_k": "[batch, pos, head, d_head]",
    "attn.hook_v": "[batch, pos, head, d_head]",
    "attn.hook_pattern": "[batch, head, query, key]: the attention weights (float32)",
    "attn.hook_z": "[batch, pos, head, d_head]: each head's output before the output projection",
    "hook_attn_out": "[batch, pos, width]: the attention's output, projection bias included",
    "hook_resid_mid": "[batch, pos, width]: the stream after attention, before the MLP",
    "ln2.hook_scale": "[batch, pos, 1]",
    "ln2.hook_normalized": "[batch, pos, width]",
    "mlp.hook_pre": "[batch, pos, inner]: before the GELU",
    "mlp.hook_post": "[batch, pos, inner]: after the GELU",
    "hook_mlp_out": "[batch, pos, width]: the MLP's output",
    "hook_resid_post": "[batch, pos, width]: the block's output",
}
MODEL_POINTS = {
    "hook_embed": "[batch, pos, width]: the token embeddings",
    "hook_pos_embed": "[batch, pos, width]: the position embeddings",
    "ln_final.hook_scale": "[batch, pos, 1]: the final LayerNorm's divisor",
    "ln_final.hook_normalized": "[batch, pos, width]",
}


def hook_names(n_layer: int) -> list[str]:
    """Every hook point's name of a model with `n_layer` blocks, in the order a pass reaches them."""
    blocks = [f"blocks.{layer}.{point}" for layer in range(n_layer) for point in BLOCK_POINTS]
    return ["hook_embed", "hook_pos_embed", *blocks, "ln_final.hook_scale", "ln_final.hook_normalized"]


class _At:
    """The hooks of one part of the model (a name prefix such as "blocks.3."), called by point name."""

    __slots__ = ("hooks", "prefix")

    def __init__(self, hooks: Hooks, prefix: str) -> None:
        self.hooks = hooks
        self.prefix = prefix

    def sub(self, prefix: str) -> _At:
        return _At(self.hooks, self.prefix + prefix)

    def wants(self, point: str) -> bool:
        return self.prefix + point in self.hooks

    def replacement(self, point: str, x: torch.Tensor) -> torch.Tensor | None:
        """What the hook at `point` returns for x (None: no hook, or it only read x)."""
        name = self.prefix + point
        fn = self.hooks.get(name)
        return None if fn is None else fn(x, name)

    def __call__(self, point: str, x: torch.Tensor) -> torch.Tensor:
        out = self.replacement(point, x)
        return x if out is None else out

    def heads(self, point: str, t: torch.Tensor) -> torch.Tensor:
        """A [batch, head, pos, d_head] tensor through the hook at `point`, which sees [batch, pos, head,
        d_head]."""
        if not self.wants(point):
            return t
        return self(point, t.transpose(1, 2)).transpose(1, 2)


def _layer_norm(
    x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor], eps: float, at: _At | None
) -> torch.Tensor:
    """LayerNorm, through its scale and normalized points when a hook asks for them; reading them
    leaves the result the kernel's."""
    import torch.nn.functional as F

    if at is None or not (at.wants("hook_scale") or at.wants("hook_normalized")):
        return F.layer_norm(x, (x.shape[-1],), *weights, eps)
    centred = x - x.mean(dim=-1, keepdim=True)
    scale = (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
    new_scale = at.replacement("hook_scale", scale)
    normalized = centred / (scale if new_scale is None else new_scale)
    new_normalized = at.replacement("hook_normalized", normalized)
    if new_scale is None and new_normalized is None:  # only read: the stream stays the kernel's
        return F.layer_norm(x, (x.shape[-1],), *weights, eps)
    return (normalized if new_normalized is None else new_normalized) * weights[0] + weights[1]


@dataclass
class _Attention:
    """How a block's queries attend: from column `start`, with a bool mask or SDPA's causal mode, and
    `kept` > 0 when only the last `kept` queries go on (the last block under `logits_to_keep`)."""

    start: int
    mask: torch.Tensor | None
    causal: bool
    kept: int

    def with_pattern(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: _At) -> torch.Tensor:
        """softmax(q kᵀ / sqrt(d_head)) v per head, [batch, head, query, d_head], for a hook that wants
        the pattern: it is formed in float32 as transformers' eager attention forms it, and feeds the
        output only when the hook replaces it; reading it leaves the stream SDPA's, exactly as it was."""
        import torch
        import torch.nn.functional as F

        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if self.mask is not None:
            scores = scores.masked_fill(~self.mask, float("-inf"))
        elif self.causal:
            columns = k.shape[2]
            query_at = torch.arange(columns - q.shape[2], columns, device=q.device)[:, None]
            scores = scores.masked_fill(
                torch.arange(columns, device=q.device)[None, :] > query_at, float("-inf")
            )
        replaced = at.replacement("attn.hook_pattern", torch.softmax(scores, dim=-1))
        if replaced is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)
        return (replaced.to(v.dtype) @ v).to(q.dtype)


def _kept_queries(
    attn_mask: torch.Tensor | None, causal: bool, columns: int, kept: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The attention mask for the last `kept` queries of `columns` alone: (mask, SDPA's causal mode).

    SDPA's causal mode aligns queries with the first columns, which is wrong for the last ones: they
    get an explicit mask instead (none for one query, which sees every column).
    """
    import torch

    if attn_mask is not None:
        return attn_mask[:, :, -kept:], False
    if not causal or kept == 1:
        return None, False
    query_at = torch.arange(columns - kept, columns, device=device)[:, None]
    return torch.arange(columns, device=device)[None, :] <= query_at, False


def _attention_mask(
    real: torch.Tensor | None, start: int, new: int, device: torch.device
) -> torch.Tensor | None:
    """The bool mask [batch, 1, new, start + new] for SDPA: causal, and never a padding column.

    None where no column is padding and no mask is needed: one new token then attends to every column,
    and the tokens of an empty cache use SDPA's causal mode. A padding query attends to itself alone, so
    no row of the mask is all False (a fully masked row gives NaN, which the next layer's keys would
    carry into real rows).
    """
    import torch

    if real is None:
        if new == 1 or start == 0:
            return None
        # Several new tokens after cached ones: causal mode would align them with the first columns.
        real = torch.ones(1, start + new, dtype=torch.bool, device=device)
    columns = start + new
    keys = real[:, None, None, :columns]
    if new == 1:
        return keys
    query_at = torch.arange(start, columns, device=device)[:, None]
    key_at = torch.arange(columns, device=device)[None, :]
    return (keys & (key_at <= query_at)) | (key_at == query_at)


class CachedDecoder:
    """A GPT2 run one step at a time over a KVCache: prefill the prompts, then one token per row per step.

    Returns float32 logits of the last position, the reference numerics for sampling and logprobs.
    """

    def __init__(self, net: GPT2, batch_size: int, max_length: int, *, cache: KVCache | None = None) -> None:
        """A fresh cache for `batch_size` rows of `max_length` columns, or `cache` (e.g. a gathered one)."""
        self.net = net
        self.cache = (
            cache if cache is not None else KVCache(net.config, batch_size, max_length, net.dtype, net.device)
        )

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.bool()
        logits = self.net.forward(input_ids, position_ids, mask=mask, cache=self.cache, logits_to_keep=1)
        return logits[:, -1].float()

    def step(self, next_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Feed one new token per row ([batch, 1]) at `position_ids` ([batch, 1])."""
        import torch

        mask = None
        if self.cache.real is not None:
            mask = torch.ones_like(next_ids, dtype=torch.bool)
        logits = self.net.forward(next_ids, position_ids, mask=mask, cache=self.cache, logits_to_keep=1)
        return logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows only (indices into the current batch)."""
        self.cache.keep(rows)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (undo): the next step writes at `length`."""
        self.cache.length = min(self.cache.length, length)

    def extend(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Feed several new tokens of one unpadded row ([1, n]); float32 logits of each [n, vocab]."""
        logits = self.net.forward(ids, position_ids, cache=self.cache, logits_to_keep=ids.shape[1])
        return logits[0].float()


# --- The output layer on stream vectors (gptcli lens) ---------------------------------------------


def final_logits(net: GPT2, x: torch.Tensor) -> torch.Tensor:
    """The output layer applied to residual-stream vectors x [..., width]: lm_head(ln_f(x)), float32."""
    import torch.nn.functional as F

    x = F.layer_norm(x, (net.config.n_embd,), *net.ln_f, net.config.layer_norm_epsilon)
    logits: torch.Tensor = net.lm_head(x)
    return logits.float()
