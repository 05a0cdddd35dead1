"""Plain-loop numpy references of the attention functions, used only by the tests.

Written to be obviously correct rather than fast: explicit loops over every query,
head and neighbour, float64 throughout, and the definition straight from the
docstrings of :mod:`attnflax.ops.attention`::

    w_ij  = softmax_j( s_h * cos(q_i, k_j) + bias_h(i, j) )   over the allowed j
    out_i = sum_j w_ij v_j                                     (zeros if no j is allowed)

with ``cos(q, k) = q.k / (max(|q|, eps) * max(|k|, eps))`` so that a zero vector has
cosine 0 with everything (the same ``eps`` as the implementation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

NORM_EPS = 1e-6


def _unit(x: np.ndarray) -> np.ndarray:
    """``x / max(|x|, eps)`` for one vector, in float64."""
    x = np.asarray(x, np.float64)
    return x / max(math.sqrt(float(np.dot(x, x))), NORM_EPS)


def _softmax_allowed(logits: list[float], allowed: list[bool]) -> list[float]:
    """Softmax over the allowed entries; the others (and an empty row) get 0."""
    chosen = [z for z, ok in zip(logits, allowed, strict=True) if ok]
    if not chosen:
        return [0.0] * len(logits)
    top = max(chosen)
    exps = [math.exp(z - top) if ok else 0.0 for z, ok in zip(logits, allowed, strict=True)]
    total = sum(exps)
    return [e / total for e in exps]


def _scales(logit_scale: Any, heads: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(logit_scale, np.float64).reshape(-1), (heads,))


def cosine_attention_ref(
    query: Any,
    key: Any,
    value: Any,
    *,
    logit_scale: Any,
    bias: Any | None = None,
    mask: Any | None = None,
    return_weights: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Reference of :func:`attnflax.cosine_attention` (float64 result).

    Args:
      query: ``[batch, q_len, heads, head_dim]``.
      key: ``[batch, kv_len, heads, head_dim]``.
      value: ``[batch, kv_len, heads, value_dim]``.
      logit_scale: scalar or ``[heads]``.
      bias: optional, broadcastable to ``[batch, heads, q_len, kv_len]``.
      mask: optional boolean, broadcastable to ``[batch, heads, q_len, kv_len]``.
      return_weights: also return the weights ``[batch, heads, q_len, kv_len]``.

    Returns:
      ``out`` ``[batch, q_len, heads, value_dim]`` (and the weights), float64.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (query, key, value))
    batch, q_len, heads, _ = q.shape
    kv_len, value_dim = k.shape[1], v.shape[3]
    full = (batch, heads, q_len, kv_len)
    scale = _scales(logit_scale, heads)
    bias_full = np.broadcast_to(np.asarray(0.0 if bias is None else bias, np.float64), full)
    mask_full = np.broadcast_to(np.asarray(True if mask is None else mask, bool), full)
    out = np.zeros((batch, q_len, heads, value_dim))
    weights = np.zeros(full)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                qi = _unit(q[b, i, h])
                logits = [
                    scale[h] * float(np.dot(qi, _unit(k[b, j, h]))) + bias_full[b, h, i, j]
                    for j in range(kv_len)
                ]
                row = _softmax_allowed(logits, [bool(m) for m in mask_full[b, h, i]])
                for j in range(kv_len):
                    weights[b, h, i, j] = row[j]
                    out[b, i, h] += row[j] * v[b, j, h]
    return (out, weights) if return_weights else out


def _axis_neighbours(
    i: int, n: int, k: int, d: int, border: str
) -> list[tuple[int, int, int, bool]]:
    """The ``k`` neighbours of pixel ``i`` along an axis of ``n`` pixels, window ``k``,
    dilation ``d``, as ``(entry, pixel, bias index, inside the image)``.

    ``'mask'``: entry ``o + k//2`` is pixel ``i + d*o`` for ``o`` in ``-(k//2)..k//2``,
    bias index ``o + k//2``. ``'shift'`` (NATTEN): ``i = g + d*j`` lies at position ``j``
    of the sub-grid ``g, g + d, ...`` (``L`` pixels); its window starts at
    ``s = clamp(j - k//2, 0, L - k)``, entry ``t`` is pixel ``g + d*(s + t)``, bias index
    ``k - 1 + (s + t - j)``.
    """
    r = k // 2
    if border == "mask":
        return [(o + r, i + d * o, o + r, 0 <= i + d * o < n) for o in range(-r, r + 1)]
    g, j = i % d, i // d
    length = len(range(g, n, d))
    assert length >= k, "border='shift' needs k * d <= n"
    s = min(max(j - r, 0), length - k)
    return [(t, g + d * (s + t), k - 1 + s + t - j, True) for t in range(k)]


def local_cosine_attention_2d_ref(
    query: Any,
    key: Any,
    value: Any,
    *,
    window: Sequence[int],
    logit_scale: Any,
    bias: Any | None = None,
    dilation: Sequence[int] = (1, 1),
    border: str = "mask",
    return_weights: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Reference of :func:`attnflax.local_cosine_attention_2d` (float64 result).

    ``border='mask'``: pixel ``(y, x)`` attends to the in-image pixels
    ``(y + dy*oy, x + dx*ox)`` with ``|oy| <= kh // 2`` and ``|ox| <= kw // 2``;
    ``bias[h, oy + kh//2, ox + kw//2]``. ``border='shift'``: to the ``kh x kw`` pixels of
    its window clamped inside the image per dilation sub-grid; ``bias[h, kh-1 + ry,
    kw-1 + rx]`` for the key minus query position ``(ry, rx)`` in units of the dilation
    (see :func:`_axis_neighbours`).

    Args:
      query: ``[batch, height, width, heads, head_dim]``.
      key: ``[batch, height, width, heads, head_dim]``.
      value: ``[batch, height, width, heads, value_dim]``.
      window: ``(kh, kw)``, odd.
      logit_scale: scalar or ``[heads]``.
      bias: optional ``[heads, kh, kw]`` (``'mask'``) or ``[heads, 2kh-1, 2kw-1]``
        (``'shift'``).
      dilation: ``(dy, dx)``.
      border: ``'mask'`` or ``'shift'``.
      return_weights: also return the weights ``[batch, height, width, heads, kh, kw]``.

    Returns:
      ``out`` ``[batch, height, width, heads, value_dim]`` (and the weights), float64.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (query, key, value))
    batch, height, width, heads, _ = q.shape
    value_dim = v.shape[4]
    kh, kw = window
    dy, dx = dilation
    scale = _scales(logit_scale, heads)
    bias_shape = (heads, kh, kw) if border == "mask" else (heads, 2 * kh - 1, 2 * kw - 1)
    bias_table = np.zeros(bias_shape) if bias is None else np.asarray(bias, np.float64)
    assert bias_table.shape == bias_shape, (bias_table.shape, bias_shape)
    out = np.zeros((batch, height, width, heads, value_dim))
    weights = np.zeros((batch, height, width, heads, kh, kw))
    for b in range(batch):
        for y in range(height):
            rows = _axis_neighbours(y, height, kh, dy, border)
            for x in range(width):
                cols = _axis_neighbours(x, width, kw, dx, border)
                for h in range(heads):
                    qi = _unit(q[b, y, x, h])
                    entries, logits, allowed = [], [], []
                    for ey, yy, by, y_in in rows:
                        for ex, xx, bx, x_in in cols:
                            inside = y_in and x_in
                            entries.append((ey, ex, yy, xx))
                            allowed.append(inside)
                            logits.append(
                                scale[h] * float(np.dot(qi, _unit(k[b, yy, xx, h])))
                                + bias_table[h, by, bx]
                                if inside
                                else 0.0
                            )
                    row = _softmax_allowed(logits, allowed)
                    for (ey, ex, yy, xx), w in zip(entries, row, strict=True):
                        weights[b, y, x, h, ey, ex] = w
                        if w:
                            out[b, y, x, h] += w * v[b, yy, xx, h]
    return (out, weights) if return_weights else out


def local_cosine_attention_2d_jnp_ref(
    query: Any,
    key: Any,
    value: Any,
    *,
    window: Sequence[int],
    logit_scale: Any,
    bias: Any | None = None,
    dilation: Sequence[int] = (1, 1),
    border: str = "mask",
) -> Any:
    """The same as :func:`local_cosine_attention_2d_ref`, written with ``jax.numpy`` so it
    can be differentiated: each pixel's neighbours (from :func:`_axis_neighbours`, as a
    static table) are gathered into ``[batch, H, W, heads, kh*kw, dim]`` patches and a
    masked softmax is taken over them. Float32 or float64 as its inputs; ``|x|`` has no
    gradient at 0, so keep vectors away from zero when differentiating it.
    """
    import jax
    import jax.numpy as jnp

    q, k, v = (jnp.asarray(a) for a in (query, key, value))
    _, height, width, heads, _ = q.shape
    kh, kw = window
    dy, dx = dilation
    rows = [_axis_neighbours(y, height, kh, dy, border) for y in range(height)]
    cols = [_axis_neighbours(x, width, kw, dx, border) for x in range(width)]
    # [H, W, kh*kw] tables: key pixel (clipped when outside), bias entry, inside.
    yy = np.array([[[min(max(p, 0), height - 1) for _, p, _, _ in rows[y] for _ in range(kw)]
                    for _ in range(width)] for y in range(height)])
    xx = np.array([[[min(max(p, 0), width - 1) for _ in range(kh) for _, p, _, _ in cols[x]]
                    for x in range(width)] for _ in range(height)])
    by = np.array([[[i for _, _, i, _ in rows[y] for _ in range(kw)] for _ in range(width)]
                   for y in range(height)])
    bx = np.array([[[i for _ in range(kh) for _, _, i, _ in cols[x]] for x in range(width)]
                   for _ in range(height)])
    inside = np.array([[[a and c for _, _, _, a in rows[y] for _, _, _, c in cols[x]]
                        for x in range(width)] for y in range(height)])

    def unit(x: Any) -> Any:
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)

    qn, kn = unit(q), unit(k)
    kp = kn[:, yy, xx]  # [b, H, W, kh*kw, heads, d]
    vp = v[:, yy, xx]
    scale = jnp.broadcast_to(jnp.reshape(jnp.asarray(logit_scale, q.dtype), (-1,)), (heads,))
    logits = jnp.einsum("byxhd,byxnhd->byxhn", qn, kp) * scale[:, None]
    if bias is not None:
        logits = logits + jnp.moveaxis(jnp.asarray(bias)[:, by, bx], 0, 2)  # [H, W, h, n]
    logits = jnp.where(inside[:, :, None, :], logits, -jnp.inf)
    w = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("byxhn,byxnhd->byxhd", w, vp)
