"""Tests of :mod:`attnflax.report`."""

import json

import pytest

from attnflax import report


def test_markdown_table_right_aligns_numeric_columns():
    table = report.markdown_table(["model", "acc %"], [["cnn", "95.50 ± 0.36"], ["local", 97.2]])
    assert table.splitlines() == [
        "| model |        acc % |",
        "|-------|-------------:|",
        "| cnn   | 95.50 ± 0.36 |",
        "| local |         97.2 |",
    ]
    with pytest.raises(ValueError, match="has 1 cells for 2 headers"):
        report.markdown_table(["a", "b"], [["x"]])


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "results.json"
    report.write_json(path, {"old": 1})
    report.write_json(path, {"accuracy": 0.5, "shape": (2, 3), "odd": {1, 2}})
    assert json.loads(path.read_text()) == {"accuracy": 0.5, "shape": [2, 3], "odd": "{1, 2}"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left
