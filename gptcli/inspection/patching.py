"""Activation patching: which layer and position cause a prediction.

Run the corrupted input with one activation taken from the clean run, and see how much of the clean
answer comes back, measured by the logit difference LD = logit[target] - logit[foil] at the last
position: score = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt). 1: that activation alone
restores the clean answer; 0: it does nothing (Meng et al., "Locating and Editing Factual
Associations in GPT", 2022; Heimersheim & Nanda, "How to use and interpret activation patching", 2024).

Three grids, block x position: `resid_pre` (block l's input at position p), `attn_out` and `mlp_out`
(its attention's and MLP's output at p); per head (`heads`): the head's z at every position. The
corruption is a second prompt of the same token length, or ROME's noise (`noise`): Gaussian noise of
3 x the token embeddings' standard deviation added to the subject's token embeddings, a fixed seed,
averaged over samples.

Every patched run is one row of a batch through the hook points (gptcli.inspection.hooks): a hook per
(point, block) writes the clean values into the rows that patch there, so a grid of 12 x 20 cells is a
few batched passes rather than 240 single ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gptcli.errors import UsageError
from gptcli.inspection.attribution import describe
from gptcli.inspection.hooks import num_heads, num_layers, run_with_cache, run_with_hooks, runs_gptcli
from gptcli.inspection.tracing import Prompt, encode

if TYPE_CHECKING:
    import torch

    from gptcli.inspection.pictures import Grid
    from gptcli.loading.models import LoadedModel

GRIDS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
HEADS = "attn.hook_z"
TOKENS_PER_PASS = 4096  # rows x positions of one batched pass: bounds its activations' memory
KV_BYTES = 256 << 20  # and the keys and values its rows start from
NOISE_SCALE = 3.0  # ROME: 3 x the embeddings' standard deviation
SEED = 0
SAME = 1e-4  # logit differences closer than this (relative) are the same: there is nothing to restore


@dataclass(frozen=True)
class Patch:
    """Clean values written into a corrupted run: `point` of block `layer` (from 0) at `positions`
    (None: all), for one head (`head`, with point attn.hook_z) or the whole vector."""

    point: str
    layer: int
    positions: tuple[int, ...] | None = None
    head: int | None = None


@dataclass
class Setup:
    """What every patched run shares: the corrupted input, the clean activations, the tokens compared."""

    ids: torch.Tensor  # [1, n]: the corrupted prompt (with noise: the clean one)
    clean: dict[str, torch.Tensor]  # hook name -> [n, ...], the clean run's values
    clean_logits: torch.Tensor  # [vocab] at the last position, float32
    target: int
    foil: int
    noise: torch.Tensor | None = None  # [samples, n, width], added to the token embeddings
    prefix: Any = None  # gptcli's GPT-2: the corrupted run's keys and values (gptcli.gpt2.KVCache)

    @property
    def samples(self) -> int:
        return 1 if self.noise is None else len(self.noise)

    @property
    def clean_diff(self) -> float:
        return float(self.clean_logits[self.target] - self.clean_logits[self.foil])


@dataclass
class Patching:
    """The scores of one clean/corrupt pair."""

    clean: Prompt
    corrupt: Prompt | None  # None: noise on the clean prompt
    target: dict[str, Any]
    foil: dict[str, Any]
    clean_diff: float
    corrupt_diff: float
    scores: dict[str, list[list[float | None]]] = field(default_factory=dict)  # grid -> [block][position]
    heads: list[list[float | None]] | None = None  # [block][head]
    subject: list[int] | None = None  # noise: the positions it was added to
    samples: int = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clean": {"tokens": self.clean.tokens},
            "corrupt": {"tokens": (self.corrupt or self.clean).tokens},
            "target": self.target,
            "foil": self.foil,
            "clean_diff": self.clean_diff,
            "corrupt_diff": self.corrupt_diff,
            "scores": self.scores,
        }
        if self.heads is not None:
            out["heads"] = self.heads
        if self.subject is not None:
            out["noise"] = {
                "subject": self.subject,
                "samples": self.samples,
                "scale": NOISE_SCALE,
                "seed": SEED,
            }
        return out


def check_patch_options(*, noise: bool, corrupt: str | None, subject: str | None, samples: int) -> None:
    """Refuse options that cannot work together (before a model loads, too)."""
    if noise and corrupt is not None:
        raise UsageError("--noise corrupts the clean prompt itself; give no CORRUPT prompt with it")
    if not noise and corrupt is None:
        raise UsageError("give a CORRUPT prompt, or --noise --subject TEXT")
    if noise and not subject:
        raise UsageError("--noise needs --subject TEXT: the part of the prompt to add noise to")
    if subject is not None and not noise:
        raise UsageError("--subject goes with --noise")
    if samples < 1:
        raise UsageError("--samples must be at least 1")


def subject_positions(prompt: Prompt, subject: str) -> list[int]:
    """The positions of the tokens that hold the first occurrence of `subject` in the prompt."""
    pieces = [bytes.fromhex(t["bytes"]) for t in prompt.tokens]
    joined = b"".join(pieces)
    start = joined.find(subject.encode("utf-8"))
    if not subject or start < 0:
        raise UsageError(f"--subject {subject!r} is not in the prompt")
    end = start + len(subject.encode("utf-8"))
    positions, offset = [], 0
    for i, piece in enumerate(pieces):
        if offset < end and offset + len(piece) > start:
            positions.append(i)
        offset += len(piece)
    return positions


def patch(
    lm: LoadedModel,
    clean: str,
    corrupt: str | None = None,
    *,
    subject: str | None = None,
    samples: int = 10,
    target: int | None = None,
    foil: int | None = None,
    heads: bool = False,
    grids: tuple[str, ...] = tuple(GRIDS),
) -> Patching:
    """Activation patching of `clean` into `corrupt` (or into `clean` with noise on `subject`): the
    scores of every block x position for each grid, and of every head with `heads`."""
    check_patch_options(noise=corrupt is None, corrupt=corrupt, subject=subject, samples=samples)
    clean_prompt = encode(lm, clean)
    corrupt_prompt = encode(lm, corrupt) if corrupt is not None else None
    if corrupt_prompt is not None and len(corrupt_prompt.ids) != len(clean_prompt.ids):
        raise UsageError(
            f"the clean prompt is {len(clean_prompt.ids)} tokens and the corrupted one "
            f"{len(corrupt_prompt.ids)}: patching needs prompts of the same token length"
        )
    subject_at = subject_positions(clean_prompt, subject) if subject is not None else None
    setup = prepare(
        lm,
        clean_prompt.ids,
        None if corrupt_prompt is None else corrupt_prompt.ids,
        subject=subject_at,
        samples=samples,
        target=target,
        foil=foil,
    )
    clean_diff, corrupt_diff = setup.clean_diff, diffs(lm, setup, [()])[0]
    result = Patching(
        clean_prompt,
        corrupt_prompt,
        describe(lm, setup.target),
        describe(lm, setup.foil),
        clean_diff,
        corrupt_diff,
        subject=subject_at,
        samples=setup.samples,
    )
    n, layers = len(clean_prompt.ids), num_layers(lm)
    cells: list[tuple[Patch, ...]] = [
        (Patch(GRIDS[grid], layer, (p,)),) for grid in grids for layer in range(layers) for p in range(n)
    ]
    if heads:
        cells += [(Patch(HEADS, layer, None, h),) for layer in range(layers) for h in range(num_heads(lm))]
    values = [score(d, clean_diff, corrupt_diff) for d in diffs(lm, setup, cells)]
    for i, grid in enumerate(grids):
        flat = values[i * layers * n : (i + 1) * layers * n]
        result.scores[grid] = [flat[layer * n : (layer + 1) * n] for layer in range(layers)]
    if heads:
        flat = values[len(grids) * layers * n :]
        count = num_heads(lm)
        result.heads = [flat[layer * count : (layer + 1) * count] for layer in range(layers)]
    return result


def same(clean: float, corrupt: float) -> bool:
    """Whether two logit differences are one up to rounding (batched runs sum in another order)."""
    return abs(clean - corrupt) <= SAME * max(1.0, abs(clean))


def score(diff: float, clean: float, corrupt: float) -> float | None:
    """(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt); None when the two runs do not differ."""
    return None if same(clean, corrupt) else (diff - corrupt) / (clean - corrupt)


def prepare(
    lm: LoadedModel,
    clean_ids: list[int],
    corrupt_ids: list[int] | None,
    *,
    subject: list[int] | None = None,
    samples: int = 10,
    target: int | None = None,
    foil: int | None = None,
) -> Setup:
    """The clean run's activations at every patchable point and the tokens compared: `target` (default:
    the clean top-1) and `foil` (default: the corrupted top-1, or the clean second when they agree).
    `corrupt_ids` None: the clean prompt with noise on the `subject` positions."""
    import torch

    layers = num_layers(lm)
    points = [*GRIDS.values(), HEADS]
    names = [f"blocks.{layer}.{point}" for layer in range(layers) for point in points]
    with torch.inference_mode():
        clean_tensor = torch.tensor([clean_ids], device=lm.device)
        logits, cache = run_with_cache(lm, clean_tensor, names)
        clean = {name: value[0] for name, value in cache.items()}
        clean_logits = logits[0, -1].float()
        noise = None
        if corrupt_ids is None:
            width = clean[names[0]].shape[-1]
            noise = _noise(lm, len(clean_ids), width, subject or [], samples)
            ids = clean_tensor
        else:
            ids = torch.tensor([corrupt_ids], device=lm.device)
        setup = Setup(ids, clean, clean_logits, -1, -1, noise, _prefix(lm, ids, noise))
        corrupt_logits = _patched_logits(lm, setup, [()]).mean(dim=0)
    setup.target = int(clean_logits.argmax()) if target is None else target
    if foil is None:
        foil = int(corrupt_logits.argmax())
        if foil == setup.target:
            foil = int(clean_logits.topk(2).indices[1])
    if foil == setup.target:
        raise UsageError("the foil is the target token: their logit difference is 0 by definition")
    setup.foil = foil
    return setup


def diffs(lm: LoadedModel, setup: Setup, cells: list[tuple[Patch, ...]]) -> list[float]:
    """The logit difference of the corrupted run with each cell's patches (averaged over the noise
    samples), batched: cells that patch from the same position on share passes, as many per pass as
    TOKENS_PER_PASS and KV_BYTES allow."""
    import torch

    n, samples = setup.ids.shape[1], setup.samples
    starts: dict[int, list[int]] = {}
    for i, patches in enumerate(cells):
        starts.setdefault(_first_position(setup, patches), []).append(i)
    out = [0.0] * len(cells)
    with torch.inference_mode():
        for start, members in starts.items():
            per_pass = max(
                1, min(TOKENS_PER_PASS // ((n - start) * samples), _rows_of_cache(setup) // samples)
            )
            for first in range(0, len(members), per_pass):
                chosen = members[first : first + per_pass]
                logits = _patched_logits(lm, setup, [cells[i] for i in chosen], start)
                ld = (logits[:, setup.target] - logits[:, setup.foil]).view(len(chosen), samples).mean(dim=1)
                for i, value in zip(chosen, ld.tolist(), strict=True):
                    out[i] = value
    return out


def _first_position(setup: Setup, patches: tuple[Patch, ...]) -> int:
    """Where the rows of a cell start computing: a patch at position p changes nothing before p
    (attention is causal), so with the corrupted run's keys and values of the first p positions
    (`Setup.prefix`) the pass starts at p. Without them, at 0."""
    if setup.prefix is None:
        return 0
    n = setup.ids.shape[1]
    return min((0 if one.positions is None else min(one.positions) for one in patches), default=n - 1)


def _rows_of_cache(setup: Setup) -> int:
    """How many rows of keys and values (the whole prompt's) fit in KV_BYTES."""
    if setup.prefix is None:
        return TOKENS_PER_PASS
    keys = setup.prefix.keys
    row = 2 * keys[:, :1].numel() * keys.element_size()
    return max(1, KV_BYTES // int(row))


def _patched_logits(
    lm: LoadedModel, setup: Setup, chunk: list[tuple[Patch, ...]], start: int = 0
) -> torch.Tensor:
    """Last-position float32 logits [cells x samples, vocab]: row c * samples + s is cell c, sample s.
    The pass computes the positions from `start` on, over the prefix's keys and values before it."""
    import torch

    samples = setup.samples
    rows = len(chunk) * samples
    groups: dict[str, list[tuple[int, Patch]]] = {}
    for i, patches in enumerate(chunk):
        for one in patches:
            name = f"blocks.{one.layer}.{one.point}"
            groups.setdefault(name, []).extend((i * samples + s, one) for s in range(samples))
    hooks: dict[str, Any] = {name: _writer(setup.clean[name], group) for name, group in groups.items()}
    if setup.noise is not None:
        noise = setup.noise.repeat(len(chunk), 1, 1)  # row r: sample r % samples
        hooks["hook_embed"] = lambda x, _: x + noise[:, noise.shape[1] - x.shape[1] :].to(x.dtype)
    if start == 0 or setup.prefix is None:
        logits = run_with_hooks(lm, setup.ids.expand(rows, -1), hooks, logits_to_keep=1)
        return logits[:, -1].float()
    from gptcli.gpt2 import KVCache

    assert lm.net is not None
    n = setup.ids.shape[1]
    cache = KVCache(lm.net.config, rows, n, lm.net.dtype, lm.net.device)
    cache.keys[:, :, :, :start] = setup.prefix.keys[:, :, :, :start].repeat(1, len(chunk), 1, 1, 1)
    cache.values[:, :, :, :start] = setup.prefix.values[:, :, :, :start].repeat(1, len(chunk), 1, 1, 1)
    cache.length = start
    positions = torch.arange(start, n, device=lm.device).expand(rows, -1)
    ids = setup.ids[:, start:].expand(rows, -1)
    logits = lm.net.forward(ids, positions, cache=cache, logits_to_keep=1, hooks=hooks)
    return logits[:, -1].float()


def _prefix(lm: LoadedModel, ids: torch.Tensor, noise: torch.Tensor | None) -> Any:
    """The corrupted run's keys and values on gptcli's GPT-2 (a KVCache, one row per noise sample),
    which patched runs start from; None for a transformers model (they run every position)."""
    import torch

    if not runs_gptcli(lm):
        return None
    from gptcli.gpt2 import KVCache

    assert lm.net is not None
    rows, n = 1 if noise is None else len(noise), ids.shape[1]
    cache = KVCache(lm.net.config, rows, n, lm.net.dtype, lm.net.device)
    hooks: dict[str, Any] = {} if noise is None else {"hook_embed": lambda x, _: x + noise.to(x.dtype)}
    positions = torch.arange(n, device=lm.device).expand(rows, -1)
    lm.net.forward(ids.expand(rows, -1), positions, cache=cache, logits_to_keep=1, hooks=hooks)
    return cache


def _writer(clean: torch.Tensor, group: list[tuple[int, Patch]]) -> Any:
    """A hook writing the clean values [n, ...] into its rows, at their positions (and head)."""

    def write(x: torch.Tensor, _name: str) -> torch.Tensor:
        x = x.clone()
        # Under logits_to_keep, the last block's points after its keys and values hold the kept
        # positions only: a patch before them cannot reach the last position's logits.
        offset = clean.shape[0] - x.shape[1]
        for row, one in group:
            wanted = range(clean.shape[0]) if one.positions is None else one.positions
            positions = [p for p in wanted if p >= offset]
            if not positions:
                continue
            local = [p - offset for p in positions]
            if one.head is None:
                x[row, local] = clean[positions].to(x.dtype)
            else:
                x[row, local, one.head] = clean[positions, one.head].to(x.dtype)
        return x

    return write


def _noise(lm: LoadedModel, n: int, width: int, subject: list[int], samples: int) -> torch.Tensor:
    """[samples, n, width]: NOISE_SCALE x the embeddings' standard deviation at the subject, 0 elsewhere."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    noise = torch.zeros(samples, n, width)
    draw = torch.randn(samples, len(subject), width, generator=generator)
    noise[:, subject] = NOISE_SCALE * _embedding_std(lm) * draw
    return noise.to(lm.device)


def _embedding_std(lm: LoadedModel) -> float:
    """The standard deviation of every entry of the token embedding table (read a slice at a time)."""
    import torch

    if not runs_gptcli(lm):
        table: Any = lm.model.get_input_embeddings().weight
        return float(table.float().std())
    assert lm.net is not None
    total = squares = 0.0
    count = 0
    vocab = lm.net.config.vocab_size
    for start in range(0, vocab, 4096):
        rows = lm.net.lm_head.rows(torch.arange(start, min(start + 4096, vocab), device=lm.device)).double()
        total += float(rows.sum())
        squares += float((rows * rows).sum())
        count += rows.numel()
    mean = total / count
    return float(((squares / count - mean * mean) * count / (count - 1)) ** 0.5)


def patching_grids(result: Patching) -> list[Grid]:
    """One heat map per grid (blocks x positions, the tokens as columns), and the heads' with --heads."""
    from gptcli.inspection.pictures import Grid, visible

    tokens = [visible(t["token"]) for t in result.clean.tokens]
    corrupt = [visible(t["token"]) for t in (result.corrupt or result.clean).tokens]
    columns = [c if c == d else f"{c}/{d}" for c, d in zip(tokens, corrupt, strict=True)]
    what = f"{result.target['token']!r} vs {result.foil['token']!r}"
    titles = {
        "resid_pre": "the input of block L",
        "attn_out": "block L's attention output",
        "mlp_out": "block L's MLP output",
    }

    def grid(title: str, values: list[list[float | None]], cols: list[str], details: list[str]) -> Grid:
        return Grid(
            title=title,
            rows=[str(layer) for layer in range(1, len(values) + 1)],
            columns=cols,
            values=values,
            texts=[["" if v is None else f"{v:.2f}" for v in row] for row in values],
            details=[
                [
                    f"block {layer} {d}: {'-' if v is None else f'{v:.4f}'}"
                    for d, v in zip(details, row, strict=True)
                ]
                for layer, row in enumerate(values, 1)
            ],
            palette="signed",
            signed=True,
            limit=1.0,
            caption=f"score: share of the logit difference {what} restored (1: all); "
            f"clean {result.clean_diff:.3f}, corrupted {result.corrupt_diff:.3f}",
            row_title="block",
        )

    out = [
        grid(
            f"patching {titles[name]} at each position",
            values,
            columns,
            [f"position {p}" for p in range(len(columns))],
        )
        for name, values in result.scores.items()
    ]
    if result.heads is not None:
        count = len(result.heads[0])
        out.append(
            grid(
                "patching each head (every position)",
                result.heads,
                [f"h{h}" for h in range(count)],
                [f"head {h}" for h in range(count)],
            )
        )
    return out
