"""Hugging Face's ``Trainer`` for an :class:`~adaption_fx.AdaptedModel`, with its saves in
PEFT's format.

The plain ``transformers.Trainer`` already trains, evaluates, checkpoints and resumes an
AdaptedModel: only the active adapter's prompts and gates require grad, forward takes
``labels`` and ``num_items_in_batch`` and lists its inputs in its signature, and
``state_dict()`` is the active adapter's tensors and its config (the ``_extra_state``
entry), so its checkpoints and ``save_model`` (``model.safetensors``) hold the adapter, a
complete one that ``rewrite(base, dir)`` and ``load_adapter`` read, and never the base
weights. What it cannot do is write PEFT's format: ``Trainer._save`` calls
``save_pretrained`` only on ``PreTrainedModel`` and ``PeftModel`` instances (``isinstance``
checks, after unwrapping DDP/FSDP/compile) and offers no hook for other models.

:class:`AdapterTrainer` changes only that. ``save_model`` and the periodic checkpoints
write ``adapter_config.json`` + ``adapter_model.safetensors`` (what
``AdaptedModel.save_pretrained`` writes: the active adapter, loadable with
``rewrite(model, dir)`` and ``PeftModel.from_pretrained``), and resuming or loading the best
model reads them back into the active adapter, in place. The training loop, the
optimizer, scheduler and RNG state, and everything else are the Trainer's own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers

from adaption_fx import checkpoint as ckpt
from adaption_fx.config import AdaptionConfig
from adaption_fx.model.adapted import AdaptedModel

logger = logging.getLogger(__name__)

# transformers.trainer.TRAINING_ARGS_NAME in 4.57 and 5.x alike.
TRAINING_ARGS_NAME = "training_args.bin"


def load_active_adapter(model: AdaptedModel, directory: str | os.PathLike) -> None:
    """Copy the adapter saved in ``directory`` (PEFT's format, at its root) into the
    model's active adapter, in place: the parameter objects, and so an optimizer built on
    them, stay the same.

    The saved adapter must have the active adapter's config (adapter_len, layers, gate);
    keys and shapes are checked before anything is written (``CheckpointError`` /
    ``ValueError`` otherwise).
    """
    name = model.active_adapter
    if name is None:
        raise ValueError("the model has no active adapter to load a checkpoint into")
    folder = Path(directory)
    config = AdaptionConfig.from_pretrained(folder)
    if config != model.adapters[name]:
        raise ckpt.CheckpointError(
            f"{folder} holds an adapter with {config}, but the active adapter {name!r} has "
            f"{model.adapters[name]}; resume with the model the checkpoint was written from"
        )
    state, _ = ckpt.read_adapter_state(folder)
    model.load_state_dict(state)
    logger.info("loaded adapter %r from %s", name, folder)


class AdapterTrainer(transformers.Trainer):
    """``transformers.Trainer`` for an :class:`~adaption_fx.AdaptedModel` whose saves are the
    active adapter in PEFT's format.

    Only the save and load hooks differ from the Trainer's: ``save_model(dir)`` and every
    ``checkpoint-<step>/`` hold ``adapter_config.json`` + ``adapter_model.safetensors`` (plus
    the Trainer's own files: optimizer, scheduler, RNG and trainer state, training args, the
    tokenizer if given), never base weights; ``train(resume_from_checkpoint=...)`` and
    ``load_best_model_at_end`` copy the saved adapter back into the active adapter. A
    checkpoint of the plain Trainer (``model.safetensors``) is read as the Trainer reads it.

    Raises:
        TypeError: the model is not an AdaptedModel.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, AdaptedModel):
            raise TypeError(
                f"AdapterTrainer trains an adaption_fx.AdaptedModel, got {type(model).__name__}; "
                "use transformers.Trainer for other models"
            )

    def _adapted_model(self) -> AdaptedModel:
        return self.accelerator.unwrap_model(self.model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the active adapter (PEFT's format), the tokenizer and the training args."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        logger.info("saving the adapter to %s", output_dir)
        self._adapted_model().save_pretrained(output_dir, state_dict=state_dict)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not (Path(resume_from_checkpoint) / ckpt.CONFIG_NAME).is_file():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        target = self._adapted_model() if model is None else self.accelerator.unwrap_model(model)
        load_active_adapter(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not (Path(best) / ckpt.CONFIG_NAME).is_file():
            super()._load_best_model()
            return
        logger.info("loading the best adapter from %s (score %s)", best, self.state.best_metric)
        load_active_adapter(self._adapted_model(), best)
