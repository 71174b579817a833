"""Capture: a model as one flat torch.export ATen graph, and what makes capturing fast and safe.

- :mod:`~adaption_fx.capture.export_model`: ``capture()``: torch.export, normalisation, binding
  call arguments;
- :mod:`~adaption_fx.capture.captured`: :class:`CapturedModel`, :class:`CaptureError`;
- :mod:`~adaption_fx.capture.repeated`: capture a decoder through one layer, grow the rest;
- :mod:`~adaption_fx.capture.decode`: the decode step (one token with a key/value cache);
- :mod:`~adaption_fx.capture.graph_cache`: the persistent on-disk cache of captures;
- :mod:`~adaption_fx.capture.hf_compat`: what differs between torch/transformers releases;
- :mod:`~adaption_fx.capture.gc_pause`: the garbage collector paused while graphs are built;
- :mod:`~adaption_fx.capture.variants`: what is derived from a graph module, kept with it.
"""
