"""The real thing: ``python -m chatterbox.cli serve`` as a subprocess on 127.0.0.1 with the synthetic
checkpoint on the CPU (a small token cap), driven by the official ``openai`` client and by ``httpx``.

The server starts twice in this module (the second time to show stored voices survive a restart);
each start builds the full-size synthetic model, so everything else shares one server and the
requests are few and short."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.full_size

KEY = "sk-test-serve"
TEXT = "Hello there, how are you today?"
SEED = 1
# With these the synthetic checkpoint streams its audio for TEXT and SEED in more than one chunk.
SERVER_ARGS = ("--max-new-tokens", "24", "--chunk-size", "12", "--max-concurrent", "2", "--max-queue", "1",
               "--opt", "reference+cfm_steps=1", "--device", "cpu", "--api-key", KEY)
SHORT = 8  # max_new_tokens of the requests that need some audio, not a stream of it
START_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 600.0
POLL_S = 0.2
BASE = {"model": "chatterbox", "input": TEXT, "voice": "default", "seed": SEED}
SHORT_BODY = {**BASE, "max_new_tokens": SHORT}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, voices_dir, log_path) -> None:
        self.voices_dir, self.log_path = voices_dir, log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text()[-n:] if self.log_path.exists() else ""

    def start(self) -> "ServerProcess":
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "chatterbox.cli", "serve", "--port", str(self.port),
                                          "--voices-dir", str(self.voices_dir), *SERVER_ARGS],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server was not ready in {START_TIMEOUT_S} s:\n{self.log_tail()}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    proc = ServerProcess(root / "voices", root / "server.log").start()
    yield proc
    proc.stop()


def client_for(server, key: str = KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT_S)


def http(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S, headers={"Authorization": f"Bearer {KEY}"})


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")


def wait_for(condition, what: str, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_openai_client_streams_pcm_while_it_is_generated(server):
    arrivals = []
    start = time.perf_counter()
    with client_for(server).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format="pcm", extra_body={"seed": SEED}) as response:
        assert response.headers["content-type"] == "audio/pcm"
        for piece in response.iter_bytes():
            arrivals.append((time.perf_counter() - start, len(piece)))
    done = time.perf_counter() - start
    assert len(arrivals) >= 2, arrivals
    assert arrivals[0][0] < arrivals[-1][0] < done + 1e-3, arrivals
    assert sum(n for _, n in arrivals) % 2 == 0


def test_two_requests_at_once_complete_and_wav_flac_decode(server):
    client = client_for(server)
    results = {}

    def fetch(fmt: str) -> None:
        results[fmt] = client.audio.speech.create(model="chatterbox", voice="default", input=TEXT,
                                                  response_format=fmt,
                                                  extra_body={"seed": SEED, "max_new_tokens": SHORT}).read()

    threads = [threading.Thread(target=fetch, args=(fmt,)) for fmt in ("wav", "flac")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    decoded = {fmt: sf.read(io.BytesIO(results[fmt]), dtype="int16") for fmt in ("wav", "flac")}
    assert all(rate == 24000 for _, rate in decoded.values())
    assert decoded["wav"][0].shape[0] > 0 and np.array_equal(decoded["wav"][0], decoded["flac"][0])
    with wave.open(io.BytesIO(results["wav"])) as w:  # the standard library reads the streamed header too
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)


def test_sse_events_parse_and_end_with_done(server):
    with http(server) as client:
        response = client.post("/v1/audio/speech", json={**SHORT_BODY, "response_format": "pcm",
                                                          "stream_format": "sse"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert len(events) >= 2 and all(e["type"] == "speech.audio.delta" and e["audio"] for e in events[:-1])
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0


def test_auth(server):
    with pytest.raises(openai.AuthenticationError) as err:
        client_for(server, key="wrong").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert "chatterbox" in {m.id for m in client_for(server).models.list()}
    assert httpx.get(server.url + "/v1/voices").status_code == 401


def test_error_statuses_and_bodies(server):
    with pytest.raises(openai.BadRequestError) as err:
        client_for(server).audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="aac")
    assert "pcm" in err.value.message and err.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError):
        client_for(server).audio.speech.create(model="tts-9", voice="alloy", input=TEXT)
    with http(server) as client:
        cases = [(client.post("/v1/audio/speech", content=b"{", headers={"content-type": "application/json"}), 400),
                 (client.post("/v1/audio/speech", json={**BASE, "voice": "nobody"}), 404),
                 (client.post("/v1/audio/speech", json={**BASE, "input": "x" * (2 * 1024 * 1024)}), 413),
                 (client.post("/v1/audio/speech", json={**BASE, "speed": "fast"}), 422),
                 (client.post("/v1/audio/speech", json={**BASE, "speed": 1.25}), 400),
                 (client.post("/v1/voices", files={"file": ("x.wav", b"not audio" * 100)}, data={"name": "x"}), 400)]
    for response, status in cases:
        assert response.status_code == status, response.text
        error_of(response)


def test_full_queue_429_and_disconnect_frees_the_slot(server):
    """Two streams run (the slots), one waits (the queue), a fourth is refused. A client that leaves
    mid-stream frees its slot: the queued request is admitted and completes."""
    got_first = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]
    queued_result = {}

    def run_and_leave(i: int) -> None:
        with http(server) as client:
            with client.stream("POST", "/v1/audio/speech", json={**BASE, "response_format": "pcm"}) as response:
                assert response.status_code == 200
                next(response.iter_raw())
                got_first[i].set()
                leave[i].wait(REQUEST_TIMEOUT_S)

    def queued() -> None:
        with http(server) as client:
            queued_result["response"] = client.post("/v1/audio/speech", json={**SHORT_BODY, "response_format": "pcm"})

    leavers = [threading.Thread(target=run_and_leave, args=(i,)) for i in range(2)]
    for t in leavers:
        t.start()
    wait_for(lambda: metric(server, "chatterbox_active_streams") == 2, "both slots to be taken")
    waiter = threading.Thread(target=queued)
    waiter.start()
    wait_for(lambda: metric(server, "chatterbox_queue_depth") == 1, "the third request to queue")
    with http(server) as client:
        refused = client.post("/v1/audio/speech", json={**BASE, "response_format": "pcm"})
    assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
    assert error_of(refused)["type"] == "rate_limit_error"
    for i in range(2):
        assert got_first[i].wait(REQUEST_TIMEOUT_S), "no first chunk"
        leave[i].set()  # the client leaves mid-stream
    waiter.join(REQUEST_TIMEOUT_S)
    assert queued_result["response"].status_code == 200 and queued_result["response"].content
    for t in leavers:
        t.join(REQUEST_TIMEOUT_S)
    wait_for(lambda: metric(server, "chatterbox_active_streams") == 0, "every slot to be free")
    assert metric(server, 'chatterbox_speech_streams_total{outcome="cancelled"}') >= 1


def test_voice_upload_use_restart_delete(server):
    buf = io.BytesIO()
    from chatterbox.voice import synthetic_reference

    sf.write(buf, synthetic_reference(4.0, 24000, seed=3), 24000, format="WAV")
    with http(server) as client:
        created = client.post("/v1/voices", data={"name": "Ada"}, files={"file": ("ada.wav", buf.getvalue())})
        assert created.status_code == 201, created.text
        voice = created.json()
        used = client.post("/v1/audio/speech", json={**SHORT_BODY, "voice": "Ada", "response_format": "pcm"})
        assert used.status_code == 200 and used.content
    server.stop()
    server.start()
    with http(server) as client:
        listed = client.get("/v1/voices").json()["data"]
        assert [v["id"] for v in listed] == ["default", voice["id"]] and listed[1]["name"] == "Ada"
        again = client.post("/v1/audio/speech", json={**SHORT_BODY, "voice": voice["id"], "response_format": "pcm"})
        assert again.status_code == 200 and again.content == used.content  # same voice, same seed
        assert client.delete(f"/v1/voices/{voice['id']}").json()["deleted"] is True
        assert client.get(f"/v1/voices/{voice['id']}").status_code == 404
        assert [v["id"] for v in client.get("/v1/voices").json()["data"]] == ["default"]
