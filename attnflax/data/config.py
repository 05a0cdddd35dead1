"""The data config (`default_config`) and the checks on batch sizes against devices/processes."""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from attnflax.data.errors import DataError


def default_config() -> ml_collections.ConfigDict:
    """Returns the data config with its defaults (the embedded digits, no augmentation).

    Optional keys are `config_dict.placeholder`s: they read as ``None`` but can still be
    overridden from the command line (``--config.data.image_size='(32, 32)'``); a plain
    ``None`` field cannot.

    Keys:
      dataset: A TFDS image-classification dataset with ``image`` and ``label`` features
        (``'cifar10'``, ``'mnist'``, ``'imagenet2012'``, ...), ``'attnflax_digits'`` (the
        embedded default, prepared on first use with no network) or ``'image_folder'``.
      data_dir: The TFDS data dir (``None``: TFDS's default, ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``); for ``'image_folder'`` the folder laid out as
        ``data_dir/<split>/<class>/<image file>``.
      train_split, eval_split: Split names; TFDS slicing (``'train[:90%]'``) works for TFDS
        datasets, image folders take the folder names only.
      batch_size, eval_batch_size: GLOBAL batch sizes; each process gets
        ``batch_size // process_count`` examples per batch.
      image_size: ``(height, width)`` every image is resized to (bilinear, antialiased); ``None``
        keeps the dataset's own size (an error for datasets whose images vary in size,
        and for image folders).
      num_channels: 1 or 3; gray is replicated to RGB, RGB goes to luma, alpha is dropped.
        ``None``: the dataset's own channels (3 for image folders).
      augment.crop_padding: Train only: pad by this many zero pixels per side, then take a
        random crop of the original size (0 = off).
      augment.flip: Train only: random horizontal flip.
      shuffle_buffer: Shuffle buffer of the train pipeline, capped at the shard size (a
        buffer at least the shard size is a full uniform shuffle of every epoch; 1 turns
        shuffling off).
      seed: Seeds the train order and augmentation (nothing else is random).
      train_sharding: How processes share the train split. ``'global'``: every process
        reads the whole split in one seeded order and takes its slice of each global
        batch, so the global batches (and the trained model) are the same for any
        number of processes. ``'process'``: each process reads only its own shard
        (``tfds.split_for_jax_process``) and shuffles it; the batches then depend on
        the process count. Use it for datasets too large for every host to read.
      mean, std: Per-channel normalisation override of ``(x / 255 - mean) / std``; ``None``
        uses the table `attnflax.data.NORMALIZATION`, or 0.5 / 0.5 for other datasets.
      cache: Keep decoded, resized uint8 images in memory: ``None`` (auto) caches when a
        process's shard takes at most `cache_max_bytes`.
      cache_max_bytes: The auto-cache limit in bytes.
      max_image_pixels: Image folders: a file whose header declares more pixels than
        this is refused before it is decoded (decompression bombs; 50 MP is far above
        real photos).
      download: Allow TFDS to download and prepare a missing dataset (network, may take
        long). ``False``: a missing dataset is an error saying how to get it.
      num_threads: Size of the tf.data thread pool (``None``: TF's default, all cores).
    """
    config = ml_collections.ConfigDict()
    config.dataset = "attnflax_digits"
    config.data_dir = config_dict.placeholder(str)
    config.train_split = "train"
    config.eval_split = "test"
    config.batch_size = 128
    config.eval_batch_size = 256
    config.image_size = config_dict.placeholder(tuple)
    config.num_channels = config_dict.placeholder(int)
    config.augment = ml_collections.ConfigDict({"crop_padding": 0, "flip": False})
    config.shuffle_buffer = 10_000
    config.seed = 0
    config.train_sharding = "global"
    config.mean = config_dict.placeholder(tuple)
    config.std = config_dict.placeholder(tuple)
    config.cache = config_dict.placeholder(bool)
    config.cache_max_bytes = 1 << 30
    config.max_image_pixels = 50_000_000
    config.download = False
    config.num_threads = config_dict.placeholder(int)
    return config


def _suggest(value: int, multiple: int) -> str:
    """Names the multiples of `multiple` nearest to `value` (at least `multiple`)."""
    low = max(multiple, value // multiple * multiple)
    high = max(multiple, -(-value // multiple) * multiple)
    if low == high or value < multiple:
        return f"e.g. {high}"
    return f"e.g. {low} or {high}"


def check_batch_size(name: str, value: int, num_devices: int, process_count: int) -> None:
    """Checks that a global batch size splits evenly over devices and processes.

    Args:
      name: The config key, for the message (``'batch_size'``).
      value: The global batch size.
      num_devices: Devices over all processes.
      process_count: Number of processes.

    Raises:
      DataError: If `value` is smaller than `num_devices` or not a multiple of both
        `num_devices` and `process_count`; the message names sizes that would work.
    """
    if num_devices < 1 or process_count < 1:
        raise DataError(f"num_devices={num_devices} and process_count={process_count} must be >= 1")
    multiple = math.lcm(num_devices, process_count)
    if value >= num_devices and value % multiple == 0:
        return
    problems = []
    if value < num_devices:
        problems.append(f"smaller than the {num_devices} devices")
    if value % num_devices:
        problems.append(f"not divisible by the {num_devices} devices")
    if value % process_count:
        problems.append(f"not divisible by the {process_count} processes")
    raise DataError(
        f"config.data.{name}={value} is {' and '.join(problems)}: it is the GLOBAL batch size "
        f"and must be a positive multiple of {multiple} here ({_suggest(value, multiple)})."
    )


def check_batch_sizes(
    config: ml_collections.ConfigDict, num_devices: int, process_count: int
) -> None:
    """Checks `config.batch_size` and `config.eval_batch_size` with `check_batch_size`."""
    check_batch_size("batch_size", config.batch_size, num_devices, process_count)
    check_batch_size("eval_batch_size", config.eval_batch_size, num_devices, process_count)
