"""The OpenAI-compatible speech server (``chatterbox-tts serve``; the ``server`` extra).

* ``config``: ``ServerConfig`` (limits, names, streaming schedule) and ``ModelSpec`` (weights, devices).
* ``service``: ``SpeechService``, the engines behind one async interface that knows nothing of HTTP:
  admission and least-loaded placement (``pool``), the worker thread per stream (``worker``), stored
  voices (``voices``), metrics (``metrics``).
* ``app``: the FastAPI routes over a service (``create_app``); ``protocol`` and ``errors`` validate
  requests and shape OpenAI's error bodies; ``encoders`` and ``uploads`` handle audio in and out.
* ``cli``: the ``serve`` command; ``ray``: the Ray Serve deployment; ``client``: timing a running
  server (``run_concurrent``, for ``eval/serve_bench.py --http``); ``background``: the app in a thread.
"""
from __future__ import annotations

from .config import ModelSpec, ServerConfig

__all__ = ["ModelSpec", "ServerConfig"]
