r"""Classify image files with a trained model: top-k labels and probabilities.

Usage::

    python experiments/predict.py --workdir=runs/digits my_digit.png photo.jpg
    python experiments/predict.py --workdir=runs/digits --top_k=3 --overlay *.png

Any size and any format TensorFlow or Pillow can read (PNG, JPEG, GIF, BMP, WebP, TIFF,
palette, 16-bit, gray+alpha, RGBA, ...). Each file goes through exactly the preprocessing
of training (`attnflax.data.image_files`): channel conversion to the model's channels (alpha
dropped, RGB to luma or gray to RGB), bilinear antialiased resize to the model's image
size, then the dataset's normalisation. Note what that means for the embedded digits
model: it was trained on white digits on black 8x8 images, so a black-on-white photo
must be inverted first.

``--overlay`` also writes ``<out>/<name>.attention.png`` per image: the model's input
and, for every attention layer, the mean attention each pixel receives. ``--out`` (a
folder, default ``<workdir>/predict``) receives ``predictions.json`` too. The model is
the workdir's latest checkpoint (``--best``, ``--step``: `attnflax.restore`'s rule).

A missing path, a file that is not an image, or one whose header declares more than
``--max_pixels`` pixels (default 50 MP; refused before decoding, in constant memory)
stops with a one-line error before anything is classified.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from attnflax import cli  # noqa: E402
from attnflax.configs import defaults  # noqa: E402

# Imported at their first use, after the flags are parsed.
checkpoint = cli.lazy_import("attnflax.checkpoint")
image_files = cli.lazy_import("attnflax.data.image_files")
maps = cli.lazy_import("attnflax.nn.maps")
restore = cli.lazy_import("attnflax.restore")
viz = cli.lazy_import("attnflax.viz")
rb = cli.lazy_import("attnflax.analysis.robustness")


def top_k(probs: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The `k` most probable ``(label, probability)`` of one example, best first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(names[i], float(probs[i])) for i in order]


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags; the image files are the positional arguments."""
    cli.define_checkpoint_flags(flag_values)
    flags.DEFINE_integer("top_k", 5, "Labels to print per image.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_boolean("overlay", False, "Write attention overlays.", flag_values=flag_values)
    cli.define_out_flag(flag_values, "predictions.json and the overlays",
                        default_text="<workdir>/predict")
    flags.DEFINE_integer("max_pixels", defaults.MAX_IMAGE_PIXELS, "Refuse images whose "
                         "header declares more pixels (0: no limit).", lower_bound=0,
                         flag_values=flag_values)


def parse_args(argv: Sequence[str] | None) -> Any:
    """The flags, and the image files as ``images``."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="predict.py", positional="images")
    if not args.images:
        cli.usage_error("predict.py", "give one or more image files after the flags.")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Classifies the images; returns one dict per image (path, label, top-k, ...)."""
    args = parse_args(argv)
    try:
        for path in args.images:  # Hostile or missing files first, before the model loads.
            if os.path.isfile(path):
                image_files.check_pixels(path, repr(path), args.max_pixels)
        trained = restore.load_trained(args.workdir, args.step, best=args.best)
        images = image_files.load_images(args.images, trained.image_shape, trained.mean,
                                        trained.std, args.max_pixels)
    except (restore.CheckpointNotFoundError, image_files.ImageFileError,
            checkpoint.CheckpointDamagedError, checkpoint.CheckpointIOError) as e:
        raise SystemExit(f"predict.py: error: {e}") from None
    logits = restore.predict_logits(trained, images)
    z = np.exp(logits - logits.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    names = trained.class_names
    k = min(args.top_k, trained.num_classes)
    out = args.out or os.path.join(args.workdir, "predict")
    os.makedirs(out, exist_ok=True)

    results = []
    layers = (maps.collect_attention(trained.model, trained.variables, images)
              if args.overlay else {})
    skipped = [n for n, layer in layers.items() if not layer.drawable]
    if skipped:
        print(f"note: no overlays of the dilated or shifted layers {', '.join(skipped)}.")
    layers = {name: layer for name, layer in layers.items() if name not in skipped}
    for i, path in enumerate(args.images):
        best = top_k(probs[i], names, k)
        result = {"path": os.fspath(path), "label": best[0][0], "probability": best[0][1],
                  "top_k": [{"label": n, "probability": p} for n, p in best],
                  "logits": logits[i].tolist()}
        if args.overlay:
            pixels = np.asarray(rb.to_pixels(images[i], trained.mean, trained.std))
            panels = [viz.Panel(pixels, None, f"input {pixels.shape[0]}x{pixels.shape[1]}: "
                                f"{best[0][0]} ({100 * best[0][1]:.0f}%)")]
            panels += [dataclasses.replace(p, image=pixels)
                       for p in viz.attention_panels(layers, i, [], pixels.shape[:2])]
            fig = viz.attention_figure([panels], cell=2.0)
            png = os.path.join(out, f"{i:03d}_{pathlib.Path(path).stem}.attention.png")
            fig.savefig(png, dpi=110)
            viz.close(fig)
            result["overlay"] = png
        results.append(result)
        print(f"{path}: " + ", ".join(f"{n} {100 * p:.1f}%" for n, p in best))
    with open(os.path.join(out, "predictions.json"), "w", encoding="utf-8") as f:
        json.dump({"workdir": args.workdir, "model": trained.label, "predictions": results},
                  f, indent=2)
    if args.overlay and not layers:
        print(f"note: {trained.label} has no attention layers; overlays show the input only.")
    return results


if __name__ == "__main__":
    main()
