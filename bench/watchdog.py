"""A watchdog thread for benchmarks under torchrun: a collective that one rank never reaches hangs
the others for good (NCCL's own timeout is minutes and may not fire at all); this exits instead.
"""

from __future__ import annotations

import os
import threading
import time


class Watchdog:
    """Exits the process (status 124) when the armed deadline passes: a hang in a collective cannot
    be interrupted otherwise. `on_fire(label)` runs first, e.g. to record the timeout; `label`
    names what was running (the argument of the last `arm`)."""

    def __init__(self, on_fire):
        self._on_fire, self._deadline, self._label = on_fire, None, ""
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def arm(self, seconds: float, label: str) -> None:
        with self._lock:
            self._deadline, self._label = time.monotonic() + seconds, label

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _watch(self):
        while True:
            time.sleep(0.5)
            with self._lock:
                fired = self._deadline is not None and time.monotonic() > self._deadline
                label = self._label
            if fired:
                try:
                    self._on_fire(label)
                finally:
                    os._exit(124)
