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

from attnflax.configs import recipes


def get_config(model: str = "attention_cnn") -> ml_collections.ConfigDict:
    """The MNIST recipe; ``model`` is ``'attention_cnn'`` (default) or ``'cnn'``."""
    return recipes.small_cnn("mnist", model, batch_size=128, eval_batch_size=500,
                             crop_padding=2, epochs=10, warmup_epochs=0.5, eval_every_epochs=5)
