"""Reading the attention maps that the attention layers sow, and the map data the
scripts plot (per layer: `collect_attention`; per query: `query_attention`; received:
`mean_attention`). No plotting here (`attnflax.viz` draws them)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

Array = jax.Array
SOW_NAME = "attention_weights"


def attention_maps(
    model: nn.Module, variables: Any, x: Array, **apply_kwargs: Any
) -> dict[str, Array]:
    """Runs ``model`` on ``x`` and returns every sown attention map by module path.

    The forward pass is the ordinary one (jitted), with the ``intermediates`` collection
    made mutable; models are called with ``train=False`` unless ``apply_kwargs`` says otherwise
    (pass ``train=None`` for modules without a ``train`` argument, or any other kwargs).

    Args:
      model: a Flax module whose attention layers sow ``attention_weights``.
      variables: its variables (``params`` and, if any, ``batch_stats``).
      x: the input batch.
      **apply_kwargs: extra keyword arguments of ``model.__call__``.

    Returns:
      ``{path: weights}``, ``path`` the ``/``-joined module path, e.g.
      ``'attention_block_0/attention'``; weights ``[batch, H, W, heads, kh, kw]`` for local
      and ``[batch, heads, q_len, kv_len]`` for global layers. A layer called ``n > 1``
      times appears as ``path#0`` ... ``path#n-1``.
    """
    return sown_maps(run_sowing(model, variables, x, **apply_kwargs))


def run_sowing(
    model: nn.Module, variables: Any, x: Array, *, capture_intermediates: Any = False,
    **apply_kwargs: Any,
) -> dict[tuple[str, ...], Any]:
    """Runs ``model`` (jitted) with ``intermediates`` mutable, as :func:`attention_maps`.

    Args:
      capture_intermediates: passed to ``model.apply`` (e.g. a filter that also records
        the attention layers' outputs).

    Returns:
      The ``intermediates`` collection flattened: ``{module path + (name,): values}``.
    """
    if "train" not in apply_kwargs and "train" in _call_arguments(model):
        apply_kwargs["train"] = False
    if apply_kwargs.get("train", 0) is None:
        del apply_kwargs["train"]
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    apply = functools.partial(model.apply, mutable=["intermediates"],
                              capture_intermediates=capture_intermediates, **apply_kwargs)
    _, state = jax.jit(apply)(variables, x)
    return traverse_util.flatten_dict(dict(state.get("intermediates", {})))


def sown_maps(flat: dict[tuple[str, ...], Any]) -> dict[str, Array]:
    """The attention maps in a flattened ``intermediates`` collection, by module path
    (``path#i`` for the i-th call of a layer called more than once)."""
    maps: dict[str, Array] = {}
    for key, values in flat.items():
        if key[-1] != SOW_NAME:
            continue
        path = "/".join(key[:-1])
        if len(values) == 1:
            maps[path] = values[0]
        else:
            maps.update({f"{path}#{i}": v for i, v in enumerate(values)})
    return maps


def _call_arguments(model: nn.Module) -> tuple[str, ...]:
    return tuple(inspect.signature(type(model).__call__).parameters)


# --------------------------------------------------------------------------- map data


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """One attention layer's weights for a batch.

    Attributes:
      name: ``/``-joined module path (``#i`` appended for the i-th call of a shared layer),
        the same names as :func:`attnflax.nn.attention_maps`.
      kind: ``'local'`` or ``'global'``.
      weights: float32; local ``[batch, H, W, heads, kh, kw]``, global
        ``[batch, heads, H*W, H*W]``.
      grid: The layer's feature-map size ``(H, W)``.
      dilation, border: A local layer's options (`query_attention` and `mean_attention`
        draw the default ``(1, 1)`` and ``'mask'`` only, and refuse the others).
    """

    name: str
    kind: str
    weights: np.ndarray
    grid: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    border: str = "mask"

    @property
    def drawable(self) -> bool:
        """False for a local layer whose window is dilated or shifted: its weights are not
        laid out on the grid (yet)."""
        return self.kind != "local" or (self.dilation == (1, 1) and self.border == "mask")

    def check_drawable(self) -> None:
        """Raises a ValueError unless the layer is `drawable`."""
        if not self.drawable:
            raise ValueError(
                f"attention layer {self.name!r} has dilation={self.dilation}, "
                f"border={self.border!r}: only maps of local layers with dilation 1 and "
                "border 'mask' are drawn; leave it out (--layers=...).")

    @property
    def window(self) -> tuple[int, int] | None:
        """``(kh, kw)`` of a local layer, None for a global one."""
        return tuple(self.weights.shape[-2:]) if self.kind == "local" else None

    @property
    def num_heads(self) -> int:
        return int(self.weights.shape[3] if self.kind == "local" else self.weights.shape[1])


def infer_grid(length: int, image_hw: Sequence[int]) -> tuple[int, int]:
    """Guesses a global layer's ``(H, W)`` from its token count and the input image size.

    Picks the factorisation ``H * W == length`` whose aspect ratio is closest to the
    image's (used only when the layer's own output shape does not tell).
    """
    target = image_hw[0] / image_hw[1]
    pairs = [(h, length // h) for h in range(1, length + 1) if length % h == 0]
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1] / target)))


def collect_attention(
    model: Any, variables: Any, images: Any, **apply_kwargs: Any
) -> dict[str, LayerAttention]:
    """Runs `model` once and returns every sown ``attention_weights`` by layer.

    The forward pass is the ordinary eval one (``train=False`` unless `apply_kwargs`
    says otherwise); the global layers' outputs are captured too, to learn their grid.

    Args:
      model: A Flax module whose attention layers sow ``intermediates/attention_weights``.
      variables: Its variables.
      images: float ``[batch, height, width, channels]``, already normalised.
      **apply_kwargs: Extra keyword arguments of ``model.__call__``.

    Returns:
      ``{name: LayerAttention}`` in the model's call order (empty for a model without
      attention).
    """
    from attnflax.nn.attention import (  # (it imports this module)
        CosineSelfAttention,
        LocalCosineSelfAttention2D,
        normalize_dilation,
    )

    local_options: dict[str, tuple[tuple[int, int], str]] = {}

    def capture(module: Any, method_name: str) -> bool:
        """Records the local layers' options; captures the global layers' outputs."""
        if isinstance(module, LocalCosineSelfAttention2D):
            local_options["/".join(module.scope.path)] = (
                normalize_dilation(module.dilation), module.border)
        return method_name == "__call__" and isinstance(module, CosineSelfAttention)

    flat = run_sowing(model, variables, images, capture_intermediates=capture,
                      **apply_kwargs)
    image_hw = tuple(np.shape(images)[1:3])
    layers: dict[str, LayerAttention] = {}
    for name, w in sown_maps(flat).items():
        path, _, index = name.partition("#")
        outputs = flat.get((*path.split("/"), "__call__"), ())
        i = int(index or 0)
        w = np.asarray(jax.device_get(w), np.float32)
        if w.ndim == 6:
            layers[name] = LayerAttention(name, "local", w, (w.shape[1], w.shape[2]),
                                          *local_options.get(path, ((1, 1), "mask")))
        elif w.ndim == 4:
            out = outputs[i] if i < len(outputs) else None
            if out is not None and np.ndim(out) == 4:
                grid = (int(out.shape[1]), int(out.shape[2]))
            else:
                grid = infer_grid(w.shape[-1], image_hw)
            layers[name] = LayerAttention(name, "global", w, grid)
        else:
            raise ValueError(f"layer {name!r} sowed attention weights of shape {w.shape}.")
    return layers


def select_layers(
    layers: dict[str, LayerAttention], names: Sequence[str] | None
) -> dict[str, LayerAttention]:
    """The layers named in `names` (all when None or empty), in the given order.

    Raises:
      ValueError: On a name that is not a layer; the message lists the existing ones.
    """
    if not names:
        return dict(layers)
    unknown = [n for n in names if n not in layers]
    if unknown:
        known = ", ".join(layers) or "(none: this model has no attention layers)"
        raise ValueError(f"unknown attention layer(s) {', '.join(unknown)}; existing: {known}.")
    return {n: layers[n] for n in names}


def to_grid(query: Sequence[int], image_hw: Sequence[int], grid: Sequence[int]) -> tuple[int, int]:
    """Maps an input-image pixel ``(y, x)`` to a feature-map cell of size `grid`."""
    y, x = (int(q) for q in query)
    if not (0 <= y < image_hw[0] and 0 <= x < image_hw[1]):
        raise ValueError(f"query pixel {(y, x)} lies outside the {tuple(image_hw)} image.")
    return (y * grid[0] // image_hw[0], x * grid[1] // image_hw[1])


def query_attention(
    layer: LayerAttention, index: int, query: Sequence[int], head: int | None = None
) -> np.ndarray:
    """Where one query pixel looks: its attention weights laid out on the layer's grid.

    Args:
      layer: From :func:`collect_attention`.
      index: Example in the batch.
      query: ``(y, x)`` on the layer's grid (see :func:`to_grid`).
      head: One head, or None for the mean over heads.

    Returns:
      float32 ``[H, W]``, non-negative, summing to 1; for a local layer zero outside the
      ``kh x kw`` window centred on the query.
    """
    layer.check_drawable()
    h_grid, w_grid = layer.grid
    y, x = (int(q) for q in query)
    if not (0 <= y < h_grid and 0 <= x < w_grid):
        raise ValueError(f"query {(y, x)} lies outside layer {layer.name!r}'s grid {layer.grid}.")
    if layer.kind == "local":
        w = layer.weights[index, y, x]  # [heads, kh, kw]
        w = w.mean(0) if head is None else w[head]
        kh, kw = w.shape
        out = np.zeros((h_grid + kh - 1, w_grid + kw - 1), np.float32)  # padded by the radius
        out[y : y + kh, x : x + kw] = w
        return out[kh // 2 : kh // 2 + h_grid, kw // 2 : kw // 2 + w_grid]
    w = layer.weights[index, :, y * w_grid + x]  # [heads, kv_len]
    w = w.mean(0) if head is None else w[head]
    return w.reshape(h_grid, w_grid).astype(np.float32)


def mean_attention(layer: LayerAttention, index: int) -> np.ndarray:
    """How much attention each pixel receives, averaged over queries and heads.

    Args:
      layer: From :func:`collect_attention`.
      index: Example in the batch.

    Returns:
      float32 ``[H, W]``, non-negative, summing to 1 (each query's weights sum to 1).
    """
    layer.check_drawable()
    h_grid, w_grid = layer.grid
    if layer.kind == "global":
        w = layer.weights[index].mean(axis=(0, 1))  # [kv_len]
        return w.reshape(h_grid, w_grid).astype(np.float32)
    w = layer.weights[index].mean(axis=2)  # [H, W, kh, kw]
    kh, kw = w.shape[-2:]
    out = np.zeros((h_grid + kh - 1, w_grid + kw - 1), np.float32)
    for dy in range(kh):
        for dx in range(kw):
            out[dy : dy + h_grid, dx : dx + w_grid] += w[:, :, dy, dx]
    out = out[kh // 2 : kh // 2 + h_grid, kw // 2 : kw // 2 + w_grid]
    return out / (h_grid * w_grid)
