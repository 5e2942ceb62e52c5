"""Running the app in a background thread of the current process (notebooks, tests, benchmarks that
want the HTTP path without a second process)."""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0  # for uvicorn to bind and start (and, in stop(), to finish)
POLL_S = 0.01


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``.

    Binds ``host:port`` (port 0 picks a free one) and serves ``app`` with uvicorn in a daemon thread;
    ``stop()`` shuts it down (the app's lifespan ends, which cancels running streams)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = START_TIMEOUT_S,
                 poll_s: float = POLL_S) -> None:
        import uvicorn

        self.host = host
        self.start_timeout_s = start_timeout_s
        self.poll_s = poll_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="chatterbox-http", daemon=True)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(self.poll_s)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        log.info("serving on %s", self.url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(self.start_timeout_s)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
