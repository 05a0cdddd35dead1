"""Plots of the scripts (matplotlib, Agg backend): attention maps, image grids, curves.

The numbers apart from the pictures, so tests can check what a picture shows:

* **Data**: in `attnflax.nn.maps` (no matplotlib): :func:`~attnflax.nn.maps.collect_attention`
  runs a model once and returns every sown attention map with its layer kind and grid;
  ``query_attention`` turns one layer's weights into the ``[H, W]`` map of where one query
  pixel looks, ``mean_attention`` into the map of how much attention each pixel receives.
  Both live on the layer's own feature-map grid and sum to 1.
* **Panels**: :func:`attention_panels` makes a :class:`Panel` per map (its heatmap, title,
  query marker and the numbers behind it); give it the picture to draw on with
  ``dataclasses.replace(panel, image=...)``.
* **Plots** (:func:`overlay`, :func:`attention_figure`, :func:`line_plot`) return
  ``matplotlib.figure.Figure`` objects; saving them is the caller's business.

Query pixels are given in input-image coordinates ``(y, x)`` and mapped to a layer's grid
by ``attnflax.nn.maps.to_grid`` (``floor(y * H_layer / H_image)``), so the same query can
be followed through layers of different resolution.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from attnflax.nn.maps import LayerAttention, mean_attention, query_attention, to_grid  # noqa: E402

QUERY_MARKER = "query_marker"


@dataclasses.dataclass(frozen=True)
class Panel:
    """One cell of an attention figure: what it draws, and for an attention map the
    numbers behind the picture.

    Attributes:
      image: ``[h, w, c]`` the picture (any range); None until given
        (:func:`attention_panels` leaves it to the caller; :func:`attention_figure`
        needs it).
      heatmap: ``[H, W]`` drawn over the image (any grid, upsampled), or None; for an
        attention map float32 on the layer's grid, summing to 1.
      title: The cell's title.
      marker: ``(y, x)`` image pixel outlined (the query), or None.
      layer: Layer name (attention maps only, as the fields below).
      kind: ``'local'`` or ``'global'``.
      what: ``'query'`` (where one pixel looks) or ``'mean'`` (attention received).
      query: The query pixel in input-image coordinates (``'query'`` panels).
      query_grid: The same pixel on the layer's grid.
      window: ``(kh, kw)`` of a local layer, else None.
    """

    image: np.ndarray | None
    heatmap: np.ndarray | None
    title: str
    marker: tuple[int, int] | None = None
    layer: str | None = None
    kind: str | None = None
    what: str | None = None
    query: tuple[int, int] | None = None
    query_grid: tuple[int, int] | None = None
    window: tuple[int, int] | None = None


def _panel_title(layer: str, query: tuple[int, int] | None) -> str:
    short = layer.replace("/attention", "")
    return f"{short}\nmean received" if query is None else f"{short}\nquery {query}"


def attention_panels(
    layers: dict[str, LayerAttention],
    index: int,
    queries: Sequence[Sequence[int]],
    image_hw: Sequence[int],
    head: int | None = None,
) -> list[Panel]:
    """The panels of one example: per layer, one per query pixel, then the mean map.

    Args:
      layers: From `attnflax.nn.maps.collect_attention` (or its `select_layers`).
      index: Example in the batch.
      queries: Query pixels ``(y, x)`` in input-image coordinates.
      image_hw: The input image's ``(height, width)``.
      head: One head, or None for the mean over heads.

    Returns:
      ``len(layers) * (len(queries) + 1)`` panels, layer by layer, without an image; a
      query panel's marker is its query pixel.
    """
    panels = []
    for layer in layers.values():
        for q in queries:
            cell = to_grid(q, image_hw, layer.grid)
            query = (int(q[0]), int(q[1]))
            panels.append(Panel(
                None, query_attention(layer, index, cell, head), _panel_title(layer.name, query),
                marker=query, layer=layer.name, kind=layer.kind, what="query", query=query,
                query_grid=cell, window=layer.window))
        panels.append(Panel(
            None, mean_attention(layer, index), _panel_title(layer.name, None),
            layer=layer.name, kind=layer.kind, what="mean", window=layer.window))
    return panels


# --------------------------------------------------------------------------- #
# Plots.                                                                      #
# --------------------------------------------------------------------------- #


def display_image(image: np.ndarray) -> np.ndarray:
    """``[h, w, c]`` (any range) to something `imshow` draws: ``[h, w]`` or ``[h, w, 3]``
    rescaled to ``[0, 1]`` per image."""
    a = np.asarray(image, np.float32)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a[..., 0] if a.shape[-1] == 1 else a[..., :3]


def upsample(heatmap: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of ``[h, w]`` to `size` (cell boundaries as in `to_grid`)."""
    h, w = heatmap.shape
    rows = np.arange(size[0]) * h // size[0]
    cols = np.arange(size[1]) * w // size[1]
    return heatmap[rows[:, None], cols[None, :]]


def overlay(
    ax: Any,
    image: np.ndarray,
    heatmap: np.ndarray | None = None,
    *,
    title: str | None = None,
    alpha: float = 0.55,
    marker: Sequence[int] | None = None,
    cmap: str = "inferno",
) -> None:
    """Draws `image` with an optional `heatmap` (any grid, upsampled) on top.

    Args:
      ax: A matplotlib axes.
      image: ``[h, w, c]``.
      heatmap: ``[H, W]`` or None.
      title: Axes title.
      alpha: Heatmap opacity.
      marker: ``(y, x)`` image pixel to mark (the query): a hollow cyan square around
        that one pixel (the patch's ``gid`` is `QUERY_MARKER`).
      cmap: Heatmap colour map.
    """
    img = display_image(image)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    if heatmap is not None:
        ax.imshow(upsample(np.asarray(heatmap), img.shape[:2]), cmap=cmap, alpha=alpha,
                  interpolation="nearest")
    if marker is not None:
        # A hollow outline of the query pixel itself: the attention window around it
        # (3x3 pixels on a 32x32 image is ~10 points across) stays visible.
        ax.add_patch(Rectangle((marker[1] - 0.5, marker[0] - 0.5), 1, 1, fill=False,
                               edgecolor="cyan", linewidth=1.0, gid=QUERY_MARKER))
    if title:
        ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def attention_figure(rows: Sequence[Sequence[Panel]], cell: float = 1.6) -> Figure:
    """A grid of :class:`Panel` rows (rows may differ in length; short ones are padded).

    Raises:
      ValueError: on a panel without an image.
    """
    for row in rows:
        for p in row:
            if p.image is None:
                raise ValueError(f"panel {p.title!r} has no image to draw on; give it one "
                                 "with dataclasses.replace(panel, image=...).")
    nrows = max(1, len(rows))
    ncols = max([1, *(len(r) for r in rows)])
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows), squeeze=False)
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r, c]
            if r < len(rows) and c < len(rows[r]):
                p = rows[r][c]
                overlay(ax, p.image, p.heatmap, title=p.title, marker=p.marker)
            else:
                ax.axis("off")
    fig.tight_layout()
    return fig


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    ax: Any = None,
) -> Figure:
    """Lines ``label -> (xs, ys)`` with markers, on `ax` or a new figure."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, titles: Sequence[str], title: str, *,
               colors: Sequence[str] | None = None, cols: int | None = None,
               cell: tuple[float, float] = (1.4, 1.6)) -> Figure:
    """The scripts' image grid: each image ``[h, w, c]`` in ``[0, 1]`` (gray for one
    channel, nearest-neighbour) under its title (in its colour, default black).

    Args:
      images: float ``[n, h, w, c]`` in ``[0, 1]`` (de-normalised: see
        `attnflax.analysis.robustness.to_pixels`).
      titles: One per image.
      title: The figure's title.
      colors: One title colour per image (e.g. red for a mistake).
      cols: Columns (default ``ceil(sqrt(n))``, at most 8).
      cell: Inches per image ``(width, height)``.
    """
    n = len(images)
    cols = cols or min(8, max(1, math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image) in enumerate(zip(axes.flat, images, strict=False)):
        image = np.asarray(image, np.float32)
        gray = image.shape[-1] == 1
        ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None,
                  vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def subplots(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.5, 3.6)) -> tuple[
        Figure, np.ndarray]:
    """A new figure with an ``[nrows, ncols]`` array of axes, `size` inches per axes."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False)
    return fig, axes


def wrap_title(text: str, width_inches: float, fontsize: float = 12.0) -> str:
    """`text` broken into lines that fit `width_inches` at `fontsize` points.

    Each existing line is wrapped at spaces to ``width / (0.6 fontsize)`` characters (a
    generous average glyph width of DejaVu Sans), so a long title fits its figure.
    """
    import textwrap

    chars = max(10, int(width_inches * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.splitlines() or [""])


def close(fig: Figure) -> None:
    """Frees a figure's memory (pyplot keeps references otherwise)."""
    plt.close(fig)
