"""AdaptedModel: a captured base graph plus named adapters, each bound to a rewritten graph."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.fx

from adaption_fx import checkpoint as ckpt
from adaption_fx.capture.decode import CacheLayout, capture_decode
from adaption_fx.capture.export_model import CapturedModel
from adaption_fx.capture.gc_pause import paused_gc
from adaption_fx.config import AdaptionConfig
from adaption_fx.generation.args import resolve_generation
from adaption_fx.generation.loop import TorchSession, generation_defaults, run_generation
from adaption_fx.generation.options import EosTokenIds
from adaption_fx.model.eager import GradientCheckpointing, eager_graph
from adaption_fx.model.graph_store import GraphStore, StructureGraphs, StructureKey
from adaption_fx.model.hf_api import HuggingFaceModelAPI, signed_forward, with_causal_lm_loss
from adaption_fx.model.mixed import (
    BASE_ADAPTER,
    AdapterTable,
    TableEntry,
    build_adapter_table,
    check_adapter_names,
    union_sites,
)
from adaption_fx.passes.graph_copy import owner_at
from adaption_fx.passes.insert import AdaptionGraph, adapter_tensor_shapes
from adaption_fx.passes.locate import locate_attention, select_top_sites
from adaption_fx.passes.mixed_batch import MixedGraph
from adaption_fx.passes.site import AttentionSite

logger = logging.getLogger(__name__)


class AdapterWeights(torch.nn.Module):
    """One adapter's tensors, laid out so that named_parameters() gives PEFT's key paths.

    ``model.layers.3.self_attn.adaption_prompt`` lives at that attribute path inside this
    module, built from empty container modules.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for key, shape in shapes.items():
            if key.endswith("adaption_prompt"):
                data = torch.empty(shape, dtype=torch.float32, device="cpu").normal_(
                    generator=generator
                )
            else:  # zero-init gate: training starts exactly at the base model
                data = torch.zeros(shape, dtype=torch.float32)
            self._install(key, torch.nn.Parameter(data.to(device=device, dtype=dtype)))

    def _install(self, key: str, param: torch.nn.Parameter) -> None:
        owner, name = owner_at(self, key)
        owner.register_parameter(name, param)

    def tensors(self, keys: tuple[str, ...]) -> list[torch.Tensor]:
        params = dict(self.named_parameters())
        return [params[k] for k in keys]


_NAME_PATTERN = re.compile(r"[A-Za-z0-9_\- ]+")


def check_adapter_name(name: object) -> None:
    """A usable adapter name, or a TypeError/ValueError saying why not."""
    # Names become module names and, in checkpoints, subfolder names: no dots, no slashes.
    if not isinstance(name, str) or not name:
        raise TypeError(f"adapter_name must be a non-empty str, got {name!r}")
    if name == BASE_ADAPTER:
        raise ValueError(
            f"adapter_name {name!r} is reserved: in adapter_names=[...] it names the base "
            "model; pick another name"
        )
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"adapter_name {name!r} is not usable: use letters, digits, spaces, '_' and '-'"
        )


def _batch_size(flat: list[Any]) -> int:
    """Rows of a batch: the leading size of the first tensor input."""
    for value in flat:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("adapter_names needs a batched tensor input; the call has none")


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class AdaptedModel(HuggingFaceModelAPI, torch.nn.Module):
    """A model whose top attention layers carry LLaMA-Adapter prompts.

    Built by :func:`adaption_fx.rewrite`. Calls take the same arguments as the source model
    and return the same output structure. The base weights are the source model's own
    tensors (frozen, never copied); each adapter's prompts and gates are parameters, which
    require grad while that adapter is the active one (as in PEFT). Adapters that share
    adapter_len, adapted layers and gate variant run the same rewritten graph with
    different tensors bound to its adapter inputs. ``adapter_names=[...]`` in
    :meth:`forward` and :meth:`generate` gives each batch row its own adapter (see
    :mod:`adaption_fx.model.mixed`).
    """

    def __init__(
        self,
        captured: CapturedModel,
        sites: list[AttentionSite],
        source: torch.nn.Module | None = None,
    ):
        super().__init__()
        self._captured = captured
        self._sites = list(sites)
        self.base_graph_module = captured.graph_module
        self.adapter_weights = torch.nn.ModuleDict()
        self._configs: dict[str, AdaptionConfig] = {}
        self._adapter_structure: dict[str, StructureKey] = {}
        self._active: str | None = None
        self._enabled = True
        # Every graph this model runs, the decode-step twin's included (see graph_store).
        self._store = GraphStore(captured, self._sites)
        # The source module (for capturing the decode step on first use and for the
        # Hugging Face attributes). A plain attribute: not a submodule of this one.
        object.__setattr__(self, "_source", source)
        # Set by gradient_checkpointing_enable: which layers the training twin recomputes.
        self._checkpointing: GradientCheckpointing | None = None

    # ----------------------------------------------------------------- inspection
    @property
    def sites(self) -> list[AttentionSite]:
        """Every attention site found in the base graph, in execution order."""
        return list(self._sites)

    @property
    def adapters(self) -> dict[str, AdaptionConfig]:
        """The adapters by name, in the order they were added."""
        return dict(self._configs)

    @property
    def active_adapter(self) -> str | None:
        """Name of the adapter forward uses (None once every adapter was deleted)."""
        return self._active

    @property
    def adapters_enabled(self) -> bool:
        """Whether forward runs the active adapter (False inside :meth:`disable_adapter`)."""
        return self._enabled

    @property
    def graph_store(self) -> GraphStore:
        """Every graph this model runs (see :mod:`adaption_fx.model.graph_store`); for
        inspection: adapters are managed through this model's methods."""
        return self._store

    @property
    def source_model(self) -> torch.nn.Module | None:
        """The model ``rewrite`` captured, when it was an ``nn.Module`` (generation captures
        its decode step; the Hugging Face attributes read its config), else None."""
        return self.__dict__["_source"]

    def adapted_sites(self, adapter_name: str | None = None) -> list[AttentionSite]:
        """The sites an adapter modifies (the active adapter by default)."""
        return list(self.adaption_graph(adapter_name).sites)

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The graph forward runs now: the active adapter's rewritten graph, or the base
        graph while adapters are disabled or none is left.

        It takes the flat model inputs followed by the adapter tensors listed in
        :meth:`adapter_inputs` (none for the base graph).
        """
        graph = self._active_graph()
        return graph.graph_module if graph is not None else self.base_graph_module

    def adapter_inputs(self) -> list[tuple[str, torch.Tensor]]:
        """(state-dict key, tensor) pairs bound to the current graph's adapter inputs."""
        graph = self._active_graph()
        if graph is None:
            return []
        tensors = self.adapter_tensors(self._active)
        return list(zip(graph.adapter_inputs, tensors, strict=True))

    # ----------------------------------------------------------------- management
    def add_adapter(
        self, adapter_name: str, config: AdaptionConfig, generator: torch.Generator | None = None
    ) -> None:
        """Add an adapter. Nothing changes on error.

        As in PEFT (0.21), adding does not change which adapter is active, except that an
        adapter added when none is active (the first one) becomes active. Use
        :meth:`set_adapter` to switch.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self._configs:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists (adapters: "
                f"{list(self._configs)}); delete it first or pick another name"
            )
        self._commit(adapter_name, *self._prepare(config, generator))

    def _prepare(
        self, config: AdaptionConfig, generator: torch.Generator | None = None
    ) -> tuple[AdaptionConfig, StructureKey, StructureGraphs, AdapterWeights]:
        """Everything an adapter needs, built without touching the model's state."""
        if not isinstance(config, AdaptionConfig):
            raise TypeError(f"config must be an AdaptionConfig, got {type(config).__name__}")
        selected, key, graphs = self._store.build(config)
        weight = self.base_graph_module.get_parameter(selected[0].key_projection.weight)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        weights = AdapterWeights(
            adapter_tensor_shapes(selected, config.structure), dtype, weight.device, generator
        )
        return config, key, graphs, weights

    def _commit(
        self,
        name: str,
        config: AdaptionConfig,
        key: StructureKey,
        graphs: StructureGraphs,
        weights: AdapterWeights,
    ) -> None:
        """Install a prepared adapter under ``name``, replacing one of that name if any."""
        old_key = self._adapter_structure.get(name)
        self._store.install(key, graphs)
        self.adapter_weights[name] = weights
        self._configs[name] = config
        self._adapter_structure[name] = key
        if old_key is not None and old_key not in self._adapter_structure.values():
            self._store.drop(old_key)
        if self._active is None:
            self._active = name
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        """As PEFT's set_adapter: the active adapter's tensors train (requires_grad=True),
        every other adapter's are frozen, so an optimizer built from the parameters that
        require grad (Hugging Face's Trainer builds one so) holds the active adapter only."""
        for name, weights in self.adapter_weights.items():
            weights.requires_grad_(name == self._active)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter forward uses (works while disabled too).

        Its tensors become trainable (requires_grad=True) and every other adapter's are
        frozen, as in PEFT.
        """
        self._active = self._resolve(adapter_name)
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Deleting the active one activates the first remaining one."""
        name = self._resolve(adapter_name)
        key = self._adapter_structure.pop(name)
        del self._configs[name]
        del self.adapter_weights[name]
        if key not in self._adapter_structure.values():
            self._store.drop(key)
        if self._active == name:
            self._active = next(iter(self._configs), None)
            self._mark_trainable()

    def disable_adapter_layers(self) -> None:
        """Run the base graph: outputs are the source model's, bit for bit."""
        self._enabled = False

    def enable_adapter_layers(self) -> None:
        """Run the active adapter's graph again."""
        self._enabled = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the base model runs; the previous state is restored after."""
        was_enabled = self._enabled
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = was_enabled

    def _resolve(self, adapter_name: str | None) -> str:
        name = self._active if adapter_name is None else adapter_name
        if name not in self._configs:
            raise ValueError(f"no adapter named {name!r}; adapters are {list(self._configs)}")
        return name

    def _active_graph(self) -> AdaptionGraph | None:
        if not self._enabled or self._active is None:
            return None
        return self.adaption_graph(self._active)

    # ----------------------------------------------------------------- running
    @signed_forward
    def forward(
        self,
        *args: Any,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model: same arguments and output structure as the source model.

        ``adapter_names`` (one name per batch row: a registered adapter, or ``"__base__"``
        for the base model, as in PEFT) runs each row with its own adapter in one call;
        each row's result is what that row gives alone with its adapter active. Mixed
        batches are for inference: they run without autograd and refuse ``labels``.

        For Hugging Face causal LMs, ``labels=`` adds ``loss`` computed with the source
        model's own loss function (outside the graph); ``num_items_in_batch`` goes to it as
        in Hugging Face models (the loss is then the sum over ``num_items_in_batch``).
        ``inspect.signature(model.forward)`` lists this model's own inputs (see
        :func:`adaption_fx.model.hf_api.forward_signature`).
        """
        if labels is not None:
            kwargs["labels"] = labels
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names
        return self.run_graphs(self.eager_runner(), args, kwargs)

    def eager_runner(self) -> Callable[[torch.fx.GraphModule], torch.fx.GraphModule]:
        """How :meth:`forward` picks the graph to run: the rewritten graph, or its training
        twin while autograd records (with gradient checkpointing when enabled)."""
        checkpointing = self._checkpointing
        return lambda graph_module: eager_graph(graph_module, checkpointing)

    def release_base_holders(self) -> None:
        """Drop every reference to the base weights other than this model's own graphs:
        the source model (so :meth:`generate` is no longer available), the decode-step
        twin, the mask-free causal capture and its graphs (forward always runs the masked
        capture), the folded inference graphs and the capture's reference weight. For
        sharding the base (``adaption_fx.training.sharded``), where no full copy may stay alive."""
        object.__setattr__(self, "_source", None)
        self._store.release_base_holders()

    # ----------------------------------------------------------------- checkpointing
    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        """Recompute each adapted decoder layer's activations in the backward instead of
        keeping them (Hugging Face's name; the Trainer calls it for
        ``gradient_checkpointing=True``).

        A graph pass (``passes/activation_checkpoint.py``) finds each decoder layer from the
        graph's module stacks and runs it under ``torch.utils.checkpoint.checkpoint``;
        ``gradient_checkpointing_kwargs`` go to that call (``use_reentrant`` (default False),
        ``preserve_rng_state``, ``determinism_check``). Outputs and gradients are unchanged;
        inference (``no_grad``), generation and export never use it.
        """
        plan = GradientCheckpointing.build(
            [s.module_path for s in self._sites], gradient_checkpointing_kwargs
        )
        self._checkpointing = plan

    def gradient_checkpointing_disable(self) -> None:
        """Keep activations for the backward again (the default)."""
        self._checkpointing = None

    @property
    def checkpointing_plan(self) -> GradientCheckpointing | None:
        """What :meth:`gradient_checkpointing_enable` set (None while it is off)."""
        return self._checkpointing

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether :meth:`gradient_checkpointing_enable` is in effect."""
        return self._checkpointing is not None

    def run_graphs(
        self,
        runner: Callable[[torch.fx.GraphModule], Callable[..., Any]],
        args: tuple,
        kwargs: dict[str, Any],
    ) -> Any:
        """Forward, with each graph called through ``runner(graph_module)``.

        Binding, adapter selection and output structure stay here; the runner decides how
        a graph executes (eagerly, or compiled: see ``adaption_fx.export.compile``).
        ``kwargs`` may hold ``adapter_names`` (see :meth:`forward`).
        """
        captured = self._captured
        captured.check_placement()
        adapter_names = kwargs.pop("adapter_names", None)
        labels = kwargs.pop("labels", None) if captured.loss_function else None
        num_items = kwargs.pop("num_items_in_batch", None) if captured.loss_function else None
        if adapter_names is not None and labels is not None:
            raise ValueError(
                "adapter_names cannot be combined with labels: a mixed batch is for "
                "inference, training runs one adapter at a time (set_adapter(name), then "
                "train on that adapter's rows)"
            )
        if captured.in_spec is None:
            flat, causal_flat = captured.bind(args, kwargs), None
        else:
            pos, named = captured.bind_named(args, kwargs)
            causal_flat = captured.causal_inputs(pos, named)
            flat = causal_flat if causal_flat is not None else captured.flatten(pos, named)
        graph = self._active_graph()
        if adapter_names is not None:
            names = check_adapter_names(adapter_names, _batch_size(flat), list(self._configs))
            if graph is not None:
                mixed_gm, tables = self.mixed_inference_graph(names, causal=causal_flat is not None)
                with torch.no_grad():
                    outputs = runner(mixed_gm)(*flat, *tables)
                return captured.unflatten(outputs)
        if graph is None:
            base = self.base_graph_module if causal_flat is None else captured.causal.graph_module
            outputs = runner(base)(*flat)
        else:
            if causal_flat is not None:
                graph = self.adaption_graph(causal=True)
            tensors = self.adapter_weights[self._active].tensors(graph.adapter_inputs)
            outputs = runner(graph.graph_module)(*flat, *tensors)
        result = captured.unflatten(outputs)
        if labels is not None:
            result = with_causal_lm_loss(result, captured.loss_function, labels, num_items)
        return result

    def inference_graph(self) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
        """The graph forward runs now (masked capture), with the adapter folded, and the
        tensors to pass after the model's flat inputs.

        For inference loops (generation): the adapter keys, values and gate are computed
        once here, from the current adapter tensors, instead of in every call. The folded
        graph is built once per adapter structure. No gradients flow to the adapter.
        """
        graph = self._active_graph()
        if graph is None:
            return self.base_graph_module, []
        return self._store.folded(self._adapter_structure[self._active], self.adapter_tensors())

    # ----------------------------------------------------------------- mixed batches
    def mixed_graph(self, causal: bool = False) -> MixedGraph:
        """The graph a mixed batch (``adapter_names=[...]``) runs: every site some adapter
        adapts, each row's adapter picked from :meth:`adapter_table` (see
        ``passes/mixed_batch.py``). ``causal``: of the mask-free causal capture. Built on
        first use and again when the adapted sites change."""
        if not self._configs:
            raise ValueError("a mixed batch needs at least one adapter; there are none")
        adapted = [self.adapted_sites(name) for name in self._configs]
        paths = tuple(s.module_path for s in union_sites(self._sites, adapted))
        return self._store.mixed(paths, causal=causal)

    def adapter_table(self) -> AdapterTable:
        """Every adapter's folded keys, values and gates, stacked for :meth:`mixed_graph`
        (row 0 is the base model, then the adapters in order). Rebuilt when an adapter is
        added, removed or changed (its tensors written in place, e.g. by an optimizer)."""
        state = tuple(
            (
                name,
                self._adapter_structure[name],
                id(weights),
                *(p._version for p in weights.parameters()),
            )
            for name, weights in self.adapter_weights.items()
        )
        return self._store.table(state, self._build_table)

    def _build_table(self) -> AdapterTable:
        entries = {}
        for name, config in self._configs.items():
            projection, names = self._store.projection(self._adapter_structure[name])
            with torch.no_grad():
                values = projection(*self.adapter_tensors(name))
            # detach: an identity gate activation passes the gate parameter itself through.
            folded = {n: v.detach() for n, v in zip(names, values, strict=True)}
            entries[name] = TableEntry(config.adapter_len, folded)
        sites = self.mixed_graph().sites
        reference = next(iter(entries.values())).values
        sample = next(iter(reference.values()))
        return build_adapter_table(sites, entries, dtype=sample.dtype, device=sample.device)

    def mixed_inference_graph(
        self, adapter_names: list[str], causal: bool = False
    ) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
        """As :meth:`inference_graph`, for a batch whose rows use ``adapter_names`` (checked
        by the caller): the mixed graph (of the mask-free causal capture with ``causal``)
        and its table inputs; the base graph while adapters are disabled or none is left."""
        if self._active_graph() is None:
            return self.base_graph_module, []
        mixed = self.mixed_graph(causal)
        table = self.adapter_table()
        rows = table.rows(adapter_names)
        return mixed.graph_module, table.inputs(mixed.table_inputs, rows)

    def adaption_graph(
        self, adapter_name: str | None = None, *, causal: bool = False
    ) -> AdaptionGraph:
        """The rewritten graph an adapter runs (the active adapter's by default): of the
        masked capture, or with ``causal`` of the mask-free causal capture (what forward
        runs for unpadded input where the model has one; ValueError where it has none)."""
        name = self._resolve(adapter_name)
        return self._store.rewritten(self._adapter_structure[name], causal=causal)

    def adapter_tensors(self, adapter_name: str | None = None) -> list[torch.Tensor]:
        """An adapter's tensors in its graph's adapter-input order."""
        name = self._resolve(adapter_name)
        return self.adapter_weights[name].tensors(self.adaption_graph(name).adapter_inputs)

    # ----------------------------------------------------------------- generation
    @paused_gc()
    def decoder(self, max_length: int | None = None) -> DecodeStepTwin:
        """The decode-step twin of this model, in sync with its adapters.

        On first use the source model's decode step is captured (see
        :mod:`adaption_fx.capture.decode`) and the adaption pass applied to it; the twin is
        kept in this model's graph store. See :class:`DecodeStepTwin`.

        Args:
            max_length: the longest prompt + generated length to allow (default: the
                model's ``max_position_embeddings``, else 2048). A different value than the
                current twin's recaptures.
        """
        decoder = self._store.decode_twin
        if decoder is None or (max_length is not None and max_length != decoder.max_length):
            source = self.source_model
            if source is None:
                raise TypeError(
                    "generation needs the source nn.Module (a Hugging Face causal LM passed "
                    f"to rewrite()); this model was built from a {self._captured.source_name}"
                )
            if max_length is None:
                config = getattr(source, "config", None)
                max_length = getattr(config, "max_position_embeddings", None) or 2048
            self._captured.check_placement()
            decode = capture_decode(source, max_length, cache=self._captured.cache)
            sites = locate_attention(decode.captured.graph_module)
            if [s.module_path for s in sites] != [s.module_path for s in self._sites]:
                raise RuntimeError(
                    "the decode-step capture has attention at "
                    f"{[s.module_path for s in sites]}, the model at "
                    f"{[s.module_path for s in self._sites]}"
                )
            decoder = DecodeStepTwin(self, decode.captured, sites, decode.max_length, decode.layout)
            self._store.decode_twin = decoder
        decoder.follow_parent()
        return decoder

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: Any = None,
        *,
        adapter_names: list[str] | None = None,
        _runner: Callable[[torch.fx.GraphModule], Callable[..., Any]] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate tokens with the active adapter (or the base model while disabled), with
        Hugging Face's ``generate`` options.

        ``generation_config`` (a ``transformers.GenerationConfig``) and keyword arguments
        take Hugging Face's names, defaults and precedence (a keyword over
        ``generation_config`` over the source model's ``generation_config``):
        ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``,
        ``stop_strings`` (with ``tokenizer=``), ``logits_processor`` and
        ``stopping_criteria`` lists, ``streamer``, ``num_return_sequences``,
        ``return_dict_in_generate`` with ``output_scores`` / ``output_logits``, ``eos_token_id``,
        ``pad_token_id`` and the rest :mod:`adaption_fx.generation.args` lists; beam search
        and other strategies are refused by name. ``seed`` (ours) makes sampling
        reproducible without touching torch's global generator.

        Prompts in a batch are left-padded (``attention_mask`` 0 on the left). Returns the
        prompts followed by the new tokens, (batch, prompt_len + steps), or Hugging Face's
        ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``. A row that
        ended (eos, a stop string, a stopping criterion) is filled with ``pad_token_id``
        where the call has eos ids; generation stops when every row has ended.
        ``eos_token_id=None`` turns eos stopping off. Runs under ``torch.no_grad()``.

        ``adapter_names`` (one per row: a registered adapter or ``"__base__"``) generates
        each row with its own adapter, as :meth:`forward` does; every row's tokens are the
        ones it generates alone with its adapter active.
        """
        return self._generation(
            input_ids, attention_mask, generation_config, adapter_names, _runner, kwargs
        )

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: Any = None,
        *,
        tokenizer: Any = None,
        adapter_names: list[str] | None = None,
        _runner: Callable[[torch.fx.GraphModule], Callable[..., Any]] | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """:meth:`generate` as an iterator, produced as it is consumed (no thread).

        Without ``tokenizer``, each item is one step's new tokens (batch,); with it (batch
        1), the decoded text as it becomes printable (transformers' ``TextStreamer`` rules,
        special tokens skipped). Breaking out of the loop ends the generation.
        """
        return self._generation(
            input_ids,
            attention_mask,
            generation_config,
            adapter_names,
            _runner,
            {**kwargs, "tokenizer": tokenizer},
            streaming=True,
        )

    def _generation(
        self,
        input_ids: Any,
        attention_mask: Any,
        generation_config: Any,
        adapter_names: list[str] | None,
        runner: Callable[[torch.fx.GraphModule], Callable[..., Any]] | None,
        options: dict[str, Any],
        *,
        streaming: bool = False,
    ) -> Any:
        names = None
        if adapter_names is not None and isinstance(input_ids, torch.Tensor) and input_ids.dim():
            names = check_adapter_names(adapter_names, input_ids.shape[0], list(self._configs))
        # Any other input_ids: generation refuses them (check_prompt) before any step.
        args = resolve_generation(
            getattr(self.source_model, "generation_config", None),
            self.default_token_ids,
            generation_config,
            **options,
        )
        decoder = self.decoder()
        return run_generation(
            lambda rows: TorchSession(decoder, runner, adapter_names=rows),
            input_ids,
            attention_mask,
            args,
            adapter_names=names,
            max_length=decoder.max_length,
            streaming=streaming,
        )

    @property
    def default_token_ids(self) -> tuple[EosTokenIds, int | None]:
        """The ``(eos_token_id, pad_token_id)`` that :meth:`generate` uses when a call
        leaves them out: the source model's (see
        ``adaption_fx.generation.loop.generation_defaults``),
        read on every call so that changes to its ``generation_config`` apply; (None, None)
        without a source model."""
        return generation_defaults(self.source_model)

    @property
    def captured(self) -> CapturedModel:
        """The capture: flat base graph, input binding and output structure."""
        return self._captured

    # ----------------------------------------------------------------- state
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter's tensors keyed ``<attention module path>.adaption_prompt|gate``."""
        name = self._resolve(adapter_name)
        return {k: v.detach() for k, v in self.adapter_weights[name].named_parameters()}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The active adapter's tensors (the base weights belong to the source model) and
        its config.

        Tensor keys are PEFT's without ``base_model.model.``, e.g.
        ``model.layers.3.self_attn.adaption_prompt``; the config is the ``_extra_state``
        entry (:meth:`get_extra_state`), so that a file of this dict alone, such as the
        ``model.safetensors`` a plain ``transformers.Trainer`` saves, loads with
        ``rewrite(model, dir)``. :meth:`adapter_state_dict` gives the tensors alone.
        """
        if args or kwargs.get("destination") is not None:
            raise TypeError("AdaptedModel.state_dict() takes no destination/prefix arguments")
        if self._active is None:
            return {}
        return {
            **self.adapter_state_dict(self._active),
            ckpt.EXTRA_STATE_KEY: self.get_extra_state(),
        }

    def get_extra_state(self) -> torch.Tensor:
        """The active adapter's adapter_config.json content as a uint8 tensor of UTF-8
        JSON: nn.Module's hook for state that is not a parameter, kept as a tensor so that
        safetensors files (the Trainer's) can hold it."""
        return ckpt.config_tensor(self._peft_config_dict(self._resolve(None)))

    def set_extra_state(self, state: Any) -> None:
        """Check a state dict's config entry (:meth:`get_extra_state`) against the active
        adapter. It never changes the adapter: one of another config (say a ``tanh`` gate
        where the active one has none, with the same tensor shapes) is refused with a
        ``CheckpointError`` naming both, instead of loading tensors that would compute
        something else."""
        name = self._resolve(None)
        where = "the state dict"
        try:
            data = ckpt.config_from_tensor(state, where)
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(
                f"{exc}; state_dict() holds the adapter's config as {ckpt.EXTRA_STATE_KEY}: "
                "build tensors to load from adapter_state_dict(), which leaves it out"
            ) from None
        try:
            config = AdaptionConfig.from_peft_dict(data, where=where)
        except (TypeError, ValueError) as exc:
            raise ckpt.CheckpointError(str(exc)) from exc
        if config != self._configs[name]:
            raise ckpt.CheckpointError(
                f"the state dict holds an adapter with {config}, but the active adapter "
                f"{name!r} has {self._configs[name]}"
            )

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ) -> IncompatibleKeys:
        """Load tensors into the active adapter. All keys and shapes, and the config entry
        where there is one (:meth:`set_extra_state`; a dict without it loads too), are
        checked before any tensor is written, so a failed load leaves the adapter as it
        was."""
        if assign:
            raise ValueError("assign=True is not supported: adapter tensors are copied in")
        name = self._resolve(None)
        state_dict, entry = ckpt.split_config_entry(state_dict)
        if entry is not None:
            self.set_extra_state(entry)
        params = dict(self.adapter_weights[name].named_parameters())
        missing = sorted(set(params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(params))
        if strict and (missing or unexpected):
            raise ValueError(
                f"adapter {name!r}: missing keys {missing}, unexpected keys {unexpected}"
            )
        for key in set(params) & set(state_dict):
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(params[key].shape):
                raise ValueError(
                    f"{key}: shape {tuple(value.shape)} does not fit the adapter's "
                    f"{tuple(params[key].shape)}"
                )
        with torch.no_grad():
            for key in set(params) & set(state_dict):
                params[key].copy_(state_dict[key])
        return IncompatibleKeys(missing, unexpected)

    # ----------------------------------------------------------------- checkpoints
    def save_adapter(self, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Save adapters in PEFT's layout, loadable by ``PeftModel.from_pretrained``.

        ``adapter_name=None`` saves every adapter. As in PEFT, "default" goes at the root of
        ``directory`` and any other adapter into a subfolder named after it. The directory
        is written in a temporary sibling and renamed into place: an interrupted save
        leaves the previous contents, and an existing checkpoint is replaced as a whole.
        """
        names = list(self._configs) if adapter_name is None else [self._resolve(adapter_name)]
        if not names:
            raise ValueError("there are no adapters to save")
        with ckpt.atomic_directory(directory) as tmp:
            for name in names:
                folder = tmp if name == ckpt.DEFAULT_ADAPTER else tmp / name
                folder.mkdir(exist_ok=True)
                config = self._configs[name]
                peft_fields = self._peft_config_dict(name)
                ckpt.write_adapter_config(folder, peft_fields, config.extras_dict())
                ckpt.write_tensors(folder, ckpt.to_peft_keys(self.adapter_state_dict(name)))
        logger.info("saved adapters %s to %s", names, directory)

    def load_adapter(
        self,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        *,
        allow_non_finite: bool = False,
    ) -> None:
        """Load an adapter saved by :meth:`save_adapter`, by PEFT's ``save_pretrained``, or
        by a plain ``transformers.Trainer`` (its ``model.safetensors``: the state dict,
        config included, see :meth:`state_dict`).

        Adds it as ``adapter_name``, or replaces an adapter of that name (an active one
        stays active). For a name other than "default", ``directory/<adapter_name>`` is used
        when it holds a checkpoint (PEFT's layout), else ``directory`` itself. The method,
        sizes, keys, shapes and values are all checked before the model is touched. Tensors
        are cast to the adapter dtype (that of the key projection weight). Non-finite
        values are refused unless ``allow_non_finite=True``.
        """
        check_adapter_name(adapter_name)
        folder = ckpt.adapter_directory(directory, adapter_name)
        config = AdaptionConfig.from_pretrained(folder)
        # The config's sizes are checked against the model and the file's header before
        # anything is allocated: a config asking for adapter_len=10**9 costs nothing.
        config_file = ckpt.config_file(folder)
        if config.adapter_layers > len(self.sites):
            raise ckpt.CheckpointError(
                f"{config_file}: the checkpoint does not fit: field 'adapter_layers' is "
                f"{config.adapter_layers}, but the model has only {len(self.sites)} attention "
                "layers"
            )
        expected = adapter_tensor_shapes(
            select_top_sites(self.sites, config.adapter_layers), config.structure
        )
        described = (
            f"adapter_len={config.adapter_len}, adapter_layers={config.adapter_layers}, "
            f"gate={config.gate!r} in {config_file.name}, the hidden size of the layer's "
            "projections"
        )
        state, where = ckpt.read_adapter_state(folder, expected, described)
        for key, value in state.items():
            if not allow_non_finite and not bool(torch.isfinite(value).all()):
                raise ckpt.CheckpointError(
                    f"{where}: {key} holds NaN or infinite values; refusing to load them "
                    "(pass allow_non_finite=True to load anyway)"
                )
        try:
            prepared = self._prepare(config)
        except ValueError as exc:
            raise ckpt.CheckpointError(f"{folder}: the checkpoint does not fit: {exc}") from exc
        params = dict(prepared[-1].named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
        self._commit(adapter_name, *prepared)
        logger.info("loaded adapter %r from %s", adapter_name, folder)

    def _peft_config_dict(self, name: str) -> dict[str, Any]:
        # adapter_config.json's content for adapter ``name``.
        return self._configs[name].to_peft_dict(
            target_modules=self._target_modules(name),
            task_type=self._captured.task_type,
            base_model_name_or_path=self._captured.name_or_path,
        )

    def _target_modules(self, adapter_name: str) -> str | None:
        # PEFT's target_modules names the attention modules by their last path component.
        names = {s.module_path.rsplit(".", 1)[-1] for s in self.adapted_sites(adapter_name)}
        return names.pop() if len(names) == 1 else None

    def extra_repr(self) -> str:
        active = self._active if self._enabled else f"{self._active} (disabled)"
        return f"sites={len(self._sites)}, adapters={list(self._configs)}, active={active}"


class DecodeStepTwin(AdaptedModel):
    """The decode-step capture of an :class:`AdaptedModel`, running its parent's adapters.

    Built by :meth:`AdaptedModel.decoder`. It shares the parent's base weights and adapter
    tensors (the same objects) and, before every run, follows the parent's adapters,
    active adapter and enable/disable state (:meth:`follow_parent`); which tensors train is
    the parent's to decide. Its inputs are ``input_ids``, ``attention_mask``,
    ``position_ids`` and ``past_<i>_key`` / ``past_<i>_value``; its output a dict of
    ``logits`` (last token) and ``present_<i>_key`` / ``present_<i>_value``.

    Attributes:
        parent: the model whose adapters it runs.
        max_length: the longest prompt + generated length the capture allows.
        cache_layout: the key/value cache's inputs and outputs
            (:class:`adaption_fx.capture.decode.CacheLayout`).
    """

    def __init__(
        self,
        parent: AdaptedModel,
        captured: CapturedModel,
        sites: list[AttentionSite],
        max_length: int,
        cache_layout: CacheLayout,
    ):
        super().__init__(captured, sites)
        # A plain attribute: the parent is not a submodule of its twin.
        object.__setattr__(self, "parent", parent)
        self.max_length = max_length
        self.cache_layout = cache_layout

    def follow_parent(self) -> None:
        """Take the parent's adapters (the same tensor objects), active adapter and
        enable/disable state."""
        parent = self.parent
        for name in list(self._configs):
            if (
                name not in parent._configs
                or self._configs[name] != parent._configs[name]
                or self.adapter_weights[name] is not parent.adapter_weights[name]
            ):
                self.delete_adapter(name)
        for name, config in parent._configs.items():
            if name not in self._configs:
                self._attach(name, config, parent.adapter_weights[name])
        self._active = parent._active
        self._enabled = parent._enabled

    def _attach(self, name: str, config: AdaptionConfig, weights: AdapterWeights) -> None:
        """Add an adapter whose tensors are the parent's."""
        _, key, graphs = self._store.build(config)
        needed = set(graphs.masked.adapter_inputs)
        keys = set(dict(weights.named_parameters()))
        if needed != keys:
            raise RuntimeError(
                f"adapter {name!r}: the decode-step graph needs tensors "
                f"{sorted(needed)[:4]}..., the adapter has {sorted(keys)[:4]}..."
            )
        self._commit(name, config, key, graphs, weights)

    def _mark_trainable(self) -> None:
        return  # the tensors are the parent's: the parent decides which train

    def run_graphs(self, *arguments: Any) -> Any:
        """:meth:`AdaptedModel.run_graphs` with the parent's current adapter state."""
        self.follow_parent()
        return super().run_graphs(*arguments)
