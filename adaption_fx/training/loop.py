"""The fine-tuning loop: AdamW on the adapter prompts and gates, warm-up then cosine.

Everything a run produces lives in its output directory:

- ``run.json``: the run's arguments (what ``--resume`` continues);
- ``metrics.jsonl``: one JSON record per optimizer step and per evaluation;
- ``loss.png``: train and validation loss against step, redrawn at each evaluation;
- ``checkpoint-<step>/``: the adapter in PEFT format plus ``training_state.safetensors``
  and ``training_state.json`` (optimizer, scheduler and RNG state: tensors, and plain
  values with the layout naming the tensors), ``trainer_state.json`` and
  ``data_order.json`` (the batches of every step), each written in a temporary directory
  and renamed;
- ``adapter_config.json`` + ``adapter_model.safetensors``: the final adapter (PEFT format).

The batches of the whole run are fixed up front from the seed, so a run resumed from a
checkpoint takes exactly the steps the uninterrupted run would have taken and ends with
the same adapter, bit for bit (CPU). Ctrl-C (or SIGTERM) finishes the current step, writes
a checkpoint and stops; a second Ctrl-C stops at once.

Every file of a run directory is read as if someone else wrote it (run directories are
shared): sizes are bounded, fields checked, nothing is unpickled, and a damaged file raises
:class:`TrainingError` naming the file and the field, before the model, the optimizer or
the RNGs change. A checkpoint of an earlier version (``training_state.pt``) is read with
torch's restricted loader (tensors and plain data only), then checked the same way.

Started by torchrun (a ``torch.distributed`` process group exists), the run is data parallel
(see :mod:`adaption_fx.training.distributed`): each rank runs its share of every planned batch, DDP
averages the adapter's gradients, and rank 0 alone writes the files above.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from adaption_fx.checkpoint import (
    DEFAULT_ADAPTER,
    CheckpointError,
    atomic_directory,
    write_json_atomic,
    write_text_atomic,
)
from adaption_fx.config import AdaptionConfig
from adaption_fx.files import (
    LARGE_JSON_BYTES,
    field,
    read_json,
)
from adaption_fx.model.adapted import AdaptedModel
from adaption_fx.training.arguments import TrainingArguments
from adaption_fx.training.data import (
    IGNORE_INDEX,
    EncodedDataset,
    EncodedExample,
    batch_order,
    collate,
)
from adaption_fx.training.distributed import SINGLE_PROCESS, DataParallel
from adaption_fx.training.state import (
    STATE_JSON_FILE,
    STATE_TENSORS_FILE,
    TrainingError,
    read_training_state,
    same_value,
    shown,
    training_state_files,
)

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TRAINER_STATE_FILE = "trainer_state.json"
DATA_ORDER_FILE = "data_order.json"
# Weights first, the config last: a reader that sees the config sees the rest.
ADAPTER_FILES = ("adapter_model.safetensors", "adaption_fx.json", "adapter_config.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a run writes into its output directory; anything else there is someone else's.
OUTPUT_NAMES = frozenset({RUN_FILE, METRICS_FILE, PLOT_FILE, *ADAPTER_FILES})


# Arguments that change what a run computes; the others (how often to evaluate or save,
# compiling) may differ when a run is resumed.
SCHEDULE_FIELDS = (
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup_steps",
    "weight_decay",
    "seed",
)


# --------------------------------------------------------------------- schedule
def plan_steps(lengths: Sequence[int], args: TrainingArguments) -> list[list[list[int]]]:
    """The whole run's batches: for each optimizer step, its ``grad_accum`` micro-batches
    (lists of example indices). Epoch ``e`` is ``batch_order(lengths, batch_size, seed, e)``;
    a step may span the end of one epoch and the start of the next."""
    if not lengths:
        raise TrainingError("no training examples")
    micro: list[list[int]] = []
    if args.max_steps is None:
        for epoch in range(args.epochs):
            micro.extend(batch_order(lengths, args.batch_size, args.seed, epoch))
    else:
        target = args.max_steps * args.grad_accum
        epoch = 0
        while len(micro) < target:
            micro.extend(batch_order(lengths, args.batch_size, args.seed, epoch))
            epoch += 1
        micro = micro[:target]
    return [micro[i : i + args.grad_accum] for i in range(0, len(micro), args.grad_accum)]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up
    over ``warmup`` steps, then cosine from 1 to 0 at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(args: TrainingArguments, total: int) -> int:
    if args.warmup_steps is not None:
        return min(args.warmup_steps, total)
    return max(1, round(0.1 * total))


def dataset_fingerprint(dataset: EncodedDataset) -> str:
    """A hash of the encoded examples: a resumed run must see the same data."""
    digest = hashlib.sha256()
    for example in dataset.examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------- loss
def batch_loss_sum(
    forward: Callable[..., Any], batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the labelled (response) tokens, and their count.

    Computed here, not by the model, so that a step's loss can be normalised over all of
    its micro-batches' tokens.
    """
    logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, response_token_count(batch)


def response_token_count(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens of a collated batch the loss covers (labelled next tokens)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def example_loss_tokens(example: EncodedExample) -> int:
    """How many tokens of one example the loss covers (:func:`response_token_count` of a
    batch is the sum over its examples)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def build_optimizer(
    params: Sequence[torch.nn.Parameter], args: TrainingArguments, warmup: int, total: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` with the run's learning rate and weight decay, and its schedule
    (:func:`lr_factor`: ``warmup`` steps up, cosine down to 0 at step ``total``)."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total)
    )
    return optimizer, scheduler


def optimizer_step(
    forward: Callable[..., Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    step_tokens: int | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
) -> tuple[float, int]:
    """One optimizer step over collated micro-batches: the step's loss (mean over all its
    response tokens) and the tokens it ran (attention-mask ones).

    Each micro-batch's summed loss is divided by the whole step's response-token count
    before backward, so accumulation equals one batch holding every micro-batch.

    Data parallel (``parallel`` of several ranks, ``forward`` from
    :meth:`DataParallel.wrap`): ``batches`` are this rank's shares of the step's
    micro-batches and ``step_tokens`` the response tokens of the whole step, all ranks
    together. Each rank's summed loss is multiplied by the world size before that
    division, since DDP averages the gradients over the ranks: the reduced gradient is the
    one-process gradient. Gradients are reduced once, at the last micro-batch. The loss
    returned is the step's (all ranks); the tokens are this rank's.
    """
    if step_tokens is None:
        step_tokens = sum(response_token_count(b) for b in batches)
    if step_tokens == 0:
        raise TrainingError("a training step has no response tokens")
    total = 0.0
    seen = 0
    for index, batch in enumerate(batches):
        with parallel.gradient_sync(forward, sync=index == len(batches) - 1):
            loss, _ = batch_loss_sum(forward, batch)
            (loss * parallel.world_size / step_tokens).backward()
        total += loss.item()
        seen += int(batch["attention_mask"].sum())
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    (total,) = parallel.sum(total)  # for the record only: the gradients are reduced already
    return total / step_tokens, seen


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int


def evaluate_loss(
    forward: Callable[..., Any],
    dataset: EncodedDataset,
    batch_size: int,
    pad_token_id: int,
    progress: bool = False,
    *,
    device: torch.device | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
) -> EvalResult:
    """Mean loss over every response token of ``dataset``, and its perplexity.

    Batches go to ``device`` (default: where collate puts them, the CPU). Data parallel,
    each rank runs every ``world_size``-th batch and the sums are added up over the ranks:
    every rank returns the result for the whole dataset.
    """
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]))
    starts = parallel.strided(range(0, len(order), batch_size))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in tqdm(starts, desc="eval", leave=False, disable=not progress):
            batch = collate([dataset[i] for i in order[start : start + batch_size]], pad_token_id)
            loss, n = batch_loss_sum(forward, _to_device(batch, device))
            total += loss.item()
            count += n
    total, count = parallel.sum(total, count)
    count = int(count)
    if count == 0:
        raise TrainingError("the evaluation data has no response tokens")
    mean = total / count
    return EvalResult(mean, math.exp(min(mean, 700.0)), count)


def _to_device(
    batch: dict[str, torch.Tensor], device: torch.device | None
) -> dict[str, torch.Tensor]:
    if device is None:
        return batch
    return {name: tensor.to(device) for name, tensor in batch.items()}


# --------------------------------------------------------------------- output directory
def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The checkpoints in ``out`` (``checkpoint-<step>/`` directories holding a
    ``trainer_state.json``), oldest first.

    A resumed run takes the newest; when that one is damaged, :meth:`Finetune.resume`
    refuses it and names the one before it to resume from instead, rather than fall back
    to it silently (which would redo steps the user believes done)."""
    found = []
    if out.is_dir():
        for path in out.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match and (path / TRAINER_STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def foreign_entries(out: Path) -> list[str]:
    """Entries of ``out`` a run did not write (temporary files of ours included as ours)."""
    if not out.is_dir():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if p.name not in OUTPUT_NAMES
        and not _CHECKPOINT.match(p.name)
        and not p.name.startswith(".")
    )


def check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory a run may not write to, before anything is loaded.

    A non-empty directory is refused unless resuming (which needs a checkpoint in it) or
    overwriting.
    """
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {str(out)!r} exists and is not a directory")
    if resume:
        if not checkpoints(out):
            raise TrainingError(f"--resume: no checkpoint-<step>/ directory in {str(out)!r}")
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        foreign = foreign_entries(out)
        what = (
            f"holds files a run did not write ({foreign[:5]})"
            if foreign
            else "holds an earlier run"
        )
        raise TrainingError(
            f"--out {str(out)!r} is not empty: it {what}. Pass --resume to continue the run "
            "in it, --overwrite to start over (only a run's own files are removed), or "
            "choose another directory"
        )


def clear_output(out: Path) -> None:
    """Remove what an earlier run wrote into ``out`` (never other files); create ``out``."""
    if out.is_dir():
        for path in out.iterdir():
            if path.name in OUTPUT_NAMES:
                path.unlink()
            elif _CHECKPOINT.match(path.name):
                shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)


def save_active_adapter(model: AdaptedModel, directory: Path) -> None:
    """The active adapter alone, at the root of ``directory`` (PEFT's layout of one adapter).

    ``save_adapter`` with no name saves every adapter of the model, and puts one not named
    "default" into a subfolder: the run's adapter would be missing from the root (or be
    another adapter) whenever the model holds others or its name is not "default".
    """
    name = model.active_adapter
    model.save_adapter(directory, name)
    if name != DEFAULT_ADAPTER:
        for file in ADAPTER_FILES:
            os.replace(directory / name / file, directory / file)
        (directory / name).rmdir()


def publish_adapter(model: AdaptedModel, out: Path) -> None:
    """Write the final adapter into ``out`` (PEFT's layout) next to the run's other files.

    ``save_adapter`` replaces a whole directory; here each file is renamed into place on
    its own (weights first, config last) so the checkpoints beside it are untouched.
    """
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
    try:
        save_active_adapter(model, staging)
        for name in ADAPTER_FILES:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# A metrics record is a few hundred bytes; a longer line is damaged, and is not parsed.
METRICS_LINE_BYTES = 64 << 10
# A record per step and evaluation: as much as a data order (which lists every step).
METRICS_MAX_BYTES = LARGE_JSON_BYTES


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The records of ``out/metrics.jsonl``, in file order ([] without the file).

    The file is only a record of the run (the checkpoints hold what a resumed run needs),
    so a damaged line (not a JSON object, no string ``kind`` or integer ``step``, a
    ``train`` record without a numeric ``loss`` or an ``eval`` one without ``val_loss``)
    is dropped with a warning naming the file and line: a crash while a line was appended
    leaves half a line, which must not stop ``--resume`` (which rewrites the file without
    it). A file over ``METRICS_MAX_BYTES`` raises TrainingError: move it away.
    """
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    size = path.stat().st_size
    if size > METRICS_MAX_BYTES:
        raise TrainingError(
            f"{path} is {size} bytes, more than the {METRICS_MAX_BYTES} a metrics file of a run "
            "can be; move it out of the run directory (it is only a record: the run goes on "
            "without it)"
        )
    records = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record, problem = _metrics_record(line)
            if problem is not None:
                logger.warning(
                    "%s:%d: %s; the line is dropped (the file is only a record of the run: "
                    "the plot leaves it out, and --resume rewrites the file without it)",
                    path,
                    number,
                    problem,
                )
                continue
            records.append(record)
    return records


def _metrics_record(line: bytes) -> tuple[dict[str, Any], str | None]:
    """One metrics line as a record, or why it is damaged."""
    if len(line) > METRICS_LINE_BYTES:
        return {}, f"the line is {len(line)} bytes, longer than any metrics record"
    try:
        # json.loads, not parse_json: a step whose loss became NaN is recorded as NaN.
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return {}, f"not valid JSON ({exc})"
    if not isinstance(record, dict):
        return {}, f"not a JSON object but {type(record).__name__}"
    kind, step = record.get("kind"), record.get("step")
    if not isinstance(kind, str):
        return {}, "field 'kind' is missing or not a string"
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return {}, "field 'step' is missing or not a non-negative integer"
    value = {"train": "loss", "eval": "val_loss"}.get(kind)
    number = record.get(value) if value else 0.0
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return {}, f"a {kind!r} record whose field {value!r} is missing or not a number"
    return record, None


def draw_loss_plot(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """Train and validation loss against step, written atomically. False when matplotlib
    is not installed (the metrics file has the same numbers)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (metrics are in %s)", path, METRICS_FILE)
        return False
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            axes.plot(*zip(*train, strict=True), label="train", linewidth=1)
        if val:
            axes.plot(*zip(*val, strict=True), "o-", label="validation")
        axes.set_xlabel("step")
        axes.set_ylabel("loss (response tokens)")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            figure.savefig(tmp, format="png")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        plt.close(figure)
    return True


# --------------------------------------------------------------------- interruption
class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a
    second SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "stopping after this step; a checkpoint will be written (Ctrl-C again to stop at once)"
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals go to the main thread only
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


# --------------------------------------------------------------------- the run
@dataclass
class RunResult:
    """What a run did."""

    steps: int
    total_steps: int
    interrupted: bool
    train_loss: float | None
    val: EvalResult | None
    seconds: float
    tokens: int  # this session's (a resumed run counts from the checkpoint on)
    tokens_per_second: float  # over the optimizer steps only (no eval or checkpoint time)
    checkpoint: Path | None
    out: Path


def active_parameters(model: AdaptedModel) -> list[torch.nn.Parameter]:
    """The trainable tensors of the model's active adapter."""
    weights = model.adapter_weights[model.active_adapter]
    return [p for p in weights.parameters() if p.requires_grad]


class Finetune:
    """One fine-tuning run of an AdaptedModel's active adapter, into ``out``.

    Args:
        model: the AdaptedModel; only its active adapter's tensors train.
        train: the encoded training examples.
        val: encoded validation examples, or None.
        out: the output directory (checked with :func:`check_output`, emptied of an
            earlier run with :func:`clear_output` unless resuming).
        args: the training arguments.
        pad_token_id: the id padding positions get.
        run_info: written to ``run.json`` with the arguments (model, data, ...).
        progress: show a tqdm bar.

    Where a ``torch.distributed`` process group exists (torchrun), the run is data
    parallel over it: every rank builds the same Finetune (same model weights, data and
    arguments); ``args.batch_size`` is the global micro-batch, split across the ranks; only
    the active adapter's tensors are reduced; rank 0 alone writes into ``out``.
    """

    def __init__(
        self,
        model: AdaptedModel,
        train: EncodedDataset,
        val: EncodedDataset | None,
        out: str | os.PathLike,
        args: TrainingArguments,
        pad_token_id: int,
        run_info: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, AdaptedModel):
            raise TypeError(f"model must be an AdaptedModel, got {type(model).__name__}")
        if model.active_adapter is None:
            raise TrainingError("the model has no active adapter to train")
        self.model = model
        self.train_data = train
        self.val_data = val
        self.out = Path(out)
        self.args = args
        self.pad_token_id = pad_token_id
        self.run_info = dict(run_info or {})
        self.progress = progress
        self.parallel = DataParallel.current()
        if args.batch_size < self.parallel.world_size:
            raise TrainingError(
                f"batch_size {args.batch_size} is smaller than the {self.parallel.world_size} "
                "processes that share each batch: pass a --batch-size of at least the number "
                "of processes (it is the global batch, split across them)"
            )
        # Batches go where the adapter is (the model's device).
        self.device = model.adapter_tensors()[0].device
        self.plan = plan_steps(train.lengths, args)
        self.total_steps = len(self.plan)
        self.warmup = warmup_steps(args, self.total_steps)
        self.fingerprint = dataset_fingerprint(train)
        self.forward: Callable[..., Any] = model
        if args.compile:
            from adaption_fx.export import compile as compile_model

            self.forward = compile_model(model, dynamic=True)
        # What training steps call: ``forward``, wrapped in DDP while a data-parallel run()
        # goes on (evaluation calls ``forward`` itself: it needs no gradient reduction).
        self.train_forward: Callable[..., Any] = self.forward
        # The active adapter's tensors only: model.parameters() holds every adapter, and an
        # optimizer over others would not load a checkpoint into a model without them.
        self.optimizer, self.scheduler = build_optimizer(
            active_parameters(model), args, self.warmup, self.total_steps
        )
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>/`` (atomically) and return it (data parallel: rank 0
        writes it, every rank returns its path)."""
        target = self.out / f"checkpoint-{self.step}"
        if not self.parallel.is_main:
            return target
        with atomic_directory(target) as tmp:
            save_active_adapter(self.model, tmp)
            tensors, document = training_state_files(self.optimizer, self.scheduler)
            save_file(tensors, str(tmp / STATE_TENSORS_FILE), metadata={"format": "pt"})
            write_json_atomic(tmp / STATE_JSON_FILE, document)
            write_json_atomic(
                tmp / TRAINER_STATE_FILE,
                {
                    "step": self.step,
                    "total_steps": self.total_steps,
                    "tokens": self.tokens,
                    "elapsed_s": round(self.elapsed, 3),
                    "arguments": self.args.to_dict(),
                    "data_fingerprint": self.fingerprint,
                    "adapter": self.model.adapters[self.model.active_adapter].to_dict(),
                },
            )
            write_json_atomic(tmp / DATA_ORDER_FILE, {"steps": self.plan})
        logger.info("wrote %s", target)
        return target

    def resume(self) -> Path:
        """Load the newest checkpoint in ``out``: adapter, optimizer, scheduler, RNG, step.

        The checkpoint must come from a run with the same data, adapter and schedule
        arguments, else TrainingError lists what differs. Every file is read and checked
        before the model, the optimizer or the RNGs change: a damaged or foreign file
        raises TrainingError naming it and the field, and leaves all of them (and the run
        directory) as they were. A damaged newest checkpoint is an error, not a reason to
        fall back to an older one silently: the message names the older ones to resume
        from instead. Data parallel, every rank loads it (rank 0 alone drops the metrics of
        the steps after it).
        """
        found = checkpoints(self.out)
        if not found:
            raise TrainingError(f"no checkpoint-<step>/ directory in {str(self.out)!r}")
        step, path = found[-1]
        # A damaged file: what to do instead (an older checkpoint, or starting over).
        older = [p.name for _, p in found[:-1]]
        instead = (
            f"resume from {older[-1]} instead by moving {path.name} out of {str(self.out)!r}, or "
            if older
            else ""
        )
        advice = f"Nothing was changed; {instead}start again with --overwrite"
        try:
            state, order = self._read_checkpoint(step, path)
        except TrainingError as exc:
            raise TrainingError(f"cannot resume from {path}: {exc}. {advice}") from None
        mine = self.args.to_dict()
        arguments = state["arguments"]
        differ = [
            f"{name}: checkpoint {shown(arguments.get(name))}, now {mine[name]!r}"
            for name in SCHEDULE_FIELDS
            if not same_value(arguments.get(name), mine[name])
        ]
        adapter = self.model.adapters[self.model.active_adapter].to_dict()
        if not same_value(state["adapter"], adapter):
            differ.append(f"adapter: checkpoint {shown(state['adapter'])}, now {adapter}")
        if state["data_fingerprint"] != self.fingerprint:
            differ.append("the training data (or its tokenization / max_length) changed")
        if not differ and order != self.plan:
            differ.append("the batch order differs from the checkpoint's data_order.json")
        if differ:
            raise TrainingError(
                f"cannot resume from {path}: it was written by a different run: "
                + "; ".join(differ)
            )
        try:
            # A fresh optimizer and schedule on the adapter's tensors, to check the state
            # against before anything changes (they share no state with self.optimizer).
            probe, schedule = build_optimizer(
                active_parameters(self.model), self.args, self.warmup, self.total_steps
            )
            loaded = read_training_state(path, probe, schedule, step)
            # The adapter files must hold the adapter trainer_state.json describes (the one
            # the optimizer state was checked against).
            saved = AdaptionConfig.from_pretrained(path).to_dict()
            if not same_value(saved, adapter):
                raise TrainingError(
                    f"{path}: the adapter files hold {saved}, but {TRAINER_STATE_FILE} and this "
                    f"run have {adapter}"
                )
        except (TrainingError, CheckpointError, FileNotFoundError) as exc:
            raise TrainingError(f"cannot resume from {path}: {exc}. {advice}") from None
        kept = None
        if self.parallel.is_main:
            # Records after the checkpoint belong to steps that will be taken again.
            kept = [r for r in read_metrics(self.out) if r["step"] <= step]
        try:
            # It checks the adapter files in full before it changes the model.
            self.model.load_adapter(path, self.model.active_adapter)
        except CheckpointError as exc:
            raise TrainingError(f"cannot resume from {path}: {exc}. {advice}") from None
        # load_adapter may install new parameter objects: rebuild the optimizer on them.
        self.optimizer, self.scheduler = build_optimizer(
            active_parameters(self.model), self.args, self.warmup, self.total_steps
        )
        self.optimizer.load_state_dict(loaded.optimizer)
        self.scheduler.load_state_dict(loaded.scheduler)
        torch.set_rng_state(loaded.torch_rng)
        random.setstate(loaded.python_rng)
        self.step = step
        self.tokens = state["tokens"]
        self.elapsed = float(state["elapsed_s"])
        if kept is not None:
            text = "".join(json.dumps(r) + "\n" for r in kept)
            write_text_atomic(self.out / METRICS_FILE, text)
        logger.info("resumed from %s (step %d of %d)", path, step, self.total_steps)
        return path

    def _read_checkpoint(self, step: int, path: Path) -> tuple[dict[str, Any], Any]:
        """The checked fields of ``path/trainer_state.json`` and the steps of its
        ``data_order.json``."""
        state_file = path / TRAINER_STATE_FILE
        where = str(state_file)
        state = read_json(state_file, what="trainer state", error=TrainingError)
        recorded = field(state, "step", int, where, minimum=0, error=TrainingError)
        if recorded != step:
            raise TrainingError(
                f"{where}: field 'step' is {recorded}, but the directory is {path.name}"
            )
        if step > self.total_steps:
            raise TrainingError(
                f"{where}: field 'step' is {step}, beyond this run's {self.total_steps} steps"
            )
        checked = {
            "arguments": field(state, "arguments", dict, where, error=TrainingError),
            "adapter": field(state, "adapter", dict, where, error=TrainingError),
            "data_fingerprint": field(state, "data_fingerprint", str, where, error=TrainingError),
            "tokens": field(state, "tokens", int, where, default=0, minimum=0, error=TrainingError),
            "elapsed_s": field(state, "elapsed_s", float, where, default=0.0, error=TrainingError),
        }
        if checked["elapsed_s"] < 0:
            raise TrainingError(f"{where}: field 'elapsed_s' is {checked['elapsed_s']}, below 0")
        order_file = path / DATA_ORDER_FILE
        try:
            # It lists every planned step's example indices: megabytes for long runs.
            order = read_json(
                order_file, what="data order", max_bytes=LARGE_JSON_BYTES, error=TrainingError
            )
        except FileNotFoundError:
            raise TrainingError(f"{order_file} is missing: the checkpoint is incomplete") from None
        steps = field(order, "steps", list, str(order_file), error=TrainingError)
        return checked, steps

    # ------------------------------------------------------------- running
    def _record(self, record: dict[str, Any]) -> None:
        if self.parallel.is_main:
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _plot(self) -> None:
        if self.parallel.is_main:
            draw_loss_plot(read_metrics(self.out), self.out / PLOT_FILE)

    def _publish(self) -> None:
        if self.parallel.is_main:
            publish_adapter(self.model, self.out)

    def _evaluate(self) -> EvalResult | None:
        if self.val_data is None:
            return None
        self.model.eval()
        try:
            result = evaluate_loss(
                self.forward,
                self.val_data,
                self.args.batch_size,
                self.pad_token_id,
                device=self.device,
                parallel=self.parallel,
            )
        finally:
            self.model.train()
        self._record(
            {
                "kind": "eval",
                "step": self.step,
                "val_loss": result.loss,
                "val_perplexity": result.perplexity,
                "val_tokens": result.tokens,
            }
        )
        self._plot()
        return result

    def _train_step(self, micro_batches: list[list[int]]) -> tuple[float, int]:
        """One optimizer step over the planned micro-batches (of all ranks): the step's
        loss and tokens (attention-mask ones), all ranks together."""
        step_tokens = sum(
            example_loss_tokens(self.train_data[i]) for mb in micro_batches for i in mb
        )
        batches = [self._rank_batch(mb) for mb in micro_batches]
        loss, _ = optimizer_step(
            self.train_forward,
            self.optimizer,
            self.scheduler,
            batches,
            step_tokens=step_tokens,
            parallel=self.parallel,
        )
        return loss, sum(len(self.train_data[i]) for mb in micro_batches for i in mb)

    def _rank_batch(self, micro_batch: list[int]) -> dict[str, torch.Tensor]:
        """This rank's share of a planned micro-batch, collated on the model's device."""
        share = self.parallel.shard(micro_batch)
        if share:
            return _to_device(
                collate([self.train_data[i] for i in share], self.pad_token_id), self.device
            )
        # A micro-batch with fewer examples than ranks left this share empty. The rank
        # still runs a forward and backward, which DDP's gradient reduction waits for: the
        # micro-batch's first example with no token labelled, adding 0 to the loss and to
        # every gradient.
        batch = collate([self.train_data[micro_batch[0]]], self.pad_token_id)
        batch["labels"].fill_(IGNORE_INDEX)
        return _to_device(batch, self.device)

    def run(self, resume: bool = False) -> RunResult:
        """Train to the last step (or until stopped), checkpointing and evaluating as
        configured; write the final adapter and plot. Returns what happened.

        Data parallel, every rank calls it; the ranks agree on stopping (a signal to any
        of them stops all after the same step) and return together, once rank 0 has
        written everything.
        """
        if resume:
            self.resume()
        if self.parallel.is_main:
            run_file = {**self.run_info, "arguments": self.args.to_dict()}
            write_json_atomic(self.out / RUN_FILE, run_file)
        self.model.train()
        # After resume(): loading the checkpoint may have replaced the adapter's tensors.
        self.train_forward = self.parallel.wrap(self.forward, active_parameters(self.model))
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="fine-tuning",
            unit="step",
            disable=not (self.progress and self.parallel.is_main),
            dynamic_ncols=True,
        )
        say = bar.write if self.parallel.is_main else logger.info
        stop = StopRequest()
        last_loss: float | None = None
        val: EvalResult | None = None
        checkpoint: Path | None = None
        run_started = time.perf_counter()
        run_tokens, run_seconds = 0, 0.0
        try:
            with stop.installed():
                while self.step < self.total_steps and not self.parallel.any(stop.requested):
                    started = time.perf_counter()
                    lr = self.scheduler.get_last_lr()[0]
                    last_loss, seen = self._train_step(self.plan[self.step])
                    seconds = time.perf_counter() - started
                    self.step += 1
                    self.tokens += seen
                    self.elapsed += seconds
                    run_tokens += seen
                    run_seconds += seconds
                    speed = run_tokens / max(run_seconds, 1e-9)
                    self._record(
                        {
                            "kind": "train",
                            "step": self.step,
                            "loss": last_loss,
                            "lr": lr,
                            "tokens": self.tokens,
                            "tokens_per_s": seen / max(seconds, 1e-9),
                            "elapsed_s": round(self.elapsed, 3),
                        }
                    )
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
                    if not math.isfinite(last_loss):
                        raise TrainingError(
                            f"the loss became {last_loss} at step {self.step}; lower --lr"
                        )
                    last = self.step == self.total_steps
                    if self.args.eval_every and self.step % self.args.eval_every == 0 and not last:
                        val = self._evaluate()
                        say(f"step {self.step}: validation loss {val.loss:.4f}")
                    if self.args.save_every and self.step % self.args.save_every == 0 and not last:
                        checkpoint = self.save_checkpoint()
                interrupted = self.step < self.total_steps
                if interrupted:
                    checkpoint = self.save_checkpoint()
                    say(f"stopped at step {self.step}; wrote {checkpoint}")
                elif run_tokens == 0:  # resumed from the last step: nothing new to record
                    checkpoint = checkpoints(self.out)[-1][1]
                    self._publish()
                else:
                    val = self._evaluate()
                    checkpoint = self.save_checkpoint()
                    self._publish()
                    self._plot()
        finally:
            bar.close()
            self.model.eval()
            self.train_forward = self.forward
        # No rank returns (and exits: torchrun stops the others when one exits with an
        # error status, 130 included) before rank 0 has written the run's files.
        self.parallel.barrier()
        total = time.perf_counter() - run_started
        return RunResult(
            steps=self.step,
            total_steps=self.total_steps,
            interrupted=interrupted,
            train_loss=last_loss,
            val=val,
            seconds=total,
            tokens=run_tokens,
            tokens_per_second=run_tokens / max(run_seconds, 1e-9),
            checkpoint=checkpoint,
            out=self.out,
        )
