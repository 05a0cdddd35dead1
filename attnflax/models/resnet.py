"""CIFAR-style ResNets whose stages can take cosine attention.

Stem ``conv3x3 -> BN -> ReLU`` at full resolution (no max-pool, CIFAR style), then
stages of basic blocks (``conv3x3 -> BN -> ReLU -> conv3x3 -> BN`` plus a shortcut, a
1x1 conv + BN when the shape changes), the first block of every stage after the first
striding by 2, then global average pool and a dense classifier.

Depths: 20/32/44/56/110 are the CIFAR ResNets of He et al. (3 stages of ``n`` blocks,
widths 16/32/64; 8 and 14, with 1 and 2 blocks per stage, are there for quick tests);
18 and 34 keep the ImageNet layout (4 stages, widths 64/128/256/512) with the CIFAR stem.

Per stage, ``stage_attention`` chooses:

- ``'none'``: plain convs.
- ``'block'``: append ``attention_blocks`` :class:`~attnflax.nn.ResidualAttentionBlock`
  after the stage's basic blocks (each starts as the identity).
- ``'replace'``: swap every 3x3 conv of the stage for
  :class:`~attnflax.nn.AttentionConv2D` (local cosine attention with 1x1 projections,
  stride by average pooling: stand-alone self-attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnflax.models.cnn import check_image
from attnflax.nn import AttentionConv2D, ResidualAttentionBlock
from attnflax.nn.blocks import ATTENTION_KINDS, check_choice
from attnflax.ops.attention import normalize_window

Array = jax.Array
Dtype = Any

# depth -> (blocks per stage, widths per stage)
DEPTHS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    **{6 * n + 2: ((n, n, n), (16, 32, 64)) for n in (1, 2, 3, 5, 7, 9, 18)},
    18: ((2, 2, 2, 2), (64, 128, 256, 512)),
    34: ((3, 4, 6, 3), (64, 128, 256, 512)),
}
STAGE_KINDS = ("none", "block", "replace")


class BasicBlock(nn.Module):
    """ResNet basic block; ``spatial='attention'`` swaps its 3x3 convs for attention.

    Attributes:
      features: output channels.
      strides: stride of the first 3x3 layer (and of the projection shortcut).
      spatial: ``'conv'`` or ``'attention'`` (:class:`~attnflax.nn.AttentionConv2D`).
      num_heads: heads of the attention layers.
      window: local window of the attention layers.
      attention_implementation: kernel of the attention layers (None picks).
      zero_init_residual: zero-init the last BN scale, so the block starts as its shortcut.
      bn_momentum: BatchNorm running-average momentum.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    features: int
    strides: int = 1
    spatial: Literal["conv", "attention"] = "conv"
    num_heads: int = 4
    window: int | Sequence[int] = (3, 3)
    attention_implementation: str | None = None
    zero_init_residual: bool = True
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _spatial(self, strides: int, name: str) -> nn.Module:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.spatial == "attention":
            return AttentionConv2D(self.features, num_heads=self.num_heads, window=self.window,
                                   strides=strides, implementation=self.attention_implementation,
                                   **kw)
        return nn.Conv(self.features, (3, 3), strides=strides, padding="SAME", use_bias=False,
                       **kw)

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """``[b, H, W, C]`` -> ``[b, ceil(H/s), ceil(W/s), features]``."""
        bn = dict(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        y = self._spatial(self.strides, "conv0")(x)
        y = nn.relu(nn.BatchNorm(name="bn0", **bn)(y))
        y = self._spatial(1, "conv1")(y)
        scale_init = nn.initializers.zeros_init() if self.zero_init_residual else (
            nn.initializers.ones_init())
        y = nn.BatchNorm(scale_init=scale_init, name="bn1", **bn)(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, padding="SAME",
                        use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="shortcut_conv")(x)
            x = nn.BatchNorm(name="shortcut_bn", **bn)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet with per-stage cosine attention (see the module docstring).

    Attributes:
      num_classes: number of output logits.
      depth: one of :data:`DEPTHS` (8, 14, 20, 32, 44, 56, 110; 18, 34).
      widths: per-stage widths overriding the depth's defaults (e.g. narrow test models).
      stem_width: stem channels; default the first stage's width.
      stage_attention: per stage ``'none' | 'block' | 'replace'``, or one value for all.
      attention: kind of the residual attention blocks, ``'local'`` or ``'global'``.
      num_heads: attention heads; must divide the widths of attention stages.
      window: odd local attention window (int or pair).
      attention_blocks: residual attention blocks appended to each ``'block'`` stage.
      mlp_ratio: MLP width multiple inside those blocks (0 = none).
      attention_implementation: kernel of every attention layer (None picks the best for
        the backend and shape; see :func:`attnflax.local_cosine_attention_2d`).
      zero_init_residual: zero-init each basic block's last BN scale.
      bn_momentum: BatchNorm running-average momentum.
      dtype: computation dtype; logits are returned in float32.
      param_dtype: parameter dtype.

    Sown (collection ``intermediates``, or :func:`attnflax.nn.attention_maps`):
    ``stage{s}_attention{i}/attention/attention_weights`` for ``'block'`` stages and
    ``stage{s}_block{j}/conv{0,1}/attention/attention_weights`` for ``'replace'`` stages.
    """

    num_classes: int
    depth: int = 20
    widths: Sequence[int] | None = None
    stem_width: int | None = None
    stage_attention: str | Sequence[str] = "none"
    attention: Literal["local", "global"] = "local"
    num_heads: int = 4
    window: int | Sequence[int] = (3, 3)
    attention_blocks: int = 1
    mlp_ratio: float = 0.0
    attention_implementation: str | None = None
    zero_init_residual: bool = True
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        # Validate the configuration at construction. A plain function: Flax wraps module
        # methods, and a wrapped method may not run inside __post_init__ (nn.tabulate).
        resnet_layout(self.depth, self.widths, self.stage_attention, self.attention,
                      self.num_heads, self.window)
        super().__post_init__()

    def layout(self) -> list[tuple[int, int, str]]:
        """``[(num_blocks, width, stage_attention), ...]`` per stage, validated.

        Raises:
          ValueError: on an unknown depth, widths of the wrong length, an unknown stage
            kind, an even window or heads that do not divide an attention stage's width.
        """
        return resnet_layout(self.depth, self.widths, self.stage_attention, self.attention,
                             self.num_heads, self.window)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Classifies a batch of images.

        Args:
          x: ``[batch, height, width, channels]``; height and width at least
            ``2 ** (stages - 1)`` (4 for depth 20, 8 for depth 18).
          train: BatchNorm uses batch statistics and updates ``batch_stats`` (apply with
            ``mutable=['batch_stats']``); False uses the running averages.

        Returns:
          float32 logits ``[batch, num_classes]``.

        Raises:
          ValueError: on a wrong rank or an image too small for the downsampling.
        """
        stages = self.layout()
        check_image(x, f"ResNet-{self.depth}", 2 ** (len(stages) - 1))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(self.stem_width or stages[0][1], (3, 3), padding="SAME", use_bias=False,
                    name="stem_conv", **kw)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=1e-5, name="stem_bn", **kw)(x)
        x = nn.relu(x)
        for s, (num_blocks, width, kind) in enumerate(stages):
            for j in range(num_blocks):
                x = BasicBlock(
                    width, strides=2 if s > 0 and j == 0 else 1,
                    spatial="attention" if kind == "replace" else "conv",
                    num_heads=self.num_heads, window=self.window,
                    attention_implementation=self.attention_implementation,
                    zero_init_residual=self.zero_init_residual, bn_momentum=self.bn_momentum,
                    name=f"stage{s}_block{j}", **kw,
                )(x, train)
            for i in range(self.attention_blocks if kind == "block" else 0):
                x = ResidualAttentionBlock(
                    num_heads=self.num_heads, attention=self.attention, window=self.window,
                    mlp_ratio=self.mlp_ratio, implementation=self.attention_implementation,
                    name=f"stage{s}_attention{i}", **kw,
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head", **kw)(x).astype(jnp.float32)


def resnet_layout(
    depth: int,
    widths: Sequence[int] | None,
    stage_attention: str | Sequence[str],
    attention: str,
    num_heads: int,
    window: int | Sequence[int],
) -> list[tuple[int, int, str]]:
    """Validated ``[(num_blocks, width, stage_attention), ...]`` per stage (see ResNet)."""
    if depth not in DEPTHS:
        raise ValueError(f"`depth` must be one of {sorted(DEPTHS)}; got {depth!r}.")
    blocks, default_widths = DEPTHS[depth]
    n = len(blocks)
    if widths is not None and len(widths) != n:
        raise ValueError(
            f"`widths` must give {n} stage widths for depth {depth}; got {tuple(widths)}.")
    widths = default_widths if widths is None else tuple(widths)
    kinds = (stage_attention,) * n if isinstance(stage_attention, str) else tuple(
        stage_attention)
    if len(kinds) != n:
        raise ValueError(
            f"`stage_attention` must be one value or {n} values (one per stage of depth "
            f"{depth}) from {STAGE_KINDS}; got {stage_attention!r}."
        )
    for kind in kinds:
        check_choice("stage_attention", kind, STAGE_KINDS)
    check_choice("attention", attention, ATTENTION_KINDS)
    normalize_window(window)
    for width, kind in zip(widths, kinds, strict=True):
        if kind != "none" and (num_heads <= 0 or width % num_heads):
            raise ValueError(
                f"`num_heads`={num_heads} must divide the width {width} of every stage with "
                f"attention; stage widths {widths}, stage_attention {kinds}."
            )
    return list(zip(blocks, widths, kinds, strict=True))
