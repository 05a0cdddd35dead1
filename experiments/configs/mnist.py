r"""MNIST: the attention CNN (local 3x3 cosine attention) on 28x28 digits.

Command::

    python -m attnflax.main --config=experiments/configs/mnist.py --workdir=runs/mnist

Data: TFDS ``mnist`` must be prepared first (``tfds build mnist`` with network, or
``--config.data.download=True``, or ``--config.data.data_dir`` pointing at a copy).

Hardware: one GPU (or a few CPU cores: about an hour; not measured).

Expected result: not yet measured (the small-CNN family typically reaches
about 99.2-99.4 % test accuracy on MNIST in 10 epochs).
"""

import ml_collections

from attnflax import train


def get_config(model: str = "attention_cnn") -> ml_collections.ConfigDict:
    """The MNIST recipe; ``model`` is ``'attention_cnn'`` (default) or ``'cnn'``."""
    config = train.default_config()
    config.data.dataset = "mnist"
    config.data.batch_size = 128
    config.data.eval_batch_size = 500
    config.data.augment.crop_padding = 2
    config.model = model
    if model == "attention_cnn":
        config.model_kwargs = ml_collections.ConfigDict(
            {"attention": "local", "window": (3, 3), "num_heads": 4, "num_blocks": 1}
        )
    config.optimizer = "adamw"
    config.learning_rate = 2e-3
    config.weight_decay = 5e-2
    config.label_smoothing = 0.1
    config.num_epochs = 10.0
    config.warmup_epochs = 0.5
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
    return config
