"""shard_frozen_base: FSDP2 over the outlined decoder layers, 2 gloo processes on CPU.

Each spawned rank writes what it measured to a JSON file and the test asserts on the files
(an assertion inside a spawned process would only show as a dead process).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_llama

from adaption_fx import AdaptionConfig, rewrite

WORLD = 2
STEPS = 3
TOL = 1e-5


def _adapted(checkpointing: bool = False):
    model = rewrite(
        tiny_llama(),
        AdaptionConfig(adapter_len=4, adapter_layers=2),
        generator=torch.Generator().manual_seed(2),
        cache=False,
    )
    with torch.no_grad():  # non-zero gates, so that the prompts get gradients too
        for name, p in model.adapter_weights.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.7)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _batch() -> torch.Tensor:
    return torch.randint(0, 96, (WORLD, 12), generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _train(model_fn, params, batch):
    """Loss and gradients of the first step, then the tensors after STEPS AdamW steps."""
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.02)
    first = None
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model_fn(batch)
        loss.backward()
        if first is None:
            first = loss.detach(), [p.grad.detach().clone() for p in params]
        opt.step()
    return first


@pytest.fixture(scope="module")
def reference():
    """The unsharded one-process run on the whole batch."""
    model = _adapted()
    ids = _batch()
    params = list(model.adapter_weights[model.active_adapter].parameters())
    loss, grads = _train(lambda b: model(input_ids=b, labels=b).loss, params, ids)
    keys = [k for k, _ in model.adapter_weights[model.active_adapter].named_parameters()]
    return {
        "loss": loss,
        "grads": dict(zip(keys, grads, strict=True)),
        "final": {k: p.detach().clone() for k, p in zip(keys, params, strict=True)},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, checkpointing: bool) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _measure(rank, out_dir, checkpointing)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _measure(rank: int, out_dir: str, checkpointing: bool) -> None:
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.tensor import DTensor

    from adaption_fx.training.sharded import shard_frozen_base

    model = _adapted(checkpointing)
    base_numel = sum(p.numel() for p in model.base_graph_module.parameters())
    sharded = shard_frozen_base(model)
    base = {id(p): p for p in sharded.graph.parameters()}.values()
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in base)

    # Which groups all-gather in the backward; what autograd saves while each layer runs.
    gathered_in_backward: list[str] = []
    original = FSDPParamGroup.unshard

    def unshard(group, *a, **k):  # records the calls that do issue an all-gather
        pending = group._all_gather_result is not None
        result = original(group, *a, **k)
        issued = not pending and group._all_gather_result is not None
        if issued and torch._C._current_graph_task_id() != -1:
            gathered_in_backward.append((group._module_fqn or "<root>").removeprefix("graph."))
        return result

    saved = {path: 0 for path in sharded.layer_paths}
    running: list[str] = []
    for path in sharded.layer_paths:
        layer = sharded.layer(path)
        layer.register_forward_pre_hook(lambda m, a, path=path: running.append(path))
        layer.register_forward_hook(lambda m, a, o: running.pop() and None)

    def pack(t):
        if running:
            saved[running[-1]] += t.numel()
        return t

    row = _batch()[rank : rank + 1]
    params = list(sharded.adapter_weights.parameters())

    def step(batch):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return sharded(batch, labels=batch).loss

    FSDPParamGroup.unshard = unshard
    try:
        loss, grads = _train(step, params, row)
    finally:
        FSDPParamGroup.unshard = original
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    keys = [k for k, _ in sharded.adapter_weights.named_parameters()]
    full_grads = {
        k: g.full_tensor() if isinstance(g, DTensor) else g
        for k, g in zip(keys, grads, strict=True)
    }
    final = sharded.full_adapter_state_dict()
    sharded.save_adapter(os.path.join(out_dir, "adapter"))
    torch.save({"loss": loss, "grads": full_grads, "final": final}, f"{out_dir}/t{rank}.pt")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "base_numel": base_numel,
                "local_numel": local,
                "frozen": all(not p.requires_grad for p in base),
                "frozen_layers": sharded.frozen_layers,
                "gathered_in_backward": gathered_in_backward,
                "saved": saved,
                "adapter_is_dtensor": all(isinstance(p, DTensor) for p in params),
            },
            f,
        )


def _run(tmp_path, checkpointing: bool):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), checkpointing), nprocs=WORLD, join=True)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    tensors = [torch.load(tmp_path / f"t{r}.pt") for r in range(WORLD)]
    return info, tensors


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_sharded_training_is_exact(tmp_path, reference, checkpointing):
    info, tensors = _run(tmp_path, checkpointing)
    errors = {}
    for rank, t in enumerate(tensors):
        errors[f"loss{rank}"] = _rel(t["loss"], reference["loss"])
        for k, g in reference["grads"].items():
            errors[f"grad{rank} {k}"] = _rel(t["grads"][k], g)
        for k, v in reference["final"].items():
            errors[f"final{rank} {k}"] = _rel(t["final"][k], v)
    worst = max(errors.values())
    print(f"checkpointing={checkpointing}: worst relative error {worst:.2e}")
    assert worst < TOL, errors

    for r in info:
        # (b) each rank holds half of the base, frozen
        assert r["local_numel"] * WORLD == r["base_numel"], r
        assert r["frozen"] and r["adapter_is_dtensor"]
        # (c) layers below the lowest adapted one (layers 2, 3 adapted) are never gathered
        # in the backward and save nothing for it
        assert r["frozen_layers"] == ["model.layers.0", "model.layers.1"]
        assert not set(r["gathered_in_backward"]) & set(r["frozen_layers"]), r
        assert {"model.layers.2", "model.layers.3"} <= set(r["gathered_in_backward"])
        assert all(r["saved"][p] == 0 for p in r["frozen_layers"]), r["saved"]
        if not checkpointing:  # (under checkpointing, checkpoint's own hooks pack)
            assert r["saved"]["model.layers.3"] > 0
    print("local/base numel:", info[0]["local_numel"], info[0]["base_numel"])

    # the saved adapter is the trained one, loadable by the library
    model = _adapted()
    model.load_adapter(tmp_path / "adapter")
    for k, v in model.adapter_state_dict().items():
        assert _rel(v, reference["final"][k]) < TOL


def test_preconditions_refused_without_process_group():
    from adaption_fx.training.sharded import shard_frozen_base

    assert not dist.is_initialized()
    model = _adapted()
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    source = model.captured.causal
    with pytest.raises(RuntimeError, match="initialised process group"):
        shard_frozen_base(model)
    assert model.captured.causal is source and model.captured.reference_weight is not None
    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()  # the model still trains unsharded
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(TypeError, match="AdaptedModel"):
        shard_frozen_base(torch.nn.Linear(2, 2))
