"""adaclip.research.io: Markdown tables, atomic writes, saved figures."""

import os

import pytest

from adaclip.research.io import markdown_table, write_text_atomic


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


def test_save_figure_writes_png_and_svg_reproducibly(tmp_path):
    import matplotlib.pyplot as plt

    from adaclip.research.io import apply_style, save_figure

    apply_style()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    paths = save_figure(fig, tmp_path / "figures" / "line")
    assert [p.name for p in paths] == ["line.png", "line.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first_svg = paths[1].read_text()
    save_figure(fig, tmp_path / "figures" / "line")
    plt.close(fig)
    assert paths[1].read_text() == first_svg  # no timestamps or random ids
    assert sorted(os.listdir(tmp_path / "figures")) == ["line.png", "line.svg"]
