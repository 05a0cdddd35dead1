"""Flax NNX cosine self-attention layers: the :mod:`attnflax.nn` layers as ``nnx.Module``.

- :class:`CosineSelfAttention`: global multi-head cosine attention over tokens or an image.
- :class:`LocalCosineSelfAttention2D`: the same over each pixel's ``kh x kw`` window.
- :class:`ResidualAttentionBlock`: pre-norm residual attention (+ optional MLP) that
  starts as the identity, for use after any conv stage.
- :func:`from_linen_params` / :func:`to_linen_params`: move parameters between a
  linen layer's ``params`` and the NNX layer.

They run the same pure functions (:func:`attnflax.cosine_attention`,
:func:`attnflax.local_cosine_attention_2d`) with the same shared checks, logit scale and
position-bias lookup as the linen layers, and hold the same parameters under the same
names, nesting and shapes (see :mod:`attnflax.nn.attention`): ``query``, ``key``,
``value``, ``out`` (each ``kernel`` / ``bias``), ``log_scale`` and ``position_bias``;
the block adds ``norm``, ``attention`` and, with an MLP, ``mlp_norm``, ``mlp_in`` and
``mlp_out``. So ``nnx.state(layer, nnx.Param)`` is the linen ``params`` tree, and a
linen layer and an NNX layer given the same parameters compute the same outputs.

What differs is what NNX asks for, parameters made at construction:

- ``in_features`` (the input channels) is the first argument, as in ``nnx.Linear``.
- The global layer's relative-position table ``[heads, 2H-1, 2W-1]`` needs the image
  size at construction: ``image_shape=(H, W)``. The linen block decides by the input's
  rank (a 3-D token input gets no table); the NNX block with ``attention='global'``
  takes ``image_shape``, or ``position_bias=False`` for inputs without an image.
- Randomness comes from an explicit ``rngs: nnx.Rngs`` (the ``params`` stream).

Attention maps: run the model under ``nnx.capture(model, nnx.Intermediate)``; each
attention layer then computes its weights with the ``'xla'`` kernel (the one that builds
them; same outputs to float rounding) and sows them as
``nnx.Intermediate`` ``attention_weights``, a one-tuple per call, at the layer's path
(e.g. ``['block']['attention']['attention_weights'][0]``)::

    y, maps = nnx.capture(model, nnx.Intermediate)(x)

Outside a capture the layers run their ``implementation`` (default None: the op's
memory-lean choice) and build no weights, like the linen layers when the
``intermediates`` collection is not mutable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Required, TypedDict, TypeVar, Unpack

import flax
import jax.numpy as jnp
from flax import nnx, traverse_util

from attnflax.nn.attention import (
    INIT_LOGIT_SCALE,
    Array,
    Dtype,
    Initializer,
    attend,
    check_position_bias_shape,
    check_rank,
    clamped_logit_scale,
    default_kernel_init,
    image_tokens,
    local_options,
    relative_bias_shape,
    relative_position_bias,
    resolve_head_dim,
)
from attnflax.nn.blocks import (
    check_block_config,
    check_block_input,
    check_norm_groups,
    mlp_hidden_size,
)
from attnflax.nn.maps import SOW_NAME
from attnflax.ops import attention as ops
from attnflax.pytree import path_name

M = TypeVar("M", bound=nnx.Module)
_zeros_init = nnx.initializers.zeros_init()

__all__ = [
    "CosineSelfAttention",
    "LocalCosineSelfAttention2D",
    "ResidualAttentionBlock",
    "from_linen_params",
    "to_linen_params",
]


def _check_channels(where: str, x: Array, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(
            f"{where} was built for in_features={in_features} input channels; got an input "
            f"of shape {x.shape}."
        )


class Projection(TypedDict, total=False):
    """The projection arguments both attention layers take (as keywords; see
    :class:`attnflax.nn.CosineSelfAttention` for their meaning)."""

    rngs: Required[nnx.Rngs]
    head_dim: int | None
    qkv_features: int | None
    out_features: int | None
    use_bias: bool
    dtype: Dtype | None
    param_dtype: Dtype
    kernel_init: Initializer
    out_kernel_init: Initializer
    bias_init: Initializer
    implementation: str | None


class _ProjectedAttention(nnx.Module):
    """The attention layers' shared part (a base class, not used alone): the query, key,
    value and output projections, the per-head logit scale and the maps rule."""

    def __init__(
        self, in_features: int, num_heads: int, *, rngs: nnx.Rngs, head_dim: int | None = None,
        qkv_features: int | None = None, out_features: int | None = None, use_bias: bool = True,
        dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        out_kernel_init: Initializer = default_kernel_init, bias_init: Initializer = _zeros_init,
        implementation: str | None = None,
    ) -> None:
        head_dim = resolve_head_dim(in_features, num_heads, head_dim, qkv_features)
        self.in_features, self.num_heads, self.head_dim = in_features, num_heads, head_dim
        self.out_features = out_features or in_features
        self.dtype, self.param_dtype = dtype, param_dtype
        self.implementation = implementation
        dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                     bias_init=bias_init, rngs=rngs)
        self.query = nnx.LinearGeneral(
            in_features, (num_heads, head_dim), kernel_init=kernel_init, **dense)
        self.key = nnx.LinearGeneral(
            in_features, (num_heads, head_dim), kernel_init=kernel_init, **dense)
        self.value = nnx.LinearGeneral(
            in_features, (num_heads, head_dim), kernel_init=kernel_init, **dense)
        self.out = nnx.LinearGeneral(
            (num_heads, head_dim), self.out_features, axis=(-2, -1),
            kernel_init=out_kernel_init, **dense)
        self.log_scale = nnx.Param(
            jnp.full((num_heads,), math.log(INIT_LOGIT_SCALE), param_dtype))

    def _attend(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Array:
        """Calls ``op`` with the layer's logit scale and implementation; under
        ``nnx.capture(..., nnx.Intermediate)`` also sows the weights (``'xla'`` kernel)."""
        sow = None
        # nnx.capture gives every module a `__captures__` tuple of the collections it
        # records, the test `Module.sow` itself makes (tests/test_nnx.py pins this).
        if any(type(c) is nnx.Intermediate for c in getattr(self, "__captures__", ())):
            sow = functools.partial(self.sow, nnx.Intermediate, SOW_NAME)
        return attend(op, *args, logit_scale=clamped_logit_scale(self.log_scale[...]),
                      implementation=self.implementation, sow=sow, **kwargs)


class CosineSelfAttention(_ProjectedAttention):
    """Multi-head cosine self-attention over a whole sequence or image (NNX).

    The NNX twin of :class:`attnflax.nn.CosineSelfAttention`, with the same parameters
    and the same call; see there for the maths.

    Args:
      in_features: input channels (``out_features`` defaults to them).
      image_shape: ``(H, W)`` of the images, needed with ``relative_position_bias`` (the
        table is made at construction); also the image of a 3-D token input called
        without ``image_shape``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      num_heads, head_dim, qkv_features, out_features, relative_position_bias, use_bias,
      dtype, param_dtype, kernel_init, out_kernel_init, bias_init, implementation: the
        attributes of :class:`attnflax.nn.CosineSelfAttention`.

    Sown under ``nnx.capture(..., nnx.Intermediate)``: ``attention_weights``, float32
    ``[batch, heads, q_len, kv_len]``.

    Raises:
      ValueError: on an unknown ``implementation``, sizes that do not split into heads,
        or ``relative_position_bias`` without ``image_shape``.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        relative_position_bias: bool = False,
        image_shape: Sequence[int] | None = None,
        **projection: Unpack[Projection],
    ) -> None:
        ops.check_implementation(type(self).__name__, projection.get("implementation"),
                                 ops.GLOBAL_IMPLEMENTATIONS)
        if relative_position_bias and image_shape is None:
            raise ValueError(
                "CosineSelfAttention(relative_position_bias=True) needs `image_shape`=(H, W) "
                "at construction: its position_bias table [heads, 2H-1, 2W-1] is tied to "
                "the image size."
            )
        super().__init__(in_features, num_heads, **projection)
        self.relative_position_bias = relative_position_bias
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
        self.position_bias = None if not relative_position_bias else nnx.Param(jnp.zeros(
            relative_bias_shape(num_heads, image_shape, math.prod(image_shape))[0],
            self.param_dtype))

    def __call__(
        self, x: Array, mask: Array | None = None, image_shape: Sequence[int] | None = None
    ) -> Array:
        """Attends every token (pixel) to all others.

        Args:
          x: ``[batch, length, in_features]`` tokens or ``[batch, H, W, in_features]``.
          mask: optional boolean, broadcastable to ``[batch, heads, q_len, kv_len]``;
            True = may attend.
          image_shape: ``(H, W)`` with ``H*W == length`` for 3-D input; default the
            layer's ``image_shape``; inferred from a 4-D input.

        Returns:
          ``[batch, length, out_features]`` or ``[batch, H, W, out_features]``.

        Raises:
          ValueError: on a wrong rank or channel count, or an image other than the one
            the relative-position table was made for.
        """
        tokens, image_shape = image_tokens(x, image_shape)
        _check_channels(type(self).__name__, x, self.in_features)
        bias = None
        if self.position_bias is not None:
            shape, what = relative_bias_shape(
                self.num_heads, image_shape or self.image_shape, tokens.shape[1])
            check_position_bias_shape(self.position_bias.shape, shape, what)
            bias = relative_position_bias(self.position_bias[...])
        q, k, v = self.query(tokens), self.key(tokens), self.value(tokens)
        y = self.out(self._attend(ops.cosine_attention, q, k, v, bias=bias, mask=mask))
        return y.reshape(x.shape[:-1] + y.shape[-1:])


class LocalCosineSelfAttention2D(_ProjectedAttention):
    """Multi-head cosine self-attention of every pixel over its ``kh x kw`` window (NNX).

    The NNX twin of :class:`attnflax.nn.LocalCosineSelfAttention2D`, with the same
    parameters; works on any image size (with ``border='shift'``: at least
    ``kh*dy x kw*dx``).

    Args:
      in_features: input channels (``out_features`` defaults to them).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      num_heads, window, use_position_bias, dilation, border, implementation, head_dim,
      qkv_features, out_features, use_bias, dtype, param_dtype, kernel_init,
      out_kernel_init, bias_init: the attributes of
        :class:`attnflax.nn.LocalCosineSelfAttention2D`.

    Sown under ``nnx.capture(..., nnx.Intermediate)``: ``attention_weights``, float32
    ``[batch, height, width, heads, kh, kw]``, laid out as in the linen layer.

    Raises:
      ValueError: on a bad window, dilation or border, an unknown ``implementation`` or
        sizes that do not split into heads.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        window: int | Sequence[int] = (3, 3),
        use_position_bias: bool = True,
        dilation: int | Sequence[int] = 1,
        border: str = "mask",
        **projection: Unpack[Projection],
    ) -> None:
        self.window, self.dilation, self.border = local_options(window, dilation, border)
        ops.check_implementation(type(self).__name__, projection.get("implementation"),
                                 ops.LOCAL_IMPLEMENTATIONS)
        super().__init__(in_features, num_heads, **projection)
        self.use_position_bias = use_position_bias
        self.position_bias = None if not use_position_bias else nnx.Param(
            jnp.zeros(ops.local_bias_shape(num_heads, self.window, border), self.param_dtype))

    def __call__(self, x: Array) -> Array:
        """`attnflax.nn.LocalCosineSelfAttention2D`'s call (same errors, plus a channel
        count other than ``in_features``): ``[batch, height, width, in_features]`` ->
        ``[batch, height, width, out_features]``."""
        check_rank(type(self).__name__, x, (4,), "images [batch, height, width, channels]")
        _check_channels(type(self).__name__, x, self.in_features)
        bias = None if self.position_bias is None else self.position_bias[...]
        q, k, v = self.query(x), self.key(x), self.value(x)
        return self.out(self._attend(ops.local_cosine_attention_2d, q, k, v, window=self.window,
                                     bias=bias, dilation=self.dilation, border=self.border))


def _norm_layer(
    kind: str, groups: int, features: int, dtype: Dtype | None, param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Module:
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kind == "layer":
        return nnx.LayerNorm(features, **kw)
    check_norm_groups(groups, features)
    return nnx.GroupNorm(features, num_groups=groups, **kw)


class ResidualAttentionBlock(nnx.Module):
    """Pre-norm residual attention (and optional MLP) on a feature map; starts as identity.

    The NNX twin of :class:`attnflax.nn.ResidualAttentionBlock` (same parameters):
    ``y = x + Attn(Norm(x))``; with ``mlp_ratio > 0`` also
    ``y = y + Dense(gelu(Dense(Norm(y))))``, the attention's output projection and the
    MLP's last layer zero-initialised.

    Args:
      in_features: input channels.
      image_shape: ``(H, W)`` of the images, for global attention with ``position_bias``
        (its table is made at construction).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      num_heads, attention, window, dilation, border, head_dim, position_bias, norm,
      norm_groups, mlp_ratio, dtype, param_dtype, implementation: the attributes of
        :class:`attnflax.nn.ResidualAttentionBlock` (channels are ``in_features``).

    The configuration strings are kept as ``attention_kind`` and ``norm_kind``:
    ``attention`` and ``norm`` are the sub-layers, named as in the linen block.

    Sown under ``nnx.capture(..., nnx.Intermediate)``: ``attention/attention_weights``.

    Raises:
      ValueError: on an unknown ``attention`` or ``norm``, a bad window, dilation or
        border, a negative ``mlp_ratio``, groups or heads that do not divide the
        channels, or global attention with ``position_bias`` and no ``image_shape``.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int = 4,
        *,
        attention: Literal["local", "global"] = "local",
        window: int | Sequence[int] = (3, 3),
        dilation: int | Sequence[int] = 1,
        border: str = "mask",
        head_dim: int | None = None,
        position_bias: bool = True,
        image_shape: Sequence[int] | None = None,
        norm: Literal["layer", "group"] = "layer",
        norm_groups: int = 8,
        mlp_ratio: float = 0.0,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        check_block_config(attention, norm, window, mlp_ratio, dilation, border)
        if attention == "global" and position_bias and image_shape is None:
            raise ValueError(
                "ResidualAttentionBlock(attention='global', position_bias=True) needs "
                "`image_shape`=(H, W) at construction for its relative-position table; "
                "pass position_bias=False for inputs without one (3-D tokens)."
            )
        self.in_features, self.attention_kind, self.norm_kind = in_features, attention, norm
        self.mlp_ratio = mlp_ratio
        common = dict(head_dim=head_dim, dtype=dtype, param_dtype=param_dtype,
                      out_kernel_init=_zeros_init,
                      implementation=implementation, rngs=rngs)
        self.norm = _norm_layer(norm, norm_groups, in_features, dtype, param_dtype, rngs)
        if attention == "local":
            self.attention = LocalCosineSelfAttention2D(
                in_features, num_heads, window=window, use_position_bias=position_bias,
                dilation=dilation, border=border, **common)
        else:
            self.attention = CosineSelfAttention(
                in_features, num_heads, relative_position_bias=position_bias,
                image_shape=image_shape, **common)
        mlp = mlp_ratio > 0  # the three MLP layers, or None each
        hidden = mlp_hidden_size(mlp_ratio, in_features) if mlp else 0
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = _norm_layer(
            norm, norm_groups, in_features, dtype, param_dtype, rngs) if mlp else None
        self.mlp_in = nnx.Linear(in_features, hidden, **dense) if mlp else None
        self.mlp_out = nnx.Linear(
            hidden, in_features, kernel_init=_zeros_init, **dense
        ) if mlp else None

    def __call__(self, x: Array) -> Array:
        """`attnflax.nn.ResidualAttentionBlock`'s call (same errors, plus a channel count
        other than ``in_features``): ``x + attention(norm(x))`` (+ the MLP), same shape."""
        check_block_input(self.attention_kind, x)
        _check_channels(type(self).__name__, x, self.in_features)
        y = x + self.attention(self.norm(x))
        if self.mlp_in is not None:
            y = y + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(y))))
        return y


# --------------------------------------------------------------------------- #
# Parameters to and from linen.                                               #
# --------------------------------------------------------------------------- #


def to_linen_params(module: nnx.Module) -> dict[str, Any]:
    """The module's ``nnx.Param`` values as a nested dict: the linen ``params`` of the
    twin linen layer (``variables['params']``), e.g. ``{'query': {'kernel': ...}, ...}``."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def from_linen_params(module: M, params: Mapping[str, Any]) -> M:
    """Loads a linen ``params`` tree into ``module`` in place, and returns the module.

    Args:
      module: an NNX module whose parameters are named and nested like the linen module
        that made ``params`` (the layers here; or a model of them whose attribute names
        are the linen module names).
      params: the linen ``params`` collection (``variables['params']``; dict or
        ``FrozenDict``). Values are cast to the module's parameter dtypes.

    Returns:
      ``module``, holding the values of ``params``.

    Raises:
      ValueError: if a parameter is missing or unexpected, or has another shape (the
        message names the paths).
    """
    state = nnx.state(module, nnx.Param)
    want = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    got = traverse_util.flatten_dict(flax.core.unfreeze(params))
    missing, unexpected = want.keys() - got.keys(), got.keys() - want.keys()
    if missing or unexpected:
        raise ValueError(
            f"linen params do not fit {type(module).__name__}: missing "
            f"{sorted(map(path_name, missing))}, unexpected {sorted(map(path_name, unexpected))}; "
            "construct it with the linen module's configuration."
        )
    for key, value in got.items():
        if tuple(jnp.shape(value)) != tuple(want[key].shape):
            raise ValueError(
                f"linen param {path_name(key)!r} has shape {tuple(jnp.shape(value))} but "
                f"{type(module).__name__} holds {tuple(want[key].shape)} there; construct "
                "it with the linen module's configuration."
            )
    values = {k: jnp.asarray(v, want[k].dtype) for k, v in got.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    nnx.update(module, state)
    return module
