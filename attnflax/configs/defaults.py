"""Every key of the training config with its default; imports only ``ml_collections``.

`train_config` is the full training config (`attnflax.train.default_config`), with the
data config of `data_config` (`attnflax.data.default_config`) under ``data``.

Durations come in any unit. Each of the five durations of a run can be given in steps,
in epochs of the train split or in examples (big_vision's ``u.steps``), by the key of
that unit (`DURATIONS`)::

    config.num_epochs = 30                 # or num_train_steps / num_train_examples
    config.warmup_epochs = 2               # or warmup_steps / warmup_examples
    config.eval_every_epochs = 10          # or eval_every_steps / eval_every_examples
    config.checkpoint_every_steps = 500    # or checkpoint_every_epochs / ..._examples
    config.log_every_steps = 100           # or log_every_epochs / log_every_examples

The keys left unset are ``None``. Setting a duration in one unit, with `set_duration` or
an override (``--config.num_epochs=2``, `attnflax.cli.override`, compare's rows), unsets
its other units, so ``--config.num_train_steps=5`` shortens any config to five steps and
``--config.num_epochs=2`` lengthens one that counts steps. Where a config still holds
several units of one duration, steps win over examples and examples over epochs. With
none set a duration takes its `FALLBACK`. The trainer turns them into steps
(`attnflax.train.config.durations`) and prints them when it starts.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# duration -> its keys in steps, examples, epochs (the order of precedence).
DURATIONS: dict[str, tuple[str, str, str]] = {
    "train": ("num_train_steps", "num_train_examples", "num_epochs"),
    "warmup": ("warmup_steps", "warmup_examples", "warmup_epochs"),
    "log": ("log_every_steps", "log_every_examples", "log_every_epochs"),
    "eval": ("eval_every_steps", "eval_every_examples", "eval_every_epochs"),
    "checkpoint": ("checkpoint_every_steps", "checkpoint_every_examples",
                   "checkpoint_every_epochs"),
}
# In steps, for a duration none of whose keys is set (training length: none; an error).
FALLBACK: dict[str, int] = {"warmup": 0, "log": 50, "eval": 0, "checkpoint": 500}


def duration_units(key: str) -> tuple[str, ...]:
    """The keys of the duration `key` is a unit of (``'num_epochs'`` ->
    ``('num_train_steps', 'num_train_examples', 'num_epochs')``); ``()`` for other keys."""
    return next((keys for keys in DURATIONS.values() if key in keys), ())


def set_duration(config: ml_collections.ConfigDict, key: str, value: float | None) -> None:
    """``config[key] = value``, and a duration's other units unset when `value` is not None
    (a duration is given in one unit at a time; see the module docstring)."""
    config[key] = value
    if value is not None:
        for other in duration_units(key):
            if other != key:
                config[other] = None


# Image files declaring more pixels are refused before decoding (decompression bombs).
MAX_IMAGE_PIXELS = 50_000_000


def data_config() -> ml_collections.ConfigDict:
    """The data config with its defaults (the embedded digits, no augmentation).

    Optional keys are `config_dict.placeholder`s: they read as ``None`` but can still be
    overridden from the command line (``--config.data.image_size='(32, 32)'``); a plain
    ``None`` field cannot.

    Keys:
      dataset: A TFDS image-classification dataset with ``image`` and ``label`` features
        (``'cifar10'``, ``'mnist'``, ``'imagenet2012'``, ...), ``'attnflax_digits'`` (the
        embedded default, prepared on first use with no network), ``'attnflax_mnist5k'``,
        ``'attnflax_cluttered'`` or ``'image_folder'``.
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
    config.max_image_pixels = MAX_IMAGE_PIXELS
    config.download = False
    config.num_threads = config_dict.placeholder(int)
    return config


def train_config() -> ml_collections.ConfigDict:
    """The full training config with its defaults (experiment configs start from it).

    Keys:
      seed: Seeds parameter initialisation and the step keys (the data order has
        its own ``data.seed``).
      data: The data config (`data_config`): dataset, splits, GLOBAL ``batch_size`` and
        ``eval_batch_size``, augmentation, ...
      model: A name from ``attnflax.models.list_models()``.
      model_kwargs: Extra keyword arguments of the model (e.g. ``attention='local'``).
      attention_implementation: Kernel of the attention layers (``'xla'``, ``'chunked'``,
        ``'cudnn'``, ``'pallas'``; None: the best for the backend and shape). Not part of
        the model's identity: a run may resume with another kernel.
      dtype: Compute dtype, ``'float32'`` or ``'bfloat16'`` (parameters, optimiser
        state, logits and loss stay float32).
      optimizer: ``'adamw'`` (decoupled weight decay) or ``'sgd'`` (momentum, L2
        weight decay added to the gradient).
      learning_rate: Peak learning rate, reached after the warm-up.
      end_learning_rate_factor: Final learning rate as a fraction of the peak.
      momentum, nesterov: SGD momentum (also Adam's ``b1`` for ``adamw``) and Nesterov.
      adam_b2: Adam's ``b2``.
      weight_decay: Weight decay on leaves named ``kernel`` only.
      grad_clip_norm: Clip gradients to this global norm (0: off).
      label_smoothing: Label smoothing of the train cross-entropy (eval: none).
      num_train_steps / num_train_examples / num_epochs: The training length (default
        10 epochs).
      warmup_steps / warmup_examples / warmup_epochs: Linear warm-up of the learning rate
        from 0 (capped at the run length), then cosine decay to the end (default 1 epoch).
      log_every_steps / _examples / _epochs: Train-metric (and console) interval (default
        50 steps).
      eval_every_steps / _examples / _epochs: Evaluation interval (0 or unset: only at
        the end).
      checkpoint_every_steps / _examples / _epochs: Checkpoint interval (0: only at the
        end and on SIGTERM; default 500 steps).
      grad_accum_steps: Micro-batches per step (the global batch must divide by
        ``grad_accum_steps * devices``).
      num_devices: Devices in the mesh (-1: all).
      fsdp: Shard large parameters and optimiser moments over ``data``.
      keep_checkpoints: How many recent checkpoints to keep.
      keep_best_checkpoints: How many of the best (by eval accuracy) to keep besides.
      async_checkpointing: Write checkpoints in the background.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data_config()
    c.model = "attention_cnn"
    c.model_kwargs = ml_collections.ConfigDict()
    c.attention_implementation = config_dict.placeholder(str)
    c.dtype = "float32"
    c.optimizer = "adamw"
    c.learning_rate = 1e-3
    c.end_learning_rate_factor = 0.0
    c.momentum = 0.9
    c.nesterov = False
    c.adam_b2 = 0.999
    c.weight_decay = 1e-4
    c.grad_clip_norm = 1.0
    c.label_smoothing = 0.0
    for steps, examples, epochs in DURATIONS.values():
        c[steps] = config_dict.placeholder(int)
        c[examples] = config_dict.placeholder(int)
        c[epochs] = config_dict.placeholder(float)
    c.num_epochs = 10.0
    c.warmup_epochs = 1.0
    c.grad_accum_steps = 1
    c.num_devices = -1
    c.fsdp = False
    c.keep_checkpoints = 2
    c.keep_best_checkpoints = 1
    c.async_checkpointing = True
    return c
