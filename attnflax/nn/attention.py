"""Flax ``linen`` cosine self-attention layers.

Both layers are thin wrappers around the pure functions in :mod:`attnflax.ops`: they
project the input to queries, keys and values split into heads, call the op with the
learned per-head logit scale (and optional relative-position bias), and project the
heads back. Nothing else happens in between, which the tests check by recomputing the
module's output from its own parameters.

Parameters (the names other code, e.g. a weight-decay mask, relies on)::

    query/kernel  [channels, heads, head_dim]     query/bias  [heads, head_dim]
    key/kernel    [channels, heads, head_dim]     key/bias    [heads, head_dim]
    value/kernel  [channels, heads, head_dim]     value/bias  [heads, head_dim]
    out/kernel    [heads, head_dim, out_features] out/bias    [out_features]
    log_scale     [heads]   log of the cosine logit scale, init log(10), clamped at log(100)
    position_bias relative-position logit bias (zeros init); shape per layer below

Attention maps are recorded with ``self.sow('intermediates', 'attention_weights', w)``;
call ``apply(..., mutable=['intermediates'])`` (or :func:`attnflax.nn.attention_maps`)
to read them. The weights are only built then: an ordinary call runs the layer's
``implementation`` (default None: the op's memory-lean choice), and a call collecting
maps runs the ``'xla'`` kernel, the one that materialises the weights (same outputs to
float rounding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnflax.nn.maps import SOW_NAME
from attnflax.ops import (
    GLOBAL_IMPLEMENTATIONS,
    LOCAL_IMPLEMENTATIONS,
    cosine_attention,
    local_cosine_attention_2d,
)
from attnflax.ops.attention import (
    check_border,
    check_implementation,
    local_bias_shape,
    normalize_dilation,
    normalize_window,
)

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

INIT_LOGIT_SCALE = 10.0
MAX_LOGIT_SCALE = 100.0
default_kernel_init = nn.initializers.lecun_normal()


# --------------------------------------------------------------------------- #
# Shared pieces: configuration checks, projections and the logit scale.        #
# --------------------------------------------------------------------------- #


def resolve_head_dim(
    channels: int, num_heads: int, head_dim: int | None, qkv_features: int | None
) -> int:
    """Returns the per-head feature size, checking that the sizes fit together.

    Args:
      channels: input feature size (last axis of the input).
      num_heads: number of attention heads.
      head_dim: explicit per-head size, or None.
      qkv_features: total query/key/value size over all heads, or None.

    Returns:
      ``head_dim`` if given, else ``qkv_features // num_heads``, else
      ``channels // num_heads``.

    Raises:
      ValueError: if a size is not positive or does not divide into ``num_heads``.
    """
    if num_heads <= 0:
        raise ValueError(f"`num_heads` must be a positive int; got {num_heads}.")
    if head_dim is not None:
        if head_dim <= 0:
            raise ValueError(f"`head_dim` must be a positive int; got {head_dim}.")
        if qkv_features is not None and qkv_features != num_heads * head_dim:
            raise ValueError(
                f"`qkv_features` must equal num_heads * head_dim = {num_heads} * {head_dim}; "
                f"got qkv_features={qkv_features}. Give only one of the two."
            )
        return head_dim
    total, what = (qkv_features, "qkv_features") if qkv_features is not None else (
        channels, "input channels")
    if total <= 0 or total % num_heads:
        raise ValueError(
            f"{what}={total} must be a positive multiple of num_heads={num_heads} so the "
            f"features split evenly into heads; use a num_heads that divides {total}, or "
            "set `head_dim` / `qkv_features`."
        )
    return total // num_heads


def check_rank(where: str, x: Array, ranks: Sequence[int], layout: str) -> None:
    """Raises ``ValueError("{where} expects {layout}; got shape ...")`` unless ``x.ndim``
    is one of ``ranks``."""
    if x.ndim not in ranks:
        raise ValueError(f"{where} expects {layout}; got shape {x.shape}.")


def clamped_logit_scale(log_scale: Array) -> Array:
    """Float32 ``[heads]`` cosine logit scale ``exp(min(log_scale, log(100)))``."""
    log_scale = jnp.minimum(jnp.asarray(log_scale).astype(jnp.float32), math.log(MAX_LOGIT_SCALE))
    return jnp.exp(log_scale)


def check_position_bias_shape(got: Sequence[int], shape: Sequence[int], what: str) -> None:
    """Raises a ValueError if a ``position_bias`` table of shape ``got`` cannot serve an
    input that needs ``shape`` (``what``: the image or window it comes from)."""
    if tuple(got) != tuple(shape):
        raise ValueError(
            f"`position_bias` was created with shape {tuple(got)} but this input needs "
            f"{tuple(shape)} ({what}); the relative-position table is tied to the image "
            "size it was initialised with."
        )


def attend(
    op: Callable[..., Any], *args: Any, implementation: str | None,
    sow: Callable[[Array], Any] | None = None, **kwargs: Any,
) -> Array:
    """Calls the attention ``op`` with ``implementation``; given ``sow`` (the layer asks
    for its maps), runs the ``'xla'`` kernel, the one that builds the weights, and passes
    them to ``sow``. The one rule of both the linen and the NNX layers."""
    if sow is None:
        return op(*args, implementation=implementation, **kwargs)
    out, weights = op(*args, return_weights=True, implementation="xla", **kwargs)
    sow(weights)
    return out


class _ProjectedAttention(nn.Module):
    """Common fields of the attention layers (not used on its own)."""

    num_heads: int
    head_dim: int | None = None
    qkv_features: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    out_kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    implementation: str | None = None

    def _attend(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Array:
        """Calls ``op`` with the layer's implementation; when the ``intermediates``
        collection is mutable, also returns and sows the weights (``'xla'`` kernel)."""
        sow = None
        if self.is_mutable_collection("intermediates"):
            sow = functools.partial(self.sow, "intermediates", SOW_NAME)
        return attend(op, *args, implementation=self.implementation, sow=sow, **kwargs)

    def _dense(self, features: Any, axis: Any, init: Initializer, name: str) -> nn.DenseGeneral:
        return nn.DenseGeneral(
            features=features, axis=axis, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=init, bias_init=self.bias_init, name=name,
        )

    def _project_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """``[..., channels]`` -> three ``[..., heads, head_dim]`` arrays."""
        d = resolve_head_dim(x.shape[-1], self.num_heads, self.head_dim, self.qkv_features)
        return tuple(
            self._dense((self.num_heads, d), -1, self.kernel_init, name)(x)
            for name in ("query", "key", "value")
        )

    def _project_out(self, heads: Array, channels: int) -> Array:
        """``[..., heads, head_dim]`` -> ``[..., out_features]`` (default: input channels)."""
        features = self.out_features or channels
        return self._dense(features, (-2, -1), self.out_kernel_init, "out")(heads)

    def _logit_scale(self) -> Array:
        """Float32 ``[heads]``: ``exp(min(log_scale, log(100)))``."""
        log_scale = self.param(
            "log_scale", nn.initializers.constant(math.log(INIT_LOGIT_SCALE)),
            (self.num_heads,), self.param_dtype,
        )
        return clamped_logit_scale(log_scale)

    def _position_bias(self, shape: tuple[int, ...], what: str) -> Array:
        """The zero-initialised ``position_bias`` parameter, checked against ``shape``."""
        if self.has_variable("params", "position_bias"):
            check_position_bias_shape(
                self.get_variable("params", "position_bias").shape, shape, what)
        return self.param("position_bias", nn.initializers.zeros_init(), shape, self.param_dtype)


def relative_position_index(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into a ``[2H-1, 2W-1]`` relative-position table for every pixel pair.

    Returns:
      ``(iy, ix)``, each int ``[H*W, H*W]``; entry ``[i, j]`` is
      ``(y_j - y_i + H - 1, x_j - x_i + W - 1)`` for row-major pixels ``i`` (query)
      and ``j`` (key).
    """
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return ys[None, :] - ys[:, None] + height - 1, xs[None, :] - xs[:, None] + width - 1


def image_tokens(
    x: Array, image_shape: Sequence[int] | None
) -> tuple[Array, tuple[int, int] | None]:
    """The input of :class:`CosineSelfAttention` as tokens, and its image shape.

    Args:
      x: ``[batch, length, channels]`` or ``[batch, height, width, channels]``.
      image_shape: ``(H, W)`` given with the input, or None.

    Returns:
      ``(tokens [batch, length, channels], (H, W) or None)``; a 4-D ``x`` gives its own.

    Raises:
      ValueError: on a wrong rank, or an ``image_shape`` that disagrees with a 4-D ``x``.
    """
    check_rank("CosineSelfAttention", x, (3, 4),
               "[batch, length, channels] or [batch, height, width, channels]")
    if x.ndim == 4:
        if image_shape is not None and tuple(image_shape) != x.shape[1:3]:
            raise ValueError(
                f"`image_shape`={tuple(image_shape)} disagrees with the input {x.shape}."
            )
        image_shape = x.shape[1:3]
    if image_shape is not None:
        image_shape = tuple(int(s) for s in image_shape)
    return x.reshape(x.shape[0], -1, x.shape[-1]), image_shape


def relative_bias_shape(
    num_heads: int, image_shape: Sequence[int] | None, length: int
) -> tuple[tuple[int, int, int], str]:
    """Shape ``[heads, 2H-1, 2W-1]`` of the global ``position_bias`` table for ``length``
    tokens of an ``(H, W)`` image, and a description of the image.

    Raises:
      ValueError: without an image shape, or one with ``H*W != length``.
    """
    if image_shape is None or math.prod(image_shape) != length:
        raise ValueError(
            "relative_position_bias=True needs an image: pass 4-D input or "
            f"`image_shape`=(H, W) with H*W == length={length}; got {image_shape}."
        )
    height, width = (int(s) for s in image_shape)
    return (num_heads, 2 * height - 1, 2 * width - 1), f"image {height}x{width}"


def relative_position_bias(table: Array) -> Array:
    """``[heads, 2H-1, 2W-1]`` relative-position table -> logit bias ``[1, heads, L, L]``
    (``L = H*W``, row-major pixels), entry ``[0, h, i, j] = table[h, y_j - y_i + H - 1,
    x_j - x_i + W - 1]``."""
    iy, ix = relative_position_index((table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2)
    return table[:, iy, ix][None]


# --------------------------------------------------------------------------- #
# Global attention.                                                           #
# --------------------------------------------------------------------------- #


class CosineSelfAttention(_ProjectedAttention):
    """Multi-head cosine self-attention over a whole sequence or image.

    ``w = softmax_j(s_h cos(q_i, k_j) + bias_h(j - i))`` with ``s_h = exp(min(log_scale_h,
    log 100))``; see :func:`attnflax.cosine_attention`. A 4-D image input is flattened
    row-major to ``H*W`` tokens and reshaped back.

    Attributes:
      num_heads: number of heads.
      head_dim: per-head query/key/value size. Default: ``qkv_features // num_heads``,
        or ``channels // num_heads`` when neither is given.
      qkv_features: total query/key/value size (alternative to ``head_dim``).
      out_features: output size; default the input's channels.
      relative_position_bias: learn a relative-position logit bias ``position_bias``
        ``[heads, 2H-1, 2W-1]`` (zeros init), indexed by the offset ``(dy, dx)`` of key
        from query. Needs an image: a 4-D input, or ``image_shape`` for 3-D tokens. The
        table is tied to the image size it was initialised with.
      use_bias: biases in the projections.
      dtype: computation dtype of the projections (the op's logits and softmax are
        always float32). None: inferred from inputs and params.
      param_dtype: parameter dtype.
      kernel_init: initialiser of the q/k/v kernels.
      out_kernel_init: initialiser of the output kernel (zeros: the layer outputs 0).
      bias_init: initialiser of the projection biases.
      implementation: kernel of :func:`attnflax.cosine_attention` (``None``, ``'xla'``,
        ``'chunked'``, ``'cudnn'``); None picks for the backend and shape.

    Sown: ``intermediates/attention_weights``, float32 ``[batch, heads, q_len, kv_len]``
    (``q_len = kv_len = H*W`` for an image), non-negative, summing to 1 over ``kv_len``
    (0 over a fully masked row).
    """

    relative_position_bias: bool = False

    def __post_init__(self) -> None:
        check_implementation(type(self).__name__, self.implementation, GLOBAL_IMPLEMENTATIONS)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        image_shape: Sequence[int] | None = None,
    ) -> Array:
        """Attends every token (pixel) to all others.

        Args:
          x: ``[batch, length, channels]`` tokens or ``[batch, height, width, channels]``.
          mask: optional boolean, broadcastable to ``[batch, heads, q_len, kv_len]``;
            True = may attend.
          image_shape: ``(H, W)`` with ``H*W == length`` for 3-D input, for the
            relative-position bias; inferred from a 4-D input.

        Returns:
          ``[batch, length, out_features]`` or ``[batch, height, width, out_features]``.

        Raises:
          ValueError: on a wrong rank, channels not divisible into heads, a bias table
            of another image size, or a relative-position bias without an image shape.
        """
        tokens, image_shape = image_tokens(x, image_shape)
        batch, length, channels = tokens.shape
        q, k, v = self._project_qkv(tokens)
        bias = None
        if self.relative_position_bias:
            shape, what = relative_bias_shape(self.num_heads, image_shape, length)
            bias = relative_position_bias(self._position_bias(shape, what))
        out = self._attend(cosine_attention, q, k, v, logit_scale=self._logit_scale(),
                           bias=bias, mask=mask)
        chex.assert_shape(out, (batch, length, self.num_heads, None))
        y = self._project_out(out, channels)
        return y.reshape(x.shape[:-1] + y.shape[-1:])


# --------------------------------------------------------------------------- #
# Local attention.                                                            #
# --------------------------------------------------------------------------- #


def local_options(window: int | Sequence[int], dilation: int | Sequence[int], border: str
                  ) -> tuple[tuple[int, int], tuple[int, int], str]:
    """The local layers' ``(window, dilation, border)``, checked and normalised; the one
    construction-time check of every local layer and block (linen and NNX).

    Raises:
      ValueError: on an even or non-positive window, a non-positive dilation or an unknown
        border.
    """
    return normalize_window(window), normalize_dilation(dilation), check_border(border)


class LocalCosineSelfAttention2D(_ProjectedAttention):
    """Multi-head cosine self-attention of every pixel over its ``kh x kw`` window.

    ``w = softmax_o(s_h cos(q_p, k_{p+o}) + position_bias[h, o])`` over the offsets ``o``
    of the window that lie inside the image (outside ones get exactly zero weight);
    see :func:`attnflax.local_cosine_attention_2d`. Works on any image size; the
    parameters do not depend on it. NATTEN's options: ``dilation`` (DiNAT: the
    neighbours are every ``d``-th pixel) and ``border='shift'`` (the window shifted
    inside the image, so every pixel attends to ``kh * kw`` pixels; needs images of at
    least ``kh*dy x kw*dx``).

    Attributes:
      num_heads: number of heads.
      window: odd window size ``(kh, kw)`` or one int for a square window.
      use_position_bias: learn ``position_bias`` (zeros init): ``[heads, kh, kw]`` by
        window offset with ``border='mask'``; ``[heads, 2kh-1, 2kw-1]`` by key minus query
        position (NATTEN's ``rpb``) with ``border='shift'``.
      dilation: ``(dy, dx)`` or one int, positive (default 1: adjacent pixels).
      border: ``'mask'`` (default: out-of-image neighbours get zero weight) or
        ``'shift'`` (NATTEN's neighbourhood attention).
      implementation: kernel of :func:`attnflax.local_cosine_attention_2d` (``None``,
        ``'xla'``, ``'chunked'``, ``'pallas'``, ``'pallas_interpret'``); None picks the
        memory-lean ``'chunked'``.
      head_dim, qkv_features, out_features, use_bias, dtype, param_dtype,
      kernel_init, out_kernel_init, bias_init: as in :class:`CosineSelfAttention`.

    Sown: ``intermediates/attention_weights``, float32
    ``[batch, height, width, heads, kh, kw]``, summing to 1 over the last two axes:
    with ``border='mask'`` entry ``[..., oy + kh//2, ox + kw//2]`` for the neighbour at
    offset ``(oy, ox)`` (zero outside the image), with ``'shift'`` entry ``[..., ty, tx]``
    for the ``t``-th pixel of the shifted window.
    """

    window: int | Sequence[int] = (3, 3)
    use_position_bias: bool = True
    dilation: int | Sequence[int] = 1
    border: str = "mask"

    def __post_init__(self) -> None:
        local_options(self.window, self.dilation, self.border)  # fail at construction
        check_implementation(type(self).__name__, self.implementation, LOCAL_IMPLEMENTATIONS)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Attends every pixel to its neighbourhood.

        Args:
          x: ``[batch, height, width, channels]``.

        Returns:
          ``[batch, height, width, out_features]``.

        Raises:
          ValueError: on a wrong rank, channels not divisible into heads, or (with
            ``border='shift'``) an image smaller than ``kh*dy x kw*dx``.
        """
        check_rank("LocalCosineSelfAttention2D", x, (4,),
                   "images [batch, height, width, channels]")
        kh, kw = normalize_window(self.window)
        dilation = normalize_dilation(self.dilation)
        batch, height, width, channels = x.shape
        q, k, v = self._project_qkv(x)
        bias = None
        if self.use_position_bias:
            shape = local_bias_shape(self.num_heads, (kh, kw), self.border)
            bias = self._position_bias(shape, f"window {kh}x{kw}, border={self.border!r}")
        out = self._attend(local_cosine_attention_2d, q, k, v, window=(kh, kw),
                           logit_scale=self._logit_scale(), bias=bias, dilation=dilation,
                           border=self.border)
        chex.assert_shape(out, (batch, height, width, self.num_heads, None))
        return self._project_out(out, channels)
