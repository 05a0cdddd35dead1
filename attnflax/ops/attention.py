"""Cosine-similarity attention as pure JAX functions.

Both functions compute, for every query position ``i`` and head ``h``::

    w_ij = softmax_j( s_h * cos(q_i, k_j) + bias_h(i, j) )      cos(q, k) = q.k / (|q| |k|)
    out_i = sum_j w_ij v_j

where ``s_h`` is a positive per-head logit scale. Cosine logits lie in ``[-s, s]``,
so the scale alone sets how sharp attention is, and the softmax cannot overflow.

Numerics: the normalisation, the logits and the softmax run in float32 for
float32 and narrower inputs (bfloat16, float16), and in float64 for float64
inputs; the weighted sum accumulates in that dtype and the output has the
inputs' dtype. Vectors are normalised as ``x * rsqrt(max(|x|^2, eps^2))``
so a zero query or key gives a zero cosine and a finite gradient (the usual
``x / max(|x|, eps)`` has a NaN gradient at zero). Masked entries get exactly zero
weight, and a row with nothing to attend to returns zeros.

No Flax, no configuration and no I/O here: the functions compose with ``jit``,
``vmap``, ``grad``, ``jax.checkpoint`` and ``shard_map``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = Any

_NORM_EPS = 1e-6


# --------------------------------------------------------------------------- #
# Validation helpers: every error names the argument, what it got and wanted.  #
# --------------------------------------------------------------------------- #


def _check_rank(name: str, x: ArrayLike, rank: int, layout: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(
            f"`{name}` must have rank {rank} with layout {layout}; got shape {np.shape(x)}."
        )


def _check_same(what: str, dims: dict[str, int], layout: str) -> None:
    if len(set(dims.values())) > 1:
        got = ", ".join(f"{n}={d}" for n, d in dims.items())
        raise ValueError(f"{what} must match between {', '.join(dims)} ({layout}); got {got}.")


def _is_concrete(x: ArrayLike) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _compute_dtype(*xs: ArrayLike) -> Any:
    """float32, or float64 when an input is float64: never narrower than float32."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _check_logit_scale(logit_scale: ArrayLike, num_heads: int, dtype: Any) -> Array:
    """Returns the scale as ``dtype`` ``[heads]``; checks shape and (when concrete) sign."""
    shape = np.shape(logit_scale)
    if shape not in ((), (1,), (num_heads,)):
        raise ValueError(
            f"`logit_scale` must be a scalar or shaped [heads]=({num_heads},); got shape {shape}."
        )
    if _is_concrete(logit_scale):
        values = np.asarray(logit_scale, dtype=np.float64)
        if not np.all(values > 0) or not np.all(np.isfinite(values)):
            raise ValueError(
                "`logit_scale` must be positive and finite (modules store its log and "
                f"exponentiate it); got {values.tolist()}."
            )
    return jnp.broadcast_to(jnp.asarray(logit_scale, dtype), (num_heads,))


def _check_broadcastable(name: str, x: ArrayLike, target: tuple[int, ...], layout: str) -> None:
    shape = np.shape(x)
    ok = len(shape) <= len(target) and all(
        s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"`{name}` must broadcast to {layout}={target}; got shape {shape}."
        )


def _normalize(x: ArrayLike, dtype: Any) -> Array:
    """Unit vectors along the last axis, in ``dtype``, with a finite gradient at zero."""
    x = jnp.asarray(x).astype(dtype)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))


def _masked_softmax(logits: Array, mask: Array | None, axis: int = -1) -> Array:
    """Softmax where ``mask=False`` entries get exactly zero weight.

    A row whose entries are all masked returns all zeros (and zero gradients).
    """
    if mask is None:
        return jax.nn.softmax(logits, axis=axis)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=axis)
    return jnp.where(mask, weights, 0.0)


# --------------------------------------------------------------------------- #
# Global attention.                                                           #
# --------------------------------------------------------------------------- #


def cosine_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    logit_scale: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """Multi-head cosine-similarity attention over whole sequences.

    ``w[b,h,i,j] = softmax_j(logit_scale[h] * cos(query[b,i,h], key[b,j,h]) + bias[b,h,i,j])``
    over the ``j`` allowed by ``mask``; ``out[b,i,h] = sum_j w[b,h,i,j] value[b,j,h]``.
    The layout is the one of :func:`jax.nn.dot_product_attention`.

    Args:
      query: ``[batch, q_len, heads, head_dim]``.
      key: ``[batch, kv_len, heads, head_dim]``.
      value: ``[batch, kv_len, heads, value_dim]``.
      logit_scale: positive scale, a scalar or ``[heads]``.
      bias: optional additive logit bias broadcastable to ``[batch, heads, q_len, kv_len]``.
      mask: optional boolean, broadcastable to ``[batch, heads, q_len, kv_len]``;
        True = may attend. A query with nothing to attend to returns zeros.
      return_weights: also return the attention weights.

    Returns:
      ``out`` ``[batch, q_len, heads, value_dim]`` in the inputs' dtype, and with
      ``return_weights`` the weights ``[batch, heads, q_len, kv_len]`` in float32
      (float64 for float64 inputs).

    Raises:
      ValueError: on wrong ranks, mismatched dimensions, a bias or mask that does
        not broadcast, or a non-positive ``logit_scale`` (checked when concrete).
    """
    layout = "[batch, length, heads, head_dim]"
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_rank(name, x, 4, layout)
    (b, lq, h, d), (bk, lk, hk, dk), (bv, lv, hv, _) = map(np.shape, (query, key, value))
    _check_same("batch sizes", {"query": b, "key": bk, "value": bv}, layout)
    _check_same("head counts", {"query": h, "key": hk, "value": hv}, layout)
    _check_same("head_dim", {"query": d, "key": dk}, layout)
    _check_same("lengths", {"key": lk, "value": lv}, layout)
    out_dtype = jnp.result_type(query, key, value)
    dtype = _compute_dtype(out_dtype)
    scale = _check_logit_scale(logit_scale, h, dtype)
    target = (b, h, lq, lk)
    weights_layout = "[batch, heads, q_len, kv_len]"
    if bias is not None:
        _check_broadcastable("bias", bias, target, weights_layout)
    if mask is not None:
        _check_broadcastable("mask", mask, target, weights_layout)
        mask_dtype = jnp.result_type(mask)
        if not (mask_dtype == jnp.bool_ or jnp.issubdtype(mask_dtype, jnp.integer)):
            raise ValueError(
                f"`mask` must be boolean (True = may attend), shaped like {weights_layout}; "
                f"got dtype {mask_dtype}. Pass an additive float mask as `bias` instead."
            )
        mask = jnp.asarray(mask, dtype=bool)

    cos = jnp.einsum("bqhd,bkhd->bhqk", _normalize(query, dtype), _normalize(key, dtype))
    logits = cos * scale[None, :, None, None]
    if bias is not None:
        logits = logits + jnp.asarray(bias, dtype)
    weights = _masked_softmax(logits, mask)
    out = jnp.einsum(
        "bhqk,bkhd->bqhd", weights, jnp.asarray(value).astype(dtype)
    ).astype(out_dtype)
    return (out, weights) if return_weights else out


# --------------------------------------------------------------------------- #
# Local (neighbourhood) attention over images.                                 #
# --------------------------------------------------------------------------- #


def _check_window(window: Sequence[int]) -> tuple[int, int]:
    try:
        kh, kw = window
    except (TypeError, ValueError):
        kh = kw = None
    if not all(isinstance(w, int | np.integer) and not isinstance(w, bool) for w in (kh, kw)):
        raise ValueError(
            f"`window` must be a pair (kh, kw) of odd positive ints; got {window!r}."
        ) from None
    kh, kw = int(kh), int(kw)
    if kh <= 0 or kw <= 0 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(
            f"`window` sizes must be odd and positive so the query pixel sits at the centre; "
            f"got {(kh, kw)}. Use e.g. (3, 3), (5, 5) or (7, 7)."
        )
    return kh, kw


def window_validity(window: Sequence[int], image_size: Sequence[int]) -> np.ndarray:
    """Boolean ``[height, width, kh, kw]``: whether neighbour ``(dy, dx)`` of each pixel is
    inside the image; entry ``[y, x, dy + kh//2, dx + kw//2]``."""
    kh, kw = window
    height, width = image_size
    rows = np.arange(height)[:, None] + np.arange(kh)[None, :] - kh // 2
    cols = np.arange(width)[:, None] + np.arange(kw)[None, :] - kw // 2
    y_ok = (rows >= 0) & (rows < height)
    x_ok = (cols >= 0) & (cols < width)
    return y_ok[:, None, :, None] & x_ok[None, :, None, :]


class _AxisTiling:
    """Static geometry of the blocked computation along one image axis.

    The axis of ``size`` pixels is cut into ``n`` tiles of ``tile`` query pixels
    (padded at the end). Each tile attends to a halo of ``tile + 2 * halo`` key
    pixels starting ``halo`` before it. With a single tile the halo is dropped
    and the keys are the whole (padded) axis.
    """

    def __init__(self, size: int, window: int):
        self.size, self.window = size, window
        radius = min(window // 2, size - 1)  # offsets beyond the image never count
        tile = max(2 * radius + 2, 4)
        if tile >= size:
            tile, radius = size, 0
        self.tile, self.halo = tile, radius
        self.n = -(-size // tile)
        self.padded = self.n * tile
        self.keys = tile + 2 * radius

    def offsets(self) -> np.ndarray:
        """``[tile, keys]``: key minus query coordinate, for each query and key slot."""
        return np.arange(self.keys)[None, :] - self.halo - np.arange(self.tile)[:, None]

    def valid(self) -> np.ndarray:
        """Boolean ``[n, tile, keys]``: the key is inside the window and the image."""
        off = self.offsets()
        key_pos = np.arange(self.n)[:, None, None] * self.tile + np.arange(self.tile)[
            None, :, None
        ] + off[None]
        return (np.abs(off) <= self.window // 2)[None] & (key_pos >= 0) & (key_pos < self.size)

    def blocks(self, x: Array, axis: int) -> Array:
        """Overlapping key blocks: splits ``axis`` of length ``size`` into ``[n, keys]``."""
        t, r, n = self.tile, self.halo, self.n
        x = jnp.pad(x, [(0, 0)] * axis + [(r, self.padded - self.size + r)] + [(0, 0)] * (
            x.ndim - axis - 1))

        def tiles(start: int) -> Array:
            s = jax.lax.slice_in_dim(x, start, start + self.padded, axis=axis)
            return s.reshape(s.shape[:axis] + (n, t) + s.shape[axis + 1:])

        if r == 0:
            return tiles(0)
        head = jax.lax.slice_in_dim(tiles(0), 0, r, axis=axis + 1)
        tail = jax.lax.slice_in_dim(tiles(2 * r), t - r, t, axis=axis + 1)
        return jnp.concatenate([head, tiles(r), tail], axis=axis + 1)


def local_cosine_attention_2d(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    window: Sequence[int],
    logit_scale: ArrayLike,
    bias: ArrayLike | None = None,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """Multi-head cosine attention of every pixel over its ``kh x kw`` neighbourhood.

    For pixel ``p = (y, x)``, head ``h`` and offset ``o = (dy, dx)`` with
    ``|dy| <= kh // 2``, ``|dx| <= kw // 2``::

        w[p, h, o] = softmax_o( logit_scale[h] * cos(query[p, h], key[p + o, h])
                                + bias[h, dy + kh//2, dx + kw//2] )
        out[p, h]  = sum_o w[p, h, o] * value[p + o, h]

    Neighbours outside the image get exactly zero weight (they are masked, not
    zero-padded: a zero key would still get logit 0). A window with
    ``kh >= 2*height - 1`` and ``kw >= 2*width - 1`` covers the whole image from
    every pixel and equals :func:`cosine_attention` over the flattened image.

    How it is computed (blocked, HaloNet-style): the image is cut into tiles of
    ``T x T`` query pixels with ``T = 2r + 2`` for window radius ``r`` (4 for a 3x3
    window, 8 for 7x7). Each tile attends densely to its halo of
    ``(T + 2r) x (T + 2r)`` key pixels with one batched matmul; one static additive
    term on the logits holds the relative-position bias and masks the keys outside
    the window or the image (a huge negative logit, so exactly zero weight). The
    softmax normalisation is applied to the output rather than to the weights.
    Everything is dense matmuls, slices and reshapes, so XLA runs it (and its
    autodiff) efficiently.
    The largest arrays are the per-tile logits ``[batch, H*W, heads, (T+2r)^2]``
    (about 4x ``kh*kw`` per pixel and head) and halo copies of keys and values
    (about 4x their size): memory grows with ``batch * H * W * heads * kh * kw``.
    No ``[H*W, H*W]`` matrix and no ``[H*W, kh*kw, head_dim]`` patch tensor is
    built. Offsets beyond the image are never computed; an axis that fits in one
    tile attends to the whole axis without a halo.

    Args:
      query: ``[batch, height, width, heads, head_dim]``.
      key: ``[batch, height, width, heads, head_dim]``.
      value: ``[batch, height, width, heads, value_dim]``.
      window: ``(kh, kw)``, odd positive sizes.
      logit_scale: positive scale, a scalar or ``[heads]``.
      bias: optional relative-position bias ``[heads, kh, kw]``, indexed by the
        offset of the key from the query pixel (centre = same pixel).
      return_weights: also return the attention weights.

    Returns:
      ``out`` ``[batch, height, width, heads, value_dim]`` in the inputs' dtype, and
      with ``return_weights`` the weights ``[batch, height, width, heads, kh, kw]`` in
      float32 (float64 for float64 inputs), zero at neighbours outside the image and
      summing to 1 over the last two axes.

    Raises:
      ValueError: on wrong ranks, mismatched dimensions, even or non-positive
        window sizes, a bias not shaped ``[heads, kh, kw]``, or a non-positive
        ``logit_scale`` (checked when concrete).
    """
    layout = "[batch, height, width, heads, head_dim]"
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_rank(name, x, 5, layout)
    (b, height, width, h, d), ks, vs = map(np.shape, (query, key, value))
    _check_same("batch sizes", {"query": b, "key": ks[0], "value": vs[0]}, layout)
    _check_same("image sizes", {"query": (height, width), "key": ks[1:3], "value": vs[1:3]}, layout)
    _check_same("head counts", {"query": h, "key": ks[3], "value": vs[3]}, layout)
    _check_same("head_dim", {"query": d, "key": ks[4]}, layout)
    kh, kw = _check_window(window)
    out_dtype = jnp.result_type(query, key, value)
    dtype = _compute_dtype(out_dtype)
    scale = _check_logit_scale(logit_scale, h, dtype)
    if bias is not None and np.shape(bias) != (h, kh, kw):
        raise ValueError(
            f"`bias` must be shaped [heads, kh, kw]=({h}, {kh}, {kw}); got {np.shape(bias)}."
        )

    ty, tx = _AxisTiling(height, kh), _AxisTiling(width, kw)
    ny, nx, n_q, n_k = ty.n, tx.n, ty.tile * tx.tile, ty.keys * tx.keys

    # Queries: [b, ny, nx, h, tile_y * tile_x, d].
    q = jnp.pad(_normalize(query, dtype), ((0, 0), (0, ty.padded - height), (0, tx.padded - width),
                                    (0, 0), (0, 0)))
    q = q.reshape(b, ny, ty.tile, nx, tx.tile, h, d).transpose(0, 1, 3, 5, 2, 4, 6)
    q = q.reshape(b, ny, nx, h, n_q, d)

    def halo(x: Array) -> Array:  # [b, H, W, h, c] -> [b, ny, nx, h, keys_y * keys_x, c]
        x = tx.blocks(ty.blocks(x, axis=1), axis=3)  # [b, ny, ky, nx, kx, h, c]
        x = x.transpose(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, ny, nx, h, n_k, x.shape[-1])

    k = halo(_normalize(key, dtype))
    v = halo(jnp.asarray(value).astype(dtype))
    # The scale goes on the queries, which are smaller than the logits.
    logits = jnp.einsum("byxhqd,byxhkd->byxhqk", q * scale[:, None, None], k)

    # One static additive term per logit: 0 for keys inside the window and the image,
    # a huge negative number otherwise (its exp is exactly 0), plus the relative-position
    # bias. Built per axis and broadcast; [ny, nx, 1 or h, n_q, n_k].
    big = np.finfo(dtype).min / 4  # two axes add up to min / 2: no overflow to -inf
    pen_y = jnp.asarray(np.where(ty.valid(), 0.0, big), dtype)  # [ny, tile_y, keys_y]
    pen_x = jnp.asarray(np.where(tx.valid(), 0.0, big), dtype)  # [nx, tile_x, keys_x]
    penalty = pen_y[:, None, :, None, :, None] + pen_x[None, :, None, :, None, :]
    penalty = penalty.reshape(ny, nx, 1, n_q, n_k)
    if bias is not None:
        iy = np.clip(ty.offsets() + kh // 2, 0, kh - 1)[:, None, :, None]
        ix = np.clip(tx.offsets() + kw // 2, 0, kw - 1)[None, :, None, :]
        table = jnp.asarray(bias, dtype)[:, iy, ix]  # [h, tile_y, tile_x, keys_y, keys_x]
        penalty = penalty + table.reshape(h, n_q, n_k)
    logits = logits + penalty

    # Softmax, normalised after the weighted sum (the same ratio, divided on the
    # [.., q, d] output instead of the larger [.., q, k] weights). Every real query sees
    # at least itself, so its max is a real logit and masked keys get exactly 0; padded
    # query slots (cropped below) may see only masked keys and get finite junk.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnorm = jnp.exp(logits - top)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    out = jnp.einsum("byxhqk,byxhkd->byxhqd", unnorm, v) / denom
    out = out.reshape(b, ny, nx, h, ty.tile, tx.tile, -1).transpose(0, 1, 4, 2, 5, 3, 6)
    out = out.reshape(b, ty.padded, tx.padded, h, -1)[:, :height, :width].astype(out_dtype)
    if not return_weights:
        return out
    return out, _window_weights(unnorm / denom, ty, tx, (kh, kw), (height, width))


def _window_weights(
    weights: Array,
    ty: _AxisTiling,
    tx: _AxisTiling,
    window: tuple[int, int],
    image_size: tuple[int, int],
) -> Array:
    """Blocked weights ``[b, ny, nx, h, q, k]`` -> window form ``[b, H, W, h, kh, kw]``."""
    kh, kw = window
    height, width = image_size
    b, ny, nx, h = weights.shape[:4]
    w = weights.reshape(b, ny, nx, h, ty.tile, tx.tile, ty.keys, tx.keys)
    # Key slot of window offset (oy - kh//2) for query slot t: t + oy - kh//2 + halo.
    sy = np.arange(ty.tile)[:, None] + np.arange(kh)[None, :] - kh // 2 + ty.halo  # [tile, kh]
    sx = np.arange(tx.tile)[:, None] + np.arange(kw)[None, :] - kw // 2 + tx.halo
    ok_y, ok_x = (sy >= 0) & (sy < ty.keys), (sx >= 0) & (sx < tx.keys)
    sy, sx = np.clip(sy, 0, ty.keys - 1), np.clip(sx, 0, tx.keys - 1)
    iy = np.arange(ty.tile)[:, None, None, None]
    ix = np.arange(tx.tile)[None, :, None, None]
    w = w[:, :, :, :, iy, ix, sy[:, None, :, None], sx[None, :, None, :]]
    w = jnp.where(ok_y[:, None, :, None] & ok_x[None, :, None, :], w, 0.0)
    w = w.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [b, ny, ty, nx, tx, h, kh, kw]
    w = w.reshape(b, ny * ty.tile, nx * tx.tile, h, kh, kw)
    return w[:, :height, :width]
