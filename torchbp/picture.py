r"""A picture of error propagation: ‖δ^l‖ per layer and step, where vanishing or exploding δ shows at a glance.

One row of two panels per run (Nielsen, *Neural Networks and Deep Learning*, ch. 5, "speed of learning"):

- left, the **δ map**: one image row per layer, network order with the input side at the top, one
  column per recorded step; colour = log10 ‖δ^l‖ = log10 ‖∂C/∂b^l‖ (BP3). A vanishing gradient is a
  dark band at the top (early layers) under bright rows at the bottom (late layers).
- right, each layer's ‖δ^l‖ over the steps on a log axis, one line per layer.

All runs share one colour scale and one y-axis, so they compare. Missing, zero and non-finite values
(a NaN or Inf in δ) are masked and drawn in one colour outside the colour map.

A *history* is ``{"steps": list[int], "layers": list[str], "delta_norm": array (len(layers), len(steps))}``,
layers in network order, input side first, as :class:`torchbp.DeltaMonitor` records them. This module
knows nothing of the monitor. matplotlib is imported when a function is called, never at import, and
only its object-oriented API is used (a :class:`matplotlib.figure.Figure` on an Agg canvas, no pyplot
state), so it works headless and in threads.

Example::

    >>> history = {"steps": [0, 10, 20], "layers": ["hidden1", "output"], "delta_norm": [[1e-3, 2e-3, 4e-3], [0.1, 0.1, 0.05]]}
    >>> torchbp.picture.save_delta_map({"sigmoid": history}, "runs/delta_map.png")
    'runs/delta_map.png'
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["delta_map_figure", "render_png", "save_delta_map", "COLORBAR_LABEL", "MASKED_COLOR"]

#: The colour bar's label.
COLORBAR_LABEL = "log10 ‖δ^l‖ = log10 ‖∂C/∂b^l‖"
#: Colour of missing, zero and non-finite values (outside the colour map, viridis).
MASKED_COLOR = "#ff00ff"
_CMAP = "viridis"
_MARKED = 2000  # at most this many masked cells also get a marker

History = Mapping[str, Any]


def _matplotlib() -> tuple[type, type]:
    """``(Figure, FigureCanvasAgg)``, or an ImportError that says what to install."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            'torchbp.picture draws with matplotlib, which is not installed: pip install matplotlib (or pip install "torchbp[demo]")'
        ) from e
    return Figure, FigureCanvasAgg


def _check(name: str, history: History) -> tuple[list[int], list[str], np.ndarray]:
    """The history's steps, layers and log10 norms (NaN where missing, zero or not finite)."""
    if not isinstance(history, Mapping) or not {"steps", "layers", "delta_norm"} <= set(history):
        got = sorted(history) if isinstance(history, Mapping) else type(history).__name__
        raise ValueError(f"delta map: history {name!r} must be a dict with keys steps, layers, delta_norm, got {got}")
    steps, layers = [int(s) for s in history["steps"]], [str(layer) for layer in history["layers"]]
    norms = np.asarray(history["delta_norm"], dtype=np.float64)  # None (missing) becomes NaN
    if norms.size == 0:
        norms = norms.reshape(len(layers), len(steps))
    if norms.shape != (len(layers), len(steps)):
        raise ValueError(
            f"delta map: history {name!r}: delta_norm must have shape (len(layers), len(steps)) = "
            f"({len(layers)}, {len(steps)}), got {norms.shape}"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where(norms > 0, norms, np.nan))  # zero, negative, NaN -> NaN
    logs[~np.isfinite(logs)] = np.nan  # +Inf
    return steps, layers, logs


def delta_map_figure(histories: Mapping[str, History], title: str | None = None) -> Figure:
    """One row per run: the δ map (left) and ‖δ^l‖ per layer on a log axis (right); see the module doc.

    Args:
        histories: run name -> history (``steps``, ``layers`` input side first, ``delta_norm`` of shape
            (layers, steps)); drawn top to bottom in this order.
        title: the figure's title. Default: none.

    Returns:
        A :class:`matplotlib.figure.Figure` on an Agg canvas (see :func:`render_png`). Each run's δ map is
        the one image (an ``AxesImage`` of shape (layers, steps), log10 values, masked where missing) of its
        left Axes, whose title starts with the run name; ``[im for ax in fig.axes for im in ax.get_images()]``
        lists them in run order.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if not histories:
        raise ValueError("delta map: expected at least one history, got none")
    runs = {name: _check(name, h) for name, h in histories.items()}
    finite = np.concatenate([logs[np.isfinite(logs)] for _, _, logs in runs.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 0.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cmap = colormaps[_CMAP].with_extremes(bad=MASKED_COLOR)

    height = 0.4 * bool(title) + sum(max(2.6, 1.2 + 0.28 * len(layers)) for _, layers, _ in runs.values())
    fig = Figure(figsize=(11, height), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(runs), 2, width_ratios=(1.25, 1))
    map_axes, image = [], None
    line_ax0 = None
    for row, (name, (steps, layers, logs)) in enumerate(runs.items()):
        ax = fig.add_subplot(grid[row, 0])
        lax = fig.add_subplot(grid[row, 1], sharey=line_ax0)
        line_ax0 = line_ax0 or lax
        map_axes.append(ax)
        ax.set_title(f"{name}: δ map (input side at the top)", fontsize=10, loc="left")
        ax.set_yticks(range(len(layers)), layers)
        ax.set_ylabel("layer")
        ax.set_xlabel("step" if np.isfinite(logs).all() else "step    (magenta: missing, zero or not finite)")
        lax.set_title(f"{name}: ‖δ^l‖ per layer (speed of learning)", fontsize=10, loc="left")
        lax.set_xlabel("step")
        lax.set_ylabel("‖δ^l‖")
        lax.set_yscale("log")
        if not steps:
            ax.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=ax.transAxes)
            lax.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=lax.transAxes)
            continue
        masked = np.ma.masked_invalid(logs)
        uniform = len(steps) > 1 and np.all(np.diff(steps) == steps[1] - steps[0]) and steps[1] > steps[0]
        if uniform or len(steps) == 1:  # pixel k centred on step k
            half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
            extent = (steps[0] - half, steps[-1] + half, len(layers) - 0.5, -0.5)
            image = ax.imshow(
                masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest", extent=extent
            )
        else:  # uneven steps: pixel k is the k-th recorded step, labelled with its step number
            image = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_formatter(
                FuncFormatter(lambda x, _, s=steps: str(s[int(round(x))]) if 0 <= round(x) < len(s) else "")
            )
        ax.set_autoscale_on(False)  # the markers below must not move the image's limits
        rows, cols = np.nonzero(np.isnan(logs))
        if 0 < len(rows) <= _MARKED:  # a lone masked pixel can vanish when the image is scaled down: mark it
            x = np.asarray(steps)[cols] if uniform or len(steps) == 1 else cols
            ax.plot(x, rows, linestyle="none", marker="|", markersize=9, color=MASKED_COLOR)
        for layer, values in zip(layers, logs):
            marker = "." if len(steps) <= 50 else None  # few steps: a point between two gaps still shows
            lax.plot(
                steps, np.power(10.0, values), label=layer or "<model>", linewidth=1.2, marker=marker
            )  # NaN: a gap
        lax.grid(True, which="major", alpha=0.3)
        lax.legend(
            fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="input side first", title_fontsize=8
        )
    if finite.size:
        line_ax0.set_ylim(10 ** (vmin - 0.15), 10 ** (vmax + 0.15))
    if image is not None:
        bar = fig.colorbar(image, ax=map_axes, location="right", fraction=0.05, pad=0.02)
        bar.set_label(COLORBAR_LABEL, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def render_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, drawn on an Agg canvas (no display, no pyplot).

    Args:
        fig: a figure, e.g. from :func:`delta_map_figure`.
        dpi: dots per inch. Default: ``100`` (the δ map of two runs is then about 1100 pixels wide).
    """
    _, FigureCanvasAgg = _matplotlib()
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_delta_map(
    histories: Mapping[str, History], path: str | os.PathLike, title: str | None = None, dpi: int = 100
) -> str:
    """Draw :func:`delta_map_figure` of ``histories`` and write it as a PNG to ``path`` (folders created).

    Returns:
        ``path`` as a string.
    """
    data = render_png(delta_map_figure(histories, title=title), dpi=dpi)
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path
