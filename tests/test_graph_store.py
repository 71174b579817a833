"""The graph store (``adaption_fx/model/graph_store.py``): one owner for every graph an
AdaptedModel runs, shared per adapter structure, dropped with its last adapter, the
decode-step twin held explicitly, and derived variants kept with their graph module."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapter, tiny_llama

from adaption_fx import AdaptionConfig, rewrite
from adaption_fx.capture.variants import graph_variant, variant_keys
from adaption_fx.model.adapted import DecodeStepTwin
from adaption_fx.model.graph_store import structure_key

CFG = AdaptionConfig(adapter_len=3, adapter_layers=2)


@pytest.fixture()
def model():
    return rewrite(tiny_llama(), CFG)


def test_adapters_of_one_structure_share_their_graphs(model):
    store = model.graph_store
    model.add_adapter("same", CFG)
    model.add_adapter("longer", AdaptionConfig(adapter_len=5, adapter_layers=2))
    assert model.adaption_graph("same") is model.adaption_graph("default")
    assert model.adaption_graph("longer") is not model.adaption_graph("default")
    key = structure_key(CFG, model.adapted_sites())
    assert store.structures() == [
        key,
        structure_key(model.adapters["longer"], model.adapted_sites("longer")),
    ]
    model.delete_adapter("longer")
    assert store.structures() == [key]  # the last adapter of a structure takes its graphs
    model.delete_adapter("same")
    assert store.structures() == [key]


def test_a_failed_add_leaves_the_store(model):
    before = model.graph_store.structures()
    with pytest.raises(ValueError):
        model.add_adapter("wide", AdaptionConfig(adapter_len=3, adapter_layers=99))
    assert model.graph_store.structures() == before
    assert list(model.adapters) == ["default"]


def test_the_decode_twin_is_the_stores_and_follows_its_parent(model):
    twin = model.decoder()
    assert isinstance(twin, DecodeStepTwin) and twin.parent is model
    assert model.graph_store.decode_twin is twin and model.decoder() is twin
    model.add_adapter("other", CFG)
    model.set_adapter("other")
    twin.follow_parent()
    assert twin.active_adapter == "other"
    assert twin.adapter_weights["other"] is model.adapter_weights["other"]
    assert twin.graph_store is not model.graph_store  # its own capture, its own graphs
    model.release_base_holders()
    assert model.graph_store.decode_twin is None
    with pytest.raises(TypeError, match="generation needs the source"):
        model.decoder()


def test_derived_variants_live_with_their_graph_module(model):
    randomize_adapter(model, seed=1)
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    graph_module = model.adaption_graph().graph_module
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # padded: the masked capture's graph runs
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert ("training", None) in variant_keys(graph_module)
    built = []
    first = graph_variant(graph_module, ("probe",), lambda: built.append(1) or object())
    assert graph_variant(graph_module, ("probe",), lambda: built.append(1)) is first
    assert built == [1]
