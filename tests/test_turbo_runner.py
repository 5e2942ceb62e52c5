"""Turbo's graphed T3 runner (slots of one pool, the GPT-2 table decode, the row sampler) and its
continuous batching, against the eager reference runner.

CPU: the row sampler equals upstream's processor chain row by row (exactly, for settings that skip
stages); the table decode (Triton under the interpreter) follows ``GPT2Model`` within float32
tolerance; the graphed runner (graphs disabled) follows the eager runner, three requests stepped in
turn equal their solo runs exactly, and the batcher (requests joining a running batch, one closed
early) gives every request its solo tokens; the first token is never read as a stop. GPU: the
captured graphs against the eager runner, and batched == solo.
"""
from __future__ import annotations

import pytest
import torch

from chatterbox.models.t3.sampling import pick_by_race
from chatterbox.models.t3_turbo.sampling import (TurboSamplingConfig, process_turbo_logits, sample_turbo_rows,
                                                 turbo_param_row)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
VOCAB = 6563
ROW_SETTINGS = [TurboSamplingConfig(), TurboSamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
                TurboSamplingConfig(temperature=0.5, top_k=50, top_p=0.8, repetition_penalty=1.5),
                TurboSamplingConfig(temperature=0.0, top_k=9000, top_p=0.3, repetition_penalty=0.7)]


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_row_sampler_equals_upstreams_chain_row_by_row(scale):
    """Each row of ``sample_turbo_rows`` picks what ``process_turbo_logits`` + softmax + the race pick
    picks for that row alone (a neutral stage is skipped exactly as upstream skips it; ``scale`` 40
    makes scores whose probabilities underflow, where a zero cut would differ from no top-p)."""
    g = torch.Generator().manual_seed(0)
    n = len(ROW_SETTINGS)
    for trial in range(5):
        logits = torch.randn(n, VOCAB, generator=g) * scale
        seen = torch.rand(n, VOCAB, generator=g) < 0.02
        race = torch.empty(n, VOCAB).exponential_(1, generator=g)
        params = torch.tensor([turbo_param_row(c, VOCAB) for c in ROW_SETTINGS])
        rows = sample_turbo_rows(logits, seen, race, params)
        for i, c in enumerate(ROW_SETTINGS):
            probs = process_turbo_logits(logits[i:i + 1], seen[i:i + 1], c).softmax(dim=-1)
            assert int(rows[i]) == int(pick_by_race(probs, race[i:i + 1])), (trial, i)


def test_turbo_step_pieces_trace_whole_under_torch_compile():
    """The pick and the per-layer work the engine compiles (``fullgraph``, then captured in a CUDA
    graph) have no graph break and no host read, and compiled they compute what they compute eagerly."""
    from chatterbox.engine.turbo_runner import turbo_pick
    from chatterbox.models.t3_turbo.gpt2 import GPT2Config, GPT2Model
    from chatterbox.models.t3_turbo.table_decode import GPT2TableDecoder, block_outputs

    g = torch.Generator().manual_seed(3)
    n = len(ROW_SETTINGS)
    logits = torch.randn(n, VOCAB, generator=g) * 3
    seen = torch.rand(n, VOCAB, generator=g) < 0.02
    race = torch.empty(n, VOCAB).exponential_(1, generator=g)
    params = torch.tensor([turbo_param_row(c, VOCAB) for c in ROW_SETTINGS])
    pick = torch.compile(turbo_pick, backend="aot_eager", fullgraph=True, dynamic=False)
    assert torch.equal(pick(logits, seen, race, params), turbo_pick(logits, seen, race, params))

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config.tiny()).eval()
    for p in model.parameters():  # Conv1D weights start uninitialised
        p.data.normal_(0, 0.3)
    dec = GPT2TableDecoder.of(model)
    w = dec.layers[0]
    h, attn = torch.randn(3, 1, 64, generator=g), torch.randn(3, 1, 64, generator=g)
    args = (h, attn, *w.o, *w.ln_2, *w.fc, *w.proj, *dec.ln_f, dec.cfg.layer_norm_eps)
    outputs = torch.compile(block_outputs, backend="aot_eager", fullgraph=True, dynamic=False)
    for a, b in zip(outputs(*args), block_outputs(*args)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


COMMON = """
import json, threading
import torch
from chatterbox.engine.graphs import GraphRegistry
from chatterbox.engine.slot_runner import T3Request, T3RunnerConfig
from chatterbox.engine.turbo_runner import EagerTurboRunner, GraphedTurboRunner
from chatterbox.models.t3.cond import T3Cond
from chatterbox.models.t3.fused_decode import allocate_stacked_cache
from chatterbox.models.t3_turbo.sampling import TurboSamplingConfig
from chatterbox.models.t3_turbo.t3_turbo import T3Turbo, T3TurboConfig
from chatterbox.models.t3_turbo.table_decode import GPT2TableDecoder

def tiny(seed=0):
    torch.manual_seed(seed)
    t3 = T3Turbo(T3TurboConfig.tiny())
    for p in t3.parameters():
        p.data.normal_(0, 0.3)
    return t3.eval().requires_grad_(False)

torch.set_num_threads(1)
t3 = tiny()
g = torch.Generator().manual_seed(1)
cond = T3Cond(speaker_emb=torch.randn(1, t3.cfg.speaker_embed_size, generator=g),
              cond_prompt_speech_tokens=torch.randint(0, 300, (1, 12), generator=g))
texts = [torch.randint(0, 1000, (1, n), generator=g) for n in (5, 11, 7)]
settings = [TurboSamplingConfig(), TurboSamplingConfig(temperature=1.0, top_k=50, top_p=0.8, repetition_penalty=1.0),
            TurboSamplingConfig(temperature=0.6, top_k=0, top_p=1.0, repetition_penalty=2.0)]
cfg = T3RunnerConfig(slots=3, window=16, prefill_bucket=8, max_prefill=32, capture_at_build=False, batch_buckets=(1, 2, 4))

def cpu():  # a registry per runner: a registry keeps the steps of the runner that made them
    return GraphRegistry(torch.device("cpu"), False)

def req(i, steps, seed=None):
    return T3Request(cond, texts[i], settings[i], steps, torch.Generator().manual_seed(10 + i if seed is None else seed), 4)

def run(r, rq):
    return torch.cat(list(r.start(rq).blocks()), dim=1)[0].tolist()
"""

TABLE_AND_RUNNER = COMMON + """
res = {}
with torch.inference_mode():
    dec = GPT2TableDecoder.of(t3.tfmr)
    embeds = t3.prompt_embeds(cond, texts[1])
    p = embeds.shape[1]
    ref_cache = t3.init_cache(1, p + 4, "cpu", torch.float32)
    stacked = allocate_stacked_cache(t3.cfg.gpt2, 1, p + 4, "cpu", torch.float32)
    ptr, length = torch.tensor([stacked.k.data_ptr()]), torch.tensor([p + 4])
    want = [t3.prefill(embeds, ref_cache)]
    got = [t3.speech_logits(dec.prefill_table(embeds, ptr, length, 1)[:, -1])]
    for k, tok in enumerate((5, 77, 301)):
        e = t3.next_token_embeds(torch.tensor([[tok]]))
        pos = torch.tensor([p + k])
        want.append(t3.decode_step(e, pos, ref_cache))
        got.append(t3.speech_logits(dec.decode_table(e, pos, ptr, length, 16 * ((p + k) // 16 + 1), 1)[:, -1]))
    res["logit_err"] = max(float((a - b).abs().max()) for a, b in zip(got, want))
    res["logit_scale"] = max(float(a.abs().max()) for a in want)

    runner = GraphedTurboRunner(t3, dec, cpu(), cfg)
    eager = EagerTurboRunner(t3)
    res["agree"], res["solo"] = [], []
    for i in range(3):
        a, b = run(runner, req(i, 30)), run(eager, req(i, 30))
        n = min(len(a), len(b))
        res["agree"].append(sum(x == y for x, y in zip(a[:n], b[:n])) / n)
        res["solo"].append(a)
    streams = [runner.start(req(i, 30)) for i in range(3)]
    res["all_slots_taken"] = runner.free_slots == 0
    its = [s.blocks() for s in streams]
    got = [[] for _ in its]
    live = set(range(3))
    while live:
        for i in sorted(live):
            blk = next(its[i], None)
            if blk is None:
                live.discard(i)
            else:
                got[i] += blk[0].tolist()
    res["interleaved"] = got
    res["slots_back"] = runner.free_slots == 3
    # a model whose every pick is the stop token: the first pick is not read as a stop
    stopper = tiny()
    stopper.speech_head.bias[stopper.cfg.stop_speech_token] = 1e3
    sr = GraphedTurboRunner(stopper, GPT2TableDecoder.of(stopper.tfmr), cpu(), cfg)
    res["stop_graphed"] = run(sr, req(0, 10))
    res["stop_eager"] = run(EagerTurboRunner(stopper), req(0, 10))
    res["stop_token"] = stopper.cfg.stop_speech_token
print(json.dumps(res))
"""


def test_table_decode_and_graphed_runner_follow_the_eager_path_on_the_cpu():
    """GPT-2 table decode (Triton interpreter) vs ``GPT2Model``: float32 logits within 1e-4 of their
    scale; the graphed runner (graphs disabled) follows the eager runner (a near tie may flip a
    draw: at least 90% of tokens agree), three requests stepped in turn equal their solo runs
    exactly, slots come back, and a stop token as the first pick does not end the request."""
    from conftest import run_triton_interpreted

    got = run_triton_interpreted(TABLE_AND_RUNNER, "")
    assert got["logit_err"] <= 1e-4 * max(1.0, got["logit_scale"]), got
    assert min(got["agree"]) >= 0.9, got["agree"]
    assert got["interleaved"] == got["solo"]
    assert got["all_slots_taken"] and got["slots_back"]
    stop = got["stop_token"]
    assert got["stop_eager"] == [stop, stop] and got["stop_graphed"] == got["stop_eager"]


BATCHER = COMMON + """
from chatterbox.engine.t3_batcher import T3Batcher

budgets = [18, 25, 12]
runner = GraphedTurboRunner(t3, GPT2TableDecoder.of(t3.tfmr).with_request_rows(1), cpu(), cfg)
batcher = T3Batcher(runner, block_size=4)
res = {}
with torch.inference_mode():
    solo = [run(runner, req(i, budgets[i])) for i in range(3)]
    got = [None] * 3
    first_block = threading.Event()

    def consume(i):
        with torch.inference_mode():
            toks = []
            for b in batcher.start(req(i, budgets[i])).blocks():
                toks += b[0].tolist()
                first_block.set()
            got[i] = toks

    threads = [threading.Thread(target=consume, args=(0,))]
    threads[0].start()
    assert first_block.wait(600)  # the others join a batch that is already running
    for i in (1, 2):
        threads.append(threading.Thread(target=consume, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    res["solo"], res["got"] = solo, got
    res["shared_steps"] = batcher.steps < sum(len(s) for s in solo)
    s0, s1 = batcher.start(req(1, budgets[1])), batcher.start(req(0, budgets[0]))
    it0 = s0.blocks()
    next(it0)
    it0.close()
    res["others_unaffected"] = torch.cat(list(s1.blocks()), dim=1)[0].tolist() == solo[0]
    for _ in range(200):
        if runner.free_slots == 3 and batcher.running == 0:
            break
        threading.Event().wait(0.01)
    res["slots_back"] = runner.free_slots == 3
    batcher.close()
print(json.dumps(res))
"""


def test_batcher_serves_turbo_requests_like_solo_on_the_cpu():
    """Continuous batching of Turbo (Triton interpreter, graphs disabled, one projection per request):
    three requests of other lengths and settings, two joining a running batch, give exactly their solo
    tokens; a request closed early frees its slot and the others go on unchanged."""
    from conftest import run_triton_interpreted

    got = run_triton_interpreted(BATCHER, "")
    assert got["got"] == got["solo"]
    assert got["shared_steps"]
    assert got["others_unaffected"] and got["slots_back"]


def _gpu_turbo():
    from conftest import make_tiny_turbo_tts

    from chatterbox.optim.config import OptConfig

    return (make_tiny_turbo_tts(opt=OptConfig.reference(), device="cuda"),
            make_tiny_turbo_tts(opt=OptConfig.parse("fast+t3_batching=1"), device="cuda"))


@pytest.mark.gpu
@gpu
def test_gpu_graphed_turbo_runner_follows_the_eager_runner_and_batches_like_solo():
    """On the GPU with ``fast`` (bf16, compiled, captured graphs): the graphed runner's first tokens
    follow the float32 eager runner's (same CUDA generator seeds; bf16 lets a near tie flip a draw:
    at least 80% of the first 8 agree), and eight concurrent requests through the batcher give the
    tokens each gives alone (bound below)."""
    import threading

    from chatterbox.engine.slot_runner import T3Request
    from chatterbox.engine.turbo_runner import GraphedTurboRunner

    ref, fast = _gpu_turbo()
    eng = fast.engine
    assert isinstance(eng.t3_runner, GraphedTurboRunner) and eng.t3_batcher is not None
    text = "Hello there [laugh] friend. How are you?"

    def tokens(engine, conds, seed, start) -> list[int]:
        with torch.inference_mode():
            rq = T3Request(conds.t3, engine.text_tokens(text), TurboSamplingConfig(), 24,
                           torch.Generator(engine.device).manual_seed(seed), 4)
            return torch.cat(list(start(rq).blocks()), dim=1)[0].tolist()

    solo = [tokens(eng, fast.conds, s, eng.t3_runner.start) for s in range(8)]
    got: list = [None] * 8

    def worker(i):
        got[i] = tokens(eng, fast.conds, i, eng.t3_batcher.start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # every request's first token comes from its own prefill (the same captured graph either way); after
    # it, bf16 projections over 8 rows may round differently from 1 row, so a near tie may flip a draw
    # and the two runs part: at least 6 of the 8 requests must be identical throughout
    assert [g[0] for g in got] == [s[0] for s in solo]
    assert sum(g == s for g, s in zip(got, solo)) >= 6, (got, solo)
    want = tokens(ref.engine, ref.conds, 0, ref.engine.t3_runner.start)
    n = min(len(want), len(solo[0]), 8)
    assert sum(a == b for a, b in zip(want[:n], solo[0][:n])) >= 0.8 * n


def test_turbo_engine_runner_config_follows_the_model_and_the_toggles():
    """Left at the default, Turbo's runner takes its own preset (more slots, larger steps); without
    ``t3_batching`` only bucket 1 is captured; a small position table keeps a quarter for prompts and
    the rest for the graphed decode."""
    from conftest import make_tiny_turbo_tts

    from chatterbox.engine.slot_runner import T3RunnerConfig
    from chatterbox.optim.config import OptConfig

    batched = make_tiny_turbo_tts(opt=OptConfig.parse("fast+t3_batching=1")).engine._runner_config()
    solo = make_tiny_turbo_tts(opt=OptConfig.fast()).engine._runner_config()
    preset = T3RunnerConfig.turbo()
    assert batched.slots == preset.slots and batched.batch_buckets == preset.batch_buckets
    assert solo.batch_buckets == (1,)
    table = 512  # GPT2Config.tiny()
    assert batched.max_prefill == table // 4 and batched.max_prefill % batched.prefill_bucket == 0


def test_graphed_runner_knows_which_requests_its_graphs_cover():
    """``covers`` counts the prompt as ``prompt_embeds`` builds it; the runner refuses a request past its
    graphs, and the Turbo engine runs such a request on the eager runner instead (same tokens)."""
    from chatterbox.engine.graphs import GraphRegistry
    from chatterbox.engine.slot_runner import T3Request, T3RunnerConfig
    from chatterbox.engine.turbo_runner import GraphedTurboRunner
    from chatterbox.models.t3.cond import T3Cond
    from chatterbox.models.t3_turbo.t3_turbo import T3Turbo, T3TurboConfig
    from chatterbox.models.t3_turbo.table_decode import GPT2TableDecoder

    t3 = T3Turbo(T3TurboConfig.tiny()).eval()
    cfg = T3RunnerConfig(slots=2, window=16, prefill_bucket=8, max_prefill=32, capture_at_build=False)
    runner = GraphedTurboRunner(t3, GPT2TableDecoder.of(t3.tfmr), GraphRegistry(torch.device("cpu"), False), cfg,
                                max_tokens=64)
    cond = T3Cond(speaker_emb=torch.zeros(1, t3.cfg.speaker_embed_size),
                  cond_prompt_speech_tokens=torch.zeros(1, 12, dtype=torch.long))
    text = torch.ones(1, 7, dtype=torch.long)
    with torch.no_grad():
        prefix = t3.prompt_embeds(cond, text).shape[1]
    room = min(runner.max_tokens, runner.max_window - prefix)

    def req(steps):
        return T3Request(cond, text, TurboSamplingConfig(), steps, torch.Generator(), 4)

    assert runner.covers(req(room)) and not runner.covers(req(room + 1))
    with pytest.raises(ValueError, match="max_new_tokens|cache positions"):
        runner.prepare(req(room + 1))

    from conftest import make_tiny_turbo_tts

    from chatterbox.engine.turbo_runner import EagerTurboRunner

    tts = make_tiny_turbo_tts()
    eng = tts.engine
    eng.t3_runner = GraphedTurboRunner(eng.models.t3, GPT2TableDecoder.of(eng.models.t3.tfmr),
                                       GraphRegistry(torch.device("cpu"), False), cfg, max_tokens=8)
    text = eng.text_tokens("Hello there.")
    with torch.inference_mode():
        long = [T3Request(tts.conds.t3, text, TurboSamplingConfig(), 20, torch.Generator().manual_seed(4), 4)
                for _ in range(2)]
        got = torch.cat(list(eng.t3_start(long[0]).blocks()), dim=1)
        want = torch.cat(list(EagerTurboRunner(eng.models.t3).start(long[1]).blocks()), dim=1)
    assert got.shape[1] > 8 and torch.equal(got, want)
