"""The small CNN baseline and the same CNN with residual attention blocks.

Both are ``conv3x3(32) -> ReLU -> conv3x3(64) -> ReLU -> [attention] -> max-pool 2 ->
[attention] -> adaptive average pool to 4x4 -> flatten -> dense 64 -> ReLU -> dense
classes``, with the attention blocks at one of the two places (`AttentionCNN.placement`).
The adaptive pool makes the models work on any input size of at least 2x2 with a
parameter count that does not depend on it: on the embedded 8x8 digits the max-pool
already gives 4x4, the adaptive pool is the identity, and the model is a plain
``flatten -> dense`` CNN; on larger inputs it averages the pooled map over a
4x4 grid of (near-)equal cells, keeping coarse spatial layout (unlike a global
average pool).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnflax.nn import ResidualAttentionBlock
from attnflax.nn.blocks import ATTENTION_KINDS, check_choice
from attnflax.ops.attention import normalize_window

Array = jax.Array
Dtype = Any

PLACEMENTS = ("before_pool", "after_pool")


def check_image(x: Array, model: str, min_size: int) -> None:
    """Raises a ValueError unless ``x`` is ``[batch, H, W, C]`` with ``H, W >= min_size``."""
    if np.ndim(x) != 4:
        raise ValueError(
            f"{model} expects images [batch, height, width, channels]; got shape {np.shape(x)}."
        )
    height, width = np.shape(x)[1:3]
    if height < min_size or width < min_size:
        raise ValueError(
            f"{model} downsamples its input by {min_size}x, so images must be at least "
            f"{min_size}x{min_size}; got {height}x{width}."
        )


def _pool_matrix(size: int, out: int) -> np.ndarray:
    """``[out, size]`` averaging weights of adaptive pooling (cells as in PyTorch)."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        start, stop = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, start:stop] = 1.0 / (stop - start)
    return m


def adaptive_avg_pool(x: Array, output_size: Sequence[int]) -> Array:
    """Averages ``[batch, H, W, C]`` over an ``oh x ow`` grid of cells.

    Cell ``i`` along an axis of length ``n`` covers ``[floor(i n / o), ceil((i+1) n / o))``
    (PyTorch's ``AdaptiveAvgPool2d``); ``H = oh`` and ``W = ow`` give the identity.

    Returns:
      ``[batch, oh, ow, C]`` in ``x``'s dtype.
    """
    oh, ow = output_size
    if x.shape[1:3] == (oh, ow):
        return x
    ph = jnp.asarray(_pool_matrix(x.shape[1], oh), x.dtype)
    pw = jnp.asarray(_pool_matrix(x.shape[2], ow), x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw)


class CNN(nn.Module):
    """The small baseline CNN, for any input size (>= 2x2) and channel count.

    Attributes:
      num_classes: number of output logits.
      features: channels of the two 3x3 convs (SAME padding).
      hidden: width of the hidden dense layer.
      pool_grid: grid the max-pooled map is adaptively averaged to before flattening.
      dtype: computation dtype; logits are returned in float32.
      param_dtype: parameter dtype.
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    hidden: int = 64
    pool_grid: Sequence[int] = (4, 4)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _attend(self, x: Array, where: str) -> Array:
        """Hook for subclasses: runs on the full-resolution conv features
        (``where='before_pool'``) and on the max-pooled ones (``'after_pool'``)."""
        del where
        return x

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Classifies a batch of images.

        Args:
          x: ``[batch, height, width, channels]`` images, height and width >= 2.
          train: unused (no BatchNorm or dropout); accepted for a uniform interface.

        Returns:
          float32 logits ``[batch, num_classes]``.

        Raises:
          ValueError: on a wrong rank or an image smaller than 2x2.
        """
        del train
        check_image(x, type(self).__name__, 2)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Conv(f, (3, 3), padding="SAME", name=f"conv{i}", **dense)(x))
        x = self._attend(x, "before_pool")
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = self._attend(x, "after_pool")
        x = adaptive_avg_pool(x, self.pool_grid)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, name="dense0", **dense)(x))
        return nn.Dense(self.num_classes, name="head", **dense)(x).astype(jnp.float32)


class AttentionCNN(CNN):
    """The small CNN with residual cosine-attention blocks after its convs.

    The blocks run on the last conv's full-resolution map (8x8x64 on digits), before
    the max-pool, or with ``placement='after_pool'`` on the pooled map (half the height
    and width: a quarter of the tokens, so local attention costs ~1/4 and global ~1/16);
    each block starts as the identity, so a fresh model computes exactly what
    :class:`CNN` would with the same conv and dense weights.

    Attributes (besides :class:`CNN`'s):
      attention: ``'local'`` or ``'global'``.
      num_heads: heads per block; must divide ``features[-1]``.
      window: odd local window (int or pair).
      num_blocks: number of residual attention blocks.
      placement: ``'before_pool'`` (full resolution) or ``'after_pool'``.
      position_bias: learn a relative-position bias in each block.
      mlp_ratio: MLP width multiple in each block (0 = attention only).
      attention_implementation: kernel of the attention op (see
        :func:`attnflax.local_cosine_attention_2d` / :func:`attnflax.cosine_attention`);
        None picks the best for the backend and shape.

    Sown: ``intermediates`` → ``attention_block{i}/attention/attention_weights``; or use
    :func:`attnflax.nn.attention_maps`.
    """

    attention: Literal["local", "global"] = "local"
    num_heads: int = 4
    window: int | Sequence[int] = (3, 3)
    num_blocks: int = 1
    placement: Literal["before_pool", "after_pool"] = "before_pool"
    position_bias: bool = True
    mlp_ratio: float = 0.0
    attention_implementation: str | None = None

    def __post_init__(self) -> None:
        check_choice("attention", self.attention, ATTENTION_KINDS)
        check_choice("placement", self.placement, PLACEMENTS)
        normalize_window(self.window)
        if self.num_heads <= 0 or self.features[-1] % self.num_heads:
            raise ValueError(
                f"`num_heads`={self.num_heads} must divide the attention channels "
                f"features[-1]={self.features[-1]}."
            )
        super().__post_init__()

    def _attend(self, x: Array, where: str) -> Array:
        if where != self.placement:
            return x
        for i in range(self.num_blocks):
            x = ResidualAttentionBlock(
                num_heads=self.num_heads, attention=self.attention, window=self.window,
                position_bias=self.position_bias, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                param_dtype=self.param_dtype, implementation=self.attention_implementation,
                name=f"attention_block{i}",
            )(x)
        return x
