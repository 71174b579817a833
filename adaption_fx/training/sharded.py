"""Training the active adapter with the frozen base sharded by FSDP2 (``fully_shard``).

A captured graph reads every base weight with ``get_attr`` and never calls the model's
modules, so ``fully_shard`` on them would never gather anything. :func:`shard_frozen_base`
outlines each decoder layer of the training graph into a sub-GraphModule that reads its
own weights and is called as a module (``passes/outline_layers.py``), then shards:

- each decoder layer is one FSDP unit: gathered for its forward, resharded after, and, for
  the adapted layers, gathered again in the backward. Layers below the lowest adapted one
  need no gradient (they save nothing for the backward) and are never gathered in the
  backward (``set_unshard_in_backward(False)``);
- the root unit holds the rest of the base (embedding, final norm, lm_head) and the active
  adapter's prompts and gates, whose gradients FSDP averages over the ranks.

Each rank keeps 1/N of the base. The batch is data parallel: each rank runs its own rows.

After :func:`shard_frozen_base` the :class:`~adaption_fx.AdaptedModel` is consumed for
training: its base weights are the sharded ones (the returned module is what trains and
what runs), and the holders of the full tensors it had (the source model reference, the
mask-free causal capture, the capture's reference weight, the decode-step twin and folded
inference graphs) are dropped. Its adapter tensors are left as they were: the returned
module trains a copy and :meth:`ShardedAdaptedModel.save_adapter` copies the trained
values back before saving with :meth:`AdaptedModel.save_adapter`.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.fx

from adaption_fx.model.adapted import AdaptedModel
from adaption_fx.model.eager import adapted_site_paths, training_graph
from adaption_fx.model.hf_api import with_causal_lm_loss
from adaption_fx.passes.activation_checkpoint import (
    CheckpointRegions,
    Region,
    decoder_layer_regions,
)
from adaption_fx.passes.infra import run_passes
from adaption_fx.passes.outline_layers import OutlineLayers

# The process-group backend that serves a device type.
_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def _is_dtensor(value: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _check_preconditions(model: AdaptedModel, mesh: Any) -> torch.device:
    """Every check, before anything is changed. Returns the base weights' device."""
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"model must be an AdaptedModel, got {type(model).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "shard_frozen_base needs an initialised process group: launch with torchrun (or "
            "torch.multiprocessing.spawn) and call torch.distributed.init_process_group first"
        )
    if model.active_adapter is None:
        raise ValueError("the model has no active adapter to train; add one first")
    if not model.adapters_enabled:
        raise ValueError("adapters are disabled; enable_adapter_layers() before sharding")
    if model.captured.in_spec is None or model.captured.loss_function is None:
        raise ValueError(
            "shard_frozen_base supports Hugging Face causal LMs captured by rewrite() "
            f"(inputs and loss); got a capture of {model.captured.source_name}"
        )
    base = list(model.base_graph_module.parameters())
    if any(_is_dtensor(p) for p in base):
        raise ValueError("the model's base is already sharded (it holds DTensor weights)")
    devices = {p.device for p in base}
    if len(devices) != 1:
        raise ValueError(f"the base weights are on several devices {sorted(map(str, devices))}")
    device = devices.pop()
    if mesh is not None:
        if mesh.device_type != device.type:
            raise ValueError(
                f"the mesh is for {mesh.device_type!r} but the base weights are on {device}"
            )
    else:
        backend = str(dist.get_backend())
        wanted = _BACKENDS.get(device.type)
        if wanted is None or wanted not in backend:
            raise RuntimeError(
                f"the base weights are on {device} but the process group's backend is "
                f"{backend!r}; move the model to this rank's device (or pass a DeviceMesh) "
                "before rewrite()"
            )
    return device


class ShardedAdaptedModel(torch.nn.Module):
    """The outlined training graph of one adapter, with the base sharded over the ranks.

    Built by :func:`shard_frozen_base`. ``forward(input_ids, attention_mask=None,
    labels=None, num_items_in_batch=None)`` returns what ``AdaptedModel.forward`` returns
    (``CausalLMOutputWithPast`` with ``loss`` when ``labels`` are given). Its trainable
    parameters are the adapter's prompts and gates (DTensors after sharding): build the
    optimizer from ``adapter_weights.parameters()`` (the base parameters are frozen
    DTensors, ``requires_grad=False``).

    Attributes:
        graph: the outlined graph (its layers at ``graph.model.layers``).
        adapter_weights: the adapter's tensors (a copy of the model's, trained here).
        adapter_name: which adapter of the model this trains.
        layer_paths: module paths of the decoder layers, in graph order.
        frozen_layers: those below the lowest adapted layer (not gathered in backward).
    """

    def __init__(
        self,
        model: AdaptedModel,
        graph: torch.fx.GraphModule,
        adapter_inputs: tuple[str, ...],
        layer_paths: list[str],
        frozen_layers: list[str],
    ):
        super().__init__()
        name = model.active_adapter
        self.graph = graph
        self.adapter_weights = copy.deepcopy(model.adapter_weights[name])
        self.adapter_name = name
        self.layer_paths = list(layer_paths)
        self.frozen_layers = list(frozen_layers)
        self._adapter_inputs = tuple(adapter_inputs)
        # Plain attributes: neither is a submodule (FSDP must not take their tensors).
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_captured", model.captured)

    def layer(self, path: str) -> torch.nn.Module:
        """The outlined (sharded) decoder layer at ``path``."""
        return self.graph.get_submodule(path)

    def forward(
        self,
        *args: Any,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> Any:
        captured = self._captured
        flat = captured.flatten(*captured.bind_named(args, kwargs))
        params = dict(self.adapter_weights.named_parameters())  # read now: FSDP swaps them
        result = captured.unflatten(self.graph(*flat, *[params[k] for k in self._adapter_inputs]))
        if labels is not None:
            result = with_causal_lm_loss(result, captured.loss_function, labels, num_items_in_batch)
        return result

    def full_adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's full tensors (gathered from the ranks). Every rank must call it."""
        state = {}
        for key, param in self.adapter_weights.named_parameters():
            value = param.detach()
            state[key] = value.full_tensor() if _is_dtensor(value) else value.clone()
        return state

    def save_adapter(self, directory: str | os.PathLike) -> None:
        """Save the trained adapter in PEFT's layout (``AdaptedModel.save_adapter``).

        Every rank must call it (the adapter is gathered from all of them); every rank's
        AdaptedModel gets the trained values, and rank 0 writes ``directory``.
        """
        state = self.full_adapter_state_dict()
        model = self._model
        with torch.no_grad():
            for key, param in model.adapter_weights[self.adapter_name].named_parameters():
                param.copy_(state[key])
        if dist.get_rank() == 0:
            model.save_adapter(directory, self.adapter_name)
        dist.barrier()


def shard_frozen_base(
    model: AdaptedModel, mesh: Any = None, *, reshard_after_forward: bool = True
) -> ShardedAdaptedModel:
    """Shard ``model``'s frozen base over the process group's ranks (FSDP2, one unit per
    decoder layer) for training its active adapter; returns the module to train.

    Call it on every rank, after ``torch.distributed.init_process_group`` and with the
    model on this rank's device (CPU for gloo, this rank's GPU for NCCL). Training runs the
    masked capture's graph (the training twin, with gradient checkpointing of the adapted
    layers when ``model.is_gradient_checkpointing``).

    The model is consumed for training (see the module docstring): use the returned module
    to train, run and save. Every precondition is checked, and every graph built, before
    anything is changed: a call that raises there leaves the model as it was.

    Args:
        model: the AdaptedModel from :func:`adaption_fx.rewrite`.
        mesh: a 1-D ``DeviceMesh``; default: every rank of the default process group.
        reshard_after_forward: passed to ``fully_shard`` for the decoder layers.
    """
    device = _check_preconditions(model, mesh)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    graph = model.adaption_graph()
    twin = training_graph(graph.graph_module)
    site_paths = [s.module_path for s in model.sites]
    regions = decoder_layer_regions(twin.graph, site_paths)
    adapted = {
        r.module_path
        for r in decoder_layer_regions(twin.graph, site_paths, only=adapted_site_paths(twin))
    }
    outlined = run_passes(twin, [OutlineLayers(regions)]).graph_module
    layer_paths = [r.module_path for r in regions]
    first = min(i for i, path in enumerate(layer_paths) if path in adapted)
    frozen = layer_paths[:first]
    if model.is_gradient_checkpointing:
        # Each adapted layer's call (and its getitems) runs under torch.utils.checkpoint;
        # the layer module is called through __call__ there, in the forward and again in
        # the backward's recompute, so its FSDP hooks fire both times.
        calls = [
            n
            for n in outlined.graph.nodes
            if n.op == "call_module" and n.meta.get("outlined_layer") in adapted
        ]
        checkpointed = [Region(str(n.target), (n.name, *(u.name for u in n.users))) for n in calls]
        options = dict(model.checkpointing_plan.options)
        outlined = run_passes(outlined, [CheckpointRegions(checkpointed, options)]).graph_module
    sharded = ShardedAdaptedModel(model, outlined, graph.adapter_inputs, layer_paths, frozen)
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    # From here on the model is changed: release every other holder of full base tensors.
    model.release_base_holders()
    for i, path in enumerate(layer_paths):
        layer = sharded.layer(path)
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        if i < first:  # no gradient flows there: never gather it in the backward
            layer.set_unshard_in_backward(False)
    fully_shard(sharded, mesh=mesh)
    return sharded


__all__ = ["ShardedAdaptedModel", "shard_frozen_base"]
