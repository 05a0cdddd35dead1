r"""Cluttered MNIST: the five comparison models on the embedded ``attnflax_cluttered``.

Command::

    python -m attnflax.main --config=experiments/configs/cluttered.py --workdir=runs/cluttered
    python -m attnflax.main --config=experiments/configs/cluttered.py:cnn \
        --workdir=runs/cluttered_cnn
    # the multi-seed comparison of the five models (see README, "Experiments"):
    python experiments/compare.py --config=experiments/configs/cluttered.py \
        --out=runs/compare_cluttered

Data: ``attnflax_cluttered`` (default config ``half20``): a real MNIST digit of
``attnflax_mnist5k`` (2x2-mean downscaled to 14x14) at a random position on a 20x20 canvas
with 6 random 4x4 crops of other digits of the same split as clutter -- the 40x40
cluttered-MNIST task at half resolution (see `attnflax/data/cluttered.py` for why).
8,000 train canvases (2 per train digit) / 1,000 test (1 per test digit, built only from
test digits), 800 / 100 per class, prepared offline in a few seconds on first use. No
augmentation (the digit is already at a random position). ``--config.data.dataset=
attnflax_cluttered/full40`` is the same task at full resolution (about 4x the compute;
global attention at 1,600 tokens is ~15 s per step on 2 CPU cores).

Hardware: any CPU (measured on the shared 2-core CPU, one JAX device); no network.

Models and recipe: as ``mnist5k.py`` (argument after ``:``, default ``attention_local``;
AdamW 2e-3, batch 64, here 300 steps = 2.4 epochs, set by the CPU budget of the
comparison, the same for every model, not tuned). Attention
placement: the small CNN's block runs on its 20x20x64 map before the pool (400 tokens for
global attention); ResNet-20's global blocks run after stages 2 and 3 (10x10 and 5x5).

Expected result (measured 2026-12-01 on the shared 2-core CPU, load 6-8, 1 device; the
``compare.py`` command above, seeds 0, 1, 2, test accuracy on the 1,000 test canvases):

====================  ==============  ========  ===========  =================
model (``:arg``)      test acc %      params    mult-adds    train img/s, wall
====================  ==============  ========  ===========  =================
cnn                   48.37 +- 1.10    85,066    7.15 M      393, 71 s
attention_local       56.80 +- 0.26   101,874   16.07 M      106, 207 s
attention_global      60.07 +- 0.78   107,922   36.08 M       58, 354 s
resnet20              75.37 +- 2.83   272,186   13.94 M      362, 74 s
resnet20_attention    59.27 +- 3.50   295,018   15.77 M      333, 90 s
====================  ==============  ========  ===========  =================

The whole comparison took 41 min 37 s. The default (``attention_local``, seed 0) alone:
56.50 % (565/1000), ~3.5 min. All
models are far from converged at 300 steps (2.4 epochs); the numbers answer "which model
does best for this CPU budget", not "which is best when trained to convergence".
"""

import ml_collections

from attnflax.configs import recipes

MODELS = recipes.BENCHMARK_MODELS


def get_config(model: str = "attention_local") -> ml_collections.ConfigDict:
    """The cluttered-MNIST recipe for one of `MODELS` (default ``attention_local``)."""
    return recipes.mnist_benchmark("attnflax_cluttered", model, crop_padding=0,
                                   eval_batch_size=200, placement="before_pool", steps=300,
                                   warmup_epochs=0.25)
