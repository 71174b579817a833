"""OrtModel: run an exported adaption-fx ONNX file with ONNX Runtime."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# At module level, unlike torch below: the adaption_fx package has loaded both already.
from adaption_fx.generate import MODEL_DEFAULT, EosTokenIds, ModelDefault

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _cuda_usable() -> bool:
    # onnxruntime-gpu lists the CUDA provider even where no CUDA runtime exists, and
    # creating a session with it then logs errors; ask torch whether a device is there.
    try:
        import torch
    except ImportError:  # serving without torch: only an explicit provider list picks CUDA
        return False
    return torch.cuda.is_available()


def select_providers(providers: list[Any] | None = None) -> list[Any]:
    """ONNX Runtime execution providers: the CUDA EP when usable, else the CPU EP.

    An explicit list is checked against the providers this onnxruntime build has.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        if "CUDAExecutionProvider" in available and _cuda_usable():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"providers {unknown} are not available; this onnxruntime has {available}")
    return list(providers)


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
    return value


class OrtModel:
    """An exported adaption-fx model in an ONNX Runtime session.

    Args:
        path: the ``.onnx`` file written by ``adaption_fx.export.to_onnx``.
        providers: execution providers; None picks the CUDA EP when a GPU is usable, else
            the CPU EP (no failed CUDA attempt, so no error messages on CPU machines).
        intra_op_num_threads: CPU threads per operator (default: all cores).
        session_options: an ``onnxruntime.SessionOptions`` to use instead of the defaults.

    Calls take the model inputs by name (numpy arrays or torch tensors) and return the
    first output (the logits) as a numpy array; :meth:`run` returns every output by name.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: list[Any] | None = None,
        *,
        intra_op_num_threads: int | None = None,
        session_options: Any = None,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file at {str(self.path)!r}")
        self.providers = select_providers(providers)
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session_options.intra_op_num_threads = intra_op_num_threads or (os.cpu_count() or 1)
            session_options.inter_op_num_threads = 1
            session_options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(
            str(self.path), sess_options=session_options, providers=self.providers
        )
        raw = self.session.get_modelmeta().custom_metadata_map.get("adaption_fx")
        self.metadata: dict[str, Any] = json.loads(raw) if raw else {}
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        adapter = self.metadata.get("adapter_inputs", [])
        self.adapter_input_names: list[str] = list(adapter)
        self.model_input_names = [n for n in self.inputs if n not in adapter]
        self._adapter_feed: dict[str, np.ndarray] | None = None
        self._projection = None

    # ----------------------------------------------------------------- running
    def __call__(self, **inputs: Any) -> np.ndarray:
        return self.run(**inputs)[self.output_names[0]]

    def run(self, **inputs: Any) -> dict[str, np.ndarray]:
        """Run the session; returns every output by name."""
        missing = [n for n in self.model_input_names if n not in inputs]
        unexpected = sorted(set(inputs) - set(self.model_input_names))
        if missing or unexpected:
            raise TypeError(
                f"{self.path.name} takes inputs {self.model_input_names}; missing {missing}, "
                f"unexpected {unexpected}"
            )
        feed = {n: self._check(n, _to_numpy(n, inputs[n])) for n in self.model_input_names}
        if self.adapter_input_names:
            if self._adapter_feed is None:
                raise RuntimeError(
                    f"{self.path.name} takes the adapter as inputs: call "
                    "set_adapter_weights(directory or AdaptedModel) first"
                )
            feed.update(self._adapter_feed)
        outputs = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, outputs, strict=True))

    def _check(self, name: str, value: np.ndarray) -> np.ndarray:
        spec = self.inputs[name]
        dtype = _ORT_TYPES.get(spec.type)
        if dtype is not None and value.dtype != dtype:
            raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {value.dtype}")
        if value.ndim != len(spec.shape):
            raise ValueError(
                f"{name} must be {len(spec.shape)}-d (shape {spec.shape}), got shape {value.shape}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise ValueError(
                    f"{name} must have size {want} on axis {axis} (shape {spec.shape}), "
                    f"got shape {value.shape}"
                )
        return np.ascontiguousarray(value)

    # ----------------------------------------------------------------- generation
    def decode_session(self) -> OrtDecodeSession:
        """A decode session over this file (exported with ``for_generation=True``)."""
        if "generation" not in self.metadata:
            raise ValueError(
                f"{self.path.name} was not exported for generation; export it with "
                "to_onnx(model, path, for_generation=True)"
            )
        if self.adapter_input_names and self._adapter_feed is None:
            raise RuntimeError(
                f"{self.path.name} takes the adapter as inputs: call "
                "set_adapter_weights(directory or AdaptedModel) first"
            )
        return OrtDecodeSession(self)

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: EosTokenIds | ModelDefault = MODEL_DEFAULT,
        pad_token_id: int | ModelDefault | None = MODEL_DEFAULT,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Any:
        """Generate tokens in ONNX Runtime; the arguments are ``AdaptedModel.generate``'s.

        ``eos_token_id`` and ``pad_token_id`` left out take the defaults stored at export
        (:attr:`default_token_ids`); ``eos_token_id=None`` turns eos stopping off. The
        key/value cache stays in ONNX Runtime values between steps (IO binding): each
        step's present outputs are bound as the next step's past inputs, never copied
        through numpy. Returns a torch LongTensor (batch, prompt_len + steps).
        """
        import torch

        from adaption_fx.generate import generate

        if isinstance(input_ids, np.ndarray):
            input_ids = torch.from_numpy(input_ids)
        if isinstance(attention_mask, np.ndarray):
            attention_mask = torch.from_numpy(attention_mask)
        session = self.decode_session()
        return generate(
            session,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
            use_cache=use_cache,
            max_length=session.max_length,
            defaults=self.default_token_ids,
        )

    @property
    def default_token_ids(self) -> tuple[EosTokenIds, int | None]:
        """The ``(eos_token_id, pad_token_id)`` that :meth:`generate` uses when a call
        leaves them out: the source model's, stored by ``to_onnx(..., for_generation=True)``
        (see ``AdaptedModel.default_token_ids``); (None, None) for files written before
        they were stored."""
        generation = self.metadata.get("generation", {})
        return generation.get("eos_token_id"), generation.get("pad_token_id")

    # ----------------------------------------------------------------- adapters
    def set_adapter_weights(self, source: Any) -> None:
        """Feed an adapter to a file exported with ``adapter_as_inputs=True``.

        ``source`` is an adapter checkpoint directory (ours or PEFT's), an AdaptedModel
        (its active adapter), or a mapping from this file's adapter input names to arrays.
        Everything is checked (structure, names, shapes, dtypes) before it replaces the
        current adapter.
        """
        if not self.adapter_input_names:
            raise ValueError(
                f"{self.path.name} was exported without adapter_as_inputs: its adapter is "
                "baked in; re-export with adapter_as_inputs=True to swap adapters"
            )
        if isinstance(source, (str, os.PathLike)):
            values = self._from_directory(Path(source))
        elif isinstance(source, Mapping):
            values = {k: _to_numpy(k, v) for k, v in source.items()}
        elif hasattr(source, "adaption_graph"):
            values = self._from_model(source)
        else:
            raise TypeError(
                "source must be an adapter directory, an AdaptedModel or a mapping of "
                f"arrays, got {type(source).__name__}"
            )
        missing = [n for n in self.adapter_input_names if n not in values]
        unexpected = sorted(set(values) - set(self.adapter_input_names))
        if missing or unexpected:
            raise ValueError(f"adapter tensors: missing {missing}, unexpected {unexpected}")
        # Copies: arrays from torch tensors share their memory, and a later in-place update
        # of the model (training, load_state_dict) must not reach the stored adapter.
        feed = {n: self._check(n, np.array(values[n])) for n in self.adapter_input_names}
        self._adapter_feed = feed

    def _check_structure(self, config: Mapping[str, Any], where: str) -> None:
        exported = self.metadata.get("adapter") or {}
        for field in ("adapter_len", "adapter_layers", "gate", "gate_activation"):
            if field in exported and config.get(field) != exported[field]:
                raise ValueError(
                    f"{where}: {field}={config.get(field)!r} but {self.path.name} was exported "
                    f"for {field}={exported[field]!r}"
                )

    def _from_model(self, model: Any) -> dict[str, np.ndarray]:
        from adaption_fx.passes.fold import compute_folded

        name = model.active_adapter
        if name is None:
            raise ValueError("the AdaptedModel has no active adapter")
        self._check_structure(model.adapters[name].to_dict(), f"adapter {name!r}")
        graph = model.adaption_graph(name)
        tensors = model.adapter_tensors(name)
        if self.metadata.get("folded"):
            values = compute_folded(graph, tensors)
        else:
            values = dict(zip(graph.adapter_inputs, tensors, strict=True))
        return {k: v.detach().cpu().numpy() for k, v in values.items()}

    def _from_directory(self, directory: Path) -> dict[str, np.ndarray]:
        import torch

        from adaption_fx import checkpoint as ckpt
        from adaption_fx.config import AdaptionConfig

        config = AdaptionConfig.from_pretrained(directory)
        self._check_structure(config.to_dict(), str(directory))
        where = str(directory / ckpt.WEIGHTS_NAME)
        state = ckpt.from_peft_keys(ckpt.read_tensors(directory), where)
        expected = self.metadata.get("raw_adapter_inputs", [])
        missing = [k for k in expected if k not in state]
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ckpt.CheckpointError(f"{where}: missing {missing}, unexpected {unexpected}")
        for key in expected:
            if not bool(torch.isfinite(state[key]).all()):
                raise ckpt.CheckpointError(f"{where}: {key} holds NaN or infinite values")
        # numpy has no bfloat16; the session casts to its own input dtype anyway.
        raw = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
        if not self.metadata.get("folded"):
            return raw
        return self._project(raw, expected)

    def _project(self, raw: dict[str, np.ndarray], order: list[str]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        if self._projection is None:
            name = self.metadata.get("projection")
            if not name or not (self.path.parent / name).is_file():
                raise FileNotFoundError(
                    f"{self.path.name} needs its adapter projection file {name!r} beside it"
                )
            self._projection = ort.InferenceSession(
                str(self.path.parent / name), providers=["CPUExecutionProvider"]
            )
        feed = {}
        for inp in self._projection.get_inputs():
            dtype = _ORT_TYPES.get(inp.type, np.float32)
            value = raw[inp.name]
            if list(value.shape) != list(inp.shape):
                raise ValueError(
                    f"{inp.name}: checkpoint shape {list(value.shape)}, exported {inp.shape}"
                )
            feed[inp.name] = value.astype(dtype, copy=False)
        names = [o.name for o in self._projection.get_outputs()]
        return dict(zip(names, self._projection.run(names, feed), strict=True))


_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


class OrtDecodeSession:
    """Runs decode steps of a generation export in ONNX Runtime, holding the cache.

    The cache lives in ``OrtValue``s on the session's device: the present outputs of one
    step are bound, as they are, to the past inputs of the next (IO binding), so a step
    copies only the new tokens in and the last token's logits out.
    """

    def __init__(self, model: OrtModel):
        import onnxruntime as ort

        self.model = model
        info = model.metadata["generation"]
        self.max_length: int = info["max_length"]
        self.past_names: list[str] = info["past_inputs"]
        self.present_names: list[str] = info["present_outputs"]
        self.cache_shapes: list[list[int]] = info["cache_shapes"]
        dtype = _NUMPY_DTYPES.get(info["cache_dtype"])
        if dtype is None:
            raise ValueError(
                f"{model.path.name}: cache dtype {info['cache_dtype']} has no numpy "
                "equivalent for ONNX Runtime"
            )
        self.cache_dtype = dtype
        self.device = "cuda" if model.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.binding = model.session.io_binding()
        self._ort = ort
        self._adapter = {
            name: ort.OrtValue.ortvalue_from_numpy(value, self.device)
            for name, value in (model._adapter_feed or {}).items()
        }
        self.past: list[Any] = []

    def _value(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device)

    def reset(self, batch: int) -> None:
        self.past = [
            self._value(np.zeros((batch, heads, 0, dim), dtype=self.cache_dtype))
            for heads, dim in self.cache_shapes
        ]

    def step(self, input_ids: Any, attention_mask: Any, position_ids: Any) -> Any:
        import torch

        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, tensor in (
            ("input_ids", input_ids),
            ("attention_mask", attention_mask),
            ("position_ids", position_ids),
        ):
            binding.bind_ortvalue_input(name, self._value(tensor.cpu().numpy().astype(np.int64)))
        for name, value in zip(self.past_names, self.past, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name, value in self._adapter.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.device)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.model.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        by_name = dict(zip(["logits", *self.present_names], outputs, strict=True))
        self.past = [by_name[n] for n in self.present_names]
        logits = by_name["logits"].numpy()
        return torch.from_numpy(logits[:, -1, :].copy())
