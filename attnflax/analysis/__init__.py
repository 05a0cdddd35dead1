"""Analyses of trained models, for the experiment scripts (no I/O of their own).

- `attnflax.analysis.prune`: global magnitude / LAMP pruning with fixed masks, and the
  masked fine-tune (the trainer's step with a masked optimiser).
- `attnflax.analysis.robustness`: corruptions (noise, blur, contrast) and FGSM/PGD
  attacks in pixel space, applied to the batches of the one masked evaluation.
"""
