"""`attnflax_digits`: the embedded default dataset, a TFDS builder over scikit-learn's digits.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set inside the
package (`sklearn.datasets.load_digits`): 1,797 real 8×8 grayscale images of the digits 0–9,
each pixel an integer level 0–16. This module wraps it in a real
`tfds.core.GeneratorBasedBuilder` so that the whole input pipeline (TFDS records, splits,
sharding, `tfds.load`) is exercised with no network at all. Importing it (or
`attnflax.data`) registers the builder, after which `tfds.load('attnflax_digits')` works.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from attnflax.data.embedded import ArrayBuilder, Meta, stratified_split

NAME = "attnflax_digits"
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
SPLIT_SIZES = {"train": 1437, "test": 360}
# Examples per class 0..9 in each split (see `AttnflaxDigits`); tests pin these numbers.
CLASS_COUNTS = {
    "train": (142, 146, 142, 146, 145, 145, 145, 143, 139, 144),
    "test": (36, 36, 35, 37, 36, 37, 36, 36, 35, 36),
}
# Per-pixel mean and standard deviation of the *train* split after scaling to [0, 1]
# (`uint8 / 255`), computed by `AttnflaxDigits.train_stats`; a test checks them against the data.
MEAN = (0.3054337,)
STD = (0.3759572,)

META = Meta(
    "The 1,797 8x8 handwritten digits bundled with scikit-learn (UCI optdigits test set), "
    "levels 0-16 scaled to 0-255.",
    "https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    "@misc{optdigits, author={Alpaydin, E. and Kaynak, C.}, title={Optical Recognition of "
    "Handwritten Digits}, year={1998}, howpublished={UCI Machine Learning Repository}}")


def scale_levels(levels: np.ndarray) -> np.ndarray:
    """Maps the 17 integer grey levels 0..16 of `load_digits` onto uint8 0..255.

    The exact rule is integer round-half-up of ``v * 255 / 16``, i.e.
    ``(v * 255 + 8) // 16``, which sends 0→0, 8→128 and 16→255 (the 17 levels become
    0, 16, 32, 48, 64, 80, 96, 112, 128, 143, 159, 175, 191, 207, 223, 239, 255).

    Args:
      levels: Any shape, integer-valued (float or int) levels in [0, 16].

    Returns:
      uint8 array of the same shape.
    """
    v = np.asarray(levels).astype(np.int64)
    if v.min(initial=0) < 0 or v.max(initial=0) > 16:
        raise ValueError("digit levels must lie in [0, 16]")
    return ((v * 255 + 8) // 16).astype(np.uint8)


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Loads all 1,797 digits from scikit-learn (bundled data, no network).

    Returns:
      images: uint8 [1797, 8, 8, 1], scaled with `scale_levels`.
      labels: int64 [1797], digits 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = scale_levels(digits.images)[..., None]
    return images, digits.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
    """Indices (into `load_arrays`) of the fixed train/test split.

    ``train_test_split(arange(1797), test_size=0.2, stratify=labels, random_state=0)``.

    Returns:
      {'train': int64 [1437], 'test': int64 [360]}, in the order scikit-learn returns them.
    """
    return stratified_split(load_arrays()[1])


class AttnflaxDigits(ArrayBuilder, tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1,797 handwritten 8×8 digits as a TFDS dataset (no download needed).

    Features: ``image`` uint8 ``[8, 8, 1]`` and ``label`` (10 classes, names '0'..'9').
    Pixel levels 0..16 are scaled to 0..255 with ``(v * 255 + 8) // 16`` (integer
    round-half-up of ``v * 255 / 16``; see `scale_levels`).

    Splits come from ``sklearn.model_selection.train_test_split(test_size=0.2,
    stratify=labels, random_state=0)`` over the example indices:

    ======  ========  ===================================================
    split   examples  examples of digit 0, 1, ..., 9
    ======  ========  ===================================================
    train   1,437     142, 146, 142, 146, 145, 145, 145, 143, 139, 144
    test      360      36, 36, 35, 37, 36, 37, 36, 36, 35, 36
    ======  ========  ===================================================

    Each example's TFDS key is its index in ``load_digits()``, so the record order on
    disk (TFDS shuffles by hashed key) and the bytes are the same on every preparation.
    Preparation reads only scikit-learn's bundled file; `download_and_prepare` never
    touches the network (pass ``DownloadConfig(try_download_gcs=False)``, as
    `attnflax.data` does, so TFDS does not even look for a prepared copy online).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: sklearn digits, stratified 80/20 split."}

    META, IMAGE_SHAPE = META, IMAGE_SHAPE
    load_arrays, split_indices = staticmethod(load_arrays), staticmethod(split_indices)
