"""The report's figures: no two bank members share a colour, titles wrap instead of running
off the figure."""

import matplotlib.colors as mcolors

from kalnat import plots


def test_member_colours_are_distinct_for_any_bank_size():
    for n in (3, 10, 12, 20, 40):
        rgba = [mcolors.to_rgba(c) for c in plots.distinct_colors(n)]
        assert len(set(rgba)) == n
        assert mcolors.to_rgba("0.8") not in rgba  # the grey of the "others" band


def test_long_titles_wrap():
    title = "image_segments: bank of 40 EKFs (1 or 2 linearisations), linear, categorical"
    wrapped = plots.wrap_title(title)
    assert max(len(line) for line in wrapped.splitlines()) <= plots.TITLE_WIDTH
    assert wrapped.replace("\n", " ") == title
