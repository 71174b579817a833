"""Training the adapter: the loop, its data, and the ways to run it.

- :mod:`~adaption_fx.training.loop`: AdamW on prompts and gates, run directories, resume;
- :mod:`~adaption_fx.training.state`: a checkpoint's optimizer, scheduler and RNG state (safetensors
  + JSON), read back checked;
- :mod:`~adaption_fx.training.data`: instruction data: read, validate, render, tokenize, batch;
- :mod:`~adaption_fx.training.trainer`: Hugging Face ``Trainer`` saving PEFT's format;
- :mod:`~adaption_fx.training.distributed`: data-parallel runs under ``torchrun``;
- :mod:`~adaption_fx.training.sharded`: the frozen base sharded with FSDP2.
"""
