"""See what the model sees: dataset metadata, batch statistics, a PNG grid, input speed.

    python experiments/inspect_data.py                    # the embedded digits
    python experiments/inspect_data.py --benchmark        # + train-pipeline images/second
    python experiments/inspect_data.py --dataset=cifar10 --crop_padding=4 --flip
    python experiments/inspect_data.py --dataset=image_folder --data_dir=/photos \\
        --image_size=64,64

It prints the `DatasetInfo`, then shape, dtype, min/max/mean/std and the label histogram
of the first train batch (after augmentation and normalisation), and writes that batch,
de-normalised, as a grid with labels, ``batch.png``, into ``--out`` (a folder, default
``runs/inspect``).
``--benchmark`` times ``--steps`` train batches after ``--warmup`` batches and prints
images/second as a line and as a JSON line. It runs as one process with one device
(the pipeline of one host); it uses TF only, no accelerator.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import flags

from attnflax import cli

# Imported at its first use (it imports TensorFlow), after the flags are parsed.
data = cli.lazy_import("attnflax.data")

GRID_FILE = "batch.png"


def define_flags(flag_values: flags.FlagValues) -> None:
    """Command-line flags (see the module docstring)."""
    flags.DEFINE_string("dataset", "attnflax_digits", "TFDS name or image_folder.",
                        flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, "TFDS data dir, or the image folder root.",
                        flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 128, "Train batch size.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_string("train_split", "train", "Train split.", flag_values=flag_values)
    cli.define_list("image_size", None, "h,w to resize to (default: the images' own size).",
                    flag_values, item=int)
    flags.DEFINE_integer("num_channels", None, "1 or 3 (default: the images' own).",
                         flag_values=flag_values)
    flags.DEFINE_integer("crop_padding", 0, "Random-crop padding (0: off).", lower_bound=0,
                         flag_values=flag_values)
    flags.DEFINE_boolean("flip", False, "Random horizontal flips.", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Shuffle and augmentation seed.", flag_values=flag_values)
    cli.define_out_flag(flag_values, f"{GRID_FILE} (the first batch as a grid)",
                        default="runs/inspect")
    flags.DEFINE_integer("max_images", 64, "Images in the grid.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_boolean("benchmark", False, "Time the train pipeline.",
                         flag_values=flag_values)
    flags.DEFINE_integer("steps", 200, "Batches timed by --benchmark.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("warmup", 20, "Batches before timing starts.", lower_bound=0,
                         flag_values=flag_values)


def parse_args(argv: Sequence[str] | None = None) -> Any:
    """Command-line flags (see the module docstring)."""
    args = cli.parse(argv, define_flags, doc=__doc__, prog="inspect_data.py")
    return args


def make_config(args: Any):
    """The data config for the flags."""
    config = data.default_config()
    config.dataset = args.dataset
    config.data_dir = args.data_dir
    config.batch_size = args.batch_size
    config.train_split = args.train_split
    if args.image_size:
        config.image_size = tuple(args.image_size)
    config.num_channels = args.num_channels
    config.augment.crop_padding = args.crop_padding
    config.augment.flip = args.flip
    config.seed = args.seed
    return config


def batch_stats(batch: dict[str, np.ndarray], num_classes: int) -> dict[str, object]:
    """Shape, dtype and value statistics of a batch.

    Args:
      batch: ``{'image': float32 [B, h, w, c], 'label': int32 [B], 'mask': bool [B]}``.
      num_classes: Length of the label histogram.

    Returns:
      A JSON-serialisable dict.
    """
    image, label = batch["image"], batch["label"]
    return {
        "image_shape": list(image.shape),
        "image_dtype": str(image.dtype),
        "min": float(image.min()),
        "max": float(image.max()),
        "mean": float(image.mean()),
        "std": float(image.std()),
        "label_shape": list(label.shape),
        "label_dtype": str(label.dtype),
        "label_histogram": np.bincount(label, minlength=num_classes).tolist(),
        "mask_all_true": bool(batch["mask"].all()),
    }


def save_grid(
    batch: dict[str, np.ndarray], info: data.DatasetInfo, path: str, max_images: int = 64
) -> str:
    """Writes the first `max_images` images of a batch, with labels, as a PNG grid.

    Returns:
      `path`.
    """
    from attnflax import viz
    from attnflax.analysis.robustness import to_pixels

    labels = batch["label"][:max_images]
    names = [info.class_names[i] if info.class_names else str(i) for i in labels]
    fig = viz.image_grid(
        np.asarray(to_pixels(batch["image"][:max_images], info.mean, info.std)),
        [name if name == str(i) else f"{i}: {name}"[:14] for i, name in zip(labels, names,
                                                                           strict=True)],
        f"{info.name} train batch {tuple(batch['image'].shape)}", cell=(1.3, 1.45))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    viz.close(fig)
    return path


def benchmark(batches: Iterator[dict[str, np.ndarray]], steps: int, warmup: int) -> dict:
    """Times `steps` batches of an iterator after `warmup` batches.

    Returns:
      ``{'images_per_second', 'batches_per_second', 'seconds', 'steps', 'batch_size'}``.
    """
    batch = None
    for _ in range(warmup):
        batch = next(batches)
    start = time.perf_counter()
    images = 0
    for _ in range(steps):
        batch = next(batches)
        images += len(batch["label"])
    seconds = time.perf_counter() - start
    return {
        "images_per_second": images / seconds,
        "batches_per_second": steps / seconds,
        "seconds": seconds,
        "steps": steps,
        "batch_size": 0 if batch is None else len(batch["label"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the inspection; returns the exit status."""
    args = parse_args(argv)
    config = make_config(args)
    info = data.get_dataset_info(config)
    print(f"dataset: {info.name}")
    print(f"  num_classes: {info.num_classes}")
    print(f"  image_shape: {info.image_shape}")
    print(f"  split_sizes: {dict(info.split_sizes)}")
    print(f"  class_names: {info.class_names}")
    print(f"  mean/std:    {info.mean} / {info.std}")

    # One process with one device: this host's pipeline, without starting JAX devices.
    batches = data.create_train_iterator(config, num_devices=1, process_index=0, process_count=1)
    first = next(batches)
    stats = batch_stats(first, info.num_classes)
    print("first train batch:")
    for key, value in stats.items():
        print(f"  {key}: {value}")
    print(f"wrote {save_grid(first, info, os.path.join(args.out, GRID_FILE), args.max_images)}")

    if args.benchmark:
        result = benchmark(batches, args.steps, args.warmup)
        print(
            f"train pipeline: {result['images_per_second']:.0f} images/s "
            f"({result['steps']} batches of {result['batch_size']} in {result['seconds']:.2f} s "
            f"after {args.warmup} warm-up batches)"
        )
        print(json.dumps({"benchmark": "train_pipeline", "dataset": info.name, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
