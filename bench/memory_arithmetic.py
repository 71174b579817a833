"""Memory arithmetic for adapter training of Llama-2 7B, 13B and 70B: what fits where.

    python -m bench.memory_arithmetic            # print the markdown
    python -m bench.memory_arithmetic --write    # write bench/results/memory_arithmetic.md

Pure arithmetic (no torch): the model shapes below and the formulas that
``docs/design/memory.md`` ("Memory arithmetic: DDP and where the limit is") explains.
That page includes the result file's sections with pymdownx snippets, so none of its
numbers is typed by hand; ``tests/test_memory_arithmetic.py`` checks that the result file
is what this prints, that the parameter formula matches the Hugging Face models, and
that the per-token activation formulas match what a training step actually saves.

The formulas, per rank, in bytes:

- weights: ``2 x parameters`` (bf16/fp16 base, frozen: no gradients, no optimizer state);
- adapter: ``adapter_len x hidden`` per adapted layer plus one gate per adapted layer,
  with AdamW at 16 bytes per parameter;
- activations saved for the backward, per token: ``A = 14h + 4h_kv + 4I + n_heads (4 +
  6 L_a)`` for each adapted layer above the lowest, ``A_low = 6h + 4I + 6 n_heads L_a``
  for the lowest adapted layer, 0 below it, and ``R = 4h + 6V`` for the head and loss;
  with activation checkpointing ``2h`` per adapted layer plus one layer's ``A`` (while it
  is recomputed) plus ``R``;
- total: weights + activations + the adapter's AdamW state + a 1.5 GiB allowance (CUDA
  context, workspaces, allocator slack); "yes" if at most 90% of the device, "tight" in the
  last 10%, else "no";
- per-layer FSDP: the weight shard (weights / ranks), about 3 gathered layers, and the
  root group (embedding, final norm, lm_head: ``2 V h x 2`` bytes), which stays gathered.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "results" / "memory_arithmetic.md"

GIB = 2**30
MIB = 2**20
WEIGHT_BYTES = 2  # bf16/fp16 base
ADAPTER_LEN = 10
ADAMW_BYTES = 16  # fp32 master, gradient, two moments
BATCH, SEQ = 8, 512  # tokens per step and rank: BATCH x SEQ
ALLOWANCE_GIB = 1.5  # CUDA context, kernel workspaces, allocator slack
FITS = 0.9  # "yes" up to this fraction of the device, "tight" above it
DEVICES_GIB = (24, 40, 80)
TOP_LAYERS = 30  # the "top 30 adapted" rows
GATHERED_LAYERS = 3  # FSDP: running layer, its all-gather buffer, previous layer's buffer
FSDP_RANKS = (2, 4, 8)
SMALL_FSDP_RANKS = 2  # 7B and 13B sharded this many ways
MEASURED_TOLERANCE = 0.03  # measured bytes per token vs the formulas (the tests hold it)


@dataclass(frozen=True)
class Shape:
    """A Llama model's shape: what the parameter and activation formulas read."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        """Hidden size per attention head."""
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """``h_kv``: head_dim x key/value heads."""
        return self.head_dim * self.kv_heads


LLAMA2_7B = Shape(
    "7B", layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000
)
LLAMA2_13B = Shape(
    "13B", layers=40, hidden=5120, heads=40, kv_heads=40, intermediate=13824, vocab=32000
)
LLAMA2_70B = Shape(
    "70B", layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=32000
)
MODELS = (LLAMA2_7B, LLAMA2_13B, LLAMA2_70B)
# The small bf16 Llama whose saved bytes tests/test_memory_arithmetic.py measures.
MEASURED = Shape("small", layers=3, hidden=512, heads=8, kv_heads=2, intermediate=1376, vocab=1000)


# --------------------------------------------------------------------- parameters
def layer_parameters(shape: Shape) -> int:
    """One decoder layer: q/k/v/o projections, the MLP's gate/up/down, two RMSNorms."""
    h = shape.hidden
    attention = 2 * h * h + 2 * h * shape.kv_dim
    mlp = 3 * h * shape.intermediate
    return attention + mlp + 2 * h


def parameters(shape: Shape) -> int:
    """All parameters: embedding, the layers, final norm and an untied lm_head."""
    embedding = shape.vocab * shape.hidden
    return 2 * embedding + shape.layers * layer_parameters(shape) + shape.hidden


def weight_bytes(shape: Shape) -> int:
    """The frozen base's weights, 2 bytes per parameter."""
    return WEIGHT_BYTES * parameters(shape)


def adapter_parameters(shape: Shape, adapted: int) -> int:
    """The adapter: ``adapter_len x hidden`` prompts and one gate per adapted layer."""
    return (ADAPTER_LEN * shape.hidden + 1) * adapted


def adapter_state_bytes(shape: Shape, adapted: int) -> int:
    """The adapter's training state: AdamW's 16 bytes per parameter."""
    return ADAMW_BYTES * adapter_parameters(shape, adapted)


def root_group_bytes(shape: Shape) -> int:
    """FSDP's root group (embedding, final norm, lm_head), as the page counts it: 2 V h x 2."""
    return 2 * shape.vocab * shape.hidden * WEIGHT_BYTES


# --------------------------------------------------------------------- activations
def layer_bytes(shape: Shape) -> int:
    """``A``: bytes per token an adapted layer above the lowest saves for the backward."""
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    return 14 * h + 4 * kv + 4 * inter + shape.heads * (4 + 6 * ADAPTER_LEN)


def lowest_layer_bytes(shape: Shape) -> int:
    """``A_low``: bytes per token the lowest adapted layer saves (its input needs no grad)."""
    return 6 * shape.hidden + 4 * shape.intermediate + 6 * shape.heads * ADAPTER_LEN


def head_bytes(shape: Shape) -> int:
    """``R``: head and loss per token: fp32 final-norm input, fp32 log-probabilities, and the
    returned bf16 logits."""
    return 4 * shape.hidden + 6 * shape.vocab


def head_saved_bytes(shape: Shape) -> int:
    """The part of ``R`` autograd saves (``4h + 4V``; the returned logits are not saved)."""
    return 4 * shape.hidden + 4 * shape.vocab


def checkpointed_saved_bytes(shape: Shape, adapted: int) -> int:
    """What the forward saves per token with activation checkpointing: each adapted layer's
    bf16 input (2h) and R's saved part (the recomputed layer's A comes in the backward)."""
    return 2 * shape.hidden * adapted + head_saved_bytes(shape)


def activation_bytes(shape: Shape, adapted: int, checkpointing: bool, tokens: int) -> int:
    """Bytes kept for the backward in one step of ``tokens`` tokens, top ``adapted`` layers
    adapted; with checkpointing, each adapted layer's bf16 input plus one layer recomputed."""
    if checkpointing:
        per_token = 2 * shape.hidden * adapted + layer_bytes(shape) + head_bytes(shape)
    else:
        per_token = lowest_layer_bytes(shape) + (adapted - 1) * layer_bytes(shape)
        per_token += head_bytes(shape)
    return tokens * per_token


# --------------------------------------------------------------------- fitting
def status(total_gib: float, device_gib: float) -> str:
    """ "yes" up to 90% of the device, "tight" in the last 10%, "no" beyond."""
    if total_gib <= FITS * device_gib:
        return "yes"
    return "tight" if total_gib <= device_gib else "no"


@dataclass(frozen=True)
class DdpRow:
    """One rank of DDP: the whole base, the adapted layers' activations."""

    shape: Shape
    adapted: int
    checkpointing: bool

    @property
    def weights_gib(self) -> float:
        """The base's weights."""
        return weight_bytes(self.shape) / GIB

    @property
    def activations_gib(self) -> float:
        """Saved for the backward, ``BATCH x SEQ`` tokens."""
        return activation_bytes(self.shape, self.adapted, self.checkpointing, BATCH * SEQ) / GIB

    @property
    def adapter_gib(self) -> float:
        """The adapter's AdamW state."""
        return adapter_state_bytes(self.shape, self.adapted) / GIB

    @property
    def total_gib(self) -> float:
        """Weights, activations, the adapter's state and the allowance."""
        return self.weights_gib + self.activations_gib + self.adapter_gib + ALLOWANCE_GIB


@dataclass(frozen=True)
class FsdpRow:
    """One rank of per-layer FSDP, every layer adapted, activation checkpointing on."""

    shape: Shape
    ranks: int

    @property
    def shard_gib(self) -> float:
        """This rank's 1/N of the weights."""
        return weight_bytes(self.shape) / self.ranks / GIB

    @property
    def gathered_gib(self) -> float:
        """About 3 gathered layers plus the root group."""
        layers = GATHERED_LAYERS * WEIGHT_BYTES * layer_parameters(self.shape)
        return (layers + root_group_bytes(self.shape)) / GIB

    @property
    def activations_gib(self) -> float:
        """Saved for the backward, every layer adapted and checkpointed."""
        return activation_bytes(self.shape, self.shape.layers, True, BATCH * SEQ) / GIB

    @property
    def adapter_gib(self) -> float:
        """The adapter's AdamW state, every layer adapted (whole on each rank)."""
        return adapter_state_bytes(self.shape, self.shape.layers) / GIB

    @property
    def total_gib(self) -> float:
        """Shard, gathered weights, activations, the adapter's state and the allowance."""
        gathered = self.shard_gib + self.gathered_gib
        return gathered + self.activations_gib + self.adapter_gib + ALLOWANCE_GIB


def ddp_rows() -> list[DdpRow]:
    """Per model: top 30 and all layers adapted, each without and with checkpointing."""
    return [
        DdpRow(shape, adapted, checkpointing)
        for shape in MODELS
        for adapted in (TOP_LAYERS, shape.layers)
        for checkpointing in (False, True)
    ]


def fsdp_rows() -> list[FsdpRow]:
    """70B over each of ``FSDP_RANKS``."""
    return [FsdpRow(LLAMA2_70B, ranks) for ranks in FSDP_RANKS]


# --------------------------------------------------------------------- markdown
def _gib(x: float) -> str:
    return f"{x:.1f}"


def _n(x: int) -> str:
    return f"{x:,}"


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _section(name: str, lines: Iterable[str]) -> list[str]:
    # pymdownx snippets section markers: docs/design/memory.md includes each section where
    # its prose needs it; a whole-file include drops the marker lines.
    return [f"<!-- --8<-- [start:{name}] -->", *lines, f"<!-- --8<-- [end:{name}] -->", ""]


def models_section() -> list[str]:
    """The model table (parameters, weights, adapter) and the per-token activations."""
    lines = [
        "| base | layers | hidden | heads | key/value heads | intermediate | vocab | parameters "
        "| weights (GiB) | adapter parameters, all layers | AdamW state (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in MODELS:
        adapter = adapter_parameters(s, s.layers)
        lines.append(
            f"| {s.name} | {s.layers} | {s.hidden} | {s.heads} | {s.kv_heads} | {s.intermediate} "
            f"| {s.vocab} | {parameters(s) / 1e9:.2f}e9 | {_gib(weight_bytes(s) / GIB)} "
            f"| {adapter / 1e6:.2f}M | {adapter_state_bytes(s, s.layers) / MIB:.0f} |"
        )
    lines += [
        "",
        f"Bytes saved for the backward per token (adapter_len {ADAPTER_LEN}):",
        "",
        "| base | h_kv | A | A_low | R | R in layers' worth of A "
        "| checkpointed, per adapted layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in MODELS:
        lines.append(
            f"| {s.name} | {s.kv_dim} | {_n(layer_bytes(s))} | {_n(lowest_layer_bytes(s))} "
            f"| {_n(head_bytes(s))} | {head_bytes(s) / layer_bytes(s):.2f} | {_n(2 * s.hidden)} |"
        )
    return _section("models", lines)


def measured_section() -> list[str]:
    """The formulas for the small model the tests measure."""
    s = MEASURED
    return _section(
        "measured",
        [
            f"For the bf16 Llama the tests measure (h {s.hidden}, {s.heads} heads, "
            f"h_kv {s.kv_dim}, I {s.intermediate}, V {s.vocab}, L_a {ADAPTER_LEN}) the formulas "
            f"give A = {_n(layer_bytes(s))}, A_low = {_n(lowest_layer_bytes(s))} and R's saved "
            f"part (4h + 4V) = {_n(head_saved_bytes(s))} bytes per token, and with activation "
            "checkpointing the forward saves 2h per adapted layer plus R's saved part: "
            f"{_n(checkpointed_saved_bytes(s, s.layers))} for its {s.layers} layers. "
            "`tests/test_memory_arithmetic.py` measures a training step's saved bytes within "
            f"{MEASURED_TOLERANCE:.0%} above each (the rest: RMSNorm's rsqrt, the rotary "
            "cos/sin, the adapter's keys and values, which are per sequence, not per token).",
        ],
    )


def _verdict(shape: Shape) -> str:
    """Where the limit is for one model under DDP, every layer adapted."""
    plain = DdpRow(shape, shape.layers, False)
    checkpointed = DdpRow(shape, shape.layers, True)
    weights = f"its weights alone are {_gib(plain.weights_gib)} GiB"
    groups: dict[str, list[str]] = {}
    for device in DEVICES_GIB:
        without, with_ = status(plain.total_gib, device), status(checkpointed.total_gib, device)
        if without == "yes":
            how = "either way"
        elif with_ == "yes":
            how = "only with activation checkpointing"
        elif with_ == "tight":
            how = "only with activation checkpointing, and tightly"
        elif plain.weights_gib >= device:
            how = f"no, {weights}"
        else:
            how = "no"
        groups.setdefault(how, []).append(str(device))
    if all(how.startswith("no") for how in groups):
        return (
            f"- **{shape.name}** fits no single device here ({weights}): it needs a sharded base."
        )
    parts = "; ".join(f"{_and(devices)} GiB: {how}" for how, devices in groups.items())
    return f"- **{shape.name}**, all {shape.layers} layers adapted: {parts}."


def ddp_section() -> list[str]:
    """The DDP table and where the limit is."""
    devices = " | ".join(f"{d} GiB" for d in DEVICES_GIB)
    lines = [
        f"Per rank, {BATCH} x {SEQ} = {BATCH * SEQ} tokens per step. The total adds the "
        f'adapter\'s AdamW state and a {ALLOWANCE_GIB} GiB allowance. "yes": at most '
        f'{FITS:.0%} of the device; "tight": in the last {1 - FITS:.0%}.',
        "",
        "| base | adapted layers | checkpointing | weights | activations | total (GiB) "
        f"| {devices} |",
        "|---|---|---|---|---|---|" + "---|" * len(DEVICES_GIB),
    ]
    for row in ddp_rows():
        adapted = f"all {row.adapted}" if row.adapted == row.shape.layers else f"top {row.adapted}"
        fits = " | ".join(status(row.total_gib, d) for d in DEVICES_GIB)
        lines.append(
            f"| {row.shape.name} | {adapted} | {'yes' if row.checkpointing else 'no'} "
            f"| {_gib(row.weights_gib)} | {_gib(row.activations_gib)} "
            f"| {_gib(row.total_gib)} | {fits} |"
        )
    lines += ["", "Where the limit is, with DDP:", ""]
    lines += [_verdict(s) for s in MODELS]
    return _section("ddp", lines)


def fsdp_section() -> list[str]:
    """The per-layer FSDP table (70B) and the small models over two ranks."""
    devices = " | ".join(f"{d} GiB" for d in DEVICES_GIB)
    lines = [
        f"| ranks | weight shard | gathered | activations | total (GiB) | {devices} |",
        "|---|---|---|---|---|" + "---|" * len(DEVICES_GIB),
    ]
    for row in fsdp_rows():
        fits = " | ".join(status(row.total_gib, d) for d in DEVICES_GIB)
        lines.append(
            f"| {row.ranks} | {_gib(row.shard_gib)} | {_gib(row.gathered_gib)} "
            f"| {_gib(row.activations_gib)} | {_gib(row.total_gib)} | {fits} |"
        )
    small = [FsdpRow(s, SMALL_FSDP_RANKS) for s in MODELS if s is not LLAMA2_70B]
    smallest = min(DEVICES_GIB)
    fit = [status(r.total_gib, smallest) == "yes" for r in small]
    lines += [
        "",
        f"{_and([r.shape.name for r in small])} sharded the same way over {SMALL_FSDP_RANKS} "
        f"ranks need {_and([_gib(r.total_gib) for r in small])} GiB per rank, so "
        + (
            f"they fit {smallest} GiB devices."
            if all(fit)
            else f"not all of them fit {smallest} GiB devices."
        ),
    ]
    return _section("fsdp", lines)


def markdown() -> str:
    """The result file's text."""
    lines = [
        "<!-- Written by `python -m bench.memory_arithmetic --write`; do not edit. "
        "docs/design/memory.md includes its sections. -->",
        "",
        *models_section(),
        *measured_section(),
        *ddp_section(),
        *fsdp_section(),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def write(path: Path = RESULT) -> None:
    """Write :func:`markdown` to ``path`` (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(markdown())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Print the markdown, or with ``--write`` write the result file."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory_arithmetic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.write:
        write()
    else:
        print(markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
