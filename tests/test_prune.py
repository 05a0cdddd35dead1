"""Tests of `attnflax.analysis.prune`: exact global magnitude pruning and fixed-mask fine-tuning."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attnflax import parallel
from attnflax.analysis import prune
from attnflax.nn import LocalCosineSelfAttention2D


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> local cosine attention -> mean pool -> Dense."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = x + LocalCosineSelfAttention2D(
            num_heads=2, window=3, out_kernel_init=nn.initializers.lecun_normal()
        )(x)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def _toy_batches(seed: int = 0, batch: int = 16, size: int = 6):
    """Endless batches of a learnable toy task: the class is the brightest third."""
    rng = np.random.default_rng(seed)
    while True:
        x = rng.normal(size=(batch, size, size, 1)).astype(np.float32)
        labels = rng.integers(0, 3, size=batch)
        for i, c in enumerate(labels):
            x[i, :, 2 * c : 2 * c + 2] += 2.0
        yield {"image": x, "label": labels.astype(np.int32), "mask": np.ones(batch, bool)}


@pytest.fixture(scope="module")
def tiny():
    model = TinyNet()
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
    return model, jax.tree_util.tree_map(np.asarray, dict(variables))


def _random_params(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 5)), "bias": rng.normal(size=5)},
        "dense": {"kernel": rng.normal(size=(7, 3)), "bias": rng.normal(size=3)},
        "attn": {"query": {"kernel": rng.normal(size=(5, 2, 3))}, "log_scale": np.ones(2)},
    }
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 0.95, 0.333])
def test_achieved_sparsity_matches_request(sparsity):
    params = _random_params()
    pruned = prune.apply_masks(params, prune.magnitude_masks(params, sparsity))
    report = prune.sparsity_report(pruned)
    assert report.total == 90 + 21 + 30
    # Exact by construction; the requirement is "within one weight per tensor".
    assert abs(report.zeros - sparsity * report.total) <= len(report.per_tensor)
    assert report.zeros == round(sparsity * report.total)
    # Only kernels are pruned, and the survivors are the largest magnitudes overall.
    np.testing.assert_array_equal(pruned["conv"]["bias"], params["conv"]["bias"])
    np.testing.assert_array_equal(pruned["attn"]["log_scale"], params["attn"]["log_scale"])
    kernels = [p for p in jax.tree_util.tree_leaves_with_path(params) if prune.is_prunable(*p)]
    mags = np.concatenate([np.abs(x).ravel() for _, x in kernels])
    kept = np.concatenate([
        np.asarray(x).ravel() for p, x in jax.tree_util.tree_leaves_with_path(pruned)
        if prune.is_prunable(p, x)
    ]) != 0
    if 0 < report.zeros < report.total:
        assert mags[~kept].max() <= mags[kept].min()


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_lamp_masks_are_global_exact_and_keep_every_tensor(sparsity):
    params = _random_params()
    params["dense"]["kernel"] *= 1e-3  # plain magnitude would prune this tensor first
    masks = prune.magnitude_masks(params, sparsity, criterion="lamp")
    report = prune.sparsity_report(prune.apply_masks(params, masks))
    assert report.zeros == round(sparsity * report.total)
    for name, (zeros, size) in report.per_tensor.items():
        assert zeros < size, name  # each tensor's largest weight scores 1 (3 tensors <= kept)
    plain = prune.sparsity_report(prune.apply_masks(params, prune.magnitude_masks(params, 0.5)))
    assert plain.per_tensor["dense/kernel"][0] == 21  # ... while plain magnitude empties it
    # Within a tensor LAMP keeps the largest magnitudes.
    w, m = np.abs(params["conv"]["kernel"]), masks["conv"]["kernel"]
    if m.any() and (~m).any():
        assert w[~m].max() <= w[m].min()


def test_lamp_scores():
    w = np.array([[3.0, -1.0], [0.0, 2.0]])
    np.testing.assert_allclose(prune.lamp_scores(w), [[1.0, 1 / 14], [0.0, 4 / 13]])
    assert prune.lamp_scores(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_masks_nest_when_pruning_further():
    params = _random_params()
    for criterion in prune.CRITERIA:
        first = prune.magnitude_masks(params, 0.5, criterion)
        pruned = prune.apply_masks(params, first)
        second = prune.magnitude_masks(pruned, 0.8, criterion)
        for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second),
                        strict=True):
            assert not np.any(b & ~a)  # nothing pruned before comes back
    with pytest.raises(ValueError, match="unknown pruning criterion 'l1'"):
        prune.magnitude_masks(params, 0.5, "l1")


def test_sparsity_zero_is_identity(tiny):
    _, variables = tiny
    params = variables["params"]
    same = prune.apply_masks(params, prune.magnitude_masks(params, 0.0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, params)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_out_of_range_sparsity_is_an_error(bad):
    with pytest.raises(ValueError, match="sparsity"):
        prune.magnitude_masks(_random_params(), bad)


def test_params_without_kernels_is_an_error():
    with pytest.raises(ValueError, match="kernel"):
        prune.magnitude_masks({"bias": np.ones(3)}, 0.5)


def test_pruned_weights_stay_zero_after_finetune(tiny):
    model, variables = tiny
    masks = prune.magnitude_masks(variables["params"], 0.7)
    # AdamW with weight decay and momentum would revive pruned weights without masking.
    tx = optax.adamw(3e-2, weight_decay=0.1)
    new, losses = prune.masked_finetune(model, variables, masks, _toy_batches(), tx,
                                        num_steps=25)
    names = prune.prunable_names(masks)
    flat_masks = jax.tree_util.tree_leaves_with_path(masks)
    old = jax.tree_util.tree_leaves(variables["params"])
    new_leaves = jax.tree_util.tree_leaves(new["params"])
    kernels = [
        (m, o, n) for (p, m), o, n in zip(flat_masks, old, new_leaves, strict=True)
        if prune.is_prunable(p, m)
    ]
    for path, (m, w_old, w_new) in zip(names, kernels, strict=True):
        w_new = np.asarray(w_new)
        assert np.all(w_new[~m] == 0), path
        # The surviving weights did train.
        assert not np.allclose(w_new[m], np.asarray(w_old)[m]), path
    assert prune.sparsity_report(new["params"]).zeros >= round(
        0.7 * prune.sparsity_report(new["params"]).total
    )
    # Batch statistics are updated in train mode, and the toy task is learned.
    assert not np.allclose(new["batch_stats"]["BatchNorm_0"]["mean"],
                           variables["batch_stats"]["BatchNorm_0"]["mean"])
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_masked_optimizer_zeroes_updates_even_with_momentum():
    params = {"kernel": jnp.ones((4,)), "bias": jnp.ones((2,))}
    masks = {"kernel": np.array([True, False, True, False]), "bias": np.ones(2, bool)}
    tx = prune.masked(optax.sgd(0.1, momentum=0.9), masks)
    state = tx.init(params)
    grads = {"kernel": jnp.ones((4,)), "bias": jnp.ones((2,))}
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        np.testing.assert_array_equal(np.asarray(updates["kernel"])[[1, 3]], 0.0)
        assert np.all(np.asarray(updates["kernel"])[[0, 2]] < 0)


class FlatDense(nn.Module):
    """Dense(3) on the flattened image."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(x.reshape(len(x), -1))


def test_finetune_needs_enough_batches():
    variables = {"params": {"Dense_0": {"kernel": jnp.ones((36, 3)), "bias": jnp.zeros(3)}}}
    masks = prune.magnitude_masks(variables["params"], 0.5)
    batches = [next(_toy_batches())]
    with pytest.raises(ValueError, match="ran out after 1 of 3"):
        prune.masked_finetune(FlatDense(), variables, masks, batches, optax.sgd(0.1), 3)


def test_finetune_is_the_trainers_step_on_every_device():
    """The fine-tune runs the trainer's sharded step: on 1 device or 4 (the batch split
    over them), and with gradient accumulation, the same losses and weights."""
    model = FlatDense()
    variables = {"params": jax.tree.map(np.asarray, model.init(
        jax.random.key(0), jnp.zeros((1, 6, 6, 1)))["params"])}
    masks = prune.magnitude_masks(variables["params"], 0.5)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    runs = []
    for devices, accum in ((1, 1), (4, 1), (4, 2)):
        mesh = parallel.create_mesh(devices)
        step = prune.make_finetune_step(model, tx, mesh=mesh, grad_accum_steps=accum)
        runs.append(prune.masked_finetune(model, variables, masks, _toy_batches(), tx, 4,
                                          step=step, mesh=mesh))
    for new, losses in runs[1:]:
        np.testing.assert_allclose(losses, runs[0][1], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     new["params"], runs[0][0]["params"])
    kernel = np.asarray(runs[0][0]["params"]["Dense_0"]["kernel"])
    assert np.all(kernel[~np.asarray(masks["Dense_0"]["kernel"])] == 0)


def test_compressed_size_falls_with_sparsity(tmp_path):
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(64, 64)).astype(np.float32)}}
    sizes = [
        prune.compressed_size(prune.apply_masks(params, prune.magnitude_masks(params, s)))
        for s in (0.0, 0.5, 0.9)
    ]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[0] <= prune.dense_size(params) * 1.05
    # The in-memory size is the size of the file on disk.
    path = tmp_path / "p.npz"
    pruned = prune.apply_masks(params, prune.magnitude_masks(params, 0.9))
    prune.save_compressed(str(path), pruned)
    assert path.stat().st_size == sizes[2]
    np.testing.assert_array_equal(np.load(path)["dense/kernel"], pruned["dense"]["kernel"])
