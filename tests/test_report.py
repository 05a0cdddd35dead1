"""Tests of :mod:`attnflax.report`."""

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
