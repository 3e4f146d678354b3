"""The table printer: GitHub-flavoured markdown tables, readable in a terminal and pasteable into docs."""

from __future__ import annotations

import sys


def format_table(headers, rows) -> str:
    """``headers`` and ``rows`` (any values, shown with ``str``) as an aligned markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def print_table(headers, rows, out=None) -> None:
    """Print :func:`format_table` of ``headers`` and ``rows`` to ``out`` (default: stdout)."""
    print(format_table(headers, rows), file=out or sys.stdout)
