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

from attnflax.configs import recipes


def get_config(model: str = "attention_cnn") -> ml_collections.ConfigDict:
    """The Fashion-MNIST recipe; ``model`` is ``'attention_cnn'`` (default) or ``'cnn'``."""
    return recipes.small_cnn("fashion_mnist", model, batch_size=128, eval_batch_size=500,
                             crop_padding=2, flip=True, epochs=30, warmup_epochs=1,
                             eval_every_epochs=5)
