"""Blocks built from the attention layers: a residual attention block and an attention conv.

``ResidualAttentionBlock`` adds attention to a CNN's residual stream after any conv
stage and starts as the identity. ``AttentionConv2D`` replaces a ``k x k`` convolution
by local cosine self-attention (stand-alone self-attention, Ramachandran et al. 2019).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnflax.nn.attention import (
    CosineSelfAttention,
    LocalCosineSelfAttention2D,
    check_rank,
    local_options,
)

Array = jax.Array
Dtype = Any

ATTENTION_KINDS = ("local", "global")
NORM_KINDS = ("layer", "group")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raises a ValueError naming ``name``, ``value`` and the ``allowed`` choices."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}; got {value!r}.")


def check_block_config(
    attention: str, norm: str, window: int | Sequence[int], mlp_ratio: float,
    dilation: int | Sequence[int] = 1, border: str = "mask",
) -> None:
    """The construction-time checks of :class:`ResidualAttentionBlock` (linen and NNX)."""
    check_choice("attention", attention, ATTENTION_KINDS)
    check_choice("norm", norm, NORM_KINDS)
    if attention == "local":
        local_options(window, dilation, border)
    if mlp_ratio < 0:
        raise ValueError(f"`mlp_ratio` must be >= 0 (0 = no MLP); got {mlp_ratio}.")


def check_block_input(attention: str, x: Array) -> None:
    """Raises a ValueError unless ``x`` has a rank the block's ``attention`` takes."""
    layout = "[batch, height, width, channels]" + (
        "" if attention == "local" else " or [batch, length, channels]")
    check_rank(f"ResidualAttentionBlock(attention={attention!r})", x,
               (4,) if attention == "local" else (3, 4), layout)


def check_norm_groups(norm_groups: int, channels: int) -> None:
    """Raises a ValueError unless ``norm_groups`` divides ``channels`` (``norm='group'``)."""
    if channels % norm_groups:
        raise ValueError(
            f"norm='group' needs norm_groups={norm_groups} to divide the channels; "
            f"got {channels} channels."
        )


def mlp_hidden_size(mlp_ratio: float, channels: int) -> int:
    """Hidden size of the block's MLP: ``round(mlp_ratio * channels)``, at least 1."""
    return max(1, int(round(mlp_ratio * channels)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm residual attention (and optional MLP) on a feature map; starts as identity.

    ``y = x + Attn(Norm(x))``; with ``mlp_ratio > 0`` also
    ``y = y + Dense(gelu(Dense(Norm(y))))``. The attention's output projection and the
    MLP's last layer are zero-initialised, so a freshly initialised block returns its
    input exactly, and a stack of them can be inserted after any conv stage without
    disturbing what the network computes at the start of training.

    Attributes:
      num_heads: attention heads; must divide the input channels (or give ``head_dim``).
      attention: ``'local'`` (:class:`LocalCosineSelfAttention2D` over ``window``) or
        ``'global'`` (:class:`CosineSelfAttention` over all pixels).
      window: odd local window ``(kh, kw)`` or int (ignored for global attention).
      dilation: local attention's dilation ``(dy, dx)`` or int (DiNAT; default 1).
      border: local attention's border, ``'mask'`` (default) or ``'shift'`` (NATTEN's
        shifted window; see :class:`LocalCosineSelfAttention2D`).
      head_dim: per-head size; default ``channels // num_heads``.
      position_bias: learn a relative-position bias (local: ``[heads, kh, kw]``, or
        ``[heads, 2kh-1, 2kw-1]`` with ``border='shift'``; global:
        ``[heads, 2H-1, 2W-1]``, tied to the initial image size).
      norm: ``'layer'`` (LayerNorm over channels) or ``'group'`` (GroupNorm).
      norm_groups: groups for ``norm='group'``; must divide the channels.
      mlp_ratio: hidden size of the MLP as a multiple of the channels; 0 = no MLP.
      dtype: computation dtype (None: inferred).
      param_dtype: parameter dtype.
      implementation: kernel of the attention op (see the attention layers); None picks.

    Sown: ``intermediates`` → ``attention/attention_weights`` (see the attention layer).
    """

    num_heads: int = 4
    attention: Literal["local", "global"] = "local"
    window: int | Sequence[int] = (3, 3)
    dilation: int | Sequence[int] = 1
    border: str = "mask"
    head_dim: int | None = None
    position_bias: bool = True
    norm: Literal["layer", "group"] = "layer"
    norm_groups: int = 8
    mlp_ratio: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    def __post_init__(self) -> None:
        check_block_config(self.attention, self.norm, self.window, self.mlp_ratio,
                           self.dilation, self.border)
        super().__post_init__()

    def _norm(self, channels: int, name: str) -> nn.Module:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.norm == "layer":
            return nn.LayerNorm(**kw)
        check_norm_groups(self.norm_groups, channels)
        return nn.GroupNorm(num_groups=self.norm_groups, **kw)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the block.

        Args:
          x: ``[batch, height, width, channels]`` (global attention also takes
            ``[batch, length, channels]``).

        Returns:
          Same shape as ``x``.

        Raises:
          ValueError: on a wrong rank or channels not divisible into heads or groups.
        """
        check_block_input(self.attention, x)
        channels = x.shape[-1]
        common = dict(
            num_heads=self.num_heads, head_dim=self.head_dim, dtype=self.dtype,
            param_dtype=self.param_dtype, out_kernel_init=nn.initializers.zeros_init(),
            implementation=self.implementation, name="attention",
        )
        if self.attention == "local":
            attn = LocalCosineSelfAttention2D(
                window=self.window, use_position_bias=self.position_bias,
                dilation=self.dilation, border=self.border, **common)
        else:
            attn = CosineSelfAttention(
                relative_position_bias=self.position_bias and x.ndim == 4, **common)
        y = x + attn(self._norm(channels, "norm")(x))
        if self.mlp_ratio > 0:
            hidden = mlp_hidden_size(self.mlp_ratio, channels)
            dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
            h = self._norm(channels, "mlp_norm")(y)
            h = nn.gelu(nn.Dense(hidden, name="mlp_in", **dense)(h))
            h = nn.Dense(channels, kernel_init=nn.initializers.zeros_init(), name="mlp_out",
                         **dense)(h)
            y = y + h
        return y


class AttentionConv2D(nn.Module):
    """Local cosine self-attention as a drop-in for a ``k x k`` conv (stand-alone SA).

    The q/k/v 1x1 projections map the input to ``features`` channels split into heads,
    every pixel attends over its ``window``, an output projection mixes the heads, and
    a stride is applied afterwards by ``stride x stride`` average pooling ('SAME', so
    the output has ``ceil(H / stride)`` rows like a strided 'SAME' conv).

    Attributes:
      features: output channels; must be divisible by ``num_heads``.
      num_heads: attention heads.
      window: odd window ``(kh, kw)`` or int.
      dilation: ``(dy, dx)`` or int (DiNAT; default 1).
      border: ``'mask'`` (default) or ``'shift'`` (NATTEN's shifted window).
      strides: spatial stride (int).
      use_bias: biases in the projections.
      dtype: computation dtype (None: inferred).
      param_dtype: parameter dtype.
      implementation: kernel of the local attention op; None picks.

    Sown: ``intermediates`` → ``attention/attention_weights`` ``[batch, H, W, heads, kh, kw]``
    (before the pooling).
    """

    features: int
    num_heads: int = 4
    window: int | Sequence[int] = (3, 3)
    dilation: int | Sequence[int] = 1
    border: str = "mask"
    strides: int = 1
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    def __post_init__(self) -> None:
        local_options(self.window, self.dilation, self.border)  # fail at construction
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[batch, H, W, C]`` -> ``[batch, ceil(H/s), ceil(W/s), features]``."""
        y = LocalCosineSelfAttention2D(
            num_heads=self.num_heads, qkv_features=self.features, out_features=self.features,
            window=self.window, dilation=self.dilation, border=self.border,
            use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, implementation=self.implementation, name="attention",
        )(x)
        if self.strides > 1:
            s = (self.strides, self.strides)
            y = nn.avg_pool(y, s, strides=s, padding="SAME", count_include_pad=False)
        return y
