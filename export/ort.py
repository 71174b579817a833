"""OrtModel: run an exported adaption-fx ONNX file with ONNX Runtime.

A file exported with ``mixed_batch=True`` (see ``adaption_fx.export.onnx.to_onnx``) holds a
table of named adapters here: :meth:`OrtModel.set_adapter_weights` adds or replaces one
(``adapter_name=...``), :meth:`OrtModel.delete_adapter_weights` removes one, and each call
names every batch row's adapter (``adapter_names=[...]``, ``"__base__"`` for the base
model). The table inputs are rebuilt whenever the set of adapters changes; the file never
needs exporting again.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# At module level, unlike torch below: the adaption_fx package has loaded them already.
from adaption_fx.export.onnx.metadata import (
    OnnxFileError,
    TableSite,
    check_against_graph,
    check_projection,
    parse_metadata,
)
from adaption_fx.export.onnx.plan import METADATA_KEY
from adaption_fx.generation.options import EosTokenIds
from adaption_fx.model.mixed import (
    BASE_ADAPTER,
    TableEntry,
    build_adapter_table,
    check_adapter_names,
)
from adaption_fx.passes.fold import folded_keys
from adaption_fx.passes.insert import gate_key, prompt_key

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


# ONNX Runtime's exceptions for a file it cannot load (not those of a device or an
# execution provider failing, which say nothing about the file).
_LOAD_ERRORS = (
    "Fail",
    "InvalidArgument",
    "InvalidGraph",
    "InvalidProtobuf",
    "NoModel",
    "NoSuchFile",
    "NotFound",
    "NotImplemented",
)
# What ONNX Runtime's messages carry besides the reason: the error code, the file again,
# source locations and C++ signatures.
_ORT_NOISE = (
    re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : "),
    re.compile(r"Load model from .*? failed:"),
    re.compile(r"\S+\.(?:cc|cpp|h):\d+ "),
    re.compile(r"(?:onnxruntime|onnx|std)::[\w:~<>]+\([^()]*\) "),
)


def short_ort_message(exc: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's reason in ``exc``, without its code, source locations and C++
    signatures, at most ``limit`` characters (the end kept: the reason comes last)."""
    text = " ".join(str(exc).split())
    for pattern in _ORT_NOISE:
        text = pattern.sub("", text)
    text = text.strip() or type(exc).__name__
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def open_session(path: Path, what: str, **kwargs: Any) -> Any:
    """An ``onnxruntime.InferenceSession`` of the file at ``path`` (``kwargs`` are the
    session's). A file ONNX Runtime cannot load (truncated, damaged, not ONNX, its
    external data missing or outside its directory, which ONNX Runtime refuses) raises
    :class:`OnnxFileError` naming the file (``what``) and ONNX Runtime's reason."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    errors = tuple(getattr(state, name) for name in _LOAD_ERRORS if hasattr(state, name))
    # ONNX Runtime's message quotes parts of a damaged file, which may not decode as UTF-8:
    # the error is then Python's UnicodeDecodeError about that message.
    errors += (UnicodeDecodeError,)
    try:
        return ort.InferenceSession(str(path), **kwargs)
    except errors as exc:
        raise OnnxFileError(
            f"{path}: ONNX Runtime cannot load this {what}: {short_ort_message(exc)}"
        ) from None


def _row_count(adapter_names: Any) -> int:
    """The batch that ``adapter_names`` describes (-1 where it is no list: the name check
    then says what is wrong)."""
    if isinstance(adapter_names, Sequence) and not isinstance(adapter_names, (str, bytes)):
        return len(adapter_names)
    return -1


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

    A file exported with ``mixed_batch=True`` serves batches whose rows use different
    adapters: register adapters by name with :meth:`set_adapter_weights` (``adapter_name``),
    then pass ``adapter_names`` (one registered name or ``"__base__"`` per row) to every
    call, :meth:`run` and :meth:`generate`. ``"__base__"`` is always available, so such a
    file runs the base model before any adapter is set.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        OnnxFileError: (a ``ValueError``, from ``adaption_fx.export``) ONNX Runtime cannot
            load the file (truncated, damaged, not ONNX, external data missing or outside
            its directory), or its ``adaption_fx`` metadata is not what ``to_onnx`` writes
            (checked field by field, and against the graph's inputs and outputs, before
            anything it sizes is allocated). A damaged adapter projection companion raises
            it naming the companion when a checkpoint directory first needs it.
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
        self.session = open_session(
            self.path, "ONNX file", sess_options=session_options, providers=self.providers
        )
        try:  # the names and metadata are the file's strings, which may not be UTF-8
            self.inputs = {i.name: i for i in self.session.get_inputs()}
            outputs = {o.name: o for o in self.session.get_outputs()}
            raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        except UnicodeDecodeError as exc:
            raise OnnxFileError(
                f"{self.path}: its input, output or metadata strings are not UTF-8 text: {exc}"
            ) from None
        self.output_names = list(outputs)
        # Checked before anything reads it: every field's type and bounds, and the names
        # and sizes it gives against the graph's own inputs and outputs.
        self.metadata: dict[str, Any] = parse_metadata(raw, self.path)
        check_against_graph(self.metadata, self.path, self.inputs, outputs)
        adapter = self.metadata.get("adapter_inputs", [])
        self.adapter_input_names: list[str] = list(adapter)
        self.model_input_names = [n for n in self.inputs if n not in adapter]
        self._adapter_feed: dict[str, np.ndarray] | None = None
        self._projection = None
        # Mixed batches: the named adapters, in the order of their table rows (after the
        # base model's row 0), and the table inputs built from them.
        self._mixed: dict[str, Any] | None = self.metadata.get("mixed_batch")
        self._adapters: dict[str, TableEntry] = {}
        self._table_names: tuple[str, ...] = (BASE_ADAPTER,)
        self._table_feed: dict[str, np.ndarray] = {}
        self._table_sites: list[TableSite] = []
        if self._mixed is not None:
            self._table_sites = [TableSite.from_metadata(e) for e in self._mixed["sites"]]
            self._table_names, self._table_feed = self._build_table({})

    # ----------------------------------------------------------------- running
    @property
    def mixed_batch(self) -> bool:
        """Whether the file was exported with ``mixed_batch=True`` (one adapter per row)."""
        return self._mixed is not None

    @property
    def adapter_names(self) -> list[str]:
        """The adapters registered with :meth:`set_adapter_weights` on a mixed-batch file,
        in table order (``"__base__"``, always available, is not listed); [] for other
        files."""
        return list(self._adapters)

    def __call__(self, *, adapter_names: Sequence[str] | None = None, **inputs: Any) -> np.ndarray:
        """The first output (the logits) for ``inputs``; see :meth:`run`."""
        return self.run(adapter_names=adapter_names, **inputs)[self.output_names[0]]

    def run(
        self, *, adapter_names: Sequence[str] | None = None, **inputs: Any
    ) -> dict[str, np.ndarray]:
        """Run the session; returns every output by name.

        ``adapter_names``: for a file exported with ``mixed_batch=True`` (and only there),
        required: one name per batch row, an adapter registered with
        :meth:`set_adapter_weights` or ``"__base__"``; each row's outputs are those of the
        model with that row's adapter.
        """
        self._check_adapter_names_given(adapter_names)
        missing = [n for n in self.model_input_names if n not in inputs]
        unexpected = sorted(set(inputs) - set(self.model_input_names))
        if missing or unexpected:
            raise TypeError(
                f"{self.path.name} takes inputs {self.model_input_names}; missing {missing}, "
                f"unexpected {unexpected}"
            )
        feed = {n: self._check(n, _to_numpy(n, inputs[n])) for n in self.model_input_names}
        if self._mixed is not None:
            batch = next((v.shape[0] for v in feed.values() if v.ndim), -1)
            feed.update(self._mixed_feed(adapter_names, batch))
        elif self.adapter_input_names:
            if self._adapter_feed is None:
                raise RuntimeError(
                    f"{self.path.name} takes the adapter as inputs: call "
                    "set_adapter_weights(directory or AdaptedModel) first"
                )
            feed.update(self._adapter_feed)
        outputs = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, outputs, strict=True))

    def _check_adapter_names_given(self, adapter_names: Any) -> None:
        """``adapter_names`` is given exactly where the file is a mixed-batch one."""
        if self._mixed is None and adapter_names is not None:
            raise ValueError(
                f"{self.path.name} was exported without mixed_batch=True: it runs one adapter "
                "for the whole batch and takes no adapter_names; export with "
                "to_onnx(model, path, adapter_as_inputs=True, mixed_batch=True) for a "
                "different adapter per row"
            )
        if self._mixed is not None and adapter_names is None:
            raise TypeError(
                f"{self.path.name} was exported with mixed_batch=True: pass adapter_names="
                f"[...], one name per batch row (an adapter of {self.adapter_names} or "
                f"{BASE_ADAPTER!r} for the base model)"
            )

    def _mixed_feed(self, adapter_names: Any, batch: int) -> dict[str, np.ndarray]:
        """The table inputs and each row's table index for ``adapter_names`` (checked
        against ``batch`` rows and the registered adapters)."""
        names = check_adapter_names(adapter_names, batch, self.adapter_names)
        index = {name: i for i, name in enumerate(self._table_names)}
        rows = np.array([index[n] for n in names], dtype=np.int64)
        return {**self._table_feed, self._mixed["rows_input"]: rows}

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
    def decode_session(self, adapter_names: Sequence[str] | None = None) -> OrtDecodeSession:
        """A decode session over this file (exported with ``for_generation=True``).

        ``adapter_names``: required for a mixed-batch file, refused otherwise (see
        :meth:`run`); the session's batch has that many rows, each with its adapter, for
        the whole generation.
        """
        if "generation" not in self.metadata:
            raise ValueError(
                f"{self.path.name} was not exported for generation; export it with "
                "to_onnx(model, path, for_generation=True)"
            )
        self._check_adapter_names_given(adapter_names)
        if self._mixed is None and self.adapter_input_names and self._adapter_feed is None:
            raise RuntimeError(
                f"{self.path.name} takes the adapter as inputs: call "
                "set_adapter_weights(directory or AdaptedModel) first"
            )
        return OrtDecodeSession(self, adapter_names)

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        generation_config: Any = None,
        *,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate tokens in ONNX Runtime; the options are ``AdaptedModel.generate``'s.

        Options left out take the defaults stored at export: the source model's generation
        config (:attr:`generation_config`) and its eos and pad ids
        (:attr:`default_token_ids`); ``eos_token_id=None`` turns eos stopping off. The
        key/value cache stays in ONNX Runtime values between steps (IO binding): each
        step's present outputs are bound as the next step's past inputs, never copied
        through numpy. Returns a torch LongTensor (batch, prompt_len + steps), or Hugging
        Face's ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``.

        ``adapter_names`` (a mixed-batch file only, and required there): one name per
        prompt row, a registered adapter or ``"__base__"``; each row generates the tokens
        it generates alone with its adapter.
        """
        return self._generation(input_ids, attention_mask, generation_config, adapter_names, kwargs)

    def stream(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        generation_config: Any = None,
        *,
        tokenizer: Any = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """:meth:`generate` as an iterator (see ``AdaptedModel.stream``): each step's new
        tokens, or with ``tokenizer`` the decoded text as it becomes printable."""
        return self._generation(
            input_ids,
            attention_mask,
            generation_config,
            adapter_names,
            {**kwargs, "tokenizer": tokenizer},
            streaming=True,
        )

    def _generation(
        self,
        input_ids: Any,
        attention_mask: Any,
        generation_config: Any,
        adapter_names: Sequence[str] | None,
        options: dict[str, Any],
        *,
        streaming: bool = False,
    ) -> Any:
        import torch

        from adaption_fx.generation.args import resolve_generation
        from adaption_fx.generation.loop import run_generation

        if isinstance(input_ids, np.ndarray):
            input_ids = torch.from_numpy(input_ids)
        if isinstance(attention_mask, np.ndarray):
            attention_mask = torch.from_numpy(attention_mask)
        self._check_adapter_names_given(adapter_names)
        if adapter_names is not None:  # checked against the prompts before anything runs
            batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) else -1
            adapter_names = check_adapter_names(adapter_names, batch, self.adapter_names)
        stored = self.generation_config
        try:
            args = resolve_generation(stored, self.default_token_ids, generation_config, **options)
        except (TypeError, ValueError) as exc:
            self._blame_stored_config(stored, generation_config, options, exc)
            raise
        max_length = self.metadata.get("generation", {}).get("max_length")
        return run_generation(
            self.decode_session,
            input_ids,
            attention_mask,
            args,
            adapter_names=adapter_names,
            max_length=max_length,
            streaming=streaming,
        )

    @property
    def generation_config(self) -> Any:
        """The source model's ``transformers.GenerationConfig`` as stored at export (None
        for a file without one): what :meth:`generate` takes options left out from."""
        stored = self.metadata.get("generation", {}).get("config")
        if stored is None:
            return None
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_dict(stored)
        except (TypeError, ValueError) as exc:
            raise OnnxFileError(
                f"{self.path}: metadata field 'generation.config' is not a generation config: {exc}"
            ) from None

    def _blame_stored_config(
        self, stored: Any, generation_config: Any, options: dict[str, Any], exc: Exception
    ) -> None:
        """Where a generate call failed, and the same call without the file's stored
        generation config would not have, the file is at fault: say so, naming it (the
        call's options can override a stored value)."""
        from adaption_fx.generation.args import resolve_generation

        if stored is None:
            return
        try:
            resolve_generation(None, self.default_token_ids, generation_config, **options)
        except (TypeError, ValueError):
            return  # the call's own options are wrong: its error stands
        raise OnnxFileError(
            f"{self.path}: metadata field 'generation.config' holds a value generate cannot "
            f"run ({exc}); pass that option to generate to override it"
        ) from exc

    @property
    def default_token_ids(self) -> tuple[EosTokenIds, int | None]:
        """The ``(eos_token_id, pad_token_id)`` that :meth:`generate` uses when a call
        leaves them out: the source model's, stored by ``to_onnx(..., for_generation=True)``
        (see ``AdaptedModel.default_token_ids``); (None, None) for files written before
        they were stored."""
        generation = self.metadata.get("generation", {})
        return generation.get("eos_token_id"), generation.get("pad_token_id")

    # ----------------------------------------------------------------- adapters
    def set_adapter_weights(self, source: Any, adapter_name: str | None = None) -> None:
        """Feed an adapter to a file exported with ``adapter_as_inputs=True``.

        ``source`` is an adapter checkpoint directory (ours or PEFT's), an AdaptedModel
        (its active adapter), or a mapping from this file's adapter input names to arrays.
        Everything is checked (structure, names, shapes, dtypes) before it replaces the
        current adapter. ``adapter_name`` is refused for such a file: it holds one adapter.

        On a file exported with ``mixed_batch=True``, ``adapter_name`` is required: the
        adapter is added to the file's table under that name, or replaces the one of that
        name (``"__base__"`` is reserved for the base model). Adapters may differ in
        adapter_len, adapted layers and gate variant, as long as they adapt only layers
        the file covers. ``source`` is then:

        - a checkpoint directory: ``directory/<adapter_name>`` where that holds a
          checkpoint (PEFT's layout, as ``AdaptedModel.save_adapter`` writes it), else
          ``directory`` itself. Its prompts, zero-padded to the file's
          ``max_adapter_len``, go through the ``.adapter.onnx`` companion (no PyTorch
          weights needed) and its gates through their activation;
        - an AdaptedModel: its adapter named ``adapter_name`` if it has one, else its
          active adapter, folded in PyTorch;
        - a mapping of one adapter's folded tensors by name, for the sites it adapts:
          ``<site>.adaption_key`` (1, kv_heads, adapter_len, head_dim),
          ``<site>.adaption_value`` (1, kv_heads, adapter_len, value_head_dim) and
          ``<site>.adaption_gate_act`` (one value, or one per head).

        Everything is checked before the table changes; on error it is as it was.
        """
        if self._mixed is not None:
            self._set_mixed(source, adapter_name)
            return
        if adapter_name is not None:
            raise ValueError(
                f"adapter_name is for files exported with mixed_batch=True; {self.path.name} "
                "holds one adapter at a time: call set_adapter_weights(source)"
            )
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

    def delete_adapter_weights(self, adapter_name: str) -> None:
        """Remove an adapter from a mixed-batch file's table; later calls may no longer
        name it. The other adapters' rows are unchanged."""
        if self._mixed is None:
            raise ValueError(
                f"{self.path.name} was exported without mixed_batch=True: it holds no named "
                "adapters (set_adapter_weights replaces its one adapter)"
            )
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is the base model: it cannot be deleted")
        if adapter_name not in self._adapters:
            raise ValueError(
                f"no adapter named {adapter_name!r}; adapters are {self.adapter_names}"
            )
        adapters = {k: v for k, v in self._adapters.items() if k != adapter_name}
        self._table_names, self._table_feed = self._build_table(adapters)
        self._adapters = adapters
        logger.info("deleted adapter %r from %s", adapter_name, self.path.name)

    def _set_mixed(self, source: Any, adapter_name: Any) -> None:
        if adapter_name is None:
            raise TypeError(
                f"{self.path.name} was exported with mixed_batch=True and holds named "
                "adapters: pass adapter_name=... to set_adapter_weights"
            )
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        if adapter_name == BASE_ADAPTER:
            raise ValueError(
                f"{BASE_ADAPTER!r} names the base model (always available); pick another "
                "adapter_name"
            )
        if isinstance(source, (str, os.PathLike)):
            entry = self._mixed_from_directory(Path(source), adapter_name)
        elif isinstance(source, Mapping):
            entry = self._mixed_from_mapping(source)
        elif hasattr(source, "adaption_graph"):
            entry = self._mixed_from_model(source, adapter_name)
        else:
            raise TypeError(
                "source must be an adapter directory, an AdaptedModel or a mapping of "
                f"arrays, got {type(source).__name__}"
            )
        adapters = dict(self._adapters)
        adapters[adapter_name] = entry
        # Built before anything is replaced: a failure leaves the table as it was.
        names, feed = self._build_table(adapters)
        self._adapters, self._table_names, self._table_feed = adapters, names, feed
        logger.info(
            "set adapter %r (adapter_len=%d) in %s", adapter_name, entry.adapter_len, self.path.name
        )

    def _build_table(
        self, adapters: Mapping[str, TableEntry]
    ) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
        """The table rows' names and the table inputs (all but the rows) for ``adapters``."""
        import torch

        dtype = getattr(torch, self._mixed["dtype"], None)
        if not isinstance(dtype, torch.dtype) or dtype == torch.bfloat16:
            raise ValueError(
                f"{self.path.name}: adapter tables of dtype {self._mixed['dtype']} cannot be "
                "fed from numpy"
            )
        table = build_adapter_table(self._table_sites, adapters, dtype=dtype, device="cpu")
        rows = self._mixed["rows_input"]
        feed = {
            name: self._check(name, table.tensors[name].detach().numpy())
            for name in self.adapter_input_names
            if name != rows
        }
        return table.names, feed

    def _covered(self, paths: Sequence[str], where: str, adapter_layers: int) -> None:
        """Every one of ``paths`` is a layer the file's tables cover."""
        covered = [s.module_path for s in self._table_sites]
        outside = [p for p in paths if p not in covered]
        if outside:
            raise ValueError(
                f"{where}: adapter_layers={adapter_layers} adapts {outside}, outside the "
                f"{len(covered)} layers {self.path.name} covers ({covered}); re-export with "
                f"mixed_adapter_layers={adapter_layers} or more"
            )

    def _mixed_from_model(self, model: Any, adapter_name: str) -> TableEntry:
        from adaption_fx.passes.fold import compute_folded

        name = adapter_name if adapter_name in model.adapters else model.active_adapter
        if name is None:
            raise ValueError(
                f"the AdaptedModel has no adapter named {adapter_name!r} and no active adapter"
            )
        config = model.adapters[name]
        graph = model.adaption_graph(name)
        paths = [s.module_path for s in graph.sites]
        self._covered(paths, f"adapter {name!r}", config.adapter_layers)
        values = compute_folded(graph, model.adapter_tensors(name))
        return TableEntry(config.adapter_len, {k: v.detach().cpu() for k, v in values.items()})

    def _mixed_from_mapping(self, source: Mapping[str, Any]) -> TableEntry:
        import torch

        values = {k: _to_numpy(k, v) for k, v in source.items()}
        per_site = {s.module_path: folded_keys(s) for s in self._table_sites}
        known = {key for keys in per_site.values() for key in keys}
        unexpected = sorted(set(values) - known)
        given = [keys for keys in per_site.values() if any(k in values for k in keys)]
        missing = [k for keys in given for k in keys if k not in values]
        if missing or unexpected or not given:
            raise ValueError(
                f"adapter tensors: missing {missing}, unexpected {unexpected}"
                + ("" if given else "; give the folded tensors of at least one site")
            )
        lengths = set()
        for key, value in values.items():
            if not np.issubdtype(value.dtype, np.floating):
                raise TypeError(f"{key} must hold floats, got dtype {value.dtype}")
            if not key.endswith("adaption_gate_act"):
                if value.ndim != 4:
                    raise ValueError(
                        f"{key} must be 4-d (1, kv_heads, adapter_len, dim), got shape "
                        f"{value.shape}"
                    )
                lengths.add(int(value.shape[2]))
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(
                f"adapter tensors: keys and values must share one adapter_len >= 1, got "
                f"lengths {sorted(lengths)}"
            )
        # Copies: a later change to the caller's arrays must not reach the table.
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in values.items()}
        return TableEntry(lengths.pop(), tensors)

    def _mixed_from_directory(self, directory: Path, adapter_name: str) -> TableEntry:
        """An adapter checkpoint projected to its folded tensors (see
        :meth:`set_adapter_weights`)."""
        import torch

        from adaption_fx import checkpoint as ckpt
        from adaption_fx.config import AdaptionConfig

        folder = ckpt.adapter_directory(directory, adapter_name)
        config = AdaptionConfig.from_pretrained(folder)
        length, layers = config.adapter_len, config.adapter_layers
        longest = int(self._mixed["max_adapter_len"])
        if length > longest:
            raise ValueError(
                f"{folder}: adapter_len={length} is longer than the {longest} prompt tokens "
                f"{self.path.name}'s projection takes; re-export with "
                f"mixed_max_adapter_len={length} or more, or set the adapter from an "
                "AdaptedModel"
            )
        all_sites = self._mixed["all_sites"]
        if layers > len(all_sites):
            raise ValueError(
                f"{folder}: adapter_layers={layers} but the model has only "
                f"{len(all_sites)} attention sites"
            )
        paths = all_sites[len(all_sites) - layers :]
        self._covered(paths, str(folder), layers)
        state, where = ckpt.read_adapter_state(folder)
        sites = {s.module_path: s for s in self._table_sites}
        expected: dict[str, tuple[int, ...]] = {}
        for path in paths:
            site = sites[path]
            expected[prompt_key(site)] = (1, length, site.hidden_size)
            scalar = config.gate == "scalar"
            expected[gate_key(site)] = (1,) if scalar else (1, site.num_heads, 1, 1)
        missing = [k for k in expected if k not in state]
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ckpt.CheckpointError(
                f"{where}: tensors do not match adapter_layers={layers}: missing {missing}, "
                f"unexpected {unexpected}"
            )
        for key, shape in expected.items():
            value = state[key]
            if tuple(value.shape) != shape:
                raise ckpt.CheckpointError(
                    f"{where}: {key} has shape {tuple(value.shape)}, expected {shape} "
                    f"(adapter_len={length}, gate={config.gate!r})"
                )
            if not value.is_floating_point():
                raise ckpt.CheckpointError(f"{where}: {key} has non-float dtype {value.dtype}")
            if not bool(torch.isfinite(value).all()):
                raise ckpt.CheckpointError(f"{where}: {key} holds NaN or infinite values")
        # The projection first: its checks bound the zero-padded prompts below.
        self._projection_session()
        # Every covered site's prompt, zero-padded to the projection's length (zero where
        # the adapter does not adapt the site): keys and values are computed token by
        # token, so the first `length` of each are the prompt's own.
        raw = {}
        for site in self._table_sites:
            prompt = np.zeros((1, longest, site.hidden_size), dtype=np.float32)
            key = prompt_key(site)
            if key in state:
                prompt[:, :length] = state[key].float().numpy()
            raw[key] = prompt
        projected = self._project(raw, self._mixed["projection_inputs"])
        values: dict[str, torch.Tensor] = {}
        for path in paths:
            site = sites[path]
            key_name, value_name, gate_name = folded_keys(site)
            for name in (key_name, value_name):
                values[name] = torch.from_numpy(np.array(projected[name][:, :, :length]))
            gate = state[gate_key(site)].float()
            if config.gate_activation == "tanh":
                gate = torch.tanh(gate)
            values[gate_name] = gate.reshape(-1)  # one value, or one per head
        return TableEntry(length, values)

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
        state, where = ckpt.read_adapter_state(directory)
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

    def _projection_session(self) -> Any:
        """The adapter projection companion's session, opened (and checked against the
        metadata) once."""
        if self._projection is None:
            # A bare file name (parse_metadata refuses any other): the companion is beside
            # the model, never elsewhere.
            name = self.metadata.get("projection")
            if not name or not (self.path.parent / name).is_file():
                raise FileNotFoundError(
                    f"{self.path} needs its adapter projection file {name!r} beside it"
                )
            companion = self.path.parent / name
            session = open_session(
                companion,
                f"adapter projection of {self.path.name}",
                providers=["CPUExecutionProvider"],
            )
            try:
                inputs = {i.name: i for i in session.get_inputs()}
                outputs = {o.name: o for o in session.get_outputs()}
            except UnicodeDecodeError as exc:
                raise OnnxFileError(
                    f"{companion}: its input or output names are not UTF-8 text: {exc}"
                ) from None
            check_projection(self.metadata, self.path, companion, inputs, outputs)
            self._projection = session
        return self._projection

    def _project(self, raw: dict[str, np.ndarray], order: list[str]) -> dict[str, np.ndarray]:
        feed = {}
        for inp in self._projection_session().get_inputs():
            dtype = _ORT_TYPES.get(inp.type, np.float32)
            value = raw[inp.name]
            if list(value.shape) != list(inp.shape):
                raise ValueError(
                    f"{inp.name}: checkpoint shape {list(value.shape)}, exported {inp.shape}"
                )
            feed[inp.name] = value.astype(dtype, copy=False)
        session = self._projection_session()
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed), strict=True))


_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


class OrtDecodeSession:
    """Runs decode steps of a generation export in ONNX Runtime, holding the cache.

    The cache lives in ``OrtValue``s on the session's device: the present outputs of one
    step are bound, as they are, to the past inputs of the next (IO binding), so a step
    copies only the new tokens in and the last token's logits out.

    On a mixed-batch file, ``adapter_names`` (required there) fixes each row's adapter
    for the session: the rows and the adapter tables are bound once, as they are when
    the session is made, and every batch it runs has that many rows.
    """

    def __init__(self, model: OrtModel, adapter_names: Sequence[str] | None = None):
        import onnxruntime as ort

        model._check_adapter_names_given(adapter_names)
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
        feed = model._adapter_feed or {}
        self.rows: int | None = None  # the batch the adapter rows fix, if any
        if adapter_names is not None:
            feed = model._mixed_feed(adapter_names, _row_count(adapter_names))
            self.rows = len(adapter_names)
        self._adapter = {
            name: ort.OrtValue.ortvalue_from_numpy(value, self.device)
            for name, value in feed.items()
        }
        self.past: list[Any] = []

    def _value(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device)

    def reset(self, batch: int) -> None:
        """Start a new sequence batch of ``batch`` rows (an empty cache)."""
        if self.rows is not None and batch != self.rows:
            raise ValueError(
                f"this session's adapter_names name {self.rows} rows; the batch has {batch}"
            )
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
