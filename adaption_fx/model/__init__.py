"""The adapted model: :class:`~adaption_fx.model.adapted.AdaptedModel` and its parts.

- :mod:`~adaption_fx.model.adapted`: ``AdaptedModel`` (base graph plus named adapters) and
  its decode-step twin, ``DecodeStepTwin``;
- :mod:`~adaption_fx.model.graph_store`: ``GraphStore``, every graph a model runs;
- :mod:`~adaption_fx.model.eager`: which graph runs eagerly (inference, training, checkpointed);
- :mod:`~adaption_fx.model.mixed`: batches whose rows use different adapters;
- :mod:`~adaption_fx.model.hf_api`: what Hugging Face code reads from a ``PreTrainedModel``.
"""
