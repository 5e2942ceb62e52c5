"""The server over real HTTP in this process (uvicorn in a thread) with tiny engines: auth, OpenAI error
bodies, streamed formats, SSE, voices, admission (429, queue), disconnects and placement. Engines can
be gated so that each chunk waits for a permit, which makes the concurrency checks deterministic."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from chatterbox.serve.app import create_app  # noqa: E402
from chatterbox.serve.background import BackgroundServer  # noqa: E402
from chatterbox.serve.config import ServerConfig  # noqa: E402
from chatterbox.serve.service import SpeechService  # noqa: E402
from chatterbox.voice import synthetic_reference  # noqa: E402
from conftest import make_tiny_tts  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SPEECH = {"model": "chatterbox", "input": "Hello there, how are you today?", "voice": "default", "seed": 7}
WAIT_S = 60.0
POLL_S = 0.02


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def wait_for(condition, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def wav_bytes(seconds: float = 3.0, sample_rate: int = 24000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, synthetic_reference(seconds, sample_rate), sample_rate, format="WAV")
    return buf.getvalue()


class Gate:
    """Streams wait for one permit per chunk while ``enabled``."""

    def __init__(self) -> None:
        self.enabled = False
        self.permits = threading.Semaphore(0)
        self.chunks = 0
        self.open_streams = 0

    def release(self, n: int = 1000) -> None:
        for _ in range(n):
            self.permits.release()


class GatedTTS:
    """A tiny ``ChatterboxTTS`` whose engine's sessions stream through ``gate``."""

    def __init__(self, tts, gate: Gate) -> None:
        self._tts, self.gate = tts, gate
        self.engine = _GatedEngine(tts.engine, gate)

    def __getattr__(self, name):
        return getattr(self._tts, name)


class _GatedEngine:
    def __init__(self, engine, gate: Gate) -> None:
        self._engine, self._gate = engine, gate

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def session(self, request, conds):
        return _GatedSession(self._engine.session(request, conds), self._gate)


class _GatedSession:
    def __init__(self, session, gate: Gate) -> None:
        self._session, self._gate = session, gate

    def stream(self, log_metrics: bool = False):
        gate = self._gate
        gen = self._session.stream(log_metrics)
        gate.open_streams += 1
        try:
            while True:
                if gate.enabled and not gate.permits.acquire(timeout=WAIT_S):
                    raise TimeoutError("no permit for the next chunk")
                try:
                    item = next(gen)
                except StopIteration:
                    return
                gate.chunks += 1
                yield item
        finally:
            gen.close()
            gate.open_streams -= 1


@pytest.fixture(scope="module")
def tiny_pair():
    return [make_tiny_tts(), make_tiny_tts()]


def config(tmp_path, **changes) -> ServerConfig:
    base = dict(voices_dir=str(tmp_path / "voices"), api_keys=(KEY,), max_new_tokens=24, chunk_size=(4,),
                max_concurrent=2, max_queue=2, max_input_chars=200, max_body_bytes=16 * 1024,
                max_upload_bytes=1024 * 1024, disconnect_poll_s=0.05)
    return ServerConfig(**{**base, **changes})


@contextlib.contextmanager
def running(cfg: ServerConfig, engines, loader=None):
    service = SpeechService(cfg, loader=loader or (lambda: list(engines)))
    with BackgroundServer(create_app(service)) as server:
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
            if loader is None:
                wait_for(lambda: client.get("/health").status_code == 200, "the server to be ready")
            yield service, client


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    with running(config(tmp_path_factory.mktemp("app")), tiny_pair[:1]) as (service, client):
        yield service, client


def speak(client, **changes) -> httpx.Response:
    return client.post("/v1/audio/speech", json={**SPEECH, **changes}, headers=AUTH)


# ------------------------------------------------------------------ auth and errors

def test_health_and_metrics_need_no_key_but_v1_does(server):
    _, client = server
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert "chatterbox_active_streams" in client.get("/metrics").text
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert error_of(response)["code"] == "invalid_api_key"
    models = client.get("/v1/models", headers=AUTH).json()
    assert {"chatterbox", "tts-1"} <= {m["id"] for m in models["data"]}
    assert client.get("/v1/models/tts-1", headers=AUTH).json()["root"] == "chatterbox"


@pytest.mark.parametrize("raw,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({**SPEECH, "model": "gpt-5"}).encode(), 404, "model"),
    (json.dumps({**SPEECH, "voice": "nobody"}).encode(), 404, "voice"),
    (json.dumps({**SPEECH, "input": "x" * 201}).encode(), 400, "input"),
    (json.dumps({**SPEECH, "input": ""}).encode(), 400, "input"),
    (json.dumps({**SPEECH, "input": "\u4f60\u597d"}).encode(), 400, "input"),
    (json.dumps({**SPEECH, "response_format": "aac"}).encode(), 400, "response_format"),
    (json.dumps({**SPEECH, "speed": 2.0}).encode(), 400, "speed"),
    (json.dumps({**SPEECH, "min_p": 3.0}).encode(), 400, "min_p"),
    (json.dumps({**SPEECH, "max_new_tokens": 25}).encode(), 400, "max_new_tokens"),
    (json.dumps({**SPEECH, "temperature": "hot"}).encode(), 422, "temperature"),
    (json.dumps({**SPEECH, "volume": 11}).encode(), 422, "volume"),
    (json.dumps({"model": "chatterbox", "voice": "default"}).encode(), 422, "input"),
    (json.dumps({**SPEECH, "input": "x" * 20000}).encode(), 413, None),
])
def test_bad_requests_get_openai_error_bodies(server, raw, status, param):
    _, client = server
    response = client.post("/v1/audio/speech", content=raw, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == status, response.text
    assert error_of(response)["param"] == param


def test_unknown_route_and_method_use_the_error_body_too(server):
    _, client = server
    assert error_of(client.get("/v1/nothing", headers=AUTH))["type"] == "invalid_request_error"
    assert client.get("/v1/audio/speech", headers=AUTH).status_code == 405


# ------------------------------------------------------------------ audio

def test_pcm_streams_in_pieces_and_a_seed_repeats(server):
    _, client = server
    bodies = []
    for _ in range(2):
        pieces = []
        with client.stream("POST", "/v1/audio/speech", json={**SPEECH, "response_format": "pcm"},
                           headers=AUTH) as response:
            assert response.status_code == 200 and response.headers["content-type"] == "audio/pcm"
            assert response.headers["x-chatterbox-seed"] == "7"
            pieces = [p for p in response.iter_raw() if p]
        assert len(pieces) >= 2
        bodies.append(b"".join(pieces))
    assert len(bodies[0]) % 2 == 0 and len(bodies[0]) > 0 and bodies[0] == bodies[1]


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_formats_decode(server, fmt):
    service, client = server
    if fmt not in service.formats:
        pytest.skip(f"libsndfile cannot encode {fmt} here")
    pcm = speak(client, response_format="pcm").content
    response = speak(client, response_format=fmt)
    assert response.status_code == 200
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == 24000 and audio.ndim == 1
    if fmt in ("wav", "flac"):  # lossless: the same samples as pcm
        np.testing.assert_array_equal((audio * 32768).round().astype(np.int16), np.frombuffer(pcm, "<i2"))


def test_sse_events_end_with_done_and_usage(server):
    _, client = server
    response = speak(client, response_format="pcm", stream_format="sse")
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) >= 2
    assert events[-1]["type"] == "speech.audio.done"
    usage = events[-1]["usage"]
    assert usage["input_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert audio == speak(client, response_format="pcm").content


def test_instructions_are_accepted_and_flagged(server):
    _, client = server
    response = speak(client, response_format="pcm", instructions="Speak like a pirate.")
    assert response.status_code == 200 and "ignored" in response.headers["x-chatterbox-instructions"]
    assert "x-chatterbox-instructions" not in speak(client, response_format="pcm").headers


# ------------------------------------------------------------------ voices

def upload(client, name: str | None, data: bytes, filename: str = "ref.wav", field: str = "file"):
    fields = {"name": name} if name is not None else {}
    return client.post("/v1/voices", data=fields, files={field: (filename, data, "audio/wav")}, headers=AUTH)


def test_voice_lifecycle_and_openai_name_override(server):
    service, client = server
    created = upload(client, "Narrator", wav_bytes())
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["id"].startswith("voice_") and voice["source"]["sample_rate"] == 24000
    listed = client.get("/v1/voices", headers=AUTH).json()["data"]
    assert [v["id"] for v in listed] == ["default", voice["id"]]
    assert client.get(f"/v1/voices/{voice['id']}", headers=AUTH).json()["name"] == "Narrator"
    default_pcm = speak(client, response_format="pcm", voice="alloy").content
    by_id = speak(client, response_format="pcm", voice=voice["id"]).content
    assert by_id == speak(client, response_format="pcm", voice="Narrator").content != default_pcm
    assert speak(client, response_format="pcm", voice={"id": voice["id"]}).content == by_id
    alloy = upload(client, "alloy", wav_bytes(2.5), field="audio_sample").json()  # shadows OpenAI's "alloy"
    assert speak(client, response_format="pcm", voice="alloy").content != default_pcm
    for v in (voice, alloy):
        assert client.delete(f"/v1/voices/{v['id']}", headers=AUTH).json() == {
            "id": v["id"], "object": "voice.deleted", "deleted": True}
    assert speak(client, response_format="pcm", voice="alloy").content == default_pcm
    assert error_of(client.get(f"/v1/voices/{voice['id']}", headers=AUTH))["code"] == "voice_not_found"
    assert speak(client, voice=voice["id"]).status_code == 404
    assert client.delete("/v1/voices/default", headers=AUTH).status_code == 400
    assert client.get("/v1/voices/..%2F..%2Fetc", headers=AUTH).status_code == 404


@pytest.mark.parametrize("name,data,status,param", [
    ("bad", b"this is not audio at all" * 10, 400, "file"),
    ("short", None, 400, "file"),
    (None, b"RIFF", 400, "name"),
    ("default", None, 400, "name"),
    ("big", b"\0" * (1024 * 1024 + 1), 413, None),
])
def test_bad_uploads_store_nothing(server, name, data, status, param):
    service, client = server
    data = wav_bytes(0.2) if data is None and name == "short" else data if data is not None else wav_bytes()
    before = sorted(p.name for p in service.voices.root.iterdir())
    response = upload(client, name, data)
    assert response.status_code == status, response.text
    assert error_of(response)["param"] == param
    assert sorted(p.name for p in service.voices.root.iterdir()) == before


def test_duplicate_names_conflict_and_json_uploads_are_refused(server):
    _, client = server
    first = upload(client, "Twin", wav_bytes()).json()
    assert upload(client, "Twin", wav_bytes()).status_code == 409
    assert client.post("/v1/voices", json={"name": "x"}, headers=AUTH).status_code == 400
    client.delete(f"/v1/voices/{first['id']}", headers=AUTH)


# ------------------------------------------------------------------ admission, disconnects, placement

def test_full_queue_is_429_with_retry_after(tiny_pair, tmp_path):
    gate = Gate()
    with running(config(tmp_path, max_concurrent=1, max_queue=1), [GatedTTS(tiny_pair[0], gate)]) as (service, client):
        gate.enabled = True
        results = {}

        def run(name):
            results[name] = speak(client, response_format="pcm")

        threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
        threads[0].start()
        wait_for(lambda: service.pool.active == 1, "the first request to start")
        threads[1].start()
        wait_for(lambda: service.pool.queued == 1, "the second request to queue")
        refused = speak(client, response_format="pcm")
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert error_of(refused)["type"] == "rate_limit_error"
        gate.release()
        for t in threads:
            t.join(WAIT_S)
        assert [results[n].status_code for n in ("a", "b")] == [200, 200]
        assert 'chatterbox_requests_total{endpoint="/v1/audio/speech",method="POST",status="429"} 1.0' in \
            client.get("/metrics").text


def test_disconnect_mid_stream_frees_the_slot_within_one_chunk(tiny_pair, tmp_path):
    gate = Gate()
    with running(config(tmp_path, max_concurrent=1, max_queue=0), [GatedTTS(tiny_pair[0], gate)]) as (service, client):
        gate.enabled = True
        gate.release(1)
        with client.stream("POST", "/v1/audio/speech", json={**SPEECH, "response_format": "pcm"},
                           headers=AUTH) as response:
            assert next(response.iter_raw())  # the first chunk arrived; the next waits at the gate
            workers = list(service._live)
        wait_for(lambda: all(w.cancelled for w in workers), "the server to notice the disconnect")
        made = gate.chunks
        gate.release()
        wait_for(lambda: service.pool.active == 0 and gate.open_streams == 0, "the slot to be freed")
        assert gate.chunks - made <= 1
        gate.enabled = False
        assert speak(client, response_format="pcm").status_code == 200  # the next request is admitted
        assert 'chatterbox_speech_streams_total{outcome="cancelled"} 1.0' in client.get("/metrics").text


def test_a_client_leaving_the_queue_frees_its_place(tiny_pair, tmp_path):
    gate = Gate()
    with running(config(tmp_path, max_concurrent=1, max_queue=1), [GatedTTS(tiny_pair[0], gate)]) as (service, client):
        gate.enabled = True
        first = threading.Thread(target=speak, args=(client,))
        first.start()
        wait_for(lambda: service.pool.active == 1, "the first request to start")
        with httpx.Client(base_url=str(client.base_url), timeout=0.5) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                impatient.post("/v1/audio/speech", json=SPEECH, headers=AUTH)
        wait_for(lambda: service.pool.queued == 0, "the queued request to leave")
        gate.release()
        first.join(WAIT_S)


def test_requests_go_to_the_least_loaded_engine(tiny_pair, tmp_path):
    gates = [Gate(), Gate()]
    engines = [GatedTTS(tts, gate) for tts, gate in zip(tiny_pair, gates, strict=True)]
    with running(config(tmp_path, max_concurrent=1, max_queue=2), engines) as (service, client):
        for gate in gates:
            gate.enabled = True
        seen = []

        def run():
            with client.stream("POST", "/v1/audio/speech", json={**SPEECH, "response_format": "pcm"},
                               headers=AUTH) as response:
                seen.append(response.headers["x-chatterbox-engine"])
                b"".join(response.iter_raw())

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: len(seen) == 2, "both requests to start")
        assert sorted(seen) == ["cpu#0", "cpu#1"]
        assert [s.active for s in service.pool.slots] == [1, 1]
        for gate in gates:
            gate.release()
        for t in threads:
            t.join(WAIT_S)
        assert service.pool.active == 0


def test_concurrent_requests_on_one_engine_both_complete(server):
    _, client = server
    results = []
    threads = [threading.Thread(target=lambda: results.append(speak(client, response_format="pcm")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert [r.status_code for r in results] == [200, 200]
    assert results[0].content == results[1].content  # same seed, same audio, though run at once


# ------------------------------------------------------------------ loading

def test_not_ready_until_loaded_and_warmed_up(tiny_pair, tmp_path):
    release = threading.Event()

    def slow_loader():
        release.wait(WAIT_S)
        return tiny_pair[:1]

    with running(config(tmp_path), None, loader=slow_loader) as (service, client):
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        refused = speak(client)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert error_of(refused)["code"] == "model_not_ready"
        release.set()
        wait_for(lambda: client.get("/health").status_code == 200, "the model to load")
        assert speak(client, response_format="pcm").status_code == 200


# ------------------------------------------------------------------ several model families

@pytest.fixture(scope="module")
def families_server(tiny_pair, tmp_path_factory):
    from conftest import make_tiny_turbo_tts

    engines = [tiny_pair[0], make_tiny_turbo_tts()]
    with running(config(tmp_path_factory.mktemp("families")), engines) as (service, client):
        yield service, client


def test_models_are_listed_and_routed_by_name(families_server):
    service, client = families_server
    models = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert {"chatterbox", "chatterbox-turbo", "tts-1"} <= set(models) and "chatterbox-nano" not in models
    assert models["chatterbox-turbo"]["family"] == "turbo" and models["tts-1"]["root"] == "chatterbox"
    assert client.get("/health").json()["models"] == ["chatterbox", "chatterbox-turbo"]
    turbo = speak(client, model="chatterbox-turbo", response_format="pcm")
    assert turbo.status_code == 200 and turbo.headers["x-chatterbox-engine"] == "cpu#1"
    original = speak(client, model="chatterbox", response_format="pcm")
    assert original.status_code == 200 and original.headers["x-chatterbox-engine"] == "cpu#0"
    assert speak(client, model="tts-1", response_format="pcm").content == original.content
    missing = speak(client, model="chatterbox-nano")
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"
    assert "chatterbox-turbo" in error_of(missing)["message"]
    assert client.get("/v1/models/chatterbox-nano", headers=AUTH).status_code == 404


def test_voices_belong_to_the_model_that_made_them(families_server):
    service, client = families_server
    fields = {"name": "TurboVoice", "model": "chatterbox-turbo"}
    created = client.post("/v1/voices", data=fields, files={"file": ("r.wav", wav_bytes(6.0), "audio/wav")},
                          headers=AUTH)
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["family"] == "turbo"
    try:
        assert speak(client, model="chatterbox-turbo", voice="TurboVoice", response_format="pcm").status_code == 200
        wrong = speak(client, model="chatterbox", voice=voice["id"])
        assert wrong.status_code == 400 and error_of(wrong)["code"] == "voice_model_mismatch"
        assert error_of(wrong)["param"] == "voice" and "chatterbox-turbo" in error_of(wrong)["message"]
        short = client.post("/v1/voices", data={"name": "Short", "model": "chatterbox-turbo"},
                            files={"file": ("r.wav", wav_bytes(3.0), "audio/wav")}, headers=AUTH)
        assert short.status_code == 400 and "5 s" in error_of(short)["message"]
        unknown = client.post("/v1/voices", data={"name": "X", "model": "gpt-5"},
                              files={"file": ("r.wav", wav_bytes(3.0), "audio/wav")}, headers=AUTH)
        assert unknown.status_code == 404 and error_of(unknown)["param"] == "model"
        default = client.post("/v1/voices", data={"name": "Plain"}, files={"file": ("r.wav", wav_bytes(), "audio/wav")},
                              headers=AUTH).json()
        assert default["family"] == "original"  # no model named: the default (first) model's front end
        client.delete(f"/v1/voices/{default['id']}", headers=AUTH)
        builtin = client.get("/v1/voices/default", headers=AUTH).json()
        assert builtin["source"]["models"] == ["chatterbox", "chatterbox-turbo"] and builtin["family"] is None
    finally:
        client.delete(f"/v1/voices/{voice['id']}", headers=AUTH)
