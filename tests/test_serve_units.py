"""The server's parts without HTTP: admission and placement, audio encoders, the voice store, request
validation, configuration and the ``serve`` command line."""
from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")

from chatterbox.serve.config import ModelSpec, ServerConfig, keys_from_env  # noqa: E402
from chatterbox.serve.encoders import available_formats, make_encoder, wav_stream_header  # noqa: E402
from chatterbox.serve.errors import APIError  # noqa: E402
from chatterbox.serve.pool import EnginePool, QueueFull  # noqa: E402
from chatterbox.serve.protocol import check_values, parse_speech, synthesis_request  # noqa: E402
from chatterbox.serve.voices import VoiceNameTaken, VoiceNotFound, VoiceStore, check_name  # noqa: E402
from conftest import ROOT  # noqa: E402

SR = 24000


class _FakeTTS:
    def __init__(self, device: str = "cpu") -> None:
        self.device = device


# ------------------------------------------------------------------ admission and placement

def test_pool_places_on_least_loaded_engine_and_takes_turns():
    async def run():
        pool = EnginePool([_FakeTTS(), _FakeTTS()], max_concurrent=2, max_queue=0)
        leases = [await pool.acquire() for _ in range(4)]
        assert [lease.slot.index for lease in leases] == [0, 1, 0, 1]
        pool.release(leases[1])  # engine 1 now has one request, engine 0 two
        assert (await pool.acquire()).slot.index == 1
        with pytest.raises(QueueFull):
            await pool.acquire()

    asyncio.run(run())


def test_pool_queue_is_fifo_and_cancel_leaves_it():
    async def run():
        pool = EnginePool([_FakeTTS()], max_concurrent=1, max_queue=2)
        first = await pool.acquire()
        waiting = [asyncio.ensure_future(pool.acquire()) for _ in range(2)]
        await asyncio.sleep(0)
        assert pool.queued == 2
        with pytest.raises(QueueFull):
            await pool.acquire()
        waiting[0].cancel()  # the first waiter gives up: the second moves up
        await asyncio.sleep(0)
        assert pool.queued == 1
        pool.release(first)
        second = await asyncio.wait_for(waiting[1], 1)
        assert pool.active == 1 and pool.queued == 0 and second.queued_s >= 0
        pool.release(second)
        pool.release(second)  # releasing twice is harmless
        assert pool.active == 0

    asyncio.run(run())


def test_pool_release_from_another_thread():
    async def run():
        pool = EnginePool([_FakeTTS()], max_concurrent=1, max_queue=1)
        lease = await pool.acquire()
        waiter = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)
        await asyncio.to_thread(pool.release_threadsafe, lease)
        assert (await asyncio.wait_for(waiter, 1)).slot.index == 0

    asyncio.run(run())


# ------------------------------------------------------------------ encoders

def _tone(n: int, phase: float = 0.0) -> np.ndarray:
    return (0.3 * np.sin(np.arange(n) / 10 + phase)).astype(np.float32)


def _encode(name: str, chunks: list[np.ndarray]) -> list[bytes]:
    enc = make_encoder(name, SR, ServerConfig().ogg_page_latency_ms)
    return [enc.push(c) for c in chunks] + [enc.finish()]


def test_every_format_encodes_here():
    assert set(available_formats(SR, 100.0)) >= {"pcm", "wav"}


def test_pcm_and_wav_are_exact_and_streamed():
    chunks = [_tone(4800, i) for i in range(3)]
    pieces = _encode("pcm", chunks)
    pcm = np.frombuffer(b"".join(pieces), "<i2")
    assert all(pieces[:3]) and pcm.shape[0] == 14400
    np.testing.assert_allclose(pcm / 32767.0, np.concatenate(chunks), atol=1 / 32767)
    wav = _encode("wav", chunks)
    assert wav[0].startswith(wav_stream_header(SR)) and all(wav[:3])
    data, rate = sf.read(io.BytesIO(b"".join(wav)), dtype="int16")
    assert rate == SR and np.array_equal(data, pcm)
    assert _encode("wav", []) == [wav_stream_header(SR)]  # no audio: still a header


@pytest.mark.parametrize("name", ["mp3", "opus", "flac"])
def test_compressed_formats_decode(name):
    if name not in available_formats(SR, 100.0):
        pytest.skip(f"libsndfile cannot encode {name} here")
    chunks = [_tone(SR // 2, i) for i in range(4)]
    pieces = _encode(name, chunks)
    if name != "flac":  # streamed: bytes come out while audio goes in
        assert sum(1 for p in pieces[:4] if p) >= 3
    data, rate = sf.read(io.BytesIO(b"".join(pieces)))
    assert rate == SR and data.shape[0] >= 2 * SR * 0.9


# ------------------------------------------------------------------ voice store

def test_voice_store_round_trip_and_persistence(tmp_path, tiny_tts):
    store = VoiceStore(tmp_path, cache_size=2)
    info = store.create("Alice", tiny_tts.conds, {"filename": "a.wav"})
    assert info.id.startswith("voice_") and store.find("Alice") == info and store.find(info.id) == info
    files = sorted(os.listdir(tmp_path / info.id))
    assert files == ["conds.pt", "voice.json"]
    assert json.loads((tmp_path / info.id / "voice.json").read_text())["name"] == "Alice"
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # no temporary left behind
    with pytest.raises(VoiceNameTaken):
        store.create("Alice", tiny_tts.conds, {})
    again = VoiceStore(tmp_path, cache_size=2)  # a restart, or another replica on the same directory
    assert [v.id for v in again.list()] == [info.id]
    loaded = again.conditionals(info.id)
    assert loaded.t3.speaker_emb.shape == tiny_tts.conds.t3.speaker_emb.shape
    assert store.delete(info.id).name == "Alice"
    assert again.list() == [] and again.find("Alice") is None
    with pytest.raises(VoiceNotFound):
        again.conditionals(info.id)


@pytest.mark.parametrize("bad", ["../etc", "..", "voice_../../x", "/tmp", "voice_0123", "", "default", "voice_%2e%2e"])
def test_voice_ids_cannot_leave_the_directory(tmp_path, bad):
    store = VoiceStore(tmp_path / "voices", cache_size=1)
    with pytest.raises(VoiceNotFound):
        store.get(bad)
    with pytest.raises(VoiceNotFound):
        store.delete(bad)


def test_voice_symlink_out_of_the_directory_is_refused(tmp_path, tiny_tts):
    outside = VoiceStore(tmp_path / "outside", cache_size=1).create("x", tiny_tts.conds, {})
    store = VoiceStore(tmp_path / "voices", cache_size=1)
    os.symlink(tmp_path / "outside" / outside.id, tmp_path / "voices" / outside.id)
    with pytest.raises(VoiceNotFound):
        store.get(outside.id)


def test_interrupted_writes_are_swept_when_stale(tmp_path):
    store = VoiceStore(tmp_path, cache_size=1)
    (tmp_path / ".tmp-voice_0000000000000000").mkdir()
    store.sweep(older_than_s=3600)
    assert (tmp_path / ".tmp-voice_0000000000000000").exists()  # maybe another server writing now
    store.sweep(older_than_s=-1)
    assert not (tmp_path / ".tmp-voice_0000000000000000").exists()


@pytest.mark.parametrize("name,ok", [("Bob", True), (" Bob ", True), ("", False), ("x" * 65, False),
                                     ("a\nb", False), ("default", False), ("voice_0123456789abcdef", False)])
def test_voice_names(name, ok):
    if ok:
        assert check_name(name, 64, ("default",)) == name.strip()
    else:
        with pytest.raises(ValueError):
            check_name(name, 64, ("default",))


# ------------------------------------------------------------------ request validation

BASE = {"model": "chatterbox", "input": "Hello.", "voice": "alloy"}


def _status(body: dict, cfg: ServerConfig | None = None) -> tuple[int, str | None]:
    cfg = cfg or ServerConfig()
    try:
        params = parse_speech(body)
        check_values(params, cfg, ("pcm", "wav"))
        synthesis_request(params, cfg, seed=1)
    except APIError as exc:
        return exc.status, exc.param
    return 200, None


@pytest.mark.parametrize("change,expected", [
    ({}, (200, None)),
    ({"input": 5}, (422, "input")),
    ({"speed": "fast"}, (422, "speed")),
    ({"temperatur": 0.5}, (422, "temperatur")),
    ({"seed": 1.5}, (422, "seed")),
    ({"voice": {"id": "voice_x"}}, (200, None)),
    ({"input": "   "}, (400, "input")),
    ({"input": "x" * 4097}, (400, "input")),
    ({"response_format": "aac"}, (400, "response_format")),
    ({"speed": 1.5}, (400, "speed")),
    ({"stream_format": "chunks"}, (400, "stream_format")),
    ({"temperature": 0}, (400, "temperature")),
    ({"top_p": 2.0}, (400, "top_p")),
    ({"exaggeration": -1}, (400, "exaggeration")),
    ({"seed": -1}, (400, "seed")),
    ({"max_new_tokens": 10 ** 6}, (400, "max_new_tokens")),
])
def test_speech_request_validation(change, expected):
    assert _status({**BASE, **change}) == expected


def test_missing_field_is_422():
    assert _status({"model": "chatterbox", "input": "Hello."}) == (422, "voice")


def test_unsupported_format_lists_the_supported_ones():
    with pytest.raises(APIError) as err:
        check_values(parse_speech({**BASE, "response_format": "aac"}), ServerConfig(), ("pcm", "wav"))
    assert "pcm, wav" in err.value.message


def test_server_cap_and_schedule_reach_the_engine_request():
    cfg = ServerConfig(max_new_tokens=12, chunk_size=(4, 8))
    request = synthesis_request(parse_speech(BASE), cfg, seed=3)
    assert (request.max_new_tokens, request.chunk_size, request.seed) == (12, (4, 8), 3)


# ------------------------------------------------------------------ configuration and CLI

def test_config_checks_its_numbers():
    with pytest.raises(ValueError):
        ServerConfig(max_concurrent=0)
    with pytest.raises(ValueError):
        ServerConfig(chunk_size=(0,))
    with pytest.raises(ValueError):
        ModelSpec(source="local")
    assert keys_from_env({"CHATTERBOX_API_KEYS": "a, b c"}) == ("a", "b", "c")


def test_serve_subcommand_dispatch_and_help(capsys):
    from chatterbox import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--max-concurrent" in out and "--voices-dir" in out and "/v1/audio/speech" in out


def test_serve_bad_option_is_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "chatterbox.cli", "serve", "--max-concurrent", "0",
                           "--voices-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: --max-concurrent must be >= 1, got 0"], proc.stderr


# ------------------------------------------------------------------ model families

class _FamilyTTS(_FakeTTS):
    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family


def test_pool_places_each_request_on_its_family_and_queues_without_blocking_others():
    async def run():
        pool = EnginePool([_FamilyTTS("original"), _FamilyTTS("turbo")], max_concurrent=1, max_queue=4)
        assert pool.families == ("original", "turbo")
        turbo = await pool.acquire("turbo")
        assert turbo.slot.index == 1
        waiting_turbo = asyncio.ensure_future(pool.acquire("turbo"))
        await asyncio.sleep(0)
        original = await asyncio.wait_for(pool.acquire("original"), 1)  # not held up by the turbo waiter
        assert original.slot.index == 0 and pool.queued == 1
        pool.release(original)
        await asyncio.sleep(0)
        assert not waiting_turbo.done()  # an original slot is no use to it
        pool.release(turbo)
        assert (await asyncio.wait_for(waiting_turbo, 1)).slot.index == 1
        with pytest.raises(ValueError, match="nano"):
            await pool.acquire("nano")
        assert [d["model_family"] for d in pool.describe()] == ["original", "turbo"]

    asyncio.run(run())


def test_model_names_per_family():
    cfg = ServerConfig()
    assert [cfg.family_model_name(f) for f in ("original", "turbo", "nano")] == [
        "chatterbox", "chatterbox-turbo", "chatterbox-nano"]
    names = cfg.served_names(("turbo", "original"))
    assert names["chatterbox-turbo"] == "turbo" and names["chatterbox"] == "original"
    assert names["tts-1"] == "turbo" and "chatterbox-nano" not in names  # OpenAI's names: the first family
    with pytest.raises(ValueError):
        ModelSpec(family="large")


def test_requests_get_their_family_defaults():
    cfg = ServerConfig()
    original = synthesis_request(parse_speech(BASE), cfg, seed=1)
    assert (original.exaggeration, original.top_p, original.min_p) == (0.5, 1.0, 0.05)
    turbo = synthesis_request(parse_speech(BASE), cfg, seed=1, family="turbo")
    assert (turbo.exaggeration, turbo.cfg_weight, turbo.top_p, turbo.top_k, turbo.min_p) == (0.0, 0.0, 0.95, 1000, 0.0)
    tuned = synthesis_request(parse_speech({**BASE, "top_p": 0.5, "top_k": 20}), cfg, seed=1, family="nano")
    assert (tuned.top_p, tuned.top_k, tuned.temperature) == (0.5, 20, 0.8)
    assert _status({**BASE, "top_k": -1}) == (400, "top_k")
    assert _status({**BASE, "top_k": 2.5}) == (422, "top_k")


def test_voices_remember_their_family(tmp_path, tiny_tts):
    store = VoiceStore(tmp_path, cache_size=2)
    turbo = store.create("T", tiny_tts.conds, {}, family="turbo")
    assert store.find("T").family == "turbo"
    assert json.loads((tmp_path / turbo.id / "voice.json").read_text())["family"] == "turbo"
    old = store.create("Old", tiny_tts.conds, {})
    meta = tmp_path / old.id / "voice.json"
    raw = json.loads(meta.read_text())
    del raw["family"]  # stored before families existed
    meta.write_text(json.dumps(raw))
    assert VoiceStore(tmp_path, cache_size=2).get(old.id).family == "original"


def _serve_prepare(*argv: str):
    from chatterbox.serve.cli import build_parser, prepare

    return prepare(build_parser().parse_args(list(argv)))


def test_serve_cli_loads_one_spec_per_model(tmp_path):
    from chatterbox.cli_common import UsageError
    from chatterbox.text_vocab_turbo import write_turbo_tokenizer_files

    voices = ("--voices-dir", str(tmp_path / "voices"), "--device", "cpu")
    _, specs = _serve_prepare(*voices)
    assert [(s.family, s.source) for s in specs] == [("original", "synthetic")]
    _, specs = _serve_prepare(*voices, "--model", "turbo", "--model", "original,nano", "--tiny")
    assert [(s.family, s.source) for s in specs] == [("turbo", "tiny"), ("original", "tiny"), ("nano", "tiny")]
    nano = tmp_path / "nano"
    nano.mkdir()
    write_turbo_tokenizer_files(nano)
    for stem in ("t3_nano_v1", "s3gen_meanflow", "ve"):
        (nano / f"{stem}.safetensors").write_bytes(b"")
    _, specs = _serve_prepare(*voices, "--model", "nano", "--ckpt", str(nano))
    assert [(s.family, s.source, s.ckpt) for s in specs] == [("nano", "local", str(nano))]
    for argv, needle in ((("--model", "turbo", "--ckpt", str(nano)), "t3_turbo_v1"),
                         (("--model", "nano", "--model", "original", "--ckpt", str(nano)), "MODEL=DIR"),
                         (("--model", "nano", "--model", "original", "--ckpt", f"nano={nano}"),
                          "no directory for original"),
                         (("--model", "large"), "choose from")):
        with pytest.raises(UsageError, match=needle):
            _serve_prepare(*voices, *argv)


def test_serve_cli_s3gen_batch_reaches_the_engine(tmp_path):
    """``--s3gen-batch`` is checked before anything loads and becomes the engine's S3Gen batch (the
    scheduler renders that many requests' chunks per round)."""
    from chatterbox.cli_common import UsageError
    from chatterbox.serve.loading import load_one

    voices = ("--voices-dir", str(tmp_path / "voices"), "--device", "cpu", "--tiny")
    with pytest.raises(UsageError, match="--s3gen-batch must be >= 1"):
        _serve_prepare(*voices, "--s3gen-batch", "0")
    _, specs = _serve_prepare(*voices, "--opt", "reference+s3gen_scheduling=1", "--s3gen-batch", "4")
    assert specs[0].s3gen_batch == 4
    tts = load_one(specs[0], "cpu")
    assert tts.engine.s3gen_scheduler is not None and tts.engine.s3gen_scheduler.max_batch == 4
