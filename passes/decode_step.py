"""The decode step's pass pipeline: one list of passes per kind of step.

Generation runs the folded decode step op by op, once per token (see
``adaption_fx.generation.loop.StepProgram``). These passes give it the attention
transformers runs eagerly and drop what costs a dispatcher call for nothing; each kind of
step gets its own list, run by :func:`adaption_fx.passes.infra.run_passes`:

- ``"decode"``: one new token, no padding: attention without a mask;
- ``"prefill"``: no past, no padding: attention with ``is_causal`` and no mask;
- ``"decode_masked"``: one new token, padded rows: query heads packed per key/value head,
  the mask converted to float once per step;
- ``"masked"``: anything else: the graph's own masked attention, mask converted once.

Precondition: the graph is the folded decode step, functional but for fresh in-place ops
(``is_functional(graph, allow_fresh_inplace=True)``), run without autograd. A kind whose
masks are not plain causal-and-padding masks raises ``PassNotApplicable`` (from
``DropAttentionMasks``) and its caller falls back to the masked kind.
"""

from __future__ import annotations

from adaption_fx.passes.cleanup import (
    DropNoopNodes,
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    FunctionalizeFreshInplace,
)
from adaption_fx.passes.fast_attention import (
    DropAttentionMasks,
    FloatAttentionMasks,
    NativeGqa,
    PackSingleQuery,
    SerialAdapterAttention,
)
from adaption_fx.passes.infra import PassBase
from adaption_fx.passes.rotary import RollRotateHalf

STEP_KINDS = ("decode", "prefill", "decode_masked", "masked")


def decode_step_passes(kind: str, attention_mask: str = "attention_mask") -> list[PassBase]:
    """The passes for one kind of decode step, in order.

    Args:
        kind: one of ``STEP_KINDS``.
        attention_mask: the name of the graph's attention-mask placeholder.
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")
    passes: list[PassBase] = [FunctionalizeFreshInplace(), DropNoopNodes(), NativeGqa()]
    if kind in ("decode", "prefill"):
        passes.append(
            DropAttentionMasks(is_causal=kind == "prefill", attention_mask=attention_mask)
        )
    if kind == "decode_masked":
        passes.append(PackSingleQuery())  # reads the boolean mask: before the conversion
    if kind in ("decode_masked", "masked"):
        passes.append(FloatAttentionMasks())
    passes += [
        SerialAdapterAttention(),
        EliminateCommonSubexpressions(),  # one sin for all layers: before the roll
        RollRotateHalf(),
        EliminateDeadCode(),
    ]
    return passes


__all__ = ["STEP_KINDS", "decode_step_passes"]
