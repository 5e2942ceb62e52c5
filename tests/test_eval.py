"""The A/B harness (eval/) and the patch-table generator: statistics, tables, upstream isolation,
and the --quick smoke run on the full-size synthetic checkpoint."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from eval import ab, report, stages, upstream  # noqa: E402
from eval.texts import TEXT_SETS, text_cases  # noqa: E402

import patch_tables  # noqa: E402


def fake_result(ref_t3=(2.0, 2.2, 1.8), fast_t3=(0.5, 0.4, 0.6), tokens=100) -> dict:
    """Two configs, two texts, three reps, with round numbers whose summary is known."""
    samples = []
    for name, t3s, ttfa in (("reference", ref_t3, 0.5), ("fast", fast_t3, 0.1)):
        for rep, t3 in enumerate(t3s):
            for text in ("short", "long"):
                samples.append({"kind": "synth", "config": name, "rep": rep, "text": text, "total_s": t3 + 0.5,
                                "audio_s": 4.0, "t3_tokens": tokens, "t3_tokens_exact": True,
                                "t3_prefill_s": 0.05, "flow_encoder_s": 0.1,
                                "stages": {"conditionals": 0.0, "t3": t3, "flow": 0.3, "hift": 0.2}})
                samples.append({"kind": "stream", "config": name, "rep": rep, "text": text,
                                "ttfa_s": ttfa * (1 + rep), "total_s": t3 + 1.0, "audio_s": 4.0, "chunks": 4})
            samples.append({"kind": "conds", "config": name, "rep": rep, "prepare_conditionals_s": 0.09})
            peak = 4.0 if name == "reference" else 2.0
            samples.append({"kind": "memory", "config": name, "rep": rep, "peak_mem_gb": peak})
    return {
        "env": {"device_name": "Test GPU", "torch": "2.9.1", "git_commit": "0123456789abcdef"},
        "checkpoint": {"kind": "synthetic"},
        "settings": {"reps": 3, "seed": 0, "text_sets": {"short": {}, "long": {}}},
        "configs": [{"name": "reference"}, {"name": "fast"}],
        "samples": samples,
        "fidelity": {"reference": {"long": {"token_agreement": 1.0, "wav_snr_db": math.inf, "mel_snr_db": math.inf}},
                     "fast": {"long": {"token_agreement": 0.25, "wav_snr_db": 31.5, "mel_snr_db": 40.0}}},
        "notes": [],
    }


# ------------------------------------------------------------------------------------- statistics
def test_snr_and_token_agreement():
    x = torch.linspace(-1, 1, 1000)
    assert stages.snr_db(x, x) == math.inf
    noise = 0.01 * torch.ones(1000)
    expected = 10 * math.log10(float((x.double() ** 2).sum()) / float((noise.double() ** 2).sum()))
    assert stages.snr_db(x, x + noise) == pytest.approx(expected, abs=1e-3)
    assert stages.snr_db(x, torch.cat([x + noise, torch.ones(7)])) == pytest.approx(expected, abs=1e-3)
    a = torch.tensor([1, 2, 3, 4])
    assert stages.token_agreement(a, a) == 1.0
    assert stages.token_agreement(a, torch.tensor([1, 2, 9, 4])) == 0.75
    assert stages.token_agreement(a, torch.tensor([1, 2])) == 0.5  # missing positions disagree
    assert stages.token_agreement(torch.tensor([]), torch.tensor([])) == 1.0


def test_percentiles_use_numpy_and_skip_missing_values():
    vals = [0.1, 0.2, 0.3, 0.4, None, 10.0]
    assert report.p50(vals) == pytest.approx(np.median([0.1, 0.2, 0.3, 0.4, 10.0]))
    assert report.p95(vals) == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4, 10.0], 95))
    assert math.isnan(report.p50([]))
    assert report.num("inf") == math.inf and math.isnan(report.num(None))


def test_summary_headlines_and_ratios():
    res = fake_result()
    summary = report.summarize(res)
    ref, fast = summary["reference"], summary["fast"]
    assert ref["t3_tokens_per_s"] == pytest.approx(100 / 2.0)
    assert fast["t3_tokens_per_s"] == pytest.approx(100 / 0.5)
    assert fast["t3_decode_ms_per_token"] == pytest.approx(1000 * (0.5 - 0.05) / 99)
    assert ref["ttfa_p50_s"] == pytest.approx(1.0)
    assert ref["ttfa_p95_s"] == pytest.approx(np.percentile([0.5, 1.0, 1.5], 95))
    assert ref["rtf"] == pytest.approx(2.5 / 4.0)
    assert fast["stream_rtf"] == pytest.approx(1.5 / 4.0)
    assert fast["peak_mem_gb"] == 2.0 and ref["prepare_conditionals_s"] == pytest.approx(0.09)
    assert fast["snr_db_vs_reference"] == 31.5 and ref["snr_db_vs_reference"] == math.inf
    assert fast["vs_reference"]["t3_tokens_per_s"] == pytest.approx(4.0)
    assert fast["vs_reference"]["ttfa_p50_s"] == pytest.approx(5.0)
    assert fast["vs_reference"]["peak_mem_gb"] == pytest.approx(0.5)
    assert fast["stages_s"]["cfm"] == pytest.approx(0.2) and fast["stages_s"]["t3_decode"] == pytest.approx(0.45)
    assert fast["headline_texts"] == {"latency": "short", "throughput": "long"}
    for key in ("t3_tokens_per_s", "ttfa_p50_s", "ttfa_p95_s", "stream_rtf", "rtf", "peak_mem_gb",
                "snr_db_vs_reference"):
        assert key in fast


def test_markdown_table_and_json_round_trip():
    res = fake_result()
    res["summary"] = report.summarize(res)
    table = report.markdown_table(res)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| `reference` |") and "exact" in lines[2]
    assert "200.0 (4.00×)" in lines[3] and "31.5" in lines[3]
    narrow = report.markdown_table(res, ["fast"], ["rtf", "peak_mem_gb"])
    assert narrow.splitlines()[0] == "| config | RTF | peak GB |"
    with pytest.raises(KeyError, match="nope"):
        report.markdown_table(res, ["nope"])
    with pytest.raises(KeyError, match="unknown column"):
        report.markdown_table(res, None, ["bogus"])
    text = json.dumps(report.jsonable(res), allow_nan=False)
    back = json.loads(text)
    assert back["summary"]["reference"]["snr_db_vs_reference"] == "inf"
    assert report.markdown_table(back) == table
    assert "Stage times" in report.markdown_report(res)


def test_plots_are_written_or_skipped_with_a_note(tmp_path):
    res = fake_result()
    res["summary"] = report.summarize(res)
    paths, note = report.write_plots(res, tmp_path / "r")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths == [] and "matplotlib" in note
    else:
        assert note is None and [p.name for p in paths] == ["r-latency.png", "r-stages.png"]
        assert all(p.stat().st_size > 1000 for p in paths)


def test_spectral_snr_ignores_a_phase_shift_that_ruins_the_waveform_snr():
    t = torch.arange(24000, dtype=torch.float64) / 24000
    a = torch.sin(2 * math.pi * 220 * t)
    b = torch.sin(2 * math.pi * 220 * t + 1.0)
    assert stages.snr_db(a, b) < 3.0
    assert stages.spectral_snr_db(a, b) > 20.0
    assert stages.spectral_snr_db(a, a) == math.inf
    assert math.isnan(stages.spectral_snr_db(a[:100], a[:100]))


class _FakeTTS:
    """Just enough facade for run_synthesize: T3 "generates" ids 0..n-1 and S3Gen renders the even ones."""
    sr = 24000
    device = torch.device("cpu")

    def synthesize(self, text, seed=0, max_new_tokens=10, watermark=False, timer=None):
        from types import SimpleNamespace

        raw = torch.arange(max_new_tokens)
        return SimpleNamespace(wav=torch.zeros(1, 480 * max_new_tokens), speech_tokens=[raw[::2]],
                               generated_tokens=[max_new_tokens], timings={"t3": 0.5})


def test_run_synthesize_counts_every_generated_token_from_the_result():
    tts = _FakeTTS()
    syn = stages.run_synthesize(tts, text_cases(["short"], 9)[0], seed=0, watermark=False)
    assert syn.generated == 9 and syn.valid_tokens.numel() == 5
    assert syn.audio_s == pytest.approx(480 * 9 / 24000) and syn.stages == {"t3": 0.5}
    from types import SimpleNamespace

    assert stages.generated_token_count(SimpleNamespace(generated_tokens=[3, 4])) == 7


def test_eval_uses_no_private_attributes_and_patches_nothing():
    """Issue 13: the harness reaches the engine through public APIs only (upstream's driver wraps
    upstream's own object, never ours)."""
    import re

    banned = re.compile(r"_t3_decoder|_cfm_estimator|opt_state|_bos_prefill|chatterbox\.passes|chatterbox\.graphed"
                        r"|overlap_s3gen|race_pick|_seen_t3_outputs|object\.__setattr__|(?:tts|engine)\._[a-z]")
    for path in sorted((ROOT / "eval").glob("*.py")):
        hits = [f"{path.name}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                if banned.search(line)]
        assert not hits, hits


# ------------------------------------------------------------------------------------- Turbo and Nano
def test_stages_run_turbo_through_its_engine_hooks():
    """T3 alone (Turbo's sampling), the raw ids against the pipeline's codes (silence appended) and the
    renderer (the meanflow CFM's own steps) on the tiny Turbo pipeline."""
    from conftest import make_tiny_turbo_tts
    from eval.texts import TextCase

    tts = make_tiny_turbo_tts()
    case = TextCase("short", "Hello there [laugh], friend.", 12)
    syn = stages.run_synthesize(tts, case, seed=3, watermark=False)
    raw = stages.pipeline_t3_tokens(tts, case, 3, syn)
    assert raw is not None and raw.numel() == syn.generated
    assert syn.valid_tokens[-3:].tolist() == [4299] * 3
    mel, wav = stages.render(tts, syn.valid_tokens, 3)
    assert torch.isfinite(mel).all() and wav.numel() > 0
    assert stages.family_request(tts, "x").top_p == 0.95 and stages.family_request(_FakeTTS(), "x").top_p == 1.0


def test_ab_takes_a_model_and_cpu_turbo_summarises(tmp_path):
    from eval import cpu_turbo, upstream_turbo

    assert ab.parse_args(["--model", "nano", "--device", "cpu"]).model == "nano"
    assert ab.quick_voice_seconds("turbo") > 5 and ab.quick_voice_seconds("original") == 2.0
    assert upstream_turbo.upstream_python(tmp_path) is None and upstream_turbo.upstream_python(None) is None
    args = ab.parse_args(["--model", "turbo", "--device", "cpu", "--upstream", str(tmp_path)])
    args.upstream_python = None
    assert ab.turbo_upstream_block(args, [], None, {})["status"] == "skipped"
    chunks = [{"tokens": 25, "samples": 24000, "t3_s": 0.5, "flow_s": 1.5, "vocoder_s": 0.2}] * 2
    samples = [{"variant": "ours stream 25 (cpu)", "mode": "stream", "rtf": r, "total_s": 4.4 * r, "audio_s": 2.0,
                "ttfa_s": 2.0, "t3_s": 1.0, "flow_s": 3.0, "vocoder_s": 0.4, "t3_tokens": 50, "chunks": 2,
                "per_chunk": chunks} for r in (2.0, 2.2, 2.4)]
    samples += [{"variant": "upstream generate", "mode": "generate", "rtf": 1.4, "total_s": 2.8, "audio_s": 2.0,
                 "t3_s": 1.5, "s3gen_s": 1.3, "t3_tokens": 50}]
    summary = cpu_turbo.summarize(samples)
    ours = summary["ours stream 25 (cpu)"]
    assert ours["rtf"] == pytest.approx(2.2) and ours["t3_ms_per_token"] == pytest.approx(20.0)
    assert ours["flow_s_per_chunk"] == 1.5 and summary["upstream generate"]["reps"] == 1
    lines = cpu_turbo.verdict({"runs": [{"model": "nano", "summary": summary}]})
    assert len(lines) == 1 and "misses" in lines[0] and "upstream generate RTF 1.40" in lines[0]


# ------------------------------------------------------------------------------------- inputs
def test_text_sets_and_config_resolution():
    assert [c.name for c in text_cases(["long", "short"])] == ["long", "short"]
    assert all(c.max_new_tokens == 7 for c in text_cases(["short", "long"], 7))
    assert TEXT_SETS["long"].max_new_tokens == 250
    with pytest.raises(ValueError, match="unknown text set"):
        text_cases(["nope"])
    ok, skipped = ab.resolve_configs(["fast+no.such=1"])
    assert ok[0][0] == "reference"
    assert skipped and skipped[0]["name"] == "fast+no.such=1" and skipped[0]["reason"]
    args = ab.parse_args(["--quick"])
    assert args.device == "cpu" and args.reps == 1 and args.warmup == 0 and args.text_set == ["short"]
    assert ab.parse_args(["--chunk-size", "10,25,50", "--device", "cpu"]).chunk_size == [10, 25, 50]


# ------------------------------------------------------------------------------------- patch tables
def test_patch_tables_rewrites_and_check_detects_drift(tmp_path):
    res = fake_result()
    res["summary"] = report.summarize(res)
    (tmp_path / "eval" / "results").mkdir(parents=True)
    (tmp_path / "patches").mkdir()
    rpath = tmp_path / "eval" / "results" / "r.json"
    rpath.write_text(json.dumps(report.jsonable(res)))
    record = tmp_path / "patches" / "01-x.md"
    record.write_text("# 01\n\n<!-- table:eval/results/r.json:fast:t3_tokens_per_s,rtf -->\nstale\n<!-- /table -->\n"
                      "\n<!-- stages:eval/results/r.json -->\n<!-- /stages -->\nend\n")
    (tmp_path / "patches" / "README.md").write_text("<!-- table:eval/results/NAME.json -->\n<!-- /table -->\n")
    assert patch_tables.main(["--root", str(tmp_path), "--check"]) == 1
    assert patch_tables.main(["--root", str(tmp_path)]) == 0
    text = record.read_text()
    assert "stale" not in text and "| `fast` | 200.0 (4.00×) |" in text and "Test GPU" in text
    assert text.endswith("<!-- /stages -->\nend\n") and "| `reference` |" in text
    assert patch_tables.main(["--root", str(tmp_path), "--check"]) == 0
    res["summary"]["fast"]["t3_tokens_per_s"] = 150.0  # a new measurement
    rpath.write_text(json.dumps(report.jsonable(res)))
    assert patch_tables.main(["--root", str(tmp_path), "--check"]) == 1
    record.write_text("<!-- table:eval/results/absent.json -->\n<!-- /table -->\n")
    assert patch_tables.main(["--root", str(tmp_path)]) == 2


# ------------------------------------------------------------------------------------- upstream
def test_upstream_with_missing_packages_is_skipped_not_a_crash(tmp_path):
    fake = tmp_path / "upstream" / "src" / "chatterbox"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "tts.py").write_text("import a_module_that_is_not_installed_xyz\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in upstream.PT_FILES:
        (ckpt / name).write_text("")
    cases = text_cases(["short"], 4)
    kw = dict(seed=0, reps=1, warmup=0, chunk_size=4, context_window=50,
              reference_wav=np.zeros(2400, np.float32), reference_sr=24000)
    res = upstream.run_upstream(tmp_path / "upstream", ckpt, "cpu", cases, **kw)
    assert res["status"] == "skipped" and res["reason"].startswith("missing ")
    assert upstream.run_upstream(tmp_path, ckpt, "cpu", cases, **kw)["status"] == "skipped"
    assert "lacks" in upstream.run_upstream(tmp_path / "upstream", tmp_path, "cpu", cases, **kw)["reason"]
    assert upstream.parse_driver_output("noise\n", "Traceback\nBoom", 1)["status"] == "failed"


# ------------------------------------------------------------------------------------- smoke
@pytest.mark.full_size
def test_quick_run_end_to_end(tmp_path):
    torch.set_num_threads(2)
    assert ab.main(["--quick", "--out", str(tmp_path / "q")]) == 0
    res = json.loads((tmp_path / "q.json").read_text())
    assert (tmp_path / "q.md").read_text().startswith("# A/B")
    assert res["checkpoint"]["kind"] == "synthetic" and res["env"]["torch"] == torch.__version__
    assert res["configs"][0]["name"] == "reference"
    ref = res["summary"]["reference"]
    assert ref["t3_tokens_per_s"] > 0 and ref["rtf"] > 0 and ref["prepare_conditionals_s"] > 0
    assert ref["snr_db_vs_reference"] == "inf" and ref["token_agreement"] == 1.0
    assert ref["spec_snr_db_vs_reference"] == "inf" and "quick" in res["checkpoint"]["voice"]
    fid = res["fidelity"]["reference"]["short"]
    # the raw ids (invalid ones included) come from the engine's T3 runner run alone: they are the pipeline's
    assert fid["t3_tokens"] == 6 and len(fid["tokens"]) == 6 and fid["t3_tokens_exact"]
    other = res["fidelity"]["reference+autograd_mode=no_grad"]["short"]
    assert other["token_agreement"] == 1.0 and other["wav_snr_db"] == "inf"  # same numerics, same renderer
    synth = [s for s in res["samples"] if s["kind"] == "synth"]
    assert synth and all(s["t3_tokens_exact"] and s["t3_tokens"] == 6 for s in synth)
    for name in res["summary"]:
        assert name in [c["name"] for c in res["configs"]]
