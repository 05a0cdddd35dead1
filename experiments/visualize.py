r"""Attention maps of a trained model on test images: where does each pixel look?

Usage::

    python experiments/visualize.py --workdir=runs/digits
    python experiments/visualize.py --workdir=runs/digits --num_images=4 \
        --query=4,4 --query=1,6 --layers=attention_block0/attention --head=0

For each of the first ``--num_images`` images of the eval split, one row of panels:

* the image, titled ``true / predicted (probability)`` (wrong ones in red);
* for every chosen attention layer (``--layers``, default all) and every query pixel
  (``--query=y,x`` in input-image pixels, repeatable; default the centre and the point at
  a quarter of height and width), the attention weights of that pixel over the layer's
  feature map, drawn over the image (the query pixel outlined by a small hollow cyan
  square, so the window around it shows). For a local layer the
  map is non-zero only inside the ``kh x kw`` window around the query; for a global
  layer it covers the whole map;
* per layer, the mean attention each pixel receives (over all queries and heads).

The maps are the weights the attention layers sow in the ordinary eval forward pass
(``intermediates/attention_weights``), averaged over heads unless ``--head`` picks
one; each map sums to 1 over the layer's grid. Feature maps smaller than the input
are upsampled (nearest) for drawing. Works for local and global attention.

Writes ``attention.png`` and ``attention.json`` (layers, queries, predictions) into
``--out`` (a folder, default ``<workdir>/visualize``). The model is the workdir's latest
checkpoint (``--best``, ``--step``: `attnflax.restore`'s rule).

``--query_digit`` (datasets whose examples record a ``digit_box``, i.e.
``attnflax_cluttered``): each image is queried at the centre of its own digit instead of
at fixed pixels, and over the first ``--score_images`` eval images every layer is scored:
the share of that query's attention that falls on the digit's box, and the share of the
mean attention received that does, each next to the box's share of the map (what
uniform attention would give). A layer that finds the digit among the clutter puts more
on the box than its area.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from attnflax import cli  # noqa: E402

# Imported at their first use, after the flags are parsed.
data = cli.lazy_import("attnflax.data")
maps = cli.lazy_import("attnflax.nn.maps")
restore = cli.lazy_import("attnflax.restore")
viz = cli.lazy_import("attnflax.viz")
rb = cli.lazy_import("attnflax.analysis.robustness")


def parse_query(text: str) -> tuple[int, int]:
    """``'y,x'`` -> ``(y, x)``.

    Raises:
      ValueError: Not two integers.
    """
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"query pixel must be 'y,x' integers; got {text!r}.") from None
    return y, x


def first_examples(batches: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` real (mask=True) examples of eval batches: (images, labels)."""
    images, labels = [], []
    for batch in batches:
        mask = np.asarray(batch["mask"], bool)
        images.extend(np.asarray(batch["image"])[mask])
        labels.extend(np.asarray(batch["label"])[mask])
        if len(images) >= n:
            break
    return np.asarray(images[:n], np.float32), np.asarray(labels[:n], np.int64)


def panel_rows(
    layers: dict[str, maps.LayerAttention],
    queries: Sequence[tuple[int, int]],
    image_hw: Sequence[int],
    head: int | None = None,
) -> list[list[viz.Panel]]:
    """The attention panels of every example in the batch (what the figure draws)."""
    n = next(iter(layers.values())).weights.shape[0] if layers else 0
    return [viz.attention_panels(layers, i, queries, image_hw, head) for i in range(n)]


def digit_boxes(config: Any, split: str, n: int, pixels: np.ndarray) -> np.ndarray:
    """``digit_box`` (``y0, x0, y1, x1``) of the first `n` examples of `split`, eval order.

    Raises:
      ValueError: If the dataset has no ``digit_box`` feature, or its records are not in
        the eval pipeline's order (checked on the images `pixels`, ``[m, h, w, c]`` in
        ``[0, 1]``, as `attnflax.analysis.robustness.to_pixels` gives).
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    if "digit_box" not in builder.info.features:
        raise ValueError(f"--query_digit needs a dataset with a 'digit_box' feature (such as "
                         f"attnflax_cluttered); {config.dataset!r} has none.")
    ds = builder.as_dataset(split=split, shuffle_files=False).take(n)
    records = list(tfds.as_numpy(ds))
    for i in range(min(len(pixels), len(records))):
        stored = records[i]["image"].astype(np.float32) / 255.0
        if stored.shape != pixels[i].shape or not np.allclose(stored, pixels[i], atol=1 / 510):
            raise ValueError("the dataset's records are not in the eval order; cannot match "
                             "digit boxes to images.")
    return np.asarray([r["digit_box"] for r in records], np.int64)


def box_on_grid(box: Sequence[int], image_hw: Sequence[int], grid: Sequence[int]) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the grid cells a ``(y0, x0, y1, x1)`` image box touches."""
    y0, x0, y1, x1 = (int(v) for v in box)
    mask = np.zeros(tuple(grid), bool)
    gy0, gx0 = y0 * grid[0] // image_hw[0], x0 * grid[1] // image_hw[1]
    gy1 = -(-y1 * grid[0] // image_hw[0])
    gx1 = -(-x1 * grid[1] // image_hw[1])
    mask[gy0:gy1, gx0:gx1] = True
    return mask


def box_centre(box: Sequence[int]) -> tuple[int, int]:
    y0, x0, y1, x1 = (int(v) for v in box)
    return (y0 + y1) // 2, (x0 + x1) // 2


SCORES = ("query_on_digit", "received_on_digit", "digit_area", "digit_ink")


def digit_scores(
    layers: dict[str, maps.LayerAttention], boxes: np.ndarray, pixels: np.ndarray,
    head: int | None = None,
) -> dict[str, dict[str, float]]:
    """Per layer, means over the batch of `layers` (`pixels` ``[n, h, w, c]`` its images):

    ``query_on_digit``: share of the attention of a query at the digit's centre that
    falls on the digit's box; ``received_on_digit``: the same for the mean attention
    received; baselines ``digit_area`` (the box's share of the layer's grid: uniform
    attention) and ``digit_ink`` (the box's share of the image's ink: attention spread
    evenly over strokes, clutter included).
    """
    image_hw = pixels.shape[1:3]
    ink = [float(pixels[i, y0:y1, x0:x1].sum() / max(pixels[i].sum(), 1e-9))
           for i, (y0, x0, y1, x1) in enumerate(boxes)]
    out = {}
    for name, layer in layers.items():
        query, received, area = [], [], []
        for i, box in enumerate(boxes):
            mask = box_on_grid(box, image_hw, layer.grid)
            cell = maps.to_grid(box_centre(box), image_hw, layer.grid)
            query.append(float(maps.query_attention(layer, i, cell, head)[mask].sum()))
            received.append(float(maps.mean_attention(layer, i)[mask].sum()))
            area.append(float(mask.mean()))
        out[name] = {"kind": layer.kind, "query_on_digit": float(np.mean(query)),
                     "received_on_digit": float(np.mean(received)),
                     "digit_area": float(np.mean(area)), "digit_ink": float(np.mean(ink)),
                     "images": len(boxes)}
    return out


def score_digit_attention(trained: Any, config: Any, split: str, layer_names: Any,
                          num_images: int, head: int | None) -> dict[str, dict[str, float]]:
    """`digit_scores` over the first `num_images` eval images, in chunks of 50."""
    batches = data.create_eval_iterator(config, split, num_devices=1)
    images, _ = first_examples(batches, num_images)
    pixels = np.asarray(rb.to_pixels(images, trained.mean, trained.std))
    boxes = digit_boxes(config, split, len(images), pixels)
    totals: dict[str, dict[str, float]] = {}
    for start in range(0, len(images), 50):
        chunk = maps.select_layers(
            maps.collect_attention(trained.model, trained.variables, images[start:start + 50]),
            layer_names)
        scores = digit_scores(chunk, boxes[start:start + 50], pixels[start:start + 50], head)
        for name, s in scores.items():
            t = totals.setdefault(name, {"kind": s["kind"], "images": 0,
                                         **{k: 0.0 for k in SCORES}})
            for key in SCORES:
                t[key] += s[key] * s["images"]
            t["images"] += s["images"]
    for t in totals.values():
        for key in SCORES:
            t[key] /= t["images"]
    return totals


def define_flags(flag_values: flags.FlagValues) -> None:
    """The command-line flags."""
    cli.define_checkpoint_flags(flag_values)
    flags.DEFINE_string("split", None, "Split (default: the config's eval split).",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_images", 6, "Images (rows).", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_list("layers", None, "Attention layer names (default all; see "
                      "attention.json).", flag_values=flag_values)
    flags.DEFINE_multi_string("query", None, "A query pixel y,x in input-image coordinates "
                              "(repeat the flag for several)", flag_values=flag_values)
    flags.DEFINE_integer("head", None, "One head (default: the mean over heads).",
                         flag_values=flag_values)
    flags.DEFINE_boolean("query_digit", False, "Query each image at its digit's centre and "
                         "score attention on the digit's box (datasets with a digit_box "
                         "feature).", flag_values=flag_values)
    flags.DEFINE_integer("score_images", 200, "Eval images scored with --query_digit.",
                         lower_bound=1, flag_values=flag_values)
    cli.define_out_flag(flag_values, "attention.png and attention.json",
                        default_text="<workdir>/visualize")


def parse_args(argv: Sequence[str] | None) -> Any:
    """The flags; ``queries`` holds the ``--query`` pixels as ``(y, x)`` (None: default)."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="visualize.py")
    try:
        args.queries = [parse_query(q) for q in args.query] if args.query else None
    except ValueError as e:
        cli.usage_error("visualize.py", str(e))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Draws the attention figure; returns paths, layers and the panel data drawn."""
    args = parse_args(argv)
    try:
        trained = restore.load_trained(args.workdir, args.step, best=args.best)
        config = trained.config.data
        batches = data.create_eval_iterator(config, args.split, num_devices=1)
        images, labels = first_examples(batches, args.num_images)
        height, width = trained.image_shape[:2]
        queries = args.queries or [(height // 2, width // 2), (height // 4, width // 4)]
        for q in queries:
            maps.to_grid(q, (height, width), (height, width))  # validates
        split = args.split or config.eval_split
        per_image = None
        if args.query_digit:
            pixels0 = np.asarray(rb.to_pixels(images, trained.mean, trained.std))
            per_image = [[box_centre(b)] for b in digit_boxes(config, split, len(images),
                                                              pixels0)]
        all_layers = maps.collect_attention(trained.model, trained.variables, images)
        layers = maps.select_layers(all_layers, args.layers)
        for layer in layers.values():
            layer.check_drawable()
        if args.head is not None:
            for layer in layers.values():
                if not 0 <= args.head < layer.num_heads:
                    raise ValueError(f"--head={args.head}, but layer {layer.name!r} has "
                                     f"{layer.num_heads} heads.")
    except (restore.CheckpointNotFoundError, ValueError) as e:
        raise SystemExit(f"visualize.py: error: {e}") from None
    if not layers:
        print(f"note: {trained.label} has no attention layers; drawing predictions only.")

    probs = _softmax(restore.predict_logits(trained, images))
    preds = probs.argmax(-1)
    names = trained.class_names
    pixels = np.asarray(rb.to_pixels(images, trained.mean, trained.std))
    if per_image is None:
        rows = panel_rows(layers, queries, (height, width), args.head)
    else:
        rows = [viz.attention_panels(layers, i, per_image[i], (height, width), args.head)
                for i in range(len(images))] if layers else []
    scores = None
    if args.query_digit and layers:
        try:
            scores = score_digit_attention(trained, config, split, list(layers),
                                           args.score_images, args.head)
        except ValueError as e:
            raise SystemExit(f"visualize.py: error: {e}") from None
    figure_rows = []
    for i in range(len(images)):
        ok = preds[i] == labels[i]
        head = viz.Panel(pixels[i], None,
                         f"{names[labels[i]]} / {names[preds[i]]} ({100 * probs[i, preds[i]]:.0f}%)"
                         + ("" if ok else " ✗"))
        panels = rows[i] if rows else []
        cells = [head] + [dataclasses.replace(p, image=pixels[i]) for p in panels]
        figure_rows.append(cells)
    fig = viz.attention_figure(figure_rows)
    for i, ax in enumerate(fig.axes[:: len(figure_rows[0])]):
        if preds[i] != labels[i]:
            ax.title.set_color("red")
    out = args.out or os.path.join(args.workdir, "visualize")
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "attention.png")
    fig.savefig(png, dpi=110)
    viz.close(fig)
    summary = {
        "workdir": args.workdir,
        "model": trained.label,
        "step": trained.step,
        "queries": ([list(q[0]) for q in per_image] if per_image is not None
                    else [list(q) for q in queries]),
        "query_digit": bool(args.query_digit),
        "digit_attention": scores,
        "head": args.head,
        "layers": {
            n: {"kind": layer.kind, "grid": list(layer.grid), "heads": layer.num_heads,
                "window": list(layer.window) if layer.window else None}
            for n, layer in layers.items()
        },
        "all_layers": list(all_layers),
        "examples": [
            {"label": names[int(labels[i])], "predicted": names[int(preds[i])],
             "probability": float(probs[i, preds[i]])}
            for i in range(len(images))
        ],
        "png": png,
    }
    with open(os.path.join(out, "attention.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    described = [f"{n} ({v.kind}, grid {v.grid[0]}x{v.grid[1]})" for n, v in layers.items()]
    print(f"{trained.label}: {len(images)} images, layers {', '.join(described) or 'none'}")
    for i, e in enumerate(summary["examples"]):
        print(f"  image {i}: true {e['label']}, predicted {e['predicted']} "
              f"({100 * e['probability']:.1f}%)")
    for n, v in (scores or {}).items():
        print(f"  {n}: {100 * v['query_on_digit']:.1f}% of a digit-centre query's attention "
              f"and {100 * v['received_on_digit']:.1f}% of the mean attention fall on the "
              f"digit's box, which is {100 * v['digit_area']:.1f}% of the map and holds "
              f"{100 * v['digit_ink']:.1f}% of the ink ({v['images']} images)")
    print(f"Wrote {png} and attention.json")
    return {**summary, "panels": rows, "layer_data": layers}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


if __name__ == "__main__":
    main()
