"""The one table printer: aligned GitHub-flavoured markdown."""

import io

from bitq_tvm.support.tables import format_table, print_table


def test_columns_are_padded_to_the_widest_cell():
    assert format_table(["a", "long header"], [(1, "x"), ("wide cell", 2.5)]).splitlines() == [
        "| a         | long header |",
        "|-----------|-------------|",
        "| 1         | x           |",
        "| wide cell | 2.5         |",
    ]


def test_print_table_writes_the_table_and_a_newline():
    out = io.StringIO()
    print_table(["h"], [], out)
    assert out.getvalue() == "| h |\n|---|\n"
