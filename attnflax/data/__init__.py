"""TFDS input pipelines for attnflax (layer 3): config -> per-process numpy batches.

    from attnflax import data
    config = data.default_config()                  # the embedded digits by default
    info = data.get_dataset_info(config)             # num_classes, image_shape, ...
    train = data.create_train_iterator(config)       # infinite, deterministic, resumable
    for batch in data.create_eval_iterator(config):  # each example exactly once, + mask
        ...

Importing this package registers the embedded TFDS dataset ``attnflax_digits``
(`attnflax.data.digits`), so ``tfds.load('attnflax_digits')`` works too.
"""

from attnflax.data import digits
from attnflax.data.config import check_batch_size, check_batch_sizes, default_config
from attnflax.data.errors import CorruptImageError, DataError, DatasetNotPreparedError
from attnflax.data.pipeline import (
    EvalIterable,
    TrainIterator,
    create_eval_iterator,
    create_train_iterator,
    get_dataset_info,
    num_eval_batches,
    num_examples,
)
from attnflax.data.sources import IMAGE_FOLDER, NORMALIZATION, DatasetInfo

__all__ = [
    "IMAGE_FOLDER",
    "NORMALIZATION",
    "CorruptImageError",
    "DataError",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "EvalIterable",
    "TrainIterator",
    "check_batch_size",
    "check_batch_sizes",
    "create_eval_iterator",
    "create_train_iterator",
    "default_config",
    "digits",
    "get_dataset_info",
    "num_eval_batches",
    "num_examples",
]
