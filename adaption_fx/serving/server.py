"""``adaption-fx serve``: load the model, build the engine, run the app under uvicorn.

ONNX Runtime is the default engine: the mixed-batch generation file is exported on
start-up when ``--onnx`` gives none, and kept in the cache directory
(``$ADAPTION_FX_CACHE_DIR``, else ``~/.cache/adaption-fx``, under ``serve/``), keyed by
the model file and the file's sizes, so a restart reuses it; a cache directory that others
can write is not used (see :func:`adaption_fx.files.private_cache_directory`).
``engine="eager"`` runs the AdaptedModel in PyTorch instead.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaption_fx.files import private_cache_directory, untrusted_reason
from adaption_fx.serving.app import ServerState, create_app
from adaption_fx.serving.engines import EagerEngine, Engine, OrtEngine
from adaption_fx.serving.logs import configure as configure_logging
from adaption_fx.serving.metrics import ServerMetrics
from adaption_fx.serving.scheduler import Scheduler

logger = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "eager")


@dataclass
class ServeConfig:
    """What ``adaption-fx serve`` runs.

    Attributes:
        model: a Hugging Face model directory or ``.gguf`` file (None: the embedded
            default).
        onnx: a mixed-batch generation export to serve (None: exported on start-up).
        adapters: name -> adapter directory, loaded at start-up.
        engine: "onnxruntime" or "eager".
        host, port: where to listen (127.0.0.1 unless told otherwise).
        max_batch_size: the most rows decoding together.
        max_queue: the most requests waiting; more get 429.
        max_model_len: the longest prompt + completion (default: the engine's).
        api_key: the bearer token ``/v1`` requests must carry (None: none).
        allow_adapter_loading: allow ``POST /v1/adapters`` / ``DELETE``.
        adapter_root: the directory run-time adapters must lie under.
        max_adapter_len, adapter_layers: the adapter sizes an exported file takes (default:
            the largest of the start-up adapters; 10 tokens and every layer without any).
        served_model_name: the base model's name in the API (default: the model file's or
            directory's name).
        log_format: "text" or "json" (one JSON object per line, with each request's id,
            model, status, token counts and seconds).
    """

    model: str | None = None
    onnx: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    engine: str = "onnxruntime"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_queue: int = 256
    max_model_len: int | None = None
    api_key: str | None = None
    allow_adapter_loading: bool = False
    adapter_root: str | None = None
    max_adapter_len: int | None = None
    adapter_layers: int | None = None
    served_model_name: str | None = None
    log_format: str = "text"

    def check(self) -> None:
        """Refuse bad settings before anything loads (ValueError naming the setting)."""
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        if self.onnx is not None and self.engine != "onnxruntime":
            raise ValueError("--onnx serves with the onnxruntime engine")
        for name in ("max_batch_size", "max_queue", "max_model_len", "max_adapter_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.allow_adapter_loading and self.adapter_root is None:
            raise ValueError("--allow-adapter-loading needs --adapter-root DIR")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise FileNotFoundError(f"--adapter-root {self.adapter_root!r} is not a directory")
        for name, path in self.adapters.items():
            if not Path(path).is_dir():
                raise FileNotFoundError(f"adapter {name!r}: {path!r} is not a directory")


def _export_directory() -> Path:
    """The cache directory for exported files where it is this user's alone; elsewhere (a
    shared directory: warned once) a temporary directory, removed at exit, so a file
    someone else planted is never served."""
    directory = private_cache_directory("serve", "export cache", create=True)
    if directory is not None:
        return directory
    scratch = Path(tempfile.mkdtemp(prefix="adaption-fx-serve-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return scratch


def _export_key(source: str, settings: dict[str, Any]) -> str:
    """A key for the exported file: the model file (name, size, modification time), the
    file's sizes and the versions that shape the export."""
    import onnxruntime
    import torch
    import transformers

    from adaption_fx.version import __version__

    path = Path(source)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    described = {
        "files": stats,
        "settings": settings,
        "versions": [__version__, torch.__version__, transformers.__version__],
        "onnxruntime": onnxruntime.__version__,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def _structure(model: Any, config: ServeConfig) -> tuple[int, int]:
    """(max_adapter_len, adapter_layers) the exported file is built for."""
    configs = model.adapters
    longest = max((c.adapter_len for c in configs.values()), default=10)
    widest = max((c.adapter_layers for c in configs.values()), default=len(model.sites))
    return config.max_adapter_len or longest, config.adapter_layers or widest


def build_engine(config: ServeConfig) -> tuple[Engine, Any, str]:
    """Load the model and adapters; returns the engine, the tokenizer and the base model's
    served name."""
    from adaption_fx.app.pretrained import load_pretrained
    from adaption_fx.rewrite import rewrite

    config.check()
    loaded = load_pretrained(config.model)
    name = config.served_model_name or Path(loaded.source).name.removesuffix(".gguf")
    model = rewrite(loaded.model, None)
    for adapter, path in config.adapters.items():
        model.load_adapter(path, adapter_name=adapter)
    if config.engine == "eager":
        return EagerEngine(model, config.max_model_len), loaded.tokenizer, name
    from adaption_fx.export import OrtModel, to_onnx

    if config.onnx is not None:
        path = Path(config.onnx)
    else:
        max_adapter_len, layers = _structure(model, config)
        settings = {"max_adapter_len": max_adapter_len, "adapter_layers": layers}
        path = _export_directory() / f"{_export_key(loaded.source, settings)}.onnx"
        if path.is_file() and untrusted_reason(path) is None:
            logger.info("reusing the exported file %s", path)
        else:
            logger.info("exporting the mixed-batch decode step to %s", path)
            to_onnx(
                model,
                path,
                for_generation=True,
                adapter_as_inputs=True,
                mixed_batch=True,
                mixed_max_adapter_len=max_adapter_len,
                mixed_adapter_layers=layers,
            )
            for written in path.parent.glob(f"{path.stem}*"):  # the file and its companions
                written.chmod(0o600)  # this user's alone, whatever the umask
    ort_model = OrtModel(path)
    for adapter, directory in config.adapters.items():
        ort_model.set_adapter_weights(Path(directory), adapter_name=adapter)
    return OrtEngine(ort_model), loaded.tokenizer, name


def build_state(config: ServeConfig, engine: Engine, tokenizer: Any, name: str) -> ServerState:
    """The routes' shared state over ``engine``."""
    limit = engine.max_length
    if config.max_model_len is not None:
        if config.max_model_len > limit:
            raise ValueError(
                f"--max-model-len {config.max_model_len} exceeds what the engine runs ({limit})"
            )
        limit = config.max_model_len
    metrics = ServerMetrics()
    scheduler = Scheduler(
        engine,
        tokenizer,
        max_batch_size=config.max_batch_size,
        max_queue=config.max_queue,
        metrics=metrics,
    )
    return ServerState(
        scheduler=scheduler,
        tokenizer=tokenizer,
        model_name=name,
        max_model_len=limit,
        api_key=config.api_key,
        allow_adapter_loading=config.allow_adapter_loading,
        adapter_root=Path(config.adapter_root) if config.adapter_root else None,
        metrics=metrics,
    )


def serve(config: ServeConfig) -> int:
    """Build everything and serve until SIGTERM/SIGINT (uvicorn stops accepting, lets the
    responses in flight finish, then the scheduler drains); returns 0."""
    import uvicorn

    configure_logging(config.log_format)
    engine, tokenizer, name = build_engine(config)
    state = build_state(config, engine, tokenizer, name)
    app = create_app(state)
    logger.info("listening on http://%s:%d (%s engine)", config.host, config.port, engine.name)
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found:
    # this one, which ends the process with status 0 (a drained shutdown is a clean one).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_cleanly) if main_thread else None
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_config=None, access_log=False)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)
