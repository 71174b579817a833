"""An OpenAI-compatible server over many adapters (``adaption-fx serve``): continuous
batching of mixed-adapter rows, streaming, run-time adapters, Prometheus metrics.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client).
"""

from adaption_fx.serving.app import ServerState, create_app
from adaption_fx.serving.engines import EagerEngine, Engine, OrtEngine
from adaption_fx.serving.scheduler import Scheduler
from adaption_fx.serving.server import ServeConfig, build_engine, build_state, serve

__all__ = [
    "EagerEngine",
    "Engine",
    "OrtEngine",
    "Scheduler",
    "ServeConfig",
    "ServerState",
    "build_engine",
    "build_state",
    "create_app",
    "serve",
]
