"""Ctrl-C during a run: the first SIGINT asks the run to stop at the next safe point (between blocks, after the
current block is written, so the output stays valid and `--resume` continues it); a second one aborts at once
(every file is written atomically and the manifest last, so even that leaves a resumable output)."""
from __future__ import annotations

import signal
import threading
from typing import Callable


class SafeStop:
    """Installs the two-step SIGINT handler for the duration of a `with` block (main thread only)."""

    def __init__(self, announce: Callable[[str], None]):
        self.announce = announce
        self.requested = False
        self._previous = None

    def __call__(self) -> bool:
        """Polled by the pipeline between blocks."""
        return self.requested

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        self.announce("Ctrl-C: stopping after the current block is written (press Ctrl-C again to abort now)")

    def __enter__(self) -> "SafeStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
