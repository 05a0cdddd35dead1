r"""Baseline: the plain CNN on the embedded digits, same budget as ``digits.py``.

Command::

    python -m attnflax.main --config=experiments/configs/digits_cnn.py --workdir=runs/digits_cnn

Hardware: any CPU (measured on a shared 2-core CPU, one JAX device); no network.

Identical to ``digits.py`` (data, augmentation, optimiser, schedule, epochs, seed)
except the model: ``cnn`` has no attention block.

Expected result (measured 2026-11-24 on the shared 2-core CPU, load ~7, 1 device, seed 0):
**99.72 % test accuracy (359/360)**, 674 steps in 17 s of training at ~2,700 images/s,
compile 5.6 s, 29 s for the whole job. Seeds 0, 1, 2: 99.72 / 100 / 100 %, mean
99.91 ± 0.16 % (the attention CNN of ``digits.py``: 99.81 ± 0.32 %, 4-5x slower per image
on CPU).
"""

import ml_collections

from attnflax.configs import recipes


def get_config() -> ml_collections.ConfigDict:
    """``digits.py``'s recipe with ``model='cnn'``."""
    return recipes.small_cnn("attnflax_digits", "cnn", batch_size=64, eval_batch_size=360,
                             crop_padding=1, epochs=30, warmup_epochs=2, eval_every_epochs=20)
