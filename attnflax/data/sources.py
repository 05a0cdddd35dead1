"""Where examples come from: a TFDS dataset by name, or an image folder.

A `Source` knows a dataset's metadata (`DatasetInfo`), how many examples each process
holds of a split, and how to read one process's shard of a split as a `tf.data.Dataset`
of ``{'image', 'label'}`` in a fixed order. Everything random (shuffling, augmentation)
happens later, in `attnflax.data.pipeline`.

Sharding over processes:
  * TFDS datasets use `tfds.split_for_jax_process` (`tfds.even_splits` underneath), so
    a process only opens the records of its own contiguous range; shard sizes differ by
    at most one and come from the dataset's metadata (or, where that is unknown, as
    under `tfds.testing.mock_data`, from the shard datasets' cardinality).
  * Image folders (whose builder has no sub-split support) keep example ``i`` of the
    split on process ``i % process_count``.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Mapping

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from attnflax.configs import defaults
from attnflax.data import cluttered, digits, mnist5k
from attnflax.data.errors import CorruptImageError, DataError, DatasetNotPreparedError
from attnflax.data.preprocess import LUMA_WEIGHTS, decode_image

IMAGE_FOLDER = "image_folder"
# The extensions `tfds.folder_dataset.ImageFolder` picks up (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Datasets named in error messages as known to work (any TFDS image-classification
# dataset with 'image' and 'label' features does).
EXAMPLE_DATASETS = (
    digits.NAME,
    mnist5k.NAME,
    cluttered.NAME,
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "imagenette",
    "imagenet2012",
    IMAGE_FOLDER,
)
# The datasets embedded in attnflax: built from files inside installed Python packages,
# prepared offline on first use (`_prepare_embedded`).
EMBEDDED_DATASETS = (digits.NAME, mnist5k.NAME, cluttered.NAME)
# Per-channel (mean, std) of `uint8 / 255` on each train split, as commonly published
# (MNIST/CIFAR/ImageNet) or computed here (the embedded datasets: their builders'
# `train_stats`, `cluttered.compute_train_stats`). A ``name/config`` entry is used for that
# builder config.
# Datasets not listed are normalised with mean 0.5 and std 0.5 per channel.
NORMALIZATION: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    digits.NAME: (digits.MEAN, digits.STD),
    mnist5k.NAME: (mnist5k.MEAN, mnist5k.STD),
    cluttered.NAME: cluttered.STATS[cluttered.DEFAULT_CONFIG],
    **{f"{cluttered.NAME}/{k}": v for k, v in cluttered.STATS.items()},
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_STAT = 0.5
# Default pixel budget of one image file (`check_image_header`); config.max_image_pixels.
MAX_IMAGE_PIXELS = defaults.MAX_IMAGE_PIXELS


class ImageTooLargeError(DataError):
    """An image file whose header declares more pixels than the budget (not decoded)."""


def check_image_header(path_or_file, name: str, max_pixels: int | None = MAX_IMAGE_PIXELS
                       ) -> tuple[int, int] | None:
    """Reads only the header of an image file and checks its size against `max_pixels`.

    Constant memory: nothing is decoded (Pillow's lazy open).

    Args:
      path_or_file: A path or a binary file object.
      name: The file's name for messages.
      max_pixels: The pixel budget (None or <= 0: no limit).

    Returns:
      ``(width, height)``, or None if Pillow does not recognise the format (left to the
      decoder to accept or refuse).

    Raises:
      ImageTooLargeError: the header declares more than `max_pixels` pixels.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    budget = f"the pixel budget of {max_pixels:,}" if max_pixels and max_pixels > 0 else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path_or_file) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"{name} declares more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (a decompression "
            f"bomb?); refused without decoding it{' (over ' + budget + ')' if budget else ''}."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, tf.errors.OpError):
        return None  # Not a header Pillow reads: the decoder decides.
    if budget and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name} declares {width}x{height} = {width * height:,} pixels, over {budget}; "
            "refused without decoding it (raise it with --config.data.max_image_pixels=... in "
            "training, or --max_pixels=... in experiments/predict.py, if it is a real image)."
        )
    return width, height


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data, after resizing and channel conversion.

    Attributes:
      name: The dataset (``config.dataset``).
      num_classes: Number of labels; labels are ``0 .. num_classes - 1``.
      image_shape: ``(height, width, channels)`` of every image in a batch.
      split_sizes: Examples per split; empty when TFDS does not know them (mocked data).
      class_names: Label names, or ``None`` if the dataset has none.
      mean, std: The per-channel normalisation applied: ``(x / 255 - mean) / std``.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    split_sizes: Mapping[str, int]
    class_names: tuple[str, ...] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


class Source(abc.ABC):
    """One dataset: its `info`, per-process shard sizes and shards."""

    def check_files(self, split: str, decode: bool = False) -> None:
        """Checks the stored files of `split` up front (image folders; a no-op for TFDS,
        whose records are checksummed when prepared)."""
        del split, decode

    info: DatasetInfo
    #: Whether `read` yields encoded file bytes (True) or decoded uint8 images.
    encoded: bool
    #: The channels of every stored image if known and the same for all (else None).
    stored_channels: int | None

    @abc.abstractmethod
    def shard_sizes(self, split: str, process_count: int) -> tuple[int, ...]:
        """Examples of `split` held by each of `process_count` processes (they sum to the split)."""

    @abc.abstractmethod
    def read(self, split: str, process_index: int, process_count: int) -> tf.data.Dataset:
        """One process's shard of `split`, always in the same order.

        Returns:
          Dataset of ``{'image': string [] (encoded) or uint8 [h, w, c], 'label': int64 []}``
          (plus whatever other features the dataset has, for the caller to drop).
        """

    def explain_error(self, error: Exception, split: str) -> Exception | None:
        """A clearer error for a failure while reading `split`, or None to keep `error`."""
        del error, split
        return None


def _stat_for_channels(values: tuple[float, ...], channels: int, luma: bool) -> tuple[float, ...]:
    """Adapts per-channel statistics to `channels` (1 <-> 3)."""
    if len(values) == channels:
        return tuple(float(v) for v in values)
    if len(values) == 1:
        return (float(values[0]),) * channels
    if len(values) == 3 and channels == 1 and luma:
        return (sum(w * v for w, v in zip(LUMA_WEIGHTS, values, strict=True)),)
    raise DataError(f"{len(values)} normalisation values do not fit {channels} channels")


def normalization(
    name: str, channels: int, mean: tuple | None = None, std: tuple | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) used for a dataset: the override, the `NORMALIZATION` table, or 0.5.

    Args:
      name: The dataset name; ``name/config`` is looked up first, then ``name`` (a
        version suffix is ignored).
      channels: Channels after conversion.
      mean, std: Overrides from the config (length 1 or `channels`).

    Returns:
      Two tuples of `channels` floats. Converting a table's RGB statistics to gray
      uses the luma weights (an approximation for the std).
    """
    parts = name.split(":")[0].split("/")
    with_config, base = "/".join(parts[:2]), parts[0]
    table_mean, table_std = NORMALIZATION.get(
        with_config, NORMALIZATION.get(base, ((DEFAULT_STAT,), (DEFAULT_STAT,))))
    out_mean = _stat_for_channels(tuple(mean) if mean else table_mean, channels, luma=True)
    out_std = _stat_for_channels(tuple(std) if std else table_std, channels, luma=True)
    if min(out_std) <= 0:
        raise DataError(f"normalisation std must be positive, got {out_std}")
    return out_mean, out_std


def _image_shape(
    name: str, config: ml_collections.ConfigDict, own_shape: tuple
) -> tuple[int, int, int]:
    """``(h, w, c)`` after resizing/conversion, from the config or the dataset's own shape."""
    size = tuple(config.image_size) if config.image_size is not None else tuple(own_shape[:2])
    if len(size) != 2 or any(s is None for s in size):
        raise DataError(
            f"The images of {name!r} vary in size: set config.data.image_size, "
            "e.g. --config.data.image_size='(224, 224)'."
        )
    if min(size) < 1:
        raise DataError(f"config.data.image_size must be positive, got {size}")
    channels = config.num_channels or own_shape[-1] or 3
    if channels not in (1, 3):
        raise DataError(f"config.data.num_channels must be 1 or 3, got {channels}")
    return int(size[0]), int(size[1]), int(channels)


def _unknown_dataset_message(name: str) -> str:
    return (
        f"Unknown dataset {name!r}. Expected a TFDS image-classification dataset with "
        f"'image' and 'label' features (e.g. {', '.join(EXAMPLE_DATASETS[:-1])}), or "
        f"{IMAGE_FOLDER!r} with --config.data.data_dir=<root> (laid out as "
        "<root>/<split>/<class>/<image>). List the "
        'TFDS names with: python -c "import tensorflow_datasets as tfds; '
        'print(tfds.list_builders())"'
    )


def _not_prepared_message(
    name: str, builder: tfds.core.DatasetBuilder, data_dir: str | None, offline: bool = False
) -> str:
    dir_arg = f", data_dir={data_dir!r}" if data_dir else ""
    lines = [
        f"TFDS dataset {name!r} is not prepared in {os.fspath(builder.data_dir)!r}"
        + ("." if offline else ", and attnflax does not download by default "
           "(config.data.download=False).")
    ]
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual:
        manual_dir = _manual_dir(builder)
        lines.append(f"It needs a MANUAL download first: put its files in {manual_dir!r}.")
        lines += ["    " + line.strip() for line in manual.strip().splitlines()]
    lines += [
        "Either:",
        "  * prepare it once (needs network"
        + (", after the manual download" if manual else "")
        + "):",
        f'      python -c "import tensorflow_datasets as tfds; '
        f'tfds.builder({name!r}{dir_arg}).download_and_prepare()"',
        "    (or re-run with --config.data.download=True"
        + (", where the network reaches storage.googleapis.com" if offline else "") + ");",
        "  * point --config.data.data_dir=<dir> at a directory holding a prepared copy "
        f"(<dir>/{builder.name}/<version>/);",
        "  * or use an embedded dataset, which needs no network: "
        f"--config.data.dataset={digits.NAME} (or {mnist5k.NAME}, {cluttered.NAME}).",
    ]
    return "\n".join(lines)


def _serves_without_files(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether `builder.as_dataset` works although nothing is prepared on disk.

    True under `tfds.testing.mock_data`, which patches ``as_dataset`` (and makes
    ``download_and_prepare`` a no-op) but not ``is_prepared``: the standard way to test a
    TFDS pipeline then works with an unmodified config (``download=False``). For a real
    missing dataset TFDS's ``as_dataset`` raises its "could not find data" AssertionError
    at once (it only checks that the directory exists), and the caller gives its own
    message. A directory that exists but holds no valid copy is never taken as served.
    """
    if tf.io.gfile.exists(os.fspath(builder.data_dir)):
        return False
    try:
        builder.as_dataset(split=None)  # Lazy: no record is read.
    except AssertionError:
        return False
    return True


# Where `download_and_prepare` goes first (TFDS's bucket of prepared copies), probed
# with a short timeout before any download: unreachable, TFDS would retry for minutes.
DOWNLOAD_PROBE_HOSTS = (("storage.googleapis.com", 443),)
DOWNLOAD_PROBE_TIMEOUT_S = 3.0


def _reachable(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to ``host:port`` opens within `timeout` seconds, else why not.

    The name lookup runs in a daemon thread so that a hanging resolver cannot stall the
    caller past `timeout` either.
    """
    import socket
    import threading

    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(str(err) or type(err).__name__)

    thread = threading.Thread(target=connect, daemon=True, name="attnflax-network-probe")
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _manual_dir(builder: tfds.core.DatasetBuilder) -> str:
    return os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def _download_and_prepare(name: str, builder: tfds.core.DatasetBuilder,
                          data_dir: str | None) -> None:
    """``builder.download_and_prepare()``, failing within seconds when there is no network.

    Without the probe, ``download_and_prepare`` with no network retries for minutes
    (TFDS's GCS checks and HTTP retries) before it fails. A dataset whose manual download
    is already in place is prepared offline (no GCS look-up) when the probe fails.

    Raises:
      DatasetNotPreparedError: the download host cannot be reached (and no manual files).
    """
    problems = []
    for host, port in DOWNLOAD_PROBE_HOSTS:
        why = _reachable(host, port, DOWNLOAD_PROBE_TIMEOUT_S)
        if why is None:
            builder.download_and_prepare()
            return
        problems.append(f"{host}:{port}: {why}")
    manual = _manual_dir(builder)
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and tf.io.gfile.isdir(manual) \
            and tf.io.gfile.listdir(manual):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        return
    raise DatasetNotPreparedError(
        f"Cannot download TFDS dataset {name!r}: no network ({'; '.join(problems)}).\n"
        + _not_prepared_message(name, builder, data_dir, offline=True))


def _prepare_embedded(
    builder: tfds.core.DatasetBuilder, name: str, data_dir: str | None
) -> tfds.core.DatasetBuilder:
    """Prepares an embedded dataset offline; tolerates another process doing it at once.

    The package data it is built from is checked first (a missing file is a
    `mnist5k.PackageDataError` before anything is written); TFDS writes into a temporary
    ``incomplete.*`` folder that it renames only when every split is written and removes
    on any error, so a failed preparation leaves no half-written dataset behind.
    """
    if builder.name in (mnist5k.NAME, cluttered.NAME):
        mnist5k.load_arrays()
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    except Exception:
        # Several processes sharing a data dir may race; if one finished, use its copy.
        fresh = tfds.builder(name, data_dir=data_dir)
        if not fresh.is_prepared():
            raise
        return fresh
    return builder


class TfdsSource(Source):
    """A TFDS dataset by name, through `tfds.builder(...).as_dataset`."""

    def __init__(self, config: ml_collections.ConfigDict):
        name = config.dataset
        try:
            builder = tfds.builder(name, data_dir=config.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(_unknown_dataset_message(name)) from None
        except ValueError as err:  # e.g. an unknown builder config ('name/config')
            if name.split("/")[0] not in EMBEDDED_DATASETS:
                raise
            raise DataError(f"Bad dataset {name!r}: {err}") from None
        if not builder.is_prepared():
            if builder.name in EMBEDDED_DATASETS:
                builder = _prepare_embedded(builder, name, config.data_dir)
            elif _serves_without_files(builder):
                pass  # `tfds.testing.mock_data` (or another as_dataset override) serves it.
            elif config.download:
                _download_and_prepare(name, builder, config.data_dir)
            else:
                raise DatasetNotPreparedError(_not_prepared_message(name, builder, config.data_dir))
        self.builder = builder
        features = builder.info.features
        keys = set(features.keys())
        image = features["image"] if "image" in keys else None
        label = features["label"] if "label" in keys else None
        if not isinstance(image, tfds.features.Image) or not isinstance(
            label, tfds.features.ClassLabel
        ):
            raise DataError(
                f"{name!r} is not an image-classification dataset: attnflax needs an 'image' "
                f"(tfds.features.Image) and a 'label' (ClassLabel) feature; it has "
                f"{sorted(features.keys())}."
            )
        if image.np_dtype != tf.uint8.as_numpy_dtype:
            raise DataError(f"{name!r} stores {image.np_dtype} images; only uint8 is supported")
        self.encoded = True  # uint8 Image features are stored as PNG/JPEG files.
        stored = image.shape[-1]
        self.stored_channels = stored if stored in (1, 3) else None
        shape = _image_shape(name, config, tuple(image.shape))
        mean, std = normalization(name, shape[-1], config.mean, config.std)
        names = tuple(label.names) if label.names else None
        self.info = DatasetInfo(
            name=name,
            num_classes=int(label.num_classes),
            image_shape=shape,
            split_sizes={k: int(v.num_examples) for k, v in builder.info.splits.items()},
            class_names=names,
            mean=mean,
            std=std,
        )

    def _process_split(self, split: str, process_index: int, process_count: int):
        if process_count == 1:
            return split
        return tfds.split_for_jax_process(
            split, process_index=process_index, process_count=process_count
        )

    def shard_sizes(self, split: str, process_count: int) -> tuple[int, ...]:
        if not self.builder.info.splits:  # Sizes unknown (e.g. mocked): count.
            return tuple(_count(self.read(split, i, process_count)) for i in range(process_count))
        splits = self.builder.info.splits
        try:
            return tuple(
                int(splits[self._process_split(split, i, process_count)].num_examples)
                for i in range(process_count)
            )
        except (KeyError, ValueError) as err:
            raise DataError(
                f"Bad split {split!r} for {self.info.name!r} ({err}). Its splits are "
                f"{sorted(self.info.split_sizes)}; TFDS slicing such as 'train[:90%]' works."
            ) from None

    def read(self, split: str, process_index: int, process_count: int) -> tf.data.Dataset:
        sub = self._process_split(split, process_index, process_count)
        if self.builder.info.splits and self.builder.info.splits[sub].num_examples == 0:
            # A split smaller than the process count leaves some processes nothing,
            # which TFDS refuses to read ("corresponds to no data").
            return tf.data.Dataset.from_tensor_slices(
                {"image": tf.constant([], tf.string), "label": tf.constant([], tf.int64)}
            )
        return self.builder.as_dataset(
            split=sub,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False),
        )


def _count(ds: tf.data.Dataset) -> int:
    """Number of elements of a finite dataset (cardinality if known, else by reading it)."""
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def _list_images(directory: str) -> list[str]:
    """Image files (by `IMAGE_EXTENSIONS`) directly under `directory`, sorted."""
    paths = (os.path.join(directory, f) for f in tf.io.gfile.listdir(directory))
    return sorted(
        p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS) and not tf.io.gfile.isdir(p)
    )


class ImageFolderSource(Source):
    """Images in ``root/<split>/<class>/<file>``, through `tfds.folder_dataset.ImageFolder`.

    Labels are the sorted class-folder names over all splits. The order of a split is
    ImageFolder's fixed (seeded) shuffle of its files. Images of any size and of 1-4
    channels are decoded by attnflax (not by ImageFolder, whose decoder assumes one
    channel count), converted to `num_channels` and resized to `image_size`.

    Corrupt files: a file that cannot be decoded stops the pipeline with a
    `CorruptImageError` naming every undecodable file of the split (found by a scan run
    only after a decode failure). Nothing is skipped silently: skipping would change the
    split sizes that exact evaluation relies on.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        if not config.data_dir:
            raise DataError(
                f"config.data.dataset={IMAGE_FOLDER!r} needs --config.data.data_dir=<root>, a "
                "folder laid out as <root>/<split>/<class>/<image file>."
            )
        root = os.path.expanduser(os.fspath(config.data_dir))
        if not tf.io.gfile.isdir(root):
            raise DataError(f"Image folder {root!r} does not exist or is not a directory.")
        try:
            builder = tfds.folder_dataset.ImageFolder(root)
        except tf.errors.OpError as err:
            raise DataError(f"Cannot read image folder {root!r}: {err.message}") from None
        self.root = root
        self.builder = builder
        self.max_pixels = config.get("max_image_pixels", MAX_IMAGE_PIXELS)
        self._checked: set[str] = set()
        self.encoded = True
        self.stored_channels = None  # Any mix of gray, RGB, RGBA files.
        sizes = {k: int(v.num_examples) for k, v in builder.info.splits.items()}
        if not any(sizes.values()):
            raise DataError(
                f"No images found in image folder {root!r}: expected files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)} under {root}/<split>/<class>/ "
                f"(found split folders: {sorted(sizes) or 'none'})."
            )
        if config.image_size is None:
            raise DataError(
                "Image folders hold images of any size: set config.data.image_size, "
                "e.g. --config.data.image_size='(64, 64)'."
            )
        shape = _image_shape(root, config, (None, None, config.num_channels or 3))
        mean, std = normalization(IMAGE_FOLDER, shape[-1], config.mean, config.std)
        names = tuple(builder.info.features["label"].names)
        self.info = DatasetInfo(
            name=IMAGE_FOLDER,
            num_classes=len(names),
            image_shape=shape,
            split_sizes=sizes,
            class_names=names,
            mean=mean,
            std=std,
        )

    def _split_size(self, split: str) -> int:
        sizes = self.info.split_sizes
        if split not in sizes:
            raise DataError(
                f"Split {split!r} is not a folder of image folder {self.root!r}; its splits are "
                f"{sorted(sizes)} (image folders take whole split names, no slicing)."
            )
        if sizes[split] == 0:
            raise DataError(f"Split {split!r} of image folder {self.root!r} holds no images.")
        return sizes[split]

    def shard_sizes(self, split: str, process_count: int) -> tuple[int, ...]:
        n = self._split_size(split)
        return tuple(len(range(i, n, process_count)) for i in range(process_count))

    def _files(self, split: str) -> list[str]:
        split_dir = os.path.join(self.root, split)
        paths = []
        for label in sorted(tf.io.gfile.listdir(split_dir)):
            label_dir = os.path.join(split_dir, label.rstrip("/"))
            if tf.io.gfile.isdir(label_dir):
                paths += _list_images(label_dir)
        return paths

    def check_files(self, split: str, decode: bool = False) -> None:
        """Checks every file of `split` before anything trains on it.

        Always (cheap, constant memory): each header is read and its declared size
        checked against ``config.max_image_pixels``; files Pillow cannot identify are
        then decoded by TensorFlow (as the pipeline would) to tell odd from corrupt.
        With `decode` (the trainer's eval split): every file is decoded once, as the
        pipeline would, to find files that are corrupt past their header.

        Raises:
          ImageTooLargeError: a file over the pixel budget (never decoded).
          CorruptImageError: files that cannot be decoded (all of them, named).
        """
        self._split_size(split)
        paths = self._files(split)
        unknown = []
        for path in paths:
            if "://" not in path:  # Local files: Pillow reads the header only.
                header = check_image_header(path, path, self.max_pixels)
            else:
                with tf.io.gfile.GFile(path, "rb") as f:
                    header = check_image_header(f, path, self.max_pixels)
            if header is None:
                unknown.append(path)
        suspect = decode
        for path in unknown:
            try:
                decode_image(tf.io.read_file(path), 3)
            except tf.errors.OpError:
                suspect = True
                break
        bad = self.find_corrupt(split) if suspect else []  # Name every bad file at once.
        if len(bad) == 1:
            raise CorruptImageError(
                f"Image file {bad[0][0]} (split {split!r} of {self.root!r}) cannot be decoded "
                f"({bad[0][1]}); remove or replace it.", (bad[0][0],))
        if bad:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
            raise CorruptImageError(
                f"{len(bad)} image file(s) in split {split!r} of {self.root!r} cannot be "
                f"decoded; remove or replace them:\n{listing}", tuple(p for p, _ in bad))

    def read(self, split: str, process_index: int, process_count: int) -> tf.data.Dataset:
        self._split_size(split)
        if split not in self._checked:  # Pixel budget before any file is decoded.
            self.check_files(split)
            self._checked.add(split)
        ds = self.builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        return ds.shard(process_count, process_index) if process_count > 1 else ds

    def find_corrupt(self, split: str) -> list[tuple[str, str]]:
        """Every file of `split` that cannot be read or decoded, with TF's reason."""
        bad = []
        split_dir = os.path.join(self.root, split)
        for label in sorted(tf.io.gfile.listdir(split_dir)):
            label_dir = os.path.join(split_dir, label)
            if not tf.io.gfile.isdir(label_dir):
                continue
            for path in _list_images(label_dir):
                try:
                    decode_image(tf.io.read_file(path), 3)
                except tf.errors.OpError as err:
                    bad.append((path, err.message.strip().splitlines()[-1]))
        return bad

    def explain_error(self, error: Exception, split: str) -> Exception | None:
        if not isinstance(error, tf.errors.OpError):
            return None
        bad = self.find_corrupt(split)
        if not bad:
            return None
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        return CorruptImageError(
            f"{len(bad)} image file(s) in split {split!r} of {self.root!r} cannot be decoded; "
            f"remove or replace them:\n{listing}",
            tuple(path for path, _ in bad),
        )


def open_source(config: ml_collections.ConfigDict) -> Source:
    """The `Source` for ``config.dataset`` (preparing an embedded dataset if needed)."""
    if config.dataset == IMAGE_FOLDER:
        return ImageFolderSource(config)
    return TfdsSource(config)
