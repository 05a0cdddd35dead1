"""Tests of `attnflax.analysis.robustness`: corruptions and FGSM/PGD in [0, 1] pixel space, and
their accuracy through the trainer's masked evaluation (`attnflax.restore.evaluate`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnflax import parallel, restore
from attnflax.analysis import robustness as rb

MEAN, STD = (0.3,), (0.4,)


def _linear_model(seed: int = 0, size: int = 6):
    """A fixed 2-class linear classifier on pixels and a data set it gets mostly right.

    For a linear two-class model a sign-gradient step lowers every example's margin, so
    FGSM can never turn a wrong prediction into a right one.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(size * size, 1)).astype(np.float32)
    w = np.concatenate([w, -w], axis=1)  # logits (z, -z)

    def apply_fn(variables, x_norm, train=False):
        del train
        return x_norm.reshape(x_norm.shape[0], -1) @ variables["w"]

    x = rng.uniform(size=(40, size, size, 1)).astype(np.float32)
    z = rb.to_model_input(x, MEAN, STD).reshape(40, -1) @ w[:, 0]
    labels = (np.asarray(z) < np.median(np.asarray(z))).astype(np.int32)
    labels[:6] = 1 - labels[:6]  # a few wrong ones
    return apply_fn, {"w": jnp.asarray(w)}, x, labels


class _Model:
    """A bare ``apply`` function as the model of a `restore.Trained`."""

    def __init__(self, apply_fn):
        self.apply = apply_fn


def _restored(apply_fn, variables):
    """The linear model as `restore.load_trained` gives a trained one (one device)."""
    return restore.Trained(_Model(apply_fn), variables, config=None, meta={"num_classes": 2},
                           step=0, workdir="", mesh=parallel.create_mesh(1))


def _accuracy(trained, batches, perturb, key, stats=None):
    """What experiments/robustness.py reports: the masked evaluation of perturbed batches."""
    return restore.evaluate(trained, rb.perturbed_batches(batches, perturb, MEAN, STD, key,
                                                          stats))["accuracy"]


def _batches(x, labels, batch=16):
    """Pipeline-style batches: normalised images, padded tail with a mask."""
    out = []
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], labels[i : i + batch]
        pad = batch - len(xb)
        mask = np.r_[np.ones(len(xb), bool), np.zeros(pad, bool)]
        xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], np.float32)])
        yb = np.concatenate([yb, np.zeros(pad, np.int32)])
        out.append({"image": np.asarray(rb.to_model_input(xb, MEAN, STD)), "label": yb,
                    "mask": mask})
    return out


def test_pixel_round_trip():
    x = np.random.default_rng(0).uniform(size=(2, 4, 4, 1)).astype(np.float32)
    back = rb.to_pixels(rb.to_model_input(x, MEAN, STD), MEAN, STD)
    np.testing.assert_allclose(back, x, atol=1e-6)
    assert float(rb.to_pixels(jnp.full((1, 1, 1, 1), 99.0), MEAN, STD).max()) == 1.0


def test_epsilon_zero_is_clean():
    apply_fn, variables, x, labels = _linear_model()
    loss = rb.pixel_loss_fn(rb.pixel_logits_fn(apply_fn, variables, MEAN, STD))
    for attack in rb.ATTACKS:
        xa = rb.attack_perturb(loss, attack, 0.0, pgd_steps=3)(x, labels, jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(xa), x)


def test_perturbation_within_epsilon():
    apply_fn, variables, x, labels = _linear_model()
    loss = rb.pixel_loss_fn(rb.pixel_logits_fn(apply_fn, variables, MEAN, STD))
    fgsm = jax.jit(lambda x, y, e: rb.fgsm(loss, x, y, e))
    pgd = jax.jit(lambda x, y, e, k: rb.pgd(loss, x, y, e, num_steps=5, step_size=e, key=k))
    for eps in (0.0, 1 / 255, 0.05, 0.2):
        for xa in (
            fgsm(x, labels, eps),
            rb.attack_perturb(loss, "pgd", eps, pgd_steps=3)(x, labels, jax.random.key(1)),
            pgd(x, labels, eps, jax.random.key(2)),
        ):
            xa = np.asarray(xa)
            assert np.abs(xa - x).max() <= eps + 1e-6, eps
            assert xa.min() >= 0.0 and xa.max() <= 1.0


def test_attacks_lower_accuracy_and_eps_zero_matches_clean():
    apply_fn, variables, x, labels = _linear_model()
    logits_fn = jax.jit(rb.pixel_logits_fn(apply_fn, variables, MEAN, STD))
    loss = rb.pixel_loss_fn(logits_fn)
    batches = _batches(x, labels)
    key = jax.random.key(0)
    trained = _restored(apply_fn, variables)
    clean = _accuracy(trained, batches, None, key)
    # The reference: the model applied directly to the pipeline's normalised batches.
    direct = sum(
        int(np.sum((np.argmax(apply_fn(variables, b["image"]), -1) == b["label"]) & b["mask"]))
        for b in batches
    ) / len(x)
    assert clean == direct
    assert 0.6 < clean < 1.0
    accs = {
        eps: _accuracy(trained, batches, rb.attack_perturb(loss, "fgsm", eps), key)
        for eps in (0.0, 0.02, 0.1)
    }
    assert accs[0.0] == clean
    assert accs[0.02] <= clean and accs[0.1] <= accs[0.02] and accs[0.1] < clean
    pgd_acc = _accuracy(trained, batches, rb.attack_perturb(loss, "pgd", 0.1, pgd_steps=3), key)
    assert pgd_acc <= accs[0.1]


@pytest.mark.parametrize("bad", [-0.01, 1.5, float("nan"), float("inf"), "big"])
def test_out_of_range_epsilon_is_an_error(bad):
    apply_fn, variables, x, labels = _linear_model()
    loss = rb.pixel_loss_fn(rb.pixel_logits_fn(apply_fn, variables, MEAN, STD))
    with pytest.raises(ValueError, match="epsilon"):
        rb.fgsm(loss, x, labels, bad)
    with pytest.raises(ValueError, match="epsilon"):
        rb.pgd(loss, x, labels, bad)
    with pytest.raises(ValueError, match="epsilon"):
        rb.attack_perturb(loss, "pgd", bad)


def test_unknown_attack_is_an_error():
    with pytest.raises(ValueError, match="unknown attack 'cw'.*fgsm, pgd"):
        rb.attack_perturb(lambda x, y: x.sum(), "cw", 0.1)


def test_corruptions():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(3, 8, 8, 2)).astype(np.float32))
    key = jax.random.key(0)

    def apply(name, level, images=x):
        return np.asarray(rb.corruption_perturb(name, level)(images, None, key))

    np.testing.assert_array_equal(apply("gaussian_noise", 0.0), x)
    np.testing.assert_array_equal(apply("gaussian_blur", 0.0), x)
    np.testing.assert_allclose(apply("contrast", 1.0), x, atol=1e-6)
    for name, levels in rb.DEFAULT_CORRUPTION_LEVELS.items():
        for level in levels:
            y = apply(name, level)
            assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, (name, level)
            assert not np.allclose(y, x), (name, level)
    noisy = apply("gaussian_noise", 0.1, jnp.full((1, 64, 64, 1), 0.5))
    assert abs(noisy.std() - 0.1) < 0.01
    # Blur keeps a constant image; contrast 0 is flat.
    np.testing.assert_allclose(apply("gaussian_blur", 1.0, jnp.full((3, 8, 8, 2), 0.7)), 0.7,
                               atol=1e-6)
    flat = apply("contrast", 0.0)
    np.testing.assert_allclose(flat, np.broadcast_to(flat[:, :1, :1, :1], flat.shape), atol=1e-6)
    assert rb.gaussian_kernel_1d(1.0).sum() == pytest.approx(1.0)


def test_bad_corruption_arguments():
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="unknown corruption 'fog'.*gaussian_noise"):
        rb.corrupt("fog", x, 0.1, jax.random.key(0))
    with pytest.raises(ValueError, match="sigma"):
        rb.corrupt("gaussian_noise", x, -0.1, jax.random.key(0))
    with pytest.raises(ValueError, match="factor"):
        rb.corrupt("contrast", x, float("nan"), jax.random.key(0))


def test_masked_examples_do_not_count():
    apply_fn, variables, x, _ = _linear_model()
    x = x[:3]
    preds = np.argmax(apply_fn(variables, rb.to_model_input(x, MEAN, STD)), -1)
    labels = np.asarray([preds[0], 1 - preds[1], preds[2]], np.int32)  # right, wrong, right
    batch = {"image": np.asarray(rb.to_model_input(x, MEAN, STD)), "label": labels,
             "mask": np.asarray([True, False, False])}
    trained = _restored(apply_fn, variables)
    stats = {}
    result = restore.evaluate(trained, rb.perturbed_batches(
        [batch], lambda px, y, k: px.at[1:].set(1.0 - px[1:]), MEAN, STD, jax.random.key(0),
        stats))
    assert (result["correct"], result["examples"]) == (1, 1)
    assert stats["max_linf"] == 0.0  # only the masked-out examples were changed
    with pytest.raises(ValueError, match="no examples"):
        restore.evaluate(trained, [])
