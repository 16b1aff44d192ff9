import json

import pytest

from beam_pipelines.prepare.dolma import Document, Reject, field, parse_line, parse_where, split_of


def test_split_of_uses_the_nearest_split_folder():
    assert split_of("gs://b/dolma/documents/cc_en_head/cc_en_head-0001.json.gz", ["cc_en_head"]) == "cc_en_head"
    assert split_of("/d/documents/cc_en_middle/cc_en_middle-0001.json.gz", ["cc_en_head"]) is None
    assert split_of("/d/cc_en_head/x/cc_en_tail/f.json.gz", ["cc_en_head", "cc_en_tail"]) == "cc_en_tail"
    assert split_of("/d/cc_en_head-0001.json.gz", ["cc_en_head"]) is None  # the file name is not a folder


def test_a_good_line_becomes_a_document():
    raw = json.dumps({"id": 7, "text": "Hello", "source": "cc", "metadata": {"url": "https://a"},
                      "added": "2023-03-01T00:00:00.000Z", "created": "2019-09-15T00:00:00.000Z"}).encode()
    doc = parse_line(raw, 1000)
    assert isinstance(doc, Document)
    assert (doc.id, doc.text, doc.source, doc.url) == ("7", "Hello", "cc", "https://a")
    assert doc.crawl_date == "2019-09-15T00:00:00.000Z"   # `created` (the crawl), not `added` (to Dolma)
    assert parse_line(b'{"id": "8", "text": "Hi"}', 1000).crawl_date is None


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty_line"),
    (b"   ", "empty_line"),
    (b'{"id": "a", "text": "x', "malformed_json"),
    (b'["a"]', "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b'{"text": "no id"}', "missing_id"),
    (b'{"id": "  ", "text": "blank id"}', "missing_id"),
    (b'{"id": "a"}', "missing_text"),
    (b'{"id": "a", "text": null}', "missing_text"),
    (b'{"id": "a", "text": 5}', "missing_text"),
    (b'{"id": "a", "text": " \\n\\t "}', "blank_text"),
    (b'{"id": "a", "text": "caf\xe9"}', "invalid_utf8"),
])
def test_bad_lines_become_rejects_with_their_reason(raw, reason):
    out = parse_line(raw, 1000)
    assert isinstance(out, Reject) and out.reason == reason
    assert out.detail


def test_an_oversized_line_is_rejected_with_its_id_and_a_cut_raw_line():
    raw = b'{"id": "big-1", "text": "' + b"x" * (2 << 20) + b'"}'
    out = parse_line(raw, 1 << 20)
    assert out.reason == "too_large" and out.id == "big-1"
    assert len(out.raw) == 4096


def test_unparseable_lines_keep_their_raw_bytes():
    assert parse_line(b'{"broken', 1000).raw == b'{"broken'
    assert parse_line(b'{"id": "a", "text": "caf\xe9"}', 1000).raw.endswith(b"caf\xe9\"}")


def test_field_and_where():
    rec = {"metadata": {"bucket": "head", "n": 3}}
    assert field(rec, "metadata.bucket") == "head"
    assert field(rec, "metadata.missing") is None and field(rec, "x.y") is None
    assert parse_where("metadata.bucket=head, middle") == ("metadata.bucket", {"head", "middle"})
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_where("metadata.bucket")
