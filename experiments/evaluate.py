r"""Evaluates a saved checkpoint: accuracy, per-class accuracy, confusion matrix, image grid.

::

    python experiments/evaluate.py --workdir=runs/digits              # latest checkpoint
    python experiments/evaluate.py --workdir=runs/digits --best       # best by eval accuracy
    python experiments/evaluate.py --workdir=runs/digits --step=1348 --split=train

The model, dataset and preprocessing come from the checkpoint's own ``meta`` item
(the config it was trained with), so nothing else needs to be given. The step is the
rule of every script (`attnflax.restore`): the latest checkpoint, whose test accuracy
``results.json`` reports; ``--best`` the best by eval accuracy; ``--step`` that one. The
numbers are the trainer's own masked evaluation (`attnflax.restore.evaluate`). Writes,
into ``--out`` (a folder, default ``<workdir>/eval``):

* ``confusion_matrix_<split>.png`` -- rows: true class, columns: predicted class;
* ``predictions_<split>.png`` -- a grid of the first ``--num_images`` images with
  their true and predicted labels (wrong ones in red);
* ``mistakes_<split>.png`` -- the same for the first ``--num_images`` mistakes;
* ``eval_<split>.json`` -- accuracy, loss, per-class accuracy, the confusion matrix.

Single process (it gathers every prediction on the host); any number of local devices.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from attnflax import cli  # noqa: E402

# Imported at their first use, after the flags are parsed (matplotlib: in the plots).
data = cli.lazy_import("attnflax.data")
parallel = cli.lazy_import("attnflax.parallel")
restore = cli.lazy_import("attnflax.restore")
viz = cli.lazy_import("attnflax.viz")
rb = cli.lazy_import("attnflax.analysis.robustness")


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags."""
    cli.define_checkpoint_flags(flag_values)
    flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval_split).",
                        flag_values=flag_values)
    cli.define_out_flag(flag_values, "the PNGs and eval_<split>.json",
                        default_text="<workdir>/eval")
    flags.DEFINE_integer("num_images", 64, "Images in the prediction and mistake grids.",
                         flag_values=flag_values, lower_bound=0)
    flags.DEFINE_integer("batch_size", None, "Eval batch size (default: the config's).",
                         flag_values=flag_values, lower_bound=1)


class _Collect:
    """`attnflax.restore.evaluate`'s ``on_batch``: the logits and labels of every real
    example, the first `num_images` images and the first `num_images` mistakes."""

    def __init__(self, num_images: int):
        self.num_images = num_images
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.images: list[np.ndarray] = []
        self.mistakes: list[int] = []
        self.mistake_images: list[np.ndarray] = []
        self.seen = 0

    def __call__(self, batch: Mapping[str, Any], out: Mapping[str, Any]) -> None:
        mask = np.asarray(batch["mask"], bool)
        images = np.asarray(batch["image"])[mask]
        labels = np.asarray(batch["label"])[mask]
        logits = np.asarray(out["logits"], np.float32)[mask]
        self.logits.append(logits)
        self.labels.append(labels)
        self.images.extend(images[: max(0, self.num_images - self.seen)])
        for i in np.flatnonzero(logits.argmax(-1) != labels):
            if len(self.mistakes) < self.num_images:
                self.mistakes.append(self.seen + int(i))
                self.mistake_images.append(images[i])
        self.seen += int(mask.sum())


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes]: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def confusion_figure(cm: np.ndarray, names: Sequence[str], title: str) -> Any:
    """The confusion matrix with counts in the cells; a long `title` is wrapped to fit."""
    n = len(names)
    size = max(4.0, 0.45 * n + 2)
    fig, axes = viz.subplots(1, 1, (size, size))
    ax = axes[0, 0]
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
    viz.close(fig)


def plot_grid(images: np.ndarray, labels: np.ndarray, preds: np.ndarray,
              names: Sequence[str], mean: Sequence[float], std: Sequence[float],
              path: str, title: str = "true / predicted") -> None:
    """Writes a grid of (de-normalised) images titled ``true / pred``, mistakes in red."""
    fig = viz.image_grid(
        np.asarray(rb.to_pixels(images, mean, std)),
        [f"{names[t]} / {names[p]}" for t, p in zip(labels, preds, strict=True)], title,
        colors=["black" if t == p else "red" for t, p in zip(labels, preds, strict=True)],
        cols=min(8, max(len(images), 1)))
    fig.savefig(path, dpi=100)
    viz.close(fig)


def evaluate_workdir(workdir: str, step: int | None = None, split: str | None = None,
                     out: str | None = None, num_images: int = 64,
                     batch_size: int | None = None, best: bool = False) -> dict[str, Any]:
    """Restores, evaluates and writes the report; returns the JSON-able summary.

    Raises:
      attnflax.restore.CheckpointNotFoundError: no checkpoint (or not that step).
      ValueError: the split has no example.
    """
    mesh = parallel.create_mesh()
    trained = restore.load_trained(workdir, step, best=best, mesh=mesh)
    config, meta = trained.config, trained.meta
    split = split or config.data.eval_split
    if batch_size:
        config.data.eval_batch_size = batch_size
    batches = data.create_eval_iterator(config.data, split, num_devices=mesh.size)
    collected = _Collect(num_images)
    result = restore.evaluate(trained, batches, on_batch=collected)
    logits, labels = np.concatenate(collected.logits), np.concatenate(collected.labels)
    preds = logits.argmax(-1)
    n = trained.num_classes
    names = trained.class_names
    cm = confusion_matrix(labels, preds, n)
    per_class = {names[c]: (float(cm[c, c] / cm[c].sum()) if cm[c].sum() else None)
                 for c in range(n)}
    summary = {
        "workdir": os.path.abspath(workdir),
        "step": trained.step,
        "split": split,
        "examples": result["examples"],
        "correct": result["correct"],
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }
    out = out or os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    tag = split.replace("/", "_").replace("[", "_").replace("]", "").replace(":", "-")
    paths = {
        "confusion_matrix": os.path.join(out, f"confusion_matrix_{tag}.png"),
        "predictions": os.path.join(out, f"predictions_{tag}.png"),
        "json": os.path.join(out, f"eval_{tag}.json"),
    }
    plot_confusion(cm, names, f"{meta['model']} step {trained.step} on {split}: "
                   f"{100 * summary['accuracy']:.2f}%", paths["confusion_matrix"])
    k = len(collected.images)
    plot_grid(np.asarray(collected.images), labels[:k], preds[:k], names, meta["mean"],
              meta["std"], paths["predictions"])
    if collected.mistakes:
        paths["mistakes"] = os.path.join(out, f"mistakes_{tag}.png")
        idx = np.asarray(collected.mistakes, np.int64)
        plot_grid(np.asarray(collected.mistake_images), labels[idx], preds[idx], names,
                  meta["mean"], meta["std"], paths["mistakes"],
                  title="misclassified: true / predicted")
    summary["outputs"] = paths
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluates the checkpoint the flags name; returns the exit status."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="evaluate.py")
    logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only manager saves nothing.
    try:
        s = evaluate_workdir(args.workdir, args.step, args.split, args.out, args.num_images,
                             args.batch_size, args.best)
    except (FileNotFoundError, ValueError, data.DataError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
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
    sys.exit(main())
