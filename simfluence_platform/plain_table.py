"""A query result as the text table Polars prints, for the simple results that need no Polars.

``simfluence sql`` prints its result the way Polars prints a DataFrame. Importing Polars is
most of the command's start-up, so results of integer, text and boolean columns, short enough
to be shown whole, are laid out here instead, character for character as Polars lays them out
(``tests/test_storage.py`` compares the two on generated results); anything else returns None
and the caller goes through Polars.
"""

from __future__ import annotations

from collections.abc import Sequence

# DuckDB's column types that print the same from Python values, and Polars' names for them.
POLARS_NAMES = {"TINYINT": "i8", "SMALLINT": "i16", "INTEGER": "i32", "BIGINT": "i64", "UTINYINT": "u8",
                "USMALLINT": "u16", "UINTEGER": "u32", "UBIGINT": "u64", "VARCHAR": "str", "BOOLEAN": "bool"}
LONGEST_TEXT = 50  # characters of a cell or column name; Polars shortens or wraps longer ones
WIDEST_TABLE = 200  # characters of a line; Polars wraps wider tables


def plain_table(columns: Sequence[str], types: Sequence[str], rows: Sequence[tuple], max_rows: int) -> str | None:
    """The table Polars would print (with ``tbl_rows=max_rows``) for ``rows`` (tuples, one value
    per column) of columns named ``columns`` with DuckDB types ``types``; None when Polars would
    shorten, wrap or elide something, a type is not a plain one, or a name repeats (Polars
    refuses that)."""
    names = [POLARS_NAMES.get(str(kind)) for kind in types]
    if not columns or None in names or len(rows) > max_rows or len(set(columns)) < len(columns):
        return None
    cells = [[_text(value) for value in row] for row in rows]
    texts = [*columns, *(cell for row in cells for cell in row)]
    if not all(len(text) <= LONGEST_TEXT and text.isascii() and text.isprintable() and text == text.strip()
               for text in texts):
        return None
    widths = [max(3, len(name), len(dtype), *(len(row[j]) for row in cells)) + 2
              for j, (name, dtype) in enumerate(zip(columns, names))]
    if sum(widths) + len(widths) + 1 > WIDEST_TABLE:
        return None

    def line(values: Sequence[str]) -> str:
        return "│" + "┆".join(f" {value:<{width - 2}} " for value, width in zip(values, widths)) + "│"

    def rule(left: str, fill: str, middle: str, right: str) -> str:
        return left + middle.join(fill * width for width in widths) + right

    return "\n".join([f"shape: ({len(rows)}, {len(columns)})", rule("┌", "─", "┬", "┐"), line(columns),
                      line(["---"] * len(columns)), line(names), rule("╞", "═", "╪", "╡"),
                      *(line(row) for row in cells), rule("└", "─", "┴", "┘")])


def _text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
