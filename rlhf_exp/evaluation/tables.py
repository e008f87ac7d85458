"""The one markdown table writer: stage=eval's summary, the sweep report and docs/layout.md's metric table."""

from __future__ import annotations

import math


def cell(value) -> str:
    """A float to 4 significant digits (NaN as is), None as nothing, anything else as its text; `|` escaped for
    markdown."""
    if value is None:
        return ""
    text = f"{value:.4g}" if isinstance(value, float) and not math.isnan(value) else str(value)
    return text.replace("|", "&#124;")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A row per dict, the `columns` that some row has (all of them when there is no row), in their order
    (a repeated one once)."""
    columns = [c for c in dict.fromkeys(columns) if not rows or any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
