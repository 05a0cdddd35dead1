"""Single image files -> model inputs, with the exact preprocessing of the data pipeline.

Training batches are made by `attnflax.data`: decode, convert channels, resize
(bilinear, antialiased, uint8) to the dataset's image size, then ``(x / 255 - mean) /
std``. :func:`prepare_image` applies the same functions of `attnflax.data.preprocess`
to one image, so a file classified by ``experiments/predict.py`` is seen exactly as a
training or test image of that size would be.

Decoding: TensorFlow's ``decode_image`` (as the pipeline uses for image folders) for
PNG, JPEG, GIF, BMP and WebP; Pillow for any other format it can read (TIFF, PPM, ICO,
16-bit or palette images, ...), converted to 8-bit gray, gray+alpha, RGB or RGBA.
Alpha is dropped, as in training.

Hostile files: before anything is decoded, the header is read (Pillow's lazy open,
constant memory) and an image declaring more than ``max_pixels`` pixels (default
50 MP, `attnflax.configs.defaults.MAX_IMAGE_PIXELS`) is refused with `ImageFileError`.

The only I/O is :func:`read_image_file`, which reads the one file it is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from attnflax.configs import defaults

# Pillow modes mapped to one of the 8-bit modes the pipeline's channel conversion takes.
_PIL_MODES = {"1": "L", "L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", "La": "LA",
              "RGBa": "RGBA"}


# The default pixel budget (the same as the image-folder pipeline's).
MAX_IMAGE_PIXELS = defaults.MAX_IMAGE_PIXELS


class ImageFileError(ValueError):
    """A path that does not exist, is not a file, is not a readable image, or is too big."""


def check_pixels(path_or_file, name: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    """Refuses an image whose header declares more than `max_pixels` (nothing decoded)."""
    from attnflax.data.sources import ImageTooLargeError, check_image_header

    try:
        check_image_header(path_or_file, name, max_pixels)
    except ImageTooLargeError as e:
        raise ImageFileError(str(e).replace("config.max_image_pixels / ", "")) from None


def decode_image_bytes(encoded: bytes, name: str = "<bytes>",
                       max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decodes an image file's bytes.

    Args:
      encoded: The file content.
      name: For error messages.
      max_pixels: Refuse (before decoding) an image whose header declares more pixels.

    Returns:
      uint8 ``[h, w, c]``, c in 1..4 (gray, gray+alpha, RGB, RGBA); the first frame of
      an animation.

    Raises:
      ImageFileError: If neither TensorFlow nor Pillow can decode it, or it is over
        `max_pixels`.
    """
    import io

    import tensorflow as tf

    if not encoded:
        raise ImageFileError(f"{name} is empty (0 bytes), not an image.")
    check_pixels(io.BytesIO(encoded), name, max_pixels)
    try:
        image = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
        return np.asarray(image)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, ValueError):
        pass
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(encoded)) as im:
            im.seek(0)
            mode = _PIL_MODES.get(im.mode)
            if mode is None:  # P, I;16, I, F, CMYK, YCbCr, LAB, HSV, ...
                if im.mode == "P":
                    mode = "RGBA" if "transparency" in im.info else "RGB"
                elif im.mode.startswith(("I", "F")):
                    return _to_uint8(np.asarray(im))[..., None]
                else:
                    mode = "RGB"
            array = np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        detail = "unknown format" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ImageFileError(
            f"{name} is not a readable image: neither TensorFlow (PNG, JPEG, GIF, BMP, WebP) "
            f"nor Pillow could decode it ({detail})."
        ) from None
    return array[..., None] if array.ndim == 2 else array


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Integer/float gray of any range (16-bit, 32-bit) to uint8 by its dtype's range."""
    a = values.astype(np.float64)
    if np.issubdtype(values.dtype, np.integer):
        hi = 65535.0 if a.max(initial=0) > 255 else 255.0
    else:
        hi = 1.0 if a.max(initial=0) <= 1.0 else float(a.max())
    return np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)


def read_image_file(path: str | os.PathLike[str],
                    max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Reads and decodes one image file (see :func:`decode_image_bytes`).

    The header is checked against `max_pixels` before the file is read in full.

    Raises:
      ImageFileError: If `path` does not exist, is not a file, is not an image, or
        declares more than `max_pixels` pixels.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ImageFileError(f"image file {name!r} does not exist.")
    if not os.path.isfile(name):
        raise ImageFileError(f"{name!r} is not a file.")
    try:
        check_pixels(name, repr(name), max_pixels)
        with open(name, "rb") as f:
            encoded = f.read()
    except OSError as e:
        raise ImageFileError(f"cannot read {name!r}: {e.strerror or e}.") from None
    return decode_image_bytes(encoded, repr(name), max_pixels)


def prepare_image(
    image: np.ndarray,
    image_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """The pipeline's preprocessing of one decoded image.

    Args:
      image: uint8 ``[h, w, c]``, c in 1..4.
      image_shape: The model's ``(height, width, channels)``, channels 1 or 3.
      mean, std: The dataset's per-channel normalisation.

    Returns:
      float32 ``[height, width, channels]``, ``(resized / 255 - mean) / std``.
    """
    import tensorflow as tf

    from attnflax.data import preprocess

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4) or image.dtype != np.uint8:
        raise ImageFileError(
            f"expected a uint8 image [h, w, 1..4]; got {image.dtype} {image.shape}."
        )
    height, width, channels = (int(s) for s in image_shape)
    x = preprocess.convert_channels(tf.constant(image), channels)
    x = preprocess.resize(x, (height, width))
    return np.asarray(preprocess.normalize(x, mean, std))


def load_images(
    paths: Sequence[str | os.PathLike[str]],
    image_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Reads and preprocesses image files into one batch.

    Every header is checked against `max_pixels` before any file is decoded.

    Returns:
      float32 ``[len(paths), height, width, channels]``.

    Raises:
      ImageFileError: For the first path that is missing, not an image, or too big.
    """
    for p in paths:
        if os.path.isfile(p):
            check_pixels(os.fspath(p), repr(os.fspath(p)), max_pixels)
    return np.stack([prepare_image(read_image_file(p, max_pixels), image_shape, mean, std)
                     for p in paths])
