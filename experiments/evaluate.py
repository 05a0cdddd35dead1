r"""Evaluates a saved checkpoint: accuracy, per-class accuracy, confusion matrix, image grid.

::

    python experiments/evaluate.py --workdir=runs/digits              # best checkpoint
    python experiments/evaluate.py --workdir=runs/digits --step=1348 --split=train

The model, dataset and preprocessing come from the checkpoint's own ``meta`` item
(the config it was trained with), so nothing else needs to be given. Writes, into
``--outdir`` (default ``<workdir>/eval``):

* ``confusion_matrix_<split>.png`` -- rows: true class, columns: predicted class;
* ``predictions_<split>.png`` -- a grid of the first ``--num_images`` images with
  their true and predicted labels (wrong ones in red);
* ``mistakes_<split>.png`` -- the same for the first ``--num_images`` mistakes;
* ``eval_<split>.json`` -- accuracy, loss, per-class accuracy, the confusion matrix.

Single process (it gathers every prediction on the host); any number of local devices.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from attnflax import checkpoint, data, parallel, train, viz  # noqa: E402
from attnflax.restore import config_from_meta  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a script)."""
    flags.DEFINE_string("workdir", None, "A training workdir (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the best, else the latest).")
    flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval_split).")
    flags.DEFINE_string("outdir", None, "Where to write the PNGs and JSON "
                        "(default: <workdir>/eval).")
    flags.DEFINE_integer("num_images", 64, "Images in the prediction and mistake grids.")
    flags.DEFINE_integer("batch_size", None, "Eval batch size (default: the config's).")
    flags.mark_flag_as_required("workdir")


def load_checkpoint(workdir: str, step: int | None, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Restores a checkpoint of `workdir` onto `mesh`.

    Returns:
      ``{'step', 'meta', 'config', 'model', 'variables', 'num_classes'}``.

    Raises:
      FileNotFoundError: no checkpoint (or not the requested step) in `workdir`.
    """
    directory = checkpoint.checkpoint_dir(workdir)
    if not directory.exists():
        raise FileNotFoundError(f"No checkpoints in {os.fspath(directory)}; train first.")
    manager = checkpoint.create_manager(directory, read_only=True)
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"No finished checkpoint in {os.fspath(directory)}.")
    if step is None:
        step = manager.best_step() or manager.latest_step()
    elif step not in steps:
        raise FileNotFoundError(f"No checkpoint for step {step} in {os.fspath(directory)}; "
                                f"saved steps: {sorted(steps)}.")
    meta = checkpoint.read_meta(manager, step)
    config = config_from_meta(meta)
    num_classes = int(meta["num_classes"])
    model = train.create_model(config, num_classes)
    tx, _ = train.create_optimizer(config, total_steps=1, warmup_steps=0)
    state, shardings = train.create_train_state(
        model, tx, tuple(meta["image_shape"]), config.seed, mesh)
    target = checkpoint.abstract_target(jax.eval_shape(lambda: state), shardings)
    state = checkpoint.restore_state(manager, step, target)
    manager.close()
    return {"step": step, "meta": meta, "config": config, "model": model,
            "variables": state.variables(), "num_classes": num_classes}


def predict(model: Any, variables: Any, batches: Any, mesh: jax.sharding.Mesh,
            num_images: int) -> dict[str, np.ndarray]:
    """Logits of every real example of `batches`, with labels and the first images.

    Returns:
      ``{'logits': float32 [n, classes], 'labels': int [n], 'images': [k, h, w, c]
      (the first k <= num_images), 'mistakes': indices [m] of the first m <= num_images
      misclassified examples, 'mistake_images': [m, h, w, c]}``.
    """
    fn = jax.jit(lambda v, x: train.predict_step(v, x, model=model),
                 out_shardings=parallel.replicated(mesh))
    logits, labels, images, mistakes, mistake_images = [], [], [], [], []
    seen = 0
    for batch in batches:
        out = np.asarray(fn(variables, parallel.host_to_global({"image": batch["image"]},
                                                               mesh)["image"]))
        mask = np.asarray(batch["mask"], bool)
        real_images = np.asarray(batch["image"])[mask]
        real_labels = np.asarray(batch["label"])[mask]
        logits.append(out[mask])
        labels.append(real_labels)
        images.extend(real_images[: max(0, num_images - seen)])
        for i in np.flatnonzero(out[mask].argmax(-1) != real_labels):
            if len(mistakes) < num_images:
                mistakes.append(seen + i)
                mistake_images.append(real_images[i])
        seen += int(mask.sum())
    return {"logits": np.concatenate(logits), "labels": np.concatenate(labels),
            "images": np.asarray(images), "mistakes": np.asarray(mistakes, np.int64),
            "mistake_images": np.asarray(mistake_images)}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes]: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def confusion_figure(cm: np.ndarray, names: Sequence[str], title: str) -> Any:
    """The confusion matrix with counts in the cells; a long `title` is wrapped to fit."""
    n = len(names)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true")
    ax.set_title(viz.wrap_title(title, 0.85 * size, fontsize=11), fontsize=11)
    ax.set_xticklabels(names, rotation=90 if n > 10 else 0)
    ax.set_yticklabels(names)
    if n <= 30:
        top = cm.max() if cm.size else 0
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    return fig


def plot_confusion(cm: np.ndarray, names: Sequence[str], title: str, path: str) -> None:
    """Writes `confusion_figure` as a PNG."""
    fig = confusion_figure(cm, names, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grid(images: np.ndarray, labels: np.ndarray, preds: np.ndarray,
              names: Sequence[str], mean: Sequence[float], std: Sequence[float],
              path: str, title: str = "true / predicted") -> None:
    """Writes a grid of (de-normalised) images titled ``true / pred``, mistakes in red."""
    k = len(images)
    cols = min(8, max(k, 1))
    rows = max(1, math.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(k):
        img = np.clip(images[i] * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
        ax = axes.ravel()[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if
                  img.shape[-1] == 1 else None, vmin=0.0, vmax=1.0)
        ok = labels[i] == preds[i]
        ax.set_title(f"{names[labels[i]]} / {names[preds[i]]}", fontsize=8,
                     color="black" if ok else "red")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_workdir(workdir: str, step: int | None = None, split: str | None = None,
                     outdir: str | None = None, num_images: int = 64,
                     batch_size: int | None = None) -> dict[str, Any]:
    """Restores, evaluates and writes the report; returns the JSON-able summary."""
    mesh = parallel.create_mesh()
    ckpt = load_checkpoint(workdir, step, mesh)
    config, meta = ckpt["config"], ckpt["meta"]
    split = split or config.data.eval_split
    if batch_size:
        config.data.eval_batch_size = batch_size
    batches = data.create_eval_iterator(config.data, split, num_devices=mesh.size)
    out = predict(ckpt["model"], ckpt["variables"], batches, mesh, num_images)
    logits, labels = out["logits"], out["labels"]
    preds = logits.argmax(-1)
    n = ckpt["num_classes"]
    names = meta.get("class_names") or [str(i) for i in range(n)]
    cm = confusion_matrix(labels, preds, n)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    per_class = {names[c]: (float(cm[c, c] / cm[c].sum()) if cm[c].sum() else None)
                 for c in range(n)}
    summary = {
        "workdir": os.path.abspath(workdir),
        "step": int(ckpt["step"]),
        "split": split,
        "examples": int(len(labels)),
        "correct": int((preds == labels).sum()),
        "accuracy": float((preds == labels).mean()) if len(labels) else math.nan,
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }
    outdir = outdir or os.path.join(workdir, "eval")
    os.makedirs(outdir, exist_ok=True)
    tag = split.replace("/", "_").replace("[", "_").replace("]", "").replace(":", "-")
    paths = {
        "confusion_matrix": os.path.join(outdir, f"confusion_matrix_{tag}.png"),
        "predictions": os.path.join(outdir, f"predictions_{tag}.png"),
        "json": os.path.join(outdir, f"eval_{tag}.json"),
    }
    plot_confusion(cm, names, f"{meta['model']} step {ckpt['step']} on {split}: "
                   f"{100 * summary['accuracy']:.2f}%", paths["confusion_matrix"])
    k = len(out["images"])
    plot_grid(out["images"], labels[:k], preds[:k], names, meta["mean"], meta["std"],
              paths["predictions"])
    if len(out["mistakes"]):
        paths["mistakes"] = os.path.join(outdir, f"mistakes_{tag}.png")
        idx = out["mistakes"]
        plot_grid(out["mistake_images"], labels[idx], preds[idx], names, meta["mean"],
                  meta["std"], paths["mistakes"], title="misclassified: true / predicted")
    summary["outputs"] = paths
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # Orbax warns that a read-only manager saves nothing.
        logging.set_verbosity(logging.ERROR)
    try:
        s = evaluate_workdir(FLAGS.workdir, FLAGS.step, FLAGS.split, FLAGS.outdir,
                             FLAGS.num_images, FLAGS.batch_size)
    except (FileNotFoundError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{s['workdir']} step {s['step']} on '{s['split']}': accuracy "
          f"{100 * s['accuracy']:.2f}% ({s['correct']}/{s['examples']}), loss {s['loss']:.4f}")
    print("per-class accuracy:")
    for name, acc in s["per_class_accuracy"].items():
        count = sum(s["confusion_matrix"][list(s["per_class_accuracy"]).index(name)])
        print(f"  {name:>12}: " + ("   n/a" if acc is None else f"{100 * acc:6.2f}%")
              + f"  ({count} examples)")
    for what, path in s["outputs"].items():
        print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
