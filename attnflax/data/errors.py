"""Errors raised by `attnflax.data`; each message says what to do about it."""

from __future__ import annotations


class DataError(ValueError):
    """A data configuration that cannot work (unknown dataset, bad batch size, empty folder)."""


class DatasetNotPreparedError(DataError):
    """A known TFDS dataset that is not in the data dir and may not be downloaded."""


class CorruptImageError(DataError):
    """One or more image files that cannot be decoded; `paths` lists them."""

    def __init__(self, message: str, paths: tuple[str, ...]):
        super().__init__(message)
        self.paths = paths
