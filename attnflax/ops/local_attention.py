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
  and a custom VJP that keeps only the raw inputs, the output and the per-query
  log-sum-exp and recomputes the logits chunk by chunk in the backward pass
  (flash-attention style): memory is the inputs and outputs plus one chunk's logits. It
  also unit-normalises and scales the queries and keys chunk by chunk (and goes back
  through that in its backward pass) and gathers the key and value halos with one gather
  (:meth:`Geometry.key_halos_gathered`) and folds their gradients back onto the image
  in one pass per axis (:meth:`Geometry.from_key_halos`): whole-batch passes and XLA's
  slice, concatenate and pad code were a large part of its time on CPU.

Dilation and border (NATTEN's options) live in the geometry too. Dilation ``d`` along an
axis splits it into ``d`` interleaved sub-grids (pixel ``i`` -> sub-grid ``i % d``,
position ``i // d``; space-to-batch, the axis padded to a multiple of ``d``), on which
the neighbours ``i + d*o`` are the undilated neighbours ``i // d + o``: the kernels run
undilated on the ``dy*dx`` sub-grids of each image, folded into the batch, with a
penalty that also masks each sub-grid's padded positions. Border ``'shift'`` (NATTEN's
neighbourhood attention) clamps each query's window inside its sub-grid; the key then
lies up to ``k - 1`` (not ``k // 2``) positions from the query, so the halo is ``k - 1``
wide and the penalty keeps the ``k`` keys of the clamped window.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnflax.ops.recompute import recomputing_vjp

Array = jax.Array


BORDERS = ("mask", "shift")


class AxisTiling:
    """Static geometry of the blocked computation along one image axis.

    The axis of ``size`` pixels is split into ``dilation`` sub-grids of ``sub =
    ceil(size / dilation)`` positions (pixel ``i`` is position ``i // dilation`` of
    sub-grid ``i % dilation``; sub-grid ``g`` holds ``lengths[g]`` real pixels, the rest
    is padding). Each sub-grid axis is cut into ``n`` tiles of ``tile`` query positions
    (padded at the end). Each tile attends to a halo of ``tile + 2 * halo`` key positions
    starting ``halo`` before it; ``halo`` is the farthest a key of the window may lie from
    its query (``window // 2`` with ``border='mask'``, ``window - 1`` with ``'shift'``),
    clipped to the sub-grid. With a single tile the halo is dropped and the keys are the
    whole (padded) sub-grid axis. Without dilation there is one sub-grid, the axis itself.

    Args:
      size: pixels along the axis.
      window: odd window size along the axis.
      tile: query positions per tile; default ``2 * (window // 2) + 2`` (at least 4),
        about 4x ``window^2`` logits per query in 2-D with ``border='mask'``.
      dilation: the distance between neighbours (a positive int).
      border: ``'mask'`` (neighbours outside the image are masked) or ``'shift'`` (the
        window is clamped inside the sub-grid; needs ``window <= lengths.min()``).
    """

    def __init__(
        self, size: int, window: int, tile: int | None = None, dilation: int = 1,
        border: str = "mask",
    ):
        self.size, self.window, self.dilation, self.border = size, window, dilation, border
        self.sub = -(-size // dilation)
        self.lengths = np.array([len(range(g, size, dilation)) for g in range(dilation)])
        reach = window // 2 if border == "mask" else window - 1
        if border == "shift" and window > self.lengths.min():
            raise ValueError(f"border='shift' needs window * dilation <= size; got window "
                             f"{window}, dilation {dilation}, size {size}.")
        radius = min(reach, self.sub - 1)  # offsets beyond the sub-grid never count
        if tile is None:  # from the window's radius: with 'shift' too (measured faster)
            tile = max(2 * min(window // 2, self.sub - 1) + 2, 4)
        tile = max(1, int(tile))
        if tile >= self.sub:
            tile, radius = self.sub, 0
        self.tile, self.halo = tile, radius
        self.n = -(-self.sub // tile)
        self.padded = self.n * tile
        self.keys = tile + 2 * radius

    def offsets(self) -> np.ndarray:
        """``[tile, keys]``: key minus query position, for each query and key slot."""
        return np.arange(self.keys)[None, :] - self.halo - np.arange(self.tile)[:, None]

    def _query_positions(self) -> np.ndarray:
        """``[n, tile]``: the sub-grid position of each query slot."""
        return np.arange(self.n)[:, None] * self.tile + np.arange(self.tile)[None, :]

    def _window_starts(self) -> np.ndarray:
        """``[dilation, n, tile]``: first sub-grid position of each query's clamped window
        (``border='shift'``)."""
        starts = self._query_positions()[None] - self.window // 2
        return np.clip(starts, 0, np.maximum(self.lengths - self.window, 0)[:, None, None])

    def valid(self) -> np.ndarray:
        """Boolean ``[dilation, n, tile, keys]``: the key is inside the query's window and
        the image."""
        off = self.offsets()
        key_pos = self._query_positions()[:, :, None] + off[None]  # [n, tile, keys]
        if self.border == "shift":
            start = self._window_starts()[..., None]
            return (key_pos[None] >= start) & (key_pos[None] < start + self.window)
        inside = (key_pos >= 0)[None] & (key_pos[None] < self.lengths[:, None, None, None])
        return (np.abs(off) <= self.window // 2)[None, None] & inside

    def bias_index(self) -> np.ndarray:
        """``[tile, keys]``: index of each slot into the relative-position bias axis
        (``window`` entries by window offset with ``'mask'``, ``2 * window - 1`` by key
        minus query position with ``'shift'``), clipped where the penalty masks."""
        if self.border == "shift":
            return np.clip(self.offsets() + self.window - 1, 0, 2 * self.window - 2)
        return np.clip(self.offsets() + self.window // 2, 0, self.window - 1)

    def window_slots(self) -> tuple[np.ndarray, np.ndarray]:
        """``([dilation, n, tile, window], same)``: the key slot of each window entry of
        each query slot (entry ``o`` = offset ``o - window // 2`` with ``'mask'``, the
        ``o``-th key of the clamped window with ``'shift'``), and whether it is a slot."""
        pos = self._query_positions()[None, :, :, None]  # [1, n, tile, 1]
        entries = np.arange(self.window)
        if self.border == "shift":
            key_pos = self._window_starts()[..., None] + entries
        else:
            key_pos = np.broadcast_to(pos + entries - self.window // 2,
                                      (self.dilation,) + pos.shape[1:3] + (self.window,))
        slots = key_pos - np.arange(self.n)[None, :, None, None] * self.tile + self.halo
        ok = (slots >= 0) & (slots < self.keys)
        return np.clip(slots, 0, self.keys - 1), ok

    def halo_index(self) -> np.ndarray:
        """``[n, keys]``: the position of each key slot of each tile along the sub-grid axis
        padded by ``halo`` before it (and ``padded - sub + halo`` after): what
        :meth:`blocks` cuts out."""
        return np.arange(self.n)[:, None] * self.tile + np.arange(self.keys)[None, :]

    def fold(self, x: Array, tile_axis: int, slot_axis: int) -> Array:
        """The transpose of :meth:`blocks`, in tile layout: halos ``[.., n, .., keys, ..]``
        (tile index at ``tile_axis``, key slot at ``slot_axis``) -> ``[.., n, .., tile,
        ..]``, each position the sum of its copies. Slot ``j`` of tile ``m`` is position
        ``j - halo`` of tile ``m``, so the ``halo`` slots before a tile's own go to the
        end of tile ``m - 1`` and those after to the start of tile ``m + 1`` (copies
        outside the axis are dropped): one fused pass of three shifted terms, where the
        transpose of the slicing costs XLA a pass per piece. Needs ``halo <= tile``."""
        t, r = self.tile, self.halo
        if r == 0:
            return x
        if r > t:
            raise ValueError(f"fold needs a halo no wider than the tile; got halo {r}, "
                             f"tile {t} (Geometry.from_key_halos transposes the slicing then)")

        def piece(start: int, stop: int, shift: int, at: tuple[int, int]) -> Array:
            p = jax.lax.slice_in_dim(x, start, stop, axis=slot_axis)
            if shift:  # from tile m - shift: drop the tile that has no neighbour there
                p = jax.lax.slice_in_dim(p, *((0, self.n - 1) if shift > 0 else (1, self.n)),
                                         axis=tile_axis)
            pads = [(0, 0, 0)] * x.ndim
            pads[tile_axis] = (max(shift, 0), max(-shift, 0), 0)
            pads[slot_axis] = (at[0], at[1], 0)
            return jax.lax.pad(p, jnp.zeros((), x.dtype), pads)

        own = jax.lax.slice_in_dim(x, r, r + t, axis=slot_axis)  # (one tile has no halo)
        before = piece(0, r, -1, (t - r, 0))  # end of tile m - 1, from tile m
        after = piece(r + t, t + 2 * r, 1, (0, t - r))  # start of tile m + 1, from tile m
        return own + before + after

    def blocks(self, x: Array, axis: int) -> Array:
        """Overlapping key blocks: splits ``axis`` of length ``sub`` into ``[n, keys]``."""
        t, r, n = self.tile, self.halo, self.n
        x = jnp.pad(x, [(0, 0)] * axis + [(r, self.padded - self.sub + r)] + [(0, 0)] * (
            x.ndim - axis - 1))

        def tiles(start: int) -> Array:
            s = jax.lax.slice_in_dim(x, start, start + self.padded, axis=axis)
            return s.reshape(s.shape[:axis] + (n, t) + s.shape[axis + 1:])

        if r == 0:
            return tiles(0)
        if r > t:  # a halo wider than a tile: whole tiles side by side, then cropped
            pieces = -(-(t + 2 * r) // t)
            x = jnp.pad(x, [(0, 0)] * axis + [(0, pieces * t)] + [(0, 0)] * (x.ndim - axis - 1))
            x = jnp.concatenate([tiles(j * t) for j in range(pieces)], axis=axis + 1)
            return jax.lax.slice_in_dim(x, 0, self.keys, axis=axis + 1)
        head = jax.lax.slice_in_dim(tiles(0), 0, r, axis=axis + 1)
        tail = jax.lax.slice_in_dim(tiles(2 * r), t - r, t, axis=axis + 1)
        return jnp.concatenate([head, tiles(r), tail], axis=axis + 1)


class Geometry:
    """Tilings of both image axes for a window, and the layout changes they imply.

    Images ``[b, H, W, h, c]`` become ``groups = dy * dx`` sub-grid images
    ``[b * groups, Hs, Ws, h, c]`` (:meth:`to_subgrids`; the identity without dilation),
    entry ``i * groups + gy * dx + gx`` holding pixels ``(gy + dy*j, gx + dx*i)`` of image
    ``i``. Blocked layouts of those: queries ``[B, ny, nx, heads, n_q, c]`` with
    ``n_q = tile_y * tile_x``, key halos ``[B, ny, nx, heads, n_k, c]`` with
    ``n_k = keys_y * keys_x``.
    """

    def __init__(
        self, image_size: Sequence[int], window: Sequence[int], tile: int | None = None,
        dilation: Sequence[int] = (1, 1), border: str = "mask",
    ):
        self.height, self.width = (int(s) for s in image_size)
        self.window = tuple(int(w) for w in window)
        self.dilation = tuple(int(d) for d in dilation)
        self.border = border
        if border not in BORDERS:
            raise ValueError(f"border must be one of {BORDERS}; got {border!r}.")
        # Rebuilds this geometry (the default options are left out: the key of a plain
        # window is the one it always was).
        self.key = ((self.height, self.width), self.window, tile)
        if self.dilation != (1, 1) or border != "mask":
            self.key += (self.dilation, border)
        self.ty = AxisTiling(self.height, self.window[0], tile, self.dilation[0], border)
        self.tx = AxisTiling(self.width, self.window[1], tile, self.dilation[1], border)
        self.groups = self.dilation[0] * self.dilation[1]
        self.n_q = self.ty.tile * self.tx.tile
        self.n_k = self.ty.keys * self.tx.keys

    def bias_shape(self, heads: int) -> tuple[int, int, int]:
        """Shape of the relative-position bias: ``[heads, kh, kw]`` with ``'mask'``,
        ``[heads, 2kh-1, 2kw-1]`` with ``'shift'``."""
        kh, kw = self.window
        if self.border == "shift":
            return heads, 2 * kh - 1, 2 * kw - 1
        return heads, kh, kw

    def to_subgrids(self, x: Array) -> Array:
        """``[b, H, W, ...]`` -> ``[b * groups, Hs, Ws, ...]`` (zero-padded to multiples of
        the dilation; the identity without dilation)."""
        if self.groups == 1:
            return x
        (dy, dx), hs, ws = self.dilation, self.ty.sub, self.tx.sub
        b, rest = x.shape[0], x.shape[3:]
        x = jnp.pad(x, ((0, 0), (0, hs * dy - self.height), (0, ws * dx - self.width))
                    + ((0, 0),) * len(rest))
        x = x.reshape((b, hs, dy, ws, dx) + rest)
        x = x.transpose((0, 2, 4, 1, 3) + tuple(range(5, x.ndim)))
        return x.reshape((b * self.groups, hs, ws) + rest)

    def from_subgrids(self, x: Array) -> Array:
        """``[b * groups, Hs, Ws, ...]`` -> ``[b, H, W, ...]`` (the transpose of
        :meth:`to_subgrids`: padded positions are cropped)."""
        if self.groups == 1:
            return x
        (dy, dx), hs, ws = self.dilation, self.ty.sub, self.tx.sub
        rest = x.shape[3:]
        x = x.reshape((-1, dy, dx, hs, ws) + rest)
        x = x.transpose((0, 3, 1, 4, 2) + tuple(range(5, x.ndim)))
        x = x.reshape((-1, hs * dy, ws * dx) + rest)
        return x[:, :self.height, :self.width]

    def query_tiles(self, x: Array) -> Array:
        """``[B, Hs, Ws, h, c]`` -> ``[B, ny, nx, h, n_q, c]`` (zero-padded tiles)."""
        ty, tx = self.ty, self.tx
        b, _, _, h, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, ty.padded - ty.sub), (0, tx.padded - tx.sub),
                        (0, 0), (0, 0)))
        x = x.reshape(b, ty.n, ty.tile, tx.n, tx.tile, h, c).transpose(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, ty.n, tx.n, h, self.n_q, c)

    def from_query_tiles(self, x: Array) -> Array:
        """``[B, ny, nx, h, n_q, c]`` -> ``[B, Hs, Ws, h, c]`` (the transpose of
        :meth:`query_tiles`: padded slots are cropped)."""
        ty, tx = self.ty, self.tx
        b, _, _, h, _, c = x.shape
        x = x.reshape(b, ty.n, tx.n, h, ty.tile, tx.tile, c).transpose(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, ty.padded, tx.padded, h, c)[:, :ty.sub, :tx.sub]

    def key_halos(self, x: Array) -> Array:
        """``[B, Hs, Ws, h, c]`` -> ``[B, ny, nx, h, n_k, c]`` (overlapping halos)."""
        b, h, c = x.shape[0], x.shape[3], x.shape[4]
        x = self.tx.blocks(self.ty.blocks(x, axis=1), axis=3)  # [b, ny, ky, nx, kx, h, c]
        x = x.transpose(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, self.ty.n, self.tx.n, h, self.n_k, c)

    def from_key_halos(self, x: Array) -> Array:
        """``[B, ny, nx, h, n_k, c]`` halos -> ``[B, Hs, Ws, h, c]``, each pixel the sum
        of its copies: the transpose of :meth:`key_halos` (and of
        :meth:`key_halos_gathered`), folded axis by axis (:meth:`AxisTiling.fold`; the
        transpose of the slicing where a halo is wider than its tile)."""
        ty, tx = self.ty, self.tx
        b, _, _, h, _, c = x.shape
        if ty.halo > ty.tile or tx.halo > tx.tile:
            like = jax.ShapeDtypeStruct((b, ty.sub, tx.sub, h, c), x.dtype)
            return jax.linear_transpose(self.key_halos, like)(x)[0]
        x = x.reshape(b, ty.n, tx.n, h, ty.keys, tx.keys, c)
        x = ty.fold(tx.fold(x, tile_axis=2, slot_axis=5), tile_axis=1, slot_axis=4)
        return self.from_query_tiles(x.reshape(b, ty.n, tx.n, h, self.n_q, c))

    def key_halos_gathered(self, x: Array) -> Array:
        """The same as :meth:`key_halos`, bit for bit, as one gather of whole pixels
        (``heads * c`` values each) from the padded image: ~1.6x faster on CPU than the
        slices and concatenations; its autodiff transpose would be a scatter, so the
        backward pass folds the halos back with :meth:`from_key_halos` instead."""
        ty, tx = self.ty, self.tx
        if ty.halo == tx.halo == 0:  # the tiles are the keys: no gather
            return self.key_halos(x)
        b, _, _, h, c = x.shape
        x = jnp.pad(x, ((0, 0), (ty.halo, ty.padded - ty.sub + ty.halo),
                        (tx.halo, tx.padded - tx.sub + tx.halo), (0, 0), (0, 0)))
        iy, ix = ty.halo_index(), tx.halo_index()
        flat = (iy[:, None, :, None] * x.shape[2] + ix[None, :, None, :]).reshape(-1)
        x = x.reshape(b, -1, h, c).at[:, flat.astype(np.int32)].get(mode="promise_in_bounds")
        x = x.reshape(b, ty.n, tx.n, self.n_k, h, c)
        return x.transpose(0, 1, 2, 4, 3, 5)

    def penalty(self, dtype: jnp.dtype) -> np.ndarray:
        """Static (numpy) ``[ny, nx, 1, n_q, n_k]``, or ``[groups, ny, nx, 1, n_q, n_k]``
        with dilation: 0 for keys inside the window and the image, a huge negative logit
        (exp is exactly 0) elsewhere."""
        big = np.finfo(dtype).min / 4  # two axes add up to min / 2: no overflow to -inf
        pen_y = np.where(self.ty.valid(), 0.0, big)  # [dy, ny, tile_y, keys_y]
        pen_x = np.where(self.tx.valid(), 0.0, big)  # [dx, nx, tile_x, keys_x]
        pen = (pen_y[:, None, :, None, :, None, :, None]
               + pen_x[None, :, None, :, None, :, None, :])
        pen = pen.reshape(self.groups, self.ty.n, self.tx.n, 1, self.n_q, self.n_k)
        return (pen[0] if self.groups == 1 else pen).astype(dtype)

    def bias_table(self, bias: Array) -> Array:
        """Relative-position bias (:meth:`bias_shape`) -> per-slot logit bias
        ``[h, n_q, n_k]`` (slots outside the window get a clipped entry; the penalty
        masks them)."""
        iy = self.ty.bias_index()[:, None, :, None]
        ix = self.tx.bias_index()[None, :, None, :]
        return bias[:, iy, ix].reshape(bias.shape[0], self.n_q, self.n_k)

    def window_weights(self, weights: Array) -> Array:
        """Blocked weights ``[B, ny, nx, h, n_q, n_k]`` -> ``[b, H, W, h, kh, kw]`` (entry
        ``[..., oy, ox]``: see :meth:`AxisTiling.window_slots`)."""
        (kh, kw), ty, tx = self.window, self.ty, self.tx
        (dy, dx), h = self.dilation, weights.shape[3]
        w = weights.reshape(-1, dy, dx, ty.n, tx.n, h, ty.tile, tx.tile, ty.keys, tx.keys)
        w = w.transpose(1, 2, 3, 4, 6, 7, 8, 9, 0, 5)  # [dy, dx, ny, nx, ty, tx, ky, kx, b, h]
        sy, ok_y = ty.window_slots()  # [dy, ny, tile_y, kh]
        sx, ok_x = tx.window_slots()  # [dx, nx, tile_x, kw]
        # Index arrays broadcasting to [dy, dx, ny, tile_y, nx, tile_x, kh, kw].
        gy = np.arange(dy)[:, None, None, None, None, None, None, None]
        gx = np.arange(dx)[None, :, None, None, None, None, None, None]
        ny = np.arange(ty.n)[None, None, :, None, None, None, None, None]
        nx = np.arange(tx.n)[None, None, None, None, :, None, None, None]
        iy = np.arange(ty.tile)[None, None, None, :, None, None, None, None]
        ix = np.arange(tx.tile)[None, None, None, None, None, :, None, None]
        sy, ok_y = (a[:, None, :, :, None, None, :, None] for a in (sy, ok_y))
        sx, ok_x = (a[None, :, None, None, :, :, None, :] for a in (sx, ok_x))
        w = w[gy, gx, ny, nx, iy, ix, sy, sx]  # [dy, dx, ny, tile_y, nx, tile_x, kh, kw, b, h]
        w = jnp.where((ok_y & ok_x)[..., None, None], w, 0.0)
        w = w.transpose(8, 0, 1, 2, 3, 4, 5, 9, 6, 7)
        w = w.reshape(-1, ty.padded, tx.padded, h, kh, kw)[:, :ty.sub, :tx.sub]
        return self.from_subgrids(w)

    def logits(self, qt: Array, kt: Array, table: Array | None) -> Array:
        """Blocked logits ``[B, ny, nx, h, n_q, n_k]`` with the penalty and bias added."""
        s = jnp.einsum("byxhqd,byxhkd->byxhqk", qt, kt)
        if self.groups == 1:
            s = s + self.penalty(qt.dtype)
        else:  # the penalty of sub-grid g goes on batch entries i * groups + g
            s = (s.reshape((-1, self.groups) + s.shape[1:]) + self.penalty(qt.dtype)).reshape(
                s.shape)
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
      bias: relative-position bias shaped ``geometry.bias_shape(h)`` (``[h, kh, kw]``,
        or ``[h, 2kh-1, 2kw-1]`` with ``border='shift'``), or None.
      geometry: the tiling.
      return_weights: also return ``[b, H, W, h, kh, kw]`` weights.
    """
    g = geometry
    table = None if bias is None else g.bias_table(bias)
    q, k, v = (g.to_subgrids(x) for x in (q, k, v))
    logits = g.logits(g.query_tiles(q), g.key_halos(k), table)
    # Softmax, normalised after the weighted sum (the same ratio, divided on the
    # [.., q, d] output instead of the larger [.., q, k] weights). Every real query sees
    # at least itself, so its max is a real logit and masked keys get exactly 0; padded
    # query slots (cropped) may see only masked keys and get finite junk.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnorm = jnp.exp(logits - top)
    denom = jnp.sum(unnorm, axis=-1, keepdims=True)
    out = g.from_query_tiles(jnp.einsum("byxhqk,byxhkd->byxhqd", unnorm, g.key_halos(v)) / denom)
    out = g.from_subgrids(out)
    if not return_weights:
        return out
    return out, g.window_weights(unnorm / denom)


def _chunks(x: Array, chunk: int) -> Array:
    """``[b, ...]`` -> ``[b // chunk, chunk, ...]``."""
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _unchunk(x: Array) -> Array:
    return x.reshape((-1,) + x.shape[2:])


def _unit(x: Array, eps: float) -> tuple[Array, Array, Array]:
    """``x`` unit-normalised along the last axis as ``x * rsqrt(max(|x|^2, eps^2))`` (the
    normalisation of :mod:`attnflax.ops.attention`), with what its VJP needs: the factor
    and whether ``|x| > eps``."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    r = jax.lax.rsqrt(jnp.maximum(sq, eps * eps))
    return x * r, r, sq > eps * eps


def _unit_vjp(u: Array, r: Array, big: Array, du: Array) -> Array:
    """Cotangent of ``x`` from that of ``u = x * rsqrt(max(|x|^2, eps^2))``: ``r * (du - u
    (u . du))`` where ``|x| > eps`` (the projection off ``u``), ``r * du`` where not (a
    zero vector has the finite gradient ``du / eps``)."""
    return r * (du - jnp.where(big, u * jnp.sum(u * du, axis=-1, keepdims=True), 0.0))


def _dot_keys(a: Array, b: Array) -> Array:
    """``einsum("...qk,...qd->...kd", a, b)``: the key-side products of the backward pass,
    computed as ``(b^T a)^T`` with the small ``b`` transposed first, so that on CPU the dot
    goes to XLA's YNNPACK path, which does not take a left operand contracted on its major
    axis. (Profiled at batch 32, 32x32, 7x7: these two dots take ~16 ms per step this way
    against ~80 ms in XLA's generic dot; the transposes give part of it back.)"""
    bt = jax.lax.optimization_barrier(jnp.swapaxes(b, -1, -2))
    out_t = jnp.einsum("byxhdq,byxhqk->byxhdk", bt, a)
    return jnp.swapaxes(jax.lax.optimization_barrier(out_t), -1, -2)


@functools.lru_cache(maxsize=256)
def _chunked_kernel(geometry_key: tuple, chunk: int, normalize: bool, eps: float,
                    dtype_name: str):
    """The custom-VJP ``(q, k, v, scale, table) -> out`` on sub-grid images
    ``[B, Hs, Ws, h, c]`` for one geometry and chunk size (a multiple of ``groups``).

    With ``normalize``, ``q`` and ``k`` are the raw queries and keys (any float dtype):
    each chunk is unit-normalised, the queries multiplied by ``scale`` ``[h]``, and the
    backward pass goes back through both, chunk by chunk in cache (instead of whole-batch
    passes outside the kernel), giving the cotangents of the raw inputs and of ``scale``.
    Without, ``q`` and ``k`` are already the scaled unit queries and unit keys and
    ``scale`` gets a zero cotangent. Computes in ``dtype_name``; the output has that dtype,
    the input cotangents the inputs' dtypes."""
    g = Geometry(*geometry_key)
    dtype = jnp.dtype(dtype_name)

    def prepare(q, k, scale):
        """A raw chunk -> scaled unit queries, unit keys, and what the VJP needs."""
        q, k = q.astype(dtype), k.astype(dtype)
        if not normalize:
            return q, k, None
        qn, rq, q_big = _unit(q, eps)
        kn, rk, k_big = _unit(k, eps)
        return qn * scale[:, None], kn, (qn, rq, q_big, kn, rk, k_big)

    def forward_chunk(q, k, v, scale, table):
        qs, kn, _ = prepare(q, k, scale)
        s = g.logits(g.query_tiles(qs), g.key_halos_gathered(kn), table)
        top = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - top)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("byxhqk,byxhkd->byxhqd", p, g.key_halos_gathered(v.astype(dtype)))
        return g.from_query_tiles(o / denom), (top + jnp.log(denom))[..., 0]

    def run_forward(q, k, v, scale, table):
        def body(_, xs):
            return None, forward_chunk(*xs, scale, table)

        _, (out, lse) = jax.lax.scan(body, None, tuple(_chunks(x, chunk) for x in (q, k, v)))
        return _unchunk(out), lse  # lse stays chunked: [b // chunk, chunk, ny, nx, h, n_q]

    def backward(args, out, lse, g_out):
        q, k, v, scale, table = args

        def body(_, xs):
            qc, kc, vc, oc, lc, gc = xs
            v_dtype = vc.dtype
            qs, kn, norm = prepare(qc, kc, scale)
            vc = vc.astype(dtype)
            qt, gt = g.query_tiles(qs), g.query_tiles(gc)
            kt, vt = g.key_halos_gathered(kn), g.key_halos_gathered(vc)
            delta = jnp.sum(gt * g.query_tiles(oc), axis=-1, keepdims=True)
            p = jnp.exp(g.logits(qt, kt, table) - lc[..., None])
            dp = jnp.einsum("byxhqd,byxhkd->byxhqk", gt, vt)
            ds = p * (dp - delta)
            dqs = g.from_query_tiles(jnp.einsum("byxhqk,byxhkd->byxhqd", ds, kt))
            dkn = g.from_key_halos(_dot_keys(ds, qt))
            dv = g.from_key_halos(_dot_keys(p, gt))
            dtable = None if table is None else jnp.sum(ds, axis=(0, 1, 2))  # [h, n_q, n_k]
            if norm is None:
                dq, dk, dscale = dqs, dkn, jnp.zeros_like(scale)
            else:
                qn, rq, q_big, kn, rk, k_big = norm
                dscale = jnp.sum(dqs * qn, axis=(0, 1, 2, 4))  # [h]
                dq = _unit_vjp(qn, rq, q_big, dqs * scale[:, None])
                dk = _unit_vjp(kn, rk, k_big, dkn)
            grads = (dq.astype(qc.dtype), dk.astype(kc.dtype), dv.astype(v_dtype))
            return None, (*grads, dscale, dtable)

        xs = tuple(_chunks(x, chunk) for x in (q, k, v, out)) + (lse, _chunks(g_out, chunk))
        _, (dq, dk, dv, dscale, dtable) = jax.lax.scan(body, None, xs)
        dtable = None if dtable is None else jnp.sum(dtable, axis=0)  # over chunks
        return _unchunk(dq), _unchunk(dk), _unchunk(dv), jnp.sum(dscale, axis=0), dtable

    return recomputing_vjp(run_forward, backward)


def _varying_axes(x: Array) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) along which ``x`` varies; empty
    elsewhere (and on JAX versions without this type information)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def _vary_like(x: Array, like: Array) -> Array:
    """``x`` marked as varying along the manual axes ``like`` varies along (a no-op
    outside ``shard_map``): a replicated parameter (the scale, the bias table) then enters
    the custom VJP with the type of its per-shard cotangent, and JAX's own transpose of
    the cast sums that cotangent over the shards."""
    axes = _varying_axes(like) - _varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def chunked_halo_attention(
    q: Array, k: Array, v: Array, bias: Array | None, geometry: Geometry, chunk: int,
    logit_scale: Array | None = None, eps: float = 1e-6,
) -> Array:
    """The ``'chunked'`` kernel: ``chunk`` images at a time, logits recomputed in the
    backward pass. Same arguments as :func:`halo_attention`; ``chunk`` must divide the
    batch (the caller pads it). With dilation the kernel runs on the sub-grid images,
    ``chunk * groups`` at a time (whole images per chunk).

    With ``logit_scale`` (``[h]``), ``q`` and ``k`` are the raw queries and keys
    ``[b, H, W, h, d]`` in any float dtype: they are unit-normalised as
    ``x * rsqrt(max(|x|^2, eps^2))`` and the queries scaled chunk by chunk inside the
    kernel (in cache, forward and backward), which is how
    :func:`attnflax.ops.attention.local_cosine_attention_2d` calls it. Computes in float32
    (float64 for float64 inputs) and returns that dtype.
    """
    g = geometry
    dtype = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
    table = None if bias is None else g.bias_table(jnp.asarray(bias, dtype))
    normalize = logit_scale is not None
    scale = jnp.ones((q.shape[3],), dtype) if logit_scale is None else jnp.asarray(
        logit_scale, dtype)
    kernel = _chunked_kernel(g.key, chunk * g.groups, normalize, float(eps), dtype.name)
    q, k, v = (g.to_subgrids(jnp.asarray(x)) for x in (q, k, v))
    scale = _vary_like(scale, q)
    table = None if table is None else _vary_like(table, q)
    return g.from_subgrids(kernel(q, k, v, scale, table))
