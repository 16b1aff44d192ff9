"""Where bft prepare's read step spends its time, as a profile (cProfile), on real or synthetic text:
the work of ReadAndMeasure for one input file in one process (decompress and parse each line, the
exact length filter in batches of 256 as prepare runs it, the dedup hash), beside the same texts
tokenized whole by `encode_batch_fast` (datatrove's work, without its offsets), for reference.

    .venv/bin/python -m benchmarks.profile_read --corpus real --structure llama2 --docs 3000
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

from benchmarks.prepare_bench import make_corpus, make_tokenizer


def main(argv=None) -> None:
    from beam_pipelines.prepare import dolma
    from beam_pipelines.tokens.counter import TokenCounter
    from beam_pipelines.tokens.judge import judge
    from beam_pipelines.tokens.load import load_tokenizer
    from schemas.keys import text_hash
    import storage

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", choices=("real", "synthetic"), default="real")
    ap.add_argument("--structure", default="llama2")
    ap.add_argument("--docs", type=int, default=30_000, help="the benchmark corpus to read (its first file)")
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args(argv)
    head = os.path.join(make_corpus(args.docs, 20, corpus=args.corpus), "documents", "cc_en_head")
    path = sorted(os.path.join(head, f) for f in os.listdir(head))[0]
    tokenizer = make_tokenizer(args.structure)

    def read():
        counter = TokenCounter(load_tokenizer(tokenizer))
        batch, n = [], 0
        for raw in storage.open_lines(path):
            doc = dolma.parse_line(raw, 1 << 20)
            if isinstance(doc, dolma.Document):
                batch.append(doc.text)
                text_hash(doc.text)
                n += 1
            if len(batch) == 256:
                judge(counter, batch, 0, 3584)
                batch = []
        judge(counter, batch, 0, 3584)
        return counter, n

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    counter, n = read()
    prof.disable()
    wall = time.perf_counter() - t0
    texts = [d.text for d in (dolma.parse_line(r, 1 << 20) for r in storage.open_lines(path))
             if isinstance(d, dolma.Document)]
    tok = load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    for i in range(0, len(texts), 256):
        tok.encode_batch_fast(texts[i:i + 256], add_special_tokens=False)
    full = time.perf_counter() - t0
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    t = counter.totals()
    print(f"{args.corpus} / {args.structure}: {n:,} documents of {os.path.basename(path)}: read step "
          f"{wall / n * 1e3:.3f} ms a document under the profiler; encode_batch_fast alone "
          f"{full / n * 1e3:.3f} ms a document (no profiler)")
    print(f"chunk cache hits {1 - t['chunk_misses'] / max(t['chunk_lookups'], 1):.1%}; counted by pieces "
          f"{t['counted_pieces']:,}, in full {t['counted_full']:,} (by the switch {t['full_by_switch']:,}); "
          f"seconds by chunks {t['seconds_chunks']:.2f}, in full {t['seconds_full']:.2f}")
    print("\n".join(out.getvalue().splitlines()[:args.top + 12]))


if __name__ == "__main__":
    main()
