"""Beam pass 2: generation shards -> the SFT corpus in the paper's variants, measured, and a release.

The package, one step per module around the resolved job (config.AssembleJob) and the per-shard
Parquet parts the steps hand on:
    config.py         the options, and the job they resolve to once per run (gates, tokenizer, split)
    recipes.py        the recipes applied and curation, pure functions on Arrow tables
    join.py           JoinShards: each candidates shard joined with its generation shards, rows decided
    decontaminate.py  word n-grams: evaluation sets, contamination, near-duplicate instructions
    dedup.py          DeduplicateInstructions: the smallest id per instruction, then near-duplicates
    seed.py           SeedData: --seed-data read, tagged and hashed to output shards
    finalize.py       the cap, the validation split, FinalizeShards (the data files), WriteSummary
    corpus_stats.py   mergeable statistics partials and the release's stats.json
    pipeline.py       build: the steps wired
    driver.py         run: resolve, plan and check the inputs, publish (stats, changes, report, card)

The package is light on purpose (nothing is imported here): `beam_pipelines.report` reads this
package's statistics without loading the pass, and the driver imports the report."""
