"""bench/memory_arithmetic.py, the numbers of docs/design/memory.md's memory arithmetic: the
result file is what the script prints now, the parameter formula is the Hugging Face models'
count, and the per-token activation formulas are what one training step saves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx

from adaption_fx.passes.locate import plain_module_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def arith(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.memory_arithmetic

    return bench.memory_arithmetic


def _llama_config(shape: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
    )


def test_result_file_is_current(arith):
    assert arith.RESULT.read_text() == arith.markdown(), (
        "run: python -m bench.memory_arithmetic --write"
    )


def test_main_prints_and_writes(arith, tmp_path, capsys):
    assert arith.main([]) == 0
    assert capsys.readouterr().out == arith.markdown()
    target = tmp_path / "results" / "memory_arithmetic.md"
    arith.write(target)
    assert target.read_text() == arith.markdown()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary left


def test_parameter_formula_is_the_models_count(arith):
    from transformers import LlamaForCausalLM

    published = {"7B": "6.74e9", "13B": "13.02e9", "70B": "68.98e9"}  # Llama-2's sizes
    for shape in arith.MODELS:
        with torch.device("meta"):
            model = LlamaForCausalLM(_llama_config(shape))
        assert sum(p.numel() for p in model.parameters()) == arith.parameters(shape)
        assert f"{arith.parameters(shape) / 1e9:.2f}e9" == published[shape.name]


def test_status_thresholds(arith):
    assert arith.status(72.0, 80) == "yes"
    assert arith.status(72.1, 80) == "tight"
    assert arith.status(80.0, 80) == "tight"
    assert arith.status(80.1, 80) == "no"


class _StickyLayers(torch.fx.Interpreter):
    """Runs a graph node by node, naming the decoder layer of the node running. Nodes the
    adapter pass inserted carry no module stack: they belong to the layer of the node before
    them (the attention they extend)."""

    def __init__(self, gm: torch.fx.GraphModule, layers: list[str], outside: str) -> None:
        super().__init__(gm)
        self.layers = layers
        self.outside = outside
        self.current = outside

    def run_node(self, n: torch.fx.Node) -> Any:
        stack = n.meta.get("nn_module_stack") or {}
        if stack:
            paths = [plain_module_path(entry[0]) for entry in stack.values()]
            self.current = next((p for p in paths if p in self.layers), self.outside)
        return super().run_node(n)


def test_saved_bytes_per_token_match_the_formulas(arith):
    """One bf16 training step on unpadded input (the mask-free causal graph), every layer
    adapted: the bytes each layer saves for the backward, per token, against A_low (the
    lowest layer), A (each layer above) and R's saved part (outside the layers); with
    activation checkpointing, what the forward saves against 2h per adapted layer plus R's
    saved part (the recomputed layer's A comes during the backward)."""
    from transformers import LlamaForCausalLM

    from adaption_fx import AdaptionConfig, rewrite
    from adaption_fx.model.eager import eager_graph
    from adaption_fx.passes.activation_checkpoint import decoder_layer_regions
    from bench.memory import OUTSIDE, step_memory, torch_threads

    shape = arith.MEASURED
    batch, seq = 2, 128
    with torch_threads(2):
        torch.manual_seed(0)
        base = LlamaForCausalLM(_llama_config(shape)).to(torch.bfloat16).eval()
        model = rewrite(
            base, AdaptionConfig(adapter_len=arith.ADAPTER_LEN, adapter_layers=shape.layers)
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == arith.adapter_parameters(shape, shape.layers)
        g = torch.Generator().manual_seed(1)
        model.load_state_dict(
            {
                k: (torch.randn(v.shape, generator=g) * 0.1).to(v.dtype)
                for k, v in model.adapter_state_dict().items()
            }
        )
        ids = torch.randint(0, shape.vocab, (batch, seq), generator=g)
        feed = {"input_ids": ids, "labels": ids}

        sites = [s.module_path for s in model.sites]
        regions = decoder_layer_regions(model.base_graph_module.graph, sites)
        layers = [r.module_path for r in regions]
        trackers: list[_StickyLayers] = []

        def runner(gm: torch.fx.GraphModule) -> Any:
            trackers.append(_StickyLayers(eager_graph(gm), layers, OUTSIDE))
            return trackers[-1].run

        result = step_memory(
            model,
            feed,
            forward=lambda **kw: model.run_graphs(runner, (), kw),
            layer_of=lambda: trackers[-1].current,
        )
        model.gradient_checkpointing_enable()
        checkpointed = step_memory(model, feed).saved
    split = result.by_layer or {}
    assert sum(split.values()) == result.saved
    tokens = batch * seq
    measured = {name: split.get(name, 0) / tokens for name in [*layers, OUTSIDE]}
    expected = {
        layers[0]: arith.lowest_layer_bytes(shape),
        **{name: arith.layer_bytes(shape) for name in layers[1:]},
        OUTSIDE: arith.head_saved_bytes(shape),
    }
    assert len(layers) == shape.layers
    for name, formula in expected.items():
        # At least the formula (it counts what must be saved), at most the tolerance above.
        assert formula <= measured[name] <= formula * (1 + arith.MEASURED_TOLERANCE), (
            name,
            measured[name],
            formula,
        )
    formula = arith.checkpointed_saved_bytes(shape, shape.layers)
    per_token = checkpointed / tokens
    assert formula <= per_token <= formula * (1 + arith.MEASURED_TOLERANCE), (per_token, formula)
