r"""Fashion-MNIST: the attention CNN (local 3x3 cosine attention) on 28x28 clothing.

Command::

    python -m attnflax.main --config=experiments/configs/fashion_mnist.py \
        --workdir=runs/fashion_mnist

Data: TFDS ``fashion_mnist`` must be prepared first (``tfds build fashion_mnist``
with network, or ``--config.data.download=True``, or ``--config.data.data_dir``).

Hardware: one GPU (not measured on CPU).

Expected result: not yet measured (small CNNs of this size typically reach about
92-93 % test accuracy in 30 epochs).
"""

import ml_collections

from attnflax import train


def get_config(model: str = "attention_cnn") -> ml_collections.ConfigDict:
    """The Fashion-MNIST recipe; ``model`` is ``'attention_cnn'`` (default) or ``'cnn'``."""
    config = train.default_config()
    config.data.dataset = "fashion_mnist"
    config.data.batch_size = 128
    config.data.eval_batch_size = 500
    config.data.augment.crop_padding = 2
    config.data.augment.flip = True
    config.model = model
    if model == "attention_cnn":
        config.model_kwargs = ml_collections.ConfigDict(
            {"attention": "local", "window": (3, 3), "num_heads": 4, "num_blocks": 1}
        )
    config.optimizer = "adamw"
    config.learning_rate = 2e-3
    config.weight_decay = 5e-2
    config.label_smoothing = 0.1
    config.num_epochs = 30.0
    config.warmup_epochs = 1.0
    config.log_every_steps = 100
    config.eval_every_steps = 2340
    config.checkpoint_every_steps = 2340
    return config
