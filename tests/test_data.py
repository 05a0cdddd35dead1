"""Tests for `attnflax.data`: the embedded digits, TFDS/mocked/image-folder pipelines,
exact sharded evaluation, deterministic resumable training and the errors on bad input.

Nothing here downloads: TFDS data dirs are temporary folders, named datasets run under
`tfds.testing.mock_data`, and the digits are prepared once per session from scikit-learn.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import os
import socket
import threading
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from train_testutil import load_script

from attnflax import data
from attnflax.data import digits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """A TFDS data dir with `attnflax_digits` prepared once for the session."""
    path = str(tmp_path_factory.mktemp("tfds"))
    config = data.default_config()
    config.data_dir = path
    data.get_dataset_info(config)
    return path


def make_config(data_dir: str | None, **overrides) -> ml_collections.ConfigDict:
    """A data config on `data_dir` with top-level overrides (``augment`` as a dict)."""
    config = data.default_config()
    config.data_dir = data_dir
    for key, value in overrides.items():
        if key == "augment":
            config.augment.update(value)
        else:
            setattr(config, key, value)
    return config


def to_uint8(images: np.ndarray, info: data.DatasetInfo) -> np.ndarray:
    """Inverts the normalisation: float32 [..., c] -> the uint8 pixels it came from."""
    x = (images * np.asarray(info.std) + np.asarray(info.mean)) * 255.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def real_examples(batches, info) -> collections.Counter:
    """Multiset of (image bytes, label) over the mask=True examples of `batches`."""
    out = collections.Counter()
    for batch in batches:
        images = to_uint8(batch["image"], info)
        for image, label, keep in zip(images, batch["label"], batch["mask"], strict=True):
            if keep:
                out[(image.tobytes(), int(label))] += 1
    return out


@functools.cache
def split_examples(data_dir: str, split: str) -> collections.Counter:
    """Multiset of (image bytes, label) of a digits split, read straight from TFDS."""
    ds = tfds.load(digits.NAME, split=split, data_dir=data_dir)
    return collections.Counter(
        (ex["image"].tobytes(), int(ex["label"])) for ex in tfds.as_numpy(ds)
    )


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture
def no_network(monkeypatch):
    """Makes every Python-level network connection fail loudly."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ------------------------------------------------------------------- embedded dataset


def test_digits_prepare_offline_with_identical_bytes(tmp_path, no_network):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        info = data.get_dataset_info(make_config(str(d)))
        assert info.split_sizes == {"train": 1437, "test": 360}
    files = sorted(p.relative_to(dirs[0]) for p in dirs[0].rglob("*") if p.is_file())
    assert any(p.name.startswith("attnflax_digits-train.tfrecord") for p in files)
    assert files == sorted(p.relative_to(dirs[1]) for p in dirs[1].rglob("*") if p.is_file())
    for rel in files:
        assert (dirs[0] / rel).read_bytes() == (dirs[1] / rel).read_bytes(), rel


def test_digits_split_sizes_class_balance_and_content(digits_dir):
    assert tfds.builder_cls(digits.NAME) is digits.AttnflaxDigits  # registered by import
    images, labels = digits.load_arrays()
    for split, indices in digits.split_indices().items():
        examples = list(tfds.as_numpy(tfds.load(digits.NAME, split=split, data_dir=digits_dir)))
        assert len(examples) == digits.SPLIT_SIZES[split]
        counts = np.bincount([ex["label"] for ex in examples], minlength=10)
        assert tuple(counts) == digits.CLASS_COUNTS[split]
        # The documented balance is the one in the builder's docstring.
        assert ", ".join(map(str, counts)) in digits.AttnflaxDigits.__doc__
        assert all(ex["image"].shape == (8, 8, 1) for ex in examples)
        assert all(ex["image"].dtype == np.uint8 for ex in examples)
        # Exactly scikit-learn's examples of that split.
        got = collections.Counter((ex["image"].tobytes(), int(ex["label"])) for ex in examples)
        assert got == collections.Counter((images[i].tobytes(), int(labels[i])) for i in indices)


def test_digits_level_scaling_and_normalisation_constants():
    levels = np.arange(17)
    scaled = digits.scale_levels(levels)
    assert scaled.dtype == np.uint8
    assert scaled.tolist() == [int(np.floor(v * 255 / 16 + 0.5)) for v in levels]
    assert (scaled[0], scaled[8], scaled[16]) == (0, 128, 255)
    mean, std = digits.AttnflaxDigits.train_stats()
    assert digits.MEAN[0] == pytest.approx(mean, abs=1e-6)
    assert digits.STD[0] == pytest.approx(std, abs=1e-6)


# ------------------------------------------------------------------- digits pipelines


def test_digits_train_and_eval_batches(digits_dir):
    config = make_config(digits_dir, batch_size=64, eval_batch_size=100)
    info = data.get_dataset_info(config)
    assert info.num_classes == 10 and info.image_shape == (8, 8, 1)
    assert info.class_names == tuple(str(i) for i in range(10))

    train = data.create_train_iterator(config, num_devices=1, process_index=0, process_count=1)
    assert train.info == info
    batches = take(train, 23)  # a full epoch (1,437 = 22 * 64 + 29) and a bit
    for b in batches:
        assert b["image"].shape == (64, 8, 8, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (64,) and b["label"].dtype == np.int32
        assert b["mask"].dtype == np.bool_ and b["mask"].all()
    # Normalised with the train statistics: mean ~0, std ~1 over an epoch.
    epoch = np.concatenate([b["image"] for b in batches])[:1437]
    assert abs(epoch.mean()) < 1e-3 and abs(epoch.std() - 1) < 1e-3
    # The first 1,437 examples of the stream are the train split, once each (an epoch).
    ordered = [
        (img.tobytes(), int(lab))
        for b in batches
        for img, lab in zip(to_uint8(b["image"], info), b["label"], strict=True)
    ]
    assert collections.Counter(ordered[:1437]) == split_examples(digits_dir, "train")

    evaluation = data.create_eval_iterator(config, num_devices=1, process_index=0, process_count=1)
    walks = [list(evaluation), list(evaluation)]  # re-iterable
    assert len(evaluation) == len(walks[0]) == 4 == data.num_eval_batches(config, process_count=1)
    assert_batches_equal(walks[0], walks[1])
    assert [int(b["mask"].sum()) for b in walks[0]] == [100, 100, 100, 60]
    assert real_examples(walks[0], info) == split_examples(digits_dir, "test")
    last = walks[0][-1]
    assert not last["image"][60:].any() and not last["label"][60:].any()


@pytest.mark.parametrize("size", [1, 7, 360, 361])
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_each_example_exactly_once(digits_dir, size, process_count):
    split = {1: "test[:1]", 7: "test[:7]", 360: "test", 361: "train[:361]"}[size]
    config = make_config(digits_dir, eval_batch_size=8)
    info = data.get_dataset_info(config)
    expected_batches = data.num_eval_batches(config, split, process_count=process_count)
    union = collections.Counter()
    for index in range(process_count):
        evaluation = data.create_eval_iterator(
            config,
            split,
            num_devices=process_count,
            process_index=index,
            process_count=process_count,
        )
        batches = list(evaluation)
        assert len(batches) == len(evaluation) == expected_batches  # same on every process
        for b in batches:
            assert b["image"].shape == (8 // process_count, 8, 8, 1)
            assert b["mask"].shape == b["label"].shape == (8 // process_count,)
        union += real_examples(batches, info)
    truth = split_examples(digits_dir, split)
    assert sum(truth.values()) == size == data.num_examples(config, split)
    assert union == truth  # each example of the split exactly once over all processes


def test_eval_without_cache_is_the_same(digits_dir):
    kw = dict(num_devices=2, process_index=1, process_count=2)
    cached = list(data.create_eval_iterator(make_config(digits_dir, eval_batch_size=4), **kw))
    uncached = data.create_eval_iterator(
        make_config(digits_dir, eval_batch_size=4, cache=False), **kw
    )
    assert_batches_equal(cached, list(uncached))
    assert_batches_equal(cached, list(uncached))


# ------------------------------------------------------------------- train determinism


def test_train_same_seed_same_batches_different_seed_different_order(digits_dir):
    kw = dict(num_devices=1, process_index=0, process_count=1)
    config = make_config(
        digits_dir,
        batch_size=32,
        train_split="train[:300]",
        augment={"crop_padding": 2, "flip": True},
    )
    first = take(data.create_train_iterator(config, **kw), 5)
    again = take(data.create_train_iterator(config, **kw), 5)
    assert_batches_equal(first, again)
    config.cache = False  # caching decoded images does not change the stream
    assert_batches_equal(first, take(data.create_train_iterator(config, **kw), 5))
    config.seed = 1
    other = take(data.create_train_iterator(config, **kw), 5)
    assert not np.array_equal(first[0]["label"], other[0]["label"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


@pytest.mark.parametrize("process_index,process_count,cache,sharding", [
    (0, 1, True, "global"), (1, 2, False, "process"), (1, 2, True, "global")])
def test_train_resume_reproduces_batch_k_onward(
        digits_dir, process_index, process_count, cache, sharding):
    kw = dict(num_devices=2, process_index=process_index, process_count=process_count)
    config = make_config(
        digits_dir,
        batch_size=64,
        seed=3,
        train_split="train[:300]",
        augment={"crop_padding": 1, "flip": True},
        cache=cache,  # uncached: shuffle encoded records, decode after skipping
    )
    config.train_sharding = sharding
    # Per process 4.7 batches per epoch (300 / 64, or 150 / 32): batch 4 spans epochs 0 and 1.
    full = take(data.create_train_iterator(config, **kw), 13)
    for k in (4, 10):  # a batch that spans epochs 0 and 1; one that starts inside epoch 2
        resumed = take(data.create_train_iterator(config, start_step=k, **kw), 3)
        assert_batches_equal(full[k : k + 3], resumed)


def test_train_shards_are_disjoint_and_cover_split(digits_dir):
    config = make_config(digits_dir, batch_size=64, train_split="train[:301]")
    config.train_sharding = "process"
    info = data.get_dataset_info(config)
    seen = []
    for index in range(2):
        it = data.create_train_iterator(config, num_devices=1, process_index=index, process_count=2)
        shard = 151 - index  # tfds.even_splits: 151 then 150
        batches = take(it, -(-shard // 32))  # 32 examples per batch and process
        ordered = [
            (img.tobytes(), int(lab))
            for b in batches
            for img, lab in zip(to_uint8(b["image"], info), b["label"], strict=True)
        ]
        assert len(set(ordered[:shard])) == shard  # an epoch is a permutation of the shard
        seen.append(set(ordered[:shard]))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(split_examples(digits_dir, "train[:301]"))


def test_augmentation_crop_and_flip(digits_dir):
    kw = dict(num_devices=1, process_index=0, process_count=1)

    def batches(**augment):
        config = make_config(digits_dir, batch_size=128, train_split="train[:256]", augment=augment)
        return take(data.create_train_iterator(config, **kw), 2)

    plain, flipped, cropped = batches(), batches(flip=True), batches(crop_padding=2)
    n_flipped = 0
    for p, f, c in zip(plain, flipped, cropped, strict=True):
        np.testing.assert_array_equal(p["label"], f["label"])  # same order, only pixels move
        np.testing.assert_array_equal(p["label"], c["label"])
        assert c["image"].shape == p["image"].shape
        for x, y in zip(p["image"], f["image"], strict=True):
            mirrored = np.array_equal(y, x[:, ::-1])
            assert mirrored or np.array_equal(y, x)
            n_flipped += mirrored and not np.array_equal(x, x[:, ::-1])
        assert not np.array_equal(p["image"], c["image"])
    assert 64 < n_flipped < 192  # about half of 256
    # Cropping only shifts the digit: each cropped image is a window of the padded original.
    info = data.get_dataset_info(make_config(digits_dir))
    shifted = 0
    pairs = zip(to_uint8(plain[0]["image"], info), to_uint8(cropped[0]["image"], info), strict=True)
    for x, y in pairs:
        padded = np.pad(x[..., 0], 2)
        windows = [padded[i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(np.array_equal(y[..., 0], w) for w in windows)
        shifted += not np.array_equal(x, y)
    assert shifted > 64  # offset (2, 2) leaves an image unchanged: 1 in 25


# --------------------------------------------------------------- named TFDS (mocked)


MOCKED = tfds.testing.MockPolicy.USE_CODE  # builder code only: no metadata files needed


@pytest.mark.parametrize(
    "name,shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))]
)
def test_named_tfds_datasets_under_mock_data(tmp_path, name, shape):
    # The default download=False: mock_data serves data although nothing is on disk.
    config = make_config(
        str(tmp_path),
        dataset=name,
        batch_size=4,
        eval_batch_size=4,
        augment={"crop_padding": 4, "flip": True},
    )
    kw = dict(num_devices=2, process_index=0, process_count=1)
    with tfds.testing.mock_data(num_examples=10, policy=MOCKED):
        info = data.get_dataset_info(config)
        train = take(data.create_train_iterator(config, **kw), 3)
        evaluation = list(data.create_eval_iterator(config, **kw))
    assert info.num_classes == 10 and info.image_shape == shape
    assert (info.mean, info.std) == data.NORMALIZATION[name]
    for b in train + evaluation:
        assert b["image"].shape == (4, *shape) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        assert b["mask"].dtype == np.bool_
        assert ((0 <= b["label"]) & (b["label"] < 10)).all()
    assert all(b["mask"].all() for b in train)
    assert len(evaluation) == 3 and [int(b["mask"].sum()) for b in evaluation] == [4, 4, 2]


def test_mocked_info_comes_from_the_builder_and_images_convert(tmp_path):
    with tfds.testing.mock_data(num_examples=4, policy=MOCKED):
        # download=True (what tfds.load does by default) works too: mocked, it is a no-op.
        info = data.get_dataset_info(make_config(str(tmp_path), dataset="cifar100", download=True))
        assert info.num_classes == 100 and info.image_shape == (32, 32, 3)
        config = make_config(
            str(tmp_path),
            dataset="mnist",
            download=True,
            batch_size=4,
            image_size=(16, 20),
            num_channels=3,
        )
        batch = next(
            data.create_train_iterator(config, num_devices=1, process_index=0, process_count=1)
        )
    assert batch["image"].shape == (4, 16, 20, 3)
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 1])


# ---------------------------------------------------------------------- image folders

# Each class has its own grey level, so a batch shows whether images and labels match.
LEVELS = {"cat": 40, "dog": 130, "eel": 220}
SIZES = [(5, 7), (300, 200), (64, 48), (17, 33), (7, 5), (200, 300)]  # (width, height)
MODES = ["L", "RGB", "RGBA"]


def write_image(path: str, size: tuple[int, int], mode: str, level: int) -> None:
    colour = {"L": level, "RGB": (level,) * 3, "RGBA": (level,) * 3 + (255,)}[mode]
    Image.new(mode, size, colour).save(path)


def make_folder(root, per_class: dict[str, int]) -> dict[str, int]:
    """Writes root/<split>/<class>/*.{png,jpg} of every size/mode; returns files per split."""
    counts = {}
    for split, n in per_class.items():
        counts[split] = 0
        for cls, level in LEVELS.items():
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(n):
                size, mode = SIZES[i % len(SIZES)], MODES[i % len(MODES)]
                ext = ".jpg" if mode != "RGBA" and i % 2 else ".png"
                write_image(str(root / split / cls / f"{i}{ext}"), size, mode, level)
                counts[split] += 1
    return counts


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    return root, make_folder(root, {"train": 6, "test": 4})


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_mixed_sizes_formats_and_channels(image_folder, channels):
    root, counts = image_folder
    config = make_config(
        str(root),
        dataset="image_folder",
        image_size=(12, 10),
        num_channels=channels,
        batch_size=8,
        eval_batch_size=8,
    )
    info = data.get_dataset_info(config)
    assert info.class_names == ("cat", "dog", "eel") and info.num_classes == 3
    assert info.image_shape == (12, 10, channels)
    assert info.split_sizes == {"train": 18, "test": 12}
    kw = dict(num_devices=1, process_index=0, process_count=1)
    train = take(data.create_train_iterator(config, **kw), 3)
    evaluation = list(data.create_eval_iterator(config, **kw))
    assert len(evaluation) == 2
    labels = []
    for b in train + evaluation:
        assert b["image"].shape == (8, 12, 10, channels) and b["image"].dtype == np.float32
        pixels = to_uint8(b["image"], info).astype(int)
        for image, label, keep in zip(pixels, b["label"], b["mask"], strict=True):
            if keep:  # the pixels carry the class's grey level (JPEG: within a few levels)
                level = LEVELS[info.class_names[label]]
                assert np.abs(image - level).max() <= 3, (label, image.min(), image.max())
    for b in evaluation:
        labels += b["label"][b["mask"]].tolist()
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4


def test_image_folder_eval_is_exact_across_processes(image_folder):
    root, _ = image_folder
    config = make_config(str(root), dataset="image_folder", image_size=(4, 4), eval_batch_size=4)
    per_process = []
    for index in range(4):
        batches = list(
            data.create_eval_iterator(
                config, "train", num_devices=4, process_index=index, process_count=4
            )
        )
        per_process.append(batches)
    assert {len(b) for b in per_process} == {data.num_eval_batches(config, "train", 4)} == {5}
    labels = sorted(
        int(lab) for batches in per_process for b in batches for lab in b["label"][b["mask"]]
    )
    assert labels == [0] * 6 + [1] * 6 + [2] * 6


def test_corrupt_image_raises_error_naming_the_files(tmp_path):
    make_folder(tmp_path, {"train": 2, "test": 2})
    garbage = tmp_path / "test" / "dog" / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    truncated = tmp_path / "test" / "cat" / "truncated.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    truncated.write_bytes(buf.getvalue()[:200])
    config = make_config(
        str(tmp_path), dataset="image_folder", image_size=(8, 8), batch_size=2, eval_batch_size=2
    )
    kw = dict(num_devices=1, process_index=0, process_count=1)
    with pytest.raises(data.CorruptImageError) as err:
        list(data.create_eval_iterator(config, **kw))
    assert set(err.value.paths) == {str(garbage), str(truncated)}
    assert str(garbage) in str(err.value) and str(truncated) in str(err.value)
    assert "2 image file(s)" in str(err.value)
    # The train split is clean and unaffected.
    assert next(data.create_train_iterator(config, **kw))["image"].shape == (2, 8, 8, 3)


def test_empty_missing_and_misconfigured_image_folders(tmp_path):
    def info(path, **kw):
        return data.get_dataset_info(make_config(str(path), dataset="image_folder", **kw))

    with pytest.raises(data.DataError, match="does not exist"):
        info(tmp_path / "missing", image_size=(8, 8))
    with pytest.raises(data.DataError, match="No images found"):
        info(tmp_path, image_size=(8, 8))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(data.DataError, match="No images found"):
        info(tmp_path, image_size=(8, 8))
    with pytest.raises(data.DataError, match="needs --config.data.data_dir"):
        info("", image_size=(8, 8))
    write_image(str(tmp_path / "train" / "cat" / "a.png"), (5, 5), "L", 1)
    with pytest.raises(data.DataError, match="image_size"):
        info(tmp_path)
    config = make_config(
        str(tmp_path), dataset="image_folder", image_size=(8, 8), eval_batch_size=1
    )
    with pytest.raises(data.DataError, match="not a folder"):
        data.create_eval_iterator(config, "test", num_devices=1, process_index=0, process_count=1)


# ------------------------------------------------------------------------ bad input


def test_unknown_dataset_names_alternatives():
    with pytest.raises(data.DataError) as err:
        data.get_dataset_info(make_config(None, dataset="cifar11"))
    message = str(err.value)
    assert "cifar11" in message and "attnflax_digits" in message and "cifar10" in message
    assert "tfds.list_builders()" in message and "image_folder" in message


def test_dataset_not_prepared_offline_says_how_to_get_it(tmp_path, no_network):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotPreparedError) as err:
        data.create_train_iterator(
            make_config(str(tmp_path), dataset="cifar10"),
            num_devices=1,
            process_index=0,
            process_count=1,
        )
    assert time.perf_counter() - start < 10  # no waiting on a network
    message = str(err.value)
    assert f"tfds.builder('cifar10', data_dir='{tmp_path}').download_and_prepare()" in message
    assert "--config.data.download=True" in message and "--config.data.data_dir" in message
    assert "--config.data.dataset=attnflax_digits" in message
    with pytest.raises(data.DatasetNotPreparedError, match="MANUAL download") as err:
        data.get_dataset_info(make_config(str(tmp_path), dataset="imagenet2012"))
    assert "ILSVRC2012_img_train.tar" in str(err.value)
    assert os.path.join(str(tmp_path), "downloads", "manual") in str(err.value)


def test_an_existing_folder_without_a_valid_copy_is_not_taken_for_mocked_data(tmp_path):
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)  # e.g. an interrupted copy
    with pytest.raises(data.DatasetNotPreparedError, match="not prepared"):
        data.get_dataset_info(make_config(str(tmp_path), dataset="cifar10"))


def _never_download(self, *args, **kwargs):
    raise AssertionError("download_and_prepare must not run without network")


def test_download_without_network_fails_fast_with_the_offline_message(
        tmp_path, no_network, monkeypatch):
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _never_download)
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotPreparedError) as err:
        data.get_dataset_info(make_config(str(tmp_path), dataset="cifar10", download=True))
    assert time.perf_counter() - start < 5  # TFDS itself would retry for minutes
    message = str(err.value)
    assert message.startswith("Cannot download TFDS dataset 'cifar10': no network (")
    assert "storage.googleapis.com:443" in message and "network disabled" in message
    assert "--config.data.dataset=attnflax_digits" in message


def test_a_hanging_network_probe_gives_up_after_its_timeout(tmp_path, monkeypatch):
    from attnflax.data import sources

    release = threading.Event()

    def hang(*args, **kwargs):  # until the test ends; then the probe thread fails quietly
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(sources, "DOWNLOAD_PROBE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _never_download)
    start = time.perf_counter()
    try:
        with pytest.raises(data.DatasetNotPreparedError, match=r"no answer within 0.2 s"):
            data.get_dataset_info(make_config(str(tmp_path), dataset="mnist", download=True))
        assert time.perf_counter() - start < 3
    finally:
        release.set()


def test_download_runs_when_the_probe_connects(tmp_path, monkeypatch):
    from attnflax.data import sources

    calls = []
    monkeypatch.setattr(sources, "_reachable", lambda *a: None)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, *a, **k: calls.append(self.name))
    data.get_dataset_info(make_config(str(tmp_path), dataset="mnist", download=True))
    assert calls == ["mnist"]


def test_variable_size_dataset_needs_image_size(tmp_path):
    with tfds.testing.mock_data(num_examples=2, policy=MOCKED):
        with pytest.raises(data.DataError, match="vary in size"):
            data.get_dataset_info(make_config(str(tmp_path), dataset="imagenet2012", download=True))


@pytest.mark.parametrize(
    "batch_size,eval_batch_size,num_devices,process_count,match,bad",
    [
        (4, 8, 8, "1", "batch_size=4 is smaller than the 8 devices.*e.g. 8", "train"),
        (100, 8, 8, "1", "batch_size=100 is not divisible by the 8 devices.*e.g. 96 or 104",
         "train"),
        (8, 8, 4, "3", "batch_size=8 is not divisible by the 3 processes.*multiple of 12",
         "both"),
        (8, 6, 4, "2", "eval_batch_size=6 is not divisible by the 4 devices.*e.g. 4 or 8", "eval"),
    ],
)
def test_bad_batch_sizes(
    digits_dir, batch_size, eval_batch_size, num_devices, process_count, match, bad
):
    """Each iterator checks its own batch size, so an analysis script evaluating on other
    devices than the training ran on is not stopped by the training batch size."""
    config = make_config(digits_dir, batch_size=batch_size, eval_batch_size=eval_batch_size)
    kw = dict(num_devices=num_devices, process_index=0, process_count=int(process_count))
    for create, kind in ((data.create_train_iterator, "train"),
                         (data.create_eval_iterator, "eval")):
        if bad in (kind, "both"):
            with pytest.raises(data.DataError, match=match):
                create(config, **kw)
        else:
            create(config, **kw)


def test_other_bad_arguments(digits_dir):
    config = make_config(digits_dir, batch_size=2, train_split="test[:1]")
    config.train_sharding = "process"  # 'global' reads the whole split on every process
    with pytest.raises(data.DataError, match="too few for 2 processes"):
        data.create_train_iterator(config, num_devices=2, process_index=1, process_count=2)
    with pytest.raises(data.DataError, match="process_index=2"):
        data.create_train_iterator(config, num_devices=2, process_index=2, process_count=2)
    with pytest.raises(data.DataError, match="start_step"):
        data.create_train_iterator(
            make_config(digits_dir), num_devices=1, process_index=0, process_count=1, start_step=-1
        )
    with pytest.raises(data.DataError, match="Bad split 'validation'"):
        data.create_eval_iterator(
            make_config(digits_dir), "validation", num_devices=1, process_index=0, process_count=1
        )
    with pytest.raises(data.DataError, match="num_channels must be 1 or 3"):
        data.get_dataset_info(make_config(digits_dir, num_channels=2))


# --------------------------------------------------------------------- config, script


def test_default_config():
    config = data.default_config()
    assert config.dataset == "attnflax_digits" and config.data_dir is None
    assert (config.train_split, config.eval_split) == ("train", "test")
    assert (config.batch_size, config.eval_batch_size) == (128, 256)
    assert config.image_size is None and config.num_channels is None
    assert config.augment.to_dict() == {"crop_padding": 0, "flip": False}
    assert (config.shuffle_buffer, config.seed) == (10_000, 0)
    config.image_size = (32, 32)  # placeholders take their type (and CLI overrides)
    config.num_channels = 3
    config.data_dir = "/data"
    with pytest.raises(TypeError):
        config.num_channels = "three"


def test_normalisation_channel_conversion_and_override(digits_dir):
    info = data.get_dataset_info(make_config(digits_dir, num_channels=3))
    assert info.image_shape == (8, 8, 3) and info.mean == digits.MEAN * 3
    info = data.get_dataset_info(make_config(digits_dir, mean=(0.5,), std=(0.25,)))
    assert (info.mean, info.std) == ((0.5,), (0.25,))
    batch = next(
        data.create_train_iterator(
            make_config(digits_dir, mean=(0.0,), std=(1.0,), num_channels=3, image_size=(16, 16)),
            num_devices=1,
            process_index=0,
            process_count=1,
        )
    )
    assert batch["image"].shape == (128, 16, 16, 3)
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_inspect_data_script(digits_dir, tmp_path, capsys):
    module = load_script("inspect_data")
    out = tmp_path / "inspect"  # a folder, as every script's --out
    status = module.main(
        [
            "--data_dir",
            digits_dir,
            "--out",
            str(out),
            "--batch_size",
            "32",
            "--flip",
            "--benchmark",
            "--steps",
            "5",
            "--warmup",
            "1",
            "--max_images",
            "9",
        ]
    )
    assert status == 0
    assert Image.open(out / "batch.png").size[0] > 100
    printed = capsys.readouterr().out
    assert "num_classes: 10" in printed and "label_histogram" in printed
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["benchmark"] == "train_pipeline" and result["images_per_second"] > 0
    assert result["batch_size"] == 32 and "images/s" in printed


def test_tf_does_not_take_gpus(digits_dir):
    data.get_dataset_info(make_config(digits_dir))
    assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_train_sharding_gives_the_same_global_batches(digits_dir, process_count):
    """'global': the processes' slices, concatenated, are the 1-process batches."""
    config = make_config(digits_dir, batch_size=64, seed=5, train_split="train[:300]",
                         augment={"crop_padding": 1, "flip": True})
    single = take(data.create_train_iterator(config, num_devices=1, process_index=0,
                                             process_count=1), 6)
    parts = [take(data.create_train_iterator(config, num_devices=1, process_index=p,
                                             process_count=process_count), 6)
             for p in range(process_count)]
    for step, whole in enumerate(single):
        for key in ("image", "label", "mask"):
            joined = np.concatenate([part[step][key] for part in parts])
            np.testing.assert_array_equal(joined, whole[key])


def test_unknown_train_sharding_is_rejected(digits_dir):
    config = make_config(digits_dir, batch_size=64)
    config.train_sharding = "hosts"
    with pytest.raises(data.DataError, match="train_sharding='hosts'"):
        next(iter(data.create_train_iterator(config, num_devices=1, process_index=0,
                                             process_count=1)))
