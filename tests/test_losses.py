"""Tests of :mod:`attnflax.losses`."""

import jax.numpy as jnp
import numpy as np
import optax

from attnflax import losses


def test_cross_entropy_per_example_with_smoothing_in_float32():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], jnp.bfloat16)
    labels = jnp.asarray([0, 2])
    got = losses.cross_entropy(logits, labels)
    assert got.dtype == jnp.float32 and got.shape == (2,)
    want = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    smooth = losses.cross_entropy(logits, labels, label_smoothing=0.3)
    targets = optax.smooth_labels(jnp.eye(3)[labels], 0.3)
    np.testing.assert_allclose(
        smooth, optax.softmax_cross_entropy(logits.astype(jnp.float32), targets), rtol=1e-6)
