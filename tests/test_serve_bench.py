"""The load benchmark's bookkeeping (a caller playing audio back in real time) and a CPU smoke run."""
from __future__ import annotations

import json

import pytest

from eval.playback import Playback
from eval.serve_bench import capacity, main


def test_playback_counts_underruns_and_pushes_deadlines_back():
    p = Playback(requested_at=0.0)
    p.arrive(0.5, 1.0)  # first audio at 0.5 s: plays until 1.5 s
    assert p.ttfa_s == 0.5 and p.underruns == 0
    p.arrive(1.2, 1.0)  # in time: plays until 2.5 s
    p.arrive(3.0, 0.5)  # 0.5 s late: silence, then plays until 3.5 s
    assert p.underruns == 1 and p.underrun_s == pytest.approx(0.5)
    p.arrive(3.4, 0.5)  # in time against the pushed-back deadline
    assert p.underruns == 1 and p.audio_s == pytest.approx(3.0)
    p.arrive(9.0, 0.0)  # an empty chunk changes nothing
    assert p.underruns == 1


def test_capacity_is_the_largest_clean_row():
    rows = {"1": {"underruns": 0, "ttfa_p95_s": 0.1}, "8": {"underruns": 0, "ttfa_p95_s": 0.25},
            "16": {"underruns": 3, "ttfa_p95_s": 0.2}, "32": {"underruns": 0, "ttfa_p95_s": 0.4}}
    assert capacity(rows, 0.3) == 8
    assert capacity({"1": {"underruns": 1, "ttfa_p95_s": 0.1}}, 0.3) is None


def test_quick_run_writes_a_result(tmp_path):
    stem = tmp_path / "sb"
    assert main(["--quick", "--out", str(stem)]) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    assert set(result["rows"]) == {"1", "2"} and result["rows"]["2"]["requests"] == 2
    assert result["rows"]["1"]["ttfa_p50_s"] > 0 and result["rows"]["1"]["audio_s_per_wall_s"] > 0
    assert stem.with_suffix(".md").read_text().count("|") > 10


def test_quick_run_of_turbo(tmp_path):
    stem = tmp_path / "sb-turbo"
    assert main(["--quick", "--model", "turbo", "--out", str(stem)]) == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["model"] == "turbo" and result["rows"]["1"]["audio_s_per_wall_s"] > 0
    assert stem.with_suffix(".md").read_text().startswith("# serve bench: turbo")


def test_stage_figures_count_what_the_engine_did():
    """The per-level stage figures come from the engine's counters: with S3Gen scheduling on, every
    chunk a stream yields was rendered by the scheduler (a chunk whose audio is still held back by the
    lookahead is rendered and yields nothing), one per round at batch 1."""
    from conftest import make_tiny_tts

    from chatterbox.optim.config import OptConfig
    from eval.serve_bench import engine_counters, stage_figures

    tts = make_tiny_tts(opt=OptConfig.parse("reference+s3gen_scheduling=1"))
    before = engine_counters(tts)
    assert "t3_steps" not in before and before["s3gen_chunks"] == 0
    chunks = list(tts.generate_stream("Hello there.", seed=1, chunk_size=5, max_new_tokens=20, print_metrics=False,
                                      watermark=False))
    after = engine_counters(tts)
    st = stage_figures(before, after, wall_s=2.0)
    rendered = after["s3gen_chunks"] - before["s3gen_chunks"]
    assert rendered >= len(chunks) > 0
    assert st["s3gen_chunks_per_s"] == rendered / 2.0 and st["s3gen_mean_batch"] == 1.0
    assert 0 < st["s3gen_busy"] <= after["s3gen_busy_s"] / 2.0 + 1e-9
