"""Stopping a run cleanly on SIGTERM/SIGINT (preemption, Ctrl-C)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from absl import logging


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the train loop checks after each step.

    Used as a context manager around the loop. The first signal sets `signum`;
    the loop then saves a checkpoint and returns. A second signal restores the
    default handlers and raises ``KeyboardInterrupt`` (abort without waiting).
    Outside the main thread (where Python cannot install handlers) it does nothing.

    Args:
      signals: The signals to catch.
      on_signal: Called with a message when the first signal arrives.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
                 on_signal: Any = None):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._on_signal = on_signal

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signum is not None:
            self._restore_handlers()
            raise KeyboardInterrupt(f"second {name}: aborting without saving")
        self.signum = signum
        message = (f"Received {name}: saving a checkpoint after this step, then exiting "
                   "(send it again to abort without saving).")
        logging.warning(message)
        if self._on_signal is not None:
            self._on_signal(message)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore_handlers()
