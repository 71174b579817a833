"""Data-parallel fine-tuning under torchrun (adaption_fx.training.distributed): 2 gloo processes.

Every job is ``python -m torch.distributed.run --nproc_per_node 2 <this file> ...``: run as
a script, this file is the worker (see the bottom). In ``cli`` mode a worker runs
``adaption_fx.app.cli.main`` (what ``-m adaption_fx`` runs) and then saves the adapter it holds
under its rank's name, in a folder of the test's, so that every rank's adapter can be
compared, not only the one rank 0 writes. In ``internals`` mode it drives ``Finetune``
directly to look inside: which tensors DDP ignores and reduces (through a communication
hook that records each bucket's parameters), the reduced gradient (an optimizer pre-step
hook) against the one-process gradient of the whole batch, that the adapter starts from
rank 0's values while the frozen weights are left alone, and that a signal to one rank
stops both.

The two-process run also recomputes activations (``--gradient-checkpointing``, which its
resumed run takes over from run.json): the one-process run keeps them.

Oracles: the one-process run of the same command on the same global batches (the adapter
within 1e-5 relative, the losses, tokens and metric records), the one-process gradient
computed by the worker from rank 0's adapter (within 1e-5: AdamW is nearly blind to the
scale of a gradient, so the adapter alone would not catch a wrong loss normalisation), the
uninterrupted two-process run for a resumed one (bit for bit), and the model's own
parameter names.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_rel_close,
    one_thread,  # noqa: F401 (autouse: this module runs on one thread)
    tiny_llama,
)
from safetensors.torch import load_file, save_file
from tokenizers_for_tests import make_tokenizer

from adaption_fx.app.cli import main

PROCESSES = 2
THIS = Path(__file__).resolve()
TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)  # the test tokenizer's
WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = {WEIGHTS, "adapter_config.json", "adaption_fx.json"}

# Seven examples at --batch-size 3: each epoch's micro-batches hold 3, 3 and 1 examples, so
# the two ranks get 2 + 1 examples, and 1 + none (rank 1 then runs an unlabelled stand-in).
SEVEN = [
    ("Say hi", "hi"),
    ("Say hello", "hello there again"),
    ("Add two numbers", "3"),
    ("what is the sum", "the sum is 7 and the answer is yes"),
    ("Say bye", "bye and thanks"),
    ("Say yes", "yes"),
    ("Say no", "no no"),
]
VAL = [("Say ok", "ok"), ("Say hi", "hi")]
STEPS = 4
# Two micro-batches a step (gradients reduced once, at the second), a checkpoint and a
# validation every 2 steps.
OPTIONS = (
    f"--max-steps {STEPS} --batch-size 3 --grad-accum 2 --adapter-len 2 --lr 0.05 "
    "--eval-every 2 --save-every 2 --quiet"
).split()
EXPECTED_RECORDS = [
    ("train", 1),
    ("train", 2),
    ("eval", 2),
    ("train", 3),
    ("train", 4),
    ("eval", 4),
]


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Files:
    model: Path  # a one-layer Llama and the test tokenizer (a Hugging Face model directory)
    train: Path
    val: Path


@dataclass
class Job:
    out: Path  # the run's output directory
    ranks: list[dict[str, torch.Tensor]]  # each rank's adapter at the end of its run
    checkpointing: list[bool]  # each rank's model.is_gradient_checkpointing
    output: str  # the job's stdout and stderr, every process's


def write_alpaca(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"instruction": i, "output": o}) + "\n" for i, o in pairs))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = make_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=1, **TOKEN_IDS)
    model.save_pretrained(root / "model")
    make_tokenizer(root / "model")
    return Files(
        root / "model",
        write_alpaca(root / "train.jsonl", SEVEN),
        write_alpaca(root / "val.jsonl", VAL),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str | Path) -> subprocess.CompletedProcess:
    """This file as the worker of a 2-process torchrun job on CPU (gloo), one thread each."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(PROCESSES),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(THIS),
        *map(str, args),
    ]
    # No GPU: the test is about gloo (two NCCL processes would need two GPUs).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def finetune_job(dump: Path, *argv: str | Path) -> Job:
    """``finetune`` with ``argv`` in a 2-process job; every rank's final adapter."""
    done = torchrun("cli", dump, "finetune", *argv)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    out = Path(argv[list(argv).index("--out") + 1])
    ranks = [load_file(dump / f"rank{r}.safetensors") for r in range(PROCESSES)]
    checkpointing = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(PROCESSES)]
    return Job(out, ranks, checkpointing, output)


@pytest.fixture(scope="module")
def one_process(files, tmp_path_factory) -> Path:
    """The reference: the same command in this process (no torchrun)."""
    out = tmp_path_factory.mktemp("one") / "out"
    argv = ["finetune", "--model", files.model, "--data", files.train, "--val-data", files.val]
    assert main([str(a) for a in [*argv, "--out", out, *OPTIONS]]) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(files, tmp_path_factory) -> Job:
    root = tmp_path_factory.mktemp("two")
    return finetune_job(
        root / "ranks",
        "--model",
        files.model,
        "--data",
        files.train,
        "--val-data",
        files.val,
        "--out",
        root / "out",
        *OPTIONS,
        "--gradient-checkpointing",
    )


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def timeless(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("tokens_per_s", "elapsed_s")}


# ----------------------------------------------------------------------------- tests
def test_two_processes_train_the_one_process_adapter(one_process, two_processes):
    reference = load_file(one_process / WEIGHTS)
    written = load_file(two_processes.out / WEIGHTS)
    assert written.keys() == reference.keys()
    for key, expected in reference.items():
        assert expected.abs().max() > 0, key
        assert_rel_close(written[key], expected, rtol=1e-5)
    assert two_processes.checkpointing == [True] * PROCESSES
    # Every rank holds the adapter rank 0 wrote, bit for bit.
    for rank, adapter in enumerate(two_processes.ranks):
        assert adapter.keys() == {k.removeprefix("base_model.model.") for k in written}, rank
        for key, value in adapter.items():
            assert torch.equal(value, written[f"base_model.model.{key}"]), (rank, key)
    # The same steps over the same global batches: the same tokens, the losses of the
    # whole batch (summed over the ranks), the same learning rates.
    ones, twos = records(one_process), records(two_processes.out)
    assert [(r["kind"], r["step"]) for r in twos] == EXPECTED_RECORDS
    for one, two in zip(ones, twos, strict=True):
        assert one.keys() == two.keys()
        for name in ("tokens", "lr", "val_tokens"):
            assert one.get(name) == two.get(name), (name, one, two)
        for name in ("loss", "val_loss"):
            if name in one:
                assert two[name] == pytest.approx(one[name], rel=1e-6), (name, one, two)


def test_only_rank_zero_writes_and_prints(one_process, two_processes):
    out = two_processes.out
    assert {p.name for p in out.iterdir()} == {p.name for p in one_process.iterdir()}
    assert {p.name for p in out.iterdir()} == {
        "run.json",
        "metrics.jsonl",
        "loss.png",
        *ADAPTER_FILES,
        "checkpoint-2",
        "checkpoint-4",
    }
    # One record per step and evaluation: no rank wrote a second line.
    assert [(r["kind"], r["step"]) for r in records(out)] == EXPECTED_RECORDS
    final = load_file(out / WEIGHTS)
    last = load_file(out / "checkpoint-4" / WEIGHTS)
    assert all(torch.equal(final[k], last[k]) for k in final)
    lines = two_processes.output.splitlines()
    for start in ("train: 7 examples", "model: ", "done: 4 steps", "adapter (PEFT format): "):
        assert sum(x.startswith(start) for x in lines) == 1, (start, two_processes.output)
    (training,) = [x for x in lines if x.startswith("training: ")]
    assert training.startswith("training: 4 steps of 3 x 2 examples over 2 processes, lr 0.05")


def test_resume_under_two_processes_ends_at_the_uninterrupted_adapter(two_processes, tmp_path):
    # The run as it stood at its step-2 checkpoint (metrics of later steps are dropped by
    # --resume itself).
    out = tmp_path / "out"
    shutil.copytree(two_processes.out, out)
    shutil.rmtree(out / "checkpoint-4")
    for name in (*ADAPTER_FILES, "loss.png"):
        (out / name).unlink()
    resumed = finetune_job(tmp_path / "ranks", "--out", out, "--resume", "--quiet")
    assert "done: 4 steps" in resumed.output
    assert resumed.checkpointing == [True] * PROCESSES  # from run.json
    uninterrupted = load_file(two_processes.out / WEIGHTS)
    final = load_file(out / WEIGHTS)
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)
    # Every rank loaded the checkpoint (adapter and optimizer state): a rank that had not
    # would step from fresh Adam moments and end elsewhere.
    for rank, adapter in enumerate(resumed.ranks):
        for key, value in adapter.items():
            assert torch.equal(value, two_processes.ranks[0][key]), (rank, key)
    assert list(map(timeless, records(out))) == list(map(timeless, records(two_processes.out)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.fixture(scope="module")
def internals(files, tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("internals")
    done = torchrun("internals", root, files.model, files.train)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(PROCESSES)]


def test_only_the_active_adapter_is_registered_and_reduced(internals):
    for rank in internals:
        active = set(rank["active"])
        assert active == {
            "adapter_weights.default.model.layers.0.self_attn.adaption_prompt",
            "adapter_weights.default.model.layers.0.self_attn.adaption_gate",
        }
        # DDP ignores every other tensor: the frozen base (weights and buffers) and the
        # inactive adapter, which also requires grad.
        assert set(rank["ignored"]) == set(rank["parameters"]) - active | set(rank["buffers"])
        assert any(n.startswith("adapter_weights.other.") for n in rank["ignored"])
        assert any(n.startswith("base_graph_module.") for n in rank["ignored"])
        # Two optimizer steps of two micro-batches ran, each reducing one bucket (at its
        # second micro-batch): the active adapter's gradients and nothing else.
        assert len(rank["reduced"]) == 2
        for bucket in rank["reduced"]:
            assert set(bucket["parameters"]) == active
            assert bucket["values"] == rank["active_values"]


def test_the_reduced_gradient_is_the_one_process_gradient(internals):
    # Each rank's summed loss over the step's tokens of all ranks, times the world size,
    # averaged by DDP: the one-process gradient of the whole batch.
    zero, one = internals
    assert len(zero["gradients"]) == 2
    assert zero["gradients"] == one["gradients"]  # bit for bit on every rank
    for got, expected in zip(zero["gradients"][0], zero["reference"], strict=True):
        assert max(map(abs, expected)) > 0
        assert_rel_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5)


def test_the_adapter_starts_from_rank_zero_and_the_base_is_not_broadcast(internals):
    zero, one = internals
    # Each rank drew its prompts from its own seed; DDP's construction gave both rank 0's.
    assert zero["adapter_before"] != one["adapter_before"]
    assert zero["adapter_after"] == one["adapter_after"] == zero["adapter_before"]
    # Rank 1 shifted a frozen weight before the wrap: DDP did not broadcast it over.
    assert one["base_before"] != zero["base_before"]
    assert (zero["base_after"], one["base_after"]) == (zero["base_before"], one["base_before"])


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(internals):
    # Rank 1 alone got SIGTERM during step 2: both ranks stopped after it, rank 0 wrote
    # the checkpoint, and neither waited for the other forever.
    for rank in internals:
        assert rank["result"] == {"interrupted": True, "steps": 2, "checkpoint": "checkpoint-2"}
    assert internals[0]["out"] == {"checkpoints": ["checkpoint-2"], "train_steps": [1, 2]}


# ----------------------------------------------------------------------------- the worker
def worker_cli(dump: Path, argv: list[str]) -> int:
    """``adaption_fx.app.cli.main(argv)``; then save this rank's adapter into ``dump``."""
    from adaption_fx.training.loop import Finetune

    real_run = Finetune.run

    def run(self, resume: bool = False):
        result = real_run(self, resume)
        dump.mkdir(parents=True, exist_ok=True)
        name = f"rank{self.parallel.rank}"
        save_file(self.model.adapter_state_dict(), dump / f"{name}.safetensors")
        (dump / f"{name}.json").write_text(json.dumps(self.model.is_gradient_checkpointing))
        return result

    Finetune.run = run
    return main(argv)


def checksum(tensors) -> float:
    return sum(float(t.detach().double().sum()) for t in tensors)


def one_process_gradient(run, micro_batches: list[list[int]]) -> list[list[float]]:
    """The gradient of a step's loss as one process computes it, every micro-batch here."""
    from adaption_fx.training.data import collate
    from adaption_fx.training.loop import active_parameters, batch_loss_sum, example_loss_tokens

    examples = [[run.train_data[i] for i in mb] for mb in micro_batches]
    tokens = sum(example_loss_tokens(e) for mb in examples for e in mb)
    loss = sum(batch_loss_sum(run.model, collate(mb, 0))[0] for mb in examples)
    grads = torch.autograd.grad(loss / tokens, active_parameters(run.model))
    return [g.flatten().tolist() for g in grads]


def worker_internals(root: Path, model_dir: Path, train: Path) -> int:
    """Finetune under DDP, recording what DDP ignores, reduces and yields; rank 1 gets a
    SIGTERM during step 2."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaption_fx import AdaptionConfig, rewrite
    from adaption_fx.training.data import encode_dataset, read_records
    from adaption_fx.training.distributed import DataParallel, process_group_from_environment
    from adaption_fx.training.loop import (
        Finetune,
        TrainingArguments,
        active_parameters,
        read_metrics,
    )

    with process_group_from_environment() as parallel:
        model = rewrite(AutoModelForCausalLM.from_pretrained(model_dir), None)
        config = AdaptionConfig(adapter_len=2, adapter_layers=1)
        # The active adapter from a seed of each rank's own; an inactive one besides.
        model.add_adapter("default", config, torch.Generator().manual_seed(10 + parallel.rank))
        model.add_adapter("other", config, torch.Generator().manual_seed(0))
        active = active_parameters(model)
        with torch.no_grad():  # an open gate: the prompts get gradients from step 1 on
            model.adapter_weights["default"].get_parameter(
                "model.layers.0.self_attn.adaption_gate"
            ).fill_(0.5)
        names = {id(p): n for n, p in model.named_parameters()}
        base = model.base_graph_module.get_parameter("lm_head.weight")
        original = base.detach().clone()
        with torch.no_grad():
            base.add_(parallel.rank)
        report = {
            "parameters": sorted(names.values()),
            "buffers": sorted(n for n, _ in model.named_buffers()),
            "active": sorted(names[id(p)] for p in active),
            "active_values": sum(p.numel() for p in active),
            "adapter_before": checksum(active),
            "base_before": checksum([base]),
            "reduced": [],
            "gradients": [],
        }

        def record_bucket(state, bucket):
            parameters = [names[id(p)] for p in bucket.parameters()]
            report["reduced"].append({"parameters": parameters, "values": bucket.buffer().numel()})
            return allreduce_hook(state, bucket)

        real_wrap = DataParallel.wrap

        def wrap(self, module, trainable):
            ddp = real_wrap(self, module, trainable)
            report["ignored"] = sorted(ddp.parameters_to_ignore)
            report["adapter_after"] = checksum(trainable)
            report["base_after"] = checksum([base])
            with torch.no_grad():
                base.copy_(original)
            ddp.register_comm_hook(None, record_bucket)
            return ddp

        real_step = Finetune._train_step

        def step(self, micro_batches):
            result = real_step(self, micro_batches)
            if self.step + 1 == 2 and parallel.rank == 1:  # self.step: the finished steps
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        DataParallel.wrap, Finetune._train_step = wrap, step
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        data = encode_dataset(read_records(train), tokenizer, 512)
        out = root / "out"
        if parallel.is_main:
            out.mkdir()
        # Two micro-batches a step: the first accumulates locally (no_sync), the second
        # reduces.
        args = TrainingArguments(max_steps=STEPS, batch_size=3, grad_accum=2, lr=0.05)
        run = Finetune(model, data, None, out, args, pad_token_id=0, progress=False)
        if parallel.is_main:  # from rank 0's adapter, the one DDP gives every rank
            report["reference"] = one_process_gradient(run, run.plan[0])

        def record_gradients(optimizer, *_):
            grads = [p.grad.flatten().tolist() for p in optimizer.param_groups[0]["params"]]
            report["gradients"].append(grads)

        run.optimizer.register_step_pre_hook(record_gradients)
        result = run.run()
        report["result"] = {
            "interrupted": result.interrupted,
            "steps": result.steps,
            "checkpoint": result.checkpoint.name,
        }
        if parallel.is_main:
            report["out"] = {
                "checkpoints": sorted(p.name for p in out.glob("checkpoint-*")),
                "train_steps": [r["step"] for r in read_metrics(out) if r["kind"] == "train"],
            }
        (root / f"rank{parallel.rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, folder, *rest = sys.argv[1:]
    if mode == "cli":
        sys.exit(worker_cli(Path(folder), rest))
    sys.exit(worker_internals(Path(folder), *map(Path, rest)))
