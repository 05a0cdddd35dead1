"""Input corruptions and adversarial attacks (FGSM, PGD) in pixel space.

**Pixel space.** The model sees normalised inputs ``x_norm = (x - mean) / std`` where
``x = uint8 / 255`` lies in ``[0, 1]``. Every function here works on ``x`` in ``[0, 1]``
(shape ``[batch, height, width, channels]``): corruptions are defined on real pixels, and an
attack's budget ε is an L∞ distance **in [0, 1] pixel units** (ε = 8/255 means "8 grey
levels"), whatever the dataset's std. Attacks take the gradient of a loss that normalises
*inside* (:func:`pixel_loss_fn`), so no conversion of ε by the std is needed; the result
is projected onto the ε-ball around the clean image and clipped to ``[0, 1]``.

Convert a batch from the data pipeline with :func:`to_pixels` (clipped to ``[0, 1]``) and
back with :func:`to_model_input`. Clean accuracy in a robustness table is measured on
``to_model_input(to_pixels(x_norm))`` — the same path every attacked input takes — so
ε = 0 reproduces it exactly.

No I/O; all randomness comes from explicit keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnflax.ops.attention import is_tracer

Array = jax.Array
LossFn = Callable[[Array, Array], Array]  # (pixels [b,h,w,c], labels [b]) -> scalar
LogitsFn = Callable[[Array], Array]  # pixels [b,h,w,c] -> logits [b, classes]


# --------------------------------------------------------------------------- #
# Pixel space <-> model input.                                                #
# --------------------------------------------------------------------------- #


def to_pixels(x_norm: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
    """Undoes the pipeline's normalisation: ``clip(x_norm * std + mean, 0, 1)``.

    Args:
      x_norm: float ``[..., c]``, normalised images.
      mean, std: Length-c (or length-1) per-channel constants used by the pipeline.

    Returns:
      float32 ``[..., c]`` in ``[0, 1]``.
    """
    x = jnp.asarray(x_norm, jnp.float32) * jnp.asarray(std, jnp.float32)
    return jnp.clip(x + jnp.asarray(mean, jnp.float32), 0.0, 1.0)


def to_model_input(x: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
    """``(x - mean) / std``: pixels in ``[0, 1]`` to what the model was trained on."""
    return (jnp.asarray(x, jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
        std, jnp.float32
    )


def pixel_logits_fn(
    apply_fn: Callable[..., Array],
    variables: Any,
    mean: Sequence[float],
    std: Sequence[float],
) -> LogitsFn:
    """Logits as a function of pixels in ``[0, 1]`` (normalisation inside).

    Args:
      apply_fn: ``model.apply``, called as ``apply_fn(variables, x_norm, train=False)``.
      variables: The model variables.
      mean, std: The pipeline's normalisation constants.

    Returns:
      ``f(x [b, h, w, c]) -> float32 logits [b, classes]``.
    """

    def logits(x: Array) -> Array:
        out = apply_fn(variables, to_model_input(x, mean, std), train=False)
        return out.astype(jnp.float32)

    return logits


def pixel_loss_fn(logits_fn: LogitsFn) -> LossFn:
    """Summed cross-entropy of `logits_fn` — the loss the attacks ascend.

    A sum (not a mean) keeps each example's gradient independent of the batch size.
    """

    def loss(x: Array, labels: Array) -> Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(x), labels).sum()

    return loss


# --------------------------------------------------------------------------- #
# Corruptions (pixel space in, pixel space out).                              #
# --------------------------------------------------------------------------- #


def gaussian_noise(x: Array, sigma: float, key: Array) -> Array:
    """Adds i.i.d. ``N(0, sigma^2)`` noise per pixel and channel, clipped to ``[0, 1]``.

    Args:
      x: float ``[b, h, w, c]`` in ``[0, 1]``.
      sigma: Standard deviation in pixel units (``>= 0``).
      key: PRNG key.
    """
    _check_nonnegative("sigma", sigma)
    return jnp.clip(x + sigma * jax.random.normal(key, x.shape, jnp.float32), 0.0, 1.0)


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps of radius ``ceil(3 sigma)`` (``[1.]`` for sigma 0)."""
    _check_nonnegative("sigma", sigma)
    if sigma == 0:
        return np.ones(1, np.float32)
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(x: Array, sigma: float) -> Array:
    """Separable Gaussian blur with edge-replicating padding (keeps ``[0, 1]``).

    Args:
      x: float ``[b, h, w, c]`` in ``[0, 1]``.
      sigma: Blur standard deviation in pixels (``>= 0``; 0 is the identity).
    """
    taps = jnp.asarray(gaussian_kernel_1d(sigma))
    r = (taps.shape[0] - 1) // 2
    if r == 0:
        return jnp.asarray(x, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, w = x.shape[1], x.shape[2]
    rows = sum(taps[i] * xp[:, i : i + h, :, :] for i in range(2 * r + 1))
    return sum(taps[i] * rows[:, :, i : i + w, :] for i in range(2 * r + 1))


def contrast(x: Array, factor: float) -> Array:
    """Scales each image's deviation from its own mean: ``clip(m + factor (x - m), 0, 1)``.

    Args:
      x: float ``[b, h, w, c]`` in ``[0, 1]``.
      factor: ``>= 0``; below 1 lowers contrast (0 gives a flat grey image), 1 is the
        identity.
    """
    _check_nonnegative("factor", factor)
    m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return jnp.clip(m + factor * (x - m), 0.0, 1.0)


CORRUPTIONS: dict[str, Callable[..., Array]] = {
    "gaussian_noise": lambda x, level, key: gaussian_noise(x, level, key),
    "gaussian_blur": lambda x, level, key: gaussian_blur(x, level),
    "contrast": lambda x, level, key: contrast(x, level),
}
"""``name -> f(x, level, key)``; the level is sigma (noise, blur) or the contrast factor."""

DEFAULT_CORRUPTION_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.05, 0.1, 0.2, 0.3),
    "gaussian_blur": (0.5, 1.0),
    "contrast": (0.5, 0.3, 0.1),
}


def corrupt(name: str, x: Array, level: float, key: Array) -> Array:
    """Applies the corruption `name` (a key of `CORRUPTIONS`) at `level`.

    Raises:
      ValueError: On an unknown name (the known ones are listed) or a negative level.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}.")
    return CORRUPTIONS[name](x, level, key)


def _check_nonnegative(name: str, value: float) -> None:
    if is_tracer(value):
        return
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")


# --------------------------------------------------------------------------- #
# Attacks.                                                                    #
# --------------------------------------------------------------------------- #


def check_epsilon(eps: float) -> float:
    """Returns ε as a float after checking ``0 <= eps <= 1`` (pixel units).

    A traced ε (inside ``jit``) is passed through unchecked.

    Raises:
      ValueError: If ε is not a finite number in ``[0, 1]``.
    """
    if is_tracer(eps):
        return eps
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"epsilon must be a number in [0, 1]; got {eps!r}.") from None
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(
            "epsilon is an L-inf distance in [0, 1] pixel units (e.g. 8/255 = 0.031) and must "
            f"lie in [0, 1]; got {eps!r}."
        )
    return value


def project(x_adv: Array, x: Array, eps: float | Array) -> Array:
    """Projects onto the L∞ ball of radius `eps` around `x`, then clips to ``[0, 1]``.

    Clipping after projecting keeps the point inside the ball, since `x` itself is in
    ``[0, 1]``.
    """
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def fgsm(loss_fn: LossFn, x: Array, labels: Array, eps: float) -> Array:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x loss), 0, 1)``.

    Args:
      loss_fn: ``(pixels, labels) -> scalar`` (e.g. :func:`pixel_loss_fn`).
      x: float ``[b, h, w, c]`` clean pixels in ``[0, 1]``.
      labels: int ``[b]``.
      eps: L∞ budget in ``[0, 1]`` pixel units.

    Returns:
      float32 ``[b, h, w, c]`` with ``|x_adv - x|_inf <= eps``; equal to `x` when eps = 0.
    """
    eps = check_epsilon(eps)
    x = jnp.asarray(x, jnp.float32)
    grad = jax.grad(loss_fn)(x, labels)
    return project(x + eps * jnp.sign(grad), x, eps)


def pgd(
    loss_fn: LossFn,
    x: Array,
    labels: Array,
    eps: float,
    *,
    num_steps: int = 10,
    step_size: float | None = None,
    key: Array | None = None,
) -> Array:
    """Projected gradient descent (Madry et al.) on the L∞ ball, sign-gradient steps.

    Args:
      loss_fn: ``(pixels, labels) -> scalar``.
      x: float ``[b, h, w, c]`` clean pixels in ``[0, 1]``.
      labels: int ``[b]``.
      eps: L∞ budget in ``[0, 1]`` pixel units.
      num_steps: Ascent steps (``>= 1``).
      step_size: Per-step size; default ``2.5 * eps / num_steps``.
      key: If given, start from a uniform random point of the ball (random start);
        else from `x`.

    Returns:
      float32 ``[b, h, w, c]``, within ε of `x` in L∞ and inside ``[0, 1]``.
    """
    eps = check_epsilon(eps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
    alpha = 2.5 * eps / num_steps if step_size is None else step_size
    x = jnp.asarray(x, jnp.float32)
    x_adv = x
    if key is not None:
        x_adv = project(x + jax.random.uniform(key, x.shape, jnp.float32, -eps, eps), x, eps)
    grad_fn = jax.grad(loss_fn)

    def body(_, xa):
        return project(xa + alpha * jnp.sign(grad_fn(xa, labels)), x, eps)

    return jax.lax.fori_loop(0, num_steps, body, x_adv)


# --------------------------------------------------------------------------- #
# Perturbed eval batches.                                                     #
# --------------------------------------------------------------------------- #

Perturb = Callable[[Array, Array, Array], Array]  # (pixels, labels, key) -> pixels


def corruption_perturb(name: str, level: float) -> Perturb:
    """A jitted ``(pixels, labels, key) -> pixels`` applying corruption `name` at `level`.

    Raises:
      ValueError: On an unknown name or a bad level (checked now, not at the first call).
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}.")
    _check_nonnegative("level", level)
    if name == "gaussian_blur":  # the kernel size depends on the level: static
        return lambda x, labels, key: _blur_jit(x, float(level))
    return lambda x, labels, key: _corrupt_jit(name, x, level, key)


_blur_jit = jax.jit(gaussian_blur, static_argnums=1)
_corrupt_jit = jax.jit(corrupt, static_argnums=0)


ATTACKS = ("fgsm", "pgd")


def attack_perturb(
    loss_fn: LossFn, attack: str, eps: float, *, pgd_steps: int = 10, random_start: bool = True
) -> Perturb:
    """A jitted ``(pixels, labels, key) -> pixels`` running `attack` at budget `eps`.

    Args:
      loss_fn: ``(pixels, labels) -> scalar`` to ascend.
      attack: ``'fgsm'`` or ``'pgd'``.
      eps: L∞ budget in ``[0, 1]`` pixel units.
      pgd_steps: PGD iterations (step size ``2.5 eps / steps``).
      random_start: PGD starts from a random point of the ball (using the key).

    Raises:
      ValueError: On an unknown attack or ε outside ``[0, 1]`` (checked now).
    """
    eps = check_epsilon(eps)
    if attack == "fgsm":
        return lambda x, labels, key: _fgsm_jit(loss_fn, x, labels, eps)
    if attack == "pgd":
        if pgd_steps < 1:
            raise ValueError(f"pgd_steps must be >= 1; got {pgd_steps}.")
        return lambda x, labels, key: _pgd_jit(
            loss_fn, x, labels, eps, pgd_steps, key if random_start else None
        )
    raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}.")


# One compilation per (loss function, shapes): ε is traced, the loss function static.
_fgsm_jit = jax.jit(fgsm, static_argnums=0)
_pgd_jit = jax.jit(
    lambda loss_fn, x, labels, eps, num_steps, key: pgd(
        loss_fn, x, labels, eps, num_steps=num_steps, key=key
    ),
    static_argnums=(0, 4),
)


def perturbed_batches(
    batches: Iterable[Mapping[str, Any]],
    perturb: Perturb | None,
    mean: Sequence[float],
    std: Sequence[float],
    key: Array,
    stats: dict[str, float] | None = None,
) -> Iterator[dict[str, Any]]:
    """Eval batches whose images went through pixel space and `perturb` on the way.

    Each normalised image goes ``to_pixels`` -> ``perturb(pixels, labels, key_i)`` ->
    ``to_model_input``: the perturbation applied before the evaluation step (evaluate
    the result with `attnflax.restore.evaluate`, the trainer's masked evaluation). With
    `perturb` None the images only make the round trip, so ε = 0 reproduces "clean".

    Args:
      batches: Pipeline batches: ``image`` (normalised ``[b, h, w, c]``), ``label``,
        ``mask``.
      perturb: ``(pixels, labels, key) -> pixels``, or None.
      mean, std: The pipeline's normalisation constants.
      key: PRNG key, folded with the batch index (``key_i``).
      stats: If given, holds ``'max_linf'``: the largest ``|perturbed - clean|`` over the
        masked-in examples so far (pixel units).

    Yields:
      The batches with ``image`` replaced (float32 numpy, normalised).
    """
    if stats is not None:
        stats["max_linf"] = 0.0
    for i, batch in enumerate(batches):
        clean = to_pixels(jnp.asarray(batch["image"]), mean, std)
        labels = jnp.asarray(batch["label"])
        x = clean if perturb is None else perturb(clean, labels, jax.random.fold_in(key, i))
        if stats is not None:
            delta = jnp.abs(x - clean).reshape(x.shape[0], -1).max(axis=1)
            delta = jnp.where(jnp.asarray(batch["mask"]).astype(bool), delta, 0.0)
            stats["max_linf"] = max(stats["max_linf"], float(delta.max(initial=0.0)))
        yield {**batch, "image": np.asarray(to_model_input(x, mean, std))}


def limit_examples(
    batches: Iterable[Mapping[str, Any]], max_examples: int | None
) -> list[dict[str, Any]]:
    """The batches, with examples beyond the first `max_examples` real ones masked out.

    Batches after the limit are dropped. None keeps everything.

    Returns:
      A list of ``{'image', 'label', 'mask'}`` numpy batches.
    """
    out, seen = [], 0
    for batch in batches:
        if max_examples is not None and seen >= max_examples:
            break
        b = {k: np.asarray(v) for k, v in batch.items()}
        mask = b.get("mask", np.ones(len(b["label"]), bool)).astype(bool)
        if max_examples is not None:
            keep = np.cumsum(mask) + seen <= max_examples
            mask = mask & keep
        seen += int(mask.sum())
        out.append({**b, "mask": mask})
    return out


def parse_epsilon(text: str) -> float:
    """``'0.03'`` or ``'8/255'`` -> a checked ε (see :func:`check_epsilon`)."""
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"epsilon must be a number or a fraction like 8/255; got {text!r}."
        ) from None
    check_epsilon(value)
    return value
