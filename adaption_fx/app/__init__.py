"""The application on top of the library: the ``adaption-fx`` command line and its demo.

- :mod:`~adaption_fx.app.cli`: ``adaption-fx`` / ``python -m adaption_fx``;
- :mod:`~adaption_fx.app.demo`: the main job on the embedded default model;
- :mod:`~adaption_fx.app.demo_task`: the demo's instruction task;
- :mod:`~adaption_fx.app.pretrained`: loading the model and tokenizer the command line uses.
"""
