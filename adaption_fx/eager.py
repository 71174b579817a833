"""Which graph an AdaptedModel runs eagerly: the adapter attention fused for inference,
written out where autograd records.

The insert pass writes each adapter attention as one ``scaled_dot_product_attention``
call, the fastest eager form for inference: the CPU flash kernel never stores the small
(batch, heads, seq, adapter_len) scores. Its backward, though, is the flash kernel's
backward over a key of adapter_len (10) positions, which costs more than its arithmetic:
in a torch.profiler run of one training step of the embedded SmolLM2-135M (batch 8 x 128,
all 30 layers adapted) the adapter attention's backward took 86 ms fused, where PEFT's
explicit matmuls and softmax took about 35 ms. Written out as matmul, softmax, matmul
(``passes/unfuse.py``) its backward is two small matmuls and a softmax backward. That is
about 1% of a 4.7 s step; in wall time the bench's fused and written-out rows differ by
less than this machine's round-to-round noise. So where autograd records the forward,
the written-out twin of the graph runs; the function is the same.
"""

from __future__ import annotations

import weakref

import torch
import torch.fx

from adaption_fx.passes.unfuse import unfuse_adapter_attention

# Each graph's written-out twin, built on first use and kept as long as the graph lives.
_WRITTEN_OUT: weakref.WeakKeyDictionary[torch.fx.GraphModule, torch.fx.GraphModule] = (
    weakref.WeakKeyDictionary()
)


def eager_graph(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph_module``, or its twin with the adapter attention written out when autograd
    is recording (``torch.is_grad_enabled()``). A graph without adapter attention (the base
    graph) is returned as it is."""
    if not torch.is_grad_enabled():
        return graph_module
    twin = _WRITTEN_OUT.get(graph_module)
    if twin is None:
        twin = unfuse_adapter_attention(graph_module)
        _WRITTEN_OUT[graph_module] = twin
    return twin


__all__ = ["eager_graph"]
