"""What Hugging Face's ``Trainer`` (and other code written for ``PreTrainedModel``) reads
from a model, for :class:`adaption_fx.AdaptedModel`.

:class:`HuggingFaceModelAPI` is a mixin of AdaptedModel. Each attribute either has its
usual Hugging Face meaning or refuses with a ``TypeError`` that says why and what to do
instead. :func:`signed_forward` gives each model's ``forward`` the signature of its capture
(``inspect.signature(model.forward)`` lists the captured inputs plus ``labels`` and
``num_items_in_batch``), which is how the Trainer decides which data columns to keep.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adaption_fx import checkpoint as ckpt

if TYPE_CHECKING:
    from adaption_fx.capture.export_model import CapturedModel

logger = logging.getLogger(__name__)

# Keyword arguments of forward that are not graph inputs: the Trainer passes both.
LOSS_KEYWORDS = ("labels", "num_items_in_batch")


def forward_signature(captured: CapturedModel) -> inspect.Signature:
    """The signature a model's forward has for this capture.

    Positional inputs of the capture (their names are not recorded) become positional-only
    ``arg0``, ``arg1``, ...; keyword inputs keep their names, with the captured constants
    (``use_cache=False``) and, for Hugging Face causal LMs, ``attention_mask=None`` as
    defaults; ``labels`` and ``num_items_in_batch`` follow, keyword-only, where the capture
    has a loss function, then ``adapter_names`` (keyword-only). A graph captured without
    input structure takes ``*args``.
    """
    P = inspect.Parameter
    if captured.in_spec is None:
        params = [P("args", P.VAR_POSITIONAL)]
    else:
        params = [P(f"arg{i}", P.POSITIONAL_ONLY) for i in range(captured.positional_count)]
        kind = P.POSITIONAL_OR_KEYWORD
        seen_default = False
        for name in captured.keyword_names:
            default: Any = P.empty
            if name in captured.defaults:
                default = captured.defaults[name]
            elif captured.fill_attention_mask and name == "attention_mask":
                default = None
            if default is P.empty and seen_default:
                kind = P.KEYWORD_ONLY  # a required input after an optional one: by name only
            seen_default = seen_default or default is not P.empty
            params.append(P(name, kind, default=default))
    if captured.loss_function is not None:
        params.extend(P(name, P.KEYWORD_ONLY, default=None) for name in LOSS_KEYWORDS)
    # One adapter per batch row (see AdaptedModel.forward); every model takes it.
    params.append(P("adapter_names", P.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


class BoundForward:
    """``model.forward``: a bound method whose signature is the model's own
    (:func:`forward_signature`), not the class's ``(*args, labels=None, ...)``.

    It has ``__func__`` and ``__self__`` like a bound method, so code that rebinds
    ``model.forward.__func__`` (Accelerate's mixed precision) works.
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, function: Callable[..., Any], instance: Any):
        self.__func__ = function
        self.__self__ = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return forward_signature(self.__self__.captured)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self.__func__.__doc__

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoundForward)
            and other.__func__ is self.__func__
            and other.__self__ is self.__self__
        )

    def __hash__(self) -> int:
        return hash((self.__func__, id(self.__self__)))

    def __repr__(self) -> str:
        return f"<bound method {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


class signed_forward:
    """Decorator for ``forward``: on an instance it gives a :class:`BoundForward` (the
    instance's signature); on the class, the plain function (whose signature names
    ``labels``, which is where ``transformers.utils.find_labels`` looks)."""

    def __init__(self, function: Callable[..., Any]):
        self.function = function
        self.__doc__ = function.__doc__

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self.function
        return BoundForward(self.function, instance)


def with_loss(result: Any, loss: torch.Tensor) -> Any:
    """``result`` (a Hugging Face ``ModelOutput``) with ``loss`` set, as its first entry
    as in Hugging Face's own outputs (``out[0]``, ``out.to_tuple()``)."""
    fields = getattr(result, "__dataclass_fields__", None)
    if fields is not None and "loss" in fields:
        return type(result)(**{**result, "loss": loss})
    result.loss = loss
    return result


def with_causal_lm_loss(
    result: Any,
    loss_function: Callable[..., torch.Tensor],
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
) -> Any:
    """``result`` with the loss of ``labels`` on its logits, computed by the source model's
    own ``loss_function`` (shifted labels, ``num_items_in_batch`` as in Hugging Face
    models), set as in :func:`with_loss`."""
    logits = result.logits
    loss = loss_function(
        logits=logits,
        labels=labels,
        vocab_size=logits.shape[-1],
        num_items_in_batch=num_items_in_batch,
    )
    return with_loss(result, loss)


def _refuse(what: str, why: str) -> TypeError:
    return TypeError(f"AdaptedModel.{what} is not supported: {why}")


class HuggingFaceModelAPI:
    """The parts of ``PreTrainedModel``'s interface that Hugging Face's ``Trainer`` uses,
    for :class:`adaption_fx.AdaptedModel` (a mixin; the attributes read the model's
    capture and, where it was built from a Hugging Face model, that source model).
    """

    # The Trainer reads this after loading a checkpoint that lacks some keys.
    _keys_to_ignore_on_save: list[str] | None = None

    # Provided by AdaptedModel.
    captured: CapturedModel
    active_adapter: str | None
    base_graph_module: torch.fx.GraphModule
    source_model: torch.nn.Module | None
    parameters: Callable[..., Any]
    adapter_state_dict: Callable[..., dict[str, torch.Tensor]]
    save_adapter: Callable[..., None]

    def _source_model(self, what: str) -> torch.nn.Module:
        source = self.source_model
        if source is None:
            # AttributeError: hasattr() and getattr(model, what, default) see no attribute.
            raise AttributeError(
                f"AdaptedModel.{what}: this model was built from a "
                f"{self.captured.source_name}, not a Hugging Face model, and has none"
            )
        return source

    # ----------------------------------------------------------------- attributes
    @property
    def config(self) -> Any:
        """The source Hugging Face model's config (the same object, as ``PeftModel.config``
        is). The Trainer writes to it (``use_cache``; special token ids when it is given a
        tokenizer), as it does for any model it trains. The graph does not read it: its
        numbers were fixed at capture."""
        return self._source_model("config").config

    @property
    def generation_config(self) -> Any:
        """The source model's generation config (what :meth:`generate` takes its default
        eos and pad ids from)."""
        return getattr(self._source_model("generation_config"), "generation_config", None)

    @property
    def loss_type(self) -> str | None:
        """The source model's loss type (e.g. ``"ForCausalLM"``): transformers 5 reads it to
        count the tokens a causal LM's loss covers (``labels[..., 1:]``)."""
        return getattr(self._source_model("loss_type"), "loss_type", None)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether forward takes ``num_items_in_batch`` (the Trainer then passes it, and the
        loss of a step with gradient accumulation is normalised over all its tokens)."""
        return self.captured.loss_function is not None

    @property
    def main_input_name(self) -> str:
        """The input the Trainer counts tokens of: the source model's (``"input_ids"``),
        else the first keyword input of the capture."""
        name = getattr(self.source_model, "main_input_name", None)
        if name:
            return name
        names = self.captured.keyword_names
        return names[0] if names else "input_ids"

    # ----------------------------------------------------------------- counting
    def _embedding_weights(self) -> set[int]:
        """ids of the parameters the base graph looks rows up in (aten.embedding)."""
        gm = self.base_graph_module
        found = set()
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
                weight = node.args[0]
                if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                    found.add(id(gm.get_parameter(weight.target)))
        return found

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the model (the frozen base and every adapter), as
        ``PreTrainedModel.num_parameters`` counts them: only those with
        ``requires_grad`` (the active adapter's) if ``only_trainable``, without the
        embedding tables if ``exclude_embeddings``."""
        skip = self._embedding_weights() if exclude_embeddings else set()
        return sum(
            p.numel()
            for p in self.parameters()
            if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    def floating_point_ops(
        self, input_dict: Mapping[str, Any], exclude_embeddings: bool = True
    ) -> int:
        """``PreTrainedModel.floating_point_ops``: 6 x tokens x parameters, the usual
        forward + backward estimate (the Trainer's ``total_flos``)."""
        tokens = input_dict.get(self.main_input_name)
        if not isinstance(tokens, torch.Tensor):
            return 0
        return 6 * tokens.numel() * self.num_parameters(exclude_embeddings=exclude_embeddings)

    # ----------------------------------------------------------------- checkpointing
    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: Mapping[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable` (its Trainer
        calls this one for ``activation_checkpointing=True`` / ``gradient_checkpointing=True``).
        Every adapted decoder layer is checkpointed: ``every_n_layers`` other than 1 and
        ``offload=True`` are refused."""
        if every_n_layers != 1 or offload:
            raise ValueError(
                "AdaptedModel checkpoints every decoder layer and keeps activations on the "
                f"device: every_n_layers={every_n_layers!r} and offload={offload!r} are not "
                "supported; leave them out of activation_checkpointing_kwargs"
            )
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)  # type: ignore[attr-defined]

    def activation_checkpointing_disable(self) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_disable`."""
        self.gradient_checkpointing_disable()  # type: ignore[attr-defined]

    @property
    def is_activation_checkpointing(self) -> bool:
        """transformers 5's name for :attr:`is_gradient_checkpointing`."""
        return self.is_gradient_checkpointing  # type: ignore[attr-defined]

    # ----------------------------------------------------------------- refused
    def get_input_embeddings(self) -> torch.nn.Module:
        """Refused: the graph reads the embedding weight directly, so hooks on the
        embedding module (NEFTune, ``enable_input_require_grads``) would never run."""
        raise _refuse(
            "get_input_embeddings()",
            "the model runs a captured graph that reads the embedding weight directly, so "
            "the embedding module is never called and hooks on it (NEFTune's "
            "neftune_noise_alpha, enable_input_require_grads) would have no effect. Leave "
            "neftune_noise_alpha unset; for the embedding table itself use the source "
            "model's get_input_embeddings()",
        )

    def get_output_embeddings(self) -> torch.nn.Module:
        """Refused, as :meth:`get_input_embeddings`."""
        raise _refuse(
            "get_output_embeddings()",
            "the model runs a captured graph that does not call the output module; use the "
            "source model's get_output_embeddings()",
        )

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: the captured graph's shapes are fixed."""
        raise _refuse(
            "resize_token_embeddings()",
            "the captured graph's vocabulary size is fixed; resize the source model's "
            "embeddings first, then call rewrite() on it",
        )

    def enable_input_require_grads(self) -> None:
        """Refused: not needed. The adapter prompts are parameters inside the graph, so
        gradients reach them without the embedding output requiring grad."""
        raise _refuse(
            "enable_input_require_grads()",
            "it is not needed: the adapter prompts and gates are parameters inside the "
            "captured graph, so gradients reach them without an input hook (and the graph "
            "never calls the embedding module, where the hook would go)",
        )

    # ----------------------------------------------------------------- saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        is_main_process: bool = True,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write the active adapter in PEFT's format, ``adapter_config.json`` +
        ``adapter_model.safetensors``, at the root of ``save_directory`` (the files
        :meth:`save_adapter` writes for it), never the base weights.

        Other entries of ``save_directory`` are kept (each file is renamed into place, the
        weights first), so it works on a Trainer's output directory. The result loads with
        ``rewrite(model, save_directory)`` and ``PeftModel.from_pretrained`` (as the
        adapter "default", whatever the active adapter's name is here).

        Args:
            is_main_process: False writes nothing (the other processes of a distributed run).
            state_dict: tensors to write instead of the active adapter's own, with exactly
                its keys and shapes (``model.state_dict()``'s; its config entry, if any,
                must be the active adapter's).
            safe_serialization: must be True: adapters are written as safetensors only.
        """
        if kwargs:
            raise TypeError(
                f"AdaptedModel.save_pretrained() got unsupported arguments {sorted(kwargs)}; "
                "it writes the active adapter to a local directory and takes "
                "is_main_process, state_dict and safe_serialization=True"
            )
        if not safe_serialization:
            raise ValueError(
                "AdaptedModel.save_pretrained(safe_serialization=False) is not supported: "
                "adapters are written as adapter_model.safetensors only"
            )
        name = self.active_adapter
        if name is None:
            raise ValueError("there is no active adapter to save; add one with add_adapter()")
        if state_dict is not None:
            state_dict, entry = ckpt.split_config_entry(state_dict)
            if entry is not None:  # state_dict()'s config entry
                self.set_extra_state(entry)
            own = self.adapter_state_dict(name)
            if set(state_dict) != set(own) or any(
                tuple(state_dict[k].shape) != tuple(v.shape) for k, v in own.items()
            ):
                raise ValueError(
                    f"state_dict does not fit adapter {name!r}: it needs the keys "
                    f"{sorted(own)[:4]}... with the adapter's shapes, got "
                    f"{sorted(state_dict)[:4]}..."
                )
        if not is_main_process:
            return
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
        try:
            self.save_adapter(staging / "adapter", name)
            folder = staging / "adapter"
            if name != ckpt.DEFAULT_ADAPTER:
                folder = folder / name
            if state_dict is not None:
                ckpt.write_tensors(folder, ckpt.to_peft_keys(state_dict))
            for file in (ckpt.WEIGHTS_NAME, ckpt.CONFIG_NAME, ckpt.EXTRAS_NAME):
                os.replace(folder / file, out / file)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("saved adapter %r to %s", name, out)
