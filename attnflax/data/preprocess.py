"""Pure TensorFlow image functions used inside the tf.data pipelines.

Every function maps tensors to tensors and holds no state; randomness comes only from
explicit stateless seeds (int64 ``[2]``), so a pipeline's output is a function of its
config and the seed alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

# ITU-R 601-2 luma, the weights of PIL's and TF's RGB -> gray conversion.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def decode_image(
    encoded: tf.Tensor, channels: int, stored_channels: int | None = None
) -> tf.Tensor:
    """Decodes a PNG/JPEG/GIF/BMP/WebP file and converts it to `channels`.

    Args:
      encoded: string scalar, the file's bytes.
      channels: 1 or 3.
      stored_channels: The files' channel count if every file has the same, known one
        (TFDS datasets); ``None`` (image folders) decodes whatever each file holds.

    Returns:
      uint8 ``[h, w, channels]`` (the first frame of an animated GIF).
    """
    image = tf.io.decode_image(
        encoded, channels=stored_channels or 0, dtype=tf.uint8, expand_animations=False
    )
    image.set_shape([None, None, stored_channels])
    return convert_channels(image, channels)


def convert_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Converts gray, gray+alpha, RGB or RGBA to `channels` (1 or 3).

    Alpha is dropped (the colour values are kept as stored, not composited); gray is
    replicated to RGB; RGB becomes gray with `LUMA_WEIGHTS`, rounded.

    Args:
      image: uint8 ``[h, w, c]`` with c in 1..4 (c may be unknown until run time).
      channels: 1 or 3.

    Returns:
      uint8 ``[h, w, channels]``.
    """
    if channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {channels}")
    if image.shape[-1] in (1, 3):  # Known statically: no run-time branch.
        if image.shape[-1] == channels:
            return image
        return tf.tile(image, [1, 1, 3]) if channels == 3 else _luma(image)
    c = tf.shape(image)[-1]
    colour = c - (1 - c % 2)  # 1->1, 2->1 (gray+alpha), 3->3, 4->3 (RGBA)
    if channels == 3:
        out = tf.cond(
            colour == 1,
            lambda: tf.tile(image[..., :1], [1, 1, 3]),
            lambda: image[..., :3],
        )
    else:
        out = tf.cond(colour == 1, lambda: image[..., :1], lambda: _luma(image[..., :3]))
    out.set_shape([None, None, channels])
    return out


def _luma(rgb: tf.Tensor) -> tf.Tensor:
    """uint8 ``[h, w, 3]`` -> uint8 ``[h, w, 1]`` with `LUMA_WEIGHTS`, rounded."""
    gray = tf.tensordot(tf.cast(rgb, tf.float32), tf.constant(LUMA_WEIGHTS), axes=[[2], [0]])
    return tf.cast(tf.clip_by_value(tf.round(gray), 0.0, 255.0), tf.uint8)[..., None]


def resize(image: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """Resizes to `size` (bilinear, antialiased), keeping uint8; a no-op if already that size.

    Args:
      image: uint8 ``[h, w, c]``.
      size: ``(height, width)``.

    Returns:
      uint8 ``[height, width, c]``.
    """
    height, width = int(size[0]), int(size[1])
    if tuple(image.shape[:2]) == (height, width):
        return image
    out = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
    out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    out.set_shape([height, width, image.shape[-1]])
    return out


def prepare(
    image: tf.Tensor,
    size: Sequence[int],
    channels: int,
    encoded: bool,
    stored_channels: int | None = None,
) -> tf.Tensor:
    """Decodes if needed, converts channels and resizes: the cacheable, deterministic part.

    Args:
      image: string scalar (`encoded`) or uint8 ``[h, w, c]``.
      size: ``(height, width)``.
      channels: 1 or 3.
      encoded: Whether `image` holds file bytes.
      stored_channels: See `decode_image`.

    Returns:
      uint8 ``[height, width, channels]``.
    """
    if encoded:
        image = decode_image(image, channels, stored_channels)
    else:
        image = convert_channels(image, channels)
    return resize(image, size)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, crop_padding: int, flip: bool) -> tf.Tensor:
    """Per-example random crop after zero padding, then random horizontal flip, vectorised.

    Each example gets its own crop offset in ``[0, 2 * crop_padding]`` (per axis) and its
    own coin for the flip, all drawn from `seed` with stateless ops; crop and flip are
    then one gather over the whole batch.

    Args:
      images: uint8 ``[b, h, w, c]`` with static h, w, c.
      seed: int64 ``[2]``, the stateless seed of this batch.
      crop_padding: Zero pixels added on each side before cropping back to ``[h, w]``
        (0: no crop).
      flip: Whether to flip each example left-right with probability 1/2.

    Returns:
      uint8 ``[b, h, w, c]``.
    """
    if not crop_padding and not flip:
        return images
    batch = tf.shape(images)[0]
    height, width, channels = images.shape[1:]
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    p = int(crop_padding)
    if p:
        images = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
        offsets = tf.random.stateless_uniform(
            [batch, 2], crop_seed, minval=0, maxval=2 * p + 1, dtype=tf.int32
        )
    else:
        offsets = tf.zeros([batch, 2], tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None]  # [b, h]
    cols = tf.range(width)[None]  # [1, w]
    if flip:
        mirror = tf.random.stateless_uniform([batch, 1], flip_seed) < 0.5
        cols = tf.where(mirror, width - 1 - cols, cols)  # [b, w]
    cols = offsets[:, 1:] + cols
    padded_h, padded_w = height + 2 * p, width + 2 * p
    pixel = (
        tf.range(batch)[:, None, None] * (padded_h * padded_w)
        + rows[:, :, None] * padded_w
        + cols[:, None, :]
    )  # [b, h, w], indices into the batch's pixels
    return tf.gather(tf.reshape(images, [-1, channels]), pixel)


def normalize(images: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """``(images / 255 - mean) / std`` per channel.

    Args:
      images: uint8 ``[..., c]``.
      mean, std: Length-c sequences.

    Returns:
      float32 ``[..., c]``.
    """
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def fold_seed(seed: tf.Tensor, *data: tf.Tensor | int) -> tf.Tensor:
    """Derives a stateless seed from `seed` and integers, in order.

    Args:
      seed: int64 ``[2]``.
      *data: int scalars (e.g. a purpose tag, process, epoch, example index).

    Returns:
      int64 ``[2]``.
    """
    for d in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
    return seed
