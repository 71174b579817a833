"""The server on the embedded model (SmolLM2-135M-Instruct), kept short: one export, three
concurrent chat requests (two adapters and the base model), each equal to offline
``OrtModel.generate`` of the served file with its adapter.

Skipped when the wheel is not installed (``./dev.sh test`` and CI install it).
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers import EMBEDDED_SKIP_REASON, embedded_model_installed  # noqa: E402
from serve_helpers import Running  # noqa: E402

from adaption_fx.app.pretrained import load_pretrained  # noqa: E402
from adaption_fx.config import AdaptionConfig  # noqa: E402
from adaption_fx.export import OrtModel  # noqa: E402
from adaption_fx.rewrite import rewrite  # noqa: E402
from adaption_fx.serving import ServeConfig  # noqa: E402

pytestmark = pytest.mark.skipif(not embedded_model_installed(), reason=EMBEDDED_SKIP_REASON)

QUESTION = "What is the capital of France?"


def test_embedded_model_served_over_two_adapters_and_the_base(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTION_FX_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_pretrained(None)
    model = rewrite(loaded.model, None)
    adapters = {}
    for seed, name in enumerate(("support", "legal")):
        model.add_adapter(name, AdaptionConfig(adapter_len=4, adapter_layers=4))
        model.set_adapter(name)
        generator = torch.Generator().manual_seed(seed)
        state = model.adapter_state_dict()
        model.load_state_dict(
            {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in state.items()}
        )
        adapters[name] = tmp_path / name
        model.save_adapter(adapters[name], name)
    config = ServeConfig(adapters={k: str(v) for k, v in adapters.items()}, max_model_len=128)
    running = Running(config)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
        names = [m.id for m in client.models.list().data]
        assert names == [running.state.model_name, "support", "legal"]

        def ask(name):
            return client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=16,
                temperature=0,
            )

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = dict(zip(names, pool.map(ask, names), strict=True))
        tokenizer = loaded.tokenizer
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        (served,) = (
            p for p in (tmp_path / "cache" / "serve").glob("*.onnx") if ".adapter." not in p.name
        )
        offline = OrtModel(served)
        for name, path in adapters.items():
            offline.set_adapter_weights(path, adapter_name=name)
        for name, reply in replies.items():
            adapter = "__base__" if name == running.state.model_name else name
            out = offline.generate(ids, adapter_names=[adapter], max_new_tokens=16)
            expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            assert reply.choices[0].message.content == expected, name
            assert reply.usage.prompt_tokens == ids.shape[1]
        assert "Paris" in replies[running.state.model_name].choices[0].message.content
    finally:
        running.stop()
