"""Train and eval input pipelines: config -> per-process numpy batches.

Batches are dicts of numpy arrays, local to this process::

    {'image': float32 [B_local, h, w, c] normalised, 'label': int32 [B_local],
     'mask': bool [B_local]}

with ``B_local = global_batch_size // process_count``. Turning them into global
`jax.Array`s (``jax.make_array_from_process_local_data``) is the training code's job.

Train (`create_train_iterator`): an infinite, deterministic stream. With
``train_sharding='global'`` (the default) every process reads the whole split as one
"shard" and builds the same global batches, then keeps its slice of each
(``[p * B_local, (p + 1) * B_local)``): the batches do not depend on the process
count. With ``'process'`` each process reads only its own shard and batches it alone.
Epoch ``e`` of the shard is shuffled with a seed derived from ``(config.seed, reader, e)``
(``reader`` = 0 for 'global', the process index for 'process'); the stream of epochs is
cut into batches with ``drop_remainder=True`` (a batch may span two epochs, so no
example is dropped). Augmentation is vectorised over each batch and draws from a
stateless seed derived from ``(config.seed, reader, step)``, so it does not depend on
thread timing. Resuming at step ``K`` therefore only has to start at element
``K * B`` of the stream and number its batches from ``K``: whole epochs are skipped by
starting the epoch counter at ``K * B // shard_size``, and only the remainder is read
and dropped (at most one epoch of records, never decoded or augmented).

Eval (`create_eval_iterator`): every example of the split exactly once over all
processes. Each process holds its shard (`attnflax.data.sources`); all processes run
``ceil(max_shard_size / B_local)`` batches, the tail filled with ``mask=False``
all-zero examples, so multi-host collectives never wait on a process that has stopped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from attnflax.data import preprocess
from attnflax.data.config import check_batch_size
from attnflax.data.errors import DataError
from attnflax.data.sources import DatasetInfo, Source, open_source

Batch = dict[str, np.ndarray]

# Purpose tags folded into the seed so that shuffling and augmentation draw from
# independent streams.
_SHUFFLE_TAG = 1
_AUGMENT_TAG = 2
_MAX_EPOCHS = 1 << 40


def _prepare_fn(source: Source, info: DatasetInfo) -> Callable:
    """`preprocess.prepare` for `source`'s examples: decoded, converted and resized to
    `info`'s image shape (uint8)."""
    return functools.partial(preprocess.prepare, size=info.image_shape[:2],
                             channels=info.image_shape[2], encoded=source.encoded,
                             stored_channels=source.stored_channels)


def _configure_tf() -> None:
    """Keeps TensorFlow off the accelerators (they belong to JAX); a no-op once TF has started."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; nothing to do.
        pass


def _resolve_processes(
    num_devices: int | None, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """Fills in JAX's device/process numbers and checks them."""
    num_devices = jax.device_count() if num_devices is None else int(num_devices)
    process_count = jax.process_count() if process_count is None else int(process_count)
    process_index = jax.process_index() if process_index is None else int(process_index)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(
            f"process_index={process_index} must lie in [0, process_count={process_count})"
        )
    return num_devices, process_index, process_count


def _options(config: ml_collections.ConfigDict) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if config.num_threads:
        options.threading.private_threadpool_size = int(config.num_threads)
    return options


def _map(ds: tf.data.Dataset, fn, parallel: bool = True) -> tf.data.Dataset:
    """`ds.map(fn)`, deterministic, without AutoGraph (our functions branch in Python only
    on static values and use `tf.cond` otherwise; AutoGraph would just add tracing time)."""
    fn = tf.autograph.experimental.do_not_convert(fn)
    if not parallel:
        return ds.map(fn)
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _should_cache(config: ml_collections.ConfigDict, num_examples: int, shape: tuple) -> bool:
    """Caches decoded uint8 images in memory if asked, or (auto) if they fit the limit."""
    if config.cache is not None:
        return bool(config.cache)
    return num_examples * math.prod(shape) <= config.cache_max_bytes


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """The `DatasetInfo` of ``config.dataset`` (preparing the embedded digits if needed).

    Raises:
      DataError: Unknown dataset, dataset not prepared, empty image folder, etc.
    """
    _configure_tf()
    return open_source(config).info


def train_start(start_step: int, local_batch_size: int, shard_size: int) -> tuple[int, int]:
    """Where step `start_step` begins in a process's stream: ``(epoch, offset in epoch)``."""
    if start_step < 0:
        raise DataError(f"start_step must be >= 0, got {start_step}")
    return divmod(start_step * local_batch_size, shard_size)


def build_train_dataset(
    config: ml_collections.ConfigDict,
    source: Source,
    process_index: int,
    process_count: int,
    start_step: int = 0,
) -> tf.data.Dataset:
    """The infinite train `tf.data.Dataset` of one process (see the module docstring).

    Returns:
      Dataset of batches ``{'image': float32 [B, h, w, c], 'label': int32 [B],
      'mask': bool [B]}``, ``B = config.batch_size // process_count``.
    """
    info = source.info
    split = config.train_split
    sharding = config.get("train_sharding", "global")
    if sharding not in ("global", "process"):
        raise DataError(
            f"config.data.train_sharding={sharding!r} must be 'global' or 'process'.")
    local_batch = config.batch_size // process_count
    # The reader's view: the whole split (global) or this process's shard (process).
    reader, readers = (0, 1) if sharding == "global" else (process_index, process_count)
    stream_batch = config.batch_size if sharding == "global" else local_batch
    sizes = source.shard_sizes(split, readers)
    shard_size = sizes[reader]
    if shard_size == 0:
        raise DataError(
            f"Train split {split!r} has {sum(sizes)} examples, too few for "
            f"{process_count} processes: process {process_index} would get none."
        )
    start_epoch, offset = train_start(start_step, stream_batch, shard_size)
    prepare = _prepare_fn(source, info)
    root = tf.constant([config.seed, 0], tf.int64)
    crop, flip = int(config.augment.crop_padding), bool(config.augment.flip)
    cached = _should_cache(config, shard_size, info.image_shape)

    def select(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = prepare(ex["image"]) if cached else ex["image"]
        return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    base = _map(source.read(split, reader, readers), select, parallel=cached)
    if cached:
        base = base.cache()
    buffer = max(1, min(int(config.shuffle_buffer), shard_size))

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        key = preprocess.fold_seed(root, _SHUFFLE_TAG, reader, e)
        seed = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
        return base.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)

    def finish(step: tf.Tensor, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        key = preprocess.fold_seed(root, _AUGMENT_TAG, reader, step)
        images = preprocess.augment_batch(batch["image"], key, crop, flip)
        mine = slice(0, local_batch)
        if stream_batch != local_batch:  # 'global': this process's rows of the batch.
            mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
        return {
            "image": preprocess.normalize(images[mine], info.mean, info.std),
            "label": batch["label"][mine],
            "mask": tf.ones([local_batch], tf.bool),
        }

    epochs = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS)
    ds = epochs.flat_map(tf.autograph.experimental.do_not_convert(epoch)).skip(offset)
    if not cached:
        ds = _map(ds, lambda ex: {**ex, "image": prepare(ex["image"])})
    ds = ds.batch(stream_batch, drop_remainder=True).enumerate(start=start_step)
    ds = _map(ds, finish)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(config))


def eval_batches_for(shard_sizes: tuple[int, ...], local_batch_size: int) -> int:
    """Batches every process runs so that the largest shard fits: ``ceil(max / B_local)``."""
    return -(-max(shard_sizes) // local_batch_size)


def build_eval_dataset(
    config: ml_collections.ConfigDict,
    source: Source,
    split: str,
    process_index: int,
    process_count: int,
) -> tuple[tf.data.Dataset, int]:
    """One process's padded eval dataset and its number of batches (equal on all processes).

    Returns:
      ``(dataset, num_batches)``; the dataset yields `num_batches` batches
      ``{'image': float32 [B, h, w, c], 'label': int32 [B], 'mask': bool [B]}``
      (``B = config.eval_batch_size // process_count``); padding examples have
      ``mask=False``, label 0 and an all-zero image.
    """
    info = source.info
    local_batch = config.eval_batch_size // process_count
    sizes = source.shard_sizes(split, process_count)
    num_batches = eval_batches_for(sizes, local_batch)
    shard_size = sizes[process_index]
    prepare = _prepare_fn(source, info)
    ds = source.read(split, process_index, process_count)
    ds = _map(
        ds,
        lambda ex: {
            "image": prepare(ex["image"]),
            "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(True),
        },
    )
    if _should_cache(config, shard_size, info.image_shape):
        ds = ds.cache()
    # Fails loudly (at the end of the shard) if the data disagree with the metadata.
    ds = ds.apply(tf.data.experimental.assert_cardinality(shard_size))
    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros(info.image_shape, tf.uint8),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(False),
        }
    ).repeat(num_batches * local_batch - shard_size)
    ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)

    def finish(b: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = preprocess.normalize(b["image"], info.mean, info.std)
        image = image * tf.cast(b["mask"], tf.float32)[:, None, None, None]
        return {"image": image, "label": b["label"], "mask": b["mask"]}

    ds = _map(ds, finish)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(config)), num_batches


def _iterate(ds: tf.data.Dataset, source: Source, split: str) -> Iterator[Batch]:
    """Numpy batches of `ds`, with read failures explained by the source (corrupt files)."""
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as err:
            better = source.explain_error(err, split)
            if better is None:
                raise
            raise better from err
        yield batch


class TrainIterator(Iterator[Batch]):
    """The infinite train stream of one process, with its dataset's metadata.

    Attributes:
      info: The `DatasetInfo`.
      local_batch_size: Examples per batch on this process.
      dataset: The underlying `tf.data.Dataset`.
    """

    def __init__(self, dataset: tf.data.Dataset, source: Source, split: str, local_batch: int):
        self.dataset = dataset
        self.info = source.info
        self.local_batch_size = local_batch
        self._batches = _iterate(dataset, source, split)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)


class EvalIterable:
    """One process's eval batches of a split; each ``iter()`` walks the split once.

    Attributes:
      info: The `DatasetInfo`.
      split: The split.
      num_batches: Batches per walk; the same on every process (also ``len()``).
      local_batch_size: Examples per batch on this process.
      dataset: The underlying `tf.data.Dataset`.
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        source: Source,
        split: str,
        num_batches: int,
        local_batch: int,
    ):
        self.dataset = dataset
        self.info = source.info
        self.split = split
        self.num_batches = num_batches
        self.local_batch_size = local_batch
        self._source = source

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        return _iterate(self.dataset, self._source, self.split)


def create_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
) -> TrainIterator:
    """The infinite, deterministic train batches of this process.

    Args:
      config: A data config (`default_config`).
      num_devices: Devices over all processes (default ``jax.device_count()``).
      process_index, process_count: This process and how many there are (default JAX's).
      start_step: Resume here: the first batch is the one an uninterrupted iterator
        would yield as its `start_step`-th (counting from 0).

    Returns:
      A `TrainIterator` of ``{'image': float32 [B, h, w, c], 'label': int32 [B],
      'mask': bool [B]}`` with ``B = config.batch_size // process_count`` and all masks
      True.

    Raises:
      DataError: Bad dataset or batch size (the message says what would work).
    """
    _configure_tf()
    num_devices, process_index, process_count = _resolve_processes(
        num_devices, process_index, process_count
    )
    check_batch_size("batch_size", config.batch_size, num_devices, process_count)
    source = open_source(config)
    ds = build_train_dataset(config, source, process_index, process_count, start_step)
    return TrainIterator(ds, source, config.train_split, config.batch_size // process_count)


def create_eval_iterator(
    config: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    num_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterable:
    """This process's eval batches of `split` (default ``config.eval_split``), re-iterable.

    Over all processes, the ``mask=True`` examples are the split, each exactly once, and
    every process yields the same number of batches (`EvalIterable.num_batches`).

    Args:
      config: A data config (`default_config`).
      split: The split to walk (TFDS slicing such as ``'test[:7]'`` works for TFDS data).
      num_devices: Devices over all processes (default ``jax.device_count()``).
      process_index, process_count: This process and how many there are (default JAX's).

    Returns:
      An `EvalIterable` of ``{'image': float32 [B, h, w, c], 'label': int32 [B],
      'mask': bool [B]}`` with ``B = config.eval_batch_size // process_count``.
    """
    _configure_tf()
    num_devices, process_index, process_count = _resolve_processes(
        num_devices, process_index, process_count
    )
    check_batch_size("eval_batch_size", config.eval_batch_size, num_devices, process_count)
    split = split or config.eval_split
    source = open_source(config)
    ds, num_batches = build_eval_dataset(config, source, split, process_index, process_count)
    return EvalIterable(ds, source, split, num_batches, config.eval_batch_size // process_count)


def num_eval_batches(
    config: ml_collections.ConfigDict, split: str | None = None, process_count: int | None = None
) -> int:
    """How many batches `create_eval_iterator` yields on every process."""
    _configure_tf()
    process_count = jax.process_count() if process_count is None else int(process_count)
    check_batch_size("eval_batch_size", config.eval_batch_size, 1, process_count)
    source = open_source(config)
    sizes = source.shard_sizes(split or config.eval_split, process_count)
    return eval_batches_for(sizes, config.eval_batch_size // process_count)


def num_examples(config: ml_collections.ConfigDict, split: str | None = None) -> int:
    """Examples in `split` (default ``config.train_split``); TFDS slicing such as
    ``'train[:90%]'`` works. Read from the metadata, except where TFDS does not know the
    sizes (mocked data), where the split is counted."""
    _configure_tf()
    return sum(open_source(config).shard_sizes(split or config.train_split, 1))
