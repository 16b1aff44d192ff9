"""The real-text benchmark corpus (benchmarks/real_corpus.py): the synthetic corpus's layout, real text,
log-normal lengths, determinism and the explicit duplicate share, built from the sources every machine
has (Python's docs and the installed packages' descriptions) with the system folders pointed elsewhere."""
import copy
import gzip
import json
import os
import shutil
import statistics

import pytest

from benchmarks import real_corpus
from benchmarks.corpus import TextMaker, write_dolma
from benchmarks.real_corpus import RealText, Sources, make_real_corpus

N = 2000


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> RealText:
    nowhere = str(tmp_path_factory.mktemp("nowhere") / "missing")
    sources = Sources(man=nowhere, info=nowhere, doc=nowhere, pydoc_modules=("json", "textwrap", "argparse"))
    return RealText(sources, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def docs(text):
    return list(text.documents(N, seed=3))


def read(root: str) -> dict[str, list[dict]]:
    files = sorted(os.listdir(os.path.join(root, "documents", "cc_en_head")))
    return {f: [json.loads(line) for line in gzip.open(os.path.join(root, "documents", "cc_en_head", f), "rt")]
            for f in files}


def test_missing_sources_are_counted_and_the_rest_builds(text):
    assert text.missing == ["man", "info", "doc"]
    assert set(text.stats) == {"pydoc", "metadata"}
    assert text.stats["pydoc"]["chars_distinct"] > 100_000 and text.stats["metadata"]["chars_distinct"] > 10_000


def test_layout_matches_the_synthetic_corpus(tmp_path, text):
    synthetic = read(write_dolma(str(tmp_path / "synthetic"), 30, 3, maker=TextMaker(seed=1))[0].rsplit("/", 3)[0])
    real = read(make_real_corpus(str(tmp_path / "real"), 300, 3, text=text))
    assert list(real) == list(synthetic) == [f"cc_en_head-{i:04d}.json.gz" for i in range(3)]
    ours, theirs = [d for f in real.values() for d in f], [d for f in synthetic.values() for d in f]
    assert len(ours) == 300 and len({d["id"] for d in ours}) == 300
    assert {tuple(d) for d in ours} == {tuple(d) for d in theirs}
    assert {tuple(d["metadata"]) for d in ours} == {tuple(d["metadata"]) for d in theirs}
    assert ours[0]["id"] == theirs[0]["id"] == "cc_en_head-00000000"
    assert {d["source"] for d in ours} == {"pydoc", "metadata"}
    assert all(d["metadata"]["url"].startswith("https://") for d in ours)


def test_documents_are_real_documentation(docs):
    texts = [d.text for d in docs]
    assert all(t and t == t.strip("\n").rstrip() for t in texts)  # no blank lines or spaces at the ends
    share = lambda pred: sum(map(pred, texts)) / len(texts)  # noqa: E731
    assert share(lambda t: "\n" in t) > 0.95
    assert share(lambda t: "\n    " in t or "\n |  " in t) > 0.3       # indented code, option lists, pydoc
    assert share(lambda t: "http" in t) > 0.05                         # links
    assert share(lambda t: any(c.isdigit() for c in t)) > 0.5
    words = " ".join(texts[:200]).split()
    assert sum(w.lower() in {"the", "of", "to", "a", "and"} for w in words) / len(words) > 0.02  # English


def test_lengths_are_log_normal_around_the_median(docs, text):
    lengths = [len(d.text) for d in docs if not d.duplicate]
    assert 2500 <= statistics.median(lengths) <= 3600
    assert 4000 <= statistics.mean(lengths) <= 6200
    assert max(lengths) <= 80_000 + real_corpus.MAX_PARAGRAPH
    short = [len(d.text) for d in text.documents(500, seed=3, median_chars=300)]
    assert 200 <= statistics.median(short) <= 450


def test_deterministic_for_a_seed(docs, text):
    again = list(text.documents(N, seed=3))
    assert [d.text for d in again] == [d.text for d in docs]
    assert [d.text for d in text.documents(50, seed=4)] != [d.text for d in docs[:50]]


@pytest.mark.parametrize("n_files", [None, 40])
def test_duplicates_are_the_explicit_share_only(docs, text, n_files):
    if n_files:  # a few files: the documents run over them many times, and a re-used window is never a copy
        text = copy.copy(text)
        text.files = text.files[:n_files]
        docs = list(text.documents(N, seed=3))
        assert sum(d.reused for d in docs) > N * 0.9
    seen, copies = set(), 0
    for d in docs:
        copies += d.text in seen
        assert (d.text in seen) == d.duplicate
        seen.add(d.text)
    assert 0.01 <= copies / N <= 0.03


def test_extracted_text_is_cached(tmp_path, monkeypatch):
    sources = Sources(man=str(tmp_path / "none"), info=str(tmp_path / "none"), doc=str(tmp_path / "none"),
                      pydoc_modules=("textwrap",))
    first = RealText(sources, cache_dir=str(tmp_path / "cache"))

    def fail(*args):
        raise AssertionError("extracted again")

    monkeypatch.setattr(real_corpus, "python_docs", fail)
    monkeypatch.setattr(real_corpus, "package_metadata", fail)
    second = RealText(sources, cache_dir=str(tmp_path / "cache"))
    assert second.files == first.files


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_man_pages_render_as_man_shows_them(tmp_path):
    man1 = tmp_path / "man" / "man1"
    man1.mkdir(parents=True)
    page = (".TH DEMO 1\n.SH NAME\ndemo \\- show a demo\n.SH OPTIONS\n.TP\n\\fB\\-v\\fR, \\fB\\-\\-verbose\\fR\n"
            "say more\n.SH SEE ALSO\nhttps://example.org/demo\n")
    with gzip.open(man1 / "demo.1.gz", "wt") as f:
        f.write(page)
    (man1 / "alias.1").write_text(".so man1/demo.1\n")
    (man1 / "gcloud_alpha_demo.1").write_text(page)
    pages = real_corpus.man_pages(str(tmp_path / "man"))
    assert [os.path.basename(p) for p, _ in pages] == ["demo.1.gz"]
    rendered = pages[0][1]
    assert "DEMO(1)" in rendered and "\n       demo - show a demo" in rendered
    assert "\n       -v, --verbose\n              say more" in rendered
