"""Configs as light modules: the defaults and the shared recipes of the experiment configs.

Importing this package (or its modules) imports only ``ml_collections``: a config file
under ``experiments/configs/`` builds its dict without TensorFlow, TFDS, JAX or Orbax.

- `attnflax.configs.defaults`: every key of the training and data configs with its
  default (`train_config`, `data_config`), and the durations that can be given in
  steps, epochs or examples (`DURATIONS`).
- `attnflax.configs.recipes`: the recipes the experiment configs share (the small CNN on
  digit-like datasets, the embedded MNIST benchmarks, ResNets trained with SGD).
"""
