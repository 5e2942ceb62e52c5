"""The ``chatterbox-tts`` entry point: bad input is one ``error:`` line before the model loads, no output
file is left behind on failure, ``--help`` documents the options, long input reports progress."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox import cli, cli_output
from conftest import ROOT

TWO_SEGMENTS = (  # two sentences of ~170 synthetic text tokens each: two segments of at most 300
    "The quick brown fox jumps over the lazy dog while the small cat watches from the old wooden fence "
    "near the garden gate, and the quick brown fox jumps over the lazy dog while the small cat watches "
    "from the old wooden fence near the garden gate. The slow brown fox jumps over the lazy dog while the "
    "small cat watches from the old wooden fence near the garden gate, and the slow brown fox jumps over "
    "the lazy dog while the small cat watches from the old wooden fence near the garden gate \U0001F600."
)


def run_cli(*args: str, cwd: Path, stdin: str | None = None, script: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "chatterbox.cli"]
    return subprocess.run([*command, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error(proc: subprocess.CompletedProcess, *needles: str, status: int = 2) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def workdir(tmp_path):
    """An empty working directory; the CLI's default output (out.wav) would land here."""
    work = tmp_path / "work"
    work.mkdir()
    return work


# ------------------------------------------------------------------ validation before the model loads

def test_missing_output_directory(workdir):
    proc = run_cli("Hello.", "-o", str(workdir / "missing" / "x.wav"), cwd=workdir)
    assert_one_error(proc, "output directory", "does not exist")
    assert files_in(workdir) == set()


@pytest.mark.parametrize("seed", ["-1", "1" * 23, str(2**63)])
def test_seed_out_of_range(workdir, seed):
    proc = run_cli("Hello.", "--seed", seed, cwd=workdir)
    assert_one_error(proc, "--seed", seed)
    assert files_in(workdir) == set()


def test_seed_not_a_number(workdir):
    assert_one_error(run_cli("Hello.", "--seed", "abc", cwd=workdir), "--seed")


def test_max_new_tokens_zero(workdir):
    proc = run_cli("Hello.", "--max-new-tokens", "0", cwd=workdir)
    assert_one_error(proc, "--max-new-tokens", "per text segment")
    assert files_in(workdir) == set()


def test_text_file_renamed_wav_as_voice(workdir, tmp_path):
    fake = tmp_path / "voice.wav"
    fake.write_text("this is not audio\n" * 50)
    proc = run_cli("Hello.", "--voice", str(fake), cwd=workdir)
    assert_one_error(proc, "--voice", "not a readable audio file")
    assert files_in(workdir) == set()


def test_missing_voice_file(workdir):
    assert_one_error(run_cli("Hello.", "--voice", "nope.wav", cwd=workdir), "--voice", "not found")


def test_bad_opt_spec(workdir):
    proc = run_cli("Hello.", "--opt", "reference+t3.dtype=int3", cwd=workdir)
    assert_one_error(proc, "--opt")
    assert_one_error(run_cli("Hello.", "--opt", "turbo", cwd=workdir), "--opt", "turbo")


def test_valid_opt_spec_passes_validation(workdir, tmp_path):
    # validation goes on past --opt and stops at the (deliberately missing) checkpoint directory
    proc = run_cli("Hello.", "--opt", "reference+t3.dtype=bf16", "--ckpt", str(tmp_path / "no_ckpt"), cwd=workdir)
    line = assert_one_error(proc, "checkpoint", "no_ckpt")
    assert "--opt" not in line
    assert files_in(workdir) == set()


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--cfg-weight", "-1"], "--cfg-weight"),
    (["--exaggeration", "-0.5"], "--exaggeration"),
    (["--chunk-size", "10,0"], "--chunk-size"),
    (["--chunk-size", "ten"], "--chunk-size"),
    (["--context-window", "-1"], "--context-window"),
    (["--raw", "-o", "x.wav"], "--raw"),
    (["-o", "out.unknownformat"], "audio format"),
    (["--ckpt", ".", "--pretrained"], "--pretrained"),
])
def test_option_ranges(workdir, flags, needle):
    assert_one_error(run_cli("Hello.", *flags, cwd=workdir), needle)
    assert files_in(workdir) == set()


def test_output_directory_not_writable(workdir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        assert_one_error(run_cli("Hello.", "-o", str(locked / "x.wav"), cwd=workdir), "cannot write")
    finally:
        locked.chmod(0o700)


def test_empty_text_from_stdin(workdir):
    assert_one_error(run_cli("-", cwd=workdir, stdin="  \n"), "no text")


def test_text_with_nothing_encodable(workdir):
    proc = run_cli("\u4f60\u597d\u3002 \U0001F600", cwd=workdir)
    assert_one_error(proc, "English only", "'\u4f60' (U+4F60)", "U+1F600")
    assert files_in(workdir) == set()


def test_debug_shows_the_traceback(workdir):
    proc = run_cli("Hello.", "--seed", "-1", "--debug", cwd=workdir)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and proc.stderr.splitlines()[-1].startswith("error: --seed")


# ------------------------------------------------------------------ help

def _flat(text: str) -> str:
    return " ".join(text.split())


def test_help_documents_every_option_with_defaults(workdir):
    proc = run_cli("--help", cwd=workdir)
    assert proc.returncode == 0 and proc.stderr == ""
    text = _flat(proc.stdout)
    assert "per text SEGMENT" in text and "one after another" in text
    for shown in ("(default: 1000)", "(default: 25)", "(default: 50)", "(default: reference)",
                  "(default: cuda when available, else cpu)", "(default: out.wav)", "(default: 0.8)"):
        assert shown in text, shown
    parser = cli.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, action.dest
        if action.option_strings and action.nargs != 0:  # options that take a value show their default
            assert "default" in formatter._get_help_string(action), action.dest


def test_stream_demo_help_describes_the_demo(workdir):
    proc = run_cli("--help", cwd=workdir, script=ROOT / "scripts" / "stream_demo.py")
    assert proc.returncode == 0
    text = _flat(proc.stdout)
    assert text.startswith("usage: stream_demo.py")
    assert "Streaming demo" in text and "time to first audio" in text and "per-chunk" in text
    assert "Chatterbox text-to-speech (chatterbox-fast): speak a text" not in text
    assert "--stream " not in text  # always on in the demo


# ------------------------------------------------------------------ output file and progress (no model)

class _FakeTTS:
    """Stands in for ChatterboxTTS: two segments, half a second of audio each, or a failure."""

    sr = 24000
    synthetic = True
    conds = "built-in voice"

    def __init__(self, tokenizer, fail_at: int | None = None, samples: int = 12000) -> None:
        self.tokenizer = tokenizer
        self.fail_at = fail_at
        self.samples = samples
        self.calls = []

    def text_segments(self, text):
        return ["First segment.", "Second segment."]

    def generate(self, text, **kwargs):
        self.calls.append((text, kwargs))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("synthesis blew up")
        return torch.full((1, self.samples), 0.1)


@pytest.fixture
def fake_tts(monkeypatch, tmp_path):
    from chatterbox.text import EnTokenizer
    from chatterbox.text_vocab import write_tokenizer_json

    tokenizer = EnTokenizer(write_tokenizer_json(tmp_path / "tokenizer.json"))

    def install(**kwargs):
        tts = _FakeTTS(tokenizer, **kwargs)
        monkeypatch.setattr(cli, "load_tts", lambda args: tts)
        return tts

    return install


def test_failure_during_synthesis_leaves_no_file(fake_tts, workdir, capsys):
    tts = fake_tts(fail_at=2)
    status = cli.main(["Two. Segments.", "-o", str(workdir / "out.wav"), "--seed", "3"])
    assert status == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert "synthesis blew up" in lines[-1]
    assert len(tts.calls) == 2  # the first segment was written to the temporary file, then dropped
    assert files_in(workdir) == set()


def test_no_audio_is_an_error_not_an_empty_file(fake_tts, workdir, capsys):
    fake_tts(samples=0)
    assert cli.main(["Hello.", "-o", str(workdir / "out.wav")]) == 1
    assert "no audio was produced" in capsys.readouterr().err
    assert files_in(workdir) == set()


def test_segments_share_the_seed_and_progress_is_logged(fake_tts, workdir, caplog):
    tts = fake_tts()
    with caplog.at_level(logging.INFO, logger="chatterbox.cli"):
        assert cli.main(["Two. Segments.", "-o", str(workdir / "a.wav"), "--seed", "5",
                         "--max-new-tokens", "7"]) == 0
    assert [t for t, _ in tts.calls] == ["First segment.", "Second segment."]
    assert all(kw["seed"] == 5 and kw["max_new_tokens"] == 7 for _, kw in tts.calls)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("segment 1/2 done: 0.5 s of audio") for m in messages), messages
    assert any(m.startswith("segment 2/2 done: 1.0 s of audio") for m in messages), messages
    assert any("not speech" in m for m in messages)
    assert files_in(workdir) == {"a.wav"}
    with wave.open(str(workdir / "a.wav")) as w:
        assert (w.getframerate(), w.getnframes(), w.getsampwidth()) == (24000, 24000, 2)
    umask = os.umask(0)
    os.umask(umask)
    assert (workdir / "a.wav").stat().st_mode & 0o777 == 0o666 & ~umask


def test_progress_bar_on_a_terminal():
    class Tty:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    out = Tty()
    bar = cli_output.Progress(4, stream=out)
    bar.update(1, 0.0)
    bar.update(1, 2.5, finished=True)
    bar.close()
    assert "\r[" in out.text and "segment 1/4, 2.5 s of audio" in out.text and out.text.endswith("\n")
    quiet = Tty()
    cli_output.Progress(1, stream=quiet).update(1, 1.0, finished=True)  # one segment: nothing to show
    assert quiet.text == ""


def test_audio_sink_renames_on_success_and_discards_on_failure(tmp_path):
    with cli_output.AudioSink(24000, tmp_path / "a.flac", raw=False) as sink:
        sink.write(np.zeros(100, dtype=np.float32))
        assert files_in(tmp_path) != {"a.flac"} and not (tmp_path / "a.flac").exists()
    assert files_in(tmp_path) == {"a.flac"}
    with pytest.raises(RuntimeError):
        with cli_output.AudioSink(24000, tmp_path / "b.wav", raw=False) as sink:
            sink.write(np.zeros(100, dtype=np.float32))
            raise RuntimeError("boom")
    assert files_in(tmp_path) == {"a.flac"}


# ------------------------------------------------------------------ synthetic checkpoint directories

def test_synthetic_checkpoint_directory_warns_when_loaded(tmp_path, caplog):
    from chatterbox.checkpoint import CheckpointError, is_synthetic_checkpoint
    from chatterbox.loader import load_models_from_dir

    assert not is_synthetic_checkpoint(tmp_path)
    (tmp_path / "SYNTHETIC.txt").write_text("not speech\n")
    assert is_synthetic_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError):
        load_models_from_dir(tmp_path, torch.device("cpu"))  # no weights here: fails after the warning
    assert any("NOT speech" in r.getMessage() and str(tmp_path) in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ one real synthesis

@pytest.mark.full_size
def test_synthesis_through_the_cli(workdir):
    proc = run_cli(TWO_SEGMENTS, "-o", "speech.wav", "--max-new-tokens", "3", "--seed", "1",
                   "--opt", "reference+cfm_steps=2", "--no-watermark", cwd=workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert re.search(r"segment 1/2 done: [\d.]+ s of audio so far", err), err
    assert re.search(r"segment 2/2 done: [\d.]+ s of audio so far", err), err
    assert "U+1F600" in err and "English only" in err  # the emoji was dropped, with a word
    assert "reminder: synthetic checkpoint" in err
    assert "error" not in err.lower()
    assert files_in(workdir) == {"speech.wav"}
    with wave.open(str(workdir / "speech.wav")) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0


# ------------------------------------------------------------------ --model (Chatterbox-Turbo and Nano)

def _turbo_ckpt(folder: Path, nano: bool = False) -> Path:
    """A directory that passes the checks before loading (the weights files are empty: never read here)."""
    from chatterbox.text_vocab_turbo import write_turbo_tokenizer_files

    folder.mkdir()
    write_turbo_tokenizer_files(folder)
    for stem in ("t3_nano_v1" if nano else "t3_turbo_v1", "s3gen_meanflow", "ve"):
        (folder / f"{stem}.safetensors").write_bytes(b"")
    (folder / "conds.pt").write_bytes(b"")
    return folder


@pytest.mark.parametrize("flags, family, ckpt, pretrained", [
    ([], "original", False, False),
    (["--model", "turbo", "--pretrained"], "turbo", False, True),
    (["--model", "nano"], "nano", False, False),
    (["--model", "nano", "--ckpt", "CKPT"], "nano", True, False),
])
def test_model_option_picks_the_family_loader(monkeypatch, workdir, tmp_path, flags, family, ckpt, pretrained):
    from chatterbox import family as families

    ckpt_dir = _turbo_ckpt(tmp_path / "ckpt", nano=True) if ckpt else None
    flags = [str(ckpt_dir) if f == "CKPT" else f for f in flags]
    calls = []

    def fake_load(name, device, opt=None, ckpt=None, pretrained=False, salt=0):
        calls.append((name, ckpt, pretrained))
        return _FakeTTS(families.tokenizer(name, None))

    monkeypatch.setattr(families, "load", fake_load)
    assert cli.main(["Hello [laugh] there.", "-o", str(workdir / "a.wav"), "--seed", "1", *flags]) == 0
    assert calls == [(family, ckpt_dir, pretrained)]


def test_turbo_defaults_and_ignored_options(monkeypatch, workdir, caplog):
    from chatterbox import family as families

    fakes = []

    def fake_load(name, device, opt=None, ckpt=None, pretrained=False, salt=0):
        fakes.append(_FakeTTS(families.tokenizer(name, None)))
        return fakes[-1]

    monkeypatch.setattr(families, "load", fake_load)
    assert cli.main(["Hi.", "-o", str(workdir / "a.wav"), "--model", "turbo"]) == 0
    assert all(kw["exaggeration"] == 0.0 and kw["cfg_weight"] == 0.0 for _, kw in fakes[0].calls)
    with caplog.at_level(logging.WARNING, logger="chatterbox.cli"):
        assert cli.main(["Hi.", "-o", str(workdir / "b.wav"), "--model", "nano", "--cfg-weight", "0.7"]) == 0
    assert any("--cfg-weight is ignored by --model nano" in r.getMessage() for r in caplog.records)
    assert cli.main(["Hi.", "-o", str(workdir / "c.wav")]) == 0  # the original model keeps its own defaults
    assert all(kw["exaggeration"] == 0.5 and kw["cfg_weight"] == 0.5 for _, kw in fakes[-1].calls)


def test_turbo_text_check_uses_the_byte_level_tokenizer():
    text = "\u4f60\u597d \U0001F600 [laugh] caf\u00e9"
    assert cli.prepare(cli.build_parser().parse_args([text, "--model", "turbo"])) == text  # everything encodes
    with pytest.raises(cli.UsageError, match="English only"):
        cli.prepare(cli.build_parser().parse_args(["\u4f60\u597d", "--model", "original"]))


def test_turbo_checkpoint_and_voice_checks(tmp_path):
    from chatterbox.cli_common import check_voice

    turbo_dir = _turbo_ckpt(tmp_path / "turbo")
    args = cli.build_parser().parse_args(["Hi.", "--model", "turbo", "--ckpt", str(turbo_dir)])
    assert cli.prepare(args) == "Hi."
    args = cli.build_parser().parse_args(["Hi.", "--model", "nano", "--ckpt", str(turbo_dir)])
    with pytest.raises(cli.UsageError, match="t3_nano_v1"):
        cli.prepare(args)
    (turbo_dir / "merges.txt").unlink()
    with pytest.raises(cli.UsageError, match="merges.txt"):
        cli.prepare(cli.build_parser().parse_args(["Hi.", "--model", "turbo", "--ckpt", str(turbo_dir)]))
    import soundfile as sf

    from chatterbox.voice import synthetic_reference

    short = tmp_path / "short.wav"
    sf.write(str(short), synthetic_reference(3.0, 24000), 24000)
    check_voice(short, "original")
    with pytest.raises(cli.UsageError, match="longer than 5 s"):
        check_voice(short, "turbo")


@pytest.mark.full_size
def test_nano_synthesis_through_the_cli(workdir):
    proc = run_cli("Hello there [chuckle] \U0001F600.", "-o", "nano.wav", "--model", "nano", "--max-new-tokens", "6",
                   "--seed", "1", "--stream", "--chunk-size", "4", "--no-watermark", cwd=workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "reminder: synthetic checkpoint" in proc.stderr and "English only" not in proc.stderr
    with wave.open(str(workdir / "nano.wav")) as w:
        assert w.getframerate() == 24000 and w.getnframes() > 0
