"""Tests of :mod:`attnflax.pytree`: leaf names and the ``kernel`` convention."""

import jax
import numpy as np

from attnflax import pytree, train
from attnflax.analysis import prune


def test_path_names_of_dicts_sequences_and_attributes():
    tree = {"Conv_0": {"kernel": 1, "bias": 2}, "stack": [3, (4,)]}
    names = [pytree.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert names == ["Conv_0/bias", "Conv_0/kernel", "stack/0", "stack/1/0"]
    state = train.TrainState(step=0, params={"w": 1}, batch_stats={}, opt_state=(), rng=0)
    names = [pytree.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert names == ["step", "params/w", "rng"]


def test_kernel_leaves_get_weight_decay_and_are_pruned():
    params = {"Dense_0": {"kernel": np.ones((2, 3)), "bias": np.ones(3)},
              "attention": {"log_scale": np.ones(2)}}
    assert train.weight_decay_mask(params) == {
        "Dense_0": {"kernel": True, "bias": False}, "attention": {"log_scale": False}}
    assert prune.prunable_names(params) == ["Dense_0/kernel"]
    assert not pytree.is_kernel(())
