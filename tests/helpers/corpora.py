"""Dolma-layout corpora that several test modules read (files of `documents/<source>/*.json.gz`);
each builder writes under `folder` and returns the input glob."""
from tests.conftest import dolma_line, write_dolma_file


def bad_lines_corpus(folder, fixture_texts):
    """Two head files (with every kind of bad line), one middle file."""
    docs = folder / "dolma" / "documents"
    head0 = [dolma_line(f"h{i:03d}", fixture_texts[i], **({"created": "2019-09-15T00:00:00.000Z"} if i == 10 else {}))
             for i in range(0, 40)]
    head1 = [dolma_line(f"h{i:03d}", fixture_texts[i]) for i in range(40, 80)]
    head0 += [
        b'{"id": "bad-json", "text": "x',
        b"[1, 2]",
        dolma_line("no-text", None),
        dolma_line("blank", "  \n"),
        b'{"id": "latin1", "text": "caf\xe9"}',
        dolma_line("a-dup-of-h005", fixture_texts[5]),          # smaller id than h005: it wins
        dolma_line("z-dup-of-h006", "  " + fixture_texts[6].replace(" ", "\n ")),
        dolma_line("long", " ".join(fixture_texts[:60])),
        b"",
    ]
    head1 += [dolma_line("h001", "same id, other text"), dolma_line("huge", "y" * (3 << 20))]
    write_dolma_file(str(docs / "cc_en_head" / "cc_en_head-0000.json.gz"), head0)
    write_dolma_file(str(docs / "cc_en_head" / "cc_en_head-0001.json.gz"), head1)
    write_dolma_file(str(docs / "cc_en_middle" / "cc_en_middle-0000.json.gz"),
                     [dolma_line(f"m{i}", fixture_texts[i]) for i in range(25)])
    return str(docs / "*" / "*.json.gz")


def write_corpus(folder, texts, ids):
    write_dolma_file(str(folder / "documents" / "cc_en_head" / f"{ids[0]}.json.gz"),
                     [dolma_line(i, t) for i, t in zip(ids, texts)])


def ten_documents(folder, fixture_texts):
    """Ten short head documents a00..a09 in one file, under folder/dolma."""
    write_corpus(folder / "dolma", fixture_texts[:10], [f"a{i:02d}" for i in range(10)])
    return str(folder / "dolma" / "documents" / "*" / "*.json.gz")
