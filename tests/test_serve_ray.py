"""The Ray Serve deployment on a local Ray instance on the CPU (tiny models, one replica without a
GPU): it answers /health once the replica is warm, streams a request, and shares the voices
directory. Skipped when Ray Serve is not installed (the ``ray`` extra)."""
from __future__ import annotations

import io
import socket
import time

import pytest
import soundfile as sf

pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from chatterbox.serve.config import ModelSpec, ServerConfig  # noqa: E402
from chatterbox.serve.ray import RayConfig, args_to_argv, build_application, parse  # noqa: E402
from chatterbox.voice import synthetic_reference  # noqa: E402

pytestmark = pytest.mark.ray

KEY = "ray-key"
WAIT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_run_arguments_become_server_options(tmp_path):
    argv = args_to_argv({"tiny": "true", "voices_dir": str(tmp_path), "max_replicas": 4, "api_keys": "a,b",
                         "gpus_per_replica": 0, "no_watermark": "false"})
    assert argv == ["--tiny", "--voices-dir", str(tmp_path), "--max-replicas", "4", "--api-key", "a",
                    "--api-key", "b", "--gpus-per-replica", "0"]
    _, config, specs, ray_cfg = parse(argv)
    assert [(s.source, s.family) for s in specs] == [("tiny", "original")]
    assert config.api_keys[:2] == ("a", "b") and ray_cfg.max_replicas == 4


def test_local_ray_serve_streams_a_request(tmp_path):
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(voices_dir=str(tmp_path / "voices"), api_keys=(KEY,), max_new_tokens=24,
                              chunk_size=(4,))
        ray_cfg = RayConfig(gpus_per_replica=0, cpus_per_replica=0.5, max_replicas=2)
        serve.run(build_application(config, ModelSpec(source="tiny"), ray_cfg), name=ray_cfg.app_name,
                  route_prefix="/")
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S, headers=headers) as client:
            assert client.get("/health").json()["status"] == "ok"
            body = {"model": "tts-1", "voice": "alloy", "input": "Hello there, how are you today?",
                    "response_format": "pcm", "seed": 7}
            start = time.perf_counter()
            with client.stream("POST", "/v1/audio/speech", json=body) as response:
                assert response.status_code == 200
                arrivals = [(time.perf_counter() - start, len(p)) for p in response.iter_raw() if p]
            assert len(arrivals) >= 2 and sum(n for _, n in arrivals) % 2 == 0
            buf = io.BytesIO()
            sf.write(buf, synthetic_reference(3.0, 24000), 24000, format="WAV")
            created = client.post("/v1/voices", data={"name": "Shared"}, files={"file": ("r.wav", buf.getvalue())})
            assert created.status_code == 201, created.text
            assert (tmp_path / "voices" / created.json()["id"] / "conds.pt").is_file()  # the shared directory
            assert client.post("/v1/audio/speech", json={**body, "voice": "Shared"}).status_code == 200
            assert client.get("/v1/voices").status_code == 200
            assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    finally:
        serve.shutdown()
        ray.shutdown()
