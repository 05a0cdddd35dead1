"""The experiment scripts' reports: markdown tables and JSON files (standard library only)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (cells formatted with ``str``; numbers right-aligned).

    Args:
      headers: Column names.
      rows: One sequence of cells per row, each as long as `headers`.

    Returns:
      The table as lines joined by newlines (no trailing newline).
    """
    cells = [[str(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells for {len(headers)} headers.")
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(cells) and all(_looks_numeric(r[i]) for r in cells) for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if n else "-" * (w + 2) for w, n in zip(widths, numeric, strict=True)
    ) + "|"
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def _looks_numeric(text: str) -> bool:
    t = text.replace(",", "").replace("%", "").replace("±", " ").split()
    if not t:
        return False
    try:
        float(t[0])
    except ValueError:
        return False
    return True


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes `obj` as indented JSON, atomically (temp file + rename)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=repr)
        f.write("\n")
    os.replace(tmp, path)
