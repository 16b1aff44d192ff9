"""Beam pass 1: Dolma head split -> exact length filter -> dedup -> balanced candidate shards.

    ListInputs ─┬─ other splits ─ CountLines ─────────────────────────────────────────────┐ tallies
                └─ head split ── ReadAndMeasure ─ Deduplicate ─────────────────────────┐  │
            or, with --target-docs: ReadAndMeasure(keys < limit0) ─┬─ SampleByKey ┤  │
                                                    └─ ranks ─┘              │  │
                                      └── rejects ─────────────────────────────────────│──┼─ WriteRejects
                         AssignShards (count -> hash buckets -> balance per bucket) <──┘  │
                         ─ GroupByKey(file) ─ WriteParts ─ GroupByKey(shard) ─ MergeShard ─ WriteStats

Only keys travel through shuffles: a document's text is read from its input file twice (once to
measure and hash it, once to write it into its shard) and never grouped, so the shuffle volume is
~100 bytes per document whatever its length. With --target-docs, only the documents measured for the
sample travel one by one; the others are 16 bytes each in one element per input file, and the
measured documents' fields are stashed in _tmp/ when measured, so that the input is read once. Each shard is
assembled from per-file parts by one worker, sorted by (n_tokens, id) (uncounted first) and written whole-or-nothing;
stats.json is written last and marks the output complete.

The package, one step per module around one record (records.Doc) and the (docs, rejects, tallies)
triple every step returns:
    config.py   the options; what the driver lists, fingerprints and checks before the pass
    records.py  Doc and its coder, reject rows, tallies, the funnel
    read.py     ReadAndMeasure, MeasureLines, CountLines (the exact length filter)
    dedup.py    Deduplicate (ids, then normalized texts)
    near_dedup.py NearDeduplicate (--near-dedup: MinHash LSH, clusters by large-star/small-star)
    sample.py   --target-docs: SampleToTarget (the definition), SampleByKey (the rounds)
    write.py    AssignShards, WriteParts, MergeShard, WriteRejects, the stats marker
    pipeline.py build (wires the steps) and run (reuse, cleanup, the run)
"""
from beam_pipelines.prepare.config import (PrepareConfig, UnreadableFileError, check_output,
                                           config_differences, input_fingerprint, list_inputs)
from beam_pipelines.prepare.pipeline import build, run
from beam_pipelines.prepare.records import Doc, funnel
from beam_pipelines.prepare.write import keep_prior, write_stats

__all__ = ["PrepareConfig", "UnreadableFileError", "Doc", "build", "run", "funnel", "keep_prior", "write_stats",
           "list_inputs", "input_fingerprint", "config_differences", "check_output"]
