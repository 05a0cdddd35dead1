r"""CIFAR-100: ResNet-20 with a global cosine-attention block in its last stage.

Command::

    python -m attnflax.main --config=experiments/configs/cifar100.py --workdir=runs/cifar100

Data: TFDS ``cifar100`` must be prepared first (``tfds build cifar100`` with
network, or ``--config.data.download=True``, or ``--config.data.data_dir``).

Hardware: one GPU (about the cost of ``cifar10.py``; not measured).

Recipe: ``cifar10.py``'s (SGD + Nesterov, lr 0.1, 200 cosine epochs, weight decay
5e-4, crop + flip) on 100 classes.

Expected result: not yet measured (plain ResNet-20 is typically around 68-69 % on
CIFAR-100; wider or deeper ResNets do much better: ``--config.model_kwargs.depth=56``).
"""

import ml_collections

from attnflax.configs import recipes


def get_config(stage_attention: str = "none,none,block") -> ml_collections.ConfigDict:
    """``cifar10.py``'s recipe on ``cifar100``."""
    return recipes.resnet_sgd("cifar100", "resnet", stage_attention, attention="global",
                              depth=20, epochs=200, warmup_epochs=5, crop_padding=4)
