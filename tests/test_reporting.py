"""Markdown tables and atomic writes."""

import os

import pytest

from adaclip.reporting import markdown_table, write_text_atomic


def test_markdown_table_formats_floats_and_checks_widths():
    assert markdown_table(["a", "b"], [[1.23456, "x"]]) == "| a | b |\n|---|---|\n| 1.235 | x |\n"
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b"], [[1.0]])


def test_write_text_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "table.md"
    write_text_atomic(target, "old")
    with pytest.raises(TypeError):
        write_text_atomic(target, None)  # fails mid-write
    assert target.read_text() == "old"
    assert os.listdir(target.parent) == ["table.md"]
