"""Tests for the command line ``python -m attnflax.main``: flags and user errors.

Its normal path (train, SIGTERM, resume, exit status) runs in test_checkpoint.py's child
processes, and ``experiments/evaluate.py`` in test_checkpoint.py too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import types

import pytest
from absl import flags
from train_testutil import REPO

from attnflax import main

DIGITS = "--config=experiments/configs/digits.py"


def _parse(argv, monkeypatch):
    """Parses `argv` with main's flags into a fresh FlagValues (as `app.run` would)."""
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads overrides from sys.argv
    monkeypatch.chdir(REPO)
    main.parse_flags(argv, flag_values)
    return flag_values


def test_config_overrides(monkeypatch):
    fv = _parse(["main", DIGITS, "--workdir=/tmp/x", "--config.num_epochs=3",
                 "--config.data.batch_size=32", "--config.model_kwargs.attention=global",
                 "--config.model_kwargs.features=(8,16)"], monkeypatch)
    assert fv.config.num_epochs == 3.0 and isinstance(fv.config.num_epochs, float)
    assert fv.config.data.batch_size == 32
    assert fv.config.model_kwargs.attention == "global"
    assert fv.config.model_kwargs.features == (8, 16)
    assert fv.workdir == "/tmp/x"


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.not_a_key=1", "the config has no key 'not_a_key'"),
        ("--config.data.batchsize=8", "data has no key 'batchsize'; its keys are augment, "
                                      "batch_size"),
        ("--config.num_epochs=abc", "could not convert string to float: 'abc'"),
        ("--config.data.batch_size=1.5", "invalid literal for int()"),
    ],
)
def test_bad_config_flags_are_rejected(flag, message, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(["main", DIGITS, "--workdir=/tmp/x", flag], monkeypatch)
    assert exit_info.value.code == 2  # a usage error, as in every script (attnflax.cli)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_user_errors_are_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fv = _parse(["main", DIGITS, f"--workdir={blocker}/run"], monkeypatch)
    assert main.main(["main"], fv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot write to workdir") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_attention_implementation_is_a_config_key(monkeypatch):
    """``--config.attention_implementation`` picks the kernel of the model's attention
    layers without changing the model's identity (its checkpoint metadata)."""
    from attnflax import train

    fv = _parse(["main", DIGITS, "--workdir=/tmp/x", "--config.attention_implementation=xla"],
                monkeypatch)
    assert fv.config.attention_implementation == "xla"
    assert train.create_model(fv.config, 10).attention_implementation == "xla"
    fv.config.model = "cnn"
    fv.config.model_kwargs = {"features": (32, 64), "hidden": 64}
    with pytest.raises(train.ConfigError, match="model 'cnn' has no attention layers"):
        train.create_model(fv.config, 10)


def _error_raised_in(where):
    """exc_info of an error raised by code whose file is ``.../where`` (as if a library's)."""
    try:
        exec(compile("raise ValueError('RESOURCE_EXHAUSTED: No space left on device')",
                     os.sep + where.replace("/", os.sep), "exec"))
    except ValueError:
        return sys.exc_info()


LIBRARY_ERRORS = [  # (where the error was raised, dropped unless --verbose)
    ("site-packages/orbax/checkpoint/serialization.py", True),
    ("site-packages/tensorstore/__init__.py", True),
    ("lib/python3.11/asyncio/base_events.py", True),
    ("home/user/attnflax_user/model.py", False),  # not the libraries': kept
]


@pytest.mark.parametrize("where, dropped", LIBRARY_ERRORS)
def test_library_error_logs_are_dropped_unless_verbose(where, dropped):
    # asyncio's "Task exception was never retrieved", logged from asyncio's own module
    # whenever the collector reaches a failed Orbax task (CI saw it; timing-dependent).
    record = logging.LogRecord("asyncio", logging.ERROR, "/home/user/x.py", 1771,
                               "Task exception was never retrieved", (), _error_raised_in(where))
    assert main._QuietLibraryErrors().filter(record) is not dropped
    warning = logging.LogRecord("absl", logging.WARNING, "/x/orbax/y.py", 1, "w", (), None)
    assert main._QuietLibraryErrors().filter(warning)  # the libraries' warnings are kept


@pytest.mark.parametrize("where, dropped", LIBRARY_ERRORS)
def test_library_unraisables_and_thread_errors_are_dropped(where, dropped, monkeypatch):
    """"Exception ignored in: <coroutine _read_array_index_and_device_put>" when a failed
    Orbax read is collected (CI saw it after a damaged checkpoint was skipped)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(("unraisable", u)))
    monkeypatch.setattr(threading, "excepthook", lambda a: seen.append(("thread", a)))
    _, error, tb = _error_raised_in(where)
    event = types.SimpleNamespace(exc_type=ValueError, exc_value=error, exc_traceback=tb,
                                  err_msg=None, object=None, thread=None)
    restore = main.quiet_library_noise()
    try:
        sys.unraisablehook(event)
        threading.excepthook(event)
    finally:
        restore()
    assert [kind for kind, _ in seen] == ([] if dropped else ["unraisable", "thread"])
    sys.unraisablehook(event)  # restored
    assert len(seen) == (1 if dropped else 3)


# ------------------------------------------------------- flags named in error messages

# ``--config.data.download=True``, ``--config.data.image_size='(64, 64)'``, or a bare
# ``config.data.batch_size=100`` naming a key; the value is optional.
_FLAG = re.compile(r"(?<![\w.])(--)?config\.([A-Za-z_][\w.]*\w)"
                   r"(?:=('[^']*'|[^\s,;:)\"]*[^\s,;:)\".]))?")
_SAMPLE = {str: "/tmp/x", int: "1", float: "1.0", bool: "True", tuple: "(8, 8)"}


def _messages_raised(tmp_path, monkeypatch):
    """The messages of the errors attnflax.data and attnflax.train raise for bad configs."""
    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image

    from attnflax import data, train
    from attnflax.data import sources

    def message(fn, *args, **kwargs):
        with pytest.raises((data.DataError, train.ConfigError)) as err:
            fn(*args, **kwargs)
        return str(err.value)

    def config(**kw):
        c = data.default_config()
        c.data_dir = str(tmp_path)
        c.update(kw)
        return c

    monkeypatch.setattr(sources, "_reachable", lambda *a: "offline in this test")
    folder = tmp_path / "folder"
    for split in ("train", "test"):
        (folder / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / split / "a" / "x.png")
    out = [
        message(data.get_dataset_info, config(dataset="cifar10")),
        message(data.get_dataset_info, config(dataset="cifar10", download=True)),
        message(data.get_dataset_info, config(dataset="imagenet2012")),
        message(data.get_dataset_info, config(dataset="cifar11")),
        message(data.get_dataset_info, config(dataset="image_folder", data_dir="")),
        message(data.get_dataset_info, config(dataset="image_folder", data_dir=str(folder))),
        message(data.get_dataset_info, config(dataset="image_folder", data_dir=str(folder),
                                              image_size=(4, 4), num_channels=2)),
        message(data.check_batch_size, "batch_size", 100, 8, 1),
    ]
    with tfds.testing.mock_data(num_examples=1, policy=tfds.testing.MockPolicy.USE_CODE):
        out.append(message(data.get_dataset_info, config(dataset="imagenet2012")))
    full = train.default_config()
    full.grad_accum_steps = 3
    out.append(message(train.check_batch_layout, full, 4))
    full.learning_rate = -1.0
    out.append(message(train.validate_config, full))
    return out


def _source_messages():
    """Every ``--config.`` flag written in the sources of attnflax/data and attnflax/train."""
    files = [*sorted((REPO / "attnflax" / "data").glob("*.py")),
             *sorted((REPO / "attnflax" / "train").glob("*.py"))]
    return [m.group(0) for path in files for m in re.finditer(r"--config\.[\w.]+(=\S*)?",
                                                             path.read_text())]


def test_every_flag_named_in_an_error_message_is_accepted(tmp_path, monkeypatch):
    """Each ``--config.x=...`` (and ``config.x=...``) an error message suggests parses
    with main's flags: no message sends the user to a flag the CLI rejects."""
    texts = _messages_raised(tmp_path, monkeypatch)
    flags_named = {(m.group(2), m.group(3)) for text in [*texts, *_source_messages()]
                   for m in _FLAG.finditer(text)}
    suggested = {key for key, _ in flags_named}
    assert {"data.download", "data.data_dir", "data.dataset", "data.image_size",
            "data.batch_size", "data.num_channels", "grad_accum_steps"} <= suggested
    base = _parse(["main", DIGITS, "--workdir=/tmp/x"], monkeypatch).config
    for key, value in sorted(flags_named, key=str):
        parent, _, leaf = key.rpartition(".")
        node = base
        for part in filter(None, parent.split(".")):
            assert part in node, f"config.{key}: no key {part!r}"
            node = node[part]
        assert leaf in node, f"config.{key} is named in an error message but is no config key"
        if value is None or any(c in value for c in "<{…") or "..." in value:
            field_type = node.get_ref(leaf).get_type()
            if field_type in (dict, type(base)) or field_type not in _SAMPLE:
                continue  # a sub-config (model_kwargs={...}): the key is enough
            value = _SAMPLE[field_type]
        flag = f"--config.{key}={value.strip(chr(39))}"
        fv = _parse(["main", DIGITS, "--workdir=/tmp/x", flag], monkeypatch)
        assert fv.config is not None, flag
