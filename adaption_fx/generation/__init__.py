"""Generation: the decode loop over a decode-step graph, and text in / text out.

- :mod:`~adaption_fx.generation.loop`: greedy and sampled decoding for PyTorch and ORT;
- :mod:`~adaption_fx.generation.text`: ``generate_text`` with a Hugging Face tokenizer.
"""
