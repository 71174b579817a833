"""adaption-fx: LLaMA-Adapter (adaption prompts) as a torch.export graph pass.

>>> from adaption_fx import AdaptionConfig, rewrite
>>> model = rewrite(hf_model, AdaptionConfig(adapter_len=10, adapter_layers=2))  # doctest: +SKIP
"""

from adaption_fx.capture import CaptureError
from adaption_fx.config import AdaptionConfig
from adaption_fx.mixed_batch import BASE_ADAPTER
from adaption_fx.model import AdaptedModel
from adaption_fx.passes.errors import AttentionNotFoundError, UnsupportedGraphError
from adaption_fx.rewrite import rewrite
from adaption_fx.text import generate_text

__all__ = [
    "BASE_ADAPTER",
    "AdaptedModel",
    "AdapterTrainer",
    "AdaptionConfig",
    "AttentionNotFoundError",
    "CaptureError",
    "UnsupportedGraphError",
    "generate_text",
    "rewrite",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # AdapterTrainer imports transformers.Trainer (and accelerate): only when asked for.
    if name == "AdapterTrainer":
        from adaption_fx.trainer import AdapterTrainer

        return AdapterTrainer
    raise AttributeError(f"module 'adaption_fx' has no attribute {name!r}")
