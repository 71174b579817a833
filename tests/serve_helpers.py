"""A server of adaption_fx.serving in a thread of the test process, on a free port."""

from __future__ import annotations

import socket
import threading
import time

from adaption_fx.serving import ServeConfig, build_engine, build_state, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server in a thread; ``url`` and ``state`` for the tests."""

    def __init__(self, config: ServeConfig, engine_parts=None):
        """Build the engine (or take ``engine_parts``: engine, tokenizer, name) and
        serve until :meth:`stop`."""
        import uvicorn

        engine, tokenizer, name = engine_parts or build_engine(config)
        self.state = build_state(config, engine, tokenizer, name)
        self.app = create_app(self.state)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
