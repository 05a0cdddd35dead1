"""Kernels of local (neighbourhood) attention over images: the blocked geometry and two
implementations of the same contract.

Both kernels take queries already unit-normalised and multiplied by the per-head logit
scale, unit keys and values, all ``[batch, height, width, heads, dim]`` in the compute
dtype (float32, or float64), and return ``sum_o softmax_o(q . k_{p+o} + bias[o]) v_{p+o}``
over the window offsets ``o`` inside the image. Validation, normalisation and dtypes are
the business of :func:`attnflax.ops.attention.local_cosine_attention_2d`.

Geometry (HaloNet-style blocking): the image is cut into tiles of ``T x T`` query pixels;
each tile attends densely to its halo of ``(T + 2r) x (T + 2r)`` key pixels with one
batched matmul, and one static additive term on the logits masks the keys outside the
window or the image (a huge negative logit: exactly zero weight) and adds the
relative-position bias.

- ``'xla'`` (:func:`halo_attention`): the whole batch in one program; XLA's autodiff
  keeps the logits ``[batch, H*W, heads, (T+2r)^2]`` for the backward pass.
- ``'chunked'`` (:func:`chunked_halo_attention`): the same tiles, a few images at a
  time (``lax.scan`` over batch chunks, so on CPU the logits of a chunk stay in cache),
  and a custom VJP that keeps only the output and the per-query log-sum-exp and
  recomputes the logits chunk by chunk in the backward pass (flash-attention style):
  memory is the inputs and outputs plus one chunk's logits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class AxisTiling:
    """Static geometry of the blocked computation along one image axis.

    The axis of ``size`` pixels is cut into ``n`` tiles of ``tile`` query pixels
    (padded at the end). Each tile attends to a halo of ``tile + 2 * halo`` key
    pixels starting ``halo`` before it. With a single tile the halo is dropped
    and the keys are the whole (padded) axis.

    Args:
      size: pixels along the axis.
      window: odd window size along the axis.
      tile: query pixels per tile; default ``2r + 2`` for window radius ``r``
        (at least 4), about 4x ``window^2`` logits per query in 2-D.
    """

    def __init__(self, size: int, window: int, tile: int | None = None):
        self.size, self.window = size, window
        radius = min(window // 2, size - 1)  # offsets beyond the image never count
        tile = max(2 * radius + 2, 4) if tile is None else max(1, int(tile))
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


class Geometry:
    """Tilings of both image axes for a window, and the layout changes they imply.

    Blocked layouts: queries ``[b, ny, nx, heads, n_q, c]`` with ``n_q = tile_y * tile_x``,
    key halos ``[b, ny, nx, heads, n_k, c]`` with ``n_k = keys_y * keys_x``.
    """

    def __init__(
        self, image_size: Sequence[int], window: Sequence[int], tile: int | None = None
    ):
        self.height, self.width = (int(s) for s in image_size)
        self.window = tuple(int(w) for w in window)
        self.key = ((self.height, self.width), self.window, tile)  # rebuilds this geometry
        self.ty = AxisTiling(self.height, self.window[0], tile)
        self.tx = AxisTiling(self.width, self.window[1], tile)
        self.n_q = self.ty.tile * self.tx.tile
        self.n_k = self.ty.keys * self.tx.keys

    def query_tiles(self, x: Array) -> Array:
        """``[b, H, W, h, c]`` -> ``[b, ny, nx, h, n_q, c]`` (zero-padded tiles)."""
        ty, tx = self.ty, self.tx
        b, _, _, h, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, ty.padded - self.height), (0, tx.padded - self.width),
                        (0, 0), (0, 0)))
        x = x.reshape(b, ty.n, ty.tile, tx.n, tx.tile, h, c).transpose(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, ty.n, tx.n, h, self.n_q, c)

    def from_query_tiles(self, x: Array) -> Array:
        """``[b, ny, nx, h, n_q, c]`` -> ``[b, H, W, h, c]`` (the transpose of
        :meth:`query_tiles`: padded slots are cropped)."""
        ty, tx = self.ty, self.tx
        b, _, _, h, _, c = x.shape
        x = x.reshape(b, ty.n, tx.n, h, ty.tile, tx.tile, c).transpose(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, ty.padded, tx.padded, h, c)[:, :self.height, :self.width]

    def key_halos(self, x: Array) -> Array:
        """``[b, H, W, h, c]`` -> ``[b, ny, nx, h, n_k, c]`` (overlapping halos)."""
        b, h, c = x.shape[0], x.shape[3], x.shape[4]
        x = self.tx.blocks(self.ty.blocks(x, axis=1), axis=3)  # [b, ny, ky, nx, kx, h, c]
        x = x.transpose(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, self.ty.n, self.tx.n, h, self.n_k, c)

    def penalty(self, dtype: jnp.dtype) -> np.ndarray:
        """Static ``[ny, nx, 1, n_q, n_k]`` (numpy): 0 for keys inside the window and the
        image, a huge negative logit (exp is exactly 0) elsewhere."""
        big = np.finfo(dtype).min / 4  # two axes add up to min / 2: no overflow to -inf
        pen_y = np.where(self.ty.valid(), 0.0, big)  # [ny, tile_y, keys_y]
        pen_x = np.where(self.tx.valid(), 0.0, big)  # [nx, tile_x, keys_x]
        pen = pen_y[:, None, :, None, :, None] + pen_x[None, :, None, :, None, :]
        return pen.reshape(self.ty.n, self.tx.n, 1, self.n_q, self.n_k).astype(dtype)

    def bias_table(self, bias: Array) -> Array:
        """Relative-position bias ``[h, kh, kw]`` -> per-slot logit bias ``[h, n_q, n_k]``
        (slots outside the window get a clipped entry; the penalty masks them)."""
        kh, kw = self.window
        iy = np.clip(self.ty.offsets() + kh // 2, 0, kh - 1)[:, None, :, None]
        ix = np.clip(self.tx.offsets() + kw // 2, 0, kw - 1)[None, :, None, :]
        return bias[:, iy, ix].reshape(bias.shape[0], self.n_q, self.n_k)

    def window_weights(self, weights: Array) -> Array:
        """Blocked weights ``[b, ny, nx, h, n_q, n_k]`` -> ``[b, H, W, h, kh, kw]``."""
        (kh, kw), ty, tx = self.window, self.ty, self.tx
        b, ny, nx, h = weights.shape[:4]
        w = weights.reshape(b, ny, nx, h, ty.tile, tx.tile, ty.keys, tx.keys)
        # Key slot of window offset (oy - kh//2) for query slot t: t + oy - kh//2 + halo.
        sy = np.arange(ty.tile)[:, None] + np.arange(kh)[None, :] - kh // 2 + ty.halo
        sx = np.arange(tx.tile)[:, None] + np.arange(kw)[None, :] - kw // 2 + tx.halo
        ok_y, ok_x = (sy >= 0) & (sy < ty.keys), (sx >= 0) & (sx < tx.keys)
        sy, sx = np.clip(sy, 0, ty.keys - 1), np.clip(sx, 0, tx.keys - 1)
        iy = np.arange(ty.tile)[:, None, None, None]
        ix = np.arange(tx.tile)[None, :, None, None]
        w = w[:, :, :, :, iy, ix, sy[:, None, :, None], sx[None, :, None, :]]
        w = jnp.where(ok_y[:, None, :, None] & ok_x[None, :, None, :], w, 0.0)
        w = w.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [b, ny, ty, nx, tx, h, kh, kw]
        w = w.reshape(b, ny * ty.tile, nx * tx.tile, h, kh, kw)
        return w[:, :self.height, :self.width]

    def logits(self, qt: Array, kt: Array, table: Array | None) -> Array:
        """Blocked logits ``[b, ny, nx, h, n_q, n_k]`` with the penalty and bias added."""
        s = jnp.einsum("byxhqd,byxhkd->byxhqk", qt, kt) + self.penalty(qt.dtype)
        return s if table is None else s + table


def halo_attention(
    q: Array, k: Array, v: Array, bias: Array | None, geometry: Geometry,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
    """The ``'xla'`` kernel: the whole batch at once, differentiated by XLA.

    Args:
      q: scaled unit queries ``[b, H, W, h, d]``.
      k: unit keys ``[b, H, W, h, d]``.
      v: values ``[b, H, W, h, dv]``.
      bias: ``[h, kh, kw]`` or None.
      geometry: the tiling.
      return_weights: also return ``[b, H, W, h, kh, kw]`` weights.
    """
    g = geometry
    table = None if bias is None else g.bias_table(bias)
    logits = g.logits(g.query_tiles(q), g.key_halos(k), table)
    # Softmax, normalised after the weighted sum (the same ratio, divided on the
    # [.., q, d] output instead of the larger [.., q, k] weights). Every real query sees
    # at least itself, so its max is a real logit and masked keys get exactly 0; padded
    # query slots (cropped) may see only masked keys and get finite junk.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnorm = jnp.exp(logits - top)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    out = g.from_query_tiles(jnp.einsum("byxhqk,byxhkd->byxhqd", unnorm, g.key_halos(v)) / denom)
    if not return_weights:
        return out
    return out, g.window_weights(unnorm / denom)


def _chunks(x: Array, chunk: int) -> Array:
    """``[b, ...]`` -> ``[b // chunk, chunk, ...]``."""
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _unchunk(x: Array) -> Array:
    return x.reshape((-1,) + x.shape[2:])


@functools.lru_cache(maxsize=256)
def _chunked_kernel(geometry_key: tuple, chunk: int):
    """The custom-VJP ``(q, k, v, table) -> out`` for one geometry and chunk size."""
    g = Geometry(*geometry_key)

    def forward_chunk(q, k, v, table):
        s = g.logits(g.query_tiles(q), g.key_halos(k), table)
        top = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - top)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("byxhqk,byxhkd->byxhqd", p, g.key_halos(v)) / denom
        return g.from_query_tiles(o), (top + jnp.log(denom))[..., 0]

    def run_forward(q, k, v, table):
        def body(_, xs):
            return None, forward_chunk(*xs, table)

        _, (out, lse) = jax.lax.scan(body, None, tuple(_chunks(x, chunk) for x in (q, k, v)))
        return _unchunk(out), lse  # lse stays chunked: [b // chunk, chunk, ny, nx, h, n_q]

    @jax.custom_vjp
    def kernel(q, k, v, table):
        return run_forward(q, k, v, table)[0]

    def fwd(q, k, v, table):
        out, lse = run_forward(q, k, v, table)
        return out, (q, k, v, table, out, lse)

    def bwd(res, g_out):
        q, k, v, table, out, lse = res

        def body(_, xs):
            qc, kc, vc, oc, lc, gc = xs
            qt, kt, vt, gt = g.query_tiles(qc), g.key_halos(kc), g.key_halos(vc), g.query_tiles(gc)
            delta = jnp.sum(gt * g.query_tiles(oc), axis=-1, keepdims=True)
            p = jnp.exp(g.logits(qt, kt, table) - lc[..., None])
            dp = jnp.einsum("byxhqd,byxhkd->byxhqk", gt, vt)
            ds = p * (dp - delta)
            dq = g.from_query_tiles(jnp.einsum("byxhqk,byxhkd->byxhqd", ds, kt))
            halo_t = jax.linear_transpose(g.key_halos, kc)
            (dk,) = halo_t(jnp.einsum("byxhqk,byxhqd->byxhkd", ds, qt))
            (dv,) = jax.linear_transpose(g.key_halos, vc)(
                jnp.einsum("byxhqk,byxhqd->byxhkd", p, gt))
            dtable = None if table is None else jnp.sum(ds, axis=(0, 1, 2))  # [h, n_q, n_k]
            return None, (dq, dk, dv, dtable)

        xs = tuple(_chunks(x, chunk) for x in (q, k, v, out)) + (lse, _chunks(g_out, chunk))
        _, (dq, dk, dv, dtable) = jax.lax.scan(body, None, xs)
        dtable = None if dtable is None else jnp.sum(dtable, axis=0)  # over chunks
        return _unchunk(dq), _unchunk(dk), _unchunk(dv), dtable

    kernel.defvjp(fwd, bwd)
    return kernel


def chunked_halo_attention(
    q: Array, k: Array, v: Array, bias: Array | None, geometry: Geometry, chunk: int
) -> Array:
    """The ``'chunked'`` kernel: ``chunk`` images at a time, logits recomputed in the
    backward pass. Same arguments as :func:`halo_attention`; ``chunk`` must divide the
    batch (the caller pads it)."""
    table = None if bias is None else geometry.bias_table(bias)
    return _chunked_kernel(geometry.key, chunk)(q, k, v, table)
