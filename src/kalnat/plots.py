"""Matplotlib figures for the command's reports (Agg backend: files only, no display)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["learning_curves", "comparison", "bank_weights", "confusion", "distinct_colors", "wrap_title"]

TITLE_WIDTH = 60  # characters per title line: longer titles are wrapped, not cut at the edge
DPI = 110


def _save(fig, path: str) -> str:
    """Lays ``fig`` out (``tight_layout``), writes it to ``path`` and closes it; returns ``path``.

    Since matplotlib 3.8, ``tight_layout`` leaves the figure a stand-in layout engine
    (``PlaceHolderLayoutEngine``), and ``savefig`` draws a figure that has one an extra time,
    rendering nothing, before drawing it for the file. The layout is done, so the engine goes
    first: the same bytes, in about 0.9 × the time (``python benchmarks/figures.py``;
    matplotlib 3.11); 3.7 left no engine, and this changes nothing there. (The rc settings that
    would make ``None`` a new engine are set aside for that call.)"""
    fig.tight_layout()
    with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        fig.set_layout_engine(None)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def wrap_title(title: str, width: int = TITLE_WIDTH) -> str:
    """``title`` broken into lines of at most ``width`` characters (at spaces)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) if title else title


def distinct_colors(n: int) -> list:
    """``n`` colours no two of which are the same: matplotlib's cycle up to 10, ``tab20`` up to
    20, then evenly spaced hues."""
    import numpy as np

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        cmap = plt.get_cmap("tab20")
        return [cmap(i) for i in range(n)]
    cmap = plt.get_cmap("hsv")
    return [cmap(v) for v in np.linspace(0.0, 1.0, n, endpoint=False)]


def learning_curves(curve: dict, metric: str, path: str, title: str = "") -> list[str]:
    """Running progressive log-loss and ``metric`` (accuracy or rmse) against rows seen.

    ``curve`` has lists ``row``, ``log_loss``, ``metric`` and ``window_log_loss`` (the mean over
    the rows since the previous point). Writes ``<path>_log_loss.png`` and
    ``<path>_<metric>.png``; returns their paths.
    """
    out = []
    for key, label in (("log_loss", "progressive log-loss"), (metric, f"progressive {metric}")):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(curve["row"], curve[key], label="running mean")
        if key == "log_loss" and curve.get("window_log_loss"):
            ax.plot(curve["row"], curve["window_log_loss"], alpha=0.5, lw=0.8, label="recent rows")
            ax.legend()
        ax.set_xlabel("rows seen")
        ax.set_ylabel(label)
        ax.set_title(wrap_title(title), fontsize=10)
        ax.grid(alpha=0.3)
        out.append(_save(fig, f"{path}_{key}.png"))
    return out


def comparison(curves: dict, references: dict, path: str, title: str = "",
               ylabel: str = "progressive log-loss (running mean)") -> str:
    """One line per one-pass learner (``curves``: name → (rows, values)) and a dashed
    horizontal line per offline reference (``references``: name → value)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (rows, vals) in curves.items():
        ax.plot(rows, vals, label=name, lw=2.0 if name.startswith("kalnat") else 1.2)
    for k, (name, v) in enumerate(references.items()):
        ax.axhline(v, ls="--", color=f"C{(len(curves) + k) % 10}", lw=1, label=name)
    finals = sorted(vals[-1] for _, vals in curves.values() if len(vals))
    if finals:  # a badly diverging learner or the first rows would squash the rest of the plot
        lo = min([finals[0], *references.values()])
        span = 3.0 * (finals[len(finals) // 2] - lo) or 1.0
        ax.set_ylim(lo - 0.1 * span, lo + span)
    ax.set_xlabel("rows seen")
    ax.set_ylabel(ylabel)
    ax.set_title(wrap_title(title), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def bank_weights(rows, weights, labels, path: str, title: str = "") -> str:
    """Stacked weights of a bank's members (``weights``: one ``(K,)`` list per row of
    ``rows``) against rows seen; members that never reach 5 % share one grey band."""
    import numpy as np

    w = np.asarray(weights, float).reshape(len(rows), len(labels))
    shown = np.flatnonzero(w.max(axis=0) >= 0.05) if len(rows) else np.arange(0)
    rest = np.setdiff1d(np.arange(len(labels)), shown)
    bands = [w[:, k] for k in shown] + ([w[:, rest].sum(axis=1)] if len(rest) else [])
    names = [labels[k] for k in shown] + ([f"{len(rest)} others"] if len(rest) else [])
    colors = distinct_colors(len(shown)) + (["0.8"] if len(rest) else [])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if bands:
        ax.stackplot(rows, *bands, labels=names, colors=colors)
    lo, hi = (rows[0], rows[-1]) if len(rows) else (0, 1)
    if hi <= lo:  # one row: a span to draw it in (equal limits are singular, matplotlib warns)
        lo, hi = lo - 0.5, hi + 0.5
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1)
    ax.set_xlabel("rows seen")
    ax.set_ylabel("weight when the row was predicted")
    ax.set_title(wrap_title(title), fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def confusion(counts, classes, path: str, title: str = "") -> str:
    """The progressive confusion matrix: ``counts[i][j]`` rows of true class ``classes[i]``
    predicted (before being learned) as ``classes[j]``; shaded by the share of each true class,
    the axes labelled with the class names."""
    import numpy as np

    c = np.asarray(counts, np.int64)
    k = len(classes)
    share = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    size = min(9.0, 3.2 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), [str(n) for n in classes], rotation=45 if k > 3 else 0,
                  ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), [str(n) for n in classes])
    if k <= 12:  # the counts themselves, while they fit in their cells
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set_xlabel("predicted class (before the row was learned)")
    ax.set_ylabel("true class")
    ax.set_title(wrap_title(title, int(TITLE_WIDTH * (size + 1.2) / 7.0)), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return _save(fig, path)
