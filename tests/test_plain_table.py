"""The text table of ``simfluence sql`` laid out without Polars is Polars' own, character for
character: compared with Polars on generated results and at every limit."""

from __future__ import annotations

import random
import string

import duckdb
import polars as pl
import pytest

from simfluence_platform.plain_table import LONGEST_TEXT, WIDEST_TABLE, plain_table

TYPES = ["TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "VARCHAR",
         "BOOLEAN", "DOUBLE"]
HIGHEST = {"TINYINT": 127, "SMALLINT": 32767, "INTEGER": 2**31 - 1, "BIGINT": 2**63 - 1, "UTINYINT": 255,
           "USMALLINT": 65535, "UINTEGER": 2**32 - 1, "UBIGINT": 2**64 - 1}


def polars_text(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int) -> str:
    """What ``simfluence sql`` prints through Polars."""
    with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
        return str(pl.DataFrame(con.sql(sql)))


def plain_text(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int) -> str | None:
    relation = con.sql(sql)
    return plain_table(relation.columns, relation.types, relation.fetchall(), max_rows)


def literal(rnd: random.Random, kind: str) -> str:
    if rnd.random() < 0.1:
        return "NULL"
    if kind == "VARCHAR":
        length = rnd.choice([0, 1, 3, 10, LONGEST_TEXT - 1, LONGEST_TEXT, LONGEST_TEXT + 1, 61, 70])
        text = "".join(rnd.choice(string.printable[:95] + "é\n") for _ in range(length))
        return "'" + text.replace("'", "''") + "'"
    if kind == "BOOLEAN":
        return rnd.choice(["true", "false"])
    if kind == "DOUBLE":
        return str(rnd.random())
    low = 0 if kind.startswith("U") else -HIGHEST[kind]
    return str(rnd.choice([0, 1, low, HIGHEST[kind], rnd.randint(low, HIGHEST[kind])]))


def test_generated_results_print_as_polars_prints_them():
    rnd = random.Random(7)
    con = duckdb.connect()
    laid_out = 0
    for _ in range(400):
        kinds = [rnd.choice(TYPES) for _ in range(rnd.randint(1, 10))]
        names = [f"{''.join(rnd.choice(string.ascii_letters + ' _') for _ in range(rnd.choice([1, 5, 30, 55])))}{j}"
                 .strip() for j in range(len(kinds))]
        n_rows = rnd.choice([0, 1, 2, 9, 10, 11, 50, 51])
        if n_rows == 0:
            sql = "SELECT " + ", ".join(f'NULL::{k} AS "{n}"' for k, n in zip(kinds, names)) + " WHERE false"
        else:
            sql = " UNION ALL ".join("SELECT " + ", ".join(f'{literal(rnd, k)}::{k} AS "{n}"' for k, n in
                                                           zip(kinds, names)) for _ in range(n_rows))
        max_rows = rnd.choice([10, 50])
        text = plain_text(con, sql, max_rows)
        if text is not None:
            laid_out += 1
            assert text == polars_text(con, sql, max_rows), sql
    assert laid_out >= 40  # the comparison covered the cases laid out here, not just the ones left to Polars


@pytest.mark.parametrize("width", range(WIDEST_TABLE - 3, WIDEST_TABLE + 3))
def test_the_widest_table_laid_out_is_the_widest_polars_does_not_wrap(width):
    con = duckdb.connect()
    columns = 4
    cells = [(width - 1 - columns) // columns - 2] * columns
    cells[0] += (width - 1 - columns) - columns * (cells[0] + 2)
    sql = "SELECT " + ", ".join(f"'{'x' * w}' AS c{j}" for j, w in enumerate(cells))
    text = plain_text(con, sql, 50)
    assert (text is None) == (width > WIDEST_TABLE)
    if text is not None:
        assert text == polars_text(con, sql, 50) and max(len(line) for line in text.splitlines()) == width


def test_what_polars_would_shorten_elide_or_type_differently_is_left_to_it():
    con = duckdb.connect()
    assert plain_text(con, "SELECT * FROM range(11)", 10) is None  # Polars elides rows past tbl_rows
    assert plain_text(con, "SELECT * FROM range(10)", 10) == polars_text(con, "SELECT * FROM range(10)", 10)
    assert plain_text(con, f"SELECT '{'x' * (LONGEST_TEXT + 1)}' AS s", 10) is None
    assert plain_text(con, "SELECT 0.5 AS f", 10) is None  # a DECIMAL: Polars' formatting
    assert plain_text(con, "SELECT 'a\nb' AS s", 10) is None
    assert plain_text(con, "SELECT 1 AS a, 2 AS a", 10) is None  # Polars refuses the repeated name
