"""turbo_text.json: Turbo's punc_norm and tokenizer (synthetic GPT-2 vocabulary with the tags, two file
layouts) against upstream's ``punc_norm`` and HF ``AutoTokenizer`` on the same files."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from .runner import Comparison, Fixture, ParityContext

LAYOUTS = {"legacy": False, "added_tokens_decoder": True}  # layout -> tokenizer_config lists added tokens


def check(fx: Fixture, ctx: ParityContext) -> list[Comparison]:
    from chatterbox.text_turbo import TurboTokenizer, punc_norm_turbo
    from chatterbox.text_vocab_turbo import write_turbo_tokenizer_files

    results = []
    for layout, with_decoder in LAYOUTS.items():
        expected = fx.meta["layouts"][layout]
        with tempfile.TemporaryDirectory() as tmp:
            directory = write_turbo_tokenizer_files(tmp, added_tokens_decoder=with_decoder)
            if not with_decoder:
                digests = {n: hashlib.sha256((Path(tmp) / n).read_bytes()).hexdigest()
                           for n in fx.meta["tokenizer_files_sha256"]}
                differ = [n for n, d in digests.items() if d != fx.meta["tokenizer_files_sha256"][n]]
                results.append(_mismatches("tokenizer files (sha256)", differ))
            tok = TurboTokenizer(directory)
        cases = expected["cases"]
        bad_norm = [c["in"] for c in cases if punc_norm_turbo(c["in"]) != c["punc_norm"]]
        bad_ids = [c["in"] for c in cases if tok.encode(c["punc_norm"]) != c["ids"]]
        bad_tags = [t for t, i in expected["tags"].items() if tok.encode(t) != [i]]
        results += [
            _mismatches(f"{layout}: punc_norm ({len(cases)} texts)", bad_norm),
            _mismatches(f"{layout}: token ids ({len(cases)} texts)", bad_ids),
            _mismatches(f"{layout}: tags as single tokens", bad_tags),
            _mismatches(f"{layout}: vocabulary size", [] if tok.vocab_size == expected["len"] else [tok.vocab_size]),
        ]
    return results


def _mismatches(name: str, bad: list) -> Comparison:
    return Comparison(name, float(len(bad)), 0.0, not bad, exact=True)
