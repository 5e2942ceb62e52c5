"""Upstream side of the Turbo fixture generator: runs the pinned reference (``chatterbox-tts`` 0.1.7 from
PyPI, in its own virtual environment) on a synthetic checkpoint directory and writes the fixtures.

Started by ``make_turbo_fixtures.py`` with the side environment's interpreter; it imports upstream's
``chatterbox`` and nothing of ours (the two packages share that name). See that script for the
fixture list; FIXTURES.md (shared parity kit) describes the format.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# GPT2_small, which 0.1.7 lacks: upstream's newer llama_configs.py defines it as GPT2_medium with
# these sizes (Chatterbox-Nano).
NANO_SIZES = {"n_embd": 768, "hidden_size": 768, "n_head": 12, "n_layer": 12}
TEXT_LOGITS_STRIDE = 16  # text logits columns stored (every 16th of 50276), to keep the file small
SILENCE_TOKEN = 4299
# Library versions of the run, written into every fixture's meta (set in main).
VERSIONS: dict[str, str] = {}


# ------------------------------------------------------------------------------------------- inputs
def make_wave(sample_rate: int, seconds: float, seed: int) -> np.ndarray:
    """A voice-like deterministic test signal: gliding harmonics, syllable-rate envelope, a noise
    burst, near-silent edges, peak 0.5 (float32)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    f0 = 110.0 + 40.0 * np.sin(2 * np.pi * 0.31 * t + rng.uniform(0, 6)) + 15.0 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase + rng.uniform(0, 6)) / k for k in range(1, 14))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.7 * t + rng.uniform(0, 6))
    wav = envelope * voiced + 0.03 * rng.standard_normal(t.shape)
    mid = len(t) // 2
    burst = int(0.15 * sample_rate)
    wav[mid:mid + burst] += 0.6 * rng.standard_normal(wav[mid:mid + burst].shape)
    edge = int(0.2 * sample_rate)
    wav[:edge] *= 0.01
    wav[-edge:] *= 0.01
    return (0.5 * wav / np.abs(wav).max()).astype(np.float32)


class Draws:
    """Records the global-RNG draws of a call (``torch.rand/randn/rand_like/randn_like``), in order.

    ``zero_from``: draws with this index or later are replaced by zeros (recorded as zeros).
    """

    NAMES = ("rand", "randn", "rand_like", "randn_like")

    def __init__(self, zero_from: int | None = None):
        self.zero_from = zero_from
        self.items: list[tuple[str, torch.Tensor]] = []

    @contextlib.contextmanager
    def active(self):
        originals = {n: getattr(torch, n) for n in self.NAMES}

        def wrap(name):
            def draw(*args, **kwargs):
                value = originals[name](*args, **kwargs)
                if self.zero_from is not None and len(self.items) >= self.zero_from:
                    value = torch.zeros_like(value)
                self.items.append((name, value.detach().clone()))
                return value
            return draw

        for n in self.NAMES:
            setattr(torch, n, wrap(n))
        try:
            yield self
        finally:
            for n, f in originals.items():
                setattr(torch, n, f)


# ------------------------------------------------------------------------------------------ weights
def verify_with_kit(ckpt: Path, kit: Path, salt: int) -> int:
    """Every tensor of every weights file equals the parity kit's ``synth_weights`` (the normative
    recipe, independent of the package that wrote the files). Returns the number checked."""
    from safetensors import safe_open

    sys.path.insert(0, str(kit))
    from synth_weights import synth_weights  # type: ignore[import-not-found]

    checked = 0
    for path in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                value = f.get_tensor(key)
                want = synth_weights(key, tuple(value.shape), value.dtype, salt=salt)
                if not torch.equal(value, want):
                    raise SystemExit(f"{path.name}:{key} differs from the kit's synth_weights (salt {salt})")
                checked += 1
    return checked


def load_upstream(ckpt: Path):
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.tts_turbo import ChatterboxTurboTTS
    from safetensors.torch import load_file

    tts = ChatterboxTurboTTS.from_local(ckpt, "cpu")
    LLAMA_CONFIGS.setdefault("GPT2_small", {**GPT2_MEDIUM_CONFIG, **NANO_SIZES})
    hp = T3Config(text_tokens_dict_size=50276)
    hp.llama_config_name = "GPT2_small"
    hp.speech_tokens_dict_size = 6563
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = 375
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    nano = T3(hp)
    nano.load_state_dict(load_file(ckpt / "t3_nano_v1.safetensors"))
    del nano.tfmr.wte
    return tts, nano.eval()


# -------------------------------------------------------------------------------------------- files
def save(out: Path, stem: str, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: (v if torch.is_tensor(v) else torch.as_tensor(v)).detach().contiguous() for k, v in tensors.items()}
    meta = {**meta, "versions": VERSIONS, "generator": "tools/parity/make_turbo_fixtures.py"}
    save_file(tensors, str(out / f"{stem}.safetensors"), metadata={"meta": json.dumps(meta)})
    size = (out / f"{stem}.safetensors").stat().st_size
    print(f"wrote {stem}.safetensors ({size / 1e6:.2f} MB, {len(tensors)} tensors)", flush=True)


def t3_cond(speaker_emb, prompt_tokens):
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    return T3Cond(speaker_emb=speaker_emb, cond_prompt_speech_tokens=prompt_tokens, emotion_adv=None)


def random_inputs(gen: torch.Generator, prompt_len: int, text_len: int):
    speaker = torch.randn(1, 256, generator=gen)
    speaker = speaker / speaker.norm()
    prompt = torch.randint(0, 6561, (1, prompt_len), generator=gen)
    text = torch.randint(0, 50276, (1, text_len), generator=gen)
    return speaker, prompt, text


# ------------------------------------------------------------------------------------------ fixtures
def t3_forward(out: Path, t3, model: str, params: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    speaker, prompt, text = random_inputs(gen, 30, 10)
    text[0, 0], text[0, -1] = 255, 0  # upstream's forward asserts these ids are present
    speech = torch.cat([torch.tensor([[6561]]), torch.randint(0, 6561, (1, 11), generator=gen)], dim=1)
    cond = t3_cond(speaker, prompt)
    with torch.inference_mode():
        embeds, _ = t3.prepare_input_embeds(t3_cond=cond, text_tokens=text, speech_tokens=speech)
        res = t3.forward(t3_cond=t3_cond(speaker, prompt), text_tokens=text, text_token_lens=torch.tensor([10]),
                         speech_tokens=speech, speech_token_lens=torch.tensor([12]))
    params = {**params, "model": model, "text_logits_column_stride": TEXT_LOGITS_STRIDE}
    stem = "turbo_t3_forward" if model == "turbo" else "turbo_nano_t3_forward"
    save(out, stem, {
        "speaker_emb": speaker, "cond_prompt_speech_tokens": prompt, "text_tokens": text, "speech_tokens": speech,
        "input_embeds": embeds, "hidden_states_last": res.hidden_states, "speech_logits": res.speech_logits,
        "text_logits_strided": res.text_logits[..., ::TEXT_LOGITS_STRIDE],
    }, {"params": params, "calls": ["T3.prepare_input_embeds", "T3.forward (text/speech lens = full)"]})


class StepRecorder:
    """Patches upstream's logits-processor list and ``torch.multinomial`` during ``inference_turbo``."""

    def __init__(self, forced: torch.Tensor):
        self.forced = forced
        self.raw, self.processed, self.probs, self.margins = [], [], [], []

    @contextlib.contextmanager
    def active(self, top_p: float):
        import chatterbox.models.t3.t3 as t3_module
        from transformers.generation.logits_process import TopPLogitsWarper

        base = t3_module.LogitsProcessorList
        rec = self

        class Recording(base):
            def __call__(self, input_ids, scores, **kwargs):
                rec.raw.append(scores.clone())
                for proc in self:
                    if isinstance(proc, TopPLogitsWarper):
                        cum = torch.sort(scores, descending=False).values.softmax(-1).cumsum(-1)
                        rec.margins.append(float((cum - (1 - top_p)).abs().min()))
                    scores = proc(input_ids, scores)
                rec.processed.append(scores.clone())
                return scores

        original = torch.multinomial

        def forced_draw(probs, num_samples, *args, **kwargs):
            step = len(rec.probs)
            rec.probs.append(probs.clone())
            return rec.forced[:, step:step + 1].clone()

        t3_module.LogitsProcessorList = Recording
        torch.multinomial = forced_draw
        try:
            yield self
        finally:
            t3_module.LogitsProcessorList = base
            torch.multinomial = original


def t3_inference_steps(out: Path, t3, model: str, params: dict, seed: int, sampling: dict) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    speaker, prompt, text = random_inputs(gen, 40, 15)
    a, b, c = torch.randint(0, 6561, (3,), generator=gen).tolist()
    # the prefill's token is a stop (never checked upstream), later tokens repeat (penalty), then stop
    forced_stop = torch.tensor([[6562, a, b, a, c, 6562]])
    cap_len = 3
    forced_cap = torch.randint(0, 6561, (1, cap_len + 1), generator=gen)
    tensors = {"speaker_emb": speaker, "cond_prompt_speech_tokens": prompt, "text_tokens": text}
    calls = {}
    for name, forced, max_gen_len in (("stop", forced_stop, 20), ("cap", forced_cap, cap_len)):
        rec = StepRecorder(forced)
        with rec.active(sampling["top_p"]), torch.inference_mode():
            tokens = t3.inference_turbo(t3_cond(speaker, prompt), text, max_gen_len=max_gen_len, **sampling)
        s3gen_tokens = torch.cat([tokens[tokens < 6561], torch.full((3,), SILENCE_TOKEN)])
        tensors.update({f"{name}_forced_tokens": forced, f"{name}_predicted_tokens": tokens,
                        f"{name}_s3gen_tokens": s3gen_tokens,
                        f"{name}_step_raw_logits": torch.cat(rec.raw), f"{name}_step_probs": torch.cat(rec.probs)})
        if name == "stop":
            tensors[f"{name}_step_processed"] = torch.cat(rec.processed)
        calls[name] = {"max_gen_len": max_gen_len, "steps": len(rec.probs), "top_p_cut_min_margin": min(rec.margins),
                       "kept_per_step": [int((p > 0).sum()) for p in rec.probs]}
    params = {**params, "model": model, **sampling, "stop_max_gen_len": calls["stop"]["max_gen_len"],
              "cap_max_gen_len": calls["cap"]["max_gen_len"]}
    stem = "turbo_t3_inference_steps" if model == "turbo" else "turbo_nano_t3_inference_steps"
    save(out, stem, tensors, {"params": params, "calls": calls,
                              "note": "T3.inference_turbo with torch.multinomial returning the forced tokens; "
                                      "s3gen_tokens = ids < 6561 plus three 4299 (tts_turbo.generate)"})


def embed_ref(s3gen, seconds: float, seed: int):
    wav = make_wave(24000, seconds, seed)
    with torch.inference_mode():
        ref = s3gen.embed_ref(wav, 24000, device="cpu")
    return wav, ref


def ref_tensors(ref: dict) -> dict:
    return {f"ref_{k}": v for k, v in ref.items() if torch.is_tensor(v)}


def meanflow_flow(out: Path, s3gen, params: dict, seed: int) -> None:
    _, ref = embed_ref(s3gen, 3.0, seed + 2)
    tokens = torch.randint(0, 6561, (1, 30), generator=torch.Generator().manual_seed(seed + 3))
    est = s3gen.flow.decoder.estimator
    steps: list[dict] = []
    original_forward = est.forward  # the bound method; the instance attribute below shadows it

    def recording_forward(x, mask, mu, t, spks=None, cond=None, r=None):
        y = original_forward(x, mask, mu, t, spks=spks, cond=cond, r=r)
        steps.append({"x": x.clone(), "mask": mask.clone(), "mu": mu.clone(), "t": t.clone(), "r": r.clone(),
                      "spks": spks.clone(), "cond": cond.clone(), "out": y.clone()})
        return y

    draws = Draws()
    est.forward = recording_forward
    torch.manual_seed(seed + 4)
    try:
        with draws.active(), torch.inference_mode():
            mel = s3gen.flow_inference(tokens, ref_dict=dict(ref), n_cfm_timesteps=2, finalize=True)
    finally:
        del est.forward
    (_, speech_noise), (_, frame_noise) = draws.items
    first = steps[0]
    tensors = {"speech_tokens": tokens, **ref_tensors(ref), "mel": mel, "speech_noise": speech_noise,
               "frame_noise": frame_noise, "est_t": torch.cat([s["t"] for s in steps]),
               "est_r": torch.cat([s["r"] for s in steps]), "est_x_in_steps": torch.cat([s["x"] for s in steps]),
               **{f"est0_{k}": first[k] for k in ("mask", "mu", "spks", "cond", "out")}}
    save(out, "turbo_meanflow_flow", tensors, {
        "params": {**params, "n_cfm_timesteps": 2},
        "calls": ["S3Gen(meanflow=True).flow_inference(speech_tokens, ref_dict, n_cfm_timesteps=2, finalize=True)"],
        "note": "finalize=False is not recorded: in 0.1.7 it fails (the flow mask is not trimmed with the "
                "encoder output)",
        "draws": "per call: speech_noise = randn(1, 80, 2N) (noised_mels), then frame_noise = randn_like(mu); "
                 "the CFM starts from frame_noise with its last 2N frames replaced by speech_noise"})


def s3gen_e2e(out: Path, s3gen, params: dict, seed: int) -> None:
    _, ref = embed_ref(s3gen, 3.0, seed + 5)
    generated = torch.randint(0, 6561, (20,), generator=torch.Generator().manual_seed(seed + 6))
    tokens = torch.cat([generated, torch.full((3,), SILENCE_TOKEN)])
    mels = []
    original = s3gen.flow_inference

    def capture(*args, **kwargs):
        mel = original(*args, **kwargs)
        mels.append(mel.clone())
        return mel

    draws = Draws(zero_from=2)  # the flow's two draws kept; HiFT's source draws zeroed
    s3gen.flow_inference = capture
    torch.manual_seed(seed + 7)
    try:
        with draws.active(), torch.inference_mode():
            wav, sources = s3gen.inference(speech_tokens=tokens, ref_dict=dict(ref), n_cfm_timesteps=2)
    finally:
        del s3gen.flow_inference
    (_, speech_noise), (_, frame_noise) = draws.items[:2]
    save(out, "turbo_s3gen_e2e", {"speech_tokens": tokens, **ref_tensors(ref), "speech_noise": speech_noise,
                                  "frame_noise": frame_noise, "mel": mels[0], "wav": wav, "sources": sources}, {
        "params": {**params, "n_cfm_timesteps": 2},
        "calls": ["S3Gen(meanflow=True).inference(speech_tokens (1-D, 3 silence tokens appended), ref_dict, "
                  "n_cfm_timesteps=2)"],
        "draws": [name for name, _ in draws.items],
        "note": "HiFT source draws (phase, sine noise, unused noise) replaced by zeros"})


def prepare_conditionals(out: Path, tts, params: dict, seed: int, exaggeration: float) -> None:
    import pyloudnorm
    import soundfile as sf

    seconds = 15.6  # over both caps: S3Gen's 10 s and T3's 15 s (375 tokens)
    wav = make_wave(24000, seconds, seed + 8) * 0.2
    pcm = np.round(wav * 32767).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.wav"
        sf.write(str(path), pcm, 24000, subtype="PCM_16")
        import librosa

        loaded, _ = librosa.load(str(path), sr=24000)
        loudness = pyloudnorm.Meter(24000).integrated_loudness(loaded)
        with torch.inference_mode():
            tts.prepare_conditionals(str(path), exaggeration=exaggeration, norm_loudness=True)
    c = tts.conds
    save(out, "turbo_prepare_conditionals", {
        "wav24_pcm16": torch.from_numpy(pcm), "loudness_lufs": torch.tensor([loudness], dtype=torch.float64),
        "t3_speaker_emb": c.t3.speaker_emb, "t3_cond_prompt_speech_tokens": c.t3.cond_prompt_speech_tokens,
        "t3_emotion_adv": c.t3.emotion_adv, "gen_prompt_token": c.gen["prompt_token"],
        "gen_prompt_token_len": c.gen["prompt_token_len"], "gen_prompt_feat": c.gen["prompt_feat"],
        "gen_embedding": c.gen["embedding"],
    }, {"params": {**params, "exaggeration": exaggeration, "norm_loudness": True, "target_lufs": -27.0},
        "calls": ["ChatterboxTurboTTS.prepare_conditionals(path of a 16-bit PCM 24 kHz WAV of wav24_pcm16, "
                  "exaggeration, norm_loudness=True)"],
        "loudness": "pyloudnorm.Meter(24000).integrated_loudness(librosa.load(path, sr=24000))"})


TEXT_CASES = (
    "", "hello world", "  leading spaces keep a lower-case start", "Wait… what: really — yes – no , ok",
    "\u201cQuoted\u201d and \u2018single\u2019 marks", "Ellipsis... and dash - and semi; colon",
    "Oh, that's hilarious! [chuckle] Um anyway, we do have a new model in store.",
    "[laugh]", "ha[laugh]ha [sigh][gasp] [clear throat] done", "[unknown tag] stays text", "[Laugh] is not a tag",
    "Numbers 1234, symbols #@$%^&*, accents caf\u00e9 na\u00efve, emoji \U0001F600, CJK \u4f60\u597d",
    "Tabs\tand\nnewlines\n\n collapse", "Ends with question?", "Ends with exclamation!", "Trailing dash-",
    "word " * 600,
)


def text_fixture(out: Path, ckpt: Path, params: dict) -> None:
    from chatterbox.tts_turbo import punc_norm
    from transformers import AutoTokenizer

    layouts = {}
    for layout, directory in (("legacy", ckpt), ("added_tokens_decoder", ckpt / "tokenizer_added_tokens_decoder")):
        tok = AutoTokenizer.from_pretrained(directory)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        cases = []
        for text in TEXT_CASES:
            normed = punc_norm(text)
            ids = tok(normed, return_tensors="pt", padding=True, truncation=True).input_ids
            cases.append({"in": text, "punc_norm": normed, "ids": ids[0].tolist()})
        tags = ("[laugh]", "[clear throat]", "[advertisement]")
        layouts[layout] = {"len": len(tok), "cases": cases, "tags": {t: tok.convert_tokens_to_ids(t) for t in tags}}
    meta = {"params": params, "versions": VERSIONS, "generator": "tools/parity/make_turbo_fixtures.py",
            "tokenizer_files_sha256": file_digests(ckpt), "layouts": layouts,
            "calls": ["punc_norm (tts_turbo)", "AutoTokenizer.from_pretrained(dir)(text, return_tensors='pt', "
                      "padding=True, truncation=True).input_ids"]}
    (out / "turbo_text.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
    print("wrote turbo_text.json", flush=True)


def file_digests(directory: Path) -> dict:
    import hashlib

    names = ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", type=Path, required=True, help="synthetic Turbo+Nano checkpoint directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--salt", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--kit", type=Path, default=None, help="parity kit directory with synth_weights.py")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.kit is not None:
        print(f"kit check: {verify_with_kit(args.ckpt, args.kit, args.salt)} tensors equal synth_weights", flush=True)
    from importlib.metadata import version

    VERSIONS.update({name: version(name) for name in ("chatterbox-tts", "torch", "transformers", "pyloudnorm",
                                                      "librosa", "numpy")})
    params = {"salt": args.salt, "seed": args.seed}
    tts, nano = load_upstream(args.ckpt)
    sampling = {"temperature": 0.8, "top_k": 1000, "top_p": 0.95, "repetition_penalty": 1.2}
    for model, t3 in (("turbo", tts.t3.eval()), ("nano", nano)):
        t3_forward(args.out, t3, model, params, args.seed)
        t3_inference_steps(args.out, t3, model, params, args.seed, sampling)
    meanflow_flow(args.out, tts.s3gen, params, args.seed)
    s3gen_e2e(args.out, tts.s3gen, params, args.seed)
    prepare_conditionals(args.out, tts, params, args.seed, exaggeration=0.5)
    text_fixture(args.out, args.ckpt, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
