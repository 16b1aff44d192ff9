"""The README's lines for reading a release ("Reading a release"), run as they are written on a published
release: each reader gets both splits and tells them apart (before, every reader but
`datasets` got train and validation mixed, with no split column, and DuckDB could not read `data/`)."""
import collections
import json
import os
import re

import pytest

from lifecycle import release
from tests.conftest import ROOT


def readme_reader_lines() -> list[str]:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("<!-- readers -->")[1].split("<!-- /readers -->")[0]
    return [line for line in block.splitlines() if line and not line.startswith("```")]


def split_counts(value) -> dict[str, int]:
    """{split: rows} of what a reader returned: a DatasetDict, or a table with a split column."""
    import datasets
    import pyarrow as pa

    if isinstance(value, datasets.DatasetDict):
        return {name: ds.num_rows for name, ds in value.items()}
    column = value["split"].to_pylist() if isinstance(value, pa.Table) else list(value["split"])
    return dict(collections.Counter(str(s) for s in column))


def reader_of(line: str) -> str:
    return re.search(r"\b(pd|pyarrow|polars|duckdb|datasets)\.", line).group(1)


@pytest.mark.parametrize("line", readme_reader_lines(), ids=reader_of)
def test_each_readme_reader_line_reads_both_splits_apart(_published, line, tmp_path, monkeypatch):
    reader = reader_of(line)
    module = {"pd": "pandas", "pyarrow": "pyarrow.dataset"}.get(reader, reader)
    __import__(module)
    if reader == "datasets":   # its cache, keyed by path, would answer for an earlier test run's release
        monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "hf"))
    namespace = {"release": release.resolve(os.path.join(_published, "sft"))}
    exec(f"import {module}\n{'import pandas as pd' if reader == 'pd' else ''}\n{line}", namespace)
    counts = json.load(open(os.path.join(namespace["release"], release.MANIFEST)))["counts"]
    assert split_counts(namespace[line.split("=")[0].strip()]) == counts and counts["validation"] > 0
