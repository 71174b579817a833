"""What an ONNX export writes: the graph module to translate, its inputs and outputs,
their dynamic dimensions, and the file's metadata (single-adapter and mixed-batch files)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from adaption_fx.model.adapted import AdaptedModel
from adaption_fx.passes.fold import FOLDED_SUFFIXES, adapter_projection, fold_adapter_kv
from adaption_fx.passes.insert import (
    PROMPT_SUFFIX,
    AdapterStructure,
    AdaptionGraph,
    insert_adaption_prompt,
    prompt_key,
)
from adaption_fx.passes.locate import select_top_sites
from adaption_fx.passes.mixed_batch import (
    KEY_MASK_INPUT,
    ROWS_INPUT,
    MixedGraph,
    insert_mixed_adapters,
)

logger = logging.getLogger(__name__)


METADATA_KEY = "adaption_fx"
PROJECTION_SUFFIX = ".adapter.onnx"


class FlatCall(torch.nn.Module):
    """Calls a flat graph with tensor inputs positionally, filling captured constants.

    ``input_dims``: for the inputs after the model's own (the adapter inputs), each one's
    dynamic axes as ``{axis: name}``; the name ``"batch"`` is the model inputs' batch size,
    any other name a size of its own, shared by every axis of that name (see
    :func:`_symbolic_inputs`). None: those inputs have static sizes.
    """

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        layout: list[tuple[str, Any]],
        buffers: dict[str, torch.Tensor],
        input_dims: list[dict[int, str]] | None = None,
    ):
        super().__init__()
        self.graph_module = graph_module
        self.layout = layout
        self.input_dims = input_dims
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.buffer_names = list(buffers)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(inputs)
        flat = [next(it) if kind == "input" else value for kind, value in self.layout]
        rest = list(it)
        rest.extend(getattr(self, name) for name in self.buffer_names)
        return tuple(self.graph_module(*flat, *rest))


@dataclass
class ExportPlan:
    graph_module: torch.fx.GraphModule
    adapter_inputs: list[str]
    adapter_values: dict[str, torch.Tensor]
    baked: dict[str, torch.Tensor]
    folded: bool
    adapter: dict[str, Any] | None
    source: AdaptionGraph | None = None  # the adapter's rewritten graph, before folding
    source_tensors: list[torch.Tensor] | None = None  # its prompts and gates, in input order

    @property
    def raw_inputs(self) -> list[str]:
        return list(self.source.adapter_inputs) if self.source is not None else []


def export_plan(
    model: AdaptedModel, adapter_name: str | None, adapter_as_inputs: bool, fold: bool
) -> ExportPlan:
    disabled = adapter_name is None and (not model.adapters_enabled or not model.active_adapter)
    if disabled:
        if adapter_as_inputs:
            raise ValueError("adapter_as_inputs=True needs an adapter; adapters are disabled")
        return ExportPlan(model.base_graph_module, [], {}, {}, False, None)
    name = model.active_adapter if adapter_name is None else adapter_name
    graph = model.adaption_graph(name)
    tensors = [t.detach() for t in model.adapter_tensors(name)]
    adapter = {"name": name, **model.adapters[name].to_dict()}
    if fold:
        folded = fold_adapter_kv(graph, tensors, as_inputs=adapter_as_inputs)
        values = {k: folded.values[k] for k in folded.adapter_inputs}
        inputs = list(folded.adapter_inputs)
        return ExportPlan(folded.graph_module, inputs, values, {}, True, adapter, graph, tensors)
    named = dict(zip(graph.adapter_inputs, tensors, strict=True))
    if adapter_as_inputs:
        return ExportPlan(
            graph.graph_module, list(named), named, {}, False, adapter, graph, tensors
        )
    baked = {k.replace(".", "_"): v for k, v in named.items()}
    return ExportPlan(graph.graph_module, [], {}, baked, False, adapter, graph, tensors)


# ----------------------------------------------------------------------- mixed batches
# Names of the table inputs' dynamic axes (``torch.export.Dim`` names, and the ONNX inputs'
# axis names): the number of table rows (the base model's row and one per adapter) and the
# adapter keys per row (the longest prompt in the table).
BATCH_DIM = "batch"
ADAPTERS_DIM = "adapters"
ADAPTER_KEYS_DIM = "adapter_keys"


@dataclass
class MixedPlan:
    """What a ``mixed_batch=True`` export needs beyond the model inputs."""

    graph: MixedGraph
    examples: list[torch.Tensor]  # one per table input
    input_dims: list[dict[int, str]]  # per table input: axis -> dim name
    dtype: torch.dtype
    max_adapter_len: int
    adapter_layers: int
    projection: torch.fx.GraphModule  # prompts (max_adapter_len long) -> keys and values
    projection_inputs: list[str]
    projection_outputs: list[str]
    projection_examples: list[torch.Tensor]


def _table_dims(table_inputs: tuple[str, ...]) -> list[dict[int, str]]:
    """Each table input's dynamic axes: rows (batch,), key mask (adapters, keys), per site
    key/value (adapters, kv_heads, keys, dim) and activated gate (adapters, heads)."""
    dims = []
    for name in table_inputs:
        if name == ROWS_INPUT:
            dims.append({0: BATCH_DIM})
        elif name == KEY_MASK_INPUT:
            dims.append({0: ADAPTERS_DIM, 1: ADAPTER_KEYS_DIM})
        elif name.endswith(FOLDED_SUFFIXES[2]):
            dims.append({0: ADAPTERS_DIM})
        else:
            dims.append({0: ADAPTERS_DIM, 2: ADAPTER_KEYS_DIM})
    return dims


def _fresh_sizes(taken: set[int], count: int) -> list[int]:
    """``count`` distinct sizes >= 2 that no example input has: the export trace then ties
    no table size to another input's size, nor specialises it as 0 or 1."""
    sizes: list[int] = []
    size = 3
    while len(sizes) < count:
        if size not in taken:
            sizes.append(size)
        size += 1
    return sizes


def _prompt_projection(
    graph: AdaptionGraph,
) -> tuple[torch.fx.GraphModule, list[str], list[str]]:
    """The adapter projection of ``graph`` (``passes.fold.adapter_projection``) without its
    gates: prompts in, per-site folded keys and values out (the gate activation is applied
    by the reader, from the checkpoint's config). Returns the module, its input names (the
    prompts' state-dict keys) and its output names."""
    module, names = adapter_projection(graph)
    g = module.graph
    output = next(n for n in g.nodes if n.op == "output")
    keep = [
        (name, node)
        for name, node in zip(names, output.args[0], strict=True)
        if not name.endswith(FOLDED_SUFFIXES[2])
    ]
    output.args = (tuple(node for _, node in keep),)
    g.eliminate_dead_code()
    for node in list(g.nodes):
        if node.op == "placeholder" and not node.users:
            g.erase_node(node)
    inputs = [k for k in graph.adapter_inputs if k.endswith(PROMPT_SUFFIX)]
    if sum(n.op == "placeholder" for n in g.nodes) != len(inputs):
        raise RuntimeError("the adapter projection reads more than the prompts")
    g.lint()
    module.recompile()
    return module, inputs, [name for name, _ in keep]


def mixed_settings(
    model: AdaptedModel, max_adapter_len: int | None, adapter_layers: int | None
) -> tuple[int, int]:
    """The prompt length and the number of top layers a mixed file covers: the keywords'
    values, checked against the model's adapters, else its longest and widest adapter's."""
    for name, value in (
        ("mixed_max_adapter_len", max_adapter_len),
        ("mixed_adapter_layers", adapter_layers),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value}")
    configs = model.adapters
    if not configs and (max_adapter_len is None or adapter_layers is None):
        raise ValueError(
            "a mixed_batch export needs at least one adapter, or both mixed_max_adapter_len "
            "and mixed_adapter_layers to size the file for adapters loaded later"
        )
    longest = max(configs.items(), key=lambda kv: kv[1].adapter_len, default=None)
    widest = max(configs.items(), key=lambda kv: kv[1].adapter_layers, default=None)
    # The same check for the two sizes a mixed file is built for: prompt length, layers.
    if max_adapter_len is None:
        max_adapter_len = longest[1].adapter_len  # type: ignore[index]
    elif longest is not None and max_adapter_len < longest[1].adapter_len:
        raise ValueError(
            f"mixed_max_adapter_len={max_adapter_len} is shorter than adapter "
            f"{longest[0]!r} (adapter_len={longest[1].adapter_len}): the file could not load "
            "its checkpoint"
        )
    sites = len(model.sites)
    if adapter_layers is None:
        adapter_layers = widest[1].adapter_layers  # type: ignore[index]
    elif widest is not None and adapter_layers < widest[1].adapter_layers:
        raise ValueError(
            f"mixed_adapter_layers={adapter_layers} covers fewer layers than adapter "
            f"{widest[0]!r} adapts (adapter_layers={widest[1].adapter_layers})"
        )
    if adapter_layers > sites:
        raise ValueError(
            f"mixed_adapter_layers={adapter_layers} but the model has only {sites} attention sites"
        )
    return max_adapter_len, adapter_layers


def plan_mixed_export(
    model: AdaptedModel,
    max_adapter_len: int,
    adapter_layers: int,
    examples: list[torch.Tensor],
) -> MixedPlan:
    """The mixed-batch graph over the top ``adapter_layers`` sites (``model.mixed_graph()``
    where that is what the model's adapters adapt), example tables, and the projection of
    prompts ``max_adapter_len`` long over the same sites."""
    selected = select_top_sites(model.sites, adapter_layers)
    paths = [s.module_path for s in selected]
    mixed = model.mixed_graph() if model.adapters else None
    if mixed is None or [s.module_path for s in mixed.sites] != paths:
        mixed = insert_mixed_adapters(model.base_graph_module, selected)
    weight = model.base_graph_module.get_parameter(selected[0].key_projection.weight)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    device = weight.device
    batch = int(examples[0].shape[0]) if examples and examples[0].dim() else 2
    taken = {int(d) for e in examples for d in e.shape}
    adapters, keys = _fresh_sizes(taken | {batch}, 2)
    dims = _table_dims(mixed.table_inputs)
    by_path = {s.module_path: s for s in mixed.sites}
    tables: list[torch.Tensor] = []
    for name in mixed.table_inputs:
        if name == ROWS_INPUT:
            tables.append(torch.arange(batch, device=device) % adapters)
            continue
        if name == KEY_MASK_INPUT:
            tables.append(torch.zeros(adapters, keys, dtype=dtype, device=device))
            continue
        path, suffix = name.rsplit(".", 1) if "." in name else ("", name)
        site = by_path[path]
        shape = {
            FOLDED_SUFFIXES[0]: (adapters, site.num_kv_heads, keys, site.head_dim),
            FOLDED_SUFFIXES[1]: (adapters, site.num_kv_heads, keys, site.value_head_dim),
            FOLDED_SUFFIXES[2]: (adapters, site.num_heads),
        }[suffix]
        tables.append(torch.randn(shape, dtype=dtype, device=device))

    union = insert_adaption_prompt(
        model.base_graph_module,
        list(mixed.sites),
        AdapterStructure(adapter_len=max_adapter_len, gate="per_head"),
    )
    projection, proj_inputs, proj_outputs = _prompt_projection(union)
    hidden = {prompt_key(s): s.hidden_size for s in mixed.sites}
    proj_examples = [
        torch.randn(1, max_adapter_len, hidden[k]).to(device=device, dtype=dtype)
        for k in proj_inputs
    ]
    return MixedPlan(
        graph=mixed,
        examples=tables,
        input_dims=dims,
        dtype=dtype,
        max_adapter_len=max_adapter_len,
        adapter_layers=adapter_layers,
        projection=projection,
        projection_inputs=proj_inputs,
        projection_outputs=proj_outputs,
        projection_examples=proj_examples,
    )


def mixed_metadata(model: AdaptedModel, mixed: MixedPlan, projection_name: str) -> dict[str, Any]:
    """The metadata's ``mixed_batch`` entry: what ``OrtModel`` needs to build tables and
    project checkpoints without the PyTorch model."""
    return {
        "sites": [
            {
                "module_path": s.module_path,
                "num_heads": s.num_heads,
                "num_kv_heads": s.num_kv_heads,
                "head_dim": s.head_dim,
                "value_head_dim": s.value_head_dim,
                "hidden_size": s.hidden_size,
            }
            for s in mixed.graph.sites
        ],
        # Every attention site, in execution order: an adapter's adapter_layers=L adapts
        # the last L of them.
        "all_sites": [s.module_path for s in model.sites],
        "adapter_layers": mixed.adapter_layers,
        "max_adapter_len": mixed.max_adapter_len,
        "dtype": str(mixed.dtype).removeprefix("torch."),
        "table_inputs": list(mixed.graph.table_inputs),
        "rows_input": ROWS_INPUT,
        "key_mask_input": KEY_MASK_INPUT,
        "projection": projection_name,
        "projection_inputs": mixed.projection_inputs,
        "projection_outputs": mixed.projection_outputs,
        # The adapters the model held at export (for reference: OrtModel loads its own).
        "adapters": {name: config.to_dict() for name, config in model.adapters.items()},
    }


def _concrete(example: torch.Tensor) -> torch.Tensor:
    # Placeholder metadata holds fake tensors with symbolic sizes; export needs real ones.
    shape = [d if isinstance(d, int) else int(d.node.hint) for d in example.shape]
    if example.dtype.is_floating_point:
        return torch.randn(shape, dtype=example.dtype)
    return torch.ones(shape, dtype=example.dtype)


def example_model_inputs(model: AdaptedModel, example_inputs: dict[str, torch.Tensor] | None):
    captured = model.captured
    if captured.in_spec is None or captured.positional_count:
        raise ValueError(
            "to_onnx supports models captured with keyword inputs (Hugging Face causal LMs "
            "and keyword example_inputs)"
        )
    layout: list[tuple[str, Any]] = []
    names: list[str] = []
    examples: list[torch.Tensor] = []
    for name in captured.keyword_names:
        if name in captured.defaults:
            layout.append(("const", captured.defaults[name]))
            continue
        example = (example_inputs or {}).get(name)
        if example is None:
            fake = captured.examples.get(name)
            if fake is None:
                raise ValueError(f"no example for input {name!r}; pass example_inputs")
            example = _concrete(fake)
        layout.append(("input", None))
        names.append(name)
        examples.append(example)
    return layout, names, examples


def dynamic_input_shapes(
    names: list[str], examples: list[torch.Tensor], hf: bool, decode: bool = False
) -> list[Any]:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    specs: list[Any] = []
    if decode:
        # The mask spans past + new: its length is left for export to relate to the others.
        past = torch.export.Dim("past")
        for name in names:
            if name in ("input_ids", "position_ids"):
                specs.append({0: batch, 1: seq})
            elif name == "attention_mask":
                specs.append({0: batch, 1: torch.export.Dim.AUTO})
            else:
                specs.append({0: batch, 2: past})
        return specs
    for name, example in zip(names, examples, strict=True):
        if hf and name in ("input_ids", "attention_mask"):
            specs.append({0: batch, 1: seq})
        else:
            specs.append({d: torch.export.Dim.AUTO for d in range(min(example.dim(), 2))})
    return specs


def graph_output_names(model: AdaptedModel, count: int) -> list[str]:
    spec = model.captured.out_spec
    context = getattr(spec, "context", None)
    if (
        isinstance(context, (list, tuple))
        and len(context) == count
        and all(isinstance(c, str) for c in context)
    ):
        return list(context)
    return [f"output_{i}" for i in range(count)]
