"""The drawing kit of :mod:`jaxbp.plots`: matplotlib found (or an error naming the ``plots``
extra), a figure made and saved, and the pieces of its pictures — heatmaps with their
numbers in the cells, operators between them, wrapped notes.

matplotlib is imported inside the functions, never when this module loads.
"""

from __future__ import annotations

import os

import numpy as np

EXTRA_HINT = 'pip install "jaxbp[plots]"'
# Above this many rows (or columns) a heatmap's cells carry no numbers: a colour bar instead.
ANNOTATE_MAX = 10
_DIVERGING, _SEQUENTIAL, _MASKED = "RdBu_r", "Blues", "#d9d9d9"


def require_matplotlib():
    """The ``matplotlib`` module, or ``ImportError`` naming the ``plots`` extra."""
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401  (the Figure class, without pyplot)
    except ImportError as e:
        raise ImportError(
            f"figures need matplotlib, the `plots` extra of jaxbp: {EXTRA_HINT}"
        ) from e
    return matplotlib


def supported_formats() -> tuple[str, ...]:
    """The file extensions ``save_figure`` writes (``png``, ``pdf``, ``svg``, …)."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted(FigureCanvasBase.get_supported_filetypes()))


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> str:
    """Write ``fig`` to ``path`` (the format from its extension) without the matplotlib
    version in its metadata, so a figure made twice is the same file; returns the path."""
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    meta = {"Software": None} if ext == "png" else {}
    fig.savefig(path, dpi=dpi, metadata=meta)
    return os.fspath(path)


def new_figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------- heatmaps


def _fmt(v: float, scale: float) -> str:
    """A cell's number: two decimals, three below 0.1, powers of ten beyond."""
    if not np.isfinite(v):
        return ""
    if abs(v) <= 1e-12 * max(scale, 1.0):
        return "0"
    if 0.1 <= abs(v) < 100:
        text = f"{v:.2f}"
    elif 0.001 <= abs(v) < 0.1:
        text = f"{v:.3f}"
    else:
        text = f"{v:.0e}"
    return text.replace("-", "−")


def column_widths(r: int) -> tuple[float, float]:
    """(a vector column's width, an operator's width) in cells, next to ``r`` rows: one
    cell when the numbers are written in the cells, wider when a colour bar must fit."""
    return (1.0, 1.3) if r <= ANNOTATE_MAX else (max(3.0, r / 4), max(2.5, r / 8))


def heat(ax, a, title, *, signed=True, limit=None, mask=None, rows=None, cols=None, wide=None):
    """``a`` (r, k) as a heatmap on ``ax``: square cells (a column ``(r, 1)`` is ``wide``
    cells wide), the values written in the cells when it is small, else a colour bar."""
    import matplotlib.colors as mcolors
    from matplotlib import colormaps

    a = np.atleast_2d(np.asarray(a, np.float64))
    shown = np.where(mask, np.nan, a) if mask is not None else a
    if signed:
        m = limit if limit is not None else float(np.nanmax(np.abs(shown), initial=0.0))
        norm = mcolors.Normalize(-(m or 1.0), m or 1.0)
        cmap = colormaps[_DIVERGING].with_extremes(bad=_MASKED)
    else:
        norm = mcolors.Normalize(0.0, limit if limit is not None else 1.0)
        cmap = colormaps[_SEQUENTIAL].with_extremes(bad=_MASKED)
    r, k = a.shape
    im = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest",
                   aspect="auto" if wide else "equal")  # fmt: skip
    if wide:
        ax.set_box_aspect(r / wide)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(k) if k <= 2 * ANNOTATE_MAX else [])
    ax.set_yticks(range(r) if r <= 2 * ANNOTATE_MAX else [])
    ax.tick_params(labelsize=7, length=0)
    if k == 1:
        ax.set_xticks([])
    if rows is not None:
        ax.set_ylabel(rows, fontsize=8)
    if cols is not None:
        ax.set_xlabel(cols, fontsize=8)
    for side in ax.spines.values():
        side.set_linewidth(0.6)
    if max(r, k) <= ANNOTATE_MAX:
        size = 8 if max(r, k) <= 6 else 6.5
        scale = float(np.nanmax(np.abs(shown), initial=0.0))
        for i in range(r):
            for j in range(k):
                v = shown[i, j]
                if not np.isfinite(v):
                    continue
                dark = abs(norm(v) - (0.5 if signed else 0.0)) > (0.3 if signed else 0.6)
                ax.text(j, i, _fmt(v, scale), ha="center", va="center", fontsize=size,
                        color="white" if dark else "black")  # fmt: skip
    else:
        bar = ax.figure.colorbar(im, ax=ax, location="bottom", aspect=25 if k > 1 else 8,
                                 pad=0.01)  # fmt: skip
        ticks = [norm.vmin, 0.0, norm.vmax] if signed else [norm.vmin, norm.vmax]
        bar.set_ticks(ticks, labels=[_fmt(v, norm.vmax) for v in ticks])
        bar.ax.tick_params(labelsize=6.5)
    return im


def symbol(ax, text: str, note: str = "") -> None:
    """A narrow axes holding an operator (``·``, ``=``, ``⊙``) between two heatmaps."""
    ax.axis("off")
    big = 30 if text == "·" else 18
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=big, transform=ax.transAxes)
    if note:
        ax.text(0.5, 0.38, note, ha="center", va="top", fontsize=7, color="0.35",
                transform=ax.transAxes)  # fmt: skip


def row_of(fig, spec, widths, total=None):
    """Axes of one row of heatmaps and operators, ``widths`` in cells; a blank axes pads the
    row to ``total`` cells so that rows of one figure share their cell size."""
    widths = list(widths)
    pad = (total or 0) - sum(widths)
    gs = spec.subgridspec(1, len(widths) + (pad > 1e-9), wspace=0.0,
                          width_ratios=widths + ([pad] if pad > 1e-9 else []))  # fmt: skip
    axes = [fig.add_subplot(gs[0, k]) for k in range(len(widths))]
    if pad > 1e-9:
        fig.add_subplot(gs[0, -1]).axis("off")
    return axes


def cell_inches(width_cells: float, height_cells: float) -> float:
    """Inches per heatmap cell: 0.6 for small matrices, less so that a figure stays within
    about 15 × 11 inches."""
    return min(0.6, 12.0 / width_cells, 8.0 / height_cells)


def wrap(text: str, width_inches: float) -> tuple[str, float]:
    """``text`` wrapped to a figure ``width_inches`` wide, and the inches it takes."""
    import textwrap

    chars = max(30, int(width_inches * 15))
    out = "\n".join(textwrap.fill(part, chars) for part in text.split("\n"))
    return out, 0.14 * (out.count("\n") + 1) + 0.1


def footer(fig, spec, text: str) -> None:
    """Already wrapped ``text`` centred in the figure's last row."""
    fig.add_subfigure(spec).text(0.5, 0.5, text, ha="center", va="center", fontsize=7.5,
                                 color="0.25")  # fmt: skip


def outline_row(ax, i: int, k: int) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((-0.5, i - 0.5), k, 1, fill=False, ec="black", lw=1.6, clip_on=False))
