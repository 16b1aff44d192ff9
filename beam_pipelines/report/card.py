"""README.md, the release's dataset card: the Hugging Face YAML header (pretty name, license,
sources, size bucket, one config whose splits name the data files) and what a reader needs before
training (contents, how it was made, loading, license notes), from card_template.md (a
string.Template) and the release's statistics. The header is written by hand, not by
huggingface_hub's DatasetCardData, whose YAML orders the keys otherwise: a card's bytes stay as they
were."""
from __future__ import annotations

from importlib import resources
from string import Template

import storage
from beam_pipelines.assemble.decontaminate import MIN_PROMPT_WORDS
from beam_pipelines.report.numbers import diversity_rows, stage_rows
from beam_pipelines.report.page import by_count
from schemas.keys import validation_size
from schemas.layout import DATA, MANIFEST, REPORT, ReleaseLayout
from schemas.release_stats import ReleaseStats

TEMPLATE = "card_template.md"


# Hugging Face's size_categories buckets (the Hub's dataset card metadata).
SIZE_BUCKETS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T"))


def size_category(n: int) -> str:
    for limit, name in SIZE_BUCKETS:
        if n < limit:
            return name
    return "n>1T"


def _validation_text(config: dict) -> str:
    share, cap = config.get("validation_fraction", 0), config.get("max_examples")
    if not share:
        return "none."
    seed = ("seed pairs may be in it too" if config.get("seed_in_validation")
            else "seed pairs are all in train")
    if cap:
        return (f"{share:.1%} of the web examples, taken beside the cap: {cap:,} + "
                f"{validation_size(cap, share):,} web examples are selected and the "
                f"{validation_size(cap, share):,} with the smallest validation hash are held out, so train keeps "
                f"the cap's count; {seed}.")
    return (f"a deterministic {share:.1%} of the web examples by hash of the id (the example with the "
            f"smallest hash always, so a small release still has one); {seed}.")


def _near_duplicates_text(config: dict) -> str:
    t = config.get("near_dup_instruction_threshold")
    return (f"and per cluster of near-duplicate instructions (word 3-gram Jaccard >= {t:g}; the highest score "
            "kept)") if t else "(near-duplicate instructions not removed)"


def _decontamination_text(stats: ReleaseStats) -> str:
    d = stats.decontamination or {}
    if not d.get("sets"):
        return "Decontamination: none (not checked against any evaluation set)."
    sets = "; ".join(f"{s['name']} ({s['prompts']:,} prompts, sha256 {s['sha256'][:12]}"
                     + (f"; {s['ignored_prompts']:,} of fewer than {MIN_PROMPT_WORDS} words ignored"
                        if s.get("ignored_prompts") else "")
                     + f"): {d['dropped'].get(s['name'], 0):,} pairs dropped" for s in d["sets"])
    return (f"Decontamination: pairs sharing a {d['ngram']}-word n-gram with an evaluation prompt were dropped: "
            f"{sets}.")


def write_card(folder: str, stats, config: dict) -> str:
    """README.md: the dataset card (module docstring); returns its path."""
    stats = ReleaseStats.of(stats)
    f = stats.funnel
    models = ", ".join(f"{r['stage']}: `{r['model']}`" for r in stage_rows(stats) if r["model"]) or "-"
    origin_lines = "\n".join(f"| {r['origin']} | {r['examples']:,} | {r['avg_tokens_instruction']:,.2f} | "
                             f"{r['avg_tokens_response']:,.2f} |" for r in diversity_rows(stats))
    partial = ""
    if stats.missing_shards:
        partial = (f"\n**Partial release** (`--allow-partial`): candidate shards {stats.missing_shards} had no "
                   "complete generation output; their documents are not in this release.\n")
    # only splits with rows: a split pattern that matches no file is an error for `datasets`
    splits_yaml = "\n".join(f"  - split: {s}\n    path: {DATA}/split={s}/*.parquet" for s in ("train", "validation")
                            if getattr(f, s)) or "  []"
    sources = ["allenai/dolma"] + (["OpenAssistant/oasst1"] if f.seed.get("kept") else [])
    card = Template(resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")).substitute(
        recipe=stats.recipe, version=stats.version, size_category=size_category(f.total),
        sources="\n".join(f"- {s}" for s in sources), splits=splits_yaml, partial=partial, train=f"{f.train:,}",
        validation=f"{f.validation:,}", origins=origin_lines, seed_tag=repr(stats.tags["seed"]),
        web_tag=repr(stats.tags["web"]), candidates=f"{f.candidates:,}",
        input_records=(f.dolma or {}).get("input_records", "?"), models=models,
        min_chars=config["min_instruction_chars"], max_chars=config["max_instruction_chars"],
        near_duplicates=_near_duplicates_text(config),
        cap=f" (capped to {config['max_examples']:,})" if config.get("max_examples") else "",
        decontamination=_decontamination_text(stats), dropped=by_count(f.dropped), validation_text=_validation_text(config),
        report=REPORT, manifest=MANIFEST)
    path = ReleaseLayout(folder).card
    storage.write_text(path, card)
    return path
