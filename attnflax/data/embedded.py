"""What the embedded datasets (digits, mnist5k, cluttered) share: their split rule and
how their normalisation constants are computed."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed split of every embedded dataset:
    ``train_test_split(arange(n), test_size=0.2, stratify=labels, random_state=0)``.

    Returns:
      ``{'train': int64 [0.8 n], 'test': int64 [0.2 n]}``, indices in the order
      scikit-learn returns them.
    """
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    return {"train": train, "test": test}


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """``(mean, std)`` over all pixels of ``uint8 images / 255`` (float64)."""
    x = np.asarray(images).astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())
