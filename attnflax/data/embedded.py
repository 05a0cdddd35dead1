"""What the embedded datasets (digits, mnist5k, cluttered) share: their split rule, how
their normalisation constants are computed, and the parts of their TFDS builders."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath


def stratified_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed split of every embedded dataset:
    ``train_test_split(arange(n), test_size=0.2, stratify=labels, random_state=0)``.

    Returns:
      ``{'train': int64 [0.8 n], 'test': int64 [0.2 n]}``, indices in the order
      scikit-learn returns them.
    """
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    return {"train": train, "test": test}


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """``(mean, std)`` over all pixels of ``uint8 images / 255`` (float64)."""
    x = np.asarray(images).astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())


class Meta(NamedTuple):
    """What a builder's ``DatasetInfo`` says about its source."""

    description: str
    homepage: str
    citation: str


class EmbeddedBuilder:
    """What the embedded TFDS builders share (a mixin before
    ``tfds.core.GeneratorBasedBuilder``): their code path and an ``image`` + digit
    ``label`` info."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The builder's file. TFDS 4.9.10's default lookup imports `importlib_resources`,
        which it does not declare as a dependency; naming the file directly avoids it."""
        return epath.Path(inspect.getfile(cls))

    def digit_info(self, *, description: str, homepage: str, citation: str,
                   image_shape: tuple[int, int, int], **features: Any
                   ) -> tfds.core.DatasetInfo:
        """A supervised ``(image, label)`` info with labels ``'0'``..``'9'`` (and `features`)."""
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=image_shape),
                "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                **features,
            }),
            supervised_keys=("image", "label"),
            homepage=homepage,
            citation=citation,
        )


class ArrayBuilder(EmbeddedBuilder):
    """An embedded builder over fixed in-memory arrays (digits, mnist5k).

    It sets `META`, `IMAGE_SHAPE`, `load_arrays` and `split_indices` (static) and gets
    ``_info``, ``_split_generators``, ``_generate_examples`` and `train_stats` from here.
    """

    META: Meta
    IMAGE_SHAPE: tuple[int, int, int]
    load_arrays: Callable[[], tuple[np.ndarray, np.ndarray]]
    split_indices: Callable[[], dict[str, np.ndarray]]

    @classmethod
    def train_stats(cls) -> tuple[float, float]:
        """``(mean, std)`` over all train pixels of ``uint8 / 255`` (`pixel_stats`): where
        a builder's normalisation constants come from (tests check them)."""
        return pixel_stats(cls.load_arrays()[0][cls.split_indices()["train"]])

    def _info(self) -> tfds.core.DatasetInfo:
        return self.digit_info(**self.META._asdict(), image_shape=self.IMAGE_SHAPE)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download.
        images, labels = self.load_arrays()
        return {name: self._generate_examples(images, labels, indices)
                for name, indices in self.split_indices().items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
                           ) -> Iterator[tuple[int, dict[str, object]]]:
        """Example ``i`` of the arrays under its index as the TFDS key (so the record order
        and the bytes are the same on every preparation)."""
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}
