"""Token generation over a decode-step graph: one loop for PyTorch and ONNX Runtime.

A *session* runs the decode step and keeps the key/value cache between calls (PyTorch
tensors here, ONNX Runtime values in ``adaption_fx.export.ort``); this module owns what is
common: argument checks, position ids for left-padded batches, greedy and sampled token
choice, and per-row stopping at eos. It also reads the eos and pad ids a model's own
``generate`` defaults to (:func:`generation_defaults`), so that ours stop where Hugging
Face's do.
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.fx
import torch.utils._pytree as pytree

from adaption_fx.capture.captured import CapturedModel
from adaption_fx.capture.decode import CacheLayout
from adaption_fx.capture.gc_pause import paused_gc
from adaption_fx.capture.variants import graph_variant
from adaption_fx.generation.args import GenerationArgs, token_ids
from adaption_fx.generation.options import EosTokenIds
from adaption_fx.generation.text import text_chunks
from adaption_fx.passes.cleanup import EliminateDeadCode, is_functional
from adaption_fx.passes.codegen import GraphFunction
from adaption_fx.passes.decode_step import decode_step_passes
from adaption_fx.passes.graph_copy import copy_flat_graph
from adaption_fx.passes.hoist import hoist_invariant
from adaption_fx.passes.infra import PassNotApplicable, graph_module_over, run_passes
from adaption_fx.passes.site import AttentionSite

logger = logging.getLogger(__name__)


def _default_ids(where: str, name: str, value: Any) -> Any:
    """``value`` (a default read from a model) if it is a valid ``name``, else None.

    A default the caller did not pass must not make ``generate`` fail: configs in the wild
    hold values our checks reject (``pad_token_id=-1`` in early Llama conversions).
    """
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    try:
        token_ids(name, value)
        valid = name == "eos_token_id" or not isinstance(value, list)  # one pad id
    except (TypeError, ValueError):
        valid = False
    if not valid:
        logger.warning("ignoring %s.%s = %r: not a valid token id", where, name, value)
        return None
    return value


def generation_defaults(module: Any) -> tuple[EosTokenIds, int | None]:
    """The ``(eos_token_id, pad_token_id)`` a model's ``generate`` uses when a call names
    neither, read as Hugging Face's ``generate`` reads them.

    Each comes from ``module.generation_config`` (every Hugging Face model that can
    generate has one, filled from its config and ``generation_config.json``). Where that
    object lacks the attribute, or the module has no generation config, it comes from
    ``module.config``. A None held by the generation config is kept: Hugging Face's
    ``generate`` does not fall back to the config then, and setting
    ``generation_config.eos_token_id = None`` is how its users turn eos stopping off.

    Args:
        module: the source model (``AdaptedModel`` keeps it for generation), or None.

    Returns:
        ``eos_token_id`` (an int, a list of ints or None) and ``pad_token_id`` (an int or
        None); values that are not valid token ids are logged and read as None. A pad id
        of None leaves ``generate``'s own fallback: the first eos id, else 0.
    """
    sources = [(where, getattr(module, where, None)) for where in ("generation_config", "config")]
    found: list[Any] = []
    for name in ("eos_token_id", "pad_token_id"):
        value = None
        for where, holder in sources:
            if holder is not None and hasattr(holder, name):
                value = _default_ids(where, name, getattr(holder, name))
                break
        found.append(value)
    return found[0], found[1]


class DecodeSession(Protocol):
    """Runs decode steps, holding the cache between them."""

    def reset(self, batch: int) -> None:
        """Forget the cache: the next step is a prefill (past length 0)."""

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Run new tokens (batch, n) against the cache; return the last token's logits
        (batch, vocab) and extend the cache with the new tokens' keys and values."""


class StepProgram:
    """The folded decode step, prepared for one eager call per token.

    The graph torch.export captured is rewritten into one variant per kind of step
    (``"decode"``, ``"prefill"``, ``"decode_masked"``, ``"masked"``), each by its own list
    of passes (:func:`adaption_fx.passes.decode_step.decode_step_passes`) run by
    :func:`adaption_fx.passes.infra.run_passes`.

    Each variant's adapter-only values are hoisted into a prologue that runs once per
    session (:func:`adaption_fx.passes.hoist.hoist_invariant`), and both parts are compiled
    to plain Python functions (:class:`adaption_fx.passes.codegen.GraphFunction`). A
    variant whose masks are not plain causal-and-padding (a sliding window, say) is the
    masked one. Variants are built on first use and kept with the graph.
    """

    FALLBACK: ClassVar[dict[str, str]] = {"decode": "decode_masked", "prefill": "masked"}

    def __init__(self, graph_module: torch.fx.GraphModule, captured: Any, layout: Any):
        # Weakly: a program is kept with this graph module (capture.variants).
        self._graph_module = weakref.ref(graph_module)
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        n_model = captured.in_spec.num_leaves
        # The flat position of each named input, read through the capture's own flatten.
        markers = {name: object() for name in captured.keyword_names}
        flat = captured.flatten((), markers)
        flat_names = {id(m): name for name, m in markers.items()}
        model_names = [flat_names[id(m)] for m in flat]
        self.input_names = ["input_ids", "attention_mask", "position_ids", *layout.past_inputs]
        if sorted(model_names) != sorted(self.input_names) or len(placeholders) < n_model:
            raise ValueError("the decode step's inputs are not the expected ones")
        self.model_placeholders = dict(
            zip(model_names, (p.name for p in placeholders[:n_model]), strict=True)
        )
        self.invariant = [p.name for p in placeholders[n_model:]]
        outputs = pytree.tree_unflatten(
            list(range(captured.out_spec.num_leaves)), captured.out_spec
        )
        self.logits_index = outputs["logits"]
        self.present_indices = [outputs[name] for name in layout.present_outputs]
        if not is_functional(graph_module.graph, allow_fresh_inplace=True):
            raise ValueError("the decode step mutates tensors; the passes need a functional graph")
        self._built: dict[str, tuple[GraphFunction, GraphFunction] | None] = {}

    @paused_gc()
    def _build(self, kind: str) -> tuple[GraphFunction, GraphFunction] | None:
        graph_module = self._graph_module()
        if graph_module is None:
            return None
        graph, _ = copy_flat_graph(graph_module)
        mask_input = self.model_placeholders["attention_mask"]
        try:
            result = run_passes(
                graph_module_over(graph_module, graph), decode_step_passes(kind, mask_input)
            )
        except PassNotApplicable as exc:
            logger.debug("no %s decode step: %s", kind, exc)
            return None
        graph = result.graph_module.graph
        split = hoist_invariant(graph, self.invariant)
        main = split.main
        EliminateDeadCode().transform(main)
        # Inputs in the session's order (input_ids, attention_mask, position_ids, past...),
        # then the hoisted values; outputs as (logits, (present...)).
        by_name = {n.name: n for n in main.nodes if n.op == "placeholder"}
        ordered = [by_name[self.model_placeholders[name]] for name in self.input_names]
        hoisted = [n for n in main.nodes if n.op == "placeholder" and n.name.startswith("hoisted_")]
        desired = [*ordered, *hoisted]
        head = next(iter(main.nodes))
        if head is not desired[0]:
            head.prepend(desired[0])
        for previous, node in itertools.pairwise(desired):
            previous.append(node)
        output = next(n for n in main.nodes if n.op == "output")
        flat_out = output.args[0]
        output.args = (
            (flat_out[self.logits_index], tuple(flat_out[i] for i in self.present_indices)),
        )
        main.lint()
        EliminateDeadCode().transform(split.prologue)
        return GraphFunction(split.prologue, "prologue"), GraphFunction(main, f"step_{kind}")

    def functions(self, kind: str) -> tuple[GraphFunction, GraphFunction] | None:
        """The compiled (prologue, step) of a kind, its fallback's where it has none."""
        if kind not in self._built:
            try:
                built = self._build(kind)
            except Exception:  # an unforeseen graph: run that kind as captured
                logger.warning("the %s decode step runs unoptimised", kind, exc_info=True)
                built = None
            if built is None and kind in self.FALLBACK:
                built = self.functions(self.FALLBACK[kind])
            self._built[kind] = built
        return self._built[kind]


def _step_program(graph_module: torch.fx.GraphModule, captured: Any, layout: Any):
    """The graph module's step program (kept with it), or None where it runs as captured."""

    def build() -> StepProgram | bool:
        try:
            return StepProgram(graph_module, captured, layout)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.info("decode step runs through its GraphModule: %s", exc)
            return False

    return graph_variant(graph_module, ("step_program",), build) or None


class DecodeStepModel(Protocol):
    """What a :class:`TorchSession` reads from a decode-step model (``AdaptedModel.decoder()``
    is one); a protocol, so that the loop does not depend on the model package."""

    captured: CapturedModel
    cache_layout: CacheLayout
    base_graph_module: torch.fx.GraphModule
    sites: Sequence[AttentionSite]

    def inference_graph(self) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]: ...

    def mixed_inference_graph(
        self, adapter_names: Sequence[str]
    ) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]: ...


class TorchSession:
    """A decode session on an AdaptedModel's decode-step twin (``AdaptedModel.decoder()``).

    It runs the twin's graph for the current adapter state with the adapter folded (see
    ``AdaptedModel.inference_graph``): the prompt projections run once per session, not
    in every step.

    Run eagerly (no ``runner``), the graph runs as a :class:`StepProgram`: rewritten per
    kind of step into the attention transformers runs eagerly, its adapter-only values
    computed once per session, its weights and inputs bound once; a step checks its inputs'
    shapes, picks the variant (one host read: whether the mask is all ones) and calls it.
    """

    def __init__(
        self, decoder: DecodeStepModel, runner: Any = None, adapter_names: list[str] | None = None
    ):
        self.decoder = decoder
        decoder.captured.check_placement()
        if adapter_names is None:
            self.graph_module, self.adapter_values = decoder.inference_graph()
        else:  # one adapter per row (checked by the caller): the mixed graph and its table
            self.graph_module, self.adapter_values = decoder.mixed_inference_graph(adapter_names)
        # How the graph runs (see AdaptedModel.run_graphs): eagerly, or compiled.
        self.run = (runner or (lambda gm: gm))(self.graph_module)
        self.layout = decoder.cache_layout
        self.past: list[torch.Tensor] = []
        self.device = decoder.base_graph_module.get_parameter(
            decoder.sites[0].key_projection.weight
        ).device
        self.program = None
        if runner is None:
            self.program = _step_program(self.graph_module, decoder.captured, self.layout)
        self._bound: dict[str, tuple[Any, tuple[Any, ...]]] = {}
        self.batch = 0

    def reset(self, batch: int) -> None:
        self.past = self.layout.empty(batch, self.device)
        self.batch = batch

    def _function(self, kind: str) -> tuple[Any, tuple[Any, ...]] | None:
        """The bound step function of a kind and its hoisted values (computed now, from
        this session's adapter values), or None where the kind runs as captured."""
        if kind not in self._bound:
            functions = self.program.functions(kind)
            bound = None
            if functions is not None:
                prologue, step = functions
                with torch.no_grad():
                    hoisted = prologue.bind(self.graph_module)(*self.adapter_values)
                bound = (step.bind(self.graph_module), tuple(hoisted))
            self._bound[kind] = bound
        return self._bound[kind]

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.program is None:
            return self._step_graph_module(input_ids, attention_mask, position_ids)
        past = self.past
        past_len = past[0].shape[2] if past else 0
        checked = (
            isinstance(input_ids, torch.Tensor)
            and isinstance(attention_mask, torch.Tensor)
            and isinstance(position_ids, torch.Tensor)
            and input_ids.dim() == 2
            and not input_ids.is_floating_point()
            and input_ids.shape[0] == self.batch
            and attention_mask.shape == (self.batch, past_len + input_ids.shape[1])
            and position_ids.shape == input_ids.shape
        )
        if past_len == 0 or not checked:
            # The full check (with the capture's messages): the prefill, or a bad call.
            feed = dict(zip(self.layout.past_inputs, past, strict=True))
            feed.update(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            )
            self.decoder.captured.bind_named((), feed)
            if not checked:
                raise ValueError(
                    f"inputs of shapes {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}"
                    f", {tuple(position_ids.shape)} do not continue this session's batch of "
                    f"{self.batch} with {past_len} past tokens"
                )
        unpadded = bool(attention_mask.all())
        if input_ids.shape[1] == 1:
            kind = "decode" if unpadded else "decode_masked"
        else:
            kind = "prefill" if unpadded and past_len == 0 else "masked"
        bound = self._function(kind)
        if bound is None:
            return self._step_graph_module(input_ids, attention_mask, position_ids)
        fn, hoisted = bound
        with torch.no_grad():
            logits, present = fn(input_ids, attention_mask, position_ids, *past, *hoisted)
        self.past = list(present)
        return logits[:, -1, :]

    def _step_graph_module(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        feed = dict(zip(self.layout.past_inputs, self.past, strict=True))
        feed.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        captured = self.decoder.captured
        flat = captured.bind((), feed)
        out = captured.unflatten(self.run(*flat, *self.adapter_values))
        self.past = [out[name] for name in self.layout.present_outputs]
        return out["logits"][:, -1, :]


def check_prompt(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch of left-padded prompts; return (input_ids, attention_mask) as long."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    batch, seq = input_ids.shape
    if batch == 0 or seq == 0:
        raise ValueError(f"the prompt is empty: input_ids has shape {tuple(input_ids.shape)}")
    if bool((input_ids < 0).any()):
        raise ValueError("input_ids holds negative token ids")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
            f"{tuple(input_ids.shape)}; they must match"
        )
    mask = attention_mask.to(torch.long)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((mask.sum(-1) == 0).any()):
        rows = torch.nonzero(mask.sum(-1) == 0).flatten().tolist()
        raise ValueError(f"rows {rows} of attention_mask are all padding: nothing to continue")
    # Left padding only: once a row's tokens start, none is masked.
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "attention_mask has padding after a token (right padding); pad prompts on the "
            "left for generation"
        )
    return input_ids.to(torch.long), mask


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, -math.inf)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    # As Hugging Face's TopPLogitsWarper: drop the least likely tokens whose cumulative
    # probability stays within 1 - top_p, always keeping the most likely one.
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def choose_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The fast path's next token of each row from its logits (batch, vocab): what Hugging
    Face's temperature, top-k and top-p warpers and its sampler give, in their order."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None:
        logits = _filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = _filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class StepRecord:
    """What ``output_scores`` / ``output_logits`` keep: per step, (batch, vocab)."""

    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def decode_steps(
    session: DecodeSession,
    ids: torch.Tensor,
    mask: torch.Tensor,
    args: GenerationArgs,
    max_new_tokens: int,
    record: StepRecord | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens (batch,) for checked prompts (see :func:`generate`).

    A row that ended (eos, or a stopping criterion) gets ``args.pad_token_id`` from then
    on where the call has eos ids (as Hugging Face pads only then); the steps stop when
    every row has ended or ``max_new_tokens`` were produced. A streamer receives the prompt
    first, each step's tokens, and ``end()`` (also when the caller stops early).
    """
    if max_new_tokens == 0:
        return
    streamer = args.streamer
    if streamer is not None:
        streamer.put(ids.cpu())
    try:
        yield from _steps(session, ids, mask, args, max_new_tokens, record)
    finally:
        if streamer is not None:
            streamer.end()


class TokenChooser:
    """How one generation picks each step's tokens and decides which rows ended: the
    library's one implementation of Hugging Face's options (sampling warpers, logits
    processors, eos, stopping criteria such as ``stop_strings``), used by :func:`decode_steps`
    and by the server's scheduler (``adaption_fx.serving``), which runs it per request.

    Args:
        args: the call's resolved options.
        mask: the prompts' attention mask (batch, prompt_len) (processors read its length
            and padding).
    """

    def __init__(self, args: GenerationArgs, mask: torch.Tensor):
        device = mask.device
        self.args = args
        self.do_sample = args.do_sample
        self.generator = None
        if self.do_sample and args.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(args.seed)
        self.eos_ids = torch.tensor(args.eos_token_ids, dtype=torch.long, device=device)
        self.pad = args.pad_token_id
        self.processors = args.logits_processors(mask)
        self.criteria = args.stopping()
        #: no processor but the warpers choose_tokens applies, no criterion: the fast path.
        self.plain = args.fast_path(self.processors, self.criteria)
        #: rows end by eos or a criterion; without either none does (no host read per step).
        self.ends = bool(args.eos_token_ids) or bool(self.criteria)
        self.scores: torch.Tensor | None = None  # the last processed scores (criteria read them)

    def choose(
        self, logits: torch.Tensor, sequence: torch.Tensor, record: StepRecord | None = None
    ) -> torch.Tensor:
        """The next token of each row (batch,) from its last logits (batch, vocab), given
        each row's tokens so far (``sequence``, read by processors only)."""
        if self.plain:
            temperature, top_k, top_p = self.args.sampling
            return choose_tokens(
                logits,
                do_sample=self.do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=self.generator,
            )
        raw = logits.to(dtype=torch.float32, copy=True)
        scores = self.processors(sequence, raw.clone() if record is not None else raw)
        if record is not None:
            record.scores.append(scores)
            record.logits.append(raw)
        self.scores = scores
        if self.do_sample:
            probs = scores.softmax(dim=-1)
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return scores.argmax(dim=-1)

    def ended(self, token: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        """Which rows end with ``token`` (bool, batch): an eos id, or a stopping criterion
        on ``sequence`` (the tokens so far, ``token`` included)."""
        done = torch.zeros(token.shape[0], dtype=torch.bool, device=token.device)
        if self.args.eos_token_ids:
            done |= torch.isin(token, self.eos_ids)
        if self.criteria:
            scores = None if self.plain else self.scores
            done |= self.criteria(sequence, scores).to(token.device)
        return done


def _steps(
    session: DecodeSession,
    ids: torch.Tensor,
    mask: torch.Tensor,
    args: GenerationArgs,
    max_new_tokens: int,
    record: StepRecord | None,
) -> Iterator[torch.Tensor]:
    device = ids.device
    batch = ids.shape[0]
    chooser = TokenChooser(args, mask)
    use_cache = bool(args.config.use_cache)
    streamer = args.streamer
    # Left padding: a token's position counts only the real tokens before it.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    session.reset(batch)
    logits = session.step(ids, mask, positions)
    finished = torch.zeros(batch, dtype=torch.bool, device=device) if chooser.ends else None
    new_column = torch.ones_like(mask[:, :1])
    sequence = ids
    keep_sequence = not chooser.plain or not use_cache
    for index in range(max_new_tokens):
        token = chooser.choose(logits, sequence, record)
        if finished is not None and args.eos_token_ids:
            token = token.masked_fill(finished, chooser.pad)
        if keep_sequence:  # processors, criteria and the cache-free step read it
            sequence = torch.cat([sequence, token[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(token.cpu())
        yield token
        if finished is not None:
            finished |= chooser.ended(token, sequence)
        if index == max_new_tokens - 1 or (finished is not None and bool(finished.all())):
            break
        mask = torch.cat([mask, new_column], dim=-1)
        next_position = positions[:, -1:] + 1
        if use_cache:
            positions = next_position  # the cache holds the rest
            logits = session.step(token[:, None], mask, next_position)
        else:
            positions = torch.cat([positions, next_position], dim=-1)
            session.reset(batch)
            logits = session.step(sequence, mask, positions)


def prepare_prompts(
    input_ids: Any, attention_mask: Any, args: GenerationArgs, max_length: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Checked prompts, each row repeated ``num_return_sequences`` times, and how many new
    tokens to produce (refused where they would pass the decode step's ``max_length``)."""
    ids, mask = check_prompt(input_ids, attention_mask)
    copies = args.num_return_sequences
    if copies > 1:
        ids, mask = ids.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
    seq = ids.shape[1]
    max_new_tokens = args.max_new_tokens(seq)
    if max_length is not None and seq + max_new_tokens > max_length:
        raise ValueError(
            f"prompt length {seq} + max_new_tokens {max_new_tokens} exceeds the maximum "
            f"length {max_length} the decode step was captured for"
        )
    return ids, mask, max_new_tokens


@torch.no_grad()
def generate(
    session: DecodeSession,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    args: GenerationArgs,
    *,
    max_length: int | None = None,
) -> Any:
    """Generate with ``session``; see ``AdaptedModel.generate`` for the options.

    Returns:
        The prompts followed by the new tokens, (batch x num_return_sequences,
        prompt_len + steps); with ``return_dict_in_generate``, Hugging Face's
        ``GenerateDecoderOnlyOutput`` (``sequences``, and ``scores`` / ``logits`` per step
        where ``output_scores`` / ``output_logits`` ask for them).
    """
    ids, mask, max_new_tokens = prepare_prompts(input_ids, attention_mask, args, max_length)
    config = args.config
    record = StepRecord() if (config.output_scores or config.output_logits) else None
    steps = list(decode_steps(session, ids, mask, args, max_new_tokens, record))
    sequences = torch.cat([ids, torch.stack(steps, dim=1)], dim=-1) if steps else ids.clone()
    if not args.returns_dict:
        return sequences
    from transformers.generation import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=tuple(record.scores) if record is not None and config.output_scores else None,
        logits=tuple(record.logits) if record is not None and config.output_logits else None,
    )


def stream(
    session: DecodeSession,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    args: GenerationArgs,
    *,
    max_length: int | None = None,
) -> Iterator[torch.Tensor]:
    """:func:`generate` as an iterator of each step's new tokens (batch,), produced as the
    caller asks for them (no thread). Stopping early ends the generation."""
    ids, mask, max_new_tokens = prepare_prompts(input_ids, attention_mask, args, max_length)
    if args.returns_dict:
        raise ValueError("return_dict_in_generate does not apply to stream(); use generate()")
    steps = decode_steps(session, ids, mask, args, max_new_tokens)
    while True:
        with torch.no_grad():
            token = next(steps, None)
        if token is None:
            return
        yield token


def run_generation(
    new_session: Callable[[list[str] | None], DecodeSession],
    input_ids: Any,
    attention_mask: Any,
    args: GenerationArgs,
    *,
    adapter_names: list[str] | None = None,
    max_length: int | None = None,
    streaming: bool = False,
) -> Any:
    """What every model's ``generate`` and ``stream`` do once their options are resolved:
    a session for the call's rows (each row's adapter repeated for its
    ``num_return_sequences``), then :func:`generate`, or :func:`stream` (its text pieces,
    :func:`adaption_fx.generation.text.text_chunks`, where the call names a tokenizer)."""
    copies = args.num_return_sequences
    if adapter_names is not None and copies > 1:
        adapter_names = [name for name in adapter_names for _ in range(copies)]
    session = new_session(adapter_names)
    if not streaming:
        return generate(session, input_ids, attention_mask, args, max_length=max_length)
    tokens = stream(session, input_ids, attention_mask, args, max_length=max_length)
    return tokens if args.tokenizer is None else text_chunks(tokens, args.tokenizer)
