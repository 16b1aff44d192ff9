"""The release as a data scientist reads it: the statistics behind report.html (examples,
funnel, per-stage requests, score distributions, comparable lengths and diversity, provenance), the
dataset card, the validation split of small releases, the release read once by `bft train`, and the
report opened in a real headless browser."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from nltk import ngrams
from nltk.tokenize import wordpunct_tokenize

import schemas
import storage
from beam_pipelines.report import card, numbers, plots
from beam_pipelines.report import page as report_page
from beam_pipelines.assemble import corpus_stats
from lifecycle import release
from schemas.layout import RunLayout
from tests.helpers.assemble import gen_row, run, write_marker, write_root, write_seed

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def root(tmp_path, bpe_tokenizer_path):
    return write_root(str(tmp_path / "run"), bpe_tokenizer_path)


@pytest.fixture(scope="module")
def seeded_release(tmp_path_factory, bpe_tokenizer_path):
    """The fixture run assembled with seed data; rewrite shards hold rows a gate did not send."""
    tmp_path = tmp_path_factory.mktemp("seeded_release")
    root = write_root(str(tmp_path / "run"), bpe_tokenizer_path)
    for k in range(2):
        path = RunLayout(root).generation_shard("rewrite", k, 2)
        table = storage.read_parquet(path).to_pylist()
        for row in table:
            if row["id"] in ("a3", "b1"):    # below the score gate / upstream failed: never sent
                row.update(finish_reason=None, response=None, prompt_tokens=None, output_tokens=None,
                           parse_error="not_sent: below_gate" if row["id"] == "a3" else "upstream_failed:missing")
        storage.write_parquet(schemas.to_table(table, schemas.GENERATION, path), path)
        write_marker(root, "rewrite", k, 2)  # re-sealed, as generate does after writing a shard
    stats = run(root, seed_data=write_seed(str(tmp_path / "seed.jsonl")), validation_fraction=0.3, version="v1")
    return os.path.join(root, "sft", "v1"), stats


# ---- mergeable partials ----------------------------------------------------------------------------

def test_stage_partial_counts_requests_sent_not_sent_and_failures_of_sent():
    rows = [gen_row("1", "rewrite", response="ok"), gen_row("2", "rewrite", parse_error="no_res"),
            gen_row("3", "rewrite", finish_reason=None, parse_error="not_sent: below_gate"),
            gen_row("4", "rewrite", finish_reason=None, parse_error="not_sent: below_gate"),
            gen_row("5", "rewrite", finish_reason=None, parse_error="upstream_failed:echo")]
    p = corpus_stats.stage_partial("rewrite", schemas.to_table(rows, schemas.GENERATION))
    assert (p["rows"], p["ok"], p["sent"]) == (5, 1, 2)
    assert p["not_sent"] == {"not_sent: below_gate": 2, "upstream_failed:echo": 1}
    assert p["sent_failures"] == {"no_res": 1}


def test_smallest_partials_do_not_depend_on_sharding():
    rows = [(f"id{i:03d}", {"id": f"id{i:03d}"}) for i in range(50)]
    rng = np.random.default_rng(0)
    for _ in range(3):
        order = rng.permutation(50)
        cuts = sorted(rng.choice(np.arange(1, 50), 4, replace=False))
        parts = [corpus_stats.Smallest(3, [rows[j] for j in chunk]) for chunk in np.split(order, cuts)]
        merged = None
        for part in parts:
            merged = corpus_stats.merge(merged, part)
        assert corpus_stats.summarize({"x": merged}) == {"x": [{"id": "id000"}, {"id": "id001"}, {"id": "id002"}]}


def test_trigram_sample_is_a_fixed_size_and_equals_nltk_on_it():
    texts = [f"word{i % 37} common phrase number {i} and w{i % 11} more" for i in range(2500)]
    table = pa.table({"id": [f"r{i}" for i in range(2500)], "instruction": texts, "response": texts})
    whole = corpus_stats.summarize(corpus_stats.trigram_sample(table))
    parts = None
    for a, b in ((0, 700), (700, 1900), (1900, 2500)):
        parts = corpus_stats.merge(parts, corpus_stats.trigram_sample(table.slice(a, b - a)))
    assert corpus_stats.summarize(parts) == whole
    assert whole["examples"] == corpus_stats.TRIGRAM_SAMPLE == 1000
    import xxhash

    sample = sorted(range(2500), key=lambda i: xxhash.xxh3_64_intdigest(f"r{i}".encode()))[:1000]
    expected = set()
    for i in sample:
        expected |= set(ngrams(wordpunct_tokenize(texts[i].lower()), 3))
    assert whole["unique_trigrams_instruction"] == len(expected)


# ---- the statistics of a published release -----------------------------------------------------------------

def test_examples_funnel_and_stages_travel_through_the_partials(seeded_release):
    folder, stats = seeded_release
    ex = stats["examples"]
    assert [e["id"] for e in ex["kept"]] == ["a0", "b0", "b2", "b4", "b5"]     # kept by recipe and curation
    assert ex["kept"][0] == {"id": "a0", "instruction": "Explain the topic of document a0 please.",
                             "response": "Rewrite answer for a0.", "score": 5.0, "url": "https://example.org/a0",
                             "reason": None, "detail": None, "raw_output": None,
                             "source": "Document a0 is about the weather in the mountains. " * 3}
    # a dropped row carries what the failing stage's model wrote, shown for its output
    no_match = ex["dropped"]["score:no_match"][0]
    assert no_match["raw_output"] is not None and no_match["raw_output"] in open(os.path.join(folder, "report.html")).read()
    dropped = {r: [e["id"] for e in rows] for r, rows in ex["dropped"].items()}
    # the gate comes before the answering stage: a rewrite that was not sent below the gate is a gate drop
    assert dropped == {"backtranslate:echo": ["a1"], "backtranslate:engine_error": ["b1"],
                       "duplicate_instruction": ["b0"], "empty_response": ["b3"], "instruction_too_short": ["a2"],
                       "score_below_threshold": ["a3"], "rewrite:truncated": ["a5"], "score:no_match": ["a4"]}
    assert ex["dropped"]["score:no_match"][0]["detail"] == "no_match"
    assert ex["dropped"]["backtranslate:echo"][0]["url"] == "https://example.org/a1"

    steps = numbers.funnel_rows(stats)
    assert [(s["step"], s["rows"], s["dropped"]) for s in steps] == [
        ("Dolma records read", 20, 0), ("candidates (prepare: length filter, dedup)", 12, 8),
        ("backtranslate: failed or missing", 10, 2), ("score: failed or missing", 9, 1),
        ("gate: score below threshold", 8, 1), ("rewrite: failed or missing", 7, 1),
        ("curation: length or empty", 5, 2),
        ("curation: duplicate instructions", 4, 1), ("web examples", 4, 0), ("+ seed examples", 9, 0),
        ("split: train", stats["funnel"]["final"]["train"], 0),
        ("split: validation", stats["funnel"]["final"]["validation"], 0)]
    assert steps[1]["pct_input"] == 60.0 and steps[8]["pct_candidates"] == 33.33 and steps[0]["pct_candidates"] is None

    rewrite = {r["stage"]: r for r in numbers.stage_rows(stats)}["rewrite"]
    assert (rewrite["rows"], rewrite["sent"]) == (12, 10)
    assert rewrite["not_sent"] == {"not_sent: below_gate": 1, "upstream_failed:missing": 1}
    assert rewrite["pass_rate_of_sent"] == 0.9 and rewrite["sent_failures"] == {"truncated": 1}
    # every stage run is reported, the recipe's and the others (here distill and rate), in pipeline order
    assert [r["stage"] for r in numbers.stage_rows(stats)] == ["backtranslate", "score", "rewrite", "distill", "rate"]
    assert stats["config"]["recipe"] == "filter+rewrite" and stats["code_revision"]

    d = stats["score_distributions"]["score"]
    assert d["non_integer"] == 0 and sum(d["kept"]) == 5 and sum(d["dropped"]) == 6
    assert numbers.score_bars(d) == (["0", "1", "2", "3", "4", "5"], [0, 0, 0, 0, 0, 5], [0, 0, 0, 0, 1, 5])


def test_score_bars_are_continuous_for_fractional_scores():
    kept = corpus_stats.histogram(pa.array([2.35, 4.71]), corpus_stats.FINE_SCORE_EDGES)
    dist = {"kept": kept, "dropped": [0] * len(kept), "non_integer": 2, "edges": corpus_stats.FINE_SCORE_EDGES}
    labels, k, _ = numbers.score_bars(dist)
    assert len(labels) == len(k) == 56 and labels[k.index(1)] == "2.3-2.4"


def test_lengths_are_shares_and_trigrams_use_the_fixed_sample(seeded_release):
    _, stats = seeded_release
    rows = {r["origin"]: r for r in numbers.diversity_rows(stats)}
    assert rows["web"]["sample"] == 4 and not rows["web"]["sample_complete"]
    assert numbers.normalized(stats["by_origin"]["seed"]["length_histogram_response"])[1] == 1.0


def test_report_html_shows_examples_stages_scores_and_provenance(seeded_release):
    folder, stats = seeded_release
    page = open(os.path.join(folder, "report.html")).read()
    assert page == report_page.report_html(stats)
    assert "score scores" not in page and "score stage: integer scores" not in page  # titles are in the PNG
    for text in ("Explain the topic of document a0 please.", '<a href="https://example.org/a0" rel="noopener noreferrer nofollow">',
                 "not_sent: below_gate: 1", "requests sent", "pass rate of sent", '<a href="README.md">',
                 '<a href="manifest.json">', stats["code_revision"], "rewrite:truncated", "tiny-rewrite",
                 "unique response trigrams per 1,000", "fewer than 1,000: not comparable", "Table 6"):
        assert text in page, text
    for name in plots.PLOTS:
        assert f'<img src="plots/{name}.png"' in page and os.path.getsize(os.path.join(folder, "plots", f"{name}.png"))


@pytest.mark.parametrize("url", ["javascript:alert(document.domain)", "JavaScript:alert(1)", " javascript:x",
                                 "data:text/html,<script>alert(1)</script>", "file:///etc/passwd",
                                 "https://a.org/\njavascript:x", "vbscript:msgbox(1)"])
def test_only_http_urls_become_links_and_the_page_forbids_scripts(seeded_release, url):
    """A Dolma `metadata.url` of `javascript:alert(document.domain)` was a clickable
    link. Only http(s) URLs are links; the rest is text; the page's CSP forbids any script."""
    import copy
    import re

    _, stats = seeded_release
    stats = copy.deepcopy(stats)
    kept = stats["examples"]["kept"]
    kept[0]["url"] = url
    page = report_page.report_html(stats)
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert all(h.startswith(("https://", "http://")) or h in ("README.md", "manifest.json", "stats.json")
               for h in hrefs), hrefs
    assert page.lower().count("<script") == 1   # the browse filter's, and no other
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    assert "default-src 'none'" in csp and "img-src 'self'" in csp
    assert f"script-src '{report_page.SCRIPT_HASH}';" in csp and "unsafe" not in csp.split("script-src")[1].split(";")[0]
    assert report_page._link("https://example.org/a?b=1&c=2") == \
        '<a href="https://example.org/a?b=1&amp;c=2" rel="noopener noreferrer nofollow">https://example.org/a?b=1&amp;c=2</a>'


# ---- the card -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,bucket", [(0, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"), (250_000, "100K<n<1M"),
                                      (1_500_000, "1M<n<10M"), (25_000_000, "10M<n<100M"),
                                      (2_000_000_000, "1B<n<10B")])
def test_size_categories_follow_the_hub_buckets(n, bucket):
    assert card.size_category(n) == bucket


def test_models_are_named_as_users_know_them(tmp_path):
    assert numbers.model_name("meta-llama/Llama-2-70b-chat-hf") == "meta-llama/Llama-2-70b-chat-hf"
    assert numbers.model_name("gpt-4o") == "gpt-4o"
    assert numbers.model_name("gs://bucket/models/forward") == "forward"
    folder = tmp_path / "models" / "backward"
    folder.mkdir(parents=True)
    (folder / "bft_train.json").write_text(json.dumps({"config": {"base_model": "meta-llama/Llama-2-7b-hf"}}))
    assert numbers.model_name(str(folder)) == "backward (fine-tuned from meta-llama/Llama-2-7b-hf)"
    assert numbers.model_names(f"{folder}, x/y") == "backward (fine-tuned from meta-llama/Llama-2-7b-hf), x/y"


def test_card_header_and_a_small_release_always_has_a_validation_split(root, tmp_path):
    import datasets

    stats = run(root, seed_data=write_seed(str(tmp_path / "seed.jsonl")), validation_fraction=0.02, version="s")
    folder = os.path.join(root, "sft", "s")
    card = open(os.path.join(folder, "README.md")).read()
    header = card.split("---")[1]
    assert "pretty_name: Back-and-forth translation SFT corpus (filter+rewrite, s)" in header
    assert "source_datasets:\n- allenai/dolma\n- OpenAssistant/oasst1" in header and "- n<1K" in header
    assert "so a small release still has one" in card and "seed pairs are all in train" in card
    # 9 examples at 2%: no id hashes below the fraction, yet one example (the smallest hash) validates
    assert stats["funnel"]["final"] == {"train": 8, "validation": 1, "total": 9}
    ds = datasets.load_dataset(folder)
    assert ds["validation"].num_rows == 1 and ds["train"].num_rows == 8
    from schemas.keys import validation_key

    ids = [r["id"] for split in ds.values() for r in split if r["origin"] == "web"]
    assert list(ds["validation"]["id"]) == [min(ids, key=lambda i: validation_key(i, 0))]
    none = run(root, validation_fraction=0.0, version="n")
    assert none["funnel"]["final"]["validation"] == 0


# ---- bft train reads a release through the release protocol, once --------------------------------------

def test_train_reads_a_release_validated_once(seeded_release, monkeypatch):
    from training import data

    folder, stats = seeded_release
    reads = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(storage, "read_parquet", lambda p: pytest.fail(f"{p} read a second time"))
    train, validation, source = data.load_rows(os.path.dirname(os.path.dirname(folder)))
    data_files = [p for p in reads if p.endswith(".parquet")]
    assert sorted(data_files) == sorted(set(data_files)) and len(data_files) == 3
    assert len(train) == stats["funnel"]["final"]["train"] and len(validation) == stats["funnel"]["final"]["validation"]
    assert source.startswith("release v1")
    manifest, tables = release.load(folder)
    assert tables["train"].schema.metadata[b"bft.kind"] == b"sft"


# ---- the report in a real browser ------------------------------------------------------------------------

def test_report_renders_in_headless_chromium(seeded_release, tmp_path):
    sys.path.insert(0, os.path.join(ROOT_DIR, "scripts"))
    import screenshot_report

    if screenshot_report.find_browser() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    folder, _ = seeded_release
    out = str(tmp_path / "report.png")
    assert subprocess.run([sys.executable, os.path.join(ROOT_DIR, "scripts", "screenshot_report.py"), folder, out],
                          capture_output=True, timeout=300).returncode == 0
    from PIL import Image

    img = Image.open(out)
    assert img.width == 640 and img.height > 600            # the whole page, not a blank window
    assert len(img.getcolors(256 * 256) or []) > 20         # text, tables and plots drawn


def test_alerts_fire_on_a_small_validation_split_errors_and_a_moved_pass_rate():
    from beam_pipelines.report import changes

    stats = {"funnel": {"final": {"validation": 1, "total": 47}, "candidates": 120, "web_examples": 39},
             "stages": {"score": {"sent": 40, "pass_rate": 0.9, "sent_failures": {"engine_error": 3, "content_filter": 1}}}}
    diff = {"parent": "v1", "pass_rates": {"score": {"parent": 0.5, "now": 0.9}}}
    found = changes.alerts(stats, diff, 0.02)
    assert found[0].startswith("validation split: 1 example(s), under the floor of 100")
    assert "transient failures and refusals: 10.0% of the requests sent" in found[1]
    assert "score pass rate moved 50.0% -> 90.0% since the parent v1" in found[2]
    assert changes.alerts(stats, {}, 0.0)[0].startswith("transient")   # no validation split asked: no alert


def test_the_paper_is_beside_us_where_we_measure_the_same(seeded_release):
    """Table 6 lengths for the recipe's row, score validity, the score-5 share and
    the share removed as too long, each with our figure and where the paper says it."""
    folder, stats = seeded_release
    rows = {r[0]: r for r in numbers.paper_rows(stats)}
    assert rows["web instruction length (mean tokens)"][2] == 69 and rows["web response length (mean tokens)"][2] == 468
    assert "Dolma + filtering + rewriting" in rows["web response length (mean tokens)"][3]
    assert rows["score valid (1..5) among pairs scored"][2] == "88%"
    assert rows["head-split records removed as too long"][2] == "~25%"
    page = open(os.path.join(folder, "report.html")).read()
    assert "Beside the paper" in page and "Table 6, Dolma + filtering + rewriting" in page
    # recounted in the paper's unit with the Llama-2-structure tokenizer (mistral-common is installed here)
    lengths = stats["paper_lengths"]
    assert lengths["tokenizer"].startswith("Llama-2 structure") and lengths["examples"] == stats["funnel"]["web_examples"]
    assert f"web response length (mean {lengths['tokenizer']} tokens)" in rows and lengths["instruction"] > 0
    other = numbers.paper_rows(dict(stats, recipe="alpagasus", stages={}, by_origin={}))
    assert [r[0] for r in other] == ["head-split records removed as too long"]   # Table 6 has no alpagasus row


def test_the_too_long_row_counts_every_length_drop():
    """A pair whose document was cut in a stage's prompt is dropped by assemble for its
    length as surely as a document over prepare's limit: the row counted only prepare's."""
    stats = {"funnel": {"dolma": {"input_records": 110, "dropped": {"other_split": 10, "too_long": 10}},
                        "dropped": {"score:input_truncated": 5, "rewrite:input_truncated": 3, "score_below_threshold": 40}}}
    assert {r[0]: r for r in numbers.paper_rows(stats)}["head-split records removed as too long"][1] == "18%"


def test_the_score_summary_of_a_histogram():
    from beam_pipelines.report import changes
    from schemas.outcomes import SCORE_EDGES

    counts = [0] * (len(SCORE_EDGES) + 1)
    counts[2], counts[10] = 3, 1          # three scores in [1, 1.5), one in [5, 5.5)
    s = changes._score_summary({"score_histogram": {"stage": "score", "edges": SCORE_EDGES, "counts": counts}})
    assert s == {"stage": "score", "scored": 4, "mean": 2.0, "share_5": 0.25}
    assert changes._score_summary({}) is None


@pytest.mark.parametrize("threshold,integer_bars,x", [(5.0, True, 4.5), (4.5, True, 4.5), (3.2, True, 3.5),
                                                      (4.5, False, 44.5), (5.0, False, 49.5)])
def test_the_threshold_line_is_drawn_where_the_threshold_is(threshold, integer_bars, x):
    """The logprob mode's 4.5 over integer bars was drawn at 4 (the middle of bar 4). On
    integer bars the line separates the scores below the threshold from those at or over it."""
    assert numbers.threshold_x(threshold, integer_bars) == x


# ---- browsing a sample -------------------------------------------------------------------------------------

def test_the_browse_sample_takes_an_equal_share_of_each_stratum_whatever_the_sharding():
    from schemas.examples import examples

    def table(ids, origin, scores):
        texts = pa.array([f"instruction {i}" for i in ids])
        return examples(texts, texts, ids=pa.array(ids), origin=origin, recipe=None, tag=None, scores=scores,
                        n_tokens_instruction=[1] * len(ids), n_tokens_response=[1] * len(ids))

    big, rare, seed = [f"w{i}" for i in range(300)], ["r0", "r1", "r2"], [f"s{i}" for i in range(50)]
    parts = [table(big[:150] + rare, "web", [5.0] * 150 + [4.5, 4.0, 4.9]), table(big[150:], "web", [5.0] * 150),
             table(seed, "seed", None)]
    whole = corpus_stats.summarize(corpus_stats.browse_partial(pa.concat_tables(parts), "train", 0))
    merged = None
    for t in parts:
        merged = corpus_stats.merge(merged, corpus_stats.browse_partial(t, "train", 0))
    assert corpus_stats.summarize(merged) == whole   # the same rows whatever the sharding
    sample = corpus_stats.browse_sample(whole)
    assert sample["strata"] == {"seed": 50, "web, score 4": 3, "web, score 5": 300}
    by = {}
    for row in sample["rows"]:
        by.setdefault(row["stratum"], []).append(row["id"])
    assert {s: len(v) for s, v in by.items()} == {"seed": 50, "web, score 4": 3, "web, score 5": 147}
    from schemas.keys import sample_key

    assert by["web, score 5"] == sorted(big, key=lambda i: (sample_key(i, 0), i))[:147]


def test_the_report_holds_the_sample_and_allows_its_one_script_by_hash(seeded_release):
    """The inline filter runs under the page's CSP only if the CSP's sha256 is the script's, byte for byte."""
    import base64
    import hashlib
    import re

    folder, stats = seeded_release
    page = open(os.path.join(folder, "report.html")).read()
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page
    assert len(stats["browse"]["rows"]) == page.count("<tr class=row>") == 9   # 4 web + 5 seed: all of them
    assert stats["browse"]["strata"] == {"seed": 5, "web, score 5": 4}


def test_the_filter_keeps_rows_holding_every_word_typed():
    """The page's own filter function, run under node (the same bytes the page ships)."""
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on this machine")
    cases = {"": True, "a0": True, "EXPLAIN   weather": True, "explain snow": False, "zzz": False}
    code = report_page.BROWSE_SCRIPT + "\nprocess.stdout.write(JSON.stringify(" + json.dumps(list(cases)) + \
        ".map(function (q) { return bftMatches('a0 Explain the weather', q); })));"
    out = subprocess.run([node, "-e", code], capture_output=True, text=True, timeout=60).stdout
    assert json.loads(out) == list(cases.values())


def test_typing_a_filter_narrows_the_rows_in_headless_chromium(seeded_release):
    """The report in a real browser, its CSP enforced: a filter (carried in the link: #q=) hides the rows
    that do not hold it."""
    import re

    sys.path.insert(0, os.path.join(ROOT_DIR, "scripts"))
    import screenshot_report

    browser = screenshot_report.find_browser()
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    folder, _ = seeded_release
    url = "file://" + os.path.abspath(os.path.join(folder, "report.html"))

    def rows(fragment):
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url + fragment],
                             capture_output=True, text=True, timeout=120).stdout
        found = re.findall(r'<tr class="row"( hidden="")?>', dom)
        return len(found), sum(1 for h in found if not h), re.search(r'<span id="shown">([^<]*)<', dom).group(1)

    assert rows("#q=a0%20Explain") == (9, 1, "1 of 9 shown")   # one browser start: a CSP that blocked the
    # script would leave all 9 shown (its hash mismatched, this fails)


# ---- drop reasons and the stats as types (issue 38) -----------------------------------------------------

@pytest.mark.parametrize("reason,step,stage", [
    ("score:no_score", "GATE", "score"), ("rate_below_threshold", "GATE", "rate"),
    ("score:no_match", "STAGE", "score"), ("rewrite:input_truncated", "STAGE", "rewrite"),
    ("contaminated:alpaca_eval", "DECONTAMINATION", None), ("instruction_too_short", "CURATION", None),
    ("missing_generation_shard", "MISSING_SHARDS", None), ("over_cap", "CAP", None),
    ("not_kept_by:filter", "OTHER", None), ("malformed_json", "PREPARE", None), ("something_new", "OTHER", None)])
def test_a_drop_reason_read_back_has_its_declared_step(reason, step, stage):
    import pickle

    from schemas import drops

    d = drops.parse(reason)
    assert (d, d.step.name, d.stage) == (reason, step, stage)
    assert pickle.loads(pickle.dumps(d)).step is d.step and json.dumps({d: 1}) == json.dumps({reason: 1})


def test_release_stats_read_and_written_back_are_the_same_bytes_and_merge_by_counts(seeded_release):
    from schemas.drops import Step
    from schemas.release_stats import ReleaseStats

    folder, _ = seeded_release
    raw = open(os.path.join(folder, "stats.json")).read()
    stats = ReleaseStats.from_dict(json.loads(raw))
    assert json.dumps(stats.to_dict(), indent=2) + "\n" == raw
    assert stats.funnel.dropped_at(Step.GATE) == {"score_below_threshold": 1}
    both = stats + stats
    assert both.funnel.candidates == 2 * stats.funnel.candidates and both.funnel.total == 2 * stats.funnel.total
    assert both.stages["score"].rows == 2 * stats.stages["score"].rows
    assert both.stages["score"].pass_rate == stats.stages["score"].pass_rate   # derived again from the sums
    assert both.by_origin["web"].avg_tokens("response") == stats.by_origin["web"].avg_tokens("response")
    assert both.gate.pass_rate == stats.gate.pass_rate and both.version == stats.version
