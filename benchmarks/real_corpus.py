"""Dolma-layout corpora cut from real English text found on this machine, beside the synthetic corpus
of benchmarks/corpus.py (whose Zipf-drawn words flatter the chunk cache).

The text is technical documentation, rendered offline:

    man        /usr/share/man/man[1-9]: English pages rendered by groff as `man` shows them (tbl,
               UTF-8, justified 78-column text, headers and footers); aliases (`.so` pages, links)
               skipped; of the 16,631 Google Cloud SDK pages only the GA ones (no alpha/beta copies),
               one in GCLOUD_EVERY (6) of them, by name: they are 93% of man1 and alike
    info       /usr/share/info/*.info*.gz: GNU manuals, plain text already (node headers removed)
    doc        /usr/share/doc: READMEs, changelogs, copyright texts, NEWS, *.txt/*.md/*.rst (*.gz too)
    pydoc      Python's reference topics (`pydoc_data.topics`) and `pydoc.render_doc` of the public
               standard-library modules and their submodules, in plain text
    metadata   the description (Markdown/reST README) of every distribution in site-packages

Each source is skipped when its folder is missing (or, for man, when groff is), and counted in
`RealText.missing`; pydoc and metadata always exist. The extracted text is cached per source (see
`extract`), so only the first run renders the man pages.

Documents: the source files are split into paragraphs (at blank lines; paragraphs over MAX_PARAGRAPH
characters at line ends), a paragraph of MIN_UNIQUE characters or more that was already seen is dropped
(so the distinct text counts once: the same license in many packages, gcloud's common flags), and a
/usr/share/doc file gives its first MAX_DOC_FILE characters (the newest entries of a changelog; whole
changelogs would be half the text). Documents are windows of consecutive paragraphs over the files in
a seeded random order, their lengths log-normal (median `median_chars`, sigma 1: mean ~1.65x the
median, cut at 80K characters), each cut at the paragraph boundary nearest its drawn length. When the
distinct text runs out, a new pass begins over a new random order of the files: the windows fall at
other offsets and join other neighbours, and a window equal to an earlier document is skipped, so only
the explicit 2% of exact duplicates (drawn as in the synthetic corpus) are copies.

How much text there is, on the development machine (`python -m benchmarks.real_corpus --stats`):
83.1M distinct characters (man 33.8M from 4,342 pages, doc 39.1M from 2,916 files, pydoc 4.3M,
info 3.9M, metadata 1.9M). At median 3,000 a document averages ~4.9K characters, so the distinct
text makes ~17K documents: at 30K documents 43%, at 100K 83% and at 300K 94% of the documents are
built from re-used paragraphs (in another order and cut, but the same paragraphs: a chunk cache
meets their rare chunks again, which a real crawl of that size would not repeat); at median 300
(prepare_bench's memory part) 1M documents are 86% re-used. The first extraction costs ~100
CPU-seconds, nearly all groff (~20 ms a page): ~50 s on two idle cores, 130-190 s measured on the
shared development machine under load; later runs read the cache in ~5 s.

    .venv/bin/python -m benchmarks.real_corpus --output /tmp/real --docs 2000 --files 4
    .venv/bin/python -m benchmarks.real_corpus --stats --docs 30000 100000 300000
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import email.parser
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from typing import Iterator

import numpy as np

SOURCES = ("man", "info", "doc", "pydoc", "metadata")
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work", "real-text")
VERSION = 2            # of the extraction: bump to re-extract
GCLOUD_EVERY = 6       # one GA gcloud page in this many
MAX_PARAGRAPH = 2000   # longer paragraphs are cut at line ends
MIN_UNIQUE = 80        # a repeated paragraph this long or longer is dropped (shorter: headings, "--")
MAX_DOC_FILE = 100_000  # characters from the head of a /usr/share/doc file (changelogs would outweigh the rest)

_DOC_NAMES = re.compile(r"(readme|changelog|changes|news|history|copyright|authors|thanks|todo|faq|bugs|"
                        r"credits|contributing|notes)([._-].*)?$|.*\.(txt|md|rst|markdown)$", re.IGNORECASE)
_BLANKS = re.compile(r"\n(?:[ \t|]*\n)+")  # blank lines (pydoc's class bodies draw them as " |  ")

# Runs in a fresh interpreter: imports must not leak into the caller, and some modules print when
# imported. argv: a JSON list of module names or null (all); the result is the last line of stdout.
# Object addresses in default values are fixed, and the hash seed (set reprs), the working directory
# and the arguments (`sys`'s page shows them) are the same every run, so that the text is too.
_PYDOC_SCRIPT = r'''
import contextlib, importlib, io, json, os, pydoc, re, sys, sysconfig, warnings
warnings.simplefilter("ignore")
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "lib2to3",
        "pydoc_data", "test", "encodings", "xxsubtype", "xxlimited", "xxlimited_35", "__phello__"}
names = json.loads(sys.argv[1])
if names is None:
    stdlib, names = sysconfig.get_paths()["stdlib"], []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP:
            continue
        names.append(top)
        folder = os.path.join(stdlib, top)
        for base, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(("_", "test")) and
                             os.path.exists(os.path.join(base, d, "__init__.py")))
            pkg = os.path.relpath(base, stdlib).replace(os.sep, ".")
            names += [f"{pkg}.{f[:-3]}" for f in sorted(files)
                      if f.endswith(".py") and not f.startswith(("_", "test"))]
            if base != folder:
                names.append(pkg)
from pydoc_data.topics import topics
docs = [["topic:" + k, topics[k]] for k in sorted(topics)]
for name in names:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        docs.append([name, re.sub(r"(?<=at 0x)[0-9a-f]{6,}|(?<=handle )[0-9a-f]{6,}", "7f3a2c1d5e60", text)])
    except BaseException:
        pass
sys.stdout.write("\n" + json.dumps(docs) + "\n")
'''


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where each source is read from; point a folder elsewhere (or at nothing) to leave it out."""
    man: str = "/usr/share/man"
    info: str = "/usr/share/info"
    doc: str = "/usr/share/doc"
    site_packages: str = sysconfig.get_paths()["purelib"]
    pydoc_modules: tuple[str, ...] | None = None  # None: every public stdlib module and submodule
    gcloud_every: int = GCLOUD_EVERY

    def key(self, source: str) -> str:
        """What the cached text of `source` depends on (for the packages, which are installed)."""
        installed = sorted(glob.glob(os.path.join(self.site_packages, "*-info"))) if source == "metadata" else []
        parts = {"man": (self.man, self.gcloud_every), "info": (self.info,), "doc": (self.doc,),
                 "pydoc": (self.pydoc_modules, sys.version), "metadata": (self.site_packages, installed)}[source]
        return hashlib.sha1(json.dumps([VERSION, source, *parts]).encode()).hexdigest()[:12]


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if path.endswith(".gz") else data


def _render_man(path: str) -> str:
    """The page as `man` shows it on a 80-column terminal, without bold or underlining ("" for an alias)."""
    data = _read(path)
    if data.startswith(b".so ") and data.count(b"\n") <= 2:
        return ""
    out = subprocess.run(["groff", "-t", "-k", "-man", "-Tutf8", "-P-cbou", "-Wall"],
                         input=data, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60)
    return _decode(out.stdout)


def man_pages(root: str, gcloud_every: int = GCLOUD_EVERY, workers: int = 2) -> list[tuple[str, str]]:
    """(path, rendered text) of the English man pages under `root` (see the module docstring)."""
    paths, gcloud = [], 0
    for path in sorted(glob.glob(os.path.join(root, "man[1-9]", "*"))):
        name = os.path.basename(path)
        if os.path.islink(path) or not os.path.isfile(path) or name.startswith(("gcloud_alpha_", "gcloud_beta_")):
            continue
        if name.startswith("gcloud_"):
            gcloud += 1
            if (gcloud - 1) % gcloud_every:
                continue
        paths.append(path)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        texts = list(pool.map(_render_man, paths))
    return [(p, t) for p, t in zip(paths, texts) if t.strip()]


def info_pages(root: str) -> list[tuple[str, str]]:
    """(path, text) of the info manuals under `root`, without node headers and tag tables."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*.info*"))):
        if not re.search(r"\.info(-\d+)?(\.gz)?$", path):
            continue
        nodes = []
        for node in _decode(_read(path)).split("\x1f"):
            node = node.lstrip("\n")
            if node.startswith(("Tag Table:", "Indirect:", "End Tag Table", "Local Variables")):
                continue
            if node.startswith("File: "):
                node = node.split("\n", 1)[1] if "\n" in node else ""
            if node.strip():
                nodes.append(node.strip("\n"))
        if nodes:
            out.append((path, "\n\n".join(nodes)))
    return out


def doc_files(root: str, max_bytes: int = 8 << 20) -> list[tuple[str, str]]:
    """(path, text) of the READMEs, changelogs, copyright and text files under `root`; identical files
    (the same copyright text in many packages) once."""
    out, seen = [], set()
    for base, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            plain = name[:-3] if name.endswith(".gz") else name
            if os.path.islink(path) or not _DOC_NAMES.match(plain) or os.path.getsize(path) > max_bytes:
                continue
            try:
                data = _read(path)
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            digest = hashlib.sha1(data).digest()
            if b"\x00" in data[:8192] or digest in seen:
                continue
            seen.add(digest)
            out.append((path, _decode(data)))
    return out


def python_docs(modules: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """(name, text) of Python's reference topics and of `modules` rendered by pydoc (None: every public
    standard-library module and submodule), rendered in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([sys.executable, "-s", "-c", _PYDOC_SCRIPT, json.dumps(modules)], check=True,
                         env={**env, "PYTHONHASHSEED": "0"}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, cwd="/", timeout=600)
    return [(name, text) for name, text in json.loads(out.stdout.rstrip().rsplit(b"\n", 1)[-1])]


def package_metadata(site_packages: str) -> list[tuple[str, str]]:
    """(name, description) of every distribution installed in `site_packages`: the body of its
    METADATA (or PKG-INFO), else its Description field."""
    out = {}
    for path in sorted(glob.glob(os.path.join(site_packages, "*.dist-info", "METADATA")) +
                       glob.glob(os.path.join(site_packages, "*.egg-info", "PKG-INFO"))):
        with open(path, "rb") as f:
            msg = email.parser.BytesParser().parse(f)
        body = msg.get_payload()
        if not isinstance(body, str) or not body.strip():
            desc = str(msg.get("Description") or "")
            body = re.sub(r"\n {7}(?:\|| )", "\n", desc)  # continuation lines of the field
        name = str(msg.get("Name") or os.path.basename(os.path.dirname(path)))
        if body.strip() and body.strip() != "UNKNOWN" and name not in out:
            out[name] = _decode(body.encode("utf-8", "surrogateescape"))
    return sorted(out.items())


def _folder(sources: Sources, source: str) -> str | None:
    return {"man": sources.man, "info": sources.info, "doc": sources.doc,
            "metadata": sources.site_packages}.get(source)


def extract(source: str, sources: Sources, cache_dir: str | None = CACHE, workers: int = 2
            ) -> list[tuple[str, str]] | None:
    """(origin, text) of one source's files, from `cache_dir` when extracted before (None: no cache);
    None when the source is missing here."""
    folder = _folder(sources, source)
    if folder is not None and not os.path.isdir(folder):
        return None
    if source == "man" and shutil.which("groff") is None:
        return None
    cached = os.path.join(cache_dir, f"{source}-{sources.key(source)}.jsonl.gz") if cache_dir else None
    if cached and os.path.exists(cached):
        with gzip.open(cached, "rt", encoding="utf-8") as f:
            return [tuple(json.loads(line)) for line in f]
    if source == "man":
        texts = man_pages(sources.man, sources.gcloud_every, workers)
    elif source == "info":
        texts = info_pages(sources.info)
    elif source == "doc":
        texts = doc_files(sources.doc)
    elif source == "pydoc":
        texts = python_docs(sources.pydoc_modules)
    else:
        texts = package_metadata(sources.site_packages)
    if cached:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
            for origin, text in texts:
                f.write(json.dumps([origin, text], ensure_ascii=False) + "\n")
        os.replace(tmp, cached)
    return texts


def origin_url(source: str, origin: str) -> str:
    if source == "pydoc":
        if origin.startswith("topic:"):
            return f"https://docs.python.org/3/reference/#{origin[6:]}"
        return f"https://docs.python.org/3/library/{origin}.html"
    if source == "metadata":
        return f"https://pypi.org/project/{origin}/"
    return "file://" + origin


def paragraphs(text: str) -> list[str]:
    """`text` cut after each run of blank lines, and paragraphs over MAX_PARAGRAPH characters after their
    last line end within each MAX_PARAGRAPH characters (a longer line stays whole); "".join of the result
    is `text`."""
    text = text.replace("\r\n", "\n")
    out, start = [], 0
    for end in [m.end() for m in _BLANKS.finditer(text)] + [len(text)]:
        while end - start > MAX_PARAGRAPH:
            cut = text.rfind("\n", start + 1, start + MAX_PARAGRAPH)
            if cut < 0:
                cut = text.find("\n", start + MAX_PARAGRAPH, end)
                if cut < 0:
                    break
            out.append(text[start:cut + 1])
            start = cut + 1
        if end > start:
            out.append(text[start:end])
            start = end
    return out


@dataclasses.dataclass
class Document:
    text: str
    source: str
    url: str
    reused: bool     # holds paragraphs an earlier pass already used
    duplicate: bool  # an exact copy of an earlier document (the explicit share)


class RealText:
    """The distinct paragraphs of every source, and the documents cut from them."""

    def __init__(self, sources: Sources | None = None, cache_dir: str | None = CACHE, workers: int = 2):
        self.sources = sources or Sources()
        self.files: list[tuple[str, str, list[str]]] = []  # (source, url, paragraphs)
        self.missing: list[str] = []
        self.stats: dict[str, dict] = {}
        seen: set[bytes] = set()
        for source in SOURCES:
            t0 = time.perf_counter()
            texts = extract(source, self.sources, cache_dir, workers)
            if texts is None:
                self.missing.append(source)
                continue
            st = {"files": 0, "chars_extracted": 0, "chars_distinct": 0, "paragraphs": 0,
                  "seconds": round(time.perf_counter() - t0, 1)}
            limit = MAX_DOC_FILE if source == "doc" else None
            for origin, text in texts:
                kept, size = [], 0
                for p in paragraphs(text):
                    if limit and size >= limit:
                        break
                    body = p.strip()
                    if not body:
                        continue
                    if len(body) >= MIN_UNIQUE:
                        digest = hashlib.blake2b(body.encode("utf-8", "surrogatepass"), digest_size=12).digest()
                        if digest in seen:
                            continue
                        seen.add(digest)
                    kept.append(p)
                    size += len(p)
                st["chars_extracted"] += len(text)
                if kept:
                    self.files.append((source, origin_url(source, origin), kept))
                    st["files"] += 1
                    st["paragraphs"] += len(kept)
                    st["chars_distinct"] += sum(map(len, kept))
            self.stats[source] = st
        if not self.files:
            raise ValueError("no source text found")

    @property
    def distinct_chars(self) -> int:
        return sum(st["chars_distinct"] for st in self.stats.values())

    def _paragraphs(self, rng: np.random.Generator) -> Iterator[tuple[int, int, int]]:
        """(pass, file index, paragraph index) forever: each pass over the files in a new random order."""
        n_pass = 0
        while True:
            for f in rng.permutation(len(self.files)):
                for p in range(len(self.files[f][2])):
                    yield n_pass, int(f), p
            n_pass += 1

    def documents(self, n_docs: int, seed: int = 0, median_chars: float = 3000.0, sigma: float = 1.0,
                  cap: int = 80000, dup_rate: float = 0.02) -> Iterator[Document]:
        """`n_docs` documents, deterministic for a seed (see the module docstring)."""
        rng = np.random.default_rng(seed)
        stream = self._paragraphs(np.random.default_rng([seed, 1]))
        pending: collections.deque = collections.deque()
        seen: set[bytes] = set()
        recent: collections.deque = collections.deque(maxlen=2000)
        for _ in range(n_docs):
            if recent and rng.random() < dup_rate:
                doc = recent[int(rng.integers(len(recent)))]
                yield dataclasses.replace(doc, duplicate=True)
                continue
            target = int(min(cap, max(40, rng.lognormal(np.log(median_chars), sigma))))
            for _attempt in range(10_000):
                parts, total = [], 0
                while total < target:
                    item = pending.popleft() if pending else next(stream)
                    size = len(self.files[item[1]][2][item[2]])
                    if parts and total + size - target > target - total:  # nearer without it
                        pending.appendleft(item)
                        break
                    parts.append(item)
                    total += size
                text = "".join(self.files[f][2][p] for _, f, p in parts).strip("\n").rstrip()
                digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).digest()
                if text and digest not in seen:
                    break
                pending.extendleft(reversed(parts[1:]))  # the same window again: start one paragraph on
            else:
                raise ValueError(f"too little distinct text ({self.distinct_chars:,} characters) for {n_docs:,} "
                                 "documents")
            seen.add(digest)
            source, url = self.files[parts[0][1]][:2]
            doc = Document(text, source, url, reused=any(n for n, _, _ in parts), duplicate=False)
            recent.append(doc)
            yield doc


def write_real_dolma(root: str, n_docs: int, n_files: int, split: str = "cc_en_head", dup_rate: float = 0.02,
                     seed: int = 0, text: RealText | None = None, id_prefix: str = "",
                     median_chars: float = 3000.0) -> list[str]:
    """As `corpus.write_dolma`, from real text: `n_docs` documents as
    `root/documents/<split>/<split>-NNNN.json.gz`; returns the paths."""
    text = text or RealText()
    folder = os.path.join(root, "documents", split)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{split}-{i:04d}.json.gz") for i in range(n_files)]
    handles = [gzip.open(p, "wt", encoding="utf-8", compresslevel=1) for p in paths]
    try:
        docs = text.documents(n_docs, seed=seed, median_chars=median_chars, dup_rate=dup_rate)
        for n, d in enumerate(docs):
            doc = {
                "id": f"{id_prefix}{split}-{n:08d}",
                "text": d.text,
                "source": d.source,
                "added": "2023-03-01T00:00:00.000Z",
                "created": "2019-09-15T00:00:00.000Z",
                "metadata": {"url": d.url, "bucket": split.rsplit("_", 1)[-1]},
            }
            handles[n % n_files].write(json.dumps(doc, ensure_ascii=False) + "\n")
    finally:
        for h in handles:
            h.close()
    return paths


def make_real_corpus(root: str, n_docs: int, files: int, seed: int = 0, median_chars: float = 3000.0,
                     text: RealText | None = None) -> str:
    """A real-text corpus of `n_docs` documents in `files` files of root/documents/cc_en_head; returns root."""
    write_real_dolma(root, n_docs, files, seed=seed, text=text, median_chars=median_chars)
    return root


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", help="write a corpus here")
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--median-chars", type=float, default=3000.0)
    ap.add_argument("--cache", default=CACHE, help="extracted text is cached here")
    ap.add_argument("--stats", action="store_true", help="print the text per source, and the share of "
                                                         "documents built from re-used paragraphs at each --docs")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    text = RealText(cache_dir=args.cache)
    print(f"text ready in {time.perf_counter() - t0:.1f} s; missing sources: {text.missing or 'none'}", flush=True)
    if args.stats:
        print("| source | files | characters extracted | distinct characters | paragraphs | seconds |")
        print("|---|---:|---:|---:|---:|---:|")
        for source, st in text.stats.items():
            print(f"| {source} | {st['files']:,} | {st['chars_extracted']:,} | {st['chars_distinct']:,} | "
                  f"{st['paragraphs']:,} | {st['seconds']} |")
        print(f"distinct text: {text.distinct_chars:,} characters")
        for n in args.docs:
            lengths, reused = [], 0
            for d in text.documents(n, seed=args.seed, median_chars=args.median_chars):
                lengths.append(len(d.text))
                reused += d.reused
            print(f"{n:,} documents: median {np.median(lengths):,.0f}, mean {np.mean(lengths):,.0f} characters; "
                  f"{reused / n:.1%} built from re-used paragraphs", flush=True)
    if args.output:
        make_real_corpus(args.output, args.docs[0], args.files, seed=args.seed, median_chars=args.median_chars,
                         text=text)


if __name__ == "__main__":
    main()
